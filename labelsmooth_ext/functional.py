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
    if math.isnan(eps) or not 0.0 <= eps <= 1.0:
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
):
    """Drop-in for torch.nn.functional.cross_entropy, fused: log-softmax, the smoothed loss
    and (when input needs a gradient) the gradient in one pass over each row.

    smoothing_mode="uniform" is PyTorch's convention (target 1 - eps + eps/K, others eps/K);
    "off_target" gives the target 1 - eps and every other class eps/(K-1).
    """
    if size_average is not None or reduce is not None:
        reduction = legacy_reduction(size_average, reduce)
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

    if target.is_floating_point():
        return _prob_cross_entropy(input, target, weight, reduction, smoothing_mode, eps, need_grad,
                                   autocast)

    if target.dtype not in _INT_DTYPES:
        raise TypeError(f"target must hold class indices (an integer dtype) or probabilities "
                        f"(a floating dtype), got {target.dtype}")
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    expected = _expected_target_shape(input)
    if tuple(target.shape) != expected:
        raise ValueError(
            f"target shape {tuple(target.shape)} does not match input shape {tuple(input.shape)}: "
            f"class-index targets must have shape {expected}"
        )
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
        loss = loss.reshape(target.shape)
    return _loss_dtype(loss, input, autocast)


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
    need_grad = input.requires_grad and torch.is_grad_enabled()
    loss, _ = _ops.ops.bce_forward(input.reshape(-1), target.to(input.dtype).reshape(-1), w, pw, a,
                                   red, need_grad)
    if red == REDUCTIONS["none"]:
        loss = loss.reshape(shape)
    return _loss_dtype(loss, input, False)
