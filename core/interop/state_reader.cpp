// StateReader over the four formats: dsd and DCP checkpoints (through the load engine's
// Source), torch.save files and in-memory state dicts (a Value tree), safetensors files.
#include <ATen/ops/empty.h>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <unordered_map>
#include <unordered_set>

#include "core/interop/state_reader.h"

#include "core/base/make_error.h"
#include "core/base/torch_call.h"
#include "core/checkpoint/dcp_files.h"
#include "core/checkpoint/io.h"
#include "core/checkpoint/load.h"
#include "core/checkpoint/save_planner.h"
#include "core/checkpoint/source.h"
#include "core/checkpoint/value_json.h"
#include "core/interop/detect.h"
#include "core/formats/safetensors.h"
#include "core/formats/torch_save.h"
#include "core/statedict/flatten.h"
#include "core/tensor/dtype_torch.h"

namespace dsd::interop {

using namespace checkpoint;  // NOLINT: the engine's manifest, sources and file I/O

namespace {

using nlohmann::json;

constexpr uint64_t kMaxIndexBytes = 256u << 20;

uint64_t numel_of(const std::vector<int64_t>& shape) {
  uint64_t n = 1;
  for (int64_t d : shape) n *= static_cast<uint64_t>(d);
  return n;
}

Result<at::Tensor> placeholder(DType dtype, const std::vector<int64_t>& shape) {
  return torch_call(Code::kInternal, "making a placeholder tensor", [&] {
    return at::empty(shape, at::TensorOptions().dtype(to_scalar_type(dtype)).device(at::kMeta));
  });
}

std::string base_name(const std::string& path) {
  const size_t slash = path.find_last_of('/');
  return slash == std::string::npos ? path : path.substr(slash + 1);
}

// ---- dsd and DCP checkpoints --------------------------------------------------------------

class CheckpointReader final : public StateReader {
 public:
  static Result<std::unique_ptr<StateReader>> open(const std::string& path, const OpenOptions& options) {
    auto r = std::make_unique<CheckpointReader>();
    r->src_ = TRY(open_source(path, options));
    r->format_ = r->src_.format;
    r->path_ = path;
    r->world_size_ = r->src_.manifest.world_size;
    r->int_key_dicts_ = r->src_.manifest.int_key_dicts;
    for (const FileRecord& f : r->src_.manifest.files) r->files_.push_back(f.name);
    for (const Entry& e : r->src_.manifest.entries) {
      ItemInfo it;
      it.key = e.key;
      it.path = e.path;
      it.kind = e.kind;
      if (e.kind == Entry::Kind::kTensor) {
        it.dtype = e.dtype;
        it.shape = e.shape;
        it.chunks = e.chunks;
        it.nbytes = numel_of(e.shape) * element_size(e.dtype);
      }
      r->items_.push_back(std::move(it));
    }
    return std::unique_ptr<StateReader>(std::move(r));
  }

  Result<at::Tensor> read_tensor(size_t index) const override {
    return read_full_tensor(src_, src_.manifest.entries.at(index));
  }
  Result<Value> read_value(size_t index) const override {
    return read_source_value(src_, src_.manifest.entries.at(index));
  }


 private:
  Source src_;
};

// ---- a Value tree: a torch.save file or an in-memory state dict ---------------------------

class TreeReader final : public StateReader {
 public:
  static Result<std::unique_ptr<StateReader>> open_torch(const std::string& path) {
    TorchLoadOptions options;
    options.mmap = true;
    Value root = TRY(torch_load(TorchArchive::file(path), options));
    if (!root.is_dict()) {
      return make_error_at(Code::kUnsupported, path, "'{}' holds a {}, not a state dict (a dict)", path,
                           kind_name(root.kind()));
    }
    auto r = std::make_unique<TreeReader>();
    r->format_ = Format::kTorchSave;
    r->path_ = path;
    r->files_ = {base_name(path)};
    r->owned_ = root.dict_ptr();
    TRY(r->index(*r->owned_));
    return std::unique_ptr<StateReader>(std::move(r));
  }

  static Result<std::unique_ptr<StateReader>> of(const Dict& sd) {
    auto r = std::make_unique<TreeReader>();
    r->format_ = Format::kDsd;
    r->path_ = "<memory>";
    r->owned_ = deep_copy(sd);
    TRY(r->index(*r->owned_));
    return std::unique_ptr<StateReader>(std::move(r));
  }

  Result<at::Tensor> read_tensor(size_t index) const override {
    const TensorValue* tv = leaves_.at(index).if_tensor();
    if (tv == nullptr) return make_error(Code::kWrongKind, "'{}' is not a tensor", items_.at(index).key);
    return torch_call(Code::kDevice, fmt::format("copying '{}' to host memory", items_[index].key), [&] {
      at::Tensor t = tv->tensor;
      if (!t.device().is_cpu()) t = t.cpu();
      return t.resolve_conj().resolve_neg();
    });
  }
  Result<Value> read_value(size_t index) const override { return leaves_.at(index); }

  Result<Skeleton> skeleton() const override { return Skeleton{deep_copy(*owned_), {}}; }

 private:
  Status index(const Dict& root) {
    int_key_dicts_ = int_key_dict_paths(*owned_);
    FlatStateDict flat = TRY(flatten_state_dict(root, FlattenStyle::kCheckpoint));
    for (size_t i = 0; i < flat.flat->size(); ++i) {
      const std::string& key = flat.flat->key_at(i);
      const Value& v = flat.flat->value_at(i);
      ItemInfo it;
      it.key = key;
      it.path = flat.mapping[i].second;
      if (const TensorValue* tv = v.if_tensor()) {
        if (tv->is_dist()) {
          return make_error_at(Code::kUnsupported, key,
                               "'{}' is a distributed tensor; export a full state dict (gather it first)", key);
        }
        it.kind = Entry::Kind::kTensor;
        it.dtype = TRY(dtype_from_scalar_type(tv->tensor.scalar_type()));
        it.shape.assign(tv->tensor.sizes().begin(), tv->tensor.sizes().end());
        it.nbytes = numel_of(it.shape) * element_size(it.dtype);
        ChunkRecord c;
        c.offsets.assign(it.shape.size(), 0);
        c.sizes = it.shape;
        c.file = files_.empty() ? std::string() : files_[0];
        c.end = it.nbytes;
        it.chunks.push_back(std::move(c));
      } else {
        it.kind = Entry::Kind::kValue;
      }
      items_.push_back(std::move(it));
      leaves_.push_back(v);
    }
    return ok();
  }

  DictPtr owned_;
  std::vector<Value> leaves_;
};

// ---- safetensors ----------------------------------------------------------------------------

class SafetensorsReader final : public StateReader {
 public:
  static Result<std::unique_ptr<StateReader>> open(const std::string& path) {
    auto r = std::make_unique<SafetensorsReader>();
    r->format_ = Format::kSafetensors;
    r->path_ = path;
    std::optional<json> weight_map;
    if (is_directory(path)) {
      r->dir_ = path;
      const std::string index = join(path, kHfIndexName);
      if (path_exists(index)) {
        const std::string text = TRY(read_file(index, kMaxIndexBytes));
        json j = json::parse(text, nullptr, false);
        if (j.is_discarded() || !j.is_object() || !j.contains("weight_map") || !j["weight_map"].is_object()) {
          return make_error_at(Code::kCorrupt, index, "'{}' is not a safetensors index (no weight_map object)", index);
        }
        weight_map = j["weight_map"];
        for (const auto& [key, file] : weight_map->items()) {
          if (!file.is_string() || !is_plain_file_name(file.get<std::string>())) {
            return make_error_at(Code::kCorrupt, index, "'{}' maps '{}' to {}, not a file of the directory", index, key,
                                 file.dump());
          }
          const std::string f = file.get<std::string>();
          if (std::find(r->files_.begin(), r->files_.end(), f) == r->files_.end()) r->files_.push_back(f);
        }
      } else {
        for (const std::string& n : TRY(list_dir(path))) {
          if (n.ends_with(".safetensors") && !is_data_file_name(n)) r->files_.push_back(n);
        }
        std::sort(r->files_.begin(), r->files_.end());
      }
    } else {
      const size_t slash = path.find_last_of('/');
      r->dir_ = slash == std::string::npos ? "." : path.substr(0, slash);
      r->files_ = {base_name(path)};
    }
    TRY(r->read_headers(weight_map));
    return std::unique_ptr<StateReader>(std::move(r));
  }

  Result<at::Tensor> read_tensor(size_t index) const override {
    const Loc& loc = locs_.at(index);
    const ItemInfo& it = items_.at(index);
    at::Tensor t = TRY(torch_call(Code::kOutOfMemory, fmt::format("allocating '{}'", it.key), [&] {
      return at::empty(it.shape, at::TensorOptions().dtype(to_scalar_type(it.dtype)));
    }));
    if (loc.end > loc.begin) {
      const File f = TRY(open_for_read(join(dir_, files_[loc.file])));
      Status s = pread_all(f, t.data_ptr(), loc.end - loc.begin, loc.begin);
      if (!s.ok()) return std::move(s).error().with_prefix(fmt::format("reading '{}': ", it.key));
    }
    return t;
  }
  Result<Value> read_value(size_t index) const override { return values_.at(index); }

 private:
  struct Loc {
    size_t file = 0;
    uint64_t begin = 0;  // absolute in the file
    uint64_t end = 0;
  };

  Status read_headers(const std::optional<json>& weight_map) {
    if (files_.empty()) {
      return make_error_at(Code::kNotFound, path_, "no .safetensors files in '{}'", path_);
    }
    std::unordered_map<std::string, size_t> by_key;
    std::optional<std::string> state;  // dsd.state of the first file that has it
    for (size_t fi = 0; fi < files_.size(); ++fi) {
      const std::string full = join(dir_, files_[fi]);
      const File f = TRY(open_for_read(full));
      safetensors::Header h = TRY(safetensors::read_header(f.fd(), files_[fi]));
      if (auto m = h.metadata.find("dsd.state"); m != h.metadata.end() && !state) state = m->second;
      for (const safetensors::TensorEntry& t : h.tensors) {
        if (by_key.count(t.name)) {
          return make_error_at(Code::kCorrupt, full, "tensor '{}' is in '{}' and in '{}'", t.name,
                               files_[locs_[by_key[t.name]].file], files_[fi]);
        }
        if (weight_map) {
          auto w = weight_map->find(t.name);
          if (w == weight_map->end() || w->get<std::string>() != files_[fi]) {
            return make_error_at(Code::kCorrupt, full, "tensor '{}' of '{}' is not mapped to that file by {}", t.name,
                                 files_[fi], kHfIndexName);
          }
        }
        by_key[t.name] = items_.size();
        ItemInfo it;
        it.key = t.name;
        it.path = {t.name};
        it.dtype = t.dtype;
        it.shape = t.shape;
        it.nbytes = t.nbytes();
        ChunkRecord c;
        c.offsets.assign(t.shape.size(), 0);
        c.sizes = t.shape;
        c.file = files_[fi];
        c.begin = h.data_start + t.begin;
        c.end = h.data_start + t.end;
        it.chunks.push_back(c);
        items_.push_back(std::move(it));
        locs_.push_back({fi, c.begin, c.end});
        values_.emplace_back();
      }
    }
    if (weight_map) {
      for (const auto& [key, file] : weight_map->items()) {
        if (!by_key.count(key)) {
          return make_error_at(Code::kCorrupt, join(dir_, file.get<std::string>()),
                               "{} maps '{}' to '{}', which does not hold it", kHfIndexName, key, file.get<std::string>());
        }
      }
    }
    if (state) TRY(apply_state(*state, by_key));
    return ok();
  }

  // Restores the order, nesting and non-tensor values dsd recorded when it wrote the files:
  // {"entries": [[key, path, value JSON or null for a tensor], ...]}.
  Status apply_state(const std::string& text, const std::unordered_map<std::string, size_t>& by_key) {
    auto bad = [&](std::string what) {
      return make_error_at(Code::kCorrupt, path_, "the dsd.state metadata of '{}' is malformed: {}", path_, what);
    };
    json j = json::parse(text, nullptr, false);
    if (j.is_discarded() || !j.is_object() || !j.contains("entries") || !j["entries"].is_array()) {
      return bad("no entries array");
    }
    std::vector<ItemInfo> items;
    std::vector<Loc> locs;
    std::vector<Value> values;
    std::unordered_set<std::string> placed;
    for (const json& e : j["entries"]) {
      if (!e.is_array() || e.size() != 3 || !e[0].is_string() || !e[1].is_array()) return bad("an entry is not [key, path, value]");
      const std::string key = e[0].get<std::string>();
      Path path;
      for (const json& p : e[1]) {
        if (p.is_string()) path.emplace_back(p.get<std::string>());
        else if (p.is_number_integer()) path.emplace_back(p.get<int64_t>());
        else return bad(fmt::format("the path of '{}' holds {}", key, p.dump()));
      }
      if (path.empty()) return bad(fmt::format("'{}' has an empty path", key));
      if (!placed.insert(key).second) return bad(fmt::format("'{}' appears twice", key));
      if (e[2].is_null()) {
        auto it = by_key.find(key);
        if (it == by_key.end()) return bad(fmt::format("tensor '{}' is in no file", key));
        items.push_back(items_[it->second]);
        items.back().path = std::move(path);
        locs.push_back(locs_[it->second]);
        values.emplace_back();
        continue;
      }
      TRY(check_value_json(e[2], key));
      ItemInfo it;
      it.key = key;
      it.path = std::move(path);
      it.kind = Entry::Kind::kValue;
      items.push_back(std::move(it));
      locs.emplace_back();
      values.push_back(TRY(value_from_json(e[2], key)));
    }
    if (j.contains("int_key_dicts")) {
      if (!j["int_key_dicts"].is_array()) return bad("int_key_dicts is not an array");
      for (const json& p : j["int_key_dicts"]) {
        if (!p.is_array()) return bad("an int_key_dicts path is not an array");
        Path path;
        for (const json& x : p) {
          if (x.is_string()) path.emplace_back(x.get<std::string>());
          else if (x.is_number_integer()) path.emplace_back(x.get<int64_t>());
          else return bad("an int_key_dicts path holds " + x.dump());
        }
        int_key_dicts_.push_back(std::move(path));
      }
    }
    for (const auto& [key, i] : by_key) {
      if (placed.count(key)) continue;
      items.push_back(items_[i]);
      locs.push_back(locs_[i]);
      values.emplace_back();
    }
    items_ = std::move(items);
    locs_ = std::move(locs);
    values_ = std::move(values);
    return ok();
  }

  std::string dir_;
  std::vector<Loc> locs_;      // per item (tensors)
  std::vector<Value> values_;  // per item (values)
};

}  // namespace

uint64_t StateReader::tensor_bytes() const {
  uint64_t n = 0;
  for (const ItemInfo& it : items_) n += it.nbytes;
  return n;
}

Result<StateReader::Skeleton> StateReader::skeleton() const {
  Skeleton s;
  s.root = Dict::make();
  for (size_t i = 0; i < items_.size(); ++i) {
    const ItemInfo& it = items_[i];
    const Path& p = it.path;
    if (it.kind == Entry::Kind::kValue) {
      TRY(set_element(*s.root, p, TRY(read_value(i))));
      continue;
    }
    at::Tensor t = TRY(placeholder(it.dtype, it.shape));
    s.placeholders.emplace(t.unsafeGetTensorImpl(), i);
    TRY(set_element(*s.root, p, Value(std::move(t))));
  }
  mark_int_key_dicts(*s.root, int_key_dicts_);
  return s;
}

Result<std::unique_ptr<StateReader>> StateReader::open(const std::string& path,
                                                      const checkpoint::OpenOptions& options) {
  const Format f = TRY(detect_format(path));
  switch (f) {
    case Format::kDsd:
    case Format::kDcp: return CheckpointReader::open(path, options);
    case Format::kTorchSave: return TreeReader::open_torch(path);
    case Format::kSafetensors: return SafetensorsReader::open(path);
  }
  return make_error(Code::kInternal, "unknown format");
}

Result<std::unique_ptr<StateReader>> StateReader::of(const Dict& state_dict) { return TreeReader::of(state_dict); }

}  // namespace dsd::interop
