"""The build: what build_info reports, and the CUDA kernels' resource usage (no spills)."""
import os
import re
import shutil
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


def _library_path():
    import importlib.util

    return importlib.util.find_spec("labelsmooth_ext._C").origin


def _find_cuobjdump():
    candidates = [shutil.which("cuobjdump")]
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home:
            candidates.append(os.path.join(home, "bin", "cuobjdump"))
    try:  # triton (a torch dependency on Linux) ships one
        import triton

        candidates.append(str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"))
    except ImportError:
        pass
    return next((c for c in candidates if c and os.path.isfile(c) and os.access(c, os.X_OK)), None)


def parse_resource_usage(text):
    """{(arch, kernel): {"REG": n, "STACK": n, "LOCAL": n, ...}} from cuobjdump --dump-resource-usage."""
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
