// Fully connected layer: output = input @ weight^T + bias, and its gradients,
// as GEMMs over strided views (transposes are just swapped strides), or on
// the small-batch kernels below; and those kernels' dot tiles as sums of
// dot products for a pointwise convolution's grad_weight (dot_products.h).
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <type_traits>
#include <utility>

#include "convcore/ops.h"
#include "convcore/threading.h"
#include "dot_products.h"
#include "gemm.h"
#include "simd.h"
#include "strided.h"

namespace convcore {

namespace {

void check_linear(const TensorView& input, const TensorView& weight) {
  check_float(input, "input");
  check_same_dtype(weight, "weight", input, "input");
  check_ndim(input, "input", 2, "(batch, in_features)");
  check_ndim(weight, "weight", 2, "(out_features, in_features)");
  if (input.shape[1] != weight.shape[1])
    throw ValueError("input has " + std::to_string(input.shape[1]) +
                     " features but weight expects in_features = " +
                     std::to_string(weight.shape[1]) + " (weight.shape[1])");
}

// ---------------------------------------------------------------- small batches
// With a batch of up to kSmallBatch rows, a fully connected layer is bound by
// streaming the weight (forward, grad_input) or writing grad_weight, not by
// multiply-adds: packing either for the GEMM costs more memory traffic than
// the product itself. These kernels read the weight in place, once, and keep
// vectors along in_features (K), where every operand is contiguous. Every
// sum runs in an order that does not depend on the thread count.
constexpr int64_t kSmallBatch = 32;
constexpr int64_t kChunkK = 2048;  // forward: a chunk of the input rows stays in L2
constexpr int64_t kSlabBytes = 128 << 10;  // grad_input: a task's slab of weight rows stays in L2
constexpr int64_t kSlabBand = 1024;         // columns of the band the slab is sized for
// sum_of_products: a chunk of K along which a tile's rows of one side (16 KB
// at 4 float rows) stay in L1 while the row blocks of the other pass them.
// (Chunks of 512, which keep 256 passing rows in L2, were slower: each
// tile's sums are folded once a chunk.)
constexpr int64_t kDotChunk = 1024;

// A row stride, in elements, for `cols` elements that is a whole, odd number
// of cache lines: rows of a staged copy then fall in different sets of L1
// and L2. (Rows 16 KB apart, as fc7's and fc8's inputs have, all share one
// L1 set, so grad_weight's tiles, which read 16 of them, missed L1 on each.)
template <typename T>
int64_t staged_stride(int64_t cols) {
  constexpr int64_t kLine = 64 / sizeof(T);
  const int64_t lines = (cols + kLine - 1) / kLine;
  return (lines | 1) * kLine;
}

// The first 64-byte boundary at or after p (scratch from malloc is 16-byte aligned).
template <typename T>
T* align_line(T* p) {
  const auto u = reinterpret_cast<std::uintptr_t>(p);
  return reinterpret_cast<T*>((u + 63) & ~static_cast<std::uintptr_t>(63));
}

#if defined(__GNUC__) && defined(__x86_64__)
#define CONVCORE_SMALL_LINEAR 1

using simd::f32x8;
using simd::f32x16;
using simd::f64x4;
using simd::f64x8;
using simd::load_vec;
using simd::store_vec;

// Bits that keep lanes [W - rem, W) of a W-lane vector: entries
// [16 - W + rem, 16 - W + rem + W) of this table (rem in [1, W)).
template <typename U>
struct LastLanes {
  static constexpr U kTable[32] = {0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,
                                   U(~U(0)), U(~U(0)), U(~U(0)), U(~U(0)), U(~U(0)), U(~U(0)),
                                   U(~U(0)), U(~U(0)), U(~U(0)), U(~U(0)), U(~U(0)), U(~U(0)),
                                   U(~U(0)), U(~U(0)), U(~U(0)), U(~U(0))};
};

// V's lanes of T as unsigned integers of T's size (LaneBits), and
// last_lanes_mask: the mask with the bits of lanes [W - rem, W) set.
template <typename T, typename V>
struct LaneBitsOf {
  using U = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
  typedef U type __attribute__((vector_size(sizeof(V))));
};
template <typename T, typename V>
using LaneBits = typename LaneBitsOf<T, V>::type;
template <typename T, typename V>
inline __attribute__((always_inline)) void last_lanes_mask(LaneBits<T, V>& mask, int rem) {
  constexpr int W = sizeof(V) / sizeof(T);
  __builtin_memcpy(&mask, LastLanes<typename LaneBitsOf<T, V>::U>::kTable + (16 - W) + rem,
                   sizeof(V));
}

// v's lanes [0, W - rem) cleared by their bits: (a product with zeros
// would turn an inf in those lanes into NaN)
template <typename T, typename V>
inline __attribute__((always_inline)) void keep_last_lanes(V& v, int rem) {
  LaneBits<T, V> bits, mask;
  last_lanes_mask<T, V>(mask, rem);
  __builtin_memcpy(&bits, &v, sizeof(V));
  bits &= mask;
  __builtin_memcpy(&v, &bits, sizeof(V));
}

// The fold tree's lanes: the first (kUpper false) or second H lanes of each
// block of 2H lanes, of a in the block's first half and of b in its second.
template <int W, int H, bool kUpper>
constexpr int fold_lane(int l) {
  const int base = l / (2 * H) * (2 * H) + (kUpper ? H : 0), pos = l % (2 * H);
  return pos < H ? base + pos : W + base + pos - H;
}

// out = one level of the fold tree: in each block of 2H lanes, the first H
// lanes are a's halves of the block added, the last H b's.
template <typename T, typename V, int H, int... L>
inline __attribute__((always_inline)) void fold_pair(const V& a, const V& b, V& out,
                                                     std::integer_sequence<int, L...>) {
  constexpr int W = sizeof...(L);
  using I = std::conditional_t<sizeof(T) == 4, int32_t, int64_t>;
  typedef I IV __attribute__((vector_size(sizeof(V))));
  out = CONVCORE_SHUFFLE(IV, a, b, fold_lane<W, H, false>(L)...) +
        CONVCORE_SHUFFLE(IV, a, b, fold_lane<W, H, true>(L)...);
}

// v[0] = the sums of the N (at first W) vectors v[0..N), one per lane: lane
// l holds the sum of the lanes of v[bit_reversed(l)]. W - 1 shuffle pairs
// and adds for W sums, where summing each vector alone took W - 1 adds of
// a dependent chain per sum.
template <typename T, typename V, int N>
inline __attribute__((always_inline)) void fold_sums(V* v) {
  if constexpr (N > 1) {
    constexpr int W = sizeof(V) / sizeof(T);
#pragma GCC unroll 8
    for (int p = 0; p < N / 2; ++p)
      fold_pair<T, V, N / 2>(v[2 * p], v[2 * p + 1], v[p], std::make_integer_sequence<int, W>{});
    fold_sums<T, V, N / 2>(v);
  }
}

// l with its log2(W) bits in reverse order
constexpr int bit_reversed(int l, int W) {
  int r = 0;
  for (int bit = 1; bit < W; bit <<= 1, l >>= 1) r = (r << 1) | (l & 1);
  return r;
}

// dot_tile's weight rows in staggered groups where they alias in L1 (below)
constexpr int kSkewGroups = 4;
constexpr int64_t kSkewBytes = 1024;

// y[i, j] (+)= dot(x[i, k0:k1], w[j, k0:k1]) (+ bias[j]) for i < mb <= MB and
// j < nb <= NB = W / MB: one accumulator per output, folded into one vector
// of the W sums at the end (a sum of each accumulator's lanes, one by one,
// took most of a 28 -> 672 layer's time). Rows past mb or nb repeat the last
// one and their sums are dropped. The last, partial vector of [k0, k1) is the
// one that ends at k1 with its lanes before the full vectors' end cleared;
// with fewer than W elements in the whole row (k1 < W), a zero-padded copy.
template <typename T, typename V, int MB>
inline __attribute__((always_inline)) void dot_tile(int mb, int nb, int64_t k0, int64_t k1,
                                                    const T* x, int64_t ldx, const T* w,
                                                    int64_t ldw, T* y, int64_t ldy,
                                                    bool accumulate, const T* bias,
                                                    int64_t bias_stride) {
  constexpr int W = sizeof(V) / sizeof(T), NB = W / MB;
  const T* xr[MB];
  const T* wr[NB];
#pragma GCC unroll 16
  for (int i = 0; i < MB; ++i) xr[i] = x + std::min(i, mb - 1) * ldx;
#pragma GCC unroll 16
  for (int j = 0; j < NB; ++j) wr[j] = w + std::min(j, nb - 1) * ldw;
  V acc[W];  // output (i, j) in slot bit_reversed(i * NB + j), for fold_sums
#pragma GCC unroll 16
  for (int s = 0; s < W; ++s) acc[s] = V{};
  const auto multiply_add = [&](const V* xv, const V* wv) __attribute__((always_inline)) {
#pragma GCC unroll 16
    for (int j = 0; j < NB; ++j)
#pragma GCC unroll 16
      for (int i = 0; i < MB; ++i) acc[bit_reversed(i * NB + j, W)] += xv[i] * wv[j];
  };
  int64_t k = k0;
  if (MB == 1 && NB >= kSkewGroups && (ldw * int64_t(sizeof(T))) % 4096 == 0) {
    // One row of x against NB rows of w a multiple of 4 KB apart: the rows
    // fall in one set of L1 (8 ways), and streamed in step they evicted
    // each other's lines before use (in_features of 1024 or 2048 read at
    // half the bandwidth of 1040 or 2064). So the rows go in kSkewGroups
    // groups, each kSkewBytes behind the one before; every row still adds
    // its vectors in order, so the sums are the same. (With 2 or 4 rows of
    // x, whose rows alias too, the groups were slower.)
    constexpr int GR = NB / kSkewGroups;
    constexpr int64_t lag = kSkewBytes / int64_t(sizeof(V));
    const int64_t full = (k1 - k0) / W;
    for (int64_t v = 0; v < full + (kSkewGroups - 1) * lag; ++v) {
#pragma GCC unroll 16
      for (int g = 0; g < kSkewGroups; ++g) {
        const int64_t u = v - g * lag;
        if (u < 0 || u >= full) continue;
        const int64_t kk = k0 + u * W;
        V xv[MB];
#pragma GCC unroll 16
        for (int i = 0; i < MB; ++i) load_vec(xv[i], xr[i] + kk);
#pragma GCC unroll 16
        for (int j = g * GR; j < (g + 1) * GR; ++j) {
          V wv;
          load_vec(wv, wr[j] + kk);
#pragma GCC unroll 16
          for (int i = 0; i < MB; ++i) acc[bit_reversed(i * NB + j, W)] += xv[i] * wv;
        }
      }
    }
    k = k0 + full * W;
  }
  for (; k + W <= k1; k += W) {
    V xv[MB], wv[NB];
#pragma GCC unroll 16
    for (int i = 0; i < MB; ++i) load_vec(xv[i], xr[i] + k);
#pragma GCC unroll 16
    for (int j = 0; j < NB; ++j) load_vec(wv[j], wr[j] + k);
    multiply_add(xv, wv);
  }
  if (k < k1) {
    const int rem = static_cast<int>(k1 - k);
    V xv[MB], wv[NB];
    if (k1 >= W) {
#pragma GCC unroll 16
      for (int i = 0; i < MB; ++i) {
        load_vec(xv[i], xr[i] + k1 - W);
        keep_last_lanes<T>(xv[i], rem);
      }
#pragma GCC unroll 16
      for (int j = 0; j < NB; ++j) {
        load_vec(wv[j], wr[j] + k1 - W);
        keep_last_lanes<T>(wv[j], rem);
      }
    } else {  // (element by element: a memcpy of rem elements was a call per row)
      T staged[W];
#pragma GCC unroll 16
      for (int i = 0; i < MB; ++i) {
#pragma GCC unroll 16
        for (int e = 0; e < W; ++e) staged[e] = e < rem ? xr[i][k + e] : T(0);
        load_vec(xv[i], staged);
      }
#pragma GCC unroll 16
      for (int j = 0; j < NB; ++j) {
#pragma GCC unroll 16
        for (int e = 0; e < W; ++e) staged[e] = e < rem ? wr[j][k + e] : T(0);
        load_vec(wv[j], staged);
      }
    }
    multiply_add(xv, wv);
  }
  fold_sums<T, V, W>(acc);
  T sums[W];
  __builtin_memcpy(sums, &acc[0], sizeof(V));
  for (int i = 0; i < mb; ++i)
    for (int j = 0; j < nb; ++j) {
      T s = sums[i * NB + j];
      if (accumulate) s = y[i * ldy + j] + s;
      if (bias) s += bias[j * bias_stride];
      y[i * ldy + j] = s;
    }
}

// acc tile c[i, 0:KV*W] (+)= sum_r a[i, r] * b[r, k0:k0+KV*W] over r in [0, R): the
// shared shape of grad_input (a = grad_output, b = weight, r = out_features) and
// grad_weight (a = grad_output^T, b = input, r = batch). a(i, r) = a[i * ais + r * ars].
// kPrefetchC: c is written once and is far larger than the caches
// (grad_weight): ask for the lines of the tile 4 blocks on, so that its
// stores need not wait for them.
template <typename T, typename V, int MB, int KV, bool kPrefetchC>
inline __attribute__((always_inline)) void axpy_tile(int64_t R, const T* a, int64_t ais,
                                                     int64_t ars, const T* b, int64_t ldb, T* c,
                                                     int64_t ldc, bool accumulate) {
  constexpr int W = sizeof(V) / sizeof(T);
  V acc[MB][KV];
#pragma GCC unroll 8
  for (int i = 0; i < MB; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < KV; ++v) acc[i][v] = V{};
  if constexpr (kPrefetchC) {
#pragma GCC unroll 8
    for (int i = 0; i < MB; ++i) __builtin_prefetch(c + i * ldc + 4 * KV * W);
  }
  for (int64_t r = 0; r < R; ++r) {
    // The rows of b lie ldb apart (the weight's rows, for grad_input): the
    // hardware prefetcher does not follow so many streams, so fetch the
    // lines of the block after next (fc7's grad_input 14.9 -> 11.2 ms).
    __builtin_prefetch(b + r * ldb + 2 * KV * W);
    __builtin_prefetch(b + r * ldb + 2 * KV * W + 64 / sizeof(T));
    V bv[KV];
#pragma GCC unroll 4
    for (int v = 0; v < KV; ++v) load_vec(bv[v], b + r * ldb + v * W);
#pragma GCC unroll 8
    for (int i = 0; i < MB; ++i) {
      const T ai = a[i * ais + r * ars];
#pragma GCC unroll 4
      for (int v = 0; v < KV; ++v) acc[i][v] += ai * bv[v];
    }
  }
  // (unrolled, so that the accumulators stay in registers: fc8's grad_weight
  // went through the stack without it)
#pragma GCC unroll 8
  for (int i = 0; i < MB; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < KV; ++v) {
      T* out = c + i * ldc + v * W;
      V sum = acc[i][v];
      if (accumulate) {
        V old;
        load_vec(old, out);
        sum += old;
      }
      store_vec(out, sum);
    }
}

// dst's lanes [W - rem, W) replaced by src's, by their bits
template <typename T, typename V>
inline __attribute__((always_inline)) void blend_last_lanes(V& dst, const V& src, int rem) {
  LaneBits<T, V> d, from, mask;
  last_lanes_mask<T, V>(mask, rem);
  __builtin_memcpy(&d, &dst, sizeof(V));
  __builtin_memcpy(&from, &src, sizeof(V));
  d = (d & ~mask) | (from & mask);
  __builtin_memcpy(&dst, &d, sizeof(V));
}

// The last rem < W columns [K - rem, K) of axpy_tile's rows i < mb, where
// the task's columns include [K - W, K): the vector of those columns, of
// which the last rem lanes are added in (the others were, by the whole
// vectors). Its products and their order are a whole vector's, so the sums
// of the first lanes are the bits written already, and without
// accumulating, the whole vector is stored: a load of it after the last
// store stalls. (A scalar edge, its sums copied out by a memcpy call per
// row, took most of a 1 x 28 -> 672 grad_weight's time.) Rows past mb
// repeat the last one and are not written.
template <typename T, typename V, int MB>
inline __attribute__((always_inline)) void axpy_last_vector(int mb, int64_t R, const T* a,
                                                            int64_t ais, int64_t ars,
                                                            const T* b, int64_t ldb, int64_t K,
                                                            int rem, T* c, int64_t ldc,
                                                            bool accumulate) {
  constexpr int W = sizeof(V) / sizeof(T);
  const T* ar[MB];
#pragma GCC unroll 8
  for (int i = 0; i < MB; ++i) ar[i] = a + std::min(i, mb - 1) * ais;
  V acc[MB];
#pragma GCC unroll 8
  for (int i = 0; i < MB; ++i) acc[i] = V{};
  for (int64_t r = 0; r < R; ++r) {
    V bv;
    load_vec(bv, b + r * ldb + K - W);
#pragma GCC unroll 8
    for (int i = 0; i < MB; ++i) acc[i] += ar[i][r * ars] * bv;
  }
#pragma GCC unroll 8
  for (int i = 0; i < MB; ++i) {
    if (i >= mb) break;
    T* out = c + i * ldc + K - W;
    if (!accumulate) {  // the first lanes' sums equal those written already
      store_vec(out, acc[i]);
      continue;
    }
    V old;
    load_vec(old, out);
    V sum = acc[i];
    sum += old;
    blend_last_lanes<T>(old, sum, rem);
    store_vec(out, old);
  }
}

// Scalar edge of axpy_tile for rows shorter than a vector: the columns
// [k0, k1) one at a time, each summed over r in order.
template <typename T>
void axpy_edge(int rows, int64_t R, const T* a, int64_t ais, int64_t ars, const T* b,
               int64_t ldb, int64_t k0, int64_t k1, T* c, int64_t ldc, bool accumulate) {
  for (int i = 0; i < rows; ++i)
    for (int64_t k = k0; k < k1; ++k) {
      T s = 0;
      for (int64_t r = 0; r < R; ++r) s += a[i * ais + r * ars] * b[r * ldb + k];
      c[i * ldc + k] = accumulate ? c[i * ldc + k] + s : s;
    }
}

// The edge tiles: the largest MB <= mb instantiation, chosen at run time.
template <typename T, typename V, int MB, int KV, bool kPrefetchC>
inline __attribute__((always_inline)) void axpy_tile_upto(int mb, int64_t R, const T* a,
                                                          int64_t ais, int64_t ars, const T* b,
                                                          int64_t ldb, T* c, int64_t ldc,
                                                          bool accumulate) {
  if constexpr (MB > 1) {
    if (mb < MB)
      return axpy_tile_upto<T, V, MB - 1, KV, kPrefetchC>(mb, R, a, ais, ars, b, ldb, c, ldc,
                                                          accumulate);
  }
  axpy_tile<T, V, MB, KV, kPrefetchC>(R, a, ais, ars, b, ldb, c, ldc, accumulate);
}

// One task of each kernel; the OpenMP loops over tasks live outside, in
// code compiled for the baseline, because the target("avx512f") of a
// function does not reach the body OpenMP outlines from it.
template <typename T, typename V>
struct SmallLinear {
  static constexpr int W = sizeof(V) / sizeof(T);
  // dot tiles of MB rows of x by W / MB rows of w: the widest that M fills
  // (4 x 4 with 16 lanes: 8 loads for 16 vector FMAs)
  static int tile_rows(int64_t M) { return M >= 4 ? 4 : M >= 2 ? 2 : 1; }
  // axpy tiles of 6 x 3 vectors (AVX2 6 x 2: 12 accumulators, 2 loads and a
  // broadcast in 16 registers: fc7's grad_input at batch 16 took 11.2 ms
  // with 3 x 3 tiles, 8.5 ms with these)
  static constexpr int kAxM = 6, kAxV = W * sizeof(T) >= 64 ? 3 : 2;

  template <int MB>
  static inline __attribute__((always_inline)) void forward_columns(
      int64_t M, int64_t N, int64_t K, const T* x, const T* w, int64_t ldw, const T* bias,
      int64_t bias_stride, T* y, int64_t t) {
    constexpr int NB = W / MB;
    const int64_t n0 = t * NB;
    const int nb = static_cast<int>(std::min<int64_t>(NB, N - n0));
    for (int64_t k0 = 0; k0 < K; k0 += kChunkK) {
      const int64_t k1 = std::min(K, k0 + kChunkK);
      for (int64_t m0 = 0; m0 < M; m0 += MB) {
        const int mb = static_cast<int>(std::min<int64_t>(MB, M - m0));
        dot_tile<T, V, MB>(mb, nb, k0, k1, x + m0 * K, K, w + n0 * ldw, ldw, y + m0 * N + n0, N,
                           k0 > 0, k1 == K && bias ? bias + n0 * bias_stride : nullptr,
                           bias_stride);
      }
    }
  }

  // y (M x N) = x (M x K) @ w (N x K)^T (+ bias), for the W / tile_rows(M)
  // rows of w of task t
  static inline __attribute__((always_inline)) void forward_task(
      int64_t M, int64_t N, int64_t K, const T* x, const T* w, int64_t ldw, const T* bias,
      int64_t bias_stride, T* y, int64_t t) {
    switch (tile_rows(M)) {
      case 1:
        return forward_columns<1>(M, N, K, x, w, ldw, bias, bias_stride, y, t);
      case 2:
        return forward_columns<2>(M, N, K, x, w, ldw, bias, bias_stride, y, t);
      default:
        return forward_columns<4>(M, N, K, x, w, ldw, bias, bias_stride, y, t);
    }
  }

  // The tiles of column block [k0, k0 + KB) for row blocks [rb_lo, rb_hi) of c:
  // c[i, k] (+)= sum over r < R of a(i, r) * b[r, k]. A block past K - KB is
  // the last, partial one: whole vectors, then the vector that ends at K
  // for the last fewer than W columns (scalars where the block has fewer).
  template <bool kPrefetchC>
  static inline __attribute__((always_inline)) void block_tiles(
      int64_t rb_lo, int64_t rb_hi, int64_t rows, int64_t R, int64_t K, int64_t k0, const T* a,
      int64_t ais, int64_t ars, const T* b, int64_t ldb, T* c, int64_t ldc, bool accumulate) {
    constexpr int64_t KB = kAxV * W;
    for (int64_t rb = rb_lo; rb < rb_hi; ++rb) {
      const int64_t i0 = rb * kAxM;
      const int mb = static_cast<int>(std::min<int64_t>(kAxM, rows - i0));
      const T* ap = a + i0 * ais;
      T* cp = c + i0 * ldc;
      if (k0 + KB <= K) {
        axpy_tile_upto<T, V, kAxM, kAxV, kPrefetchC>(mb, R, ap, ais, ars, b + k0, ldb, cp + k0,
                                                     ldc, accumulate);
        continue;
      }
      int64_t k = k0;
      for (; k + W <= K; k += W)
        axpy_tile_upto<T, V, kAxM, 1, false>(mb, R, ap, ais, ars, b + k, ldb, cp + k, ldc,
                                             accumulate);
      if (k < K && K - k0 >= W) {  // (the vector stays in this block: another task's columns
                                    // lie before it)
        axpy_last_vector<T, V, kAxM>(mb, R, ap, ais, ars, b, ldb, K, static_cast<int>(K - k), cp,
                                     ldc, accumulate);
      } else if (k < K) {
        axpy_edge<T>(mb, R, ap, ais, ars, b, ldb, k, K, cp, ldc, accumulate);
      }
    }
  }

  // grad_weight's task t: rows [t * kAxM, t * kAxM + kAxM) of c (rows x K) =
  // sum over r < R of a(i, r) * b[r, :], where b (the input, R <= kSmallBatch
  // rows) is staged in L2 and c is written once.
  static inline __attribute__((always_inline)) void rows_task(int64_t rows, int64_t R, int64_t K,
                                                             const T* a, int64_t ais, int64_t ars,
                                                             const T* b, int64_t ldb, T* c,
                                                             int64_t ldc, int64_t t) {
    constexpr int64_t KB = kAxV * W;
    for (int64_t k0 = 0; k0 < K; k0 += KB)
      block_tiles<true>(t, t + 1, rows, R, K, k0, a, ais, ars, b, ldb, c, ldc, false);
  }

  // grad_input's task t: blocks [t * kb_group, t * kb_group + kb_group) of
  // columns of c (rows x K) = sum over r < R of a(i, r) * b[r, :], b being the
  // weight (R x K, rows ldb apart) read in place. Every element is summed slab
  // by slab, chunk_r rows of b at a time, in order, whatever the thread count.
  // (Staging each slab in a buffer with rows an odd number of lines apart,
  // copying the next slab in between the tiles of this one, was slower:
  // fc8 2.2 -> 2.8-3.5 ms, fc6 23 -> 25-44 ms.)
  static inline __attribute__((always_inline)) void band_task(
      int64_t rows, int64_t R, int64_t K, const T* a, int64_t ais, int64_t ars, const T* b,
      int64_t ldb, T* c, int64_t ldc, int64_t kb_group, int64_t chunk_r, int64_t t) {
    constexpr int64_t KB = kAxV * W;
    const int64_t kblocks = (K + KB - 1) / KB;
    const int64_t kb_lo = t * kb_group, kb_hi = std::min(kblocks, kb_lo + kb_group);
    const int64_t rblocks = (rows + kAxM - 1) / kAxM;
    for (int64_t r0 = 0; r0 < R; r0 += chunk_r) {
      const int64_t rc = std::min(chunk_r, R - r0);
      for (int64_t kb = kb_lo; kb < kb_hi; ++kb)
        block_tiles<false>(0, rblocks, rows, rc, K, kb * KB, a + r0 * ars, ais, ars,
                           b + r0 * ldb, ldb, c, ldc, r0 > 0);
    }
  }

  // sum_of_products: units [u0, u1) of (block of NB rows of w, block of MB
  // rows of x), image by image and chunk by chunk of K, each unit's tile
  // added to y (the first image's first chunk written). Consecutive units
  // share their block of the side with more rows (its rows stay in L1) and
  // walk the blocks of the side with fewer, whose chunk is the smaller one to
  // pass again for every block: with x's 512 rows inside, a 512 x 128
  // product streamed 2 MB for each block of w.
  static constexpr int kDotMB = 4, kDotNB = W / kDotMB;
  static int64_t dot_units(int64_t M, int64_t N) {
    return ((N + kDotNB - 1) / kDotNB) * ((M + kDotMB - 1) / kDotMB);
  }
  static inline __attribute__((always_inline)) void dots_range(
      int64_t images, int64_t M, int64_t N, int64_t K, const T* x, int64_t ldx, int64_t x_image,
      const T* w, int64_t ldw, int64_t w_image, T* y, int64_t u0, int64_t u1) {
    const int64_t mblocks = (M + kDotMB - 1) / kDotMB, nblocks = (N + kDotNB - 1) / kDotNB;
    const bool x_inner = M <= N;  // x has the fewer rows: its blocks pass
    for (int64_t i = 0; i < images; ++i)
      for (int64_t k0 = 0; k0 < K; k0 += kDotChunk) {
        const int64_t k1 = std::min(K, k0 + kDotChunk);
        for (int64_t u = u0; u < u1; ++u) {
          const int64_t j0 = (x_inner ? u / mblocks : u % nblocks) * kDotNB;
          const int64_t m0 = (x_inner ? u % mblocks : u / nblocks) * kDotMB;
          dot_tile<T, V, kDotMB>(static_cast<int>(std::min<int64_t>(kDotMB, M - m0)),
                                 static_cast<int>(std::min<int64_t>(kDotNB, N - j0)), k0, k1,
                                 x + i * x_image + m0 * ldx, ldx, w + i * w_image + j0 * ldw,
                                 ldw, y + m0 * N + j0, N, i > 0 || k0 > 0, nullptr, 0);
        }
      }
  }

  static int64_t forward_tasks(int64_t M, int64_t N) {
    const int64_t columns = W / tile_rows(M);
    return (N + columns - 1) / columns;
  }
  static int64_t rows_tasks(int64_t rows) { return (rows + kAxM - 1) / kAxM; }
  static int64_t band_tasks(int64_t K, int64_t kb_group) {
    const int64_t column_blocks = (K + kAxV * W - 1) / (kAxV * W);
    return (column_blocks + kb_group - 1) / kb_group;
  }
};

template <typename T>
struct SmallKernelSet {
  void (*forward)(int64_t, int64_t, int64_t, const T*, const T*, int64_t, const T*, int64_t, T*,
                  int64_t) = nullptr;
  int64_t (*forward_tasks)(int64_t, int64_t) = nullptr;
  void (*rows)(int64_t, int64_t, int64_t, const T*, int64_t, int64_t, const T*, int64_t, T*,
               int64_t, int64_t) = nullptr;
  int64_t (*rows_tasks)(int64_t) = nullptr;
  void (*band)(int64_t, int64_t, int64_t, const T*, int64_t, int64_t, const T*, int64_t, T*,
               int64_t, int64_t, int64_t, int64_t) = nullptr;
  int64_t (*band_tasks)(int64_t, int64_t) = nullptr;
  int64_t column_block = 0;  // columns of one block of band_tasks' split
  void (*dots)(int64_t, int64_t, int64_t, int64_t, const T*, int64_t, int64_t, const T*, int64_t,
               int64_t, T*, int64_t, int64_t) = nullptr;
  int64_t (*dot_units)(int64_t, int64_t) = nullptr;
};

#define CONVCORE_SMALL_KERNELS(T, NAME, TARGET, V)                                             \
  __attribute__((target(TARGET))) void forward_##NAME(                                         \
      int64_t M, int64_t N, int64_t K, const T* x, const T* w, int64_t ldw, const T* b,        \
      int64_t bs, T* y, int64_t t) {                                                           \
    SmallLinear<T, V>::forward_task(M, N, K, x, w, ldw, b, bs, y, t);                          \
  }                                                                                            \
  __attribute__((target(TARGET))) void rows_##NAME(                                            \
      int64_t rows, int64_t R, int64_t K, const T* a, int64_t ais, int64_t ars, const T* b,    \
      int64_t ldb, T* c, int64_t ldc, int64_t t) {                                             \
    SmallLinear<T, V>::rows_task(rows, R, K, a, ais, ars, b, ldb, c, ldc, t);                  \
  }                                                                                            \
  __attribute__((target(TARGET))) void band_##NAME(                                            \
      int64_t rows, int64_t R, int64_t K, const T* a, int64_t ais, int64_t ars, const T* b,    \
      int64_t ldb, T* c, int64_t ldc, int64_t group, int64_t chunk, int64_t t) {               \
    SmallLinear<T, V>::band_task(rows, R, K, a, ais, ars, b, ldb, c, ldc, group, chunk, t);    \
  }                                                                                            \
  __attribute__((target(TARGET))) void dots_##NAME(                                            \
      int64_t images, int64_t M, int64_t N, int64_t K, const T* x, int64_t ldx, int64_t xi,    \
      const T* w, int64_t ldw, int64_t wi, T* y, int64_t u0, int64_t u1) {                     \
    SmallLinear<T, V>::dots_range(images, M, N, K, x, ldx, xi, w, ldw, wi, y, u0, u1);        \
  }                                                                                            \
  const SmallKernelSet<T> kernels_##NAME = {                                                   \
      forward_##NAME,                SmallLinear<T, V>::forward_tasks,                         \
      rows_##NAME,                   SmallLinear<T, V>::rows_tasks,                            \
      band_##NAME,                   SmallLinear<T, V>::band_tasks,                            \
      SmallLinear<T, V>::kAxV * SmallLinear<T, V>::W,                                          \
      dots_##NAME,                   SmallLinear<T, V>::dot_units};
CONVCORE_SMALL_KERNELS(float, avx512_f, "avx512f,fma", f32x16)
CONVCORE_SMALL_KERNELS(double, avx512_d, "avx512f,fma", f64x8)
CONVCORE_SMALL_KERNELS(float, avx2_f, "avx2,fma", f32x8)
CONVCORE_SMALL_KERNELS(double, avx2_d, "avx2,fma", f64x4)
#undef CONVCORE_SMALL_KERNELS

// The kernels for the GEMM's instruction set (none for the portable level,
// which keeps the GEMM path), so CONVCORE_ISA caps these too.
template <typename T>
SmallKernelSet<T> small_kernels() {
  const int level = gemm::isa_level();
  if constexpr (std::is_same_v<T, float>) {
    if (level == 2) return kernels_avx512_f;
    if (level == 1) return kernels_avx2_f;
  } else {
    if (level == 2) return kernels_avx512_d;
    if (level == 1) return kernels_avx2_d;
  }
  return {};
}

template <typename T>
void small_forward(const SmallKernelSet<T>& k, int64_t M, int64_t N, int64_t K, const T* x,
                   const T* w, int64_t ldw, const T* bias, int64_t bias_stride, T* y) {
  const int64_t tasks = k.forward_tasks(M, N);
  detail::parallel_for(detail::threads_for(tasks, M * N * K), tasks, [&](int64_t t) {
    k.forward(M, N, K, x, w, ldw, bias, bias_stride, y, t);
  });
}

// grad_weight: c (rows x K) = sum over r < R of a(i, r) * b[r, :], split over
// blocks of rows of c; every task reads all of b (the input, staged).
template <typename T>
void small_rows(const SmallKernelSet<T>& k, int64_t rows, int64_t R, int64_t K, const T* a,
                int64_t ais, int64_t ars, const T* b, int64_t ldb, T* c, int64_t ldc) {
  const int64_t tasks = k.rows_tasks(rows);
#pragma omp parallel for num_threads(detail::threads_for(tasks, rows * R * K)) schedule(static)
  for (int64_t t = 0; t < tasks; ++t) k.rows(rows, R, K, a, ais, ars, b, ldb, c, ldc, t);
}

// grad_input: the same sum with b the weight (R x K), split over columns. A
// task takes a wide band of columns and goes down the weight in slabs of rows
// that stay in L2 while every column block of the band is done: tasks of one
// 24-column block each walked all R rows 16 KB apart (a TLB miss and two
// partly used lines per row) and fc7's grad_input (16 x 4096 x 4096) took
// 20 ms against numpy's 6.
template <typename T>
void small_band(const SmallKernelSet<T>& k, int64_t rows, int64_t R, int64_t K, const T* a,
                int64_t ais, int64_t ars, const T* b, int64_t ldb, T* c, int64_t ldc) {
  const int64_t blocks = (K + k.column_block - 1) / k.column_block;
  const int64_t group =
      std::max<int64_t>(1, (blocks + 2 * get_num_threads() - 1) / (2 * get_num_threads()));
  // The slab's rows are where each element's sum is cut (partial sums are
  // added into c slab by slab), so their number depends on the layer alone,
  // never on the thread count as the band's width does: sized for a band of
  // kSlabBand columns, fc7's at 2 threads.
  const int64_t chunk_r =
      std::max<int64_t>(8, kSlabBytes / (kSlabBand * static_cast<int64_t>(sizeof(T))));
  const int64_t tasks = k.band_tasks(K, group);
#pragma omp parallel for num_threads(detail::threads_for(tasks, rows * R * K)) schedule(static)
  for (int64_t t = 0; t < tasks; ++t)
    k.band(rows, R, K, a, ais, ars, b, ldb, c, ldc, group, chunk_r, t);
}
#endif  // small-batch kernels

template <typename T>
void linear_grad_bias(int64_t M, int64_t N, const T* gy, int64_t gs0, int64_t gs1, T* gb) {
#pragma omp parallel for num_threads(detail::threads_for(N, M * N)) schedule(static)
  for (int64_t j = 0; j < N; ++j) {
    double s = 0;  // float32 sums in double
    for (int64_t i = 0; i < M; ++i) s += gy[i * gs0 + j * gs1];
    gb[j] = static_cast<T>(s);
  }
}

}  // namespace

void linear_forward(const TensorView& input, const TensorView& weight, const TensorView* bias,
                    const TensorView& output) {
  const detail::CallScope scope;  // shares the threads among concurrent calls
  check_linear(input, weight);
  const int64_t M = input.shape[0], K = input.shape[1], N = weight.shape[0];
  if (bias) {
    check_same_dtype(*bias, "bias", input, "input");
    check_shape(*bias, "bias", 1, &N);
  }
  const int64_t shape[2] = {M, N};
  detail::check_output(output, "output", input, 2, shape);
  detail::dispatch_float(input.dtype, [&](auto zero) {
    using T = decltype(zero);
    T* y = output.ptr<T>();
    bool done = false;
#ifdef CONVCORE_SMALL_LINEAR
    // (an empty dimension takes the GEMM path, which writes the zeros)
    if (M > 0 && M <= kSmallBatch && K > 0 && N > 0 && weight.strides[1] == 1) {
      const auto kernels = small_kernels<T>();
      if (kernels.forward) {
        const detail::Contiguous<T> xc(input);
        small_forward<T>(kernels, M, N, K, xc.data(), weight.ptr<const T>(), weight.strides[0],
                         bias ? bias->ptr<const T>() : nullptr, bias ? bias->strides[0] : 0, y);
        done = true;
      }
    }
#endif
    if (!done) {
      // B(k, j) = weight[j, k]
      gemm::gemm_strided<T>(M, N, K, input.ptr<const T>(), input.strides[0], input.strides[1],
                            weight.ptr<const T>(), weight.strides[1], weight.strides[0], y, N,
                            false);
    }
    if (bias && M > 0 && !done) {  // (the small kernels add it as they write)
      const T* b = bias->ptr<const T>();
      const int64_t bs = bias->strides[0];
      detail::parallel_for(detail::threads_for(M, M * N), M, [&](int64_t i) {
        for (int64_t j = 0; j < N; ++j) y[i * N + j] += b[j * bs];
      });
    }
  });
}

void linear_backward(const TensorView& grad_output, const TensorView& input,
                     const TensorView& weight, const TensorView* grad_input,
                     const TensorView* grad_weight, const TensorView* grad_bias) {
  const detail::CallScope scope;  // shares the threads among concurrent calls
  check_linear(input, weight);
  const int64_t M = input.shape[0], K = input.shape[1], N = weight.shape[0];
  check_same_dtype(grad_output, "grad_output", input, "input");
  const int64_t out_shape[2] = {M, N};
  check_shape(grad_output, "grad_output", 2, out_shape);
  if (grad_input) detail::check_output(*grad_input, "grad_input", input, 2, input.shape);
  if (grad_weight) detail::check_output(*grad_weight, "grad_weight", input, 2, weight.shape);
  if (grad_bias) detail::check_output(*grad_bias, "grad_bias", input, 1, &N);
  detail::dispatch_float(input.dtype, [&](auto zero) {
    using T = decltype(zero);
    const T* gy = grad_output.ptr<const T>();
    const int64_t gs0 = grad_output.strides[0], gs1 = grad_output.strides[1];
#ifdef CONVCORE_SMALL_LINEAR
    const auto kernels = small_kernels<T>();
    if (M > 0 && M <= kSmallBatch && K > 0 && N > 0 && weight.strides[1] == 1 &&
        kernels.band) {
      const detail::Contiguous<T> gc(grad_output);
      const T* g = gc.data();  // (M x N)
      if (grad_input) {
        // grad_input[m, :] = sum_n g[m, n] weight[n, :], from g transposed (N x M) so
        // that the MB values each weight row meets are adjacent
        detail::Workspace<T> gt_ws(1, N * M);
        T* gt = gt_ws.get();
        for (int64_t n = 0; n < N; ++n)
          for (int64_t m = 0; m < M; ++m) gt[n * M + m] = g[m * N + n];
        small_band<T>(kernels, M, N, K, gt, 1, M, weight.ptr<const T>(), weight.strides[0],
                      grad_input->ptr<T>(), K);
      }
      if (grad_weight) {
        // grad_weight[n, :] = sum_m g[m, n] input[m, :], from the input staged with
        // its rows an odd number of lines apart (they lie 16 KB apart in fc7 and fc8)
        const int64_t ldx = staged_stride<T>(K);
        detail::Workspace<T> xs_ws(1, M * ldx + 64 / static_cast<int64_t>(sizeof(T)));
        T* xs = align_line(xs_ws.get());
        const T* x = input.ptr<const T>();
        const int64_t xs0 = input.strides[0], xs1 = input.strides[1];
        for (int64_t m = 0; m < M; ++m) {
          if (xs1 == 1) {
            std::copy(x + m * xs0, x + m * xs0 + K, xs + m * ldx);
          } else {
            for (int64_t k = 0; k < K; ++k) xs[m * ldx + k] = x[m * xs0 + k * xs1];
          }
        }
        small_rows<T>(kernels, N, M, K, g, 1, N, xs, ldx, grad_weight->ptr<T>(), K);
      }
      if (grad_bias) linear_grad_bias<T>(M, N, gy, gs0, gs1, grad_bias->ptr<T>());
      return;
    }
#endif
    // grad_input (M x K) = grad_output (M x N) @ weight (N x K)
    if (grad_input)
      gemm::gemm_strided<T>(M, K, N, gy, gs0, gs1, weight.ptr<const T>(), weight.strides[0],
                            weight.strides[1], grad_input->ptr<T>(), K, false);
    // grad_weight (N x K) = grad_output^T (N x M) @ input (M x K)
    if (grad_weight)
      gemm::gemm_strided<T>(N, K, M, gy, gs1, gs0, input.ptr<const T>(), input.strides[0],
                            input.strides[1], grad_weight->ptr<T>(), K, false);
    if (grad_bias) linear_grad_bias<T>(M, N, gy, gs0, gs1, grad_bias->ptr<T>());
  });
}

namespace dots {

bool available() {
#ifdef CONVCORE_SMALL_LINEAR
  // AVX-512 only: AVX2's tiles of 4 x 2 vectors load 6 for 8 products and
  // were slower than the GEMM on the layers that gain with AVX-512
  return gemm::isa_level() == 2 && small_kernels<float>().dots != nullptr;
#else
  return false;
#endif
}

bool vector_kernel() {
#ifdef CONVCORE_SMALL_LINEAR
  return gemm::isa_level() >= 1 && small_kernels<float>().dots != nullptr;
#else
  return false;
#endif
}

template <typename T>
void sum_of_products(int64_t images, int64_t M, int64_t N, int64_t K, const T* x, int64_t ldx,
                     int64_t x_image, const T* w, int64_t ldw, int64_t w_image, T* y,
                     int threads) {
#ifdef CONVCORE_SMALL_LINEAR
  const auto k = small_kernels<T>();
  if (!k.dots) throw std::logic_error("dots::sum_of_products: no kernel at this ISA level");
  // Each thread a contiguous run of units (consecutive units share their rows
  // of w), going through the images and chunks itself: no barrier between them.
  const int64_t units = k.dot_units(M, N);
  const int team = static_cast<int>(std::clamp<int64_t>(threads, 1, units));
  detail::parallel_for(team, team, [&](int64_t t) {
    k.dots(images, M, N, K, x, ldx, x_image, w, ldw, w_image, y, units * t / team,
           units * (t + 1) / team);
  });
#else
  (void)images, (void)M, (void)N, (void)K, (void)x, (void)ldx, (void)x_image, (void)w, (void)ldw,
      (void)w_image, (void)y, (void)threads;
  throw std::logic_error("dots::sum_of_products: no kernel on this platform");
#endif
}

template void sum_of_products<float>(int64_t, int64_t, int64_t, int64_t, const float*, int64_t,
                                     int64_t, const float*, int64_t, int64_t, float*, int);
template void sum_of_products<double>(int64_t, int64_t, int64_t, int64_t, const double*, int64_t,
                                      int64_t, const double*, int64_t, int64_t, double*, int);

}  // namespace dots

}  // namespace convcore
