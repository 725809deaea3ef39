// Convolution (NCHW, weight (K, C/groups, KH, KW)), float32, contiguous.
//
// conv2d_fwd / conv2d_grad_input / conv2d_grad_weight are implicit GEMMs on the
// engine of common.cuh (cc_gemm_tile): the im2col matrix is never stored;
// each thread gathers its share of the next BK-slice of it straight from the
// input (zero where the window falls in the padding) into registers, then
// shared memory. One group per blockIdx.z. Each comes in two tile shapes:
// `name` (64 x 64) and `name_big` (128 x 128), chosen on the host. The
// depthwise_* kernels are direct loops, one output element per thread
// (their GEMMs would be one row thin).
//
// Determinism: every output element is summed by one thread in a fixed
// order, except conv2d_grad_weight with atomic=1 (opt-out, see Python side).
#include "common.cuh"

// A = weight (rows: output channels m0.., reduction r = (c, kh, kw)),
// B = im2col(x) column p = (n, oh, ow) of this thread. r decodes to
// d = {offset of (c, kh*dh, kw*dw) in the image, kh*dh, kw*dw}.
struct ConvFwdOp {
    const float* w;  // weight rows of this tile: w + (g * Kg + m0) * R
    const float* x;  // input image n, channels of group g
    int rows, R, H, W, KW, KHW, ih0, iw0, base, dh, dw, valid;  // base = ih0 * W + iw0
    __device__ __forceinline__ void decode(int k, int* d) const {
        const int c = k / KHW, rk = k - c * KHW, kh = rk / KW, kw = rk - kh * KW;
        d[1] = kh * dh;
        d[2] = kw * dw;
        d[0] = (c * H + d[1]) * W + d[2];
    }
    __device__ __forceinline__ float a(int m, int k, const int*) const {
        return m < rows ? w[m * R + k] : 0.f;
    }
    __device__ __forceinline__ float b(int, const int* d) const {
        const int ih = ih0 + d[1], iw = iw0 + d[2];
        return (valid && ih >= 0 && ih < H && iw >= 0 && iw < W) ? x[base + d[0]] : 0.f;
    }
};

// y[n, g*Kg + m, oh, ow] = sum_r w[g*Kg + m, r] * xcol[r, (n, oh, ow)]
// (+ bias, then ReLU when relu != 0).
// grid (ceil(N*OH*OW / BN), ceil(Kg / BM), groups), block 256.
template <int BM, int BN, int BK>
__device__ __forceinline__ void conv_fwd(const float* x, const float* w, const float* bias,
                                         float* y, int N, int C, int H, int W, int K, int KH,
                                         int KW, int OH, int OW, int sh, int sw, int pt, int pl,
                                         int dh, int dw, int groups, int has_bias, int relu) {
    constexpr int TM = BM / 16, TN = BN / 16;
    const int Cg = C / groups, Kg = K / groups, g = blockIdx.z;
    const int P = N * OH * OW, R = Cg * KH * KW;
    const int p0 = blockIdx.x * BN, m0 = blockIdx.y * BM;
    const int p = p0 + threadIdx.x % BN;
    int n = 0, oh = 0, ow = 0;
    if (p < P) { n = p / (OH * OW); const int rem = p - n * OH * OW; oh = rem / OW; ow = rem - oh * OW; }
    ConvFwdOp op;
    op.w = w + (g * Kg + m0) * R;
    op.ih0 = oh * sh - pt; op.iw0 = ow * sw - pl; op.base = op.ih0 * W + op.iw0;
    op.x = x + (n * C + g * Cg) * H * W;
    op.rows = Kg - m0; op.R = R; op.H = H; op.W = W; op.KW = KW; op.KHW = KH * KW;
    op.dh = dh; op.dw = dw; op.valid = p < P;
    float acc[TM][TN];
    cc_gemm_tile<BM, BN, BK>(op, 0, R, acc);
    cc_gemm_store<BM, BN>(acc, m0, p0, Kg, P, [&](int m, int q, float v) {
        const int k = g * Kg + m;
        const int qn = q / (OH * OW), qr = q - qn * OH * OW;
        v += has_bias ? bias[k] : 0.f;
        if (relu && v < 0.f) v = 0.f;  // NaN stays NaN, as relu()
        y[(qn * K + k) * OH * OW + qr] = v;
    });
}

extern "C" __global__ void __launch_bounds__(CC_THREADS)
conv2d_fwd(const float* __restrict__ x, const float* __restrict__ w,
           const float* __restrict__ bias, float* __restrict__ y,
           int N, int C, int H, int W, int K, int KH, int KW, int OH, int OW,
           int sh, int sw, int pt, int pl, int dh, int dw, int groups,
           int has_bias, int relu) {
    conv_fwd<CC_SMALL_BM, CC_SMALL_BN, CC_SMALL_BK>(x, w, bias, y, N, C, H, W, K, KH, KW, OH,
                                                   OW, sh, sw, pt, pl, dh, dw, groups,
                                                   has_bias, relu);
}

extern "C" __global__ void __launch_bounds__(CC_THREADS)
conv2d_fwd_big(const float* __restrict__ x, const float* __restrict__ w,
               const float* __restrict__ bias, float* __restrict__ y,
               int N, int C, int H, int W, int K, int KH, int KW, int OH, int OW,
               int sh, int sw, int pt, int pl, int dh, int dw, int groups,
               int has_bias, int relu) {
    conv_fwd<CC_BIG_BM, CC_BIG_BN, CC_BIG_BK>(x, w, bias, y, N, C, H, W, K, KH, KW, OH, OW,
                                             sh, sw, pt, pl, dh, dw, groups, has_bias, relu);
}

// A = weight transposed (rows: input channels m0.. of the group, reduction
// r = (k, kh, kw) over the group's output channels), B = the column
// q = (n, ih, iw) of this thread: the gy taps whose window covers (ih, iw).
// r decodes to d = {k * OH * OW, kh * dh, kw * dw, k * Cg * KHW + rk}.
struct ConvBwdDataOp {
    const float* w;   // w + (g * Kg * Cg + m0) * KHW
    const float* gy;  // gy image n, channels of group g
    int rows, Cg, KHW, KW, OH, OW, ih_pt, iw_pl, sh, sw, dh, dw, valid;
    __device__ __forceinline__ void decode(int r, int* d) const {
        const int k = r / KHW, rk = r - k * KHW, kh = rk / KW, kw = rk - kh * KW;
        d[0] = k * OH * OW;
        d[1] = kh * dh;
        d[2] = kw * dw;
        d[3] = k * Cg * KHW + rk;
    }
    __device__ __forceinline__ float a(int m, int, const int* d) const {
        return m < rows ? w[d[3] + m * KHW] : 0.f;
    }
    __device__ __forceinline__ float b(int, const int* d) const {
        int oh = ih_pt - d[1], ow = iw_pl - d[2];
        if (!valid || oh < 0 || ow < 0) return 0.f;
        if (sh != 1) {  // a stride-1 layer needs no division
            if (oh % sh != 0) return 0.f;
            oh /= sh;
        }
        if (sw != 1) {
            if (ow % sw != 0) return 0.f;
            ow /= sw;
        }
        return (oh < OH && ow < OW) ? gy[d[0] + oh * OW + ow] : 0.f;
    }
};

// gx[n, g*Cg + m, ih, iw] = sum_r wT[m, r] * gycol[r, (n, ih, iw)].
// grid (ceil(N*H*W / BN), ceil(Cg / BM), groups), block 256.
template <int BM, int BN, int BK>
__device__ __forceinline__ void conv_grad_input(const float* gy, const float* w, float* gx,
                                                int N, int C, int H, int W, int K, int KH, int KW,
                                                int OH, int OW, int sh, int sw, int pt, int pl,
                                                int dh, int dw, int groups) {
    constexpr int TM = BM / 16, TN = BN / 16;
    const int Cg = C / groups, Kg = K / groups, g = blockIdx.z, KHW = KH * KW;
    const int Q = N * H * W, R = Kg * KHW;
    const int q0 = blockIdx.x * BN, m0 = blockIdx.y * BM;
    const int q = q0 + threadIdx.x % BN;
    int n = 0, ih = 0, iw = 0;
    if (q < Q) { n = q / (H * W); const int rem = q - n * H * W; ih = rem / W; iw = rem - ih * W; }
    ConvBwdDataOp op;
    op.w = w + (g * Kg * Cg + m0) * KHW;
    op.gy = gy + (n * K + g * Kg) * OH * OW;
    op.rows = Cg - m0; op.Cg = Cg; op.KHW = KHW; op.KW = KW; op.OH = OH; op.OW = OW;
    op.ih_pt = ih + pt; op.iw_pl = iw + pl; op.sh = sh; op.sw = sw; op.dh = dh; op.dw = dw;
    op.valid = q < Q;
    float acc[TM][TN];
    cc_gemm_tile<BM, BN, BK>(op, 0, R, acc);
    cc_gemm_store<BM, BN>(acc, m0, q0, Cg, Q, [&](int m, int qq, float v) {
        const int qn = qq / (H * W), qr = qq - qn * H * W;
        gx[(qn * C + g * Cg + m) * H * W + qr] = v;
    });
}

extern "C" __global__ void __launch_bounds__(CC_THREADS)
conv2d_grad_input(const float* __restrict__ gy, const float* __restrict__ w,
                  float* __restrict__ gx,
                  int N, int C, int H, int W, int K, int KH, int KW, int OH, int OW,
                  int sh, int sw, int pt, int pl, int dh, int dw, int groups) {
    conv_grad_input<CC_SMALL_BM, CC_SMALL_BN, CC_SMALL_BK>(gy, w, gx, N, C, H, W, K, KH, KW, OH,
                                                          OW, sh, sw, pt, pl, dh, dw, groups);
}

extern "C" __global__ void __launch_bounds__(CC_THREADS)
conv2d_grad_input_big(const float* __restrict__ gy, const float* __restrict__ w,
                      float* __restrict__ gx,
                      int N, int C, int H, int W, int K, int KH, int KW, int OH, int OW,
                      int sh, int sw, int pt, int pl, int dh, int dw, int groups) {
    conv_grad_input<CC_BIG_BM, CC_BIG_BN, CC_BIG_BK>(gy, w, gx, N, C, H, W, K, KH, KW, OH, OW,
                                                    sh, sw, pt, pl, dh, dw, groups);
}

// A = gy (rows: output channels m0.. of the group, reduction p = (n, oh, ow)),
// B = im2col(x) row (c, kh, kw) of this thread, along p. p decodes to
// d = {offset of (n, oh, ow) in gy less the channel, n * C * H * W,
//      oh * sh, ow * sw}.
struct ConvBwdWeightOp {
    const float* gy;  // gy + (g * Kg + m0) * OHW
    const float* x;   // x + (g * Cg + c) * H * W
    int rows, K, C, H, W, OW, OHW, sh, sw, kh_pt, kw_pl, valid;
    __device__ __forceinline__ void decode(int p, int* d) const {
        const int n = p / OHW, rem = p - n * OHW, oh = rem / OW, ow = rem - oh * OW;
        d[0] = n * K * OHW + rem;
        d[1] = n * C * H * W;
        d[2] = oh * sh;
        d[3] = ow * sw;
    }
    __device__ __forceinline__ float a(int m, int, const int* d) const {
        return m < rows ? gy[d[0] + m * OHW] : 0.f;
    }
    __device__ __forceinline__ float b(int, const int* d) const {
        const int ih = d[2] + kh_pt, iw = d[3] + kw_pl;
        return (valid && ih >= 0 && ih < H && iw >= 0 && iw < W) ? x[d[1] + ih * W + iw] : 0.f;
    }
};

// gw[g*Kg + m, r] = sum_p gy[(n, g*Kg + m, oh, ow) = p] * xcol[r, p], r over
// (c, kh, kw). The sum over p = (n, oh, ow) is split in `splits` fixed chunks
// (blockIdx.z = group * splits + split) so that small weights still fill the
// GPU: atomic == 0 writes chunk s to out + s * K * R (a workspace, summed in
// order by sum_splits: deterministic); atomic == 1 adds into out with
// atomicAdd (out zeroed first; faster, order varies). With splits == 1 and
// atomic == 0, out is gw itself.
// grid (ceil(R / BN), ceil(Kg / BM), groups * splits), block 256.
template <int BM, int BN, int BK>
__device__ __forceinline__ void conv_grad_weight(const float* gy, const float* x, float* out,
                                                 int N, int C, int H, int W, int K, int KH,
                                                 int KW, int OH, int OW, int sh, int sw, int pt,
                                                 int pl, int dh, int dw, int groups, int splits,
                                                 int chunk, int atomic) {
    constexpr int TM = BM / 16, TN = BN / 16;
    const int Cg = C / groups, Kg = K / groups, KHW = KH * KW;
    const int g = blockIdx.z / splits, split = blockIdx.z - g * splits;
    const int P = N * OH * OW, R = Cg * KHW;
    const int r0 = blockIdx.x * BN, m0 = blockIdx.y * BM;
    const int pbeg = split * chunk;
    const int pend = pbeg + chunk < P ? pbeg + chunk : P;
    const int r = r0 + threadIdx.x % BN;
    int c = 0, kh = 0, kw = 0;
    if (r < R) { c = r / KHW; const int rk = r - c * KHW; kh = rk / KW; kw = rk - kh * KW; }
    ConvBwdWeightOp op;
    op.gy = gy + (g * Kg + m0) * OH * OW;
    op.x = x + (g * Cg + c) * H * W;
    op.rows = Kg - m0; op.K = K; op.C = C; op.H = H; op.W = W; op.OW = OW; op.OHW = OH * OW;
    op.sh = sh; op.sw = sw; op.kh_pt = kh * dh - pt; op.kw_pl = kw * dw - pl; op.valid = r < R;
    float acc[TM][TN];
    cc_gemm_tile<BM, BN, BK>(op, pbeg, pend, acc);
    float* o = atomic ? out : out + split * K * R;
    cc_gemm_store<BM, BN>(acc, m0, r0, Kg, R, [&](int m, int rr, float v) {
        float* dst = o + (g * Kg + m) * R + rr;
        if (atomic) atomicAdd(dst, v);
        else *dst = v;
    });
}

extern "C" __global__ void __launch_bounds__(CC_THREADS)
conv2d_grad_weight(const float* __restrict__ gy, const float* __restrict__ x,
                   float* __restrict__ out,
                   int N, int C, int H, int W, int K, int KH, int KW, int OH, int OW,
                   int sh, int sw, int pt, int pl, int dh, int dw, int groups,
                   int splits, int chunk, int atomic) {
    conv_grad_weight<CC_SMALL_BM, CC_SMALL_BN, CC_SMALL_BK>(gy, x, out, N, C, H, W, K, KH, KW,
                                                           OH, OW, sh, sw, pt, pl, dh, dw,
                                                           groups, splits, chunk, atomic);
}

extern "C" __global__ void __launch_bounds__(CC_THREADS)
conv2d_grad_weight_big(const float* __restrict__ gy, const float* __restrict__ x,
                       float* __restrict__ out,
                       int N, int C, int H, int W, int K, int KH, int KW, int OH, int OW,
                       int sh, int sw, int pt, int pl, int dh, int dw, int groups,
                       int splits, int chunk, int atomic) {
    conv_grad_weight<CC_BIG_BM, CC_BIG_BN, CC_BIG_BK>(gy, x, out, N, C, H, W, K, KH, KW, OH, OW,
                                                     sh, sw, pt, pl, dh, dw, groups, splits,
                                                     chunk, atomic);
}

// out[i] = sum over s = 0, 1, ... of ws[s * n + i], in that order.
extern "C" __global__ void sum_splits(const float* __restrict__ ws, float* __restrict__ out,
                                      int splits, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = cc_column_sum(ws, splits, n, i);
}

// gx of layers with few input channels per group (first layers' 1-3,
// ResNeXt's 4): as a GEMM, their tile would be mostly empty rows (3 of 128),
// and a strided layer's gathered taps mostly zeros. One thread per input
// position (n, group, ih, iw) computes all Cg <= CC_DIRECT_MAX_CG channels of
// the group, summing in a fixed order over the taps that read the position
// (tap outer, the group's output channels inner). Threads are ordered by
// stride phase (ih % sh, iw % sw) first, so a warp shares one tap set: its
// weight loads are one broadcast and its gy loads consecutive.
// grid ceil(N * groups * sh * sw * ceil(H / sh) * ceil(W / sw) / 256), block 256.
#define CC_DIRECT_MAX_CG 8
extern "C" __global__ void conv2d_grad_input_direct(const float* __restrict__ gy,
                                                    const float* __restrict__ w,
                                                    float* __restrict__ gx,
                                                    int N, int C, int H, int W, int K, int KH,
                                                    int KW, int OH, int OW, int sh, int sw,
                                                    int pt, int pl, int dh, int dw, int groups) {
    const int QH = (H + sh - 1) / sh, QW = (W + sw - 1) / sw;
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= N * groups * sh * sw * QH * QW) return;
    const int qw = i % QW, qh = (i / QW) % QH, pw = (i / (QW * QH)) % sw;
    const int ph = (i / (QW * QH * sw)) % sh, ng = i / (QW * QH * sw * sh);
    const int g = ng % groups, n = ng / groups;
    const int ih = qh * sh + ph, iw = qw * sw + pw;
    if (ih >= H || iw >= W) return;
    const int Cg = C / groups, Kg = K / groups, KHW = KH * KW, OHW = OH * OW;
    const int kstride = Cg * KHW;  // from w[k, c, tap] to w[k + 1, c, tap]
    const float* gyg = gy + (n * K + g * Kg) * OHW;
    const float* wg = w + g * Kg * kstride;
    float acc[CC_DIRECT_MAX_CG];
#pragma unroll
    for (int c = 0; c < CC_DIRECT_MAX_CG; ++c) acc[c] = 0.f;
    for (int kh = 0; kh < KH; ++kh) {
        const int oh = cc_window_at(ih, kh, sh, pt, dh, OH);
        if (oh < 0) continue;
        for (int kw = 0; kw < KW; ++kw) {
            const int ow = cc_window_at(iw, kw, sw, pl, dw, OW);
            if (ow < 0) continue;
            const float* gyp = gyg + oh * OW + ow;
            const float* wp = wg + kh * KW + kw;
            for (int k = 0; k < Kg; ++k) {
                const float v = gyp[k * OHW];
#pragma unroll
                for (int c = 0; c < CC_DIRECT_MAX_CG; ++c)
                    if (c < Cg) acc[c] += v * wp[k * kstride + c * KHW];
            }
        }
    }
    float* gxp = gx + (n * C + g * Cg) * H * W + ih * W + iw;
#pragma unroll
    for (int c = 0; c < CC_DIRECT_MAX_CG; ++c)
        if (c < Cg) gxp[c * H * W] = acc[c];
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
extern "C" __global__ void depthwise_grad_input(const float* __restrict__ gy,
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
            const int oh = cc_window_at(ih, kh, sh, pt, dh, OH);
            if (oh < 0) continue;
            for (int kw = 0; kw < KW; ++kw) {
                const int ow = cc_window_at(iw, kw, sw, pl, dw, OW);
                if (ow < 0) continue;
                s += gyk[oh * OW + ow] * w[(k * KH + kh) * KW + kw];
            }
        }
    }
    gx[i] = s;
}

// One block per weight element (k, kh, kw), blockDim.x a power of two: each
// thread sums a fixed strided subset of (n, oh, ow), then a fixed-order tree.
extern "C" __global__ void depthwise_grad_weight(const float* __restrict__ gy,
                                                 const float* __restrict__ x,
                                                 float* __restrict__ gw,
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
