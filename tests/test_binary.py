"""Binary / multi-label smoothing: PyTorch's binary_cross_entropy_with_logits on smoothed targets."""
import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

import labelsmooth_ext as L
from conftest import DEVICES, DTYPES, REAL_DEVICES, assert_close_to


def _pair(x, t, a, **kw):
    xx = x.detach().clone().requires_grad_()
    ours = L.binary_cross_entropy_with_logits(xx, t, label_smoothing=a, **kw)
    g = torch.autograd.grad(ours.sum(), xx)[0]
    xd = x.detach().double().requires_grad_()
    kwd = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    ref = F.binary_cross_entropy_with_logits(xd, t.double() * (1 - 2 * a) + a, **kwd)
    gref = torch.autograd.grad(ref.sum(), xd)[0]
    return ours, g, ref, gref


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("a", [0.0, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("weights", ["none", "weight", "pos_weight", "both", "full", "scalar"])
def test_parity_with_pytorch_on_smoothed_targets(device, dtype, reduction, a, weights):
    g = torch.Generator().manual_seed(4)
    x = (torch.randn(6, 5, 7, generator=g) * 4).to(device=device, dtype=dtype)
    t = (torch.rand(6, 5, 7, generator=g) > 0.5).to(device=device, dtype=dtype)
    t[0, 0] = 0.3  # soft targets are allowed
    kw = {"reduction": reduction}
    if weights in ("weight", "both"):
        kw["weight"] = torch.rand(7, generator=g).to(device=device, dtype=dtype)
    if weights in ("pos_weight", "both"):
        kw["pos_weight"] = (torch.rand(7, generator=g) * 3).to(device=device, dtype=dtype)
    if weights == "full":
        kw["weight"] = torch.rand(6, 1, 7, generator=g).to(device=device, dtype=dtype)  # expanded
        kw["pos_weight"] = (torch.rand(5, 7, generator=g) * 3).to(device=device, dtype=dtype)
    if weights == "scalar":
        kw["weight"] = torch.tensor(0.7, device=device, dtype=dtype)
    ours, g1, ref, gref = _pair(x, t, a, **kw)
    assert ours.dtype == dtype and ours.shape == ref.shape
    assert_close_to(ours, ref, dtype, "loss")
    assert_close_to(g1, gref, dtype, "grad")


@pytest.mark.parametrize("device", DEVICES)
def test_stable_for_large_logits(device):
    x = torch.tensor([-1e4, -100.0, -30.0, 0.0, 30.0, 100.0, 1e4], device=device)
    t = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0], device=device)
    ours, g, ref, gref = _pair(x, t, 0.1, reduction="none")
    assert torch.isfinite(ours).all() and torch.isfinite(g).all()
    assert_close_to(ours, ref, torch.float32, "loss")
    assert_close_to(g, gref, torch.float32, "grad")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_gradcheck(device, reduction):
    x = torch.randn(4, 3, dtype=torch.float64, device=device, requires_grad=True)
    t = torch.rand(4, 3, dtype=torch.float64, device=device)
    w, pw = torch.rand(3, dtype=torch.float64, device=device), torch.rand(3, dtype=torch.float64, device=device) * 2
    L.set_inplace_backward(False)
    try:
        assert torch.autograd.gradcheck(
            lambda x: L.binary_cross_entropy_with_logits(x, t, w, reduction=reduction, pos_weight=pw,
                                                         label_smoothing=0.2), (x,))
    finally:
        L.set_inplace_backward(True)


@pytest.mark.parametrize("device", REAL_DEVICES)  # the emulated ops have no fake kernels
def test_opcheck_and_compile(device):
    x = torch.randn(5, 4, device=device, requires_grad=True)
    t = torch.rand(5, 4, device=device)
    for red in (0, 1, 2):
        opcheck(torch.ops.labelsmooth_ext.bce_forward, (x.reshape(-1), t.reshape(-1), None, torch.rand(4, device=device), 0.1, red, True))
    f = torch.compile(lambda x: L.binary_cross_entropy_with_logits(x, t, label_smoothing=0.1), fullgraph=True)
    xc = x.detach().clone().requires_grad_()
    f(xc).backward()
    xe = x.detach().clone().requires_grad_()
    F.binary_cross_entropy_with_logits(xe, t * 0.8 + 0.1).backward()
    torch.testing.assert_close(xc.grad, xe.grad)


def test_module_and_target_gradient():
    m = L.BCEWithLogitsLoss(pos_weight=torch.tensor([2.0, 1.0]), label_smoothing=0.1)
    assert isinstance(m, torch.nn.BCEWithLogitsLoss) and "label_smoothing=0.1" in repr(m)
    x, t = torch.randn(3, 2), torch.rand(3, 2, requires_grad=True)
    out = m(x, t)
    out.backward()  # soft targets that need a gradient take the differentiable formula
    tt = t.detach().clone().requires_grad_()
    F.binary_cross_entropy_with_logits(x, tt * 0.8 + 0.1, pos_weight=torch.tensor([2.0, 1.0])).backward()
    torch.testing.assert_close(t.grad, tt.grad)


def test_errors():
    x = torch.randn(3, 2)
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 1\], got 1.5"):
        L.binary_cross_entropy_with_logits(x, torch.rand(3, 2), label_smoothing=1.5)
    with pytest.raises(ValueError, match=r"Target size \(\(3, 3\)\) must be the same as input size"):
        L.binary_cross_entropy_with_logits(x, torch.rand(3, 3))
    with pytest.raises(ValueError, match="pos_weight of shape .* does not broadcast"):
        L.binary_cross_entropy_with_logits(x, torch.rand(3, 2), pos_weight=torch.ones(5))
    with pytest.raises(ValueError, match="reduction"):
        L.BCEWithLogitsLoss(reduction="avg")
    # targets outside [0, 1] are allowed, as PyTorch allows them
    t = torch.full((3, 2), 1.5)
    assert_close_to(L.binary_cross_entropy_with_logits(x, t, reduction="none"),
                    F.binary_cross_entropy_with_logits(x.double(), t.double(), reduction="none"),
                    torch.float32, "targets outside [0, 1]")


def test_empty_input():
    for red in ("none", "mean", "sum"):
        # an empty weight / pos_weight broadcasts to an empty input (fuzz finding)
        ours = L.binary_cross_entropy_with_logits(torch.randn(0), torch.rand(0), reduction=red,
                                                  pos_weight=torch.rand(0), weight=torch.rand(0))
        theirs = F.binary_cross_entropy_with_logits(torch.randn(0), torch.rand(0), reduction=red,
                                                    pos_weight=torch.rand(0), weight=torch.rand(0))
        assert ours.shape == theirs.shape and torch.equal(ours.isnan(), theirs.isnan())
        x = torch.randn(0, 3, requires_grad=True)
        ours = L.binary_cross_entropy_with_logits(x, torch.rand(0, 3), reduction=red)
        theirs = F.binary_cross_entropy_with_logits(x, torch.rand(0, 3), reduction=red)
        assert ours.shape == theirs.shape and torch.equal(ours.isnan(), theirs.isnan())
        assert torch.equal(ours.nan_to_num(), theirs.nan_to_num())
        ours.sum().backward()
        assert x.grad.shape == x.shape and x.grad.numel() == 0
