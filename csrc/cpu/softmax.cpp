// Softmax and log-softmax over one dimension, forward and backward, as
// torch.softmax and torch.log_softmax: y = exp(x - max) / sum(exp(x - max))
// along dim, log: y = x - max - log(sum(exp(x - max))) (subtracting the max
// keeps exp from overflowing). A NaN in a line makes the whole line NaN, as
// in PyTorch (it reaches every output through the sum).
#include <omp.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "convcore/ops.h"
#include "convcore/threading.h"
#include "strided.h"

namespace convcore {

namespace {

// The input seen as (outer, size, inner) around dim: the lines are the
// outer * inner runs of `size` elements, `inner` apart.
struct Lines {
  int64_t outer = 1, size = 1, inner = 1;
};

Lines lines_of(const TensorView& t, int64_t dim) {
  const int64_t nd = t.ndim;
  const int64_t lo = nd ? -nd : -1, hi = nd ? nd - 1 : 0;  // a 0-d input takes dim 0 or -1
  if (dim < lo || dim > hi)
    throw ValueError("dim must be in [" + std::to_string(lo) + ", " + std::to_string(hi) +
                     "] for an input of " + std::to_string(nd) + " dimensions, got " +
                     std::to_string(dim));
  Lines l;
  if (nd == 0) return l;
  const int64_t d = dim < 0 ? dim + nd : dim;
  for (int64_t i = 0; i < d; ++i) l.outer *= t.shape[i];
  l.size = t.shape[d];
  for (int64_t i = d + 1; i < nd; ++i) l.inner *= t.shape[i];
  return l;
}

// Calls line(o, scratch) for every outer index o on the threads, scratch
// 2 * inner doubles of the calling thread. The `inner` lines of one o
// are processed together, element by element of the line, so the loads are
// contiguous when dim is not the last dimension.
template <typename F>
void for_each_outer(const Lines& l, F&& line) {
  const int64_t work = l.outer * l.size * l.inner;
#pragma omp parallel num_threads(detail::threads_for(l.outer, work))
  {
    std::vector<double> scratch(static_cast<std::size_t>(2 * l.inner));
#pragma omp for schedule(static)
    for (int64_t o = 0; o < l.outer; ++o) line(o, scratch.data());
  }
}

// The forward of both: log selects log-softmax.
void forward(const TensorView& input, int64_t dim, const TensorView& output, bool log) {
  const detail::CallScope scope;  // shares the threads among concurrent calls
  check_float(input, "input");
  const Lines l = lines_of(input, dim);
  detail::check_output(output, "output", input, input.ndim, input.shape);
  if (input.numel() == 0) return;
  detail::dispatch_float(input.dtype, [&](auto zero) {
    using T = decltype(zero);
    const detail::Contiguous<T> x(input);
    const T* src = x.data();
    T* dst = output.ptr<T>();
    const int64_t n = l.size, in = l.inner;
    for_each_outer(l, [&](int64_t o, double* scratch) {
      const T* xs = src + o * n * in;
      T* ys = dst + o * n * in;
      double* m = scratch;        // the max of each of the `in` lines
      double* sum = scratch + in;  // and the sum of its exp(x - max)
      // `v > m` skips NaN, which then reaches the whole line through the sum
      for (int64_t i = 0; i < in; ++i) m[i] = -std::numeric_limits<double>::infinity();
      for (int64_t j = 0; j < n; ++j)
        for (int64_t i = 0; i < in; ++i) {
          const double v = xs[j * in + i];
          m[i] = v > m[i] ? v : m[i];
        }
      for (int64_t i = 0; i < in; ++i) sum[i] = 0.0;
      for (int64_t j = 0; j < n; ++j)
        for (int64_t i = 0; i < in; ++i) {
          const T e = std::exp(xs[j * in + i] - static_cast<T>(m[i]));
          if (!log) ys[j * in + i] = e;
          sum[i] += static_cast<double>(e);
        }
      if (log) {
        // (x - max) - log(sum), not x - (max + log(sum)): a log(sum) far below
        // the max would be lost in the sum
        for (int64_t i = 0; i < in; ++i) sum[i] = std::log(sum[i]);
        for (int64_t j = 0; j < n; ++j)
          for (int64_t i = 0; i < in; ++i)
            ys[j * in + i] = static_cast<T>((static_cast<double>(xs[j * in + i]) - m[i]) - sum[i]);
        return;
      }
      for (int64_t j = 0; j < n; ++j)
        for (int64_t i = 0; i < in; ++i)
          ys[j * in + i] = static_cast<T>(static_cast<double>(ys[j * in + i]) / sum[i]);
    });
  });
}

// The backward of both, from the forward's output y:
// softmax: grad_input = y * (grad_output - sum(grad_output * y)),
// log-softmax: grad_input = grad_output - exp(y) * sum(grad_output).
void backward(const TensorView& grad_output, const TensorView& output, int64_t dim,
              const TensorView& grad_input, bool log) {
  const detail::CallScope scope;
  check_float(output, "output");
  check_same_dtype(grad_output, "grad_output", output, "output");
  check_shape(grad_output, "grad_output", output.ndim, output.shape);
  const Lines l = lines_of(output, dim);
  detail::check_output(grad_input, "grad_input", output, output.ndim, output.shape);
  if (output.numel() == 0) return;
  detail::dispatch_float(output.dtype, [&](auto zero) {
    using T = decltype(zero);
    const detail::Contiguous<T> y(output), gy(grad_output);
    const T* ysrc = y.data();
    const T* gsrc = gy.data();
    T* dst = grad_input.ptr<T>();
    const int64_t n = l.size, in = l.inner;
    for_each_outer(l, [&](int64_t o, double* dot) {
      const int64_t base = o * n * in;
      for (int64_t i = 0; i < in; ++i) dot[i] = 0.0;
      for (int64_t j = 0; j < n; ++j)
        for (int64_t i = 0; i < in; ++i) {
          const int64_t k = base + j * in + i;
          dot[i] += static_cast<double>(gsrc[k]) * (log ? 1.0 : static_cast<double>(ysrc[k]));
        }
      for (int64_t j = 0; j < n; ++j)
        for (int64_t i = 0; i < in; ++i) {
          const int64_t k = base + j * in + i;
          const double g = gsrc[k], v = ysrc[k];
          dst[k] = static_cast<T>(log ? g - std::exp(v) * dot[i] : v * (g - dot[i]));
        }
    });
  });
}

}  // namespace

void softmax_forward(const TensorView& input, int64_t dim, const TensorView& output) {
  forward(input, dim, output, false);
}

void softmax_backward(const TensorView& grad_output, const TensorView& output, int64_t dim,
                      const TensorView& grad_input) {
  backward(grad_output, output, dim, grad_input, false);
}

void log_softmax_forward(const TensorView& input, int64_t dim, const TensorView& output) {
  forward(input, dim, output, true);
}

void log_softmax_backward(const TensorView& grad_output, const TensorView& output, int64_t dim,
                          const TensorView& grad_input) {
  backward(grad_output, output, dim, grad_input, true);
}

}  // namespace convcore
