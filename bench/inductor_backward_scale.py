"""Issue 10 item 7b: what torch.compile's backward does with the incoming gradient's scaling.

Compiles (inductor, CPU: no GPU here; the CPU takes _ops.py's Python autograd for the ext and
probability-target operators, as every CUDA operator does) a step whose logits come from a matmul followed by a
pointwise op (a temperature, as a stand-in for an upcast or a softcap computed in PyTorch), runs
forward + backward, and counts in the generated backward code: calls of the opaque
labelsmooth_ext::ce_backward, inductor's own fused kernels, and the N x K passes between the
loss and the matmul. Run with the scaling as it is in labelsmooth_ext/_ops.py (ATen mul under
compile) and, for comparison, with the opaque operator (--opaque).

    python bench/inductor_backward_scale.py [--opaque] [--show]

Pass counting: every generated pointwise kernel (cpp_fused_* on the CPU, triton_* on a GPU) and
every ce_backward call that reads or writes an N x K buffer is one full read + write of the
gradient; the matmuls (extern_kernels.mm) read it once more in either case.
"""
from __future__ import annotations

import argparse
import re

import torch
from torch._inductor.utils import run_fw_bw_and_get_code

import labelsmooth_ext as L
from labelsmooth_ext import _ops


def backward_passes(target="ext", reduction="mean", opaque=False, N=64, D=32, K=1000):
    """Compiles, runs forward + backward once and reads the generated backward code: a dict with
    ce_backward (opaque calls), kernels (generated), nk_kernels (those looping over N x K
    elements), mm (extern matmuls), passes (N x K passes between the loss and the matmuls) and
    same (gradients equal to eager's), and the code itself."""
    # a fresh compile each run (the FX graph / AOTAutograd caches key on the forward graph, not on
    # the Python backward that produced the cached backward graph)
    torch._inductor.config.fx_graph_cache = False
    torch._functorch.config.enable_autograd_cache = False
    saved = _ops._scale_traced
    if opaque:  # the state before item 7b: the custom operator under compile as well
        _ops._scale_traced = lambda op, grad, go, red: _ops._functional(op, grad, go, red)
    try:
        torch.manual_seed(0)
        h = torch.randn(N, D, requires_grad=True)
        W = torch.randn(D, K, requires_grad=True)
        t = torch.randint(0, K, (N,)) if target != "prob" else torch.softmax(torch.randn(N, K), 1)
        extra = dict(z_loss=1e-4) if target == "ext" else {}

        def step(h, W, t):
            logits = (h @ W) * 0.5  # pointwise consumer of the loss gradient in the backward
            loss = L.cross_entropy(logits, t, label_smoothing=0.1, reduction=reduction, **extra)
            return loss * 3.0  # an incoming gradient that is not 1 (then .sum().backward())

        torch._dynamo.reset()
        compiled = torch.compile(step, fullgraph=True)
        _, codes = run_fw_bw_and_get_code(lambda: compiled(h, W, t))
    finally:
        _ops._scale_traced = saved
        torch._dynamo.reset()
    bw = codes[-1]
    ce_calls = len(re.findall(r"= torch\.ops\.labelsmooth_ext\.ce_backward\.default\(", bw))
    # generated kernels and whether their loops cover N x K elements (the CPU's C++ kernels)
    bodies = dict(re.findall(r"(cpp_fused_\w+) = async_compile\.cpp_pybinding\(.*?r\'\'\'(.*?)\'\'\'", bw, re.S))
    # (a flat loop to N * K, or a nested one whose inner bound is K)
    nk = sorted(k for k in bodies if re.search(rf"\b({N * K}|{K})L?\b", bodies[k]))
    mms = len(re.findall(r"extern_kernels\.mm\b", bw))
    h_ref = h.detach().clone().requires_grad_()
    W_ref = W.detach().clone().requires_grad_()
    step(h_ref, W_ref, t).sum().backward()
    same = bool(torch.allclose(h.grad, h_ref.grad, rtol=1e-5, atol=1e-6)
                and torch.allclose(W.grad, W_ref.grad, rtol=1e-5, atol=1e-6))
    return dict(ce_backward=ce_calls, kernels=sorted(bodies), nk_kernels=nk, mm=mms, passes=ce_calls + len(nk),
                same=same, code=bw)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--opaque", action="store_true", help="scale with the opaque ce_backward operator")
    ap.add_argument("--show", action="store_true", help="print the generated backward code")
    ap.add_argument("--reduction", default="mean")
    ap.add_argument("--target", choices=["ext", "prob", "index"], default="ext",
                    help="ext: class indices with z_loss (ce_forward_ext), prob: probability targets, index: "
                         "plain class indices (on the CPU its autograd is C++: csrc/cpu/autograd_cpu.cpp, "
                         "which calls ce_backward itself, so this script's change does not reach it)")
    args = ap.parse_args(argv)
    r = backward_passes(args.target, args.reduction, args.opaque)
    print(f"scaling: {'opaque ce_backward' if args.opaque else 'ATen mul (inductor-visible)'}; "
          f"target={args.target}; reduction={args.reduction}; torch {torch.__version__}")
    print(f"backward code: {r['ce_backward']} ce_backward call(s), {len(r['kernels'])} generated kernel(s) "
          f"{r['kernels']}, {r['mm']} mm call(s); gradients equal to eager: {r['same']}")
    print(f"N x K passes between the loss and the matmuls (read + write each): {r['passes']} "
          f"({r['ce_backward']} ce_backward + generated {r['nk_kernels']})")
    if args.show:
        print(r["code"])


if __name__ == "__main__":
    main()
