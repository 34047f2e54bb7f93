"""Fused linear + cross-entropy against linear + cross-entropy (ours, PyTorch eager, compiled)
and F.linear_cross_entropy with and without options (run with `pytest bench`, never by CI's
test command). Forward + backward at N=4096, H=1024, V=32000 float32 on the CPU
(LSE_BENCH_LINEAR_SHAPE=N,H,V for another shape).

Time is measured here; the peak extra memory of each method in a fresh subprocess (the
process's resident high-water mark; see labelsmooth_ext.linear_benchmark), stored in extra_info.
The same table with ratios: `python -m labelsmooth_ext bench-linear`.
"""
import os

import pytest
import torch

from labelsmooth_ext import linear_benchmark as LB

SHAPE = tuple(int(s) for s in os.environ.get("LSE_BENCH_LINEAR_SHAPE", "4096,1024,32000").split(","))
_inputs = {}


def _get_inputs():
    if not _inputs:
        x, W, t = LB.make_inputs(*SHAPE)
        _inputs["x"], _inputs["W"], _inputs["t"] = x.requires_grad_(), W.requires_grad_(), t
    return _inputs["x"], _inputs["W"], _inputs["t"]


@pytest.mark.parametrize("method", list(LB.METHODS))
def test_linear_cross_entropy(benchmark, method):
    x, W, t = _get_inputs()
    fn = LB.METHODS[method]

    def step():
        x.grad = W.grad = None
        fn(x, W, t).backward()

    benchmark.group = f"linear+CE N={SHAPE[0]} H={SHAPE[1]} V={SHAPE[2]} float32 cpu forward+backward"
    benchmark.pedantic(step, rounds=3, iterations=1, warmup_rounds=1)
    if torch.cuda.is_available():
        return
    mem = LB.run_in_subprocess(method, *SHAPE, reps=1)
    benchmark.extra_info.update({
        "peak_extra_bytes": mem["peak_extra_bytes"],
        "peak_beyond_grads_bytes": mem["peak_beyond_grads_bytes"],
        "warnings": mem["warnings"],
    })
