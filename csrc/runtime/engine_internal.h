// Internals of the compiled engine shared by its two halves:
// engine_compile.cpp (graph -> fused ops -> steps over values in a layout)
// and engine.cpp (a plan per batch size, and running it). Not installed.
#pragma once
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

#include "../cpu/blocked.h"
#include "convcore/ops.h"
#include "convcore/padding.h"
#include "convcore/threading.h"
#include "engine.h"

namespace convcore {
namespace engine {

using graph::Node;
using graph::Op;
using graph::Shape;
using blocked::Act;

inline Act act_of(Op op) {
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

inline bool is_activation(Op op) { return act_of(op) != Act::None; }

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
  const Node* bn = nullptr;  // Conv2d: the batch norm folded into it
  Tensor weight, bias;  // BatchNorm: its scale and shift
  std::string label;
  bool dead = false;
};

// --------------------------------------------------------------- steps

enum class Kind {
  Conv, Winograd, Depthwise, ConvPlain, Pad, Linear, Affine, BatchNormBatch, Act, MaxPool, AvgPool,
  GlobalPool, AdaptivePool, LRN, Softmax, Add, Mul, Concat, ToBlocked, ToPlain,
};

inline const char* kind_name(Kind k) {
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
    case Kind::Softmax: return "softmax";
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

// A convolution's weights (its batch norm folded) packed for one blocked
// algorithm: one of the three, with the bias padded to whole blocks. Shared
// by every compile (sample shape, batch class) that runs the layer so.
struct PackedConv {
  blocked::ConvWeights conv;          // Kind::Conv
  blocked::WinogradWeights winograd;  // Kind::Winograd
  std::vector<float> depthwise;       // Kind::Depthwise
  std::vector<float> bias_blocked;
  int64_t floats() const {
    return static_cast<int64_t>(conv.panels.size() + winograd.u.size() + depthwise.size());
  }
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
  std::shared_ptr<const PackedConv> packed;  // blocked convolutions
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

// The steps for one sample shape.
struct Compiled {
  Shape sample;
  bool wide_batch = false;  // compiled for batches of kWideBatch images and more
  std::vector<Shape> shapes;  // by graph value, one sample
  std::vector<Val> vals;
  std::vector<Step> steps;
  int input_val = 0, output_val = 0;
  int folded = 0, fused = 0, in_place = 0, shared = 0;
  std::map<std::pair<int64_t, int>, std::unique_ptr<Plan>> plans;  // (batch, threads)
  // chunk_images' sizes for one image, found on its first call (step < 0: not yet)
  struct ChunkSizes {
    int64_t step = -1, activations = 0, weights = 0;  // elements
    int64_t linear_weights = 0;  // of the linear steps (among weights)
    bool couples_images = false;  // a step mixes the batch's images (batch statistics)
  } chunk_sizes;
};

// Returns the heap's free pages to the system (glibc; elsewhere nothing).
void return_free_heap_pages();

struct Engine::Impl {
  graph::Graph g;
  DType dtype;
  Options options;
  int lanes = 8;
  mutable std::mutex mutex;
  // by sample shape and batch class (wide: kWideBatch images and more; only
  // where an algorithm depends on it, see batch_sensitive)
  mutable std::map<std::pair<Shape, bool>, std::unique_ptr<Compiled>> compiled;
  mutable std::map<Shape, bool> batch_sensitive;
  mutable std::vector<Tensor> arenas;  // free arenas, reused by later forwards
  // Reads a node's tensors again (a file's); when set, lower() frees the
  // graph's copy of the weights it packs, and reloads a layer's when a
  // later compile packs it for another algorithm.
  std::function<void(graph::Node&)> reload;
  // The packed convolutions, by (convolution, the batch norm folded into
  // it, kind, variant: Winograd's m, or whether the input is blocked): a
  // second batch class or sample shape packs only the layers whose
  // algorithm differs, so the net's weights are not held twice.
  mutable std::map<std::tuple<const Node*, const Node*, int, int>,
                   std::shared_ptr<const PackedConv>>
      packed;

  int threads() const { return options.threads > 0 ? options.threads : get_num_threads(); }
  bool use_blocked() const { return options.blocked && dtype == DType::Float32; }

  // The steps for a sample shape and a batch of `batch` images (a net with
  // a batch-dependent algorithm, as Winograd on 7x7 images, is compiled once
  // per batch class).
  static constexpr int64_t kWideBatch = 16;
  Compiled& compile(const Shape& sample, int64_t batch) const;
  std::vector<FusedOp> fuse(const std::vector<Shape>& shapes, Compiled& c) const;
  void lower(std::vector<FusedOp>& ops, Compiled& c) const;
  Plan& plan(Compiled& c, int64_t batch, int threads) const;
  int64_t chunk_images(Compiled& c, int64_t batch) const;
  // How a batch runs: chunks of `images`, `team` of them side by side (one
  // per thread), each step on `step_threads` threads.
  struct Chunking {
    int64_t images = 1;
    int team = 1, step_threads = 1;
  };
  Chunking chunking(Compiled& c, int64_t batch, bool profiling) const;
  void run(const Compiled& c, const Plan& p, const TensorView& input, char* arena, char* output,
           std::vector<double>* times) const;
  // forward and profile: the batch in chunks (chunking)
  Tensor run_chunks(const TensorView& input, std::vector<double>* times) const;
  void run_step(const Compiled& c, const Plan& p, const Step& s, char* arena,
                const void* input) const;
};

// A Val's shape for one sample (the padded input of a Pad step has its own).
Shape val_shape(const Compiled& c, const std::vector<Step>& steps, int v);

}  // namespace engine
}  // namespace convcore
