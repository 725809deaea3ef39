// The op functions against naive loops written here from the definitions,
// against each other (every convolution algorithm, linear as a 1x1
// convolution, average pooling as a convolution, strided vs contiguous
// inputs, 1 vs 2 threads, float32 vs float64), and every backward against
// finite differences of its forward (float64).
#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <vector>

#include "check.h"
#include "convcore/convcore.h"
#include "convcore/padding.h"
#include "util.h"

using namespace convcore;
using testutil::at;
using testutil::random_tensor;
using testutil::rel_error;
using testutil::Rng;

namespace {

// ------------------------------------------------------------ naive loops

int64_t idx4(const Tensor& t, int64_t a, int64_t b, int64_t c, int64_t d) {
  const auto& s = t.shape();
  return ((a * s[1] + b) * s[2] + c) * s[3] + d;
}

Tensor naive_conv2d(const Tensor& x, const Tensor& w, const Tensor* b, const Conv2dParams& p) {
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t O = w.size(0), Cg = w.size(1), KH = w.size(2), KW = w.size(3);
  const int64_t Og = O / p.groups;
  const int64_t Ho = (H + p.pad_top + p.pad_bottom - p.dilation_h * (KH - 1) - 1) / p.stride_h + 1;
  const int64_t Wo = (W + p.pad_left + p.pad_right - p.dilation_w * (KW - 1) - 1) / p.stride_w + 1;
  (void)C;
  Tensor y(x.dtype(), {N, O, Ho, Wo});
  for (int64_t n = 0; n < N; ++n)
    for (int64_t o = 0; o < O; ++o)
      for (int64_t i = 0; i < Ho; ++i)
        for (int64_t j = 0; j < Wo; ++j) {
          double s = b ? at(*b, o) : 0.0;
          const int64_t g = o / Og;
          for (int64_t c = 0; c < Cg; ++c)
            for (int64_t q = 0; q < KH; ++q)
              for (int64_t r = 0; r < KW; ++r) {
                const int64_t h = i * p.stride_h - p.pad_top + q * p.dilation_h;
                const int64_t ww = j * p.stride_w - p.pad_left + r * p.dilation_w;
                if (h < 0 || h >= H || ww < 0 || ww >= W) continue;
                s += at(x, idx4(x, n, g * Cg + c, h, ww)) * at(w, idx4(w, o, c, q, r));
              }
          testutil::set(y, idx4(y, n, o, i, j), s);
        }
  return y;
}

// PyTorch's pooling output size (written independently of shapes.cpp).
int64_t pool_out(int64_t in, int64_t k, int64_t s, int64_t pad, int64_t d, bool ceil_mode) {
  const int64_t span = d * (k - 1) + 1;
  const int64_t num = in + 2 * pad - span;
  int64_t out = (ceil_mode ? (num + s - 1) / s : num / s) + 1;
  if (ceil_mode && (out - 1) * s >= in + pad) --out;
  return out;
}

Tensor naive_max_pool(const Tensor& x, const Pool2dParams& p) {
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t Ho = pool_out(H, p.kernel_h, p.stride_h, p.pad_h, p.dilation_h, p.ceil_mode);
  const int64_t Wo = pool_out(W, p.kernel_w, p.stride_w, p.pad_w, p.dilation_w, p.ceil_mode);
  Tensor y(x.dtype(), {N, C, Ho, Wo});
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t i = 0; i < Ho; ++i)
        for (int64_t j = 0; j < Wo; ++j) {
          double m = -std::numeric_limits<double>::infinity();
          for (int64_t q = 0; q < p.kernel_h; ++q)
            for (int64_t r = 0; r < p.kernel_w; ++r) {
              const int64_t h = i * p.stride_h - p.pad_h + q * p.dilation_h;
              const int64_t w = j * p.stride_w - p.pad_w + r * p.dilation_w;
              if (h >= 0 && h < H && w >= 0 && w < W) m = std::max(m, at(x, idx4(x, n, c, h, w)));
            }
          testutil::set(y, idx4(y, n, c, i, j), m);
        }
  return y;
}

Tensor naive_avg_pool(const Tensor& x, const Pool2dParams& p) {
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t Ho = pool_out(H, p.kernel_h, p.stride_h, p.pad_h, 1, p.ceil_mode);
  const int64_t Wo = pool_out(W, p.kernel_w, p.stride_w, p.pad_w, 1, p.ceil_mode);
  Tensor y(x.dtype(), {N, C, Ho, Wo});
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t i = 0; i < Ho; ++i)
        for (int64_t j = 0; j < Wo; ++j) {
          // PyTorch: the window clipped to the padded input gives the
          // divisor with count_include_pad, the input alone without.
          int64_t h0 = i * p.stride_h - p.pad_h, w0 = j * p.stride_w - p.pad_w;
          int64_t h1 = std::min(h0 + p.kernel_h, H + p.pad_h);
          int64_t w1 = std::min(w0 + p.kernel_w, W + p.pad_w);
          const int64_t padded_count = (h1 - h0) * (w1 - w0);
          h0 = std::max<int64_t>(h0, 0), w0 = std::max<int64_t>(w0, 0);
          h1 = std::min(h1, H), w1 = std::min(w1, W);
          double s = 0;
          for (int64_t h = h0; h < h1; ++h)
            for (int64_t w = w0; w < w1; ++w) s += at(x, idx4(x, n, c, h, w));
          const double div = p.divisor_override ? double(p.divisor_override)
                             : p.count_include_pad ? double(padded_count)
                                                   : double((h1 - h0) * (w1 - w0));
          testutil::set(y, idx4(y, n, c, i, j), s / div);
        }
  return y;
}

Tensor naive_adaptive(const Tensor& x, int64_t oh, int64_t ow) {
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  Tensor y(x.dtype(), {N, C, oh, ow});
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t i = 0; i < oh; ++i)
        for (int64_t j = 0; j < ow; ++j) {
          const int64_t h0 = i * H / oh, h1 = ((i + 1) * H + oh - 1) / oh;
          const int64_t w0 = j * W / ow, w1 = ((j + 1) * W + ow - 1) / ow;
          double s = 0;
          for (int64_t h = h0; h < h1; ++h)
            for (int64_t w = w0; w < w1; ++w) s += at(x, idx4(x, n, c, h, w));
          testutil::set(y, idx4(y, n, c, i, j), s / double((h1 - h0) * (w1 - w0)));
        }
  return y;
}

Tensor naive_linear(const Tensor& x, const Tensor& w, const Tensor* b) {
  const int64_t M = x.size(0), K = x.size(1), O = w.size(0);
  Tensor y(x.dtype(), {M, O});
  for (int64_t m = 0; m < M; ++m)
    for (int64_t o = 0; o < O; ++o) {
      double s = b ? at(*b, o) : 0.0;
      for (int64_t k = 0; k < K; ++k) s += at(x, m * K + k) * at(w, o * K + k);
      testutil::set(y, m * O + o, s);
    }
  return y;
}

Tensor naive_lrn(const Tensor& x, const LrnParams& p) {
  const int64_t N = x.size(0), C = x.size(1), S = x.numel() / (N * C);
  Tensor y(x.dtype(), x.shape());
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t s = 0; s < S; ++s) {
        double sq = 0;
        for (int64_t q = std::max<int64_t>(0, c - p.size / 2);
             q <= std::min<int64_t>(C - 1, c + (p.size - 1) / 2); ++q) {
          const double v = at(x, (n * C + q) * S + s);
          sq += v * v;
        }
        const double v = at(x, (n * C + c) * S + s);
        testutil::set(y, (n * C + c) * S + s, v / std::pow(p.k + p.alpha / double(p.size) * sq, p.beta));
      }
  return y;
}

// numpy.pad's index rules, iterated as numpy does (independent of padding.cpp).
int64_t pad_source(int64_t pos, int64_t n, PadMode mode) {
  if (pos >= 0 && pos < n) return pos;
  if (mode == PadMode::Zeros) return -1;
  if (mode == PadMode::Replicate) return pos < 0 ? 0 : n - 1;
  if (mode == PadMode::Circular) {
    while (pos < 0) pos += n;
    while (pos >= n) pos -= n;
    return pos;
  }
  if (n == 1) return 0;
  while (pos < 0 || pos >= n) {
    if (pos < 0) pos = -pos;
    if (pos >= n) pos = 2 * (n - 1) - pos;
  }
  return pos;
}

Tensor naive_pad(const Tensor& x, const Pad2dParams& p) {
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  Tensor y(x.dtype(), {N, C, H + p.top + p.bottom, W + p.left + p.right});
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t i = 0; i < y.size(2); ++i)
        for (int64_t j = 0; j < y.size(3); ++j) {
          const int64_t h = pad_source(i - p.top, H, p.mode), w = pad_source(j - p.left, W, p.mode);
          testutil::set(y, idx4(y, n, c, i, j), h < 0 || w < 0 ? 0.0 : at(x, idx4(x, n, c, h, w)));
        }
  return y;
}

// ------------------------------------------------------------ op wrappers

Tensor conv(const Tensor& x, const Tensor& w, const Tensor* b, const Conv2dParams& p) {
  const Shape4 o = conv2d_output_shape(shape4(x.view()), shape4(w.view()), p);
  Tensor y = Tensor::empty(x.dtype(), {o.n, o.c, o.h, o.w});
  TensorView bv;
  if (b) bv = b->view();
  conv2d_forward(x.view(), w.view(), b ? &bv : nullptr, p, y.view());
  return y;
}

Tensor max_pool(const TensorView& x, const Pool2dParams& p) {
  const Shape4 o = max_pool2d_output_shape(shape4(x), p);
  Tensor y = Tensor::empty(x.dtype, {o.n, o.c, o.h, o.w});
  max_pool2d_forward(x, p, y.view(), nullptr);
  return y;
}

Tensor avg_pool(const Tensor& x, const Pool2dParams& p) {
  const Shape4 o = avg_pool2d_output_shape(shape4(x.view()), p);
  Tensor y = Tensor::empty(x.dtype(), {o.n, o.c, o.h, o.w});
  avg_pool2d_forward(x.view(), p, y.view());
  return y;
}

Tensor linear(const Tensor& x, const Tensor& w, const Tensor* b) {
  Tensor y = Tensor::empty(x.dtype(), {x.size(0), w.size(0)});
  TensorView bv;
  if (b) bv = b->view();
  linear_forward(x.view(), w.view(), b ? &bv : nullptr, y.view());
  return y;
}

Conv2dParams conv_params(int64_t sh, int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr,
                         int64_t dh, int64_t dw, int64_t groups) {
  Conv2dParams p;
  p.stride_h = sh, p.stride_w = sw;
  p.pad_top = pt, p.pad_bottom = pb, p.pad_left = pl, p.pad_right = pr;
  p.dilation_h = dh, p.dilation_w = dw;
  p.groups = groups;
  return p;
}

// Finite-difference check of a backward: for f: x -> y and a fixed
// upstream gradient gy, d/dt <f(x + t d), gy> at 0 must equal <gx, d>.
void check_gradient(const char* what, const std::function<Tensor(const Tensor&)>& f,
                    const Tensor& x, const Tensor& gy, const Tensor& gx, Rng& rng,
                    double tol = 1e-6) {
  const Tensor d = random_tensor(DType::Float64, x.shape(), rng);
  const double eps = 1e-6;
  Tensor xp = x, xm = x;
  for (int64_t i = 0; i < x.numel(); ++i) {
    testutil::set(xp, i, at(x, i) + eps * at(d, i));
    testutil::set(xm, i, at(x, i) - eps * at(d, i));
  }
  const double numeric = (testutil::dot(f(xp), gy) - testutil::dot(f(xm), gy)) / (2 * eps);
  const double analytic = testutil::dot(gx, d);
  const double err = std::fabs(numeric - analytic) / std::max(1.0, std::fabs(analytic));
  ++check::checks();
  if (!(err < tol)) {
    std::ostringstream os;
    os << what << ": finite differences give " << numeric << ", backward " << analytic;
    check::fail(__FILE__, __LINE__, os.str());
  }
}

}  // namespace

// ---------------------------------------------------------------- forward

TEST(conv2d_matches_naive_loops) {
  Rng rng(1);
  struct Case {
    std::vector<int64_t> x, w;
    Conv2dParams p;
  };
  const std::vector<Case> cases = {
      {{2, 3, 9, 8}, {4, 3, 3, 3}, conv_params(1, 1, 1, 1, 1, 1, 1, 1, 1)},
      {{2, 4, 11, 10}, {6, 2, 3, 2}, conv_params(2, 1, 1, 2, 0, 3, 1, 2, 2)},  // groups, asym pad
      {{1, 6, 7, 7}, {6, 1, 3, 3}, conv_params(1, 1, 2, 2, 2, 2, 2, 2, 6)},    // depthwise, dilated
      {{3, 5, 6, 5}, {7, 5, 1, 1}, conv_params(1, 1, 0, 0, 0, 0, 1, 1, 1)},    // pointwise
      {{1, 3, 12, 12}, {8, 3, 5, 5}, conv_params(3, 3, 0, 0, 0, 0, 1, 1, 1)},  // "doesn't fit": floors
      {{2, 3, 8, 8}, {5, 3, 4, 2}, conv_params(1, 1, 1, 2, 0, 1, 1, 1, 1)},    // 'same' of an even kernel
      // few output channels, stride 1 along rows: positions in the lanes,
      // blocks across rows (the first), along each row (strided rows)
      {{2, 5, 11, 30}, {7, 5, 2, 5}, conv_params(1, 1, 1, 1, 2, 2, 2, 1, 1)},
      {{3, 4, 16, 53}, {11, 4, 5, 3}, conv_params(2, 1, 2, 2, 1, 1, 1, 2, 1)},
  };
  for (DType dt : {DType::Float32, DType::Float64}) {
    for (const auto& c : cases) {
      const Tensor x = random_tensor(dt, c.x, rng), w = random_tensor(dt, c.w, rng);
      const Tensor b = random_tensor(dt, {c.w[0]}, rng);
      const double tol = dt == DType::Float32 ? 2e-6 : 1e-13;
      CHECK(rel_error(conv(x, w, &b, c.p), naive_conv2d(x, w, &b, c.p)) < tol);
      CHECK(rel_error(conv(x, w, nullptr, c.p), naive_conv2d(x, w, nullptr, c.p)) < tol);
    }
  }
}

TEST(conv2d_algorithms_agree) {
  Rng rng(2);
  const Tensor x = random_tensor(DType::Float32, {2, 8, 10, 9}, rng);
  // 3x3 stride 1: gemm, direct, winograd F(2x2) and F(4x4), auto
  const Tensor w3 = random_tensor(DType::Float32, {5, 8, 3, 3}, rng);
  Conv2dParams p = conv_params(1, 1, 1, 1, 1, 1, 1, 1, 1);
  const Tensor ref3 = naive_conv2d(x, w3, nullptr, p);
  for (ConvAlgorithm a : {ConvAlgorithm::Auto, ConvAlgorithm::Gemm, ConvAlgorithm::Direct,
                          ConvAlgorithm::Winograd, ConvAlgorithm::Winograd4x4}) {
    p.algorithm = a;
    // F(4x4): 2.3e-6 worst measured on such shapes (tests/test_conv_algorithms.py)
    const double tol = a == ConvAlgorithm::Winograd4x4 ? 1e-5 : a == ConvAlgorithm::Winograd ? 2e-5 : 2e-6;
    CHECK(rel_error(conv(x, w3, nullptr, p), ref3) < tol);
  }
  // 1x1: pointwise vs gemm
  const Tensor w1 = random_tensor(DType::Float32, {6, 8, 1, 1}, rng);
  p = conv_params(1, 1, 0, 0, 0, 0, 1, 1, 1);
  const Tensor ref1 = naive_conv2d(x, w1, nullptr, p);
  for (ConvAlgorithm a : {ConvAlgorithm::Pointwise, ConvAlgorithm::Gemm}) {
    p.algorithm = a;
    CHECK(rel_error(conv(x, w1, nullptr, p), ref1) < 2e-6);
  }
  // strided, dilated, grouped: direct vs gemm
  const Tensor wg = random_tensor(DType::Float32, {6, 4, 3, 2}, rng);
  p = conv_params(2, 1, 2, 0, 1, 1, 2, 1, 2);
  const Tensor refg = naive_conv2d(x, wg, nullptr, p);
  for (ConvAlgorithm a : {ConvAlgorithm::Direct, ConvAlgorithm::Gemm}) {
    p.algorithm = a;
    CHECK(rel_error(conv(x, wg, nullptr, p), refg) < 2e-6);
  }
  // depthwise vs gemm
  const Tensor wd = random_tensor(DType::Float32, {8, 1, 3, 3}, rng);
  p = conv_params(2, 1, 1, 1, 1, 1, 1, 1, 8);
  const Tensor refd = naive_conv2d(x, wd, nullptr, p);
  for (ConvAlgorithm a : {ConvAlgorithm::Depthwise, ConvAlgorithm::Gemm}) {
    p.algorithm = a;
    CHECK(rel_error(conv(x, wd, nullptr, p), refd) < 2e-6);
  }
  // an algorithm that does not apply is a ValueError
  p = conv_params(2, 2, 0, 0, 0, 0, 1, 1, 1);
  p.algorithm = ConvAlgorithm::Winograd;
  CHECK_THROWS(ValueError, conv(x, w3, nullptr, p), "winograd");
  p.algorithm = ConvAlgorithm::Winograd4x4;
  CHECK_THROWS(ValueError, conv(x, w3, nullptr, p), "winograd4");
}

TEST(linear_is_a_1x1_convolution) {
  Rng rng(3);
  for (DType dt : {DType::Float32, DType::Float64}) {
    const Tensor x = random_tensor(dt, {7, 13}, rng), w = random_tensor(dt, {5, 13}, rng);
    const Tensor b = random_tensor(dt, {5}, rng);
    const Tensor y = linear(x, w, &b);
    CHECK(rel_error(y, naive_linear(x, w, &b)) < (dt == DType::Float32 ? 2e-6 : 1e-13));
    const Tensor yc = conv(x.reshape({7, 13, 1, 1}), w.reshape({5, 13, 1, 1}), &b, Conv2dParams());
    CHECK(rel_error(y, yc.reshape({7, 5})) < (dt == DType::Float32 ? 2e-6 : 1e-13));
  }
  // a transposed (strided) input gives the same result as its contiguous copy
  const Tensor xt = random_tensor(DType::Float32, {13, 7}, rng);
  const Tensor w = random_tensor(DType::Float32, {5, 13}, rng);
  TensorView tv = xt.view();
  std::swap(tv.shape[0], tv.shape[1]);
  std::swap(tv.strides[0], tv.strides[1]);
  Tensor y1 = Tensor::empty(DType::Float32, {7, 5});
  linear_forward(tv, w.view(), nullptr, y1.view());
  CHECK(testutil::bit_equal(y1, linear(Tensor::from_view(tv), w, nullptr)));
}

TEST(pooling_matches_naive_loops) {
  Rng rng(4);
  const Tensor x = random_tensor(DType::Float32, {2, 3, 11, 10}, rng);
  struct Case {
    int64_t k, s, pad, d;
    bool ceil;
  };
  for (const Case& c : {Case{2, 2, 0, 1, false}, Case{3, 2, 1, 1, true}, Case{3, 2, 1, 2, false},
                        Case{3, 3, 0, 1, true}, Case{5, 1, 2, 1, false}}) {
    Pool2dParams p;
    p.kernel_h = p.kernel_w = c.k;
    p.stride_h = c.s, p.stride_w = c.s;
    p.pad_h = p.pad_w = c.pad;
    p.dilation_h = p.dilation_w = c.d;
    p.ceil_mode = c.ceil;
    CHECK(rel_error(max_pool(x.view(), p), naive_max_pool(x, p)) == 0.0);
    if (c.d != 1) continue;
    for (bool include : {true, false})
      for (int64_t divisor : {0, 3}) {
        p.count_include_pad = include;
        p.divisor_override = divisor;
        CHECK(rel_error(avg_pool(x, p), naive_avg_pool(x, p)) < 2e-7);
      }
  }
  // adaptive pooling with uneven bins, and as avg pooling where the bins are even
  for (auto hw : std::vector<std::pair<int64_t, int64_t>>{{4, 3}, {1, 1}, {11, 10}, {7, 13}}) {
    Tensor y = Tensor::empty(DType::Float32, {2, 3, hw.first, hw.second});
    adaptive_avg_pool2d_forward(x.view(), y.view());
    CHECK(rel_error(y, naive_adaptive(x, hw.first, hw.second)) < 2e-7);
  }
  const Tensor x8 = random_tensor(DType::Float64, {1, 2, 8, 6}, rng);
  Tensor ya = Tensor::empty(DType::Float64, {1, 2, 4, 3});
  adaptive_avg_pool2d_forward(x8.view(), ya.view());
  Pool2dParams p2;
  p2.kernel_h = p2.kernel_w = p2.stride_h = p2.stride_w = 2;
  CHECK(rel_error(ya, avg_pool(x8, p2)) < 1e-15);
  // avg pooling is a depthwise convolution with weights 1 / k^2
  Tensor w(DType::Float64, {2, 1, 2, 2});
  for (int64_t i = 0; i < w.numel(); ++i) testutil::set(w, i, 0.25);
  CHECK(rel_error(avg_pool(x8, p2), conv(x8, w, nullptr, conv_params(2, 2, 0, 0, 0, 0, 1, 1, 2))) < 1e-15);
  // a strided (non-contiguous) input gives the same result
  TensorView tv = x.view();
  tv.shape[3] = 5;
  tv.strides[3] = 2;  // every other column
  Pool2dParams p3;
  p3.kernel_h = p3.kernel_w = 2;
  p3.stride_h = p3.stride_w = 1;
  CHECK(testutil::bit_equal(max_pool(tv, p3), max_pool(Tensor::from_view(tv).view(), p3)));
}

TEST(relu_lrn_batchnorm_match_naive_loops) {
  Rng rng(5);
  const Tensor x = random_tensor(DType::Float64, {2, 7, 3, 4}, rng);
  Tensor y = Tensor::empty(DType::Float64, x.shape());
  relu_forward(x.view(), y.view());
  for (int64_t i = 0; i < x.numel(); ++i) CHECK_EQ(at(y, i), std::max(0.0, at(x, i)));

  for (int64_t size : {1, 2, 3, 5, 9}) {
    const LrnParams p{size, 1e-2, 0.75, 2.0};
    local_response_norm_forward(x.view(), p, y.view());
    CHECK(rel_error(y, naive_lrn(x, p)) < 1e-14);
  }

  const Tensor g = random_tensor(DType::Float64, {7}, rng, 0.5, 1.5);
  const Tensor b = random_tensor(DType::Float64, {7}, rng);
  const Tensor mean = random_tensor(DType::Float64, {7}, rng);
  const Tensor var = random_tensor(DType::Float64, {7}, rng, 0.5, 2.0);
  const TensorView gv = g.view(), bv = b.view();
  batch_norm_forward(x.view(), &gv, &bv, false, 1e-5, mean.view(), var.view(), y.view());
  const int64_t S = 12;
  double err = 0;
  for (int64_t i = 0; i < x.numel(); ++i) {
    const int64_t c = (i / S) % 7;
    const double ref = (at(x, i) - at(mean, c)) / std::sqrt(at(var, c) + 1e-5) * at(g, c) + at(b, c);
    err = std::max(err, std::fabs(ref - at(y, i)));
  }
  CHECK(err < 1e-13);
  // training: the batch statistics (biased variance)
  Tensor bm = Tensor::empty(DType::Float64, {7}), bvar = Tensor::empty(DType::Float64, {7});
  batch_norm_forward(x.view(), nullptr, nullptr, true, 1e-5, bm.view(), bvar.view(), y.view());
  for (int64_t c = 0; c < 7; ++c) {
    double s = 0, s2 = 0;
    for (int64_t n = 0; n < 2; ++n)
      for (int64_t k = 0; k < S; ++k) s += at(x, (n * 7 + c) * S + k);
    const double m = s / 24;
    for (int64_t n = 0; n < 2; ++n)
      for (int64_t k = 0; k < S; ++k) s2 += (at(x, (n * 7 + c) * S + k) - m) * (at(x, (n * 7 + c) * S + k) - m);
    CHECK(std::fabs(at(bm, c) - m) < 1e-14);
    CHECK(std::fabs(at(bvar, c) - s2 / 24) < 1e-14);
  }
}

TEST(padding_modes_match_numpy_rules) {
  Rng rng(6);
  for (PadMode mode : {PadMode::Zeros, PadMode::Reflect, PadMode::Replicate, PadMode::Circular}) {
    for (auto hw : std::vector<std::pair<int64_t, int64_t>>{{5, 4}, {1, 3}, {2, 1}}) {
      const Tensor x = random_tensor(DType::Float32, {2, 3, hw.first, hw.second}, rng);
      // pads larger than the input repeat the pattern, as numpy.pad does
      for (const Pad2dParams& p : {Pad2dParams{1, 2, 0, 3, mode}, Pad2dParams{7, 6, 5, 9, mode}}) {
        int64_t shape[kMaxDims];
        pad2d_output_shape(x.view(), p, shape);
        Tensor y = Tensor::empty(DType::Float32, std::vector<int64_t>(shape, shape + 4));
        pad2d_forward(x.view(), p, y.view());
        CHECK(testutil::bit_equal(y, naive_pad(x, p)));
      }
    }
  }
  CHECK(parse_pad_mode("reflect") == PadMode::Reflect);
  CHECK_THROWS(ValueError, parse_pad_mode("mirror"),
               "padding_mode must be one of ['circular', 'reflect', 'replicate', 'zeros'], got 'mirror'");
  const Tensor x = random_tensor(DType::Float32, {1, 1, 2, 2}, rng);
  int64_t shape[kMaxDims];
  CHECK_THROWS(ValueError, pad2d_output_shape(x.view(), Pad2dParams{-1, 0, 0, 0, PadMode::Zeros}, shape),
               "padding must be non-negative");
}

TEST(results_do_not_depend_on_threads_or_strides) {
  Rng rng(7);
  // 8 input channels: the direct kernel for the image and for its view alike
  // (auto takes the blocked Winograd from 16 channels, on contiguous images)
  const Tensor x = random_tensor(DType::Float32, {4, 8, 20, 20}, rng);
  const Tensor w = random_tensor(DType::Float32, {32, 8, 3, 3}, rng);
  const Conv2dParams p = conv_params(1, 1, 1, 1, 1, 1, 1, 1, 1);
  const int before = get_num_threads();
  set_num_threads(1);
  const Tensor y1 = conv(x, w, nullptr, p);
  set_num_threads(2);
  const Tensor y2 = conv(x, w, nullptr, p);
  set_num_threads(before);
  CHECK(testutil::bit_equal(y1, y2));
  // the same input as a view with negative strides (flipped W) of a flipped copy
  Tensor flipped = Tensor::empty(DType::Float32, x.shape());
  for (int64_t i = 0; i < x.numel(); ++i) {
    const int64_t col = i % 20;
    testutil::set(flipped, i - col + (19 - col), at(x, i));
  }
  TensorView v = flipped.view();
  v.data = flipped.data_as<float>() + 19;
  v.strides[3] = -1;
  Tensor y3 = Tensor::empty(DType::Float32, y1.shape());
  conv2d_forward(v, w.view(), nullptr, p, y3.view());
  CHECK(testutil::bit_equal(y1, y3));
  // float32 against float64
  const Tensor y64 = conv(x.to(DType::Float64), w.to(DType::Float64), nullptr, p);
  CHECK(rel_error(y1, y64) < 2e-6);
}

// ---------------------------------------------------------------- backward

TEST(backward_ops_match_finite_differences) {
  Rng rng(8);
  const DType f64 = DType::Float64;
  {  // conv2d: grad input, weight and bias
    const Conv2dParams p = conv_params(2, 1, 1, 0, 2, 1, 1, 2, 2);
    const Tensor x = random_tensor(f64, {2, 4, 7, 8}, rng), w = random_tensor(f64, {6, 2, 3, 2}, rng);
    const Tensor b = random_tensor(f64, {6}, rng);
    const Tensor y = conv(x, w, &b, p);
    const Tensor gy = random_tensor(f64, y.shape(), rng);
    Tensor gx = Tensor::empty(f64, x.shape()), gw = Tensor::empty(f64, w.shape()),
           gb = Tensor::empty(f64, {6});
    const TensorView gxv = gx.view(), gwv = gw.view(), gbv = gb.view();
    conv2d_backward(gy.view(), x.view(), w.view(), p, &gxv, &gwv, &gbv);
    check_gradient("conv2d input", [&](const Tensor& t) { return conv(t, w, &b, p); }, x, gy, gx, rng);
    check_gradient("conv2d weight", [&](const Tensor& t) { return conv(x, t, &b, p); }, w, gy, gw, rng);
    check_gradient("conv2d bias", [&](const Tensor& t) { return conv(x, w, &t, p); }, b, gy, gb, rng);
    // against the naive gradient by direct loops too: every input position
    Tensor naive(f64, x.shape());
    for (int64_t i = 0; i < x.numel(); ++i) {
      Tensor e(f64, x.shape());
      testutil::set(e, i, 1.0);
      testutil::set(naive, i, testutil::dot(naive_conv2d(e, w, nullptr, p), gy));
    }
    CHECK(rel_error(gx, naive) < 1e-13);
  }
  {  // conv2d into few channels: the forward, grad_input (into 3 channels)
     // and grad_weight with the positions in the lanes
    const Conv2dParams p = conv_params(1, 1, 1, 1, 0, 0, 1, 2, 1);
    const Tensor x = random_tensor(f64, {4, 3, 16, 19}, rng);
    const Tensor w = random_tensor(f64, {5, 3, 3, 2}, rng);
    const Tensor y = conv(x, w, nullptr, p);
    const Tensor gy = random_tensor(f64, y.shape(), rng);
    Tensor gx = Tensor::empty(f64, x.shape()), gw = Tensor::empty(f64, w.shape());
    const TensorView gxv = gx.view(), gwv = gw.view();
    conv2d_backward(gy.view(), x.view(), w.view(), p, &gxv, &gwv, nullptr);
    check_gradient(
        "conv2d input, few channels", [&](const Tensor& t) { return conv(t, w, nullptr, p); }, x,
        gy, gx, rng);
    check_gradient(
        "conv2d weight, few channels", [&](const Tensor& t) { return conv(x, t, nullptr, p); }, w,
        gy, gw, rng);
  }
  {  // max and avg pooling
    Pool2dParams p;
    p.kernel_h = 3, p.kernel_w = 2, p.stride_h = 2, p.stride_w = 1, p.pad_h = 1, p.ceil_mode = true;
    const Tensor x = random_tensor(f64, {2, 3, 7, 6}, rng);
    const Tensor ym = max_pool(x.view(), p), gy = random_tensor(f64, ym.shape(), rng);
    Tensor gx = Tensor::empty(f64, x.shape());
    max_pool2d_backward(gy.view(), x.view(), p, gx.view());
    check_gradient("max_pool2d", [&](const Tensor& t) { return max_pool(t.view(), p); }, x, gy, gx, rng);
    // the same from the indices of the forward
    Tensor y2 = Tensor::empty(f64, ym.shape()), idx = Tensor::empty(DType::Int64, ym.shape());
    const TensorView iv = idx.view();
    max_pool2d_forward(x.view(), p, y2.view(), &iv);
    Tensor gx2 = Tensor::empty(f64, x.shape());
    max_pool2d_backward_indices(gy.view(), idx.view(), gx2.view());
    CHECK(testutil::bit_equal(gx, gx2));
    p.count_include_pad = false;
    const Tensor ya = avg_pool(x, p), gya = random_tensor(f64, ya.shape(), rng);
    avg_pool2d_backward(gya.view(), p, gx.view());
    check_gradient("avg_pool2d", [&](const Tensor& t) { return avg_pool(t, p); }, x, gya, gx, rng);
    // adaptive
    const Tensor gyd = random_tensor(f64, {2, 3, 4, 5}, rng);
    adaptive_avg_pool2d_backward(gyd.view(), gx.view());
    check_gradient("adaptive_avg_pool2d",
                   [&](const Tensor& t) {
                     Tensor o = Tensor::empty(f64, {2, 3, 4, 5});
                     adaptive_avg_pool2d_forward(t.view(), o.view());
                     return o;
                   },
                   x, gyd, gx, rng);
  }
  {  // linear
    const Tensor x = random_tensor(f64, {5, 9}, rng), w = random_tensor(f64, {4, 9}, rng);
    const Tensor b = random_tensor(f64, {4}, rng), gy = random_tensor(f64, {5, 4}, rng);
    Tensor gx = Tensor::empty(f64, x.shape()), gw = Tensor::empty(f64, w.shape()),
           gb = Tensor::empty(f64, {4});
    const TensorView gxv = gx.view(), gwv = gw.view(), gbv = gb.view();
    linear_backward(gy.view(), x.view(), w.view(), &gxv, &gwv, &gbv);
    check_gradient("linear input", [&](const Tensor& t) { return linear(t, w, &b); }, x, gy, gx, rng);
    check_gradient("linear weight", [&](const Tensor& t) { return linear(x, t, &b); }, w, gy, gw, rng);
    check_gradient("linear bias", [&](const Tensor& t) { return linear(x, w, &t); }, b, gy, gb, rng);
  }
  {  // relu, lrn, batch norm (training and eval), padding
    const Tensor x = random_tensor(f64, {3, 6, 4, 3}, rng), gy = random_tensor(f64, x.shape(), rng);
    Tensor gx = Tensor::empty(f64, x.shape());
    auto unary = [&](std::function<void(const TensorView&, const TensorView&)> fwd) {
      return [fwd](const Tensor& t) {
        Tensor o = Tensor::empty(t.dtype(), t.shape());
        fwd(t.view(), o.view());
        return o;
      };
    };
    relu_backward(gy.view(), x.view(), gx.view());
    check_gradient("relu", unary([](const TensorView& a, const TensorView& b) { relu_forward(a, b); }),
                   x, gy, gx, rng);
    const LrnParams lp{3, 0.3, 0.75, 1.5};
    local_response_norm_backward(gy.view(), x.view(), lp, gx.view());
    check_gradient("local_response_norm",
                   unary([&](const TensorView& a, const TensorView& b) { local_response_norm_forward(a, lp, b); }),
                   x, gy, gx, rng);
    const Tensor g = random_tensor(f64, {6}, rng, 0.5, 1.5), bb = random_tensor(f64, {6}, rng);
    const TensorView gv = g.view(), bv = bb.view();
    for (bool training : {true, false}) {
      Tensor m = random_tensor(f64, {6}, rng), v = random_tensor(f64, {6}, rng, 0.5, 2.0);
      if (training) batch_norm_forward(x.view(), &gv, &bv, true, 1e-5, m.view(), v.view(), gx.view());
      Tensor gxb = Tensor::empty(f64, x.shape());
      const TensorView gxbv = gxb.view();
      batch_norm_backward(gy.view(), x.view(), &gv, training, 1e-5, m.view(), v.view(), &gxbv, nullptr, nullptr);
      check_gradient(training ? "batch_norm (training)" : "batch_norm (eval)",
                     unary([&](const TensorView& a, const TensorView& o) {
                       Tensor mm = m, vv = v;  // training overwrites the batch statistics
                       batch_norm_forward(a, &gv, &bv, training, 1e-5, mm.view(), vv.view(), o);
                     }),
                     x, gy, gxb, rng);
    }
    for (PadMode mode : {PadMode::Zeros, PadMode::Reflect, PadMode::Replicate, PadMode::Circular}) {
      const Pad2dParams pp{2, 5, 4, 1, mode};
      auto pad = [&](const Tensor& t) {
        int64_t shape[kMaxDims];
        pad2d_output_shape(t.view(), pp, shape);
        Tensor o = Tensor::empty(t.dtype(), std::vector<int64_t>(shape, shape + 4));
        pad2d_forward(t.view(), pp, o.view());
        return o;
      };
      const Tensor gyp = random_tensor(f64, pad(x).shape(), rng);
      pad2d_backward(gyp.view(), pp, gx.view());
      check_gradient(pad_mode_name(mode), pad, x, gyp, gx, rng);
    }
  }
}

TEST(errors_carry_the_python_messages) {
  Rng rng(9);
  const Tensor x = random_tensor(DType::Float32, {1, 3, 5, 5}, rng);
  const Tensor w = random_tensor(DType::Float32, {2, 4, 3, 3}, rng);
  CHECK_THROWS(ValueError, conv(x, w, nullptr, Conv2dParams()),
               "weight has 4 input channels per group (weight.shape[1]); with groups=1 the input "
               "must have 4 channels, got 3");
  const Tensor w64 = random_tensor(DType::Float64, {2, 3, 3, 3}, rng);
  Tensor y = Tensor::empty(DType::Float32, {1, 2, 3, 3});
  CHECK_THROWS(TypeError, conv2d_forward(x.view(), w64.view(), nullptr, Conv2dParams(), y.view()),
               "weight has dtype float64 but input has dtype float32");
  Pool2dParams p;
  p.kernel_h = p.kernel_w = 7;
  p.stride_h = p.stride_w = 1;
  CHECK_THROWS(ValueError, max_pool(x.view(), p), "is too small for kernel_size (7, 7)");
  CHECK_THROWS(ValueError, set_num_threads(0), "set_num_threads: n must be at least 1, got 0");
}

TEST(tensor_basics) {
  Tensor t(DType::Float32, {2, 3});
  CHECK(t.defined());
  CHECK_EQ(t.numel(), 6);
  CHECK_EQ(t.nbytes(), 24u);
  CHECK_EQ(t.shape_str(), std::string("(2, 3)"));
  CHECK_EQ(reinterpret_cast<uintptr_t>(t.data()) % 64, 0u);
  for (int64_t i = 0; i < 6; ++i) CHECK_EQ(at(t, i), 0.0);
  t.data_as<float>()[4] = 2.5f;
  Tensor copy = t;  // a deep copy
  copy.data_as<float>()[4] = 1.0f;
  CHECK_EQ(at(t, 4), 2.5);
  Tensor r = std::move(copy).reshape({3, -1});
  CHECK(!copy.defined());
  CHECK(r.shape() == std::vector<int64_t>({3, 2}));
  CHECK_EQ(at(r, 4), 1.0);
  CHECK_EQ(t.size(-1), 3);
  CHECK_THROWS(ValueError, t.size(2), "out of range");
  CHECK_THROWS(TypeError, t.data_as<double>(), "the tensor has dtype float32, not float64");
  CHECK_THROWS(ValueError, t.reshape({4, 2}), "cannot reshape a tensor of shape (2, 3)");
  CHECK_THROWS(ValueError, Tensor(DType::Float32, {-1}), "negative size");
  CHECK_THROWS(ValueError, Tensor(DType::Float64, {int64_t(1) << 40, int64_t(1) << 40}),
               "more elements than fit in 64 bits");
  CHECK_THROWS(ValueError, Tensor(DType::Float64, {1, 1, 1, 1, 1, 1, 1, 1, 1}), "at most 8 dimensions");
  const Tensor d = t.to(DType::Float64);
  CHECK(d.dtype() == DType::Float64);
  CHECK_EQ(at(d, 4), 2.5);
  Tensor nan(DType::Float32, {1});
  nan.data_as<float>()[0] = std::nanf("");
  CHECK_THROWS(ValueError, nan.to(DType::Int64), "has no int64 value");
  const Tensor scalar(DType::Int64, {});
  CHECK_EQ(scalar.numel(), 1);
  CHECK_EQ(Tensor(DType::Float32, {0, 5}).numel(), 0);
  CHECK(!Tensor().defined());
  CHECK_THROWS(ValueError, Tensor().view(), "undefined");
}

TEST(activations_match_naive_loops_and_finite_differences) {
  // Sigmoid, SiLU, ReLU6, Hardswish, Hardsigmoid (the later case studies)
  Rng rng(11);
  Tensor x = random_tensor(DType::Float64, {2, 5, 3, 4}, rng, -8.0, 8.0);
  for (int64_t i = 0; i < x.numel(); ++i)  // away from the kinks (-3, 0, 3, 6)
    for (double k : {-3.0, 0.0, 3.0, 6.0})
      if (std::fabs(at(x, i) - k) < 1e-3) testutil::set(x, i, k + 2e-3);
  const Tensor gy = random_tensor(DType::Float64, x.shape(), rng);
  auto naive = [](Activation kind, double v) {
    const double s = 1.0 / (1.0 + std::exp(-v));
    const double r6 = std::min(std::max(v + 3.0, 0.0), 6.0);
    switch (kind) {
      case Activation::Sigmoid: return s;
      case Activation::SiLU: return v * s;
      case Activation::ReLU6: return std::min(std::max(v, 0.0), 6.0);
      case Activation::Hardswish: return v * r6 / 6.0;
      default: return r6 / 6.0;
    }
  };
  for (Activation kind : {Activation::Sigmoid, Activation::SiLU, Activation::ReLU6,
                          Activation::Hardswish, Activation::Hardsigmoid}) {
    Tensor y = Tensor::empty(DType::Float64, x.shape());
    activation_forward(kind, x.view(), y.view());
    double err = 0;
    for (int64_t i = 0; i < x.numel(); ++i)
      err = std::max(err, std::fabs(at(y, i) - naive(kind, at(x, i))));
    CHECK(err < 1e-15);
    Tensor gx = Tensor::empty(DType::Float64, x.shape());
    activation_backward(kind, gy.view(), x.view(), gx.view());
    check_gradient("activation", [kind](const Tensor& t) {
      Tensor o = Tensor::empty(t.dtype(), t.shape());
      activation_forward(kind, t.view(), o.view());
      return o;
    }, x, gy, gx, rng);
    // in place, as the runner calls it
    Tensor z = x;
    activation_forward(kind, z.view(), z.view());
    CHECK(testutil::bit_equal(z, y));
  }
  // float32's sigmoid and SiLU use a polynomial exp: within a few ulp of float64's
  Tensor xf = Tensor::empty(DType::Float32, {20001});
  for (int64_t i = 0; i < xf.numel(); ++i) xf.data_as<float>()[i] = -100.0f + 0.01f * i;
  for (Activation kind : {Activation::Sigmoid, Activation::SiLU}) {
    Tensor yf = Tensor::empty(DType::Float32, xf.shape());
    activation_forward(kind, xf.view(), yf.view());
    double worst = 0;
    for (int64_t i = 0; i < xf.numel(); ++i) {
      const double v = xf.data_as<float>()[i];
      const double ref = (kind == Activation::SiLU ? v : 1.0) / (1.0 + std::exp(-v));
      worst = std::max(worst, std::fabs(yf.data_as<float>()[i] - ref) /
                                  std::max(std::fabs(ref), 1e-20));  // (0 below -87.3)
    }
    CHECK(worst < 4e-7);
  }
  // the sigmoid does not overflow far out
  Tensor big = Tensor::empty(DType::Float32, {2});
  big.data_as<float>()[0] = -1000.0f;
  big.data_as<float>()[1] = 1000.0f;
  activation_forward(Activation::Sigmoid, big.view(), big.view());
  CHECK_EQ(big.data_as<float>()[0], 0.0f);
  CHECK_EQ(big.data_as<float>()[1], 1.0f);
}

TEST_MAIN()
