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

// dst[0:n] = src[0:n] for the short rows of small planes, in 16-element
// moves the compiler inlines (a loop or std::copy becomes a memmove call,
// which cost as much as the arithmetic on 14-wide rows).
template <typename T>
inline __attribute__((always_inline)) void copy_row(const T* src, int64_t n, T* dst) {
  int64_t q = 0;
  for (; q + 16 <= n; q += 16) __builtin_memcpy(dst + q, src + q, 16 * sizeof(T));
  for (; q < n; ++q) dst[q] = src[q];
}

struct Plane {
  int64_t H, W, Ho, Wo, KH, KW;
  int64_t sh, sw, dh, dw, pt, pl;
  int64_t xs_h, xs_w;  // strides of the input plane
  // The padded plane the windows read: rows Hp, columns Wp (only as much of
  // the padding as some window reaches).
  int64_t Hp() const { return std::max(H + pt, (Ho - 1) * sh + (KH - 1) * dh + 1); }
  int64_t Wp() const { return std::max(W + pl, (Wo - 1) * sw + (KW - 1) * dw + 1); }
  int64_t taps() const { return KH * KW; }
  // The flat form (stride 1): output (oh, ow) sits at q = oh * Wp + ow of a
  // plane Wp wide, and tap (i, j) reads the padded input at q + offset.
  int64_t flat_length() const { return (Ho - 1) * Wp() + Wo; }
  int64_t tap_offset(int64_t i, int64_t j) const { return i * dh * Wp() + j * dw; }
  int64_t max_tap_offset() const { return tap_offset(KH - 1, KW - 1); }
};

// Stride-1 planes of up to kFlatMax padded elements (64 KB in float: the
// three buffers of a thread stay in L2) run the flat kernels: each output
// computed Wp wide (the extra columns dropped), in blocks of vectors that
// sum all taps in registers. 112x112 planes (13K padded elements) ran
// 1.5-1.75x faster flat than on the row kernels (forward and backward,
// batch 16, alternating processes, 2-core Zen 3).
constexpr int64_t kFlatMax = 16384;
inline bool flat_applies(const Plane& p) {
  return p.sh == 1 && p.sw == 1 && p.Hp() * p.Wp() <= kFlatMax;
}
// The flat kernels run in whole blocks of up to kFlatSlack elements: every
// buffer they touch has that many elements past its end, zeros where read.
constexpr int64_t kFlatSlack = 64;

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

// The flat kernels for one instruction set, picked with the GEMM's (so
// CONVCORE_ISA caps them too).
template <typename T>
struct FlatKernels {
  void (*correlate)(const T* src, const int64_t* off, const T* w, int64_t taps, bool accumulate,
                    T init, int64_t q0, int64_t q1, T* out);
  void (*tap_dots)(const T* a, const T* src, const int64_t* off, int64_t taps, int64_t n,
                   T* dots);
};

#define CONVCORE_FLAT_KERNELS(T, NAME, TARGET, V, NV)                                         \
  TARGET inline void correlate_##NAME(const T* src, const int64_t* off, const T* w,           \
                                      int64_t taps, bool accumulate, T init, int64_t q0,      \
                                      int64_t q1, T* out) {                                   \
    correlate_flat_body<T, V, NV>(src, off, w, taps, accumulate, init, q0, q1, out);          \
  }                                                                                           \
  TARGET inline void tap_dots_##NAME(const T* a, const T* src, const int64_t* off,            \
                                     int64_t taps, int64_t n, T* dots) {                      \
    tap_dots_body<T, V>(a, src, off, taps, n, dots);                                          \
  }
#if defined(CONVCORE_HAVE_VECTOR_TYPES)
// The portable level: 16-byte vectors, which every target GCC and Clang
// support lower to (SSE2 on any x86-64).
CONVCORE_FLAT_KERNELS(float, generic_f, , simd::f32x4, 4)
CONVCORE_FLAT_KERNELS(double, generic_d, , simd::f64x2, 4)
#else
CONVCORE_FLAT_KERNELS(float, generic_f, , float, 8)
CONVCORE_FLAT_KERNELS(double, generic_d, , double, 8)
#endif
#if defined(CONVCORE_HAVE_VECTOR_TYPES) && defined(__x86_64__)
#define CONVCORE_FLAT_X86 1
CONVCORE_FLAT_KERNELS(float, avx2_f, __attribute__((target("avx2,fma"))), simd::f32x8, 4)
CONVCORE_FLAT_KERNELS(double, avx2_d, __attribute__((target("avx2,fma"))), simd::f64x4, 4)
CONVCORE_FLAT_KERNELS(float, avx512_f, __attribute__((target("avx512f,fma"))), simd::f32x16, 4)
CONVCORE_FLAT_KERNELS(double, avx512_d, __attribute__((target("avx512f,fma"))), simd::f64x8, 4)
#endif
#undef CONVCORE_FLAT_KERNELS

template <typename T>
FlatKernels<T> flat_kernels() {
  constexpr bool f = std::is_same_v<T, float>;
#if defined(CONVCORE_FLAT_X86)
  const int level = gemm::isa_level();
  if (level == 2) {
    if constexpr (f) return {correlate_avx512_f, tap_dots_avx512_f};
    else return {correlate_avx512_d, tap_dots_avx512_d};
  }
  if (level == 1) {
    if constexpr (f) return {correlate_avx2_f, tap_dots_avx2_f};
    else return {correlate_avx2_d, tap_dots_avx2_d};
  }
#endif
  if constexpr (f) return {correlate_generic_f, tap_dots_generic_f};
  else return {correlate_generic_d, tap_dots_generic_d};
}

// Copies one input plane into the interior of a padded buffer (Hp x Wp,
// contiguous, then kFlatSlack elements), whose padding the caller zeroed
// once: the kernels then run without bounds tests.
template <typename T>
void pad_plane(const Plane& p, const T* x, T* buf) {
  const int64_t Wp = p.Wp();
  for (int64_t ih = 0; ih < p.H; ++ih) {
    T* row = buf + (ih + p.pt) * Wp + p.pl;
    const T* src = x + ih * p.xs_h;
    if (p.xs_w == 1)
      copy_row(src, p.W, row);
    else
      for (int64_t iw = 0; iw < p.W; ++iw) row[iw] = src[iw * p.xs_w];
  }
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
// whether it takes the flat kernels, and those kernels' tap offsets.
template <typename T>
struct PlaneOps {
  Plane p;
  bool flat;
  FlatKernels<T> k;
  std::vector<int64_t> off;   // tap t reads the padded input at q + off[t]
  std::vector<int64_t> back;  // grad_input gathers gy at q + back[t] = q - off[t]

  explicit PlaneOps(const Plane& plane)
      : p(plane), flat(flat_applies(plane)), k(flat_kernels<T>()) {
    for (int64_t i = 0; i < p.KH; ++i)
      for (int64_t j = 0; j < p.KW; ++j) {
        off.push_back(p.tap_offset(i, j));
        back.push_back(-p.tap_offset(i, j));
      }
  }
  int64_t padded() const { return p.Hp() * p.Wp() + kFlatSlack; }
  // gy laid out Wp wide after max_tap_offset() zeros (flat only), so that
  // the gather for grad_input reads zeros around it.
  int64_t gy_margin() const { return flat ? p.max_tap_offset() : 0; }
  // T elements of one thread's scratch (PlaneWork's buffers).
  int64_t scratch_size() const {
    return 2 * padded() + (flat ? gy_margin() + padded() : 0) + p.taps();
  }
};

// One thread's scratch and the steps of the drivers in conv_depthwise.cpp, for one
// input plane (one channel of one image) at a time.
template <typename T>
class PlaneWork {
 public:
  PlaneWork(const PlaneOps<T>& ops, T* scratch)
      : ops_(ops), xbuf_(scratch), gbuf_(xbuf_ + ops.padded()),
        gyz_(gbuf_ + ops.padded()),
        dots_(gyz_ + (ops.flat ? ops.gy_margin() + ops.padded() : 0)) {
    // The input's padding, and the gaps between gy's rows and its margins,
    // stay zero from here on.
    std::fill(xbuf_, gbuf_, T(0));
    if (ops.flat) std::fill(gyz_, dots_, T(0));
  }

  // The input plane x (H x W at strides xs_h, xs_w), padded.
  void load_input(const T* x) { pad_plane(ops_.p, x, xbuf_); }

  // out (Ho x Wo) = bias + the loaded input correlated with w (taps).
  void forward(const T* w, T bias, T* out) {
    const Plane& p = ops_.p;
    if (!ops_.flat) return forward_padded(p, xbuf_, w, bias, out);
    // Outputs Wp wide into gbuf (free in the forward), then the Wo columns.
    const int64_t Wp = p.Wp();
    ops_.k.correlate(xbuf_, ops_.off.data(), w, p.taps(), false, bias, 0, p.flat_length(),
                     gbuf_);
    for (int64_t oh = 0; oh < p.Ho; ++oh) copy_row(gbuf_ + oh * Wp, p.Wo, out + oh * p.Wo);
  }

  // Adds one output channel's gradient gy (Ho x Wo, contiguous), made with
  // weights w: into gw (taps, in double) unless null, reading the loaded
  // input, and into the grad_input plane if with_grad_input (which the
  // first output channel of the plane starts afresh).
  void add_output_grad(const T* gy, const T* w, double* gw, bool with_grad_input, bool first) {
    const Plane& p = ops_.p;
    if (!ops_.flat) {
      if (gw) grad_weight_padded(p, gy, xbuf_, gw);
      if (with_grad_input && first) std::fill(gbuf_, gbuf_ + ops_.padded(), T(0));
      if (with_grad_input) grad_input_padded(p, gy, w, gbuf_);
      return;
    }
    const int64_t Wp = p.Wp(), taps = p.taps();
    T* wide = gyz_ + ops_.gy_margin();
    for (int64_t oh = 0; oh < p.Ho; ++oh) copy_row(gy + oh * p.Wo, p.Wo, wide + oh * Wp);
    if (gw) {
      ops_.k.tap_dots(wide, xbuf_, ops_.off.data(), taps, p.flat_length(), dots_);
      for (int64_t t = 0; t < taps; ++t) gw[t] += dots_[t];
    }
    if (with_grad_input)  // only the rows of the input plane (pt .. pt + H)
      ops_.k.correlate(wide, ops_.back.data(), w, taps, !first, T(0), p.pt * Wp,
                       (p.pt + p.H) * Wp, gbuf_);
  }

  // The grad_input plane's interior into gx (H x W, contiguous).
  void store_grad_input(T* gx) const {
    const Plane& p = ops_.p;
    const int64_t Wp = p.Wp();
    for (int64_t ih = 0; ih < p.H; ++ih)
      copy_row(gbuf_ + (ih + p.pt) * Wp + p.pl, p.W, gx + ih * p.W);
  }

 private:
  const PlaneOps<T>& ops_;
  T* xbuf_;  // the padded input plane
  T* gbuf_;  // the padded grad_input plane (the forward's wide output)
  T* gyz_;   // gy Wp wide between zero margins (flat only)
  T* dots_;  // one plane's tap sums
};

}  // namespace depthwise
}  // namespace convcore
