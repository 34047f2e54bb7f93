// AVX2 + FMA build of the CPU row kernels, chosen at run time when the CPU has them
// (loss_cpu.cpp). setup.py has one flag set for every C++ file, so this file gives itself the
// ISA: the target pragma for code generation, and the macros that -mavx2 -mfma would define,
// which ATen's and Sleef's headers test to declare their 256-bit paths.
#if defined(__x86_64__) && !defined(LSE_NO_AVX2)
#pragma GCC target("avx,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#ifndef __F16C__
#define __F16C__ 1
#endif
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include "kernels.h"
LSE_DEFINE_CPU_ENTRY_POINTS(AVX2)
#include "vp_kernels.h"  // tensor parallel (issue 14)
LSE_DEFINE_VP_ENTRY_POINTS(AVX2)
#endif
