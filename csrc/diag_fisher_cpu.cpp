// diag_fisher: per-sample squared gradients summed over the batch, without
// materialising per-sample gradients (see pydefend/ops/diag_fisher.py).
//
// Native contract of the norm-affine kernel (BatchNorm, LayerNorm, GroupNorm):
// grad_out and x are contiguous (N, A, P, B); parameter p (gamma_p, beta_p)
// touches every (a, b) of a sample. mean/invstd are contiguous (SN, SA, SP)
// in the accumulation dtype with SN in {1, N}, SA in {1, A}, SP dividing P
// (element (n, a, p, b) is normalised with stat [n?, a?, p / (P / SP)]):
//   BatchNorm NCHW (N, 1, C, HW), stats (1, 1, C); channels-last (N, HW, C, 1)
//   LayerNorm (N, L, D, 1), stats (N, L, 1);  GroupNorm (N, 1, C, HW), stats (N, 1, G)
// Outputs, per p:  fisher_weight = sum_n (sum_{a,b} dy * (x - mean) * invstd)^2
//                  fisher_bias   = sum_n (sum_{a,b} dy)^2
// in float32 (float64 for float64 inputs). The reduction order depends on the
// shape only: samples are cut into slabs by a shape rule, every (slab, channel)
// sum is made by one task in index order, slabs are added in order.
//
// Per-sample GEMM kernel (Conv2d; Linear with sequence dims as a 1x1 conv over a
// 1 x L image): grad_out (N, O, OH, OW) and input (N, C, H, W) with any strides;
// per sample n and group, G_n[r, j] = sum_l dy[n, r, l] * patch[n, j, l] with
// j = (c, kh, kw) and l = (oh, ow) (implicit im2col, zero padding), and
//   fisher_weight[r, j] = sum_n G_n[r, j]^2,  fisher_bias[o] = sum_n (sum_l dy)^2.
// A task owns a (row block x column block) tile of the Fisher and loops over the
// samples inside it, so G_n only ever exists as an MR x NR register tile (plus a
// tile buffer when L is cut into chunks). Every element is one sequential FMA
// chain over l, then over n: the result does not depend on tiling or threads.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include "diag_fisher.h"

namespace pydefend {
namespace {

struct NormShape {
  int64_t n, a, p, b;        // grad_out / x as (N, A, P, B)
  int64_t sn, sa, group;     // stat strides for n and a, channels per stat
};

// Channel block and sample slabs: functions of the shape only.
int64_t norm_channel_block(const NormShape& s) { return std::min<int64_t>(s.p, s.b >= 32 ? 1 : 64); }

int64_t norm_slabs(const NormShape& s, int64_t blocks) {
  return std::max<int64_t>(1, std::min<int64_t>(s.n, (64 + blocks - 1) / blocks));
}

template <typename scalar_t, typename acc_t>
void norm_task(const scalar_t* dy, const scalar_t* x, const acc_t* mean, const acc_t* invstd, const NormShape& s,
               int64_t n0, int64_t n1, int64_t p0, int64_t p1, acc_t* out_w, acc_t* out_b) {
  using Vec = at::vec::Vectorized<acc_t>;
  const int64_t width = p1 - p0;
  std::vector<acc_t> sw(width), sb(width);
  for (int64_t n = n0; n < n1; ++n) {
    std::fill(sw.begin(), sw.end(), acc_t(0));
    std::fill(sb.begin(), sb.end(), acc_t(0));
    for (int64_t a = 0; a < s.a; ++a) {
      const acc_t* m = mean + n * s.sn + a * s.sa;
      const acc_t* r = invstd + n * s.sn + a * s.sa;
      if (s.b == 1 && (s.group == 1 || s.group == s.p)) {
        // LayerNorm (one stat per row) and channels-last BatchNorm (one per channel):
        // contiguous channels, a loop the compiler vectorises
        const scalar_t* dyr = dy + (n * s.a + a) * s.p;
        const scalar_t* xr = x + (n * s.a + a) * s.p;
        const int64_t step = s.group == 1 ? 1 : 0;
        for (int64_t p = p0; p < p1; ++p) {
          const acc_t d = static_cast<acc_t>(dyr[p]);
          sw[p - p0] += d * (static_cast<acc_t>(xr[p]) - m[p * step]) * r[p * step];
          sb[p - p0] += d;
        }
        continue;
      }
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t base = ((n * s.a + a) * s.p + p) * s.b;
        const acc_t mp = m[p / s.group], rp = r[p / s.group];
        acc_t dot = 0, sum = 0;
        int64_t i = 0;
        if (s.b >= 2 * Vec::size()) {
          // fp32 lanes (converted from fp16/bf16 first), summed lane-wise then across lanes
          alignas(64) acc_t dyb[Vec::size()], xb[Vec::size()];
          Vec vdot(0), vsum(0);
          const Vec vm(mp);
          for (; i + Vec::size() <= s.b; i += Vec::size()) {
            for (int64_t t = 0; t < Vec::size(); ++t) {
              dyb[t] = static_cast<acc_t>(dy[base + i + t]);
              xb[t] = static_cast<acc_t>(x[base + i + t]);
            }
            const Vec vd = Vec::loadu(dyb), vx = Vec::loadu(xb);
            vdot = at::vec::fmadd(vd, vx - vm, vdot);
            vsum = vsum + vd;
          }
          alignas(64) acc_t lanes_dot[Vec::size()], lanes_sum[Vec::size()];
          vdot.store(lanes_dot);
          vsum.store(lanes_sum);
          for (int64_t t = 0; t < Vec::size(); ++t) {
            dot += lanes_dot[t];
            sum += lanes_sum[t];
          }
        }
        for (; i < s.b; ++i) {
          const acc_t d = static_cast<acc_t>(dy[base + i]);
          dot += d * (static_cast<acc_t>(x[base + i]) - mp);
          sum += d;
        }
        sw[p - p0] += dot * rp;
        sb[p - p0] += sum;
      }
    }
    for (int64_t k = 0; k < width; ++k) {
      out_w[k] += sw[k] * sw[k];
      out_b[k] += sb[k] * sb[k];
    }
  }
}

std::tuple<at::Tensor, at::Tensor> diag_fisher_norm_cpu(const at::Tensor& grad_in, const at::Tensor& x_in,
                                                        const at::Tensor& mean_in, const at::Tensor& invstd_in) {
  check_diag_fisher_norm_args(grad_in, x_in, mean_in, invstd_in);
  const auto acc = x_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor grad = grad_in.contiguous(), x = x_in.contiguous();
  const at::Tensor mean = mean_in.contiguous(), invstd = invstd_in.contiguous();
  NormShape s{x.size(0), x.size(1), x.size(2), x.size(3), 0, 0, 1};
  const int64_t SN = mean.size(0), SA = mean.size(1), SP = mean.size(2);
  s.sn = SN > 1 ? SA * SP : 0;
  s.sa = SA > 1 ? SP : 0;
  s.group = s.p / SP;
  at::Tensor fw = at::zeros({s.p}, x.options().dtype(acc)), fb = at::zeros({s.p}, x.options().dtype(acc));
  if (x.numel() == 0) return {fw, fb};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "diag_fisher_norm_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t pb = norm_channel_block(s);
    const int64_t blocks = (s.p + pb - 1) / pb;
    int64_t slabs = norm_slabs(s, blocks);
    const int64_t rows = (s.n + slabs - 1) / slabs;
    slabs = (s.n + rows - 1) / rows;
    std::vector<acc_t> pw(slabs * s.p, acc_t(0)), pbias(slabs * s.p, acc_t(0));
    const scalar_t* dyp = grad.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const acc_t* mp = mean.const_data_ptr<acc_t>();
    const acc_t* rp = invstd.const_data_ptr<acc_t>();
    at::parallel_for(0, slabs * blocks, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t slab = t / blocks, blk = t % blocks;
        const int64_t p0 = blk * pb, p1 = std::min(s.p, p0 + pb);
        norm_task<scalar_t, acc_t>(dyp, xp, mp, rp, s, slab * rows, std::min(s.n, (slab + 1) * rows), p0, p1,
                                   pw.data() + slab * s.p + p0, pbias.data() + slab * s.p + p0);
      }
    });
    acc_t* fwp = fw.mutable_data_ptr<acc_t>();
    acc_t* fbp = fb.mutable_data_ptr<acc_t>();
    for (int64_t slab = 0; slab < slabs; ++slab)
      for (int64_t p = 0; p < s.p; ++p) {
        fwp[p] += pw[slab * s.p + p];
        fbp[p] += pbias[slab * s.p + p];
      }
  });
  return {fw, fb};
}


// ------------------------------------------------------------------ per-sample GEMM (conv2d, linear)
struct ConvGeom {
  int64_t n, c, h, w, o, oh, ow, kh, kw, sh, sw, ph, pw, dh, dw, groups;
  int64_t xs[4], ys[4];  // element strides of input (N, C, H, W) and grad_out (N, O, OH, OW)
};

constexpr int64_t kMR = 6;         // micro-tile rows (output channels, broadcast)
constexpr int64_t kChunkL = 128;    // positions per packed panel (whole output rows for conv)
constexpr int64_t kRowBlock = 384;  // Fisher tile of a task: at most 384 rows, 384 x 128 entries: panels and
constexpr int64_t kColBlock = 128;  // tile fit a 1 MiB L2

template <typename acc_t>
struct Micro {
  using Vec = at::vec::Vectorized<acc_t>;
  static constexpr int64_t V = Vec::size();
  static constexpr int64_t NR = 2 * V;  // micro-tile columns (patch entries, vector lanes)

  // a: [k][MR], b: [k][NR]. The MR x NR tile of G starts at zero (first) or at g, runs over k positions, and
  // then is either squared into f (last) or stored back to g; g and f share the leading dimension ld.
  static void run(const acc_t* a, const acc_t* b, int64_t k, acc_t* g, acc_t* f, int64_t ld, bool first,
                  bool last) {
    Vec c0[kMR], c1[kMR];
    for (int64_t r = 0; r < kMR; ++r) {
      c0[r] = first ? Vec(acc_t(0)) : Vec::loadu(g + r * ld);
      c1[r] = first ? Vec(acc_t(0)) : Vec::loadu(g + r * ld + V);
    }
    for (int64_t l = 0; l < k; ++l) {
      const Vec b0 = Vec::loadu(b + l * NR), b1 = Vec::loadu(b + l * NR + V);
      for (int64_t r = 0; r < kMR; ++r) {
        const Vec av(a[l * kMR + r]);
        c0[r] = at::vec::fmadd(av, b0, c0[r]);
        c1[r] = at::vec::fmadd(av, b1, c1[r]);
      }
    }
    for (int64_t r = 0; r < kMR; ++r) {
      if (last) {
        at::vec::fmadd(c0[r], c0[r], Vec::loadu(f + r * ld)).store(f + r * ld);
        at::vec::fmadd(c1[r], c1[r], Vec::loadu(f + r * ld + V)).store(f + r * ld + V);
      } else {
        c0[r].store(g + r * ld);
        c1[r].store(g + r * ld + V);
      }
    }
  }
};

int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Output positions of a convolution along one dim (0 when the dilated kernel is wider than the padded input),
// or -1 when the padded input or the kernel's reach does not fit int64.
int64_t conv_out_size(int64_t in, int64_t kernel, int64_t stride, int64_t pad, int64_t dilation) {
  int64_t padded = 0, reach = 0;
  if (!mul_fits(2, pad, &padded) || __builtin_add_overflow(in, padded, &padded) ||
      !mul_fits(dilation, kernel - 1, &reach))
    return -1;
  return padded > reach ? (padded - reach - 1) / stride + 1 : 0;
}

// First and one-past-last output position o with 0 <= o * stride + offset < size, clipped to [0, out).
std::pair<int64_t, int64_t> valid_range(int64_t offset, int64_t stride, int64_t size, int64_t out) {
  const int64_t lo = offset >= 0 ? 0 : ceil_div(-offset, stride);
  const int64_t hi = size - 1 - offset < 0 ? 0 : (size - 1 - offset) / stride + 1;
  return {std::min(lo, out), std::min(hi, out)};
}

template <typename scalar_t, typename acc_t>
void conv_weight_fisher(const scalar_t* x, const scalar_t* dy, const ConvGeom& s, acc_t* out) {
  using M = Micro<acc_t>;
  constexpr int64_t NR = M::NR;
  const int64_t R = s.o / s.groups, cg = s.c / s.groups, kk = s.kh * s.kw, J = cg * kk, L = s.oh * s.ow;
  const int64_t chunk_rows = std::max<int64_t>(1, kChunkL / s.ow), max_chunk = chunk_rows * s.ow;
  // Tiles: as many rows as fit (each packed patch entry feeds rb / MR micro-kernels), column blocks cut into a
  // multiple of the thread count. The tiling never changes a result (see the header), so it may follow threads.
  const int64_t threads = at::get_num_threads();
  const int64_t rb = round_up(ceil_div(R, ceil_div(R, kRowBlock)), kMR);
  const int64_t col_block = std::max(kColBlock, kRowBlock * kColBlock / rb);  // few rows: wider tiles, fewer dy packs
  int64_t jblocks = std::min(ceil_div(J, NR), round_up(ceil_div(J, col_block), threads));
  const int64_t jb = round_up(ceil_div(J, jblocks), NR);
  const int64_t rblocks = ceil_div(R, rb);
  jblocks = ceil_div(J, jb);
  const bool chunked = L > max_chunk;
  // read along the smaller stride: NCHW walks output positions, channels-last / linear walk channels
  const bool a_pos_inner = s.ys[3] < s.ys[1], b_pos_inner = s.xs[3] < s.xs[1];
  const bool pointwise = kk == 1 && s.ph == 0 && s.pw == 0;  // every patch entry is in bounds
  at::parallel_for(0, s.groups * rblocks * jblocks, 1, [&](int64_t t0, int64_t t1) {
    std::vector<acc_t> apack(rb * max_chunk), bpack(jb * max_chunk), fbuf(rb * jb), gbuf(chunked ? rb * jb : 0);
    std::vector<int64_t> joff(jb), jdh(jb), jdw(jb);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t g = t / (rblocks * jblocks), r0 = (t / jblocks) % rblocks * rb, j0 = t % jblocks * jb;
      const int64_t rows = std::min(rb, R - r0), cols = std::min(jb, J - j0);
      const int64_t mblocks = ceil_div(rows, kMR), nblocks = ceil_div(cols, NR);
      for (int64_t j = 0; j < cols; ++j) {  // patch entry -> input channel offset and kernel tap
        const int64_t jj = j0 + j, tap = jj % kk;
        joff[j] = (g * cg + jj / kk) * s.xs[1];
        jdh[j] = tap / s.kw * s.dh - s.ph;
        jdw[j] = tap % s.kw * s.dw - s.pw;
      }
      std::fill(fbuf.begin(), fbuf.end(), acc_t(0));
      for (int64_t n = 0; n < s.n; ++n) {
        const scalar_t* xn = x + n * s.xs[0];
        const scalar_t* yn = dy + (n * s.ys[0] + (g * R + r0) * s.ys[1]);
        for (int64_t oh0 = 0; oh0 < s.oh; oh0 += chunk_rows) {
          const int64_t oh1 = std::min(s.oh, oh0 + chunk_rows), lc = (oh1 - oh0) * s.ow;
          // A panel: dy rows [r0, r0 + rows) as [row micro-block][l][MR], zero rows past the end
          if (rows % kMR) std::fill(apack.begin(), apack.begin() + mblocks * kMR * lc, acc_t(0));
          if (a_pos_inner) {
            for (int64_t r = 0; r < rows; ++r) {
              acc_t* dst = apack.data() + r / kMR * lc * kMR + r % kMR;
              const scalar_t* src = yn + r * s.ys[1];
              for (int64_t oh = oh0, l = 0; oh < oh1; ++oh)
                for (int64_t ow = 0; ow < s.ow; ++ow, ++l) dst[l * kMR] = static_cast<acc_t>(src[oh * s.ys[2] + ow * s.ys[3]]);
            }
          } else {
            for (int64_t mb = 0; mb < mblocks; ++mb) {
              const int64_t width = std::min(kMR, rows - mb * kMR);
              acc_t* dst = apack.data() + mb * lc * kMR;
              for (int64_t oh = oh0, l = 0; oh < oh1; ++oh)
                for (int64_t ow = 0; ow < s.ow; ++ow, ++l) {
                  const scalar_t* src = yn + mb * kMR * s.ys[1] + oh * s.ys[2] + ow * s.ys[3];
                  for (int64_t r = 0; r < width; ++r) dst[l * kMR + r] = static_cast<acc_t>(src[r * s.ys[1]]);
                }
            }
          }
          // B panel: implicit im2col of patch entries [j0, j0 + cols) as [column micro-block][l][NR]; padding and
          // columns past the end stay zero
          if (!pointwise || cols % NR) std::fill(bpack.begin(), bpack.begin() + nblocks * NR * lc, acc_t(0));
          if (b_pos_inner) {
            for (int64_t j = 0; j < cols; ++j) {
              acc_t* dst = bpack.data() + j / NR * lc * NR + j % NR;
              const auto [w0, w1] = valid_range(jdw[j], s.sw, s.w, s.ow);
              for (int64_t oh = oh0; oh < oh1; ++oh) {
                const int64_t ih = oh * s.sh + jdh[j];
                if (ih < 0 || ih >= s.h) continue;
                const scalar_t* src = xn + joff[j] + ih * s.xs[2];
                acc_t* row = dst + (oh - oh0) * s.ow * NR;
                for (int64_t ow = w0; ow < w1; ++ow)
                  row[ow * NR] = static_cast<acc_t>(src[(ow * s.sw + jdw[j]) * s.xs[3]]);
              }
            }
          } else {
            for (int64_t oh = oh0, l = 0; oh < oh1; ++oh)
              for (int64_t ow = 0; ow < s.ow; ++ow, ++l) {
                const int64_t ih0 = oh * s.sh, iw0 = ow * s.sw;
                const scalar_t* src = xn + ih0 * s.xs[2] + iw0 * s.xs[3];
                if (pointwise) {  // linear and 1x1 convs: a run of channels
                  for (int64_t nb = 0; nb < nblocks; ++nb) {
                    acc_t* dst = bpack.data() + (nb * lc + l) * NR;
                    const int64_t width = std::min(NR, cols - nb * NR);
                    const scalar_t* run = src + joff[nb * NR];
                    for (int64_t j = 0; j < width; ++j) dst[j] = static_cast<acc_t>(run[j * s.xs[1]]);
                  }
                  continue;
                }
                for (int64_t j = 0; j < cols; ++j) {
                  const int64_t ih = ih0 + jdh[j], iw = iw0 + jdw[j];
                  if (ih >= 0 && ih < s.h && iw >= 0 && iw < s.w)
                    bpack[(j / NR * lc + l) * NR + j % NR] =
                        static_cast<acc_t>(xn[joff[j] + ih * s.xs[2] + iw * s.xs[3]]);
                }
              }
          }
          const bool first = oh0 == 0, last = oh1 == s.oh;
          for (int64_t nb = 0; nb < nblocks; ++nb)
            for (int64_t mb = 0; mb < mblocks; ++mb) {
              const int64_t at = mb * kMR * jb + nb * NR;
              M::run(apack.data() + mb * kMR * lc, bpack.data() + nb * NR * lc, lc, gbuf.data() + (chunked ? at : 0),
                     fbuf.data() + at, jb, first, last);
            }
        }
      }
      for (int64_t r = 0; r < rows; ++r)
        std::copy_n(fbuf.data() + r * jb, cols, out + (g * R + r0 + r) * J + j0);
    }
  });
}

template <typename scalar_t, typename acc_t>
void conv_bias_fisher(const scalar_t* dy, const ConvGeom& s, acc_t* out) {
  constexpr int64_t block = 64;
  const bool pos_inner = s.ys[3] < s.ys[1];
  at::parallel_for(0, (s.o + block - 1) / block, 1, [&](int64_t t0, int64_t t1) {
    acc_t sums[block];
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t o0 = t * block, width = std::min(block, s.o - o0);
      std::fill_n(out + o0, width, acc_t(0));
      for (int64_t n = 0; n < s.n; ++n) {
        const scalar_t* yn = dy + n * s.ys[0] + o0 * s.ys[1];
        std::fill_n(sums, width, acc_t(0));
        // each channel's sum runs over (oh, ow) in order in both loop nests
        if (pos_inner) {
          for (int64_t o = 0; o < width; ++o)
            for (int64_t oh = 0; oh < s.oh; ++oh)
              for (int64_t ow = 0; ow < s.ow; ++ow) sums[o] += static_cast<acc_t>(yn[o * s.ys[1] + oh * s.ys[2] + ow * s.ys[3]]);
        } else {
          for (int64_t oh = 0; oh < s.oh; ++oh)
            for (int64_t ow = 0; ow < s.ow; ++ow)
              for (int64_t o = 0; o < width; ++o) sums[o] += static_cast<acc_t>(yn[o * s.ys[1] + oh * s.ys[2] + ow * s.ys[3]]);
        }
        for (int64_t o = 0; o < width; ++o) out[o0 + o] += sums[o] * sums[o];
      }
    }
  });
}

// grad_out (N, O, OH, OW) and input (N, C, H, W) as strided views; weight Fisher (O, C/groups * kh * kw).
std::tuple<at::Tensor, at::Tensor> conv_fisher(const char* op, const at::Tensor& grad, const at::Tensor& x,
                                               ConvGeom s) {
  TORCH_CHECK(x.device().is_cpu() && grad.device().is_cpu(), op, ": expects CPU tensors, got ", x.device(), " and ",
              grad.device());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()) && grad.scalar_type() == x.scalar_type(), op,
              ": grad_out and input must share a floating dtype, got ", grad.scalar_type(), " and ", x.scalar_type());
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  for (int d = 0; d < 4; ++d) {
    s.xs[d] = x.stride(d);
    s.ys[d] = grad.stride(d);
  }
  at::Tensor fw = at::zeros({s.o, s.c / s.groups * s.kh * s.kw}, x.options().dtype(acc));
  at::Tensor fb = at::zeros({s.o}, x.options().dtype(acc));
  if (s.n == 0 || s.oh * s.ow == 0) return {fw, fb};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "diag_fisher_conv_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (fw.numel() > 0)
      conv_weight_fisher<scalar_t, acc_t>(x.const_data_ptr<scalar_t>(), grad.const_data_ptr<scalar_t>(), s,
                                          fw.mutable_data_ptr<acc_t>());
    conv_bias_fisher<scalar_t, acc_t>(grad.const_data_ptr<scalar_t>(), s, fb.mutable_data_ptr<acc_t>());
  });
  return {fw, fb};
}

std::tuple<at::Tensor, at::Tensor> diag_fisher_conv2d_cpu(const at::Tensor& grad, const at::Tensor& x,
                                                          at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                                          at::IntArrayRef padding, at::IntArrayRef dilation,
                                                          int64_t groups) {
  TORCH_CHECK(x.dim() == 4 && grad.dim() == 4 && grad.size(0) == x.size(0),
              "diag_fisher_conv2d: expected input (N, C, H, W) and grad_out (N, O, H', W'), got ", x.sizes(), " and ",
              grad.sizes());
  TORCH_CHECK(kernel_size.size() == 2 && stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
              "diag_fisher_conv2d: kernel_size, stride, padding and dilation must have two entries each");
  TORCH_CHECK(kernel_size[0] >= 1 && kernel_size[1] >= 1 && stride[0] >= 1 && stride[1] >= 1 && padding[0] >= 0 &&
                  padding[1] >= 0 && dilation[0] >= 1 && dilation[1] >= 1,
              "diag_fisher_conv2d: kernel_size, stride, dilation must be >= 1 and padding >= 0, got ", kernel_size,
              ", ", stride, ", ", padding, ", ", dilation);
  TORCH_CHECK(groups >= 1 && x.size(1) % groups == 0 && grad.size(1) % groups == 0, "diag_fisher_conv2d: ", groups,
              " groups do not divide ", x.size(1), " input and ", grad.size(1), " output channels");
  int64_t taps = 0, patch = 0;
  TORCH_CHECK(mul_fits(kernel_size[0], kernel_size[1], &taps) && mul_fits(x.size(1) / groups, taps, &patch),
              "diag_fisher_conv2d: a ", kernel_size, " kernel over ", x.size(1) / groups,
              " channels per group has more weights than int64 counts");
  ConvGeom s{x.size(0), x.size(1), x.size(2), x.size(3), grad.size(1), grad.size(2), grad.size(3),
             kernel_size[0], kernel_size[1], stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
             groups, {}, {}};
  for (int d = 0; d < 2; ++d) {
    const int64_t want = conv_out_size(x.size(2 + d), kernel_size[d], stride[d], padding[d], dilation[d]);
    TORCH_CHECK(want >= 0, "diag_fisher_conv2d: padding ", padding[d], " or dilation ", dilation[d], " x kernel ",
                kernel_size[d], " along dim ", 2 + d, " does not fit int64");
    TORCH_CHECK(grad.size(2 + d) == want, "diag_fisher_conv2d: grad_out is ", grad.sizes().slice(2),
                " spatially but this convolution of a ", x.sizes().slice(2), " input gives ", want, " along dim ",
                2 + d);
  }
  auto [fw, fb] = conv_fisher("diag_fisher_conv2d", grad, x, s);
  return {fw.view({s.o, s.c / groups, s.kh, s.kw}), fb};
}

// grad_out (N, L, O), input (N, L, I): a 1x1 convolution of an (I, 1, L) image.
std::tuple<at::Tensor, at::Tensor> diag_fisher_linear_cpu(const at::Tensor& grad, const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 3 && grad.dim() == 3 && grad.size(0) == x.size(0) && grad.size(1) == x.size(1),
              "diag_fisher_linear: expected input (N, L, I) and grad_out (N, L, O), got ", x.sizes(), " and ",
              grad.sizes());
  const at::Tensor x4 = x.transpose(1, 2).unsqueeze(2), y4 = grad.transpose(1, 2).unsqueeze(2);
  ConvGeom s{x.size(0), x.size(2), 1, x.size(1), grad.size(2), 1, x.size(1), 1, 1, 1, 1, 0, 0, 1, 1, 1, {}, {}};
  return conv_fisher("diag_fisher_linear", y4, x4, s);
}

}  // namespace
}  // namespace pydefend

TORCH_LIBRARY_FRAGMENT(pydefend, m) {
  m.def("diag_fisher_norm(Tensor grad_out, Tensor input, Tensor mean, Tensor invstd) -> (Tensor fisher_weight, Tensor fisher_bias)");
  m.def("diag_fisher_linear(Tensor grad_out, Tensor input) -> (Tensor fisher_weight, Tensor fisher_bias)");
  m.def(
      "diag_fisher_conv2d(Tensor grad_out, Tensor input, int[2] kernel_size, int[2] stride, int[2] padding, "
      "int[2] dilation, int groups) -> (Tensor fisher_weight, Tensor fisher_bias)");
}

TORCH_LIBRARY_FRAGMENT(pydefend_native, m) {
  m.def("diag_fisher_norm(Tensor grad_out, Tensor input, Tensor mean, Tensor invstd) -> (Tensor fisher_weight, Tensor fisher_bias)");
  m.def("diag_fisher_linear(Tensor grad_out, Tensor input) -> (Tensor fisher_weight, Tensor fisher_bias)");
  m.def(
      "diag_fisher_conv2d(Tensor grad_out, Tensor input, int[2] kernel_size, int[2] stride, int[2] padding, "
      "int[2] dilation, int groups) -> (Tensor fisher_weight, Tensor fisher_bias)");
}

TORCH_LIBRARY_IMPL(pydefend_native, CPU, m) {
  m.impl("diag_fisher_norm", &pydefend::diag_fisher_norm_cpu);
  m.impl("diag_fisher_linear", &pydefend::diag_fisher_linear_cpu);
  m.impl("diag_fisher_conv2d", &pydefend::diag_fisher_conv2d_cpu);
}
