// Distributed tensors (DTensor's from_local): this rank's local tensor plus a Layout, checked
// once where they are made, so every caller (the C ABI, C++ trainers, the libtorch adapters)
// gets the same check and message.
#pragma once

#include <ATen/core/Tensor.h>

#include <memory>
#include <optional>
#include <string_view>

#include "core/base/result.h"
#include "core/dist/layout.h"
#include "core/statedict/value.h"

namespace dsd {

// The box this rank's local tensor must have: the layout's local chunk, with ndim sizes and
// offsets even when this rank is not part of the mesh (then all zeros: it holds nothing),
// where PyTorch's compute_local_shape_and_global_offset reports shape (0,) and no offsets.
Chunk local_box(const Layout& layout);

// `local` (this rank's tensor; its read_only flag is kept, a layout it has is replaced) with
// `layout` as a distributed tensor. kShapeMismatch naming `key` (or "the tensor" without
// one) when the local tensor's shape is not its local box, unless both hold nothing.
Result<TensorValue> make_dist_tensor(TensorValue local, std::shared_ptr<const Layout> layout,
                                     std::optional<std::string_view> key = std::nullopt);

}  // namespace dsd
