// Direct kernels for depthwise convolution (one input channel per group):
// a GEMM would have one row per output channel and nothing to block, so
// these work plane by plane. Stride-1 planes that fit in L1/L2 run the flat
// kernels below (vectors along the flattened padded plane, all taps summed
// in registers); other planes loop over rows with the taps outside and the
// output row inside.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "gemm.h"
#include "simd.h"
#include "strided.h"

namespace convcore {
namespace depthwise {

// sum of a[q] * b[q] in 16 partial sums (vectorisable; a fixed order, so
// deterministic), then added up.
template <typename T>
inline __attribute__((always_inline)) T dot16(const T* a, const T* b, int64_t n) {
  T part[16] = {};
  const int64_t main = n / 16 * 16;
  for (int64_t q = 0; q < main; q += 16)
    for (int l = 0; l < 16; ++l) part[l] += a[q + l] * b[q + l];
  T sum = 0;
  for (int l = 0; l < 16; ++l) sum += part[l];
  for (int64_t q = main; q < n; ++q) sum += a[q] * b[q];
  return sum;
}

// dst[0:n] = src[0:n] for the short rows of small planes, in 16-, 8- or
// 4-element moves the compiler inlines (a loop or std::copy becomes a
// memmove call, which cost as much as the arithmetic on 14-wide rows); the
// last move overlaps the one before instead of a scalar tail. src and dst
// do not overlap.
template <typename T>
inline __attribute__((always_inline)) void copy_row(const T* src, int64_t n, T* dst) {
  if (n >= 16) {
    int64_t q = 0;
    for (; q + 16 <= n; q += 16) __builtin_memcpy(dst + q, src + q, 16 * sizeof(T));
    if (q < n) __builtin_memcpy(dst + n - 16, src + n - 16, 16 * sizeof(T));
  } else if (n >= 8) {
    __builtin_memcpy(dst, src, 8 * sizeof(T));
    __builtin_memcpy(dst + n - 8, src + n - 8, 8 * sizeof(T));
  } else if (n >= 4) {
    __builtin_memcpy(dst, src, 4 * sizeof(T));
    __builtin_memcpy(dst + n - 4, src + n - 4, 4 * sizeof(T));
  } else {
    for (int64_t q = 0; q < n; ++q) dst[q] = src[q];
  }
}

// The flat kernels run in whole blocks of up to kFlatSlack elements: every
// buffer they touch has that many elements past its end, zeros where read.
constexpr int64_t kFlatSlack = 64;

struct Plane {
  int64_t H, W, Ho, Wo, KH, KW;
  int64_t sh, sw, dh, dw, pt, pl;
  int64_t xs_h, xs_w;  // strides of the input plane
  // The padded plane the windows read: rows Hp, columns Wp (only as much of
  // the padding as some window reaches).
  int64_t Hp() const { return std::max(H + pt, (Ho - 1) * sh + (KH - 1) * dh + 1); }
  int64_t Wp() const { return std::max(W + pl, (Wo - 1) * sw + (KW - 1) * dw + 1); }
  int64_t taps() const { return KH * KW; }
  // The flat form. A stride (sh, sw) splits the padded plane into sh * sw
  // phase planes of Hq x Wq: phase (a, b) holds padded rows a, a + sh, ...
  // and columns b, b + sw, ... (each followed by kFlatSlack elements). Every
  // tap reads a single phase plane at stride 1, so output (oh, ow) sits at
  // q = oh * Wq + ow and tap (i, j) reads its phase plane at q + a fixed
  // offset: the stride-1 kernels run strided layers too. Stride 1 is one
  // phase, Hp x Wp.
  int64_t Hq() const { return (Hp() + sh - 1) / sh; }
  int64_t Wq() const { return (Wp() + sw - 1) / sw; }
  int64_t phases() const { return sh * sw; }
  int64_t phase_stride() const { return Hq() * Wq() + kFlatSlack; }
  int64_t flat_length() const { return (Ho - 1) * Wq() + Wo; }
  int64_t tap_phase(int64_t i, int64_t j) const { return (i * dh % sh) * sw + j * dw % sw; }
  // Tap (i, j)'s offset inside its phase plane, and in the whole buffer.
  int64_t tap_local(int64_t i, int64_t j) const { return i * dh / sh * Wq() + j * dw / sw; }
  int64_t tap_offset(int64_t i, int64_t j) const {
    return tap_phase(i, j) * phase_stride() + tap_local(i, j);
  }
};

// Planes of up to kFlatMax padded elements (256 KB in float) run the flat
// kernels: each output computed Wq wide (the extra columns dropped), in
// blocks of vectors that sum all taps in registers. They beat the row
// kernels on every plane measured, most on strided ones (whose rows the
// row kernels read one element at a time): docs/training.md.
constexpr int64_t kFlatMax = 65536;
inline bool flat_applies(const Plane& p) {
  return p.phases() * p.Hq() * p.Wq() <= kFlatMax;
}

// out[q] = (accumulate ? out[q] : init) + sum_t w[t] * src[q + off[t]] for q
// in [q0, q1), in blocks of NV vectors (written up to the block's end).
template <typename T, typename V, int NV>
inline __attribute__((always_inline)) void correlate_flat_body(const T* src, const int64_t* off,
                                                               const T* w, int64_t taps,
                                                               bool accumulate, T init,
                                                               int64_t q0, int64_t q1, T* out) {
  constexpr int L = sizeof(V) / sizeof(T);
  static_assert(NV * L <= kFlatSlack, "a block must fit in the slack");
  for (int64_t q = q0; q < q1; q += NV * L) {
    V acc[NV];
    for (int v = 0; v < NV; ++v) {
      if (accumulate)
        simd::load_vec(acc[v], out + q + v * L);
      else
        acc[v] = V{} + init;
    }
    for (int64_t t = 0; t < taps; ++t) {
      const V wv = V{} + w[t];
      const T* s = src + off[t] + q;
      for (int v = 0; v < NV; ++v) {
        V sv;
        simd::load_vec(sv, s + v * L);
        acc[v] += wv * sv;
      }
    }
    for (int v = 0; v < NV; ++v) simd::store_vec(out + q + v * L, acc[v]);
  }
}

// OB output planes at once from cin input planes (a group's): for o < OB,
// out[o * out_step + q] = init[o] (0 if null) + sum over planes c < cin and
// taps t of w[o * w_o + c * w_c + t] * src[c * src_step + off[t] + q], for q
// in [q0, q1), in blocks of NV vectors (written up to the block's end).
// Sums in the order c, then t: with one plane, correlate_flat_body's. Each
// input vector loaded feeds OB products, where one output at a time took a
// load per product and a reload of its partial sums per plane.
template <typename T, typename V, int OB, int NV>
inline __attribute__((always_inline)) void correlate_planes_block(
    const T* src, int64_t src_step, int64_t cin, const int64_t* off, const T* w, int64_t w_o,
    int64_t w_c, int64_t taps, const T* init, int64_t q0, int64_t q1, T* out,
    int64_t out_step) {
  constexpr int L = sizeof(V) / sizeof(T);
  static_assert(NV * L <= kFlatSlack, "a block must fit in the slack");
  for (int64_t q = q0; q < q1; q += NV * L) {
    V acc[OB][NV];
    for (int o = 0; o < OB; ++o)
      for (int v = 0; v < NV; ++v) acc[o][v] = V{} + (init ? init[o] : T(0));
    for (int64_t c = 0; c < cin; ++c) {
      const T* sc = src + c * src_step + q;
      const T* wc = w + c * w_c;
      for (int64_t t = 0; t < taps; ++t) {
        V sv[NV];
        for (int v = 0; v < NV; ++v) simd::load_vec(sv[v], sc + off[t] + v * L);
        for (int o = 0; o < OB; ++o) {
          const V wv = V{} + wc[o * w_o + t];
          for (int v = 0; v < NV; ++v) acc[o][v] += wv * sv[v];
        }
      }
    }
    for (int o = 0; o < OB; ++o)
      for (int v = 0; v < NV; ++v) simd::store_vec(out + o * out_step + q + v * L, acc[o][v]);
  }
}

// correlate_planes_block over nout output planes, four at a time.
template <typename T, typename V, int NV>
inline __attribute__((always_inline)) void correlate_planes_body(
    const T* src, int64_t src_step, int64_t cin, const int64_t* off, const T* w, int64_t w_o,
    int64_t w_c, int64_t taps, const T* init, int64_t nout, int64_t q0, int64_t q1, T* out,
    int64_t out_step) {
  int64_t o = 0;
  for (; o + 4 <= nout; o += 4)
    correlate_planes_block<T, V, 4, NV>(src, src_step, cin, off, w + o * w_o, w_o, w_c, taps,
                                        init ? init + o : nullptr, q0, q1, out + o * out_step,
                                        out_step);
  for (; o < nout; ++o)
    correlate_planes_block<T, V, 1, NV>(src, src_step, cin, off, w + o * w_o, w_o, w_c, taps,
                                        init ? init + o : nullptr, q0, q1, out + o * out_step,
                                        out_step);
}

// dots[t] = sum_{q < n} a[q] * src[q + off[t]] for G taps at once (one load
// of a feeds G products); lanes added in order. a is zero past n.
template <typename T, typename V, int G>
inline __attribute__((always_inline)) void tap_dots_group(const T* a, const T* src,
                                                          const int64_t* off, int64_t n,
                                                          T* dots) {
  constexpr int L = sizeof(V) / sizeof(T);
  V acc[G];
  for (int t = 0; t < G; ++t) acc[t] = V{};
  for (int64_t q = 0; q < n; q += L) {
    V av;
    simd::load_vec(av, a + q);
    for (int t = 0; t < G; ++t) {
      V sv;
      simd::load_vec(sv, src + off[t] + q);
      acc[t] += av * sv;
    }
  }
  for (int t = 0; t < G; ++t) {
    T lanes[L];
    simd::store_vec(lanes, acc[t]);
    T sum = 0;
    for (int l = 0; l < L; ++l) sum += lanes[l];
    dots[t] = sum;
  }
}

// All taps' dots, nine at a time (a 3x3 kernel in one pass over a).
template <typename T, typename V>
inline __attribute__((always_inline)) void tap_dots_body(const T* a, const T* src,
                                                         const int64_t* off, int64_t taps,
                                                         int64_t n, T* dots) {
  int64_t t = 0;
  for (; t + 9 <= taps; t += 9) tap_dots_group<T, V, 9>(a, src, off + t, n, dots + t);
  for (; t + 3 <= taps; t += 3) tap_dots_group<T, V, 3>(a, src, off + t, n, dots + t);
  for (; t < taps; ++t) tap_dots_group<T, V, 1>(a, src, off + t, n, dots + t);
}

// even, odd = lanes 0, 2, 4, ... and 1, 3, 5, ... of the concatenation of a
// and b (L lanes each; V a GCC/Clang vector type of T).
template <typename T, typename V>
inline __attribute__((always_inline)) void split_vector(const V& a, const V& b, V& even, V& odd) {
  constexpr int L = sizeof(V) / sizeof(T);
#if defined(CONVCORE_HAVE_VECTOR_TYPES)
  using namespace simd;
  if constexpr (L == 16) {
    even = CONVCORE_SHUFFLE(i32x16, a, b, 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28,
                            30);
    odd = CONVCORE_SHUFFLE(i32x16, a, b, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29,
                           31);
  } else if constexpr (L == 8 && sizeof(T) == 4) {
    even = CONVCORE_SHUFFLE(i32x8, a, b, 0, 2, 4, 6, 8, 10, 12, 14);
    odd = CONVCORE_SHUFFLE(i32x8, a, b, 1, 3, 5, 7, 9, 11, 13, 15);
  } else if constexpr (L == 8) {
    even = CONVCORE_SHUFFLE(i64x8, a, b, 0, 2, 4, 6, 8, 10, 12, 14);
    odd = CONVCORE_SHUFFLE(i64x8, a, b, 1, 3, 5, 7, 9, 11, 13, 15);
  } else if constexpr (L == 4 && sizeof(T) == 4) {
    even = CONVCORE_SHUFFLE(i32x4, a, b, 0, 2, 4, 6);
    odd = CONVCORE_SHUFFLE(i32x4, a, b, 1, 3, 5, 7);
  } else if constexpr (L == 4) {
    even = CONVCORE_SHUFFLE(i64x4, a, b, 0, 2, 4, 6);
    odd = CONVCORE_SHUFFLE(i64x4, a, b, 1, 3, 5, 7);
  } else if constexpr (L == 2) {
    even = CONVCORE_SHUFFLE(i64x2, a, b, 0, 2);
    odd = CONVCORE_SHUFFLE(i64x2, a, b, 1, 3);
  } else
#endif
  {
    static_assert(L == 1, "no lane split for this vector");
    even = a;
    odd = b;
  }
}

// The inverse: lo, hi = a[0], b[0], a[1], b[1], ... (2L lanes in two).
template <typename T, typename V>
inline __attribute__((always_inline)) void join_vectors(const V& a, const V& b, V& lo, V& hi) {
  constexpr int L = sizeof(V) / sizeof(T);
#if defined(CONVCORE_HAVE_VECTOR_TYPES)
  using namespace simd;
  if constexpr (L == 16) {
    lo = CONVCORE_SHUFFLE(i32x16, a, b, 0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    hi = CONVCORE_SHUFFLE(i32x16, a, b, 8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30,
                          15, 31);
  } else if constexpr (L == 8 && sizeof(T) == 4) {
    lo = CONVCORE_SHUFFLE(i32x8, a, b, 0, 8, 1, 9, 2, 10, 3, 11);
    hi = CONVCORE_SHUFFLE(i32x8, a, b, 4, 12, 5, 13, 6, 14, 7, 15);
  } else if constexpr (L == 8) {
    lo = CONVCORE_SHUFFLE(i64x8, a, b, 0, 8, 1, 9, 2, 10, 3, 11);
    hi = CONVCORE_SHUFFLE(i64x8, a, b, 4, 12, 5, 13, 6, 14, 7, 15);
  } else if constexpr (L == 4 && sizeof(T) == 4) {
    lo = CONVCORE_SHUFFLE(i32x4, a, b, 0, 4, 1, 5);
    hi = CONVCORE_SHUFFLE(i32x4, a, b, 2, 6, 3, 7);
  } else if constexpr (L == 4) {
    lo = CONVCORE_SHUFFLE(i64x4, a, b, 0, 4, 1, 5);
    hi = CONVCORE_SHUFFLE(i64x4, a, b, 2, 6, 3, 7);
  } else if constexpr (L == 2) {
    lo = CONVCORE_SHUFFLE(i64x2, a, b, 0, 2);
    hi = CONVCORE_SHUFFLE(i64x2, a, b, 1, 3);
  } else
#endif
  {
    static_assert(L == 1, "no lane join for this vector");
    lo = a;
    hi = b;
  }
}

// even[k] = src[2k], odd[k] = src[2k + 1] for k < n (a row of a stride-2
// plane into its two column phases), in whole vectors: up to L - 1
// elements past n written, 2L - 2 past 2n read.
template <typename T, typename V>
inline __attribute__((always_inline)) void split_pairs_body(const T* src, int64_t n, T* even,
                                                            T* odd) {
  constexpr int L = sizeof(V) / sizeof(T);
  for (int64_t k = 0; k < n; k += L) {
    V a, b, e, o;
    simd::load_vec(a, src + 2 * k);
    simd::load_vec(b, src + 2 * k + L);
    split_vector<T>(a, b, e, o);
    simd::store_vec(even + k, e);
    simd::store_vec(odd + k, o);
  }
}

// The inverse: dst[2k] = even[k], dst[2k + 1] = odd[k] for k < n, in whole
// vectors (up to 2L - 2 elements past 2n written).
template <typename T, typename V>
inline __attribute__((always_inline)) void join_pairs_body(const T* even, const T* odd, int64_t n,
                                                           T* dst) {
  constexpr int L = sizeof(V) / sizeof(T);
  for (int64_t k = 0; k < n; k += L) {
    V e, o, lo, hi;
    simd::load_vec(e, even + k);
    simd::load_vec(o, odd + k);
    join_vectors<T>(e, o, lo, hi);
    simd::store_vec(dst + 2 * k, lo);
    simd::store_vec(dst + 2 * k + L, hi);
  }
}

// The flat kernels for one instruction set, picked with the GEMM's (so
// CONVCORE_ISA caps them too).
template <typename T>
struct FlatKernels {
  void (*correlate)(const T* src, const int64_t* off, const T* w, int64_t taps, bool accumulate,
                    T init, int64_t q0, int64_t q1, T* out);
  void (*tap_dots)(const T* a, const T* src, const int64_t* off, int64_t taps, int64_t n,
                   T* dots);
  void (*correlate_planes)(const T* src, int64_t src_step, int64_t cin, const int64_t* off,
                           const T* w, int64_t w_o, int64_t w_c, int64_t taps, const T* init,
                           int64_t nout, int64_t q0, int64_t q1, T* out, int64_t out_step);
  void (*split_pairs)(const T* src, int64_t n, T* even, T* odd);
  void (*join_pairs)(const T* even, const T* odd, int64_t n, T* dst);
};

#define CONVCORE_FLAT_KERNELS(T, NAME, TARGET, V, NV, NV_PLANES)                              \
  TARGET inline void correlate_##NAME(const T* src, const int64_t* off, const T* w,           \
                                      int64_t taps, bool accumulate, T init, int64_t q0,      \
                                      int64_t q1, T* out) {                                   \
    correlate_flat_body<T, V, NV>(src, off, w, taps, accumulate, init, q0, q1, out);          \
  }                                                                                           \
  TARGET inline void tap_dots_##NAME(const T* a, const T* src, const int64_t* off,            \
                                     int64_t taps, int64_t n, T* dots) {                      \
    tap_dots_body<T, V>(a, src, off, taps, n, dots);                                          \
  }                                                                                           \
  TARGET inline void correlate_planes_##NAME(                                                 \
      const T* src, int64_t src_step, int64_t cin, const int64_t* off, const T* w, int64_t w_o, \
      int64_t w_c, int64_t taps, const T* init, int64_t nout, int64_t q0, int64_t q1, T* out,  \
      int64_t out_step) {                                                                     \
    correlate_planes_body<T, V, NV_PLANES>(src, src_step, cin, off, w, w_o, w_c, taps, init,  \
                                           nout, q0, q1, out, out_step);                      \
  }                                                                                           \
  TARGET inline void split_pairs_##NAME(const T* src, int64_t n, T* even, T* odd) {           \
    split_pairs_body<T, V>(src, n, even, odd);                                                \
  }                                                                                           \
  TARGET inline void join_pairs_##NAME(const T* even, const T* odd, int64_t n, T* dst) {      \
    join_pairs_body<T, V>(even, odd, n, dst);                                                 \
  }
#if defined(CONVCORE_HAVE_VECTOR_TYPES)
// The portable level: 16-byte vectors, which every target GCC and Clang
// support lower to (SSE2 on any x86-64).
// (Four outputs at once by NV_PLANES vectors: 4 x 4 sums in registers with
// AVX-512's 32, 4 x 2 with the 16 of AVX2 and SSE.)
CONVCORE_FLAT_KERNELS(float, generic_f, , simd::f32x4, 4, 2)
CONVCORE_FLAT_KERNELS(double, generic_d, , simd::f64x2, 4, 2)
#else
CONVCORE_FLAT_KERNELS(float, generic_f, , float, 8, 2)
CONVCORE_FLAT_KERNELS(double, generic_d, , double, 8, 2)
#endif
#if defined(CONVCORE_HAVE_VECTOR_TYPES) && defined(__x86_64__)
#define CONVCORE_FLAT_X86 1
CONVCORE_FLAT_KERNELS(float, avx2_f, __attribute__((target("avx2,fma"))), simd::f32x8, 4, 2)
CONVCORE_FLAT_KERNELS(double, avx2_d, __attribute__((target("avx2,fma"))), simd::f64x4, 4, 2)
CONVCORE_FLAT_KERNELS(float, avx512_f, __attribute__((target("avx512f,fma"))), simd::f32x16, 4,
                      4)
CONVCORE_FLAT_KERNELS(double, avx512_d, __attribute__((target("avx512f,fma"))), simd::f64x8, 4,
                      4)
#endif
#undef CONVCORE_FLAT_KERNELS

template <typename T>
FlatKernels<T> flat_kernels() {
  constexpr bool f = std::is_same_v<T, float>;
#if defined(CONVCORE_FLAT_X86)
  const int level = gemm::isa_level();
  if (level == 2) {
    if constexpr (f) return {correlate_avx512_f, tap_dots_avx512_f, correlate_planes_avx512_f,
            split_pairs_avx512_f, join_pairs_avx512_f};
    else return {correlate_avx512_d, tap_dots_avx512_d, correlate_planes_avx512_d,
            split_pairs_avx512_d, join_pairs_avx512_d};
  }
  if (level == 1) {
    if constexpr (f) return {correlate_avx2_f, tap_dots_avx2_f, correlate_planes_avx2_f,
            split_pairs_avx2_f, join_pairs_avx2_f};
    else return {correlate_avx2_d, tap_dots_avx2_d, correlate_planes_avx2_d,
            split_pairs_avx2_d, join_pairs_avx2_d};
  }
#endif
  if constexpr (f) return {correlate_generic_f, tap_dots_generic_f, correlate_planes_generic_f,
            split_pairs_generic_f, join_pairs_generic_f};
  else return {correlate_generic_d, tap_dots_generic_d, correlate_planes_generic_d,
            split_pairs_generic_d, join_pairs_generic_d};
}

// Copies n elements src[0], src[step], ... to dst[0:n].
template <typename T>
inline void copy_strided(const T* src, int64_t step, int64_t n, T* dst) {
  if (step == 1) return copy_row(src, n, dst);
  for (int64_t k = 0; k < n; ++k) dst[k] = src[k * step];
}

// The row kernels (planes the flat kernels do not take).
// out (Ho x Wo) = bias + sum over taps of w[i, j] * the padded plane shifted.
template <typename T>
inline __attribute__((always_inline)) void forward_padded_body(const Plane& p, const T* buf, const T* w, T bias, T* out) {
  const int64_t Wp = p.Wp();
  for (int64_t oh = 0; oh < p.Ho; ++oh) {
    T* row = out + oh * p.Wo;
    std::fill(row, row + p.Wo, bias);
    for (int64_t i = 0; i < p.KH; ++i) {
      const T* br = buf + (oh * p.sh + i * p.dh) * Wp;
      for (int64_t j = 0; j < p.KW; ++j) {
        const T wv = w[i * p.KW + j];
        const T* src = br + j * p.dw;
        if (p.sw == 1)
          for (int64_t ow = 0; ow < p.Wo; ++ow) row[ow] += wv * src[ow];
        else
          for (int64_t ow = 0; ow < p.Wo; ++ow) row[ow] += wv * src[ow * p.sw];
      }
    }
  }
}

// gw[i, j] += sum over positions of gy * the padded plane shifted.
template <typename T>
inline __attribute__((always_inline)) void grad_weight_padded_body(const Plane& p, const T* gy, const T* buf, double* gw) {
  const int64_t Wp = p.Wp();
  for (int64_t i = 0; i < p.KH; ++i)
    for (int64_t j = 0; j < p.KW; ++j) {
      double acc = 0;
      for (int64_t oh = 0; oh < p.Ho; ++oh) {
        const T* gr = gy + oh * p.Wo;
        const T* src = buf + (oh * p.sh + i * p.dh) * Wp + j * p.dw;
        T dot = 0;
        if (p.sw == 1)  // 16 partial sums: a float sum in order does not vectorise
          dot = dot16(gr, src, p.Wo);
        else
          for (int64_t ow = 0; ow < p.Wo; ++ow) dot += gr[ow] * src[ow * p.sw];
        acc += dot;
      }
      gw[i * p.KW + j] += acc;
    }
}

// gbuf (Hp x Wp, accumulated into) += sum over taps of w * gy shifted; the
// caller copies the interior out.
template <typename T>
inline __attribute__((always_inline)) void grad_input_padded_body(const Plane& p, const T* gy, const T* w, T* gbuf) {
  const int64_t Wp = p.Wp();
  for (int64_t oh = 0; oh < p.Ho; ++oh) {
    const T* gr = gy + oh * p.Wo;
    for (int64_t i = 0; i < p.KH; ++i) {
      T* br = gbuf + (oh * p.sh + i * p.dh) * Wp;
      for (int64_t j = 0; j < p.KW; ++j) {
        const T wv = w[i * p.KW + j];
        T* dst = br + j * p.dw;
        if (p.sw == 1)
          for (int64_t ow = 0; ow < p.Wo; ++ow) dst[ow] += wv * gr[ow];
        else
          for (int64_t ow = 0; ow < p.Wo; ++ow) dst[ow * p.sw] += wv * gr[ow];
      }
    }
  }
}

// The row kernels for every instruction set level: their short rows gain
// most from wider vectors.
#define CONVCORE_DW_ROWS(T)                                                                  \
  CONVCORE_ISA_DISPATCH(forward_padded, forward_padded_body,                                 \
                        (const Plane& p, const T* buf, const T* w, T bias, T* out),          \
                        (p, buf, w, bias, out))                                              \
  CONVCORE_ISA_DISPATCH(grad_weight_padded, grad_weight_padded_body,                         \
                        (const Plane& p, const T* gy, const T* buf, double* gw),             \
                        (p, gy, buf, gw))                                                    \
  CONVCORE_ISA_DISPATCH(grad_input_padded, grad_input_padded_body,                           \
                        (const Plane& p, const T* gy, const T* w, T* gbuf), (p, gy, w, gbuf))
CONVCORE_DW_ROWS(float)
CONVCORE_DW_ROWS(double)
#undef CONVCORE_DW_ROWS

// What the plane-by-plane drivers share (read-only): the plane's geometry,
// whether it takes the flat kernels, those kernels' taps, and where the
// input's elements sit in the padded buffer (all worked out once per call:
// the divisions cost more than a small plane's arithmetic). The flat kernels
// take the taps phase by phase (row-major within a phase; for stride 1
// simply row-major), so that grad_input runs each phase plane over a
// contiguous range of them.
template <typename T>
struct PlaneOps {
  Plane p;
  bool flat;
  bool split;  // the buffer holds phase planes (flat and strided), else rows Wp apart
  FlatKernels<T> k;
  int64_t row_step;     // Wq, or Wp
  int64_t plane_step;   // one phase plane and its slack
  int64_t flat_length;  // Plane::flat_length
  std::vector<int64_t> order;        // the row-major index of each tap, in phase order
  std::vector<int64_t> off;          // tap t reads the padded input at q + off[t]
  std::vector<int64_t> back;         // grad_input gathers gy at q + back[t] (its phase plane's q)
  std::vector<int64_t> phase_first;  // phase f's taps: [phase_first[f], phase_first[f + 1])
  std::vector<int64_t> phase_q0, phase_q1;  // phase f's q that hold input rows
  int64_t max_local = 0;             // the largest -back[t]
  // A split plane is first padded into staging rows of stage_w = Wq * sw
  // (stage_rows = Hq * sh of them), then each row dealt to its phases.
  int64_t stage_w, stage_rows;
  explicit PlaneOps(const Plane& plane)
      : p(plane), flat(flat_applies(plane)), split(flat && plane.phases() > 1),
        k(flat_kernels<T>()), row_step(split ? p.Wq() : p.Wp()),
        plane_step(p.phase_stride()), flat_length(p.flat_length()),
        stage_w(split ? p.Wq() * p.sw : 0), stage_rows(split ? p.Hq() * p.sh : 0) {
    for (int64_t f = 0; f < p.phases(); ++f) {
      phase_first.push_back(static_cast<int64_t>(order.size()));
      for (int64_t i = 0; i < p.KH; ++i)
        for (int64_t j = 0; j < p.KW; ++j)
          if (p.tap_phase(i, j) == f) {
            order.push_back(i * p.KW + j);
            off.push_back(p.tap_offset(i, j));
            back.push_back(-p.tap_local(i, j));
            max_local = std::max(max_local, p.tap_local(i, j));
          }
      // Rows r of phase (a, b) hold padded row r * sh + a: input rows for
      // r * sh + a in [pt, pt + H).
      const int64_t a = f / p.sw;
      auto rows_below = [&](int64_t padded_row) {
        const int64_t n = padded_row - a;
        return n <= 0 ? 0 : std::min(p.Hq(), (n + p.sh - 1) / p.sh);
      };
      phase_q0.push_back(rows_below(p.pt) * row_step);
      phase_q1.push_back(rows_below(p.pt + p.H) * row_step);
    }
    phase_first.push_back(static_cast<int64_t>(order.size()));
  }
  int64_t padded() const { return p.phases() * plane_step; }
  // gy laid out row_step wide after max_local zeros (flat only), so that
  // the gather for grad_input reads zeros around it.
  int64_t gy_margin() const { return flat ? max_local : 0; }
  // The staging plane, then one staging row (split only).
  int64_t stage_size() const { return split ? stage_rows * stage_w + kFlatSlack : 0; }
  int64_t stage_row_size() const { return split ? stage_w + kFlatSlack : 0; }
  // gy planes laid out wide (flat only): one at a time for one input
  // plane, all of a group's at once for more; wide_step() apart.
  int64_t wide_planes(int64_t cin, int64_t cout) const { return flat ? (cin > 1 ? cout : 1) : 0; }
  int64_t wide_step() const { return gy_margin() + padded(); }
  // Planes of grad_input, which the forward's wide outputs (up to four)
  // use too.
  static int64_t grad_planes(int64_t cin, int64_t cout) {
    return std::max(cin, std::min<int64_t>(cout, 4));
  }
  // T elements of one thread's scratch: PlaneWork's buffers for a group of
  // cin input and cout output planes.
  int64_t scratch_size(int64_t cin, int64_t cout) const {
    return (cin + grad_planes(cin, cout)) * padded() + wide_planes(cin, cout) * wide_step() +
           p.taps() + cout * cin * p.taps() + stage_size() + stage_row_size();
  }
  // The input plane x (H x W at strides xs_h, xs_w) into the padded
  // buffer's interior; the padding stays as the caller left it: zeros (for
  // a split plane, in the staging plane).
  void pad_plane(const T* x, T* buf, T* stage) const {
    if (!split) {
      for (int64_t ih = 0; ih < p.H; ++ih)
        copy_strided(x + ih * p.xs_h, p.xs_w, p.W, buf + (ih + p.pt) * row_step + p.pl);
      return;
    }
    for (int64_t ih = 0; ih < p.H; ++ih)
      copy_strided(x + ih * p.xs_h, p.xs_w, p.W, stage + (ih + p.pt) * stage_w + p.pl);
    // Every row, in order: a row's whole-vector writes run into the next
    // row of its phases, which a later row rewrites.
    for (int64_t r = 0; r < stage_rows; ++r) {
      const T* src = stage + r * stage_w;
      T* dst = buf + r % p.sh * p.sw * plane_step + r / p.sh * row_step;
      if (p.sw == 2)
        k.split_pairs(src, row_step, dst, dst + plane_step);
      else
        for (int64_t b = 0; b < p.sw; ++b)
          for (int64_t c = 0; c < row_step; ++c) dst[b * plane_step + c] = src[c * p.sw + b];
    }
  }
  // The padded buffer's interior into gx (H x W, contiguous); `row` is
  // stage_row_size() elements of scratch.
  void store_interior(const T* buf, T* row, T* gx) const {
    for (int64_t ih = 0; ih < p.H; ++ih) {
      const int64_t r = ih + p.pt;
      if (!split) {
        copy_row(buf + r * row_step + p.pl, p.W, gx + ih * p.W);
        continue;
      }
      const T* src = buf + r % p.sh * p.sw * plane_step + r / p.sh * row_step;
      if (p.sw == 2)
        k.join_pairs(src, src + plane_step, row_step, row);
      else
        for (int64_t b = 0; b < p.sw; ++b)
          for (int64_t c = 0; c < row_step; ++c) row[c * p.sw + b] = src[b * plane_step + c];
      copy_row(row + p.pl, p.W, gx + ih * p.W);
    }
  }
};

// One thread's scratch and the steps of the drivers in conv_depthwise.cpp,
// for the cin input planes of one group of one image at a time (a
// depthwise layer: one). More than one plane takes the flat kernels.
template <typename T>
class PlaneWork {
 public:
  PlaneWork(const PlaneOps<T>& ops, int64_t cin, int64_t cout, T* scratch)
      : ops_(ops), cin_(cin), xbuf_(scratch), gbuf_(xbuf_ + cin * ops.padded()),
        gyz_(gbuf_ + PlaneOps<T>::grad_planes(cin, cout) * ops.padded()),
        dots_(gyz_ + ops.wide_planes(cin, cout) * ops.wide_step()),
        wtaps_(dots_ + ops.p.taps()), stage_(wtaps_ + cout * cin * ops.p.taps()),
        stage_row_(stage_ + ops.stage_size()) {
    // The inputs' padding, and the gaps between gy's rows and its margins,
    // stay zero from here on.
    std::fill(xbuf_, gbuf_, T(0));
    if (ops.flat) std::fill(gyz_, dots_, T(0));
    std::fill(stage_, stage_row_, T(0));
  }

  // Input plane c of the group: x (H x W at strides xs_h, xs_w), padded.
  void load_input(const T* x, int64_t c = 0) {
    ops_.pad_plane(x, xbuf_ + c * ops_.padded(), stage_);
  }

  // Output planes o < nout (Ho x Wo, out_step apart) = bias[o] (0 if bias
  // is null) + the loaded inputs correlated with w (nout x cin x taps).
  void forward(const T* w, const T* bias, int64_t nout, T* out, int64_t out_step) {
    const Plane& p = ops_.p;
    const int64_t taps = p.taps(), filter = cin_ * taps, padded = ops_.padded();
    if (!ops_.flat) {  // one input plane
      for (int64_t o = 0; o < nout; ++o)
        forward_padded(p, xbuf_, w + o * taps, bias ? bias[o] : T(0), out + o * out_step);
      return;
    }
    const T* wt = w;
    if (ops_.split) {
      for (int64_t k = 0; k < nout * cin_; ++k)
        for (int64_t t = 0; t < taps; ++t) wtaps_[k * taps + t] = w[k * taps + ops_.order[t]];
      wt = wtaps_;
      transposed_ = nullptr;
    }
    // Row_step wide into gbuf (free in the forward), then their Wo columns;
    // one plane's outputs one at a time (depthwise: correlate_planes is
    // 5-10% slower there), else four at a time.
    const int64_t step = ops_.row_step;
    if (cin_ == 1) {
      for (int64_t o = 0; o < nout; ++o) {
        ops_.k.correlate(xbuf_, ops_.off.data(), wt + o * taps, taps, false,
                         bias ? bias[o] : T(0), 0, ops_.flat_length, gbuf_);
        for (int64_t oh = 0; oh < p.Ho; ++oh)
          copy_row(gbuf_ + oh * step, p.Wo, out + o * out_step + oh * p.Wo);
      }
      return;
    }
    for (int64_t o0 = 0; o0 < nout; o0 += 4) {
      const int64_t m = std::min<int64_t>(4, nout - o0);
      ops_.k.correlate_planes(xbuf_, padded, cin_, ops_.off.data(), wt + o0 * filter, filter,
                              taps, taps, bias ? bias + o0 : nullptr, m, 0, ops_.flat_length,
                              gbuf_, padded);
      for (int64_t j = 0; j < m; ++j)
        for (int64_t oh = 0; oh < p.Ho; ++oh)
          copy_row(gbuf_ + j * padded + oh * step, p.Wo, out + (o0 + j) * out_step + oh * p.Wo);
    }
  }

  // One input plane (depthwise): adds one output channel's gradient gy (Ho x
  // Wo, contiguous), made with weights w (taps), into gw (taps, in double)
  // unless null, reading the loaded input, and into the grad_input plane if
  // with_grad_input (which the plane's first output channel starts afresh).
  void add_output_grad(const T* gy, const T* w, double* gw, bool with_grad_input, bool first) {
    const Plane& p = ops_.p;
    if (!ops_.flat) {
      if (gw) grad_weight_padded(p, gy, xbuf_, gw);
      if (with_grad_input && first) std::fill(gbuf_, gbuf_ + ops_.padded(), T(0));
      if (with_grad_input) grad_input_padded(p, gy, w, gbuf_);
      return;
    }
    const int64_t step = ops_.row_step, taps = p.taps();
    T* wide = gyz_ + ops_.gy_margin();
    for (int64_t oh = 0; oh < p.Ho; ++oh) copy_row(gy + oh * p.Wo, p.Wo, wide + oh * step);
    if (gw) {
      ops_.k.tap_dots(wide, xbuf_, ops_.off.data(), taps, ops_.flat_length, dots_);
      for (int64_t t = 0; t < taps; ++t) gw[ops_.order[t]] += dots_[t];
    }
    if (!with_grad_input) return;
    // Each phase plane from its own taps, over its rows that hold input.
    const T* wt = flat_taps(w);
    for (int64_t f = 0; f < p.phases(); ++f) {
      const int64_t t0 = ops_.phase_first[f], n = ops_.phase_first[f + 1] - t0;
      if (ops_.phase_q0[f] < ops_.phase_q1[f])
        ops_.k.correlate(wide, ops_.back.data() + t0, wt + t0, n, !first, T(0), ops_.phase_q0[f],
                         ops_.phase_q1[f], gbuf_ + f * ops_.plane_step);
    }
  }

  // A group's gradients (more than one input plane: flat), from its cout
  // output channels' gradients gy (Ho x Wo each, P apart) made with weights
  // w (cout x cin x taps): into gw (cout x cin x taps, in double) unless
  // null, reading the loaded inputs, and the grad_input planes if
  // with_grad_input. The same sums as add_output_grad's for each output.
  void add_group_grad(const T* gy, int64_t cout, int64_t P, const T* w, double* gw,
                      bool with_grad_input) {
    const Plane& p = ops_.p;
    const int64_t step = ops_.row_step, taps = p.taps(), wide_step = ops_.wide_step();
    T* wide = gyz_ + ops_.gy_margin();
    for (int64_t o = 0; o < cout; ++o)
      for (int64_t oh = 0; oh < p.Ho; ++oh)
        copy_row(gy + o * P + oh * p.Wo, p.Wo, wide + o * wide_step + oh * step);
    for (int64_t o = 0; gw && o < cout; ++o)
      for (int64_t c = 0; c < cin_; ++c) {
        ops_.k.tap_dots(wide + o * wide_step, xbuf_ + c * ops_.padded(), ops_.off.data(), taps,
                        ops_.flat_length, dots_);
        double* g = gw + (o * cin_ + c) * taps;
        for (int64_t t = 0; t < taps; ++t) g[ops_.order[t]] += dots_[t];
      }
    if (!with_grad_input) return;
    // The filters transposed (cin x cout x taps, taps in flat order), once
    // for all the images of a group; each phase plane of grad_input sums its
    // taps over the gy planes, four input planes at a time.
    if (w != transposed_) {
      for (int64_t c = 0; c < cin_; ++c)
        for (int64_t o = 0; o < cout; ++o)
          for (int64_t t = 0; t < taps; ++t)
            wtaps_[(c * cout + o) * taps + t] = w[(o * cin_ + c) * taps + ops_.order[t]];
      transposed_ = w;
    }
    for (int64_t f = 0; f < p.phases(); ++f) {
      const int64_t t0 = ops_.phase_first[f], n = ops_.phase_first[f + 1] - t0;
      if (ops_.phase_q0[f] < ops_.phase_q1[f])
        ops_.k.correlate_planes(wide, wide_step, cout, ops_.back.data() + t0, wtaps_ + t0,
                                cout * taps, taps, n, nullptr, cin_, ops_.phase_q0[f],
                                ops_.phase_q1[f], gbuf_ + f * ops_.plane_step, ops_.padded());
    }
  }

  // Grad_input plane c's interior into gx (H x W, contiguous).
  void store_grad_input(T* gx, int64_t c = 0) {
    ops_.store_interior(gbuf_ + c * ops_.padded(), stage_row_, gx);
  }

 private:
  // w (taps, row-major) in the flat kernels' tap order.
  const T* flat_taps(const T* w) {
    if (!ops_.split) return w;
    for (int64_t t = 0; t < ops_.p.taps(); ++t) wtaps_[t] = w[ops_.order[t]];
    transposed_ = nullptr;
    return wtaps_;
  }

  const PlaneOps<T>& ops_;
  int64_t cin_;
  T* xbuf_;   // the padded input planes
  T* gbuf_;   // the padded grad_input planes (the first: the forward's wide output)
  T* gyz_;    // gy planes row_step wide between zero margins (flat only)
  T* dots_;   // one plane's tap sums
  T* wtaps_;  // the weights in the flat kernels' tap order
  const T* transposed_ = nullptr;  // the group filters wtaps_ holds transposed
  T* stage_;      // the staging plane (split only)
  T* stage_row_;  // a staging row for grad_input (split only)
};

}  // namespace depthwise
}  // namespace convcore
