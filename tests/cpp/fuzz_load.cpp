// A bounded, deterministic fuzzer of the C++ model-file loader
// (SafetensorsFile::open / read and Net::load / forward).
//
//   fuzz_load [--seconds S] [--cases N] [--seed K] [--save DIR] SEED_FILE_OR_DIR...
//
// It mutates the seed files (the models in tests/cpp/data) with mutations
// aimed at the format: truncations, a rewritten 8-byte header length, numbers
// in the JSON replaced by 0, -1, 2^31, 2^63, 2^64 and the like (offsets past
// the end, shapes that overflow), dtype names swapped, bytes flipped,
// inserted, deleted, JSON pieces duplicated, and two seeds spliced. Each case
// must either load (and then run forward on a small input) or throw one of
// convcore's exceptions (or std::bad_alloc for a net too big to run); any
// other exception fails the run and saves the case to --save DIR. Memory
// errors are what the AddressSanitizer build (CONVCORE_SANITIZE) is for: there
// they abort the process, and ctest reports the failure.
//
// Not coverage-guided (that needs clang's libFuzzer, which the CI image does
// not have): the Python loader is fuzzed coverage-guided with atheris
// (tests/fuzz/fuzz_loader.py), and the same file format reaches both.
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <filesystem>
#include <fstream>
#include <new>
#include <typeinfo>
#include <string>
#include <vector>

#include <unistd.h>

#include "convcore/convcore.h"
#include "convcore/safetensors.h"

namespace fs = std::filesystem;
using Bytes = std::vector<unsigned char>;

namespace {

struct Rng {  // xorshift64*: the same cases for the same --seed everywhere
  uint64_t s;
  uint64_t next() {
    s ^= s >> 12;
    s ^= s << 25;
    s ^= s >> 27;
    return s * 2685821657736338717ULL;
  }
  uint64_t below(uint64_t n) { return n ? next() % n : 0; }
};

Bytes read_file(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  return Bytes((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
}

void write_file(const fs::path& p, const Bytes& b) {
  std::ofstream f(p, std::ios::binary | std::ios::trunc);
  f.write(reinterpret_cast<const char*>(b.data()), static_cast<std::streamsize>(b.size()));
}

// Header length as the file gives it (the first 8 bytes, little-endian).
uint64_t header_len(const Bytes& b) {
  uint64_t n = 0;
  for (int i = 7; i >= 0 && b.size() >= 8; --i) n = (n << 8) | b[static_cast<size_t>(i)];
  return n;
}

void set_header_len(Bytes& b, uint64_t n) {
  if (b.size() < 8) return;
  for (int i = 0; i < 8; ++i) b[static_cast<size_t>(i)] = static_cast<unsigned char>(n >> (8 * i));
}

// The JSON header's byte range [8, end) inside b.
size_t header_end(const Bytes& b) {
  const uint64_t n = header_len(b);
  return b.size() < 8 ? b.size() : static_cast<size_t>(std::min<uint64_t>(b.size(), 8 + n));
}

const char* const kNumbers[] = {"0",          "-1",          "1",  "2147483647", "2147483648",
                                "4294967296", "-2147483649", "65536", "9223372036854775807",
                                "9223372036854775808", "18446744073709551615",
                                "18446744073709551616", "1e308", "1.5", "-0", "99999999999999999999"};
const char* const kDtypes[] = {"F32", "F64", "F16", "BF16", "I64", "I32", "U8", "BOOL",
                               "I8",  "U64", "F8_E4M3", "X",  "",    "f32"};

void replace(Bytes& b, size_t at, size_t len, const std::string& with) {
  b.erase(b.begin() + static_cast<long>(at), b.begin() + static_cast<long>(at + len));
  b.insert(b.begin() + static_cast<long>(at), with.begin(), with.end());
}

// Replaces a number in the JSON header with a nasty one and fixes the length
// so that the change reaches the checks behind the length check.
bool mutate_number(Bytes& b, Rng& rng) {
  const size_t end = header_end(b);
  std::vector<std::pair<size_t, size_t>> runs;  // digit runs in the header
  for (size_t i = 8; i < end;) {
    if (b[i] >= '0' && b[i] <= '9') {
      size_t j = i;
      while (j < end && b[j] >= '0' && b[j] <= '9') ++j;
      runs.push_back({i, j - i});
      i = j;
    } else {
      ++i;
    }
  }
  if (runs.empty()) return false;
  const auto [at, len] = runs[rng.below(runs.size())];
  const std::string with = kNumbers[rng.below(sizeof(kNumbers) / sizeof(kNumbers[0]))];
  replace(b, at, len, with);
  set_header_len(b, header_len(b) + with.size() - len);
  return true;
}

bool mutate_dtype(Bytes& b, Rng& rng) {
  const size_t end = header_end(b);
  const std::string key = "\"dtype\":";
  std::vector<size_t> hits;
  for (size_t i = 8; i + key.size() < end; ++i)
    if (std::memcmp(&b[i], key.data(), key.size()) == 0) hits.push_back(i + key.size());
  if (hits.empty()) return false;
  size_t at = hits[rng.below(hits.size())];
  while (at < end && b[at] != '"') ++at;  // the opening quote of the value
  size_t close = at + 1;
  while (close < end && b[close] != '"') ++close;
  if (close >= end) return false;
  const std::string with = kDtypes[rng.below(sizeof(kDtypes) / sizeof(kDtypes[0]))];
  replace(b, at + 1, close - at - 1, with);
  set_header_len(b, header_len(b) + with.size() - (close - at - 1));
  return true;
}

void mutate(Bytes& b, const std::vector<Bytes>& seeds, Rng& rng) {
  const int rounds = 1 + static_cast<int>(rng.below(3));
  for (int r = 0; r < rounds; ++r) {
    switch (rng.below(9)) {
      case 0:  // truncate
        b.resize(rng.below(b.size() + 1));
        break;
      case 1: {  // a new header length: near the old one, or anything
        const uint64_t old = header_len(b);
        const uint64_t choices[] = {old - 1, old + 1, old + 8, 0, 1, b.size(), b.size() - 8,
                                    100000000, 100000001, ~0ULL, 1ULL << 63, rng.next()};
        set_header_len(b, choices[rng.below(sizeof(choices) / sizeof(choices[0]))]);
        break;
      }
      case 2:
      case 3:
        mutate_number(b, rng);
        break;
      case 4:
        mutate_dtype(b, rng);
        break;
      case 5:  // flip bytes, mostly in the header
        for (int i = 0, n = 1 + static_cast<int>(rng.below(4)); i < n && !b.empty(); ++i) {
          const size_t limit = rng.below(4) ? header_end(b) : b.size();
          b[rng.below(limit ? limit : 1) % b.size()] = static_cast<unsigned char>(rng.next());
        }
        break;
      case 6: {  // delete or duplicate a piece of the header, length fixed
        const size_t end = header_end(b);
        if (end <= 9) break;
        const size_t at = 8 + rng.below(end - 8), len = 1 + rng.below(std::min<size_t>(40, end - at));
        if (rng.below(2)) {
          b.erase(b.begin() + static_cast<long>(at), b.begin() + static_cast<long>(at + len));
          set_header_len(b, header_len(b) - len);
        } else {
          const Bytes piece(b.begin() + static_cast<long>(at), b.begin() + static_cast<long>(at + len));
          b.insert(b.begin() + static_cast<long>(at), piece.begin(), piece.end());
          set_header_len(b, header_len(b) + len);
        }
        break;
      }
      case 7: {  // insert random bytes anywhere
        const size_t at = rng.below(b.size() + 1);
        for (int i = 0, n = 1 + static_cast<int>(rng.below(16)); i < n; ++i)
          b.insert(b.begin() + static_cast<long>(at), static_cast<unsigned char>(rng.next()));
        break;
      }
      default: {  // splice: this file's head, another seed's tail
        const Bytes& other = seeds[rng.below(seeds.size())];
        const size_t cut = rng.below(b.size() + 1), from = rng.below(other.size() + 1);
        b.resize(cut);
        b.insert(b.end(), other.begin() + static_cast<long>(from), other.end());
        break;
      }
    }
  }
}

enum class Outcome { Loaded, Refused, Failed };

// One case: the safetensors reader, then the net loader and a forward pass.
Outcome run_case(const fs::path& path, std::string* why) {
  bool loaded = false;
  try {
    const convcore::SafetensorsFile f = convcore::SafetensorsFile::open(path.string());
    for (const auto& e : f.entries()) {
      if (e.numel <= (1 << 22)) f.read(e);  // (open() bounds them by the file size; keep it quick)
    }
  } catch (const convcore::Error&) {
  } catch (const std::bad_alloc&) {
  } catch (const std::exception& e) {
    *why = std::string("SafetensorsFile: unexpected ") + typeid(e).name() + ": " + e.what();
    return Outcome::Failed;
  }
  try {
    const convcore::Net net = convcore::Net::load(path.string());
    loaded = true;
    (void)net.summary();
    std::vector<int64_t> shape = net.input_shape();
    int64_t numel = 1;
    for (int64_t d : shape) numel = (d > 0 && numel <= (1 << 20)) ? numel * d : (1 << 30);
    if (!shape.empty() && numel <= (1 << 16)) {  // a forward pass only where it is cheap
      shape.insert(shape.begin(), 1);
      convcore::Tensor x(net.dtype(), shape);
      std::memset(x.data(), 0, static_cast<size_t>(x.numel()) * convcore::dtype_size(net.dtype()));
      (void)net.forward(x);
    }
  } catch (const convcore::Error&) {
  } catch (const std::bad_alloc&) {
  } catch (const std::exception& e) {
    *why = std::string("Net: unexpected ") + typeid(e).name() + ": " + e.what();
    return Outcome::Failed;
  }
  return loaded ? Outcome::Loaded : Outcome::Refused;
}

}  // namespace

int main(int argc, char** argv) {
  double seconds = 20;
  long max_cases = -1;
  uint64_t seed = 1;
  fs::path save_dir;
  std::vector<fs::path> inputs;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--seconds" && i + 1 < argc) seconds = std::stod(argv[++i]);
    else if (a == "--cases" && i + 1 < argc) max_cases = std::stol(argv[++i]);
    else if (a == "--seed" && i + 1 < argc) seed = std::stoull(argv[++i]);
    else if (a == "--save" && i + 1 < argc) save_dir = argv[++i];
    else inputs.push_back(a);
  }
  std::vector<Bytes> seeds;
  for (const fs::path& p : inputs) {
    if (fs::is_directory(p)) {
      for (const auto& e : fs::directory_iterator(p))
        if (e.is_regular_file()) seeds.push_back(read_file(e.path()));
    } else {
      seeds.push_back(read_file(p));
    }
  }
  if (seeds.empty()) {
    std::fprintf(stderr, "usage: fuzz_load [--seconds S] [--cases N] [--seed K] [--save DIR] SEEDS...\n");
    return 2;
  }
  convcore::set_num_threads(1);  // many tiny cases: no thread wake-ups
  const fs::path tmp = fs::temp_directory_path() /
                       ("convcore_fuzz_load_" + std::to_string(::getpid()) + ".safetensors");
  Rng rng{seed * 0x9E3779B97F4A7C15ULL + 1};
  long cases = 0, loaded = 0, refused = 0, failed = 0;
  const auto start = std::chrono::steady_clock::now();
  auto elapsed = [&] {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  };
  // The seeds as they are first, then mutations.
  for (size_t i = 0;; ++i) {
    // every seed is replayed whatever the budget (a corpus from atheris is
    // a test set), then mutations run until the budget is spent
    if (i >= seeds.size() && (max_cases >= 0 ? cases >= max_cases : elapsed() >= seconds)) break;
    Bytes b = seeds[i % seeds.size()];
    if (i >= seeds.size()) mutate(b, seeds, rng);
    write_file(tmp, b);
    std::string why;
    const Outcome o = run_case(tmp, &why);
    ++cases;
    if (o == Outcome::Loaded) ++loaded;
    if (o == Outcome::Refused) ++refused;
    if (o == Outcome::Failed) {
      ++failed;
      std::fprintf(stderr, "case %ld: %s\n", cases, why.c_str());
      if (!save_dir.empty()) {
        fs::create_directories(save_dir);
        write_file(save_dir / ("case_" + std::to_string(cases) + ".safetensors"), b);
      }
    }
  }
  fs::remove(tmp);
  std::printf("fuzz_load: %ld cases in %.1f s (seed %llu): %ld loaded, %ld refused, %ld failed\n",
              cases, elapsed(), static_cast<unsigned long long>(seed), loaded, refused, failed);
  return failed ? 1 : 0;
}
