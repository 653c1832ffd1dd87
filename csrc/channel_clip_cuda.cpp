// Thin torch binding of channel_clip's CUDA launchers (built only with CUDA torch).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "channel_clip.h"
#include "cuda/channel_clip.cuh"

namespace pydefend {
namespace {

cuda::DType launcher_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return cuda::DType::kFloat32;
    case at::kDouble: return cuda::DType::kFloat64;
    case at::kHalf: return cuda::DType::kFloat16;
    case at::kBFloat16: return cuda::DType::kBFloat16;
    default: TORCH_CHECK(false, "channel_clip: unsupported dtype ", t, " (float32/64, float16, bfloat16)");
  }
}

void check_launch(cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, "channel_clip: CUDA kernel launch failed: ", cudaGetErrorString(err));
}

std::tuple<at::Tensor, at::Tensor> channel_clip_fwd_cuda(const at::Tensor& x_in, const at::Tensor& upper_in,
                                                         int64_t inner, bool relu) {
  check_channel_clip_args(x_in, upper_in, inner);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous(), upper = upper_in.contiguous();
  at::Tensor y = at::empty_like(x);
  at::Tensor mask = at::empty({channel_clip_mask_bytes(x.numel(), relu)}, x.options().dtype(at::kByte));
  if (x.numel() > 0) {
    check_launch(cuda::channel_clip_forward(launcher_dtype(x.scalar_type()), x.const_data_ptr(),
                                            upper.const_data_ptr(), y.mutable_data_ptr(),
                                            mask.mutable_data_ptr<uint8_t>(), x.numel(), inner, upper.numel(), relu,
                                            at::cuda::getCurrentCUDAStream()));
  }
  return {y, mask};
}

std::tuple<at::Tensor, at::Tensor> channel_clip_bwd_cuda(const at::Tensor& grad_in, const at::Tensor& mask_in,
                                                         const at::Tensor& upper, int64_t inner, bool relu) {
  check_channel_clip_args(grad_in, upper, inner);
  check_channel_clip_mask(mask_in, grad_in, relu);
  const c10::cuda::CUDAGuard guard(grad_in.device());
  const at::Tensor grad = grad_in.contiguous(), mask = mask_in.contiguous();
  const int64_t numel = grad.numel(), period = upper.numel(), outer = numel / (inner * period);
  at::Tensor grad_x = at::empty_like(grad);
  at::Tensor grad_upper = at::zeros(upper.sizes(), upper.options());
  if (numel > 0) {
    const auto acc = grad.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    at::Tensor partial = at::empty({cuda::channel_clip_backward_slabs(outer, period, inner), period},
                                   grad.options().dtype(acc));
    check_launch(cuda::channel_clip_backward(launcher_dtype(grad.scalar_type()), grad.const_data_ptr(),
                                             mask.const_data_ptr<uint8_t>(), grad_x.mutable_data_ptr(),
                                             grad_upper.mutable_data_ptr(), partial.mutable_data_ptr(), outer, inner,
                                             period, relu, at::cuda::getCurrentCUDAStream()));
  }
  return {grad_x, grad_upper};
}

}  // namespace
}  // namespace pydefend

TORCH_LIBRARY_IMPL(pydefend_native, CUDA, m) {
  m.impl("channel_clip_fwd", &pydefend::channel_clip_fwd_cuda);
  m.impl("channel_clip_bwd", &pydefend::channel_clip_bwd_cuda);
}
