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
