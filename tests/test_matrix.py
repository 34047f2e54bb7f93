"""The full argument matrix by value (Hypothesis): target kind x smoothing mode x weight x
reduction x 2-d / K-dim / 1-d input x incoming gradient x dtype, against the float64 reference;
and the 16-bit numerics of the CPU kernels (p_y near 1 and near 0, logits at the dtype's limits,
incoming gradients other than 1)."""
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import labelsmooth_ext as L
from labelsmooth_ext import reference
from conftest import DTYPES, assert_close_to, skip_if_subnormals_flushed

LONG = os.environ.get("LSE_FUZZ", "") == "long"
SETTINGS = settings(max_examples=2000 if LONG else 150, deadline=None, derandomize=not LONG,
                    suppress_health_check=list(HealthCheck), database=None)


def _check(x, target, dtype, go_kind, seed, **kw):
    """Our loss and input gradient (backward with an incoming gradient) vs the reference."""
    g = torch.Generator().manual_seed(seed)
    xx = x.detach().clone().requires_grad_()
    out = L.cross_entropy(xx, target, **kw)
    if go_kind == "one":
        go = torch.ones_like(out)
    elif go_kind == "scalar" or out.dim() == 0:
        go = torch.full_like(out, float(torch.rand((), generator=g) * 4 - 2))
    else:
        go = (torch.rand(out.shape, generator=g) * 4 - 2).to(out.dtype)  # per row, both signs
    out.backward(go)
    xd = x.detach().double().requires_grad_()
    w = kw.pop("weight", None)
    t = target.double() if target.is_floating_point() else target
    ref = reference.cross_entropy(xd, t, None if w is None else w.double(), **kw)
    ref.backward(go.double())
    assert out.dtype == dtype and out.shape == ref.shape
    assert_close_to(out, ref, dtype, "loss")
    # an incoming gradient other than 1 multiplies the rounded gradient: a second rounding
    assert_close_to(xx.grad, xd.grad, dtype, "grad", ulps=1 if go_kind == "one" else 2)




@pytest.fixture(autouse=True)
def _subnormals_representable():
    """Hypothesis refuses to draw floats when subnormals are flushed to zero in this process:
    on torch 2.4, a CPU kernel compiled by an earlier torch.compile test (built with
    -ffast-math) sets the processor's flush-to-zero mode for the whole process."""
    skip_if_subnormals_flushed()

@SETTINGS
@given(
    dtype=st.sampled_from(DTYPES),
    kind=st.sampled_from(["index", "prob"]),
    mode=st.sampled_from(["uniform", "off_target"]),
    weighted=st.booleans(),
    reduction=st.sampled_from(["none", "mean", "sum"]),
    layout=st.sampled_from(["2d", "kdim", "1d"]),
    go_kind=st.sampled_from(["one", "scalar", "per_row"]),
    eps=st.one_of(st.sampled_from([0.0, 0.1, 1.0]), st.floats(0.0, 1.0)),
    n=st.integers(1, 6),
    k=st.integers(1, 40),
    s=st.integers(1, 11),
    seed=st.integers(0, 2**31 - 1),
)
def test_full_matrix_by_value(dtype, kind, mode, weighted, reduction, layout, go_kind, eps, n, k, s, seed):
    if mode == "off_target" and k == 1:
        k = 2  # off_target with one class and eps > 0 is an error (tested in test_errors)
    g = torch.Generator().manual_seed(seed)
    shape = {"2d": (n, k), "kdim": (n, k, s, 2), "1d": (k,)}[layout]
    x = (torch.randn(shape, generator=g) * 3).to(dtype)
    if kind == "prob":
        cdim = 0 if layout == "1d" else 1
        target = torch.softmax(torch.randn(shape, generator=g) * 2, cdim).to(dtype)
    else:
        tshape = () if layout == "1d" else (shape[0],) + shape[2:]
        target = torch.randint(0, k, tshape, generator=g)
        if target.dim() and target.numel() > 1:
            target.view(-1)[torch.rand(target.numel(), generator=g) < 0.25] = -100
    w = (torch.rand(k, generator=g) + 0.1).to(dtype) if weighted else None
    _check(x, target, dtype, go_kind, seed, weight=w, reduction=reduction, label_smoothing=eps,
           smoothing_mode=mode)


# ---- 16-bit numerics ------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("eps", [0.0, 0.01, 0.1])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("go_kind", ["one", "scalar", "per_row"])
def test_16bit_target_probability_near_one_and_near_zero(dtype, eps, reduction, go_kind):
    """p_y near 1 (the target gradient p_y - q_y is small: rounding p first loses it all),
    p_y near 0, and everything between, per element in ULPs."""
    g = torch.Generator().manual_seed(12)
    K = 50
    gaps = torch.tensor([30.0, 20.0, 12.0, 9.0, 6.0, 3.0, 0.0, -3.0, -8.0, -15.0])
    x = torch.randn(len(gaps), K, generator=g) * 0.5
    t = torch.randint(0, K, (len(gaps),), generator=g)
    x[torch.arange(len(gaps)), t] += gaps
    _check(x.to(dtype), t, dtype, go_kind, 3, reduction=reduction, label_smoothing=eps)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("K", [3, 17, 300])
def test_16bit_logits_at_the_dtype_limits(dtype, K):
    """The largest finite logits of the dtype, both signs, and its smallest (subnormal) ones."""
    fi = torch.finfo(dtype)
    g = torch.Generator().manual_seed(13)
    x = torch.randn(6, K, generator=g)
    x[0, 0], x[0, 1] = fi.max, -fi.max
    x[1, :] = fi.max  # every logit at the limit: uniform p
    x[2, 1] = -fi.max
    x[3, :] = fi.tiny * fi.eps  # subnormal logits: uniform p
    x[4, 2] = fi.max
    x[5, 0] = fi.max / (4 * K)  # large, but K differences still fit float32 (eps > 0 below)
    x = x.to(dtype)
    t = torch.tensor([0, 1, 0, 2, 2, 1])
    # eps > 0 with logits spanning 2 * max would sum differences beyond float32's range
    # (PyTorch in the 16-bit dtype overflows there too): the smoothing cases use eps = 0 rows.
    for go_kind in ("one", "per_row"):
        _check(x, t, dtype, go_kind, 4, reduction="none", label_smoothing=0.0)
    _check(x[[1, 3, 5]], t[[1, 3, 5]], dtype, "scalar", 5, reduction="mean", label_smoothing=0.1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_mean_over_many_rows_with_a_loss_scale(dtype):
    """mean over many rows (1/D folded into the stored gradient) times a large incoming gradient
    (a loss scaler's 2**12): each element within 2 ULPs of the float64 result."""
    g = torch.Generator().manual_seed(14)
    x = torch.randn(2000, 32, generator=g).to(dtype)
    t = torch.randint(0, 32, (2000,), generator=g)
    xx = x.clone().requires_grad_()
    L.cross_entropy(xx, t, label_smoothing=0.1).backward(torch.tensor(4096.0, dtype=dtype))
    xd = x.double().requires_grad_()
    reference.cross_entropy(xd, t, label_smoothing=0.1).backward(torch.tensor(4096.0, dtype=torch.float64))
    assert_close_to(xx.grad, xd.grad, dtype, "grad", ulps=2)
