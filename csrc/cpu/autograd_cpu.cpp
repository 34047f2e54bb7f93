// Autograd of ce_forward for CPU tensors, in C++ (the AutogradCPU key).
//
// The Python autograd registration (_ops.py, register_autograd) covers every other device; a
// kernel registered to AutogradCPU takes precedence over it for CPU tensors. Measured on one
// small call (N=32, K=10) the Python autograd.Function (its creation, setup_context, and the
// Python backward) cost several times the kernel itself; this does the same in C++:
//   - no input needs a gradient: straight to the CPU kernel (no node at all);
//   - float32 / float64: the forward's gradient is saved; the backward returns it as it is when
//     the incoming gradient is exactly 1 and the graph is not kept (autograd takes it over as
//     .grad, no copy), else ce_backward (out of place);
//   - float16 / bfloat16: the logits are kept too, and the backward recomputes with ce_grad
//     unless the saved gradient times the incoming one is exact (row_math.h exact_multiplier,
//     decided inside ce_grad) -- the same rules as _ops.py's _exact_gradient.
// Under torch.compile (fake / functional tensors) and torch.func wrappers the backward only
// calls the functional operators, whose fake kernels are registered in Python, as _ops.py does.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

// Whether the running backward keeps its graph (retain_graph=True). Weak: torch versions without
// it (2.4) leave it null, and then the graph counts as kept (the saved gradient is copied), as
// _ops.py's _graph_kept does there.
namespace torch::autograd {
__attribute__((weak)) bool get_current_graph_task_keep_graph();
}

namespace labelsmooth_ext {
namespace cpu {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using CeForwardSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                        const std::optional<at::Tensor>&, int64_t, double,
                                                        int64_t, int64_t, bool);
using CeBackwardSig = at::Tensor(const at::Tensor&, const at::Tensor&, int64_t);
using CeGradSig = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                             const at::Tensor&, const std::optional<at::Tensor>&, int64_t, double, int64_t,
                             int64_t);

const c10::TypedOperatorHandle<CeForwardSig>& ce_forward_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("labelsmooth_ext::ce_forward", "").typed<CeForwardSig>();
  return op;
}

const c10::TypedOperatorHandle<CeBackwardSig>& ce_backward_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("labelsmooth_ext::ce_backward", "").typed<CeBackwardSig>();
  return op;
}

const c10::TypedOperatorHandle<CeGradSig>& ce_grad_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("labelsmooth_ext::ce_grad", "").typed<CeGradSig>();
  return op;
}

// A plain CPU tensor: not a fake / functional tensor (torch.compile), a Python subclass or a
// torch.func wrapper. Only plain tensors take the host-side shortcuts (reading the incoming
// gradient's value, returning the saved gradient).
bool plain(const at::Tensor& t) {
  constexpr c10::DispatchKeySet traced =
      c10::python_ks | c10::functorch_transforms_ks | c10::DispatchKeySet(c10::DispatchKey::Functionalize);
  return !t.key_set().has_any(traced) && t.device().is_cpu();
}

bool graph_kept() {
  return &torch::autograd::get_current_graph_task_keep_graph == nullptr ||
         torch::autograd::get_current_graph_task_keep_graph();
}

bool is_sixteen_bit(at::ScalarType t) { return t == at::kHalf || t == at::kBFloat16; }

constexpr int64_t kNoneReduction = 0;

struct CeForwardCpuFunction : public torch::autograd::Function<CeForwardCpuFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& target,
                               const std::optional<at::Tensor>& weight, int64_t ignore_index, double eps,
                               int64_t mode, int64_t reduction, bool compute_grad) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [loss, grad] =
        ce_forward_op().call(input, target, weight, ignore_index, eps, mode, reduction, compute_grad);
    ctx->saved_data["reduction"] = reduction;
    ctx->saved_data["had_grad"] = compute_grad;
    ctx->set_materialize_grads(false);
    ctx->mark_non_differentiable({grad});
    if (is_sixteen_bit(input.scalar_type())) {
      // references to the logits (not copies), for the recomputation with the incoming gradient
      ctx->saved_data["ignore_index"] = ignore_index;
      ctx->saved_data["eps"] = eps;
      ctx->saved_data["mode"] = mode;
      ctx->save_for_backward({grad, input, target, weight.has_value() ? *weight : at::Tensor()});
    } else {
      ctx->save_for_backward({grad});
    }
    return {loss, grad};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(8);
    const at::Tensor& grad_loss = grads[0];
    if (!grad_loss.defined()) return out;
    const int64_t red = ctx->saved_data["reduction"].toInt();
    variable_list saved = ctx->get_saved_variables();
    const at::Tensor go = red == kNoneReduction ? grad_loss.reshape({-1}) : grad_loss;
    const at::Tensor& grad = saved[0];
    const bool traced = !plain(go) || !plain(grad);
    if (!traced) {
      TORCH_CHECK(!at::GradMode::is_enabled(),
                  "labelsmooth_ext: double backward (create_graph=True) through the fused loss is not "
                  "supported; use torch.nn.functional.cross_entropy or labelsmooth_ext.reference for "
                  "higher-order gradients");
    }
    // The saved gradient as it is: incoming gradient exactly 1 (a host read: free on the CPU)
    // and the graph freed after this backward (else the caller could modify what it keeps).
    auto go_is_one = [&] {
      return !traced && red != kNoneReduction && go.item<double>() == 1.0 &&
             !graph_kept();
    };
    if (saved.size() == 1) {
      TORCH_CHECK(ctx->saved_data["had_grad"].toBool(),
                  "labelsmooth_ext: the forward ran without compute_grad; no gradient was saved");
      out[0] = go_is_one() ? grad : ce_backward_op().call(grad, go, red);
      return out;
    }
    const at::Tensor& input = saved[1];
    // sym_numel: under torch.compile with dynamic shapes (dynamic=True, or a recompile for a new
    // batch size) the sizes are symbolic and numel() throws
    const std::optional<at::Tensor> saved_grad =
        grad.sym_numel() != 0 ? std::optional<at::Tensor>(grad) : std::nullopt;
    if (saved_grad && go_is_one()) {
      out[0] = grad;  // no copy: autograd takes it over as .grad (the CPU never mutates it)
      return out;
    }
    const std::optional<at::Tensor> weight = saved[3].defined() ? std::optional<at::Tensor>(saved[3]) : std::nullopt;
    out[0] = ce_grad_op().call(input, saved[2], weight, go, saved_grad, ctx->saved_data["ignore_index"].toInt(),
                               ctx->saved_data["eps"].toDouble(), ctx->saved_data["mode"].toInt(), red);
    return out;
  }
};

std::tuple<at::Tensor, at::Tensor> ce_forward_autograd_cpu(const at::Tensor& input, const at::Tensor& target,
                                                           const std::optional<at::Tensor>& weight,
                                                           int64_t ignore_index, double eps, int64_t mode,
                                                           int64_t reduction, bool compute_grad) {
  const bool needs_node = at::GradMode::is_enabled() &&
                          (input.requires_grad() || (weight.has_value() && weight->requires_grad()));
  if (!needs_node) {  // evaluation, validation, metrics: no autograd node at all
    at::AutoDispatchBelowADInplaceOrView guard;
    return ce_forward_op().call(input, target, weight, ignore_index, eps, mode, reduction, compute_grad);
  }
  variable_list out =
      CeForwardCpuFunction::apply(input, target, weight, ignore_index, eps, mode, reduction, compute_grad);
  return {out[0], out[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(labelsmooth_ext, AutogradCPU, m) {
  m.impl("ce_forward", &ce_forward_autograd_cpu);
}

}  // namespace cpu
}  // namespace labelsmooth_ext
