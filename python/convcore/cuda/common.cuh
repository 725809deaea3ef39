// convcore CUDA kernels: the portable subset (read this before editing a .cu).
//
// Every .cu file in this folder is compiled three ways, from the same text:
//   1. by NVRTC at run time, through CuPy's RawModule (the GPU path);
//   2. by nvcc for sm_80 and sm_90 in tests/test_cuda_compile.py, with
//      warnings as errors;
//   3. by g++ as plain C++ against tests/cuda_shim/cuda_shim.h (injected with
//      -include), which runs each thread block's threads as fibers on the CPU
//      so that the kernels' logic is tested on machines without a GPU.
//
// So the kernels keep to this subset:
//   - No #include of system headers (NVRTC has none). This file is the only
//     include; the loader inlines it before handing the source to NVRTC.
//   - Kernels are `extern "C" __global__ void name(...)` (unmangled names for
//     RawModule.get_function and for the shim's generated launchers).
//     Parameters are pointers to float / long long, or int / float scalars.
//   - Built-ins: threadIdx, blockIdx, blockDim, gridDim (.x/.y/.z),
//     __syncthreads(), atomicAdd(float*, float), fmaxf, fminf, expf, logf,
//     sqrtf, powf, fabsf, rsqrtf, and min/max on int. Nothing else (no
//     warp shuffles, no __ldg, no cooperative groups, no textures).
//   - Static shared memory: `__shared__ T name[CONST]` at function scope
//     (kernels or __device__ function templates), without an initializer.
//     Dynamic shared memory only through CC_DYNAMIC_SHARED(T, name) below.
//   - C++17 as both compilers take it: templates, constexpr, static_assert,
//     structs with __device__ member functions (the operand loaders of
//     cc_gemm_tile), lambdas defined and called in device code (the stores
//     of cc_gemm_store). `#pragma unroll` is fine (g++ ignores it).
//   - Every thread of a block reaches every __syncthreads() the same number
//     of times: no `return` before a barrier (guard the work with an if
//     instead). The shim reports a violation as "barrier divergence".
//   - Index arithmetic in int: the Python side refuses arrays of 2^31 or
//     more elements with a clear error.
//   - Deterministic by default: no float atomics in a reduction whose order
//     changes the result. The one exception is guarded by a kernel argument
//     named `atomic`, which the Python side sets only when the caller opts
//     out with deterministic=False.
#pragma once

#ifndef CC_SHIM
// On the GPU: dynamic shared memory is an unsized extern array.
#define CC_DYNAMIC_SHARED(T, name) extern __shared__ T name[]
#endif

#define CC_NEG_INF (__int_as_float(0xff800000))
#define CC_NAN (__int_as_float(0x7fc00000))

// Sum of one float per thread over the block, in a fixed tree order (the
// result is bit-identical on every run). buf has blockDim.x floats; every
// thread of the block must call it; blockDim.x must be a power of two.
// Returns the total to every thread.
__device__ __forceinline__ float cc_block_sum(float v, float* buf) {
    const int t = threadIdx.x;
    buf[t] = v;
    __syncthreads();
    for (int half = blockDim.x / 2; half > 0; half /= 2) {
        if (t < half) buf[t] += buf[t + half];
        __syncthreads();
    }
    const float total = buf[0];
    __syncthreads();  // buf may be reused right after
    return total;
}

// a[i] + a[n + i] + a[2 n + i] + ... over `rows` rows of width n, added in
// that order (the fixed-order sums of split workspaces and of columns).
__device__ __forceinline__ float cc_column_sum(const float* a, int rows, int n, int i) {
    float s = 0.f;
    for (int r = 0; r < rows; ++r) s += a[r * n + i];
    return s;
}

// For the backward kernels that gather, per input position, from the
// windows that read it: the output position o whose window puts tap k
// (dilation d) on input position i, i = o * s - p + k * d with 0 <= o < O,
// for stride s and padding p; -1 when there is none. Per dimension.
__device__ __forceinline__ int cc_window_at(int i, int k, int s, int p, int d, int O) {
    const int os = i + p - k * d;
    return (os < 0 || os % s != 0 || os / s >= O) ? -1 : os / s;
}

// The GEMM engine shared by the GEMM-shaped kernels (conv.cu, linear.cu).
//
// One block of CC_THREADS = 256 threads (16 x 16) computes a BM x BN tile of
// C = A (M x K) * B (K x N) over the reduction range [kbeg, kend) into acc
// (set to zero first), BK at a time: the next BK-slice of A and B is fetched
// from global memory into registers while the current one, in shared memory,
// is multiplied (software pipelining), so load latency overlaps the FMAs.
// Thread (tx, ty) accumulates rows ty + 16 i and columns tx + 16 j (strided
// ownership: the 16 tx of a half-warp read 16 consecutive shared words and
// store 16 consecutive output columns, so no bank conflicts and coalesced
// stores); cc_gemm_store hands each of them to the kernel's epilogue.
//
// The operands are never materialised: `op` (one object per thread) yields
// them. A reduction index k usually has to be decoded (into channel and
// kernel tap, or image and output position), which costs integer
// divisions; so BK threads decode the next slice's k once per block into a
// shared table, and every load reads the decoded form:
//   op.decode(k, d)  fills int d[4] for reduction index k (k < kend);
//   op.a(m, k, d)    A at tile row m (0 <= m < BM), 0 outside A;
//   op.b(k, d)       B at k in this thread's column, which is fixed
//                    (n = threadIdx.x % BN, set when op was built), 0 outside.
// The engine itself only checks k < kend. Every thread must call it.
#define CC_THREADS 256

template <int BM, int BN, int BK, class Op>
__device__ __forceinline__ void cc_gemm_tile(const Op& op, int kbeg, int kend,
                                             float (*acc)[BN / 16]) {
    constexpr int TM = BM / 16, TN = BN / 16;
    constexpr int LA = BM * BK / CC_THREADS, LB = BN * BK / CC_THREADS;
    constexpr int BSTEP = CC_THREADS / BN;
    static_assert(LA * CC_THREADS == BM * BK && LB * CC_THREADS == BN * BK, "tile shape");
    static_assert(BSTEP * BN == CC_THREADS, "BN must divide the block");
    // +4: the transposing store to As (consecutive k, same m) hits distinct banks
    __shared__ float As[BK][BM + 4];
    __shared__ float Bs[BK][BN];
    __shared__ int dec[2][BK][4];  // decoded k of the slice being fetched, double-buffered
    const int t = threadIdx.x, tx = t % 16, ty = t / 16;
    const int bcol = t % BN, brow = t / BN;
    float ra[LA], rb[LB];
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j) acc[i][j] = 0.f;

    // fetch the BK-slice starting at k0 (decoded in dec[buf]) into registers
#define CC_FETCH(k0, buf)                                                     \
    for (int i = 0; i < LA; ++i) {                                            \
        const int e = t + CC_THREADS * i, kk = e % BK, k = (k0) + kk;         \
        ra[i] = k < kend ? op.a(e / BK, k, dec[buf][kk]) : 0.f;               \
    }                                                                         \
    for (int i = 0; i < LB; ++i) {                                            \
        const int kk = brow + BSTEP * i, k = (k0) + kk;                       \
        rb[i] = k < kend ? op.b(k, dec[buf][kk]) : 0.f;                       \
    }

    if (t < BK && kbeg + t < kend) op.decode(kbeg + t, dec[0][t]);
    __syncthreads();
    CC_FETCH(kbeg, 0)
    int buf = 0;
    for (int k0 = kbeg; k0 < kend; k0 += BK) {
        for (int i = 0; i < LA; ++i) {
            const int e = t + CC_THREADS * i;
            As[e % BK][e / BK] = ra[i];
        }
        for (int i = 0; i < LB; ++i) Bs[brow + BSTEP * i][bcol] = rb[i];
        // decode the next slice into the other buffer (last read two
        // barriers ago)
        if (t < BK && k0 + BK + t < kend) op.decode(k0 + BK + t, dec[buf ^ 1][t]);
        __syncthreads();
        buf ^= 1;
        if (k0 + BK < kend) { CC_FETCH(k0 + BK, buf) }  // in flight during the FMAs below
#pragma unroll
        for (int k = 0; k < BK; ++k) {
            float a[TM], b[TN];
#pragma unroll
            for (int i = 0; i < TM; ++i) a[i] = As[k][ty + 16 * i];
#pragma unroll
            for (int j = 0; j < TN; ++j) b[j] = Bs[k][tx + 16 * j];
#pragma unroll
            for (int i = 0; i < TM; ++i)
#pragma unroll
                for (int j = 0; j < TN; ++j) acc[i][j] += a[i] * b[j];
        }
        __syncthreads();
    }
#undef CC_FETCH
}

// The epilogue's walk over this thread's share of the tile whose corner is
// (m0, n0) in an M x N result: store(m, n, acc[i][j]) for each row
// m = m0 + ty + 16 i < M and column n = n0 + tx + 16 j < N.
template <int BM, int BN, class Store>
__device__ __forceinline__ void cc_gemm_store(const float (*acc)[BN / 16], int m0, int n0,
                                              int M, int N, const Store& store) {
    constexpr int TM = BM / 16, TN = BN / 16;
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
    for (int i = 0; i < TM; ++i) {
        const int m = m0 + ty + 16 * i;
        if (m >= M) continue;
#pragma unroll
        for (int j = 0; j < TN; ++j) {
            const int n = n0 + tx + 16 * j;
            if (n < N) store(m, n, acc[i][j]);
        }
    }
}

// The two tile shapes every GEMM-shaped kernel is instantiated with: a big
// one (more reuse per load) for problems with enough tiles to fill the GPU,
// and a small one for the rest. The host picks (convcore.cuda.functional).
#define CC_BIG_BM 128
#define CC_BIG_BN 128
#define CC_BIG_BK 8
#define CC_SMALL_BM 64
#define CC_SMALL_BN 64
#define CC_SMALL_BK 16
