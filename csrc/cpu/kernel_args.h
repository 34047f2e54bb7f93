// Plain-data arguments of the CPU row kernels, so that the per-capability kernel files
// need no tensor headers.
#pragma once

#include <cstdint>

namespace labelsmooth_ext {
namespace cpu {

enum class ScalarKind { kFloat, kDouble, kBFloat16, kHalf };

// Class-index targets. S == 1: input is (N, K) rows with unit class stride and row stride
// in_row_stride. S > 1 (the K-dimensional case): input is (N / S, K, S) contiguous, classes
// along dim 1, and row r is position r % S of sample r / S (ce_spatial).
struct CeRowsArgs {
  const void* input;      // input dtype
  int64_t in_row_stride;  // elements (S == 1 only)
  int64_t S;              // positions per sample
  const int64_t* target;  // (N,), validated
  const void* weight;     // (K,) input dtype, or nullptr
  void* grad;             // shaped and laid out like the input (contiguous), or nullptr
  void* loss_rows;        // (N,) float (double for double input)
  int64_t N, K, ignore_index, mode;
  double eps;
  double scale;  // multiplies the gradient (1/D for "mean")
  double W;      // sum of the weights
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

// The sizes the kernels block and vectorise by (tests place targets, NaN and row ends on
// their boundaries; exposed through the cpu_kernel_constants operator).
struct KernelConstants {
  int64_t store_block, exp_block, stream_min_bytes;
  int64_t lanes_float, lanes_double, lanes_bfloat16, lanes_half;
};

KernelConstants constants_DEFAULT();
void ce_rows_DEFAULT(ScalarKind, const CeRowsArgs&);
void ce_spatial_DEFAULT(ScalarKind, const CeRowsArgs&);
void prob_rows_DEFAULT(ScalarKind, const ProbRowsArgs&);
#if defined(__x86_64__) && !defined(LSE_NO_AVX2)
#define LSE_HAVE_AVX2_KERNELS 1
KernelConstants constants_AVX2();
void ce_rows_AVX2(ScalarKind, const CeRowsArgs&);
void ce_spatial_AVX2(ScalarKind, const CeRowsArgs&);
void prob_rows_AVX2(ScalarKind, const ProbRowsArgs&);
#endif

}  // namespace cpu
}  // namespace labelsmooth_ext
