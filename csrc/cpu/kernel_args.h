// Plain-data arguments of the CPU row kernels, so that the per-capability kernel files
// need no tensor headers.
#pragma once

#include <cstdint>

namespace labelsmooth_ext {
namespace cpu {

enum class ScalarKind { kFloat, kDouble, kBFloat16, kHalf };

struct CeRowsArgs {
  const void* input;      // (N, K) rows, unit class stride, input dtype
  int64_t in_row_stride;  // elements
  const int64_t* target;  // (N,), validated
  const void* weight;     // (K,) input dtype, or nullptr
  void* grad;             // (N, K) contiguous, input dtype, or nullptr (no gradient wanted)
  void* loss_rows;        // (N,) float (double for double input)
  int64_t N, K, ignore_index, mode;
  double eps;
  double scale;  // multiplies the gradient (1/D for "mean")
  double W;      // sum of the weights
};

// Class-index targets on a (N, C, S) contiguous input (classes along dim 1, S positions): the
// K-dimensional case, vectorised across positions instead of along 21-element rows.
struct CeSpatialArgs {
  const void* input;      // (N, C, S) contiguous
  const int64_t* target;  // (N * S,), validated
  const void* weight;     // (C,) or nullptr
  void* grad;             // (N, C, S) contiguous, or nullptr
  void* loss_rows;        // (N * S,)
  int64_t N, C, S, ignore_index, mode;
  double eps, scale, W;
};

struct ProbRowsArgs {
  const void* input;
  int64_t in_row_stride;
  const void* target;  // same dtype as input
  int64_t t_row_stride;
  const void* weight;
  void* grad;
  void* loss_rows;
  int64_t N, K, mode;
  double eps;
  double scale;
};

void ce_rows_DEFAULT(ScalarKind, const CeRowsArgs&);
void ce_spatial_DEFAULT(ScalarKind, const CeSpatialArgs&);
void prob_rows_DEFAULT(ScalarKind, const ProbRowsArgs&);
#if defined(__x86_64__) && !defined(LSE_NO_AVX2)
#define LSE_HAVE_AVX2_KERNELS 1
void ce_rows_AVX2(ScalarKind, const CeRowsArgs&);
void ce_spatial_AVX2(ScalarKind, const CeSpatialArgs&);
void prob_rows_AVX2(ScalarKind, const ProbRowsArgs&);
#endif

}  // namespace cpu
}  // namespace labelsmooth_ext
