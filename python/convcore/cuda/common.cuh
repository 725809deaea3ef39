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
//   - Static shared memory: `__shared__ T name[CONST]` at function scope,
//     without an initializer. Dynamic shared memory only through
//     CC_DYNAMIC_SHARED(T, name) below.
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

// The register tile shared by the GEMM-shaped kernels (conv.cu, linear.cu):
// a 64x64 output tile per block of 256 threads, 16 reduction steps per
// shared-memory stage, 4x4 outputs per thread.
#define CC_TILE 64
#define CC_TILE_K 16
#define CC_TILE_THREADS 256

// acc[i][j] += As[k][ty + 16 i] * Bs[k][tx + 16 j] over the 16 k of a stage.
// Strided (not blocked) ownership, so that the 16 consecutive tx of a warp
// cover 16 consecutive output columns: coalesced stores, no bank conflicts.
__device__ __forceinline__ void cc_tile_fma(float (*As)[CC_TILE], float (*Bs)[CC_TILE],
                                            float acc[4][4], int tx, int ty) {
    for (int k = 0; k < CC_TILE_K; ++k) {
        float a[4], b[4];
        for (int i = 0; i < 4; ++i) a[i] = As[k][ty + 16 * i];
        for (int j = 0; j < 4; ++j) b[j] = Bs[k][tx + 16 * j];
        for (int i = 0; i < 4; ++i)
            for (int j = 0; j < 4; ++j) acc[i][j] += a[i] * b[j];
    }
}
