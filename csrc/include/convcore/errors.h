// Exceptions thrown by the core. The Python bindings map ValueError and
// TypeError to the Python exceptions of the same name.
#pragma once
#include <stdexcept>
#include <string>

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

}  // namespace convcore
