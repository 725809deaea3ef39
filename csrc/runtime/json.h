// A small, strict JSON parser (RFC 8259) for safetensors headers and the
// architecture convcore saves. Internal to the runtime (not installed).
//
// Strict: one value and nothing but whitespace after it; no comments, no
// trailing commas, no NaN/Infinity, no leading zeros, no control characters
// in strings, valid UTF-8 only (no overlong forms, no surrogates), \u escapes
// must pair surrogates correctly, duplicate object keys are an error (JSON
// would silently keep the last one), nesting is bounded. Integers (no
// fraction or exponent) must fit in int64; other numbers are doubles.
#pragma once
#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace convcore {
namespace json {

enum class Kind { Null, Bool, Int, Float, String, Array, Object };

const char* kind_name(Kind kind);  // "null", "a bool", "an int", ...

class Value {
 public:
  Kind kind = Kind::Null;
  bool boolean = false;
  int64_t integer = 0;
  double number = 0.0;  // Float (and Int, converted)
  std::string string;
  std::vector<Value> items;                             // Array
  std::vector<std::pair<std::string, Value>> members;  // Object, in file order

  bool is_null() const { return kind == Kind::Null; }
  bool is_bool() const { return kind == Kind::Bool; }
  bool is_int() const { return kind == Kind::Int; }
  bool is_number() const { return kind == Kind::Int || kind == Kind::Float; }
  bool is_string() const { return kind == Kind::String; }
  bool is_array() const { return kind == Kind::Array; }
  bool is_object() const { return kind == Kind::Object; }

  // Object member by key, or nullptr.
  const Value* find(const std::string& key) const;
};

// Thrown for malformed JSON; the message says what and where
// ("expected ',' or '}' after an object member at line 1, column 17").
class ParseError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

constexpr int kMaxDepth = 512;

Value parse(const std::string& text);

// JSON text of a value (compact, keys in order); strings as UTF-8.
std::string dump(const Value& value);
// A JSON string literal.
std::string quote(const std::string& s);
// dump() cut to `limit` characters with "..." (for error messages about
// corrupt input, which can hold anything).
std::string short_repr(const Value& value, std::size_t limit = 120);
std::string short_quote(const std::string& s, std::size_t limit = 120);
// Python's repr() of a str, cut to `limit` characters: 'features.0.weight'
// (error messages name things as the Python layer does).
std::string repr(const std::string& s, std::size_t limit = 120);

}  // namespace json
}  // namespace convcore
