// The network graph of a saved model (docs/format.md, format version 2):
// the one reader of it. parse_graph checks the JSON, every node and its
// attributes (as the Python layers' constructors check their arguments), and
// the wiring; tensor_specs lists the tensors each layer holds, so that a
// file's tensors can be matched one to one; infer_shapes gives every
// value's shape for one sample. The compiled engine (engine.cpp) runs what
// this reads. Internal to the runtime (not installed).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "convcore/ops.h"
#include "convcore/padding.h"
#include "convcore/shapes.h"
#include "convcore/tensor.h"
#include "json.h"

namespace convcore {
namespace graph {

using Shape = std::vector<int64_t>;

constexpr int kFormatVersion = 2;
// Bounds on what a file may declare: larger graphs are not real networks.
constexpr int64_t kMaxNodes = 100000;
constexpr std::size_t kMaxValueName = 256;

enum class Op {
  Conv2d, Linear, BatchNorm2d, MaxPool2d, AvgPool2d, AdaptiveAvgPool2d,
  ReLU, ReLU6, Sigmoid, SiLU, Hardswish, Hardsigmoid,
  LocalResponseNorm, Flatten, Softmax, Identity,  // Identity: also Dropout, StochasticDepth
  Add, Mul, Concat,
};

struct ConvAttrs {
  int64_t in = 0, out = 0, kh = 0, kw = 0;
  Conv2dParams p;  // padding resolved ('same' made explicit)
  PadMode mode = PadMode::Zeros;
  bool bias = true;
  std::string padding_text;  // as the summary shows it: (1, 1), 'same'
};

struct BatchNormAttrs {
  int64_t channels = 0;
  double eps = 1e-5;
  bool affine = true, track = true;
  bool bias = true;  // affine with a shift (PyTorch's bias=False keeps the weight only)
};

struct Node {
  Op op = Op::Identity;
  std::string type;  // as in the file: "Conv2d", "Dropout", "add"
  std::string name;  // the module path, or "" (tensors are "<name>.<tensor>")
  std::vector<int> inputs;  // value indices (0 is the graph's input)
  int output = 0;

  ConvAttrs conv;
  Pool2dParams pool;
  int64_t adaptive_h = -1, adaptive_w = -1;  // AdaptiveAvgPool2d; -1 keeps the size
  int64_t in_features = 0, out_features = 0;  // Linear
  bool linear_bias = true;
  BatchNormAttrs bn;
  LrnParams lrn;
  int64_t start_dim = 1, end_dim = -1;  // Flatten
  int64_t softmax_dim = 1;  // Softmax, of the batched input (may be negative)
  Activation activation = Activation::Sigmoid;  // Sigmoid .. Hardsigmoid
  std::string args;  // the attributes as the summary shows them

  // Tensors by role ("weight", "bias", "running_mean", ...), filled by
  // attach_tensors; their order is tensor_specs'.
  std::vector<std::pair<std::string, Tensor>> tensors;
  const Tensor* tensor(const std::string& role) const;

  // "layer 'features.0' (Conv2d): " (or the node's output value when it has
  // no name), prefixed to the errors of this node.
  std::string context(const std::vector<std::string>& values) const;
};

struct Graph {
  std::string name;        // may be empty
  Shape input_shape;       // one sample's; empty when the file gives none
  std::vector<std::string> values;  // value names; 0 is the input
  std::vector<int> outputs;         // inference returns outputs[0]
  std::vector<Node> nodes;
};

// Elements of a shape; ValueError when they do not fit in 64 bits.
int64_t numel(const Shape& shape);

// Parses and checks a graph; ValueError naming the node and the fault.
Graph parse_graph(const json::Value& graph);

// The tensors a node's layer holds.
struct TensorSpec {
  std::string key;  // "<name>.<role>"
  std::string role;
  Shape shape;
  bool is_float;   // else an integer buffer (num_batches_tracked)
  bool trainable;  // a parameter (counted by num_parameters)
};
std::vector<TensorSpec> tensor_specs(const Node& node);

// Every value's shape for one sample's input shape (no batch dimension),
// with the checks a forward pass makes; errors name the node.
std::vector<Shape> infer_shapes(const Graph& g, const Shape& sample);

// The nodes the first output needs (inference skips the others, such as
// GoogLeNet's auxiliary heads).
std::vector<bool> needed_nodes(const Graph& g);

}  // namespace graph
}  // namespace convcore
