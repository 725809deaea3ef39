// The strict JSON parser of the runtime (csrc/runtime/json.h).
#include <string>

#include "check.h"
#include "json.h"

using convcore::json::Kind;
using convcore::json::parse;
using convcore::json::ParseError;
using convcore::json::Value;

TEST(json_parses_what_python_writes) {
  const Value v = parse(
      " {\"type\": \"Conv2d\", \"config\": {\"kernel_size\": [5, 5], \"eps\": 1e-05, "
      "\"alpha\": 0.0001, \"k\": 2.0, \"bias\": true, \"name\": null, \"neg\": -3, "
      "\"s\": \"caf\\u00e9 \\ud83d\\ude00 \\\"q\\\" \\\\ \\/ \\n\"}}  \n");
  CHECK(v.is_object());
  CHECK_EQ(v.find("type")->string, std::string("Conv2d"));
  const Value& c = *v.find("config");
  CHECK_EQ(c.members.size(), 8u);
  CHECK(c.find("kernel_size")->is_array());
  CHECK_EQ(c.find("kernel_size")->items[1].integer, 5);
  CHECK(c.find("eps")->kind == Kind::Float);
  CHECK_EQ(c.find("eps")->number, 1e-05);
  CHECK_EQ(c.find("alpha")->number, 0.0001);
  CHECK_EQ(c.find("k")->number, 2.0);
  CHECK(c.find("bias")->is_bool() && c.find("bias")->boolean);
  CHECK(c.find("name")->is_null());
  CHECK_EQ(c.find("neg")->integer, -3);
  CHECK_EQ(c.find("s")->string, std::string("caf\xc3\xa9 \xf0\x9f\x98\x80 \"q\" \\ / \n"));
  CHECK(c.find("missing") == nullptr);
  // raw UTF-8 passes through; members keep the file's order
  const Value u = parse("{\"z\": \"\xe2\x82\xac\", \"a\": 1}");
  CHECK_EQ(u.members[0].first, std::string("z"));
  CHECK_EQ(u.members[0].second.string, std::string("\xe2\x82\xac"));
  // int64 limits
  CHECK_EQ(parse("9223372036854775807").integer, INT64_MAX);
  CHECK_EQ(parse("-9223372036854775808").integer, INT64_MIN);
  CHECK_EQ(parse("[]").items.size(), 0u);
  CHECK_EQ(parse("{}").members.size(), 0u);
  CHECK_EQ(parse("-0.5e+2").number, -50.0);
}

TEST(json_rejects_what_is_not_strict_json) {
  const char* bad[][2] = {
      {"", "expected a value"},
      {"{", "expected a string key"},
      {"{\"a\": 1,}", "expected a string key"},
      {"[1, 2,]", "expected a value"},
      {"[1 2]", "expected ',' or ']'"},
      {"{\"a\" 1}", "expected ':'"},
      {"{\"a\": 1} x", "unexpected data after the JSON value"},
      {"{\"a\": 1, \"a\": 2}", "duplicate key \"a\""},
      {"01", "leading zeros"},
      {"1.", "expected a digit after '.'"},
      {"1e", "expected a digit in the exponent"},
      {"-", "expected a digit"},
      {"NaN", "NaN and Infinity are not JSON"},
      {"Infinity", "NaN and Infinity are not JSON"},
      {"tru", "expected a value"},
      {"'a'", "expected a value"},
      {"\"abc", "unterminated string"},
      {"\"a\tb\"", "control character"},
      {"\"\\x\"", "invalid escape"},
      {"\"\\u12\"", "\\u escape"},
      {"\"\\ud800\"", "lone high surrogate"},
      {"\"\\udc00\"", "lone low surrogate"},
      {"\"\\ud800\\u0041\"", "high surrogate not followed by a low one"},
      {"\"\xff\"", "invalid UTF-8"},
      {"\"\xc0\xaf\"", "overlong"},
      {"\"\xed\xa0\x80\"", "not a Unicode scalar value"},
      {"\"\xe2\x82\"", "invalid UTF-8"},
      {"9223372036854775808", "does not fit in 64 bits"},
      {"1e999", "out of range"},
      {"// comment\n1", "expected a value"},
  };
  for (const auto& b : bad) CHECK_THROWS(ParseError, parse(b[0]), b[1]);
  // errors say where
  CHECK_THROWS(ParseError, parse("{\n  \"a\": [1, 2,, 3]\n}"), "at line 2, column 14");
  // nesting is bounded (no stack overflow on a hostile input)
  CHECK_THROWS(ParseError, parse(std::string(100000, '[')), "nested more than 512 levels");
  CHECK_EQ(parse(std::string(300, '[') + std::string(300, ']')).items.size(), 1u);
}

TEST(json_dump_and_repr) {
  CHECK_EQ(convcore::json::dump(parse("{\"a\": [1, 2.5, true, null, \"x\\ny\"]}")),
           std::string("{\"a\": [1, 2.5, true, null, \"x\\ny\"]}"));
  CHECK_EQ(convcore::json::repr("features.0.weight"), std::string("'features.0.weight'"));
  CHECK_EQ(convcore::json::repr("it's"), std::string("\"it's\""));
  CHECK_EQ(convcore::json::repr(std::string(200, 'a'), 20), std::string("'") + std::string(19, 'a') + "...");
}

TEST_MAIN()
