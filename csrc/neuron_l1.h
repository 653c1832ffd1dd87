// Argument checks of neuron_l1_change, shared by the CPU kernel and the CUDA
// binding so both refuse the same inputs with the same words.
#pragma once
#include <ATen/ATen.h>

#include "checks.h"

namespace pydefend {

inline void check_neuron_l1_pairs(at::TensorList a, at::TensorList b) {
  TORCH_CHECK(a.size() == b.size(), "neuron_l1_change: got ", a.size(), " tensors in params_a but ", b.size(),
              " in params_b");
  for (size_t j = 0; j < a.size(); ++j) {
    TORCH_CHECK(a[j].sizes() == b[j].sizes(), "neuron_l1_change: pair ", j, " has shapes ", a[j].sizes(), " and ",
                b[j].sizes());
    TORCH_CHECK(a[j].scalar_type() == b[j].scalar_type(), "neuron_l1_change: pair ", j, " has dtypes ",
                a[j].scalar_type(), " and ", b[j].scalar_type());
    TORCH_CHECK(is_kernel_dtype(a[j].scalar_type()), "neuron_l1_change: pair ", j, " has dtype ", a[j].scalar_type(),
                "; supported: float32, float64, float16, bfloat16");
    TORCH_CHECK(a[j].device() == a[0].device() && b[j].device() == a[0].device(), "neuron_l1_change: pair ", j,
                " is on devices ", a[j].device(), " and ", b[j].device(), " but pair 0 is on ", a[0].device(),
                " (all tensors must be on one device)");
  }
}

}  // namespace pydefend
