// Depthwise 2-D convolution (one input channel per group) over the plane
// kernels of conv_depthwise.h, forward and backward.
#include <omp.h>

#include <algorithm>

#include "conv_depthwise.h"
#include "conv_kernels.h"
#include "conv_plan.h"
#include "strided.h"

namespace convcore {
namespace conv2d_impl {

namespace {

depthwise::Plane plane_of(const ConvGeometry& G) {
  return {G.H, G.W, G.Ho, G.Wo, G.KH, G.KW, G.p.stride_h, G.p.stride_w, G.p.dilation_h,
          G.p.dilation_w, G.p.pad_top, G.p.pad_left, G.xs_h, G.xs_w};
}

}  // namespace

// Depthwise forward: one task per input plane (image, group), which is
// padded once into scratch and read by each of its output channels.
template <typename T>
void forward_depthwise(const TensorView& input, const T* weight, const T* bias,
                       const ConvGeometry& G, T* out) {
  const depthwise::PlaneOps<T> ops(plane_of(G));
  const T* x = input.ptr<const T>();
  const int64_t planes = G.N * G.C, taps = G.KH * G.KW;
  const int threads = detail::threads_for(planes, G.N * G.Cout * G.P * G.KH * G.KW);
  detail::Workspace<T> ws(threads, ops.scratch_size());
#pragma omp parallel num_threads(threads)
  {
    depthwise::PlaneWork<T> work(ops, ws.get(omp_get_thread_num()));
#pragma omp for schedule(static)
    for (int64_t t = 0; t < planes; ++t) {
      const int64_t n = t / G.C, g = t % G.C;
      work.load_input(x + n * G.xs_n + g * G.xs_c);
      for (int64_t o = g * G.Coutg; o < (g + 1) * G.Coutg; ++o)
        work.forward(weight + o * taps, bias ? bias[o] : T(0), out + (n * G.Cout + o) * G.P);
    }
  }
}

// Depthwise backward. With enough channels for the threads, one task per
// channel (group) does everything for it over all images: each image's
// input plane and grad_output planes are read once for grad_input,
// grad_weight and grad_bias together, and grad_weight sums over images in
// the task (in double), so no reduction across threads. With few channels,
// grad_input runs one task per plane and grad_weight one per channel.
template <typename T>
void backward_depthwise(const T* gy, const TensorView& input, const T* weight,
                        const ConvGeometry& G, T* gx, T* gw, T* gb) {
  const depthwise::PlaneOps<T> ops(plane_of(G));
  const T* x = input.ptr<const T>();
  const int64_t taps = G.KH * G.KW, work_size = G.N * G.Cout * G.P * G.KH * G.KW;
  const int threads = detail::threads_for(G.C, work_size);
  const bool by_channel = G.C >= 4 * threads;
  // One channel's gradients over images [0, N) (grad_input unless gx is
  // null, grad_weight and grad_bias into acc unless gw / gb are null).
  auto channel = [&](depthwise::PlaneWork<T>& work, double* acc, int64_t g, T* gx_,
                     T* gw_, T* gb_) {
    double* bias_acc = acc + taps * G.Coutg;
    std::fill(acc, bias_acc + G.Coutg, 0.0);
    for (int64_t n = 0; n < G.N; ++n) {
      if (gw_) work.load_input(x + n * G.xs_n + g * G.xs_c);
      for (int64_t m = 0; m < G.Coutg; ++m) {
        const int64_t o = g * G.Coutg + m;
        const T* gyp = gy + (n * G.Cout + o) * G.P;
        if (gw_ || gx_)
          work.add_output_grad(gyp, weight + o * taps, gw_ ? acc + m * taps : nullptr,
                               gx_ != nullptr, m == 0);
        if (gb_) bias_acc[m] += detail::sum_to_double(gyp, G.P);
      }
      if (gx_) work.store_grad_input(gx_ + (n * G.C + g) * G.H * G.W);
    }
    for (int64_t k = 0; gw_ && k < taps * G.Coutg; ++k)
      gw_[g * G.Coutg * taps + k] = static_cast<T>(acc[k]);
    for (int64_t m = 0; gb_ && m < G.Coutg; ++m)
      gb_[g * G.Coutg + m] = static_cast<T>(bias_acc[m]);
  };
  const int plane_threads = by_channel ? threads : detail::threads_for(G.N * G.C, work_size);
  const int most = std::max(threads, plane_threads);
  detail::Workspace<T> ws(most, ops.scratch_size());
  detail::Workspace<double> acc_ws(most, (taps + 1) * G.Coutg);
  if (by_channel) {
#pragma omp parallel num_threads(threads)
    {
      depthwise::PlaneWork<T> work(ops, ws.get(omp_get_thread_num()));
#pragma omp for schedule(static)
      for (int64_t g = 0; g < G.C; ++g)
        channel(work, acc_ws.get(omp_get_thread_num()), g, gx, gw, gb);
    }
    return;
  }
  if (gx) {
#pragma omp parallel num_threads(plane_threads)
    {
      depthwise::PlaneWork<T> work(ops, ws.get(omp_get_thread_num()));
#pragma omp for schedule(static)
      for (int64_t t = 0; t < G.N * G.C; ++t) {
        const int64_t n = t / G.C, g = t % G.C;
        for (int64_t o = g * G.Coutg; o < (g + 1) * G.Coutg; ++o)
          work.add_output_grad(gy + (n * G.Cout + o) * G.P, weight + o * taps, nullptr, true,
                               o == g * G.Coutg);
        work.store_grad_input(gx + t * G.H * G.W);
      }
    }
  }
  if (gw || gb) {
#pragma omp parallel num_threads(threads)
    {
      depthwise::PlaneWork<T> work(ops, ws.get(omp_get_thread_num()));
#pragma omp for schedule(static)
      for (int64_t g = 0; g < G.C; ++g)
        channel(work, acc_ws.get(omp_get_thread_num()), g, nullptr, gw, gb);
    }
  }
}

// The kernels above, for float and double.
template void forward_depthwise<float>(const TensorView&, const float*, const float*,
                                       const ConvGeometry&, float*);
template void forward_depthwise<double>(const TensorView&, const double*, const double*,
                                        const ConvGeometry&, double*);
template void backward_depthwise<float>(const float*, const TensorView&, const float*,
                                        const ConvGeometry&, float*, float*, float*);
template void backward_depthwise<double>(const double*, const TensorView&, const double*,
                                         const ConvGeometry&, double*, double*, double*);

}  // namespace conv2d_impl
}  // namespace convcore
