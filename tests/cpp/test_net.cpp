// The safetensors reader/writer and convcore::Net: round trips, a small net
// against the ops composed by hand, and every error path of the loader
// (malformed, truncated, inconsistent files), including every truncation
// and thousands of random corruptions of a valid file: always an exception,
// never a crash or an out-of-bounds read (run under ASan to see the latter).
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

// The builder's layer dicts of a tiny network (as convcore.build writes them):
// 1x6x6 -> conv3 -> 2x4x4 -> relu -> pool2 -> 2x2x2 -> fc 3.
const char* kLayers =
    R"([{"type": "conv", "out_channels": 2, "kernel_size": [3, 3], "padding": 0}, {"type": "relu"}, )"
    R"({"type": "maxpool", "kernel_size": 2}, {"type": "fc", "out_features": 3}])";

// A builder Network node: built from its config (layers, input_shape), as
// Python's convcore.load builds it; the listed children are names only.
std::string network(const std::string& layers = kLayers, const std::string& input_shape = "[1, 6, 6]",
                    const std::string& children = R"({"features": {"type": "Sequential"}, "classifier": {"type": "Sequential"}})") {
  return R"({"type": "Network", "config": {"layers": )" + layers + R"(, "input_shape": )" +
         input_shape + R"(, "on_misfit": "ignore", "name": "tiny"}, "children": )" + children + "}";
}

// A root Sequential of the given module nodes, named "0", "1", ...
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

void write_net(const std::string& path, const std::string& arch,
               std::vector<std::pair<std::string, TensorView>> tensors) {
  save_safetensors(path, tensors, {{"format", "convcore"}, {"convcore_architecture", arch}});
}

void write_tiny(const std::string& path, const Params& p, const std::string& arch = network()) {
  write_net(path, arch,
            {{"features.0.weight", p.w1.view()}, {"features.0.bias", p.b1.view()},
             {"classifier.0.weight", p.w2.view()}, {"classifier.0.bias", p.b2.view()}});
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

TEST(net_runs_a_small_network) {
  TempDir tmp;
  for (DType dt : {DType::Float32, DType::Float64}) {
    const Params p = tiny_params(dt);
    const std::string path = tmp.path("tiny.safetensors");
    write_tiny(path, p);
    const Net net = Net::load(path);
    CHECK(net.dtype() == dt);
    CHECK_EQ(net.name(), std::string("tiny"));
    CHECK(net.input_shape() == std::vector<int64_t>({1, 6, 6}));
    CHECK(net.output_shape() == std::vector<int64_t>({3}));
    CHECK_EQ(net.num_parameters(), 18 + 2 + 24 + 3);
    CHECK(check::contains(net.summary(), "features.0"));
    CHECK(check::contains(net.summary(), "(2, 2, 2)"));
    Rng rng(3);
    const Tensor x = random_tensor(dt, {5, 1, 6, 6}, rng);
    const Tensor y = net.forward(x);
    CHECK(testutil::bit_equal(y, tiny_by_hand(p, x)));
    // an empty batch
    CHECK(net.forward(Tensor(dt, {0, 1, 6, 6})).shape() == std::vector<int64_t>({0, 3}));
    // errors at run time name the layer
    const DType other = dt == DType::Float32 ? DType::Float64 : DType::Float32;
    CHECK_THROWS(TypeError, net.forward(Tensor(other, {1, 1, 6, 6})), "but the net 'tiny' is");
    CHECK_THROWS(ValueError, net.forward(Tensor(dt, {1, 6, 6})),
                 "input must be a batch of shape (N, 1, 6, 6), got (1, 6, 6)");
    CHECK_THROWS(ValueError, net.forward(Tensor(dt, {2, 1, 9, 9})),
                 "layer 'classifier.0' (Linear): Linear expects 8 input features, got an input of shape (2, 18)");
    CHECK_THROWS(ValueError, net.forward(Tensor(dt, {2, 1, 2, 2})), "layer 'features.0' (Conv2d): weight: kernel size");
    CHECK_THROWS(ValueError, net.output_shape({1, 9, 9}), "Linear expects 8 input features");
  }
  // float64 weights with one float32 tensor: a float32 net (as Python's load)
  const Params p = tiny_params(DType::Float64);
  const Tensor b1 = p.b1.to(DType::Float32);
  const std::string path = tmp.path("mixed.safetensors");
  write_net(path, network(),
            {{"features.0.weight", p.w1.view()}, {"features.0.bias", b1.view()},
             {"classifier.0.weight", p.w2.view()}, {"classifier.0.bias", p.b2.view()}});
  CHECK(Net::load(path).dtype() == DType::Float32);
}

TEST(net_rejects_inconsistent_files) {
  TempDir tmp;
  const Params p = tiny_params();
  const std::string path = tmp.path("bad.safetensors");
  auto with_arch = [&](const std::string& arch) {
    write_tiny(path, p, arch);
    return path;
  };
  // metadata and architecture
  save_safetensors(path, {{"x", p.b1.view()}});
  CHECK_LOAD_FAILS(path, "no convcore architecture in the metadata");
  CHECK_LOAD_FAILS(with_arch("{\"type\": "), "the architecture in the metadata is not valid JSON");
  CHECK_LOAD_FAILS(with_arch("[1]"), "bad architecture node (needs a dict with a string 'type'): [1]");
  CHECK_LOAD_FAILS(with_arch(R"({"type": "ReLU", "config": [1]})"), "architecture node 'ReLU': 'config' is not an object");
  CHECK_LOAD_FAILS(with_arch(R"({"type": "Sequential", "children": [1]})"), "'children' is not an object");
  std::string deep = R"({"type": "ReLU"})";
  for (int i = 0; i < 70; ++i) deep = R"({"type": "Sequential", "children": {"0": )" + deep + "}}";
  CHECK_LOAD_FAILS(with_arch(deep), "the architecture is nested more than 64 levels deep");
  // unknown modules and bad configs (a Sequential's children are built from the tree)
  CHECK_LOAD_FAILS(with_arch(sequential({R"({"type": "Softmax2d", "config": {}})"})),
                   "unknown module type 'Softmax2d' at '0' in the architecture (known: ");
  auto conv_with = [](const std::string& config) {
    return sequential({R"({"type": "Conv2d", "config": )" + config + "}"});
  };
  CHECK_LOAD_FAILS(with_arch(conv_with(R"({"out_channels": 2, "kernel_size": 3})")),
                   "cannot rebuild the architecture: bad config for Conv2d at '0': missing 'in_channels'");
  CHECK_LOAD_FAILS(with_arch(conv_with(R"({"in_channels": 1, "out_channels": 2, "kernel_size": 3, "foo": 1})")),
                   "unknown config key 'foo'");
  CHECK_LOAD_FAILS(with_arch(conv_with(R"({"in_channels": 1, "out_channels": 2, "kernel_size": "3"})")),
                   "kernel_size must be an int or a pair (h, w) of ints, got \"3\"");
  CHECK_LOAD_FAILS(with_arch(conv_with(R"({"in_channels": 0, "out_channels": 2, "kernel_size": 3})")),
                   "in_channels must be a positive int, got 0");
  CHECK_LOAD_FAILS(with_arch(conv_with(R"({"in_channels": 1, "out_channels": 2, "kernel_size": 3, "groups": 2})")),
                   "groups=2 must divide in_channels=1 and out_channels=2");
  CHECK_LOAD_FAILS(with_arch(conv_with(R"({"in_channels": 1, "out_channels": 2, "kernel_size": 3, "padding_mode": "mirror"})")),
                   "padding_mode must be one of ['circular', 'reflect', 'replicate', 'zeros'], got 'mirror'");
  CHECK_LOAD_FAILS(with_arch(conv_with(R"({"in_channels": 1, "out_channels": 2, "kernel_size": 3, "stride": 2, "padding": "same"})")),
                   "padding='same' is not supported for strided convolutions");
  CHECK_LOAD_FAILS(with_arch(conv_with(R"({"in_channels": 1, "out_channels": 2, "kernel_size": 3, "bias": 1})")),
                   "bias must be true or false, got 1");
  CHECK_LOAD_FAILS(with_arch(conv_with(R"({"in_channels": 1, "out_channels": 2, "kernel_size": 3, "stride": 0})")),
                   "stride must be positive");
  CHECK_LOAD_FAILS(with_arch(sequential({R"({"type": "Linear", "config": {"in_features": 8, "out_features": 3}, "children": {"x": {"type": "ReLU"}}})"})),
                   "Linear at '0': the architecture lists children ['x'] but the config builds []");
  CHECK_LOAD_FAILS(with_arch(sequential({R"({"type": "BasicBlock", "config": {"inplanes": 4, "planes": 8}, "children": {"conv1": {"type": "Conv2d"}}})"})),
                   "BasicBlock at '0': the architecture lists children ['conv1'] but the config builds "
                   "['conv1', 'bn1', 'conv2', 'bn2', 'downsample']");
  // the builder's Network, from its layer dicts
  CHECK_LOAD_FAILS(with_arch(network(kLayers, "[1, 6, 6]", R"({"features": {"type": "Sequential"}})")),
                   "Network at the root: the architecture lists children ['features'] but the config builds ['features', 'classifier']");
  CHECK_LOAD_FAILS(with_arch(network(kLayers, "[1, 6]")), "input_shape must be (C, H, W) or (features,)");
  // declared sizes that overflow: channels concatenated, an input padded (found by the loader's fuzzer)
  CHECK_LOAD_FAILS(with_arch(R"j({"type": "Graph", "config": {"nodes": ["y = concat(x, x)"], )j"
                             R"j("input_shape": [4611686018427387904, 2, 2]}, "children": {}})j"),
                   "the concatenated channels do not fit in 64 bits");
  CHECK_LOAD_FAILS(with_arch(network(R"([{"type": "conv", "out_channels": 2, "kernel_size": 3, "padding": 2, )"
                                     R"("padding_mode": "reflect"}, {"type": "fc", "out_features": 3}])",
                                     "[1, 9223372036854775807, 6]")),
                   "the input's height and width plus the padding must fit in 64 bits, "
                   "got (9223372036854775807, 6)");
  CHECK_LOAD_FAILS(with_arch(network("[]")), "a network needs at least one layer");
  CHECK_LOAD_FAILS(with_arch(network(R"([{"type": "conv", "out_channels": 2, "kernel_size": 3}, {"type": "swish"}])")),
                   "layer 1 (swish) on input (2, 4, 4): unknown type 'swish' (known: conv, maxpool");
  CHECK_LOAD_FAILS(with_arch(network(R"([{"type": "conv", "out_channels": 2, "kernel_size": 3, "in_channels": 1}])")),
                   "layer 0 (conv) on input (1, 6, 6): bad arguments: in_channels is given by the builder");
  CHECK_LOAD_FAILS(with_arch(network(R"([{"type": "conv", "out_channels": 2, "kernel_size": 3, "colour": 1}])")),
                   "layer 0 (conv) on input (1, 6, 6): bad config for Conv2d at 'features.0': unknown config key 'colour'");
  CHECK_LOAD_FAILS(with_arch(network(R"([{"type": "fc", "out_features": 3}, {"type": "bn"}])")),
                   "layer 1 (bn) on input (3,): needs an image input (C, H, W), got shape (3,)");
  CHECK_LOAD_FAILS(with_arch(network(kLayers, "[1, 2, 2]")),
                   "layer 0 (conv) on input (1, 2, 2): layer 'features.0' (Conv2d): weight: kernel size (3, 3)");
  // tensors that do not match
  write_net(path, network(), {{"features.0.weight", p.w1.view()}, {"classifier.0.weight", p.w2.view()},
                              {"classifier.0.bias", p.b2.view()}, {"extra", p.b2.view()}});
  CHECK_LOAD_FAILS(path, "the tensors do not match the architecture: missing ['features.0.bias']; unexpected ['extra']");
  const Tensor w_wrong = Tensor(DType::Float32, {2, 1, 3, 4});
  write_net(path, network(), {{"features.0.weight", w_wrong.view()}, {"features.0.bias", p.b1.view()},
                              {"classifier.0.weight", p.w2.view()}, {"classifier.0.bias", p.b2.view()}});
  CHECK_LOAD_FAILS(path, "tensor 'features.0.weight' has shape [2, 1, 3, 4] but the architecture needs [2, 1, 3, 3]");
  const Tensor w_int = Tensor(DType::Int64, {2, 1, 3, 3});
  write_net(path, network(), {{"features.0.weight", w_int.view()}, {"features.0.bias", p.b1.view()},
                              {"classifier.0.weight", p.w2.view()}, {"classifier.0.bias", p.b2.view()}});
  CHECK_LOAD_FAILS(path, "tensor 'features.0.weight' has dtype int64, the model needs float32");
  // a malformed file is reported by the loader in the same words as by the reader
  testutil::write_bytes(path, std::string("\x10\0\0\0\0\0\0\0{}", 10));
  CHECK_LOAD_FAILS(path, "bad header length 16: only 2 bytes follow it (truncated file?)");
}

TEST(net_reports_out_of_memory_as_an_error) {
  TempDir tmp;
  const std::string path = tmp.path("huge.safetensors");
  // a root Sequential gives no input shape, so the size shows at run time
  save_safetensors(path, {}, {{"convcore_architecture",
                               R"({"type": "Sequential", "children": {"0": {"type": "AdaptiveAvgPool2d", "config": {"output_size": [1000000000, 1000000000]}}}})"}});
  const Net net = Net::load(path);
  CHECK(net.input_shape().empty());
  CHECK_THROWS(ValueError, net.output_shape(), "gives no input shape");
  CHECK(net.output_shape({1, 2, 2}) == std::vector<int64_t>({1, 1000000000, 1000000000}));
  CHECK_THROWS(Error, net.forward(Tensor(DType::Float32, {1, 1, 2, 2})),
               "layer '0' (AdaptiveAvgPool2d): out of memory");
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
