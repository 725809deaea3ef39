// Winograd F(m x m, 3x3) for 3x3, stride-1, undilated, ungrouped convolution
// (Lavin & Gray 2015): each m x m block of outputs comes from an a x a block
// of input (a = m + 2) through a*a elementwise products, so the products
// become a*a independent GEMMs over channels:
//   U = G g G^T (weights, once per call), V = B^T d B (input tiles),
//   M[xi] = U[xi] (Cout x C) * V[xi] (C x tiles), Y = A^T M A.
// Two variants share one driver (conv.cpp, winograd_conv<M>):
//   F(2x2, 3x3): 4x4 tiles, 16 products per 4 outputs, 2.25x fewer
//                multiplications than direct convolution;
//   F(4x4, 3x3): 6x6 tiles, 36 products per 16 outputs, 4x fewer, at the
//                cost of larger transforms and more rounding error (the
//                transform entries grow to 4, 5 and 8; measured in the tests
//                and docs/benchmarks.md).
// Each variant is its three 1-D transforms (B^T, A^T, G applied to one
// column); the 2-D transforms apply them to the columns, then the rows.
#pragma once
#include <algorithm>
#include <cstdint>

namespace convcore {
namespace winograd {

#define CONVCORE_WINO_INLINE inline __attribute__((always_inline))

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
  static void filter(const double* g, double* u) {  // G g
    u[0] = g[0];
    u[1] = 0.5 * (g[0] + g[1] + g[2]);
    u[2] = 0.5 * (g[0] - g[1] + g[2]);
    u[3] = g[2];
  }
};

// F(4, 3), interpolation points 0, 1, -1, 2, -2, infinity (Lavin & Gray's
// choice; F(4, 3) has room for five finite points, and these keep the
// transform entries small integers):
//   B^T = [4  0 -5  0 1 0;     G = [ 1/4     0    0  ;   A^T = [1 1  1 1  1 0;
//          0 -4 -4  1 1 0;          -1/6  -1/6 -1/6 ;          0 1 -1 2 -2 0;
//          0  4 -4 -1 1 0;          -1/6   1/6 -1/6 ;          0 1  1 4  4 0;
//          0 -2 -1  2 1 0;           1/24  1/12 1/6 ;          0 1 -1 8 -8 1]
//          0  2 -1 -2 1 0;           1/24 -1/12 1/6 ;
//          0  4  0 -5 0 1]           0      0    1  ]
// (derived from the Lagrange interpolation at those points; checked against
// direct convolution by tests/test_conv_algorithms.py).
template <>
struct Variant<4> {
  static constexpr int kOut = 4, kTile = 6, kPoints = 36;
  // 64 tiles of 4x4 outputs: the task's 36 V and 36 M matrices then take
  // about as much memory as F(2x2)'s 16 of 128 tiles.
  static constexpr int64_t kBandTiles = 64;
  template <typename T>
  static CONVCORE_WINO_INLINE void input(const T* d, T* v) {  // B^T d
    const T d13 = d[1] + d[2], d31 = d[3] + d[4];  // shared sums, factored as
    const T e13 = d[1] - d[2], e31 = d[4] - d[3];  // (Lavin & Gray)
    const T f = d[4] - d[2], h = d[3] - d[1];
    v[0] = T(4) * d[0] - T(5) * d[2] + d[4];
    v[1] = d31 - T(4) * d13;
    v[2] = e31 + T(4) * e13;
    v[3] = f + T(2) * h;
    v[4] = f - T(2) * h;
    v[5] = T(4) * d[1] - T(5) * d[3] + d[5];
  }
  template <typename T>
  static CONVCORE_WINO_INLINE void output(const T* m, T* y) {  // A^T m
    const T s12 = m[1] + m[2], d12 = m[1] - m[2];
    const T s34 = m[3] + m[4], d34 = m[3] - m[4];
    y[0] = m[0] + s12 + s34;
    y[1] = d12 + T(2) * d34;
    y[2] = s12 + T(4) * s34;
    y[3] = d12 + T(8) * d34 + m[5];
  }
  static void filter(const double* g, double* u) {  // G g
    u[0] = g[0] / 4;
    u[1] = -(g[0] + g[1] + g[2]) / 6;
    u[2] = -(g[0] - g[1] + g[2]) / 6;
    u[3] = g[0] / 24 + g[1] / 12 + g[2] / 6;
    u[4] = g[0] / 24 - g[1] / 12 + g[2] / 6;
    u[5] = g[2];
  }
};

// U = G g G^T for one 3x3 filter g (row-major); u[kPoints] row-major.
// Computed in double whatever T: it runs once per filter, and rounding
// the fractions 1/6, 1/12, 1/24 once, at the end, keeps U exact to T.
template <int M, typename T>
inline void transform_filter(const T* g, T* u) {
  using V = Variant<M>;
  constexpr int A = V::kTile;
  double cols[3][A];  // G applied to each column of g
  for (int j = 0; j < 3; ++j) {
    const double c[3] = {double(g[j]), double(g[3 + j]), double(g[6 + j])};
    V::filter(c, cols[j]);
  }
  for (int i = 0; i < A; ++i) {  // then to each row of G g
    const double r[3] = {cols[0][i], cols[1][i], cols[2][i]};
    double q[A];
    V::filter(r, q);
    for (int j = 0; j < A; ++j) u[i * A + j] = static_cast<T>(q[j]);
  }
}

// Y = A^T m A for one tile of products m (row-major a x a); y row-major m x m.
// The scalar path, for ragged tiles at the bottom/right edge.
template <int M, typename T>
inline void transform_output(const T* m, T* y) {
  using V = Variant<M>;
  constexpr int A = V::kTile;
  T rows[M][A];  // A^T m: the columns of m transformed
  for (int j = 0; j < A; ++j) {
    T c[A], q[M];
    for (int k = 0; k < A; ++k) c[k] = m[k * A + j];
    V::output(c, q);
    for (int i = 0; i < M; ++i) rows[i][j] = q[i];
  }
  for (int i = 0; i < M; ++i) V::output(rows[i], y + i * M);
}

// Row-at-a-time transforms over a zero-padded slab, written so the loop over
// tiles vectorises: each tile's a x a patch starts m columns after the last,
// and the a*a transformed values go to a*a streams contiguous in the tile.
// The loops over the tile are fully unrolled (forced: F(4x4) has 36 values)
// so that only the loop over tiles is left to vectorise.

// v[xi * vstride + t] = (B^T d B)[xi] for tiles t < nt of one tile row, whose
// patches are rows 0..a-1 of the slab (row stride ss) at columns m*t..m*t+a-1.
template <int M, typename T>
CONVCORE_WINO_INLINE void input_row_body(const T* __restrict slab, int64_t ss, int64_t nt,
                                         T* __restrict v, int64_t vstride) {
  using V = Variant<M>;
  constexpr int A = V::kTile;
  for (int64_t t = 0; t < nt; ++t) {
    const T* p = slab + M * t;
    T cols[A][A];  // cols[j] = B^T (column j of the patch)
#pragma GCC unroll 8
    for (int j = 0; j < A; ++j) {
      T d[A];
#pragma GCC unroll 8
      for (int k = 0; k < A; ++k) d[k] = p[k * ss + j];
      V::input(d, cols[j]);
    }
#pragma GCC unroll 8
    for (int i = 0; i < A; ++i) {  // (B^T d) B: row i of B^T d, transformed
      T r[A], q[A];
#pragma GCC unroll 8
      for (int j = 0; j < A; ++j) r[j] = cols[j][i];
      V::input(r, q);
#pragma GCC unroll 8
      for (int j = 0; j < A; ++j) v[(i * A + j) * vstride + t] = q[j];
    }
  }
}

// The output transform of nt tiles of one tile row: m[xi * mstride + t]
// -> m x m outputs at out[i * os + m*t + j], plus bias. Only tiles wholly
// inside the output (the caller does the ragged edge).
template <int M, typename T>
CONVCORE_WINO_INLINE void output_row_body(const T* __restrict m, int64_t mstride, int64_t nt,
                                          T bias, T* __restrict out, int64_t os) {
  using V = Variant<M>;
  constexpr int A = V::kTile;
  for (int64_t t = 0; t < nt; ++t) {
    T rows[M][A];  // A^T m
#pragma GCC unroll 8
    for (int j = 0; j < A; ++j) {
      T c[A], q[M];
#pragma GCC unroll 8
      for (int k = 0; k < A; ++k) c[k] = m[(k * A + j) * mstride + t];
      V::output(c, q);
#pragma GCC unroll 8
      for (int i = 0; i < M; ++i) rows[i][j] = q[i];
    }
#pragma GCC unroll 8
    for (int i = 0; i < M; ++i) {
      T y[M];
      V::output(rows[i], y);
#pragma GCC unroll 8
      for (int j = 0; j < M; ++j) out[i * os + M * t + j] = y[j] + bias;
    }
  }
}

// Run-time dispatch: target_clones on plain (non-template) functions, so the
// vector code is built for AVX-512, AVX2 and the baseline and picked by CPU.
#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__) && !defined(__clang__)
#define CONVCORE_WINO_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CONVCORE_WINO_CLONES
#endif

#define CONVCORE_WINO_ROWS(M, T)                                                              \
  CONVCORE_WINO_CLONES inline void input_row_##M(const T* slab, int64_t ss, int64_t nt, T* v, \
                                                 int64_t vstride) {                           \
    input_row_body<M>(slab, ss, nt, v, vstride);                                              \
  }                                                                                           \
  CONVCORE_WINO_CLONES inline void output_row_##M(const T* m, int64_t mstride, int64_t nt,   \
                                                  T bias, T* out, int64_t os) {               \
    output_row_body<M>(m, mstride, nt, bias, out, os);                                        \
  }
CONVCORE_WINO_ROWS(2, float)
CONVCORE_WINO_ROWS(2, double)
CONVCORE_WINO_ROWS(4, float)
CONVCORE_WINO_ROWS(4, double)
#undef CONVCORE_WINO_ROWS

// The driver's entry to the row transforms of variant M.
template <int M, typename T>
inline void input_row(const T* slab, int64_t ss, int64_t nt, T* v, int64_t vstride) {
  if constexpr (M == 2)
    input_row_2(slab, ss, nt, v, vstride);
  else
    input_row_4(slab, ss, nt, v, vstride);
}
template <int M, typename T>
inline void output_row(const T* m, int64_t mstride, int64_t nt, T bias, T* out, int64_t os) {
  if constexpr (M == 2)
    output_row_2(m, mstride, nt, bias, out, os);
  else
    output_row_4(m, mstride, nt, bias, out, os);
}

}  // namespace winograd
}  // namespace convcore
