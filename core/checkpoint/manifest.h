// The manifest, `checkpoint.json`: the commit marker and the index of a dsd checkpoint.
//
// Schema (format_version 1), one JSON object:
//   format          "dsd-checkpoint"
//   format_version  1, or 2 when a file lives in another checkpoint (an incremental save)
//   save_id         16 hex digits, random per save (also the prefix of every data file)
//   world_size      ranks at save time
//   mesh            {"shape": [..]} of the first distributed tensor's device mesh, or null
//   block_size      bytes per checksummed block (see ChunkRecord::blocks)
//   files           [{"name", "rank", "size"}]: data files, plain names in the directory;
//                   version 2 adds "checkpoint": the sibling checkpoint directory (a plain
//                   name in the same parent directory) that owns a file this checkpoint
//                   references instead of writing its bytes again (save.h's base)
//   int_key_dicts   [path...]: nested dicts whose keys stand for ints (restored by load_full)
//   entries         in save order, one per flat key:
//     {"key", "path": [str|int...], "kind": "tensor", "dtype": "float32", "shape": [..],
//      "chunks": [{"offsets", "sizes", "file", "begin", "end", "xxh3": "<16 hex>",
//                  "blocks": ["<16 hex>", ...]}]}
//     {"key", "path", "kind": "value", "value": <value JSON, see below>}
//
// Value JSON (lossless for every non-tensor leaf): null, true/false, JSON integers (int64),
// JSON floats (double; {"double": "nan"|"inf"|"-inf"} for the rest), JSON strings (UTF-8;
// {"string_b64": ..} otherwise), {"bytes": base64}, arrays (lists), {"tuple": [..]},
// {"dict": [[key, value], ..], "int_keys": bool} (ordered).
//
// Parsing reads untrusted bytes: everything is validated and a violation is kCorrupt naming
// the key or file. Pure C++ (no libtorch), fuzzable.
#pragma once

#include <cstdint>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "core/base/result.h"
#include "core/statedict/path.h"
#include "core/tensor/dtype.h"

namespace dsd::checkpoint {

inline constexpr std::string_view kManifestName = "checkpoint.json";
inline constexpr int kFormatVersion = 1;
// The version of a manifest that references files of another checkpoint.
inline constexpr int kFormatVersionReferences = 2;
inline constexpr uint64_t kDefaultBlockSize = 4u << 20;

struct ChunkRecord {
  std::vector<int64_t> offsets;  // in the global tensor
  std::vector<int64_t> sizes;
  std::string file;
  uint64_t begin = 0;  // absolute byte range of the chunk in `file`
  uint64_t end = 0;
  uint64_t xxh3 = 0;             // XXH3-64 of all the chunk's bytes
  std::vector<uint64_t> blocks;  // XXH3-64 of each block_size bytes from `begin` (last short)

  uint64_t nbytes() const { return end - begin; }
};

struct Entry {
  enum class Kind { kTensor, kValue };
  std::string key;
  Path path;
  Kind kind = Kind::kTensor;
  // Tensors.
  DType dtype = DType::kFloat32;
  std::vector<int64_t> shape;
  std::vector<ChunkRecord> chunks;
  // Values.
  nlohmann::json value;
};

struct FileRecord {
  std::string name;
  int64_t rank = 0;
  uint64_t size = 0;
  // Empty: a file of this checkpoint's directory. Otherwise the sibling checkpoint directory
  // (a plain name in the same parent) that owns it: this checkpoint references its bytes.
  std::string checkpoint;

  bool referenced() const { return !checkpoint.empty(); }
};

struct Manifest {
  int format_version = kFormatVersion;
  std::string save_id;
  int64_t world_size = 1;
  std::optional<std::vector<int64_t>> mesh_shape;
  uint64_t block_size = kDefaultBlockSize;
  std::vector<FileRecord> files;
  std::vector<Entry> entries;
  std::vector<Path> int_key_dicts;

  const Entry* find(std::string_view key) const;
  // The file record named `name`, or nullptr.
  const FileRecord* file(std::string_view name) const;
  // Whether any file lives in another checkpoint.
  bool has_references() const;
};

// Where a data file of the checkpoint in `dir` is: `dir/name`, or `dir/../checkpoint/name`
// for a referenced one (for messages; readers open it through descriptors, source.h).
std::string data_file_path(const std::string& dir, const FileRecord& f);

// A path as JSON: an array of strings (keys) and integers (indices), and back (nullopt for
// anything else, an integer beyond int64 included).
nlohmann::json path_to_json(const Path& path);
std::optional<Path> path_from_json(const nlohmann::json& j);

// Number of checksum blocks for `nbytes` (0 for an empty chunk).
uint64_t block_count(uint64_t nbytes, uint64_t block_size);

// Whether `name` is a plain file name: not empty, not "." or "..", no '/', no NUL.
bool is_plain_file_name(std::string_view name);

// Serialises a manifest (pretty-printed: operators read it).
std::string manifest_to_json(const Manifest& m);

// Parses and validates `checkpoint.json` text (see the schema above). `source` names the file
// in messages.
Result<Manifest> parse_manifest(std::string_view text, std::string_view source = kManifestName);

// Structural checks of a manifest built in memory or parsed: every rule parse_manifest
// applies beyond JSON syntax (chunks in bounds, not overlapping, covering each tensor,
// byte ranges inside their files and consistent with dtype × sizes, blocks).
Status validate_manifest(const Manifest& m);

// Checks that `v` is a well-formed value JSON (see above).
Status check_value_json(const nlohmann::json& v, std::string_view key);

}  // namespace dsd::checkpoint
