// convcore::Tensor: an owning, C-contiguous, 64-byte aligned array.
#include <cstring>
#include <new>
#include <sstream>
#include <type_traits>
#include <utility>

#include "convcore/errors.h"
#include "convcore/tensor.h"
#include "convcore/threading.h"

namespace convcore {

namespace {

constexpr std::size_t kAlignment = 64;

// Elements of a shape, with the checks every Tensor shape gets.
int64_t checked_numel(const std::vector<int64_t>& shape, DType dtype) {
  if (shape.size() > static_cast<std::size_t>(kMaxDims))
    throw ValueError("a tensor has at most " + std::to_string(kMaxDims) + " dimensions, got " +
                     std::to_string(shape.size()) + " in shape " + shape_str(shape));
  int64_t n = 1;
  for (int64_t d : shape) {
    if (d < 0) throw ValueError("tensor shape " + shape_str(shape) + " has a negative size");
    if (__builtin_mul_overflow(n, d, &n))
      throw ValueError("tensor shape " + shape_str(shape) +
                       " has more elements than fit in 64 bits");
  }
  int64_t bytes;
  if (__builtin_mul_overflow(n, static_cast<int64_t>(dtype_size(dtype)), &bytes))
    throw ValueError("tensor shape " + shape_str(shape) + " needs more bytes than fit in 64 bits");
  return n;
}

template <typename To, typename From>
void convert(const From* src, To* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    if constexpr (std::is_integral_v<To> && std::is_floating_point_v<From>) {
      // NaN, infinities and out-of-range values have no int64 value.
      if (!(src[i] >= -9.2233720368547758e18 && src[i] < 9.2233720368547758e18))
        throw ValueError("to(int64): element " + std::to_string(i) + " (" +
                         std::to_string(src[i]) + ") has no int64 value");
    }
    dst[i] = static_cast<To>(src[i]);
  }
}

template <typename To>
void convert_from(DType from, const void* src, To* dst, int64_t n) {
  switch (from) {
    case DType::Float32: convert(static_cast<const float*>(src), dst, n); break;
    case DType::Float64: convert(static_cast<const double*>(src), dst, n); break;
    case DType::Int64: convert(static_cast<const int64_t*>(src), dst, n); break;
  }
}

}  // namespace

std::string shape_str(const std::vector<int64_t>& shape) {
  std::ostringstream os;
  os << "(";
  for (std::size_t i = 0; i < shape.size(); ++i) os << (i ? ", " : "") << shape[i];
  if (shape.size() == 1) os << ",";
  os << ")";
  return os.str();
}

void Tensor::allocate(DType dtype, std::vector<int64_t> shape) {
  const int64_t n = checked_numel(shape, dtype);
  std::size_t bytes = static_cast<std::size_t>(n) * dtype_size(dtype);
  if (bytes == 0) bytes = kAlignment;  // a unique, non-null buffer even when empty
  // More than the machine's memory: out of memory, without asking the
  // allocator (with Linux's overcommit it may say yes, and the process is
  // killed when it touches the pages).
  if (bytes > static_cast<std::size_t>(physical_memory_bytes()))
    throw MemoryError("convcore: a tensor of shape " + convcore::shape_str(shape) + " needs " +
                      std::to_string(bytes) + " bytes, more than this machine's memory");
  void* p = nullptr;
  try {
    p = ::operator new(bytes, std::align_val_t(kAlignment));
  } catch (const std::bad_alloc&) {
    throw MemoryError("convcore: cannot allocate " + std::to_string(bytes) +
                      " bytes for a tensor of shape " + convcore::shape_str(shape));
  }
  release();
  data_ = p;
  dtype_ = dtype;
  shape_ = std::move(shape);
  numel_ = n;
}

void Tensor::release() noexcept {
  if (data_) ::operator delete(data_, std::align_val_t(kAlignment));
  data_ = nullptr;
  numel_ = 0;
  shape_.clear();
}

Tensor::Tensor(DType dtype, std::vector<int64_t> shape) {
  allocate(dtype, std::move(shape));
  std::memset(data_, 0, nbytes());
}

Tensor Tensor::empty(DType dtype, std::vector<int64_t> shape) {
  Tensor t;
  t.allocate(dtype, std::move(shape));
  return t;
}

Tensor Tensor::zeros(DType dtype, std::vector<int64_t> shape) {
  return Tensor(dtype, std::move(shape));
}

Tensor Tensor::from_data(DType dtype, std::vector<int64_t> shape, const void* data) {
  Tensor t = empty(dtype, std::move(shape));
  if (t.nbytes()) {
    if (!data) throw ValueError("Tensor::from_data: data is null");
    std::memcpy(t.data_, data, t.nbytes());
  }
  return t;
}

Tensor Tensor::from_view(const TensorView& v) {
  if (v.ndim < 0 || v.ndim > kMaxDims)
    throw ValueError("Tensor::from_view: ndim must be in [0, " + std::to_string(kMaxDims) +
                     "], got " + std::to_string(v.ndim));
  Tensor t = empty(v.dtype, std::vector<int64_t>(v.shape, v.shape + v.ndim));
  const int64_t n = t.numel();
  if (n == 0) return t;
  if (!v.data) throw ValueError("Tensor::from_view: the view has no data");
  const std::size_t item = dtype_size(v.dtype);
  if (v.is_contiguous()) {
    std::memcpy(t.data_, v.data, t.nbytes());
    return t;
  }
  // Odometer over the index space, element by element (bytes, any dtype).
  int64_t idx[kMaxDims] = {};
  const auto* src = static_cast<const unsigned char*>(v.data);
  auto* dst = static_cast<unsigned char*>(t.data_);
  for (int64_t i = 0; i < n; ++i) {
    int64_t offset = 0;
    for (int d = 0; d < v.ndim; ++d) offset += idx[d] * v.strides[d];
    std::memcpy(dst + static_cast<std::size_t>(i) * item,
                src + offset * static_cast<std::ptrdiff_t>(item), item);
    for (int d = v.ndim - 1; d >= 0; --d) {
      if (++idx[d] < v.shape[d]) break;
      idx[d] = 0;
    }
  }
  return t;
}

Tensor::Tensor(const Tensor& other) {
  if (other.defined()) *this = from_data(other.dtype_, other.shape_, other.data_);
}

Tensor& Tensor::operator=(const Tensor& other) {
  if (this == &other) return *this;
  if (!other.defined()) {
    release();
    return *this;
  }
  Tensor copy(other);
  *this = std::move(copy);
  return *this;
}

Tensor::Tensor(Tensor&& other) noexcept
    : dtype_(other.dtype_), shape_(std::move(other.shape_)), numel_(other.numel_),
      data_(other.data_) {
  other.data_ = nullptr;
  other.numel_ = 0;
  other.shape_.clear();
}

Tensor& Tensor::operator=(Tensor&& other) noexcept {
  if (this == &other) return *this;
  release();
  dtype_ = other.dtype_;
  shape_ = std::move(other.shape_);
  numel_ = other.numel_;
  data_ = other.data_;
  other.data_ = nullptr;
  other.numel_ = 0;
  other.shape_.clear();
  return *this;
}

Tensor::~Tensor() { release(); }

int64_t Tensor::size(int dim) const {
  const int nd = ndim();
  const int d = dim < 0 ? dim + nd : dim;
  if (d < 0 || d >= nd)
    throw ValueError("dimension " + std::to_string(dim) + " is out of range for a tensor of shape " +
                     shape_str());
  return shape_[static_cast<std::size_t>(d)];
}

void Tensor::check_dtype(DType expected) const {
  if (expected != dtype_)
    throw TypeError(std::string("the tensor has dtype ") + dtype_name(dtype_) + ", not " +
                    dtype_name(expected));
}

TensorView Tensor::view() const {
  if (!defined()) throw ValueError("view() of an undefined Tensor");
  return contiguous_view(data_, dtype_, ndim(), shape_.data());
}

namespace {

// The shape a reshape asks for, with -1 filled in.
std::vector<int64_t> resolve_shape(std::vector<int64_t> shape, int64_t numel,
                                   const std::vector<int64_t>& from) {
  int infer = -1;
  int64_t known = 1;
  for (std::size_t i = 0; i < shape.size(); ++i) {
    if (shape[i] == -1) {
      if (infer >= 0) throw ValueError("reshape: only one dimension can be -1, got " + shape_str(shape));
      infer = static_cast<int>(i);
    } else if (shape[i] < 0) {
      throw ValueError("reshape: bad shape " + shape_str(shape));
    } else if (__builtin_mul_overflow(known, shape[i], &known)) {
      throw ValueError("reshape: shape " + shape_str(shape) + " has more elements than fit in 64 bits");
    }
  }
  if (infer >= 0) {
    if (known == 0 || numel % known != 0)
      throw ValueError("reshape: cannot reshape a tensor of shape " + shape_str(from) + " to " +
                       shape_str(shape));
    shape[static_cast<std::size_t>(infer)] = numel / known;
  } else if (known != numel) {
    throw ValueError("reshape: cannot reshape a tensor of shape " + shape_str(from) + " (" +
                     std::to_string(numel) + " elements) to " + shape_str(shape));
  }
  return shape;
}

}  // namespace

Tensor Tensor::reshape(std::vector<int64_t> shape) const& {
  Tensor copy(*this);
  return std::move(copy).reshape(std::move(shape));
}

Tensor Tensor::reshape(std::vector<int64_t> shape) && {
  if (!defined()) throw ValueError("reshape() of an undefined Tensor");
  std::vector<int64_t> resolved = resolve_shape(std::move(shape), numel_, shape_);
  checked_numel(resolved, dtype_);  // the dimension limit
  Tensor out(std::move(*this));
  out.shape_ = std::move(resolved);
  return out;
}

Tensor Tensor::to(DType dtype) const {
  if (!defined()) throw ValueError("to() of an undefined Tensor");
  if (dtype == dtype_) return *this;
  Tensor out = empty(dtype, shape_);
  switch (dtype) {
    case DType::Float32: convert_from(dtype_, data_, static_cast<float*>(out.data_), numel_); break;
    case DType::Float64: convert_from(dtype_, data_, static_cast<double*>(out.data_), numel_); break;
    case DType::Int64: convert_from(dtype_, data_, static_cast<int64_t*>(out.data_), numel_); break;
  }
  return out;
}

std::string Tensor::shape_str() const { return convcore::shape_str(shape_); }

}  // namespace convcore
