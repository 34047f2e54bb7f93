"""Build decisions for labelsmooth_ext, kept out of setup.py so that they can be tested without
building (tests/test_build_support.py), and the PEP 517 build backend that pyproject.toml names.

Two problems are decided here:

1. Which torch to build against. The compiled library only works with the torch release it was
   built against. A plain `pip install .` builds in an isolated environment, so the backend asks
   the target environment (the interpreter pip runs, seen without pip's isolation) which torch it
   has and requires exactly that release for the build; setup.py then checks that the build's
   torch is the installed one and stops with the command to run when it is not.
2. Whether to compile the CUDA kernels. torch refuses to build an extension with a CUDA toolkit
   whose major version differs from the one torch was built with; then the CPU kernels are built
   alone, with a warning naming both versions (or an error, with LABELSMOOTH_EXT_REQUIRE_CUDA=1).

Nothing here imports torch: the backend hooks run before torch is installed.
"""
import json
import os
import re
import subprocess
import sys
from typing import NamedTuple, Optional

# The PEP 517 hooks of setuptools, unchanged except for the build requirements below.
from setuptools.build_meta import *  # noqa: F401,F403

MIN_TORCH = "2.4"
ENV_CPU_ONLY = "LABELSMOOTH_EXT_CPU_ONLY"
ENV_REQUIRE_CUDA = "LABELSMOOTH_EXT_REQUIRE_CUDA"
ENV_SKIP_TORCH_CHECK = "LABELSMOOTH_EXT_SKIP_TORCH_CHECK"


def truthy(value):
    return (value or "").strip().lower() not in ("", "0", "false", "no", "off")


def _release(version):
    """(2, 4, 1) from "2.4.1+cu121"; None when the version does not start with a release number."""
    m = re.match(r"\s*v?(\d+(?:\.\d+)*)", version or "")
    return tuple(int(p) for p in m.group(1).split(".")) if m else None


def public_version(version):
    """The version without its local label: "2.4.1" from "2.4.1+cu121"."""
    return version.split("+", 1)[0]


# ---- 1. the torch to build against ----------------------------------------------------------

def torch_build_requirement(target_version):
    """The torch requirement of the build environment, given the target environment's torch
    version (None when it has none).

    The target's release exactly, when it is a plain release at least MIN_TORCH: pip installs the
    same release (from its cache or index) into the isolated build. The local label (+cu121, +cpu)
    is left out: a plain pin finds the release on any index; a build whose variant then differs
    from the installed one is stopped by torch_mismatch_error. Otherwise (no torch, a torch older
    than the minimum, which pip replaces anyway, or a pre-release/source build that no index has)
    the declared range: setup.py then pins the wheel to the torch it was built with.
    """
    if target_version and re.fullmatch(r"\d+(\.\d+)*", public_version(target_version)):
        if _release(target_version) >= _release(MIN_TORCH):
            return f"torch=={public_version(target_version)}"
    return f"torch>={MIN_TORCH}"


def torch_mismatch_error(build_version, target_version, same_environment=False):
    """None when a library built against torch `build_version` will import in the target
    environment (torch `target_version`, None for none); else the message that stops the build."""
    if same_environment or not target_version or build_version == target_version:
        return None
    if _release(target_version) is not None and _release(target_version) < _release(MIN_TORCH):
        return None  # below the declared minimum: pip replaces it with the build's torch (pinned)
    return (
        f"labelsmooth_ext: this isolated build got torch {build_version}, but the environment it "
        f"installs into has torch {target_version}, and the compiled library only imports with "
        "the torch it was built against. Build against the installed torch instead:\n"
        "    pip install 'setuptools>=77' wheel ninja numpy\n"
        "    pip install --no-build-isolation .\n"
        f"(or install torch {build_version} first). {ENV_SKIP_TORCH_CHECK}=1 skips this check."
    )


# torch.__version__ of an environment without importing torch (seconds): torch/version.py.
# The distribution's metadata version is no substitute: it can lack the local label (+cu130).
_TARGET_TORCH_CODE = r"""
import importlib.util, json, os, re, sys
sys.path = [p for p in sys.path if p not in ("", ".")]  # not the source tree (the current dir)
spec = importlib.util.find_spec("torch")
if spec is None or not spec.origin:
    print("null")
else:
    where = os.path.dirname(spec.origin)
    with open(os.path.join(where, "version.py")) as f:
        m = re.search(r"^__version__\s*(?::[^=]*)?=\s*['\"]([^'\"]+)", f.read(), re.M)
    print(json.dumps({"version": m and m.group(1), "location": where}))
"""


def installed_torch(executable=None):
    """{"version": torch.__version__, "location": torch's package directory} in the environment
    of `executable` (default: this interpreter) as it is outside any build isolation (`-E`:
    without PYTHONPATH and PYTHONNOUSERSITE, through which pip isolates a build; so the user's
    site-packages count, as at run time), or None when it has no torch or cannot say."""
    try:
        out = subprocess.run([executable or sys.executable, "-E", "-c", _TARGET_TORCH_CODE],
                             capture_output=True, text=True, timeout=60, check=True).stdout
        found = json.loads(out.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None
    return found if found and found.get("version") else None


def source_build_error(target_version):
    """The message that stops an isolated build at once when the installed torch is a build from
    source ("2.9.0a0+git1234"), which no index has (else it would stop only after installing
    another torch into the build environment); None otherwise."""
    if "+git" not in (target_version or ""):
        return None
    return (
        f"labelsmooth_ext: the installed torch {target_version} is a build from source, which an "
        "isolated build cannot install; build against it instead:\n"
        "    pip install 'setuptools>=77' wheel ninja numpy\n"
        "    pip install --no-build-isolation ."
    )


def _requires():
    target = installed_torch()
    version = target and target["version"]
    if source_build_error(version) and not truthy(os.environ.get(ENV_SKIP_TORCH_CHECK)):
        sys.exit(source_build_error(version))
    return [torch_build_requirement(version)]


def get_requires_for_build_wheel(config_settings=None):
    # setuptools' own hook would run setup.py, which imports torch before it is installed.
    return _requires()


def get_requires_for_build_editable(config_settings=None):
    return _requires()


def get_requires_for_build_sdist(config_settings=None):
    return _requires()


# ---- 2. the CUDA kernels --------------------------------------------------------------------

def parse_nvcc_release(text):
    """"13.0" from `nvcc --version` output, None when it names no release."""
    m = re.search(r"release (\d+)\.(\d+)", text or "")
    return f"{m.group(1)}.{m.group(2)}" if m else None


def nvcc_release(cuda_home):
    """The CUDA release of the toolkit's nvcc, None when it cannot be run or read."""
    try:
        out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"],
                             capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return parse_nvcc_release(out)


class CudaDecision(NamedTuple):
    with_cuda: bool
    reason: Optional[str]   # why the CUDA kernels are absent (build_info), None when present
    warning: Optional[str]  # printed by setup.py
    error: Optional[str]    # stops the build (LABELSMOOTH_EXT_REQUIRE_CUDA=1 and no CUDA kernels)


def decide_cuda(torch_version, torch_cuda, cuda_home, nvcc_found, nvcc_version,
                cpu_only=False, require_cuda=False):
    """Whether to compile the CUDA kernels.

    torch_version, torch_cuda: torch.__version__ and torch.version.cuda (None: a CPU build of torch)
    cuda_home: the toolkit directory torch uses (None when it found none); nvcc_found: it has
    bin/nvcc; nvcc_version: that nvcc's release ("13.0"), None when it could not be read
    cpu_only, require_cuda: LABELSMOOTH_EXT_CPU_ONLY, LABELSMOOTH_EXT_REQUIRE_CUDA
    """
    warning = None
    if cpu_only:
        reason = f"{ENV_CPU_ONLY}=1 was set at build time (a CPU-only build on purpose)"
    elif torch_cuda is None:
        reason = f"torch {torch_version} is a build without CUDA"
    elif not cuda_home or not nvcc_found:
        where = f"no nvcc in CUDA_HOME={cuda_home}" if cuda_home else "no CUDA toolkit found"
        reason = (f"{where} at build time (torch {torch_version} is built for CUDA {torch_cuda}; "
                  f"set CUDA_HOME to a CUDA {_major(torch_cuda)}.x toolkit to build the CUDA kernels)")
    elif nvcc_version and _major(nvcc_version) != _major(torch_cuda):
        # torch.utils.cpp_extension raises "The detected CUDA version (...) mismatches the version
        # that was used to compile PyTorch (...)" across major versions; within one major version
        # it only warns, and builds.
        reason = (f"the CUDA toolkit at {cuda_home} is CUDA {nvcc_version}, but torch "
                  f"{torch_version} was built with CUDA {torch_cuda}, and torch does not build "
                  "extensions across CUDA major versions")
        warning = (
            f"WARNING: labelsmooth_ext: building the CPU kernels only: {reason}. To get the CUDA "
            f"kernels, point CUDA_HOME to a CUDA {_major(torch_cuda)}.x toolkit (for example "
            f"CUDA_HOME=/usr/local/cuda-{torch_cuda}) or install a torch built for CUDA "
            f"{_major(nvcc_version)}.x, then rebuild. Set {ENV_REQUIRE_CUDA}=1 to make this an error."
        )
    else:
        return CudaDecision(True, None, None, None)
    error = None
    if require_cuda:
        error = (f"labelsmooth_ext: {ENV_REQUIRE_CUDA}=1 is set, but the CUDA kernels cannot be "
                 f"built: {reason}.")
    return CudaDecision(False, reason, warning, error)


def _major(version):
    return (_release(version) or (None,))[0]
