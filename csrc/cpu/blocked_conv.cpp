// Convolution in the blocked layout (blocked.h): the direct algorithm of
// conv_direct.cpp's forward_direct with the tile written straight into the output
// blocks. A tile is MR output positions (in output order, across row ends)
// by NR output channels; gemm::gather_kernel broadcasts each input value
// from a window of the input (tap k at the fixed offset koff[k] inside
// every window), so strides and dilations cost nothing and nothing is
// packed per tile. With a blocked input the taps run (channel block, kernel
// row, kernel column, lane), so the B channels of one input position are
// read together. The output stage adds the bias and a residual and applies
// the activation while the tile is in L1, and stores one vector per
// position and channel block.
#include <omp.h>

#include <algorithm>
#include <cstring>
#include <numeric>
#include <type_traits>

#include "activation_math.h"
#include "blocked.h"
#include "blocked_kernels.h"
#include "gemm.h"
#include "strided.h"

namespace convcore {
namespace blocked {

namespace {

constexpr int MR = gemm::Tile<float>::MR, NR = gemm::Tile<float>::NR;
// Tiles of a block of positions that take every panel and slice of taps
// while the block's input rows stay in cache (conv_direct.cpp's kDirectBlockTiles).
constexpr int64_t kBlockTiles = 8;
constexpr int64_t kBlockRows = kBlockTiles * (MR + 1);
// Taps per slice of a panel (whole channels or channel blocks): the slice's
// rows of the panel stay in L1 while every tile of the block uses them.
constexpr int64_t kSliceTaps = 256;
// Images padded at once, at most this many bytes.
constexpr int64_t kFrameBytes = int64_t(8) << 20;

// Rows of a tile (positions) stored as vectors of B lanes per channel block:
// out = act(tile + bias (+ residual)).
template <int B, Act A>
CONVCORE_ALWAYS_INLINE void store_tile_act(const float* tile, int64_t rows, int64_t blocks,
                                           const float* bias, const float* res,
                                           int64_t res_stride, float* dst, int64_t dst_stride) {
  for (int64_t jb = 0; jb < blocks; ++jb) {
    const Vec<B> b = bias ? load<B>(bias + jb * B) : Vec<B>{};
    float* d = dst + jb * dst_stride;
    const float* t = tile + jb * B;
    if (res) {
      const float* r = res + jb * res_stride;
      for (int64_t i = 0; i < rows; ++i)
        store<B>(d + i * B, apply<A>(load<B>(t + i * NR) + b + load<B>(r + i * B)));
    } else {
      for (int64_t i = 0; i < rows; ++i) store<B>(d + i * B, apply<A>(load<B>(t + i * NR) + b));
    }
  }
}

template <int B>
CONVCORE_ALWAYS_INLINE void store_tile_body(const float* tile, int64_t rows, int64_t blocks,
                                            const float* bias, const float* res,
                                            int64_t res_stride, float* dst, int64_t dst_stride,
                                            Act act) {
  CONVCORE_ACT_SWITCH(act, store_tile_act, B, tile, rows, blocks, bias, res, res_stride, dst,
                      dst_stride)
}

CONVCORE_BLOCKED_DISPATCH(store_tile, store_tile_body,
                          (const float* tile, int64_t rows, int64_t blocks, const float* bias,
                           const float* res, int64_t res_stride, float* dst, int64_t dst_stride,
                           Act act),
                          (tile, rows, blocks, bias, res, res_stride, dst, dst_stride, act))

// gemm::gather_sums_even for a 1x1 convolution of a blocked input whose
// channels fill whole blocks (kc a multiple of B): taps run block by block,
// the B taps of block cb at row0 + cb * plane + lane, so each tap's RB
// values are immediate displacements from one pointer per block, where the
// offset table's loop (an offset load and an address per tap ahead of its
// RB broadcasts) kept the AVX-512 FMA units waiting on layers with many
// input channels (docs/engine.md, run 20). The same sums in the same order.
template <int B, int RB, int VP>
CONVCORE_ALWAYS_INLINE void pointwise_sums(int64_t kc, int64_t plane, const float* row0,
                                           const float* b, Vec<B> (&acc)[RB][VP],
                                           const gemm::Ahead& ahead) {
#pragma GCC unroll 16
  for (int i = 0; i < RB; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < VP; ++v) acc[i][v] = Vec<B>{};
  for (int64_t cb = 0; cb < kc / B; ++cb) {
    const float* a = row0 + cb * plane;
    if (cb * B < ahead.lines)
      for (int64_t k = cb * B; k < (cb + 1) * B; ++k) gemm::fetch_ahead(ahead, k);
    // Not unrolled: unrolled B times, GCC's registers for AVX2's 12
    // accumulators (of 16 vector registers) rotated between copies of the
    // loop body and spilled some to the stack on every channel block.
#pragma GCC unroll 1
    for (int l = 0; l < B; ++l, b += NR) {
      Vec<B> bv[VP];
#pragma GCC unroll 4
      for (int v = 0; v < VP; ++v) bv[v] = load<B>(b + v * B);
#pragma GCC unroll 16
      for (int i = 0; i < RB; ++i) {
        const float ai = a[i * B + l];
#pragma GCC unroll 4
        for (int v = 0; v < VP; ++v) acc[i][v] += ai * bv[v];
      }
    }
  }
}

// One block of RB rows (from i0; rows past mr repeat row mr - 1 and are not
// stored) by VP vectors of columns (from j0) of gather_store_vp.
template <int B, int VP, int RB, Act A>
CONVCORE_ALWAYS_INLINE void gather_store_block(int64_t kc, const int64_t* koff,
                                               const float* const* rows, int i0, int mr,
                                               const float* bp, int j0, int64_t blocks,
                                               const float* bias, const float* res,
                                               int64_t res_stride, float* dst,
                                               int64_t dst_stride, int64_t pointwise_plane,
                                               const gemm::Ahead& ahead) {
  Vec<B> acc[RB][VP];
  // a 1x1 layer's rows one vector apart (pointwise_plane > 0: its
  // channel block planes), rows one vector apart (a blocked input, stride
  // 1), one float apart (a plain input at stride 1: the pointwise layer
  // after a grouped convolution run in the plain layout), or two floats
  // apart (a plain input at stride 2: the first layers of the MobileNets and
  // EfficientNet), else one pointer per row
  if (pointwise_plane > 0 && gemm::rows_even<float, RB, B>(rows, i0, mr))
    pointwise_sums<B, RB, VP>(kc, pointwise_plane, rows[i0], bp, acc, ahead);
  else if (gemm::rows_even<float, RB, B>(rows, i0, mr))
    gemm::gather_sums_even<float, Vec<B>, RB, VP, B>(kc, koff, rows[i0], bp, acc, ahead);
  else if (gemm::rows_even<float, RB, 1>(rows, i0, mr))
    gemm::gather_sums_even<float, Vec<B>, RB, VP, 1>(kc, koff, rows[i0], bp, acc, ahead);
  else if (gemm::rows_even<float, RB, 2>(rows, i0, mr))
    gemm::gather_sums_even<float, Vec<B>, RB, VP, 2>(kc, koff, rows[i0], bp, acc, ahead);
  else
    gemm::gather_sums<float, Vec<B>, RB, VP>(kc, koff, rows, i0, mr, bp, acc, ahead);
#pragma GCC unroll 4
  for (int v = 0; v < VP; ++v) {
    const int64_t jb = j0 / B + v;
    if (jb >= blocks) break;
    const Vec<B> bb = bias ? load<B>(bias + jb * B) : Vec<B>{};
    float* d = dst + jb * dst_stride;
    const float* rs = res ? res + jb * res_stride : nullptr;
#pragma GCC unroll 16
    for (int i = 0; i < RB; ++i) {
      if (i0 + i >= mr) break;
      Vec<B> y = acc[i][v] + bb;
      if (rs) y = y + load<B>(rs + (i0 + i) * B);
      store<B>(d + (i0 + i) * B, apply<A>(y));
    }
  }
}

// The tile of gather_kernel with the output stage done in registers, for
// layers whose taps fit one slice (pointwise and small kernels): the
// accumulators go through bias, residual and activation straight into the
// output blocks, with no pass through the tile in memory. Rows of RB
// positions by VP vectors of B channels: 12 x 2 with AVX-512, four 6 x 2
// blocks with AVX2, or 12 x 1 for a panel one block wide; a short last
// block of rows takes a smaller block (as gather_kernel); the same sums in
// the same order. Rows outer: with AVX2 a block of rows then takes both
// vectors of columns while its input lines are still in L1.
template <int B, int VP, Act A>
CONVCORE_ALWAYS_INLINE void gather_store_vp(int64_t kc, const int64_t* koff,
                                            const float* const* rows, const float* b, int mr,
                                            int64_t blocks, const float* bias, const float* res,
                                            int64_t res_stride, float* dst, int64_t dst_stride,
                                            int64_t pointwise_plane, const gemm::Ahead& ahead_all) {
  constexpr int RB = VP == 1 || B == 16 ? 12 : 6;
  static_assert(MR % RB == 0 && NR % (VP * B) == 0, "the tile must split into RB x VP blocks");
  auto block = [&](auto rows_of_block, int i0, int j0, const gemm::Ahead& ahead)
      __attribute__((always_inline)) {
        gather_store_block<B, VP, decltype(rows_of_block)::value, A>(
            kc, koff, rows, i0, mr, b + j0, j0, blocks, bias, res, res_stride, dst, dst_stride,
            pointwise_plane, ahead);
      };
  for (int i0 = 0; i0 < mr;) {
    const int n = gemm::gather_block_rows<RB>(mr - i0);
    for (int j0 = 0; j0 < NR && j0 / B < blocks; j0 += VP * B) {
      const gemm::Ahead ahead = j0 == 0 && i0 == 0 ? ahead_all : gemm::Ahead{};
      if constexpr (RB == 12) {
        if (n == RB + 1)
          block(std::integral_constant<int, RB + 1>{}, i0, j0, ahead);
        else if (n == 4)
          block(std::integral_constant<int, 4>{}, i0, j0, ahead);
        else if (n == 8)
          block(std::integral_constant<int, 8>{}, i0, j0, ahead);
        else
          block(std::integral_constant<int, RB>{}, i0, j0, ahead);
      } else {
        if (n == 3)
          block(std::integral_constant<int, 3>{}, i0, j0, ahead);
        else
          block(std::integral_constant<int, RB>{}, i0, j0, ahead);
      }
    }
    i0 += n;
  }
}

// One vector of columns when the panel is one block wide (no products for
// columns past the panel), two otherwise.
template <int B, Act A>
CONVCORE_ALWAYS_INLINE void gather_store_act(int64_t kc, const int64_t* koff,
                                             const float* const* rows, const float* b, int mr,
                                             int64_t blocks, const float* bias, const float* res,
                                             int64_t res_stride, float* dst, int64_t dst_stride,
                                             int64_t pointwise_plane, const gemm::Ahead& ahead) {
  if (blocks == 1)
    gather_store_vp<B, 1, A>(kc, koff, rows, b, mr, blocks, bias, res, res_stride, dst,
                             dst_stride, pointwise_plane, ahead);
  else
    gather_store_vp<B, 2, A>(kc, koff, rows, b, mr, blocks, bias, res, res_stride, dst,
                             dst_stride, pointwise_plane, ahead);
}

template <int B>
CONVCORE_ALWAYS_INLINE void gather_store_body(int64_t kc, const int64_t* koff,
                                              const float* const* rows, const float* b, int mr,
                                              int64_t blocks, const float* bias, const float* res,
                                              int64_t res_stride, float* dst, int64_t dst_stride,
                                              Act act, int64_t pointwise_plane,
                                              const gemm::Ahead& ahead) {
  CONVCORE_ACT_SWITCH(act, gather_store_act, B, kc, koff, rows, b, mr, blocks, bias, res,
                      res_stride, dst, dst_stride, pointwise_plane, ahead)
}

CONVCORE_BLOCKED_DISPATCH(gather_store, gather_store_body,
                          (int64_t kc, const int64_t* koff, const float* const* rows,
                           const float* b, int mr, int64_t blocks, const float* bias,
                           const float* res, int64_t res_stride, float* dst, int64_t dst_stride,
                           Act act, int64_t pointwise_plane, gemm::Ahead ahead),
                          (kc, koff, rows, b, mr, blocks, bias, res, res_stride, dst, dst_stride,
                           act, pointwise_plane, ahead))

// A plain-input layer with at most B output channels and stride 1 along
// rows (LeNet's first, 1 -> 6): with the channels along the lanes, most
// lanes of every product would be padding. Here the lanes hold B
// consecutive output positions of one row instead: each tap is one
// unaligned load of the input row, times each output channel's weight. The
// channels are then moved into the lanes of each position's output block.
// A row's last vector ends at the row's end (overlapping the one before),
// so no load passes the row's last window. Same sums in the same order (tap
// by tap) as gather_store.
// NC >= cout accumulators (4, 8 or B: a compile-time count keeps them in
// registers; the extra ones multiply zero weights).
template <int B, int NC, Act A>
CONVCORE_ALWAYS_INLINE void lanes_row_nc(const float* x, const int64_t* koff, int64_t taps,
                                         const float* panel, int cout, int64_t Wo,
                                         const float* bias, float* out) {
  // padding channels: the activation of zero (their weights and bias are 0)
  const Vec<B> pad = apply<A>(Vec<B>{});
  alignas(64) float t[NC][B];  // t[channel][position], activated
  for (int64_t ow0 = 0; ow0 < Wo; ow0 += B) {
    const int64_t s = std::min<int64_t>(ow0, Wo - B);
    Vec<B> acc[NC];
#pragma GCC unroll 16
    for (int o = 0; o < NC; ++o) acc[o] = Vec<B>{};
    for (int64_t k = 0; k < taps; ++k) {
      const Vec<B> xv = load<B>(x + koff[k] + s);
      const float* wk = panel + k * NR;
#pragma GCC unroll 16
      for (int o = 0; o < NC; ++o) acc[o] += wk[o] * xv;
    }
#pragma GCC unroll 16
    for (int o = 0; o < NC; ++o)
      store<B>(t[o], apply<A>(acc[o] + (bias ? bias[o] : 0.0f)));
    // each position's channels into the lanes of its block, element by
    // element in registers (a vector load of scalars just stored would stall)
    for (int q = 0; q < B; ++q) {
      Vec<B> y = pad;
#pragma GCC unroll 16
      for (int o = 0; o < NC; ++o)
        if (o < cout) y[o] = t[o][q];
      store<B>(out + (s + q) * B, y);
    }
  }
}

template <int B, Act A>
CONVCORE_ALWAYS_INLINE void lanes_row_act(const float* x, const int64_t* koff, int64_t taps,
                                          const float* panel, int cout, int64_t Wo,
                                          const float* bias, float* out) {
  if (cout <= 4)
    lanes_row_nc<B, 4, A>(x, koff, taps, panel, cout, Wo, bias, out);
  else if (cout <= 8)
    lanes_row_nc<B, 8, A>(x, koff, taps, panel, cout, Wo, bias, out);
  else
    lanes_row_nc<B, B, A>(x, koff, taps, panel, cout, Wo, bias, out);
}

template <int B>
CONVCORE_ALWAYS_INLINE void lanes_row_body(const float* x, const int64_t* koff, int64_t taps,
                                           const float* panel, int cout, int64_t Wo,
                                           const float* bias, float* out, Act act) {
  CONVCORE_ACT_SWITCH(act, lanes_row_act, B, x, koff, taps, panel, cout, Wo, bias, out)
}

CONVCORE_BLOCKED_DISPATCH(lanes_row, lanes_row_body,
                          (const float* x, const int64_t* koff, int64_t taps, const float* panel,
                           int cout, int64_t Wo, const float* bias, float* out, Act act),
                          (x, koff, taps, panel, cout, Wo, bias, out, act))

// Tile `part` of `parts`' share of the floats [w, w + floats) to fetch
// ahead (gemm::Ahead): the weights a task reads next, spread over the tiles
// that read the weights before them.
gemm::Ahead ahead_part(const float* w, int64_t floats, int64_t part, int64_t parts) {
  if (w == nullptr) return {};
  const int64_t lines = (floats * static_cast<int64_t>(sizeof(float)) + 63) / 64;
  const int64_t lo = lines * part / parts, hi = lines * (part + 1) / parts;
  return {reinterpret_cast<const char*>(w) + lo * 64, hi - lo};
}

// Whether gather_store takes all the taps of a panel at once (no slices of
// kSliceTaps). With AVX-512 and a blocked input a tile is one block of rows
// that reads each row of the panel once, and each input position's taps
// are whole lines, so the panel streams from L2 as well as a slice's rows
// come from L1, and the tile skips the round trip through memory between
// slices. A plain input's taps are one float of a line each: those lines
// must stay in L1 across the tiles of a slice. With AVX2 a tile is four
// blocks of rows that each read the panel: its rows must stay in L1 (16 KB
// at 128 taps; AVX2 machines may have an L1 of 32 KB).
bool taps_at_once(const ConvWeights& w, int64_t slice) {
  if (w.lanes == 16 && w.blocked_input) return w.taps <= 4 * kSliceTaps;
  return w.taps <= std::min(slice, w.lanes == 16 ? kSliceTaps : kSliceTaps / 2);
}

// Whether any tile may have MR + 1 rows: with AVX-512 its 26 accumulators
// fit the 32 registers (gemm::gather_tile_rows); with AVX2 a tile is blocks
// of 6 rows, and a 13th would run alone.
bool tiles_of_mr_plus_one(int64_t lanes) { return lanes == 16; }

// Splits the positions [qb, qe) into tiles, tile t being [q0[t], q0[t + 1]);
// returns their count. Into tiles of MR and MR + 1 rows where they may have
// MR + 1 and that covers them, so no short tile runs below the kernel's
// speed (196 positions: 4 tiles of 13 and 12 of 12, not 16 of 12 and one
// of 4); else tiles of MR rows and the rest.
int64_t split_tiles(int64_t qb, int64_t qe, int64_t lanes, int64_t* q0) {
  const int64_t n = qe - qb, even = (n + MR) / (MR + 1);
  int64_t t = 0;
  if (tiles_of_mr_plus_one(lanes) && even * MR <= n) {
    for (; t < even; ++t) q0[t] = qb + n * t / even;
  } else {
    for (int64_t q = qb; q < qe; q += gemm::gather_tile_rows(qe - q)) q0[t++] = q;
  }
  q0[t] = qe;
  return t;
}

// dst's n positions of L floats: src's every stride-th (a compile-time
// size, so each copy is a vector move, not a call).
template <int L>
void copy_positions(const float* src, int64_t stride, int64_t n, float* dst) {
  for (int64_t i = 0; i < n; ++i) std::memcpy(dst + i * L, src + i * stride * L, L * sizeof(float));
}

int64_t input_channels(const ConvWeights& w) {
  return w.blocked_input ? round_up(w.cin, w.lanes) : w.cin;
}

// The tap of input channel c at kernel position (i, j): blocked, taps run
// (channel block, i, j, lane) over each block's real lanes (all B but in a
// last, partial block); plain, (channel, i, j).
int64_t tap_index(const ConvWeights& w, int64_t c, int64_t i, int64_t j) {
  if (!w.blocked_input) return (c * w.kh + i) * w.kw + j;
  const int64_t B = w.lanes, block0 = c / B * B, lanes = std::min(B, w.cin - block0);
  return block0 * w.kh * w.kw + (i * w.kw + j) * lanes + (c - block0);
}

}  // namespace

ConvWeights pack_conv_weights(const float* weight, int64_t cout, int64_t cin, int64_t kh,
                              int64_t kw, int64_t groups, bool blocked_input) {
  ConvWeights w;
  w.cout = cout, w.cin = cin, w.kh = kh, w.kw = kw, w.groups = groups;
  w.blocked_input = blocked_input || groups > 1;
  w.lanes = block();
  const int64_t B = w.lanes, lanes = w.blocked_input ? B : 1, khw = kh * kw;
  w.taps = cin * khw;
  const int64_t cin_g = cin / groups, cout_g = cout / groups;
  // The input channels that output channels [o_lo, o_hi) read (their
  // groups'), widened to whole blocks but not past cin: [0, cin) when
  // groups is 1.
  auto reads = [&](int64_t o_lo, int64_t o_hi) {
    const int64_t lo = o_lo / cout_g * cin_g, hi = ((o_hi - 1) / cout_g + 1) * cin_g;
    return std::make_pair(lo / lanes * lanes, std::min(round_up(hi, lanes), cin));
  };
  // Products per position with panels of `width` channels, zeros included.
  auto products = [&](int64_t width) {
    int64_t sum = 0;
    for (int64_t o = 0; o < cout; o += width) {
      const auto r = reads(o, std::min(cout, o + width));
      sum += (r.second - r.first) * width;
    }
    return sum;
  };
  // Narrow groups: panels narrower than NR (whole blocks) read fewer
  // channels of other groups (zeros); the widest of the fewest products.
  // Fewer output channels than NR: one panel of whole blocks (LeNet's 6,
  // an inverted residual's 16), not NR columns of which most are padding.
  w.width = std::min<int64_t>(NR, round_up(cout, B));
  if (groups > 1)
    for (int64_t width = NR - B; width >= B; width -= B)
      if (products(width) < products(w.width)) w.width = width;
  const int64_t panels = (cout + w.width - 1) / w.width;
  int64_t floats = 0;
  for (int64_t u = 0; u < panels; ++u) {
    const auto r = reads(u * w.width, std::min(cout, (u + 1) * w.width));
    w.panel_tap0.push_back(r.first * khw);
    w.panel_taps.push_back((r.second - r.first) * khw);
    w.panel_offset.push_back(floats);
    floats += w.panel_taps.back() * NR;
  }
  w.panels.assign(static_cast<std::size_t>(floats), 0.0f);
  for (int64_t o = 0; o < cout; ++o) {
    const std::size_t u = static_cast<std::size_t>(o / w.width);
    float* panel = w.panels.data() + w.panel_offset[u] + o % w.width;
    const int64_t g = o / cout_g;
    for (int64_t cg = 0; cg < cin_g; ++cg) {
      const int64_t c = g * cin_g + cg;
      for (int64_t i = 0; i < kh; ++i)
        for (int64_t j = 0; j < kw; ++j)
          panel[(tap_index(w, c, i, j) - w.panel_tap0[u]) * NR] =
              weight[((o * cin_g + cg) * kh + i) * kw + j];
    }
  }
  return w;
}

ConvPlan plan_conv(const ConvWeights& w, const Conv2dParams& p, const Image& in,
                   const Image& out, int threads) {
  ConvPlan plan;
  plan.hp = (out.h - 1) * p.stride_h + (w.kh - 1) * p.dilation_h + 1;
  plan.wp = (out.w - 1) * p.stride_w + (w.kw - 1) * p.dilation_w + 1;
  plan.copy_frame = p.pad_top || p.pad_bottom || p.pad_left || p.pad_right;
  // A strided 1x1 convolution of a blocked input reads one position in
  // stride_h x stride_w: those are copied into a frame of the output's size,
  // so that a tile's positions are one block apart (gather_sums_even), where
  // they were two or more blocks apart with jumps at row ends, one pointer
  // per position.
  plan.subsample = !plan.copy_frame && w.kh == 1 && w.kw == 1 && w.blocked_input &&
                   (p.stride_h > 1 || p.stride_w > 1);
  if (plan.subsample) plan.copy_frame = true, plan.hp = out.h, plan.wp = out.w;
  // the frame's plane: a padded copy, or the input itself
  const int64_t hf = plan.copy_frame ? plan.hp : in.h, wf = plan.copy_frame ? plan.wp : in.w;
  const int64_t lanes = w.blocked_input ? w.lanes : 1;
  const int64_t cin_eff = input_channels(w);
  if (plan.copy_frame) {
    const int64_t image = cin_eff * hf * wf;
    plan.chunk = std::clamp<int64_t>(kFrameBytes / std::max<int64_t>(1, image * 4), 1, in.n);
    plan.frame_floats = plan.chunk * image;
  } else {
    plan.chunk = in.n;
  }
  plan.tile_floats = kBlockTiles * (MR + 1) * NR;
  // the input's channel (block) planes: the frame's, or the input's own
  const int64_t plane = hf * wf * lanes;
  plan.koff.resize(static_cast<std::size_t>(w.taps));
  for (int64_t c = 0; c < w.cin; ++c)
    for (int64_t i = 0; i < w.kh; ++i)
      for (int64_t j = 0; j < w.kw; ++j) {
        const int64_t within = (i * p.dilation_h * wf + j * p.dilation_w) * lanes;
        plan.koff[static_cast<std::size_t>(tap_index(w, c, i, j))] =
            c / lanes * plane + within + c % lanes;
      }
  (void)threads;
  return plan;
}

void conv2d(const Image& in, const ConvWeights& w, const Conv2dParams& p, const ConvPlan& plan,
            const Epilogue& e, const Image& out, float* scratch, int threads) {
  const int64_t B = w.lanes;
  const int64_t lanes = w.blocked_input ? B : 1;
  const int64_t P = out.h * out.w, panels = (w.cout + w.width - 1) / w.width;
  const int64_t out_blocks = (w.cout + B - 1) / B, blocks_per_panel = w.width / B;
  const int64_t cin_eff = input_channels(w);
  const int64_t hf = plan.copy_frame ? plan.hp : in.h, wf = plan.copy_frame ? plan.wp : in.w;
  const int64_t frame_image = plan.copy_frame ? cin_eff * hf * wf : in.image_stride;
  const int64_t khw = w.kh * w.kw, unit = khw * lanes;  // taps per input channel (block)
  // a 1x1 layer of a blocked input whose channels fill whole blocks: its
  // taps in the order of the frame's channel block planes (pointwise_sums)
  const int64_t pointwise_plane = w.kh == 1 && w.kw == 1 && w.blocked_input &&
                                          w.groups == 1 && w.cin % B == 0
                                      ? hf * wf * B
                                      : 0;
  const int64_t slice = std::max<int64_t>(1, kSliceTaps / unit) * unit;
  const bool at_once = taps_at_once(w, slice);
  float* frame = scratch;
  float* tile_scratch = scratch + plan.frame_floats;
  const int64_t sh = plan.subsample ? 1 : p.stride_h, sw = plan.subsample ? 1 : p.stride_w;
  for (int64_t n0 = 0; n0 < in.n; n0 += plan.chunk) {
    const int64_t nn = std::min(plan.chunk, in.n - n0);
    const float* base = in.data + n0 * in.image_stride;
    if (plan.subsample) {
      // by rows of the frame, each task all the planes of its rows: the
      // threads then mostly read the positions they copied
      const int64_t planes = cin_eff / lanes;
      detail::parallel_for(threads, nn * hf, [&](int64_t t) {
        const int64_t n = t / hf, r = t % hf;
        for (int64_t c = 0; c < planes; ++c) {
          const float* src = base + n * in.image_stride + (c * in.h + r * p.stride_h) * in.w * lanes;
          float* dst = frame + n * frame_image + (c * hf + r) * wf * lanes;
          if (lanes == 16)
            copy_positions<16>(src, p.stride_w, wf, dst);
          else
            copy_positions<8>(src, p.stride_w, wf, dst);
        }
      });
    } else if (plan.copy_frame) {
      // zero-padded copies of the chunk's channel planes
      const int64_t planes = nn * (cin_eff / lanes);
      detail::parallel_for(threads, planes, [&](int64_t t) {
        const int64_t n = t / (cin_eff / lanes), c = t % (cin_eff / lanes);
        pad_plane(base + n * in.image_stride + c * in.h * in.w * lanes, in.h, in.w, p.pad_top,
                  p.pad_left, hf, wf, lanes, frame + n * frame_image + c * hf * wf * lanes);
      });
    }
    const float* frames = plan.copy_frame ? frame : base;
    if (!w.blocked_input && w.cout <= B && p.stride_w == 1 && out.w >= B && !e.residual) {
      // positions along the lanes (lanes_row): one task per output row
      const int64_t rows_all = nn * out.h;
      detail::parallel_for(threads, rows_all, [&](int64_t t) {
        const int64_t n = t / out.h, oh = t % out.h;
        lanes_row(frames + n * frame_image + oh * sh * wf, plan.koff.data(), w.taps,
                  w.panels.data(), static_cast<int>(w.cout), out.w, e.bias,
                  out.data + (n0 + n) * out.image_stride + oh * out.w * B, e.act);
      });
      continue;
    }
    // Tasks: when the images outweigh the weights, blocks of each image's
    // positions, an image's split among the threads at small batches
    // (the elementwise steps and pools split them alike, blocked_ops.cpp): a
    // thread reads the positions it wrote, where a line written by the
    // other core costs several times a local one, and the next layer's
    // writes do not first take lines back from the other core. When the
    // weights outweigh the images (deep layers on small images), whole
    // images when there are 8 per thread, else the panels split first, then
    // the positions, so each core reads part of the weights.
    const int64_t want = 8 * static_cast<int64_t>(threads);
    const bool spatial = nn * (cin_eff * hf * wf + out_blocks * B * P) >= w.taps * w.cout;
    const int64_t oblocks = spatial ? 1 : std::clamp<int64_t>((want + nn - 1) / nn, 1, panels);
    const int64_t oblock = (panels + oblocks - 1) / oblocks;
    const int64_t ochunks = (panels + oblock - 1) / oblock;
    // By positions: blocks of at most 96 (each such block reads all the
    // weights once, whatever the task size), each image split in at least as
    // many as give every thread the same share, in multiples of 4 positions
    // (the short tiles' rows).
    const int64_t split = spatial ? std::max<int64_t>(1, threads / std::gcd<int64_t>(nn, threads))
                                  : std::max<int64_t>(1, (want + nn * ochunks - 1) / (nn * ochunks));
    const int64_t pblock = spatial ? std::min(kBlockTiles * MR, round_up((P + split - 1) / split, 4))
                                   : round_up((P + split - 1) / split, MR);
    const int64_t pblocks = (P + pblock - 1) / pblock;
    const int64_t tasks = nn * ochunks * pblocks;
    auto first_panel = [&](int64_t t) { return ((t / pblocks) % ochunks) * oblock; };
    // One task: image n's positions [q_begin, q_end) for panels [u_begin, u_end),
    // with the calling thread's tile scratch and row pointers; next_task: the
    // task this thread runs next (-1: none), whose weights it fetches ahead.
    auto run_task = [&](int64_t t, int64_t next_task, float* tiles, const float** rows) {
      const int64_t n = t / (ochunks * pblocks);
      const int64_t u_begin = first_panel(t);
      const int64_t u_end = std::min(panels, u_begin + oblock);
      const int64_t next_u = next_task < 0 ? -1 : first_panel(next_task);
      const int64_t q_begin = (t % pblocks) * pblock, q_end = std::min(P, q_begin + pblock);
      const float* xg = frames + n * frame_image;
      float* out_image = out.data + (n0 + n) * out.image_stride;
      const float* res_image =
          e.residual ? e.residual + (n0 + n) * e.residual_image_stride : nullptr;
      // blocks of kBlockTiles tiles: of up to MR + 1 rows where tiles may
      // have them, the blocks evened out (split_tiles); else of MR rows, the
      // last one short
      const int64_t n_task = q_end - q_begin;
      const bool even_blocks = tiles_of_mr_plus_one(B);
      const int64_t block_rows = even_blocks ? kBlockRows : kBlockTiles * MR;
      const int64_t nblocks = (n_task + block_rows - 1) / block_rows;
      for (int64_t bi = 0; bi < nblocks; ++bi) {
        const int64_t qb = q_begin + (even_blocks ? n_task * bi / nblocks : bi * block_rows);
        const int64_t qe = even_blocks ? q_begin + n_task * (bi + 1) / nblocks
                                       : std::min(q_end, qb + block_rows);
        int64_t tile_q0[kBlockTiles + 1];
        const int64_t ntiles = split_tiles(qb, qe, B, tile_q0);
        for (int64_t q = qb, oh = qb / out.w, ow = qb % out.w; q < qe; ++q) {
          rows[q - qb] = xg + (oh * sh * wf + ow * sw) * lanes;
          if (++ow == out.w) ow = 0, ++oh;
        }
        for (int64_t u = u_begin; u < u_end; ++u) {
          const std::size_t ui = static_cast<std::size_t>(u);
          const float* b = w.panels.data() + w.panel_offset[ui];
          const int64_t* koff = plan.koff.data() + w.panel_tap0[ui];
          const int64_t taps = w.panel_taps[ui];
          const int nr = static_cast<int>(std::min<int64_t>(w.width, w.cout - u * w.width));
          const int64_t jb0 = u * blocks_per_panel;
          const int64_t nb = std::min(blocks_per_panel, out_blocks - jb0);
          // the panel read after this one: the task's next, or (after its
          // last block of positions) the next task's first when it differs
          const int64_t after = u + 1 < u_end                                ? u + 1
                                : qe == q_end && next_u >= 0 && next_u != u ? next_u
                                                                              : -1;
          const float* after_w =
              after < 0 ? nullptr
                        : w.panels.data() + w.panel_offset[static_cast<std::size_t>(after)];
          const int64_t after_floats =
              after < 0 ? 0 : w.panel_taps[static_cast<std::size_t>(after)] * NR;
          if (at_once) {
            for (int64_t t = 0; t < ntiles; ++t) {
              const int64_t q0 = tile_q0[t];
              gather_store(taps, koff, rows + (q0 - qb), b, static_cast<int>(tile_q0[t + 1] - q0),
                           nb, e.bias ? e.bias + jb0 * B : nullptr,
                           res_image ? res_image + (jb0 * P + q0) * B : nullptr, P * B,
                           out_image + (jb0 * P + q0) * B, P * B, e.act, pointwise_plane,
                           ahead_part(after_w, after_floats, t, ntiles));
            }
            continue;
          }
          for (int64_t k0 = 0; k0 < taps; k0 += slice) {
            const int64_t kc = std::min(slice, taps - k0);
            // the panel's next slice, else the next panel's first
            const bool more = k0 + slice < taps;
            const float* next = more ? b + (k0 + slice) * NR : after_w;
            const int64_t next_floats = more ? std::min(slice, taps - k0 - slice) * NR
                                             : std::min(slice * NR, after_floats);
            for (int64_t t = 0; t < ntiles; ++t) {
              const int64_t q0 = tile_q0[t];
              gemm::gather_kernel(kc, koff + k0, rows + (q0 - qb), b + k0 * NR,
                                  tiles + (q0 - qb) * NR, static_cast<int>(tile_q0[t + 1] - q0),
                                  k0 > 0, nr, ahead_part(next, next_floats, t, ntiles));
            }
          }
          store_tile(tiles, qe - qb, nb, e.bias ? e.bias + jb0 * B : nullptr,
                     res_image ? res_image + (jb0 * P + qb) * B : nullptr, P * B,
                     out_image + (jb0 * P + qb) * B, P * B, e.act);
        }
      }
    };
    const int team = static_cast<int>(std::min<int64_t>(threads, tasks));
    if (team <= 1) {  // no OpenMP region for one thread (see detail::parallel_for)
      const float* rows[kBlockRows];
      for (int64_t t = 0; t < tasks; ++t)
        run_task(t, t + 1 < tasks ? t + 1 : -1, tile_scratch, rows);
      continue;
    }
    // Each thread runs a contiguous range of the tasks, so it knows its next
    // one and fetches that one's weights ahead, and takes the others' last
    // tasks when it is done with its own (StealingRanges).
    detail::StealingRanges ranges(team, tasks);
#pragma omp parallel num_threads(team)
    {
      const int me = omp_get_thread_num();
      float* tiles = tile_scratch + me * plan.tile_floats;
      const float* rows[kBlockRows];
      const int64_t own_end = tasks * (me + 1) / team;
      for (int64_t t = ranges.next(me); t >= 0; t = ranges.next(me))
        run_task(t, t + 1 < own_end ? t + 1 : -1, tiles, rows);
    }
  }
}

}  // namespace blocked
}  // namespace convcore
