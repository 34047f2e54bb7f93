"""nn.Module drop-ins."""
import torch

from . import functional as F


class CrossEntropyLoss(torch.nn.CrossEntropyLoss):
    """torch.nn.CrossEntropyLoss with the fused kernel, plus ``smoothing_mode``.

    A subclass of torch.nn.CrossEntropyLoss: same constructor, same buffers and attributes,
    so isinstance checks and state dicts keep working.
    """

    __constants__ = torch.nn.CrossEntropyLoss.__constants__ + ["smoothing_mode"]

    def __init__(self, weight=None, size_average=None, ignore_index=-100, reduce=None,
                 reduction="mean", label_smoothing=0.0, *, smoothing_mode="uniform"):
        if size_average is not None or reduce is not None:
            reduction = F.legacy_reduction(size_average, reduce)
        F.check_reduction(reduction)
        F.check_smoothing_mode(smoothing_mode)
        F.check_label_smoothing(label_smoothing)
        super().__init__(weight=weight, ignore_index=ignore_index, reduction=reduction,
                         label_smoothing=label_smoothing)
        self.smoothing_mode = smoothing_mode

    def forward(self, input, target):
        return F.cross_entropy(input, target, weight=self.weight, ignore_index=self.ignore_index,
                               reduction=self.reduction, label_smoothing=self.label_smoothing,
                               smoothing_mode=self.smoothing_mode)

    def extra_repr(self):
        return f"reduction={self.reduction!r}, label_smoothing={self.label_smoothing}, smoothing_mode={self.smoothing_mode!r}"


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
