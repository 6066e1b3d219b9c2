// Pieces of save() shared with async save and tests; not part of the public API.
#pragma once

#include <ATen/core/Tensor.h>

#include <string>
#include <unordered_map>
#include <vector>

#include "core/checkpoint/planner.h"
#include "core/dist/comm.h"
#include "core/statedict/flatten.h"
#include "core/statedict/value.h"

namespace dsd::checkpoint {

// Flat key -> the tensor this rank writes for it.
using SourceMap = std::unordered_map<std::string, at::Tensor>;

std::vector<PathItem> to_path_items(const Path& path);

// save() with a status this rank brings in (an async staging failure): the error is agreed
// at the first collective step, so every rank fails the same way instead of hanging.
Result<struct SaveInfo> save_with_status(Communicator& comm, const Dict& state_dict,
                                         const std::string& path, const struct SaveOptions& options,
                                         Status incoming);

// A new random save id (16 hex digits).
std::string new_save_id();

// The tensor to write for a source: itself, or the provider's data for a meta placeholder.
Result<at::Tensor> source_tensor(const at::Tensor& t, const std::string& key, const struct SaveOptions& options);

// save_with_status() for options.format == kDcp (dcp_save.cpp).
Result<struct SaveInfo> save_dcp(Communicator& comm, const Dict& state_dict, const std::string& path,
                                 const struct SaveOptions& options, Status incoming);

// Whether `name` is a file of a DCP checkpoint (`.metadata`, `__<rank>.metadata`, `.distcp`
// data, or a temporary `.metadata` of an unfinished commit).
bool is_dcp_file_name(std::string_view name);

// This rank's local plan: one item per tensor chunk it holds and per non-tensor value.
Result<LocalPlan> build_local_plan(const Dict& state_dict, int64_t rank, SourceMap& sources);

}  // namespace dsd::checkpoint
