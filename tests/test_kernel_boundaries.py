"""Every block, vector width, tail and store threshold of the CPU kernels, in both CPU builds.

The sizes come from the kernels themselves (the cpu_kernel_constants operator), so the cases
follow a change of them: row lengths and positions of the target, of ignored rows, of NaN / inf
logits and of the row end exactly on, just before and just after each boundary.
"""
import json
import math

import pytest
import torch
import torch.nn.functional as F

import labelsmooth_ext as L
from conftest import DTYPES, assert_close_to, fused_row_semantics

CONSTANTS = json.loads(torch.ops.labelsmooth_ext.cpu_kernel_constants())
CAPABILITIES = [c for c in ("DEFAULT", "AVX2") if c in CONSTANTS]
DTYPE_NAME = {torch.float32: "float32", torch.float64: "float64", torch.bfloat16: "bfloat16",
              torch.float16: "float16"}


@pytest.fixture(params=["DEFAULT", "AVX2"])
def capability(request, monkeypatch):
    """Runs the test with the baseline or the AVX2 kernels (checked: the switch took effect)."""
    cap = request.param
    if cap not in CONSTANTS:
        pytest.skip(f"this build has no {cap} CPU kernels (not x86-64)")
    if cap == "DEFAULT":
        monkeypatch.setenv("LABELSMOOTH_EXT_CPU_CAPABILITY", "default")
    else:
        monkeypatch.delenv("LABELSMOOTH_EXT_CPU_CAPABILITY", raising=False)
    active = json.loads(torch.ops.labelsmooth_ext.cpu_kernel_constants())["active"]
    if cap == "AVX2" and active != "AVX2":
        pytest.skip("this CPU has no AVX2 + FMA + F16C")
    assert active == cap
    return cap


def lane_sizes(cap, dtype):
    c = CONSTANTS[cap]
    acc = "float64" if dtype == torch.float64 else "float32"
    return c["lanes"][acc], c["lanes"][DTYPE_NAME[dtype]]


def row_boundaries(cap, dtype):
    """Internal boundaries of a row (class indices where a block or vector starts)."""
    c = CONSTANTS[cap]
    v, h = lane_sizes(cap, dtype)
    stream_k = c["stream_min_bytes"] // torch.tensor([], dtype=dtype).element_size()
    return sorted({v, 2 * v, h, 2 * h, stream_k, c["store_block"], 2 * c["store_block"], c["exp_block"]})


def row_lengths(cap, dtype):
    out = {1, 2}
    for b in row_boundaries(cap, dtype):
        out.update({b - 1, b, b + 1})
    out.add(2 * CONSTANTS[cap]["exp_block"] + 1)
    return sorted(k for k in out if k >= 1)


def positions(K, cap, dtype):
    """On, just before and just after every boundary inside a row of K classes, and its ends."""
    out = {0, K - 1}
    for b in row_boundaries(cap, dtype):
        out.update(p for p in (b - 1, b, b + 1) if 0 <= p < K)
    return sorted(out)


def _pair(x, target, **kw):
    xx = x.detach().clone().requires_grad_()
    out = L.cross_entropy(xx, target, **kw)
    (g,) = torch.autograd.grad(out.sum(), xx)
    xd = x.detach().double().requires_grad_()
    w = kw.pop("weight", None)
    t = target.double() if target.is_floating_point() else target
    ref = F.cross_entropy(xd, t, weight=None if w is None else w.double(), **kw)
    (gr,) = torch.autograd.grad(ref.sum(), xd)
    if not target.is_floating_point():
        gr = fused_row_semantics(gr, target, kw.get("ignore_index", -100))
    return out, g, ref, gr


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weighted", [False, True])
def test_targets_and_ignored_rows_on_every_boundary(capability, dtype, weighted):
    g = torch.Generator().manual_seed(1)
    for K in row_lengths(capability, dtype):
        pos = positions(K, capability, dtype)
        t = torch.tensor(pos + [-100, pos[-1]])  # an ignored row between kept ones
        N = len(t)
        x = (torch.randn(N, K, generator=g) * 3).to(dtype)
        x[torch.arange(N - 2), t[:-2]] += 4.0  # the target near the row's max: p_y not tiny
        w = (torch.rand(K, generator=g) + 0.2).to(dtype) if weighted else None
        for eps, red in ((0.0, "none"), (0.1, "none"), (0.1, "mean")):
            out, gx, ref, gr = _pair(x, t, weight=w, label_smoothing=eps, reduction=red)
            what = f"{capability} K={K} eps={eps} {red}"
            assert_close_to(out, ref, dtype, what + " loss")
            assert_close_to(gx, gr, dtype, what + " grad")
            assert torch.equal(gx[N - 2], torch.zeros(K, dtype=dtype)), what + ": ignored row not 0"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_nan_and_inf_on_every_boundary(capability, dtype):
    g = torch.Generator().manual_seed(2)
    for K in row_lengths(capability, dtype):
        if K < 2:
            continue
        rows, tgts = [], []
        for p in positions(K, capability, dtype):
            for value in (float("nan"), float("inf"), float("-inf")):
                r = torch.randn(K, generator=g)
                r[p] = value
                rows.append(r)
                tgts.append((p + 1) % K)  # the target off the poisoned class
        x = torch.stack(rows).to(dtype)
        t = torch.tensor(tgts)
        out, gx, ref, gr = _pair(x, t, label_smoothing=0.1, reduction="none")
        assert_close_to(out, ref, dtype, f"{capability} K={K} loss")
        assert_close_to(gx, gr, dtype, f"{capability} K={K} grad")


@pytest.mark.parametrize("dtype", DTYPES)
def test_probability_targets_on_every_boundary(capability, dtype):
    g = torch.Generator().manual_seed(3)
    for K in row_lengths(capability, dtype):
        N = 3
        x = torch.randn(N, K, generator=g).to(dtype)
        p = torch.softmax(torch.randn(N, K, generator=g) * 2, 1).to(dtype)
        w = (torch.rand(K, generator=g) + 0.2).to(dtype)
        for mode_eps in (0.0, 0.3):
            out, gx, ref, gr = _pair(x, p, weight=w, label_smoothing=mode_eps, reduction="none")
            assert_close_to(out, ref, dtype, f"{capability} K={K} loss")
            assert_close_to(gx, gr, dtype, f"{capability} K={K} grad")


@pytest.mark.parametrize("dtype", DTYPES)
def test_k_dimensional_lane_boundaries(capability, dtype):
    """(N, C, S): one vector lane per position; S on, just before and just after multiples of
    the vector width; ignored, NaN and -inf positions on lane boundaries."""
    v, _ = lane_sizes(capability, dtype)
    g = torch.Generator().manual_seed(4)
    for S in sorted({1, v - 1, v, v + 1, 2 * v - 1, 2 * v + 1}):
        for C in (1, 3, v + 1):
            x = (torch.randn(2, C, S, generator=g) * 2).to(dtype)
            t = torch.randint(0, C, (2, S), generator=g)
            edges = [s for s in (v - 1, v, 2 * v - 1, S - 1) if 0 <= s < S]
            t[0, edges[0]] = -100
            if C > 1:
                x[1, 0, edges[-1]] = float("nan")
                x[0, :, edges[-1]] = float("-inf") if S > 1 else x[0, :, edges[-1]]
            w = (torch.rand(C, generator=g) + 0.2).to(dtype)
            for eps in (0.0, 0.2):
                for red in ("none", "sum"):
                    out, gx, ref, gr = _pair(x, t, weight=w, label_smoothing=eps, reduction=red)
                    what = f"{capability} C={C} S={S} eps={eps} {red}"
                    assert_close_to(out, ref, dtype, what + " loss")
                    assert_close_to(gx, gr, dtype, what + " grad")


def _ulps(y, x, fn=torch.exp):
    """|y - fn(x)| in units in the last place of float32 at fn(x) (float64 reference)."""
    v = fn(x.double())
    _, e = torch.frexp(v)
    ulp = torch.ldexp(torch.ones_like(v), (e - 24).clamp(min=-149))
    return (y.double() - v).abs() / ulp


def test_row_exp_error(capability):
    """The plain row kernels' exp (exp_row, csrc/cpu/kernels.h: the softcap pass's bounded exp
    on clamped arguments in the AVX2 build) over the float32 inputs the kernels feed it, z - m
    with m the row's finite max: every float in [-86, -0] at a prime stride of bit patterns
    (all mantissa residues, every binade; 11.5 million values), the few ulps above 0 that a
    rounded reference gives, and below -86. Bound: 2.05 ulps (AVX2; measured 2.035 at most over
    every float of [-86, -0], in 12 minutes; 1.992 on this sample), the baseline build's (the C library's expf, 0.502 measured) 1; below -86 the AVX2 build gives 0 (e^-86 =
    4.5e-38 absolute at most; exp_u20, used before, gave 0 below -87.3), -inf gives 0."""
    op = torch.ops.labelsmooth_ext.cpu_row_exp
    lo = int(torch.tensor([-86.0]).view(torch.int32))
    bits = torch.arange(-(2**31), lo + 1, 97, dtype=torch.int64)
    bits = torch.cat([bits, torch.tensor([lo, -(2**31) + 1, -(2**31)])])  # -86, the tiniest -x, -0
    x = bits.to(torch.int32).view(torch.float32)
    u = _ulps(op(x), x)
    bound = 2.05 if capability == "AVX2" else 1.0
    i = int(u.argmax())
    print(f"{capability}: max {float(u[i]):.3f} ulp at x = {float(x[i])!r}")
    assert float(u[i]) <= bound, (float(u[i]), float(x[i]))
    assert float(op(torch.tensor([0.0, -0.0])).min()) == 1.0  # the row max contributes exactly 1
    pos = torch.arange(0, 64, dtype=torch.int32).view(torch.float32)  # 0 and 63 ulps above it (subnormal)
    pos = torch.cat([pos, torch.tensor([1e-7, 2e-7, 1e-6])])
    assert float(_ulps(op(pos), pos).max()) <= bound
    below = torch.tensor([-86.00001, -86.5, -87.0, -87.4, -90.0, -104.0, -200.0, -3e38, float("-inf")])
    y = op(below)
    assert float(y[-1]) == 0.0 and bool((y >= 0).all())
    assert float((y.double() - torch.exp(below.double())).abs().max()) <= math.exp(-86)
    if capability == "AVX2":
        assert bool((y == 0).all())
    # the kernels' vector tails: any length, values at every lane
    for n in range(1, 20):
        xs = -torch.arange(n, dtype=torch.float32) * 3.7
        assert float(_ulps(op(xs), xs).max()) <= bound


def test_row_log_error(capability):
    """The spatial kernel's log of row sums (log_ge1, csrc/cpu/kernels.h) over the values it is
    fed, s in [1, 2^24] (the row max's own term is exactly 1; at most 2^24 classes): every float
    of [1, 2) (8.4 million: the whole mantissa range, where the result is smallest), every binade
    up to 2^24 at a prime stride of bit patterns, and the ends. Bound 1 ulp (measured on this
    sample: AVX2 0.827, the baseline build's Vectorized::log 0.818); log(1) is exactly 0."""
    op = torch.ops.labelsmooth_ext.cpu_row_log
    one = int(torch.tensor([1.0]).view(torch.int32))
    top = int(torch.tensor([2.0**24]).view(torch.int32))
    bits = torch.cat([torch.arange(one, one + 2**23, dtype=torch.int64),
                      torch.arange(one, top + 1, 101, dtype=torch.int64), torch.tensor([top])])
    x = bits.to(torch.int32).view(torch.float32)
    u = _ulps(op(x), x, torch.log)
    i = int(u.argmax())
    print(f"{capability}: max {float(u[i]):.3f} ulp at s = {float(x[i])!r}")
    assert float(u[i]) <= 1.0, (float(u[i]), float(x[i]))
    assert float(op(torch.tensor([1.0]))[0]) == 0.0
    # the vector tails: any length, values at every lane
    for n in range(1, 20):
        xs = 1 + torch.arange(n, dtype=torch.float32) * 3.7
        assert float(_ulps(op(xs), xs, torch.log).max()) <= 1.0


def test_row_exp_rejects_non_float32():
    with pytest.raises(ValueError, match="x must be a float32 CPU tensor"):
        torch.ops.labelsmooth_ext.cpu_row_exp(torch.zeros(3, dtype=torch.float64))


# ---- intra-op threads ---------------------------------------------------------------------

def _loss_and_grads(fn, x, *args, **kw):
    x = x.detach().clone().requires_grad_()
    out = fn(x, *args, **kw)
    loss = out[0] if isinstance(out, tuple) else out
    g = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).reshape(loss.shape) if loss.dim() else None
    loss.backward(g)
    return loss.detach(), x.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("case", ["rows", "rows_weighted_none", "spatial", "spatial_many_blocks", "prob",
                                  "softcap_zloss", "bce"])
def test_results_do_not_depend_on_the_thread_count(dtype, case):
    # The CPU kernels split rows (or spatial tiles) over torch's intra-op threads: each row's
    # arithmetic and the host-side finish of the mean must not depend on how many threads ran.
    g = torch.Generator().manual_seed(7)
    K = 1500
    if case == "spatial":
        x = torch.randn(4, 21, 33, 35, generator=g).to(dtype)
        t = torch.randint(0, 21, (4, 33, 35), generator=g)
        t[0, 0, :5] = -100
        call = lambda z: L.cross_entropy(z, t, label_smoothing=0.1)
    elif case == "spatial_many_blocks":  # 51200 positions: the mean's sum runs in 7 blocks
        x = torch.randn(2, 5, 160, 160, generator=g).to(dtype)
        t = torch.randint(0, 5, (2, 160, 160), generator=g)
        t[1, 3] = -100
        call = lambda z: L.cross_entropy(z, t, label_smoothing=0.1)
    elif case == "bce":
        x = torch.randn(300, 700, generator=g).to(dtype)
        t = torch.rand(300, 700, generator=g).to(dtype)
        call = lambda z: L.binary_cross_entropy_with_logits(z, t)
    else:
        x = (3 * torch.randn(301, K, generator=g)).to(dtype)
        t = torch.randint(0, K, (301,), generator=g)
        t[::7] = -100
        if case == "rows":
            call = lambda z: L.cross_entropy(z, t, label_smoothing=0.1)
        elif case == "rows_weighted_none":
            w = torch.rand(K, generator=g).to(dtype)
            call = lambda z: L.cross_entropy(z, t, weight=w, reduction="none", label_smoothing=0.2,
                                             smoothing_mode="off_target")
        elif case == "prob":
            p = torch.softmax(torch.randn(301, K, generator=g), 1).to(dtype)
            call = lambda z: L.cross_entropy(z, p, label_smoothing=0.1)
        else:
            call = lambda z: L.cross_entropy(z, t, label_smoothing=0.1, z_loss=1e-4, softcap=30.0)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _loss_and_grads(call, x)
        torch.set_num_threads(2)
        two = _loss_and_grads(call, x)
    finally:
        torch.set_num_threads(before)
    for a, b in zip(one, two):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("weighted", [False, True])
def test_spatial_nan_logit_below_the_max(capability, dtype, eps, weighted):
    """The spatial kernel's unweighted tile max may drop a NaN (maxps, AVX2); the NaN must then
    come back through S = sum (z - m): NaN loss and NaN gradient column at that position only,
    with and without smoothing, and in the first, a middle and the last lane of a tile."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 19, generator=g)
    for n, pos in ((0, 0), (0, 11), (1, 7), (1, 18)):
        x[n, 2, pos] = float("nan")
        x[n, 0, pos] = 100.0  # the max is a finite logit elsewhere
    x = x.to(dtype).requires_grad_()
    t = torch.randint(0, 5, (2, 19), generator=g)
    w = torch.rand(5, generator=g).to(dtype) + 0.5 if weighted else None
    loss = L.cross_entropy(x, t, w, label_smoothing=eps, reduction="none")
    (grad,) = torch.autograd.grad(loss.sum(), x)
    nan_at = torch.zeros(2, 19, dtype=torch.bool)
    for n, pos in ((0, 0), (0, 11), (1, 7), (1, 18)):
        nan_at[n, pos] = True
    assert torch.equal(loss.float().isnan(), nan_at)
    assert torch.equal(grad.float().isnan().all(1), nan_at)
    assert not bool(grad.float().isnan().any(1)[~nan_at].any())
