"""The pure-PyTorch reference is itself checked against PyTorch."""
import pytest
import torch
import torch.nn.functional as F

from labelsmooth_ext import reference


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("eps", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("shape", [(7, 5), (3, 5, 4), (5,)])
def test_reference_matches_pytorch(reduction, weighted, eps, shape):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)
    tshape = () if len(shape) == 1 else (shape[0],) + shape[2:]
    t = torch.randint(0, 5, tshape, generator=g)
    if t.dim():
        t.view(-1)[0] = -100
    w = torch.rand(5, generator=g, dtype=torch.float64) if weighted else None
    ours = reference.cross_entropy(x, t, w, reduction=reduction, label_smoothing=eps)
    theirs = F.cross_entropy(x, t, w, reduction=reduction, label_smoothing=eps)
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(torch.autograd.grad(ours.sum(), x)[0], torch.autograd.grad(theirs.sum(), x)[0])
    p = torch.softmax(torch.randn(*shape, generator=g, dtype=torch.float64), 0 if len(shape) == 1 else 1)
    torch.testing.assert_close(reference.cross_entropy(x, p, w, reduction=reduction, label_smoothing=eps),
                               F.cross_entropy(x, p, w, reduction=reduction, label_smoothing=eps))


def test_off_target_distribution():
    a, b = reference.smoothing_coefficients(10, 0.1, "off_target")
    assert abs(a - 0.1 / 9) < 1e-15 and abs((a + b) - 0.9) < 1e-15
    a, b = reference.smoothing_coefficients(10, 0.1, "uniform")
    assert abs(a - 0.01) < 1e-15 and abs((a + b) - 0.91) < 1e-15
