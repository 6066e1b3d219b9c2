// A state dict's skeleton: its whole structure with every non-tensor value, and each tensor
// reduced to its dtype and shape. What rank 0 broadcasts before streaming tensors
// (broadcast_from_rank0), instead of a pickle: decoding it executes nothing.
#pragma once

#include <ATen/core/Tensor.h>

#include <string>
#include <string_view>
#include <vector>

#include "core/base/result.h"
#include "core/statedict/value.h"

namespace dsd {

// Encodes `root`; the tensors met, in order, are appended to `tensors` (may be null).
// Distributed tensors are refused: a skeleton describes a full state dict.
Result<std::string> encode_skeleton(const Dict& root, std::vector<at::Tensor>* tensors);

// Decodes a skeleton into a Dict whose tensors are meta-device placeholders of the encoded
// dtypes and shapes (no memory), appended in order to `placeholders` (may be null). Hostile
// bytes give kCorrupt.
Result<DictPtr> decode_skeleton(std::string_view bytes, std::vector<at::Tensor>* placeholders);

}  // namespace dsd
