"""What the compiled CUDA kernels would do on a GPU, read from their machine code (no GPU needed).

Builds nothing: reads the library that is already built (labelsmooth_ext/_C*.so, a CUDA build)
with cuobjdump (--dump-resource-usage and -sass) and prints, for every kernel and architecture:
registers, threads per block, blocks per SM, 16-byte loads in flight per thread in each pass,
bytes in flight per SM and a predicted fraction of HBM bandwidth.

    python bench/sass_report.py [--lib PATH] [--arch sm_90] [--sass-out DIR]

Loads in flight are counted in the SASS: walking a pass's instructions in order, a 16-byte
global load (LDG.E.128 / LDG.E.ENL2.256 ...) is "in flight" from its issue until the first
instruction that reads one of its destination registers. The largest number in flight at once
is reported for the straight-line part of the pass (the register-cached packs) and for the body
of each loop (the packs beyond the cache, read in a loop). Pass 1 is the code before the row's
reduction (the first SHFL), pass 2 the code after the last SHFL / BAR.

MODEL (stated, not measured; every figure it prints is a prediction):
  Little's law: a multiprocessor keeps B bytes of loads in flight; with a memory latency L under
  load it draws B / L. Over S multiprocessors the read bandwidth is min(peak, S * B / L).
    H100 SXM (sm_90): 132 SMs, peak 3.35 TB/s, latency under load 0.80 us  (need 20.3 KB / SM)
    A100 SXM (sm_80): 108 SMs, peak 2.04 TB/s, latency under load 0.60 us  (need 11.3 KB / SM)
  Bytes in flight per SM = loads in flight per thread x 16 B x threads per block x blocks per SM
  (a thread's loads in flight are capped by the packs of the row it holds: small rows hold few).
  A row of the fused forward (logits read once, gradient written once) is predicted as:
    pass 1: the cached packs at the straight-line depth, the others at the loop depth;
    pass 2: gradient stores at the store rate (taken as peak: stores do not wait for a reply),
            re-read of the uncached packs from L2 at the pass-2 loop depth with an L2 latency of
            0.30 us (as Little's law; L2 bandwidth taken as unlimited);
    between rows, with one block per SM: the SM reads nothing while a row reduces and the next
            block starts and waits for its first loads: one latency + 0.30 us (reduction,
            barrier, block launch) per row; with two or more blocks per SM the others cover it;
  fraction of the floor = (bytes read + bytes written) / peak / predicted time.
  Not modelled: instruction issue limits, DRAM page effects, L2 capacity (fp32 at K = 128256
  overflows it: issue 10 item 3), the pass-2 L2 re-read overlapping the stores.
  Probability targets (ce_prob_kernel): logits + targets read twice from HBM, gradient written.
  Every other kernel (tensor-parallel passes, bce, the backward scale) as a stream: the fraction of
  peak its loads in flight allow, min(1, SMs x bytes in flight per SM / latency / peak).
  Blocks per SM: 65536 registers per SM, allocated per warp in units of 256; at most 64 warps,
  32 blocks and 2048 threads per SM; shared memory 164 KB (sm_80) / 228 KB (sm_90).
"""
from __future__ import annotations

import argparse
import glob
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

GPUS = {  # name: (arch, SMs, peak bytes/s, latency s under load, shared bytes per SM)
    "H100": ("sm_90", 132, 3.35e12, 0.80e-6, 228 * 1024),
    "A100": ("sm_80", 108, 2.039e12, 0.60e-6, 164 * 1024),
}
L2_LATENCY = 0.30e-6
ROW_GAP = 0.30e-6  # reduction + barrier + block launch between two rows of one SM (plus one latency)
REGS_PER_SM, REG_UNIT, MAX_WARPS, MAX_BLOCKS, MAX_THREADS = 65536, 256, 64, 32, 2048

# Shapes the prediction is printed for: (label, dtype bytes, K).
SHAPES = [("bf16 K=128256", 2, 128256), ("fp32 K=128256", 4, 128256), ("fp32 K=32000", 4, 32000),
          ("bf16 K=32000", 2, 32000), ("fp32 K=1000", 4, 1000), ("bf16 K=100", 2, 100), ("fp32 K=10", 4, 10)]
# Few rows (issue 10 item 4): (label, dtype bytes, K, N) for the split kernels against one block per row.
SPLIT_SHAPES = [("bf16 N=16 K=256000", 2, 256000, 16), ("fp32 N=4 K=128256", 4, 128256, 4),
                ("bf16 N=64 K=128256", 2, 128256, 64)]
# Probability targets (item 9): (label, logits bytes, target bytes, K).
PROB_SHAPES = [("bf16+fp32 t K=128256", 2, 4, 128256), ("fp32 K=32000", 4, 4, 32000), ("bf16 K=1000", 2, 2, 1000)]


def find_cuobjdump():
    candidates = [shutil.which("cuobjdump")]
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home:
            candidates.append(os.path.join(home, "bin", "cuobjdump"))
    spec = importlib.util.find_spec("triton")
    if spec and spec.origin:  # triton (a torch dependency on Linux) ships one
        candidates.append(str(Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "cuobjdump"))
    return next((c for c in candidates if c and os.path.isfile(c) and os.access(c, os.X_OK)), None)


def library_path():
    spec = importlib.util.find_spec("labelsmooth_ext._C")
    if spec and spec.origin:
        return spec.origin
    here = Path(__file__).resolve().parent.parent / "labelsmooth_ext"
    found = sorted(glob.glob(str(here / "_C*.so")))
    return found[0] if found else None


def demangle(names):
    tool = shutil.which("c++filt")
    if not tool or not names:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def short_name(demangled):
    """ce_forward_kernel<float, 512, 1, 8> from the full demangled signature."""
    s = re.sub(r"labelsmooth_ext::cuda::|c10::", "", demangled)
    s = re.sub(r"\(.*\)$", "", s)
    return re.sub(r"^void ", "", s).strip()


def parse_resource_usage(text):
    """{(arch, kernel): {"REG": n, "STACK": n, "SHARED": n, "LOCAL": n}} from --dump-resource-usage."""
    usage, arch, fn = {}, None, None
    for line in text.splitlines():
        m = re.search(r"arch = (sm_\d+)", line)
        if m:
            arch = m.group(1)
            continue
        m = re.search(r"Function ([^:\s]+):", line)
        if m:
            fn = m.group(1)
            continue
        if fn and "REG:" in line:
            usage[(arch, fn)] = {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", line)}
            fn = None
    return usage


@dataclass
class Insn:
    addr: int
    op: str          # opcode with modifiers, e.g. LDG.E.128.CONSTANT
    dst: list        # registers written
    src: list        # registers read
    target: int | None = None  # branch target address


@dataclass
class Kernel:
    arch: str
    name: str
    insns: list = field(default_factory=list)


_INSN = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)\s*(.*?)\s*;")


def _regs(operand):
    """General registers named by one operand: R4 -> [4]; [R2.64+0x10] -> [2, 3]."""
    out = []
    for m in re.finditer(r"\bR(\d+)(\.64)?\b", operand):
        r = int(m.group(1))
        out += [r, r + 1] if m.group(2) else [r]
    return out


def _width_regs(op):
    for bits, n in ((".256", 8), (".128", 4), (".64", 2)):
        if bits in op:
            return n
    return 1


_NO_DST = ("ST", "STG", "STS", "STL", "RED", "BRA", "BAR", "EXIT", "RET", "BSYNC", "BSSY", "WARPSYNC",
           "CALL", "JMP", "NOP", "MEMBAR", "ISETP", "FSETP", "DSETP", "HSETP2", "PLOP3", "R2UR", "VOTEU")


def parse_sass(text):
    """[Kernel] from cuobjdump -sass output (one entry per arch and function)."""
    kernels, arch, cur = [], None, None
    for line in text.splitlines():
        m = re.search(r"arch = (sm_\d+)", line)
        if m:
            arch = m.group(1)
            continue
        m = re.search(r"Function : (\S+)", line)
        if m:
            cur = Kernel(arch, m.group(1))
            kernels.append(cur)
            continue
        m = _INSN.search(line)
        if not (m and cur):
            continue
        addr, op, args = int(m.group(1), 16), m.group(3), m.group(4)
        operands = [a.strip() for a in re.split(r",(?![^\[]*\])", args)] if args else []
        base = op.split(".")[0]
        target = None
        if base in ("BRA", "BSSY", "CALL") and operands:
            t = re.search(r"0x([0-9a-f]+)", operands[-1])
            target = int(t.group(1), 16) if t else None
        if base.startswith("LD") or base in ("S2R", "S2UR", "SHFL", "ATOMG", "ATOMS"):
            # first operand written (width from the opcode), the rest read
            dst = []
            if operands and re.match(r"R\d+$", operands[0].split(".")[0] if "[" not in operands[0] else ""):
                r = int(operands[0][1:].split(".")[0])
                dst = list(range(r, r + (_width_regs(op) if base.startswith("LD") else 1)))
            src = [r for o in operands[1:] for r in _regs(o)]
        elif base in _NO_DST or base.startswith("ST"):
            dst, src = [], [r for o in operands for r in _regs(o)]
        else:
            first = operands[0] if operands else ""
            dst = _regs(first) if re.match(r"R\d+", first) else []
            if dst and (".64" in op or base in ("DADD", "DMUL", "DFMA", "IMAD.WIDE") or ".WIDE" in op):
                dst = [dst[0], dst[0] + 1]
            src = [r for o in operands[1:] for r in _regs(o)]
        cur.insns.append(Insn(addr, op, dst, src, target))
    return kernels


def is_vec_load(op):
    """A global load of 16 bytes or more."""
    return op.startswith("LDG") and (".128" in op or ".256" in op)


def max_in_flight(insns):
    """Largest number of 16-byte-or-wider global loads issued and not yet consumed, walking in order."""
    pending, best = {}, 0  # load index -> its destination registers
    for k, ins in enumerate(insns):
        used = set(ins.src)
        for key in [key for key, regs in pending.items() if used & regs]:
            del pending[key]
        # a register overwritten before it is read also ends that load's life
        written = set(ins.dst)
        if not is_vec_load(ins.op):
            for key in [key for key, regs in pending.items() if written & regs]:
                del pending[key]
        if is_vec_load(ins.op):
            pending[k] = set(ins.dst)
            best = max(best, len(pending))
    return best


def load_bytes(op):
    """Bytes a global load moves per thread (LDG.E.128: 16, LDG.E.64: 8, LDG.E.U16: 2, LDG.E: 4)."""
    if not op.startswith("LDG"):
        return 0
    for tag, n in ((".256", 32), (".128", 16), (".64", 8), (".U16", 2), (".S16", 2), (".U8", 1), (".S8", 1)):
        if tag in op:
            return n
    return 4


def max_bytes_in_flight(insns):
    """Largest number of bytes of global loads (any width) issued and not yet consumed."""
    pending, best = {}, 0
    for k, ins in enumerate(insns):
        used = set(ins.src)
        for key in [key for key, (regs, _) in pending.items() if used & regs]:
            del pending[key]
        n = load_bytes(ins.op)
        if not n:
            written = set(ins.dst)
            for key in [key for key, (regs, _) in pending.items() if written & regs]:
                del pending[key]
        else:
            pending[k] = (set(ins.dst), n)
            best = max(best, sum(b for _, b in pending.values()))
    return best


def loop_bytes_in_flight(insns):
    """max_bytes_in_flight over the loop bodies (the whole code when it has no loop loads)."""
    best = 0
    for a, b in loops(insns):
        body = insns[a:b + 1]
        if any(load_bytes(i.op) for i in body):
            best = max(best, max_bytes_in_flight(body))
    return best or max_bytes_in_flight(insns)


@dataclass
class PassStats:
    loads: int = 0        # 16-byte loads in the pass's code
    straight: int = 0     # most in flight at once outside loops
    loop: int = 0         # most in flight at once inside the deepest-loaded loop body (0: no loop loads)


def loops(insns):
    """(start, end) index ranges of loop bodies: a backward branch and its target."""
    index = {ins.addr: k for k, ins in enumerate(insns)}
    out = []
    for k, ins in enumerate(insns):
        if ins.op.startswith("BRA") and ins.target is not None and ins.target <= ins.addr and ins.target in index:
            out.append((index[ins.target], k))
    return out


def pass_stats(insns):
    in_loop = set()
    stats = PassStats(loads=sum(is_vec_load(i.op) for i in insns))
    for a, b in loops(insns):
        body = insns[a:b + 1]
        if any(is_vec_load(i.op) for i in body):
            stats.loop = max(stats.loop, max_in_flight(body))
        in_loop.update(range(a, b + 1))
    straight = [ins for k, ins in enumerate(insns) if k not in in_loop]
    stats.straight = max_in_flight(straight)
    return stats


def split_passes(insns):
    """(pass 1, pass 2): code before the row reduction's first shuffle; code after the last shuffle /
    barrier that precedes the first global store after it (pass 2 starts with the gradient stores;
    the compiler may place other shuffles, e.g. a divergent copy, at the end of the function)."""
    sync = [k for k, ins in enumerate(insns) if ins.op.startswith(("SHFL", "BAR"))]
    if not sync:
        return insns, []
    store = next((k for k in range(sync[0], len(insns)) if insns[k].op.startswith("STG")), len(insns))
    last = max(k for k in sync if k < store)
    return insns[:sync[0]], insns[last + 1:]


def kernel_config(name):
    """(threads per block, row threads, cache packs) from the template arguments; elementwise kernels: 256."""
    m = re.search(r"ce_forward_kernel<([^,]+), (\d+), (\d+), (\d+)>", name)
    if m:
        return int(m.group(2)) * int(m.group(3)), int(m.group(2)), int(m.group(4)), m.group(1)
    m = re.search(r"ce_prob_kernel<([^,]+), ([^,]+), (\d+), (\d+)>", name)
    if m:  # no register cache
        return int(m.group(3)) * int(m.group(4)), int(m.group(3)), 0, m.group(1)
    m = re.search(r"vp_\w+_kernel<([^,]+), (\d+), (\d+)>", name)
    if m:  # tensor parallel local passes: ROW_THREADS x ROWS_PER_BLOCK, no register cache
        return int(m.group(2)) * int(m.group(3)), int(m.group(2)), 0, m.group(1)
    m = re.search(r"ce_split_\w+_kernel<([^,]+), (\d+)>", name)
    if m:
        return int(m.group(2)), int(m.group(2)), 0, m.group(1)
    m = re.search(r"_kernel<([^,>]+)", name)
    return 256, None, None, (m.group(1) if m else "?")


def blocks_per_sm(regs, threads, shared, smem_per_sm):
    warps = (threads + 31) // 32
    regs_per_warp = -(-max(regs, 1) * 32 // REG_UNIT) * REG_UNIT
    by_regs = (REGS_PER_SM // regs_per_warp) // warps
    by_warps = MAX_WARPS // warps
    by_threads = MAX_THREADS // threads
    by_smem = smem_per_sm // shared if shared else MAX_BLOCKS
    return max(0, min(by_regs, by_warps, by_threads, by_smem, MAX_BLOCKS))


def dtype_bytes(t):
    return {"float": 4, "double": 8, "Half": 2, "BFloat16": 2}.get(t.strip(), 4)


def predict_row(gpu, elem, K, row_threads, cache, threads, blocks, p1, p2):
    """Predicted fraction of the floor (read once + write once at peak) for the fused forward + gradient."""
    _, sms, peak, lat, _ = GPUS[gpu]
    packs = -(-K * elem // 16)
    cached = min(packs, cache * row_threads)
    uncached = packs - cached
    rows_per_block = threads // row_threads

    def bw(depth, latency):
        inflight = depth * 16 * threads * blocks  # bytes per SM
        return min(peak, sms * inflight / latency) if inflight else peak * 1e-3

    row_bytes = K * elem
    # per row, all SMs share the traffic: time for one row-wave, normalised per byte
    # a thread cannot have more loads in flight than it has packs of the row
    per_thread = -(-cached // row_threads)
    t = (cached * 16) / bw(min(max(p1.straight, 1), per_thread), lat)
    t += (uncached * 16) / bw(max(p1.loop, 1), lat)
    t += row_bytes / peak  # gradient stores
    if uncached:
        t += (uncached * 16) / bw(max(p2.loop, 1), L2_LATENCY)
    if blocks == 1:  # each SM handles its rows one after the other: the gap between them is exposed
        t += (lat + ROW_GAP) / (sms * rows_per_block)
    return (2 * row_bytes / peak) / t


def _bw(gpu, depth, threads, blocks, latency, sms_busy=None):
    _, sms, peak, _, _ = GPUS[gpu]
    inflight = depth * 16 * threads * blocks
    return min(peak, (sms_busy or sms) * inflight / latency) if inflight else peak * 1e-3


def split_count(N, row_bytes, sms, chunk=256 * 16 * 4):
    """csrc/cuda/dispatch.cuh split_count (chunks per row; 1: one block per row)."""
    if N <= 0 or N >= sms or row_bytes < 2 * chunk:
        return 1
    return max(1, min(-(-2 * sms // N), row_bytes // chunk, 1024))


def predict_split(gpu, elem, K, N, stats, grad):
    """Predicted fraction of the floor for N rows split over blocks: pass 1 (stats kernel) from HBM
    over the SMs its grid fills, pass 2 (grad kernel) re-reads from L2 and writes the gradient.
    Launch overheads (a few us per kernel) are not charged."""
    _, sms, peak, lat, _ = GPUS[gpu]
    row_bytes = K * elem
    splits = split_count(N, row_bytes, sms)
    blocks = splits * N
    per_sm = min(stats["blocks"], -(-blocks // sms))
    busy = min(sms, blocks)
    t = N * row_bytes / _bw(gpu, max(stats["p1"].loop, 1), stats["threads"], per_sm, lat, busy)
    per_sm2 = min(grad["blocks"], -(-blocks // sms))
    t += N * row_bytes / _bw(gpu, max(grad["p1"].loop, 1), grad["threads"], per_sm2, L2_LATENCY, busy)
    t += N * row_bytes / peak
    return splits, (2 * N * row_bytes / peak) / t


def predict_unsplit(gpu, elem, K, N, fwd):
    """The same N rows with one block per row (ce_forward_kernel): only min(N, SMs) SMs read."""
    _, sms, peak, lat, _ = GPUS[gpu]
    busy = min(sms, N)
    f = predict_row(gpu, elem, K, fwd["row_threads"], fwd["cache"], fwd["threads"], 1, fwd["p1"], fwd["p2"])
    return f * busy / sms


def predict_prob(gpu, elem, telem, K, r):
    """Probability targets: logits + targets read in pass 1 (HBM) and again in pass 2 (HBM: the rows
    in flight x (z + t) exceed the L2 at large K; charged from HBM at every K), gradient written."""
    _, sms, peak, lat, _ = GPUS[gpu]
    row = K * (elem + telem)
    t = row / _bw(gpu, max(r["p1"].loop, 1), r["threads"], r["blocks"], lat)
    t += row / _bw(gpu, max(r["p2"].loop, 1), r["threads"], r["blocks"], lat)
    t += K * elem / peak
    return (K * (2 * elem + telem) / peak) / t


def collect(lib, tool):
    usage = parse_resource_usage(subprocess.run([tool, "--dump-resource-usage", lib], capture_output=True,
                                                text=True, check=True).stdout)
    sass = subprocess.run([tool, "-sass", lib], capture_output=True, text=True, check=True).stdout
    kernels = parse_sass(sass)
    names = demangle(sorted({k.name for k in kernels} | {fn for _, fn in usage}))
    rows = []
    for k in kernels:
        u = usage.get((k.arch, k.name), {})
        full = short_name(names.get(k.name, k.name))
        threads, row_threads, cache, dtype = kernel_config(full)
        p1_code, p2_code = split_passes(k.insns) if ("ce_forward" in full or "ce_prob" in full) else (k.insns, [])
        rows.append(dict(arch=k.arch, name=full, mangled=k.name, regs=u.get("REG", 0), stack=u.get("STACK", 0),
                         local=u.get("LOCAL", 0), shared=u.get("SHARED", 0), threads=threads,
                         row_threads=row_threads, cache=cache, dtype=dtype, p1=pass_stats(p1_code),
                         p2=pass_stats(p2_code), insns=k.insns))
    return rows, sass


def report(rows, archs=None):
    lines = ["MODEL" + __doc__.split("MODEL", 1)[1].rstrip(), ""]
    hdr = (f"{'arch':6} {'kernel':44} {'reg':>4} {'thr':>4} {'blk/SM':>6} {'p1 str':>6} {'p1 loop':>7} "
           f"{'p2 loop':>7} {'KB/SM p1':>8}")
    lines += [hdr, "-" * len(hdr)]
    gpu_of = {v[0]: (g, v) for g, v in GPUS.items()}
    for r in sorted(rows, key=lambda r: (r["arch"], r["name"])):
        if archs and r["arch"] not in archs:
            continue
        g = gpu_of.get(r["arch"])
        smem = g[1][4] if g else 228 * 1024
        r["blocks"] = blocks_per_sm(r["regs"], r["threads"], r["shared"], smem)
        kb = r["p1"].straight * 16 * r["threads"] * r["blocks"] / 1024
        spill = "  SPILL" if r["stack"] or r["local"] else ""
        lines.append(f"{r['arch']:6} {r['name'][:44]:44} {r['regs']:>4} {r['threads']:>4} {r['blocks']:>6} "
                     f"{r['p1'].straight:>6} {r['p1'].loop:>7} {r['p2'].loop:>7} {kb:>8.1f}{spill}")
    lines.append("")
    lines.append("p1 str: 16-byte loads in flight per thread in pass 1 outside loops (the register cache);"
                 " p1/p2 loop: in flight inside pass 1's / pass 2's loops; KB/SM p1: p1 str x 16 B x threads"
                 " x blocks/SM.")
    lines.append("")
    lines.append("Predicted fraction of the floor (one read + one write at peak) for the fused forward + "
                 "gradient, per shape (PREDICTION from the model above, not a measurement):")
    for gpu, (arch, *_rest) in GPUS.items():
        if archs and arch not in archs:
            continue
        for label, elem, K in SHAPES:
            r = pick_forward(rows, arch, elem, K)
            if not r:
                continue
            f = predict_row(gpu, elem, K, r["row_threads"], r["cache"], r["threads"], r["blocks"], r["p1"], r["p2"])
            _, sms, peak, lat, _ = GPUS[gpu]
            need = peak * lat / sms / 1024
            kb = r["p1"].straight * 16 * r["threads"] * r["blocks"] / 1024
            kbl = r["p1"].loop * 16 * r["threads"] * r["blocks"] / 1024
            lines.append(f"  {gpu} {label:14} {r['name'][:40]:40} in flight {kb:5.1f} KB/SM cached, "
                         f"{kbl:5.1f} KB/SM loop (need {need:.1f}): predicted {100 * f:5.1f}% of floor")
    lines.append("")
    lines.append("Few rows, large rows (split over blocks, issue 10 item 4; PREDICTION, launch overheads not charged):")
    for gpu, (arch, *_rest) in GPUS.items():
        if archs and arch not in archs:
            continue
        for label, elem, K, N in SPLIT_SHAPES:
            stats = _pick(rows, arch, "ce_split_stats_kernel", elem)
            grad = _pick(rows, arch, "ce_split_grad_kernel", elem)
            fwd = pick_forward(rows, arch, elem, K)
            if not (stats and grad and fwd):
                continue
            splits, f = predict_split(gpu, elem, K, N, stats, grad)
            lines.append(f"  {gpu} {label:20} {splits:3d} chunks per row: predicted {100 * f:5.1f}% of floor "
                         f"(one block per row: {100 * predict_unsplit(gpu, elem, K, N, fwd):5.1f}%)")
    lines.append("")
    lines.append("Probability targets (ce_prob_kernel, item 9; PREDICTION; floor = read z + t once, write g once):")
    for gpu, (arch, *_rest) in GPUS.items():
        if archs and arch not in archs:
            continue
        for label, elem, telem, K in PROB_SHAPES:
            threads = 32 if K * elem <= prob_warp_row_bytes() else 256
            r = next((r for r in rows if r["arch"] == arch and "ce_prob_kernel" in r["name"]
                      and r["row_threads"] == threads and dtype_bytes(r["dtype"]) == elem
                      and (elem != 2 or "BFloat16" in r["dtype"])
                      and re.search(r"ce_prob_kernel<BFloat16, float," if telem == 4 and elem == 2 else
                                    r"ce_prob_kernel<([^,]+), \1,", r["name"])), None)
            if not r:
                continue
            lines.append(f"  {gpu} {label:22} {r['name'][:44]:44} p1 loop {r['p1'].loop} p2 loop {r['p2'].loop}: "
                         f"predicted {100 * predict_prob(gpu, elem, telem, K, r):5.1f}% of floor")
    lines.append("")
    lines.append("Every other kernel, as a stream (PREDICTION: fraction of HBM peak its loads in flight allow by"
                 " Little's law, min(1, SMs x bytes in flight per SM / latency / peak); bytes in flight per thread"
                 " = the most load bytes (any width) issued before their first use in a loop body):")
    covered = ("ce_forward_kernel", "ce_prob_kernel", "ce_split_stats_kernel", "ce_split_grad_kernel")
    for gpu, (arch, sms, peak, lat, _smem) in GPUS.items():
        if archs and arch not in archs:
            continue
        for r in sorted(rows, key=lambda r: r["name"]):
            if r["arch"] != arch or any(c in r["name"] for c in covered):
                continue
            per_thread = loop_bytes_in_flight(r["insns"])
            per_sm = per_thread * r["threads"] * r["blocks"]
            f = min(1.0, sms * per_sm / lat / peak)
            narrow = "" if any(is_vec_load(i.op) for i in r["insns"]) else "  (no 16-byte loads)"
            lines.append(f"  {gpu} {r['name'][:44]:44} {per_thread:4d} B/thread x {r['threads']} x {r['blocks']} "
                         f"= {per_sm / 1024:6.1f} KB/SM in flight: predicted {100 * f:5.1f}% of peak{narrow}")
    return "\n".join(lines)


def _pick(rows, arch, kernel, elem):
    return next((r for r in rows if r["arch"] == arch and kernel in r["name"] and dtype_bytes(r["dtype"]) == elem
                 and (elem != 2 or "BFloat16" in r["dtype"])), None)


DISPATCH_HEADER = Path(__file__).resolve().parents[1] / "csrc" / "cuda" / "dispatch.cuh"


PROB_HEADER = Path(__file__).resolve().parents[1] / "csrc" / "cuda" / "prob_kernels.cuh"


def prob_warp_row_bytes(header=PROB_HEADER):
    """dispatch_prob's threshold (kProbWarpRowBytes in csrc/cuda/prob_kernels.cuh): rows up to this
    many bytes of logits take a warp, longer ones a 256-thread block."""
    m = re.search(r"kProbWarpRowBytes\s*=\s*(\d+)", Path(header).read_text())
    if not m:
        raise RuntimeError(f"no kProbWarpRowBytes in {header}")
    return int(m.group(1))


def row_kernel_limits(header=DISPATCH_HEADER):
    """[(threads per row, max row bytes with a 4-pack big cache, with a 6-pack one)] from the
    kRowKernelLimits table of csrc/cuda/dispatch.cuh (dispatch_forward's thresholds: one place)."""
    text = Path(header).read_text()
    m = re.search(r"kRowKernelLimits\[\]\s*=\s*\{(.*?)\n\};", text, re.S)
    if not m:
        raise RuntimeError(f"no kRowKernelLimits table in {header}")
    rows = [tuple(int(v) for v in e) for e in re.findall(r"\{(\d+),\s*(\d+),\s*(\d+)\}", m.group(1))]
    if not rows:
        raise RuntimeError(f"kRowKernelLimits in {header} has no entries")
    return rows


def big_row_cache_4(header=DISPATCH_HEADER):
    """The dtypes whose big_row_cache (csrc/cuda/dispatch.cuh) is 4 packs: the types its body names."""
    text = Path(header).read_text()
    m = re.search(r"constexpr int big_row_cache\(\)\s*\{\s*return (.*?)\? 4 : 6;", text, re.S)
    if not m:
        raise RuntimeError(f"no big_row_cache in {header}")
    names = re.findall(r"is_same_v<scalar_t,\s*(?:c10::)?(\w+)>", m.group(1))
    return {n for n in names}


def dispatch(dtype, row_bytes, limits=None):
    """Threads per row dispatch_forward picks for a row of row_bytes (from its table)."""
    big4 = dtype.strip() in big_row_cache_4()  # big_row_cache<scalar_t>() == 4
    for threads, lim4, lim6 in (limits or row_kernel_limits()):
        if row_bytes <= (lim4 if big4 else lim6):
            return threads
    return 512


def pick_forward(rows, arch, elem, K):
    """The ce_forward_kernel instance dispatch_forward runs for this row (None if not in the library)."""
    cands = [r for r in rows if r["arch"] == arch and "ce_forward_kernel" in r["name"]
             and dtype_bytes(r["dtype"]) == elem and (elem != 2 or "BFloat16" in r["dtype"])]
    if not cands:
        return None
    row_threads = dispatch(cands[0]["dtype"], K * elem)
    # an older library without that instance: the next larger one (as its dispatch did)
    match = sorted((r for r in cands if r["row_threads"] >= row_threads), key=lambda r: r["row_threads"])
    return match[0] if match else None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lib", help="the built library (default: labelsmooth_ext._C as imported)")
    ap.add_argument("--arch", action="append", help="only this arch (sm_80, sm_90); repeatable")
    ap.add_argument("--sass-out", help="also write the full SASS to this file")
    args = ap.parse_args(argv)
    lib = args.lib or library_path()
    tool = find_cuobjdump()
    if not lib or not tool:
        sys.exit(f"need the built library ({lib}) and cuobjdump ({tool})")
    rows, sass = collect(lib, tool)
    if not rows:
        sys.exit(f"{lib} holds no CUDA kernels (built with LABELSMOOTH_EXT_CPU_ONLY?)")
    if args.sass_out:
        Path(args.sass_out).write_text(sass)
    print(f"library: {lib}")
    print(report(rows, set(args.arch) if args.arch else None))


if __name__ == "__main__":
    main()
