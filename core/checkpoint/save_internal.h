// Pieces of save() shared with async save and tests; not part of the public API.
#pragma once

#include <ATen/core/Tensor.h>

#include <string>
#include <unordered_map>
#include <vector>

#include "core/checkpoint/planner.h"
#include "core/statedict/flatten.h"
#include "core/statedict/value.h"

namespace dsd::checkpoint {

// Flat key -> the tensor this rank writes for it.
using SourceMap = std::unordered_map<std::string, at::Tensor>;

std::vector<PathItem> to_path_items(const Path& path);

// This rank's local plan: one item per tensor chunk it holds and per non-tensor value.
Result<LocalPlan> build_local_plan(const Dict& state_dict, int64_t rank, SourceMap& sources);

}  // namespace dsd::checkpoint
