"""The vocabulary-parallel operators (issue 14), called directly: vocab_parallel_stats (one read
of a rank's class slice gives the per-row partial statistics) and vocab_parallel_grad (the
gradient slice given the global lse and per-row coefficients), each against its float64
definition, on the CPU kernels and on the CUDA kernels (the real GPU where there is one, the
SIMT emulation here); then both together over a split vocabulary against the single-process
float64 reference (the merge the ranks do, done in this one process); opcheck and fake kernels.
"""
import math

import pytest
import torch

import labelsmooth_ext  # noqa: F401  (loads the operators)
from labelsmooth_ext import _ops, reference
from conftest import DEVICES, DTYPES, assert_close_to

# K values that pick each CUDA row geometry (8 / 32 / 128 / 256 threads per row) and odd tails
KS = [1, 7, 33, 300, 1000, 4099]
IGN = -100


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _capped(x, cap):
    return x if not cap else cap * torch.tanh(x / cap)


def stats_ref(x, t, w, start, cap):
    """float64 definition of vocab_parallel_stats (ops.cpp)."""
    z = _capped(x.double(), cap)
    n, k = z.shape
    valid = t != IGN
    yl = t - start
    here = valid & (yl >= 0) & (yl < k)
    if k:
        m = z.max(1).values
    else:
        m = torch.full((n,), -math.inf, dtype=torch.float64)
    m0 = torch.where(m == -math.inf, torch.zeros_like(m), m)
    wd = torch.ones(k, dtype=torch.float64) if w is None else w.double()
    s = torch.exp(z - m0[:, None]).sum(1)
    lin = ((z - m0[:, None]) * wd).sum(1)
    bad = m.isnan() | (m == math.inf)
    s[bad] = math.nan
    lin[bad] = math.nan
    idx = torch.where(here, yl, torch.zeros_like(yl)).clamp(max=max(k - 1, 0))
    zy = torch.where(here, z.gather(1, idx[:, None]).squeeze(1) if k else torch.zeros(n, dtype=torch.float64),
                     torch.zeros((), dtype=torch.float64))
    wy = torch.where(here, wd[idx] if k else torch.zeros(n, dtype=torch.float64),
                     torch.zeros((), dtype=torch.float64))
    out = torch.stack([m, s, zy, lin, wy])
    out[:, ~valid] = torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0], dtype=torch.float64)[:, None]
    return out


def grad_ref(x, t, w, coefs, start, cap):
    """float64 definition of vocab_parallel_grad (ops.cpp)."""
    xd = x.double()
    z = _capped(xd, cap)
    n, k = z.shape
    lse, kp, kw, ky = coefs.double()
    wd = torch.ones(k, dtype=torch.float64) if w is None else w.double()
    g = torch.exp(z - lse[:, None]) * kp[:, None] - kw[:, None] * wd
    yl = t - start
    here = (t != IGN) & (yl >= 0) & (yl < k)
    rows = here.nonzero().squeeze(1)
    g[rows, yl[rows]] -= ky[rows]
    if cap:
        g = g * (1 - (z / cap) ** 2)
    g[~torch.isfinite(lse)] = math.nan
    g[t == IGN] = 0.0
    return g


def _inputs(n, k, dtype, gen, weighted, start=3, total=None):
    total = total or (k + start + 5)
    x = (torch.randn(n, k, generator=gen, dtype=torch.float64) * 3).to(dtype)
    t = torch.randint(0, total, (n,), generator=gen)
    if n > 2:
        t[0] = start  # a target inside the slice
        t[1] = IGN
    if n > 3:
        t[2] = start + k - 1 if k else start  # the slice's last class
    w = (torch.rand(k, generator=gen) + 0.2).to(dtype) if weighted else None
    return x, t, w


def _to(dev, *ts):
    return [None if t is None else t.to(dev) for t in ts]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("weighted,cap", [(False, 0.0), (True, 0.0), (True, 2.5)])
def test_stats_values(device, dtype, k, weighted, cap):
    gen = torch.Generator().manual_seed(k)
    x, t, w = _inputs(9, k, dtype, gen, weighted)
    x[4, :] = x[4, :].double().add(1e3).to(dtype) if dtype != torch.float16 else x[4, :]  # offset row
    got = _ops.ops.vocab_parallel_stats(*_to(device, x, t, w), 3, IGN, cap)
    assert got.dtype == _acc(dtype) and got.shape == (5, 9)
    assert_close_to(got, stats_ref(x, t, w, 3, cap), _acc(dtype), "stats")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("weighted,cap", [(False, 0.0), (True, 0.0), (True, 2.5)])
def test_grad_values(device, dtype, k, weighted, cap):
    gen = torch.Generator().manual_seed(100 + k)
    x, t, w = _inputs(9, k, dtype, gen, weighted)
    acc = _acc(dtype)
    z = _capped(x.double(), cap)
    lse = torch.logsumexp(torch.cat([z, torch.randn(9, 5, generator=gen, dtype=torch.float64)], 1), 1)
    coefs = torch.stack([lse, torch.rand(9, generator=gen, dtype=torch.float64) + 0.5,
                         torch.rand(9, generator=gen, dtype=torch.float64) * 0.01,
                         torch.rand(9, generator=gen, dtype=torch.float64) + 0.5]).to(acc)
    coefs[0, 5] = math.nan  # a NaN row (a NaN logit on some rank)
    got = _ops.ops.vocab_parallel_grad(*_to(device, x, t, w, coefs), 3, IGN, cap)
    assert got.dtype == dtype and got.shape == x.shape
    # computed in the accumulation type from the rounded coefficients, then rounded once
    assert_close_to(got, grad_ref(x, t, w, coefs, 3, cap), dtype, "grad")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_edge_rows(device, dtype):
    """An all -inf slice, NaN and +inf logits, an empty slice, no rows, misaligned views."""
    gen = torch.Generator().manual_seed(3)
    x, t, w = _inputs(6, 37, dtype, gen, True)
    x[2, :] = -math.inf
    x[3, 5] = math.nan
    x[4, 9] = math.inf
    got = _ops.ops.vocab_parallel_stats(*_to(device, x, t, w), 3, IGN, 0.0)
    assert_close_to(got, stats_ref(x, t, w, 3, 0.0), _acc(dtype), "stats edge rows")
    for k in (0,):
        e = x[:, :0]
        got = _ops.ops.vocab_parallel_stats(*_to(device, e, t, None), 3, IGN, 0.0)
        assert_close_to(got, stats_ref(e, t, None, 3, 0.0), _acc(dtype), "stats empty slice")
        coefs = torch.zeros(4, 6, dtype=_acc(dtype))
        assert _ops.ops.vocab_parallel_grad(*_to(device, e, t, None, coefs), 3, IGN, 0.0).shape == (6, 0)
    none = _ops.ops.vocab_parallel_stats(*_to(device, x[:0], t[:0], w), 3, IGN, 0.0)
    assert none.shape == (5, 0)
    # a view one element off 16-byte alignment, and a row stride that is not K
    big = (torch.randn(5, 301, generator=gen) * 2).to(dtype)
    view = big[:, 1:300]
    tv = torch.tensor([4, IGN, 298, 0, 2000])
    got = _ops.ops.vocab_parallel_stats(*_to(device, view, tv, None), 0, IGN, 0.0)
    assert_close_to(got, stats_ref(view, tv, None, 0, 0.0), _acc(dtype), "stats view")
    coefs = torch.stack([torch.logsumexp(view.double(), 1), torch.ones(5, dtype=torch.float64),
                         torch.full((5,), 1e-3, dtype=torch.float64),
                         torch.full((5,), 0.9, dtype=torch.float64)]).to(_acc(dtype))
    got = _ops.ops.vocab_parallel_grad(*_to(device, view, tv, None, coefs), 0, IGN, 0.0)
    assert_close_to(got, grad_ref(view, tv, None, coefs, 0, 0.0), dtype, "grad view")


def _merge(stats_list, wsums, a, b, z_loss, t):
    """What distributed.py does with the gathered statistics, in float64 (one process)."""
    st = torch.stack([s.double() for s in stats_list])  # (P, 5, N)
    ms, ss, zys, lins, wys = st.unbind(1)
    big_m = ms.max(0).values
    big_s = (ss * torch.exp(ms - big_m)).sum(0)
    ms0 = torch.where(ms == -math.inf, torch.zeros_like(ms), ms)
    ws = torch.tensor(wsums, dtype=torch.float64)[:, None]
    big_lin = (lins + ws * (ms0 - big_m)).sum(0)
    big_zy, big_wy, big_w = zys.sum(0), wys.sum(0), float(sum(wsums))
    log_s = big_s.log()
    lse = big_m + log_s
    row = b * big_wy * (log_s - (big_zy - big_m)) + a * (big_w * log_s - big_lin) + z_loss * lse * lse
    valid = t != IGN
    row = torch.where(valid, row, torch.zeros_like(row))
    kp = b * big_wy + a * big_w + 2 * z_loss * lse
    coefs = torch.stack([lse, kp, torch.full_like(lse, a), b * big_wy])
    return row, coefs


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["uniform", "off_target"])
@pytest.mark.parametrize("weighted,cap,z_loss", [(False, 0.0, 0.0), (True, 3.0, 1e-2)])
def test_split_vocabulary_matches_single_process(device, dtype, mode, weighted, cap, z_loss):
    """Stats of three uneven slices (one empty), merged, then each slice's gradient: the
    single-process float64 loss and gradient (reference.cross_entropy) of the whole row."""
    gen = torch.Generator().manual_seed(21)
    K, n, eps = 700, 11, 0.2
    x = (torch.randn(n, K, generator=gen, dtype=torch.float64) * 2).to(dtype)
    t = torch.randint(0, K, (n,), generator=gen)
    t[3] = IGN
    w = (torch.rand(K, generator=gen) + 0.3).to(dtype) if weighted else None
    sizes = [300, 0, 400]
    a, b = reference.smoothing_coefficients(K, eps, mode)
    acc = _acc(dtype)
    stats, wsums, starts = [], [], []
    for r, kr in enumerate(sizes):
        s0 = sum(sizes[:r])
        starts.append(s0)
        ws = None if w is None else w[s0:s0 + kr]
        stats.append(_ops.ops.vocab_parallel_stats(*_to(device, x[:, s0:s0 + kr], t, ws), s0, IGN, cap).cpu())
        wsums.append(float(kr) if ws is None else float(ws.double().sum()))
    row, coefs = _merge(stats, wsums, a, b, z_loss, t)
    xd = x.double().requires_grad_()
    ref = reference.cross_entropy(xd, t, None if w is None else w.double(), reduction="none",
                                  label_smoothing=eps, smoothing_mode=mode, z_loss=z_loss,
                                  softcap=cap or None)
    (gref,) = torch.autograd.grad(ref.sum(), xd)
    assert_close_to(row, ref, acc, "merged loss")
    grads = []
    for r, kr in enumerate(sizes):
        s0 = starts[r]
        ws = None if w is None else w[s0:s0 + kr]
        grads.append(_ops.ops.vocab_parallel_grad(*_to(device, x[:, s0:s0 + kr], t, ws, coefs.to(acc)),
                                                  s0, IGN, cap).cpu())
    assert_close_to(torch.cat(grads, 1), gref, dtype, "gradient slices")


@pytest.mark.parametrize("weighted", [False, True])
def test_opcheck(weighted):
    gen = torch.Generator().manual_seed(2)
    x, t, w = _inputs(6, 45, torch.float32, gen, weighted)
    ops = torch.ops.labelsmooth_ext
    torch.library.opcheck(ops.vocab_parallel_stats, (x, t, w, 3, IGN, 0.0))
    torch.library.opcheck(ops.vocab_parallel_stats, (x, t, w, 3, IGN, 2.0))
    coefs = ops.vocab_parallel_stats(x, t, w, 3, IGN, 0.0)[:4].contiguous()
    torch.library.opcheck(ops.vocab_parallel_grad, (x, t, w, coefs, 3, IGN, 2.0))


def test_argument_errors():
    ops = torch.ops.labelsmooth_ext
    x, t = torch.randn(4, 6), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="weight must be this rank's slice"):
        ops.vocab_parallel_stats(x, t, torch.ones(7), 0, IGN, 0.0)
    with pytest.raises(ValueError, match=r"target must have shape \(4,\)"):
        ops.vocab_parallel_stats(x, t[:3], None, 0, IGN, 0.0)
    with pytest.raises(TypeError, match="target must be int64"):
        ops.vocab_parallel_stats(x, t.int(), None, 0, IGN, 0.0)
    with pytest.raises(ValueError, match="softcap"):
        ops.vocab_parallel_stats(x, t, None, 0, IGN, -1.0)
    with pytest.raises(ValueError, match=r"coefs must have shape \(4, 4\)"):
        ops.vocab_parallel_grad(x, t, None, torch.zeros(3, 4), 0, IGN, 0.0)
    with pytest.raises(TypeError, match="coefs must be Float"):
        ops.vocab_parallel_grad(x, t, None, torch.zeros(4, 4, dtype=torch.float64), 0, IGN, 0.0)
