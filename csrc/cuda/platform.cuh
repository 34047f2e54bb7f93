// The one place that knows which compiler builds the device code: nvcc (a real GPU build) or
// the SIMT emulation (csrc/cuda/simt/, the kernels run as CPU fibers; see docs and simt.h).
// Everything the kernels and their host dispatch need from the platform is defined here or
// there, once: the launch, __shared__ arrays, the 16-byte pack pointer, ex2.approx, the stream,
// the device guard and the multiprocessor count. Kernel bodies carry no #ifdef.
#pragma once

#if defined(__CUDACC__)

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

// kernel<<<grid, block, shared bytes, stream>>>(args...): LSE_LAUNCH(kernel, grid, block, smem, stream)(args...)
// (`kernel` is a name without commas: a function pointer variable for a template instance).
#define LSE_LAUNCH(kernel, grid, block, smem, stream) kernel<<<(grid), (block), (smem), (stream)>>>
#define LSE_LAUNCH_CHECK() C10_CUDA_KERNEL_LAUNCH_CHECK()
// A __shared__ array of n elements of `type`, named `name`, per block.
#define LSE_SHARED(type, name, n) __shared__ type name[n]

namespace labelsmooth_ext {
namespace cuda {

using stream_t = cudaStream_t;
using DeviceGuard = c10::cuda::CUDAGuard;
inline stream_t current_stream() { return c10::cuda::getCurrentCUDAStream(); }
inline int sm_count(int device) {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return sms;
}

// 2^x with the hardware's approximate ex2 (relative error ~2^-22).
__device__ __forceinline__ float ex2_approx(float x) {
  float y;
  asm("ex2.approx.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// p as a pointer to a 16-byte vector type V (the address must be 16-byte aligned).
template <typename V, typename T>
__device__ __forceinline__ V* vec_ptr(T* p) {
  return reinterpret_cast<V*>(p);
}

}  // namespace cuda
}  // namespace labelsmooth_ext

#else

#include "simt/simt.h"

#endif
