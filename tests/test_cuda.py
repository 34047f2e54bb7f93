"""CUDA checks: on a GPU ("cuda"), and on the CPU under the SIMT emulation of the CUDA kernels
("simt", tests/simt_ext.py: the kernels' own source with CUDA's execution rules checked).
Real-GPU-only checks (CUDA graphs, 2^31 elements, peak memory) skip without a GPU."""
import pytest
import torch
import torch.nn.functional as F

import labelsmooth_ext as L
from conftest import CUDA_DEVICES, CUDA_SKIP_REASON, DTYPES, HAS_CUDA, SIMT_PARAM, assert_close_to

gpu_only = pytest.mark.skipif(not HAS_CUDA, reason=CUDA_SKIP_REASON)


def _parity_cases():
    """Every size on a GPU; under the emulation small N (large K is what picks the kernel)."""
    cases = []
    for K in [1, 2, 3, 1000, 32000, 50257, 128256, 262144]:
        for N in [1, 7, 4096]:
            if N * K > 4096 * 50257:
                continue  # covered by the smaller N for this K (keeps the run short)
            cases.append(pytest.param("cuda", K, N, marks=gpu_only, id=f"cuda-K{K}-N{N}"))
            if N <= 7 and K <= 50257 and not (N == 7 and K <= 3):
                cases.append(pytest.param(SIMT_PARAM.values[0], K, N, marks=SIMT_PARAM.marks,
                                          id=f"simt-K{K}-N{N}"))
    return cases


def _ref(x, t, **kw):
    xd = x.detach().double().requires_grad_()
    out = L.reference.cross_entropy(xd, t, **kw)
    return out, torch.autograd.grad(out.sum(), xd)[0]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device, K, N", _parity_cases())
@pytest.mark.parametrize("eps", [0.0, 0.1, 1.0])
def test_parity_sizes(device, dtype, K, N, eps):
    g = torch.Generator(device=device).manual_seed(K + N)
    x = (torch.randn(N, K, device=device, generator=g) * 2).to(dtype)
    t = torch.randint(0, K, (N,), device=device, generator=g)
    t[::5] = -100
    xx = x.clone().requires_grad_()
    out = L.cross_entropy(xx, t, label_smoothing=eps, reduction="sum")
    out.backward()
    ref, gref = _ref(x, t, label_smoothing=eps, reduction="sum")
    assert_close_to(out, ref, dtype, "loss")
    assert_close_to(xx.grad, gref, dtype, "grad")


@pytest.mark.parametrize("device", CUDA_DEVICES)
def test_bf16_gradient_precision_when_p_y_is_near_one(device):
    """p_y - q_y is formed in float32 and rounded once, so it keeps its relative precision."""
    K = 1000
    x = torch.zeros(8, K, device=device)
    t = torch.arange(8, device=device)
    x[torch.arange(8), t] = torch.linspace(8, 16, 8, device=device)
    xb = x.bfloat16().requires_grad_()
    L.cross_entropy(xb, t, reduction="sum").backward()
    _, gref = _ref(xb.detach(), t, reduction="sum")
    gy, gy_ref = xb.grad[torch.arange(8), t].double(), gref[torch.arange(8), t]
    assert (gy_ref < 0).all()
    assert ((gy - gy_ref).abs() / gy_ref.abs()).max() < 1e-2


@gpu_only
def test_cuda_graph_capture_and_replay():
    """No host synchronisation: forward + backward capture in a CUDA graph."""
    N, K = 64, 5000
    x = torch.randn(N, K, device="cuda", requires_grad=True)
    t = torch.randint(0, K, (N,), device="cuda")
    w = torch.rand(K, device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up on a side stream, as the CUDA graph docs ask
        for _ in range(2):
            x.grad = None
            L.cross_entropy(x, t, weight=w, label_smoothing=0.1).backward()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    x.grad = None
    with torch.cuda.graph(graph):
        loss = L.cross_entropy(x, t, weight=w, label_smoothing=0.1)
        loss.backward()
    for _ in range(2):
        with torch.no_grad():
            x.copy_(torch.randn_like(x))
            t.copy_(torch.randint(0, K, (N,), device="cuda"))
        x.grad.zero_()
        graph.replay()
        torch.cuda.synchronize()
        ref = F.cross_entropy(x.detach(), t, weight=w, label_smoothing=0.1)
        torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", CUDA_DEVICES)
def test_backward_skips_when_incoming_gradient_is_one_and_scales_otherwise(device):
    x = torch.randn(16, 3000, device=device, requires_grad=True)
    t = torch.randint(0, 3000, (16,), device=device)
    for go in (1.0, 0.25, 3.0):
        x.grad = None
        (L.cross_entropy(x, t, label_smoothing=0.1) * go).backward()
        xr = x.detach().clone().requires_grad_()
        (F.cross_entropy(xr, t, label_smoothing=0.1) * go).backward()
        torch.testing.assert_close(x.grad, xr.grad, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("device", CUDA_DEVICES)
def test_very_long_rows(device):
    K = 1 << 20
    x = torch.randn(3, K, device=device, requires_grad=True)
    t = torch.tensor([0, K - 1, 12345], device=device)
    out = L.cross_entropy(x, t, label_smoothing=0.1, reduction="sum")
    out.backward()
    ref, gref = _ref(x.detach(), t, label_smoothing=0.1, reduction="sum")
    assert_close_to(out, ref, torch.float32, "loss")
    assert_close_to(x.grad, gref, torch.float32, "grad")


@gpu_only
def test_more_than_2_pow_31_elements():
    """64-bit offsets: N*K above 2^31 (needs about 9 GB of GPU memory)."""
    free, _ = torch.cuda.mem_get_info()
    N, K = 16400, 131072
    if free < 12 * N * K:
        pytest.skip("not enough free GPU memory for a 2^31-element case")
    x = torch.randn(N, K, device="cuda", dtype=torch.bfloat16).requires_grad_()
    t = torch.randint(0, K, (N,), device="cuda")
    out = L.cross_entropy(x, t, reduction="none", label_smoothing=0.1)
    out.sum().backward()
    rows = torch.tensor([0, 1, N // 2, N - 2, N - 1], device="cuda")
    ref, gref = _ref(x.detach()[rows], t[rows], reduction="none", label_smoothing=0.1)
    assert_close_to(out[rows], ref, torch.bfloat16, "loss")
    assert_close_to(x.grad[rows], gref, torch.bfloat16, "grad")


@gpu_only
def test_peak_extra_memory_is_o_of_n():
    N, K = 4096, 32000
    x = torch.randn(N, K, device="cuda", requires_grad=True)
    t = torch.randint(0, K, (N,), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    L.cross_entropy(x, t, label_smoothing=0.1).backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base - x.numel() * x.element_size()
    assert extra < 64 * N + (1 << 20), f"{extra} bytes beyond the gradient"


def _inductor_backward_scale():
    import importlib.util
    from pathlib import Path

    try:  # the tool reads inductor's generated code through this helper (absent in torch 2.4)
        from torch._inductor.utils import run_fw_bw_and_get_code  # noqa: F401
    except ImportError:
        pytest.skip(f"torch {torch.__version__} has no torch._inductor.utils.run_fw_bw_and_get_code: "
                    "the generated backward code cannot be read with this torch")
    path = Path(__file__).resolve().parents[1] / "bench" / "inductor_backward_scale.py"
    spec = importlib.util.spec_from_file_location("inductor_backward_scale", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("target, reduction", [("ext", "mean"), ("prob", "none")])
def test_compiled_backward_scale_fuses_into_pointwise_consumer(target, reduction):
    """Issue 10 item 7b: under torch.compile the incoming gradient's scaling of the saved gradient
    is an ATen multiply (_ops._compiled_scale), not the opaque ce_backward: inductor fuses it into
    the gradient's pointwise consumer (here the backward of a temperature applied to the logits),
    so one N x K pass instead of two runs between the loss and the matmuls, with the gradients of
    eager mode. Inductor on the CPU (the graph is device-independent; the CPU takes _ops.py's Python
    autograd for these operators, as every CUDA operator does)."""
    S = _inductor_backward_scale()
    r = S.backward_passes(target, reduction)
    assert r["same"], "compiled gradients differ from eager"
    assert r["ce_backward"] == 0 and r["passes"] == 1, (r["ce_backward"], r["nk_kernels"])
    assert r["mm"] == 2
