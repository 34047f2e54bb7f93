"""labelsmooth_ext.distributed.vocab_parallel_linear_cross_entropy: the fused linear loss with the
output layer's rows (classes) split across ranks.

Spawned gloo processes on loopback (test_distributed.spawn: bounded by a timeout, one spawn per
world size for all cases). Each rank checks, in float64, the loss, d input (the full one), its
slice of d W and of d b against the single-process float64 oracle: linear(x, W, b) of the full
(concatenated) W, then labelsmooth_ext.reference.cross_entropy (every option), and F.cross_entropy
where it has the options.
"""
import datetime
import os
import traceback

import pytest
import torch
import torch.nn.functional as F

from labelsmooth_ext import distributed as D
from labelsmooth_ext import reference as R

from test_distributed import SPAWN_TIMEOUT, _check, _close, exit_worker, run_items, spawn

N, H, K = 13, 6, 11  # 13 rows: chunk sizes 4 and 5 do not divide it
SPLITS = {1: {"uneven": [K], "chunk": [K]},
          2: {"uneven": [3, 8], "chunk": [6, 5]},
          3: {"uneven": [4, 0, 7], "chunk": [4, 4, 3]}}


def _cases():
    cases = []
    for red in ("mean", "sum", "none"):
        for wmode in (None, "full", "local"):
            for eps, mode in ((0.0, "uniform"), (0.1, "uniform"), (0.2, "off_target")):
                cases.append(dict(reduction=red, weight=wmode, label_smoothing=eps,
                                  smoothing_mode=mode, bias=wmode == "full",
                                  chunk=(None, 4, 5)[len(cases) % 3]))
        cases.append(dict(reduction=red, weight="full", label_smoothing=0.1, z_loss=1e-2,
                          softcap=3.0, bias=True, chunk=5))
        cases.append(dict(reduction=red, label_smoothing=0.2, smoothing_mode="off_target",
                          z_loss=0.05, softcap=2.0, chunk=4, split="chunk"))
        cases.append(dict(reduction=red, label_smoothing=0.1, shape="3d", bias=True, chunk=4,
                          weight="local"))
        cases.append(dict(reduction=red, label_smoothing=0.1, ignore_index=3, z_loss=1e-3,
                          strategy="allreduce", chunk=6))
    cases.append(dict(reduction="mean", label_smoothing=0.1, bias=True, dtype="float32", chunk=4))
    cases.append(dict(reduction="none", label_smoothing=0.1, bias=True, dtype="bfloat16", chunk=5,
                      z_loss=1e-3, softcap=4.0))
    cases.append(dict(reduction="sum", label_smoothing=0.1, rows=0))
    return {f"l{i:02d}-" + "-".join(f"{k}={v}" for k, v in c.items()): c
            for i, c in enumerate(cases)}


CASES = _cases()
TOL = {"float64": 1e-12, "float32": 2e-5, "bfloat16": 3e-2}


def _inputs(spec, world, rank):
    gen = torch.Generator().manual_seed(4321)
    rows = spec.get("rows", N)
    x = torch.randn(rows, H, generator=gen, dtype=torch.float64)
    W = torch.randn(K, H, generator=gen, dtype=torch.float64)
    b = torch.randn(K, generator=gen, dtype=torch.float64) if spec.get("bias") else None
    ii = spec.get("ignore_index", -100)
    t = torch.randint(0, K, (rows,), generator=gen)
    if rows > 2:
        t[1] = ii
    w = torch.rand(K, generator=gen, dtype=torch.float64) + 0.5
    g_none = torch.randn(rows, generator=gen, dtype=torch.float64)
    if spec.get("shape") == "3d":  # (B, T, H) = (1, 13, 6)
        x, t, g_none = x.unsqueeze(0), t.unsqueeze(0), g_none.unsqueeze(0)
    sizes = SPLITS[world][spec.get("split", "uneven")]
    start = sum(sizes[:rank])
    sl = slice(start, start + sizes[rank])
    return x, W, b, t, w, g_none, sl


def _kwargs(spec):
    return dict(reduction=spec.get("reduction", "mean"),
                label_smoothing=spec.get("label_smoothing", 0.0),
                smoothing_mode=spec.get("smoothing_mode", "uniform"),
                z_loss=spec.get("z_loss", 0.0), softcap=spec.get("softcap"),
                ignore_index=spec.get("ignore_index", -100))


def _run_case(spec, world, rank, group):
    x, W, b, t, w, g_none, sl = _inputs(spec, world, rank)
    kw = _kwargs(spec)
    dtype = getattr(torch, spec.get("dtype", "float64"))
    tol = TOL[spec.get("dtype", "float64")]
    wmode = spec.get("weight")
    weight = {None: None, "full": w, "local": w[sl]}[wmode]
    xl = x.to(dtype).requires_grad_()
    Wl = W[sl].to(dtype).clone().requires_grad_()
    bl = None if b is None else b[sl].to(dtype).clone().requires_grad_()
    D.set_collective_strategy(spec.get("strategy", "allgather"))
    try:
        loss = D.vocab_parallel_linear_cross_entropy(
            xl, Wl, t, group, local_linear_bias=bl,
            weight=None if weight is None else weight.to(dtype), chunk_size=spec.get("chunk"),
            **kw)
        g = g_none if kw["reduction"] == "none" else torch.tensor(1.7, dtype=torch.float64)
        wrt = [xl, Wl] + ([bl] if bl is not None else [])
        grads = torch.autograd.grad(loss, wrt, g.to(loss.dtype))
    finally:
        D.set_collective_strategy("allgather")
    assert loss.dtype == dtype, loss.dtype
    # float64 single-process oracle of the full layer
    x64, W64 = x.clone().requires_grad_(), W.clone().requires_grad_()
    b64 = None if b is None else b.clone().requires_grad_()
    logits = F.linear(x64, W64, b64)
    if logits.dim() == 3:
        logits = logits.movedim(-1, 1)
    wfull = None if wmode is None else w
    ref = R.cross_entropy(logits, t, wfull, **kw)
    refs = torch.autograd.grad(ref, [x64, W64] + ([b64] if b64 is not None else []), g)
    _close(loss, ref, tol, "loss vs reference")
    _close(grads[0], refs[0], tol, "d input vs reference")
    _close(grads[1], refs[1][sl], tol, "d W slice vs reference")
    if bl is not None:
        _close(grads[2], refs[2][sl], tol, "d b slice vs reference")
    if kw["smoothing_mode"] == "uniform" and not kw["z_loss"] and kw["softcap"] is None:
        pt = F.cross_entropy(logits.detach(), t, wfull, reduction=kw["reduction"],
                             ignore_index=kw["ignore_index"],
                             label_smoothing=kw["label_smoothing"])
        _close(loss, pt, tol, "loss vs F.cross_entropy")


ERROR_FRAG = "local_linear_weight must be (K_r, H)"


def _run_bad_width(world, rank, group):
    """The last rank's weight slice has H + 1 columns: a ValueError naming local_linear_weight
    on every rank (the others learn it through the metadata exchange), no hang."""
    x, W, b, t, w, g_none, sl = _inputs({}, world, rank)
    Wl = W[sl].clone()
    if rank == world - 1:
        Wl = torch.cat([Wl, Wl[:, :1]], dim=1)
    try:
        D.vocab_parallel_linear_cross_entropy(x, Wl.requires_grad_(), t, group, label_smoothing=0.1)
    except ValueError as e:
        assert ERROR_FRAG in str(e), f"message {str(e)!r} lacks {ERROR_FRAG!r}"
        if rank != world - 1:  # reported through the exchange, under this function's name
            assert str(e).startswith("vocab_parallel_linear_cross_entropy: bad input on 1 of"), str(e)
        if rank != world - 1:
            assert f"rank {world - 1}" in str(e), str(e)
        return
    raise AssertionError("no ValueError raised")


def _run_grad_some_ranks(world, rank, group):
    """Only rank 0 asks for a gradient: the same ValueError on every rank, no hang."""
    x, W, b, t, w, g_none, sl = _inputs({}, world, rank)
    Wl = W[sl].clone().requires_grad_(rank == 0)
    try:
        D.vocab_parallel_linear_cross_entropy(x, Wl, t, group)
    except ValueError as e:
        assert "gradient is needed on some ranks" in str(e), str(e)
        return
    raise AssertionError("no ValueError raised")


def _worker(rank, world, port, out_dir, suites, backend):
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    results = {}
    try:
        torch.distributed.init_process_group(
            backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
            timeout=datetime.timedelta(seconds=60))
        group = torch.distributed.group.WORLD
        items = [(n, lambda s=s: _run_case(s, world, rank, group)) for n, s in CASES.items()]
        items.append(("bad_width", lambda: _run_bad_width(world, rank, group)))
        items.append(("grad_some_ranks", lambda: _run_grad_some_ranks(world, rank, group)))
        # the group still works after the error
        items.append(("after_error", lambda: _run_case(dict(label_smoothing=0.1, bias=True),
                                                       world, rank, group)))
        run_items(items, results)
        # no rank leaves (closing its sockets, rank 0 its store) while another still talks
        torch.distributed.barrier(group)
        torch.distributed.destroy_process_group()
    except Exception:  # noqa: BLE001
        results["__setup__"] = traceback.format_exc()
    exit_worker(out_dir, rank, results)


@pytest.fixture(scope="module")
def lin2():
    return spawn(2, ["linear"], timeout=SPAWN_TIMEOUT, worker=_worker)


@pytest.fixture(scope="module")
def lin3():
    return spawn(3, ["linear"], timeout=SPAWN_TIMEOUT, worker=_worker)


@pytest.mark.parametrize("name", list(CASES) + ["bad_width", "grad_some_ranks", "after_error"])
def test_linear_world2(lin2, name):
    _check(lin2, name, 2)


@pytest.mark.parametrize("name", list(CASES) + ["bad_width", "grad_some_ranks", "after_error"])
def test_linear_world3(lin3, name):
    _check(lin3, name, 3)


@pytest.mark.parametrize("name", [n for n in CASES if "strategy" not in n][:8])
def test_linear_single_process(name):
    """No process group: a world of one (the whole layer on this process)."""
    _run_case(CASES[name], 1, 0, None)


def test_linear_single_process_bad_width_raises():
    x = torch.randn(4, H, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"local_linear_weight must be \(K_r, H\)"):
        D.vocab_parallel_linear_cross_entropy(x, torch.randn(K, H + 1, dtype=torch.float64),
                                              torch.zeros(4, dtype=torch.long))


def test_linear_logits_only_one_chunk_at_a_time(monkeypatch):
    """The fused local operators only ever see one chunk of logits (chunk_size rows), never the
    N x K_r logits; the result still equals the oracle."""
    import types

    real = D._ops.ops
    seen = []

    def stats(z, *args):
        seen.append(tuple(z.shape))
        return real.vocab_parallel_stats(z, *args)

    fake = types.SimpleNamespace(vocab_parallel_stats=stats,
                                 vocab_parallel_grad=real.vocab_parallel_grad)
    monkeypatch.setattr(D, "_ops", types.SimpleNamespace(ops=fake))
    _run_case(dict(label_smoothing=0.1, bias=True, chunk=5), 1, 0, None)
    assert seen == [(5, K), (5, K), (3, K)], seen


def test_linear_single_process_target_out_of_range_raises():
    x = torch.randn(4, H, dtype=torch.float64)
    with pytest.raises(IndexError, match=r"^vocab_parallel_linear_cross_entropy: target 11 is out "
                                         r"of range for 11 classes"):
        D.vocab_parallel_linear_cross_entropy(x, torch.randn(K, H, dtype=torch.float64),
                                              torch.tensor([0, 1, 11, 2]))
