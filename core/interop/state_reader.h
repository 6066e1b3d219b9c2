// StateReader: any of the four formats (checkpoint/format_id.h) opened for reading one leaf
// at a time, which is what every conversion, diff and inspection goes through: a sharded
// checkpoint's tensors are assembled one at a time, written, and released. No pickle is
// ever executed.
//
// Flat keys are DCP's (flatten_state_dict: nested dicts joined with '.'); every format keeps
// or restores the nesting: dsd and DCP record it, a torch.save file is nested itself, and the
// safetensors files dsd writes carry it (with the non-tensor values, which safetensors cannot
// hold as tensors) in the `__metadata__` of their first file under "dsd.state".
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "core/base/result.h"
#include "core/checkpoint/format_id.h"
#include "core/checkpoint/manifest.h"
#include "core/checkpoint/source.h"
#include "core/statedict/path.h"
#include "core/statedict/value.h"

namespace dsd::interop {

using checkpoint::ChunkRecord;
using checkpoint::Entry;
using checkpoint::Format;

// Progress of a long operation: `done` of `total` bytes of tensor data (total 0: unknown).
// Called on the calling thread or on worker threads, never concurrently.
using ProgressFn = std::function<void(uint64_t done, uint64_t total)>;

// One leaf of a state, as its reader describes it.
struct ItemInfo {
  std::string key;  // flat key
  Path path;        // where it sits in the nested state
  Entry::Kind kind = Entry::Kind::kTensor;
  DType dtype = DType::kFloat32;
  std::vector<int64_t> shape;
  // The saved pieces: a sharded checkpoint's chunks, or one chunk covering the tensor.
  std::vector<ChunkRecord> chunks;
  uint64_t nbytes = 0;  // tensor data bytes (numel × element size); 0 for values
};

// read_tensor / read_value may be called from several threads at once.
class StateReader {
 public:
  virtual ~StateReader() = default;

  // Opens `path`, detecting its format (detect_format). A dsd checkpoint is validated whole
  // and its data files are never read through links unless `options` allows it (source.h);
  // safetensors files are imports and follow links (a Hugging Face cache snapshot is links
  // into ../../blobs/). Errors: those of detect_format, and kCorrupt / kUnsupported naming
  // the file and key of what cannot be read.
  static Result<std::unique_ptr<StateReader>> open(const std::string& path,
                                                   const checkpoint::OpenOptions& options = {});
  // A reader over an in-memory state dict (borrowed; must outlive the reader). Distributed
  // tensors are refused (kUnsupported): export full state dicts.
  static Result<std::unique_ptr<StateReader>> of(const Dict& state_dict);

  Format format() const { return format_; }
  const std::string& path() const { return path_; }
  const std::vector<ItemInfo>& items() const { return items_; }
  // Ranks that wrote the checkpoint (1 for a single file or an in-memory state).
  int64_t world_size() const { return world_size_; }
  // Data files, in the directory of `path` (or `path` itself for one file).
  const std::vector<std::string>& files() const { return files_; }
  // Paths of the nested dicts whose keys stand for ints (PyTorch's positional optimizer
  // state {0: {...}}), so the nesting comes back with int keys.
  const std::vector<Path>& int_key_dicts() const { return int_key_dicts_; }
  uint64_t tensor_bytes() const;

  // The tensor of item `index` as a full CPU tensor (new, or the reader's own for a file
  // already in memory: do not write to it).
  virtual Result<at::Tensor> read_tensor(size_t index) const = 0;
  virtual Result<Value> read_value(size_t index) const = 0;

  // The nested state with its values and, for each tensor, either the tensor itself (a
  // source already in memory) or a placeholder on the meta device of the same dtype and
  // shape, whose data read_tensor(placeholders[impl]) gives.
  struct Skeleton {
    DictPtr root;
    std::unordered_map<const c10::TensorImpl*, size_t> placeholders;
  };
  virtual Result<Skeleton> skeleton() const;

 protected:
  Format format_ = Format::kDsd;
  std::string path_;
  std::vector<ItemInfo> items_;
  int64_t world_size_ = 1;
  std::vector<std::string> files_;
  std::vector<Path> int_key_dicts_;
};

}  // namespace dsd::interop
