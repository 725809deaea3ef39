// The plan of a convolution: which algorithm each pass runs and how, from
// the rules below (measured where they say), or timed by the autotune
// (conv.cpp); cached per shape, so a shape seen before skips the choice.
#include "conv_plan.h"

#include <algorithm>
#include <array>
#include <map>
#include <mutex>

#include "blocked.h"
#include "conv_kernels.h"
#include "conv_winograd.h"
#include "convcore/errors.h"
#include "dot_products.h"
#include "gemm.h"

namespace convcore {
namespace conv2d_impl {

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
  return g;
}

// The same geometry over another (contiguous) copy of the input.
ConvGeometry with_input(ConvGeometry g, const TensorView& input) {
  g.xs_n = input.strides[0], g.xs_c = input.strides[1];
  g.xs_h = input.strides[2], g.xs_w = input.strides[3];
  return g;
}

bool rows_contiguous(const ConvGeometry& G) { return G.xs_w == 1 && G.xs_h == G.W; }
bool is_pointwise(const ConvGeometry& G) {
  return G.p.algorithm == ConvAlgorithm::Pointwise && rows_contiguous(G);
}

// Winograd tasks take bands of whole tile rows, at most about band_tiles
// tiles each, the rows shared evenly among the bands (14 rows in 2 bands of
// 7, not 9 + 5, which would leave one of two threads idle a third of the time).
int64_t winograd_band(int64_t tiles_h, int64_t tiles_w, int64_t band_tiles) {
  const int64_t most = std::max<int64_t>(1, std::min<int64_t>(tiles_h, band_tiles / tiles_w));
  const int64_t bands = (tiles_h + most - 1) / most;
  return (tiles_h + bands - 1) / bands;
}

ConvGeometry grad_input_as_forward_geometry(const ConvGeometry& G) {
  const int64_t khw = G.KH * G.KW;
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
  F.auto_algorithm = G.auto_algorithm;
  return F;
}

namespace {

// 1x1, stride 1, no padding, with the rows of the image contiguous: im2col
// is the image itself (channels x positions), so plain strided packing and,
// for grad_input, a GEMM straight into the output replace the lowering.
bool pointwise_shape(const ConvGeometry& G) {
  return G.KH == 1 && G.KW == 1 && G.p.stride_h == 1 && G.p.stride_w == 1 && G.p.pad_top == 0 &&
         G.p.pad_bottom == 0 && G.p.pad_left == 0 && G.p.pad_right == 0;
}
// A 1x1 kernel with a stride (ResNet's projections): its GEMM lowering is a
// strided copy of the input, and the GEMM paths beat the direct kernel on
// every pass, whose tiles do little work for so few taps (Zen 5, 2 threads,
// batch 16, 64 -> 128 channels at 56x56 stride 2: forward 1.19 -> 1.02 ms,
// grad_input 4.0 -> 1.5, grad_weight 2.2 -> 1.2; batch 1, 128 -> 256 at
// 28x28: forward 0.13 -> 0.06 ms). Where the pointwise paths pay more,
// conv.cpp runs the layer as the pointwise layer of its subsampled image
// (strided_one_by_one); this rule plans the passes it leaves.
bool one_by_one(const ConvGeometry& G) { return G.KH == 1 && G.KW == 1; }
bool winograd_shape(const ConvGeometry& G) {
  return G.KH == 3 && G.KW == 3 && G.p.stride_h == 1 && G.p.stride_w == 1 &&
         G.p.dilation_h == 1 && G.p.dilation_w == 1 && G.G == 1;
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
// Not on 7x7 outputs (ResNet's last stage): 16 tiles of 4x4 cover 64
// positions for 49, and the 16 transformed filter matrices, made on every
// call, outweigh the products saved at every batch (docs/benchmarks.md).
bool winograd_pays(const ConvGeometry& G) {
  return winograd_channels(G) && G.Ho >= 8 && G.Wo >= 8 &&
         winograd_tasks<2>(G) >= static_cast<int64_t>(get_num_threads());
}
// grad_weight through the same transforms (grad_weight_winograd) against
// the GEMM path, 2 threads, batch 16: F(4x4) is faster on every layer it is
// chosen for (VGG conv1_2-conv4_2 1.7-2.0x, ResNet's 64-channel 3x3 at 56
// 1.25-1.6x), so it takes it there (winograd4_grad_weight_pays). F(2x2)
// pays only with 512+ channels in and out (VGG conv5_2 at 14x14 1.3-1.6x),
// where the GEMM path re-reads its large grad_weight for every image; with
// fewer, its transposed packing of V weighs more than the multiplications
// saved: AlexNet's 256-384 channels at 13x13 are level (0.9-1.06x), 128
// channels at 14x14 1.6x slower; on 7x7 (F(2x2) in a batch of 16+) the
// direct kernel is 15% faster at 512 channels. F(2x2) asked for by name is
// used for grad_weight too. In float32, a batch of fewer than 512
// positions (which runs in F(2x2) since fused_winograd) keeps the direct
// kernel's: 512 channels at 14x14, 5.5 ms against 7.4.
bool winograd2_grad_weight_pays(const ConvGeometry& G, DType dtype) {
  return !G.auto_algorithm ||
         (G.C >= 512 && G.Cout >= 512 && G.Ho >= 8 && G.Wo >= 8 &&
          (dtype != DType::Float32 || G.N * G.P >= 512));
}
// F(4x4)'s grad_weight under auto: its transforms grow with C + Cout, the
// products it saves with C * Cout. With AVX-512 on 512-bit units, against
// the direct kernel's (near the FMA peak there), it pays where C Cout / (C +
// Cout) is at least 32 on planes of 56x56 and more, 80 on smaller ones
// (docs/training.md, twenty-fourth session); with AVX-512 on 256-bit units
// (Zen 4) from 32 on every plane (twenty-fifth session); with AVX2 with 32+
// channels in and 64+ out. In float32 below 56x56 in a batch of fewer than
// 4 (F(4x4) there since fused_winograd) the direct kernel's is faster: 128
// channels at 28x28, batch 1, 1.45 ms against 2.2; F(2x2)'s takes 512
// channels there.
bool winograd4_grad_weight_pays(const ConvGeometry& G, DType dtype) {
  if (!G.auto_algorithm) return true;
  const bool large_plane = std::min(G.Ho, G.Wo) >= 56;
  const int64_t least = gemm::avx512_full_width() && !large_plane ? 80 : 32;
  const bool enough_channels = gemm::isa_level() >= 2
                                   ? G.C * G.Cout >= least * (G.C + G.Cout)
                                   : G.C >= 32 && G.Cout >= 64;
  return enough_channels && (dtype != DType::Float32 || large_plane || G.N >= 4);
}
bool winograd4_pays(const ConvGeometry& G) {
  return winograd_channels(G) && G.Ho >= 28 && G.Wo >= 28 &&
         winograd_tasks<4>(G) >= static_cast<int64_t>(get_num_threads());
}

// The direct paths copy each image, zero padded, into the frame its output
// windows read ((Ho - 1) * stride + (K - 1) * dilation + 1 rows and columns).
// auto takes them where one image's frame is at most 64 MB; beyond, (a huge
// image, or strides that skip most of it) the GEMM paths read the input in
// place.
// With few output positions in all (a 7x7 image at batch 2) the GEMM
// paths, which read the weights in place, beat the direct paths, which pack
// them into panels on every call (docs/benchmarks.md). At batch 1 the
// direct forward (and grad_input as a forward) packs each panel in the task
// that reads it, from L2: with 4 MB of weights or more (512 channels, 3x3)
// it is the faster from a 7x7 image up (docs/training.md, twelfth session);
// smaller layers keep the GEMM path, whose fixed costs are lower.
constexpr int64_t kDirectMinPositions = 128, kDirectOneImageMinPositions = 49;
constexpr int64_t kDirectOneImageMinWeights = int64_t(1) << 20;
// With the output positions in the lanes (direct_lanes_pay), the direct
// forward (and grad_input as a forward) beat the GEMM path from 64
// positions in all: 1.2-1.6x on 81 to 100; on 32 and 36 positions with
// 3072 and 4608 taps it lost (docs/training.md, thirtieth session).
constexpr int64_t kLanesMinPositions = 64;
bool direct_pays(const ConvGeometry& G) { return G.N * G.Ho * G.Wo >= kDirectMinPositions; }
bool direct_forward_pays(const ConvGeometry& G) {
  return direct_pays(G) || (G.N == 1 && G.Ho * G.Wo >= kDirectOneImageMinPositions &&
                            G.Cout * G.Kc >= kDirectOneImageMinWeights) ||
         (direct_lanes_pay(G) && G.N * G.Ho * G.Wo >= kLanesMinPositions);
}
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

// grad_input of a stride-1 convolution runs as a forward convolution
// (grad_input_as_forward). Needs p <= dilation * (k - 1) on every side.
bool grad_input_as_forward_applies(const ConvGeometry& G) {
  const int64_t span_h = G.p.dilation_h * (G.KH - 1), span_w = G.p.dilation_w * (G.KW - 1);
  return G.p.stride_h == 1 && G.p.stride_w == 1 && G.p.pad_top <= span_h &&
         G.p.pad_bottom <= span_h && G.p.pad_left <= span_w && G.p.pad_right <= span_w;
}


// grad_weight by taps (conv_gemm.cpp) pays where packing the im2col side
// dominates: few output channels per group.
bool grad_weight_by_taps_applies(const ConvGeometry& G) {
  return G.p.stride_h == 1 && G.p.stride_w == 1 && G.KH * G.KW > 1 && G.Coutg <= 96;
}

// grad_weight by chunks (conv_gemm.cpp) when grad_weight is small.
constexpr int64_t kSmallGradWeightBytes = 256 << 10;

// A pointwise layer's grad_weight as sums of dot products along the
// positions (dots::sum_of_products) rather than the GEMM: on planes of 28x28
// and more with at most 256 x 256 channels, where the GEMM packs gy and
// transposes the image for a small output (docs/training.md, seventeenth
// session). On smaller planes each dot product is too short for its
// reduction.
constexpr int64_t kDotsMinPositions = 28 * 28;
constexpr int64_t kDotsMostWeights = 256 * 256;

bool grad_weight_dots_pays(const ConvGeometry& G) {
  return is_pointwise(G) && G.G == 1 && !gemm_named(G) && dots::available() &&
         G.P >= kDotsMinPositions && G.Cout * G.Kc <= kDotsMostWeights;
}

// grad_weight as dot products of grad_output's rows with blocks of im2col
// rows (conv_gemm.cpp) for a layer with few taps over long planes: first
// layers, whose direct path spent as long transposing grad_output as on its
// products (docs/training.md, twenty-seventh session). With AVX2's dot
// tiles, from two images: one 224 x 224 image ran slower than the direct
// path there.
constexpr int64_t kColumnDotsMostTaps = 32, kColumnDotsMostChannels = 64;

bool grad_weight_column_dots_pays(const ConvGeometry& G) {
  const bool kernel = dots::available() || (dots::vector_kernel() && G.N >= 2);
  return G.auto_algorithm && G.G == 1 && !one_by_one(G) && kernel &&
         G.Kc <= kColumnDotsMostTaps && G.Cout <= kColumnDotsMostChannels &&
         G.P >= kDotsMinPositions;
}

template <typename T>
bool grad_weight_by_chunks_applies(const ConvGeometry& G) {
  return G.Cout * G.Kc * int64_t(sizeof(T)) <= kSmallGradWeightBytes && !is_pointwise(G);
}

// float32 over a contiguous NCHW image runs Winograd in the blocked layout
// (conv_winograd.cpp's winograd_conv_blocked; grad_input's source, the
// output gradient, always is): its transforms are cheaper and it splits a
// small batch into bands itself, so it pays on more layers than the NCHW
// transforms. Measured (docs/training.md, Zen 5, 2 threads, against the
// direct and GEMM paths, batch 1 and 16): F(4x4) on 28x28 and larger
// outputs with 32+ channels, at batch 1 only from 56x56 (F(2x2) is 15-35%
// faster at 28x28 there); F(2x2) down to 8x8, and on 7x7 in a batch of 16+
// (20% faster than direct at 512 channels); not at batch 1 with fewer
// than 512 output positions and more than 256 x 256 channels, where
// transforming the filters on every call (16/9 of the weights) outweighs
// the products saved (512 channels at 14x14: GEMM 3.4, F(2x2) 4.3 ms).
// With 16 to 31 channels in or out (GoogLeNet's reductions, small nets'
// layers) it still pays, forward and grad_input, where the batch holds 512
// output positions or more; not on an 8x8 image at batch 1 (docs/training.md,
// tenth session). A batch whose tiles fit one band, with 4+ panels of
// output channels, takes the fused transforms' rules instead
// (fused_winograd, below).
bool blocked_winograd(const ConvGeometry& G, DType dtype) {
  if (dtype != DType::Float32 || !rows_contiguous(G) || G.xs_c != G.H * G.W ||
      !winograd_shape(G))
    return false;
  if (G.C >= 32 && G.Cout >= 32) return true;
  return G.C >= 16 && G.Cout >= 16 && G.N * G.P >= 512;
}
// A batch whose tiles fit one band, the filters transformed by the tasks as
// they go (blocked.h's winograd_fused_applies): no U goes out to memory, so
// F(2x2) pays down to 7x7 with any number of channels, and F(4x4) from 28x28
// (2 threads, Zen 4: 512 x 512 at 7x7, batch 1, 1.2 ms against 1.45 direct,
// batch 4 3.4 against 5.0; 128 x 128 at 28x28, batch 1, 0.46 ms in F(4x4)
// against 0.64 in F(2x2); docs/training.md).
bool fused_winograd(const ConvGeometry& G, int m) {
  return blocked::winograd_fused_applies(
      blocked::winograd_layout(G.Cout, G.C, m),
      blocked::Image{nullptr, G.N, G.Cout, G.Ho, G.Wo, 0, true});
}
// Planes of 2x2 to 6x6 take F(2x2) too: the direct and GEMM kernels fill
// their vectors with a plane's few positions image by image, and compute
// every tap that falls in the padding (docs/training.md, twenty-sixth
// session: 256 channels at 4x4, batch 4, forward 2.4x and grad_input 2.8x
// faster than auto's direct kernel), where the filters are transformed as
// the tasks go (fused_winograd; the separate transforms cost more than the
// products on 64 channels at 6x6, batch 1 to 4). The forward needs 32+
// output positions in the batch too: with fewer, the transformed filters
// (16/9 of the weights) stream from memory for a tile or two each (512
// channels at 4x4, batch 1: 1.5x slower than the GEMM path). grad_input
// paid on every batch measured (there 1.3x faster than the direct kernel).
constexpr int64_t kSmallPlaneWinogradMinPositions = 32;

ConvAlgorithm blocked_winograd_choice(const ConvGeometry& G, ConvPass pass) {
  const int64_t side = std::min(G.Ho, G.Wo);
  if (side >= 56 || (side >= 28 && (G.N >= 4 || fused_winograd(G, 4))))
    return ConvAlgorithm::Winograd4x4;
  if (side >= 7 && fused_winograd(G, 2)) return ConvAlgorithm::Winograd;
  const bool filters_weigh = G.N * G.P < 512 && G.C * G.Cout > 256 * 256;
  if ((side >= 8 || (side >= 7 && G.N >= 16)) && !filters_weigh) return ConvAlgorithm::Winograd;
  if (side >= 2 && side < 7 && fused_winograd(G, 2) &&
      (pass == ConvPass::Backward || G.N * G.P >= kSmallPlaneWinogradMinPositions))
    return ConvAlgorithm::Winograd;
  return ConvAlgorithm::Auto;  // not Winograd
}

// Grouped layers with few channels per group run plane by plane: the direct
// and GEMM kernels put output channels in vector lanes, which 4 to 16 of
// them fill a quarter to half of (AVX-512; AVX2's 8 lanes take two
// registers of outputs). ResNeXt-50's 3x3 layers, 2 threads, against the
// direct path (docs/training.md): forward 1.9-6x faster with 4 to 32
// channels per group (four output planes summed at once; with 32 and
// stride 2 at batch 16 0.7-0.95x), grad_input 1.6-6x with 4 to 16 and
// 0.8-2.7x with 32. Its grad_weight takes a pair of planes at a time:
// 1.7-5.6x faster with 4 and 8 channels, 1.5-7x slower with 16 and 32,
// which auto leaves to the direct path's grad_weight. The forward with 32
// channels a group goes to the direct path where strided, and with AVX2,
// whose planes have 8 lanes (docs/training.md, twenty-first session; with
// 16 a group, or stride 1 with AVX-512, the planes stay ahead or level).
constexpr int64_t kGroupedMostChannels = 32;
constexpr int64_t kGroupedGradWeightMostChannels = 8;
bool grouped_pays(const ConvGeometry& G) {
  return G.G > 1 && G.Cg > 1 && G.Cg <= kGroupedMostChannels &&
         G.Coutg <= kGroupedMostChannels && grouped_planes_fit(G);
}
bool grouped_forward_by_direct(const ConvGeometry& G, ConvPass pass) {
  const bool strided = G.p.stride_h > 1 || G.p.stride_w > 1;
  return pass == ConvPass::Forward && (strided || gemm::isa_level() == 1) &&
         G.Cg >= kGroupedMostChannels && direct_fits(G);
}

// Resolves Auto, and checks that an algorithm asked for by name applies.
ConvAlgorithm choose_algorithm(const ConvGeometry& G, DType dtype, ConvPass pass) {
  const bool depthwise = G.Cg == 1 && G.G > 1;
  switch (G.p.algorithm) {
    case ConvAlgorithm::Auto:
      if (depthwise) return ConvAlgorithm::Depthwise;
      if (grouped_pays(G))
        return grouped_forward_by_direct(G, pass) ? ConvAlgorithm::Direct : ConvAlgorithm::Grouped;
      if (blocked_winograd(G, dtype)) {
        const ConvAlgorithm w = blocked_winograd_choice(G, pass);
        if (w != ConvAlgorithm::Auto) return w;
      } else {
        if (winograd4_pays(G)) return ConvAlgorithm::Winograd4x4;
        if (winograd_pays(G)) return ConvAlgorithm::Winograd;
      }
      if (pointwise_shape(G) && rows_contiguous(G)) return ConvAlgorithm::Pointwise;
      if (one_by_one(G)) return ConvAlgorithm::Gemm;
      return direct_fits(G) && direct_forward_pays(G) ? ConvAlgorithm::Direct : ConvAlgorithm::Gemm;
    case ConvAlgorithm::Depthwise:
      if (!depthwise)
        throw ValueError("algorithm='depthwise' needs one input channel per group "
                         "(groups == in_channels), got " + std::to_string(G.Cg) +
                         " input channels per group");
      return ConvAlgorithm::Depthwise;
    case ConvAlgorithm::Grouped:
      if (G.G == 1 || !grouped_planes_fit(G))
        throw ValueError("algorithm='grouped' needs groups > 1 and padded planes of at most "
                         "65536 elements, " + std::to_string(kGroupedMostElements) +
                         " for a group's input planes together; got groups=" +
                         std::to_string(G.G) + ", " + std::to_string(G.Cg) +
                         " input channels per group of " + std::to_string(G.H) + "x" +
                         std::to_string(G.W));
      return ConvAlgorithm::Grouped;
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


// The input as backward's kernels read it: the pointwise paths take a
// contiguous copy of an input whose rows are not (conv2d_backward).
ConvGeometry as_backward_reads(ConvGeometry G) {
  if (G.p.algorithm == ConvAlgorithm::Pointwise && !rows_contiguous(G))
    G.xs_n = G.C * G.H * G.W, G.xs_c = G.H * G.W, G.xs_h = G.W, G.xs_w = 1;
  return G;
}

// grad_input of one image on a small plane, into fewer channels than the
// layer's outputs, by the GEMM and col2im (GradInputPath::Gemm): its rows
// are C x taps, where the forward-shaped paths (direct, as-forward GEMM,
// Winograd) tile the few positions by one or two panels of C and left a
// thread idle (docs/training.md, twenty-seventh session).
constexpr int64_t kSmallGradInputMostPositions = 14 * 14, kSmallGradInputMostChannels = 64;

bool small_grad_input_by_gemm(const ConvGeometry& G) {
  return G.auto_algorithm && G.G == 1 && G.N == 1 && !one_by_one(G) &&
         G.P <= kSmallGradInputMostPositions && G.C <= kSmallGradInputMostChannels &&
         G.C <= G.Cout;
}

// A 3x3 stride-1 layer's grad_input is the forward convolution of
// grad_output with the flipped filters, Cout -> C channels. Under auto it
// takes F(2x2) where that forward would, though the layer's own choice
// (Cout out) was not Winograd: DenseNet's 128 -> 32 at 7x7, batch 1 and
// 2, whose grad_input is a 32 -> 128 forward (docs/training.md,
// twenty-ninth session).
bool grad_input_winograd_as_its_forward(const ConvGeometry& G, DType dtype) {
  if (!G.auto_algorithm || !winograd_shape(G) || !grad_input_as_forward_applies(G)) return false;
  const ConvGeometry F = grad_input_as_forward_geometry(G);
  return blocked_winograd(F, dtype) &&
         blocked_winograd_choice(F, ConvPass::Forward) == ConvAlgorithm::Winograd;
}

// G.p.algorithm: resolved (never Auto).
GradInputPath choose_grad_input_path(const ConvGeometry& G, DType dtype) {
  if (small_grad_input_by_gemm(G)) return GradInputPath::Gemm;
  const bool pads_fit =
      std::max({G.p.pad_top, G.p.pad_bottom, G.p.pad_left, G.p.pad_right}) <= 2;
  switch (G.p.algorithm) {
    case ConvAlgorithm::Depthwise:
      return GradInputPath::Planes;
    case ConvAlgorithm::Grouped:
      // With AVX2 (8 lanes a plane) and 32 channels a group the direct
      // kernels below, where they pay (docs/training.md, twenty-first
      // session; at batch 1 the planes stay ahead).
      if (!(G.auto_algorithm && gemm::isa_level() == 1 && G.Cg >= kGroupedMostChannels &&
            direct_pays(G)))
        return GradInputPath::Planes;
      break;
    case ConvAlgorithm::Winograd:
      if (pads_fit) return GradInputPath::Winograd2;
      break;
    case ConvAlgorithm::Winograd4x4:
      if (pads_fit) return GradInputPath::Winograd4;
      break;
    default:
      break;
  }
  if (is_pointwise(G)) return GradInputPath::Pointwise;
  if (pads_fit && grad_input_winograd_as_its_forward(G, dtype)) return GradInputPath::Winograd2;
  // On the direct kernel unless the GEMM path was asked for by name.
  if (grad_input_as_forward_applies(G))
    return !gemm_named(G) && direct_forward_pays(G) &&
                   direct_fits(grad_input_as_forward_geometry(G))
               ? GradInputPath::AsForwardDirect
               : GradInputPath::AsForwardGemm;
  // The direct kernel (for strided layers, or stride 1 with padding past the
  // kernel's reach) when each tile fills at least half a panel of input
  // channels: 128 channels, 3x3 stride 2, batch 16: 17.5 -> 10.0 ms (2
  // threads, min of 5); with the 3 channels of a first layer (3 of 32 columns
  // used) it was 2.7-4x slower than the GEMM path.
  const int64_t nr = dtype == DType::Float32 ? gemm::Tile<float>::NR : gemm::Tile<double>::NR;
  if (!gemm_named(G) && !one_by_one(G) && direct_pays(G) && G.Cg >= nr / 2 &&
      direct_grad_input_fits(G))
    return GradInputPath::DirectStrided;
  return GradInputPath::Gemm;
}

GradWeightPath choose_grad_weight_path(const ConvGeometry& G, DType dtype) {
  // Groups of whole vectors of input channels (8 to 64 a group) with the
  // channels in the lanes, unless an algorithm was named: faster than the
  // plane and direct paths on ResNeXt's 8, 16 and 32 per group, at batch 1
  // and 16, with both instruction sets (docs/training.md). 1x1 layers keep
  // the GEMM paths (one tap would fill a third of the kernel's taps).
  if (G.auto_algorithm && !one_by_one(G) && grad_weight_grouped_lanes_applies(G, dtype))
    return GradWeightPath::GroupedLanes;
  // Grouped by name keeps every pass plane by plane.
  if (G.p.algorithm == ConvAlgorithm::Depthwise ||
      (G.p.algorithm == ConvAlgorithm::Grouped &&
       (!G.auto_algorithm || G.Cg <= kGroupedGradWeightMostChannels)))
    return GradWeightPath::Planes;
  if (G.p.algorithm == ConvAlgorithm::Winograd4x4 && winograd4_grad_weight_pays(G, dtype))
    return GradWeightPath::Winograd4;
  if ((G.p.algorithm == ConvAlgorithm::Winograd ||
       (G.p.algorithm == ConvAlgorithm::Winograd4x4 && G.auto_algorithm)) &&
      winograd2_grad_weight_pays(G, dtype))
    return GradWeightPath::Winograd2;
  if (grad_weight_column_dots_pays(G)) return GradWeightPath::ColumnDots;
  // The direct kernel unless the GEMM path was asked for by name (or the
  // layer is 1x1, whose GEMM lowering is at most a strided copy): against the GEMM paths,
  // 2 threads, batch 16, it took AlexNet conv1 12.2 -> 9.3 ms, conv2-5
  // 1.15-1.3x less, ResNet conv1 9.6 -> 7.0, the 3x3 stride-2 layer
  // 13.3 -> 9.3, the dilated 3x3 12.4 -> 9.5 (min of 5).
  // Also a small grad_weight from a 7x7 plane at batch 1 (49 positions),
  // where grad_weight by chunks has one task and packs the im2col side a
  // float at a time (GoogLeNet's 32 and 48 -> 128 at 7x7, docs/training.md).
  const bool small = dtype == DType::Float32 ? grad_weight_by_chunks_applies<float>(G)
                                             : grad_weight_by_chunks_applies<double>(G);
  if (!one_by_one(G) && !gemm_named(G) && direct_fits(G) &&
      (direct_pays(G) || (small && G.N * G.Ho * G.Wo >= kDirectOneImageMinPositions)))
    return GradWeightPath::Direct;
  if (grad_weight_by_taps_applies(G)) return GradWeightPath::ByTaps;
  if (small) return GradWeightPath::ByChunks;
  if (grad_weight_dots_pays(G)) return GradWeightPath::Dots;
  return GradWeightPath::Gemm;
}

// The split of the work for the forward convolution F when it runs on
// forward_gemm or forward_direct (F.p.algorithm): only where the kernels run,
// with an output that is not empty and input channels (conv2d_forward and
// conv2d_backward handle the others without them).
void set_forward_split(const ConvGeometry& F, DType dtype, ConvPlan* plan) {
  if (F.N * F.Cout * F.P == 0 || F.Kc == 0) return;
  const bool f32 = dtype == DType::Float32;
  if (F.p.algorithm == ConvAlgorithm::Direct)
    plan->direct_split = f32 ? forward_direct_split<float>(F) : forward_direct_split<double>(F);
  else if (F.p.algorithm == ConvAlgorithm::Gemm || F.p.algorithm == ConvAlgorithm::Pointwise)
    plan->gemm_split = f32 ? forward_gemm_split<float>(F) : forward_gemm_split<double>(F);
}

// The splits of the work of backward's kernels for B (the input as backward
// reads it), where they run: grad_input with grad_input and grad_output not
// empty, grad_weight with grad_weight and grad_output not empty
// (conv2d_backward fills the others without them).
void set_backward_splits(const ConvGeometry& B, DType dtype, ConvPlan* plan) {
  const bool f32 = dtype == DType::Float32;
  const bool outputs = B.N * B.Cout * B.P > 0;
  if (outputs && B.N * B.C * B.H * B.W > 0) {
    switch (plan->grad_input) {
      case GradInputPath::AsForwardDirect:
      case GradInputPath::AsForwardGemm: {
        ConvGeometry F = grad_input_as_forward_geometry(B);
        F.p.algorithm = plan->grad_input == GradInputPath::AsForwardDirect ? ConvAlgorithm::Direct
                                                                            : ConvAlgorithm::Gemm;
        set_forward_split(F, dtype, plan);
        break;
      }
      case GradInputPath::DirectStrided:
        plan->grad_input_direct_split =
            f32 ? grad_input_direct_split<float>(B) : grad_input_direct_split<double>(B);
        break;
      case GradInputPath::Pointwise:
        plan->grad_input_pointwise_split =
            f32 ? grad_input_pointwise_split<float>(B) : grad_input_pointwise_split<double>(B);
        break;
      case GradInputPath::Gemm:
        plan->grad_input_gemm_split = grad_input_gemm_split(B);
        break;
      default:
        break;
    }
  }
  if (outputs && B.Cout * B.Kc > 0) {
    switch (plan->grad_weight) {
      case GradWeightPath::Direct:
        plan->grad_weight_direct_split =
            f32 ? grad_weight_direct_split<float>(B) : grad_weight_direct_split<double>(B);
        break;
      case GradWeightPath::ByTaps:
        plan->grad_weight_by_taps_split =
            f32 ? grad_weight_by_taps_split<float>(B) : grad_weight_by_taps_split<double>(B);
        break;
      case GradWeightPath::Gemm:
        plan->grad_weight_gemm_split =
            f32 ? grad_weight_gemm_split<float>(B) : grad_weight_gemm_split<double>(B);
        break;
      default:
        break;
    }
  }
}

// G.p.algorithm: resolved (never Auto).
ConvPlan plan_for_algorithm(const ConvGeometry& G, ConvPass pass, DType dtype) {
  ConvPlan plan;
  plan.algorithm = G.p.algorithm;
  if (pass == ConvPass::Forward) {
    set_forward_split(G, dtype, &plan);
  } else {
    const ConvGeometry B = as_backward_reads(G);
    plan.grad_input = choose_grad_input_path(B, dtype);
    plan.grad_weight = choose_grad_weight_path(B, dtype);
    set_backward_splits(B, dtype, &plan);
  }
  return plan;
}

}  // namespace

ConvPlan rule_plan(const ConvGeometry& G, ConvPass pass, DType dtype) {
  ConvGeometry R = G;
  R.p.algorithm = choose_algorithm(G, dtype, pass);
  return plan_for_algorithm(R, pass, dtype);
}

ConvPlan plan_as_if_auto_chose(const ConvGeometry& G, ConvPass pass, DType dtype,
                               ConvAlgorithm algorithm) {
  ConvGeometry R = G;
  R.p.algorithm = algorithm;
  R.auto_algorithm = true;
  return plan_for_algorithm(R, pass, dtype);
}

std::vector<ConvAlgorithm> auto_candidates(const ConvGeometry& G) {
  std::vector<ConvAlgorithm> out;
  if (G.Cg == 1 && G.G > 1) out.push_back(ConvAlgorithm::Depthwise);
  if (G.Cg > 1 && G.G > 1 && grouped_planes_fit(G)) out.push_back(ConvAlgorithm::Grouped);
  if (winograd_shape(G)) {
    out.push_back(ConvAlgorithm::Winograd);
    out.push_back(ConvAlgorithm::Winograd4x4);
  }
  if (pointwise_shape(G) && rows_contiguous(G)) out.push_back(ConvAlgorithm::Pointwise);
  if (direct_fits(G)) out.push_back(ConvAlgorithm::Direct);
  out.push_back(ConvAlgorithm::Gemm);
  return out;
}

namespace {

// Everything a plan depends on: the shapes, the parameters (with the
// algorithm asked for), whether the input rows are contiguous (the
// pointwise paths), the pass, the dtype (tile widths), the instruction set
// and thread count (Winograd's task count) and whether autotune was on.
using PlanKey = std::array<int64_t, 23>;

PlanKey plan_key(const ConvGeometry& G, ConvPass pass, DType dtype) {
  const Conv2dParams& p = G.p;
  return {G.N, G.C, G.H, G.W, G.Cout, G.KH, G.KW,
          p.stride_h, p.stride_w, p.pad_top, p.pad_bottom, p.pad_left, p.pad_right,
          p.dilation_h, p.dilation_w, p.groups,
          static_cast<int64_t>(p.algorithm), rows_contiguous(G) ? 1 : 0,
          static_cast<int64_t>(pass), static_cast<int64_t>(dtype),
          gemm::isa_level(), get_num_threads(), get_conv_autotune() ? 1 : 0};
}

// Plans of the shapes seen, emptied when it reaches kMostPlans (a program
// that keeps making new shapes then re-plans them, and the map stays small).
constexpr size_t kMostPlans = 4096;

struct PlanCache {
  std::mutex mutex;
  std::map<PlanKey, ConvPlan> plans;
};

PlanCache& plan_cache() {
  static PlanCache cache;
  return cache;
}

}  // namespace

bool find_cached_plan(const ConvGeometry& G, ConvPass pass, DType dtype, ConvPlan* plan) {
  const PlanKey key = plan_key(G, pass, dtype);
  PlanCache& cache = plan_cache();
  const std::lock_guard<std::mutex> lock(cache.mutex);
  const auto it = cache.plans.find(key);
  if (it == cache.plans.end()) return false;
  *plan = it->second;
  return true;
}

void cache_plan(const ConvGeometry& G, ConvPass pass, DType dtype, const ConvPlan& plan) {
  const PlanKey key = plan_key(G, pass, dtype);
  PlanCache& cache = plan_cache();
  const std::lock_guard<std::mutex> lock(cache.mutex);
  if (cache.plans.size() >= kMostPlans) cache.plans.clear();
  cache.plans[key] = plan;
}

}  // namespace conv2d_impl

int64_t conv_plan_cache_size() {
  conv2d_impl::PlanCache& cache = conv2d_impl::plan_cache();
  const std::lock_guard<std::mutex> lock(cache.mutex);
  return static_cast<int64_t>(cache.plans.size());
}

void clear_conv_plan_cache() {
  conv2d_impl::PlanCache& cache = conv2d_impl::plan_cache();
  const std::lock_guard<std::mutex> lock(cache.mutex);
  cache.plans.clear();
}

}  // namespace convcore
