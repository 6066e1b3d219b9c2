// PyTorch DCP's `.distcp` data files, one item at a time.
//
// FileSystemWriter (serialization_format=TORCH_SAVE) appends each item to a `.distcp` file
// and records (relative_path, offset, length) in the metadata's StorageInfo:
// - a tensor chunk is a complete torch.save archive of that chunk alone (views are cloned
//   first, so the archive holds exactly the chunk's bytes);
// - a BYTE_IO item (any non-tensor value) is a torch.save archive of the Python object.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>

#include "core/base/result.h"
#include "core/formats/dcp_metadata.h"
#include "core/formats/torch_save.h"
#include "core/statedict/value.h"

namespace dsd::dcp {

// Where the raw bytes of the tensor chunk `info` describes lie in the file `path` (a
// `.distcp` file; `info.relative_path` is not consulted), without reading them:
// `storage_data_offset` is absolute in the file. A loader reads `numel * element_size`
// bytes from `storage_data_offset + storage_offset * element_size` straight into a
// destination when `is_contiguous()` and not `big_endian` / `conj` / `neg` (what DCP
// writes); otherwise it falls back to read_tensor_chunk.
// Errors: kUnsupported when the item has transform descriptors (compression), and those of
// torch_locate_tensor.
Result<TorchTensorRecord> locate_tensor_chunk(const std::string& path, const StorageInfo& info);

// Reads the tensor chunk into a new CPU tensor. Errors as torch_load; kWrongKind when the
// item is not a tensor.
Result<at::Tensor> read_tensor_chunk(const std::string& path, const StorageInfo& info);

// Reads a BYTE_IO item into a Value (ints, floats, str, bytes, lists, tuples, dicts, None,
// bool; tensors too). Anything else is refused with the class named (kUnsupported).
Result<Value> read_bytes_item(const std::string& path, const StorageInfo& info);

// Writes `tensor` as one tensor item: a torch.save archive holding only the tensor's own
// bytes, as DCP's writer does. A contiguous CPU tensor is written straight from its memory;
// others are copied (made contiguous, moved to the CPU) first. Returns the item's length.
// `options.compute_crc32 = false` saves a pass over the data; torch.load does not check it.
Result<uint64_t> write_tensor_chunk(const at::Tensor& tensor, const ByteSink& sink,
                                    const TorchSaveOptions& options = {});

// Writes `value` as a BYTE_IO item (torch.save of it) and returns the item's length.
// Errors as torch_save.
Result<uint64_t> write_bytes_item(const Value& value, const ByteSink& sink, const TorchSaveOptions& options = {});

}  // namespace dsd::dcp
