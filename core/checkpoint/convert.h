// Conversions between the formats dsd reads and writes (format.h): dsd checkpoints, PyTorch
// DCP checkpoints, torch.save files and Hugging Face safetensors, plus what the `dsd`
// command builds on (inspect, diff, verify of any format).
//
// Everything goes through a StateReader, which opens any of the four formats and hands out
// one leaf at a time, so conversions stream tensor by tensor: a sharded checkpoint's tensors
// are assembled one at a time, written, and released. What is held at once is one tensor per
// writer thread, except where a format forbids it: a torch.save file is read whole (mapped
// into memory, not copied, when its records allow). No pickle is ever executed.
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
#include <vector>

#include "core/base/result.h"
#include "core/checkpoint/format.h"
#include "core/checkpoint/manifest.h"
#include "core/statedict/value.h"

namespace dsd::checkpoint {

// Progress of a long operation: `done` of `total` bytes of tensor data (total 0: unknown).
// Called on the calling thread or on worker threads, never concurrently.
using ProgressFn = std::function<void(uint64_t done, uint64_t total)>;

// One leaf of a state, as its reader describes it.
struct ItemInfo {
  std::string key;             // flat key
  std::vector<PathItem> path;  // where it sits in the nested state
  Entry::Kind kind = Entry::Kind::kTensor;
  DType dtype = DType::kFloat32;
  std::vector<int64_t> shape;
  // The saved pieces: a sharded checkpoint's chunks, or one chunk covering the tensor.
  std::vector<ChunkRecord> chunks;
  uint64_t nbytes = 0;  // tensor data bytes (numel × element size); 0 for values
};

// Any of the four formats, opened for reading one leaf at a time. read_tensor / read_value
// may be called from several threads at once.
class StateReader {
 public:
  virtual ~StateReader() = default;

  // Opens `path`, detecting its format (detect_format). Errors: those of detect_format, and
  // kCorrupt / kUnsupported naming the file and key of what cannot be read.
  static Result<std::unique_ptr<StateReader>> open(const std::string& path);
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
  const std::vector<std::vector<PathItem>>& int_key_dicts() const { return int_key_dicts_; }
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
  std::vector<std::vector<PathItem>> int_key_dicts_;
};

struct ConvertOptions {
  // Replace what is at the destination (only once the new output is complete).
  bool overwrite = false;
  // safetensors: the most bytes of tensor data per file (a bigger tensor gets a file of its
  // own), as Hugging Face's max_shard_size. 0: one file.
  uint64_t max_shard_size = 5'000'000'000;
  // Writer threads; 0 picks min(4, cores per local rank) (checkpoint/pool.h).
  int thread_count = 0;
  ProgressFn progress;
};

// Writes everything `reader` holds to `dst` in `to`. A checkpoint (dsd or DCP) is written by
// one process (world size 1, whole tensors); torch.save as torch.save(state_dict) would
// (nested, an OrderedDict at the top, torch.load with weights_only=True accepts it);
// safetensors as a Hugging Face directory (see export_safetensors). Errors: kExists (`dst`
// is there and !overwrite), kUnsupported (a safetensors export of a state that cannot be
// flattened to tensors and values), and those of the reader and the writer.
Status convert(const StateReader& reader, const std::string& dst, Format to, const ConvertOptions& options = {});
// The same from a path of any format.
Status convert(const std::string& src, const std::string& dst, Format to, const ConvertOptions& options = {});

// A torch.save file of the state, written tensor by tensor (the file appears complete or not
// at all: written aside and renamed).
Status export_torch_save(const StateReader& reader, const std::string& path, const ConvertOptions& options = {});
Status export_torch_save(const Dict& state_dict, const std::string& path, const ConvertOptions& options = {});
// The state dict of a torch.save file (nested as saved; OrderedDicts become dicts, views
// keep sharing storage). Executes nothing: the restricted reader of torch_save.h.
Result<DictPtr> import_torch_save(const std::string& path);

// A consolidated Hugging Face safetensors directory at `dir`: `model-0000i-of-0000N.safetensors`
// files of at most options.max_shard_size bytes of data each (tensors in state order, whole:
// sharded checkpoints are assembled), and `model.safetensors.index.json`
// `{"metadata": {"total_size": <data bytes>}, "weight_map": {key: file}}`, written last.
// Keys are the flat keys. safetensors.torch.load_file reads every file.
Status export_safetensors(const StateReader& reader, const std::string& dir, const ConvertOptions& options = {});
Status export_safetensors(const Dict& state_dict, const std::string& dir, const ConvertOptions& options = {});
// The state dict of a safetensors directory (through its index, or every `.safetensors`
// file) or single file; nested again, with its values, when dsd wrote it.
Result<DictPtr> import_safetensors(const std::string& path);

// Everything a reader holds, read whole into a new nested state dict of CPU tensors.
Result<DictPtr> read_all(const StateReader& reader, const ProgressFn& progress = {});

// Differences between two states of any formats, compared by flat key.
struct DiffReport {
  std::vector<std::string> only_in_a;
  std::vector<std::string> only_in_b;
  // One line per differing key: kind, dtype, shape, or the first differing element (its
  // index and both values) of a tensor; or the first difference of a value.
  std::vector<std::pair<std::string, std::string>> differences;
  uint64_t compared_bytes = 0;

  bool equal() const { return only_in_a.empty() && only_in_b.empty() && differences.empty(); }
};
Result<DiffReport> diff(const StateReader& a, const StateReader& b, const ProgressFn& progress = {});

// Integrity of any format: a dsd checkpoint's checksums (verify() in load.h); a DCP
// checkpoint's structure and readability; a torch.save file read whole; safetensors headers,
// index and data bounds. One problem per damaged file/key; empty when intact. Errors only
// when `path` is not recognised at all.
struct Problem {
  std::string file;
  std::string key;
  std::string message;
};
Result<std::vector<Problem>> verify_any(const std::string& path, const ProgressFn& progress = {});

}  // namespace dsd::checkpoint
