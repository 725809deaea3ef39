// Private to the convolution sources: the kernels of each algorithm, one
// source file each, called by conv.cpp as the plan says. Each is
// instantiated for float and double in its own file.
#pragma once

#include "conv_plan.h"
#include "strided.h"

namespace convcore {
namespace conv2d_impl {

// conv_gemm.cpp: the packed GEMM over im2col blocks packed on the fly.
template <typename T>
ForwardGemmSplit forward_gemm_split(const ConvGeometry& G);
template <typename T>
void forward_gemm(const TensorView& input, const detail::Contiguous<T>& weight, const T* bias,
                  const ConvGeometry& G, const ForwardGemmSplit& split, T* out);
template <typename T>
GradInputPointwiseSplit grad_input_pointwise_split(const ConvGeometry& G);
template <typename T>
void grad_input_pointwise(const T* gy, const detail::Contiguous<T>& weight, const ConvGeometry& G,
                          const GradInputPointwiseSplit& split, T* gx);
GradInputGemmSplit grad_input_gemm_split(const ConvGeometry& G);
template <typename T>
void grad_input_gemm(const T* gy, const detail::Contiguous<T>& weight, const ConvGeometry& G,
                     const GradInputGemmSplit& split, T* gx);
template <typename T>
GradWeightByTapsSplit grad_weight_by_taps_split(const ConvGeometry& G);
template <typename T>
void grad_weight_by_taps(const T* gy, const TensorView& input, const ConvGeometry& G,
                         const GradWeightByTapsSplit& split, T* gw);
template <typename T>
void grad_weight_by_chunks(const T* gy, const TensorView& input, const ConvGeometry& G, T* gw);
template <typename T>
void grad_weight_dots(const T* gy, const TensorView& input, const ConvGeometry& G, T* gw);
template <typename T>
void grad_weight_column_dots(const T* gy, const TensorView& input, const ConvGeometry& G, T* gw);
template <typename T>
GradWeightGemmSplit grad_weight_gemm_split(const ConvGeometry& G);
template <typename T>
void grad_weight_gemm(const T* gy, const TensorView& input, const ConvGeometry& G,
                      const GradWeightGemmSplit& split, T* gw);

// conv_direct.cpp: the direct kernel over zero-padded copies of the images.
// Whether auto's direct forward of G puts the output positions in the
// vector lanes (few output channels a group, stride 1 along rows).
bool direct_lanes_pay(const ConvGeometry& G);
template <typename T>
ForwardDirectSplit forward_direct_split(const ConvGeometry& G);
// flipped: weight holds the filters of the layer whose grad_input this
// forward computes (grad_input_as_forward), read transposed and flipped.
template <typename T>
void forward_direct(const TensorView& input, const T* weight, const T* bias,
                    const ConvGeometry& G, const ForwardDirectSplit& split, T* out,
                    bool flipped = false);
// grad_input (a plan's AsForwardDirect or AsForwardGemm) with the plan's split.
template <typename T>
void grad_input_as_forward(const T* gy, const T* weight, const ConvGeometry& G,
                           const ConvPlan& plan, T* gx);
template <typename T>
GradInputDirectSplit grad_input_direct_split(const ConvGeometry& G);
template <typename T>
void grad_input_direct_strided(const T* gy, const T* weight, const ConvGeometry& G,
                               const GradInputDirectSplit& split, T* gx);
template <typename T>
GradWeightDirectSplit grad_weight_direct_split(const ConvGeometry& G);
template <typename T>
void grad_weight_direct(const T* gy, const TensorView& input, const ConvGeometry& G,
                        const GradWeightDirectSplit& split, T* gw);

// conv_depthwise.cpp: grouped layers plane by plane (Depthwise, Grouped).
// Whether a layer's planes take the flat kernels, which Grouped needs, and a
// group's padded input planes together hold at most kGroupedMostElements
// (scratch per thread: twice that).
constexpr int64_t kGroupedMostElements = int64_t(1) << 22;
bool grouped_planes_fit(const ConvGeometry& G);
template <typename T>
void forward_depthwise(const TensorView& input, const T* weight, const T* bias,
                       const ConvGeometry& G, T* out);
template <typename T>
void backward_depthwise(const T* gy, const TensorView& input, const T* weight,
                        const ConvGeometry& G, T* gx, T* gw, T* gb);

// conv_grouped.cpp: grad_weight of grouped layers with input channels in the
// vector lanes, where a group's input channels are a whole number of
// vectors (at this ISA level and dtype), 8 to 64 of them, with at most 64
// output channels, in at least 4 groups (its tasks are whole groups).
bool grad_weight_grouped_lanes_applies(const ConvGeometry& G, DType dtype);
template <typename T>
void grad_weight_grouped_lanes(const T* gy, const TensorView& input, const ConvGeometry& G,
                               T* gw);

// conv_winograd.cpp: F(M x M, 3x3), M = 2 or 4.
template <int M, typename T>
void forward_winograd(const TensorView& input, const T* weight, const T* bias,
                      const ConvGeometry& G, T* out);
template <int M, typename T>
void grad_input_winograd(const T* gy, const T* weight, const ConvGeometry& G, T* gx);
template <int M, typename T>
void grad_weight_winograd(const T* gy, const TensorView& input, const ConvGeometry& G, T* gw);

}  // namespace conv2d_impl
}  // namespace convcore
