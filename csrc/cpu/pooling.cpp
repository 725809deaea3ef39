// Max, average and adaptive average pooling, forward and backward: direct
// loops over each (image, channel) plane, planes in parallel. Each plane's
// gradient is accumulated by one thread in a fixed order (deterministic).
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "convcore/ops.h"
#include "convcore/threading.h"
#include "gemm.h"
#include "strided.h"

namespace convcore {

namespace {

struct PlaneStrides {
  int64_t n, c, h, w;
};
PlaneStrides strides_of(const TensorView& t) {
  return {t.strides[0], t.strides[1], t.strides[2], t.strides[3]};
}

// max that lets a NaN win, as PyTorch's pooling does.
template <typename T>
inline T max_nan(T a, T b) {
  return (b > a || b != b) ? b : a;
}

// Max pooling of one plane, values only: separable, first the max over each
// window's rows for every input column (Ho x W in `cols`, contiguous,
// vectorises), then over each window's columns for the rows left (the taps
// outside, the output row inside). Values equal the windowed max exactly
// (max is associative; a NaN wins either way).
template <typename T>
void max_plane(const T* plane, const PlaneStrides& s, int64_t H, int64_t W,
               const Pool2dParams& p, const Shape4& o, T* cols, T* y) {
  const T lowest = -std::numeric_limits<T>::infinity();
  for (int64_t oh = 0; oh < o.h; ++oh) {
    T* c = cols + oh * W;
    std::fill(c, c + W, lowest);
    const int64_t ih0 = oh * p.stride_h - p.pad_h;
    for (int64_t i = 0; i < p.kernel_h; ++i) {
      const int64_t ih = ih0 + i * p.dilation_h;
      if (ih < 0 || ih >= H) continue;
      const T* xr = plane + ih * s.h;
      if (s.w == 1) {
        for (int64_t iw = 0; iw < W; ++iw) c[iw] = max_nan(c[iw], xr[iw]);
      } else {
        for (int64_t iw = 0; iw < W; ++iw) c[iw] = max_nan(c[iw], xr[iw * s.w]);
      }
    }
  }
  for (int64_t oh = 0; oh < o.h; ++oh) {
    const T* c = cols + oh * W;
    T* yr = y + oh * o.w;
    std::fill(yr, yr + o.w, lowest);
    for (int64_t j = 0; j < p.kernel_w; ++j) {
      // output columns whose tap j lands inside the row: iw = ow * sw + off
      const int64_t off = j * p.dilation_w - p.pad_w;
      int64_t lo, hi;
      detail::inside_range(off, p.stride_w, o.w, W, &lo, &hi);
      const T* src = c + off;
      for (int64_t ow = lo; ow < hi; ++ow) yr[ow] = max_nan(yr[ow], src[ow * p.stride_w]);
    }
  }
}

// ir[ow] = base + ow * sw where tap (xr[(ow * sw + off) * xs]) equals the
// window's max yr[ow], for ow in [lo, hi): compiled per instruction set, as
// the baseline build cannot select 64-bit lanes by a float compare.
template <typename T, int SW>
CONVCORE_ALWAYS_INLINE void mark_tap_row(const T* xr, int64_t xs, const T* yr, int64_t* ir,
                                         int64_t lo, int64_t hi, int64_t sw, int64_t off,
                                         int64_t base) {
  if constexpr (SW > 0) sw = SW, xs = 1;  // compile-time strides vectorise
  for (int64_t ow = lo; ow < hi; ++ow) {
    const int64_t hit = -static_cast<int64_t>(xr[(ow * sw + off) * xs] == yr[ow]);
    ir[ow] = (ir[ow] & ~hit) | ((base + ow * sw) & hit);
  }
}
template <typename T>
CONVCORE_ALWAYS_INLINE void mark_tap_body(const T* xr, int64_t xs, const T* yr, int64_t* ir,
                                          int64_t lo, int64_t hi, int64_t sw, int64_t off,
                                          int64_t base) {
  if (xs == 1 && sw == 1)
    mark_tap_row<T, 1>(xr, xs, yr, ir, lo, hi, sw, off, base);
  else if (xs == 1 && sw == 2)
    mark_tap_row<T, 2>(xr, xs, yr, ir, lo, hi, sw, off, base);
  else
    mark_tap_row<T, 0>(xr, xs, yr, ir, lo, hi, sw, off, base);
}
#define CONVCORE_MARK_TAP(NAME, T)                                                           \
  CONVCORE_ISA_DISPATCH(NAME, mark_tap_body<T>,                                              \
                        (const T* xr, int64_t xs, const T* yr, int64_t* ir, int64_t lo,      \
                         int64_t hi, int64_t sw, int64_t off, int64_t base),                 \
                        (xr, xs, yr, ir, lo, hi, sw, off, base))
CONVCORE_MARK_TAP(mark_tap, float)
CONVCORE_MARK_TAP(mark_tap, double)
#undef CONVCORE_MARK_TAP

// The index of each window's max, from the maxima y of max_plane, by
// PyTorch's rule in window order (row by row): the first valid element
// starts, a later one wins if greater or NaN; so the first element equal to
// the max, or the last NaN. The taps go in reverse window order, each
// marking the outputs whose max it equals (the last mark is the first
// match): a compare and a select per output and tap, which vectorise. Rows
// with a NaN maximum are then scanned in window order, and a zero maximum
// is read back from its element (a tie of -0 and +0 gives the zero PyTorch
// gives). idx -1: an empty window.
template <typename T>
void argmax_plane(const T* plane, const PlaneStrides& s, int64_t H, int64_t W,
                  const Pool2dParams& p, const Shape4& o, T* y, int64_t* idx) {
  for (int64_t oh = 0; oh < o.h; ++oh) {
    T* yr = y + oh * o.w;
    int64_t* ir = idx + oh * o.w;
    std::fill(ir, ir + o.w, int64_t(-1));
    const int64_t ih0 = oh * p.stride_h - p.pad_h;
    bool nan = false;
    for (int64_t ow = 0; ow < o.w; ++ow) nan |= yr[ow] != yr[ow];
    for (int64_t i = p.kernel_h - 1; i >= 0; --i) {
      const int64_t ih = ih0 + i * p.dilation_h;
      if (ih < 0 || ih >= H) continue;
      const T* xr = plane + ih * s.h;
      for (int64_t j = p.kernel_w - 1; j >= 0; --j) {
        const int64_t off = j * p.dilation_w - p.pad_w;
        int64_t lo, hi;
        detail::inside_range(off, p.stride_w, o.w, W, &lo, &hi);
        mark_tap(xr, s.w, yr, ir, lo, hi, p.stride_w, off, ih * W + off);
      }
    }
    for (int64_t ow = 0; ow < o.w; ++ow) {
      if (nan && yr[ow] != yr[ow]) {  // the last NaN, in window order
        const int64_t iw0 = ow * p.stride_w - p.pad_w;
        for (int64_t i = 0; i < p.kernel_h; ++i) {
          const int64_t ih = ih0 + i * p.dilation_h;
          if (ih < 0 || ih >= H) continue;
          for (int64_t j = 0; j < p.kernel_w; ++j) {
            const int64_t iw = iw0 + j * p.dilation_w;
            if (iw >= 0 && iw < W && plane[ih * s.h + iw * s.w] != plane[ih * s.h + iw * s.w])
              ir[ow] = ih * W + iw;
          }
        }
      } else if (yr[ow] == T(0)) {
        yr[ow] = plane[(ir[ow] / W) * s.h + (ir[ow] % W) * s.w];
      }
    }
  }
}

template <typename T>
void max_forward(const TensorView& in, const Pool2dParams& p, const Shape4& o, T* out,
                 int64_t* idx) {
  const int64_t H = in.shape[2], W = in.shape[3], planes = o.n * o.c;
  const PlaneStrides s = strides_of(in);
  const T* x = in.ptr<const T>();
  const int threads = detail::threads_for(planes, planes * H * W);
  detail::Workspace<T> ws(threads, o.h * W);
#pragma omp parallel num_threads(threads)
  {
    T* cols = ws.get(omp_get_thread_num());
#pragma omp for schedule(static)
    for (int64_t pl = 0; pl < planes; ++pl) {
      const T* plane = x + (pl / o.c) * s.n + (pl % o.c) * s.c;
      T* y = out + pl * o.h * o.w;
      max_plane(plane, s, H, W, p, o, cols, y);
      if (idx) argmax_plane(plane, s, H, W, p, o, y, idx + pl * o.h * o.w);
    }
  }
}

template <typename T>
void max_backward(const T* gy, const TensorView& in, const Pool2dParams& p, const Shape4& o,
                  T* gx) {
  const int64_t H = in.shape[2], W = in.shape[3], planes = o.n * o.c, P = o.h * o.w;
  const PlaneStrides s = strides_of(in);
  const T* x = in.ptr<const T>();
  const int threads = detail::threads_for(planes, planes * H * W);
  detail::Workspace<T> val_ws(threads, o.h * W + P);
  detail::Workspace<int64_t> idx_ws(threads, P);
#pragma omp parallel num_threads(threads)
  {
    T* cols = val_ws.get(omp_get_thread_num());
    T* val = cols + o.h * W;
    int64_t* idx = idx_ws.get(omp_get_thread_num());
#pragma omp for schedule(static)
    for (int64_t pl = 0; pl < planes; ++pl) {
      const T* plane = x + (pl / o.c) * s.n + (pl % o.c) * s.c;
      max_plane(plane, s, H, W, p, o, cols, val);
      argmax_plane(plane, s, H, W, p, o, val, idx);
      T* g = gx + pl * H * W;
      std::fill(g, g + H * W, T(0));
      const T* gr = gy + pl * P;
      for (int64_t q = 0; q < P; ++q)
        if (idx[q] >= 0) g[idx[q]] += gr[q];
    }
  }
}

template <typename T>
void avg_forward(const TensorView& in, const Pool2dParams& p, const Shape4& o, T* out) {
  const int64_t H = in.shape[2], W = in.shape[3], planes = o.n * o.c;
  const PlaneStrides s = strides_of(in);
  const T* x = in.ptr<const T>();
#pragma omp parallel for num_threads(detail::threads_for(planes, planes * H * W)) schedule(static)
  for (int64_t pl = 0; pl < planes; ++pl) {
    const T* plane = x + (pl / o.c) * s.n + (pl % o.c) * s.c;
    for (int64_t oh = 0; oh < o.h; ++oh) {
      for (int64_t ow = 0; ow < o.w; ++ow) {
        const AvgPoolWindow win = avg_pool_window(H, W, p, oh, ow);
        // Summed in double: a float32 sum of a large window (millions of
        // terms) stops growing and the mean comes out wrong by orders of
        // magnitude.
        double sum = 0;
        for (int64_t ih = win.h0; ih < win.h1; ++ih)
          for (int64_t iw = win.w0; iw < win.w1; ++iw) sum += plane[ih * s.h + iw * s.w];
        // Windows always overlap the input (PyTorch's ceil_mode rule), so the
        // divisor is 0 only if something upstream broke; never divide by it.
        out[(pl * o.h + oh) * o.w + ow] =
            win.divisor != 0 ? static_cast<T>(sum / double(win.divisor)) : T(0);
      }
    }
  }
}

template <typename T>
void avg_backward(const T* gy, int64_t H, int64_t W, const Pool2dParams& p, const Shape4& o,
                  T* gx) {
  const int64_t planes = o.n * o.c;
#pragma omp parallel for num_threads(detail::threads_for(planes, planes * H * W)) schedule(static)
  for (int64_t pl = 0; pl < planes; ++pl) {
    T* g = gx + pl * H * W;
    std::fill(g, g + H * W, T(0));
    for (int64_t oh = 0; oh < o.h; ++oh) {
      for (int64_t ow = 0; ow < o.w; ++ow) {
        const AvgPoolWindow win = avg_pool_window(H, W, p, oh, ow);
        if (win.divisor == 0) continue;
        const T share = gy[(pl * o.h + oh) * o.w + ow] / T(win.divisor);
        for (int64_t ih = win.h0; ih < win.h1; ++ih)
          for (int64_t iw = win.w0; iw < win.w1; ++iw) g[ih * W + iw] += share;
      }
    }
  }
}

// Adaptive pooling bins: [floor(o * I / O), ceil((o + 1) * I / O)).
// In 128 bits: o * in overflows int64 for a zero-strided view with a huge
// size, and a wrapped bin would read outside the plane.
inline int64_t bin_start(int64_t o, int64_t in, int64_t out) {
  return static_cast<int64_t>(static_cast<__int128>(o) * in / out);
}
inline int64_t bin_end(int64_t o, int64_t in, int64_t out) {
  return static_cast<int64_t>(((static_cast<__int128>(o) + 1) * in + out - 1) / out);
}

template <typename T>
void adaptive_forward(const TensorView& in, const Shape4& o, T* out) {
  const int64_t H = in.shape[2], W = in.shape[3], planes = o.n * o.c;
  const PlaneStrides s = strides_of(in);
  const T* x = in.ptr<const T>();
#pragma omp parallel for num_threads(detail::threads_for(planes, planes * H * W)) schedule(static)
  for (int64_t pl = 0; pl < planes; ++pl) {
    const T* plane = x + (pl / o.c) * s.n + (pl % o.c) * s.c;
    for (int64_t oh = 0; oh < o.h; ++oh) {
      const int64_t h0 = bin_start(oh, H, o.h), h1 = bin_end(oh, H, o.h);
      for (int64_t ow = 0; ow < o.w; ++ow) {
        const int64_t w0 = bin_start(ow, W, o.w), w1 = bin_end(ow, W, o.w);
        double sum = 0;  // in double, as avg_forward
        for (int64_t ih = h0; ih < h1; ++ih)
          for (int64_t iw = w0; iw < w1; ++iw) sum += plane[ih * s.h + iw * s.w];
        out[(pl * o.h + oh) * o.w + ow] = static_cast<T>(sum / double((h1 - h0) * (w1 - w0)));
      }
    }
  }
}

template <typename T>
void adaptive_backward(const T* gy, int64_t H, int64_t W, const Shape4& o, T* gx) {
  const int64_t planes = o.n * o.c;
#pragma omp parallel for num_threads(detail::threads_for(planes, planes * H * W)) schedule(static)
  for (int64_t pl = 0; pl < planes; ++pl) {
    T* g = gx + pl * H * W;
    std::fill(g, g + H * W, T(0));
    for (int64_t oh = 0; oh < o.h; ++oh) {
      const int64_t h0 = bin_start(oh, H, o.h), h1 = bin_end(oh, H, o.h);
      for (int64_t ow = 0; ow < o.w; ++ow) {
        const int64_t w0 = bin_start(ow, W, o.w), w1 = bin_end(ow, W, o.w);
        const T share = gy[(pl * o.h + oh) * o.w + ow] / T((h1 - h0) * (w1 - w0));
        for (int64_t ih = h0; ih < h1; ++ih)
          for (int64_t iw = w0; iw < w1; ++iw) g[ih * W + iw] += share;
      }
    }
  }
}

void check_input4(const TensorView& input) {
  check_float(input, "input");
  check_ndim(input, "input", 4, "(N, C, H, W)");
}

// Validates grad_output against the expected output shape; returns it contiguous.
template <typename T>
detail::Contiguous<T> checked_grad_output(const TensorView& grad_output, const TensorView& ref,
                                          const Shape4& o) {
  check_same_dtype(grad_output, "grad_output", ref, "input");
  const int64_t shape[4] = {o.n, o.c, o.h, o.w};
  check_shape(grad_output, "grad_output", 4, shape);
  return detail::Contiguous<T>(grad_output);
}

}  // namespace

void max_pool2d_forward(const TensorView& input, const Pool2dParams& p, const TensorView& output,
                        const TensorView* indices) {
  const detail::CallScope scope;  // shares the threads among concurrent calls
  check_input4(input);
  const Shape4 o = max_pool2d_output_shape(shape4(input), p);
  const int64_t shape[4] = {o.n, o.c, o.h, o.w};
  detail::check_output(output, "output", input, 4, shape);
  if (indices) {
    if (indices->dtype != DType::Int64) throw TypeError("indices must have dtype int64");
    if (!indices->is_contiguous()) throw ValueError("indices must be C-contiguous");
    check_shape(*indices, "indices", 4, shape);
  }
  detail::dispatch_float(input.dtype, [&](auto zero) {
    using T = decltype(zero);
    max_forward<T>(input, p, o, output.ptr<T>(), indices ? indices->ptr<int64_t>() : nullptr);
  });
}

void max_pool2d_backward(const TensorView& grad_output, const TensorView& input,
                         const Pool2dParams& p, const TensorView& grad_input) {
  const detail::CallScope scope;  // shares the threads among concurrent calls
  check_input4(input);
  const Shape4 o = max_pool2d_output_shape(shape4(input), p);
  detail::check_output(grad_input, "grad_input", input, 4, input.shape);
  detail::dispatch_float(input.dtype, [&](auto zero) {
    using T = decltype(zero);
    const auto gy = checked_grad_output<T>(grad_output, input, o);
    max_backward<T>(gy.data(), input, p, o, grad_input.ptr<T>());
  });
}

void max_pool2d_backward_indices(const TensorView& grad_output, const TensorView& indices,
                                 const TensorView& grad_input) {
  const detail::CallScope scope;  // shares the threads among concurrent calls
  check_float(grad_input, "grad_input");
  check_ndim(grad_input, "grad_input", 4, "(N, C, H, W)");
  if (!grad_input.is_contiguous()) throw ValueError("grad_input must be C-contiguous");
  check_ndim(grad_output, "grad_output", 4, "(N, C, out_H, out_W)");
  check_same_dtype(grad_output, "grad_output", grad_input, "grad_input");
  if (indices.dtype != DType::Int64) throw TypeError("indices must have dtype int64");
  check_shape(indices, "indices", 4, grad_output.shape);
  if (grad_output.shape[0] != grad_input.shape[0] || grad_output.shape[1] != grad_input.shape[1])
    throw ValueError("grad_output must have the batch and channels of the input, got " +
                     shape_str(grad_output) + " for an input of shape " + shape_str(grad_input));
  const int64_t HW = grad_input.shape[2] * grad_input.shape[3];
  const int64_t planes = grad_input.shape[0] * grad_input.shape[1];
  const int64_t per_plane = grad_output.shape[2] * grad_output.shape[3];
  bool bad = false;
  detail::dispatch_float(grad_input.dtype, [&](auto zero) {
    using T = decltype(zero);
    const detail::Contiguous<T> gy(grad_output);
    const detail::Contiguous<int64_t> idx(indices);
    T* gx = grad_input.ptr<T>();
#pragma omp parallel for num_threads(detail::threads_for(planes, planes * HW)) schedule(static) reduction(|| : bad)
    for (int64_t pl = 0; pl < planes; ++pl) {
      T* g = gx + pl * HW;
      std::fill(g, g + HW, T(0));
      const T* gr = gy.data() + pl * per_plane;
      const int64_t* ir = idx.data() + pl * per_plane;
      for (int64_t k = 0; k < per_plane; ++k) {
        const int64_t i = ir[k];
        if (i < 0 || i >= HW) {
          bad = true;  // never write outside the plane; reported below
          continue;
        }
        g[i] += gr[k];
      }
    }
  });
  if (bad)
    throw ValueError("indices must lie in [0, H * W) = [0, " + std::to_string(HW) +
                     "), as max_pool2d(..., return_indices=True) gives them");
}

void avg_pool2d_forward(const TensorView& input, const Pool2dParams& p, const TensorView& output) {
  const detail::CallScope scope;  // shares the threads among concurrent calls
  check_input4(input);
  const Shape4 o = avg_pool2d_output_shape(shape4(input), p);
  const int64_t shape[4] = {o.n, o.c, o.h, o.w};
  detail::check_output(output, "output", input, 4, shape);
  detail::dispatch_float(input.dtype, [&](auto zero) {
    using T = decltype(zero);
    avg_forward<T>(input, p, o, output.ptr<T>());
  });
}

void avg_pool2d_backward(const TensorView& grad_output, const Pool2dParams& p,
                         const TensorView& grad_input) {
  const detail::CallScope scope;  // shares the threads among concurrent calls
  check_float(grad_input, "grad_input");
  check_ndim(grad_input, "grad_input", 4, "(N, C, H, W)");
  const Shape4 o = avg_pool2d_output_shape(shape4(grad_input), p);
  if (!grad_input.is_contiguous()) throw ValueError("grad_input must be C-contiguous");
  detail::dispatch_float(grad_input.dtype, [&](auto zero) {
    using T = decltype(zero);
    const auto gy = checked_grad_output<T>(grad_output, grad_input, o);
    avg_backward<T>(gy.data(), grad_input.shape[2], grad_input.shape[3], p, o,
                    grad_input.ptr<T>());
  });
}

void adaptive_avg_pool2d_forward(const TensorView& input, const TensorView& output) {
  const detail::CallScope scope;  // shares the threads among concurrent calls
  check_input4(input);
  check_ndim(output, "output", 4, "(N, C, out_H, out_W)");
  const Shape4 o = adaptive_avg_pool2d_output_shape(shape4(input), output.shape[2], output.shape[3]);
  const int64_t shape[4] = {o.n, o.c, o.h, o.w};
  detail::check_output(output, "output", input, 4, shape);
  if (output.numel() == 0) return;
  detail::dispatch_float(input.dtype, [&](auto zero) {
    using T = decltype(zero);
    adaptive_forward<T>(input, o, output.ptr<T>());
  });
}

void adaptive_avg_pool2d_backward(const TensorView& grad_output, const TensorView& grad_input) {
  const detail::CallScope scope;  // shares the threads among concurrent calls
  check_float(grad_input, "grad_input");
  check_ndim(grad_input, "grad_input", 4, "(N, C, H, W)");
  check_ndim(grad_output, "grad_output", 4, "(N, C, out_H, out_W)");
  if (!grad_input.is_contiguous()) throw ValueError("grad_input must be C-contiguous");
  const Shape4 o = adaptive_avg_pool2d_output_shape(shape4(grad_input), grad_output.shape[2],
                                                    grad_output.shape[3]);
  detail::dispatch_float(grad_input.dtype, [&](auto zero) {
    using T = decltype(zero);
    const auto gy = checked_grad_output<T>(grad_output, grad_input, o);
    if (o.h == 0 || o.w == 0) {
      std::fill(grad_input.ptr<T>(), grad_input.ptr<T>() + grad_input.numel(), T(0));
      return;
    }
    adaptive_backward<T>(gy.data(), grad_input.shape[2], grad_input.shape[3], o,
                         grad_input.ptr<T>());
  });
}

}  // namespace convcore
