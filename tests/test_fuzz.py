"""Differential fuzzing against PyTorch in float64 (tests/fuzz_driver.py), each run in a
subprocess so that a crash fails the test instead of the test run. The default run is the fast
profile; LSE_FUZZ=long runs the long one."""
import os
import subprocess
import sys

import pytest

PROFILE = "long" if os.environ.get("LSE_FUZZ", "") == "long" else "fast"
HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.parametrize("which", ["ce", "module", "bce"])
def test_differential_fuzz_against_pytorch(which):
    env = dict(os.environ)
    # the labelsmooth_ext this test process imported (a source tree built in place, or the
    # installed package), not necessarily the tree the tests sit in
    import labelsmooth_ext

    pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(labelsmooth_ext.__file__)))
    env["PYTHONPATH"] = os.pathsep.join([pkg_root, env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, os.path.join(HERE, "fuzz_driver.py"), which, PROFILE],
                       capture_output=True, text=True, env=env, timeout=6 * 3600)
    if r.returncode != 0:
        how = f"signal {-r.returncode} (a crash)" if r.returncode < 0 else f"exit {r.returncode}"
        pytest.fail(f"fuzz {which} ({PROFILE}) failed with {how}:\n{r.stdout[-6000:]}\n{r.stderr[-6000:]}")
    assert "no difference" in r.stdout
