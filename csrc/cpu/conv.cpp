// 2-D convolution, forward and backward, lowered to the packed GEMM of
// gemm.h. The image is never expanded into a full im2col matrix: B panels
// are packed straight from the (strided) input, one cache block at a time,
// so the workspace per thread is one KC x NC block plus packed weights.
#include <omp.h>

#include <algorithm>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

#include "convcore/ops.h"
#include "convcore/threading.h"
#include "conv_depthwise.h"
#include "conv_winograd.h"
#include "gemm.h"
#include "strided.h"

namespace convcore {

namespace {

// Everything the kernels need about one convolution.
struct ConvGeometry {
  int64_t N, C, H, W;          // input
  int64_t Cout, KH, KW;        // weight
  int64_t Ho, Wo, P;           // output spatial size, P = Ho * Wo
  int64_t G, Cg, Coutg, Kc;    // groups; per-group channels; Kc = Cg * KH * KW
  int64_t xs_n, xs_c, xs_h, xs_w;  // input strides (elements)
  Conv2dParams p;                  // p.algorithm: the one chosen (never Auto)
  bool auto_algorithm;             // whether it was chosen by auto
};

ConvAlgorithm choose_algorithm(const ConvGeometry& G);

ConvGeometry make_geometry(const TensorView& input, const TensorView& weight,
                           const Conv2dParams& p) {
  check_float(input, "input");
  check_same_dtype(weight, "weight", input, "input");
  check_ndim(input, "input", 4, "(N, C, H, W)");
  check_ndim(weight, "weight", 4, "(out_channels, in_channels / groups, kH, kW)");
  const Shape4 out = conv2d_output_shape(shape4(input), shape4(weight), p);
  ConvGeometry g;
  g.N = input.shape[0], g.C = input.shape[1], g.H = input.shape[2], g.W = input.shape[3];
  g.Cout = weight.shape[0], g.KH = weight.shape[2], g.KW = weight.shape[3];
  g.Ho = out.h, g.Wo = out.w, g.P = out.h * out.w;
  g.G = p.groups, g.Cg = g.C / p.groups, g.Coutg = g.Cout / p.groups;
  g.Kc = g.Cg * g.KH * g.KW;
  g.xs_n = input.strides[0], g.xs_c = input.strides[1];
  g.xs_h = input.strides[2], g.xs_w = input.strides[3];
  g.p = p;
  g.auto_algorithm = p.algorithm == ConvAlgorithm::Auto;
  g.p.algorithm = choose_algorithm(g);
  return g;
}

// The same geometry over another (contiguous) copy of the input.
ConvGeometry with_input(ConvGeometry g, const TensorView& input) {
  g.xs_n = input.strides[0], g.xs_c = input.strides[1];
  g.xs_h = input.strides[2], g.xs_w = input.strides[3];
  return g;
}

// 1x1, stride 1, no padding, with the rows of the image contiguous: im2col
// is the image itself (channels x positions), so plain strided packing and,
// for grad_input, a GEMM straight into the output replace the lowering.
bool pointwise_shape(const ConvGeometry& G) {
  return G.KH == 1 && G.KW == 1 && G.p.stride_h == 1 && G.p.stride_w == 1 && G.p.pad_top == 0 &&
         G.p.pad_bottom == 0 && G.p.pad_left == 0 && G.p.pad_right == 0;
}
bool winograd_shape(const ConvGeometry& G) {
  return G.KH == 3 && G.KW == 3 && G.p.stride_h == 1 && G.p.stride_w == 1 &&
         G.p.dilation_h == 1 && G.p.dilation_w == 1 && G.G == 1;
}
// Winograd tasks take bands of whole tile rows, at most about band_tiles
// tiles each, the rows shared evenly among the bands (14 rows in 2 bands of
// 7, not 9 + 5, which would leave one of two threads idle a third of the time).
int64_t winograd_band(int64_t tiles_h, int64_t tiles_w, int64_t band_tiles) {
  const int64_t most = std::max<int64_t>(1, std::min<int64_t>(tiles_h, band_tiles / tiles_w));
  const int64_t bands = (tiles_h + most - 1) / most;
  return (tiles_h + bands - 1) / bands;
}
// The number of those tasks for F(M x M, 3x3).
template <int M>
int64_t winograd_tasks(const ConvGeometry& G) {
  const int64_t tiles_h = (G.Ho + M - 1) / M, tiles_w = (G.Wo + M - 1) / M;
  const int64_t band = winograd_band(tiles_h, tiles_w, winograd::Variant<M>::kBandTiles);
  return G.N * ((tiles_h + band - 1) / band);
}

// When auto takes Winograd: measured on the development machine, idle, 2
// threads, min of interleaved runs (docs/benchmarks.md). Both variants need
// 64+ channels in and out (with fewer, the transforms weigh more than the
// multiplications saved) and at least one band of tiles per thread, so a
// small image at batch 1 (one band) keeps the GEMM path, which splits the
// output channels across the cores instead.
//  - F(4x4, 3x3) on 28x28 and larger outputs: 1.3-2.1x faster than the GEMM
//    path and 1.2-1.35x faster than F(2x2) in forward (VGG conv3_2 and
//    conv4_2, ResNet's 64-channel stage; batch 1 and 16), level with F(2x2)
//    at 128 channels on 28x28. On 13x13 and
//    14x14 it loses (ragged 4x4 tiles waste up to 30% of the work, and the
//    36 filter matrices cost more to transform than the products save).
//    Its float32 error is about 3e-6 of the output scale against 4e-7 for
//    the GEMM path and F(2x2).
//  - F(2x2, 3x3) elsewhere: 1.1-1.5x faster than the GEMM path on AlexNet's
//    13x13 and VGG's 14x14 layers at batch 16, and on 28x28 at batch 1.
bool winograd_channels(const ConvGeometry& G) {
  return winograd_shape(G) && G.C >= 64 && G.Cout >= 64;
}
bool winograd_pays(const ConvGeometry& G) {
  return winograd_channels(G) &&
         winograd_tasks<2>(G) >= static_cast<int64_t>(get_num_threads());
}
// grad_weight through the same transforms (grad_weight_winograd) against
// the GEMM path, 2 threads, batch 16: F(4x4) is faster on every layer it is
// chosen for (VGG conv1_2-conv4_2 1.7-2.0x, ResNet's 64-channel 3x3 at 56
// 1.25-1.6x), so it always takes it. F(2x2) pays only with 512+ channels in
// and out (VGG conv5_2 at 14x14 1.3-1.6x), where the GEMM path re-reads its
// large grad_weight for every image; with fewer, its transposed packing of
// V weighs more than the multiplications saved: AlexNet's 256-384 channels
// at 13x13 are level (0.9-1.06x), 128 channels at 14x14 1.6x slower. F(2x2)
// asked for by name is used for grad_weight too.
bool winograd2_grad_weight_pays(const ConvGeometry& G) {
  return !G.auto_algorithm || (G.C >= 512 && G.Cout >= 512);
}
bool winograd4_pays(const ConvGeometry& G) {
  return winograd_channels(G) && G.Ho >= 28 && G.Wo >= 28 &&
         winograd_tasks<4>(G) >= static_cast<int64_t>(get_num_threads());
}

bool rows_contiguous(const ConvGeometry& G) { return G.xs_w == 1 && G.xs_h == G.W; }
// The direct paths copy each image, zero padded, into the frame its output
// windows read ((Ho - 1) * stride + (K - 1) * dilation + 1 rows and columns).
// auto takes them where one image's frame is at most 64 MB; beyond, (a huge
// image, or strides that skip most of it) the GEMM paths read the input in
// place.
bool direct_fits(const ConvGeometry& G) {
  const int64_t Hp = (G.Ho - 1) * G.p.stride_h + (G.KH - 1) * G.p.dilation_h + 1;
  const int64_t Wp = (G.Wo - 1) * G.p.stride_w + (G.KW - 1) * G.p.dilation_w + 1;
  constexpr int64_t kMostElements = (int64_t(64) << 20) / 4;
  return Hp <= kMostElements && Wp <= kMostElements && G.C * Hp * Wp <= kMostElements;
}
// The same bound for grad_input_direct_strided's frame of grad_output.
bool direct_grad_input_fits(const ConvGeometry& G) {
  const int64_t Hf = std::max((G.H - 1 + G.p.pad_top) / G.p.stride_h, G.Ho - 1) +
                     (G.KH - 1) * G.p.dilation_h / G.p.stride_h + 1;
  const int64_t Wf = std::max((G.W - 1 + G.p.pad_left) / G.p.stride_w, G.Wo - 1) +
                     (G.KW - 1) * G.p.dilation_w / G.p.stride_w + 1;
  constexpr int64_t kMostElements = (int64_t(64) << 20) / 4;
  return Hf <= kMostElements && Wf <= kMostElements && G.Cout * Hf * Wf <= kMostElements;
}
// algorithm='gemm' keeps every pass of the layer on the GEMM paths.
bool gemm_named(const ConvGeometry& G) {
  return G.p.algorithm == ConvAlgorithm::Gemm && !G.auto_algorithm;
}
bool is_pointwise(const ConvGeometry& G) {
  return G.p.algorithm == ConvAlgorithm::Pointwise && rows_contiguous(G);
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
    const ConvGeometry& G = *g;
    const int64_t khw = G.KH * G.KW;
    const int64_t sw = G.p.stride_w;
    for (int64_t k = 0; k < kc; ++k) {
      const int64_t r = k0 + k;
      const int64_t c = r / khw, i = (r % khw) / G.KW, j = r % G.KW;
      const T* xc = x + c * G.xs_c;
      const int64_t ih_off = i * G.p.dilation_h - G.p.pad_top;
      const int64_t iw_off = j * G.p.dilation_w - G.p.pad_left;
      // Gather the row contiguously (zeros where the tap falls in the
      // padding, strided copies where it is inside), then copy it into the
      // panels NR values at a time.
      T row[gemm::NC + NR];
      const int64_t padded = (nc + NR - 1) / NR * NR;
      const int64_t q0 = q_offset + j0;
      int64_t oh = q0 / G.Wo, ow = q0 % G.Wo;
      for (int64_t jj = 0; jj < nc;) {
        const int64_t run = std::min(nc - jj, G.Wo - ow);  // the rest of this output row
        T* out = row + jj;
        const int64_t ih = oh * G.p.stride_h + ih_off;
        if (ih < 0 || ih >= G.H) {
          std::fill(out, out + run, T(0));
        } else {
          // Output columns ow + t read input column (ow + t) * sw + iw_off:
          // inside the image for t in [lo, hi).
          const int64_t first = ow * sw + iw_off;
          int64_t lo, hi;
          detail::inside_range(first, sw, run, G.W, &lo, &hi);
          const T* src = xc + ih * G.xs_h + first * G.xs_w;
          const int64_t step = sw * G.xs_w;
          std::fill(out, out + lo, T(0));
          if (step == 1)
            std::copy(src + lo, src + hi, out + lo);
          else
            for (int64_t t = lo; t < hi; ++t) out[t] = src[t * step];
          std::fill(out + hi, out + run, T(0));
        }
        jj += run, ow = 0, ++oh;
      }
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

depthwise::Plane plane_of(const ConvGeometry& G) {
  return {G.H, G.W, G.Ho, G.Wo, G.KH, G.KW, G.p.stride_h, G.p.stride_w, G.p.dilation_h,
          G.p.dilation_w, G.p.pad_top, G.p.pad_left, G.xs_h, G.xs_w};
}

// Resolves Auto, and checks that an algorithm asked for by name applies.
ConvAlgorithm choose_algorithm(const ConvGeometry& G) {
  const bool depthwise = G.Cg == 1 && G.G > 1;
  switch (G.p.algorithm) {
    case ConvAlgorithm::Auto:
      if (depthwise) return ConvAlgorithm::Depthwise;
      if (winograd4_pays(G)) return ConvAlgorithm::Winograd4x4;
      if (winograd_pays(G)) return ConvAlgorithm::Winograd;
      if (pointwise_shape(G) && rows_contiguous(G)) return ConvAlgorithm::Pointwise;
      return direct_fits(G) ? ConvAlgorithm::Direct : ConvAlgorithm::Gemm;
    case ConvAlgorithm::Depthwise:
      if (!depthwise)
        throw ValueError("algorithm='depthwise' needs one input channel per group "
                         "(groups == in_channels), got " + std::to_string(G.Cg) +
                         " input channels per group");
      return ConvAlgorithm::Depthwise;
    case ConvAlgorithm::Pointwise:
      if (!pointwise_shape(G))
        throw ValueError("algorithm='pointwise' needs a 1x1 kernel with stride 1 and no "
                         "padding");
      return ConvAlgorithm::Pointwise;
    case ConvAlgorithm::Winograd:
    case ConvAlgorithm::Winograd4x4:
      if (!winograd_shape(G))
        throw ValueError(std::string("algorithm='") + conv_algorithm_name(G.p.algorithm) +
                         "' needs a 3x3 kernel with stride 1, dilation 1 and groups=1");
      return G.p.algorithm;
    case ConvAlgorithm::Gemm:
      return ConvAlgorithm::Gemm;
    case ConvAlgorithm::Direct:
      return ConvAlgorithm::Direct;
  }
  return ConvAlgorithm::Gemm;
}

// Depthwise forward: one task per input plane (image, group), which is
// padded once into scratch and read by each of its output channels.
template <typename T>
void forward_depthwise(const TensorView& input, const T* weight, const T* bias,
                       const ConvGeometry& G, T* out) {
  const depthwise::PlaneOps<T> ops(plane_of(G));
  const T* x = input.ptr<const T>();
  const int64_t planes = G.N * G.C, taps = G.KH * G.KW;
  const int threads = detail::threads_for(planes, G.N * G.Cout * G.P * G.KH * G.KW);
  detail::Workspace<T> ws(threads, ops.scratch_size());
#pragma omp parallel num_threads(threads)
  {
    depthwise::PlaneWork<T> work(ops, ws.get(omp_get_thread_num()));
#pragma omp for schedule(static)
    for (int64_t t = 0; t < planes; ++t) {
      const int64_t n = t / G.C, g = t % G.C;
      work.load_input(x + n * G.xs_n + g * G.xs_c);
      for (int64_t o = g * G.Coutg; o < (g + 1) * G.Coutg; ++o)
        work.forward(weight + o * taps, bias ? bias[o] : T(0), out + (n * G.Cout + o) * G.P);
    }
  }
}

// Depthwise backward. With enough channels for the threads, one task per
// channel (group) does everything for it over all images: each image's
// input plane and grad_output planes are read once for grad_input,
// grad_weight and grad_bias together, and grad_weight sums over images in
// the task (in double), so no reduction across threads. With few channels,
// grad_input runs one task per plane and grad_weight one per channel.
template <typename T>
void backward_depthwise(const T* gy, const TensorView& input, const T* weight,
                        const ConvGeometry& G, T* gx, T* gw, T* gb) {
  const depthwise::PlaneOps<T> ops(plane_of(G));
  const T* x = input.ptr<const T>();
  const int64_t taps = G.KH * G.KW, work_size = G.N * G.Cout * G.P * G.KH * G.KW;
  const int threads = detail::threads_for(G.C, work_size);
  const bool by_channel = G.C >= 4 * threads;
  // One channel's gradients over images [0, N) (grad_input unless gx is
  // null, grad_weight and grad_bias into acc unless gw / gb are null).
  auto channel = [&](depthwise::PlaneWork<T>& work, double* acc, int64_t g, T* gx_,
                     T* gw_, T* gb_) {
    double* bias_acc = acc + taps * G.Coutg;
    std::fill(acc, bias_acc + G.Coutg, 0.0);
    for (int64_t n = 0; n < G.N; ++n) {
      if (gw_) work.load_input(x + n * G.xs_n + g * G.xs_c);
      for (int64_t m = 0; m < G.Coutg; ++m) {
        const int64_t o = g * G.Coutg + m;
        const T* gyp = gy + (n * G.Cout + o) * G.P;
        if (gw_ || gx_)
          work.add_output_grad(gyp, weight + o * taps, gw_ ? acc + m * taps : nullptr,
                               gx_ != nullptr, m == 0);
        if (gb_) bias_acc[m] += detail::sum_to_double(gyp, G.P);
      }
      if (gx_) work.store_grad_input(gx_ + (n * G.C + g) * G.H * G.W);
    }
    for (int64_t k = 0; gw_ && k < taps * G.Coutg; ++k)
      gw_[g * G.Coutg * taps + k] = static_cast<T>(acc[k]);
    for (int64_t m = 0; gb_ && m < G.Coutg; ++m)
      gb_[g * G.Coutg + m] = static_cast<T>(bias_acc[m]);
  };
  const int plane_threads = by_channel ? threads : detail::threads_for(G.N * G.C, work_size);
  const int most = std::max(threads, plane_threads);
  detail::Workspace<T> ws(most, ops.scratch_size());
  detail::Workspace<double> acc_ws(most, (taps + 1) * G.Coutg);
  if (by_channel) {
#pragma omp parallel num_threads(threads)
    {
      depthwise::PlaneWork<T> work(ops, ws.get(omp_get_thread_num()));
#pragma omp for schedule(static)
      for (int64_t g = 0; g < G.C; ++g)
        channel(work, acc_ws.get(omp_get_thread_num()), g, gx, gw, gb);
    }
    return;
  }
  if (gx) {
#pragma omp parallel num_threads(plane_threads)
    {
      depthwise::PlaneWork<T> work(ops, ws.get(omp_get_thread_num()));
#pragma omp for schedule(static)
      for (int64_t t = 0; t < G.N * G.C; ++t) {
        const int64_t n = t / G.C, g = t % G.C;
        for (int64_t o = g * G.Coutg; o < (g + 1) * G.Coutg; ++o)
          work.add_output_grad(gy + (n * G.Cout + o) * G.P, weight + o * taps, nullptr, true,
                               o == g * G.Coutg);
        work.store_grad_input(gx + t * G.H * G.W);
      }
    }
  }
  if (gw || gb) {
#pragma omp parallel num_threads(threads)
    {
      depthwise::PlaneWork<T> work(ops, ws.get(omp_get_thread_num()));
#pragma omp for schedule(static)
      for (int64_t g = 0; g < G.C; ++g)
        channel(work, acc_ws.get(omp_get_thread_num()), g, nullptr, gw, gb);
    }
  }
}

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
        std::fill(dst, dst + seg, T(0));
        continue;
      }
      const T* src = plane + ih * hs;
      std::fill(dst, dst + jlo, T(0));
      if (ws == 1)
        std::copy(src + iw0 + jlo, src + iw0 + jhi, dst + jlo);
      else
        for (int64_t j = jlo; j < jhi; ++j) dst[j] = src[(iw0 + j) * ws];
      std::fill(dst + jhi, dst + seg, T(0));
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

// Winograd F(M x M, 3x3), M = 2 or 4 (conv_winograd.h).
template <int M, typename T>
void winograd_conv(const WinogradConv<T>& a, const T* bias, T* out) {
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
  // per chunk).
  constexpr int64_t kChunkBytes = int64_t(32) << 20;
  const int64_t unit_bytes = kPoints * (C + Cout) * unit_tiles * int64_t(sizeof(T));
  const int64_t per_chunk = std::clamp<int64_t>(kChunkBytes / unit_bytes, 1, units);
  const int64_t kmax = per_chunk * unit_tiles;  // tiles of a chunk
  detail::Workspace<T> vd_ws(1, kPoints * (C + Cout) * kmax + kPoints * Cout * C);
  T* v = vd_ws.get();                    // v[(xi * C + c) * kmax + tile]
  T* dm = v + kPoints * C * kmax;        // dm[(xi * Cout + o) * kmax + tile]
  T* du = dm + kPoints * Cout * kmax;    // du[(xi * Cout + o) * C + c]
  // Touch the fresh pages from one thread first: faulting them in from both
  // threads' scattered transform writes measured 5 ms slower for 15 MB
  // (16 x 128 x 14 x 14, 128 out) than this fill (0.65 ms).
  std::fill(v, du, T(0));
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

template <typename T>
void forward_impl(const TensorView& input, const detail::Contiguous<T>& weight, const T* bias,
                  const ConvGeometry& G, T* out) {
  // Tasks: (image, group, tile of output positions, block of output
  // channels); each writes its own block of the output. When images x tiles
  // give fewer tasks than threads (batch 1), split the output channels first
  // (each task keeps whole tiles, so every packed weight is used across
  // many positions), then, if still short, make the tiles smaller.
  constexpr int NR = gemm::Tile<T>::NR, MR = gemm::Tile<T>::MR;
  const int64_t threads_wanted = get_num_threads();
  const int64_t images = G.N * G.G;
  int64_t tile = std::min(gemm::NC, gemm::round_up(G.P, NR));
  int64_t tiles = (G.P + tile - 1) / tile;
  int64_t mblocks = 1;
  if (images * tiles < threads_wanted) {
    const int64_t min_rows = 4 * MR;  // keep each block at least 4 panels deep
    mblocks = std::clamp((threads_wanted + images * tiles - 1) / (images * tiles), int64_t(1),
                         std::max<int64_t>(1, G.Coutg / min_rows));
  }
  const int64_t mrows = gemm::round_up((G.Coutg + mblocks - 1) / mblocks, MR);
  mblocks = (G.Coutg + mrows - 1) / mrows;
  if (images * tiles * mblocks < threads_wanted) {
    const int64_t tiles_wanted = (threads_wanted + images * mblocks - 1) / (images * mblocks);
    tile = std::clamp(gemm::round_up((G.P + tiles_wanted - 1) / tiles_wanted, NR), int64_t(NR),
                      gemm::NC);
    tiles = (G.P + tile - 1) / tile;
  }
  const int64_t tasks = images * tiles * mblocks;
  // Weights are packed once, shared by all tasks, when many tiles reuse
  // them; with few tiles (batch 1) packing costs more than it saves and the
  // microkernel reads the weight rows in place.
  const bool pack_weights = G.N * tiles > 2;
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
        std::fill(drow, drow + Wp, T(0));
        continue;
      }
      std::fill(drow, drow + lo, T(0));
      const T* srow = src + ih * G.xs_h + (lo - G.p.pad_left) * G.xs_w;
      if (G.xs_w == 1)
        std::copy(srow, srow + (hi - lo), drow + lo);
      else
        for (int64_t j = 0; j < hi - lo; ++j) drow[lo + j] = srow[j * G.xs_w];
      std::fill(drow + hi, drow + Wp, T(0));
    }
  }
}

// Direct convolution: the GEMM of forward_impl turned around, so that
// nothing is packed per tile. Output positions are the rows of a tile (MR of
// them, in output order, across row ends), output channels its columns (one
// NR-wide panel of the packed weights, B(k, o) = weight[o, k]); the
// microkernel broadcasts input values straight from a zero-padded copy of
// the image (gemm::gather_kernel: row i of the tile reads the window of
// position i, tap k at a fixed offset koff[k] inside it), so strides and
// dilations cost nothing extra, and no im2col block is packed: for 64
// channels that packing took a fifth of forward_impl's time. The tile is
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
                    const ConvGeometry& G, T* out) {
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
  // Where tap (c, i, j) of the slice of nc channels from c0 goes.
  auto tap_index = [&](int64_t c0, int64_t nc, int64_t c, int64_t i, int64_t j) {
    return c0 * khw + (i * nc + c - c0) * G.KW + j;
  };
  std::vector<int64_t> koff(static_cast<size_t>(K));
  for (int64_t c = 0; c < G.Cg; ++c)
    for (int64_t i = 0; i < G.KH; ++i)
      for (int64_t j = 0; j < G.KW; ++j) {
        const int64_t c0 = c / cb * cb, nc = std::min(cb, G.Cg - c0);
        koff[static_cast<size_t>(tap_index(c0, nc, c, i, j))] = c * plane + i * dh * Wp + j * dw;
      }
  // Weights: per group, `panels` panels of K x NR in the slices' tap order,
  // B(slice tap, j) = weight[o0 + j, tap], one slice at a time (the
  // slice's rows stay in L1 while each output channel's weights are read
  // along the taps).
  detail::Workspace<T> w_ws(1, G.G * panels * K * NR);
  T* wpacked = w_ws.get();
#pragma omp parallel for num_threads(detail::threads_for(G.G * panels, G.Cout * K)) schedule(static)
  for (int64_t u = 0; u < G.G * panels; ++u) {
    const int64_t g = u / panels, o0 = (u % panels) * NR, no = std::min<int64_t>(NR, G.Coutg - o0);
    T* panel = wpacked + u * K * NR;
    for (int64_t c0 = 0; c0 < G.Cg; c0 += cb) {
      const int64_t nc = std::min(cb, G.Cg - c0);
      T* slice = panel + c0 * khw * NR;
      for (int64_t j = 0; j < NR; ++j) {
        if (j >= no) {  // the panel's columns past the last output channel
          for (int64_t k = 0; k < nc * khw; ++k) slice[k * NR + j] = T(0);
          continue;
        }
        const T* w = weight + (g * G.Coutg + o0 + j) * K + c0 * khw;  // taps (c, i, kw)
        for (int64_t c = 0; c < nc; ++c)
          for (int64_t i = 0; i < G.KH; ++i) {
            T* dst = panel + tap_index(c0, nc, c0 + c, i, 0) * NR + j;
            const T* src = w + (c * G.KH + i) * G.KW;
            for (int64_t kw = 0; kw < G.KW; ++kw) dst[kw * NR] = src[kw];
          }
      }
    }
  }
  constexpr int64_t kChunkBytes = int64_t(8) << 20;
  const int64_t chunk = std::clamp<int64_t>(kChunkBytes / (image * int64_t(sizeof(T))), 1, G.N);
  detail::Workspace<T> x_ws(1, chunk * image);
  T* xpad = x_ws.get();
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
  const int64_t split = std::max<int64_t>(1, (want + images * oblocks - 1) / (images * oblocks));
  const int64_t pblock = gemm::round_up((G.P + split - 1) / split, MR);
  const int64_t pblocks = (G.P + pblock - 1) / pblock;
  const int64_t ochunks = (panels + oblock - 1) / oblock;
  const int64_t work = G.N * G.Cout * G.P * K;
  const T* x = input.ptr<const T>();
  for (int64_t n0 = 0; n0 < G.N; n0 += chunk) {
    const int64_t nn = std::min(chunk, G.N - n0);
    pad_planes(x + n0 * G.xs_n, nn, G, Hp, Wp, xpad);
    const int64_t tasks = nn * G.G * ochunks * pblocks;
    const int threads = detail::threads_for(tasks, work);
    detail::Workspace<T> tile_ws(threads, kDirectBlockTiles * MR * NR);
#pragma omp parallel num_threads(threads)
    {
      T* tiles = tile_ws.get(omp_get_thread_num());
#pragma omp for schedule(dynamic, 1)
      for (int64_t t = 0; t < tasks; ++t) {
        const int64_t n = t / (G.G * ochunks * pblocks), g = (t / (ochunks * pblocks)) % G.G;
        const int64_t u_begin = ((t / pblocks) % ochunks) * oblock;
        const int64_t u_end = std::min(panels, u_begin + oblock);
        const int64_t q_begin = (t % pblocks) * pblock, q_end = std::min(G.P, q_begin + pblock);
        const T* xg = xpad + (n * G.C + g * G.Cg) * plane;
        for (int64_t qb = q_begin; qb < q_end; qb += kDirectBlockTiles * MR) {
          const int64_t qe = std::min(q_end, qb + kDirectBlockTiles * MR);
          // The window of each position of the block, found once for all
          // its panels and slices.
          const T* rows[kDirectBlockTiles * MR];
          for (int64_t q = qb, oh = qb / G.Wo, ow = qb % G.Wo; q < qe; ++q) {
            rows[q - qb] = xg + oh * sh * Wp + ow * sw;
            if (++ow == G.Wo) ow = 0, ++oh;
          }
          int64_t row_lo[kDirectBlockTiles], row_hi[kDirectBlockTiles];
          for (int64_t q0 = qb; q0 < qe; q0 += MR)
            row_range(q0, std::min(qe, q0 + MR), &row_lo[(q0 - qb) / MR], &row_hi[(q0 - qb) / MR]);
          for (int64_t u = u_begin; u < u_end; ++u) {
            const int64_t o0 = u * NR, no = std::min<int64_t>(NR, G.Coutg - o0);
            const T* b = wpacked + (g * panels + u) * K * NR;
            for (int64_t c0 = 0; c0 < G.Cg; c0 += cb) {  // a slice: channels [c0, c0 + nc)
              const int64_t nc = std::min(cb, G.Cg - c0), k0 = c0 * khw;
              for (int64_t q0 = qb; q0 < qe; q0 += MR) {
                const int64_t tq = (q0 - qb) / MR;
                const int mr = static_cast<int>(std::min<int64_t>(MR, qe - q0));
                const int64_t lo = k0 + row_lo[tq] * nc * G.KW, hi = k0 + row_hi[tq] * nc * G.KW;
                if (lo < hi)
                  gemm::gather_kernel(hi - lo, koff.data() + lo, rows + (q0 - qb), b + lo * NR,
                                      tiles + (q0 - qb) * NR, mr, c0 > 0);
              }
            }
            for (int64_t q0 = qb; q0 < qe; q0 += MR) {  // all taps in the padding
              const int64_t tq = (q0 - qb) / MR;
              if (row_lo[tq] >= row_hi[tq])
                std::fill(tiles + (q0 - qb) * NR, tiles + std::min(qe - qb, q0 - qb + MR) * NR, T(0));
            }
            T* c = out + ((n0 + n) * G.Cout + g * G.Coutg + o0) * G.P;
            gemm::store_transposed(tiles, qe - qb, no, bias ? bias + g * G.Coutg + o0 : nullptr,
                                   c + qb, G.P);
          }
        }
      }
    }
  }
}

// grad_input of a pointwise convolution: gx[n, g] (Cg x P) = W_g^T (Cg x Coutg)
// * gy[n, g] (Coutg x P), written straight into gx. Tasks: (image, group,
// tile of positions).
template <typename T>
void grad_input_pointwise(const T* gy, const detail::Contiguous<T>& weight, const ConvGeometry& G,
                          T* gx) {
  constexpr int NR = gemm::Tile<T>::NR;
  const int64_t a_size = gemm::packed_a_size<T>(G.Cg, G.Coutg);
  detail::Workspace<T> a_ws(1, a_size * G.G);
  T* a_packed = a_ws.get();
  for (int64_t g = 0; g < G.G; ++g)  // A(c, o) = weight[g * Coutg + o, c]
    gemm::pack_a_parallel(G.Cg, G.Coutg, weight.data() + g * G.Coutg * G.Kc, int64_t(1), G.Kc,
                          a_packed + g * a_size);
  const int64_t want = 2 * static_cast<int64_t>(get_num_threads());
  const int64_t images = G.N * G.G;
  const int64_t tiles_wanted = std::max<int64_t>(1, (want + images - 1) / images);
  const int64_t tile = std::clamp(gemm::round_up((G.P + tiles_wanted - 1) / tiles_wanted, NR),
                                  int64_t(NR), gemm::NC);
  const int64_t tiles = (G.P + tile - 1) / tile, tasks = images * tiles;
  const int threads = detail::threads_for(tasks, G.N * G.Cout * G.P * G.Kc);
  detail::Workspace<T> ws(threads, gemm::b_workspace_size<T>());
#pragma omp parallel num_threads(threads)
  {
    T* bbuf = ws.get(omp_get_thread_num());
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t n = t / (G.G * tiles), g = (t / tiles) % G.G, q0 = (t % tiles) * tile;
      const int64_t nq = std::min(tile, G.P - q0);
      const T* gyg = gy + (n * G.Cout + g * G.Coutg) * G.P + q0;
      T* c = gx + (n * G.C + g * G.Cg) * G.P + q0;
      gemm::gemm_packed(G.Cg, nq, G.Coutg, a_packed + g * a_size, G.Cg, 0,
                        gemm::StridedPackB<T>{gyg, G.P, 1}, c, G.P, false, bbuf);
    }
  }
}

// grad_input of a stride-1 convolution is a forward convolution of
// grad_output with the flipped, transposed filters (per group) and padding
// dilation * (k - 1) - p, so it runs on the forward path: no column buffer,
// no scatter. Needs p <= dilation * (k - 1) on every side.
bool grad_input_as_forward_applies(const ConvGeometry& G) {
  const int64_t span_h = G.p.dilation_h * (G.KH - 1), span_w = G.p.dilation_w * (G.KW - 1);
  return G.p.stride_h == 1 && G.p.stride_w == 1 && G.p.pad_top <= span_h &&
         G.p.pad_bottom <= span_h && G.p.pad_left <= span_w && G.p.pad_right <= span_w;
}

template <typename T>
void forward_impl(const TensorView& input, const detail::Contiguous<T>& weight, const T* bias,
                  const ConvGeometry& G, T* out);

template <typename T>
void grad_input_as_forward(const T* gy, const T* weight, const ConvGeometry& G, T* gx) {
  // flipped[g * Cg + c, o, i, j] = weight[g * Coutg + o, c, KH - 1 - i, KW - 1 - j]
  detail::Workspace<T> w_ws(1, G.Cout * G.Kc);
  T* flipped = w_ws.get();
  const int64_t khw = G.KH * G.KW;
  for (int64_t g = 0; g < G.G; ++g)
    for (int64_t c = 0; c < G.Cg; ++c)
      for (int64_t o = 0; o < G.Coutg; ++o) {
        const T* src = weight + ((g * G.Coutg + o) * G.Cg + c) * khw;
        T* dst = flipped + ((g * G.Cg + c) * G.Coutg + o) * khw;
        for (int64_t k = 0; k < khw; ++k) dst[k] = src[khw - 1 - k];
      }
  const int64_t wshape[4] = {G.C, G.Coutg, G.KH, G.KW};
  const DType dtype = std::is_same_v<T, float> ? DType::Float32 : DType::Float64;
  const TensorView wv = contiguous_view(flipped, dtype, 4, wshape);
  const detail::Contiguous<T> wc(wv);
  const int64_t gshape[4] = {G.N, G.Cout, G.Ho, G.Wo};
  const TensorView gyv = contiguous_view(const_cast<T*>(gy), dtype, 4, gshape);
  ConvGeometry F;
  F.N = G.N, F.C = G.Cout, F.H = G.Ho, F.W = G.Wo;
  F.Cout = G.C, F.KH = G.KH, F.KW = G.KW;
  F.Ho = G.H, F.Wo = G.W, F.P = G.H * G.W;
  F.G = G.G, F.Cg = G.Coutg, F.Coutg = G.Cg, F.Kc = G.Coutg * khw;
  F.xs_n = G.Cout * G.P, F.xs_c = G.P, F.xs_h = G.Wo, F.xs_w = 1;
  F.p = G.p;
  F.p.pad_top = G.p.dilation_h * (G.KH - 1) - G.p.pad_top;
  F.p.pad_bottom = G.p.dilation_h * (G.KH - 1) - G.p.pad_bottom;
  F.p.pad_left = G.p.dilation_w * (G.KW - 1) - G.p.pad_left;
  F.p.pad_right = G.p.dilation_w * (G.KW - 1) - G.p.pad_right;
  // The direct kernel unless the GEMM path was asked for by name.
  const bool direct = !gemm_named(G) && direct_fits(F);
  F.p.algorithm = direct ? ConvAlgorithm::Direct : ConvAlgorithm::Gemm;
  if (!direct)
    forward_impl<T>(gyv, wc, nullptr, F, gx);
  else
    forward_direct<T>(gyv, wc.data(), nullptr, F, gx);
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
// block of positions); images are framed in chunks.
template <typename T>
void grad_input_direct_strided(const T* gy, const T* weight, const ConvGeometry& G, T* gx) {
  constexpr int MR = gemm::Tile<T>::MR, NR = gemm::Tile<T>::NR;
  const int64_t sh = G.p.stride_h, sw = G.p.stride_w, dh = G.p.dilation_h, dw = G.p.dilation_w;
  const int64_t pt = G.p.pad_top, pl = G.p.pad_left;
  const int64_t Mh = (G.KH - 1) * dh / sh, Mw = (G.KW - 1) * dw / sw;  // largest m
  // The frame: grad_output rows -Mh .. (H - 1 + pt) / sh, zero outside [0, Ho).
  const int64_t Hf = std::max((G.H - 1 + pt) / sh, G.Ho - 1) + Mh + 1;
  const int64_t Wf = std::max((G.W - 1 + pl) / sw, G.Wo - 1) + Mw + 1;
  const int64_t fplane = Hf * Wf, frame = G.Cout * fplane;
  const int64_t phases = sh * sw, cpanels = (G.Cg + NR - 1) / NR;
  // Per phase: its taps (as reduction offsets) and its packed weights.
  std::vector<std::vector<int64_t>> koff(static_cast<size_t>(phases));
  std::vector<int64_t> wpos(static_cast<size_t>(phases) + 1, 0);  // packed weights offsets
  for (int64_t ph = 0; ph < phases; ++ph) {
    auto& ko = koff[static_cast<size_t>(ph)];
    for (int64_t o = 0; o < G.Coutg; ++o)
      for (int64_t kh = 0; kh < G.KH; ++kh)
        for (int64_t kw = 0; kw < G.KW; ++kw)
          if ((kh * dh) % sh == ph / sw && (kw * dw) % sw == ph % sw)
            ko.push_back(o * fplane - (kh * dh / sh) * Wf - (kw * dw / sw));
    wpos[static_cast<size_t>(ph) + 1] =
        wpos[static_cast<size_t>(ph)] + static_cast<int64_t>(ko.size()) * G.G * cpanels * NR;
  }
  detail::Workspace<T> w_ws(1, std::max<int64_t>(1, wpos.back()));
  T* wpacked = w_ws.get();  // phase ph, group g, panel u: wpos[ph] + (g * cpanels + u) * K * NR
  for (int64_t ph = 0; ph < phases; ++ph) {
    const int64_t K = static_cast<int64_t>(koff[static_cast<size_t>(ph)].size());
    for (int64_t g = 0; g < G.G; ++g)
      for (int64_t u = 0; u < cpanels; ++u) {
        T* dst = wpacked + wpos[static_cast<size_t>(ph)] + (g * cpanels + u) * K * NR;
        int64_t k = 0;
        for (int64_t o = 0; o < G.Coutg; ++o)
          for (int64_t kh = 0; kh < G.KH; ++kh)
            for (int64_t kw = 0; kw < G.KW; ++kw) {
              if ((kh * dh) % sh != ph / sw || (kw * dw) % sw != ph % sw) continue;
              for (int64_t j = 0; j < NR; ++j) {
                const int64_t c = u * NR + j;
                dst[k * NR + j] =
                    c < G.Cg ? weight[(((g * G.Coutg + o) * G.Cg + c) * G.KH + kh) * G.KW + kw]
                             : T(0);
              }
              ++k;
            }
      }
  }
  constexpr int64_t kChunkBytes = int64_t(8) << 20;
  const int64_t chunk = std::clamp<int64_t>(kChunkBytes / (frame * int64_t(sizeof(T))), 1, G.N);
  detail::Workspace<T> f_ws(1, chunk * frame);
  T* gyf = f_ws.get();
  // Blocks of input positions per (image, group, phase): enough tasks for
  // every thread at small batch.
  const int64_t want = 2 * static_cast<int64_t>(get_num_threads());
  const int64_t per_plane = std::max<int64_t>(1, (want + chunk * G.G * phases - 1) /
                                                     (chunk * G.G * phases));
  const int64_t HWph = ((G.H + sh - 1) / sh) * ((G.W + sw - 1) / sw);  // largest phase
  const int64_t pblock = gemm::round_up((HWph + per_plane - 1) / per_plane, MR);
  const int64_t pblocks = (HWph + pblock - 1) / pblock;
  for (int64_t n0 = 0; n0 < G.N; n0 += chunk) {
    const int64_t nn = std::min(chunk, G.N - n0);
#pragma omp parallel for num_threads(detail::threads_for(nn * G.Cout, nn * frame)) schedule(static)
    for (int64_t v = 0; v < nn * G.Cout; ++v) {
      const T* src = gy + (n0 * G.Cout + v) * G.P;
      T* dst = gyf + v * fplane;
      std::fill(dst, dst + Mh * Wf, T(0));
      for (int64_t r = 0; r < Hf - Mh; ++r) {
        T* row = dst + (r + Mh) * Wf;
        std::fill(row, row + Mw, T(0));
        if (r < G.Ho) {
          std::copy(src + r * G.Wo, src + (r + 1) * G.Wo, row + Mw);
          std::fill(row + Mw + G.Wo, row + Wf, T(0));
        } else {
          std::fill(row + Mw, row + Wf, T(0));
        }
      }
    }
    const int64_t tasks = nn * G.G * phases * pblocks;
    const int threads = detail::threads_for(tasks, nn * G.Cout * G.P * G.Kc);
    detail::Workspace<T> tile_ws(threads, MR * NR);
#pragma omp parallel num_threads(threads)
    {
      T* tile = tile_ws.get(omp_get_thread_num());
#pragma omp for schedule(dynamic, 1)
      for (int64_t t = 0; t < tasks; ++t) {
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
        for (int64_t u = 0; u < cpanels; ++u) {
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
}

template <typename T>
void grad_input_impl(const T* gy, const detail::Contiguous<T>& weight, const ConvGeometry& G, T* gx) {
  if (is_pointwise(G)) return grad_input_pointwise(gy, weight, G, gx);
  if (grad_input_as_forward_applies(G)) return grad_input_as_forward(gy, weight.data(), G, gx);
  // The direct kernel (for strided layers, or stride 1 with padding past the
  // kernel's reach) when each tile fills at least half a panel of input
  // channels: 128 channels, 3x3 stride 2, batch 16: 17.5 -> 10.0 ms (2
  // threads, min of 5); with the 3 channels of a first layer (3 of 32 columns
  // used) it was 2.7-4x slower than the GEMM path below.
  if (!gemm_named(G) && G.Cg >= gemm::Tile<T>::NR / 2 && direct_grad_input_fits(G))
    return grad_input_direct_strided(gy, weight.data(), G, gx);
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

// grad_weight of a stride-1 convolution as one GEMM per kernel tap over the
// zero-padded image laid out flat: with positions indexed Wp wide
// (q = oh * Wp + ow, the extra columns given zero gradient), tap (i, j) reads
// the padded plane at q + i * dh * Wp + j * dw, so
//   dW[:, :, i, j]^T (Cg x Coutg) = xpad (Cg x q, row-major, shifted) * gy_wide^T.
// The image is used in place (no im2col) and grad_output is packed once per
// image for all taps.
// It pays where packing the im2col side dominates: few output channels per
// group (each packed element then feeds only 2 * Coutg flops).
bool grad_weight_by_taps_applies(const ConvGeometry& G) {
  return G.p.stride_h == 1 && G.p.stride_w == 1 && G.KH * G.KW > 1 && G.Coutg <= 96;
}

template <typename T>
void grad_weight_by_taps(const T* gy, const TensorView& input, const ConvGeometry& G, T* gw) {
  constexpr int NR = gemm::Tile<T>::NR, MR = gemm::Tile<T>::MR;
  const int64_t Hp = G.H + G.p.pad_top + G.p.pad_bottom, Wp = G.W + G.p.pad_left + G.p.pad_right;
  const int64_t plane = Hp * Wp, taps = G.KH * G.KW;
  const int64_t n_wide = (G.Ho - 1) * Wp + G.Wo;  // flat positions of the outputs
  const int64_t Npad = gemm::round_up(G.Coutg, NR);
  detail::Workspace<T> xpad_ws(1, G.Cg * plane);
  detail::Workspace<T> gyw_ws(1, G.Coutg * n_wide);
  detail::Workspace<T> bpack_ws(1, Npad * n_wide);
  detail::Workspace<T> acc_ws(1, taps * G.Cg * G.Coutg);  // dW^T per tap, summed over images
  T* xpad = xpad_ws.get();
  T* gyw = gyw_ws.get();
  T* bpack = bpack_ws.get();
  T* acc = acc_ws.get();
  const int64_t want = static_cast<int64_t>(get_num_threads());
  const int64_t mrows = std::max<int64_t>(4 * MR, gemm::round_up((G.Cg * taps / (2 * want) + 1), MR));
  const int64_t mblocks = (G.Cg + mrows - 1) / mrows;
  const int64_t tasks = taps * mblocks;
  const int threads = detail::threads_for(tasks, G.N * G.Cout * G.P * G.Kc);
  detail::Workspace<T> ws(threads, gemm::b_workspace_size<T>());
  const T* x = input.ptr<const T>();
  for (int64_t g = 0; g < G.G; ++g) {
    for (int64_t n = 0; n < G.N; ++n) {
      const T* xg = x + n * G.xs_n + g * G.Cg * G.xs_c;
      const T* gyg = gy + (n * G.Cout + g * G.Coutg) * G.P;
#pragma omp parallel num_threads(threads)
      {
        // The padded image and grad_output laid out Wp wide.
#pragma omp for schedule(static)
        for (int64_t c = 0; c < G.Cg; ++c) {
          T* dst = xpad + c * plane;
          std::fill(dst, dst + plane, T(0));
          for (int64_t ih = 0; ih < G.H; ++ih) {
            T* row = dst + (ih + G.p.pad_top) * Wp + G.p.pad_left;
            const T* src = xg + c * G.xs_c + ih * G.xs_h;
            for (int64_t iw = 0; iw < G.W; ++iw) row[iw] = src[iw * G.xs_w];
          }
        }
#pragma omp for schedule(static)
        for (int64_t o = 0; o < G.Coutg; ++o) {
          T* dst = gyw + o * n_wide;
          std::fill(dst, dst + n_wide, T(0));
          for (int64_t oh = 0; oh < G.Ho; ++oh)
            std::copy(gyg + o * G.P + oh * G.Wo, gyg + o * G.P + (oh + 1) * G.Wo, dst + oh * Wp);
        }
        // B(q, o) = gy_wide[o, q], packed once for all taps: K blocks x panels.
#pragma omp for schedule(static)
        for (int64_t k0 = 0; k0 < n_wide; k0 += gemm::KC) {
          const int64_t kc = std::min(gemm::KC, n_wide - k0);
          gemm::StridedPackB<T>{gyw, 1, n_wide}(k0, kc, 0, G.Coutg, bpack + k0 * Npad);
        }
        T* bbuf = ws.get(omp_get_thread_num());
#pragma omp for schedule(dynamic, 1)
        for (int64_t t = 0; t < tasks; ++t) {
          const int64_t tap = t / mblocks, c0 = (t % mblocks) * mrows;
          const int64_t nc = std::min(mrows, G.Cg - c0);
          const int64_t i = tap / G.KW, j = tap % G.KW;
          const T* a = xpad + i * G.p.dilation_h * Wp + j * G.p.dilation_w;
          gemm::gemm_packed(nc, G.Coutg, n_wide, a, G.Cg, c0, PrepackedB<T>{bpack, Npad},
                            acc + (tap * G.Cg + c0) * G.Coutg, G.Coutg, n > 0, bbuf, plane);
        }
      }
    }
    // dW[g * Coutg + o, c, i, j] = acc[tap][c][o]
    for (int64_t o = 0; o < G.Coutg; ++o)
      for (int64_t c = 0; c < G.Cg; ++c)
        for (int64_t tap = 0; tap < taps; ++tap)
          gw[((g * G.Coutg + o) * G.Cg + c) * taps + tap] = acc[(tap * G.Cg + c) * G.Coutg + o];
  }
}

// grad_weight when it is small (the first layers of AlexNet and ResNet: 3
// input channels, 37-140 KB): tasks over (image, chunk of positions), each
// computing the whole grad_weight of its chunk into a partial of its own
// (both operands packed once, no task with a sliver of columns), then the
// partials summed in task order, so the result does not depend on the
// thread count. The blocked path below would split grad_weight's few
// columns among the threads and pack the image once per block of rows:
// 2 threads, ResNet's 7x7/2 conv1 at batch 8 went from 16.2 to 10.7 ms,
// AlexNet's conv1 at batch 16 from 16.0 to 13.6 ms. (Packing the image
// position by position, contiguous stores instead of stores NR apart, was
// tried for these strided layers and measured 1.2-1.7x slower.)
constexpr int64_t kSmallGradWeightBytes = 256 << 10;
constexpr int64_t kGradWeightChunk = 16 * gemm::KC;  // positions per packed chunk of gy

template <typename T>
bool grad_weight_by_chunks_applies(const ConvGeometry& G) {
  return G.Cout * G.Kc * int64_t(sizeof(T)) <= kSmallGradWeightBytes && !is_pointwise(G);
}

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
  const int threads = detail::threads_for(tasks, G.N * G.Cout * G.P * G.Kc);
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
      for (int64_t t = t0; t < t0 + nt; ++t) {
        const int64_t n = t / chunks, q0 = (t % chunks) * chunk, nq = std::min(chunk, G.P - q0);
        for (int64_t g = 0; g < G.G; ++g) {
          gemm::pack_a(G.Coutg, nq, gy + (n * G.Cout + g * G.Coutg) * G.P + q0, G.P,
                       int64_t(1), a_packed);
          gemm::gemm_packed(
              G.Coutg, G.Kc, nq, a_packed, G.Coutg, 0,
              Im2colTransposedPackB<T>{x + n * G.xs_n + g * G.Cg * G.xs_c, &G, 0, q0},
              partials + (t - t0) * size + g * G.Coutg * G.Kc, G.Kc, false, bbuf);
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
void grad_weight_direct(const T* gy, const TensorView& input, const ConvGeometry& G, T* gw) {
  constexpr int MR = gemm::Tile<T>::MR, NR = gemm::Tile<T>::NR;
  const int64_t sh = G.p.stride_h, sw = G.p.stride_w, dh = G.p.dilation_h, dw = G.p.dilation_w;
  const int64_t Hp = (G.Ho - 1) * sh + (G.KH - 1) * dh + 1;
  const int64_t Wp = (G.Wo - 1) * sw + (G.KW - 1) * dw + 1;
  const int64_t plane = Hp * Wp, image = G.C * plane;
  const int64_t panels = (G.Coutg + NR - 1) / NR, ktiles = (G.Kc + MR - 1) / MR;
  constexpr int64_t kChunkBytes = int64_t(16) << 20;
  const int64_t per_image = (image + G.G * panels * NR * G.P) * int64_t(sizeof(T));
  const int64_t chunk = std::clamp<int64_t>(kChunkBytes / per_image, 1, G.N);
  // The reduction runs over (image of the chunk, position), in segments of
  // at most kSegment positions, so that a segment of packed grad_output
  // (kSegment x NR) stays in L2 while the tasks of its panel read it.
  constexpr int64_t kSegment = 4096;
  std::vector<int64_t> koff(static_cast<size_t>(G.Kc)), pix(static_cast<size_t>(chunk * G.P));
  for (int64_t c = 0; c < G.Cg; ++c)
    for (int64_t i = 0; i < G.KH; ++i)
      for (int64_t j = 0; j < G.KW; ++j)
        koff[static_cast<size_t>((c * G.KH + i) * G.KW + j)] = c * plane + i * dh * Wp + j * dw;
  for (int64_t n = 0; n < chunk; ++n)
    for (int64_t q = 0; q < G.P; ++q)
      pix[static_cast<size_t>(n * G.P + q)] = n * image + (q / G.Wo) * sh * Wp + (q % G.Wo) * sw;
  const int64_t gy_panel = chunk * G.P * NR;  // one panel of the chunk's grad_output
  detail::Workspace<T> ws(1, chunk * image + G.G * panels * gy_panel);
  T* xpad = ws.get();
  T* gyp = xpad + chunk * image;  // gyp[(g * panels + u) * gy_panel + (n * P + q) * NR + j]
  const int64_t tasks = G.G * panels * ktiles;
  const int threads = detail::threads_for(tasks, G.N * G.Cout * G.P * G.Kc);
  detail::Workspace<T> tile_ws(threads, MR * NR);
  for (int64_t n0 = 0; n0 < G.N; n0 += chunk) {
    const int64_t nn = std::min(chunk, G.N - n0), steps = nn * G.P;
    pad_planes(input.ptr<const T>() + n0 * G.xs_n, nn, G, Hp, Wp, xpad);
    const int64_t units = nn * G.G * panels;
#pragma omp parallel for num_threads(detail::threads_for(units, nn * G.Cout * G.P)) schedule(static)
    for (int64_t v = 0; v < units; ++v) {
      const int64_t n = v / (G.G * panels), gu = v % (G.G * panels);
      const int64_t g = gu / panels, o0 = (gu % panels) * NR;
      const T* src = gy + ((n0 + n) * G.Cout + g * G.Coutg) * G.P;
      gemm::StridedPackB<T>{src, 1, G.P}(0, G.P, o0, std::min<int64_t>(NR, G.Coutg - o0),
                                         gyp + gu * gy_panel + n * G.P * NR);
    }
#pragma omp parallel num_threads(threads)
    {
      T* tile = tile_ws.get(omp_get_thread_num());
#pragma omp for schedule(dynamic, 1)
      for (int64_t t = 0; t < tasks; ++t) {  // consecutive tasks share a panel
        const int64_t gu = t / ktiles, g = gu / panels, o0 = (gu % panels) * NR;
        const int64_t k0 = (t % ktiles) * MR;
        const int mr = static_cast<int>(std::min<int64_t>(MR, G.Kc - k0));
        const int64_t no = std::min<int64_t>(NR, G.Coutg - o0);
        const T* rows[MR];
        for (int i = 0; i < mr; ++i)
          rows[i] = xpad + g * G.Cg * plane + koff[static_cast<size_t>(k0 + i)];
        for (int64_t s0 = 0; s0 < steps; s0 += kSegment) {
          const int64_t len = std::min(kSegment, steps - s0);
          gemm::gather_kernel(len, pix.data() + s0, rows, gyp + gu * gy_panel + s0 * NR, tile, mr);
          const bool first = n0 == 0 && s0 == 0;
          for (int64_t j = 0; j < no; ++j) {
            T* dst = gw + (g * G.Coutg + o0 + j) * G.Kc + k0;
            for (int i = 0; i < mr; ++i)
              dst[i] = first ? tile[i * NR + j] : dst[i] + tile[i * NR + j];
          }
        }
      }
    }
  }
}

template <typename T>
void grad_weight_impl(const T* gy, const TensorView& input, const ConvGeometry& G, T* gw) {
  if (G.N == 0) {  // no images: the paths below assume at least one
    std::fill(gw, gw + G.Cout * G.Kc, T(0));
    return;
  }
  if (G.p.algorithm == ConvAlgorithm::Winograd4x4)
    return grad_weight_winograd<4, T>(gy, input, G, gw);
  if (G.p.algorithm == ConvAlgorithm::Winograd && winograd2_grad_weight_pays(G))
    return grad_weight_winograd<2, T>(gy, input, G, gw);
  // The direct kernel unless the GEMM path was asked for by name (or the
  // layer is 1x1, whose GEMM needs no lowering): against the GEMM paths
  // below, 2 threads, batch 16, it took AlexNet conv1 12.2 -> 9.3 ms,
  // conv2-5 1.15-1.3x less, ResNet conv1 9.6 -> 7.0, the 3x3 stride-2 layer
  // 13.3 -> 9.3, the dilated 3x3 12.4 -> 9.5 (min of 5).
  if (!is_pointwise(G) && !gemm_named(G) && direct_fits(G))
    return grad_weight_direct(gy, input, G, gw);
  if (grad_weight_by_taps_applies(G)) return grad_weight_by_taps(gy, input, G, gw);
  if (grad_weight_by_chunks_applies<T>(G)) return grad_weight_by_chunks(gy, input, G, gw);
  // grad_weight[g] (Coutg x Kc) = sum over images n and chunks of positions
  // of gy[n, g] (Coutg x positions) * im2col(x[n, g])^T (positions x Kc).
  // Each chunk of gy is packed once (shared), then tasks over blocks of
  // (output channels, kernel rows) accumulate into disjoint parts of
  // grad_weight, every sum in a fixed order whatever the thread count.
  constexpr int NR = gemm::Tile<T>::NR, MR = gemm::Tile<T>::MR;
  const int64_t chunk = kGradWeightChunk;
  const int64_t want = 2 * static_cast<int64_t>(get_num_threads());
  const int64_t panels = (G.Kc + NR - 1) / NR;
  const int64_t nblocks = std::min<int64_t>(panels, std::max<int64_t>(1, (want + G.G - 1) / G.G));
  const int64_t cols = ((panels + nblocks - 1) / nblocks) * NR;
  const int64_t ncolblocks = (G.Kc + cols - 1) / cols;
  int64_t mblocks = 1;
  if (G.G * ncolblocks < want)
    mblocks = std::min((want + G.G * ncolblocks - 1) / (G.G * ncolblocks), (G.Coutg + MR - 1) / MR);
  const int64_t mrows = gemm::round_up((G.Coutg + mblocks - 1) / mblocks, MR);
  mblocks = (G.Coutg + mrows - 1) / mrows;
  const int64_t tasks = G.G * ncolblocks * mblocks;
  const T* x = input.ptr<const T>();
  const bool pointwise = is_pointwise(G);
  const int64_t a_size = gemm::packed_a_size<T>(G.Coutg, std::min(chunk, G.P));
  detail::Workspace<T> a_ws(1, a_size * G.G);
  T* a_packed = a_ws.get();
  const int threads = detail::threads_for(tasks, G.N * G.Cout * G.P * G.Kc);
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
#pragma omp for schedule(dynamic, 1)
        for (int64_t t = 0; t < tasks; ++t) {
          const int64_t mb = t % mblocks, rest = t / mblocks;
          const int64_t g = rest / ncolblocks, r0 = (rest % ncolblocks) * cols;
          const int64_t ncols = std::min(cols, G.Kc - r0);
          const int64_t m0 = mb * mrows, nm = std::min(mrows, G.Coutg - m0);
          T* c = gw + (g * G.Coutg + m0) * G.Kc + r0;
          const T* xg = x + n * G.xs_n + g * G.Cg * G.xs_c;
          const bool acc = n > 0 || q0 > 0;
          if (pointwise)  // B(q, c) = x[c, q]
            gemm::gemm_packed(nm, ncols, nq, a_packed + g * a_size, G.Coutg, m0,
                              gemm::StridedPackB<T>{xg + q0 + r0 * G.xs_c, 1, G.xs_c}, c, G.Kc,
                              acc, bbuf);
          else
            gemm::gemm_packed(nm, ncols, nq, a_packed + g * a_size, G.Coutg, m0,
                              Im2colTransposedPackB<T>{xg, &G, r0, q0}, c, G.Kc, acc, bbuf);
        }
      }
    }
  }
}

// grad_bias[o] = sum over n, h, w of grad_output; float32 sums in double.
template <typename T>
void grad_bias_impl(const T* gy, const ConvGeometry& G, T* gb) {
#pragma omp parallel for num_threads(detail::threads_for(G.Cout, G.N * G.Cout * G.P)) schedule(static)
  for (int64_t o = 0; o < G.Cout; ++o) {
    double s = 0;
    for (int64_t n = 0; n < G.N; ++n) s += detail::sum_to_double(gy + (n * G.Cout + o) * G.P, G.P);
    gb[o] = static_cast<T>(s);
  }
}

}  // namespace

void conv2d_forward(const TensorView& input, const TensorView& weight, const TensorView* bias,
                    const Conv2dParams& p, const TensorView& output) {
  const detail::CallScope scope;  // shares the threads among concurrent calls
  const ConvGeometry G = make_geometry(input, weight, p);
  if (bias) {
    check_same_dtype(*bias, "bias", input, "input");
    check_shape(*bias, "bias", 1, &G.Cout);
  }
  const int64_t out_shape[4] = {G.N, G.Cout, G.Ho, G.Wo};
  detail::check_output(output, "output", input, 4, out_shape);
  detail::dispatch_float(input.dtype, [&](auto zero) {
    using T = decltype(zero);
    const detail::Contiguous<T> w(weight);
    std::vector<T> b;
    if (bias) {
      b.resize(static_cast<size_t>(G.Cout));
      detail::copy_to_contiguous<T>(*bias, b.data());
    }
    if (output.numel() == 0) return;
    const T* bias_data = bias ? b.data() : nullptr;
    switch (G.p.algorithm) {
      case ConvAlgorithm::Depthwise:
        return forward_depthwise<T>(input, w.data(), bias_data, G, output.ptr<T>());
      case ConvAlgorithm::Winograd:
        return forward_winograd<2, T>(input, w.data(), bias_data, G, output.ptr<T>());
      case ConvAlgorithm::Winograd4x4:
        return forward_winograd<4, T>(input, w.data(), bias_data, G, output.ptr<T>());
      case ConvAlgorithm::Direct:
        return forward_direct<T>(input, w.data(), bias_data, G, output.ptr<T>());
      case ConvAlgorithm::Pointwise:
        if (!rows_contiguous(G)) {  // the pointwise GEMM reads whole rows
          const detail::Contiguous<T> xc(input);
          return forward_impl<T>(xc.view(), w, bias_data, with_input(G, xc.view()),
                                 output.ptr<T>());
        }
        return forward_impl<T>(input, w, bias_data, G, output.ptr<T>());
      default:
        return forward_impl<T>(input, w, bias_data, G, output.ptr<T>());
    }
  });
}

void conv2d_backward(const TensorView& grad_output, const TensorView& input,
                     const TensorView& weight, const Conv2dParams& p,
                     const TensorView* grad_input, const TensorView* grad_weight,
                     const TensorView* grad_bias) {
  const detail::CallScope scope;  // shares the threads among concurrent calls
  const ConvGeometry G = make_geometry(input, weight, p);
  check_same_dtype(grad_output, "grad_output", input, "input");
  const int64_t out_shape[4] = {G.N, G.Cout, G.Ho, G.Wo};
  check_shape(grad_output, "grad_output", 4, out_shape);
  if (grad_input) detail::check_output(*grad_input, "grad_input", input, 4, input.shape);
  if (grad_weight) detail::check_output(*grad_weight, "grad_weight", input, 4, weight.shape);
  if (grad_bias) detail::check_output(*grad_bias, "grad_bias", input, 1, &G.Cout);
  detail::dispatch_float(input.dtype, [&](auto zero) {
    using T = decltype(zero);
    const detail::Contiguous<T> gy(grad_output);
    // The pointwise paths read whole rows of the input: copy it if they are not.
    const bool copy_input = G.p.algorithm == ConvAlgorithm::Pointwise && !rows_contiguous(G);
    std::optional<detail::Contiguous<T>> xc;
    if (copy_input) xc.emplace(input);
    const TensorView& x = copy_input ? xc->view() : input;
    const ConvGeometry Gx = copy_input ? with_input(G, x) : G;
    // The gradients asked for and not empty (null: skipped).
    auto wanted = [](const TensorView* t) { return t && t->numel() > 0 ? t->ptr<T>() : nullptr; };
    T* gx = wanted(grad_input);
    T* gw = wanted(grad_weight);
    T* gb = wanted(grad_bias);
    if (G.p.algorithm == ConvAlgorithm::Depthwise) {
      const detail::Contiguous<T> w(weight);
      return backward_depthwise<T>(gy.data(), x, w.data(), Gx, gx, gw, gb);
    }
    if (gx) {
      const detail::Contiguous<T> w(weight);
      const bool pads_fit = std::max({G.p.pad_top, G.p.pad_bottom, G.p.pad_left,
                                       G.p.pad_right}) <= 2;
      if (G.p.algorithm == ConvAlgorithm::Winograd && pads_fit)
        grad_input_winograd<2, T>(gy.data(), w.data(), Gx, gx);
      else if (G.p.algorithm == ConvAlgorithm::Winograd4x4 && pads_fit)
        grad_input_winograd<4, T>(gy.data(), w.data(), Gx, gx);
      else
        grad_input_impl<T>(gy.data(), w, Gx, gx);
    }
    if (gw) grad_weight_impl<T>(gy.data(), x, Gx, gw);
    if (gb) grad_bias_impl<T>(gy.data(), G, gb);
  });
}

}  // namespace convcore
