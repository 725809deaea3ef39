// The blocked-layout kernels other than the dense convolution (blocked.h):
// depthwise convolution, pooling, the elementwise output stages and the
// layout changes. Each loops over whole channel blocks with the B lanes
// innermost, so the compiler turns every lane loop into one vector
// operation; windows are clipped to the image (no padded copies).
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "blocked_kernels.h"
#include "strided.h"
#include "convcore/threading.h"
#include "gemm.h"

namespace convcore {
namespace blocked {

int block() { return gemm::isa_level() == 2 ? 16 : 8; }

const char* act_name(Act act) {
  switch (act) {
    case Act::None: return "none";
    case Act::ReLU: return "ReLU";
    case Act::ReLU6: return "ReLU6";
    case Act::Sigmoid: return "Sigmoid";
    case Act::SiLU: return "SiLU";
    case Act::Hardswish: return "Hardswish";
    case Act::Hardsigmoid: return "Hardsigmoid";
  }
  return "?";
}

int64_t image_size(int64_t c, int64_t h, int64_t w, bool is_blocked) {
  return (is_blocked ? round_up(c, block()) : c) * h * w;
}

namespace {

int64_t blocks_of(const Image& t, int64_t B) { return (t.c + B - 1) / B; }

// Bands of rows per plane: every thread has a few tasks (images x channel
// blocks x bands), and a batch smaller than the team has its images' rows
// split among the threads (as for_positions splits positions).
int64_t row_bands(const Image& out, int threads) {
  const int64_t planes = out.n * blocks_of(out, block()), want = 4 * static_cast<int64_t>(threads);
  const int64_t few = (want + planes - 1) / planes, own = (threads + out.n - 1) / out.n;
  return std::clamp<int64_t>(std::max(few, own), 1, out.h);
}

// --- depthwise convolution

// One output column whose window crosses the image's edge: the kernel
// columns [j_lo, j_hi) that fall inside, found first. (A loop that skipped
// the outside taps with `continue` was miscompiled by GCC 12 at -O3:
// versioning the loop for a unit dilation dropped taps.)
template <int B, Act A>
CONVCORE_ALWAYS_INLINE void depthwise_edge(const float* x, int64_t W, const float* w,
                                           int64_t kw, const Conv2dParams& p, Vec<B> b,
                                           int64_t ih0, int64_t i_lo, int64_t i_hi, int64_t ow,
                                           float* yr) {
  const int64_t iw0 = ow * p.stride_w - p.pad_left;
  int64_t j_lo = 0, j_hi = kw;
  while (j_lo < kw && iw0 + j_lo * p.dilation_w < 0) ++j_lo;
  while (j_hi > j_lo && iw0 + (j_hi - 1) * p.dilation_w >= W) --j_hi;
  Vec<B> acc = b;
  for (int64_t i = i_lo; i < i_hi; ++i) {
    const float* xr = x + (ih0 + i * p.dilation_h) * W * B;
    for (int64_t j = j_lo; j < j_hi; ++j)
      acc += load<B>(xr + (iw0 + j * p.dilation_w) * B) * load<B>(w + (i * kw + j) * B);
  }
  store<B>(yr + ow * B, apply<A>(acc));
}

// U output columns from ow, whose windows lie inside the image, in R rows
// from ih0 (rows row_step input floats and y_step output floats apart, every
// kernel row inside the image when R > 1): R x U independent accumulator
// chains.
template <int B, Act A, int KW, int SW, int U, int R = 1>
CONVCORE_ALWAYS_INLINE void depthwise_columns(const float* x, int64_t W, const float* w,
                                              int64_t kw_runtime, const Conv2dParams& p,
                                              Vec<B> b, int64_t ih0, int64_t i_lo, int64_t i_hi,
                                              int64_t ow, int64_t step, int64_t tap_step,
                                              float* yr, int64_t row_step = 0,
                                              int64_t y_step = 0) {
  const int64_t kw = KW > 0 ? KW : kw_runtime;
  Vec<B> acc[R][U];
#pragma GCC unroll 2
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int u = 0; u < U; ++u) acc[r][u] = b;
  const int64_t iw0 = ow * (SW > 0 ? SW : p.stride_w) - p.pad_left;
  for (int64_t i = i_lo; i < i_hi; ++i) {
    const float* xr = x + ((ih0 + i * p.dilation_h) * W + iw0) * B;
    const float* wr = w + i * kw * B;
#pragma GCC unroll 7
    for (int64_t j = 0; j < kw; ++j) {
      const Vec<B> wv = load<B>(wr + j * B);
      const float* xv = xr + j * tap_step;
#pragma GCC unroll 2
      for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
        for (int u = 0; u < U; ++u) acc[r][u] += load<B>(xv + r * row_step + u * step) * wv;
    }
  }
#pragma GCC unroll 2
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int u = 0; u < U; ++u) store<B>(yr + r * y_step + (ow + u) * B, apply<A>(acc[r][u]));
}

// The columns [ow_lo, ow_hi), whose windows lie inside the image, of output
// row oh. A short rest of columns is taken by one more block that ends at
// ow_hi and overlaps the block before (those columns are computed again, to
// the same values): one column at a time is a single chain of dependent
// FMAs, a quarter of the throughput (an 11-wide plane had 3 of 11 columns
// so). A rest of up to 4 takes a block of 4 (11 wide: 8 + 4 columns
// computed, not 8 + 8).
template <int B, Act A, int KW, int SW>
CONVCORE_ALWAYS_INLINE void depthwise_interior(const float* x, int64_t W, const float* w,
                                               int64_t kw, const Conv2dParams& p, Vec<B> b,
                                               int64_t ih0, int64_t i_lo, int64_t i_hi,
                                               int64_t ow_lo, int64_t ow_hi, float* yr) {
  const int64_t step = (SW > 0 ? SW : p.stride_w) * B;
  const int64_t tap_step = (SW > 0 ? 1 : p.dilation_w) * B;
#define CONVCORE_DW_BLOCK(U, at) \
  depthwise_columns<B, A, KW, SW, U>(x, W, w, kw, p, b, ih0, i_lo, i_hi, at, step, tap_step, yr)
  int64_t ow = ow_lo;
  for (; ow + 8 <= ow_hi; ow += 8) CONVCORE_DW_BLOCK(8, ow);
  if (ow_hi - ow > 4 && ow_hi - ow_lo >= 8) CONVCORE_DW_BLOCK(8, ow_hi - 8), ow = ow_hi;
  for (; ow + 4 <= ow_hi; ow += 4) CONVCORE_DW_BLOCK(4, ow);
  if (ow < ow_hi && ow_hi - ow_lo >= 4) CONVCORE_DW_BLOCK(4, ow_hi - 4), ow = ow_hi;
  for (; ow < ow_hi; ++ow) CONVCORE_DW_BLOCK(1, ow);
#undef CONVCORE_DW_BLOCK
}

// The same for two rows from ih0 whose kernel rows all lie inside: blocks
// of 4 columns of both rows, 8 accumulator chains (one row's 4 leave the
// FMA pipes waiting on their latency), each weight read once for both. Rows
// of fewer than 8 inside columns (a 7x7 plane) run so whole; wider ones
// (those whose inside columns end in a rest of 1 to 4: 11 columns are 8 +
// 4) take each row's blocks of 8 first, which have their 8 chains. (More
// kernel variants made the file's sanitizer build much slower.)
template <int B, Act A, int KW, int SW>
CONVCORE_ALWAYS_INLINE void depthwise_interior_pair(const float* x, int64_t W, const float* w,
                                                    int64_t kh, int64_t kw, const Conv2dParams& p,
                                                    Vec<B> b, int64_t ih0, int64_t ow_lo,
                                                    int64_t ow_hi, int64_t Wo, float* yr) {
  const int64_t step = (SW > 0 ? SW : p.stride_w) * B;
  const int64_t tap_step = (SW > 0 ? 1 : p.dilation_w) * B;
  const int64_t row_step = p.stride_h * W * B;
  int64_t ow = ow_lo;
  for (; ow + 8 <= ow_hi; ow += 8)  // wide rows only
    for (int r = 0; r < 2; ++r)
      depthwise_columns<B, A, KW, SW, 8>(x, W, w, kw, p, b, ih0 + r * p.stride_h, 0, kh, ow, step,
                                         tap_step, yr + r * Wo * B);
  for (; ow + 4 <= ow_hi; ow += 4)
    depthwise_columns<B, A, KW, SW, 4, 2>(x, W, w, kw, p, b, ih0, 0, kh, ow, step, tap_step, yr,
                                          row_step, Wo * B);
  if (ow < ow_hi && ow_hi - ow_lo >= 4)
    depthwise_columns<B, A, KW, SW, 4, 2>(x, W, w, kw, p, b, ih0, 0, kh, ow_hi - 4, step,
                                          tap_step, yr, row_step, Wo * B),
        ow = ow_hi;
  for (; ow < ow_hi; ++ow)
    for (int r = 0; r < 2; ++r)
      depthwise_columns<B, A, KW, SW, 1>(x, W, w, kw, p, b, ih0 + r * p.stride_h, 0, kh, ow, step,
                                         tap_step, yr + r * Wo * B);
}

// Output rows [oh0, oh1) of one channel block: every tap of the window that
// lies in the image, B lanes at a time. The columns whose window lies inside
// the image (most of them) run without bounds checks, U at a time: U
// independent accumulator chains keep both FMA pipes busy (4 left them
// waiting on the FMA latency); a narrow plane's rows (7 x 7) go two at a
// time (depthwise_interior_pair). KW > 0: the kernel width
// known at compile time (3, 5 and 7: MobileNet's, EfficientNet's and
// NASNet's), so the taps unroll, and SW > 0 the stride (1 or 2) with
// dilation 1, so the U columns' offsets are constants (runtime offsets
// spilled the registers).
template <int B, Act A, int KW, int SW>
CONVCORE_ALWAYS_INLINE void depthwise_rows_act(const float* x, int64_t H, int64_t W,
                                               const float* w, int64_t kh, int64_t kw_runtime,
                                               const Conv2dParams& p, const float* bias,
                                               int64_t oh0, int64_t oh1, int64_t Wo, float* y) {
  const int64_t kw = KW > 0 ? KW : kw_runtime;
  // columns whose whole window is inside: iw0 >= 0 and iw0 + (kw - 1) dw < W
  const int64_t span = (kw - 1) * p.dilation_w;
  int64_t ow_lo = (p.pad_left + p.stride_w - 1) / p.stride_w;
  int64_t ow_hi = W - span + p.pad_left <= 0 ? 0 : (W - span + p.pad_left - 1) / p.stride_w + 1;
  ow_lo = std::min(ow_lo, Wo);
  ow_hi = std::clamp(ow_hi, ow_lo, Wo);
  const Vec<B> b = bias ? load<B>(bias) : Vec<B>{};
  // output rows two at a time where both windows' rows lie inside and the
  // rows are narrow (depthwise_interior_pair)
  const int64_t reach_h = (kh - 1) * p.dilation_h;
  const bool narrow = ow_hi - ow_lo < 8;
  // a wide row that ends in a block of 4 (11 columns: 8 + 4) takes that
  // block for two rows at once: one row's 4 chains alone took as long as
  // the row's block of 8
  const int64_t rest = (ow_hi - ow_lo) % 8;
  const bool paired_tail = !narrow && rest > 0 && rest <= 4;
  for (int64_t oh = oh0; oh < oh1;) {
    const int64_t top = oh * p.stride_h - p.pad_top, next = top + p.stride_h;
    const int rows =
        (narrow || paired_tail) && oh + 1 < oh1 && top >= 0 && next + reach_h < H ? 2 : 1;
    for (int r = 0; r < rows; ++r) {
      const int64_t ih0 = top + r * p.stride_h;
      int64_t i_lo = 0, i_hi = kh;  // kernel rows inside the image
      while (i_lo < kh && ih0 + i_lo * p.dilation_h < 0) ++i_lo;
      while (i_hi > i_lo && ih0 + (i_hi - 1) * p.dilation_h >= H) --i_hi;
      float* yr = y + (oh + r) * Wo * B;
      for (int64_t ow = 0; ow < ow_lo; ++ow)
        depthwise_edge<B, A>(x, W, w, kw, p, b, ih0, i_lo, i_hi, ow, yr);
      for (int64_t ow = ow_hi; ow < Wo; ++ow)
        depthwise_edge<B, A>(x, W, w, kw, p, b, ih0, i_lo, i_hi, ow, yr);
      if (rows == 1)
        depthwise_interior<B, A, KW, SW>(x, W, w, kw, p, b, ih0, i_lo, i_hi, ow_lo, ow_hi, yr);
    }
    if (rows == 2)
      depthwise_interior_pair<B, A, KW, SW>(x, W, w, kh, kw, p, b, top, ow_lo, ow_hi, Wo,
                                            y + oh * Wo * B);
    oh += rows;
  }
}

template <int B, Act A>
CONVCORE_ALWAYS_INLINE void depthwise_rows_kw(const float* x, int64_t H, int64_t W,
                                              const float* w, int64_t kh, int64_t kw,
                                              const Conv2dParams& p, const float* bias,
                                              int64_t oh0, int64_t oh1, int64_t Wo, float* y) {
  const bool plain = p.dilation_w == 1 && (p.stride_w == 1 || p.stride_w == 2);
  if (plain && kw == 3 && p.stride_w == 1)
    depthwise_rows_act<B, A, 3, 1>(x, H, W, w, kh, kw, p, bias, oh0, oh1, Wo, y);
  else if (plain && kw == 3)
    depthwise_rows_act<B, A, 3, 2>(x, H, W, w, kh, kw, p, bias, oh0, oh1, Wo, y);
  else if (plain && kw == 5 && p.stride_w == 1)
    depthwise_rows_act<B, A, 5, 1>(x, H, W, w, kh, kw, p, bias, oh0, oh1, Wo, y);
  else if (plain && kw == 5)
    depthwise_rows_act<B, A, 5, 2>(x, H, W, w, kh, kw, p, bias, oh0, oh1, Wo, y);
  else if (plain && kw == 7 && p.stride_w == 1)
    depthwise_rows_act<B, A, 7, 1>(x, H, W, w, kh, kw, p, bias, oh0, oh1, Wo, y);
  else if (plain && kw == 7)
    depthwise_rows_act<B, A, 7, 2>(x, H, W, w, kh, kw, p, bias, oh0, oh1, Wo, y);
  else
    depthwise_rows_act<B, A, 0, 0>(x, H, W, w, kh, kw, p, bias, oh0, oh1, Wo, y);
}

template <int B>
CONVCORE_ALWAYS_INLINE void depthwise_rows_body(const float* x, int64_t H, int64_t W,
                                                const float* w, int64_t kh, int64_t kw,
                                                const Conv2dParams& p, const float* bias,
                                                int64_t oh0, int64_t oh1, int64_t Wo, float* y,
                                                Act act) {
  CONVCORE_ACT_SWITCH(act, depthwise_rows_kw, B, x, H, W, w, kh, kw, p, bias, oh0, oh1, Wo, y)
}

CONVCORE_BLOCKED_DISPATCH(depthwise_rows, depthwise_rows_body,
                          (const float* x, int64_t H, int64_t W, const float* w, int64_t kh,
                           int64_t kw, const Conv2dParams& p, const float* bias, int64_t oh0,
                           int64_t oh1, int64_t Wo, float* y, Act act),
                          (x, H, W, w, kh, kw, p, bias, oh0, oh1, Wo, y, act))

// --- pooling: one channel block's plane each

template <int B>
CONVCORE_ALWAYS_INLINE void max_pool_plane_body(const float* x, int64_t H, int64_t W,
                                                const Pool2dParams& p, int64_t oh0, int64_t oh1,
                                                int64_t Wo, float* y) {
  typedef int32_t Bits __attribute__((vector_size(B * sizeof(float))));
  for (int64_t oh = oh0; oh < oh1; ++oh) {
    // the window's rows inside the image (ranges, as depthwise_edge)
    const int64_t ih0 = oh * p.stride_h - p.pad_h;
    int64_t i_lo = 0, i_hi = p.kernel_h;
    while (i_lo < i_hi && ih0 + i_lo * p.dilation_h < 0) ++i_lo;
    while (i_hi > i_lo && ih0 + (i_hi - 1) * p.dilation_h >= H) --i_hi;
    for (int64_t ow = 0; ow < Wo; ++ow) {
      const int64_t iw0 = ow * p.stride_w - p.pad_w;
      int64_t j_lo = 0, j_hi = p.kernel_w;
      if (p.dilation_w == 1) {  // the common case, without a loop per position
        j_lo = std::max<int64_t>(0, -iw0);
        j_hi = std::max(j_lo, std::min<int64_t>(p.kernel_w, W - iw0));
      } else {
        while (j_lo < j_hi && iw0 + j_lo * p.dilation_w < 0) ++j_lo;
        while (j_hi > j_lo && iw0 + (j_hi - 1) * p.dilation_w >= W) --j_hi;
      }
      // A NaN wins, as in PyTorch's max pooling. The running max is one
      // single-compare select (vmaxps), and NaNs are tracked apart as the
      // largest magnitude bits (NaN: above inf's 0x7f800000): a select with
      // a compound or unordered condition on 16-lane vectors is scalarised
      // by GCC in a body compiled outside the AVX-512 target.
      Vec<B> m = splat<B>(-std::numeric_limits<float>::infinity());
      Bits nan_bits = Bits{};
      for (int64_t i = i_lo; i < i_hi; ++i) {
        const float* row = x + ((ih0 + i * p.dilation_h) * W + iw0) * B;
        for (int64_t j = j_lo; j < j_hi; ++j) {
          const Vec<B> v = load<B>(row + j * p.dilation_w * B);
          m = v > m ? v : m;
          Bits b;
          std::memcpy(&b, &v, sizeof b);
          b &= 0x7fffffff;
          nan_bits = b > nan_bits ? b : nan_bits;
        }
      }
      m = nan_bits > 0x7f800000 ? splat<B>(std::numeric_limits<float>::quiet_NaN()) : m;
      store<B>(y + (oh * Wo + ow) * B, m);
    }
  }
}

CONVCORE_BLOCKED_DISPATCH(max_pool_plane, max_pool_plane_body,
                          (const float* x, int64_t H, int64_t W, const Pool2dParams& p,
                           int64_t oh0, int64_t oh1, int64_t Wo, float* y),
                          (x, H, W, p, oh0, oh1, Wo, y))

// PyTorch's average-pool window (shapes.h). Windows of up to kFloatSumTaps
// taps are summed in float, in two chains (a sum in double, with two
// conversions and a double division per position, made NASNet's small
// pools a large share of its time), larger ones in double as the plain op
// does (a float sum of a large window stops growing).
constexpr int64_t kFloatSumTaps = 64;

template <int B>
CONVCORE_ALWAYS_INLINE void avg_pool_plane_body(const float* x, int64_t H, int64_t W,
                                                const Pool2dParams& p, int64_t oh0, int64_t oh1,
                                                int64_t Wo, float* y) {
  const bool in_float = p.kernel_h * p.kernel_w <= kFloatSumTaps;
  for (int64_t oh = oh0; oh < oh1; ++oh)
    for (int64_t ow = 0; ow < Wo; ++ow) {
      const AvgPoolWindow win = avg_pool_window(H, W, p, oh, ow);
      const int64_t h0 = win.h0, h1 = win.h1, w0 = win.w0, w1 = win.w1, divisor = win.divisor;
      Vec<B> mean;
      if (in_float) {
        Vec<B> s0{}, s1{};
        for (int64_t ih = h0; ih < h1; ++ih) {
          const float* row = x + ih * W * B;
          int64_t iw = w0;
          for (; iw + 2 <= w1; iw += 2) {
            s0 += load<B>(row + iw * B);
            s1 += load<B>(row + (iw + 1) * B);
          }
          if (iw < w1) s0 += load<B>(row + iw * B);
        }
        mean = (s0 + s1) / splat<B>(static_cast<float>(divisor != 0 ? divisor : 1));
      } else {
        WideVec<B> s{};
        for (int64_t ih = h0; ih < h1; ++ih)
          for (int64_t iw = w0; iw < w1; ++iw)
            s += __builtin_convertvector(load<B>(x + (ih * W + iw) * B), WideVec<B>);
        mean = __builtin_convertvector(s / double(divisor != 0 ? divisor : 1), Vec<B>);
      }
      store<B>(y + (oh * Wo + ow) * B, divisor != 0 ? mean : Vec<B>{});
    }
}

CONVCORE_BLOCKED_DISPATCH(avg_pool_plane, avg_pool_plane_body,
                          (const float* x, int64_t H, int64_t W, const Pool2dParams& p,
                           int64_t oh0, int64_t oh1, int64_t Wo, float* y),
                          (x, H, W, p, oh0, oh1, Wo, y))

// The mean of each lane over hw positions: runs of 64 positions summed in
// float by four independent chains (one chain waited on the add latency at
// every position: squeeze-and-excitation's pools were 5x slower than
// ONNX Runtime's), the runs summed in double (a float sum of a large plane
// stops growing).
template <int B>
CONVCORE_ALWAYS_INLINE void global_avg_plane_body(const float* x, int64_t hw, float* y) {
  WideVec<B> s{};
  for (int64_t q0 = 0; q0 < hw; q0 += 64) {
    const int64_t q1 = std::min(hw, q0 + 64);
    Vec<B> a0{}, a1{}, a2{}, a3{};
    int64_t q = q0;
    for (; q + 4 <= q1; q += 4) {
      a0 += load<B>(x + q * B);
      a1 += load<B>(x + (q + 1) * B);
      a2 += load<B>(x + (q + 2) * B);
      a3 += load<B>(x + (q + 3) * B);
    }
    for (; q < q1; ++q) a0 += load<B>(x + q * B);
    s += __builtin_convertvector((a0 + a1) + (a2 + a3), WideVec<B>);
  }
  store<B>(y, __builtin_convertvector(s / double(hw), Vec<B>));
}

CONVCORE_BLOCKED_DISPATCH(global_avg_plane, global_avg_plane_body,
                          (const float* x, int64_t hw, float* y), (x, hw, y))

// --- elementwise, over runs of whole vectors

template <int B, Act A>
CONVCORE_ALWAYS_INLINE void add_run_act(const float* const* x, int k, int64_t n, float* y) {
  for (int64_t i = 0; i < n; i += B) {
    Vec<B> v = load<B>(x[0] + i) + load<B>(x[1] + i);
    for (int j = 2; j < k; ++j) v += load<B>(x[j] + i);
    store<B>(y + i, apply<A>(v));
  }
}

template <int B>
CONVCORE_ALWAYS_INLINE void add_run_body(const float* const* x, int k, int64_t n, float* y,
                                         Act act) {
  CONVCORE_ACT_SWITCH(act, add_run_act, B, x, k, n, y)
}

CONVCORE_BLOCKED_DISPATCH(add_run, add_run_body,
                          (const float* const* x, int k, int64_t n, float* y, Act act),
                          (x, k, n, y, act))

// y = x * s over n floats: s elementwise, or (broadcast) one vector of B
// lanes for the whole run (a channel block's gates).
template <int B>
CONVCORE_ALWAYS_INLINE void mul_run_body(const float* x, const float* s, bool broadcast,
                                         int64_t n, float* y) {
  if (!broadcast) {
    for (int64_t i = 0; i < n; i += B) store<B>(y + i, load<B>(x + i) * load<B>(s + i));
    return;
  }
  const Vec<B> g = load<B>(s);
  for (int64_t i = 0; i < n; i += B) store<B>(y + i, load<B>(x + i) * g);
}

CONVCORE_BLOCKED_DISPATCH(mul_run, mul_run_body,
                          (const float* x, const float* s, bool broadcast, int64_t n, float* y),
                          (x, s, broadcast, n, y))

template <int B, Act A>
CONVCORE_ALWAYS_INLINE void affine_run_act(const float* x, const float* scale,
                                           const float* shift, int64_t hw, float* y) {
  const Vec<B> m = scale ? load<B>(scale) : splat<B>(1.0f);
  const Vec<B> k = shift ? load<B>(shift) : Vec<B>{};
  for (int64_t q = 0; q < hw; ++q) store<B>(y + q * B, apply<A>(load<B>(x + q * B) * m + k));
}

template <int B>
CONVCORE_ALWAYS_INLINE void affine_run_body(const float* x, const float* scale,
                                            const float* shift, int64_t hw, float* y, Act act) {
  CONVCORE_ACT_SWITCH(act, affine_run_act, B, x, scale, shift, hw, y)
}

CONVCORE_BLOCKED_DISPATCH(affine_run, affine_run_body,
                          (const float* x, const float* scale, const float* shift, int64_t hw,
                           float* y, Act act),
                          (x, scale, shift, hw, y, act))

// --- layout changes, one channel block's plane each

template <int B>
CONVCORE_ALWAYS_INLINE void to_blocked_plane_body(const float* x, int64_t hw, int64_t lanes,
                                                  float* y) {
  int64_t q0 = 0;
  for (; q0 + B <= hw; q0 += B) {  // B positions of B channels: one transpose
    Vec<B> r[B];
#pragma GCC unroll 16
    for (int l = 0; l < B; ++l) r[l] = l < lanes ? load<B>(x + l * hw + q0) : Vec<B>{};
    transpose<B>(r);
#pragma GCC unroll 16
    for (int i = 0; i < B; ++i) store<B>(y + (q0 + i) * B, r[i]);
  }
  for (int64_t q = q0; q < hw; ++q)
    for (int l = 0; l < B; ++l) y[q * B + l] = l < lanes ? x[l * hw + q] : 0.0f;
}

CONVCORE_BLOCKED_DISPATCH(to_blocked_plane, to_blocked_plane_body,
                          (const float* x, int64_t hw, int64_t lanes, float* y),
                          (x, hw, lanes, y))

template <int B>
CONVCORE_ALWAYS_INLINE void to_plain_plane_body(const float* x, int64_t hw, int64_t lanes,
                                                float* y) {
  int64_t q0 = 0;
  for (; q0 + B <= hw; q0 += B) {
    Vec<B> r[B];
#pragma GCC unroll 16
    for (int i = 0; i < B; ++i) r[i] = load<B>(x + (q0 + i) * B);
    transpose<B>(r);
#pragma GCC unroll 16
    for (int l = 0; l < B; ++l)
      if (l < lanes) store<B>(y + l * hw + q0, r[l]);
  }
  for (int64_t l = 0; l < lanes; ++l)
    for (int64_t q = q0; q < hw; ++q) y[l * hw + q] = x[q * B + l];
}

CONVCORE_BLOCKED_DISPATCH(to_plain_plane, to_plain_plane_body,
                          (const float* x, int64_t hw, int64_t lanes, float* y),
                          (x, hw, lanes, y))

// Calls f(image, q_begin, q_end) over ranges of every image's positions,
// each range for all channel blocks, enough ranges for the threads: a deep
// layer's image at batch 1 is split by positions too. The convolutions split
// a small batch by positions as well (blocked_conv.cpp), so a thread reads
// the positions it wrote: a line written by the other core costs several
// times a local one, to read and to write again.
template <typename F>
void for_positions(const Image& t, int threads, F&& f) {
  const int64_t hw = t.h * t.w, floats = image_size(t.c, t.h, t.w, t.blocked);
  const int64_t per = std::clamp<int64_t>((4 * threads + t.n - 1) / t.n, 1,
                                          std::max<int64_t>(1, std::min(hw, floats / 4096)));
  const int64_t len = (hw + per - 1) / per;
  detail::parallel_for(threads, t.n * per, [&](int64_t k) {
    const int64_t begin = (k % per) * len, end = std::min(hw, begin + len);
    if (begin < end) f(k / per, begin, end);
  });
}

// Calls f(image, channel block, oh_begin, oh_end) over row_bands' bands of
// output rows of every plane of `out`, an image's bands before its planes:
// a thread keeps to its rows of every channel (as for_positions). The rows
// of all (image, band, block) in that order are shared evenly, a contiguous
// range each thread, so a band may be split between two threads: 7 rows in
// bands of 4 and 3 left one of two threads 4/7 of the work.
template <typename F>
void for_row_bands(const Image& out, int threads, F&& f) {
  const int64_t cb = blocks_of(out, block());
  const int64_t bands = row_bands(out, threads);
  const int64_t band = (out.h + bands - 1) / bands;
  const int64_t image_rows = out.h * cb, total = out.n * image_rows;
  const int team = static_cast<int>(std::min<int64_t>(threads, total));
  detail::parallel_for(team, team, [&](int64_t k) {
    const int64_t end = total * (k + 1) / team;
    for (int64_t u = total * k / team; u < end;) {
      // row u: in image n, band oh0 / band (the bands before it full),
      // plane c of that band's len rows
      const int64_t n = u / image_rows, v = u % image_rows;
      const int64_t oh0 = v / (band * cb) * band;
      const int64_t len = std::min(out.h, oh0 + band) - oh0;
      const int64_t c = (v - oh0 * cb) / len, row = oh0 + (v - oh0 * cb) % len;
      const int64_t take = std::min(oh0 + len - row, end - u);
      f(n, c, row, row + take);
      u += take;
    }
  });
}

// Calls f(image, channel block) for every plane of t, in parallel.
template <typename F>
void for_planes(const Image& t, int threads, F&& f) {
  const int64_t cb = blocks_of(t, block());
  detail::parallel_for(threads, t.n * cb, [&](int64_t pl) { f(pl / cb, pl % cb); });
}

}  // namespace

std::vector<float> pack_depthwise_weights(const float* weight, int64_t c, int64_t kh,
                                          int64_t kw) {
  const int64_t B = block();
  std::vector<float> packed(static_cast<std::size_t>(round_up(c, B) * kh * kw), 0.0f);
  for (int64_t ch = 0; ch < c; ++ch)
    for (int64_t t = 0; t < kh * kw; ++t)
      packed[static_cast<std::size_t>(((ch / B) * kh * kw + t) * B + ch % B)] =
          weight[ch * kh * kw + t];
  return packed;
}

void depthwise_conv2d(const Image& in, const float* packed, int64_t kh, int64_t kw,
                      const Conv2dParams& p, const Epilogue& e, const Image& out, int threads) {
  const int64_t B = block();
  // A small image is mostly edge columns (7x7 with a 5x5 kernel: all of
  // them), which run one column at a time: each task then pads its rows of
  // the plane into a frame on the stack, where every window lies inside.
  const int64_t hp = in.h + p.pad_top + p.pad_bottom, wp = in.w + p.pad_left + p.pad_right;
  constexpr int64_t kFrameFloats = 8192;
  const bool framed = out.w < 16 && hp * wp * B <= kFrameFloats &&
                      (p.pad_top || p.pad_bottom || p.pad_left || p.pad_right);
  Conv2dParams unpadded = p;
  unpadded.pad_top = unpadded.pad_bottom = unpadded.pad_left = unpadded.pad_right = 0;
  for_row_bands(out, threads, [&](int64_t n, int64_t c, int64_t oh0, int64_t oh1) {
    const float* x = in.data + n * in.image_stride + c * in.h * in.w * B;
    float* y = out.data + n * out.image_stride + c * out.h * out.w * B;
    const float* w = packed + c * kh * kw * B;
    const float* bias = e.bias ? e.bias + c * B : nullptr;
    if (framed) {
      // only the rows the band's windows read: the other rows of the plane
      // were written by the other core (the steps before split by rows too)
      alignas(64) float frame[kFrameFloats];
      const int64_t r0 = oh0 * p.stride_h;
      const int64_t r1 = std::min(hp, (oh1 - 1) * p.stride_h + (kh - 1) * p.dilation_h + 1);
      pad_plane(x, in.h, in.w, p.pad_top - r0, p.pad_left, r1 - r0, wp, B, frame);
      depthwise_rows(frame, r1 - r0, wp, w, kh, kw, unpadded, bias, 0, oh1 - oh0, out.w,
                     y + oh0 * out.w * B, e.act);
    } else {
      depthwise_rows(x, in.h, in.w, w, kh, kw, p, bias, oh0, oh1, out.w, y, e.act);
    }
  });
}

namespace {

// The padded plane a task's windows read: every window lies inside it.
int64_t frame_h(int64_t h, const Conv2dParams& p) { return h + p.pad_top + p.pad_bottom; }
int64_t frame_w(int64_t w, const Conv2dParams& p) { return w + p.pad_left + p.pad_right; }

// B channel planes of x (lanes of them real) into the blocked frame, zeros
// in the pad lanes; zeros in the padding too unless the frame holds them
// already (pad false: a frame whose padding no task writes).
template <int B>
CONVCORE_ALWAYS_INLINE void plain_to_frame_body(const float* x, const int64_t* xs, int64_t lanes,
                                                int64_t h, int64_t w, const Conv2dParams& p,
                                                float* frame, bool pad = true) {
  const int64_t hp = frame_h(h, p), wp = frame_w(w, p);
  // zeros where the copy below writes nothing, the padding (it writes the
  // pad lanes' zeros itself): a small plane's frame is mostly interior
  if (pad) {
    std::fill(frame, frame + p.pad_top * wp * B, 0.0f);
    std::fill(frame + (p.pad_top + h) * wp * B, frame + hp * wp * B, 0.0f);
    for (int64_t row = p.pad_top; row < p.pad_top + h; ++row) {
      std::fill(frame + row * wp * B, frame + (row * wp + p.pad_left) * B, 0.0f);
      std::fill(frame + (row * wp + p.pad_left + w) * B, frame + (row + 1) * wp * B, 0.0f);
    }
  }
  auto at = [&](int64_t row, int64_t col) {
    return frame + ((row + p.pad_top) * wp + p.pad_left + col) * B;
  };
  if (xs[3] == 1 && xs[2] == w) {
    // contiguous planes, often narrower than B (14 x 14, 7 x 7): B positions
    // of the flattened plane at a time, across row ends
    int64_t q0 = 0, row = 0, col = 0;
    for (; q0 + B <= h * w; q0 += B) {
      Vec<B> r[B];
#pragma GCC unroll 16
      for (int l = 0; l < B; ++l) r[l] = l < lanes ? load<B>(x + l * xs[1] + q0) : Vec<B>{};
      transpose<B>(r);
      for (int i = 0; i < B; ++i) {
        store<B>(at(row, col), r[i]);
        if (++col == w) col = 0, ++row;
      }
    }
    for (; q0 < h * w; ++q0) {
      for (int64_t l = 0; l < B; ++l) at(row, col)[l] = l < lanes ? x[l * xs[1] + q0] : 0.0f;
      if (++col == w) col = 0, ++row;
    }
    return;
  }
  for (int64_t row = 0; row < h; ++row) {
    const float* src = x + row * xs[2];
    float* dst = frame + ((row + p.pad_top) * wp + p.pad_left) * B;
    int64_t col = 0;
    if (xs[3] == 1)
      for (; col + B <= w; col += B) {  // B columns of B channels: one transpose
        Vec<B> r[B];
#pragma GCC unroll 16
        for (int l = 0; l < B; ++l) r[l] = l < lanes ? load<B>(src + l * xs[1] + col) : Vec<B>{};
        transpose<B>(r);
#pragma GCC unroll 16
        for (int i = 0; i < B; ++i) store<B>(dst + (col + i) * B, r[i]);
      }
    for (; col < w; ++col)
      for (int64_t l = 0; l < B; ++l)
        dst[col * B + l] = l < lanes ? src[l * xs[1] + col * xs[3]] : 0.0f;
  }
}

CONVCORE_BLOCKED_DISPATCH(plain_to_frame, plain_to_frame_body,
                          (const float* x, const int64_t* xs, int64_t lanes, int64_t h, int64_t w,
                           const Conv2dParams& p, float* frame, bool pad),
                          (x, xs, lanes, h, w, p, frame, pad))

// The frame's interior (h x w positions of B channels, at the frame's
// padding) back to `lanes` contiguous channel planes of y (h * w apart): B
// positions of the flattened plane at a time, across row ends, as
// plain_to_frame reads them.
template <int B>
CONVCORE_ALWAYS_INLINE void frame_to_plain_body(const float* frame, int64_t h, int64_t w,
                                                const Conv2dParams& p, int64_t lanes, float* y) {
  const int64_t wp = frame_w(w, p), hw = h * w;
  auto at = [&](int64_t row, int64_t col) {
    return frame + ((row + p.pad_top) * wp + p.pad_left + col) * B;
  };
  int64_t q0 = 0, row = 0, col = 0;
  for (; q0 + B <= hw; q0 += B) {
    Vec<B> r[B];
    for (int i = 0; i < B; ++i) {
      r[i] = load<B>(at(row, col));
      if (++col == w) col = 0, ++row;
    }
    transpose<B>(r);
#pragma GCC unroll 16
    for (int l = 0; l < B; ++l)
      if (l < lanes) store<B>(y + l * hw + q0, r[l]);
  }
  for (; q0 < hw; ++q0) {
    for (int64_t l = 0; l < lanes; ++l) y[l * hw + q0] = at(row, col)[l];
    if (++col == w) col = 0, ++row;
  }
}

// grad_weight's sums of one image's B channels: for each tap, the sum over
// output positions of gy * the input the tap met there (x: the input's
// padded frame, hp x wp; gy: ho x wo, both blocked), into sums[tap * B ..]
// as doubles. KW > 0: the kernel's width at compile time, its sums in
// registers (two sets, even and odd columns, for more chains in flight).
template <int B, int KW>
CONVCORE_ALWAYS_INLINE void depthwise_tap_sums(const float* x, int64_t wp, const float* gy,
                                               int64_t ho, int64_t wo, int64_t kh, int64_t kw_rt,
                                               const Conv2dParams& p, double* sums) {
  const int64_t kw = KW > 0 ? KW : kw_rt;
  const int64_t sh = p.stride_h, sw = p.stride_w, dh = p.dilation_h, dw = p.dilation_w;
  for (int64_t ky = 0; ky < kh; ++ky) {
    if constexpr (KW > 0) {
      Vec<B> even[KW], odd[KW];
#pragma GCC unroll 8
      for (int kx = 0; kx < KW; ++kx) even[kx] = odd[kx] = Vec<B>{};
      for (int64_t oy = 0; oy < ho; ++oy) {
        const float* xr = x + (oy * sh + ky * dh) * wp * B;
        const float* g = gy + oy * wo * B;
        int64_t ox = 0;
        for (; ox + 2 <= wo; ox += 2) {
          const Vec<B> g0 = load<B>(g + ox * B), g1 = load<B>(g + (ox + 1) * B);
#pragma GCC unroll 8
          for (int kx = 0; kx < KW; ++kx) {
            even[kx] += g0 * load<B>(xr + (ox * sw + kx * dw) * B);
            odd[kx] += g1 * load<B>(xr + ((ox + 1) * sw + kx * dw) * B);
          }
        }
        if (ox < wo) {
          const Vec<B> g0 = load<B>(g + ox * B);
#pragma GCC unroll 8
          for (int kx = 0; kx < KW; ++kx) even[kx] += g0 * load<B>(xr + (ox * sw + kx * dw) * B);
        }
      }
#pragma GCC unroll 8
      for (int kx = 0; kx < KW; ++kx) {
        const Vec<B> sum = even[kx] + odd[kx];
        for (int l = 0; l < B; ++l) sums[(ky * KW + kx) * B + l] = sum[l];
      }
    } else {
      for (int64_t kx = 0; kx < kw; ++kx) {
        Vec<B> acc{};
        for (int64_t oy = 0; oy < ho; ++oy) {
          const float* xr = x + (oy * sh + ky * dh) * wp * B;
          const float* g = gy + oy * wo * B;
          for (int64_t ox = 0; ox < wo; ++ox)
            acc += load<B>(g + ox * B) * load<B>(xr + (ox * sw + kx * dw) * B);
        }
        for (int l = 0; l < B; ++l) sums[(ky * kw + kx) * B + l] = acc[l];
      }
    }
  }
}

// grad_input's frame (hp x wp, zeroed first) += each output position's gy
// times each tap's weight, at the input position the tap read. A tap at a
// time along a row: its positions are distinct, so no update waits on the
// one before (taps inside the loop over positions updated each input
// position in a chain of loads after stores).
template <int B>
CONVCORE_ALWAYS_INLINE void depthwise_scatter(const float* gy, int64_t ho, int64_t wo,
                                              const float* w, int64_t kh, int64_t kw,
                                              const Conv2dParams& p, int64_t hp, int64_t wp,
                                              float* frame) {
  std::fill(frame, frame + hp * wp * B, 0.0f);
  const int64_t sh = p.stride_h, sw = p.stride_w, dh = p.dilation_h, dw = p.dilation_w;
  for (int64_t oy = 0; oy < ho; ++oy)
    for (int64_t ky = 0; ky < kh; ++ky) {
      float* row = frame + (oy * sh + ky * dh) * wp * B;
      const float* g = gy + oy * wo * B;
      for (int64_t kx = 0; kx < kw; ++kx) {
        const Vec<B> wv = load<B>(w + (ky * kw + kx) * B);
        float* at = row + kx * dw * B;
        for (int64_t ox = 0; ox < wo; ++ox) {
          float* dst = at + ox * sw * B;
          store<B>(dst, load<B>(dst) + load<B>(g + ox * B) * wv);
        }
      }
    }
}

// The correlation that gives a stride-1 layer's grad_input: gy, padded so
// that each input position's window holds the outputs that read it, with
// the kernel turned half a turn. None (false) when the layer's padding
// exceeds its kernel's reach, which the scatter takes.
bool grad_input_as_correlation(int64_t kh, int64_t kw, const Conv2dParams& p,
                               Conv2dParams* out) {
  if (p.stride_h != 1 || p.stride_w != 1) return false;
  const int64_t reach_h = (kh - 1) * p.dilation_h, reach_w = (kw - 1) * p.dilation_w;
  if (p.pad_top > reach_h || p.pad_bottom > reach_h || p.pad_left > reach_w ||
      p.pad_right > reach_w)
    return false;
  if (out) {
    *out = p;
    out->pad_top = reach_h - p.pad_top, out->pad_bottom = reach_h - p.pad_bottom;
    out->pad_left = reach_w - p.pad_left, out->pad_right = reach_w - p.pad_right;
  }
  return true;
}

// One task of depthwise_backward_plain: B channels (lanes of them real) of
// one image. scratch: the gy block (ho x wo), then one frame, the input's
// for grad_weight and then grad_input's (or its blocked result: h x w fits
// in the padded frame). turned: the block's weights turned half a turn, for
// grad_input as a correlation (stride 1), else null: a scatter.
template <int B>
CONVCORE_ALWAYS_INLINE void depthwise_backward_body(
    const float* x, const int64_t* xs, int64_t lanes, int64_t h, int64_t w, const float* wpk,
    const float* turned, int64_t kh, int64_t kw, const Conv2dParams& p, const float* gy,
    int64_t ho, int64_t wo, float* gx, double* sums, float* scratch) {
  const int64_t hp = frame_h(h, p), wp = frame_w(w, p);
  float* gyb = scratch;
  float* frame = scratch + ho * wo * B;
  to_blocked_plane_body<B>(gy, ho * wo, lanes, gyb);
  if (sums) {
    plain_to_frame_body<B>(x, xs, lanes, h, w, p, frame);  // windows start at its origin
    switch (kw) {
      case 3: depthwise_tap_sums<B, 3>(frame, wp, gyb, ho, wo, kh, kw, p, sums); break;
      case 5: depthwise_tap_sums<B, 5>(frame, wp, gyb, ho, wo, kh, kw, p, sums); break;
      case 7: depthwise_tap_sums<B, 7>(frame, wp, gyb, ho, wo, kh, kw, p, sums); break;
      default: depthwise_tap_sums<B, 0>(frame, wp, gyb, ho, wo, kh, kw, p, sums); break;
    }
    Vec<B> bias{};
    for (int64_t q = 0; q < ho * wo; ++q) bias += load<B>(gyb + q * B);
    for (int l = 0; l < B; ++l) sums[kh * kw * B + l] = bias[l];
  }
  Conv2dParams back;
  if (gx && turned && grad_input_as_correlation(kh, kw, p, &back)) {
    depthwise_rows_body<B>(gyb, ho, wo, turned, kh, kw, back, nullptr, 0, h, w, frame, Act::None);
    to_plain_plane_body<B>(frame, h * w, lanes, gx);
  } else if (gx) {
    depthwise_scatter<B>(gyb, ho, wo, wpk, kh, kw, p, hp, wp, frame);
    frame_to_plain_body<B>(frame, h, w, p, lanes, gx);
  }
}

CONVCORE_BLOCKED_DISPATCH(depthwise_backward_task, depthwise_backward_body,
                          (const float* x, const int64_t* xs, int64_t lanes, int64_t h, int64_t w,
                           const float* wpk, const float* turned, int64_t kh, int64_t kw,
                           const Conv2dParams& p, const float* gy, int64_t ho, int64_t wo,
                           float* gx, double* sums, float* scratch),
                          (x, xs, lanes, h, w, wpk, turned, kh, kw, p, gy, ho, wo, gx, sums,
                           scratch))

}  // namespace

int64_t depthwise_plain_scratch(int64_t h, int64_t w, const Conv2dParams& p, int64_t ho,
                                int64_t wo) {
  return (frame_h(h, p) * frame_w(w, p) + ho * wo) * block();
}

void depthwise_conv2d_plain(const float* x, const int64_t* xs, int64_t n, int64_t c, int64_t h,
                            int64_t w, const float* packed, int64_t kh, int64_t kw,
                            const Conv2dParams& p, const float* bias, float* y, int64_t ho,
                            int64_t wo, float* scratch, int threads) {
  const int64_t B = block(), cb = (c + B - 1) / B;
  const int64_t hp = frame_h(h, p), wp = frame_w(w, p);
  const int64_t per_thread = depthwise_plain_scratch(h, w, p, ho, wo);
  Conv2dParams unpadded = p;
  unpadded.pad_top = unpadded.pad_bottom = unpadded.pad_left = unpadded.pad_right = 0;
  // a region of its own (not parallel_for, which runs a single thread's
  // share inline): each thread's scratch is found by its number in the team
#pragma omp parallel num_threads(threads)
  {
    float* frame = scratch + omp_get_thread_num() * per_thread;
    float* result = frame + hp * wp * B;
    // the padding once: the tasks write only the interior
    std::fill(frame, frame + hp * wp * B, 0.0f);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < n * cb; ++t) {
      const int64_t i = t / cb, c0 = (t % cb) * B, lanes = std::min(B, c - c0);
      alignas(64) float lane_bias[16] = {};
      if (bias) std::copy(bias + c0, bias + c0 + lanes, lane_bias);
      plain_to_frame(x + i * xs[0] + c0 * xs[1], xs, lanes, h, w, p, frame, false);
      depthwise_rows(frame, hp, wp, packed + (c0 / B) * kh * kw * B, kh, kw, unpadded,
                     bias ? lane_bias : nullptr, 0, ho, wo, result, Act::None);
      to_plain_plane(result, ho * wo, lanes, y + (i * c + c0) * ho * wo);
    }
  }
}

void depthwise_backward_plain(const float* x, const int64_t* xs, int64_t n, int64_t c,
                              int64_t h, int64_t w, const float* packed, int64_t kh, int64_t kw,
                              const Conv2dParams& p, const float* gy, int64_t ho, int64_t wo,
                              float* gx, double* sums, float* scratch, int threads) {
  const int64_t B = block(), cb = (c + B - 1) / B, taps = kh * kw;
  const int64_t per_thread = depthwise_plain_scratch(h, w, p, ho, wo);
  // (a block's taps in reverse order are its kernel turned half a turn)
  std::vector<float> turned;
  if (gx && grad_input_as_correlation(kh, kw, p, nullptr)) {
    turned.resize(static_cast<std::size_t>(cb * taps * B));
    for (int64_t b = 0; b < cb; ++b)
      for (int64_t t = 0; t < taps; ++t)
        std::copy(packed + (b * taps + t) * B, packed + (b * taps + t + 1) * B,
                  turned.data() + (b * taps + taps - 1 - t) * B);
  }
#pragma omp parallel num_threads(threads)
  {
    float* mine = scratch + omp_get_thread_num() * per_thread;
#pragma omp for schedule(static)
    for (int64_t t = 0; t < n * cb; ++t) {
      const int64_t i = t / cb, c0 = (t % cb) * B, lanes = std::min(B, c - c0);
      depthwise_backward_task(x + i * xs[0] + c0 * xs[1], xs, lanes, h, w,
                              packed + (c0 / B) * taps * B,
                              turned.empty() ? nullptr : turned.data() + (c0 / B) * taps * B, kh,
                              kw, p, gy + (i * c + c0) * ho * wo, ho, wo,
                              gx ? gx + (i * c + c0) * h * w : nullptr,
                              sums ? sums + t * (taps + 1) * B : nullptr, mine);
    }
  }
}

void max_pool2d(const Image& in, const Pool2dParams& p, const Image& out, int threads) {
  const int64_t B = block();
  for_row_bands(out, threads, [&](int64_t n, int64_t c, int64_t oh0, int64_t oh1) {
    max_pool_plane(in.data + n * in.image_stride + c * in.h * in.w * B, in.h, in.w, p, oh0, oh1,
                   out.w, out.data + n * out.image_stride + c * out.h * out.w * B);
  });
}

void avg_pool2d(const Image& in, const Pool2dParams& p, const Image& out, int threads) {
  const int64_t B = block();
  for_row_bands(out, threads, [&](int64_t n, int64_t c, int64_t oh0, int64_t oh1) {
    avg_pool_plane(in.data + n * in.image_stride + c * in.h * in.w * B, in.h, in.w, p, oh0, oh1,
                   out.w, out.data + n * out.image_stride + c * out.h * out.w * B);
  });
}

void copy_channels(const Image& x, const Image& out, int64_t channel0, int threads) {
  const int64_t B = block(), hw = x.h * x.w, xb = blocks_of(x, B);
  // Tasks: (image, block of x, range of positions), at least 4 per thread;
  // they write disjoint lanes (of shared cache lines at worst).
  const int64_t parts = std::clamp<int64_t>((4 * threads + x.n * xb - 1) / (x.n * xb), 1, hw);
  detail::parallel_for(threads, x.n * xb * parts, [&](int64_t t) {
    const int64_t n = t / (xb * parts), b = t / parts % xb, part = t % parts;
    const int64_t lanes = std::min(B, x.c - b * B);
    const int64_t q0 = hw * part / parts, q1 = hw * (part + 1) / parts;
    const float* src = x.data + n * x.image_stride + b * hw * B;
    float* image = out.data + n * out.image_stride;
    // The block's lanes go to at most two blocks of out, position by
    // position: lanes [0, first) from lane `shift` of one, the rest from
    // lane 0 of the next (lane by lane, every position's line was written
    // once per lane).
    const int64_t oc0 = channel0 + b * B, shift = oc0 % B, first = std::min(lanes, B - shift);
    float* d0 = image + (oc0 / B) * hw * B + shift;
    float* d1 = lanes > first ? image + (oc0 / B + 1) * hw * B : nullptr;
    for (int64_t q = q0; q < q1; ++q) {
      const float* s = src + q * B;
      std::copy(s, s + first, d0 + q * B);
      if (d1) std::copy(s + first, s + lanes, d1 + q * B);
    }
  });
}

void clear_pad_lanes(const Image& out, int threads) {
  const int64_t B = block(), hw = out.h * out.w, used = out.c % B;
  if (used == 0) return;
  const int64_t last = blocks_of(out, B) - 1;
  detail::parallel_for(threads, out.n, [&](int64_t n) {
    float* plane = out.data + n * out.image_stride + last * hw * B;
    for (int64_t q = 0; q < hw; ++q) std::fill(plane + q * B + used, plane + (q + 1) * B, 0.0f);
  });
}

void global_avg_pool(const Image& in, const Image& out, int threads) {
  const int64_t B = block(), hw = in.h * in.w;
  for_planes(in, threads, [&](int64_t n, int64_t c) {
    global_avg_plane(in.data + n * in.image_stride + c * hw * B, hw,
                     out.data + n * out.image_stride + c * B);
  });
}

void add(const std::vector<Image>& in, Act act, const Image& out, int threads) {
  const int64_t B = block(), hw = out.h * out.w, cb = blocks_of(out, B);
  for_positions(out, threads, [&](int64_t n, int64_t q0, int64_t q1) {
    const float* x[16];
    std::vector<const float*> many;
    const float** xs = x;
    if (in.size() > 16) {
      many.resize(in.size());
      xs = many.data();
    }
    for (int64_t c = 0; c < cb; ++c) {
      const int64_t at = (c * hw + q0) * B;
      for (std::size_t k = 0; k < in.size(); ++k) xs[k] = in[k].data + n * in[k].image_stride + at;
      add_run(xs, static_cast<int>(in.size()), (q1 - q0) * B, out.data + n * out.image_stride + at,
              act);
    }
  });
}

void mul(const Image& x, const Image& s, const Image& out, int threads) {
  const int64_t B = block(), hw = x.h * x.w, cb = blocks_of(x, B);
  const bool per_channel = s.h == 1 && s.w == 1 && hw != 1;
  for_positions(out, threads, [&](int64_t n, int64_t q0, int64_t q1) {
    for (int64_t c = 0; c < cb; ++c) {
      const int64_t at = (c * hw + q0) * B;
      const float* sv = s.data + n * s.image_stride + (per_channel ? c * B : at);
      mul_run(x.data + n * x.image_stride + at, sv, per_channel, (q1 - q0) * B,
              out.data + n * out.image_stride + at);
    }
  });
}

void affine(const Image& x, const float* scale, const float* shift, Act act, const Image& out,
            int threads) {
  const int64_t B = block(), hw = x.h * x.w, cb = blocks_of(x, B);
  for_positions(out, threads, [&](int64_t n, int64_t q0, int64_t q1) {
    for (int64_t c = 0; c < cb; ++c) {
      const int64_t at = (c * hw + q0) * B;
      affine_run(x.data + n * x.image_stride + at, scale ? scale + c * B : nullptr,
                 shift ? shift + c * B : nullptr, q1 - q0, out.data + n * out.image_stride + at,
                 act);
    }
  });
}

void copy(const Image& x, const Image& out, int threads) {
  const int64_t lanes = x.blocked ? block() : 1, hw = x.h * x.w;
  const int64_t planes = x.blocked ? blocks_of(x, lanes) : x.c;
  for_positions(x, threads, [&](int64_t n, int64_t q0, int64_t q1) {
    for (int64_t c = 0; c < planes; ++c) {
      const int64_t at = (c * hw + q0) * lanes;
      std::memcpy(out.data + n * out.image_stride + at, x.data + n * x.image_stride + at,
                  static_cast<std::size_t>((q1 - q0) * lanes) * sizeof(float));
    }
  });
}

void to_blocked(const Image& plain, const Image& out, int threads) {
  const int64_t B = block(), hw = plain.h * plain.w;
  for_planes(plain, threads, [&](int64_t n, int64_t c) {
    to_blocked_plane(plain.data + n * plain.image_stride + c * B * hw, hw,
                     std::min<int64_t>(B, plain.c - c * B), out.data + n * out.image_stride + c * B * hw);
  });
}

void to_plain(const Image& in, const Image& plain, int threads) {
  const int64_t B = block(), hw = in.h * in.w;
  for_planes(in, threads, [&](int64_t n, int64_t c) {
    to_plain_plane(in.data + n * in.image_stride + c * B * hw, hw,
                   std::min<int64_t>(B, in.c - c * B), plain.data + n * plain.image_stride + c * B * hw);
  });
}

}  // namespace blocked
}  // namespace convcore
