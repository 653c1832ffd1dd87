// Thin torch binding of soft_histogram's CUDA launchers (built only with CUDA torch).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda/soft_histogram.cuh"
#include "soft_histogram.h"

namespace pydefend {
namespace {

namespace sh = cuda::soft_hist;

sh::DType launcher_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return sh::DType::kFloat32;
    case at::kDouble: return sh::DType::kFloat64;
    case at::kHalf: return sh::DType::kFloat16;
    case at::kBFloat16: return sh::DType::kBFloat16;
    default: TORCH_CHECK(false, "soft_histogram: unsupported dtype ", t, " (float32/64, float16, bfloat16)");
  }
}

void check_launch(cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, "soft_histogram: CUDA kernel launch failed: ", cudaGetErrorString(err));
}

at::Tensor soft_histogram_fwd_cuda(const at::Tensor& z_in, const at::Tensor& low_in, const at::Tensor& nb_in,
                                   int64_t inner, int64_t max_bins, double width, double tau, int64_t window,
                                   double reach) {
  check_soft_histogram_args(z_in, low_in, nb_in, inner, max_bins, width, tau, window, reach);
  const c10::cuda::CUDAGuard guard(z_in.device());
  check_soft_histogram_values(low_in, nb_in, max_bins, width);
  const at::Tensor z = z_in.contiguous(), low = low_in.contiguous(), nb = nb_in.contiguous();
  const int64_t C = low.numel();
  const int64_t slots = z.scalar_type() == at::kDouble ? 2 : 1;
  at::Tensor counts = at::zeros({C, max_bins, slots}, z.options().dtype(at::kLong));
  at::Tensor nan_flags = at::zeros({C}, z.options().dtype(at::kInt));
  at::Tensor hist = at::empty({C, max_bins}, low.options());
  check_launch(sh::forward(launcher_dtype(z.scalar_type()), z.const_data_ptr(), low.const_data_ptr(),
                           nb.const_data_ptr<int64_t>(), counts.mutable_data_ptr<int64_t>(),
                           nan_flags.mutable_data_ptr<int32_t>(), hist.mutable_data_ptr(), z.numel(), inner, C,
                           max_bins, width, tau, window, reach, at::cuda::getCurrentCUDAStream()));
  return hist;
}

std::tuple<at::Tensor, at::Tensor> soft_histogram_bwd_cuda(const at::Tensor& grad_in, const at::Tensor& z_in,
                                                           const at::Tensor& low_in, const at::Tensor& nb_in,
                                                           int64_t inner, double width, double tau, int64_t window,
                                                           double reach) {
  check_soft_histogram_grad(grad_in, z_in, low_in);
  check_soft_histogram_args(z_in, low_in, nb_in, inner, grad_in.size(1), width, tau, window, reach);
  const c10::cuda::CUDAGuard guard(z_in.device());
  check_soft_histogram_values(low_in, nb_in, grad_in.size(1), width);
  const at::Tensor z = z_in.contiguous(), low = low_in.contiguous(), nb = nb_in.contiguous();
  const at::Tensor grad = grad_in.contiguous();
  const int64_t C = low.numel(), outer = z.numel() / (C * inner);
  at::Tensor grad_z = at::empty_like(z);
  at::Tensor grad_low = at::empty_like(low);
  at::Tensor partial = at::empty({sh::backward_slabs(outer, C, inner), C}, low.options());
  check_launch(sh::backward(launcher_dtype(z.scalar_type()), grad.const_data_ptr(), z.const_data_ptr(),
                            low.const_data_ptr(), nb.const_data_ptr<int64_t>(), grad_z.mutable_data_ptr(),
                            grad_low.mutable_data_ptr(), partial.mutable_data_ptr(), z.numel(), inner, C,
                            grad.size(1), width, tau, window, reach, at::cuda::getCurrentCUDAStream()));
  return {grad_z, grad_low};
}

}  // namespace
}  // namespace pydefend

TORCH_LIBRARY_IMPL(pydefend_native, CUDA, m) {
  m.impl("soft_histogram_fwd", &pydefend::soft_histogram_fwd_cuda);
  m.impl("soft_histogram_bwd", &pydefend::soft_histogram_bwd_cuda);
}
