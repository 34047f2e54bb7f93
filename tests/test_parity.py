"""Forward and input-gradient parity with torch.nn.functional.cross_entropy (float64 oracle)."""
import json

import pytest
import torch
import torch.nn.functional as F

import labelsmooth_ext as L
from conftest import DEVICES, DTYPES, assert_close_to, random_targets


def _torch_result(x, target, **kw):
    """F.cross_entropy in float64 on the same values, with its input gradient."""
    xd = x.detach().double().requires_grad_()
    w = kw.pop("weight", None)
    if target.is_floating_point():  # probability targets: the same values, in float64
        target = target.double()
    out = F.cross_entropy(xd, target, weight=None if w is None else w.double(), **kw)
    g = torch.autograd.grad(out.sum(), xd)[0] if out.numel() else torch.zeros_like(xd)
    return out, g


def _ours(x, target, **kw):
    xx = x.detach().clone().requires_grad_()
    out = L.cross_entropy(xx, target, **kw)
    g = torch.autograd.grad(out.sum(), xx)[0] if out.numel() else torch.zeros_like(xx)
    return out, g


def _check(x, target, dtype, **kw):
    out, g = _ours(x, target, **kw)
    assert out.dtype == x.dtype
    ref_out, ref_g = _torch_result(x, target, **kw)
    assert_close_to(out, ref_out, dtype, "loss")
    assert_close_to(g, ref_g, dtype, "grad")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("K", [1, 2, 7, 64, 1000, 70001])
@pytest.mark.parametrize("eps", [0.0, 0.1, 1.0])
def test_shapes_dtypes_eps(device, dtype, K, eps):
    g = torch.Generator().manual_seed(K * 10 + int(eps * 10))
    N = 3 if K > 10000 else 37
    x = (torch.randn(N, K, generator=g) * 3).to(device=device, dtype=dtype)
    t = random_targets(N, K, generator=g, device=device)
    _check(x, t, dtype, label_smoothing=eps)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("eps", [0.0, 0.1, 1.0])
def test_weight_reduction_ignore(device, dtype, reduction, weighted, eps):
    g = torch.Generator().manual_seed(7)
    N, K = 41, 19
    x = torch.randn(N, K, generator=g).to(device=device, dtype=dtype)
    t = random_targets(N, K, generator=g, ignore_index=3, device=device)  # a class id as ignore_index
    w = (torch.rand(K, generator=g) + 0.1).to(device=device, dtype=dtype) if weighted else None
    _check(x, t, dtype, weight=w, reduction=reduction, ignore_index=3, label_smoothing=eps)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("N", [1, 5])
def test_single_row_and_non_batched(device, N):
    x = torch.randn(N, 9, device=device)
    _check(x, torch.randint(0, 9, (N,), device=device), torch.float32, label_smoothing=0.2)
    x1 = torch.randn(9, device=device)  # (C,) with a scalar target
    for red in ("none", "mean", "sum"):
        _check(x1, torch.tensor(4, device=device), torch.float32, label_smoothing=0.2, reduction=red)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("eps", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("shape", [(2, 5, 4, 3), (3, 21, 17), (1, 1, 9), (2, 3, 2, 2, 2)])
def test_k_dimensional(device, dtype, reduction, weighted, eps, shape):
    """(N, C, d1, ...): on the CPU a kernel vectorised across positions (S not a multiple of
    the vector width included), elsewhere rows."""
    g = torch.Generator().manual_seed(sum(shape))
    C = shape[1]
    x = (torch.randn(*shape, generator=g) * 2).to(device=device, dtype=dtype)
    t = torch.randint(0, C, (shape[0],) + shape[2:], generator=g)
    t.view(-1)[:: 4] = -100
    w = (torch.rand(C, generator=g) + 0.1).to(device=device, dtype=dtype) if weighted else None
    _check(x, t.to(device), dtype, weight=w, reduction=reduction, label_smoothing=eps)


@pytest.mark.parametrize("device", DEVICES)
def test_k_dimensional_nan_and_views(device):
    x = torch.randn(2, 6, 5, 3, device=device)
    x[0, 2, 1, 1] = float("nan")   # one position's row
    x[1, :, 4, 2] = float("-inf")  # every class -inf at one position
    t = torch.randint(0, 6, (2, 5, 3), device=device)
    t[0, 3, 0] = -100
    _check(x, t, torch.float32, reduction="none", label_smoothing=0.1)
    big = torch.randn(2, 8, 5, 3, device=device)
    _check(big[:, 1:7], t, torch.float32, label_smoothing=0.1)  # a non-contiguous class slice
    _check(big[:, 1:7].permute(0, 1, 3, 2), t.transpose(1, 2), torch.float32, label_smoothing=0.1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_non_contiguous_and_offset_views(device, dtype):
    g = torch.Generator().manual_seed(5)
    base = torch.randn(20, 101, generator=g).to(device=device, dtype=dtype)
    t = torch.randint(0, 50, (10,), generator=g).to(device)
    _check(base[::2, 1:51], t, dtype, label_smoothing=0.1)  # strided rows, odd element offset
    _check(base.t()[:50, :10].t(), t, dtype, label_smoothing=0.1)  # class stride != 1
    _check(base.reshape(-1)[3:3 + 10 * 97].view(10, 97), torch.randint(0, 97, (10,)).to(device),
           dtype, label_smoothing=0.1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tdtype", [torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8])
def test_integer_target_dtypes(device, tdtype):
    x = torch.randn(6, 5, device=device)
    t = torch.tensor([0, 1, 2, 3, 4, 1], device=device)
    out = L.cross_entropy(x, t.to(tdtype), label_smoothing=0.1)
    assert torch.allclose(out, F.cross_entropy(x, t, label_smoothing=0.1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("weighted", [False, True])
def test_probability_targets(device, dtype, reduction, weighted):
    g = torch.Generator().manual_seed(11)
    x = torch.randn(13, 17, generator=g).to(device=device, dtype=dtype)
    p = torch.softmax(torch.randn(13, 17, generator=g), 1).to(device=device, dtype=dtype)
    w = (torch.rand(17, generator=g) + 0.1).to(device=device, dtype=dtype) if weighted else None
    _check(x, p, dtype, weight=w, reduction=reduction, label_smoothing=0.15)


@pytest.mark.parametrize("device", DEVICES)
def test_probability_targets_k_dim_and_target_grad(device):
    x = torch.randn(2, 6, 5, device=device)
    p = torch.softmax(torch.randn(2, 6, 5, device=device), 1)
    _check(x, p, torch.float32, label_smoothing=0.1)
    # Soft targets that need a gradient take the differentiable composite path.
    xx, pp = x.clone().requires_grad_(), p.clone().requires_grad_()
    L.cross_entropy(xx, pp, label_smoothing=0.1).backward()
    xr, pr = x.clone().requires_grad_(), p.clone().requires_grad_()
    F.cross_entropy(xr, pr, label_smoothing=0.1).backward()
    assert torch.allclose(xx.grad, xr.grad, atol=1e-6) and torch.allclose(pp.grad, pr.grad, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("eps", [0.1, 0.7, 1.0])
def test_off_target_mode_matches_reference(device, dtype, reduction, weighted, eps):
    g = torch.Generator().manual_seed(13)
    N, K = 29, 23
    x = torch.randn(N, K, generator=g).to(device=device, dtype=dtype)
    t = random_targets(N, K, generator=g, device=device)
    w = (torch.rand(K, generator=g) + 0.1).to(device=device, dtype=dtype) if weighted else None
    xx = x.clone().requires_grad_()
    out = L.cross_entropy(xx, t, weight=w, reduction=reduction, label_smoothing=eps,
                          smoothing_mode="off_target")
    gx = torch.autograd.grad(out.sum(), xx)[0]
    xd = x.double().requires_grad_()
    ref = L.reference.cross_entropy(xd, t, None if w is None else w.double(), reduction=reduction,
                                    label_smoothing=eps, smoothing_mode="off_target")
    gref = torch.autograd.grad(ref.sum(), xd)[0]
    assert_close_to(out, ref, dtype, "loss")
    assert_close_to(gx, gref, dtype, "grad")
    # The eps' = eps*K/(K-1) identity with PyTorch's uniform smoothing (where eps' <= 1).
    eps_u = eps * K / (K - 1)
    if eps_u <= 1:
        assert_close_to(out, _torch_result(x, t, weight=w, reduction=reduction, label_smoothing=eps_u)[0],
                        dtype, "identity")


@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_both_cpu_kernel_builds(monkeypatch, capability):
    """The baseline and AVX2 CPU kernels (chosen at run time) agree with PyTorch."""
    if capability == "default":
        monkeypatch.setenv("LABELSMOOTH_EXT_CPU_CAPABILITY", "default")
    elif "AVX2" not in L.build_info()["cpu_kernels"]:
        pytest.skip("this build has no AVX2 kernels (not x86-64)")
    else:
        monkeypatch.delenv("LABELSMOOTH_EXT_CPU_CAPABILITY", raising=False)
    active = json.loads(torch.ops.labelsmooth_ext.cpu_kernel_constants())["active"]
    if capability == "avx2" and active != "AVX2":
        pytest.skip("this CPU has no AVX2 + FMA + F16C")
    assert active == capability.upper()
    g = torch.Generator().manual_seed(17)
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        for weighted in (False, True):
            x = torch.randn(9, 333, generator=g).to(dtype)
            t = random_targets(9, 333, generator=g)
            w = (torch.rand(333, generator=g) + 0.1).to(dtype) if weighted else None
            _check(x, t, dtype, weight=w, label_smoothing=0.1)
            p = torch.softmax(torch.randn(9, 333, generator=g), 1).to(dtype)
            _check(x, p, dtype, weight=w, label_smoothing=0.1)


def test_module_drop_in():
    x = torch.randn(8, 10, requires_grad=True)
    t = torch.randint(0, 10, (8,))
    w = torch.rand(10)
    ours = L.CrossEntropyLoss(weight=w, label_smoothing=0.1, reduction="sum")
    theirs = torch.nn.CrossEntropyLoss(weight=w, label_smoothing=0.1, reduction="sum")
    assert isinstance(ours, torch.nn.CrossEntropyLoss)
    assert torch.allclose(ours(x, t), theirs(x, t), rtol=1e-5)
    assert set(ours.state_dict()) == set(theirs.state_dict())
    assert "smoothing_mode='uniform'" in repr(ours)


def test_legacy_size_average_reduce():
    x, t = torch.randn(6, 4), torch.randint(0, 4, (6,))
    for sa, rd in [(True, True), (False, True), (True, False), (None, False), (False, None)]:
        with pytest.warns(UserWarning):
            ours = L.cross_entropy(x, t, size_average=sa, reduce=rd, label_smoothing=0.1)
        with pytest.warns(UserWarning):
            theirs = F.cross_entropy(x, t, size_average=sa, reduce=rd, label_smoothing=0.1)
        assert ours.shape == theirs.shape and torch.allclose(ours, theirs, rtol=1e-5)
        with pytest.warns(UserWarning):
            mod = L.CrossEntropyLoss(size_average=sa, reduce=rd)
        assert mod.reduction == torch.nn.CrossEntropyLoss(size_average=sa, reduce=rd).reduction


def test_large_gradients_reuse_memory_safely():
    """CPU gradients of 4 MiB and more come from a one-block cache: a live gradient is never
    handed out again, and a reused block gives the same result as a fresh one."""
    g = torch.Generator().manual_seed(23)
    x = torch.randn(64, 20000, generator=g)
    t = torch.randint(0, 20000, (64,), generator=g)

    def grad():
        xx = x.clone().requires_grad_()
        L.cross_entropy(xx, t, label_smoothing=0.1).backward()
        return xx.grad

    g1 = grad()
    g2 = grad()  # g1 alive: must be a different block
    assert g1.data_ptr() != g2.data_ptr()
    torch.testing.assert_close(g1, g2, rtol=0, atol=0)
    ref = g1.clone()
    del g1, g2
    g3 = grad()  # reuses a freed block
    torch.testing.assert_close(g3, ref, rtol=0, atol=0)
    _check(x, t, torch.float32, label_smoothing=0.1)
