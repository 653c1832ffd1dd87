// channel_clip's mask layout and argument checks, shared by the C++ CPU kernel
// and the CUDA binding so both refuse the same inputs with the same words (the
// .cu file keeps its own device copy of the states: it includes no torch header).
#pragma once
#include <ATen/ATen.h>

#include <cstdint>

#include "checks.h"

namespace pydefend {

enum ChannelClipState : uint8_t { kBelow = 0, kPassed = 1, kClipped = 2 };

inline int64_t channel_clip_mask_bytes(int64_t numel, bool relu) {
  return relu ? (numel + 3) / 4 : (numel + 7) / 8;
}

inline uint8_t channel_clip_state(const uint8_t* mask, int64_t i, bool relu) {
  if (relu) return (mask[i >> 2] >> ((i & 3) * 2)) & 3;
  return ((mask[i >> 3] >> (i & 7)) & 1) ? kClipped : kPassed;
}

// x (or the gradient) is read as (outer, upper.numel(), inner) blocks; the product is checked before it is
// used, so a huge inner can neither wrap it nor divide by zero.
inline void check_channel_clip_args(const at::Tensor& x, const at::Tensor& upper, int64_t inner) {
  TORCH_CHECK(is_kernel_dtype(x.scalar_type()), "channel_clip: x must be float32, float64, float16 or bfloat16, got ",
              x.scalar_type());
  TORCH_CHECK(upper.scalar_type() == x.scalar_type(), "channel_clip: upper has dtype ", upper.scalar_type(),
              " but x has ", x.scalar_type());
  TORCH_CHECK(upper.device() == x.device(), "channel_clip: x is on ", x.device(), " but upper is on ", upper.device());
  TORCH_CHECK(upper.numel() >= 1, "channel_clip: upper is empty");
  TORCH_CHECK(inner >= 1, "channel_clip: inner must be >= 1, got ", inner);
  int64_t block = 0;
  TORCH_CHECK(mul_fits(inner, upper.numel(), &block) && x.numel() % block == 0, "channel_clip: x has ", x.numel(),
              " elements, not a multiple of inner * upper.numel() = ", inner, " * ", upper.numel());
}

inline void check_channel_clip_mask(const at::Tensor& mask, const at::Tensor& grad, bool relu) {
  TORCH_CHECK(mask.scalar_type() == at::kByte && mask.device() == grad.device() &&
                  mask.numel() == channel_clip_mask_bytes(grad.numel(), relu),
              "channel_clip: mask must be the forward's uint8 mask on ", grad.device(), ", ",
              channel_clip_mask_bytes(grad.numel(), relu), " bytes for ", grad.numel(), " elements; got ",
              mask.scalar_type(), " on ", mask.device(), " with ", mask.numel(), " bytes");
}

}  // namespace pydefend
