// The safetensors reader/writer and convcore::Net: round trips, a small net
// (in the graph format and in format 1) against the ops composed by hand,
// the compiled engine against its plain, unfused steps, and every error path
// of the loader (malformed, truncated, inconsistent files), including every
// truncation and thousands of random corruptions of a valid file: always an
// exception, never a crash or an out-of-bounds read (run under ASan to see
// the latter).
#include <cstring>
#include <map>
#include <string>
#include <vector>

#include "check.h"
#include "convcore/convcore.h"
#include "convcore/net.h"
#include "convcore/safetensors.h"
#include "util.h"

using namespace convcore;
using testutil::random_tensor;
using testutil::raw_safetensors;
using testutil::Rng;
using testutil::TempDir;

namespace {

// A tiny network in the graph format (docs/format.md), as Python's save()
// writes it: 1x6x6 -> conv3 -> 2x4x4 -> relu -> pool2 -> 2x2x2 -> flatten -> fc 3.
std::string node(const std::string& op, const std::string& name, const std::string& attrs,
                 const std::string& in, const std::string& out) {
  std::string s = R"({"op": ")" + op + "\"";
  if (!name.empty()) s += R"(, "name": ")" + name + "\"";
  if (!attrs.empty()) s += R"(, "attrs": )" + attrs;
  return s + R"(, "inputs": [)" + in + R"(], "outputs": [")" + out + "\"]}";
}

const std::string kConv =
    node("Conv2d", "features.0", R"({"in_channels": 1, "out_channels": 2, "kernel_size": [3, 3], "padding": 0})",
         "\"x\"", "features.0");

std::string graph_json(const std::vector<std::string>& nodes, const std::string& input_shape = "[1, 6, 6]",
                       const std::string& output = "classifier.0", const std::string& extra = "") {
  std::string s = R"({"version": 2, "name": "tiny", "input_shape": )" + input_shape +
                  R"(, "inputs": ["x"], "outputs": [")" + output + R"("], )" + extra + R"("nodes": [)";
  for (std::size_t i = 0; i < nodes.size(); ++i) s += (i ? ", " : "") + nodes[i];
  return s + "]}";
}

std::vector<std::string> tiny_nodes() {
  return {kConv, node("ReLU", "features.1", "{}", "\"features.0\"", "features.1"),
          node("MaxPool2d", "features.2", R"({"kernel_size": 2})", "\"features.1\"", "features.2"),
          node("Flatten", "", R"({"start_dim": 1, "end_dim": -1})", "\"features.2\"", "flatten"),
          node("Linear", "classifier.0", R"({"in_features": 8, "out_features": 3})",
               "\"flatten\"", "classifier.0")};
}

std::string tiny_graph() { return graph_json(tiny_nodes()); }

// The same network as a format-1 file (the module tree of a builder Network,
// children listed, as Module.architecture() wrote it).
std::string tiny_architecture() {
  return R"({"type": "Network", "config": {"layers": [], "input_shape": [1, 6, 6], "name": "tiny"}, "children": {)"
         R"("features": {"type": "Sequential", "config": {}, "children": {)"
         R"("0": {"type": "Conv2d", "config": {"in_channels": 1, "out_channels": 2, "kernel_size": [3, 3], "padding": [0, 0]}},)"
         R"("1": {"type": "ReLU", "config": {}}, "2": {"type": "MaxPool2d", "config": {"kernel_size": 2}}}},)"
         R"("classifier": {"type": "Sequential", "config": {}, "children": {)"
         R"("0": {"type": "Linear", "config": {"in_features": 8, "out_features": 3}}}}}})";
}

// A root Sequential of the given module nodes, named "0", "1", ... (format 1).
std::string sequential(const std::vector<std::string>& nodes) {
  std::string s = R"({"type": "Sequential", "config": {}, "children": {)";
  for (std::size_t i = 0; i < nodes.size(); ++i)
    s += (i ? ", \"" : "\"") + std::to_string(i) + "\": " + nodes[i];
  return s + "}}";
}

struct Params {
  Tensor w1, b1, w2, b2;
};

Params tiny_params(DType dt = DType::Float32) {
  Rng rng(42);
  return {random_tensor(dt, {2, 1, 3, 3}, rng), random_tensor(dt, {2}, rng),
          random_tensor(dt, {3, 8}, rng), random_tensor(dt, {3}, rng)};
}

void write_net(const std::string& path, const std::string& graph,
               std::vector<std::pair<std::string, TensorView>> tensors,
               const std::string& key = "convcore_graph") {
  save_safetensors(path, tensors, {{"format", "convcore"}, {key, graph}});
}

std::vector<std::pair<std::string, TensorView>> tiny_tensors(const Params& p) {
  return {{"features.0.weight", p.w1.view()}, {"features.0.bias", p.b1.view()},
          {"classifier.0.weight", p.w2.view()}, {"classifier.0.bias", p.b2.view()}};
}

void write_tiny(const std::string& path, const Params& p, const std::string& graph = tiny_graph()) {
  write_net(path, graph, tiny_tensors(p));
}

void write_tiny_format1(const std::string& path, const Params& p,
                        const std::string& arch = tiny_architecture()) {
  write_net(path, arch, tiny_tensors(p), "convcore_architecture");
}

// The tiny net computed with the ops directly.
Tensor tiny_by_hand(const Params& p, const Tensor& x) {
  const int64_t n = x.size(0);
  Tensor c = Tensor::empty(x.dtype(), {n, 2, 4, 4});
  const TensorView b1 = p.b1.view();
  conv2d_forward(x.view(), p.w1.view(), &b1, Conv2dParams(), c.view());
  relu_forward(c.view(), c.view());
  Pool2dParams pp;
  pp.kernel_h = pp.kernel_w = pp.stride_h = pp.stride_w = 2;
  Tensor m = Tensor::empty(x.dtype(), {n, 2, 2, 2});
  max_pool2d_forward(c.view(), pp, m.view(), nullptr);
  Tensor y = Tensor::empty(x.dtype(), {n, 3});
  const TensorView b2 = p.b2.view();
  linear_forward(std::move(m).reshape({n, 8}).view(), p.w2.view(), &b2, y.view());
  return y;
}

std::string load_error(const std::string& path) {
  try {
    Net::load(path);
  } catch (const ValueError& e) {
    return e.what();
  } catch (const std::exception& e) {
    return std::string("(not a ValueError) ") + e.what();
  }
  return "(loaded)";
}

#define CHECK_LOAD_FAILS(path, part)                                                    \
  do {                                                                                  \
    ++check::checks();                                                                  \
    const std::string msg_ = load_error(path);                                          \
    if (!check::contains(msg_, part) || !check::contains(msg_, "cannot load '"))        \
      check::fail(__FILE__, __LINE__, std::string("expected \"") + (part) + "\", got: " + msg_); \
  } while (0)

}  // namespace

TEST(safetensors_round_trip) {
  TempDir tmp;
  Rng rng(1);
  const Tensor a = random_tensor(DType::Float32, {2, 3}, rng);
  const Tensor b = random_tensor(DType::Float64, {4}, rng);
  Tensor c(DType::Int64, {});
  c.data_as<int64_t>()[0] = -7;
  const Tensor empty(DType::Float32, {0, 3});
  TensorView at = a.view();  // a transposed view is written as its contiguous copy
  std::swap(at.shape[0], at.shape[1]);
  std::swap(at.strides[0], at.strides[1]);
  const std::string path = tmp.path("t.safetensors");
  save_safetensors(path, {{"a", a.view()}, {"b", b.view()}, {"c", c.view()}, {"e", empty.view()},
                          {"at", at}},
                   {{"k", "v \"quoted\" \xc3\xa9"}});
  const SafetensorsFile f = SafetensorsFile::open(path);
  CHECK_EQ(f.entries().size(), 5u);
  CHECK_EQ(f.entries()[0].name, std::string("a"));  // the caller's order
  CHECK_EQ(f.metadata().at("k"), std::string("v \"quoted\" \xc3\xa9"));
  CHECK(testutil::bit_equal(f.read("a"), a));
  CHECK(testutil::bit_equal(f.read("b"), b));
  CHECK(testutil::bit_equal(f.read("c"), c));
  CHECK(f.read("e").shape() == std::vector<int64_t>({0, 3}));
  CHECK(testutil::bit_equal(f.read("at"), Tensor::from_view(at)));
  // 8-byte dtypes first: every tensor aligned to its item size
  for (const auto& e : f.entries()) CHECK_EQ(e.begin % safetensors_dtype_size(e.dtype), 0u);
  CHECK_THROWS(ValueError, f.read("nope"), "no tensor 'nope' in the file");
  CHECK_THROWS(ValueError, save_safetensors(path, {{"a", a.view()}, {"a", b.view()}}),
               "two tensors are named 'a'");
  CHECK_THROWS(ValueError, save_safetensors(path, {{"__metadata__", a.view()}}), "reserved");
  CHECK_THROWS(ValueError, save_safetensors(path, {{"\xff", a.view()}}), "valid UTF-8");
}

TEST(safetensors_reads_other_dtypes) {
  TempDir tmp;
  // F16 1.0, -2.0, 65504 (max), 2^-24 (smallest subnormal); BF16 1.5; I32 -5; U8 200; BOOL 1, 0
  std::string data;
  for (uint16_t h : {0x3C00, 0xC000, 0x7BFF, 0x0001}) data.append(reinterpret_cast<const char*>(&h), 2);
  const uint16_t bf = 0x3FC0;
  data.append(reinterpret_cast<const char*>(&bf), 2);
  const int32_t i32 = -5;
  data.append(reinterpret_cast<const char*>(&i32), 4);
  data += static_cast<char>(200);
  data += '\x01';
  data += '\x00';
  const std::string header =
      R"({"h": {"dtype": "F16", "shape": [4], "data_offsets": [0, 8]}, )"
      R"("bf": {"dtype": "BF16", "shape": [], "data_offsets": [8, 10]}, )"
      R"("i": {"dtype": "I32", "shape": [1], "data_offsets": [10, 14]}, )"
      R"("u": {"dtype": "U8", "shape": [1], "data_offsets": [14, 15]}, )"
      R"("b": {"dtype": "BOOL", "shape": [2], "data_offsets": [15, 17]}})";
  testutil::write_bytes(tmp.path("d"), raw_safetensors(header, data));
  const SafetensorsFile f = SafetensorsFile::open(tmp.path("d"));
  const Tensor h = f.read("h");
  CHECK(h.dtype() == DType::Float32);
  CHECK_EQ(h.data_as<float>()[0], 1.0f);
  CHECK_EQ(h.data_as<float>()[1], -2.0f);
  CHECK_EQ(h.data_as<float>()[2], 65504.0f);
  CHECK_EQ(h.data_as<float>()[3], 5.9604644775390625e-08f);
  CHECK_EQ(f.read("bf").data_as<float>()[0], 1.5f);
  CHECK_EQ(f.read("i").data_as<int64_t>()[0], -5);
  CHECK_EQ(f.read("u").data_as<int64_t>()[0], 200);
  CHECK_EQ(f.read("b").data_as<int64_t>()[1], 0);
}

TEST(safetensors_rejects_malformed_files) {
  TempDir tmp;
  const std::string p = tmp.path("bad.safetensors");
  auto expect = [&](const std::string& bytes, const std::string& part) {
    testutil::write_bytes(p, bytes);
    CHECK_THROWS(ValueError, SafetensorsFile::open(p), part);
    CHECK_THROWS(ValueError, SafetensorsFile::open(p), "cannot load '" + p + "': ");
  };
  const std::string t8 = R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}})";
  const std::string d8(8, '\0');
  expect("", "truncated file: 0 bytes, fewer than the 8-byte header length");
  expect("abc", "truncated file: 3 bytes");
  expect(raw_safetensors("{}", "", 100000001), "bad header length 100000001 (more than the 100000000-byte limit");
  expect(raw_safetensors(t8, d8, 500), "bad header length 500: only " + std::to_string(t8.size() + 8) +
                                           " bytes follow it (truncated file?)");
  expect(raw_safetensors("{", ""), "too short for a JSON object");
  expect(raw_safetensors("[1, 2]  ", ""), "the header is not a JSON object");
  expect(raw_safetensors("{\"a\": }", ""), "the header is not valid JSON (expected a value");
  expect(raw_safetensors("{\"a\": 1, \"a\": 2}", ""), "duplicate key");
  expect(raw_safetensors("{\"\xff\": 1}", ""),
         "the header is not valid UTF-8 ('utf-8' codec can't decode byte 0xff in position 2: invalid start byte)");
  expect(raw_safetensors("{}  \xf0\x9f", ""),
         "the header is not valid UTF-8 ('utf-8' codec can't decode bytes in position 4-5: unexpected end of data)");
  expect(raw_safetensors(R"({"__metadata__": [1]})", ""), "__metadata__ must be an object of string values");
  expect(raw_safetensors(R"({"__metadata__": {"x": 1}})", ""), "__metadata__['x'] is not a string");
  expect(raw_safetensors(R"({"a": 3})", ""), "tensor 'a': its header entry is not an object");
  expect(raw_safetensors(R"({"a": {"dtype": "F32"}})", ""), "tensor 'a': the header entry lacks ['shape', 'data_offsets']");
  expect(raw_safetensors(R"({"a": {"dtype": "F8", "shape": [], "data_offsets": [0, 1]}})", "x"),
         "tensor 'a': unknown dtype 'F8' (known: F64, F32, F16, BF16, I64, I32, I16, I8, U64, U32, U16, U8, BOOL)");
  expect(raw_safetensors(R"({"a": {"dtype": 4, "shape": [], "data_offsets": [0, 1]}})", "x"), "unknown dtype 4");
  expect(raw_safetensors(R"({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}})", ""),
         "shape must be a list of non-negative ints, got [-1]");
  expect(raw_safetensors(R"({"a": {"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}})", d8),
         "shape must be a list of non-negative ints");
  std::string many = "[";
  for (int i = 0; i < 33; ++i) many += i ? ", 1" : "1";
  expect(raw_safetensors(R"({"a": {"dtype": "F32", "shape": )" + many + R"(], "data_offsets": [0, 4]}})",
                         std::string(4, '\0')),
         "tensor 'a': 33 dimensions (at most 32)");
  expect(raw_safetensors(R"({"a": {"dtype": "F32", "shape": [4611686018427387904], "data_offsets": [0, 0]}})", ""),
         "has an impossibly large dimension");
  expect(raw_safetensors(R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0]}})", d8),
         "data_offsets must be [begin, end] ints, got [0]");
  expect(raw_safetensors(R"({"a": {"dtype": "F32", "shape": [1], "data_offsets": [8, 4]}})", d8),
         "tensor 'a': bad data_offsets [8, 4]");
  expect(raw_safetensors(R"({"a": {"dtype": "F32", "shape": [1], "data_offsets": [-4, 0]}})", d8),
         "bad data_offsets [-4, 0]");
  expect(raw_safetensors(R"({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}})", d8),
         "tensor 'a': data_offsets [0, 16] run past the end of the data (8 bytes; truncated file?)");
  expect(raw_safetensors(R"({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}})", d8),
         "tensor 'a': shape [4] of F32 needs 16 bytes but data_offsets [0, 8] hold 8");
  expect(raw_safetensors(
             R"({"a": {"dtype": "F64", "shape": [4611686018427387903, 4611686018427387903], "data_offsets": [0, 8]}})", d8),
         "needs more bytes than fit in 64 bits");
  expect(raw_safetensors(
             R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}})",
             std::string(12, '\0')),
         "tensor 'b': data_offsets [4, 12] overlap another tensor's bytes");
  expect(raw_safetensors(
             R"({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}})",
             std::string(12, '\0')),
         "bytes 4..8 of the data belong to no tensor");
  expect(raw_safetensors(R"({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}})", d8),
         "4 bytes after the last tensor belong to no tensor");
  // a tensor with more dimensions than convcore's tensors: listed, but not readable
  testutil::write_bytes(p, raw_safetensors(R"({"a": {"dtype": "F32", "shape": [1,1,1,1,1,1,1,1,1], "data_offsets": [0, 4]}})",
                                           std::string(4, '\0')));
  CHECK_THROWS(ValueError, SafetensorsFile::open(p).read("a"), "9 dimensions; convcore tensors have at most 8");
  // not a file at all
  CHECK_THROWS(Error, SafetensorsFile::open(tmp.path("missing")), "no such file");
  CHECK_THROWS(Error, SafetensorsFile::open(tmp.path("")), "not a regular file");
}

// max |a - b| / max(1, max |b|)
double rel_diff(const Tensor& a, const Tensor& b) {
  const Tensor a64 = a.to(DType::Float64), b64 = b.to(DType::Float64);
  double d = 0, scale = 1;
  for (int64_t i = 0; i < a64.numel(); ++i) {
    d = std::max(d, std::abs(a64.data_as<double>()[i] - b64.data_as<double>()[i]));
    scale = std::max(scale, std::abs(b64.data_as<double>()[i]));
  }
  return d / scale;
}

TEST(net_runs_a_small_network) {
  TempDir tmp;
  for (DType dt : {DType::Float32, DType::Float64}) {
    const Params p = tiny_params(dt);
    const std::string path = tmp.path("tiny.safetensors"), old = tmp.path("old.safetensors");
    write_tiny(path, p);
    write_tiny_format1(old, p);
    const Net net = Net::load(path);
    CHECK(net.dtype() == dt);
    CHECK_EQ(net.name(), std::string("tiny"));
    CHECK(net.input_shape() == std::vector<int64_t>({1, 6, 6}));
    CHECK(net.output_shape() == std::vector<int64_t>({3}));
    CHECK_EQ(net.num_parameters(), 18 + 2 + 24 + 3);
    CHECK(check::contains(net.summary(), "features.0"));
    CHECK(check::contains(net.summary(), "(2, 2, 2)"));
    CHECK(check::contains(net.plan(5), "features.0 + ReLU"));  // the ReLU fused
    CHECK(net.arena_bytes(5) > 0);
    Rng rng(3);
    const Tensor x = random_tensor(dt, {5, 1, 6, 6}, rng);
    const Tensor expected = tiny_by_hand(p, x);
    const Tensor y = net.forward(x);
    CHECK(rel_diff(y, expected) < (dt == DType::Float32 ? 1e-6 : 1e-14));
    // the engine's plain, unfused steps are the core's ops: bit for bit
    NetOptions plain;
    plain.blocked = false, plain.fuse = false;
    CHECK(testutil::bit_equal(Net::load(path, plain).forward(x), expected));
    // format 1: the same net, the same outputs
    const Net net1 = Net::load(old);
    CHECK_EQ(net1.name(), std::string("tiny"));
    CHECK(testutil::bit_equal(net1.forward(x), y));
    // the same results whatever the threads, and again from the arena reused
    Net one = Net::load(path);
    one.set_num_threads(1);
    CHECK_EQ(one.num_threads(), 1);
    CHECK(testutil::bit_equal(one.forward(x), y));
    CHECK(testutil::bit_equal(net.forward(x), y));
    // a strided input (a batch of every other image)
    const Tensor x2 = random_tensor(dt, {10, 1, 6, 6}, rng);
    TensorView every_other = x2.view();
    every_other.shape[0] = 5;
    every_other.strides[0] *= 2;
    CHECK(testutil::bit_equal(net.forward(every_other), net.forward(Tensor::from_view(every_other))));
    // an empty batch
    CHECK(net.forward(Tensor(dt, {0, 1, 6, 6})).shape() == std::vector<int64_t>({0, 3}));
    // a profile names every step
    const auto steps = net.profile(x.view(), 2);
    CHECK(!steps.empty() && steps[0].label == "features.0 + ReLU");
    // errors name the layer
    const DType other = dt == DType::Float32 ? DType::Float64 : DType::Float32;
    CHECK_THROWS(TypeError, net.forward(Tensor(other, {1, 1, 6, 6})), "but the net 'tiny' is");
    CHECK_THROWS(ValueError, net.forward(Tensor(dt, {1, 6, 6})),
                 "input must be a batch of shape (N, 1, 6, 6), got (1, 6, 6)");
    CHECK_THROWS(ValueError, net.forward(Tensor(dt, {2, 1, 9, 9})),
                 "layer 'classifier.0' (Linear): Linear expects 8 input features, got an input of shape (18,)");
    CHECK_THROWS(ValueError, net.forward(Tensor(dt, {2, 1, 2, 2})), "layer 'features.0' (Conv2d): weight: kernel size");
    CHECK_THROWS(ValueError, net.output_shape({1, 9, 9}), "Linear expects 8 input features");
    CHECK_THROWS(ValueError, net.profile(x.view(), 0), "runs must be positive");
  }
  // float64 weights with one float32 tensor: a float32 net (as Python's load)
  const Params p = tiny_params(DType::Float64);
  const Tensor b1 = p.b1.to(DType::Float32);
  const std::string path = tmp.path("mixed.safetensors");
  write_net(path, tiny_graph(),
            {{"features.0.weight", p.w1.view()}, {"features.0.bias", b1.view()},
             {"classifier.0.weight", p.w2.view()}, {"classifier.0.bias", p.b2.view()}});
  CHECK(Net::load(path).dtype() == DType::Float32);
  // a graph in memory, with its tensors: Net::from_graph (convcore.compile's way)
  const Params q = tiny_params();
  std::map<std::string, TensorView> tensors;
  for (const auto& t : tiny_tensors(q)) tensors[t.first] = t.second;
  Rng rng(5);
  const Tensor x = random_tensor(DType::Float32, {3, 1, 6, 6}, rng);
  CHECK(rel_diff(Net::from_graph(tiny_graph(), tensors).forward(x), tiny_by_hand(q, x)) < 1e-6);
  tensors.erase("classifier.0.bias");
  CHECK_THROWS(ValueError, Net::from_graph(tiny_graph(), tensors),
               "the tensors do not match the graph: missing ['classifier.0.bias']");
}

// Softmax, a plain step: over the tiny net's logits (N, 3), and over the
// channels of a convolution's output (blocked in the fast engine, so
// reordered to NCHW first); a dim that is the batch is refused at load.
TEST(net_runs_softmax) {
  TempDir tmp;
  const std::string path = tmp.path("softmax.safetensors");
  for (DType dt : {DType::Float32, DType::Float64}) {
    const double tol = dt == DType::Float32 ? 1e-6 : 1e-14;
    const Params p = tiny_params(dt);
    Rng rng(7);
    const Tensor x = random_tensor(dt, {4, 1, 6, 6}, rng);
    NetOptions plain;
    plain.blocked = false, plain.fuse = false;

    std::vector<std::string> nodes = tiny_nodes();
    nodes.push_back(node("Softmax", "prob", R"({"dim": -1})", "\"classifier.0\"", "prob"));
    write_net(path, graph_json(nodes, "[1, 6, 6]", "prob"), tiny_tensors(p));
    const Tensor logits = tiny_by_hand(p, x);
    Tensor probs = Tensor::empty(dt, {4, 3});
    softmax_forward(logits.view(), 1, probs.view());
    CHECK(rel_diff(Net::load(path).forward(x), probs) < tol);
    CHECK(testutil::bit_equal(Net::load(path, plain).forward(x), probs));
    CHECK(check::contains(Net::load(path).summary(), "dim=-1"));

    write_net(path, graph_json({kConv, node("Softmax", "", R"({"dim": 1})", "\"features.0\"", "s")},
                               "[1, 6, 6]", "s"),
              {{"features.0.weight", p.w1.view()}, {"features.0.bias", p.b1.view()}});
    Tensor conv = Tensor::empty(dt, {4, 2, 4, 4});
    const TensorView b1 = p.b1.view();
    conv2d_forward(x.view(), p.w1.view(), &b1, Conv2dParams(), conv.view());
    Tensor expected = Tensor::empty(dt, {4, 2, 4, 4});
    softmax_forward(conv.view(), 1, expected.view());
    CHECK(rel_diff(Net::load(path).forward(x), expected) < tol);
    CHECK(testutil::bit_equal(Net::load(path, plain).forward(x), expected));
  }
  auto with_dim = [&](const std::string& dim) {
    write_net(path, graph_json({node("Softmax", "", R"({"dim": )" + dim + "}", "\"x\"", "s")},
                               "[1, 6, 6]", "s"), {});
    return path;
  };
  CHECK_LOAD_FAILS(with_dim("0"), "Softmax: dim 0 is the batch dimension");
  CHECK_LOAD_FAILS(with_dim("-4"), "Softmax: dim -4 is the batch dimension");
  CHECK_LOAD_FAILS(with_dim("4"), "Softmax: dim must be in [-4, 3]");
  CHECK_LOAD_FAILS(with_dim("1.5"), "dim must be an int");
  write_net(path, graph_json({node("Softmax", "", "{}", "\"x\"", "s")}, "[1, 6, 6]", "s"), {});
  CHECK_LOAD_FAILS(path, "missing 'dim'");
}

// A net read from a file gives up the weights it packed, and reads them
// again to compile another image size: every size right, in any order.
TEST(net_reads_its_weights_again_for_another_image_size) {
  TempDir tmp;
  const Params p = tiny_params();
  const std::string path = tmp.path("conv.safetensors");
  write_net(path, graph_json({kConv, node("ReLU", "features.1", "{}", "\"features.0\"", "features.1")},
                             "[1, 6, 6]", "features.1"),
            {{"features.0.weight", p.w1.view()}, {"features.0.bias", p.b1.view()}});
  const Net net = Net::load(path);
  auto by_hand = [&](const Tensor& x) {
    Tensor y = Tensor::empty(x.dtype(), {x.size(0), 2, x.size(2) - 2, x.size(3) - 2});
    const TensorView b = p.b1.view();
    conv2d_forward(x.view(), p.w1.view(), &b, Conv2dParams(), y.view());
    relu_forward(y.view(), y.view());
    return y;
  };
  Rng rng(9);
  for (int64_t side : {6, 11, 6, 20, 11}) {
    const Tensor x = random_tensor(DType::Float32, {2, 1, side, side}, rng);
    CHECK(rel_diff(net.forward(x), by_hand(x)) < 1e-6);
  }
}

TEST(net_rejects_inconsistent_files) {
  TempDir tmp;
  const Params p = tiny_params();
  const std::string path = tmp.path("bad.safetensors");
  auto with_graph = [&](const std::string& graph) {
    write_tiny(path, p, graph);
    return path;
  };
  auto with_arch = [&](const std::string& arch) {
    write_tiny_format1(path, p, arch);
    return path;
  };
  const std::string relu = node("ReLU", "", "", "\"x\"", "r");
  // metadata and the graph's JSON
  save_safetensors(path, {{"x", p.b1.view()}});
  CHECK_LOAD_FAILS(path, "no convcore graph or architecture in the metadata");
  CHECK_LOAD_FAILS(with_graph("{\"version\": "), "the graph in the metadata is not valid JSON");
  CHECK_LOAD_FAILS(with_graph("[1]"), "bad graph: the graph is not a JSON object");
  CHECK_LOAD_FAILS(with_graph(R"({"version": 3, "inputs": ["x"], "outputs": ["x"], "nodes": []})"),
                   "graph format version 3 is not one this convcore reads");
  CHECK_LOAD_FAILS(with_graph(R"({"version": 2, "inputs": ["x"], "outputs": ["x"], "nodes": [], "extra": 1})"),
                   "the graph has an unknown key 'extra'");
  CHECK_LOAD_FAILS(with_graph(R"({"version": 2, "inputs": ["x", "y"], "outputs": ["x"], "nodes": []})"),
                   "the graph must have exactly one input");
  CHECK_LOAD_FAILS(with_graph(graph_json({relu}, "[1, 6, 6]", "nope")), "the graph's output 'nope' is not a value");
  CHECK_LOAD_FAILS(with_graph(graph_json({relu}, "[1, -6, 6]", "r")), "input_shape must be null or a list");
  // nodes
  CHECK_LOAD_FAILS(with_graph(graph_json({node("Softmax2d", "", "", "\"x\"", "s")}, "[1, 6, 6]", "s")),
                   "graph node 0: unknown op 'Softmax2d' (known: Conv2d, Linear, ");
  CHECK_LOAD_FAILS(with_graph(graph_json({node("ReLU", "", "", "\"y\"", "r")}, "[1, 6, 6]", "r")),
                   "takes 'y', which no earlier node defines");
  CHECK_LOAD_FAILS(with_graph(graph_json({relu, node("ReLU", "", "", "\"r\"", "r")}, "[1, 6, 6]", "r")),
                   "the value 'r' is defined twice");
  CHECK_LOAD_FAILS(with_graph(graph_json({node("add", "", "", "\"x\"", "a")}, "[1, 6, 6]", "a")),
                   "graph node 0 (add) takes two or more inputs, got 1");
  CHECK_LOAD_FAILS(with_graph(graph_json({node("Conv2d", "", R"({"in_channels": 1, "out_channels": 2, "kernel_size": 3})",
                                               "\"x\"", "c")}, "[1, 6, 6]", "c")),
                   "graph node 0 (Conv2d) has no 'name'");
  CHECK_LOAD_FAILS(with_graph(graph_json({relu, node("ReLU", "", R"({"colour": 1})", "\"r\"", "s")}, "[1, 6, 6]", "s")),
                   "graph node 1 (ReLU): unknown attribute 'colour' (known: inplace)");
  auto conv_with = [&](const std::string& attrs) {
    return with_graph(graph_json({node("Conv2d", "features.0", attrs, "\"x\"", "features.0"),
                                  node("Flatten", "", "", "\"features.0\"", "f"),
                                  node("Linear", "classifier.0", R"({"in_features": 8, "out_features": 3})",
                                       "\"f\"", "classifier.0")}, "null"));
  };
  CHECK_LOAD_FAILS(conv_with(R"({"out_channels": 2, "kernel_size": 3})"),
                   "bad graph: layer 'features.0' (Conv2d): missing 'in_channels'");
  CHECK_LOAD_FAILS(conv_with(R"({"in_channels": 1, "out_channels": 2, "kernel_size": "3"})"),
                   "kernel_size must be an int or a pair (h, w) of ints, got \"3\"");
  CHECK_LOAD_FAILS(conv_with(R"({"in_channels": 0, "out_channels": 2, "kernel_size": 3})"),
                   "in_channels must be a positive int, got 0");
  CHECK_LOAD_FAILS(conv_with(R"({"in_channels": 1, "out_channels": 2, "kernel_size": 3, "groups": 2})"),
                   "groups=2 must divide in_channels=1 and out_channels=2");
  CHECK_LOAD_FAILS(conv_with(R"({"in_channels": 1, "out_channels": 2, "kernel_size": 3, "padding_mode": "mirror"})"),
                   "padding_mode must be one of ['circular', 'reflect', 'replicate', 'zeros'], got 'mirror'");
  CHECK_LOAD_FAILS(conv_with(R"({"in_channels": 1, "out_channels": 2, "kernel_size": 3, "stride": 2, "padding": "same"})"),
                   "padding='same' is not supported for strided convolutions");
  CHECK_LOAD_FAILS(conv_with(R"({"in_channels": 1, "out_channels": 2, "kernel_size": 3, "bias": 1})"),
                   "bias must be true or false, got 1");
  CHECK_LOAD_FAILS(conv_with(R"({"in_channels": 1, "out_channels": 2, "kernel_size": 3, "stride": 0})"),
                   "stride must be positive");
  // the graph on its declared input shape
  CHECK_LOAD_FAILS(with_graph(graph_json({kConv, node("Flatten", "", "", "\"features.0\"", "f"),
                                          node("Linear", "classifier.0", R"({"in_features": 8, "out_features": 3})",
                                               "\"f\"", "classifier.0")})),
                   "the graph does not work on its input shape (1, 6, 6): layer 'classifier.0' (Linear): "
                   "Linear expects 8 input features, got an input of shape (32,)");
  CHECK_LOAD_FAILS(with_graph(graph_json({kConv, node("Flatten", "", "", "\"features.0\"", "f"),
                                          node("Linear", "classifier.0", R"({"in_features": 8, "out_features": 3})",
                                               "\"f\"", "classifier.0")}, "[1, 2, 2]")),
                   "layer 'features.0' (Conv2d): weight: kernel size (3, 3)");
  // declared sizes that overflow: channels concatenated, an input padded (found by the loader's fuzzer)
  save_safetensors(path, {}, {{"convcore_graph",
                               graph_json({node("concat", "", "", "\"x\", \"x\"", "c")},
                                          "[4611686018427387904, 2, 2]", "c")}});
  CHECK_LOAD_FAILS(path, "the concatenated channels do not fit in 64 bits");
  CHECK_LOAD_FAILS(with_graph(graph_json(
                       {node("Conv2d", "features.0", R"({"in_channels": 1, "out_channels": 2, "kernel_size": 3, "padding": 2, "padding_mode": "reflect"})",
                             "\"x\"", "features.0"),
                        node("Flatten", "", "", "\"features.0\"", "f"),
                        node("Linear", "classifier.0", R"({"in_features": 8, "out_features": 3})", "\"f\"",
                             "classifier.0")},
                       "[1, 9223372036854775807, 6]")),
                   "the input's height and width plus the padding must fit in 64 bits, "
                   "got (9223372036854775807, 6)");
  // tensors that do not match
  write_net(path, tiny_graph(), {{"features.0.weight", p.w1.view()}, {"classifier.0.weight", p.w2.view()},
                                 {"classifier.0.bias", p.b2.view()}, {"extra", p.b2.view()}});
  CHECK_LOAD_FAILS(path, "the tensors do not match the graph: missing ['features.0.bias']; unexpected ['extra']");
  const Tensor w_wrong = Tensor(DType::Float32, {2, 1, 3, 4});
  write_net(path, tiny_graph(), {{"features.0.weight", w_wrong.view()}, {"features.0.bias", p.b1.view()},
                                 {"classifier.0.weight", p.w2.view()}, {"classifier.0.bias", p.b2.view()}});
  CHECK_LOAD_FAILS(path, "tensor 'features.0.weight' has shape [2, 1, 3, 4] but the graph needs [2, 1, 3, 3]");
  const Tensor w_int = Tensor(DType::Int64, {2, 1, 3, 3});
  write_net(path, tiny_graph(), {{"features.0.weight", w_int.view()}, {"features.0.bias", p.b1.view()},
                                 {"classifier.0.weight", p.w2.view()}, {"classifier.0.bias", p.b2.view()}});
  CHECK_LOAD_FAILS(path, "tensor 'features.0.weight' has dtype int64, the model needs float32");
  // format 1: the module tree, lowered to a graph (legacy_format.cpp)
  CHECK_LOAD_FAILS(with_arch("{\"type\": "), "the architecture in the metadata is not valid JSON");
  CHECK_LOAD_FAILS(with_arch("[1]"), "bad architecture node (needs a dict with a string 'type'): [1]");
  CHECK_LOAD_FAILS(with_arch(R"({"type": "ReLU", "config": [1]})"), "architecture node 'ReLU': 'config' is not an object");
  CHECK_LOAD_FAILS(with_arch(R"({"type": "Sequential", "children": [1]})"), "'children' is not an object");
  std::string deep = R"({"type": "ReLU"})";
  for (int i = 0; i < 70; ++i) deep = R"({"type": "Sequential", "children": {"0": )" + deep + "}}";
  CHECK_LOAD_FAILS(with_arch(deep), "the architecture is nested more than 64 levels deep");
  CHECK_LOAD_FAILS(with_arch(sequential({R"({"type": "Softmax2d", "config": {}})"})),
                   "unknown module type 'Softmax2d' at '0' in the architecture (known: ");
  CHECK_LOAD_FAILS(with_arch(sequential({R"({"type": "Conv2d", "config": {"out_channels": 2, "kernel_size": 3}})"})),
                   "cannot rebuild the architecture: layer '0' (Conv2d): missing 'in_channels'");
  CHECK_LOAD_FAILS(with_arch(sequential({R"({"type": "Linear", "config": {"in_features": 8, "out_features": 3}, "children": {"x": {"type": "ReLU"}}})"})),
                   "Linear at '0': the architecture lists children ['x'] but a Linear has none");
  CHECK_LOAD_FAILS(with_arch(sequential({R"({"type": "BasicBlock", "config": {"inplanes": 4, "planes": 8}, "children": {"conv1": {"type": "Conv2d"}}})"})),
                   "BasicBlock at '0': the architecture lists children ['conv1'] but a BasicBlock has "
                   "['conv1', 'bn1', 'conv2', 'bn2']");
  CHECK_LOAD_FAILS(with_arch(R"({"type": "Network", "config": {"input_shape": [1, 6, 6]}, "children": {"features": {"type": "Sequential"}}})"),
                   "Network at the root: the architecture lists children ['features'] but a Network has ['features', 'classifier']");
  save_safetensors(path, {}, {{"convcore_architecture",
                               R"j({"type": "Graph", "config": {"nodes": ["y = concat(x, x)"], )j"
                               R"j("input_shape": [4611686018427387904, 2, 2]}, "children": {}})j"}});
  CHECK_LOAD_FAILS(path, "the concatenated channels do not fit in 64 bits");
  CHECK_LOAD_FAILS(with_arch(R"j({"type": "Graph", "config": {"nodes": ["y = b1(z)"]}, "children": {}})j"),
                   "graph node 'y' takes 'z', which no earlier node defines");
  // a malformed file is reported by the loader in the same words as by the reader
  testutil::write_bytes(path, std::string("\x10\0\0\0\0\0\0\0{}", 10));
  CHECK_LOAD_FAILS(path, "bad header length 16: only 2 bytes follow it (truncated file?)");
}

TEST(net_reports_out_of_memory_as_an_error) {
  TempDir tmp;
  const std::string path = tmp.path("huge.safetensors");
  // a graph without an input shape, so the size shows at run time
  save_safetensors(path, {}, {{"convcore_graph",
                               graph_json({node("AdaptiveAvgPool2d", "0", R"({"output_size": [1000000000, 1000000000]})",
                                                "\"x\"", "0")}, "null", "0")}});
  const Net net = Net::load(path);
  CHECK(net.input_shape().empty());
  CHECK_THROWS(ValueError, net.output_shape(), "gives no input shape");
  CHECK(net.output_shape({1, 2, 2}) == std::vector<int64_t>({1, 1000000000, 1000000000}));
  CHECK_THROWS(MemoryError, net.forward(Tensor(DType::Float32, {1, 1, 2, 2})), "more than this machine's memory");
}

TEST(net_survives_every_truncation_and_random_corruption) {
  TempDir tmp;
  const Params p = tiny_params();
  const std::string good = tmp.path("good.safetensors"), bad = tmp.path("bad.safetensors");
  write_tiny(good, p);
  const std::vector<unsigned char> bytes = testutil::read_bytes(good);
  Rng rng(11);
  const Tensor x = random_tensor(DType::Float32, {2, 1, 6, 6}, rng);
  // every strict prefix is refused with a ValueError
  int refused = 0;
  for (std::size_t n = 0; n < bytes.size(); ++n) {
    testutil::write_bytes(bad, std::vector<unsigned char>(bytes.begin(), bytes.begin() + long(n)));
    refused += check::contains(load_error(bad), "cannot load '");
  }
  CHECK_EQ(refused, static_cast<int>(bytes.size()));
  // random corruptions: an exception of convcore's or a net that runs
  int loaded = 0, errors = 0;
  for (int trial = 0; trial < 3000; ++trial) {
    std::vector<unsigned char> b = bytes;
    const int flips = 1 + int(rng.below(3));
    for (int i = 0; i < flips; ++i) {
      // mostly in the length and the header, where the parsing is
      const std::size_t limit = rng.below(4) ? std::min<std::size_t>(b.size(), 1400) : b.size();
      b[std::size_t(rng.below(int64_t(limit)))] = static_cast<unsigned char>(rng.below(256));
    }
    testutil::write_bytes(bad, b);
    try {
      const Net net = Net::load(bad);
      ++loaded;
      net.forward(x);
    } catch (const Error&) {
      ++errors;
    }
  }
  CHECK(loaded + errors >= 3000);
  CHECK(errors > 100);
  std::printf("  corruptions: %d refused, %d loaded\n", errors, loaded);
}

TEST_MAIN()
