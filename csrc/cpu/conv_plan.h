// Private to the convolution sources (conv*.cpp): the geometry of one
// convolution, the predicates that pick its algorithm and per-pass paths,
// and the plan that records those choices, cached per shape.
#pragma once

#include <cstdint>
#include <vector>

#include "convcore/ops.h"
#include "convcore/threading.h"

namespace convcore {
namespace conv2d_impl {

// Everything the kernels need about one convolution.
struct ConvGeometry {
  int64_t N, C, H, W;          // input
  int64_t Cout, KH, KW;        // weight
  int64_t Ho, Wo, P;           // output spatial size, P = Ho * Wo
  int64_t G, Cg, Coutg, Kc;    // groups; per-group channels; Kc = Cg * KH * KW
  int64_t xs_n, xs_c, xs_h, xs_w;  // input strides (elements)
  Conv2dParams p;                  // p.algorithm: the one chosen (never Auto) once planned
  bool auto_algorithm;             // whether it was chosen by auto
};

// Validates the arguments and fills the geometry; p.algorithm stays as
// asked for (the plan resolves it).
ConvGeometry make_geometry(const TensorView& input, const TensorView& weight,
                           const Conv2dParams& p);
// The same geometry over another (contiguous) copy of the input.
ConvGeometry with_input(ConvGeometry g, const TensorView& input);

bool rows_contiguous(const ConvGeometry& G);
// The pointwise algorithm over rows that are contiguous (the pointwise
// packing reads whole rows).
bool is_pointwise(const ConvGeometry& G);
// Rows of Winograd tiles per band, shared by the plan's task count and the
// Winograd kernels.
int64_t winograd_band(int64_t tiles_h, int64_t tiles_w, int64_t band_tiles);

// grad_input of a stride-1 convolution as a forward convolution of
// grad_output (conv_direct.cpp's grad_input_as_forward): its geometry, with
// p.algorithm left for the caller to set.
ConvGeometry grad_input_as_forward_geometry(const ConvGeometry& G);

// How backward computes grad_input and grad_weight (Planes: both in
// backward_depthwise, for the Depthwise and Grouped algorithms).
enum class GradInputPath { Planes, Winograd2, Winograd4, Pointwise, AsForwardDirect,
                           AsForwardGemm, DirectStrided, Gemm };
enum class GradWeightPath {
  Planes,
  Winograd2,
  Winograd4,
  Direct,
  ByTaps,
  ByChunks,
  Dots,
  ColumnDots,
  GroupedLanes,
  Gemm
};

enum class ConvPass { Forward, Backward };

// How each kernel splits its work, computed once per shape with the plan
// (the *_split functions beside the kernels): see the kernels for what
// each field counts.
struct ForwardGemmSplit {  // forward_gemm: tiles of positions x blocks of output channels
  int64_t tile = 0, tiles = 0, mrows = 0, mblocks = 0;
  bool pack_weights = false;  // the weights packed once for all tasks
  // a pointwise layer's images side by side as the columns of one GEMM
  // (gemm_images_side_by_side in conv_gemm.cpp), which splits its own work
  bool images_side_by_side = false;
};
struct ForwardDirectSplit {  // forward_direct: image chunks, channel panels x positions
  int64_t chunk = 0, oblock = 0, ochunks = 0, pblock = 0, pblocks = 0;
  bool lanes = false;       // positions in the lanes (forward_direct_lanes)
  bool lanes_flat = false;  // its blocks across output rows
};
struct GradInputGemmSplit {  // grad_input_gemm: blocks of input channels
  int64_t cblock = 0, nblocks = 0;
};
struct GradInputPointwiseSplit {  // grad_input_pointwise: tiles of positions x blocks of input channels
  int64_t tile = 0, tiles = 0, mrows = 0, mblocks = 0;
  bool images_side_by_side = false;  // as ForwardGemmSplit's
};
struct GradInputDirectSplit {  // grad_input_direct_strided: image chunks, position blocks
  int64_t chunk = 0, pblock = 0, pblocks = 0;
};
struct GradWeightGemmSplit {  // grad_weight_gemm (its threads' shares: grad_weight_share)
  bool images_side_by_side = false;  // positions of all images in chunks, as ForwardGemmSplit's
};
struct GradWeightByTapsSplit {  // grad_weight_by_taps: blocks of input channels
  int64_t mrows = 0, mblocks = 0;
};
struct GradWeightDirectSplit {  // grad_weight_direct: image chunks
  int64_t chunk = 0;
  int64_t parts = 1;  // ranges of a chunk's positions, summed apart
  bool lanes = false;  // positions in the lanes (grad_weight_direct_lanes)
};

// The decisions for one convolution shape and pass.
struct ConvPlan {
  ConvAlgorithm algorithm = ConvAlgorithm::Gemm;  // never Auto
  GradInputPath grad_input = GradInputPath::Gemm;     // backward only
  GradWeightPath grad_weight = GradWeightPath::Gemm;  // backward only
  // The splits of the kernels the plan runs (the others stay unset). The
  // forward ones serve the forward pass, or in backward grad_input run as a
  // forward convolution (AsForwardGemm, AsForwardDirect).
  ForwardGemmSplit gemm_split;
  ForwardDirectSplit direct_split;
  GradInputGemmSplit grad_input_gemm_split;
  GradInputPointwiseSplit grad_input_pointwise_split;
  GradInputDirectSplit grad_input_direct_split;
  GradWeightGemmSplit grad_weight_gemm_split;
  GradWeightByTapsSplit grad_weight_by_taps_split;
  GradWeightDirectSplit grad_weight_direct_split;
  // Whether two plans run the same kernels (their splits follow from those
  // and the shape).
  bool operator==(const ConvPlan& o) const {
    return algorithm == o.algorithm && grad_input == o.grad_input && grad_weight == o.grad_weight;
  }
};

// The plan the rules give for G (G.p.algorithm as asked for, possibly
// Auto), or for G with `algorithm` taken as if auto had chosen it (the
// autotune's candidates). Throws ValueError if an algorithm asked for by
// name does not apply.
ConvPlan rule_plan(const ConvGeometry& G, ConvPass pass, DType dtype);
ConvPlan plan_as_if_auto_chose(const ConvGeometry& G, ConvPass pass, DType dtype,
                               ConvAlgorithm algorithm);
// The algorithms auto may take for G (the autotune's candidates).
std::vector<ConvAlgorithm> auto_candidates(const ConvGeometry& G);

// The plan cache: keyed by shape, parameters, the algorithm asked for,
// whether the input rows are contiguous, pass, dtype, instruction set,
// thread count and whether autotune was on. Thread-safe; emptied when full.
bool find_cached_plan(const ConvGeometry& G, ConvPass pass, DType dtype, ConvPlan* plan);
void cache_plan(const ConvGeometry& G, ConvPass pass, DType dtype, const ConvPlan& plan);

}  // namespace conv2d_impl
}  // namespace convcore
