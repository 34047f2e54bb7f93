// CUDA implementations: the fused single-pass kernel for class-index targets (split over several
// blocks for a few huge rows), the in-place gradient scaling that skips itself when the incoming gradient is exactly 1, and a composite
// (slower, several passes) path for probability targets. No host synchronisation anywhere.
//
// Kernel shape: each row is handled by ROW_THREADS threads (a warp for small K, a block for
// large K). Pass 1 reads the row once with 16-byte loads, keeping the first CACHE packs per
// thread in registers, and folds it into an online (max, sum exp) plus linear sums. Pass 2
// writes the gradient from the registers; packs beyond the cache are read again, from L2
// (the rows in flight fit in it), so HBM sees one read of the logits and one write of the
// gradient.
//
// The device code and its launch live in headers (kernels.cuh, reduce.cuh, dispatch.cuh,
// host.cuh) so the SIMT emulation (csrc/cuda/simt/) compiles and runs exactly this source.
#include <torch/library.h>

#include "host.cuh"
#include "vp_host.cuh"

namespace labelsmooth_ext {
namespace cuda {

TORCH_LIBRARY_IMPL(labelsmooth_ext, CUDA, m) {
  m.impl("ce_forward", &ce_forward_cuda);
  m.impl("ce_prob_forward", &ce_prob_forward_cuda);
  m.impl("ce_scale_", &ce_scale_cuda_);
  m.impl("ce_grad", &ce_grad_cuda);
  m.impl("ce_grad_", &ce_grad_cuda_);
  m.impl("bce_forward", &bce_forward_cuda);
  m.impl("ce_forward_ext", &ce_forward_ext_cuda);
  m.impl("ce_grad_ext", &ce_grad_ext_cuda);
  m.impl("ce_grad_ext_", &ce_grad_ext_cuda_);
  m.impl("ce_prob_forward_ext", &ce_prob_forward_ext_cuda);
  m.impl("ce_prob_grad_ext", &ce_prob_grad_ext_cuda);
  m.impl("ce_prob_grad_ext_", &ce_prob_grad_ext_cuda_);
}

// Tensor parallel (issue 14): the vocabulary-parallel local passes.
TORCH_LIBRARY_IMPL(labelsmooth_ext, CUDA, m) {
  m.impl("vocab_parallel_stats", &vocab_parallel_stats_cuda);
  m.impl("vocab_parallel_grad", &vocab_parallel_grad_cuda);
}

}  // namespace cuda
}  // namespace labelsmooth_ext
