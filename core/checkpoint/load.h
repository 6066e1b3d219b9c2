// Loading a checkpoint of either format, in place and with resharding (DCP's dcp.load), or
// into a new full state dict (DCP's _load_state_dict_from_keys). The load planner
// (load_planner.h) decides what to read, the storage reader (storage_reader.h) reads it.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "core/base/result.h"
#include "core/checkpoint/manifest.h"
#include "core/checkpoint/source.h"
#include "core/dist/comm.h"
#include "core/statedict/value.h"

namespace dsd::checkpoint {

struct LoadOptions {
  // A key of the state dict missing from the checkpoint is an error (kNotFound naming it);
  // otherwise it is left as it is and reported.
  bool strict = true;
  // Reader threads; 0 picks min(8, cores per local rank) (checkpoint/pool.h).
  int thread_count = 0;
  // Check the block checksums of every byte read (kCorrupt naming file and key on mismatch).
  bool verify = true;
  // Follow data files that are symbolic links (source.h's OpenOptions); off, they are refused.
  bool allow_external_files = false;
  // Cooperative load at world > 1 (cooperative_load.h): a tensor every rank loads whole is
  // read from storage by one rank and broadcast to the others. kAcrossHosts (the default)
  // does it when the ranks run on more than one host: ranks of one host share its page
  // cache, and there reading is cheaper than a broadcast (world 4 on one host, 256 MiB
  // replicated on tmpfs: 0.19 s read by every rank vs 0.52 s broadcast over Gloo). kAlways
  // does it on one host too; kNever never. Used only when every rank asks for it (kAlways on
  // one host: every rank asks kAlways); otherwise every rank reads all it needs itself.
  enum class Cooperative { kAcrossHosts, kAlways, kNever };
  Cooperative cooperative = Cooperative::kAcrossHosts;
  // Upper bound of one cooperative broadcast (rounded down to whole checksum blocks); a rank
  // stages at most two buckets at a time.
  uint64_t cooperative_bucket_bytes = 64u << 20;
};

struct LoadReport {
  std::vector<std::string> missing_keys;     // in the state dict, not in the checkpoint
  std::vector<std::string> unexpected_keys;  // in the checkpoint, not in the state dict
  std::vector<std::string> skipped_keys;     // left untouched (the missing keys, when !strict)
  uint64_t bytes_read = 0;                   // data bytes this rank read from storage
  uint64_t bytes_received = 0;               // data bytes broadcast to it by other ranks
};

// Reads and validates `path`/checkpoint.json. kNotFound when the directory holds no
// committed checkpoint.
Result<Manifest> read_manifest(const std::string& path);

// Loads the checkpoint at `path` (a dsd checkpoint, or a PyTorch DCP checkpoint: `.metadata`
// or rank-local `__<rank>.metadata`, `.distcp` chunks read raw from inside their torch.save
// archives, non-tensor values through the restricted torch.save reader) into `state_dict`, in place: every tensor (whole, or this
// rank's chunk of a distributed tensor, at any world size or layout) receives the saved
// bytes of its region; non-tensor leaves are replaced by the saved values. Tensors every rank
// loads whole are read from storage once in all and broadcast (LoadOptions::cooperative,
// cooperative_load.h). Collective; an error on one rank fails every rank. Errors: kNotFound (missing key when strict, no
// checkpoint), kShapeMismatch / kDtypeMismatch (naming key, saved and current), kWrongKind (a
// tensor saved where a value is expected or the reverse), kReadOnly, kCorrupt (checksum,
// truncated or malformed file, naming file and key), kIo, kComm.
Result<LoadReport> load(Communicator& comm, Dict& state_dict, const std::string& path,
                        const LoadOptions& options = {});

// A new nested state dict of full CPU tensors and values, without a communicator (either
// format; a DCP checkpoint's nesting comes from its planner_data). `keys`
// (empty: all) selects flat keys, or any dotted prefix of their nested path ("model" selects
// "model.layer.weight"). kNotFound when a requested key matches nothing.
Result<DictPtr> load_full(const std::string& path, std::span<const std::string> keys = {},
                          const LoadOptions& options = {});

// One tensor entry of an opened checkpoint (open_source) as a new full CPU tensor, assembled
// from all its saved chunks: how conversions stream a checkpoint tensor by tensor. Errors as
// load_full.
Result<at::Tensor> read_full_tensor(const Source& source, const Entry& entry, const LoadOptions& options = {});

}  // namespace dsd::checkpoint
