// Classifies handwritten digits with a LeNet-5 trained and saved in Python,
// in plain C++ (no Python at run time).
//
//   python examples/cpp/write_digits.py digits.bin --train-lenet5 lenet5.safetensors
//   ./classify_digits lenet5.safetensors digits.bin [--batch 64] [--threads 2]
//
// The digits file (written by write_digits.py) is little-endian:
//   8 bytes   "CCDIGIT1"
//   4 x u32   N, C, H, W
//   N x i32   labels (-1: unknown)
//   N*C*H*W x f32  pixels, image after image (NCHW)
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iostream>
#include <stdexcept>
#include <string>
#include <vector>

#include "convcore/convcore.h"
#include "convcore/net.h"

namespace {

struct Digits {
  int64_t n = 0, c = 0, h = 0, w = 0;
  std::vector<int32_t> labels;
  convcore::Tensor images;  // (N, C, H, W) float32
};

uint32_t le32(const unsigned char* p) {
  return uint32_t(p[0]) | uint32_t(p[1]) << 8 | uint32_t(p[2]) << 16 | uint32_t(p[3]) << 24;
}

Digits read_digits(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot open " + path);
  std::vector<unsigned char> buf((std::istreambuf_iterator<char>(in)),
                                 std::istreambuf_iterator<char>());
  if (buf.size() < 24 || std::memcmp(buf.data(), "CCDIGIT1", 8) != 0)
    throw std::runtime_error(path + ": not a digits file (no CCDIGIT1 header)");
  Digits d;
  d.n = le32(&buf[8]), d.c = le32(&buf[12]), d.h = le32(&buf[16]), d.w = le32(&buf[20]);
  const uint64_t pixels = uint64_t(d.n) * uint64_t(d.c) * uint64_t(d.h) * uint64_t(d.w);
  const uint64_t expected = 24 + 4 * uint64_t(d.n) + 4 * pixels;
  if (d.c > 65535 || d.h > 65535 || d.w > 65535 || buf.size() != expected)
    throw std::runtime_error(path + ": " + std::to_string(buf.size()) + " bytes, expected " +
                             std::to_string(expected) + " for " + std::to_string(d.n) +
                             " images of " + std::to_string(d.c) + "x" + std::to_string(d.h) +
                             "x" + std::to_string(d.w));
  d.labels.resize(size_t(d.n));
  for (int64_t i = 0; i < d.n; ++i)
    d.labels[size_t(i)] = static_cast<int32_t>(le32(&buf[24 + 4 * size_t(i)]));
  d.images = convcore::Tensor::empty(convcore::DType::Float32, {d.n, d.c, d.h, d.w});
  std::memcpy(d.images.data(), &buf[24 + 4 * size_t(d.n)], size_t(4 * pixels));  // little-endian host
  return d;
}

int argmax(const float* row, int64_t n) {
  return static_cast<int>(std::max_element(row, row + n) - row);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) {
    std::cerr << "usage: classify_digits MODEL.safetensors DIGITS.bin [--batch B] [--threads T]\n";
    return 2;
  }
  int64_t batch = 64;
  for (int i = 3; i + 1 < argc; i += 2) {
    const std::string opt = argv[i];
    if (opt == "--batch") batch = std::max<int64_t>(1, std::stoll(argv[i + 1]));
    else if (opt == "--threads") convcore::set_num_threads(std::stoi(argv[i + 1]));
    else {
      std::cerr << "unknown option " << opt << "\n";
      return 2;
    }
  }
  try {
    const convcore::Net net = convcore::Net::load(argv[1]);
    const Digits digits = read_digits(argv[2]);
    std::cout << "model: " << net.name() << ", " << net.num_parameters() << " parameters, input "
              << convcore::shape_str(net.input_shape()) << "\n";
    std::cout << "digits: " << digits.n << " images of " << digits.c << "x" << digits.h << "x"
              << digits.w << "\n";

    std::vector<int> predictions;
    predictions.reserve(size_t(digits.n));
    const float* all = digits.images.data_as<float>();
    const int64_t per_image = digits.c * digits.h * digits.w;
    // One untimed batch first: page in the weights, start the thread pool.
    if (digits.n > 0) {
      const int64_t shape[4] = {std::min(batch, digits.n), digits.c, digits.h, digits.w};
      net.forward(convcore::contiguous_view(const_cast<float*>(all), convcore::DType::Float32, 4,
                                            shape));
    }
    const auto start = std::chrono::steady_clock::now();
    for (int64_t first = 0; first < digits.n; first += batch) {
      const int64_t count = std::min(batch, digits.n - first);
      const int64_t shape[4] = {count, digits.c, digits.h, digits.w};
      const convcore::TensorView x = convcore::contiguous_view(
          const_cast<float*>(all + first * per_image), convcore::DType::Float32, 4, shape);
      const convcore::Tensor logits = net.forward(x);  // (count, classes)
      const int64_t classes = logits.size(1);
      for (int64_t i = 0; i < count; ++i)
        predictions.push_back(argmax(logits.data_as<float>() + i * classes, classes));
    }
    const double seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();

    std::cout << "predictions:";
    for (int p : predictions) std::cout << " " << p;
    std::cout << "\n";
    int64_t labelled = 0, correct = 0;
    for (int64_t i = 0; i < digits.n; ++i) {
      if (digits.labels[size_t(i)] < 0) continue;
      ++labelled;
      correct += predictions[size_t(i)] == digits.labels[size_t(i)];
    }
    if (labelled) {
      std::printf("accuracy: %lld/%lld = %.2f%%\n", static_cast<long long>(correct),
                  static_cast<long long>(labelled), 100.0 * double(correct) / double(labelled));
    }
    std::printf("time per image: %.4f ms (%lld images, batches of %lld, %d threads)\n",
                digits.n ? 1e3 * seconds / double(digits.n) : 0.0,
                static_cast<long long>(digits.n), static_cast<long long>(batch),
                convcore::get_num_threads());
  } catch (const std::exception& e) {  // convcore::Error and file errors
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
