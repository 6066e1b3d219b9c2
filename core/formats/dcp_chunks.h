// PyTorch DCP's `.distcp` data files, one item at a time.
//
// FileSystemWriter (serialization_format=TORCH_SAVE) appends each item to a `.distcp` file
// and records (relative_path, offset, length) in the metadata's StorageInfo:
// - a tensor chunk is a complete torch.save archive of that chunk alone (views are cloned
//   first, so the archive holds exactly the chunk's bytes);
// - a BYTE_IO item (any non-tensor value) is a torch.save archive of the Python object.
// With FileSystemWriter(..., _extensions=[ZStandard()]) each item's archive is written through
// a zstd compressor instead, and its StorageInfo lists the descriptor "stream.zstd/1"
// (`length` is then the compressed size). dsd reads such items by decompressing the range
// into memory; any other transform is refused (kUnsupported naming it), never misread.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <string_view>

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
// Errors: kUnsupported when the item has transform descriptors (a compressed item has no
// raw bytes in the file: read it with read_tensor_chunk), and those of torch_locate_tensor.
Result<TorchTensorRecord> locate_tensor_chunk(const std::string& path, const StorageInfo& info);

// The registry name of DCP's ZStandard stream transform.
inline constexpr std::string_view kZstdTransform = "stream.zstd";
// What a compressed BYTE_IO item may decompress to unless the caller knows better.
inline constexpr uint64_t kMaxDecompressedItemBytes = uint64_t{1} << 32;

// Reads the tensor chunk into a new CPU tensor, decompressing a "stream.zstd/1" item first
// (to at most `max_item_bytes`: the chunk's bytes plus the archive's records). Errors as
// torch_load; kWrongKind when the item is not a tensor; kUnsupported (naming the file and
// the descriptor) for any other transform; kCorrupt for a corrupt or truncated zstd stream
// or one that decompresses to more than `max_item_bytes`.
Result<at::Tensor> read_tensor_chunk(const std::string& path, const StorageInfo& info,
                                     uint64_t max_item_bytes = kMaxDecompressedItemBytes);

// Reads a BYTE_IO item into a Value (ints, floats, str, bytes, lists, tuples, dicts, None,
// bool; tensors too). Anything else is refused with the class named (kUnsupported).
// Transforms as read_tensor_chunk.
Result<Value> read_bytes_item(const std::string& path, const StorageInfo& info,
                              uint64_t max_item_bytes = kMaxDecompressedItemBytes);

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
