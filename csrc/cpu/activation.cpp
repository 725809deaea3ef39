// ReLU forward and backward, elementwise. NaN propagates through the
// forward (as torch.relu); the backward zeroes the gradient where input <= 0.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "activation_math.h"
#include "convcore/ops.h"
#include "convcore/threading.h"
#include "strided.h"

namespace convcore {

namespace {

int threads_for_elements(int64_t n) { return detail::threads_for(n, n); }

void check_same_shape(const TensorView& t, const char* name, const TensorView& ref) {
  check_shape(t, name, ref.ndim, ref.shape);
}

// output[i] = f(input[i]) for every element (input of any strides); f is
// called with float or double and inlined, so each op's loop vectorises.
template <typename F>
void map_forward(const TensorView& input, const TensorView& output, F&& f) {
  check_float(input, "input");
  detail::check_output(output, "output", input, input.ndim, input.shape);
  detail::dispatch_float(input.dtype, [&](auto zero) {
    using T = decltype(zero);
    const detail::Contiguous<T> x(input);
    const T* src = x.data();
    T* dst = output.ptr<T>();
    const int64_t n = input.numel();
#pragma omp parallel for num_threads(threads_for_elements(n)) schedule(static)
    for (int64_t i = 0; i < n; ++i) dst[i] = f(src[i]);
  });
}

// grad_input[i] = f(input[i], grad_output[i]) for every element.
template <typename F>
void map_backward(const TensorView& grad_output, const TensorView& input,
                  const TensorView& grad_input, F&& f) {
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
    for (int64_t i = 0; i < n; ++i) dst[i] = f(xs[i], g[i]);
  });
}

}  // namespace

void relu_forward(const TensorView& input, const TensorView& output) {
  const detail::CallScope scope;  // shares the threads among concurrent calls
  map_forward(input, output, [](auto v) { return v < decltype(v)(0) ? decltype(v)(0) : v; });
}

void relu_backward(const TensorView& grad_output, const TensorView& input,
                   const TensorView& grad_input) {
  const detail::CallScope scope;
  // As PyTorch: zero where input <= 0, so a NaN input passes the gradient.
  map_backward(grad_output, input, grad_input,
               [](auto v, auto g) { return v <= decltype(v)(0) ? decltype(v)(0) : g; });
}

// --- the smooth and clipped activations of MobileNet, SENet and EfficientNet

namespace {

using act_math::activate;
using act_math::sigmoid_of;
using act_math::clip06;

// d activation / d input at v, times g; PyTorch's values at the kinks.
template <Activation kind, typename T>
inline T derivative(T v, T g) {
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

// Calls f(std::integral_constant<Activation, kind>{}) for the run-time kind.
template <typename F>
void with_kind(Activation kind, F&& f) {
  switch (kind) {
    case Activation::Sigmoid: return f(std::integral_constant<Activation, Activation::Sigmoid>{});
    case Activation::SiLU: return f(std::integral_constant<Activation, Activation::SiLU>{});
    case Activation::ReLU6: return f(std::integral_constant<Activation, Activation::ReLU6>{});
    case Activation::Hardswish:
      return f(std::integral_constant<Activation, Activation::Hardswish>{});
    default: return f(std::integral_constant<Activation, Activation::Hardsigmoid>{});
  }
}

}  // namespace

void activation_forward(Activation kind, const TensorView& input, const TensorView& output) {
  const detail::CallScope scope;  // shares the threads among concurrent calls
  with_kind(kind, [&](auto k) {
    map_forward(input, output, [](auto v) { return activate<decltype(k)::value>(v); });
  });
}

void activation_backward(Activation kind, const TensorView& grad_output, const TensorView& input,
                         const TensorView& grad_input) {
  const detail::CallScope scope;
  with_kind(kind, [&](auto k) {
    map_backward(grad_output, input, grad_input,
                 [](auto v, auto g) { return derivative<decltype(k)::value>(v, g); });
  });
}

}  // namespace convcore
