// Full vs sharded state dicts (PyTorch's _state_dict_utils): gathering distributed tensors
// into full ones, offloading to CPU, and slicing full tensors into local shards.
#pragma once

#include <ATen/core/Tensor.h>

#include "core/base/result.h"
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

}  // namespace dsd
