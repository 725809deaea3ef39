// A small CUDA-execution shim: builds convcore's .cu kernels, unmodified, as
// plain C++ (g++ -include cuda_shim.h -x c++ kernel.cu) and runs them on the
// CPU, for testing the kernels' logic on machines without a GPU.
//
// Each block runs alone; its threads are ucontext fibers on one OS thread,
// switched at __syncthreads(), so the barrier is real: a thread that writes
// shared memory before the barrier is seen by the others after it, and one
// that reads too early sees stale data exactly as on a GPU with a missing
// barrier would allow. `__shared__` is `static` (blocks never overlap).
// A thread that returns while others wait at a barrier is a barrier
// divergence (undefined on a GPU): the launch reports it as an error.
// The subset of CUDA supported is listed in python/convcore/cuda/common.cuh.
#pragma once
#define CC_SHIM 1

#include <math.h>  // expf, logf, sqrtf, powf, fabsf, fmaxf, fminf in the global namespace, as in CUDA
#include <cstring>

struct dim3 {
    unsigned x, y, z;
};

namespace ccshim {
struct Fiber;
extern dim3 g_block_idx, g_block_dim, g_grid_dim;
extern Fiber* g_current;
extern char* g_dynamic_shared;
const dim3& thread_idx();
void syncthreads();
}  // namespace ccshim

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __launch_bounds__(...)
#define __shared__ static
#define threadIdx (ccshim::thread_idx())
#define blockIdx (ccshim::g_block_idx)
#define blockDim (ccshim::g_block_dim)
#define gridDim (ccshim::g_grid_dim)
#define __syncthreads() ccshim::syncthreads()
#define CC_DYNAMIC_SHARED(T, name) T* name = reinterpret_cast<T*>(ccshim::g_dynamic_shared)

// One OS thread runs everything, so an atomic is a plain read-modify-write.
inline float atomicAdd(float* p, float v) { const float old = *p; *p = old + v; return old; }
inline float __int_as_float(unsigned v) { float f; std::memcpy(&f, &v, 4); return f; }
inline float rsqrtf(float v) { return 1.0f / sqrtf(v); }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
