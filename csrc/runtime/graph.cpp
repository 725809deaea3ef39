// The reader of the network graph (docs/format.md). Each layer's attributes
// are checked as the Python layer's constructor checks its arguments, in the
// same words, so that a file is refused for the same reasons whichever
// language reads it.
#include "graph.h"

#include <algorithm>
#include <map>
#include <sstream>
#include <unordered_map>

#include "convcore/errors.h"

namespace convcore {
namespace graph {

namespace {

std::string pair_str(int64_t a, int64_t b) {
  return "(" + std::to_string(a) + ", " + std::to_string(b) + ")";
}

// A node's attributes, read strictly: known keys only, each of the right type.
class Attrs {
 public:
  Attrs(const json::Value* attrs, const std::string& where, std::vector<std::string> known)
      : attrs_(attrs), where_(where) {
    if (!attrs_) return;
    for (const auto& m : attrs_->members) {
      if (std::find(known.begin(), known.end(), m.first) == known.end()) {
        std::string list;
        for (const auto& k : known) list += (list.empty() ? "" : ", ") + k;
        fail("unknown attribute " + json::repr(m.first) +
             (known.empty() ? " (it takes none)" : " (known: " + list + ")"));
      }
    }
  }

  [[noreturn]] void fail(const std::string& what) const { throw ValueError(where_ + what); }

  const json::Value* get(const std::string& key) const {
    return attrs_ ? attrs_->find(key) : nullptr;
  }
  bool has(const std::string& key) const { return get(key) != nullptr; }
  const json::Value& required(const std::string& key) const {
    const json::Value* v = get(key);
    if (!v) fail("missing " + json::repr(key));
    return *v;
  }

  int64_t integer(const std::string& key, const json::Value& v) const {
    if (!v.is_int()) fail(key + " must be an int, got " + json::short_repr(v));
    return v.integer;
  }
  int64_t integer(const std::string& key, int64_t fallback) const {
    const json::Value* v = get(key);
    return v ? integer(key, *v) : fallback;
  }
  int64_t positive(const std::string& key) const {
    const int64_t v = integer(key, required(key));
    if (v <= 0) fail(key + " must be a positive int, got " + std::to_string(v));
    return v;
  }
  // An int or an (h, w) pair of ints, as Python's _pair.
  std::pair<int64_t, int64_t> pair(const std::string& key, const json::Value& v) const {
    if (v.is_int()) return {v.integer, v.integer};
    if (v.is_array() && v.items.size() == 2 && v.items[0].is_int() && v.items[1].is_int())
      return {v.items[0].integer, v.items[1].integer};
    fail(key + " must be an int or a pair (h, w) of ints, got " + json::short_repr(v));
  }
  std::pair<int64_t, int64_t> pair(const std::string& key) const {
    return pair(key, required(key));
  }
  std::pair<int64_t, int64_t> pair(const std::string& key, int64_t fallback) const {
    const json::Value* v = get(key);
    return v ? pair(key, *v) : std::make_pair(fallback, fallback);
  }
  bool boolean(const std::string& key, bool fallback) const {
    const json::Value* v = get(key);
    if (!v) return fallback;
    if (!v->is_bool()) fail(key + " must be true or false, got " + json::short_repr(*v));
    return v->boolean;
  }
  double real(const std::string& key, double fallback) const {
    const json::Value* v = get(key);
    if (!v) return fallback;
    if (!v->is_number()) fail(key + " must be a number, got " + json::short_repr(*v));
    return v->number;
  }
  std::string string(const std::string& key, const std::string& fallback) const {
    const json::Value* v = get(key);
    if (!v) return fallback;
    if (!v->is_string()) fail(key + " must be a string, got " + json::short_repr(*v));
    return v->string;
  }
  // The dtype argument of Conv2d/Linear/BatchNorm2d: accepted, but the
  // parameters take the file's dtype.
  void dtype() const {
    const json::Value* v = get("dtype");
    if (v && !(v->is_null() ||
               (v->is_string() && (v->string == "float32" || v->string == "float64"))))
      fail("dtype must be \"float32\" or \"float64\", got " + json::short_repr(*v));
  }
  // A probability in [0, 1] (Dropout, StochasticDepth).
  double probability(const std::string& key) const {
    const double p = real(key, 0.5);
    if (!(p >= 0.0 && p <= 1.0))
      fail(key + " must be a probability in [0, 1], got " + json::short_repr(required(key)));
    return p;
  }

 private:
  const json::Value* attrs_;
  std::string where_;
};

void parse_conv(Node& n, const Attrs& a) {
  a.dtype();
  ConvAttrs& c = n.conv;
  c.in = a.positive("in_channels");
  c.out = a.positive("out_channels");
  const int64_t groups = a.has("groups") ? a.positive("groups") : 1;
  if (c.in % groups || c.out % groups)
    a.fail("groups=" + std::to_string(groups) + " must divide in_channels=" +
           std::to_string(c.in) + " and out_channels=" + std::to_string(c.out));
  std::tie(c.kh, c.kw) = a.pair("kernel_size");
  if (c.kh < 1 || c.kw < 1)
    a.fail("kernel_size must be positive, got " + json::short_repr(a.required("kernel_size")));
  Conv2dParams& p = c.p;
  p.groups = groups;
  std::tie(p.stride_h, p.stride_w) = a.pair("stride", 1);
  std::tie(p.dilation_h, p.dilation_w) = a.pair("dilation", 1);
  const json::Value* pad = a.get("padding");
  if (pad && pad->is_string()) {
    if (pad->string == "valid") {
      c.padding_text = "'valid'";
    } else if (pad->string == "same") {
      if (p.stride_h != 1 || p.stride_w != 1)
        a.fail("padding='same' is not supported for strided convolutions");
      c.padding_text = "'same'";
    } else {
      a.fail("padding must be 'same', 'valid', an int or a pair, got " + json::repr(pad->string));
    }
  } else {
    int64_t ph = 0, pw = 0;
    if (pad) std::tie(ph, pw) = a.pair("padding", *pad);
    p.pad_top = p.pad_bottom = ph;
    p.pad_left = p.pad_right = pw;
    c.padding_text = pair_str(ph, pw);
  }
  try {
    c.mode = parse_pad_mode(a.string("padding_mode", "zeros"));
    check_conv2d_params(p);  // the ranges first: same_padding multiplies
    if (c.kh > kMaxParam || c.kw > kMaxParam)
      throw ValueError("kernel_size must be at most " + std::to_string(kMaxParam));
    if (c.padding_text == "'same'") {
      same_padding(c.kh, p.dilation_h, &p.pad_top, &p.pad_bottom);
      same_padding(c.kw, p.dilation_w, &p.pad_left, &p.pad_right);
      check_conv2d_params(p);
    }
  } catch (const ValueError& e) {
    a.fail(e.what());
  }
  c.bias = a.boolean("bias", true);
  std::string s = std::to_string(c.in) + ", " + std::to_string(c.out) +
                  ", kernel_size=" + pair_str(c.kh, c.kw) +
                  ", stride=" + pair_str(p.stride_h, p.stride_w) + ", padding=" + c.padding_text;
  if (p.dilation_h != 1 || p.dilation_w != 1)
    s += ", dilation=" + pair_str(p.dilation_h, p.dilation_w);
  if (p.groups != 1) s += ", groups=" + std::to_string(p.groups);
  if (!c.bias) s += ", bias=False";
  if (c.mode != PadMode::Zeros) s += std::string(", padding_mode=") + pad_mode_name(c.mode);
  n.args = s;
}

// kernel_size, stride (null: the kernel size) and padding of both poolings.
void parse_pool_common(Node& n, const Attrs& a) {
  Pool2dParams& p = n.pool;
  std::tie(p.kernel_h, p.kernel_w) = a.pair("kernel_size");
  const json::Value* s = a.get("stride");
  if (s && !s->is_null())
    std::tie(p.stride_h, p.stride_w) = a.pair("stride", *s);
  else
    p.stride_h = p.kernel_h, p.stride_w = p.kernel_w;
  std::tie(p.pad_h, p.pad_w) = a.pair("padding", 0);
  p.ceil_mode = a.boolean("ceil_mode", false);
}

void check_pool(const Node& n, const Attrs& a) {
  try {
    check_pool2d_params(n.pool);
  } catch (const ValueError& e) {
    a.fail(e.what());
  }
}

void parse_max_pool(Node& n, const Attrs& a) {
  parse_pool_common(n, a);
  Pool2dParams& p = n.pool;
  std::tie(p.dilation_h, p.dilation_w) = a.pair("dilation", 1);
  check_pool(n, a);
  n.args = "kernel_size=" + pair_str(p.kernel_h, p.kernel_w) +
           ", stride=" + pair_str(p.stride_h, p.stride_w) +
           ", padding=" + pair_str(p.pad_h, p.pad_w) +
           ", dilation=" + pair_str(p.dilation_h, p.dilation_w) +
           ", ceil_mode=" + (p.ceil_mode ? "True" : "False");
}

void parse_avg_pool(Node& n, const Attrs& a) {
  parse_pool_common(n, a);
  Pool2dParams& p = n.pool;
  p.count_include_pad = a.boolean("count_include_pad", true);
  const json::Value* d = a.get("divisor_override");
  if (d && !d->is_null()) {
    p.divisor_override = a.integer("divisor_override", *d);
    if (p.divisor_override == 0) a.fail("divisor_override must be a non-zero int or None, got 0");
  }
  check_pool(n, a);
  n.args = "kernel_size=" + pair_str(p.kernel_h, p.kernel_w) +
           ", stride=" + pair_str(p.stride_h, p.stride_w) +
           ", padding=" + pair_str(p.pad_h, p.pad_w) +
           ", ceil_mode=" + (p.ceil_mode ? "True" : "False") +
           ", count_include_pad=" + (p.count_include_pad ? "True" : "False");
  if (p.divisor_override) n.args += ", divisor_override=" + std::to_string(p.divisor_override);
}

void parse_adaptive(Node& n, const Attrs& a) {
  const json::Value& v = a.required("output_size");
  int64_t oh = -1, ow = -1;  // -1: None, the input's size
  if (v.is_int()) {
    oh = ow = v.integer;
  } else if (v.is_array() && v.items.size() == 2 &&
             (v.items[0].is_int() || v.items[0].is_null()) &&
             (v.items[1].is_int() || v.items[1].is_null())) {
    oh = v.items[0].is_null() ? -1 : v.items[0].integer;
    ow = v.items[1].is_null() ? -1 : v.items[1].integer;
  } else {
    a.fail("output_size must be an int or a pair (h, w) of ints or None, got " +
           json::short_repr(v));
  }
  if ((v.is_int() && oh < 0) || (v.is_array() && ((!v.items[0].is_null() && oh < 0) ||
                                                  (!v.items[1].is_null() && ow < 0))))
    a.fail("output_size must be non-negative, got " + json::short_repr(v));
  n.adaptive_h = oh, n.adaptive_w = ow;
  auto s = [](int64_t x) { return x < 0 ? std::string("None") : std::to_string(x); };
  n.args = "output_size=(" + s(oh) + ", " + s(ow) + ")";
}

void parse_linear(Node& n, const Attrs& a) {
  a.dtype();
  n.in_features = a.positive("in_features");
  n.out_features = a.positive("out_features");
  n.linear_bias = a.boolean("bias", true);
  n.args = "in_features=" + std::to_string(n.in_features) +
           ", out_features=" + std::to_string(n.out_features) +
           ", bias=" + (n.linear_bias ? "True" : "False");
}

void parse_batch_norm(Node& n, const Attrs& a) {
  a.dtype();
  BatchNormAttrs& b = n.bn;
  b.channels = a.positive("num_features");
  b.eps = a.real("eps", 1e-5);
  a.real("momentum", 0.1);
  if (!(b.eps >= 0.0)) a.fail("eps must be a non-negative number");
  b.affine = a.boolean("affine", true);
  b.track = a.boolean("track_running_stats", true);
  b.bias = a.boolean("bias", true);
  std::ostringstream os;
  os << b.channels << ", eps=" << b.eps;
  if (!b.affine) os << ", affine=False";
  if (b.affine && !b.bias) os << ", bias=False";
  if (!b.track) os << ", track_running_stats=False";
  n.args = os.str();
}

void parse_lrn(Node& n, const Attrs& a) {
  LrnParams& p = n.lrn;
  p.size = a.positive("size");
  p.alpha = a.real("alpha", 1e-4);
  p.beta = a.real("beta", 0.75);
  p.k = a.real("k", 1.0);
  if (p.size > kMaxParam) a.fail("size must be at most " + std::to_string(kMaxParam));
  std::ostringstream os;
  os << "size=" << p.size << ", alpha=" << p.alpha << ", beta=" << p.beta << ", k=" << p.k;
  n.args = os.str();
}

struct OpInfo {
  const char* type;
  Op op;
  std::vector<std::string> attrs;
};

const std::vector<OpInfo>& op_table() {
  static const std::vector<OpInfo> table = {
      {"Conv2d", Op::Conv2d, {"in_channels", "out_channels", "kernel_size", "stride", "padding",
                              "dilation", "groups", "bias", "padding_mode", "dtype"}},
      {"Linear", Op::Linear, {"in_features", "out_features", "bias", "dtype"}},
      {"BatchNorm2d", Op::BatchNorm2d,
       {"num_features", "eps", "momentum", "affine", "track_running_stats", "bias", "dtype"}},
      {"MaxPool2d", Op::MaxPool2d, {"kernel_size", "stride", "padding", "dilation", "ceil_mode"}},
      {"AvgPool2d", Op::AvgPool2d,
       {"kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override"}},
      {"AdaptiveAvgPool2d", Op::AdaptiveAvgPool2d, {"output_size"}},
      {"ReLU", Op::ReLU, {"inplace"}},
      {"ReLU6", Op::ReLU6, {"inplace"}},
      {"Sigmoid", Op::Sigmoid, {"inplace"}},
      {"SiLU", Op::SiLU, {"inplace"}},
      {"Hardswish", Op::Hardswish, {"inplace"}},
      {"Hardsigmoid", Op::Hardsigmoid, {"inplace"}},
      {"LocalResponseNorm", Op::LocalResponseNorm, {"size", "alpha", "beta", "k"}},
      {"Flatten", Op::Flatten, {"start_dim", "end_dim"}},
      {"Softmax", Op::Softmax, {"dim"}},
      {"Dropout", Op::Identity, {"p"}},
      {"StochasticDepth", Op::Identity, {"p", "mode"}},
      {"Identity", Op::Identity, {}},
      {"add", Op::Add, {}},
      {"mul", Op::Mul, {}},
      {"concat", Op::Concat, {}},
  };
  return table;
}

std::string known_ops() {
  std::string s;
  for (const auto& o : op_table()) s += (s.empty() ? "" : ", ") + std::string(o.type);
  return s;
}

bool holds_tensors(Op op) {
  return op == Op::Conv2d || op == Op::Linear || op == Op::BatchNorm2d;
}

void parse_attrs(Node& n, const Attrs& a) {
  switch (n.op) {
    case Op::Conv2d: return parse_conv(n, a);
    case Op::Linear: return parse_linear(n, a);
    case Op::BatchNorm2d: return parse_batch_norm(n, a);
    case Op::MaxPool2d: return parse_max_pool(n, a);
    case Op::AvgPool2d: return parse_avg_pool(n, a);
    case Op::AdaptiveAvgPool2d: return parse_adaptive(n, a);
    case Op::LocalResponseNorm: return parse_lrn(n, a);
    case Op::Flatten:
      n.start_dim = a.integer("start_dim", 1);
      n.end_dim = a.integer("end_dim", -1);
      n.args = "start_dim=" + std::to_string(n.start_dim) + ", end_dim=" + std::to_string(n.end_dim);
      return;
    case Op::Softmax:
      n.softmax_dim = a.integer("dim", a.required("dim"));
      n.args = "dim=" + std::to_string(n.softmax_dim);
      return;
    case Op::ReLU: case Op::ReLU6: case Op::Sigmoid: case Op::SiLU: case Op::Hardswish:
    case Op::Hardsigmoid:
      a.boolean("inplace", false);
      n.activation = n.op == Op::Sigmoid ? Activation::Sigmoid
                     : n.op == Op::SiLU  ? Activation::SiLU
                     : n.op == Op::ReLU6 ? Activation::ReLU6
                     : n.op == Op::Hardswish ? Activation::Hardswish
                                             : Activation::Hardsigmoid;
      return;
    case Op::Identity:
      if (n.type == "Dropout") {
        std::ostringstream os;
        os << "p=" << a.probability("p");
        n.args = os.str();
      } else if (n.type == "StochasticDepth") {
        std::ostringstream os;
        const double p = a.probability("p");
        const std::string mode = a.string("mode", "row");
        if (mode != "row" && mode != "batch")
          a.fail("mode must be 'row' or 'batch', got " + json::repr(mode));
        os << "p=" << p << ", mode=" << mode;
        n.args = os.str();
      }
      return;
    case Op::Add: case Op::Mul: case Op::Concat:
      return;
  }
}

const std::vector<std::string>& string_list(const json::Value& v, const std::string& what,
                                            std::size_t least, std::vector<std::string>& out) {
  if (!v.is_array()) throw ValueError(what + " must be a list of strings, got " + json::short_repr(v));
  for (const auto& item : v.items) {
    if (!item.is_string() || item.string.empty() || item.string.size() > kMaxValueName)
      throw ValueError(what + " must hold strings of 1 to " + std::to_string(kMaxValueName) +
                       " characters, got " + json::short_repr(item));
    out.push_back(item.string);
  }
  if (out.size() < least)
    throw ValueError(what + " must hold at least " + std::to_string(least) + " value" +
                     (least == 1 ? "" : "s") + ", got " + json::short_repr(v));
  return out;
}

// Python's Flatten._flat_shape, with Python's modulo for negative dims.
Shape flat_shape(const Shape& shape, int64_t start, int64_t end) {
  const int64_t nd = static_cast<int64_t>(shape.size());
  auto mod = [nd](int64_t d) { return nd ? ((d % nd) + nd) % nd : 0; };
  const int64_t s = mod(start), e = mod(end);
  if (s > e)
    throw ValueError("Flatten: start_dim " + std::to_string(start) + " comes after end_dim " +
                     std::to_string(end) + " for an input of shape " + shape_str(shape));
  Shape out(shape.begin(), shape.begin() + s);
  if (nd) {
    out.push_back(numel(Shape(shape.begin() + s, shape.begin() + e + 1)));
    out.insert(out.end(), shape.begin() + e + 1, shape.end());
  } else {
    out.push_back(1);
  }
  return out;
}

void check_image_sample(const Shape& s, const std::string& layer) {
  if (s.size() != 3)
    throw ValueError(layer + " expects one sample of shape (C, H, W), got " + shape_str(s));
}

Shape node_shape(const Node& n, const std::vector<Shape>& in) {
  const Shape& s = in[0];
  switch (n.op) {
    case Op::Conv2d: {
      check_image_sample(s, n.type);
      const ConvAttrs& c = n.conv;
      const Shape4 w{c.out, c.in / c.p.groups, c.kh, c.kw};
      Shape4 x{1, s[0], s[1], s[2]};
      Conv2dParams p = c.p;
      if (c.mode != PadMode::Zeros) {
        // explicit padding, then an unpadded convolution (as Python's Conv2d);
        // the sum is checked: a file may declare any input size
        if (__builtin_add_overflow(x.h, p.pad_top + p.pad_bottom, &x.h) ||
            __builtin_add_overflow(x.w, p.pad_left + p.pad_right, &x.w))
          throw ValueError("the input's height and width plus the padding must fit in 64 bits, "
                           "got (" + std::to_string(s[1]) + ", " + std::to_string(s[2]) + ")");
        p.pad_top = p.pad_bottom = p.pad_left = p.pad_right = 0;
      }
      const Shape4 o = conv2d_output_shape(x, w, p);
      return {o.c, o.h, o.w};
    }
    case Op::MaxPool2d:
    case Op::AvgPool2d: {
      check_image_sample(s, n.type);
      const Shape4 x{1, s[0], s[1], s[2]};
      const Shape4 o = n.op == Op::MaxPool2d ? max_pool2d_output_shape(x, n.pool)
                                             : avg_pool2d_output_shape(x, n.pool);
      return {o.c, o.h, o.w};
    }
    case Op::AdaptiveAvgPool2d: {
      check_image_sample(s, n.type);
      const Shape4 o = adaptive_avg_pool2d_output_shape(
          {1, s[0], s[1], s[2]}, n.adaptive_h < 0 ? s[1] : n.adaptive_h,
          n.adaptive_w < 0 ? s[2] : n.adaptive_w);
      return {o.c, o.h, o.w};
    }
    case Op::Linear: {
      if (s.empty() || s.back() != n.in_features)
        throw ValueError("Linear expects " + std::to_string(n.in_features) +
                         " input features, got an input of shape " + shape_str(s));
      Shape o = s;
      o.back() = n.out_features;
      return o;
    }
    case Op::BatchNorm2d:
      if (s.size() != 3 || s[0] != n.bn.channels)
        throw ValueError("BatchNorm2d(" + std::to_string(n.bn.channels) +
                         ") expects one sample of shape (" + std::to_string(n.bn.channels) +
                         ", H, W), got " + shape_str(s));
      return s;
    case Op::LocalResponseNorm:
      if (s.empty()) throw ValueError("LocalResponseNorm expects (C, ...) samples, got a scalar");
      return s;
    case Op::Flatten: {  // over the batched shape
      Shape batched(1, 1);
      batched.insert(batched.end(), s.begin(), s.end());
      const Shape f = flat_shape(batched, n.start_dim, n.end_dim);
      if (f.empty() || f[0] != 1)
        throw ValueError("Flatten with start_dim=" + std::to_string(n.start_dim) +
                         " would merge the batch dimension");
      return Shape(f.begin() + 1, f.end());
    }
    case Op::Softmax: {  // dim counts the batch dimension, which it must not be
      const int64_t nd = static_cast<int64_t>(s.size()) + 1;
      const int64_t d = n.softmax_dim;
      if (d < -nd || d >= nd)
        throw ValueError("Softmax: dim must be in [" + std::to_string(-nd) + ", " +
                         std::to_string(nd - 1) + "] for an input of " + std::to_string(nd) +
                         " dimensions (with the batch), got " + std::to_string(d));
      if (d == 0 || d == -nd)
        throw ValueError("Softmax: dim " + std::to_string(d) + " is the batch dimension; the "
                         "runtime computes each sample on its own");
      return s;
    }
    case Op::Concat: {
      Shape out = in[0];
      for (std::size_t k = 0; k < in.size(); ++k) {
        if (in[k].empty() || in[k].size() != in[0].size() ||
            !std::equal(in[k].begin() + 1, in[k].end(), in[0].begin() + 1))
          throw ValueError("concat needs inputs that differ only in channels, got " +
                           shape_str(in[0]) + " and " + shape_str(in[k]));
        if (k && __builtin_add_overflow(out[0], in[k][0], &out[0]))
          throw ValueError("the concatenated channels do not fit in 64 bits");
      }
      return out;
    }
    case Op::Add:
    case Op::Mul: {  // numpy broadcasting of equal-rank shapes
      Shape out = in[0];
      for (std::size_t k = 1; k < in.size(); ++k) {
        if (in[k].size() != out.size())
          throw ValueError(n.type + " needs inputs of one rank, got " + shape_str(out) + " and " +
                           shape_str(in[k]));
        for (std::size_t d = 0; d < out.size(); ++d) {
          if (in[k][d] == out[d] || in[k][d] == 1) continue;
          if (out[d] == 1) {
            out[d] = in[k][d];
            continue;
          }
          throw ValueError(n.type + ": inputs of shapes " + shape_str(out) + " and " +
                           shape_str(in[k]) + " do not broadcast");
        }
      }
      return out;
    }
    default:  // activations, identities
      return s;
  }
}

}  // namespace

int64_t numel(const Shape& shape) {
  int64_t n = 1;
  for (int64_t d : shape)
    if (__builtin_mul_overflow(n, d, &n))
      throw ValueError("shape " + shape_str(shape) + " has more elements than fit in 64 bits");
  return n;
}

const Tensor* Node::tensor(const std::string& role) const {
  for (const auto& t : tensors)
    if (t.first == role) return &t.second;
  return nullptr;
}

std::string Node::context(const std::vector<std::string>& values) const {
  const std::string& label = name.empty() ? values[static_cast<std::size_t>(output)] : name;
  return "layer " + json::repr(label.empty() ? std::string("<root>") : label) + " (" + type + "): ";
}

Graph parse_graph(const json::Value& v) {
  if (!v.is_object()) throw ValueError("the graph is not a JSON object");
  for (const auto& m : v.members)
    if (m.first != "version" && m.first != "name" && m.first != "input_shape" &&
        m.first != "inputs" && m.first != "outputs" && m.first != "nodes")
      throw ValueError("the graph has an unknown key " + json::repr(m.first) +
                       " (known: version, name, input_shape, inputs, outputs, nodes)");
  const json::Value* version = v.find("version");
  if (!version || !version->is_int())
    throw ValueError("the graph has no integer 'version'");
  if (version->integer != kFormatVersion)
    throw ValueError("graph format version " + std::to_string(version->integer) +
                     " is not one this convcore reads (it reads version " +
                     std::to_string(kFormatVersion) + "; a newer convcore wrote the file?)");
  Graph g;
  if (const json::Value* name = v.find("name")) {
    if (!name->is_null() && !name->is_string())
      throw ValueError("the graph's name must be a string or null, got " + json::short_repr(*name));
    if (name->is_string()) g.name = name->string;
  }
  if (const json::Value* in = v.find("input_shape")) {
    if (!in->is_null()) {
      bool ok = in->is_array() && !in->items.empty() && in->items.size() <= kMaxDims - 1;
      for (const auto& d : in->items) ok = ok && d.is_int() && d.integer >= 1;
      if (!ok)
        throw ValueError("the graph's input_shape must be null or a list of 1 to " +
                         std::to_string(kMaxDims - 1) + " positive ints, got " +
                         json::short_repr(*in));
      for (const auto& d : in->items) g.input_shape.push_back(d.integer);
    }
  }
  std::vector<std::string> inputs;
  const json::Value* inputs_v = v.find("inputs");
  if (!inputs_v) throw ValueError("the graph has no 'inputs'");
  string_list(*inputs_v, "the graph's inputs", 1, inputs);
  if (inputs.size() != 1)
    throw ValueError("the graph must have exactly one input, got " + json::short_repr(*inputs_v));
  std::unordered_map<std::string, int> index;
  g.values.push_back(inputs[0]);
  index[inputs[0]] = 0;

  const json::Value* nodes = v.find("nodes");
  if (!nodes || !nodes->is_array())
    throw ValueError("the graph needs a list of 'nodes'");
  if (static_cast<int64_t>(nodes->items.size()) > kMaxNodes)
    throw ValueError("the graph has more than " + std::to_string(kMaxNodes) + " nodes");
  std::map<std::string, std::size_t> names;  // layer name -> node
  for (std::size_t i = 0; i < nodes->items.size(); ++i) {
    const json::Value& nv = nodes->items[i];
    const std::string at = "graph node " + std::to_string(i);
    if (!nv.is_object()) throw ValueError(at + " is not an object: " + json::short_repr(nv));
    for (const auto& m : nv.members)
      if (m.first != "op" && m.first != "name" && m.first != "attrs" && m.first != "inputs" &&
          m.first != "outputs")
        throw ValueError(at + " has an unknown key " + json::repr(m.first) +
                         " (known: op, name, attrs, inputs, outputs)");
    const json::Value* op = nv.find("op");
    if (!op || !op->is_string()) throw ValueError(at + " has no string 'op'");
    Node n;
    n.type = op->string;
    const OpInfo* info = nullptr;
    for (const auto& o : op_table())
      if (n.type == o.type) info = &o;
    if (!info)
      throw ValueError(at + ": unknown op " + json::repr(n.type) + " (known: " + known_ops() + ")");
    n.op = info->op;
    if (const json::Value* name = nv.find("name")) {
      // ("" is a layer at the root of the module tree: its tensors have no prefix)
      if (!name->is_string() || name->string.size() > kMaxValueName)
        throw ValueError(at + " (" + n.type + "): name must be a string of at most " +
                         std::to_string(kMaxValueName) + " characters, got " +
                         json::short_repr(*name));
      n.name = name->string;
      if (!names.emplace(n.name, i).second)
        throw ValueError(at + " (" + n.type + "): the name " + json::repr(n.name) +
                         " is given to two nodes");
    } else if (holds_tensors(n.op)) {
      throw ValueError(at + " (" + n.type + ") has no 'name' (its tensors are '<name>.weight', ...)");
    }
    const std::string where = n.name.empty() ? at + " (" + n.type + ")"
                                             : "layer " + json::repr(n.name) + " (" + n.type + ")";
    const json::Value* attrs = nv.find("attrs");
    if (attrs && !attrs->is_object())
      throw ValueError(where + ": attrs must be an object, got " + json::short_repr(*attrs));
    parse_attrs(n, Attrs(attrs, where + ": ", info->attrs));

    std::vector<std::string> in_names, out_names;
    const json::Value* in_v = nv.find("inputs");
    const json::Value* out_v = nv.find("outputs");
    if (!in_v) throw ValueError(where + " has no 'inputs'");
    if (!out_v) throw ValueError(where + " has no 'outputs'");
    string_list(*in_v, where + ": inputs", 1, in_names);
    string_list(*out_v, where + ": outputs", 1, out_names);
    const std::size_t arity = in_names.size();
    const bool ok = n.op == Op::Add ? arity >= 2 : n.op == Op::Mul ? arity == 2
                    : n.op == Op::Concat ? arity >= 1 : arity == 1;
    if (!ok)
      throw ValueError(where + " takes " +
                       (n.op == Op::Add ? std::string("two or more inputs")
                        : n.op == Op::Mul ? std::string("two inputs")
                        : n.op == Op::Concat ? std::string("one or more inputs")
                                             : std::string("one input")) +
                       ", got " + std::to_string(arity));
    if (out_names.size() != 1)
      throw ValueError(where + " must have exactly one output, got " + json::short_repr(*out_v));
    for (const auto& name : in_names) {
      const auto it = index.find(name);
      if (it == index.end())
        throw ValueError(where + " takes " + json::repr(name) + ", which no earlier node defines");
      n.inputs.push_back(it->second);
    }
    if (index.count(out_names[0]))
      throw ValueError(where + ": the value " + json::repr(out_names[0]) + " is defined twice");
    n.output = static_cast<int>(g.values.size());
    index[out_names[0]] = n.output;
    g.values.push_back(out_names[0]);
    g.nodes.push_back(std::move(n));
  }

  std::vector<std::string> outputs;
  const json::Value* outputs_v = v.find("outputs");
  if (!outputs_v) throw ValueError("the graph has no 'outputs'");
  string_list(*outputs_v, "the graph's outputs", 1, outputs);
  for (const auto& o : outputs) {
    const auto it = index.find(o);
    if (it == index.end()) throw ValueError("the graph's output " + json::repr(o) + " is not a value");
    g.outputs.push_back(it->second);
  }
  return g;
}

std::vector<TensorSpec> tensor_specs(const Node& n) {
  std::vector<TensorSpec> out;
  auto add = [&](const char* role, Shape shape, bool is_float, bool trainable) {
    out.push_back({n.name.empty() ? role : n.name + "." + role, role, std::move(shape), is_float,
                   trainable});
  };
  switch (n.op) {
    case Op::Conv2d:
      add("weight", {n.conv.out, n.conv.in / n.conv.p.groups, n.conv.kh, n.conv.kw}, true, true);
      if (n.conv.bias) add("bias", {n.conv.out}, true, true);
      break;
    case Op::Linear:
      add("weight", {n.out_features, n.in_features}, true, true);
      if (n.linear_bias) add("bias", {n.out_features}, true, true);
      break;
    case Op::BatchNorm2d:
      if (n.bn.affine) {
        add("weight", {n.bn.channels}, true, true);
        if (n.bn.bias) add("bias", {n.bn.channels}, true, true);
      }
      if (n.bn.track) {
        add("running_mean", {n.bn.channels}, true, false);
        add("running_var", {n.bn.channels}, true, false);
        add("num_batches_tracked", {}, false, false);
      }
      break;
    default:
      break;
  }
  return out;
}

std::vector<Shape> infer_shapes(const Graph& g, const Shape& sample) {
  std::vector<Shape> shapes(g.values.size());
  shapes[0] = sample;
  for (const Node& n : g.nodes) {
    std::vector<Shape> in;
    for (int v : n.inputs) in.push_back(shapes[static_cast<std::size_t>(v)]);
    try {
      shapes[static_cast<std::size_t>(n.output)] = node_shape(n, in);
    } catch (const ValueError& e) {
      throw ValueError(n.context(g.values) + e.what());
    }
  }
  return shapes;
}

std::vector<bool> needed_nodes(const Graph& g) {
  std::vector<bool> needed(g.nodes.size(), false), want(g.values.size(), false);
  want[static_cast<std::size_t>(g.outputs[0])] = true;
  for (std::size_t i = g.nodes.size(); i-- > 0;) {
    if (!want[static_cast<std::size_t>(g.nodes[i].output)]) continue;
    needed[i] = true;
    for (int v : g.nodes[i].inputs) want[static_cast<std::size_t>(v)] = true;
  }
  return needed;
}

}  // namespace graph
}  // namespace convcore
