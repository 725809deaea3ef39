// ReLU forward and backward, elementwise. NaN propagates through the
// forward (as torch.relu); the backward zeroes the gradient where input <= 0.
#include <omp.h>

#include <algorithm>

#include "convcore/ops.h"
#include "convcore/threading.h"
#include "strided.h"

namespace convcore {

namespace {

int threads_for_elements(int64_t n) { return detail::threads_for(n, n); }

void check_same_shape(const TensorView& t, const char* name, const TensorView& ref) {
  check_shape(t, name, ref.ndim, ref.shape);
}

}  // namespace

void relu_forward(const TensorView& input, const TensorView& output) {
  const detail::CallScope scope;  // shares the threads among concurrent calls
  check_float(input, "input");
  detail::check_output(output, "output", input, input.ndim, input.shape);
  detail::dispatch_float(input.dtype, [&](auto zero) {
    using T = decltype(zero);
    const detail::Contiguous<T> x(input);
    const T* src = x.data();
    T* dst = output.ptr<T>();
    const int64_t n = input.numel();
#pragma omp parallel for num_threads(threads_for_elements(n)) schedule(static)
    for (int64_t i = 0; i < n; ++i) dst[i] = src[i] < T(0) ? T(0) : src[i];
  });
}

void relu_backward(const TensorView& grad_output, const TensorView& input,
                   const TensorView& grad_input) {
  const detail::CallScope scope;  // shares the threads among concurrent calls
  check_float(input, "input");
  check_same_dtype(grad_output, "grad_output", input, "input");
  check_same_shape(grad_output, "grad_output", input);
  detail::check_output(grad_input, "grad_input", input, input.ndim, input.shape);
  detail::dispatch_float(input.dtype, [&](auto zero) {
    using T = decltype(zero);
    const detail::Contiguous<T> x(input), gy(grad_output);
    const T* xs = x.data();
    const T* g = gy.data();
    T* dst = grad_input.ptr<T>();
    const int64_t n = input.numel();
#pragma omp parallel for num_threads(threads_for_elements(n)) schedule(static)
    // As PyTorch: zero where input <= 0, so a NaN input passes the gradient.
    for (int64_t i = 0; i < n; ++i) dst[i] = xs[i] <= T(0) ? T(0) : g[i];
  });
}

}  // namespace convcore
