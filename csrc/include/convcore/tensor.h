// A non-owning view of a strided array: pointer, dtype, shape and strides
// (strides in elements, may be negative or zero).
#pragma once
#include <cstdint>
#include <string>

namespace convcore {

enum class DType { Float32, Float64, Int64 };

const char* dtype_name(DType dtype);
std::size_t dtype_size(DType dtype);

constexpr int kMaxDims = 8;

struct TensorView {
  void* data = nullptr;
  DType dtype = DType::Float32;
  int ndim = 0;
  int64_t shape[kMaxDims] = {};
  int64_t strides[kMaxDims] = {};  // in elements

  int64_t numel() const {
    int64_t n = 1;
    for (int i = 0; i < ndim; ++i) n *= shape[i];
    return n;
  }
  bool is_contiguous() const {
    if (numel() == 0) return true;  // nothing to address
    int64_t expected = 1;
    for (int i = ndim - 1; i >= 0; --i) {
      if (shape[i] != 1 && strides[i] != expected) return false;
      expected *= shape[i];
    }
    return true;
  }
  template <typename T>
  T* ptr() const { return static_cast<T*>(data); }
};

// Builds a view over a C-contiguous buffer.
TensorView contiguous_view(void* data, DType dtype, int ndim, const int64_t* shape);

// "(2, 3, 5, 5)"
std::string shape_str(const TensorView& t);

}  // namespace convcore
