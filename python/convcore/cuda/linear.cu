// A GEMM of our own for the fully connected layer and its gradients, on the
// engine of common.cuh: C[m, n] = sum_k A(m, k) * B(k, n), A and B read
// through (row, column) strides, so that x @ W^T, gy @ W and gy^T @ x are
// the same kernel. Tiles: `gemm` 64 x 64, `gemm_big` 128 x 128.
//
// The reduction may be split in fixed chunks (blockIdx.z = split, chunk
// `chunk`) when the output alone gives too few blocks (a batch-16 FC layer):
// chunk s goes to out + s * M * N and gemm_reduce adds the chunks in order,
// then bias and ReLU (deterministic). With splits == 1, out is C and the
// epilogue (bias, ReLU) runs here. C and out are contiguous (M, N).
#include "common.cuh"

struct GemmOp {
    const float* A;  // A + m0 * sam
    const float* B;  // B + n * sbn for this thread's column n
    int rows, sam, sak, sbk, valid;
    // a plain GEMM has nothing to decode
    __device__ __forceinline__ void decode(int, int*) const {}
    __device__ __forceinline__ float a(int m, int k, const int*) const {
        return m < rows ? A[m * sam + k * sak] : 0.f;
    }
    __device__ __forceinline__ float b(int k, const int*) const {
        return valid ? B[k * sbk] : 0.f;
    }
};

template <int BM, int BN, int BK>
__device__ __forceinline__ void gemm_tile(const float* A, const float* B, const float* bias,
                                          float* out, int M, int N, int K, int sam, int sak,
                                          int sbk, int sbn, int has_bias, int relu, int chunk) {
    constexpr int TM = BM / 16, TN = BN / 16;
    const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN, split = blockIdx.z;
    const int kbeg = split * chunk, kend = kbeg + chunk < K ? kbeg + chunk : K;
    const int n = n0 + threadIdx.x % BN;
    GemmOp op;
    op.A = A + m0 * sam;
    op.B = B + (n < N ? n : 0) * sbn;
    op.rows = M - m0; op.sam = sam; op.sak = sak; op.sbk = sbk; op.valid = n < N;
    float acc[TM][TN];
    cc_gemm_tile<BM, BN, BK>(op, kbeg, kend, acc);
    float* o = out + split * M * N;
    cc_gemm_store<BM, BN>(acc, m0, n0, M, N, [&](int m, int nn, float v) {
        if (gridDim.z == 1) {  // no split: the epilogue is here
            v += has_bias ? bias[nn] : 0.f;
            if (relu && v < 0.f) v = 0.f;
        }
        o[m * N + nn] = v;
    });
}

// grid (ceil(N / 64), ceil(M / 64), splits), block 256.
extern "C" __global__ void __launch_bounds__(CC_THREADS)
gemm(const float* __restrict__ A, const float* __restrict__ B, const float* __restrict__ bias,
     float* __restrict__ out, int M, int N, int K, int sam, int sak, int sbk, int sbn,
     int has_bias, int relu, int chunk) {
    gemm_tile<CC_SMALL_BM, CC_SMALL_BN, CC_SMALL_BK>(A, B, bias, out, M, N, K, sam, sak, sbk,
                                                    sbn, has_bias, relu, chunk);
}

// grid (ceil(N / 128), ceil(M / 128), splits), block 256.
extern "C" __global__ void __launch_bounds__(CC_THREADS)
gemm_big(const float* __restrict__ A, const float* __restrict__ B,
         const float* __restrict__ bias, float* __restrict__ out, int M, int N, int K, int sam,
         int sak, int sbk, int sbn, int has_bias, int relu, int chunk) {
    gemm_tile<CC_BIG_BM, CC_BIG_BN, CC_BIG_BK>(A, B, bias, out, M, N, K, sam, sak, sbk, sbn,
                                              has_bias, relu, chunk);
}

// C[i] = sum over s in order of ws[s * M * N + i], + bias[i % N], ReLU.
// grid ceil(M * N / 256), block 256.
extern "C" __global__ void gemm_reduce(const float* __restrict__ ws,
                                       const float* __restrict__ bias, float* __restrict__ C,
                                       int M, int N, int splits, int has_bias, int relu) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= M * N) return;
    float v = cc_column_sum(ws, splits, M * N, i);
    if (has_bias) v += bias[i % N];
    if (relu && v < 0.f) v = 0.f;
    C[i] = v;
}

// out[n] = sum over rows m of g[m, n] (the bias gradient of linear), one
// thread per column summing rows in order. grid ceil(N / 256), block 256.
extern "C" __global__ void column_sum(const float* __restrict__ g, float* __restrict__ out,
                                      int M, int N) {
    const int n = blockIdx.x * blockDim.x + threadIdx.x;
    if (n < N) out[n] = cc_column_sum(g, M, N, n);
}
