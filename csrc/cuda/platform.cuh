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

// 1/x for a normal, positive x (a row's sum of exp, >= 1): the hardware reciprocal and one Newton
// step (within an ulp of 1/x), without the IEEE division's slow-path subroutine, whose call
// makes ptxas keep registers on the stack in the prob / split kernels.
__device__ __forceinline__ float rcp_normal(float x) {
  const float r = __fdividef(1.0f, x);
  return fmaf(fmaf(-x, r, 1.0f), r, r);
}
__device__ __forceinline__ double rcp_normal(double x) { return 1.0 / x; }

// Stores v (a piece of a pack: 8 or 4 bytes) at p, which must be aligned to v's size.
template <typename T, typename V>
__device__ __forceinline__ void store_piece(T* p, V v) {
  *reinterpret_cast<V*>(p) = v;
}

// 16-byte accesses with L2 hints (sm_80+), for rows larger than the register cache:
// load_keep_l2 reads a line that is read again soon (cache policy L2::evict_last), load_last_l2
// reads it for the last time (L2::evict_first), store_stream writes a line this kernel does not
// read again (.cs: evict first), so the gradient's stores do not push the logits out of L2.
// The policies come from createpolicy (a constant: the compiler hoists it out of the loops).
__device__ __forceinline__ uint64_t l2_policy_evict_last() {
  uint64_t pol;
  asm("createpolicy.fractional.L2::evict_last.b64 %0, 1.0;" : "=l"(pol));
  return pol;
}
__device__ __forceinline__ uint64_t l2_policy_evict_first() {
  uint64_t pol;
  asm("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(pol));
  return pol;
}
template <typename V>
__device__ __forceinline__ V load_hinted(const V* p, uint64_t pol) {
  static_assert(sizeof(V) == 16, "a 16-byte pack");
  uint4 u;
  asm("ld.global.L2::cache_hint.v4.u32 {%0, %1, %2, %3}, [%4], %5;"
      : "=r"(u.x), "=r"(u.y), "=r"(u.z), "=r"(u.w) : "l"(p), "l"(pol));
  return *reinterpret_cast<const V*>(&u);
}
template <typename V>
__device__ __forceinline__ V load_keep_l2(const V* p) {
  return load_hinted(p, l2_policy_evict_last());
}
template <typename V>
__device__ __forceinline__ V load_last_l2(const V* p) {
  return load_hinted(p, l2_policy_evict_first());
}
template <typename V>
__device__ __forceinline__ void store_stream(V* p, const V& v) {
  static_assert(sizeof(V) == 16, "a 16-byte pack");
  const uint4 u = *reinterpret_cast<const uint4*>(&v);
  asm volatile("st.global.cs.v4.u32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(u.x), "r"(u.y), "r"(u.z), "r"(u.w)
               : "memory");
}

}  // namespace cuda
}  // namespace labelsmooth_ext

#else

#include "simt/simt.h"

#endif
