// Exports (torch.save, Hugging Face safetensors, dsd / DCP checkpoints) from a StateReader,
// one tensor at a time, and the imports that go with them.
#include "core/interop/convert.h"

#include <fmt/ranges.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <mutex>
#include <nlohmann/json.hpp>
#include <set>
#include <thread>

#include "core/base/make_error.h"
#include "core/base/torch_call.h"
#include "core/checkpoint/dcp_files.h"
#include "core/checkpoint/io.h"
#include "core/checkpoint/materialize.h"
#include "core/checkpoint/pool.h"
#include "core/checkpoint/save.h"
#include "core/checkpoint/value_json.h"
#include "core/formats/safetensors.h"
#include "core/formats/torch_save.h"
#include "core/interop/detect.h"
#include "core/statedict/flatten.h"
#include "core/tensor/dtype_torch.h"

namespace dsd::interop {

using namespace checkpoint;  // NOLINT: the engine's save, manifest and file I/O

namespace {

using nlohmann::json;
using ordered_json = nlohmann::ordered_json;

int writer_threads(int requested) {
  return default_threads(requested, 4);
}

// Counts bytes done across threads and reports them.
class Progress {
 public:
  Progress(const ProgressFn& fn, uint64_t total) : fn_(fn), total_(total) {
    if (fn_) fn_(0, total_);
  }
  void add(uint64_t n) {
    if (!fn_) return;
    std::lock_guard<std::mutex> lock(mu_);
    done_ += n;
    fn_(done_, total_);
  }

 private:
  const ProgressFn& fn_;
  uint64_t total_;
  uint64_t done_ = 0;
  std::mutex mu_;
};

std::string tmp_name(const std::string& path) {
  static std::atomic<uint64_t> counter{0};
  return fmt::format("{}.tmp-{}-{}", path, ::getpid(), counter++);
}

std::string parent_dir(const std::string& path) {
  const size_t slash = path.find_last_of('/');
  if (slash == std::string::npos) return ".";
  return slash == 0 ? "/" : path.substr(0, slash);
}

Status rename_into_place(const std::string& from, const std::string& to) {
  if (::rename(from.c_str(), to.c_str()) != 0) {
    const int err = errno;
    (void)remove_file(from);
    return make_error_at(Code::kIo, to, "cannot rename '{}' into place: {}", to, std::strerror(err));
  }
  return ok();
}

Status check_file_destination(const std::string& path, bool overwrite) {
  if (is_directory(path)) {
    return make_error_at(Code::kExists, path, "'{}' is a directory; a torch.save file is one file", path);
  }
  if (path_exists(path) && !overwrite) {
    return make_error_at(Code::kExists, path, "'{}' already exists; pass overwrite to replace it", path);
  }
  return make_dirs(parent_dir(path));
}

// A whole CPU tensor's bytes, contiguous.
Result<at::Tensor> contiguous_cpu(const at::Tensor& t, const std::string& key) {
  return torch_call(Code::kDevice, fmt::format("preparing '{}'", key), [&] {
    return t.cpu().resolve_conj().resolve_neg().contiguous();
  });
}

// ---- safetensors export ---------------------------------------------------------------------

struct Shard {
  std::string name;
  std::vector<size_t> items;  // reader item indices, in order
  uint64_t bytes = 0;
};

// Hugging Face's sharding: tensors in order, a new file when the next one would pass the cap
// (a tensor larger than the cap gets a file of its own).
std::vector<Shard> plan_shards(const StateReader& reader, uint64_t max_bytes) {
  std::vector<Shard> shards(1);
  for (size_t i = 0; i < reader.items().size(); ++i) {
    const ItemInfo& it = reader.items()[i];
    if (it.kind != Entry::Kind::kTensor) continue;
    if (max_bytes > 0 && !shards.back().items.empty() && shards.back().bytes + it.nbytes > max_bytes) {
      shards.emplace_back();
    }
    shards.back().items.push_back(i);
    shards.back().bytes += it.nbytes;
  }
  for (size_t k = 0; k < shards.size(); ++k) {
    shards[k].name = fmt::format("model-{:05d}-of-{:05d}.safetensors", k + 1, shards.size());
  }
  return shards;
}

// What safetensors files cannot hold as tensors: the order, the nesting and the values, for
// import_safetensors to restore.
Result<std::string> state_metadata(const StateReader& reader) {
  json entries = json::array();
  for (size_t i = 0; i < reader.items().size(); ++i) {
    const ItemInfo& it = reader.items()[i];
    json path = path_to_json(it.path);
    json value = nullptr;
    if (it.kind == Entry::Kind::kValue) value = TRY(value_to_json(TRY(reader.read_value(i)), it.key));
    entries.push_back(json::array({it.key, std::move(path), std::move(value)}));
  }
  json int_key_dicts = json::array();
  for (const auto& items : reader.int_key_dicts()) {
    int_key_dicts.push_back(path_to_json(items));
  }
  return json{{"entries", std::move(entries)}, {"int_key_dicts", std::move(int_key_dicts)}}.dump();
}

Status write_shard(const StateReader& reader, const std::string& dir, const Shard& shard, const std::string& state,
                   Progress& progress, std::vector<std::string>& tmps, std::mutex& mu) {
  std::vector<safetensors::TensorEntry> entries;
  uint64_t pos = 0;
  for (size_t i : shard.items) {
    const ItemInfo& it = reader.items()[i];
    if (!safetensors::is_valid_utf8(it.key)) {
      return make_error_at(Code::kInvalidArgument, it.key, "key '{}' is not UTF-8", it.key);
    }
    entries.push_back({it.key, it.dtype, it.shape, pos, pos + it.nbytes});
    pos += it.nbytes;
  }
  std::map<std::string, std::string> metadata = {{"format", "pt"}};
  if (!state.empty()) metadata["dsd.state"] = state;
  const std::string header = TRY(safetensors::write_header(entries, metadata));
  const std::string tmp = tmp_name(join(dir, shard.name));
  File f = TRY(create_new(tmp));
  {
    std::lock_guard<std::mutex> lock(mu);
    tmps.push_back(tmp);
  }
  TRY(write_all(f, header.data(), header.size()));
  for (size_t i : shard.items) {
    const ItemInfo& it = reader.items()[i];
    const at::Tensor t = TRY(contiguous_cpu(TRY(reader.read_tensor(i)), it.key));
    if (static_cast<uint64_t>(t.nbytes()) != it.nbytes) {
      return make_error_at(Code::kInternal, it.key, "'{}' read as {} bytes, {} expected", it.key, t.nbytes(), it.nbytes);
    }
    TRY(write_all(f, t.const_data_ptr(), it.nbytes));
    progress.add(it.nbytes);
  }
  TRY(sync(f));
  return f.close();
}

Status write_torch_save(const StateReader& reader, const std::string& path, const ConvertOptions& options) {
  TRY(check_file_destination(path, options.overwrite));
  StateReader::Skeleton skel = TRY(reader.skeleton());
  Progress progress(options.progress, reader.tensor_bytes());
  TorchSaveOptions tso;
  tso.ordered_dict = true;
  tso.tensor_data = [&](const at::Tensor& placeholder) -> Result<at::Tensor> {
    auto it = skel.placeholders.find(placeholder.unsafeGetTensorImpl());
    if (it == skel.placeholders.end()) return make_error(Code::kInternal, "a placeholder without a source");
    at::Tensor t = TRY(reader.read_tensor(it->second));
    progress.add(reader.items()[it->second].nbytes);
    return t;
  };
  const std::string tmp = tmp_name(path);
  {
    File f = TRY(create_new(tmp));
    Status s = torch_save(Value(skel.root), [&](const void* data, size_t n) { return write_all(f, data, n); }, tso);
    if (s.ok()) s = sync(f);
    if (s.ok()) s = f.close();
    if (!s.ok()) {
      (void)remove_file(tmp);
      return s;
    }
  }
  TRY(rename_into_place(tmp, path));
  return sync_dir(parent_dir(path));
}

// ---- safetensors ------------------------------------------------------------------------------

Status write_safetensors(const StateReader& reader, const std::string& dir, const ConvertOptions& options) {
  if (path_exists(dir) && !is_directory(dir)) {
    return make_error_at(Code::kExists, dir, "'{}' is a file; a safetensors export is a directory", dir);
  }
  TRY(make_dirs(dir));
  const std::vector<std::string> before = TRY(list_dir(dir));
  if (!options.overwrite) {
    for (const std::string& n : before) {
      if (n == kHfIndexName || n.ends_with(".safetensors") || n == kManifestName || n == kDcpMetadataName) {
        return make_error_at(Code::kExists, dir, "'{}' already holds '{}'; pass overwrite to replace it", dir, n);
      }
    }
  }
  for (const ItemInfo& it : reader.items()) {
    // The safetensors library has no 128-bit complex dtype (C64 is its widest).
    if (it.kind == Entry::Kind::kTensor && it.dtype == DType::kComplex128) {
      return make_error_at(Code::kUnsupported, it.key,
                           "'{}' is complex128, which safetensors files cannot hold (the library knows C64 at most)",
                           it.key);
    }
  }
  const std::vector<Shard> shards = plan_shards(reader, options.max_shard_size);
  const std::string state = TRY(state_metadata(reader));
  Progress progress(options.progress, reader.tensor_bytes());
  std::vector<std::string> tmps;
  std::mutex mu;
  Status s = parallel_for(shards.size(), writer_threads(options.thread_count), [&](size_t k) {
    return write_shard(reader, dir, shards[k], k == 0 ? state : std::string(), progress, tmps, mu);
  });
  if (!s.ok()) {
    for (const std::string& t : tmps) (void)remove_file(t);
    return s;
  }
  for (const std::string& t : tmps) {
    const std::string final_name = t.substr(0, t.rfind(".tmp-"));
    TRY(rename_into_place(t, final_name));
  }
  TRY(sync_dir(dir));
  ordered_json weight_map = ordered_json::object();
  uint64_t total = 0;
  for (const Shard& sh : shards) {
    for (size_t i : sh.items) weight_map[reader.items()[i].key] = sh.name;
    total += sh.bytes;
  }
  ordered_json index = {{"metadata", {{"total_size", total}}}, {"weight_map", std::move(weight_map)}};
  TRY(write_file_atomic(dir, kHfIndexName, index.dump(2) + "\n"));
  // What an earlier export left that this one does not use.
  std::set<std::string> keep;
  for (const Shard& sh : shards) keep.insert(sh.name);
  for (const std::string& n : before) {
    if (n.starts_with("model-") && n.ends_with(".safetensors") && !keep.count(n)) (void)remove_file(join(dir, n));
  }
  return ok();
}

// A dsd or DCP checkpoint written by one process.
Status write_checkpoint(const StateReader& reader, const std::string& dst, Format to, const ConvertOptions& options) {
  StateReader::Skeleton skel = TRY(reader.skeleton());
  Progress progress(options.progress, reader.tensor_bytes());
  SaveOptions so;
  so.overwrite = options.overwrite;
  so.thread_count = options.thread_count;
  so.format = to;
  so.tensor_provider = [&](const std::string&, const at::Tensor& placeholder) -> Result<at::Tensor> {
    auto it = skel.placeholders.find(placeholder.unsafeGetTensorImpl());
    if (it == skel.placeholders.end()) return make_error(Code::kInternal, "a placeholder without a source");
    at::Tensor t = TRY(reader.read_tensor(it->second));
    progress.add(reader.items()[it->second].nbytes);
    return t;
  };
  if (path_exists(dst) && !is_directory(dst)) {
    return make_error_at(Code::kExists, dst, "'{}' is a file; a {} checkpoint is a directory", dst, format_name(to));
  }
  auto comm = make_local_communicator();
  TRY(save(*comm, *skel.root, dst, so));
  return ok();
}

// `reader` itself when the options select, rename, cast and dequantize nothing; otherwise a view of it
// (in `view`, which must outlive the use).
Result<const StateReader*> viewed(const StateReader& reader, const ConvertOptions& options,
                                  std::unique_ptr<StateReader>& view) {
  const StateViewOptions vo = view_options(options);
  if (is_identity(vo)) return &reader;
  view = TRY(make_state_view(reader, vo));
  return view.get();
}

}  // namespace

StateViewOptions view_options(const ConvertOptions& options) {
  return StateViewOptions{options.select, options.strip_prefix, options.dtype, options.dequantize};
}

// ---- torch.save -----------------------------------------------------------------------------

Status export_torch_save(const StateReader& reader, const std::string& path, const ConvertOptions& options) {
  std::unique_ptr<StateReader> view;
  return write_torch_save(*TRY(viewed(reader, options, view)), path, options);
}

Status export_torch_save(const Dict& state_dict, const std::string& path, const ConvertOptions& options) {
  auto reader = TRY(StateReader::of(state_dict));
  return export_torch_save(*reader, path, options);
}

Result<DictPtr> import_torch_save(const std::string& path) {
  Value v = TRY(torch_load(TorchArchive::file(path)));
  if (!v.is_dict()) {
    return make_error_at(Code::kUnsupported, path, "'{}' holds a {}, not a state dict (a dict)", path, kind_name(v.kind()));
  }
  return v.dict_ptr();
}

// ---- safetensors ------------------------------------------------------------------------------

Status export_safetensors(const StateReader& reader, const std::string& dir, const ConvertOptions& options) {
  std::unique_ptr<StateReader> view;
  return write_safetensors(*TRY(viewed(reader, options, view)), dir, options);
}

Status export_safetensors(const Dict& state_dict, const std::string& dir, const ConvertOptions& options) {
  auto reader = TRY(StateReader::of(state_dict));
  return export_safetensors(*reader, dir, options);
}

Result<DictPtr> import_safetensors(const std::string& path) {
  if (!path_exists(path)) return make_error_at(Code::kNotFound, path, "'{}' does not exist", path);
  std::unique_ptr<StateReader> reader;
  if (is_directory(path) && path_exists(join(path, kManifestName))) {
    return make_error_at(Code::kWrongKind, path, "'{}' is a dsd checkpoint, not a safetensors export", path);
  }
  const Format f = TRY(detect_format(path));
  if (f != Format::kSafetensors) {
    return make_error_at(Code::kWrongKind, path, "'{}' is a {} {}, not safetensors", path, format_name(f),
                         is_directory(path) ? "checkpoint" : "file");
  }
  reader = TRY(StateReader::open(path));
  return read_all(*reader);
}

// ---- whole states and conversions -------------------------------------------------------------

Result<DictPtr> read_all(const StateReader& reader, const ProgressFn& progress_fn) {
  StateReader::Skeleton skel = TRY(reader.skeleton());
  Progress progress(progress_fn, reader.tensor_bytes());
  for (size_t i = 0; i < reader.items().size(); ++i) {
    const ItemInfo& it = reader.items()[i];
    if (it.kind != Entry::Kind::kTensor) continue;
    const Path& p = it.path;
    const Value* cur = get_element(*skel.root, p);
    if (cur != nullptr && cur->is_tensor() && !cur->if_tensor()->tensor.is_meta()) continue;  // in memory already
    TRY(set_element(*skel.root, p, Value(TRY(reader.read_tensor(i)))));
    progress.add(it.nbytes);
  }
  return skel.root;
}

Status convert(const StateReader& reader, const std::string& dst, Format to, const ConvertOptions& options) {
  std::unique_ptr<StateReader> view;
  const StateReader& r = *TRY(viewed(reader, options, view));
  switch (to) {
    case Format::kTorchSave: return write_torch_save(r, dst, options);
    case Format::kSafetensors: return write_safetensors(r, dst, options);
    case Format::kDsd:
    case Format::kDcp: break;
  }
  return write_checkpoint(r, dst, to, options);
}

Status convert(const std::string& src, const std::string& dst, Format to, const ConvertOptions& options) {
  if (options.materialize) {
    if (to != Format::kDsd || !is_identity(view_options(options))) {
      return make_error(Code::kInvalidArgument,
                        "materialize copies a dsd checkpoint as it is: to the dsd format, with no select, "
                        "strip_prefix, dtype or dequantize");
    }
    TRY(checkpoint::materialize(src, dst, options.overwrite));
    return ok();
  }
  auto reader = TRY(StateReader::open(src, {options.allow_external_files}));
  return convert(*reader, dst, to, options);
}

}  // namespace dsd::interop
