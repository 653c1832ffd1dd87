// Argument checks common to every op's native bindings (CPU and CUDA alike).
#pragma once
#include <ATen/ATen.h>

#include <cstdint>

namespace pydefend {

// The floating types the kernels are instantiated for.
inline bool is_kernel_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// a * b in *out; false when the product does not fit int64 (so it was never computed wrapped).
inline bool mul_fits(int64_t a, int64_t b, int64_t* out) { return !__builtin_mul_overflow(a, b, out); }

}  // namespace pydefend
