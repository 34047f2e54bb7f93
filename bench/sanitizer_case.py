"""A small CUDA run for compute-sanitizer: every kernel configuration, dtype, weighted and
unweighted, ignored and invalid targets, misaligned views, every backward path."""
import torch

import labelsmooth_ext as L

assert torch.cuda.is_available(), "needs a CUDA GPU"
torch.manual_seed(0)
for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
    for K in (1, 3, 100, 1000, 5000, 50257):
        for weighted in (False, True):
            base = torch.randn(9, K + 1, device="cuda", dtype=dtype)
            for x in (base[:, :K], base[:, 1:]):  # aligned and odd-offset rows
                x = x.detach().requires_grad_()
                t = torch.randint(0, K, (9,), device="cuda")
                t[2] = -100
                t[5] = K + 3  # invalid: a NaN row, never an out-of-bounds read
                w = torch.rand(K, device="cuda", dtype=dtype) if weighted else None
                for red in ("none", "mean", "sum"):
                    x.grad = None
                    out = L.cross_entropy(x, t, weight=w, reduction=red, label_smoothing=0.1)
                    (out.sum() * 0.5).backward()
            p = torch.softmax(torch.randn(9, K, device="cuda"), 1).to(dtype)
            L.cross_entropy(torch.randn(9, K, device="cuda", dtype=dtype, requires_grad=True), p).backward()
torch.cuda.synchronize()
print("sanitizer case finished")
