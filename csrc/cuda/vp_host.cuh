// The vocabulary-parallel CUDA operators at the tensor level (ops.cpp: vocab_parallel_stats,
// vocab_parallel_grad; issue 14). Shared by the nvcc build (loss_cuda.cu) and the SIMT emulation.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include "../ops.h"
#include "dispatch.cuh"
#include "platform.cuh"
#include "vp_kernels.cuh"

namespace labelsmooth_ext {
namespace cuda {

inline at::Tensor vp_weight_in_acc(const std::optional<at::Tensor>& weight, at::ScalarType dt) {
  if (!weight.has_value() || !weight->defined()) return at::Tensor();
  return weight->to(acc_type_of(dt)).contiguous();
}

template <typename scalar_t>
VpParams<scalar_t> vp_params(const at::Tensor& in, const at::Tensor& tgt, const at::Tensor& w,
                             const at::Tensor& wsum, int64_t class_start, int64_t ignore_index,
                             double softcap) {
  using acc_t = acc_of<scalar_t>;
  VpParams<scalar_t> p{};
  p.in = static_cast<const scalar_t*>(in.data_ptr());
  p.in_row_stride = in.stride(0);
  p.target = tgt.data_ptr<int64_t>();
  p.weight = w.defined() ? static_cast<const acc_t*>(w.data_ptr()) : nullptr;
  p.weight_sum = wsum.defined() ? static_cast<const acc_t*>(wsum.data_ptr()) : nullptr;
  p.N = in.size(0);
  p.K = in.size(1);
  p.start = class_start;
  p.ignore_index = ignore_index;
  p.softcap = acc_t(softcap);
  p.inv_softcap = softcap > 0.0 ? acc_t(1.0 / softcap) : acc_t(0);
  return p;
}

inline at::Tensor vocab_parallel_stats_cuda(const at::Tensor& input, const at::Tensor& target,
                                            const std::optional<at::Tensor>& weight, int64_t class_start,
                                            int64_t ignore_index, double softcap) {
  check_vp_args("labelsmooth_ext::vocab_parallel_stats", input, target, weight, softcap);
  const DeviceGuard guard(input.device());
  const at::Tensor in = rows_with_unit_class_stride(input);
  const at::Tensor tgt = target.contiguous();
  const at::Tensor w = vp_weight_in_acc(weight, in.scalar_type());
  const at::Tensor wsum = w.defined() ? w.sum() : at::Tensor();
  const int64_t N = in.size(0);
  at::Tensor stats = at::empty({5, N}, in.options().dtype(acc_type_of(in.scalar_type())));
  if (N == 0) return stats;
  const stream_t stream = current_stream();
  dispatch_dtype(in.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    VpParams<scalar_t> p = vp_params<scalar_t>(in, tgt, w, wsum, class_start, ignore_index, softcap);
    p.stats = static_cast<acc_of<scalar_t>*>(stats.data_ptr());
    dispatch_vp<scalar_t>(p, /*grad=*/false, stream);
  });
  return stats;
}

inline at::Tensor vocab_parallel_grad_cuda(const at::Tensor& input, const at::Tensor& target,
                                           const std::optional<at::Tensor>& weight, const at::Tensor& coefs,
                                           int64_t class_start, int64_t ignore_index, double softcap) {
  const char* fn = "labelsmooth_ext::vocab_parallel_grad";
  check_vp_args(fn, input, target, weight, softcap);
  check_vp_coefs(fn, input, coefs);
  const DeviceGuard guard(input.device());
  const at::Tensor in = rows_with_unit_class_stride(input);
  const at::Tensor tgt = target.contiguous();
  const at::Tensor w = vp_weight_in_acc(weight, in.scalar_type());
  const at::Tensor co = coefs.contiguous();
  const int64_t N = in.size(0), K = in.size(1);
  at::Tensor grad = at::empty({N, K}, in.options());
  if (N == 0 || K == 0) return grad;
  const stream_t stream = current_stream();
  dispatch_dtype(in.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    VpParams<scalar_t> p = vp_params<scalar_t>(in, tgt, w, at::Tensor(), class_start, ignore_index, softcap);
    p.coefs = static_cast<const acc_of<scalar_t>*>(co.data_ptr());
    p.grad = static_cast<scalar_t*>(grad.data_ptr());
    dispatch_vp<scalar_t>(p, /*grad=*/true, stream);
  });
  return grad;
}

}  // namespace cuda
}  // namespace labelsmooth_ext
