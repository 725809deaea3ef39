// Winograd F(m x m, 3x3) for 3x3, stride-1, undilated, ungrouped convolution
// (Lavin & Gray 2015): each m x m block of outputs comes from an a x a block
// of input (a = m + 2) through a*a elementwise products, so the products
// become a*a independent GEMMs over channels:
//   U = G g G^T (weights, once per call), V = B^T d B (input tiles),
//   M[xi] = U[xi] (Cout x C) * V[xi] (C x tiles), Y = A^T M A.
// Two variants share one driver (conv_winograd.cpp, winograd_conv<M>):
//   F(2x2, 3x3): 4x4 tiles, 16 products per 4 outputs, 2.25x fewer
//                multiplications than direct convolution;
//   F(4x4, 3x3): 6x6 tiles, 36 products per 16 outputs, 4x fewer, at the
//                cost of larger transforms and more rounding error (A^T's
//                entries grow to 8; measured in the tests and
//                docs/benchmarks.md).
// Each variant is its three 1-D transforms (B^T, A^T, G applied to one
// column); the 2-D transforms apply them to the columns, then the rows.
#pragma once
#include <algorithm>
#include <cstdint>

#include "gemm.h"

namespace convcore {
namespace winograd {

#define CONVCORE_WINO_INLINE inline __attribute__((always_inline))

// The input and output transforms are written with float constants (all
// exact in binary), not T(...), so that T may be float, double or a GCC
// vector of floats (the blocked kernels, blocked_winograd.cpp).
template <int M>
struct Variant;

// F(2, 3), interpolation points 0, 1, -1, infinity.
//   B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1]
//   G   = [1 0 0; 1/2 1/2 1/2; 1/2 -1/2 1/2; 0 0 1]
//   A^T = [1 1 1 0; 0 1 -1 -1]
template <>
struct Variant<2> {
  static constexpr int kOut = 2, kTile = 4, kPoints = 16;
  // Tiles per task (a band of whole tile rows): 128 tiles of 2x2 outputs.
  static constexpr int64_t kBandTiles = 128;
  template <typename T>
  static CONVCORE_WINO_INLINE void input(const T* d, T* v) {  // B^T d
    v[0] = d[0] - d[2];
    v[1] = d[1] + d[2];
    v[2] = d[2] - d[1];
    v[3] = d[1] - d[3];
  }
  template <typename T>
  static CONVCORE_WINO_INLINE void output(const T* m, T* y) {  // A^T m
    y[0] = m[0] + m[1] + m[2];
    y[1] = m[1] - m[2] - m[3];
  }
  template <typename S>
  static CONVCORE_WINO_INLINE void filter(const S* g, S* u) {  // G g
    u[0] = g[0];
    u[1] = S(0.5) * (g[0] + g[1] + g[2]);
    u[2] = S(0.5) * (g[0] - g[1] + g[2]);
    u[3] = g[2];
  }
  // The transposes, for grad_weight: A y and G^T u.
  template <typename T>
  static CONVCORE_WINO_INLINE void output_transposed(const T* y, T* m) {  // A y
    m[0] = y[0];
    m[1] = y[0] + y[1];
    m[2] = y[0] - y[1];
    m[3] = -y[1];
  }
  template <typename S>
  static CONVCORE_WINO_INLINE void filter_transposed(const S* u, S* g) {  // G^T u
    const S s = S(0.5) * (u[1] + u[2]);
    g[0] = u[0] + s;
    g[1] = S(0.5) * (u[1] - u[2]);
    g[2] = s + u[3];
  }
};

// F(4, 3), interpolation points 0, 1, -1, 1/2, -2 and infinity (F(4, 3)
// has room for five finite points). Lavin & Gray's 0, 1, -1, 2, -2 keep the
// matrices integral, but 1/2 in place of 2 rounds 2.5-3.5x less in float32
// (simulated on 64- to 512-channel sums, and measured on the layers of
// docs/benchmarks.md; Barabasz et al. 2020 report the same), at a few more
// operations in the input transform. Derived from the Lagrange
// interpolation at those points (checked with exact rationals against
// direct convolution, and by tests/test_conv_algorithms.py):
//   B^T = [1 -3/2   -2  3/2   1 0;   G = [   1      0     0  ;
//          0   -1  1/2  5/2   1 0;          1/3    1/3   1/3 ;
//          0    1 -5/2  1/2   1 0;         -1/3    1/3  -1/3 ;
//          0   -2   -1    2   1 0;        -16/15 -8/15 -4/15 ;
//          0  1/2   -1 -1/2   1 0;          1/15 -2/15  4/15 ;
//          0    1 -3/2   -2 3/2 1]          0      0     1   ]
//   A^T = [1 1  1   1    1 0;
//          0 1 -1 1/2   -2 0;
//          0 1  1 1/4    4 0;
//          0 1 -1 1/8   -8 1]
// (all entries of B^T and A^T exact in binary floating point).
template <>
struct Variant<4> {
  static constexpr int kOut = 4, kTile = 6, kPoints = 36;
  // 128 tiles, as F(2x2): each of the 36 transformed filter matrices is
  // read once per task, and 64 tiles per task measured 5-10% slower on
  // 256-channel layers. The task's 36 V and 36 M matrices then take 2.25x
  // F(2x2)'s memory (10 MB per thread for 256 channels in and out).
  static constexpr int64_t kBandTiles = 128;
  template <typename T>
  static CONVCORE_WINO_INLINE void input(const T* d, T* v) {  // B^T d
    const T h = d[3] - d[1], f = d[4] - d[2];  // shared differences
    v[0] = (d[0] - 2.0f * d[2] + d[4]) + 1.5f * h;
    v[1] = (d[4] - d[1]) + 0.5f * d[2] + 2.5f * d[3];
    v[2] = (d[4] + d[1]) - 2.5f * d[2] + 0.5f * d[3];
    v[3] = f + 2.0f * h;
    v[4] = f - 0.5f * h;
    v[5] = (d[1] - 2.0f * d[3] + d[5]) + 1.5f * f;
  }
  template <typename T>
  static CONVCORE_WINO_INLINE void output(const T* m, T* y) {  // A^T m
    const T s12 = m[1] + m[2], d12 = m[1] - m[2];
    y[0] = m[0] + s12 + (m[3] + m[4]);
    y[1] = d12 + 0.5f * m[3] - 2.0f * m[4];
    y[2] = s12 + 0.25f * m[3] + 4.0f * m[4];
    y[3] = d12 + 0.125f * m[3] - 8.0f * m[4] + m[5];
  }
  template <typename S>
  static CONVCORE_WINO_INLINE void filter(const S* g, S* u) {  // G g
    // Multiplications by 1/3 and 1/15 rather than divisions (which do not
    // vectorise as well); S is double, so their rounding is far below
    // float's and the results are within a few double ulps of exact.
    u[0] = g[0];
    u[1] = S(1.0 / 3) * (g[0] + g[1] + g[2]);
    u[2] = S(-1.0 / 3) * (g[0] - g[1] + g[2]);
    u[3] = S(-1.0 / 15) * (S(16) * g[0] + S(8) * g[1] + S(4) * g[2]);
    u[4] = S(1.0 / 15) * (g[0] - S(2) * g[1] + S(4) * g[2]);
    u[5] = g[2];
  }
  // The transposes, for grad_weight: A y and G^T u.
  template <typename T>
  static CONVCORE_WINO_INLINE void output_transposed(const T* y, T* m) {  // A y
    const T s02 = y[0] + y[2], s13 = y[1] + y[3];
    m[0] = y[0];
    m[1] = s02 + s13;
    m[2] = s02 - s13;
    m[3] = y[0] + 0.5f * y[1] + 0.25f * y[2] + 0.125f * y[3];
    m[4] = y[0] - 2.0f * y[1] + 4.0f * y[2] - 8.0f * y[3];
    m[5] = y[3];
  }
  template <typename S>
  static CONVCORE_WINO_INLINE void filter_transposed(const S* u, S* g) {  // G^T u
    const S p = S(1.0 / 3) * (u[1] + u[2]), q = S(1.0 / 3) * (u[1] - u[2]);
    g[0] = u[0] + q + S(1.0 / 15) * (u[4] - S(16) * u[3]);
    g[1] = p - S(2.0 / 15) * (S(4) * u[3] + u[4]);
    g[2] = q + S(4.0 / 15) * (u[4] - u[3]) + u[5];
  }
};

// Transforms of many tiles at once, written so that the loop over tiles
// vectorises: tile t's a x a patch is columns m*t .. m*t + a - 1 of a row
// streams, and its a*a transformed values go to a*a streams, contiguous in
// the tile. The loops within a tile are fully unrolled (forced: F(4x4) has
// 36 values) so that only the loop over tiles is left to vectorise. GCC
// cannot prove that the streams (a runtime stride apart) do not overlap,
// and gives up after a few run-time alias checks, so each loop over
// tiles/filters carries `GCC ivdep`: true, as every caller's stride is at
// least the length of a stream (see winograd_conv in conv_winograd.cpp).

// The 2-D form of a 1-D transform f (NI values -> NO values): f applied to
// each column of the NI x NI block `in`, then to each row of the result,
// giving the NO x NO block `out`. B^T d B, A^T m A, G g G^T and the
// transposes grad_weight uses are all this, with their own f.
template <int NI, int NO, typename S, typename F>
CONVCORE_WINO_INLINE void separable(const S (&in)[NI][NI], S (&out)[NO][NO], F f) {
  S cols[NI][NO];  // cols[j] = f(column j of in)
#pragma GCC unroll 8
  for (int j = 0; j < NI; ++j) {
    S c[NI];
#pragma GCC unroll 8
    for (int k = 0; k < NI; ++k) c[k] = in[k][j];
    f(c, cols[j]);
  }
#pragma GCC unroll 8
  for (int i = 0; i < NO; ++i) {
    S r[NI];
#pragma GCC unroll 8
    for (int j = 0; j < NI; ++j) r[j] = cols[j][i];
    f(r, out[i]);
  }
}

// v[xi * vstride + t] = (B^T d B)[xi] for tiles t < nt, whose patches are
// rows 0..a-1 of `in` (row stride ss) at columns m*t .. m*t + a - 1.
template <int M, typename T>
CONVCORE_WINO_INLINE void input_tiles_body(const T* __restrict in, int64_t ss, int64_t nt,
                                           T* __restrict v, int64_t vstride) {
  using V = Variant<M>;
  constexpr int A = V::kTile;
#pragma GCC ivdep
  for (int64_t t = 0; t < nt; ++t) {
    T d[A][A], q[A][A];
#pragma GCC unroll 8
    for (int i = 0; i < A; ++i)
#pragma GCC unroll 8
      for (int j = 0; j < A; ++j) d[i][j] = in[i * ss + M * t + j];
    separable(d, q, [](const T* x, T* y) { V::input(x, y); });
#pragma GCC unroll 8
    for (int i = 0; i < A; ++i)
#pragma GCC unroll 8
      for (int j = 0; j < A; ++j) v[(i * A + j) * vstride + t] = q[i][j];
  }
}

// The output transform of nt tiles: m[xi * mstride + t] -> m x m outputs
// at out[i * os + m*t + j] (m row streams), plus bias.
template <int M, typename T>
CONVCORE_WINO_INLINE void output_tiles_body(const T* __restrict m, int64_t mstride, int64_t nt,
                                          T bias, T* __restrict out, int64_t os) {
  using V = Variant<M>;
  constexpr int A = V::kTile;
#pragma GCC ivdep
  for (int64_t t = 0; t < nt; ++t) {
    T c[A][A], y[M][M];
#pragma GCC unroll 8
    for (int i = 0; i < A; ++i)
#pragma GCC unroll 8
      for (int j = 0; j < A; ++j) c[i][j] = m[(i * A + j) * mstride + t];
    separable(c, y, [](const T* x, T* z) { V::output(x, z); });
#pragma GCC unroll 8
    for (int i = 0; i < M; ++i)
#pragma GCC unroll 8
      for (int j = 0; j < M; ++j) out[i * os + M * t + j] = y[i][j] + bias;
  }
}

// The transpose of the output transform, for grad_weight: m x m gradients of
// nt tiles at dy[i * ss + m*t + j] (m row streams) -> dm[xi * mstride + t] =
// (A dY A^T)[xi].
template <int M, typename T>
CONVCORE_WINO_INLINE void grad_output_tiles_body(const T* __restrict dy, int64_t ss, int64_t nt,
                                                 T* __restrict dm, int64_t mstride) {
  using V = Variant<M>;
  constexpr int A = V::kTile;
#pragma GCC ivdep
  for (int64_t t = 0; t < nt; ++t) {
    T y[M][M], q[A][A];
#pragma GCC unroll 8
    for (int i = 0; i < M; ++i)
#pragma GCC unroll 8
      for (int j = 0; j < M; ++j) y[i][j] = dy[i * ss + M * t + j];
    separable(y, q, [](const T* x, T* z) { V::output_transposed(x, z); });
#pragma GCC unroll 8
    for (int i = 0; i < A; ++i)
#pragma GCC unroll 8
      for (int j = 0; j < A; ++j) dm[(i * A + j) * mstride + t] = q[i][j];
  }
}

// The transpose of the filter transform, for grad_weight: dg = G^T dU G for
// n filters, dU[xi] at du[xi * dus + c], the 3x3 result (row-major) at
// g[c * 9 + k]. In double, like the forward filter transform.
template <int M, typename T>
CONVCORE_WINO_INLINE void grad_filter_row_body(const T* __restrict du, int64_t dus, int64_t n,
                                               T* __restrict g) {
  using V = Variant<M>;
  constexpr int A = V::kTile;
#pragma GCC ivdep
  for (int64_t c = 0; c < n; ++c) {
    double u[A][A], q[3][3];
#pragma GCC unroll 8
    for (int i = 0; i < A; ++i)
#pragma GCC unroll 8
      for (int j = 0; j < A; ++j) u[i][j] = du[(i * A + j) * dus + c];
    separable(u, q, [](const double* x, double* z) { V::filter_transposed(x, z); });
#pragma GCC unroll 3
    for (int i = 0; i < 3; ++i)
#pragma GCC unroll 3
      for (int j = 0; j < 3; ++j) g[c * 9 + i * 3 + j] = static_cast<T>(q[i][j]);
  }
}

// U = G g G^T for n filters: filter c (c < n) has its 3x3 taps (row-major)
// at w[k * ws + c], k < 9 (the caller gathers them so: unit-stride streams
// let the loop over filters vectorise); u[xi * us + c] = U[xi]. Computed in
// double whatever T, rounded once at the end, so that U is as exact as T
// holds it (the fractions 1/6, 1/12, 1/24 are not exact in any precision).
template <int M, typename T>
CONVCORE_WINO_INLINE void filter_row_body(const T* __restrict w, int64_t ws, int64_t n,
                                          T* __restrict u, int64_t us) {
  using V = Variant<M>;
  constexpr int A = V::kTile;
#pragma GCC ivdep
  for (int64_t c = 0; c < n; ++c) {
    double g[3][3], q[A][A];
#pragma GCC unroll 3
    for (int i = 0; i < 3; ++i)
#pragma GCC unroll 3
      for (int j = 0; j < 3; ++j) g[i][j] = w[(i * 3 + j) * ws + c];
    separable(g, q, [](const double* x, double* z) { V::filter(x, z); });
#pragma GCC unroll 8
    for (int i = 0; i < A; ++i)
#pragma GCC unroll 8
      for (int j = 0; j < A; ++j) u[(i * A + j) * us + c] = static_cast<T>(q[i][j]);
  }
}

// Run-time dispatch: the row transforms built for AVX-512, AVX2 and the
// baseline, picked by the GEMM's level (CONVCORE_ISA caps it).
#define CONVCORE_WINO_ROWS(M, T)                                                              \
  CONVCORE_ISA_DISPATCH(input_tiles_##M, input_tiles_body<M>,                                 \
                        (const T* in, int64_t ss, int64_t nt, T* v, int64_t vstride),         \
                        (in, ss, nt, v, vstride))                                             \
  CONVCORE_ISA_DISPATCH(output_tiles_##M, output_tiles_body<M>,                               \
                        (const T* m, int64_t mstride, int64_t nt, T bias, T* out, int64_t os), \
                        (m, mstride, nt, bias, out, os))                                      \
  CONVCORE_ISA_DISPATCH(filter_row_##M, filter_row_body<M>,                                   \
                        (const T* w, int64_t ws, int64_t n, T* u, int64_t us),                \
                        (w, ws, n, u, us))                                                    \
  CONVCORE_ISA_DISPATCH(grad_output_tiles_##M, grad_output_tiles_body<M>,                     \
                        (const T* dy, int64_t ss, int64_t nt, T* dm, int64_t mstride),        \
                        (dy, ss, nt, dm, mstride))                                            \
  CONVCORE_ISA_DISPATCH(grad_filter_row_##M, grad_filter_row_body<M>,                         \
                        (const T* du, int64_t dus, int64_t n, T* g), (du, dus, n, g))
CONVCORE_WINO_ROWS(2, float)
CONVCORE_WINO_ROWS(2, double)
CONVCORE_WINO_ROWS(4, float)
CONVCORE_WINO_ROWS(4, double)
#undef CONVCORE_WINO_ROWS

// The driver's entry to the row transforms of variant M.
template <int M, typename T>
inline void filter_row(const T* w, int64_t ws, int64_t n, T* u, int64_t us) {
  if constexpr (M == 2)
    filter_row_2(w, ws, n, u, us);
  else
    filter_row_4(w, ws, n, u, us);
}
template <int M, typename T>
inline void input_tiles(const T* in, int64_t ss, int64_t nt, T* v, int64_t vstride) {
  if constexpr (M == 2)
    input_tiles_2(in, ss, nt, v, vstride);
  else
    input_tiles_4(in, ss, nt, v, vstride);
}
template <int M, typename T>
inline void output_tiles(const T* m, int64_t mstride, int64_t nt, T bias, T* out,
                         int64_t os) {
  if constexpr (M == 2)
    output_tiles_2(m, mstride, nt, bias, out, os);
  else
    output_tiles_4(m, mstride, nt, bias, out, os);
}

template <int M, typename T>
inline void grad_output_tiles(const T* dy, int64_t ss, int64_t nt, T* dm, int64_t mstride) {
  if constexpr (M == 2)
    grad_output_tiles_2(dy, ss, nt, dm, mstride);
  else
    grad_output_tiles_4(dy, ss, nt, dm, mstride);
}
template <int M, typename T>
inline void grad_filter_row(const T* du, int64_t dus, int64_t n, T* g) {
  if constexpr (M == 2)
    grad_filter_row_2(du, dus, n, g);
  else
    grad_filter_row_4(du, dus, n, g);
}

}  // namespace winograd
}  // namespace convcore
