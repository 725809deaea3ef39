// The strict JSON parser: recursive descent over the bytes, with positions
// in every error.
#include "json.h"

#include <cmath>
#include <locale>
#include <sstream>

namespace convcore {
namespace json {

const char* kind_name(Kind kind) {
  switch (kind) {
    case Kind::Null: return "null";
    case Kind::Bool: return "a bool";
    case Kind::Int: return "an int";
    case Kind::Float: return "a float";
    case Kind::String: return "a string";
    case Kind::Array: return "a list";
    case Kind::Object: return "an object";
  }
  return "?";
}

const Value* Value::find(const std::string& key) const {
  for (const auto& m : members)
    if (m.first == key) return &m.second;
  return nullptr;
}

namespace {

class Parser {
 public:
  explicit Parser(const std::string& text) : s_(text) {}

  Value parse_document() {
    skip_ws();
    Value v = parse_value(0);
    skip_ws();
    if (pos_ != s_.size()) fail("unexpected data after the JSON value");
    return v;
  }

 private:
  [[noreturn]] void fail(const std::string& what) const { fail_at(what, pos_); }

  [[noreturn]] void fail_at(const std::string& what, std::size_t at) const {
    std::size_t line = 1, col = 1;
    for (std::size_t i = 0; i < at && i < s_.size(); ++i) {
      if (s_[i] == '\n') {
        ++line;
        col = 1;
      } else {
        ++col;
      }
    }
    std::ostringstream os;
    os << what << " at line " << line << ", column " << col << " (byte " << at << ")";
    throw ParseError(os.str());
  }

  bool at_end() const { return pos_ >= s_.size(); }
  unsigned char peek() const { return static_cast<unsigned char>(s_[pos_]); }

  void skip_ws() {
    while (!at_end()) {
      const char c = s_[pos_];
      if (c != ' ' && c != '\t' && c != '\n' && c != '\r') break;
      ++pos_;
    }
  }

  static std::string describe(unsigned char c) {
    if (c >= 0x20 && c < 0x7f) return std::string("'") + static_cast<char>(c) + "'";
    std::ostringstream os;
    os << "byte 0x" << std::hex << static_cast<int>(c);
    return os.str();
  }

  Value parse_value(int depth) {
    if (at_end()) fail("expected a value, found the end of the text");
    const unsigned char c = peek();
    if (c == '{') return parse_object(depth + 1);
    if (c == '[') return parse_array(depth + 1);
    if (c == '"') {
      Value v;
      v.kind = Kind::String;
      v.string = parse_string();
      return v;
    }
    if (c == '-' || (c >= '0' && c <= '9')) return parse_number();
    if (match_word("true")) {
      Value v;
      v.kind = Kind::Bool;
      v.boolean = true;
      return v;
    }
    if (match_word("false")) {
      Value v;
      v.kind = Kind::Bool;
      return v;
    }
    if (match_word("null")) return Value();
    if (s_.compare(pos_, 3, "NaN") == 0 || s_.compare(pos_, 8, "Infinity") == 0)
      fail("non-standard JSON constant (NaN and Infinity are not JSON)");
    fail("expected a value, found " + describe(c));
  }

  bool match_word(const char* word) {
    const std::size_t n = std::char_traits<char>::length(word);
    if (s_.compare(pos_, n, word) != 0) return false;
    pos_ += n;
    return true;
  }

  void enter(int depth) const {
    if (depth > kMaxDepth)
      fail("nested more than " + std::to_string(kMaxDepth) + " levels deep");
  }

  Value parse_object(int depth) {
    enter(depth);
    Value v;
    v.kind = Kind::Object;
    ++pos_;  // '{'
    skip_ws();
    if (!at_end() && peek() == '}') {
      ++pos_;
      return v;
    }
    while (true) {
      skip_ws();
      if (at_end() || peek() != '"') fail("expected a string key in an object");
      const std::size_t key_pos = pos_;
      std::string key = parse_string();
      for (const auto& m : v.members)
        if (m.first == key) fail_at("duplicate key " + short_quote(key), key_pos);
      skip_ws();
      if (at_end() || peek() != ':') fail("expected ':' after an object key");
      ++pos_;
      skip_ws();
      Value item = parse_value(depth);
      v.members.emplace_back(std::move(key), std::move(item));
      skip_ws();
      if (at_end()) fail("expected ',' or '}' in an object, found the end of the text");
      if (peek() == ',') {
        ++pos_;
        continue;
      }
      if (peek() == '}') {
        ++pos_;
        return v;
      }
      fail("expected ',' or '}' in an object, found " + describe(peek()));
    }
  }

  Value parse_array(int depth) {
    enter(depth);
    Value v;
    v.kind = Kind::Array;
    ++pos_;  // '['
    skip_ws();
    if (!at_end() && peek() == ']') {
      ++pos_;
      return v;
    }
    while (true) {
      skip_ws();
      v.items.push_back(parse_value(depth));
      skip_ws();
      if (at_end()) fail("expected ',' or ']' in a list, found the end of the text");
      if (peek() == ',') {
        ++pos_;
        continue;
      }
      if (peek() == ']') {
        ++pos_;
        return v;
      }
      fail("expected ',' or ']' in a list, found " + describe(peek()));
    }
  }

  static void append_utf8(std::string& out, uint32_t cp) {
    if (cp < 0x80) {
      out += static_cast<char>(cp);
    } else if (cp < 0x800) {
      out += static_cast<char>(0xC0 | (cp >> 6));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
      out += static_cast<char>(0xE0 | (cp >> 12));
      out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    } else {
      out += static_cast<char>(0xF0 | (cp >> 18));
      out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
      out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    }
  }

  uint32_t parse_hex4() {
    if (pos_ + 4 > s_.size()) fail("truncated \\u escape");
    uint32_t v = 0;
    for (int i = 0; i < 4; ++i) {
      const char c = s_[pos_ + static_cast<std::size_t>(i)];
      v <<= 4;
      if (c >= '0' && c <= '9')
        v |= static_cast<uint32_t>(c - '0');
      else if (c >= 'a' && c <= 'f')
        v |= static_cast<uint32_t>(c - 'a' + 10);
      else if (c >= 'A' && c <= 'F')
        v |= static_cast<uint32_t>(c - 'A' + 10);
      else
        fail("bad \\u escape (needs 4 hex digits)");
    }
    pos_ += 4;
    return v;
  }

  // One UTF-8 sequence starting at pos_, validated and copied.
  void copy_utf8(std::string& out) {
    const unsigned char c = peek();
    std::size_t len;
    uint32_t cp, min;
    if (c < 0x80) {
      len = 1, cp = c, min = 0;
    } else if ((c & 0xE0) == 0xC0) {
      len = 2, cp = c & 0x1Fu, min = 0x80;
    } else if ((c & 0xF0) == 0xE0) {
      len = 3, cp = c & 0x0Fu, min = 0x800;
    } else if ((c & 0xF8) == 0xF0) {
      len = 4, cp = c & 0x07u, min = 0x10000;
    } else {
      fail("invalid UTF-8 (" + describe(c) + ")");
    }
    if (pos_ + len > s_.size()) fail("invalid UTF-8 (truncated sequence)");
    for (std::size_t i = 1; i < len; ++i) {
      const unsigned char d = static_cast<unsigned char>(s_[pos_ + i]);
      if ((d & 0xC0) != 0x80) fail("invalid UTF-8 (bad continuation byte)");
      cp = (cp << 6) | (d & 0x3Fu);
    }
    if (cp < min) fail("invalid UTF-8 (overlong encoding)");
    if (cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))
      fail("invalid UTF-8 (not a Unicode scalar value)");
    out.append(s_, pos_, len);
    pos_ += len;
  }

  std::string parse_string() {
    ++pos_;  // '"'
    std::string out;
    while (true) {
      if (at_end()) fail("unterminated string");
      const unsigned char c = peek();
      if (c == '"') {
        ++pos_;
        return out;
      }
      if (c < 0x20) fail("control character " + describe(c) + " in a string (must be escaped)");
      if (c != '\\') {
        copy_utf8(out);
        continue;
      }
      ++pos_;
      if (at_end()) fail("unterminated string");
      const char e = s_[pos_++];
      switch (e) {
        case '"': out += '"'; break;
        case '\\': out += '\\'; break;
        case '/': out += '/'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': {
          uint32_t cp = parse_hex4();
          if (cp >= 0xDC00 && cp <= 0xDFFF) fail("lone low surrogate in a \\u escape");
          if (cp >= 0xD800 && cp <= 0xDBFF) {
            if (s_.compare(pos_, 2, "\\u") != 0) fail("lone high surrogate in a \\u escape");
            pos_ += 2;
            const uint32_t lo = parse_hex4();
            if (lo < 0xDC00 || lo > 0xDFFF) fail("high surrogate not followed by a low one");
            cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
          }
          append_utf8(out, cp);
          break;
        }
        default:
          --pos_;
          fail("invalid escape '\\" + std::string(1, e) + "' in a string");
      }
    }
  }

  bool digit() const { return !at_end() && peek() >= '0' && peek() <= '9'; }

  Value parse_number() {
    const std::size_t start = pos_;
    bool negative = false;
    if (peek() == '-') {
      negative = true;
      ++pos_;
    }
    if (!digit()) fail("expected a digit in a number");
    if (peek() == '0') {
      ++pos_;
      if (digit()) fail_at("a number cannot have leading zeros", start);
    } else {
      while (digit()) ++pos_;
    }
    bool is_float = false;
    if (!at_end() && peek() == '.') {
      is_float = true;
      ++pos_;
      if (!digit()) fail("expected a digit after '.' in a number");
      while (digit()) ++pos_;
    }
    if (!at_end() && (peek() == 'e' || peek() == 'E')) {
      is_float = true;
      ++pos_;
      if (!at_end() && (peek() == '+' || peek() == '-')) ++pos_;
      if (!digit()) fail("expected a digit in the exponent of a number");
      while (digit()) ++pos_;
    }
    const std::string lexeme = s_.substr(start, pos_ - start);
    Value v;
    if (!is_float) {
      // Accumulate negatively so that INT64_MIN parses too.
      int64_t acc = 0;
      for (std::size_t i = negative ? 1 : 0; i < lexeme.size(); ++i) {
        const int d = lexeme[i] - '0';
        if (__builtin_mul_overflow(acc, int64_t{10}, &acc) ||
            __builtin_sub_overflow(acc, int64_t{d}, &acc))
          fail_at("integer " + short_quote(lexeme, 40) + " does not fit in 64 bits", start);
      }
      if (!negative) {
        if (acc == INT64_MIN)
          fail_at("integer " + short_quote(lexeme, 40) + " does not fit in 64 bits", start);
        acc = -acc;
      }
      v.kind = Kind::Int;
      v.integer = acc;
      v.number = static_cast<double>(acc);
      return v;
    }
    // The grammar is checked above; the conversion must not depend on the
    // process's locale (a decimal comma would break strtod).
    std::istringstream is(lexeme);
    is.imbue(std::locale::classic());
    double d = 0.0;
    is >> d;
    if (is.fail() || !std::isfinite(d))
      fail_at("number " + short_quote(lexeme, 40) + " is out of range", start);
    v.kind = Kind::Float;
    v.number = d;
    return v;
  }

  const std::string& s_;
  std::size_t pos_ = 0;
};

void dump_to(std::string& out, const Value& v) {
  switch (v.kind) {
    case Kind::Null: out += "null"; break;
    case Kind::Bool: out += v.boolean ? "true" : "false"; break;
    case Kind::Int: out += std::to_string(v.integer); break;
    case Kind::Float: {
      std::ostringstream os;
      os.imbue(std::locale::classic());
      os.precision(17);
      os << v.number;
      out += os.str();
      break;
    }
    case Kind::String: out += quote(v.string); break;
    case Kind::Array:
      out += '[';
      for (std::size_t i = 0; i < v.items.size(); ++i) {
        if (i) out += ", ";
        dump_to(out, v.items[i]);
      }
      out += ']';
      break;
    case Kind::Object:
      out += '{';
      for (std::size_t i = 0; i < v.members.size(); ++i) {
        if (i) out += ", ";
        out += quote(v.members[i].first);
        out += ": ";
        dump_to(out, v.members[i].second);
      }
      out += '}';
      break;
  }
}

std::string cut(std::string s, std::size_t limit) {
  if (s.size() <= limit) return s;
  // do not cut inside a UTF-8 sequence
  std::size_t n = limit;
  while (n > 0 && (static_cast<unsigned char>(s[n]) & 0xC0) == 0x80) --n;
  s.resize(n);
  return s + "...";
}

}  // namespace

Value parse(const std::string& text) { return Parser(text).parse_document(); }

std::string quote(const std::string& s) {
  std::string out = "\"";
  for (const char ch : s) {
    const unsigned char c = static_cast<unsigned char>(ch);
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      case '\b': out += "\\b"; break;
      case '\f': out += "\\f"; break;
      default:
        if (c < 0x20) {
          static const char* hex = "0123456789abcdef";
          out += "\\u00";
          out += hex[c >> 4];
          out += hex[c & 15];
        } else {
          out += ch;
        }
    }
  }
  return out + "\"";
}

std::string dump(const Value& value) {
  std::string out;
  dump_to(out, value);
  return out;
}

std::string short_repr(const Value& value, std::size_t limit) {
  if (value.kind == Kind::Array || value.kind == Kind::Object) {
    // Large containers: dump at most a prefix's worth of items.
    Value head = value;
    if (head.items.size() > 64) head.items.resize(64);
    if (head.members.size() > 64) head.members.resize(64);
    return cut(dump(head), limit);
  }
  return cut(dump(value), limit);
}

std::string short_quote(const std::string& s, std::size_t limit) {
  return cut(quote(s.size() > 4 * limit ? s.substr(0, 4 * limit) : s), limit);
}

std::string repr(const std::string& s, std::size_t limit) {
  const bool has_single = s.find('\'') != std::string::npos;
  const bool has_double = s.find('"') != std::string::npos;
  const char q = (has_single && !has_double) ? '"' : '\'';
  std::string out(1, q);
  for (const char ch : s.size() > 4 * limit ? s.substr(0, 4 * limit) : s) {
    const unsigned char c = static_cast<unsigned char>(ch);
    if (ch == q || ch == '\\') {
      out += '\\';
      out += ch;
    } else if (ch == '\n') {
      out += "\\n";
    } else if (ch == '\r') {
      out += "\\r";
    } else if (ch == '\t') {
      out += "\\t";
    } else if (c < 0x20 || c == 0x7f) {
      static const char* hex = "0123456789abcdef";
      out += "\\x";
      out += hex[c >> 4];
      out += hex[c & 15];
    } else {
      out += ch;
    }
  }
  out += q;
  return cut(out, limit);
}

}  // namespace json
}  // namespace convcore
