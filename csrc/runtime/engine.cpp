// The compiled engine (engine.h): graph -> fused ops -> steps over values
// in a layout -> a plan per batch size -> runs.
#include "engine.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <iomanip>
#include <map>
#include <mutex>
#include <sstream>

#include "../cpu/blocked.h"
#include "convcore/errors.h"
#include "convcore/ops.h"
#include "convcore/padding.h"
#include "convcore/threading.h"

namespace convcore {
namespace engine {

namespace {

using graph::Node;
using graph::Op;
using graph::Shape;
using blocked::Act;

Act act_of(Op op) {
  switch (op) {
    case Op::ReLU: return Act::ReLU;
    case Op::ReLU6: return Act::ReLU6;
    case Op::Sigmoid: return Act::Sigmoid;
    case Op::SiLU: return Act::SiLU;
    case Op::Hardswish: return Act::Hardswish;
    case Op::Hardsigmoid: return Act::Hardsigmoid;
    default: return Act::None;
  }
}

bool is_activation(Op op) { return act_of(op) != Act::None; }

// Calls f(float{}) or f(double{}) for the net's dtype.
template <typename F>
void with_type(DType dtype, F&& f) {
  if (dtype == DType::Float64)
    f(double{});
  else
    f(float{});
}

// --------------------------------------------------------------- fused ops

// An op after folding and fusion, over graph values (its layout not yet chosen).
struct FusedOp {
  Op op = Op::Identity;
  const Node* node = nullptr;  // the graph node it started from
  std::vector<int> in;
  int out = 0;
  int residual = -1;  // a value added before the activation
  Act act = Act::None;
  Tensor weight, bias;  // Conv2d / Linear (BatchNorm folded in); BatchNorm: scale, shift
  std::string label;
  bool dead = false;
};

// The weights of a convolution or linear layer with the batch norm that
// follows folded in: w' = w * s, b' = (b - mean) * s + beta, s = gamma /
// sqrt(var + eps), in double.
void fold_batch_norm(FusedOp& f, const Node& bn) {
  const Tensor* gamma = bn.tensor("weight");
  const Tensor* beta = bn.tensor("bias");
  const Tensor& mean = *bn.tensor("running_mean");
  const Tensor& var = *bn.tensor("running_var");
  const int64_t cout = f.weight.size(0), per = f.weight.numel() / cout;
  const DType dt = f.weight.dtype();
  Tensor w64 = f.weight.to(DType::Float64), m64 = mean.to(DType::Float64),
         v64 = var.to(DType::Float64);
  Tensor g64 = gamma ? gamma->to(DType::Float64) : Tensor();
  Tensor be64 = beta ? beta->to(DType::Float64) : Tensor();
  Tensor b64 = f.bias.defined() ? f.bias.to(DType::Float64) : Tensor(DType::Float64, {cout});
  double* w = w64.data_as<double>();
  double* b = b64.data_as<double>();
  for (int64_t o = 0; o < cout; ++o) {
    const double s = (gamma ? g64.data_as<double>()[o] : 1.0) /
                     std::sqrt(v64.data_as<double>()[o] + bn.bn.eps);
    for (int64_t k = 0; k < per; ++k) w[o * per + k] *= s;
    b[o] = (b[o] - m64.data_as<double>()[o]) * s + (beta ? be64.data_as<double>()[o] : 0.0);
  }
  f.weight = w64.to(dt);
  f.bias = b64.to(dt);
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

// --------------------------------------------------------------- steps

enum class Kind {
  Conv, Winograd, Depthwise, ConvPlain, Pad, Linear, Affine, BatchNormBatch, Act, MaxPool, AvgPool,
  GlobalPool, AdaptivePool, LRN, Add, Mul, Concat, ToBlocked, ToPlain,
};

const char* kind_name(Kind k) {
  switch (k) {
    case Kind::Conv: return "conv";
    case Kind::Winograd: return "winograd";
    case Kind::Depthwise: return "depthwise";
    case Kind::ConvPlain: return "conv(core)";
    case Kind::Pad: return "pad";
    case Kind::Linear: return "linear";
    case Kind::Affine: return "scale+shift";
    case Kind::BatchNormBatch: return "batchnorm";
    case Kind::Act: return "activation";
    case Kind::MaxPool: return "maxpool";
    case Kind::AvgPool: return "avgpool";
    case Kind::GlobalPool: return "globalpool";
    case Kind::AdaptivePool: return "adaptivepool";
    case Kind::LRN: return "lrn";
    case Kind::Add: return "add";
    case Kind::Mul: return "mul";
    case Kind::Concat: return "concat";
    case Kind::ToBlocked: return "reorder";
    case Kind::ToPlain: return "reorder";
  }
  return "?";
}

// A value in a layout: graph value gv's data, blocked or plain.
struct Val {
  int gv;
  bool blocked;
  int alias = -1;          // a concatenation this value is a slice of (its Val)
  int64_t channel0 = 0;    // the slice's first channel
  int view = -1;           // Flatten: the same buffer as this Val
};

struct Step {
  Kind kind;
  std::vector<int> in;  // Vals
  int out;
  int residual = -1;
  Act act = Act::None;
  const Node* node = nullptr;
  std::string label;
  Conv2dParams conv;
  Pad2dParams pad;
  int64_t kh = 0, kw = 0;
  Tensor weight, bias;  // plain (core) steps; Affine: scale, shift
  blocked::ConvWeights packed;
  blocked::WinogradWeights winograd;
  std::vector<float> depthwise;
  std::vector<float> bias_blocked, scale_blocked;  // padded to whole blocks
  std::vector<bool> copy_input;  // Concat: inputs not written in place
};

// One value's place in a plan.
struct Place {
  int64_t offset = 0;        // elements into the arena (-1: the caller's input)
  int64_t image_stride = 0;  // elements between images
};

struct Plan {
  int64_t batch = 0;
  int threads = 1;
  std::vector<Place> places;  // by Val
  std::vector<blocked::ConvPlan> conv_plans;  // by step
  std::vector<blocked::WinogradPlan> winograd_plans;  // by step
  std::vector<int> step_threads;  // by step: fewer than `threads` for small steps
  int64_t values_elements = 0, scratch_elements = 0;
};

// The Winograd variant for a convolution in the blocked layout, 0 for the
// direct kernel: F(m x m, 3x3) needs a 3x3, stride-1, undilated kernel, and
// pays where the images hold enough tiles and the channels are many (the
// transforms are memory passes over the channels; measured in
// docs/engine.md).
int winograd_m(const graph::ConvAttrs& a, const Shape& out) {
  if (a.kh != 3 || a.kw != 3 || a.p.stride_h != 1 || a.p.stride_w != 1 || a.p.dilation_h != 1 ||
      a.p.dilation_w != 1 || a.p.groups != 1 || a.in < 32 || a.out < 32)
    return 0;
  const int64_t side = std::min(out[1], out[2]);
  if (side >= 28) return 4;  // F(4x4): fewest products, ragged tiles rare
  if (side >= 7) return 2;   // F(2x2): 4x4 tiles waste less of a small image
  return 0;
}

std::vector<float> padded_floats(const Tensor& t, int64_t n_padded) {
  std::vector<float> v(static_cast<std::size_t>(n_padded), 0.0f);
  if (t.defined()) std::memcpy(v.data(), t.data_as<float>(), static_cast<std::size_t>(t.numel()) * 4);
  return v;
}

}  // namespace

// --------------------------------------------------------------- compiled

// The steps for one sample shape.
struct Compiled {
  Shape sample;
  std::vector<Shape> shapes;  // by graph value, one sample
  std::vector<Val> vals;
  std::vector<Step> steps;
  int input_val = 0, output_val = 0;
  int folded = 0, fused = 0, in_place = 0;
  std::map<std::pair<int64_t, int>, std::unique_ptr<Plan>> plans;  // (batch, threads)
};

struct Engine::Impl {
  graph::Graph g;
  DType dtype;
  Options options;
  int lanes = 8;
  mutable std::mutex mutex;
  mutable std::map<Shape, std::unique_ptr<Compiled>> compiled;
  mutable std::vector<Tensor> arenas;  // free arenas, reused by later forwards

  int threads() const { return options.threads > 0 ? options.threads : get_num_threads(); }
  bool use_blocked() const { return options.blocked && dtype == DType::Float32; }

  Compiled& compile(const Shape& sample) const;
  std::vector<FusedOp> fuse(const std::vector<Shape>& shapes, Compiled& c) const;
  void lower(std::vector<FusedOp>& ops, Compiled& c) const;
  Plan& plan(Compiled& c, int64_t batch, int threads) const;
  void run(const Compiled& c, const Plan& p, const TensorView& input, char* arena,
           Tensor& result, std::vector<double>* times) const;
  void run_step(const Compiled& c, const Plan& p, const Step& s, char* arena,
                const void* input) const;
};

std::vector<FusedOp> Engine::Impl::fuse(const std::vector<Shape>& shapes, Compiled& c) const {
  const auto needed = graph::needed_nodes(g);
  // identities removed: each value read through its representative
  std::vector<int> rep(g.values.size());
  for (std::size_t v = 0; v < rep.size(); ++v) rep[v] = static_cast<int>(v);
  std::vector<FusedOp> ops;
  std::vector<int> producer(g.values.size(), -1);  // op index
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
    f.label = node_label(n, g.values);
    if (n.op == Op::Conv2d) {  // a copy: folding and packing change it
      f.weight = *n.tensor("weight");
      if (const Tensor* b = n.tensor("bias")) f.bias = *b;
    }
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
      fold_batch_norm(*p, *f.node);
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
        s.weight = std::move(f.weight);
        s.bias = std::move(f.bias);
        const bool depthwise = a.p.groups == a.in && a.in == a.out;
        if (blk && a.mode == PadMode::Zeros && (a.p.groups == 1 || depthwise)) {
          const int64_t cpad = blocked::round_up(a.out, B);
          s.bias_blocked = padded_floats(s.bias, cpad);
          if (depthwise) {
            s.kind = Kind::Depthwise;
            s.depthwise = blocked::pack_depthwise_weights(s.weight.data_as<float>(), a.out, a.kh, a.kw);
            s.in = {want(x, true)};
          } else if (const int m = winograd_m(a, c.shapes[static_cast<std::size_t>(f.out)])) {
            s.kind = Kind::Winograd;
            s.in = {want(x, true)};
            s.winograd = blocked::pack_winograd_weights(s.weight.data_as<float>(), a.out, a.in, m);
          } else {
            s.kind = Kind::Conv;
            const bool in_blocked = has(x, true) || !has(x, false);
            s.in = {want(x, in_blocked)};
            s.packed = blocked::pack_conv_weights(s.weight.data_as<float>(), a.out, a.in, a.kh,
                                                  a.kw, in_blocked);
          }
          s.weight = Tensor();  // packed: the plain copy is not needed
          if (f.residual >= 0) s.residual = want(f.residual, true);
          s.out = new_val(f.out, true);
          break;
        }
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
          if (f.op == Op::Concat) b = b && (k + 1 == f.in.size() || sv[0] % B == 0);
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
      if (val.blocked && val.alias < 0 && val.view < 0 && produced_by[static_cast<std::size_t>(v)] >= 0 &&
          v != c.output_val && once) {
        val.alias = s.out;
        val.channel0 = ch;
        s.copy_input[k] = false;
        ++c.in_place;
      }
      ch += c.shapes[static_cast<std::size_t>(val.gv)][0];
    }
  }
}

Compiled& Engine::Impl::compile(const Shape& sample) const {
  auto it = compiled.find(sample);
  if (it != compiled.end()) return *it->second;
  auto c = std::make_unique<Compiled>();
  c->sample = sample;
  c->shapes = graph::infer_shapes(g, sample);
  std::vector<FusedOp> ops = fuse(c->shapes, *c);
  lower(ops, *c);
  Compiled& ref = *c;
  compiled[sample] = std::move(c);
  return ref;
}

namespace {

// A Val's shape for one sample (the padded input of a Pad step has its own).
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
  // the buffer each Val lives in: its own, its view's, its concatenation's
  auto root = [&](int v) {
    while (true) {
      const Val& val = c.vals[static_cast<std::size_t>(v)];
      if (val.view >= 0) v = val.view;
      else if (val.alias >= 0) v = val.alias;
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
  const int input_root = root(c.input_val);
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
      } else {
        u = val.view;
      }
    }
    p->places[v].offset = r == input_root ? -1 : p->places[static_cast<std::size_t>(r)].offset + off;
    if (c.vals[v].alias >= 0) p->places[v].image_stride = p->places[static_cast<std::size_t>(r)].image_stride;
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
      p->winograd_plans[i] = blocked::plan_winograd(s.winograd, in, out, threads);
      const auto& wp = p->winograd_plans[i];
      p->scratch_elements = std::max(p->scratch_elements, threads * (wp.v_floats + wp.m_floats));
      continue;
    }
    p->conv_plans[i] = blocked::plan_conv(s.packed, s.conv, in, out, threads);
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
      blocked::conv2d(image(s.in[0]), s.packed, s.conv, p.conv_plans[i], e, image(s.out), scratch,
                      threads);
      return;
    }
    case Kind::Winograd: {
      const std::size_t i = static_cast<std::size_t>(&s - c.steps.data());
      float* scratch = reinterpret_cast<float*>(arena + static_cast<std::size_t>(p.values_elements) * item);
      blocked::winograd_conv2d(image(s.in[0]), s.winograd, s.conv, p.winograd_plans[i], e,
                               image(s.out), scratch, threads);
      return;
    }
    case Kind::Depthwise:
      return blocked::depthwise_conv2d(image(s.in[0]), s.depthwise.data(), s.kh, s.kw, s.conv, e,
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
      const TensorView bv = n.bn.affine ? n.tensor("bias")->view() : TensorView();
      batch_norm_forward(view(s.in[0]), n.bn.affine ? &wv : nullptr, n.bn.affine ? &bv : nullptr,
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
        int64_t ch = 0;
        for (std::size_t k = 0; k < s.in.size(); ++k) {
          blocked::Image x = image(s.in[k]);
          if (s.copy_input[k]) {
            blocked::Image slice = image(s.out);
            slice.data += ch * x.h * x.w;
            slice.c = x.c;
            blocked::copy(x, slice, threads);
          }
          ch += x.c;
        }
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
                       Tensor& result, std::vector<double>* times) const {
  const void* in = input.data;
  for (std::size_t i = 0; i < c.steps.size(); ++i) {
    const Step& s = c.steps[i];
    const auto t0 = std::chrono::steady_clock::now();
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
  const std::size_t bytes = result.nbytes();
  if (bytes)
    std::memcpy(result.data(), out.offset < 0 ? in : arena + static_cast<std::size_t>(out.offset) * dtype_size(dtype), bytes);
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

void Engine::prepare(const Shape& sample) {
  std::lock_guard<std::mutex> lock(impl_->mutex);
  impl_->compile(sample);
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
  std::unique_lock<std::mutex> lock(m.mutex);
  const Compiled& c = m.compile(sample_of(input));
  const Plan& p = m.plan(const_cast<Compiled&>(c), input.shape[0], m.threads());
  Tensor arena = std::move(m.arenas.back());
  m.arenas.pop_back();
  lock.unlock();
  std::vector<double> times(c.steps.size(), 0.0);
  Shape out_shape = c.shapes[static_cast<std::size_t>(c.vals[static_cast<std::size_t>(c.output_val)].gv)];
  out_shape.insert(out_shape.begin(), input.shape[0]);
  Tensor result = Tensor::empty(m.dtype, out_shape);
  const Tensor x = Tensor::from_view(input);
  for (int r = 0; r < runs; ++r)
    m.run(c, p, x.view(), static_cast<char*>(arena.data()), result, &times);
  lock.lock();
  m.arenas.push_back(std::move(arena));
  std::vector<StepInfo> rows;
  for (std::size_t i = 0; i < c.steps.size(); ++i) {
    const Step& s = c.steps[i];
    Shape shape = val_shape(c, c.steps, s.out);
    shape.insert(shape.begin(), p.batch);
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
  const Shape sample = sample_of(input);
  const int threads = m.threads();
  std::unique_lock<std::mutex> lock(m.mutex);
  Compiled& c = m.compile(sample);
  if (input.shape[0] == 0) {  // an empty batch: nothing to compute
    Shape out_shape = c.shapes[static_cast<std::size_t>(c.vals[static_cast<std::size_t>(c.output_val)].gv)];
    out_shape.insert(out_shape.begin(), 0);
    return Tensor::empty(m.dtype, out_shape);
  }
  Plan& p = m.plan(c, input.shape[0], threads);
  Tensor arena;
  const int64_t need = p.values_elements + p.scratch_elements +
                       (input.is_contiguous() ? 0 : p.batch * graph::numel(sample));
  for (std::size_t i = 0; i < m.arenas.size(); ++i)
    if (m.arenas[i].numel() >= need) {
      arena = std::move(m.arenas[i]);
      m.arenas.erase(m.arenas.begin() + static_cast<std::ptrdiff_t>(i));
      break;
    }
  lock.unlock();
  if (!arena.defined()) arena = Tensor::empty(m.dtype, {std::max<int64_t>(need, 1)});
  Shape out_shape = c.shapes[static_cast<std::size_t>(c.vals[static_cast<std::size_t>(c.output_val)].gv)];
  out_shape.insert(out_shape.begin(), input.shape[0]);
  Tensor result = Tensor::empty(m.dtype, out_shape);
  TensorView x = input;
  if (!input.is_contiguous()) {  // copied into the arena, past everything else
    const std::size_t item = dtype_size(m.dtype);
    char* dst = static_cast<char*>(arena.data()) +
                static_cast<std::size_t>(p.values_elements + p.scratch_elements) * item;
    Tensor copy = Tensor::from_view(input);
    std::memcpy(dst, copy.data(), copy.nbytes());
    x = contiguous_view(dst, m.dtype, input.ndim, input.shape);
  }
  try {
    m.run(c, p, x, static_cast<char*>(arena.data()), result, nullptr);
  } catch (...) {
    lock.lock();
    m.arenas.push_back(std::move(arena));
    throw;
  }
  lock.lock();
  m.arenas.push_back(std::move(arena));
  return result;
}

std::string Engine::summary(const Shape& sample, int64_t batch) const {
  const Impl& m = *impl_;
  std::lock_guard<std::mutex> lock(m.mutex);
  Compiled& c = m.compile(sample);
  Plan& p = m.plan(c, batch, m.threads());
  std::ostringstream os;
  const std::size_t item = dtype_size(m.dtype);
  os << "compiled: " << c.steps.size() << " steps, " << c.folded << " batch norms folded, "
     << c.fused << " adds and activations fused, " << c.in_place
     << " concatenation inputs written in place; arena "
     << (p.values_elements + p.scratch_elements) * static_cast<int64_t>(item) << " bytes for a batch of "
     << batch << " (values " << p.values_elements * static_cast<int64_t>(item) << ", scratch "
     << p.scratch_elements * static_cast<int64_t>(item) << "), " << p.threads << " threads\n";
  std::size_t wl = 4;
  for (const auto& s : c.steps) wl = std::max(wl, s.label.size());
  os << std::left << std::setw(static_cast<int>(wl)) << "step" << "  " << std::setw(12) << "kind"
     << "  " << std::setw(18) << "layout" << "  output\n";
  for (const auto& s : c.steps) {
    const std::string layout = layout_name(c, s, m.lanes);
    Shape shape = val_shape(c, c.steps, s.out);
    shape.insert(shape.begin(), batch);
    os << std::left << std::setw(static_cast<int>(wl)) << s.label << "  " << std::setw(12)
       << kind_name(s.kind) << "  " << std::setw(18) << layout << "  " << shape_str(shape) << "\n";
  }
  return os.str();
}

int64_t Engine::arena_bytes(const Shape& sample, int64_t batch) const {
  const Impl& m = *impl_;
  std::lock_guard<std::mutex> lock(m.mutex);
  Compiled& c = m.compile(sample);
  Plan& p = m.plan(c, batch, m.threads());
  return (p.values_elements + p.scratch_elements) * static_cast<int64_t>(dtype_size(m.dtype));
}

}  // namespace engine
}  // namespace convcore
