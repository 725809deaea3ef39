// convcore::Net: runs a network saved from Python (model.save(path)) on the
// CPU, with no Python: the safetensors file's tensors and the network graph
// in its metadata (docs/format.md) are all it needs.
//
//   convcore::Net net = convcore::Net::load("lenet5.safetensors");
//   convcore::Tensor y = net.forward(x.view());   // x: (N, 1, 32, 32) float32
//
// Inference only, in evaluation mode: BatchNorm2d normalises with its running
// statistics, Dropout is the identity. The graph is read by the one reader
// that Python's convcore.load also uses, and compiled once (the engine:
// batch norms folded into convolutions, activations and residual adds fused
// into the output stages, channels kept in blocks of the vector width
// between layers, weights packed once, one memory arena planned per input
// shape); convcore.compile in Python runs the same engine, so both give the
// same outputs, bit for bit, for the same file and thread count. Files of
// format 1 (the module tree alone, saved before the graph existed) load too.
// The outputs match Python's eager model (eval mode) to float32 precision.
//
// Loading never trusts the file: a malformed or truncated file, an unknown
// op, a bad attribute, or tensors missing, unexpected, or of shapes or
// dtypes the graph does not give, are a ValueError
// "cannot load '<path>': <what>".
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "convcore/tensor.h"

namespace convcore {

// How a net is compiled: blocked = false keeps every value in NCHW and
// fuse = false runs every layer as its own step (both for checking the
// engine against itself); threads as Net::set_num_threads.
struct NetOptions {
  bool blocked = true;
  bool fuse = true;
  int threads = 0;
};

// One step of a compiled plan (Net::profile).
struct NetStep {
  std::string label;   // what it computes: "layer1.0.conv2 + layer1.0.bn2 + add + ReLU"
  std::string kind;    // "conv", "depthwise", "maxpool", "reorder", ...
  std::string layout;  // "blocked8", "plain", "plain->blocked16", ...
  std::vector<int64_t> shape;  // its output's batched shape
  double seconds = 0;  // total over the profiled runs
};

class Net {
 public:
  // Reads and checks the whole file, then holds the parameters in memory.
  // A file whose floating-point tensors are all F64 gives a float64 net;
  // otherwise the parameters are float32 (F16/BF16/F64 converted), as
  // Python's convcore.load does.
  static Net load(const std::string& path, const NetOptions& options = {});
  // A net from a graph's JSON (docs/format.md) and its tensors by name (any
  // strides; copied): a model built elsewhere than in a file.
  // ValueError "bad graph: ..." or naming the tensors that do not match.
  static Net from_graph(const std::string& graph_json,
                        const std::map<std::string, TensorView>& tensors,
                        const NetOptions& options = {});

  Net(Net&&) noexcept;
  Net& operator=(Net&&) noexcept;
  ~Net();

  // input: a batch (N, ...) of the net's dtype, any strides; typically
  // (N, C, H, W), or (N, features) for a net of fully connected layers.
  // Errors name the layer: "layer 'classifier.0' (Linear): ...".
  // const and thread-safe: concurrent calls share the parameters. The first
  // call for an input shape plans it; later calls of that shape allocate
  // nothing but their result.
  Tensor forward(const TensorView& input) const;
  Tensor forward(const Tensor& input) const { return forward(input.view()); }

  DType dtype() const;
  // One sample's input shape, e.g. (1, 32, 32), from the file (the builder's
  // input_shape, ResNet's input_size); empty when the file gives none.
  const std::vector<int64_t>& input_shape() const;
  // One sample's output shape for one sample's input shape (no batch
  // dimension), with the checks forward() makes. The one-argument-less form
  // uses input_shape() (ValueError when it is empty).
  std::vector<int64_t> output_shape(const std::vector<int64_t>& sample_shape) const;
  std::vector<int64_t> output_shape() const;

  // Trainable values (weights and biases; not the BatchNorm statistics).
  int64_t num_parameters() const;
  // The model's name ("lenet5") or, when it has none, its type ("ResNet").
  const std::string& name() const;
  const std::string& path() const;
  // The file's metadata (format, convcore_version, convcore_architecture, ...).
  const std::map<std::string, std::string>& metadata() const;
  // A table of the layers: name, type, arguments, output shape (when the
  // input shape is known), parameters.
  std::string summary() const;
  // The compiled plan for a batch of the given sample shape (default: the
  // input shape): its steps (what was folded and fused, the kernel and the
  // layout of each) and the bytes of its memory arena.
  std::string plan(int64_t batch, const std::vector<int64_t>& sample_shape = {}) const;
  int64_t arena_bytes(int64_t batch, const std::vector<int64_t>& sample_shape = {}) const;
  // The time of each step over `runs` forwards of this input (after one
  // that warms up).
  std::vector<NetStep> profile(const TensorView& input, int runs = 10) const;

  // Threads of this net's kernels (0, the default: the core's count,
  // set_num_threads()). Results do not depend on it.
  void set_num_threads(int threads);
  int num_threads() const;

 private:
  struct Impl;
  explicit Net(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace convcore
