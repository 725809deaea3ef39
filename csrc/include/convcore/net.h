// convcore::Net: runs a network saved from Python (model.save(path)) on the
// CPU, with no Python: the safetensors file's tensors and the architecture
// JSON in its metadata ("convcore_architecture") are all it needs.
//
//   convcore::Net net = convcore::Net::load("lenet5.safetensors");
//   convcore::Tensor y = net.forward(x.view());   // x: (N, 1, 32, 32) float32
//
// Inference only, in evaluation mode: BatchNorm2d normalises with its running
// statistics, Dropout is the identity. The modules it knows are those of
// convcore.nn and the zoo: Sequential, Identity, Conv2d (every padding_mode),
// MaxPool2d, AvgPool2d, AdaptiveAvgPool2d, Linear, ReLU, Flatten, Dropout,
// LocalResponseNorm, BatchNorm2d, BasicBlock, Bottleneck, the builder's
// Network (features, then an implicit flatten, then classifier), ResNet
// (with ResNeXt's groups and Wide ResNet's width_per_group), Sigmoid, SiLU,
// ReLU6, Hardswish, Hardsigmoid, StochasticDepth (the identity) and Graph
// (named children wired by "out = op(a, b)" lines with concat/add/mul/relu
// joins; a graph with several outputs gives its first, as Python's eval).
// The model is rebuilt exactly as Python's convcore.load rebuilds it: a
// Sequential from the children in the file, every other module from its
// config (a Network from its layer dicts, by the builder's rules). Every layer
// calls the same core ops as Python, so the outputs match Python's (eval
// mode) to float32 precision (in practice bit for bit). The input is copied
// once; the parameters are shared by concurrent forward() calls.
//
// Loading never trusts the file: a malformed or truncated file, an unknown
// module type, a bad config, or tensors missing, unexpected, or of shapes or
// dtypes the architecture does not give, are a ValueError
// "cannot load '<path>': <what>".
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "convcore/tensor.h"

namespace convcore {

class Net {
 public:
  // Reads and checks the whole file, then holds the parameters in memory.
  // A file whose floating-point tensors are all F64 gives a float64 net;
  // otherwise the parameters are float32 (F16/BF16/F64 converted), as
  // Python's convcore.load does.
  static Net load(const std::string& path);

  Net(Net&&) noexcept;
  Net& operator=(Net&&) noexcept;
  ~Net();

  // input: a batch (N, ...) of the net's dtype, any strides; typically
  // (N, C, H, W), or (N, features) for a net of fully connected layers.
  // Errors name the layer: "layer 'classifier.0' (Linear): ...".
  // const and thread-safe: concurrent calls share the parameters.
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

 private:
  struct Impl;
  explicit Net(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace convcore
