// Operator schemas (the one place they are declared), argument checks shared by the
// backends, and the device-independent operators.
#include "ops.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/full.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/where.h>
#include <torch/library.h>

#include <cmath>
#include <sstream>
#include <string>

#include "row_math.h"

// setup.py writes build_config.h (LSE_TORCH_VERSION, LSE_CUDA_ARCHS); CMake defines them.
#if !defined(LSE_NO_BUILD_CONFIG) && __has_include("build_config.h")
#include "build_config.h"
#endif
#ifndef LSE_TORCH_VERSION
#define LSE_TORCH_VERSION "unknown"
#endif
#ifndef LSE_CUDA_ARCHS
#define LSE_CUDA_ARCHS ""
#endif

namespace labelsmooth_ext {

static const char* dtype_name(at::ScalarType t) { return c10::toString(t); }

static void check_common(const char* fn, const at::Tensor& input,
                         const std::optional<at::Tensor>& weight, double eps, int64_t mode,
                         int64_t reduction, bool allow_3d = false) {
  const auto dt = input.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16,
                   fn, ": input must be float32, float64, float16 or bfloat16, got ", dtype_name(dt));
  TORCH_CHECK_VALUE(input.dim() == 2 || (allow_3d && input.dim() == 3), fn,
                    allow_3d ? ": input must be (rows, classes) or (N, classes, positions), got shape "
                             : ": input must be 2-d (rows, classes), got shape ",
                    input.sizes());
  TORCH_CHECK_VALUE(eps >= 0.0 && eps <= 1.0, fn, ": label_smoothing must be in [0, 1], got ", eps);
  TORCH_CHECK_VALUE(mode == kUniform || mode == kOffTarget, fn,
                    ": smoothing_mode must be 0 (uniform) or 1 (off_target), got ", mode);
  TORCH_CHECK_VALUE(reduction == kNone || reduction == kMean || reduction == kSum, fn,
                    ": reduction must be 0 (none), 1 (mean) or 2 (sum), got ", reduction);
  const int64_t K = input.size(1);
  TORCH_CHECK_VALUE(!(mode == kOffTarget && K == 1 && eps > 0.0), fn,
                    ": smoothing_mode='off_target' needs at least 2 classes when label_smoothing > 0 "
                    "(got 1 class, label_smoothing=", eps, ")");
  if (weight.has_value() && weight->defined()) {
    const auto& w = *weight;
    TORCH_CHECK_VALUE(w.dim() == 1 && w.size(0) == K, fn, ": weight must have shape (", K,
                      ",) for ", K, " classes, got ", w.sizes());
    // float32 class weights with 16-bit input: what autocast passes (PyTorch runs the loss in
    // float32 there); the Python layer allows them only under autocast.
    const bool acc_weight = w.scalar_type() == at::kFloat && (dt == at::kHalf || dt == at::kBFloat16);
    TORCH_CHECK_TYPE(w.scalar_type() == dt || acc_weight, fn, ": weight dtype ",
                     dtype_name(w.scalar_type()), " must match the input dtype ", dtype_name(dt),
                     " (or be float32 for a float16 / bfloat16 input)");
    TORCH_CHECK_VALUE(w.device() == input.device(), fn, ": weight is on ", w.device(),
                      " but input is on ", input.device());
  }
}

void check_ce_args(const at::Tensor& input, const at::Tensor& target,
                   const std::optional<at::Tensor>& weight, double eps, int64_t mode,
                   int64_t reduction, bool allow_3d) {
  check_common("labelsmooth_ext::ce_forward", input, weight, eps, mode, reduction, allow_3d);
  const int64_t rows = input.dim() == 3 ? input.size(0) * input.size(2) : input.size(0);
  TORCH_CHECK_TYPE(target.scalar_type() == at::kLong,
                   "labelsmooth_ext::ce_forward: target must be int64, got ",
                   dtype_name(target.scalar_type()));
  TORCH_CHECK_VALUE(target.dim() == 1 && target.size(0) == rows,
                    "labelsmooth_ext::ce_forward: target must have shape (", rows, ",), got ",
                    target.sizes());
  TORCH_CHECK_VALUE(target.device() == input.device(), "labelsmooth_ext::ce_forward: target is on ",
                    target.device(), " but input is on ", input.device());
}

void check_prob_args(const at::Tensor& input, const at::Tensor& target,
                     const std::optional<at::Tensor>& weight, double eps, int64_t mode,
                     int64_t reduction) {
  check_common("labelsmooth_ext::ce_prob_forward", input, weight, eps, mode, reduction);
  const auto dt = input.scalar_type();
  const bool acc_target = target.scalar_type() == at::kFloat && (dt == at::kHalf || dt == at::kBFloat16);
  TORCH_CHECK_TYPE(target.scalar_type() == dt || acc_target,
                   "labelsmooth_ext::ce_prob_forward: probability target dtype ",
                   dtype_name(target.scalar_type()), " must match the input dtype ", dtype_name(dt),
                   " (or be float32 for a float16 / bfloat16 input)");
  TORCH_CHECK_VALUE(target.sizes() == input.sizes(),
                    "labelsmooth_ext::ce_prob_forward: probability target shape ", target.sizes(),
                    " must equal the input shape ", input.sizes());
  TORCH_CHECK_VALUE(target.device() == input.device(),
                    "labelsmooth_ext::ce_prob_forward: target is on ", target.device(),
                    " but input is on ", input.device());
}

void check_bce_args(const at::Tensor& input, const at::Tensor& target,
                    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& pos_weight,
                    double eps, int64_t reduction) {
  const char* fn = "labelsmooth_ext::bce_forward";
  const auto dt = input.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16,
                   fn, ": input must be float32, float64, float16 or bfloat16, got ", dtype_name(dt));
  TORCH_CHECK_VALUE(target.numel() == input.numel() && target.scalar_type() == dt &&
                        target.device() == input.device(),
                    fn, ": target must match the input's size, dtype and device");
  TORCH_CHECK_VALUE(eps >= 0.0 && eps <= 1.0, fn, ": label_smoothing must be in [0, 1], got ", eps);
  TORCH_CHECK_VALUE(reduction == kNone || reduction == kMean || reduction == kSum, fn,
                    ": reduction must be 0 (none), 1 (mean) or 2 (sum), got ", reduction);
  for (const auto* w : {&weight, &pos_weight}) {
    if (!w->has_value() || !(*w)->defined()) continue;
    const at::Tensor& t = **w;
    TORCH_CHECK_VALUE(t.dim() == 1 && t.numel() > 0 && input.numel() % t.numel() == 0 &&
                          t.scalar_type() == dt && t.device() == input.device(),
                      fn, ": weight and pos_weight must be 1-d, of the input's dtype and device, with a "
                      "length that divides the input's numel; got shape ", t.sizes());
  }
}

void check_ext_args(const char* fn, double z_loss, double softcap) {
  TORCH_CHECK_VALUE(std::isfinite(z_loss) && z_loss >= 0.0, fn, ": z_loss must be a finite number >= 0, got ",
                    z_loss);
  TORCH_CHECK_VALUE(std::isfinite(softcap) && softcap >= 0.0, fn,
                    ": softcap must be a finite number > 0 (0 here means no softcap), got ", softcap);
}

// The vocabulary-parallel operators (vocab_parallel_stats / vocab_parallel_grad): rows of this
// rank's class slice (K_r may be 0), global class-index targets, the slice's weights.
void check_vp_args(const char* fn, const at::Tensor& input, const at::Tensor& target,
                   const std::optional<at::Tensor>& weight, double softcap) {
  const auto dt = input.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16,
                   fn, ": input must be float32, float64, float16 or bfloat16, got ", dtype_name(dt));
  TORCH_CHECK_VALUE(input.dim() == 2, fn, ": input must be 2-d (rows, classes of this rank's slice), got shape ",
                    input.sizes());
  TORCH_CHECK_TYPE(target.scalar_type() == at::kLong, fn, ": target must be int64, got ",
                   dtype_name(target.scalar_type()));
  TORCH_CHECK_VALUE(target.dim() == 1 && target.size(0) == input.size(0), fn, ": target must have shape (",
                    input.size(0), ",), got ", target.sizes());
  TORCH_CHECK_VALUE(target.device() == input.device(), fn, ": target is on ", target.device(),
                    " but input is on ", input.device());
  TORCH_CHECK_VALUE(std::isfinite(softcap) && softcap >= 0.0, fn,
                    ": softcap must be a finite number > 0 (0 here means no softcap), got ", softcap);
  if (weight.has_value() && weight->defined()) {
    const auto& w = *weight;
    TORCH_CHECK_VALUE(w.dim() == 1 && w.size(0) == input.size(1), fn, ": weight must be this rank's slice, of shape (",
                      input.size(1), ",), got ", w.sizes());
    const bool acc_weight = w.scalar_type() == at::kFloat && (dt == at::kHalf || dt == at::kBFloat16);
    TORCH_CHECK_TYPE(w.scalar_type() == dt || acc_weight, fn, ": weight dtype ", dtype_name(w.scalar_type()),
                     " must match the input dtype ", dtype_name(dt), " (or be float32 for a float16 / bfloat16 input)");
    TORCH_CHECK_VALUE(w.device() == input.device(), fn, ": weight is on ", w.device(), " but input is on ",
                      input.device());
  }
}

void check_vp_coefs(const char* fn, const at::Tensor& input, const at::Tensor& coefs) {
  const auto acc = acc_type_of(input.scalar_type());
  TORCH_CHECK_VALUE(coefs.dim() == 2 && coefs.size(0) == 4 && coefs.size(1) == input.size(0), fn,
                    ": coefs must have shape (4, ", input.size(0), ") (lse, kp, kw, ky per row), got ",
                    coefs.sizes());
  TORCH_CHECK_TYPE(coefs.scalar_type() == acc, fn, ": coefs must be ", dtype_name(acc), " for ",
                   dtype_name(input.scalar_type()), " input, got ", dtype_name(coefs.scalar_type()));
  TORCH_CHECK_VALUE(coefs.device() == input.device(), fn, ": coefs is on ", coefs.device(), " but input is on ",
                    input.device());
}

void check_inplace_target(const at::Tensor& input) {
  TORCH_CHECK_VALUE(input.dim() == 2 && input.is_contiguous(),
                    "labelsmooth_ext::ce_grad_ext_: inplace_backward writes the gradient into the logits, "
                    "which must be contiguous (N, C) rows; got shape ", input.sizes(), " and strides ",
                    input.strides());
}

at::Tensor rows_with_unit_class_stride(const at::Tensor& t) {
  if (t.size(1) <= 1 || t.stride(1) == 1) return t;
  return t.contiguous();
}

at::ScalarType acc_type_of(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

at::Tensor finish_loss(const at::Tensor& rows, const at::Tensor& denom, int64_t reduction) {
  if (reduction == kNone) return rows;
  at::Tensor total = rows.sum();
  // D = 0 (every row ignored, or the kept rows' weights sum to 0) is NaN, as in PyTorch,
  // also where the smoothing term alone would give x / 0 = inf. On the device: no sync.
  if (reduction == kMean) total = at::where(denom.eq(0), at::full({}, NAN, total.options()), total.div(denom));
  return total;
}

// Multiplies the gradient the forward saved by the incoming gradient (one scalar for
// mean/sum, one value per row for none). Out of place: used under torch.compile and
// create_graph; eager backward uses ce_scale_, which can skip the pass.
at::Tensor per_row_view(const at::Tensor& grad_output, const at::Tensor& grad) {
  if (grad.dim() == 3) return grad_output.reshape({grad.size(0), 1, grad.size(2)});  // (N, C, S)
  std::vector<int64_t> shape(grad.dim(), 1);
  shape[0] = grad.size(0);
  return grad_output.reshape(shape);
}

// The result keeps grad's dtype (grad_output is float32 for a 16-bit input, as the loss is):
// multiplied in float32 and written in grad's dtype in one pass.
static at::Tensor ce_backward(const at::Tensor& grad, const at::Tensor& grad_output, int64_t reduction) {
  at::Tensor out = at::empty_like(grad);
  if (reduction == kNone) return at::mul_out(out, grad, per_row_view(grad_output, grad));
  return at::mul_out(out, grad, grad_output.reshape({}));
}

static std::string build_info() {
  std::ostringstream os;
  os << "{\"torch_version\": \"" << LSE_TORCH_VERSION << "\", \"cuda\": "
#ifdef LSE_WITH_CUDA
     << "true"
#else
     << "false"
#endif
     << ", \"cuda_archs\": \"" << LSE_CUDA_ARCHS << "\", \"cpu_kernels\": \""
#if defined(__x86_64__) && !defined(LSE_NO_AVX2)
     << "DEFAULT,AVX2"
#else
     << "DEFAULT"
#endif
     << "\", \"cpu_parallel\": "
  // at::parallel_for runs its threads only in a translation unit compiled with the parallel
  // backend torch was built with (-fopenmp for the Linux wheels); otherwise ATen's inline
  // fallback runs every range on the calling thread. All CPU sources share these flags.
#ifdef INTRA_OP_PARALLEL
     << "true"
#else
     << "false"
#endif
     << "}";
  return os.str();
}

TORCH_LIBRARY(labelsmooth_ext, m) {
  // Class-index targets. Returns (loss, grad): loss in the accumulation dtype (float32;
  // float64 for float64 input; the Python layer casts it to the input dtype outside autocast),
  // shaped (N,) for reduction none and () otherwise; grad (N, K) in the input dtype, already
  // divided by the mean denominator, or an empty (0,) tensor when compute_grad is false. The
  // CPU also takes a (N, K, S) input (classes along dim 1, target (N*S,)), whose grad is
  // (N, K, S). weight: the input's dtype, or float32 for a 16-bit input (autocast).
  m.def(
      "ce_forward(Tensor input, Tensor target, Tensor? weight, int ignore_index, "
      "float label_smoothing, int smoothing_mode, int reduction, bool compute_grad) "
      "-> (Tensor, Tensor)");
  // Probability targets (target shaped like input); same outputs.
  m.def(
      "ce_prob_forward(Tensor input, Tensor target, Tensor? weight, float label_smoothing, "
      "int smoothing_mode, int reduction, bool compute_grad) -> (Tensor, Tensor)");
  // Binary cross-entropy with logits, elementwise. input/target: any shape, same numel;
  // weight/pos_weight: 1-d, periodic over the flattened input (element i uses w[i % len]).
  // Returns (loss, grad): loss (numel,) for none, () otherwise; grad (numel,) or (0,).
  m.def(
      "bce_forward(Tensor input, Tensor target, Tensor? weight, Tensor? pos_weight, "
      "float label_smoothing, int reduction, bool compute_grad) -> (Tensor, Tensor)");
  m.def("ce_backward(Tensor grad, Tensor grad_output, int reduction) -> Tensor");
  // The gradient of ce_forward's loss times grad_output (one scalar, or one value per row for
  // reduction none), recomputed from the logits with grad_output and 1/D applied in the
  // accumulation type before the one rounding to the input dtype (so float16 does not
  // underflow before a loss scaler's factor arrives, and nothing is rounded twice). `grad`
  // (optional) is the gradient ce_forward saved: where multiplying it by grad_output is exact
  // (row_math.h exact_multiplier) it is used instead of recomputing.
  m.def(
      "ce_grad(Tensor input, Tensor target, Tensor? weight, Tensor grad_output, Tensor? grad, "
      "int ignore_index, float label_smoothing, int smoothing_mode, int reduction) -> Tensor");
  // ce_grad into the saved gradient, in place (the CUDA eager backward): rows whose incoming
  // gradient is exactly 1 are not touched, decided on the device (no host sync).
  m.def(
      "ce_grad_(Tensor(a!) grad, Tensor input, Tensor target, Tensor? weight, Tensor grad_output, "
      "int ignore_index, float label_smoothing, int smoothing_mode, int reduction) -> ()");
  // In place; skips the pass when the incoming gradient is exactly 1 (decided on the device).
  m.def("ce_scale_(Tensor(a!) grad, Tensor grad_output, int reduction) -> ()");
  // The large-vocabulary options (class-index targets, (N, C) rows): z_loss >= 0 adds
  // z_loss * lse^2 to every non-ignored row; softcap > 0 caps the logits at softcap * tanh(x /
  // softcap) first (0: no softcap). Returns (loss, grad, lse) with ce_forward's loss and grad
  // and lse (N,) in the loss dtype (0 for ignored rows).
  m.def(
      "ce_forward_ext(Tensor input, Tensor target, Tensor? weight, int ignore_index, "
      "float label_smoothing, int smoothing_mode, int reduction, bool compute_grad, float z_loss, "
      "float softcap) -> (Tensor, Tensor, Tensor)");
  // Its gradient times grad_output, recomputed from the logits (applied before the one rounding).
  m.def(
      "ce_grad_ext(Tensor input, Tensor target, Tensor? weight, Tensor grad_output, int ignore_index, "
      "float label_smoothing, int smoothing_mode, int reduction, float z_loss, float softcap) -> Tensor");
  // The same gradient written over the logits (inplace_backward=True); input contiguous (N, C).
  m.def(
      "ce_grad_ext_(Tensor(a!) input, Tensor target, Tensor? weight, Tensor grad_output, "
      "int ignore_index, float label_smoothing, int smoothing_mode, int reduction, float z_loss, "
      "float softcap) -> ()");
  // Probability targets with the large-vocabulary options (z_loss added to every row, softcap,
  // lse): ce_prob_forward's (loss, grad) and lse (N,) in the loss dtype.
  m.def(
      "ce_prob_forward_ext(Tensor input, Tensor target, Tensor? weight, float label_smoothing, "
      "int smoothing_mode, int reduction, bool compute_grad, float z_loss, float softcap) "
      "-> (Tensor, Tensor, Tensor)");
  // Its gradient times grad_output, recomputed from the logits (applied before the one rounding).
  m.def(
      "ce_prob_grad_ext(Tensor input, Tensor target, Tensor? weight, Tensor grad_output, "
      "float label_smoothing, int smoothing_mode, int reduction, float z_loss, float softcap) -> Tensor");
  // The same gradient written over the logits (inplace_backward=True); input contiguous (N, C).
  m.def(
      "ce_prob_grad_ext_(Tensor(a!) input, Tensor target, Tensor? weight, Tensor grad_output, "
      "float label_smoothing, int smoothing_mode, int reduction, float z_loss, float softcap) -> ()");
  // Tensor parallel (labelsmooth_ext/distributed.py): rows of this rank's contiguous class slice
  // [class_start, class_start + K_r) of a vocabulary split across ranks; target holds global class
  // indices. One read of the slice per row gives (5, N) statistics in the loss dtype: the local
  // max m (-inf for an empty or all -inf slice), s = sum exp(z - m') and lin = sum_c w_c (z_c - m')
  // with m' = m (0 where m = -inf), the target logit z_y where the target is in this slice (else 0),
  // and its weight w_y (1 unweighted; 0 where the target is elsewhere). softcap > 0 caps every
  // logit first (0: none). Ignored rows give (0, 1, 0, 0, 0). A non-finite m gives NaN s and lin.
  m.def(
      "vocab_parallel_stats(Tensor input, Tensor target, Tensor? weight, int class_start, "
      "int ignore_index, float softcap) -> Tensor");
  // The gradient slice in one read + one write, given per-row coefficients (4, N) in the loss
  // dtype (lse, kp, kw, ky; row_math.h ce_grad_coefs with e_c = exp(z_c - lse), the global lse):
  //   g_c = (exp(z_c - lse) * kp - kw * w_c - [c == y - class_start] * ky) * dz/dx  (softcap),
  // rounded once to the input dtype; ignored rows exactly 0, rows with a non-finite lse NaN.
  m.def(
      "vocab_parallel_grad(Tensor input, Tensor target, Tensor? weight, Tensor coefs, int class_start, "
      "int ignore_index, float softcap) -> Tensor");
  m.def("build_info() -> str", &build_info);
}

TORCH_LIBRARY_IMPL(labelsmooth_ext, CompositeExplicitAutograd, m) {
  m.impl("ce_backward", &ce_backward);
}

}  // namespace labelsmooth_ext
