"""Command line: build info and a quick comparison with PyTorch (default), the benchmark report."""
import argparse

import torch
import torch.nn.functional as F

from . import benchmark, build_info, cross_entropy


def info_command(args):
    info = build_info()
    print("labelsmooth_ext build:")
    for k, v in info.items():
        print(f"  {k}: {v}")
    print(f"  torch at run time: {torch.__version__}; CUDA device: "
          f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
    device = "cuda" if torch.cuda.is_available() and info["cuda"] else "cpu"
    n, k = args.rows, args.classes
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, k, generator=g).to(device)
    t = torch.randint(0, k, (n,), generator=g).to(device)

    def run(fn):
        def step():
            xx = x.detach().requires_grad_()
            loss = fn(xx, t, label_smoothing=0.1)
            loss.backward()
            return loss, xx.grad
        return step

    ours_loss, ours_grad = (t.detach() for t in run(cross_entropy)())
    ref_loss, ref_grad = (t.detach() for t in run(F.cross_entropy)())
    t_ours = min(benchmark.time_call(run(cross_entropy), device, reps=5))
    t_ref = min(benchmark.time_call(run(F.cross_entropy), device, reps=5))
    print(f"\nforward + backward, N={n}, K={k}, float32, label_smoothing=0.1, on {device}:")
    print(f"  loss: labelsmooth_ext {float(ours_loss):.6f}  torch {float(ref_loss):.6f}  "
          f"(|diff| {abs(float(ours_loss) - float(ref_loss)):.2e}, max |grad diff| "
          f"{float((ours_grad - ref_grad).abs().max()):.2e})")
    print(f"  time: labelsmooth_ext {t_ours * 1e3:.1f} ms  torch eager {t_ref * 1e3:.1f} ms  "
          f"-> {t_ref / t_ours:.2f}x faster")
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m labelsmooth_ext", description=__doc__)
    sub = parser.add_subparsers(dest="command")
    p_info = sub.add_parser("info", help="build info and a quick comparison with PyTorch (default)")
    for p in (parser, p_info):
        p.add_argument("--rows", type=int, default=4096)
        p.add_argument("--classes", type=int, default=32000)
    p_bench = sub.add_parser("bench", help="benchmark report: ours vs PyTorch eager and compiled")
    from . import demo

    benchmark.add_arguments(p_bench)
    from . import linear_benchmark

    p_lin = sub.add_parser("bench-linear", help="fused linear + cross-entropy vs PyTorch: time and peak memory")
    linear_benchmark.add_arguments(p_lin)
    p_demo = sub.add_parser("demo", help="label smoothing on real data: accuracy, calibration, logit gap, pictures")
    demo.add_arguments(p_demo)
    args = parser.parse_args(argv)
    if args.command == "bench":
        return benchmark.report_command(args)
    if args.command == "bench-linear":
        return linear_benchmark.report_command(args)
    if args.command == "demo":
        return demo.demo_command(args)
    return info_command(args)
