// ReLU forward and backward, elementwise. NaN propagates through the
// forward (as torch.relu); the backward zeroes the gradient where input <= 0.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <type_traits>

#include "activation_math.h"
#include "convcore/ops.h"
#include "convcore/threading.h"
#include "gemm.h"
#include "simd.h"
#include "strided.h"

namespace convcore {

namespace {

int threads_for_elements(int64_t n) { return detail::threads_for(n, n); }

void check_same_shape(const TensorView& t, const char* name, const TensorView& ref) {
  check_shape(t, name, ref.ndim, ref.shape);
}

// The arguments of an elementwise forward and backward.
void check_forward(const TensorView& input, const TensorView& output) {
  check_float(input, "input");
  detail::check_output(output, "output", input, input.ndim, input.shape);
}
void check_backward(const TensorView& grad_output, const TensorView& input,
                    const TensorView& grad_input) {
  check_float(input, "input");
  check_same_dtype(grad_output, "grad_output", input, "input");
  check_same_shape(grad_output, "grad_output", input);
  detail::check_output(grad_input, "grad_input", input, input.ndim, input.shape);
}

// output[i] = f(input[i]) for every element (input of any strides); f is
// called with float or double and inlined, so each op's loop vectorises.
template <typename F>
void map_forward(const TensorView& input, const TensorView& output, F&& f) {
  check_forward(input, output);
  detail::dispatch_float(input.dtype, [&](auto zero) {
    using T = decltype(zero);
    const detail::Contiguous<T> x(input);
    const T* src = x.data();
    T* dst = output.ptr<T>();
    const int64_t n = input.numel();
    detail::parallel_for(threads_for_elements(n), n, [&](int64_t i) { dst[i] = f(src[i]); });
  });
}

// grad_input[i] = f(input[i], grad_output[i]) for every element.
template <typename F>
void map_backward(const TensorView& grad_output, const TensorView& input,
                  const TensorView& grad_input, F&& f) {
  check_backward(grad_output, input, grad_input);
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
// T: float, double or a vector of floats.
template <Activation kind, typename T>
CONVCORE_ALWAYS_INLINE T derivative(T v, T g) {
  using act_math::splat;
  const T zero = splat<T>(0.0f), one = splat<T>(1.0f);
  switch (kind) {
    case Activation::Sigmoid: {
      const T s = sigmoid_of(v);
      return g * s * (one - s);
    }
    case Activation::SiLU: {
      const T s = sigmoid_of(v);
      return g * s * (one + v * (one - s));
    }
    // nested selects, not &&: GCC scalarises a && of vector compares (a
    // compare per lane) in bodies compiled outside the vector target
    case Activation::ReLU6: return v > zero ? (v < splat<T>(6.0f) ? g : zero) : zero;
    case Activation::Hardswish:
      return v <= splat<T>(-3.0f) ? zero
                                  : v >= splat<T>(3.0f) ? g : g * (v / splat<T>(3.0f) + splat<T>(0.5f));
    default:  // Hardsigmoid
      return v > splat<T>(-3.0f) ? (v < splat<T>(3.0f) ? g / splat<T>(6.0f) : zero) : zero;
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

// Float32 spans through vectors of the instruction set's width (the scalar
// loop above is compiled for the baseline, where GCC does not vectorise the
// exponential's integer steps): the same formulas, element by element, the
// tail in scalars. g == nullptr: forward, y = f(x); else y = f'(x) g. The
// derivatives that are nonzero only between two kinks go in vectors of 8:
// their two-sided select on 16 lanes GCC scalarises (a compare per lane) in
// a body compiled outside the AVX-512 target.
#if defined(CONVCORE_HAVE_VECTOR_TYPES)
template <typename V, Activation K>
CONVCORE_ALWAYS_INLINE void activation_forward_span(const float* x, float* y, int64_t n) {
  constexpr int64_t W = sizeof(V) / sizeof(float);
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    V v;
    std::memcpy(&v, x + i, sizeof v);
    v = activate<K>(v);
    std::memcpy(y + i, &v, sizeof v);
  }
  for (; i < n; ++i) y[i] = activate<K>(x[i]);
}

template <typename V, Activation K>
CONVCORE_ALWAYS_INLINE void activation_backward_span(const float* x, const float* g, float* y,
                                                     int64_t n) {
  constexpr int64_t W = sizeof(V) / sizeof(float);
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    V v, gv;
    std::memcpy(&v, x + i, sizeof v);
    std::memcpy(&gv, g + i, sizeof gv);
    const V d = derivative<K>(v, gv);
    std::memcpy(y + i, &d, sizeof d);
  }
  for (; i < n; ++i) y[i] = derivative<K>(x[i], g[i]);
}

template <typename V, Activation K>
CONVCORE_ALWAYS_INLINE void activation_span(const float* x, const float* g, float* y, int64_t n) {
  constexpr bool two_sided = K == Activation::ReLU6 || K == Activation::Hardsigmoid;
  if (g && two_sided && sizeof(V) > sizeof(simd::f32x8))
    activation_backward_span<simd::f32x8, K>(x, g, y, n);
  else if (g)
    activation_backward_span<V, K>(x, g, y, n);
  else
    activation_forward_span<V, K>(x, y, n);
}

template <typename V>
CONVCORE_ALWAYS_INLINE void activation_span_body(Activation kind, const float* x, const float* g,
                                                 float* y, int64_t n) {
  switch (kind) {
    case Activation::Sigmoid: return activation_span<V, Activation::Sigmoid>(x, g, y, n);
    case Activation::SiLU: return activation_span<V, Activation::SiLU>(x, g, y, n);
    case Activation::ReLU6: return activation_span<V, Activation::ReLU6>(x, g, y, n);
    case Activation::Hardswish: return activation_span<V, Activation::Hardswish>(x, g, y, n);
    default: return activation_span<V, Activation::Hardsigmoid>(x, g, y, n);
  }
}

CONVCORE_ISA_DISPATCH3(activation_span_isa, activation_span_body<simd::f32x16>,
                       activation_span_body<simd::f32x8>, activation_span_body<float>,
                       (Activation kind, const float* x, const float* g, float* y, int64_t n),
                       (kind, x, g, y, n))

// The float32 op over contiguous copies, in spans shared among the threads.
void activation_float(Activation kind, const TensorView& input, const TensorView* grad_output,
                      const TensorView& output) {
  const detail::Contiguous<float> x(input);
  std::optional<detail::Contiguous<float>> gy;
  if (grad_output) gy.emplace(*grad_output);
  const float* g = gy ? gy->data() : nullptr;
  float* y = output.ptr<float>();
  const int64_t n = input.numel();
  constexpr int64_t kSpan = 4096;  // a multiple of every vector width
  const int64_t spans = (n + kSpan - 1) / kSpan;
  detail::parallel_for(threads_for_elements(n), spans, [&](int64_t t) {
    const int64_t i = t * kSpan, len = std::min(kSpan, n - i);
    activation_span_isa(kind, x.data() + i, g ? g + i : nullptr, y + i, len);
  });
}
#endif

}  // namespace

void activation_forward(Activation kind, const TensorView& input, const TensorView& output) {
  const detail::CallScope scope;  // shares the threads among concurrent calls
#if defined(CONVCORE_HAVE_VECTOR_TYPES)
  if (input.dtype == DType::Float32) {
    check_forward(input, output);
    return activation_float(kind, input, nullptr, output);
  }
#endif
  with_kind(kind, [&](auto k) {
    map_forward(input, output, [](auto v) { return activate<decltype(k)::value>(v); });
  });
}

void activation_backward(Activation kind, const TensorView& grad_output, const TensorView& input,
                         const TensorView& grad_input) {
  const detail::CallScope scope;
#if defined(CONVCORE_HAVE_VECTOR_TYPES)
  if (input.dtype == DType::Float32) {
    check_backward(grad_output, input, grad_input);
    return activation_float(kind, input, &grad_output, grad_input);
  }
#endif
  with_kind(kind, [&](auto k) {
    map_backward(grad_output, input, grad_input,
                 [](auto v, auto g) { return derivative<decltype(k)::value>(v, g); });
  });
}

}  // namespace convcore
