// The activations' arithmetic, shared by the elementwise ops
// (activation.cpp, over float and double) and the compiled engine's output
// stages (blocked_*.cpp, over GCC vectors of floats), so that both compute
// the same values. One definition serves scalars and vectors: only
// comparisons, selects (`mask ? a : b`), arithmetic and bit casts, which
// GCC's vector extensions give element by element. Always inlined, so it is
// compiled for the caller's instruction set.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "convcore/ops.h"
#include "simd.h"

namespace convcore {
namespace act_math {

// The int32 counterpart of a float type, and conversions by value and by bits.
template <typename T>
struct IntOf;
template <>
struct IntOf<float> {
  using type = int32_t;
};
#if defined(CONVCORE_HAVE_VECTOR_TYPES)
typedef int32_t i32x16 __attribute__((vector_size(64)));
template <>
struct IntOf<simd::f32x8> {
  using type = simd::i32x8;
};
template <>
struct IntOf<simd::f32x16> {
  using type = i32x16;
};
#endif

template <typename T>
CONVCORE_ALWAYS_INLINE typename IntOf<T>::type truncate_to_int(T x) {
  if constexpr (std::is_same_v<T, float>)
    return static_cast<int32_t>(x);
  else
    return __builtin_convertvector(x, typename IntOf<T>::type);
}
template <typename T>
CONVCORE_ALWAYS_INLINE T to_float(typename IntOf<T>::type n) {
  if constexpr (std::is_same_v<T, float>)
    return static_cast<float>(n);
  else
    return __builtin_convertvector(n, T);
}
template <typename T>
CONVCORE_ALWAYS_INLINE T from_bits(typename IntOf<T>::type bits) {
  T out;
  std::memcpy(&out, &bits, sizeof out);
  return out;
}
// (n + 127) << 23, the bits of the float 2^n, shifted as unsigned: a NaN's
// lanes hold INT32_MIN there (the conversion's "indefinite" value), whose
// signed shift would be undefined.
template <typename I>
CONVCORE_ALWAYS_INLINE I exponent_bits(I n) {
  if constexpr (std::is_same_v<I, int32_t>) {
    return static_cast<int32_t>(static_cast<uint32_t>(n + 127) << 23);
  } else {
    typedef uint32_t U __attribute__((vector_size(sizeof(I))));
    return reinterpret_cast<I>(reinterpret_cast<U>(n + 127) << 23);
  }
}
// T with every element v.
template <typename T>
CONVCORE_ALWAYS_INLINE T splat(float v) {
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>)
    return static_cast<T>(v);
  else
    return T{} + v;
}

// exp(x) for x <= 0 in float32, branch-free so the loops vectorise (std::exp
// is a call per element): Cephes' expf, x = n ln2 + r with |r| <= ln2 / 2,
// a degree-6 polynomial for e^r and 2^n put into the exponent bits. Within
// 2 ulp of the correctly rounded value; 0 below -87.3, where the true value
// is under 1.2e-38. T: float or a vector of floats.
template <typename T>
CONVCORE_ALWAYS_INLINE T exp_nonpositive(T x_in) {
  const T lo = splat<T>(-87.3f);
  const T x = x_in < lo ? lo : x_in;  // max(x_in, -87.3), a NaN kept
  const auto n = truncate_to_int<T>(x * 1.44269504088896341f - 0.5f);  // round(x / ln2)
  const T g = to_float<T>(n);
  const T r = (x - g * 0.693359375f) + g * 2.12194440e-4f;  // ln2 in two parts
  T p = splat<T>(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const T er = p * r * r + r + 1.0f;
  const T scale = from_bits<T>(exponent_bits(n));  // 2^n, n >= -126 here
  const T y = er * scale;
  return x_in < lo ? splat<T>(0.0f) : y;  // underflow: 0 (the true value is < 1.2e-38)
}

template <typename T>
CONVCORE_ALWAYS_INLINE T exp_nonpositive_of(T x) {
  if constexpr (std::is_same_v<T, double>)
    return std::exp(x);
  else
    return exp_nonpositive(x);
}

// The logistic function without overflow: exp of a non-positive number only.
template <typename T>
CONVCORE_ALWAYS_INLINE T sigmoid_of(T v) {
  const T zero = splat<T>(0.0f), one = splat<T>(1.0f);
  const T e = exp_nonpositive_of(v < zero ? v : -v);  // exp(-|v|)
  const T t = one / (one + e), et = e * t;  // both sides computed: a select
  return v >= zero ? t : et;
}

template <typename T>
CONVCORE_ALWAYS_INLINE T clip06(T v) {  // min(max(v, 0), 6), NaN stays NaN
  const T zero = splat<T>(0.0f), six = splat<T>(6.0f);
  const T m = v < zero ? zero : v;
  return m > six ? six : m;
}

template <Activation kind, typename T>
CONVCORE_ALWAYS_INLINE T activate(T v) {
  switch (kind) {  // a compile-time constant: each kind's loop vectorises on its own
    case Activation::Sigmoid: return sigmoid_of(v);
    case Activation::SiLU: return v * sigmoid_of(v);
    case Activation::ReLU6: return clip06(v);
    case Activation::Hardswish: return v * clip06(v + splat<T>(3.0f)) / splat<T>(6.0f);
    default: return clip06(v + splat<T>(3.0f)) / splat<T>(6.0f);  // Hardsigmoid
  }
}

}  // namespace act_math
}  // namespace convcore
