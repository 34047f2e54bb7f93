"""Theory (optimal logit gap) and calibration tools."""
import math

import pytest
import torch

import labelsmooth_ext as L
from labelsmooth_ext import calibration, theory


@pytest.mark.parametrize("mode", ["uniform", "off_target"])
@pytest.mark.parametrize("K,eps", [(10, 0.1), (5, 0.3), (100, 0.05), (2, 0.2)])
def test_minimising_the_loss_reaches_the_optimal_gap(mode, K, eps):
    """Minimise the smoothed loss (our kernel) over free logits: the gap is the formula's."""
    z = torch.zeros(1, K, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0])
    opt = torch.optim.LBFGS([z], lr=1, max_iter=500, tolerance_grad=1e-14, tolerance_change=1e-16,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = L.cross_entropy(z, y, label_smoothing=eps, smoothing_mode=mode)
        loss.backward()
        return loss

    opt.step(closure)
    gaps = (z[0, 0] - z[0, 1:]).detach()
    assert float(gaps.max() - gaps.min()) < 1e-8  # all other classes tie
    assert abs(float(gaps.mean()) - theory.optimal_logit_gap(K, eps, mode)) < 1e-6


def test_optimal_gap_formulas_and_limits():
    assert theory.optimal_logit_gap(10, 0.1, "off_target") == pytest.approx(math.log(0.9 * 9 / 0.1))
    assert theory.optimal_logit_gap(10, 0.1) == pytest.approx(math.log(1 + 10 * 0.9 / 0.1))
    assert theory.optimal_logit_gap(10, 0.0) == math.inf
    assert theory.optimal_logit_gap(10, 1.0) == 0.0
    assert theory.optimal_logit_gap(10, 1.0, "off_target") == -math.inf
    with pytest.raises(ValueError, match="label_smoothing must be in"):
        theory.optimal_logit_gap(10, 1.2)
    with pytest.raises(ValueError, match="smoothing_mode"):
        theory.optimal_logit_gap(10, 0.1, "other")


def _logits(probs):
    return torch.tensor(probs, dtype=torch.float64).log()


def test_ece_hand_computed():
    # confidences 0.9, 0.65, 0.55, 0.75; predictions 0, 0, 0, 1; correct 1, 0, 1, 1
    logits = _logits([[0.9, 0.1], [0.65, 0.35], [0.55, 0.45], [0.25, 0.75]])
    target = torch.tensor([0, 1, 0, 1])
    r = calibration.expected_calibration_error(logits, target, n_bins=5)
    # bins (0.4,0.6]: 1 sample, |1 - .55|; (0.6,0.8]: 2, |.5 - .7|; (0.8,1]: 1, |1 - .9|
    assert r.ece == pytest.approx((0.45 + 2 * 0.2 + 0.1) / 4)
    assert r.counts.tolist() == [0, 0, 1, 2, 1]
    assert r.accuracy[3] == pytest.approx(0.5) and r.confidence[3] == pytest.approx(0.7)
    assert math.isnan(r.accuracy[0])
    r2 = calibration.expected_calibration_error(logits, target, n_bins=2)
    assert r2.ece == pytest.approx(abs(0.75 - (0.9 + 0.65 + 0.55 + 0.75) / 4))


def test_ece_matches_torchmetrics():
    torchmetrics = pytest.importorskip("torchmetrics", reason="torchmetrics is not installed")
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2000, 10, generator=g) * 3
    target = torch.randint(0, 10, (2000,), generator=g)
    ours = calibration.expected_calibration_error(logits, target, n_bins=15).ece
    metric = torchmetrics.classification.MulticlassCalibrationError(num_classes=10, n_bins=15, norm="l1")
    theirs = float(metric(torch.softmax(logits, 1), target))
    assert ours == pytest.approx(theirs, abs=1e-5)


def test_fit_temperature_recovers_overconfidence():
    g = torch.Generator().manual_seed(1)
    true_logits = torch.randn(20000, 5, generator=g, dtype=torch.float64) * 2
    target = torch.multinomial(torch.softmax(true_logits, 1), 1, generator=g)[:, 0]
    t = calibration.fit_temperature(true_logits * 3, target)
    assert t == pytest.approx(3.0, rel=0.05)
    before = calibration.expected_calibration_error(true_logits * 3, target).ece
    after = calibration.expected_calibration_error(true_logits * 3 / t, target).ece
    assert after < before / 3


def test_reliability_diagram_writes_png(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is not installed")
    logits = torch.randn(300, 4) * 2
    target = torch.randint(0, 4, (300,))
    path = tmp_path / "rel.png"
    r = calibration.reliability_diagram(logits, target, path, title="test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert r.counts.sum() == 300


def test_calibration_bad_input():
    with pytest.raises(ValueError, match="logits must be"):
        calibration.expected_calibration_error(torch.randn(3), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="target must be"):
        calibration.expected_calibration_error(torch.randn(3, 2), torch.tensor([0, 1]))


def test_demo_runs_and_writes_its_outputs(tmp_path):
    pytest.importorskip("sklearn", reason="scikit-learn is not installed")
    pytest.importorskip("matplotlib", reason="matplotlib is not installed")
    from labelsmooth_ext import demo

    results = demo.run(str(tmp_path), epochs=3, device="cpu", quiet=True)
    assert set(results) == {name for name, _, _ in demo.RUNS}
    for m in results.values():
        assert 0.5 < m["accuracy"] <= 1 and m["temperature"] > 0 and 0 <= m["ece"] <= 1
    assert results["no smoothing"]["optimal_logit_gap"] == math.inf
    names = {p.name for p in tmp_path.iterdir()}
    assert {"penultimate.png", "results.json", "reliability_none.png", "reliability_uniform.png",
            "reliability_off-target.png"} <= names
    assert "mean_logit_gap" in demo.format_results(results)
