"""`python -m labelsmooth_ext demo`: label smoothing on real data (scikit-learn's digits).

Trains the same small network three times (same seed): without smoothing, with uniform
smoothing eps=0.1 and with off_target smoothing eps=0.1, all through labelsmooth_ext's loss.
Reports accuracy, NLL, ECE before and after temperature scaling and the mean logit gap against
theory.optimal_logit_gap, and draws reliability diagrams and the penultimate-layer picture of
Mueller, Kornblith and Hinton (2019): activations of three classes projected on the plane
through those classes' templates (their rows of the last layer's weight).
"""
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

from . import calibration, theory
from .functional import cross_entropy

RUNS = [("no smoothing", 0.0, "uniform"), ("uniform eps=0.1", 0.1, "uniform"),
        ("off_target eps=0.1", 0.1, "off_target")]


def load_data(seed=0, device="cpu"):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)
    n_tr, n_va = int(0.6 * len(y)), int(0.2 * len(y))
    parts = perm[:n_tr], perm[n_tr:n_tr + n_va], perm[n_tr + n_va:]
    mean, std = x[parts[0]].mean(0), x[parts[0]].std(0) + 1e-3
    x = (x - mean) / std
    return [(x[p].to(device), y[p].to(device)) for p in parts]


class Net(torch.nn.Module):
    def __init__(self, d_in=64, hidden=256, penultimate=64, classes=10):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(d_in, hidden), torch.nn.ReLU(),
                                        torch.nn.Linear(hidden, penultimate), torch.nn.ReLU())
        self.head = torch.nn.Linear(penultimate, classes)

    def forward(self, x):
        h = self.body(x)
        return self.head(h), h


def train(eps, mode, data, epochs, seed, progress):
    (xtr, ytr), _, _ = data
    torch.manual_seed(seed)
    net = Net().to(xtr.device)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(ytr), generator=g).to(xtr.device)
        for i in range(0, len(ytr), 64):
            idx = perm[i:i + 64]
            logits, _ = net(xtr[idx])
            loss = cross_entropy(logits, ytr[idx], label_smoothing=eps, smoothing_mode=mode)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        progress()
    return net


def mean_logit_gap(logits, y):
    """Mean over samples of z_true minus the mean of the other logits."""
    k = logits.shape[1]
    zy = logits.gather(1, y[:, None])[:, 0]
    others = (logits.sum(1) - zy) / (k - 1)
    return float((zy - others).mean())


def evaluate(net, data):
    _, (xva, yva), (xte, yte) = data
    with torch.no_grad():
        lva, _ = net(xva)
        lte, hte = net(xte)
    t = calibration.fit_temperature(lva.cpu(), yva.cpu())
    lte_c, yte_c = lte.double().cpu(), yte.cpu()
    return {
        "accuracy": float((lte_c.argmax(1) == yte_c).double().mean()),
        "nll": float(F.cross_entropy(lte_c, yte_c)),
        "ece": calibration.expected_calibration_error(lte_c, yte_c).ece,
        "temperature": t,
        "ece_after_temperature": calibration.expected_calibration_error(lte_c / t, yte_c).ece,
        "nll_after_temperature": float(F.cross_entropy(lte_c / t, yte_c)),
        "mean_logit_gap": mean_logit_gap(lte_c, yte_c),
    }, lte_c, hte.double().cpu()


def penultimate_projection(h, y, head_weight, classes=(0, 1, 2)):
    """2-d coordinates of activations of `classes` on the plane through their templates."""
    w = head_weight.double().cpu()[list(classes)]  # (3, d) templates
    u1 = w[1] - w[0]
    u1 = u1 / u1.norm()
    u2 = w[2] - w[0]
    u2 = u2 - (u2 @ u1) * u1
    u2 = u2 / u2.norm()
    mask = torch.isin(y, torch.tensor(classes))
    rel = h[mask] - w[0]
    return torch.stack([rel @ u1, rel @ u2], 1), y[mask]


def run(out_dir="demo_out", epochs=60, seed=0, device=None, quiet=False):
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    os.makedirs(out_dir, exist_ok=True)
    data = load_data(seed, device)
    total, done, t0 = epochs * len(RUNS), [0], time.time()

    def progress():
        done[0] += 1
        if not quiet:
            f = int(30 * done[0] / total)
            sys.stderr.write(f"\rtraining [{'#' * f}{'.' * (30 - f)}] {done[0]}/{total} epochs "
                             f"{time.time() - t0:4.0f}s")
            if done[0] == total:
                sys.stderr.write("\n")
            sys.stderr.flush()

    results, projections = {}, {}
    yte = data[2][1].cpu()
    for name, eps, mode in RUNS:
        net = train(eps, mode, data, epochs, seed, progress)
        metrics, logits, h = evaluate(net, data)
        metrics["optimal_logit_gap"] = theory.optimal_logit_gap(10, eps, mode)
        results[name] = metrics
        slug = name.split()[0].replace("_", "-") if eps else "none"
        try:
            calibration.reliability_diagram(logits, yte, os.path.join(out_dir, f"reliability_{slug}.png"),
                                            title=name)
        except ImportError:
            pass
        projections[name] = penultimate_projection(h, yte, net.head.weight.detach())
    _plot_projections(projections, os.path.join(out_dir, "penultimate.png"))
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)
    return results


def _plot_projections(projections, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, len(projections), figsize=(4 * len(projections), 4))
    for ax, (name, (xy, y)) in zip(axes, projections.items()):
        for c, color in zip((0, 1, 2), ("tab:blue", "tab:orange", "tab:green")):
            pts = xy[y == c]
            ax.scatter(pts[:, 0], pts[:, 1], s=8, alpha=0.7, color=color, label=f"digit {c}")
        ax.set_title(name)
        ax.set_aspect("equal", adjustable="datalim")
        ax.legend(fontsize=8)
    fig.suptitle("penultimate layer: digits 0, 1, 2 on the plane through their templates")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_results(results):
    cols = ["accuracy", "nll", "ece", "temperature", "ece_after_temperature", "mean_logit_gap",
            "optimal_logit_gap"]
    head = f"{'run':<20}" + "".join(f"{c:>23}" for c in cols)
    lines = [head, "-" * len(head)]
    for name, m in results.items():
        cells = []
        for c in cols:
            v = m[c]
            if c in ("accuracy", "ece", "ece_after_temperature"):
                cells.append(f"{100 * v:22.2f}%")
            elif isinstance(v, float) and math.isinf(v):
                cells.append(f"{'inf' if v > 0 else '-inf':>23}")
            else:
                cells.append(f"{v:23.3f}")
        lines.append(f"{name:<20}" + "".join(cells))
    return "\n".join(lines)


def add_arguments(p):
    p.add_argument("--out", default="demo_out", help="output folder for the pictures and results.json")
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")


def demo_command(args):
    t0 = time.time()
    results = run(args.out, args.epochs, args.seed, args.device)
    print(f"\nscikit-learn digits (1,797 8x8 images; 60/20/20 train/val/test), MLP 64-256-64-10, "
          f"{args.epochs} epochs, seed {args.seed}; temperature fitted on the validation split")
    print(format_results(results))
    print(f"\npictures and results.json in {args.out}/ ({time.time() - t0:.0f} s)")
    return 0
