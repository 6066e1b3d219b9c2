// CheckpointManager: a root directory of step checkpoints (`step_<N>`), keep-last-N
// retention, a `latest` pointer file, and resume from the newest complete checkpoint.
//
// A step directory is complete when its manifest is committed; incomplete ones (a crash
// during a save) are skipped on resume and removed by retention once a newer checkpoint
// commits. `latest` (written atomically, containing "step_<N>\n") moves only after a
// commit; resume does not trust it blindly: it takes the newest step directory whose
// manifest reads back.
//
// Incremental (SaveOptions::incremental): each save references the unchanged chunks of the
// newest complete step before it (SaveOptions::base), and retention is reference-counted
// (retention.h): a step that leaves the last N is retired, and its files go only when no kept
// step references them.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "core/base/result.h"
#include "core/checkpoint/async_save.h"
#include "core/checkpoint/load.h"
#include "core/checkpoint/save.h"

namespace dsd::checkpoint {

inline constexpr std::string_view kLatestName = "latest";

class CheckpointManager {
 public:
  // `keep_last` <= 0 keeps every checkpoint.
  CheckpointManager(std::string root, int keep_last);

  const std::string& root() const { return root_; }
  std::string step_path(int64_t step) const;

  // Saves step `step` (collective), then on the coordinator moves `latest` and applies
  // retention. kExists if that step is already saved (unless options.overwrite).
  Result<SaveInfo> save(Communicator& comm, const Dict& state_dict, int64_t step,
                        const SaveOptions& options = {});
  // The same through an async checkpointer: `latest` and retention follow the commit on the
  // background thread.
  Result<std::shared_ptr<SaveFuture>> save_async(AsyncCheckpointer& saver, const Dict& state_dict,
                                                 int64_t step, const SaveOptions& options = {});

  // Steps whose checkpoint is complete, ascending.
  Result<std::vector<int64_t>> complete_steps() const;
  // The newest complete step, if any.
  Result<std::optional<int64_t>> latest_step() const;
  // Loads the newest complete step into `state_dict`; nullopt when there is none.
  Result<std::optional<int64_t>> load_latest(Communicator& comm, Dict& state_dict,
                                             const LoadOptions& options = {},
                                             LoadReport* report = nullptr) const;

 private:
  Status after_commit(Communicator& comm, int64_t step) const;
  // `options` with the base an incremental save of `step` takes.
  SaveOptions options_for(int64_t step, const SaveOptions& options) const;
  // The newest complete step before `step`, or "" (collective).
  Result<std::string> choose_base(Communicator& comm, int64_t step) const;

  std::string root_;
  int keep_last_;
};

// The step of a "step_<N>" directory name.
std::optional<int64_t> parse_step_dir(std::string_view name);

}  // namespace dsd::checkpoint
