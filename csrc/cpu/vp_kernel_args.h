// Plain-data arguments of the vocabulary-parallel CPU row kernels (issue 14: the tensor-parallel
// loss of labelsmooth_ext/distributed.py), and their per-capability entry points.
#pragma once

#include <cstdint>

#include "kernel_args.h"

namespace labelsmooth_ext {
namespace cpu {

// Rows of this rank's class slice: input (N, K) with unit class stride (K = K_r, may be 0),
// target (N,) global class indices, class `start` of the slice.
struct VpStatsArgs {
  const void* input;      // input dtype
  int64_t in_row_stride;  // elements
  const int64_t* target;
  const void* weight;  // (K,) accumulation type, or nullptr
  void* stats;         // (5, N) accumulation type: m, s, zy, lin, wy
  int64_t N, K, start, ignore_index;
  double softcap;  // > 0: z = softcap * tanh(x / softcap)
};

struct VpGradArgs {
  const void* input;
  int64_t in_row_stride;
  const int64_t* target;
  const void* weight;  // (K,) accumulation type, or nullptr
  const void* coefs;   // (4, N) accumulation type: lse, kp, kw, ky
  void* grad;          // (N, K) input dtype, contiguous
  int64_t N, K, start, ignore_index;
  double softcap;
};

void vp_stats_DEFAULT(ScalarKind, const VpStatsArgs&);
void vp_grad_DEFAULT(ScalarKind, const VpGradArgs&);
#ifdef LSE_HAVE_AVX2_KERNELS
void vp_stats_AVX2(ScalarKind, const VpStatsArgs&);
void vp_grad_AVX2(ScalarKind, const VpGradArgs&);
#endif

}  // namespace cpu
}  // namespace labelsmooth_ext
