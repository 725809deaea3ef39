// A tiled GEMM of our own for the fully connected layer and its gradients:
// C[m, n] = sum_k A(m, k) * B(k, n) (+ bias[n], then ReLU when relu != 0),
// A and B read through (row, column) strides, so that x @ W^T, gy @ W and
// gy^T @ x are the same kernel. C is contiguous (M, N). Each output is
// summed by one thread in k order: deterministic.
// grid (ceil(N / 64), ceil(M / 64)), block 256.
#include "common.cuh"

extern "C" __global__ void __launch_bounds__(CC_TILE_THREADS)
gemm(const float* __restrict__ A, const float* __restrict__ B, const float* __restrict__ bias,
     float* __restrict__ Cm, int M, int N, int K, int sam, int sak, int sbk, int sbn,
     int has_bias, int relu) {
    __shared__ float As[CC_TILE_K][CC_TILE];
    __shared__ float Bs[CC_TILE_K][CC_TILE];
    const int m0 = blockIdx.y * CC_TILE, n0 = blockIdx.x * CC_TILE;
    const int t = threadIdx.x, tx = t % 16, ty = t / 16;
    const int acol = t % CC_TILE_K, arow = t / CC_TILE_K;  // k, m
    const int bcol = t % CC_TILE, brow = t / CC_TILE;      // n, k
    float acc[4][4] = {{0.f}};
    for (int k0 = 0; k0 < K; k0 += CC_TILE_K) {
        for (int i = 0; i < 4; ++i) {
            const int m = m0 + arow + 16 * i, k = k0 + acol;
            As[acol][arow + 16 * i] = (m < M && k < K) ? A[m * sam + k * sak] : 0.f;
        }
        for (int i = 0; i < 4; ++i) {
            const int k = k0 + brow + 4 * i, n = n0 + bcol;
            Bs[brow + 4 * i][bcol] = (k < K && n < N) ? B[k * sbk + n * sbn] : 0.f;
        }
        __syncthreads();
        cc_tile_fma(As, Bs, acc, tx, ty);
        __syncthreads();
    }
    for (int i = 0; i < 4; ++i) {
        const int m = m0 + ty + 16 * i;
        if (m >= M) continue;
        for (int j = 0; j < 4; ++j) {
            const int n = n0 + tx + 16 * j;
            if (n >= N) continue;
            float v = acc[i][j] + (has_bias ? bias[n] : 0.f);
            if (relu && v < 0.f) v = 0.f;
            Cm[m * N + n] = v;
        }
    }
}

// out[n] = sum over rows m of g[m, n] (the bias gradient of linear), one
// thread per column summing rows in order. grid ceil(N / 256), block 256.
extern "C" __global__ void column_sum(const float* __restrict__ g, float* __restrict__ out,
                                      int M, int N) {
    const int n = blockIdx.x * blockDim.x + threadIdx.x;
    if (n >= N) return;
    float s = 0.f;
    for (int m = 0; m < M; ++m) s += g[m * N + n];
    out[n] = s;
}
