// Sums of dot products along contiguous rows, on linear.cpp's small-batch
// dot tiles: y (M x N) = sum over images i of x_i (M x K) @ w_i (N x K)^T.
// A pointwise convolution's grad_weight with few channels is this (K: the
// positions of an image): the GEMM path would pack gy and transpose the
// image for a product whose output is only Cout x Cin.
#pragma once

#include <cstdint>

namespace convcore {
namespace dots {

// Whether the kernel pays at this instruction-set level (AVX-512).
bool available();
// Whether it runs on vectors at this level (AVX2 or AVX-512), for callers
// whose alternative loses more than AVX2's tiles do.
bool vector_kernel();

// y[m * N + j] = sum over images i and k < K of x[i * x_image + m * ldx + k] *
// w[i * w_image + j * ldw + k]; each element summed in the same order
// whatever `threads` is.
template <typename T>
void sum_of_products(int64_t images, int64_t M, int64_t N, int64_t K, const T* x, int64_t ldx,
                     int64_t x_image, const T* w, int64_t ldw, int64_t w_image, T* y,
                     int threads);

}  // namespace dots
}  // namespace convcore
