"""Bad input: a clear exception naming the argument and the value, before any kernel runs."""
import pytest
import torch

import labelsmooth_ext as L
from conftest import DEVICES, assert_close_to


@pytest.mark.parametrize("device", DEVICES)
def test_target_out_of_range(device):
    x = torch.randn(4, 5, device=device)
    if device == "cpu":
        for bad in (5, -1, 100):
            with pytest.raises(IndexError, match=rf"target {bad} .*out of range for 5 classes"):
                L.cross_entropy(x, torch.tensor([0, bad, 1, 2], device=device))
    else:
        # No host sync by default on CUDA: the row is poisoned with NaN, never read out of bounds.
        out = L.cross_entropy(x, torch.tensor([0, 7, 1, 2], device=device), reduction="none")
        assert out[1].isnan() and not out[[0, 2, 3]].isnan().any()
        L.set_target_validation(True)
        try:
            with pytest.raises(IndexError, match="target 7"):
                L.cross_entropy(x, torch.tensor([0, 7, 1, 2], device=device))
        finally:
            L.set_target_validation(False)


def test_ignore_index_outside_range_is_fine():
    x = torch.randn(3, 5, dtype=torch.float64)
    t = torch.tensor([0, -7, 1])
    for red in ("none", "mean", "sum"):
        assert_close_to(L.cross_entropy(x, t, ignore_index=-7, reduction=red, label_smoothing=0.1),
                        torch.nn.functional.cross_entropy(x, t, ignore_index=-7, reduction=red,
                                                          label_smoothing=0.1), torch.float64, red)
    with pytest.raises(IndexError, match="target -100"):
        L.cross_entropy(x, torch.tensor([0, -100, 1]), ignore_index=-7)


@pytest.mark.parametrize("eps", [-0.1, 1.5, float("nan"), float("inf")])
def test_label_smoothing_range(eps):
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 1\], got"):
        L.cross_entropy(torch.randn(2, 3), torch.tensor([0, 1]), label_smoothing=eps)
    with pytest.raises(ValueError, match="label_smoothing"):
        L.CrossEntropyLoss(label_smoothing=eps)


def test_unknown_reduction_and_mode():
    x, t = torch.randn(2, 3), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="reduction must be .* got 'avg'"):
        L.cross_entropy(x, t, reduction="avg")
    with pytest.raises(ValueError, match="smoothing_mode must be .* got 'smart'"):
        L.cross_entropy(x, t, smoothing_mode="smart")
    with pytest.raises(ValueError, match="reduction"):
        L.CrossEntropyLoss(reduction="avg")


def test_weight_length_and_dtype():
    x, t = torch.randn(2, 3), torch.tensor([0, 1])
    with pytest.raises(ValueError, match=r"weight must be a 1-d tensor with one entry per class \(3\), got shape \(4,\)"):
        L.cross_entropy(x, t, weight=torch.ones(4))
    with pytest.raises(TypeError, match="weight dtype torch.float64 must match the input dtype torch.float32"):
        L.cross_entropy(x, t, weight=torch.ones(3, dtype=torch.float64))


def test_shape_mismatch():
    with pytest.raises(ValueError, match=r"target shape \(3,\) does not match input shape \(2, 3\)"):
        L.cross_entropy(torch.randn(2, 3), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="target shape"):
        L.cross_entropy(torch.randn(2, 3, 4), torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="probability target shape"):
        L.cross_entropy(torch.randn(2, 3), torch.rand(2, 4))


def test_non_float_input_and_bad_target_dtype():
    with pytest.raises(TypeError, match="input must be a floating tensor .* got torch.int64"):
        L.cross_entropy(torch.ones(2, 3, dtype=torch.long), torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="target must hold class indices"):
        L.cross_entropy(torch.randn(2, 3), torch.tensor([True, False]))
    with pytest.raises(ValueError, match="input must have at least 1 dimension"):
        L.cross_entropy(torch.tensor(1.0), torch.tensor(0))


def test_off_target_needs_two_classes():
    with pytest.raises(ValueError, match="off_target.*at least 2 classes.*label_smoothing=0.1"):
        L.cross_entropy(torch.randn(3, 1), torch.zeros(3, dtype=torch.long), label_smoothing=0.1,
                        smoothing_mode="off_target")
    # eps = 0 is well defined with one class: p = q = 1, loss and gradient exactly 0.
    x = torch.randn(3, 1, requires_grad=True)
    out = L.cross_entropy(x, torch.zeros(3, dtype=torch.long), smoothing_mode="off_target", reduction="none")
    out.sum().backward()
    assert torch.equal(out, torch.zeros(3)) and torch.equal(x.grad, torch.zeros(3, 1))


def test_cpp_checks_guard_direct_operator_calls():
    op = torch.ops.labelsmooth_ext.ce_forward
    x, t = torch.randn(2, 3), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="label_smoothing must be in"):
        op(x, t, None, -100, 2.0, 0, 1, False)
    with pytest.raises(ValueError, match="reduction must be"):
        op(x, t, None, -100, 0.1, 0, 7, False)
    with pytest.raises(TypeError, match="target must be int64"):
        op(x, t.int(), None, -100, 0.1, 0, 1, False)
    with pytest.raises(ValueError, match="input must be"):
        op(x.reshape(-1), t, None, -100, 0.1, 0, 1, False)


@pytest.mark.parametrize("reduction", [0, 1])  # 'none': one value per row; 'mean': one value
def test_backward_operators_check_the_incoming_gradient_length(reduction):
    """ce_grad, ce_grad_ext and ce_prob_grad_ext (and its in-place form) on the CPU: a grad_output
    of the wrong length is a ValueError naming the operator and both counts."""
    ops = torch.ops.labelsmooth_ext
    x, t, p = torch.randn(4, 3), torch.tensor([0, 1, 2, 0]), torch.softmax(torch.randn(4, 3), 1)
    bad = torch.ones(2)
    want = 4 if reduction == 0 else 1
    msg = f"grad_output has 2 elements, expected {want}"
    with pytest.raises(ValueError, match=f"ce_grad: {msg}"):
        ops.ce_grad(x, t, None, bad, None, -100, 0.1, 0, reduction)
    with pytest.raises(ValueError, match=f"ce_grad_ext: {msg}"):
        ops.ce_grad_ext(x, t, None, bad, -100, 0.1, 0, reduction, 0.0, 0.0)
    with pytest.raises(ValueError, match=f"ce_prob_grad_ext: {msg}"):
        ops.ce_prob_grad_ext(x, p, None, bad, 0.1, 0, reduction, 0.0, 0.0)
    with pytest.raises(ValueError, match=f"ce_prob_grad_ext: {msg}"):
        ops.ce_prob_grad_ext_(x.clone(), p, None, bad, 0.1, 0, reduction, 0.0, 0.0)
    good = torch.ones(want)
    g = ops.ce_grad(x, t, None, good, None, -100, 0.1, 0, reduction)
    assert torch.allclose(g, ops.ce_grad_ext(x, t, None, good, -100, 0.1, 0, reduction, 0.0, 0.0))
