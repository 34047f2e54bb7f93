"""nn.Module drop-ins."""
import torch

from . import functional as F


class CrossEntropyLoss(torch.nn.CrossEntropyLoss):
    """torch.nn.CrossEntropyLoss with the fused kernel, plus ``smoothing_mode``.

    A subclass of torch.nn.CrossEntropyLoss: same constructor, same buffers and attributes,
    so isinstance checks and state dicts keep working.
    """

    __constants__ = torch.nn.CrossEntropyLoss.__constants__ + [
        "smoothing_mode", "z_loss", "softcap", "inplace_backward", "return_lse"]

    def __init__(self, weight=None, size_average=None, ignore_index=-100, reduce=None,
                 reduction="mean", label_smoothing=0.0, *, smoothing_mode="uniform",
                 z_loss=0.0, softcap=None, inplace_backward=False, return_lse=False):
        if size_average is not None or reduce is not None:
            reduction = F.legacy_reduction(size_average, reduce)
        F.check_reduction(reduction)
        F.check_smoothing_mode(smoothing_mode)
        F.check_label_smoothing(label_smoothing)
        F._check_llm_options(z_loss, softcap, inplace_backward, return_lse)
        super().__init__(weight=weight, ignore_index=ignore_index, reduction=reduction,
                         label_smoothing=label_smoothing)
        self.smoothing_mode = smoothing_mode
        self.z_loss = float(z_loss)
        self.softcap = None if softcap is None else float(softcap)
        self.inplace_backward = inplace_backward
        self.return_lse = return_lse

    def forward(self, input, target):
        return F.cross_entropy(input, target, weight=self.weight, ignore_index=self.ignore_index,
                               reduction=self.reduction, label_smoothing=self.label_smoothing,
                               smoothing_mode=self.smoothing_mode, z_loss=self.z_loss,
                               softcap=self.softcap, inplace_backward=self.inplace_backward,
                               return_lse=self.return_lse)

    def extra_repr(self):
        extra = "".join(f", {k}={getattr(self, k)!r}" for k, d in
                        (("z_loss", 0.0), ("softcap", None), ("inplace_backward", False), ("return_lse", False))
                        if getattr(self, k) != d)
        return (f"reduction={self.reduction!r}, label_smoothing={self.label_smoothing}, "
                f"smoothing_mode={self.smoothing_mode!r}" + extra)


class BCEWithLogitsLoss(torch.nn.BCEWithLogitsLoss):
    """torch.nn.BCEWithLogitsLoss with the fused kernel, plus binary ``label_smoothing``
    (targets t become t (1 - 2a) + a)."""

    __constants__ = list(getattr(torch.nn.BCEWithLogitsLoss, "__constants__", [])) + ["label_smoothing"]

    def __init__(self, weight=None, size_average=None, reduce=None, reduction="mean",
                 pos_weight=None, *, label_smoothing=0.0):
        if size_average is not None or reduce is not None:
            reduction = F.legacy_reduction(size_average, reduce)
        F.check_reduction(reduction)
        F.check_label_smoothing(label_smoothing)
        super().__init__(weight=weight, reduction=reduction, pos_weight=pos_weight)
        self.label_smoothing = float(label_smoothing)

    def forward(self, input, target):
        return F.binary_cross_entropy_with_logits(input, target, self.weight, reduction=self.reduction,
                                                  pos_weight=self.pos_weight,
                                                  label_smoothing=self.label_smoothing)

    def extra_repr(self):
        return f"reduction={self.reduction!r}, label_smoothing={self.label_smoothing}"
