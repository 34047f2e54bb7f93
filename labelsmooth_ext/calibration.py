"""Calibration measurement: expected calibration error, reliability diagrams, temperature scaling.

Label smoothing improves calibration (Mueller, Kornblith and Hinton, "When does label smoothing
help?", 2019); these tools measure it.
"""
from dataclasses import dataclass

import torch


@dataclass
class CalibrationResult:
    ece: float                 # sum_b (n_b / n) |accuracy_b - confidence_b|
    bin_edges: torch.Tensor    # (n_bins + 1,)
    accuracy: torch.Tensor     # (n_bins,) NaN where a bin is empty
    confidence: torch.Tensor   # (n_bins,) NaN where a bin is empty
    counts: torch.Tensor       # (n_bins,) int64


def _check(logits, target):
    if logits.dim() != 2:
        raise ValueError(f"logits must be (N, K), got shape {tuple(logits.shape)}")
    if target.shape != logits.shape[:1]:
        raise ValueError(f"target must be (N,) = ({logits.shape[0]},), got {tuple(target.shape)}")


def expected_calibration_error(logits, target, n_bins=15):
    """Top-label ECE with n_bins equal-width confidence bins over (0, 1] (bins are right-closed:
    a confidence of exactly 1 falls in the last bin). Returns the ECE and the per-bin accuracy,
    mean confidence and counts."""
    _check(logits, target)
    if int(n_bins) < 1:
        raise ValueError(f"n_bins must be at least 1, got {n_bins}")
    probs = torch.softmax(logits.detach().double(), dim=1)
    conf, pred = probs.max(dim=1)
    correct = (pred == target).double()
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64, device=conf.device)
    # bin b holds confidences in (edges[b], edges[b+1]]
    idx = torch.clamp(torch.bucketize(conf, edges, right=False) - 1, 0, n_bins - 1)
    counts = torch.bincount(idx, minlength=n_bins)
    acc_sum = torch.zeros(n_bins, dtype=torch.float64, device=conf.device).index_add_(0, idx, correct)
    conf_sum = torch.zeros(n_bins, dtype=torch.float64, device=conf.device).index_add_(0, idx, conf)
    nz = counts > 0
    accuracy = torch.full((n_bins,), float("nan"), dtype=torch.float64, device=conf.device)
    confidence = accuracy.clone()
    accuracy[nz] = acc_sum[nz] / counts[nz]
    confidence[nz] = conf_sum[nz] / counts[nz]
    n = max(int(conf.numel()), 1)
    ece = float(((acc_sum - conf_sum).abs()).sum() / n)
    return CalibrationResult(ece, edges.cpu(), accuracy.cpu(), confidence.cpu(), counts.cpu())


def fit_temperature(logits, target, max_iter=100):
    """Temperature T > 0 minimising the NLL of softmax(logits / T) (Guo et al., 2017)."""
    _check(logits, target)
    z = logits.detach().double()
    log_t = torch.zeros((), dtype=torch.float64, device=z.device, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(z / log_t.exp(), target)
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_t.detach().exp())


def reliability_diagram(logits, target, path, n_bins=15, title=None):
    """Write a reliability diagram (accuracy against confidence per bin, with the gap to the
    diagonal and the ECE) as a PNG. Needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = expected_calibration_error(logits, target, n_bins)
    centers = ((r.bin_edges[:-1] + r.bin_edges[1:]) / 2).numpy()
    width = 1.0 / n_bins
    acc = torch.nan_to_num(r.accuracy, nan=0.0).numpy()
    conf = torch.nan_to_num(r.confidence, nan=0.0).numpy()
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.bar(centers, acc, width=width, edgecolor="black", label="accuracy")
    ax.bar(centers, conf - acc, bottom=acc, width=width, color="red", alpha=0.3, edgecolor="red",
           label="gap to confidence")
    ax.plot([0, 1], [0, 1], "k--", linewidth=1)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{title + ': ' if title else ''}ECE = {100 * r.ece:.2f}%")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return r
