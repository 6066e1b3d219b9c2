// The save planner, as DCP's DefaultSavePlanner: every rank describes what it holds (a local
// plan), the plans are exchanged, and the global plan decides who writes what: replicated
// chunks (same key and offsets on several ranks) are written once, by the rank with the
// fewest bytes so far (DCP's dedup_save_plans), the chunks of each tensor are validated (in
// bounds, disjoint, covering it), and each rank's chunks are spread over its data files.
//
// Plain data, no libtorch and no collectives: the global plan is a pure function of the
// local plans, so every rank can compute it from the all-gathered plans and arrive at the
// same answer, and tests can simulate any number of ranks.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "core/base/result.h"
#include "core/checkpoint/manifest.h"
#include "core/tensor/dtype.h"

namespace dsd::checkpoint {

// One thing a rank could write: a chunk of a tensor, or a non-tensor value.
struct WriteItem {
  std::string key;
  Path path;
  Entry::Kind kind = Entry::Kind::kTensor;
  DType dtype = DType::kFloat32;
  std::vector<int64_t> global_shape;
  std::vector<int64_t> offsets;  // the chunk, in the global tensor
  std::vector<int64_t> sizes;
  std::string value_json;  // kValue: the value JSON, serialised

  // Bytes the item costs in DCP's balance: the chunk's bytes, or 1 for a value.
  uint64_t storage_bytes() const;
};

struct LocalPlan {
  int64_t rank = 0;
  std::vector<WriteItem> items;
  // Set by the coordinator (rank 0) only: the save id all ranks adopt.
  std::string save_id;
  std::optional<std::vector<int64_t>> mesh_shape;
  // Coordinator only: paths of the int-keyed dicts of the state dict.
  std::vector<Path> int_key_dicts;
  // Coordinator only: the first data file index the storage writer may use (DCP numbers its
  // files; a replaced checkpoint's names are not reused until the new one commits).
  int64_t first_file_index = 0;
};

struct FilePlan {
  std::string name;
  std::vector<size_t> items;  // indices into RankPlan::items, in write order
  uint64_t bytes = 0;
};

struct RankPlan {
  // The tensor chunks this rank writes: key, dtype, offsets and sizes. Path and global shape
  // are the manifest entry's; only the first chunk of each key still carries them.
  std::vector<WriteItem> items;
  std::vector<FilePlan> files;
};

// Where the saved value of a value entry came from: the rank chosen to write it and the
// value's position among that rank's value items (in its local plan's order). Plan caching
// (plan_cache.h) refreshes each value from the same rank.
struct ValueSource {
  size_t entry = 0;  // index into GlobalPlan::manifest.entries
  uint32_t rank = 0;
  uint32_t ordinal = 0;
};

struct GlobalPlan {
  std::string save_id;
  int64_t first_file_index = 0;  // the coordinator's
  // One per rank. A save with plan caching (plan_cache.h) leaves the other ranks' empty
  // on every rank but the coordinator: a rank's writer reads only its own.
  std::vector<RankPlan> ranks;
  // Entries in first-seen order, tensors without chunk locations yet (filled from the write
  // results), values with their value JSON.
  Manifest manifest;
  std::vector<ValueSource> value_sources;  // one per value entry, in entry order
};

struct PlanOptions {
  int files_per_rank = 1;
  // DCP's dedup_save_to_lowest_rank: replicated items go to the lowest rank instead of the
  // least loaded one.
  bool save_to_lowest_rank = false;
};

// The name of data file `index` of `rank` in save `save_id`: "<save_id>-<rank>-<index>.safetensors".
std::string data_file_name(std::string_view save_id, int64_t rank, int64_t index);
// Whether `name` has the shape of a dsd data file name (any save).
bool is_data_file_name(std::string_view name);
// Gives `plan` the save id `save_id`: its own, the manifest's and every data file's name
// (plan caching reuses a plan made for an earlier save).
void set_save_id(GlobalPlan& plan, const std::string& save_id);

// The global plan from every rank's local plan (indexed by rank). kInvalidArgument "Failed to
// validate global plan: ..." when chunks of a tensor leave its bounds, overlap or do not
// cover it, when ranks disagree on a key's dtype, shape or kind, or on the sizes of the chunk
// at the same offsets. A value held by several ranks may differ between them: the value of
// the rank chosen to write it is saved.
Result<GlobalPlan> create_global_plan(const std::vector<LocalPlan>& plans, const PlanOptions& options);

// create_global_plan one local plan at a time, as the plans are received or parsed: it keeps
// one copy of each chunk (a replicated chunk once, with the ranks that hold it) and the
// items' keys and shapes, never the N plans, so a coordinator of 16k ranks holds the unique
// chunks of the checkpoint instead of every rank's copy of every replicated one. The cost
// is linear in the items added (hashing), the validation of each tensor n log n in its chunks.
//
// Not thread-safe; one planner makes one global plan.
class GlobalPlanner {
 public:
  explicit GlobalPlanner(PlanOptions options);
  ~GlobalPlanner();
  GlobalPlanner(GlobalPlanner&&) noexcept;
  GlobalPlanner& operator=(GlobalPlanner&&) noexcept;

  // The plan of the next rank (0, 1, ... in order; plan.rank is not consulted). Errors as
  // create_global_plan for what the plans so far already show (kind, dtype, shape, chunk
  // sizes disagreeing); after an error the planner must not be used again.
  Status add(LocalPlan plan);
  // The global plan of the ranks added; errors as create_global_plan. Spends the planner.
  Result<GlobalPlan> finish();

 private:
  struct State;
  std::unique_ptr<State> s_;
};

// Local plans travel between ranks as JSON.
std::string local_plan_to_json(const LocalPlan& plan);
Result<LocalPlan> local_plan_from_json(std::string_view text);

}  // namespace dsd::checkpoint
