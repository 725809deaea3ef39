// What a saved model file holds beyond its tensors: the graph (format 2,
// docs/format.md), or the module tree of a format-1 file lowered to one;
// and the check that a file's tensors are exactly the ones the graph's
// layers hold. Used by convcore::Net::load and, through the bindings, by
// Python's convcore.load and convcore.compile. Internal to the runtime.
#pragma once
#include <map>
#include <string>
#include <vector>

#include "convcore/tensor.h"
#include "graph.h"
#include "json.h"

namespace convcore {

// A format-1 architecture (Module.architecture() JSON) as a graph
// (legacy_format.cpp). ValueError for a tree it cannot lower.
json::Value lower_architecture(const json::Value& arch);

// The graph of a file's metadata: "convcore_graph", else a format-1
// "convcore_architecture" lowered. ValueError with the reason (no path).
graph::Graph graph_from_metadata(const std::map<std::string, std::string>& metadata);

// A graph from its JSON text (convcore.compile's in-memory models).
graph::Graph graph_from_json(const std::string& text);

// A tensor as a reader found it: its name, safetensors dtype ("F32", ...)
// and shape.
struct TensorInfo {
  std::string name, dtype;
  std::vector<int64_t> shape;
};

// Checks that the tensors are exactly those the graph's layers hold, with
// the shapes their attributes give and float (or, for num_batches_tracked,
// integer) dtypes; returns the net's dtype: float64 when every
// floating-point tensor is F64, else float32. ValueError naming the tensors.
DType match_tensors(const graph::Graph& g, const std::vector<TensorInfo>& tensors);

// Checks the graph on its declared input shape (when it has one).
void check_input_shape(const graph::Graph& g);

}  // namespace convcore
