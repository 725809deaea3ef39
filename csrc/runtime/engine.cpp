// The compiled engine's second half (engine.h, engine_internal.h): a plan
// per batch size (every value's place in one arena, the scratch and the
// threads of each step), running it, and the Engine's interface. The first
// half, compiling the graph into steps, is engine_compile.cpp.
#include "engine.h"

#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <exception>
#include <iomanip>
#include <mutex>
#include <sstream>

#include "convcore/errors.h"
#include "engine_internal.h"
#include "../cpu/strided.h"

namespace convcore {
namespace engine {

Shape val_shape(const Compiled& c, const std::vector<Step>& steps, int v) {
  const Val& val = c.vals[static_cast<std::size_t>(v)];
  if (val.gv >= 0) return c.shapes[static_cast<std::size_t>(val.gv)];
  for (const auto& s : steps)
    if (s.out == v && s.kind == Kind::Pad) {
      Shape x = val_shape(c, steps, s.in[0]);
      x[1] += s.pad.top + s.pad.bottom;
      x[2] += s.pad.left + s.pad.right;
      return x;
    }
  throw Error("engine: a value without a shape");
}

namespace {

int64_t sample_elements(const Shape& s, bool is_blocked, int lanes) {
  if (!is_blocked) return graph::numel(s);
  return blocked::round_up(s[0], lanes) * s[1] * s[2];
}

}  // namespace

Plan& Engine::Impl::plan(Compiled& c, int64_t batch, int threads) const {
  auto key = std::make_pair(batch, threads);
  auto it = c.plans.find(key);
  if (it != c.plans.end()) return *it->second;
  auto p = std::make_unique<Plan>();
  p->batch = batch;
  p->threads = threads;
  const std::size_t nv = c.vals.size(), ns = c.steps.size();
  std::vector<Shape> shapes(nv);
  for (std::size_t v = 0; v < nv; ++v) shapes[v] = val_shape(c, c.steps, static_cast<int>(v));
  // an elementwise step's output written over its input (below)
  std::vector<int> over(nv, -1);
  // the buffer each Val lives in: its own, its view's, its concatenation's,
  // or the input it was written over
  auto root = [&](int v) {
    while (true) {
      const Val& val = c.vals[static_cast<std::size_t>(v)];
      if (val.view >= 0) v = val.view;
      else if (val.alias >= 0) v = val.alias;
      else if (over[static_cast<std::size_t>(v)] >= 0) v = over[static_cast<std::size_t>(v)];
      else return v;
    }
  };
  // lifetimes of the root buffers, in steps
  std::vector<int> first(nv, INT32_MAX), last(nv, -1);
  auto touch = [&](int v, int step) {
    const int r = root(v);
    first[static_cast<std::size_t>(r)] = std::min(first[static_cast<std::size_t>(r)], step);
    last[static_cast<std::size_t>(r)] = std::max(last[static_cast<std::size_t>(r)], step);
  };
  for (std::size_t i = 0; i < ns; ++i) {
    const Step& s = c.steps[i];
    for (int v : s.in) touch(v, static_cast<int>(i));
    if (s.residual >= 0) touch(s.residual, static_cast<int>(i));
    touch(s.out, static_cast<int>(i));
  }
  touch(c.output_val, static_cast<int>(ns));  // read after the last step
  // A blocked elementwise step (add, mul, affine, activation) writes over an
  // input of its shape that dies with it: each position is read before it
  // is written, and the lines it writes are the ones its thread just read
  // (a fresh buffer's lines may sit in the other core's cache, which makes
  // every write several times slower), in a smaller arena. So does a
  // blocked convolution over the residual it adds, which dies with it: each
  // output value reads its residual value just before it is written, so the
  // lines written are ones just read, where a fresh buffer's are fetched for
  // ownership besides the residual's. Not over its own input, which other
  // tiles still read after a position is written.
  const int input_root = root(c.input_val);
  for (std::size_t i = 0; i < ns; ++i) {
    const Step& s = c.steps[i];
    const bool elementwise = s.kind == Kind::Add || s.kind == Kind::Mul ||
                             s.kind == Kind::Affine || s.kind == Kind::Act;
    const bool conv_residual = s.kind == Kind::Conv && s.residual >= 0;
    const std::size_t o = static_cast<std::size_t>(s.out);
    if (!(elementwise || conv_residual) || !c.vals[o].blocked || root(s.out) != s.out) continue;
    const std::vector<int> over_candidates = elementwise ? s.in : std::vector<int>{s.residual};
    for (int v : over_candidates) {
      const int r = root(v);
      if (conv_residual && r == root(s.in[0])) continue;
      int u = v;  // v must reach r through outputs written over inputs only
      while (u != r && c.vals[static_cast<std::size_t>(u)].view < 0 &&
             c.vals[static_cast<std::size_t>(u)].alias < 0)
        u = over[static_cast<std::size_t>(u)];
      const std::size_t ri = static_cast<std::size_t>(r);
      if (u != r || r == input_root || last[ri] != static_cast<int>(i) || !c.vals[ri].blocked ||
          shapes[ri] != shapes[o])
        continue;
      over[o] = r;
      last[ri] = std::max(last[ri], last[o]);
      break;
    }
  }
  p->places.assign(nv, Place{});
  p->conv_plans.resize(ns);
  p->winograd_plans.resize(ns);
  // sizes of the root buffers; the caller's input is used where it lies
  struct Buffer {
    int val;
    int64_t elements;
    int first, last;
    int64_t offset = -1;
  };
  std::vector<Buffer> buffers;
  for (std::size_t v = 0; v < nv; ++v) {
    if (root(static_cast<int>(v)) != static_cast<int>(v) || last[v] < 0) continue;
    const Val& val = c.vals[v];
    int64_t e = 0;
    if (__builtin_mul_overflow(sample_elements(shapes[v], val.blocked, lanes), batch, &e))
      throw ValueError("a batch of " + std::to_string(batch) + " needs more memory than fits in 64 bits");
    p->places[v].image_stride = sample_elements(shapes[v], val.blocked, lanes);
    if (static_cast<int>(v) == input_root) continue;
    buffers.push_back({static_cast<int>(v), blocked::round_up(e, 16), first[v], last[v]});
  }
  // the strided-input copy: a buffer of its own, live from the start
  Buffer input_copy{input_root, blocked::round_up(batch * p->places[static_cast<std::size_t>(input_root)].image_stride, 16),
                    0, last[static_cast<std::size_t>(input_root)]};
  buffers.push_back(input_copy);
  // first fit, largest first, among the buffers alive at the same time
  std::vector<std::size_t> order(buffers.size());
  for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) {
    return buffers[a].elements > buffers[b].elements;
  });
  std::vector<std::size_t> placed;
  int64_t top = 0;
  for (std::size_t i : order) {
    Buffer& b = buffers[i];
    std::vector<std::pair<int64_t, int64_t>> busy;
    for (std::size_t j : placed) {
      const Buffer& o = buffers[j];
      if (o.first <= b.last && b.first <= o.last) busy.emplace_back(o.offset, o.offset + o.elements);
    }
    std::sort(busy.begin(), busy.end());
    int64_t at = 0;
    for (const auto& r : busy) {
      if (at + b.elements <= r.first) break;
      at = std::max(at, r.second);
    }
    b.offset = at;
    top = std::max(top, at + b.elements);
    placed.push_back(i);
  }
  for (std::size_t i = 0; i + 1 < buffers.size(); ++i)
    p->places[static_cast<std::size_t>(buffers[i].val)].offset = buffers[i].offset;
  const int64_t input_copy_offset = buffers.back().offset;
  p->values_elements = top;
  // views and slices: their root's offset, the slice's first channel
  for (std::size_t v = 0; v < nv; ++v) {
    const int r = root(static_cast<int>(v));
    if (r == static_cast<int>(v)) continue;
    int64_t off = 0;
    int u = static_cast<int>(v);
    while (u != r) {
      const Val& val = c.vals[static_cast<std::size_t>(u)];
      if (val.alias >= 0) {
        const Shape& s = shapes[static_cast<std::size_t>(u)];
        off += val.channel0 * s[1] * s[2];
        u = val.alias;
      } else if (val.view >= 0) {
        u = val.view;
      } else {
        u = over[static_cast<std::size_t>(u)];
      }
    }
    p->places[v].offset = r == input_root ? -1 : p->places[static_cast<std::size_t>(r)].offset + off;
    if (c.vals[v].alias >= 0 || over[v] >= 0)
      p->places[v].image_stride = p->places[static_cast<std::size_t>(r)].image_stride;
  }
  p->places[static_cast<std::size_t>(input_root)].offset = -1;
  (void)input_copy_offset;
  // Threads per step: a parallel region costs a few microseconds, more than
  // a small step's work (LeNet-5's pooling, a squeeze-and-excitation's 1x1
  // convolutions on one position), which then runs on one thread.
  p->step_threads.assign(ns, threads);
  for (std::size_t i = 0; i < ns; ++i) {
    const Step& s = c.steps[i];
    const Shape& os = shapes[static_cast<std::size_t>(s.out)];
    int64_t work = batch * graph::numel(os);  // elements written
    int64_t grain = 32768;
    if (s.kind == Kind::Conv || s.kind == Kind::Winograd || s.kind == Kind::ConvPlain) {
      const Shape& xs = shapes[static_cast<std::size_t>(s.in[0])];
      work *= xs[0] / s.conv.groups * s.kh * s.kw;  // multiply-adds
      grain = 262144;
    } else if (s.kind == Kind::Depthwise) {
      work *= s.kh * s.kw;
      grain = 131072;
    } else if (s.kind == Kind::Linear) {
      work *= shapes[static_cast<std::size_t>(s.in[0])].back();  // multiply-adds
      grain = 262144;
    } else if (s.kind == Kind::GlobalPool) {
      work = batch * graph::numel(shapes[static_cast<std::size_t>(s.in[0])]);  // elements read
    }
    p->step_threads[i] = static_cast<int>(std::clamp<int64_t>(work / grain, 1, threads));
  }
  // scratch: the most any step needs
  for (std::size_t i = 0; i < ns; ++i) {
    const Step& s = c.steps[i];
    if (s.kind != Kind::Conv && s.kind != Kind::Winograd) continue;
    const Shape& xs = shapes[static_cast<std::size_t>(s.in[0])];
    const Shape& os = shapes[static_cast<std::size_t>(s.out)];
    blocked::Image in{nullptr, batch, xs[0], xs[1], xs[2], p->places[static_cast<std::size_t>(s.in[0])].image_stride,
                      c.vals[static_cast<std::size_t>(s.in[0])].blocked};
    blocked::Image out{nullptr, batch, os[0], os[1], os[2], 0, true};
    if (s.kind == Kind::Winograd) {
      p->winograd_plans[i] = blocked::plan_winograd(s.packed->winograd, in, out, threads);
      const auto& wp = p->winograd_plans[i];
      p->scratch_elements = std::max(p->scratch_elements, threads * (wp.v_floats + wp.m_floats));
      continue;
    }
    p->conv_plans[i] = blocked::plan_conv(s.packed->conv, s.conv, in, out, threads);
    const auto& cp = p->conv_plans[i];
    p->scratch_elements = std::max(p->scratch_elements, cp.frame_floats + threads * cp.tile_floats);
  }
  // the input copy lives past the values, with the scratch after it
  p->values_elements = top;
  Plan& ref = *p;
  c.plans[key] = std::move(p);
  return ref;
}

namespace {

// Plain-layout elementwise joins with numpy broadcasting of equal-rank shapes.
template <typename T, typename F>
void broadcast_binary(const T* a, const Shape& sa, const T* b, const Shape& sb, T* out,
                      const Shape& so, F&& f) {
  const std::size_t nd = so.size();
  int64_t stride_a[kMaxDims + 1], stride_b[kMaxDims + 1], idx[kMaxDims + 1] = {};
  int64_t ra = 1, rb = 1;
  for (std::size_t d = nd; d-- > 0;) {
    stride_a[d] = sa[d] == 1 ? 0 : ra;
    stride_b[d] = sb[d] == 1 ? 0 : rb;
    ra *= sa[d];
    rb *= sb[d];
  }
  const int64_t n = graph::numel(so);
  int64_t ia = 0, ib = 0;
  for (int64_t i = 0; i < n; ++i) {
    out[i] = f(a[ia], b[ib]);
    for (std::size_t d = nd; d-- > 0;) {
      ia += stride_a[d];
      ib += stride_b[d];
      if (++idx[d] < so[d]) break;
      ia -= stride_a[d] * so[d];
      ib -= stride_b[d] * so[d];
      idx[d] = 0;
    }
  }
}

template <typename T>
void activation_in_place(Act act, T* data, int64_t n) {
  if (act == Act::None || n == 0) return;
  const int64_t shape[1] = {n};
  const TensorView v = contiguous_view(data, dtype_of<T>(), 1, shape);
  if (act == Act::ReLU) return relu_forward(v, v);
  const Activation k = act == Act::ReLU6       ? Activation::ReLU6
                       : act == Act::Sigmoid   ? Activation::Sigmoid
                       : act == Act::SiLU      ? Activation::SiLU
                       : act == Act::Hardswish ? Activation::Hardswish
                                               : Activation::Hardsigmoid;
  activation_forward(k, v, v);
}

}  // namespace

void Engine::Impl::run_step(const Compiled& c, const Plan& p, const Step& s, char* arena,
                            const void* input) const {
  const std::size_t item = dtype_size(dtype);
  const int threads = p.step_threads[static_cast<std::size_t>(&s - c.steps.data())];
  auto data = [&](int v) -> void* {
    const Place& pl = p.places[static_cast<std::size_t>(v)];
    return pl.offset < 0 ? const_cast<void*>(input) : arena + static_cast<std::size_t>(pl.offset) * item;
  };
  auto shape_of = [&](int v) { return val_shape(c, c.steps, v); };
  auto image = [&](int v) {
    const Shape s = shape_of(v);
    const Val& val = c.vals[static_cast<std::size_t>(v)];
    blocked::Image im;
    im.data = static_cast<float*>(data(v));
    im.n = p.batch;
    im.c = s[0], im.h = s.size() > 1 ? s[1] : 1, im.w = s.size() > 2 ? s[2] : 1;
    im.image_stride = p.places[static_cast<std::size_t>(v)].image_stride;
    im.blocked = val.blocked;
    return im;
  };
  // a plain Val as a (contiguous) TensorView of its batched shape
  auto view = [&](int v) {
    Shape s = shape_of(v);
    s.insert(s.begin(), p.batch);
    return contiguous_view(data(v), dtype, static_cast<int>(s.size()), s.data());
  };
  auto numel = [&](int v) { return p.batch * graph::numel(shape_of(v)); };
  blocked::Epilogue e;
  e.act = s.act;
  if (!s.bias_blocked.empty()) e.bias = s.bias_blocked.data();
  if (s.residual >= 0) {
    e.residual = static_cast<const float*>(data(s.residual));
    e.residual_image_stride = p.places[static_cast<std::size_t>(s.residual)].image_stride;
  }
  auto finish_plain = [&]() {  // residual and activation after a plain step
    with_type(dtype, [&](auto zero) {
      using T = decltype(zero);
      T* y = static_cast<T*>(data(s.out));
      const int64_t n = numel(s.out);
      if (s.residual >= 0) {
        const T* r = static_cast<const T*>(data(s.residual));
        for (int64_t i = 0; i < n; ++i) y[i] += r[i];
      }
      activation_in_place<T>(s.act, y, n);
    });
  };
  switch (s.kind) {
    case Kind::Conv: {
      const std::size_t i = static_cast<std::size_t>(&s - c.steps.data());
      float* scratch = reinterpret_cast<float*>(arena + static_cast<std::size_t>(p.values_elements) * item);
      blocked::conv2d(image(s.in[0]), s.packed->conv, s.conv, p.conv_plans[i], e, image(s.out), scratch,
                      threads);
      return;
    }
    case Kind::Winograd: {
      const std::size_t i = static_cast<std::size_t>(&s - c.steps.data());
      float* scratch = reinterpret_cast<float*>(arena + static_cast<std::size_t>(p.values_elements) * item);
      blocked::winograd_conv2d(image(s.in[0]), s.packed->winograd, s.packed->winograd.u.data(), s.conv, p.winograd_plans[i], e,
                               image(s.out), scratch, threads);
      return;
    }
    case Kind::Depthwise:
      return blocked::depthwise_conv2d(image(s.in[0]), s.packed->depthwise.data(), s.kh, s.kw, s.conv, e,
                                       image(s.out), threads);
    case Kind::ConvPlain: {
      const TensorView b = s.bias.defined() ? s.bias.view() : TensorView();
      conv2d_forward(view(s.in[0]), s.weight.view(), s.bias.defined() ? &b : nullptr, s.conv,
                     view(s.out));
      return finish_plain();
    }
    case Kind::Pad:
      return pad2d_forward(view(s.in[0]), s.pad, view(s.out));
    case Kind::Linear: {
      const Shape xs = shape_of(s.in[0]);
      const int64_t rows = p.batch * graph::numel(xs) / xs.back();
      const int64_t in_shape[2] = {rows, xs.back()};
      const Tensor& weight = *s.node->tensor("weight");
      const Tensor* bias = s.node->tensor("bias");
      const int64_t out_shape[2] = {rows, weight.size(0)};
      const TensorView b = bias ? bias->view() : TensorView();
      linear_forward(contiguous_view(data(s.in[0]), dtype, 2, in_shape), weight.view(),
                     bias ? &b : nullptr, contiguous_view(data(s.out), dtype, 2, out_shape));
      return finish_plain();
    }
    case Kind::Affine:
    case Kind::Act: {
      if (c.vals[static_cast<std::size_t>(s.out)].blocked)
        return blocked::affine(image(s.in[0]), s.scale_blocked.empty() ? nullptr : s.scale_blocked.data(),
                               s.bias_blocked.empty() ? nullptr : s.bias_blocked.data(), s.act,
                               image(s.out), threads);
      with_type(dtype, [&](auto zero) {
        using T = decltype(zero);
        const T* x = static_cast<const T*>(data(s.in[0]));
        T* y = static_cast<T*>(data(s.out));
        const Shape xs = shape_of(s.in[0]);
        const int64_t ch = xs[0], per = graph::numel(xs) / ch;
        if (s.kind == Kind::Act) {
          std::memcpy(y, x, static_cast<std::size_t>(numel(s.in[0])) * sizeof(T));
        } else {
          const T* m = s.weight.data_as<T>();
          const T* k = s.bias.data_as<T>();
          for (int64_t n = 0; n < p.batch; ++n)
            for (int64_t q = 0; q < ch; ++q)
              for (int64_t j = 0; j < per; ++j) {
                const int64_t i = (n * ch + q) * per + j;
                y[i] = x[i] * m[q] + k[q];
              }
        }
        activation_in_place<T>(s.act, y, numel(s.out));
      });
      return;
    }
    case Kind::BatchNormBatch: {
      const Node& n = *s.node;
      const int64_t ch = n.bn.channels;
      Tensor m(dtype, {ch}), v(dtype, {ch});
      const TensorView wv = n.bn.affine ? n.tensor("weight")->view() : TensorView();
      const bool shift = n.bn.affine && n.bn.bias;
      const TensorView bv = shift ? n.tensor("bias")->view() : TensorView();
      batch_norm_forward(view(s.in[0]), n.bn.affine ? &wv : nullptr, shift ? &bv : nullptr,
                         true, n.bn.eps, m.view(), v.view(), view(s.out));
      return finish_plain();
    }
    case Kind::MaxPool:
      if (c.vals[static_cast<std::size_t>(s.out)].blocked)
        return blocked::max_pool2d(image(s.in[0]), s.node->pool, image(s.out), threads);
      return max_pool2d_forward(view(s.in[0]), s.node->pool, view(s.out), nullptr);
    case Kind::AvgPool:
      if (c.vals[static_cast<std::size_t>(s.out)].blocked)
        return blocked::avg_pool2d(image(s.in[0]), s.node->pool, image(s.out), threads);
      return avg_pool2d_forward(view(s.in[0]), s.node->pool, view(s.out));
    case Kind::GlobalPool:
      if (c.vals[static_cast<std::size_t>(s.out)].blocked)
        return blocked::global_avg_pool(image(s.in[0]), image(s.out), threads);
      return adaptive_avg_pool2d_forward(view(s.in[0]), view(s.out));
    case Kind::AdaptivePool:
      return adaptive_avg_pool2d_forward(view(s.in[0]), view(s.out));
    case Kind::LRN:
      return local_response_norm_forward(view(s.in[0]), s.node->lrn, view(s.out));
    case Kind::Softmax:  // dim counts the batch dimension, as the view's shape does
      return softmax_forward(view(s.in[0]), s.node->softmax_dim, view(s.out));
    case Kind::Add:
    case Kind::Mul: {
      if (c.vals[static_cast<std::size_t>(s.out)].blocked) {
        if (s.kind == Kind::Mul) return blocked::mul(image(s.in[0]), image(s.in[1]), image(s.out), threads);
        std::vector<blocked::Image> in;
        for (int v : s.in) in.push_back(image(v));
        return blocked::add(in, s.act, image(s.out), threads);
      }
      with_type(dtype, [&](auto zero) {
        using T = decltype(zero);
        Shape so = shape_of(s.out);
        so.insert(so.begin(), p.batch);
        Shape sa = shape_of(s.in[0]);
        sa.insert(sa.begin(), p.batch);
        T* y = static_cast<T*>(data(s.out));
        for (std::size_t k = 1; k < s.in.size(); ++k) {
          Shape sb = shape_of(s.in[k]);
          sb.insert(sb.begin(), p.batch);
          const T* a = k == 1 ? static_cast<const T*>(data(s.in[0])) : y;
          const T* b = static_cast<const T*>(data(s.in[k]));
          if (s.kind == Kind::Add)
            broadcast_binary<T>(a, k == 1 ? sa : so, b, sb, y, so, [](T u, T w) { return u + w; });
          else
            broadcast_binary<T>(a, k == 1 ? sa : so, b, sb, y, so, [](T u, T w) { return u * w; });
        }
        activation_in_place<T>(s.act, y, numel(s.out));
      });
      return;
    }
    case Kind::Concat: {
      if (c.vals[static_cast<std::size_t>(s.out)].blocked) {
        const int64_t B = lanes;
        const blocked::Image y = image(s.out);
        int64_t ch = 0;
        bool by_lane = false;
        for (std::size_t k = 0; k < s.in.size(); ++k) {
          blocked::Image x = image(s.in[k]);
          if (!s.copy_input[k]) {  // written in place
          } else if (ch % B == 0 && (x.c % B == 0 || k + 1 == s.in.size())) {
            blocked::Image slice = y;  // whole blocks
            slice.data += ch * x.h * x.w;
            slice.c = x.c;
            blocked::copy(x, slice, threads);
          } else {  // a branch that starts or ends inside a block
            blocked::copy_channels(x, y, ch, threads);
            by_lane = true;
          }
          ch += x.c;
        }
        if (by_lane) blocked::clear_pad_lanes(y, threads);
        return;
      }
      const int64_t out_sample = graph::numel(shape_of(s.out)) * static_cast<int64_t>(item);
      int64_t offset = 0;
      for (int v : s.in) {
        const int64_t sample = graph::numel(shape_of(v)) * static_cast<int64_t>(item);
        const char* src = static_cast<const char*>(data(v));
        char* dst = static_cast<char*>(data(s.out));
        for (int64_t n = 0; n < p.batch; ++n)
          std::memcpy(dst + n * out_sample + offset, src + n * sample, static_cast<std::size_t>(sample));
        offset += sample;
      }
      return;
    }
    case Kind::ToBlocked:
      return blocked::to_blocked(image(s.in[0]), image(s.out), threads);
    case Kind::ToPlain:
      return blocked::to_plain(image(s.in[0]), image(s.out), threads);
  }
}

void Engine::Impl::run(const Compiled& c, const Plan& p, const TensorView& input, char* arena,
                       char* output, std::vector<double>* times) const {
  const void* in = input.data;
  for (std::size_t i = 0; i < c.steps.size(); ++i) {
    const Step& s = c.steps[i];
    const auto t0 = std::chrono::steady_clock::now();
    // eager ops inside a step (linear, plain convolution, padding) take the
    // step's threads, not the process-wide count
    const detail::ThreadsOverride threads(p.step_threads[i]);
    try {
      run_step(c, p, s, arena, in);
    } catch (const ValueError& e) {
      throw ValueError((s.node ? s.node->context(g.values) : std::string()) + e.what());
    } catch (const TypeError& e) {
      throw TypeError((s.node ? s.node->context(g.values) : std::string()) + e.what());
    }
    if (times)
      (*times)[i] += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  }
  const Place& out = p.places[static_cast<std::size_t>(c.output_val)];
  const std::size_t bytes = static_cast<std::size_t>(
      p.batch * graph::numel(val_shape(c, c.steps, c.output_val))) * dtype_size(dtype);
  if (bytes)
    std::memcpy(output, out.offset < 0 ? in : arena + static_cast<std::size_t>(out.offset) * dtype_size(dtype), bytes);
}

// Images per pass over the steps. A batch whose largest step (its inputs and
// output) overflows kChunkBytes runs in chunks that fit, so that a step's
// output is still in cache when the next reads it, instead of going through
// memory; each chunk reads the weights again, so chunks are taken only when
// those extra reads are fewer bytes than the activations written, and never
// when a step normalises with the batch's own statistics. The
// choice depends on the model and the batch alone (not on the threads or
// the machine), so results stay the same for any thread count.
int64_t Engine::Impl::chunk_images(Compiled& c, int64_t batch) const {
  constexpr int64_t kChunkBytes = int64_t(16) << 20;  // half an L3 of 32 MB
  if (batch <= 1) return batch;
  Compiled::ChunkSizes& z = c.chunk_sizes;
  if (z.step < 0) {
    z.step = 0;
    for (const Step& s : c.steps) {
      z.couples_images = z.couples_images || s.kind == Kind::BatchNormBatch;
      int64_t elements = graph::numel(val_shape(c, c.steps, s.out));
      z.activations += elements;
      for (int v : s.in) elements += graph::numel(val_shape(c, c.steps, v));
      z.step = std::max(z.step, elements);
      z.weights += (s.weight.defined() ? s.weight.numel() : 0) + (s.packed ? s.packed->floats() : 0);
      if (s.kind == Kind::Linear && s.node) {
        const Tensor* w = s.node->tensor("weight");
        if (w) z.weights += w->numel(), z.linear_weights += w->numel();
      }
    }
  }
  if (z.couples_images) return batch;  // the statistics are the whole batch's
  const int64_t per_image = std::max<int64_t>(1, z.step * static_cast<int64_t>(dtype_size(dtype)));
  if (per_image * batch <= kChunkBytes) return batch;
  const int64_t k = std::max<int64_t>(1, kChunkBytes / per_image);
  if (k >= batch) return batch;
  const int64_t extra_reads = (batch + k - 1) / k - 1;
  if (extra_reads * z.weights > z.activations * batch) return batch;
  return k;
}

// Chunks run side by side, one per thread, each on one thread: a chunk's
// steps are small, and on a shared team each of them paid a wake-up and a
// barrier (MobileNet-V2 at batch 16 ran hardly faster on 2 threads than on
// 1). Each thread's chunk gets a 1/threads share of the chunk budget, and
// the chunks are evened out to a multiple of the threads. Results do not
// change: an image's values are the same in any chunk and on any number of
// threads. Profiling keeps one chunk at a time (its step times add up).
Engine::Impl::Chunking Engine::Impl::chunking(Compiled& c, int64_t batch, bool profiling) const {
  Chunking how;
  const int threads = this->threads();
  how.images = chunk_images(c, batch);
  how.step_threads = threads;
  if (profiling || threads <= 1 || batch < threads || c.chunk_sizes.couples_images) return how;
  if (how.images >= batch) {
    // An unchunked batch too, one share per thread, unless its linear
    // layers' weights are large against the activations: each thread
    // streams those from memory again, where a convolution's stay in cache
    // (VGG-16's and AlexNet's classifiers ran slower side by side). Weights
    // that fit a core's L2 cache are read from there, not streamed.
    constexpr int64_t kCachedWeightBytes = int64_t(512) << 10;
    const Compiled::ChunkSizes& z = c.chunk_sizes;
    if (z.linear_weights * static_cast<int64_t>(dtype_size(dtype)) > kCachedWeightBytes &&
        8 * (threads - 1) * z.linear_weights > z.activations * batch)
      return how;
  }
  const int64_t share = std::max<int64_t>(1, how.images / threads);
  const int64_t chunks = (batch + share - 1) / share;
  const int64_t even = (chunks + threads - 1) / threads * threads;
  how.images = (batch + even - 1) / even;
  how.team = threads;
  how.step_threads = 1;
  return how;
}

Tensor Engine::Impl::run_chunks(const TensorView& input, std::vector<double>* times) const {
  const Shape sample(input.shape + 1, input.shape + input.ndim);
  std::unique_lock<std::mutex> lock(mutex);
  Compiled& c = compile(sample, input.shape[0]);
  Shape out_shape = c.shapes[static_cast<std::size_t>(c.vals[static_cast<std::size_t>(c.output_val)].gv)];
  out_shape.insert(out_shape.begin(), input.shape[0]);
  Tensor result = Tensor::empty(dtype, out_shape);
  const int64_t batch = input.shape[0];
  if (batch == 0) return result;  // an empty batch: nothing to compute
  const Chunking how = chunking(c, batch, times != nullptr);
  const int64_t k = how.images;
  const int team = how.team;
  const int step_threads = how.step_threads;
  // the plans of a whole chunk and of the last, shorter one
  const Plan* plans[2] = {&plan(c, k, step_threads),
                          batch % k ? &plan(c, batch % k, step_threads) : nullptr};
  const int64_t sample_elements = graph::numel(sample);
  int64_t work = 0;
  for (const Plan* p : plans)
    if (p) work = std::max(work, p->values_elements + p->scratch_elements);
  const int64_t need = work * team + (input.is_contiguous() ? 0 : batch * sample_elements);
  Tensor arena;
  for (std::size_t i = 0; i < arenas.size(); ++i)
    if (arenas[i].numel() >= need) {
      arena = std::move(arenas[i]);
      arenas.erase(arenas.begin() + static_cast<std::ptrdiff_t>(i));
      break;
    }
  lock.unlock();
  if (!arena.defined()) arena = Tensor::empty(dtype, {std::max<int64_t>(need, 1)});
  const std::size_t item = dtype_size(dtype);
  char* x = static_cast<char*>(input.data);
  if (!input.is_contiguous()) {  // copied into the arena, past everything else
    char* dst = static_cast<char*>(arena.data()) + static_cast<std::size_t>(work * team) * item;
    Tensor copy = Tensor::from_view(input);
    std::memcpy(dst, copy.data(), copy.nbytes());
    x = dst;
  }
  const int64_t out_elements = result.numel() / batch;
  const int64_t chunks = (batch + k - 1) / k;
  auto run_chunk = [&](int64_t i, char* chunk_arena) {
    const int64_t n0 = i * k, nk = std::min(k, batch - n0);
    const Plan& p = nk == k ? *plans[0] : *plans[1];
    Shape chunk_shape(input.shape, input.shape + input.ndim);
    chunk_shape[0] = nk;
    run(c, p,
        contiguous_view(x + static_cast<std::size_t>(n0 * sample_elements) * item, dtype,
                        input.ndim, chunk_shape.data()),
        chunk_arena,
        static_cast<char*>(result.data()) + static_cast<std::size_t>(n0 * out_elements) * item,
        times);
  };
  std::exception_ptr error;
  if (team == 1) {
    try {
      for (int64_t i = 0; i < chunks; ++i) run_chunk(i, static_cast<char*>(arena.data()));
    } catch (...) {
      error = std::current_exception();
    }
  } else {
    std::mutex error_mutex;
#pragma omp parallel num_threads(team)
    {
      char* own = static_cast<char*>(arena.data()) +
                  static_cast<std::size_t>(omp_get_thread_num() * work) * item;
#pragma omp for schedule(dynamic, 1)
      for (int64_t i = 0; i < chunks; ++i) {
        try {  // an exception may not leave the parallel region
          run_chunk(i, own);
        } catch (...) {
          std::lock_guard<std::mutex> guard(error_mutex);
          if (!error) error = std::current_exception();
        }
      }
    }
  }
  lock.lock();
  arenas.push_back(std::move(arena));
  if (error) std::rethrow_exception(error);
  return result;
}

// --------------------------------------------------------------- Engine

Engine::Engine(graph::Graph g, DType dtype, Options options) : impl_(std::make_unique<Impl>()) {
  impl_->g = std::move(g);
  impl_->dtype = dtype;
  impl_->options = options;
  impl_->lanes = blocked::block();
}
Engine::~Engine() = default;
Engine::Engine(Engine&&) noexcept = default;
Engine& Engine::operator=(Engine&&) noexcept = default;

const graph::Graph& Engine::graph() const { return impl_->g; }
DType Engine::dtype() const { return impl_->dtype; }
int Engine::threads() const { return impl_->threads(); }

void Engine::set_reload(std::function<void(graph::Node&)> reload) {
  std::lock_guard<std::mutex> lock(impl_->mutex);
  impl_->reload = std::move(reload);
}

void Engine::prepare(const Shape& sample) {
  std::lock_guard<std::mutex> lock(impl_->mutex);
  impl_->compile(sample, 1);
  // Compiling freed the copies it packed (and the graph's weights, from a
  // file); give the heap's free pages back, so they do not stay resident.
  return_free_heap_pages();
}
void Engine::set_threads(int threads) {
  if (threads < 0) throw ValueError("threads must be >= 0 (0: the core's count), got " + std::to_string(threads));
  std::lock_guard<std::mutex> lock(impl_->mutex);
  impl_->options.threads = threads;
}

namespace {

std::string layout_name(const Compiled& c, const Step& s, int lanes) {
  const Val& in = c.vals[static_cast<std::size_t>(s.in[0])];
  const Val& out = c.vals[static_cast<std::size_t>(s.out)];
  const std::string b = "blocked" + std::to_string(lanes);
  std::string layout = in.blocked ? b : std::string("plain");
  if (in.blocked != out.blocked) layout += std::string("->") + (out.blocked ? b : "plain");
  return layout;
}

Shape sample_of(const TensorView& input) {
  return Shape(input.shape + 1, input.shape + input.ndim);
}

}  // namespace

std::vector<StepInfo> Engine::profile(const TensorView& input, int runs) const {
  const Impl& m = *impl_;
  if (input.ndim < 1 || input.shape[0] < 1) throw ValueError("profile needs a batch of at least one");
  forward(input);  // compiles, plans and warms up
  const Tensor x = Tensor::from_view(input);
  std::vector<double> times;
  {
    std::lock_guard<std::mutex> lock(m.mutex);
    times.assign(m.compile(sample_of(input), input.shape[0]).steps.size(), 0.0);
  }
  for (int r = 0; r < runs; ++r) m.run_chunks(x.view(), &times);
  std::lock_guard<std::mutex> lock(m.mutex);
  const Compiled& c = m.compile(sample_of(input), input.shape[0]);
  std::vector<StepInfo> rows;
  for (std::size_t i = 0; i < c.steps.size(); ++i) {
    const Step& s = c.steps[i];
    Shape shape = val_shape(c, c.steps, s.out);
    shape.insert(shape.begin(), input.shape[0]);
    rows.push_back({s.label, kind_name(s.kind), layout_name(c, s, m.lanes), shape, times[i]});
  }
  return rows;
}

Tensor Engine::forward(const TensorView& input) const {
  const Impl& m = *impl_;
  if (input.ndim < 1) throw ValueError("input must be a batch (N, ...), got a scalar");
  if (input.dtype != m.dtype)
    throw TypeError(std::string("input has dtype ") + dtype_name(input.dtype) + " but the net is " +
                    dtype_name(m.dtype) + " (convert the input)");
  return m.run_chunks(input, nullptr);
}

std::string Engine::summary(const Shape& sample, int64_t batch) const {
  const Impl& m = *impl_;
  std::lock_guard<std::mutex> lock(m.mutex);
  Compiled& c = m.compile(sample, batch);
  const Impl::Chunking how = m.chunking(c, batch, false);
  const int64_t k = how.images;
  Plan& p = m.plan(c, k, how.step_threads);
  std::ostringstream os;
  const std::size_t item = dtype_size(m.dtype);
  os << "compiled: " << c.steps.size() << " steps, " << c.folded << " batch norms folded, "
     << c.fused << " adds and activations fused, " << c.shared
     << " repeated activations and pools shared, " << c.in_place
     << " concatenation inputs written in place; arena "
     << how.team * (p.values_elements + p.scratch_elements) * static_cast<int64_t>(item)
     << " bytes for a batch of " << batch
     << (k < batch ? " in chunks of " + std::to_string(k) + (k == 1 ? " image" : " images")
                   : std::string())
     << (how.team > 1 ? ", " + std::to_string(how.team) + " side by side" : std::string())
     << " (values " << how.team * p.values_elements * static_cast<int64_t>(item) << ", scratch "
     << how.team * p.scratch_elements * static_cast<int64_t>(item) << "), " << m.threads()
     << " threads\n";
  std::size_t wl = 4;
  for (const auto& s : c.steps) wl = std::max(wl, s.label.size());
  os << std::left << std::setw(static_cast<int>(wl)) << "step" << "  " << std::setw(12) << "kind"
     << "  " << std::setw(18) << "layout" << "  " << std::setw(22) << "output" << "  threads\n";
  for (std::size_t i = 0; i < c.steps.size(); ++i) {
    const Step& s = c.steps[i];
    const std::string layout = layout_name(c, s, m.lanes);
    Shape shape = val_shape(c, c.steps, s.out);
    shape.insert(shape.begin(), batch);
    os << std::left << std::setw(static_cast<int>(wl)) << s.label << "  " << std::setw(12)
       << kind_name(s.kind) << "  " << std::setw(18) << layout << "  " << std::setw(22)
       << shape_str(shape) << "  " << p.step_threads[i] << "\n";
  }
  return os.str();
}

int64_t Engine::arena_bytes(const Shape& sample, int64_t batch) const {
  const Impl& m = *impl_;
  std::lock_guard<std::mutex> lock(m.mutex);
  Compiled& c = m.compile(sample, batch);
  const Impl::Chunking how = m.chunking(c, batch, false);
  Plan& p = m.plan(c, how.images, how.step_threads);
  return how.team * (p.values_elements + p.scratch_elements) *
         static_cast<int64_t>(dtype_size(m.dtype));
}

}  // namespace engine
}  // namespace convcore
