#include "gemm.h"

#include <omp.h>

#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "convcore/threading.h"
#include "blocked_kernels.h"
#include "simd.h"
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
      const T ai = lda == 0 ? a[k * MR + i] : lda > 0 ? a[i * lda + k] : a[k * -lda + i];
      for (int j = 0; j < NR; ++j) acc[i][j] += ai * b[k * NR + j];
    }
  for (int i = 0; i < mr; ++i)
    for (int j = 0; j < nr; ++j)
      c[i * ldc + j] = accumulate ? c[i * ldc + j] + acc[i][j] : acc[i][j];
}

// The vector microkernel, written with GCC/Clang vector extensions so one
// body serves every instruction set: V is a vector of W lanes of T. The
// MR x NR tile is computed in blocks of RB rows by VP vectors, each block's
// RB x VP accumulators held in registers for the whole k loop: 12 x 2 with
// AVX-512's 32 registers (the whole tile in one block), 6 x 2 with AVX2's 16
// (four blocks). Two vectors of B per row keep the loads per FMA low: with
// AVX2, 6 broadcasts + 2 loads feed 12 FMAs (12 x 1 blocks needed 13 loads
// for 12 FMAs: 2-thread SGEMM 2048^3 at 0.71 of numpy's on a Zen 3, 1-thread
// 72 GFLOP/s against 86 with these blocks).
#if defined(__GNUC__) || defined(__clang__)
#define CONVCORE_VECTOR_KERNELS 1
// A is packed (a[k * MR + i]) when lda == 0 (kLayout 0), else read in
// place: by rows (a[i * lda + k], kLayout 1) or by columns (a[k * -lda + i],
// kLayout 2); rows past mr repeat the last one and are discarded.
template <typename T, typename V, int RB, int VP, int kLayout>
inline __attribute__((always_inline)) void micro_vector_body(int64_t kc, const T* __restrict a,
                                                             int64_t lda,
                                                             const T* __restrict b,
                                                             T* __restrict c, int64_t ldc, int mr,
                                                             int nr, bool accumulate) {
  constexpr int MR = Tile<T>::MR, NR = Tile<T>::NR;
  constexpr int W = sizeof(V) / sizeof(T);
  static_assert(NR % (VP * W) == 0, "NR must be a multiple of the pass width");
  static_assert(MR % RB == 0, "MR must be a multiple of the row block");
  // The C tile is read (or written) only after the k loop: fetching its
  // lines now hides the misses of a C far bigger than the caches.
  for (int i = 0; i < mr; ++i)
    for (int j = 0; j < nr; j += 64 / static_cast<int>(sizeof(T)))
      __builtin_prefetch(c + i * ldc + j, 1);
  for (int j0 = 0; j0 < NR; j0 += VP * W) {
    if (j0 >= nr) break;
    const int width = nr - j0 < VP * W ? nr - j0 : VP * W;
    for (int i0 = 0; i0 < mr; i0 += RB) {
      int64_t row_off[RB];
      for (int i = 0; i < RB; ++i)
        row_off[i] = kLayout == 0   ? i
                     : kLayout == 1 ? (i0 + i < mr ? i0 + i : mr - 1) * lda
                                    : (i0 + i < mr ? i0 + i : mr - 1);
      V acc[RB][VP];
#pragma GCC unroll 16
      for (int i = 0; i < RB; ++i)
#pragma GCC unroll 4
        for (int v = 0; v < VP; ++v) acc[i][v] = V{};
      const T* bp = b + j0;
      // packed rows: constant offsets from the block's first row, which
      // the compiler folds into the loads (offsets from row 0 took a
      // register each, and the spills of those rode in the k loop)
      const T* ap = kLayout == 0 ? a + i0 : a;
      const int64_t a_step = kLayout == 0 ? MR : kLayout == 1 ? 1 : -lda;
      for (int64_t k = 0; k < kc; ++k, bp += NR, ap += a_step) {
        V bv[VP];
#pragma GCC unroll 4
        for (int v = 0; v < VP; ++v) __builtin_memcpy(&bv[v], bp + v * W, sizeof(V));
#pragma GCC unroll 16
        for (int i = 0; i < RB; ++i) {
          const T ai = ap[row_off[i]];
#pragma GCC unroll 4
          for (int v = 0; v < VP; ++v) acc[i][v] += ai * bv[v];
        }
      }
      const int rows = mr - i0 < RB ? mr - i0 : RB;
      for (int i = 0; i < rows; ++i) {
        T* ci = c + (i0 + i) * ldc + j0;
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
}

template <typename T, typename V, int RB, int VP>
inline __attribute__((always_inline)) void micro_vector(int64_t kc, const T* a, int64_t lda,
                                                        const T* b, T* c, int64_t ldc, int mr,
                                                        int nr, bool accumulate) {
  if (lda == 0)
    micro_vector_body<T, V, RB, VP, 0>(kc, a, 0, b, c, ldc, mr, nr, accumulate);
  else if (lda > 0)
    micro_vector_body<T, V, RB, VP, 1>(kc, a, lda, b, c, ldc, mr, nr, accumulate);
  else
    micro_vector_body<T, V, RB, VP, 2>(kc, a, lda, b, c, ldc, mr, nr, accumulate);
}

// micro_vector for a tile of few rows (the last rows of M: 16 output
// channels are 12 + 4) in one block of 4 or 6 rows: a block costs its RB
// rows whatever mr is, and AVX-512 takes a whole tile in one block.
template <typename T, typename V, int RB, int VP>
CONVCORE_ALWAYS_INLINE void micro_vector_rows(int64_t kc, const T* a, int64_t lda, const T* b,
                                              T* c, int64_t ldc, int mr, int nr,
                                              bool accumulate) {
  if (RB > 4 && mr <= 4)
    micro_vector<T, V, 4, VP>(kc, a, lda, b, c, ldc, mr, nr, accumulate);
  else if (RB > 6 && mr <= 6)
    micro_vector<T, V, 6, VP>(kc, a, lda, b, c, ldc, mr, nr, accumulate);
  else
    micro_vector<T, V, RB, VP>(kc, a, lda, b, c, ldc, mr, nr, accumulate);
}

// Rows i0 .. i0 + RB of a gather tile from its accumulators, added to what
// the tile holds when add.
template <typename T, typename V, int RB, int VP>
CONVCORE_ALWAYS_INLINE void store_block(V (&acc)[RB][VP], int i0, int j0, T* __restrict tile,
                                        bool add) {
  constexpr int NR = Tile<T>::NR;
  constexpr int W = sizeof(V) / sizeof(T);
#pragma GCC unroll 16
  for (int i = 0; i < RB; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < VP; ++v) {
      T* dst = tile + (i0 + i) * NR + j0 + v * W;
      if (add) {
        V old;
        __builtin_memcpy(&old, dst, sizeof(V));
        acc[i][v] += old;
      }
      __builtin_memcpy(dst, &acc[i][v], sizeof(V));
    }
}

// One block of RB rows (from i0; rows past mr repeat row mr - 1 and are
// discarded) by VP vectors of columns (from j0) of gather_vector_body's tile.
template <typename T, typename V, int RB, int VP>
inline __attribute__((always_inline)) void gather_row_block(int64_t kc, const int64_t* koff,
                                                            const T* const* rows, int i0, int mr,
                                                            const T* __restrict bp, int j0,
                                                            T* __restrict tile, bool add,
                                                            const Ahead& ahead = {}) {
  constexpr int W = sizeof(V) / sizeof(T);
  V acc[RB][VP];
  // rows one vector apart (a blocked input), adjacent (a plain one, stride
  // 1) or two apart (a plain one, stride 2: first layers)
  if (rows_even<T, RB, W>(rows, i0, mr))
    gather_sums_even<T, V, RB, VP, W>(kc, koff, rows[i0], bp, acc, ahead);
  else if (rows_even<T, RB, 1>(rows, i0, mr))
    gather_sums_even<T, V, RB, VP, 1>(kc, koff, rows[i0], bp, acc, ahead);
  else if (rows_even<T, RB, 2>(rows, i0, mr))
    gather_sums_even<T, V, RB, VP, 2>(kc, koff, rows[i0], bp, acc, ahead);
  else
    gather_sums<T, V, RB, VP>(kc, koff, rows, i0, mr, bp, acc, ahead);
  store_block<T, V, RB, VP>(acc, i0, j0, tile, add);
}

// A gather tile's loops: k in chunks of kChunk, columns by VP vectors, rows
// from i0 by block(kc, kb, j0, i0, add, ahead), which runs a block of rows
// of the chunk [kb, kb + kc) and returns how many; the first block fetches
// all the lines ahead.
template <typename T, typename V, int RB, int VP, typename Block>
CONVCORE_ALWAYS_INLINE void tile_by_blocks(int64_t kc_all, int mr, int nr, bool accumulate,
                                           const Ahead& ahead_all, Block&& block) {
  constexpr int MR = Tile<T>::MR, NR = Tile<T>::NR;
  constexpr int W = sizeof(V) / sizeof(T);
  static_assert(MR % RB == 0, "MR must be a multiple of the row block");
  constexpr int64_t kChunk = MR / RB > 1 ? 128 : INT64_MAX;
  for (int64_t kb = 0; kb < kc_all; kb += kChunk) {
    const int64_t kc = std::min<int64_t>(kChunk, kc_all - kb);
    const bool add = kb > 0 || accumulate;
    for (int j0 = 0; j0 < NR && j0 < nr; j0 += VP * W)
      for (int i0 = 0; i0 < mr;) {
        const Ahead ahead = kb == 0 && j0 == 0 && i0 == 0 ? ahead_all : Ahead{};
        i0 += block(kc, kb, j0, i0, add, ahead);
      }
  }
}

// The gather microkernel (direct convolution): A(i, k) = rows[i][koff[k]],
// B packed in one NR-column panel, the tile written whole to tile[i * NR + j]
// (rows past mr are not computed; the caller discards them). Blocks as in
// micro_vector_body. k covers all C * KH * KW taps of a layer, so the B panel
// is far bigger than L1 (300 KB for AlexNet's conv2); with several row
// blocks per tile (AVX2), k runs in chunks of 128 whose slice of the panel
// (8 KB per block of columns) every row block reads while it is in L1, the
// blocks adding into the tile. A/B on this Zen 3 machine, 2 threads, min of
// 8 interleaved runs: AlexNet conv2 backward 1.08-1.11x, ResNet 3x3/2 forward
// 1.04-1.14x, 13x13 and 14x14 layers at batch 1 1.05-1.22x, the rest level
// within noise (+-4%). With one block per tile (AVX-512) nothing is reread.
template <typename T, typename V, int RB, int VP>
inline __attribute__((always_inline)) void gather_vector_body(int64_t kc_all,
                                                              const int64_t* koff_all,
                                                              const T* const* rows,
                                                              const T* __restrict b_all,
                                                              T* __restrict tile, int mr,
                                                              bool accumulate, int nr,
                                                              const Ahead& ahead_all = {}) {
  constexpr int NR = Tile<T>::NR;
  tile_by_blocks<T, V, RB, VP>(
      kc_all, mr, nr, accumulate, ahead_all,
      [&](int64_t kc, int64_t kb, int j0, int i0, bool add, const Ahead& ahead)
          __attribute__((always_inline)) -> int {
        const int64_t* koff = koff_all + kb;
        const T* b = b_all + kb * NR + j0;
        // a 7x7 image's 49 positions leave a last block of 1 of 12
        const int n = gather_block_rows<RB>(mr - i0);
        auto block = [&](auto rows_of_block) __attribute__((always_inline)) {
          gather_row_block<T, V, decltype(rows_of_block)::value, VP>(kc, koff, rows, i0, mr, b,
                                                                     j0, tile, add, ahead);
        };
        if constexpr (RB == 12) {
          if (n == RB + 1)
            block(std::integral_constant<int, RB + 1>{});
          else if (n == 4)
            block(std::integral_constant<int, 4>{});
          else if (n == 8)
            block(std::integral_constant<int, 8>{});
          else
            block(std::integral_constant<int, RB>{});
        } else if constexpr (RB == 6) {
          if (n == 3)
            block(std::integral_constant<int, 3>{});
          else
            block(std::integral_constant<int, RB>{});
        } else {
          block(std::integral_constant<int, RB>{});
        }
        return n;
      });
}

// strided_rows_kernel's sums for RB rows from a: row i at a + i * lda, the
// taps in order. Rows three apart share a base pointer and the stride sits in
// a register, so each broadcast addresses its row as base + stride * 0, 4 or
// 8 bytes: no pointer per row is loaded for each tap (gather_sums keeps
// twelve, which do not fit the general-purpose registers).
template <typename T, typename V, int RB, int VP>
CONVCORE_ALWAYS_INLINE void strided_sums(int64_t kc, const T* a, int64_t lda,
                                         const T* __restrict b, V (&acc)[RB][VP],
                                         const Ahead& ahead) {
  constexpr int NR = Tile<T>::NR, W = sizeof(V) / sizeof(T), NB = (RB + 2) / 3;
  const T* base[NB];
#pragma GCC unroll 8
  for (int j = 0; j < NB; ++j) base[j] = a + 3 * j * lda;
#pragma GCC unroll 16
  for (int i = 0; i < RB; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < VP; ++v) acc[i][v] = V{};
  for (int64_t k = 0; k < kc; ++k, b += NR) {
    fetch_ahead(ahead, 2 * k);  // two lines a tap: a panel's row is NR floats
    fetch_ahead(ahead, 2 * k + 1);
    V bv[VP];
#pragma GCC unroll 4
    for (int v = 0; v < VP; ++v) __builtin_memcpy(&bv[v], b + v * W, sizeof(V));
#pragma GCC unroll 16
    for (int i = 0; i < RB; ++i) {
      const T ai = base[i / 3][(i % 3) * lda];
#pragma GCC unroll 4
      for (int v = 0; v < VP; ++v) acc[i][v] += ai * bv[v];
    }
#pragma GCC unroll 8
    for (int j = 0; j < NB; ++j) ++base[j];
  }
}

template <typename T, typename V, int RB, int VP>
CONVCORE_ALWAYS_INLINE void strided_row_block(int64_t kc, const T* a, int64_t lda,
                                              const T* __restrict bp, int i0, int j0,
                                              T* __restrict tile, bool add, const Ahead& ahead) {
  V acc[RB][VP];
  strided_sums<T, V, RB, VP>(kc, a + i0 * lda, lda, bp, acc, ahead);
  store_block<T, V, RB, VP>(acc, i0, j0, tile, add);
}

// The last rows of a tile, fewer than a whole block (or MR + 1), in one
// block of exactly that many rows: every row is real, so none is read past
// the matrix.
template <typename T, typename V, int R, int VP>
CONVCORE_ALWAYS_INLINE void strided_last_block(int rem, int64_t kc, const T* a, int64_t lda,
                                               const T* __restrict bp, int i0, int j0,
                                               T* __restrict tile, bool add, const Ahead& ahead) {
  if (rem == R)
    strided_row_block<T, V, R, VP>(kc, a, lda, bp, i0, j0, tile, add, ahead);
  else if constexpr (R > 1)
    strided_last_block<T, V, R - 1, VP>(rem, kc, a, lda, bp, i0, j0, tile, add, ahead);
}

// strided_rows_kernel's tile, blocked as gather_vector_body.
template <typename T, typename V, int RB, int VP>
inline __attribute__((always_inline)) void strided_vector_body(int64_t kc_all, const T* a,
                                                               int64_t lda,
                                                               const T* __restrict b_all,
                                                               T* __restrict tile, int mr,
                                                               bool accumulate, int nr,
                                                               const Ahead& ahead_all) {
  constexpr int MR = Tile<T>::MR, NR = Tile<T>::NR;
  // a whole tile in one block takes MR + 1 rows in one block too
  constexpr int kLast = RB == MR ? RB + 1 : RB - 1;
  tile_by_blocks<T, V, RB, VP>(
      kc_all, mr, nr, accumulate, ahead_all,
      [&](int64_t kc, int64_t kb, int j0, int i0, bool add, const Ahead& ahead)
          __attribute__((always_inline)) -> int {
        const T* b = b_all + kb * NR + j0;
        const int rem = mr - i0;
        if (rem < RB || (RB == MR && rem == RB + 1)) {
          strided_last_block<T, V, kLast, VP>(rem, kc, a + kb, lda, b, i0, j0, tile, add, ahead);
          return rem;
        }
        strided_row_block<T, V, RB, VP>(kc, a + kb, lda, b, i0, j0, tile, add, ahead);
        return RB;
      });
}
#endif

template <typename T>
inline void gather_generic(int64_t kc, const int64_t* koff, const T* const* rows, const T* b,
                           T* tile, int mr, bool accumulate) {
  constexpr int NR = Tile<T>::NR;
  for (int i = 0; i < mr; ++i) {
    const T* r = rows[i];
    T acc[NR] = {};
    for (int64_t k = 0; k < kc; ++k)
      for (int j = 0; j < NR; ++j) acc[j] += r[koff[k]] * b[k * NR + j];
    for (int j = 0; j < NR; ++j) tile[i * NR + j] = accumulate ? tile[i * NR + j] + acc[j] : acc[j];
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

using GatherF = void (*)(int64_t, const int64_t*, const float* const*, const float*, float*, int,
                         bool, int, Ahead);
using GatherD = void (*)(int64_t, const int64_t*, const double* const*, const double*, double*,
                         int, bool, int);
void gather_generic_f(int64_t kc, const int64_t* koff, const float* const* rows, const float* b,
                      float* tile, int mr, bool acc, int, Ahead) {
  gather_generic<float>(kc, koff, rows, b, tile, mr, acc);
}
void gather_generic_d(int64_t kc, const int64_t* koff, const double* const* rows,
                      const double* b, double* tile, int mr, bool acc, int) {
  gather_generic<double>(kc, koff, rows, b, tile, mr, acc);
}

using StridedF = void (*)(int64_t, const float*, int64_t, const float*, float*, int, bool, int,
                          Ahead);
void strided_generic_f(int64_t kc, const float* a, int64_t lda, const float* b, float* tile,
                       int mr, bool accumulate, int, Ahead) {
  constexpr int NR = Tile<float>::NR;
  for (int i = 0; i < mr; ++i) {
    float acc[NR] = {};
    for (int64_t k = 0; k < kc; ++k)
      for (int j = 0; j < NR; ++j) acc[j] += a[i * lda + k] * b[k * NR + j];
    for (int j = 0; j < NR; ++j) tile[i * NR + j] = accumulate ? tile[i * NR + j] + acc[j] : acc[j];
  }
}

#if defined(__x86_64__) && defined(CONVCORE_VECTOR_KERNELS)
#define CONVCORE_X86_DISPATCH 1
#include <cpuid.h>
using simd::f32x8;
using simd::f32x16;
using simd::f64x4;
using simd::f64x8;

__attribute__((target("avx2,fma"))) void kernel_avx2_f(int64_t kc, const float* a, int64_t lda, const float* b, float* c, int64_t ldc,
                                                       int mr, int nr, bool acc) {
  if (nr <= 8)  // one vector of columns (a part-filled last panel): every row at once
    micro_vector_rows<float, f32x8, 12, 1>(kc, a, lda, b, c, ldc, mr, nr, acc);
  else
    micro_vector_rows<float, f32x8, 6, 2>(kc, a, lda, b, c, ldc, mr, nr, acc);
}
__attribute__((target("avx2,fma"))) void kernel_avx2_d(int64_t kc, const double* a, int64_t lda, const double* b, double* c, int64_t ldc,
                                                       int mr, int nr, bool acc) {
  micro_vector_rows<double, f64x4, 6, 2>(kc, a, lda, b, c, ldc, mr, nr, acc);
}
__attribute__((target("avx512f,fma"))) void kernel_avx512_f(int64_t kc, const float* a, int64_t lda, const float* b, float* c,
                                                            int64_t ldc, int mr, int nr,
                                                            bool acc) {
  if (nr <= 16)  // one vector of columns (a part-filled last panel): half the FMAs
    micro_vector_rows<float, f32x16, 12, 1>(kc, a, lda, b, c, ldc, mr, nr, acc);
  else
    micro_vector_rows<float, f32x16, 12, 2>(kc, a, lda, b, c, ldc, mr, nr, acc);
}
__attribute__((target("avx512f,fma"))) void kernel_avx512_d(int64_t kc, const double* a, int64_t lda, const double* b, double* c,
                                                            int64_t ldc, int mr, int nr,
                                                            bool acc) {
  micro_vector_rows<double, f64x8, 12, 2>(kc, a, lda, b, c, ldc, mr, nr, acc);
}
__attribute__((target("avx2,fma"))) void gather_avx2_f(int64_t kc, const int64_t* koff,
                                                       const float* const* rows, const float* b,
                                                       float* tile, int mr, bool acc, int nr,
                                                       Ahead ahead) {
  if (nr <= 8)  // one vector of columns: every row at once
    gather_vector_body<float, f32x8, 12, 1>(kc, koff, rows, b, tile, mr, acc, nr, ahead);
  else
    gather_vector_body<float, f32x8, 6, 2>(kc, koff, rows, b, tile, mr, acc, nr, ahead);
}
__attribute__((target("avx2,fma"))) void strided_avx2_f(int64_t kc, const float* a, int64_t lda,
                                                        const float* b, float* tile, int mr,
                                                        bool acc, int nr, Ahead ahead) {
  if (nr <= 8)
    strided_vector_body<float, f32x8, 12, 1>(kc, a, lda, b, tile, mr, acc, nr, ahead);
  else
    strided_vector_body<float, f32x8, 6, 2>(kc, a, lda, b, tile, mr, acc, nr, ahead);
}
__attribute__((target("avx2,fma"))) void gather_avx2_d(int64_t kc, const int64_t* koff,
                                                       const double* const* rows,
                                                       const double* b, double* tile, int mr, bool acc, int nr) {
  gather_vector_body<double, f64x4, 6, 2>(kc, koff, rows, b, tile, mr, acc, nr);
}
__attribute__((target("avx512f,fma"))) void gather_avx512_f(int64_t kc, const int64_t* koff,
                                                            const float* const* rows,
                                                            const float* b, float* tile, int mr, bool acc, int nr,
                                                            Ahead ahead) {
  if (nr <= 16)  // one vector of columns
    gather_vector_body<float, f32x16, 12, 1>(kc, koff, rows, b, tile, mr, acc, nr, ahead);
  else
    gather_vector_body<float, f32x16, 12, 2>(kc, koff, rows, b, tile, mr, acc, nr, ahead);
}
__attribute__((target("avx512f,fma"))) void strided_avx512_f(int64_t kc, const float* a,
                                                             int64_t lda, const float* b,
                                                             float* tile, int mr, bool acc,
                                                             int nr, Ahead ahead) {
  if (nr <= 16)
    strided_vector_body<float, f32x16, 12, 1>(kc, a, lda, b, tile, mr, acc, nr, ahead);
  else
    strided_vector_body<float, f32x16, 12, 2>(kc, a, lda, b, tile, mr, acc, nr, ahead);
}
__attribute__((target("avx512f,fma"))) void gather_avx512_d(int64_t kc, const int64_t* koff,
                                                            const double* const* rows,
                                                            const double* b, double* tile,
                                                            int mr, bool acc, int nr) {
  gather_vector_body<double, f64x8, 12, 2>(kc, koff, rows, b, tile, mr, acc, nr);
}
#endif

template <typename T>
inline __attribute__((always_inline)) void store_transposed_scalar(const T* tile, int64_t q0,
                                                                  int64_t rows, int64_t j0,
                                                                  int64_t cols, const T* bias,
                                                                  T* dst, int64_t ld) {
  constexpr int NR = Tile<T>::NR;
  for (int64_t j = j0; j < cols; ++j) {
    const T bj = bias ? bias[j] : T(0);
    for (int64_t q = q0; q < rows; ++q) dst[j * ld + q] = tile[q * NR + j] + bj;
  }
}
void store_transposed_generic_f(const float* tile, int64_t rows, int64_t cols, const float* bias,
                                float* dst, int64_t ld) {
  store_transposed_scalar(tile, 0, rows, 0, cols, bias, dst, ld);
}
void store_transposed_generic_d(const double* tile, int64_t rows, int64_t cols,
                                const double* bias, double* dst, int64_t ld) {
  store_transposed_scalar(tile, 0, rows, 0, cols, bias, dst, ld);
}
using StoreF = void (*)(const float*, int64_t, int64_t, const float*, float*, int64_t);
using StoreD = void (*)(const double*, int64_t, int64_t, const double*, double*, int64_t);

#if defined(CONVCORE_X86_DISPATCH)
#define CONVCORE_SHUFFLE8(a, b, ...) CONVCORE_SHUFFLE(simd::i32x8, a, b, __VA_ARGS__)
// 8 x 8 blocks: 8 rows of the tile (8 channels each) loaded, transposed in
// three rounds of shuffles, stored as 8 positions of each channel. The
// scalar loop, one strided load per element, took a fifth of ResNet conv1's
// forward (3 input channels: 147 taps per output, little work per store).
inline __attribute__((always_inline)) void store_transposed_f32x8(const float* tile, int64_t rows,
                                                                 int64_t cols, const float* bias,
                                                                 float* dst, int64_t ld) {
  constexpr int NR = Tile<float>::NR;
  const int64_t rows8 = rows / 8 * 8, cols8 = cols / 8 * 8;
  for (int64_t j0 = 0; j0 < cols8; j0 += 8) {
    f32x8 bv = f32x8{};
    if (bias) simd::load_vec(bv, bias + j0);
    for (int64_t q0 = 0; q0 < rows8; q0 += 8) {
      f32x8 r[8];
      for (int i = 0; i < 8; ++i) simd::load_vec(r[i], tile + (q0 + i) * NR + j0);
      f32x8 t[8], u[8], c[8];
      for (int i = 0; i < 8; i += 2) {
        t[i] = CONVCORE_SHUFFLE8(r[i], r[i + 1], 0, 8, 1, 9, 4, 12, 5, 13);
        t[i + 1] = CONVCORE_SHUFFLE8(r[i], r[i + 1], 2, 10, 3, 11, 6, 14, 7, 15);
      }
      for (int i = 0; i < 8; i += 4)
        for (int h = 0; h < 2; ++h) {
          u[i + 2 * h] = CONVCORE_SHUFFLE8(t[i + h], t[i + h + 2], 0, 1, 8, 9, 4, 5, 12, 13);
          u[i + 2 * h + 1] = CONVCORE_SHUFFLE8(t[i + h], t[i + h + 2], 2, 3, 10, 11, 6, 7, 14, 15);
        }
      // u[m] (m < 4) holds channels m and m + 4 of rows 0-3; u[m + 4] of rows 4-7.
      for (int m = 0; m < 4; ++m) {
        c[m] = CONVCORE_SHUFFLE8(u[m], u[m + 4], 0, 1, 2, 3, 8, 9, 10, 11);
        c[m + 4] = CONVCORE_SHUFFLE8(u[m], u[m + 4], 4, 5, 6, 7, 12, 13, 14, 15);
      }
      for (int j = 0; j < 8; ++j) {
        simd::store_vec(dst + (j0 + j) * ld + q0, c[j] + bv[j]);
      }
    }
    store_transposed_scalar(tile, rows8, rows, j0, j0 + 8, bias, dst, ld);
  }
  store_transposed_scalar(tile, 0, rows, cols8, cols, bias, dst, ld);
}
#undef CONVCORE_SHUFFLE8
// 16 x 16 blocks with AVX-512: 16 positions of each of 16 channels per
// store, half the stores of 8 x 8 blocks and fewer shuffles per element
// (the rest in 8 x 8 blocks).
__attribute__((target("avx512f"))) void store_transposed_avx512_f(const float* tile, int64_t rows,
                                                                  int64_t cols, const float* bias,
                                                                  float* dst, int64_t ld) {
  constexpr int NR = Tile<float>::NR;
  const int64_t rows16 = rows / 16 * 16, cols16 = cols / 16 * 16;
  for (int64_t j0 = 0; j0 < cols16; j0 += 16) {
    for (int64_t q0 = 0; q0 < rows16; q0 += 16) {
      f32x16 r[16];  // (memcpy, not blocked::load: a vector return out of an AVX-512 target)
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i) __builtin_memcpy(&r[i], tile + (q0 + i) * NR + j0, sizeof r[i]);
      blocked::transpose<16>(r);
#pragma GCC unroll 16
      for (int j = 0; j < 16; ++j) {
        const f32x16 out = bias ? r[j] + bias[j0 + j] : r[j];
        __builtin_memcpy(dst + (j0 + j) * ld + q0, &out, sizeof out);
      }
    }
    store_transposed_f32x8(tile + rows16 * NR + j0, rows - rows16, 16, bias ? bias + j0 : nullptr,
                           dst + j0 * ld + rows16, ld);
  }
  store_transposed_f32x8(tile + cols16, rows, cols - cols16, bias ? bias + cols16 : nullptr,
                         dst + cols16 * ld, ld);
}
__attribute__((target("avx2,fma"))) void store_transposed_avx2_f(const float* tile, int64_t rows,
                                                                 int64_t cols, const float* bias,
                                                                 float* dst, int64_t ld) {
  store_transposed_f32x8(tile, rows, cols, bias, dst, ld);
}
#endif

#ifdef CONVCORE_X86_DISPATCH
// AMD's CPU family 0x19 (Zen 3 and Zen 4; of these only Zen 4 has
// AVX-512, on 256-bit units).
bool amd_family_19h() {
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid(0, &a, &b, &c, &d) || b != 0x68747541u)  // "AuthenticAMD"
    return false;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return false;
  unsigned family = (a >> 8) & 0xfu;
  if (family == 0xfu) family += (a >> 20) & 0xffu;
  return family == 0x19u;
}
#endif

struct Dispatch {
  KernelF f = kernel_generic_f;
  KernelD d = kernel_generic_d;
  GatherF gf = gather_generic_f;
  GatherD gd = gather_generic_d;
  StridedF rf = strided_generic_f;
  StoreF sf = store_transposed_generic_f;
  StoreD sd = store_transposed_generic_d;
  int level = 0;  // 0 generic, 1 avx2, 2 avx512
  bool full_width = false;  // AVX-512 on 512-bit FMA units
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
      rf = strided_avx512_f;
      sf = store_transposed_avx512_f;
      level = 2;
      full_width = !amd_family_19h();
    } else if (max_level >= 1 && __builtin_cpu_supports("avx2") &&
               __builtin_cpu_supports("fma")) {
      f = kernel_avx2_f;
      d = kernel_avx2_d;
      gf = gather_avx2_f;
      gd = gather_avx2_d;
      rf = strided_avx2_f;
      sf = store_transposed_avx2_f;
      level = 1;
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
                   float* tile, int mr, bool accumulate, int nr, Ahead ahead) {
  dispatch().gf(kc, koff, rows, b, tile, mr, accumulate, nr, ahead);
}
void gather_kernel(int64_t kc, const int64_t* koff, const double* const* rows, const double* b,
                   double* tile, int mr, bool accumulate, int nr) {
  dispatch().gd(kc, koff, rows, b, tile, mr, accumulate, nr);
}

void strided_rows_kernel(int64_t kc, const float* a, int64_t lda, const float* b, float* tile,
                         int mr, bool accumulate, int nr, Ahead ahead) {
  dispatch().rf(kc, a, lda, b, tile, mr, accumulate, nr, ahead);
}

void store_transposed(const float* tile, int64_t rows, int64_t cols, const float* bias,
                      float* dst, int64_t ld) {
  dispatch().sf(tile, rows, cols, bias, dst, ld);
}
void store_transposed(const double* tile, int64_t rows, int64_t cols, const double* bias,
                      double* dst, int64_t ld) {
  dispatch().sd(tile, rows, cols, bias, dst, ld);
}

const char* isa_name() {
  static const char* const names[] = {"generic", "avx2", "avx512"};
  return names[dispatch().level];
}
int isa_level() { return dispatch().level; }
bool avx512_full_width() { return dispatch().full_width; }

bool columns_in_place_pay(int64_t column_bytes) {
  return isa_level() != 1 || column_bytes < 4096;
}

}  // namespace gemm

const char* gemm_isa() { return gemm::isa_name(); }
bool gemm_avx512_full_width() { return gemm::avx512_full_width(); }

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

int64_t balanced_width(int64_t n, int64_t max_width, int64_t grain, int threads) {
  const int64_t fewest = (n + max_width - 1) / max_width;
  int64_t best = round_up((n + fewest - 1) / fewest, grain), best_span = INT64_MAX;
  // Try block counts up to twice the fewest; a thread's share is its number
  // of blocks (ceil(blocks / threads)) times the width.
  for (int64_t blocks = fewest; blocks <= 2 * fewest; ++blocks) {
    const int64_t w = round_up((n + blocks - 1) / blocks, grain);
    if (w > max_width) continue;
    const int64_t used = (n + w - 1) / w;
    const int64_t span = (used + threads - 1) / threads * w;
    if (span < best_span) best_span = span, best = w;
  }
  return best;
}

namespace {

// Few rows (under 4 * MR, or fewer row blocks than threads): A is packed
// whole, tasks are column blocks of C with all its rows, so each packed
// block of B serves every row (packing it once per row block cost more than
// the multiply); rows are split only when there are too few column blocks.
// The block width evens out the threads' shares: 2048 columns in blocks of
// NC = 384 gave 2 threads 1152 and 896 columns; balanced_width makes 8
// blocks of 256.
template <typename T>
void gemm_by_column_blocks(int64_t M, int64_t N, int64_t K, const T* a, int64_t a_rs, int64_t a_cs,
                  const T* b, int64_t b_rs, int64_t b_cs, T* c, int64_t ldc, bool accumulate) {
  detail::Workspace<T> a_ws(1, packed_a_size<T>(M, K));
  T* a_packed = a_ws.get();
  pack_a_parallel(M, K, a, a_rs, a_cs, a_packed);
  const int nthreads = get_num_threads();
  const int64_t width = balanced_width(N, NC, Tile<T>::NR, nthreads);
  const int64_t nblocks = (N + width - 1) / width;
  int64_t mblocks = 1;
  if (nblocks < nthreads)
    mblocks = std::min<int64_t>((nthreads + nblocks - 1) / nblocks, (M + MC - 1) / MC);
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
      const int64_t i0 = (t % mblocks) * mrows, j0 = (t / mblocks) * width;
      const int64_t mc = std::min(mrows, M - i0), nc = std::min(width, N - j0);
      const StridedPackB<T> pack_block{b + j0 * b_cs, b_rs, b_cs};
      gemm_packed(mc, nc, K, a_packed, M, i0, pack_block, c + i0 * ldc + j0, ldc,
                  accumulate, bbuf);
    }
  }
}

}  // namespace

// Enough rows: the BLIS order. For each slab of KC rows of B (and at most
// kSlabCols columns), the threads pack the slab once, together, into a
// shared buffer (2 MB for 2048 columns: it stays in L3); then each thread
// takes its row blocks of C (balanced_width rows, at most MC), packs that
// block of A into its own buffer (in L2) and multiplies it by every panel
// of the slab. A is read from memory once and B once per slab, where
// packing all of A first (16 MB for 2048^2, a copy the size of a linear
// layer's input) streamed it through every column block. Scratch for 2048^3:
// 2.3 MB instead of 16.3, bounded by the slab; speed measured level on a
// Zen 3 (0.87-0.91 of numpy's SGEMM against 0.87-0.92 before).
// Each element's K reduction runs in a fixed order whatever the split.
template <typename T>
void gemm_strided(int64_t M, int64_t N, int64_t K, const T* a, int64_t a_rs, int64_t a_cs,
                  const T* b, int64_t b_rs, int64_t b_cs, T* c, int64_t ldc, bool accumulate) {
  constexpr int MR = Tile<T>::MR, NR = Tile<T>::NR;
  constexpr int64_t kSlabCols = 4096;
  if (M <= 0 || N <= 0) return;
  const int nthreads = get_num_threads();
  const int64_t rows = balanced_width(M, MC, MR, nthreads);
  const int64_t mblocks = (M + rows - 1) / rows;
  const int threads = detail::threads_for(mblocks, M * N * K);
  if (K <= 0 || M < 4 * MR || mblocks < nthreads) {
    gemm_by_column_blocks(M, N, K, a, a_rs, a_cs, b, b_rs, b_cs, c, ldc, accumulate);
    return;
  }
  const int64_t slab_cols = std::min(N, kSlabCols);
  detail::Workspace<T> b_ws(1, KC * round_up(slab_cols, NR));
  detail::Workspace<T> a_ws(threads, KC * round_up(rows, MR));
  T* slab = b_ws.get();
  const StridedPackB<T> pack_b{b, b_rs, b_cs};
#pragma omp parallel num_threads(threads)
  {
    T* ablock = a_ws.get(omp_get_thread_num());
    for (int64_t jc = 0; jc < N; jc += slab_cols) {
      const int64_t nc = std::min(slab_cols, N - jc), panels = (nc + NR - 1) / NR;
      for (int64_t k0 = 0; k0 < K; k0 += KC) {
        const int64_t kc = std::min(KC, K - k0);
#pragma omp for schedule(static)
        for (int64_t p = 0; p < panels; ++p)
          pack_b(k0, kc, jc + p * NR, std::min<int64_t>(NR, nc - p * NR), slab + p * NR * kc);
        const bool acc = accumulate || k0 > 0;
        // Blocks handed out one by one: with a static split, a thread slowed
        // by another process held the other at each slab's barrier (2048^3 at
        // 2 threads on a shared Zen 3, in-process A/B, 4 runs: 0.81-0.85 of
        // OpenBLAS static, 0.87-1.01 dynamic). Each block is one thread's whole
        // work for the slab, so the sums' order does not depend on the split.
#pragma omp for schedule(dynamic, 1)
        for (int64_t mb = 0; mb < mblocks; ++mb) {
          const int64_t i0 = mb * rows, mc = std::min(rows, M - i0);
          for (int64_t ip = 0; ip < mc; ip += MR)
            pack_a_panel(i0 + mc, a, a_rs, a_cs, i0 + ip, k0, kc, ablock + ip * kc);
          for (int64_t jr = 0; jr < nc; jr += NR) {
            const int nr = static_cast<int>(std::min<int64_t>(NR, nc - jr));
            for (int64_t ir = 0; ir < mc; ir += MR)
              micro_kernel(kc, ablock + ir * kc, 0, slab + jr * kc, c + (i0 + ir) * ldc + jc + jr,
                           ldc, static_cast<int>(std::min<int64_t>(MR, mc - ir)), nr, acc);
          }
        }
      }
    }
  }
}

template void gemm_strided<float>(int64_t, int64_t, int64_t, const float*, int64_t, int64_t,
                                  const float*, int64_t, int64_t, float*, int64_t, bool);
template void gemm_strided<double>(int64_t, int64_t, int64_t, const double*, int64_t, int64_t,
                                   const double*, int64_t, int64_t, double*, int64_t, bool);

}  // namespace gemm
}  // namespace convcore
