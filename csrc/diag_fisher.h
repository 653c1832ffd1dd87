// Argument checks of diag_fisher_norm, shared by the CPU kernel and the CUDA
// binding so both refuse the same inputs with the same words.
#pragma once
#include <ATen/ATen.h>

#include "checks.h"

namespace pydefend {

inline void check_diag_fisher_norm_args(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& mean,
                                        const at::Tensor& invstd) {
  TORCH_CHECK(grad.dim() == 4 && x.sizes() == grad.sizes(),
              "diag_fisher_norm: grad_out and input must both be (N, A, P, B), got ", grad.sizes(), " and ", x.sizes());
  TORCH_CHECK(is_kernel_dtype(x.scalar_type()) && grad.scalar_type() == x.scalar_type(),
              "diag_fisher_norm: grad_out and input must share a floating dtype (float32, float64, float16 or "
              "bfloat16), got ", grad.scalar_type(), " and ", x.scalar_type());
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(mean.scalar_type() == acc && invstd.scalar_type() == acc, "diag_fisher_norm: mean and invstd must be ",
              acc, " for ", x.scalar_type(), " inputs, got ", mean.scalar_type(), " and ", invstd.scalar_type());
  TORCH_CHECK(mean.dim() == 3 && mean.sizes() == invstd.sizes(),
              "diag_fisher_norm: mean and invstd must both be (SN, SA, SP), got ", mean.sizes(), " and ",
              invstd.sizes());
  const int64_t SN = mean.size(0), SA = mean.size(1), SP = mean.size(2);
  TORCH_CHECK((SN == 1 || SN == x.size(0)) && (SA == 1 || SA == x.size(1)) && SP >= 1 && x.size(2) % SP == 0,
              "diag_fisher_norm: stats of shape ", mean.sizes(), " do not fit input (N, A, P, B) = ", x.sizes(),
              "; expected (1 or N, 1 or A, a divisor of P)");
  TORCH_CHECK(grad.device() == x.device() && mean.device() == x.device() && invstd.device() == x.device(),
              "diag_fisher_norm: grad_out, input, mean and invstd must be on one device, got ", grad.device(), ", ",
              x.device(), ", ", mean.device(), " and ", invstd.device());
}

}  // namespace pydefend
