// Tests only: the CUDA operators (csrc/cuda/host.cuh and the kernels it launches, the same
// source nvcc compiles) built against the SIMT emulation and registered for CPU tensors as
// labelsmooth_simt::* (same schemas as labelsmooth_ext::*). tests/simt_ext.py builds it with
// torch.utils.cpp_extension.load, linked against labelsmooth_ext's _C (the shared host helpers
// of csrc/ops.cpp).
//
// Every tensor a launch touches lives in guarded memory (simt/memory.h): inputs are copied into
// it (keeping their storage offset, so misaligned views stay misaligned), and every allocation
// made while an operator runs (outputs, device-side denominators) comes from it, 0xFF-filled
// (NaN) until written; guards are checked after each launch.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mul.h>
#include <c10/core/CPUAllocator.h>
#include <torch/library.h>

#include "../host.cuh"
#include "../vp_host.cuh"
#include "simt.h"
#include "simt_selftest.h"

namespace labelsmooth_ext {
namespace simt_ops {

using at::Tensor;
using simt::memory::registry;

struct GuardedAllocator final : c10::Allocator {
  static void free_fn(void* p) { registry().release(p); }
  c10::DataPtr allocate(size_t n) override {
    void* p = registry().allocate(n);
    TORCH_CHECK(p != nullptr, "simt: out of memory allocating ", n, " bytes");
    return {p, p, &free_fn, c10::Device(c10::DeviceType::CPU)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return &free_fn; }
  void copy_data(void* dest, const void* src, size_t count) const override { std::memcpy(dest, src, count); }
};

GuardedAllocator& guarded_allocator() {
  static GuardedAllocator a;
  return a;
}

// While an emulated operator runs, CPU allocations are guarded.
struct GuardedScope {
  c10::Allocator* prev;
  GuardedScope() : prev(c10::GetCPUAllocator()) { c10::SetCPUAllocator(&guarded_allocator(), 255); }
  ~GuardedScope() { c10::SetCPUAllocator(prev, 255); }
};

// t itself when its storage is guarded already, else a copy of its whole storage in guarded
// memory viewed with t's offset, sizes and strides.
Tensor guarded(const Tensor& t) {
  if (!t.defined()) return t;
  TORCH_CHECK(t.device().is_cpu(), "labelsmooth_simt: tensors must be on the CPU, got ", t.device());
  const void* base = t.storage().data();
  if (base && registry().contains(base)) return t;
  const size_t nbytes = t.storage().nbytes();
  auto* p = static_cast<char*>(registry().allocate(nbytes));
  TORCH_CHECK(p != nullptr, "simt: out of memory");
  if (nbytes) std::memcpy(p, base, nbytes);
  return at::from_blob(
      p + t.storage_offset() * t.element_size(), t.sizes(), t.strides(),
      [p](void*) { registry().release(p); }, t.options());
}

std::optional<Tensor> guarded(const std::optional<Tensor>& t) {
  if (!t.has_value()) return t;
  return guarded(*t);
}

std::tuple<Tensor, Tensor> ce_forward(const Tensor& input, const Tensor& target,
                                      const std::optional<Tensor>& weight, int64_t ignore_index,
                                      double eps, int64_t mode, int64_t reduction, bool compute_grad) {
  GuardedScope scope;
  return cuda::ce_forward_cuda(guarded(input), guarded(target), guarded(weight), ignore_index, eps,
                               mode, reduction, compute_grad);
}

std::tuple<Tensor, Tensor> ce_prob_forward(const Tensor& input, const Tensor& target,
                                           const std::optional<Tensor>& weight, double eps,
                                           int64_t mode, int64_t reduction, bool compute_grad) {
  GuardedScope scope;
  return cuda::ce_prob_forward_cuda(guarded(input), guarded(target), guarded(weight), eps, mode,
                                    reduction, compute_grad);
}

std::tuple<Tensor, Tensor> bce_forward(const Tensor& input, const Tensor& target,
                                       const std::optional<Tensor>& weight,
                                       const std::optional<Tensor>& pos_weight, double eps,
                                       int64_t reduction, bool compute_grad) {
  GuardedScope scope;
  return cuda::bce_forward_cuda(guarded(input), guarded(target), guarded(weight), guarded(pos_weight),
                                eps, reduction, compute_grad);
}

void ce_scale_(Tensor& grad, const Tensor& grad_output, int64_t reduction) {
  GuardedScope scope;
  Tensor g = guarded(grad);
  cuda::ce_scale_cuda_(g, guarded(grad_output), reduction);
  if (!g.is_same(grad)) grad.copy_(g);
}

Tensor ce_grad(const Tensor& input, const Tensor& target, const std::optional<Tensor>& weight,
               const Tensor& grad_output, const std::optional<Tensor>& saved, int64_t ignore_index,
               double eps, int64_t mode, int64_t reduction) {
  GuardedScope scope;
  return cuda::ce_grad_cuda(guarded(input), guarded(target), guarded(weight), guarded(grad_output),
                            guarded(saved), ignore_index, eps, mode, reduction);
}

void ce_grad_(Tensor& grad, const Tensor& input, const Tensor& target, const std::optional<Tensor>& weight,
              const Tensor& grad_output, int64_t ignore_index, double eps, int64_t mode, int64_t reduction) {
  GuardedScope scope;
  Tensor g = guarded(grad);
  cuda::ce_grad_cuda_(g, guarded(input), guarded(target), guarded(weight), guarded(grad_output),
                      ignore_index, eps, mode, reduction);
  if (!g.is_same(grad)) grad.copy_(g);
}

std::tuple<Tensor, Tensor, Tensor> ce_forward_ext(const Tensor& input, const Tensor& target,
                                                  const std::optional<Tensor>& weight, int64_t ignore_index,
                                                  double eps, int64_t mode, int64_t reduction, bool compute_grad,
                                                  double z_loss, double softcap) {
  GuardedScope scope;
  return cuda::ce_forward_ext_cuda(guarded(input), guarded(target), guarded(weight), ignore_index, eps, mode,
                                   reduction, compute_grad, z_loss, softcap);
}

Tensor ce_grad_ext(const Tensor& input, const Tensor& target, const std::optional<Tensor>& weight,
                   const Tensor& grad_output, int64_t ignore_index, double eps, int64_t mode, int64_t reduction,
                   double z_loss, double softcap) {
  GuardedScope scope;
  return cuda::ce_grad_ext_cuda(guarded(input), guarded(target), guarded(weight), guarded(grad_output),
                                ignore_index, eps, mode, reduction, z_loss, softcap);
}

void ce_grad_ext_(Tensor& input, const Tensor& target, const std::optional<Tensor>& weight,
                  const Tensor& grad_output, int64_t ignore_index, double eps, int64_t mode, int64_t reduction,
                  double z_loss, double softcap) {
  GuardedScope scope;
  Tensor x = guarded(input);
  cuda::ce_grad_ext_cuda_(x, guarded(target), guarded(weight), guarded(grad_output), ignore_index, eps, mode,
                          reduction, z_loss, softcap);
  if (!x.is_same(input)) input.copy_(x);
}

std::tuple<Tensor, Tensor, Tensor> ce_prob_forward_ext(const Tensor& input, const Tensor& target,
                                                       const std::optional<Tensor>& weight, double eps, int64_t mode,
                                                       int64_t reduction, bool compute_grad, double z_loss,
                                                       double softcap) {
  GuardedScope scope;
  return cuda::ce_prob_forward_ext_cuda(guarded(input), guarded(target), guarded(weight), eps, mode, reduction,
                                        compute_grad, z_loss, softcap);
}

Tensor ce_prob_grad_ext(const Tensor& input, const Tensor& target, const std::optional<Tensor>& weight,
                        const Tensor& grad_output, double eps, int64_t mode, int64_t reduction, double z_loss,
                        double softcap) {
  GuardedScope scope;
  return cuda::ce_prob_grad_ext_cuda(guarded(input), guarded(target), guarded(weight), guarded(grad_output), eps,
                                     mode, reduction, z_loss, softcap);
}

void ce_prob_grad_ext_(Tensor& input, const Tensor& target, const std::optional<Tensor>& weight,
                       const Tensor& grad_output, double eps, int64_t mode, int64_t reduction, double z_loss,
                       double softcap) {
  GuardedScope scope;
  Tensor x = guarded(input);
  cuda::ce_prob_grad_ext_cuda_(x, guarded(target), guarded(weight), guarded(grad_output), eps, mode, reduction,
                               z_loss, softcap);
  if (!x.is_same(input)) input.copy_(x);
}

// As labelsmooth_ext::ce_backward (ops.cpp): the result keeps grad's dtype.
Tensor ce_backward(const Tensor& grad, const Tensor& grad_output, int64_t reduction) {
  Tensor out = at::empty_like(grad);
  if (reduction == kNone) return at::mul_out(out, grad, per_row_view(grad_output, grad));
  return at::mul_out(out, grad, grad_output.reshape({}));
}

// The emulator's counters since the last call: 16-byte pack loads, pack stores (every schedule
// of every launch counts) and kernel launches.
std::vector<int64_t> pack_accesses() {
  auto* c = simt::counters();
  return {c[0].exchange(0), c[1].exchange(0), c[2].exchange(0)};
}

// Runs one of the emulator's deliberately broken kernels (simt_selftest.h) by name.
std::string selftest(const std::string& name) { return simt_selftest::run(name); }

TORCH_LIBRARY(labelsmooth_simt, m) {
  m.def(
      "ce_forward(Tensor input, Tensor target, Tensor? weight, int ignore_index, "
      "float label_smoothing, int smoothing_mode, int reduction, bool compute_grad) "
      "-> (Tensor, Tensor)");
  m.def(
      "ce_prob_forward(Tensor input, Tensor target, Tensor? weight, float label_smoothing, "
      "int smoothing_mode, int reduction, bool compute_grad) -> (Tensor, Tensor)");
  m.def(
      "bce_forward(Tensor input, Tensor target, Tensor? weight, Tensor? pos_weight, "
      "float label_smoothing, int reduction, bool compute_grad) -> (Tensor, Tensor)");
  m.def("ce_backward(Tensor grad, Tensor grad_output, int reduction) -> Tensor");
  m.def("ce_scale_(Tensor(a!) grad, Tensor grad_output, int reduction) -> ()");
  m.def(
      "ce_grad(Tensor input, Tensor target, Tensor? weight, Tensor grad_output, Tensor? grad, "
      "int ignore_index, float label_smoothing, int smoothing_mode, int reduction) -> Tensor");
  m.def(
      "ce_grad_(Tensor(a!) grad, Tensor input, Tensor target, Tensor? weight, Tensor grad_output, "
      "int ignore_index, float label_smoothing, int smoothing_mode, int reduction) -> ()");
  m.def(
      "ce_forward_ext(Tensor input, Tensor target, Tensor? weight, int ignore_index, "
      "float label_smoothing, int smoothing_mode, int reduction, bool compute_grad, float z_loss, "
      "float softcap) -> (Tensor, Tensor, Tensor)");
  m.def(
      "ce_grad_ext(Tensor input, Tensor target, Tensor? weight, Tensor grad_output, int ignore_index, "
      "float label_smoothing, int smoothing_mode, int reduction, float z_loss, float softcap) -> Tensor");
  m.def(
      "ce_grad_ext_(Tensor(a!) input, Tensor target, Tensor? weight, Tensor grad_output, "
      "int ignore_index, float label_smoothing, int smoothing_mode, int reduction, float z_loss, "
      "float softcap) -> ()");
  m.def(
      "ce_prob_forward_ext(Tensor input, Tensor target, Tensor? weight, float label_smoothing, "
      "int smoothing_mode, int reduction, bool compute_grad, float z_loss, float softcap) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "ce_prob_grad_ext(Tensor input, Tensor target, Tensor? weight, Tensor grad_output, "
      "float label_smoothing, int smoothing_mode, int reduction, float z_loss, float softcap) -> Tensor");
  m.def(
      "ce_prob_grad_ext_(Tensor(a!) input, Tensor target, Tensor? weight, Tensor grad_output, "
      "float label_smoothing, int smoothing_mode, int reduction, float z_loss, float softcap) -> ()");
  m.def("selftest(str name) -> str", &selftest);
  m.def("pack_accesses() -> int[]", &pack_accesses);
}

TORCH_LIBRARY_IMPL(labelsmooth_simt, CPU, m) {
  m.impl("ce_forward", &ce_forward);
  m.impl("ce_prob_forward", &ce_prob_forward);
  m.impl("bce_forward", &bce_forward);
  m.impl("ce_scale_", &ce_scale_);
  m.impl("ce_grad", &ce_grad);
  m.impl("ce_grad_", &ce_grad_);
  m.impl("ce_forward_ext", &ce_forward_ext);
  m.impl("ce_grad_ext", &ce_grad_ext);
  m.impl("ce_grad_ext_", &ce_grad_ext_);
  m.impl("ce_prob_forward_ext", &ce_prob_forward_ext);
  m.impl("ce_prob_grad_ext", &ce_prob_grad_ext);
  m.impl("ce_prob_grad_ext_", &ce_prob_grad_ext_);
}

TORCH_LIBRARY_IMPL(labelsmooth_simt, CompositeExplicitAutograd, m) {
  m.impl("ce_backward", &ce_backward);
}

// Tensor parallel (issue 14): the vocabulary-parallel local passes, emulated.
Tensor vocab_parallel_stats(const Tensor& input, const Tensor& target, const std::optional<Tensor>& weight,
                            int64_t class_start, int64_t ignore_index, double softcap) {
  GuardedScope scope;
  return cuda::vocab_parallel_stats_cuda(guarded(input), guarded(target), guarded(weight), class_start,
                                         ignore_index, softcap);
}

Tensor vocab_parallel_grad(const Tensor& input, const Tensor& target, const std::optional<Tensor>& weight,
                           const Tensor& coefs, int64_t class_start, int64_t ignore_index, double softcap) {
  GuardedScope scope;
  return cuda::vocab_parallel_grad_cuda(guarded(input), guarded(target), guarded(weight), guarded(coefs),
                                        class_start, ignore_index, softcap);
}

TORCH_LIBRARY_FRAGMENT(labelsmooth_simt, m) {
  m.def(
      "vocab_parallel_stats(Tensor input, Tensor target, Tensor? weight, int class_start, "
      "int ignore_index, float softcap) -> Tensor");
  m.def(
      "vocab_parallel_grad(Tensor input, Tensor target, Tensor? weight, Tensor coefs, int class_start, "
      "int ignore_index, float softcap) -> Tensor");
}

TORCH_LIBRARY_IMPL(labelsmooth_simt, CPU, m) {
  m.impl("vocab_parallel_stats", &vocab_parallel_stats);
  m.impl("vocab_parallel_grad", &vocab_parallel_grad);
}

}  // namespace simt_ops
}  // namespace labelsmooth_ext
