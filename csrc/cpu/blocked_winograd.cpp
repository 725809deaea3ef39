// Winograd F(m x m, 3x3) convolution in the blocked layout (blocked.h), for
// the compiled engine's 3x3, stride-1 layers: the transforms of
// conv_winograd.h (one definition of B^T, A^T and G) applied to vectors of B
// channels, which the blocked layout holds at each position.
//
// Per task (an image and a band of tiles):
//   1. each tile's (m+2) x (m+2) patch of input vectors -> V = B^T d B,
//      stored V[xi][tile][channel] (a row per tile);
//   2. for each of the (m+2)^2 points xi, M[xi] (tiles x Cout) = V[xi]
//      (tiles x Cin) * U[xi] (Cin x Cout), with gemm::strided_rows_kernel
//      reading V's rows in place and U packed once in panels of NR output
//      channels;
//      each tile of the product lands where the output transform reads it;
//   3. each tile's M vectors -> Y = A^T M A, plus bias and residual, the
//      activation, stored in the output blocks.
// F(4x4) does 4x fewer multiplications than direct convolution, F(2x2)
// 2.25x; the transforms cost memory passes, so the engine takes Winograd
// where the images are large enough (engine.cpp).
#include <omp.h>

#include <algorithm>
#include <cstring>
#include <type_traits>

#include "blocked.h"
#include "blocked_kernels.h"
#include "conv_winograd.h"
#include "gemm.h"
#include "strided.h"

namespace convcore {
namespace blocked {

namespace {

constexpr int MR = gemm::Tile<float>::MR, NR = gemm::Tile<float>::NR;
// The most tiles a task transforms at once: its V and M matrices
// ((m+2)^2 x tiles x channels each) are then a few hundred KB for 64
// channels.
constexpr int64_t kBandTiles = 48;
// Transformed filters this small stay in L2 while a thread runs band after band.
constexpr int64_t kSmallFilterBytes = int64_t(1) << 20;
// Transformed filters this large (F(2x2) of 1024 x 512 channels: 32 MB) do
// not stay in an L3 of 32 MB shared with the rest of the net: a band holds
// an image, or several small ones, of up to kMostBandTiles in all (two
// 13 x 13 outputs' 49 tiles in F(2x2), six 7 x 7 outputs' 16).
constexpr int64_t kLargeFilterBytes = int64_t(24) << 20;
constexpr int64_t kMostBandTiles = 112;

// The input transform of tiles [t0, t1) of a band: V[xi][t - t0][c].
template <int M, int B>
CONVCORE_ALWAYS_INLINE void input_tiles_body(const float* x, int64_t H, int64_t W,
                                             int64_t cblocks, int64_t tiles_w, int64_t pad_top,
                                             int64_t pad_left, int64_t t0, int64_t t1,
                                             int64_t band, int64_t cin_pad, float* v) {
  using WV = winograd::Variant<M>;
  constexpr int A = WV::kTile;
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t ih0 = (t / tiles_w) * M - pad_top, iw0 = (t % tiles_w) * M - pad_left;
    const bool inside = ih0 >= 0 && iw0 >= 0 && ih0 + A <= H && iw0 + A <= W;
    for (int64_t cb = 0; cb < cblocks; ++cb) {
      const float* plane = x + cb * H * W * B;
      Vec<B> d[A][A];
#pragma GCC unroll 8
      for (int i = 0; i < A; ++i)
#pragma GCC unroll 8
        for (int j = 0; j < A; ++j) {
          const int64_t ih = ih0 + i, iw = iw0 + j;
          d[i][j] = inside || (ih >= 0 && ih < H && iw >= 0 && iw < W)
                        ? load<B>(plane + (ih * W + iw) * B)
                        : Vec<B>{};
        }
      Vec<B> cols[A][A];  // B^T applied to each column, then to each row
#pragma GCC unroll 8
      for (int j = 0; j < A; ++j) {
        Vec<B> c[A];
#pragma GCC unroll 8
        for (int k = 0; k < A; ++k) c[k] = d[k][j];
        WV::input(c, cols[j]);
      }
      float* out = v + (t - t0) * cin_pad + cb * B;
#pragma GCC unroll 8
      for (int i = 0; i < A; ++i) {
        Vec<B> r[A], q[A];
#pragma GCC unroll 8
        for (int j = 0; j < A; ++j) r[j] = cols[j][i];
        WV::input(r, q);
#pragma GCC unroll 8
        for (int j = 0; j < A; ++j) store<B>(out + (i * A + j) * band * cin_pad, q[j]);
      }
    }
  }
}

template <int B>
CONVCORE_ALWAYS_INLINE void input_tiles_dispatch_body(int m, const float* x, int64_t H, int64_t W,
                                                      int64_t cblocks, int64_t tiles_w,
                                                      int64_t pad_top, int64_t pad_left,
                                                      int64_t t0, int64_t t1, int64_t band,
                                                      int64_t cin_pad, float* v) {
  if (m == 4)
    input_tiles_body<4, B>(x, H, W, cblocks, tiles_w, pad_top, pad_left, t0, t1, band, cin_pad, v);
  else
    input_tiles_body<2, B>(x, H, W, cblocks, tiles_w, pad_top, pad_left, t0, t1, band, cin_pad, v);
}

CONVCORE_BLOCKED_DISPATCH(input_tiles, input_tiles_dispatch_body,
                          (int m, const float* x, int64_t H, int64_t W, int64_t cblocks,
                           int64_t tiles_w, int64_t pad_top, int64_t pad_left, int64_t t0,
                           int64_t t1, int64_t band, int64_t cin_pad, float* v),
                          (m, x, H, W, cblocks, tiles_w, pad_top, pad_left, t0, t1, band,
                           cin_pad, v))

// The output transform of tiles [t0, t1): Y = A^T M A + bias (+ residual),
// activated, for every output channel block. mb: the band's products,
// M[xi][panel][tile][NR].
template <int M, int B, Act Ac>
CONVCORE_ALWAYS_INLINE void output_tiles_act(const float* mb, int64_t panels, int64_t band,
                                             int64_t t0, int64_t t1, int64_t tiles_w,
                                             int64_t oblocks, int64_t Ho, int64_t Wo,
                                             const float* bias, const float* res, float* y) {
  using WV = winograd::Variant<M>;
  constexpr int A = WV::kTile;
  const int64_t P = Ho * Wo;
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t oh0 = (t / tiles_w) * M, ow0 = (t % tiles_w) * M;
    for (int64_t cob = 0; cob < oblocks; ++cob) {
      const int64_t u = cob * B / NR, j0 = cob * B % NR;
      const float* src = mb + (u * band + (t - t0)) * NR + j0;
      Vec<B> cols[A][M];  // A^T applied to each column of M, then to each row
#pragma GCC unroll 8
      for (int j = 0; j < A; ++j) {
        Vec<B> c[A];
#pragma GCC unroll 8
        for (int k = 0; k < A; ++k) c[k] = load<B>(src + (k * A + j) * panels * band * NR);
        WV::output(c, cols[j]);
      }
      const Vec<B> b = bias ? load<B>(bias + cob * B) : Vec<B>{};
      float* yb = y + cob * P * B;
      const float* rb = res ? res + cob * P * B : nullptr;
#pragma GCC unroll 4
      for (int i = 0; i < M; ++i) {
        if (oh0 + i >= Ho) break;
        Vec<B> r[A], out[M];
#pragma GCC unroll 8
        for (int j = 0; j < A; ++j) r[j] = cols[j][i];
        WV::output(r, out);
#pragma GCC unroll 4
        for (int j = 0; j < M; ++j) {
          if (ow0 + j >= Wo) break;
          const int64_t q = ((oh0 + i) * Wo + ow0 + j) * B;
          Vec<B> val = out[j] + b;
          if (rb) val += load<B>(rb + q);
          store<B>(yb + q, apply<Ac>(val));
        }
      }
    }
  }
}

template <int B, Act Ac>
CONVCORE_ALWAYS_INLINE void output_tiles_m(int m, const float* mb, int64_t panels, int64_t band,
                                           int64_t t0, int64_t t1, int64_t tiles_w,
                                           int64_t oblocks, int64_t Ho, int64_t Wo,
                                           const float* bias, const float* res, float* y) {
  if (m == 4)
    output_tiles_act<4, B, Ac>(mb, panels, band, t0, t1, tiles_w, oblocks, Ho, Wo, bias, res, y);
  else
    output_tiles_act<2, B, Ac>(mb, panels, band, t0, t1, tiles_w, oblocks, Ho, Wo, bias, res, y);
}

template <int B>
CONVCORE_ALWAYS_INLINE void output_tiles_body(int m, const float* mb, int64_t panels,
                                              int64_t band, int64_t t0, int64_t t1,
                                              int64_t tiles_w, int64_t oblocks, int64_t Ho,
                                              int64_t Wo, const float* bias, const float* res,
                                              float* y, Act act) {
  CONVCORE_ACT_SWITCH(act, output_tiles_m, B, m, mb, panels, band, t0, t1, tiles_w, oblocks, Ho,
                      Wo, bias, res, y)
}

CONVCORE_BLOCKED_DISPATCH(output_tiles, output_tiles_body,
                          (int m, const float* mb, int64_t panels, int64_t band, int64_t t0,
                           int64_t t1, int64_t tiles_w, int64_t oblocks, int64_t Ho, int64_t Wo,
                           const float* bias, const float* res, float* y, Act act),
                          (m, mb, panels, band, t0, t1, tiles_w, oblocks, Ho, Wo, bias, res, y,
                           act))

// U = G g G^T of a panel's NR filters of one input channel, g[9][NR] (3x3
// taps, row major, by filter) to u[A * A][NR]: G applied to the columns,
// then to the rows, each loop over the NR filters with the scalar
// transform's operations per filter, so that it vectorises (one filter at
// a time the transform took about half of a 256-channel 3x3 layer's time at
// batch 1: it runs on every call of the core's op).
template <int M, typename S>
CONVCORE_ALWAYS_INLINE void filter_transform(const S (*g)[NR], S (*u)[NR]) {
  using WV = winograd::Variant<M>;
  constexpr int A = WV::kTile;
  S cols[3][A][NR];
  for (int jc = 0; jc < 3; ++jc)
    for (int j = 0; j < NR; ++j) {
      const S c[3] = {g[jc][j], g[3 + jc][j], g[6 + jc][j]};
      S out[A];
      WV::filter(c, out);
      for (int a = 0; a < A; ++a) cols[jc][a][j] = out[a];
    }
  for (int i = 0; i < A; ++i)
    for (int j = 0; j < NR; ++j) {
      const S r[3] = {cols[0][i][j], cols[1][i][j], cols[2][i][j]};
      S out[A];
      WV::filter(r, out);
      for (int a = 0; a < A; ++a) u[i * A + a][j] = out[a];
    }
}

// One input channel of a panel: its NR filters (the first `no` real, the
// others and a pad channel zero) transformed, each point's NR values
// written as one contiguous run at dst + point * point_stride (writing
// filter by filter sent every value to one of the points' lines, which sit
// a multiple of 4 KB apart and evicted each other: 2.6 ms for 128 x 128
// channels, F(4x4)).
template <int M>
CONVCORE_ALWAYS_INLINE void transform_channel_m(const float* src, const FilterAccess& f,
                                                int64_t no, int64_t point_stride, float* dst) {
  constexpr int A = M + 2, points = A * A;
  alignas(64) double g[9][NR], t[points][NR];
  alignas(64) float run[NR];  // converted here, then copied: 15% faster for F(4x4)
  for (int64_t j = 0; j < NR; ++j)
    for (int k = 0; k < 9; ++k) g[k][j] = j < no ? src[j * f.out_stride + k * f.tap_step] : 0.0;
  filter_transform<M, double>(g, t);
  for (int xi = 0; xi < points; ++xi) {
    for (int j = 0; j < NR; ++j) run[j] = static_cast<float>(t[xi][j]);
    std::memcpy(dst + xi * point_stride, run, sizeof(run));
  }
}

// Compiled per instruction set (B unused): the loops over the filters vectorise.
template <int B>
CONVCORE_ALWAYS_INLINE void transform_channel_body(const float* src, const FilterAccess& f,
                                                   int64_t no, int m, int64_t point_stride,
                                                   float* dst) {
  if (m == 4)
    transform_channel_m<4>(src, f, no, point_stride, dst);
  else
    transform_channel_m<2>(src, f, no, point_stride, dst);
}

CONVCORE_BLOCKED_DISPATCH(transform_channel, transform_channel_body,
                          (const float* src, const FilterAccess& f, int64_t no, int m,
                           int64_t point_stride, float* dst),
                          (src, f, no, m, point_stride, dst))

// The same from the panel's filters of one input channel already gathered,
// g[9][NR] floats (zeros past the real filters). F(2x2)'s G (halves) is
// computed in float; F(4x4)'s thirds and fifteenths in double, as above.
template <int M>
CONVCORE_ALWAYS_INLINE void transform_gathered_m(const float* gf, int64_t point_stride,
                                                 float* dst) {
  constexpr int A = M + 2, points = A * A;
  using S = std::conditional_t<M == 2, float, double>;
  alignas(64) S t[points][NR];
  alignas(64) float run[NR];
  if constexpr (std::is_same_v<S, float>) {
    filter_transform<M, S>(reinterpret_cast<const float(*)[NR]>(gf), t);
  } else {
    alignas(64) S g[9][NR];
    for (int k = 0; k < 9; ++k)
      for (int j = 0; j < NR; ++j) g[k][j] = gf[k * NR + j];
    filter_transform<M, S>(g, t);
  }
  for (int xi = 0; xi < points; ++xi) {
    for (int j = 0; j < NR; ++j) run[j] = static_cast<float>(t[xi][j]);
    std::memcpy(dst + xi * point_stride, run, sizeof(run));
  }
}

template <int B>
CONVCORE_ALWAYS_INLINE void transform_gathered_body(const float* g, int m, int64_t point_stride,
                                                    float* dst) {
  if (m == 4)
    transform_gathered_m<4>(g, point_stride, dst);
  else
    transform_gathered_m<2>(g, point_stride, dst);
}

CONVCORE_BLOCKED_DISPATCH(transform_gathered, transform_gathered_body,
                          (const float* g, int m, int64_t point_stride, float* dst),
                          (g, m, point_stride, dst))

// g[(c - c0) * 9 + tap][j] = filter (o0 + j, c)'s tap for c in [c0, c1),
// j < no, zero for j >= no: register transposes where the taps are
// contiguous, forward (a filter's channels one after another) or flipped
// (grad_input: filters one after another, taps backwards); one scalar at a
// time otherwise.
void gather_filters(const float* weight, const FilterAccess& f, int64_t o0, int64_t no,
                    int64_t c0, int64_t c1, float* g) {
  if (no < NR) std::fill(g, g + (c1 - c0) * 9 * NR, 0.0f);
  const float* src = weight + o0 * f.out_stride;
  if (f.tap_step == 1 && f.in_stride == 9) {
    gemm::transpose_copy(src + c0 * 9, f.out_stride, no, (c1 - c0) * 9, g, NR);
  } else if (f.tap_step == -1 && f.out_stride == 9) {
    static const int64_t backwards[9] = {8, 7, 6, 5, 4, 3, 2, 1, 0};
    for (int64_t c = c0; c < c1; ++c)
      gemm::transpose_copy(src + c * f.in_stride - 8, 9, no, 9, g + (c - c0) * 9 * NR, NR,
                           backwards);
  } else {
    for (int64_t c = c0; c < c1; ++c)
      for (int64_t j = 0; j < no; ++j)
        for (int k = 0; k < 9; ++k)
          g[((c - c0) * 9 + k) * NR + j] = src[j * f.out_stride + c * f.in_stride + k * f.tap_step];
  }
}

}  // namespace

WinogradWeights winograd_layout(int64_t cout, int64_t cin, int m) {
  WinogradWeights w;
  w.m = m;
  w.cout = cout, w.cin = cin;
  w.lanes = block();
  w.cin_pad = round_up(cin, w.lanes);
  w.panels = (cout + NR - 1) / NR;
  return w;
}

int64_t winograd_floats(const WinogradWeights& w) {
  return (w.m + 2) * (w.m + 2) * w.panels * w.cin_pad * NR;
}

// Panel by panel (in parallel), input channel by channel.
void pack_winograd(const float* weight, const FilterAccess& f, const WinogradWeights& w,
                   float* u, int threads) {
  const int64_t point_stride = w.panels * w.cin_pad * NR;
  detail::parallel_for(threads, w.panels, [&](int64_t panel) {
    const int64_t o0 = panel * NR, no = std::min<int64_t>(NR, w.cout - o0);
    for (int64_t c = 0; c < w.cin_pad; ++c)
      transform_channel(weight + o0 * f.out_stride + c * f.in_stride, f, c < w.cin ? no : 0, w.m,
                        point_stride, u + (panel * w.cin_pad + c) * NR);
  });
}

WinogradWeights pack_winograd_weights(const float* weight, int64_t cout, int64_t cin, int m) {
  WinogradWeights w = winograd_layout(cout, cin, m);
  w.u.resize(static_cast<std::size_t>(winograd_floats(w)));
  pack_winograd(weight, FilterAccess{cin * 9, 9, 1}, w, w.u.data(), 1);
  return w;
}

WinogradPlan plan_winograd(const WinogradWeights& w, const Image& in, const Image& out,
                           int threads, bool panel_groups) {
  WinogradPlan plan;
  plan.tiles_h = (out.h + w.m - 1) / w.m;
  plan.tiles_w = (out.w + w.m - 1) / w.m;
  const int64_t tiles = plan.tiles_h * plan.tiles_w;
  // bands of whole tiles of the microkernel, enough of them for the threads:
  // each band reads all the transformed filters, so 2 per thread, or 8
  // where those fit in L2 (64 channels), so that the bands balance (5 bands
  // of a 56x56 image on 2 threads left one thread 3) and a thread slowed by
  // another process does not hold a large share of them. Filters too large
  // for the L3 come from memory for every band: a band then holds an image,
  // or several small ones, and the threads share its panels instead.
  const int64_t filter_bytes = winograd_floats(w) * int64_t(sizeof(float));
  const bool large_filters = filter_bytes > kLargeFilterBytes;
  const int64_t most = large_filters ? kMostBandTiles : kBandTiles;
  int64_t bands = std::max<int64_t>(1, (tiles + most - 1) / most);
  const bool small_filters = filter_bytes <= kSmallFilterBytes;
  const int64_t want = (small_filters ? 8 : 2) * static_cast<int64_t>(threads);
  if (!large_filters && in.n * bands < want)
    bands = std::min((want + in.n - 1) / in.n, (tiles + MR - 1) / MR);
  // Whole tiles of the microkernel, where a last one of MR + 1 rows
  // (gemm::gather_tile_rows) counts as whole: 49 tiles go in 4 bands of 13,
  // not in 24, 24 and a band of 1 that reads all the filters again.
  const int64_t per = (tiles + bands - 1) / bands;
  plan.band = per % MR == 1 && per > MR ? per : round_up(per, MR);
  plan.bands = (tiles + plan.band - 1) / plan.band;
  if (large_filters && plan.bands == 1) {  // the filters stream once for several images
    plan.images = std::clamp<int64_t>(kMostBandTiles / tiles, 1, in.n);
    plan.band = round_up(plan.images * tiles, MR);
  }
  panel_groups = panel_groups || large_filters;
  // Few bands (one small image), panel_groups: each band's panels split in
  // groups of two or more, every group's task transforming the band's input
  // again (a small share of its products at 64+ output channels). The eager
  // op transforms the filters on every call, each thread half the panels
  // (pack_winograd), which then sit in its L2: tasks taken in ranges read
  // them there, and a thread slowed by another process no longer holds a
  // whole band. The engine's filters, packed once, gain nothing from it,
  // unless they are large (above).
  const int64_t many = 4 * static_cast<int64_t>(threads);
  const int64_t units = (in.n + plan.images - 1) / plan.images * plan.bands;
  if (panel_groups && units < many)
    plan.groups = std::max<int64_t>(1, std::min((many + units - 1) / units, w.panels / 2));
  const int64_t points = (w.m + 2) * (w.m + 2);
  plan.v_floats = points * plan.band * w.cin_pad;
  plan.m_floats = points * w.panels * plan.band * NR;
  return plan;
}

void winograd_conv2d(const Image& in, const WinogradWeights& w, const float* u_packed,
                     const Conv2dParams& p, const WinogradPlan& plan, const Epilogue& e,
                     const Image& out, float* scratch, int threads) {
  const int64_t B = w.lanes, cblocks = w.cin_pad / B, oblocks = (w.cout + B - 1) / B;
  const int64_t tiles = plan.tiles_h * plan.tiles_w, points = (w.m + 2) * (w.m + 2);
  const int64_t band = plan.band, units = (in.n + plan.images - 1) / plan.images * plan.bands;
  const int64_t group = (w.panels + plan.groups - 1) / plan.groups;  // panels a group
  const int64_t tasks = units * ((w.panels + group - 1) / group), P = out.h * out.w;
  const int team = static_cast<int>(std::min<int64_t>(threads, tasks));
  // Tasks by group of panels, then image and band: each thread a contiguous
  // range, taking the others' last tasks when done (StealingRanges).
  detail::StealingRanges ranges(team, tasks);
#pragma omp parallel num_threads(team)
  {
    const int me = omp_get_thread_num();
    float* v = scratch + me * (plan.v_floats + plan.m_floats);
    float* mb = v + plan.v_floats;
    for (int64_t task = ranges.next(me); task >= 0; task = ranges.next(me)) {
      const int64_t unit = task % units, u_lo = task / units * group;
      const int64_t u_hi = std::min(w.panels, u_lo + group);
      // images [n0, n1), each the tiles [t0, t1): rows one after another
      const int64_t n0 = unit / plan.bands * plan.images;
      const int64_t n1 = std::min(in.n, n0 + plan.images);
      const int64_t t0 = (unit % plan.bands) * band, t1 = std::min(tiles, t0 + band);
      const int64_t per = t1 - t0, count = (n1 - n0) * per;
      for (int64_t n = n0; n < n1; ++n)
        input_tiles(w.m, in.data + n * in.image_stride, in.h, in.w, cblocks, plan.tiles_w,
                    p.pad_top, p.pad_left, t0, t1, band, w.cin_pad,
                    v + (n - n0) * per * w.cin_pad);
      for (int64_t xi = 0; xi < points; ++xi) {
        const float* vx = v + xi * band * w.cin_pad;
        for (int64_t u = u_lo; u < u_hi; ++u) {
          const float* ub = u_packed + (xi * w.panels + u) * w.cin_pad * NR;
          float* mt = mb + ((xi * w.panels + u) * band) * NR;
          const int nr = static_cast<int>(std::min<int64_t>(NR, w.cout - u * NR));
          // the panel read next, fetched during the first tile
          const int64_t next = u + 1 < u_hi ? xi * w.panels + u + 1
                               : xi + 1 < points ? (xi + 1) * w.panels + u_lo : -1;
          const gemm::Ahead ahead =
              next >= 0 ? gemm::Ahead{u_packed + next * w.cin_pad * NR, 2 * w.cin_pad}
                        : gemm::Ahead{};
          for (int64_t q = 0, mr; q < count; q += mr) {
            mr = gemm::gather_tile_rows(count - q);
            gemm::strided_rows_kernel(w.cin_pad, vx + q * w.cin_pad, w.cin_pad, ub, mt + q * NR,
                                      static_cast<int>(mr), false, nr,
                                      q == 0 ? ahead : gemm::Ahead{});
          }
        }
      }
      // the group's output channel blocks, image by image
      const int64_t ob_lo = u_lo * NR / B, ob_hi = std::min(oblocks, u_hi * NR / B);
      for (int64_t n = n0; n < n1; ++n) {
        const float* res = e.residual ? e.residual + n * e.residual_image_stride : nullptr;
        output_tiles(w.m, mb + (u_lo * band + (n - n0) * per) * NR, w.panels, band, t0, t1,
                     plan.tiles_w, ob_hi - ob_lo, out.h, out.w,
                     e.bias ? e.bias + ob_lo * B : nullptr, res ? res + ob_lo * P * B : nullptr,
                     out.data + n * out.image_stride + ob_lo * P * B, e.act);
      }
    }
  }
}

namespace {

// The batch's tiles in one band: at most this many (one 32x32 output in
// F(2x2), 64x64 in F(4x4); sixteen 7x7 in F(2x2)), and no more than the
// output channels, so that the input transform, which every panel's task
// reads again, holds no more floats than the filters' would (16 images of
// 7x7, 320 -> 160 channels: 0.85x the speed of the U packed once; 4 of
// 28x28 in F(4x4), 128 channels, 0.94x); and enough output panels for the
// threads to share.
constexpr int64_t kFusedMostTiles = 256;
constexpr int64_t kFusedFewestPanels = 4;
// A task's transformed filters for one chunk of input channels.
constexpr int64_t kFusedFilterBytes = int64_t(256) << 10;

struct FusedSizes {
  int64_t tiles = 0, tiles_w = 0, rows = 0, band = 0, kc = 0, point_stride = 0, v_floats = 0,
          thread_floats = 0;  // tiles: an image's; rows: the batch's
};

FusedSizes fused_sizes(const WinogradWeights& w, const Image& out) {
  FusedSizes s;
  const int64_t points = (w.m + 2) * (w.m + 2);
  s.tiles_w = (out.w + w.m - 1) / w.m;
  s.tiles = ((out.h + w.m - 1) / w.m) * s.tiles_w;
  s.rows = out.n * s.tiles;
  s.band = round_up(s.rows, MR);  // M's rows: a short last tile may write up to MR rows
  const int64_t kc = kFusedFilterBytes / (points * NR * int64_t(sizeof(float)));
  s.kc = std::clamp<int64_t>(kc / w.lanes * w.lanes, w.lanes, w.cin_pad);
  // a point's run of U one line past kc x NR floats from the next (16 KB for
  // the usual kc): the transform writes every point's line in turn, and
  // lines a multiple of 4 KB apart share an L1 set
  s.point_stride = s.kc * NR + 16;
  s.v_floats = points * s.rows * w.cin_pad;
  // U's chunk, M, the chunk's filters gathered
  s.thread_floats = points * s.point_stride + points * s.band * NR + s.kc * 9 * NR;
  return s;
}

}  // namespace

bool winograd_fused_applies(const WinogradWeights& w, const Image& out) {
  const int64_t rows = fused_sizes(w, out).rows;
  return out.n >= 1 && w.panels >= kFusedFewestPanels && rows <= kFusedMostTiles &&
         rows <= w.panels * NR;
}

int64_t winograd_fused_floats(const WinogradWeights& w, const Image& out, int threads) {
  const FusedSizes s = fused_sizes(w, out);
  return s.v_floats + threads * s.thread_floats;
}

void winograd_conv2d_fused(const Image& in, const WinogradWeights& w, const float* weight,
                           const FilterAccess& f, const Conv2dParams& p, const Epilogue& e,
                           const Image& out, float* scratch, int threads) {
  const FusedSizes s = fused_sizes(w, out);
  const int64_t B = w.lanes, cblocks = w.cin_pad / B, oblocks = (w.cout + B - 1) / B;
  const int64_t points = (w.m + 2) * (w.m + 2), tiles = s.tiles, rows_n = s.rows;
  const int64_t P = out.h * out.w;
  float* v = scratch;  // V[xi][image * tiles + tile][c], shared
  const int team = static_cast<int>(std::min<int64_t>(threads, w.panels));
  detail::StealingRanges ranges(team, w.panels);
#pragma omp parallel num_threads(team)
  {
    const int me = omp_get_thread_num();
    // the input transform, an even share of the batch's tiles each
    const int64_t r0 = rows_n * me / team, r1 = rows_n * (me + 1) / team;
    for (int64_t r = r0; r < r1;) {
      const int64_t n = r / tiles, t0 = r % tiles, t1 = std::min(tiles, t0 + r1 - r);
      input_tiles(w.m, in.data + n * in.image_stride, in.h, in.w, cblocks, s.tiles_w, p.pad_top,
                  p.pad_left, t0, t1, rows_n, w.cin_pad, v + r * w.cin_pad);
      r += t1 - t0;
    }
#pragma omp barrier
    float* ub = scratch + s.v_floats + me * s.thread_floats;  // U[xi][c - c0][NR], padded
    float* mb = ub + points * s.point_stride;                   // M[xi][band][NR]
    float* gb = mb + points * s.band * NR;                      // filters [c - c0][tap][NR]
    for (int64_t u = ranges.next(me); u >= 0; u = ranges.next(me)) {
      const int64_t o0 = u * NR, no = std::min<int64_t>(NR, w.cout - o0);
      for (int64_t c0 = 0; c0 < w.cin_pad; c0 += s.kc) {
        const int64_t kc = std::min(s.kc, w.cin_pad - c0);
        const int64_t c1 = std::min(c0 + kc, w.cin);  // past it: the pad channels' zeros
        if (c1 > c0) gather_filters(weight, f, o0, no, c0, c1, gb);
        if (c1 < c0 + kc) std::fill(gb + (std::max(c1, c0) - c0) * 9 * NR, gb + kc * 9 * NR, 0.0f);
        for (int64_t c = c0; c < c0 + kc; ++c)
          transform_gathered(gb + (c - c0) * 9 * NR, w.m, s.point_stride, ub + (c - c0) * NR);
        for (int64_t xi = 0; xi < points; ++xi) {
          const float* vx = v + xi * rows_n * w.cin_pad + c0;
          float* mt = mb + xi * s.band * NR;
          for (int64_t q = 0, mr; q < rows_n; q += mr) {
            mr = gemm::gather_tile_rows(rows_n - q);
            gemm::strided_rows_kernel(kc, vx + q * w.cin_pad, w.cin_pad, ub + xi * s.point_stride,
                                      mt + q * NR, static_cast<int>(mr), c0 > 0,
                                      static_cast<int>(no));
          }
        }
      }
      const int64_t ob_lo = o0 / B, ob_hi = std::min(oblocks, (o0 + NR) / B);
      for (int64_t n = 0; n < out.n; ++n) {
        const float* res = e.residual ? e.residual + n * e.residual_image_stride : nullptr;
        output_tiles(w.m, mb + n * tiles * NR, 1, s.band, 0, tiles, s.tiles_w, ob_hi - ob_lo,
                     out.h, out.w, e.bias ? e.bias + ob_lo * B : nullptr,
                     res ? res + ob_lo * P * B : nullptr,
                     out.data + n * out.image_stride + ob_lo * P * B, e.act);
      }
    }
  }
}

}  // namespace blocked
}  // namespace convcore
