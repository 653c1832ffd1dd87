// Thin torch binding of neuron_l1_change's CUDA launcher (built only with CUDA torch).
// The per-tensor table is built in pinned host memory and copied to the
// device once per call (asynchronously, on the current stream).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstring>
#include <limits>
#include <vector>

#include "cuda/neuron_l1.cuh"
#include "neuron_l1.h"

namespace pydefend {
namespace {

cuda::L1DType launcher_dtype(at::ScalarType t, size_t j) {
  switch (t) {
    case at::kFloat: return cuda::L1DType::kFloat32;
    case at::kDouble: return cuda::L1DType::kFloat64;
    case at::kHalf: return cuda::L1DType::kFloat16;
    case at::kBFloat16: return cuda::L1DType::kBFloat16;
    default:
      TORCH_CHECK(false, "neuron_l1_change: pair ", j, " has dtype ", t,
                  "; supported: float32, float64, float16, bfloat16");
  }
}

std::vector<at::Tensor> neuron_l1_change_cuda(at::TensorList a_in, at::TensorList b_in) {
  check_neuron_l1_pairs(a_in, b_in);
  const size_t n = a_in.size();
  if (n == 0) return {};
  const c10::cuda::CUDAGuard guard(a_in[0].device());
  std::vector<at::Tensor> a(n), b(n), out(n);
  std::vector<cuda::NeuronL1Entry> entries(n);
  for (size_t j = 0; j < n; ++j) {
    a[j] = a_in[j].contiguous();
    b[j] = b_in[j].contiguous();
    const int64_t rows = a[j].dim() == 0 ? 1 : a[j].size(0);
    const int64_t cols = rows == 0 ? 0 : a[j].numel() / rows;
    out[j] = cols == 0 ? at::zeros({rows}, a[j].options().dtype(at::kFloat))
                       : at::empty({rows}, a[j].options().dtype(at::kFloat));
    entries[j] = {a[j].const_data_ptr(), b[j].const_data_ptr(), out[j].mutable_data_ptr<float>(), rows, cols,
                  0, 0, 0, 0, launcher_dtype(a[j].scalar_type(), j), cuda::L1Mode::kThreadRows};
  }
  const cuda::NeuronL1Plan plan = cuda::neuron_l1_plan(entries.data(), static_cast<int64_t>(n));
  TORCH_CHECK(plan.units <= std::numeric_limits<int32_t>::max(), "neuron_l1_change: ", plan.units,
              " thread blocks exceed the grid limit");
  if (plan.units == 0) return out;

  const int64_t bytes = static_cast<int64_t>(n * sizeof(cuda::NeuronL1Entry));
  at::Tensor host = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(host.mutable_data_ptr(), entries.data(), bytes);
  const at::Tensor table = host.to(a[0].device(), at::kByte, /*non_blocking=*/true);
  at::Tensor partial = at::empty({plan.partials}, a[0].options().dtype(at::kDouble));
  const cudaError_t err = cuda::neuron_l1_change(static_cast<const cuda::NeuronL1Entry*>(table.const_data_ptr()),
                                                 static_cast<int64_t>(n), plan,
                                                 plan.partials > 0 ? partial.mutable_data_ptr<double>() : nullptr,
                                                 at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "neuron_l1_change: CUDA kernel launch failed: ", cudaGetErrorString(err));
  return out;
}

}  // namespace
}  // namespace pydefend

TORCH_LIBRARY_IMPL(pydefend_native, CUDA, m) {
  m.impl("neuron_l1_change", &pydefend::neuron_l1_change_cuda);
}
