// CUDA kernels of channel_clip. Forward: each thread owns 8 consecutive
// elements, i.e. whole mask bytes (1 byte, or 2 with the fused ReLU).
// Backward: a block covers KB channels x LP lanes; each lane walks its
// channel's rows in a slab, partial sums are tree-reduced in shared memory
// and the slabs are summed by a second kernel in a fixed order: no atomics.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "channel_clip.cuh"
#include "accumulate.cuh"
#include "channel_grid.cuh"

namespace pydefend::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kBelow = 0, kPassed = 1, kClipped = 2;


template <typename T>
__global__ void forward_kernel(const T* __restrict__ x, const T* __restrict__ upper, T* __restrict__ y,
                               uint8_t* __restrict__ mask, int64_t numel, int64_t inner, int64_t period, bool relu) {
  using A = typename Acc<T>::type;
  const int64_t first = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * 8;
  if (first >= numel) return;
  uint32_t bits = 0;
  for (int e = 0; e < 8; ++e) {
    const int64_t i = first + e;
    if (i >= numel) break;
    const A xv = to_acc(x[i]);
    const A u = to_acc(upper[(i / inner) % period]);
    const A r = (relu && xv <= A(0)) ? A(0) : xv;  // NaN stays NaN
    const bool clipped = r >= u;
    y[i] = from_acc<T>(clipped ? u : r);
    if (relu) {
      const uint32_t s = clipped ? kClipped : (xv <= A(0) ? kBelow : kPassed);
      bits |= s << (2 * e);
    } else {
      bits |= uint32_t(clipped) << e;
    }
  }
  if (relu) {
    mask[first / 4] = bits & 0xff;
    if (first + 4 < numel) mask[first / 4 + 1] = (bits >> 8) & 0xff;
  } else {
    mask[first / 8] = bits & 0xff;
  }
}

__device__ __forceinline__ int state_at(const uint8_t* mask, int64_t i, bool relu) {
  if (relu) return (mask[i >> 2] >> ((i & 3) * 2)) & 3;
  return ((mask[i >> 3] >> (i & 7)) & 1) ? kClipped : kPassed;
}

template <typename T>
__global__ void backward_kernel(const T* __restrict__ grad, const uint8_t* __restrict__ mask, T* __restrict__ grad_x,
                                typename Acc<T>::type* __restrict__ partial, int64_t outer, int64_t inner,
                                int64_t period, int64_t rows_per_slab, int lanes, bool relu) {
  using A = typename Acc<T>::type;
  __shared__ A shared[kThreads];
  const int lane = threadIdx.x % lanes;
  const int64_t k = static_cast<int64_t>(blockIdx.x) * (kThreads / lanes) + threadIdx.x / lanes;
  const int64_t row0 = static_cast<int64_t>(blockIdx.y) * rows_per_slab;
  const int64_t row1 = row0 + rows_per_slab < outer ? row0 + rows_per_slab : outer;
  A sum = 0;
  if (k < period) {
    for (int64_t o = row0; o < row1; ++o) {
      const int64_t base = (o * period + k) * inner;
      for (int64_t j = lane; j < inner; j += lanes) {
        const int s = state_at(mask, base + j, relu);
        const T g = grad[base + j];
        grad_x[base + j] = s == kPassed ? g : from_acc<T>(A(0));
        if (s == kClipped) sum += to_acc(g);
      }
    }
  }
  shared[threadIdx.x] = sum;
  __syncthreads();
  for (int stride = lanes / 2; stride > 0; stride /= 2) {
    if (lane < stride) shared[threadIdx.x] += shared[threadIdx.x + stride];
    __syncthreads();
  }
  if (lane == 0 && k < period) partial[static_cast<int64_t>(blockIdx.y) * period + k] = shared[threadIdx.x];
}

template <typename T>
__global__ void sum_slabs_kernel(const typename Acc<T>::type* __restrict__ partial, T* __restrict__ grad_upper,
                                 int64_t slabs, int64_t period) {
  const int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (k >= period) return;
  typename Acc<T>::type sum = 0;
  for (int64_t s = 0; s < slabs; ++s) sum += partial[s * period + k];
  grad_upper[k] = from_acc<T>(sum);
}

template <typename T>
cudaError_t launch_forward(const void* x, const void* upper, void* y, uint8_t* mask, int64_t numel, int64_t inner,
                           int64_t period, bool relu, cudaStream_t stream) {
  const int64_t threads_needed = (numel + 7) / 8;
  const int64_t blocks = (threads_needed + kThreads - 1) / kThreads;
  forward_kernel<T><<<blocks, kThreads, 0, stream>>>(static_cast<const T*>(x), static_cast<const T*>(upper),
                                                     static_cast<T*>(y), mask, numel, inner, period, relu);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_backward(const void* grad, const uint8_t* mask, void* grad_x, void* grad_upper, void* partial,
                            int64_t outer, int64_t inner, int64_t period, bool relu, cudaStream_t stream) {
  using A = typename Acc<T>::type;
  const ChannelGrid g = channel_grid(outer, period, inner, kThreads);
  backward_kernel<T><<<dim3(g.channel_blocks, g.slabs), kThreads, 0, stream>>>(
      static_cast<const T*>(grad), mask, static_cast<T*>(grad_x), static_cast<A*>(partial), outer, inner, period,
      g.rows_per_slab, g.lanes, relu);
  sum_slabs_kernel<T><<<(period + kThreads - 1) / kThreads, kThreads, 0, stream>>>(
      static_cast<const A*>(partial), static_cast<T*>(grad_upper), g.slabs, period);
  return cudaGetLastError();
}

}  // namespace

int64_t channel_clip_backward_slabs(int64_t outer, int64_t period, int64_t inner) {
  return channel_grid(outer, period, inner, kThreads).slabs;
}

cudaError_t channel_clip_forward(DType dtype, const void* x, const void* upper, void* y, uint8_t* mask, int64_t numel,
                                 int64_t inner, int64_t period, bool relu, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32: return launch_forward<float>(x, upper, y, mask, numel, inner, period, relu, stream);
    case DType::kFloat64: return launch_forward<double>(x, upper, y, mask, numel, inner, period, relu, stream);
    case DType::kFloat16: return launch_forward<__half>(x, upper, y, mask, numel, inner, period, relu, stream);
    case DType::kBFloat16: return launch_forward<__nv_bfloat16>(x, upper, y, mask, numel, inner, period, relu, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t channel_clip_backward(DType dtype, const void* grad, const uint8_t* mask, void* grad_x, void* grad_upper,
                                  void* partial, int64_t outer, int64_t inner, int64_t period, bool relu,
                                  cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32:
      return launch_backward<float>(grad, mask, grad_x, grad_upper, partial, outer, inner, period, relu, stream);
    case DType::kFloat64:
      return launch_backward<double>(grad, mask, grad_x, grad_upper, partial, outer, inner, period, relu, stream);
    case DType::kFloat16:
      return launch_backward<__half>(grad, mask, grad_x, grad_upper, partial, outer, inner, period, relu, stream);
    case DType::kBFloat16:
      return launch_backward<__nv_bfloat16>(grad, mask, grad_x, grad_upper, partial, outer, inner, period, relu,
                                            stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace pydefend::cuda
