// A minimal test harness for the C++ tests (no dependencies): TEST(name)
// registers a function, CHECK* record failures and go on, and main() runs
// every test (or those whose names contain argv[1]) and returns non-zero if
// any check failed.
#pragma once
#include <cmath>
#include <cstdio>
#include <exception>
#include <functional>
#include <sstream>
#include <string>
#include <vector>

namespace check {

struct Test {
  const char* name;
  std::function<void()> fn;
};

inline std::vector<Test>& registry() {
  static std::vector<Test> tests;
  return tests;
}

inline int& failures() {
  static int n = 0;
  return n;
}

inline int& checks() {
  static int n = 0;
  return n;
}

struct Register {
  Register(const char* name, std::function<void()> fn) { registry().push_back({name, std::move(fn)}); }
};

inline void fail(const char* file, int line, const std::string& what) {
  ++failures();
  std::fprintf(stderr, "  FAILED %s:%d: %s\n", file, line, what.c_str());
}

inline bool contains(const std::string& text, const std::string& part) {
  return text.find(part) != std::string::npos;
}

inline int run_all(int argc, char** argv) {
  const std::string filter = argc > 1 ? argv[1] : "";
  int ran = 0, failed_tests = 0;
  for (const auto& t : registry()) {
    if (!filter.empty() && std::string(t.name).find(filter) == std::string::npos) continue;
    ++ran;
    const int before = failures();
    try {
      t.fn();
    } catch (const std::exception& e) {
      fail(__FILE__, __LINE__, std::string("uncaught exception: ") + e.what());
    } catch (...) {
      fail(__FILE__, __LINE__, "uncaught non-standard exception");
    }
    const bool ok = failures() == before;
    failed_tests += !ok;
    std::printf("%s %s\n", ok ? "ok    " : "FAILED", t.name);
  }
  std::printf("%d tests, %d checks, %d failed tests\n", ran, checks(), failed_tests);
  return failed_tests == 0 && ran > 0 ? 0 : 1;
}

}  // namespace check

#define CC_CAT2(a, b) a##b
#define CC_CAT(a, b) CC_CAT2(a, b)
#define TEST(name)                                                      \
  static void CC_CAT(test_, name)();                                    \
  static check::Register CC_CAT(register_, name)(#name, CC_CAT(test_, name)); \
  static void CC_CAT(test_, name)()

#define CHECK(cond)                                                     \
  do {                                                                  \
    ++check::checks();                                                  \
    if (!(cond)) check::fail(__FILE__, __LINE__, "CHECK(" #cond ")");   \
  } while (0)

#define CHECK_EQ(a, b)                                                            \
  do {                                                                            \
    ++check::checks();                                                            \
    const auto va_ = (a);                                                         \
    const auto vb_ = (b);                                                         \
    if (!(va_ == vb_)) {                                                          \
      std::ostringstream os_;                                                     \
      os_ << "CHECK_EQ(" #a ", " #b "): " << va_ << " != " << vb_;                \
      check::fail(__FILE__, __LINE__, os_.str());                                 \
    }                                                                             \
  } while (0)

// Runs stmt; it must throw exception type E whose what() contains `part`.
#define CHECK_THROWS(E, stmt, part)                                                         \
  do {                                                                                      \
    ++check::checks();                                                                      \
    bool thrown_ = false;                                                                   \
    try {                                                                                   \
      stmt;                                                                                 \
    } catch (const E& e_) {                                                                 \
      thrown_ = true;                                                                       \
      if (!check::contains(e_.what(), part))                                                \
        check::fail(__FILE__, __LINE__,                                                     \
                    std::string("message of " #E " lacks \"") + (part) + "\": " + e_.what()); \
    } catch (const std::exception& e_) {                                                    \
      thrown_ = true;                                                                       \
      check::fail(__FILE__, __LINE__, std::string("expected " #E ", got: ") + e_.what());  \
    }                                                                                       \
    if (!thrown_) check::fail(__FILE__, __LINE__, "expected " #E " from " #stmt);           \
  } while (0)

#define TEST_MAIN() \
  int main(int argc, char** argv) { return check::run_all(argc, argv); }
