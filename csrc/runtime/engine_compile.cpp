// The compiled engine's first half (engine.h, engine_internal.h): a graph
// for one sample shape -> identities removed, batch norms folded,
// residual adds and activations fused -> steps over values in a layout,
// with their weights packed.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>

#include "convcore/errors.h"
#include "engine_internal.h"

#if defined(__GLIBC__)
#include <malloc.h>
#endif

namespace convcore {
namespace engine {

void return_free_heap_pages() {
#if defined(__GLIBC__)
  malloc_trim(0);
#endif
}

namespace {

// A convolution's weights and bias (copies), with the batch norm folded into
// them when f folds one: w' = w * s, b' = (b - mean) * s + beta, s = gamma /
// sqrt(var + eps), in double. Made one layer at a time, just before its
// packing: copies of every layer at once were a transient second copy of
// the net (ResNet-34's setup peak).
// With take, the graph's weight moves out instead (a file's, read again
// when needed).
void conv_weights(const FusedOp& f, bool take, Tensor& weight, Tensor& bias) {
  const Node& conv = *f.node;
  if (take)
    weight = std::move(*const_cast<Tensor*>(conv.tensor("weight")));
  else
    weight = *conv.tensor("weight");
  bias = conv.tensor("bias") ? *conv.tensor("bias") : Tensor();
  if (!f.bn) return;
  const Node& bn = *f.bn;
  const Tensor* gamma = bn.tensor("weight");
  const Tensor* beta = bn.tensor("bias");
  const Tensor& mean = *bn.tensor("running_mean");
  const Tensor& var = *bn.tensor("running_var");
  const int64_t cout = weight.size(0), per = weight.numel() / cout;
  const DType dt = weight.dtype();
  Tensor m64 = mean.to(DType::Float64), v64 = var.to(DType::Float64);
  Tensor g64 = gamma ? gamma->to(DType::Float64) : Tensor();
  Tensor be64 = beta ? beta->to(DType::Float64) : Tensor();
  Tensor b64 = bias.defined() ? bias.to(DType::Float64) : Tensor(DType::Float64, {cout});
  double* b = b64.data_as<double>();
  // the weights scaled in place, each product in double (no double copy of
  // a large layer)
  auto scale_rows = [&](auto* w) {
    for (int64_t o = 0; o < cout; ++o) {
      const double sc = (gamma ? g64.data_as<double>()[o] : 1.0) /
                        std::sqrt(v64.data_as<double>()[o] + bn.bn.eps);
      for (int64_t k = 0; k < per; ++k)
        w[o * per + k] = static_cast<std::remove_reference_t<decltype(*w)>>(w[o * per + k] * sc);
      b[o] = (b[o] - m64.data_as<double>()[o]) * sc + (beta ? be64.data_as<double>()[o] : 0.0);
    }
  };
  if (dt == DType::Float64)
    scale_rows(weight.data_as<double>());
  else
    scale_rows(weight.data_as<float>());
  bias = b64.to(dt);
}

// A BatchNorm2d in evaluation mode as scale and shift per channel.
void batch_norm_affine(FusedOp& f, DType dt) {
  const Node& bn = *f.node;
  const int64_t c = bn.bn.channels;
  Tensor scale(DType::Float64, {c}), shift(DType::Float64, {c});
  const Tensor* gamma = bn.tensor("weight");
  const Tensor* beta = bn.tensor("bias");
  Tensor m = bn.tensor("running_mean")->to(DType::Float64);
  Tensor v = bn.tensor("running_var")->to(DType::Float64);
  Tensor g = gamma ? gamma->to(DType::Float64) : Tensor();
  Tensor be = beta ? beta->to(DType::Float64) : Tensor();
  for (int64_t i = 0; i < c; ++i) {
    const double s = (gamma ? g.data_as<double>()[i] : 1.0) /
                     std::sqrt(v.data_as<double>()[i] + bn.bn.eps);
    scale.data_as<double>()[i] = s;
    shift.data_as<double>()[i] =
        (beta ? be.data_as<double>()[i] : 0.0) - m.data_as<double>()[i] * s;
  }
  f.weight = scale.to(dt);
  f.bias = shift.to(dt);
}

std::string node_label(const Node& n, const std::vector<std::string>& values) {
  return n.name.empty() ? values[static_cast<std::size_t>(n.output)] + " (" + n.type + ")"
                        : n.name;
}

// The Winograd variant for a convolution in the blocked layout, 0 for the
// direct kernel: F(m x m, 3x3) needs a 3x3, stride-1, undilated kernel, and
// pays where the images hold enough tiles and the channels are many (the
// transforms are memory passes over the channels; measured in
// docs/engine.md). Outputs of 2x2 to 7x7 (16 tiles an image or fewer)
// take F(2x2) only in a wide batch: with few images its transformed
// filters, 16/9 of the weights, are streamed from memory for a few tiles
// each (ResNet-34 at 96x96, its last stage at 3x3: batch 1 1.19 -> 0.98x
// ONNX Runtime with F(2x2) there, batch 16 1.12 -> 1.54).
int winograd_m(const graph::ConvAttrs& a, const Shape& out, bool wide_batch) {
  if (a.kh != 3 || a.kw != 3 || a.p.stride_h != 1 || a.p.stride_w != 1 || a.p.dilation_h != 1 ||
      a.p.dilation_w != 1 || a.p.groups != 1 || a.in < 32 || a.out < 32)
    return 0;
  const int64_t side = std::min(out[1], out[2]);
  if (side >= 28) return 4;  // F(4x4): fewest products, ragged tiles rare
  if (side >= 8) return 2;   // F(2x2): 4x4 tiles waste less of a small image
  if (side >= 2 && wide_batch) return 2;
  return 0;
}

// Whether some convolution's algorithm depends on the batch (winograd_m):
// only such a net is compiled once per batch class.
bool depends_on_batch(const graph::Graph& g, const std::vector<Shape>& shapes) {
  for (const Node& n : g.nodes) {
    if (n.op != Op::Conv2d) continue;
    const Shape& out = shapes[static_cast<std::size_t>(n.output)];
    if (out.size() == 3 && winograd_m(n.conv, out, false) != winograd_m(n.conv, out, true))
      return true;
  }
  return false;
}

std::vector<float> padded_floats(const Tensor& t, int64_t n_padded) {
  std::vector<float> v(static_cast<std::size_t>(n_padded), 0.0f);
  if (t.defined()) std::memcpy(v.data(), t.data_as<float>(), static_cast<std::size_t>(t.numel()) * 4);
  return v;
}

}  // namespace

std::vector<FusedOp> Engine::Impl::fuse(const std::vector<Shape>& shapes, Compiled& c) const {
  const auto needed = graph::needed_nodes(g);
  // identities removed: each value read through its representative
  std::vector<int> rep(g.values.size());
  for (std::size_t v = 0; v < rep.size(); ++v) rep[v] = static_cast<int>(v);
  std::vector<FusedOp> ops;
  std::vector<int> producer(g.values.size(), -1);  // op index
  // Repeated computations: an activation or pooling of a value that an
  // earlier node computes alike (NASNet's branches each apply their own
  // ReLU to a cell's input) is read from that node's output instead.
  std::map<std::pair<Op, int>, std::vector<std::size_t>> computes;  // (op, input): ops
  auto same = [](const Node& a, const Node& b) {
    if (is_activation(a.op)) return a.activation == b.activation;
    const Pool2dParams &p = a.pool, &q = b.pool;
    return p.kernel_h == q.kernel_h && p.kernel_w == q.kernel_w && p.stride_h == q.stride_h &&
           p.stride_w == q.stride_w && p.pad_h == q.pad_h && p.pad_w == q.pad_w &&
           p.dilation_h == q.dilation_h && p.dilation_w == q.dilation_w &&
           p.ceil_mode == q.ceil_mode && p.count_include_pad == q.count_include_pad &&
           p.divisor_override == q.divisor_override;
  };
  for (std::size_t i = 0; i < g.nodes.size(); ++i) {
    if (!needed[i]) continue;
    const Node& n = g.nodes[i];
    if (n.op == Op::Identity) {
      rep[static_cast<std::size_t>(n.output)] = rep[static_cast<std::size_t>(n.inputs[0])];
      continue;
    }
    FusedOp f;
    f.op = n.op;
    f.node = &n;
    f.out = n.output;
    for (int v : n.inputs) f.in.push_back(rep[static_cast<std::size_t>(v)]);
    const bool repeatable = options.fuse && n.inputs.size() == 1 &&
                            (is_activation(n.op) || n.op == Op::MaxPool2d || n.op == Op::AvgPool2d);
    if (repeatable) {
      auto& earlier = computes[{n.op, f.in[0]}];
      const auto it = std::find_if(earlier.begin(), earlier.end(),
                                   [&](std::size_t e) { return same(*ops[e].node, n); });
      if (it != earlier.end()) {
        rep[static_cast<std::size_t>(n.output)] = ops[*it].out;
        ++c.shared;
        continue;
      }
      earlier.push_back(ops.size());
    }
    f.label = node_label(n, g.values);
    producer[static_cast<std::size_t>(n.output)] = static_cast<int>(ops.size());
    ops.push_back(std::move(f));
  }
  const int output = rep[static_cast<std::size_t>(g.outputs[0])];
  c.output_val = output;
  auto uses = [&](int v) {
    int u = v == output;
    for (const auto& f : ops)
      if (!f.dead) {
        u += static_cast<int>(std::count(f.in.begin(), f.in.end(), v));
        u += f.residual == v;
      }
    return u;
  };
  // the op that defines v, when it is a single-use output that can be fused into
  auto fusable = [&](int v) -> FusedOp* {
    const int p = producer[static_cast<std::size_t>(v)];
    if (p < 0 || ops[static_cast<std::size_t>(p)].dead || uses(v) != 1) return nullptr;
    return &ops[static_cast<std::size_t>(p)];
  };
  auto replace = [&](FusedOp& into, FusedOp& gone) {  // `into` now defines gone's output
    into.out = gone.out;
    producer[static_cast<std::size_t>(gone.out)] =
        producer[static_cast<std::size_t>(into.in.empty() ? gone.out : gone.in[0])];
    gone.dead = true;
  };
  if (options.fuse) {
    for (auto& f : ops) {  // batch norms into the convolution or linear layer before them
      if (f.dead || f.op != Op::BatchNorm2d || !f.node->bn.track) continue;
      FusedOp* p = fusable(f.in[0]);
      if (!p || (p->op != Op::Conv2d) || p->act != Act::None || p->residual >= 0) continue;
      p->bn = f.node;  // folded into its weights when they are packed (lower)
      p->label += " + " + f.label;
      const int idx = producer[static_cast<std::size_t>(f.in[0])];
      p->out = f.out;
      producer[static_cast<std::size_t>(f.out)] = idx;
      f.dead = true;
      ++c.folded;
    }
    for (std::size_t i = 0; i < ops.size(); ++i) {  // residual adds into a convolution
      FusedOp& f = ops[i];
      if (f.dead || f.op != Op::Add || f.in.size() != 2 || f.in[0] == f.in[1]) continue;
      // the later-computed input's convolution adds the other (already computed) one
      const int pa = producer[static_cast<std::size_t>(f.in[0])];
      const int pb = producer[static_cast<std::size_t>(f.in[1])];
      const int k = pa > pb ? 0 : 1;
      FusedOp* p = fusable(f.in[static_cast<std::size_t>(k)]);
      const int other = f.in[static_cast<std::size_t>(1 - k)];
      if (!p || p->op != Op::Conv2d || p->node->conv.p.groups != 1 || p->act != Act::None ||
          p->residual >= 0 ||
          shapes[static_cast<std::size_t>(other)] != shapes[static_cast<std::size_t>(f.out)] ||
          shapes[static_cast<std::size_t>(p->out)] != shapes[static_cast<std::size_t>(f.out)])
        continue;
      p->residual = other;
      p->label += " + add";
      const int idx = producer[static_cast<std::size_t>(p->out)];
      p->out = f.out;
      producer[static_cast<std::size_t>(f.out)] = idx;
      f.dead = true;
      ++c.fused;
    }
    for (auto& f : ops) {  // activations into the step that computes their input
      if (f.dead || !is_activation(f.op)) continue;
      FusedOp* p = fusable(f.in[0]);
      if (!p || p->act != Act::None) continue;
      const bool takes = p->op == Op::Conv2d || p->op == Op::Linear || p->op == Op::Add ||
                         (p->op == Op::BatchNorm2d && p->node->bn.track);
      if (!takes) continue;
      p->act = act_of(f.op);
      p->label += " + " + f.node->type;
      const int idx = producer[static_cast<std::size_t>(p->out)];
      p->out = f.out;
      producer[static_cast<std::size_t>(f.out)] = idx;
      f.dead = true;
      ++c.fused;
    }
  }
  (void)replace;
  std::vector<FusedOp> live;
  for (auto& f : ops)
    if (!f.dead) live.push_back(std::move(f));
  return live;
}

void Engine::Impl::lower(std::vector<FusedOp>& ops, Compiled& c) const {
  std::size_t freed_bytes = 0;  // graph weights released since the last trim
  const bool blk = use_blocked();
  const int B = lanes;
  std::map<std::pair<int, bool>, int> val_of;  // (graph value, blocked) -> Val
  auto new_val = [&](int gv, bool is_blocked) {
    c.vals.push_back({gv, is_blocked});
    const int id = static_cast<int>(c.vals.size() - 1);
    val_of[{gv, is_blocked}] = id;
    return id;
  };
  auto has = [&](int gv, bool is_blocked) { return val_of.count({gv, is_blocked}) > 0; };
  auto is4d = [&](int gv) { return c.shapes[static_cast<std::size_t>(gv)].size() == 3; };
  // The Val of gv in a layout, reordered from the other one when needed.
  auto want = [&](int gv, bool is_blocked) {
    auto it = val_of.find({gv, is_blocked});
    if (it != val_of.end()) return it->second;
    auto other = val_of.find({gv, !is_blocked});
    if (other == val_of.end()) throw Error("engine: value " + g.values[static_cast<std::size_t>(gv)] +
                                           " used before it is computed");
    Step s;
    s.kind = is_blocked ? Kind::ToBlocked : Kind::ToPlain;
    s.in = {other->second};
    s.out = new_val(gv, is_blocked);
    s.label = g.values[static_cast<std::size_t>(gv)] + (is_blocked ? " -> blocked" : " -> plain");
    c.steps.push_back(std::move(s));
    return c.steps.back().out;
  };
  c.input_val = new_val(0, false);
  for (auto& f : ops) {
    Step s;
    s.node = f.node;
    s.label = f.label;
    s.act = f.act;
    const Node& n = *f.node;
    const int x = f.in[0];
    // layout-agnostic steps run in the layout their inputs already have
    const bool x_blocked = blk && is4d(x) && has(x, true);
    switch (f.op) {
      case Op::Conv2d: {
        const auto& a = n.conv;
        s.conv = a.p;
        s.kh = a.kh, s.kw = a.kw;
        // the graph's copy of the weights, read again if given up after an
        // earlier compile
        auto weights = [&]() {
          const Tensor* w = n.tensor("weight");
          if (reload && (w == nullptr || !w->defined())) reload(const_cast<Node&>(n));
          conv_weights(f, reload != nullptr, s.weight, s.bias);
        };
        const bool depthwise = a.p.groups == a.in && a.in == a.out;
        // Groups of a few channels (ResNeXt's) run plane by plane in the
        // plain layout (the eager op's 'grouped' algorithm): the blocked
        // kernels put a group's few output channels in a vector's lanes.
        const bool few_per_group = !depthwise && a.p.groups > 1 && a.in / a.p.groups <= 8 &&
                                   a.out / a.p.groups <= 8;
        if (blk && a.mode == PadMode::Zeros && !few_per_group) {
          // the algorithm, then its packing: made once, shared by compiles
          int variant = 0;
          if (depthwise) {
            s.kind = Kind::Depthwise;
            s.in = {want(x, true)};
          } else if (const int m = winograd_m(a, c.shapes[static_cast<std::size_t>(f.out)], c.wide_batch)) {
            s.kind = Kind::Winograd;
            s.in = {want(x, true)};
            variant = m;
          } else {
            s.kind = Kind::Conv;
            // grouped layers read whole channel blocks of a blocked input
            const bool in_blocked = a.p.groups > 1 || has(x, true) || !has(x, false);
            s.in = {want(x, in_blocked)};
            variant = in_blocked;
          }
          auto& shared = packed[std::make_tuple(f.node, f.bn, static_cast<int>(s.kind), variant)];
          if (!shared) {
            weights();
            auto pk = std::make_shared<PackedConv>();
            pk->bias_blocked = padded_floats(s.bias, blocked::round_up(a.out, B));
            const float* w = s.weight.data_as<float>();
            if (s.kind == Kind::Depthwise)
              pk->depthwise = blocked::pack_depthwise_weights(w, a.out, a.kh, a.kw);
            else if (s.kind == Kind::Winograd)
              pk->winograd = blocked::pack_winograd_weights(w, a.out, a.in, variant);
            else
              pk->conv = blocked::pack_conv_weights(w, a.out, a.in, a.kh, a.kw, a.p.groups,
                                                    variant != 0);
            shared = std::move(pk);
            freed_bytes += s.weight.nbytes();
            s.weight = Tensor();  // packed: the plain copy is not needed
            s.bias = Tensor();
            // The graph's copy goes too when it can be read again (a file), as
            // ONNX Runtime gives up an initializer it prepacked, here layer by
            // layer, so a net never holds its weights twice (a later compile
            // reloads a layer it packs for another algorithm).
            if (reload) {
              for (auto& t : const_cast<Node&>(n).tensors) {
                freed_bytes += t.second.nbytes();
                t.second = Tensor();
              }
            }
            // glibc keeps freed blocks in its heap, where the larger packed
            // weights cannot reuse them: hand them back as they add up, or
            // the heap grows by the net's size while it compiles.
            if (freed_bytes > (16 << 20)) {
              return_free_heap_pages();
              freed_bytes = 0;
            }
          }
          s.packed = shared;
          s.bias_blocked = shared->bias_blocked;
          if (f.residual >= 0) s.residual = want(f.residual, true);
          s.out = new_val(f.out, true);
          break;
        }
        weights();
        int in = want(x, false);
        if (a.mode != PadMode::Zeros) {  // the explicit padding as a step of its own
          Step pad;
          pad.kind = Kind::Pad;
          pad.node = f.node;
          pad.label = f.label + " (padding)";
          pad.pad = {a.p.pad_top, a.p.pad_bottom, a.p.pad_left, a.p.pad_right, a.mode};
          pad.in = {in};
          // a value of its own: the padded input, known only by this Val
          c.vals.push_back({-1, false});
          pad.out = static_cast<int>(c.vals.size() - 1);
          in = pad.out;
          c.steps.push_back(std::move(pad));
          s.conv.pad_top = s.conv.pad_bottom = s.conv.pad_left = s.conv.pad_right = 0;
        }
        s.kind = Kind::ConvPlain;
        s.in = {in};
        if (f.residual >= 0) s.residual = want(f.residual, false);
        s.out = new_val(f.out, false);
        break;
      }
      case Op::Linear:  // reads the graph's own tensors (no copy)
        s.kind = Kind::Linear;
        s.in = {want(x, false)};
        s.out = new_val(f.out, false);
        break;
      case Op::BatchNorm2d:
        if (!n.bn.track) {  // normalised with the batch's own statistics
          s.kind = Kind::BatchNormBatch;
          s.in = {want(x, false)};
          s.out = new_val(f.out, false);
          break;
        }
        s.kind = Kind::Affine;
        batch_norm_affine(f, dtype);
        s.weight = std::move(f.weight);
        s.bias = std::move(f.bias);
        if (x_blocked) {
          s.scale_blocked = padded_floats(s.weight, blocked::round_up(n.bn.channels, B));
          s.bias_blocked = padded_floats(s.bias, blocked::round_up(n.bn.channels, B));
        }
        s.in = {want(x, x_blocked)};
        s.out = new_val(f.out, x_blocked);
        break;
      case Op::ReLU: case Op::ReLU6: case Op::Sigmoid: case Op::SiLU: case Op::Hardswish:
      case Op::Hardsigmoid:
        s.kind = Kind::Act;
        s.act = act_of(f.op);
        s.in = {want(x, x_blocked)};
        s.out = new_val(f.out, x_blocked);
        break;
      case Op::MaxPool2d:
      case Op::AvgPool2d:
        s.kind = f.op == Op::MaxPool2d ? Kind::MaxPool : Kind::AvgPool;
        s.in = {want(x, x_blocked)};
        s.out = new_val(f.out, x_blocked);
        break;
      case Op::AdaptiveAvgPool2d: {
        const Shape& o = c.shapes[static_cast<std::size_t>(f.out)];
        const bool global = o[1] == 1 && o[2] == 1;
        s.kind = global ? Kind::GlobalPool : Kind::AdaptivePool;
        const bool b = global && x_blocked;
        s.in = {want(x, b)};
        s.out = new_val(f.out, b);
        break;
      }
      case Op::LocalResponseNorm:
        s.kind = Kind::LRN;
        s.in = {want(x, false)};
        s.out = new_val(f.out, false);
        break;
      case Op::Softmax:  // over a dim of the NCHW layout: a blocked input is reordered
        s.kind = Kind::Softmax;
        s.in = {want(x, false)};
        s.out = new_val(f.out, false);
        break;
      case Op::Flatten: {  // a view of its (plain) input
        const int in = want(x, false);
        const int out = new_val(f.out, false);
        c.vals[static_cast<std::size_t>(out)].view = in;
        continue;
      }
      case Op::Add:
      case Op::Mul:
      case Op::Concat: {
        const Shape& o = c.shapes[static_cast<std::size_t>(f.out)];
        bool b = blk && o.size() == 3;
        bool any_blocked = false;
        for (std::size_t k = 0; k < f.in.size(); ++k) {
          const int v = f.in[k];
          const Shape& sv = c.shapes[static_cast<std::size_t>(v)];
          any_blocked = any_blocked || (blk && has(v, true));
          if (f.op == Op::Add) b = b && sv == o;
          if (f.op == Op::Mul) b = b && (sv == o || (sv.size() == 3 && sv[0] == o[0] && sv[1] == 1 && sv[2] == 1));
        }
        b = b && any_blocked;
        s.kind = f.op == Op::Add ? Kind::Add : f.op == Op::Mul ? Kind::Mul : Kind::Concat;
        for (int v : f.in) s.in.push_back(want(v, b));
        if (s.kind == Kind::Mul && b &&
            c.shapes[static_cast<std::size_t>(f.in[0])] != o)  // the full-size operand first
          std::swap(s.in[0], s.in[1]);
        s.out = new_val(f.out, b);
        break;
      }
      default:
        throw Error("engine: no step for op " + n.type);
    }
    c.steps.push_back(std::move(s));
  }
  // the result in NCHW
  const int out = want(c.output_val, false);
  c.output_val = out;
  c.input_val = 0;
  // concatenations written in place: each branch's producer writes its slice
  if (!blk) return;
  std::vector<int> produced_by(c.vals.size(), -1);
  for (std::size_t i = 0; i < c.steps.size(); ++i)
    produced_by[static_cast<std::size_t>(c.steps[i].out)] = static_cast<int>(i);
  for (auto& s : c.steps) {
    if (s.kind != Kind::Concat) continue;
    s.copy_input.assign(s.in.size(), true);
    if (!c.vals[static_cast<std::size_t>(s.out)].blocked) continue;
    int64_t ch = 0;
    for (std::size_t k = 0; k < s.in.size(); ++k) {
      const int v = s.in[k];
      Val& val = c.vals[static_cast<std::size_t>(v)];
      const bool once = std::count(s.in.begin(), s.in.end(), v) == 1;
      // in place only from a block's first lane, and with whole blocks but
      // for the last branch: a producer writes its pad lanes too
      const int64_t channels = c.shapes[static_cast<std::size_t>(val.gv)][0];
      const bool whole = ch % B == 0 && (channels % B == 0 || k + 1 == s.in.size());
      if (whole && val.blocked && val.alias < 0 && val.view < 0 &&
          produced_by[static_cast<std::size_t>(v)] >= 0 && v != c.output_val && once) {
        val.alias = s.out;
        val.channel0 = ch;
        s.copy_input[k] = false;
        ++c.in_place;
      }
      ch += c.shapes[static_cast<std::size_t>(val.gv)][0];
    }
  }
}

Compiled& Engine::Impl::compile(const Shape& sample, int64_t batch) const {
  auto sensitive = batch_sensitive.find(sample);
  if (sensitive == batch_sensitive.end())
    sensitive =
        batch_sensitive.emplace(sample, depends_on_batch(g, graph::infer_shapes(g, sample))).first;
  const bool wide = sensitive->second && batch >= kWideBatch;
  const auto key = std::make_pair(sample, wide);
  auto it = compiled.find(key);
  if (it != compiled.end()) return *it->second;
  auto c = std::make_unique<Compiled>();
  c->sample = sample;
  c->wide_batch = wide;
  c->shapes = graph::infer_shapes(g, sample);
  std::vector<FusedOp> ops = fuse(c->shapes, *c);
  lower(ops, *c);
  Compiled& ref = *c;
  compiled[key] = std::move(c);
  return ref;
}

}  // namespace engine
}  // namespace convcore
