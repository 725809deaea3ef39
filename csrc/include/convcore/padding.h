// Explicit 2-D padding of the last two dims, the padding modes of Conv2d:
// zeros, reflect, replicate and circular (numpy.pad's constant, reflect, edge
// and wrap); Conv2d(padding_mode=...) runs it in Python too, through the
// bindings' pad2d / pad2d_backward. Pads larger than
// the input repeat the pattern as numpy.pad does: reflect is periodic with
// period 2 * (size - 1), circular with period size.
#pragma once
#include <cstdint>
#include <string>

#include "convcore/tensor.h"

namespace convcore {

enum class PadMode { Zeros, Reflect, Replicate, Circular };

// "zeros", "reflect", "replicate", "circular"; ValueError naming
// padding_mode otherwise (the Python layer's message).
PadMode parse_pad_mode(const std::string& name);
const char* pad_mode_name(PadMode mode);

struct Pad2dParams {
  int64_t top = 0, bottom = 0, left = 0, right = 0;
  PadMode mode = PadMode::Zeros;
};

// The padded shape of input (..., H, W): (..., H + top + bottom, W + left + right).
// ValueError for negative pads, fewer than 2 dims, or an empty plane with a
// mode that copies from it.
void pad2d_output_shape(const TensorView& input, const Pad2dParams& p, int64_t* out_shape);

// output (..., H + top + bottom, W + left + right), C-contiguous, written in full.
// input: any strides, float32 or float64.
void pad2d_forward(const TensorView& input, const Pad2dParams& p, const TensorView& output);

// The gradient of pad2d_forward: every padded position adds its gradient to
// the input position it was copied from. grad_input C-contiguous (..., H, W).
void pad2d_backward(const TensorView& grad_output, const Pad2dParams& p,
                    const TensorView& grad_input);

}  // namespace convcore
