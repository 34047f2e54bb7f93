"""Fused linear + cross-entropy (labelsmooth_ext.linear_cross_entropy): parity with linear +
cross-entropy (the float64 reference, PyTorch's F.linear_cross_entropy and F.cross_entropy, our
own cross_entropy), gradients, chunking, torch.compile, opcheck and argument errors. CPU only;
small shapes, so the whole file runs in seconds."""
import pytest
import torch
import torch.nn.functional as F

import labelsmooth_ext as L
from labelsmooth_ext import linear as lin
from labelsmooth_ext import reference as R

from conftest import TOL, assert_close_to

N, H, V = 23, 6, 11  # chunk sizes below (1, 5, 7) do not divide N



def torch_linear_ce(x, W, t, linear_bias=None, ignore_index=-100, **kw):
    """PyTorch's F.linear_cross_entropy (2.14); before it existed (torch 2.4 in CI), its
    definition: linear + F.cross_entropy (ignore_index None meaning -100)."""
    if hasattr(F, "linear_cross_entropy"):
        return F.linear_cross_entropy(x, W, t, linear_bias=linear_bias, ignore_index=ignore_index, **kw)
    return F.cross_entropy(F.linear(x, W, linear_bias), t,
                           ignore_index=-100 if ignore_index is None else ignore_index, **kw)

def make(n=N, h=H, v=V, dtype=torch.float64, bias=True, ignore=-100, seed=0, lead=None):
    g = torch.Generator().manual_seed(seed)
    shape = (n,) if lead is None else lead
    x = torch.randn(*shape, h, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    W = torch.randn(v, h, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    b = torch.randn(v, generator=g, dtype=torch.float64).to(dtype).requires_grad_() if bias else None
    t = torch.randint(0, v, shape, generator=g)
    t.view(-1)[::4] = ignore
    w = torch.rand(v, generator=g, dtype=torch.float64).to(dtype) + 0.1
    return x, W, b, t, w


def params(x, W, b):
    return [p for p in (x, W, b) if p is not None]


def grads(loss, ps, go=None):
    return torch.autograd.grad(loss, ps, go, retain_graph=True)


def oracle(x, W, b, t, **kw):
    """linear + the float64 reference cross_entropy, on rows."""
    h = x.shape[-1]
    z = F.linear(x.reshape(-1, h), W, b)
    red = kw.pop("reduction", "mean")
    out = R.cross_entropy(z, t.reshape(-1), kw.pop("weight", None), reduction=red, **kw)
    return out.reshape(t.shape) if red == "none" else out


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("z_loss,softcap", [(0.0, None), (0.01, None), (0.0, 2.0), (0.02, 1.5)])
@pytest.mark.parametrize("mode", ["uniform", "off_target"])
def test_matches_float64_reference(reduction, weighted, bias, z_loss, softcap, mode):
    x, W, b, t, w = make(bias=bias)
    kw = dict(weight=w if weighted else None, reduction=reduction, label_smoothing=0.1,
              smoothing_mode=mode, z_loss=z_loss, softcap=softcap)
    ours = L.linear_cross_entropy(x, W, t, linear_bias=b, chunk_size=7, **kw)
    ref = oracle(x, W, b, t, **kw)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    go = torch.rand_like(ref) + 0.5  # not 1: the backward's scaling is exercised too
    for a, e in zip(grads(ours, params(x, W, b), go), grads(ref, params(x, W, b), go)):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_device_side_mean_scale(monkeypatch, weighted, dtype):
    """The path CUDA takes (1/D kept on the device, per-row scale) gives the same results."""
    x, W, b, t, w = make(dtype=dtype)
    kw = dict(linear_bias=b, weight=w if weighted else None, label_smoothing=0.1, chunk_size=7)
    host = L.linear_cross_entropy(x, W, t, **kw)
    g_host = grads(host, [x, W, b])
    monkeypatch.setattr(lin, "_SCALE_ON_HOST", False)
    dev = L.linear_cross_entropy(x, W, t, **kw)
    torch.testing.assert_close(dev, host, rtol=0, atol=0)
    for a, e in zip(grads(dev, [x, W, b]), g_host):
        torch.testing.assert_close(a, e)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("all_ignored", [False, True])
def test_cuda_path_on_the_cpu(monkeypatch, reduction, dtype, all_ignored):
    """The path CUDA takes (every row kept, ce_forward_ext's gradient in a second buffer, 1/D of
    the mean on the device), run here on the CPU, against the float64 oracle. For 16-bit inputs
    under "mean" and "sum", d W's GEMM gets the 16-bit chunk as it is (_addmm_f32: on CUDA
    cuBLAS with float32 output, no float32 copies) and the mean's 1/D multiplies d W and d b
    once at the end; "none"'s backward (a factor per row) still widens."""
    calls = []
    real = lin._addmm_f32

    def spy(out, a, b, beta, alpha):
        calls.append((out.dtype, a.dtype, b.dtype))
        return real(out, a, b, beta, alpha)

    monkeypatch.setattr(lin, "_in_place_step", lambda dev: False)
    monkeypatch.setattr(lin, "_SCALE_ON_HOST", False)
    monkeypatch.setattr(lin, "_addmm_f32", spy)
    x, W, b, t, w = make(n=40, h=16, v=50, dtype=dtype)
    if all_ignored:
        t = torch.full_like(t, -100)
    kw = dict(weight=w, label_smoothing=0.1, reduction=reduction)
    ours = L.linear_cross_entropy(x, W, t, linear_bias=b, chunk_size=16, **kw)
    x64, W64, b64 = (p.detach().double().requires_grad_() for p in (x, W, b))
    ref = oracle(x64, W64, b64, t, **dict(kw, weight=w.double()))
    assert_close_to(ours, ref, dtype, "loss", atol_rel=TOL[dtype])  # 16-bit logits per row
    go = torch.rand_like(ref) + 0.5 if reduction == "none" else None
    g_ours = grads(ours, [x, W, b], None if go is None else go.to(dtype))
    for a, e, p, name in zip(g_ours, grads(ref, [x64, W64, b64], go), (x, W, b), ("d input", "d W", "d b")):
        assert a.dtype == p.dtype, name
        assert_close_to(a, e, dtype, name, ulps=0, atol_rel=TOL[dtype])
        if all_ignored:
            assert not a.any(), name  # zeros, as PyTorch (not 0 * inf of an empty mean)
    narrow = dtype != torch.float32 and reduction != "none"
    assert bool(calls) == narrow
    assert all(o == torch.float32 and a == dtype and bb == dtype for o, a, bb in calls)


def test_addmm_f32_uses_out_dtype_where_accepted(monkeypatch):
    """_addmm_f32 hands the 16-bit operands to addmm(out_dtype=float32) where the device takes
    it. Checked here on the meta device (PyTorch's shape and dtype rules for CUDA's kernel: a
    float32 d W added to a 16-bit product); the CPU refuses out_dtype, so it widens (once
    refused, never tried again), with the same float32 result."""
    monkeypatch.setattr(lin, "_F32_OUT_GEMM", {"meta": None, "cpu": None})
    # addmm's out_dtype overload exists from later torch releases on (not in 2.4): where it is
    # absent the meta device refuses too, and the widening path must serve it
    has_out_dtype = any("out_dtype" in str(s) for s in torch._C._jit_get_schemas_for_operator("aten::addmm"))
    for dt in (torch.bfloat16, torch.float16):
        out = torch.empty(32, 16, device="meta")
        a = torch.empty(8, 32, dtype=dt, device="meta").t()
        bm = torch.empty(8, 16, dtype=dt, device="meta")
        assert lin._addmm_f32(out, a, bm, 1, 0.5) is out
        assert lin._F32_OUT_GEMM["meta"] is has_out_dtype and out.dtype == torch.float32
    g = torch.Generator().manual_seed(0)
    a = torch.randn(8, 32, generator=g).bfloat16()
    bc = torch.randn(8, 16, generator=g).bfloat16()
    out = torch.randn(32, 16, generator=g)
    expect = out.double() + 0.5 * (a.t().double() @ bc.double())
    lin._addmm_f32(out, a.t(), bc, 1, 0.5)
    assert lin._F32_OUT_GEMM["cpu"] is False
    torch.testing.assert_close(out.double(), expect, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("eps", [0.0, 0.1, 1.0])
def test_matches_torch_linear_cross_entropy(reduction, weighted, bias, eps):
    """PyTorch 2.14's F.linear_cross_entropy (reference path, options=None) and linear +
    F.cross_entropy, float64, including a custom ignore_index."""
    x, W, b, t, w = make(bias=bias, ignore=3)
    kw = dict(weight=w if weighted else None, reduction=reduction, ignore_index=3, label_smoothing=eps)
    ours = L.linear_cross_entropy(x, W, t, linear_bias=b, chunk_size=5, **kw)
    ps = params(x, W, b)
    refs = [F.cross_entropy(F.linear(x, W, b), t, **kw)]
    if hasattr(F, "linear_cross_entropy"):
        refs.append(F.linear_cross_entropy(x, W, t, linear_bias=b, options=None, **kw))
    for ref in refs:
        torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
        go = torch.linspace(0.5, 2.0, ref.numel(), dtype=ref.dtype).reshape(ref.shape)
        for a, e in zip(grads(ours, ps, go), grads(ref, ps, go)):
            torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


def test_single_example_and_ignore_index_none():
    """input (H,) with a scalar target, as PyTorch; ignore_index=None means -100 there."""
    x, W, b, _, _ = make(bias=True)
    xi, t = x[3].detach().requires_grad_(), torch.tensor(4)
    ours = L.linear_cross_entropy(xi, W, t, linear_bias=b, ignore_index=None, label_smoothing=0.2)
    ref = torch_linear_ce(xi, W, t, linear_bias=b, ignore_index=None, label_smoothing=0.2)
    assert ours.shape == ()
    torch.testing.assert_close(ours, ref)
    for a, e in zip(grads(ours, [xi, W, b]), grads(ref, [xi, W, b])):
        torch.testing.assert_close(a, e)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_3d_input_is_rows(reduction):
    x, W, b, t, w = make(lead=(3, 5))
    ours = L.linear_cross_entropy(x, W, t, linear_bias=b, weight=w, reduction=reduction,
                                  label_smoothing=0.1, chunk_size=4)
    ref = oracle(x, W, b, t, weight=w, reduction=reduction, label_smoothing=0.1)
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref)
    go = torch.rand_like(ref)
    for a, e in zip(grads(ours, [x, W, b], go), grads(ref, [x, W, b], go)):
        assert a.shape == e.shape
        torch.testing.assert_close(a, e)


@pytest.mark.parametrize("chunk_size", [1, 5, N, 1000, None])
def test_chunk_size_does_not_change_the_result(chunk_size):
    x, W, b, t, w = make()
    kw = dict(linear_bias=b, weight=w, label_smoothing=0.1, z_loss=0.01)
    ours = L.linear_cross_entropy(x, W, t, chunk_size=chunk_size, **kw)
    ref = oracle(x, W, b, t, weight=w, label_smoothing=0.1, z_loss=0.01)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    for a, e in zip(grads(ours, [x, W, b]), grads(ref, [x, W, b])):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


def test_the_kernel_only_ever_sees_one_chunk(monkeypatch):
    """The logits are never materialised beyond one chunk: every row-kernel call gets at most
    chunk_size rows (the chunk's GEMM output), in the forward and in the 'none' backward."""
    seen = []

    class Spy:
        def __getattr__(self, name):
            real = getattr(torch.ops.labelsmooth_ext, name)
            if name not in ("ce_forward", "ce_forward_ext", "ce_forward_grad_"):
                return real

            def call(z, *args):
                seen.append(tuple(z.shape))
                return real(z, *args)
            return call

    monkeypatch.setattr(lin, "ops", Spy())
    x, W, b, t, _ = make(n=50)
    for red in ("mean", "none"):
        loss = L.linear_cross_entropy(x, W, t, linear_bias=b, reduction=red, chunk_size=8)
        loss.sum().backward()
    assert seen and all(r <= 8 and k == V for r, k in seen)
    # mean: one pass; none: forward + backward; on the CPU only the rows not ignored
    kept = int((t != -100).sum())
    assert kept < 50
    assert sum(r for r, _ in seen) == 3 * kept


def test_auto_chunk_size_bounds_the_chunk():
    c = lin.auto_chunk_size(1 << 20, 128256, torch.float32, torch.device("cpu"))
    assert 1 <= c and c * 128256 * 4 <= lin.CPU_CHUNK_BYTES and c % 8 == 0
    assert lin.auto_chunk_size(3, 10, torch.float32, torch.device("cpu")) == 3
    assert lin.auto_chunk_size(0, 10, torch.float32, torch.device("cpu")) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("extras", [{}, {"z_loss": 1e-3, "softcap": 5.0}])
def test_low_precision_against_float64(dtype, extras):
    """Every dtype: ours and linear + our cross_entropy, both against the float64 oracle."""
    x, W, b, t, w = make(n=40, h=16, v=50, dtype=dtype)
    kw = dict(weight=w, label_smoothing=0.1, **extras)
    ours = L.linear_cross_entropy(x, W, t, linear_bias=b, chunk_size=16, **kw)
    assert ours.dtype == dtype
    x64, W64, b64 = (p.detach().double().requires_grad_() for p in (x, W, b))
    ref = oracle(x64, W64, b64, t, weight=w.double(), label_smoothing=0.1, **extras)
    assert_close_to(ours, ref, dtype, "loss")
    g_ours = grads(ours, [x, W, b])
    for a, e, p, name in zip(g_ours, grads(ref, [x64, W64, b64]), (x, W, b), ("d input", "d W", "d b")):
        assert a.dtype == p.dtype, name
        # 16-bit GEMMs (d input = g W, d W = g^T x) round their products and sums in the input
        # dtype: the whole-tensor bound, not 1 ULP per element
        assert_close_to(a, e, dtype, name, ulps=0, atol_rel=TOL[dtype])
    if not extras:  # linear + our cross_entropy in the same dtype agrees as closely
        theirs = L.cross_entropy(F.linear(x, W, b), t, w, label_smoothing=0.1)
        assert_close_to(ours, theirs.double(), dtype, "loss vs linear + cross_entropy")


def test_all_rows_ignored():
    x, W, b, t, w = make()
    t = torch.full_like(t, -100)
    for weight in (None, w):
        mean = L.linear_cross_entropy(x, W, t, linear_bias=b, weight=weight, label_smoothing=0.1, chunk_size=5)
        ref = torch_linear_ce(x, W, t, linear_bias=b, weight=weight, label_smoothing=0.1)
        assert mean.isnan() and ref.isnan()
        for a, e in zip(grads(mean, [x, W, b]), grads(ref, [x, W, b])):
            torch.testing.assert_close(a, e)  # zeros, as PyTorch
            assert not a.any()
        s = L.linear_cross_entropy(x, W, t, linear_bias=b, weight=weight, reduction="sum", z_loss=0.1)
        assert float(s.detach()) == 0.0
        none = L.linear_cross_entropy(x, W, t, weight=weight, reduction="none")
        assert not none.any()


def test_empty_input():
    x, W, b, t, _ = make(n=0)
    assert L.linear_cross_entropy(x, W, t, linear_bias=b, reduction="sum") == 0
    assert L.linear_cross_entropy(x, W, t, reduction="mean").isnan()
    assert L.linear_cross_entropy(x, W, t, reduction="none").shape == (0,)


def test_only_the_gradients_asked_for():
    x, W, b, t, _ = make()
    W.requires_grad_(False)
    loss = L.linear_cross_entropy(x, W, t, linear_bias=b, label_smoothing=0.1)
    ref = oracle(x, W, b, t, label_smoothing=0.1)
    for a, e in zip(grads(loss, [x, b]), grads(ref, [x, b])):
        torch.testing.assert_close(a, e)
    with torch.no_grad():
        torch.testing.assert_close(L.linear_cross_entropy(x, W, t, linear_bias=b, label_smoothing=0.1),
                                   ref.detach())


def test_backward_twice_and_accumulation():
    x, W, b, t, _ = make()
    loss = L.linear_cross_entropy(x, W, t, linear_bias=b, label_smoothing=0.1)
    loss.backward(retain_graph=True)
    first = W.grad.clone()
    (2 * loss).backward()
    torch.testing.assert_close(W.grad, 3 * first)
    ref = oracle(x, W, b, t, label_smoothing=0.1)
    torch.testing.assert_close(first, grads(ref, [W])[0])


def test_double_backward_is_a_clear_error():
    x, W, b, t, _ = make()
    loss = L.linear_cross_entropy(x, W, t, linear_bias=b)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, [x], create_graph=True)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradcheck(reduction):
    x, W, b, t, w = make(n=7, h=3, v=5)
    t[1] = -100

    def f(x, W, b):
        return L.linear_cross_entropy(x, W, t, linear_bias=b, weight=w, reduction=reduction,
                                      label_smoothing=0.2, z_loss=0.05, softcap=2.0, chunk_size=3)
    assert torch.autograd.gradcheck(f, (x, W, b))


def _explain(fn, *args):
    import torch._dynamo

    torch._dynamo.reset()
    return torch._dynamo.explain(fn)(*args)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_torch_compile_fullgraph(reduction):
    x, W, b, t, w = make(dtype=torch.float32)

    def f(x, W, b, t):
        loss = L.linear_cross_entropy(x, W, t, linear_bias=b, weight=w, reduction=reduction,
                                      label_smoothing=0.1, z_loss=0.01, chunk_size=5)
        return loss if reduction == "mean" else (loss * torch.arange(loss.numel())).sum()

    assert _explain(f, x, W, b, t).graph_break_count == 0
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = compiled(x, W, b, t)
    want = f(x, W, b, t)
    torch.testing.assert_close(got, want)
    for a, e in zip(grads(got, [x, W, b]), grads(want, [x, W, b])):
        torch.testing.assert_close(a, e)


def test_torch_compile_inductor():
    x, W, b, t, _ = make(dtype=torch.float32)

    def f(x, W, b, t):
        return L.linear_cross_entropy(x, W, t, linear_bias=b, label_smoothing=0.1) * 3.0

    got = torch.compile(f, fullgraph=True)(x, W, b, t)
    want = f(x, W, b, t)
    torch.testing.assert_close(got, want)
    for a, e in zip(grads(got, [x, W, b]), grads(want, [x, W, b])):
        torch.testing.assert_close(a, e)


@pytest.mark.parametrize("reduction", [0, 1, 2])
def test_opcheck(reduction):
    x, W, b, t, w = make(n=9, h=4, v=6)
    args = (x, W, b, t, w, -100, 0.1, 0, reduction, 0.01, 3.0, 4, True, True, True)
    torch.library.opcheck(lin.linear_ce_forward, args)
    if reduction == 0:
        plain = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
        go = torch.rand(9, dtype=torch.float64)
        torch.library.opcheck(lin.linear_ce_backward, (go,) + plain[:8] + plain[9:])


def test_module():
    torch.manual_seed(0)
    m = L.LinearCrossEntropyLoss(H, V, bias=True, dtype=torch.float64, label_smoothing=0.1,
                                 smoothing_mode="off_target", z_loss=0.01, chunk_size=4)
    if hasattr(torch.nn, "LinearCrossEntropyLoss"):
        assert isinstance(m, torch.nn.LinearCrossEntropyLoss)
        theirs = torch.nn.LinearCrossEntropyLoss(H, V, bias=True, dtype=torch.float64)
        assert m.state_dict().keys() == theirs.state_dict().keys()
    x, _, _, t, _ = make()
    out = m(x, t)
    ref = oracle(x, m.linear.weight, m.linear.bias, t, label_smoothing=0.1,
                 smoothing_mode="off_target", z_loss=0.01)
    torch.testing.assert_close(out, ref)
    out.backward()
    assert m.linear.weight.grad is not None and m.linear.bias.grad is not None
    assert "smoothing_mode='off_target'" in repr(m)


def test_reference_extensions_from_their_definitions():
    """The oracle's z_loss and softcap, checked against PyTorch on the capped logits plus the
    z-loss written out (semantics.md: unweighted, kept rows, the CE's denominator)."""
    g = torch.Generator().manual_seed(1)
    z = torch.randn(9, 7, generator=g, dtype=torch.float64) * 4
    t = torch.randint(0, 7, (9,), generator=g)
    t[2] = -100
    w = torch.rand(7, generator=g, dtype=torch.float64)
    capped = 3.0 * torch.tanh(z / 3.0)
    lse = torch.logsumexp(capped, 1)
    zl = torch.where(t != -100, 0.01 * lse ** 2, torch.zeros(()))
    for red in ("none", "sum", "mean"):
        ce = F.cross_entropy(capped, t, w, reduction=red, label_smoothing=0.1)
        extra = {"none": zl, "sum": zl.sum(), "mean": zl.sum() / w[t[t != -100]].sum()}[red]
        got = R.cross_entropy(z, t, w, reduction=red, label_smoothing=0.1, z_loss=0.01, softcap=3.0)
        torch.testing.assert_close(got, ce + extra)


def _bad(**changes):
    x, W, b, t, w = make(dtype=torch.float32)
    kw = dict(input=x, linear_weight=W, target=t, linear_bias=b)
    kw.update(changes)
    return kw


@pytest.mark.parametrize("changes,exc,match", [
    (dict(input=torch.ones(N, H, dtype=torch.int64)), TypeError, "input must be a floating"),
    (dict(input=[1.0]), TypeError, "input must be a torch.Tensor"),
    (dict(input=torch.tensor(1.0)), ValueError, "input must have at least 1"),
    (dict(linear_weight=torch.randn(V)), ValueError, "linear_weight must be 2-d"),
    (dict(linear_weight=torch.randn(V, H + 1)), ValueError, "linear_weight shape"),
    (dict(linear_weight=torch.randn(0, H)), ValueError, "linear_weight must have at least one"),
    (dict(linear_weight=torch.randn(V, H, dtype=torch.float64)), TypeError, "linear_weight dtype"),
    (dict(linear_bias=torch.randn(V + 1)), ValueError, "linear_bias must have shape"),
    (dict(linear_bias=torch.randn(V, dtype=torch.float64)), TypeError, "linear_bias dtype"),
    (dict(linear_bias=1.0), TypeError, "linear_bias must be a torch.Tensor"),
    (dict(target=torch.rand(N)), TypeError, "probability targets are not supported"),
    (dict(target=torch.zeros(N, dtype=torch.bool)), TypeError, "target must hold class indices"),
    (dict(target=torch.zeros(N + 1, dtype=torch.int64)), ValueError, "target shape"),
    (dict(target=torch.full((N,), V)), IndexError, f"target {V} \\(at row 0\\) is out of range"),
    (dict(weight=torch.rand(V + 1)), ValueError, "weight must be a 1-d tensor"),
    (dict(weight=torch.rand(V, dtype=torch.float64)), TypeError, "weight dtype"),
    (dict(reduction="avg"), ValueError, "reduction"),
    (dict(label_smoothing=1.5), ValueError, "label_smoothing"),
    (dict(smoothing_mode="other"), ValueError, "smoothing_mode"),
    (dict(z_loss=-1.0), ValueError, "z_loss"),
    (dict(z_loss="a"), TypeError, "z_loss"),
    (dict(softcap=0.0), ValueError, "softcap"),
    (dict(softcap=float("inf")), ValueError, "softcap"),
    (dict(chunk_size=0), ValueError, "chunk_size"),
    (dict(chunk_size=2.5), ValueError, "chunk_size"),
    (dict(ignore_index=1.5), TypeError, "ignore_index"),
])
def test_errors_name_the_argument(changes, exc, match):
    kw = _bad(**changes)
    with pytest.raises(exc, match=match):
        L.linear_cross_entropy(kw.pop("input"), kw.pop("linear_weight"), kw.pop("target"), **kw)


def test_off_target_needs_two_classes():
    x, W, _, _, _ = make(v=1)
    with pytest.raises(ValueError, match="off_target"):
        L.linear_cross_entropy(x, W, torch.zeros(N, dtype=torch.int64), label_smoothing=0.1,
                               smoothing_mode="off_target")


# --- the CPU chunk step: ce_forward_grad_ (loss + gradient written over the logits) -----------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("z_loss,softcap", [(0.0, 0.0), (0.02, 0.0), (0.0, 1.5), (0.01, 2.0)])
@pytest.mark.parametrize("per_row", [False, True])
def test_ce_forward_grad_op_against_float64(dtype, weighted, z_loss, softcap, per_row):
    """Per-row losses returned, and each row's gradient times its factor written over the
    logits, against the float64 reference and autograd."""
    g = torch.Generator().manual_seed(1)
    z64 = torch.randn(13, 37, generator=g, dtype=torch.float64) * 3
    t = torch.randint(0, 37, (13,), generator=g)
    t[::5] = -100
    w = (torch.rand(37, generator=g, dtype=torch.float64) + 0.1).to(dtype) if weighted else None
    w64 = None if w is None else w.double()  # the reference sees the rounded weights
    factors = torch.rand(13, generator=g, dtype=torch.float64) + 0.5
    z = z64.to(dtype)
    zin = z.double().requires_grad_()
    ref = R.cross_entropy(zin, t, w64, reduction="none", label_smoothing=0.1, z_loss=z_loss,
                          softcap=softcap or None)
    scale = 0.37
    want_g = torch.autograd.grad(ref, zin, factors if per_row else torch.full_like(ref, scale))[0]
    buf = z.clone()
    ptr = buf.data_ptr()
    rows = torch.ops.labelsmooth_ext.ce_forward_grad_(
        buf, t, w, -100, 0.1, 0, z_loss, softcap, scale,
        factors if per_row else None)
    assert buf.data_ptr() == ptr and rows.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close_to(rows.double(), ref.detach(), dtype, "losses")
    assert (rows[t == -100] == 0).all() and (buf[t == -100] == 0).all()
    assert_close_to(buf.double(), want_g, dtype, "gradient written over the logits")


def test_ce_forward_grad_op_opcheck_and_errors():
    z = torch.randn(5, 7, dtype=torch.float64)
    t = torch.tensor([0, 6, -100, 3, 1])
    torch.library.opcheck(torch.ops.labelsmooth_ext.ce_forward_grad_.default,
                          (z.clone(), t, None, -100, 0.1, 0, 0.01, 2.0, 0.5, None))
    torch.library.opcheck(torch.ops.labelsmooth_ext.ce_forward_grad_.default,
                          (z.clone(), t, None, -100, 0.1, 1, 0.0, 0.0, 1.0, torch.rand(5, dtype=torch.float64)))
    op = torch.ops.labelsmooth_ext.ce_forward_grad_
    with pytest.raises(ValueError, match="contiguous"):
        op(torch.randn(7, 5, dtype=torch.float64).t(), t, None, -100, 0.1, 0, 0.0, 0.0, 1.0, None)
    with pytest.raises(ValueError, match="row_scale"):
        op(z.clone(), t, None, -100, 0.1, 0, 0.0, 0.0, 1.0, torch.ones(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="z_loss"):
        op(z.clone(), t, None, -100, 0.1, 0, -1.0, 0.0, 1.0, None)
    with pytest.raises(IndexError, match="out of range"):
        op(z.clone(), torch.tensor([0, 7, 1, 2, 3]), None, -100, 0.1, 0, 0.0, 0.0, 1.0, None)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_ignored_rows_are_skipped(reduction):
    """The CPU leaves the ignored rows out of the GEMMs: their d input is exactly 0 and nothing
    of them reaches d W / d b, even where their inputs are not finite (linear + cross_entropy
    would carry 0 * NaN = NaN into d W there). The kept rows' results equal the float64
    reference on the kept rows alone."""
    x, W, b, t, w = make(n=30)
    with torch.no_grad():
        x[t == -100] = float("nan")
    kw = dict(weight=w, reduction=reduction, label_smoothing=0.1, z_loss=0.01, softcap=3.0)
    ours = L.linear_cross_entropy(x, W, t, linear_bias=b, chunk_size=4, **kw)
    keep = t != -100
    xk = x.detach()[keep].clone().requires_grad_()
    ref = oracle(xk, W, b, t[keep], **kw)
    go = torch.rand(30, dtype=torch.float64) + 0.5 if reduction == "none" else None
    if reduction == "none":
        assert (ours[~keep] == 0).all()
        torch.testing.assert_close(ours[keep], ref, rtol=1e-12, atol=1e-12)
        gx, gW, gb = grads(ours, [x, W, b], go)
        ex, eW, eb = grads(ref, [xk, W, b], go[keep])
    else:
        torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
        gx, gW, gb = grads(ours, [x, W, b])
        ex, eW, eb = grads(ref, [xk, W, b])
    assert (gx[~keep] == 0).all()
    torch.testing.assert_close(gx[keep], ex, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gW, eW, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gb, eb, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("extras", [{}, {"z_loss": 1e-3, "softcap": 5.0}])
def test_autocast_bfloat16_gemms_float32_loss(reduction, extras):
    """Under torch.autocast (bfloat16): the GEMMs take the bfloat16-rounded x, W, b (as
    F.linear does there), the loss is float32, the gradients come back in float32. Values
    against the float64 reference on the rounded operands, and against autocast linear + our
    cross_entropy."""
    x, W, b, t, w = make(n=40, h=16, v=50, dtype=torch.float32)
    kw = dict(weight=w, label_smoothing=0.1, reduction=reduction, **extras)
    seen = []
    real = torch.ops.labelsmooth_ext.ce_forward_grad_

    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = L.linear_cross_entropy(x, W, t, linear_bias=b, chunk_size=16, **kw)
        theirs = L.cross_entropy(F.linear(x, W, b), t, w, label_smoothing=0.1, reduction=reduction,
                                 **extras)
    assert ours.dtype == torch.float32 and theirs.dtype == torch.float32
    r64 = [p.detach().bfloat16().double().requires_grad_() for p in (x, W, b)]
    ref = oracle(*r64, t, **dict(kw, weight=w.double()))
    # the logits are rounded to bfloat16 once (the GEMM's output): a row's loss moves by up to
    # a few ulps of the largest logit
    zmax = float(F.linear(*r64).detach().abs().max())
    assert_close_to(ours.double(), ref.detach(), torch.bfloat16, "loss", atol_rel=2.0 ** -8, scale=zmax)
    assert_close_to(ours.double(), theirs.double(), torch.bfloat16, "loss vs linear + cross_entropy",
                    atol_rel=2.0 ** -8, scale=zmax)
    go = torch.rand_like(ref) + 0.5 if reduction == "none" else None
    g_ours = grads(ours, [x, W, b], None if go is None else go.float())
    for a, e, name in zip(g_ours, grads(ref, r64, go), ("d input", "d W", "d b")):
        assert a.dtype == torch.float32, name
        assert_close_to(a.double(), e, torch.bfloat16, name, ulps=0, atol_rel=TOL[torch.bfloat16])
    # and the GEMMs really ran in bfloat16: the row kernel saw bfloat16 logits
    seen.clear()

    class Spy:
        def __getattr__(self, name):
            op = getattr(torch.ops.labelsmooth_ext, name)
            if name != "ce_forward_grad_":
                return op

            def call(z, *args):
                seen.append(z.dtype)
                return real(z, *args)
            return call

    saved = lin.ops
    lin.ops = Spy()
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            L.linear_cross_entropy(x, W, t, linear_bias=b, **kw).sum().backward()
    finally:
        lin.ops = saved
    assert seen and set(seen) == {torch.bfloat16}
