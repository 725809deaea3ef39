// The one place where output sizes are computed and arguments are checked.
// Every op validates through these functions; the Python layer and the
// network builder call them too, so the rules cannot drift apart.
#pragma once
#include <cstdint>
#include <string>

#include "convcore/tensor.h"

namespace convcore {

// How a convolution is computed. Auto picks per shape: Depthwise for one
// input channel per group, Pointwise for 1x1 stride-1 unpadded kernels, Gemm
// (implicit im2col into the packed GEMM) otherwise. Winograd (F(2x2, 3x3))
// and Winograd4x4 (F(4x4, 3x3)), for 3x3 stride-1 undilated ungrouped
// layers, are used when asked for, and by Auto where they pay; so are
// Direct and Grouped (grouped layers plane by plane, as Depthwise: for few
// channels per group, whose output channels fill few vector lanes).
enum class ConvAlgorithm { Auto, Gemm, Direct, Pointwise, Depthwise, Winograd, Winograd4x4,
                           Grouped };

// "auto", "gemm", "direct", "pointwise", "depthwise", "winograd", "winograd4",
// "grouped";
// ValueError naming `algorithm` otherwise.
ConvAlgorithm parse_conv_algorithm(const std::string& name);
const char* conv_algorithm_name(ConvAlgorithm algorithm);

struct Conv2dParams {
  int64_t stride_h = 1, stride_w = 1;
  // Asymmetric padding: padding='same' with an even kernel pads one more
  // row/column at the bottom/right, as PyTorch does.
  int64_t pad_top = 0, pad_bottom = 0, pad_left = 0, pad_right = 0;
  int64_t dilation_h = 1, dilation_w = 1;
  int64_t groups = 1;
  ConvAlgorithm algorithm = ConvAlgorithm::Auto;
};

struct Pool2dParams {
  int64_t kernel_h = 1, kernel_w = 1;
  int64_t stride_h = 1, stride_w = 1;
  int64_t pad_h = 0, pad_w = 0;
  int64_t dilation_h = 1, dilation_w = 1;  // max pooling only
  bool ceil_mode = false;
  // avg pooling only
  bool count_include_pad = true;
  int64_t divisor_override = 0;  // 0: none (any other value, negative too, divides)
};

// Strides, paddings, dilations, kernel sizes and groups above this are
// rejected, so that no size arithmetic can overflow int64.
constexpr int64_t kMaxParam = (int64_t(1) << 31) - 1;

struct Shape4 {
  int64_t n, c, h, w;
};

// Convolution output length along one dimension: the lecture's
// (N - F + 2P) / S + 1 with dilation and asymmetric padding, floored.
// Returns a value < 1 when the (dilated) kernel does not fit.
int64_t conv_output_size(int64_t input, int64_t kernel, int64_t stride,
                         int64_t pad_before, int64_t pad_after, int64_t dilation);

// Pooling output length along one dimension, PyTorch's rule: with ceil_mode
// the last window is dropped when it would start in the right padding.
int64_t pool_output_size(int64_t input, int64_t kernel, int64_t stride, int64_t pad,
                         int64_t dilation, bool ceil_mode);

// 'same' padding for one dimension: total = dilation * (kernel - 1), the
// extra one (odd total) goes after.
void same_padding(int64_t kernel, int64_t dilation, int64_t* before, int64_t* after);

// Validate parameters and shapes; return the output shape. Throw ValueError
// naming the offending argument.
void check_conv2d_params(const Conv2dParams& p);
Shape4 conv2d_output_shape(const Shape4& input, const Shape4& weight, const Conv2dParams& p);

void check_pool2d_params(const Pool2dParams& p);
Shape4 max_pool2d_output_shape(const Shape4& input, const Pool2dParams& p);
Shape4 avg_pool2d_output_shape(const Shape4& input, const Pool2dParams& p);
Shape4 adaptive_avg_pool2d_output_shape(const Shape4& input, int64_t out_h, int64_t out_w);

// PyTorch's average-pool window of output (oh, ow) on an H x W input: the
// input rows [h0, h1) and columns [w0, w1) it sums and its divisor, which
// counts the window clipped to the padded input (count_include_pad) or to
// the input itself, unless divisor_override gives it.
struct AvgPoolWindow {
  int64_t h0, h1, w0, w1, divisor;
};
inline AvgPoolWindow avg_pool_window(int64_t H, int64_t W, const Pool2dParams& p, int64_t oh,
                                     int64_t ow) {
  int64_t h0 = oh * p.stride_h - p.pad_h, w0 = ow * p.stride_w - p.pad_w;
  int64_t h1 = h0 + p.kernel_h < H + p.pad_h ? h0 + p.kernel_h : H + p.pad_h;
  int64_t w1 = w0 + p.kernel_w < W + p.pad_w ? w0 + p.kernel_w : W + p.pad_w;
  const int64_t padded_size = (h1 - h0) * (w1 - w0);
  h0 = h0 > 0 ? h0 : 0, w0 = w0 > 0 ? w0 : 0;
  h1 = h1 < H ? h1 : H, w1 = w1 < W ? w1 : W;
  const int64_t divisor = p.divisor_override != 0 ? p.divisor_override  // any non-zero, as PyTorch
                          : p.count_include_pad   ? padded_size
                                                  : (h1 - h0) * (w1 - w0);
  return {h0, h1, w0, w1, divisor};
}

// Throws ValueError if the view does not have exactly this shape.
void check_shape(const TensorView& t, const char* name, int ndim, const int64_t* shape);
void check_ndim(const TensorView& t, const char* name, int ndim, const char* layout);
void check_same_dtype(const TensorView& t, const char* name, const TensorView& ref,
                      const char* ref_name);
void check_float(const TensorView& t, const char* name);
Shape4 shape4(const TensorView& t);

}  // namespace convcore
