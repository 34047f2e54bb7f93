"""Differential fuzzer against PyTorch in float64 (run by tests/test_fuzz.py in a subprocess,
so that a crash fails that test instead of killing the test run).

    python tests/fuzz_driver.py ce|module|bce [fast|long]     (LSE_FUZZ_EXAMPLES=n: n cases)

Draws every argument a user can pass: dtype, N from 0, C from 1 to 50257, K-dim inputs with
size-0 / size-1 dims, the (C,) form (scalar and (1,) targets), transposed / sliced /
channels_last / stride-0 inputs, class-index targets (int32 / int64, ignore_index anywhere, out
of range) and probability targets, weights with zeros and negative entries, label_smoothing in
[0, 1], both smoothing modes, +-1e30 / inf / NaN logits, non-uniform incoming gradients, the
function and the module; BCE likewise. Compares loss and input gradient with PyTorch run in
float64 on the same values; where PyTorch raises, we must raise a clear error too, or be
documented to be better (listed in BETTER).
"""
import math
import os
import sys
import warnings

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, note, settings
from hypothesis import strategies as st

sys.path.append(os.path.dirname(os.path.abspath(__file__)))  # conftest; labelsmooth_ext from PYTHONPATH
import labelsmooth_ext as L  # noqa: E402
from conftest import assert_close_to, fused_row_semantics  # noqa: E402
from labelsmooth_ext import reference  # noqa: E402

PROFILES = {"fast": 120, "long": 6000}
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
MAX_ELEMS = 300_000


@st.composite
def logits(draw, shape, dtype):
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    scale = draw(st.sampled_from([0.1, 1.0, 3.0, 30.0]))
    x = torch.randn(shape, generator=g) * scale
    special = draw(st.sampled_from(["none", "none", "big", "inf", "nan", "-inf_row"]))
    if x.numel() and special != "none":
        flat = x.view(-1)
        idx = torch.randint(0, flat.numel(), (max(1, flat.numel() // 50),), generator=g)
        if special == "big":
            flat[idx] = torch.where(torch.rand(len(idx), generator=g) < 0.5, 1e30, -1e30)
        elif special == "inf":
            flat[idx] = torch.where(torch.rand(len(idx), generator=g) < 0.5, math.inf, -math.inf)
        elif special == "nan":
            flat[idx] = math.nan
        else:
            x.select(1 if x.dim() > 1 else 0, 0).fill_(-math.inf) if x.dim() > 1 else x.fill_(-math.inf)
    note(f"logits: scale={scale} special={special} seed={seed}")
    return x.to(dtype), seed


def layout(draw, x, cdim):
    """The same values in another memory layout."""
    kind = draw(st.sampled_from(["contiguous", "transposed", "sliced", "channels_last", "stride0"]))
    note(f"layout={kind}")
    if kind == "transposed" and x.dim() >= 2:
        return x.transpose(0, -1).contiguous().transpose(0, -1)
    if kind == "sliced":
        big = torch.empty(tuple(s * 2 + 1 for s in x.shape), dtype=x.dtype)
        view = big[tuple(slice(1, 1 + 2 * s, 2) for s in x.shape)]
        view.copy_(x)
        return view
    if kind == "channels_last" and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    if kind == "stride0" and x.dim() >= 2 and x.shape[0] > 0:
        return x[:1].expand(x.shape)  # every sample the same row(s)
    return x


def _torch64(fn, x, args, kwargs, go):
    xd = x.detach().double().requires_grad_()
    out = fn(xd, *args, **kwargs)
    g = None
    if out.numel():
        (g,) = torch.autograd.grad(out, xd, go.double().expand(out.shape) if go is not None else None,
                                   allow_unused=True)
    return out, g


def _ours(fn, x, args, kwargs, go):
    xx = x.detach().clone().requires_grad_() if x.is_contiguous() else x.detach().requires_grad_()
    out = fn(xx, *args, **kwargs)
    g = None
    if out.numel():
        (g,) = torch.autograd.grad(out, xx, go.expand(out.shape) if go is not None else None,
                                   allow_unused=True)
    return out, g


def compare(ours_fn, theirs_fn, x, args, kwargs, theirs_kwargs, dtype, go_seed, per_row_go, fix_grad=None,
            term_scale=None, loss_terms=None):
    """term_scale(go): the size of the largest terms a gradient element is the difference of
    (p_c and q_c; sigmoid(x) and t'): the accumulation type's rounding of those is the
    cancellation error ATOL_REL allows (conftest.py), where every gradient element is small."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ref = theirs_fn(x.detach().double(), *args, **theirs_kwargs)
        except Exception as e:  # PyTorch refuses: so must we, with a clear message
            try:
                ours_fn(x, *args, **kwargs)
            except (ValueError, TypeError, IndexError, RuntimeError) as ours_e:
                assert str(ours_e), "our error has no message"
                return "both raised"
            raise AssertionError(f"PyTorch raised {type(e).__name__}: {e}; we did not")
        g = torch.Generator().manual_seed(go_seed)
        go = None
        if ref.numel():
            go = (torch.rand(ref.shape if per_row_go else (), generator=g) * 3 - 1).to(dtype)
        ours, gx = _ours(ours_fn, x, args, kwargs, go)
        ref, gref = _torch64(theirs_fn, x, args, theirs_kwargs, go)
    assert ours.dtype == dtype, (ours.dtype, dtype)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    lscale = _loss_scale(ref)
    if loss_terms is not None:  # the sum of |terms| of the largest loss: its cancellation error
        lscale = max(lscale, loss_terms(go))
    assert_close_to(ours, ref, dtype, "loss", scale=lscale)
    if gref is not None and fix_grad is not None:
        gref = fix_grad(gref)
    if gref is not None:
        ulps = 2  # the incoming gradient is never exactly 1 here: two roundings in 16-bit
        scale = _grad_scale(gref, go)
        if term_scale is not None:
            scale = max(scale, term_scale(go))
        assert_close_to(gx, gref, dtype, "grad", ulps=ulps, scale=scale)
    return "compared"


def _loss_scale(ref):
    finite = ref.detach()[ref.detach().isfinite()].abs()
    return max(float(finite.max()) if finite.numel() else 1.0, 1.0)


def _grad_scale(gref, go):
    finite = gref[gref.isfinite()].abs()
    m = float(finite.max()) if finite.numel() else 0.0
    return m if m > 0 else 1.0


@st.composite
def ce_case(draw):
    dtype = draw(st.sampled_from(DTYPES))
    form = draw(st.sampled_from(["2d", "2d", "kdim", "1d", "1d_one"]))
    big = draw(st.sampled_from([False, False, False, True]))
    C = draw(st.integers(1, 50257) if big else st.integers(1, 70))
    if form in ("2d",):
        N = draw(st.integers(0, max(0, min(40, MAX_ELEMS // C))))
        shape = (N, C)
    elif form == "kdim":
        N = draw(st.integers(0, 3))
        dims = draw(st.lists(st.integers(0, 6), min_size=1, max_size=3))
        shape = (N, C, *dims)
        assume(math.prod(shape) <= MAX_ELEMS)
    else:
        shape = (C,)
    x, seed = draw(logits(shape, dtype))
    x = layout(draw, x, 0 if form.startswith("1d") else 1)
    g = torch.Generator().manual_seed(seed + 1)
    target_kind = draw(st.sampled_from(["index", "index", "index", "prob"]))
    ignore_index = draw(st.sampled_from([-100, -1, 0, C - 1, C, 7]))
    if target_kind == "prob":
        cdim = 0 if form.startswith("1d") else 1
        target = torch.softmax(torch.randn(shape, generator=g), cdim).to(dtype) if shape[cdim if len(shape) > 1 else 0] > 0 \
            else torch.zeros(shape, dtype=dtype)
    else:
        tshape = {"1d": (), "1d_one": (1,)}.get(form, (shape[0],) + tuple(shape[2:]))
        target = torch.randint(0, C, tshape, generator=g)
        if target.numel():
            target.view(-1)[torch.rand(target.numel(), generator=g) < 0.2] = ignore_index
            if draw(st.integers(0, 30)) == 0:
                target.view(-1)[0] = draw(st.sampled_from([C, -2, C + 5]))  # out of range
        target = target.to(draw(st.sampled_from([torch.int64, torch.int32])))
    wkind = draw(st.sampled_from(["none", "none", "positive", "zeros", "negative"]))
    w = None
    if wkind != "none":
        w = torch.rand(C, generator=g) + 0.1
        if wkind == "zeros":
            w[torch.rand(C, generator=g) < 0.5] = 0.0
        elif wkind == "negative":
            w = w - 0.6
        w = w.to(dtype)
    eps = draw(st.one_of(st.sampled_from([0.0, 0.1, 1.0]), st.floats(0.0, 1.0)))
    mode = draw(st.sampled_from(["uniform", "uniform", "off_target"]))
    reduction = draw(st.sampled_from(["none", "mean", "sum"]))
    note(f"dtype={dtype} shape={shape} form={form} target={target_kind} ignore_index={ignore_index} "
         f"weight={wkind} eps={eps} mode={mode} reduction={reduction}")
    return dict(x=x, target=target, w=w, eps=eps, mode=mode, reduction=reduction, dtype=dtype,
                ignore_index=ignore_index, form=form, C=C, go_seed=seed + 2,
                per_row=draw(st.booleans()))


def _theirs_ce(c):
    """PyTorch's call for our arguments (see _theirs_ce_rows); a (C,) input with a (1,)
    class-index target is compared with the batched (1, C) result: PyTorch fails there itself
    (documented). eps = 0, C > 1: its forward gives that loss but its backward fails (size
    mismatch); eps > 0: its (C,) path cannot smooth a (1,) target; C == 1: input and target are
    both (1,), which it reads as a probability target and refuses for an integer one."""
    fn, rest = _theirs_ce_rows(c)
    if fn is not None and c["form"] == "1d_one" and not c["target"].is_floating_point():
        return (lambda x, t, **kw: fn(x[None], t, **kw).reshape(())), rest
    return fn, rest


def _theirs_ce_rows(c):
    """PyTorch's call for our arguments: off_target is uniform with eps' = eps K / (K - 1)
    (where eps' <= 1; else the float64 reference, itself checked against PyTorch)."""
    eps, C = c["eps"], c["C"]
    w = None if c["w"] is None else c["w"].double()
    target = c["target"].double() if c["target"].is_floating_point() else c["target"].long()
    if c["mode"] == "off_target" and eps > 0:
        if C == 1:
            return None, None
        eps_u = eps * C / (C - 1)
        if eps_u > 1:
            fn = lambda x, t, **kw: reference.cross_entropy(x, t, smoothing_mode="off_target", **kw)  # noqa: E731
            kw = dict(weight=w, ignore_index=c["ignore_index"], reduction=c["reduction"], label_smoothing=eps)
            if target.is_floating_point():
                kw.pop("ignore_index")
            return fn, (target, kw)
        eps = eps_u
    if eps > 0 and eps / C == 0.0:
        # eps/C underflows in float64 (eps = 5e-324): PyTorch's smoothing term is then 0 * sum of
        # log-probabilities (NaN with a -inf logit); ours uses the smallest positive eps/C
        # (README, Semantics: a positive label_smoothing never rounds to no smoothing), which
        # is PyTorch's result for eps = C * 5e-324.
        eps = C * 5e-324
    return F.cross_entropy, (target, dict(weight=w, ignore_index=c["ignore_index"], reduction=c["reduction"],
                                          label_smoothing=eps))


def run_ce(c, module):
    theirs_fn, rest = _theirs_ce(c)
    kwargs = dict(weight=c["w"], ignore_index=c["ignore_index"], reduction=c["reduction"],
                  label_smoothing=c["eps"], smoothing_mode=c["mode"])
    if theirs_fn is None:  # off_target with one class and eps > 0: our documented error
        try:
            L.cross_entropy(c["x"], c["target"], **kwargs)
        except ValueError as e:
            assert "off_target" in str(e)
            return
        raise AssertionError("off_target with 1 class and eps > 0 did not raise")
    target, theirs_kwargs = rest
    if c["target"].is_floating_point() and c["ignore_index"] >= 0:
        # refused as PyTorch refuses it, also for an empty input (where PyTorch returns early)
        try:
            L.cross_entropy(c["x"], c["target"], **kwargs)
        except ValueError as e:
            assert "ignore_index is not supported for probability" in str(e)
            return
        raise AssertionError("ignore_index >= 0 with probability targets did not raise")
    if module:
        mod = L.CrossEntropyLoss(**kwargs)
        ours_fn = lambda x, t: mod(x, t)  # noqa: E731
        kw = {}
    else:
        ours_fn, kw = L.cross_entropy, kwargs
    fix = None
    if not c["target"].is_floating_point():
        # Our per-row rules (semantics.md): an ignored row's gradient is exactly 0 and a row
        # with a NaN gradient is NaN throughout (PyTorch leaves NaN in ignored rows with NaN or
        # all -inf logits, and partly finite NaN rows in K-dim inputs).
        def fix(gref):
            return fused_row_semantics(gref, c["target"], c["ignore_index"])
    compare(ours_fn, lambda x, t, **k: theirs_fn(x, target, **theirs_kwargs), c["x"], (c["target"],), kw,
            {}, c["dtype"], c["go_seed"], c["per_row"], fix_grad=fix, term_scale=lambda go: _ce_terms(c, go),
            loss_terms=lambda go: _ce_loss_terms(c))


def _ce_loss_terms(c):
    """The sum of |terms| of a row's loss, |b w_y| (lse - z_y) + |a| sum_c |w_c| (lse - z_c),
    largest over rows ('none'), summed ('sum') or over |D| ('mean'): with +-1e30 logits and
    weights of both signs, terms of 1e30 cancel to a loss of 1e26, whose float32 rounding
    error is relative to the terms. Infinite terms (-inf logits) are left out (the inf / NaN
    positions are compared exactly)."""
    C = c["C"]
    x = c["x"].detach().double()
    if x.numel() == 0 or C == 0:
        return 1.0
    rows = x.unsqueeze(0) if x.dim() == 1 else x.movedim(1, -1).reshape(-1, C)
    nlp = -torch.log_softmax(rows, 1)
    nlp = torch.where(nlp.isfinite(), nlp, torch.zeros_like(nlp))
    a, b = reference.smoothing_coefficients(C, c["eps"], c["mode"])
    w = torch.ones(C, dtype=torch.float64) if c["w"] is None else c["w"].double()
    t = c["target"]
    if t.is_floating_point():
        tr = t.double().reshape(1, -1) if t.dim() == 1 else t.double().movedim(1, -1).reshape(-1, C)
        terms = ((a + b * tr).abs() * w.abs() * nlp).sum(1)
        D = float(rows.shape[0])
    else:
        y = t.reshape(-1).long()
        keep = (y != c["ignore_index"]) & (y >= 0) & (y < C)
        ys = torch.where(keep, y, torch.zeros_like(y))
        terms = abs(b) * w[ys].abs() * nlp.gather(1, ys[:, None])[:, 0] + abs(a) * (w.abs() * nlp).sum(1)
        terms = torch.where(keep, terms, torch.zeros_like(terms))
        D = float(w[ys][keep].sum())
    terms = terms[terms.isfinite()]
    if terms.numel() == 0:
        return 1.0
    if c["reduction"] == "none":
        return float(terms.max())
    total = float(terms.sum())
    return total / abs(D) if c["reduction"] == "mean" and D else total


def _ce_terms(c, go):
    """The largest term of a gradient element: p_c (b w_y + a W) and b w_y + a w_c (times the
    incoming gradient, over |D| for 'mean'); with eps = 1 and near-uniform logits every element
    is p_c - 1/K, much smaller than p_c."""
    C = c["C"]
    a, b = reference.smoothing_coefficients(C, c["eps"], c["mode"])
    w = torch.ones(C, dtype=torch.float64) if c["w"] is None else c["w"].double()
    term = 2.0 * (abs(b) * float(w.abs().max()) + abs(a) * float(w.abs().sum())) if C else 1.0
    if go is not None and go.numel():
        term *= float(go.double().abs().max())
    if c["reduction"] == "mean":
        t = c["target"]
        if t.is_floating_point():
            D = t.numel() / max(C, 1)
        else:
            y = t.reshape(-1).long()
            y = y[(y != c["ignore_index"]) & (y >= 0) & (y < C)]
            D = float(w[y].sum())
        term /= abs(D) if D else 1.0
    return term


@st.composite
def bce_case(draw):
    dtype = draw(st.sampled_from(DTYPES))
    shape = tuple(draw(st.lists(st.integers(0, 9), min_size=1, max_size=4)))
    x, seed = draw(logits(shape, dtype))
    x = layout(draw, x, 0)
    g = torch.Generator().manual_seed(seed + 3)
    t = torch.rand(shape, generator=g)
    if draw(st.booleans()):
        t = (t > 0.5).to(t.dtype)
    t = t.to(dtype)
    kw = {"reduction": draw(st.sampled_from(["none", "mean", "sum"]))}
    for name in ("weight", "pos_weight"):
        kind = draw(st.sampled_from(["none", "last", "full", "scalar", "negative"]))
        if kind == "none" or not shape:
            continue
        wshape = {"last": shape[-1:], "full": shape, "scalar": ()}.get(kind, shape[-1:])
        w = torch.rand(wshape, generator=g) * 3
        if kind == "negative":
            w = w - 1.5
        kw[name] = w.to(dtype)
    a = draw(st.one_of(st.sampled_from([0.0, 0.1, 0.5, 1.0]), st.floats(0.0, 1.0)))
    note(f"bce dtype={dtype} shape={shape} a={a} kw={ {k: getattr(v, 'shape', v) for k, v in kw.items()} }")
    return x, t, kw, a, dtype, seed + 4, draw(st.booleans()), draw(st.booleans())


def _bce64(x, t, a, kw):
    """PyTorch's BCE with logits in float64 on t' = t (1 - 2a) + a, with the loss of finite x in
    the form without cancellation, w (-p t' x + L log1p(exp(x))) for x < 0 (PyTorch's own
    (1 - t') x + max(-x, 0) + ... cancels: at x = -1e30, t' = 2.2e-16 it gives 2^48 for the true
    2.2e14; long-profile finding); +-inf and NaN by PyTorch's formula with 1 - t' exact.
    Same gradient."""
    red = kw.get("reduction", "mean")
    elem = F.binary_cross_entropy_with_logits(x, t * (1 - 2 * a) + a, **dict(kw, reduction="none"))
    ts = t * (1 - 2 * a) + a
    ts1 = (1 - t) * (1 - 2 * a) + a  # 1 - t', exact also where t' is near 1
    p = kw.get("pos_weight")
    p = torch.ones((), dtype=x.dtype) if p is None else p
    w = kw.get("weight")
    w = torch.ones((), dtype=x.dtype) if w is None else w
    L = 1 + (p - 1) * ts
    xs = torch.where(x.isfinite(), x, torch.zeros_like(x))
    exact = w * (torch.where(xs < 0, -p * ts * xs, ts1 * xs) + L * torch.log1p(torch.exp(-xs.abs())))
    # +-inf / NaN: PyTorch's formula with 1 - t' exact (ts1), as the kernels: at x = +inf, t = 1,
    # a = 5e-324 PyTorch rounds t' to 1 and gives 0 * inf = NaN, the exact loss is +inf
    nonfinite = w * (ts1 * x + L * (torch.clamp(-x, min=0) + torch.log1p(torch.exp(-x.abs()))))
    elem = torch.where(x.isfinite(), exact, nonfinite)
    if red == "none":
        return elem
    return elem.sum() if red == "sum" else elem.mean()


def run_bce(case):
    x, t, kw, a, dtype, go_seed, per_row, module = case
    kw64 = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    theirs = lambda xd, tt: _bce64(xd, t.double(), a, kw64)  # noqa: E731
    if module:
        mod = L.BCEWithLogitsLoss(weight=kw.get("weight"), reduction=kw["reduction"], pos_weight=kw.get("pos_weight"),
                                  label_smoothing=a)
        ours = lambda xx, tt: mod(xx, tt)  # noqa: E731
        ours_kw = {}
    else:
        ours = L.binary_cross_entropy_with_logits
        ours_kw = dict(kw, label_smoothing=a)
    compare(ours, theirs, x, (t,), ours_kw, {}, dtype, go_seed, per_row,
            term_scale=lambda go: _bce_terms(x, t, kw, a, go))


def _bce_terms(x, t, kw, a, go):
    """The largest term of a BCE gradient element, w (L sigmoid(x) + |p t'|) (incoming gradient,
    1/n for 'mean'): with t' = 0.5 and x near 0 every element is sigmoid(x) - 0.5, small."""
    if x.numel() == 0:
        return 1.0
    ts = t.double() * (1 - 2 * a) + a
    p = kw.get("pos_weight")
    p = torch.ones((), dtype=torch.float64) if p is None else p.double()
    w = kw.get("weight")
    w = torch.ones((), dtype=torch.float64) if w is None else w.double()
    L = 1 + (p - 1) * ts
    term = float((w.abs() * (L.abs() + (p * ts).abs())).max())
    if go is not None and go.numel():
        term *= float(go.double().abs().max())
    if kw["reduction"] == "mean":
        term /= x.numel()
    return term


def main(which, profile):
    n = int(os.environ.get("LSE_FUZZ_EXAMPLES", PROFILES[profile]))
    cfg = settings(max_examples=n, deadline=None, derandomize=profile == "fast", database=None,
                   suppress_health_check=list(HealthCheck), print_blob=True)
    if which in ("ce", "module"):
        @cfg
        @given(ce_case())
        def fuzz(c):
            run_ce(c, module=which == "module")
    else:
        @cfg
        @given(bce_case())
        def fuzz(case):
            run_bce(case)
    torch.manual_seed(0)
    fuzz()
    print(f"fuzz {which} {profile}: {n} cases, no difference")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "fast")
