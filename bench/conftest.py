"""pytest-benchmark suite setup: cases, inputs and floors measured once per case in this run,
and a closing table of ratios (ours vs eager, vs compiled, vs the floors) from this run."""
import pytest
import torch

from labelsmooth_ext import benchmark as B

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
CASES = [c for d in DEVICES for c in B.default_cases(d, full=True)]

_inputs, _floors, RESULTS = {}, {}, []
LLM_MEDIANS = {}  # (device, variant) -> median seconds of test_llm_options


def inputs_for(case):
    if case not in _inputs:
        _inputs.clear()  # keep one case's tensors alive at a time
        _inputs[case] = B.make_inputs(case)
    return _inputs[case]


def floors_for(case, reps=7):
    if case not in _floors:
        x, _ = inputs_for(case)
        _floors[case] = B.floors(x, reps)
    return _floors[case]


def pytest_terminal_summary(terminalreporter):
    for dev in DEVICES:
        med = {v: LLM_MEDIANS[(dev, v)] for v in B.LLM_VARIANTS if (dev, v) in LLM_MEDIANS}
        if "plain" in med:
            terminalreporter.section(f"labelsmooth_ext: large-vocabulary options ({dev}), this run")
            terminalreporter.write_line(B.format_llm_options(dev, med))
    if not RESULTS:
        return
    terminalreporter.section("labelsmooth_ext: ratios measured in this run")
    terminalreporter.write_line(B.format_table(B.summarize(RESULTS)))


@pytest.fixture
def record():
    return RESULTS.append
