// Winograd F(2x2, 3x3) and F(4x4, 3x3) convolution over the transforms of
// conv_winograd.h: forward, grad_input (itself a 3x3 convolution) and
// grad_weight, the products as packed GEMMs.
#include <omp.h>

#include <algorithm>
#include <optional>
#include <type_traits>

#include "blocked.h"
#include "conv_kernels.h"
#include "conv_plan.h"
#include "conv_winograd.h"
#include "gemm.h"
#include "strided.h"

namespace convcore {
namespace conv2d_impl {

namespace {

// Packs B(k, j) = b[k * rs + j + j / run]: the columns of b, skipping one
// after every run of `run` (the unused tile at the end of each tile row of
// the Winograd transforms). Copies contiguous runs.
template <typename T>
struct SkipPackB {
  const T* b;
  int64_t rs, run;
  void operator()(int64_t k0, int64_t kc, int64_t j0, int64_t nc, T* dst) const {
    constexpr int NR = gemm::Tile<T>::NR;
    for (int64_t jp = 0; jp < nc; jp += NR) {
      T* panel = dst + jp * kc;
      const int64_t w = std::min<int64_t>(NR, nc - jp);
      for (int64_t k = 0; k < kc; ++k) {
        const T* src = b + (k0 + k) * rs;
        T* out = panel + k * NR;
        for (int64_t j = 0; j < w;) {  // runs of columns within one tile row
          const int64_t col = j0 + jp + j, len = std::min(w - j, run - col % run);
          std::copy(src + col + col / run, src + col + col / run + len, out + j);
          j += len;
        }
        std::fill(out + w, out + NR, T(0));
      }
    }
  }
};

// Lays out a band of one plane (H x W, strides hs, ws) as the row streams
// of the Winograd transforms: stream k (k < streams) holds plane row
// ih0 + step * r + k for each of the band's `rows` tile rows r, in segments of
// seg columns (segment r of stream k at out + (k * band + r) * seg), column j
// of a segment being plane column iw0 + j, zero outside the plane.
template <typename T>
void stack_band(const T* plane, int64_t H, int64_t W, int64_t hs, int64_t ws, int64_t ih0,
                int64_t iw0, int step, int streams, int64_t rows, int64_t band, int64_t seg,
                T* out) {
  const int64_t jlo = std::clamp<int64_t>(-iw0, 0, seg);  // columns inside: [jlo, jhi)
  const int64_t jhi = std::clamp<int64_t>(W - iw0, jlo, seg);
  for (int k = 0; k < streams; ++k) {
    for (int64_t r = 0; r < rows; ++r) {
      T* dst = out + (k * band + r) * seg;
      const int64_t ih = ih0 + step * r + k;
      if (ih < 0 || ih >= H) {
        detail::zero_run(dst, seg);
        continue;
      }
      const T* src = plane + ih * hs;
      detail::zero_run(dst, jlo);
      if (ws == 1)
        detail::copy_run(src + iw0 + jlo, jhi - jlo, dst + jlo);
      else
        for (int64_t j = jlo; j < jhi; ++j) dst[j] = src[(iw0 + j) * ws];
      detail::zero_run(dst + jhi, seg - jhi);
    }
  }
}

// A 3x3 stride-1 convolution as Winograd sees it: an image x (N, C, H, W;
// any strides), filters w (filter (o, c) has its taps, row-major, at
// w[o * w_so + c * w_sc + k * w_sk], k < 9: a tap stride of -1 flips them),
// padding top/left (the output size fixes the rest), output (N, Cout, Ho, Wo).
template <typename T>
struct WinogradConv {
  const T* x;
  int64_t N, C, H, W, xs_n, xs_c, xs_h, xs_w;
  int64_t Cout, pad_top, pad_left, Ho, Wo;
  const T* w;
  int64_t w_so, w_sc, w_sk;
};

// float32 from a contiguous NCHW image: the blocked layout's Winograd
// (blocked_winograd.cpp), 1.5-3x faster than the NCHW transforms below at
// training's batch sizes (docs/training.md): the image reordered into
// channel blocks, the filters transformed into U (in parallel, every call:
// weights change between steps), the result reordered back. Returns false
// (nothing done) for an image that is not contiguous NCHW.
template <int M>
bool winograd_conv_blocked(const WinogradConv<float>& a, const float* bias, float* out) {
  if (a.xs_w != 1 || a.xs_h != a.W || a.xs_c != a.H * a.W || a.Cout < 1 || a.C < 1)
    return false;
  const int threads = get_num_threads();
  const int64_t in_floats = blocked::image_size(a.C, a.H, a.W, true);
  const int64_t out_floats = blocked::image_size(a.Cout, a.Ho, a.Wo, true);
  // Images in chunks of at most kChunkBytes of blocked copies (in and out),
  // so that the workspace does not grow with the batch.
  constexpr int64_t kChunkBytes = int64_t(8) << 20;
  const int64_t chunk =
      std::clamp<int64_t>(kChunkBytes / (4 * (in_floats + out_floats)), 1, a.N);
  detail::Workspace<float> in_ws(1, chunk * in_floats), out_ws(1, chunk * out_floats);
  const blocked::WinogradWeights layout = blocked::winograd_layout(a.Cout, a.C, M);
  const blocked::FilterAccess access{a.w_so, a.w_sc, a.w_sk};
  // A batch whose tiles fit one band: the tasks transform the filters they
  // use (blocked.h); otherwise U is transformed here, in parallel.
  const bool fused = blocked::winograd_fused_applies(
      layout, blocked::Image{nullptr, a.N, a.Cout, a.Ho, a.Wo, out_floats, true});
  detail::Workspace<float> u_ws(1, fused ? 0 : blocked::winograd_floats(layout));
  if (!fused) blocked::pack_winograd(a.w, access, layout, u_ws.get(), threads);
  blocked::Epilogue e;
  const int64_t bias_floats = blocked::round_up(a.Cout, layout.lanes);
  detail::Workspace<float> bias_ws(1, bias ? bias_floats : 0);
  if (bias) {  // B lanes a block, zeros in the pad lanes
    std::fill(bias_ws.get(), bias_ws.get() + bias_floats, 0.0f);
    std::copy(bias, bias + a.Cout, bias_ws.get());
    e.bias = bias_ws.get();
  }
  Conv2dParams p;
  p.pad_top = a.pad_top, p.pad_left = a.pad_left;
  p.pad_bottom = a.Ho + 2 - a.H - a.pad_top, p.pad_right = a.Wo + 2 - a.W - a.pad_left;
  std::optional<detail::Workspace<float>> scratch;
  for (int64_t n0 = 0; n0 < a.N; n0 += chunk) {
    const int64_t nn = std::min(chunk, a.N - n0);
    const blocked::Image plain{const_cast<float*>(a.x) + n0 * a.xs_n, nn, a.C, a.H, a.W, a.xs_n,
                               false};
    const blocked::Image in{in_ws.get(), nn, a.C, a.H, a.W, in_floats, true};
    const blocked::Image outb{out_ws.get(), nn, a.Cout, a.Ho, a.Wo, out_floats, true};
    blocked::to_blocked(plain, in, threads);
    if (fused) {
      if (!scratch)  // the first chunk's, the largest
        scratch.emplace(1, blocked::winograd_fused_floats(layout, outb, threads));
      blocked::winograd_conv2d_fused(in, layout, a.w, access, p, e, outb, scratch->get(),
                                     threads);
    } else {
      const blocked::WinogradPlan plan = blocked::plan_winograd(layout, in, outb, threads, true);
      if (!scratch) scratch.emplace(threads, plan.v_floats + plan.m_floats);  // the chunk's band
      blocked::winograd_conv2d(in, layout, u_ws.get(), p, plan, e, outb, scratch->get(), threads);
    }
    const int64_t out_image = a.Cout * a.Ho * a.Wo;
    blocked::to_plain(outb, blocked::Image{out + n0 * out_image, nn, a.Cout, a.Ho, a.Wo,
                                           out_image, false},
                      threads);
  }
  return true;
}

// Winograd F(M x M, 3x3), M = 2 or 4 (conv_winograd.h).
template <int M, typename T>
void winograd_conv(const WinogradConv<T>& a, const T* bias, T* out) {
  if constexpr (std::is_same_v<T, float>)
    if (winograd_conv_blocked<M>(a, bias, out)) return;
  using V = winograd::Variant<M>;
  constexpr int kPoints = V::kPoints, MR = gemm::Tile<T>::MR;
  // U[xi] (Cout x C) = G g G^T, written straight into the packed form
  // (pack_a's layout) of the A operands of the kPoints GEMMs, one unit
  // (MR-row panel x KC block) at a time: the unit's filters are gathered
  // tap by tap in the panel's order (k-major, MR rows per k; zero filters
  // for the rows past Cout), so that the transform's output streams are the
  // kPoints packed panels themselves. No unpacked copy of U is held (for
  // 512 x 512 channels F(4x4)'s 36 matrices take 38 MB in float32).
  const int64_t a_size = gemm::packed_a_size<T>(a.Cout, a.C);
  detail::Workspace<T> u_ws(1, kPoints * a_size);
  T* a_packed = u_ws.get();
  {
    const int64_t Mpad = gemm::round_up(a.Cout, MR), panels = Mpad / MR;
    const int64_t units = panels * ((a.C + gemm::KC - 1) / gemm::KC);
    const int uthreads = detail::threads_for(units, a.Cout * a.C * kPoints * 8);
    detail::Workspace<T> taps_ws(uthreads, 9 * MR * gemm::KC);
#pragma omp parallel for num_threads(uthreads) schedule(static)
    for (int64_t u = 0; u < units; ++u) {
      T* taps = taps_ws.get(omp_get_thread_num());  // taps[t * kc * MR + k * MR + i]
      const int64_t i0 = (u % panels) * MR, k0 = (u / panels) * gemm::KC;
      const int64_t kc = std::min(gemm::KC, a.C - k0), len = kc * MR;
      const int64_t rows = std::min<int64_t>(MR, a.Cout - i0);
      for (int64_t k = 0; k < kc; ++k) {
        for (int64_t i = 0; i < rows; ++i) {
          const T* w = a.w + (i0 + i) * a.w_so + (k0 + k) * a.w_sc;
          for (int t = 0; t < 9; ++t) taps[t * len + k * MR + i] = w[t * a.w_sk];
        }
        for (int64_t i = rows; i < MR; ++i)
          for (int t = 0; t < 9; ++t) taps[t * len + k * MR + i] = T(0);
      }
      winograd::filter_row<M>(taps, len, len, a_packed + k0 * Mpad + i0 * kc, a_size);
    }
  }

  // Tasks: (image, band of tile rows). Each task lays out its band of each
  // input channel as A row streams ("stacked": stream k holds input row
  // M*r + k of every tile row r, zero padded, one segment of M*(tiles_w + 1)
  // columns per tile row), so that tile t of tile row r starts at column
  // M*(r*(tiles_w + 1) + t) of every stream: one flat, vectorisable loop
  // transforms the whole band, with one unused tile per row (it reads the
  // segment's padding) that the GEMMs' packing skips. The products are
  // transformed back the same way, into M row streams per output channel,
  // whose valid part (ragged edges dropped) is copied to the output.
  // The workspace is per thread and bounded by the band, whatever the batch.
  constexpr int A = V::kTile;
  const int64_t tiles_h = (a.Ho + M - 1) / M, tiles_w = (a.Wo + M - 1) / M;
  const int64_t band = winograd_band(tiles_h, tiles_w, V::kBandTiles);
  const int64_t bands = (tiles_h + band - 1) / band;
  const int64_t block = band * tiles_w;         // tiles per task, at most
  const int64_t wide = tiles_w + 1;             // tiles per row, with the unused one
  const int64_t wblock = band * wide;           // the same, counting them
  const int64_t seg = M * wide;                 // >= M * tiles_w + 2, what a row of tiles reads
  const int64_t tasks = a.N * bands;
  const int threads = detail::threads_for(tasks, a.N * a.Cout * a.C * a.Ho * a.Wo * 9);
  const int64_t bsize = gemm::b_workspace_size<T>();
  const int64_t vsize = kPoints * a.C * wblock, msize = kPoints * a.Cout * block;
  // The unused last tile of a row reads A - M columns past its segment:
  // the next segment's, or, after the last one, a few slack values.
  const int64_t ssize = A * band * seg + (A - M), ysize = M * M * block;
  detail::Workspace<T> ws(threads, bsize + vsize + msize + ssize + ysize);
#pragma omp parallel num_threads(threads)
  {
    T* bbuf = ws.get(omp_get_thread_num());
    T* v = bbuf + bsize;       // v[(xi * C + c) * wblock + wide tile]
    T* m = v + vsize;          // m[(xi * Cout + o) * block + tile]
    T* stacked = m + msize;    // stacked[k * band * seg + r * seg + column]
    T* ystreams = stacked + ssize;  // ystreams[i * M * nt + r * M * tiles_w + column]
    std::fill(stacked + ssize - (A - M), stacked + ssize, T(0));  // the slack
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t n = task / bands, th0 = (task % bands) * band;
      const int64_t rows = std::min(band, tiles_h - th0), nt = rows * tiles_w;
      const int64_t ih0 = th0 * M - a.pad_top, iw0 = -a.pad_left;
      const T* xn = a.x + n * a.xs_n;
      for (int64_t c = 0; c < a.C; ++c) {
        stack_band(xn + c * a.xs_c, a.H, a.W, a.xs_h, a.xs_w, ih0, iw0, M, A, rows, band, seg,
                   stacked);
        winograd::input_tiles<M>(stacked, band * seg, rows * wide, v + c * wblock, a.C * wblock);
      }
      // M[xi] (Cout x nt) = U[xi] (Cout x C) * V[xi] (C x nt)
      for (int xi = 0; xi < kPoints; ++xi)
        gemm::gemm_packed(a.Cout, nt, a.C, a_packed + xi * a_size, a.Cout, 0,
                          SkipPackB<T>{v + xi * a.C * wblock, wblock, tiles_w},
                          m + xi * a.Cout * block, block, false, bbuf);
      for (int64_t o = 0; o < a.Cout; ++o) {
        winograd::output_tiles<M>(m + o * block, a.Cout * block, nt, bias ? bias[o] : T(0),
                                ystreams, M * nt);
        T* plane = out + (n * a.Cout + o) * a.Ho * a.Wo;
        for (int64_t r = 0; r < rows; ++r)
          for (int i = 0; i < M; ++i) {
            const int64_t oh = (th0 + r) * M + i;
            if (oh >= a.Ho) break;
            const T* src = ystreams + i * M * nt + r * M * tiles_w;
            std::copy(src, src + a.Wo, plane + oh * a.Wo);
          }
      }
    }
  }
}

}  // namespace

template <int M, typename T>
void forward_winograd(const TensorView& input, const T* weight, const T* bias,
                      const ConvGeometry& G, T* out) {
  const WinogradConv<T> a{input.ptr<const T>(), G.N, G.C, G.H, G.W, G.xs_n, G.xs_c, G.xs_h,
                          G.xs_w, G.Cout, G.p.pad_top, G.p.pad_left, G.Ho, G.Wo,
                          weight, G.C * 9, 9, 1};
  winograd_conv<M>(a, bias, out);
}

// grad_input of a 3x3 stride-1 convolution is itself one: grad_output
// convolved with the flipped, transposed filters and padding 2 - p.
template <int M, typename T>
void grad_input_winograd(const T* gy, const T* weight, const ConvGeometry& G, T* gx) {
  // Its filter (c, o) is weight[o, c] flipped: taps read backwards from the last.
  const WinogradConv<T> a{gy, G.N, G.Cout, G.Ho, G.Wo, G.Cout * G.P, G.P, G.Wo, 1,
                          G.C, 2 - G.p.pad_top, 2 - G.p.pad_left, G.H, G.W,
                          weight + 8, 9, G.C * 9, -1};
  winograd_conv<M>(a, static_cast<const T*>(nullptr), gx);
}

// grad_weight of a 3x3 stride-1 convolution through the same transforms:
//   dU[xi] (Cout x C) = sum over tiles of dM[xi] (Cout x tiles) * V[xi]^T,
// V = B^T d B being the forward's input tiles and dM = A dY A^T the
// transposed output transform of grad_output; then dW = G^T dU G.
// Work comes in units of (image, band of tile rows), laid out as in
// forward (the unused tile of each tile row gets a zero dM, so it adds
// nothing). A chunk of units is transformed (parallel over channels), then
// the kPoints products accumulate into dU (parallel over (xi, block of
// output channels)), chunk after chunk: every sum runs in the same order
// whatever the thread count.
template <int M, typename T>
void grad_weight_winograd(const T* gy, const TensorView& input, const ConvGeometry& G, T* gw) {
  using V = winograd::Variant<M>;
  constexpr int kPoints = V::kPoints, A = V::kTile, MR = gemm::Tile<T>::MR;
  const int64_t C = G.C, Cout = G.Cout;
  const int64_t tiles_h = (G.Ho + M - 1) / M, tiles_w = (G.Wo + M - 1) / M;
  const int64_t band = winograd_band(tiles_h, tiles_w, V::kBandTiles);
  const int64_t bands = (tiles_h + band - 1) / band;
  const int64_t wide = tiles_w + 1, seg = M * wide, unit_tiles = band * wide;
  const int64_t units = G.N * bands;
  // Units per chunk: as many as the transformed tiles of kChunkBytes hold
  // (the products' reductions grow with it; dU is read and written once
  // per chunk). 8 MB, where the products find the tiles in the L3: with 32
  // MB they came from memory, 10-35% slower on 32 -> 96 to 256 -> 512 at
  // 28x28 and 64 -> 64 at 56x56 (docs/training.md, twenty-fifth session).
  constexpr int64_t kChunkBytes = int64_t(8) << 20;
  const int64_t unit_bytes = kPoints * (C + Cout) * unit_tiles * int64_t(sizeof(T));
  const int64_t per_chunk = std::clamp<int64_t>(kChunkBytes / unit_bytes, 1, units);
  const int64_t kmax = per_chunk * unit_tiles;  // tiles of a chunk
  // Uninitialised: the transforms write every tile of a chunk (a short
  // band's last tiles as zeros) before the products read them. (A fill
  // here, once there to fault fresh pages in from one thread, swept the
  // whole workspace on every call; it is reused from the scratch cache, in
  // 2 MB pages.)
  detail::Workspace<T> vd_ws(1, kPoints * (C + Cout) * kmax + kPoints * Cout * C);
  T* v = vd_ws.get();                    // v[(xi * C + c) * kmax + tile]
  T* dm = v + kPoints * C * kmax;        // dm[(xi * Cout + o) * kmax + tile]
  T* du = dm + kPoints * Cout * kmax;    // du[(xi * Cout + o) * C + c]
  const int64_t want = get_num_threads();
  const int64_t mrows = gemm::round_up(
      std::max<int64_t>(4 * MR, Cout / std::max<int64_t>(1, (2 * want + kPoints - 1) / kPoints)),
      MR);
  const int64_t mblocks = (Cout + mrows - 1) / mrows;
  const int threads = detail::threads_for(units * (C + Cout), G.N * Cout * C * G.P * 9);
  const int64_t ssize = A * band * seg + (A - M);
  detail::Workspace<T> ws(threads, std::max(ssize, gemm::b_workspace_size<T>()));
  const T* x = input.ptr<const T>();
#pragma omp parallel num_threads(threads)
  {
    T* buf = ws.get(omp_get_thread_num());  // the stacked rows, then packed B
    for (int64_t u0 = 0; u0 < units; u0 += per_chunk) {
      const int64_t nu = std::min(per_chunk, units - u0), K = nu * unit_tiles;
#pragma omp for schedule(dynamic, 8)
      for (int64_t item = 0; item < nu * (C + Cout); ++item) {
        const int64_t u = item / (C + Cout), ch = item % (C + Cout);
        const int64_t n = (u0 + u) / bands, th0 = ((u0 + u) % bands) * band;
        const int64_t rows = std::min(band, tiles_h - th0), nt = rows * wide;
        const int64_t col = u * unit_tiles;
        T* dst;
        int64_t stride;
        if (ch < C) {  // V of input channel ch
          stack_band(x + n * G.xs_n + ch * G.xs_c, G.H, G.W, G.xs_h, G.xs_w,
                     th0 * M - G.p.pad_top, -G.p.pad_left, M, A, rows, band, seg, buf);
          std::fill(buf + ssize - (A - M), buf + ssize, T(0));  // the last tile's slack
          dst = v + ch * kmax + col, stride = C * kmax;
          winograd::input_tiles<M>(buf, band * seg, nt, dst, stride);
        } else {  // dM of output channel ch - C
          const int64_t o = ch - C;
          stack_band(gy + (n * Cout + o) * G.P, G.Ho, G.Wo, G.Wo, int64_t(1), th0 * M,
                     int64_t(0), M, M, rows, band, seg, buf);
          dst = dm + o * kmax + col, stride = Cout * kmax;
          winograd::grad_output_tiles<M>(buf, band * seg, nt, dst, stride);
        }
        for (int xi = 0; xi < kPoints; ++xi)  // a short last band: zero tiles
          std::fill(dst + xi * stride + nt, dst + xi * stride + unit_tiles, T(0));
      }
#pragma omp for schedule(dynamic, 1)
      for (int64_t task = 0; task < kPoints * mblocks; ++task) {
        const int64_t xi = task / mblocks, m0 = (task % mblocks) * mrows;
        const int64_t nm = std::min(mrows, Cout - m0);
        gemm::gemm_packed(nm, C, K, dm + xi * Cout * kmax, Cout, m0,
                          gemm::StridedPackB<T>{v + xi * C * kmax, 1, kmax},
                          du + (xi * Cout + m0) * C, C, u0 > 0, buf, kmax);
      }
    }
#pragma omp for schedule(static)
    for (int64_t o = 0; o < Cout; ++o)
      winograd::grad_filter_row<M>(du + o * C, Cout * C, C, gw + o * C * 9);
  }
}

// The kernels above, for float and double.
template void forward_winograd<2, float>(const TensorView&, const float*, const float*,
                                         const ConvGeometry&, float*);
template void forward_winograd<2, double>(const TensorView&, const double*, const double*,
                                          const ConvGeometry&, double*);
template void grad_input_winograd<2, float>(const float*, const float*, const ConvGeometry&,
                                            float*);
template void grad_input_winograd<2, double>(const double*, const double*, const ConvGeometry&,
                                             double*);
template void grad_weight_winograd<2, float>(const float*, const TensorView&, const ConvGeometry&,
                                             float*);
template void grad_weight_winograd<2, double>(const double*, const TensorView&, const ConvGeometry&,
                                              double*);
template void forward_winograd<4, float>(const TensorView&, const float*, const float*,
                                         const ConvGeometry&, float*);
template void forward_winograd<4, double>(const TensorView&, const double*, const double*,
                                          const ConvGeometry&, double*);
template void grad_input_winograd<4, float>(const float*, const float*, const ConvGeometry&,
                                            float*);
template void grad_input_winograd<4, double>(const double*, const double*, const ConvGeometry&,
                                             double*);
template void grad_weight_winograd<4, float>(const float*, const TensorView&, const ConvGeometry&,
                                             float*);
template void grad_weight_winograd<4, double>(const double*, const TensorView&, const ConvGeometry&,
                                              double*);

}  // namespace conv2d_impl
}  // namespace convcore
