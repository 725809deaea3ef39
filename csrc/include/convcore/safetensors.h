// Reading and writing safetensors files, the format convcore.save() writes:
// an 8-byte little-endian header length N, N bytes of UTF-8 JSON (tensor
// name -> {"dtype", "shape", "data_offsets"}, plus "__metadata__": str -> str),
// then the raw little-endian C-order tensor bytes.
//
// The reader never trusts the file. open() checks the header length, the
// JSON (strictly), every dtype, shape and byte range against the file's size,
// 64-bit overflow of every size, and that the tensors cover the data exactly
// once (no overlaps, no holes), before anything is read or allocated. Every
// problem is a ValueError "cannot load '<path>': <what>", as in the Python
// reader (python/convcore/io.py).
#pragma once
#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "convcore/tensor.h"

namespace convcore {

// The same bound as the Python reader and the safetensors reference
// implementation: a longer header is a corrupt length, not a real file.
constexpr uint64_t kMaxSafetensorsHeaderBytes = 100000000;
// Dimensions a header may give a tensor (convcore tensors have at most kMaxDims).
constexpr int kMaxSafetensorsDims = 32;

struct SafetensorsEntry {
  std::string name;
  std::string dtype;           // "F32", "F64", "F16", "BF16", "I64", ..., "U8", "BOOL"
  std::vector<int64_t> shape;  // may be empty: a scalar
  uint64_t begin = 0, end = 0;  // byte range in the data section
  int64_t numel = 0;
};

// Bytes per element of a safetensors dtype name, 0 if unknown.
std::size_t safetensors_dtype_size(const std::string& dtype);

class SafetensorsFile {
 public:
  // Reads and validates the header (not the tensor data). Error if the file
  // cannot be opened; ValueError naming the file and the fault if it is
  // malformed.
  static SafetensorsFile open(const std::string& path);
  // The same checks on a file's bytes held in memory (size bytes at data),
  // naming `path` in the messages; read() then reads from `path`.
  static SafetensorsFile parse(const std::string& path, const void* data, uint64_t size);

  const std::string& path() const { return path_; }
  // In the header's order.
  const std::vector<SafetensorsEntry>& entries() const { return entries_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  // nullptr when there is no tensor of that name.
  const SafetensorsEntry* find(const std::string& name) const;

  // Reads one tensor: F32, F64 and I64 as they are; F16 and BF16 widened to
  // float32 (as the Python reader widens BF16); the other integer types and
  // BOOL as int64. ValueError for an unknown name, more than kMaxDims
  // dimensions, or a file that has become shorter since open().
  Tensor read(const std::string& name) const;
  Tensor read(const SafetensorsEntry& entry) const;

  uint64_t file_size() const { return file_size_; }
  uint64_t data_start() const { return data_start_; }

 private:
  static SafetensorsFile from_reader(const std::string& path, uint64_t size,
                                     const std::function<void(uint64_t, void*, uint64_t)>& read);

  std::string path_;
  std::vector<SafetensorsEntry> entries_;
  std::map<std::string, std::string> metadata_;
  uint64_t file_size_ = 0, data_start_ = 0;
};

// Writes tensors (float32 as F32, float64 as F64, int64 as I64; any strides)
// and str -> str metadata as a safetensors file, atomically (a temporary file
// renamed over `path`). 8-byte dtypes come first in the data so that every
// tensor is aligned to its item size.
void save_safetensors(const std::string& path,
                      const std::vector<std::pair<std::string, TensorView>>& tensors,
                      const std::map<std::string, std::string>& metadata = {});

}  // namespace convcore
