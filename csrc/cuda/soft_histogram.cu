// CUDA kernels of soft_histogram (flat contract, window, fixed point: see
// csrc/soft_histogram_cpu.cpp).
//
// Forward: a block owns CB consecutive channels and a slab of rows; its
// threads walk the slab's (row, channel, inner) positions in memory order
// (coalesced for conv maps and 2-D inputs alike) and add each element's
// window of fixed-point bin differences into a shared-memory int64 histogram
// of CB x max_bins, flushed to global counters at the end. Integer atomics
// are exact and commutative, so the result does not depend on their order:
// bit-identical run to run. Histograms too big for shared memory (more than
// 6144 bins, 3072 for float64) add straight into the global counters.
// A finalize kernel turns counts into probabilities.
//
// Backward: a block covers (256 / lanes) channels x lanes; each lane walks
// its channel's rows in a slab, recomputes the window's sigmoids, writes
// grad_z and sums it; partial sums are tree-reduced in shared memory and the
// slabs summed by a second kernel in a fixed order: no float atomics.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "soft_histogram.cuh"
#include "accumulate.cuh"
#include "channel_grid.cuh"

namespace pydefend::cuda::soft_hist {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kSharedBytes = 48 * 1024;


template <typename A> struct Fixed;
template <> struct Fixed<float> {
  static constexpr int kBits = 32;
  static constexpr int kSlots = 1;
};
template <> struct Fixed<double> {
  static constexpr int kBits = 62;
  static constexpr int kSlots = 2;  // high and low 31 bits of each difference
};

__device__ __forceinline__ float exp_of(float x) { return expf(x); }
__device__ __forceinline__ double exp_of(double x) { return exp(x); }
__device__ __forceinline__ float floor_of(float x) { return floorf(x); }
__device__ __forceinline__ double floor_of(double x) { return floor(x); }
__device__ __forceinline__ float quiet_nan(float) { return nanf(""); }
__device__ __forceinline__ double quiet_nan(double) { return nan(""); }

// One element's window: edges first .. first + n_eval - 1 are evaluated.
template <typename A>
struct Window {
  A z, low, first;
  int64_t i_lo, n_eval;
  bool nan;

  __device__ __forceinline__ Window(A zv, A lo, int64_t m, A width, A reach, int64_t window) : low(lo) {
    nan = zv != zv;
    z = nan ? A(0) : zv;
    // Clamped in floating point, so huge |z| and +-inf never overflow the integer conversion.
    A f = floor_of((z - lo) / width - reach) + A(1);
    f = f < A(0) ? A(0) : (f > A(m) ? A(m) : f);
    first = f;
    i_lo = static_cast<int64_t>(f);
    n_eval = nan ? 0 : (window < m - i_lo ? window : m - i_lo);
  }

  // x = tau * (z - e_{i_lo + t}) and small = sigmoid(-|x|).
  __device__ __forceinline__ void edge(int64_t t, A width, A tau, A& x, A& small) const {
    x = tau * (z - (low + (first + A(t)) * width));
    const A a = exp_of(-fabs(x));
    small = a / (A(1) + a);
  }
};

template <typename A>
__device__ __forceinline__ int64_t quantize(A x, A small) {
  constexpr int64_t one = int64_t(1) << Fixed<A>::kBits;
  const int64_t q = static_cast<int64_t>(small * A(one) + A(0.5));
  return x >= A(0) ? one - q : q;
}

template <typename A>
__device__ __forceinline__ void add_count(unsigned long long* p, int64_t d) {
  if constexpr (Fixed<A>::kSlots == 2) {
    atomicAdd(p, static_cast<unsigned long long>(d >> 31));
    atomicAdd(p + 1, static_cast<unsigned long long>(d & 0x7fffffff));
  } else {
    atomicAdd(p, static_cast<unsigned long long>(d));
  }
}

template <typename T>
__global__ void forward_kernel(const T* __restrict__ z, const typename Acc<T>::type* __restrict__ low,
                               const int64_t* __restrict__ num_bins, unsigned long long* __restrict__ counts,
                               int32_t* __restrict__ nan_flags, int64_t outer, int64_t inner, int64_t C,
                               int64_t max_bins, int64_t cb, int64_t rows_per_slab, bool shared,
                               typename Acc<T>::type width, typename Acc<T>::type tau, int64_t window,
                               typename Acc<T>::type reach) {
  using A = typename Acc<T>::type;
  constexpr int kSlots = Fixed<A>::kSlots;
  constexpr int64_t one = int64_t(1) << Fixed<A>::kBits;
  extern __shared__ unsigned long long smem[];
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * cb;
  const int64_t c1 = c0 + cb < C ? c0 + cb : C;
  const int64_t per_channel = max_bins * kSlots;
  const int64_t entries = (c1 - c0) * per_channel;
  unsigned long long* hist = shared ? smem : counts + c0 * per_channel;
  if (shared) {
    for (int64_t i = threadIdx.x; i < entries; i += blockDim.x) smem[i] = 0;
    __syncthreads();
  }
  const int64_t o0 = static_cast<int64_t>(blockIdx.y) * rows_per_slab;
  const int64_t o1 = o0 + rows_per_slab < outer ? o0 + rows_per_slab : outer;
  const int64_t run = (c1 - c0) * inner;  // contiguous elements of this block in one row
  const int64_t total = (o1 - o0) * run;
  for (int64_t p = threadIdx.x; p < total; p += blockDim.x) {
    const int64_t r = p / run, t = p - r * run, cl = t / inner;
    const int64_t c = c0 + cl;
    const int64_t m = num_bins[c];
    const Window<A> w(to_acc(z[((o0 + r) * C + c0) * inner + t]), low[c], m, width, reach, window);
    if (w.nan) {
      nan_flags[c] = 1;
      continue;
    }
    unsigned long long* h = hist + cl * per_channel;
    int64_t prev = one;
    for (int64_t k = 0; k <= w.n_eval; ++k) {
      const int64_t i = w.i_lo + k;  // edge index; bin i - 1 gets Q_{i-1} - Q_i
      int64_t q = 0;
      if (k < w.n_eval) {
        if (i == 0) {
          q = one;
        } else {
          A x, small;
          w.edge(k, width, tau, x, small);
          q = quantize(x, small);
        }
      }
      const int64_t d = prev - q;
      prev = q;
      if (d != 0 && i >= 1) add_count<A>(h + (i - 1) * kSlots, d);
    }
  }
  if (shared) {
    __syncthreads();
    for (int64_t i = threadIdx.x; i < entries; i += blockDim.x)
      if (smem[i] != 0) atomicAdd(counts + c0 * per_channel + i, smem[i]);
  }
}

template <typename A>
__global__ void finalize_kernel(const unsigned long long* __restrict__ counts, const int32_t* __restrict__ nan_flags,
                                const int64_t* __restrict__ num_bins, A* __restrict__ hist, int64_t C,
                                int64_t max_bins, double norm) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= C * max_bins) return;
  const int64_t c = idx / max_bins, m = idx - c * max_bins;
  if (m >= num_bins[c]) {
    hist[idx] = A(0);
    return;
  }
  double value;
  if constexpr (Fixed<A>::kSlots == 2) {
    value = (static_cast<double>(counts[2 * idx]) * 2147483648.0 + static_cast<double>(counts[2 * idx + 1])) * norm;
  } else {
    value = static_cast<double>(counts[idx]) * norm;
  }
  hist[idx] = nan_flags[c] ? quiet_nan(A(0)) : static_cast<A>(value);
}

template <typename T>
__global__ void backward_kernel(const typename Acc<T>::type* __restrict__ grad, const T* __restrict__ z,
                                const typename Acc<T>::type* __restrict__ low, const int64_t* __restrict__ num_bins,
                                T* __restrict__ grad_z, typename Acc<T>::type* __restrict__ partial, int64_t outer,
                                int64_t inner, int64_t C, int64_t max_bins, int64_t rows_per_slab, int lanes,
                                typename Acc<T>::type width, typename Acc<T>::type tau, int64_t window,
                                typename Acc<T>::type reach, typename Acc<T>::type scale) {
  using A = typename Acc<T>::type;
  __shared__ A shared[kThreads];
  const int lane = threadIdx.x % lanes;
  const int64_t k = static_cast<int64_t>(blockIdx.x) * (kThreads / lanes) + threadIdx.x / lanes;
  const int64_t row0 = static_cast<int64_t>(blockIdx.y) * rows_per_slab;
  const int64_t row1 = row0 + rows_per_slab < outer ? row0 + rows_per_slab : outer;
  A sum = 0;
  if (k < C) {
    const A lo = low[k];
    const int64_t m = num_bins[k];
    const A* g = grad + k * max_bins;
    for (int64_t o = row0; o < row1; ++o) {
      const int64_t base = (o * C + k) * inner;
      for (int64_t j = lane; j < inner; j += lanes) {
        const A zv = to_acc(z[base + j]);
        const Window<A> w(zv, lo, m, width, reach, window);
        A s = 0;
        for (int64_t t = 0; t < w.n_eval; ++t) {
          const int64_t i = w.i_lo + t;
          if (i == 0) continue;
          A x, small;
          w.edge(t, width, tau, x, small);
          s += small * (A(1) - small) * (g[i] - g[i - 1]);
        }
        const A gz = w.nan ? zv : scale * s;  // NaN in, NaN out
        grad_z[base + j] = from_acc<T>(gz);
        sum += gz;
      }
    }
  }
  shared[threadIdx.x] = sum;
  __syncthreads();
  for (int stride = lanes / 2; stride > 0; stride /= 2) {
    if (lane < stride) shared[threadIdx.x] += shared[threadIdx.x + stride];
    __syncthreads();
  }
  if (lane == 0 && k < C) partial[static_cast<int64_t>(blockIdx.y) * C + k] = -shared[threadIdx.x];
}

template <typename A>
__global__ void sum_slabs_kernel(const A* __restrict__ partial, A* __restrict__ grad_low, int64_t slabs, int64_t C) {
  const int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (k >= C) return;
  A sum = 0;
  for (int64_t s = 0; s < slabs; ++s) sum += partial[s * C + k];
  grad_low[k] = sum;
}

template <typename T>
cudaError_t launch_forward(const void* z, const void* low, const int64_t* num_bins, int64_t* counts,
                           int32_t* nan_flags, void* hist, int64_t numel, int64_t inner, int64_t C, int64_t max_bins,
                           double width, double tau, int64_t window, double reach, cudaStream_t stream) {
  using A = typename Acc<T>::type;
  const int64_t outer = numel / (C * inner);
  const int64_t channel_bytes = max_bins * Fixed<A>::kSlots * static_cast<int64_t>(sizeof(unsigned long long));
  // Channels per block: enough contiguous elements per row for the threads, as many as shared memory holds.
  const int64_t wanted = (4 * kThreads + inner - 1) / inner;
  const bool shared = channel_bytes <= kSharedBytes;
  int64_t cb = shared ? kSharedBytes / channel_bytes : wanted;
  cb = cb < wanted ? cb : wanted;
  cb = cb < C ? cb : C;
  const int64_t cblocks = (C + cb - 1) / cb;
  int64_t slabs = 1024 / cblocks;
  slabs = slabs < 1 ? 1 : (slabs > outer ? outer : slabs);
  const int64_t rows_per_slab = (outer + slabs - 1) / slabs;
  slabs = (outer + rows_per_slab - 1) / rows_per_slab;
  const size_t smem = shared ? static_cast<size_t>(cb * channel_bytes) : 0;
  forward_kernel<T><<<dim3(cblocks, slabs), kThreads, smem, stream>>>(
      static_cast<const T*>(z), static_cast<const A*>(low), num_bins, reinterpret_cast<unsigned long long*>(counts),
      nan_flags, outer, inner, C, max_bins, cb, rows_per_slab, shared, static_cast<A>(width), static_cast<A>(tau),
      window, static_cast<A>(reach));
  const double norm = 1.0 / (static_cast<double>(int64_t(1) << Fixed<A>::kBits) * static_cast<double>(outer * inner));
  finalize_kernel<A><<<(C * max_bins + kThreads - 1) / kThreads, kThreads, 0, stream>>>(
      reinterpret_cast<const unsigned long long*>(counts), nan_flags, num_bins, static_cast<A*>(hist), C, max_bins,
      norm);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_backward(const void* grad, const void* z, const void* low, const int64_t* num_bins, void* grad_z,
                            void* grad_low, void* partial, int64_t numel, int64_t inner, int64_t C, int64_t max_bins,
                            double width, double tau, int64_t window, double reach, cudaStream_t stream) {
  using A = typename Acc<T>::type;
  const int64_t outer = numel / (C * inner);
  const ChannelGrid g = channel_grid(outer, C, inner, kThreads);
  const double scale = tau / static_cast<double>(outer * inner);
  backward_kernel<T><<<dim3(g.channel_blocks, g.slabs), kThreads, 0, stream>>>(
      static_cast<const A*>(grad), static_cast<const T*>(z), static_cast<const A*>(low), num_bins,
      static_cast<T*>(grad_z), static_cast<A*>(partial), outer, inner, C, max_bins, g.rows_per_slab, g.lanes,
      static_cast<A>(width), static_cast<A>(tau), window, static_cast<A>(reach), static_cast<A>(scale));
  sum_slabs_kernel<A><<<(C + kThreads - 1) / kThreads, kThreads, 0, stream>>>(
      static_cast<const A*>(partial), static_cast<A*>(grad_low), g.slabs, C);
  return cudaGetLastError();
}

}  // namespace

int64_t backward_slabs(int64_t outer, int64_t C, int64_t inner) {
  return channel_grid(outer, C, inner, kThreads).slabs;
}

cudaError_t forward(DType dtype, const void* z, const void* low, const int64_t* num_bins, int64_t* counts,
                    int32_t* nan_flags, void* hist, int64_t numel, int64_t inner, int64_t C, int64_t max_bins,
                    double width, double tau, int64_t window, double reach, cudaStream_t stream) {
#define PYDEFEND_SH_FWD(T) \
  launch_forward<T>(z, low, num_bins, counts, nan_flags, hist, numel, inner, C, max_bins, width, tau, window, reach, stream)
  switch (dtype) {
    case DType::kFloat32: return PYDEFEND_SH_FWD(float);
    case DType::kFloat64: return PYDEFEND_SH_FWD(double);
    case DType::kFloat16: return PYDEFEND_SH_FWD(__half);
    case DType::kBFloat16: return PYDEFEND_SH_FWD(__nv_bfloat16);
  }
#undef PYDEFEND_SH_FWD
  return cudaErrorInvalidValue;
}

cudaError_t backward(DType dtype, const void* grad, const void* z, const void* low, const int64_t* num_bins,
                     void* grad_z, void* grad_low, void* partial, int64_t numel, int64_t inner, int64_t C,
                     int64_t max_bins, double width, double tau, int64_t window, double reach, cudaStream_t stream) {
#define PYDEFEND_SH_BWD(T)                                                                                     \
  launch_backward<T>(grad, z, low, num_bins, grad_z, grad_low, partial, numel, inner, C, max_bins, width, tau, \
                     window, reach, stream)
  switch (dtype) {
    case DType::kFloat32: return PYDEFEND_SH_BWD(float);
    case DType::kFloat64: return PYDEFEND_SH_BWD(double);
    case DType::kFloat16: return PYDEFEND_SH_BWD(__half);
    case DType::kBFloat16: return PYDEFEND_SH_BWD(__nv_bfloat16);
  }
#undef PYDEFEND_SH_BWD
  return cudaErrorInvalidValue;
}

}  // namespace pydefend::cuda::soft_hist
