// convcore::Net: rebuilds the module tree of a saved model from the
// architecture JSON (python/convcore/nn/module.py: architecture()) and runs
// it with the core's ops, in evaluation mode.
//
// The tree is rebuilt as Python's from_architecture rebuilds it (see
// Builder): a Sequential from its children, every other module from its
// config, checked as strictly as the Python constructors check it. The
// tensors must then match the modules' parameters and buffers one to one,
// by name, shape and dtype (io.py's load).
#include "convcore/net.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstring>
#include <functional>
#include <iomanip>
#include <new>
#include <sstream>
#include <utility>

#include "convcore/errors.h"
#include "convcore/ops.h"
#include "convcore/padding.h"
#include "convcore/safetensors.h"
#include "convcore/shapes.h"
#include "json.h"

namespace convcore {

namespace {

using Shape = std::vector<int64_t>;

// Bounds of io.py's _check_tree: deeper or larger trees are not real networks.
constexpr int kMaxArchDepth = 64;
constexpr int64_t kMaxArchNodes = 100000;

std::string py_list(const std::vector<std::string>& names) {
  std::string s = "[";
  for (std::size_t i = 0; i < names.size(); ++i) s += (i ? ", " : "") + json::repr(names[i]);
  return s + "]";
}

std::string shape_list(const Shape& shape) {
  std::string s = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

int64_t product(const Shape& shape) {
  int64_t n = 1;
  for (int64_t d : shape)
    if (__builtin_mul_overflow(n, d, &n))
      throw ValueError("shape " + shape_str(shape) + " has more elements than fit in 64 bits");
  return n;
}

// ----------------------------------------------------------------- modules

// What a module expects from the file.
struct TensorSpec {
  std::string key;    // "features.0.weight"
  Shape shape;
  bool is_float;      // else an integer buffer (num_batches_tracked)
  bool trainable;     // a parameter (counted by num_parameters)
  Tensor* slot;       // where the loaded tensor goes
};

struct SummaryRow {
  std::string name, type, args;
  Shape output;  // empty when unknown
  int64_t params;
};

class Module {
 public:
  Module(std::string path, std::string type) : path_(std::move(path)), type_(std::move(type)) {}
  virtual ~Module() = default;
  Module(const Module&) = delete;
  Module& operator=(const Module&) = delete;

  const std::string& path() const { return path_; }
  const std::string& type() const { return type_; }

  // Runs the module on a batch. Leaves prefix their errors with their name.
  Tensor run(Tensor x) const {
    return guarded([&] { return forward(std::move(x)); });
  }
  // The same without taking ownership of the input (no copy for the layers
  // that only read it).
  Tensor run_ref(const Tensor& x) const {
    return guarded([&] { return forward_ref(x); });
  }
  // One sample's output shape; rows (if not null) receive one row per leaf.
  Shape infer(const Shape& sample, std::vector<SummaryRow>* rows) const {
    const Shape out = guarded([&] { return shape_of(sample, rows); });
    if (rows && is_leaf()) rows->push_back({path_, type_, args(), out, num_parameters()});
    return out;
  }

  virtual bool is_leaf() const { return true; }
  virtual void tensors(std::vector<TensorSpec>& /*out*/) {}
  virtual void leaves(std::vector<const Module*>& out) const { out.push_back(this); }
  virtual std::string args() const { return ""; }
  // (tensors() hands out writable slots for loading; counting only reads them)
  int64_t num_parameters() {
    std::vector<TensorSpec> specs;
    tensors(specs);
    int64_t n = 0;
    for (const auto& s : specs)
      if (s.trainable && s.slot->defined()) n += s.slot->numel();
    return n;
  }
  int64_t num_parameters() const { return const_cast<Module*>(this)->num_parameters(); }

  std::string context() const {
    return "layer " + json::repr(path_.empty() ? std::string("<root>") : path_) + " (" + type_ +
           "): ";
  }

 protected:
  // Every module overrides one of these two: forward when it can reuse its
  // input's buffer (ReLU in place, Flatten, the identities), forward_ref
  // when it only reads its input.
  virtual Tensor forward(Tensor x) const { return forward_ref(x); }
  virtual Tensor forward_ref(const Tensor& x) const { return forward(Tensor(x)); }
  virtual Shape shape_of(const Shape& sample, std::vector<SummaryRow>* rows) const = 0;

  template <typename F>
  auto guarded(F&& f) const -> decltype(f()) {
    if (!is_leaf()) return f();
    try {
      return f();
    } catch (const TypeError& e) {
      throw TypeError(context() + e.what());
    } catch (const ValueError& e) {
      throw ValueError(context() + e.what());
    } catch (const Error& e) {
      throw Error(context() + e.what());
    } catch (const std::bad_alloc& e) {
      throw Error(context() + "out of memory (" + e.what() + ")");
    }
  }

 private:
  std::string path_, type_;
};

using ModulePtr = std::unique_ptr<Module>;

std::string join(const std::string& prefix, const std::string& name) {
  return prefix.empty() ? name : prefix + "." + name;
}

void check_image_sample(const Shape& s, const char* layer) {
  if (s.size() != 3)
    throw ValueError(std::string(layer) + " expects one sample of shape (C, H, W), got " +
                     shape_str(s));
}

void check_image_batch(const Tensor& x) {
  if (x.ndim() != 4)
    throw ValueError("input must be 4-D (N, C, H, W), got " + std::to_string(x.ndim()) +
                     "-D with shape " + x.shape_str());
}

std::string pair_str(int64_t a, int64_t b) {
  return "(" + std::to_string(a) + ", " + std::to_string(b) + ")";
}

// A layer over (N, C, H, W) batches whose output shape follows from the
// input's (convolution, pooling): one sample's shape (summary, checks) and
// each batch's output buffer both come from out_shape, then compute fills it.
class ImageModule : public Module {
 public:
  using Module::Module;

 protected:
  virtual Shape4 out_shape(const Shape4& in) const = 0;
  virtual void compute(const TensorView& x, const TensorView& y) const = 0;

  Shape shape_of(const Shape& s, std::vector<SummaryRow>*) const override {
    check_image_sample(s, type().c_str());
    const Shape4 o = out_shape({1, s[0], s[1], s[2]});
    return {o.c, o.h, o.w};
  }
  Tensor forward_ref(const Tensor& x) const override {
    check_image_batch(x);
    const TensorView xv = x.view();
    const Shape4 o = out_shape(shape4(xv));
    Tensor y = Tensor::empty(x.dtype(), {o.n, o.c, o.h, o.w});
    compute(xv, y.view());
    return y;
  }
};

// --- Conv2d

class Conv2dModule : public ImageModule {
 public:
  Conv2dModule(std::string path, int64_t in, int64_t out, int64_t kh, int64_t kw,
               Conv2dParams p, PadMode mode, bool bias, std::string padding_text)
      : ImageModule(std::move(path), "Conv2d"), in_(in), out_(out), kh_(kh), kw_(kw), p_(p),
        mode_(mode), has_bias_(bias), padding_text_(std::move(padding_text)) {}

  void tensors(std::vector<TensorSpec>& out) override {
    out.push_back({join(path(), "weight"), {out_, in_ / p_.groups, kh_, kw_}, true, true, &weight_});
    if (has_bias_) out.push_back({join(path(), "bias"), {out_}, true, true, &bias_});
  }

  std::string args() const override {
    std::string s = std::to_string(in_) + ", " + std::to_string(out_) +
                    ", kernel_size=" + pair_str(kh_, kw_) +
                    ", stride=" + pair_str(p_.stride_h, p_.stride_w) + ", padding=" + padding_text_;
    if (p_.dilation_h != 1 || p_.dilation_w != 1)
      s += ", dilation=" + pair_str(p_.dilation_h, p_.dilation_w);
    if (p_.groups != 1) s += ", groups=" + std::to_string(p_.groups);
    if (!has_bias_) s += ", bias=False";
    if (mode_ != PadMode::Zeros) s += std::string(", padding_mode=") + pad_mode_name(mode_);
    return s;
  }

 protected:
  // The explicit padding of a padding_mode other than zeros, then a
  // convolution without padding (as Python's Conv2d does).
  Pad2dParams explicit_pad() const {
    Pad2dParams pp;
    pp.top = p_.pad_top, pp.bottom = p_.pad_bottom, pp.left = p_.pad_left, pp.right = p_.pad_right;
    pp.mode = mode_;
    return pp;
  }
  Conv2dParams unpadded() const {
    Conv2dParams q = p_;
    q.pad_top = q.pad_bottom = q.pad_left = q.pad_right = 0;
    return q;
  }

  Shape4 out_shape(const Shape4& in) const override {
    const Shape4 w{out_, in_ / p_.groups, kh_, kw_};
    if (mode_ == PadMode::Zeros) return conv2d_output_shape(in, w, p_);
    // (added with a check: a model file may declare any input size, and the
    // shape rule's own checks come after the sum; the loader's fuzzer found
    // an input height of 2^63 - 1)
    Shape4 padded = in;
    if (__builtin_add_overflow(in.h, p_.pad_top + p_.pad_bottom, &padded.h) ||
        __builtin_add_overflow(in.w, p_.pad_left + p_.pad_right, &padded.w))
      throw ValueError("the input's height and width plus the padding must fit in 64 bits, "
                       "got (" + std::to_string(in.h) + ", " + std::to_string(in.w) + ")");
    return conv2d_output_shape(padded, w, unpadded());
  }

  void compute(const TensorView& x, const TensorView& y) const override {
    const TensorView* b = nullptr;
    TensorView bv;
    if (has_bias_) {
      bv = bias_.view();
      b = &bv;
    }
    if (mode_ == PadMode::Zeros) return conv2d_forward(x, weight_.view(), b, p_, y);
    const Pad2dParams pp = explicit_pad();
    int64_t padded_shape[kMaxDims];
    pad2d_output_shape(x, pp, padded_shape);
    Tensor padded = Tensor::empty(x.dtype, Shape(padded_shape, padded_shape + 4));
    pad2d_forward(x, pp, padded.view());
    conv2d_forward(padded.view(), weight_.view(), b, unpadded(), y);
  }

 private:
  int64_t in_, out_, kh_, kw_;
  Conv2dParams p_;
  PadMode mode_;
  bool has_bias_;
  std::string padding_text_;
  Tensor weight_, bias_;
};

// --- pooling

class MaxPool2dModule : public ImageModule {
 public:
  MaxPool2dModule(std::string path, Pool2dParams p)
      : ImageModule(std::move(path), "MaxPool2d"), p_(p) {}
  std::string args() const override {
    return "kernel_size=" + pair_str(p_.kernel_h, p_.kernel_w) +
           ", stride=" + pair_str(p_.stride_h, p_.stride_w) +
           ", padding=" + pair_str(p_.pad_h, p_.pad_w) +
           ", dilation=" + pair_str(p_.dilation_h, p_.dilation_w) +
           ", ceil_mode=" + (p_.ceil_mode ? "True" : "False");
  }

 protected:
  Shape4 out_shape(const Shape4& in) const override { return max_pool2d_output_shape(in, p_); }
  void compute(const TensorView& x, const TensorView& y) const override {
    max_pool2d_forward(x, p_, y, nullptr);
  }

 private:
  Pool2dParams p_;
};

class AvgPool2dModule : public ImageModule {
 public:
  AvgPool2dModule(std::string path, Pool2dParams p)
      : ImageModule(std::move(path), "AvgPool2d"), p_(p) {}
  std::string args() const override {
    std::string s = "kernel_size=" + pair_str(p_.kernel_h, p_.kernel_w) +
                    ", stride=" + pair_str(p_.stride_h, p_.stride_w) +
                    ", padding=" + pair_str(p_.pad_h, p_.pad_w) +
                    ", ceil_mode=" + (p_.ceil_mode ? "True" : "False") +
                    ", count_include_pad=" + (p_.count_include_pad ? "True" : "False");
    if (p_.divisor_override) s += ", divisor_override=" + std::to_string(p_.divisor_override);
    return s;
  }

 protected:
  Shape4 out_shape(const Shape4& in) const override { return avg_pool2d_output_shape(in, p_); }
  void compute(const TensorView& x, const TensorView& y) const override {
    avg_pool2d_forward(x, p_, y);
  }

 private:
  Pool2dParams p_;
};

class AdaptiveAvgPool2dModule : public ImageModule {
 public:
  // -1: None (keep the input's size)
  AdaptiveAvgPool2dModule(std::string path, int64_t oh, int64_t ow)
      : ImageModule(std::move(path), "AdaptiveAvgPool2d"), oh_(oh), ow_(ow) {}
  std::string args() const override {
    auto s = [](int64_t v) { return v < 0 ? std::string("None") : std::to_string(v); };
    return "output_size=(" + s(oh_) + ", " + s(ow_) + ")";
  }

 protected:
  Shape4 out_shape(const Shape4& in) const override {
    return adaptive_avg_pool2d_output_shape(in, oh_ < 0 ? in.h : oh_, ow_ < 0 ? in.w : ow_);
  }
  void compute(const TensorView& x, const TensorView& y) const override {
    adaptive_avg_pool2d_forward(x, y);
  }

 private:
  int64_t oh_, ow_;
};

// --- Linear

class LinearModule : public Module {
 public:
  LinearModule(std::string path, int64_t in, int64_t out, bool bias)
      : Module(std::move(path), "Linear"), in_(in), out_(out), has_bias_(bias) {}
  void tensors(std::vector<TensorSpec>& out) override {
    out.push_back({join(path(), "weight"), {out_, in_}, true, true, &weight_});
    if (has_bias_) out.push_back({join(path(), "bias"), {out_}, true, true, &bias_});
  }
  std::string args() const override {
    return "in_features=" + std::to_string(in_) + ", out_features=" + std::to_string(out_) +
           ", bias=" + (has_bias_ ? "True" : "False");
  }

 protected:
  void check_features(const Shape& shape) const {
    if (shape.empty() || shape.back() != in_)
      throw ValueError("Linear expects " + std::to_string(in_) +
                       " input features, got an input of shape " + shape_str(shape));
  }
  Shape shape_of(const Shape& s, std::vector<SummaryRow>*) const override {
    check_features(s);
    Shape o = s;
    o.back() = out_;
    return o;
  }
  Tensor forward_ref(const Tensor& x) const override {
    check_features(x.shape());
    const int64_t rows = x.numel() / in_;
    // (..., in) as (rows, in): a view of the same contiguous data
    const int64_t flat[2] = {rows, in_};
    const TensorView xv = contiguous_view(const_cast<void*>(x.data()), x.dtype(), 2, flat);
    Tensor y = Tensor::empty(x.dtype(), {rows, out_});
    TensorView bv;
    if (has_bias_) bv = bias_.view();
    linear_forward(xv, weight_.view(), has_bias_ ? &bv : nullptr, y.view());
    Shape o = x.shape();
    o.back() = out_;
    return std::move(y).reshape(o);
  }

 private:
  int64_t in_, out_;
  bool has_bias_;
  Tensor weight_, bias_;
};

// --- elementwise and shape layers

class ReLUModule : public Module {
 public:
  explicit ReLUModule(std::string path) : Module(std::move(path), "ReLU") {}

 protected:
  Shape shape_of(const Shape& s, std::vector<SummaryRow>*) const override { return s; }
  Tensor forward(Tensor x) const override {
    const TensorView v = x.view();
    relu_forward(v, v);  // in place: elementwise over a contiguous buffer
    return x;
  }
};

class IdentityModule : public Module {
 public:
  // Identity, and Dropout in evaluation mode.
  IdentityModule(std::string path, std::string type, std::string args)
      : Module(std::move(path), std::move(type)), args_(std::move(args)) {}
  std::string args() const override { return args_; }

 protected:
  Shape shape_of(const Shape& s, std::vector<SummaryRow>*) const override { return s; }
  Tensor forward(Tensor x) const override { return x; }

 private:
  std::string args_;
};

class FlattenModule : public Module {
 public:
  FlattenModule(std::string path, int64_t start, int64_t end)
      : Module(std::move(path), "Flatten"), start_(start), end_(end) {}
  std::string args() const override {
    return "start_dim=" + std::to_string(start_) + ", end_dim=" + std::to_string(end_);
  }
  // Python's Flatten._flat_shape, with Python's modulo for negative dims.
  Shape flat_shape(const Shape& shape) const {
    const int64_t nd = static_cast<int64_t>(shape.size());
    auto mod = [nd](int64_t d) { return nd ? ((d % nd) + nd) % nd : 0; };
    const int64_t s = mod(start_), e = mod(end_);
    if (s > e)
      throw ValueError("Flatten: start_dim " + std::to_string(start_) + " comes after end_dim " +
                       std::to_string(end_) + " for an input of shape " + shape_str(shape));
    Shape out(shape.begin(), shape.begin() + s);
    if (nd) {
      out.push_back(product(Shape(shape.begin() + s, shape.begin() + e + 1)));
      out.insert(out.end(), shape.begin() + e + 1, shape.end());
    } else {
      out.push_back(1);
    }
    return out;
  }

 protected:
  Shape shape_of(const Shape& s, std::vector<SummaryRow>*) const override {
    Shape batched(1, 1);
    batched.insert(batched.end(), s.begin(), s.end());
    const Shape f = flat_shape(batched);
    return Shape(f.begin() + 1, f.end());
  }
  Tensor forward(Tensor x) const override {
    const Shape f = flat_shape(x.shape());
    return std::move(x).reshape(f);
  }

 private:
  int64_t start_, end_;
};

// --- normalisation

class LocalResponseNormModule : public Module {
 public:
  LocalResponseNormModule(std::string path, LrnParams p)
      : Module(std::move(path), "LocalResponseNorm"), p_(p) {}
  std::string args() const override {
    std::ostringstream os;
    os << "size=" << p_.size << ", alpha=" << p_.alpha << ", beta=" << p_.beta << ", k=" << p_.k;
    return os.str();
  }

 protected:
  Shape shape_of(const Shape& s, std::vector<SummaryRow>*) const override { return s; }
  Tensor forward_ref(const Tensor& x) const override {
    Tensor y = Tensor::empty(x.dtype(), x.shape());
    local_response_norm_forward(x.view(), p_, y.view());
    return y;
  }

 private:
  LrnParams p_;
};

class BatchNorm2dModule : public Module {
 public:
  BatchNorm2dModule(std::string path, int64_t c, double eps, bool affine, bool track)
      : Module(std::move(path), "BatchNorm2d"), c_(c), eps_(eps), affine_(affine), track_(track) {}
  void tensors(std::vector<TensorSpec>& out) override {
    if (affine_) {
      out.push_back({join(path(), "weight"), {c_}, true, true, &weight_});
      out.push_back({join(path(), "bias"), {c_}, true, true, &bias_});
    }
    if (track_) {
      out.push_back({join(path(), "running_mean"), {c_}, true, false, &mean_});
      out.push_back({join(path(), "running_var"), {c_}, true, false, &var_});
      out.push_back({join(path(), "num_batches_tracked"), {}, false, false, &count_});
    }
  }
  std::string args() const override {
    std::ostringstream os;
    os << c_ << ", eps=" << eps_;
    if (!affine_) os << ", affine=False";
    if (!track_) os << ", track_running_stats=False";
    return os.str();
  }

 protected:
  void check_channels(const Shape& shape, bool batched) const {
    const bool ok = batched ? (shape.size() >= 2 && shape[1] == c_)
                            : (shape.size() == 3 && shape[0] == c_);
    if (!ok)
      throw ValueError("BatchNorm2d(" + std::to_string(c_) + ") expects one sample of shape (" +
                       std::to_string(c_) + ", H, W), got " +
                       shape_str(batched && !shape.empty() ? Shape(shape.begin() + 1, shape.end())
                                                           : shape));
  }
  Shape shape_of(const Shape& s, std::vector<SummaryRow>*) const override {
    check_channels(s, false);
    return s;
  }
  Tensor forward_ref(const Tensor& x) const override {
    check_channels(x.shape(), true);
    Tensor y = Tensor::empty(x.dtype(), x.shape());
    TensorView wv, bv;
    if (affine_) wv = weight_.view(), bv = bias_.view();
    if (track_) {
      batch_norm_forward(x.view(), affine_ ? &wv : nullptr, affine_ ? &bv : nullptr, false, eps_,
                         mean_.view(), var_.view(), y.view());
    } else {
      // Without running statistics, evaluation normalises with the batch's
      // (as PyTorch and the Python layer do).
      Tensor m = Tensor::empty(x.dtype(), {c_}), v = Tensor::empty(x.dtype(), {c_});
      batch_norm_forward(x.view(), affine_ ? &wv : nullptr, affine_ ? &bv : nullptr, true, eps_,
                         m.view(), v.view(), y.view());
    }
    return y;
  }

 private:
  int64_t c_;
  double eps_;
  bool affine_, track_;
  Tensor weight_, bias_, mean_, var_, count_;
};

// --- containers

class SequentialModule : public Module {
 public:
  SequentialModule(std::string path, std::vector<ModulePtr> children)
      : Module(std::move(path), "Sequential"), children_(std::move(children)) {}
  bool is_leaf() const override { return false; }
  bool empty() const { return children_.empty(); }
  void tensors(std::vector<TensorSpec>& out) override {
    for (auto& c : children_) c->tensors(out);
  }
  void leaves(std::vector<const Module*>& out) const override {
    for (const auto& c : children_) c->leaves(out);
  }

 protected:
  Shape shape_of(const Shape& s, std::vector<SummaryRow>* rows) const override {
    Shape shape = s;
    for (const auto& c : children_) shape = c->infer(shape, rows);
    return shape;
  }
  Tensor forward(Tensor x) const override {
    for (const auto& c : children_) x = c->run(std::move(x));
    return x;
  }
  Tensor forward_ref(const Tensor& x) const override {
    if (children_.empty()) return x;
    Tensor y = children_[0]->run_ref(x);
    for (std::size_t i = 1; i < children_.size(); ++i) y = children_[i]->run(std::move(y));
    return y;
  }

 private:
  std::vector<ModulePtr> children_;
};

// The builder's Network: features, the implicit flatten, classifier.
class NetworkModule : public Module {
 public:
  NetworkModule(std::string path, ModulePtr features, ModulePtr classifier, Shape input_shape,
                bool has_classifier)
      : Module(std::move(path), "Network"), features_(std::move(features)),
        classifier_(std::move(classifier)), input_shape_(std::move(input_shape)),
        has_classifier_(has_classifier) {}
  bool is_leaf() const override { return false; }
  const Shape& input_shape() const { return input_shape_; }
  void tensors(std::vector<TensorSpec>& out) override {
    features_->tensors(out);
    classifier_->tensors(out);
  }
  void leaves(std::vector<const Module*>& out) const override {
    features_->leaves(out);
    classifier_->leaves(out);
  }

 protected:
  Shape shape_of(const Shape& s, std::vector<SummaryRow>* rows) const override {
    Shape shape = features_->infer(s, rows);
    if (has_classifier_) shape = classifier_->infer({product(shape)}, rows);
    return shape;
  }
  Tensor forward_ref(const Tensor& x) const override {
    return finish(features_->run_ref(x));
  }
  Tensor forward(Tensor x) const override { return finish(features_->run(std::move(x))); }

 private:
  Tensor finish(Tensor x) const {
    if (!has_classifier_) return x;
    if (x.ndim() < 1) throw ValueError(context() + "the features give a scalar");
    const int64_t n = x.size(0);
    // (N, ...) -> (N, -1); an empty batch keeps its feature count from the shape
    const Shape rest(x.shape().begin() + 1, x.shape().end());
    return classifier_->run(std::move(x).reshape({n, product(rest)}));
  }

  ModulePtr features_, classifier_;
  Shape input_shape_;
  bool has_classifier_;
};

void add_in_place(Tensor& out, const Tensor& other) {
  const int64_t n = out.numel();
  if (out.dtype() == DType::Float32) {
    float* a = out.data_as<float>();
    const float* b = other.data_as<float>();
    for (int64_t i = 0; i < n; ++i) a[i] += b[i];
  } else {
    double* a = out.data_as<double>();
    const double* b = other.data_as<double>();
    for (int64_t i = 0; i < n; ++i) a[i] += b[i];
  }
}

// BasicBlock and Bottleneck: out = relu(body(x) + shortcut(x)), with a ReLU
// after every BatchNorm of the body but the last.
class ResidualModule : public Module {
 public:
  ResidualModule(std::string path, std::string type, std::vector<ModulePtr> body,
                 ModulePtr downsample, std::string args)
      : Module(std::move(path), std::move(type)), body_(std::move(body)),
        downsample_(std::move(downsample)), args_(std::move(args)) {}
  bool is_leaf() const override { return false; }
  std::string args() const override { return args_; }
  void tensors(std::vector<TensorSpec>& out) override {
    for (auto& m : body_) m->tensors(out);
    if (downsample_) downsample_->tensors(out);
  }
  void leaves(std::vector<const Module*>& out) const override {
    for (const auto& m : body_) m->leaves(out);
    if (downsample_) downsample_->leaves(out);
  }

 protected:
  bool relu_after(std::size_t i) const {
    return body_[i]->type() == "BatchNorm2d" && i + 1 != body_.size();
  }
  void check_same(const Shape& body, const Shape& shortcut) const {
    if (body != shortcut)
      throw ValueError(context() + "the shortcut gives " + shape_str(shortcut) +
                       " but the body gives " + shape_str(body) + "; use a projection shortcut");
  }
  Shape shape_of(const Shape& s, std::vector<SummaryRow>* rows) const override {
    Shape shape = s;
    for (const auto& m : body_) shape = m->infer(shape, rows);
    const Shape shortcut = downsample_ ? downsample_->infer(s, rows) : s;
    check_same(shape, shortcut);  // Python's output_shape message, on sample shapes
    return shape;
  }
  Tensor forward_ref(const Tensor& x) const override {
    Tensor out = body_[0]->run_ref(x);
    for (std::size_t i = 1; i < body_.size(); ++i) {
      if (relu_after(i - 1)) {
        const TensorView v = out.view();
        relu_forward(v, v);
      }
      out = body_[i]->run(std::move(out));
    }
    Tensor shortcut;
    const Tensor* identity = &x;
    if (downsample_) {
      shortcut = downsample_->run_ref(x);
      identity = &shortcut;
    }
    check_same(out.shape(), identity->shape());
    add_in_place(out, *identity);
    const TensorView v = out.view();
    relu_forward(v, v);
    return out;
  }

 private:
  std::vector<ModulePtr> body_;
  ModulePtr downsample_;
  std::string args_;
};

class ResNetModule : public Module {
 public:
  ResNetModule(std::string path, std::vector<ModulePtr> parts, Shape input_shape, std::string args)
      : Module(std::move(path), "ResNet"), parts_(std::move(parts)),
        input_shape_(std::move(input_shape)), args_(std::move(args)) {}
  bool is_leaf() const override { return false; }
  std::string args() const override { return args_; }
  const Shape& input_shape() const { return input_shape_; }
  void tensors(std::vector<TensorSpec>& out) override {
    for (auto& m : parts_) m->tensors(out);
  }
  void leaves(std::vector<const Module*>& out) const override {
    for (const auto& m : parts_) m->leaves(out);
  }

 protected:
  // parts: conv1, bn1, maxpool, layer1..layer4, avgpool, fc
  Shape shape_of(const Shape& s, std::vector<SummaryRow>* rows) const override {
    Shape shape = s;
    for (std::size_t i = 0; i + 1 < parts_.size(); ++i) shape = parts_[i]->infer(shape, rows);
    return parts_.back()->infer({product(shape)}, rows);
  }
  Tensor forward_ref(const Tensor& x) const override {
    Tensor y = parts_[1]->run(parts_[0]->run_ref(x));  // bn1(conv1(x))
    const TensorView v = y.view();
    relu_forward(v, v);
    for (std::size_t i = 2; i + 1 < parts_.size(); ++i) y = parts_[i]->run(std::move(y));
    const int64_t n = y.size(0);
    const Shape rest(y.shape().begin() + 1, y.shape().end());
    return parts_.back()->run(std::move(y).reshape({n, product(rest)}));
  }

 private:
  std::vector<ModulePtr> parts_;
  Shape input_shape_;
  std::string args_;
};

// --- the later case studies: activations and Graph (python/convcore/nn/activation.py, graph.py)

// Sigmoid, SiLU, ReLU6, Hardswish, Hardsigmoid: elementwise, in place, with
// the core's kernels that Python's layers call (so the outputs are the same).
class ActivationModule : public Module {
 public:
  ActivationModule(std::string path, std::string type) : Module(std::move(path), std::move(type)) {
    const std::string& t = this->type();
    kind_ = t == "Sigmoid"     ? Activation::Sigmoid
            : t == "SiLU"      ? Activation::SiLU
            : t == "ReLU6"     ? Activation::ReLU6
            : t == "Hardswish" ? Activation::Hardswish
                               : Activation::Hardsigmoid;
  }

 protected:
  Shape shape_of(const Shape& s, std::vector<SummaryRow>*) const override { return s; }
  Tensor forward(Tensor x) const override {
    const TensorView v = x.view();
    activation_forward(kind_, v, v);
    return x;
  }

 private:
  Activation kind_;
};

// A graph node "out = op(a, b, ...)": a child module or a join.
struct GraphNode {
  enum Kind { kModule, kConcat, kAdd, kMul, kRelu } kind;
  int out;                  // value index (0 is the graph's input x)
  std::vector<int> inputs;  // value indices
  std::size_t child = 0;    // for kModule
  std::string text;         // the line, for messages
};

template <typename T>
void mul_broadcast(T* out, const T* a, const T* b, const Shape& sa, const Shape& sb,
                   const Shape& so) {
  // out = a * b with numpy broadcasting over equal-rank shapes (the graph's
  // inputs all share the batch rank): strides of 0 on the broadcast axes.
  constexpr std::size_t kMaxDims = 32;
  const std::size_t nd = so.size();
  if (nd == 0 || nd > kMaxDims) throw ValueError("mul: inputs of 1 to 32 dimensions only");
  int64_t stride_a[kMaxDims], stride_b[kMaxDims], idx[kMaxDims] = {};
  int64_t ra = 1, rb = 1;
  for (std::size_t d = nd; d-- > 0;) {
    stride_a[d] = sa[d] == 1 ? 0 : ra;
    stride_b[d] = sb[d] == 1 ? 0 : rb;
    ra *= sa[d];
    rb *= sb[d];
  }
  const int64_t n = product(so);
  int64_t ia = 0, ib = 0;
  for (int64_t i = 0; i < n; ++i) {
    out[i] = a[ia] * b[ib];
    for (std::size_t d = nd; d-- > 0;) {  // odometer increment
      ia += stride_a[d];
      ib += stride_b[d];
      if (++idx[d] < so[d]) break;
      ia -= stride_a[d] * so[d];
      ib -= stride_b[d] * so[d];
      idx[d] = 0;
    }
  }
}

class GraphModule : public Module {
 public:
  GraphModule(std::string path, std::vector<std::string> names, std::vector<ModulePtr> children,
              std::vector<GraphNode> nodes, std::vector<std::string> values, int output,
              Shape input_shape)
      : Module(std::move(path), "Graph"), names_(std::move(names)),
        children_(std::move(children)), nodes_(std::move(nodes)), values_(std::move(values)),
        output_(output), input_shape_(std::move(input_shape)) {
    // Only the nodes the (first) output needs run (eval mode: no aux heads);
    // each value is freed after its last use.
    needed_.assign(nodes_.size(), false);
    std::vector<bool> want(values_.size(), false);
    want[static_cast<std::size_t>(output_)] = true;
    for (std::size_t i = nodes_.size(); i-- > 0;) {
      if (!want[static_cast<std::size_t>(nodes_[i].out)]) continue;
      needed_[i] = true;
      for (int v : nodes_[i].inputs) want[static_cast<std::size_t>(v)] = true;
    }
    last_use_.assign(values_.size(), -1);
    for (std::size_t i = 0; i < nodes_.size(); ++i)
      if (needed_[i])
        for (int v : nodes_[i].inputs) last_use_[static_cast<std::size_t>(v)] = static_cast<int>(i);
  }
  bool is_leaf() const override { return false; }
  const Shape& input_shape() const { return input_shape_; }
  void tensors(std::vector<TensorSpec>& out) override {
    for (auto& c : children_) c->tensors(out);
  }
  void leaves(std::vector<const Module*>& out) const override {
    for (const auto& c : children_) c->leaves(out);
  }

 protected:
  Shape shape_of(const Shape& s, std::vector<SummaryRow>* rows) const override {
    std::vector<Shape> shapes(values_.size());
    shapes[0] = s;
    for (const auto& node : nodes_) {
      std::vector<Shape> in;
      for (int v : node.inputs) in.push_back(shapes[static_cast<std::size_t>(v)]);
      Shape out;
      if (node.kind == GraphNode::kModule) {
        try {
          out = children_[node.child]->infer(in[0], rows);
        } catch (const ValueError& e) {  // as Python: "features: ..."
          throw ValueError(names_[node.child] + ": " + e.what());
        }
      } else {
        out = join_shape(node, in);
      }
      shapes[static_cast<std::size_t>(node.out)] = out;
    }
    return shapes[static_cast<std::size_t>(output_)];
  }

  Tensor forward_ref(const Tensor& x) const override {
    std::vector<Tensor> vals(values_.size());
    auto get = [&](int v) -> const Tensor& {
      return v == 0 ? x : vals[static_cast<std::size_t>(v)];
    };
    // The value itself when this node is its last use (no copy), else a copy
    // (a copy too when the node reads it twice, as add(a, a)).
    auto take = [&](int v, std::size_t i) -> Tensor {
      const auto& in = nodes_[i].inputs;
      if (v != 0 && last_use_[static_cast<std::size_t>(v)] == static_cast<int>(i) &&
          std::count(in.begin(), in.end(), v) == 1)
        return std::move(vals[static_cast<std::size_t>(v)]);
      return Tensor(get(v));
    };
    for (std::size_t i = 0; i < nodes_.size(); ++i) {
      if (!needed_[i]) continue;
      const GraphNode& node = nodes_[i];
      Tensor out;
      switch (node.kind) {
        case GraphNode::kModule: {
          const Module& m = *children_[node.child];
          const int v = node.inputs[0];
          out = v != 0 && last_use_[static_cast<std::size_t>(v)] == static_cast<int>(i)
                    ? m.run(std::move(vals[static_cast<std::size_t>(v)]))
                    : m.run_ref(get(v));
          break;
        }
        case GraphNode::kConcat:
          out = concat(node, get);
          break;
        case GraphNode::kAdd: {
          out = take(node.inputs[0], i);
          for (std::size_t k = 1; k < node.inputs.size(); ++k) {
            const Tensor& b = get(node.inputs[k]);
            if (b.shape() != out.shape())
              throw ValueError(context() + "graph node " + json::repr(node.text) +
                               ": add needs inputs of one shape, got " + out.shape_str() +
                               " and " + b.shape_str());
            add_in_place(out, b);
          }
          break;
        }
        case GraphNode::kMul:
          out = mul(node, get(node.inputs[0]), get(node.inputs[1]));
          break;
        case GraphNode::kRelu: {
          out = take(node.inputs[0], i);
          const TensorView v = out.view();
          relu_forward(v, v);
          break;
        }
      }
      vals[static_cast<std::size_t>(node.out)] = std::move(out);
      for (int v : node.inputs)  // free what no later node reads
        if (v != 0 && last_use_[static_cast<std::size_t>(v)] == static_cast<int>(i))
          vals[static_cast<std::size_t>(v)] = Tensor();
    }
    if (output_ == 0) return Tensor(x);
    return std::move(vals[static_cast<std::size_t>(output_)]);
  }

 private:
  Shape join_shape(const GraphNode& node, const std::vector<Shape>& in) const {
    const std::string where = "graph node " + json::repr(node.text) + ": ";
    if (node.kind == GraphNode::kRelu) return in[0];
    if (node.kind == GraphNode::kConcat) {
      Shape out = in[0];
      for (std::size_t k = 0; k < in.size(); ++k) {
        if (in[k].empty() || in[k].size() != in[0].size() ||
            !std::equal(in[k].begin() + 1, in[k].end(), in[0].begin() + 1))
          throw ValueError(where + "concat needs inputs that differ only in channels");
        // (checked: a graph's declared input_shape may be any size)
        if (k && __builtin_add_overflow(out[0], in[k][0], &out[0]))
          throw ValueError(where + "the concatenated channels do not fit in 64 bits");
      }
      return out;
    }
    // add and mul: numpy broadcasting of equal-rank shapes
    Shape out = in[0];
    for (std::size_t k = 1; k < in.size(); ++k) {
      if (in[k].size() != out.size())
        throw ValueError(where + "inputs of different ranks");
      for (std::size_t d = 0; d < out.size(); ++d) {
        if (in[k][d] == out[d] || in[k][d] == 1) continue;
        if (out[d] == 1) {
          out[d] = in[k][d];
          continue;
        }
        throw ValueError(where + "inputs of shapes " + shape_str(out) + " and " +
                         shape_str(in[k]) + " do not broadcast");
      }
    }
    return out;
  }

  template <typename Get>
  Tensor concat(const GraphNode& node, Get& get) const {
    const Tensor& first = get(node.inputs[0]);
    if (first.ndim() < 2) throw ValueError(context() + "concat needs (N, C, ...) inputs");
    Shape shape = first.shape();
    shape[1] = 0;
    for (int v : node.inputs) {
      const Tensor& t = get(v);
      if (t.ndim() != first.ndim() || t.size(0) != first.size(0) ||
          !std::equal(t.shape().begin() + 2, t.shape().end(), first.shape().begin() + 2))
        throw ValueError(context() + "graph node " + json::repr(node.text) +
                         ": concat needs inputs that differ only in channels, got " +
                         first.shape_str() + " and " + t.shape_str());
      shape[1] += t.size(1);
    }
    Tensor out(first.dtype(), shape);
    const std::size_t item = dtype_size(first.dtype());
    const int64_t n = shape[0];
    const int64_t out_sample = product(Shape(shape.begin() + 1, shape.end()));
    int64_t offset = 0;  // elements into each output sample
    for (int v : node.inputs) {
      const Tensor& t = get(v);
      const int64_t sample = product(Shape(t.shape().begin() + 1, t.shape().end()));
      const char* src = static_cast<const char*>(t.data());
      char* dst = static_cast<char*>(out.data());
      for (int64_t i = 0; i < n; ++i)
        std::memcpy(dst + static_cast<std::size_t>(i * out_sample + offset) * item,
                    src + static_cast<std::size_t>(i * sample) * item,
                    static_cast<std::size_t>(sample) * item);
      offset += sample;
    }
    return out;
  }

  Tensor mul(const GraphNode& node, const Tensor& a, const Tensor& b) const {
    const Shape shape = join_shape(node, {a.shape(), b.shape()});
    Tensor out(a.dtype(), shape);
    if (a.dtype() == DType::Float32)
      mul_broadcast(out.data_as<float>(), a.data_as<float>(), b.data_as<float>(), a.shape(),
                    b.shape(), shape);
    else
      mul_broadcast(out.data_as<double>(), a.data_as<double>(), b.data_as<double>(), a.shape(),
                    b.shape(), shape);
    return out;
  }

  std::vector<std::string> names_;
  std::vector<ModulePtr> children_;
  std::vector<GraphNode> nodes_;
  std::vector<std::string> values_;
  int output_;
  Shape input_shape_;
  std::vector<bool> needed_;
  std::vector<int> last_use_;
};

// ------------------------------------------------------------------ building

// A module's config, read strictly: known keys only, each of the right type.
class Config {
 public:
  Config(const json::Value* config, const std::string& type, const std::string& where,
         std::vector<std::string> known)
      : config_(config), type_(type), where_(where) {
    if (!config_) return;
    for (const auto& m : config_->members) {
      if (std::find(known.begin(), known.end(), m.first) == known.end()) {
        std::string list;
        for (const auto& k : known) list += (list.empty() ? "" : ", ") + k;
        fail("unknown config key " + json::repr(m.first) +
             (known.empty() ? " (it takes none)" : " (known: " + list + ")"));
      }
    }
  }

  [[noreturn]] void fail(const std::string& what) const {
    throw ValueError("bad config for " + type_ + " at " + where_ + ": " + what);
  }

  const json::Value* get(const std::string& key) const {
    return config_ ? config_->find(key) : nullptr;
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
  int64_t integer(const std::string& key) const { return integer(key, required(key)); }
  int64_t integer(const std::string& key, int64_t fallback) const {
    const json::Value* v = get(key);
    return v ? integer(key, *v) : fallback;
  }
  int64_t positive(const std::string& key) const {
    const int64_t v = integer(key);
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
  void dtype(const std::string& key = "dtype") const {
    const json::Value* v = get(key);
    if (v && !(v->is_null() ||
               (v->is_string() && (v->string == "float32" || v->string == "float64"))))
      fail("dtype must be \"float32\" or \"float64\", got " + json::short_repr(*v));
  }

 private:
  const json::Value* config_;
  std::string type_, where_;
};

const char* const kKnownTypes =
    "AdaptiveAvgPool2d, AvgPool2d, BasicBlock, BatchNorm2d, Bottleneck, Conv2d, Dropout, "
    "Flatten, Graph, Hardsigmoid, Hardswish, Identity, Linear, LocalResponseNorm, MaxPool2d, "
    "Network, ReLU, ReLU6, ResNet, Sequential, SiLU, Sigmoid, StochasticDepth";

// Python's from_architecture (python/convcore/nn/module.py), in C++: a
// Sequential takes its children from the tree; every other module is built
// from its config alone, as its Python constructor builds it (the builder's
// Network from its layer dicts, ResNet and the residual blocks from their
// arguments), and the tree may only list the children that config builds.
// So a file loads here exactly as convcore.load loads it.
class Builder {
 public:
  ModulePtr build(const json::Value& node, const std::string& path) {
    const std::string type = node.find("type")->string;
    const json::Value* config = node.find("config");
    const json::Value* children = node.find("children");
    const std::string where = path.empty() ? "the root" : json::repr(path);

    if (type == "Sequential") {  // (Python ignores a Sequential's config)
      std::vector<ModulePtr> mods;
      if (children)
        for (const auto& c : children->members) mods.push_back(build(c.second, join(path, c.first)));
      return std::make_unique<SequentialModule>(path, std::move(mods));
    }
    if (type == "Graph") {  // children from the tree too, wired by the config's nodes
      Config c(config, type, where, {"nodes", "outputs", "name", "input_shape"});
      std::vector<std::string> names;
      std::vector<ModulePtr> mods;
      if (children)
        for (const auto& ch : children->members) {
          names.push_back(ch.first);
          mods.push_back(build(ch.second, join(path, ch.first)));
        }
      return graph(c, path, std::move(names), std::move(mods));
    }
    ModulePtr module;
    std::vector<std::string> built;  // the children the config builds
    if (type == "Network") {
      module = network(Config(config, type, where, {"layers", "input_shape", "on_misfit", "name"}),
                       path);
      built = {"features", "classifier"};
    } else if (type == "ResNet") {
      module = resnet(Config(config, type, where, {"block", "layers", "num_classes", "input_size",
                                                   "groups", "width_per_group"}),
                      path, built);
    } else if (type == "BasicBlock" || type == "Bottleneck") {
      const bool basic = type == "BasicBlock";
      Config c(config, type, where,
               basic ? std::vector<std::string>{"inplanes", "planes", "stride", "downsample"}
                     : std::vector<std::string>{"inplanes", "planes", "stride", "downsample",
                                                "groups", "base_width"});
      const json::Value* ds = c.get("downsample");
      if (ds && !ds->is_null()) c.fail("downsample must be null (the config builds it)");
      module = block(basic, c.integer("inplanes"), c.integer("planes"), c.integer("stride", 1),
                     basic ? 1 : c.integer("groups", 1), basic ? 64 : c.integer("base_width", 64),
                     path, &built, c);
    } else {
      module = leaf(type, config, path, where);
    }
    if (children) {  // Python: the tree lists exactly the children the config builds
      std::vector<std::string> listed;
      for (const auto& ch : children->members) listed.push_back(ch.first);
      if (listed != built)
        throw ValueError(type + " at " + where + ": the architecture lists children " +
                         py_list(listed) + " but the config builds " + py_list(built));
    }
    return module;
  }

  std::string name_;

 private:
  // A module without children, from its config (the constructor's arguments).
  ModulePtr leaf(const std::string& type, const json::Value* config, const std::string& path,
                 const std::string& where) {
    if (type == "Conv2d")
      return conv2d(Config(config, type, where,
                           {"in_channels", "out_channels", "kernel_size", "stride", "padding",
                            "dilation", "groups", "bias", "padding_mode", "dtype"}),
                    path);
    if (type == "MaxPool2d") {
      Config c(config, type, where, {"kernel_size", "stride", "padding", "dilation", "ceil_mode"});
      Pool2dParams p = pool(c);
      std::tie(p.dilation_h, p.dilation_w) = c.pair("dilation", 1);
      p.ceil_mode = c.boolean("ceil_mode", false);
      check_pool(c, p);
      return std::make_unique<MaxPool2dModule>(path, p);
    }
    if (type == "AvgPool2d") {
      Config c(config, type, where,
               {"kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
                "divisor_override"});
      Pool2dParams p = pool(c);
      p.ceil_mode = c.boolean("ceil_mode", false);
      p.count_include_pad = c.boolean("count_include_pad", true);
      const json::Value* d = c.get("divisor_override");
      if (d && !d->is_null()) {
        p.divisor_override = c.integer("divisor_override", *d);
        if (p.divisor_override == 0)
          c.fail("divisor_override must be a non-zero int or None, got 0");
      }
      check_pool(c, p);
      return std::make_unique<AvgPool2dModule>(path, p);
    }
    if (type == "AdaptiveAvgPool2d") {
      Config c(config, type, where, {"output_size"});
      const json::Value& v = c.required("output_size");
      int64_t oh = -1, ow = -1;  // -1: None, the input's size
      if (v.is_int()) {
        oh = ow = v.integer;
      } else if (v.is_array() && v.items.size() == 2 &&
                 (v.items[0].is_int() || v.items[0].is_null()) &&
                 (v.items[1].is_int() || v.items[1].is_null())) {
        oh = v.items[0].is_null() ? -1 : v.items[0].integer;
        ow = v.items[1].is_null() ? -1 : v.items[1].integer;
      } else {
        c.fail("output_size must be an int or a pair (h, w) of ints or None, got " +
               json::short_repr(v));
      }
      if ((v.is_int() && oh < 0) || (v.is_array() && ((!v.items[0].is_null() && oh < 0) ||
                                                      (!v.items[1].is_null() && ow < 0))))
        c.fail("output_size must be non-negative, got " + json::short_repr(v));
      return std::make_unique<AdaptiveAvgPool2dModule>(path, oh, ow);
    }
    if (type == "Linear") {
      Config c(config, type, where, {"in_features", "out_features", "bias", "dtype"});
      c.dtype();
      const int64_t in = c.positive("in_features"), out = c.positive("out_features");
      return std::make_unique<LinearModule>(path, in, out, c.boolean("bias", true));
    }
    if (type == "ReLU") {
      Config c(config, type, where, {"inplace"});
      c.boolean("inplace", false);
      return std::make_unique<ReLUModule>(path);
    }
    if (type == "Identity") {
      Config(config, type, where, {});
      return std::make_unique<IdentityModule>(path, type, "");
    }
    if (type == "Dropout") {
      Config c(config, type, where, {"p"});
      const double p = c.real("p", 0.5);
      if (!(p >= 0.0 && p <= 1.0))
        c.fail("p must be a probability in [0, 1], got " + json::short_repr(c.required("p")));
      std::ostringstream os;
      os << "p=" << p;
      return std::make_unique<IdentityModule>(path, type, os.str());
    }
    if (type == "Sigmoid" || type == "SiLU" || type == "ReLU6" || type == "Hardswish" ||
        type == "Hardsigmoid") {
      Config c(config, type, where, {"inplace"});
      c.boolean("inplace", false);
      return std::make_unique<ActivationModule>(path, type);
    }
    if (type == "StochasticDepth") {  // the identity in evaluation mode
      Config c(config, type, where, {"p", "mode"});
      const double p = c.real("p", 0.5);
      if (!(p >= 0.0 && p <= 1.0))
        c.fail("p must be a probability in [0, 1], got " + json::short_repr(c.required("p")));
      const std::string mode = c.string("mode", "row");
      if (mode != "row" && mode != "batch")
        c.fail("mode must be 'row' or 'batch', got " + json::repr(mode));
      std::ostringstream os;
      os << "p=" << p << ", mode=" << mode;
      return std::make_unique<IdentityModule>(path, type, os.str());
    }
    if (type == "Flatten") {
      Config c(config, type, where, {"start_dim", "end_dim"});
      return std::make_unique<FlattenModule>(path, c.integer("start_dim", 1),
                                             c.integer("end_dim", -1));
    }
    if (type == "LocalResponseNorm") {
      Config c(config, type, where, {"size", "alpha", "beta", "k"});
      LrnParams p;
      p.size = c.positive("size");
      p.alpha = c.real("alpha", 1e-4);
      p.beta = c.real("beta", 0.75);
      p.k = c.real("k", 1.0);
      if (p.size > kMaxParam) c.fail("size must be at most " + std::to_string(kMaxParam));
      return std::make_unique<LocalResponseNormModule>(path, p);
    }
    if (type == "BatchNorm2d") {
      Config c(config, type, where,
               {"num_features", "eps", "momentum", "affine", "track_running_stats", "dtype"});
      c.dtype();
      const int64_t n = c.positive("num_features");
      const double eps = c.real("eps", 1e-5);
      c.real("momentum", 0.1);
      if (!(eps >= 0.0)) c.fail("eps must be a non-negative number");
      return std::make_unique<BatchNorm2dModule>(path, n, eps, c.boolean("affine", true),
                                                 c.boolean("track_running_stats", true));
    }
    throw ValueError("unknown module type " + json::repr(type) + " at " + where +
                     " in the architecture (known: " + std::string(kKnownTypes) + ")");
  }

  static Pool2dParams pool(const Config& c) {
    Pool2dParams p;
    std::tie(p.kernel_h, p.kernel_w) = c.pair("kernel_size");
    const json::Value* s = c.get("stride");
    if (s && !s->is_null())
      std::tie(p.stride_h, p.stride_w) = c.pair("stride", *s);
    else
      p.stride_h = p.kernel_h, p.stride_w = p.kernel_w;  // stride=None: the kernel size
    std::tie(p.pad_h, p.pad_w) = c.pair("padding", 0);
    return p;
  }

  static void check_pool(const Config& c, const Pool2dParams& p) {
    try {
      check_pool2d_params(p);
    } catch (const ValueError& e) {
      c.fail(e.what());
    }
  }

  static ModulePtr conv2d(const Config& c, const std::string& path) {
    c.dtype();
    const int64_t in = c.positive("in_channels"), out = c.positive("out_channels");
    const int64_t groups = c.has("groups") ? c.positive("groups") : 1;
    if (in % groups || out % groups)
      c.fail("groups=" + std::to_string(groups) + " must divide in_channels=" +
             std::to_string(in) + " and out_channels=" + std::to_string(out));
    int64_t kh, kw;
    std::tie(kh, kw) = c.pair("kernel_size");
    if (kh < 1 || kw < 1)
      c.fail("kernel_size must be positive, got " + json::short_repr(c.required("kernel_size")));
    Conv2dParams p;
    p.groups = groups;
    std::tie(p.stride_h, p.stride_w) = c.pair("stride", 1);
    std::tie(p.dilation_h, p.dilation_w) = c.pair("dilation", 1);
    const json::Value* pad = c.get("padding");
    std::string padding_text;
    if (pad && pad->is_string()) {
      if (pad->string == "valid") {
        padding_text = "'valid'";
      } else if (pad->string == "same") {
        if (p.stride_h != 1 || p.stride_w != 1)
          c.fail("padding='same' is not supported for strided convolutions");
        padding_text = "'same'";
      } else {
        c.fail("padding must be 'same', 'valid', an int or a pair, got " + json::repr(pad->string));
      }
    } else {
      int64_t ph = 0, pw = 0;
      if (pad) std::tie(ph, pw) = c.pair("padding", *pad);
      p.pad_top = p.pad_bottom = ph;
      p.pad_left = p.pad_right = pw;
      padding_text = pair_str(ph, pw);
    }
    PadMode mode = PadMode::Zeros;
    try {
      mode = parse_pad_mode(c.string("padding_mode", "zeros"));
      check_conv2d_params(p);  // the ranges first: same_padding multiplies
      if (kh > kMaxParam || kw > kMaxParam)
        throw ValueError("kernel_size must be at most " + std::to_string(kMaxParam));
      if (padding_text == "'same'") {
        same_padding(kh, p.dilation_h, &p.pad_top, &p.pad_bottom);
        same_padding(kw, p.dilation_w, &p.pad_left, &p.pad_right);
        check_conv2d_params(p);
      }
    } catch (const ValueError& e) {
      c.fail(e.what());
    }
    return std::make_unique<Conv2dModule>(path, in, out, kh, kw, p, mode, c.boolean("bias", true),
                                          padding_text);
  }

  // --- the builder's Network (python/convcore/builder.py): layer dicts, the
  // input shape, shapes inferred layer by layer, features up to the first FC
  // (with the dropouts just before it), then the classifier.

  static json::Value object(std::vector<std::pair<std::string, json::Value>> members) {
    json::Value v;
    v.kind = json::Kind::Object;
    v.members = std::move(members);
    return v;
  }
  static json::Value int_value(int64_t i) {
    json::Value v;
    v.kind = json::Kind::Int;
    v.integer = i;
    v.number = static_cast<double>(i);
    return v;
  }
  static json::Value float_value(double d) {
    json::Value v;
    v.kind = json::Kind::Float;
    v.number = d;
    return v;
  }

  static std::string lower(std::string s) {
    for (char& ch : s)
      if (ch >= 'A' && ch <= 'Z') ch = static_cast<char>(ch - 'A' + 'a');
    return s;
  }

  // The module of one layer dict for one sample's input shape (nullptr for softmax).
  ModulePtr layer_module(const json::Value& layer, const Shape& shape,
                         const std::string& path) {
    const std::string kind = lower(layer.find("type")->string);
    const std::string where = json::repr(path);
    // the constructor's arguments: the dict without type and name
    json::Value args = object({});
    for (const auto& m : layer.members)
      if (m.first != "type" && m.first != "name") args.members.push_back(m);
    auto with = [&](const char* key, json::Value v) {
      if (args.find(key))
        throw ValueError(std::string("bad arguments: ") + key + " is given by the builder");
      json::Value a = object({{key, std::move(v)}});
      a.members.insert(a.members.end(), args.members.begin(), args.members.end());
      return a;
    };
    static const char* const image_kinds[] = {"conv", "maxpool", "avgpool", "lrn",
                                              "bn",   "gap",     "adaptiveavgpool"};
    for (const char* k : image_kinds)
      if (kind == k && shape.size() != 3)
        throw ValueError("needs an image input (C, H, W), got shape " + shape_str(shape));
    if (kind == "conv") {
      json::Value a = with("in_channels", int_value(shape[0]));
      if (!a.find("padding")) a.members.emplace_back("padding", int_value(0));
      return leaf("Conv2d", &a, path, where);
    }
    if (kind == "maxpool") return leaf("MaxPool2d", &args, path, where);
    if (kind == "avgpool") return leaf("AvgPool2d", &args, path, where);
    if (kind == "fc") {
      const json::Value a = with("in_features", int_value(product(shape)));
      return leaf("Linear", &a, path, where);
    }
    if (kind == "relu") return std::make_unique<ReLUModule>(path);
    if (kind == "lrn") {  // AlexNet's NORM: the builder's defaults (k = 2)
      json::Value a = object({{"size", int_value(5)}, {"alpha", float_value(1e-4)},
                              {"beta", float_value(0.75)}, {"k", float_value(2.0)}});
      for (const auto& m : args.members) {
        bool replaced = false;
        for (auto& d : a.members)
          if (d.first == m.first) d.second = m.second, replaced = true;
        if (!replaced) a.members.push_back(m);
      }
      return leaf("LocalResponseNorm", &a, path, where);
    }
    if (kind == "bn") {
      const json::Value a = with("num_features", int_value(shape[0]));
      return leaf("BatchNorm2d", &a, path, where);
    }
    if (kind == "dropout") return leaf("Dropout", &args, path, where);
    if (kind == "gap") return std::make_unique<AdaptiveAvgPool2dModule>(path, 1, 1);
    if (kind == "adaptiveavgpool") return leaf("AdaptiveAvgPool2d", &args, path, where);
    if (kind == "flatten") return std::make_unique<FlattenModule>(path, 1, -1);
    if (kind == "softmax") return nullptr;
    throw ValueError("unknown type " + json::repr(layer.find("type")->string) +
                     " (known: conv, maxpool, avgpool, fc, relu, lrn, bn, dropout, gap, "
                     "adaptiveavgpool, flatten, softmax)");
  }

  ModulePtr network(const Config& c, const std::string& path) {
    const json::Value& layers = c.required("layers");
    if (!layers.is_array()) c.fail("layers must be a list of layer dicts");
    const json::Value& shape_v = c.required("input_shape");
    Shape input;
    if (shape_v.is_array())
      for (const auto& d : shape_v.items) input.push_back(d.is_int() ? d.integer : -1);
    if (!shape_v.is_array() || (input.size() != 1 && input.size() != 3) ||
        *std::min_element(input.begin(), input.end()) < 1)
      c.fail("input_shape must be (C, H, W) or (features,) with positive sizes, got " +
             json::short_repr(shape_v));
    const std::string mode = c.string("on_misfit", "warn");
    if (mode != "warn" && mode != "error" && mode != "ignore")
      c.fail("on_misfit must be 'warn', 'error' or 'ignore', got " + json::repr(mode));
    const json::Value* name = c.get("name");
    if (name && !name->is_null() && !name->is_string())
      c.fail("name must be a string or null, got " + json::short_repr(*name));
    if (name && name->is_string() && path.empty()) name_ = name->string;
    if (layers.items.empty()) c.fail("a network needs at least one layer");

    std::vector<std::string> kinds;
    for (std::size_t i = 0; i < layers.items.size(); ++i) {
      const json::Value& l = layers.items[i];
      const json::Value* t = l.is_object() ? l.find("type") : nullptr;
      if (!t || !t->is_string())
        c.fail("layer " + std::to_string(i) + " must be a dict with a string 'type', got " +
               json::short_repr(l));
      kinds.push_back(lower(t->string));
    }
    std::size_t split = std::find(kinds.begin(), kinds.end(), "fc") - kinds.begin();
    while (split > 0 && kinds[split - 1] == "dropout") --split;

    std::vector<ModulePtr> features, classifier;
    Shape shape = input;
    for (std::size_t i = 0; i < layers.items.size(); ++i) {
      if (kinds[i] == "fc" && shape.size() > 1) shape = {product(shape)};  // the implicit flatten
      std::vector<ModulePtr>& part = i >= split ? classifier : features;
      const std::string sub = join(path, i >= split ? "classifier" : "features");
      ModulePtr m;
      try {
        m = layer_module(layers.items[i], shape, join(sub, std::to_string(part.size())));
        if (!m) continue;
        shape = m->infer(shape, nullptr);
      } catch (const ValueError& e) {
        c.fail("layer " + std::to_string(i) + " (" + kinds[i] + ") on input " + shape_str(shape) +
               ": " + e.what());
      }
      if (!shape.empty() && *std::min_element(shape.begin(), shape.end()) < 1)
        c.fail("layer " + std::to_string(i) + " (" + kinds[i] + ") gives an empty output " +
               shape_str(shape));
      part.push_back(std::move(m));
    }
    const bool has_classifier = !classifier.empty();
    return std::make_unique<NetworkModule>(
        path, std::make_unique<SequentialModule>(join(path, "features"), std::move(features)),
        std::make_unique<SequentialModule>(join(path, "classifier"), std::move(classifier)),
        input, has_classifier);
  }

  // --- Graph (python/convcore/nn/graph.py): children from the tree, wired
  // by the config's node lines "out = op(a, b)", checked as Python checks them.

  static bool identifier(const std::string& s) {
    if (s.empty() || !(std::isalpha(static_cast<unsigned char>(s[0])) || s[0] == '_')) return false;
    for (char ch : s)
      if (!(std::isalnum(static_cast<unsigned char>(ch)) || ch == '_')) return false;
    return true;
  }
  static std::string trim(const std::string& s) {
    const auto b = s.find_first_not_of(" \t\r\n");
    if (b == std::string::npos) return "";
    return s.substr(b, s.find_last_not_of(" \t\r\n") - b + 1);
  }

  ModulePtr graph(const Config& c, const std::string& path, std::vector<std::string> names,
                  std::vector<ModulePtr> children) {
    static const char* const kJoins[] = {"concat", "add", "mul", "relu"};
    auto is_join = [](const std::string& s) {
      for (const char* j : kJoins)
        if (s == j) return true;
      return false;
    };
    for (const auto& n : names)
      if (!identifier(n) || is_join(n) || n == "x")
        c.fail("bad module name " + json::repr(n) + " (an identifier, not x or a join: concat, "
               "add, mul, relu)");
    const json::Value& lines = c.required("nodes");
    if (!lines.is_array())
      c.fail("nodes must be a list of strings, got " + json::short_repr(lines));
    if (lines.items.empty()) c.fail("a graph needs at least one node");
    std::vector<std::string> values = {"x"};
    auto value_index = [&values](const std::string& v) -> int {
      for (std::size_t i = 0; i < values.size(); ++i)
        if (values[i] == v) return static_cast<int>(i);
      return -1;
    };
    std::vector<bool> used(names.size(), false);
    std::vector<GraphNode> nodes;
    for (const auto& item : lines.items) {
      if (!item.is_string())
        c.fail("a graph node must be a string 'name = op(inputs)', got " + json::short_repr(item));
      const std::string& line = item.string;
      const auto eq = line.find('='), open = line.find('('), close = line.rfind(')');
      const std::string bad = "bad graph node " + json::repr(line) +
                              ": expected 'name = op(input, ...)', e.g. 'out = concat(b1, b2)'";
      if (eq == std::string::npos || open == std::string::npos || close == std::string::npos ||
          !(eq < open && open < close) || !trim(line.substr(close + 1)).empty())
        c.fail(bad);
      GraphNode node;
      node.text = line;
      const std::string out = trim(line.substr(0, eq));
      const std::string op = trim(line.substr(eq + 1, open - eq - 1));
      std::vector<std::string> inputs;
      std::string args = line.substr(open + 1, close - open - 1);
      for (std::size_t start = 0;;) {
        const auto comma = args.find(',', start);
        inputs.push_back(trim(args.substr(start, comma == std::string::npos ? std::string::npos
                                                                           : comma - start)));
        if (comma == std::string::npos) break;
        start = comma + 1;
      }
      if (!identifier(out) || !identifier(op)) c.fail(bad);
      for (const auto& v : inputs) {
        if (!identifier(v)) c.fail(bad);
        const int idx = value_index(v);
        if (idx < 0)
          c.fail("graph node " + json::repr(out) + " takes " + json::repr(v) +
                 ", which no earlier node defines");
        node.inputs.push_back(idx);
      }
      if (value_index(out) >= 0) c.fail("graph value " + json::repr(out) + " is defined twice");
      const auto child = std::find(names.begin(), names.end(), op);
      if (child != names.end()) {
        const std::size_t k = static_cast<std::size_t>(child - names.begin());
        if (used[k])
          c.fail("module " + json::repr(op) + " is called twice (give each call its own module)");
        if (inputs.size() != 1)
          c.fail("graph node " + json::repr(out) + ": module " + json::repr(op) +
                 " takes one input, got " + std::to_string(inputs.size()));
        used[k] = true;
        node.kind = GraphNode::kModule;
        node.child = k;
      } else if (op == "concat") {
        node.kind = GraphNode::kConcat;
      } else if (op == "add") {
        node.kind = GraphNode::kAdd;
      } else if (op == "mul" || op == "relu") {
        node.kind = op == "mul" ? GraphNode::kMul : GraphNode::kRelu;
        const std::size_t want = op == "mul" ? 2 : 1;
        if (inputs.size() != want)
          c.fail("graph node " + json::repr(out) + ": " + op + " takes " +
                 (want == 1 ? "one input" : "two inputs") + ", got " +
                 std::to_string(inputs.size()));
      } else {
        c.fail("graph node " + json::repr(out) + ": " + json::repr(op) +
               " is neither a child module (" + (names.empty() ? "none" : py_list(names)) +
               ") nor a join (concat, add, mul, relu)");
      }
      values.push_back(out);
      node.out = static_cast<int>(values.size() - 1);
      nodes.push_back(std::move(node));
    }
    std::vector<std::string> unused;
    for (std::size_t k = 0; k < names.size(); ++k)
      if (!used[k]) unused.push_back(names[k]);
    if (!unused.empty()) c.fail("modules " + py_list(unused) + " are not called by any graph node");
    int output = nodes.back().out;
    if (const json::Value* outs = c.get("outputs")) {
      if (!outs->is_array() || outs->items.empty())
        c.fail("outputs must be a non-empty list of node names, got " + json::short_repr(*outs));
      for (const auto& o : outs->items) {
        if (!o.is_string() || value_index(o.string) < 0)
          c.fail("graph output " + json::short_repr(o) + " is not a node");
      }
      output = value_index(outs->items[0].string);  // eval mode: the first output only
    }
    const json::Value* nm = c.get("name");
    if (nm && !nm->is_null()) {
      if (!nm->is_string()) c.fail("name must be a string, got " + json::short_repr(*nm));
      if (path.empty()) name_ = nm->string;
    }
    Shape input;
    const json::Value* in = c.get("input_shape");
    if (in && !in->is_null()) {
      if (!in->is_array())
        c.fail("input_shape must be a list of ints, got " + json::short_repr(*in));
      for (const auto& d : in->items) {
        if (!d.is_int() || d.integer < 1)
          c.fail("input_shape must be a list of positive ints, got " + json::short_repr(*in));
        input.push_back(d.integer);
      }
    }
    return std::make_unique<GraphModule>(path, std::move(names), std::move(children),
                                         std::move(nodes), std::move(values), output,
                                         std::move(input));
  }

  // --- ResNet and its blocks (python/convcore/models.py, nn/residual.py)

  static ModulePtr conv(const std::string& path, int64_t in, int64_t out, int64_t k,
                        int64_t stride, int64_t pad, int64_t groups, const Config& c) {
    const json::Value a = object({{"in_channels", int_value(in)}, {"out_channels", int_value(out)},
                                  {"kernel_size", int_value(k)}, {"stride", int_value(stride)},
                                  {"padding", int_value(pad)}, {"groups", int_value(groups)},
                                  {"bias", json::parse("false")}});
    try {
      return conv2d(Config(&a, "Conv2d", json::repr(path), {"in_channels", "out_channels",
                                                            "kernel_size", "stride", "padding",
                                                            "groups", "bias"}),
                    path);
    } catch (const ValueError& e) {
      c.fail(e.what());
    }
  }
  static ModulePtr bn(const std::string& path, int64_t n, const Config& c) {
    if (n < 1) c.fail("num_features must be a positive int, got " + std::to_string(n));
    return std::make_unique<BatchNorm2dModule>(path, n, 1e-5, true, true);
  }

  // BasicBlock (expansion 1) or Bottleneck (expansion 4), as their constructors build them.
  ModulePtr block(bool basic, int64_t inplanes, int64_t planes, int64_t stride, int64_t groups,
                  int64_t base_width, const std::string& path, std::vector<std::string>* built,
                  const Config& c) {
    const int64_t expansion = basic ? 1 : 4;
    int64_t out;
    if (__builtin_mul_overflow(planes, expansion, &out)) c.fail("planes is too large");
    std::vector<ModulePtr> body;
    std::vector<std::string> names;
    if (basic) {
      body.push_back(conv(join(path, "conv1"), inplanes, planes, 3, stride, 1, 1, c));
      body.push_back(bn(join(path, "bn1"), planes, c));
      body.push_back(conv(join(path, "conv2"), planes, planes, 3, 1, 1, 1, c));
      body.push_back(bn(join(path, "bn2"), planes, c));
      names = {"conv1", "bn1", "conv2", "bn2"};
    } else {
      // width = int(planes * (base_width / 64.0)) * groups
      const double w = static_cast<double>(planes) * (static_cast<double>(base_width) / 64.0);
      int64_t width = 0;
      if (!(w > -9.2e18 && w < 9.2e18) ||
          __builtin_mul_overflow(static_cast<int64_t>(w), groups, &width))
        c.fail("planes, base_width and groups give too wide a block");
      body.push_back(conv(join(path, "conv1"), inplanes, width, 1, 1, 0, 1, c));
      body.push_back(bn(join(path, "bn1"), width, c));
      body.push_back(conv(join(path, "conv2"), width, width, 3, stride, 1, groups, c));
      body.push_back(bn(join(path, "bn2"), width, c));
      body.push_back(conv(join(path, "conv3"), width, out, 1, 1, 0, 1, c));
      body.push_back(bn(join(path, "bn3"), out, c));
      names = {"conv1", "bn1", "conv2", "bn2", "conv3", "bn3"};
    }
    ModulePtr downsample;
    if (stride != 1 || inplanes != out) {  // the projection shortcut: 1x1 conv + BN
      std::vector<ModulePtr> proj;
      proj.push_back(conv(join(path, "downsample.0"), inplanes, out, 1, stride, 0, 1, c));
      proj.push_back(bn(join(path, "downsample.1"), out, c));
      downsample = std::make_unique<SequentialModule>(join(path, "downsample"), std::move(proj));
      names.push_back("downsample");
    }
    if (built) *built = names;
    return std::make_unique<ResidualModule>(
        path, basic ? "BasicBlock" : "Bottleneck", std::move(body), std::move(downsample),
        std::to_string(inplanes) + ", " + std::to_string(planes) + ", stride=" +
            std::to_string(stride));
  }

  ModulePtr resnet(const Config& c, const std::string& path, std::vector<std::string>& built) {
    const std::string block_kind = c.string("block", "basic");
    if (block_kind != "basic" && block_kind != "bottleneck")
      c.fail("block must be 'basic' or 'bottleneck', got " + json::repr(block_kind));
    std::vector<int64_t> counts = {2, 2, 2, 2};
    if (const json::Value* l = c.get("layers")) {
      counts.clear();
      if (l->is_array())
        for (const auto& v : l->items) counts.push_back(v.is_int() ? v.integer : 0);
      if (counts.size() != 4 || *std::min_element(counts.begin(), counts.end()) < 1)
        c.fail("layers must be four positive block counts, got " + json::short_repr(*l));
      for (int64_t n : counts)
        if (n > 100000) c.fail("layers must be four positive block counts, got " + json::short_repr(*l));
    }
    const int64_t classes = c.integer("num_classes", 1000);
    if (classes < 1) c.fail("num_classes must be at least 1, got " + std::to_string(classes));
    Shape input = {3, 224, 224};
    if (const json::Value* s = c.get("input_size")) {
      if (s->is_int()) {
        input = {3, s->integer, s->integer};
      } else if (s->is_array() && (s->items.size() == 2 || s->items.size() == 3)) {
        Shape dims;
        for (const auto& v : s->items) dims.push_back(v.is_int() ? v.integer : 0);
        input = dims.size() == 2 ? Shape{3, dims[0], dims[1]} : dims;
      } else {
        c.fail("input_size must be an int, (H, W) or (C, H, W), got " + json::short_repr(*s));
      }
      if (*std::min_element(input.begin(), input.end()) < 1)
        c.fail("input_size must be positive, got " + json::short_repr(*s));
    }
    const bool basic = block_kind == "basic";
    // ResNeXt / Wide ResNet: bottleneck groups and width (absent: plain ResNet)
    const int64_t groups = c.has("groups") ? c.positive("groups") : 1;
    const int64_t width_per_group = c.has("width_per_group") ? c.positive("width_per_group") : 64;
    if (basic && (groups != 1 || width_per_group != 64))
      c.fail("groups and width_per_group need block='bottleneck'");
    std::vector<ModulePtr> parts;
    parts.push_back(conv(join(path, "conv1"), input[0], 64, 7, 2, 3, 1, c));
    parts.push_back(bn(join(path, "bn1"), 64, c));
    Pool2dParams mp;
    mp.kernel_h = mp.kernel_w = 3;
    mp.stride_h = mp.stride_w = 2;
    mp.pad_h = mp.pad_w = 1;
    parts.push_back(std::make_unique<MaxPool2dModule>(join(path, "maxpool"), mp));
    int64_t inplanes = 64;
    const int64_t widths[4] = {64, 128, 256, 512};
    for (int stage = 0; stage < 4; ++stage) {
      const std::string sp = join(path, "layer" + std::to_string(stage + 1));
      std::vector<ModulePtr> blocks;
      for (int64_t i = 0; i < counts[static_cast<std::size_t>(stage)]; ++i) {
        blocks.push_back(block(basic, inplanes, widths[stage], i == 0 && stage > 0 ? 2 : 1,
                               groups, width_per_group, join(sp, std::to_string(i)), nullptr, c));
        inplanes = widths[stage] * (basic ? 1 : 4);
      }
      parts.push_back(std::make_unique<SequentialModule>(sp, std::move(blocks)));
    }
    parts.push_back(std::make_unique<AdaptiveAvgPool2dModule>(join(path, "avgpool"), 1, 1));
    parts.push_back(std::make_unique<LinearModule>(join(path, "fc"), inplanes, classes, true));
    built = {"conv1", "bn1", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool", "fc"};
    if (name_.empty() && path.empty()) name_ = "ResNet";
    const std::string args = "block='" + block_kind + "', layers=[" + std::to_string(counts[0]) +
                             ", " + std::to_string(counts[1]) + ", " + std::to_string(counts[2]) +
                             ", " + std::to_string(counts[3]) + "], num_classes=" +
                             std::to_string(classes);
    return std::make_unique<ResNetModule>(path, std::move(parts), input, args);
  }
};

// io.py's _check_tree: bounds the depth and size of the tree and checks the
// shape of every node before anything is built.
void check_tree(const json::Value& node, int depth, int64_t& count,
                const std::function<void(const std::string&)>& bad) {
  ++count;
  if (depth > kMaxArchDepth)
    bad("the architecture is nested more than " + std::to_string(kMaxArchDepth) + " levels deep");
  if (count > kMaxArchNodes)
    bad("the architecture has more than " + std::to_string(kMaxArchNodes) + " modules");
  const json::Value* type = node.is_object() ? node.find("type") : nullptr;
  if (!type || !type->is_string())
    bad("bad architecture node (needs a dict with a string 'type'): " + json::short_repr(node));
  const json::Value* config = node.find("config");
  if (config && !config->is_object())
    bad("architecture node " + json::repr(type->string) + ": 'config' is not an object");
  const json::Value* children = node.find("children");
  if (children && !children->is_object())
    bad("architecture node " + json::repr(type->string) + ": 'children' is not an object");
  if (children)
    for (const auto& c : children->members) check_tree(c.second, depth + 1, count, bad);
}

// numpy's name for the dtype a safetensors dtype is read as (io.py's _NATIVE;
// BF16 is widened to float32).
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

bool is_int_dtype(const std::string& st) {
  return !st.empty() && (st[0] == 'I' || st[0] == 'U');
}

}  // namespace

// ---------------------------------------------------------------------- Net

struct Net::Impl {
  std::string path, name;
  std::map<std::string, std::string> metadata;
  ModulePtr root;
  DType dtype = DType::Float32;
  Shape input_shape;
};

Net::Net(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Net::Net(Net&&) noexcept = default;
Net& Net::operator=(Net&&) noexcept = default;
Net::~Net() = default;

Net Net::load(const std::string& path) {
  auto bad = [&path](const std::string& what) {
    throw ValueError("cannot load " + json::repr(path, 4096) + ": " + what);
  };
  SafetensorsFile file = SafetensorsFile::open(path);
  auto impl = std::make_unique<Impl>();
  impl->path = path;
  impl->metadata = file.metadata();

  const auto arch_it = file.metadata().find("convcore_architecture");
  if (arch_it == file.metadata().end())
    bad("no convcore architecture in the metadata (not saved by convcore.save? read its tensors "
        "with convcore::SafetensorsFile)");
  json::Value arch;
  try {
    arch = json::parse(arch_it->second);
  } catch (const json::ParseError& e) {
    bad(std::string("the architecture in the metadata is not valid JSON (") + e.what() + ")");
  }
  int64_t count = 0;
  check_tree(arch, 0, count, bad);

  Builder builder;
  try {
    impl->root = builder.build(arch, "");
  } catch (const ValueError& e) {
    bad(std::string("cannot rebuild the architecture: ") + e.what());
  }
  const std::string& root_type = impl->root->type();
  impl->name = builder.name_.empty() ? root_type : builder.name_;
  if (auto* n = dynamic_cast<NetworkModule*>(impl->root.get())) impl->input_shape = n->input_shape();
  if (auto* r = dynamic_cast<ResNetModule*>(impl->root.get())) impl->input_shape = r->input_shape();
  if (auto* g = dynamic_cast<GraphModule*>(impl->root.get())) impl->input_shape = g->input_shape();
  if (!impl->input_shape.empty()) {
    try {
      impl->root->infer(impl->input_shape, nullptr);
    } catch (const ValueError& e) {
      bad("the architecture does not work on its input shape " + shape_str(impl->input_shape) +
          ": " + e.what());
    }
  }

  // The net's dtype: float64 when every floating-point tensor is F64.
  bool any_float = false, all_f64 = true;
  for (const auto& e : file.entries())
    if (is_float_dtype(e.dtype)) any_float = true, all_f64 = all_f64 && e.dtype == "F64";
  impl->dtype = any_float && all_f64 ? DType::Float64 : DType::Float32;

  std::vector<TensorSpec> specs;
  impl->root->tensors(specs);
  std::vector<std::string> missing, unexpected;
  for (const auto& s : specs)
    if (!file.find(s.key)) missing.push_back(s.key);
  for (const auto& e : file.entries()) {
    bool wanted = false;
    for (const auto& s : specs) wanted = wanted || s.key == e.name;
    if (!wanted) unexpected.push_back(e.name);
  }
  if (!missing.empty() || !unexpected.empty()) {
    std::string parts;
    if (!missing.empty()) parts += "missing " + py_list(missing);
    if (!unexpected.empty()) parts += (parts.empty() ? "" : "; ") + std::string("unexpected ") +
                                      py_list(unexpected);
    bad("the tensors do not match the architecture: " + parts);
  }
  for (const auto& s : specs) {
    const SafetensorsEntry& e = *file.find(s.key);
    if (e.shape != s.shape)
      bad("tensor " + json::repr(s.key) + " has shape " + shape_list(e.shape) +
          " but the architecture needs " + shape_list(s.shape));
    const bool ok = s.is_float ? is_float_dtype(e.dtype) : is_int_dtype(e.dtype);
    if (!ok)
      bad("tensor " + json::repr(s.key) + " has dtype " + numpy_name(e.dtype) +
          ", the model needs " + (s.is_float ? dtype_name(impl->dtype) : "int64"));
  }
  for (const auto& s : specs) {
    Tensor t = file.read(s.key);
    *s.slot = s.is_float ? t.to(impl->dtype) : std::move(t);
  }
  return Net(std::move(impl));
}

Tensor Net::forward(const TensorView& input) const {
  if (input.dtype != DType::Float32 && input.dtype != DType::Float64)
    throw TypeError(std::string("input must be float32 or float64, got ") +
                    dtype_name(input.dtype));
  if (input.dtype != impl_->dtype)
    throw TypeError(std::string("input has dtype ") + dtype_name(input.dtype) + " but the net " +
                    json::repr(impl_->name) + " is " + dtype_name(impl_->dtype) +
                    " (convert the input)");
  if (input.ndim < 1) throw ValueError("input must be a batch (N, ...), got a scalar");
  const Shape& in = impl_->input_shape;
  if (!in.empty() && static_cast<std::size_t>(input.ndim) != in.size() + 1) {
    Shape expected = {-1};
    expected.insert(expected.end(), in.begin(), in.end());
    std::string e = shape_str(expected);
    e.replace(1, 2, "N");
    throw ValueError("input must be a batch of shape " + e + ", got " + shape_str(input));
  }
  if (!input.data && input.numel() != 0) throw ValueError("input has no data");
  return impl_->root->run(Tensor::from_view(input));
}

DType Net::dtype() const { return impl_->dtype; }
const std::vector<int64_t>& Net::input_shape() const { return impl_->input_shape; }

std::vector<int64_t> Net::output_shape(const std::vector<int64_t>& sample_shape) const {
  return impl_->root->infer(sample_shape, nullptr);
}

std::vector<int64_t> Net::output_shape() const {
  if (impl_->input_shape.empty())
    throw ValueError("the file gives no input shape for " + json::repr(impl_->name) +
                     "; use output_shape(sample_shape)");
  return output_shape(impl_->input_shape);
}

int64_t Net::num_parameters() const { return impl_->root->num_parameters(); }
const std::string& Net::name() const { return impl_->name; }
const std::string& Net::path() const { return impl_->path; }
const std::map<std::string, std::string>& Net::metadata() const { return impl_->metadata; }

std::string Net::summary() const {
  std::vector<SummaryRow> rows;
  if (!impl_->input_shape.empty()) {
    impl_->root->infer(impl_->input_shape, &rows);
  } else {
    std::vector<const Module*> leaves;
    impl_->root->leaves(leaves);
    for (const Module* m : leaves) rows.push_back({m->path(), m->type(), m->args(), {}, m->num_parameters()});
  }
  auto with_commas = [](int64_t v) {
    std::string s = std::to_string(v);
    for (int i = static_cast<int>(s.size()) - 3; i > 0; i -= 3) s.insert(static_cast<std::size_t>(i), ",");
    return s;
  };
  std::size_t wn = 5, wt = 4, wo = 6;
  for (const auto& r : rows) {
    wn = std::max(wn, r.name.size());
    wt = std::max(wt, r.type.size());
    wo = std::max(wo, r.output.empty() ? std::size_t{1} : shape_str(r.output).size());
  }
  std::ostringstream os;
  os << impl_->name << " (" << impl_->root->type() << "), " << dtype_name(impl_->dtype) << ", "
     << with_commas(num_parameters()) << " parameters";
  if (!impl_->input_shape.empty()) os << ", input " << shape_str(impl_->input_shape);
  os << "\n";
  os << std::left << std::setw(static_cast<int>(wn)) << "layer" << "  "
     << std::setw(static_cast<int>(wt)) << "type" << "  " << std::setw(static_cast<int>(wo))
     << "output" << "  " << std::right << std::setw(12) << "parameters" << "  arguments\n";
  for (const auto& r : rows) {
    os << std::left << std::setw(static_cast<int>(wn)) << r.name << "  "
       << std::setw(static_cast<int>(wt)) << r.type << "  " << std::setw(static_cast<int>(wo))
       << (r.output.empty() ? "-" : shape_str(r.output)) << "  " << std::right << std::setw(12)
       << with_commas(r.params) << (r.args.empty() ? "" : "  " + r.args) << "\n";
  }
  return os.str();
}

}  // namespace convcore
