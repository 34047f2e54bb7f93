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

# Tolerances against a float64 result, relative to the largest magnitude of the reference
# (losses and mean-reduced gradients are compared as whole tensors).
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}


def assert_close_to(actual, expected, dtype, what=""):
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    nan_a, nan_e = actual.isnan(), expected.isnan()
    assert torch.equal(nan_a, nan_e), f"{what}: NaN positions differ"
    a, e = actual[~nan_a], expected[~nan_e]
    if a.numel() == 0:
        return
    inf_a, inf_e = a.isinf(), e.isinf()
    assert torch.equal(inf_a, inf_e) and torch.equal(a[inf_a], e[inf_e]), f"{what}: inf positions differ"
    a, e = a[~inf_a], e[~inf_e]
    if a.numel() == 0:
        return
    tol = TOL[dtype]
    # Relative to the largest reference value; where the reference is (near) zero because O(1)
    # terms cancel exactly (K = 1: p = q = 1), relative to 0.01 instead.
    scale = max(float(e.abs().max()), 1e-2)
    err = float((a - e).abs().max())
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol:g} * {scale:.3g}"


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
