"""What label smoothing does to the optimum: the logit gap it produces."""
import math


def optimal_logit_gap(num_classes, label_smoothing, smoothing_mode="uniform"):
    """The gap z_true - z_other at the minimum of the smoothed cross-entropy over free logits.

    At the minimum the softmax equals the smoothed target q, so the gap is log(q_y / q_c):
      off_target (q_y = 1 - eps, q_c = eps/(K-1)):   log((1 - eps)(K - 1) / eps)
      uniform    (q_y = 1 - eps + eps/K, q_c = eps/K): log(1 + K (1 - eps) / eps)
    Infinite at eps = 0 (no finite minimum); -inf for off_target at eps = 1.
    """
    k = int(num_classes)
    eps = float(label_smoothing)
    if k < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    if math.isnan(eps) or not 0.0 <= eps <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing!r}")
    if eps == 0.0:
        return math.inf
    if smoothing_mode == "off_target":
        return -math.inf if eps == 1.0 else math.log((1.0 - eps) * (k - 1) / eps)
    if smoothing_mode == "uniform":
        return math.log1p(k * (1.0 - eps) / eps)
    raise ValueError(f"smoothing_mode must be 'uniform' or 'off_target', got {smoothing_mode!r}")
