// channel_clip: y = min(r, u) with r = x, or r = max(x, 0) when the ReLU is
// fused; u broadcasts over the batch (see pydefend/ops/channel_clip.py).
//
// Flat contract of the native kernels: x is contiguous and element i uses
// upper[(i / inner) % period]. Forward writes y and a packed state mask;
// backward reads only the mask (never x or y).
//
// Mask: 1 bit per element without ReLU (1 = clipped), 2 bits with it
// (0 = below zero, 1 = passed, 2 = clipped); element i lives in byte i/8
// (i/4), at bit i%8 (2*(i%4)). Tie rule: r >= u counts as clipped, so at
// x == u the gradient goes to u. NaN in x propagates and passes its gradient.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <array>
#include <type_traits>

#include "channel_clip.h"

namespace pydefend {
namespace {

// 64 elements = whole mask bytes in both layouts, so blocks never share a byte.
constexpr int64_t kBlock = 64;

// Bit e of the result = lane e's comparison is true (lanes are all-ones or +0).
template <typename acc_t>
inline uint32_t lane_bits(const at::vec::Vectorized<acc_t>& v) {
#if defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<acc_t, float>) return _mm256_movemask_ps(v);
  else return _mm256_movemask_pd(v);
#else
  alignas(64) acc_t lanes[at::vec::Vectorized<acc_t>::size()];
  v.store(lanes);
  uint32_t bits = 0;
  for (int e = 0; e < at::vec::Vectorized<acc_t>::size(); ++e) bits |= uint32_t(lanes[e] != 0) << e;
  return bits;
#endif
}

// Spreads 8 bits to the even bits of 16 (2-bit mask states).
constexpr std::array<uint16_t, 256> kSpread = [] {
  std::array<uint16_t, 256> t{};
  for (int v = 0; v < 256; ++v)
    for (int e = 0; e < 8; ++e) t[v] |= ((v >> e) & 1) << (2 * e);
  return t;
}();

// ub[t] = upper[((start + t) / inner) % period], filled in runs of equal bounds.
template <typename scalar_t, typename acc_t>
void gather_upper(const scalar_t* upper, int64_t start, int64_t n, int64_t inner, int64_t period, acc_t* ub) {
  int64_t j = start % inner, k = (start / inner) % period;
  for (int64_t t = 0; t < n;) {
    if (inner == 1) {  // per element, or channels-last: a contiguous slice of upper
      const int64_t run = std::min(n - t, period - k);
      at::vec::convert(upper + k, ub + t, run);
      t += run;
      k = (k + run) % period;
    } else {
      const int64_t run = std::min(n - t, inner - j);
      std::fill(ub + t, ub + t + run, static_cast<acc_t>(upper[k]));
      t += run;
      j += run;
      if (j == inner) {
        j = 0;
        if (++k == period) k = 0;
      }
    }
  }
}

template <typename scalar_t>
void forward_block(const scalar_t* x, const scalar_t* upper, scalar_t* y, uint8_t* mask,
                   int64_t start, int64_t n, int64_t inner, int64_t period, bool relu) {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = at::vec::Vectorized<acc_t>;
  alignas(64) acc_t xb[kBlock] = {}, ub[kBlock] = {}, yb[kBlock];
  at::vec::convert(x + start, xb, n);
  gather_upper(upper, start, n, inner, period, ub);
  uint64_t clipped = 0, below = 0;  // bit t: element start + t
  const Vec zero(0);
  for (int64_t t = 0; t < kBlock; t += Vec::size()) {
    const Vec xv = Vec::loadu(xb + t), uv = Vec::loadu(ub + t);
    const Vec r = relu ? at::vec::maximum(xv, zero) : xv;  // maximum/minimum propagate NaN
    at::vec::minimum(r, uv).store(yb + t);
    clipped |= uint64_t(lane_bits(r >= uv)) << t;
    if (relu) below |= uint64_t(lane_bits(xv <= zero)) << t;
  }
  at::vec::convert(yb, y + start, n);
  const uint64_t valid = n == kBlock ? ~uint64_t(0) : (uint64_t(1) << n) - 1;
  clipped &= valid;
  if (relu) {
    // state = 2 (clipped), 0 (below zero), 1 (passed): high bit clipped, low bit passed
    const uint64_t passed = ~clipped & ~below & valid;
    uint8_t* out = mask + start / 4;
    for (int64_t b = 0; 8 * b < n; ++b) {
      const uint16_t word = kSpread[(passed >> (8 * b)) & 0xff] | (kSpread[(clipped >> (8 * b)) & 0xff] << 1);
      out[2 * b] = word & 0xff;
      if (8 * b + 4 < n) out[2 * b + 1] = word >> 8;
    }
  } else {
    uint8_t* out = mask + start / 8;
    for (int64_t b = 0; 8 * b < n; ++b) out[b] = (clipped >> (8 * b)) & 0xff;
  }
}

std::tuple<at::Tensor, at::Tensor> channel_clip_fwd_cpu(const at::Tensor& x_in, const at::Tensor& upper_in,
                                                        int64_t inner, bool relu) {
  check_channel_clip_args(x_in, upper_in, inner);
  const at::Tensor x = x_in.contiguous(), upper = upper_in.contiguous();
  const int64_t numel = x.numel(), period = upper.numel();
  at::Tensor y = at::empty_like(x);
  at::Tensor mask = at::empty({channel_clip_mask_bytes(numel, relu)}, x.options().dtype(at::kByte));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "channel_clip_fwd_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* up = upper.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    uint8_t* mp = mask.mutable_data_ptr<uint8_t>();
    const int64_t blocks = (numel + kBlock - 1) / kBlock;
    at::parallel_for(0, blocks, 512, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t start = b * kBlock;
        forward_block(xp, up, yp, mp, start, std::min(kBlock, numel - start), inner, period, relu);
      }
    });
  });
  return {y, mask};
}

// One row = the `inner` consecutive elements sharing upper[k]. Writes grad_x
// for the row and returns its clipped-gradient sum, always in index order.
template <typename scalar_t, typename acc_t>
acc_t backward_row(const scalar_t* grad, const uint8_t* mask, scalar_t* grad_x, int64_t base, int64_t inner,
                   bool relu) {
  acc_t sum = 0;
  for (int64_t i = base; i < base + inner; ++i) {
    const uint8_t s = channel_clip_state(mask, i, relu);
    const acc_t g = static_cast<acc_t>(grad[i]);
    grad_x[i] = s == kPassed ? grad[i] : scalar_t(0);
    if (s == kClipped) sum += g;
  }
  return sum;
}

std::tuple<at::Tensor, at::Tensor> channel_clip_bwd_cpu(const at::Tensor& grad_in, const at::Tensor& mask_in,
                                                        const at::Tensor& upper, int64_t inner, bool relu) {
  check_channel_clip_args(grad_in, upper, inner);
  check_channel_clip_mask(mask_in, grad_in, relu);
  const at::Tensor grad = grad_in.contiguous(), mask = mask_in.contiguous();
  const int64_t numel = grad.numel(), period = upper.numel(), outer = numel / (inner * period);
  at::Tensor grad_x = at::empty_like(grad);
  at::Tensor grad_upper = at::empty(upper.sizes(), upper.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "channel_clip_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gp = grad.const_data_ptr<scalar_t>();
    const uint8_t* mp = mask.const_data_ptr<uint8_t>();
    scalar_t* gxp = grad_x.mutable_data_ptr<scalar_t>();
    scalar_t* gup = grad_upper.mutable_data_ptr<scalar_t>();
    // Deterministic reduction: every grad_upper[k] (or per-slab partial) is
    // summed by one task in index order, and the split depends on the shape only.
    if (period >= 64) {
      at::parallel_for(0, period, std::max<int64_t>(1, 4096 / inner), [&](int64_t k0, int64_t k1) {
        std::vector<acc_t> acc(k1 - k0, acc_t(0));
        for (int64_t o = 0; o < outer; ++o)
          for (int64_t k = k0; k < k1; ++k)
            acc[k - k0] += backward_row<scalar_t, acc_t>(gp, mp, gxp, (o * period + k) * inner, inner, relu);
        for (int64_t k = k0; k < k1; ++k) gup[k] = static_cast<scalar_t>(acc[k - k0]);
      });
    } else {
      const int64_t rows_per_slab = std::max<int64_t>(1, 65536 / (period * inner));
      const int64_t slabs = (outer + rows_per_slab - 1) / rows_per_slab;
      std::vector<acc_t> partial(slabs * period, acc_t(0));
      at::parallel_for(0, slabs, 1, [&](int64_t s0, int64_t s1) {
        for (int64_t s = s0; s < s1; ++s)
          for (int64_t o = s * rows_per_slab; o < std::min(outer, (s + 1) * rows_per_slab); ++o)
            for (int64_t k = 0; k < period; ++k)
              partial[s * period + k] +=
                  backward_row<scalar_t, acc_t>(gp, mp, gxp, (o * period + k) * inner, inner, relu);
      });
      for (int64_t k = 0; k < period; ++k) {
        acc_t sum = 0;
        for (int64_t s = 0; s < slabs; ++s) sum += partial[s * period + k];
        gup[k] = static_cast<scalar_t>(sum);
      }
    }
  });
  return {grad_x, grad_upper};
}

}  // namespace
}  // namespace pydefend

TORCH_LIBRARY_FRAGMENT(pydefend, m) {
  m.def("channel_clip_fwd(Tensor x, Tensor upper, int channel_dim, bool relu) -> (Tensor out, Tensor mask)");
  m.def(
      "channel_clip_bwd(Tensor grad_out, Tensor mask, Tensor upper, int channel_dim, bool relu, int[] perm) "
      "-> (Tensor grad_x, Tensor grad_upper)");
}

TORCH_LIBRARY_FRAGMENT(pydefend_native, m) {
  m.def("channel_clip_fwd(Tensor x, Tensor upper, int inner, bool relu) -> (Tensor out, Tensor mask)");
  m.def("channel_clip_bwd(Tensor grad_out, Tensor mask, Tensor upper, int inner, bool relu) -> (Tensor grad_x, Tensor grad_upper)");
}

TORCH_LIBRARY_IMPL(pydefend_native, CPU, m) {
  m.impl("channel_clip_fwd", &pydefend::channel_clip_fwd_cpu);
  m.impl("channel_clip_bwd", &pydefend::channel_clip_bwd_cpu);
}
