// PyTorch Distributed Checkpoint's `.metadata` file <-> plain C++ structs.
//
// DCP writes its Metadata dataclass with a plain `pickle.dump` and reads it with
// `pickle.load`. dsd reads it with the restricted unpickler (only the DCP dataclasses,
// torch.Size, dtypes, layouts, memory-format encodings, pathlib paths and a few builtins may
// appear; nothing is executed) and writes a protocol-2 pickle that PyTorch's
// FileSystemReader.read_metadata() and dcp.load accept.
//
// The structs mirror torch/distributed/checkpoint/metadata.py and filesystem.py (2.13) field
// by field, in the dsd::dcp namespace so the names stay PyTorch's. No libtorch needed.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <variant>
#include <vector>

#include "core/base/result.h"
#include "core/formats/pickle.h"
#include "core/statedict/path.h"
#include "core/tensor/dtype.h"

namespace dsd::dcp {

// A rectangular box of a tensor: `offsets` into the global tensor and `sizes`, per dim.
struct ChunkStorageMetadata {
  std::vector<int64_t> offsets;
  std::vector<int64_t> sizes;
  bool operator==(const ChunkStorageMetadata&) const = default;
};

// Everything but dtype is deprecated in PyTorch; the rest is kept for exact round trips.
struct TensorProperties {
  DType dtype = DType::kFloat32;
  std::string layout = "torch.strided";
  bool requires_grad = false;
  // _MEM_FORMAT_ENCODING: 0 contiguous, 1 channels_last, 2 preserve.
  int64_t memory_format = 0;
  bool pin_memory = false;
  bool operator==(const TensorProperties&) const = default;
};

struct TensorStorageMetadata {
  TensorProperties properties;
  std::vector<int64_t> size;  // the global shape
  std::vector<ChunkStorageMetadata> chunks;
  bool operator==(const TensorStorageMetadata&) const = default;
};

// A non-tensor value, saved as a torch.save'd object (a BYTE_IO item).
struct BytesStorageMetadata {
  bool operator==(const BytesStorageMetadata&) const = default;
};

using StorageMetadata = std::variant<TensorStorageMetadata, BytesStorageMetadata>;

// The key of a stored item: its flat key, plus the chunk's offsets for tensors. `index` is
// only a lookup hint; PyTorch's equality and hash use (fqn, offset).
struct MetadataIndex {
  std::string fqn;
  std::optional<std::vector<int64_t>> offset;
  std::optional<int64_t> index;
  bool operator==(const MetadataIndex&) const = default;
};

// Where an item's bytes are: `length` bytes at `offset` of `relative_path` (a `.distcp` file
// of the checkpoint directory). For a tensor those bytes are a whole torch.save archive.
struct StorageInfo {
  std::string relative_path;
  int64_t offset = 0;
  int64_t length = 0;
  // Stream transforms (compression...) applied when writing; none by default.
  std::optional<std::vector<std::string>> transform_descriptors;
  bool operator==(const StorageInfo&) const = default;
};

struct StorageMeta {
  std::optional<std::string> checkpoint_id;  // a str or pathlib path in PyTorch
  std::optional<std::string> save_id;
  std::optional<std::string> load_id;
  std::vector<std::string> modules;
  bool operator==(const StorageMeta&) const = default;
};

struct Metadata {
  // Flat key -> what was saved under it, in the order PyTorch wrote them.
  std::vector<std::pair<std::string, StorageMetadata>> state_dict_metadata;
  // The default planner's flatten mapping: flat key -> path into the nested state dict.
  // nullopt when the file's planner_data is None or of another shape (a custom planner's).
  std::optional<std::vector<std::pair<std::string, Path>>> planner_data;
  std::vector<std::pair<MetadataIndex, StorageInfo>> storage_data;
  std::optional<StorageMeta> storage_meta;
  std::optional<std::string> version;  // "1.0.0" from FileSystemWriter
  bool operator==(const Metadata&) const = default;
};

// What the writer of PyTorch 2.13's FileSystemWriter puts in Metadata.version.
inline constexpr std::string_view kCurrentVersion = "1.0.0";

// The globals a `.metadata` pickle may name.
const PickleAllowList& metadata_allow_list();

// Parses the bytes of a `.metadata` file (borrowed for the call). Reads what PyTorch 2.x
// writes: protocols 2-5, dataclasses pickled with NEWOBJ (or copyreg._reconstructor) + BUILD,
// TensorProperties as its 5-tuple state (or an older dict state), layouts as
// `torch.serialization._get_layout(name)` or a `torch.<layout>` global, checkpoint ids as str
// or pathlib paths.
// Errors: kUnsupported for a global outside metadata_allow_list() (named "module.name"),
// kDtypeMismatch for a dtype dsd does not store, kCorrupt for a bad pickle or a field of the
// wrong shape (the message names the field and the key).
Result<Metadata> parse_metadata(std::string_view bytes);

// The same from an already unpickled tree (for callers that read the pickle themselves).
Result<Metadata> metadata_from_pickle(const PickleValue& root);

// Writes `metadata` as a protocol-2 pickle of the PyTorch classes, as PyTorch lays them out
// (a MetadataIndex without offset has no "offset" field; a StorageInfo without transforms has
// no "transform_descriptors" field). Shared keys, paths and field names are memoised.
// Errors: kInvalidArgument for strings that are not UTF-8.
Result<std::string> serialize_metadata(const Metadata& metadata);
PickleValue metadata_to_pickle(const Metadata& metadata);

}  // namespace dsd::dcp
