// Kernels that test the shim itself (not part of convcore).
#include "common.cuh"

// out[i] = in[blockDim.x - 1 - i] through shared memory, with the barrier.
extern "C" __global__ void selftest_reverse(const float* in, float* out) {
    __shared__ float buf[256];
    buf[threadIdx.x] = in[blockIdx.x * blockDim.x + threadIdx.x];
    __syncthreads();
    out[blockIdx.x * blockDim.x + threadIdx.x] = buf[blockDim.x - 1 - threadIdx.x];
}

// The same without the barrier: a race the shim must expose (reads before
// the other threads' writes see stale shared memory).
extern "C" __global__ void selftest_reverse_racy(const float* in, float* out) {
    __shared__ float buf[256];
    buf[threadIdx.x] = in[blockIdx.x * blockDim.x + threadIdx.x];
    out[blockIdx.x * blockDim.x + threadIdx.x] = buf[blockDim.x - 1 - threadIdx.x];
}

// Threads past n return before the barrier: barrier divergence.
extern "C" __global__ void selftest_divergent(const float* in, float* out, int n) {
    __shared__ float buf[256];
    if ((int)threadIdx.x >= n) return;
    buf[threadIdx.x] = in[threadIdx.x];
    __syncthreads();
    out[threadIdx.x] = buf[n - 1 - threadIdx.x];
}

// 2-D blocks and grids, dynamic shared memory, the block sum.
extern "C" __global__ void selftest_block_sum(const float* in, float* out) {
    CC_DYNAMIC_SHARED(float, buf);
    const int t = threadIdx.y * blockDim.x + threadIdx.x;
    const int b = blockIdx.y * gridDim.x + blockIdx.x;
    // cc_block_sum indexes by threadIdx.x: use a 1-D view for it
    buf[t] = in[b * blockDim.x * blockDim.y + t];
    __syncthreads();
    for (int half = blockDim.x * blockDim.y / 2; half > 0; half /= 2) {
        if (t < half) buf[t] += buf[t + half];
        __syncthreads();
    }
    if (t == 0) out[b] = buf[0];
}

// Thread 255 writes one past the end of a shared array: the shim's
// bounds-checked build must stop there.
extern "C" __global__ void selftest_shared_overflow(float* out) {
    __shared__ float buf[256];
    buf[threadIdx.x + 1] = 1.f;
    __syncthreads();
    out[threadIdx.x] = buf[threadIdx.x];
}
