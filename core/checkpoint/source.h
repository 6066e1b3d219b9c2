// A checkpoint directory of either format the loader reads in place (a dsd checkpoint or a
// PyTorch DCP checkpoint), described the same way: a Manifest of entries (key, nested path,
// dtype, global shape, saved chunks). The load engine computes overlaps and reads byte
// ranges from this description whatever the format.
//
// For a DCP checkpoint the manifest is built from its `.metadata` (read by the restricted
// unpickler, which executes nothing): each chunk's `file` / `begin` / `end` are the item's
// whole torch.save archive inside its `.distcp` file, and there are no checksums. Before a
// chunk is read, locate_dcp_chunk() finds its raw bytes inside that archive.
#pragma once

#include <ATen/core/Tensor.h>

#include <map>
#include <memory>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "core/base/result.h"
#include "core/checkpoint/format_id.h"
#include "core/checkpoint/io.h"
#include "core/checkpoint/manifest.h"
#include "core/formats/dcp_metadata.h"
#include "core/statedict/value.h"

namespace dsd::checkpoint {

struct DcpIndex {
  dcp::Metadata metadata;  // as read (merged over `__<rank>.metadata` files)
  // The storage of each non-tensor value (BYTE_IO item), by flat key.
  std::unordered_map<std::string, dcp::StorageInfo> values;
  bool rank_local = false;  // read from `__<rank>.metadata` files (a save without collectives)
  // Items stored with stream transforms (DCP's ZStandard compression): (file, offset) -> the
  // item's transform descriptors. Their bytes are not in the file raw, so their chunks are
  // read whole (LocatedChunk::tensor).
  std::map<std::pair<std::string, int64_t>, std::vector<std::string>> transformed;
};

struct Source {
  Format format = Format::kDsd;  // kDsd or kDcp
  std::string dir;
  Manifest manifest;
  std::optional<DcpIndex> dcp;  // kDcp only
  // kDsd: every data file, opened once inside the directory when the source was opened and
  // checked against the manifest (manifest_validate.h); readers use these descriptors, never
  // the path again. Shared: a Source may be copied.
  std::shared_ptr<const std::map<std::string, File>> files;

  // Whether chunk byte ranges are checksummed (dsd) and can be read without locating (dsd).
  bool is_dsd() const { return format == Format::kDsd; }
};

struct OpenOptions {
  // dsd: follow a data file that is a symbolic link (to anywhere). Off, such a file is
  // refused (kCorrupt naming it): a checkpoint directory reads only its own files.
  bool allow_external_files = false;
};

// Opens the checkpoint directory `path`: checkpoint.json when there is one, else DCP
// metadata. A dsd checkpoint is validated whole (manifest_validate.h): the manifest, then
// each data file (opened relative to the directory, O_NOFOLLOW unless
// `options.allow_external_files`) against it. Errors: kNotFound (no committed checkpoint of
// either format, a missing data file), kCorrupt (a manifest, data file header or metadata
// that does not validate, a data file that is a link or not a regular file; naming the file
// and key), kUnsupported (a global outside the allow-list in `.metadata`, or storage that is
// not FileSystemWriter's), kIo.
Result<Source> open_source(const std::string& path, const OpenOptions& options = {});

// Builds the Source of a DCP checkpoint from its parsed metadata (tests build metadata in
// memory). Validates that every chunk lies inside its tensor, that every chunk and value has
// storage in a plain file of the directory, and that dtypes are ones dsd stores.
Result<Source> dcp_source(const std::string& dir, dcp::Metadata metadata, bool rank_local = false);

// Where the raw bytes of a DCP tensor chunk are: [begin, end) of `record.file`. When the
// saved chunk cannot be read raw (zstd-compressed, not contiguous, big-endian, conj/neg
// bits), `tensor` holds it instead, read whole as a contiguous CPU tensor. kCorrupt when the
// archive's tensor does not match the metadata (dtype, sizes) or lies outside its item, or a
// compressed item does not decompress; kUnsupported for a stream transform other than
// "stream.zstd/1" (naming the key and the descriptor).
struct LocatedChunk {
  uint64_t begin = 0;
  uint64_t end = 0;
  at::Tensor tensor;  // defined only for the fallback
};
Result<LocatedChunk> locate_dcp_chunk(const Source& source, const Entry& entry, const ChunkRecord& chunk);

// A non-tensor value of the checkpoint: from the manifest's value JSON (dsd) or its BYTE_IO
// item (DCP; read by the restricted torch.save reader).
Result<Value> read_source_value(const Source& source, const Entry& entry);

}  // namespace dsd::checkpoint
