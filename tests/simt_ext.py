"""The SIMT emulation of the CUDA kernels, for the tests: builds csrc/cuda/simt/simt_ops.cpp (the
CUDA operators of csrc/cuda/host.cuh and the kernels they launch, compiled against the emulation
headers) into a small extension registering labelsmooth_simt::* for CPU tensors, and attaches
the same autograd as the real operators. The build directory is build/simt (incremental).

emulation() activates it for labelsmooth_ext's functional API (labelsmooth_ext._ops.emulated):
inside, CPU tensors take the CUDA code paths (in-place backward, no host target check, rows
for K-dimensional inputs) and run the CUDA kernels under the emulator.
"""
import contextlib
import importlib.util
import os
from pathlib import Path

import torch

import labelsmooth_ext  # noqa: F401  (loads the real operators and their autograd)
from labelsmooth_ext import _ops

ROOT = Path(__file__).resolve().parents[1]
_ops_ns = None


def load():
    """The labelsmooth_simt operator namespace (built on first use, ~1-2 min; then cached)."""
    global _ops_ns
    if _ops_ns is not None:
        return _ops_ns
    from torch.utils.cpp_extension import load as load_extension

    build_dir = ROOT / "build" / "simt"
    build_dir.mkdir(parents=True, exist_ok=True)
    lib_c = importlib.util.find_spec("labelsmooth_ext._C").origin
    load_extension(
        name="labelsmooth_simt",
        sources=[str(ROOT / "csrc" / "cuda" / "simt" / "simt_ops.cpp")],
        extra_cflags=["-O2", "-fvisibility=hidden", "-Wno-unknown-pragmas", "-DLSE_NO_BUILD_CONFIG"],
        # the shared host helpers of csrc/ops.cpp (argument checks, finish_loss, ...) from _C
        extra_ldflags=[lib_c, "-Wl,-rpath," + str(Path(lib_c).parent)],
        build_directory=str(build_dir),
        is_python_module=False,
        verbose=bool(os.environ.get("LSE_SIMT_VERBOSE")),
    )
    ns = torch.ops.labelsmooth_simt
    for name, setup in (("ce_forward", _ops._setup_ce), ("bce_forward", _ops._setup_bce),
                        ("ce_prob_forward", _ops._setup_prob)):
        torch.library.register_autograd(f"labelsmooth_simt::{name}", _ops._backward, setup_context=setup)
    torch.library.register_autograd("labelsmooth_simt::ce_forward_ext", _ops._backward_ext,
                                    setup_context=_ops._setup_ext)
    torch.library.register_autograd("labelsmooth_simt::ce_prob_forward_ext", _ops._backward_ext,
                                    setup_context=_ops._setup_prob_ext)
    for name in ("ce_backward", "ce_grad", "ce_grad_ext", "ce_prob_grad_ext"):
        torch.library.register_autograd(f"labelsmooth_simt::{name}", _ops._no_double_backward,
                                        setup_context=_ops._setup_nothing)
    _ops_ns = ns
    return ns


@contextlib.contextmanager
def emulation():
    """labelsmooth_ext's functional API runs the CUDA kernels under the SIMT emulator."""
    with _ops.emulated(load()):
        yield
