// Optimiser updates in place, one pass over memory per parameter: numpy
// expressions of the same rule sweep the parameter, the gradient and the
// momentum buffer five or six times and allocate temporaries.
#include <algorithm>
#include <cstdint>
#include <string>

#include "convcore/errors.h"
#include "convcore/ops.h"
#include "convcore/shapes.h"
#include "strided.h"

namespace convcore {

namespace {

// Elements per task: a few hundred KB of each array.
constexpr int64_t kChunk = 32768;

void check_contiguous(const TensorView& t, const char* name) {
  if (!t.is_contiguous())
    throw ValueError(std::string("sgd_step: ") + name + " must be contiguous");
}

// The same float operations, in the same order, as the numpy rule of
// convcore.optim.SGD (the file is compiled without FMA contraction, so
// the results are those bit for bit).
template <typename T>
void sgd_elements(T* w, const T* grad, T* buf, int64_t n, const SgdParams& p) {
  const T lr = static_cast<T>(p.lr), momentum = static_cast<T>(p.momentum);
  const T keep = static_cast<T>(1.0 - p.dampening), decay = static_cast<T>(p.weight_decay);
  for (int64_t i = 0; i < n; ++i) {
    T g = grad[i];
    if (p.weight_decay != 0) g = g + decay * w[i];
    if (p.momentum != 0) {
      const T b = p.first ? g : buf[i] * momentum + keep * g;
      buf[i] = b;
      g = p.nesterov ? g + momentum * b : b;
    }
    w[i] = w[i] - lr * g;
  }
}

template <typename T>
void sgd_typed(const TensorView& param, const TensorView& grad, const TensorView* buf,
               const SgdParams& p) {
  const int64_t n = param.numel(), tasks = (n + kChunk - 1) / kChunk;
  T* w = static_cast<T*>(param.data);
  const T* g = static_cast<const T*>(grad.data);
  T* b = buf ? static_cast<T*>(buf->data) : nullptr;
  detail::parallel_for(detail::threads_for(tasks, 4 * n), tasks, [&](int64_t t) {
    const int64_t i0 = t * kChunk, count = std::min(kChunk, n - i0);
    sgd_elements(w + i0, g + i0, b ? b + i0 : nullptr, count, p);
  });
}

}  // namespace

void sgd_step(const TensorView& param, const TensorView& grad, const TensorView* momentum_buffer,
              const SgdParams& p) {
  detail::CallScope scope;
  if (param.dtype != DType::Float32 && param.dtype != DType::Float64)
    throw TypeError("sgd_step: param must be float32 or float64");
  check_shape(grad, "grad", param.ndim, param.shape);
  check_same_dtype(grad, "grad", param, "param");
  check_contiguous(param, "param");
  check_contiguous(grad, "grad");
  if (p.momentum != 0) {
    if (!momentum_buffer)
      throw ValueError("sgd_step: momentum != 0 needs a momentum_buffer");
    check_shape(*momentum_buffer, "momentum_buffer", param.ndim, param.shape);
    check_same_dtype(*momentum_buffer, "momentum_buffer", param, "param");
    check_contiguous(*momentum_buffer, "momentum_buffer");
  }
  const TensorView* buf = p.momentum != 0 ? momentum_buffer : nullptr;
  if (param.dtype == DType::Float32)
    sgd_typed<float>(param, grad, buf, p);
  else
    sgd_typed<double>(param, grad, buf, p);
}

}  // namespace convcore
