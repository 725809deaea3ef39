// Convolution (NCHW, weight (K, C/groups, KH, KW)), float32, contiguous.
//
// conv2d_fwd / conv2d_bwd_data / conv2d_bwd_weight are implicit GEMMs: the
// im2col matrix is never stored; each block gathers the 16-row slice of it
// that the current step needs straight into shared memory (zero where the
// window falls in the padding), multiplies it with a 64x16 slice of the other
// operand, and keeps a 64x64 output tile in registers (4x4 per thread, 256
// threads). One group per blockIdx.z. The depthwise_* kernels are direct
// loops, one output element per thread (their GEMMs would be 1-row thin).
//
// Determinism: every output element is summed by one thread in a fixed
// order, except conv2d_bwd_weight with atomic=1 (opt-out, see Python side).
#include "common.cuh"

#define CV_BM CC_TILE
#define CV_BN CC_TILE
#define CV_BK CC_TILE_K
#define CV_THREADS CC_TILE_THREADS
#define cv_tile_fma cc_tile_fma

// y[n, g*Kg + m, oh, ow] = sum_r w[g*Kg + m, r] * xcol[r, (n, oh, ow)]
// (+ bias[m], then ReLU when relu != 0). r runs over (c, kh, kw) of the group.
// grid (ceil(N*OH*OW / 64), ceil(Kg / 64), groups), block 256.
extern "C" __global__ void __launch_bounds__(CV_THREADS)
conv2d_fwd(const float* __restrict__ x, const float* __restrict__ w,
           const float* __restrict__ bias, float* __restrict__ y,
           int N, int C, int H, int W, int K, int KH, int KW, int OH, int OW,
           int sh, int sw, int pt, int pl, int dh, int dw, int groups,
           int has_bias, int relu) {
    __shared__ float As[CV_BK][CV_BM];
    __shared__ float Bs[CV_BK][CV_BN];
    const int Cg = C / groups, Kg = K / groups, g = blockIdx.z;
    const int P = N * OH * OW, R = Cg * KH * KW, KHW = KH * KW;
    const int p0 = blockIdx.x * CV_BN, m0 = blockIdx.y * CV_BM;
    const int t = threadIdx.x, tx = t % 16, ty = t / 16;

    // The im2col column this thread gathers is fixed for the whole loop.
    const int bcol = t % CV_BN, brow = t / CV_BN;  // brow in 0..3
    const int p = p0 + bcol;
    int n = 0, oh = 0, ow = 0;
    if (p < P) { n = p / (OH * OW); const int rem = p - n * OH * OW; oh = rem / OW; ow = rem - oh * OW; }
    const int ih0 = oh * sh - pt, iw0 = ow * sw - pl;
    const float* xg = x + (n * C + g * Cg) * H * W;
    const int acol = t % CV_BK, arow = t / CV_BK;  // arow in 0..15
    const float* wg = w + g * Kg * R;

    float acc[4][4] = {{0.f}};
    for (int k0 = 0; k0 < R; k0 += CV_BK) {
        for (int i = 0; i < 4; ++i) {
            const int m = arow + 16 * i, k = k0 + acol;
            As[acol][m] = (m0 + m < Kg && k < R) ? wg[(m0 + m) * R + k] : 0.f;
        }
        for (int i = 0; i < 4; ++i) {
            const int kr = brow + 4 * i, k = k0 + kr;
            float v = 0.f;
            if (p < P && k < R) {
                const int c = k / KHW, rk = k - c * KHW, kh = rk / KW, kw = rk - kh * KW;
                const int ih = ih0 + kh * dh, iw = iw0 + kw * dw;
                if (ih >= 0 && ih < H && iw >= 0 && iw < W) v = xg[(c * H + ih) * W + iw];
            }
            Bs[kr][bcol] = v;
        }
        __syncthreads();
        cv_tile_fma(As, Bs, acc, tx, ty);
        __syncthreads();
    }
    for (int i = 0; i < 4; ++i) {
        const int m = m0 + ty + 16 * i;
        if (m >= Kg) continue;
        const int k = g * Kg + m;
        const float b = has_bias ? bias[k] : 0.f;
        for (int j = 0; j < 4; ++j) {
            const int q = p0 + tx + 16 * j;
            if (q >= P) continue;
            const int qn = q / (OH * OW), qr = q - qn * OH * OW;
            float v = acc[i][j] + b;
            if (relu && v < 0.f) v = 0.f;  // NaN stays NaN, as relu()
            y[(qn * K + k) * OH * OW + qr] = v;
        }
    }
}

// gx[n, g*Cg + m, ih, iw] = sum_r wT[m, r] * gycol[r, (n, ih, iw)], r over
// (k, kh, kw) of the group: the taps (oh, ow) whose window covers (ih, iw).
// grid (ceil(N*H*W / 64), ceil(Cg / 64), groups), block 256.
extern "C" __global__ void __launch_bounds__(CV_THREADS)
conv2d_bwd_data(const float* __restrict__ gy, const float* __restrict__ w,
                float* __restrict__ gx,
                int N, int C, int H, int W, int K, int KH, int KW, int OH, int OW,
                int sh, int sw, int pt, int pl, int dh, int dw, int groups) {
    __shared__ float As[CV_BK][CV_BM];
    __shared__ float Bs[CV_BK][CV_BN];
    const int Cg = C / groups, Kg = K / groups, g = blockIdx.z;
    const int Q = N * H * W, R = Kg * KH * KW, KHW = KH * KW;
    const int q0 = blockIdx.x * CV_BN, m0 = blockIdx.y * CV_BM;
    const int t = threadIdx.x, tx = t % 16, ty = t / 16;

    const int bcol = t % CV_BN, brow = t / CV_BN;
    const int q = q0 + bcol;
    int n = 0, ih = 0, iw = 0;
    if (q < Q) { n = q / (H * W); const int rem = q - n * H * W; ih = rem / W; iw = rem - ih * W; }
    const float* gyg = gy + (n * K + g * Kg) * OH * OW;
    const int acol = t % CV_BK, arow = t / CV_BK;
    const float* wg = w + g * Kg * Cg * KHW;

    float acc[4][4] = {{0.f}};
    for (int k0 = 0; k0 < R; k0 += CV_BK) {
        for (int i = 0; i < 4; ++i) {
            const int m = arow + 16 * i, r = k0 + acol;
            float v = 0.f;
            if (m0 + m < Cg && r < R) {
                const int k = r / KHW, rk = r - k * KHW;
                v = wg[(k * Cg + m0 + m) * KHW + rk];
            }
            As[acol][m] = v;
        }
        for (int i = 0; i < 4; ++i) {
            const int kr = brow + 4 * i, r = k0 + kr;
            float v = 0.f;
            if (q < Q && r < R) {
                const int k = r / KHW, rk = r - k * KHW, kh = rk / KW, kw = rk - kh * KW;
                const int ohs = ih + pt - kh * dh, ows = iw + pl - kw * dw;
                if (ohs >= 0 && ows >= 0 && ohs % sh == 0 && ows % sw == 0) {
                    const int oh = ohs / sh, ow = ows / sw;
                    if (oh < OH && ow < OW) v = gyg[(k * OH + oh) * OW + ow];
                }
            }
            Bs[kr][bcol] = v;
        }
        __syncthreads();
        cv_tile_fma(As, Bs, acc, tx, ty);
        __syncthreads();
    }
    for (int i = 0; i < 4; ++i) {
        const int m = m0 + ty + 16 * i;
        if (m >= Cg) continue;
        for (int j = 0; j < 4; ++j) {
            const int qq = q0 + tx + 16 * j;
            if (qq >= Q) continue;
            const int qn = qq / (H * W), qr = qq - qn * H * W;
            gx[(qn * C + g * Cg + m) * H * W + qr] = acc[i][j];
        }
    }
}

// gw[g*Kg + m, r] = sum_p gy[(n, g*Kg + m, oh, ow) = p] * xcol[r, p], r over
// (c, kh, kw). The sum over p = (n, oh, ow) is split in `splits` fixed chunks
// (blockIdx.z = group * splits + split) so that small weights still fill the
// GPU: atomic == 0 writes chunk s to out + s * K * R (a workspace, summed in
// order by sum_splits: deterministic); atomic == 1 adds into out with
// atomicAdd (out zeroed first; faster, order varies). With splits == 1 and
// atomic == 0, out is gw itself.
// grid (ceil(R / 64), ceil(Kg / 64), groups * splits), block 256.
extern "C" __global__ void __launch_bounds__(CV_THREADS)
conv2d_bwd_weight(const float* __restrict__ gy, const float* __restrict__ x,
                  float* __restrict__ out,
                  int N, int C, int H, int W, int K, int KH, int KW, int OH, int OW,
                  int sh, int sw, int pt, int pl, int dh, int dw, int groups,
                  int splits, int chunk, int atomic) {
    __shared__ float As[CV_BK][CV_BM];
    __shared__ float Bs[CV_BK][CV_BN];
    const int Cg = C / groups, Kg = K / groups;
    const int g = blockIdx.z / splits, split = blockIdx.z - g * splits;
    const int P = N * OH * OW, OHW = OH * OW, R = Cg * KH * KW, KHW = KH * KW;
    const int r0 = blockIdx.x * CV_BN, m0 = blockIdx.y * CV_BM;
    const int pbeg = split * chunk;
    const int pend = pbeg + chunk < P ? pbeg + chunk : P;
    const int t = threadIdx.x, tx = t % 16, ty = t / 16;

    // The weight column (c, kh, kw) this thread gathers is fixed.
    const int bcol = t % CV_BN, brow = t / CV_BN;
    const int r = r0 + bcol;
    int c = 0, kh = 0, kw = 0;
    if (r < R) { c = r / KHW; const int rk = r - c * KHW; kh = rk / KW; kw = rk - kh * KW; }
    const int acol = t % CV_BK, arow = t / CV_BK;

    float acc[4][4] = {{0.f}};
    for (int k0 = pbeg; k0 < pend; k0 += CV_BK) {
        {
            const int p = k0 + acol;
            int n = 0, rem = 0;
            if (p < pend) { n = p / OHW; rem = p - n * OHW; }
            for (int i = 0; i < 4; ++i) {
                const int m = arow + 16 * i;
                As[acol][m] = (p < pend && m0 + m < Kg)
                    ? gy[(n * K + g * Kg + m0 + m) * OHW + rem] : 0.f;
            }
        }
        for (int i = 0; i < 4; ++i) {
            const int kr = brow + 4 * i, p = k0 + kr;
            float v = 0.f;
            if (p < pend && r < R) {
                const int n = p / OHW, rem = p - n * OHW, oh = rem / OW, ow = rem - oh * OW;
                const int ih = oh * sh - pt + kh * dh, iw = ow * sw - pl + kw * dw;
                if (ih >= 0 && ih < H && iw >= 0 && iw < W)
                    v = x[((n * C + g * Cg + c) * H + ih) * W + iw];
            }
            Bs[kr][bcol] = v;
        }
        __syncthreads();
        cv_tile_fma(As, Bs, acc, tx, ty);
        __syncthreads();
    }
    float* o = atomic ? out : out + split * K * R;
    for (int i = 0; i < 4; ++i) {
        const int m = m0 + ty + 16 * i;
        if (m >= Kg) continue;
        for (int j = 0; j < 4; ++j) {
            const int rr = r0 + tx + 16 * j;
            if (rr >= R) continue;
            float* dst = o + (g * Kg + m) * R + rr;
            if (atomic) atomicAdd(dst, acc[i][j]);
            else *dst = acc[i][j];
        }
    }
}

// out[i] = sum over s = 0, 1, ... of ws[s * n + i], in that order.
extern "C" __global__ void sum_splits(const float* __restrict__ ws, float* __restrict__ out,
                                      int splits, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float s = 0.f;
    for (int k = 0; k < splits; ++k) s += ws[k * n + i];
    out[i] = s;
}

// Depthwise (groups == C, K == C * mult, weight (K, 1, KH, KW)): one thread
// per output element. grid ceil(N*K*OH*OW / 256), block 256.
extern "C" __global__ void depthwise_fwd(const float* __restrict__ x, const float* __restrict__ w,
                                         const float* __restrict__ bias, float* __restrict__ y,
                                         int N, int C, int H, int W, int K, int KH, int KW,
                                         int OH, int OW, int sh, int sw, int pt, int pl,
                                         int dh, int dw, int has_bias, int relu) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= N * K * OH * OW) return;
    const int ow = i % OW, oh = (i / OW) % OH, k = (i / (OW * OH)) % K, n = i / (OW * OH * K);
    const int c = k / (K / C);
    const float* xc = x + (n * C + c) * H * W;
    const float* wk = w + k * KH * KW;
    float s = 0.f;
    for (int kh = 0; kh < KH; ++kh) {
        const int ih = oh * sh - pt + kh * dh;
        if (ih < 0 || ih >= H) continue;
        for (int kw = 0; kw < KW; ++kw) {
            const int iw = ow * sw - pl + kw * dw;
            if (iw >= 0 && iw < W) s += xc[ih * W + iw] * wk[kh * KW + kw];
        }
    }
    if (has_bias) s += bias[k];
    if (relu && s < 0.f) s = 0.f;
    y[i] = s;
}

// One thread per input element, gathering the taps that read it.
extern "C" __global__ void depthwise_bwd_data(const float* __restrict__ gy,
                                              const float* __restrict__ w, float* __restrict__ gx,
                                              int N, int C, int H, int W, int K, int KH, int KW,
                                              int OH, int OW, int sh, int sw, int pt, int pl,
                                              int dh, int dw) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= N * C * H * W) return;
    const int iw = i % W, ih = (i / W) % H, c = (i / (W * H)) % C, n = i / (W * H * C);
    const int mult = K / C;
    float s = 0.f;
    for (int m = 0; m < mult; ++m) {
        const int k = c * mult + m;
        const float* gyk = gy + (n * K + k) * OH * OW;
        for (int kh = 0; kh < KH; ++kh) {
            const int ohs = ih + pt - kh * dh;
            if (ohs < 0 || ohs % sh != 0 || ohs / sh >= OH) continue;
            for (int kw = 0; kw < KW; ++kw) {
                const int ows = iw + pl - kw * dw;
                if (ows < 0 || ows % sw != 0 || ows / sw >= OW) continue;
                s += gyk[(ohs / sh) * OW + ows / sw] * w[(k * KH + kh) * KW + kw];
            }
        }
    }
    gx[i] = s;
}

// One block per weight element (k, kh, kw), blockDim.x a power of two: each
// thread sums a fixed strided subset of (n, oh, ow), then a fixed-order tree.
extern "C" __global__ void depthwise_bwd_weight(const float* __restrict__ gy,
                                                const float* __restrict__ x, float* __restrict__ gw,
                                                int N, int C, int H, int W, int K, int KH, int KW,
                                                int OH, int OW, int sh, int sw, int pt, int pl,
                                                int dh, int dw) {
    __shared__ float buf[256];
    const int e = blockIdx.x;  // (k * KH + kh) * KW + kw
    const int kw = e % KW, kh = (e / KW) % KH, k = e / (KW * KH);
    const int c = k / (K / C);
    const int total = N * OH * OW;
    float s = 0.f;
    for (int p = threadIdx.x; p < total; p += blockDim.x) {
        const int ow = p % OW, oh = (p / OW) % OH, n = p / (OW * OH);
        const int ih = oh * sh - pt + kh * dh, iw = ow * sw - pl + kw * dw;
        if (ih >= 0 && ih < H && iw >= 0 && iw < W)
            s += gy[((n * K + k) * OH + oh) * OW + ow] * x[((n * C + c) * H + ih) * W + iw];
    }
    s = cc_block_sum(s, buf);
    if (threadIdx.x == 0) gw[e] = s;
}
