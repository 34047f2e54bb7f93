"""Tensor parallel: the label-smoothed cross-entropy of logits sharded by vocabulary across ranks.

Each rank of a tensor-parallel group holds a contiguous slice of the classes (ranks in group
order, slices of any size, including 0). The loss equals ``cross_entropy`` of the concatenated
logits on every rank, with the *global* number of classes in the smoothing term (both smoothing
modes), and each rank's gradient is its slice of the single-process gradient.

How (per call):

1. A metadata exchange (one all-gather of 17 int64 per rank): slice sizes (hence offsets and
   the global K), row shapes, dtypes, options, the target's range and fingerprint, the
   vocab_sizes given. Every rank checks the gathered facts the same way, so bad input raises on
   *every* rank, never a hang. A local error (a wrong argument on one rank) is reported through
   the same exchange. It runs on the host (torch.compiler.disable'd); under torch.compile,
   vocab_sizes= replaces it (check_vocab_parallel runs the checks eagerly).
2. The local pass, fused: the vocab_parallel_stats operator reads each row of the slice once
   and gives the local max, the sum of exponentials relative to it, the linear sum the
   smoothing term needs, the target logit and weight where the target is local (softcap applied
   while loading).
3. One collective of O(N) numbers: an all-gather of the partials merged locally ("allgather",
   the default), or an all-reduce(max) followed by an all-reduce(sum) ("allreduce").
4. The gradient of the local slice: the vocab_parallel_grad operator reads the slice once more
   and writes the gradient once (p_c = exp(z_c - lse) with the global lse), in the forward;
   the backward scales it by the incoming gradient, as ``labelsmooth_ext.cross_entropy`` does.

Communication per rank is O(N), never O(N x K). The collectives are
``torch.distributed._functional_collectives`` calls on the given group, so with vocab_sizes the
whole loss traces under torch.compile(fullgraph=True).
"""
import math
import struct

import torch
import torch.distributed as dist

from . import _ops
from . import functional as _F
from .reference import smoothing_coefficients

__all__ = ["vocab_parallel_cross_entropy", "vocab_parallel_linear_cross_entropy",
           "check_vocab_parallel", "set_collective_strategy"]

_STRATEGIES = ("allgather", "allreduce")
_strategy = "allgather"
_local_pass = "fused"


def set_local_pass(kind: str) -> None:
    """Benchmarks and tests only: "fused" (the default: the vocab_parallel_stats and
    vocab_parallel_grad operators, one read of the slice before the collective and one read +
    one write after it) or "composite" (the former ATen-op local pass, several N x K_r
    temporaries)."""
    global _local_pass
    if kind not in ("fused", "composite"):
        raise ValueError(f"local pass must be 'fused' or 'composite', got {kind!r}")
    _local_pass = kind



# The public DTensor API (torch.distributed.tensor) arrived in torch 2.5.
DTENSOR_SUPPORTED = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)


def dtensor_api(*names):
    """DTensor classes by name: torch.distributed.tensor (torch >= 2.5), else the private
    torch.distributed._tensor that torch 2.4 has them in."""
    try:
        import torch.distributed.tensor as mod

        getattr(mod, names[0])
    except (ImportError, AttributeError):
        import torch.distributed._tensor as mod
    return tuple(getattr(mod, n) for n in names)

def set_collective_strategy(strategy: str) -> None:
    """How the per-row partials are combined: "allgather" (one all-gather of ~4N numbers,
    merged locally; the default) or "allreduce" (an all-reduce(max) of N numbers, then an
    all-reduce(sum) of ~3N). Both are exact; bench/bench_distributed.py times them."""
    global _strategy
    if strategy not in _STRATEGIES:
        raise ValueError(f"strategy must be one of {_STRATEGIES}, got {strategy!r}")
    _strategy = strategy


_FLOAT_CODES = {torch.float32: 1, torch.float64: 2, torch.float16: 3, torch.bfloat16: 4}
_ERR_TYPES = {1: ValueError, 2: TypeError, 3: IndexError, 4: RuntimeError}
_ERR_CODES = {ValueError: 1, TypeError: 2, IndexError: 3}


class _Config:
    """Everything the local pass needs besides tensors (one object: autograd.Function args)."""

    __slots__ = ("group", "world", "start", "sizes", "num_classes", "a", "b", "z_loss", "softcap",
                 "ignore_index", "reduction", "strategy", "need_grad", "weighted",
                 "denominator_groups", "checked")

    def __init__(self, **kw):
        for k, v in kw.items():
            setattr(self, k, v)


# ----------------------------------------------------------------------------- argument checks

def _float_bits(x):
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def _check_local(local_logits, target, weight, ignore_index, reduction, label_smoothing,
                 smoothing_mode, z_loss, softcap):
    """Checks that need no other rank. Raises ValueError / TypeError naming the argument."""
    _F.check_reduction(reduction)
    _F.check_smoothing_mode(smoothing_mode)
    _F.check_label_smoothing(label_smoothing)
    if not isinstance(local_logits, torch.Tensor):
        raise TypeError(f"local_logits must be a torch.Tensor, got {type(local_logits).__name__}")
    if local_logits.dtype not in _FLOAT_CODES:
        raise TypeError(f"local_logits must be a floating tensor (float32, float64, float16 or "
                        f"bfloat16), got {local_logits.dtype}")
    if local_logits.dim() == 0:
        raise ValueError("local_logits must have at least 1 dimension (classes), got a 0-d tensor")
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if target.is_floating_point() or target.dtype == torch.bool or target.is_complex():
        raise TypeError(f"target must hold global class indices (an integer dtype), got "
                        f"{target.dtype}; probability targets are not supported in tensor parallel")
    if target.device != local_logits.device:
        raise ValueError(f"target is on {target.device} but local_logits is on {local_logits.device}")
    expected = _F._expected_target_shape(local_logits)
    if tuple(target.shape) != expected:
        raise ValueError(f"target shape {tuple(target.shape)} does not match local_logits shape "
                         f"{tuple(local_logits.shape)}: it must be {expected}")
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    try:
        zl = float(z_loss)
    except (TypeError, ValueError):
        raise TypeError(f"z_loss must be a float, got {z_loss!r}") from None
    if not math.isfinite(zl) or zl < 0:
        raise ValueError(f"z_loss must be a finite number >= 0, got {z_loss!r}")
    if softcap is not None:
        try:
            sc = float(softcap)
        except (TypeError, ValueError):
            raise TypeError(f"softcap must be a float or None, got {softcap!r}") from None
        if not math.isfinite(sc) or sc <= 0:
            raise ValueError(f"softcap must be a finite number > 0 or None, got {softcap!r}")
    if weight is not None:
        if not isinstance(weight, torch.Tensor):
            raise TypeError(f"weight must be a torch.Tensor or None, got {type(weight).__name__}")
        if weight.dim() != 1:
            raise ValueError(f"weight must be a 1-d tensor (the full class-weight vector or this "
                             f"rank's slice), got shape {tuple(weight.shape)}")
        if weight.dtype != local_logits.dtype:
            raise TypeError(f"weight dtype {weight.dtype} must match the local_logits dtype "
                            f"{local_logits.dtype}")
        if weight.device != local_logits.device:
            raise ValueError(f"weight is on {weight.device} but local_logits is on {local_logits.device}")


_META_FIELDS = ("error", "classes", "rows", "shape_hash", "dtype", "reduction", "smoothing_mode",
                "ignore_index", "label_smoothing", "z_loss", "softcap", "weight_len", "tgt_min",
                "tgt_max", "tgt_fingerprint", "tgt_checked", "vocab_sizes")
_NO_TARGET = 2 ** 62


def _target_facts(target, ignore_index):
    """(min, max, fingerprint) of the non-ignored targets; the fingerprint detects targets that
    differ across ranks (a position-weighted sum, wrapping in int64)."""
    t = target.reshape(-1).long()
    valid = t != ignore_index
    if not bool(valid.any()):
        tmin = tmax = _NO_TARGET
    else:
        tmin, tmax = int(t[valid].min()), int(t[valid].max())
    pos = torch.arange(t.numel(), device=t.device, dtype=torch.long)
    fp = int(((t + 7) * ((pos * 2654435761) % 1000000007 + 1)).sum()) if t.numel() else 0
    return tmin, tmax, fp


def _local_meta(local_logits, target, weight, ignore_index, reduction, label_smoothing,
                smoothing_mode, z_loss, softcap, err_code, check_targets):
    m = dict.fromkeys(_META_FIELDS, 0)
    m["error"] = err_code
    if err_code:
        return m
    class_dim = 0 if local_logits.dim() == 1 else 1
    m["classes"] = local_logits.shape[class_dim]
    rest = tuple(s for i, s in enumerate(local_logits.shape) if i != class_dim)
    m["rows"] = math.prod(rest)
    m["shape_hash"] = hash((local_logits.dim(),) + rest)
    m["dtype"] = _FLOAT_CODES[local_logits.dtype]
    m["reduction"] = _F.REDUCTIONS[reduction]
    m["smoothing_mode"] = _F.SMOOTHING_MODES[smoothing_mode]
    m["ignore_index"] = ignore_index
    m["label_smoothing"] = _float_bits(label_smoothing)
    m["z_loss"] = _float_bits(z_loss)
    m["softcap"] = _float_bits(0.0 if softcap is None else softcap)
    m["weight_len"] = -1 if weight is None else weight.shape[0]
    if check_targets:
        m["tgt_min"], m["tgt_max"], m["tgt_fingerprint"] = _target_facts(target, ignore_index)
        m["tgt_checked"] = 1
    return m


def _comm_device(group, local_logits):
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend:
        if isinstance(local_logits, torch.Tensor) and local_logits.is_cuda:
            return local_logits.device
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _raise_reported(group, world, metas, message, exc_type):
    """Every rank got here with the same gathered metas: exchange the messages of the ranks that
    found a local error and raise the same exception type everywhere."""
    msgs = [None] * world
    dist.all_gather_object(msgs, message, group=group)
    bad = [(r, msgs[r]) for r in range(world) if metas[r]["error"]]
    first = metas[bad[0][0]]["error"]
    text = "; ".join(f"rank {r}: {m}" for r, m in bad)
    raise _ERR_TYPES.get(first, RuntimeError)(
        f"vocab_parallel_cross_entropy: bad input on {len(bad)} of {world} ranks ({text})")


def _check_gathered(metas, rank, world):
    """Cross-rank checks on the gathered metadata. Identical on every rank."""
    def differ(field):
        vals = [m[field] for m in metas]
        return None if len(set(vals)) == 1 else vals

    rows = differ("rows")
    if rows is not None or differ("shape_hash") is not None:
        raise ValueError(
            "vocab_parallel_cross_entropy: the local_logits slices do not add up: every rank must "
            "hold the same rows (all dimensions but the class one) and only its own slice of the "
            f"classes; rows per rank: {[m['rows'] for m in metas]}, classes per rank: "
            f"{[m['classes'] for m in metas]}")
    names = {1: "float32", 2: "float64", 3: "float16", 4: "bfloat16"}
    dt = differ("dtype")
    if dt is not None:
        raise TypeError(f"vocab_parallel_cross_entropy: local_logits dtypes differ across ranks: "
                        f"{[names[d] for d in dt]}")
    for field in ("reduction", "smoothing_mode", "ignore_index", "label_smoothing", "z_loss",
                  "softcap"):
        if differ(field) is not None:
            raise ValueError(f"vocab_parallel_cross_entropy: {field} differs across ranks; every "
                             "rank must pass the same options")
    k = sum(m["classes"] for m in metas)
    wl = [m["weight_len"] for m in metas]
    if (min(wl) < 0) != (max(wl) < 0):
        raise ValueError(f"vocab_parallel_cross_entropy: weight is given on some ranks and not on "
                         f"others (weight lengths per rank: {wl}, -1 = None)")
    if wl[0] >= 0:
        for r, m in enumerate(metas):
            if wl[r] not in (k, m["classes"]):
                raise ValueError(
                    f"vocab_parallel_cross_entropy: weight on rank {r} has {wl[r]} entries; it "
                    f"must be the full class-weight vector ({k} = the global number of classes) "
                    f"or that rank's slice ({m['classes']})")
    if all(m["tgt_checked"] for m in metas):
        if differ("tgt_fingerprint") is not None or differ("tgt_min") is not None \
                or differ("tgt_max") is not None:
            raise ValueError("vocab_parallel_cross_entropy: target differs across ranks; every "
                             "rank must pass the same global class indices")
        tmin, tmax = metas[0]["tgt_min"], metas[0]["tgt_max"]
        if tmin != _NO_TARGET and (tmin < 0 or tmax >= k):
            bad = tmin if tmin < 0 else tmax
            raise IndexError(
                f"vocab_parallel_cross_entropy: target {bad} is out of range for {k} classes (the "
                f"global number, summed over {world} ranks); valid targets are 0..{k - 1} or "
                f"ignore_index={metas[0]['ignore_index']}")
    return k


_EXCHANGE_REASON = (
    "labelsmooth_ext.distributed: the metadata exchange (every rank's slice size, shapes, dtypes, "
    "options and target range, checked on the host so that bad input raises on every rank) "
    "cannot be traced; for torch.compile(fullgraph=True) pass vocab_sizes=(the slice size of "
    "every rank), and run check_vocab_parallel(...) eagerly to keep the cross-rank checks")


def _disable(fn):
    try:
        return torch.compiler.disable(fn, reason=_EXCHANGE_REASON)
    except TypeError:  # torch < 2.7: no reason argument
        return torch.compiler.disable(fn)


@_disable
def _exchange_and_check(local_logits, target, group, rank, world, weight, ignore_index, reduction,
                        label_smoothing, smoothing_mode, z_loss, softcap, vocab_sizes,
                        pre_error=None):
    """The metadata exchange and every check (local and cross-rank), eagerly. Returns (the slice
    sizes of every rank, the global number of classes); raises the same error on every rank.
    pre_error: a ValueError / TypeError a caller's own local checks found on this rank (reported
    through the same exchange)."""
    err, err_code = None, 0
    try:
        if pre_error is not None:
            raise pre_error
        _check_local(local_logits, target, weight, ignore_index, reduction, label_smoothing,
                     smoothing_mode, z_loss, softcap)
        vocab_sizes = _check_vocab_sizes(vocab_sizes, world)
    except (ValueError, TypeError) as e:
        if world == 1:
            raise
        err, err_code = str(e), _ERR_CODES[type(e)]
    meta = _local_meta(local_logits, target, weight, ignore_index, reduction, label_smoothing,
                       smoothing_mode, z_loss, softcap, err_code, check_targets=True)
    if not err_code:
        meta["vocab_sizes"] = -1 if vocab_sizes is None else hash(tuple(vocab_sizes))
    if world == 1:
        metas = [meta]
    else:
        dev = _comm_device(group, local_logits)
        mine = torch.tensor([meta[f] for f in _META_FIELDS], dtype=torch.long, device=dev)
        allm = _all_gather(mine, group)
        rows = allm.view(world, len(_META_FIELDS)).tolist()
        metas = [dict(zip(_META_FIELDS, r)) for r in rows]
        if any(m["error"] for m in metas):
            _raise_reported(group, world, metas, err, None)
    k = _check_gathered(metas, rank, world)
    sizes = [m["classes"] for m in metas]
    if len({m["vocab_sizes"] for m in metas}) != 1:
        raise ValueError("vocab_parallel_cross_entropy: vocab_sizes differs across ranks; every "
                         "rank must pass the same slice sizes (or none)")
    if vocab_sizes is not None and list(vocab_sizes) != sizes:
        raise ValueError(f"vocab_parallel_cross_entropy: vocab_sizes={tuple(vocab_sizes)} but the "
                         f"ranks hold slices of {tuple(sizes)} classes")
    return sizes, k


def _check_vocab_sizes(vocab_sizes, world):
    if vocab_sizes is None:
        return None
    try:
        sizes = tuple(vocab_sizes)
    except TypeError:
        raise TypeError(f"vocab_sizes must be a sequence of ints (the slice size of every rank), "
                        f"got {vocab_sizes!r}") from None
    if len(sizes) != world or any(not isinstance(v, int) or isinstance(v, bool) or v < 0
                                  for v in sizes):
        raise ValueError(f"vocab_sizes must hold {world} ints >= 0 (the slice size of every rank "
                         f"of the group, in group order), got {vocab_sizes!r}")
    return sizes


def _resolve_group(group):
    """(group, rank, world). No process group initialised and group=None: one process."""
    if group is None and not (dist.is_available() and dist.is_initialized()):
        return None, 0, 1
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("vocab_parallel_cross_entropy: a group was given but torch.distributed "
                           "is not initialised (call torch.distributed.init_process_group first)")
    if group is None:
        group = dist.group.WORLD
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("vocab_parallel_cross_entropy: this process is not a member of `group`")
    return group, rank, dist.get_world_size(group)


# ----------------------------------------------------------------------------- public entry

def vocab_parallel_cross_entropy(local_logits, target, group=None, *, weight=None,
                                 ignore_index=-100, reduction="mean", label_smoothing=0.0,
                                 smoothing_mode="uniform", z_loss=0.0, softcap=None,
                                 vocab_sizes=None):
    """Cross-entropy of logits split by class across the ranks of ``group``.

    local_logits: this rank's contiguous slice of the classes, (N, K_r), (N, K_r, d1, ...) or
        (K_r,); ranks hold consecutive slices in group order; sizes may differ (0 allowed).
    target: global class indices, the same on every rank, shaped like the input without the
        class dimension.
    group: a torch.distributed process group (default: the world). With no process group
        initialised and group=None, the call is a single-process loss (K_r = K).
    weight: the full class-weight vector (length K) or this rank's slice (length K_r); either
        is accepted (when K_r = K they are the same thing).
    z_loss, softcap: as in issue 11 / shared semantics: each non-ignored row gets z_loss * lse^2
        ('mean' divides it by the same denominator), and every logit becomes
        softcap * tanh(logit / softcap) before anything else.

    vocab_sizes: the slice size of every rank of the group, in group order (optional). Eagerly
        it is checked against the slices the ranks hold. Under torch.compile it replaces the
        metadata exchange, which cannot be traced: with it, torch.compile(fullgraph=True)
        traces the whole loss (the O(N) collective included); the cross-rank checks are then
        not made in the graph (run check_vocab_parallel eagerly, e.g. on the first batch), and
        a target outside the global range gives a NaN loss and gradient for its row.

    Returns the loss (the same value on every rank; for reduction='none' the per-row losses).
    Its gradient with respect to local_logits is this rank's slice of the full gradient.
    """
    return _vocab_parallel(local_logits, target, group, weight, ignore_index, reduction,
                           label_smoothing, smoothing_mode, z_loss, softcap, (), vocab_sizes)


def check_vocab_parallel(local_logits, target, group=None, *, weight=None, ignore_index=-100,
                         reduction="mean", label_smoothing=0.0, smoothing_mode="uniform",
                         z_loss=0.0, softcap=None, vocab_sizes=None):
    """Every check vocab_parallel_cross_entropy makes eagerly (one all-gather of a few int64 per
    rank; the same error on every rank), without computing the loss. Returns the slice sizes
    of every rank: the vocab_sizes to pass to a compiled vocab_parallel_cross_entropy. Call it
    outside torch.compile."""
    _, rank, world = _resolve_group(group)
    group = _resolve_group(group)[0]
    sizes, k = _exchange_and_check(local_logits, target, group, rank, world, weight, ignore_index,
                                   reduction, label_smoothing, smoothing_mode, z_loss, softcap,
                                   vocab_sizes)
    _check_off_target(smoothing_mode, k, label_smoothing)
    return tuple(sizes)


def _check_off_target(smoothing_mode, k, label_smoothing):
    eps = float(label_smoothing)
    if smoothing_mode == "off_target" and k == 1 and eps > 0:
        raise ValueError("smoothing_mode='off_target' needs at least 2 classes when "
                         f"label_smoothing > 0 (got 1 class in all, label_smoothing={eps})")


def _vocab_parallel(local_logits, target, group, weight, ignore_index, reduction, label_smoothing,
                    smoothing_mode, z_loss, softcap, denominator_groups, vocab_sizes=None):
    group, rank, world = _resolve_group(group)
    if world == 1 and vocab_sizes is None and isinstance(local_logits, torch.Tensor) \
            and local_logits.dim() > 0:
        vocab_sizes = (local_logits.shape[0 if local_logits.dim() == 1 else 1],)
    if torch.compiler.is_compiling() and vocab_sizes is not None:
        vocab_sizes = _check_vocab_sizes(vocab_sizes, world)
        # Traced: no host-side exchange. The local checks run at trace time; a target outside
        # the global range poisons its row (NaN loss and gradient) on the device instead of
        # raising; cross-rank consistency is what check_vocab_parallel checks eagerly.
        _check_local(local_logits, target, weight, ignore_index, reduction, label_smoothing,
                     smoothing_mode, z_loss, softcap)
        sizes = list(vocab_sizes)
        class_dim = 0 if local_logits.dim() == 1 else 1
        if local_logits.shape[class_dim] != sizes[rank]:
            raise ValueError(f"vocab_parallel_cross_entropy: local_logits holds "
                             f"{local_logits.shape[class_dim]} classes but vocab_sizes[{rank}] = "
                             f"{sizes[rank]} (vocab_sizes={tuple(sizes)})")
        k, checked = sum(sizes), False
    else:
        sizes, k = _exchange_and_check(local_logits, target, group, rank, world, weight,
                                       ignore_index, reduction, label_smoothing, smoothing_mode,
                                       z_loss, softcap, vocab_sizes)
        checked = True
    _check_off_target(smoothing_mode, k, label_smoothing)
    a, b = smoothing_coefficients(k, float(label_smoothing), smoothing_mode)
    start = sum(sizes[:rank])
    kr = sizes[rank]
    if weight is not None:
        weight = weight.detach()
        if weight.shape[0] == k and k != kr:
            weight = weight[start:start + kr]
    cfg = _Config(group=group, world=world, start=start, sizes=sizes, num_classes=k, a=a, b=b,
                  z_loss=float(z_loss), softcap=None if softcap is None else float(softcap),
                  ignore_index=ignore_index, reduction=_F.REDUCTIONS[reduction],
                  strategy=_strategy, need_grad=local_logits.requires_grad and torch.is_grad_enabled(),
                  weighted=weight is not None, denominator_groups=tuple(denominator_groups),
                  checked=checked)
    if local_logits.dim() == 1:
        rows = local_logits.unsqueeze(0)
    elif local_logits.dim() == 2:
        rows = local_logits
    else:  # (N, K_r, d1, ...) -> (N d1 ..., K_r); explicit row count: K_r may be 0
        rows = local_logits.movedim(1, -1).reshape(target.numel(), kr)
    loss = _VocabParallelCE.apply(rows, target.reshape(-1).long(), weight, cfg)
    if cfg.reduction == _F.REDUCTIONS["none"]:
        loss = loss.reshape(target.shape)
    return loss


# ----------------------------------------------------------------------------- the local pass

def _wait(t):
    # Traced, a functional collective's result is already waited on (and torch 2.4's dynamo
    # cannot trace hasattr on a tensor); eagerly it is an AsyncCollectiveTensor to wait for.
    if torch.compiler.is_compiling():
        return t
    return t.wait() if hasattr(t, "wait") else t


def _all_gather(t, group):
    """The ranks' t concatenated along dim 0: all_gather_single (all_gather_tensor, which newer
    torch deprecates in its favour, on torch 2.4, which has only that)."""
    from torch.distributed import _functional_collectives as funcol

    fn = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor
    return _wait(fn(t, 0, group))


def _local_partials(z, tgt, w, cfg):
    """Per row: m (local max, -inf for an empty slice), m_safe (m, or 0 where m = -inf),
    e = exp(z - m_safe), s = sum e, zy (target logit where it is local, else 0), lin =
    sum_c w_c (z_c - m_safe), wy (target weight where local, else 0), here (target is local)."""
    r, kr = z.shape
    valid = tgt != cfg.ignore_index
    local_t = tgt - cfg.start
    here = valid & (local_t >= 0) & (local_t < kr)
    idx = torch.where(here, local_t, torch.zeros_like(local_t)).unsqueeze(1)
    if kr == 0:
        zeros = z.new_zeros(r)
        return dict(m=torch.full_like(zeros, -math.inf), m_safe=zeros, e=z.new_empty(r, 0),
                    s=zeros, zy=zeros, lin=zeros if cfg.a != 0.0 else None,
                    wy=zeros if w is not None else None, here=here, idx=idx, valid=valid,
                    wsum=z.new_zeros(()))
    m = z.amax(dim=1)
    m_safe = torch.where(m == -math.inf, torch.zeros_like(m), m)
    e = torch.exp(z - m_safe.unsqueeze(1))
    s = e.sum(dim=1)
    zero = z.new_zeros(())
    zy = torch.where(here, z.gather(1, idx).squeeze(1), zero)
    if w is not None:
        wsum = w.sum()
        lin = (z @ w - wsum * m_safe) if cfg.a != 0.0 else None
        wy = torch.where(here, w[idx.squeeze(1)], zero)
    else:
        wsum = z.new_tensor(float(kr))
        lin = (z.sum(dim=1) - kr * m_safe) if cfg.a != 0.0 else None
        wy = None
    return dict(m=m, m_safe=m_safe, e=e, s=s, zy=zy, lin=lin, wy=wy, here=here, idx=idx,
                valid=valid, wsum=wsum)


def _combine(p, cfg):
    """Global per-row (M, S, ZY, LIN, WY) and the global weight sum W, by one collective
    (allgather) or two (allreduce); O(N) numbers per rank."""
    from torch.distributed import _functional_collectives as funcol

    m, s, zy, lin, wy = p["m"], p["s"], p["zy"], p["lin"], p["wy"]
    r = m.shape[0]
    if cfg.strategy == "allgather":
        parts = [m, s, zy] + ([lin] if lin is not None else []) + ([wy] if wy is not None else [])
        flat = torch.cat([torch.stack(parts).reshape(-1), p["wsum"].reshape(1)])
        g = _all_gather(flat, cfg.group).view(cfg.world, -1)
        c = len(parts)
        st = g[:, :c * r].view(cfg.world, c, r)
        wsums = g[:, c * r]
        ms = st[:, 0]
        big_m = ms.amax(dim=0)
        big_s = (st[:, 1] * torch.exp(ms - big_m)).sum(dim=0)
        big_zy = st[:, 2].sum(dim=0)
        j = 3
        big_lin = None
        if lin is not None:
            ms_safe = torch.where(ms == -math.inf, torch.zeros_like(ms), ms)
            big_lin = (st[:, j] + wsums.unsqueeze(1) * (ms_safe - big_m)).sum(dim=0)
            j += 1
        big_wy = st[:, j].sum(dim=0) if wy is not None else None
        return big_m, big_s, big_zy, big_lin, big_wy, wsums.sum()
    big_m = _wait(funcol.all_reduce(m, "max", cfg.group))
    parts = [s * torch.exp(m - big_m), zy]
    if lin is not None:
        parts.append(lin + p["wsum"] * (p["m_safe"] - big_m))
    if wy is not None:
        parts.append(wy)
    flat = torch.cat([torch.stack(parts).reshape(-1), p["wsum"].reshape(1)])
    tot = _wait(funcol.all_reduce(flat, "sum", cfg.group))
    c = len(parts)
    st = tot[:c * r].view(c, r)
    big_lin = st[2] if lin is not None else None
    big_wy = st[c - 1] if wy is not None else None
    return big_m, st[0], st[1], big_lin, big_wy, tot[c * r]


def _forward(x, tgt, w, cfg):
    """(loss, grad or None) of the local rows x (R, K_r) in the input dtype: the fused local
    passes (vocab_parallel_stats before the collective, vocab_parallel_grad after it)."""
    if _local_pass == "composite":
        return _forward_composite(x, tgt, w, cfg)
    ops = _ops.ops
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    cap = 0.0 if cfg.softcap is None else cfg.softcap
    a, b = cfg.a, cfg.b
    # one read of the slice: (m, s, zy, lin, wy) per row, softcap applied while loading
    m, s, zy, lin, wy_local = ops.vocab_parallel_stats(x, tgt, w, cfg.start, cfg.ignore_index,
                                                       cap).unbind(0)
    if w is not None:
        wsum = w.to(acc).sum()
    else:
        wsum = torch.full((), float(x.shape[1]), dtype=acc, device=x.device)
    p = dict(m=m, m_safe=torch.where(m == -math.inf, torch.zeros_like(m), m), s=s, zy=zy,
             lin=lin if a != 0.0 else None, wy=wy_local if w is not None else None, wsum=wsum)
    if cfg.world > 1:
        big_m, big_s, big_zy, big_lin, big_wy, big_w = _combine(p, cfg)
    else:
        big_m, big_s, big_zy, big_lin, big_wy = m, s, zy, p["lin"], p["wy"]
        big_w = wsum
    valid = tgt != cfg.ignore_index
    zero = m.new_zeros(())
    row, lse, wy = _merged_row_loss(big_m, big_s, big_zy, big_lin, big_wy, big_w, valid, a, b, cfg.z_loss, acc)
    row = torch.where(valid, row, zero)
    if not cfg.checked:  # traced without the host checks: poison rows whose target is no class
        bad = valid & ((tgt < 0) | (tgt >= cfg.num_classes))
        row = torch.where(bad, torch.full_like(row, math.nan), row)
        lse = torch.where(bad, torch.full_like(lse, math.nan), lse)
    loss, denom = _reduce(row, valid, wy, cfg)
    grad = None
    if cfg.need_grad:
        # ce_grad_coefs with e_c = p_c = exp(z_c - lse): kp = (b w_y + a W + 2 c lse) * scale,
        # kw = a * scale, ky = b w_y * scale (scale = 1/D for the mean)
        scale = (1.0 / denom) if denom is not None else torch.ones((), dtype=acc, device=x.device)
        kp = (b * wy + a * big_w + 2.0 * cfg.z_loss * lse) * scale
        coefs = torch.stack([lse, kp, (a * scale).expand_as(lse), b * wy * scale])
        grad = ops.vocab_parallel_grad(x, tgt, w, coefs, cfg.start, cfg.ignore_index, cap)
    return loss.to(x.dtype), grad


def _reduce(row, valid, wy, cfg):
    """(loss, mean denominator or None) from the per-row losses."""
    red = cfg.reduction
    if red == _F.REDUCTIONS["mean"]:
        denom = torch.where(valid, wy, torch.zeros_like(wy)).sum()
        for g in cfg.denominator_groups:
            from torch.distributed import _functional_collectives as funcol
            denom = _wait(funcol.all_reduce(denom, "sum", g))
        return row.sum() / denom, denom
    if red == _F.REDUCTIONS["sum"]:
        return row.sum(), None
    return row, None


def _forward_composite(x, tgt, w, cfg):
    """The former local pass in ATen ops (several passes and N x K_r temporaries), kept as the
    benchmark's baseline and a cross-check of the fused one (set_local_pass)."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    z = x.to(acc)
    th = None
    if cfg.softcap is not None:
        th = torch.tanh(z / cfg.softcap)
        z = th * cfg.softcap
    wa = None if w is None else w.to(acc)
    p = _local_partials(z, tgt, wa, cfg)
    if cfg.world > 1:
        big_m, big_s, big_zy, big_lin, big_wy, big_w = _combine(p, cfg)
    else:
        big_m, big_s, big_zy, big_lin, big_wy, big_w = (p["m"], p["s"], p["zy"], p["lin"],
                                                       p["wy"], p["wsum"])
    valid = p["valid"]
    zero = z.new_zeros(())
    lse = big_m + torch.log(big_s)
    wy = big_wy if big_wy is not None else valid.to(acc)
    a, b = cfg.a, cfg.b
    row = b * wy * (lse - big_zy)
    if a != 0.0:
        row = row + a * (big_w * (lse - big_m) - big_lin)
    if cfg.z_loss:
        row = row + cfg.z_loss * lse * lse
    row = torch.where(valid, row, zero)
    red = cfg.reduction
    denom = None
    if red == _F.REDUCTIONS["mean"]:
        denom = torch.where(valid, wy, zero).sum()
        for g in cfg.denominator_groups:
            from torch.distributed import _functional_collectives as funcol
            denom = _wait(funcol.all_reduce(denom, "sum", g))
        loss = row.sum() / denom
    elif red == _F.REDUCTIONS["sum"]:
        loss = row.sum()
    else:
        loss = row
    grad = None
    if cfg.need_grad:
        e = p["e"]
        if e.shape[1] == 0:
            grad = x.new_zeros(x.shape)
        else:
            # p_c (b w_y + a W + 2 c lse) - b w_y [c = y] - a w_c, ignored rows exactly 0
            coef = torch.exp(p["m_safe"] - lse) * (b * wy + a * big_w + 2.0 * cfg.z_loss * lse)
            grad = e.mul_(coef.unsqueeze(1))
            if a != 0.0:
                grad.sub_(a * wa if wa is not None else z.new_tensor(a))
            hit = torch.where(p["here"], -b * wy, zero).unsqueeze(1)
            grad.scatter_add_(1, p["idx"], hit)
            if th is not None:
                grad.mul_(1.0 - th * th)
            if denom is not None:
                grad.div_(denom)
            grad = torch.where(valid.unsqueeze(1), grad, zero).to(x.dtype)
    return loss.to(x.dtype), grad


class _VocabParallelCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, tgt, w, cfg):
        loss, grad = _forward(x, tgt, w, cfg)
        ctx.reduction = cfg.reduction
        ctx.set_materialize_grads(False)
        if grad is not None:
            ctx.save_for_backward(grad)
        ctx.had_grad = grad is not None
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if grad_loss is None or not ctx.had_grad:
            return None, None, None, None
        (grad,) = ctx.saved_tensors
        if ctx.reduction == _F.REDUCTIONS["none"]:
            g = grad * grad_loss.reshape(-1, 1).to(grad.dtype)
        else:
            # As the single-process CPU backward: an incoming gradient of exactly 1 (checked on
            # the host, so CPU only; never when traced) hands the saved gradient over, no pass.
            if not grad.is_cuda and not _ops._traced(grad, grad_loss) \
                    and float(grad_loss) == 1.0 and not _ops._graph_kept():
                return grad, None, None, None
            g = grad * grad_loss.to(grad.dtype)
        return g, None, None, None


# ----------------------------------------------------------------------------- DTensor entry

def _dtensor_cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing,
                           smoothing_mode, z_loss=0.0, softcap=None):
    """labelsmooth_ext.cross_entropy on a DTensor sharded on the class dimension (the layout of
    torch.distributed.tensor.parallel.loss_parallel), returning a DTensor with its placements:
    'none' -> the target's placements; 'sum' and 'mean' -> Replicate on the class-sharding mesh
    dim, Partial on batch-sharded mesh dims, Replicate elsewhere. 'mean' divides by the global
    denominator (summed over the batch-sharded mesh dims), so it is the true mean on any mesh."""
    if not DTENSOR_SUPPORTED:
        raise RuntimeError(
            f"labelsmooth_ext.cross_entropy on a DTensor needs torch >= 2.5 (torch {torch.__version__} "
            "has only the private DTensor API, whose gradient placements differ); call "
            "labelsmooth_ext.distributed.vocab_parallel_cross_entropy on input.to_local() instead")
    DTensor, Partial, Replicate, Shard = dtensor_api("DTensor", "Partial", "Replicate", "Shard")

    _F.check_reduction(reduction)
    mesh, placements = input.device_mesh, tuple(input.placements)
    if input.dim() == 0:
        raise ValueError("input must have at least 1 dimension (classes), got a 0-d DTensor")
    class_dim = 0 if input.dim() == 1 else 1
    tp = [i for i, pl in enumerate(placements) if pl.is_shard(class_dim)]
    if len(tp) != 1:
        raise ValueError(f"cross_entropy on a DTensor needs exactly one mesh dimension sharding the "
                         f"class dimension {class_dim} (Shard({class_dim})), got placements "
                         f"{placements}")
    tp = tp[0]
    tgt_pl = []
    for i, pl in enumerate(placements):
        if i == tp or pl.is_replicate():
            tgt_pl.append(Replicate())
        elif pl.is_shard():
            d = pl.dim
            tgt_pl.append(Shard(d - 1 if d > class_dim else d))
        else:
            raise ValueError(f"cross_entropy on a DTensor: mesh dimension {i} must be Shard or "
                             f"Replicate besides the class-sharding one, got {pl}")
    tgt_pl = tuple(tgt_pl)
    if isinstance(target, DTensor):
        if tuple(target.placements) != tgt_pl:
            raise ValueError(f"target DTensor placements {tuple(target.placements)} must be "
                             f"{tgt_pl} for input placements {placements}")
        local_target = target.to_local()
    elif isinstance(target, torch.Tensor):
        if any(not pl.is_replicate() for pl in tgt_pl):
            raise ValueError(f"target must be a DTensor with placements {tgt_pl} when the input "
                             f"{placements} is also sharded on a batch dimension (a plain tensor "
                             "is accepted only when the target is replicated)")
        local_target = target
    else:
        raise TypeError(f"target must be a torch.Tensor or DTensor, got {type(target).__name__}")
    if isinstance(weight, DTensor):
        if any(not pl.is_replicate() for pl in weight.placements):
            raise ValueError(f"weight DTensor must be replicated, got {tuple(weight.placements)}")
        weight = weight.to_local()
    dgroups = tuple(mesh.get_group(i) for i, pl in enumerate(placements)
                    if i != tp and pl.is_shard())
    loss = _vocab_parallel(input.to_local(), local_target, mesh.get_group(tp), weight, ignore_index,
                           reduction, label_smoothing, smoothing_mode, z_loss, softcap, dgroups)
    if reduction == "none":
        out_pl = tgt_pl
        shape = tuple(s for i, s in enumerate(input.shape) if i != class_dim)
        return DTensor.from_local(loss, mesh, out_pl, run_check=False, shape=torch.Size(shape),
                                  stride=torch.empty(shape, device="meta").stride())
    out_pl = tuple(Replicate() if i == tp else (Partial() if pl.is_shard() else Replicate())
                   for i, pl in enumerate(placements))
    return DTensor.from_local(loss, mesh, out_pl, run_check=False)


# ----------------------------------------------------------------------------- fused linear

def _check_linear_local(input, w_out, b_out, target):
    """Checks of the linear layer's arguments that need no other rank (ValueError / TypeError
    naming the argument)."""
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
    if input.dtype not in _FLOAT_CODES:
        raise TypeError(f"input must be a floating tensor, got {input.dtype}")
    if input.dim() not in (2, 3):
        raise ValueError(f"input must be (N, H) or (B, T, H), got shape {tuple(input.shape)}")
    if not isinstance(w_out, torch.Tensor):
        raise TypeError(f"local_linear_weight must be a torch.Tensor, got {type(w_out).__name__}")
    if w_out.dim() != 2 or w_out.shape[1] != input.shape[-1]:
        raise ValueError(f"local_linear_weight must be (K_r, H) = (this rank's classes, "
                         f"{input.shape[-1]} = the input's last dimension), got shape "
                         f"{tuple(w_out.shape)}")
    if w_out.dtype != input.dtype:
        raise TypeError(f"local_linear_weight dtype {w_out.dtype} must match the input dtype "
                        f"{input.dtype}")
    if w_out.device != input.device:
        raise ValueError(f"local_linear_weight is on {w_out.device} but input is on {input.device}")
    if b_out is not None:
        if not isinstance(b_out, torch.Tensor):
            raise TypeError(f"local_linear_bias must be a torch.Tensor or None, got "
                            f"{type(b_out).__name__}")
        if tuple(b_out.shape) != (w_out.shape[0],):
            raise ValueError(f"local_linear_bias must be ({w_out.shape[0]},) = this rank's "
                             f"classes, got shape {tuple(b_out.shape)}")
        if b_out.dtype != input.dtype or b_out.device != input.device:
            raise TypeError(f"local_linear_bias ({b_out.dtype}, {b_out.device}) must match the "
                            f"input ({input.dtype}, {input.device})")
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if tuple(target.shape) != tuple(input.shape[:-1]):
        raise ValueError(f"target shape {tuple(target.shape)} must be the input shape without "
                         f"its last dimension, {tuple(input.shape[:-1])}")


def _tp_linear_loop(x, w_out, b_out, tgt, w, cfg, chunk, row_scale, need_grad):
    """The chunked pass over the rows of x (N, H): per chunk the local logits (one GEMM), the
    vocab_parallel_stats partials, the O(N) collective (_combine), the per-row losses and, when
    need_grad, the logits' gradient (vocab_parallel_grad) turned into d x (this rank's partial,
    not yet summed over the group), d W_r and d b_r by GEMMs. The gradients are unscaled (no
    1/D) unless row_scale (N,) multiplies each row's. Returns (row losses (N,) in the
    accumulation dtype, the mean's denominator, dx, dW, db)."""
    n, h = x.shape
    kr = w_out.shape[0]
    ops = _ops.ops
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    cap = 0.0 if cfg.softcap is None else cfg.softcap
    a, b = cfg.a, cfg.b
    rows = x.new_empty((n,), dtype=acc)
    denom = x.new_zeros((), dtype=acc)
    dx = dW = db = None
    if need_grad:
        dx = x.new_empty((n, h))
        dW = torch.zeros((kr, h), dtype=acc, device=x.device)
        db = torch.zeros((kr,), dtype=acc, device=x.device) if b_out is not None else None
    if w is not None:
        wsum = w.to(acc).sum()
    else:
        wsum = torch.full((), float(kr), dtype=acc, device=x.device)
    wt = w_out.t()
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        xc, tc = x[s:e], tgt[s:e]
        z = torch.addmm(b_out, xc, wt) if b_out is not None else torch.mm(xc, wt)
        m, ssum, zy, lin, wy_local = ops.vocab_parallel_stats(z, tc, w, cfg.start,
                                                              cfg.ignore_index, cap).unbind(0)
        p = dict(m=m, m_safe=torch.where(m == -math.inf, torch.zeros_like(m), m), s=ssum, zy=zy,
                 lin=lin if a != 0.0 else None, wy=wy_local if w is not None else None, wsum=wsum)
        if cfg.world > 1:
            big_m, big_s, big_zy, big_lin, big_wy, big_w = _combine(p, cfg)
        else:
            big_m, big_s, big_zy, big_lin, big_wy, big_w = m, ssum, zy, p["lin"], p["wy"], wsum
        valid = tc != cfg.ignore_index
        row, lse, wy = _merged_row_loss(big_m, big_s, big_zy, big_lin, big_wy, big_w, valid, a, b, cfg.z_loss,
                                        acc)
        zero = m.new_zeros(())
        rows[s:e] = torch.where(valid, row, zero)
        denom = denom + torch.where(valid, wy, zero).sum()
        if not need_grad:
            continue
        sc = row_scale[s:e].to(acc) if row_scale is not None else torch.ones_like(lse)
        kp = (b * wy + a * big_w + 2.0 * cfg.z_loss * lse) * sc
        coefs = torch.stack([lse, kp, a * sc, b * wy * sc])
        g = ops.vocab_parallel_grad(z, tc, w, coefs, cfg.start, cfg.ignore_index, cap)
        torch.mm(g, w_out, out=dx[s:e])
        ga = g.to(acc)
        dW.addmm_(ga.t(), xc.to(acc))
        if db is not None:
            db.add_(ga.sum(dim=0))
    return rows, denom, dx, dW, db


def _sum_over_group(t, cfg):
    if cfg.world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=cfg.group)
    return t


class _VocabParallelLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w_out, b_out, tgt, w, cfg, chunk):
        ctx.set_materialize_grads(False)
        ctx.cfg, ctx.chunk = cfg, chunk
        none = cfg.reduction == _F.REDUCTIONS["none"]
        need = cfg.need_grad
        rows, denom, dx, dW, db = _tp_linear_loop(x, w_out, b_out, tgt, w, cfg, chunk, None,
                                                  need and not none)
        if cfg.reduction == _F.REDUCTIONS["mean"]:
            loss = rows.sum() / denom
        elif cfg.reduction == _F.REDUCTIONS["sum"]:
            loss = rows.sum()
        else:
            loss = rows
        ctx.had_grad = need
        if need and none:  # the backward runs the chunk loop again with each row's gradient
            ctx.save_for_backward(x, w_out, b_out, tgt, w)
        elif need:
            if cfg.reduction == _F.REDUCTIONS["mean"]:
                inv = torch.where(denom != 0, 1.0 / denom, torch.zeros_like(denom))
                dW.mul_(inv)
                if db is not None:
                    db.mul_(inv)
                dx.mul_(inv.to(dx.dtype))
            _sum_over_group(dx, cfg)
            ctx.save_for_backward(dx, dW.to(w_out.dtype), None if db is None else db.to(w_out.dtype))
        return loss.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_loss):
        nones = (None,) * 4
        if grad_loss is None or not ctx.had_grad:
            return (None, None, None) + nones
        cfg = ctx.cfg
        if cfg.reduction == _F.REDUCTIONS["none"]:
            x, w_out, b_out, tgt, w = ctx.saved_tensors
            _, _, dx, dW, db = _tp_linear_loop(x, w_out, b_out, tgt, w, cfg, ctx.chunk,
                                               grad_loss.reshape(-1), True)
            _sum_over_group(dx, cfg)
            return (dx, dW.to(w_out.dtype), None if db is None else db.to(w_out.dtype)) + nones
        dx, dW, db = ctx.saved_tensors
        go = grad_loss.to(dx.dtype)
        return (dx * go, dW * go, None if db is None else db * go) + nones


def vocab_parallel_linear_cross_entropy(input, local_linear_weight, target, group=None, *,
                                        local_linear_bias=None, weight=None, ignore_index=-100,
                                        reduction="mean", label_smoothing=0.0,
                                        smoothing_mode="uniform", z_loss=0.0, softcap=None,
                                        chunk_size=None, vocab_sizes=None):
    """``vocab_parallel_cross_entropy(linear(input, W_r, b_r), ...)`` without the logits: the
    output layer is split by rows (classes) across the ranks of ``group``.

    input: (N, H) or (B, T, H), the same on every rank (replicated, as the input of a
        column-parallel layer). local_linear_weight: this rank's contiguous slice of the output
        layer's rows, (K_r, H); ranks hold consecutive slices in group order, sizes may differ
        (0 allowed). local_linear_bias: (K_r,) or None. target: global class indices, shaped
        like the input without its last dimension. weight (class weights, the full vector or
        this rank's slice), ignore_index, reduction, label_smoothing, smoothing_mode, z_loss,
        softcap, vocab_sizes: as in vocab_parallel_cross_entropy (the global K in the
        smoothing term). chunk_size: rows per chunk (None: from the shapes, as
        linear_cross_entropy).

    Per chunk of rows: the local logits (one GEMM), the fused local statistics, the O(N)
    collective, the fused local gradient, then GEMMs accumulate d input (this rank's partial),
    d W_r and d b_r; at the end one all-reduce (sum) of d input over the group. Only one chunk
    of logits exists at a time. The gradients are complete after the forward (the backward
    scales them by the incoming gradient); reduction='none' computes the losses only and the
    backward runs the chunk loop (and its collectives) again with each row's gradient.
    Eager only: the metadata exchange and the loop run on the host (no torch.compile support).

    Returns the loss (the same on every rank). The gradient of input is the full one (the same
    on every rank); that of local_linear_weight / local_linear_bias is this rank's slice.
    """
    from .linear import auto_chunk_size

    group, rank, world = _resolve_group(group)
    pre, proxy, tflat = None, None, None
    try:
        _check_linear_local(input, local_linear_weight, local_linear_bias, target)
        if chunk_size is not None and (not isinstance(chunk_size, int)
                                       or isinstance(chunk_size, bool) or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
        n = target.numel()
        # the exchange reads only shape, dtype and device of the logits: a stand-in of no memory
        proxy = input.new_empty(()).expand(n, local_linear_weight.shape[0])
        tflat = target.reshape(-1)
    except (ValueError, TypeError) as e:
        if world == 1:
            raise
        pre = e
    try:
        sizes, k = _exchange_and_check(proxy, tflat, group, rank, world, weight, ignore_index,
                                       reduction, label_smoothing, smoothing_mode, z_loss, softcap,
                                       vocab_sizes, pre_error=pre)
    except (ValueError, TypeError, IndexError) as e:  # the same on every rank: name this entry
        msg = str(e)
        if msg.startswith("vocab_parallel_cross_entropy:"):
            msg = "vocab_parallel_linear_cross_entropy:" + msg[len("vocab_parallel_cross_entropy:"):]
            raise type(e)(msg.replace("local_logits", "local logits (input @ local_linear_weight.T)")) from None
        raise
    _check_off_target(smoothing_mode, k, label_smoothing)
    a, b = smoothing_coefficients(k, float(label_smoothing), smoothing_mode)
    start, kr = sum(sizes[:rank]), sizes[rank]
    if weight is not None:
        weight = weight.detach()
        if weight.shape[0] == k and k != kr:
            weight = weight[start:start + kr]
    need = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (input, local_linear_weight, local_linear_bias))
    if world > 1:  # the gradient path has collectives: every rank must take it, or none
        flags = torch.tensor([int(need), int(not need)], dtype=torch.long,
                             device=_comm_device(group, input))
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group)
        if int(flags.min()) == 1:
            raise ValueError("vocab_parallel_linear_cross_entropy: a gradient is needed on some "
                             "ranks and not on others (requires_grad of input / "
                             "local_linear_weight / local_linear_bias, or torch.no_grad, differs "
                             "across ranks); every rank must take the same path")
    cfg = _Config(group=group, world=world, start=start, sizes=sizes, num_classes=k, a=a, b=b,
                  z_loss=float(z_loss), softcap=None if softcap is None else float(softcap),
                  ignore_index=ignore_index, reduction=_F.REDUCTIONS[reduction],
                  strategy=_strategy, need_grad=need, weighted=weight is not None,
                  denominator_groups=(), checked=True)
    x2 = input.reshape(-1, input.shape[-1])
    n = x2.shape[0]
    # two chunk buffers (the logits and their gradient, vocab_parallel_grad does not write in
    # place): linear_cross_entropy's automatic size for twice the classes keeps the same budget
    chunk = chunk_size or auto_chunk_size(n, 2 * kr, input.dtype, input.device)
    loss = _VocabParallelLinearCE.apply(x2, local_linear_weight, local_linear_bias,
                                        tflat.long(), weight, cfg, max(1, chunk))
    if cfg.reduction == _F.REDUCTIONS["none"]:
        loss = loss.reshape(target.shape)
    return loss


def _merged_row_loss(big_m, big_s, big_zy, big_lin, big_wy, big_w, valid, a, b, z_loss, acc):
    """Each row's loss from the merged statistics (row_math.h ce_row_loss, relative to the global
    max M: no large terms cancel), its lse and its target weight (valid rows 1 unweighted); ignored
    rows are masked by the caller."""
    log_s = torch.log(big_s)
    lse = big_m + log_s
    wy = big_wy if big_wy is not None else valid.to(acc)
    row = b * wy * (log_s - (big_zy - big_m))
    if a != 0.0:
        row = row + a * (big_w * log_s - big_lin)
    if z_loss:
        row = row + z_loss * lse * lse
    return row, lse, wy
