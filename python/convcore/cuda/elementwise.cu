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

// gx = gy where x > 0, else 0.
extern "C" __global__ void relu_bwd(const float* __restrict__ gy, const float* __restrict__ x,
                                    float* __restrict__ gx, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    gx[i] = x[i] > 0.f ? gy[i] : 0.f;
}

// out[c] = sum over (n, hw) of g[n, c, hw]: one block per channel, each
// thread a fixed strided subset, then a fixed-order tree (deterministic).
// block 256 (the static buffer's size; a power of two).
extern "C" __global__ void channel_sum(const float* __restrict__ g, float* __restrict__ out,
                                       int N, int C, int HW) {
    __shared__ float buf[256];
    const int c = blockIdx.x;
    float s = 0.f;
    for (int e = threadIdx.x; e < N * HW; e += blockDim.x) {
        const int n = e / HW, hw = e - n * HW;
        s += g[(n * C + c) * HW + hw];
    }
    s = cc_block_sum(s, buf);
    if (threadIdx.x == 0) out[c] = s;
}
