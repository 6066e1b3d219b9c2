// verify: the integrity of a checkpoint of either format, without loading it.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "core/base/result.h"
#include "core/checkpoint/source.h"

namespace dsd::checkpoint {

struct VerifyProblem {
  std::string file;
  std::string key;
  std::string message;
};

// Reads every chunk of the checkpoint and checks its chunk and block checksums; one problem
// per damaged chunk (empty when intact). A DCP checkpoint, which has no checksums of its own,
// is checked for what can be: every chunk located inside its archive and matching the
// metadata, all its bytes readable, every value parsed, the chunks tiling each tensor.
// Errors only when the manifest (or DCP metadata) itself is unusable.
// `progress`, when set, receives (bytes checked, total bytes) as chunks finish, never
// concurrently. `thread_count` 0 picks min(8, cores per local rank) (pool.h).
// The checkpoint is opened (and validated: manifest_validate.h) with `options`; a manifest or
// data file header that does not validate is an error, not a problem.
Result<std::vector<VerifyProblem>> verify(const std::string& path, int thread_count = 0,
                                          const std::function<void(uint64_t, uint64_t)>& progress = {},
                                          const OpenOptions& options = {});

}  // namespace dsd::checkpoint
