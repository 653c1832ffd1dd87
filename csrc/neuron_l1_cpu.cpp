// neuron_l1_change: per-output-neuron L1 weight change over a list of
// parameter pairs (TSBD eq. 1), see pydefend/ops/neuron_l1.py.
//
//   out[j][k] = sum_i |a[j][k, i] - b[j][k, i]|    (fp32; rows k = dim 0)
//
// Flat contract: a[j] and b[j] have the same shape, dtype and device; each is
// read as (rows, cols) with rows = shape[0] (1 for a 0-d tensor) and cols the
// product of the trailing dims. Non-contiguous inputs are copied, one tensor
// at a time. Accumulation is fp32 (fp64 for float64 inputs).
//
// CPU plan: one table of work units over the whole list. Rows of at most
// kChunk elements are grouped, kChunk / cols rows per unit; longer rows are
// cut into kChunk-sized pieces whose partial sums are added in piece order
// afterwards. Units depend on the shapes only, so results are bit-identical
// for any thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <vector>

#include "neuron_l1.h"

namespace pydefend {
namespace {

constexpr int64_t kChunk = 1 << 14;

// Vectorized |a - b| sum of n elements in a fixed order: 4 vector
// accumulators, added lane-wise, then lanes in order, then the scalar tail.
template <typename scalar_t>
at::opmath_type<scalar_t> segment_l1(const scalar_t* a, const scalar_t* b, int64_t n) {
  using acc_t = at::opmath_type<scalar_t>;
  using AVec = at::vec::Vectorized<acc_t>;
  using SVec = at::vec::Vectorized<scalar_t>;
  AVec acc[4] = {AVec(0), AVec(0), AVec(0), AVec(0)};
  int64_t i = 0;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    constexpr int64_t step = 4 * AVec::size();
    for (; i + step <= n; i += step) {
      for (int u = 0; u < 4; ++u) {
        const int64_t o = i + u * AVec::size();
        acc[u] += (AVec::loadu(a + o) - AVec::loadu(b + o)).abs();
      }
    }
  } else {
    // half / bfloat16: one reduced-precision vector widens to two fp32 vectors
    constexpr int64_t step = 2 * SVec::size();
    for (; i + step <= n; i += step) {
      for (int u = 0; u < 2; ++u) {
        const int64_t o = i + u * SVec::size();
        auto [a0, a1] = at::vec::convert_to_float<scalar_t>(SVec::loadu(a + o));
        auto [b0, b1] = at::vec::convert_to_float<scalar_t>(SVec::loadu(b + o));
        acc[2 * u] += (a0 - b0).abs();
        acc[2 * u + 1] += (a1 - b1).abs();
      }
    }
  }
  const AVec total = (acc[0] + acc[1]) + (acc[2] + acc[3]);
  alignas(64) acc_t lanes[AVec::size()];
  total.store(lanes);
  acc_t sum = 0;
  for (int64_t l = 0; l < AVec::size(); ++l) sum += lanes[l];
  for (; i < n; ++i) {
    const acc_t d = static_cast<acc_t>(a[i]) - static_cast<acc_t>(b[i]);
    sum += d < 0 ? -d : d;
  }
  return sum;
}

struct Unit {
  int64_t tensor;
  int64_t row0, nrows;  // grouped rows [row0, row0 + nrows), whole
  int64_t col0, ncols;  // or one piece of row row0 (partial >= 0)
  int64_t partial;
};

struct Plan {
  std::vector<Unit> units;
  int64_t partials = 0;
};

Plan make_plan(const std::vector<int64_t>& rows, const std::vector<int64_t>& cols) {
  Plan plan;
  for (size_t t = 0; t < rows.size(); ++t) {
    const int64_t r = rows[t], c = cols[t];
    if (r == 0 || c == 0) continue;  // output stays zeros
    if (c <= kChunk) {
      const int64_t per = std::max<int64_t>(1, kChunk / c);
      for (int64_t r0 = 0; r0 < r; r0 += per) plan.units.push_back({int64_t(t), r0, std::min(per, r - r0), 0, c, -1});
    } else {
      for (int64_t k = 0; k < r; ++k)
        for (int64_t c0 = 0; c0 < c; c0 += kChunk)
          plan.units.push_back({int64_t(t), k, 1, c0, std::min(kChunk, c - c0), plan.partials++});
    }
  }
  return plan;
}

int64_t rows_of(const at::Tensor& t) { return t.dim() == 0 ? 1 : t.size(0); }

std::vector<at::Tensor> neuron_l1_change_cpu(at::TensorList a_in, at::TensorList b_in) {
  check_neuron_l1_pairs(a_in, b_in);
  const size_t n = a_in.size();
  std::vector<at::Tensor> a(n), b(n), out(n);
  std::vector<int64_t> rows(n), cols(n);
  for (size_t j = 0; j < n; ++j) {
    a[j] = a_in[j].contiguous();
    b[j] = b_in[j].contiguous();
    rows[j] = rows_of(a[j]);
    cols[j] = rows[j] == 0 ? 0 : a[j].numel() / rows[j];
    out[j] = at::zeros({rows[j]}, a[j].options().dtype(at::kFloat));
  }
  const Plan plan = make_plan(rows, cols);
  std::vector<double> partial(plan.partials);  // holds fp32 or fp64 sums exactly

  at::parallel_for(0, int64_t(plan.units.size()), 1, [&](int64_t u0, int64_t u1) {
    for (int64_t u = u0; u < u1; ++u) {
      const Unit& w = plan.units[u];
      const int64_t c = cols[w.tensor];
      float* o = out[w.tensor].mutable_data_ptr<float>();
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a[w.tensor].scalar_type(), "neuron_l1_change_cpu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const scalar_t* ap = a[w.tensor].const_data_ptr<scalar_t>();
        const scalar_t* bp = b[w.tensor].const_data_ptr<scalar_t>();
        if (w.partial >= 0) {
          const int64_t base = w.row0 * c + w.col0;
          partial[w.partial] = segment_l1(ap + base, bp + base, w.ncols);
        } else if (c == 1) {  // 1-D tensors: elementwise, no reduction
          for (int64_t k = w.row0; k < w.row0 + w.nrows; ++k) {
            const acc_t d = static_cast<acc_t>(ap[k]) - static_cast<acc_t>(bp[k]);
            o[k] = static_cast<float>(d < 0 ? -d : d);
          }
        } else {
          for (int64_t k = w.row0; k < w.row0 + w.nrows; ++k)
            o[k] = static_cast<float>(segment_l1(ap + k * c, bp + k * c, c));
        }
      });
    }
  });

  // Pieces of one row are consecutive in the partial buffer: add them in order.
  int64_t p = 0;
  for (size_t j = 0; j < n; ++j) {
    if (cols[j] <= kChunk || rows[j] == 0) continue;
    const int64_t pieces = (cols[j] + kChunk - 1) / kChunk;
    float* o = out[j].mutable_data_ptr<float>();
    const bool wide = a[j].scalar_type() == at::kDouble;
    for (int64_t k = 0; k < rows[j]; ++k) {
      double sum = 0;
      float sumf = 0;
      for (int64_t q = 0; q < pieces; ++q, ++p) {
        sum += partial[p];
        sumf += static_cast<float>(partial[p]);
      }
      o[k] = wide ? static_cast<float>(sum) : sumf;
    }
  }
  return out;
}

}  // namespace
}  // namespace pydefend

TORCH_LIBRARY_FRAGMENT(pydefend, m) {
  m.def("neuron_l1_change(Tensor[] params_a, Tensor[] params_b) -> Tensor[]");
}

TORCH_LIBRARY_FRAGMENT(pydefend_native, m) {
  m.def("neuron_l1_change(Tensor[] params_a, Tensor[] params_b) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(pydefend_native, CPU, m) {
  m.impl("neuron_l1_change", &pydefend::neuron_l1_change_cpu);
}
