"""The CUDA kernels run on the CPU under the SIMT emulation (tests/simt_ext.py, csrc/cuda/simt/).

1. The emulator's own tests: each rule it enforces is shown by a deliberately broken kernel that
   it must catch (as a Python exception, with the process alive), and a correct twin it must pass.
2. The CUDA operators, emulated, against a float64 reference over the sizes that pick each
   kernel: every dtype, K in {1, 2, 3, 7, 8, 31, 32, 33, 1000, 4097, 32000, 50257}, N in
   {1, 7, 33}, both smoothing modes, weights, ignore_index (all rows too), every reduction,
   misaligned views, NaN / -inf rows, out-of-range targets, in-place backward.

What the emulation cannot check: speed, the hardware's exp precision (ex2.approx is exp2f here),
real memory ordering across blocks running at once.
"""
import pytest
import torch
import torch.nn.functional as F

import labelsmooth_ext as L
from conftest import DTYPES, SIMT_SKIP, assert_close_to

pytestmark = pytest.mark.skipif(SIMT_SKIP, reason="LSE_NO_SIMT is set")


@pytest.fixture(scope="module")
def simt():
    import simt_ext

    return simt_ext


@pytest.fixture
def emulated(simt):
    with simt.emulation():
        yield


# ---- 1. the emulator's own tests ------------------------------------------------------------

MUST_RAISE = {
    # warp_reduce's full 0xffffffff mask with rows narrower than a warp, one row returning early
    "rows_4_lanes_partial": "named in the mask but has exited",
    "rows_8_lanes_partial": "named in the mask but has exited",
    "rows_16_lanes_partial": "named in the mask but has exited",
    "race_no_barrier": "depends on the schedule",  # shared memory read before the barrier
    "race_blocks": "depends on the schedule",  # two blocks write one element
    "partial_syncthreads": "only part of the block",
    "exit_before_syncthreads": "only part of the block",
    "caller_not_in_mask": "does not name it",
    "source_not_in_mask": "which the mask does not name",
    "misaligned_pack": "misaligned 16-byte pack access",
    "oob_write": "out-of-bounds write 0 bytes past the end",
}
MUST_GIVE_NAN = ["shared_uninitialised", "unwritten_output"]  # 0xFF-filled shared memory / outputs
MUST_PASS = ["rows_32_lanes_partial", "rows_128_lanes", "rows_512_lanes", "ok_barrier", "ok_shfl_width8",
             "ok_aligned_pack", "ok_write"]


@pytest.mark.parametrize("case", sorted(MUST_RAISE))
def test_emulator_catches_broken_kernel(simt, case):
    with pytest.raises(RuntimeError, match=MUST_RAISE[case]):
        simt.load().selftest(case)
    assert simt.load().selftest("ok_barrier") == "ok"  # and the process carries on


@pytest.mark.parametrize("case", MUST_GIVE_NAN)
def test_emulator_poisons_unwritten_memory(simt, case):
    assert simt.load().selftest(case) == "nan"


@pytest.mark.parametrize("case", MUST_PASS)
def test_emulator_passes_correct_kernel(simt, case):
    assert simt.load().selftest(case) == "ok"


def test_emulated_outputs_are_guarded_and_nan_filled(simt):
    """The emulated operator's outputs come from guarded memory (0xFF until written): an
    ignored row's loss is written as 0 by the kernel, not left over from the allocation."""
    x = torch.randn(5, 40)
    t = torch.tensor([-100, 1, -100, 3, 4])
    rows, grad = simt.load().ce_forward(x, t, None, -100, 0.1, 0, 0, True)
    assert rows[0] == 0 and rows[2] == 0 and not rows.isnan().any()
    assert torch.equal(grad[0], torch.zeros(40)) and not grad.isnan().any()


# ---- 2. the CUDA operators, emulated ------------------------------------------------------------

KS = [1, 2, 3, 7, 8, 31, 32, 33, 1000, 4097, 32000, 50257]
# (label_smoothing, smoothing_mode, weighted, reduction): rotated over the cases
VARIANTS = [(0.0, "uniform", False, "mean"), (0.1, "uniform", True, "sum"),
            (0.2, "off_target", False, "none"), (0.1, "off_target", True, "mean"),
            (1.0, "uniform", False, "sum"), (0.3, "uniform", True, "none")]


def _reference(x, t, w, **kw):
    xd = x.detach().double().requires_grad_()
    out = L.reference.cross_entropy(xd, t, None if w is None else w.double(), **kw)
    return out, torch.autograd.grad(out.sum(), xd)[0]


def _check(x, t, w, dtype, **kw):
    xx = x.detach().clone().requires_grad_()
    out = L.cross_entropy(xx, t, weight=w, **kw)
    out.sum().backward()
    ref, gref = _reference(x, t, w, **kw)
    assert_close_to(out, ref, dtype, f"loss {kw}")
    assert_close_to(xx.grad, gref, dtype, f"grad {kw}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("K", KS)
def test_parity_matrix(emulated, dtype, K):
    big = K >= 4097
    for i, N in enumerate([1, 7] if big else [1, 7, 33]):
        for j in range(2 if big else 3):
            eps, mode, weighted, red = VARIANTS[(KS.index(K) + 2 * i + j + DTYPES.index(dtype)) % len(VARIANTS)]
            if mode == "off_target" and K == 1:
                mode = "uniform"
            g = torch.Generator().manual_seed(1000 * K + 10 * N + j)
            x = (torch.randn(N, K, generator=g) * 3).to(dtype)
            t = torch.randint(0, K, (N,), generator=g)
            t[N // 2] = -100
            w = (torch.rand(K, generator=g) + 0.1).to(dtype) if weighted else None
            _check(x, t, w, dtype, reduction=red, label_smoothing=eps, smoothing_mode=mode)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("K", [7, 33, 1000, 4097])
def test_misaligned_views_and_odd_strides(emulated, dtype, K):
    """x[:, 1:] (rows start off 16-byte alignment, input and gradient misaligned differently),
    odd K, odd row strides: the kernels take their scalar head / scalar paths."""
    g = torch.Generator().manual_seed(K)
    base = torch.randn(7, K + 3, generator=g).to(dtype)
    t = torch.randint(0, K, (7,), generator=g)
    for x in (base[:, 1:K + 1], base[:, 3:], base[:, :K], base.reshape(-1)[5:5 + 6 * K].view(6, K)):
        tt = t[: x.shape[0]]
        assert not x.is_contiguous() or x.data_ptr() % 16
        _check(x, tt, None, dtype, reduction="sum", label_smoothing=0.1)


@pytest.mark.parametrize("K", [7, 1000, 50257])
def test_nan_inf_rows_and_out_of_range_targets(emulated, K):
    x = torch.randn(6, K)
    x[1, 3] = float("nan")
    x[2] = float("-inf")
    x[3, 0] = float("inf")
    x[4, : K // 2] = float("-inf")  # finite row max
    t = torch.tensor([0, 1, 2, 3, K - 1, K + 5])  # the last is out of range: a NaN row
    xx = x.clone().requires_grad_()
    out = L.cross_entropy(xx, t, reduction="none", label_smoothing=0.1)
    out.sum().backward()
    assert out[[1, 2, 3, 5]].isnan().all() and not out[[0, 4]].isnan().any()
    assert xx.grad[[1, 2, 3, 5]].isnan().all() and not xx.grad[[0, 4]].isnan().any()
    ref = F.cross_entropy(x[[0, 4]].double(), t[[0, 4]], reduction="none", label_smoothing=0.1)
    assert_close_to(out[[0, 4]], ref, torch.float32, "finite rows")


@pytest.mark.parametrize("K", [5, 4097])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_all_rows_ignored(emulated, K, reduction):
    x = torch.randn(7, K, requires_grad=True)
    t = torch.full((7,), -100)
    out = L.cross_entropy(x, t, reduction=reduction, label_smoothing=0.1)
    ref = F.cross_entropy(x.detach().double(), t, reduction=reduction, label_smoothing=0.1)
    assert_close_to(out, ref, torch.float32, "loss")  # mean: 0/0 = NaN, as PyTorch
    out.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("dtype", DTYPES)
def test_inplace_backward_scales_and_second_backward_raises(emulated, dtype):
    x = torch.randn(9, 3000).to(dtype).requires_grad_()
    t = torch.randint(0, 3000, (9,))
    out = L.cross_entropy(x, t, label_smoothing=0.1, reduction="none")
    go = torch.rand(9).to(dtype) + 0.5
    go[4] = 1.0  # rows with an incoming gradient of exactly 1 are skipped
    out.backward(go, retain_graph=True)
    _, gref = _reference(x, t, None, label_smoothing=0.1, reduction="none")
    assert_close_to(x.grad, gref * go.double()[:, None], dtype, "scaled grad")
    if dtype == torch.float16:  # float16 saves no gradient (the backward recomputes it): nothing consumed
        x.grad = None
        out.backward(go)
        assert_close_to(x.grad, gref * go.double()[:, None], dtype, "second backward")
        return
    with pytest.raises(RuntimeError, match="set_inplace_backward"):
        out.backward(go)


@pytest.mark.parametrize("dtype", DTYPES)
def test_probability_targets_bce_and_k_dim(emulated, dtype):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(7, 33, generator=g).to(dtype)
    p = torch.softmax(torch.randn(7, 33, generator=g), 1).to(dtype)
    xx = x.clone().requires_grad_()
    out = L.cross_entropy(xx, p, label_smoothing=0.1)
    out.backward()
    xd = x.double().requires_grad_()
    ref = L.reference.cross_entropy(xd, p.double(), label_smoothing=0.1)
    ref.backward()
    assert_close_to(out, ref, dtype, "prob loss")
    assert_close_to(xx.grad, xd.grad, dtype, "prob grad")

    xb = torch.randn(5, 301, generator=g).to(dtype).requires_grad_()
    tb = torch.randint(0, 2, (5, 301), generator=g).to(dtype)
    pw = (torch.rand(301, generator=g) + 0.5).to(dtype)
    out = L.binary_cross_entropy_with_logits(xb, tb, pos_weight=pw, label_smoothing=0.1)
    out.backward()
    xd = xb.detach().double().requires_grad_()
    ref = F.binary_cross_entropy_with_logits(xd, (tb.double() * 0.8 + 0.1), pos_weight=pw.double())
    ref.backward()
    assert_close_to(out, ref, dtype, "bce loss")
    assert_close_to(xb.grad, xd.grad, dtype, "bce grad")

    xk = torch.randn(2, 37, 3, 5, generator=g).to(dtype).requires_grad_()
    tk = torch.randint(0, 37, (2, 3, 5), generator=g)
    tk[0, 1, 2] = -100
    out = L.cross_entropy(xk, tk, label_smoothing=0.1)
    out.backward()
    xd = xk.detach().double().requires_grad_()
    ref = F.cross_entropy(xd, tk, label_smoothing=0.1)
    ref.backward()
    assert_close_to(out, ref, dtype, "k-dim loss")
    assert_close_to(xk.grad, xd.grad, dtype, "k-dim grad")


def test_emulated_ops_match_the_real_schemas(simt):
    ns = simt.load()
    for name in ("ce_forward", "ce_prob_forward", "bce_forward", "ce_backward", "ce_scale_"):
        real = str(getattr(torch.ops.labelsmooth_ext, name).default._schema).split("::", 1)[1]
        emu = str(getattr(ns, name).default._schema).split("::", 1)[1]
        assert real == emu


@pytest.mark.parametrize("K", [9, 2000, 5000])
def test_ignore_index_inside_the_class_range_with_weights(emulated, K):
    """An ignore_index that is a valid class; the weighted mean's device-side denominator."""
    g = torch.Generator().manual_seed(K)
    x = torch.randn(7, K, generator=g)
    t = torch.tensor([3, 1, 3, 0, K - 1, 3, 2])
    w = torch.rand(K, generator=g) + 0.1
    _check(x, t, w, torch.float32, reduction="mean", ignore_index=3, label_smoothing=0.1)



@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("K", [1001, 4097])
def test_misaligned_views_keep_16_byte_packs(simt, emulated, dtype, K):
    """Issue 10 item 6: rows off 16-byte alignment (x.view(-1, K)[1:]: every input row; a padded
    vocabulary sliced, logits[:, :K]: gradient rows at K x row elements) keep their 16-byte loads,
    aligned to the input, instead of dropping the row to scalar code. The emulator counts pack
    loads and stores: loads stay within one pack per row (the scalar head / tail) of an aligned
    copy of the same data; the flat view's gradient shares its input's alignment, so its stores
    stay packed too (the padded view's are split where a gradient row is aligned differently)."""
    ns = simt.load()
    g = torch.Generator().manual_seed(K + 1)
    N = 5
    es = torch.empty((), dtype=dtype).element_size()
    flat = torch.randn(N * K + 1, generator=g).to(dtype)
    padded = torch.randn(N, (K + 63) // 64 * 64, generator=g).to(dtype)
    t = torch.randint(0, K, (N,), generator=g)
    for name, x in (("flat", flat[1:].view(N, K)), ("padded", padded[:, :K])):
        if name == "flat":
            assert any(x[i].data_ptr() % 16 for i in range(N))  # and each row one element past its gradient row
        else:  # input rows aligned, gradient rows (contiguous N x K) not all
            assert not any(x[i].data_ptr() % 16 for i in range(N)) and any(i * K * es % 16 for i in range(N))
        ns.pack_accesses()  # reset the counters
        ns.ce_forward(x.contiguous(), t, None, -100, 0.1, 0, 1, True)
        loads0, stores0, _ = ns.pack_accesses()
        ns.ce_forward(x, t, None, -100, 0.1, 0, 1, True)
        loads, stores, _ = ns.pack_accesses()
        assert loads0 > 0 and stores0 > 0
        assert loads >= 0.95 * loads0, (name, loads, loads0)
        if name == "flat":
            assert stores >= 0.95 * stores0, (name, stores, stores0)
        _check(x, t, None, dtype, reduction="sum", label_smoothing=0.1)


def _reference_ext(x, t, w, **kw):
    xd = x.detach().double().requires_grad_()
    out = L.reference.cross_entropy(xd, t, None if w is None else w.double(), **kw)
    return out, xd


@pytest.mark.parametrize("dtype", DTYPES)
def test_one_row_split_over_blocks(simt, emulated, dtype):
    """Issue 10 item 4: with fewer rows than multiprocessors (the emulated GPU has 2), a row of at
    least 32 KiB is split over several blocks (ce_split_stats_kernel + ce_split_grad_kernel):
    one row here, with weights, both smoothing modes, z_loss, softcap and lse, a misaligned view,
    an ignored row, a NaN row, an out-of-range target, and the recomputing backward
    (reduction="none" with an incoming gradient, float16's path)."""
    K = 20011  # 80 KB in float32: 2-4 chunks depending on the dtype
    g = torch.Generator().manual_seed(11 + DTYPES.index(dtype))
    base = (torch.randn(1, K + 1, generator=g) * 3).to(dtype)
    w = (torch.rand(K, generator=g) + 0.1).to(dtype)
    cases = [
        (base[:, :K], dict(label_smoothing=0.1), None),
        (base[:, 1:], dict(label_smoothing=0.2, smoothing_mode="off_target", reduction="sum"), w),
        (base[:, :K], dict(label_smoothing=0.1, z_loss=1e-3, softcap=15.0, reduction="none"), w),
        (base[:, 1:], dict(z_loss=1e-2, reduction="none"), None),
    ]
    for i, (x, kw, wt) in enumerate(cases):
        t = torch.randint(0, K, (1,), generator=g)
        xx = x.detach().clone().requires_grad_()
        out, lse = L.cross_entropy(xx, t, weight=wt, return_lse=True, **kw)
        go = torch.full_like(out, 1.5)  # an incoming gradient other than 1
        out.backward(go)
        ref, xd = _reference_ext(x, t, wt, **kw)
        (ref * go.double()).sum().backward()
        assert_close_to(out, ref, dtype, f"split loss {kw}")
        assert_close_to(xx.grad, xd.grad, dtype, f"split grad {kw}", ulps=2)
        zc = x.double() if "softcap" not in kw else kw["softcap"] * torch.tanh(x.double() / kw["softcap"])
        assert_close_to(lse, torch.logsumexp(zc, 1), dtype, "split lse")
    x = base[:, :K].clone()
    for t, nan in ((torch.tensor([-100]), False), (torch.tensor([K + 3]), True), (torch.tensor([5]), True)):
        if t.item() == 5:
            x[0, K // 2] = float("nan")
        xx = x.clone().requires_grad_()
        out = L.cross_entropy(xx, t, reduction="sum", label_smoothing=0.1)
        out.backward()
        assert bool(out.isnan()) == nan and bool(xx.grad.isnan().all()) == nan
        if not nan:
            assert torch.equal(xx.grad, torch.zeros_like(xx.grad))
    # the split kernels ran: the loads of one forward are at least the row's packs
    ns = simt.load()
    ns.pack_accesses()
    ns.ce_forward(base[:, :K].contiguous(), torch.tensor([3]), None, -100, 0.0, 0, 1, True)
    loads, stores, launches = ns.pack_accesses()
    assert launches == 2  # the statistics kernel, then the gradient kernel
    vec = 16 // base.element_size()
    assert loads >= 2 * (K // vec - 1) and stores >= K // vec - 1
    ns.ce_forward(base[:, :K].contiguous().expand(2, K).contiguous(), torch.tensor([3, 4]), None, -100, 0.0, 0,
                  1, True)
    assert ns.pack_accesses()[2] == 1  # two rows on the 2-SM emulated GPU: one block per row


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_saved_gradient_reuse_is_vectorised(simt, emulated, dtype):
    """Issue 10 item 8: a 16-bit backward whose incoming gradient scales the saved gradient exactly
    (1 for float16; 1, 0 or 2^k for bfloat16) reuses it row by row inside ce_forward_kernel, now
    in 16-byte packs (it was element by element). Rows off 16-byte alignment (K odd) keep a
    scalar head; the result against the float64 reference."""
    ns = simt.load()
    g = torch.Generator().manual_seed(5)
    N, K = 3, 4097
    x = (torch.randn(N, K, generator=g) * 2).to(dtype)
    t = torch.randint(0, K, (N,), generator=g)
    _, saved = ns.ce_forward(x, t, None, -100, 0.1, 0, 0, True)
    go = torch.full((N,), 1.0 if dtype == torch.float16 else 2.0)
    ns.pack_accesses()
    grad = ns.ce_grad(x, t, None, go, saved, -100, 0.1, 0, 0)
    loads, stores, launches = ns.pack_accesses()
    assert launches == 1 and loads >= N * (K // 8 - 1) and stores >= N * (K // 8 - 1), (loads, stores)
    assert torch.equal(grad.float(), saved.float() * go[:, None])  # exact: a power of two
    _, gref = _reference(x, t, None, label_smoothing=0.1, reduction="none")
    assert_close_to(grad, gref * go.double()[:, None], dtype, "reused grad")


# ---- probability targets: the fused kernel (issue 10 item 9) ------------------------------------

# (z_loss, softcap, incoming gradient): rotated over the cases of the ext operators
PROB_EXT = [(0.0, 0.0, "ones"), (1e-3, 0.0, "random"), (2e-2, 3.0, "random"), (0.0, 5.0, "twos")]


def _prob_inputs(g, N, K, dtype, tdt, i):
    """Logits and soft targets, each a contiguous row block or a view off 16-byte alignment."""
    base = (torch.randn(N, K + 3, generator=g) * 3).to(dtype)
    x = base[:, 1:K + 1] if i % 2 else base[:, :K].contiguous()
    tb = torch.softmax(torch.randn(N, K + 2, generator=g), 1).to(tdt)
    p = tb[:, 2:K + 2] if i % 3 == 1 else tb[:, :K].contiguous()
    return x, p


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("K", [1, 7, 33, 1000, 4097])
def test_probability_targets_fused_kernel(simt, emulated, dtype, K):
    """Probability targets run one fused kernel (ce_prob_kernel) on the CUDA path: every
    reduction, weights, both smoothing modes, float32 targets for 16-bit inputs, rows off 16-byte
    alignment (input, target and gradient each aligned differently), a row with a NaN and a row of
    -inf (NaN loss and gradient, as the CPU path), against the float64 reference. Above a warp's
    row size the logits and targets are read in 16-byte packs (counted by the emulator)."""
    ns = simt.load()
    g = torch.Generator().manual_seed(7 * K + DTYPES.index(dtype))
    N = 5
    targets = [dtype] + ([torch.float32] if dtype in (torch.float16, torch.bfloat16) else [])
    for j, tdt in enumerate(targets):
        for i, (eps, mode, weighted, red) in enumerate(VARIANTS[j::2]):
            if mode == "off_target" and K == 1:
                mode = "uniform"
            x, p = _prob_inputs(g, N, K, dtype, tdt, i)
            w = (torch.rand(K, generator=g) + 0.1).to(dtype) if weighted else None
            if i == 2 and K > 1:
                x = x.clone()
                x[1, K // 2] = float("nan")
                x[3] = float("-inf")
            if tdt == dtype:  # through the functional API
                xx = x.detach().clone().requires_grad_()
                out = L.cross_entropy(xx, p, weight=w, reduction=red, label_smoothing=eps, smoothing_mode=mode)
                out.sum().backward()
                got_grad = xx.grad
            else:  # a float32 target of a 16-bit input (what autocast passes): the operator itself
                out, got_grad = ns.ce_prob_forward(x, p, w, eps, ["uniform", "off_target"].index(mode),
                                                   ["none", "mean", "sum"].index(red), True)
            xd = x.detach().double().requires_grad_()
            ref = L.reference.cross_entropy(xd, p.double(), None if w is None else w.double(), reduction=red,
                                            label_smoothing=eps, smoothing_mode=mode)
            ref.sum().backward()
            what = f"prob {tdt} {eps} {mode} {weighted} {red}"
            assert_close_to(out, ref, dtype, "loss " + what)
            assert_close_to(got_grad, xd.grad, dtype, "grad " + what)
    if K >= 1000:
        ns.pack_accesses()
        x = torch.randn(N, K).to(dtype)
        ns.ce_prob_forward(x, torch.softmax(x.float(), 1).to(dtype), None, 0.1, 0, 1, True)
        loads, stores, launches = ns.pack_accesses()
        assert launches == 1  # one kernel, no composite passes
        vec = 16 // x.element_size()
        # each schedule: logits + targets read twice (loss, gradient), gradient stored once
        assert loads >= 4 * N * (K // vec - 1) and stores >= N * (K // vec - 1), (loads, stores)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("K", [7, 33, 1000, 4097])
def test_probability_targets_ext_fused_kernel(simt, emulated, dtype, K):
    """The ext operators of probability targets (z_loss, softcap, lse; the recomputing backward
    with an incoming gradient that is not 1, out of place and in place over the logits) run the
    fused kernel too, one launch each: loss, lse and gradient against the float64 reference, for
    the input dtype's target and (16-bit) a float32 one, weights, both modes, every reduction,
    misaligned input and target rows."""
    ns = simt.load()
    g = torch.Generator().manual_seed(13 * K + DTYPES.index(dtype))
    N = 6
    targets = [dtype] + ([torch.float32] if dtype in (torch.float16, torch.bfloat16) else [])
    case = 0
    for tdt in targets:
        for i, (eps, mode, weighted, red) in enumerate(VARIANTS):
            zl, cap, go_kind = PROB_EXT[case % len(PROB_EXT)]
            case += 1
            x, p = _prob_inputs(g, N, K, dtype, tdt, i)
            if cap and i % 2 == 0:
                x = x.clone()
                x[2, 1] = float("inf")  # capped: finite
                x[4] = float("-inf")
            w = (torch.rand(K, generator=g) + 0.1).to(dtype) if weighted else None
            mi, ri = ["uniform", "off_target"].index(mode), ["none", "mean", "sum"].index(red)
            n_go = N if red == "none" else 1
            go = {"ones": torch.ones(n_go), "twos": torch.full((n_go,), 2.0),
                  "random": torch.rand(n_go, generator=g) * 2 - 0.5}[go_kind]
            go = go.reshape(()) if red != "none" else go
            xd = x.detach().double().requires_grad_()
            ref = L.reference.cross_entropy(xd, p.double(), None if w is None else w.double(), reduction=red,
                                            label_smoothing=eps, smoothing_mode=mode, z_loss=zl,
                                            softcap=cap or None)
            (ref * go.double()).sum().backward()
            zr = x.double() if not cap else cap * torch.tanh(x.double() / cap)
            lse_ref = torch.logsumexp(zr, 1)
            what = f"prob ext {tdt} {eps} {mode} {weighted} {red} z={zl} cap={cap} go={go_kind}"

            ns.pack_accesses()
            out, g_fwd, lse = ns.ce_prob_forward_ext(x, p, w, eps, mi, ri, True, zl, cap)
            assert ns.pack_accesses()[2] == 1, what  # one launch
            assert_close_to(out, ref.detach(), dtype, "loss " + what)
            assert_close_to(lse, lse_ref, torch.float64 if dtype == torch.float64 else torch.float32, "lse " + what)
            g_rec = ns.ce_prob_grad_ext(x, p, w, go, eps, mi, ri, zl, cap)
            assert_close_to(g_rec, xd.grad, dtype, "grad " + what, ulps=2)
            xi = x.contiguous().clone()
            ns.ce_prob_grad_ext_(xi, p, w, go, eps, mi, ri, zl, cap)
            assert_close_to(xi, xd.grad, dtype, "in-place grad " + what, ulps=2)
            # the forward's own gradient (incoming gradient 1)
            xd1 = x.detach().double().requires_grad_()
            L.reference.cross_entropy(xd1, p.double(), None if w is None else w.double(), reduction=red,
                                      label_smoothing=eps, smoothing_mode=mode, z_loss=zl,
                                      softcap=cap or None).sum().backward()
            assert_close_to(g_fwd, xd1.grad, dtype, "forward grad " + what, ulps=2)
