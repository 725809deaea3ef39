// The graph of a model file and the match of its tensors (model_file.h).
#include "model_file.h"

#include <algorithm>
#include <set>

#include "convcore/errors.h"

namespace convcore {

namespace {

std::string py_list(const std::vector<std::string>& names) {
  std::string s = "[";
  for (std::size_t i = 0; i < names.size(); ++i) s += (i ? ", " : "") + json::repr(names[i]);
  return s + "]";
}

std::string shape_list(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

// numpy's name for the dtype a safetensors dtype is read as (BF16 widened).
std::string numpy_name(const std::string& st) {
  static const std::pair<const char*, const char*> names[] = {
      {"F64", "float64"}, {"F32", "float32"}, {"F16", "float16"}, {"BF16", "float32"},
      {"I64", "int64"},   {"I32", "int32"},   {"I16", "int16"},   {"I8", "int8"},
      {"U64", "uint64"},  {"U32", "uint32"},  {"U16", "uint16"},  {"U8", "uint8"},
      {"BOOL", "bool"}};
  for (const auto& n : names)
    if (st == n.first) return n.second;
  return st;
}

bool is_float_dtype(const std::string& st) {
  return st == "F64" || st == "F32" || st == "F16" || st == "BF16";
}

bool is_int_dtype(const std::string& st) { return !st.empty() && (st[0] == 'I' || st[0] == 'U'); }

json::Value parse_json(const std::string& text, const std::string& what) {
  try {
    return json::parse(text);
  } catch (const json::ParseError& e) {
    throw ValueError("the " + what + " in the metadata is not valid JSON (" + e.what() + ")");
  }
}

}  // namespace

graph::Graph graph_from_json(const std::string& text) {
  const json::Value v = parse_json(text, "graph");
  try {
    return graph::parse_graph(v);
  } catch (const ValueError& e) {
    throw ValueError(std::string("bad graph: ") + e.what());
  }
}

graph::Graph graph_from_metadata(const std::map<std::string, std::string>& metadata) {
  const auto g = metadata.find("convcore_graph");
  if (g != metadata.end()) return graph_from_json(g->second);
  const auto a = metadata.find("convcore_architecture");
  if (a == metadata.end())
    throw ValueError("no convcore graph or architecture in the metadata (not saved by "
                     "convcore.save? read its tensors with convcore::SafetensorsFile)");
  const json::Value arch = parse_json(a->second, "architecture");
  json::Value lowered;
  try {
    lowered = lower_architecture(arch);
  } catch (const ValueError& e) {
    throw ValueError(std::string("cannot rebuild the architecture: ") + e.what());
  }
  try {
    return graph::parse_graph(lowered);
  } catch (const ValueError& e) {
    throw ValueError(std::string("cannot rebuild the architecture: ") + e.what());
  }
}

DType match_tensors(const graph::Graph& g, const std::vector<TensorInfo>& tensors) {
  std::vector<graph::TensorSpec> specs;
  for (const auto& n : g.nodes)
    for (auto& s : graph::tensor_specs(n)) specs.push_back(std::move(s));
  std::set<std::string> have, want;
  for (const auto& t : tensors) have.insert(t.name);
  std::vector<std::string> missing, unexpected;
  for (const auto& s : specs) {
    if (!want.insert(s.key).second)
      throw ValueError("bad graph: two layers hold the tensor " + json::repr(s.key));
    if (!have.count(s.key)) missing.push_back(s.key);
  }
  for (const auto& t : tensors)
    if (!want.count(t.name)) unexpected.push_back(t.name);
  if (!missing.empty() || !unexpected.empty()) {
    std::string parts;
    if (!missing.empty()) parts += "missing " + py_list(missing);
    if (!unexpected.empty())
      parts += (parts.empty() ? "" : "; ") + std::string("unexpected ") + py_list(unexpected);
    throw ValueError("the tensors do not match the graph: " + parts);
  }
  bool any_float = false, all_f64 = true;
  for (const auto& t : tensors)
    if (is_float_dtype(t.dtype)) any_float = true, all_f64 = all_f64 && t.dtype == "F64";
  const DType dtype = any_float && all_f64 ? DType::Float64 : DType::Float32;
  for (const auto& s : specs) {
    const auto& t = *std::find_if(tensors.begin(), tensors.end(),
                                  [&](const TensorInfo& i) { return i.name == s.key; });
    if (t.shape != s.shape)
      throw ValueError("tensor " + json::repr(s.key) + " has shape " + shape_list(t.shape) +
                       " but the graph needs " + shape_list(s.shape));
    const bool ok = s.is_float ? is_float_dtype(t.dtype) : is_int_dtype(t.dtype);
    if (!ok)
      throw ValueError("tensor " + json::repr(s.key) + " has dtype " + numpy_name(t.dtype) +
                       ", the model needs " + (s.is_float ? dtype_name(dtype) : "int64"));
  }
  return dtype;
}

void check_input_shape(const graph::Graph& g) {
  if (g.input_shape.empty()) return;
  try {
    graph::infer_shapes(g, g.input_shape);
  } catch (const ValueError& e) {
    throw ValueError("the graph does not work on its input shape " + shape_str(g.input_shape) +
                     ": " + e.what());
  }
}

}  // namespace convcore
