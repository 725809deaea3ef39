// 2-D convolution, forward and backward: the public entry points. Each call
// validates its arguments, finds the plan of its shape (conv_plan.cpp, cached
// per shape), and runs the kernels the plan names: conv_gemm.cpp,
// conv_direct.cpp, conv_depthwise.cpp, conv_winograd.cpp.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <limits>
#include <new>
#include <optional>
#include <vector>

#include "conv_kernels.h"
#include "conv_plan.h"
#include "convcore/errors.h"
#include "convcore/ops.h"
#include "convcore/threading.h"
#include "gemm.h"
#include "strided.h"

namespace convcore {

namespace {
std::atomic<bool> g_conv_autotune{false};
}  // namespace

void set_conv_autotune(bool on) { g_conv_autotune.store(on); }
bool get_conv_autotune() { return g_conv_autotune.load(); }

namespace conv2d_impl {
namespace {

// grad_bias[o] = sum over n, h, w of grad_output; float32 sums in double.
template <typename T>
void grad_bias_impl(const T* gy, const ConvGeometry& G, T* gb) {
#pragma omp parallel for num_threads(detail::threads_for(G.Cout, G.N * G.Cout * G.P)) schedule(static)
  for (int64_t o = 0; o < G.Cout; ++o) {
    double s = 0;
    for (int64_t n = 0; n < G.N; ++n) s += detail::sum_to_double(gy + (n * G.Cout + o) * G.P, G.P);
    gb[o] = static_cast<T>(s);
  }
}

// Forward as `plan` says.
template <typename T>
void run_forward(const ConvPlan& plan, const TensorView& input, const detail::Contiguous<T>& w,
                 const T* bias, ConvGeometry G, T* out) {
  G.p.algorithm = plan.algorithm;
  switch (plan.algorithm) {
    case ConvAlgorithm::Depthwise:
    case ConvAlgorithm::Grouped:
      return forward_depthwise<T>(input, w.data(), bias, G, out);
    case ConvAlgorithm::Winograd:
      return forward_winograd<2, T>(input, w.data(), bias, G, out);
    case ConvAlgorithm::Winograd4x4:
      return forward_winograd<4, T>(input, w.data(), bias, G, out);
    case ConvAlgorithm::Direct:
      return forward_direct<T>(input, w.data(), bias, G, plan.direct_split, out);
    case ConvAlgorithm::Pointwise:
      if (!rows_contiguous(G)) {  // the pointwise GEMM reads whole rows
        const detail::Contiguous<T> xc(input);
        return forward_gemm<T>(xc.view(), w, bias, with_input(G, xc.view()), plan.gemm_split,
                                 out);
      }
      return forward_gemm<T>(input, w, bias, G, plan.gemm_split, out);
    default:
      return forward_gemm<T>(input, w, bias, G, plan.gemm_split, out);
  }
}

// Backward as `plan` says, into the gradients wanted (null: skipped), with
// at least one output (conv2d_backward fills the gradients without them).
template <typename T>
void run_backward(const ConvPlan& plan, const T* gy, const TensorView& input,
                  const TensorView& weight, ConvGeometry G, T* gx, T* gw, T* gb) {
  G.p.algorithm = plan.algorithm;
  // The pointwise grad_weight reads whole rows of the input: copy it if they
  // are not (grad_input does not read the input).
  const bool copy_input =
      gw && G.p.algorithm == ConvAlgorithm::Pointwise && !rows_contiguous(G);
  std::optional<detail::Contiguous<T>> xc;
  if (copy_input) xc.emplace(input);
  const TensorView& x = copy_input ? xc->view() : input;
  const ConvGeometry Gx = copy_input ? with_input(G, x) : G;
  if (plan.algorithm == ConvAlgorithm::Depthwise || plan.algorithm == ConvAlgorithm::Grouped) {
    // The gradients the plane pass takes (grad_bias always) in one pass;
    // those the plan takes elsewhere (Grouped with many channels a group)
    // are left below.
    const bool with_gx = plan.grad_input == GradInputPath::Planes;
    const bool with_gw = plan.grad_weight == GradWeightPath::Planes;
    if ((gx && with_gx) || gb || (gw && with_gw)) {
      const detail::Contiguous<T> w(weight);
      backward_depthwise<T>(gy, x, w.data(), Gx, with_gx ? gx : nullptr, with_gw ? gw : nullptr,
                            gb);
    }
    if (with_gx) gx = nullptr;
    if (with_gw) gw = nullptr;
    gb = nullptr;
  }
  if (gx) {
    const detail::Contiguous<T> w(weight);
    switch (plan.grad_input) {
      case GradInputPath::Winograd2:
        grad_input_winograd<2, T>(gy, w.data(), Gx, gx);
        break;
      case GradInputPath::Winograd4:
        grad_input_winograd<4, T>(gy, w.data(), Gx, gx);
        break;
      case GradInputPath::Pointwise:
        grad_input_pointwise<T>(gy, w, Gx, plan.grad_input_pointwise_split, gx);
        break;
      case GradInputPath::AsForwardDirect:
      case GradInputPath::AsForwardGemm:
        grad_input_as_forward<T>(gy, w.data(), Gx, plan, gx);
        break;
      case GradInputPath::DirectStrided:
        grad_input_direct_strided<T>(gy, w.data(), Gx, plan.grad_input_direct_split, gx);
        break;
      case GradInputPath::Planes:
      case GradInputPath::Gemm:
        grad_input_gemm<T>(gy, w, Gx, plan.grad_input_gemm_split, gx);
        break;
    }
  }
  if (gw) {
    switch (plan.grad_weight) {
      case GradWeightPath::Winograd2:
        grad_weight_winograd<2, T>(gy, x, Gx, gw);
        break;
      case GradWeightPath::Winograd4:
        grad_weight_winograd<4, T>(gy, x, Gx, gw);
        break;
      case GradWeightPath::Direct:
        grad_weight_direct<T>(gy, x, Gx, plan.grad_weight_direct_split, gw);
        break;
      case GradWeightPath::ByTaps:
        grad_weight_by_taps<T>(gy, x, Gx, plan.grad_weight_by_taps_split, gw);
        break;
      case GradWeightPath::Dots:
        grad_weight_dots<T>(gy, x, Gx, gw);
        break;
      case GradWeightPath::ColumnDots:
        grad_weight_column_dots<T>(gy, x, Gx, gw);
        break;
      case GradWeightPath::ByChunks:
        grad_weight_by_chunks<T>(gy, x, Gx, gw);
        break;
      case GradWeightPath::GroupedLanes:
        grad_weight_grouped_lanes<T>(gy, x, Gx, gw);
        break;
      case GradWeightPath::Planes:
      case GradWeightPath::Gemm:
        grad_weight_gemm<T>(gy, x, Gx, plan.grad_weight_gemm_split, gw);
        break;
    }
  }
  if (gb) grad_bias_impl<T>(gy, G, gb);
}

// The plan of G from the cache, or from the rules (then cached); none when
// the autotune is to choose it (autotune on, algorithm auto, a shape not
// planned yet). Throws where an algorithm asked for by name does not apply.
std::optional<ConvPlan> known_plan(const ConvGeometry& G, ConvPass pass, DType dtype) {
  ConvPlan plan;
  if (find_cached_plan(G, pass, dtype, &plan)) return plan;
  if (get_conv_autotune() && G.auto_algorithm) return std::nullopt;
  plan = rule_plan(G, pass, dtype);
  cache_plan(G, pass, dtype, plan);
  return plan;
}

// Runs each candidate plan of G twice on the caller's arguments and
// buffers (`run`), the faster run counting (the first also faults in fresh
// workspace), caches the fastest and leaves its results in the buffers.
// The rules' plan comes first and keeps ties; candidates that would run the
// same kernels run once. A candidate past the first that runs out of
// memory is skipped.
template <typename Run>
void autotune(const ConvGeometry& G, ConvPass pass, DType dtype, const Run& run) {
  std::vector<ConvPlan> candidates{rule_plan(G, pass, dtype)};
  for (ConvAlgorithm algorithm : auto_candidates(G)) {
    const ConvPlan plan = plan_as_if_auto_chose(G, pass, dtype, algorithm);
    if (std::find(candidates.begin(), candidates.end(), plan) == candidates.end())
      candidates.push_back(plan);
  }
  // Each candidate's faster run; infinite for one that ran out of memory.
  std::vector<double> seconds(candidates.size(), std::numeric_limits<double>::infinity());
  size_t last_run = candidates.size();  // whose complete results the buffers hold (none)
  for (size_t i = 0; i < candidates.size(); ++i) {
    for (int repeat = 0; repeat < 2; ++repeat) {
      const auto start = std::chrono::steady_clock::now();
      try {
        run(candidates[i]);
      } catch (const std::bad_alloc&) {  // MemoryError too
        if (i == 0) throw;
        seconds[i] = std::numeric_limits<double>::infinity();
        last_run = candidates.size();
        break;
      }
      const std::chrono::duration<double> elapsed = std::chrono::steady_clock::now() - start;
      seconds[i] = std::min(seconds[i], elapsed.count());
      last_run = i;
    }
  }
  const size_t best = static_cast<size_t>(
      std::min_element(seconds.begin(), seconds.end()) - seconds.begin());
  if (best != last_run) run(candidates[best]);
  cache_plan(G, pass, dtype, candidates[best]);
}

}  // namespace
}  // namespace conv2d_impl

using conv2d_impl::ConvGeometry;
using conv2d_impl::ConvPass;
using conv2d_impl::ConvPlan;

namespace {

// A 1x1 convolution of 1x1 images (squeeze-and-excitation's gates) is a
// linear layer over the batch, one GEMM of N rows, which auto and
// 'pointwise' run as such: the pointwise path ran one matrix-vector product
// per image, each reading all the weights (16 x 960 -> 240, 2 threads, Zen
// 5: 518 us, PyTorch 110, linear 32).
bool as_linear(const ConvGeometry& G) {
  const ConvAlgorithm a = G.p.algorithm;
  return (a == ConvAlgorithm::Auto || a == ConvAlgorithm::Pointwise) && G.G == 1 &&
         G.KH == 1 && G.KW == 1 && G.H == 1 && G.W == 1 && G.Ho == 1 && G.Wo == 1 &&
         G.p.pad_top == 0 && G.p.pad_bottom == 0 && G.p.pad_left == 0 && G.p.pad_right == 0 &&
         G.N > 0 && G.C > 0 && G.Cout > 0;
}

// A (d0, d1, 1, 1) view as the (d0, d1) matrix.
TensorView matrix_of(const TensorView& t) {
  TensorView m = t;
  m.ndim = 2;
  for (int i = 2; i < kMaxDims; ++i) m.shape[i] = m.strides[i] = 0;
  return m;
}

// A 1x1 convolution with a stride and no padding reads every stride-th row
// and column of the image only: it is the stride-1 1x1 convolution of that
// subsampled image, which the pointwise paths run. Their grad_input pays
// (the GEMM path scatters column blocks into a strided frame) at batch 2+,
// and with AVX-512 at batch 1 too; their forward and grad_weight where the
// subsampled planes are small enough to go side by side in one GEMM (the
// GEMM path tiles each image's few positions on its own), not at batch 1,
// where the copy weighs more than the GEMM path's strided packing.
bool strided_one_by_one(const ConvGeometry& G) {
  return G.p.algorithm == ConvAlgorithm::Auto && G.G == 1 && G.KH == 1 && G.KW == 1 &&
         (G.p.stride_h > 1 || G.p.stride_w > 1) && G.p.pad_top == 0 && G.p.pad_bottom == 0 &&
         G.p.pad_left == 0 && G.p.pad_right == 0 && G.N * G.C * G.Cout * G.P > 0;
}
bool subsampled_grad_input_pays(const ConvGeometry& G) {
  return strided_one_by_one(G) && (G.N > 1 || gemm::isa_level() == 2);
}
bool subsampled_planes_side_by_side(const ConvGeometry& G) {
  return strided_one_by_one(G) && G.N > 1 && G.P < gemm::NC;
}

Conv2dParams stride_one(Conv2dParams p) {
  p.stride_h = p.stride_w = 1;
  p.dilation_h = p.dilation_w = 1;
  return p;
}

// The subsampled image x[:, :, ::stride_h, ::stride_w] (Ho x Wo positions)
// copied into `dst`, contiguous.
template <typename T>
TensorView subsample_input(const TensorView& x, const ConvGeometry& G, T* dst) {
  const T* src = x.ptr<const T>();
  const int64_t sh = G.p.stride_h * x.strides[2], sw = G.p.stride_w * x.strides[3];
  detail::parallel_for(detail::threads_for(G.N * G.C, G.N * G.C * G.P), G.N * G.C,
                       [&](int64_t nc) {
    const T* plane = src + (nc / G.C) * x.strides[0] + (nc % G.C) * x.strides[1];
    T* out = dst + nc * G.P;
    for (int64_t i = 0; i < G.Ho; ++i)
      for (int64_t j = 0; j < G.Wo; ++j) out[i * G.Wo + j] = plane[i * sh + j * sw];
  });
  const int64_t shape[4] = {G.N, G.C, G.Ho, G.Wo};
  return contiguous_view(dst, x.dtype, 4, shape);
}

// grad_input of the strided layer from that of the subsampled one: each
// compact plane's values at every stride-th row and column, zeros between.
template <typename T>
void scatter_subsampled(const T* compact, const ConvGeometry& G, T* gx) {
  const int64_t plane = G.H * G.W;
  detail::parallel_for(detail::threads_for(G.N * G.C, G.N * G.C * plane), G.N * G.C,
                       [&](int64_t nc) {
    T* out = gx + nc * plane;
    const T* in = compact + nc * G.P;
    std::fill(out, out + plane, T(0));
    for (int64_t i = 0; i < G.Ho; ++i)
      for (int64_t j = 0; j < G.Wo; ++j)
        out[i * G.p.stride_h * G.W + j * G.p.stride_w] = in[i * G.Wo + j];
  });
}

}  // namespace

void conv2d_forward(const TensorView& input, const TensorView& weight, const TensorView* bias,
                    const Conv2dParams& p, const TensorView& output) {
  const ConvGeometry G = conv2d_impl::make_geometry(input, weight, p);
  if (bias) {
    check_same_dtype(*bias, "bias", input, "input");
    check_shape(*bias, "bias", 1, &G.Cout);
  }
  const int64_t out_shape[4] = {G.N, G.Cout, G.Ho, G.Wo};
  detail::check_output(output, "output", input, 4, out_shape);
  if (as_linear(G))
    return linear_forward(matrix_of(input), matrix_of(weight), bias, matrix_of(output));
  if (subsampled_planes_side_by_side(G)) {
    return detail::dispatch_float(input.dtype, [&](auto zero) {
      using T = decltype(zero);
      detail::Workspace<T> xs(1, G.N * G.C * G.P);
      conv2d_forward(subsample_input<T>(input, G, xs.get()), weight, bias, stride_one(p), output);
    });
  }
  const detail::CallScope scope;  // shares the threads among concurrent calls
  const std::optional<ConvPlan> plan = conv2d_impl::known_plan(G, ConvPass::Forward, input.dtype);
  detail::dispatch_float(input.dtype, [&](auto zero) {
    using T = decltype(zero);
    const detail::Contiguous<T> w(weight);
    std::vector<T> b;
    if (bias) {
      b.resize(static_cast<size_t>(G.Cout));
      detail::copy_to_contiguous<T>(*bias, b.data());
    }
    if (output.numel() == 0) return;
    const T* bias_data = bias ? b.data() : nullptr;
    if (G.Kc == 0) {  // no input channels: each output is its bias
      T* out = output.ptr<T>();
      for (int64_t i = 0; i < G.N * G.Cout; ++i)
        std::fill(out + i * G.P, out + (i + 1) * G.P, bias_data ? bias_data[i % G.Cout] : T(0));
      return;
    }
    auto run = [&](const ConvPlan& plan_to_run) {
      conv2d_impl::run_forward<T>(plan_to_run, input, w, bias_data, G, output.ptr<T>());
    };
    if (plan)
      run(*plan);
    else
      conv2d_impl::autotune(G, ConvPass::Forward, input.dtype, run);
  });
}

void conv2d_backward(const TensorView& grad_output, const TensorView& input,
                     const TensorView& weight, const Conv2dParams& p,
                     const TensorView* grad_input, const TensorView* grad_weight,
                     const TensorView* grad_bias) {
  const ConvGeometry G = conv2d_impl::make_geometry(input, weight, p);
  check_same_dtype(grad_output, "grad_output", input, "input");
  const int64_t out_shape[4] = {G.N, G.Cout, G.Ho, G.Wo};
  check_shape(grad_output, "grad_output", 4, out_shape);
  if (grad_input) detail::check_output(*grad_input, "grad_input", input, 4, input.shape);
  if (grad_weight) detail::check_output(*grad_weight, "grad_weight", input, 4, weight.shape);
  if (grad_bias) detail::check_output(*grad_bias, "grad_bias", input, 1, &G.Cout);
  if (as_linear(G)) {
    const TensorView gx = grad_input ? matrix_of(*grad_input) : TensorView();
    const TensorView gw = grad_weight ? matrix_of(*grad_weight) : TensorView();
    return linear_backward(matrix_of(grad_output), matrix_of(input), matrix_of(weight),
                           grad_input ? &gx : nullptr, grad_weight ? &gw : nullptr, grad_bias);
  }
  // The gradients the subsampled layer gives (the rest, if any, below).
  const TensorView* sub_gx = subsampled_grad_input_pays(G) ? grad_input : nullptr;
  const TensorView* sub_gw = subsampled_planes_side_by_side(G) ? grad_weight : nullptr;
  if (sub_gx || sub_gw) {
    const TensorView* sub_gb = sub_gw ? grad_bias : nullptr;
    detail::dispatch_float(input.dtype, [&](auto zero) {
      using T = decltype(zero);
      detail::Workspace<T> xs(1, G.N * G.C * G.P);
      const TensorView x = subsample_input<T>(input, G, xs.get());
      std::optional<detail::Workspace<T>> gxc;
      TensorView gxc_view;
      if (sub_gx) {
        gxc.emplace(1, G.N * G.C * G.P);
        gxc_view = contiguous_view(gxc->get(), input.dtype, 4, x.shape);
      }
      conv2d_backward(grad_output, x, weight, stride_one(p), sub_gx ? &gxc_view : nullptr, sub_gw,
                      sub_gb);
      if (sub_gx) scatter_subsampled<T>(gxc->get(), G, sub_gx->ptr<T>());
    });
    if (sub_gx) grad_input = nullptr;
    if (sub_gw) grad_weight = grad_bias = nullptr;
    if (!grad_input && !grad_weight && !grad_bias) return;
  }
  const detail::CallScope scope;  // shares the threads among concurrent calls
  const std::optional<ConvPlan> plan = conv2d_impl::known_plan(G, ConvPass::Backward, input.dtype);
  detail::dispatch_float(input.dtype, [&](auto zero) {
    using T = decltype(zero);
    const detail::Contiguous<T> gy(grad_output);
    // The gradients asked for and not empty (null: skipped).
    auto wanted = [](const TensorView* t) { return t && t->numel() > 0 ? t->ptr<T>() : nullptr; };
    T* gx = wanted(grad_input);
    T* gw = wanted(grad_weight);
    T* gb = wanted(grad_bias);
    if (G.N * G.Cout * G.P == 0) {  // no outputs: nothing to propagate
      if (gx) std::fill(gx, gx + G.N * G.C * G.H * G.W, T(0));
      if (gw) std::fill(gw, gw + G.Cout * G.Kc, T(0));
      if (gb) std::fill(gb, gb + G.Cout, T(0));
      return;
    }
    auto run = [&](const ConvPlan& plan_to_run) {
      conv2d_impl::run_backward<T>(plan_to_run, gy.data(), input, weight, G, gx, gw, gb);
    };
    if (plan)
      run(*plan);
    else
      conv2d_impl::autotune(G, ConvPass::Backward, input.dtype, run);
  });
}

}  // namespace convcore
