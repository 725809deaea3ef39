// ReLU forward and backward, elementwise. NaN propagates through the
// forward (as torch.relu); the backward zeroes the gradient where input <= 0.
#include <omp.h>

#include <algorithm>
#include <cmath>

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

// --- the smooth and clipped activations of MobileNet, SENet and EfficientNet

namespace {

// The logistic function without overflow: exp of a non-positive number only.
template <typename T>
inline T sigmoid_of(T v) {
  const T e = std::exp(-std::fabs(v));
  return v >= T(0) ? T(1) / (T(1) + e) : e / (T(1) + e);
}

template <typename T>
inline T clip06(T v) {  // min(max(v, 0), 6), NaN stays NaN
  return std::min(std::max(v, T(0)), T(6));
}

template <typename T>
inline T activate(Activation kind, T v) {
  switch (kind) {
    case Activation::Sigmoid: return sigmoid_of(v);
    case Activation::SiLU: return v * sigmoid_of(v);
    case Activation::ReLU6: return clip06(v);
    case Activation::Hardswish: return v * clip06(v + T(3)) / T(6);
    default: return clip06(v + T(3)) / T(6);  // Hardsigmoid
  }
}

// d activation / d input at v, times g; PyTorch's values at the kinks.
template <typename T>
inline T derivative(Activation kind, T v, T g) {
  switch (kind) {
    case Activation::Sigmoid: {
      const T s = sigmoid_of(v);
      return g * s * (T(1) - s);
    }
    case Activation::SiLU: {
      const T s = sigmoid_of(v);
      return g * s * (T(1) + v * (T(1) - s));
    }
    case Activation::ReLU6: return v > T(0) && v < T(6) ? g : T(0);
    case Activation::Hardswish:
      return v <= T(-3) ? T(0) : v >= T(3) ? g : g * (v / T(3) + T(0.5));
    default: return v > T(-3) && v < T(3) ? g / T(6) : T(0);  // Hardsigmoid
  }
}

}  // namespace

void activation_forward(Activation kind, const TensorView& input, const TensorView& output) {
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
    for (int64_t i = 0; i < n; ++i) dst[i] = activate(kind, src[i]);
  });
}

void activation_backward(Activation kind, const TensorView& grad_output, const TensorView& input,
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
    for (int64_t i = 0; i < n; ++i) dst[i] = derivative(kind, xs[i], g[i]);
  });
}

}  // namespace convcore
