// CPU implementations: target validation, mean denominator, dispatch to the row kernels
// of the best CPU capability.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/scalar_tensor.h>
#include <torch/library.h>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <vector>

#include "../ops.h"
#include "../row_math.h"
#include "kernel_args.h"

namespace labelsmooth_ext {
namespace cpu {
// kind_of and use_avx2 are shared with vp_cpu.cpp (declared there).
ScalarKind kind_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return ScalarKind::kFloat;
    case at::kDouble: return ScalarKind::kDouble;
    case at::kBFloat16: return ScalarKind::kBFloat16;
    case at::kHalf: return ScalarKind::kHalf;
    default: TORCH_INTERNAL_ASSERT(false, "unsupported dtype ", t);
  }
}

// LABELSMOOTH_EXT_CPU_CAPABILITY=default forces the baseline kernels (read on every call
// so tests can exercise both builds in one process).
bool use_avx2() {
#ifdef LSE_HAVE_AVX2_KERNELS
  static const bool cpu_has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                              __builtin_cpu_supports("f16c");
  const char* env = std::getenv("LABELSMOOTH_EXT_CPU_CAPABILITY");
  return cpu_has && !(env && (std::strcmp(env, "default") == 0 || std::strcmp(env, "DEFAULT") == 0));
#else
  return false;
#endif
}

namespace {

// The gradient is as large as the logits and written once. Fresh 4 KiB pages cost a page
// fault each on first touch, which on Linux costs more than the kernel itself at LLM sizes;
// 2 MiB-aligned memory advised for transparent huge pages takes 512x fewer faults. One freed
// block is kept for the next call of the same size (a training loop frees the logits'
// gradient before the next forward), which skips the kernel's zeroing of fresh pages too.
// LABELSMOOTH_EXT_CPU_GRAD_CACHE=0 turns the one-block cache off.
constexpr size_t kHuge = size_t(2) << 20;

struct BlockCache {
  std::mutex mu;
  void* ptr = nullptr;
  size_t size = 0;
};

BlockCache& block_cache() {
  static BlockCache* c = new BlockCache();  // leaked on purpose: safe during static destruction
  return *c;
}

bool grad_cache_enabled() {
  static const bool on = [] {
    const char* env = std::getenv("LABELSMOOTH_EXT_CPU_GRAD_CACHE");
    return !(env && std::strcmp(env, "0") == 0);
  }();
  return on;
}

void release_block(void* p, size_t size) {
  if (grad_cache_enabled()) {
    BlockCache& c = block_cache();
    std::lock_guard<std::mutex> lock(c.mu);
    std::swap(c.ptr, p);  // keep the most recent block, free the one it replaces
    c.size = size;
  }
  std::free(p);
}

void* acquire_block(size_t size) {
  {
    BlockCache& c = block_cache();
    std::lock_guard<std::mutex> lock(c.mu);
    if (c.ptr && c.size == size) {
      void* p = c.ptr;
      c.ptr = nullptr;
      c.size = 0;
      return p;
    }
  }
  void* p = std::aligned_alloc(kHuge, size);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (p) madvise(p, size, MADV_HUGEPAGE);
#endif
  return p;
}

at::Tensor empty_rows(int64_t N, int64_t K, const at::TensorOptions& opts) {
  const size_t nbytes = size_t(N) * size_t(K) * c10::elementSize(c10::typeMetaToScalarType(opts.dtype()));
  if (nbytes >= 2 * kHuge) {
    const size_t padded = (nbytes + kHuge - 1) / kHuge * kHuge;
    if (void* p = acquire_block(padded)) {
      return at::from_blob(p, {N, K}, [padded](void* q) { release_block(q, padded); }, opts);
    }
  }
  return at::empty({N, K}, opts);
}

// Calls the AVX2 build of a kernel when this CPU (and LABELSMOOTH_EXT_CPU_CAPABILITY) allow.
#ifdef LSE_HAVE_AVX2_KERNELS
#define LSE_RUN_BEST(avx2_fn, default_fn, kind, args) \
  (use_avx2() ? avx2_fn(kind, args) : default_fn(kind, args))
#else
#define LSE_RUN_BEST(avx2_fn, default_fn, kind, args) default_fn(kind, args)
#endif

std::vector<double> weights_as_double(const std::optional<at::Tensor>& weight) {
  std::vector<double> w;
  if (!weight.has_value() || !weight->defined()) return w;
  at::Tensor wd = weight->to(at::kDouble).contiguous();
  const double* p = wd.data_ptr<double>();
  w.assign(p, p + wd.numel());
  return w;
}

// The mean denominator D, after checking every target (before any kernel runs).
double ce_denominator(const int64_t* t, int64_t N, int64_t K, int64_t ignore_index,
                      const std::vector<double>& w) {
  if (w.empty()) {  // a vectorised count; the loop below only names a bad target
#ifdef LSE_HAVE_AVX2_KERNELS
    const int64_t kept = use_avx2() ? count_kept_AVX2(t, N, K, ignore_index) : count_kept_DEFAULT(t, N, K, ignore_index);
#else
    const int64_t kept = count_kept_DEFAULT(t, N, K, ignore_index);
#endif
    if (kept >= 0) return double(kept);
  }
  double D = 0;
  for (int64_t r = 0; r < N; ++r) {
    const int64_t y = t[r];
    if (y == ignore_index) continue;
    TORCH_CHECK_INDEX(!target_out_of_range(y, K, ignore_index), "labelsmooth_ext.cross_entropy: target ", y,
                      " (at row ", r, ") is out of range for ", K, " classes; valid targets are 0..",
                      K - 1, " or ignore_index=", ignore_index);
    D += w.empty() ? 1.0 : w[y];
  }
  return D;
}

// The incoming gradient of a backward, as double on the host, after checking its length: one
// value per row (N) for 'none', else one. fn names the operator in the error.
at::Tensor incoming_grad_on_host(const at::Tensor& grad_output, int64_t N, int64_t reduction, const char* fn) {
  at::Tensor go = grad_output.to(at::kDouble).contiguous();
  const int64_t expected = reduction == kNone ? N : 1;
  TORCH_CHECK_VALUE(go.numel() == expected, fn, ": grad_output has ", go.numel(), " elements, expected ",
                    expected);
  return go;
}

// The backward's factor per row: the incoming gradient (one per row for 'none', else one),
// divided by the mean denominator D for 'mean'.
std::vector<double> incoming_row_scales(const double* g, bool per_row, int64_t N, int64_t reduction,
                                        double D) {
  std::vector<double> row_scale(N);
  for (int64_t r = 0; r < N; ++r) {
    const double f = g[per_row ? r : 0];
    row_scale[r] = reduction == kMean ? f / D : f;
  }
  return row_scale;
}

// Runs the class-index row kernel: per-row losses into `rows`, the gradient into `grad` (when
// defined), multiplied by row_scale[r] (when not null) or by 1/D for the mean.
void run_ce_rows(const at::Tensor& in, const at::Tensor& tgt, const std::optional<at::Tensor>& weight,
                 int64_t ignore_index, double eps, int64_t mode, int64_t reduction, double D,
                 const std::vector<double>& w, at::Tensor& rows, at::Tensor* grad, const double* row_scale,
                 double z_loss = 0.0, double softcap = 0.0, at::Tensor* lse = nullptr) {
  const bool spatial = in.dim() == 3;
  const int64_t N = tgt.size(0), K = in.size(1);
  if (N == 0) return;
  const bool weighted = weight.has_value() && weight->defined();
  double W = 0;
  for (double v : w) W += v;
  // The kernels read the weights in the accumulation type (exact for a 16-bit weight).
  const at::Tensor wc = weighted ? weight->to(acc_type_of(in.scalar_type())).contiguous() : at::Tensor();
  CeRowsArgs a{};
  a.input = in.data_ptr();
  a.in_row_stride = spatial ? 0 : in.stride(0);
  a.S = spatial ? in.size(2) : 1;
  a.target = tgt.data_ptr<int64_t>();
  a.weight = weighted ? wc.data_ptr() : nullptr;
  a.grad = grad ? grad->data_ptr() : nullptr;
  a.loss_rows = rows.data_ptr();
  a.N = N;
  a.K = K;
  a.ignore_index = ignore_index;
  a.mode = mode;
  a.eps = eps;
  a.scale = reduction == kMean ? 1.0 / D : 1.0;
  a.W = W;
  a.row_scale = row_scale;
  a.z_loss = z_loss;
  a.softcap = softcap;
  a.lse_rows = lse ? lse->data_ptr() : nullptr;
  TORCH_INTERNAL_ASSERT(!spatial || (z_loss == 0.0 && softcap == 0.0 && !lse),
                        "z_loss / softcap / lse: 2-d rows only");
  const ScalarKind k = kind_of(in.scalar_type());
  if (spatial) {
    LSE_RUN_BEST(ce_spatial_AVX2, ce_spatial_DEFAULT, k, a);
  } else {
    LSE_RUN_BEST(ce_rows_AVX2, ce_rows_DEFAULT, k, a);
  }
}

// The sum in double of n float or double values, in an order fixed by n alone (never by the
// thread count, unlike at::sum): blocks of kSumBlock values, each summed pairwise (halves down
// to 64 values, which four interleaved accumulators take: one vector of doubles), then the
// block sums in order. Error: about log2(n) roundings, as a cascade sum.
template <typename T>
double pairwise_sum(const T* p, int64_t n) {
  if (n > 64) {
    const int64_t h = n / 2;
    return pairwise_sum(p, h) + pairwise_sum(p + h, n - h);
  }
  double a0 = 0, a1 = 0, a2 = 0, a3 = 0;
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    a0 += p[i];
    a1 += p[i + 1];
    a2 += p[i + 2];
    a3 += p[i + 3];
  }
  for (; i < n; ++i) a0 += p[i];
  return (a0 + a1) + (a2 + a3);
}

template <typename T>
double sum_in_double(const T* p, int64_t n) {
  constexpr int64_t kSumBlock = 8192;
  const int64_t blocks = (n + kSumBlock - 1) / kSumBlock;
  std::vector<double> part(blocks);
  at::parallel_for(0, blocks, 4, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t i0 = b * kSumBlock;
      part[b] = pairwise_sum(p + i0, std::min(n, i0 + kSumBlock) - i0);
    }
  });
  double total = 0;
  for (double v : part) total += v;
  return total;
}

// finish_loss for a CPU forward whose D is on the host: float and double rows are summed in
// double (sum_in_double) and divided once, into one 0-dim tensor, instead of the five small ATen
// operations that the device-side finish_loss takes (a large part of a small call's time).
at::Tensor finish_loss_on_host(const at::Tensor& rows, double D, int64_t reduction) {
  if (reduction == kNone) return rows;
  if (rows.scalar_type() != at::kFloat && rows.scalar_type() != at::kDouble) {
    return finish_loss(rows, at::scalar_tensor(D, rows.options()), reduction);
  }
  double total = rows.scalar_type() == at::kFloat ? sum_in_double(rows.const_data_ptr<float>(), rows.numel())
                                                  : sum_in_double(rows.const_data_ptr<double>(), rows.numel());
  // D = 0 (every row ignored, or the kept weights sum to 0): NaN, as in PyTorch
  if (reduction == kMean) total = D == 0 ? double(NAN) : total / D;
  return at::scalar_tensor(total, rows.options());
}

at::Tensor ce_input_rows(const at::Tensor& input) {
  return input.dim() == 3 ? input.contiguous() : rows_with_unit_class_stride(input);
}

std::tuple<at::Tensor, at::Tensor> ce_forward_cpu(const at::Tensor& input, const at::Tensor& target,
                                                  const std::optional<at::Tensor>& weight,
                                                  int64_t ignore_index, double eps, int64_t mode,
                                                  int64_t reduction, bool compute_grad) {
  check_ce_args(input, target, weight, eps, mode, reduction, /*allow_3d=*/true);
  const at::Tensor in = ce_input_rows(input);
  const at::Tensor tgt = target.contiguous();
  const int64_t N = tgt.size(0), K = in.size(1);  // N: rows (positions for a spatial input)
  const std::vector<double> w = weights_as_double(weight);
  const double D = ce_denominator(tgt.data_ptr<int64_t>(), N, K, ignore_index, w);
  at::Tensor rows = at::empty({N}, in.options().dtype(acc_type_of(in.scalar_type())));
  at::Tensor grad = compute_grad ? empty_rows(N, K, in.options()).view(in.sizes()) : at::empty({0}, in.options());
  run_ce_rows(in, tgt, weight, ignore_index, eps, mode, reduction, D, w, rows, compute_grad ? &grad : nullptr,
              nullptr);
  return {finish_loss_on_host(rows, D, reduction), grad};
}

// The gradient times the incoming gradient, rounded once (see ops.cpp). The incoming gradient
// is on the host here: the saved gradient is reused when every factor is exact, otherwise
// every row is recomputed with its factor (incoming gradient / D) in the accumulation type.
at::Tensor ce_grad_cpu(const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight,
                       const at::Tensor& grad_output, const std::optional<at::Tensor>& saved,
                       int64_t ignore_index, double eps, int64_t mode, int64_t reduction) {
  check_ce_args(input, target, weight, eps, mode, reduction, /*allow_3d=*/true);
  const at::Tensor in = ce_input_rows(input);
  const at::Tensor tgt = target.contiguous();
  const int64_t N = tgt.size(0), K = in.size(1);
  const at::Tensor go = incoming_grad_on_host(grad_output, N, reduction, "labelsmooth_ext::ce_grad");
  const bool per_row = reduction == kNone;
  const double* g = go.data_ptr<double>();
  if (saved.has_value() && saved->defined() && saved->numel() > 0) {
    TORCH_CHECK_VALUE(saved->sizes() == input.sizes() && saved->scalar_type() == input.scalar_type(),
                      "labelsmooth_ext::ce_grad: the saved grad must have the input's shape and dtype");
    const bool is_half = in.scalar_type() == at::kHalf;
    bool exact = true;
    for (int64_t i = 0; i < go.numel() && exact; ++i) exact = exact_multiplier<double>(g[i], is_half);
    if (exact) {
      // the factors are powers of two (or 1 for float16): exact in the gradient's dtype
      const at::Tensor f = grad_output.to(saved->scalar_type());
      return per_row ? saved->mul(per_row_view(f, *saved)) : saved->mul(f.reshape({}));
    }
  }
  const std::vector<double> w = weights_as_double(weight);
  const double D = ce_denominator(tgt.data_ptr<int64_t>(), N, K, ignore_index, w);
  const std::vector<double> row_scale = incoming_row_scales(g, per_row, N, reduction, D);
  at::Tensor rows = at::empty({N}, in.options().dtype(acc_type_of(in.scalar_type())));
  at::Tensor grad = empty_rows(N, K, in.options()).view(in.sizes());
  run_ce_rows(in, tgt, weight, ignore_index, eps, mode, reduction, D, w, rows, &grad, row_scale.data());
  return grad;
}

// In place (the CUDA backward's form; on the CPU the Python layer uses ce_grad): same values.
void ce_grad_cpu_(at::Tensor& grad, const at::Tensor& input, const at::Tensor& target,
                  const std::optional<at::Tensor>& weight, const at::Tensor& grad_output, int64_t ignore_index,
                  double eps, int64_t mode, int64_t reduction) {
  TORCH_CHECK_VALUE(grad.sizes() == input.sizes() && grad.scalar_type() == input.scalar_type(),
                    "labelsmooth_ext::ce_grad_: grad must have the input's shape and dtype");
  grad.copy_(ce_grad_cpu(input, target, weight, grad_output, grad, ignore_index, eps, mode, reduction));
}

// The large-vocabulary options (ops.cpp, ce_forward_ext): 2-d rows, z-loss, softcap, lse.
std::tuple<at::Tensor, at::Tensor, at::Tensor> ce_forward_ext_cpu(
    const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    int64_t ignore_index, double eps, int64_t mode, int64_t reduction, bool compute_grad, double z_loss,
    double softcap) {
  check_ce_args(input, target, weight, eps, mode, reduction);
  check_ext_args("labelsmooth_ext::ce_forward_ext", z_loss, softcap);
  const at::Tensor in = rows_with_unit_class_stride(input);
  const at::Tensor tgt = target.contiguous();
  const int64_t N = tgt.size(0), K = in.size(1);
  const std::vector<double> w = weights_as_double(weight);
  const double D = ce_denominator(tgt.data_ptr<int64_t>(), N, K, ignore_index, w);
  at::Tensor rows = at::empty({N}, in.options().dtype(acc_type_of(in.scalar_type())));
  at::Tensor lse = at::empty({N}, rows.options());
  at::Tensor grad = compute_grad ? empty_rows(N, K, in.options()) : at::empty({0}, in.options());
  run_ce_rows(in, tgt, weight, ignore_index, eps, mode, reduction, D, w, rows, compute_grad ? &grad : nullptr,
              nullptr, z_loss, softcap, &lse);
  return {finish_loss(rows, at::scalar_tensor(D, rows.options()), reduction), grad, lse};
}

// The gradient of ce_forward_ext's loss times grad_output, recomputed from the logits with the
// incoming gradient applied in the accumulation type, into `out` (which may be `input`).
void ce_grad_ext_into(at::Tensor& out, const at::Tensor& input, const at::Tensor& target,
                      const std::optional<at::Tensor>& weight, const at::Tensor& grad_output,
                      int64_t ignore_index, double eps, int64_t mode, int64_t reduction, double z_loss,
                      double softcap) {
  check_ce_args(input, target, weight, eps, mode, reduction);
  check_ext_args("labelsmooth_ext::ce_grad_ext", z_loss, softcap);
  const at::Tensor tgt = target.contiguous();
  const int64_t N = tgt.size(0), K = input.size(1);
  const at::Tensor go = incoming_grad_on_host(grad_output, N, reduction, "labelsmooth_ext::ce_grad_ext");
  const bool per_row = reduction == kNone;
  const double* g = go.data_ptr<double>();
  const std::vector<double> w = weights_as_double(weight);
  const double D = ce_denominator(tgt.data_ptr<int64_t>(), N, K, ignore_index, w);
  const std::vector<double> row_scale = incoming_row_scales(g, per_row, N, reduction, D);
  at::Tensor rows = at::empty({N}, input.options().dtype(acc_type_of(input.scalar_type())));
  run_ce_rows(input, tgt, weight, ignore_index, eps, mode, reduction, D, w, rows, &out, row_scale.data(),
              z_loss, softcap, nullptr);
}

at::Tensor ce_grad_ext_cpu(const at::Tensor& input, const at::Tensor& target,
                           const std::optional<at::Tensor>& weight, const at::Tensor& grad_output,
                           int64_t ignore_index, double eps, int64_t mode, int64_t reduction, double z_loss,
                           double softcap) {
  const at::Tensor in = rows_with_unit_class_stride(input);
  at::Tensor out = empty_rows(in.size(0), in.size(1), in.options());
  ce_grad_ext_into(out, in, target, weight, grad_output, ignore_index, eps, mode, reduction, z_loss, softcap);
  return out;
}

// In place: the gradient overwrites the logits (inplace_backward=True). Each row is read
// completely before its gradient is written, so no second buffer is needed.
void ce_grad_ext_cpu_(at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight,
                      const at::Tensor& grad_output, int64_t ignore_index, double eps, int64_t mode,
                      int64_t reduction, double z_loss, double softcap) {
  check_inplace_target(input);
  ce_grad_ext_into(input, input, target, weight, grad_output, ignore_index, eps, mode, reduction, z_loss,
                   softcap);
}

std::tuple<at::Tensor, at::Tensor> ce_prob_forward_cpu(const at::Tensor& input, const at::Tensor& target,
                                                       const std::optional<at::Tensor>& weight,
                                                       double eps, int64_t mode, int64_t reduction,
                                                       bool compute_grad) {
  check_prob_args(input, target, weight, eps, mode, reduction);
  const at::Tensor in = rows_with_unit_class_stride(input);
  const at::Tensor tg = rows_with_unit_class_stride(target);
  const int64_t N = in.size(0), K = in.size(1);
  const bool weighted = weight.has_value() && weight->defined();
  const auto acc = acc_type_of(in.scalar_type());
  at::Tensor rows = at::empty({N}, in.options().dtype(acc));
  at::Tensor grad = compute_grad ? empty_rows(N, K, in.options()) : at::empty({0}, in.options());
  at::Tensor wc = weighted ? weight->to(acc).contiguous() : at::Tensor();
  if (N > 0 && K > 0) {
    ProbRowsArgs a{};
    a.input = in.data_ptr();
    a.in_row_stride = in.stride(0);
    a.target = tg.data_ptr();
    a.t_row_stride = tg.stride(0);
    a.target_is_acc = tg.scalar_type() != in.scalar_type();
    a.weight = weighted ? wc.data_ptr() : nullptr;
    a.grad = compute_grad ? grad.data_ptr() : nullptr;
    a.loss_rows = rows.data_ptr();
    a.N = N;
    a.K = K;
    a.mode = mode;
    a.eps = eps;
    a.scale = reduction == kMean ? 1.0 / double(N) : 1.0;
    LSE_RUN_BEST(prob_rows_AVX2, prob_rows_DEFAULT, kind_of(in.scalar_type()), a);
  } else if (N > 0) {
    rows.zero_();
  }
  return {finish_loss(rows, at::scalar_tensor(double(N), rows.options()), reduction), grad};
}

// Probability targets with z_loss / softcap / the lse output, or the gradient times per-row
// incoming-gradient factors (row_scale): prob_rows_ext. rows (N,) and lse (N,) in the loss dtype.
void run_prob_rows_ext(const at::Tensor& in, const at::Tensor& tg, const std::optional<at::Tensor>& weight,
                       double eps, int64_t mode, int64_t reduction, at::Tensor& rows, at::Tensor* grad,
                       const double* row_scale, double z_loss, double softcap, at::Tensor* lse) {
  const int64_t N = in.size(0), K = in.size(1);
  if (N == 0) return;
  if (K == 0) {  // empty rows: lse = -inf, cross-entropy 0, z term z_loss * inf
    rows.fill_(z_loss > 0 ? INFINITY : 0.0);
    if (lse) lse->fill_(-INFINITY);
    return;
  }
  const bool weighted = weight.has_value() && weight->defined();
  const at::Tensor wc = weighted ? weight->to(acc_type_of(in.scalar_type())).contiguous() : at::Tensor();
  ProbRowsArgs a{};
  a.input = in.data_ptr();
  a.in_row_stride = in.stride(0);
  a.target = tg.data_ptr();
  a.t_row_stride = tg.stride(0);
  a.target_is_acc = tg.scalar_type() != in.scalar_type();
  a.weight = weighted ? wc.data_ptr() : nullptr;
  a.grad = grad ? grad->data_ptr() : nullptr;
  a.loss_rows = rows.data_ptr();
  a.N = N;
  a.K = K;
  a.mode = mode;
  a.eps = eps;
  a.scale = reduction == kMean ? 1.0 / double(N) : 1.0;
  a.z_loss = z_loss;
  a.softcap = softcap;
  a.lse_rows = lse ? lse->data_ptr() : nullptr;
  a.row_scale = row_scale;
  LSE_RUN_BEST(prob_rows_AVX2, prob_rows_DEFAULT, kind_of(in.scalar_type()), a);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ce_prob_forward_ext_cpu(
    const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight, double eps,
    int64_t mode, int64_t reduction, bool compute_grad, double z_loss, double softcap) {
  check_prob_args(input, target, weight, eps, mode, reduction);
  check_ext_args("labelsmooth_ext::ce_prob_forward_ext", z_loss, softcap);
  const at::Tensor in = rows_with_unit_class_stride(input);
  const at::Tensor tg = rows_with_unit_class_stride(target);
  const int64_t N = in.size(0), K = in.size(1);
  at::Tensor rows = at::empty({N}, in.options().dtype(acc_type_of(in.scalar_type())));
  at::Tensor lse = at::empty({N}, rows.options());
  at::Tensor grad = compute_grad ? empty_rows(N, K, in.options()) : at::empty({0}, in.options());
  run_prob_rows_ext(in, tg, weight, eps, mode, reduction, rows, compute_grad ? &grad : nullptr, nullptr, z_loss,
                    softcap, &lse);
  return {finish_loss(rows, at::scalar_tensor(double(N), rows.options()), reduction), grad, lse};
}

// The gradient of ce_prob_forward_ext's loss times grad_output, recomputed from the logits with
// the incoming gradient applied in the accumulation type, into `out` (which may be `input`).
void ce_prob_grad_ext_into(at::Tensor& out, const at::Tensor& input, const at::Tensor& target,
                           const std::optional<at::Tensor>& weight, const at::Tensor& grad_output, double eps,
                           int64_t mode, int64_t reduction, double z_loss, double softcap) {
  check_prob_args(input, target, weight, eps, mode, reduction);
  check_ext_args("labelsmooth_ext::ce_prob_grad_ext", z_loss, softcap);
  const at::Tensor tg = rows_with_unit_class_stride(target);
  const int64_t N = input.size(0);
  const at::Tensor go = incoming_grad_on_host(grad_output, N, reduction, "labelsmooth_ext::ce_prob_grad_ext");
  const bool per_row = reduction == kNone;
  const std::vector<double> row_scale =
      incoming_row_scales(go.data_ptr<double>(), per_row, N, reduction, double(N));
  at::Tensor rows = at::empty({N}, input.options().dtype(acc_type_of(input.scalar_type())));
  if (input.size(1) == 0) return;
  run_prob_rows_ext(input, tg, weight, eps, mode, reduction, rows, &out, row_scale.data(), z_loss, softcap,
                    nullptr);
}

at::Tensor ce_prob_grad_ext_cpu(const at::Tensor& input, const at::Tensor& target,
                                const std::optional<at::Tensor>& weight, const at::Tensor& grad_output, double eps,
                                int64_t mode, int64_t reduction, double z_loss, double softcap) {
  const at::Tensor in = rows_with_unit_class_stride(input);
  at::Tensor out = empty_rows(in.size(0), in.size(1), in.options());
  ce_prob_grad_ext_into(out, in, target, weight, grad_output, eps, mode, reduction, z_loss, softcap);
  return out;
}

// In place: the gradient overwrites the logits (inplace_backward=True).
void ce_prob_grad_ext_cpu_(at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight,
                           const at::Tensor& grad_output, double eps, int64_t mode, int64_t reduction,
                           double z_loss, double softcap) {
  check_inplace_target(input);
  ce_prob_grad_ext_into(input, input, target, weight, grad_output, eps, mode, reduction, z_loss, softcap);
}

template <typename scalar_t>
void bce_elements(const at::Tensor& x, const at::Tensor& t, const at::Tensor& w, const at::Tensor& pw,
                  double eps, double scale, at::Tensor& rows, at::Tensor& grad) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const scalar_t* tp = t.data_ptr<scalar_t>();
  const scalar_t* wp = w.defined() ? w.data_ptr<scalar_t>() : nullptr;
  const scalar_t* pp = pw.defined() ? pw.data_ptr<scalar_t>() : nullptr;
  const int64_t nw = w.defined() ? w.numel() : 1, np = pw.defined() ? pw.numel() : 1;
  acc_t* lp = rows.data_ptr<acc_t>();
  scalar_t* gp = grad.numel() ? grad.data_ptr<scalar_t>() : nullptr;
  const acc_t a = bce_smoothing_in<acc_t>(eps), sc = acc_t(scale);
  at::parallel_for(0, x.numel(), 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      acc_t loss, g;
      bce_elem<acc_t>(acc_t(xp[i]), acc_t(tp[i]), wp ? acc_t(wp[i % nw]) : acc_t(1),
                      pp ? acc_t(pp[i % np]) : acc_t(1), a, loss, g);
      lp[i] = loss;
      if (gp) gp[i] = scalar_t(g * sc);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> bce_forward_cpu(const at::Tensor& input, const at::Tensor& target,
                                                   const std::optional<at::Tensor>& weight,
                                                   const std::optional<at::Tensor>& pos_weight,
                                                   double eps, int64_t reduction, bool compute_grad) {
  check_bce_args(input, target, weight, pos_weight, eps, reduction);
  const at::Tensor x = input.contiguous(), t = target.contiguous();
  const at::Tensor w = weight.has_value() && weight->defined() ? weight->contiguous() : at::Tensor();
  const at::Tensor pw = pos_weight.has_value() && pos_weight->defined() ? pos_weight->contiguous() : at::Tensor();
  const int64_t n = x.numel();
  at::Tensor rows = at::empty({n}, x.options().dtype(acc_type_of(x.scalar_type())));
  at::Tensor grad = compute_grad ? empty_rows(n, 1, x.options()).view({n}) : at::empty({0}, x.options());
  const double scale = reduction == kMean ? 1.0 / double(n) : 1.0;
  switch (x.scalar_type()) {
    case at::kFloat: bce_elements<float>(x, t, w, pw, eps, scale, rows, grad); break;
    case at::kDouble: bce_elements<double>(x, t, w, pw, eps, scale, rows, grad); break;
    case at::kBFloat16: bce_elements<c10::BFloat16>(x, t, w, pw, eps, scale, rows, grad); break;
    case at::kHalf: bce_elements<c10::Half>(x, t, w, pw, eps, scale, rows, grad); break;
    default: TORCH_INTERNAL_ASSERT(false);
  }
  return {finish_loss(rows, at::scalar_tensor(double(n), rows.options()), reduction), grad};
}

// The incoming gradient is on the host here, so "is it exactly 1" costs nothing.
void ce_scale_cpu_(at::Tensor& grad, const at::Tensor& grad_output, int64_t reduction) {
  if (grad.numel() == 0) return;
  if (reduction == kNone) {
    grad.mul_(per_row_view(grad_output, grad));
    return;
  }
  if (grad_output.item<double>() == 1.0) return;
  grad.mul_(grad_output.reshape({}));
}

// For tests: the block and vector sizes of both CPU builds, and the one the next call uses.
std::string cpu_kernel_constants() {
  auto json = [](const KernelConstants& c) {
    return "{\"store_block\": " + std::to_string(c.store_block) +
           ", \"exp_block\": " + std::to_string(c.exp_block) +
           ", \"stream_min_bytes\": " + std::to_string(c.stream_min_bytes) +
           ", \"lanes\": {\"float32\": " + std::to_string(c.lanes_float) +
           ", \"float64\": " + std::to_string(c.lanes_double) +
           ", \"bfloat16\": " + std::to_string(c.lanes_bfloat16) +
           ", \"float16\": " + std::to_string(c.lanes_half) + "}}";
  };
  std::string out = "{\"active\": \"";
  out += use_avx2() ? "AVX2" : "DEFAULT";
  out += "\", \"DEFAULT\": " + json(constants_DEFAULT());
#ifdef LSE_HAVE_AVX2_KERNELS
  out += ", \"AVX2\": " + json(constants_AVX2());
#endif
  return out + "}";
}

// For tests: a kernel's elementwise function (fn: 0, the plain row kernels' exp, exp_row; 1, the
// spatial kernel's log of row sums, log_ge1) of every element of a float32 tensor, by the build
// the next kernel call uses (LABELSMOOTH_EXT_CPU_CAPABILITY picks it).
at::Tensor cpu_row_elementwise(const at::Tensor& x, int64_t fn, const char* name) {
  TORCH_CHECK_VALUE(x.scalar_type() == at::kFloat && x.device().is_cpu(), "labelsmooth_ext::", name,
                    ": x must be a float32 CPU tensor, got ", x.scalar_type(), " on ", x.device());
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty(xc.sizes(), xc.options());
  auto f = fn == 0 ? exp_row_DEFAULT : log_row_DEFAULT;
#ifdef LSE_HAVE_AVX2_KERNELS
  if (use_avx2()) f = fn == 0 ? exp_row_AVX2 : log_row_AVX2;
#endif
  f(xc.const_data_ptr<float>(), y.data_ptr<float>(), xc.numel());
  return y;
}
at::Tensor cpu_row_exp(const at::Tensor& x) { return cpu_row_elementwise(x, 0, "cpu_row_exp"); }
at::Tensor cpu_row_log(const at::Tensor& x) { return cpu_row_elementwise(x, 1, "cpu_row_log"); }

// The fused linear + cross-entropy's chunk step (labelsmooth_ext/linear.py): per-row losses
// (ignored rows 0, z_loss and softcap as in ce_forward_ext) returned, and each row's gradient
// times its factor (row_scale[r] when given, else grad_scale) written over the logits, so one
// chunk buffer holds the logits and then their gradient. Each row is read completely before
// its gradient is written (see ce_grad_ext_cpu_).
at::Tensor ce_forward_grad_cpu_(at::Tensor& input, const at::Tensor& target,
                                const std::optional<at::Tensor>& weight, int64_t ignore_index, double eps,
                                int64_t mode, double z_loss, double softcap, double grad_scale,
                                const std::optional<at::Tensor>& row_scale) {
  const char* fn = "labelsmooth_ext::ce_forward_grad_";
  check_ce_args(input, target, weight, eps, mode, kSum);
  check_ext_args(fn, z_loss, softcap);
  TORCH_CHECK_VALUE(input.dim() == 2 && input.is_contiguous(), fn,
                    ": writes the gradient over the logits, which must be contiguous (N, C) rows; got shape ",
                    input.sizes(), " and strides ", input.strides());
  TORCH_CHECK_VALUE(std::isfinite(grad_scale), fn, ": grad_scale must be finite, got ", grad_scale);
  const at::Tensor tgt = target.contiguous();
  const int64_t N = tgt.size(0), K = input.size(1);
  std::vector<double> scales;
  if (row_scale.has_value() && row_scale->defined()) {
    TORCH_CHECK_VALUE(row_scale->dim() == 1 && row_scale->size(0) == N && row_scale->is_floating_point(), fn,
                      ": row_scale must be a 1-d floating tensor with one factor per row (", N, "), got shape ",
                      row_scale->sizes(), " and dtype ", row_scale->scalar_type());
    const at::Tensor rs = row_scale->to(at::kDouble).contiguous();
    scales.assign(rs.data_ptr<double>(), rs.data_ptr<double>() + N);
  } else {
    scales.assign(N, grad_scale);
  }
  const std::vector<double> w = weights_as_double(weight);
  ce_denominator(tgt.data_ptr<int64_t>(), N, K, ignore_index, w);  // checks the targets
  at::Tensor rows = at::empty({N}, input.options().dtype(acc_type_of(input.scalar_type())));
  run_ce_rows(input, tgt, weight, ignore_index, eps, mode, kSum, 1.0, w, rows, &input, scales.data(), z_loss,
              softcap, nullptr);
  return rows;
}

}  // namespace

// The gradient buffer of the row kernels (huge pages, one-block cache), for vp_cpu.cpp.
at::Tensor grad_rows_buffer(int64_t N, int64_t K, const at::TensorOptions& opts) { return empty_rows(N, K, opts); }

TORCH_LIBRARY_FRAGMENT(labelsmooth_ext, m) {
  m.def("cpu_kernel_constants() -> str", &cpu_kernel_constants);
  m.def("cpu_row_exp(Tensor x) -> Tensor", &cpu_row_exp);
  m.def("cpu_row_log(Tensor x) -> Tensor", &cpu_row_log);
}

TORCH_LIBRARY_IMPL(labelsmooth_ext, CPU, m) {
  m.impl("ce_forward", &ce_forward_cpu);
  m.impl("ce_prob_forward", &ce_prob_forward_cpu);
  m.impl("ce_grad", &ce_grad_cpu);
  m.impl("ce_grad_", &ce_grad_cpu_);
  m.impl("ce_scale_", &ce_scale_cpu_);
  m.impl("bce_forward", &bce_forward_cpu);
  m.impl("ce_forward_ext", &ce_forward_ext_cpu);
  m.impl("ce_grad_ext", &ce_grad_ext_cpu);
  m.impl("ce_grad_ext_", &ce_grad_ext_cpu_);
  m.impl("ce_prob_forward_ext", &ce_prob_forward_ext_cpu);
  m.impl("ce_prob_grad_ext", &ce_prob_grad_ext_cpu);
  m.impl("ce_prob_grad_ext_", &ce_prob_grad_ext_cpu_);
}

}  // namespace cpu
}  // namespace labelsmooth_ext

namespace labelsmooth_ext {
namespace cpu {
// linear.py's chunk step (CPU only: other devices take ce_forward_ext and a separate buffer).
TORCH_LIBRARY_FRAGMENT(labelsmooth_ext, m) {
  m.def(
      "ce_forward_grad_(Tensor(a!) input, Tensor target, Tensor? weight, int ignore_index, "
      "float label_smoothing, int smoothing_mode, float z_loss, float softcap, float grad_scale, "
      "Tensor? row_scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(labelsmooth_ext, CPU, m) {
  m.impl("ce_forward_grad_", &ce_forward_grad_cpu_);
}
}  // namespace cpu
}  // namespace labelsmooth_ext
