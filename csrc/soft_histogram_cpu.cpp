// soft_histogram: BNA's sigmoid soft histogram per channel (see
// pydefend/ops/soft_histogram.py for the semantics), and the schemas of
// f_divergence (its kernels are PyTorch code registered from Python).
//
// Flat contract of the native kernels: z is contiguous and element i belongs
// to channel (i / inner) % C. Channel c has num_bins[c] = M bins and edges
// e_i = low[c] + i * width, i = 1..M-1; s_i(z) = sigmoid(tau * (z - e_i)),
// s_0 = 1, s_M = 0, and bin k gets s_k - s_{k+1}.
//
// Window: an element evaluates only the `window` edges i_lo .. i_lo+window-1
// with i_lo = floor(u - reach) + 1 clamped to [0, M], u = (z - low) / width;
// edges below are exactly 1, edges above exactly 0 (at the fixed-point
// resolution below). `reach` and `window` come from Python
// (soft_histogram.window()), which documents why that is exact.
//
// Fixed point: each s_i is rounded to an integer Q_i = round(s_i * 2^F)
// (F = 32, or 62 for float64 input) and bin k accumulates Q_k - Q_{k+1} in
// int64. Integer sums are exact and order-free, so the histogram is
// bit-identical whatever the thread count, and every element adds exactly
// 2^F: rows sum to 1 up to the final division. float64 input splits each
// difference into 31-bit halves kept in two counters, so nothing overflows
// below 2^31 elements per channel.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "soft_histogram.h"

namespace pydefend {
namespace {

constexpr int64_t kBlock = 64;  // elements gathered per vector pass

template <typename acc_t> struct FixedPoint;
template <> struct FixedPoint<float> {
  static constexpr int kBits = 32;
  static constexpr int kSlots = 1;
};
template <> struct FixedPoint<double> {
  static constexpr int kBits = 62;
  static constexpr int kSlots = 2;  // high and low 31 bits of each difference
};

template <typename acc_t>
inline int64_t quantize(acc_t x, acc_t small) {
  // small = sigmoid(-|x|): rounding the small side keeps 2^-F absolute precision near 1 too.
  constexpr acc_t scale = acc_t(int64_t(1) << FixedPoint<acc_t>::kBits);
  const int64_t q = static_cast<int64_t>(small * scale + acc_t(0.5));
  return x >= acc_t(0) ? (int64_t(1) << FixedPoint<acc_t>::kBits) - q : q;
}

template <typename acc_t>
inline void add_count(int64_t* counts, int64_t d) {
  if constexpr (FixedPoint<acc_t>::kSlots == 2) {
    counts[0] += d >> 31;
    counts[1] += d & 0x7fffffff;
  } else {
    counts[0] += d;
  }
}

// One block of up to kBlock consecutive flat elements, gathered into fp32
// (fp64) lanes with their channel's parameters.
template <typename acc_t>
struct Lanes {
  alignas(64) acc_t z[kBlock], low[kBlock], first[kBlock], small[kBlock], x[kBlock];
  int64_t channel[kBlock], bins[kBlock], i_lo[kBlock], n_eval[kBlock];
  bool nan[kBlock];
  int64_t n = 0, max_eval = 0;

  template <typename scalar_t>
  void load(const scalar_t* zp, const acc_t* lowp, const int64_t* nbp, int64_t start, int64_t count, int64_t inner,
            int64_t C, acc_t width, acc_t reach, int64_t window) {
    n = count;
    int64_t j = start % inner, c = (start / inner) % C;
    max_eval = 0;
    for (int64_t t = 0; t < kBlock; ++t) {
      const bool live = t < n;
      const acc_t zv = live ? static_cast<acc_t>(zp[start + t]) : acc_t(0);
      const int64_t m = live ? nbp[c] : 1;
      z[t] = zv;
      low[t] = live ? lowp[c] : acc_t(0);
      channel[t] = c;
      bins[t] = m;
      nan[t] = std::isnan(zv);
      // Clamped in floating point, so huge |z| and +-inf never overflow the integer conversion.
      const acc_t lo = std::floor((zv - low[t]) / width - reach) + acc_t(1);
      first[t] = nan[t] ? acc_t(0) : std::min(std::max(lo, acc_t(0)), static_cast<acc_t>(m));
      i_lo[t] = static_cast<int64_t>(first[t]);
      n_eval[t] = live && !nan[t] ? std::min(window, m - i_lo[t]) : 0;
      max_eval = std::max(max_eval, n_eval[t]);
      if (live && ++j == inner) {
        j = 0;
        if (++c == C) c = 0;
      }
    }
  }

  // x = tau * (z - e_{i_lo + t}) and small = sigmoid(-|x|) for every lane.
  void edge(int64_t t, acc_t width, acc_t tau) {
    using Vec = at::vec::Vectorized<acc_t>;
    const Vec w(width), tv(tau), off(static_cast<acc_t>(t)), one(1);
    for (int64_t l = 0; l < kBlock; l += Vec::size()) {
      const Vec e = Vec::loadu(low + l) + (Vec::loadu(first + l) + off) * w;
      const Vec xv = tv * (Vec::loadu(z + l) - e);
      const Vec a = (xv.abs().neg()).exp();
      xv.store(x + l);
      (a / (one + a)).store(small + l);
    }
  }
};

template <typename scalar_t>
void forward_kernel(const scalar_t* zp, const at::opmath_type<scalar_t>* lowp, const int64_t* nbp, int64_t numel,
                    int64_t inner, int64_t C, int64_t max_bins, at::opmath_type<scalar_t> width,
                    at::opmath_type<scalar_t> tau, int64_t window, at::opmath_type<scalar_t> reach, int64_t* counts,
                    uint8_t* nan_flags) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kSlots = FixedPoint<acc_t>::kSlots;
  constexpr int64_t one = int64_t(1) << FixedPoint<acc_t>::kBits;
  const int64_t blocks = (numel + kBlock - 1) / kBlock;
  const int64_t per_thread = C * max_bins * kSlots;
  // Each thread adds into its own counters; integer sums make the split irrelevant.
  at::parallel_for(0, blocks, 16, [&](int64_t b0, int64_t b1) {
    int64_t* mine = counts + at::get_thread_num() * per_thread;
    uint8_t* my_nan = nan_flags + at::get_thread_num() * C;
    Lanes<acc_t> lanes;
    int64_t prev[kBlock];
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t start = b * kBlock;
      lanes.load(zp, lowp, nbp, start, std::min(kBlock, numel - start), inner, C, width, reach, window);
      for (int64_t l = 0; l < lanes.n; ++l) {
        prev[l] = one;
        if (lanes.nan[l]) my_nan[lanes.channel[l]] = 1;
      }
      for (int64_t t = 0; t <= lanes.max_eval; ++t) {
        if (t < lanes.max_eval) lanes.edge(t, width, tau);
        for (int64_t l = 0; l < lanes.n; ++l) {
          if (t > lanes.n_eval[l]) continue;
          const int64_t i = lanes.i_lo[l] + t;  // edge index; bin i - 1 gets Q_{i-1} - Q_i
          const int64_t q = t == lanes.n_eval[l] ? 0 : (i == 0 ? one : quantize(lanes.x[l], lanes.small[l]));
          const int64_t d = prev[l] - q;
          prev[l] = q;
          if (d != 0 && i >= 1) add_count<acc_t>(mine + (lanes.channel[l] * max_bins + i - 1) * kSlots, d);
        }
      }
    }
  });
}

at::Tensor soft_histogram_fwd_cpu(const at::Tensor& z_in, const at::Tensor& low_in, const at::Tensor& nb_in,
                                  int64_t inner, int64_t max_bins, double width, double tau, int64_t window,
                                  double reach) {
  check_soft_histogram_args(z_in, low_in, nb_in, inner, max_bins, width, tau, window, reach);
  check_soft_histogram_values(low_in, nb_in, max_bins, width);
  const at::Tensor z = z_in.contiguous(), low = low_in.contiguous(), nb = nb_in.contiguous();
  const int64_t C = low.numel(), numel = z.numel(), per_channel = numel / C;
  at::Tensor hist = at::zeros({C, max_bins}, low.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "soft_histogram_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int kSlots = FixedPoint<acc_t>::kSlots;
    const int64_t threads = at::get_num_threads();
    int64_t per_thread = 0, entries = 0;  // one set of counters per thread
    TORCH_CHECK(mul_fits(C, max_bins * kSlots, &per_thread) && mul_fits(threads, per_thread, &entries),
                "soft_histogram: ", threads, " threads x ", C, " channels x ", max_bins,
                " bins of counters do not fit int64");
    std::vector<int64_t> counts(entries, 0);
    std::vector<uint8_t> nan_flags(threads * C, 0);
    const int64_t* nbp = nb.const_data_ptr<int64_t>();
    forward_kernel<scalar_t>(z.const_data_ptr<scalar_t>(), low.const_data_ptr<acc_t>(), nbp, numel, inner, C,
                             max_bins, static_cast<acc_t>(width), static_cast<acc_t>(tau), window,
                             static_cast<acc_t>(reach), counts.data(), nan_flags.data());
    acc_t* out = hist.mutable_data_ptr<acc_t>();
    const double norm = std::ldexp(1.0, -FixedPoint<acc_t>::kBits) / static_cast<double>(per_channel);
    for (int64_t c = 0; c < C; ++c) {
      bool nan = false;
      for (int64_t t = 0; t < threads; ++t) nan |= nan_flags[t * C + c] != 0;
      for (int64_t m = 0; m < nbp[c]; ++m) {
        double value;
        if constexpr (kSlots == 2) {
          int64_t hi = 0, lo = 0;
          for (int64_t t = 0; t < threads; ++t) {
            hi += counts[((t * C + c) * max_bins + m) * 2];
            lo += counts[((t * C + c) * max_bins + m) * 2 + 1];
          }
          value = (std::ldexp(static_cast<double>(hi), 31) + static_cast<double>(lo)) * norm;
        } else {
          int64_t sum = 0;
          for (int64_t t = 0; t < threads; ++t) sum += counts[(t * C + c) * max_bins + m];
          value = static_cast<double>(sum) * norm;
        }
        out[c * max_bins + m] = nan ? std::numeric_limits<acc_t>::quiet_NaN() : static_cast<acc_t>(value);
      }
    }
  });
  return hist;
}

// grad_z = tau/N' * sum over the window's real edges of sigmoid'(x_i) * (g[i] - g[i-1]);
// grad_low[c] = -sum of grad_z over channel c.
std::tuple<at::Tensor, at::Tensor> soft_histogram_bwd_cpu(const at::Tensor& grad_in, const at::Tensor& z_in,
                                                          const at::Tensor& low_in, const at::Tensor& nb_in,
                                                          int64_t inner, double width, double tau, int64_t window,
                                                          double reach) {
  check_soft_histogram_grad(grad_in, z_in, low_in);
  const int64_t max_bins = grad_in.size(1);
  check_soft_histogram_args(z_in, low_in, nb_in, inner, max_bins, width, tau, window, reach);
  check_soft_histogram_values(low_in, nb_in, max_bins, width);
  const at::Tensor z = z_in.contiguous(), low = low_in.contiguous(), nb = nb_in.contiguous();
  const at::Tensor grad = grad_in.contiguous();
  const int64_t C = low.numel(), numel = z.numel(), per_channel = numel / C, outer = per_channel / inner;
  at::Tensor grad_z = at::empty_like(z);
  at::Tensor grad_low = at::empty_like(low);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "soft_histogram_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* zp = z.const_data_ptr<scalar_t>();
    const acc_t* lowp = low.const_data_ptr<acc_t>();
    const acc_t* gp = grad.const_data_ptr<acc_t>();
    const int64_t* nbp = nb.const_data_ptr<int64_t>();
    scalar_t* gzp = grad_z.mutable_data_ptr<scalar_t>();
    const acc_t w = static_cast<acc_t>(width), tv = static_cast<acc_t>(tau), r = static_cast<acc_t>(reach);
    const acc_t scale = static_cast<acc_t>(tau / static_cast<double>(per_channel));
    // Units: a slab of rows x a block of channels, a function of the shape only.
    // Each unit sums its elements in index order; slabs are summed in order.
    const int64_t cb = std::clamp<int64_t>(4096 / inner, 1, C);
    const int64_t rows = std::clamp<int64_t>(16384 / (cb * inner), 1, outer);
    const int64_t slabs = (outer + rows - 1) / rows, cblocks = (C + cb - 1) / cb;
    std::vector<acc_t> partial(slabs * C, acc_t(0));
    at::parallel_for(0, slabs * cblocks, 1, [&](int64_t u0, int64_t u1) {
      Lanes<acc_t> lanes;
      acc_t sum[kBlock];
      for (int64_t u = u0; u < u1; ++u) {
        const int64_t s = u / cblocks, c0 = (u % cblocks) * cb, c1 = std::min(C, c0 + cb);
        acc_t* part = partial.data() + s * C;
        for (int64_t o = s * rows; o < std::min(outer, (s + 1) * rows); ++o) {
          const int64_t run0 = (o * C + c0) * inner, run1 = (o * C + c1) * inner;
          for (int64_t start = run0; start < run1; start += kBlock) {
            lanes.load(zp, lowp, nbp, start, std::min(kBlock, run1 - start), inner, C, w, r, window);
            for (int64_t l = 0; l < kBlock; ++l) sum[l] = lanes.nan[l] ? lanes.z[l] : acc_t(0);  // NaN in, NaN out
            for (int64_t t = 0; t < lanes.max_eval; ++t) {
              lanes.edge(t, w, tv);
              for (int64_t l = 0; l < lanes.n; ++l) {
                const int64_t i = lanes.i_lo[l] + t;
                if (t >= lanes.n_eval[l] || i == 0) continue;
                const acc_t* g = gp + lanes.channel[l] * max_bins;
                const acc_t sm = lanes.small[l];
                sum[l] += sm * (acc_t(1) - sm) * (g[i] - g[i - 1]);
              }
            }
            for (int64_t l = 0; l < lanes.n; ++l) {
              const acc_t gz = scale * sum[l];
              gzp[start + l] = static_cast<scalar_t>(gz);
              part[lanes.channel[l]] -= gz;
            }
          }
        }
      }
    });
    acc_t* glp = grad_low.mutable_data_ptr<acc_t>();
    for (int64_t c = 0; c < C; ++c) {
      acc_t total = 0;
      for (int64_t s = 0; s < slabs; ++s) total += partial[s * C + c];
      glp[c] = total;
    }
  });
  return {grad_z, grad_low};
}

}  // namespace
}  // namespace pydefend

TORCH_LIBRARY_FRAGMENT(pydefend, m) {
  m.def("soft_histogram_fwd(Tensor z, Tensor low, float width, int[] num_bins, float tau, int channel_dim) -> Tensor");
  m.def(
      "soft_histogram_bwd(Tensor grad_hist, Tensor z, Tensor low, float width, int[] num_bins, float tau, "
      "int channel_dim) -> (Tensor grad_z, Tensor grad_low)");
  m.def("f_divergence(Tensor p, Tensor q, str kind, float eps) -> Tensor");
  m.def("f_divergence_bwd(Tensor grad, Tensor p, Tensor q, str kind, float eps) -> (Tensor grad_p, Tensor grad_q)");
}

TORCH_LIBRARY_FRAGMENT(pydefend_native, m) {
  m.def(
      "soft_histogram_fwd(Tensor z, Tensor low, Tensor num_bins, int inner, int max_bins, float width, float tau, "
      "int window, float reach) -> Tensor");
  m.def(
      "soft_histogram_bwd(Tensor grad_hist, Tensor z, Tensor low, Tensor num_bins, int inner, float width, "
      "float tau, int window, float reach) -> (Tensor grad_z, Tensor grad_low)");
}

TORCH_LIBRARY_IMPL(pydefend_native, CPU, m) {
  m.impl("soft_histogram_fwd", &pydefend::soft_histogram_fwd_cpu);
  m.impl("soft_histogram_bwd", &pydefend::soft_histogram_bwd_cpu);
}
