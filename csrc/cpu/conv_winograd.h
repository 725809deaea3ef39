// Winograd F(2x2, 3x3) for 3x3, stride-1, undilated, ungrouped convolution
// (Lavin & Gray 2015): each 2x2 block of outputs comes from a 4x4 block of
// input through 16 elementwise products instead of 36 multiply-adds, so the
// 16 products become 16 independent GEMMs over channels:
//   U = G g G^T (weights, once per call), V = B^T d B (input tiles),
//   M[xi] = U[xi] (Cout x C) * V[xi] (C x tiles), Y = A^T M A.
// 2.25x fewer multiplications than direct convolution, at the cost of the
// transforms and a little accuracy (measured in tests and docs).
#pragma once
#include <algorithm>
#include <cstdint>

namespace convcore {
namespace winograd {

constexpr int kTile = 4;     // input tile
constexpr int kOut = 2;      // output tile
constexpr int kPoints = 16;  // products per tile

// U = G g G^T for one 3x3 filter g (row-major); u[16] row-major 4x4.
template <typename T>
inline void transform_filter(const T* g, T* u) {
  T t[4][3];  // G g
  for (int j = 0; j < 3; ++j) {
    const T g0 = g[0 * 3 + j], g1 = g[1 * 3 + j], g2 = g[2 * 3 + j];
    t[0][j] = g0;
    t[1][j] = T(0.5) * (g0 + g1 + g2);
    t[2][j] = T(0.5) * (g0 - g1 + g2);
    t[3][j] = g2;
  }
  for (int i = 0; i < 4; ++i) {  // (G g) G^T
    const T a = t[i][0], b = t[i][1], c = t[i][2];
    u[i * 4 + 0] = a;
    u[i * 4 + 1] = T(0.5) * (a + b + c);
    u[i * 4 + 2] = T(0.5) * (a - b + c);
    u[i * 4 + 3] = c;
  }
}

// V = B^T d B for one 4x4 input tile d (row-major); v[16].
template <typename T>
inline void transform_input(const T d[16], T v[16]) {
  T t[16];  // B^T d
  for (int j = 0; j < 4; ++j) {
    const T d0 = d[0 * 4 + j], d1 = d[1 * 4 + j], d2 = d[2 * 4 + j], d3 = d[3 * 4 + j];
    t[0 * 4 + j] = d0 - d2;
    t[1 * 4 + j] = d1 + d2;
    t[2 * 4 + j] = d2 - d1;
    t[3 * 4 + j] = d1 - d3;
  }
  for (int i = 0; i < 4; ++i) {  // (B^T d) B
    const T a = t[i * 4 + 0], b = t[i * 4 + 1], c = t[i * 4 + 2], e = t[i * 4 + 3];
    v[i * 4 + 0] = a - c;
    v[i * 4 + 1] = b + c;
    v[i * 4 + 2] = c - b;
    v[i * 4 + 3] = b - e;
  }
}

// Y = A^T m A for one tile of products m[16]; y[4] row-major 2x2.
template <typename T>
inline void transform_output(const T m[16], T y[4]) {
  T t[2][4];  // A^T m
  for (int j = 0; j < 4; ++j) {
    const T m0 = m[0 * 4 + j], m1 = m[1 * 4 + j], m2 = m[2 * 4 + j], m3 = m[3 * 4 + j];
    t[0][j] = m0 + m1 + m2;
    t[1][j] = m1 - m2 - m3;
  }
  for (int i = 0; i < 2; ++i) {
    y[i * 2 + 0] = t[i][0] + t[i][1] + t[i][2];
    y[i * 2 + 1] = t[i][1] - t[i][2] - t[i][3];
  }
}

}  // namespace winograd
}  // namespace convcore

namespace convcore {
namespace winograd {

// Row-at-a-time transforms over a zero-padded slab, written so the loop over
// tiles vectorises: each tile's 4x4 patch starts 2 columns after the last,
// and the 16 transformed values go to 16 streams contiguous in the tile.

// v[xi * vstride + t] = (B^T d B)[xi] for tiles t < nt of one tile row, whose
// patches are rows r0..r0+3 of the slab (row stride ss) at columns 2t..2t+3.
template <typename T>
inline __attribute__((always_inline)) void input_row_body(const T* __restrict slab, int64_t ss,
                                                          int64_t nt, T* __restrict v,
                                                          int64_t vstride) {
  const T* r0 = slab;
  const T* r1 = slab + ss;
  const T* r2 = slab + 2 * ss;
  const T* r3 = slab + 3 * ss;
  for (int64_t t = 0; t < nt; ++t) {
    const int64_t c = 2 * t;
    // B^T d: rows combined
    T a[4], b[4], e[4], f[4];
    for (int j = 0; j < 4; ++j) {
      a[j] = r0[c + j] - r2[c + j];
      b[j] = r1[c + j] + r2[c + j];
      e[j] = r2[c + j] - r1[c + j];
      f[j] = r1[c + j] - r3[c + j];
    }
    const T* rows[4] = {a, b, e, f};
    for (int i = 0; i < 4; ++i) {  // (B^T d) B: columns combined
      const T* q = rows[i];
      v[(i * 4 + 0) * vstride + t] = q[0] - q[2];
      v[(i * 4 + 1) * vstride + t] = q[1] + q[2];
      v[(i * 4 + 2) * vstride + t] = q[2] - q[1];
      v[(i * 4 + 3) * vstride + t] = q[1] - q[3];
    }
  }
}

// The output transform of nt tiles of one tile row: m[xi * mstride + t]
// -> 2x2 outputs at out0[2t], out0[2t+1], out1[2t], out1[2t+1], plus bias.
// Only tiles wholly inside the output (the caller does the ragged edge).
template <typename T>
inline __attribute__((always_inline)) void output_row_body(const T* __restrict m,
                                                           int64_t mstride, int64_t nt, T bias,
                                                           T* __restrict out0,
                                                           T* __restrict out1) {
  for (int64_t t = 0; t < nt; ++t) {
    T q[16];
    for (int xi = 0; xi < 16; ++xi) q[xi] = m[xi * mstride + t];
    T s0[4], s1[4];  // A^T m
    for (int j = 0; j < 4; ++j) {
      s0[j] = q[j] + q[4 + j] + q[8 + j];
      s1[j] = q[4 + j] - q[8 + j] - q[12 + j];
    }
    out0[2 * t] = s0[0] + s0[1] + s0[2] + bias;
    out0[2 * t + 1] = s0[1] - s0[2] - s0[3] + bias;
    out1[2 * t] = s1[0] + s1[1] + s1[2] + bias;
    out1[2 * t + 1] = s1[1] - s1[2] - s1[3] + bias;
  }
}

#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__) && !defined(__clang__)
#define CONVCORE_WINO_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CONVCORE_WINO_CLONES
#endif

CONVCORE_WINO_CLONES inline void input_row(const float* slab, int64_t ss, int64_t nt, float* v,
                                           int64_t vstride) {
  input_row_body(slab, ss, nt, v, vstride);
}
CONVCORE_WINO_CLONES inline void input_row(const double* slab, int64_t ss, int64_t nt,
                                           double* v, int64_t vstride) {
  input_row_body(slab, ss, nt, v, vstride);
}
CONVCORE_WINO_CLONES inline void output_row(const float* m, int64_t mstride, int64_t nt,
                                            float bias, float* out0, float* out1) {
  output_row_body(m, mstride, nt, bias, out0, out1);
}
CONVCORE_WINO_CLONES inline void output_row(const double* m, int64_t mstride, int64_t nt,
                                            double bias, double* out0, double* out1) {
  output_row_body(m, mstride, nt, bias, out0, out1);
}

}  // namespace winograd
}  // namespace convcore
