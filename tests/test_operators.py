"""Each registered operator's values, called directly (opcheck checks consistency, not values);
the legacy size_average / reduce arguments; no gradient work that was not asked for."""
import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import labelsmooth_ext as L
from labelsmooth_ext import reference
from conftest import DTYPES, assert_close_to

ops = torch.ops.labelsmooth_ext
RED = {"none": 0, "mean": 1, "sum": 2}
MODE = {"uniform": 0, "off_target": 1}


def _ref_rows_and_grad(x, t, w, eps, mode, red, ignore_index=-100):
    """float64 reference: loss (reduced as `red`) and d(loss.sum())/dx."""
    xd = x.detach().double().requires_grad_()
    tt = t.double() if t.is_floating_point() else t
    out = reference.cross_entropy(xd, tt, None if w is None else w.double(), ignore_index=ignore_index,
                                  reduction=red, label_smoothing=eps, smoothing_mode=mode)
    (g,) = torch.autograd.grad(out.sum(), xd)
    return out, g


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("red", ["none", "mean", "sum"])
@pytest.mark.parametrize("mode", ["uniform", "off_target"])
@pytest.mark.parametrize("weighted", [False, True])
def test_ce_forward_values(dtype, red, mode, weighted):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(9, 13, generator=g).to(dtype)
    t = torch.tensor([0, 12, 5, 7, 3, 3, 11, 1, 2])
    t[4] = 7  # ignore_index = 7 (a class id)
    w = (torch.rand(13, generator=g) + 0.1).to(dtype) if weighted else None
    loss, grad = ops.ce_forward(x, t, w, 7, 0.3, MODE[mode], RED[red], True)
    ref, gref = _ref_rows_and_grad(x, t, w, 0.3, mode, red, ignore_index=7)
    assert grad.dtype == dtype and grad.shape == x.shape
    assert_close_to(loss, ref, dtype, "loss")
    assert_close_to(grad, gref, dtype, "grad")  # already divided by D for mean
    loss2, nograd = ops.ce_forward(x, t, w, 7, 0.3, MODE[mode], RED[red], False)
    assert nograd.numel() == 0
    torch.testing.assert_close(loss2, loss, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("red", ["none", "mean", "sum"])
def test_ce_forward_spatial_values(dtype, red):
    """The CPU's (N, C, S) form: classes along dim 1, target (N*S,), gradient (N, C, S)."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(3, 6, 11, generator=g).to(dtype)
    t = torch.randint(0, 6, (3, 11), generator=g)
    t[1, 4] = -100
    w = (torch.rand(6, generator=g) + 0.1).to(dtype)
    loss, grad = ops.ce_forward(x, t.reshape(-1), w, -100, 0.2, 0, RED[red], True)
    ref, gref = _ref_rows_and_grad(x, t, w, 0.2, "uniform", red)
    assert grad.shape == x.shape
    assert_close_to(loss, ref.reshape(-1) if red == "none" else ref, dtype, "loss")
    assert_close_to(grad, gref, dtype, "grad")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("red", ["none", "mean", "sum"])
@pytest.mark.parametrize("mode", ["uniform", "off_target"])
def test_ce_prob_forward_values(dtype, red, mode):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(8, 19, generator=g).to(dtype)
    p = torch.softmax(torch.randn(8, 19, generator=g), 1).to(dtype)
    w = (torch.rand(19, generator=g) + 0.1).to(dtype)
    loss, grad = ops.ce_prob_forward(x, p, w, 0.4, MODE[mode], RED[red], True)
    ref, gref = _ref_rows_and_grad(x, p, w, 0.4, mode, red)
    assert_close_to(loss, ref, dtype, "loss")
    assert_close_to(grad, gref, dtype, "grad")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("red", ["none", "mean", "sum"])
def test_bce_forward_values(dtype, red):
    g = torch.Generator().manual_seed(8)
    x = (torch.randn(5, 6, generator=g) * 4).to(dtype)
    t = torch.rand(5, 6, generator=g).to(dtype)
    w, pw = (torch.rand(6, generator=g)).to(dtype), (torch.rand(6, generator=g) * 3).to(dtype)
    loss, grad = ops.bce_forward(x.reshape(-1), t.reshape(-1), w, pw, 0.1, RED[red], True)
    xd = x.double().requires_grad_()
    ref = reference.binary_cross_entropy_with_logits(xd, t.double(), w.double(), reduction=red,
                                                     pos_weight=pw.double(), label_smoothing=0.1)
    (gref,) = torch.autograd.grad(ref.sum(), xd)
    assert_close_to(loss, ref.reshape(-1) if red == "none" else ref, dtype, "loss")
    assert_close_to(grad, gref.reshape(-1), dtype, "grad")


@pytest.mark.parametrize("dtype", DTYPES)
def test_ce_backward_and_ce_scale_values(dtype):
    """ce_backward (out of place) and ce_scale_ (in place) multiply the saved gradient by the
    incoming gradient: one scalar for mean / sum, one per row for none (2-d and (N, C, S))."""
    g = torch.Generator().manual_seed(9)
    for shape, rows in (((7, 5), 7), ((2, 5, 3), 6)):
        grad = torch.randn(*shape, generator=g).to(dtype)
        per_row = torch.rand(rows, generator=g) + 0.5
        expect_rows = grad.double() * (per_row.double().reshape(7, 1) if len(shape) == 2
                                       else per_row.double().reshape(2, 1, 3))
        for red, go, expect in ((0, per_row, expect_rows),
                                (1, torch.tensor(2.5), grad.double() * 2.5),
                                (2, torch.tensor(1.0), grad.double()),
                                (2, torch.tensor(-0.75), grad.double() * -0.75)):
            out = ops.ce_backward(grad, go.to(dtype), red)
            assert_close_to(out, expect, dtype, f"ce_backward red={red}", ulps=1)
            assert out.data_ptr() != grad.data_ptr()
            inplace = grad.clone()
            ops.ce_scale_(inplace, go.to(dtype), red)
            assert_close_to(inplace, expect, dtype, f"ce_scale_ red={red}", ulps=1)
            if red != 0 and float(go) == 1.0:
                torch.testing.assert_close(inplace, grad, rtol=0, atol=0)


def test_build_info_and_constants_operators():
    info = L.build_info()
    assert info["torch_version"] == torch.__version__
    import json

    c = json.loads(ops.cpu_kernel_constants())
    assert c["active"] in info["cpu_kernels"]
    for cap in info["cpu_kernels"]:
        assert c[cap]["store_block"] > 0 and c[cap]["lanes"]["float32"] >= 1


# ---- legacy arguments -------------------------------------------------------------------

@pytest.mark.parametrize("size_average,reduce", list(itertools.product([None, True, False], repeat=2)))
@pytest.mark.parametrize("weighted", [False, True])
def test_legacy_size_average_reduce_every_combination(size_average, reduce, weighted):
    g = torch.Generator().manual_seed(10)
    x = torch.randn(6, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 3, -100, 1, 2, 2])
    w = torch.rand(4, generator=g, dtype=torch.float64) + 0.1 if weighted else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours_x = x.clone().requires_grad_()
        ours = L.cross_entropy(ours_x, t, w, size_average, reduce=reduce, label_smoothing=0.1,
                               reduction="sum")  # legacy args, when given, win over reduction
        theirs_x = x.clone().requires_grad_()
        theirs = F.cross_entropy(theirs_x, t, w, size_average, reduce=reduce, label_smoothing=0.1,
                                 reduction="sum")
        mod = L.CrossEntropyLoss(w, size_average, reduce=reduce, label_smoothing=0.1)
        tmod = torch.nn.CrossEntropyLoss(w, size_average, reduce=reduce, label_smoothing=0.1)
    assert mod.reduction == tmod.reduction
    assert_close_to(ours, theirs, torch.float64, "function")
    assert_close_to(mod(x, t), tmod(x, t), torch.float64, "module")
    ours.sum().backward()
    theirs.sum().backward()
    assert_close_to(ours_x.grad, theirs_x.grad, torch.float64, "grad")


def test_default_ignore_index_and_k_dim_with_another_ignore_index():
    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, 5, 3, 4, generator=g, dtype=torch.float64)
    t = torch.randint(0, 5, (2, 3, 4), generator=g)
    t[0, 1, 2] = -100  # the default ignore_index
    for red in ("none", "mean", "sum"):
        assert_close_to(L.cross_entropy(x, t, reduction=red, label_smoothing=0.1),
                        F.cross_entropy(x, t, reduction=red, label_smoothing=0.1), torch.float64, red)
    t2 = t.clone()
    t2[t2 == -100] = 0
    t2[1, 2, 3] = 4  # a class id as ignore_index, K-dim
    for red in ("none", "mean", "sum"):
        assert_close_to(L.CrossEntropyLoss(ignore_index=4, reduction=red, label_smoothing=0.2)(x, t2),
                        F.cross_entropy(x, t2, ignore_index=4, reduction=red, label_smoothing=0.2),
                        torch.float64, f"ignore 4 {red}")


# ---- no work that is not asked for --------------------------------------------------------

class _RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if "labelsmooth_ext" in str(func):
            self.calls.append((str(func), args, out))
        return out


@pytest.mark.parametrize("context", ["no_grad", "inference_mode", "no_requires_grad"])
def test_no_gradient_computed_or_stored_when_not_needed(context):
    x = torch.randn(6, 9, requires_grad=context != "no_requires_grad")
    t = torch.tensor([0, 1, 2, 3, -100, 8])
    p = torch.softmax(torch.randn(6, 9), 1)
    ctx = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}.get(context)
    rec = _RecordOps()
    with rec:
        if ctx:
            with ctx():
                outs = [L.cross_entropy(x, t, label_smoothing=0.1), L.cross_entropy(x, p),
                        L.binary_cross_entropy_with_logits(x, p)]
        else:
            outs = [L.cross_entropy(x, t, label_smoothing=0.1), L.cross_entropy(x, p),
                    L.binary_cross_entropy_with_logits(x, p)]
    forwards = [c for c in rec.calls if "forward" in c[0]]
    assert len(forwards) == 3, rec.calls
    for name, args, (loss, grad) in forwards:
        assert args[-1] is False, f"{name} asked for a gradient"
        assert grad.numel() == 0, f"{name} computed a gradient"
    for o in outs:
        assert o.grad_fn is None and not o.requires_grad  # nothing saved for a backward
    # and the values are still right
    assert_close_to(outs[0], F.cross_entropy(x.detach().double(), t, label_smoothing=0.1), torch.float32, "loss")
