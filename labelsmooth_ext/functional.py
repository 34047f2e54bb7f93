"""Functional API: argument validation, reshaping any supported shape to rows, dispatch."""
import math
import os
import warnings

import torch

from . import _ops
from ._ops import REDUCTIONS, SMOOTHING_MODES

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)

_validate_cuda_targets = os.environ.get("LABELSMOOTH_EXT_VALIDATE_TARGETS", "0") not in ("", "0")


def set_target_validation(enabled: bool) -> None:
    """Check CUDA targets on the host before the kernel (one device sync per call).

    CPU targets are always checked (an IndexError naming the target). On CUDA the default is
    no check, so the loss never synchronises with the host: a row with an out-of-range target
    gets a NaN loss and a NaN gradient instead (never an out-of-bounds read). Also settable
    with LABELSMOOTH_EXT_VALIDATE_TARGETS=1.
    """
    global _validate_cuda_targets
    _validate_cuda_targets = bool(enabled)


def legacy_reduction(size_average, reduce):
    """PyTorch's rule for the deprecated size_average/reduce arguments."""
    warnings.warn(
        "size_average and reduce args will be deprecated, please use reduction='...' instead.",
        stacklevel=3,
    )
    size_average = True if size_average is None else size_average
    reduce = True if reduce is None else reduce
    if size_average and reduce:
        return "mean"
    return "sum" if reduce else "none"


def check_reduction(reduction):
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be 'none', 'mean' or 'sum', got {reduction!r}")
    return REDUCTIONS[reduction]


def check_smoothing_mode(smoothing_mode):
    if smoothing_mode not in SMOOTHING_MODES:
        raise ValueError(f"smoothing_mode must be 'uniform' or 'off_target', got {smoothing_mode!r}")
    return SMOOTHING_MODES[smoothing_mode]


def check_label_smoothing(label_smoothing):
    try:
        eps = float(label_smoothing)
    except (TypeError, ValueError):
        raise TypeError(f"label_smoothing must be a float, got {label_smoothing!r}") from None
    # NaN fails both comparisons; no math.isnan, which a traced (symbolic) float under
    # torch.compile does not support (a smoothing schedule passed as an argument).
    if not 0.0 <= eps <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing!r}")
    return eps


def _check_input(input):
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
    if input.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"input must be a floating tensor (float32, float64, float16 or bfloat16), got {input.dtype}"
        )
    if input.dim() == 0:
        raise ValueError("input must have at least 1 dimension (classes), got a 0-d tensor")


def _autocast_to_float32(input):
    """True when PyTorch would run this loss in float32 (inside torch.autocast, as for
    torch.nn.functional.cross_entropy): then the loss is float32 and float32 class weights and
    soft targets are used as they are, while the logits are read in their own 16-bit dtype
    (accumulated in float32; no float32 copy) and their gradient is in that dtype."""
    return (input.dtype in (torch.float16, torch.bfloat16, torch.float32)
            and torch.is_autocast_enabled(input.device.type))


def _check_weight(weight, input, num_classes, autocast=False):
    if weight is None:
        return None
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor or None, got {type(weight).__name__}")
    if weight.dim() != 1 or weight.shape[0] != num_classes:
        raise ValueError(
            f"weight must be a 1-d tensor with one entry per class ({num_classes}), got shape "
            f"{tuple(weight.shape)}"
        )
    if autocast and weight.dtype in (torch.float32, torch.float16, torch.bfloat16):
        weight = weight.float()  # autocast runs the loss in float32, weights included
    elif weight.dtype != input.dtype:
        raise TypeError(f"weight dtype {weight.dtype} must match the input dtype {input.dtype}")
    if weight.device != input.device:
        raise ValueError(f"weight is on {weight.device} but input is on {input.device}")
    # Class weights are constants, as in PyTorch (which has no gradient for them).
    return weight.detach()


def _to_rows(t, num_dims):
    """(C,) -> (1, C); (N, C) as is; (N, C, d1, ..., dk) -> (N*d1*...*dk, C)."""
    if num_dims == 1:
        return t.unsqueeze(0)
    if num_dims == 2:
        return t
    return t.movedim(1, -1).reshape(-1, t.shape[1])


def _expected_target_shape(input):
    if input.dim() == 1:
        return ()
    return (input.shape[0],) + tuple(input.shape[2:])


def _validate_targets_on_host(target, num_classes, ignore_index):
    bad = (target != ignore_index) & ((target < 0) | (target >= num_classes))
    if bool(bad.any()):
        pos = int(bad.nonzero()[0, 0])
        value = int(target.reshape(-1)[pos])
        raise IndexError(
            f"target {value} (at row {pos}) is out of range for {num_classes} classes; valid "
            f"targets are 0..{num_classes - 1} or ignore_index={ignore_index}"
        )


def _is_dtensor(x):
    if type(x) in (torch.Tensor, torch.nn.Parameter) or not torch.distributed.is_available():
        return False
    from .distributed import dtensor_api

    return isinstance(x, dtensor_api("DTensor"))


_PLAIN = (torch.Tensor, torch.nn.Parameter)
_CE_FORWARD = _ops.ops.ce_forward.default


def _fast_cross_entropy(input, target, ignore_index, reduction, label_smoothing, smoothing_mode):
    """The common CPU call in a few checks (None when it is not that call; cross_entropy then
    runs its full checks): plain CPU tensors, class-index int64 targets of the right shape, no
    class weights, outside autocast, torch.compile and torch.func. The operator checks the rest
    (target values, dtypes) in C++ and CPU autograd is C++ too (csrc/cpu/autograd_cpu.cpp)."""
    red = REDUCTIONS.get(reduction) if type(reduction) is str else None
    mode = SMOOTHING_MODES.get(smoothing_mode) if type(smoothing_mode) is str else None
    if (red is None or mode is None or type(label_smoothing) is not float or type(ignore_index) is not int
            or not 0.0 <= label_smoothing <= 1.0 or type(input) not in _PLAIN or type(target) is not torch.Tensor
            or not input.is_cpu or not target.is_cpu or target.dtype is not torch.int64
            or input.dtype not in _FLOAT_DTYPES or _ops._emulated_ops is not None):
        return None
    dims = input.dim()
    if dims < 2 or target.dim() != dims - 1 or target.shape[0] != input.shape[0] or (dims > 2 and tuple(
            target.shape[1:]) != tuple(input.shape[2:])) or (mode == 1 and input.shape[1] == 1):
        return None
    if torch.is_autocast_enabled("cpu") or torch.compiler.is_compiling() or _ops.functorch_transforms():
        return None
    # float16 stores no gradient (see cross_entropy)
    store_grad = input.requires_grad and input.dtype is not torch.float16 and torch.is_grad_enabled()
    rows = input if dims == 2 else input.reshape(input.shape[0], input.shape[1], math.prod(input.shape[2:]))
    loss, _ = _CE_FORWARD(rows, target.reshape(-1) if dims > 2 else target, None, ignore_index,
                          label_smoothing, mode, red, store_grad)
    if red == 0 and dims > 2:
        loss = loss.reshape(target.shape)
    return loss if loss.dtype is input.dtype else loss.to(input.dtype)


def cross_entropy(
    input,
    target,
    weight=None,
    size_average=None,
    ignore_index=-100,
    reduce=None,
    reduction="mean",
    label_smoothing=0.0,
    *,
    smoothing_mode="uniform",
    z_loss=0.0,
    softcap=None,
    inplace_backward=False,
    return_lse=False,
):
    """Drop-in for torch.nn.functional.cross_entropy, fused: log-softmax, the smoothed loss
    and (when input needs a gradient) the gradient in one pass over each row.

    smoothing_mode="uniform" is PyTorch's convention (target 1 - eps + eps/K, others eps/K);
    "off_target" gives the target 1 - eps and every other class eps/(K-1).

    Large-vocabulary options (class-index and probability targets; fused on the CPU, and on CUDA
    for class-index targets):
    softcap=s > 0: logits become s * tanh(x / s) before anything else.
    z_loss=c >= 0: every non-ignored row's loss gets c * lse**2 (unweighted; under "mean"
    divided by the cross-entropy's denominator: kept rows, or the sum of their class weights;
    with probability targets every row, and "mean" divides by the number of rows).
    return_lse=True: returns (loss, lse), lse shaped like the loss with reduction="none"
    (the target's shape for class indices), float32 (float64 for float64 input), no
    gradient, 0 for ignored rows.
    inplace_backward=True: the backward writes the gradient over the logits (no logits-sized
    gradient buffer); the logits are unchanged until then. See README.
    """
    if (weight is None and size_average is None and reduce is None and softcap is None and z_loss == 0.0
            and type(z_loss) is float and inplace_backward is False and return_lse is False):
        loss = _fast_cross_entropy(input, target, ignore_index, reduction, label_smoothing, smoothing_mode)
        if loss is not None:
            return loss
    llm = _check_llm_options(z_loss, softcap, inplace_backward, return_lse)
    if size_average is not None or reduce is not None:
        reduction = legacy_reduction(size_average, reduce)
    if _is_dtensor(input):  # logits sharded by class across ranks: labelsmooth_ext.distributed
        from .distributed import _dtensor_cross_entropy

        if inplace_backward or return_lse:
            raise ValueError("inplace_backward and return_lse are not supported for DTensor input; "
                             "use labelsmooth_ext.distributed.vocab_parallel_cross_entropy on the local shard")
        return _dtensor_cross_entropy(input, target, weight, ignore_index, reduction,
                                      label_smoothing, smoothing_mode, z_loss=z_loss, softcap=softcap)
    red = check_reduction(reduction)
    mode = check_smoothing_mode(smoothing_mode)
    eps = check_label_smoothing(label_smoothing)
    _check_input(input)
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if target.device != input.device:
        raise ValueError(f"target is on {target.device} but input is on {input.device}")
    num_classes = input.shape[0] if input.dim() == 1 else input.shape[1]
    autocast = _autocast_to_float32(input)
    weight = _check_weight(weight, input, num_classes, autocast)
    if mode == SMOOTHING_MODES["off_target"] and num_classes == 1 and eps > 0:
        raise ValueError(
            f"smoothing_mode='off_target' needs at least 2 classes when label_smoothing > 0 "
            f"(got 1 class, label_smoothing={eps})"
        )
    need_grad = input.requires_grad and torch.is_grad_enabled()
    if llm is not None:
        base = input._base if input._base is not None else input
        if inplace_backward and input.requires_grad and base.is_leaf and base.requires_grad:
            raise ValueError(
                "inplace_backward=True would write the gradient over a leaf tensor that requires "
                "grad (or a view of one: a parameter's data); it is meant for the logits computed "
                "by the model")

    if target.is_floating_point():
        if isinstance(ignore_index, int) and ignore_index >= 0:  # as PyTorch: refused, not dropped
            raise ValueError(f"ignore_index is not supported for probability (floating point) "
                             f"targets, got ignore_index={ignore_index!r}")
        if llm is not None:
            return _llm_prob_cross_entropy(input, target, weight, reduction, smoothing_mode, eps, need_grad,
                                           autocast, *llm, inplace_backward, return_lse)
        return _prob_cross_entropy(input, target, weight, reduction, smoothing_mode, eps, need_grad,
                                   autocast)

    if target.dtype not in _INT_DTYPES:
        raise TypeError(f"target must hold class indices (an integer dtype) or probabilities "
                        f"(a floating dtype), got {target.dtype}")
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    expected = _expected_target_shape(input)
    # PyTorch also takes a (1,) target for a (C,) input (its result is then 0-d; it fails
    # itself once label_smoothing > 0, where this gives the same one-row result).
    one_row = input.dim() == 1 and tuple(target.shape) == (1,)
    if tuple(target.shape) != expected and not one_row:
        raise ValueError(
            f"target shape {tuple(target.shape)} does not match input shape {tuple(input.shape)}: "
            f"class-index targets must have shape {expected}"
        )
    if llm is not None:
        return _llm_cross_entropy(input, target, weight, ignore_index, red, eps, smoothing_mode, autocast,
                                  need_grad, num_classes, *llm, inplace_backward, return_lse)
    if input.dim() > 2 and not _ops.takes_cuda_path(input):
        # (N, C, d1, ...) as (N, C, S): the CPU kernel vectorises across positions, no transpose
        rows = input.reshape(input.shape[0], num_classes, math.prod(input.shape[2:]))
    else:
        rows = _to_rows(input, input.dim())
    tgt = target.reshape(-1).long()
    if _ops.takes_cuda_path(input) and _validate_cuda_targets and not torch.compiler.is_compiling():
        _validate_targets_on_host(tgt, num_classes, ignore_index)
    transforms = _ops.functorch_transforms()
    if transforms and transforms != (torch._C._functorch.TransformType.Grad,):
        # vmap (per-sample gradients), jvp, nested grad (higher order): the composite path,
        # pure PyTorch ops that every transform handles. One grad / vjp / jacrev level: fused.
        from . import reference

        loss = reference.cross_entropy(_composite_input(input), target, weight,
                                       ignore_index=ignore_index, reduction=reduction,
                                       label_smoothing=eps, smoothing_mode=smoothing_mode)
        return _loss_dtype(loss, input, autocast)
    # float16 stores no gradient in the forward: its backward recomputes it with the incoming
    # gradient (a loss scaler's factor) applied before the one rounding, which cannot underflow
    # the way a stored p / D can.
    store_grad = need_grad and input.dtype != torch.float16
    forward = _ops.CeFunction.apply if transforms else _ops.ops.ce_forward
    loss, _ = forward(rows, tgt, weight, ignore_index, eps, mode, red, store_grad)
    if red == REDUCTIONS["none"]:
        loss = loss.reshape(expected)
    return _loss_dtype(loss, input, autocast)


def _check_llm_options(z_loss, softcap, inplace_backward, return_lse):
    """None when every large-vocabulary option has its default, else (z_loss, softcap) as the
    operator takes them (softcap 0.0 for None)."""
    if isinstance(z_loss, bool) or not isinstance(z_loss, (int, float)):
        raise TypeError(f"z_loss must be a float, got {z_loss!r}")
    z = float(z_loss)
    # comparisons only (NaN fails them): no math.isfinite, which a traced (symbolic) float of
    # torch.compile(dynamic=True) does not support, as in check_label_smoothing
    if not (0.0 <= z < math.inf):
        raise ValueError(f"z_loss must be a finite number >= 0, got {z_loss!r}")
    cap = 0.0
    if softcap is not None:
        if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
            raise TypeError(f"softcap must be a float or None, got {softcap!r}")
        cap = float(softcap)
        if not (0.0 < cap < math.inf):
            raise ValueError(f"softcap must be a finite number > 0 (or None for no capping), got {softcap!r}")
    for name, v in (("inplace_backward", inplace_backward), ("return_lse", return_lse)):
        if not isinstance(v, bool):
            raise TypeError(f"{name} must be a bool, got {v!r}")
    if z == 0.0 and softcap is None and not inplace_backward and not return_lse:
        return None
    return z, cap


def _llm_cross_entropy(input, target, weight, ignore_index, red, eps, smoothing_mode, autocast, need_grad,
                       num_classes, z_loss, softcap, inplace_backward, return_lse):
    """Class-index targets with z_loss / softcap / return_lse / inplace_backward (ce_forward_ext)."""
    mode = SMOOTHING_MODES[smoothing_mode]
    tgt = target.reshape(-1).long()
    transforms = _ops.functorch_transforms()
    if transforms:
        # torch.func: the composite formula (pure PyTorch ops every transform handles)
        from . import reference

        z = _composite_input(input)
        loss = reference.cross_entropy(z, target, weight, ignore_index=ignore_index,
                                       reduction=smoothing_reduction(red), label_smoothing=eps,
                                       smoothing_mode=smoothing_mode, z_loss=z_loss,
                                       softcap=softcap or None)
        loss = _loss_dtype(loss, input, autocast)
        if not return_lse:
            return loss
        zr = _to_rows(z, z.dim()).detach()
        if softcap:
            zr = softcap * torch.tanh(zr / softcap)
        lse = torch.where(tgt != ignore_index, torch.logsumexp(zr, dim=1), 0.0)
        return loss, lse.to(_ops._acc_dtype(input.dtype)).reshape(target.shape)
    if inplace_backward and need_grad:
        _check_inplace_shape(input)
    rows = _to_rows(input, input.dim())
    if inplace_backward and need_grad and not _ops._traced(input):
        _check_inplace_rows(input, rows)
        loss, lse = _ops.InplaceBackwardCe.apply(rows, tgt, weight, ignore_index, eps, mode, red, z_loss,
                                                 softcap)
    else:
        # Traced (torch.compile) runs inplace_backward out of place: the same values.
        store_grad = need_grad and input.dtype != torch.float16
        loss, _, lse = _ops.ops.ce_forward_ext(rows, tgt, weight, ignore_index, eps, mode, red, store_grad,
                                               z_loss, softcap)
    if red == REDUCTIONS["none"]:
        loss = loss.reshape(target.shape)
    loss = _loss_dtype(loss, input, autocast)
    if return_lse:
        return loss, lse.reshape(target.shape)
    return loss


def _llm_prob_cross_entropy(input, target, weight, reduction, smoothing_mode, eps, need_grad, autocast,
                            z_loss, softcap, inplace_backward, return_lse):
    """Probability targets with z_loss / softcap / return_lse / inplace_backward
    (ce_prob_forward_ext): z_loss is added to every row (none is ignored), lse is shaped like
    the loss with reduction='none'."""
    if tuple(target.shape) != tuple(input.shape):
        raise ValueError(
            f"probability target shape {tuple(target.shape)} must equal the input shape "
            f"{tuple(input.shape)}"
        )
    out_shape = _expected_target_shape(input)
    if (target.requires_grad and torch.is_grad_enabled()) or _ops.functorch_transforms():
        # a gradient for the target, or a torch.func transform: the differentiable composite
        from . import reference

        z = _composite_input(input)
        loss = reference.cross_entropy(z, target, weight, reduction=reduction, label_smoothing=eps,
                                       smoothing_mode=smoothing_mode, z_loss=z_loss, softcap=softcap or None)
        loss = _loss_dtype(loss, input, autocast)
        if not return_lse:
            return loss
        zr = _to_rows(z, z.dim()).detach()
        if softcap:
            zr = softcap * torch.tanh(zr / softcap)
        return loss, torch.logsumexp(zr, dim=1).to(_ops._acc_dtype(input.dtype)).reshape(out_shape)
    if inplace_backward and need_grad:
        _check_inplace_shape(input)
    red, mode = REDUCTIONS[reduction], SMOOTHING_MODES[smoothing_mode]
    # under autocast the soft targets stay float32, as PyTorch's float32 loss uses them
    target = target.float() if autocast else target.to(input.dtype)
    rows = _to_rows(input, input.dim())
    trows = _to_rows(target, target.dim())
    if inplace_backward and need_grad and not _ops._traced(input):
        _check_inplace_rows(input, rows)
        loss, lse = _ops.InplaceBackwardProb.apply(rows, trows, weight, eps, mode, red, z_loss, softcap)
    else:
        # Traced (torch.compile) runs inplace_backward out of place: the same values.
        store_grad = need_grad and input.dtype != torch.float16
        loss, _, lse = _ops.ops.ce_prob_forward_ext(rows, trows, weight, eps, mode, red, store_grad, z_loss,
                                                    softcap)
    if red == REDUCTIONS["none"]:
        loss = loss.reshape(out_shape)
    loss = _loss_dtype(loss, input, autocast)
    if return_lse:
        return loss, lse.reshape(out_shape)
    return loss


def smoothing_reduction(red):
    return next(k for k, v in REDUCTIONS.items() if v == red)


def _composite_input(input):
    """The composite (pure PyTorch) path accumulates 16-bit input in float32 too."""
    return input.float() if input.dtype in (torch.float16, torch.bfloat16) else input


def _loss_dtype(loss, input, autocast):
    """The operators return the loss in float32 (float64 for float64): PyTorch's dtype is the
    input's, or float32 under autocast."""
    return loss if autocast or loss.dtype == input.dtype else loss.to(input.dtype)


def _prob_cross_entropy(input, target, weight, reduction, smoothing_mode, eps, need_grad, autocast=False):
    if tuple(target.shape) != tuple(input.shape):
        raise ValueError(
            f"probability target shape {tuple(target.shape)} must equal the input shape "
            f"{tuple(input.shape)}"
        )
    if (target.requires_grad and torch.is_grad_enabled()) or _ops.functorch_transforms():
        # A gradient for the target (e.g. distillation through soft labels), or a torch.func
        # transform: the pure-PyTorch formula, differentiable in both arguments.
        from . import reference

        loss = reference.cross_entropy(_composite_input(input) if autocast else input, target, weight,
                                       reduction=reduction, label_smoothing=eps,
                                       smoothing_mode=smoothing_mode)
        return _loss_dtype(loss, input, autocast)
    # under autocast the soft targets stay float32, as PyTorch's float32 loss uses them
    target = target.float() if autocast else target.to(input.dtype)
    rows = _to_rows(input, input.dim())
    trows = _to_rows(target, target.dim())
    red, mode = REDUCTIONS[reduction], SMOOTHING_MODES[smoothing_mode]
    loss, _ = _ops.ops.ce_prob_forward(rows, trows, weight, eps, mode, red, need_grad)
    if red == REDUCTIONS["none"]:
        loss = loss.reshape(_expected_target_shape(input))
    return _loss_dtype(loss, input, autocast)


def _periodic_weight(w, shape, dtype, name):
    """A weight broadcastable to `shape`, as the 1-d periodic vector the kernel indexes with
    i % len (a scalar, or trailing dimensions equal to the input's); other layouts expanded."""
    if w is None:
        return None
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(w).__name__}")
    try:
        if torch.broadcast_shapes(w.shape, shape) != shape:
            raise RuntimeError
    except RuntimeError:
        raise ValueError(f"{name} of shape {tuple(w.shape)} does not broadcast to the input shape "
                         f"{tuple(shape)}") from None
    w = w.detach().to(dtype)
    padded = (1,) * (len(shape) - w.dim()) + tuple(w.shape)
    k = next((i for i, s in enumerate(padded) if s != 1), len(padded))
    if all(padded[j] == shape[j] for j in range(k, len(shape))):
        return w.reshape(-1).contiguous()
    return w.expand(shape).contiguous().reshape(-1)


def binary_cross_entropy_with_logits(
    input,
    target,
    weight=None,
    size_average=None,
    reduce=None,
    reduction="mean",
    pos_weight=None,
    *,
    label_smoothing=0.0,
):
    """Drop-in for torch.nn.functional.binary_cross_entropy_with_logits with binary label
    smoothing: each target t becomes t (1 - 2a) + a (1 -> 1 - a, 0 -> a), a = label_smoothing.
    Loss and gradient in one fused elementwise pass."""
    if size_average is not None or reduce is not None:
        reduction = legacy_reduction(size_average, reduce)
    red = check_reduction(reduction)
    a = check_label_smoothing(label_smoothing)
    if not isinstance(input, torch.Tensor) or input.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"input must be a floating tensor, got {getattr(input, 'dtype', type(input).__name__)}")
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if target.shape != input.shape:
        raise ValueError(f"Target size ({tuple(target.shape)}) must be the same as input size "
                         f"({tuple(input.shape)})")
    if target.device != input.device:
        raise ValueError(f"target is on {target.device} but input is on {input.device}")
    if target.requires_grad and torch.is_grad_enabled():
        from . import reference  # a gradient for the target: the differentiable formula

        return reference.binary_cross_entropy_with_logits(
            input, target, weight, reduction=reduction, pos_weight=pos_weight, label_smoothing=a)
    shape = input.shape
    w = _periodic_weight(weight, shape, input.dtype, "weight")
    pw = _periodic_weight(pos_weight, shape, input.dtype, "pos_weight")
    for name, t in (("weight", w), ("pos_weight", pw)):
        if t is not None and t.device != input.device:
            raise ValueError(f"{name} is on {t.device} but input is on {input.device}")
    if input.numel() == 0:  # an empty input with an empty weight: nothing to weight (as PyTorch)
        w = pw = None
    need_grad = input.requires_grad and torch.is_grad_enabled()
    loss, _ = _ops.ops.bce_forward(input.reshape(-1), target.to(input.dtype).reshape(-1), w, pw, a,
                                   red, need_grad)
    if red == REDUCTIONS["none"]:
        loss = loss.reshape(shape)
    return _loss_dtype(loss, input, False)


def _check_inplace_shape(input):
    """inplace_backward=True: (N, C) or (C,) logits only."""
    if input.dim() > 2:
        raise ValueError(
            "inplace_backward=True takes (N, C) or (C,) logits (a language model's (B, T, V) logits "
            f"reshaped to (B*T, V)); got shape {tuple(input.shape)}")


def _check_inplace_rows(input, rows):
    """inplace_backward=True writes the gradient into the logits' storage: no strides or overlap."""
    if not rows.is_contiguous():
        raise ValueError(
            "inplace_backward=True writes the gradient into the logits' storage, so they must be "
            f"contiguous without overlap; got strides {tuple(input.stride())} for shape "
            f"{tuple(input.shape)} (call .contiguous() first)")
