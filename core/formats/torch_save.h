// torch.save's zip format, read into a Value tree and written from one, without Python and
// without executing pickle.
//
// A torch.save file is a zip archive (libtorch's PyTorchStreamReader/Writer) holding
// `<archive>/data.pkl` (a protocol-2 pickle of the object, tensors as
// `torch._utils._rebuild_tensor_v2/_v3` calls on persistent-id storages), one record
// `<archive>/data/<key>` per storage, and `.format_version`, `.storage_alignment`,
// `byteorder`, `version`, `.data/serialization_id`.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

#include "core/base/result.h"
#include "core/formats/pickle.h"
#include "core/statedict/value.h"
#include "core/tensor/dtype.h"

namespace dsd {

// Where an archive's bytes are: a whole file, a byte range of a file (a DCP `.distcp` chunk),
// or memory. All three borrow: `path` / `bytes` must outlive the call.
struct TorchArchive {
  std::string_view path;   // a file, or empty for `bytes`
  uint64_t offset = 0;     // with `path`: where the archive starts
  uint64_t length = UINT64_MAX;  // with `path`: its size; UINT64_MAX means "to the end"
  std::string_view bytes;  // the archive itself when `path` is empty

  static TorchArchive file(std::string_view path) { return {path, 0, UINT64_MAX, {}}; }
  static TorchArchive range(std::string_view path, uint64_t offset, uint64_t length) {
    return {path, offset, length, {}};
  }
  static TorchArchive memory(std::string_view bytes) { return {{}, 0, 0, bytes}; }
  // "'model.pt'", "'__0_0.distcp' [128, +4096)" or "memory", for messages.
  std::string describe() const;
};

// The globals a torch.save data.pkl may name: the subset of torch's weights-only allow-list
// that stands for plain data (OrderedDict, the tensor and parameter rebuild functions, storage
// classes, dtypes, torch.Size, _codecs.encode, builtins set/bytearray...).
const PickleAllowList& torch_save_allow_list();

// Reads a file written by torch.save into a Value tree, tensors on the CPU:
// - dict and collections.OrderedDict -> Dict (int keys -> Dict with int_keys; a dict mixing
//   str and int keys, or with other key types, is refused), list -> List, tuple and
//   torch.Size -> List with is_tuple, int / float / str / bool / None / bytes as themselves;
// - tensors from `_rebuild_tensor_v2` (legacy typed storages) and `_rebuild_tensor_v3`
//   (UntypedStorage + dtype), with storage offset, sizes and strides as saved; tensors that
//   share a storage in the file share one at::Storage (each storage record is read once);
//   nn.Parameter (`_rebuild_parameter`, `_rebuild_from_type_v2`) becomes a plain tensor;
//   conj / neg bits are resolved; `requires_grad` and an OrderedDict's `_metadata` are dropped;
// - libtorch's torch::pickle_save output too: its `torch.jit._pickle.restore_type_tag` and
//   `build_*list` wrappers are read as the value they wrap;
// - big-endian files are byte-swapped (typed storages only).
// Errors: kNotFound / kIo (cannot open or read), kCorrupt (not a zip, missing records, bad
// pickle, a storage size or tensor extent that does not fit, a range past the end of the
// file), kUnsupported (torch.save's legacy pre-1.6 format, TorchScript archives, a global outside
// torch_save_allow_list(), named as "module.name", or an allowed object dsd cannot represent,
// such as a set or a quantized tensor), kDtypeMismatch (a dtype dsd does not store).
struct TorchLoadOptions {
  // Map the file's storage records into memory (copy-on-write, MAP_PRIVATE) instead of
  // reading them, when they are stored aligned to their element size in a little-endian
  // file (what torch.save writes): large files then cost address space and page cache, not
  // memory. Other records are read as usual. Only for file archives.
  bool mmap = false;
  // Called for each tensor with the name of its storage record ("data/<key>") and its path
  // in the tree ("model.layer.weight"): `dsd verify` names the keys of a damaged record.
  std::function<void(const std::string& record, const std::string& where)> on_tensor;
};

Result<Value> torch_load(const TorchArchive& archive, const TorchLoadOptions& options = {});

// One tensor of an archive whose top-level object is a tensor (a DCP chunk), described
// without reading its data.
struct TorchTensorRecord {
  DType dtype = DType::kFloat32;
  std::vector<int64_t> sizes;
  std::vector<int64_t> strides;  // in elements
  int64_t storage_offset = 0;    // in elements, into the storage
  // Where the storage's bytes are, relative to the start of the archive.
  uint64_t storage_data_offset = 0;
  uint64_t storage_nbytes = 0;
  bool big_endian = false;  // the bytes need swapping before use
  bool conj = false;        // the saved tensor had its conj bit set (complex dtypes)
  bool neg = false;         // ... its neg bit

  int64_t numel() const;
  // Row-major contiguous, so the tensor is `numel * element_size` bytes starting at
  // storage_data_offset + storage_offset * element_size.
  bool is_contiguous() const;
};

// Errors as torch_load; kWrongKind when the archive's object is not a tensor.
Result<TorchTensorRecord> torch_locate_tensor(const TorchArchive& archive);

// Receives an archive's bytes in order. An error stops the writer and is returned.
using ByteSink = std::function<Status(const void* data, size_t size)>;

struct TorchSaveOptions {
  // Writes a top-level Dict as collections.OrderedDict, as nn.Module.state_dict() returns
  // it; nested dicts are always plain dicts.
  bool ordered_dict = false;
  // Stores each record's CRC32, as torch.save does by default (torch.load does not check it;
  // zip tools do).
  bool compute_crc32 = true;
  // Streaming writes: a tensor on the meta device in the tree is a placeholder; when its
  // storage record is written this is called with it and returns its data (a CPU tensor of
  // the same dtype and shape), which is released right after. So a file of any size is
  // written holding one tensor at a time. Without it, meta tensors are kUnsupported.
  std::function<Result<at::Tensor>(const at::Tensor& placeholder)> tensor_data;
};

// Writes `root` as torch.save does, so that torch.load(f) with its default weights_only=True
// returns the same structure and tensors: dicts (int-keyed dicts with int keys), lists,
// tuples, scalars, strings, bytes (as `_codecs.encode`, which the weights-only unpickler
// accepts even for b""), and tensors as `_rebuild_tensor_v2` with the legacy storage class,
// or `_rebuild_tensor_v3` with UntypedStorage for dtypes that have none (float8, uint16/32/64).
// Tensors sharing a storage write it once, whole (as torch.save does), keeping their offsets
// and strides; conj / neg views are resolved first; device tensors are copied to the CPU and
// recorded with location "cpu". Records: data.pkl, .format_version, .storage_alignment,
// byteorder, data/<key>..., version, .data/serialization_id, in archive "archive".
// Errors: kUnsupported (a distributed tensor, a sparse or quantized tensor, two tensors that
// view one storage as different dtypes), kInvalidArgument (an undefined tensor, a dict key
// that int_keys says is an int but is not), and whatever `sink` returns.
Status torch_save(const Value& root, const ByteSink& sink, const TorchSaveOptions& options = {});
// The same into a new or truncated file (kIo on failure; no fsync, no rename).
Status torch_save(const Value& root, const std::string& path, const TorchSaveOptions& options = {});
Result<std::string> torch_save_bytes(const Value& root, const TorchSaveOptions& options = {});

}  // namespace dsd
