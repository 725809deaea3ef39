// 2-D convolution lowered to the packed GEMM of gemm.h: forward, grad_input
// (col2im) and grad_weight, and the pointwise (1x1) forms. The image is never
// expanded into a full im2col matrix: B panels are packed straight from the
// (strided) input, one cache block at a time, so the workspace per thread is
// one KC x NC block plus packed weights.
#include <omp.h>

#include <algorithm>
#include <vector>

#include "conv_kernels.h"
#include "conv_plan.h"
#include "dot_products.h"
#include "gemm.h"
#include "strided.h"

namespace convcore {
namespace conv2d_impl {

namespace {

// Row r = (c, i, j) of im2col(x) for output positions [q0, q0 + n) into
// out: zeros where the tap falls in the padding, strided copies where it is
// inside. x points at channel 0 of one group of one image.
template <typename T>
void im2col_row(const T* x, const ConvGeometry& G, int64_t r, int64_t q0, int64_t n, T* out) {
  const int64_t khw = G.KH * G.KW, sw = G.p.stride_w;
  const int64_t c = r / khw, i = (r % khw) / G.KW, j = r % G.KW;
  const T* xc = x + c * G.xs_c;
  const int64_t ih_off = i * G.p.dilation_h - G.p.pad_top;
  const int64_t iw_off = j * G.p.dilation_w - G.p.pad_left;
  int64_t oh = q0 / G.Wo, ow = q0 % G.Wo;
  for (int64_t jj = 0; jj < n;) {
    const int64_t run = std::min(n - jj, G.Wo - ow);  // the rest of this output row
    T* o = out + jj;
    const int64_t ih = oh * G.p.stride_h + ih_off;
    if (ih < 0 || ih >= G.H) {
      detail::zero_run(o, run);
    } else {
      // Output columns ow + t read input column (ow + t) * sw + iw_off:
      // inside the image for t in [lo, hi).
      const int64_t first = ow * sw + iw_off;
      int64_t lo, hi;
      detail::inside_range(first, sw, run, G.W, &lo, &hi);
      const T* src = xc + ih * G.xs_h + first * G.xs_w;
      const int64_t step = sw * G.xs_w;
      detail::zero_run(o, lo);
      if (step == 1)
        detail::copy_run(src + lo, hi - lo, o + lo);
      else if (step == 2)  // (a constant stride, so that the loop vectorises)
        for (int64_t t = lo; t < hi; ++t) o[t] = src[t * 2];
      else
        for (int64_t t = lo; t < hi; ++t) o[t] = src[t * step];
      detail::zero_run(o + hi, run - hi);
    }
    jj += run, ow = 0, ++oh;
  }
}

// Packs B(r, q) = im2col(x)[r, q] for rows r in [k0, k0 + kc) (r = (c, i, j) of
// the kernel) and output positions q in [j0, j0 + nc) into NR-column panels.
// x points at channel 0 of one group of one image.
template <typename T>
struct Im2colPackB {
  const T* x;
  const ConvGeometry* g;
  int64_t q_offset;  // first output position of the tile

  void operator()(int64_t k0, int64_t kc, int64_t j0, int64_t nc, T* dst) const {
    constexpr int NR = gemm::Tile<T>::NR;
    for (int64_t k = 0; k < kc; ++k) {
      // Gather the row contiguously, then copy it into the panels NR values
      // at a time.
      T row[gemm::NC + NR];
      const int64_t padded = (nc + NR - 1) / NR * NR;
      im2col_row(x, *g, k0 + k, q_offset + j0, nc, row);
      std::fill(row + nc, row + padded, T(0));
      for (int64_t p = 0; p < padded / NR; ++p)
        std::copy(row + p * NR, row + (p + 1) * NR, dst + p * kc * NR + k * NR);
    }
  }
};

// Packs B(q, r) = im2col(x)[r, q]^T: rows are output positions q in
// [k0, k0 + kc), columns kernel rows r in [j0, j0 + nc). Used for grad_weight.
template <typename T>
struct Im2colTransposedPackB {
  const T* x;
  const ConvGeometry* g;
  int64_t r_offset;  // first kernel row of the task's column block
  int64_t q_offset;  // first output position of the chunk

  void operator()(int64_t k0, int64_t kc, int64_t j0, int64_t nc, T* dst) const {
    constexpr int NR = gemm::Tile<T>::NR;
    const ConvGeometry& G = *g;
    const int64_t khw = G.KH * G.KW;
    for (int64_t jp = 0; jp < nc; jp += NR) {
      T* panel = dst + jp * kc;
      const int64_t width = std::min<int64_t>(NR, nc - jp);
      for (int64_t jj = 0; jj < NR; ++jj) {
        if (jj >= width) {
          for (int64_t k = 0; k < kc; ++k) panel[k * NR + jj] = T(0);
          continue;
        }
        const int64_t r = r_offset + j0 + jp + jj;
        const int64_t c = r / khw, i = (r % khw) / G.KW, j = r % G.KW;
        const T* xc = x + c * G.xs_c;
        const int64_t ih_off = i * G.p.dilation_h - G.p.pad_top;
        const int64_t iw_off = j * G.p.dilation_w - G.p.pad_left;
        // Runs of positions along one output row: zeros where the tap
        // falls in the padding, a strided copy where it is inside.
        const int64_t sw = G.p.stride_w;
        int64_t oh = (q_offset + k0) / G.Wo, ow = (q_offset + k0) % G.Wo;
        T* out = panel + jj;
        for (int64_t k = 0; k < kc;) {
          const int64_t run = std::min(kc - k, G.Wo - ow);
          const int64_t ih = oh * G.p.stride_h + ih_off;
          if (ih < 0 || ih >= G.H) {
            for (int64_t t = 0; t < run; ++t) out[(k + t) * NR] = T(0);
          } else {
            const int64_t first = ow * sw + iw_off;
            int64_t lo, hi;
            detail::inside_range(first, sw, run, G.W, &lo, &hi);
            const T* src = xc + ih * G.xs_h + first * G.xs_w;
            for (int64_t t = 0; t < lo; ++t) out[(k + t) * NR] = T(0);
            for (int64_t t = lo; t < hi; ++t) out[(k + t) * NR] = src[t * sw * G.xs_w];
            for (int64_t t = hi; t < run; ++t) out[(k + t) * NR] = T(0);
          }
          k += run, ow = 0, ++oh;
        }
      }
    }
  }
};

// grad_x[c, ih, iw] += dcol[r, q] for kernel rows r of channels starting at
// channel 0 of gx, and output positions q in [q0, q0 + nq).
template <typename T>
void col2im_add(const T* dcol, int64_t rows, int64_t nq, int64_t q0, const ConvGeometry& G,
                T* gx) {
  const int64_t khw = G.KH * G.KW;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t c = r / khw, i = (r % khw) / G.KW, j = r % G.KW;
    T* gc = gx + c * G.H * G.W;
    const int64_t ih_off = i * G.p.dilation_h - G.p.pad_top;
    const int64_t iw_off = j * G.p.dilation_w - G.p.pad_left;
    const T* src = dcol + r * nq;
    int64_t oh = q0 / G.Wo, ow = q0 % G.Wo;
    for (int64_t jj = 0; jj < nq; ++jj) {
      const int64_t ih = oh * G.p.stride_h + ih_off, iw = ow * G.p.stride_w + iw_off;
      if (ih >= 0 && ih < G.H && iw >= 0 && iw < G.W) gc[ih * G.W + iw] += src[jj];
      if (++ow == G.Wo) ow = 0, ++oh;
    }
  }
}

// Calls f(offset, image, position, length) for the runs of `count`
// consecutive columns from j0 of N images of P positions laid side by side
// (column j: image j / P, position j % P), one run per image they touch.
template <typename F>
void for_image_runs(int64_t j0, int64_t count, int64_t P, F&& f) {
  for (int64_t offset = 0; offset < count;) {
    const int64_t j = j0 + offset, q = j % P, len = std::min(count - offset, P - q);
    f(offset, j / P, q, len);
    offset += len;
  }
}

// Packs B(c, j) for the columns j in [j0, j0 + nc) of the images laid side
// by side (column j: image j / P, position j % P) of a pointwise layer: x
// points at channel 0 of image 0, each image's plane of P positions is
// contiguous. A panel's NR columns are a few runs, one per image they touch.
template <typename T>
struct ImagesPackB {
  const T* x;
  int64_t xs_n, xs_c, P;
  int64_t j_offset;  // first column of the task's tile

  void operator()(int64_t k0, int64_t kc, int64_t j0, int64_t nc, T* dst) const {
    constexpr int NR = gemm::Tile<T>::NR;
    j0 += j_offset;
    for (int64_t jp = 0; jp < nc; jp += NR) {
      T* panel = dst + jp * kc;
      const int64_t w = std::min<int64_t>(NR, nc - jp);
      struct Run {
        int64_t col, src, len;
      } runs[NR];
      int nruns = 0;
      for_image_runs(j0 + jp, w, P, [&](int64_t col, int64_t n, int64_t q, int64_t len) {
        runs[nruns++] = {col, n * xs_n + q, len};
      });
      for (int64_t k = 0; k < kc; ++k) {
        const T* xk = x + (k0 + k) * xs_c;
        T* out = panel + k * NR;
        for (int r = 0; r < nruns; ++r)
          std::copy(xk + runs[r].src, xk + runs[r].src + runs[r].len, out + runs[r].col);
        std::fill(out + w, out + NR, T(0));
      }
    }
  }
};

// Packs A(o, k) = src[n, o, q] (images src_n apart, rows o src_r apart,
// each row's P positions contiguous) for the positions k in [c0, c0 + K) of
// the images laid side by side (k: image k / P, position k % P) as
// pack_a_part packs a matrix: units u0..u1 of (block of KC positions, panel
// of MR rows), each panel filled run by run (one run per image it touches).
template <typename T>
void pack_a_images_part(int64_t M, const T* src, int64_t src_n, int64_t src_r, int64_t P,
                        int64_t c0, int64_t K, T* dst, int64_t u0, int64_t u1) {
  constexpr int MR = gemm::Tile<T>::MR;
  const int64_t Mpad = gemm::round_up(M, MR), panels = Mpad / MR;
  for (int64_t u = u0; u < u1; ++u) {
    const int64_t k0 = (u / panels) * gemm::KC, i0 = (u % panels) * MR;
    const int64_t kc = std::min(gemm::KC, K - k0);
    T* panel = dst + k0 * Mpad + i0 * kc;
    for_image_runs(c0 + k0, kc, P, [&](int64_t k, int64_t n, int64_t q, int64_t len) {
      gemm::pack_a_panel(M, src + n * src_n + q, src_r, int64_t(1), i0, int64_t(0), len,
                         panel + k * MR);
    });
  }
}

// Packs B(k, c) = x[n, c, q] (positions k of the images side by side from
// c0, as pack_a_images_part; rows c from r0) into NR-column panels.
template <typename T>
struct ImagesTransposedPackB {
  const T* x;
  int64_t xs_n, xs_c, P;
  int64_t c0, r0;

  void operator()(int64_t k0, int64_t kc, int64_t j0, int64_t nc, T* dst) const {
    constexpr int NR = gemm::Tile<T>::NR;
    for (int64_t jp = 0; jp < nc; jp += NR) {
      T* panel = dst + jp * kc;
      const int64_t w = std::min<int64_t>(NR, nc - jp);
      for_image_runs(c0 + k0, kc, P, [&](int64_t k, int64_t n, int64_t q, int64_t len) {
        gemm::transpose_copy(x + n * xs_n + (r0 + j0 + jp) * xs_c + q, xs_c, w, len,
                             panel + k * NR, int64_t(NR));
      });
      if (w < NR)
        for (int64_t k = 0; k < kc; ++k) std::fill(panel + k * NR + w, panel + (k + 1) * NR, T(0));
    }
  }
};

// Whether a pointwise layer lays its images side by side: as the columns of
// one GEMM forward and for grad_input (planes smaller than a block of
// columns, 7x7 and 14x14, fill a tile's last panel only in part, image by
// image: 49 positions, 64 columns computed), and as the depth of grad_weight's.
bool pointwise_images_side_by_side(const ConvGeometry& G) {
  return is_pointwise(G) && G.G == 1 && G.N > 1 && G.P < gemm::NC;
}

// dst[n] (M x P) = A (M x K, packed) * src[n] (K x P, rows src_c apart,
// images src_n apart) + bias, for the N images laid side by side: each
// thread takes one range of the columns (across images), in blocks that
// compute all M rows into scratch, then scatter into the images' planes.
// The same sums in the same order as one GEMM per image.
// The ranges are even to half a panel, not to the block: blocks of one
// width dealt out in turn gave 2 threads 448 and 336 of 784 columns (batch
// 16 at 7x7), and one waited for the other (docs/training.md).
template <typename T>
void gemm_images_side_by_side(const T* a_packed, int64_t M, int64_t K, const T* src,
                              int64_t src_n, int64_t src_c, int64_t N, int64_t P,
                              const T* bias, T* dst) {
  constexpr int NR = gemm::Tile<T>::NR;
  constexpr int64_t kTileBytes = int64_t(256) << 10;  // the task's block of C, in L2
  const int64_t columns = N * P;
  const int64_t widest =
      std::clamp<int64_t>(kTileBytes / int64_t(sizeof(T)) / M / NR * NR, 2 * NR, gemm::NC);
  const int threads = detail::threads_for((columns + NR - 1) / NR, M * K * columns);
  // thread t's columns: [bound(t), bound(t + 1)), the bounds at half
  // panels (a vector with AVX-512: a short panel's cost goes by vectors)
  constexpr int64_t lanes = NR / 2;
  auto bound = [&](int64_t t) {
    return t >= threads ? columns
                        : std::min(columns, (t * columns / threads + lanes / 2) / lanes * lanes);
  };
  int64_t tile = NR;  // the widest block any thread takes
  for (int64_t t = 0; t < threads; ++t) {
    const int64_t len = bound(t + 1) - bound(t), blocks = (len + widest - 1) / widest;
    if (blocks > 0) tile = std::max(tile, gemm::round_up((len + blocks - 1) / blocks, NR));
  }
  const int64_t per_thread = gemm::b_workspace_size<T>() + M * tile;
  detail::Workspace<T> ws(threads, per_thread);
#pragma omp parallel num_threads(threads)
  {
    const int me = omp_get_thread_num();
    T* bbuf = ws.get(me);
    T* c = bbuf + gemm::b_workspace_size<T>();
    const int64_t lo = bound(me), hi = bound(me + 1);
    const int64_t blocks = (hi - lo + widest - 1) / widest;
    const int64_t width = blocks > 0 ? gemm::round_up((hi - lo + blocks - 1) / blocks, NR) : NR;
    for (int64_t j0 = lo; j0 < hi; j0 += width) {
      const int64_t nq = std::min(width, hi - j0);
      gemm::gemm_packed(M, nq, K, a_packed, M, 0, ImagesPackB<T>{src, src_n, src_c, P, j0}, c,
                        tile, false, bbuf);
      for_image_runs(j0, nq, P, [&](int64_t col, int64_t n, int64_t q, int64_t len) {
        for (int64_t o = 0; o < M; ++o) {
          const T* from = c + o * tile + col;
          T* to = dst + (n * M + o) * P + q;
          if (bias) {
            const T b = bias[o];
            for (int64_t i = 0; i < len; ++i) to[i] = from[i] + b;
          } else {
            std::copy(from, from + len, to);
          }
        }
      });
    }
  }
}

// Forward of a layer whose images go side by side: out[n] = W * x[n] + bias.
template <typename T>
void forward_pointwise_images(const TensorView& input, const detail::Contiguous<T>& weight,
                              const T* bias, const ConvGeometry& G, T* out) {
  const int64_t a_size = gemm::packed_a_size<T>(G.Cout, G.Kc);
  detail::Workspace<T> a_ws(1, a_size);
  gemm::pack_a_parallel(G.Cout, G.Kc, weight.data(), G.Kc, int64_t(1), a_ws.get());
  gemm_images_side_by_side(a_ws.get(), G.Cout, G.Kc, input.ptr<const T>(), G.xs_n, G.xs_c, G.N,
                           G.P, bias, out);
}

}  // namespace

// Tiles of the P positions of each of `images` images and blocks of `rows`
// output rows, for one GEMM per (image, tile, block). When images x tiles
// give fewer tasks than threads (batch 1), split the rows first (each task
// keeps whole tiles, so every packed weight is used across many positions),
// then, if still short, make the tiles smaller.
template <typename T>
void split_tiles_and_rows(int64_t images, int64_t rows, int64_t P, int64_t& tile,
                          int64_t& tiles, int64_t& mrows, int64_t& mblocks) {
  constexpr int NR = gemm::Tile<T>::NR, MR = gemm::Tile<T>::MR;
  const int64_t threads_wanted = get_num_threads();
  // An image wider than a tile: tiles of even widths that even out the
  // threads' shares (441 positions in 384 + 57 columns left one of two
  // threads idle for most of a batch-1 layer). A narrower one stays one
  // tile, its rows split below when images are short of threads.
  const int share = static_cast<int>(std::max<int64_t>(1, threads_wanted / images));
  tile = P <= gemm::NC ? gemm::round_up(P, NR) : gemm::balanced_width(P, gemm::NC, NR, share);
  tiles = (P + tile - 1) / tile;
  mblocks = 1;
  if (images * tiles < threads_wanted) {
    const int64_t min_rows = 4 * MR;  // keep each block at least 4 panels deep
    mblocks = std::clamp((threads_wanted + images * tiles - 1) / (images * tiles), int64_t(1),
                         std::max<int64_t>(1, rows / min_rows));
  }
  mrows = gemm::round_up((rows + mblocks - 1) / mblocks, MR);
  mblocks = (rows + mrows - 1) / mrows;
  if (images * tiles * mblocks < threads_wanted) {
    const int64_t tiles_wanted = (threads_wanted + images * mblocks - 1) / (images * mblocks);
    tile = std::clamp(gemm::round_up((P + tiles_wanted - 1) / tiles_wanted, NR), int64_t(NR),
                      gemm::NC);
    tiles = (P + tile - 1) / tile;
  }
}

template <typename T>
ForwardGemmSplit forward_gemm_split(const ConvGeometry& G) {
  // Tasks: (image, group, tile of output positions, block of output
  // channels); each writes its own block of the output.
  ForwardGemmSplit split;
  split_tiles_and_rows<T>(G.N * G.G, G.Coutg, G.P, split.tile, split.tiles, split.mrows,
                          split.mblocks);
  // Weights are packed once, shared by all tasks, when many tiles reuse
  // them; with few tiles (batch 1) packing costs more than it saves and the
  // microkernel reads the weight rows in place.
  split.pack_weights = G.N * split.tiles > 2;
  split.images_side_by_side = pointwise_images_side_by_side(G);
  return split;
}

// Forward through the packed GEMM: C (Coutg x positions) = W_g * im2col(x),
// the im2col blocks packed straight from the input (Im2colPackB), the work
// split as forward_gemm_split says.
template <typename T>
void forward_gemm(const TensorView& input, const detail::Contiguous<T>& weight, const T* bias,
                  const ConvGeometry& G, const ForwardGemmSplit& split, T* out) {
  if (split.images_side_by_side) return forward_pointwise_images<T>(input, weight, bias, G, out);
  const int64_t images = G.N * G.G;
  const int64_t tile = split.tile, tiles = split.tiles;
  const int64_t mrows = split.mrows, mblocks = split.mblocks;
  const int64_t tasks = images * tiles * mblocks;
  const bool pack_weights = split.pack_weights;
  const int64_t a_size = pack_weights ? gemm::packed_a_size<T>(G.Coutg, G.Kc) : 0;
  detail::Workspace<T> a_ws(1, a_size * G.G);
  T* a_packed = a_ws.get();
  if (pack_weights)
    for (int64_t g = 0; g < G.G; ++g)
      gemm::pack_a_parallel(G.Coutg, G.Kc, weight.data() + g * G.Coutg * G.Kc, G.Kc, int64_t(1),
                            a_packed + g * a_size);
  const T* a_base = pack_weights ? a_packed : weight.data();
  const int64_t a_stride = pack_weights ? a_size : G.Coutg * G.Kc;  // per group
  const int64_t a_lda = pack_weights ? 0 : G.Kc;
  const bool pointwise = is_pointwise(G);
  const T* x = input.ptr<const T>();
  const int threads = detail::threads_for(tasks, G.N * G.Cout * G.P * G.Kc);
  detail::Workspace<T> ws(threads, gemm::b_workspace_size<T>());
#pragma omp parallel num_threads(threads)
  {
    T* bbuf = ws.get(omp_get_thread_num());
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t mb = t % mblocks, rest = t / mblocks;
      const int64_t n = rest / (G.G * tiles), g = (rest / tiles) % G.G;
      const int64_t q0 = (rest % tiles) * tile, nq = std::min(tile, G.P - q0);
      const int64_t m0 = mb * mrows, nm = std::min(mrows, G.Coutg - m0);
      const T* xg = x + n * G.xs_n + g * G.Cg * G.xs_c;
      T* c = out + (n * G.Cout + g * G.Coutg + m0) * G.P + q0;
      if (pointwise)
        gemm::gemm_packed(nm, nq, G.Kc, a_base + g * a_stride, G.Coutg, m0,
                          gemm::StridedPackB<T>{xg + q0, G.xs_c, 1}, c, G.P, false, bbuf, a_lda);
      else
        gemm::gemm_packed(nm, nq, G.Kc, a_base + g * a_stride, G.Coutg, m0,
                          Im2colPackB<T>{xg, &G, q0}, c, G.P, false, bbuf, a_lda);
      if (bias) {
        for (int64_t o = 0; o < nm; ++o) {
          const T b = bias[g * G.Coutg + m0 + o];
          T* row = c + o * G.P;
          for (int64_t j = 0; j < nq; ++j) row[j] += b;
        }
      }
    }
  }
}

// How grad_input_pointwise splits its work: as the forward's GEMM, with
// the input channels for rows. (Tiles of positions alone, at batch 1 on a
// 7x7 plane 32 + 17 columns, had each thread read all the packed weights
// for a part of the columns, and the narrow tile took as long as the wide.)
template <typename T>
GradInputPointwiseSplit grad_input_pointwise_split(const ConvGeometry& G) {
  GradInputPointwiseSplit split;
  split_tiles_and_rows<T>(G.N * G.G, G.Cg, G.P, split.tile, split.tiles, split.mrows,
                          split.mblocks);
  split.images_side_by_side = pointwise_images_side_by_side(G);
  return split;
}

// grad_input of a pointwise convolution: gx[n, g] (Cg x P) = W_g^T (Cg x Coutg)
// * gy[n, g] (Coutg x P), written straight into gx. Tasks: (image, group,
// tile of positions, block of input channels). As in the forward, the
// weights are packed only where many tiles reuse them (or the kernel reads
// columns this far apart slowly); otherwise the microkernel reads W_g^T in
// place, by columns (at batch 1 on a 7x7 plane, packing 512 x 2048 weights
// took a fifth of the call).
template <typename T>
void grad_input_pointwise(const T* gy, const detail::Contiguous<T>& weight, const ConvGeometry& G,
                          const GradInputPointwiseSplit& split, T* gx) {
  const bool pack_weights = split.images_side_by_side || G.N * split.tiles > 2 ||
                            !gemm::columns_in_place_pay(G.Kc * int64_t(sizeof(T)));
  const int64_t a_size = pack_weights ? gemm::packed_a_size<T>(G.Cg, G.Coutg) : 0;
  detail::Workspace<T> a_ws(1, a_size * G.G);
  T* a_packed = a_ws.get();
  if (pack_weights)
    for (int64_t g = 0; g < G.G; ++g)  // A(c, o) = weight[g * Coutg + o, c]
      gemm::pack_a_parallel(G.Cg, G.Coutg, weight.data() + g * G.Coutg * G.Kc, int64_t(1), G.Kc,
                            a_packed + g * a_size);
  if (split.images_side_by_side)  // gx[n] = W^T gy[n], the images side by side
    return gemm_images_side_by_side(a_packed, G.C, G.Cout, gy, G.Cout * G.P, G.P, G.N, G.P,
                                    static_cast<const T*>(nullptr), gx);
  const T* a_base = pack_weights ? a_packed : weight.data();
  const int64_t a_stride = pack_weights ? a_size : G.Coutg * G.Kc;  // per group
  const int64_t a_lda = pack_weights ? 0 : -G.Kc;
  const int64_t images = G.N * G.G;
  const int64_t tile = split.tile, tiles = split.tiles;
  const int64_t mrows = split.mrows, mblocks = split.mblocks;
  const int64_t tasks = images * tiles * mblocks;
  const int threads = detail::threads_for(tasks, G.N * G.Cout * G.P * G.Kc);
  detail::Workspace<T> ws(threads, gemm::b_workspace_size<T>());
#pragma omp parallel num_threads(threads)
  {
    T* bbuf = ws.get(omp_get_thread_num());
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t mb = t % mblocks, rest = t / mblocks;
      const int64_t n = rest / (G.G * tiles), g = (rest / tiles) % G.G;
      const int64_t q0 = (rest % tiles) * tile, nq = std::min(tile, G.P - q0);
      const int64_t m0 = mb * mrows, nm = std::min(mrows, G.Cg - m0);
      const T* gyg = gy + (n * G.Cout + g * G.Coutg) * G.P + q0;
      T* c = gx + (n * G.C + g * G.Cg + m0) * G.P + q0;
      gemm::gemm_packed(nm, nq, G.Coutg, a_base + g * a_stride, G.Cg, m0,
                        gemm::StridedPackB<T>{gyg, G.P, 1}, c, G.P, false, bbuf, a_lda);
    }
  }
}

// How grad_input_gemm splits its work.
GradInputGemmSplit grad_input_gemm_split(const ConvGeometry& G) {
  // Tasks: (image, group, block of input channels). dcol rows of a channel
  // block scatter only into those channels, so tasks never write the same
  // element, and each element's sum runs in a fixed order.
  const int64_t khw = G.KH * G.KW;
  const int64_t base_block = std::max<int64_t>(1, std::min<int64_t>(G.Cg, 512 / std::max<int64_t>(khw, 1)));
  int64_t nblocks = (G.Cg + base_block - 1) / base_block;
  const int64_t want = 2 * static_cast<int64_t>(get_num_threads());
  if (G.N * G.G * nblocks < want)
    nblocks = std::min<int64_t>(G.Cg, (want + G.N * G.G - 1) / (G.N * G.G));
  const int64_t cblock = (G.Cg + nblocks - 1) / nblocks;
  nblocks = (G.Cg + cblock - 1) / cblock;
  GradInputGemmSplit split;
  split.cblock = cblock, split.nblocks = nblocks;
  return split;
}

// grad_input through the GEMM: per block of input channels, dcol = W^T * gy
// (the im2col rows of the block), scattered into grad_input by col2im_add.
template <typename T>
void grad_input_gemm(const T* gy, const detail::Contiguous<T>& weight, const ConvGeometry& G,
                     const GradInputGemmSplit& split, T* gx) {
  const int64_t khw = G.KH * G.KW;
  const int64_t cblock = split.cblock, nblocks = split.nblocks;
  const int64_t tasks = G.N * G.G * nblocks;
  const int64_t tile = gemm::NC;
  const int64_t max_rows = cblock * khw;
  const int64_t bsize = gemm::b_workspace_size<T>();
  const int64_t asize = gemm::packed_a_size<T>(max_rows, G.Coutg);
  const int threads = detail::threads_for(tasks, G.N * G.Cout * G.P * G.Kc);
  detail::Workspace<T> ws(threads, bsize + asize + max_rows * tile);
#pragma omp parallel num_threads(threads)
  {
    T* bbuf = ws.get(omp_get_thread_num());
    T* a_packed = bbuf + bsize;
    T* dcol = a_packed + asize;
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t n = t / (G.G * nblocks), g = (t / nblocks) % G.G;
      const int64_t c0 = (t % nblocks) * cblock, nc = std::min(cblock, G.Cg - c0);
      const int64_t rows = nc * khw;
      // A(r, o) = weight[g * Coutg + o, c0 * khw + r]: the transposed weights of the block.
      gemm::pack_a(rows, G.Coutg, weight.data() + g * G.Coutg * G.Kc + c0 * khw, int64_t(1),
                   G.Kc, a_packed);
      T* gxb = gx + (n * G.C + g * G.Cg + c0) * G.H * G.W;
      std::fill(gxb, gxb + nc * G.H * G.W, T(0));
      const T* gyg = gy + (n * G.Cout + g * G.Coutg) * G.P;
      for (int64_t q0 = 0; q0 < G.P; q0 += tile) {
        const int64_t nq = std::min(tile, G.P - q0);
        const gemm::StridedPackB<T> pack{gyg + q0, G.P, 1};
        gemm::gemm_packed(rows, nq, G.Coutg, a_packed, rows, 0, pack, dcol, nq, false, bbuf);
        col2im_add(dcol, rows, nq, q0, G, gxb);
      }
    }
  }
}

namespace {

// Copies B (k, j) blocks out of a buffer packed once in gemm_packed's layout
// (blocks of KC rows, each NR-column panels), so several GEMMs share one
// packing of the same operand.
template <typename T>
struct PrepackedB {
  const T* packed;  // block k0 at packed + k0 * Npad, panel p of it at + p * kc * NR
  int64_t Npad;
  void operator()(int64_t k0, int64_t kc, int64_t j0, int64_t nc, T* dst) const {
    constexpr int NR = gemm::Tile<T>::NR;
    const int64_t npanels = (nc + NR - 1) / NR;
    const T* src = packed + k0 * Npad + (j0 / NR) * kc * NR;
    std::copy(src, src + npanels * kc * NR, dst);
  }
};

}  // namespace

// How grad_weight_by_taps splits its work: blocks of input channels per
// tap, about two per thread.
template <typename T>
GradWeightByTapsSplit grad_weight_by_taps_split(const ConvGeometry& G) {
  constexpr int MR = gemm::Tile<T>::MR;
  const int64_t taps = G.KH * G.KW;
  const int64_t want = static_cast<int64_t>(get_num_threads());
  GradWeightByTapsSplit split;
  split.mrows = std::max<int64_t>(4 * MR, gemm::round_up((G.Cg * taps / (2 * want) + 1), MR));
  split.mblocks = (G.Cg + split.mrows - 1) / split.mrows;
  return split;
}

// grad_weight of a stride-1 convolution as one GEMM per kernel tap over the
// zero-padded image laid out flat: with positions indexed Wp wide
// (q = oh * Wp + ow, the extra columns given zero gradient), tap (i, j) reads
// the padded plane at q + i * dh * Wp + j * dw, so
//   dW[:, :, i, j]^T (Cg x Coutg) = xpad (Cg x q, row-major, shifted) * gy_wide^T.
// The image is used in place (no im2col) and grad_output is packed once per
// image for all taps.
// It pays where packing the im2col side dominates: few output channels per
// group (each packed element then feeds only 2 * Coutg flops).
namespace {

// One group's operands and sums for grad_weight_by_taps, in one thread's
// scratch (or the one shared by a team): the steps of one image are
// functions of an index, so a team splits each step and a lone thread loops.
template <typename T>
struct TapsGemm {
  const ConvGeometry& G;
  int64_t Hp, Wp, plane, taps, n_wide, Npad, mrows, mblocks;
  // in the scratch given to use(); acc: dW^T per tap, summed over images
  T *xpad = nullptr, *gyw = nullptr, *bpack = nullptr, *acc = nullptr;

  TapsGemm(const ConvGeometry& g, const GradWeightByTapsSplit& split)
      : G(g),
        Hp(g.H + g.p.pad_top + g.p.pad_bottom),
        Wp(g.W + g.p.pad_left + g.p.pad_right),
        plane(Hp * Wp),
        taps(g.KH * g.KW),
        n_wide((g.Ho - 1) * Wp + g.Wo),  // flat positions of the outputs
        Npad(gemm::round_up(g.Coutg, gemm::Tile<T>::NR)),
        mrows(split.mrows),
        mblocks(split.mblocks) {}
  int64_t scratch_size() const {
    return G.Cg * plane + G.Coutg * n_wide + Npad * n_wide + taps * G.Cg * G.Coutg;
  }
  void use(T* scratch) {
    xpad = scratch;
    gyw = xpad + G.Cg * plane;
    bpack = gyw + G.Coutg * n_wide;
    acc = bpack + Npad * n_wide;
  }
  int64_t pack_blocks() const { return (n_wide + gemm::KC - 1) / gemm::KC; }
  int64_t tasks() const { return taps * mblocks; }

  // Channel c of group g of image n, zero-padded.
  void pad(const T* x, int64_t n, int64_t g, int64_t c) const {
    T* dst = xpad + c * plane;
    std::fill(dst, dst + plane, T(0));
    const T* src = x + n * G.xs_n + (g * G.Cg + c) * G.xs_c;
    for (int64_t ih = 0; ih < G.H; ++ih) {
      T* row = dst + (ih + G.p.pad_top) * Wp + G.p.pad_left;
      for (int64_t iw = 0; iw < G.W; ++iw) row[iw] = src[ih * G.xs_h + iw * G.xs_w];
    }
  }
  // Output channel o of group g of image n's gradient, laid out Wp wide.
  void widen(const T* gy, int64_t n, int64_t g, int64_t o) const {
    const T* src = gy + (n * G.Cout + g * G.Coutg + o) * G.P;
    T* dst = gyw + o * n_wide;
    std::fill(dst, dst + n_wide, T(0));
    for (int64_t oh = 0; oh < G.Ho; ++oh) detail::copy_run(src + oh * G.Wo, G.Wo, dst + oh * Wp);
  }
  // B(q, o) = gy_wide[o, q] for block b of KC positions, packed once for all taps.
  void pack(int64_t b) const {
    const int64_t k0 = b * gemm::KC, kc = std::min(gemm::KC, n_wide - k0);
    gemm::StridedPackB<T>{gyw, 1, n_wide}(k0, kc, 0, G.Coutg, bpack + k0 * Npad);
  }
  // Task t: one tap's GEMM for a block of input channels, added to acc
  // unless it is the first image.
  void tap(int64_t t, bool accumulate, T* bbuf) const {
    const int64_t k = t / mblocks, c0 = (t % mblocks) * mrows;
    const int64_t nc = std::min(mrows, G.Cg - c0);
    const int64_t i = k / G.KW, j = k % G.KW;
    const T* a = xpad + i * G.p.dilation_h * Wp + j * G.p.dilation_w;
    gemm::gemm_packed(nc, G.Coutg, n_wide, a, G.Cg, c0, PrepackedB<T>{bpack, Npad},
                      acc + (k * G.Cg + c0) * G.Coutg, G.Coutg, accumulate, bbuf, plane);
  }
  // dW[g * Coutg + o, c, i, j] = acc[tap][c][o]
  void store(int64_t g, T* gw) const {
    for (int64_t o = 0; o < G.Coutg; ++o)
      for (int64_t c = 0; c < G.Cg; ++c)
        for (int64_t k = 0; k < taps; ++k)
          gw[((g * G.Coutg + o) * G.Cg + c) * taps + k] = acc[(k * G.Cg + c) * G.Coutg + o];
  }
};

}  // namespace

template <typename T>
void grad_weight_by_taps(const T* gy, const TensorView& input, const ConvGeometry& G,
                         const GradWeightByTapsSplit& split, T* gw) {
  TapsGemm<T> s(G, split);
  const int64_t work = G.N * G.Cout * G.P * G.Kc;
  const T* x = input.ptr<const T>();
  // With groups enough for every thread, each thread takes whole groups
  // (ResNeXt's 32): a group's GEMMs are small, and a team splitting each one
  // met at four barriers per group and image.
  const int threads = detail::threads_for(G.G, work);
  if (G.G >= 2 * threads) {
    detail::Workspace<T> ws(threads, s.scratch_size() + gemm::b_workspace_size<T>());
#pragma omp parallel num_threads(threads)
    {
      TapsGemm<T> own = s;
      T* scratch = ws.get(omp_get_thread_num());
      own.use(scratch);
      T* bbuf = scratch + s.scratch_size();
#pragma omp for schedule(dynamic, 1)
      for (int64_t g = 0; g < G.G; ++g) {
        for (int64_t n = 0; n < G.N; ++n) {
          for (int64_t c = 0; c < G.Cg; ++c) own.pad(x, n, g, c);
          for (int64_t o = 0; o < G.Coutg; ++o) own.widen(gy, n, g, o);
          for (int64_t b = 0; b < own.pack_blocks(); ++b) own.pack(b);
          for (int64_t t = 0; t < own.tasks(); ++t) own.tap(t, n > 0, bbuf);
        }
        own.store(g, gw);
      }
    }
    return;
  }
  detail::Workspace<T> shared(1, s.scratch_size());
  s.use(shared.get());
  const int team = detail::threads_for(s.tasks(), work);
  detail::Workspace<T> ws(team, gemm::b_workspace_size<T>());
  for (int64_t g = 0; g < G.G; ++g) {
    for (int64_t n = 0; n < G.N; ++n) {
#pragma omp parallel num_threads(team)
      {
#pragma omp for schedule(static)
        for (int64_t c = 0; c < G.Cg; ++c) s.pad(x, n, g, c);
#pragma omp for schedule(static)
        for (int64_t o = 0; o < G.Coutg; ++o) s.widen(gy, n, g, o);
#pragma omp for schedule(static)
        for (int64_t b = 0; b < s.pack_blocks(); ++b) s.pack(b);
        T* bbuf = ws.get(omp_get_thread_num());
#pragma omp for schedule(dynamic, 1)
        for (int64_t t = 0; t < s.tasks(); ++t) s.tap(t, n > 0, bbuf);
      }
    }
    s.store(g, gw);
  }
}

// grad_weight when it is small (the first layers of AlexNet and ResNet: 3
// input channels, 37-140 KB): tasks over (image, chunk of positions), each
// computing the whole grad_weight of its chunk into a partial of its own
// (both operands packed once, no task with a sliver of columns), then the
// partials summed in task order, so the result does not depend on the
// thread count. grad_weight_gemm (below) would split grad_weight's few
// columns among the threads and pack the image once per block of rows:
// 2 threads, ResNet's 7x7/2 conv1 at batch 8 went from 16.2 to 10.7 ms,
// AlexNet's conv1 at batch 16 from 16.0 to 13.6 ms. (Packing the image
// position by position, contiguous stores instead of stores NR apart, was
// tried for these strided layers and measured 1.2-1.7x slower.)
constexpr int64_t kGradWeightChunk = 16 * gemm::KC;  // positions per packed chunk of gy

template <typename T>
void grad_weight_by_chunks(const T* gy, const TensorView& input, const ConvGeometry& G, T* gw) {
  const int64_t chunks = (G.P + kGradWeightChunk - 1) / kGradWeightChunk;
  const int64_t chunk = (G.P + chunks - 1) / chunks;
  const int64_t tasks = G.N * chunks, size = G.Cout * G.Kc;
  // At most 64 partials at a time (16 MB): the tasks go in rounds, each
  // round's partials added to grad_weight in order.
  const int64_t round = std::min<int64_t>(tasks, 64);
  detail::Workspace<T> partial_ws(1, round * size);
  T* partials = partial_ws.get();
  const int64_t work = G.N * G.Cout * G.P * G.Kc;
  // Fewer tasks than threads (one image of a small plane: one chunk): each
  // task's columns (taps) in blocks of whole panels, one block per thread,
  // so the others do not wait; each element's sum is the same either way.
  constexpr int NR = gemm::Tile<T>::NR;
  const int want = detail::threads_for(tasks * ((G.Kc + NR - 1) / NR), work);
  const int64_t width =
      tasks >= want ? G.Kc : gemm::round_up((G.Kc * tasks + want - 1) / want, NR);
  const int64_t parts = (G.Kc + width - 1) / width;
  const int threads = detail::threads_for(tasks * parts, work);
  const int64_t a_size = gemm::packed_a_size<T>(G.Coutg, chunk);
  detail::Workspace<T> ws(threads, a_size + gemm::b_workspace_size<T>());
  const T* x = input.ptr<const T>();
#pragma omp parallel num_threads(threads)
  {
    T* a_packed = ws.get(omp_get_thread_num());
    T* bbuf = a_packed + a_size;
    for (int64_t t0 = 0; t0 < tasks; t0 += round) {
      const int64_t nt = std::min(round, tasks - t0);
#pragma omp for schedule(dynamic, 1)
      for (int64_t u = t0 * parts; u < (t0 + nt) * parts; ++u) {
        const int64_t t = u / parts, j0 = (u % parts) * width, nj = std::min(width, G.Kc - j0);
        const int64_t n = t / chunks, q0 = (t % chunks) * chunk, nq = std::min(chunk, G.P - q0);
        for (int64_t g = 0; g < G.G; ++g) {
          gemm::pack_a(G.Coutg, nq, gy + (n * G.Cout + g * G.Coutg) * G.P + q0, G.P,
                       int64_t(1), a_packed);
          gemm::gemm_packed(
              G.Coutg, nj, nq, a_packed, G.Coutg, 0,
              Im2colTransposedPackB<T>{x + n * G.xs_n + g * G.Cg * G.xs_c, &G, j0, q0},
              partials + (t - t0) * size + g * G.Coutg * G.Kc + j0, G.Kc, false, bbuf);
        }
      }
#pragma omp for schedule(static)
      for (int64_t i = 0; i < size; ++i) {
        T s = t0 > 0 ? gw[i] + partials[i] : partials[i];
        for (int64_t t = 1; t < nt; ++t) s += partials[t * size + i];
        gw[i] = s;
      }
    }
  }
}

// How grad_weight_gemm splits its work (grad_weight_share, below).
template <typename T>
GradWeightGemmSplit grad_weight_gemm_split(const ConvGeometry& G) {
  GradWeightGemmSplit split;
  split.images_side_by_side = pointwise_images_side_by_side(G);
  return split;
}

namespace {
// How many cells grad_weight_share deals out.
template <int NR, int MR>
int64_t grad_weight_cells(int64_t groups, int64_t rows, int64_t cols) {
  return groups * ((cols + NR - 1) / NR) * ((rows + MR - 1) / MR);
}

// Thread `me` of `threads`' share of grad_weight (groups of rows x cols):
// the cells (group, panel of NR columns, unit of MR rows), in that order,
// dealt out in even runs; fn(g, m0, nm, r0, ncols) for each block of the
// run, rows [m0, m0 + nm) by columns [r0, r0 + ncols) of group g: whole
// panels, and the part of a panel at either end. Blocks of whole panels,
// twice as many as the threads in a dynamic schedule, left 2 threads 4 / 7
// and 3 / 7 of 448 columns (blocks of 128, 128, 128 and 64), and 7 panels
// do not split evenly by panels at all (docs/training.md). Each element's
// sum runs in the same order whatever the share, so the result does not
// depend on the thread count.
template <int NR, int MR, typename Fn>
void grad_weight_share(int64_t groups, int64_t rows, int64_t cols, int me, int threads, Fn&& fn) {
  const int64_t units = (rows + MR - 1) / MR, per_group = grad_weight_cells<NR, MR>(1, rows, cols);
  const int64_t total = groups * per_group;
  const int64_t end = total * (me + 1) / threads;
  for (int64_t c = total * me / threads; c < end;) {
    const int64_t g = c / per_group, p = c % per_group / units, u = c % units;
    const int64_t left = std::min(end, (g + 1) * per_group) - c;
    if (u == 0 && left >= units) {  // whole panels
      const int64_t np = left / units;
      fn(g, int64_t(0), rows, p * NR, std::min(cols, (p + np) * NR) - p * NR);
      c += np * units;
    } else {  // rows [u, u1) of panel p
      const int64_t u1 = std::min(units, u + left);
      fn(g, u * MR, std::min(rows, u1 * MR) - u * MR, p * NR,
         std::min(cols, (p + 1) * NR) - p * NR);
      c += u1 - u;
    }
  }
}
}  // namespace

// grad_weight of a pointwise layer whose images go side by side: gw (Cout x
// C) = sum over chunks of the positions of all images, laid side by side,
// of gy (Cout x chunk) * x^T (chunk x C); the threads' shares as
// grad_weight_gemm's.
// Positions of small planes then fill the GEMM's blocks of KC (a 7x7 plane:
// 49 of 256), and one parallel region serves a chunk of several images.
// With more output channels than input channels (up to 256 of these) the
// GEMM runs transposed, gw^T (C x Cout) = x * gy^T, into scratch: the fewer
// channels are the shared packed rows and the more the columns each thread
// packs for itself, in whole panels (80 -> 480: 480 rows of A, packed and
// read by both threads, and 80 columns in 3 panels of 32, one a half).
// With 512 input channels it was slower (docs/training.md, twenty-fourth
// session).
template <typename T>
void grad_weight_pointwise_images(const T* gy, const TensorView& input, const ConvGeometry& G,
                                  T* gw) {
  constexpr int NR = gemm::Tile<T>::NR, MR = gemm::Tile<T>::MR;
  const int64_t columns = G.N * G.P, chunk = std::min(kGradWeightChunk, columns);
  const T* x = input.ptr<const T>();
  constexpr int64_t kTransposedMostChannels = 256;
  const bool transposed = G.Cout > G.Kc && G.Kc <= kTransposedMostChannels;
  // the GEMM's rows (packed A, from `a_src`) and columns (B, from `b_src`)
  const int64_t rows = transposed ? G.Kc : G.Cout, cols = transposed ? G.Cout : G.Kc;
  const T* a_src = transposed ? x : gy;
  const int64_t a_n = transposed ? G.xs_n : G.Cout * G.P, a_r = transposed ? G.xs_c : G.P;
  const T* b_src = transposed ? gy : x;
  const int64_t b_n = transposed ? G.Cout * G.P : G.xs_n, b_r = transposed ? G.P : G.xs_c;
  // the scratch's rows a line longer than a power of two of bytes apart
  // (cache sets)
  const int64_t ldc = transposed ? cols + 64 / int64_t(sizeof(T)) : cols;
  detail::Workspace<T> a_ws(1, gemm::packed_a_size<T>(rows, chunk) + (transposed ? rows * ldc : 0));
  T* a_packed = a_ws.get();
  T* c = transposed ? a_packed + gemm::packed_a_size<T>(rows, chunk) : gw;
  const int threads = detail::threads_for(grad_weight_cells<NR, MR>(1, rows, cols),
                                          G.N * G.Cout * G.P * G.Kc);
  detail::Workspace<T> ws(threads, gemm::b_workspace_size<T>());
  for (int64_t c0 = 0; c0 < columns; c0 += chunk) {
    const int64_t nk = std::min(chunk, columns - c0);
    const int64_t units = gemm::pack_a_units<T>(rows, nk);
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
      for (int64_t u = 0; u < units; ++u)
        pack_a_images_part(rows, a_src, a_n, a_r, G.P, c0, nk, a_packed, u, u + 1);
      T* bbuf = ws.get(omp_get_thread_num());
      grad_weight_share<NR, MR>(
          1, rows, cols, omp_get_thread_num(), omp_get_num_threads(),
          [&](int64_t, int64_t m0, int64_t nm, int64_t r0, int64_t ncols) {
            gemm::gemm_packed(nm, ncols, nk, a_packed, rows, m0,
                              ImagesTransposedPackB<T>{b_src, b_n, b_r, G.P, c0, r0},
                              c + m0 * ldc + r0, ldc, c0 > 0, bbuf);
          });
      if (transposed && c0 + nk == columns) {  // gw from gw^T, by blocks of its rows
        constexpr int64_t kRowsPerBlock = 64;
#pragma omp barrier
#pragma omp for schedule(static)
        for (int64_t o0 = 0; o0 < G.Cout; o0 += kRowsPerBlock)
          gemm::transpose_copy(c + o0, ldc, G.Kc, std::min(kRowsPerBlock, G.Cout - o0),
                               gw + o0 * G.Kc, G.Kc);
      }
    }
  }
}

// grad_weight of a pointwise layer with few channels: gw (Cout x C) = sum
// over images of gy[n] (Cout x P) @ x[n]^T (P x C), each element a dot
// product along the positions, where both operands are contiguous rows
// (dots::sum_of_products): nothing is packed or transposed.
template <typename T>
void grad_weight_dots(const T* gy, const TensorView& input, const ConvGeometry& G, T* gw) {
  dots::sum_of_products<T>(G.N, G.Cout, G.Kc, G.P, gy, G.P, G.Cout * G.P, input.ptr<const T>(),
                           G.xs_c, G.xs_n, gw,
                           detail::threads_for(G.Cout * G.Kc, G.N * G.Cout * G.P * G.Kc));
}

// grad_weight of a layer with few taps over long planes (a first layer: 3
// channels of 3x3 make 27): gw (Cout x Kc) = sum over images of gy[n]
// (Cout x P) @ im2col(x[n])^T, each element a dot product along the
// positions (dots::sum_of_products) of grad_output's rows, read in place,
// with the rows of a block of im2col built in cache. The direct path packs
// the whole of grad_output transposed into panels instead, which took as
// long as its products. The blocks, in image order, are dealt out in
// kColumnDotsLanes runs, each summed into its own copy of gw, and the copies
// are added in order: the same sums whatever the thread count.
constexpr int64_t kColumnDotsLanes = 16;

template <typename T>
void grad_weight_column_dots(const T* gy, const TensorView& input, const ConvGeometry& G, T* gw) {
  // Blocks of 512 to 4096 positions, so that the batch makes kColumnDotsLanes
  // of them where it can: longer dot products pay until a batch of one
  // image would leave lanes empty (3->32 3x3/2 at 224: 1024 positions best
  // at batch 1, 2048-4096 at batch 16).
  const int64_t block = std::clamp<int64_t>(
      gemm::round_up((G.N * G.P + kColumnDotsLanes - 1) / kColumnDotsLanes, 64), 512, 4096);
  const int64_t per_image = (G.P + block - 1) / block;
  const int64_t items = G.N * per_image, lanes = std::min(kColumnDotsLanes, items);
  const int64_t copy = G.Cout * G.Kc;
  const int threads = detail::threads_for(lanes, G.N * G.Cout * G.P * G.Kc);
  detail::Workspace<T> ws(threads, G.Kc * block + copy);
  detail::Workspace<T> copies(1, lanes * copy);
  T* sums = copies.get();
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t l = 0; l < lanes; ++l) {
    T* col = ws.get(omp_get_thread_num());
    T* part = col + G.Kc * block;
    T* sum = sums + l * copy;
    const int64_t begin = items * l / lanes, end = items * (l + 1) / lanes;
    for (int64_t it = begin; it < end; ++it) {
      const int64_t n = it / per_image, q0 = it % per_image * block;
      const int64_t len = std::min(block, G.P - q0);
      const T* x = input.ptr<const T>() + n * G.xs_n;
      for (int64_t r = 0; r < G.Kc; ++r) im2col_row(x, G, r, q0, len, col + r * len);
      dots::sum_of_products<T>(1, G.Cout, G.Kc, len, gy + n * G.Cout * G.P + q0, G.P, 0, col, len,
                               0, it == begin ? sum : part, 1);
      if (it != begin)
        for (int64_t e = 0; e < copy; ++e) sum[e] += part[e];
    }
  }
  detail::add_copies_in_order(sums, lanes, copy, false, gw);
}

template <typename T>
void grad_weight_gemm(const T* gy, const TensorView& input, const ConvGeometry& G,
                      const GradWeightGemmSplit& split, T* gw) {
  if (split.images_side_by_side) return grad_weight_pointwise_images(gy, input, G, gw);
  // grad_weight[g] (Coutg x Kc) = sum over images n and chunks of positions
  // of gy[n, g] (Coutg x positions) * im2col(x[n, g])^T (positions x Kc).
  // Each chunk of gy is packed once (shared), then each thread's share of
  // the blocks of (output channels, kernel rows) accumulates into its part
  // of grad_weight, every sum in a fixed order whatever the thread count.
  constexpr int NR = gemm::Tile<T>::NR, MR = gemm::Tile<T>::MR;
  const int64_t chunk = kGradWeightChunk;
  const T* x = input.ptr<const T>();
  const bool pointwise = is_pointwise(G);
  const int64_t a_size = gemm::packed_a_size<T>(G.Coutg, std::min(chunk, G.P));
  detail::Workspace<T> a_ws(1, a_size * G.G);
  T* a_packed = a_ws.get();
  const int threads = detail::threads_for(grad_weight_cells<NR, MR>(G.G, G.Coutg, G.Kc),
                                          G.N * G.Cout * G.P * G.Kc);
  detail::Workspace<T> ws(threads, gemm::b_workspace_size<T>());
  for (int64_t n = 0; n < G.N; ++n) {
    for (int64_t q0 = 0; q0 < G.P; q0 += chunk) {
      const int64_t nq = std::min(chunk, G.P - q0);
      const int64_t units = gemm::pack_a_units<T>(G.Coutg, nq);
#pragma omp parallel num_threads(threads)
      {
#pragma omp for schedule(static)
        for (int64_t u = 0; u < G.G * units; ++u) {
          const int64_t g = u / units;
          gemm::pack_a_part(G.Coutg, nq, gy + (n * G.Cout + g * G.Coutg) * G.P + q0, G.P,
                            int64_t(1), a_packed + g * a_size, u % units, u % units + 1);
        }
        T* bbuf = ws.get(omp_get_thread_num());
        grad_weight_share<NR, MR>(
            G.G, G.Coutg, G.Kc, omp_get_thread_num(), omp_get_num_threads(),
            [&](int64_t g, int64_t m0, int64_t nm, int64_t r0, int64_t ncols) {
              T* c = gw + (g * G.Coutg + m0) * G.Kc + r0;
              const T* xg = x + n * G.xs_n + g * G.Cg * G.xs_c;
              const bool acc = n > 0 || q0 > 0;
              if (pointwise)  // B(q, c) = x[c, q]
                gemm::gemm_packed(nm, ncols, nq, a_packed + g * a_size, G.Coutg, m0,
                                  gemm::StridedPackB<T>{xg + q0 + r0 * G.xs_c, 1, G.xs_c}, c,
                                  G.Kc, acc, bbuf);
              else
                gemm::gemm_packed(nm, ncols, nq, a_packed + g * a_size, G.Coutg, m0,
                                  Im2colTransposedPackB<T>{xg, &G, r0, q0}, c, G.Kc, acc, bbuf);
            });
      }
    }
  }
}


// The kernels above, for float and double.
template ForwardGemmSplit forward_gemm_split<float>(const ConvGeometry&);
template ForwardGemmSplit forward_gemm_split<double>(const ConvGeometry&);
template void forward_gemm<float>(const TensorView&, const detail::Contiguous<float>&, const float*,
                                  const ConvGeometry&, const ForwardGemmSplit&, float*);
template void forward_gemm<double>(const TensorView&, const detail::Contiguous<double>&,
                                   const double*, const ConvGeometry&, const ForwardGemmSplit&,
                                   double*);
template GradInputPointwiseSplit grad_input_pointwise_split<float>(const ConvGeometry&);
template GradInputPointwiseSplit grad_input_pointwise_split<double>(const ConvGeometry&);
template void grad_input_pointwise<float>(const float*, const detail::Contiguous<float>&,
                                          const ConvGeometry&, const GradInputPointwiseSplit&,
                                          float*);
template void grad_input_pointwise<double>(const double*, const detail::Contiguous<double>&,
                                           const ConvGeometry&, const GradInputPointwiseSplit&,
                                           double*);
template void grad_input_gemm<float>(const float*, const detail::Contiguous<float>&,
                                     const ConvGeometry&, const GradInputGemmSplit&, float*);
template void grad_input_gemm<double>(const double*, const detail::Contiguous<double>&,
                                      const ConvGeometry&, const GradInputGemmSplit&, double*);
template GradWeightByTapsSplit grad_weight_by_taps_split<float>(const ConvGeometry&);
template GradWeightByTapsSplit grad_weight_by_taps_split<double>(const ConvGeometry&);
template void grad_weight_by_taps<float>(const float*, const TensorView&, const ConvGeometry&,
                                         const GradWeightByTapsSplit&, float*);
template void grad_weight_by_taps<double>(const double*, const TensorView&, const ConvGeometry&,
                                          const GradWeightByTapsSplit&, double*);
template void grad_weight_by_chunks<float>(const float*, const TensorView&, const ConvGeometry&,
                                           float*);
template void grad_weight_by_chunks<double>(const double*, const TensorView&, const ConvGeometry&,
                                            double*);
template void grad_weight_dots<float>(const float*, const TensorView&, const ConvGeometry&, float*);
template void grad_weight_column_dots<float>(const float*, const TensorView&, const ConvGeometry&,
                                             float*);
template void grad_weight_column_dots<double>(const double*, const TensorView&,
                                              const ConvGeometry&, double*);
template void grad_weight_dots<double>(const double*, const TensorView&, const ConvGeometry&,
                                       double*);
template GradWeightGemmSplit grad_weight_gemm_split<float>(const ConvGeometry&);
template GradWeightGemmSplit grad_weight_gemm_split<double>(const ConvGeometry&);
template void grad_weight_gemm<float>(const float*, const TensorView&, const ConvGeometry&,
                                      const GradWeightGemmSplit&, float*);
template void grad_weight_gemm<double>(const double*, const TensorView&, const ConvGeometry&,
                                       const GradWeightGemmSplit&, double*);

}  // namespace conv2d_impl
}  // namespace convcore
