"""Tensor parallel benchmark: vocabulary-parallel cross-entropy over 2 gloo ranks (CPU).

    python bench/bench_distributed.py [--rows 4096] [--classes 32000] [--reps 5] [--json out.json]

Not part of any test run. Spawns 2 processes (loopback, gloo, one thread each), each holding
half of the classes of (N, K) float32 logits, label_smoothing=0.1, 10% of rows ignored, and
times one forward + backward step (median over reps, the slower rank of each rep) of:

- ours: labelsmooth_ext.distributed.vocab_parallel_cross_entropy with the fused local passes
  (the vocab_parallel_stats / vocab_parallel_grad operators; both collective strategies), and
  with the former composite local pass (ATen ops, several N x K_r temporaries) for comparison
- gather: all-gather the full logits, F.cross_entropy on them, backward, keep the local slice
- loss_parallel: PyTorch's DTensor loss_parallel() on Shard(1) logits, which has no label
  smoothing, so it is compared with ours at label_smoothing=0 too
- floor: one torch.exp(x, out=y) over the local slice (one read, one exp, one write per element:
  the CPU floor of the performance notes); a fused forward + backward needs about two of them
  (a read before the collective, a read + exp + write after it)

The methods are timed round-robin (one step of each per round, --reps rounds after a warm-up
round), so a change of machine load during the run reaches every method alike.

Bytes communicated per rank and step are counted, not estimated: every functional collective
(torch.distributed._functional_collectives.*) a step issues is wrapped, and the bytes of the
tensors each rank hands in ("sent") and gets back ("received") are summed.
"""
import argparse
import datetime
import json
import os
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist

# `python bench/bench_distributed.py` from a source checkout: the checkout's labelsmooth_ext
# (the spawned workers import it too, and inherit this path through the environment)
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [_ROOT, os.environ.get("PYTHONPATH")]))
import torch.multiprocessing as mp
import torch.nn.functional as F


class CountCollectives:
    """Counts the functional collectives a step issues (ours, the gather baseline and
    loss_parallel all go through torch.distributed._functional_collectives) and the bytes
    of the tensors each rank hands in ("sent") and gets back ("received")."""

    NAMES = ("all_reduce", "all_gather_single", "all_gather_tensor", "reduce_scatter_tensor",
             "all_to_all_single", "broadcast")

    def __enter__(self):
        from torch.distributed import _functional_collectives as funcol

        self.sent = self.received = self.calls = 0
        self._saved = {n: getattr(funcol, n) for n in self.NAMES if hasattr(funcol, n)}
        self._depth = 0

        def wrap(fn):
            def counted(t, *a, **kw):
                # only the outermost call: all_gather_tensor calls all_gather_single in newer torch
                self._depth += 1
                try:
                    out = fn(t, *a, **kw)
                finally:
                    self._depth -= 1
                if self._depth == 0:
                    self.calls += 1
                    self.sent += t.numel() * t.element_size()
                    self.received += out.numel() * out.element_size()
                return out
            return counted

        for n, fn in self._saved.items():
            setattr(funcol, n, wrap(fn))
        return self

    def __exit__(self, *exc):
        from torch.distributed import _functional_collectives as funcol

        for n, fn in self._saved.items():
            setattr(funcol, n, fn)


def _steps(local, target, start, group, mesh, eps):
    from labelsmooth_ext import distributed as D
    from torch.distributed import _functional_collectives as funcol
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor.parallel import loss_parallel

    def ours(strategy, e, local_pass="fused"):
        def step():
            D.set_collective_strategy(strategy)
            D.set_local_pass(local_pass)
            try:
                x = local.detach().requires_grad_()
                D.vocab_parallel_cross_entropy(x, target, group, label_smoothing=e).backward()
            finally:
                D.set_local_pass("fused")
            return x.grad
        return step

    out = torch.empty_like(local)

    def floor():
        return torch.exp(local, out=out)

    def gather():
        gather_fn = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor
        full = gather_fn(local.detach().t().contiguous(), 0, group)
        full = (full.wait() if hasattr(full, "wait") else full).t().requires_grad_()
        F.cross_entropy(full, target, label_smoothing=eps).backward()
        return full.grad[:, start:start + local.shape[1]]

    def lp():
        x = local.detach().requires_grad_()
        dx = DTensor.from_local(x, mesh, [Shard(1)], run_check=False)
        with loss_parallel():
            F.cross_entropy(dx, target).backward()
        return x.grad

    return {
        f"ours, fused local pass (allgather), eps={eps}": ours("allgather", eps),
        f"ours, fused local pass (allreduce), eps={eps}": ours("allreduce", eps),
        f"ours, composite local pass (allgather), eps={eps}": ours("allgather", eps, "composite"),
        f"gather full logits + F.cross_entropy, eps={eps}": gather,
        "ours, fused local pass (allgather), eps=0": ours("allgather", 0.0),
        "loss_parallel(), eps=0 (no smoothing)": lp,
        "floor: one torch.exp pass over the local slice": floor,
    }


def _worker(rank, world, port, args, out):
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=600))
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    group = dist.group.WORLD
    n, k = args.rows, args.classes
    sizes = [k // world + (1 if r < k % world else 0) for r in range(world)]
    start = sum(sizes[:rank])
    gen = torch.Generator().manual_seed(0)
    target = torch.randint(0, k, (n,), generator=gen)
    target[torch.rand(n, generator=gen) < 0.1] = -100
    torch.manual_seed(1 + rank)
    local = torch.randn(n, sizes[rank]) * 2
    steps = _steps(local, target, start, group, mesh, args.eps)
    times = {name: [] for name in steps}
    load = []
    for rnd in range(args.reps + 1):  # round 0: warm-up
        for name, step in steps.items():
            dist.barrier()
            t0 = time.perf_counter()
            step()
            dt = torch.tensor([time.perf_counter() - t0])
            dist.all_reduce(dt, op=dist.ReduceOp.MAX)
            if rnd:
                times[name].append(float(dt))
        load.append(os.getloadavg()[0])
    rows = []
    for name, step in steps.items():
        with CountCollectives() as c:
            step()
        ts = times[name]
        rows.append(dict(name=name, median_s=statistics.median(ts), min_s=min(ts),
                         sent_bytes=c.sent, received_bytes=c.received, collectives=c.calls))
    rows.append(dict(name="__load__", loadavg_1min_per_round=load))
    if rank == 0:
        with open(out, "w") as f:
            json.dump(rows, f)
    dist.destroy_process_group()


def _fmt_bytes(b):
    for unit, s in (("MB", 1e6), ("kB", 1e3)):
        if b >= s:
            return f"{b / s:.3g} {unit}"
    return f"{b} B"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--classes", type=int, default=32000)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--eps", type=float, default=0.1)
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--json")
    args = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = args.json or "/tmp/labelsmooth_ext_bench_distributed.json"
    mp.spawn(_worker, args=(args.world, port, args, out), nprocs=args.world)
    with open(out) as f:
        rows = json.load(f)
    load = next(r for r in rows if r["name"] == "__load__")["loadavg_1min_per_round"]
    rows = [r for r in rows if r["name"] != "__load__"]
    base = next(r for r in rows if r["name"].startswith("gather"))
    fused = rows[0]
    floor = next(r for r in rows if r["name"].startswith("floor"))
    print(f"N={args.rows} K={args.classes} float32, {args.world} gloo ranks (1 thread each), "
          f"label_smoothing={args.eps}, forward + backward; torch {torch.__version__}")
    print(f"1-minute load average per round: {', '.join(f'{v:.1f}' for v in load)} "
          f"({os.cpu_count()} CPUs)")
    print("| method | median ms | min ms | gather / it | it / fused | it / floor | sent / rank | "
          "received / rank | collectives |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['median_s'] * 1e3:.1f} | {r['min_s'] * 1e3:.1f} | "
              f"{base['median_s'] / r['median_s']:.2f}x | {r['median_s'] / fused['median_s']:.2f}x | "
              f"{r['median_s'] / floor['median_s']:.2f}x | {_fmt_bytes(r['sent_bytes'])} | "
              f"{_fmt_bytes(r['received_bytes'])} | {r['collectives']} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "torch": torch.__version__, "cpu_count": os.cpu_count(),
                       "loadavg_1min_per_round": load, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
