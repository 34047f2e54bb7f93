"""gradcheck, opcheck, torch.compile, backward scaling, double backward, retain_graph."""
import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

import labelsmooth_ext as L
from conftest import DEVICES, REAL_DEVICES


@pytest.fixture
def no_inplace_backward():
    """gradcheck backpropagates many times through one graph."""
    L.set_inplace_backward(False)
    yield
    L.set_inplace_backward(True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("mode", ["uniform", "off_target"])
@pytest.mark.parametrize("weighted", [False, True])
def test_gradcheck(device, reduction, mode, weighted, no_inplace_backward):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 5, generator=g, dtype=torch.float64).to(device).requires_grad_()
    t = torch.tensor([0, 4, -100, 2, 1, 3], device=device)
    w = torch.rand(5, generator=g, dtype=torch.float64).to(device) if weighted else None
    fn = lambda x: L.cross_entropy(x, t, weight=w, reduction=reduction, label_smoothing=0.3,
                                   smoothing_mode=mode)
    assert torch.autograd.gradcheck(fn, (x,))
    p = torch.softmax(torch.randn(6, 5, generator=g, dtype=torch.float64), 1).to(device)
    fnp = lambda x: L.cross_entropy(x, p, weight=w, reduction=reduction, label_smoothing=0.3)
    assert torch.autograd.gradcheck(fnp, (x,))


@pytest.mark.parametrize("device", REAL_DEVICES)  # the emulated ops have no fake kernels
@pytest.mark.parametrize("reduction", [0, 1, 2])
@pytest.mark.parametrize("compute_grad", [True, False])
@pytest.mark.parametrize("weighted", [False, True])
def test_opcheck_forward_ops(device, reduction, compute_grad, weighted):
    x = torch.randn(7, 11, device=device, requires_grad=compute_grad)
    t = torch.tensor([0, 3, -100, 10, 5, 5, 1], device=device)
    w = torch.rand(11, device=device) if weighted else None
    opcheck(torch.ops.labelsmooth_ext.ce_forward, (x, t, w, -100, 0.1, 0, reduction, compute_grad))
    p = torch.softmax(torch.randn(7, 11, device=device), 1)
    opcheck(torch.ops.labelsmooth_ext.ce_prob_forward, (x, p, w, 0.1, 1, reduction, compute_grad))


@pytest.mark.parametrize("reduction", [0, 1, 2])
def test_opcheck_spatial_cpu_operator(reduction):
    x = torch.randn(2, 5, 7, requires_grad=True)
    t = torch.randint(0, 5, (14,))
    t[3] = -100
    opcheck(torch.ops.labelsmooth_ext.ce_forward, (x, t, torch.rand(5), -100, 0.1, 0, reduction, True))


@pytest.mark.parametrize("device", REAL_DEVICES)  # the emulated ops have no fake kernels
def test_opcheck_backward_ops(device):
    g = torch.randn(7, 11, device=device)
    for red, go in [(1, torch.tensor(2.0, device=device)), (0, torch.rand(7, device=device))]:
        opcheck(torch.ops.labelsmooth_ext.ce_backward, (g, go, red))
        opcheck(torch.ops.labelsmooth_ext.ce_scale_, (g.clone(), go, red))


@pytest.mark.parametrize("device", REAL_DEVICES)  # the emulated ops have no fake kernels
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_torch_compile_fullgraph(device, reduction):
    x = torch.randn(16, 33, device=device)
    t = torch.randint(0, 33, (16,), device=device)
    t[3] = -100
    w = torch.rand(33, device=device)

    def step(x, t):
        return L.cross_entropy(x * 2, t, weight=w, reduction=reduction, label_smoothing=0.1).sum()

    compiled = torch.compile(step, fullgraph=True)
    xc, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_c = compiled(xc, t)
    out_c.backward()
    out_e = F.cross_entropy(xe * 2, t, weight=w, reduction=reduction, label_smoothing=0.1).sum()
    out_e.backward()
    torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(xc.grad, xe.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_incoming_gradient_scales(device, reduction):
    """The saved gradient is scaled by the incoming gradient (scalar, or one per row)."""
    x = torch.randn(9, 6, device=device)
    t = torch.randint(0, 6, (9,), device=device)
    go = torch.rand(9 if reduction == "none" else (), device=device) + 0.5
    outs = []
    for fn in (L.cross_entropy, F.cross_entropy):
        xx = x.clone().requires_grad_()
        out = fn(xx * 1.0, t, reduction=reduction, label_smoothing=0.2)
        out.backward(go)
        outs.append(xx.grad)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("device", DEVICES)
def test_retain_graph(device):
    """CPU: backward twice through one graph works. CUDA: works out of place; in place (the
    default, which skips the pass for an incoming gradient of 1) it fails loudly."""
    x = torch.randn(4, 5, device=device, requires_grad=True)
    t = torch.tensor([0, 1, 2, 3], device=device)
    if device != "cpu":
        out = L.cross_entropy(x, t, label_smoothing=0.1)
        out.backward(retain_graph=True)
        with pytest.raises(RuntimeError, match="set_inplace_backward"):
            out.backward()
        L.set_inplace_backward(False)
    try:
        x.grad = None
        out = L.cross_entropy(x, t, label_smoothing=0.1)
        out.backward(retain_graph=True)
        first = x.grad.clone()
        out.backward(retain_graph=True)
        (out * 3).backward()
        torch.testing.assert_close(x.grad, first * 5)
    finally:
        L.set_inplace_backward(True)


def test_double_backward_raises_clear_error():
    x = torch.randn(4, 5, requires_grad=True)
    out = L.cross_entropy(x, torch.tensor([0, 1, 2, 3]))
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(out, x, create_graph=True)


def test_no_gradient_work_without_requires_grad():
    x = torch.randn(4, 5)
    out = torch.ops.labelsmooth_ext.ce_forward(x, torch.tensor([0, 1, 2, 3]), None, -100, 0.1, 0, 1, False)
    assert out[1].numel() == 0
    torch.testing.assert_close(out[0], F.cross_entropy(x, torch.tensor([0, 1, 2, 3]), label_smoothing=0.1))
    with torch.no_grad():
        out = L.cross_entropy(x.requires_grad_(), torch.tensor([0, 1, 2, 3]))
    assert out.grad_fn is None
    torch.testing.assert_close(out, F.cross_entropy(x.detach(), torch.tensor([0, 1, 2, 3])))


def test_weight_requiring_grad_is_treated_as_constant():
    w = torch.rand(5, requires_grad=True)
    x = torch.randn(4, 5, requires_grad=True)
    L.cross_entropy(x, torch.tensor([0, 1, 2, 3]), weight=w).backward()
    assert w.grad is None and x.grad is not None
