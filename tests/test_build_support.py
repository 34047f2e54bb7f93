"""The build decisions of _build_support.py (the module next to setup.py), without building:
which torch an isolated build gets, when it must stop, whether the CUDA kernels are compiled,
and the messages that say so."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("_build_support", ROOT / "_build_support.py")
bs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bs)

NVCC_13 = """nvcc: NVIDIA (R) Cuda compiler driver
Copyright (c) 2005-2025 NVIDIA Corporation
Built on Wed_Aug_20_01:58:59_PM_PDT_2025
Cuda compilation tools, release 13.0, V13.0.88
Build cuda_13.0.r13.0/compiler.36424714_0
"""


def test_parse_nvcc_release():
    assert bs.parse_nvcc_release(NVCC_13) == "13.0"
    assert bs.parse_nvcc_release("Cuda compilation tools, release 12.1, V12.1.105") == "12.1"
    assert bs.parse_nvcc_release("something else") is None
    assert bs.parse_nvcc_release("") is None


# ---- CUDA kernels or not ----


def test_toolkit_of_another_major_version_falls_back_to_cpu_with_both_versions_named():
    d = bs.decide_cuda("2.4.1+cu121", "12.1", "/usr/local/cuda", True, "13.0")
    assert not d.with_cuda and d.error is None
    for text in (d.reason, d.warning):
        assert "CUDA 13.0" in text and "CUDA 12.1" in text and "torch 2.4.1+cu121" in text
    assert "/usr/local/cuda" in d.reason
    # how to get the CUDA kernels, and how to make this an error
    assert "CUDA_HOME" in d.warning and "CUDA 12.x toolkit" in d.warning
    assert "LABELSMOOTH_EXT_REQUIRE_CUDA=1" in d.warning
    assert d.warning.startswith("WARNING: labelsmooth_ext: building the CPU kernels only")


def test_require_cuda_turns_the_fallback_into_an_error_naming_the_reason():
    d = bs.decide_cuda("2.8.0+cu128", "12.8", "/usr/local/cuda", True, "13.0", require_cuda=True)
    assert not d.with_cuda
    assert d.error.startswith("labelsmooth_ext: LABELSMOOTH_EXT_REQUIRE_CUDA=1 is set, but the CUDA")
    assert "CUDA 13.0" in d.error and "CUDA 12.8" in d.error


@pytest.mark.parametrize("nvcc, torch_cuda", [("13.0", "13.0"), ("12.8", "12.1"), ("12.1", "12.8"),
                                              (None, "12.1")])
def test_same_major_version_or_unreadable_nvcc_builds_cuda(nvcc, torch_cuda):
    # torch itself only warns within a major version, and does not check an unreadable version
    d = bs.decide_cuda("2.9.0", torch_cuda, "/opt/cuda", True, nvcc, require_cuda=True)
    assert d == bs.CudaDecision(True, None, None, None)


def test_cpu_only_on_purpose():
    d = bs.decide_cuda("2.14.1+cu130", "13.0", "/usr/local/cuda", True, "13.0", cpu_only=True)
    assert not d.with_cuda and d.warning is None and d.error is None
    assert "LABELSMOOTH_EXT_CPU_ONLY=1" in d.reason and "on purpose" in d.reason
    # asking for both is a contradiction, reported as such
    d = bs.decide_cuda("2.14.1+cu130", "13.0", "/usr/local/cuda", True, "13.0", cpu_only=True,
                       require_cuda=True)
    assert "LABELSMOOTH_EXT_CPU_ONLY=1" in d.error


def test_cpu_torch_and_missing_toolkit():
    d = bs.decide_cuda("2.4.1+cpu", None, "/usr/local/cuda", True, "13.0")
    assert not d.with_cuda and d.reason == "torch 2.4.1+cpu is a build without CUDA"
    d = bs.decide_cuda("2.4.1", "12.1", None, False, None)
    assert not d.with_cuda and d.warning is None
    assert "no CUDA toolkit found" in d.reason and "CUDA 12.x toolkit" in d.reason
    d = bs.decide_cuda("2.4.1", "12.1", "/opt/cuda", False, None, require_cuda=True)
    assert "no nvcc in CUDA_HOME=/opt/cuda" in d.reason and d.error


def test_decision_agrees_with_torchs_own_check(monkeypatch):
    """On this machine's toolkit and torch: the fallback happens exactly when torch would refuse."""
    from torch.utils import cpp_extension

    check = getattr(cpp_extension, "_check_cuda_version", None)
    home = cpp_extension.CUDA_HOME
    if check is None or torch.version.cuda is None or not home or \
            not os.path.exists(os.path.join(home, "bin", "nvcc")):
        pytest.skip("needs a CUDA build of torch and an nvcc (and torch's private _check_cuda_version)")
    d = bs.decide_cuda(torch.__version__, torch.version.cuda, home, True, bs.nvcc_release(home))
    monkeypatch.setenv("TORCH_DONT_CHECK_COMPILER_ABI", "1")  # the version check only
    try:
        check("c++", cpp_extension.TorchVersion("12.0"))
        refused = False
    except RuntimeError as e:
        assert "mismatches" in str(e), e
        refused = True
    assert d.with_cuda == (not refused), d


# ---- the torch of an isolated build ----


@pytest.mark.parametrize("target, requirement", [
    (None, "torch>=2.4"),
    ("2.4.1+cu121", "torch==2.4.1"),
    ("2.14.1", "torch==2.14.1"),
    ("2.10.0+cpu", "torch==2.10.0"),
    ("2.3.1", "torch>=2.4"),             # below the minimum: pip replaces it
    ("2.9.0a0+git1234", "torch>=2.4"),   # a source build no index has: setup.py's check decides
    ("2.10.0.dev20250101", "torch>=2.4"),
])
def test_build_requirement_follows_the_installed_torch(target, requirement):
    assert bs.torch_build_requirement(target) == requirement


def test_mismatch_stops_the_build_with_what_to_run():
    msg = bs.torch_mismatch_error("2.14.1+cu130", "2.4.1+cu121")
    assert "got torch 2.14.1+cu130" in msg and "has torch 2.4.1+cu121" in msg
    assert "pip install --no-build-isolation ." in msg
    assert "LABELSMOOTH_EXT_SKIP_TORCH_CHECK=1" in msg
    # the local label counts: a +cpu torch cannot load a library built against a CUDA torch
    assert bs.torch_mismatch_error("2.4.1", "2.4.1+cpu")


def test_a_source_build_of_torch_stops_the_isolated_build_at_once(monkeypatch):
    assert bs.source_build_error("2.4.1+cu121") is None and bs.source_build_error(None) is None
    monkeypatch.setattr(bs, "installed_torch", lambda: {"version": "2.9.0a0+git1234", "location": "/x"})
    monkeypatch.delenv("LABELSMOOTH_EXT_SKIP_TORCH_CHECK", raising=False)
    with pytest.raises(SystemExit) as e:
        bs.get_requires_for_build_wheel()
    assert "torch 2.9.0a0+git1234 is a build from source" in str(e.value)
    assert "pip install --no-build-isolation ." in str(e.value)
    monkeypatch.setenv("LABELSMOOTH_EXT_SKIP_TORCH_CHECK", "1")
    assert bs.get_requires_for_build_editable() == ["torch>=2.4"]


@pytest.mark.parametrize("build, target, same_env", [
    ("2.4.1+cu121", "2.4.1+cu121", False),
    ("2.14.1", None, False),          # no torch yet: pip installs the one the wheel pins
    ("2.14.1", "2.3.0", False),       # below the minimum: pip replaces it with the pinned one
    ("2.14.1", "2.4.1", True),        # the same environment (a non-isolated build)
])
def test_no_mismatch(build, target, same_env):
    assert bs.torch_mismatch_error(build, target, same_environment=same_env) is None


def test_installed_torch_is_the_one_of_this_environment():
    found = bs.installed_torch()
    assert found["version"] == torch.__version__
    assert Path(found["location"]).resolve() == Path(torch.__file__).resolve().parent
    assert bs.installed_torch("/nonexistent/python") is None
    # what pip's isolated build asks for here
    assert bs.get_requires_for_build_wheel() == [bs.torch_build_requirement(torch.__version__)]


def test_setup_py_stops_on_contradictory_settings_before_writing_anything():
    generated = [ROOT / "labelsmooth_ext" / "_build_info.py", ROOT / "csrc" / "build_config.h"]
    before = [p.stat().st_mtime_ns if p.exists() else None for p in generated]
    env = dict(os.environ, LABELSMOOTH_EXT_CPU_ONLY="1", LABELSMOOTH_EXT_REQUIRE_CUDA="1")
    r = subprocess.run([sys.executable, str(ROOT / "setup.py"), "--version"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert "LABELSMOOTH_EXT_REQUIRE_CUDA=1 is set, but the CUDA kernels cannot be built" in r.stderr
    assert [p.stat().st_mtime_ns if p.exists() else None for p in generated] == before
