"""labelsmooth_ext.patch(): what it replaces, the undo, exact parity with the originals, falling
through to the original for anything we cannot serve exactly, and real client code (Hugging Face
Trainer, timm, a plain PyTorch script) trained unpatched vs patched (tests/patch_clients.py, in
a subprocess with a timeout)."""
import importlib
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import labelsmooth_ext
patch_module = importlib.import_module("labelsmooth_ext.patch")  # the name patch is the function

HAS_TRANSFORMERS = all(importlib.util.find_spec(m) for m in ("transformers", "accelerate"))
HAS_TIMM = importlib.util.find_spec("timm") is not None
NEEDS_TRANSFORMERS = pytest.mark.skipif(
    not HAS_TRANSFORMERS, reason="transformers and accelerate are not installed (pip install -r requirements.txt)")
NEEDS_TIMM = pytest.mark.skipif(not HAS_TIMM, reason="timm is not installed (pip install -r requirements.txt)")

ORIG_CE = F.cross_entropy
ORIG_BCE = F.binary_cross_entropy_with_logits
ORIG_CE_FORWARD = torch.nn.CrossEntropyLoss.forward


@pytest.fixture(autouse=True)
def _clean():
    labelsmooth_ext.unpatch()
    yield
    labelsmooth_ext.unpatch()
    assert F.cross_entropy is ORIG_CE and torch.nn.CrossEntropyLoss.forward is ORIG_CE_FORWARD


def is_our_node(f):
    """An autograd node of ours: the Python one (its class is named after the operator) or the
    CPU's C++ one (a CppFunction whose name() names labelsmooth_ext's function)."""
    return f is not None and ("labelsmooth_ext" in type(f).__name__ or "labelsmooth_ext" in f.name())


def ours(t, depth=3):
    """Did our autograd operator produce this tensor (directly or through a few views/casts)?"""
    fns = [t.grad_fn]
    for _ in range(depth):
        if any(is_our_node(f) for f in fns):
            return True
        fns = [n for f in fns if f is not None for n, _ in f.next_functions]
    return False


def torch_only():
    return labelsmooth_ext.patch(transformers=False, timm=False)


# ---------------------------------------------------------------------------------------------
# the handle


def test_patch_undo_context_manager_and_twice():
    h = torch_only()
    assert set(h.names) == {"torch.nn.functional.cross_entropy",
                            "torch.nn.functional.binary_cross_entropy_with_logits",
                            "torch.nn.CrossEntropyLoss.forward", "torch.nn.BCEWithLogitsLoss.forward"}
    assert labelsmooth_ext.patched() == list(h.names)
    wrapped = F.cross_entropy
    assert wrapped is not ORIG_CE and torch.nn.modules.loss.F.cross_entropy is wrapped
    again = torch_only()  # harmless: nothing wrapped twice, nothing new to undo
    assert again.names == () and F.cross_entropy is wrapped
    again.undo()
    assert F.cross_entropy is wrapped
    h.undo()
    assert labelsmooth_ext.patched() == [] and F.cross_entropy is ORIG_CE
    assert torch.nn.CrossEntropyLoss.forward is ORIG_CE_FORWARD
    assert F.binary_cross_entropy_with_logits is ORIG_BCE
    with torch_only() as h2:
        assert F.cross_entropy is not ORIG_CE and h2.names
    assert F.cross_entropy is ORIG_CE
    torch_only()
    labelsmooth_ext.patch(functional=False, modules=False, transformers=False, timm=False)
    labelsmooth_ext.unpatch()
    assert labelsmooth_ext.patched() == [] and F.cross_entropy is ORIG_CE


def test_patch_groups_are_selectable():
    h = labelsmooth_ext.patch(functional=False, transformers=False, timm=False)
    assert set(h.names) == {"torch.nn.CrossEntropyLoss.forward", "torch.nn.BCEWithLogitsLoss.forward"}
    assert F.cross_entropy is ORIG_CE
    x = torch.randn(6, 4, requires_grad=True)
    assert ours(torch.nn.CrossEntropyLoss()(x, torch.randint(0, 4, (6,))))
    assert not ours(F.cross_entropy(x, torch.randint(0, 4, (6,))))


@NEEDS_TRANSFORMERS
@NEEDS_TIMM
def test_patch_all_libraries_and_undo():
    import timm.loss
    from transformers.loss import loss_utils
    from transformers.trainer_pt_utils import LabelSmoother

    before = (LabelSmoother.__call__, loss_utils.fixed_cross_entropy,
              timm.loss.LabelSmoothingCrossEntropy.forward, timm.loss.SoftTargetCrossEntropy.forward)
    with labelsmooth_ext.patch() as h:
        assert len(h.names) == 8
        now = (LabelSmoother.__call__, loss_utils.fixed_cross_entropy,
               timm.loss.LabelSmoothingCrossEntropy.forward, timm.loss.SoftTargetCrossEntropy.forward)
        assert all(a is not b for a, b in zip(before, now))
    after = (LabelSmoother.__call__, loss_utils.fixed_cross_entropy,
             timm.loss.LabelSmoothingCrossEntropy.forward, timm.loss.SoftTargetCrossEntropy.forward)
    assert all(a is b for a, b in zip(before, after))


def test_a_changed_original_is_left_unpatched(monkeypatch):
    """patch() first compares the replacement with the installed original on small examples:
    an original computing another formula (say, a future release) is not replaced."""
    def other_formula(self, input, target):
        return ORIG_CE(input, target, weight=self.weight, reduction=self.reduction,
                       label_smoothing=self.label_smoothing) * 1.001

    monkeypatch.setattr(torch.nn.CrossEntropyLoss, "forward", other_formula)
    with pytest.warns(UserWarning, match="not patching torch.nn.CrossEntropyLoss.forward"):
        h = torch_only()
    assert "torch.nn.CrossEntropyLoss.forward" not in h.names
    assert "torch.nn.functional.cross_entropy" in h.names
    assert torch.nn.CrossEntropyLoss.forward is other_formula


def test_missing_library_is_skipped(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(patch_module.importlib.util, "find_spec",
                        lambda name, *a: None if name in ("transformers", "timm") else real(name, *a))
    h = labelsmooth_ext.patch()
    assert h.names and all(n.startswith("torch.") for n in h.names)


# ---------------------------------------------------------------------------------------------
# torch.nn.functional / torch.nn: served calls equal the original (float64), fall-through


def _loss_and_grad(fn, x, *args, **kwargs):
    x = x.detach().clone().requires_grad_()
    loss = fn(x, *args, **kwargs)
    loss.sum().backward()
    return loss, x.grad, ours(loss)


CE_CASES = {
    "plain": lambda: (torch.randn(9, 7), torch.randint(0, 7, (9,)), {}),
    "smoothing_weight_ignore": lambda: (torch.randn(9, 7), torch.tensor([0, 1, -100, 3, 4, 5, 6, -100, 2]),
                                        dict(weight=torch.rand(7) + 0.5, label_smoothing=0.2)),
    "sum": lambda: (torch.randn(9, 7), torch.randint(0, 7, (9,)), dict(reduction="sum", label_smoothing=0.1)),
    "none_kdim": lambda: (torch.randn(2, 5, 3, 4), torch.randint(0, 5, (2, 3, 4)),
                          dict(reduction="none", label_smoothing=0.1)),
    "unbatched": lambda: (torch.randn(6), torch.tensor(2), dict(label_smoothing=0.3)),
    "byte_target": lambda: (torch.randn(9, 7), torch.randint(0, 7, (9,), dtype=torch.uint8), {}),
    "ignore_index_3": lambda: (torch.randn(9, 7), torch.randint(0, 7, (9,)), dict(ignore_index=3)),
    "prob_target": lambda: (torch.randn(9, 7), torch.rand(9, 7) * 2, dict(label_smoothing=0.1)),
    "eps_1": lambda: (torch.randn(9, 7), torch.randint(0, 7, (9,)), dict(label_smoothing=1)),
}


@pytest.mark.parametrize("case", list(CE_CASES))
def test_cross_entropy_served_equals_original(case):
    x, t, kw = CE_CASES[case]()
    x = x.double()
    if t.is_floating_point():
        t = t.double()
    if "weight" in kw:
        kw["weight"] = kw["weight"].double()
    ref_loss, ref_grad, ref_ours = _loss_and_grad(F.cross_entropy, x, t, **kw)
    crit = torch.nn.CrossEntropyLoss(**kw)  # made before patch(): must be covered too
    mod_ref = crit(x, t)
    with torch_only():
        loss, grad, was_ours = _loss_and_grad(F.cross_entropy, x, t, **kw)
        mod_loss, mod_grad, mod_ours = _loss_and_grad(crit, x, t)
    assert not ref_ours and was_ours and mod_ours
    assert loss.dtype == ref_loss.dtype and loss.shape == ref_loss.shape
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mod_loss, mod_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mod_grad, ref_grad, rtol=1e-12, atol=1e-12)


def test_profiler_shows_our_operator_for_nn_cross_entropy_loss():
    from torch.profiler import ProfilerActivity, profile

    criterion = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    x, t = torch.randn(32, 100, requires_grad=True), torch.randint(0, 100, (32,))
    ref = criterion(x, t)
    with labelsmooth_ext.patch():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            loss = criterion(x, t)
            loss.backward()
    keys = {e.key for e in prof.key_averages()}
    assert "labelsmooth_ext::ce_forward" in keys
    assert abs(float(loss.detach()) - float(ref.detach())) <= 1e-6 * abs(float(ref.detach()))


class _Sub(torch.Tensor):
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        return super().__torch_function__(func, types, args, kwargs or {})


def _same_outcome(call):
    """call() unpatched and patched: same value (bitwise) or the same exception, and patched
    is not ours (fell through)."""
    def run():
        try:
            out = call()
            return ("ok", out)
        except Exception as e:  # noqa: BLE001
            return ("err", (type(e), str(e)))

    ref = run()
    with torch_only():
        got = run()
    assert ref[0] == got[0], (ref, got)
    if ref[0] == "err":
        assert ref[1] == got[1]
    else:
        assert not ours(got[1])
        assert got[1].dtype == ref[1].dtype
        torch.testing.assert_close(got[1], ref[1], rtol=0, atol=0)


FALL_THROUGH = {
    "int32_target": lambda x, t: F.cross_entropy(x, t.int()),
    "legacy_size_average": lambda x, t: F.cross_entropy(x, t, size_average=False),
    "prob_target_other_dtype": lambda x, t: F.cross_entropy(x, torch.rand(8, 5, dtype=torch.float64)),
    "weight_other_dtype": lambda x, t: F.cross_entropy(x, t, weight=torch.ones(5, dtype=torch.float64)),
    "label_smoothing_out_of_range": lambda x, t: F.cross_entropy(x, t, label_smoothing=1.5),
    "label_smoothing_tensor": lambda x, t: F.cross_entropy(x, t, label_smoothing=torch.tensor(0.1)),
    "bad_reduction": lambda x, t: F.cross_entropy(x, t, reduction="avg"),
    "target_shape": lambda x, t: F.cross_entropy(x, t[:4]),
    "int_input": lambda x, t: F.cross_entropy(x.long(), t),
    "bce_target_dtype": lambda x, t: F.binary_cross_entropy_with_logits(x, torch.rand(8, 5, dtype=torch.float64)),
    "bce_weight_bigger": lambda x, t: F.binary_cross_entropy_with_logits(x, torch.rand(8, 5), weight=torch.rand(2, 8, 5)),
    "bce_pos_weight_dtype": lambda x, t: F.binary_cross_entropy_with_logits(
        x, torch.rand(8, 5), pos_weight=torch.rand(5, dtype=torch.float64)),
    "bce_legacy_reduce": lambda x, t: F.binary_cross_entropy_with_logits(x, torch.rand(8, 5), reduce=False),
}


@pytest.mark.parametrize("case", list(FALL_THROUGH))
def test_unservable_calls_fall_through_to_the_original(case):
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(8, 5, generator=g), torch.randint(0, 5, (8,), generator=g)
    call = FALL_THROUGH[case]

    def seeded():
        torch.manual_seed(1)  # the cases draw extra random tensors
        return call(x.clone().requires_grad_(), t)

    _same_outcome(seeded)


def test_meta_tensors_fall_through():
    x, t = torch.randn(8, 5, device="meta", requires_grad=True), torch.zeros(8, dtype=torch.long, device="meta")
    with torch_only():
        r = F.cross_entropy(x, t, label_smoothing=0.1)
    assert r.device.type == "meta" and not ours(r)


def test_undo_leaves_a_later_replacement_alone():
    h = torch_only()
    mine = F.cross_entropy

    def theirs(*a, **k):
        return mine(*a, **k)

    F.cross_entropy = theirs
    try:
        with pytest.warns(UserWarning, match="replaced by someone else"):
            h.undo()
        assert F.cross_entropy is theirs
    finally:
        F.cross_entropy = ORIG_CE


def test_tensor_subclass_and_torch_function_mode():
    """The original hands these to __torch_function__ with func = the current
    F.cross_entropy (ours), which the handler calls on plain tensors: served by us, same value."""
    from torch.overrides import TorchFunctionMode

    seen = []

    class Mode(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            return func(*args, **(kwargs or {}))

    x, t = torch.randn(8, 5, dtype=torch.float64, requires_grad=True), torch.randint(0, 5, (8,))
    ref = ORIG_CE(x, t, label_smoothing=0.1)
    with torch_only():
        sub = F.cross_entropy(x.as_subclass(_Sub), t, label_smoothing=0.1)
        with Mode():
            moded = F.cross_entropy(x, t, label_smoothing=0.1)
        assert F.cross_entropy in seen
    assert type(sub) is _Sub
    torch.testing.assert_close(sub.as_subclass(torch.Tensor), ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(moded, ref, rtol=1e-12, atol=1e-12)


def test_torch_func_falls_through():
    x, t = torch.randn(8, 5, dtype=torch.float64), torch.randint(0, 5, (8,))
    ref_grad = torch.func.grad(lambda z: ORIG_CE(z, t, label_smoothing=0.1))(x)
    with torch_only():
        g = torch.func.grad(lambda z: F.cross_entropy(z, t, label_smoothing=0.1))(x)
        hess = torch.func.hessian(lambda z: F.cross_entropy(z, t, label_smoothing=0.1))(x)
    torch.testing.assert_close(g, ref_grad, rtol=1e-12, atol=1e-12)
    ref_hess = torch.func.hessian(lambda z: ORIG_CE(z, t, label_smoothing=0.1))(x)
    torch.testing.assert_close(hess, ref_hess, rtol=1e-12, atol=1e-12)
    xs, ts = torch.randn(3, 8, 5, dtype=torch.float64), torch.randint(0, 5, (3, 8))
    ref_v = torch.vmap(lambda z, y: ORIG_CE(z, y, label_smoothing=0.1))(xs, ts)
    with torch_only():
        got_v = torch.vmap(lambda z, y: F.cross_entropy(z, y, label_smoothing=0.1))(xs, ts)
    torch.testing.assert_close(got_v, ref_v, rtol=1e-12, atol=1e-12)


def test_autocast_upcasts_like_pytorch():
    x = torch.randn(16, 11).bfloat16()
    t = torch.randint(0, 11, (16,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = F.cross_entropy(x.clone().requires_grad_(), t, label_smoothing=0.1)
        with torch_only():
            got = F.cross_entropy(x.clone().requires_grad_(), t, label_smoothing=0.1)
    assert ours(got) and got.dtype == ref.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kw", [{}, dict(weight=torch.rand(5) + 0.1, pos_weight=torch.rand(5) + 0.5),
                                dict(reduction="none", weight=torch.rand(8, 1))])
def test_bce_served_equals_original(kw):
    x, t = torch.randn(8, 5, dtype=torch.float64), torch.rand(8, 5, dtype=torch.float64)
    kw = {k: v.double() if torch.is_tensor(v) else v for k, v in kw.items()}
    ref, ref_g, _ = _loss_and_grad(F.binary_cross_entropy_with_logits, x, t, **kw)
    crit = torch.nn.BCEWithLogitsLoss(**kw)
    with torch_only():
        got, got_g, was_ours = _loss_and_grad(F.binary_cross_entropy_with_logits, x, t, **kw)
        mod, mod_g, mod_ours = _loss_and_grad(crit, x, t)
    assert was_ours and mod_ours
    for a, b in ((got, ref), (got_g, ref_g), (mod, ref), (mod_g, ref_g)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# transformers: LabelSmoother and fixed_cross_entropy, directly


def _smoother_case(dtype, shift, num_items, ignore_index=-100, labels_dtype=torch.int64, trailing=False):
    g = torch.Generator().manual_seed(3)
    logits = (torch.randn(3, 6, 13, generator=g) * 3).to(dtype)
    labels = torch.randint(0, 13, (3, 6), generator=g)
    labels[0, 4:] = ignore_index
    labels[2, 1] = -7  # negative, not ignore_index: the original clamps it to class 0 and counts it
    labels = labels.to(labels_dtype)
    if trailing:
        labels = labels.unsqueeze(-1)
    if num_items == "tensor":
        num_items = torch.tensor(11)
    return logits, labels, num_items


@NEEDS_TRANSFORMERS
@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("num_items", [None, 11, "tensor"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_label_smoother_served_equals_original(shift, num_items, dtype):
    from transformers.trainer_pt_utils import LabelSmoother

    smoother = LabelSmoother(epsilon=0.1)
    logits, labels, n = _smoother_case(dtype, shift, num_items)

    def run():
        x = logits.clone().requires_grad_()
        loss = smoother({"logits": x}, labels, shift_labels=shift, num_items_in_batch=n)
        loss.backward()
        return loss, x.grad

    ref, ref_g = run()
    with labelsmooth_ext.patch(functional=False, modules=False, timm=False):
        got, got_g = run()
        assert is_our_node(got.grad_fn) or any(is_our_node(f[0]) for f in got.grad_fn.next_functions)
    assert got.dtype == ref.dtype
    # the original sums the smoothing term in float32 even for float64 logits
    tol = 2e-7 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(got, ref, rtol=tol, atol=tol)
    torch.testing.assert_close(got_g, ref_g, rtol=tol, atol=tol)


@NEEDS_TRANSFORMERS
def test_label_smoother_bfloat16_more_precise_same_dtype():
    from transformers.trainer_pt_utils import LabelSmoother

    smoother = LabelSmoother(epsilon=0.1)
    logits, labels, _ = _smoother_case(torch.bfloat16, True, None)
    exact = smoother({"logits": logits.double()}, labels, shift_labels=True)
    ref = smoother({"logits": logits}, labels, shift_labels=True)
    with labelsmooth_ext.patch(functional=False, modules=False, timm=False):
        got = smoother({"logits": logits.clone().requires_grad_()}, labels, shift_labels=True)
    assert got.dtype == ref.dtype == torch.float32
    # ours: the float32 loss of these bfloat16 logits; the original rounds log-probabilities to
    # bfloat16 first
    assert abs(float(got) - float(exact)) <= 1e-6 * abs(float(exact))
    assert abs(float(got) - float(exact)) <= abs(float(ref) - float(exact))


@NEEDS_TRANSFORMERS
@pytest.mark.parametrize("case", ["ignore_index_0", "int32_labels", "trailing_dim", "trailing_dim_shift",
                                  "tuple_output", "num_items_float"])
def test_label_smoother_fall_through_and_variants(case):
    from transformers.trainer_pt_utils import LabelSmoother

    ignore = 0 if case == "ignore_index_0" else -100
    smoother = LabelSmoother(epsilon=0.1, ignore_index=ignore)
    logits, labels, _ = _smoother_case(torch.float64, False, None, ignore_index=ignore,
                                       labels_dtype=torch.int32 if case == "int32_labels" else torch.int64,
                                       trailing=case.startswith("trailing_dim"))
    out = (logits,) if case == "tuple_output" else {"logits": logits}
    kw = dict(shift_labels=case == "trailing_dim_shift",
              num_items_in_batch=11.0 if case == "num_items_float" else None)

    def run():
        try:
            return float(smoother(out, labels, **kw))
        except Exception as e:  # noqa: BLE001
            return (type(e), str(e))

    ref = run()
    with labelsmooth_ext.patch(functional=False, modules=False, timm=False):
        got = run()
    if isinstance(ref, float):
        assert abs(got - ref) <= 2e-7 * abs(ref)
    else:
        assert got == ref


@NEEDS_TRANSFORMERS
@pytest.mark.parametrize("num_items", [None, 7])
def test_causal_lm_loss_served_equals_original(num_items):
    from transformers.loss.loss_utils import ForCausalLMLoss

    g = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 5, 17, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 17, (2, 5), generator=g)
    labels[1, :2] = -100

    def run():
        x = logits.clone().requires_grad_()
        loss = ForCausalLMLoss(x, labels, vocab_size=17, num_items_in_batch=num_items)
        loss.backward()
        return loss, x.grad

    ref, ref_g = run()
    with labelsmooth_ext.patch(functional=False, modules=False, timm=False) as h:
        assert "transformers.loss.loss_utils.fixed_cross_entropy" in h.names
        got, got_g = run()
    # ForCausalLMLoss computes in float32 (logits.float()): float32 rounding
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got_g, ref_g, rtol=1e-5, atol=1e-8)


# ---------------------------------------------------------------------------------------------
# timm, directly


@NEEDS_TIMM
@pytest.mark.parametrize("case", ["label_smoothing", "soft_target", "soft_target_3d"])
def test_timm_losses_served_equal_original(case):
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    g = torch.Generator().manual_seed(2)
    if case == "label_smoothing":
        crit, x = LabelSmoothingCrossEntropy(0.1), torch.randn(10, 6, generator=g, dtype=torch.float64)
        y = torch.randint(0, 6, (10,), generator=g)
    else:
        shape = (10, 6) if case == "soft_target" else (2, 5, 6)
        crit, x = SoftTargetCrossEntropy(), torch.randn(*shape, generator=g, dtype=torch.float64)
        y = torch.rand(*shape, generator=g, dtype=torch.float64)  # not normalised on purpose
    ref, ref_g, _ = _loss_and_grad(crit, x, y)
    with labelsmooth_ext.patch(functional=False, modules=False, transformers=False):
        got, got_g, was_ours = _loss_and_grad(crit, x, y)
    assert was_ours
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_g, ref_g, rtol=1e-12, atol=1e-12)


@NEEDS_TIMM
def test_timm_fall_through():
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    odd = LabelSmoothingCrossEntropy(0.1)
    odd.confidence = 0.8  # not 1 - smoothing: not PyTorch's formula
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.randint(0, 3, (4,))
    soft = torch.rand(4, 3, dtype=torch.float32)  # other dtype: the original promotes
    ref = (odd(x, y), SoftTargetCrossEntropy()(x, soft))
    with labelsmooth_ext.patch(functional=False, modules=False, transformers=False):
        got = (odd(x, y), SoftTargetCrossEntropy()(x, soft))
    for a, b in zip(got, ref):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_torch_compile_traces_the_patched_loss_to_our_operator():
    from torch.profiler import ProfilerActivity, profile

    criterion = torch.nn.CrossEntropyLoss(label_smoothing=0.1)

    def step(x, t):
        return criterion(x, t) + F.cross_entropy(x, t, label_smoothing=0.2, reduction="sum")

    x, t = torch.randn(16, 10, requires_grad=True), torch.randint(0, 10, (16,))
    ref = step(x, t)
    (ref_g,) = torch.autograd.grad(ref, x)
    torch._dynamo.reset()
    with torch_only():
        compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
        compiled(x, t)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            got = compiled(x, t)
            (got_g,) = torch.autograd.grad(got, x)
    torch._dynamo.reset()
    calls = {e.key: e.count for e in prof.key_averages()}
    assert calls.get("labelsmooth_ext::ce_forward") == 2, calls
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_g, ref_g, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# real client code, unpatched vs patched (subprocess, bounded)

CLIENT_TIMEOUT_S = 900
_root = os.path.dirname(os.path.dirname(os.path.abspath(labelsmooth_ext.__file__)))


@pytest.fixture(scope="module")
def clients():
    """The three clients, run once in one subprocess (offline, bounded by a timeout)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([_root, os.environ.get("PYTHONPATH", "")]))
    script = os.path.join(os.path.dirname(__file__), "patch_clients.py")
    try:
        proc = subprocess.run([sys.executable, script, "all"], env=env, capture_output=True, text=True,
                              timeout=CLIENT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the client runs did not finish in {CLIENT_TIMEOUT_S} s")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"client runs failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(lines[-1][len("RESULT "):])


def _check_run(r, op, float64=False):
    assert all(not ops for ops in r["ops_unpatched"].values()), r["ops_unpatched"]
    assert all(op in ops for ops in r["ops_patched"].values()), r["ops_patched"]
    base, got = r["losses_unpatched"], r["losses_patched"]
    assert len(base) == len(got) == 3
    if float64:
        assert r["max_abs_loss_diff"] <= 1e-12 and r["max_abs_weight_diff"] <= 1e-12, r
        return
    # the first step sees identical weights: float32 rounding only
    assert abs(base[0] - got[0]) <= 1e-6 * abs(base[0]), r
    # later steps: within the run's own float32 noise (the unpatched run with its loss scaled by
    # 1 + 2^-22 moves the weights by noise_max_abs_weight_diff)
    assert r["max_abs_loss_diff"] <= 4 * r["noise_max_abs_loss_diff"] + 2e-6 * max(map(abs, base)), r
    assert r["max_abs_weight_diff"] <= 4 * r["noise_max_abs_weight_diff"] + 1e-6, r


def test_client_plain_pytorch_script(clients):
    _check_run(clients["torch"], "labelsmooth_ext::ce_forward")


@NEEDS_TIMM
def test_client_timm_training(clients):
    for name, run in clients["timm"].items():
        op = "labelsmooth_ext::ce_prob_forward" if "soft_target" in name else "labelsmooth_ext::ce_forward"
        _check_run(run, op, float64=name.endswith("float64"))


@NEEDS_TRANSFORMERS
def test_client_transformers_trainer(clients):
    r = clients["transformers"]
    _check_run(r, "labelsmooth_ext::ce_forward")
    assert r["max_abs_model_labels_loss_diff"] <= 1e-6 * abs(r["extra_unpatched"]["model_labels_loss"])
    same = r["model_labels_same_weights"]
    assert "labelsmooth_ext::ce_forward" in same["ops_patched"]
    assert same["max_abs_loss_diff"] <= 1e-6 * abs(same["loss_unpatched"]) and same["max_abs_grad_diff"] <= 1e-6, same
