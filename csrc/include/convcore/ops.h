// The op functions of the core. Inputs may have any strides; outputs must
// be C-contiguous views of the exact output shape (see shapes.h), written
// in full. float32 and float64; all arrays of one call share one dtype.
#pragma once
#include "convcore/shapes.h"
#include "convcore/tensor.h"

namespace convcore {

// output (N, Cout, Ho, Wo) = conv(input (N, Cin, H, W), weight (Cout, Cin/groups, kH, kW)) + bias (Cout)
void conv2d_forward(const TensorView& input, const TensorView& weight, const TensorView* bias,
                    const Conv2dParams& p, const TensorView& output);

// Any of grad_input, grad_weight, grad_bias may be null to skip it.
void conv2d_backward(const TensorView& grad_output, const TensorView& input,
                     const TensorView& weight, const Conv2dParams& p,
                     const TensorView* grad_input, const TensorView* grad_weight,
                     const TensorView* grad_bias);

// indices (optional, int64): flat h * W + w index of the max in each input plane.
void max_pool2d_forward(const TensorView& input, const Pool2dParams& p, const TensorView& output,
                        const TensorView* indices);
void max_pool2d_backward(const TensorView& grad_output, const TensorView& input,
                         const Pool2dParams& p, const TensorView& grad_input);

void avg_pool2d_forward(const TensorView& input, const Pool2dParams& p, const TensorView& output);
void avg_pool2d_backward(const TensorView& grad_output, const Pool2dParams& p,
                         const TensorView& grad_input);

void adaptive_avg_pool2d_forward(const TensorView& input, const TensorView& output);
void adaptive_avg_pool2d_backward(const TensorView& grad_output, const TensorView& grad_input);

// output (M, out) = input (M, in) @ weight (out, in)^T + bias (out)
void linear_forward(const TensorView& input, const TensorView& weight, const TensorView* bias,
                    const TensorView& output);
void linear_backward(const TensorView& grad_output, const TensorView& input,
                     const TensorView& weight, const TensorView* grad_input,
                     const TensorView* grad_weight, const TensorView* grad_bias);

// Elementwise over views of any (equal) shape.
void relu_forward(const TensorView& input, const TensorView& output);
void relu_backward(const TensorView& grad_output, const TensorView& input,
                   const TensorView& grad_input);

}  // namespace convcore
