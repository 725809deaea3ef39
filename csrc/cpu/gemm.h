// Cache-blocked matrix product C[M,N] (+)= A[M,K] * B[K,N] in the BLIS style:
// A is packed into MR-row panels, B into NR-column panels by a caller-given
// packer (so convolution can pack B straight from the image: implicit im2col,
// no column buffer), and a register-blocked microkernel computes MR x NR
// tiles. C has unit column stride.
//
// The seam for faster code: a new microkernel plugs into micro_kernel();
// other algorithms (winograd, direct depthwise) plug in beside gemm_packed()
// in the conv_*.cpp files, chosen by conv_plan.cpp.
#pragma once
#include <algorithm>
#include <cstdlib>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "simd.h"

namespace convcore {
namespace gemm {

template <typename T>
struct Tile;
// 12 x 2 vectors of AVX-512: 24 accumulators, enough independent FMA chains
// to hide FMA latency on both pipes (12 were measured to reach only half
// of the FMA peak on an AVX-512 machine). AVX2 computes the same tile in
// four 6 x 2-vector blocks (gemm.cpp).
template <>
struct Tile<float> {
  static constexpr int MR = 12, NR = 32;
};
template <>
struct Tile<double> {
  static constexpr int MR = 12, NR = 16;
};

// Cache blocking: a KC x NR panel of B stays in L1, an MC x KC block of A in L2.
constexpr int64_t KC = 256;
constexpr int64_t MC = 144;
constexpr int64_t NC = 384;

static_assert(MC % Tile<float>::MR == 0 && MC % Tile<double>::MR == 0, "MC must be a multiple of MR");

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// c[0:mr, 0:nr] (+)= sum_k A(i, k) * b[k*NR + j]; c row stride ldc. A is a
// packed panel, A(i, k) = a[k*MR + i], when lda == 0; else it is read where
// it lies (only rows < mr are read): by rows, A(i, k) = a[i*lda + k], when
// lda > 0, by columns, A(i, k) = a[k*(-lda) + i], when lda < 0 (a
// transposed matrix, such as a layer's weights for its grad_input).
void micro_kernel(int64_t kc, const float* a, int64_t lda, const float* b, float* c, int64_t ldc,
                  int mr, int nr, bool accumulate);
void micro_kernel(int64_t kc, const double* a, int64_t lda, const double* b, double* c,
                  int64_t ldc, int mr, int nr, bool accumulate);

// Memory a gather kernel fetches into L2 while it runs, one 64-byte line per
// tap from the first: the weights its caller reads next. At few positions
// (batch 1, 7x7 images) each weight serves few tiles, and a tile that
// streamed a slice of weights from memory waited on it.
struct Ahead {
  const void* from = nullptr;
  int64_t lines = 0;
};

CONVCORE_ALWAYS_INLINE void fetch_ahead(const Ahead& ahead, int64_t k) {
  if (k < ahead.lines) __builtin_prefetch(static_cast<const char*>(ahead.from) + k * 64, 0, 1);
}

// The microkernel with a gathered A, for direct convolution:
// tile[i * NR + j] (+)= sum_{k < kc} rows[i][koff[k]] * b[k * NR + j] for
// i < mr, j < NR (rows i >= mr of tile may be left unwritten); mr <= MR, or
// MR + 1 where the tile has room for it (a last tile of MR + 1 rows runs as
// one block instead of two); b is one packed
// NR-column panel. With nr < NR, only the columns j < nr are needed and
// those past them may be left unwritten: nr within one vector runs every
// row against that one vector (blocked grouped convolutions' narrow panels).
// A(i, k) is read in place, so an image needs no im2col packing: row i
// points at the input window of output position i, koff[k] is the offset of
// tap k inside every window.
void gather_kernel(int64_t kc, const int64_t* koff, const float* const* rows, const float* b,
                   float* tile, int mr, bool accumulate = false, int nr = Tile<float>::NR,
                   Ahead ahead = {});
void gather_kernel(int64_t kc, const int64_t* koff, const double* const* rows, const double* b,
                   double* tile, int mr, bool accumulate = false, int nr = Tile<double>::NR);
// gather_kernel for a matrix read by rows in place with the taps in order:
// tile[i * NR + j] (+)= sum_{k < kc} a[i * lda + k] * b[k * NR + j], for
// mr <= MR + 1 rows (gather_tile_rows) and nr columns as gather_kernel (the
// blocked Winograd products: a point's tiles by input channels). The same
// sums in the same order as gather_kernel with rows[i] = a + i * lda and
// koff[k] = k. ahead: two lines a tap.
void strided_rows_kernel(int64_t kc, const float* a, int64_t lda, const float* b, float* tile,
                         int mr, bool accumulate = false, int nr = Tile<float>::NR,
                         Ahead ahead = {});
// Rows of the float tile that starts `left` rows before the end of a block:
// MR, fewer at the end, or MR + 1 where that is all that is left, which the
// AVX-512 kernels run as one block of 13 rows instead of a block of 12 and
// one of 4 for a single row (a 7x7 image's 49 positions, a 13x13 image's
// 169, a band of 13 Winograd tiles).
inline int gather_tile_rows(int64_t left) {
  constexpr int MR = Tile<float>::MR;
  return left == MR + 1 ? MR + 1 : static_cast<int>(left < MR ? left : MR);
}

// Rows of the block of a gather tile that starts `left` rows before the
// tile's end, for blocks of RB rows: a short last block takes fewer rows (4
// or 8 of 12, 3 of 6: the same sums without the discarded rows), and a tile
// of MR + 1 rows (gather_tile_rows) one block of 13, whose 26 accumulators
// still fit AVX-512's 32 vector registers.
template <int RB>
constexpr int gather_block_rows(int left) {
  if constexpr (RB == 12)
    return left == RB + 1 ? RB + 1 : left <= 4 ? 4 : left <= 8 ? 8 : RB;
  else if constexpr (RB == 6)
    return left <= 3 ? 3 : RB;
  else
    return RB;
}

// The gather microkernel's sums, shared by gather_kernel and the blocked
// convolution's output-stage kernel: acc[i][v] = sum over k < kc of
// rows[i0 + i][koff[k]] * b[k * NR + v * W ...] for a block of RB rows (rows
// past mr repeat row mr - 1) by VP vectors V of W lanes, b starting at the
// block's columns. Always inlined: compiled for the caller's instruction set.
template <typename T, typename V, int RB, int VP>
CONVCORE_ALWAYS_INLINE void gather_sums(int64_t kc, const int64_t* koff, const T* const* rows,
                                        int i0, int mr, const T* b, V (&acc)[RB][VP],
                                        const Ahead& ahead = {}) {
  constexpr int NR = Tile<T>::NR, W = sizeof(V) / sizeof(T);
  const T* r[RB];
  for (int i = 0; i < RB; ++i) r[i] = rows[i0 + i < mr ? i0 + i : mr - 1];
#pragma GCC unroll 16
  for (int i = 0; i < RB; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < VP; ++v) acc[i][v] = V{};
  for (int64_t k = 0; k < kc; ++k, b += NR) {
    fetch_ahead(ahead, k);
    const int64_t off = koff[k];
    V bv[VP];
#pragma GCC unroll 4
    for (int v = 0; v < VP; ++v) __builtin_memcpy(&bv[v], b + v * W, sizeof(V));
#pragma GCC unroll 16
    for (int i = 0; i < RB; ++i) {
      const T ai = r[i][off];
#pragma GCC unroll 4
      for (int v = 0; v < VP; ++v) acc[i][v] += ai * bv[v];
    }
  }
}

// gather_sums for rows STEP elements apart (rows[i0 + i] == row0 + i * STEP
// for every i < RB: positions along one output row at stride 1, or across
// rows of a 1x1 convolution): each tap's RB values sit at fixed offsets from
// one pointer, so no row pointer is held per row (12 of them did not fit in
// the general-purpose registers and were spilled). The same sums.
template <typename T, typename V, int RB, int VP, int STEP>
CONVCORE_ALWAYS_INLINE void gather_sums_even(int64_t kc, const int64_t* koff, const T* row0,
                                             const T* b, V (&acc)[RB][VP],
                                             const Ahead& ahead = {}) {
  constexpr int NR = Tile<T>::NR, W = sizeof(V) / sizeof(T);
#pragma GCC unroll 16
  for (int i = 0; i < RB; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < VP; ++v) acc[i][v] = V{};
  for (int64_t k = 0; k < kc; ++k, b += NR) {
    fetch_ahead(ahead, k);
    const T* a = row0 + koff[k];
    V bv[VP];
#pragma GCC unroll 4
    for (int v = 0; v < VP; ++v) __builtin_memcpy(&bv[v], b + v * W, sizeof(V));
#pragma GCC unroll 16
    for (int i = 0; i < RB; ++i) {
      const T ai = a[i * STEP];
#pragma GCC unroll 4
      for (int v = 0; v < VP; ++v) acc[i][v] += ai * bv[v];
    }
  }
}

// Whether rows[i0 .. i0 + RB) are STEP elements apart (all RB of them real).
template <typename T, int RB, int STEP>
CONVCORE_ALWAYS_INLINE bool rows_even(const T* const* rows, int i0, int mr) {
  if (i0 + RB > mr) return false;
  for (int i = 1; i < RB; ++i)
    if (rows[i0 + i] != rows[i0] + i * STEP) return false;
  return true;
}

// dst[j * ld + q] = tile[q * NR + j] (+ bias[j] unless null) for q < rows,
// j < cols: gather_kernel's tiles (positions x channels) written out as
// channel rows (NCHW), in 8 x 8 blocks transposed in registers where the ISA
// has 8-lane float vectors.
void store_transposed(const float* tile, int64_t rows, int64_t cols, const float* bias,
                      float* dst, int64_t ld);
void store_transposed(const double* tile, int64_t rows, int64_t cols, const double* bias,
                      double* dst, int64_t ld);

// Name of the instruction set the microkernel was dispatched to, and its
// level: 0 the portable code, 1 AVX2 + FMA, 2 AVX-512. CONVCORE_ISA caps it.
const char* isa_name();
int isa_level();
// gemm_avx512_full_width (convcore/threading.h).
bool avx512_full_width();

// Whether micro_kernel reads A by columns in place (lda < 0) about as fast
// as a packed panel, for columns `column_bytes` apart. AVX2's kernel reads
// each panel twice (two blocks of 6 rows), and columns 4 KB or more apart
// fall in one set of L1, so the second pass missed (a 1024-channel layer's
// grad_input at 14x14, batch 1: 2.5 against 1.9 ms packed).
bool columns_in_place_pay(int64_t column_bytes);

// Defines `void NAME PARAMS` as a call of BODY ARGS (an always-inline
// template) compiled for AVX-512, AVX2 and the baseline, picked by
// isa_level(), so that CONVCORE_ISA caps these kernels as it caps the GEMM
// and the tests reach every level on one machine (target_clones picked by
// the CPU alone). CONVCORE_ISA_DISPATCH3 takes a body per level (the
// blocked kernels' BODY<16> for AVX-512, BODY<8> for the others).
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define CONVCORE_ISA_DISPATCH3(NAME, BODY_AVX512, BODY_AVX2, BODY_GENERIC, PARAMS, ARGS)     \
  __attribute__((target("avx512f,fma"))) inline void NAME##_avx512 PARAMS {                \
    BODY_AVX512 ARGS;                                                                      \
  }                                                                                        \
  __attribute__((target("avx2,fma"))) inline void NAME##_avx2 PARAMS { BODY_AVX2 ARGS; }    \
  inline void NAME##_generic PARAMS { BODY_GENERIC ARGS; }                                 \
  inline void NAME PARAMS {                                                                \
    switch (::convcore::gemm::isa_level()) {                                               \
      case 2: NAME##_avx512 ARGS; return;                                                  \
      case 1: NAME##_avx2 ARGS; return;                                                    \
      default: NAME##_generic ARGS; return;                                                \
    }                                                                                      \
  }
#else
#define CONVCORE_ISA_DISPATCH3(NAME, BODY_AVX512, BODY_AVX2, BODY_GENERIC, PARAMS, ARGS) \
  inline void NAME PARAMS { BODY_GENERIC ARGS; }
#endif
#define CONVCORE_ISA_DISPATCH(NAME, BODY, PARAMS, ARGS) \
  CONVCORE_ISA_DISPATCH3(NAME, BODY, BODY, BODY, PARAMS, ARGS)

// Size of the packed form of an M x K matrix A.
template <typename T>
int64_t packed_a_size(int64_t M, int64_t K) {
  return round_up(M, Tile<T>::MR) * K;
}

// dst[row_of(c) * dst_ld + r] = src[r * ld + c] for r < rows, c < cols,
// where row_of(c) is row_of[c], or c when row_of is null: the packers' copy
// of an operand stored the other way round, its columns optionally going to
// rows in another order (the direct convolutions' tap orders). Float goes
// in 4 x 4 blocks transposed in registers (SSE shuffles, baseline x86-64);
// one scalar load and store per element took 4% of a 2048^3 SGEMM for A and
// as much for B. Columns go 64 at a time, so the destination lines being
// filled stay in L1.
template <typename T>
inline void transpose_copy(const T* src, int64_t ld, int64_t rows, int64_t cols, T* dst,
                           int64_t dst_ld, const int64_t* row_of = nullptr) {
  auto dst_row = [&](int64_t c) { return dst + (row_of ? row_of[c] : c) * dst_ld; };
  for (int64_t cb = 0; cb < cols; cb += 64) {
    const int64_t ce = std::min<int64_t>(cols, cb + 64);
    int64_t r0 = 0;
#if defined(CONVCORE_HAVE_VECTOR_TYPES)
    if constexpr (std::is_same_v<T, float>) {
      using simd::f32x4;
#define CONVCORE_SHUFFLE4(a, b, ...) CONVCORE_SHUFFLE(simd::i32x4, a, b, __VA_ARGS__)
      for (; r0 + 4 <= rows; r0 += 4) {
        int64_t c0 = cb;
        for (; c0 + 4 <= ce; c0 += 4) {
          f32x4 r[4];
          for (int i = 0; i < 4; ++i) simd::load_vec(r[i], src + (r0 + i) * ld + c0);
          const f32x4 t0 = CONVCORE_SHUFFLE4(r[0], r[1], 0, 4, 1, 5);
          const f32x4 t1 = CONVCORE_SHUFFLE4(r[0], r[1], 2, 6, 3, 7);
          const f32x4 t2 = CONVCORE_SHUFFLE4(r[2], r[3], 0, 4, 1, 5);
          const f32x4 t3 = CONVCORE_SHUFFLE4(r[2], r[3], 2, 6, 3, 7);
          simd::store_vec(dst_row(c0) + r0, CONVCORE_SHUFFLE4(t0, t2, 0, 1, 4, 5));
          simd::store_vec(dst_row(c0 + 1) + r0, CONVCORE_SHUFFLE4(t0, t2, 2, 3, 6, 7));
          simd::store_vec(dst_row(c0 + 2) + r0, CONVCORE_SHUFFLE4(t1, t3, 0, 1, 4, 5));
          simd::store_vec(dst_row(c0 + 3) + r0, CONVCORE_SHUFFLE4(t1, t3, 2, 3, 6, 7));
        }
        for (; c0 < ce; ++c0)
          for (int64_t r = r0; r < r0 + 4; ++r) dst_row(c0)[r] = src[r * ld + c0];
      }
#undef CONVCORE_SHUFFLE4
    }
#endif
    for (; r0 < rows; ++r0)
      for (int64_t c = cb; c < ce; ++c) dst_row(c)[r0] = src[r0 * ld + c];
  }
}

// Packs A(i, k) = a[i * rs + k * cs] into K-blocks of MR-row panels:
// block k0 starts at k0 * Mpad, its panel for row i0 at i0 * kc.
// Packs the MR-row panel of rows [i0, i0 + MR) of one K block; reads along
// whichever of A's dimensions is contiguous.
template <typename T>
void pack_a_panel(int64_t M, const T* a, int64_t rs, int64_t cs, int64_t i0, int64_t k0,
                  int64_t kc, T* panel) {
  constexpr int MR = Tile<T>::MR;
  const int rows = static_cast<int>(std::min<int64_t>(MR, M - i0));
  if (cs == 1) {  // rows of A contiguous (the usual case)
    transpose_copy(a + i0 * rs + k0, rs, rows, kc, panel, MR);
    for (int i = rows; i < MR; ++i)
      for (int64_t k = 0; k < kc; ++k) panel[k * MR + i] = T(0);
  } else if (std::abs(cs) <= std::abs(rs)) {  // rows of A contiguous-ish: row by row
    for (int i = 0; i < rows; ++i) {
      const T* src = a + (i0 + i) * rs + k0 * cs;
      for (int64_t k = 0; k < kc; ++k) panel[k * MR + i] = src[k * cs];
    }
    for (int i = rows; i < MR; ++i)
      for (int64_t k = 0; k < kc; ++k) panel[k * MR + i] = T(0);
  } else {  // columns of A are contiguous: k by k
    for (int64_t k = 0; k < kc; ++k) {
      const T* src = a + i0 * rs + (k0 + k) * cs;
      for (int i = 0; i < rows; ++i) panel[k * MR + i] = src[i * rs];
      for (int i = rows; i < MR; ++i) panel[k * MR + i] = T(0);
    }
  }
}

// Number of MR-row panels times K blocks: the units pack_a_part packs.
template <typename T>
int64_t pack_a_units(int64_t M, int64_t K) {
  return ((M + Tile<T>::MR - 1) / Tile<T>::MR) * ((K + KC - 1) / KC);
}

// Packs units [u0, u1) of pack_a's layout, so that callers can split the
// packing among threads.
template <typename T>
void pack_a_part(int64_t M, int64_t K, const T* a, int64_t rs, int64_t cs, T* dst, int64_t u0,
                 int64_t u1) {
  constexpr int MR = Tile<T>::MR;
  const int64_t Mpad = round_up(M, MR), panels = Mpad / MR;
  for (int64_t u = u0; u < u1; ++u) {
    const int64_t k0 = (u / panels) * KC, i0 = (u % panels) * MR;
    const int64_t kc = std::min(KC, K - k0);
    pack_a_panel(M, a, rs, cs, i0, k0, kc, dst + k0 * Mpad + i0 * kc);
  }
}

template <typename T>
void pack_a(int64_t M, int64_t K, const T* a, int64_t rs, int64_t cs, T* dst) {
  pack_a_part(M, K, a, rs, cs, dst, 0, pack_a_units<T>(M, K));
}

// Packs the block B(k0 + k, j0 + j), k < kc, j < nc, of B(k, j) = b[k * rs + j * cs]
// into NR-column panels (zero padded): panel p at dst + p * kc * NR.
template <typename T>
struct StridedPackB {
  const T* b;
  int64_t rs, cs;
  void operator()(int64_t k0, int64_t kc, int64_t j0, int64_t nc, T* dst) const {
    constexpr int NR = Tile<T>::NR;
    for (int64_t jp = 0; jp < nc; jp += NR) {
      T* panel = dst + jp * kc;
      const int64_t w = std::min<int64_t>(NR, nc - jp);
      if (std::abs(cs) <= std::abs(rs)) {  // rows of B contiguous-ish: k by k
        for (int64_t k = 0; k < kc; ++k) {
          const T* src = b + (k0 + k) * rs + (j0 + jp) * cs;
          T* out = panel + k * NR;
          if (cs == 1 && w == NR) {  // the common case: one contiguous row
            std::memcpy(out, src, NR * sizeof(T));
            continue;
          }
          for (int64_t j = 0; j < w; ++j) out[j] = src[j * cs];
          for (int64_t j = w; j < NR; ++j) out[j] = T(0);
        }
      } else if (rs == 1) {  // columns of B contiguous (a transposed operand)
        transpose_copy(b + k0 + (j0 + jp) * cs, cs, w, kc, panel, NR);
        for (int64_t k = 0; k < kc; ++k)
          for (int64_t j = w; j < NR; ++j) panel[k * NR + j] = T(0);
      } else {  // columns of B contiguous-ish: column by column, 64 rows at a
        // time, so the panel lines being filled stay in L1 (one column over
        // the whole panel at once touched kc lines per column).
        for (int64_t kb = 0; kb < kc; kb += 64) {
          const int64_t ke = std::min<int64_t>(kc, kb + 64);
          for (int64_t j = 0; j < w; ++j) {
            const T* src = b + k0 * rs + (j0 + jp + j) * cs;
            for (int64_t k = kb; k < ke; ++k) panel[k * NR + j] = src[k * rs];
          }
          for (int64_t k = kb; k < ke; ++k)
            for (int64_t j = w; j < NR; ++j) panel[k * NR + j] = T(0);
        }
      }
    }
  }
};

// pack_a with the core's threads (for large operands packed once per call).
template <typename T>
void pack_a_parallel(int64_t M, int64_t K, const T* a, int64_t rs, int64_t cs, T* dst);

// Workspace for one call of gemm_packed: a KC x NC block of packed B.
template <typename T>
int64_t b_workspace_size() {
  return KC * round_up(NC, Tile<T>::NR);
}

// C[0:M, 0:N] (+)= A[row0:row0+M, :] * B, where a_packed is the packed form
// (pack_a) of a matrix with a_rows rows (row0 a multiple of MR) -- or, with
// a_lda != 0, A itself as micro_kernel reads it (no packing): row-major with
// row stride a_lda > 0, column-major with column stride -a_lda -- and B is
// packed on the fly by pack_b(k0, kc, j0, nc, dst). Serial; callers
// parallelise over independent blocks of C. bbuf: b_workspace_size<T>().
template <typename T, typename PackB>
void gemm_packed(int64_t M, int64_t N, int64_t K, const T* a_packed, int64_t a_rows,
                 int64_t row0, const PackB& pack_b, T* c, int64_t ldc, bool accumulate,
                 T* bbuf, int64_t a_lda = 0) {
  constexpr int MR = Tile<T>::MR, NR = Tile<T>::NR;
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {
    if (!accumulate)
      for (int64_t i = 0; i < M; ++i) std::fill(c + i * ldc, c + i * ldc + N, T(0));
    return;
  }
  const int64_t Mpad = round_up(a_rows, MR);
  for (int64_t jc = 0; jc < N; jc += NC) {
    const int64_t nc = std::min(NC, N - jc);
    for (int64_t k0 = 0; k0 < K; k0 += KC) {
      const int64_t kc = std::min(KC, K - k0);
      pack_b(k0, kc, jc, nc, bbuf);
      const bool acc = accumulate || k0 > 0;
      const T* a_block = a_packed + k0 * Mpad + row0 * kc;
      for (int64_t ic = 0; ic < M; ic += MC) {
        const int64_t mc = std::min(MC, M - ic);
        for (int64_t jr = 0; jr < nc; jr += NR) {
          const int nr = static_cast<int>(std::min<int64_t>(NR, nc - jr));
          const T* b_panel = bbuf + jr * kc;
          for (int64_t ir = ic; ir < ic + mc; ir += MR) {
            const int mr = static_cast<int>(std::min<int64_t>(MR, M - ir));
            const T* a_panel = a_lda > 0   ? a_packed + (row0 + ir) * a_lda + k0
                               : a_lda < 0 ? a_packed + (row0 + ir) - k0 * a_lda
                                           : a_block + ir * kc;
            micro_kernel(kc, a_panel, a_lda, b_panel, c + ir * ldc + jc + jr, ldc, mr, nr, acc);
          }
        }
      }
    }
  }
}

// The width (a multiple of grain, at most max_width unless grain is larger)
// of the blocks that split n columns among threads with the smallest share
// for the busiest thread, fewest blocks on a tie.
int64_t balanced_width(int64_t n, int64_t max_width, int64_t grain, int threads);

// C (M x N, row stride ldc) (+)= A (M x K) * B (K x N), both given by strides;
// parallel over blocks of C with the core's thread count.
template <typename T>
void gemm_strided(int64_t M, int64_t N, int64_t K, const T* a, int64_t a_rs, int64_t a_cs,
                  const T* b, int64_t b_rs, int64_t b_cs, T* c, int64_t ldc, bool accumulate);

}  // namespace gemm
}  // namespace convcore
