// safetensors: the header of a .safetensors file, parsed from untrusted bytes and written.
//
// Layout (https://github.com/huggingface/safetensors): an 8-byte little-endian header length
// N, N bytes of UTF-8 JSON mapping each tensor name to {dtype, shape, data_offsets:[begin,
// end]} (offsets relative to the data area) plus an optional "__metadata__" string->string
// map, then the data area. Like the safetensors library, dsd accepts a file only when the
// data offsets tile the data area exactly (sorted, no gap, no overlap, ending at the end of
// the file), so every file dsd accepts is one the library accepts and the other way round.
//
// Pure C++ (no libtorch) so it can be fuzzed on its own.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "core/base/result.h"
#include "core/tensor/dtype.h"

namespace dsd::safetensors {

// The safetensors library's own cap on the JSON header.
inline constexpr uint64_t kMaxHeaderBytes = 100'000'000;
inline constexpr uint64_t kLengthPrefixBytes = 8;

struct TensorEntry {
  std::string name;
  DType dtype = DType::kFloat32;
  std::vector<int64_t> shape;
  uint64_t begin = 0;  // data_offsets, relative to the start of the data area
  uint64_t end = 0;

  uint64_t nbytes() const { return end - begin; }
};

struct Header {
  std::vector<TensorEntry> tensors;  // in data-offset order
  std::map<std::string, std::string> metadata;  // "__metadata__"
  uint64_t data_start = 0;  // absolute file offset of the data area: 8 + header length
};

// The header length from the file's first 8 bytes. kCorrupt when fewer than 8 bytes are
// given, when the length is 0, exceeds kMaxHeaderBytes or runs past `file_size`.
Result<uint64_t> parse_header_length(std::span<const std::byte> first_bytes, uint64_t file_size);

// Parses the JSON header (`json`, the N bytes after the length prefix) of a file of
// `file_size` bytes. Every violation is kCorrupt with a message naming the tensor: invalid
// JSON or not an object, JSON nested deeper than 8 levels, a name repeated in one object, an entry that is not {dtype, shape, data_offsets}, an unknown
// dtype, a negative or overflowing shape, shape × element size != data_offsets length,
// offsets outside the data area, overlapping or leaving gaps, a non string->string
// "__metadata__".
Result<Header> parse_header(std::string_view json, uint64_t file_size);

// Both steps over a whole file held in memory (tests, fuzzing).
Result<Header> parse_file(std::span<const std::byte> file);

// Reads and parses the header of an open file descriptor (the file name is for messages).
Result<Header> read_header(int fd, std::string_view file_name);

// The bytes that start a file: length prefix + JSON, padded with spaces to a multiple of 8
// as the safetensors library pads it. `tensors` must tile [0, total) in order (their
// begin/end are written as given); names must be unique and UTF-8. `metadata` may be empty
// (no "__metadata__" key is written then).
Result<std::string> write_header(std::span<const TensorEntry> tensors,
                                 const std::map<std::string, std::string>& metadata);

// Whether `s` is valid UTF-8 (JSON strings must be).
bool is_valid_utf8(std::string_view s);

}  // namespace dsd::safetensors
