// The tensors of a torch.save pickle (internal to formats/): what a `_rebuild_tensor_v2/v3`
// call (or a Parameter / _rebuild_from_type_v2 around one) describes, checked, and the
// arithmetic of its storage extent and byte order.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "core/base/result.h"
#include "core/formats/pickle.h"
#include "core/tensor/dtype.h"

namespace dsd {

// A storage as a persistent id names it: ("storage", class, key, location, numel).
struct StorageRef {
  std::string key;
  std::optional<DType> typed;  // the legacy storage class's dtype; nullopt for UntypedStorage
  uint64_t nbytes = 0;
};

// What a `_rebuild_tensor_v2/v3` call describes.
struct TensorCall {
  StorageRef storage;
  DType dtype = DType::kFloat32;
  int64_t storage_offset = 0;
  std::vector<int64_t> sizes;
  std::vector<int64_t> strides;
  bool conj = false;
  bool neg = false;
};

// The tensor a pickled call rebuilds; nullopt when `o` is not a tensor rebuild. Errors for
// malformed calls and for tensor kinds dsd does not read (quantized, sparse, subclasses).
Result<std::optional<TensorCall>> as_tensor_call(const PickleObject& o);
// The dims of a torch.Size(...) call, or null.
const std::vector<PickleValue>* torch_size_dims(const PickleObject& o);
// The bytes the tensor reaches into its storage: (offset + sum((size-1)*stride) + 1) elements;
// 0 for an empty tensor. Checked against overflow.
Result<uint64_t> tensor_extent_bytes(const TensorCall& c);
// Swaps each element of `data` from big- to little-endian, `width` bytes at a time.
void byteswap(char* data, uint64_t nbytes, size_t width);
// The width byteswap() swaps for `dtype` (complex numbers part by part).
size_t swap_width(DType dtype);

}  // namespace dsd
