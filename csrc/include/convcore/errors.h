// Exceptions thrown by the core. The Python bindings map ValueError and
// TypeError to the Python exceptions of the same name.
#pragma once
#include <new>
#include <stdexcept>
#include <string>
#include <utility>

namespace convcore {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// An argument has the right type but a bad value or shape.
class ValueError : public Error {
 public:
  using Error::Error;
};

// An argument has the wrong type or dtype.
class TypeError : public Error {
 public:
  using Error::Error;
};

// Memory a call needs cannot be had (its scratch or a copy would exceed the
// workspace limit, overflow size_t, or the allocator failed). A
// std::bad_alloc, so code that handles running out of memory still catches
// it; the Python bindings raise MemoryError with this message.
class MemoryError : public std::bad_alloc {
 public:
  explicit MemoryError(std::string what) : what_(std::move(what)) {}
  const char* what() const noexcept override { return what_.c_str(); }

 private:
  std::string what_;
};

}  // namespace convcore
