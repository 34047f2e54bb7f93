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
  const void* weight;     // (K,) accumulation type (float; double for double input), or nullptr
  void* grad;             // shaped and laid out like the input (contiguous), or nullptr
  void* loss_rows;        // (N,) float (double for double input)
  int64_t N, K, ignore_index, mode;
  double eps;
  double scale;  // multiplies the gradient (1/D for "mean")
  double W;      // sum of the weights
  // (N,) per-row multipliers of the gradient (incoming gradient / D), used instead of scale
  // when not null: they are applied in the accumulation type, before the one rounding.
  const double* row_scale;
  // Large-vocabulary options (2-d rows only, S == 1): softcap > 0 caps the logits, z_loss adds
  // z_loss * lse^2 per non-ignored row; lse_rows (N,) in the loss dtype (0 for ignored rows),
  // or nullptr. grad may equal input (the in-place backward): a row is read before it is written.
  double z_loss;
  double softcap;
  void* lse_rows;
};

struct ProbRowsArgs {
  const void* input;
  int64_t in_row_stride;
  const void* target;  // the input's dtype, or the accumulation type when target_is_acc
  int64_t t_row_stride;
  bool target_is_acc;  // float32 soft targets with 16-bit input (autocast)
  const void* weight;  // accumulation type, or nullptr
  void* grad;
  void* loss_rows;
  int64_t N, K, mode;
  double eps;
  double scale;
  // The large-vocabulary options and the recomputing backward (prob_rows_ext; all off in
  // ce_prob_forward): softcap > 0 caps the logits, z_loss adds z_loss * lse^2 to every row,
  // lse_rows (N,) in the loss dtype or nullptr, row_scale (N,) per-row gradient multipliers used
  // instead of scale when not null. grad may equal input (a row is read before it is written).
  double z_loss;
  double softcap;
  void* lse_rows;
  const double* row_scale;
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
// The plain row kernels' float exp (exp_row in kernels.h), for its error test.
void exp_row_DEFAULT(const float* x, float* y, int64_t n);
// The spatial kernel's log of row sums (log_ge1 in kernels.h), for its error test.
void log_row_DEFAULT(const float* x, float* y, int64_t n);
// Targets other than ignore_index, or -1 when one is outside 0..K-1 (count_kept_targets).
int64_t count_kept_DEFAULT(const int64_t* t, int64_t N, int64_t K, int64_t ignore_index);
#if defined(__x86_64__) && !defined(LSE_NO_AVX2)
#define LSE_HAVE_AVX2_KERNELS 1
KernelConstants constants_AVX2();
void ce_rows_AVX2(ScalarKind, const CeRowsArgs&);
void ce_spatial_AVX2(ScalarKind, const CeRowsArgs&);
void prob_rows_AVX2(ScalarKind, const ProbRowsArgs&);
void exp_row_AVX2(const float* x, float* y, int64_t n);
void log_row_AVX2(const float* x, float* y, int64_t n);
int64_t count_kept_AVX2(const int64_t* t, int64_t N, int64_t K, int64_t ignore_index);
#endif

}  // namespace cpu
}  // namespace labelsmooth_ext
