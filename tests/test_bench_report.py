"""The `python -m labelsmooth_ext bench` report: machine line first, about 120 columns, columns
named by what they measure. Timing is replaced by fixed numbers (the layout is what is tested)."""
import argparse

from labelsmooth_ext import benchmark as B


def _fake_run_case(case, impls, modes, reps, progress=None):
    secs = {"labelsmooth_ext": 0.133, "torch": 0.967, "torch.compile": 0.954, "reference": 1.5}
    out = []
    for mode in modes:
        for impl in impls:
            out.append(B.Result(case, mode, impl, secs[impl], {"copy": 0.05, "exp": 0.08},
                                B.bytes_moved(case, mode), 500 * 2**20, 0.0))
            if progress:
                progress()
    return out


def _fake_llm_options(device, reps, **kw):
    return {name: 0.2 * (1 + i / 10) for i, name in enumerate(B.LLM_VARIANTS)}


def _report(monkeypatch, capsys, *argv):
    monkeypatch.setattr(B, "run_case", _fake_run_case)
    monkeypatch.setattr(B, "time_llm_options", _fake_llm_options)
    p = argparse.ArgumentParser()
    B.add_arguments(p)
    assert B.report_command(p.parse_args(["--device", "cpu", *argv])) == 0
    return capsys.readouterr().out.splitlines()


def test_report_layout(monkeypatch, capsys):
    lines = _report(monkeypatch, capsys, "--full")
    assert lines[0].startswith("machine: ") and "torch " in lines[0]
    table = lines[lines.index("CPU:") + 1:]
    table = table[:table.index("")]
    assert len(table) == 3 + 24  # two header lines, a rule, 6 shapes x 2 dtypes x 2 passes
    # about 120 columns (the ADE20K shape's "4x150x128x128" is the widest first column)
    assert max(map(len, table)) <= 122, max(map(len, table))
    heads = [h.split() for h in table[:2]]
    assert "copy" in heads[0] and "time" in heads[0] and "/" in heads[1] and "ours" in heads[1]
    assert "%" not in table[0] and "floor" not in table[0]
    row = table[3 + 1].split()  # 256x1000 float32 fwd+bwd
    assert row[:3] == ["256x1000", "float32", "fwd+bwd"]
    # ours 133 ms, eager 967 ms, compiled 954 ms, ratios as baseline time / ours
    assert row[3:9] == ["133", "967", "954", "7.27", "7.17", f"{0.05 / 0.133:.2f}"]


def test_markdown_keeps_full_column_names():
    rows = B.summarize(_fake_run_case(B.default_cases("cpu", False)[0], ["labelsmooth_ext", "torch"],
                                      B.MODES, 1))
    md = B.format_table(rows, markdown=True).splitlines()[0]
    assert "| eager time / ours |" in md and "| copy time / ours |" in md and "| ours ms |" in md


def test_report_llm_options_table(monkeypatch, capsys):
    lines = _report(monkeypatch, capsys)
    start = next(i for i, ln in enumerate(lines) if ln.startswith("CPU large-vocabulary options"))
    rows = [ln.split() for ln in lines[start + 1:start + 1 + len(B.LLM_VARIANTS)]]
    assert [r[0] for r in rows] == list(B.LLM_VARIANTS)
    assert rows[0][1:] == ["200.0", "ms", "1.00x", "plain"]
    assert rows[2][1:] == ["240.0", "ms", "1.20x", "plain"]  # softcap=30
    assert not any(ln.startswith("CPU large-vocabulary") for ln in _report(monkeypatch, capsys, "--no-options"))
