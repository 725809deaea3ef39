// Local response normalisation (AlexNet's NORM layers) and batch
// normalisation, forward and backward.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "convcore/ops.h"
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

template <typename T>
void lrn_forward(const T* x, const NCS& d, const LrnParams& p, T* y) {
  const int64_t tiles = (d.s + kLrnTile - 1) / kLrnTile, tasks = d.n * tiles;
  const int threads = detail::threads_for(tasks, d.n * d.c * d.s * p.size);
  detail::Workspace<T> ws(threads, d.c * kLrnTile);
  const T beta = static_cast<T>(p.beta);
#pragma omp parallel num_threads(threads)
  {
    T* scale = ws.get(omp_get_thread_num());
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t n = t / tiles, s0 = (t % tiles) * kLrnTile, ns = std::min(kLrnTile, d.s - s0);
      const T* xn = x + n * d.c * d.s;
      lrn_scale(xn, d.c, d.s, s0, ns, p, scale);
      for (int64_t c = 0; c < d.c; ++c) {
        const T* xc = xn + c * d.s + s0;
        T* yc = y + (n * d.c + c) * d.s + s0;
        for (int64_t j = 0; j < ns; ++j) yc[j] = xc[j] * std::pow(scale[c * ns + j], -beta);
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
  const T beta = static_cast<T>(p.beta);
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
      for (int64_t c = 0; c < d.c; ++c)
        for (int64_t j = 0; j < ns; ++j) {
          const T s = scale[c * ns + j];
          t_buf[c * ns + j] = gn[c * d.s + s0 + j] * xn[c * d.s + s0 + j] * std::pow(s, -beta - T(1));
        }
      for (int64_t c = 0; c < d.c; ++c) {
        T* gc = gx + (n * d.c + c) * d.s + s0;
        const T* xc = xn + c * d.s + s0;
        const T* gyc = gn + c * d.s + s0;
        for (int64_t j = 0; j < ns; ++j) gc[j] = gyc[j] * std::pow(scale[c * ns + j], -beta);
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

// Sum over (N, S) of f(value, flat index) for channel c, in double.
template <typename T, typename F>
double channel_sum(const T* x, const NCS& d, int64_t c, F&& f) {
  double s = 0;
  for (int64_t n = 0; n < d.n; ++n) {
    const T* row = x + (n * d.c + c) * d.s;
    for (int64_t j = 0; j < d.s; ++j) s += f(row[j], n * d.c * d.s + c * d.s + j);
  }
  return s;
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
                        const TensorView& output) {
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
#pragma omp parallel for num_threads(detail::threads_for(d.c, d.n * d.c * d.s)) schedule(static)
    for (int64_t c = 0; c < d.c; ++c) {
      double mu, v;
      if (training) {
        mu = channel_sum(xs, d, c, [](T a, int64_t) { return double(a); }) / m;
        v = channel_sum(xs, d, c, [mu](T a, int64_t) { return (a - mu) * (a - mu); }) / m;
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
      for (int64_t n = 0; n < d.n; ++n) {
        const T* xr = xs + (n * d.c + c) * d.s;
        T* yr = y + (n * d.c + c) * d.s;
        for (int64_t j = 0; j < d.s; ++j) yr[j] = xr[j] * scale + shift;
      }
    }
  });
}

void batch_norm_backward(const TensorView& grad_output, const TensorView& input,
                         const TensorView* weight, bool training, double eps,
                         const TensorView& mean, const TensorView& var,
                         const TensorView* grad_input, const TensorView* grad_weight,
                         const TensorView* grad_bias) {
  const detail::CallScope scope;  // shares the threads among concurrent calls
  check_float(input, "input");
  const NCS d = ncs_of(input, "input");
  check_same_dtype(grad_output, "grad_output", input, "input");
  check_shape(grad_output, "grad_output", input.ndim, input.shape);
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
    const T* xs = x.data();
    const T* g = gy.data();
    const double m = static_cast<double>(d.n * d.s);
#pragma omp parallel for num_threads(detail::threads_for(d.c, d.n * d.c * d.s)) schedule(static)
    for (int64_t c = 0; c < d.c; ++c) {
      const double mu = mean.ptr<const T>()[c * mean.strides[0]];
      const double invstd = 1.0 / std::sqrt(double(var.ptr<const T>()[c * var.strides[0]]) + eps);
      const double w = weight ? double(weight->ptr<const T>()[c * weight->strides[0]]) : 1.0;
      const double sum_g = channel_sum(g, d, c, [](T a, int64_t) { return double(a); });
      const double sum_gx = channel_sum(g, d, c, [&](T a, int64_t i) {
        return double(a) * (double(xs[i]) - mu) * invstd;
      });
      if (grad_weight) grad_weight->ptr<T>()[c] = static_cast<T>(sum_gx);
      if (grad_bias) grad_bias->ptr<T>()[c] = static_cast<T>(sum_g);
      if (!grad_input) continue;
      T* gx = grad_input->ptr<T>();
      for (int64_t n = 0; n < d.n; ++n) {
        const int64_t off = (n * d.c + c) * d.s;
        for (int64_t j = 0; j < d.s; ++j) {
          if (training) {
            const double xhat = (double(xs[off + j]) - mu) * invstd;
            gx[off + j] = static_cast<T>(w * invstd / m * (m * g[off + j] - sum_g - xhat * sum_gx));
          } else {
            gx[off + j] = static_cast<T>(g[off + j] * w * invstd);
          }
        }
      }
    }
  });
}

}  // namespace convcore
