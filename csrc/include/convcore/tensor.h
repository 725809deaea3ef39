// A non-owning view of a strided array: pointer, dtype, shape and strides
// (strides in elements, may be negative or zero).
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

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

// The DType of a C++ element type: dtype_of<float>() == DType::Float32.
template <typename T>
constexpr DType dtype_of();
template <>
constexpr DType dtype_of<float>() { return DType::Float32; }
template <>
constexpr DType dtype_of<double>() { return DType::Float64; }
template <>
constexpr DType dtype_of<int64_t>() { return DType::Int64; }

// An owning, C-contiguous array: one 64-byte aligned buffer, a dtype and a
// shape of at most kMaxDims dimensions. Copying copies the data; moving is
// cheap. A default-constructed Tensor holds nothing (defined() is false).
// view() gives the TensorView the op functions take.
class Tensor {
 public:
  Tensor() = default;
  // Zero-filled. ValueError for a negative size, more than kMaxDims
  // dimensions, or more bytes than fit in 64 bits; std::bad_alloc when the
  // memory cannot be had.
  Tensor(DType dtype, std::vector<int64_t> shape);
  // Uninitialised memory (for outputs that are written in full).
  static Tensor empty(DType dtype, std::vector<int64_t> shape);
  static Tensor zeros(DType dtype, std::vector<int64_t> shape);
  // A C-contiguous copy of any strided view.
  static Tensor from_view(const TensorView& view);
  // A copy of numel(shape) elements of a C-contiguous buffer.
  static Tensor from_data(DType dtype, std::vector<int64_t> shape, const void* data);

  Tensor(const Tensor& other);
  Tensor& operator=(const Tensor& other);
  Tensor(Tensor&& other) noexcept;
  Tensor& operator=(Tensor&& other) noexcept;
  ~Tensor();

  bool defined() const { return data_ != nullptr; }
  DType dtype() const { return dtype_; }
  int ndim() const { return static_cast<int>(shape_.size()); }
  const std::vector<int64_t>& shape() const { return shape_; }
  // Size of one dimension; negative dims count from the end, as in Python.
  int64_t size(int dim) const;
  int64_t numel() const { return numel_; }
  std::size_t nbytes() const { return static_cast<std::size_t>(numel_) * dtype_size(dtype_); }

  void* data() { return data_; }
  const void* data() const { return data_; }
  // Typed access; TypeError if T is not the tensor's dtype.
  template <typename T>
  T* data_as() {
    check_dtype(dtype_of<T>());
    return static_cast<T*>(data_);
  }
  template <typename T>
  const T* data_as() const {
    check_dtype(dtype_of<T>());
    return static_cast<const T*>(data_);
  }

  // A C-contiguous view of the whole tensor (writable through the view).
  TensorView view() const;

  // The same elements in another shape of the same size (one dimension may
  // be -1: inferred). On an rvalue the buffer moves over, otherwise it is copied.
  Tensor reshape(std::vector<int64_t> shape) const&;
  Tensor reshape(std::vector<int64_t> shape) &&;

  // A copy converted to another dtype (float32 <-> float64 <-> int64).
  Tensor to(DType dtype) const;

  // "(2, 3, 5, 5)"
  std::string shape_str() const;

 private:
  void allocate(DType dtype, std::vector<int64_t> shape);
  void check_dtype(DType expected) const;
  void release() noexcept;

  DType dtype_ = DType::Float32;
  std::vector<int64_t> shape_;
  int64_t numel_ = 0;
  void* data_ = nullptr;
};

// "(2, 3, 5, 5)" for a shape vector.
std::string shape_str(const std::vector<int64_t>& shape);

}  // namespace convcore
