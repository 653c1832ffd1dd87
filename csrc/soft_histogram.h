// Argument checks of soft_histogram's flat native contract, shared by the CPU
// kernel and the CUDA binding so both refuse the same inputs with the same words.
#pragma once
#include <ATen/ATen.h>

namespace pydefend {

inline void check_soft_histogram_args(const at::Tensor& z, const at::Tensor& low, const at::Tensor& num_bins,
                                      int64_t inner, int64_t window) {
  TORCH_CHECK(at::isFloatingType(z.scalar_type()), "soft_histogram: z must be floating point, got ", z.scalar_type());
  const auto acc = z.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(low.scalar_type() == acc, "soft_histogram: low must be ", acc, " for ", z.scalar_type(), " z, got ",
              low.scalar_type());
  TORCH_CHECK(num_bins.scalar_type() == at::kLong && num_bins.numel() == low.numel(),
              "soft_histogram: num_bins must be int64 with one entry per channel");
  TORCH_CHECK(low.device() == z.device() && num_bins.device() == z.device(),
              "soft_histogram: z, low and num_bins must be on one device");
  TORCH_CHECK(low.numel() >= 1 && inner >= 1 && z.numel() % (inner * low.numel()) == 0, "soft_histogram: z has ",
              z.numel(), " elements, not a multiple of inner * channels = ", inner * low.numel());
  TORCH_CHECK(z.numel() >= low.numel(), "soft_histogram: z has no elements per channel");
  TORCH_CHECK(window >= 1, "soft_histogram: window must be >= 1");
}

}  // namespace pydefend
