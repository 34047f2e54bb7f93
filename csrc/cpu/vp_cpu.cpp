// CPU implementations of the vocabulary-parallel operators (ops.cpp: vocab_parallel_stats,
// vocab_parallel_grad; issue 14), dispatched to the row kernels of the best CPU capability
// (vp_kernels.h).
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>

#include "../ops.h"
#include "vp_kernel_args.h"

namespace labelsmooth_ext {
namespace cpu {

// loss_cpu.cpp: fresh 4 KiB pages of a gradient as large as the logits cost more in page faults
// than the kernel; this takes 2 MiB-aligned huge pages and reuses the last freed block.
at::Tensor grad_rows_buffer(int64_t N, int64_t K, const at::TensorOptions& opts);
// loss_cpu.cpp: the kernel build for a dtype, and whether the AVX2 build runs (the CPU has it and
// LABELSMOOTH_EXT_CPU_CAPABILITY does not ask for the baseline).
ScalarKind kind_of(at::ScalarType t);
bool use_avx2();

namespace {

// The fields VpStatsArgs and VpGradArgs share.
template <typename Args>
void fill_vp_common(Args& a, const at::Tensor& in, const at::Tensor& tgt, const at::Tensor& w,
                    int64_t class_start, int64_t ignore_index, double softcap) {
  a.input = in.data_ptr();
  a.in_row_stride = in.stride(0);
  a.target = tgt.data_ptr<int64_t>();
  a.weight = w.defined() ? w.data_ptr() : nullptr;
  a.N = in.size(0);
  a.K = in.size(1);
  a.start = class_start;
  a.ignore_index = ignore_index;
  a.softcap = softcap;
}

// Runs the AVX2 build of a kernel where use_avx2(), else the baseline build.
#ifdef LSE_HAVE_AVX2_KERNELS
#define LSE_VP_AVX2(fn) (&fn)
#else
#define LSE_VP_AVX2(fn) nullptr
#endif
template <typename Args>
void run_vp_best(void (*avx2_fn)(ScalarKind, const Args&), void (*default_fn)(ScalarKind, const Args&),
                 ScalarKind k, const Args& a) {
  if (avx2_fn != nullptr && use_avx2()) return avx2_fn(k, a);
  default_fn(k, a);
}

at::Tensor weight_in_acc(const std::optional<at::Tensor>& weight, at::ScalarType input_dtype) {
  if (!weight.has_value() || !weight->defined()) return at::Tensor();
  return weight->to(acc_type_of(input_dtype)).contiguous();
}

at::Tensor vocab_parallel_stats_cpu(const at::Tensor& input, const at::Tensor& target,
                                    const std::optional<at::Tensor>& weight, int64_t class_start,
                                    int64_t ignore_index, double softcap) {
  check_vp_args("labelsmooth_ext::vocab_parallel_stats", input, target, weight, softcap);
  const at::Tensor in = rows_with_unit_class_stride(input);
  const at::Tensor tgt = target.contiguous();
  const at::Tensor w = weight_in_acc(weight, in.scalar_type());
  const int64_t N = in.size(0);
  at::Tensor stats = at::empty({5, N}, in.options().dtype(acc_type_of(in.scalar_type())));
  if (N == 0) return stats;
  VpStatsArgs a{};
  fill_vp_common(a, in, tgt, w, class_start, ignore_index, softcap);
  a.stats = stats.data_ptr();
  run_vp_best<VpStatsArgs>(LSE_VP_AVX2(vp_stats_AVX2), &vp_stats_DEFAULT, kind_of(in.scalar_type()), a);
  return stats;
}

at::Tensor vocab_parallel_grad_cpu(const at::Tensor& input, const at::Tensor& target,
                                   const std::optional<at::Tensor>& weight, const at::Tensor& coefs,
                                   int64_t class_start, int64_t ignore_index, double softcap) {
  const char* fn = "labelsmooth_ext::vocab_parallel_grad";
  check_vp_args(fn, input, target, weight, softcap);
  check_vp_coefs(fn, input, coefs);
  const at::Tensor in = rows_with_unit_class_stride(input);
  const at::Tensor tgt = target.contiguous();
  const at::Tensor w = weight_in_acc(weight, in.scalar_type());
  const at::Tensor co = coefs.contiguous();
  const int64_t N = in.size(0), K = in.size(1);
  if (N == 0 || K == 0) return at::empty({N, K}, in.options());
  at::Tensor grad = grad_rows_buffer(N, K, in.options());
  VpGradArgs a{};
  fill_vp_common(a, in, tgt, w, class_start, ignore_index, softcap);
  a.coefs = co.data_ptr();
  a.grad = grad.data_ptr();
  run_vp_best<VpGradArgs>(LSE_VP_AVX2(vp_grad_AVX2), &vp_grad_DEFAULT, kind_of(in.scalar_type()), a);
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(labelsmooth_ext, CPU, m) {
  m.impl("vocab_parallel_stats", &vocab_parallel_stats_cpu);
  m.impl("vocab_parallel_grad", &vocab_parallel_grad_cpu);
}

}  // namespace cpu
}  // namespace labelsmooth_ext
