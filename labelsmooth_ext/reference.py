"""Pure-PyTorch references, written from the formulas in shared/design/semantics.md.

They never call torch.nn.functional.cross_entropy: they are the oracle of the tests (run in
float64) and the eager baseline of the benchmarks (run in the input dtype).
"""
import torch


def smoothing_coefficients(num_classes, label_smoothing, smoothing_mode="uniform"):
    """(a, b) with q_c = a + b * [c == y]: the mass every class gets and the target's extra."""
    eps, k = float(label_smoothing), int(num_classes)
    if eps == 0.0:
        return 0.0, 1.0
    # as the kernels (row_math.h): eps > 0 never rounds to no smoothing, an eps / k that
    # underflows is the smallest positive float64 instead of 0
    if smoothing_mode == "uniform":
        return (eps / k) or 5e-324, 1.0 - eps
    if smoothing_mode == "off_target":
        if k < 2:
            raise ValueError("smoothing_mode='off_target' needs at least 2 classes when label_smoothing > 0")
        a = (eps / (k - 1)) or 5e-324
        return a, 1.0 - eps - a
    raise ValueError(f"smoothing_mode must be 'uniform' or 'off_target', got {smoothing_mode!r}")


def _rows(x):
    if x.dim() == 1:
        return x.unsqueeze(0)
    if x.dim() == 2:
        return x
    return x.movedim(1, -1).reshape(-1, x.shape[1])


def cross_entropy(input, target, weight=None, ignore_index=-100, reduction="mean",
                  label_smoothing=0.0, smoothing_mode="uniform", *, z_loss=0.0, softcap=None):
    """Label-smoothed cross-entropy, class-index or probability targets, every reduction.

    softcap: the logits become softcap * tanh(logits / softcap) before everything else.
    z_loss: adds z_loss * lse**2 to every row's loss (every non-ignored row for class-index
    targets), unweighted, divided by the same denominator as the rest under "mean".
    """
    k = input.shape[0] if input.dim() == 1 else input.shape[1]
    a, b = smoothing_coefficients(k, label_smoothing, smoothing_mode)
    z = _rows(input)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    # log_softmax subtracts the row max first: z - logsumexp(z) loses log(K) entirely once
    # |z| is near the float range (3e38: the spacing of float64 there is 7e22).
    logp = torch.log_softmax(z, dim=1)
    lse = torch.logsumexp(z, dim=1, keepdim=True)
    w = torch.ones(k, dtype=z.dtype, device=z.device) if weight is None else weight.to(z.dtype)

    if target.is_floating_point():
        q = a + b * _rows(target).to(z.dtype)
        loss = -(w * q * logp).sum(dim=1)
        if z_loss:
            loss = loss + z_loss * lse[:, 0] ** 2
        out_shape = input.shape[:1] + input.shape[2:] if input.dim() > 1 else ()
        denom = torch.tensor(float(loss.numel()), dtype=z.dtype, device=z.device)
    else:
        y = target.reshape(-1).long()
        valid = y != ignore_index
        y_safe = torch.where(valid, y, torch.zeros_like(y))
        wy = w[y_safe]
        loss = b * wy * -logp.gather(1, y_safe[:, None])[:, 0]
        if a != 0.0:
            loss = loss + a * -(w * logp).sum(dim=1)
        if z_loss:
            loss = loss + z_loss * lse[:, 0] ** 2
        zero = torch.zeros((), dtype=loss.dtype, device=loss.device)
        loss = torch.where(valid, loss, zero)
        denom = torch.where(valid, wy, zero).sum()
        out_shape = target.shape

    if reduction == "none":
        return loss.reshape(out_shape)
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        # kept rows whose target weights sum to 0: NaN, as PyTorch (whose class-index term is
        # 0 / 0 there) and the kernels, also when the smoothing term alone would give x / 0
        return torch.where(denom == 0, torch.full_like(denom, float("nan")), loss.sum() / denom)
    raise ValueError(f"reduction must be 'none', 'mean' or 'sum', got {reduction!r}")


def binary_cross_entropy_with_logits(input, target, weight=None, reduction="mean", pos_weight=None,
                                     label_smoothing=0.0):
    """Binary cross-entropy with logits on smoothed targets t (1 - 2a) + a, from the formula
    loss = w [(1 - t) x + (1 + (p - 1) t) softplus(-x)]."""
    a = float(label_smoothing)
    t = target * (1.0 - 2.0 * a) + a
    lw = 1.0 if pos_weight is None else 1.0 + (pos_weight - 1.0) * t
    loss = (1.0 - t) * input + lw * torch.nn.functional.softplus(-input)
    if weight is not None:
        loss = loss * weight
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.mean()
    raise ValueError(f"reduction must be 'none', 'mean' or 'sum', got {reduction!r}")
