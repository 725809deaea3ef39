// The ops and the network runner against stored reference outputs
// (tests/cpp/data/, written by tests/cpp/make_reference.py): op outputs from
// independent numpy loops in float64, and networks saved by convcore with
// their outputs computed in Python.
#include <string>
#include <vector>

#include "check.h"
#include "convcore/convcore.h"
#include "convcore/net.h"
#include "convcore/padding.h"
#include "convcore/safetensors.h"
#include "json.h"
#include "util.h"

#ifndef CONVCORE_TEST_DATA_DIR
#error "CONVCORE_TEST_DATA_DIR must name tests/cpp/data"
#endif

using namespace convcore;

namespace {

std::string data(const std::string& name) { return std::string(CONVCORE_TEST_DATA_DIR) + "/" + name; }

std::pair<int64_t, int64_t> pair_of(const json::Value& args, const char* key) {
  const json::Value& v = *args.find(key);
  return {v.items[0].integer, v.items[1].integer};
}

Tensor empty_like(const Tensor& t) { return Tensor::empty(t.dtype(), t.shape()); }

Pool2dParams pool_params(const json::Value& a) {
  Pool2dParams p;
  std::tie(p.kernel_h, p.kernel_w) = pair_of(a, "kernel_size");
  std::tie(p.stride_h, p.stride_w) = pair_of(a, "stride");
  std::tie(p.pad_h, p.pad_w) = pair_of(a, "padding");
  if (a.find("dilation")) std::tie(p.dilation_h, p.dilation_w) = pair_of(a, "dilation");
  p.ceil_mode = a.find("ceil_mode")->boolean;
  if (a.find("count_include_pad")) p.count_include_pad = a.find("count_include_pad")->boolean;
  if (a.find("divisor_override")) p.divisor_override = a.find("divisor_override")->integer;
  return p;
}

// Runs one case; returns its outputs by role.
std::map<std::string, Tensor> run_case(const std::string& op, const json::Value& a,
                                       std::map<std::string, Tensor>& in,
                                       const std::map<std::string, Tensor>& expected) {
  std::map<std::string, Tensor> out;
  for (const auto& e : expected) out[e.first] = empty_like(e.second);
  auto v = [&](const char* role) { return in.at(role).view(); };
  auto o = [&](const char* role) { return out.at(role).view(); };
  if (op == "conv2d" || op == "conv2d_backward") {
    Conv2dParams p;
    std::tie(p.stride_h, p.stride_w) = pair_of(a, "stride");
    std::tie(p.dilation_h, p.dilation_w) = pair_of(a, "dilation");
    const json::Value& pad = *a.find("padding");
    p.pad_top = pad.items[0].integer, p.pad_bottom = pad.items[1].integer;
    p.pad_left = pad.items[2].integer, p.pad_right = pad.items[3].integer;
    p.groups = a.find("groups")->integer;
    if (op == "conv2d") {
      const TensorView b = v("b");
      conv2d_forward(v("x"), v("w"), &b, p, o("y"));
    } else {
      const TensorView gx = o("gx"), gw = o("gw"), gb = o("gb");
      conv2d_backward(v("gy"), v("x"), v("w"), p, &gx, &gw, &gb);
    }
  } else if (op == "max_pool2d") {
    max_pool2d_forward(v("x"), pool_params(a), o("y"), nullptr);
  } else if (op == "max_pool2d_backward") {
    max_pool2d_backward(v("gy"), v("x"), pool_params(a), o("gx"));
  } else if (op == "avg_pool2d") {
    avg_pool2d_forward(v("x"), pool_params(a), o("y"));
  } else if (op == "avg_pool2d_backward") {
    avg_pool2d_backward(v("gy"), pool_params(a), o("gx"));
  } else if (op == "adaptive_avg_pool2d") {
    adaptive_avg_pool2d_forward(v("x"), o("y"));
  } else if (op == "adaptive_avg_pool2d_backward") {
    adaptive_avg_pool2d_backward(v("gy"), o("gx"));
  } else if (op == "linear") {
    const TensorView b = v("b");
    linear_forward(v("x"), v("w"), &b, o("y"));
  } else if (op == "linear_backward") {
    const TensorView gx = o("gx"), gw = o("gw"), gb = o("gb");
    linear_backward(v("gy"), v("x"), v("w"), &gx, &gw, &gb);
  } else if (op == "relu") {
    relu_forward(v("x"), o("y"));
  } else if (op == "relu_backward") {
    relu_backward(v("gy"), v("x"), o("gx"));
  } else if (op == "local_response_norm") {
    LrnParams p;
    p.size = a.find("size")->integer;
    p.alpha = a.find("alpha")->number, p.beta = a.find("beta")->number, p.k = a.find("k")->number;
    local_response_norm_forward(v("x"), p, o("y"));
  } else if (op == "batch_norm") {
    const bool training = a.find("training")->boolean;
    const TensorView w = v("w"), b = v("b");
    if (training)
      batch_norm_forward(v("x"), &w, &b, true, a.find("eps")->number, o("mean"), o("var"), o("y"));
    else
      batch_norm_forward(v("x"), &w, &b, false, a.find("eps")->number, v("mean"), v("var"), o("y"));
  } else if (op == "pad2d") {
    const json::Value& pad = *a.find("padding");
    const Pad2dParams p{pad.items[0].integer, pad.items[1].integer, pad.items[2].integer,
                        pad.items[3].integer, parse_pad_mode(a.find("mode")->string)};
    pad2d_forward(v("x"), p, o("y"));
  } else {
    throw Error("unknown op in the reference data: " + op);
  }
  return out;
}

}  // namespace

TEST(ops_match_stored_numpy_references) {
  const SafetensorsFile file = SafetensorsFile::open(data("ops.safetensors"));
  const json::Value cases = json::parse(file.metadata().at("cases"));
  CHECK(cases.items.size() > 50);
  int compared = 0;
  for (const json::Value& c : cases.items) {
    const std::string name = c.find("name")->string, op = c.find("op")->string;
    std::map<std::string, Tensor> in, expected;
    for (const auto& m : c.find("inputs")->members) in[m.first] = file.read(m.second.string);
    for (const auto& m : c.find("outputs")->members) expected[m.first] = file.read(m.second.string);
    const std::map<std::string, Tensor> got = run_case(op, *c.find("args"), in, expected);
    for (const auto& e : expected) {
      const bool f32 = e.second.dtype() == DType::Float32;
      const double err = testutil::rel_error(got.at(e.first), e.second);
      ++compared;
      ++check::checks();
      if (!(err < (f32 ? 5e-6 : 1e-12)))
        check::fail(__FILE__, __LINE__, name + "." + e.first + ": relative error " + std::to_string(err));
    }
  }
  std::printf("  %zu cases, %d outputs compared\n", cases.items.size(), compared);
}

TEST(nets_match_python_outputs) {
  // net_<name>.safetensors: format 1 (the module tree only, written before
  // the graph existed); net_<name>_graph.safetensors: format 2
  for (const std::string name : {"mix", "mix64", "residual", "gap", "mix_graph", "mix64_graph",
                                 "residual_graph", "gap_graph"}) {
    const std::string io_name = name.substr(0, name.find("_graph"));
    const Net net = Net::load(data("net_" + name + ".safetensors"));
    const SafetensorsFile io = SafetensorsFile::open(data("net_" + io_name + "_io.safetensors"));
    const Tensor x = io.read("input"), expected = io.read("output");
    const Tensor y = net.forward(x);
    const double err = testutil::rel_error(y, expected);
    const bool f32 = y.dtype() == DType::Float32;
    std::printf("  net_%s: %s, output %s, relative error %.3g%s\n", name.c_str(), net.name().c_str(),
                y.shape_str().c_str(), err, testutil::bit_equal(y, expected) ? " (bit-identical)" : "");
    CHECK(y.dtype() == expected.dtype());
    CHECK(err < (f32 ? 1e-5 : 1e-12));
    if (!net.input_shape().empty()) {
      std::vector<int64_t> out = net.output_shape();
      out.insert(out.begin(), x.size(0));
      CHECK(out == y.shape());
    }
  }
}

TEST_MAIN()
