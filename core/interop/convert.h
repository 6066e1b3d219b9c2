// Conversions between the formats dsd reads and writes (checkpoint/format_id.h): dsd
// checkpoints, PyTorch DCP checkpoints, torch.save files and Hugging Face safetensors.
//
// Everything goes through a StateReader (state_reader.h), so conversions stream tensor by
// tensor. What is held at once is one tensor per writer thread, except where a format
// forbids it: a torch.save file is read whole (mapped into memory, not copied, when its
// records allow). No pickle is ever executed.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "core/base/result.h"
#include "core/interop/state_reader.h"
#include "core/interop/state_view.h"
#include "core/statedict/value.h"

namespace dsd::interop {

struct ConvertOptions {
  // Replace what is at the destination (only once the new output is complete).
  bool overwrite = false;
  // safetensors: the most bytes of tensor data per file (a bigger tensor gets a file of its
  // own), as Hugging Face's max_shard_size. 0: one file.
  uint64_t max_shard_size = 5'000'000'000;
  // Writer threads; 0 picks min(4, cores per local rank) (checkpoint/pool.h).
  int thread_count = 0;
  ProgressFn progress;
  // A dsd source's data files may be symbolic links (checkpoint/source.h's OpenOptions).
  bool allow_external_files = false;
  // What of the source is written, under which keys, in which dtype (state_view.h's
  // StateViewOptions, applied to the reader by every function below): a key prefix
  // ("model" or "model.": the subtree under "model"; empty: all), whether that prefix is
  // dropped from the output keys, the dtype every floating tensor is cast to, and whether
  // FP8 block-scaled weights are dequantized first (to `dtype`, else bfloat16; their
  // `_scale_inv` scales dropped).
  std::string select;
  bool strip_prefix = false;
  std::optional<DType> dtype;
  bool dequantize = false;
  // convert() from a dsd checkpoint path to Format::kDsd: the checkpoint copied as it is,
  // self-contained (checkpoint/materialize.h; `dst` may be `src`). Only overwrite applies
  // with it; any view option is kInvalidArgument.
  bool materialize = false;
};

// The view options of `options`.
StateViewOptions view_options(const ConvertOptions& options);

// Writes everything `reader` holds (or what options.select selects, renamed and cast as the
// options say) to `dst` in `to`. A checkpoint (dsd or DCP) is written by
// one process (world size 1, whole tensors); torch.save as torch.save(state_dict) would
// (nested, an OrderedDict at the top, torch.load with weights_only=True accepts it);
// safetensors as a Hugging Face directory (see export_safetensors). Errors: kExists (`dst`
// is there and !overwrite), kUnsupported (a safetensors export of a state that cannot be
// flattened to tensors and values), those of make_state_view (kNotFound: select matches
// nothing; kInvalidArgument: strip_prefix without select, a non-floating dtype, a key left
// empty or two keys made one by the strip; with dequantize, kCorrupt / kUnsupported for a
// scale without its weight, of the wrong dtype or shape, or of a weight that is not 2-D
// float8), and those of the reader and the writer.
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

}  // namespace dsd::interop
