// Grouped 2-D convolution plane by plane, over the kernels of
// conv_depthwise.h, forward and backward: depthwise layers (one input
// channel per group), and layers with few channels per group
// (ConvAlgorithm::Grouped, flat planes only).
#include <omp.h>

#include <algorithm>
#include <type_traits>

#include "blocked.h"
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

// Where the blocked kernels run with B channels in the lanes (float32, a
// frame that stays in L2). Forward: strided and 5x5 or larger layers, where
// the plane kernels' vectors along a row are part-filled or run over phase
// planes (EfficientNet's and NASNet's 5x5 and 7x7 layers on 7x7 to 21x21
// planes at batch 16), and 3x3 stride-1 layers on planes of up to 14 x 14
// (rows of a vector or less); on larger planes those keep the flat plane
// kernels, which were as fast or faster there. Backward: every depthwise
// layer, whose grad_weight the plane kernels sum a plane at a time
// (docs/training.md).
bool depthwise_in_lanes(const ConvGeometry& G, bool backward) {
  constexpr int64_t kFrameBytes = int64_t(256) << 10, kSmallPlane = 14 * 14;
  if (G.Cg != 1 || G.Coutg != 1) return false;
  if (!backward && G.p.stride_h == 1 && G.p.stride_w == 1 && G.KH * G.KW <= 9 &&
      G.Ho * G.Wo > kSmallPlane)
    return false;
  return blocked::depthwise_plain_scratch(G.H, G.W, G.p, G.Ho, G.Wo) *
             static_cast<int64_t>(sizeof(float)) <= kFrameBytes;
}

// The backward in lanes, task by task over (image, block of B channels) as
// the forward: grad_input from each task's frame, and grad_weight and
// grad_bias from each task's sums over positions (float per image, as the
// plane kernels'), added over images in double, in image order.
void backward_depthwise_in_lanes(const float* gy, const TensorView& input, const float* weight,
                                 const ConvGeometry& G, float* gx, float* gw, float* gb) {
  const std::vector<float> packed = blocked::pack_depthwise_weights(weight, G.C, G.KH, G.KW);
  const int64_t B = blocked::block(), cb = (G.C + B - 1) / B, taps = G.KH * G.KW;
  const int64_t tasks = G.N * cb;
  const int threads = detail::threads_for(tasks, 2 * G.N * G.Cout * G.P * taps);
  detail::Workspace<float> ws(threads,
                              blocked::depthwise_plain_scratch(G.H, G.W, G.p, G.Ho, G.Wo));
  const bool sums_wanted = gw || gb;
  detail::Workspace<double> sums_ws(1, sums_wanted ? tasks * (taps + 1) * B : 0);
  const int64_t xs[4] = {G.xs_n, G.xs_c, G.xs_h, G.xs_w};
  blocked::depthwise_backward_plain(input.ptr<const float>(), xs, G.N, G.C, G.H, G.W,
                                    packed.data(), G.KH, G.KW, G.p, gy, G.Ho, G.Wo, gx,
                                    sums_wanted ? sums_ws.get() : nullptr, ws.get(), threads);
  if (!sums_wanted) return;
  const double* sums = sums_ws.get();
  detail::parallel_for(detail::threads_for(G.C, G.N * G.C * (taps + 1)), G.C, [&](int64_t ch) {
    const int64_t b = ch / B, l = ch % B;
    for (int64_t t = 0; t <= taps; ++t) {
      double s = 0;
      for (int64_t n = 0; n < G.N; ++n) s += sums[((n * cb + b) * (taps + 1) + t) * B + l];
      if (t < taps && gw) gw[ch * taps + t] = static_cast<float>(s);
      if (t == taps && gb) gb[ch] = static_cast<float>(s);
    }
  });
}

}  // namespace

bool grouped_planes_fit(const ConvGeometry& G) {
  const depthwise::Plane p = plane_of(G);
  return depthwise::flat_applies(p) && G.Cg * p.phases() * p.Hq() * p.Wq() <= kGroupedMostElements;
}

// Forward: one task per group of one image, whose Cg input planes are
// padded once into scratch and read by each of its output channels.
template <typename T>
void forward_depthwise(const TensorView& input, const T* weight, const T* bias,
                       const ConvGeometry& G, T* out) {
  if constexpr (std::is_same_v<T, float>) {
    if (depthwise_in_lanes(G, false)) {
      const std::vector<float> packed = blocked::pack_depthwise_weights(weight, G.C, G.KH, G.KW);
      const int64_t B = blocked::block(), tasks = G.N * ((G.C + B - 1) / B);
      const int threads = detail::threads_for(tasks, G.N * G.Cout * G.P * G.KH * G.KW);
      detail::Workspace<float> ws(threads,
                                  blocked::depthwise_plain_scratch(G.H, G.W, G.p, G.Ho, G.Wo));
      const int64_t xs[4] = {G.xs_n, G.xs_c, G.xs_h, G.xs_w};
      return blocked::depthwise_conv2d_plain(input.ptr<const float>(), xs, G.N, G.C, G.H, G.W,
                                             packed.data(), G.KH, G.KW, G.p, bias, out, G.Ho,
                                             G.Wo, ws.get(), threads);
    }
  }
  const depthwise::PlaneOps<T> ops(plane_of(G));
  const T* x = input.ptr<const T>();
  const int64_t tasks = G.N * G.G, filter = G.Cg * G.KH * G.KW;
  const int threads = detail::threads_for(tasks, G.N * G.Cout * G.P * filter);
  detail::Workspace<T> ws(threads, ops.scratch_size(G.Cg, G.Coutg));
#pragma omp parallel num_threads(threads)
  {
    depthwise::PlaneWork<T> work(ops, G.Cg, G.Coutg, ws.get(omp_get_thread_num()));
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t n = t / G.G, g = t % G.G, o = g * G.Coutg;
      for (int64_t c = 0; c < G.Cg; ++c)
        work.load_input(x + n * G.xs_n + (g * G.Cg + c) * G.xs_c, c);
      work.forward(weight + o * filter, bias ? bias + o : nullptr, G.Coutg,
                   out + (n * G.Cout + o) * G.P, G.P);
    }
  }
}

// Backward: in lanes where depthwise_in_lanes says. Else, with enough
// groups for the threads, one task per group does everything for it over
// all images: each image's input planes and grad_output planes are read
// once for grad_input, grad_weight and grad_bias together, and grad_weight
// sums over images in the task (in double), so no reduction across
// threads. With few groups, grad_input runs one task per group of an image
// and grad_weight one per group.
template <typename T>
void backward_depthwise(const T* gy, const TensorView& input, const T* weight,
                        const ConvGeometry& G, T* gx, T* gw, T* gb) {
  if constexpr (std::is_same_v<T, float>) {
    if (depthwise_in_lanes(G, true))
      return backward_depthwise_in_lanes(gy, input, weight, G, gx, gw, gb);
  }
  const depthwise::PlaneOps<T> ops(plane_of(G));
  const T* x = input.ptr<const T>();
  const int64_t filter = G.Cg * G.KH * G.KW;
  const int64_t work_size = G.N * G.Cout * G.P * filter;
  const int threads = detail::threads_for(G.G, work_size);
  const bool by_group = G.G >= 4 * threads;
  // One group's gradients over images [0, N) (grad_input unless gx is null,
  // grad_weight and grad_bias into acc unless gw / gb are null).
  auto group = [&](depthwise::PlaneWork<T>& work, double* acc, int64_t g, T* gx_, T* gw_,
                   T* gb_) {
    double* bias_acc = acc + filter * G.Coutg;
    std::fill(acc, bias_acc + G.Coutg, 0.0);
    for (int64_t n = 0; n < G.N; ++n) {
      for (int64_t c = 0; gw_ && c < G.Cg; ++c)
        work.load_input(x + n * G.xs_n + (g * G.Cg + c) * G.xs_c, c);
      const T* gyg = gy + (n * G.Cout + g * G.Coutg) * G.P;
      if (G.Cg > 1 && (gw_ || gx_))
        work.add_group_grad(gyg, G.Coutg, G.P, weight + g * G.Coutg * filter,
                            gw_ ? acc : nullptr, gx_ != nullptr);
      for (int64_t m = 0; m < G.Coutg; ++m) {
        const int64_t o = g * G.Coutg + m;
        const T* gyp = gyg + m * G.P;
        if (G.Cg == 1 && (gw_ || gx_))
          work.add_output_grad(gyp, weight + o * filter, gw_ ? acc + m * filter : nullptr,
                               gx_ != nullptr, m == 0);
        if (gb_) bias_acc[m] += detail::sum_to_double(gyp, G.P);
      }
      for (int64_t c = 0; gx_ && c < G.Cg; ++c)
        work.store_grad_input(gx_ + (n * G.C + g * G.Cg + c) * G.H * G.W, c);
    }
    for (int64_t k = 0; gw_ && k < filter * G.Coutg; ++k)
      gw_[g * G.Coutg * filter + k] = static_cast<T>(acc[k]);
    for (int64_t m = 0; gb_ && m < G.Coutg; ++m)
      gb_[g * G.Coutg + m] = static_cast<T>(bias_acc[m]);
  };
  const int plane_threads = by_group ? threads : detail::threads_for(G.N * G.G, work_size);
  const int most = std::max(threads, plane_threads);
  detail::Workspace<T> ws(most, ops.scratch_size(G.Cg, G.Coutg));
  detail::Workspace<double> acc_ws(most, (filter + 1) * G.Coutg);
  if (by_group) {
#pragma omp parallel num_threads(threads)
    {
      depthwise::PlaneWork<T> work(ops, G.Cg, G.Coutg, ws.get(omp_get_thread_num()));
#pragma omp for schedule(static)
      for (int64_t g = 0; g < G.G; ++g)
        group(work, acc_ws.get(omp_get_thread_num()), g, gx, gw, gb);
    }
    return;
  }
  if (gx) {
#pragma omp parallel num_threads(plane_threads)
    {
      depthwise::PlaneWork<T> work(ops, G.Cg, G.Coutg, ws.get(omp_get_thread_num()));
#pragma omp for schedule(static)
      for (int64_t t = 0; t < G.N * G.G; ++t) {
        const int64_t n = t / G.G, g = t % G.G, o0 = g * G.Coutg;
        if (G.Cg > 1)
          work.add_group_grad(gy + (n * G.Cout + o0) * G.P, G.Coutg, G.P, weight + o0 * filter,
                              nullptr, true);
        for (int64_t o = o0; G.Cg == 1 && o < o0 + G.Coutg; ++o)
          work.add_output_grad(gy + (n * G.Cout + o) * G.P, weight + o * filter, nullptr, true,
                               o == o0);
        for (int64_t c = 0; c < G.Cg; ++c)
          work.store_grad_input(gx + (n * G.C + g * G.Cg + c) * G.H * G.W, c);
      }
    }
  }
  if (gw || gb) {
#pragma omp parallel num_threads(threads)
    {
      depthwise::PlaneWork<T> work(ops, G.Cg, G.Coutg, ws.get(omp_get_thread_num()));
#pragma omp for schedule(static)
      for (int64_t g = 0; g < G.G; ++g)
        group(work, acc_ws.get(omp_get_thread_num()), g, nullptr, gw, gb);
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
