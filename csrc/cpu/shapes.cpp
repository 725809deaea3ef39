// Output-size rules and argument checks: the single source of truth.
#include "convcore/shapes.h"

#include <initializer_list>
#include <sstream>

#include "convcore/errors.h"

namespace convcore {

namespace {

// Floor division that rounds toward negative infinity (b > 0).
int64_t floor_div(int64_t a, int64_t b) {
  int64_t q = a / b;
  if ((a % b != 0) && (a < 0)) --q;
  return q;
}

template <typename... Args>
[[noreturn]] void fail(Args&&... args) {
  std::ostringstream os;
  (os << ... << args);
  throw ValueError(os.str());
}

void check_range(const char* name, std::initializer_list<int64_t> values) {
  for (int64_t v : values)
    if (v > kMaxParam || v < -kMaxParam) fail(name, " must be at most ", kMaxParam, ", got ", v);
}

// Throws if the number of elements of a shape does not fit in int64.
void check_numel(const Shape4& s, const char* what) {
  int64_t n = 1;
  for (int64_t d : {s.n, s.c, s.h, s.w})
    if (d > 0 && __builtin_mul_overflow(n, d, &n))
      fail(what, " would have more elements than fit in 64 bits: (", s.n, ", ", s.c, ", ", s.h,
           ", ", s.w, ")");
}

// Shapes reach these rules from arrays, but also as plain numbers (Python's
// conv2d_output_shape, a model file's input shape), so they are checked
// too: a dimension above 2^62 (no real tensor has one) would let the size
// arithmetic below overflow int64.
constexpr int64_t kMaxDim = int64_t(1) << 62;

void check_dims(const char* name, const Shape4& s) {
  for (int64_t d : {s.n, s.c, s.h, s.w})
    if (d < 0 || d > kMaxDim)
      fail(name, " shape (", s.n, ", ", s.c, ", ", s.h, ", ", s.w,
           ") must have dimensions in [0, 2^62], got ", d);
}

// The one-dimension rules are public (and reach Python): their arguments are
// checked here so that no value can divide by zero or overflow.
void check_size_args(int64_t input, int64_t kernel, int64_t stride,
                     std::initializer_list<int64_t> pads, int64_t dilation) {
  if (input < -kMaxDim || input > kMaxDim)
    fail("input size must be at most 2^62 in magnitude, got ", input);
  check_range("kernel size", {kernel});
  check_range("stride", {stride});
  check_range("padding", pads);
  check_range("dilation", {dilation});
  if (stride <= 0) fail("stride must be positive, got ", stride);
}

std::string pair_str(int64_t a, int64_t b) {
  std::ostringstream os;
  os << "(" << a << ", " << b << ")";
  return os.str();
}

// w.c * groups for a message, without overflowing.
std::string channels_str(int64_t per_group, int64_t groups) {
  int64_t n;
  if (__builtin_mul_overflow(per_group, groups, &n)) return "more than 2^63";
  return std::to_string(n);
}

}  // namespace

const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::Float32: return "float32";
    case DType::Float64: return "float64";
    case DType::Int64: return "int64";
  }
  return "unknown";
}

std::size_t dtype_size(DType dtype) {
  switch (dtype) {
    case DType::Float32: return 4;
    case DType::Float64: return 8;
    case DType::Int64: return 8;
  }
  return 0;
}

TensorView contiguous_view(void* data, DType dtype, int ndim, const int64_t* shape) {
  if (ndim < 0 || ndim > kMaxDims) fail("contiguous_view: ndim must be in [0, ", kMaxDims, "]");
  TensorView t;
  t.data = data;
  t.dtype = dtype;
  t.ndim = ndim;
  int64_t stride = 1;
  for (int i = ndim - 1; i >= 0; --i) {
    t.shape[i] = shape[i];
    t.strides[i] = stride;
    stride *= shape[i];
  }
  return t;
}

std::string shape_str(const TensorView& t) {
  std::ostringstream os;
  os << "(";
  for (int i = 0; i < t.ndim; ++i) os << (i ? ", " : "") << t.shape[i];
  if (t.ndim == 1) os << ",";
  os << ")";
  return os.str();
}

int64_t conv_output_size(int64_t input, int64_t kernel, int64_t stride, int64_t pad_before,
                         int64_t pad_after, int64_t dilation) {
  check_size_args(input, kernel, stride, {pad_before, pad_after}, dilation);
  const int64_t span = dilation * (kernel - 1) + 1;
  return floor_div(input + pad_before + pad_after - span, stride) + 1;
}

int64_t pool_output_size(int64_t input, int64_t kernel, int64_t stride, int64_t pad,
                         int64_t dilation, bool ceil_mode) {
  check_size_args(input, kernel, stride, {pad}, dilation);
  const int64_t span = dilation * (kernel - 1) + 1;
  int64_t out = floor_div(input + 2 * pad - span + (ceil_mode ? stride - 1 : 0), stride) + 1;
  // With ceil_mode the last window must start inside the input or the left
  // padding, never in the right padding.
  if (ceil_mode && (out - 1) * stride >= input + pad) --out;
  return out;
}

ConvAlgorithm parse_conv_algorithm(const std::string& name) {
  if (name == "auto") return ConvAlgorithm::Auto;
  if (name == "gemm") return ConvAlgorithm::Gemm;
  if (name == "direct") return ConvAlgorithm::Direct;
  if (name == "pointwise") return ConvAlgorithm::Pointwise;
  if (name == "depthwise") return ConvAlgorithm::Depthwise;
  if (name == "winograd") return ConvAlgorithm::Winograd;
  if (name == "winograd4") return ConvAlgorithm::Winograd4x4;
  if (name == "grouped") return ConvAlgorithm::Grouped;
  fail("algorithm must be one of 'auto', 'gemm', 'direct', 'pointwise', 'depthwise', 'winograd', "
       "'winograd4', 'grouped', got '", name, "'");
}

const char* conv_algorithm_name(ConvAlgorithm algorithm) {
  switch (algorithm) {
    case ConvAlgorithm::Auto: return "auto";
    case ConvAlgorithm::Gemm: return "gemm";
    case ConvAlgorithm::Direct: return "direct";
    case ConvAlgorithm::Pointwise: return "pointwise";
    case ConvAlgorithm::Depthwise: return "depthwise";
    case ConvAlgorithm::Winograd: return "winograd";
    case ConvAlgorithm::Winograd4x4: return "winograd4";
    case ConvAlgorithm::Grouped: return "grouped";
  }
  return "unknown";
}

void same_padding(int64_t kernel, int64_t dilation, int64_t* before, int64_t* after) {
  check_range("kernel size", {kernel});
  check_range("dilation", {dilation});
  const int64_t total = dilation * (kernel - 1);
  *before = total / 2;
  *after = total - *before;
}

void check_conv2d_params(const Conv2dParams& p) {
  check_range("stride", {p.stride_h, p.stride_w});
  check_range("padding", {p.pad_top, p.pad_bottom, p.pad_left, p.pad_right});
  check_range("dilation", {p.dilation_h, p.dilation_w});
  check_range("groups", {p.groups});
  if (p.stride_h <= 0 || p.stride_w <= 0)
    fail("stride must be positive, got ", pair_str(p.stride_h, p.stride_w));
  if (p.pad_top < 0 || p.pad_bottom < 0 || p.pad_left < 0 || p.pad_right < 0)
    fail("padding must be non-negative, got (top, bottom, left, right) = (", p.pad_top, ", ",
         p.pad_bottom, ", ", p.pad_left, ", ", p.pad_right, ")");
  if (p.dilation_h <= 0 || p.dilation_w <= 0)
    fail("dilation must be positive, got ", pair_str(p.dilation_h, p.dilation_w));
  if (p.groups <= 0) fail("groups must be positive, got ", p.groups);
}

Shape4 conv2d_output_shape(const Shape4& in, const Shape4& w, const Conv2dParams& p) {
  check_conv2d_params(p);
  check_dims("input", in);
  check_dims("weight", w);
  if (in.c % p.groups != 0)
    fail("groups=", p.groups, " must divide the input channels, got input with ", in.c,
         " channels");
  if (w.n % p.groups != 0)
    fail("groups=", p.groups, " must divide the output channels (weight.shape[0]), got ", w.n);
  if (w.c != in.c / p.groups)  // (not w.c * groups: that can overflow)
    fail("weight has ", w.c, " input channels per group (weight.shape[1]); with groups=", p.groups,
         " the input must have ", channels_str(w.c, p.groups), " channels, got ", in.c);
  if (w.h <= 0 || w.w <= 0)
    fail("weight must have a positive kernel size, got ", pair_str(w.h, w.w));
  check_range("weight kernel size", {w.h, w.w});
  const int64_t span_h = p.dilation_h * (w.h - 1) + 1;
  const int64_t span_w = p.dilation_w * (w.w - 1) + 1;
  const int64_t padded_h = in.h + p.pad_top + p.pad_bottom;
  const int64_t padded_w = in.w + p.pad_left + p.pad_right;
  if (span_h > padded_h || span_w > padded_w)
    fail("weight: kernel size ", pair_str(w.h, w.w), " (", span_h, "x", span_w,
         " with dilation) is larger than the padded input ", padded_h, "x", padded_w,
         " (input ", in.h, "x", in.w, " plus padding)");
  Shape4 out;
  out.n = in.n;
  out.c = w.n;
  out.h = conv_output_size(in.h, w.h, p.stride_h, p.pad_top, p.pad_bottom, p.dilation_h);
  out.w = conv_output_size(in.w, w.w, p.stride_w, p.pad_left, p.pad_right, p.dilation_w);
  check_numel(out, "the output");
  return out;
}

void check_pool2d_params(const Pool2dParams& p) {
  check_range("kernel_size", {p.kernel_h, p.kernel_w});
  check_range("stride", {p.stride_h, p.stride_w});
  check_range("padding", {p.pad_h, p.pad_w});
  check_range("dilation", {p.dilation_h, p.dilation_w});
  if (p.kernel_h <= 0 || p.kernel_w <= 0)
    fail("kernel_size must be positive, got ", pair_str(p.kernel_h, p.kernel_w));
  if (p.stride_h <= 0 || p.stride_w <= 0)
    fail("stride must be positive, got ", pair_str(p.stride_h, p.stride_w));
  if (p.pad_h < 0 || p.pad_w < 0)
    fail("padding must be non-negative, got ", pair_str(p.pad_h, p.pad_w));
  if (p.dilation_h <= 0 || p.dilation_w <= 0)
    fail("dilation must be positive, got ", pair_str(p.dilation_h, p.dilation_w));
  if (p.pad_h > p.kernel_h / 2 || p.pad_w > p.kernel_w / 2)
    fail("padding ", pair_str(p.pad_h, p.pad_w), " must be at most half of kernel_size ",
         pair_str(p.kernel_h, p.kernel_w));
}

namespace {

Shape4 pool_shape(const Shape4& in, const Pool2dParams& p) {
  check_dims("input", in);
  Shape4 out{in.n, in.c, 0, 0};
  out.h = pool_output_size(in.h, p.kernel_h, p.stride_h, p.pad_h, p.dilation_h, p.ceil_mode);
  out.w = pool_output_size(in.w, p.kernel_w, p.stride_w, p.pad_w, p.dilation_w, p.ceil_mode);
  if (out.h < 1 || out.w < 1)
    fail("input of size ", in.h, "x", in.w, " is too small for kernel_size ",
         pair_str(p.kernel_h, p.kernel_w), ", stride ", pair_str(p.stride_h, p.stride_w),
         ", padding ", pair_str(p.pad_h, p.pad_w), ", dilation ",
         pair_str(p.dilation_h, p.dilation_w), ": the output would be ", out.h, "x", out.w);
  check_numel(out, "the output");
  return out;
}

}  // namespace

Shape4 max_pool2d_output_shape(const Shape4& in, const Pool2dParams& p) {
  check_pool2d_params(p);
  return pool_shape(in, p);
}

Shape4 avg_pool2d_output_shape(const Shape4& in, const Pool2dParams& p) {
  if (p.dilation_h != 1 || p.dilation_w != 1) fail("avg_pool2d has no dilation");
  check_pool2d_params(p);
  return pool_shape(in, p);
}

Shape4 adaptive_avg_pool2d_output_shape(const Shape4& in, int64_t out_h, int64_t out_w) {
  if (out_h < 0 || out_w < 0)
    fail("output_size must be non-negative, got ", pair_str(out_h, out_w));
  check_range("output_size", {out_h, out_w});
  check_dims("input", in);
  if ((in.h == 0 || in.w == 0) && in.n * in.c != 0)
    fail("input must have non-zero height and width for adaptive_avg_pool2d, got ", in.h, "x",
         in.w);
  const Shape4 out{in.n, in.c, out_h, out_w};
  check_numel(out, "the output");
  return out;
}

void check_ndim(const TensorView& t, const char* name, int ndim, const char* layout) {
  if (t.ndim != ndim)
    fail(name, " must be ", ndim, "-D ", layout, ", got ", t.ndim, "-D with shape ",
         shape_str(t));
}

void check_shape(const TensorView& t, const char* name, int ndim, const int64_t* shape) {
  bool ok = t.ndim == ndim;
  for (int i = 0; ok && i < ndim; ++i) ok = t.shape[i] == shape[i];
  if (!ok) {
    TensorView expected;
    expected.ndim = ndim;
    for (int i = 0; i < ndim; ++i) expected.shape[i] = shape[i];
    fail(name, " must have shape ", shape_str(expected), ", got ", shape_str(t));
  }
}

void check_float(const TensorView& t, const char* name) {
  if (t.dtype != DType::Float32 && t.dtype != DType::Float64) {
    std::ostringstream os;
    os << name << " must be float32 or float64, got " << dtype_name(t.dtype);
    throw TypeError(os.str());
  }
}

void check_same_dtype(const TensorView& t, const char* name, const TensorView& ref,
                      const char* ref_name) {
  if (t.dtype != ref.dtype) {
    std::ostringstream os;
    os << name << " has dtype " << dtype_name(t.dtype) << " but " << ref_name << " has dtype "
       << dtype_name(ref.dtype) << "; all arrays of one call must share a dtype";
    throw TypeError(os.str());
  }
}

Shape4 shape4(const TensorView& t) { return Shape4{t.shape[0], t.shape[1], t.shape[2], t.shape[3]}; }

}  // namespace convcore
