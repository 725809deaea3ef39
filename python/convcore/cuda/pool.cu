// Pooling (NCHW planes, float32, contiguous): one thread per output element
// forward; one thread per input element backward, gathering from the windows
// that contain it (no atomics: overlapping windows stay deterministic).
#include "common.cuh"

// Max pooling with PyTorch's rules: window taps (oh*s - p + k*d) inside the
// input only; a NaN wins (the last one); ties go to the first maximum.
// idx (may be null when want_idx == 0): flat h * W + w in the input plane.
extern "C" __global__ void max_pool_fwd(const float* __restrict__ x, float* __restrict__ y,
                                        long long* __restrict__ idx, int NC, int H, int W,
                                        int OH, int OW, int kh, int kw, int sh, int sw,
                                        int ph, int pw, int dh, int dw, int want_idx) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= NC * OH * OW) return;
    const int ow = i % OW, oh = (i / OW) % OH, nc = i / (OW * OH);
    const float* xc = x + nc * H * W;
    float best = CC_NEG_INF;
    int arg = -1;
    for (int a = 0; a < kh; ++a) {
        const int h = oh * sh - ph + a * dh;
        if (h < 0 || h >= H) continue;
        for (int b = 0; b < kw; ++b) {
            const int w = ow * sw - pw + b * dw;
            if (w < 0 || w >= W) continue;
            const float v = xc[h * W + w];
            if (v > best || v != v || arg < 0) { best = v; arg = h * W + w; }
        }
    }
    y[i] = best;
    if (want_idx) idx[i] = arg;
}

// gx[plane, h, w] = sum of gy over the windows whose recorded max (idx) is
// (h, w). The candidate windows are those with a tap on (h, w).
extern "C" __global__ void max_pool_bwd(const float* __restrict__ gy,
                                        const long long* __restrict__ idx,
                                        float* __restrict__ gx, int NC, int H, int W,
                                        int OH, int OW, int kh, int kw, int sh, int sw,
                                        int ph, int pw, int dh, int dw) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= NC * H * W) return;
    const int w = i % W, h = (i / W) % H, nc = i / (W * H);
    const long long me = h * W + w;
    const int base = nc * OH * OW;
    float s = 0.f;
    for (int a = 0; a < kh; ++a) {
        const int oh = cc_window_at(h, a, sh, ph, dh, OH);
        if (oh < 0) continue;
        for (int b = 0; b < kw; ++b) {
            const int ow = cc_window_at(w, b, sw, pw, dw, OW);
            if (ow < 0) continue;
            const int o = base + oh * OW + ow;
            if (idx[o] == me) s += gy[o];
        }
    }
    gx[i] = s;
}

// The divisor of avg window (oh, ow), as PyTorch: clipped to the padded
// extent for count_include_pad, to the input otherwise, or the override.
__device__ __forceinline__ int avg_divisor(int oh, int ow, int H, int W, int kh, int kw,
                                           int sh, int sw, int ph, int pw,
                                           int include_pad, int divisor) {
    if (divisor != 0) return divisor;
    int hs = oh * sh - ph, ws = ow * sw - pw;
    int he = min(hs + kh, H + ph), we = min(ws + kw, W + pw);
    if (include_pad) return (he - hs) * (we - ws);
    hs = max(hs, 0); ws = max(ws, 0); he = min(he, H); we = min(we, W);
    return (he - hs) * (we - ws);
}

extern "C" __global__ void avg_pool_fwd(const float* __restrict__ x, float* __restrict__ y,
                                        int NC, int H, int W, int OH, int OW, int kh, int kw,
                                        int sh, int sw, int ph, int pw, int include_pad,
                                        int divisor) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= NC * OH * OW) return;
    const int ow = i % OW, oh = (i / OW) % OH, nc = i / (OW * OH);
    const float* xc = x + nc * H * W;
    const int hs = max(oh * sh - ph, 0), ws = max(ow * sw - pw, 0);
    const int he = min(oh * sh - ph + kh, H), we = min(ow * sw - pw + kw, W);
    float s = 0.f;
    for (int h = hs; h < he; ++h)
        for (int w = ws; w < we; ++w) s += xc[h * W + w];
    y[i] = s / (float)avg_divisor(oh, ow, H, W, kh, kw, sh, sw, ph, pw, include_pad, divisor);
}

extern "C" __global__ void avg_pool_bwd(const float* __restrict__ gy, float* __restrict__ gx,
                                        int NC, int H, int W, int OH, int OW, int kh, int kw,
                                        int sh, int sw, int ph, int pw, int include_pad,
                                        int divisor) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= NC * H * W) return;
    const int w = i % W, h = (i / W) % H, nc = i / (W * H);
    const float* g = gy + nc * OH * OW;
    float s = 0.f;
    for (int a = 0; a < kh; ++a) {
        const int oh = cc_window_at(h, a, sh, ph, 1, OH);
        if (oh < 0) continue;
        for (int b = 0; b < kw; ++b) {
            const int ow = cc_window_at(w, b, sw, pw, 1, OW);
            if (ow < 0) continue;
            s += g[oh * OW + ow] /
                 (float)avg_divisor(oh, ow, H, W, kh, kw, sh, sw, ph, pw, include_pad, divisor);
        }
    }
    gx[i] = s;
}

// Adaptive average pooling: bin o of n over length L is [floor(o L / n),
// ceil((o + 1) L / n)).
extern "C" __global__ void adaptive_avg_fwd(const float* __restrict__ x, float* __restrict__ y,
                                            int NC, int H, int W, int OH, int OW) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= NC * OH * OW) return;
    const int ow = i % OW, oh = (i / OW) % OH, nc = i / (OW * OH);
    const int hs = oh * H / OH, he = ((oh + 1) * H + OH - 1) / OH;
    const int ws = ow * W / OW, we = ((ow + 1) * W + OW - 1) / OW;
    const float* xc = x + nc * H * W;
    float s = 0.f;
    for (int h = hs; h < he; ++h)
        for (int w = ws; w < we; ++w) s += xc[h * W + w];
    y[i] = s / (float)((he - hs) * (we - ws));
}

extern "C" __global__ void adaptive_avg_bwd(const float* __restrict__ gy, float* __restrict__ gx,
                                            int NC, int H, int W, int OH, int OW) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= NC * H * W) return;
    const int w = i % W, h = (i / W) % H, nc = i / (W * H);
    const float* g = gy + nc * OH * OW;
    // Bins overlap by at most a few; those containing h start at or after
    // floor(h * OH / H) - 1 and the scan stops once a bin starts past h.
    float s = 0.f;
    for (int oh = max(h * OH / H - 1, 0); oh < OH; ++oh) {
        const int hs = oh * H / OH, he = ((oh + 1) * H + OH - 1) / OH;
        if (hs > h) break;
        if (h >= he) continue;
        for (int ow = max(w * OW / W - 1, 0); ow < OW; ++ow) {
            const int ws = ow * W / OW, we = ((ow + 1) * W + OW - 1) / OW;
            if (ws > w) break;
            if (w >= we) continue;
            s += g[oh * OW + ow] / (float)((he - hs) * (we - ws));
        }
    }
    gx[i] = s;
}
