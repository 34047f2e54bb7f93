"""Every block, vector width, tail and store threshold of the CPU kernels, in both CPU builds.

The sizes come from the kernels themselves (the cpu_kernel_constants operator), so the cases
follow a change of them: row lengths and positions of the target, of ignored rows, of NaN / inf
logits and of the row end exactly on, just before and just after each boundary.
"""
import json

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
