// Local response normalisation (AlexNet's NORM layers) and batch
// normalisation, forward and backward.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <optional>
#include <vector>

#include "convcore/ops.h"
#include "gemm.h"
#include "convcore/threading.h"
#include "strided.h"

namespace convcore {

namespace {

// Input viewed as (N, C, S) with S the product of the trailing dims.
struct NCS {
  int64_t n, c, s;
};

NCS ncs_of(const TensorView& t, const char* name) {
  if (t.ndim < 2)
    throw ValueError(std::string(name) + " must have at least 2 dimensions (N, C, ...), got " +
                     std::to_string(t.ndim) + "-D with shape " + shape_str(t));
  NCS d{t.shape[0], t.shape[1], 1};
  for (int i = 2; i < t.ndim; ++i) d.s *= t.shape[i];
  return d;
}

void check_lrn(const LrnParams& p) {
  if (p.size < 1 || p.size > kMaxParam)
    throw ValueError("size must be a positive int (channels in the window), got " +
                     std::to_string(p.size));
  if (!std::isfinite(p.alpha) || !std::isfinite(p.beta) || !std::isfinite(p.k))
    throw ValueError("alpha, beta and k must be finite");
}

// Channel tile for LRN: the window sums of one tile of positions for all
// channels stay in cache.
constexpr int64_t kLrnTile = 256;

// scale[c][j] = k + alpha / size * sum of squares over window(c), for
// positions [s0, s0 + ns) of image x (C x S).
template <typename T>
void lrn_scale(const T* x, int64_t C, int64_t S, int64_t s0, int64_t ns, const LrnParams& p,
               T* scale) {
  const int64_t before = p.size / 2, after = (p.size - 1) / 2;
  const T coef = static_cast<T>(p.alpha / static_cast<double>(p.size));
  for (int64_t c = 0; c < C; ++c) {
    T* sc = scale + c * ns;
    std::fill(sc, sc + ns, T(0));
    const int64_t lo = std::max<int64_t>(0, c - before), hi = std::min<int64_t>(C - 1, c + after);
    for (int64_t q = lo; q <= hi; ++q) {
      const T* xq = x + q * S + s0;
      for (int64_t j = 0; j < ns; ++j) sc[j] += xq[j] * xq[j];
    }
    for (int64_t j = 0; j < ns; ++j) sc[j] = static_cast<T>(p.k) + coef * sc[j];
  }
}

// v[j] = v[j]^-beta over n values (each at least k, which may be 0). For
// beta = 0.75 (AlexNet's, ZFNet's) as 1 / (sqrt(v) sqrt(sqrt(v))), a loop
// that vectorises (the file is compiled without errno), within 2 ulp of
// pow, where std::pow is a call per element.
template <typename T>
void inverse_powers(T* v, int64_t n, double beta) {
  if (beta == 0.75) {
    for (int64_t j = 0; j < n; ++j) {
      const T r = std::sqrt(v[j]);
      v[j] = T(1) / (r * std::sqrt(r));
    }
    return;
  }
  const T e = static_cast<T>(-beta);
  for (int64_t j = 0; j < n; ++j) v[j] = std::pow(v[j], e);
}

template <typename T>
void lrn_forward(const T* x, const NCS& d, const LrnParams& p, T* y) {
  const int64_t tiles = (d.s + kLrnTile - 1) / kLrnTile, tasks = d.n * tiles;
  const int threads = detail::threads_for(tasks, d.n * d.c * d.s * p.size);
  detail::Workspace<T> ws(threads, d.c * kLrnTile);
#pragma omp parallel num_threads(threads)
  {
    T* scale = ws.get(omp_get_thread_num());
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t n = t / tiles, s0 = (t % tiles) * kLrnTile, ns = std::min(kLrnTile, d.s - s0);
      const T* xn = x + n * d.c * d.s;
      lrn_scale(xn, d.c, d.s, s0, ns, p, scale);
      inverse_powers(scale, d.c * ns, p.beta);
      for (int64_t c = 0; c < d.c; ++c) {
        const T* xc = xn + c * d.s + s0;
        T* yc = y + (n * d.c + c) * d.s + s0;
        for (int64_t j = 0; j < ns; ++j) yc[j] = xc[j] * scale[c * ns + j];
      }
    }
  }
}

// d input_j = g_j s_j^-beta - 2 alpha beta / size * x_j * sum_{c: j in window(c)} g_c x_c s_c^(-beta-1)
template <typename T>
void lrn_backward(const T* gy, const T* x, const NCS& d, const LrnParams& p, T* gx) {
  const int64_t tiles = (d.s + kLrnTile - 1) / kLrnTile, tasks = d.n * tiles;
  const int threads = detail::threads_for(tasks, d.n * d.c * d.s * p.size);
  detail::Workspace<T> ws(threads, 2 * d.c * kLrnTile);
  const T coef = static_cast<T>(2.0 * p.alpha * p.beta / static_cast<double>(p.size));
  // j in window(c)  <=>  c in [j - (size - 1) / 2, j + size / 2]
  const int64_t before = (p.size - 1) / 2, after = p.size / 2;
#pragma omp parallel num_threads(threads)
  {
    T* scale = ws.get(omp_get_thread_num());
    T* t_buf = scale + d.c * kLrnTile;
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t n = t / tiles, s0 = (t % tiles) * kLrnTile, ns = std::min(kLrnTile, d.s - s0);
      const T* xn = x + n * d.c * d.s;
      const T* gn = gy + n * d.c * d.s;
      lrn_scale(xn, d.c, d.s, s0, ns, p, scale);
      std::copy(scale, scale + d.c * ns, t_buf);  // s
      inverse_powers(scale, d.c * ns, p.beta);     // s^-beta
      for (int64_t c = 0; c < d.c; ++c)
        for (int64_t j = 0; j < ns; ++j)  // g x s^(-beta - 1)
          t_buf[c * ns + j] = gn[c * d.s + s0 + j] * xn[c * d.s + s0 + j] * scale[c * ns + j] /
                              t_buf[c * ns + j];
      for (int64_t c = 0; c < d.c; ++c) {
        T* gc = gx + (n * d.c + c) * d.s + s0;
        const T* xc = xn + c * d.s + s0;
        const T* gyc = gn + c * d.s + s0;
        for (int64_t j = 0; j < ns; ++j) gc[j] = gyc[j] * scale[c * ns + j];
        const int64_t lo = std::max<int64_t>(0, c - before), hi = std::min<int64_t>(d.c - 1, c + after);
        for (int64_t q = lo; q <= hi; ++q) {
          const T* tq = t_buf + q * ns;
          for (int64_t j = 0; j < ns; ++j) gc[j] -= coef * xc[j] * tq[j];
        }
      }
    }
  }
}

void check_stat(const TensorView& t, const char* name, const TensorView& input, int64_t C) {
  check_same_dtype(t, name, input, "input");
  check_shape(t, name, 1, &C);
}

// Batch norm's per-channel passes over the channel's n rows of s values
// (`stride` apart), compiled per instruction set (gemm.h's dispatch; the
// file has no fused multiply-adds, so every ISA rounds alike). Sums run in
// double in eight partial sums, value j of a row going to sum j % 8, added
// in a fixed order at the end: an eight-lane vector on every ISA, and the
// same result on each.
struct ChannelRows {
  int64_t rows, stride, s;
};

// *out = the sum of x, or of (x - mu)^2 when squares.
template <typename T>
CONVCORE_ALWAYS_INLINE void bn_sum_body(const T* x, ChannelRows r, double mu, bool squares,
                                        double* out) {
  double acc[8] = {};
  for (int64_t n = 0; n < r.rows; ++n) {
    const T* row = x + n * r.stride;
    int64_t j = 0;
    if (squares) {
      for (; j + 8 <= r.s; j += 8)
        for (int k = 0; k < 8; ++k) {
          const double d = double(row[j + k]) - mu;
          acc[k] += d * d;
        }
      for (; j < r.s; ++j) {
        const double d = double(row[j]) - mu;
        acc[j % 8] += d * d;
      }
    } else {
      for (; j + 8 <= r.s; j += 8)
        for (int k = 0; k < 8; ++k) acc[k] += double(row[j + k]);
      for (; j < r.s; ++j) acc[j % 8] += double(row[j]);
    }
  }
  *out = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

// y = x * scale + shift, then max(y, 0) when relu.
template <typename T>
CONVCORE_ALWAYS_INLINE void bn_apply_body(const T* x, T* y, ChannelRows r, T scale, T shift,
                                          bool relu) {
  for (int64_t n = 0; n < r.rows; ++n) {
    const T* xr = x + n * r.stride;
    T* yr = y + n * r.stride;
    if (relu) {
      for (int64_t j = 0; j < r.s; ++j) {
        const T v = xr[j] * scale + shift;
        yr[j] = v < T(0) ? T(0) : v;  // relu_forward's rule
      }
    } else {
      for (int64_t j = 0; j < r.s; ++j) yr[j] = xr[j] * scale + shift;
    }
  }
}

// The gradient that reaches the batch norm: g, or (fused ReLU) zero where
// the ReLU's output y is <= 0 (relu_backward's rule on its input: the same
// positions, a NaN passing). MASKED a template argument: a select the loops
// vectorise.
template <bool MASKED, typename T>
CONVCORE_ALWAYS_INLINE T bn_grad(const T* g, const T* y, int64_t i) {
  T gi = g[i];
  if constexpr (MASKED) {
    // by the bits (g AND an all-ones or zero mask): a select became a branch
    using Bits = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
    Bits bits;
    std::memcpy(&bits, &gi, sizeof bits);
    bits &= Bits(0) - static_cast<Bits>(!(y[i] <= T(0)));
    std::memcpy(&gi, &bits, sizeof bits);
  }
  return gi;
}

template <bool MASKED, typename T>
CONVCORE_ALWAYS_INLINE void bn_grad_sums_rows(const T* g, const T* x, const T* y, ChannelRows r,
                                              double mu, double* sums) {
  double a[8] = {}, b[8] = {};
  for (int64_t n = 0; n < r.rows; ++n) {
    const T* gr = g + n * r.stride;
    const T* xr = x + n * r.stride;
    const T* yr = MASKED ? y + n * r.stride : nullptr;
    int64_t j = 0;
    for (; j + 8 <= r.s; j += 8)
      for (int k = 0; k < 8; ++k) {
        const double gv = double(bn_grad<MASKED>(gr, yr, j + k));
        a[k] += gv;
        b[k] += gv * (double(xr[j + k]) - mu);
      }
    for (; j < r.s; ++j) {
      const double gv = double(bn_grad<MASKED>(gr, yr, j));
      a[j % 8] += gv;
      b[j % 8] += gv * (double(xr[j]) - mu);
    }
  }
  sums[0] = ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
  sums[1] = ((b[0] + b[1]) + (b[2] + b[3])) + ((b[4] + b[5]) + (b[6] + b[7]));
}

// sums[0] = sum of g, sums[1] = sum of g * (x - mu), g masked by y if given.
template <typename T>
CONVCORE_ALWAYS_INLINE void bn_grad_sums_body(const T* g, const T* x, const T* y, ChannelRows r,
                                              double mu, double* sums) {
  if (y)
    bn_grad_sums_rows<true>(g, x, y, r, mu, sums);
  else
    bn_grad_sums_rows<false>(g, x, y, r, mu, sums);
}

// gx = ga * g + gb * (x - xc) + gc, g masked by y if given.
template <typename T>
CONVCORE_ALWAYS_INLINE void bn_grad_input_body(const T* g, const T* x, const T* y, T* gx,
                                               ChannelRows r, T ga, T gb, T xc, T gc) {
  for (int64_t n = 0; n < r.rows; ++n) {
    const T* gr = g + n * r.stride;
    const T* xr = x + n * r.stride;
    const T* yr = y ? y + n * r.stride : nullptr;
    T* o = gx + n * r.stride;
    if (yr) {
      for (int64_t j = 0; j < r.s; ++j)
        o[j] = ga * bn_grad<true>(gr, yr, j) + gb * (xr[j] - xc) + gc;
    } else {
      for (int64_t j = 0; j < r.s; ++j) o[j] = ga * gr[j] + gb * (xr[j] - xc) + gc;
    }
  }
}

// On AVX-512 the sums take the AVX2 code: GCC's AVX-512 code for the masked
// (fused ReLU) sums was slower than AVX2's (ResNet-18's first batch norm at
// batch 16: 7.5 against 5.5 ms); the results are the same on every ISA.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
template <typename T>
__attribute__((target("avx2,fma"))) void bn_grad_sums_avx2(const T* g, const T* x, const T* y,
                                                           ChannelRows r, double mu,
                                                           double* sums) {
  bn_grad_sums_body<T>(g, x, y, r, mu, sums);
}
template <typename T>
CONVCORE_ALWAYS_INLINE void bn_grad_sums_avx2_body(const T* g, const T* x, const T* y,
                                                   ChannelRows r, double mu, double* sums) {
  bn_grad_sums_avx2<T>(g, x, y, r, mu, sums);
}
#endif

#define CONVCORE_BN_KERNELS(T)                                                                  \
  CONVCORE_ISA_DISPATCH(bn_apply, bn_apply_body<T>,                                            \
                        (const T* x, T* y, ChannelRows r, T scale, T shift, bool relu),        \
                        (x, y, r, scale, shift, relu))                                         \
  CONVCORE_ISA_DISPATCH3(bn_grad_sums, bn_grad_sums_avx2_body<T>, bn_grad_sums_body<T>,      \
                         bn_grad_sums_body<T>,                                                 \
                         (const T* g, const T* x, const T* y, ChannelRows r, double mu,        \
                          double* sums),                                                       \
                         (g, x, y, r, mu, sums))                                               \
  CONVCORE_ISA_DISPATCH(bn_grad_input, bn_grad_input_body<T>,                                  \
                        (const T* g, const T* x, const T* y, T* gx, ChannelRows r, T ga, T gb, \
                         T xc, T gc),                                                          \
                        (g, x, y, gx, r, ga, gb, xc, gc))                                      \
  CONVCORE_ISA_DISPATCH(bn_sum_into, bn_sum_body<T>,                                           \
                        (const T* x, ChannelRows r, double mu, bool squares, double* out),     \
                        (x, r, mu, squares, out))
CONVCORE_BN_KERNELS(float)
CONVCORE_BN_KERNELS(double)
#undef CONVCORE_BN_KERNELS

template <typename T>
double bn_sum(const T* x, ChannelRows r, double mu, bool squares) {
  double out;
  bn_sum_into(x, r, mu, squares, &out);
  return out;
}

}  // namespace

void local_response_norm_forward(const TensorView& input, const LrnParams& p,
                                 const TensorView& output) {
  const detail::CallScope scope;  // shares the threads among concurrent calls
  check_float(input, "input");
  if (input.ndim < 3)
    throw ValueError("input must have at least 3 dimensions (N, C, ...) for "
                     "local_response_norm, got " + std::to_string(input.ndim) + "-D with shape " +
                     shape_str(input));
  check_lrn(p);
  const NCS d = ncs_of(input, "input");
  detail::check_output(output, "output", input, input.ndim, input.shape);
  detail::dispatch_float(input.dtype, [&](auto zero) {
    using T = decltype(zero);
    const detail::Contiguous<T> x(input);
    if (output.numel() > 0) lrn_forward<T>(x.data(), d, p, output.ptr<T>());
  });
}

void local_response_norm_backward(const TensorView& grad_output, const TensorView& input,
                                  const LrnParams& p, const TensorView& grad_input) {
  const detail::CallScope scope;  // shares the threads among concurrent calls
  check_float(input, "input");
  check_lrn(p);
  const NCS d = ncs_of(input, "input");
  check_same_dtype(grad_output, "grad_output", input, "input");
  check_shape(grad_output, "grad_output", input.ndim, input.shape);
  detail::check_output(grad_input, "grad_input", input, input.ndim, input.shape);
  detail::dispatch_float(input.dtype, [&](auto zero) {
    using T = decltype(zero);
    const detail::Contiguous<T> x(input), gy(grad_output);
    if (grad_input.numel() > 0) lrn_backward<T>(gy.data(), x.data(), d, p, grad_input.ptr<T>());
  });
}

void batch_norm_forward(const TensorView& input, const TensorView* weight, const TensorView* bias,
                        bool training, double eps, const TensorView& mean, const TensorView& var,
                        const TensorView& output, bool relu) {
  const detail::CallScope scope;  // shares the threads among concurrent calls
  check_float(input, "input");
  const NCS d = ncs_of(input, "input");
  if (weight) check_stat(*weight, "weight", input, d.c);
  if (bias) check_stat(*bias, "bias", input, d.c);
  if (!(eps >= 0) || !std::isfinite(eps)) throw ValueError("eps must be a non-negative number");
  if (training) {
    detail::check_output(mean, "mean", input, 1, &d.c);
    detail::check_output(var, "var", input, 1, &d.c);
    if (d.n * d.s < 2)
      throw ValueError("input: batch_norm in training needs more than one value per channel "
                       "(the variance of one value is undefined), got input of shape " +
                       shape_str(input));
  } else {
    check_stat(mean, "running_mean", input, d.c);
    check_stat(var, "running_var", input, d.c);
  }
  detail::check_output(output, "output", input, input.ndim, input.shape);
  detail::dispatch_float(input.dtype, [&](auto zero) {
    using T = decltype(zero);
    const detail::Contiguous<T> x(input);
    const T* xs = x.data();
    T* y = output.ptr<T>();
    const double m = static_cast<double>(d.n * d.s);
    const ChannelRows rows{d.n, d.c * d.s, d.s};
#pragma omp parallel for num_threads(detail::threads_for(d.c, d.n * d.c * d.s)) schedule(static)
    for (int64_t c = 0; c < d.c; ++c) {
      double mu, v;
      if (training) {  // two passes: the variance from the deviations
        mu = bn_sum(xs + c * d.s, rows, 0.0, false) / m;
        v = bn_sum(xs + c * d.s, rows, mu, true) / m;
        mean.ptr<T>()[c] = static_cast<T>(mu);
        var.ptr<T>()[c] = static_cast<T>(v);
      } else {
        mu = mean.ptr<const T>()[c * mean.strides[0]];
        v = var.ptr<const T>()[c * var.strides[0]];
      }
      const double invstd = 1.0 / std::sqrt(v + eps);
      const double w = weight ? double(weight->ptr<const T>()[c * weight->strides[0]]) : 1.0;
      const double b = bias ? double(bias->ptr<const T>()[c * bias->strides[0]]) : 0.0;
      const T scale = static_cast<T>(w * invstd), shift = static_cast<T>(b - mu * w * invstd);
      bn_apply(xs + c * d.s, y + c * d.s, rows, scale, shift, relu);
    }
  });
}

void batch_norm_backward(const TensorView& grad_output, const TensorView& input,
                         const TensorView* weight, bool training, double eps,
                         const TensorView& mean, const TensorView& var,
                         const TensorView* grad_input, const TensorView* grad_weight,
                         const TensorView* grad_bias, const TensorView* relu_output) {
  const detail::CallScope scope;  // shares the threads among concurrent calls
  check_float(input, "input");
  const NCS d = ncs_of(input, "input");
  check_same_dtype(grad_output, "grad_output", input, "input");
  check_shape(grad_output, "grad_output", input.ndim, input.shape);
  if (relu_output) {
    check_same_dtype(*relu_output, "output", input, "input");
    check_shape(*relu_output, "output", input.ndim, input.shape);
  }
  if (weight) check_stat(*weight, "weight", input, d.c);
  check_stat(mean, "mean", input, d.c);
  check_stat(var, "var", input, d.c);
  if (!(eps >= 0) || !std::isfinite(eps)) throw ValueError("eps must be a non-negative number");
  if (grad_input) detail::check_output(*grad_input, "grad_input", input, input.ndim, input.shape);
  if (grad_weight) detail::check_output(*grad_weight, "grad_weight", input, 1, &d.c);
  if (grad_bias) detail::check_output(*grad_bias, "grad_bias", input, 1, &d.c);
  detail::dispatch_float(input.dtype, [&](auto zero) {
    using T = decltype(zero);
    const detail::Contiguous<T> x(input), gy(grad_output);
    std::optional<detail::Contiguous<T>> yc;
    if (relu_output) yc.emplace(*relu_output);
    const T* xs = x.data();
    const T* g = gy.data();
    const T* ys = yc ? yc->data() : nullptr;
    const double m = static_cast<double>(d.n * d.s);
    const ChannelRows rows{d.n, d.c * d.s, d.s};
#pragma omp parallel for num_threads(detail::threads_for(d.c, d.n * d.c * d.s)) schedule(static)
    for (int64_t c = 0; c < d.c; ++c) {
      const double mu = mean.ptr<const T>()[c * mean.strides[0]];
      const double invstd = 1.0 / std::sqrt(double(var.ptr<const T>()[c * var.strides[0]]) + eps);
      const double w = weight ? double(weight->ptr<const T>()[c * weight->strides[0]]) : 1.0;
      const int64_t off = c * d.s;
      double sums[2];
      bn_grad_sums(g + off, xs + off, ys ? ys + off : nullptr, rows, mu, sums);
      const double sum_g = sums[0], sum_gxhat = m > 0 ? sums[1] * invstd : 0.0;  // m = 0: no terms
      if (grad_weight) grad_weight->ptr<T>()[c] = static_cast<T>(sum_gxhat);
      if (grad_bias) grad_bias->ptr<T>()[c] = static_cast<T>(sum_g);
      if (!grad_input) continue;
      // training: gx = w invstd (g - sum_g / m - xhat sum_gxhat / m), xhat =
      // (x - mu) invstd, taken as ga g + gb (x - xc) + gc around xc, mu
      // rounded to T (so that x - xc is exact near the mean), gc absorbing
      // the rounding; evaluation: gx = w invstd g.
      const T xc = static_cast<T>(mu);
      const double ga = w * invstd;
      const double gb = training ? -w * invstd * invstd * sum_gxhat / m : 0.0;
      const double gc = training ? -w * invstd * sum_g / m - gb * (mu - double(xc)) : 0.0;
      bn_grad_input(g + off, xs + off, ys ? ys + off : nullptr, grad_input->ptr<T>() + off, rows,
                    static_cast<T>(ga), static_cast<T>(gb), xc, static_cast<T>(gc));
    }
  });
}

}  // namespace convcore
