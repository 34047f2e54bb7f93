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


def _check_weight(weight, input, num_classes):
    if weight is None:
        return None
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor or None, got {type(weight).__name__}")
    if weight.dim() != 1 or weight.shape[0] != num_classes:
        raise ValueError(
            f"weight must be a 1-d tensor with one entry per class ({num_classes}), got shape "
            f"{tuple(weight.shape)}"
        )
    if weight.dtype != input.dtype:
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
    weight = _check_weight(weight, input, num_classes)
    if mode == SMOOTHING_MODES["off_target"] and num_classes == 1 and eps > 0:
        raise ValueError(
            f"smoothing_mode='off_target' needs at least 2 classes when label_smoothing > 0 "
            f"(got 1 class, label_smoothing={eps})"
        )
    need_grad = input.requires_grad and torch.is_grad_enabled()

    if target.is_floating_point():
        if isinstance(ignore_index, int) and ignore_index >= 0:  # as PyTorch: refused, not dropped
            raise ValueError(f"ignore_index is not supported for probability (floating point) "
                             f"targets, got ignore_index={ignore_index!r}")
        return _prob_cross_entropy(input, target, weight, reduction, smoothing_mode, eps, need_grad)

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
    if input.dim() > 2 and input.device.type == "cpu":
        # (N, C, d1, ...) as (N, C, S): the CPU kernel vectorises across positions, no transpose
        rows = input.reshape(input.shape[0], num_classes, math.prod(input.shape[2:]))
    else:
        rows = _to_rows(input, input.dim())
    tgt = target.reshape(-1).long()
    if input.is_cuda and _validate_cuda_targets and not torch.compiler.is_compiling():
        _validate_targets_on_host(tgt, num_classes, ignore_index)
    loss, _ = _ops.ops.ce_forward(rows, tgt, weight, ignore_index, eps, mode, red, need_grad)
    if red == REDUCTIONS["none"]:
        loss = loss.reshape(expected)
    return loss


def _prob_cross_entropy(input, target, weight, reduction, smoothing_mode, eps, need_grad):
    if tuple(target.shape) != tuple(input.shape):
        raise ValueError(
            f"probability target shape {tuple(target.shape)} must equal the input shape "
            f"{tuple(input.shape)}"
        )
    if target.requires_grad and torch.is_grad_enabled():
        # A gradient for the target (e.g. distillation through soft labels): the
        # pure-PyTorch formula, differentiable in both arguments.
        from . import reference

        return reference.cross_entropy(input, target, weight, reduction=reduction,
                                       label_smoothing=eps, smoothing_mode=smoothing_mode)
    target = target.to(input.dtype)
    rows = _to_rows(input, input.dim())
    trows = _to_rows(target, target.dim())
    red, mode = REDUCTIONS[reduction], SMOOTHING_MODES[smoothing_mode]
    loss, _ = _ops.ops.ce_prob_forward(rows, trows, weight, eps, mode, red, need_grad)
    if red == REDUCTIONS["none"]:
        loss = loss.reshape(_expected_target_shape(input))
    return loss


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
    return loss
