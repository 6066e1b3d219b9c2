// The load planner, as DCP's DefaultLoadPlanner: which saved chunks every destination of
// this rank overlaps (its ReadItems), checked against the checkpoint's entries first, and,
// for each overlap, the byte runs that go from the saved chunk into the destination (DCP's
// create_read_items_for_chunk_list). Nothing here reads a file: the storage reader
// (storage_reader.h) carries the plan out.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "core/base/result.h"
#include "core/checkpoint/load.h"
#include "core/checkpoint/manifest.h"
#include "core/checkpoint/source.h"
#include "core/dist/layout.h"
#include "core/statedict/path.h"
#include "core/statedict/value.h"

namespace dsd::checkpoint {

// Where a local chunk is read to: the tensor itself, or a contiguous CPU staging tensor that
// is copied into it afterwards (GPU, strided or conjugated destinations).
struct LoadTarget {
  std::string key;
  at::Tensor tensor;
  at::Tensor staging;  // undefined when reading straight into `tensor`
  Chunk local;
  char* base = nullptr;
};

// A saved chunk a destination overlaps: DCP's ReadItem (the byte runs come from add_runs).
struct ReadItem {
  const Entry* entry;
  const ChunkRecord* chunk;
  const LoadTarget* target;
};

// What a rank loads: its destinations (ReadItems point into `targets`, whose elements do
// not move), and the non-tensor values, already read, to put at their paths.
struct LoadPlan {
  std::vector<LoadTarget> targets;
  std::vector<ReadItem> items;
  std::vector<std::pair<Path, Value>> values;
};

// The plan for loading `source` into `state_dict` in place (LoadOptions::strict, the keys
// in `report`). Errors as load() (load.h), before anything is read.
Result<LoadPlan> create_load_plan(const Source& source, Dict& state_dict, const std::string& path, bool strict,
                                  LoadReport& report);

// Checks a state-dict tensor against its saved entry and prepares where it is read to.
Result<LoadTarget> make_load_target(const std::string& key, const TensorValue& tv, const Entry& e);
// A new full CPU tensor for a saved entry, read straight into.
Result<LoadTarget> full_load_target(const Entry& e);
// The ReadItems of one destination: every saved chunk of `e` it overlaps.
void add_read_items(const Entry& e, const LoadTarget& t, std::vector<ReadItem>& items);
// The saved chunks of one entry indexed for overlap queries: sorted along the dimension with
// the most distinct chunk starts, with the running maximum of their ends, so a destination
// finds its chunks by binary search in O(log n + hits) instead of scanning all n. Worth it
// when many destinations query one entry (planning the reads of every rank of a reshard, as
// the scale benchmark does); a rank's own load scans (add_read_items above), n per entry.
// Borrows `e`, which must outlive the index.
class ChunkIndex {
 public:
  explicit ChunkIndex(const Entry& e);
  // The ReadItems of `t`: every non-empty saved chunk it overlaps, in the entry's order (as
  // add_read_items gives them).
  void add_read_items(const LoadTarget& t, std::vector<ReadItem>& items) const;

 private:
  const Entry* entry_;
  size_t dim_ = 0;
  std::vector<uint32_t> order_;     // non-empty chunks by start along dim_
  std::vector<int64_t> starts_;     // their starts along dim_
  std::vector<int64_t> max_end_;    // running maximum of their ends along dim_
};

// Whether a saved chunk and a destination chunk share an element.
bool chunks_intersect(const ChunkRecord& saved, const Chunk& local);

// A contiguous byte run of a saved chunk and where it lands.
struct Run {
  uint64_t src;  // byte offset inside the saved chunk
  uint64_t len;
  char* dst;
};

// The byte runs of one (saved, local) overlap, appended to `runs`; `base` is where the local
// chunk starts in memory (row-major, `esize` bytes per element).
void add_runs(const ChunkRecord& saved, const Chunk& local, char* base, uint64_t esize, std::vector<Run>& runs);

}  // namespace dsd::checkpoint
