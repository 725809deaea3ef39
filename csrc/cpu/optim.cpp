// Optimiser updates in place, one pass over memory per parameter: numpy
// expressions of the same rule sweep the parameter, the gradient and the
// momentum buffer five or six times and allocate temporaries.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>

#include "convcore/errors.h"
#include "convcore/ops.h"
#include "convcore/shapes.h"
#include "strided.h"

namespace convcore {

namespace {

// Elements per task: a few hundred KB of each array.
constexpr int64_t kChunk = 32768;

void check_contiguous(const TensorView& t, const char* name) {
  if (!t.is_contiguous()) throw ValueError(std::string(name) + " must be contiguous");
}

// Calls f(std::true_type) or f(std::false_type): a loop's options become
// template arguments, so that its body has no branch and vectorises (with
// the options read inside, GCC left the updates scalar: SGD with momentum
// moved 28 GB/s on one core where three vectorised passes moved 42).
template <typename F>
void with_flag(bool flag, F&& f) {
  if (flag) f(std::true_type{});
  else f(std::false_type{});
}

// The same float operations, in the same order, as the numpy rule of
// convcore.optim.SGD (the file is compiled without FMA contraction, so
// the results are those bit for bit).
template <typename T, bool Decay, bool Momentum, bool Nesterov, bool First>
void sgd_run(T* __restrict w, const T* __restrict grad, T* __restrict buf, int64_t n,
             const SgdParams& p) {
  const T lr = static_cast<T>(p.lr), momentum = static_cast<T>(p.momentum);
  const T keep = static_cast<T>(1.0 - p.dampening), decay = static_cast<T>(p.weight_decay);
  for (int64_t i = 0; i < n; ++i) {
    T g = grad[i];
    if constexpr (Decay) g = g + decay * w[i];
    if constexpr (Momentum) {
      const T b = First ? g : buf[i] * momentum + keep * g;
      buf[i] = b;
      g = Nesterov ? g + momentum * b : b;
    }
    w[i] = w[i] - lr * g;
  }
}

template <typename T>
void sgd_elements(T* w, const T* grad, T* buf, int64_t n, const SgdParams& p) {
  with_flag(p.weight_decay != 0, [&](auto decay) {
    if (p.momentum == 0) return sgd_run<T, decltype(decay)::value, false, false, false>(w, grad, buf, n, p);
    with_flag(p.nesterov, [&](auto nesterov) {
      with_flag(p.first, [&](auto first) {
        sgd_run<T, decltype(decay)::value, true, decltype(nesterov)::value, decltype(first)::value>(
            w, grad, buf, n, p);
      });
    });
  });
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

// The numpy rule of convcore.optim.Adam, operation by operation (the file
// is compiled with -fno-math-errno: a sqrt that may set errno is not
// vectorised).
template <typename T, bool Decay>
void adam_run(T* __restrict w, const T* __restrict grad, T* __restrict m, T* __restrict v,
              int64_t n, const AdamParams& p) {
  const T step_size = static_cast<T>(p.step_size), beta1 = static_cast<T>(p.beta1);
  const T beta2 = static_cast<T>(p.beta2), keep1 = static_cast<T>(1.0 - p.beta1);
  const T keep2 = static_cast<T>(1.0 - p.beta2), rc2 = static_cast<T>(p.root_correction2);
  const T eps = static_cast<T>(p.eps), decay = static_cast<T>(p.weight_decay);
  for (int64_t i = 0; i < n; ++i) {
    T g = grad[i];
    if constexpr (Decay) g = g + decay * w[i];
    const T mi = m[i] * beta1 + keep1 * g;
    const T vi = v[i] * beta2 + keep2 * (g * g);
    m[i] = mi;
    v[i] = vi;
    const T denom = std::sqrt(vi) / rc2 + eps;
    w[i] = w[i] - step_size * (mi / denom);
  }
}

template <typename T>
void adam_elements(T* w, const T* grad, T* m, T* v, int64_t n, const AdamParams& p) {
  with_flag(p.weight_decay != 0,
            [&](auto decay) { adam_run<T, decltype(decay)::value>(w, grad, m, v, n, p); });
}

template <typename T>
void adam_typed(const TensorView& param, const TensorView& grad, const TensorView& exp_avg,
                const TensorView& exp_avg_sq, const AdamParams& p) {
  const int64_t n = param.numel(), tasks = (n + kChunk - 1) / kChunk;
  T* w = static_cast<T*>(param.data);
  const T* g = static_cast<const T*>(grad.data);
  T* m = static_cast<T*>(exp_avg.data);
  T* v = static_cast<T*>(exp_avg_sq.data);
  detail::parallel_for(detail::threads_for(tasks, 8 * n), tasks, [&](int64_t t) {
    const int64_t i0 = t * kChunk, count = std::min(kChunk, n - i0);
    adam_elements(w + i0, g + i0, m + i0, v + i0, count, p);
  });
}

void check_param_and_grad(const TensorView& param, const TensorView& grad, const char* op) {
  if (param.dtype != DType::Float32 && param.dtype != DType::Float64)
    throw TypeError(std::string(op) + ": param must be float32 or float64");
  check_shape(grad, "grad", param.ndim, param.shape);
  check_same_dtype(grad, "grad", param, "param");
  check_contiguous(param, "param");
  check_contiguous(grad, "grad");
}

void check_state(const TensorView& t, const char* name, const TensorView& param) {
  check_shape(t, name, param.ndim, param.shape);
  check_same_dtype(t, name, param, "param");
  check_contiguous(t, name);
}

}  // namespace

void adam_step(const TensorView& param, const TensorView& grad, const TensorView& exp_avg,
               const TensorView& exp_avg_sq, const AdamParams& p) {
  detail::CallScope scope;
  check_param_and_grad(param, grad, "adam_step");
  check_state(exp_avg, "exp_avg", param);
  check_state(exp_avg_sq, "exp_avg_sq", param);
  if (param.dtype == DType::Float32)
    adam_typed<float>(param, grad, exp_avg, exp_avg_sq, p);
  else
    adam_typed<double>(param, grad, exp_avg, exp_avg_sq, p);
}

void sgd_step(const TensorView& param, const TensorView& grad, const TensorView* momentum_buffer,
              const SgdParams& p) {
  detail::CallScope scope;
  check_param_and_grad(param, grad, "sgd_step");
  if (p.momentum != 0) {
    if (!momentum_buffer)
      throw ValueError("sgd_step: momentum != 0 needs a momentum_buffer");
    check_state(*momentum_buffer, "momentum_buffer", param);
  }
  const TensorView* buf = p.momentum != 0 ? momentum_buffer : nullptr;
  if (param.dtype == DType::Float32)
    sgd_typed<float>(param, grad, buf, p);
  else
    sgd_typed<double>(param, grad, buf, p);
}

}  // namespace convcore
