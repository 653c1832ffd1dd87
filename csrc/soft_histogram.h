// Argument checks of soft_histogram's flat native contract, shared by the CPU
// kernel and the CUDA binding so both refuse the same inputs with the same words.
#pragma once
#include <ATen/ATen.h>

#include <cmath>
#include <limits>

#include "checks.h"

namespace pydefend {

constexpr int64_t kSoftHistogramMaxBins = int64_t(1) << 24;
constexpr int64_t kSoftHistogramMaxPerChannel = (int64_t(1) << 31) - 1;  // the fixed-point counters' limit

// v is a finite number > 0 once rounded to the accumulation dtype (fp32 turns 1e39 into inf, 1e-46 into 0).
inline bool positive_finite_in(double v, bool wide) {
  if (wide) return std::isfinite(v) && v > 0;
  return std::isfinite(v) && v <= std::numeric_limits<float>::max() && static_cast<float>(v) > 0;
}

// Everything but the values of low and num_bins (check_soft_histogram_values reads those). Sizes are checked
// before any product of them is formed, so none can wrap.
inline void check_soft_histogram_args(const at::Tensor& z, const at::Tensor& low, const at::Tensor& num_bins,
                                      int64_t inner, int64_t max_bins, double width, double tau, int64_t window,
                                      double reach) {
  TORCH_CHECK(is_kernel_dtype(z.scalar_type()), "soft_histogram: z must be float32, float64, float16 or bfloat16, got ",
              z.scalar_type());
  const auto acc = z.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(low.scalar_type() == acc && low.dim() == 1, "soft_histogram: low must be a 1-D ", acc, " tensor for ",
              z.scalar_type(), " z, got ", low.scalar_type(), " of shape ", low.sizes());
  TORCH_CHECK(num_bins.scalar_type() == at::kLong && num_bins.dim() == 1 && num_bins.numel() == low.numel(),
              "soft_histogram: num_bins must be a 1-D int64 tensor with one entry per channel (", low.numel(),
              "), got ", num_bins.scalar_type(), " of shape ", num_bins.sizes());
  TORCH_CHECK(low.device() == z.device() && num_bins.device() == z.device(),
              "soft_histogram: z, low and num_bins must be on one device, got ", z.device(), ", ", low.device(),
              " and ", num_bins.device());
  const int64_t C = low.numel();
  TORCH_CHECK(C >= 1, "soft_histogram: low is empty (no channels)");
  TORCH_CHECK(inner >= 1, "soft_histogram: inner must be >= 1, got ", inner);
  int64_t block = 0;
  TORCH_CHECK(mul_fits(inner, C, &block) && z.numel() % block == 0, "soft_histogram: z has ", z.numel(),
              " elements, not a multiple of inner * channels = ", inner, " * ", C);
  TORCH_CHECK(z.numel() > 0, "soft_histogram: z has no elements per channel");
  TORCH_CHECK(z.numel() / C <= kSoftHistogramMaxPerChannel, "soft_histogram: ", z.numel() / C,
              " elements per channel; at most 2^31 - 1 are supported");
  TORCH_CHECK(max_bins >= 1 && max_bins <= kSoftHistogramMaxBins, "soft_histogram: max_bins must be in [1, 2^24], got ",
              max_bins);
  const bool wide = acc == at::kDouble;
  TORCH_CHECK(positive_finite_in(width, wide), "soft_histogram: width must be a finite number > 0 in ", acc, ", got ",
              width);
  TORCH_CHECK(positive_finite_in(tau, wide), "soft_histogram: tau must be a finite number > 0 in ", acc, ", got ",
              tau);
  TORCH_CHECK(reach == 0 || positive_finite_in(reach, wide), "soft_histogram: reach must be a finite number >= 0 in ",
              acc, ", got ", reach);
  TORCH_CHECK(window >= 1, "soft_histogram: window must be >= 1, got ", window);
}

// num_bins[c] in [1, max_bins] (a count out of range would index past the histogram) and every edge
// low[c] + i * width, i <= max_bins, finite in low's dtype. Read on the host: a small copy for CUDA tensors.
inline void check_soft_histogram_values(const at::Tensor& low, const at::Tensor& num_bins, int64_t max_bins,
                                        double width) {
  const at::Tensor nb = num_bins.to(at::kCPU).contiguous();
  const at::Tensor lo = low.to(at::kCPU, at::kDouble).contiguous();
  const int64_t* b = nb.const_data_ptr<int64_t>();
  const double* l = lo.const_data_ptr<double>();
  const double limit = low.scalar_type() == at::kDouble ? std::numeric_limits<double>::max()
                                                        : static_cast<double>(std::numeric_limits<float>::max());
  for (int64_t c = 0; c < nb.numel(); ++c) {
    TORCH_CHECK(b[c] >= 1 && b[c] <= max_bins, "soft_histogram: num_bins[", c, "] = ", b[c],
                " is outside [1, max_bins = ", max_bins, "]");
    const double top = l[c] + static_cast<double>(max_bins) * width;
    TORCH_CHECK(std::isfinite(l[c]) && std::isfinite(top) && std::abs(top) <= limit, "soft_histogram: low[", c,
                "] = ", l[c], " with ", max_bins, " bins of width ", width, " gives edges that are not finite in ",
                low.scalar_type());
  }
}

// The histogram gradient of the backward: (C, max_bins) in low's dtype, on z's device.
inline void check_soft_histogram_grad(const at::Tensor& grad, const at::Tensor& z, const at::Tensor& low) {
  TORCH_CHECK(grad.dim() == 2 && grad.size(0) == low.numel() && grad.scalar_type() == low.scalar_type() &&
                  grad.device() == z.device(),
              "soft_histogram: the histogram gradient must be (C, max_bins) with C = ", low.numel(), " in ",
              low.scalar_type(), " on ", z.device(), ", got ", grad.sizes(), " ", grad.scalar_type(), " on ",
              grad.device());
}

}  // namespace pydefend
