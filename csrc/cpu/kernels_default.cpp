// Baseline (no ISA extension) build of the CPU row kernels.
#define CPU_CAPABILITY DEFAULT
#define CPU_CAPABILITY_DEFAULT
#include "kernels.h"
LSE_DEFINE_CPU_ENTRY_POINTS(DEFAULT)
#include "vp_kernels.h"  // tensor parallel (issue 14)
LSE_DEFINE_VP_ENTRY_POINTS(DEFAULT)
