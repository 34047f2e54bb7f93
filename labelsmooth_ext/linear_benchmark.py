"""Benchmark of the fused linear + cross-entropy (`python -m labelsmooth_ext bench-linear`).

Forward + backward (gradients for the input and the linear weight) with label_smoothing=0.1,
10% of the rows ignored, against the ways PyTorch offers.

Memory: each method runs in a fresh subprocess, so its peak is its own: the process's resident
high-water mark (VmHWM, reset through /proc/self/clear_refs) during a step after one warm-up step,
minus the resident size once the inputs exist (so caches kept from the warm-up count). "beyond
grads" subtracts the gradients every method must return (d input and d W in the input dtype).

Time: all methods in one further subprocess, interleaved round by round (one step of each per
round, after a warm-up round), so that load from other processes on a shared machine hits them
alike; each method's time is the median over rounds of its wall time, and "ours faster by" the
median over rounds of the per-round ratio. The process CPU time (user + system of all its
threads) per step is reported too: it is much less sensitive to other processes' load.
"""
import argparse
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import time
import warnings

import torch
import torch.nn.functional as F

from .benchmark import _cpu_name

EPS = 0.1
IGNORE_FRACTION = 0.1
DEFAULT_SHAPE = (4096, 1024, 32000)


def _ours(x, W, t):
    from . import linear_cross_entropy

    return linear_cross_entropy(x, W, t, label_smoothing=EPS)


def _linear_ours(x, W, t):
    from . import cross_entropy

    return cross_entropy(F.linear(x, W), t, label_smoothing=EPS)


def _linear_eager(x, W, t):
    return F.cross_entropy(F.linear(x, W), t, label_smoothing=EPS)


def _torch_lce(x, W, t):
    return F.linear_cross_entropy(x, W, t, label_smoothing=EPS)


def _torch_lce_chunked(x, W, t):
    return F.linear_cross_entropy(x, W, t, label_smoothing=EPS,
                                  options=torch.nn.LinearCrossEntropyOptions())


_compiled = {}


def _compiled_of(fn):
    def run(x, W, t):
        if fn not in _compiled:
            _compiled[fn] = torch.compile(fn, dynamic=False)
        return _compiled[fn](x, W, t)
    return run


METHODS = {
    "labelsmooth_ext.linear_cross_entropy": _ours,
    "torch.compile(labelsmooth_ext.linear_cross_entropy)": _compiled_of(_ours),
    "linear + labelsmooth_ext.cross_entropy": _linear_ours,
    "linear + F.cross_entropy": _linear_eager,
    "torch.compile(linear + F.cross_entropy)": _compiled_of(_linear_eager),
    "F.linear_cross_entropy(options=None)": _torch_lce,
    "F.linear_cross_entropy(options=LinearCrossEntropyOptions())": _torch_lce_chunked,
}
OURS = "labelsmooth_ext.linear_cross_entropy"
BASELINE = "linear + labelsmooth_ext.cross_entropy"


def make_inputs(n, h, v, dtype=torch.float32, seed=0, ignore_fraction=None):
    if ignore_fraction is None:
        ignore_fraction = IGNORE_FRACTION
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, h, generator=g) / h ** 0.5).to(dtype)
    W = torch.randn(v, h, generator=g).to(dtype)
    t = torch.randint(0, v, (n,), generator=g)
    t[torch.rand(n, generator=g) < ignore_fraction] = -100
    return x, W, t


def _rss_kib(field_name):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field_name} not in /proc/self/status")


def _trim():
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def run_one(method, n, h, v, reps, dtype="float32"):
    """Time and peak memory of one method in this process (meant to be a fresh one)."""
    import torch._dynamo  # noqa: F401  (imported up front by every method: not its memory)
    import torch._inductor  # noqa: F401

    fn = METHODS[method]
    x0, W0, t = make_inputs(n, h, v, getattr(torch, dtype))
    x = x0.requires_grad_()
    W = W0.requires_grad_()
    _trim()
    base = _rss_kib("VmRSS")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        loss = fn(x, W, t)
        loss.backward()
        first = time.perf_counter() - t0
    warned = sorted({str(w.message).split("\n")[0][:160] for w in caught})
    loss_value = float(loss.detach())
    del loss
    x.grad = W.grad = None
    _trim()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident size
    times = []
    for _ in range(reps):
        x.grad = W.grad = None
        t0 = time.perf_counter()
        fn(x, W, t).backward()
        times.append(time.perf_counter() - t0)
    peak = (_rss_kib("VmHWM") - base) * 1024
    grads = (x.numel() + W.numel()) * x.element_size()
    return {"method": method, "n": n, "h": h, "v": v, "dtype": dtype, "threads": torch.get_num_threads(),
            "seconds": times, "median_s": statistics.median(times), "first_call_s": first,
            "peak_extra_bytes": peak, "peak_beyond_grads_bytes": peak - grads,
            "loss": loss_value, "warnings": warned}


def time_interleaved(methods, n, h, v, rounds, dtype="float32"):
    """Wall and CPU seconds per step of every method, interleaved round by round."""
    x0, W0, t = make_inputs(n, h, v, getattr(torch, dtype))
    x, W = x0.requires_grad_(), W0.requires_grad_()
    out = {m: {"wall": [], "cpu": []} for m in methods}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for r in range(rounds + 1):  # round 0 is the warm-up (compilation, first touch)
            for m in methods:
                x.grad = W.grad = None
                c0, t0 = time.process_time(), time.perf_counter()
                METHODS[m](x, W, t).backward()
                wall, cpu = time.perf_counter() - t0, time.process_time() - c0
                if r:
                    out[m]["wall"].append(wall)
                    out[m]["cpu"].append(cpu)
    return out


def _run_child(args):
    out = subprocess.run([sys.executable, "-m", "labelsmooth_ext.linear_benchmark"] + args,
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_in_subprocess(method, n, h, v, reps, dtype="float32"):
    return _run_child(["--one", method, "--shape", f"{n},{h},{v}", "--reps", str(reps), "--dtype", dtype,
                       "--ignore", str(IGNORE_FRACTION)])


def timing_in_subprocess(methods, n, h, v, rounds, dtype="float32"):
    return _run_child(["--time", ",".join(methods), "--shape", f"{n},{h},{v}", "--reps", str(rounds),
                       "--dtype", dtype, "--ignore", str(IGNORE_FRACTION)])


def _median_ratio(times, m, ours):
    return statistics.median(a / b for a, b in zip(times[m], times[ours]))


def table(results, timing):
    by = {r["method"]: r for r in results}
    ours = by.get(OURS)
    base = by.get(BASELINE)
    wall = {m: t["wall"] for m, t in timing.items()}
    cpu = {m: t["cpu"] for m, t in timing.items()}
    ref_loss = by.get("linear + F.cross_entropy", ours)["loss"] if results else None
    lines = ["| method | wall s | CPU s | ours faster by (wall) | (CPU) | peak extra MB | beyond grads MB | "
             "ours' share of its memory | loss - eager loss | notes |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        m = r["method"]
        mem = (ours["peak_beyond_grads_bytes"] / r["peak_beyond_grads_bytes"]
               if ours and r["peak_beyond_grads_bytes"] > 0 else float("nan"))
        note = "; ".join(w for w in r["warnings"] if "options" in w or "fall" in w.lower())[:110]
        lines.append(
            f"| {m} | {statistics.median(wall[m]):.2f} | {statistics.median(cpu[m]):.2f} | "
            f"{_median_ratio(wall, m, OURS):.2f}x | {_median_ratio(cpu, m, OURS):.2f}x | "
            f"{r['peak_extra_bytes'] / 2**20:.0f} | "
            f"{r['peak_beyond_grads_bytes'] / 2**20:.0f} | {mem:.3f} | {r['loss'] - ref_loss:+.1e} | "
            f"{note or '-'} |")
    if ours and base:
        lines.append("")
        lines.append(f"time ours / (linear + labelsmooth_ext.cross_entropy), median per-round ratio: "
                     f"wall {1 / _median_ratio(wall, BASELINE, OURS):.3f}, "
                     f"CPU {1 / _median_ratio(cpu, BASELINE, OURS):.3f} (goal <= 1.1)")
        eager = by.get("linear + F.cross_entropy")
        if eager:
            lines.append(f"peak extra beyond grads, ours / (linear + F.cross_entropy): "
                         f"{ours['peak_beyond_grads_bytes'] / eager['peak_beyond_grads_bytes']:.3f} "
                         f"(goal <= 0.125); total peak extra: "
                         f"{ours['peak_extra_bytes'] / eager['peak_extra_bytes']:.3f}")
    return "\n".join(lines)


def add_arguments(p):
    p.add_argument("--shape", default=",".join(map(str, DEFAULT_SHAPE)), help="N,H,V (default %(default)s)")
    p.add_argument("--reps", type=int, default=3, help="timed rounds (median)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--ignore", type=float, default=IGNORE_FRACTION,
                   help="fraction of the rows whose target is ignore_index (default %(default)s)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset")
    p.add_argument("--json", metavar="PATH", help="write the measurements as JSON")
    p.add_argument("--markdown", metavar="PATH", help="write the table as Markdown")


def report_command(args):
    global IGNORE_FRACTION
    IGNORE_FRACTION = args.ignore
    n, h, v = map(int, args.shape.split(","))
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        print(f"unknown method(s): {unknown}", file=sys.stderr)
        return 2
    load_start = os.getloadavg()[0]
    results = []
    for m in methods:
        sys.stderr.write(f"memory: {m} ...\n")
        results.append(run_in_subprocess(m, n, h, v, 1, args.dtype))
    sys.stderr.write(f"time: {args.reps} interleaved rounds ...\n")
    timing = timing_in_subprocess(methods, n, h, v, args.reps, args.dtype)
    header = (f"linear + cross-entropy, forward + backward (d input, d W), N={n} H={h} V={v} "
              f"{args.dtype}, label_smoothing={EPS}, {int(IGNORE_FRACTION * 100)}% rows ignored; "
              f"torch {torch.__version__}; {_cpu_name()}; {results[0]['threads']} threads; "
              f"memory: each method in a fresh process (one step after a warm-up step); "
              f"time: medians over {args.reps} interleaved rounds after a warm-up round, one process; "
              f"load average (1 min) at the start {load_start:.1f}, at the end {os.getloadavg()[0]:.1f} "
              f"(a shared machine: other processes' load inflates wall times; CPU s much less)")
    text = table(results, timing)
    print(header)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": header, "memory": results, "timing": timing}, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(header + "\n\n" + text + "\n")
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m labelsmooth_ext.linear_benchmark", description=__doc__)
    add_arguments(p)
    p.add_argument("--one", metavar="METHOD", help="run one method in this process, print JSON")
    p.add_argument("--time", metavar="METHODS", help="interleaved timing in this process, print JSON")
    args = p.parse_args(argv)
    global IGNORE_FRACTION
    IGNORE_FRACTION = args.ignore
    if args.time:
        n, h, v = map(int, args.shape.split(","))
        print(json.dumps(time_interleaved(args.time.split(","), n, h, v, args.reps, args.dtype)))
        return 0
    if args.one:
        n, h, v = map(int, args.shape.split(","))
        print(json.dumps(run_one(args.one, n, h, v, args.reps, args.dtype)))
        return 0
    return report_command(args)


if __name__ == "__main__":
    sys.exit(main())
