#include "gemm.h"

#include <omp.h>

#include <cstdlib>
#include <cstring>

#include "convcore/threading.h"
#include "strided.h"

namespace convcore {
namespace gemm {

namespace {

// The portable microkernel: accumulators for an MR x NR tile in a local
// array the compiler may keep in registers. Used where no vector kernel
// below applies.
template <typename T>
inline void micro_generic(int64_t kc, const T* __restrict a, int64_t lda, const T* __restrict b,
                          T* __restrict c, int64_t ldc, int mr, int nr, bool accumulate) {
  constexpr int MR = Tile<T>::MR, NR = Tile<T>::NR;
  T acc[MR][NR] = {};
  for (int64_t k = 0; k < kc; ++k)
    for (int i = 0; i < mr; ++i) {
      const T ai = lda == 0 ? a[k * MR + i] : a[i * lda + k];
      for (int j = 0; j < NR; ++j) acc[i][j] += ai * b[k * NR + j];
    }
  for (int i = 0; i < mr; ++i)
    for (int j = 0; j < nr; ++j)
      c[i * ldc + j] = accumulate ? c[i * ldc + j] + acc[i][j] : acc[i][j];
}

// The vector microkernel, written with GCC/Clang vector extensions so one
// body serves every instruction set: V is a vector of W lanes of T. The NR
// columns of the tile are covered in passes of VP vectors; each pass keeps
// MR x VP vector accumulators in registers (24 with AVX-512's 32 registers,
// 12 with AVX2's 16).
#if defined(__GNUC__) || defined(__clang__)
#define CONVCORE_VECTOR_KERNELS 1
// A is packed (a[k * MR + i]) when lda == 0, else row-major
// (a[i * lda + k]; rows past mr repeat the last one and are discarded).
template <typename T, typename V, int VP, bool kPackedA>
inline __attribute__((always_inline)) void micro_vector_body(int64_t kc, const T* __restrict a,
                                                             int64_t lda,
                                                             const T* __restrict b,
                                                             T* __restrict c, int64_t ldc, int mr,
                                                             int nr, bool accumulate) {
  constexpr int MR = Tile<T>::MR, NR = Tile<T>::NR;
  int64_t row_off[MR];
  for (int i = 0; i < MR; ++i) row_off[i] = kPackedA ? i : (i < mr ? i : mr - 1) * lda;
  constexpr int W = sizeof(V) / sizeof(T);
  static_assert(NR % (VP * W) == 0, "NR must be a multiple of the pass width");
  // The C tile is read (or written) only after the k loop: fetching its
  // lines now hides the misses of a C far bigger than the caches.
  for (int i = 0; i < mr; ++i)
    for (int j = 0; j < nr; j += 64 / static_cast<int>(sizeof(T)))
      __builtin_prefetch(c + i * ldc + j, 1);
  for (int j0 = 0; j0 < NR; j0 += VP * W) {
    if (j0 >= nr) break;
    V acc[MR][VP];
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
      for (int v = 0; v < VP; ++v) acc[i][v] = V{};
    const T* bp = b + j0;
    const T* ap = a;
    for (int64_t k = 0; k < kc; ++k, bp += NR, ap += kPackedA ? MR : 1) {
      V bv[VP];
#pragma GCC unroll 4
      for (int v = 0; v < VP; ++v) __builtin_memcpy(&bv[v], bp + v * W, sizeof(V));
#pragma GCC unroll 16
      for (int i = 0; i < MR; ++i) {
        const T ai = kPackedA ? ap[i] : ap[row_off[i]];
#pragma GCC unroll 4
        for (int v = 0; v < VP; ++v) acc[i][v] += ai * bv[v];
      }
    }
    const int width = nr - j0 < VP * W ? nr - j0 : VP * W;
    for (int i = 0; i < mr; ++i) {
      T* ci = c + i * ldc + j0;
      if (width == VP * W) {
#pragma GCC unroll 4
        for (int v = 0; v < VP; ++v) {
          V out = acc[i][v];
          if (accumulate) {
            V old;
            __builtin_memcpy(&old, ci + v * W, sizeof(V));
            out += old;
          }
          __builtin_memcpy(ci + v * W, &out, sizeof(V));
        }
      } else {
        T tmp[VP * W];
        __builtin_memcpy(tmp, &acc[i][0], sizeof(tmp));
        for (int j = 0; j < width; ++j) ci[j] = accumulate ? ci[j] + tmp[j] : tmp[j];
      }
    }
  }
}

template <typename T, typename V, int VP>
inline __attribute__((always_inline)) void micro_vector(int64_t kc, const T* a, int64_t lda,
                                                        const T* b, T* c, int64_t ldc, int mr,
                                                        int nr, bool accumulate) {
  if (lda == 0)
    micro_vector_body<T, V, VP, true>(kc, a, 0, b, c, ldc, mr, nr, accumulate);
  else
    micro_vector_body<T, V, VP, false>(kc, a, lda, b, c, ldc, mr, nr, accumulate);
}

// The gather microkernel (direct convolution): A(i, k) = rows[i][koff[k]],
// B packed in one NR-column panel, the tile written whole to tile[i * NR + j]
// (rows past mr repeat the last one and are discarded by the caller).
template <typename T, typename V, int VP>
inline __attribute__((always_inline)) void gather_vector_body(int64_t kc, const int64_t* koff,
                                                              const T* const* rows,
                                                              const T* __restrict b,
                                                              T* __restrict tile, int mr) {
  constexpr int MR = Tile<T>::MR, NR = Tile<T>::NR;
  constexpr int W = sizeof(V) / sizeof(T);
  const T* r[MR];
  for (int i = 0; i < MR; ++i) r[i] = rows[i < mr ? i : mr - 1];
  for (int j0 = 0; j0 < NR; j0 += VP * W) {
    V acc[MR][VP];
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
      for (int v = 0; v < VP; ++v) acc[i][v] = V{};
    const T* bp = b + j0;
    for (int64_t k = 0; k < kc; ++k, bp += NR) {
      const int64_t off = koff[k];
      V bv[VP];
#pragma GCC unroll 4
      for (int v = 0; v < VP; ++v) __builtin_memcpy(&bv[v], bp + v * W, sizeof(V));
#pragma GCC unroll 16
      for (int i = 0; i < MR; ++i) {
        const T ai = r[i][off];
#pragma GCC unroll 4
        for (int v = 0; v < VP; ++v) acc[i][v] += ai * bv[v];
      }
    }
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
      for (int v = 0; v < VP; ++v)
        __builtin_memcpy(tile + i * NR + j0 + v * W, &acc[i][v], sizeof(V));
  }
}
#endif

template <typename T>
inline void gather_generic(int64_t kc, const int64_t* koff, const T* const* rows, const T* b,
                           T* tile, int mr) {
  constexpr int MR = Tile<T>::MR, NR = Tile<T>::NR;
  for (int i = 0; i < MR; ++i) {
    const T* r = rows[i < mr ? i : mr - 1];
    T acc[NR] = {};
    for (int64_t k = 0; k < kc; ++k)
      for (int j = 0; j < NR; ++j) acc[j] += r[koff[k]] * b[k * NR + j];
    std::memcpy(tile + i * NR, acc, sizeof(acc));
  }
}

using KernelF = void (*)(int64_t, const float*, int64_t, const float*, float*, int64_t, int, int,
                         bool);
using KernelD = void (*)(int64_t, const double*, int64_t, const double*, double*, int64_t, int,
                         int, bool);

void kernel_generic_f(int64_t kc, const float* a, int64_t lda, const float* b, float* c, int64_t ldc, int mr,
                      int nr, bool acc) {
  micro_generic<float>(kc, a, lda, b, c, ldc, mr, nr, acc);
}
void kernel_generic_d(int64_t kc, const double* a, int64_t lda, const double* b, double* c, int64_t ldc,
                      int mr, int nr, bool acc) {
  micro_generic<double>(kc, a, lda, b, c, ldc, mr, nr, acc);
}

using GatherF = void (*)(int64_t, const int64_t*, const float* const*, const float*, float*, int);
using GatherD = void (*)(int64_t, const int64_t*, const double* const*, const double*, double*,
                         int);
void gather_generic_f(int64_t kc, const int64_t* koff, const float* const* rows, const float* b,
                      float* tile, int mr) {
  gather_generic<float>(kc, koff, rows, b, tile, mr);
}
void gather_generic_d(int64_t kc, const int64_t* koff, const double* const* rows,
                      const double* b, double* tile, int mr) {
  gather_generic<double>(kc, koff, rows, b, tile, mr);
}

#if defined(__x86_64__) && defined(CONVCORE_VECTOR_KERNELS)
#define CONVCORE_X86_DISPATCH 1
typedef float f32x8 __attribute__((vector_size(32)));
typedef float f32x16 __attribute__((vector_size(64)));
typedef double f64x4 __attribute__((vector_size(32)));
typedef double f64x8 __attribute__((vector_size(64)));

__attribute__((target("avx2,fma"))) void kernel_avx2_f(int64_t kc, const float* a, int64_t lda, const float* b, float* c, int64_t ldc,
                                                       int mr, int nr, bool acc) {
  micro_vector<float, f32x8, 1>(kc, a, lda, b, c, ldc, mr, nr, acc);
}
__attribute__((target("avx2,fma"))) void kernel_avx2_d(int64_t kc, const double* a, int64_t lda, const double* b, double* c, int64_t ldc,
                                                       int mr, int nr, bool acc) {
  micro_vector<double, f64x4, 1>(kc, a, lda, b, c, ldc, mr, nr, acc);
}
__attribute__((target("avx512f,fma"))) void kernel_avx512_f(int64_t kc, const float* a, int64_t lda, const float* b, float* c,
                                                            int64_t ldc, int mr, int nr,
                                                            bool acc) {
  micro_vector<float, f32x16, 2>(kc, a, lda, b, c, ldc, mr, nr, acc);
}
__attribute__((target("avx512f,fma"))) void kernel_avx512_d(int64_t kc, const double* a, int64_t lda, const double* b, double* c,
                                                            int64_t ldc, int mr, int nr,
                                                            bool acc) {
  micro_vector<double, f64x8, 2>(kc, a, lda, b, c, ldc, mr, nr, acc);
}
__attribute__((target("avx2,fma"))) void gather_avx2_f(int64_t kc, const int64_t* koff,
                                                       const float* const* rows, const float* b,
                                                       float* tile, int mr) {
  gather_vector_body<float, f32x8, 1>(kc, koff, rows, b, tile, mr);
}
__attribute__((target("avx2,fma"))) void gather_avx2_d(int64_t kc, const int64_t* koff,
                                                       const double* const* rows,
                                                       const double* b, double* tile, int mr) {
  gather_vector_body<double, f64x4, 1>(kc, koff, rows, b, tile, mr);
}
__attribute__((target("avx512f,fma"))) void gather_avx512_f(int64_t kc, const int64_t* koff,
                                                            const float* const* rows,
                                                            const float* b, float* tile, int mr) {
  gather_vector_body<float, f32x16, 2>(kc, koff, rows, b, tile, mr);
}
__attribute__((target("avx512f,fma"))) void gather_avx512_d(int64_t kc, const int64_t* koff,
                                                            const double* const* rows,
                                                            const double* b, double* tile,
                                                            int mr) {
  gather_vector_body<double, f64x8, 2>(kc, koff, rows, b, tile, mr);
}
#endif

struct Dispatch {
  KernelF f = kernel_generic_f;
  KernelD d = kernel_generic_d;
  GatherF gf = gather_generic_f;
  GatherD gd = gather_generic_d;
  const char* name = "generic";
  Dispatch() {
#ifdef CONVCORE_X86_DISPATCH
    // CONVCORE_ISA=generic|avx2|avx512 caps the level, so every path can be
    // tested on one machine.
    const char* cap = std::getenv("CONVCORE_ISA");
    const int max_level = !cap                             ? 2
                          : std::strcmp(cap, "generic") == 0 ? 0
                          : std::strcmp(cap, "avx2") == 0    ? 1
                                                             : 2;
    __builtin_cpu_init();
    if (max_level >= 2 && __builtin_cpu_supports("avx512f")) {
      f = kernel_avx512_f;
      d = kernel_avx512_d;
      gf = gather_avx512_f;
      gd = gather_avx512_d;
      name = "avx512";
    } else if (max_level >= 1 && __builtin_cpu_supports("avx2") &&
               __builtin_cpu_supports("fma")) {
      f = kernel_avx2_f;
      d = kernel_avx2_d;
      gf = gather_avx2_f;
      gd = gather_avx2_d;
      name = "avx2";
    }
#endif
  }
};

const Dispatch& dispatch() {
  static const Dispatch d;
  return d;
}

}  // namespace

void micro_kernel(int64_t kc, const float* a, int64_t lda, const float* b, float* c, int64_t ldc,
                  int mr, int nr, bool accumulate) {
  dispatch().f(kc, a, lda, b, c, ldc, mr, nr, accumulate);
}
void micro_kernel(int64_t kc, const double* a, int64_t lda, const double* b, double* c,
                  int64_t ldc, int mr, int nr, bool accumulate) {
  dispatch().d(kc, a, lda, b, c, ldc, mr, nr, accumulate);
}

void gather_kernel(int64_t kc, const int64_t* koff, const float* const* rows, const float* b,
                   float* tile, int mr) {
  dispatch().gf(kc, koff, rows, b, tile, mr);
}
void gather_kernel(int64_t kc, const int64_t* koff, const double* const* rows, const double* b,
                   double* tile, int mr) {
  dispatch().gd(kc, koff, rows, b, tile, mr);
}

const char* isa_name() { return dispatch().name; }

}  // namespace gemm

const char* gemm_isa() { return gemm::isa_name(); }

namespace gemm {

template <typename T>
void pack_a_parallel(int64_t M, int64_t K, const T* a, int64_t rs, int64_t cs, T* dst) {
  const int64_t units = pack_a_units<T>(M, K);
#pragma omp parallel for num_threads(detail::threads_for(units / 4)) schedule(static)
  for (int64_t u = 0; u < units; ++u) pack_a_part(M, K, a, rs, cs, dst, u, u + 1);
}

template void pack_a_parallel<float>(int64_t, int64_t, const float*, int64_t, int64_t, float*);
template void pack_a_parallel<double>(int64_t, int64_t, const double*, int64_t, int64_t,
                                      double*);

template <typename T>
void gemm_strided(int64_t M, int64_t N, int64_t K, const T* a, int64_t a_rs, int64_t a_cs,
                  const T* b, int64_t b_rs, int64_t b_cs, T* c, int64_t ldc, bool accumulate) {
  if (M <= 0 || N <= 0) return;
  detail::Workspace<T> a_ws(1, packed_a_size<T>(M, K));
  T* a_packed = a_ws.get();
  pack_a_parallel(M, K, a, a_rs, a_cs, a_packed);
  // Tasks are column blocks of C with all its rows, so each packed block of
  // B serves every row (packing it once per row block cost more than the
  // multiply); rows are split only when there are too few column blocks.
  // Each element's K reduction runs in a fixed order whatever the split.
  const int64_t nblocks = (N + NC - 1) / NC;
  int64_t mblocks = 1;
  if (nblocks < get_num_threads())
    mblocks = std::min<int64_t>((get_num_threads() + nblocks - 1) / nblocks, (M + MC - 1) / MC);
  const int64_t mrows = round_up((M + mblocks - 1) / mblocks, Tile<T>::MR);
  mblocks = (M + mrows - 1) / mrows;
  const int64_t tasks = mblocks * nblocks;
  const int threads = detail::threads_for(tasks, M * N * K);
  detail::Workspace<T> ws(threads, b_workspace_size<T>());
#pragma omp parallel num_threads(threads)
  {
    T* bbuf = ws.get(omp_get_thread_num());
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t i0 = (t % mblocks) * mrows, j0 = (t / mblocks) * NC;
      const int64_t mc = std::min(mrows, M - i0), nc = std::min(NC, N - j0);
      const StridedPackB<T> pack_block{b + j0 * b_cs, b_rs, b_cs};
      gemm_packed(mc, nc, K, a_packed, M, i0, pack_block, c + i0 * ldc + j0, ldc,
                  accumulate, bbuf);
    }
  }
}

template void gemm_strided<float>(int64_t, int64_t, int64_t, const float*, int64_t, int64_t,
                                  const float*, int64_t, int64_t, float*, int64_t, bool);
template void gemm_strided<double>(int64_t, int64_t, int64_t, const double*, int64_t, int64_t,
                                   const double*, int64_t, int64_t, double*, int64_t, bool);

}  // namespace gemm
}  // namespace convcore
