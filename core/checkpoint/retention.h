// Retention that cannot break an incremental checkpoint: a checkpoint is deleted in two steps,
// each safe to be killed at any moment.
//
// 1. retire(): its manifest is renamed to `checkpoint.retired.json` (atomic; the directory is
//    then no checkpoint: it does not load, resume skips it, no save takes it as a base).
// 2. collect_garbage(): the data files of retired checkpoints that no live checkpoint of the
//    same parent directory references (reference counting through the live manifests) are
//    removed, and a retired directory none of whose files is referenced any more is removed
//    whole. A file a live checkpoint references stays, in its retired directory, until the
//    last checkpoint referencing it is retired.
//
// The references are counted from every live manifest before anything is removed, so a
// kill at any point leaves every live checkpoint loadable; what a killed pass left behind
// the next pass removes. Saves must not run concurrently with a pass that retires their base
// (the checkpoint manager runs retention after its own commit, on the saving thread).
#pragma once

#include <cstdint>
#include <set>
#include <string>
#include <string_view>
#include <vector>

#include "core/base/result.h"

namespace dsd::checkpoint {

inline constexpr std::string_view kRetiredManifestName = "checkpoint.retired.json";

// Retires the dsd checkpoint at `dir` (step 1 above). kNotFound when it holds no manifest.
Status retire(const std::string& dir);

// Whether `dir` is a retired checkpoint (a retired manifest and no live one).
bool is_retired(const std::string& dir);

// The names of the files of checkpoint directory `dir` that live checkpoints among its
// siblings reference (a save overwriting `dir` keeps them). Best effort: a sibling whose
// manifest does not read is skipped.
std::set<std::string> referenced_by_siblings(const std::string& dir);

struct GcReport {
  int64_t retired_removed = 0;      // retired directories removed whole
  int64_t files_removed = 0;        // data files removed from retired directories kept
  uint64_t bytes_removed = 0;       // bytes of every file removed
  std::vector<std::string> retired_kept;  // retired directories still referenced
};

// Step 2 above over the subdirectories of `root`. kIo when the root cannot be listed or a
// live manifest cannot be read (nothing is removed then: an unreadable manifest might
// reference anything).
Result<GcReport> collect_garbage(const std::string& root);

}  // namespace dsd::checkpoint
