"""Route existing training code to the fused loss without rewriting it.

    handle = labelsmooth_ext.patch()      # or: with labelsmooth_ext.patch(): ...
    ...                                   # torch / transformers / timm losses now run our kernel
    handle.undo()                         # or labelsmooth_ext.unpatch() to undo every patch

What gets replaced (each only when its library is installed; see PATCH_TARGETS):
  functional:   torch.nn.functional.cross_entropy, torch.nn.functional.binary_cross_entropy_with_logits
  modules:      torch.nn.CrossEntropyLoss.forward, torch.nn.BCEWithLogitsLoss.forward (so instances
                made before the call are covered too)
  transformers: transformers.trainer_pt_utils.LabelSmoother.__call__ (Trainer's
                label_smoothing_factor) and transformers.loss.loss_utils.fixed_cross_entropy (the
                loss of ForCausalLMLoss, ForMaskedLMLoss, sequence / token classification, QA)
  timm:         timm.loss.LabelSmoothingCrossEntropy.forward, timm.loss.SoftTargetCrossEntropy.forward

Before replacing anything, patch() checks on small float64 examples that the replacement gives
the installed original's losses and gradients (a library release with another formula is left
alone, with a warning). Every replacement then checks per call that the call is one our kernel
computes with the original's exact semantics (dtypes, shapes, devices, arguments); anything else
(torch.func transforms, devices without a kernel, deprecated arguments, dtype promotion, unusual
shapes or label values) is handed to the original function unchanged, so a patched call gives
the original's number or error, never another number. Tensor subclasses and torch-function modes
go to the original, which hands them to their __torch_function__ first (as unpatched). Under autocast, float16 / bfloat16
inputs are cast to float32 first, as autocast does for these losses.

Not covered: a name bound before patch() with `from torch.nn.functional import cross_entropy`
(that name keeps the original), and double backward (create_graph=True) through a patched loss,
which raises our clear error instead of computing a second derivative.
"""
import importlib
import importlib.util
import threading
import warnings

import torch

from . import _ops
from . import functional as _lf

_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_HALF = (torch.float16, torch.bfloat16)
_REDUCTIONS = ("none", "mean", "sum")
_LOG_SOFTMAX_UPCAST = ("cuda",)  # autocast runs log_softmax in float32 on CUDA, not on the CPU
# An ignore_index no int64 target equals except itself (for losses that have no ignore_index).
_NO_IGNORE = -(2 ** 63)

# name -> (owner object, attribute, original value, our replacement); in patch order.
_active = {}
_lock = threading.Lock()
_INHERITED = object()  # the class had no attribute of its own: undo deletes ours


# ---------------------------------------------------------------------------------------------
# Can we serve this call exactly?


def _plain(*tensors):
    """True when none of the tensors (None allowed) overrides torch functions and no
    torch-function mode or torch.func transform is active: our operators would bypass those."""
    ts = tuple(t for t in tensors if t is not None)
    if torch.overrides.has_torch_function(ts):
        return False
    if torch.compiler.is_compiling():
        return True  # dynamo traces the call; our operators have fake kernels
    wrapped = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
    return wrapped is None or not any(wrapped(t) for t in ts)


def _device_ok(t):
    if t.device.type == "cpu":
        return True
    return t.device.type == "cuda" and bool(_ops.BUILD_INFO.get("cuda"))


def _autocast_up(device_type, *tensors, upcasting=("cpu", "cuda")):
    """Autocast's float32 policy: float16/bfloat16 floating arguments become float32 (float64 and
    integer tensors are left alone). No-op when autocast is off or, on that device, autocast does
    not upcast the op the original is built on (`upcasting`: cross_entropy and
    binary_cross_entropy_with_logits on CPU and CUDA, log_softmax on CUDA only)."""
    if device_type not in upcasting or not torch.is_autocast_enabled(device_type):
        return tensors
    return tuple(t.float() if t is not None and t.dtype in _HALF else t for t in tensors)


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _smoothing_ok(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and 0.0 <= v <= 1.0


def _ce_plan(input, target, weight, size_average, ignore_index, reduce, reduction, label_smoothing):
    """(input, target, weight) for our cross_entropy, or None to use the original."""
    if not (isinstance(input, torch.Tensor) and isinstance(target, torch.Tensor)):
        return None
    if weight is not None and not isinstance(weight, torch.Tensor):
        return None
    if size_average is not None or reduce is not None:
        return None
    if reduction not in _REDUCTIONS or not _is_int(ignore_index) or not _smoothing_ok(label_smoothing):
        return None
    if not _plain(input, target, weight) or not _device_ok(input):
        return None
    if target.device != input.device or (weight is not None and weight.device != input.device):
        return None
    input, target, weight = _autocast_up(input.device.type, input, target, weight)
    if input.dtype not in _FLOATS or input.dim() == 0:
        return None
    num_classes = input.shape[0] if input.dim() == 1 else input.shape[1]
    if num_classes == 0:
        return None
    if weight is not None and (weight.dtype != input.dtype or weight.dim() != 1
                               or weight.shape[0] != num_classes):
        return None
    if target.is_floating_point():
        if target.dtype != input.dtype or target.shape != input.shape:
            return None  # PyTorch promotes dtypes / raises its own error
    else:
        expected = () if input.dim() == 1 else (input.shape[0],) + tuple(input.shape[2:])
        if target.dtype not in (torch.int64, torch.uint8) or tuple(target.shape) != expected:
            return None  # PyTorch accepts Long and Byte class indices only
    return input, target, weight


def _bce_plan(input, target, weight, size_average, reduce, reduction, pos_weight):
    if not (isinstance(input, torch.Tensor) and isinstance(target, torch.Tensor)):
        return None
    for w in (weight, pos_weight):
        if w is not None and not isinstance(w, torch.Tensor):
            return None
    if size_average is not None or reduce is not None or reduction not in _REDUCTIONS:
        return None
    if not _plain(input, target, weight, pos_weight) or not _device_ok(input):
        return None
    if any(t is not None and t.device != input.device for t in (target, weight, pos_weight)):
        return None
    input, target, weight, pos_weight = _autocast_up(input.device.type, input, target, weight,
                                                     pos_weight)
    if input.dtype not in _FLOATS or target.dtype != input.dtype or target.shape != input.shape:
        return None
    for w in (weight, pos_weight):
        if w is None:
            continue
        if w.dtype != input.dtype:
            return None
        try:
            if torch.broadcast_shapes(w.shape, input.shape) != input.shape:
                return None
        except RuntimeError:
            return None
    return input, target, weight, pos_weight


# ---------------------------------------------------------------------------------------------
# Replacements. Each takes the original as a default argument bound at patch time.


def _make_cross_entropy(original):
    def cross_entropy(input, target, weight=None, size_average=None, ignore_index=-100,
                      reduce=None, reduction="mean", label_smoothing=0.0):
        plan = _ce_plan(input, target, weight, size_average, ignore_index, reduce, reduction,
                        label_smoothing)
        if plan is None:
            return original(input, target, weight, size_average, ignore_index, reduce, reduction,
                            label_smoothing)
        x, t, w = plan
        return _lf.cross_entropy(x, t, w, ignore_index=ignore_index, reduction=reduction,
                                 label_smoothing=float(label_smoothing))

    cross_entropy.__doc__ = original.__doc__
    cross_entropy.__wrapped_by_labelsmooth_ext__ = original
    return cross_entropy


def _make_bce(original):
    def binary_cross_entropy_with_logits(input, target, weight=None, size_average=None, reduce=None,
                                         reduction="mean", pos_weight=None):
        plan = _bce_plan(input, target, weight, size_average, reduce, reduction, pos_weight)
        if plan is None:
            return original(input, target, weight, size_average, reduce, reduction, pos_weight)
        x, t, w, pw = plan
        return _lf.binary_cross_entropy_with_logits(x, t, w, reduction=reduction, pos_weight=pw)

    binary_cross_entropy_with_logits.__doc__ = original.__doc__
    return binary_cross_entropy_with_logits


def _make_ce_module_forward(original):
    def forward(self, input, target):
        plan = _ce_plan(input, target, self.weight, None, self.ignore_index, None, self.reduction,
                        self.label_smoothing)
        if plan is None:
            return original(self, input, target)
        x, t, w = plan
        return _lf.cross_entropy(x, t, w, ignore_index=self.ignore_index, reduction=self.reduction,
                                 label_smoothing=float(self.label_smoothing))

    return forward


def _make_bce_module_forward(original):
    def forward(self, input, target):
        plan = _bce_plan(input, target, self.weight, None, None, self.reduction, self.pos_weight)
        if plan is None:
            return original(self, input, target)
        x, t, w, pw = plan
        return _lf.binary_cross_entropy_with_logits(x, t, w, reduction=self.reduction, pos_weight=pw)

    return forward


def _make_label_smoother_call(original):
    """transformers' LabelSmoother: with D = the non-ignored label count (or num_items_in_batch),
    (1-eps) * sum(nll) / D + eps * sum(-log p) / (D * K) over the non-ignored positions, which is
    PyTorch's label-smoothed cross-entropy summed over those positions and divided by D. Labels
    below 0 other than ignore_index are clamped to class 0 and counted, as the original does."""

    def __call__(self, model_output, labels, shift_labels=False, num_items_in_batch=None):
        logits = model_output["logits"] if isinstance(model_output, dict) else model_output[0]
        eps, ignore = self.epsilon, self.ignore_index
        ok = (isinstance(logits, torch.Tensor) and isinstance(labels, torch.Tensor)
              and _smoothing_ok(eps) and _is_int(ignore) and ignore < 0
              and isinstance(shift_labels, bool)
              and (num_items_in_batch is None or _is_int(num_items_in_batch)
                   or (isinstance(num_items_in_batch, torch.Tensor) and num_items_in_batch.numel() == 1))
              and _plain(logits, labels) and _device_ok(logits) and labels.device == logits.device
              and logits.dtype in _FLOATS and labels.dtype == torch.int64
              and logits.dim() >= (2 if shift_labels else 1) and logits.shape[-1] > 0)
        if ok and not shift_labels and labels.dim() == logits.dim() and labels.shape[-1] == 1:
            labels = labels.squeeze(-1)  # the original also takes labels with a trailing 1
        if not ok or tuple(labels.shape) != tuple(logits.shape[:-1]):
            return original(self, model_output, labels, shift_labels, num_items_in_batch)
        if shift_labels:
            # position i predicts label i+1; the last position predicts nothing (ignored). Same
            # rows and count as the original's logits[..., :-1, :] / labels[..., 1:], no copy.
            labels = torch.nn.functional.pad(labels[..., 1:], (0, 1), value=ignore)
        labels = torch.where(labels == ignore, labels, labels.clamp(min=0))
        if logits.dtype in _HALF:
            # The original returns a float32 loss here (its smoothing sum is float32); ours is
            # computed from the float32 logits (as autocast does on CUDA), so it is float32-exact.
            logits = logits.float()
        rows, tgt = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
        if num_items_in_batch is None:
            denominator = None
        elif isinstance(num_items_in_batch, torch.Tensor):
            denominator = num_items_in_batch.to(logits.device)
        else:
            denominator = num_items_in_batch
        if denominator is None:
            return _lf.cross_entropy(rows, tgt, ignore_index=ignore, reduction="mean",
                                     label_smoothing=float(eps))
        total = _lf.cross_entropy(rows, tgt, ignore_index=ignore, reduction="sum",
                                  label_smoothing=float(eps))
        return total / denominator

    return __call__


def _make_fixed_cross_entropy(original):
    """transformers.loss.loss_utils.fixed_cross_entropy: cross-entropy, summed and divided by
    num_items_in_batch when given, else the mean (extra kwargs are ignored, as there)."""

    def fixed_cross_entropy(source, target, num_items_in_batch=None, ignore_index=-100, **kwargs):
        reduction = "sum" if num_items_in_batch is not None else "mean"
        plan = _ce_plan(source, target, None, None, ignore_index, None, reduction, 0.0)
        if plan is None:
            return original(source, target, num_items_in_batch, ignore_index, **kwargs)
        x, t, _ = plan
        loss = _lf.cross_entropy(x, t, ignore_index=ignore_index, reduction=reduction)
        if reduction == "sum":
            if torch.is_tensor(num_items_in_batch):
                num_items_in_batch = num_items_in_batch.to(loss.device)
            loss = loss / num_items_in_batch
        return loss

    return fixed_cross_entropy


def _make_timm_label_smoothing_forward(original):
    """timm's LabelSmoothingCrossEntropy: mean over rows of confidence * nll + smoothing * mean_k(-log p),
    PyTorch's label-smoothed cross-entropy when confidence == 1 - smoothing (no ignore_index)."""

    def forward(self, x, target):
        s = self.smoothing
        ok = (isinstance(x, torch.Tensor) and isinstance(target, torch.Tensor) and _smoothing_ok(s)
              and self.confidence == 1.0 - s and _plain(x, target) and _device_ok(x)
              and target.device == x.device and x.dim() == 2 and x.dtype in _FLOATS
              and x.shape[1] > 0 and target.dtype == torch.int64
              and tuple(target.shape) == (x.shape[0],))
        if not ok:
            return original(self, x, target)
        (x,) = _autocast_up(x.device.type, x, upcasting=_LOG_SOFTMAX_UPCAST)
        return _lf.cross_entropy(x, target, ignore_index=_NO_IGNORE, reduction="mean",
                                 label_smoothing=float(s))

    return forward


def _make_timm_soft_target_forward(original):
    """timm's SoftTargetCrossEntropy: mean over rows of sum_k(-t_k log p_k), softmax over the last
    dimension: PyTorch's probability-target cross-entropy on the rows."""

    def forward(self, x, target):
        ok = (isinstance(x, torch.Tensor) and isinstance(target, torch.Tensor) and _plain(x, target)
              and _device_ok(x) and target.device == x.device and x.dim() >= 1
              and x.shape[-1] > 0 and target.shape == x.shape)
        if ok:
            x, target = _autocast_up(x.device.type, x, target, upcasting=_LOG_SOFTMAX_UPCAST)
            ok = x.dtype in _FLOATS and target.dtype == x.dtype
        if not ok:
            return original(self, x, target)
        k = x.shape[-1]
        return _lf.cross_entropy(x.reshape(-1, k), target.reshape(-1, k), reduction="mean")

    return forward


# ---------------------------------------------------------------------------------------------
# Probes: before replacing a function, patch() checks on small float64 examples that the
# replacement computes what the installed original computes (losses and gradients), so a new
# release of a library that changes a formula is left unpatched (with a warning), never
# silently served with the old formula.


def _probe_data():
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(5, 7, generator=g, dtype=torch.float64) * 2
    t = torch.randint(0, 7, (5,), generator=g)
    t[1] = -100
    soft = torch.rand(5, 7, generator=g, dtype=torch.float64)
    w = torch.rand(7, generator=g, dtype=torch.float64) + 0.5
    seq = torch.randn(2, 4, 7, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 7, (2, 4), generator=g)
    labels[0, 2:] = -100
    labels[1, 1] = -3  # below 0, not ignore_index
    return x, t, soft, w, seq, labels


def _outputs(fn, x, *args):
    x = x.detach().clone().requires_grad_()
    loss = fn(x, *args)
    loss.sum().backward()
    return loss.detach(), x.grad


def _agree(original, replacement, x, *args, tol=1e-6):
    a, ga = _outputs(original, x, *args)
    b, gb = _outputs(replacement, x, *args)
    return (a.dtype == b.dtype and a.shape == b.shape and torch.allclose(a, b, rtol=tol, atol=1e-9)
            and torch.allclose(ga, gb, rtol=tol, atol=1e-9))


def _probe_ce(orig, repl, owner):
    x, t, soft, w, _, _ = _probe_data()
    return all(_agree(lambda z, *a: orig(z, *a, **kw), lambda z, *a: repl(z, *a, **kw), x, tgt)
               for tgt, kw in ((t, dict(label_smoothing=0.1)), (t, dict(weight=w, reduction="sum")),
                               (t, dict(reduction="none", label_smoothing=0.2)),
                               (soft, dict(label_smoothing=0.1))))


def _probe_bce(orig, repl, owner):
    x, _, soft, w, _, _ = _probe_data()
    return all(_agree(lambda z, *a: orig(z, *a, **kw), lambda z, *a: repl(z, *a, **kw), x, soft)
               for kw in ({}, dict(weight=w, pos_weight=w.flip(0)), dict(reduction="none")))


def _probe_module(kwargs, soft_target):
    def probe(orig, repl, owner):
        x, t, soft, w, _, _ = _probe_data()
        inst = owner(**{k: (w if v == "w" else v) for k, v in kwargs.items()})
        return _agree(lambda z, y: orig(inst, z, y), lambda z, y: repl(inst, z, y), x,
                      soft if soft_target else t)
    return probe


def _probe_label_smoother(orig, repl, owner):
    _, _, _, _, seq, labels = _probe_data()
    inst = owner(epsilon=0.1)
    # the original sums its smoothing term in float32, even for float64 logits
    return all(_agree(lambda z, y: orig(inst, {"logits": z}, y, shift, n),
                      lambda z, y: repl(inst, {"logits": z}, y, shift, n), seq, labels, tol=1e-5)
               for shift in (False, True) for n in (None, 5))


def _probe_fixed_ce(orig, repl, owner):
    x, t, _, _, _, _ = _probe_data()
    return all(_agree(lambda z, y: orig(z, y, n), lambda z, y: repl(z, y, n), x, t) for n in (None, 4))


def _probe_timm(soft_target):
    def probe(orig, repl, owner):
        x, t, soft, _, _, _ = _probe_data()
        t = t.clamp(min=0)
        inst = owner() if soft_target else owner(0.1)
        return _agree(lambda z, y: orig(inst, z, y), lambda z, y: repl(inst, z, y), x,
                      soft if soft_target else t)
    return probe


# ---------------------------------------------------------------------------------------------
# Targets: (group, name, module to import, attribute path, replacement factory, probe)

PATCH_TARGETS = (
    ("functional", "torch.nn.functional.cross_entropy", "torch.nn.functional", ("cross_entropy",),
     _make_cross_entropy, _probe_ce),
    ("functional", "torch.nn.functional.binary_cross_entropy_with_logits", "torch.nn.functional",
     ("binary_cross_entropy_with_logits",), _make_bce, _probe_bce),
    ("modules", "torch.nn.CrossEntropyLoss.forward", "torch.nn", ("CrossEntropyLoss", "forward"),
     _make_ce_module_forward, _probe_module(dict(weight="w", label_smoothing=0.1), False)),
    ("modules", "torch.nn.BCEWithLogitsLoss.forward", "torch.nn", ("BCEWithLogitsLoss", "forward"),
     _make_bce_module_forward, _probe_module(dict(pos_weight="w"), True)),
    ("transformers", "transformers.trainer_pt_utils.LabelSmoother.__call__",
     "transformers.trainer_pt_utils", ("LabelSmoother", "__call__"), _make_label_smoother_call,
     _probe_label_smoother),
    ("transformers", "transformers.loss.loss_utils.fixed_cross_entropy", "transformers.loss.loss_utils",
     ("fixed_cross_entropy",), _make_fixed_cross_entropy, _probe_fixed_ce),
    ("timm", "timm.loss.LabelSmoothingCrossEntropy.forward", "timm.loss.cross_entropy",
     ("LabelSmoothingCrossEntropy", "forward"), _make_timm_label_smoothing_forward, _probe_timm(False)),
    ("timm", "timm.loss.SoftTargetCrossEntropy.forward", "timm.loss.cross_entropy",
     ("SoftTargetCrossEntropy", "forward"), _make_timm_soft_target_forward, _probe_timm(True)),
)


class PatchHandle:
    """What one patch() call replaced. undo() (or leaving the `with` block) restores exactly
    those replacements; a later or earlier patch() keeps its own."""

    def __init__(self, names):
        self.names = tuple(names)

    def undo(self):
        with _lock:
            for name in reversed(self.names):
                _restore(name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.undo()
        return False

    def __repr__(self):
        return f"PatchHandle({list(self.names)!r})"


def _restore(name):
    record = _active.pop(name, None)
    if record is not None:
        owner, attr, original, replacement = record
        if vars(owner).get(attr) is not replacement:
            warnings.warn(f"labelsmooth_ext.unpatch: {name} was replaced by someone else after "
                          f"patch(); leaving their replacement in place", stacklevel=3)
            return
        if original is _INHERITED:
            delattr(owner, attr)
        else:
            setattr(owner, attr, original)


def _import_owner(module_name, path):
    top = module_name.split(".")[0]
    if importlib.util.find_spec(top) is None:
        return None  # library not installed: skipped silently
    try:
        obj = importlib.import_module(module_name)
    except Exception as e:  # installed but broken: say so, patch the rest
        warnings.warn(f"labelsmooth_ext.patch: {module_name} could not be imported ({e}); "
                      f"not patching it", stacklevel=3)
        return None
    for part in path[:-1]:
        obj = getattr(obj, part, None)
        if obj is None or not hasattr(obj, path[-1]):
            return None
    return obj if hasattr(obj, path[-1]) else None


def _probe_passes(name, probe, original, replacement, owner):
    try:
        with torch.autocast("cpu", enabled=False), torch.enable_grad():
            ok = probe(original, replacement, owner)
    except Exception as e:  # noqa: BLE001 (a probe that cannot run: do not patch)
        ok, why = False, f"the check raised {type(e).__name__}: {e}"
    else:
        why = "its result differs from the original's on a small float64 example"
    if not ok:
        warnings.warn(f"labelsmooth_ext.patch: not patching {name}: {why} (a library version "
                      f"whose formula we do not reproduce?)", stacklevel=4)
    return ok


def patch(functional=True, modules=True, transformers=True, timm=True):
    """Make existing code use the fused loss: see this module's docstring for what is replaced.
    Libraries that are not installed are skipped. Patching twice is harmless (nothing is wrapped
    twice). Returns a PatchHandle: a context manager, handle.undo() restores what this call
    replaced; labelsmooth_ext.unpatch() restores everything."""
    groups = {"functional": functional, "modules": modules, "transformers": transformers,
              "timm": timm}
    done = []
    with _lock:
        for group, name, module_name, path, factory, probe in PATCH_TARGETS:
            if not groups[group] or name in _active:
                continue
            owner = _import_owner(module_name, path)
            if owner is None:
                continue
            attr = path[-1]
            # a class's own attribute (not a bound or inherited lookup), so undo puts back exactly it
            original = vars(owner).get(attr, _INHERITED) if isinstance(owner, type) else getattr(owner, attr)
            current = getattr(owner, attr) if original is _INHERITED else original
            replacement = factory(current)
            if not _probe_passes(name, probe, current, replacement, owner):
                continue
            setattr(owner, attr, replacement)
            _active[name] = (owner, attr, original, replacement)
            done.append(name)
    return PatchHandle(done)


def unpatch():
    """Undo every patch() still in effect."""
    with _lock:
        for name in reversed(list(_active)):
            _restore(name)


def patched():
    """The names of the functions and methods currently routed to labelsmooth_ext."""
    return list(_active)
