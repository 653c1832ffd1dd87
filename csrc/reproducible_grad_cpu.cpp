// Weight and bias gradients of Conv2d and Linear, and Linear's products, that do not depend on the thread count.
//
// torch's CPU kernels (oneDNN for convolutions, MKL for matrix products) split the reduction over the
// batch between threads, so a weight gradient changes in its last bits with torch.set_num_threads, and
// a fine-tuning run then drifts to another result. Here the batch is cut into chunks of a fixed number
// of rows; every chunk's gradient is computed by one thread, and the chunks are added in their order.
// Each bit of the result is then a function of the inputs alone.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <omp.h>
#include <torch/library.h>

#include <algorithm>
#include <exception>
#include <mutex>
#include <vector>

namespace pydefend {
namespace {

// MKL's own per-thread thread count (weak: a torch built without MKL lacks it). Inside a parallel region MKL
// would otherwise pick other kernels than with one thread set for the whole process, rounding differently.
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));

// f(c) for every chunk, each on one thread. The chunks run inside an active OpenMP team even when there is
// only one of them, so the kernels they call see a parallel region and run sequentially, and each task asks
// for one thread (OpenMP's and MKL's), so oneDNN builds its kernels for one (built for the team, they would
// wait on a barrier for threads that never come) and MKL takes the path it takes with one torch thread.
// With one torch thread everything is sequential anyway.
template <typename F>
void for_each_chunk_single_threaded(int64_t chunks, const F& f) {
  const int threads = at::get_num_threads();
  if (threads <= 1 || at::in_parallel_region()) {
    for (int64_t c = 0; c < chunks; ++c) f(c);
    return;
  }
  std::exception_ptr error;
  std::mutex error_mutex;
#pragma omp parallel for schedule(static, 1) num_threads(threads)
  for (int64_t c = 0; c < chunks; ++c) {
    omp_set_num_threads(1);
    const int mkl_before = MKL_Set_Num_Threads_Local ? MKL_Set_Num_Threads_Local(1) : 0;
    try {
      f(c);
    } catch (...) {
      std::lock_guard<std::mutex> lock(error_mutex);
      if (!error) error = std::current_exception();
    }
    if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(mkl_before);  // 0: the process-wide count again
  }
  if (error) std::rethrow_exception(error);
}

// Chunks of `chunk` rows covering n rows (one, empty, when n == 0), without forming n + chunk - 1.
int64_t chunk_count(int64_t n, int64_t chunk, const char* op) {
  TORCH_CHECK(chunk >= 1, op, ": chunk must be >= 1, got ", chunk);
  return n == 0 ? 1 : (n - 1) / chunk + 1;
}

std::tuple<at::Tensor, at::Tensor> sum_in_order(std::vector<at::Tensor>& weights, std::vector<at::Tensor>& biases,
                                               bool bias) {
  at::Tensor weight = weights[0];
  for (size_t c = 1; c < weights.size(); ++c) weight.add_(weights[c]);
  at::Tensor bias_grad;
  if (bias) {
    bias_grad = biases[0];
    for (size_t c = 1; c < biases.size(); ++c) bias_grad.add_(biases[c]);
  }
  return {weight, bias_grad};
}

// grad_out (N, C_out, H', W'), input (N, C_in, H, W): (dL/dweight, dL/dbias or undefined).
std::tuple<at::Tensor, at::Tensor> conv2d_weight_grad_cpu(const at::Tensor& grad_out, const at::Tensor& input,
                                                         const at::Tensor& weight, at::IntArrayRef stride,
                                                         at::IntArrayRef padding, at::IntArrayRef dilation,
                                                         int64_t groups, bool bias, int64_t chunk) {
  TORCH_CHECK(input.dim() == 4 && grad_out.dim() == 4 && weight.dim() == 4,
              "conv2d_weight_grad: expects 4-D input, grad_out and weight");
  TORCH_CHECK(input.size(0) == grad_out.size(0), "conv2d_weight_grad: input has ", input.size(0),
              " samples but grad_out has ", grad_out.size(0));
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
              "conv2d_weight_grad: stride, padding and dilation must have two entries each, got ", stride, ", ",
              padding, " and ", dilation);
  const int64_t n = input.size(0), chunks = chunk_count(n, chunk, "conv2d_weight_grad");
  std::vector<at::Tensor> weights(chunks), biases(chunks);
  for_each_chunk_single_threaded(chunks, [&](int64_t c) {
    const int64_t start = c * chunk, length = std::min(chunk, n - start);
    const at::Tensor g = grad_out.narrow(0, start, length);
    weights[c] = std::get<1>(at::convolution_backward(g, input.narrow(0, start, length), weight, std::nullopt,
                                                      stride, padding, dilation, false, {0, 0}, groups,
                                                      {false, true, false}));
    if (bias) biases[c] = g.sum({0, 2, 3});
  });
  return sum_in_order(weights, biases, bias);
}

// grad_out (R, out), input (R, in): (grad_outᵀ·input, Σ_rows grad_out or undefined).
std::tuple<at::Tensor, at::Tensor> linear_weight_grad_cpu(const at::Tensor& grad_out, const at::Tensor& input,
                                                         bool bias, int64_t chunk) {
  TORCH_CHECK(input.dim() == 2 && grad_out.dim() == 2 && input.size(0) == grad_out.size(0),
              "linear_weight_grad: expects grad_out (R, out) and input (R, in), got ", grad_out.sizes(), " and ",
              input.sizes());
  const int64_t rows = input.size(0), chunks = chunk_count(rows, chunk, "linear_weight_grad");
  std::vector<at::Tensor> weights(chunks), biases(chunks);
  for_each_chunk_single_threaded(chunks, [&](int64_t c) {
    const int64_t start = c * chunk, length = std::min(chunk, rows - start);
    const at::Tensor g = grad_out.narrow(0, start, length);
    weights[c] = g.t().mm(input.narrow(0, start, length));
    if (bias) biases[c] = g.sum(0);
  });
  return sum_in_order(weights, biases, bias);
}

// input (R, K) · other (K, N) (+ bias (N,)), each block of `chunk` rows computed by one thread: MKL splits the
// inner dimension between threads on some CPUs, so a Linear's output (and its input gradient) would change in
// its last bits with the thread count.
at::Tensor rows_matmul_cpu(const at::Tensor& input, const at::Tensor& other, const std::optional<at::Tensor>& bias,
                           int64_t chunk) {
  TORCH_CHECK(input.dim() == 2 && other.dim() == 2 && input.size(1) == other.size(0),
              "rows_matmul: expects input (R, K) and other (K, N), got ", input.sizes(), " and ", other.sizes());
  TORCH_CHECK(!bias.has_value() || (bias->dim() == 1 && bias->size(0) == other.size(1)),
              "rows_matmul: bias must have shape (", other.size(1), "), got ", bias->sizes());
  const int64_t rows = input.size(0), chunks = chunk_count(rows, chunk, "rows_matmul");
  at::Tensor out = at::empty({rows, other.size(1)}, input.options());
  for_each_chunk_single_threaded(chunks, [&](int64_t c) {
    const int64_t start = c * chunk, length = std::min(chunk, rows - start);
    if (length <= 0) return;
    at::Tensor block = out.narrow(0, start, length);
    if (bias.has_value()) {
      at::addmm_out(block, *bias, input.narrow(0, start, length), other);
    } else {
      at::mm_out(block, input.narrow(0, start, length), other);
    }
  });
  return out;
}

}  // namespace
}  // namespace pydefend

TORCH_LIBRARY_FRAGMENT(pydefend_native, m) {
  m.def(
      "conv2d_weight_grad(Tensor grad_out, Tensor input, Tensor weight, int[] stride, int[] padding, "
      "int[] dilation, int groups, bool bias, int chunk) -> (Tensor grad_weight, Tensor grad_bias)");
  m.def("linear_weight_grad(Tensor grad_out, Tensor input, bool bias, int chunk) -> (Tensor grad_weight, Tensor grad_bias)");
  m.def("rows_matmul(Tensor input, Tensor other, Tensor? bias, int chunk) -> Tensor");
}

TORCH_LIBRARY_IMPL(pydefend_native, CPU, m) {
  m.impl("conv2d_weight_grad", &pydefend::conv2d_weight_grad_cpu);
  m.impl("linear_weight_grad", &pydefend::linear_weight_grad_cpu);
  m.impl("rows_matmul", &pydefend::rows_matmul_cpu);
}
