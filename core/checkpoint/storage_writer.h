// Storage writers: how a save lays a checkpoint out on disk, as DCP's StorageWriter. save()
// plans (save_planner.h) and agrees across ranks; a writer creates the files, commits and
// cleans up. Two implementations: the dsd format (safetensors data files + checkpoint.json)
// and PyTorch DCP's own (`.distcp` data files + pickled `.metadata`, as FileSystemWriter).
//
// Crash consistency is shared: data files are new files, the commit is the atomic rename of
// the metadata file (io.h write_file_atomic) after every rank's data files are fsynced, and
// the replaced checkpoint's files are removed only after the commit.
//
// Not thread-safe: one writer serves one save on one rank (its own write threads inside
// write_data aside).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "core/base/result.h"
#include "core/checkpoint/save.h"
#include "core/checkpoint/save_planner.h"

namespace dsd::checkpoint {

// Flat key -> the tensor this rank writes for it.
using SourceMap = std::unordered_map<std::string, at::Tensor>;

// What one rank wrote: the write results the coordinator commits from (JSON, exchanged), and
// this rank's share of SaveInfo.
struct WriteResult {
  std::string results;
  uint64_t bytes = 0;
  int files = 0;
  uint64_t bytes_referenced = 0;  // incremental saves: chunk bytes left in the base's files
};

class StorageWriter {
 public:
  // `path`: the checkpoint directory.
  StorageWriter(std::string path, const SaveOptions& options) : path_(std::move(path)), options_(options) {}
  virtual ~StorageWriter() = default;
  StorageWriter(const StorageWriter&) = delete;
  StorageWriter& operator=(const StorageWriter&) = delete;

  // Coordinator, before planning: creates the directory and refuses to replace a checkpoint
  // there without options.overwrite (kExists). Returns the first data file index the new
  // files may use (GlobalPlan::first_file_index).
  virtual Result<int64_t> prepare_storage() = 0;
  // Writes this rank's part of `plan` (RankPlan `rank`; the coordinator also writes what only
  // it holds). The files it creates are remembered for remove_created().
  virtual Result<WriteResult> write_data(const GlobalPlan& plan, int64_t rank, const SourceMap& sources) = 0;
  // Coordinator: commits the checkpoint from every rank's write results. When it returns
  // ok() the checkpoint is committed; on an error it is not.
  virtual Status finish(GlobalPlan& plan, const std::vector<std::string>& results) = 0;
  // Coordinator, after the ranks agreed on the commit: removes what the new checkpoint does
  // not reference (a replaced checkpoint, orphans of crashed saves). Best effort.
  virtual void remove_stale_files() = 0;
  // Removes the files this rank created (a save that did not commit). Best effort.
  void remove_created() const;

 protected:
  // Full paths of the files write_data created.
  virtual const std::vector<std::string>& created() const = 0;

  const std::string path_;
  const SaveOptions options_;
};

// The writers of options.format kDsd and kDcp.
std::unique_ptr<StorageWriter> make_dsd_storage_writer(const std::string& path, const SaveOptions& options);
std::unique_ptr<StorageWriter> make_dcp_storage_writer(const std::string& path, const SaveOptions& options);

// The tensor to write for a source: itself, or options.tensor_provider's data for a meta
// placeholder (conversions). kInvalidArgument for a meta tensor without a provider.
Result<at::Tensor> source_tensor(const at::Tensor& t, const std::string& key, const SaveOptions& options);

// Creates `path` and refuses (kExists) to replace a checkpoint of either format there
// without `overwrite`.
Status prepare_checkpoint_dir(const std::string& path, bool overwrite);

}  // namespace dsd::checkpoint
