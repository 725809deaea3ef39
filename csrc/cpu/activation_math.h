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

// The int32 counterpart of a float type, and conversion by bits.
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
CONVCORE_ALWAYS_INLINE T from_bits(typename IntOf<T>::type bits) {
  T out;
  std::memcpy(&out, &bits, sizeof out);
  return out;
}
// (n + 127) << 23, the bits of the float 2^n, shifted as unsigned: for a
// NaN, n is whatever its bits give, whose signed shift would be undefined.
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

// exp(z) in float32 for z in [-87.3, 88.7] (a NaN stays NaN), branch-free so
// the loops vectorise (std::exp is a call per element): Cephes' expf,
// z = n ln2 + r with |r| <= ln2 / 2, a degree-6 polynomial for e^r and 2^n
// put into the exponent bits; n = round(z / ln2) by adding 1.5 * 2^23, whose
// sum holds n in its low bits (no conversion instructions). Within 2 ulp of
// the correctly rounded value; inf where n reaches 128 (z above 88.03).
// T: float or a vector of floats.
template <typename T>
CONVCORE_ALWAYS_INLINE T exp_in_range(T z) {
  using I = typename IntOf<T>::type;
  const T magic = splat<T>(12582912.0f);  // 1.5 * 2^23: the sum's ulp is 1
  const T s = z * 1.44269504088896341f + magic;
  const T g = s - magic;  // round(z / ln2), exactly
  const T r = (z - g * 0.693359375f) + g * 2.12194440e-4f;  // ln2 in two parts
  T p = splat<T>(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const T er = p * r * r + r + 1.0f;
  I n;  // the rounded integer, from the sum's low bits
  if constexpr (std::is_same_v<T, float>) {
    int32_t sb, mb;
    std::memcpy(&sb, &s, sizeof sb);
    std::memcpy(&mb, &magic, sizeof mb);
    n = sb - mb;
  } else {
    n = reinterpret_cast<I>(s) - reinterpret_cast<I>(magic);
  }
  return er * from_bits<T>(exponent_bits(n));  // 2^n: inf at n = 128
}

// The logistic function 1 / (1 + exp(-v)) in float32, with one exp and no
// select between the signs: exp's argument is kept in [-87.3, 88.7], so
// for v > 87.3 the result is exactly 1, and below -88.03 exp is inf and the
// result 0 (the true value is under 1e-38 there).
template <typename T>
CONVCORE_ALWAYS_INLINE T sigmoid_of(T v) {
  const T one = splat<T>(1.0f);
  if constexpr (std::is_same_v<T, double>) {
    // exp of a non-positive number only: no overflow
    const T e = std::exp(v < 0 ? v : -v), t = one / (one + e);
    return v >= 0 ? t : e * t;
  } else {
    const T lo = splat<T>(-87.3f), hi = splat<T>(88.7f);
    T z = -v;
    z = z < lo ? lo : z;  // max and min that keep a NaN (one compare each)
    z = z > hi ? hi : z;
    return one / (one + exp_in_range(z));
  }
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
