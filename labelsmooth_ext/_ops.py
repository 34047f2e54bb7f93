"""Loads the compiled operator library and attaches the fake (meta) and autograd kernels.

The operators themselves are declared once in csrc/ops.cpp (TORCH_LIBRARY); each backend
registers its implementation in C++. Everything here is what torch.compile and autograd need.
"""
import contextlib
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

# Tests only: while emulated(namespace) is active, the functional API calls that operator
# namespace (the CUDA kernels under the SIMT emulation, tests/simt_ext.py) and takes the CUDA
# paths for CPU tensors.
_emulated_ops = None


@contextlib.contextmanager
def emulated(namespace):
    global ops, _emulated_ops
    saved = ops, _emulated_ops
    ops, _emulated_ops = namespace, namespace
    try:
        yield
    finally:
        ops, _emulated_ops = saved


def takes_cuda_path(t):
    """True for CUDA tensors, and for every tensor while the SIMT emulation is active (tests)."""
    return t.is_cuda or _emulated_ops is not None


REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}
SMOOTHING_MODES = {"uniform": 0, "off_target": 1}


def _acc_dtype(dtype):
    """The operators' loss dtype: float32, float64 for float64 input."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fake_forward(input, reduction, compute_grad):
    n, k = input.shape
    loss = input.new_empty((n,) if reduction == REDUCTIONS["none"] else (), dtype=_acc_dtype(input.dtype))
    grad = input.new_empty((n, k) if compute_grad else (0,))
    return loss, grad


@torch.library.register_fake("labelsmooth_ext::ce_forward")
def _(input, target, weight, ignore_index, label_smoothing, smoothing_mode, reduction, compute_grad):
    if input.dim() == 3:  # (N, K, S): one row per position, gradient shaped like the input
        loss = input.new_empty((target.shape[0],) if reduction == REDUCTIONS["none"] else (),
                               dtype=_acc_dtype(input.dtype))
        return loss, input.new_empty(input.shape if compute_grad else (0,))
    return _fake_forward(input, reduction, compute_grad)


@torch.library.register_fake("labelsmooth_ext::ce_grad")
def _(input, target, weight, grad_output, grad, ignore_index, label_smoothing, smoothing_mode, reduction):
    return torch.empty_like(input, memory_format=torch.contiguous_format)


@torch.library.register_fake("labelsmooth_ext::ce_prob_forward")
def _(input, target, weight, label_smoothing, smoothing_mode, reduction, compute_grad):
    return _fake_forward(input, reduction, compute_grad)


@torch.library.register_fake("labelsmooth_ext::bce_forward")
def _(input, target, weight, pos_weight, label_smoothing, reduction, compute_grad):
    n = input.numel()
    loss = input.new_empty((n,) if reduction == REDUCTIONS["none"] else (), dtype=_acc_dtype(input.dtype))
    grad = input.new_empty((n,) if compute_grad else (0,))
    return loss, grad


@torch.library.register_fake("labelsmooth_ext::ce_grad_")
def _(grad, input, target, weight, grad_output, ignore_index, label_smoothing, smoothing_mode, reduction):
    return None


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


def functorch_transforms():
    """The torch.func transforms (grad, vjp, vmap...) active around this call, innermost last."""
    if torch.compiler.is_compiling():
        return ()
    stack = torch._C._functorch.get_interpreter_stack()
    return tuple(i.key() for i in stack) if stack else ()


def _traced(*tensors):
    """Under torch.compile, a tensor subclass or a torch.func transform: functional ops only."""
    return (torch.compiler.is_compiling() or not all(_is_plain(t) for t in tensors)
            or bool(functorch_transforms()))


def _check_no_double_backward():
    if torch.is_grad_enabled():
        raise RuntimeError(
            "labelsmooth_ext: double backward (create_graph=True) through the fused loss is not "
            "supported; use torch.nn.functional.cross_entropy or labelsmooth_ext.reference for "
            "higher-order gradients"
        )


def _compiled_scale(grad, grad_output, reduction):
    """ce_backward as ATen ops, for torch.compile (issue 10 item 7b): the same numbers (ce_backward
    is at::mul_out into grad's dtype: the product in the promoted dtype, then one cast), but visible
    to inductor, which fuses the multiply into the gradient's pointwise consumers (the backward of a
    temperature, an upcast, a softcap computed in PyTorch, the .grad accumulation) instead of an
    opaque operator's full extra read + write of N x K. A matmul consumer still reads it separately
    (inductor's prologue fusion into mm templates is off unless max-autotune benchmarks it faster)."""
    if reduction == REDUCTIONS["none"]:
        go = grad_output.reshape([grad.shape[0]] + [1] * (grad.dim() - 1))
        if grad.dim() == 3:  # (N, C, S): one factor per (n, s)
            go = grad_output.reshape(grad.shape[0], 1, grad.shape[2])
    else:
        go = grad_output.reshape(())
    return torch.mul(grad, go).to(grad.dtype)


def _scale_traced(op, grad, grad_output, reduction):
    if torch.compiler.is_compiling():
        return _compiled_scale(grad, grad_output, reduction)
    return _functional(op, grad, grad_output, reduction)


def _scaled_gradient(ctx, grad, grad_output, reduction):
    """The gradient the forward computed, times the incoming gradient."""
    if reduction == REDUCTIONS["none"]:
        grad_output = grad_output.reshape(-1)
    ops = ctx.ops
    if _traced(grad, grad_output):
        return _scale_traced(ops.ce_backward, grad, grad_output, reduction)  # traced: functional
    _check_no_double_backward()
    if not ctx.cuda_path:
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


def _setup_context(ctx, inputs, output, *extra):
    _, grad = output
    ctx.reduction = inputs[-2]
    ctx.had_grad = inputs[-1]
    ctx.consumed = False
    ctx.recompute = bool(extra)
    ctx.ops, ctx.cuda_path = ops, takes_cuda_path(grad)
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(grad)
    ctx.save_for_backward(grad, *extra)


_SIXTEEN_BIT = (torch.float16, torch.bfloat16)


def _exact_gradient(ctx, grad_loss):
    """16-bit class-index gradient times the incoming gradient, rounded once: the saved
    gradient where that is exact (incoming gradient 1; for bfloat16 also 0 or +-2^k, k >= 0),
    else recomputed from the logits (ce_grad). float16 saves no gradient at all (its 1/D
    could underflow before a loss scaler's factor arrives), so it always recomputes."""
    grad, input, target, weight = ctx.saved_tensors
    red = ctx.reduction
    go = grad_loss.reshape(-1) if red == REDUCTIONS["none"] else grad_loss
    saved = grad if grad.numel() else None
    args = (ctx.ignore_index, ctx.label_smoothing, ctx.smoothing_mode, red)
    ops = ctx.ops
    if _traced(input, go):
        return _functional(ops.ce_grad, input, target, weight, go, saved, *args)
    _check_no_double_backward()
    if not ctx.cuda_path:
        if saved is not None and red != REDUCTIONS["none"] and float(go) == 1.0 and not _graph_kept():
            return saved  # no copy: autograd takes it over as .grad (the CPU never mutates it)
        return ops.ce_grad(input, target, weight, go, saved, *args)
    if saved is None or not _inplace_cuda_backward:
        return ops.ce_grad(input, target, weight, go, saved, *args)
    # CUDA, in place: rows whose incoming gradient is 1 are left as they are, exactly
    # scalable ones scaled, the others recomputed, all decided on the device (no host sync).
    ctx.consumed = True
    ops.ce_grad_(saved, input, target, weight, go, *args)
    torch.autograd.graph.increment_version(saved)
    return saved


def _backward(ctx, grad_loss, _unused):
    if ctx.consumed:
        raise RuntimeError(
            "labelsmooth_ext: backward ran twice through the same loss (retain_graph=True, "
            "gradcheck, jacobian); the first CUDA backward scaled the saved gradient in place. "
            "Call labelsmooth_ext.set_inplace_backward(False) before the forward to allow this."
        )
    if grad_loss is None:
        return (None,) * ctx.n_inputs
    if ctx.recompute:
        return (_exact_gradient(ctx, grad_loss),) + (None,) * (ctx.n_inputs - 1)
    (grad,) = ctx.saved_tensors
    if not ctx.had_grad:
        raise RuntimeError("labelsmooth_ext: the forward ran without compute_grad; no gradient was saved")
    g = _scaled_gradient(ctx, grad, grad_loss, ctx.reduction)
    return (g,) + (None,) * (ctx.n_inputs - 1)


def _setup_ce(ctx, inputs, output):
    ctx.n_inputs = 8
    input, target, weight, ctx.ignore_index, ctx.label_smoothing, ctx.smoothing_mode = inputs[:6]
    if input.dtype in _SIXTEEN_BIT:
        # References, not copies: the logits are kept so that the backward can recompute the
        # gradient when the saved one (if any) cannot be scaled exactly.
        _setup_context(ctx, inputs, output, input, target, weight)
    else:
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
torch.library.register_autograd(
    "labelsmooth_ext::ce_grad", _no_double_backward, setup_context=_setup_nothing
)


class _FirstOrderOnly(torch.autograd.Function):
    """A backward operator called inside a torch.func transform, which differentiates its
    backward (create_graph): first-order results as usual, a clear error if differentiated."""

    generate_vmap_rule = True

    @staticmethod
    def forward(op, *args):
        return op(*args)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *grads):
        _no_double_backward(ctx, None)


def _functional(op, *args):
    if functorch_transforms():
        return _FirstOrderOnly.apply(op, *args)
    return op(*args)


class CeFunction(torch.autograd.Function):
    """ce_forward with the same backward, as an autograd.Function with setup_context: the
    form torch.func transforms (grad, vjp, jacrev) accept; register_autograd's is not."""

    @staticmethod
    def forward(*inputs):
        return ops.ce_forward(*inputs)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _setup_ce(ctx, inputs, output)

    @staticmethod
    def backward(ctx, grad_loss, grad_unused):
        return _backward(ctx, grad_loss, grad_unused)


def _batched(t, dim, size):
    """t with its vmap dimension first (expanded when t is not batched)."""
    if t is None:
        return None
    if dim is None:
        return t.unsqueeze(0).expand(size, *t.shape)
    return t.movedim(dim, 0)


def _vmap_by_loop(op, tensor_args):
    """A vmap rule that calls the operator once per batch entry (the backward ops under
    jacrev: the batch is the number of loss elements)."""
    def rule(info, in_dims, *args):
        args = list(args)
        for i in tensor_args:
            args[i] = _batched(args[i], in_dims[i], info.batch_size)
        outs = [op(*[a[b] if i in tensor_args and a is not None else a for i, a in enumerate(args)])
                for b in range(info.batch_size)]
        return torch.stack(outs), 0
    return rule


# torch.library.register_vmap arrived in torch 2.5: on 2.4, jacrev through the fused loss is
# not available (vmap over the backward ops has no rule there).
HAS_VMAP_RULES = hasattr(torch.library, "register_vmap")
if HAS_VMAP_RULES:
    torch.library.register_vmap("labelsmooth_ext::ce_backward", _vmap_by_loop(ops.ce_backward, (0, 1)))
    torch.library.register_vmap("labelsmooth_ext::ce_grad", _vmap_by_loop(ops.ce_grad, (0, 1, 2, 3, 4)))


# ---------------------------------------------------------------------------------------------
# Large-vocabulary options (z_loss, softcap, return_lse, inplace_backward): ce_forward_ext.

@torch.library.register_fake("labelsmooth_ext::ce_forward_ext")
def _(input, target, weight, ignore_index, label_smoothing, smoothing_mode, reduction, compute_grad,
      z_loss, softcap):
    loss, grad = _fake_forward(input, reduction, compute_grad)
    return loss, grad, input.new_empty((input.shape[0],), dtype=_acc_dtype(input.dtype))


@torch.library.register_fake("labelsmooth_ext::ce_grad_ext")
def _(input, target, weight, grad_output, ignore_index, label_smoothing, smoothing_mode, reduction,
      z_loss, softcap):
    return torch.empty_like(input, memory_format=torch.contiguous_format)


@torch.library.register_fake("labelsmooth_ext::ce_grad_ext_")
def _(input, target, weight, grad_output, ignore_index, label_smoothing, smoothing_mode, reduction,
      z_loss, softcap):
    return None


def _setup_ext(ctx, inputs, output):
    ctx.args = tuple(inputs[3:7]) + tuple(inputs[8:10])  # ignore_index, eps, mode, red, z, cap
    ctx.reduction = inputs[6]
    ctx.grad_op, ctx.n_inputs = "ce_grad_ext", 10
    _setup_ext_common(ctx, inputs, output)


def _setup_prob_ext(ctx, inputs, output):
    ctx.args = tuple(inputs[3:6]) + tuple(inputs[7:9])  # eps, mode, red, z, cap
    ctx.reduction = inputs[5]
    ctx.grad_op, ctx.n_inputs = "ce_prob_grad_ext", 9
    _setup_ext_common(ctx, inputs, output)


def _setup_ext_common(ctx, inputs, output):
    input, target, weight = inputs[:3]
    ctx.ops, ctx.cuda_path = ops, takes_cuda_path(input)
    _, grad, _ = output
    ctx.mark_non_differentiable(grad, output[2])
    ctx.set_materialize_grads(False)
    # 16-bit input keeps references to the logits so the backward can recompute the gradient
    # with the incoming gradient applied before the one rounding (as ce_forward does).
    ctx.save_for_backward(grad, *((input, target, weight) if input.dtype in _SIXTEEN_BIT else ()))


def _backward_ext(ctx, grad_loss, _grad, _lse):
    if grad_loss is None:
        return (None,) * ctx.n_inputs
    red = ctx.reduction
    go = grad_loss.reshape(-1) if red == REDUCTIONS["none"] else grad_loss
    saved = ctx.saved_tensors
    grad = saved[0]
    ops = ctx.ops
    # CPU: "is the incoming gradient 1" is free on the host; the CUDA path never syncs for it.
    go_is_one = not ctx.cuda_path and red != REDUCTIONS["none"]
    if len(saved) == 1:  # float32 / float64: the forward's gradient times the incoming one
        if _traced(grad, go):
            g = _scale_traced(ops.ce_backward, grad, go, red)
        else:
            _check_no_double_backward()
            g = grad if go_is_one and float(go) == 1.0 and not _graph_kept() else ops.ce_backward(grad, go, red)
    else:
        _, input, target, weight = saved
        grad_op = getattr(ops, ctx.grad_op)
        if _traced(input, go):
            g = _functional(grad_op, input, target, weight, go, *ctx.args)
        else:
            _check_no_double_backward()
            if grad.numel() and go_is_one and float(go) == 1.0 and not _graph_kept():
                g = grad
            else:
                g = grad_op(input, target, weight, go, *ctx.args)
    return (g,) + (None,) * (ctx.n_inputs - 1)


torch.library.register_autograd("labelsmooth_ext::ce_forward_ext", _backward_ext, setup_context=_setup_ext)
torch.library.register_autograd(
    "labelsmooth_ext::ce_grad_ext", _no_double_backward, setup_context=_setup_nothing
)


@torch.library.register_fake("labelsmooth_ext::ce_prob_forward_ext")
def _(input, target, weight, label_smoothing, smoothing_mode, reduction, compute_grad, z_loss, softcap):
    loss, grad = _fake_forward(input, reduction, compute_grad)
    return loss, grad, input.new_empty((input.shape[0],), dtype=_acc_dtype(input.dtype))


@torch.library.register_fake("labelsmooth_ext::ce_prob_grad_ext")
def _(input, target, weight, grad_output, label_smoothing, smoothing_mode, reduction, z_loss, softcap):
    return torch.empty_like(input, memory_format=torch.contiguous_format)


@torch.library.register_fake("labelsmooth_ext::ce_prob_grad_ext_")
def _(input, target, weight, grad_output, label_smoothing, smoothing_mode, reduction, z_loss, softcap):
    return None


torch.library.register_autograd("labelsmooth_ext::ce_prob_forward_ext", _backward_ext,
                                setup_context=_setup_prob_ext)
torch.library.register_autograd(
    "labelsmooth_ext::ce_prob_grad_ext", _no_double_backward, setup_context=_setup_nothing
)


class InplaceBackwardCe(torch.autograd.Function):
    """ce_forward_ext whose backward writes the gradient over the logits (inplace_backward=True).

    The forward leaves the logits as they are (code may read them before backward) and stores
    no gradient; the backward recomputes it row by row into the logits' own storage and bumps
    their version counter, so any other autograd node that saved the logits and runs later
    raises autograd's usual "modified by an inplace operation" error instead of using the
    gradient as logits.
    """

    @staticmethod
    def forward(ctx, input, target, weight, ignore_index, eps, mode, red, z_loss, softcap):
        loss, _, lse = ops.ce_forward_ext(input, target, weight, ignore_index, eps, mode, red, False,
                                          z_loss, softcap)
        _setup_inplace(ctx, input, target, weight, (ignore_index, eps, mode, red, z_loss, softcap), red,
                       "ce_grad_ext_", lse)
        return loss, lse

    @staticmethod
    def backward(ctx, grad_loss, _lse):
        return _inplace_backward(ctx, grad_loss)


class InplaceBackwardProb(torch.autograd.Function):
    """InplaceBackwardCe for probability targets (ce_prob_forward_ext / ce_prob_grad_ext_)."""

    @staticmethod
    def forward(ctx, input, target, weight, eps, mode, red, z_loss, softcap):
        loss, _, lse = ops.ce_prob_forward_ext(input, target, weight, eps, mode, red, False, z_loss, softcap)
        _setup_inplace(ctx, input, target, weight, (eps, mode, red, z_loss, softcap), red,
                       "ce_prob_grad_ext_", lse)
        return loss, lse

    @staticmethod
    def backward(ctx, grad_loss, _lse):
        return _inplace_backward(ctx, grad_loss)


def _setup_inplace(ctx, input, target, weight, args, red, grad_op, lse):
    ctx.save_for_backward(input, target, weight)
    ctx.args, ctx.red, ctx.grad_op = args, red, grad_op
    ctx.n_inputs = 3 + len(args)
    ctx.ops = ops
    ctx.done = False
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)


def _inplace_backward(ctx, grad_loss):
    """The in-place backward of InplaceBackwardCe / InplaceBackwardProb."""
    if grad_loss is None:
        return (None,) * ctx.n_inputs
    if ctx.done:
        raise RuntimeError(
            "labelsmooth_ext: backward ran twice through a loss with inplace_backward=True; the "
            "first backward wrote the gradient over the logits (use inplace_backward=False to "
            "backpropagate more than once)")
    _check_no_double_backward()
    input, target, weight = ctx.saved_tensors  # checks that nothing modified the logits since
    go = grad_loss.reshape(-1) if ctx.red == REDUCTIONS["none"] else grad_loss
    ctx.done = True
    before = input._version
    getattr(ctx.ops, ctx.grad_op)(input, target, weight, go, *ctx.args)
    if input._version == before:
        torch.autograd.graph.increment_version(input)
    return (input,) + (None,) * (ctx.n_inputs - 1)


# ---------------------------------------------------------------------------------------------
# Tensor parallel (labelsmooth_ext/distributed.py, issue 14): the fused local passes over this
# rank's class slice. No autograd of their own: distributed.py's autograd.Function uses them.

@torch.library.register_fake("labelsmooth_ext::vocab_parallel_stats")
def _(input, target, weight, class_start, ignore_index, softcap):
    return input.new_empty((5, input.shape[0]), dtype=_acc_dtype(input.dtype))


@torch.library.register_fake("labelsmooth_ext::vocab_parallel_grad")
def _(input, target, weight, coefs, class_start, ignore_index, softcap):
    return torch.empty_like(input, memory_format=torch.contiguous_format)
