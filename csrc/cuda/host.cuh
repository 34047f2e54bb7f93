// The CUDA operators at the tensor level: argument checks, device-side denominators, outputs,
// and the kernel launch through dispatch.cuh. Shared by the nvcc build (loss_cuda.cu registers
// them for the CUDA dispatch key) and the SIMT emulation (CPU tensors, tests only).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include "../ops.h"
#include "../row_math.h"
#include "dispatch.cuh"
#include "prob_kernels.cuh"
#include "platform.cuh"

namespace labelsmooth_ext {
namespace cuda {

// Runs the class-index kernel over 2-d rows: per-row losses into `rows`, the gradient into
// `grad` (undefined: none). Backward (ce_grad): `go` (acc dtype, 1 or N values) multiplies the
// gradient before its rounding, and rows that can reuse `saved` (may alias grad) do so.
// Returns the mean denominator (0-dim, on the device: never copied to the host).
inline at::Tensor run_ce_kernel(const at::Tensor& in, const at::Tensor& tgt, const std::optional<at::Tensor>& weight,
                                int64_t ignore_index, double eps, int64_t mode, int64_t reduction,
                                at::Tensor& rows, const at::Tensor& grad, const at::Tensor& go,
                                const at::Tensor& saved, double z_loss = 0.0, double softcap = 0.0,
                                const at::Tensor& lse = at::Tensor()) {
  const int64_t N = in.size(0), K = in.size(1);
  const auto acc = acc_type_of(in.scalar_type());
  const bool weighted = weight.has_value() && weight->defined();
  // the kernel reads the weights in the accumulation type (exact for 16-bit weights)
  const at::Tensor w = weighted ? weight->to(acc).contiguous() : at::Tensor();
  const at::Tensor valid = tgt.ne(ignore_index);
  at::Tensor denom;
  if (weighted) {
    denom = w.index_select(0, tgt.clamp(0, std::max<int64_t>(K - 1, 0))).mul(valid).sum();
  } else {
    denom = valid.sum(acc);
  }
  const at::Tensor inv_denom = reduction == kMean ? denom.reciprocal() : at::Tensor();
  const at::Tensor wsum = weighted ? w.sum() : at::Tensor();
  // Few large rows: split over several blocks (not in place, where a chunk's gradient would
  // overwrite logits another block still reads; not when reusing a saved gradient).
  const bool can_split = !saved.defined() && !(grad.defined() && grad.data_ptr() == in.data_ptr());
  const int splits = (can_split && N > 0) ? split_count(N, K * int64_t(in.element_size()), sm_count(in.get_device())) : 1;
  const at::Tensor partial = splits > 1 ? at::empty({N * splits * 4}, in.options().dtype(acc)) : at::Tensor();
  if (N > 0) {
    const stream_t stream = current_stream();
    dispatch_dtype(in.scalar_type(), [&](auto tag) {
      using scalar_t = decltype(tag);
      using acc_t = acc_of<scalar_t>;
      CeParams<scalar_t> p{};
      p.in = static_cast<const scalar_t*>(in.data_ptr());
      p.in_row_stride = in.stride(0);
      p.target = tgt.data_ptr<int64_t>();
      p.weight = weighted ? static_cast<const acc_t*>(w.data_ptr()) : nullptr;
      p.weight_sum = weighted ? static_cast<const acc_t*>(wsum.data_ptr()) : nullptr;
      p.inv_denom = reduction == kMean ? static_cast<const acc_t*>(inv_denom.data_ptr()) : nullptr;
      p.grad = grad.defined() ? static_cast<scalar_t*>(grad.data_ptr()) : nullptr;
      p.loss_rows = static_cast<acc_t*>(rows.data_ptr());
      p.N = N;
      p.K = K;
      p.ignore_index = ignore_index;
      p.sm = smoothing_coefs<acc_t>(eps, K, mode);
      p.go = go.defined() ? static_cast<const acc_t*>(go.data_ptr()) : nullptr;
      p.go_per_row = go.defined() && reduction == kNone;
      p.saved = saved.defined() ? static_cast<const scalar_t*>(saved.data_ptr()) : nullptr;
      p.softcap = acc_t(softcap);
      p.z_loss = acc_t(z_loss);
      p.lse_rows = lse.defined() ? static_cast<acc_t*>(lse.data_ptr()) : nullptr;
      if (splits > 1) {
        launch_split<scalar_t>(p, splits, static_cast<RowState<acc_t>*>(partial.data_ptr()), stream);
      } else {
        dispatch_forward<scalar_t>(p, stream);
      }
    });
  }
  return denom;
}

// The gradient of `in` (N x K, contiguous), placed at the input's address modulo 16 bytes: when
// the input rows are contiguous with an offset (x.view(-1, K)[1:]), each gradient row then has
// its input row's alignment and the kernel's 16-byte stores stay whole (issue 10 item 6).
inline at::Tensor grad_aligned_like(const at::Tensor& in, int64_t N, int64_t K) {
  const int64_t es = in.element_size();
  const int64_t off = int64_t(reinterpret_cast<uintptr_t>(in.data_ptr()) % 16) / es;
  if (off == 0 || N * K == 0 || (N > 1 && in.stride(0) != K)) return at::empty({N, K}, in.options());
  // set_ on the padded buffer's storage: a plain tensor with a storage offset, not a view
  const at::Tensor buf = at::empty({N * K + 16 / es}, in.options());
  return at::empty({0}, in.options()).set_(buf.storage(), off, {N, K}, {K, 1});
}

inline std::tuple<at::Tensor, at::Tensor> ce_forward_cuda(const at::Tensor& input, const at::Tensor& target,
                                                   const std::optional<at::Tensor>& weight,
                                                   int64_t ignore_index, double eps, int64_t mode,
                                                   int64_t reduction, bool compute_grad) {
  check_ce_args(input, target, weight, eps, mode, reduction);
  const DeviceGuard guard(input.device());
  const at::Tensor in = rows_with_unit_class_stride(input);
  const at::Tensor tgt = target.contiguous();
  const int64_t N = in.size(0), K = in.size(1);
  at::Tensor rows = at::empty({N}, in.options().dtype(acc_type_of(in.scalar_type())));
  at::Tensor grad = compute_grad ? grad_aligned_like(in, N, K) : at::empty({0}, in.options());
  const at::Tensor denom = run_ce_kernel(in, tgt, weight, ignore_index, eps, mode, reduction, rows,
                                         compute_grad ? grad : at::Tensor(), at::Tensor(), at::Tensor());
  return {finish_loss(rows, denom, reduction), grad};
}

// The incoming gradient in the accumulation type, checked against the rows.
inline at::Tensor incoming_gradient(const at::Tensor& grad_output, at::ScalarType dt, int64_t N,
                                    int64_t reduction) {
  const at::Tensor go = grad_output.to(acc_type_of(dt)).contiguous();
  const int64_t want = reduction == kNone ? N : 1;
  TORCH_CHECK_VALUE(go.numel() == want, "labelsmooth_ext::ce_grad: grad_output has ", go.numel(),
                    " elements, expected ", want);
  return go;
}

// ce_grad (ops.cpp): out of place; every decision (reuse the saved gradient or recompute a
// row) is taken per row on the device.
inline at::Tensor ce_grad_cuda(const at::Tensor& input, const at::Tensor& target,
                               const std::optional<at::Tensor>& weight, const at::Tensor& grad_output,
                               const std::optional<at::Tensor>& saved, int64_t ignore_index, double eps,
                               int64_t mode, int64_t reduction) {
  check_ce_args(input, target, weight, eps, mode, reduction);
  const DeviceGuard guard(input.device());
  const at::Tensor in = rows_with_unit_class_stride(input);
  const at::Tensor tgt = target.contiguous();
  const int64_t N = in.size(0), K = in.size(1);
  const at::Tensor go = incoming_gradient(grad_output, in.scalar_type(), N, reduction);
  at::Tensor s;
  if (saved.has_value() && saved->defined() && saved->numel() > 0) {
    TORCH_CHECK_VALUE(saved->sizes() == input.sizes() && saved->scalar_type() == input.scalar_type(),
                      "labelsmooth_ext::ce_grad: the saved grad must have the input's shape and dtype");
    s = saved->contiguous();
  }
  at::Tensor rows = at::empty({N}, in.options().dtype(acc_type_of(in.scalar_type())));
  at::Tensor grad = grad_aligned_like(in, N, K);
  run_ce_kernel(in, tgt, weight, ignore_index, eps, mode, reduction, rows, grad, go, s);
  return grad;
}

// In place on the saved gradient: rows whose incoming gradient is 1 are not touched at all,
// exactly scalable rows are scaled, the others recomputed from the logits.
inline void ce_grad_cuda_(at::Tensor& grad, const at::Tensor& input, const at::Tensor& target,
                          const std::optional<at::Tensor>& weight, const at::Tensor& grad_output,
                          int64_t ignore_index, double eps, int64_t mode, int64_t reduction) {
  check_ce_args(input, target, weight, eps, mode, reduction);
  TORCH_CHECK_VALUE(grad.sizes() == input.sizes() && grad.scalar_type() == input.scalar_type() &&
                        grad.is_contiguous(),
                    "labelsmooth_ext::ce_grad_: grad must be contiguous, with the input's shape and dtype");
  const DeviceGuard guard(input.device());
  const at::Tensor in = rows_with_unit_class_stride(input);
  const at::Tensor tgt = target.contiguous();
  const int64_t N = in.size(0);
  const at::Tensor go = incoming_gradient(grad_output, in.scalar_type(), N, reduction);
  at::Tensor rows = at::empty({N}, in.options().dtype(acc_type_of(in.scalar_type())));
  run_ce_kernel(in, tgt, weight, ignore_index, eps, mode, reduction, rows, grad, go, grad);
}

// The large-vocabulary options (ops.cpp, ce_forward_ext): the same kernel with softcap, z-loss
// and the per-row lse output.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> ce_forward_ext_cuda(
    const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    int64_t ignore_index, double eps, int64_t mode, int64_t reduction, bool compute_grad, double z_loss,
    double softcap) {
  check_ce_args(input, target, weight, eps, mode, reduction);
  check_ext_args("labelsmooth_ext::ce_forward_ext", z_loss, softcap);
  const DeviceGuard guard(input.device());
  const at::Tensor in = rows_with_unit_class_stride(input);
  const at::Tensor tgt = target.contiguous();
  const int64_t N = in.size(0), K = in.size(1);
  at::Tensor rows = at::empty({N}, in.options().dtype(acc_type_of(in.scalar_type())));
  at::Tensor lse = at::empty({N}, rows.options());
  at::Tensor grad = compute_grad ? grad_aligned_like(in, N, K) : at::empty({0}, in.options());
  const at::Tensor denom = run_ce_kernel(in, tgt, weight, ignore_index, eps, mode, reduction, rows,
                                         compute_grad ? grad : at::Tensor(), at::Tensor(), at::Tensor(),
                                         z_loss, softcap, lse);
  return {finish_loss(rows, denom, reduction), grad, lse};
}

// Its gradient times grad_output, recomputed from the logits (out of place).
inline at::Tensor ce_grad_ext_cuda(const at::Tensor& input, const at::Tensor& target,
                                   const std::optional<at::Tensor>& weight, const at::Tensor& grad_output,
                                   int64_t ignore_index, double eps, int64_t mode, int64_t reduction,
                                   double z_loss, double softcap) {
  check_ce_args(input, target, weight, eps, mode, reduction);
  check_ext_args("labelsmooth_ext::ce_grad_ext", z_loss, softcap);
  const DeviceGuard guard(input.device());
  const at::Tensor in = rows_with_unit_class_stride(input);
  const at::Tensor tgt = target.contiguous();
  const int64_t N = in.size(0), K = in.size(1);
  const at::Tensor go = incoming_gradient(grad_output, in.scalar_type(), N, reduction);
  at::Tensor rows = at::empty({N}, in.options().dtype(acc_type_of(in.scalar_type())));
  at::Tensor grad = grad_aligned_like(in, N, K);
  run_ce_kernel(in, tgt, weight, ignore_index, eps, mode, reduction, rows, grad, go, at::Tensor(), z_loss,
                softcap);
  return grad;
}

// The same gradient written over the logits (inplace_backward=True).
inline void ce_grad_ext_cuda_(at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight,
                              const at::Tensor& grad_output, int64_t ignore_index, double eps, int64_t mode,
                              int64_t reduction, double z_loss, double softcap) {
  check_ce_args(input, target, weight, eps, mode, reduction);
  check_ext_args("labelsmooth_ext::ce_grad_ext_", z_loss, softcap);
  check_inplace_target(input);
  const DeviceGuard guard(input.device());
  const at::Tensor tgt = target.contiguous();
  const int64_t N = input.size(0);
  const at::Tensor go = incoming_gradient(grad_output, input.scalar_type(), N, reduction);
  at::Tensor rows = at::empty({N}, input.options().dtype(acc_type_of(input.scalar_type())));
  run_ce_kernel(input, tgt, weight, ignore_index, eps, mode, reduction, rows, input, go, at::Tensor(), z_loss,
                softcap);
}

// Probability targets: one fused kernel (prob_kernels.cuh: logits and targets read once for the
// loss, once more for the gradient; no N x K temporaries, N floats of extra memory) for every
// option: weights, both modes, every reduction, float32 targets of 16-bit inputs, the incoming
// gradient (backward), in place over the logits, softcap, z_loss, lse. `grad` undefined: no
// gradient; `go` undefined: the forward's own gradient; `lse` undefined: not wanted.
inline void run_prob_kernel(const at::Tensor& in, const at::Tensor& target, const std::optional<at::Tensor>& weight,
                            double eps, int64_t mode, int64_t reduction, at::Tensor& rows, const at::Tensor& grad,
                            const at::Tensor& go, double z_loss, double softcap, const at::Tensor& lse) {
  const int64_t N = in.size(0), K = in.size(1);
  if (N == 0) return;
  if (K == 0) {  // an empty row: loss 0, lse of nothing -inf (never reached: check_common wants C >= 1)
    rows.zero_();
    if (lse.defined()) lse.fill_(-INFINITY);
    return;
  }
  const at::Tensor tg = rows_with_unit_class_stride(target);
  const auto acc = acc_type_of(in.scalar_type());
  const bool weighted = weight.has_value() && weight->defined();
  const at::Tensor w = weighted ? weight->to(acc).contiguous() : at::Tensor();
  const stream_t stream = current_stream();
  const bool float_target = tg.scalar_type() != in.scalar_type();  // float32 for a 16-bit input
  dispatch_dtype(in.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = acc_of<scalar_t>;
    auto run = [&](auto ttag) {
      using tgt_t = decltype(ttag);
      CeProbParams<scalar_t, tgt_t> p{};
      p.in = static_cast<const scalar_t*>(in.data_ptr());
      p.in_row_stride = in.stride(0);
      p.target = static_cast<const tgt_t*>(tg.data_ptr());
      p.t_row_stride = tg.stride(0);
      p.weight = weighted ? static_cast<const acc_t*>(w.data_ptr()) : nullptr;
      p.grad = grad.defined() ? static_cast<scalar_t*>(grad.data_ptr()) : nullptr;
      p.loss_rows = static_cast<acc_t*>(rows.data_ptr());
      p.lse_rows = lse.defined() ? static_cast<acc_t*>(lse.data_ptr()) : nullptr;
      p.N = N;
      p.K = K;
      p.sm = smoothing_coefs<acc_t>(eps, K, mode);
      p.scale = reduction == kMean ? acc_t(1.0 / double(N)) : acc_t(1);
      p.go = go.defined() ? static_cast<const acc_t*>(go.data_ptr()) : nullptr;
      p.go_per_row = go.defined() && reduction == kNone;
      p.softcap = acc_t(softcap);
      p.inv_softcap = softcap > 0 ? acc_t(1) / acc_t(softcap) : acc_t(0);
      p.z_loss = acc_t(z_loss);
      dispatch_prob<scalar_t, tgt_t>(p, stream);
    };
    if constexpr (std::is_same_v<scalar_t, c10::Half> || std::is_same_v<scalar_t, c10::BFloat16>) {
      if (float_target) return run(float{});
    }
    run(scalar_t{});
  });
}

inline std::tuple<at::Tensor, at::Tensor> ce_prob_forward_cuda(const at::Tensor& input, const at::Tensor& target,
                                                        const std::optional<at::Tensor>& weight,
                                                        double eps, int64_t mode, int64_t reduction,
                                                        bool compute_grad) {
  check_prob_args(input, target, weight, eps, mode, reduction);
  const DeviceGuard guard(input.device());
  const at::Tensor in = rows_with_unit_class_stride(input);
  const int64_t N = in.size(0), K = in.size(1);
  at::Tensor rows = at::empty({N}, in.options().dtype(acc_type_of(in.scalar_type())));
  at::Tensor grad = compute_grad ? grad_aligned_like(in, N, K) : at::empty({0}, in.options());
  run_prob_kernel(in, target, weight, eps, mode, reduction, rows, compute_grad ? grad : at::Tensor(), at::Tensor(),
                  0.0, 0.0, at::Tensor());
  const at::Tensor denom = at::empty({}, rows.options()).fill_(double(N));
  return {finish_loss(rows, denom, reduction), grad};
}

// With z_loss / softcap / lse (ce_prob_forward_ext) and their gradient, recomputed (times the
// incoming gradient) out of place or over the logits: the same kernel.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> ce_prob_forward_ext_cuda(
    const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight, double eps,
    int64_t mode, int64_t reduction, bool compute_grad, double z_loss, double softcap) {
  check_prob_args(input, target, weight, eps, mode, reduction);
  check_ext_args("labelsmooth_ext::ce_prob_forward_ext", z_loss, softcap);
  const DeviceGuard guard(input.device());
  const at::Tensor in = rows_with_unit_class_stride(input);
  const int64_t N = in.size(0), K = in.size(1);
  at::Tensor rows = at::empty({N}, in.options().dtype(acc_type_of(in.scalar_type())));
  at::Tensor lse = at::empty({N}, rows.options());
  at::Tensor grad = compute_grad ? grad_aligned_like(in, N, K) : at::empty({0}, in.options());
  run_prob_kernel(in, target, weight, eps, mode, reduction, rows, compute_grad ? grad : at::Tensor(), at::Tensor(),
                  z_loss, softcap, lse);
  const at::Tensor denom = at::empty({}, rows.options()).fill_(double(N));
  return {finish_loss(rows, denom, reduction), grad, lse};
}

inline at::Tensor ce_prob_grad_ext_cuda(const at::Tensor& input, const at::Tensor& target,
                                        const std::optional<at::Tensor>& weight, const at::Tensor& grad_output,
                                        double eps, int64_t mode, int64_t reduction, double z_loss,
                                        double softcap) {
  check_prob_args(input, target, weight, eps, mode, reduction);
  check_ext_args("labelsmooth_ext::ce_prob_grad_ext", z_loss, softcap);
  const DeviceGuard guard(input.device());
  const at::Tensor in = rows_with_unit_class_stride(input);
  const int64_t N = in.size(0), K = in.size(1);
  const at::Tensor go = incoming_gradient(grad_output, in.scalar_type(), N, reduction);
  at::Tensor rows = at::empty({N}, in.options().dtype(acc_type_of(in.scalar_type())));
  at::Tensor grad = grad_aligned_like(in, N, K);
  run_prob_kernel(in, target, weight, eps, mode, reduction, rows, grad, go, z_loss, softcap, at::Tensor());
  return grad;
}

inline void ce_prob_grad_ext_cuda_(at::Tensor& input, const at::Tensor& target,
                                   const std::optional<at::Tensor>& weight, const at::Tensor& grad_output,
                                   double eps, int64_t mode, int64_t reduction, double z_loss, double softcap) {
  check_prob_args(input, target, weight, eps, mode, reduction);
  check_ext_args("labelsmooth_ext::ce_prob_grad_ext_", z_loss, softcap);
  check_inplace_target(input);
  const DeviceGuard guard(input.device());
  const int64_t N = input.size(0);
  const at::Tensor go = incoming_gradient(grad_output, input.scalar_type(), N, reduction);
  at::Tensor rows = at::empty({N}, input.options().dtype(acc_type_of(input.scalar_type())));
  // the gradient over the logits: each element read by the thread that writes it (prob_kernels.cuh)
  run_prob_kernel(input, target, weight, eps, mode, reduction, rows, input, go, z_loss, softcap, at::Tensor());
}

inline std::tuple<at::Tensor, at::Tensor> bce_forward_cuda(const at::Tensor& input, const at::Tensor& target,
                                                    const std::optional<at::Tensor>& weight,
                                                    const std::optional<at::Tensor>& pos_weight,
                                                    double eps, int64_t reduction, bool compute_grad) {
  check_bce_args(input, target, weight, pos_weight, eps, reduction);
  const DeviceGuard guard(input.device());
  const at::Tensor x = input.contiguous(), t = target.contiguous();
  const bool has_w = weight.has_value() && weight->defined();
  const bool has_p = pos_weight.has_value() && pos_weight->defined();
  const at::Tensor w = has_w ? weight->contiguous() : at::Tensor();
  const at::Tensor pw = has_p ? pos_weight->contiguous() : at::Tensor();
  const int64_t n = x.numel();
  const auto acc = acc_type_of(x.scalar_type());
  at::Tensor rows = at::empty({n}, x.options().dtype(acc));
  at::Tensor grad = at::empty({compute_grad ? n : 0}, x.options());
  const at::Tensor denom = at::empty({}, rows.options()).fill_(double(n));
  const at::Tensor inv_n = denom.reciprocal();
  if (n > 0) {
    const int sms = sm_count(x.get_device());
    const stream_t stream = current_stream();
    dispatch_dtype(x.scalar_type(), [&](auto tag) {
      using scalar_t = decltype(tag);
      using acc_t = acc_of<scalar_t>;
      launch_bce<scalar_t>(
          static_cast<const scalar_t*>(x.data_ptr()), static_cast<const scalar_t*>(t.data_ptr()),
          has_w ? static_cast<const scalar_t*>(w.data_ptr()) : nullptr, has_w ? w.numel() : 1,
          has_p ? static_cast<const scalar_t*>(pw.data_ptr()) : nullptr, has_p ? pw.numel() : 1, bce_smoothing_in<acc_t>(eps),
          reduction == kMean ? static_cast<const acc_t*>(inv_n.data_ptr()) : nullptr,
          static_cast<acc_t*>(rows.data_ptr()), compute_grad ? static_cast<scalar_t*>(grad.data_ptr()) : nullptr, n,
          sms, stream);
    });
  }
  return {finish_loss(rows, denom, reduction), grad};
}

inline void ce_scale_cuda_(at::Tensor& grad, const at::Tensor& grad_output, int64_t reduction) {
  if (grad.numel() == 0) return;
  TORCH_CHECK(grad.is_contiguous() && grad.dim() >= 1, "labelsmooth_ext::ce_scale_: grad must be contiguous");
  const DeviceGuard guard(grad.device());
  // compared with 1 and multiplied in the accumulation type, so nothing rounds before the test
  const at::Tensor go = grad_output.to(acc_type_of(grad.scalar_type())).contiguous();
  const bool per_row = reduction == kNone;
  TORCH_CHECK(go.numel() == (per_row ? grad.size(0) : 1), "labelsmooth_ext::ce_scale_: grad_output has ",
              go.numel(), " elements, expected ", per_row ? grad.size(0) : 1);
  const stream_t stream = current_stream();
  const int sms = sm_count(grad.get_device());
  dispatch_dtype(grad.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    launch_scale<scalar_t>(static_cast<scalar_t*>(grad.data_ptr()),
                           static_cast<const acc_of<scalar_t>*>(go.data_ptr()), grad.size(0),
                           grad.numel() / grad.size(0), per_row, sms, stream);
  });
}

}  // namespace cuda
}  // namespace labelsmooth_ext
