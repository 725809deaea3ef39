// Direct kernels for depthwise convolution (one input channel per group):
// a GEMM would have one row per output channel and nothing to block, so
// these loop over each plane with the kernel taps outside and the output
// row inside, which vectorises for stride 1.
#pragma once
#include <algorithm>
#include <cstdint>

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
};

// Stride-1 planes of up to kFlatMax padded elements run each tap as one loop
// over the flat padded plane (rows computed Wp wide, extra columns dropped)
// instead of a short loop per row and tap.
constexpr int64_t kFlatMax = 4096;
inline bool flat_applies(const Plane& p) {
  return p.sh == 1 && p.sw == 1 && p.Ho * p.Wp() <= kFlatMax;
}

// Lays out an output plane (Ho x Wo) Wp wide, zeros in the extra columns,
// for the flat stride-1 loops below; returns the flat length used.
template <typename T>
int64_t widen(const Plane& p, const T* gy, T* wide) {
  const int64_t Wp = p.Wp(), n = (p.Ho - 1) * Wp + p.Wo;
  std::fill(wide, wide + n, T(0));
  for (int64_t oh = 0; oh < p.Ho; ++oh)
    std::copy(gy + oh * p.Wo, gy + oh * p.Wo + p.Wo, wide + oh * Wp);
  return n;
}

// Copies one input plane into a zero-padded buffer (Hp x Wp, contiguous),
// so the kernels below run without bounds tests.
template <typename T>
void pad_plane(const Plane& p, const T* x, T* buf) {
  const int64_t Hp = p.Hp(), Wp = p.Wp();
  std::fill(buf, buf + Hp * Wp, T(0));
  for (int64_t ih = 0; ih < p.H; ++ih) {
    T* row = buf + (ih + p.pt) * Wp + p.pl;
    const T* src = x + ih * p.xs_h;
    if (p.xs_w == 1)
      std::copy(src, src + p.W, row);
    else
      for (int64_t iw = 0; iw < p.W; ++iw) row[iw] = src[iw * p.xs_w];
  }
}

// out (Ho x Wo) = bias + sum over taps of w[i, j] * the padded plane shifted.
template <typename T>
inline __attribute__((always_inline)) void forward_padded_body(const Plane& p, const T* buf, const T* w, T bias, T* out) {
  const int64_t Wp = p.Wp();
  if (flat_applies(p)) {
    // Stride 1, small plane: over the flat padded plane each tap is one
    // long loop (output rows computed Wp wide, the extra columns dropped),
    // instead of a short loop per row and tap.
    T wide[kFlatMax];
    const int64_t n = (p.Ho - 1) * Wp + p.Wo;
    std::fill(wide, wide + n, bias);
    for (int64_t i = 0; i < p.KH; ++i)
      for (int64_t j = 0; j < p.KW; ++j) {
        const T wv = w[i * p.KW + j];
        const T* src = buf + i * p.dh * Wp + j * p.dw;
        for (int64_t q = 0; q < n; ++q) wide[q] += wv * src[q];
      }
    for (int64_t oh = 0; oh < p.Ho; ++oh) copy_row(wide + oh * Wp, p.Wo, out + oh * p.Wo);
    return;
  }
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
  if (flat_applies(p)) {
    // gy laid out Wp wide with zeros in the extra columns: each tap's sum
    // is one dot product over the flat padded plane.
    T wide[kFlatMax];
    const int64_t n = widen(p, gy, wide);
    for (int64_t i = 0; i < p.KH; ++i)
      for (int64_t j = 0; j < p.KW; ++j) {
        const T* src = buf + i * p.dh * Wp + j * p.dw;
        gw[i * p.KW + j] += dot16(wide, src, n);
      }
    return;
  }
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
  if (flat_applies(p)) {
    // gy laid out Wp wide with zeros in the extra columns: each tap adds
    // into the flat padded plane in one long loop.
    T wide[kFlatMax];
    const int64_t n = widen(p, gy, wide);
    for (int64_t i = 0; i < p.KH; ++i)
      for (int64_t j = 0; j < p.KW; ++j) {
        const T wv = w[i * p.KW + j];
        T* dst = gbuf + i * p.dh * Wp + j * p.dw;
        for (int64_t q = 0; q < n; ++q) dst[q] += wv * wide[q];
      }
    return;
  }
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

// Output columns ow in [lo, hi) read input column ow * sw + off inside [0, W).
inline void valid_columns(const Plane& p, int64_t off, int64_t* lo, int64_t* hi) {
  detail::inside_range(off, p.sw, p.Wo, p.W, lo, hi);
}

// out (Ho x Wo, contiguous) = bias + sum over taps of w[i, j] * shifted x.
template <typename T>
void forward_plane(const Plane& p, const T* x, const T* w, T bias, T* out) {
  for (int64_t oh = 0; oh < p.Ho; ++oh) {
    T* row = out + oh * p.Wo;
    std::fill(row, row + p.Wo, bias);
    for (int64_t i = 0; i < p.KH; ++i) {
      const int64_t ih = oh * p.sh + i * p.dh - p.pt;
      if (ih < 0 || ih >= p.H) continue;
      const T* xr = x + ih * p.xs_h;
      for (int64_t j = 0; j < p.KW; ++j) {
        const int64_t off = j * p.dw - p.pl;
        int64_t lo, hi;
        valid_columns(p, off, &lo, &hi);
        const T wv = w[i * p.KW + j];
        if (p.sw == 1 && p.xs_w == 1) {
          const T* src = xr + off;
          for (int64_t ow = lo; ow < hi; ++ow) row[ow] += wv * src[ow];
        } else {
          for (int64_t ow = lo; ow < hi; ++ow) row[ow] += wv * xr[(ow * p.sw + off) * p.xs_w];
        }
      }
    }
  }
}

// gx (H x W, contiguous, accumulated into) += sum over taps of w * shifted gy.
template <typename T>
void grad_input_plane(const Plane& p, const T* gy, const T* w, T* gx) {
  for (int64_t oh = 0; oh < p.Ho; ++oh) {
    const T* gr = gy + oh * p.Wo;
    for (int64_t i = 0; i < p.KH; ++i) {
      const int64_t ih = oh * p.sh + i * p.dh - p.pt;
      if (ih < 0 || ih >= p.H) continue;
      T* xr = gx + ih * p.W;
      for (int64_t j = 0; j < p.KW; ++j) {
        const int64_t off = j * p.dw - p.pl;
        int64_t lo, hi;
        valid_columns(p, off, &lo, &hi);
        const T wv = w[i * p.KW + j];
        if (p.sw == 1) {
          T* dst = xr + off;
          for (int64_t ow = lo; ow < hi; ++ow) dst[ow] += wv * gr[ow];
        } else {
          for (int64_t ow = lo; ow < hi; ++ow) xr[ow * p.sw + off] += wv * gr[ow];
        }
      }
    }
  }
}

// gw[i, j] += sum over positions of gy * shifted x (each row's dot product in
// T, the running sums in double).
template <typename T>
void grad_weight_plane(const Plane& p, const T* gy, const T* x, double* gw) {
  for (int64_t oh = 0; oh < p.Ho; ++oh) {
    const T* gr = gy + oh * p.Wo;
    for (int64_t i = 0; i < p.KH; ++i) {
      const int64_t ih = oh * p.sh + i * p.dh - p.pt;
      if (ih < 0 || ih >= p.H) continue;
      const T* xr = x + ih * p.xs_h;
      for (int64_t j = 0; j < p.KW; ++j) {
        const int64_t off = j * p.dw - p.pl;
        int64_t lo, hi;
        valid_columns(p, off, &lo, &hi);
        T dot = 0;
        if (p.sw == 1 && p.xs_w == 1) {
          const T* src = xr + off;
          for (int64_t ow = lo; ow < hi; ++ow) dot += gr[ow] * src[ow];
        } else {
          for (int64_t ow = lo; ow < hi; ++ow) dot += gr[ow] * xr[(ow * p.sw + off) * p.xs_w];
        }
        gw[i * p.KW + j] += dot;
      }
    }
  }
}

// The plane kernels compiled for AVX-512, AVX2 and the baseline, picked by
// the CPU at load time (the build itself targets baseline x86-64): their
// short rows gain most from wider vectors.
#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__) && !defined(__clang__)
#define CONVCORE_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CONVCORE_CLONES
#endif

CONVCORE_CLONES inline void forward_padded(const Plane& p, const float* buf, const float* w,
                                           float bias, float* out) {
  forward_padded_body(p, buf, w, bias, out);
}
CONVCORE_CLONES inline void forward_padded(const Plane& p, const double* buf, const double* w,
                                           double bias, double* out) {
  forward_padded_body(p, buf, w, bias, out);
}
CONVCORE_CLONES inline void grad_weight_padded(const Plane& p, const float* gy, const float* buf,
                                               double* gw) {
  grad_weight_padded_body(p, gy, buf, gw);
}
CONVCORE_CLONES inline void grad_weight_padded(const Plane& p, const double* gy,
                                               const double* buf, double* gw) {
  grad_weight_padded_body(p, gy, buf, gw);
}
CONVCORE_CLONES inline void grad_input_padded(const Plane& p, const float* gy, const float* w,
                                              float* gbuf) {
  grad_input_padded_body(p, gy, w, gbuf);
}
CONVCORE_CLONES inline void grad_input_padded(const Plane& p, const double* gy, const double* w,
                                              double* gbuf) {
  grad_input_padded_body(p, gy, w, gbuf);
}

}  // namespace depthwise
}  // namespace convcore
