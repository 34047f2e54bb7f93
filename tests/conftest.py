import math
import os

import pytest
import torch

import labelsmooth_ext  # noqa: F401  (loads the operators)

HAS_CUDA = torch.cuda.is_available() and labelsmooth_ext.build_info()["cuda"]
CUDA_SKIP_REASON = (
    "no CUDA GPU on this machine" if not torch.cuda.is_available()
    else "labelsmooth_ext was built without CUDA kernels"
)



class EmulatedCuda(str):
    """The "simt" test device: the CUDA kernels (csrc/cuda) run on the CPU under the SIMT
    emulation (tests/simt_ext.py). Tensors live on the CPU (torch sees the string "cpu"), while
    the test compares unequal to "cpu" and "cuda", and the autouse fixture below routes
    labelsmooth_ext's functional API to the emulated operators for the test."""

    def __new__(cls):
        return super().__new__(cls, "cpu")

    def __eq__(self, other):
        return isinstance(other, EmulatedCuda) or other == "simt"

    def __ne__(self, other):
        return not self.__eq__(other)

    __hash__ = str.__hash__

    def __repr__(self):
        return "simt"


SIMT = EmulatedCuda()
SIMT_SKIP = os.environ.get("LSE_NO_SIMT", "") not in ("", "0")
SIMT_PARAM = pytest.param(SIMT, id="simt", marks=pytest.mark.skipif(SIMT_SKIP, reason="LSE_NO_SIMT is set"))
CUDA_PARAM = pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason=CUDA_SKIP_REASON))
# The real devices, and the emulated GPU: CUDA semantics and CUDA kernels on CPU tensors.
REAL_DEVICES = ["cpu", CUDA_PARAM]
DEVICES = REAL_DEVICES + [SIMT_PARAM]
CUDA_DEVICES = [CUDA_PARAM, SIMT_PARAM]


def is_emulated(device):
    return isinstance(device, EmulatedCuda)


@pytest.fixture(autouse=True)
def _simt_emulation(request):
    """Tests parametrised with the simt device run with the emulated operators."""
    callspec = getattr(request.node, "callspec", None)
    if callspec is None or not any(is_emulated(v) for v in callspec.params.values()):
        yield
        return
    import simt_ext

    with simt_ext.emulation():
        yield
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]

# Per-element tolerances against a float64 result of the same input values. Each element i
# must satisfy
#     |actual_i - expected_i| <= REL_i + ATOL_REL[dtype] * scale,
# REL_i = RTOL[dtype] * |expected_i| for float32 / float64, and ulps * ulp_dtype(expected_i) for
# bfloat16 / float16 (their result is computed in float32 and rounded once: at most half a unit
# in the last place plus float32 error, so 1 ULP; a gradient scaled by an incoming gradient
# other than 1 is rounded twice: pass ulps=2). scale is the largest |expected| (1 where the
# reference is identically 0 because O(1) terms cancel, e.g. K = 1): ATOL_REL is only the
# accumulation type's own cancellation error (p_y - q_y near 0; a sum of terms of both signs),
# a few units of float32 / float64 rounding, not a tolerance for wrong values.
# float32: the CPU kernels' vector exp (at::vec exp_u20) is good to 20 ULP (2.4e-6 relative),
# then a log, a division and a product: 5e-6. float64: sums over up to 1e5 classes.
RTOL = {torch.float64: 1e-12, torch.float32: 5e-6}
ATOL_REL = {torch.float64: 1e-14, torch.float32: 5e-7, torch.bfloat16: 5e-7, torch.float16: 5e-7}
# Kept for tests written against the former whole-tensor helper.
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}


def ulp(values, dtype):
    """Spacing of `dtype`'s representable numbers at each |value| (float64 tensor in and out);
    subnormal spacing below the smallest normal number."""
    fi = torch.finfo(dtype)
    mant, expo = torch.frexp(values.abs().double())  # |v| = mant * 2**expo, mant in [0.5, 1)
    spacing = torch.ldexp(torch.full_like(mant, fi.eps / 2), expo)  # 2**(expo - 1) * eps
    return spacing.clamp_min(fi.tiny * fi.eps)


def element_bound(expected, dtype, ulps=1, rtol=None, atol_rel=None, scale=None):
    """The per-element error bound assert_close_to applies (float64 tensor)."""
    e = expected.detach().double().cpu()
    if scale is None:
        scale = float(e.abs().max()) if e.numel() else 0.0
        scale = scale if scale > 0 else 1.0
    elif isinstance(scale, torch.Tensor):  # a size per element (or one, broadcast)
        scale = scale.detach().double().cpu()
    # plus the accumulation type's smallest normal number: values below it (e.g. eps = 1e-200
    # times a gradient) are not representable in float32 accumulation
    acc_tiny = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).tiny
    atol = (ATOL_REL[dtype] if atol_rel is None else atol_rel) * scale + acc_tiny
    if dtype in (torch.bfloat16, torch.float16):
        rel = ulps * ulp(e, dtype)
        if rtol is not None:
            rel = torch.maximum(rel, rtol * e.abs())
    else:
        rel = (RTOL[dtype] if rtol is None else rtol) * e.abs()
    return rel + atol


def assert_close_to(actual, expected, dtype, what="", *, ulps=1, rtol=None, atol_rel=None, scale=None):
    """Every element of `actual` against the float64 `expected` (see RTOL / ATOL_REL above):
    same shape, NaN and inf at the same places, every finite element within its own bound."""
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    nan_a, nan_e = actual.isnan(), expected.isnan()
    assert torch.equal(nan_a, nan_e), (
        f"{what}: NaN positions differ (actual NaN at {nan_a.nonzero()[:5].tolist()}, "
        f"expected NaN at {nan_e.nonzero()[:5].tolist()})")
    inf_a, inf_e = actual.isinf(), expected.isinf()
    assert torch.equal(inf_a, inf_e) and torch.equal(actual[inf_a], expected[inf_e]), (
        f"{what}: inf positions differ")
    finite = ~(nan_e | inf_e)
    if not bool(finite.any()):
        return
    a, e = actual[finite], expected[finite]
    if isinstance(scale, torch.Tensor) and scale.dim() > 0:
        scale = scale.detach().double().cpu().expand(expected.shape)[finite]
    bound = element_bound(e, dtype, ulps=ulps, rtol=rtol, atol_rel=atol_rel, scale=scale)
    err = (a - e).abs()
    ratio = err / bound
    _record(what, dtype, ratio)
    worst = int(ratio.argmax())
    if float(ratio[worst]) > 1.0:
        idx = finite.nonzero()[worst].tolist()
        bad = int((ratio > 1).sum())
        raise AssertionError(
            f"{what}: {bad} of {e.numel()} elements out of bound; worst at index {idx}: actual "
            f"{float(a[worst])!r}, expected {float(e[worst])!r}, error {float(err[worst]):.3g} > "
            f"bound {float(bound[worst]):.3g} ({dtype})")


_STATS = os.environ.get("LSE_TOL_STATS")  # a path: log each comparison's worst error / bound


def _record(what, dtype, ratio):
    if _STATS:
        with open(_STATS, "a") as f:
            f.write(f"{float(ratio.max()):.4g}\t{dtype}\t{what}\t{os.environ.get('PYTEST_CURRENT_TEST', '')}\n")
def random_targets(n, k, ignore_frac=0.2, ignore_index=-100, device="cpu", generator=None):
    t = torch.randint(0, k, (n,), generator=generator)
    if ignore_frac:
        t[torch.rand(n, generator=generator) < ignore_frac] = ignore_index
    return t.to(device)


@pytest.fixture(autouse=True)
def _seed():
    """Deterministic inputs per test (LSE_TEST_SEED picks another draw, to hunt for flakiness)."""
    import os

    torch.manual_seed(int(os.environ.get("LSE_TEST_SEED", "0")))


def fused_row_semantics(ref_grad, target, ignore_index=-100, nan_rows=None):
    """A float64 PyTorch gradient as this library defines it per row (semantics.md): a row
    (position, for K-dim) whose target is ignore_index has a gradient of exactly 0 (PyTorch
    leaves NaN there when the row's logits hold NaN or are all -inf), and a row with a NaN
    anywhere (or flagged in nan_rows) is NaN throughout (PyTorch's K-dim backward leaves some
    of such a row finite).
    Class-index targets; the class dim is 1 (0 for a (C,) input)."""
    g = ref_grad.detach().clone()
    rows = g.unsqueeze(0) if g.dim() == 1 else g.movedim(1, -1)  # (..., C) view of g
    nan = rows.isnan().any(-1)
    if nan_rows is not None:
        nan = nan | nan_rows.reshape(nan.shape)
    rows[nan] = float("nan")
    ignored = (target.reshape(nan.shape) == ignore_index)
    rows[ignored] = 0.0
    return g


def skip_if_subnormals_flushed():
    """Skips a test that needs subnormal floats when this process flushes them to zero: on torch 2.4
    a CPU kernel compiled by an earlier torch.compile test (built with -ffast-math) sets the
    processor's flush-to-zero / denormals-are-zero modes for the whole process."""
    tiny = float(os.environ.get("LSE_TEST_TINY", "5e-324"))
    if tiny * 1.0 == 0.0:
        pytest.skip(f"subnormal floats are flushed to zero in this process (torch {torch.__version__}: "
                    "an earlier torch.compile kernel built with -ffast-math)")
