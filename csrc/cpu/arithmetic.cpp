// The joins' elementwise sums and products (residual adds, a branch's
// gradients summed, squeeze-and-excitation's channel gate) on the core's
// threads: numpy runs them on one, and its broadcasting loop for a gate of
// one value per channel is several times slower than a scale per plane.
#include <algorithm>
#include <cstdint>
#include <string>

#include "convcore/errors.h"
#include "convcore/ops.h"
#include "convcore/threading.h"
#include "strided.h"

namespace convcore {

namespace {

// Elements per task: enough that a task's loop, not its dispatch, takes the
// time, and few enough that an array worth two threads (threads_for: 32K
// elements a thread) splits into at least two tasks.
constexpr int64_t kChunk = 16384;

// Whether other holds one value per (image, channel) of input: shape
// (N, C, 1, ..., 1) against input's (N, C, ...).
bool per_channel(const TensorView& input, const TensorView& other) {
  if (other.ndim != input.ndim || input.ndim < 3) return false;
  if (other.shape[0] != input.shape[0] || other.shape[1] != input.shape[1]) return false;
  for (int d = 2; d < input.ndim; ++d)
    if (other.shape[d] != 1) return false;
  return true;
}

// y[i] = op(a[i], b[i]) for i < n, in chunks over the threads.
template <typename T, typename Op>
void map2(const T* a, const T* b, T* y, int64_t n, Op op) {
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  detail::parallel_for(detail::threads_for(chunks, n), chunks, [&](int64_t c) {
    const int64_t lo = c * kChunk, hi = std::min(n, lo + kChunk);
    for (int64_t i = lo; i < hi; ++i) y[i] = op(a[i], b[i]);
  });
}

// f(p, plane) for each of input's planes p (one per image and channel, of
// `plane` elements), planes grouped into tasks of about kChunk elements.
template <typename F>
void for_each_plane(const TensorView& input, F&& f) {
  const int64_t n = input.numel(), planes = input.shape[0] * input.shape[1];
  const int64_t plane = n / std::max<int64_t>(1, planes);
  const int64_t per_task = std::max<int64_t>(1, kChunk / std::max<int64_t>(1, plane));
  const int64_t tasks = (planes + per_task - 1) / per_task;
  detail::parallel_for(detail::threads_for(tasks, n), tasks, [&](int64_t t) {
    const int64_t p_end = std::min(planes, (t + 1) * per_task);
    for (int64_t p = t * per_task; p < p_end; ++p) f(p, plane);
  });
}

void check_join(const TensorView& input, const TensorView& other, const TensorView& output,
                bool broadcast) {
  check_float(input, "input");
  check_same_dtype(other, "other", input, "input");
  if (!(broadcast && per_channel(input, other)))
    check_shape(other, "other", input.ndim, input.shape);
  detail::check_output(output, "output", input, input.ndim, input.shape);
}

}  // namespace

void add_forward(const TensorView& input, const TensorView& other, const TensorView& output) {
  const detail::CallScope scope;  // shares the threads among concurrent calls
  check_join(input, other, output, false);
  detail::dispatch_float(input.dtype, [&](auto zero) {
    using T = decltype(zero);
    const detail::Contiguous<T> a(input), b(other);
    map2(a.data(), b.data(), output.ptr<T>(), input.numel(), [](T u, T v) { return u + v; });
  });
}

void mul_forward(const TensorView& input, const TensorView& other, const TensorView& output) {
  const detail::CallScope scope;
  check_join(input, other, output, true);
  detail::dispatch_float(input.dtype, [&](auto zero) {
    using T = decltype(zero);
    const detail::Contiguous<T> a(input), b(other);
    T* y = output.ptr<T>();
    const int64_t n = input.numel();
    if (other.numel() == n) {  // the same shape (one image of one channel: either way)
      map2(a.data(), b.data(), y, n, [](T u, T v) { return u * v; });
      return;
    }
    // a plane of input times its channel's value
    const T* x = a.data();
    const T* s = b.data();
    for_each_plane(input, [&](int64_t p, int64_t plane) {
      const T v = s[p];
      const T* src = x + p * plane;
      T* dst = y + p * plane;
      for (int64_t i = 0; i < plane; ++i) dst[i] = src[i] * v;
    });
  });
}

void mul_sum_planes(const TensorView& input, const TensorView& other, const TensorView& output) {
  const detail::CallScope scope;
  check_float(input, "input");
  check_same_dtype(other, "other", input, "input");
  check_shape(other, "other", input.ndim, input.shape);
  if (input.ndim < 3)
    throw ValueError("input must have at least 3 dimensions (N, C, ...), got " +
                     std::to_string(input.ndim));
  check_same_dtype(output, "output", input, "input");
  if (!per_channel(input, output))
    throw ValueError("output must have shape (N, C, 1, ..., 1) for input's (N, C, ...)");
  detail::dispatch_float(input.dtype, [&](auto zero) {
    using T = decltype(zero);
    const detail::Contiguous<T> a(input), b(other);
    T* y = output.ptr<T>();
    const T* x = a.data();
    const T* g = b.data();
    for_each_plane(input, [&](int64_t p, int64_t plane) {
      // kLanes sums, element i into sum i % kLanes, then added in order:
      // independent chains the compiler can keep in vector registers
      constexpr int kLanes = 8;
      double sums[kLanes] = {};
      const T* u = x + p * plane;
      const T* v = g + p * plane;
      int64_t i = 0;
      for (; i + kLanes <= plane; i += kLanes)
        for (int l = 0; l < kLanes; ++l)
          sums[l] += static_cast<double>(u[i + l]) * static_cast<double>(v[i + l]);
      for (; i < plane; ++i) sums[i % kLanes] += static_cast<double>(u[i]) * static_cast<double>(v[i]);
      double total = 0;
      for (int l = 0; l < kLanes; ++l) total += sums[l];
      y[p] = static_cast<T>(total);
    });
  });
}

}  // namespace convcore
