// The base of an incremental save (SaveOptions::base): the checkpoint whose chunks a save
// references instead of writing their bytes again when they are unchanged.
//
// A chunk is referenced when the base holds a chunk of the same key, dtype, offsets and sizes
// whose bytes are the chunk's: its XXH3-64 and every block hash (ChunkHasher, computed from
// the state dict's bytes) equal the base's record, and a byte compare against the base's file
// confirms it. The compare is exact (no 64-bit collision can ever reuse wrong bytes), and
// checks the base's file as it is now: a base file damaged since its save differs from the
// state dict, so that chunk is written again instead of referenced. It stops at the first
// differing step, so a changed tensor costs one step of reading; an unchanged one costs a read
// of bytes the base's save usually left in the page cache, instead of a durable write.
//
// References never chain: a chunk the base itself references is referenced where its bytes
// are (the checkpoint that owns them), so an incremental checkpoint depends only on the
// checkpoints that own its files, each a sibling directory (manifest.h, format version 2).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>

#include "core/base/result.h"
#include "core/checkpoint/io.h"
#include "core/checkpoint/manifest.h"
#include "core/checkpoint/save_planner.h"

namespace dsd::checkpoint {

// A chunk of the new checkpoint that lives in the base's file `file` (a record of the new
// manifest's "files": its name, rank, size and owning checkpoint directory).
struct ReferencedChunk {
  ChunkRecord record;
  FileRecord file;
};

class BaseCheckpoint {
 public:
  // Opens the dsd checkpoint `base` for a save into `target`: its manifest, read and
  // validated (data files are opened when first compared). kInvalidArgument when `base` is
  // `target` itself or not a sibling directory of it (the same physical parent: references
  // are plain names of sibling directories); kNotFound when there is no dsd checkpoint at
  // `base` (a DCP checkpoint is kInvalidArgument: only dsd checkpoints can be referenced).
  static Result<std::shared_ptr<BaseCheckpoint>> open(const std::string& base, const std::string& target);

  const std::string& dir() const { return dir_; }
  const Manifest& manifest() const { return manifest_; }

  // The reference for `item` when the base holds the same chunk with the same bytes as
  // `data` (the item's tensor, any device), else nullopt. `block_size` is the new save's:
  // a base with another block size references nothing. Thread-safe. Errors only from
  // reading `data` (a device copy); a base file that cannot be read or differs is nullopt.
  Result<std::optional<ReferencedChunk>> reference(const WriteItem& item, const at::Tensor& data,
                                                   uint64_t block_size) const;

 private:
  struct Candidate {
    const ChunkRecord* chunk;
    const FileRecord* file;
    DType dtype;
  };

  // The base's data file `f`, opened once (inside the owning directory, no links).
  Result<const File*> data_file(const FileRecord& f) const;

  std::string dir_;
  std::string name_;  // the base directory's own name, which owns its unreferenced files
  std::string target_name_;  // the new checkpoint's directory name, which a reference never names
  Manifest manifest_;
  // (key, offsets) -> the base's chunk.
  std::map<std::pair<std::string, std::vector<int64_t>>, Candidate> chunks_;
  mutable std::mutex mu_;
  mutable std::unordered_map<std::string, std::unique_ptr<File>> files_;
  mutable std::unordered_map<std::string, std::unique_ptr<File>> dirs_;
};

}  // namespace dsd::checkpoint
