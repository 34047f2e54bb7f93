"""labelsmooth_ext: fused label-smoothed cross-entropy for PyTorch (CPU and CUDA)."""
import json as _json

from . import _ops
from . import reference
from ._ops import set_inplace_backward
from .functional import binary_cross_entropy_with_logits, cross_entropy, set_target_validation
from .modules import BCEWithLogitsLoss, CrossEntropyLoss
from .patch import patch, patched, unpatch

__version__ = "0.1.0"


def build_info():
    """What this build is: torch it was built against, CUDA kernels and architectures."""
    info = _json.loads(_ops.ops.build_info())
    info["cuda_archs"] = [a for a in info["cuda_archs"].split(";") if a]
    info["cpu_kernels"] = info["cpu_kernels"].split(",")
    return info


__all__ = [
    "cross_entropy", "CrossEntropyLoss", "binary_cross_entropy_with_logits", "BCEWithLogitsLoss",
    "build_info", "reference", "set_inplace_backward", "set_target_validation",
    "patch", "unpatch", "patched",
]
