"""Fused linear + label-smoothed cross-entropy: the (tokens x vocabulary) logits are never held
in memory beyond one chunk of rows.

    loss = linear_cross_entropy(x, W, target, linear_bias=b, ...)
         == cross_entropy(linear(x, W, b), target, ...)

How (see docs/linear_ce.md): the rows are processed in chunks (on the CPU only the rows not
ignored). Per chunk one library GEMM (ATen mm/addmm: MKL/oneDNN on CPU, cuBLAS on CUDA) gives the
chunk's logits; the fused row kernel gives the chunk's losses and the logits' gradient g (on the
CPU labelsmooth_ext::ce_forward_grad_, which writes g, already scaled, over the logits: one chunk
buffer; elsewhere ce_forward_ext and a second buffer), then GEMMs accumulate d input = g W,
d W += g^T x and d b += sum of g's rows. The gradients are complete at the end of the forward;
the backward only multiplies them by the incoming gradient (nothing at all on the CPU when it is
exactly 1). For reduction="none" the backward needs the incoming gradient of every row before
the weight gradient can be formed: the forward then computes the losses only and the backward
runs the chunk loop again.

The whole forward is one opaque operator (labelsmooth_ext::linear_ce_forward, a
torch.library.custom_op with a fake kernel and an autograd formula), so torch.compile traces it
without a graph break.
"""
from typing import Optional

import torch

from . import functional as _F
from ._ops import REDUCTIONS, SMOOTHING_MODES, ops

_NONE, _MEAN, _SUM = REDUCTIONS["none"], REDUCTIONS["mean"], REDUCTIONS["sum"]
_SIXTEEN = (torch.float16, torch.bfloat16)
# CPU: read the mean's D on the host and pass 1/D to the row kernel (or, for float16, to the
# GEMMs as alpha). Off (tests), or on CUDA: 1/D stays on the device as per-row factors (no host
# synchronisation).
_SCALE_ON_HOST = True

# CPU: rows per chunk so that the chunk's buffers (its logits, overwritten by their gradient,
# plus a float32 copy of that gradient for 16-bit weights) take about this many bytes. Larger
# chunks run the GEMMs faster: each GEMM packs the whole of W (or W^T) once per call, so fewer,
# larger calls spend less on packing (MKL, V=32000 H=1024, 2-core build machine under load,
# GFLOP per CPU-second of the logits / d input / d W GEMMs: 136 / 145 / 143 at 688 rows,
# 151 / 152 / 148 at 4096). The chunk is held at once: 128 MiB (1024 float32 rows at V=32000,
# 4 chunks of N=4096) measured 166-170 MB beyond the returned gradients (the chunk plus ~38 MB
# of MKL's packing buffers), within the goal of 1/8 of linear + F.cross_entropy's 1402 MB.
CPU_CHUNK_BYTES = 128 << 20


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def auto_chunk_size(rows, num_classes, dtype, device):
    """Rows per chunk chosen from the shapes (and, on CUDA, the free device memory).

    CPU: one buffer of logits that the row kernel turns into their gradient in place (and a
    float32 copy of it for 16-bit inputs), within CPU_CHUNK_BYTES. CUDA: the logits, their
    gradient (and, only under "none"'s backward or where addmm has no out_dtype, float32 copies
    for 16-bit inputs): at most four float32 chunks within a quarter of what is free.
    The rows are then split into chunks of nearly equal size (a multiple of 8 rows), so no
    chunk is much smaller, and slower per row in the GEMMs, than the others."""
    v = max(1, num_classes)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = min(free // 16, 1 << 30)  # at most 1 GiB a buffer, at most 1/4 of what is free
        row_bytes = v * 4
    else:
        budget = CPU_CHUNK_BYTES
        itemsize = torch.empty((), dtype=dtype).element_size()
        row_bytes = v * (itemsize + (4 if dtype in _SIXTEEN else 0))
    c = max(1, budget // row_bytes)
    if c >= 16:
        c -= c % 8  # GEMM-friendly
    if rows <= c:
        return max(1, rows)
    pieces = -(-rows // c)
    even = -(-rows // pieces)
    if c >= 16:
        even = -(-even // 8) * 8  # still <= c: c is a multiple of 8
    return even


def _mean_denominator(tgt, weight, ignore_index, num_classes, acc):
    """D of the mean: the number of kept rows, or the sum of their class weights."""
    valid = tgt != ignore_index
    if weight is None:
        return valid.sum().to(acc), valid
    wy = weight.to(acc)[tgt.clamp(0, max(num_classes - 1, 0))]
    return torch.where(valid, wy, torch.zeros((), dtype=acc, device=wy.device)).sum(), valid


def _check_targets_on_host(tgt, num_classes, ignore_index):
    bad = (tgt != ignore_index) & ((tgt < 0) | (tgt >= num_classes))
    if bool(bad.any()):
        pos = int(bad.nonzero()[0, 0])
        raise IndexError(
            f"linear_cross_entropy: target {int(tgt[pos])} (at row {pos}) is out of range for "
            f"{num_classes} classes; valid targets are 0..{num_classes - 1} or "
            f"ignore_index={ignore_index}"
        )


def _in_place_step(dev):
    """The CPU writes each chunk's gradient over its logits (ce_forward_grad_): one buffer."""
    return dev.type == "cpu"


def _kept_rows(tgt, ignore_index, dev):
    """CPU: the indices of the rows that are not ignored, or None when every row is kept.

    Ignored rows have a loss of 0 and a gradient of exactly 0 (d input rows 0, nothing added
    to d W / d b), so their GEMMs are skipped: with 10% of the rows ignored, 10% of the work.
    (The CPU reads the targets on the host anyway; CUDA keeps every row, never syncing.)"""
    if not _in_place_step(dev):
        return None
    kept = tgt != ignore_index
    idx = kept.nonzero().squeeze(1)
    return None if idx.numel() == tgt.numel() else idx


# 16-bit d W accumulates in float32. Where the library GEMM takes 16-bit inputs with float32
# accumulation and output (CUDA: cuBLAS through addmm's out_dtype, in PyTorch 2.14, which also
# accepts the float32 d W as the added matrix), the chunk's gradient and inputs go in as they are;
# elsewhere (the CPU has no such addmm) they are widened to float32 first, a copy of the chunk.
# None: not tried yet on that device type; False: refused once (older PyTorch), widen from then on.
_F32_OUT_GEMM = {"cuda": None}


def _addmm_f32(out, a, b, beta, alpha):
    """out = beta * out + alpha * (a @ b), out float32, a and b 16-bit, products and sums in
    float32: without float32 copies of a and b where the device's GEMM can (_F32_OUT_GEMM)."""
    dev = out.device.type
    state = _F32_OUT_GEMM.get(dev, False)
    if state is not False:
        try:
            torch.addmm(out, a, b, out_dtype=torch.float32, beta=beta, alpha=alpha, out=out)
            _F32_OUT_GEMM[dev] = True
            return out
        except (TypeError, RuntimeError, NotImplementedError):
            if state:  # it worked before: a real error
                raise
            _F32_OUT_GEMM[dev] = False
    return torch.addmm(out, a.to(torch.float32), b.to(torch.float32), beta=beta, alpha=alpha, out=out)


def _chunk_loop(x, W, b, tgt, weight, ignore_index, eps, mode, z_loss, softcap, chunk,
                row_scale, need_x, need_w, need_b, loss_kind, scale=1.0, post_scale=None):
    """The chunked pass.

    chunk: rows per chunk, 0 for automatic (from the rows that are computed).
    row_scale: None, or one factor per row (accumulation dtype) that multiplies that row's
    gradient (1/D for kept rows under "mean", the incoming gradient under "none").
    scale: a host scalar multiplying every gradient (1/D of the mean on the CPU).
    post_scale: None, or a 0-d tensor equal to row_scale on every kept row (the mean's 1/D on
    the device; 0 when no row is kept): 16-bit gradients that are not scaled in the row kernel
    then multiply d W and d b by it once at the end instead of scaling x's rows before the
    GEMM (a float32 copy of the chunk), so their GEMM takes the 16-bit chunk as it is
    (_addmm_f32). Ignored rows' gradients are exactly 0, so their factor does not matter there.
    loss_kind: None (no loss wanted), "rows" (per-row losses) or "sum".
    Returns (loss, d_input, d_weight, d_bias); the gradients are in the accumulation dtype
    (d_input in the input dtype for float32/float64/bfloat16, float32 for float16) or None.

    CPU: the rows whose target is ignore_index are left out (_kept_rows); the others are
    gathered a chunk at a time. The fused row kernel (ce_forward_grad_) turns the chunk's
    logits, in place, into their gradient with the factors (scale or row_scale) applied in the
    accumulation type before the one rounding, and returns the rows' losses (z_loss and softcap
    included): one chunk buffer. Elsewhere: ce_forward_ext gives the losses and the unscaled
    gradient in a second buffer; scale goes to the GEMMs as alpha and row_scale multiplies the
    (rows x H) side.
    """
    n, h = x.shape
    v = W.shape[0]
    dt, dev = x.dtype, x.device
    acc = _acc_dtype(dt)
    need_g = need_x or need_w or need_b
    inplace = _in_place_step(dev) and need_g
    # float16 keeps the factors out of the kernel: 1/D before its rounding would flush small
    # gradients (p / D) to zero; they are applied after the GEMMs, in float32.
    in_kernel = inplace and dt != torch.float16
    alpha = 1.0 if in_kernel else scale
    # 16-bit g not scaled in the kernel (CUDA; float16 on the CPU): d W and d b straight from it
    narrow = dt in _SIXTEEN and not in_kernel
    late = narrow and post_scale is not None  # d W / d b scaled once at the end, not per row
    idx = _kept_rows(tgt, ignore_index, dev) if n else None
    m = n if idx is None else idx.numel()  # rows computed
    if chunk <= 0:
        chunk = auto_chunk_size(m, v, dt, dev)

    dx_dtype = torch.float32 if dt == torch.float16 else dt
    dx = None
    if need_x:  # ignored rows' d input is 0
        dx = (torch.empty if idx is None else torch.zeros)((n, h), dtype=dx_dtype, device=dev)
    # d W and d b: the first chunk writes them (no zero-fill pass over V x H), later ones add
    dW = torch.empty((v, h), dtype=acc, device=dev) if need_w else None
    db = torch.empty((v,), dtype=acc, device=dev) if need_b else None
    if m == 0:
        for t in (dW, db):
            if t is not None:
                t.zero_()
    rows = None
    if loss_kind == "rows":
        rows = (torch.empty if idx is None else torch.zeros)((n,), dtype=acc, device=dev)
    total = torch.zeros((), dtype=acc, device=dev)
    Wt = W.t()
    c0 = min(chunk, m)
    buf = torch.empty((c0, v), dtype=dt, device=dev) if m else None
    xbuf = torch.empty((c0, h), dtype=dt, device=dev) if m and idx is not None else None
    dxbuf = torch.empty((c0, h), dtype=dx_dtype, device=dev) if m and need_x and idx is not None else None
    ones = None
    for s in range(0, m, chunk):
        e = min(m, s + chunk)
        if idx is None:
            ix = None
            xc, tc = x[s:e], tgt[s:e]
            rsc = None if row_scale is None else row_scale[s:e]
        else:
            ix = idx[s:e]
            xc = torch.index_select(x, 0, ix, out=xbuf[: e - s])
            tc = tgt.index_select(0, ix)
            rsc = None if row_scale is None else row_scale.index_select(0, ix)
        z = buf[: e - s]
        if b is None:
            torch.mm(xc, Wt, out=z)
        else:
            torch.addmm(b, xc, Wt, out=z)
        r = None if rsc is None or in_kernel else rsc[:, None]
        if inplace:
            loss_c = ops.ce_forward_grad_(z, tc, weight, ignore_index, eps, mode, z_loss, softcap,
                                          scale if in_kernel else 1.0, rsc if in_kernel else None)
            g = z  # the gradient where the logits were
        else:
            loss_c, g, _ = ops.ce_forward_ext(z, tc, weight, ignore_index, eps, mode, _NONE, need_g,
                                              z_loss, softcap)
        if loss_kind == "rows":
            if ix is None:
                rows[s:e] = loss_c
            else:
                rows.index_copy_(0, ix, loss_c)
        elif loss_kind == "sum":
            total += loss_c.sum(dtype=acc)
        if not need_g:
            continue
        if need_x:
            out = dx[s:e] if ix is None else dxbuf[: e - s]
            if dx.dtype == dt:
                torch.addmm(out, g, W, beta=0, alpha=alpha, out=out)
                if r is not None:
                    out.mul_(r)
            else:  # float16: the product in float16, the scales in float32, d input float32
                gx = torch.mm(g, W)
                if alpha != 1.0 or r is not None:
                    gx = gx.to(torch.float32)
                    if alpha != 1.0:
                        gx.mul_(alpha)
                    if r is not None:
                        gx.mul_(r)
                out.copy_(gx)
                del gx
            if ix is not None:
                dx.index_copy_(0, ix, out)
        if (need_w or need_b) and narrow and (r is None or late):
            # float32 accumulation from the 16-bit chunk, no float32 copy of g where the GEMM
            # can (_addmm_f32); d b is a float32 column sum of g (no copy either)
            if need_w:
                _addmm_f32(dW, g.t(), xc, 0 if s == 0 else 1, alpha)
            if need_b:
                gs = g.sum(0, dtype=acc)
                if s == 0:
                    torch.mul(gs, alpha, out=db)
                else:
                    db.add_(gs, alpha=alpha)
                del gs
        elif need_w or need_b:
            ga = g if g.dtype == acc else g.to(acc)  # float32 accumulation for 16-bit weights
            if need_w:
                xs = xc if xc.dtype == acc else xc.to(acc)
                if r is not None:
                    xs = xs * r
                torch.addmm(dW, ga.t(), xs, beta=0 if s == 0 else 1, alpha=alpha, out=dW)
            if need_b:
                if r is not None:
                    rv = r[:, 0]
                else:
                    if ones is None or ones.shape[0] < e - s:
                        ones = torch.ones(e - s, dtype=acc, device=dev)
                    rv = ones[: e - s]
                torch.addmv(db, ga.t(), rv, beta=0 if s == 0 else 1, alpha=alpha, out=db)
            del ga
        del g, loss_c
    if late and m:
        for t in (dW, db):
            if t is not None:
                t.mul_(post_scale)
    if loss_kind == "rows":
        return rows, dx, dW, db
    return total, dx, dW, db


@torch.library.register_fake("labelsmooth_ext::ce_forward_grad_")
def _(input, target, weight, ignore_index, label_smoothing, smoothing_mode, z_loss, softcap,
      grad_scale, row_scale):
    return input.new_empty((input.shape[0],), dtype=_acc_dtype(input.dtype))


_EMPTY_SHAPE = (0,)


@torch.library.custom_op("labelsmooth_ext::linear_ce_forward", mutates_args=())
def linear_ce_forward(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    linear_bias: Optional[torch.Tensor],
    target: torch.Tensor,
    weight: Optional[torch.Tensor],
    ignore_index: int,
    label_smoothing: float,
    smoothing_mode: int,
    reduction: int,
    z_loss: float,
    softcap: float,
    chunk_size: int,
    grad_input: bool,
    grad_weight: bool,
    grad_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss and (for "mean"/"sum") the complete gradients of linear + cross-entropy.

    input (N, H), linear_weight (V, H), linear_bias (V,) or None, target (N,) int64.
    softcap 0.0 means none; chunk_size 0 means automatic. Returns (loss, d_input, d_weight,
    d_bias); a gradient not asked for (or any under "none", whose backward recomputes) is an
    empty tensor. The loss is in the accumulation dtype (float32 for 16-bit inputs; the caller
    rounds it to the input dtype outside autocast), d_weight and d_bias are float32 for 16-bit
    inputs, d_input float32 for float16.
    """
    v = linear_weight.shape[0]
    acc = _acc_dtype(input.dtype)
    if input.device.type == "cpu" or _F._validate_cuda_targets:
        _check_targets_on_host(target, v, ignore_index)
    chunk = chunk_size  # 0: automatic, from the rows computed (_chunk_loop)
    if reduction == _NONE:
        rows, _, _, _ = _chunk_loop(input, linear_weight, linear_bias, target, weight, ignore_index,
                                    label_smoothing, smoothing_mode, z_loss, softcap, chunk, None,
                                    False, False, False, "rows")
        e = input.new_empty(_EMPTY_SHAPE)
        return rows, e, e.clone(), e.clone()
    row_scale, alpha, post = None, 1.0, None
    if reduction == _MEAN:
        D, valid = _mean_denominator(target, weight, ignore_index, v, acc)
        d_host = float(D) if input.device.type == "cpu" and _SCALE_ON_HOST else None  # free on CPU
        if d_host is not None and d_host > 0:
            alpha = 1.0 / d_host  # into the GEMMs; ignored rows' gradients are exactly 0 anyway
        else:
            # on the device (no host sync), or D = 0: kept rows get 1/D (inf when D = 0, as in
            # cross_entropy), ignored rows exactly 0
            zero = torch.zeros((), dtype=acc, device=input.device)
            row_scale = torch.where(valid, 1.0 / D, zero)
            post = torch.where(valid.any(), 1.0 / D, zero)  # the same on every kept row
    total, dx, dW, db = _chunk_loop(input, linear_weight, linear_bias, target, weight, ignore_index,
                                    label_smoothing, smoothing_mode, z_loss, softcap, chunk,
                                    row_scale, grad_input, grad_weight, grad_bias, "sum", alpha,
                                    post)
    loss = total / D if reduction == _MEAN else total
    e = input.new_empty(_EMPTY_SHAPE)
    return (loss, e.clone() if dx is None else dx, e.clone() if dW is None else dW,
            e.clone() if db is None else db)


def _grad_dtypes(dt):
    acc = _acc_dtype(dt)
    return (torch.float32 if dt == torch.float16 else dt), acc


@linear_ce_forward.register_fake
def _(input, linear_weight, linear_bias, target, weight, ignore_index, label_smoothing,
      smoothing_mode, reduction, z_loss, softcap, chunk_size, grad_input, grad_weight, grad_bias):
    n, h = input.shape
    v = linear_weight.shape[0]
    dxt, acc = _grad_dtypes(input.dtype)
    loss = input.new_empty((n,) if reduction == _NONE else (), dtype=acc)
    keep = reduction != _NONE
    dx = input.new_empty((n, h) if keep and grad_input else _EMPTY_SHAPE, dtype=dxt)
    dW = input.new_empty((v, h) if keep and grad_weight else _EMPTY_SHAPE, dtype=acc)
    db = input.new_empty((v,) if keep and grad_bias else _EMPTY_SHAPE, dtype=acc)
    return loss, dx, dW, db


@torch.library.custom_op("labelsmooth_ext::linear_ce_backward", mutates_args=())
def linear_ce_backward(
    grad_loss: torch.Tensor,
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    linear_bias: Optional[torch.Tensor],
    target: torch.Tensor,
    weight: Optional[torch.Tensor],
    ignore_index: int,
    label_smoothing: float,
    smoothing_mode: int,
    z_loss: float,
    softcap: float,
    chunk_size: int,
    grad_input: bool,
    grad_weight: bool,
    grad_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of reduction="none": the chunk loop again, each row's gradient times its
    incoming gradient. Returns gradients in the input dtype (empty when not asked for)."""
    dt = input.dtype
    chunk = chunk_size
    scale = grad_loss.reshape(-1).to(_acc_dtype(dt))
    _, dx, dW, db = _chunk_loop(input, linear_weight, linear_bias, target, weight, ignore_index,
                                label_smoothing, smoothing_mode, z_loss, softcap, chunk, scale,
                                grad_input, grad_weight, grad_bias, None)
    e = input.new_empty(_EMPTY_SHAPE)
    return tuple(e.clone() if t is None else t.to(dt) for t in (dx, dW, db))


@linear_ce_backward.register_fake
def _(grad_loss, input, linear_weight, linear_bias, target, weight, ignore_index, label_smoothing,
      smoothing_mode, z_loss, softcap, chunk_size, grad_input, grad_weight, grad_bias):
    n, h = input.shape
    v = linear_weight.shape[0]
    return (input.new_empty((n, h) if grad_input else _EMPTY_SHAPE),
            input.new_empty((v, h) if grad_weight else _EMPTY_SHAPE),
            input.new_empty((v,) if grad_bias else _EMPTY_SHAPE))


def _is_plain(t):
    return type(t) in (torch.Tensor, torch.nn.Parameter)


def _setup_context(ctx, inputs, output):
    (x, W, b, tgt, weight, ii, eps, mode, red, zl, cap, chunk, gi, gw, gb) = inputs
    _, dx, dW, db = output
    ctx.reduction = red
    ctx.flags = (gi, gw, gb)
    ctx.dtypes = (x.dtype, W.dtype, None if b is None else b.dtype)
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(dx, dW, db)
    if red == _NONE:
        ctx.params = (ii, eps, mode, zl, cap, chunk)
        ctx.save_for_backward(x, W, b, tgt, weight)
    else:
        ctx.save_for_backward(dx, dW, db)


def _finish(g, grad_loss, dtype, unit):
    """A saved gradient times the incoming gradient, in the parameter's dtype."""
    if unit:
        return g if g.dtype == dtype else g.to(dtype)
    return (g * grad_loss).to(dtype)


def _backward(ctx, grad_loss, *_unused):
    nones = (None,) * 12
    if grad_loss is None:
        return (None, None, None) + nones
    compiling = torch.compiler.is_compiling()
    if torch.is_grad_enabled() and not compiling:
        raise RuntimeError(
            "labelsmooth_ext: double backward (create_graph=True) through linear_cross_entropy is "
            "not supported; use linear + labelsmooth_ext.reference.cross_entropy for "
            "higher-order gradients"
        )
    gi, gw, gb = ctx.flags
    xdt, wdt, bdt = ctx.dtypes
    if ctx.reduction == _NONE:
        x, W, b, tgt, weight = ctx.saved_tensors
        ii, eps, mode, zl, cap, chunk = ctx.params
        dx, dW, db = linear_ce_backward(grad_loss, x, W, b, tgt, weight, ii, eps, mode, zl, cap,
                                        chunk, gi, gw, gb)
        return (dx if gi else None, dW if gw else None, db if gb else None) + nones
    dx, dW, db = ctx.saved_tensors
    # On the CPU, checking for an incoming gradient of exactly 1 costs nothing: then the saved
    # gradients are returned as they are. Elsewhere (and when traced) multiply: a pass over
    # (N + V) x H elements, small next to the GEMMs.
    unit = (not compiling and grad_loss.device.type == "cpu" and _is_plain(grad_loss)
            and float(grad_loss) == 1.0)
    return (_finish(dx, grad_loss, xdt, unit) if gi else None,
            _finish(dW, grad_loss, wdt, unit) if gw else None,
            _finish(db, grad_loss, bdt, unit) if gb else None) + nones


linear_ce_forward.register_autograd(_backward, setup_context=_setup_context)


def _no_double_backward(ctx, *grads):
    raise RuntimeError(
        "labelsmooth_ext: double backward through linear_cross_entropy is not supported; use "
        "linear + labelsmooth_ext.reference.cross_entropy for higher-order gradients"
    )


linear_ce_backward.register_autograd(_no_double_backward, setup_context=lambda ctx, inputs, output: None)


def _check_float_arg(value, name, allow_none=False, positive=False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a float, got {value!r}")
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a float{' or None' if allow_none else ''}, got {value!r}") from None
    if f != f or f in (float("inf"), float("-inf")) or (f <= 0 if positive else f < 0):
        raise ValueError(f"{name} must be a finite {'positive' if positive else 'non-negative'} "
                         f"float, got {value!r}")
    return f


def linear_cross_entropy(input, linear_weight, target, *, linear_bias=None, weight=None,
                         reduction="mean", ignore_index=-100, label_smoothing=0.0,
                         smoothing_mode="uniform", z_loss=0.0, softcap=None, chunk_size=None):
    """cross_entropy(linear(input, linear_weight, linear_bias), target, ...) without ever holding
    more than one chunk of the logits.

    Arguments as torch.nn.functional.linear_cross_entropy (PyTorch 2.14), plus
    smoothing_mode ("uniform" or "off_target", as in cross_entropy), z_loss (adds
    z_loss * logsumexp**2 per kept row), softcap (logits become softcap * tanh(logits / softcap))
    and chunk_size (rows per chunk; None: from the shapes and free memory).

    input: (H,), (N, H) or (B, T, H) (any leading dims, flattened to rows); linear_weight:
    (V, H); linear_bias: (V,) or None; target: class indices shaped like input without its
    last dim. Gradients flow to input, linear_weight and linear_bias; class weights are
    constants. Probability targets and K-dimensional weights are not supported.
    """
    red = _F.check_reduction(reduction)
    mode = _F.check_smoothing_mode(smoothing_mode)
    eps = _F.check_label_smoothing(label_smoothing)
    zl = _check_float_arg(z_loss, "z_loss")
    cap = _check_float_arg(softcap, "softcap", allow_none=True, positive=True)
    if chunk_size is not None and (not isinstance(chunk_size, int) or isinstance(chunk_size, bool)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if ignore_index is None:
        ignore_index = -100  # PyTorch's linear_cross_entropy maps None to -100
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index must be an int or None, got {ignore_index!r}")
    for name, t in (("input", input), ("linear_weight", linear_weight), ("target", target)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if input.dtype not in _F._FLOAT_DTYPES:
        raise TypeError(f"input must be a floating tensor (float32, float64, float16 or bfloat16), "
                        f"got {input.dtype}")
    if input.dim() == 0:
        raise ValueError("input must have at least 1 dimension (features), got a 0-d tensor")
    h = input.shape[-1]
    if linear_weight.dim() != 2:
        raise ValueError(f"linear_weight must be 2-d (num_classes, in_features), got shape "
                         f"{tuple(linear_weight.shape)}")
    v = linear_weight.shape[0]
    if linear_weight.shape[1] != h:
        raise ValueError(f"linear_weight shape {tuple(linear_weight.shape)} does not match input's "
                         f"last dimension {h} (in_features): expected ({v}, {h})")
    if v == 0:
        raise ValueError("linear_weight must have at least one class (row), got shape "
                         f"{tuple(linear_weight.shape)}")
    if linear_weight.dtype != input.dtype:
        raise TypeError(f"linear_weight dtype {linear_weight.dtype} must match the input dtype {input.dtype}")
    if linear_weight.device != input.device:
        raise ValueError(f"linear_weight is on {linear_weight.device} but input is on {input.device}")
    if linear_bias is not None:
        if not isinstance(linear_bias, torch.Tensor):
            raise TypeError(f"linear_bias must be a torch.Tensor or None, got {type(linear_bias).__name__}")
        if tuple(linear_bias.shape) != (v,):
            raise ValueError(f"linear_bias must have shape ({v},) (one entry per class), got "
                             f"{tuple(linear_bias.shape)}")
        if linear_bias.dtype != input.dtype:
            raise TypeError(f"linear_bias dtype {linear_bias.dtype} must match the input dtype {input.dtype}")
        if linear_bias.device != input.device:
            raise ValueError(f"linear_bias is on {linear_bias.device} but input is on {input.device}")
    if target.is_floating_point():
        raise TypeError("target must hold class indices (an integer dtype); probability targets are "
                        "not supported by linear_cross_entropy (use linear + cross_entropy)")
    if target.dtype not in _F._INT_DTYPES:
        raise TypeError(f"target must hold class indices (an integer dtype), got {target.dtype}")
    if tuple(target.shape) != tuple(input.shape[:-1]):
        raise ValueError(f"target shape {tuple(target.shape)} does not match input shape "
                         f"{tuple(input.shape)}: expected {tuple(input.shape[:-1])} (input without "
                         f"its last dimension)")
    if target.device != input.device:
        raise ValueError(f"target is on {target.device} but input is on {input.device}")
    weight = _F._check_weight(weight, input, v, input.dtype != torch.float64 and
                              torch.is_autocast_enabled(input.device.type))
    if mode == SMOOTHING_MODES["off_target"] and v == 1 and eps > 0:
        raise ValueError(f"smoothing_mode='off_target' needs at least 2 classes when label_smoothing > 0 "
                         f"(got 1 class, label_smoothing={eps})")

    grad_on = torch.is_grad_enabled()
    gi = grad_on and input.requires_grad
    gw = grad_on and linear_weight.requires_grad
    gb = grad_on and linear_bias is not None and linear_bias.requires_grad
    x, W, bias = input.reshape(-1, h), linear_weight, linear_bias
    dev_type = input.device.type
    autocast = input.dtype != torch.float64 and torch.is_autocast_enabled(dev_type)
    if autocast:
        # As linear + cross_entropy under torch.autocast: the GEMMs in the autocast dtype (the
        # casts are autograd's, so the gradients come back in the parameters' dtypes), the loss
        # in float32 (class weights in float32).
        cd = torch.get_autocast_dtype(dev_type)
        if cd in _SIXTEEN and cd != input.dtype:
            x, W = x.to(cd), W.to(cd)
            bias = None if bias is None else bias.to(cd)
    W = W if W.stride(-1) == 1 else W.contiguous()
    args = (x, W, bias, target.reshape(-1).long(), weight, ignore_index, eps, mode, red, zl,
            cap or 0.0, chunk_size or 0, gi, gw, gb)
    if autocast:
        with torch.autocast(dev_type, enabled=False):
            loss = linear_ce_forward(*args)[0]
    else:
        loss = linear_ce_forward(*args)[0]
        if loss.dtype != input.dtype:
            loss = loss.to(input.dtype)
    if red == _NONE:
        loss = loss.reshape(target.shape)
    return loss


_Base = getattr(torch.nn, "LinearCrossEntropyLoss", torch.nn.Module)


class LinearCrossEntropyLoss(_Base):
    """A linear layer followed by the label-smoothed cross-entropy, fused and chunked.

    The constructor is torch.nn.LinearCrossEntropyLoss's (PyTorch 2.14; a subclass of it when
    available, so isinstance checks and state dicts keep working) without out_features and
    options, plus smoothing_mode, z_loss, softcap and chunk_size. forward(input, target).
    """

    def __init__(self, in_features, num_classes, *, bias=False, device=None, dtype=None,
                 reduction="mean", weight=None, ignore_index=-100, label_smoothing=0.0,
                 smoothing_mode="uniform", z_loss=0.0, softcap=None, chunk_size=None):
        _F.check_reduction(reduction)
        _F.check_smoothing_mode(smoothing_mode)
        _F.check_label_smoothing(label_smoothing)
        _check_float_arg(z_loss, "z_loss")
        _check_float_arg(softcap, "softcap", allow_none=True, positive=True)
        if _Base is torch.nn.Module:
            super().__init__()
            self.register_buffer("weight", weight)
            self.reduction, self.num_classes, self.out_features = reduction, num_classes, ()
            self.linear = torch.nn.Linear(in_features, num_classes, bias=bias, device=device, dtype=dtype)
        else:
            super().__init__(in_features, num_classes, bias=bias, device=device, dtype=dtype,
                             reduction=reduction, weight=weight, ignore_index=ignore_index,
                             label_smoothing=label_smoothing)
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.smoothing_mode = smoothing_mode
        self.z_loss = z_loss
        self.softcap = softcap
        self.chunk_size = chunk_size

    def forward(self, input, target):
        return linear_cross_entropy(
            input, self.linear.weight, target, linear_bias=self.linear.bias, weight=self.weight,
            reduction=self.reduction, ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing, smoothing_mode=self.smoothing_mode,
            z_loss=self.z_loss, softcap=self.softcap, chunk_size=self.chunk_size)

    def extra_repr(self):
        return (f"in_features={self.linear.in_features}, num_classes={self.num_classes}, "
                f"bias={self.linear.bias is not None}, reduction={self.reduction!r}, "
                f"ignore_index={self.ignore_index}, label_smoothing={self.label_smoothing}, "
                f"smoothing_mode={self.smoothing_mode!r}, z_loss={self.z_loss}, "
                f"softcap={self.softcap}, chunk_size={self.chunk_size}")
