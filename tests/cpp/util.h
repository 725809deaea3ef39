// Helpers shared by the C++ tests: deterministic random tensors, element
// access by index, comparisons, and temporary files.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "convcore/tensor.h"

namespace testutil {

using convcore::DType;
using convcore::Tensor;
using convcore::TensorView;

// A small deterministic generator (the tests must not depend on the
// standard library's distributions, which differ between implementations).
class Rng {
 public:
  explicit Rng(uint64_t seed) : s_(seed * 6364136223846793005ULL + 1442695040888963407ULL) {}
  uint64_t next() {
    s_ ^= s_ << 13;
    s_ ^= s_ >> 7;
    s_ ^= s_ << 17;
    return s_;
  }
  // uniform in [lo, hi)
  double uniform(double lo = -1.0, double hi = 1.0) {
    return lo + (hi - lo) * static_cast<double>(next() >> 11) * (1.0 / 9007199254740992.0);
  }
  int64_t below(int64_t n) { return static_cast<int64_t>(next() % static_cast<uint64_t>(n)); }

 private:
  uint64_t s_;
};

inline Tensor random_tensor(DType dtype, std::vector<int64_t> shape, Rng& rng, double lo = -1.0,
                            double hi = 1.0) {
  Tensor t = Tensor::empty(dtype, std::move(shape));
  for (int64_t i = 0; i < t.numel(); ++i) {
    const double v = rng.uniform(lo, hi);
    if (dtype == DType::Float32)
      t.data_as<float>()[i] = static_cast<float>(v);
    else
      t.data_as<double>()[i] = v;
  }
  return t;
}

// Element i (flat, C order) of a contiguous float tensor, as double.
inline double at(const Tensor& t, int64_t i) {
  return t.dtype() == DType::Float32 ? double(t.data_as<float>()[i]) : t.data_as<double>()[i];
}

inline void set(Tensor& t, int64_t i, double v) {
  if (t.dtype() == DType::Float32)
    t.data_as<float>()[i] = static_cast<float>(v);
  else
    t.data_as<double>()[i] = v;
}

// max |a - b| / max(1, max |b|): 0 for identical tensors; inf for a shape mismatch.
inline double rel_error(const Tensor& a, const Tensor& b) {
  if (a.shape() != b.shape()) return INFINITY;
  double err = 0, scale = 1;
  for (int64_t i = 0; i < a.numel(); ++i) {
    const double x = at(a, i), y = at(b, i);
    if (std::isnan(x) != std::isnan(y)) return INFINITY;
    if (!std::isnan(x)) err = std::max(err, std::fabs(x - y));
    scale = std::max(scale, std::fabs(y));
  }
  return err / scale;
}

inline bool bit_equal(const Tensor& a, const Tensor& b) {
  return a.shape() == b.shape() && a.dtype() == b.dtype() &&
         std::equal(static_cast<const unsigned char*>(a.data()),
                    static_cast<const unsigned char*>(a.data()) + a.nbytes(),
                    static_cast<const unsigned char*>(b.data()));
}

inline double dot(const Tensor& a, const Tensor& b) {
  double s = 0;
  for (int64_t i = 0; i < a.numel(); ++i) s += at(a, i) * at(b, i);
  return s;
}

// A fresh path in the system's temporary directory (removed at exit).
class TempDir {
 public:
  TempDir() {
    std::random_device rd;
    Rng rng((static_cast<uint64_t>(rd()) << 32) ^ rd());
    dir_ = std::filesystem::temp_directory_path() /
           ("convcore_test_" + std::to_string(rng.next() % 1000000000ULL));
    std::filesystem::create_directories(dir_);
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }
  std::string path(const std::string& name) const { return (dir_ / name).string(); }

 private:
  std::filesystem::path dir_;
};

inline std::vector<unsigned char> read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::vector<unsigned char>((std::istreambuf_iterator<char>(in)),
                                    std::istreambuf_iterator<char>());
}

inline void write_bytes(const std::string& path, const std::vector<unsigned char>& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
}

inline void write_bytes(const std::string& path, const std::string& bytes) {
  write_bytes(path, std::vector<unsigned char>(bytes.begin(), bytes.end()));
}

// A safetensors file from a header text and data bytes (no checks: for
// writing malformed files).
inline std::string raw_safetensors(const std::string& header, const std::string& data,
                                   int64_t header_len = -1) {
  const uint64_t n = header_len < 0 ? header.size() : static_cast<uint64_t>(header_len);
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) out[static_cast<size_t>(i)] = static_cast<char>((n >> (8 * i)) & 0xFF);
  return out + header + data;
}

}  // namespace testutil
