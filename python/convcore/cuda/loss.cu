// Softmax cross-entropy of logits (N, classes) against int64 targets, with
// label smoothing s (target distribution (1 - s) one-hot + s / classes).
// One block per row (256 threads): max, sum of exp, then the row's loss and
// the gradient scale * (softmax - target). Fixed-order reductions.
#include "common.cuh"

extern "C" __global__ void xent_rows(const float* __restrict__ logits,
                                     const long long* __restrict__ targets,
                                     float* __restrict__ row_loss, float* __restrict__ grad,
                                     int N, int K, float smoothing, float scale) {
    __shared__ float buf[256];
    const int r = blockIdx.x, t = threadIdx.x;
    const float* z = logits + r * K;
    float mx = CC_NEG_INF;
    for (int j = t; j < K; j += blockDim.x) mx = fmaxf(mx, z[j]);
    // block max, by the same fixed tree as cc_block_sum
    buf[t] = mx;
    __syncthreads();
    for (int half = blockDim.x / 2; half > 0; half /= 2) {
        if (t < half) buf[t] = fmaxf(buf[t], buf[t + half]);
        __syncthreads();
    }
    mx = buf[0];
    __syncthreads();
    float se = 0.f, sz = 0.f;
    for (int j = t; j < K; j += blockDim.x) { se += expf(z[j] - mx); sz += z[j] - mx; }
    const float lse = logf(cc_block_sum(se, buf));
    const float sum_shifted = cc_block_sum(sz, buf);
    // An out-of-range target (checked on the host only for host targets,
    // to keep device targets free of a sync) makes the row NaN, never an
    // out-of-bounds read.
    const long long target = targets[r];
    const bool valid = target >= 0 && target < K;
    const float on = 1.f - smoothing, off = smoothing / (float)K;
    // loss = -sum_j t_j log p_j, log p_j = z_j - mx - lse
    if (t == 0)
        row_loss[r] = valid ? -(on * (z[target] - mx - lse) + off * (sum_shifted - (float)K * lse))
                            : CC_NAN;
    for (int j = t; j < K; j += blockDim.x) {
        const float tj = off + (j == target ? on : 0.f);
        grad[r * K + j] = valid ? scale * (expf(z[j] - mx - lse) - tj) : CC_NAN;
    }
}

// out[0] = scale * sum of v[0..n), one block of 256 in a fixed order.
extern "C" __global__ void sum_all(const float* __restrict__ v, float* __restrict__ out, int n,
                                   float scale) {
    __shared__ float buf[256];
    float s = 0.f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) s += v[i];
    s = cc_block_sum(s, buf);
    if (threadIdx.x == 0) out[0] = s * scale;
}
