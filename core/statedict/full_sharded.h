// Full vs sharded state dicts (PyTorch's _state_dict_utils): gathering distributed tensors
// into full ones, offloading to CPU, and slicing full tensors into local shards.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>
#include <vector>

#include "core/base/result.h"
#include "core/dist/layout.h"
#include "core/statedict/value.h"

namespace dsd {

class Communicator;
class Layout;

// Replaces every distributed tensor of the tree by its full tensor (gathered from every rank
// that holds a piece), moving tensors to CPU when `cpu_offload`. With `rank0_only`, only rank
// 0 receives the result and other ranks return an empty dict (the collective still runs on
// all). `comm` may be null for a single process; `bucket_bytes` bounds the bytes gathered per
// collective (0: 64 MiB). Containers are copied; plain tensors pass through (aliased), or are
// moved to CPU.
Result<DictPtr> gather_state_dict(DictPtr state_dict, Communicator* comm, bool cpu_offload,
                                  bool rank0_only, uint64_t bucket_bytes);

// Every tensor moved to CPU (no copy for CPU tensors); distributed tensors stay distributed.
Result<DictPtr> offload_state_dict_to_cpu(DictPtr state_dict);

// This rank's shard of a full tensor under `layout`, as a view of `full`.
Result<at::Tensor> local_slice(const at::Tensor& full, const Layout& layout, std::string_view key);

// Where a load copies from: a tensor of the state dict being loaded (under
// broadcast_from_rank0, a meta placeholder of rank 0's tensor) or the box of it this rank
// holds, when a sharded destination takes its slice of a full tensor.
struct CopySource {
  at::Tensor tensor;
  std::optional<Chunk> box;
  at::Tensor view() const;  // `tensor`, narrowed to `box`
};

// Loading state-dict tensor `src` into registered tensor `dst`: the source, after checking
// global shapes agree (dtype, shape and read-only checks are the caller's). A sharded
// destination takes its box of a full source; two sharded tensors must share their layout.
Result<CopySource> copy_source(const TensorValue& dst, const TensorValue& src, const std::string& key);

struct CopyJob {
  at::Tensor dst;
  CopySource src;
  std::string what;  // for error messages
};

// Runs the jobs' copies (sources are real tensors).
Status run_copies(const std::vector<CopyJob>& jobs);

// broadcast_from_rank0: streams rank 0's `rank0_tensors` (empty elsewhere), whose shapes and
// dtypes are those of `placeholders`, in buckets of at most `bucket_bytes` (0: 64 MiB; larger
// tensors go in row ranges), and runs on every rank the jobs whose sources are placeholders.
// Peak memory per rank: the destinations plus one bucket.
Status broadcast_copies(Communicator& comm, const std::vector<at::Tensor>& rank0_tensors,
                        const std::vector<at::Tensor>& placeholders, const std::vector<CopyJob>& jobs,
                        uint64_t bucket_bytes);

}  // namespace dsd
