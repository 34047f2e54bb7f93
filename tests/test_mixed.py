"""Mixed precision and torch.func, against PyTorch's own loss (issue 9):
float16 with a loss scaler, 16-bit gradients with an incoming gradient other than 1 (rounded
once), autocast (float32 loss, float32 class weights, gradient in the logits' dtype), and
torch.func grad / jacrev / vmap(grad)."""
import pytest
import torch
import torch.nn.functional as F

import labelsmooth_ext as L
from conftest import TOL, DEVICES, REAL_DEVICES, assert_close_to

SIXTEEN = [torch.float16, torch.bfloat16]


def ulp(ref, dtype):
    """The spacing of `dtype` at each value of the float64 tensor `ref` (subnormal-aware)."""
    precision, emin = {torch.float16: (11, -14), torch.bfloat16: (8, -126)}[dtype]
    _, e = torch.frexp(ref)
    return torch.ldexp(torch.ones_like(ref), torch.clamp(e - 1, min=emin) - (precision - 1))


def input_grad(fn, x, t, go, **kw):
    xx = x.detach().clone().requires_grad_()
    out = fn(xx, t, **kw)
    out.backward(go.to(out.dtype))
    return xx.grad


# ---------------------------------------------------------------------------- float16 + scaler

@pytest.fixture(scope="module")
def lm_float16():
    """The language-model case of the issue: N=1024, K=32000 float16 logits, 10% ignored."""
    g = torch.Generator().manual_seed(9)
    x = (torch.randn(1024, 32000, generator=g) * 2).half()
    t = torch.randint(0, 32000, (1024,), generator=g)
    t[::10] = -100
    return x, t


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_float16_loss_scaler_does_not_underflow(lm_float16, reduction):
    """(loss * scale).backward(), as torch.amp.GradScaler does: the fraction of gradient entries
    flushed to zero (among those whose exact value is at least float16's smallest subnormal,
    2^-24) and the error to float64 are no worse than PyTorch's, for scales 2^8 and 2^12."""
    x, t = lm_float16
    n = x.shape[0]
    kw = dict(reduction=reduction, label_smoothing=0.1)
    ones = torch.ones(n if reduction == "none" else (), dtype=torch.float64)
    ref1 = input_grad(F.cross_entropy, x.double(), t, ones, **kw)  # linear in the incoming gradient
    for scale in (2.0 ** 8, 2.0 ** 12):
        ref = ref1 * scale
        representable = ref.abs() >= 2.0 ** -24
        stats = {}
        for name, fn in (("ours", L.cross_entropy), ("torch", F.cross_entropy)):
            g = input_grad(fn, x, t, ones.float() * scale, **kw).double()
            zeros = float((g[representable] == 0).double().mean())
            rel = float((g - ref).norm() / ref.norm())
            stats[name] = (zeros, rel)
        (oz, orel), (tz, trel) = stats["ours"], stats["torch"]
        assert oz <= tz, f"scale {scale}: {oz:.4f} of the entries flushed to zero, PyTorch {tz:.4f}"
        assert orel <= trel, f"scale {scale}: relative error {orel:.3g}, PyTorch {trel:.3g}"
        assert oz < 1e-4 and orel < 1e-3, stats  # before the fix: 84% zeros, 1.9e-3 (mean)


def test_float16_forward_keeps_no_gradient():
    """The float16 forward stores no gradient (it would hold p / D, which underflows) but the
    logits, from which the backward computes it; bfloat16 stores its gradient (single pass)."""
    for dtype, stored in ((torch.float16, 0), (torch.bfloat16, 8 * 50)):
        x = torch.randn(8, 50).to(dtype).requires_grad_()
        saved = []  # what autograd saves, in order (the CPU node is C++: no .saved_tensors)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            loss = L.cross_entropy(x, torch.randint(0, 50, (8,)), label_smoothing=0.1)
        assert saved[0].numel() == stored and saved[1].shape == x.shape
        assert saved[1].data_ptr() == x.data_ptr()  # the logits themselves, not a copy
        loss.backward()
        assert x.grad.dtype == dtype


@pytest.mark.parametrize("dtype", SIXTEEN)
def test_sixteen_bit_spatial_input_with_incoming_gradient(dtype):
    """(N, C, d) inputs (the CPU's position-vectorised kernel) take the same exact backward."""
    x = (torch.randn(3, 7, 11) * 3).to(dtype)
    t = torch.randint(0, 7, (3, 11))
    t[0, :4] = -100
    go = torch.rand(3, 11, dtype=torch.float64) + 0.25
    for red, g in (("none", go), ("mean", torch.tensor(0.3, dtype=torch.float64))):
        ref = input_grad(F.cross_entropy, x.double(), t, g, reduction=red, label_smoothing=0.1)
        ours = input_grad(L.cross_entropy, x, t, g.float(), reduction=red, label_smoothing=0.1)
        err = (ours.double() - ref).abs() / ulp(ref, dtype)
        assert float(err.max()) <= 2, float(err.max())


# ------------------------------------------------- 16-bit gradients, incoming gradient != 1

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", SIXTEEN)
@pytest.mark.parametrize("reduction,go_kind", [("mean", 0.3), ("sum", 0.3), ("none", "rand"),
                                               ("mean", 4.0), ("mean", 1.0), ("sum", -2.0)])
@pytest.mark.parametrize("weighted", [False, True])
def test_sixteen_bit_gradient_rounded_once(device, dtype, reduction, go_kind, weighted):
    """Each element within 2 ulp of the float64 gradient (plus the float32 rounding of the two
    terms of p_c - q_c where they cancel), and at least as many within 1 ulp as PyTorch."""
    g = torch.Generator().manual_seed(3)
    n, k = 96, 3000
    x = (torch.randn(n, k, generator=g) * 3).to(dtype).to(device)
    t = torch.randint(0, k, (n,), generator=g)
    t[::7] = -100
    t = t.to(device)
    w = (torch.rand(k, generator=g) + 0.5).to(dtype).to(device) if weighted else None
    if go_kind == "rand":
        go = (torch.rand(n, generator=g, dtype=torch.float64) + 0.25).to(device)
    else:
        go = torch.tensor(go_kind, dtype=torch.float64, device=device)
    go = go.to(dtype).double()  # the loss is in `dtype`, so is its incoming gradient
    kw = dict(weight=w, reduction=reduction, label_smoothing=0.1)
    ref = input_grad(F.cross_entropy, x.double(), t, go, **{**kw, "weight": None if w is None else w.double()})
    ours = input_grad(L.cross_entropy, x, t, go.float(), **kw).double().cpu()
    torch_ = input_grad(F.cross_entropy, x, t, go.float(), **kw).double().cpu()
    ref = ref.cpu()
    u = ulp(ref, dtype)
    err = (ours - ref).abs()
    # p_c * (b w_y + a W) and the constant it is compared with, each rounded in float32
    p = torch.softmax(x.double().cpu(), 1)
    wd = torch.ones(k, dtype=torch.float64) if w is None else w.double().cpu()
    d = (t.cpu() != -100).sum() if w is None else wd[t.cpu().clamp(min=0)][t.cpu() != -100].sum()
    scale = go.cpu().reshape(-1, 1).abs() / (d if reduction == "mean" else 1)
    terms = (p * wd.sum() + wd.reshape(1, -1) + 1) * scale
    assert bool((err <= 2 * u + 2.0 ** -21 * terms).all()), f"max {float((err / u).max()):.1f} ulp"
    frac_ours = float((err <= u).double().mean())
    frac_torch = float(((torch_ - ref).abs() <= u).double().mean())
    assert frac_ours >= frac_torch, (frac_ours, frac_torch)
    if go_kind == 1.0 or (dtype == torch.bfloat16 and go_kind in (4.0, -2.0)):
        assert frac_ours > 0.98  # the saved gradient, scaled exactly


def test_bfloat16_reuses_saved_gradient_only_where_exact():
    """bfloat16: the saved gradient times a power of two is the same as recomputing it."""
    x = (torch.randn(16, 300) * 3).bfloat16()
    t = torch.randint(0, 300, (16,))
    rec = input_grad(L.cross_entropy, x, t, torch.tensor(0.3), label_smoothing=0.1)
    for go in (2.0, 1024.0, -4.0):
        a = input_grad(L.cross_entropy, x, t, torch.tensor(go), label_smoothing=0.1)
        ops = torch.ops.labelsmooth_ext
        forced = ops.ce_grad(x, t, None, torch.tensor(go), None, -100, 0.1, 0, 1)  # recompute
        assert torch.equal(a, forced)
    assert rec.dtype == torch.bfloat16


@pytest.mark.parametrize("device", REAL_DEVICES)  # the emulated ops have no fake kernels
@pytest.mark.parametrize("red", [0, 1, 2])
def test_opcheck_ce_grad(device, red):
    from torch.library import opcheck

    x = torch.randn(7, 11, device=device).bfloat16()
    t = torch.tensor([0, 3, -100, 10, 5, 5, 1], device=device)
    go = torch.rand(7 if red == 0 else (), device=device)
    saved = torch.ops.labelsmooth_ext.ce_forward(x, t, None, -100, 0.1, 0, red, True)[1]
    for s in (None, saved):
        opcheck(torch.ops.labelsmooth_ext.ce_grad, (x, t, torch.rand(11, device=device), go, s, -100, 0.1, 1, red))
        opcheck(torch.ops.labelsmooth_ext.ce_grad, (x.half(), t, None, go, s if s is None else s.half(),
                                                   -100, 0.0, 0, red))
    opcheck(torch.ops.labelsmooth_ext.ce_grad_, (saved.clone(), x, t, None, go, -100, 0.1, 0, red))


# --------------------------------------------------------------------------------- autocast

def _autocast_case(device, dtype, weighted, reduction, prob, g):
    lin = torch.nn.Linear(24, 40).to(device)
    h = torch.randn(33, 24, generator=g).to(device)
    if prob:
        t = torch.softmax(torch.randn(33, 40, generator=g), 1).to(device)
    else:
        t = torch.randint(0, 40, (33,), generator=g)
        t[::5] = -100
        t = t.to(device)
    w = (torch.rand(40, generator=g) + 0.5).to(device) if weighted else None
    return lin, h, t, w


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", SIXTEEN)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("prob", [False, True])
@pytest.mark.parametrize("api", ["function", "module"])
def test_autocast_matches_pytorch(device, dtype, reduction, weighted, prob, api):
    """Under autocast PyTorch runs cross_entropy in float32: float32 loss, float32 weights
    accepted, and the logits' gradient in their 16-bit dtype. Ours reads the 16-bit logits."""
    g = torch.Generator().manual_seed(5)
    lin, h, t, w = _autocast_case(device, dtype, weighted, reduction, prob, g)
    results = []
    for impl in (L, torch.nn):
        kw = dict(weight=w, reduction=reduction, label_smoothing=0.1)
        if not prob:
            kw["ignore_index"] = -100
        lin.zero_grad()
        with torch.autocast(device, dtype=dtype):
            z = lin(h)
            z.retain_grad()
            if api == "module":
                loss = (impl.CrossEntropyLoss(**kw) if impl is L else torch.nn.CrossEntropyLoss(**kw))(z, t)
            else:
                loss = (L.cross_entropy if impl is L else F.cross_entropy)(z, t, **kw)
        assert z.dtype == dtype
        loss.sum().backward() if reduction != "none" else loss.backward(torch.linspace(0.5, 2, loss.numel(), device=device))
        results.append((loss.detach(), z.grad, lin.weight.grad.clone()))
    (lo, zo, wo), (lt, zt, wt) = results
    assert lo.dtype == lt.dtype == torch.float32
    assert zo.dtype == zt.dtype == dtype
    assert_close_to(lo, lt, torch.float32, "loss")
    assert_close_to(zo, zt, dtype, "logits' gradient")
    # a GEMM of two 16-bit operands under autocast, ours against PyTorch's (both rounded), not
    # against float64: the whole-tensor bound this test was written with
    assert_close_to(wo, wt, dtype, "linear weight gradient", ulps=0, atol_rel=TOL[dtype])


@pytest.mark.parametrize("device", REAL_DEVICES)  # the emulated ops have no fake kernels
def test_autocast_module_under_torch_compile(device):
    g = torch.Generator().manual_seed(6)
    lin, h, t, w = _autocast_case(device, torch.bfloat16, True, "mean", False, g)
    crit = torch.compile(L.CrossEntropyLoss(weight=w, label_smoothing=0.1), fullgraph=True)
    ref = torch.nn.CrossEntropyLoss(weight=w, label_smoothing=0.1)
    out = []
    for c in (crit, ref):
        lin.zero_grad()
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = c(lin(h), t)
        loss.backward()
        out.append((loss.detach(), lin.weight.grad.clone()))
    assert out[0][0].dtype == torch.float32
    assert_close_to(out[0][0], out[1][0], torch.float32, "loss")
    assert_close_to(out[0][1], out[1][1], torch.bfloat16, "weight gradient")
    explained = torch._dynamo.explain(L.CrossEntropyLoss(weight=w, label_smoothing=0.1))
    with torch.autocast(device, dtype=torch.bfloat16):
        assert explained(lin(h).detach().requires_grad_(), t).graph_break_count == 0



@pytest.mark.parametrize("dtype", SIXTEEN)
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("dynamic", [True, None])
def test_sixteen_bit_backward_under_torch_compile_with_symbolic_sizes(dtype, weighted, dynamic):
    """Symbolic sizes reach the C++ CPU backward of 16-bit logits: torch.compile(dynamic=True), and
    the default's recompile for a second batch size (automatic dynamic shapes). That backward
    once asked the saved gradient for numel(), which raises on symbolic sizes ("Cannot call
    numel() on tensor with symbolic sizes/strides"): found when test_autocast_module_under_torch_compile
    ran after test_regressions had compiled the same module code at another batch size."""
    torch._dynamo.reset()  # this test's own compiles: the first batch size is the static one
    g = torch.Generator().manual_seed(11)
    w = (torch.rand(40, generator=g) + 0.5).to(dtype) if weighted else None
    compiled = torch.compile(L.CrossEntropyLoss(weight=w, label_smoothing=0.1), fullgraph=True, dynamic=dynamic)
    for n, go in ((33, 1.0), (17, 1.0), (12, 2.5)):
        x = (torch.randn(n, 40, generator=g) * 3).to(dtype).requires_grad_()
        t = torch.randint(0, 40, (n,), generator=g)
        t[::5] = -100
        loss = compiled(x, t)
        loss.backward(torch.tensor(go, dtype=loss.dtype))
        xd = x.detach().double().requires_grad_()
        ref = F.cross_entropy(xd, t, weight=None if w is None else w.double(), label_smoothing=0.1)
        ref.backward(torch.tensor(go, dtype=torch.float64))
        assert_close_to(loss, ref, dtype, f"loss N={n}")
        assert_close_to(x.grad, xd.grad, dtype, f"gradient N={n}, incoming {go}")
    torch._dynamo.reset()

def test_mixed_weight_dtype_outside_autocast_is_an_error():
    x = torch.randn(4, 5).bfloat16()
    with pytest.raises(TypeError, match="weight dtype torch.float32 must match the input dtype torch.bfloat16"):
        L.cross_entropy(x, torch.tensor([0, 1, 2, 3]), weight=torch.rand(5))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # float32 logits: 16-bit weights upcast, as PyTorch
        x32 = torch.randn(4, 5)
        w16 = torch.rand(5).bfloat16()
        torch.testing.assert_close(L.cross_entropy(x32, torch.tensor([0, 1, 2, 3]), weight=w16),
                                   F.cross_entropy(x32, torch.tensor([0, 1, 2, 3]), weight=w16))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # float64 weights are not autocast's
        with pytest.raises(TypeError, match="weight dtype torch.float64"):
            L.cross_entropy(x, torch.tensor([0, 1, 2, 3]), weight=torch.rand(5, dtype=torch.float64))


def test_float32_loss_outside_autocast_keeps_input_dtype():
    x = torch.randn(4, 5).bfloat16()
    assert L.cross_entropy(x, torch.tensor([0, 1, 2, 3])).dtype == torch.bfloat16
    assert L.binary_cross_entropy_with_logits(x, torch.rand(4, 5).bfloat16()).dtype == torch.bfloat16


# ------------------------------------------------------------------------------- torch.func

def _func_case(dtype, weighted, g):
    x = torch.randn(6, 7, generator=g, dtype=dtype)
    t = torch.tensor([0, 6, -100, 3, 3, 1])
    w = torch.rand(7, generator=g, dtype=dtype) + 0.5 if weighted else None
    return x, t, w


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_torch_func_grad(dtype, weighted, reduction):
    x, t, w = _func_case(dtype, weighted, torch.Generator().manual_seed(7))
    kw = dict(weight=w, reduction=reduction, label_smoothing=0.2)
    ours = torch.func.grad(lambda x: L.cross_entropy(x, t, **kw))(x)
    ref = torch.func.grad(lambda x: F.cross_entropy(x.double(), t, **{**kw, "weight": None if w is None else w.double()}))(x)
    assert ours.dtype == dtype
    assert_close_to(ours, ref, dtype, "grad")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.skipif(not L._ops.HAS_VMAP_RULES,
                    reason=f"jacrev needs torch.library.register_vmap (torch >= 2.5; this is {torch.__version__})")
def test_torch_func_jacrev(dtype, reduction, weighted):
    x, t, w = _func_case(dtype, weighted, torch.Generator().manual_seed(8))
    kw = dict(weight=w, reduction=reduction, label_smoothing=0.1)
    ours = torch.func.jacrev(lambda x: L.cross_entropy(x, t, **kw))(x)
    ref = torch.func.jacrev(lambda x: F.cross_entropy(x, t, **kw))(x)
    assert ours.shape == ref.shape
    assert_close_to(ours, ref, dtype, "jacobian")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("mode", ["uniform", "off_target"])
def test_torch_func_vmap_of_grad_per_sample(dtype, weighted, mode):
    """Per-sample gradients (Opacus-style): vmap over samples of grad of the loss of one."""
    x, t, w = _func_case(dtype, weighted, torch.Generator().manual_seed(9))
    t = t.clamp(min=0)
    W = torch.randn(7, 7, dtype=dtype)

    def per_sample(fn, **extra):
        def loss(W, xi, ti):
            return fn((xi @ W)[None], ti[None], weight=w, label_smoothing=0.1, **extra)
        return torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(W, x, t)

    ours = per_sample(L.cross_entropy, smoothing_mode=mode)
    if mode == "uniform":
        ref = per_sample(F.cross_entropy)
    else:  # off_target is uniform smoothing with eps * K / (K - 1)
        ref = torch.func.vmap(torch.func.grad(lambda W, xi, ti: F.cross_entropy(
            (xi @ W)[None], ti[None], weight=w, label_smoothing=0.1 * 7 / 6)), in_dims=(None, 0, 0))(W, x, t)
    assert_close_to(ours, ref, dtype, "per-sample gradients")


@pytest.mark.parametrize("transform", ["grad_of_grad", "hessian", "jvp"])
def test_torch_func_higher_order_takes_the_composite_path(transform):
    """Transforms that differentiate the backward (or go forward-mode) give PyTorch's numbers."""
    x, t, w = _func_case(torch.float64, True, torch.Generator().manual_seed(10))
    results = []
    for fn in (L.cross_entropy, F.cross_entropy):
        f = lambda x: fn(x, t, weight=w, label_smoothing=0.1)
        if transform == "grad_of_grad":
            results.append(torch.func.grad(lambda x: torch.func.grad(f)(x).pow(2).sum())(x))
        elif transform == "hessian":
            results.append(torch.func.hessian(f)(x))
        else:
            results.append(torch.func.jvp(f, (x,), (torch.linspace(-1, 2, x.numel(), dtype=x.dtype).reshape(x.shape),))[1])
    assert results[0].abs().sum() > 0
    assert_close_to(results[0], results[1], torch.float64, transform)
