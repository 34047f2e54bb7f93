"""Defects a differential fuzz against PyTorch found (issue 17), one test each."""
import pytest
import torch
import torch.nn.functional as F

import labelsmooth_ext as L
from conftest import DEVICES, assert_close_to, skip_if_subnormals_flushed


def _grad(fn, x, *args, **kw):
    xx = x.detach().clone().requires_grad_()
    out = fn(xx, *args, **kw)
    (g,) = torch.autograd.grad(out.sum(), xx)
    return out, g


@pytest.mark.parametrize("eps", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("ignored", [False, True])
def test_mean_with_zero_target_weight_sum_is_nan(eps, ignored):
    """The kept rows' target weights sum to 0: PyTorch (and the float64 truth, 0/0 in the nll
    term) give NaN; the smoothing term alone would give x / 0 = inf."""
    x = torch.randn(4, 5, dtype=torch.float64)
    w = torch.tensor([0.0, 1.0, 2.0, 0.5, 1.0], dtype=torch.float64)
    t = torch.tensor([0, -100 if ignored else 0, 0, 0])
    ours, g = _grad(L.cross_entropy, x, t, weight=w, label_smoothing=eps)
    theirs, gt = _grad(F.cross_entropy, x, t, weight=w, label_smoothing=eps)
    assert theirs.isnan() and ours.isnan(), (float(ours), float(theirs))
    assert_close_to(g, gt, torch.float64, "grad")  # NaN rows as PyTorch, ignored rows exactly 0


def _saved_storage_of_grad(loss_fn):
    """Runs loss_fn() with a pack hook that records the storages autograd saves."""
    ptrs = []

    def pack(t):
        ptrs.append(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = loss_fn()
    return out, ptrs


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_retained_graph_never_hands_out_the_saved_gradient(reduction):
    """autograd.grad(retain_graph=True) with an incoming gradient of 1: a caller who modifies the
    result in place must not change what the second backward returns."""
    x = torch.randn(6, 7, requires_grad=True)
    t = torch.tensor([0, 3, -100, 6, 2, 2])
    loss = L.cross_entropy(x, t, reduction=reduction, label_smoothing=0.1)
    (g1,) = torch.autograd.grad(loss, x, retain_graph=True)
    expected = g1.clone()
    g1.mul_(0).add_(123.0)  # the user owns the result
    (g2,) = torch.autograd.grad(loss, x)
    torch.testing.assert_close(g2, expected, rtol=0, atol=0)
    _, gt = _grad(F.cross_entropy, x.double(), t, reduction=reduction, label_smoothing=0.1)
    assert_close_to(g2, gt, torch.float32, "second backward")


@pytest.mark.skipif(not hasattr(torch._C._autograd, "_get_current_graph_task_keep_graph"),
                    reason=f"torch {torch.__version__} cannot tell a retained graph: the CPU backward always copies")
def test_single_backward_keeps_the_no_copy_path():
    """Without retain_graph the saved gradient becomes .grad as is (no copy, no pass)."""
    x = torch.randn(6, 7, requires_grad=True)
    t = torch.tensor([0, 3, -100, 6, 2, 2])
    loss, ptrs = _saved_storage_of_grad(lambda: L.cross_entropy(x, t, label_smoothing=0.1))
    loss.backward()
    assert x.grad.untyped_storage().data_ptr() in ptrs
    x.grad = None
    loss, ptrs = _saved_storage_of_grad(lambda: L.cross_entropy(x, t, label_smoothing=0.1))
    loss.backward(retain_graph=True)
    assert x.grad.untyped_storage().data_ptr() not in ptrs  # a copy: the graph may run again


def test_compile_fullgraph_with_traced_label_smoothing():
    """A smoothing schedule passed as an argument, and two compiled modules with other values:
    label_smoothing is a traced (symbolic) float under torch.compile."""
    x = torch.randn(8, 11)
    t = torch.randint(0, 11, (8,))
    t[2] = -100

    def step(x, t, eps):
        return L.cross_entropy(x, t, label_smoothing=eps)

    compiled = torch.compile(step, fullgraph=True)
    for eps in (0.1, 0.25, 0.4, 1.0):
        ours, g = _grad(lambda xx: compiled(xx, t, eps), x)
        theirs, gt = _grad(F.cross_entropy, x.double(), t, label_smoothing=eps)
        assert_close_to(ours, theirs, torch.float32, f"loss eps={eps}")
        assert_close_to(g, gt, torch.float32, f"grad eps={eps}")
    for eps in (0.05, 0.3):
        m = torch.compile(L.CrossEntropyLoss(label_smoothing=eps), fullgraph=True)
        assert_close_to(m(x, t), F.cross_entropy(x.double(), t, label_smoothing=eps), torch.float32,
                        f"module eps={eps}")


def test_ignore_index_with_probability_targets_is_refused_as_in_pytorch():
    x, p = torch.randn(3, 4), torch.softmax(torch.randn(3, 4), 1)
    with pytest.raises(RuntimeError):
        F.cross_entropy(x, p, ignore_index=1)
    with pytest.raises(ValueError, match="ignore_index is not supported for probability"):
        L.cross_entropy(x, p, ignore_index=1)
    with pytest.raises(ValueError, match="ignore_index=0"):
        L.CrossEntropyLoss(ignore_index=0)(x, p)
    assert_close_to(L.cross_entropy(x, p), F.cross_entropy(x.double(), p.double()), torch.float32, "default")


def _torch_takes_unbatched_one_element_target():
    """Recent PyTorch takes a (C,) input with a (1,) target at eps = 0; torch 2.4 refuses it."""
    try:
        F.cross_entropy(torch.zeros(3), torch.tensor([1]))
        return True
    except RuntimeError:
        return False


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("eps", [0.0, 0.2])
@pytest.mark.parametrize("C", [9, 1])
def test_unbatched_input_with_one_element_target(reduction, eps, C):
    """(C,) input with a (1,) target: PyTorch accepts it (0-d result) with eps = 0 and fails
    itself for eps > 0; we give the one-row (batched) result, 0-d, for every eps. C = 1 (long
    fuzz finding): input and target are then both (1,), which PyTorch reads as a probability
    target and refuses for an integer one; we give the one-row result there too (README)."""
    x = torch.randn(C, dtype=torch.float64)
    t = torch.tensor([C // 2])
    ours, g = _grad(L.cross_entropy, x, t, reduction=reduction, label_smoothing=eps)
    batched, gb = _grad(lambda xx: F.cross_entropy(xx[None], t, reduction=reduction, label_smoothing=eps), x)
    assert ours.shape == ()
    assert_close_to(ours, batched.reshape(()), torch.float64, "loss")
    assert_close_to(g, gb, torch.float64, "grad")
    if eps == 0.0 and C > 1 and _torch_takes_unbatched_one_element_target():
        theirs = F.cross_entropy(x, t, reduction=reduction)
        assert theirs.shape == ours.shape
        assert_close_to(ours, theirs, torch.float64, "PyTorch")
    else:
        with pytest.raises(RuntimeError):  # PyTorch's own failure, which we do better than
            F.cross_entropy(x, t, reduction=reduction, label_smoothing=eps)


@pytest.mark.parametrize("shape", [(3, 4), (1, 4, 3)])
def test_zero_weight_target_at_minus_inf(shape):
    """A target logit of -inf with a class weight of 0: the row loss is 0 * inf = NaN and the
    row's gradient stays finite, both as in PyTorch (the fuzzer's first guess, a NaN gradient
    row, was wrong: PyTorch is the reference)."""
    x = torch.randn(*shape, dtype=torch.float64)
    t = torch.tensor([1, 0, 2]).reshape((shape[0],) + shape[2:])
    x.select(1, 1).view(-1)[0] = float("-inf")  # row 0 (position 0): its target logit
    w = torch.tensor([0.5, 0.0, 1.0, 2.0], dtype=torch.float64)
    ours, g = _grad(L.cross_entropy, x, t, weight=w, reduction="none")
    theirs, gt = _grad(F.cross_entropy, x, t, weight=w, reduction="none")
    assert_close_to(ours, theirs, torch.float64, "loss")
    assert ours.reshape(-1)[0].isnan()
    assert_close_to(g, gt, torch.float64, "grad")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_bce_gradient_of_a_confident_correct_logit(dtype):
    """sigmoid(x) - 1 for a large positive x cancels to 0 in the accumulation type; the true
    gradient -exp(-x) / (1 + exp(-x)) is representable (long fuzz finding)."""
    x = torch.tensor([5.0, 12.0, 19.4, 30.0, 80.0, -19.4, -80.0]).to(dtype)
    t = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0]).to(dtype)
    for kw in ({}, {"pos_weight": torch.tensor([3.0]).to(dtype)}):
        ours, g = _grad(lambda xx: L.binary_cross_entropy_with_logits(xx, t, reduction="none", **kw), x)
        kwd = {k: v.double() for k, v in kw.items()}
        # PyTorch's own float64 results cancel too (sigmoid(30) - 1; log(1 + e) for e ~ 1e-9):
        # the exact forms instead, with softplus(z) = max(z, 0) + log1p(exp(-|z|)):
        #   loss = p t softplus(-x) + (1 - t) softplus(x)
        #   grad = p t (sigmoid(x) - 1) + (1 - t) sigmoid(x) = -p t expit(-x) + (1 - t) expit(x)
        p = kwd.get("pos_weight", torch.tensor(1.0, dtype=torch.float64))
        xd, td = x.double(), t.double()
        lg = torch.log1p(torch.exp(-xd.abs()))
        theirs = p * td * (torch.clamp(-xd, min=0) + lg) + (1 - td) * (torch.clamp(xd, min=0) + lg)
        gt = -p * td * torch.special.expit(-xd) + (1 - td) * torch.special.expit(xd)
        # every element, also x < 0 with t = 0, where x + (-x + log1p(e)) cancelled (below)
        assert_close_to(ours, theirs, dtype, "loss")
        assert_close_to(g, gt, dtype, "grad")
        assert (g[:5] < 0).all()  # never 0: the gradient keeps pushing, however little


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("a", [0.0, 1.0])
def test_bce_loss_of_a_confident_correct_logit(dtype, a):
    """Smoothed target t' = 0 (t = 0 with a = 0, or t = 1 with a = 1: the long fuzz's case, with a
    weight) and x < 0: the loss is w softplus(x) = w log1p(exp(x)). Summed as x + (-x + log1p(e))
    it cancelled to the rounding of |x| in the accumulation type (float32: 0 instead of 8.3e-7 at
    x = -14, 1.4e-4 instead of 1.36e-4 at x = -10). Checked per element, relative bound only."""
    x = torch.tensor([-1.0, -3.0, -8.0, -10.0, -14.0, -20.0, -30.0, -90.0, -6e4]).to(dtype)
    t = torch.full_like(x, a)
    xd = x.double()
    exact = torch.log1p(torch.exp(xd))  # t' = 0: the pos_weight term p t' softplus(-x) is 0
    for kw, w in (({}, 1.0), ({"weight": torch.tensor([3.0]).to(dtype)}, 3.0),
                  ({"pos_weight": torch.tensor([2.5]).to(dtype)}, 1.0)):
        for module in (False, True):
            fn = (L.BCEWithLogitsLoss(reduction="none", label_smoothing=a, **kw) if module else
                  lambda xx, tt: L.binary_cross_entropy_with_logits(xx, tt, reduction="none", label_smoothing=a, **kw))
            ours = fn(x, t)
            assert_close_to(ours, w * exact, dtype, f"loss {kw} module={module}", atol_rel=0.0)
    # the sums too: 'sum' of the same elements, against the exact sum
    ours = L.binary_cross_entropy_with_logits(x, t, reduction="sum", label_smoothing=a)
    assert_close_to(ours, exact.sum(), dtype, "sum", atol_rel=0.0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bce_smoothing_below_the_accumulation_type_still_smooths(device, dtype):
    """BCE's label_smoothing a > 0 that rounds to 0 in float32 (long fuzz: a = 1.1e-88, x = -inf, a
    negative pos_weight). With t = 1 and x = -inf the loss is (1 - t') x + L softplus(-x) with
    1 - t' = a > 0 and L = p + a (1 - p) < 0: -inf + -inf = -inf; with a rounded to 0 it was
    0 * -inf = NaN. The float64 kernel (where a is representable) is the truth; finite logits keep
    their a -> 0 values."""
    skip_if_subnormals_flushed()
    a = 1.1e-88
    x = torch.tensor([float("-inf"), -3.0, 0.5, 4.0], dtype=torch.float64)
    t = torch.ones_like(x)
    pw = torch.tensor([-2.0], dtype=torch.float64)
    truth = L.binary_cross_entropy_with_logits(x.to(device), t.to(device), pos_weight=pw.to(device),
                                               reduction="none", label_smoothing=a).cpu()
    assert truth[0] == float("-inf")
    ours = L.binary_cross_entropy_with_logits(x.to(device=device, dtype=dtype), t.to(device=device, dtype=dtype),
                                              pos_weight=pw.to(device=device, dtype=dtype),
                                              reduction="none", label_smoothing=a).cpu()
    assert ours[0] == float("-inf"), ours
    assert_close_to(ours[1:], truth[1:], dtype, "finite logits")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["uniform", "off_target"])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_subnormal_label_smoothing_still_smooths(dtype, mode, reduction):
    """label_smoothing so small that eps/K underflows (5e-324 in float64; 1e-300 in float32
    accumulation): the exact loss of a row with a -inf logit is still +inf (the smoothed target
    gives that class mass eps/K > 0). PyTorch computes 0 * (sum of log-probabilities) = NaN
    there (long fuzz finding); we used to skip the term (a finite loss). Now eps/K is at least
    the smallest positive value: +inf on that row, every other value as for eps -> 0."""
    skip_if_subnormals_flushed()
    K = 5
    x = torch.randn(4, K, dtype=torch.float64)
    x[0, 1] = float("-inf")  # row 0: a -inf logit on a non-target class
    t = torch.tensor([0, 2, 4, 1])
    xin = x.to(dtype)
    for eps in ((5e-324, 1e-300, 1e-40) if dtype != torch.float64 else (5e-324,)):
        ours, g = _grad(L.cross_entropy, xin, t, reduction=reduction, label_smoothing=eps, smoothing_mode=mode)
        # the float64 truth: PyTorch with the smallest eps whose eps/K does not underflow
        # (off_target: the same a = eps/(K-1) as PyTorch's uniform eps * K/(K-1))
        e64 = max(eps, K * 5e-324) if mode == "uniform" else max(eps, (K - 1) * 5e-324) * K / (K - 1)
        theirs, gt = _grad(F.cross_entropy, xin.double(), t, reduction=reduction, label_smoothing=e64)
        assert theirs.reshape(-1)[0].isinf()  # +inf: row 0 (or the mean over it)
        assert_close_to(ours, theirs, dtype, f"loss eps={eps}")
        assert_close_to(g, gt, dtype, f"grad eps={eps}")
        # the other rows are the eps = 0 values
        if reduction == "none":
            zero = F.cross_entropy(xin.double(), t, reduction="none")
            assert_close_to(ours[1:], zero[1:], dtype, "rows without -inf")


def test_per_row_incoming_gradient_starting_with_one():
    """reduction='none' with incoming gradients (1, 2, 0.5, ...): the first being exactly 1 must
    not make the backward skip the scaling (the scalar shortcut is for mean / sum only)."""
    x = torch.randn(5, 6, dtype=torch.float64)
    t = torch.tensor([0, 5, -100, 2, 3])
    go = torch.tensor([1.0, 2.0, 0.5, -3.0, 1.0], dtype=torch.float64)
    xx, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    L.cross_entropy(xx, t, reduction="none", label_smoothing=0.1).backward(go)
    F.cross_entropy(xr, t, reduction="none", label_smoothing=0.1).backward(go)
    assert_close_to(xx.grad, xr.grad, torch.float64, "grad")


@pytest.mark.parametrize("mode", ["uniform", "off_target"])
def test_module_passes_smoothing_mode(mode):
    """The module's smoothing_mode reaches the loss (a mutant that dropped it survived)."""
    x = torch.randn(6, 5, dtype=torch.float64)
    t = torch.tensor([0, 4, 2, -100, 1, 3])
    ours = L.CrossEntropyLoss(label_smoothing=0.3, smoothing_mode=mode, reduction="none")(x, t)
    ref = L.reference.cross_entropy(x, t, label_smoothing=0.3, smoothing_mode=mode, reduction="none")
    assert_close_to(ours, ref, torch.float64, mode)


@pytest.mark.parametrize("mode", ["uniform", "off_target"])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_soft_targets_with_a_gradient_keep_smoothing_mode(mode, reduction):
    """A probability target that needs a gradient (distillation) takes the differentiable
    reference path: its loss, input gradient and target gradient follow smoothing_mode (mutant:
    that path dropped smoothing_mode, which no test saw). Compared by value with the fused path
    (target without a gradient) and with the formula q = a + b t written out here."""
    K, eps = 7, 0.3
    x = torch.randn(5, K, dtype=torch.float64)
    t = torch.softmax(torch.randn(5, K, dtype=torch.float64), 1)
    xx, tt = x.clone().requires_grad_(), t.clone().requires_grad_()
    ours = L.cross_entropy(xx, tt, label_smoothing=eps, smoothing_mode=mode, reduction=reduction)
    gx, gt = torch.autograd.grad(ours.sum(), (xx, tt))
    fused, gf = _grad(L.cross_entropy, x, t, label_smoothing=eps, smoothing_mode=mode, reduction=reduction)
    a = eps / K if mode == "uniform" else eps / (K - 1)
    b = 1 - eps if mode == "uniform" else 1 - eps - a
    x2, t2 = x.clone().requires_grad_(), t.clone().requires_grad_()
    rows = -((a + b * t2) * torch.log_softmax(x2, 1)).sum(1)
    exact = {"none": rows, "mean": rows.mean(), "sum": rows.sum()}[reduction]
    ex, et = torch.autograd.grad(exact.sum(), (x2, t2))
    assert_close_to(ours, exact, torch.float64, "loss")
    assert_close_to(fused, exact, torch.float64, "fused loss")
    assert_close_to(gx, ex, torch.float64, "input grad")
    assert_close_to(gf, ex, torch.float64, "fused input grad")
    assert_close_to(gt, et, torch.float64, "target grad")
