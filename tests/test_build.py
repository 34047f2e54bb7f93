"""The build: what build_info reports, and the CUDA kernels' resource usage (no spills)."""
import functools
import subprocess
from pathlib import Path

import pytest
import torch

import labelsmooth_ext as L


def test_build_info():
    info = L.build_info()
    assert info["torch_version"] == torch.__version__
    assert isinstance(info["cuda"], bool)
    assert "DEFAULT" in info["cpu_kernels"]
    if info["cuda"]:
        assert info["cuda_archs"], "a CUDA build must list its architectures"
        assert info["cuda_absent_reason"] is None
    else:
        assert info["cuda_absent_reason"], "a build without CUDA kernels must say why"


def test_cpu_kernels_run_on_torch_intra_op_threads():
    # at::parallel_for is inlined from ATen's headers: compiled without torch's parallel backend
    # (-fopenmp for the Linux wheels) it silently runs every range on the calling thread, and
    # torch.set_num_threads has no effect on our kernels (it did so until this check existed).
    info = L.build_info()
    assert isinstance(info["cpu_parallel"], bool)
    if torch.backends.openmp.is_available():
        assert info["cpu_parallel"], "the CPU kernels were compiled without -fopenmp: serial"


def _library_path():
    import importlib.util

    return importlib.util.find_spec("labelsmooth_ext._C").origin


def _find_cuobjdump():
    return _sass_report().find_cuobjdump()


def parse_resource_usage(text):
    """{(arch, kernel): {"REG": n, "STACK": n, "LOCAL": n, ...}} from cuobjdump --dump-resource-usage
    (bench/sass_report.py's reader: one parser for the report and the tests)."""
    return _sass_report().parse_resource_usage(text)


def test_parse_resource_usage():
    sample = (
        "arch = sm_90\n Function _Z1kv:\n  REG:40 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:8\n"
        " Function _Z1jv:\n  REG:64 STACK:16 SHARED:0 LOCAL:8\n"
    )
    u = parse_resource_usage(sample)
    assert u[("sm_90", "_Z1kv")]["REG"] == 40 and u[("sm_90", "_Z1jv")]["STACK"] == 16


def test_cuda_kernels_have_no_spills_or_stack():
    info = L.build_info()
    if not info["cuda"]:
        pytest.skip(f"labelsmooth_ext was built without CUDA kernels: {info['cuda_absent_reason']}")
    tool = _find_cuobjdump()
    assert tool, "cuobjdump not found: install the CUDA toolkit or `pip install nvidia-cuda-cuobjdump`"
    out = subprocess.run([tool, "--dump-resource-usage", _library_path()], capture_output=True,
                         text=True, check=True).stdout
    usage = parse_resource_usage(out)
    archs = {a for a, _ in usage}
    for spec in info["cuda_archs"]:
        sm = "sm_" + spec.split("+")[0].replace(".", "")
        assert sm in archs, f"no kernels for {sm} in the library (found {sorted(archs)})"
    kernels = {fn for _, fn in usage}
    assert any("ce_forward_kernel" in k for k in kernels) and any("scale_kernel" in k for k in kernels)
    bad = {k: v for k, v in usage.items() if v.get("STACK", 0) or v.get("LOCAL", 0)}
    assert not bad, "kernels with stack or local memory (register spills): " + "; ".join(
        f"{a} {fn}: REG {v['REG']} STACK {v.get('STACK')} LOCAL {v.get('LOCAL')}" for (a, fn), v in bad.items())


def test_import_of_a_build_for_another_torch_says_what_to_run(monkeypatch):
    from labelsmooth_ext import _build_info, _ops

    monkeypatch.setitem(_build_info.BUILD_INFO, "torch_version", "0.0.1")
    with pytest.raises(ImportError, match=r"built against torch 0\.0\.1 .*pip install --no-build-isolation"):
        _ops._load_library()


def test_import_without_a_compiled_library_says_what_to_run(monkeypatch):
    import importlib.util

    from labelsmooth_ext import _ops

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "labelsmooth_ext._C" else real(name, *a))
    with pytest.raises(ImportError, match=r"compiled library \(_C\) is missing; build it .*pip install"):
        _ops._load_library()


@functools.lru_cache(maxsize=None)
def _sass_report():
    """bench/sass_report.py (the SASS reader) as a module."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "bench" / "sass_report.py"
    spec = importlib.util.spec_from_file_location("sass_report", path)
    mod = importlib.util.module_from_spec(spec)
    import sys

    sys.modules["sass_report"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


_SERIAL = """arch = sm_90
\t\tFunction : _Z1kv
        /*0000*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0010*/                   FADD R8, R4, R5 ;
        /*0020*/                   LDG.E.128 R12, desc[UR4][R2.64+0x10] ;
        /*0030*/                   FADD R8, R12, R8 ;
        /*0040*/                   SHFL.BFLY PT, R9, R8, 0x1, 0x1f ;
        /*0050*/                   STG.E.128 desc[UR4][R2.64], R4 ;
"""
_BACK_TO_BACK = """arch = sm_90
\t\tFunction : _Z1jv
        /*0000*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0010*/                   LDG.E.128 R8, desc[UR4][R2.64+0x10] ;
        /*0020*/                   LDG.E.128 R12, desc[UR4][R2.64+0x20] ;
        /*0030*/                   LDG.E.128 R16, desc[UR4][R2.64+0x30] ;
        /*0040*/                   FADD R20, R4, R8 ;
        /*0050*/                   FADD R20, R12, R16 ;
        /*0060*/                   LDG.E.128 R4, desc[UR4][R2.64+0x40] ;
        /*0070*/                   FADD R20, R4, R20 ;
        /*0080*/                   ISETP.GE.AND P0, PT, R20, 0x4, PT ;
        /*0090*/               @P0 BRA 0x60 ;
        /*00a0*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
"""


def test_sass_load_counter():
    S = _sass_report()
    (serial,) = S.parse_sass(_SERIAL)
    p1, _ = S.split_passes(serial.insns)
    assert S.pass_stats(p1).straight == 1
    (b2b,) = S.parse_sass(_BACK_TO_BACK)
    p1, p2 = S.split_passes(b2b.insns)
    st = S.pass_stats(p1)
    assert (st.loads, st.straight, st.loop) == (5, 4, 1) and p2 == []


def test_forward_kernels_issue_pass1_loads_back_to_back():
    """Pass 1 of every ce_forward_kernel issues at least four 16-byte loads before it uses the first
    (issue 10 item 1: one load consumed before the next is issued leaves HBM mostly idle)."""
    info = L.build_info()
    if not info["cuda"]:
        pytest.skip("labelsmooth_ext was built without CUDA kernels (no nvcc at build time)")
    rows = _collected()
    fwd = [r for r in rows if "ce_forward_kernel" in r["name"]]
    assert fwd, "no ce_forward_kernel in the library's SASS"
    serial = [f"{r['arch']} {r['name']}: {r['p1'].straight}" for r in fwd if r["p1"].straight < 4]
    assert not serial, "pass-1 16-byte loads serialized (in flight before first use < 4): " + "; ".join(serial)


@functools.lru_cache(maxsize=1)
def _collected():
    """The built library's kernels as bench/sass_report.py reads them (cuobjdump once per run)."""
    tool = _find_cuobjdump()
    assert tool, "cuobjdump not found: install the CUDA toolkit or `pip install nvidia-cuda-cuobjdump`"
    rows, _ = _sass_report().collect(_library_path(), tool)
    return rows


def test_sass_report_predicts_every_kernel():
    """Issue 10: the report lists every kernel of the library and prints a (model) prediction for
    every kernel family on each GPU it models: the row kernels, the split and probability-target
    kernels by their own models, every other kernel (tensor parallel, bce, scale) as a stream."""
    info = L.build_info()
    if not info["cuda"]:
        pytest.skip("labelsmooth_ext was built without CUDA kernels (no nvcc at build time)")
    S = _sass_report()
    rows = _collected()
    text = S.report(rows)
    families = {r["name"].split("<")[0] for r in rows}
    assert {"ce_forward_kernel", "ce_prob_kernel", "scale_kernel"} <= families, families
    for r in rows:
        assert f"{r['arch']:6} {r['name'][:44]}" in text, f"{r['arch']} {r['name']} missing from the listing"
    predicted = [ln for ln in text.splitlines() if "predicted" in ln]
    for gpu in S.GPUS:
        for fam in families:
            if fam.startswith("ce_split_"):  # both split kernels predict together, per shape
                fam = "chunks per row"
            elif fam == "ce_forward_kernel":
                fam = "ce_forward_kernel<"
            assert any(ln.strip().startswith(gpu) and fam in ln for ln in predicted), f"{gpu}: no prediction for {fam}"


def test_sass_report_reads_the_dispatch_table():
    """bench/sass_report.py takes dispatch_forward's thresholds from csrc/cuda/dispatch.cuh's
    kRowKernelLimits (one place), and picks the kernel the C++ dispatch would."""
    S = _sass_report()
    limits = S.row_kernel_limits()
    assert [t for t, _, _ in limits] == [8, 32, 128, 256]
    assert all(a[1] < b[1] and a[2] < b[2] for a, b in zip(limits, limits[1:]))
    assert S.dispatch("float", 4 * 32000) == 512 and S.dispatch("BFloat16", 2 * 32000) == 256
    assert S.dispatch("BFloat16", 2 * 50257) == 512 and S.dispatch("float", 4 * 24576) == 256
    assert S.dispatch("float", 40) == 8 and S.dispatch("Half", 2 * 1000) == 32
    with pytest.raises(RuntimeError, match="kRowKernelLimits"):
        S.row_kernel_limits(Path(__file__))  # a file without the table: an error, not a guess
