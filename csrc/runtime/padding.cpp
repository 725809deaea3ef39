// Explicit padding: each output row/column is copied from one input
// row/column, found once per axis with numpy.pad's rules.
#include "convcore/padding.h"

#include <cstring>
#include <vector>

#include "convcore/errors.h"
#include "convcore/shapes.h"

namespace convcore {

namespace {

// Source index along one axis for every padded position, -1 for a zero.
std::vector<int64_t> source_index(int64_t size, int64_t before, int64_t after, PadMode mode) {
  std::vector<int64_t> src(static_cast<std::size_t>(size + before + after));
  for (int64_t i = 0; i < static_cast<int64_t>(src.size()); ++i) {
    const int64_t pos = i - before;
    int64_t s;
    if (pos >= 0 && pos < size) {
      s = pos;
    } else if (mode == PadMode::Zeros) {
      s = -1;
    } else if (mode == PadMode::Replicate) {
      s = pos < 0 ? 0 : size - 1;
    } else if (mode == PadMode::Circular) {
      s = ((pos % size) + size) % size;
    } else {  // Reflect: periodic with period 2 (size - 1), no edge repeat
      const int64_t period = size > 1 ? 2 * (size - 1) : 1;
      s = (pos < 0 ? -pos : pos) % period;
      if (s >= size) s = period - s;
    }
    src[static_cast<std::size_t>(i)] = s;
  }
  return src;
}

void check_params(const Pad2dParams& p) {
  if (p.top < 0 || p.bottom < 0 || p.left < 0 || p.right < 0)
    throw ValueError("padding must be non-negative, got (top, bottom, left, right) = (" +
                     std::to_string(p.top) + ", " + std::to_string(p.bottom) + ", " +
                     std::to_string(p.left) + ", " + std::to_string(p.right) + ")");
  for (int64_t v : {p.top, p.bottom, p.left, p.right})
    if (v > kMaxParam) throw ValueError("padding must be at most " + std::to_string(kMaxParam));
}

template <typename T>
void pad_typed(const TensorView& in, const Pad2dParams& p, const TensorView& out) {
  const int nd = in.ndim;
  const int64_t H = in.shape[nd - 2], W = in.shape[nd - 1];
  const int64_t Ho = out.shape[nd - 2], Wo = out.shape[nd - 1];
  const std::vector<int64_t> rows = source_index(H, p.top, p.bottom, p.mode);
  const std::vector<int64_t> cols = source_index(W, p.left, p.right, p.mode);
  int64_t planes = 1;
  for (int d = 0; d < nd - 2; ++d) planes *= in.shape[d];
  const int64_t sh = in.strides[nd - 2], sw = in.strides[nd - 1];
  T* y = out.ptr<T>();
  int64_t idx[kMaxDims] = {};
  for (int64_t plane = 0; plane < planes; ++plane) {
    int64_t base = 0;
    for (int d = 0; d < nd - 2; ++d) base += idx[d] * in.strides[d];
    const T* x = in.ptr<const T>() + base;
    T* yp = y + plane * Ho * Wo;
    for (int64_t i = 0; i < Ho; ++i) {
      T* yrow = yp + i * Wo;
      const int64_t r = rows[static_cast<std::size_t>(i)];
      if (r < 0) {
        std::fill(yrow, yrow + Wo, T(0));
        continue;
      }
      const T* xrow = x + r * sh;
      for (int64_t j = 0; j < Wo; ++j) {
        const int64_t c = cols[static_cast<std::size_t>(j)];
        yrow[j] = c < 0 ? T(0) : xrow[c * sw];
      }
    }
    for (int d = nd - 3; d >= 0; --d) {  // odometer over the leading dims
      if (++idx[d] < in.shape[d]) break;
      idx[d] = 0;
    }
  }
}

template <typename T>
void unpad_typed(const TensorView& gy, const Pad2dParams& p, const TensorView& gx) {
  const int nd = gx.ndim;
  const int64_t H = gx.shape[nd - 2], W = gx.shape[nd - 1];
  const int64_t Ho = gy.shape[nd - 2], Wo = gy.shape[nd - 1];
  const std::vector<int64_t> rows = source_index(H, p.top, p.bottom, p.mode);
  const std::vector<int64_t> cols = source_index(W, p.left, p.right, p.mode);
  int64_t planes = 1;
  for (int d = 0; d < nd - 2; ++d) planes *= gx.shape[d];
  T* g = gx.ptr<T>();
  std::fill(g, g + planes * H * W, T(0));
  const int64_t sh = gy.strides[nd - 2], sw = gy.strides[nd - 1];
  int64_t idx[kMaxDims] = {};
  for (int64_t plane = 0; plane < planes; ++plane) {
    int64_t base = 0;
    for (int d = 0; d < nd - 2; ++d) base += idx[d] * gy.strides[d];
    const T* src = gy.ptr<const T>() + base;
    T* gp = g + plane * H * W;
    // In a fixed order (row by row), so the sums are deterministic.
    for (int64_t i = 0; i < Ho; ++i) {
      const int64_t r = rows[static_cast<std::size_t>(i)];
      if (r < 0) continue;
      for (int64_t j = 0; j < Wo; ++j) {
        const int64_t c = cols[static_cast<std::size_t>(j)];
        if (c >= 0) gp[r * W + c] += src[i * sh + j * sw];
      }
    }
    for (int d = nd - 3; d >= 0; --d) {
      if (++idx[d] < gy.shape[d]) break;
      idx[d] = 0;
    }
  }
}

}  // namespace

PadMode parse_pad_mode(const std::string& name) {
  if (name == "zeros") return PadMode::Zeros;
  if (name == "reflect") return PadMode::Reflect;
  if (name == "replicate") return PadMode::Replicate;
  if (name == "circular") return PadMode::Circular;
  throw ValueError("padding_mode must be one of ['circular', 'reflect', 'replicate', 'zeros'], "
                   "got '" + name + "'");
}

const char* pad_mode_name(PadMode mode) {
  switch (mode) {
    case PadMode::Zeros: return "zeros";
    case PadMode::Reflect: return "reflect";
    case PadMode::Replicate: return "replicate";
    case PadMode::Circular: return "circular";
  }
  return "unknown";
}

void pad2d_output_shape(const TensorView& input, const Pad2dParams& p, int64_t* out_shape) {
  check_params(p);
  if (input.ndim < 2 || input.ndim > kMaxDims)
    throw ValueError("input must have at least 2 dimensions (..., H, W), got " +
                     std::to_string(input.ndim) + "-D with shape " + shape_str(input));
  const int nd = input.ndim;
  const int64_t H = input.shape[nd - 2], W = input.shape[nd - 1];
  const bool copies = p.mode != PadMode::Zeros;
  if (copies && ((H == 0 && p.top + p.bottom > 0) || (W == 0 && p.left + p.right > 0)))
    throw ValueError(std::string("cannot pad an empty dimension with padding_mode='") +
                     pad_mode_name(p.mode) + "', input shape " + shape_str(input));
  for (int d = 0; d < nd; ++d) out_shape[d] = input.shape[d];
  out_shape[nd - 2] = H + p.top + p.bottom;
  out_shape[nd - 1] = W + p.left + p.right;
}

void pad2d_forward(const TensorView& input, const Pad2dParams& p, const TensorView& output) {
  check_float(input, "input");
  int64_t shape[kMaxDims];
  pad2d_output_shape(input, p, shape);
  if (output.dtype != input.dtype)
    throw TypeError(std::string("output must have dtype ") + dtype_name(input.dtype));
  if (!output.is_contiguous()) throw ValueError("output must be C-contiguous");
  check_shape(output, "output", input.ndim, shape);
  if (output.numel() == 0) return;
  if (input.dtype == DType::Float32)
    pad_typed<float>(input, p, output);
  else
    pad_typed<double>(input, p, output);
}

void pad2d_backward(const TensorView& grad_output, const Pad2dParams& p,
                    const TensorView& grad_input) {
  check_float(grad_input, "grad_input");
  check_same_dtype(grad_output, "grad_output", grad_input, "grad_input");
  if (!grad_input.is_contiguous()) throw ValueError("grad_input must be C-contiguous");
  int64_t shape[kMaxDims];
  pad2d_output_shape(grad_input, p, shape);
  check_shape(grad_output, "grad_output", grad_input.ndim, shape);
  if (grad_input.numel() == 0) return;
  if (grad_input.dtype == DType::Float32)
    unpad_typed<float>(grad_output, p, grad_input);
  else
    unpad_typed<double>(grad_output, p, grad_input);
}

}  // namespace convcore
