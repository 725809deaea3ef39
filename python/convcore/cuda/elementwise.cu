// Elementwise ops and the per-channel sum (conv bias gradient). float32,
// contiguous. One thread per element, grid-stride free: grid ceil(n / 256).
#include "common.cuh"

// y = max(x, 0), NaN stays NaN (y may be x: in place).
extern "C" __global__ void relu_fwd(const float* x, float* y, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const float v = x[i];
    y[i] = v < 0.f ? 0.f : v;
}

// gx = 0 where x <= 0, else gy: a NaN input passes the gradient, as on the
// CPU and in PyTorch (threshold_backward).
extern "C" __global__ void relu_bwd(const float* __restrict__ gy, const float* __restrict__ x,
                                    float* __restrict__ gx, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    gx[i] = x[i] <= 0.f ? 0.f : gy[i];
}

// out[split * C + c] = sum of g[n, c, hw] over the split-th chunk of `chunk`
// positions e = n * HW + hw: grid (C, splits), each thread a fixed strided
// subset of its block's chunk, then a fixed-order tree (deterministic). With
// one split this is the whole sum; more splits fill the GPU when channels are
// few and images large, and conv.cu's sum_splits adds them in order.
// block 256 (the static buffer's size; a power of two).
extern "C" __global__ void channel_sum(const float* __restrict__ g, float* __restrict__ out,
                                       int N, int C, int HW, int chunk) {
    __shared__ float buf[256];
    const int c = blockIdx.x, split = blockIdx.y;
    const int beg = split * chunk, total = N * HW;
    const int end = total - beg < chunk ? total : beg + chunk;
    float s = 0.f;
    for (int e = beg + threadIdx.x; e < end; e += blockDim.x) {
        const int n = e / HW, hw = e - n * HW;
        s += g[(n * C + c) * HW + hw];
    }
    s = cc_block_sum(s, buf);
    if (threadIdx.x == 0) out[split * C + c] = s;
}
