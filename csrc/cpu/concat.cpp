// Concatenation along one dimension, as torch.cat / numpy.concatenate: a
// copy per (outer index, input), split over the threads (a strided input
// element by element). The eager graph's
// concat (DenseNet's dense blocks, Inception's branches) goes through it so
// that its output comes from the bindings' cache of large blocks.
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "convcore/errors.h"
#include "convcore/ops.h"
#include "convcore/shapes.h"
#include "strided.h"

namespace convcore {

std::vector<int64_t> concatenate_shape(const std::vector<TensorView>& inputs, int64_t dim) {
  if (inputs.empty()) throw ValueError("concatenate: inputs must hold at least one array");
  const TensorView& first = inputs[0];
  const int ndim = first.ndim;
  if (ndim == 0 || dim < -ndim || dim >= ndim)
    throw ValueError("concatenate: dim must be in [" + std::to_string(-ndim) + ", " +
                     std::to_string(ndim - 1) + "] for inputs of " + std::to_string(ndim) +
                     " dimensions, got " + std::to_string(dim));
  if (dim < 0) dim += ndim;
  std::vector<int64_t> shape(first.shape, first.shape + ndim);
  shape[static_cast<std::size_t>(dim)] = 0;
  for (std::size_t i = 0; i < inputs.size(); ++i) {
    const TensorView& t = inputs[i];
    const std::string name = "inputs[" + std::to_string(i) + "]";
    check_same_dtype(t, name.c_str(), first, "inputs[0]");
    bool same = t.ndim == ndim;
    for (int d = 0; same && d < ndim; ++d) same = d == dim || t.shape[d] == first.shape[d];
    if (!same)
      throw ValueError("concatenate: " + name + " has shape " + shape_str(t) +
                       ", which differs from inputs[0]'s " + shape_str(first) +
                       " outside dimension " + std::to_string(dim));
    shape[static_cast<std::size_t>(dim)] += t.shape[dim];
  }
  return shape;
}

void concatenate(const std::vector<TensorView>& inputs, int64_t dim, const TensorView& output) {
  detail::CallScope scope;
  const std::vector<int64_t> shape = concatenate_shape(inputs, dim);
  const TensorView& first = inputs[0];
  const int ndim = first.ndim;
  if (dim < 0) dim += ndim;
  check_shape(output, "output", ndim, shape.data());
  check_same_dtype(output, "output", first, "inputs[0]");
  if (!output.is_contiguous()) throw ValueError("concatenate: output must be contiguous");
  const int64_t total = shape[static_cast<std::size_t>(dim)];
  int64_t outer = 1, inner = 1;
  for (int d = 0; d < dim; ++d) outer *= first.shape[d];
  for (int d = dim + 1; d < ndim; ++d) inner *= first.shape[d];
  const std::size_t item = dtype_size(first.dtype);
  std::vector<int64_t> offset(inputs.size());  // each input's start within an output row
  for (std::size_t i = 1; i < inputs.size(); ++i)
    offset[i] = offset[i - 1] + inputs[i - 1].shape[dim] * inner;
  const int64_t row = total * inner, pieces = outer * static_cast<int64_t>(inputs.size());
  detail::parallel_for(detail::threads_for(pieces, outer * row), pieces, [&](int64_t t) {
    const int64_t o = t / static_cast<int64_t>(inputs.size());
    const std::size_t i = static_cast<std::size_t>(t % static_cast<int64_t>(inputs.size()));
    const TensorView& in = inputs[i];
    const int64_t n = in.shape[dim] * inner;
    char* dst = static_cast<char*>(output.data) + (o * row + offset[i]) * item;
    if (in.is_contiguous()) {
      std::memcpy(dst, static_cast<const char*>(in.data) + o * n * item,
                  static_cast<std::size_t>(n) * item);
      return;
    }
    // a strided input: element by element, index o * n + j unravelled
    for (int64_t j = 0; j < n; ++j) {
      int64_t rest = o * n + j, at = 0;
      for (int d = ndim - 1; d >= 0; --d) {
        at += rest % in.shape[d] * in.strides[d];
        rest /= in.shape[d];
      }
      std::memcpy(dst + j * item, static_cast<const char*>(in.data) + at * item, item);
    }
  });
}

}  // namespace convcore
