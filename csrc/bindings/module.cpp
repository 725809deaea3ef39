// pybind11 glue only: numpy arrays in, views of them to the core, new
// C-contiguous arrays out, the GIL released while the core computes.
// Argument forms (int or pair, 'same', None) are normalised in
// python/convcore/functional.py; values are checked by the core.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>
#include <map>
#include <memory>
#include <optional>
#include <string_view>
#include <string>
#include <vector>

#include "convcore/convcore.h"
#include "engine_internal.h"  // return_free_heap_pages (not installed)
#include "model_file.h"  // the runtime's reader of model files (not installed)
#include "scratch.h"     // the core's cache of large blocks (not installed)

namespace py = pybind11;
using convcore::DType;
using convcore::TensorView;

namespace {

// float32 or float64, told by kind and size (an equal dtype may be another
// object); nothing for any other dtype.
std::optional<DType> float_dtype(const py::dtype& dt) {
  if (dt.kind() == 'f' && dt.itemsize() == 4) return DType::Float32;
  if (dt.kind() == 'f' && dt.itemsize() == 8) return DType::Float64;
  return std::nullopt;
}

// Holds the arrays a call looks at (including any copies made to fix odd
// strides or alignment) alive until the call returns.
struct Arrays {
  std::vector<py::array> keep;

  TensorView view(const py::array& a, const char* name) {
    // Compare dtypes by kind and size (an equal dtype may be another object);
    // a non-native byte order is converted below.
    const py::dtype dt = a.dtype();
    const std::optional<DType> floating = float_dtype(dt);
    if (!floating)
      throw convcore::TypeError(std::string(name) + " must be float32 or float64, got " +
                                std::string(py::str(dt)));
    const DType dtype = *floating;
    if (a.ndim() > convcore::kMaxDims)
      throw convcore::ValueError(std::string(name) + " has too many dimensions (" +
                                 std::to_string(a.ndim()) + ")");
    const auto itemsize = static_cast<py::ssize_t>(a.itemsize());
    bool odd = reinterpret_cast<std::uintptr_t>(a.data()) % itemsize != 0;
    for (py::ssize_t i = 0; i < a.ndim(); ++i) odd = odd || a.strides(i) % itemsize != 0;
    py::array arr = a;
    if (!dt.attr("isnative").cast<bool>())  // byte-swapped data: a native copy
      arr = a.attr("astype")(dt.attr("newbyteorder")("="));
    else if (odd)  // unaligned or odd strides: a fresh (so aligned) contiguous copy.
      // Not ascontiguousarray: it returns an unaligned C-contiguous array as
      // it is, and the core then loaded misaligned doubles (UBSan's finding).
      arr = py::module_::import("numpy").attr("array")(a, py::arg("copy") = true,
                                                       py::arg("order") = "C");
    keep.push_back(arr);
    TensorView t;
    t.data = const_cast<void*>(arr.data());
    t.dtype = dtype;
    t.ndim = static_cast<int>(arr.ndim());
    for (int i = 0; i < t.ndim; ++i) {
      t.shape[i] = arr.shape(i);
      t.strides[i] = arr.strides(i) / itemsize;
    }
    return t;
  }
};

// A new C-contiguous array. A large one takes a block of the core's cache
// (scratch.h), returned to it when the array and every view of it are gone:
// a training step's arrays of the shapes of the step before then need no
// fresh pages (numpy's own would be zeroed by the kernel at first touch).
template <typename T>
py::array new_array_of(std::vector<py::ssize_t> shape) {
  // pybind11 computes the C strides without an overflow check (undefined
  // behaviour, UBSan's finding): an empty batch of huge planes (adaptive
  // pooling to 2^31 - 1 on each side) overflowed them. numpy refuses such
  // an array anyway; here it is refused before the arithmetic.
  py::ssize_t stride = sizeof(T);
  for (std::size_t i = shape.size(); i-- > 0;)
    if (__builtin_mul_overflow(stride, shape[i], &stride)) {
      std::string dims;
      for (py::ssize_t d : shape) dims += (dims.empty() ? "" : ", ") + std::to_string(d);
      throw py::value_error("the output's shape (" + dims + ") is too large: " +
                            "its size in bytes does not fit in 64 bits");
    }
  const auto bytes = static_cast<std::size_t>(stride);  // the whole array's
  if (bytes < convcore::detail::kCachedScratchBytes) return py::array_t<T>(shape);
  void* block = convcore::detail::allocate_scratch(bytes, convcore::detail::ScratchUse::Array);
  py::capsule owner(block, [](void* p) { convcore::detail::free_scratch(p); });
  return py::array_t<T>(shape, static_cast<T*>(block), owner);
}

py::array new_array(const TensorView& like, std::vector<py::ssize_t> shape) {
  if (like.dtype == DType::Float32) return new_array_of<float>(std::move(shape));
  return new_array_of<double>(std::move(shape));
}

// The caller's `out` array (checked in functional.py: dtype, shape,
// contiguity, no overlap) or a new one.
py::array out_or_new(const std::optional<py::array>& out, const TensorView& like,
                     std::vector<py::ssize_t> shape) {
  if (!out) return new_array(like, std::move(shape));
  if (!(out->flags() & py::array::c_style) || !out->writeable())
    throw convcore::ValueError("out must be a writeable C-contiguous array");
  if (reinterpret_cast<std::uintptr_t>(out->data()) % static_cast<std::uintptr_t>(out->itemsize()))
    throw convcore::ValueError("out must be aligned to its item size (numpy arrays it allocates are)");
  return *out;
}

TensorView out_view(py::array& a) {
  TensorView t;
  t.data = a.mutable_data();
  t.dtype = float_dtype(a.dtype()).value_or(DType::Int64);
  t.ndim = static_cast<int>(a.ndim());
  for (int i = 0; i < t.ndim; ++i) {
    t.shape[i] = a.shape(i);
    t.strides[i] = a.strides(i) / static_cast<py::ssize_t>(a.itemsize());
  }
  return t;
}

std::vector<py::ssize_t> dims(const TensorView& t) {
  return std::vector<py::ssize_t>(t.shape, t.shape + t.ndim);
}

std::vector<py::ssize_t> dims(const convcore::Shape4& s) { return {s.n, s.c, s.h, s.w}; }

// The three gradients of a conv or linear backward (input, weight, bias):
// a new array for each one asked for, None for the others, which the core
// skips (it takes a null view).
struct RequestedGrads {
  py::object result[3] = {py::none(), py::none(), py::none()};
  TensorView view[3];
  bool need[3];
  RequestedGrads(const TensorView& input, const TensorView& weight, bool need_input,
                 bool need_weight, bool need_bias)
      : need{need_input, need_weight, need_bias} {
    const std::vector<py::ssize_t> shapes[3] = {
        dims(input), dims(weight), {static_cast<py::ssize_t>(weight.shape[0])}};
    for (int i = 0; i < 3; ++i) {
      if (!need[i]) continue;
      py::array a = new_array(input, shapes[i]);
      view[i] = out_view(a);
      result[i] = a;
    }
  }
  const TensorView* ptr(int i) const { return need[i] ? &view[i] : nullptr; }
  py::tuple tuple() const { return py::make_tuple(result[0], result[1], result[2]); }
};

convcore::Conv2dParams conv_params(std::pair<int64_t, int64_t> stride,
                                   std::vector<int64_t> padding,
                                   std::pair<int64_t, int64_t> dilation, int64_t groups) {
  if (padding.size() != 4) throw convcore::ValueError("padding must have 4 entries");
  convcore::Conv2dParams p;
  p.stride_h = stride.first, p.stride_w = stride.second;
  p.pad_top = padding[0], p.pad_bottom = padding[1];
  p.pad_left = padding[2], p.pad_right = padding[3];
  p.dilation_h = dilation.first, p.dilation_w = dilation.second;
  p.groups = groups;
  return p;
}

convcore::Pool2dParams pool_params(std::pair<int64_t, int64_t> kernel,
                                   std::pair<int64_t, int64_t> stride,
                                   std::pair<int64_t, int64_t> padding,
                                   std::pair<int64_t, int64_t> dilation, bool ceil_mode,
                                   bool count_include_pad, int64_t divisor_override) {
  convcore::Pool2dParams p;
  p.kernel_h = kernel.first, p.kernel_w = kernel.second;
  p.stride_h = stride.first, p.stride_w = stride.second;
  p.pad_h = padding.first, p.pad_w = padding.second;
  p.dilation_h = dilation.first, p.dilation_w = dilation.second;
  p.ceil_mode = ceil_mode;
  p.count_include_pad = count_include_pad;
  p.divisor_override = divisor_override;
  return p;
}

using Pair = std::pair<int64_t, int64_t>;

py::array conv2d(const py::array& input, const py::array& weight,
                 const std::optional<py::array>& bias, Pair stride, std::vector<int64_t> padding,
                 Pair dilation, int64_t groups, const std::string& algorithm,
                 const std::optional<py::array>& out_arg) {
  Arrays arrays;
  const TensorView x = arrays.view(input, "input");
  const TensorView w = arrays.view(weight, "weight");
  TensorView b;
  if (bias) b = arrays.view(*bias, "bias");
  auto p = conv_params(stride, padding, dilation, groups);
  p.algorithm = convcore::parse_conv_algorithm(algorithm);
  convcore::check_float(x, "input");
  convcore::check_same_dtype(w, "weight", x, "input");
  convcore::check_ndim(x, "input", 4, "(N, C, H, W)");
  convcore::check_ndim(w, "weight", 4, "(out_channels, in_channels / groups, kH, kW)");
  const auto shape = convcore::conv2d_output_shape(convcore::shape4(x), convcore::shape4(w), p);
  py::array out = out_or_new(out_arg, x, dims(shape));
  const TensorView y = out_view(out);
  {
    py::gil_scoped_release release;
    convcore::conv2d_forward(x, w, bias ? &b : nullptr, p, y);
  }
  return out;
}

py::tuple conv2d_backward(const py::array& grad_output, const py::array& input,
                          const py::array& weight, Pair stride, std::vector<int64_t> padding,
                          Pair dilation, int64_t groups, bool need_input, bool need_weight,
                          bool need_bias, const std::string& algorithm) {
  Arrays arrays;
  const TensorView gy = arrays.view(grad_output, "grad_output");
  const TensorView x = arrays.view(input, "input");
  const TensorView w = arrays.view(weight, "weight");
  auto p = conv_params(stride, padding, dilation, groups);
  p.algorithm = convcore::parse_conv_algorithm(algorithm);
  convcore::check_float(x, "input");
  convcore::check_same_dtype(w, "weight", x, "input");
  convcore::check_same_dtype(gy, "grad_output", x, "input");
  convcore::check_ndim(x, "input", 4, "(N, C, H, W)");
  convcore::check_ndim(w, "weight", 4, "(out_channels, in_channels / groups, kH, kW)");
  const RequestedGrads grads(x, w, need_input, need_weight, need_bias);
  {
    py::gil_scoped_release release;
    convcore::conv2d_backward(gy, x, w, p, grads.ptr(0), grads.ptr(1), grads.ptr(2));
  }
  return grads.tuple();
}

py::object max_pool2d(const py::array& input, Pair kernel, Pair stride, Pair padding,
                      Pair dilation, bool ceil_mode, bool return_indices,
                      const std::optional<py::array>& out_arg) {
  Arrays arrays;
  const TensorView x = arrays.view(input, "input");
  const auto p = pool_params(kernel, stride, padding, dilation, ceil_mode, true, 0);
  convcore::check_ndim(x, "input", 4, "(N, C, H, W)");
  const auto shape = convcore::max_pool2d_output_shape(convcore::shape4(x), p);
  py::array out = out_or_new(out_arg, x, dims(shape));
  const TensorView y = out_view(out);
  py::array idx;
  TensorView idx_v;
  if (return_indices) idx = new_array_of<int64_t>(dims(shape)), idx_v = out_view(idx);
  {
    py::gil_scoped_release release;
    convcore::max_pool2d_forward(x, p, y, return_indices ? &idx_v : nullptr);
  }
  if (return_indices) return py::make_tuple(out, idx);
  return std::move(out);
}

py::array max_pool2d_backward(const py::array& grad_output, const py::array& input, Pair kernel,
                              Pair stride, Pair padding, Pair dilation, bool ceil_mode) {
  Arrays arrays;
  const TensorView gy = arrays.view(grad_output, "grad_output");
  const TensorView x = arrays.view(input, "input");
  const auto p = pool_params(kernel, stride, padding, dilation, ceil_mode, true, 0);
  py::array gx = new_array(x, dims(x));
  const TensorView gx_v = out_view(gx);
  {
    py::gil_scoped_release release;
    convcore::max_pool2d_backward(gy, x, p, gx_v);
  }
  return gx;
}

py::array max_pool2d_backward_indices(const py::array& grad_output, const py::array& indices,
                                      const py::array& input) {
  Arrays arrays;
  const TensorView gy = arrays.view(grad_output, "grad_output");
  const TensorView x = arrays.view(input, "input");
  py::array idx = py::array_t<int64_t, py::array::c_style | py::array::forcecast>::ensure(indices);
  if (!idx) throw convcore::TypeError("indices must be an int64 array");
  if (!py::dtype::of<int64_t>().attr("__eq__")(indices.dtype()).cast<bool>())
    throw convcore::TypeError("indices must have dtype int64, got " +
                              std::string(py::str(indices.dtype())));
  TensorView idx_v = out_view(idx);
  idx_v.dtype = DType::Int64;
  py::array gx = new_array(x, dims(x));
  const TensorView gx_v = out_view(gx);
  {
    py::gil_scoped_release release;
    convcore::max_pool2d_backward_indices(gy, idx_v, gx_v);
  }
  return gx;
}

py::array avg_pool2d(const py::array& input, Pair kernel, Pair stride, Pair padding,
                     bool ceil_mode, bool count_include_pad, int64_t divisor_override,
                     const std::optional<py::array>& out_arg) {
  Arrays arrays;
  const TensorView x = arrays.view(input, "input");
  const auto p =
      pool_params(kernel, stride, padding, {1, 1}, ceil_mode, count_include_pad, divisor_override);
  convcore::check_ndim(x, "input", 4, "(N, C, H, W)");
  const auto shape = convcore::avg_pool2d_output_shape(convcore::shape4(x), p);
  py::array out = out_or_new(out_arg, x, dims(shape));
  const TensorView y = out_view(out);
  {
    py::gil_scoped_release release;
    convcore::avg_pool2d_forward(x, p, y);
  }
  return out;
}

py::array avg_pool2d_backward(const py::array& grad_output, const py::array& input, Pair kernel,
                              Pair stride, Pair padding, bool ceil_mode, bool count_include_pad,
                              int64_t divisor_override) {
  Arrays arrays;
  const TensorView gy = arrays.view(grad_output, "grad_output");
  const TensorView x = arrays.view(input, "input");
  const auto p =
      pool_params(kernel, stride, padding, {1, 1}, ceil_mode, count_include_pad, divisor_override);
  convcore::check_ndim(x, "input", 4, "(N, C, H, W)");
  convcore::check_same_dtype(gy, "grad_output", x, "input");
  py::array gx = new_array(x, dims(x));
  const TensorView gx_v = out_view(gx);
  {
    py::gil_scoped_release release;
    convcore::avg_pool2d_backward(gy, p, gx_v);
  }
  return gx;
}

py::array adaptive_avg_pool2d(const py::array& input, Pair output_size) {
  Arrays arrays;
  const TensorView x = arrays.view(input, "input");
  convcore::check_ndim(x, "input", 4, "(N, C, H, W)");
  const auto shape = convcore::adaptive_avg_pool2d_output_shape(
      convcore::shape4(x), output_size.first, output_size.second);
  py::array out = new_array(x, dims(shape));
  const TensorView y = out_view(out);
  {
    py::gil_scoped_release release;
    convcore::adaptive_avg_pool2d_forward(x, y);
  }
  return out;
}

py::array adaptive_avg_pool2d_backward(const py::array& grad_output, const py::array& input) {
  Arrays arrays;
  const TensorView gy = arrays.view(grad_output, "grad_output");
  const TensorView x = arrays.view(input, "input");
  convcore::check_ndim(x, "input", 4, "(N, C, H, W)");
  convcore::check_same_dtype(gy, "grad_output", x, "input");
  py::array gx = new_array(x, dims(x));
  const TensorView gx_v = out_view(gx);
  {
    py::gil_scoped_release release;
    convcore::adaptive_avg_pool2d_backward(gy, gx_v);
  }
  return gx;
}

py::array linear(const py::array& input, const py::array& weight,
                 const std::optional<py::array>& bias, const std::optional<py::array>& out_arg) {
  Arrays arrays;
  const TensorView x = arrays.view(input, "input");
  const TensorView w = arrays.view(weight, "weight");
  TensorView b;
  if (bias) b = arrays.view(*bias, "bias");
  convcore::check_ndim(x, "input", 2, "(batch, in_features)");
  convcore::check_ndim(w, "weight", 2, "(out_features, in_features)");
  py::array out = out_or_new(out_arg, x, {static_cast<py::ssize_t>(x.shape[0]),
                                          static_cast<py::ssize_t>(w.shape[0])});
  const TensorView y = out_view(out);
  {
    py::gil_scoped_release release;
    convcore::linear_forward(x, w, bias ? &b : nullptr, y);
  }
  return out;
}

py::tuple linear_backward(const py::array& grad_output, const py::array& input,
                          const py::array& weight, bool need_input, bool need_weight,
                          bool need_bias) {
  Arrays arrays;
  const TensorView gy = arrays.view(grad_output, "grad_output");
  const TensorView x = arrays.view(input, "input");
  const TensorView w = arrays.view(weight, "weight");
  convcore::check_ndim(x, "input", 2, "(batch, in_features)");
  convcore::check_ndim(w, "weight", 2, "(out_features, in_features)");
  convcore::check_same_dtype(w, "weight", x, "input");
  const RequestedGrads grads(x, w, need_input, need_weight, need_bias);
  {
    py::gil_scoped_release release;
    convcore::linear_backward(gy, x, w, grads.ptr(0), grads.ptr(1), grads.ptr(2));
  }
  return grads.tuple();
}

// core(first, second, out) into a new array (from the core's cache of
// blocks) of the dtype of the first argument and the shape
// shape_of(first, second), filled with the GIL released.
template <typename ShapeOf, typename Core>
py::array binary_into_new(const py::array& first, const char* first_name,
                          const py::array& second, const char* second_name, ShapeOf&& shape_of,
                          Core&& core) {
  Arrays arrays;
  const TensorView a = arrays.view(first, first_name);
  const TensorView b = arrays.view(second, second_name);
  py::array out = new_array(a, shape_of(a, b));
  const TensorView y = out_view(out);
  {
    py::gil_scoped_release release;
    core(a, b, y);
  }
  return out;
}

// input + other and input * other (functional's add and mul): input's shape.
template <void (*Core)(const TensorView&, const TensorView&, const TensorView&)>
py::array join(const py::array& input, const py::array& other) {
  return binary_into_new(
      input, "input", other, "other", [](const TensorView& a, const TensorView&) { return dims(a); },
      Core);
}

// The sum over each plane (n, c) of input * other, shape (N, C, 1, ..., 1)
// (functional's gate gradient; the core checks the shapes).
py::array mul_sum_planes(const py::array& input, const py::array& other) {
  auto planes = [](const TensorView& a, const TensorView&) {
    std::vector<py::ssize_t> shape(static_cast<std::size_t>(std::max(a.ndim, 2)), 1);
    for (int d = 0; d < std::min(a.ndim, 2); ++d) shape[static_cast<std::size_t>(d)] = a.shape[d];
    return shape;
  };
  return binary_into_new(input, "input", other, "other", planes, convcore::mul_sum_planes);
}

py::array relu(const py::array& input, const std::optional<py::array>& out_arg) {
  Arrays arrays;
  const TensorView x = arrays.view(input, "input");
  py::array out = out_or_new(out_arg, x, dims(x));
  const TensorView y = out_view(out);
  {
    py::gil_scoped_release release;
    convcore::relu_forward(x, y);
  }
  return out;
}

// grad_input of an elementwise op: a new array the shape of input, filled by
// core(grad_output, input, grad_input) with the GIL released.
template <typename Core>
py::array elementwise_backward(const py::array& grad_output, const py::array& input,
                               Core&& core) {
  return binary_into_new(grad_output, "grad_output", input, "input",
                         [](const TensorView&, const TensorView& x) { return dims(x); }, core);
}

py::array relu_backward(const py::array& grad_output, const py::array& input) {
  return elementwise_backward(grad_output, input, convcore::relu_backward);
}

// data and momentum_buffer are updated in place: the caller's arrays
// themselves (functional.sgd_step checks them: writeable, C-contiguous).
void sgd_step(py::array data, const py::array& grad, std::optional<py::array> momentum_buffer,
              double lr, double momentum, double dampening, double weight_decay, bool nesterov,
              bool first) {
  Arrays arrays;
  const TensorView g = arrays.view(grad, "grad");
  const TensorView w = out_view(data);
  convcore::SgdParams p;
  p.lr = lr, p.momentum = momentum, p.dampening = dampening, p.weight_decay = weight_decay;
  p.nesterov = nesterov, p.first = first;
  TensorView buf;
  if (momentum_buffer) buf = out_view(*momentum_buffer);
  py::gil_scoped_release release;
  convcore::sgd_step(w, g, momentum_buffer ? &buf : nullptr, p);
}

// data, exp_avg and exp_avg_sq are updated in place (functional.adam_step
// checks them: writeable, C-contiguous).
void adam_step(py::array data, const py::array& grad, py::array exp_avg, py::array exp_avg_sq,
               double step_size, double beta1, double beta2, double root_correction2, double eps,
               double weight_decay) {
  Arrays arrays;
  const TensorView g = arrays.view(grad, "grad");
  const TensorView w = out_view(data), m = out_view(exp_avg), v = out_view(exp_avg_sq);
  convcore::AdamParams p;
  p.step_size = step_size, p.beta1 = beta1, p.beta2 = beta2;
  p.root_correction2 = root_correction2, p.eps = eps, p.weight_decay = weight_decay;
  py::gil_scoped_release release;
  convcore::adam_step(w, g, m, v, p);
}

// An uninitialised float array (functional.empty_like): from the cache of
// blocks when large, as the ops' results.
py::array empty(std::vector<py::ssize_t> shape, const py::dtype& dtype) {
  for (py::ssize_t d : shape)
    if (d < 0) throw convcore::ValueError("shape must not hold negative sizes");
  const std::optional<DType> floating = float_dtype(dtype);
  if (!floating)
    throw convcore::TypeError("dtype must be float32 or float64, got " + std::string(py::str(dtype)));
  if (*floating == DType::Float32) return new_array_of<float>(std::move(shape));
  return new_array_of<double>(std::move(shape));
}

py::array concatenate(const std::vector<py::array>& inputs, int64_t dim) {
  Arrays arrays;
  std::vector<TensorView> views;
  for (std::size_t i = 0; i < inputs.size(); ++i)
    views.push_back(arrays.view(inputs[i], ("inputs[" + std::to_string(i) + "]").c_str()));
  const std::vector<int64_t> shape = convcore::concatenate_shape(views, dim);
  py::array out = new_array(views[0], std::vector<py::ssize_t>(shape.begin(), shape.end()));
  const TensorView out_v = out_view(out);
  {
    py::gil_scoped_release release;
    convcore::concatenate(views, dim, out_v);
  }
  return out;
}

convcore::Activation activation_kind(const std::string& name) {
  using convcore::Activation;
  if (name == "sigmoid") return Activation::Sigmoid;
  if (name == "silu") return Activation::SiLU;
  if (name == "relu6") return Activation::ReLU6;
  if (name == "hardswish") return Activation::Hardswish;
  if (name == "hardsigmoid") return Activation::Hardsigmoid;
  throw py::value_error("activation must be 'sigmoid', 'silu', 'relu6', 'hardswish' or "
                        "'hardsigmoid', got '" + name + "'");
}

py::array activation(const std::string& name, const py::array& input) {
  const convcore::Activation kind = activation_kind(name);
  Arrays arrays;
  const TensorView x = arrays.view(input, "input");
  py::array out = new_array(x, dims(x));
  const TensorView y = out_view(out);
  {
    py::gil_scoped_release release;
    convcore::activation_forward(kind, x, y);
  }
  return out;
}

py::array activation_backward(const std::string& name, const py::array& grad_output,
                              const py::array& input) {
  const convcore::Activation kind = activation_kind(name);
  return elementwise_backward(grad_output, input,
                              [kind](const TensorView& gy, const TensorView& x,
                                     const TensorView& gx) {
                                convcore::activation_backward(kind, gy, x, gx);
                              });
}

// softmax or log_softmax (log), forward and backward: new arrays filled
// by the core with the GIL released.
py::array softmax(const py::array& input, int64_t dim, bool log) {
  Arrays arrays;
  const TensorView x = arrays.view(input, "input");
  py::array out = new_array(x, dims(x));
  const TensorView y = out_view(out);
  {
    py::gil_scoped_release release;
    (log ? convcore::log_softmax_forward : convcore::softmax_forward)(x, dim, y);
  }
  return out;
}

py::array softmax_backward(const py::array& grad_output, const py::array& output, int64_t dim,
                           bool log) {
  Arrays arrays;
  const TensorView gy = arrays.view(grad_output, "grad_output");
  const TensorView y = arrays.view(output, "output");
  py::array gx = new_array(y, dims(y));
  const TensorView gx_v = out_view(gx);
  {
    py::gil_scoped_release release;
    (log ? convcore::log_softmax_backward : convcore::softmax_backward)(gy, y, dim, gx_v);
  }
  return gx;
}

py::array local_response_norm(const py::array& input, int64_t size, double alpha, double beta,
                              double k) {
  Arrays arrays;
  const TensorView x = arrays.view(input, "input");
  py::array out = new_array(x, dims(x));
  const TensorView y = out_view(out);
  {
    py::gil_scoped_release release;
    convcore::local_response_norm_forward(x, {size, alpha, beta, k}, y);
  }
  return out;
}

py::array local_response_norm_backward(const py::array& grad_output, const py::array& input,
                                       int64_t size, double alpha, double beta, double k) {
  Arrays arrays;
  const TensorView gy = arrays.view(grad_output, "grad_output");
  const TensorView x = arrays.view(input, "input");
  py::array gx = new_array(x, dims(x));
  const TensorView gx_v = out_view(gx);
  {
    py::gil_scoped_release release;
    convcore::local_response_norm_backward(gy, x, {size, alpha, beta, k}, gx_v);
  }
  return gx;
}

// Explicit padding of the last two dims (Conv2d's padding modes); pads as
// [top, bottom, left, right].
convcore::Pad2dParams pad2d_params(const std::vector<int64_t>& pads, const std::string& mode) {
  if (pads.size() != 4)
    throw convcore::ValueError("pads must be [top, bottom, left, right], got " +
                               std::to_string(pads.size()) + " values");
  convcore::Pad2dParams p;
  p.top = pads[0], p.bottom = pads[1], p.left = pads[2], p.right = pads[3];
  p.mode = convcore::parse_pad_mode(mode);
  return p;
}

py::array pad2d(const py::array& input, const std::vector<int64_t>& pads,
                const std::string& mode) {
  Arrays arrays;
  const TensorView x = arrays.view(input, "input");
  const convcore::Pad2dParams p = pad2d_params(pads, mode);
  int64_t shape[convcore::kMaxDims];
  convcore::pad2d_output_shape(x, p, shape);
  py::array out = new_array(x, std::vector<py::ssize_t>(shape, shape + x.ndim));
  const TensorView y = out_view(out);
  {
    py::gil_scoped_release release;
    convcore::pad2d_forward(x, p, y);
  }
  return out;
}

// grad_input (..., H, W) of pad2d from grad_output (..., H + top + bottom, W + left + right).
py::array pad2d_backward(const py::array& grad_output, const std::vector<int64_t>& pads,
                         const std::string& mode) {
  Arrays arrays;
  const TensorView gy = arrays.view(grad_output, "grad_output");
  const convcore::Pad2dParams p = pad2d_params(pads, mode);
  if (gy.ndim < 2 || gy.shape[gy.ndim - 2] < p.top + p.bottom ||
      gy.shape[gy.ndim - 1] < p.left + p.right)
    throw convcore::ValueError("grad_output of shape " + convcore::shape_str(gy) +
                               " is smaller than the pads");
  std::vector<py::ssize_t> shape(gy.shape, gy.shape + gy.ndim);
  shape[gy.ndim - 2] -= p.top + p.bottom;
  shape[gy.ndim - 1] -= p.left + p.right;
  py::array gx = new_array(gy, shape);
  const TensorView gx_v = out_view(gx);
  {
    py::gil_scoped_release release;
    convcore::pad2d_backward(gy, p, gx_v);
  }
  return gx;
}

// Training: returns (output, batch_mean, batch_var); evaluation: (output, None, None).
py::tuple batch_norm(const py::array& input, const std::optional<py::array>& mean,
                     const std::optional<py::array>& var, const std::optional<py::array>& weight,
                     const std::optional<py::array>& bias, bool training, double eps,
                     bool relu) {
  Arrays arrays;
  const TensorView x = arrays.view(input, "input");
  TensorView w, b, m, v;
  if (weight) w = arrays.view(*weight, "weight");
  if (bias) b = arrays.view(*bias, "bias");
  if (x.ndim < 2)
    throw convcore::ValueError("input must have at least 2 dimensions (N, C, ...), got " +
                               std::to_string(x.ndim) + "-D with shape " + convcore::shape_str(x));
  const py::ssize_t C = x.shape[1];
  py::array out = new_array(x, dims(x)), mean_a, var_a;
  if (training) {
    mean_a = new_array(x, {C}), var_a = new_array(x, {C});
    m = out_view(mean_a), v = out_view(var_a);
  } else {
    if (!mean || !var)
      throw convcore::ValueError("running_mean and running_var are required when not training");
    m = arrays.view(*mean, "running_mean"), v = arrays.view(*var, "running_var");
  }
  const TensorView y = out_view(out);
  {
    py::gil_scoped_release release;
    convcore::batch_norm_forward(x, weight ? &w : nullptr, bias ? &b : nullptr, training, eps, m,
                                 v, y, relu);
  }
  if (training) return py::make_tuple(out, mean_a, var_a);
  return py::make_tuple(out, py::none(), py::none());
}

py::tuple batch_norm_backward(const py::array& grad_output, const py::array& input,
                              const py::array& mean, const py::array& var,
                              const std::optional<py::array>& weight, bool training, double eps,
                              const std::optional<py::array>& relu_output) {
  Arrays arrays;
  const TensorView gy = arrays.view(grad_output, "grad_output");
  const TensorView x = arrays.view(input, "input");
  const TensorView m = arrays.view(mean, "mean"), v = arrays.view(var, "var");
  TensorView w, y;
  if (weight) w = arrays.view(*weight, "weight");
  if (relu_output) y = arrays.view(*relu_output, "output");
  if (x.ndim < 2)
    throw convcore::ValueError("input must have at least 2 dimensions (N, C, ...), got " +
                               std::to_string(x.ndim) + "-D with shape " + convcore::shape_str(x));
  const py::ssize_t C = x.shape[1];
  py::array gx = new_array(x, dims(x)), gw = new_array(x, {C}), gb = new_array(x, {C});
  const TensorView gx_v = out_view(gx), gw_v = out_view(gw), gb_v = out_view(gb);
  {
    py::gil_scoped_release release;
    convcore::batch_norm_backward(gy, x, weight ? &w : nullptr, training, eps, m, v, &gx_v,
                                  &gw_v, &gb_v, relu_output ? &y : nullptr);
  }
  return py::make_tuple(gx, gw, gb);
}


// --- model files and the compiled engine (runtime/)

// A safetensors file's header, checked by the C++ reader: the tensors'
// (name, dtype, shape, begin, end) in header order, the metadata, and where
// the data starts. Python makes the arrays from its own copy of the bytes.
py::tuple safetensors_header(const py::bytes& buf, const std::string& path) {
  const std::string_view data = buf;
  const convcore::SafetensorsFile f =
      convcore::SafetensorsFile::parse(path, data.data(), static_cast<uint64_t>(data.size()));
  py::list entries;
  for (const auto& e : f.entries())
    entries.append(py::make_tuple(e.name, e.dtype, e.shape, e.begin, e.end));
  return py::make_tuple(entries, f.metadata(), f.data_start());
}

std::vector<convcore::TensorInfo> tensor_infos(const py::list& infos) {
  std::vector<convcore::TensorInfo> out;
  for (const auto& item : infos) {
    const auto t = item.cast<py::tuple>();
    out.push_back({t[0].cast<std::string>(), t[1].cast<std::string>(),
                   t[2].cast<std::vector<int64_t>>()});
  }
  return out;
}

// The graph of a file's metadata checked against its tensors (name,
// safetensors dtype, shape), as convcore::Net::load checks them; returns the
// net's dtype ("float32" / "float64"). ValueError "cannot load '<path>': ...".
std::string check_model(const std::map<std::string, std::string>& metadata,
                        const py::list& infos, const std::string& path) {
  try {
    const convcore::graph::Graph g = convcore::graph_from_metadata(metadata);
    const DType dt = convcore::match_tensors(g, tensor_infos(infos));
    convcore::check_input_shape(g);
    return convcore::dtype_name(dt);
  } catch (const convcore::ValueError& e) {
    throw convcore::ValueError("cannot load " + py::repr(py::str(path)).cast<std::string>() +
                               ": " + e.what());
  }
}

// convcore.compile's engine: a convcore::Net over a graph and its tensors.
class CompiledNet {
 public:
  CompiledNet(const std::string& graph_json, const py::dict& tensors, bool blocked, bool fuse,
              int threads) {
    Arrays arrays;
    std::map<std::string, TensorView> views;
    for (const auto& kv : tensors) {
      const std::string name = kv.first.cast<std::string>();
      py::array a = py::array::ensure(kv.second);
      if (a.dtype().kind() == 'i' || a.dtype().kind() == 'u') {  // num_batches_tracked
        // (np.array: ascontiguousarray would make a 0-d array 1-d)
        py::array i64 = py::module_::import("numpy").attr("array")(a, "int64", py::arg("order") = "C");
        arrays.keep.push_back(i64);
        TensorView t;
        t.data = const_cast<void*>(i64.data());
        t.dtype = DType::Int64;
        t.ndim = static_cast<int>(i64.ndim());
        for (int i = 0; i < t.ndim; ++i) t.shape[i] = i64.shape(i), t.strides[i] = i64.strides(i) / 8;
        views[name] = t;
      } else {
        views[name] = arrays.view(a, name.c_str());
      }
    }
    convcore::NetOptions options;
    options.blocked = blocked, options.fuse = fuse, options.threads = threads;
    net_ = std::make_unique<convcore::Net>(convcore::Net::from_graph(graph_json, views, options));
  }
  explicit CompiledNet(const std::string& path, bool blocked, bool fuse, int threads) {
    convcore::NetOptions options;
    options.blocked = blocked, options.fuse = fuse, options.threads = threads;
    net_ = std::make_unique<convcore::Net>(convcore::Net::load(path, options));
  }

  py::array forward(const py::array& input) const {
    Arrays arrays;
    const TensorView x = arrays.view(input, "input");
    convcore::Tensor y;
    {
      py::gil_scoped_release release;
      y = net_->forward(x);
    }
    py::array out = y.dtype() == DType::Float32
                        ? py::array(py::array_t<float>(std::vector<py::ssize_t>(y.shape().begin(), y.shape().end())))
                        : py::array(py::array_t<double>(std::vector<py::ssize_t>(y.shape().begin(), y.shape().end())));
    std::memcpy(out.mutable_data(), y.data(), y.nbytes());
    return out;
  }
  py::list profile(const py::array& input, int runs) const {
    Arrays arrays;
    const TensorView x = arrays.view(input, "input");
    std::vector<convcore::NetStep> steps;
    {
      py::gil_scoped_release release;
      steps = net_->profile(x, runs);
    }
    py::list rows;
    for (const auto& s : steps)
      rows.append(py::make_tuple(s.label, s.kind, s.layout, s.shape, s.seconds));
    return rows;
  }
  const convcore::Net& net() const { return *net_; }
  convcore::Net& net() { return *net_; }

 private:
  std::unique_ptr<convcore::Net> net_;
};

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "convcore's C++ core (use the functions of the convcore package instead)";

  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const convcore::ValueError& e) {
      PyErr_SetString(PyExc_ValueError, e.what());
    } catch (const convcore::TypeError& e) {
      PyErr_SetString(PyExc_TypeError, e.what());
    } catch (const convcore::Error& e) {
      PyErr_SetString(PyExc_RuntimeError, e.what());
    }
  });

  m.def("conv2d", &conv2d);
  m.def("conv2d_backward", &conv2d_backward);
  m.def("max_pool2d", &max_pool2d);
  m.def("max_pool2d_backward", &max_pool2d_backward);
  m.def("max_pool2d_backward_indices", &max_pool2d_backward_indices);
  m.def("avg_pool2d", &avg_pool2d);
  m.def("avg_pool2d_backward", &avg_pool2d_backward);
  m.def("adaptive_avg_pool2d", &adaptive_avg_pool2d);
  m.def("adaptive_avg_pool2d_backward", &adaptive_avg_pool2d_backward);
  m.def("linear", &linear);
  m.def("linear_backward", &linear_backward);
  m.def("add", &join<convcore::add_forward>);
  m.def("mul", &join<convcore::mul_forward>);
  m.def("mul_sum_planes", &mul_sum_planes);
  m.def("relu", &relu);
  m.def("relu_backward", &relu_backward);
  m.def("sgd_step", &sgd_step);
  m.def("concatenate", &concatenate);
  m.def("empty", &empty);
  m.def("adam_step", &adam_step);
  m.def("activation", &activation);
  m.def("activation_backward", &activation_backward);
  m.def("softmax", &softmax, py::arg("input"), py::arg("dim"), py::arg("log") = false);
  m.def("softmax_backward", &softmax_backward, py::arg("grad_output"), py::arg("output"),
        py::arg("dim"), py::arg("log") = false);
  m.def("local_response_norm", &local_response_norm);
  m.def("local_response_norm_backward", &local_response_norm_backward);
  m.def("batch_norm", &batch_norm);
  m.def("batch_norm_backward", &batch_norm_backward);
  m.def("pad2d", &pad2d, py::arg("input"), py::arg("pads"), py::arg("mode"));
  m.def("pad2d_backward", &pad2d_backward, py::arg("grad_output"), py::arg("pads"),
        py::arg("mode"));

  // Shape rules, shared with the Python layer and the network builder.
  m.def("conv_output_size", &convcore::conv_output_size, py::arg("input"), py::arg("kernel"),
        py::arg("stride"), py::arg("pad_before"), py::arg("pad_after"), py::arg("dilation"));
  m.def("pool_output_size", &convcore::pool_output_size, py::arg("input"), py::arg("kernel"),
        py::arg("stride"), py::arg("pad"), py::arg("dilation"), py::arg("ceil_mode"));
  m.def("same_padding", [](int64_t kernel, int64_t dilation) {
    int64_t before, after;
    convcore::same_padding(kernel, dilation, &before, &after);
    return py::make_tuple(before, after);
  });
  m.def("conv2d_output_shape", [](std::vector<int64_t> input, std::vector<int64_t> weight,
                                  Pair stride, std::vector<int64_t> padding, Pair dilation,
                                  int64_t groups) {
    if (input.size() != 4 || weight.size() != 4)
      throw convcore::ValueError("input and weight shapes must have 4 entries");
    const auto s = convcore::conv2d_output_shape({input[0], input[1], input[2], input[3]},
                                                 {weight[0], weight[1], weight[2], weight[3]},
                                                 conv_params(stride, padding, dilation, groups));
    return py::make_tuple(s.n, s.c, s.h, s.w);
  });
  m.def("pool2d_output_shape", [](std::vector<int64_t> input, Pair kernel, Pair stride,
                                  Pair padding, Pair dilation, bool ceil_mode, bool is_avg) {
    if (input.size() != 4) throw convcore::ValueError("input shape must have 4 entries");
    const auto p = pool_params(kernel, stride, padding, dilation, ceil_mode, true, 0);
    const convcore::Shape4 in{input[0], input[1], input[2], input[3]};
    const auto s = is_avg ? convcore::avg_pool2d_output_shape(in, p)
                          : convcore::max_pool2d_output_shape(in, p);
    return py::make_tuple(s.n, s.c, s.h, s.w);
  });

  m.def("set_num_threads", &convcore::set_num_threads, py::arg("n"));
  m.def("get_num_threads", &convcore::get_num_threads);
  m.def("gemm_isa", [] { return std::string(convcore::gemm_isa()); });
  m.def("gemm_avx512_full_width", &convcore::gemm_avx512_full_width);
  m.def("workspace_peak", &convcore::workspace_peak_bytes,
        "Most scratch bytes held at once by this thread's calls since reset_workspace_peak()");
  m.def("reset_workspace_peak", &convcore::reset_workspace_peak);
  m.def("set_workspace_limit", &convcore::set_workspace_limit, py::arg("bytes"),
        "Most bytes one piece of scratch memory may take (0: physical memory)");
  m.def("workspace_limit", &convcore::workspace_limit);
  m.def("set_scratch_cache_limit", &convcore::set_scratch_cache_limit, py::arg("bytes"),
        "Most bytes of freed large scratch blocks kept for later calls (0: keep none)");
  m.def("scratch_cache_limit", &convcore::scratch_cache_limit);
  m.def("scratch_cache_bytes", &convcore::scratch_cache_bytes);
  m.def("return_free_heap_pages", &convcore::engine::return_free_heap_pages,
        "Hands the heap's free pages back to the system (glibc's malloc_trim; elsewhere nothing)");
  m.def("set_conv_autotune", &convcore::set_conv_autotune, py::arg("on"),
        "On: the first conv2d / conv2d_backward call of a shape with algorithm='auto' times the "
        "algorithms that apply and keeps the fastest for that shape. Off (the default): the "
        "rules choose, and results are deterministic");
  m.def("get_conv_autotune", &convcore::get_conv_autotune);
  m.def("conv_plan_cache_size", &convcore::conv_plan_cache_size,
        "Convolution plans cached (one per shape, parameters, pass, dtype, ISA, threads)");
  m.def("clear_conv_plan_cache", &convcore::clear_conv_plan_cache);

  m.def("safetensors_header", &safetensors_header, py::arg("buf"), py::arg("path"));
  m.def("check_model", &check_model, py::arg("metadata"), py::arg("tensors"), py::arg("path"));
  py::class_<CompiledNet>(m, "CompiledNet")
      .def(py::init<const std::string&, const py::dict&, bool, bool, int>(), py::arg("graph"),
           py::arg("tensors"), py::arg("blocked") = true, py::arg("fuse") = true,
           py::arg("threads") = 0)
      .def(py::init<const std::string&, bool, bool, int>(), py::arg("path"),
           py::arg("blocked") = true, py::arg("fuse") = true, py::arg("threads") = 0)
      .def("forward", &CompiledNet::forward, py::arg("input"))
      .def("profile", &CompiledNet::profile, py::arg("input"), py::arg("runs"))
      .def("plan", [](const CompiledNet& c, int64_t batch, std::vector<int64_t> sample) {
             return c.net().plan(batch, sample);
           }, py::arg("batch"), py::arg("sample_shape") = std::vector<int64_t>{})
      .def("arena_bytes", [](const CompiledNet& c, int64_t batch, std::vector<int64_t> sample) {
             return c.net().arena_bytes(batch, sample);
           }, py::arg("batch"), py::arg("sample_shape") = std::vector<int64_t>{})
      .def("summary", [](const CompiledNet& c) { return c.net().summary(); })
      .def("output_shape", [](const CompiledNet& c, std::vector<int64_t> sample) {
             return c.net().output_shape(sample);
           })
      .def_property_readonly("input_shape", [](const CompiledNet& c) { return c.net().input_shape(); })
      .def_property_readonly("name", [](const CompiledNet& c) { return c.net().name(); })
      .def_property_readonly("dtype", [](const CompiledNet& c) {
             return std::string(convcore::dtype_name(c.net().dtype()));
           })
      .def_property("threads", [](const CompiledNet& c) { return c.net().num_threads(); },
                    [](CompiledNet& c, int t) { c.net().set_num_threads(t); })
      .def_property_readonly("num_parameters", [](const CompiledNet& c) { return c.net().num_parameters(); });
}
