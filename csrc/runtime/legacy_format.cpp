// Files of format 1 (docs/format.md): the module tree of
// Module.architecture() and no graph. They are lowered here to a graph of
// format 2, which the one graph reader then checks like any other. The
// containers of format 1 are a closed set (Sequential, the builder's
// Network, ResNet, BasicBlock, Bottleneck, Graph) whose children are all
// listed in the tree, so lowering needs only how each runs its children,
// never how it builds them; this file is frozen: models of later versions
// are written as graphs by Python.
#include "model_file.h"

#include <algorithm>
#include <cctype>
#include <set>

#include "convcore/errors.h"

namespace convcore {

namespace {

// Bounds of the Python reader's _check_tree: deeper or larger trees are not
// real networks.
constexpr int kMaxArchDepth = 64;
constexpr int64_t kMaxArchNodes = 100000;

std::string join(const std::string& prefix, const std::string& name) {
  return prefix.empty() ? name : prefix + "." + name;
}

std::string where(const std::string& path) { return path.empty() ? "the root" : json::repr(path); }

json::Value string_value(const std::string& s) {
  json::Value v;
  v.kind = json::Kind::String;
  v.string = s;
  return v;
}

json::Value int_value(int64_t i) {
  json::Value v;
  v.kind = json::Kind::Int;
  v.integer = i;
  v.number = static_cast<double>(i);
  return v;
}

json::Value array_value(std::vector<json::Value> items) {
  json::Value v;
  v.kind = json::Kind::Array;
  v.items = std::move(items);
  return v;
}

json::Value object_value(std::vector<std::pair<std::string, json::Value>> members) {
  json::Value v;
  v.kind = json::Kind::Object;
  v.members = std::move(members);
  return v;
}

void check_tree(const json::Value& node, int depth, int64_t& count) {
  ++count;
  if (depth > kMaxArchDepth)
    throw ValueError("the architecture is nested more than " + std::to_string(kMaxArchDepth) +
                     " levels deep");
  if (count > kMaxArchNodes)
    throw ValueError("the architecture has more than " + std::to_string(kMaxArchNodes) +
                     " modules");
  const json::Value* type = node.is_object() ? node.find("type") : nullptr;
  if (!type || !type->is_string())
    throw ValueError("bad architecture node (needs a dict with a string 'type'): " +
                     json::short_repr(node));
  const json::Value* config = node.find("config");
  if (config && !config->is_object())
    throw ValueError("architecture node " + json::repr(type->string) +
                     ": 'config' is not an object");
  const json::Value* children = node.find("children");
  if (children && !children->is_object())
    throw ValueError("architecture node " + json::repr(type->string) +
                     ": 'children' is not an object");
  if (children)
    for (const auto& c : children->members) check_tree(c.second, depth + 1, count);
}

const char* const kLayers[] = {"Conv2d", "Linear", "BatchNorm2d", "MaxPool2d", "AvgPool2d",
                               "AdaptiveAvgPool2d", "ReLU", "ReLU6", "Sigmoid", "SiLU",
                               "Hardswish", "Hardsigmoid", "LocalResponseNorm", "Flatten",
                               "Dropout", "StochasticDepth", "Identity"};
const char* const kKnownTypes =
    "AdaptiveAvgPool2d, AvgPool2d, BasicBlock, BatchNorm2d, Bottleneck, Conv2d, Dropout, "
    "Flatten, Graph, Hardsigmoid, Hardswish, Identity, Linear, LocalResponseNorm, MaxPool2d, "
    "Network, ReLU, ReLU6, ResNet, Sequential, SiLU, Sigmoid, StochasticDepth";

bool is_layer(const std::string& type) {
  return std::any_of(std::begin(kLayers), std::end(kLayers),
                     [&](const char* t) { return type == t; });
}

class Lowering {
 public:
  std::vector<json::Value> nodes;
  json::Value name;         // the root's name (null when none)
  json::Value input_shape;  // one sample's (null when the root declares none)

  // Lowers `node` (at `path`) applied to value x; returns its output value.
  std::string lower(const json::Value& node, const std::string& path, const std::string& x) {
    const std::string type = node.find("type")->string;
    const json::Value* config = node.find("config");
    const json::Value* children = node.find("children");
    if (type == "Sequential") {
      std::string v = x;
      if (children)
        for (const auto& c : children->members) v = lower(c.second, join(path, c.first), v);
      return v;
    }
    if (type == "Network") return network(node, path, x);
    if (type == "ResNet") return resnet(node, path, x);
    if (type == "BasicBlock" || type == "Bottleneck") return residual(node, path, x);
    if (type == "Graph") return graph(node, path, x);
    if (!is_layer(type))
      throw ValueError("unknown module type " + json::repr(type) + " at " + where(path) +
                       " in the architecture (known: " + kKnownTypes + ")");
    if (children && !children->members.empty())
      throw ValueError(type + " at " + where(path) + ": the architecture lists children " +
                       names(*children) + " but a " + type + " has none");
    json::Value attrs = config ? *config : object_value({});
    return add(type, path, std::move(attrs), {x}, true);
  }

  // A node; `hint` names its output value (made unique) and, for a layer of
  // the tree (named), the node itself.
  std::string add(const std::string& op, const std::string& hint, json::Value attrs,
                  const std::vector<std::string>& inputs, bool named = false) {
    std::string out = hint.empty() ? op : hint;
    const std::string base = out;
    for (int k = 1; used_.count(out); ++k) out = base + "_" + std::to_string(k);
    used_.insert(out);
    std::vector<json::Value> in;
    for (const auto& i : inputs) in.push_back(string_value(i));
    std::vector<std::pair<std::string, json::Value>> members = {{"op", string_value(op)}};
    if (named) members.emplace_back("name", string_value(hint));
    if (!attrs.members.empty()) members.emplace_back("attrs", std::move(attrs));
    members.emplace_back("inputs", array_value(std::move(in)));
    members.emplace_back("outputs", array_value({string_value(out)}));
    nodes.push_back(object_value(std::move(members)));
    return out;
  }

 private:
  std::set<std::string> used_ = {"x"};

  static std::string names(const json::Value& children) {
    std::string s = "[";
    for (std::size_t i = 0; i < children.members.size(); ++i)
      s += (i ? ", " : "") + json::repr(children.members[i].first);
    return s + "]";
  }

  // The children a container lists, which must be exactly `expected` (in
  // order; optional ones may be missing).
  static std::vector<const json::Value*> listed(const json::Value& node, const std::string& path,
                                                const std::vector<std::string>& expected,
                                                const std::vector<std::string>& optional = {}) {
    const std::string type = node.find("type")->string;
    const json::Value* children = node.find("children");
    std::vector<const json::Value*> out;
    std::vector<std::string> got;
    if (children)
      for (const auto& c : children->members) got.push_back(c.first);
    std::vector<std::string> want;
    for (const auto& e : expected)
      if (std::find(optional.begin(), optional.end(), e) == optional.end() ||
          std::find(got.begin(), got.end(), e) != got.end())
        want.push_back(e);
    if (got != want) {
      std::string w = "[";
      for (std::size_t i = 0; i < want.size(); ++i) w += (i ? ", " : "") + json::repr(want[i]);
      throw ValueError(type + " at " + where(path) + ": the architecture lists children " +
                       (children ? names(*children) : std::string("[]")) + " but a " + type +
                       " has " + w + "]");
    }
    if (children)
      for (const auto& c : children->members) out.push_back(&c.second);
    return out;
  }

  void root_labels(const json::Value* config, const std::string& path, const char* shape_key) {
    if (!path.empty() || !config) return;
    const json::Value* n = config->find("name");
    if (n && n->is_string()) name = *n;
    const json::Value* s = config->find(shape_key);
    if (!s) return;
    if (std::string(shape_key) == "input_size" && s->is_int()) {  // ResNet's input_size: a side
      input_shape = array_value({int_value(3), *s, *s});
    } else if (std::string(shape_key) == "input_size" && s->is_array() && s->items.size() == 2) {
      input_shape = array_value({int_value(3), s->items[0], s->items[1]});
    } else if (!s->is_null()) {
      input_shape = *s;
    }
  }

  std::string network(const json::Value& node, const std::string& path, const std::string& x) {
    root_labels(node.find("config"), path, "input_shape");
    if (path.empty() && name.is_null()) name = string_value("Network");
    const auto parts = listed(node, path, {"features", "classifier"});
    std::string v = lower(*parts[0], join(path, "features"), x);
    const json::Value* cls = parts[1]->find("children");
    if (cls && !cls->members.empty()) {
      v = add("Flatten", join(path, "flatten"), object_value({}), {v});
      v = lower(*parts[1], join(path, "classifier"), v);
    }
    return v;
  }

  std::string resnet(const json::Value& node, const std::string& path, const std::string& x) {
    root_labels(node.find("config"), path, "input_size");
    if (path.empty() && name.is_null()) name = string_value("ResNet");
    if (path.empty() && input_shape.is_null())
      input_shape = array_value({int_value(3), int_value(224), int_value(224)});
    const std::vector<std::string> parts = {"conv1",  "bn1",    "maxpool", "layer1", "layer2",
                                            "layer3", "layer4", "avgpool", "fc"};
    const auto c = listed(node, path, parts);
    std::string v = lower(*c[0], join(path, "conv1"), x);
    v = lower(*c[1], join(path, "bn1"), v);
    v = add("ReLU", join(path, "relu"), object_value({}), {v});
    for (std::size_t i = 2; i < 8; ++i) v = lower(*c[i], join(path, parts[i]), v);
    v = add("Flatten", join(path, "flatten"), object_value({}), {v});
    return lower(*c[8], join(path, "fc"), v);
  }

  // out = relu(body(x) + shortcut(x)), a ReLU after every BatchNorm2d of the
  // body but the last (nn/residual.py).
  std::string residual(const json::Value& node, const std::string& path, const std::string& x) {
    const bool basic = node.find("type")->string == "BasicBlock";
    const std::vector<std::string> body =
        basic ? std::vector<std::string>{"conv1", "bn1", "conv2", "bn2"}
              : std::vector<std::string>{"conv1", "bn1", "conv2", "bn2", "conv3", "bn3"};
    std::vector<std::string> all = body;
    all.push_back("downsample");
    const auto c = listed(node, path, all, {"downsample"});
    std::string v = x;
    for (std::size_t i = 0; i < body.size(); ++i) {
      v = lower(*c[i], join(path, body[i]), v);
      if (body[i].rfind("bn", 0) == 0 && i + 1 != body.size())
        v = add("ReLU", join(path, "relu"), object_value({}), {v});
    }
    const std::string shortcut =
        c.size() > body.size() ? lower(*c.back(), join(path, "downsample"), x) : x;
    v = add("add", join(path, "add"), object_value({}), {v, shortcut});
    return add("ReLU", join(path, "relu"), object_value({}), {v});
  }

  static std::string trim(const std::string& s) {
    const auto b = s.find_first_not_of(" \t\r\n");
    if (b == std::string::npos) return "";
    return s.substr(b, s.find_last_not_of(" \t\r\n") - b + 1);
  }
  static bool identifier(const std::string& s) {
    if (s.empty() || !(std::isalpha(static_cast<unsigned char>(s[0])) || s[0] == '_')) return false;
    for (char ch : s)
      if (!(std::isalnum(static_cast<unsigned char>(ch)) || ch == '_')) return false;
    return true;
  }

  // A Graph's lines "out = op(a, b)", where op is a child or a join
  // (concat, add, mul, relu); the first of its outputs is what it gives.
  std::string graph(const json::Value& node, const std::string& path, const std::string& x) {
    const json::Value* config = node.find("config");
    const std::string at = "bad config for Graph at " + where(path) + ": ";
    root_labels(config, path, "input_shape");
    if (path.empty() && name.is_null()) name = string_value("Graph");
    const json::Value* lines = config ? config->find("nodes") : nullptr;
    if (!lines || !lines->is_array() || lines->items.empty())
      throw ValueError(at + "nodes must be a non-empty list of strings");
    std::vector<std::pair<std::string, const json::Value*>> children;
    if (const json::Value* ch = node.find("children"))
      for (const auto& c : ch->members) children.emplace_back(c.first, &c.second);
    std::vector<std::pair<std::string, std::string>> values = {{"x", x}};  // local -> graph value
    auto value = [&](const std::string& local) -> const std::string* {
      for (const auto& v : values)
        if (v.first == local) return &v.second;
      return nullptr;
    };
    std::vector<bool> called(children.size(), false);
    for (const auto& item : lines->items) {
      if (!item.is_string())
        throw ValueError(at + "a graph node must be a string 'name = op(inputs)', got " +
                         json::short_repr(item));
      const std::string& line = item.string;
      const auto eq = line.find('='), open = line.find('('), close = line.rfind(')');
      const std::string bad = at + "bad graph node " + json::repr(line) +
                              ": expected 'name = op(input, ...)', e.g. 'out = concat(b1, b2)'";
      if (eq == std::string::npos || open == std::string::npos || close == std::string::npos ||
          !(eq < open && open < close) || !trim(line.substr(close + 1)).empty())
        throw ValueError(bad);
      const std::string out = trim(line.substr(0, eq));
      const std::string op = trim(line.substr(eq + 1, open - eq - 1));
      if (!identifier(out) || !identifier(op)) throw ValueError(bad);
      std::vector<std::string> inputs;
      const std::string args = line.substr(open + 1, close - open - 1);
      for (std::size_t start = 0;;) {
        const auto comma = args.find(',', start);
        const std::string a = trim(args.substr(start, comma == std::string::npos ? std::string::npos
                                                                                  : comma - start));
        if (!identifier(a)) throw ValueError(bad);
        const std::string* v = value(a);
        if (!v)
          throw ValueError(at + "graph node " + json::repr(out) + " takes " + json::repr(a) +
                           ", which no earlier node defines");
        inputs.push_back(*v);
        if (comma == std::string::npos) break;
        start = comma + 1;
      }
      if (value(out)) throw ValueError(at + "graph value " + json::repr(out) + " is defined twice");
      std::string result;
      std::size_t k = 0;
      while (k < children.size() && children[k].first != op) ++k;
      if (k < children.size()) {
        if (called[k])
          throw ValueError(at + "module " + json::repr(op) +
                           " is called twice (give each call its own module)");
        if (inputs.size() != 1)
          throw ValueError(at + "graph node " + json::repr(out) + ": module " + json::repr(op) +
                           " takes one input, got " + std::to_string(inputs.size()));
        called[k] = true;
        result = lower(*children[k].second, join(path, op), inputs[0]);
      } else if (op == "concat" || op == "add" || op == "mul") {
        result = add(op, join(path, out), object_value({}), inputs);
      } else if (op == "relu") {
        result = add("ReLU", join(path, out), object_value({}), inputs);
      } else {
        throw ValueError(at + "graph node " + json::repr(out) + ": " + json::repr(op) +
                         " is neither a child module nor a join (concat, add, mul, relu)");
      }
      values.emplace_back(out, result);
    }
    for (std::size_t k = 0; k < children.size(); ++k)
      if (!called[k])
        throw ValueError(at + "module " + json::repr(children[k].first) +
                         " is not called by any graph node");
    const std::string* first = &values.back().second;
    if (const json::Value* outs = config->find("outputs")) {
      if (!outs->is_array() || outs->items.empty())
        throw ValueError(at + "outputs must be a non-empty list of node names, got " +
                         json::short_repr(*outs));
      for (const auto& o : outs->items)
        if (!o.is_string() || !value(o.string))
          throw ValueError(at + "graph output " + json::short_repr(o) + " is not a node");
      first = value(outs->items[0].string);
      if (path.empty())  // the root's other outputs (auxiliary heads) stay outputs
        for (const auto& o : outs->items) root_outputs_.push_back(*value(o.string));
    }
    return *first;
  }

 public:
  std::vector<std::string> root_outputs_;
};

}  // namespace

json::Value lower_architecture(const json::Value& arch) {
  int64_t count = 0;
  check_tree(arch, 0, count);
  Lowering l;
  const std::string out = l.lower(arch, "", "x");
  if (l.name.is_null()) l.name = string_value(arch.find("type")->string);  // "Sequential"
  std::vector<json::Value> outputs;
  if (l.root_outputs_.empty()) l.root_outputs_.push_back(out);
  for (const auto& o : l.root_outputs_) outputs.push_back(string_value(o));
  return object_value({{"version", int_value(graph::kFormatVersion)},
                       {"name", l.name},
                       {"input_shape", l.input_shape},
                       {"inputs", array_value({string_value("x")})},
                       {"outputs", array_value(std::move(outputs))},
                       {"nodes", array_value(std::move(l.nodes))}});
}

}  // namespace convcore
