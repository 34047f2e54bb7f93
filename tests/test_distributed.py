"""labelsmooth_ext.distributed: vocabulary-parallel cross-entropy over torch.distributed.

Every multi-process test spawns CPU processes with the gloo backend on loopback (127.0.0.1, a
free port), runs a whole batch of cases in them (process start-up is paid once per world size,
not per case), and reports one result per case; each spawn is bounded by a timeout (join with
a timeout, then kill and fail), and each process group by a collective timeout.
Each rank checks its own results in float64 against the single-process loss of the full
(concatenated) logits: labelsmooth_ext.reference (every option) and F.cross_entropy (where it
has the option).
"""
import datetime
import inspect
import json
import math
import os
import socket
import sys
import tempfile
import time
import traceback

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

import labelsmooth_ext
from labelsmooth_ext import distributed as D
from labelsmooth_ext import reference as R

SPAWN_TIMEOUT = float(os.environ.get("LSE_DIST_TEST_TIMEOUT", "150"))
N, K = 7, 11  # K not divisible by 2 or 3

# class slices per world size: uneven ones, one with a rank holding no class, torch.chunk's
SPLITS = {
    1: {"uneven": [K], "zero": [K], "chunk": [K]},
    2: {"uneven": [3, 8], "zero": [0, K], "chunk": [6, 5]},
    3: {"uneven": [4, 0, 7], "zero": [5, 6, 0], "chunk": [4, 4, 3]},
    4: {"uneven": [1, 4, 0, 6], "zero": [0, 0, K, 0], "chunk": [3, 3, 3, 2]},
}


def _numeric_cases():
    cases = []
    for red in ("mean", "sum", "none"):
        for wmode in (None, "full", "local"):
            for eps, mode in ((0.0, "uniform"), (0.1, "uniform"), (0.2, "off_target")):
                cases.append(dict(reduction=red, weight=wmode, label_smoothing=eps,
                                  smoothing_mode=mode))
        for wmode in (None, "full"):
            cases.append(dict(reduction=red, weight=wmode, label_smoothing=0.1, z_loss=1e-2,
                              softcap=3.0))
            cases.append(dict(reduction=red, weight=wmode, label_smoothing=0.2,
                              smoothing_mode="off_target", z_loss=0.05, split="zero"))
        cases.append(dict(reduction=red, label_smoothing=0.1, split="chunk"))
        cases.append(dict(reduction=red, label_smoothing=0.1, softcap=1.5, split="zero"))
        cases.append(dict(reduction=red, label_smoothing=0.3, shape="3d", weight="local"))
        cases.append(dict(reduction=red, label_smoothing=0.1, shape="1d", weight="full"))
        for strategy_case in (dict(weight="local", label_smoothing=0.1),
                              dict(z_loss=1e-2, softcap=2.0, label_smoothing=0.2,
                                   smoothing_mode="off_target", split="zero")):
            cases.append(dict(reduction=red, strategy="allreduce", **strategy_case))
    cases += [
        dict(reduction="mean", label_smoothing=0.1, dtype="float32"),
        dict(reduction="none", label_smoothing=0.1, weight="full", dtype="bfloat16"),
        dict(reduction="mean", label_smoothing=0.1, ignore="all"),
        dict(reduction="sum", label_smoothing=0.1, rows=0),
        dict(reduction="mean", label_smoothing=0.1, rows=0),
        dict(reduction="mean", label_smoothing=0.0, special="neg_inf_slice"),
        dict(reduction="none", label_smoothing=0.0, special="neg_inf_slice", strategy="allreduce"),
        dict(reduction="none", label_smoothing=0.1, special="neg_inf_slice"),  # inf, as PyTorch
        dict(reduction="sum", label_smoothing=0.1, special="large_offset"),
        dict(reduction="mean", label_smoothing=0.1, ignore_index=3),
        dict(reduction="mean", label_smoothing=0.1, special="retain_graph"),
    ]
    return {f"c{i:02d}-" + "-".join(f"{k}={v}" for k, v in c.items()): c for i, c in enumerate(cases)}


NUMERIC = _numeric_cases()
TOL = {"float64": 1e-12, "float32": 2e-5, "bfloat16": 2e-2}


def _case_inputs(spec, world, rank):
    """The full inputs (identical on every rank: drawn from a fixed seed) and this rank's slice."""
    gen = torch.Generator().manual_seed(1234)
    dtype = getattr(torch, spec.get("dtype", "float64"))
    rows = spec.get("rows", N)
    shape = spec.get("shape", "2d")
    if shape == "3d":
        full_shape, tshape = (3, K, 4), (3, 4)
    elif shape == "1d":
        full_shape, tshape = (K,), ()
    else:
        full_shape, tshape = (rows, K), (rows,)
    x = torch.randn(full_shape, generator=gen, dtype=torch.float64) * 2.0
    ignore_index = spec.get("ignore_index", -100)
    t = torch.randint(0, K, tshape, generator=gen)
    if len(tshape) and t.numel() > 2:
        t.view(-1)[1] = ignore_index
    if spec.get("ignore") == "all":
        t.fill_(ignore_index)
    w = torch.rand(K, generator=gen, dtype=torch.float64) + 0.5
    g_none = torch.randn(tshape, generator=gen, dtype=torch.float64)
    sizes = SPLITS[world][spec.get("split", "uneven")]
    start = sum(sizes[:rank])
    sl = slice(start, start + sizes[rank])
    special = spec.get("special")
    if special == "neg_inf_slice":  # the first non-empty slice is all -inf, no target in it
        first = next(r for r in range(world) if sizes[r])
        s0 = sum(sizes[:first])
        x[:, s0:s0 + sizes[first]] = -math.inf
        if world > 1 and sizes[first] < K:
            t[(t >= s0) & (t < s0 + sizes[first])] = ignore_index
    if special == "large_offset":
        x = x + 1.0e4
    x = x.to(dtype)
    cdim = 0 if x.dim() == 1 else 1
    local = x.narrow(cdim, start, sizes[rank]).clone()
    weight = {None: None, "full": w.to(dtype), "local": w[sl].to(dtype)}[spec.get("weight")]
    return x, t, w if spec.get("weight") else None, local, weight, g_none, sl, cdim


def _kwargs(spec):
    return dict(reduction=spec.get("reduction", "mean"),
                label_smoothing=spec.get("label_smoothing", 0.0),
                smoothing_mode=spec.get("smoothing_mode", "uniform"),
                z_loss=spec.get("z_loss", 0.0), softcap=spec.get("softcap"),
                ignore_index=spec.get("ignore_index", -100))


def _close(actual, expected, tol, what):
    a, e = actual.detach().double(), expected.detach().double()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    assert torch.equal(a.isnan(), e.isnan()), f"{what}: NaN positions differ: {a} vs {e}"
    a, e = a[~a.isnan()], e[~e.isnan()]
    assert torch.equal(a.isinf(), e.isinf()) and torch.equal(a[a.isinf()], e[e.isinf()]), \
        f"{what}: infinities differ: {a} vs {e}"
    a, e = a[~a.isinf()], e[~e.isinf()]
    if a.numel():
        scale = max(float(e.abs().max()), 1.0)
        err = float((a - e).abs().max())
        assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol:g} * {scale:.3g}"


def _run_numeric(spec, world, rank, group):
    x, t, w64, local, weight, g_none, sl, cdim = _case_inputs(spec, world, rank)
    kw = _kwargs(spec)
    dev = _DEVICE[0]
    tol = TOL[spec.get("dtype", "float64")]
    D.set_collective_strategy(spec.get("strategy", "allgather"))
    try:
        local = local.to(dev).requires_grad_()
        loss = D.vocab_parallel_cross_entropy(local, t.to(dev), group, **kw,
                                              weight=None if weight is None else weight.to(dev))
        g = g_none if kw["reduction"] == "none" else torch.tensor(1.7, dtype=torch.float64)
        retain = spec.get("special") == "retain_graph"
        (gl,) = torch.autograd.grad(loss, local, g.to(loss.dtype).to(dev), retain_graph=retain)
        if retain:  # a second backward through the same graph gives the same gradient
            (gl2,) = torch.autograd.grad(loss, local, g.to(loss.dtype).to(dev))
            assert torch.equal(gl, gl2), "second backward differs"
        loss, gl = loss.cpu(), gl.cpu()
    finally:
        D.set_collective_strategy("allgather")
    assert loss.dtype == local.dtype, f"loss dtype {loss.dtype} != input dtype {local.dtype}"
    # float64 single-process oracle on the full logits
    x64 = x.double().requires_grad_()
    ref = R.cross_entropy(x64, t, w64, reduction=kw["reduction"], ignore_index=kw["ignore_index"],
                          label_smoothing=kw["label_smoothing"],
                          smoothing_mode=kw["smoothing_mode"], z_loss=kw["z_loss"],
                          softcap=kw["softcap"])
    (gref,) = torch.autograd.grad(ref, x64, g)
    _close(loss, ref, tol, "loss vs reference")
    _close(gl, gref.narrow(cdim, sl.start, sl.stop - sl.start), tol, "gradient slice vs reference")
    if kw["smoothing_mode"] == "uniform" and not kw["z_loss"] and kw["softcap"] is None:
        x64b = x.double().requires_grad_()
        pt = F.cross_entropy(x64b, t, w64, reduction=kw["reduction"],
                             ignore_index=kw["ignore_index"],
                             label_smoothing=kw["label_smoothing"])
        (gpt,) = torch.autograd.grad(pt, x64b, g)
        _close(loss, pt, tol, "loss vs F.cross_entropy")
        _close(gl, gpt.narrow(cdim, sl.start, sl.stop - sl.start), tol,
               "gradient slice vs F.cross_entropy")


# ----------------------------------------------------------------------------- bad input

def _bad_inputs(name, world, rank):
    """(local_logits, target, kwargs) of error case `name` on this rank."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(N, K, generator=gen, dtype=torch.float64)
    t = torch.randint(0, K, (N,), generator=gen)
    sizes = SPLITS[world]["uneven"]
    start = sum(sizes[:rank])
    local = x[:, start:start + sizes[rank]].clone()
    kw = dict(label_smoothing=0.1)
    last = rank == world - 1
    if name == "rows_mismatch":
        if last:
            local, t = local[:-1], t[:-1]
    elif name == "weight_length":
        kw["weight"] = torch.ones(K + 1, dtype=torch.float64)
    elif name == "weight_some_ranks":
        if last:
            kw["weight"] = torch.ones(K, dtype=torch.float64)
    elif name == "target_too_large":
        t[3] = K
    elif name == "target_negative":
        t[2] = -5
    elif name == "dtype_mismatch":
        if rank == 0:
            local = local.float()
    elif name == "target_differs":
        if last:
            t[0] = (t[0] + 1) % K
    elif name == "option_differs":
        if last:
            kw["label_smoothing"] = 0.2
    elif name == "bad_reduction_one_rank":
        if last:
            kw["reduction"] = "bogus"
    elif name == "float_target_one_rank":
        if rank == 0:
            t = t.double()
    elif name == "negative_z_loss":
        kw["z_loss"] = -1.0
    elif name == "zero_softcap":
        kw["softcap"] = 0.0
    elif name == "vocab_sizes_wrong":
        kw["vocab_sizes"] = list(reversed(sizes))
    elif name == "vocab_sizes_differ":
        if last:
            kw["vocab_sizes"] = [K] + [0] * (world - 1)
    elif name == "vocab_sizes_bad_one_rank":
        if rank == 0:
            kw["vocab_sizes"] = [K]
    elif name == "off_target_one_class":
        local = x[:, :1].clone() if rank == 0 else x[:, :0].clone()
        t = torch.zeros(N, dtype=torch.long)
        kw["smoothing_mode"] = "off_target"
    else:
        raise AssertionError(name)
    return local, t, kw


ERRORS = {  # name -> (exception type, fragment of the message)
    "rows_mismatch": (ValueError, "do not add up"),
    "weight_length": (ValueError, "full class-weight vector"),
    "weight_some_ranks": (ValueError, "weight is given on some ranks"),
    "target_too_large": (IndexError, f"target {K} is out of range for {K} classes"),
    "target_negative": (IndexError, "target -5 is out of range"),
    "dtype_mismatch": (TypeError, "dtypes differ across ranks"),
    "target_differs": (ValueError, "target differs across ranks"),
    "option_differs": (ValueError, "label_smoothing differs across ranks"),
    "bad_reduction_one_rank": (ValueError, "reduction must be"),
    "float_target_one_rank": (TypeError, "target must hold global class indices"),
    "negative_z_loss": (ValueError, "z_loss must be"),
    "zero_softcap": (ValueError, "softcap must be"),
    "off_target_one_class": (ValueError, "off_target"),
    "vocab_sizes_wrong": (ValueError, "but the ranks hold slices of"),
    "vocab_sizes_differ": (ValueError, "vocab_sizes differs across ranks"),
    "vocab_sizes_bad_one_rank": (ValueError, "vocab_sizes must hold"),
}


def _run_error(name, world, rank, group):
    exc, frag = ERRORS[name]
    local, t, kw = _bad_inputs(name, world, rank)
    try:
        D.vocab_parallel_cross_entropy(local.requires_grad_(), t, group, **kw)
    except Exception as e:  # noqa: BLE001 - the type is checked below
        assert type(e) is exc, f"raised {type(e).__name__}: {e}, expected {exc.__name__}"
        assert frag in str(e), f"message {str(e)!r} lacks {frag!r}"
        return
    raise AssertionError(f"no error raised (expected {exc.__name__})")


# ----------------------------------------------------------------------------- world sizes

def _run_world_sizes(world, rank, group):
    """The same loss from world sizes 1, 2 and 3 (the global K in the smoothing term): groups of
    one rank, of ranks {0, 1} and the whole world, all in this one spawn."""
    singles = [torch.distributed.new_group([r]) for r in range(world)]
    pair = torch.distributed.new_group([0, 1])
    gen = torch.Generator().manual_seed(99)
    x = torch.randn(N, K, generator=gen, dtype=torch.float64)
    t = torch.randint(0, K, (N,), generator=gen)
    kw = dict(label_smoothing=0.3, z_loss=1e-3, softcap=4.0)
    results = {}
    for size, grp in ((1, singles[rank]), (2, pair if rank < 2 else None), (world, group)):
        if grp is None:
            continue
        sizes = SPLITS[size]["uneven"]
        r = rank if size > 1 else 0
        start = sum(sizes[:r])
        for mode in ("uniform", "off_target"):
            results[(size, mode)] = float(D.vocab_parallel_cross_entropy(
                x[:, start:start + sizes[r]], t, grp, smoothing_mode=mode, **kw))
    for mode in ("uniform", "off_target"):
        ref = float(R.cross_entropy(x, t, label_smoothing=0.3, smoothing_mode=mode, z_loss=1e-3,
                                    softcap=4.0))
        vals = {s: v for (s, m), v in results.items() if m == mode}
        for s, v in vals.items():
            assert abs(v - ref) <= 1e-12 * max(1.0, abs(ref)), \
                f"{mode}: world size {s} gives {v!r}, single process {ref!r}"
    # the check can fail: local-vocabulary smoothing (Megatron-LM #737) gives another number
    sizes = SPLITS[world]["uneven"]
    kr = sizes[rank] or 1
    wrong = float(R.cross_entropy(x[:, :kr], t.clamp(max=kr - 1), label_smoothing=0.3))
    assert abs(wrong - results[(world, "uniform")]) > 1e-6


# ----------------------------------------------------------------------------- DTensor

def _run_compile(world, rank, group):
    """torch.compile (with graph breaks: the metadata exchange is read on the host) gives the
    eager loss and gradient."""
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(N, K, generator=gen, dtype=torch.float64)
    t = torch.randint(0, K, (N,), generator=gen)
    sizes = SPLITS[world]["uneven"]
    start = sum(sizes[:rank])
    local = x[:, start:start + sizes[rank]].clone().requires_grad_()

    def f(a, b):
        return D.vocab_parallel_cross_entropy(a, b, group, label_smoothing=0.1, z_loss=1e-3,
                                              softcap=5.0)

    loss = torch.compile(f)(local, t)
    loss.backward()
    x64 = x.clone().requires_grad_()
    ref = R.cross_entropy(x64, t, label_smoothing=0.1, z_loss=1e-3, softcap=5.0)
    ref.backward()
    _close(loss, ref, 1e-12, "compiled loss")
    _close(local.grad, x64.grad[:, start:start + sizes[rank]], 1e-12, "compiled gradient")


def _run_compile_fullgraph(world, rank, group):
    """torch.compile(fullgraph=True) with vocab_sizes: the whole loss is one graph (the O(N)
    collective included); loss and gradient slice equal the float64 reference for each option
    set; without vocab_sizes fullgraph fails saying what to pass; a target outside the global
    range poisons its row (NaN) instead of giving a number."""
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(N, K, generator=gen, dtype=torch.float64)
    t = torch.randint(0, K, (N,), generator=gen)
    t[2] = -100
    w = torch.rand(K, generator=gen, dtype=torch.float64) + 0.5
    sizes = SPLITS[world]["uneven"]
    start = sum(sizes[:rank])
    sl = slice(start, start + sizes[rank])
    vs = D.check_vocab_parallel(x[:, sl], t, group, label_smoothing=0.1)  # the eager checks
    assert vs == tuple(sizes), vs
    # the second case's target of row 4 is outside the global range: that row alone is NaN
    bad = t.clone()
    bad[4] = K + 3
    cases = [dict(label_smoothing=0.2, smoothing_mode="off_target", weight="local", z_loss=1e-3,
                  softcap=5.0),
             dict(label_smoothing=0.1, weight="full", reduction="none", strategy="allreduce",
                  target=bad)]
    for case in cases:
        kw = dict(case)
        strategy = kw.pop("strategy", "allgather")
        wmode = kw.pop("weight", None)
        wt = {None: None, "full": w, "local": w[sl]}[wmode]
        tt = kw.pop("target", t)
        D.set_collective_strategy(strategy)
        try:
            torch._dynamo.reset()

            def f(a, b):
                return D.vocab_parallel_cross_entropy(a, b, group, weight=wt, vocab_sizes=vs, **kw)

            local = x[:, sl].clone().requires_grad_()
            loss = torch.compile(f, fullgraph=True)(local, tt)
            g = torch.linspace(0.5, 1.5, N, dtype=torch.float64) if kw.get("reduction") == "none" \
                else torch.tensor(1.3, dtype=torch.float64)
            loss.backward(g)
        finally:
            D.set_collective_strategy("allgather")
        x64 = x.clone().requires_grad_()
        ref = R.cross_entropy(x64, t, None if wmode is None else w, **kw)
        ref.backward(g)
        keep = tt == t
        if not bool(keep.all()):
            assert loss[~keep].isnan().all() and local.grad[~keep].isnan().all(), loss
            loss, ref, got_g, ref_g = loss[keep], ref[keep], local.grad[keep], x64.grad[keep]
        else:
            got_g, ref_g = local.grad, x64.grad
        _close(loss, ref, 1e-12, f"compiled loss {case}")
        _close(got_g, ref_g[:, sl], 1e-12, f"compiled gradient {case}")
    torch._dynamo.reset()
    try:
        torch.compile(lambda a, b: D.vocab_parallel_cross_entropy(a, b, group), fullgraph=True)(
            x[:, sl].clone(), t)
    except Exception as e:  # noqa: BLE001 - dynamo's error type varies across torch versions
        if "reason" in inspect.signature(torch.compiler.disable).parameters:
            assert "vocab_sizes" in str(e), f"fullgraph error does not say what to pass: {e}"
        else:  # torch 2.4: disable() takes no reason, so dynamo names the disabled exchange
            assert "_exchange_and_check" in str(e), f"fullgraph error does not name the exchange: {e}"
    else:
        raise AssertionError("fullgraph=True without vocab_sizes traced the host-side exchange")


def _run_dtensor_1d(world, rank, group):
    from torch.distributed.device_mesh import init_device_mesh
    Replicate, Shard, distribute_tensor = D.dtensor_api("Replicate", "Shard", "distribute_tensor")
    from torch.distributed.tensor.parallel import loss_parallel

    mesh = init_device_mesh("cpu", (world,))
    gen = torch.Generator().manual_seed(5)
    for shape, tshape in (((N, K), (N,)), ((3, K, 4), (3, 4))):
        x = torch.randn(shape, generator=gen, dtype=torch.float64)
        t = torch.randint(0, K, tshape, generator=gen)
        t.view(-1)[0] = -100
        w = torch.rand(K, generator=gen, dtype=torch.float64) + 0.5
        for red in ("mean", "sum", "none"):
            for kw in (dict(label_smoothing=0.1), dict(label_smoothing=0.2, weight=w,
                                                       smoothing_mode="off_target"),
                       dict(label_smoothing=0.1, z_loss=1e-2, softcap=3.0)):
                dx = distribute_tensor(x, mesh, [Shard(1)]).requires_grad_()
                loss = labelsmooth_ext.cross_entropy(dx, t, reduction=red, **kw)
                assert tuple(loss.placements) == (Replicate(),), loss.placements
                x64 = x.clone().requires_grad_()
                ref = R.cross_entropy(x64, t, reduction=red, **kw)
                _close(loss.full_tensor(), ref, 1e-12, f"dtensor {shape} {red} {kw} loss")
                g = torch.ones_like(ref) if red == "none" else torch.tensor(1.0, dtype=ref.dtype)
                ref.backward(g)
                (loss.sum() if red == "none" else loss).backward()
                assert tuple(dx.grad.placements) == (Shard(1),), dx.grad.placements
                _close(dx.grad.full_tensor(), x64.grad, 1e-12, f"dtensor {shape} {red} grad")
            # the placements are PyTorch's: loss_parallel() on the same input, no smoothing
            dx = distribute_tensor(x, mesh, [Shard(1)])
            with loss_parallel():
                theirs = F.cross_entropy(dx, t, reduction=red)
            ours = labelsmooth_ext.CrossEntropyLoss(reduction=red)(dx, t)
            assert tuple(ours.placements) == tuple(theirs.placements), (ours.placements,
                                                                        theirs.placements)
            _close(ours.full_tensor(), theirs.full_tensor(), 1e-12, "vs loss_parallel")


def _run_dtensor_2d(world, rank, group):
    """A 2 x 2 mesh: batch sharded on mesh dim 0 (data parallel), classes on mesh dim 1."""
    from torch.distributed.device_mesh import init_device_mesh
    Partial, Replicate, Shard, distribute_tensor = D.dtensor_api("Partial", "Replicate", "Shard", "distribute_tensor")
    from torch.distributed.tensor.parallel import loss_parallel

    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "tp"))
    gen = torch.Generator().manual_seed(6)
    for shape, tshape, xpl, tpl in (
        ((6, K), (6,), (Shard(0), Shard(1)), (Shard(0), Replicate())),
        ((2, K, 5), (2, 5), (Shard(2), Shard(1)), (Shard(1), Replicate())),
        ((5, K), (5,), (Replicate(), Shard(1)), (Replicate(), Replicate())),
    ):
        x = torch.randn(shape, generator=gen, dtype=torch.float64)
        t = torch.randint(0, K, tshape, generator=gen)
        t.view(-1)[1] = -100
        w = torch.rand(K, generator=gen, dtype=torch.float64) + 0.5
        dt = distribute_tensor(t, mesh, tpl)
        for red in ("mean", "sum", "none"):
            for kw in (dict(label_smoothing=0.1), dict(label_smoothing=0.2, weight=w)):
                dx = distribute_tensor(x, mesh, xpl).requires_grad_()
                loss = labelsmooth_ext.cross_entropy(dx, dt, reduction=red, **kw)
                if red == "none":
                    assert tuple(loss.placements) == tpl, loss.placements
                else:
                    want = tuple(Partial() if p.is_shard() and i == 0 else Replicate()
                                 for i, p in enumerate(xpl))
                    assert tuple(loss.placements) == want, loss.placements
                x64 = x.clone().requires_grad_()
                ref = R.cross_entropy(x64, t, reduction=red, **kw)
                _close(loss.full_tensor(), ref, 1e-12, f"2d {shape} {xpl} {red} {kw} loss")
                g = torch.ones_like(ref) if red == "none" else torch.tensor(1.0, dtype=ref.dtype)
                ref.backward(g)
                loss.full_tensor().sum().backward()
                _close(dx.grad.full_tensor(), x64.grad, 1e-12, f"2d {shape} {xpl} {red} grad")
            if red != "mean":  # PyTorch's placements ('mean' is NotImplementedError there)
                dx = distribute_tensor(x, mesh, xpl)
                with loss_parallel():
                    theirs = F.cross_entropy(dx, dt, reduction=red)
                ours = labelsmooth_ext.cross_entropy(dx, dt, reduction=red)
                assert tuple(ours.placements) == tuple(theirs.placements)
                _close(ours.full_tensor(), theirs.full_tensor(), 1e-12, "2d vs loss_parallel")


# ----------------------------------------------------------------------------- spawning

_DEVICE = ["cpu"]  # the worker's device: cuda:rank under NCCL


def _hang(world, rank, group):
    """Only for the harness test: the last rank never reaches the collective."""
    if rank == world - 1:
        time.sleep(3600)
    torch.distributed.all_reduce(torch.ones(1), group=group)


def _worker(rank, world, port, out_dir, suites, backend):
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    results = {}
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
            _DEVICE[0] = f"cuda:{rank}"
        torch.distributed.init_process_group(
            backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
            timeout=datetime.timedelta(seconds=60))
        group = torch.distributed.group.WORLD
        for suite in suites:
            if suite == "numeric":
                items = [(n, lambda s=s: _run_numeric(s, world, rank, group)) for n, s in NUMERIC.items()]
            elif suite == "errors":
                items = [(n, lambda n=n: _run_error(n, world, rank, group)) for n in ERRORS]
                # the group still works after every error: one good case
                items.append(("after_errors", lambda: _run_numeric(
                    dict(label_smoothing=0.1, weight="local"), world, rank, group)))
            else:
                fn = {"world_sizes": _run_world_sizes, "dtensor_1d": _run_dtensor_1d,
                      "dtensor_2d": _run_dtensor_2d, "__hang__": _hang,
                      "compile": _run_compile, "compile_fullgraph": _run_compile_fullgraph}[suite]
                items = [(suite, lambda fn=fn: fn(world, rank, group))]
            run_items(items, results)
        # no rank leaves (closing its sockets, rank 0 its store) while another still talks
        torch.distributed.barrier(group)
        torch.distributed.destroy_process_group()
    except Exception:  # noqa: BLE001
        results["__setup__"] = traceback.format_exc()
    exit_worker(out_dir, rank, results)


def exit_worker(out_dir, rank, results):
    """A worker's end: its results to the parent, then os._exit(0), without the interpreter's
    teardown. On torch < 2.8 that teardown can hang or abort a rank after every case has passed
    (seen on 2.4.1, about one spawn in ten: exit code -6, or a hang that gdb shows as
    ~ProcessGroupGloo joining its worker thread with the GIL held while that thread waits for the
    GIL to drop the last collective's tensor: pytorch/pytorch#56297, fixed by #154976). The
    results are what the tests check; a process's exit code then says only that it got here."""
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_items(items, results):
    """Runs each (name, fn) of a worker, recording "ok" or the traceback for the parent."""
    for name, fn in items:
        try:
            fn()
            results[name] = "ok"
        except Exception:  # noqa: BLE001 - reported to the parent
            results[name] = traceback.format_exc()


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(world, suites, backend="gloo", timeout=SPAWN_TIMEOUT, worker=None):
    """Run `suites` in `world` processes; {case: {rank: "ok" or traceback}}. Fails (after
    killing every process) when they do not finish within `timeout` seconds. worker: another
    module's worker function (same arguments as _worker), for other test files."""
    with tempfile.TemporaryDirectory() as out:
        ctx = mp.spawn(worker or _worker, args=(world, _free_port(), out, suites, backend), nprocs=world,
                       join=False)
        end = time.monotonic() + timeout
        crashed = False
        while time.monotonic() < end and not crashed:
            if all(p.exitcode is not None for p in ctx.processes):
                break
            # a rank that died (e.g. gloo aborting) would leave the others waiting
            crashed = any(p.exitcode not in (None, 0) for p in ctx.processes)
            ctx.processes[0].join(0.2)
        alive = [p for p in ctx.processes if p.is_alive()]
        for p in alive:
            p.kill()
            p.join(5)
        codes = [p.exitcode for p in ctx.processes]
        if alive and not crashed:
            pytest.fail(f"{len(alive)} of {world} processes still running after {timeout:.0f} s "
                        f"(suites {suites}): killed; a hang")
        if crashed:
            pytest.fail(f"a rank crashed (exit codes {codes}, suites {suites}); the others were killed")
        per_rank = {}
        for r in range(world):
            path = os.path.join(out, f"rank{r}.json")
            if not os.path.exists(path):
                pytest.fail(f"rank {r} exited with code {codes[r]} without results")
            with open(path) as f:
                per_rank[r] = json.load(f)
    if any("__setup__" in v for v in per_rank.values()):
        pytest.fail("\n".join(v.get("__setup__", "") for v in per_rank.values()))
    out = {}
    for r, res in per_rank.items():
        for name, status in res.items():
            out.setdefault(name, {})[r] = status
    return out


def _check(results, name, world):
    got = results.get(name)
    assert got is not None and len(got) == world, f"{name}: no result from every rank: {got}"
    bad = {r: s for r, s in got.items() if s != "ok"}
    assert not bad, "\n".join(f"rank {r}:\n{s}" for r, s in bad.items())


@pytest.fixture(scope="module")
def world2():
    return spawn(2, ["numeric", "errors"] + (["dtensor_1d"] if D.DTENSOR_SUPPORTED else []))


@pytest.fixture(scope="module")
def world3():
    return spawn(3, ["numeric", "errors", "world_sizes"] + (["dtensor_1d"] if D.DTENSOR_SUPPORTED else []))


@pytest.fixture(scope="module")
def world4():
    return spawn(4, ["dtensor_2d"])


@pytest.mark.parametrize("name", list(NUMERIC))
def test_numeric_world2(world2, name):
    _check(world2, name, 2)


@pytest.mark.parametrize("name", list(NUMERIC))
def test_numeric_world3(world3, name):
    _check(world3, name, 3)


@pytest.mark.parametrize("name", list(ERRORS) + ["after_errors"])
@pytest.mark.parametrize("world", [2, 3])
def test_bad_input_raises_on_every_rank(world2, world3, world, name):
    _check({2: world2, 3: world3}[world], name, world)


def test_same_loss_at_world_sizes_1_2_3(world3):
    _check(world3, "world_sizes", 3)


NEEDS_DTENSOR = pytest.mark.skipif(
    not D.DTENSOR_SUPPORTED, reason=f"DTensor input needs torch >= 2.5 (this is {torch.__version__})")


@NEEDS_DTENSOR
@pytest.mark.parametrize("world", [2, 3])
def test_dtensor_1d_mesh(world2, world3, world):
    _check({2: world2, 3: world3}[world], "dtensor_1d", world)


@NEEDS_DTENSOR
def test_dtensor_2d_mesh(world4):
    _check(world4, "dtensor_2d", 4)


def test_hang_is_caught_by_the_timeout():
    """The harness itself: processes still running at the deadline (here the last rank sleeps
    instead of joining the collective, or start-up is not even over after 3 s) are killed and
    the test fails saying so, instead of hanging."""
    with pytest.raises(pytest.fail.Exception, match="a hang"):
        spawn(2, ["__hang__"], timeout=3)


# ----------------------------------------------------------------------------- one process

@pytest.mark.parametrize("name", [n for n in NUMERIC if "strategy" not in n][:24])
def test_single_process_no_group(name):
    """No process group initialised: a world of one (the oracle path, no communication)."""
    _run_numeric(NUMERIC[name], 1, 0, None)


def test_single_process_errors_raise_directly():
    x = torch.randn(4, 5)
    with pytest.raises(ValueError, match="reduction"):
        D.vocab_parallel_cross_entropy(x, torch.zeros(4, dtype=torch.long), reduction="avg")
    with pytest.raises(IndexError, match="out of range for 5 classes"):
        D.vocab_parallel_cross_entropy(x, torch.tensor([0, 1, 5, 2]))
    with pytest.raises(ValueError, match="weight"):
        D.vocab_parallel_cross_entropy(x, torch.zeros(4, dtype=torch.long), weight=torch.ones(6))
    with pytest.raises(ValueError, match="z_loss"):
        D.vocab_parallel_cross_entropy(x, torch.zeros(4, dtype=torch.long), z_loss=float("nan"))
    with pytest.raises(ValueError, match="strategy"):
        D.set_collective_strategy("ring")


@pytest.mark.skipif(os.environ.get("LSE_DIST_COMPILE_TEST", "0") in ("", "0"),
                    reason="torch.compile on 2 ranks takes minutes on a 2-core machine; opt in "
                           "with LSE_DIST_COMPILE_TEST=1")
def test_torch_compile_with_graph_breaks():
    _check(spawn(2, ["compile"], timeout=600), "compile", 2)


def test_torch_compile_fullgraph():
    _check(spawn(2, ["compile_fullgraph"], timeout=max(SPAWN_TIMEOUT, 400)), "compile_fullgraph", 2)


@pytest.mark.skipif(torch.cuda.device_count() < 2,
                    reason="NCCL tests need two CUDA GPUs (this machine has "
                           f"{torch.cuda.device_count()})")
def test_nccl_two_gpus():
    results = spawn(2, ["numeric", "errors"], backend="nccl")
    for name in list(NUMERIC) + list(ERRORS):
        _check(results, name, 2)
