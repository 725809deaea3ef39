// The compiled inference engine behind convcore::Net and convcore.compile:
// a graph (graph.h) with its tensors, compiled once into a list of steps.
//
// Compiling (once per graph):
//  - identities (Dropout, StochasticDepth, Identity) are removed;
//  - a BatchNorm2d that alone reads a convolution's output is folded into
//    its weights and bias; the others become one scale-and-shift pass;
//  - a residual add is fused into the convolution that produces one of its
//    inputs (the output stage adds the other), and an activation into the
//    step that produces its input, when nothing else reads what they fuse;
//  - 4-D float32 values are kept in the blocked channel layout
//    (cpu/blocked.h) between the steps that have blocked kernels
//    (convolution, depthwise convolution, pooling, the elementwise joins),
//    with a reorder only where a plain-layout step (Linear, LocalResponseNorm,
//    grouped convolutions, ...) or the output needs NCHW;
//  - the branches of a channel concatenation write straight into its slices;
//  - weights are packed for their kernels.
// Planning (once per input shape): shapes, every value's place in one arena
// by liveness, the scratch of the steps; later forwards of that shape
// allocate nothing but their result.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "convcore/net.h"
#include "convcore/tensor.h"
#include "graph.h"

namespace convcore {
namespace engine {

using Options = NetOptions;  // threads 0: the core's count at each forward
using StepInfo = NetStep;

class Engine {
 public:
  // The graph's tensors must be attached (Node::tensors); dtype is the net's.
  Engine(graph::Graph g, DType dtype, Options options);
  ~Engine();
  Engine(Engine&&) noexcept;
  Engine& operator=(Engine&&) noexcept;

  // The first output for a batch (N, ...) of the graph's input. Thread-safe.
  Tensor forward(const TensorView& input) const;
  // The same, timing every step over `runs` forwards (the first run warms
  // up and is not counted); returns the steps with their total seconds.
  std::vector<StepInfo> profile(const TensorView& input, int runs) const;

  // Compiles for a sample shape now (the first forward of that shape would),
  // for small batches: a net with an algorithm that depends on the batch
  // (Winograd on 7x7 images) compiles again at its first batch of 16 or more.
  void prepare(const std::vector<int64_t>& sample_shape);
  // How to read a node's tensors again: the engine then frees its copy of
  // the weights it packs, and reloads a layer's when another sample shape
  // or batch class runs it with another algorithm.
  void set_reload(std::function<void(graph::Node&)> reload);

  const graph::Graph& graph() const;
  DType dtype() const;
  int threads() const;
  void set_threads(int threads);
  // The plan for one sample shape: steps, the arena's bytes, what was
  // folded and fused.
  std::string summary(const std::vector<int64_t>& sample_shape, int64_t batch) const;
  // Bytes of the arena (values and scratch) for a batch of that shape.
  int64_t arena_bytes(const std::vector<int64_t>& sample_shape, int64_t batch) const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace engine
}  // namespace convcore
