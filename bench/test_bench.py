"""Speed and memory of labelsmooth_ext against PyTorch eager, torch.compile and the
pure-PyTorch reference (run with `pytest bench`, never by CI's test command).

Each result's extra_info holds the bytes moved, GB/s, the ratio to the copy floor (and on CPU
to the exp floor) timed in the same run, and the peak extra memory of one call.
"""
import statistics

import pytest
import torch

from labelsmooth_ext import benchmark as B
from conftest import CASES, DEVICES, LLM_MEDIANS, floors_for, inputs_for


def _id(case):
    return f"{case.name}-{case.rows}x{case.k}-{case.dtype}-{case.device}"


@pytest.mark.parametrize("case", CASES, ids=_id)
@pytest.mark.parametrize("mode", B.MODES)
@pytest.mark.parametrize("impl", list(B.IMPLEMENTATIONS))
def test_loss(benchmark, record, case, mode, impl):
    x, t = inputs_for(case)
    fl = floors_for(case)
    step = B.make_step(impl, x, t, mode)

    def timed():
        step()
        B.sync(case.device)  # synchronise inside every timed call

    benchmark.group = f"{case.label} {case.dtype} {case.device} {mode}"
    size = case.rows * case.k
    rounds = 5 if size >= 1 << 24 else 20 if size >= 1 << 20 else 200  # small: noisy, and cheap
    benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=2)
    median = benchmark.stats.stats.median
    moved = B.bytes_moved(case, mode)
    peak = B.peak_extra_bytes(step, case.device)
    benchmark.extra_info.update({
        "bytes_moved": moved,
        "gbps": moved / median / 1e9,
        "copy_floor_s": fl["copy"],
        "ratio_to_copy_floor": median / fl["copy"],
        "peak_extra_bytes": peak,
    })
    if "exp" in fl:
        benchmark.extra_info.update({"exp_floor_s": fl["exp"], "ratio_to_exp_floor": median / fl["exp"]})
    record(B.Result(case, mode, impl, median, fl, moved, peak))


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_copy_floor(benchmark, case):
    """The floor itself, tracked like the rest: dst.copy_(src) of the logits."""
    x, _ = inputs_for(case)
    y = torch.empty_like(x)
    benchmark.group = f"{case.label} {case.dtype} {case.device} floor"

    def timed():
        y.copy_(x)
        B.sync(case.device)

    benchmark.pedantic(timed, rounds=10, iterations=1, warmup_rounds=1)
    benchmark.extra_info["gbps"] = 2 * x.numel() * x.element_size() / statistics.median(
        benchmark.stats.stats.data) / 1e9


# Mixed precision at the language-model shape: float16 logits with a loss scaler (the float16
# backward recomputes the gradient, one more read of the logits), and bfloat16 logits under
# torch.autocast (PyTorch upcasts them to a float32 copy; ours reads them as they are).
MIXED_CASES = [B.Case(name, 4096, 32000, (), dtype, d)
               for d in DEVICES
               for name, dtype in (("language-model float16+scaler", "float16"),
                                   ("language-model autocast", "bfloat16"))]
_MIXED_FNS = {"labelsmooth_ext": lambda x, t: B.cross_entropy(x, t, label_smoothing=B.EPS),
              "torch": lambda x, t: torch.nn.functional.cross_entropy(x, t, label_smoothing=B.EPS),
              "torch.compile": B._torch_compile}
SCALE = 2.0 ** 12


def _mixed_step(case, impl, x, t):
    fn = _MIXED_FNS[impl]
    autocast = "autocast" in case.name

    def step():
        xx = x.detach().requires_grad_()
        with torch.autocast(case.device, dtype=torch.bfloat16, enabled=autocast):
            loss = fn(xx, t)
        (loss if autocast else loss * SCALE).backward()
        return xx.grad
    return step


@pytest.mark.parametrize("case", MIXED_CASES, ids=_id)
@pytest.mark.parametrize("impl", list(_MIXED_FNS))
def test_mixed_precision(benchmark, record, case, impl):
    x, t = inputs_for(case)
    fl = floors_for(case)
    step = _mixed_step(case, impl, x, t)

    def timed():
        step()
        B.sync(case.device)

    benchmark.group = f"{case.label} {case.dtype} {case.device} forward+backward"
    benchmark.pedantic(timed, rounds=5, iterations=1, warmup_rounds=2)
    median = benchmark.stats.stats.median
    moved = B.bytes_moved(case, "forward+backward")
    peak = B.peak_extra_bytes(step, case.device)
    benchmark.extra_info.update({"bytes_moved": moved, "gbps": moved / median / 1e9,
                                 "copy_floor_s": fl["copy"], "ratio_to_copy_floor": median / fl["copy"],
                                 "peak_extra_bytes": peak})
    if "exp" in fl:
        benchmark.extra_info.update({"exp_floor_s": fl["exp"], "ratio_to_exp_floor": median / fl["exp"]})
    record(B.Result(case, "forward+backward", impl, median, fl, moved, peak))


# Large-vocabulary options at the language-model shape (forward + backward): plain smoothing,
# z_loss=1e-4 with softcap=30, and inplace_backward=True (gradient written over the logits).
# Logits are a fresh non-leaf each round (made in the untimed setup), as a model's output.
LLM_CASES = [B.Case("language-model options", 4096, 32000, (), "float32", d) for d in DEVICES]
_LLM_VARIANTS = B.LLM_VARIANTS  # plain, z_loss=1e-4, softcap=30, both, inplace_backward

_PEAK_SCRIPT = """
import sys, torch, labelsmooth_ext as L
from labelsmooth_ext import benchmark as B
g = torch.Generator().manual_seed(0)
x = torch.randn(4096, 32000, generator=g)
t = torch.randint(0, 32000, (4096,), generator=g)
src = x.requires_grad_()
logits = src * 1
step = lambda: L.cross_entropy(logits, t, label_smoothing=0.1, inplace_backward=sys.argv[1] == "1").backward()
print(B.peak_extra_bytes(step, "cpu"))  # VmHWM after a reset: not the high-water mark inherited at fork
"""


def _cpu_peak_rss(inplace):
    """Peak resident bytes a loss + backward adds to a process holding the inputs and the
    logits (a fresh process, no gradient-block cache)."""
    import os
    import subprocess
    import sys
    env = dict(os.environ, LABELSMOOTH_EXT_CPU_GRAD_CACHE="0")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, "1" if inplace else "0"], env=env, cwd=root,
                         capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


@pytest.mark.parametrize("case", LLM_CASES, ids=_id)
@pytest.mark.parametrize("variant", list(_LLM_VARIANTS))
def test_llm_options(benchmark, record, case, variant):
    x, t = inputs_for(case)
    kw = _LLM_VARIANTS[variant]

    def setup():
        src = x.detach().clone().requires_grad_()
        return (src * 1,), {}

    def step(logits):
        B.cross_entropy(logits, t, label_smoothing=B.EPS, **kw).backward()
        B.sync(case.device)

    benchmark.group = f"{case.label} {case.dtype} {case.device} options forward+backward"
    benchmark.pedantic(step, setup=setup, rounds=5, iterations=1, warmup_rounds=1)
    median = benchmark.stats.stats.median
    benchmark.extra_info["variant"] = variant
    LLM_MEDIANS[(case.device, variant)] = median
    if case.device == "cpu" and variant in ("plain", "inplace_backward"):
        benchmark.extra_info["peak_extra_rss_bytes"] = _cpu_peak_rss(variant == "inplace_backward")
    elif case.device == "cuda":
        def full():
            step(*setup()[0])
        benchmark.extra_info["peak_extra_bytes"] = B.peak_extra_bytes(full, case.device)
    print(f"\n{variant}: {median * 1e3:.1f} ms forward+backward; {benchmark.extra_info}")
