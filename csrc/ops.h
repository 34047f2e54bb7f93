// Declarations shared by the backends: argument checks and the tensor-level pieces of the
// forward that are the same on every device.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace labelsmooth_ext {

// TORCH_CHECKs with messages that name the argument and the value. The Python layer checks
// the same things first (with Python exception types); these guard C++ callers.
void check_ce_args(const at::Tensor& input, const at::Tensor& target,
                   const std::optional<at::Tensor>& weight, double eps, int64_t mode,
                   int64_t reduction, bool allow_3d = false);
void check_prob_args(const at::Tensor& input, const at::Tensor& target,
                     const std::optional<at::Tensor>& weight, double eps, int64_t mode,
                     int64_t reduction);

void check_bce_args(const at::Tensor& input, const at::Tensor& target,
                    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& pos_weight,
                    double eps, int64_t reduction);

// z_loss >= 0 (finite), softcap >= 0 (0: none; else finite).
void check_ext_args(const char* fn, double z_loss, double softcap);
// The logits that the in-place backward overwrites: contiguous 2-d rows (no overlap, no gap).
void check_inplace_target(const at::Tensor& input);

// The vocabulary-parallel operators' arguments (input 2-d rows of the slice, target (N,) int64,
// weight the slice's (K_r,), softcap >= 0) and the gradient's per-row coefficients (4, N).
void check_vp_args(const char* fn, const at::Tensor& input, const at::Tensor& target,
                   const std::optional<at::Tensor>& weight, double softcap);
void check_vp_coefs(const char* fn, const at::Tensor& input, const at::Tensor& coefs);

// grad_output (one value per row of grad) shaped to broadcast over grad's rows.
at::Tensor per_row_view(const at::Tensor& grad_output, const at::Tensor& grad);

// The rows of a 2-d input with unit class stride; copies only when the class stride is not 1.
at::Tensor rows_with_unit_class_stride(const at::Tensor& t);

// float for half/bfloat16/float input, double for double.
at::ScalarType acc_type_of(at::ScalarType t);

// Per-row losses (acc dtype) -> the op's loss output (acc dtype: the Python layer casts).
// `denom` is the 0-dim mean denominator (ignored unless reduction is mean).
at::Tensor finish_loss(const at::Tensor& rows, const at::Tensor& denom, int64_t reduction);

}  // namespace labelsmooth_ext
