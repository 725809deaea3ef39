// 2-D convolution on the direct kernel (gemm::gather_kernel): forward,
// grad_input (as a forward convolution at stride 1, by phases when strided)
// and grad_weight, each over zero-padded copies of the images, with no
// im2col packing.
#include <omp.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "conv_kernels.h"
#include "conv_plan.h"
#include "gemm.h"
#include "strided.h"

namespace convcore {
namespace conv2d_impl {

namespace {

// Copies the n images at x (strides of G) into Hp x Wp planes, zero padded:
// plane (image, channel) at out + (image * C + channel) * Hp * Wp, input row
// ih at plane row ih + pad_top (rows and columns past Hp, Wp are dropped:
// no output reads them).
template <typename T>
void pad_planes(const T* x, int64_t n, const ConvGeometry& G, int64_t Hp, int64_t Wp, T* out) {
  const int64_t plane = Hp * Wp;
  const int64_t lo = std::clamp<int64_t>(G.p.pad_left, 0, Wp);
  const int64_t hi = std::clamp<int64_t>(G.p.pad_left + G.W, lo, Wp);
#pragma omp parallel for num_threads(detail::threads_for(n * G.C, n * G.C * plane)) schedule(static)
  for (int64_t u = 0; u < n * G.C; ++u) {
    const T* src = x + (u / G.C) * G.xs_n + (u % G.C) * G.xs_c;
    T* dst = out + u * plane;
    for (int64_t r = 0; r < Hp; ++r) {
      const int64_t ih = r - G.p.pad_top;
      T* drow = dst + r * Wp;
      if (ih < 0 || ih >= G.H) {
        detail::zero_run(drow, Wp);
        continue;
      }
      detail::zero_run(drow, lo);
      const T* srow = src + ih * G.xs_h + (lo - G.p.pad_left) * G.xs_w;
      if (G.xs_w == 1)
        detail::copy_run(srow, hi - lo, drow + lo);
      else
        for (int64_t j = 0; j < hi - lo; ++j) drow[lo + j] = srow[j * G.xs_w];
      detail::zero_run(drow + hi, Wp - hi);
    }
  }
}

// Offset of each tap (c, i, j) of a group, in the weights' order, inside its
// zero-padded frame: planes `plane` apart, rows Wp apart.
std::vector<int64_t> tap_offsets(const ConvGeometry& G, int64_t plane, int64_t Wp) {
  std::vector<int64_t> koff(static_cast<size_t>(G.Kc));
  for (int64_t c = 0; c < G.Cg; ++c)
    for (int64_t i = 0; i < G.KH; ++i)
      for (int64_t j = 0; j < G.KW; ++j)
        koff[static_cast<size_t>((c * G.KH + i) * G.KW + j)] =
            c * plane + i * G.p.dilation_h * Wp + j * G.p.dilation_w;
  return koff;
}

// The direct forward with output positions in the vector lanes
// (forward_direct_lanes): tile[i * VW + l] = sum over k < K of
// panel[k * PR + i] * src[koff[k] + l] for the RB rows i of a panel packed
// PR rows a tap and VW = VP vectors of positions. Each tap loads VP vectors
// of consecutive input columns once for RB output channels, whose weights
// are broadcast from one line of the panel.
template <typename T, typename V, int PR, int VP, int RB>
CONVCORE_ALWAYS_INLINE void lanes_sums(int64_t K, const int64_t* koff, const T* src,
                                       const T* panel, T* tile) {
  constexpr int W = sizeof(V) / sizeof(T), VW = VP * W;
  V acc[RB][VP];
#pragma GCC unroll 8
  for (int i = 0; i < RB; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < VP; ++v) acc[i][v] = V{};
  for (int64_t k = 0; k < K; ++k, panel += PR) {
    const T* s = src + koff[k];
    V x[VP];
#pragma GCC unroll 4
    for (int v = 0; v < VP; ++v) simd::load_vec(x[v], s + v * W);
#pragma GCC unroll 8
    for (int i = 0; i < RB; ++i) {
      const T w = panel[i];
#pragma GCC unroll 4
      for (int v = 0; v < VP; ++v) acc[i][v] += w * x[v];
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < RB; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < VP; ++v) simd::store_vec(tile + i * VW + v * W, acc[i][v]);
}

// lanes_sums for `rows` (1 to PR) rows of the panel.
template <typename T, typename V, int PR, int VP, int RB = PR>
CONVCORE_ALWAYS_INLINE void lanes_rows(int rows, int64_t K, const int64_t* koff, const T* src,
                                       const T* panel, T* tile) {
  if constexpr (RB > 1) {
    if (rows < RB) return lanes_rows<T, V, PR, VP, RB - 1>(rows, K, koff, src, panel, tile);
  }
  lanes_sums<T, V, PR, VP, RB>(K, koff, src, panel, tile);
}

// Panel rows (PR) and vectors (VP) of a block per instruction set level:
// 24 accumulators in AVX-512's 32 registers, 12 in AVX2's 16, 8 in SSE2's
// 16 (the baseline).
constexpr int kLanesRows512 = 8, kLanesVectors512 = 3;
constexpr int kLanesRows256 = 6, kLanesVectors256 = 2;
constexpr int kLanesRows128 = 4, kLanesVectors128 = 2;
struct LanesShape {
  int rows;       // PR
  int64_t width;  // positions a block: VP vectors
};
template <typename T>
LanesShape lanes_shape() {
  constexpr int64_t size = sizeof(T);
  switch (gemm::isa_level()) {
    case 2: return {kLanesRows512, kLanesVectors512 * 64 / size};
    case 1: return {kLanesRows256, kLanesVectors256 * 32 / size};
    default: return {kLanesRows128, kLanesVectors128 * 16 / size};
  }
}

#if defined(CONVCORE_HAVE_VECTOR_TYPES)
#define CONVCORE_LANES_ROWS(T, V512, V256, V128)                                                \
  CONVCORE_ISA_DISPATCH3(lanes_block, (lanes_rows<T, V512, kLanesRows512, kLanesVectors512>),  \
                         (lanes_rows<T, V256, kLanesRows256, kLanesVectors256>),                \
                         (lanes_rows<T, V128, kLanesRows128, kLanesVectors128>),                \
                         (int rows, int64_t K, const int64_t* koff, const T* src,               \
                          const T* panel, T* tile),                                             \
                         (rows, K, koff, src, panel, tile))
CONVCORE_LANES_ROWS(float, simd::f32x16, simd::f32x8, simd::f32x4)
CONVCORE_LANES_ROWS(double, simd::f64x8, simd::f64x4, simd::f64x2)
#undef CONVCORE_LANES_ROWS
#else
template <typename T>
void lanes_block(int rows, int64_t K, const int64_t* koff, const T* src, const T* panel, T* tile) {
  const LanesShape shape = lanes_shape<T>();
  for (int i = 0; i < rows; ++i)
    for (int64_t l = 0; l < shape.width; ++l) {
      T acc = 0;
      for (int64_t k = 0; k < K; ++k) acc += panel[k * shape.rows + i] * src[koff[k] + l];
      tile[i * shape.width + l] = acc;
    }
}
#endif

// One vector of positions of lanes_grad_weight_body (masked: its last).
template <typename T, typename V, typename IV, int RB, int TK, bool MASKED>
CONVCORE_ALWAYS_INLINE void lanes_grad_weight_step(const T* xr, const T* gr, int64_t gy_channel,
                                                   const int64_t* koff, const IV& mask,
                                                   V (&acc)[RB][TK]) {
  V g[RB];
#pragma GCC unroll 8
  for (int i = 0; i < RB; ++i) simd::load_vec(g[i], gr + i * gy_channel);
#pragma GCC unroll 8
  for (int t = 0; t < TK; ++t) {
    V xv;
    simd::load_vec(xv, xr + koff[t]);
    if constexpr (MASKED) xv = (V)((IV)xv & mask);
#pragma GCC unroll 8
    for (int i = 0; i < RB; ++i) acc[i][t] += g[i] * xv;
  }
}

// grad_weight with output positions in the lanes (grad_weight_direct_lanes):
// out[i * TK + t] = sum over the images, output rows and positions of
// gy[i][q] * x[koff[t] + q], for RB output channels i (rows gy_channel
// apart) and TK taps t, each output row's positions in vectors (the last
// one's lanes past the row masked to zero in x, zero in the padded gy), the
// lanes summed at the end in a fixed order.
template <typename T, typename V, typename IV, int RB, int TK>
CONVCORE_ALWAYS_INLINE void lanes_grad_weight_body(int64_t images, int64_t rows, int64_t nvec,
                                                   int64_t tail, const T* x, int64_t x_image,
                                                   int64_t x_row, const int64_t* koff,
                                                   const T* gy, int64_t gy_image,
                                                   int64_t gy_row, int64_t gy_channel, T* out) {
  constexpr int W = sizeof(V) / sizeof(T);
  IV mask;
  for (int l = 0; l < W; ++l) mask[l] = l < tail ? -1 : 0;
  V acc[RB][TK];
#pragma GCC unroll 8
  for (int i = 0; i < RB; ++i)
#pragma GCC unroll 8
    for (int t = 0; t < TK; ++t) acc[i][t] = V{};
  for (int64_t n = 0; n < images; ++n)
    for (int64_t r = 0; r < rows; ++r) {
      const T* xr = x + n * x_image + r * x_row;
      const T* gr = gy + n * gy_image + r * gy_row;
      for (int64_t v = 0; v + 1 < nvec; ++v)
        lanes_grad_weight_step<T, V, IV, RB, TK, false>(xr + v * W, gr + v * W, gy_channel, koff,
                                                        mask, acc);
      lanes_grad_weight_step<T, V, IV, RB, TK, true>(xr + (nvec - 1) * W, gr + (nvec - 1) * W,
                                                     gy_channel, koff, mask, acc);
    }
#pragma GCC unroll 8
  for (int i = 0; i < RB; ++i)
#pragma GCC unroll 8
    for (int t = 0; t < TK; ++t) {
      T sum = 0;
      for (int l = 0; l < W; ++l) sum += acc[i][t][l];
      out[i * TK + t] = sum;
    }
}

// Output channels (RB) and taps (TK) of grad_weight's register tile per
// instruction set level: RB x TK accumulators, RB gy vectors and one of x
// in AVX-512's 32 registers (29), AVX2's and SSE2's 16 (15, 11).
constexpr int kLanesGwRows512 = 4, kLanesGwTaps512 = 6;
constexpr int kLanesGwRows256 = 2, kLanesGwTaps256 = 6;
constexpr int kLanesGwRows128 = 2, kLanesGwTaps128 = 4;
struct LanesGwShape {
  int rows, taps;
  int64_t lanes;
};
template <typename T>
LanesGwShape lanes_gw_shape() {
  constexpr int64_t size = sizeof(T);
  switch (gemm::isa_level()) {
    case 2: return {kLanesGwRows512, kLanesGwTaps512, 64 / size};
    case 1: return {kLanesGwRows256, kLanesGwTaps256, 32 / size};
    default: return {kLanesGwRows128, kLanesGwTaps128, 16 / size};
  }
}
#if defined(CONVCORE_HAVE_VECTOR_TYPES)
#define CONVCORE_LANES_GW(T, V512, IV512, V256, IV256, V128, IV128)                            \
  CONVCORE_ISA_DISPATCH3(                                                                      \
      lanes_grad_weight,                                                                       \
      (lanes_grad_weight_body<T, V512, IV512, kLanesGwRows512, kLanesGwTaps512>),              \
      (lanes_grad_weight_body<T, V256, IV256, kLanesGwRows256, kLanesGwTaps256>),              \
      (lanes_grad_weight_body<T, V128, IV128, kLanesGwRows128, kLanesGwTaps128>),              \
      (int64_t images, int64_t rows, int64_t nvec, int64_t tail, const T* x, int64_t x_image,  \
       int64_t x_row, const int64_t* koff, const T* gy, int64_t gy_image, int64_t gy_row,      \
       int64_t gy_channel, T* out),                                                            \
      (images, rows, nvec, tail, x, x_image, x_row, koff, gy, gy_image, gy_row, gy_channel, out))
CONVCORE_LANES_GW(float, simd::f32x16, simd::i32x16, simd::f32x8, simd::i32x8, simd::f32x4,
                  simd::i32x4)
CONVCORE_LANES_GW(double, simd::f64x8, simd::i64x8, simd::f64x4, simd::i64x4, simd::f64x2,
                  simd::i64x2)
#undef CONVCORE_LANES_GW
#endif

// Whether auto's direct grad_weight takes grad_weight_direct_lanes: stride
// 1 along rows, at most 24 output channels a group with AVX-512, 16 with
// AVX2, whose tile of 2 channels by 6 taps loads 8 vectors for 12 FMAs, and
// 64 vectors of positions or more, which each task sums before its
// reductions across the lanes (docs/training.md, thirtieth session: 24
// channels 0.8x with AVX2; LeNet's 6 -> 16 at batch 1, 10 vectors, 0.73x).
constexpr int64_t kLanesGradWeightMinVectors = 64;

bool lanes_grad_weight_pays(const ConvGeometry& G) {
#if defined(CONVCORE_HAVE_VECTOR_TYPES)
  const int64_t most = gemm::isa_level() >= 2 ? 24 : 16;
  const int64_t lanes = lanes_gw_shape<float>().lanes;
  return G.auto_algorithm && G.p.stride_w == 1 && G.Coutg <= most &&
         G.N * G.Ho * ((G.Wo + lanes - 1) / lanes) >= kLanesGradWeightMinVectors;
#else
  return false;
#endif
}

}  // namespace

// Whether auto's direct forward takes forward_direct_lanes: stride 1 along
// rows and at most 24 output channels a group. Against forward_direct, both
// instruction sets: 3 to 24 channels 1.2-5x faster, 32 and more slower
// (docs/training.md, thirtieth session).
constexpr int64_t kLanesMostChannels = 24;

bool direct_lanes_pay(const ConvGeometry& G) {
#if defined(CONVCORE_HAVE_VECTOR_TYPES)
  return G.auto_algorithm && G.p.stride_w == 1 && G.Coutg <= kLanesMostChannels;
#else
  return false;
#endif
}

template <typename T>
void forward_direct_lanes(const TensorView& input, const T* weight, const T* bias,
                          const ConvGeometry& G, const ForwardDirectSplit& split, T* out,
                          bool flipped);

// How forward_direct splits its work: chunks of images, blocks of output
// channels and positions.
template <typename T>
ForwardDirectSplit forward_direct_split(const ConvGeometry& G) {
  constexpr int MR = gemm::Tile<T>::MR, NR = gemm::Tile<T>::NR;
  const int64_t Hp = (G.Ho - 1) * G.p.stride_h + (G.KH - 1) * G.p.dilation_h + 1;
  const int64_t Wp = (G.Wo - 1) * G.p.stride_w + (G.KW - 1) * G.p.dilation_w + 1;
  const int64_t image = G.C * Hp * Wp, panels = (G.Coutg + NR - 1) / NR;
  // Images are padded in chunks of at most kChunkBytes.
  constexpr int64_t kChunkBytes = int64_t(8) << 20;
  const int64_t chunk = std::clamp<int64_t>(kChunkBytes / (image * int64_t(sizeof(T))), 1, G.N);
  // Tasks: whole images when a chunk has 8 per thread. With fewer, split
  // the output channels first (each task then reads only its panels of the
  // weights: 3.5 MB in all for AlexNet's conv3, which tasks splitting
  // positions would each stream from memory), then the positions. Two tasks
  // per thread left threads idle at each chunk's end (ResNet 3x3/2: 4
  // images of 1.7 MB per 8 MB chunk); eight: ResNet 3x3/2 forward 1.16-1.21x,
  // dilated 3x3 1.12x, AlexNet conv4 at batch 1 1.25x (2-core Zen 3).
  const int64_t want = 8 * static_cast<int64_t>(get_num_threads());
  const int64_t images = chunk * G.G;
  const int64_t oblocks = std::clamp<int64_t>((want + images - 1) / images, 1, panels);
  const int64_t oblock = (panels + oblocks - 1) / oblocks;  // panels per task
  const int64_t pieces = std::max<int64_t>(1, (want + images * oblocks - 1) / (images * oblocks));
  const int64_t pblock = gemm::round_up((G.P + pieces - 1) / pieces, MR);
  const int64_t pblocks = (G.P + pblock - 1) / pblock;
  const int64_t ochunks = (panels + oblock - 1) / oblock;
  ForwardDirectSplit split;
  split.chunk = chunk, split.oblock = oblock, split.ochunks = ochunks;
  split.pblock = pblock, split.pblocks = pblocks;
  split.lanes = direct_lanes_pay(G);
  if (split.lanes) {
    const int64_t width = lanes_shape<T>().width;
    split.lanes_flat = G.p.stride_h == 1 && Wp - G.Wo <= gemm::round_up(G.Wo, width) - G.Wo;
  }
  return split;
}

// Direct convolution: the GEMM of forward_gemm turned around, so that
// nothing is packed per tile. Output positions are the rows of a tile (MR of
// them, in output order, across row ends), output channels its columns (one
// NR-wide panel of the packed weights, B(k, o) = weight[o, k]); the
// microkernel broadcasts input values straight from a zero-padded copy of
// the image (gemm::gather_kernel: row i of the tile reads the window of
// position i, tap k at a fixed offset koff[k] inside it), so strides and
// dilations cost nothing extra, and no im2col block is packed: for 64
// channels that packing took a fifth of forward_gemm's time. The tile is
// then written transposed into the NCHW output. Images are padded in chunks
// of at most kChunkBytes; tasks are (image, block of positions).
//
// The tiles of a task go in blocks of kDirectBlockTiles (96 positions), each
// block taking every panel of the task with the taps in slices of
// kDirectTaps, so that the block's rows of the image and the slice of the
// panel stay in cache while all the block's tiles use them. One tile at a
// time over all K taps streamed the whole panel (300 KB for AlexNet's conv2)
// through L2 per tile. A/B on a 2-core Zen 3 (AVX2), min of 8 interleaved
// runs: AlexNet conv2 forward 1.10x (155 -> 171 GFLOP/s, 2 threads) and
// backward 1.08x, 13x13 at batch 1 1.12x, ResNet 3x3/2 1.05x, the rest level;
// 128 or 512 taps and 4 or 16 tiles measured the same within 2%; blocks of
// one tile with sliced taps lost 3-15%.
constexpr int64_t kDirectTaps = 256, kDirectBlockTiles = 8;

template <typename T>
void forward_direct(const TensorView& input, const T* weight, const T* bias,
                    const ConvGeometry& G, const ForwardDirectSplit& split, T* out,
                    bool flipped) {
  if (split.lanes) return forward_direct_lanes(input, weight, bias, G, split, out, flipped);
  constexpr int MR = gemm::Tile<T>::MR, NR = gemm::Tile<T>::NR;
  const int64_t sh = G.p.stride_h, sw = G.p.stride_w, dh = G.p.dilation_h, dw = G.p.dilation_w;
  // The padded frame holds exactly what the output reads.
  const int64_t Hp = (G.Ho - 1) * sh + (G.KH - 1) * dh + 1;
  const int64_t Wp = (G.Wo - 1) * sw + (G.KW - 1) * dw + 1;
  const int64_t plane = Hp * Wp, image = G.C * plane;
  const int64_t K = G.Kc, panels = (G.Coutg + NR - 1) / NR;
  // Taps in slices of up to kDirectTaps: blocks of cb channels, each
  // ordered (kernel row i, channel c, column j), so that inside a slice
  // each kernel row is one run of taps and a tile whose positions all read
  // zero padding rows for some i skips that run (row_range). A/B against
  // the same slices in (c, i, j) order without skipping (2-core Zen 3, min
  // of 8, two runs): AlexNet conv2 forward 1.04-1.05x (5x5 / pad 2 on
  // 27x27: 4.4% of its taps skipped), backward 1.02x (its grad_input is
  // this forward), conv4 at batch 1 1.04-1.05x, ResNet conv1 0.97-0.98x. A
  // third, noisier run gave conv4 and VGG conv5_2 at batch 1 1.18-1.20x
  // and 1.13-1.14x, ResNet conv1 1.01x (and conv2 forward 0.98x and 1.16x
  // for two settings that ran the same code).
  const int64_t khw = G.KH * G.KW, cb = std::max<int64_t>(1, kDirectTaps / khw);
  // The kernel rows [*lo, *hi) that positions [q0, q1) read inside the
  // image: some position's frame row oh * sh + i * dh in [pad_top, pad_top + H).
  auto row_range = [&](int64_t q0, int64_t q1, int64_t* lo, int64_t* hi) {
    const int64_t top = G.p.pad_top - (q1 - 1) / G.Wo * sh;
    const int64_t bottom = G.p.pad_top + G.H - 1 - q0 / G.Wo * sh;
    *lo = std::min(G.KH, top <= 0 ? 0 : (top + dh - 1) / dh);
    *hi = std::max(*lo, bottom < 0 ? 0 : std::min(G.KH, bottom / dh + 1));
  };
  // slice_tap[t]: where tap t = (c, i, j) of the weights' order goes, inside
  // the slice of nc channels from c0; koff: each slice tap's input offset.
  std::vector<int64_t> slice_tap(static_cast<size_t>(K)), koff(static_cast<size_t>(K));
  for (int64_t c = 0; c < G.Cg; ++c)
    for (int64_t i = 0; i < G.KH; ++i)
      for (int64_t j = 0; j < G.KW; ++j) {
        const int64_t c0 = c / cb * cb, nc = std::min(cb, G.Cg - c0);
        const int64_t t = c0 * khw + (i * nc + c - c0) * G.KW + j;
        slice_tap[static_cast<size_t>((c * G.KH + i) * G.KW + j)] = t;
        koff[static_cast<size_t>(t)] = c * plane + i * dh * Wp + j * dw;
      }
  // Weights: per group, `panels` panels of K x NR in the slices' tap order,
  // B(slice_tap[t], j) = weight[o0 + j, t]: each panel's output channels
  // transposed into its columns.
  // Flipped: weight is the layer's whose grad_input this forward computes,
  // laid out [group * Cg + c][Coutg][KH][KW] in this forward's terms, and
  // this forward's tap (c, i, j) of output channel o is its element
  // (c, o, KH - 1 - i, KW - 1 - j). Per input channel c a panel's NR output
  // channels are one run of NR x khw, transposed with the taps reversed
  // (flipped_tap).
  std::vector<int64_t> flipped_tap(flipped ? static_cast<size_t>(K) : 0);
  for (size_t t = 0; t < flipped_tap.size(); ++t)
    flipped_tap[t] = slice_tap[t / khw * khw + (khw - 1 - t % khw)];
  auto pack_panel = [&](int64_t u, T* panel) {  // u: g * panels + panel
    const int64_t g = u / panels, o0 = (u % panels) * NR, no = std::min<int64_t>(NR, G.Coutg - o0);
    if (!flipped)
      gemm::transpose_copy(weight + (g * G.Coutg + o0) * K, K, no, K, panel, NR, slice_tap.data());
    else
      for (int64_t c = 0; c < G.Cg; ++c)
        gemm::transpose_copy(weight + ((g * G.Cg + c) * G.Coutg + o0) * khw, khw, no, khw, panel,
                             NR, flipped_tap.data() + c * khw);
    if (no < NR)  // the panel's columns past the last output channel
      for (int64_t k = 0; k < K; ++k) std::fill(panel + k * NR + no, panel + (k + 1) * NR, T(0));
  };
  const int64_t oblock = split.oblock, ochunks = split.ochunks;
  const int64_t pblock = split.pblock, pblocks = split.pblocks;
  // One image in one block of positions (batch 1, small images): each
  // panel serves one task, which packs it into its own buffer just before
  // using it, so the packed copy is read from L2. Packed up front, a deep
  // layer's panels (9 MB at 512 channels, 3x3) went out to memory and back.
  const bool own_panels = G.N == 1 && pblocks == 1;
  detail::Workspace<T> w_ws(1, own_panels ? 0 : G.G * panels * K * NR);
  T* wpacked = w_ws.get();
  if (!own_panels) {
#pragma omp parallel for num_threads(detail::threads_for(G.G * panels, G.Cout * K)) schedule(static)
    for (int64_t u = 0; u < G.G * panels; ++u) pack_panel(u, wpacked + u * K * NR);
  }
  const int64_t chunk = split.chunk;
  detail::Workspace<T> x_ws(1, chunk * image);
  T* xpad = x_ws.get();
  const int64_t work = G.N * G.Cout * G.P * K;
  const T* x = input.ptr<const T>();
  for (int64_t n0 = 0; n0 < G.N; n0 += chunk) {
    const int64_t nn = std::min(chunk, G.N - n0);
    pad_planes(x + n0 * G.xs_n, nn, G, Hp, Wp, xpad);
    const int64_t tasks = nn * G.G * ochunks * pblocks;
    const int threads = detail::threads_for(tasks, work);
    detail::Workspace<T> tile_ws(threads, kDirectBlockTiles * MR * NR);
    detail::Workspace<T> panel_ws(own_panels ? threads : 0, oblock * K * NR);
    // Each thread runs a contiguous range of the tasks (an image's positions
    // stay with the thread whose range they are in) and takes the others'
    // last tasks when done with its own.
    detail::StealingRanges ranges(threads, tasks);
#pragma omp parallel num_threads(threads)
    {
      const int me = omp_get_thread_num();
      T* tiles = tile_ws.get(me);
      T* own = own_panels ? panel_ws.get(me) : nullptr;
      for (int64_t t = ranges.next(me); t >= 0; t = ranges.next(me)) {
        const int64_t n = t / (G.G * ochunks * pblocks), g = (t / (ochunks * pblocks)) % G.G;
        const int64_t u_begin = ((t / pblocks) % ochunks) * oblock;
        const int64_t u_end = std::min(panels, u_begin + oblock);
        const int64_t q_begin = (t % pblocks) * pblock, q_end = std::min(G.P, q_begin + pblock);
        const T* xg = xpad + (n * G.C + g * G.Cg) * plane;
        for (int64_t qb = q_begin; qb < q_end; qb += kDirectBlockTiles * MR) {
          const int64_t qe = std::min(q_end, qb + kDirectBlockTiles * MR);
          // The window of each position of the block, found once for all
          // its panels and slices; the block's tiles [tile_q0[i], tile_q0[i + 1])
          // (a last tile of MR + 1 rows runs as one) and the kernel rows
          // each reads.
          const T* rows[kDirectBlockTiles * MR];
          for (int64_t q = qb, oh = qb / G.Wo, ow = qb % G.Wo; q < qe; ++q) {
            rows[q - qb] = xg + oh * sh * Wp + ow * sw;
            if (++ow == G.Wo) ow = 0, ++oh;
          }
          int64_t tile_q0[kDirectBlockTiles + 1], ntiles = 0;
          int64_t row_lo[kDirectBlockTiles], row_hi[kDirectBlockTiles];
          for (int64_t q0 = qb; q0 < qe; ++ntiles) {
            const int64_t q1 = q0 + gemm::gather_tile_rows(qe - q0);
            tile_q0[ntiles] = q0;
            row_range(q0, q1, &row_lo[ntiles], &row_hi[ntiles]);
            q0 = q1;
          }
          tile_q0[ntiles] = qe;
          for (int64_t u = u_begin; u < u_end; ++u) {
            const int64_t o0 = u * NR, no = std::min<int64_t>(NR, G.Coutg - o0);
            const T* b;
            if (own_panels) {
              T* panel = own + (u - u_begin) * K * NR;
              if (qb == q_begin) pack_panel(g * panels + u, panel);
              b = panel;
            } else {
              b = wpacked + (g * panels + u) * K * NR;
            }
            for (int64_t c0 = 0; c0 < G.Cg; c0 += cb) {  // a slice: channels [c0, c0 + nc)
              const int64_t nc = std::min(cb, G.Cg - c0), k0 = c0 * khw;
              for (int64_t i = 0; i < ntiles; ++i) {
                const int64_t q0 = tile_q0[i];
                const int64_t lo = k0 + row_lo[i] * nc * G.KW, hi = k0 + row_hi[i] * nc * G.KW;
                if (lo < hi)
                  gemm::gather_kernel(hi - lo, koff.data() + lo, rows + (q0 - qb), b + lo * NR,
                                      tiles + (q0 - qb) * NR,
                                      static_cast<int>(tile_q0[i + 1] - q0), c0 > 0);
              }
            }
            for (int64_t i = 0; i < ntiles; ++i)  // all taps in the padding
              if (row_lo[i] >= row_hi[i])
                std::fill(tiles + (tile_q0[i] - qb) * NR, tiles + (tile_q0[i + 1] - qb) * NR, T(0));
            T* c = out + ((n0 + n) * G.Cout + g * G.Coutg + o0) * G.P;
            gemm::store_transposed(tiles, qe - qb, no, bias ? bias + g * G.Coutg + o0 : nullptr,
                                   c + qb, G.P);
          }
        }
      }
    }
  }
}

// Direct convolution with the output positions in the vector lanes, for
// layers with few output channels a group (the split's `lanes`, stride 1
// along rows): forward_direct puts output channels in the lanes, so 3, 8 or
// 16 channels left most of a 32-column panel empty. Here a block of VW
// consecutive output positions reads, per tap, VW consecutive columns of
// the zero-padded frame (lanes_block), for PR output channels at a time.
// Blocks follow one output row (lanes_flat false), or with stride 1 the
// frame's rows as one long row of pitch Wp (lanes_flat), computing Wp - Wo
// discarded positions a row instead of a short last block per row (7 of 16
// lanes used on a 7x7 output). The same zero-padded frames as
// forward_direct; their end has VW elements of slack that the last block's
// discarded lanes read.
template <typename T>
void forward_direct_lanes(const TensorView& input, const T* weight, const T* bias,
                          const ConvGeometry& G, const ForwardDirectSplit& split, T* out,
                          bool flipped) {
  const LanesShape shape = lanes_shape<T>();
  const int PR = shape.rows;
  const int64_t VW = shape.width;
  const int64_t sh = G.p.stride_h, dh = G.p.dilation_h, dw = G.p.dilation_w;
  const int64_t Hp = (G.Ho - 1) * sh + (G.KH - 1) * dh + 1;
  const int64_t Wp = (G.Wo - 1) + (G.KW - 1) * dw + 1;
  const int64_t plane = Hp * Wp, image = G.C * plane;
  const int64_t K = G.Kc, khw = G.KH * G.KW, panels = (G.Coutg + PR - 1) / PR;
  const std::vector<int64_t> koff = tap_offsets(G, plane, Wp);
  // Panels of PR output channels a tap: wp[((g * panels + u) * K + k) * PR + r]
  // is tap k of output channel u * PR + r of group g (zero past Coutg).
  // Flipped: as forward_direct's.
  detail::Workspace<T> w_ws(1, G.G * panels * K * PR);
  T* wp = w_ws.get();
  const int pack_threads = detail::threads_for(G.G * panels, G.Cout * K);
  detail::parallel_for(pack_threads, G.G * panels, [&](int64_t gu) {
    const int64_t g = gu / panels, o0 = (gu % panels) * PR;
    T* panel = wp + gu * K * PR;
    for (int r = 0; r < PR; ++r) {
      const int64_t o = o0 + r;
      for (int64_t k = 0; k < K; ++k) {
        T v = T(0);
        if (o < G.Coutg)
          v = flipped ? weight[((g * G.Cg + k / khw) * G.Coutg + o) * khw + (khw - 1 - k % khw)]
                      : weight[(g * G.Coutg + o) * K + k];
        panel[k * PR + r] = v;
      }
    }
  });
  // Segments of positions: the whole output (flat), or each output row.
  const bool flat = split.lanes_flat;
  const int64_t segments = flat ? 1 : G.Ho;
  const int64_t seg_len = flat ? (G.Ho - 1) * Wp + G.Wo : G.Wo;
  const int64_t pitch = flat ? Wp : seg_len;  // position j of a segment: row j / pitch
  const int64_t seg_blocks = (seg_len + VW - 1) / VW;
  const int64_t blocks = G.G * segments * seg_blocks;  // an image's
  const int64_t chunk = split.chunk;
  detail::Workspace<T> x_ws(1, chunk * image + VW);
  T* xpad = x_ws.get();
  detail::zero_run(xpad + chunk * image, VW);
  const int64_t work = G.N * G.Cout * G.P * K;
  const T* x = input.ptr<const T>();
  for (int64_t n0 = 0; n0 < G.N; n0 += chunk) {
    const int64_t nn = std::min(chunk, G.N - n0);
    pad_planes(x + n0 * G.xs_n, nn, G, Hp, Wp, xpad);
    if (nn < chunk) detail::zero_run(xpad + nn * image, VW);
    const int64_t tasks = nn * blocks;
    const int threads = detail::threads_for(tasks, work);
    detail::Workspace<T> tile_ws(threads, PR * VW);
#pragma omp parallel num_threads(threads)
    {
      const int me = omp_get_thread_num();
      T* tile = tile_ws.get(me);
      // even contiguous ranges: neighbouring blocks share input rows
      const int team = omp_get_num_threads();
      const int64_t t_begin = tasks * me / team, t_end = tasks * (me + 1) / team;
      for (int64_t t = t_begin; t < t_end; ++t) {
        const int64_t n = t / blocks, g = (t / (segments * seg_blocks)) % G.G;
        const int64_t s = (t / seg_blocks) % segments, j0 = (t % seg_blocks) * VW;
        const int64_t valid = std::min(VW, seg_len - j0);
        const T* src = xpad + (n * G.C + g * G.Cg) * plane + s * sh * Wp + j0;
        for (int64_t u = 0; u < panels; ++u) {
          const int rows = static_cast<int>(std::min<int64_t>(PR, G.Coutg - u * PR));
          lanes_block(rows, K, koff.data(), src, wp + (g * panels + u) * K * PR, tile);
          for (int r = 0; r < rows; ++r) {
            const int64_t o = g * G.Coutg + u * PR + r;
            const T b = bias ? bias[o] : T(0);
            T* dst = out + ((n0 + n) * G.Cout + o) * G.P;
            const T* from = tile + r * VW;
            // runs of the block's positions inside output rows
            for (int64_t l = 0; l < valid;) {
              const int64_t j = j0 + l, col = j % pitch;
              if (col >= G.Wo) {  // the discarded columns past a row's end
                l += pitch - col;
                continue;
              }
              const int64_t len = std::min(G.Wo - col, valid - l);
              T* to = dst + (s + j / pitch) * G.Wo + col;
              for (int64_t q = 0; q < len; ++q) to[q] = from[l + q] + b;
              l += len;
            }
          }
        }
      }
    }
  }
}

// grad_input of a stride-1 convolution is a forward convolution of
// grad_output with the flipped, transposed filters (per group) and padding
// dilation * (k - 1) - p (grad_input_as_forward_geometry), so it runs on the
// forward path: no column buffer, no scatter; on forward_direct or
// forward_gemm as the plan says, with its split of the work.
template <typename T>
void grad_input_as_forward(const T* gy, const T* weight, const ConvGeometry& G,
                           const ConvPlan& plan, T* gx) {
  const bool direct = plan.grad_input == GradInputPath::AsForwardDirect;
  const DType dtype = std::is_same_v<T, float> ? DType::Float32 : DType::Float64;
  const int64_t gshape[4] = {G.N, G.Cout, G.Ho, G.Wo};
  const TensorView gyv = contiguous_view(const_cast<T*>(gy), dtype, 4, gshape);
  ConvGeometry F = grad_input_as_forward_geometry(G);
  F.p.algorithm = direct ? ConvAlgorithm::Direct : ConvAlgorithm::Gemm;
  if (direct) {  // flips the filters as it packs them
    forward_direct<T>(gyv, weight, nullptr, F, plan.direct_split, gx, true);
    return;
  }
  // flipped[g * Cg + c, o, i, j] = weight[g * Coutg + o, c, KH - 1 - i, KW - 1 - j]
  detail::Workspace<T> w_ws(1, G.Cout * G.Kc);
  T* flipped = w_ws.get();
  const int64_t khw = G.KH * G.KW;
  // in parallel: at batch 1 the copy is as costly as the products (512
  // channels at 7x7: 0.8 of 1.7 ms on one thread)
  detail::parallel_for(detail::threads_for(G.C, G.Cout * G.Kc), G.C, [&](int64_t gc) {
    const int64_t g = gc / G.Cg, c = gc % G.Cg;
    for (int64_t o = 0; o < G.Coutg; ++o) {
      const T* src = weight + ((g * G.Coutg + o) * G.Cg + c) * khw;
      T* dst = flipped + (gc * G.Coutg + o) * khw;
      for (int64_t k = 0; k < khw; ++k) dst[k] = src[khw - 1 - k];
    }
  });
  const int64_t wshape[4] = {G.C, G.Coutg, G.KH, G.KW};
  const TensorView wv = contiguous_view(flipped, dtype, 4, wshape);
  const detail::Contiguous<T> wc(wv);
  forward_gemm<T>(gyv, wc, nullptr, F, plan.gemm_split, gx);
}

// How grad_input_direct_strided splits its work: images per framed chunk,
// blocks of input positions per (image, group, phase).
template <typename T>
GradInputDirectSplit grad_input_direct_split(const ConvGeometry& G) {
  constexpr int MR = gemm::Tile<T>::MR;
  const int64_t sh = G.p.stride_h, sw = G.p.stride_w;
  const int64_t Mh = (G.KH - 1) * G.p.dilation_h / sh, Mw = (G.KW - 1) * G.p.dilation_w / sw;
  const int64_t Hf = std::max((G.H - 1 + G.p.pad_top) / sh, G.Ho - 1) + Mh + 1;
  const int64_t Wf = std::max((G.W - 1 + G.p.pad_left) / sw, G.Wo - 1) + Mw + 1;
  const int64_t frame = G.Cout * Hf * Wf, phases = sh * sw;
  constexpr int64_t kChunkBytes = int64_t(8) << 20;
  const int64_t chunk = std::clamp<int64_t>(kChunkBytes / (frame * int64_t(sizeof(T))), 1, G.N);
  // Blocks of input positions per (image, group, phase, panel of input
  // channels): enough tasks for every thread at small batch.
  const int64_t cpanels = (G.Cg + gemm::Tile<T>::NR - 1) / gemm::Tile<T>::NR;
  const int64_t want = 2 * static_cast<int64_t>(get_num_threads());
  const int64_t per_plane = std::max<int64_t>(1, (want + chunk * G.G * phases * cpanels - 1) /
                                                     (chunk * G.G * phases * cpanels));
  const int64_t HWph = ((G.H + sh - 1) / sh) * ((G.W + sw - 1) / sw);  // largest phase
  const int64_t pblock = gemm::round_up((HWph + per_plane - 1) / per_plane, MR);
  GradInputDirectSplit split;
  split.chunk = chunk, split.pblock = pblock, split.pblocks = (HWph + pblock - 1) / pblock;
  return split;
}

// grad_input of a strided convolution on the direct kernel. Input row ih
// receives from the taps kh with kh * dh = ph + sh * m (ph = (ih + pt) mod sh,
// m >= 0) at grad_output row (ih + pt - ph) / sh - m: for each phase
// (ph, pw) of the input a stride-1 sum over its own taps. The tile's rows
// are input positions of one phase, its columns NR input channels (packed
// weights B((o, kh, kw), c) = weight[o, c, kh, kw] over the phase's taps),
// and the kernel reads grad_output in place from a zero-framed copy (row i
// at its (eh, ew) = ((ih + pt - ph) / sh, (iw + pl - pw) / sw), tap k at
// -(m_h * Wf + m_w) plus its channel's plane). Input positions that no tap
// reaches (a phase without taps) get zero. Tasks: (image, group, phase,
// block of positions, panel of input channels), the panels innermost so
// that a thread's tasks share grad_output rows; images are framed in
// chunks. The phases' taps differ (3x3 stride 2: 4, 2, 2 and 1), so tasks
// of whole phases left a thread idle at batch 1.
template <typename T>
void grad_input_direct_strided(const T* gy, const T* weight, const ConvGeometry& G,
                               const GradInputDirectSplit& split, T* gx) {
  constexpr int MR = gemm::Tile<T>::MR, NR = gemm::Tile<T>::NR;
  const int64_t sh = G.p.stride_h, sw = G.p.stride_w, dh = G.p.dilation_h, dw = G.p.dilation_w;
  const int64_t pt = G.p.pad_top, pl = G.p.pad_left;
  const int64_t Mh = (G.KH - 1) * dh / sh, Mw = (G.KW - 1) * dw / sw;  // largest m
  // The frame: grad_output rows -Mh .. (H - 1 + pt) / sh, zero outside [0, Ho).
  const int64_t Hf = std::max((G.H - 1 + pt) / sh, G.Ho - 1) + Mh + 1;
  const int64_t Wf = std::max((G.W - 1 + pl) / sw, G.Wo - 1) + Mw + 1;
  const int64_t fplane = Hf * Wf, frame = G.Cout * fplane;
  const int64_t phases = sh * sw, cpanels = (G.Cg + NR - 1) / NR;
  // Kernel position (kh, kw) belongs to phase ((kh dh) % sh, (kw dw) % sw),
  // as its tap_in_phase-th tap per output channel.
  const int64_t khw = G.KH * G.KW;
  std::vector<int64_t> phase_of(static_cast<size_t>(khw)), tap_in_phase(static_cast<size_t>(khw));
  std::vector<int64_t> phase_taps(static_cast<size_t>(phases), 0);
  for (int64_t kh = 0; kh < G.KH; ++kh)
    for (int64_t kw = 0; kw < G.KW; ++kw) {
      const int64_t ph = (kh * dh) % sh * sw + (kw * dw) % sw, t = kh * G.KW + kw;
      phase_of[static_cast<size_t>(t)] = ph;
      tap_in_phase[static_cast<size_t>(t)] = phase_taps[static_cast<size_t>(ph)]++;
    }
  // Per phase: its taps (o, kh, kw), as reduction offsets, and its packed weights.
  std::vector<std::vector<int64_t>> koff(static_cast<size_t>(phases));
  std::vector<int64_t> wpos(static_cast<size_t>(phases) + 1, 0);  // packed weights offsets
  for (int64_t ph = 0; ph < phases; ++ph) {
    auto& ko = koff[static_cast<size_t>(ph)];
    for (int64_t o = 0; o < G.Coutg; ++o)
      for (int64_t kh = 0; kh < G.KH; ++kh)
        for (int64_t kw = 0; kw < G.KW; ++kw)
          if (phase_of[static_cast<size_t>(kh * G.KW + kw)] == ph)
            ko.push_back(o * fplane - (kh * dh / sh) * Wf - (kw * dw / sw));
    wpos[static_cast<size_t>(ph) + 1] =
        wpos[static_cast<size_t>(ph)] + static_cast<int64_t>(ko.size()) * G.G * cpanels * NR;
  }
  detail::Workspace<T> w_ws(1, std::max<int64_t>(1, wpos.back()));
  T* wpacked = w_ws.get();  // phase ph, group g, panel u: wpos[ph] + (g * cpanels + u) * K * NR
  // Per panel and output channel, its NR input channels' filters transposed
  // into the columns, kernel position t into row row_of[t] of its phase.
  const int pack_threads = detail::threads_for(G.G * cpanels, G.Cout * G.Kc);
#pragma omp parallel for num_threads(pack_threads) schedule(static)
  for (int64_t gu = 0; gu < G.G * cpanels; ++gu) {
    const int64_t g = gu / cpanels, c0 = (gu % cpanels) * NR, nc = std::min<int64_t>(NR, G.Cg - c0);
    std::vector<int64_t> row_of(static_cast<size_t>(khw));
    for (int64_t o = 0; o < G.Coutg; ++o) {
      for (int64_t t = 0; t < khw; ++t) {
        const size_t ph = static_cast<size_t>(phase_of[static_cast<size_t>(t)]);
        const int64_t K = phase_taps[ph] * G.Coutg;  // the phase's taps
        row_of[static_cast<size_t>(t)] = wpos[ph] / NR + gu * K + o * phase_taps[ph] +
                                         tap_in_phase[static_cast<size_t>(t)];
      }
      gemm::transpose_copy(weight + ((g * G.Coutg + o) * G.Cg + c0) * khw, khw, nc, khw, wpacked,
                           NR, row_of.data());
    }
    if (nc < NR)  // the panel's columns past the last input channel
      for (int64_t ph = 0; ph < phases; ++ph) {
        const int64_t K = phase_taps[static_cast<size_t>(ph)] * G.Coutg;
        T* panel = wpacked + wpos[static_cast<size_t>(ph)] + gu * K * NR;
        for (int64_t k = 0; k < K; ++k) std::fill(panel + k * NR + nc, panel + (k + 1) * NR, T(0));
      }
  }
  const int64_t chunk = split.chunk, pblock = split.pblock, pblocks = split.pblocks;
  detail::Workspace<T> f_ws(1, chunk * frame);
  T* gyf = f_ws.get();
  for (int64_t n0 = 0; n0 < G.N; n0 += chunk) {
    const int64_t nn = std::min(chunk, G.N - n0);
#pragma omp parallel for num_threads(detail::threads_for(nn * G.Cout, nn * frame)) schedule(static)
    for (int64_t v = 0; v < nn * G.Cout; ++v) {
      const T* src = gy + (n0 * G.Cout + v) * G.P;
      T* dst = gyf + v * fplane;
      detail::zero_run(dst, Mh * Wf);
      for (int64_t r = 0; r < Hf - Mh; ++r) {
        T* row = dst + (r + Mh) * Wf;
        detail::zero_run(row, Mw);
        if (r < G.Ho) {
          detail::copy_run(src + r * G.Wo, G.Wo, row + Mw);
          detail::zero_run(row + Mw + G.Wo, Wf - Mw - G.Wo);
        } else {
          detail::zero_run(row + Mw, Wf - Mw);
        }
      }
    }
    const int64_t tasks = nn * G.G * phases * pblocks * cpanels;
    const int threads = detail::threads_for(tasks, nn * G.Cout * G.P * G.Kc);
    detail::Workspace<T> tile_ws(threads, MR * NR);
    detail::StealingRanges ranges(threads, tasks);  // as forward_direct's
#pragma omp parallel num_threads(threads)
    {
      const int me = omp_get_thread_num();
      T* tile = tile_ws.get(me);
      for (int64_t task = ranges.next(me); task >= 0; task = ranges.next(me)) {
        const int64_t u = task % cpanels, t = task / cpanels;
        const int64_t n = t / (G.G * phases * pblocks), g = (t / (phases * pblocks)) % G.G;
        const int64_t ph = (t / pblocks) % phases, pb = t % pblocks;
        const int64_t rh = ph / sw, rw = ph % sw;
        // The phase's input positions: ih = ih0 + sh * a, iw = iw0 + sw * b.
        const int64_t ih0 = ((rh - pt) % sh + sh) % sh, iw0 = ((rw - pl) % sw + sw) % sw;
        const int64_t Ha = ih0 < G.H ? (G.H - ih0 + sh - 1) / sh : 0;
        const int64_t Wa = iw0 < G.W ? (G.W - iw0 + sw - 1) / sw : 0;
        const int64_t p_begin = pb * pblock, p_end = std::min(Ha * Wa, p_begin + pblock);
        if (p_begin >= p_end) continue;
        const auto& ko = koff[static_cast<size_t>(ph)];
        const int64_t K = static_cast<int64_t>(ko.size());
        T* gxg = gx + ((n0 + n) * G.C + g * G.Cg) * G.H * G.W;
        const T* fg = gyf + (n * G.Cout + g * G.Coutg) * fplane;
        const int64_t c0 = u * NR, nc = std::min<int64_t>(NR, G.Cg - c0);
        const T* b = wpacked + wpos[static_cast<size_t>(ph)] + (g * cpanels + u) * K * NR;
        for (int64_t p0 = p_begin; p0 < p_end; p0 += MR) {
          const int mr = static_cast<int>(std::min<int64_t>(MR, p_end - p0));
          int64_t pos[MR];
          if (K > 0) {
            const T* rows[MR];
            for (int i = 0; i < mr; ++i) {
              const int64_t a = (p0 + i) / Wa, bb = (p0 + i) % Wa;
              const int64_t ih = ih0 + sh * a, iw = iw0 + sw * bb;
              pos[i] = ih * G.W + iw;
              rows[i] = fg + ((ih + pt - rh) / sh + Mh) * Wf + (iw + pl - rw) / sw + Mw;
            }
            gemm::gather_kernel(K, ko.data(), rows, b, tile, mr);
          } else {
            for (int i = 0; i < mr; ++i) {
              const int64_t a = (p0 + i) / Wa, bb = (p0 + i) % Wa;
              pos[i] = (ih0 + sh * a) * G.W + iw0 + sw * bb;
            }
            std::fill(tile, tile + MR * NR, T(0));
          }
          for (int64_t j = 0; j < nc; ++j) {
            T* dst = gxg + (c0 + j) * G.H * G.W;
            for (int i = 0; i < mr; ++i) dst[pos[i]] = tile[i * NR + j];
          }
        }
      }
    }
  }
}

// How grad_weight_direct splits its work: images per chunk (padded, their
// grad_output packed) under kChunkBytes.
template <typename T>
GradWeightDirectSplit grad_weight_direct_split(const ConvGeometry& G) {
  constexpr int NR = gemm::Tile<T>::NR;
  const int64_t Hp = (G.Ho - 1) * G.p.stride_h + (G.KH - 1) * G.p.dilation_h + 1;
  const int64_t Wp = (G.Wo - 1) * G.p.stride_w + (G.KW - 1) * G.p.dilation_w + 1;
  const int64_t image = G.C * Hp * Wp, panels = (G.Coutg + NR - 1) / NR;
  constexpr int64_t kChunkBytes = int64_t(16) << 20;
  const int64_t per_image = (image + G.G * panels * NR * G.P) * int64_t(sizeof(T));
  GradWeightDirectSplit split;
  split.chunk = std::clamp<int64_t>(kChunkBytes / per_image, 1, G.N);
  // A small grad_weight has few tasks (a first layer's 27 taps by 32
  // channels: three, one of 3 taps), which left a thread idle; its
  // positions are split into parts until there are kMinTasks, each part at
  // least kMinPartSteps positions. The split follows from the shape alone,
  // so the sums stay the same whatever the thread count.
  constexpr int64_t kMinTasks = 16, kMinPartSteps = 1024;
  const int64_t tasks = G.G * panels * ((G.Kc + gemm::Tile<T>::MR - 1) / gemm::Tile<T>::MR);
  split.parts = std::clamp<int64_t>((kMinTasks + tasks - 1) / tasks, 1,
                                    std::max<int64_t>(1, split.chunk * G.P / kMinPartSteps));
  split.lanes = lanes_grad_weight_pays(G);
  return split;
}

// grad_weight with the output positions in the vector lanes, for layers into
// few output channels a group with stride 1 along rows (the split's
// `lanes`): grad_weight_direct puts output channels in a 32-column panel,
// which 8 or 16 of them leave half empty. Here a register tile of RB output
// channels by TK taps sums, over the chunk's images and output rows, vectors
// of consecutive positions of grad_output (copied with each row padded to
// whole vectors, zero past its end) times the same positions of each tap's
// window in the zero-padded frame (the last vector of a row masked to zero,
// so that values past the row never enter a sum, NaN and infinity
// included). Tasks are (group, RB channels, TK taps), each summing its
// chunk in order: the same sums whatever the thread count.
template <typename T>
void grad_weight_direct_lanes(const T* gy, const TensorView& input, const ConvGeometry& G,
                              const GradWeightDirectSplit& split, T* gw) {
  const LanesGwShape shape = lanes_gw_shape<T>();
  const int RB = shape.rows, TK = shape.taps;
  const int64_t W = shape.lanes;
  const int64_t sh = G.p.stride_h, dh = G.p.dilation_h, dw = G.p.dilation_w;
  const int64_t Hp = (G.Ho - 1) * sh + (G.KH - 1) * dh + 1;
  const int64_t Wp = (G.Wo - 1) + (G.KW - 1) * dw + 1;
  const int64_t plane = Hp * Wp, image = G.C * plane;
  const int64_t nvec = (G.Wo + W - 1) / W, tail = G.Wo - (nvec - 1) * W, row = nvec * W;
  const int64_t couts = gemm::round_up(G.Coutg, RB), opanels = couts / RB;
  const int64_t K = G.Kc, tblocks = (K + TK - 1) / TK;
  // taps past K (the last block's) repeat the last one; their sums are dropped
  std::vector<int64_t> koff = tap_offsets(G, plane, Wp);
  if (!koff.empty()) koff.resize(static_cast<size_t>(tblocks * TK), koff.back());
  const int64_t chunk = split.chunk;
  const int64_t gy_image = G.G * couts * G.Ho * row;  // a padded image of grad_output
  detail::Workspace<T> ws(1, chunk * image + W + chunk * gy_image);
  T* xpad = ws.get();
  T* gyp = xpad + chunk * image + W;  // gyp[((n * G + g) * couts + o) * Ho * row + oh * row + ow]
  const int64_t tasks = G.G * opanels * tblocks;
  const int threads = detail::threads_for(tasks, G.N * G.Cout * G.P * K);
  detail::Workspace<T> tile_ws(threads, RB * TK);
  for (int64_t n0 = 0; n0 < G.N; n0 += chunk) {
    const int64_t nn = std::min(chunk, G.N - n0);
    pad_planes(input.ptr<const T>() + n0 * G.xs_n, nn, G, Hp, Wp, xpad);
    detail::zero_run(xpad + nn * image, W);
    detail::parallel_for(detail::threads_for(nn * G.G * couts, nn * G.Cout * G.P),
                         nn * G.G * couts, [&](int64_t u) {
      const int64_t n = u / (G.G * couts), g = u / couts % G.G, o = u % couts;
      T* dst = gyp + u * G.Ho * row;
      if (o >= G.Coutg) {
        detail::zero_run(dst, G.Ho * row);
        return;
      }
      const T* src = gy + ((n0 + n) * G.Cout + g * G.Coutg + o) * G.P;
      for (int64_t oh = 0; oh < G.Ho; ++oh) {
        detail::copy_run(src + oh * G.Wo, G.Wo, dst + oh * row);
        detail::zero_run(dst + oh * row + G.Wo, row - G.Wo);
      }
    });
#pragma omp parallel num_threads(threads)
    {
      T* tile = tile_ws.get(omp_get_thread_num());
      // consecutive tasks: neighbouring taps of one panel of channels
#pragma omp for schedule(static)
      for (int64_t t = 0; t < tasks; ++t) {
        const int64_t g = t / (opanels * tblocks), u = t / tblocks % opanels, b = t % tblocks;
        lanes_grad_weight(nn, G.Ho, nvec, tail, xpad + g * G.Cg * plane, image, sh * Wp,
                          koff.data() + b * TK, gyp + (g * couts + u * RB) * G.Ho * row,
                          gy_image, row, G.Ho * row, tile);
        for (int i = 0; i < RB && u * RB + i < G.Coutg; ++i) {
          T* dst = gw + (g * G.Coutg + u * RB + i) * K + b * TK;
          for (int64_t k = 0; k < TK && b * TK + k < K; ++k)
            dst[k] = n0 == 0 ? tile[i * TK + k] : dst[k] + tile[i * TK + k];
        }
      }
    }
  }
}

// grad_weight through the direct kernel: the tile's rows are MR taps k of
// the filters (row i reads the image at the tap's offset koff[k] in a
// zero-padded copy), its reduction runs over the output positions q (at
// offsets pix[q]: a window's origin), its columns are NR output channels of
// grad_output, packed transposed (B(q, o) = gy[o, q]). So
//   gw[o, k] = sum over images and q of x_pad[koff[k] + pix[q]] * gy[o, q]
// with no im2col packing. Images come in chunks (padded, and gy packed,
// in parallel); tasks are (group, MR taps, NR output channels), each adding
// its images in order: the same sums whatever the thread count.
template <typename T>
void grad_weight_direct(const T* gy, const TensorView& input, const ConvGeometry& G,
                        const GradWeightDirectSplit& split, T* gw) {
  if (split.lanes) return grad_weight_direct_lanes(gy, input, G, split, gw);
  constexpr int MR = gemm::Tile<T>::MR, NR = gemm::Tile<T>::NR;
  const int64_t sh = G.p.stride_h, sw = G.p.stride_w, dh = G.p.dilation_h, dw = G.p.dilation_w;
  const int64_t Hp = (G.Ho - 1) * sh + (G.KH - 1) * dh + 1;
  const int64_t Wp = (G.Wo - 1) * sw + (G.KW - 1) * dw + 1;
  const int64_t plane = Hp * Wp, image = G.C * plane;
  const int64_t panels = (G.Coutg + NR - 1) / NR, ktiles = (G.Kc + MR - 1) / MR;
  const int64_t chunk = split.chunk;
  // The reduction runs over (image of the chunk, position), in segments of
  // at most kSegment positions, so that a segment of packed grad_output
  // (kSegment x NR) stays in L2 while the tasks of its panel read it.
  constexpr int64_t kSegment = 4096;
  const std::vector<int64_t> koff = tap_offsets(G, plane, Wp);
  std::vector<int64_t> pix(static_cast<size_t>(chunk * G.P));
  for (int64_t n = 0; n < chunk; ++n)
    for (int64_t q = 0; q < G.P; ++q)
      pix[static_cast<size_t>(n * G.P + q)] = n * image + (q / G.Wo) * sh * Wp + (q % G.Wo) * sw;
  const int64_t gy_panel = chunk * G.P * NR;  // one panel of the chunk's grad_output
  // parts > 1: part r of the positions sums into its own copy of grad_weight
  const int64_t parts = split.parts, copy = G.Cout * G.Kc;
  detail::Workspace<T> ws(1, chunk * image + G.G * panels * gy_panel +
                                (parts > 1 ? parts * copy : 0));
  T* xpad = ws.get();
  T* gyp = xpad + chunk * image;  // gyp[(g * panels + u) * gy_panel + (n * P + q) * NR + j]
  T* copies = gyp + G.G * panels * gy_panel;
  const int64_t tasks = G.G * panels * ktiles * parts;
  const int threads = detail::threads_for(tasks, G.N * G.Cout * G.P * G.Kc);
  detail::Workspace<T> tile_ws(threads, MR * NR);
  for (int64_t n0 = 0; n0 < G.N; n0 += chunk) {
    const int64_t nn = std::min(chunk, G.N - n0), steps = nn * G.P;
    pad_planes(input.ptr<const T>() + n0 * G.xs_n, nn, G, Hp, Wp, xpad);
    // Units of packing: (image, panel, piece of the positions); with fewer
    // (image, panel) pairs than threads, the positions are split too (a
    // first layer at batch 1 has one panel, packed on one thread while the
    // other waited).
    const int64_t pairs = nn * G.G * panels;
    const int64_t pieces = std::min<int64_t>((threads + pairs - 1) / pairs, (G.P + 63) / 64);
    const int64_t piece = gemm::round_up((G.P + pieces - 1) / pieces, 16);
    const int64_t units = pairs * pieces;
#pragma omp parallel for num_threads(detail::threads_for(units, nn * G.Cout * G.P)) schedule(static)
    for (int64_t v = 0; v < units; ++v) {
      const int64_t n = v / (G.G * panels * pieces), gu = v / pieces % (G.G * panels);
      const int64_t g = gu / panels, o0 = (gu % panels) * NR;
      const int64_t q0 = v % pieces * piece, len = std::min(piece, G.P - q0);
      if (len <= 0) continue;
      const T* src = gy + ((n0 + n) * G.Cout + g * G.Coutg) * G.P;
      gemm::StridedPackB<T>{src, 1, G.P}(q0, len, o0, std::min<int64_t>(NR, G.Coutg - o0),
                                         gyp + gu * gy_panel + (n * G.P + q0) * NR);
    }
    detail::StealingRanges ranges(threads, tasks);  // as forward_direct's
#pragma omp parallel num_threads(threads)
    {
      const int me = omp_get_thread_num();
      T* tile = tile_ws.get(me);
      // consecutive tasks share a panel
      for (int64_t t = ranges.next(me); t >= 0; t = ranges.next(me)) {
        const int64_t r = t % parts, gu = t / parts / ktiles, g = gu / panels;
        const int64_t o0 = (gu % panels) * NR, k0 = (t / parts % ktiles) * MR;
        const int mr = static_cast<int>(std::min<int64_t>(MR, G.Kc - k0));
        const int64_t no = std::min<int64_t>(NR, G.Coutg - o0);
        const int64_t part = gemm::round_up((steps + parts - 1) / parts, 16);
        const int64_t begin = std::min(steps, r * part), end = std::min(steps, begin + part);
        T* out = parts > 1 ? copies + r * copy : gw;
        const T* rows[MR];
        for (int i = 0; i < mr; ++i)
          rows[i] = xpad + g * G.Cg * plane + koff[static_cast<size_t>(k0 + i)];
        for (int64_t s0 = begin; s0 < end; s0 += kSegment) {
          const int64_t len = std::min(kSegment, end - s0);
          gemm::gather_kernel(len, pix.data() + s0, rows, gyp + gu * gy_panel + s0 * NR, tile, mr);
          const bool first = (parts > 1 || n0 == 0) && s0 == begin;
          for (int64_t j = 0; j < no; ++j) {
            T* dst = out + (g * G.Coutg + o0 + j) * G.Kc + k0;
            for (int i = 0; i < mr; ++i)
              dst[i] = first ? tile[i * NR + j] : dst[i] + tile[i * NR + j];
          }
        }
        if (begin == end)  // an empty last part (positions rounded to 16)
          for (int64_t j = 0; j < no; ++j)
            std::fill_n(out + (g * G.Coutg + o0 + j) * G.Kc + k0, mr, T(0));
      }
    }
    if (parts > 1) detail::add_copies_in_order(copies, parts, copy, n0 > 0, gw);
  }
}

// The kernels above, for float and double.
template ForwardDirectSplit forward_direct_split<float>(const ConvGeometry&);
template ForwardDirectSplit forward_direct_split<double>(const ConvGeometry&);
template void forward_direct<float>(const TensorView&, const float*, const float*,
                                    const ConvGeometry&, const ForwardDirectSplit&, float*, bool);
template void forward_direct<double>(const TensorView&, const double*, const double*,
                                     const ConvGeometry&, const ForwardDirectSplit&, double*,
                                     bool);
template void grad_input_as_forward<float>(const float*, const float*, const ConvGeometry&,
                                           const ConvPlan&, float*);
template void grad_input_as_forward<double>(const double*, const double*, const ConvGeometry&,
                                            const ConvPlan&, double*);
template GradInputDirectSplit grad_input_direct_split<float>(const ConvGeometry&);
template GradInputDirectSplit grad_input_direct_split<double>(const ConvGeometry&);
template void grad_input_direct_strided<float>(const float*, const float*, const ConvGeometry&,
                                               const GradInputDirectSplit&, float*);
template void grad_input_direct_strided<double>(const double*, const double*, const ConvGeometry&,
                                                const GradInputDirectSplit&, double*);
template GradWeightDirectSplit grad_weight_direct_split<float>(const ConvGeometry&);
template GradWeightDirectSplit grad_weight_direct_split<double>(const ConvGeometry&);
template void grad_weight_direct<float>(const float*, const TensorView&, const ConvGeometry&,
                                        const GradWeightDirectSplit&, float*);
template void grad_weight_direct<double>(const double*, const TensorView&, const ConvGeometry&,
                                         const GradWeightDirectSplit&, double*);

}  // namespace conv2d_impl
}  // namespace convcore
