// The safetensors reader and writer. The checks and their messages follow
// python/convcore/io.py (_parse), so a file is refused for the same reasons,
// in the same words, from C++ and from Python.
#include "convcore/safetensors.h"

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <random>
#include <sstream>
#include <system_error>

#include "convcore/errors.h"
#include "json.h"

namespace convcore {

namespace {

struct DTypeInfo {
  const char* name;
  std::size_t size;
};

// In the order the Python reader lists them.
constexpr DTypeInfo kDTypes[] = {
    {"F64", 8}, {"F32", 4}, {"F16", 2}, {"BF16", 2}, {"I64", 8}, {"I32", 4}, {"I16", 2},
    {"I8", 1},  {"U64", 8}, {"U32", 4}, {"U16", 2},  {"U8", 1},  {"BOOL", 1},
};

std::string known_dtypes() {
  std::string s;
  for (const auto& d : kDTypes) s += (s.empty() ? "" : ", ") + std::string(d.name);
  return s;
}

[[noreturn]] void bad(const std::string& path, const std::string& what) {
  throw ValueError("cannot load " + json::repr(path, 4096) + ": " + what);
}

std::string shape_list(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

bool host_is_little_endian() {
  const uint16_t one = 1;
  unsigned char first;
  std::memcpy(&first, &one, 1);
  return first == 1;
}

uint64_t read_le64(const unsigned char* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

// Reverses the bytes of each element (for a big-endian host).
void swap_bytes(unsigned char* data, std::size_t count, std::size_t item) {
  if (item < 2) return;
  for (std::size_t i = 0; i < count; ++i) std::reverse(data + i * item, data + (i + 1) * item);
}

float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1Fu;
  uint32_t mant = h & 0x3FFu;
  uint32_t bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;  // +-0
    } else {      // subnormal: normalise
      int e = -1;
      do {
        ++e;
        mant <<= 1;
      } while ((mant & 0x400u) == 0);
      bits = sign | (static_cast<uint32_t>(127 - 15 - e) << 23) | ((mant & 0x3FFu) << 13);
    }
  } else if (exp == 0x1F) {
    bits = sign | 0x7F800000u | (mant << 13);  // inf / nan
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// Reads exactly n bytes at offset, or throws naming the file.
void read_at(std::ifstream& in, const std::string& path, uint64_t offset, void* dst, uint64_t n) {
  if (n == 0) return;
  in.clear();
  in.seekg(static_cast<std::streamoff>(offset));
  in.read(static_cast<char*>(dst), static_cast<std::streamsize>(n));
  if (!in || static_cast<uint64_t>(in.gcount()) != n)
    bad(path, "could not read " + std::to_string(n) + " bytes at offset " +
                  std::to_string(offset) + " (the file is shorter than when it was opened?)");
}

std::ifstream open_stream(const std::string& path) {
  std::error_code ec;
  const auto status = std::filesystem::status(path, ec);
  if (ec || !std::filesystem::exists(status))
    throw Error("cannot open " + json::repr(path, 4096) + ": no such file");
  if (!std::filesystem::is_regular_file(status))
    throw Error("cannot open " + json::repr(path, 4096) + ": not a regular file");
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error("cannot open " + json::repr(path, 4096) + ": " + std::strerror(errno));
  return in;
}

// The first invalid UTF-8 sequence of `text`, described as CPython's codec
// does ("'utf-8' codec can't decode byte 0xe5 in position 3070: invalid
// continuation byte"), or "" when the text is valid UTF-8.
std::string utf8_error(const std::string& text) {
  const std::size_t n = text.size();
  auto byte = [&](std::size_t i) { return static_cast<unsigned char>(text[i]); };
  for (std::size_t i = 0; i < n;) {
    const unsigned char c = byte(i);
    if (c < 0x80) {
      ++i;
      continue;
    }
    std::size_t len = 0;
    unsigned char lo = 0x80, hi = 0xBF;  // the range of the second byte
    if (c >= 0xC2 && c <= 0xDF) len = 2;
    else if (c >= 0xE0 && c <= 0xEF) len = 3, lo = c == 0xE0 ? 0xA0 : 0x80, hi = c == 0xED ? 0x9F : 0xBF;
    else if (c >= 0xF0 && c <= 0xF4) len = 4, lo = c == 0xF0 ? 0x90 : 0x80, hi = c == 0xF4 ? 0x8F : 0xBF;
    std::string reason;
    std::size_t good = 1;  // bytes of the sequence that are fine so far
    if (len == 0) {
      reason = "invalid start byte";
    } else {
      for (; good < len; ++good) {
        if (i + good >= n) {
          reason = "unexpected end of data";
          break;
        }
        const unsigned char d = byte(i + good);
        if (good == 1 ? (d < lo || d > hi) : (d < 0x80 || d > 0xBF)) {
          reason = "invalid continuation byte";
          break;
        }
      }
      if (reason.empty()) {
        i += len;
        continue;
      }
    }
    char buf[160];
    if (good == 1)
      std::snprintf(buf, sizeof buf, "'utf-8' codec can't decode byte 0x%02x in position %zu: %s",
                    static_cast<unsigned>(c), i, reason.c_str());
    else
      std::snprintf(buf, sizeof buf, "'utf-8' codec can't decode bytes in position %zu-%zu: %s", i,
                    i + good - 1, reason.c_str());
    return buf;
  }
  return "";
}

}  // namespace

std::size_t safetensors_dtype_size(const std::string& dtype) {
  for (const auto& d : kDTypes)
    if (dtype == d.name) return d.size;
  return 0;
}

SafetensorsFile SafetensorsFile::open(const std::string& path) {
  std::ifstream in = open_stream(path);
  std::error_code ec;
  const uint64_t size = std::filesystem::file_size(path, ec);
  if (ec) throw Error("cannot open " + json::repr(path, 4096) + ": " + ec.message());
  return from_reader(path, size, [&](uint64_t offset, void* dst, uint64_t n) {
    read_at(in, path, offset, dst, n);
  });
}

SafetensorsFile SafetensorsFile::parse(const std::string& path, const void* data, uint64_t size) {
  return from_reader(path, size, [&](uint64_t offset, void* dst, uint64_t n) {
    std::memcpy(dst, static_cast<const unsigned char*>(data) + offset, static_cast<std::size_t>(n));
  });
}

SafetensorsFile SafetensorsFile::from_reader(
    const std::string& path, uint64_t size,
    const std::function<void(uint64_t, void*, uint64_t)>& read) {
  SafetensorsFile file;
  file.path_ = path;
  file.file_size_ = size;

  if (size < 8)
    bad(path, "truncated file: " + std::to_string(size) +
                  " bytes, fewer than the 8-byte header length");
  unsigned char len_bytes[8];
  read(0, len_bytes, 8);
  const uint64_t n = read_le64(len_bytes);
  if (n > kMaxSafetensorsHeaderBytes)
    bad(path, "bad header length " + std::to_string(n) + " (more than the " +
                  std::to_string(kMaxSafetensorsHeaderBytes) +
                  "-byte limit; not a safetensors file, or a corrupt one)");
  if (n > size - 8)
    bad(path, "bad header length " + std::to_string(n) + ": only " + std::to_string(size - 8) +
                  " bytes follow it (truncated file?)");
  if (n < 2) bad(path, "bad header length " + std::to_string(n) + ": too short for a JSON object");
  std::string text(static_cast<std::size_t>(n), '\0');
  read(8, &text[0], n);

  const std::string invalid = utf8_error(text);
  if (!invalid.empty()) bad(path, "the header is not valid UTF-8 (" + invalid + ")");
  const std::size_t first = text.find_first_not_of(" \t\n\r");
  if (first == std::string::npos || text[first] != '{') bad(path, "the header is not a JSON object");
  json::Value header;
  try {
    header = json::parse(text);
  } catch (const json::ParseError& e) {
    bad(path, std::string("the header is not valid JSON (") + e.what() + ")");
  }
  if (!header.is_object()) bad(path, "the header is not a JSON object");

  const uint64_t data_start = 8 + n;
  const uint64_t data_len = size - data_start;
  file.data_start_ = data_start;

  for (const auto& member : header.members) {
    const std::string& name = member.first;
    const json::Value& info = member.second;
    if (name == "__metadata__") {
      if (info.is_null()) continue;
      if (!info.is_object()) bad(path, "__metadata__ must be an object of string values");
      for (const auto& kv : info.members) {
        if (!kv.second.is_string())
          bad(path, "__metadata__[" + json::repr(kv.first) + "] is not a string");
        file.metadata_[kv.first] = kv.second.string;
      }
      continue;
    }
    const std::string where = "tensor " + json::repr(name);
    if (!info.is_object()) bad(path, where + ": its header entry is not an object");
    std::vector<std::string> missing;
    for (const char* key : {"dtype", "shape", "data_offsets"})
      if (!info.find(key)) missing.push_back(key);
    if (!missing.empty()) {
      std::string list = "[";
      for (std::size_t i = 0; i < missing.size(); ++i)
        list += (i ? ", '" : "'") + missing[i] + "'";
      bad(path, where + ": the header entry lacks " + list + "]");
    }
    const json::Value& dtype = *info.find("dtype");
    const json::Value& shape = *info.find("shape");
    const json::Value& offsets = *info.find("data_offsets");
    if (!dtype.is_string() || safetensors_dtype_size(dtype.string) == 0)
      bad(path, where + ": unknown dtype " +
                    (dtype.is_string() ? json::repr(dtype.string) : json::short_repr(dtype)) +
                    " (known: " + known_dtypes() + ")");
    bool shape_ok = shape.is_array();
    for (std::size_t i = 0; shape_ok && i < shape.items.size(); ++i)
      shape_ok = shape.items[i].is_int() && shape.items[i].integer >= 0;
    if (!shape_ok)
      bad(path, where + ": shape must be a list of non-negative ints, got " +
                    json::short_repr(shape));
    if (shape.items.size() > static_cast<std::size_t>(kMaxSafetensorsDims))
      bad(path, where + ": " + std::to_string(shape.items.size()) + " dimensions (at most " +
                    std::to_string(kMaxSafetensorsDims) + ")");
    SafetensorsEntry e;
    e.name = name;
    e.dtype = dtype.string;
    for (const auto& d : shape.items) {
      if (d.integer >= (int64_t{1} << 62))
        bad(path, where + ": shape " + json::short_repr(shape) +
                      " has an impossibly large dimension");
      e.shape.push_back(d.integer);
    }
    if (!offsets.is_array() || offsets.items.size() != 2 || !offsets.items[0].is_int() ||
        !offsets.items[1].is_int())
      bad(path, where + ": data_offsets must be [begin, end] ints, got " +
                    json::short_repr(offsets));
    const int64_t begin = offsets.items[0].integer, end = offsets.items[1].integer;
    const std::string range = "[" + std::to_string(begin) + ", " + std::to_string(end) + "]";
    if (!(0 <= begin && begin <= end)) bad(path, where + ": bad data_offsets " + range);
    if (static_cast<uint64_t>(end) > data_len)
      bad(path, where + ": data_offsets " + range + " run past the end of the data (" +
                    std::to_string(data_len) + " bytes; truncated file?)");
    // Elements and bytes, in 64 bits with overflow checks: a shape whose size
    // overflows cannot match a byte range that lies inside the file.
    int64_t count = 1;
    bool overflow = false;
    for (int64_t d : e.shape) overflow = overflow || __builtin_mul_overflow(count, d, &count);
    int64_t nbytes = 0;
    overflow = overflow || __builtin_mul_overflow(
                               count, static_cast<int64_t>(safetensors_dtype_size(e.dtype)), &nbytes);
    if (overflow)
      bad(path, where + ": shape " + shape_list(e.shape) + " of " + e.dtype +
                    " needs more bytes than fit in 64 bits but data_offsets " + range + " hold " +
                    std::to_string(end - begin));
    if (nbytes != end - begin)
      bad(path, where + ": shape " + shape_list(e.shape) + " of " + e.dtype + " needs " +
                    std::to_string(nbytes) + " bytes but data_offsets " + range + " hold " +
                    std::to_string(end - begin));
    e.begin = static_cast<uint64_t>(begin);
    e.end = static_cast<uint64_t>(end);
    e.numel = count;
    file.entries_.push_back(std::move(e));
  }

  // The data must be covered exactly once: no overlaps, no holes.
  std::vector<const SafetensorsEntry*> order;
  for (const auto& e : file.entries_)
    if (e.end > e.begin) order.push_back(&e);
  std::sort(order.begin(), order.end(), [](const SafetensorsEntry* a, const SafetensorsEntry* b) {
    return a->begin != b->begin ? a->begin < b->begin : a->end < b->end;
  });
  uint64_t pos = 0;
  for (const SafetensorsEntry* e : order) {
    if (e->begin < pos)
      bad(path, "tensor " + json::repr(e->name) + ": data_offsets [" + std::to_string(e->begin) +
                    ", " + std::to_string(e->end) + "] overlap another tensor's bytes");
    if (e->begin > pos)
      bad(path, "bytes " + std::to_string(pos) + ".." + std::to_string(e->begin) +
                    " of the data belong to no tensor");
    pos = e->end;
  }
  if (pos != data_len)
    bad(path, std::to_string(data_len - pos) + " bytes after the last tensor belong to no tensor");
  return file;
}

const SafetensorsEntry* SafetensorsFile::find(const std::string& name) const {
  for (const auto& e : entries_)
    if (e.name == name) return &e;
  return nullptr;
}

Tensor SafetensorsFile::read(const std::string& name) const {
  const SafetensorsEntry* e = find(name);
  if (!e) bad(path_, "no tensor " + json::repr(name) + " in the file");
  return read(*e);
}

Tensor SafetensorsFile::read(const SafetensorsEntry& e) const {
  const std::string where = "tensor " + json::repr(e.name);
  if (e.shape.size() > static_cast<std::size_t>(kMaxDims))
    bad(path_, where + " has " + std::to_string(e.shape.size()) +
                   " dimensions; convcore tensors have at most " + std::to_string(kMaxDims));
  std::ifstream in = open_stream(path_);
  const uint64_t offset = data_start_ + e.begin, nbytes = e.end - e.begin;
  const std::size_t item = safetensors_dtype_size(e.dtype);
  const bool little = host_is_little_endian();

  if (e.dtype == "F32" || e.dtype == "F64" || e.dtype == "I64") {
    const DType dt = e.dtype == "F32" ? DType::Float32
                     : e.dtype == "F64" ? DType::Float64
                                        : DType::Int64;
    Tensor t = Tensor::empty(dt, e.shape);
    read_at(in, path_, offset, t.data(), nbytes);
    if (!little) swap_bytes(static_cast<unsigned char*>(t.data()), t.numel(), item);
    return t;
  }

  std::vector<unsigned char> raw(static_cast<std::size_t>(nbytes));
  read_at(in, path_, offset, raw.data(), nbytes);
  if (!little) swap_bytes(raw.data(), static_cast<std::size_t>(e.numel), item);
  const std::size_t n = static_cast<std::size_t>(e.numel);

  if (e.dtype == "F16" || e.dtype == "BF16") {
    Tensor t = Tensor::empty(DType::Float32, e.shape);
    float* dst = t.data_as<float>();
    for (std::size_t i = 0; i < n; ++i) {
      uint16_t h;
      std::memcpy(&h, raw.data() + 2 * i, 2);
      if (e.dtype == "BF16") {
        const uint32_t bits = static_cast<uint32_t>(h) << 16;
        std::memcpy(&dst[i], &bits, 4);
      } else {
        dst[i] = half_to_float(h);
      }
    }
    return t;
  }

  Tensor t = Tensor::empty(DType::Int64, e.shape);
  int64_t* dst = t.data_as<int64_t>();
  const unsigned char* p = raw.data();
  for (std::size_t i = 0; i < n; ++i, p += item) {
    if (e.dtype == "I32") {
      int32_t v;
      std::memcpy(&v, p, 4);
      dst[i] = v;
    } else if (e.dtype == "I16") {
      int16_t v;
      std::memcpy(&v, p, 2);
      dst[i] = v;
    } else if (e.dtype == "I8") {
      int8_t v;
      std::memcpy(&v, p, 1);
      dst[i] = v;
    } else if (e.dtype == "U64") {
      uint64_t v;
      std::memcpy(&v, p, 8);
      if (v > static_cast<uint64_t>(INT64_MAX))
        bad(path_, where + " (U64) holds " + std::to_string(v) + ", beyond the int64 range");
      dst[i] = static_cast<int64_t>(v);
    } else if (e.dtype == "U32") {
      uint32_t v;
      std::memcpy(&v, p, 4);
      dst[i] = v;
    } else if (e.dtype == "U16") {
      uint16_t v;
      std::memcpy(&v, p, 2);
      dst[i] = v;
    } else if (e.dtype == "U8") {
      dst[i] = *p;
    } else {  // BOOL
      dst[i] = *p != 0;
    }
  }
  return t;
}

void save_safetensors(const std::string& path,
                      const std::vector<std::pair<std::string, TensorView>>& tensors,
                      const std::map<std::string, std::string>& metadata) {
  struct Item {
    std::string name;
    const char* dtype;
    std::vector<int64_t> shape;
    TensorView view;
    uint64_t begin = 0, end = 0;
  };
  std::vector<Item> items;
  for (const auto& nt : tensors) {
    const TensorView& v = nt.second;
    if (nt.first == "__metadata__")
      throw ValueError("save_safetensors: '__metadata__' is reserved by the format");
    for (const auto& it : items)
      if (it.name == nt.first)
        throw ValueError("save_safetensors: two tensors are named " + json::repr(nt.first));
    if (v.ndim < 0 || v.ndim > kMaxDims)
      throw ValueError("save_safetensors: tensor " + json::repr(nt.first) + " has a bad ndim");
    Item it;
    it.name = nt.first;
    it.dtype = v.dtype == DType::Float32 ? "F32" : v.dtype == DType::Float64 ? "F64" : "I64";
    it.shape.assign(v.shape, v.shape + v.ndim);
    it.view = v;
    items.push_back(std::move(it));
  }
  // 8-byte dtypes first, so that every tensor starts at a multiple of its item size.
  std::vector<std::size_t> order(items.size());
  for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) {
    return dtype_size(items[a].view.dtype) > dtype_size(items[b].view.dtype);
  });
  uint64_t pos = 0;
  for (std::size_t i : order) {
    Item& it = items[i];
    const uint64_t nbytes =
        static_cast<uint64_t>(it.view.numel()) * dtype_size(it.view.dtype);
    it.begin = pos;
    it.end = pos + nbytes;
    pos += nbytes;
  }
  std::string head = "{";
  bool first = true;
  if (!metadata.empty()) {
    head += "\"__metadata__\":{";
    for (const auto& kv : metadata) {
      head += (first ? "" : ",") + json::quote(kv.first) + ":" + json::quote(kv.second);
      first = false;
    }
    head += "}";
    first = false;
  }
  for (const Item& it : items) {
    head += (first ? "" : ",") + json::quote(it.name) + ":{\"dtype\":\"" + it.dtype +
            "\",\"shape\":" + shape_list(it.shape) + ",\"data_offsets\":[" +
            std::to_string(it.begin) + "," + std::to_string(it.end) + "]}";
    first = false;
  }
  head += "}";
  try {  // names and metadata must make valid JSON (UTF-8 text)
    json::parse(head);
  } catch (const json::ParseError& e) {
    throw ValueError(std::string("save_safetensors: tensor names and metadata must be valid "
                                 "UTF-8 text (") + e.what() + ")");
  }
  head.append((8 - head.size() % 8) % 8, ' ');

  std::random_device rd;
  const std::string tmp = path + ".tmp" + std::to_string(rd());
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) throw Error("cannot write " + json::repr(tmp, 4096) + ": " + std::strerror(errno));
    unsigned char len[8];
    uint64_t n = head.size();
    for (int i = 0; i < 8; ++i, n >>= 8) len[i] = static_cast<unsigned char>(n & 0xFF);
    out.write(reinterpret_cast<const char*>(len), 8);
    out.write(head.data(), static_cast<std::streamsize>(head.size()));
    const bool little = host_is_little_endian();
    for (std::size_t i : order) {
      const Item& it = items[i];
      if (it.view.numel() == 0) continue;
      Tensor copy;
      const void* data = it.view.data;
      if (!it.view.is_contiguous() || !little) {
        copy = Tensor::from_view(it.view);
        if (!little)
          swap_bytes(static_cast<unsigned char*>(copy.data()), copy.numel(),
                     dtype_size(copy.dtype()));
        data = copy.data();
      }
      out.write(static_cast<const char*>(data), static_cast<std::streamsize>(it.end - it.begin));
    }
    out.flush();
    if (!out) {
      std::remove(tmp.c_str());
      throw Error("cannot write " + json::repr(tmp, 4096) + " (disk full?)");
    }
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    const std::string why = std::strerror(errno);
    std::remove(tmp.c_str());
    throw Error("cannot write " + json::repr(path, 4096) + ": " + why);
  }
}

}  // namespace convcore
