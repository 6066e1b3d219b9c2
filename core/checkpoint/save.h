// Saving a state dict as a dsd checkpoint (DESIGN.md "Checkpoint format (v1)").
//
// Collective when the communicator has more than one rank: every rank calls save() with its
// own state dict (its shards of distributed tensors, and whatever it holds of the rest) and
// the same path; an error on any rank fails the call on every rank.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <string>

#include "core/base/result.h"
#include "core/checkpoint/format_id.h"
#include "core/checkpoint/manifest.h"
#include "core/dist/comm.h"
#include "core/statedict/value.h"

namespace dsd::checkpoint {

struct RankPlan;  // save_planner.h

struct SaveOptions {
  // Replace an existing checkpoint at the path. Its files are removed only after the new
  // manifest is committed, so a failed save leaves it intact. Without it: kExists.
  bool overwrite = false;
  // Writer threads per rank, each writing its own data file; 0 picks min(4, cores per
  // local rank): the cores this process may use divided among the ranks on its machine
  // (LOCAL_WORLD_SIZE or OMPI_COMM_WORLD_LOCAL_SIZE), see checkpoint/pool.h.
  int thread_count = 0;
  // DCP's dedup_save_to_lowest_rank.
  bool save_to_lowest_rank = false;
  // Bytes per checksummed block (a power of two >= 4 KiB).
  uint64_t block_size = kDefaultBlockSize;
  // fsync every data file before the commit (turn off only for throwaway checkpoints).
  bool sync_files = true;
  // What is written: a dsd checkpoint (checkpoint.json + safetensors data files), or a
  // PyTorch DCP checkpoint (`.metadata` + `__<rank>_<k>.distcp`, which dcp.load reads at any
  // world size). Other formats are kInvalidArgument.
  Format format = Format::kDsd;
  // DCP's enable_plan_caching: reuse the global plan of an earlier save over the same
  // communicator whose structure fingerprint (every rank's items, options, world) is the same.
  bool enable_plan_caching = false;
  // Async saves (AsyncCheckpointer::save_async): the most bytes of host staging buffers; a
  // larger state is staged in waves, each copied into buffers freed by tensors already
  // written, and save_async returns once the last wave is copied (0: no cap). Ignored by
  // save(), which stages nothing: it writes from the state dict's own tensors (device ones
  // through a bounded host buffer).
  uint64_t max_staging_bytes = 0;
  // An incremental save: the path of a dsd checkpoint in the same parent directory (the
  // previous step) whose unchanged chunks are referenced instead of written again
  // (base_checkpoint.h; the manifest then has format version 2). The new checkpoint needs
  // the base's files to load; a checkpoint manager's retention keeps them
  // (retention.h). Empty: every chunk is written. The dsd format only. Chunks whose data a
  // tensor_provider supplies (capped async staging in waves) are always written.
  std::string base;
  // Checkpoint manager saves: the base is the newest complete step before this one (none for
  // the first). A plain save() with it and no base is kInvalidArgument.
  bool incremental = false;
  // Set by the checkpoint manager for incremental saves: chooses the base when the save
  // starts (collective, every rank; "" for none).
  std::function<Result<std::string>(Communicator& comm)> choose_base;
  // Conversions: tensors of the state dict on the meta device are placeholders, and this
  // supplies each one's data (a CPU tensor of the same dtype and shape) when it is written,
  // so a save holds at most one tensor per writer thread. Called from writer threads.
  std::function<Result<at::Tensor>(const std::string& key, const at::Tensor& placeholder)> tensor_provider;
  // Called on the saving thread with this rank's part of the global plan (the tensor chunks
  // it writes, file by file in write order) once every rank agreed to write, before it
  // writes: the async checkpointer stages a capped state in waves from it.
  std::function<void(const RankPlan& plan)> on_write_plan;
};

struct SaveInfo {
  std::string save_id;
  uint64_t bytes_written = 0;  // by this rank, data files only
  int files_written = 0;       // by this rank
  // Whether the save reused the global plan of an earlier save (enable_plan_caching; the
  // same on every rank).
  bool plan_cached = false;
  uint64_t bytes_referenced = 0;  // by this rank: chunk bytes referenced in the base (SaveOptions::base)
};

// Crash consistency: data files are new files named after the save id, the manifest is
// replaced atomically (core/checkpoint/io.h write_file_atomic; storage_writer.h) only after every rank's data
// files are fsynced, and the replaced checkpoint's files are removed only after that. A crash
// or kill of any rank at any moment leaves the directory holding the previous checkpoint or
// the new one, complete; never a mix, never a partial one that loads. A failure reported
// after the coordinator committed (a peer died while hearing of the commit) leaves the new
// checkpoint in place. Files of a failed save that could not safely be removed (another rank
// may have been committing) are removed by the next successful save to the same directory.
// core/checkpoint/crash_point.h names the moments the crash tests kill a rank at.
//
// Saves `state_dict` to the directory `path` (created if needed), in options.format. Tensors may live on CPU or
// CUDA (copied through a bounded host buffer); non-tensor leaves go into the manifest.
// Errors: kExists (a checkpoint is there and !overwrite), kNoSpace (disk full or file size
// limit), kIo, kInvalidArgument (plans that do not validate), kUnsupported (a tensor inside a
// tuple leaf), kComm.
Result<SaveInfo> save(Communicator& comm, const Dict& state_dict, const std::string& path,
                      const SaveOptions& options = {});

// save() with a status this rank brings in (the async checkpointer's staging failure): the
// error is agreed at the first collective step, so every rank fails the same way instead of
// hanging.
Result<SaveInfo> save_with_status(Communicator& comm, const Dict& state_dict, const std::string& path,
                                  const SaveOptions& options, Status incoming);

}  // namespace dsd::checkpoint
