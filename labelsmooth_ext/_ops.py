"""Loads the compiled operator library and attaches the fake (meta) and autograd kernels.

The operators themselves are declared once in csrc/ops.cpp (TORCH_LIBRARY); each backend
registers its implementation in C++. Everything here is what torch.compile and autograd need.
"""
import importlib.util

import torch

_INSTALL_HINT = (
    "build it from the source tree with `pip install --no-build-isolation -e .` "
    "(or `pip install .`)"
)


def _load_library():
    try:
        from ._build_info import BUILD_INFO
    except ImportError:
        raise ImportError(
            "labelsmooth_ext's compiled library is missing (no build was found); " + _INSTALL_HINT
        ) from None
    if BUILD_INFO["torch_version"] != torch.__version__:
        raise ImportError(
            f"labelsmooth_ext was built against torch {BUILD_INFO['torch_version']} but torch "
            f"{torch.__version__} is installed; rebuild against the installed torch with "
            "`pip install --no-build-isolation --force-reinstall --no-deps .` "
            "(or `pip install --no-build-isolation -e .` in a source checkout)"
        )
    spec = importlib.util.find_spec("labelsmooth_ext._C")
    if spec is None or spec.origin is None:
        raise ImportError("labelsmooth_ext's compiled library (_C) is missing; " + _INSTALL_HINT)
    torch.ops.load_library(spec.origin)
    return BUILD_INFO


BUILD_INFO = _load_library()
ops = torch.ops.labelsmooth_ext

REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}
SMOOTHING_MODES = {"uniform": 0, "off_target": 1}


def _fake_forward(input, reduction, compute_grad):
    n, k = input.shape
    loss = input.new_empty((n,) if reduction == REDUCTIONS["none"] else ())
    grad = input.new_empty((n, k) if compute_grad else (0,))
    return loss, grad


@torch.library.register_fake("labelsmooth_ext::ce_forward")
def _(input, target, weight, ignore_index, label_smoothing, smoothing_mode, reduction, compute_grad):
    if input.dim() == 3:  # (N, K, S): one row per position, gradient shaped like the input
        loss = input.new_empty((target.shape[0],) if reduction == REDUCTIONS["none"] else ())
        return loss, input.new_empty(input.shape if compute_grad else (0,))
    return _fake_forward(input, reduction, compute_grad)


@torch.library.register_fake("labelsmooth_ext::ce_prob_forward")
def _(input, target, weight, label_smoothing, smoothing_mode, reduction, compute_grad):
    return _fake_forward(input, reduction, compute_grad)


@torch.library.register_fake("labelsmooth_ext::bce_forward")
def _(input, target, weight, pos_weight, label_smoothing, reduction, compute_grad):
    n = input.numel()
    loss = input.new_empty((n,) if reduction == REDUCTIONS["none"] else ())
    grad = input.new_empty((n,) if compute_grad else (0,))
    return loss, grad


@torch.library.register_fake("labelsmooth_ext::ce_scale_")
def _(grad, grad_output, reduction):
    return None


_inplace_cuda_backward = True


def set_inplace_backward(enabled: bool) -> None:
    """CUDA backward: scale the saved gradient in place (default) or out of place.

    In place, the kernel decides on the device whether the incoming gradient is exactly 1 and
    then does nothing: no pass, no allocation, no host sync. The cost: the saved gradient is
    consumed, so backpropagating twice through one graph (retain_graph=True, gradcheck,
    jacobian) raises a clear error. Out of place costs one read + write pass, always.
    On the CPU the check is free on the host, so the backward never mutates and never needs this.
    """
    global _inplace_cuda_backward
    _inplace_cuda_backward = bool(enabled)


def _is_plain(t):
    return type(t) in (torch.Tensor, torch.nn.Parameter)


def _graph_kept():
    """True when this backward keeps the graph (retain_graph=True): the saved gradient may then
    be needed again, so it must not be handed out (the caller may modify the result in place).
    Without retain_graph, autograd frees it right after this backward: handing it out is safe."""
    keep = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return True if keep is None else bool(keep())


def _scaled_gradient(ctx, grad, grad_output, reduction):
    """The gradient the forward computed, times the incoming gradient."""
    if reduction == REDUCTIONS["none"]:
        grad_output = grad_output.reshape(-1)
    if torch.compiler.is_compiling() or not (_is_plain(grad) and _is_plain(grad_output)):
        return ops.ce_backward(grad, grad_output, reduction)  # traced: functional
    if torch.is_grad_enabled():
        raise RuntimeError(
            "labelsmooth_ext: double backward (create_graph=True) through the fused loss is not "
            "supported; use torch.nn.functional.cross_entropy or labelsmooth_ext.reference for "
            "higher-order gradients"
        )
    if grad.device.type != "cuda":
        # Host-side check costs nothing here; the saved gradient is returned as is (no copy:
        # autograd takes it over as .grad) or multiplied out of place, so graphs can be reused.
        if reduction != REDUCTIONS["none"] and float(grad_output) == 1.0 and not _graph_kept():
            return grad
        return ops.ce_backward(grad, grad_output, reduction)
    if not _inplace_cuda_backward:
        return ops.ce_backward(grad, grad_output, reduction)
    ctx.consumed = True
    ops.ce_scale_(grad, grad_output, reduction)
    torch.autograd.graph.increment_version(grad)
    return grad


def _setup_context(ctx, inputs, output):
    _, grad = output
    ctx.reduction = inputs[-2]
    ctx.had_grad = inputs[-1]
    ctx.consumed = False
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(grad)
    ctx.save_for_backward(grad)


def _backward(ctx, grad_loss, _unused):
    if ctx.consumed:
        raise RuntimeError(
            "labelsmooth_ext: backward ran twice through the same loss (retain_graph=True, "
            "gradcheck, jacobian); the first CUDA backward scaled the saved gradient in place. "
            "Call labelsmooth_ext.set_inplace_backward(False) before the forward to allow this."
        )
    (grad,) = ctx.saved_tensors
    if grad_loss is None:
        return (None,) * ctx.n_inputs
    if not ctx.had_grad:
        raise RuntimeError("labelsmooth_ext: the forward ran without compute_grad; no gradient was saved")
    g = _scaled_gradient(ctx, grad, grad_loss, ctx.reduction)
    return (g,) + (None,) * (ctx.n_inputs - 1)


def _setup_ce(ctx, inputs, output):
    ctx.n_inputs = 8
    _setup_context(ctx, inputs, output)


def _setup_prob(ctx, inputs, output):
    ctx.n_inputs = 7
    _setup_context(ctx, inputs, output)


def _setup_bce(ctx, inputs, output):
    ctx.n_inputs = 7
    _setup_context(ctx, inputs, output)


torch.library.register_autograd("labelsmooth_ext::ce_forward", _backward, setup_context=_setup_ce)
torch.library.register_autograd("labelsmooth_ext::bce_forward", _backward, setup_context=_setup_bce)
torch.library.register_autograd("labelsmooth_ext::ce_prob_forward", _backward, setup_context=_setup_prob)


def _no_double_backward(ctx, grad):
    raise RuntimeError(
        "labelsmooth_ext: double backward through the fused loss is not supported; use "
        "torch.nn.functional.cross_entropy or labelsmooth_ext.reference for higher-order gradients"
    )


def _setup_nothing(ctx, inputs, output):
    pass


torch.library.register_autograd(
    "labelsmooth_ext::ce_backward", _no_double_backward, setup_context=_setup_nothing
)
