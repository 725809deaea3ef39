// Local response normalisation and batch normalisation over (N, C, S)
// (S = the product of the trailing dimensions), float32, contiguous.
// Per-channel sums are one block per channel: each thread sums a fixed
// strided subset, then cc_block_sum's fixed tree (deterministic).
#include "common.cuh"

// k + alpha / size * (sum of x^2 over channels [c - size/2, c + (size-1)/2]).
__device__ __forceinline__ float lrn_scale(const float* xs, int c, int C, int S, int size,
                                           float alpha, float k) {
    const int lo = max(c - size / 2, 0), hi = min(c + (size - 1) / 2, C - 1);
    float sq = 0.f;
    for (int q = lo; q <= hi; ++q) { const float v = xs[q * S]; sq += v * v; }
    return k + alpha / (float)size * sq;
}

// One thread per element: y = x * scale^-beta.
extern "C" __global__ void lrn_fwd(const float* __restrict__ x, float* __restrict__ y,
                                   int N, int C, int S, int size, float alpha, float beta,
                                   float k) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= N * C * S) return;
    const int s = i % S, c = (i / S) % C, n = i / (S * C);
    const float* xs = x + n * C * S + s;
    y[i] = x[i] * powf(lrn_scale(xs, c, C, S, size, alpha, k), -beta);
}

// gx[c] = gy[c] scale[c]^-beta - 2 alpha beta / size * x[c] *
//         sum over the q whose window holds c of gy[q] x[q] scale[q]^(-beta-1).
extern "C" __global__ void lrn_bwd(const float* __restrict__ gy, const float* __restrict__ x,
                                   float* __restrict__ gx, int N, int C, int S, int size,
                                   float alpha, float beta, float k) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= N * C * S) return;
    const int s = i % S, c = (i / S) % C, n = i / (S * C);
    const float* xs = x + n * C * S + s;
    const float* gs = gy + n * C * S + s;
    const int lo = max(c - (size - 1) / 2, 0), hi = min(c + size / 2, C - 1);
    float acc = 0.f;
    for (int q = lo; q <= hi; ++q)
        acc += gs[q * S] * xs[q * S] * powf(lrn_scale(xs, q, C, S, size, alpha, k), -beta - 1.f);
    gx[i] = gy[i] * powf(lrn_scale(xs, c, C, S, size, alpha, k), -beta) -
            2.f * alpha * beta / (float)size * x[i] * acc;
}

// Batch mean and biased variance of channel blockIdx.x (two passes: the
// variance sums squared deviations, which keeps it accurate). block 256.
extern "C" __global__ void bn_stats(const float* __restrict__ x, float* __restrict__ mean,
                                    float* __restrict__ var, int N, int C, int S) {
    __shared__ float buf[256];
    const int c = blockIdx.x, m = N * S;
    float s = 0.f;
    for (int e = threadIdx.x; e < m; e += blockDim.x) s += x[((e / S) * C + c) * S + e % S];
    const float mu = cc_block_sum(s, buf) / (float)m;
    float d2 = 0.f;
    for (int e = threadIdx.x; e < m; e += blockDim.x) {
        const float d = x[((e / S) * C + c) * S + e % S] - mu;
        d2 += d * d;
    }
    const float v = cc_block_sum(d2, buf) / (float)m;
    if (threadIdx.x == 0) { mean[c] = mu; var[c] = v; }
}

// y = (x - mean) / sqrt(var + eps) * weight + bias (weight/bias may be null).
extern "C" __global__ void bn_apply(const float* __restrict__ x, const float* __restrict__ mean,
                                    const float* __restrict__ var, const float* __restrict__ w,
                                    const float* __restrict__ b, float* __restrict__ y,
                                    int N, int C, int S, float eps, int has_w, int has_b) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= N * C * S) return;
    const int c = (i / S) % C;
    const float scale = (has_w ? w[c] : 1.f) / sqrtf(var[c] + eps);
    y[i] = (x[i] - mean[c]) * scale + (has_b ? b[c] : 0.f);
}

// running = (1 - momentum) running + momentum * batch (the variance made
// unbiased by m / (m - 1)). One thread per channel. Either may be null.
extern "C" __global__ void bn_update_running(float* rmean, float* rvar,
                                             const float* __restrict__ mean,
                                             const float* __restrict__ var, int C,
                                             float momentum, float unbias, int has_m, int has_v) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    if (has_m) rmean[c] = (1.f - momentum) * rmean[c] + momentum * mean[c];
    if (has_v) rvar[c] = (1.f - momentum) * rvar[c] + momentum * var[c] * unbias;
}

// gb[c] = sum gy, gw[c] = sum gy * xhat over channel c. block 256.
extern "C" __global__ void bn_bwd_reduce(const float* __restrict__ gy, const float* __restrict__ x,
                                         const float* __restrict__ mean,
                                         const float* __restrict__ var, float* __restrict__ gw,
                                         float* __restrict__ gb, int N, int C, int S, float eps) {
    __shared__ float buf[256];
    const int c = blockIdx.x, m = N * S;
    const float mu = mean[c], inv = 1.f / sqrtf(var[c] + eps);
    float sg = 0.f, sgx = 0.f;
    for (int e = threadIdx.x; e < m; e += blockDim.x) {
        const int i = ((e / S) * C + c) * S + e % S;
        sg += gy[i];
        sgx += gy[i] * (x[i] - mu) * inv;
    }
    sg = cc_block_sum(sg, buf);
    sgx = cc_block_sum(sgx, buf);
    if (threadIdx.x == 0) { gb[c] = sg; gw[c] = sgx; }
}

// gx: training (the statistics depend on x) w inv / m (m gy - gb - xhat gw);
// otherwise gy w inv.
extern "C" __global__ void bn_grad_input(const float* __restrict__ gy, const float* __restrict__ x,
                                         const float* __restrict__ mean,
                                         const float* __restrict__ var, const float* __restrict__ w,
                                         const float* __restrict__ gw, const float* __restrict__ gb,
                                         float* __restrict__ gx, int N, int C, int S, float eps,
                                         int has_w, int training) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= N * C * S) return;
    const int c = (i / S) % C;
    const float inv = 1.f / sqrtf(var[c] + eps), scale = (has_w ? w[c] : 1.f) * inv;
    if (training) {
        const float m = (float)(N * S), xhat = (x[i] - mean[c]) * inv;
        gx[i] = scale / m * (m * gy[i] - gb[c] - xhat * gw[c]);
    } else {
        gx[i] = gy[i] * scale;
    }
}
