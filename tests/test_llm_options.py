"""z_loss, softcap, return_lse and inplace_backward (issue 11) against the float64 composite
in labelsmooth_ext.reference, plus the three inplace_backward scenarios and bad values."""
import os
import subprocess
import sys
import textwrap
import zlib

import pytest
import torch

import labelsmooth_ext as L
from labelsmooth_ext import reference
from conftest import DEVICES, DTYPES, assert_close_to, random_targets

OPTIONS = [dict(z_loss=1e-3), dict(softcap=5.0), dict(z_loss=2e-2, softcap=3.0)]


def _logits(n, k, dtype, seed, scale=4.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, k, generator=g, dtype=torch.float64) * scale).to(dtype)


def _seed(*parts):
    """A data seed from the test's parameters, the same in every process (hash() of a str is
    salted per process: a failure seen once could not be reproduced)."""
    return zlib.crc32(repr(tuple(str(p) for p in parts)).encode()) % 10_000


def _reference(x, target, weight, **kw):
    xd = x.detach().double().requires_grad_()
    out = reference.cross_entropy(xd, target, None if weight is None else weight.double(), **kw)
    grad_out = torch.linspace(0.5, 2.0, out.numel(), dtype=torch.float64).reshape(out.shape)
    (g,) = torch.autograd.grad((out * grad_out).sum(), xd)
    return out, g, grad_out


def _ours(x, target, weight, grad_out, device="cpu", **kw):
    xx = x.detach().clone().to(device).requires_grad_()
    out = L.cross_entropy(xx, target.to(device), None if weight is None else weight.to(device), **kw)
    (g,) = torch.autograd.grad((out * grad_out.to(out.dtype).to(device)).sum(), xx)
    return out, g


def _ours_inplace(x, target, weight, grad_out, device="cpu", **kw):
    leaf = x.detach().clone().to(device).requires_grad_()
    logits = leaf * 1  # a non-leaf, as a model's output
    out = L.cross_entropy(logits, target.to(device), None if weight is None else weight.to(device),
                          inplace_backward=True, **kw)
    (g,) = torch.autograd.grad((out * grad_out.to(out.dtype).to(device)).sum(), leaf)
    return out, g


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["uniform", "off_target"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("opts", OPTIONS, ids=["z", "cap", "z+cap"])
@pytest.mark.parametrize("inplace", [False, True], ids=["out", "inplace"])
def test_matches_reference(device, dtype, mode, weighted, reduction, opts, inplace):
    N, K = 37, 67
    seed = _seed(dtype, mode, weighted, reduction, opts)
    x = _logits(N, K, dtype, seed)
    target = random_targets(N, K, ignore_frac=0.2, generator=torch.Generator().manual_seed(seed))
    weight = torch.rand(K, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64) + 0.5
    weight = weight.to(dtype) if weighted else None
    kw = dict(reduction=reduction, label_smoothing=0.1, smoothing_mode=mode, **opts)
    ref_out, ref_g, grad_out = _reference(x, target, weight, **kw)
    run = _ours_inplace if inplace else _ours
    out, g = run(x, target, weight, grad_out, device, **kw)
    assert out.dtype == dtype
    assert_close_to(out, ref_out, dtype, "loss")
    # 2 ULP: softcap's tanh from one vector exp (about cap * 2e-7 absolute) and the z term add
    # float32 error before the one rounding to 16 bits
    assert_close_to(g, ref_g, dtype, "grad", ulps=2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("K", [5000, 32003])
def test_long_rows(device, dtype, K):
    """Rows longer than the kernel's store blocks (2048) and vector tails."""
    x = _logits(5, K, dtype, K)
    target = torch.tensor([0, K - 1, -100, 17, K // 2])
    kw = dict(reduction="mean", label_smoothing=0.1, z_loss=1e-3, softcap=30.0)
    ref_out, ref_g, grad_out = _reference(x, target, None, **kw)
    out, g = _ours(x, target, None, grad_out, device, **kw)
    assert_close_to(out, ref_out, dtype, "loss")
    assert_close_to(g, ref_g, dtype, "grad")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_softcap_non_finite_logits(device, dtype):
    """softcap maps +-inf logits to +-cap (finite rows, as the composite gives); a NaN logit
    makes its row NaN. The CPU kernel takes the row max on the raw logits (tanh is monotonic),
    so these rows check that it caps the max rather than rejecting an infinite one. Rows are
    longer than a vector and a store block, with the special values in tails and mid-row."""
    K = 2061
    x = _logits(6, K, dtype, 11)
    x[0, 5] = float("inf")
    x[1, K - 1] = float("-inf")
    x[2, :] = float("-inf")
    x[3, 7] = float("inf")
    x[3, K - 2] = float("inf")
    x[4, 1000] = float("nan")
    target = torch.tensor([5, K - 1, 3, 100, 2, -100])
    kw = dict(reduction="none", label_smoothing=0.1, z_loss=1e-3, softcap=7.0)
    ref_out, ref_g, grad_out = _reference(x, target, None, **kw)
    assert bool(ref_out[:4].isfinite().all()) and bool(ref_out[4].isnan())
    out, g = _ours(x, target, None, grad_out, device, **kw)
    assert_close_to(out, ref_out, dtype, "loss")
    assert_close_to(g, ref_g, dtype, "grad", ulps=2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("cap", [30.0, 1.0, 200.0, 1e-3, 1e4, 1e6])
def test_softcap_tanh_error(dtype, cap):
    """The CPU kernel's capped logit cap * tanh(x / cap), measured against float64 on a dense grid:
    with one class per row the kernel's exp(0) is exactly 1, so lse is the capped logit itself.
    float32 |x| > 0.75 cap (and vectors mixing such logits with smaller ones) take
    |tanh| = 1 - 2 q, q = 1 / (exp(2|x| / cap) + 1) in (0, 1/2] through the kernel's bounded exp
    and a reciprocal estimate + one Newton step (csrc/cpu/kernels.h, softcap_vec); smaller
    logits the polynomial of the next test. Error budget in units of 2^-24 (float): the exp's
    1.7e-7 relative error moves tanh by at most half of it (1.43), exp + 1 rounding 0.5, the
    reciprocal 3.25 relative (2 q <= 1: 3.25), 1 - 2 q 0.5, the product cap * t 0.5: 6.2, bound
    7 units, 4.2e-7 (measured at most 2.2 units over caps 1, 30, 200; the division this
    replaced measured 3.6); float64 (std::exp, a division) 8 units of 2^-53."""
    x = torch.cat([torch.linspace(-12 * cap, 12 * cap, 100_003, dtype=torch.float64),
                   torch.tensor([0.0, 1e-30, -1e-30, 1e-3, -1e-3, 3e38, -3e38, float("inf"), float("-inf")],
                                dtype=torch.float64)]).to(dtype)
    target = torch.zeros(x.numel(), dtype=torch.long)
    _, lse = L.cross_entropy(x[:, None], target, softcap=cap, return_lse=True, reduction="none")
    exact = torch.tanh(x.double() / cap)
    err = ((lse.double() / cap) - exact).abs()
    bound = 7 * 2.0 ** -24 if dtype == torch.float32 else 8 * 2.0 ** -53
    print(f"max |t - tanh| = {float(err.max()):.3g} (bound {bound:.3g})")
    assert float(err.max()) <= bound, (float(err.max()), float(x[err.argmax()]))
    assert lse[-2] == cap and lse[-1] == -cap


@pytest.mark.parametrize("cap", [30.0, 1.0, 200.0, 256.0, 1 / 256])
def test_softcap_small_logit_polynomial_error(cap):
    """float32 logits with |x| <= 0.75 cap take the kernel's odd polynomial z = x Q(x^2)
    (csrc/cpu/kernels.h, softcap_any; vectors with a larger logit take the exp formula, and so
    do caps outside [1/256, 256], where q_k = p_k / cap^2k would leave the float range): its
    relative error against float64 over that whole range, one class per row as above (lse = z).
    Budget 4 units of 2^-24 relative (fit 1.6 absolute / 2.6 relative in tanh in float
    arithmetic; the coefficients scaled by cap^-2k add a rounding each)."""
    x = torch.linspace(-0.75 * cap, 0.75 * cap, 200_001, dtype=torch.float32)
    x = torch.cat([x, torch.tensor([0.75 * cap, -0.75 * cap, 1e-30, -1e-30, 1e-3, -1e-3])])
    _, lse = L.cross_entropy(x[:, None], torch.zeros(x.numel(), dtype=torch.long), softcap=cap,
                             return_lse=True, reduction="none")
    exact = cap * torch.tanh(x.double() / cap)
    nz = exact != 0
    rel = ((lse.double() - exact).abs()[nz] / exact.abs()[nz]).max()
    print(f"max relative error of z = {float(rel):.3g} ({float(rel) / 2 ** -24:.2f} units of 2^-24)")
    assert float(rel) <= 4 * 2.0 ** -24
    assert bool((lse[x == 0] == 0).all())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("cap,mixed", [(30.0, False), (1.0, False), (200.0, False), (200.0, True)])
def test_softcap_grad_factor_error(device, dtype, cap, mixed):
    """The kernel's chain-rule factor dz/dx = 1 - tanh^2 against float64 over both formulas'
    ranges: rows [x, x] with target 0, no smoothing, sum: each softmax is exactly 1/2, so the
    gradient of the second logit is exactly dz/dx / 2. mixed (the CPU's two formulas): rows
    [x, x, -inf], whose vector holds a logit beyond 0.75 cap, so x takes the exp formula over the
    polynomial's range |x| <= 0.75 cap (cap 200: the third logit's softmax, below e^-70 there,
    leaves the other two at 1/2 in float).
    Each element against its own size, since dz/dx is tiny where |x| >> cap: at most
    (2 |x| / cap + 25) units of 2^-24 relative in float32 (2 |x| / cap: rounding x * (2 / cap)
    moves exp's argument by up to that many units, as rounding x / cap does float32 PyTorch's
    tanh; 25: exp, reciprocal and products, and the polynomial's 15 units of 2^-24 absolute
    over dz/dx >= 0.6 there), 2 more units for the mixed rows' sum; float64 the same in units of
    2^-53, plus 16 units absolute on the GPU (its double factor is 1 - t^2, which a relative
    bound would reject at |x| = 12 cap: 2e-6 relative, 1e-16 absolute). (An absolute bound let 1 - t^2 of a rounded t through: the GPU kernels' factor was
    off by 2e-5 relative at |x| = 2.8 cap, seen once in a float64 comparison of a whole
    gradient, test_probability_targets_match_reference, under a per-process random seed.)"""
    n = 50_001 if device == "cpu" else 401  # the emulation runs a block per row
    x = torch.linspace(-0.75 * cap, 0.75 * cap, n, dtype=torch.float64)
    if not mixed:
        x = torch.cat([torch.linspace(-12 * cap, 12 * cap, n, dtype=torch.float64), x])
    x = x.to(dtype)
    xx = x[:, None].repeat(1, 2)
    if mixed:
        xx = torch.cat([xx, torch.full_like(xx[:, :1], float("-inf"))], 1)
    xx = xx.to(device).requires_grad_()
    target = torch.zeros(x.numel(), dtype=torch.long, device=xx.device)
    L.cross_entropy(xx, target, softcap=cap, reduction="sum").backward()
    dz = 2 * xx.grad[:, 1].double().cpu()
    want = torch.cosh(x.double() / cap) ** -2  # 1 - tanh^2 without float64's own cancellation
    unit = 2.0 ** -24 if dtype == torch.float32 else 2.0 ** -53
    bound = (2 * x.double().abs() / cap + (27 if mixed else 25)) * unit * want
    if dtype == torch.float64 and device != "cpu":
        bound = bound + 16 * unit  # the GPU kernels' double factor, 1 - t^2 (row_math.h, softcap_factor)
    ratio = (dz - want).abs() / bound
    worst = int(ratio.argmax())
    print(f"worst relative error {float((dz - want).abs()[worst] / want[worst]):.3g} at x = {float(x[worst]):.6g} "
          f"({float(ratio[worst]):.3g} of its bound)")
    assert float(ratio[worst]) <= 1, (float(x[worst]), float(dz[worst]), float(want[worst]))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weighted", [False, True])
def test_softcap_language_model_rows_match_reference(dtype, weighted):
    """Rows like a language model's under softcap=30: most logits well inside the cap (the
    polynomial's vectors), some rows with a few logits beyond 0.75 cap (those vectors take the
    exp formula; the rest of the row stays on the polynomial), and long enough for several
    store blocks and a tail."""
    N, K = 6, 4103
    g = torch.Generator().manual_seed(5)
    x = torch.randn(N, K, generator=g, dtype=torch.float64) * 3
    x[1, 17] = 40.0
    x[2, ::301] = -55.0
    x[3, 4100] = 29.0
    x[4, :] *= 6  # every vector mixed or large
    x = x.to(dtype)
    target = torch.tensor([3, 17, 0, 4100, 2000, -100])
    weight = (torch.rand(K, generator=g, dtype=torch.float64) + 0.5).to(dtype) if weighted else None
    for red in ("none", "mean"):
        kw = dict(reduction=red, label_smoothing=0.1, z_loss=1e-4, softcap=30.0)
        ref_out, ref_g, grad_out = _reference(x, target, weight, **kw)
        out, gr = _ours(x, target, weight, grad_out, **kw)
        assert_close_to(out, ref_out, dtype, "loss")
        assert_close_to(gr, ref_g, dtype, "grad", ulps=2)


def test_ignore_index_inside_class_range_and_3d_input():
    x = _logits(4, 6, torch.float64, 3).reshape(2, 2, 6).movedim(2, 1).contiguous()  # (N=2, C=6, d=2)
    target = torch.tensor([[1, 3], [3, 5]])
    kw = dict(ignore_index=3, label_smoothing=0.2, z_loss=1e-2, softcap=2.0)
    for red in ("none", "mean", "sum"):
        ref_out, ref_g, grad_out = _reference(x, target, None, reduction=red, **kw)
        out, g = _ours(x, target, None, grad_out, reduction=red, **kw)
        assert_close_to(out, ref_out, torch.float64, red)
        assert_close_to(g, ref_g, torch.float64, red)


def test_z_loss_mean_uses_the_cross_entropy_denominator():
    x = _logits(3, 5, torch.float64, 1)
    target = torch.tensor([0, -100, 4])
    w = torch.tensor([2.0, 1.0, 1.0, 1.0, 3.0], dtype=torch.float64)
    ce = L.cross_entropy(x, target, w)
    both = L.cross_entropy(x, target, w, z_loss=0.5)
    lse = torch.logsumexp(x, dim=1)
    expected = ce + 0.5 * (lse[0] ** 2 + lse[2] ** 2) / (2.0 + 3.0)
    torch.testing.assert_close(both, expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_return_lse(device, dtype):
    x = _logits(9, 40, dtype, 7).to(device)
    target = random_targets(9, 40, ignore_frac=0.3, generator=torch.Generator().manual_seed(2)).to(device)
    loss, lse = L.cross_entropy(x, target, softcap=4.0, return_lse=True, reduction="none")
    assert lse.shape == target.shape and not lse.requires_grad
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    z = x.double()
    z = 4.0 * torch.tanh(z / 4.0)
    expected = torch.where(target != -100, torch.logsumexp(z, dim=1), 0.0)
    assert_close_to(lse, expected, torch.float32 if dtype != torch.float64 else dtype, "lse")
    plain = L.cross_entropy(x, target, softcap=4.0, reduction="none")
    assert torch.equal(loss, plain)
    # 3-d input: lse shaped like the target
    x3 = _logits(4, 6, torch.float32, 1).reshape(2, 6, 2).to(device)
    t3 = torch.tensor([[0, 1], [2, 5]], device=device)
    _, lse3 = L.cross_entropy(x3, t3, return_lse=True)
    assert lse3.shape == (2, 2)
    torch.testing.assert_close(lse3, torch.logsumexp(x3, dim=1))


def test_module_keywords():
    x = _logits(8, 10, torch.float32, 4).requires_grad_()
    target = torch.arange(8) % 10
    m = L.CrossEntropyLoss(label_smoothing=0.1, z_loss=1e-3, softcap=5.0, return_lse=True)
    assert "z_loss=0.001" in repr(m) and "softcap=5.0" in repr(m)
    loss, lse = m(x, target)
    loss2, lse2 = L.cross_entropy(x, target, label_smoothing=0.1, z_loss=1e-3, softcap=5.0, return_lse=True)
    assert torch.equal(loss, loss2) and torch.equal(lse, lse2)
    assert L.CrossEntropyLoss()(x, target).shape == ()  # defaults unchanged: a plain tensor


# --- inplace_backward: the three scenarios -------------------------------------------

def _lm_head(seed=0, n=64, d=16, v=300, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g).to(device).requires_grad_()
    w = torch.randn(v, d, generator=g).to(device).requires_grad_()
    target = torch.randint(0, v, (n,), generator=g).to(device)
    return h, w, target


@pytest.mark.parametrize("device", DEVICES)
def test_inplace_plain_lm_head_gives_the_same_gradients(device):
    grads = {}
    for inplace in (False, True):
        h, w, target = _lm_head(device=device)
        logits = h @ w.t()
        loss = L.cross_entropy(logits, target, label_smoothing=0.1, z_loss=1e-4, softcap=30.0,
                               inplace_backward=inplace)
        loss.backward()
        grads[inplace] = (loss.detach(), h.grad, w.grad)
    for a, b in zip(grads[False], grads[True]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("device", DEVICES)
def test_inplace_logits_read_after_the_loss_call_are_unchanged(device):
    h, w, target = _lm_head(1, device=device)
    logits = h @ w.t()
    snapshot = logits.detach().clone()
    loss = L.cross_entropy(logits, target, inplace_backward=True)
    assert torch.equal(logits.detach(), snapshot)  # the forward does not overwrite them
    accuracy = (logits.argmax(dim=1) == target).float().mean()
    assert torch.equal(accuracy, (snapshot.argmax(dim=1) == target).float().mean())
    version = logits._version
    loss.backward()
    assert logits._version > version  # the backward wrote the gradient there and said so
    p = torch.softmax(snapshot, dim=1)
    p[torch.arange(len(target)), target] -= 1
    torch.testing.assert_close(logits.detach(), p / len(target))


@pytest.mark.parametrize("device", DEVICES)
def test_inplace_logits_saved_by_another_op_raise_never_a_wrong_number(device):
    # Another op saved the logits and runs its backward after ours: autograd's version check.
    h, w, target = _lm_head(2, device=device)
    logits = h @ w.t()
    reg = logits.pow(2).mean()  # PowBackward saves the logits
    loss = L.cross_entropy(logits, target, inplace_backward=True) + 1e-3 * reg
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    # The other order (the op that saved the logits runs its backward first): right numbers.
    grads = {}
    for inplace in (False, True):
        h, w, target = _lm_head(2, device=device)
        logits = h @ w.t()
        ce = L.cross_entropy(logits, target, inplace_backward=inplace)
        (ce + 1e-3 * logits.pow(2).mean()).backward()
        grads[inplace] = (h.grad, w.grad)
    for a, b in zip(grads[False], grads[True]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_inplace_logits_modified_before_backward_raise():
    h, w, target = _lm_head(3)
    logits = h @ w.t()
    loss = L.cross_entropy(logits, target, inplace_backward=True)
    with torch.no_grad():
        logits.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_inplace_errors():
    x = _logits(4, 5, torch.float32, 0).requires_grad_()
    t = torch.tensor([0, 1, 2, 3])
    with pytest.raises(ValueError, match="inplace_backward"):
        L.cross_entropy(x, t, inplace_backward=True)  # a leaf that requires grad
    with pytest.raises(ValueError, match="inplace_backward"):
        L.cross_entropy(x.view(4, 5), t, inplace_backward=True)  # a view of one
    base = _logits(5, 4, torch.float32, 0).requires_grad_()
    with pytest.raises(ValueError, match="contiguous"):
        L.cross_entropy((base * 1).t(), t, inplace_backward=True)  # a transposed view
    with pytest.raises(ValueError, match="contiguous"):
        L.cross_entropy((base[:1] * 1).expand(4, 4), t, inplace_backward=True)  # overlapping
    logits = base.t() * 1
    loss = L.cross_entropy(logits.contiguous(), t, inplace_backward=True)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice|modified by an inplace"):
        loss.backward()


def test_inplace_lowers_peak_memory():
    """Peak resident memory one LM-head step adds, in fresh processes: inplace_backward=True
    saves one logits-sized buffer (measured, not assumed)."""
    script = textwrap.dedent("""
        import sys, torch, labelsmooth_ext as L
        from labelsmooth_ext import benchmark as B
        torch.manual_seed(0)
        n, d, v = 2048, 64, 16384
        h = torch.randn(n, d, requires_grad=True); w = torch.randn(v, d, requires_grad=True)
        t = torch.randint(0, v, (n,))

        def step():
            logits = h @ w.t()
            L.cross_entropy(logits, t, inplace_backward=sys.argv[1] == "1").backward()
        # resident high-water mark reset first (/proc/self/clear_refs): a forked process
        # otherwise starts from the parent's
        print(B.peak_extra_bytes(step, "cpu"))
    """)
    env = dict(os.environ, OMP_NUM_THREADS="1", LABELSMOOTH_EXT_CPU_GRAD_CACHE="0")
    peak = {}
    for flag in ("0", "1"):
        out = subprocess.run([sys.executable, "-c", script, flag], capture_output=True, text=True, env=env,
                             cwd=os.path.dirname(os.path.dirname(os.path.abspath(L.__file__))), check=True)
        peak[flag] = int(out.stdout.split()[-1])
    logits_bytes = 2048 * 16384 * 4
    drop = peak["0"] - peak["1"]
    print(f"peak extra RSS {peak['0'] / 2**20:.0f} MiB -> {peak['1'] / 2**20:.0f} MiB "
          f"(drop {drop / 2**20:.0f} MiB, logits {logits_bytes / 2**20:.0f} MiB)")
    assert drop > 0.75 * logits_bytes


# --- bad values, compile, opcheck ------------------------------------------------------------

@pytest.mark.parametrize("kw,name", [
    (dict(z_loss=-1e-4), "z_loss"), (dict(z_loss=float("nan")), "z_loss"), (dict(z_loss=float("inf")), "z_loss"),
    (dict(softcap=0.0), "softcap"), (dict(softcap=-3.0), "softcap"), (dict(softcap=float("nan")), "softcap"),
    (dict(inplace_backward=1), "inplace_backward"), (dict(return_lse="yes"), "return_lse"),
    (dict(z_loss="a"), "z_loss"),
])
def test_bad_values_name_the_argument(kw, name):
    x = _logits(4, 5, torch.float32, 0)
    t = torch.tensor([0, 1, 2, 3])
    with pytest.raises((ValueError, TypeError), match=name):
        L.cross_entropy(x, t, **kw)
    with pytest.raises((ValueError, TypeError), match=name):
        L.CrossEntropyLoss(**kw)


# --- probability (soft) targets ------------------------------------------------------------

def _soft_targets(n, k, dtype, seed):
    """Soft targets (softmax of random scores), one one-hot row and one all-zero row."""
    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(torch.randn(n, k, generator=g, dtype=torch.float64) * 2, 1)
    p[0] = 0
    p[0, k - 1] = 1
    p[1] = 0
    return p.to(dtype)


def _capped_lse(x, softcap):
    z = x.detach().double()
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    return torch.logsumexp(z, dim=1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["uniform", "off_target"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("opts", [dict(z_loss=1e-3), dict(z_loss=2e-2, softcap=3.0)], ids=["z", "z+cap"])
@pytest.mark.parametrize("inplace", [False, True], ids=["out", "inplace"])
def test_probability_targets_match_reference(device, dtype, mode, weighted, reduction, opts, inplace):
    """Soft targets with z_loss / softcap / return_lse (and inplace_backward): loss, lse and the
    gradient (incoming gradient not 1) against the float64 composite of reference.py."""
    N, K = 23, 67
    seed = _seed(dtype, mode, weighted, reduction, opts, "prob")
    x = _logits(N, K, dtype, seed)
    target = _soft_targets(N, K, dtype, seed + 2)
    weight = torch.rand(K, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64) + 0.5
    weight = weight.to(dtype) if weighted else None
    kw = dict(reduction=reduction, label_smoothing=0.1, smoothing_mode=mode, **opts)
    ref_out, ref_g, grad_out = _reference(x, target, weight, **kw)
    run = _ours_inplace if inplace else _ours
    (out, lse), g = _run_with_lse(run, x, target, weight, grad_out, device, **kw)
    assert out.dtype == dtype
    assert_close_to(out, ref_out, dtype, "loss")
    assert_close_to(g, ref_g, dtype, "grad", ulps=2)
    assert lse.shape == (N,) and lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close_to(lse, _capped_lse(x, opts.get("softcap")), torch.float32 if dtype != torch.float64 else dtype,
                    "lse")


def _run_with_lse(run, x, target, weight, grad_out, device, **kw):
    """run() with return_lse=True: ((loss, lse), grad), the gradient taken through the loss."""
    got = {}

    def wrapped(*args, **kwargs):
        loss, got["lse"] = L_cross_entropy(*args, return_lse=True, **kwargs)
        return loss

    saved = L.cross_entropy
    L.cross_entropy = wrapped
    try:
        out, g = run(x, target, weight, grad_out, device, **kw)
    finally:
        L.cross_entropy = saved
    return (out, got["lse"]), g


L_cross_entropy = L.cross_entropy


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_probability_targets_long_rows_and_non_finite(device, dtype):
    """Rows longer than a store block, with +-inf logits (capped: finite) and a NaN row."""
    K = 4099
    x = _logits(5, K, dtype, 21)
    x[0, 3] = float("inf")
    x[1, :] = float("-inf")
    x[2, K - 1] = float("nan")
    target = _soft_targets(5, K, dtype, 22)
    kw = dict(reduction="none", label_smoothing=0.1, z_loss=1e-3, softcap=20.0)
    ref_out, ref_g, grad_out = _reference(x, target, None, **kw)
    out, g = _ours(x, target, None, grad_out, device, **kw)
    assert bool(out[2].isnan()) and bool(out[[0, 1, 3, 4]].isfinite().all())
    assert_close_to(out, ref_out, dtype, "loss")
    assert_close_to(g, ref_g, dtype, "grad", ulps=2)


@pytest.mark.parametrize("device", DEVICES)
def test_probability_targets_k_dim_and_1d(device):
    """(N, C, d) and (C,) inputs with soft targets: loss and lse shaped like the 'none' loss."""
    x = _logits(2 * 5, 6, torch.float64, 4).reshape(2, 5, 6).movedim(2, 1)  # (N=2, C=6, d=5), strided
    p = torch.softmax(_logits(2 * 5, 6, torch.float64, 5), 1).reshape(2, 5, 6).movedim(2, 1)
    kw = dict(label_smoothing=0.1, z_loss=1e-2, softcap=4.0)
    for red in ("none", "mean", "sum"):
        ref_out, ref_g, grad_out = _reference(x, p, None, reduction=red, **kw)
        out, g = _ours(x, p, None, grad_out, device, reduction=red, **kw)
        assert_close_to(out, ref_out, torch.float64, red)
        assert_close_to(g, ref_g, torch.float64, red)
    _, lse = L.cross_entropy(x.to(device), p.to(device), return_lse=True, reduction="none", **kw)
    assert lse.shape == (2, 5)
    assert_close_to(lse, _capped_lse(x.movedim(1, -1).reshape(-1, 6), 4.0).reshape(2, 5), torch.float64, "lse")
    x1, p1 = x[0, :, 0], p[0, :, 0]
    loss1, lse1 = L.cross_entropy(x1.to(device), p1.to(device), return_lse=True, **kw)
    assert loss1.shape == () and lse1.shape == ()
    assert_close_to(loss1, reference.cross_entropy(x1, p1, **kw), torch.float64, "1-d loss")
    with pytest.raises(ValueError, match="inplace_backward"):
        L.cross_entropy(x.to(device).requires_grad_() * 1, p.to(device), inplace_backward=True)


def test_probability_targets_that_need_a_gradient():
    """Soft targets requiring grad take the differentiable composite (the options included)."""
    x = _logits(6, 9, torch.float64, 8)
    p = torch.softmax(_logits(6, 9, torch.float64, 9), 1)
    kw = dict(label_smoothing=0.1, z_loss=1e-2, softcap=4.0)
    grads = []
    for fn in (L.cross_entropy, reference.cross_entropy):
        xx, pp = x.clone().requires_grad_(), p.clone().requires_grad_()
        out = fn(xx, pp, **kw)
        out = out[0] if isinstance(out, tuple) else out
        out.backward()
        grads.append((out.detach(), xx.grad, pp.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    loss, lse = L.cross_entropy(x, p.clone().requires_grad_(), return_lse=True, **kw)
    torch.testing.assert_close(lse, _capped_lse(x, 4.0), rtol=1e-12, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_probability_targets_inplace_saves_and_guards(device):
    """inplace_backward with soft targets: the logits keep their values until backward, the
    gradient lands in their storage, and an op that saved them makes backward raise."""
    leaf = _logits(8, 30, torch.float32, 3).to(device).requires_grad_()
    p = _soft_targets(8, 30, torch.float32, 4).to(device)
    logits = leaf * 1
    before = logits.detach().clone()
    loss = L.cross_entropy(logits, p, label_smoothing=0.1, z_loss=1e-3, softcap=5.0, inplace_backward=True)
    assert torch.equal(logits.detach(), before)  # read after the loss call: still the logits
    ptr = logits.data_ptr()
    loss.backward()
    ref_out, ref_g, grad_out = _reference(before, p, None, label_smoothing=0.1, z_loss=1e-3, softcap=5.0)
    assert_close_to(leaf.grad, ref_g / grad_out, torch.float32, "grad")  # incoming gradient 1 here
    assert not torch.equal(logits.detach(), before) and logits.data_ptr() == ptr
    leaf2 = leaf.detach().clone().requires_grad_()
    logits2 = leaf2 * 1
    other = (logits2 ** 2).sum()  # saves logits2 for its own backward
    loss2 = L.cross_entropy(logits2, p, z_loss=1e-3, inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (loss2 + other).backward()


def test_operator_checks_values():
    x = _logits(4, 5, torch.float32, 0)
    t = torch.tensor([0, 1, 2, 3])
    with pytest.raises(ValueError, match="z_loss"):
        torch.ops.labelsmooth_ext.ce_forward_ext(x, t, None, -100, 0.0, 0, 1, False, -1.0, 0.0)
    with pytest.raises(ValueError, match="softcap"):
        torch.ops.labelsmooth_ext.ce_forward_ext(x, t, None, -100, 0.0, 0, 1, False, 0.0, float("nan"))


def test_opcheck_probability_targets():
    ops = torch.ops.labelsmooth_ext
    x = _logits(6, 9, torch.float32, 5)
    p = _soft_targets(6, 9, torch.float32, 6)
    w = torch.rand(9) + 0.5
    for red in (0, 1, 2):
        for grad in (False, True):
            torch.library.opcheck(ops.ce_prob_forward_ext, (x.clone().requires_grad_(grad), p, w, 0.1, 0, red,
                                                            grad, 1e-3, 5.0))
        go = torch.rand(6) if red == 0 else torch.tensor(0.7)
        torch.library.opcheck(ops.ce_prob_grad_ext, (x, p, None, go, 0.1, 1, red, 1e-3, 5.0))
        torch.library.opcheck(ops.ce_prob_grad_ext_, (x.clone(), p, w, go, 0.1, 0, red, 1e-3, 0.0))
    with pytest.raises(ValueError, match="z_loss"):
        ops.ce_prob_forward_ext(x, p, None, 0.0, 0, 1, False, -1.0, 0.0)
    with pytest.raises(ValueError, match="softcap"):
        ops.ce_prob_grad_ext(x, p, None, torch.tensor(1.0), 0.0, 0, 1, 0.0, float("inf"))


def test_opcheck():
    ops = torch.ops.labelsmooth_ext
    x = _logits(6, 9, torch.float32, 5)
    t = torch.tensor([0, 8, -100, 3, 4, 1])
    w = torch.rand(9) + 0.5
    for red in (0, 1, 2):
        for grad in (False, True):
            torch.library.opcheck(ops.ce_forward_ext, (x.clone().requires_grad_(grad), t, w, -100, 0.1, 0, red,
                                                       grad, 1e-3, 5.0))
        go = torch.rand(6) if red == 0 else torch.tensor(0.7)
        torch.library.opcheck(ops.ce_grad_ext, (x, t, None, go, -100, 0.1, 1, red, 1e-3, 5.0))
        torch.library.opcheck(ops.ce_grad_ext_, (x.clone(), t, w, go, -100, 0.1, 0, red, 1e-3, 5.0))


def test_inplace_after_a_compiled_model():
    """Compiled model, eager loss: inplace_backward keeps its in-place write (the README's
    advice), with the gradients of the out-of-place eager run."""
    torch._dynamo.reset()
    head = torch.compile(lambda h, w: torch.tanh(h) @ w.t(), fullgraph=True)
    h, w, t = _lm_head(7)
    logits = head(h, w)
    kw = dict(label_smoothing=0.1, z_loss=1e-3, softcap=5.0)
    L.cross_entropy(logits, t, inplace_backward=True, **kw).backward()
    h2, w2, _ = _lm_head(7)
    L.cross_entropy(torch.tanh(h2) @ w2.t(), t, **kw).backward()
    torch.testing.assert_close(h.grad, h2.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(w.grad, w2.grad, rtol=1e-5, atol=1e-7)
    with torch.no_grad():
        assert not torch.allclose(logits, torch.tanh(h) @ w.t())  # the logits now hold the gradient


@pytest.mark.parametrize("inplace", [False, True])
def test_compile_fullgraph_probability_targets(inplace):
    torch._dynamo.reset()

    def step(h, w, p):
        logits = h @ w.t()
        return L.cross_entropy(logits, p, label_smoothing=0.1, z_loss=1e-3, softcap=5.0,
                               inplace_backward=inplace, return_lse=True)

    compiled = torch.compile(step, fullgraph=True)
    results = []
    for fn in (step, compiled):
        h, w, _ = _lm_head(5)
        p = _soft_targets(h.shape[0], w.shape[0], torch.float32, 6)
        loss, lse = fn(h, w, p)
        loss.backward()
        results.append((loss.detach(), lse, h.grad, w.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("inplace", [False, True])
def test_compile_fullgraph(inplace):
    torch._dynamo.reset()

    def step(h, w, t):
        logits = h @ w.t()
        loss, lse = L.cross_entropy(logits, t, label_smoothing=0.1, z_loss=1e-3, softcap=5.0,
                                    inplace_backward=inplace, return_lse=True)
        return loss, lse

    compiled = torch.compile(step, fullgraph=True)
    results = []
    for fn in (step, compiled):
        h, w, t = _lm_head(4)
        t[3] = -100
        loss, lse = fn(h, w, t)
        loss.backward()
        results.append((loss.detach(), lse, h.grad, w.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
