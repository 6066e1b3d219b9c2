// A state dict's skeleton: its whole structure with every non-tensor value, and each tensor
// reduced to its dtype and shape. What rank 0 broadcasts before streaming tensors
// (broadcast_from_rank0), instead of a pickle: decoding it executes nothing.
#pragma once

#include <ATen/core/Tensor.h>

#include <string>
#include <string_view>
#include <vector>

#include "core/base/result.h"
#include "core/dist/comm.h"
#include "core/statedict/value.h"

namespace dsd {

// Encodes `root`; the tensors met, in order, are appended to `tensors` (may be null).
// Distributed tensors are refused: a skeleton describes a full state dict.
Result<std::string> encode_skeleton(const Dict& root, std::vector<at::Tensor>* tensors);

// Decodes a skeleton into a Dict whose tensors are meta-device placeholders of the encoded
// dtypes and shapes (no memory), appended in order to `placeholders` (may be null). Hostile
// bytes give kCorrupt.
Result<DictPtr> decode_skeleton(std::string_view bytes, std::vector<at::Tensor>* placeholders);

// Rank 0's state dict as every rank plans against it under broadcast_from_rank0: the
// skeleton, whose placeholders the tensor stream then fills from rank 0's tensors.
struct RankZeroSkeleton {
  DictPtr root;                          // the decoded skeleton (every rank)
  std::vector<at::Tensor> rank0_tensors;  // rank 0: the tensors of its `root`, in order
  std::vector<at::Tensor> placeholders;   // the skeleton's placeholders, in the same order
};
// Collective over `comm`: rank 0 encodes `root` (other ranks' `root` is not read) and
// broadcasts it; an encoding error on rank 0 fails every rank.
Result<RankZeroSkeleton> broadcast_skeleton(Communicator& comm, const Dict& root);

}  // namespace dsd
