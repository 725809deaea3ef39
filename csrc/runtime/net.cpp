// convcore::Net: a model file (or a graph and its tensors) read by the one
// reader (model_file.h, graph.h) and run by the compiled engine (engine.h).
#include "convcore/net.h"

#include <algorithm>
#include <iomanip>
#include <sstream>

#include "convcore/errors.h"
#include "convcore/safetensors.h"
#include "engine.h"
#include "json.h"
#include "model_file.h"

namespace convcore {

namespace {

// (from the shapes: the engine may have freed the graph's copy of packed weights)
int64_t count_parameters(const graph::Node& node) {
  int64_t n = 0;
  for (const auto& s : graph::tensor_specs(node))
    if (s.trainable) n += graph::numel(s.shape);
  return n;
}

int64_t count_parameters(const graph::Graph& g) {
  int64_t n = 0;
  for (const auto& node : g.nodes) n += count_parameters(node);
  return n;
}

// Reads a node's tensors from the file, in the net's dtype.
void read_tensors(const SafetensorsFile& file, graph::Node& node, DType dtype) {
  node.tensors.clear();
  for (const auto& s : graph::tensor_specs(node)) {
    Tensor t = file.read(s.key);
    if (t.shape() != s.shape)  // (a file replaced since it was checked)
      throw ValueError("tensor " + json::repr(s.key) + " of " + json::repr(file.path()) +
                       " has shape " + t.shape_str() + ", not " + shape_str(s.shape) +
                       " as when the file was loaded");
    // (converted only when it must be: a copy of ZFNet's fc6 is 1.4 GB)
    if (s.is_float && t.dtype() != dtype) t = t.to(dtype);
    node.tensors.emplace_back(s.role, std::move(t));
  }
}

}  // namespace

struct Net::Impl {
  std::string path, name;
  std::map<std::string, std::string> metadata;
  std::unique_ptr<engine::Engine> engine;

  // Compiles for the declared input shape at load (packing the weights
  // then, not at the first forward); a net without one compiles per shape.
  void prepare() {
    const auto& shape = engine->graph().input_shape;
    if (!shape.empty()) engine->prepare(shape);
  }
};

Net::Net(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Net::Net(Net&&) noexcept = default;
Net& Net::operator=(Net&&) noexcept = default;
Net::~Net() = default;

Net Net::load(const std::string& path, const NetOptions& options) {
  auto bad = [&path](const std::string& what) {
    throw ValueError("cannot load " + json::repr(path, 4096) + ": " + what);
  };
  const SafetensorsFile file = SafetensorsFile::open(path);
  graph::Graph g;
  DType dtype = DType::Float32;
  try {
    g = graph_from_metadata(file.metadata());
    std::vector<TensorInfo> infos;
    for (const auto& e : file.entries()) infos.push_back({e.name, e.dtype, e.shape});
    dtype = match_tensors(g, infos);
    check_input_shape(g);
  } catch (const ValueError& e) {
    bad(e.what());
  }
  for (auto& node : g.nodes) read_tensors(file, node, dtype);
  auto impl = std::make_unique<Impl>();
  impl->path = path;
  impl->metadata = file.metadata();
  impl->name = g.name.empty() ? "Net" : g.name;
  impl->engine = std::make_unique<engine::Engine>(std::move(g), dtype, options);
  // the weights the engine packs are freed, and a layer's read from the
  // file again when another input shape or batch packs it anew
  impl->engine->set_reload([path, dtype](graph::Node& node) {
    read_tensors(SafetensorsFile::open(path), node, dtype);
  });
  impl->prepare();
  return Net(std::move(impl));
}

Net Net::from_graph(const std::string& graph_json, const std::map<std::string, TensorView>& tensors,
                    const NetOptions& options) {
  graph::Graph g = graph_from_json(graph_json);
  std::vector<TensorInfo> infos;
  for (const auto& t : tensors) {
    const char* dt = t.second.dtype == DType::Float32   ? "F32"
                     : t.second.dtype == DType::Float64 ? "F64"
                                                        : "I64";
    infos.push_back({t.first, dt, std::vector<int64_t>(t.second.shape, t.second.shape + t.second.ndim)});
  }
  const DType dtype = match_tensors(g, infos);
  check_input_shape(g);
  for (auto& node : g.nodes)
    for (const auto& s : graph::tensor_specs(node)) {
      Tensor t = Tensor::from_view(tensors.at(s.key));
      if (s.is_float && t.dtype() != dtype) t = t.to(dtype);
      node.tensors.emplace_back(s.role, std::move(t));
    }
  auto impl = std::make_unique<Impl>();
  impl->name = g.name.empty() ? "Net" : g.name;
  impl->engine = std::make_unique<engine::Engine>(std::move(g), dtype, options);
  impl->prepare();
  return Net(std::move(impl));
}

Tensor Net::forward(const TensorView& input) const {
  const graph::Graph& g = impl_->engine->graph();
  const DType dtype = impl_->engine->dtype();
  if (input.dtype != DType::Float32 && input.dtype != DType::Float64)
    throw TypeError(std::string("input must be float32 or float64, got ") +
                    dtype_name(input.dtype));
  if (input.dtype != dtype)
    throw TypeError(std::string("input has dtype ") + dtype_name(input.dtype) + " but the net " +
                    json::repr(impl_->name) + " is " + dtype_name(dtype) + " (convert the input)");
  if (input.ndim < 1) throw ValueError("input must be a batch (N, ...), got a scalar");
  const auto& in = g.input_shape;
  if (!in.empty() && static_cast<std::size_t>(input.ndim) != in.size() + 1) {
    std::vector<int64_t> expected = {-1};
    expected.insert(expected.end(), in.begin(), in.end());
    std::string e = shape_str(expected);
    e.replace(1, 2, "N");
    throw ValueError("input must be a batch of shape " + e + ", got " + shape_str(input));
  }
  if (!input.data && input.numel() != 0) throw ValueError("input has no data");
  return impl_->engine->forward(input);
}

DType Net::dtype() const { return impl_->engine->dtype(); }
const std::vector<int64_t>& Net::input_shape() const { return impl_->engine->graph().input_shape; }

std::vector<int64_t> Net::output_shape(const std::vector<int64_t>& sample_shape) const {
  const graph::Graph& g = impl_->engine->graph();
  return graph::infer_shapes(g, sample_shape)[static_cast<std::size_t>(g.outputs[0])];
}

std::vector<int64_t> Net::output_shape() const {
  if (input_shape().empty())
    throw ValueError("the file gives no input shape for " + json::repr(impl_->name) +
                     "; use output_shape(sample_shape)");
  return output_shape(input_shape());
}

int64_t Net::num_parameters() const { return count_parameters(impl_->engine->graph()); }
const std::string& Net::name() const { return impl_->name; }
const std::string& Net::path() const { return impl_->path; }
const std::map<std::string, std::string>& Net::metadata() const { return impl_->metadata; }

void Net::set_num_threads(int threads) { impl_->engine->set_threads(threads); }
int Net::num_threads() const { return impl_->engine->threads(); }

namespace {

std::vector<int64_t> sample_or_input(const Net& net, const std::vector<int64_t>& sample) {
  if (!sample.empty()) return sample;
  if (net.input_shape().empty())
    throw ValueError("the net " + json::repr(net.name()) +
                     " declares no input shape; give the sample shape");
  return net.input_shape();
}

}  // namespace

std::string Net::plan(int64_t batch, const std::vector<int64_t>& sample_shape) const {
  if (batch < 1) throw ValueError("batch must be positive, got " + std::to_string(batch));
  return impl_->engine->summary(sample_or_input(*this, sample_shape), batch);
}

int64_t Net::arena_bytes(int64_t batch, const std::vector<int64_t>& sample_shape) const {
  if (batch < 1) throw ValueError("batch must be positive, got " + std::to_string(batch));
  return impl_->engine->arena_bytes(sample_or_input(*this, sample_shape), batch);
}

std::vector<NetStep> Net::profile(const TensorView& input, int runs) const {
  if (runs < 1) throw ValueError("runs must be positive, got " + std::to_string(runs));
  forward(input);  // the checks
  return impl_->engine->profile(input, runs);
}

std::string Net::summary() const {
  const graph::Graph& g = impl_->engine->graph();
  std::vector<graph::Shape> shapes;
  if (!g.input_shape.empty()) shapes = graph::infer_shapes(g, g.input_shape);
  struct Row {
    std::string name, type, args, output;
    int64_t params;
  };
  std::vector<Row> rows;
  for (const auto& n : g.nodes) {
    if (n.name.empty() && n.tensors.empty()) continue;  // the joins and the containers' ReLUs
    const int64_t params = count_parameters(n);
    rows.push_back({n.name, n.type, n.args,
                    shapes.empty() ? "-" : shape_str(shapes[static_cast<std::size_t>(n.output)]),
                    params});
  }
  auto with_commas = [](int64_t v) {
    std::string s = std::to_string(v);
    for (int i = static_cast<int>(s.size()) - 3; i > 0; i -= 3)
      s.insert(static_cast<std::size_t>(i), ",");
    return s;
  };
  std::size_t wn = 5, wt = 4, wo = 6;
  for (const auto& r : rows) {
    wn = std::max(wn, r.name.size());
    wt = std::max(wt, r.type.size());
    wo = std::max(wo, r.output.size());
  }
  std::ostringstream os;
  os << impl_->name << ", " << dtype_name(dtype()) << ", " << with_commas(num_parameters())
     << " parameters";
  if (!g.input_shape.empty()) os << ", input " << shape_str(g.input_shape);
  os << "\n";
  os << std::left << std::setw(static_cast<int>(wn)) << "layer" << "  "
     << std::setw(static_cast<int>(wt)) << "type" << "  " << std::setw(static_cast<int>(wo))
     << "output" << "  " << std::right << std::setw(12) << "parameters" << "  arguments\n";
  for (const auto& r : rows)
    os << std::left << std::setw(static_cast<int>(wn)) << r.name << "  "
       << std::setw(static_cast<int>(wt)) << r.type << "  " << std::setw(static_cast<int>(wo))
       << r.output << "  " << std::right << std::setw(12) << with_commas(r.params)
       << (r.args.empty() ? "" : "  " + r.args) << "\n";
  return os.str();
}

}  // namespace convcore
