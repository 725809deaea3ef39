// Fully connected layer: output = input @ weight^T + bias, and its gradients,
// as GEMMs over strided views (transposes are just swapped strides).
#include <omp.h>

#include <algorithm>

#include "convcore/ops.h"
#include "convcore/threading.h"
#include "gemm.h"
#include "strided.h"

namespace convcore {

namespace {

void check_linear(const TensorView& input, const TensorView& weight) {
  check_float(input, "input");
  check_same_dtype(weight, "weight", input, "input");
  check_ndim(input, "input", 2, "(batch, in_features)");
  check_ndim(weight, "weight", 2, "(out_features, in_features)");
  if (input.shape[1] != weight.shape[1])
    throw ValueError("input has " + std::to_string(input.shape[1]) +
                     " features but weight expects in_features = " +
                     std::to_string(weight.shape[1]) + " (weight.shape[1])");
}

// output (M x N) = input (M x K) @ weight (N x K)^T for a small batch M:
// bound by reading the weight once, so each weight row is streamed in order
// and dotted with every input row (kept in cache) -- no packing, no
// strided access to the large operand. Dot products run in kLanes partial
// sums in a fixed order (deterministic), then add up.
template <typename T>
void linear_forward_small_batch(const TensorView& input, const TensorView& weight, T* y) {
  const int64_t M = input.shape[0], K = input.shape[1], N = weight.shape[0];
  constexpr int kLanes = 16;
  const detail::Contiguous<T> xc(input);
  const T* x = xc.data();
  const T* w = weight.ptr<const T>();
  const int64_t ws0 = weight.strides[0];
  const int64_t kmain = K / kLanes * kLanes;
#pragma omp parallel for num_threads(detail::threads_for(N, M * N * K)) schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    const T* wr = w + n * ws0;
    for (int64_t m = 0; m < M; ++m) {
      const T* xr = x + m * K;
      T part[kLanes] = {};
      for (int64_t k = 0; k < kmain; k += kLanes)
        for (int l = 0; l < kLanes; ++l) part[l] += xr[k + l] * wr[k + l];
      T sum = 0;
      for (int l = 0; l < kLanes; ++l) sum += part[l];
      for (int64_t k = kmain; k < K; ++k) sum += xr[k] * wr[k];
      y[m * N + n] = sum;
    }
  }
}

}  // namespace

void linear_forward(const TensorView& input, const TensorView& weight, const TensorView* bias,
                    const TensorView& output) {
  const detail::CallScope scope;  // shares the threads among concurrent calls
  check_linear(input, weight);
  const int64_t M = input.shape[0], K = input.shape[1], N = weight.shape[0];
  if (bias) {
    check_same_dtype(*bias, "bias", input, "input");
    check_shape(*bias, "bias", 1, &N);
  }
  const int64_t shape[2] = {M, N};
  detail::check_output(output, "output", input, 2, shape);
  detail::dispatch_float(input.dtype, [&](auto zero) {
    using T = decltype(zero);
    T* y = output.ptr<T>();
    if (M <= 4 && weight.strides[1] == 1) {
      linear_forward_small_batch<T>(input, weight, y);
    } else {
      // B(k, j) = weight[j, k]
      gemm::gemm_strided<T>(M, N, K, input.ptr<const T>(), input.strides[0], input.strides[1],
                            weight.ptr<const T>(), weight.strides[1], weight.strides[0], y, N,
                            false);
    }
    if (bias && M > 0) {
      const T* b = bias->ptr<const T>();
      const int64_t bs = bias->strides[0];
#pragma omp parallel for num_threads(detail::threads_for(M, M * N)) schedule(static)
      for (int64_t i = 0; i < M; ++i)
        for (int64_t j = 0; j < N; ++j) y[i * N + j] += b[j * bs];
    }
  });
}

void linear_backward(const TensorView& grad_output, const TensorView& input,
                     const TensorView& weight, const TensorView* grad_input,
                     const TensorView* grad_weight, const TensorView* grad_bias) {
  const detail::CallScope scope;  // shares the threads among concurrent calls
  check_linear(input, weight);
  const int64_t M = input.shape[0], K = input.shape[1], N = weight.shape[0];
  check_same_dtype(grad_output, "grad_output", input, "input");
  const int64_t out_shape[2] = {M, N};
  check_shape(grad_output, "grad_output", 2, out_shape);
  if (grad_input) detail::check_output(*grad_input, "grad_input", input, 2, input.shape);
  if (grad_weight) detail::check_output(*grad_weight, "grad_weight", input, 2, weight.shape);
  if (grad_bias) detail::check_output(*grad_bias, "grad_bias", input, 1, &N);
  detail::dispatch_float(input.dtype, [&](auto zero) {
    using T = decltype(zero);
    const T* gy = grad_output.ptr<const T>();
    const int64_t gs0 = grad_output.strides[0], gs1 = grad_output.strides[1];
    // grad_input (M x K) = grad_output (M x N) @ weight (N x K)
    if (grad_input)
      gemm::gemm_strided<T>(M, K, N, gy, gs0, gs1, weight.ptr<const T>(), weight.strides[0],
                            weight.strides[1], grad_input->ptr<T>(), K, false);
    // grad_weight (N x K) = grad_output^T (N x M) @ input (M x K)
    if (grad_weight)
      gemm::gemm_strided<T>(N, K, M, gy, gs1, gs0, input.ptr<const T>(), input.strides[0],
                            input.strides[1], grad_weight->ptr<T>(), K, false);
    if (grad_bias) {
      T* gb = grad_bias->ptr<T>();
#pragma omp parallel for num_threads(detail::threads_for(N, M * N)) schedule(static)
      for (int64_t j = 0; j < N; ++j) {
        double s = 0;  // float32 sums in double
        for (int64_t i = 0; i < M; ++i) s += gy[i * gs0 + j * gs1];
        gb[j] = static_cast<T>(s);
      }
    }
  });
}

}  // namespace convcore
