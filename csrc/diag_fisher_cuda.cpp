// Thin torch binding of diag_fisher's CUDA launcher (built only with CUDA torch).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda/diag_fisher.cuh"
#include "diag_fisher.h"

namespace pydefend {
namespace {

namespace df = cuda::diag_fisher;

df::DType launcher_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return df::DType::kFloat32;
    case at::kDouble: return df::DType::kFloat64;
    case at::kHalf: return df::DType::kFloat16;
    case at::kBFloat16: return df::DType::kBFloat16;
    default: TORCH_CHECK(false, "diag_fisher_norm: unsupported dtype ", t, " (float32/64, float16, bfloat16)");
  }
}

std::tuple<at::Tensor, at::Tensor> diag_fisher_norm_cuda(const at::Tensor& grad_in, const at::Tensor& x_in,
                                                         const at::Tensor& mean_in, const at::Tensor& invstd_in) {
  check_diag_fisher_norm_args(grad_in, x_in, mean_in, invstd_in);
  const auto acc = x_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor grad = grad_in.contiguous(), x = x_in.contiguous();
  const at::Tensor mean = mean_in.contiguous(), invstd = invstd_in.contiguous();
  df::NormShape s{x.size(0), x.size(1), x.size(2), x.size(3), 0, 0, 1};
  const int64_t SN = mean.size(0), SA = mean.size(1), SP = mean.size(2);
  s.sn = SN > 1 ? SA * SP : 0;
  s.sa = SA > 1 ? SP : 0;
  s.group = s.p / SP;
  at::Tensor fw = at::zeros({s.p}, x.options().dtype(acc)), fb = at::zeros({s.p}, x.options().dtype(acc));
  if (x.numel() == 0) return {fw, fb};
  at::Tensor partial = at::empty({2 * df::norm_slabs(s) * s.p}, x.options().dtype(acc));
  const cudaError_t err =
      df::norm_forward(launcher_dtype(x.scalar_type()), grad.const_data_ptr(), x.const_data_ptr(),
                       mean.const_data_ptr(), invstd.const_data_ptr(), partial.mutable_data_ptr(),
                       fw.mutable_data_ptr(), fb.mutable_data_ptr(), s, at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "diag_fisher_norm: CUDA kernel launch failed: ", cudaGetErrorString(err));
  return {fw, fb};
}

}  // namespace
}  // namespace pydefend

TORCH_LIBRARY_IMPL(pydefend_native, CUDA, m) { m.impl("diag_fisher_norm", &pydefend::diag_fisher_norm_cuda); }
