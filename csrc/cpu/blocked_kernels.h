// Internals shared by the blocked-layout kernels (blocked_conv.cpp,
// blocked_ops.cpp): the output stage's activation as a compile-time
// constant, and the per-instruction-set dispatch with B as a template
// argument (16 lanes with AVX-512, 8 with AVX2 and the portable code).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <utility>

#include "activation_math.h"
#include "blocked.h"
#include "gemm.h"
#include "simd.h"

namespace convcore {
namespace blocked {

// B lanes of floats (and of doubles, for the pooling sums) as one GCC
// vector, with unaligned loads and stores.
template <int B>
struct Lanes;
template <>
struct Lanes<8> {
  using type = simd::f32x8;
  using wide = simd::f64x8;
  using index = simd::i32x8;
};
typedef double f64x16 __attribute__((vector_size(128)));
template <>
struct Lanes<16> {
  using type = simd::f32x16;
  using wide = f64x16;
  using index = simd::i32x16;
};
template <int B>
using Vec = typename Lanes<B>::type;
template <int B>
using WideVec = typename Lanes<B>::wide;

template <int B>
CONVCORE_ALWAYS_INLINE Vec<B> load(const float* p) {
  Vec<B> v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}
template <int B>
CONVCORE_ALWAYS_INLINE void store(float* p, const Vec<B>& v) {
  __builtin_memcpy(p, &v, sizeof v);
}
template <int B>
CONVCORE_ALWAYS_INLINE Vec<B> splat(float v) {
  return Vec<B>{} + v;
}

// Transposes the B x B matrix of floats whose rows are r[0..B): in log2(B)
// rounds, each swapping the off-diagonal blocks of D x D between rows i and
// i + D (two-source shuffles). The layout changes move B positions of B
// channels at a time with it, instead of one float at a time.
template <int D, int B>
constexpr int low_half_lane(int c) {  // row i's lane c after the round of D
  return (c & D) == 0 ? c : B + c - D;
}
template <int D, int B>
constexpr int high_half_lane(int c) {  // row i + D's
  return (c & D) == 0 ? c + D : B + c;
}
template <int D, int B, int... I>
CONVCORE_ALWAYS_INLINE void swap_blocks(Vec<B>& a, Vec<B>& b, std::integer_sequence<int, I...>) {
#if defined(__clang__)
  const Vec<B> lo = __builtin_shufflevector(a, b, low_half_lane<D, B>(I)...);
  const Vec<B> hi = __builtin_shufflevector(a, b, high_half_lane<D, B>(I)...);
#else
  using Index = typename Lanes<B>::index;
  const Vec<B> lo = __builtin_shuffle(a, b, (Index){low_half_lane<D, B>(I)...});
  const Vec<B> hi = __builtin_shuffle(a, b, (Index){high_half_lane<D, B>(I)...});
#endif
  a = lo;
  b = hi;
}
template <int B, int D>
CONVCORE_ALWAYS_INLINE void transpose_round(Vec<B>* r) {
#pragma GCC unroll 16
  for (int i = 0; i < B; ++i)
    if ((i & D) == 0) swap_blocks<D, B>(r[i], r[i + D], std::make_integer_sequence<int, B>{});
}
template <int B>
CONVCORE_ALWAYS_INLINE void transpose(Vec<B>* r) {
  if constexpr (B == 16) transpose_round<B, 8>(r);
  transpose_round<B, 4>(r);
  transpose_round<B, 2>(r);
  transpose_round<B, 1>(r);
}

// The activation A of B values (the eager ops' arithmetic: activation.cpp
// and relu_forward).
template <Act A, typename V>
CONVCORE_ALWAYS_INLINE V apply(V v) {
  switch (A) {
    case Act::None: return v;
    case Act::ReLU: return v < V{} ? V{} : v;  // a NaN passes, as relu_forward
    case Act::ReLU6: return act_math::activate<Activation::ReLU6>(v);
    case Act::Sigmoid: return act_math::activate<Activation::Sigmoid>(v);
    case Act::SiLU: return act_math::activate<Activation::SiLU>(v);
    case Act::Hardswish: return act_math::activate<Activation::Hardswish>(v);
    case Act::Hardsigmoid: return act_math::activate<Activation::Hardsigmoid>(v);
  }
  return v;
}

// A channel plane (block) of h x w positions of `lanes` floats copied into
// a frame of hf x wf positions at (top, left), zeros around it; rows and
// columns past the frame are left out; a negative top starts the frame
// -top rows into the plane (a band of rows). The padded frames of the direct
// convolution and of the depthwise one on small images.
inline void pad_plane(const float* src, int64_t h, int64_t w, int64_t top, int64_t left,
                      int64_t hf, int64_t wf, int64_t lanes, float* dst) {
  const int64_t lo = std::clamp<int64_t>(left, 0, wf);
  const int64_t hi = std::clamp<int64_t>(left + w, lo, wf);
  for (int64_t r = 0; r < hf; ++r) {
    const int64_t ih = r - top;
    float* drow = dst + r * wf * lanes;
    if (ih < 0 || ih >= h) {
      std::fill(drow, drow + wf * lanes, 0.0f);
      continue;
    }
    std::fill(drow, drow + lo * lanes, 0.0f);
    std::memcpy(drow + lo * lanes, src + (ih * w + lo - left) * lanes,
                static_cast<std::size_t>((hi - lo) * lanes) * sizeof(float));
    std::fill(drow + hi * lanes, drow + wf * lanes, 0.0f);
  }
}

// Calls FN<B, A>(ARGS...) for the run-time activation `act`, so each
// activation's loop is compiled (and vectorised) on its own. A switch, not
// a generic lambda: a lambda's body would be compiled for the baseline
// instruction set, outside the caller's target attribute.
#define CONVCORE_ACT_SWITCH(act, FN, B, ...)                                       \
  switch (act) {                                                                   \
    case Act::None: FN<B, Act::None>(__VA_ARGS__); break;                          \
    case Act::ReLU: FN<B, Act::ReLU>(__VA_ARGS__); break;                          \
    case Act::ReLU6: FN<B, Act::ReLU6>(__VA_ARGS__); break;                        \
    case Act::Sigmoid: FN<B, Act::Sigmoid>(__VA_ARGS__); break;                    \
    case Act::SiLU: FN<B, Act::SiLU>(__VA_ARGS__); break;                          \
    case Act::Hardswish: FN<B, Act::Hardswish>(__VA_ARGS__); break;                \
    case Act::Hardsigmoid: FN<B, Act::Hardsigmoid>(__VA_ARGS__); break;            \
  }

// Defines `void NAME PARAMS` calling BODY<B> ARGS compiled for AVX-512
// (B = 16), AVX2 (B = 8) and the baseline (B = 8), picked by
// gemm::isa_level() as block() is. BODY runs on one thread: the parallel
// loops stay outside, in code compiled for the baseline, and call it per
// task (as conv_depthwise.h's row kernels are called).
#define CONVCORE_BLOCKED_DISPATCH(NAME, BODY, PARAMS, ARGS) \
  CONVCORE_ISA_DISPATCH3(NAME, BODY<16>, BODY<8>, BODY<8>, PARAMS, ARGS)

}  // namespace blocked
}  // namespace convcore
