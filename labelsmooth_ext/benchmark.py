"""Benchmark core shared by `python -m labelsmooth_ext bench` and the pytest-benchmark suite.

Every implementation is timed in the same process as the floors it is compared with:
  copy floor: dst.copy_(src) of the logits (bytes read + written, the memory-traffic floor of a
              fused forward + backward, which reads the logits once and writes the gradient once);
  exp floor (CPU): torch.exp(x, out=y), one read, one exp and one write per element.
"""
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from . import reference
from .functional import cross_entropy

EPS = 0.1
IGNORE_FRACTION = 0.1


@dataclass(frozen=True)
class Case:
    name: str
    n: int
    k: int
    spatial: tuple = ()
    dtype: str = "float32"
    device: str = "cpu"

    @property
    def rows(self):
        return self.n * math.prod(self.spatial)

    @property
    def torch_dtype(self):
        return getattr(torch, self.dtype)

    @property
    def label(self):
        sp = "x" + "x".join(map(str, self.spatial)) if self.spatial else ""
        return f"{self.name} N={self.n}{sp} K={self.k}"


def default_cases(device, full=True):
    """ImageNet-style classification, a tiny classifier and a language model; with `full` also
    K-dimensional inputs: segmentation (VOC-like N=8, K=21; ADE20K-like N=4, K=150; 128x128)
    and an odd spatial size (N=2, K=19, 97x131: no dimension a multiple of the vector width)."""
    shapes = [("classification", 256, 1000, ()), ("tiny", 32, 10, ()), ("language-model", 4096, 32000, ())]
    if full:
        shapes += [("segmentation", 8, 21, (128, 128)), ("ade20k", 4, 150, (128, 128)),
                   ("odd-spatial", 2, 19, (97, 131))]
    if device == "cuda":
        shapes.append(("language-model", 8192, 128256, ()))
    return [Case(nm, n, k, sp, dt, device) for nm, n, k, sp in shapes for dt in ("float32", "bfloat16")]


def make_inputs(case, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((case.n, case.k) + case.spatial, generator=g).to(case.torch_dtype)
    t = torch.randint(0, case.k, (case.n,) + case.spatial, generator=g)
    t[torch.rand(t.shape, generator=g) < IGNORE_FRACTION] = -100
    return x.to(case.device), t.to(case.device)


def _ours(x, t):
    return cross_entropy(x, t, label_smoothing=EPS)


def _eager(x, t):
    return F.cross_entropy(x, t, label_smoothing=EPS)


def _reference(x, t):
    return reference.cross_entropy(x, t, label_smoothing=EPS)


_compiled = None


def _torch_compile(x, t):
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(_eager, dynamic=False)
    return _compiled(x, t)


IMPLEMENTATIONS = {
    "labelsmooth_ext": _ours,
    "torch": _eager,
    "torch.compile": _torch_compile,
    "reference": _reference,
}
MODES = ("forward", "forward+backward")


def make_step(impl, x, t, mode):
    fn = IMPLEMENTATIONS[impl]
    if mode == "forward":
        def step():
            with torch.no_grad():
                return fn(x, t)
    else:
        def step():
            xx = x.detach().requires_grad_()
            fn(xx, t).backward()
            return xx.grad
    return step


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_call(fn, device, reps, warmup=1):
    """Seconds per call (list), synchronised inside every timed call; CUDA events on GPU."""
    for _ in range(warmup):
        fn()
    sync(device)
    out = []
    for _ in range(reps):
        if device == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            out.append(a.elapsed_time(b) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return out


def floors(x, reps):
    y = torch.empty_like(x)
    res = {"copy": statistics.median(time_call(lambda: y.copy_(x), x.device.type, reps))}
    if x.device.type == "cpu":
        res["exp"] = statistics.median(time_call(lambda: torch.exp(x, out=y), "cpu", reps))
    return res


def _rss_kib(field_name):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    return None


def peak_extra_bytes(fn, device):
    """Peak memory of one call beyond what is allocated before it (CUDA allocator; on Linux
    CPU the process's resident high-water mark, reset through /proc/self/clear_refs)."""
    if device == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated() - base
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _rss_kib("VmRSS")
        fn()
        return (_rss_kib("VmHWM") - base) * 1024
    except OSError:
        return None


@dataclass
class Result:
    case: Case
    mode: str
    impl: str
    seconds: float
    floor_seconds: dict
    bytes_moved: int
    peak_extra_bytes: object = None
    loss_error: float = None
    extra: dict = field(default_factory=dict)

    @property
    def gbps(self):
        return self.bytes_moved / self.seconds / 1e9

    def as_dict(self):
        d = asdict(self)
        d["case"] = asdict(self.case)
        d["gbps"] = self.gbps
        d["ratio_to_copy_floor"] = self.seconds / self.floor_seconds["copy"]
        if "exp" in self.floor_seconds:
            d["ratio_to_exp_floor"] = self.seconds / self.floor_seconds["exp"]
        return d


def bytes_moved(case, mode):
    elems = case.rows * case.k * torch.empty((), dtype=case.torch_dtype).element_size()
    return elems if mode == "forward" else 2 * elems


def reps_for(case, reps):
    """Small cases take well under a millisecond a call: time more calls for a stable median."""
    n = case.rows * case.k
    return reps * 40 if n < 1 << 16 else reps * 8 if n < 1 << 20 else reps


def run_case(case, impls, modes, reps, progress=None):
    x, t = make_inputs(case)
    reps = reps_for(case, reps)
    fl = floors(x, reps)
    expected = float(F.cross_entropy(x.double(), t, label_smoothing=EPS))
    results = []
    for mode in modes:
        for impl in impls:
            step = make_step(impl, x, t, mode)
            secs = statistics.median(time_call(step, case.device, reps, warmup=2))
            with torch.no_grad():
                loss = float(IMPLEMENTATIONS[impl](x, t))
            peak = peak_extra_bytes(step, case.device)
            results.append(Result(case, mode, impl, secs, fl, bytes_moved(case, mode), peak,
                                  abs(loss - expected)))
            if progress:
                progress()
    return results


# Large-vocabulary options (issue 11) at the language-model shape, forward + backward, each
# variant on a fresh non-leaf copy of the logits (a model's output; made outside the timing).
LLM_VARIANTS = {
    "plain": {},
    "z_loss=1e-4": dict(z_loss=1e-4),
    "softcap=30": dict(softcap=30.0),
    "z_loss+softcap": dict(z_loss=1e-4, softcap=30.0),
    "inplace_backward": dict(inplace_backward=True),
}


def time_llm_options(device, reps, n=4096, k=32000, dtype="float32"):
    """Median seconds of each LLM_VARIANTS entry, the variants interleaved round by round (so a
    drift of the machine's speed moves them all), one warm-up round."""
    x, t = make_inputs(Case("language-model options", n, k, (), dtype, device))
    times = {name: [] for name in LLM_VARIANTS}
    for r in range(reps + 1):
        for name, kw in LLM_VARIANTS.items():
            src = x.detach().clone().requires_grad_()
            logits = src * 1
            sync(device)
            t0 = time.perf_counter()
            cross_entropy(logits, t, label_smoothing=EPS, **kw).backward()
            sync(device)
            if r:
                times[name].append(time.perf_counter() - t0)
            del src, logits
    return {name: statistics.median(v) for name, v in times.items()}


def format_llm_options(device, medians, n=4096, k=32000, dtype="float32"):
    plain = medians["plain"]
    lines = [f"{device.upper()} large-vocabulary options, N={n} K={k} {dtype}, forward+backward, "
             f"label_smoothing={EPS} (issue 11 asks z-loss and softcap within 1.10x of plain):"]
    for name, sec in medians.items():
        lines.append(f"  {name:<18} {sec * 1e3:8.1f} ms   {sec / plain:5.2f}x plain")
    return "\n".join(lines)


class Progress:
    """A one-line progress bar on stderr."""

    def __init__(self, total, width=30):
        self.total, self.done, self.width, self.t0 = total, 0, width, time.time()

    def __call__(self, label=""):
        self.done += 1
        filled = int(self.width * self.done / self.total)
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (self.width - filled)}] {self.done}/{self.total} "
                         f"{time.time() - self.t0:5.0f}s {label[:40]:<40}")
        sys.stderr.flush()
        if self.done == self.total:
            sys.stderr.write("\n")


def _shape(case):
    return "x".join(map(str, (case.n, case.k) + tuple(case.spatial)))


def summarize(results):
    """One row per (case, mode): times of every implementation and ratios from the same run.
    Every ratio is "<baseline> time / ours": above 1 ours is faster; for the copy and exp
    floors, 1 would be as fast as the floor."""
    names = {"labelsmooth_ext": "ours", "torch": "eager", "torch.compile": "compiled",
             "reference": "reference"}
    rows = []
    keys = []
    for r in results:
        key = (r.case, r.mode)
        if key not in keys:
            keys.append(key)
    for case, mode in keys:
        by = {r.impl: r for r in results if r.case == case and r.mode == mode}
        ours = by.get("labelsmooth_ext")
        row = {"input shape": _shape(case), "dtype": case.dtype, "device": case.device,
               "pass": "fwd" if mode == "forward" else "fwd+bwd"}
        for impl, r in by.items():
            row[f"{names.get(impl, impl)} ms"] = r.seconds * 1e3
        if ours:
            fl = ours.floor_seconds
            if "torch" in by:
                row["eager time / ours"] = by["torch"].seconds / ours.seconds
            if "torch.compile" in by:
                row["compiled time / ours"] = by["torch.compile"].seconds / ours.seconds
            # the floor of a forward alone is one read: half the copy (read + write)
            row["copy time / ours"] = (fl["copy"] / 2 if mode == "forward" else fl["copy"]) / ours.seconds
            if "exp" in fl:
                row["exp time / ours"] = fl["exp"] / ours.seconds
            row["peak MB ours"] = None if ours.peak_extra_bytes is None else ours.peak_extra_bytes / 2**20
            if "torch" in by and by["torch"].peak_extra_bytes is not None:
                row["peak MB eager"] = by["torch"].peak_extra_bytes / 2**20
        rows.append(row)
    return rows


LEGEND = """ms: median time of one call.  X time / ours: X's time divided by ours (above 1: ours is faster).
  eager = torch.nn.functional.cross_entropy; compiled = torch.compile of it;
  copy = the memory-traffic floor, y.copy_(x) of the logits (forward alone: half of it; 1 would
  be as fast as reading the logits once and writing the gradient once);
  exp = one torch.exp(x, out=y) pass over the logits (CPU).
peak MB: the call's peak memory beyond what existed before it (CPU: resident high-water mark)."""


def _fmt(v):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.2f}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def _header(c):
    """Two header lines: "eager time / ours" -> ("eager time", "/ ours"), "ours ms" -> ("ours", "ms")."""
    if " / " in c:
        a, b = c.split(" / ", 1)
        return a, "/ " + b
    if c.endswith(" ms"):
        return c[:-3], "ms"
    if c.startswith("peak MB "):
        return "peak MB", c[len("peak MB "):]
    return c, ""


def format_table(rows, markdown=False, omit=()):
    cols = []
    for r in rows:
        for c in r:
            if c not in cols and c not in omit:
                cols.append(c)
    cells = [[_fmt(r.get(c)) for c in cols] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
        lines += ["| " + " | ".join(c) + " |" for c in cells]
        return "\n".join(lines)
    heads = [_header(c) for c in cols]
    widths = [max(len(h[0]), len(h[1]), *(len(row[i]) for row in cells)) for i, h in enumerate(heads)]
    left = {"input shape", "dtype", "device", "pass"}

    def line(values):
        return "  ".join(v.ljust(w) if c in left else v.rjust(w)
                         for c, v, w in zip(cols, values, widths)).rstrip()

    out = [line([h[0] for h in heads]), line([h[1] for h in heads])]
    out.append("-" * max(len(x) for x in out))
    out += [line(row) for row in cells]
    return "\n".join(out)


def add_arguments(p):
    p.add_argument("--device", choices=["cpu", "cuda", "all"], default="all",
                   help="devices to run (default: every available one)")
    p.add_argument("--reps", type=int, default=5, help="timed calls per measurement (median)")
    p.add_argument("--full", action="store_true",
                   help="also the K-dimensional (segmentation, ADE20K, odd spatial size) shapes")
    p.add_argument("--impls", default="labelsmooth_ext,torch,torch.compile",
                   help="comma-separated subset of " + ", ".join(IMPLEMENTATIONS)
                   + " (default: all but the pure-PyTorch reference)")
    p.add_argument("--json", metavar="PATH", help="write every measurement as JSON")
    p.add_argument("--markdown", metavar="PATH", help="write the table as Markdown")
    p.add_argument("--plot", metavar="PNG", help="plot time against K (needs matplotlib)")
    p.add_argument("--no-options", action="store_true",
                   help="skip the large-vocabulary options table (z_loss, softcap, inplace_backward)")


def report_command(args):
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    if "cuda" in devices and not torch.cuda.is_available():
        if args.device == "cuda":
            print("no CUDA device available", file=sys.stderr)
            return 2
        devices.remove("cuda")
    impls = [i for i in args.impls.split(",") if i]
    unknown = [i for i in impls if i not in IMPLEMENTATIONS]
    if unknown:
        print(f"unknown implementation(s): {unknown}", file=sys.stderr)
        return 2
    cases = [c for d in devices for c in default_cases(d, args.full)]
    machine = machine_line(devices)
    print(machine, flush=True)
    print(f"label_smoothing={EPS}, {int(IGNORE_FRACTION * 100)}% of rows ignored, median of "
          f"{args.reps} call{'s' if args.reps != 1 else ''}; implementations: {', '.join(impls)}", flush=True)
    progress = Progress(len(cases) * len(impls) * len(MODES))
    results = []
    for case in cases:
        results += run_case(case, impls, MODES, args.reps,
                            progress=lambda c=case: progress(f"{c.label} {c.dtype}"))
    rows = summarize(results)
    for dev in devices:
        print(f"\n{dev.upper()}:")
        print(format_table([r for r in rows if r["device"] == dev], omit=("device",)))
    print("\n" + LEGEND)
    options = {}
    if not getattr(args, "no_options", False):
        for dev in devices:
            options[dev] = time_llm_options(dev, args.reps)
            print("\n" + format_llm_options(dev, options[dev]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "torch": torch.__version__,
                       "results": [r.as_dict() for r in results], "table": rows,
                       "llm_options_seconds": options}, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(format_table(rows, markdown=True) + "\n")
    if args.plot:
        plot_vs_k(args.plot, devices, impls, args.reps)
    return 0


def machine_line(devices):
    """Where the numbers come from: the first line of the report."""
    from . import build_info

    info = build_info()
    gpu = torch.cuda.get_device_name() if "cuda" in devices else "no GPU used"
    return (f"machine: {_cpu_name()}, {os.cpu_count()} CPUs ({torch.get_num_threads()} torch threads); "
            f"{gpu}; torch {torch.__version__}; labelsmooth_ext CPU kernels "
            f"{'/'.join(info['cpu_kernels'])}, CUDA kernels {'yes' if info['cuda'] else 'no'}")


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "CPU"


def plot_vs_k(path, devices, impls, reps):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return
    ks = [256, 1024, 4096, 16384, 65536]
    fig, axes = plt.subplots(1, len(devices), figsize=(6 * len(devices), 4), squeeze=False)
    for ax, dev in zip(axes[0], devices):
        for impl in impls:
            times = []
            for k in ks:
                case = Case("sweep", max(1, (1 << 22) // k), k, (), "float32", dev)
                x, t = make_inputs(case)
                times.append(statistics.median(time_call(make_step(impl, x, t, "forward+backward"),
                                                         dev, reps)) * 1e3)
            ax.loglog(ks, times, marker="o", label=impl)
        ax.set_xlabel("K (classes), N*K = 4M float32")
        ax.set_ylabel("forward + backward, ms")
        ax.set_title(dev)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
