// torch_load: a torch.save archive's PickleValue tree (torch_archive.h opens the zip and
// unpickles data.pkl) into a Value tree, each tensor call (torch_tensor_call.h) becoming a
// tensor over its storage record, read or mapped.
#include <ATen/ops/empty.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <unordered_map>
#include <utility>

#include "core/base/make_error.h"
#include "core/base/torch_call.h"
#include "core/formats/torch_archive.h"
#include "core/formats/torch_save.h"
#include "core/formats/torch_tensor_call.h"
#include "core/tensor/dtype_torch.h"

namespace dsd {
namespace {

// A whole file mapped copy-on-write; storages that point into it share it.
struct Mapping {
  void* base = MAP_FAILED;
  size_t size = 0;
  ~Mapping() {
    if (base != MAP_FAILED) ::munmap(base, size);
  }
};

class Loader {
 public:
  Loader(OpenArchive& archive, const TorchLoadOptions& options) : a_(archive), options_(options) {}

  Result<Value> value(const PickleValue& v, const std::string& where) {
    using K = PickleValue::Kind;
    switch (v.kind()) {
      case K::kNone: return Value();
      case K::kBool: return Value(*v.if_bool());
      case K::kInt: return Value(*v.if_int());
      case K::kFloat: return Value(*v.if_float());
      case K::kStr: return Value(*v.if_str());
      case K::kBytes: return Value(Bytes{*v.if_bytes()});
      case K::kList:
      case K::kTuple: {
        const bool tuple = v.kind() == K::kTuple;
        const auto& items = tuple ? v.if_tuple()->items : v.if_list()->items;
        ListPtr out = List::make(tuple);
        out->items().reserve(items.size());
        for (size_t i = 0; i < items.size(); ++i) {
          out->push_back(TRY(value(items[i], join(where, std::to_string(i)))));
        }
        return Value(std::move(out));
      }
      case K::kDict: return dict(v.if_dict()->items, where);
      case K::kObject: return object(*v.if_object(), where);
      case K::kSet:
      case K::kGlobal:
      case K::kPersistentId: break;
    }
    return unsupported(where, fmt::format("a {} ({})", pickle_kind_name(v.kind()), pickle_repr(v)));
  }

  Result<at::Tensor> tensor(const TensorCall& c, const std::string& where) {
    if (options_.on_tensor) options_.on_tensor("data/" + c.storage.key, where);
    at::Storage storage = TRY(load_storage(c.storage, where));
    const uint64_t extent = TRY(tensor_extent_bytes(c));
    if (extent > storage.nbytes()) {
      return make_error_at(Code::kCorrupt, where,
                           "torch.save archive {}: tensor '{}' reaches {} bytes into storage '{}' of {} bytes",
                           a_.where, where, extent, c.storage.key, storage.nbytes());
    }
    if (a_.big_endian && !c.storage.typed && element_size(c.dtype) > 1) {
      return make_error_at(Code::kUnsupported, where,
                           "torch.save archive {}: big-endian {} tensors are not supported", a_.where,
                           dtype_name(c.dtype));
    }
    return torch_call(Code::kInternal, fmt::format("rebuilding tensor '{}'", where), [&] {
      at::Tensor t = at::empty({0}, at::TensorOptions().dtype(to_scalar_type(c.dtype)));
      t.set_(storage, c.storage_offset, c.sizes, c.strides);
      if (c.conj) {
        t._set_conj(true);
        t = t.resolve_conj();
      }
      if (c.neg) {
        t._set_neg(true);
        t = t.resolve_neg();
      }
      return t;
    });
  }

 private:
  static std::string join(const std::string& where, std::string_view key) {
    return where.empty() ? std::string(key) : where + "." + std::string(key);
  }

  Error unsupported(const std::string& where, std::string_view what) const {
    return make_error_at(Code::kUnsupported, where, "torch.save archive {}: {} holds {}, which dsd cannot represent",
                         a_.where, where.empty() ? "the top level" : "'" + where + "'", what);
  }

  Result<Value> dict(const std::vector<std::pair<PickleValue, PickleValue>>& items, const std::string& where) {
    DictPtr out = Dict::make();
    out->reserve(items.size());
    bool str_keys = false;
    bool int_keys = false;
    for (const auto& [k, v] : items) {
      std::string key;
      if (const std::string* s = k.if_str()) {
        key = *s;
        str_keys = true;
      } else if (const int64_t* i = k.if_int()) {
        key = std::to_string(*i);
        int_keys = true;
      } else {
        return unsupported(where, fmt::format("a dict key {}", pickle_repr(k)));
      }
      if (str_keys && int_keys) return unsupported(where, "a dict mixing str and int keys");
      Value item = TRY(value(v, join(where, key)));
      out->set(std::move(key), std::move(item));
    }
    out->set_int_keys(int_keys);
    return Value(std::move(out));
  }

  Result<Value> object(const PickleObject& o, const std::string& where) {
    if (o.is("collections", "OrderedDict")) {
      const PickleTuple* args = o.args.if_tuple();
      if (args == nullptr || !args->items.empty() || !o.list_items.empty()) {
        return unsupported(where, fmt::format("an OrderedDict built as {}", pickle_repr(o.args)));
      }
      // Its state is nn.Module.state_dict()'s `_metadata` attribute, which Value cannot hold.
      return dict(o.dict_items, where);
    }
    if (const PickleGlobal* g = o.global(); g != nullptr && g->module == "torch.jit._pickle") {
      // restore_type_tag(value, "Dict[str, Tensor]") and build_*list(list) return their first
      // argument with a TorchScript type attached, which Value has no use for.
      const PickleTuple* args = o.args.if_tuple();
      if (args == nullptr || args->items.empty()) return unsupported(where, pickle_repr(o.args));
      return value(args->items[0], where);
    }
    if (const std::vector<PickleValue>* dims = torch_size_dims(o)) {
      ListPtr out = List::make(true);
      for (const PickleValue& d : *dims) {
        if (d.if_int() == nullptr) return unsupported(where, fmt::format("torch.Size{}", pickle_repr(o.args)));
        out->push_back(Value(*d.if_int()));
      }
      return Value(std::move(out));
    }
    Result<std::optional<TensorCall>> call = as_tensor_call(o);
    if (!call.ok()) {
      Error e = std::move(call).error();
      return make_error_at(e.code, where, "torch.save archive {}: '{}': {}", a_.where, where, e.message);
    }
    if (*call) return Value(TRY(tensor(**call, where)));
    const PickleGlobal* g = o.global();
    return unsupported(where, fmt::format("an object of class {}", g != nullptr ? g->full_name() : "?"));
  }

  Result<at::Storage> load_storage(const StorageRef& ref, const std::string& where) {
    auto it = storages_.find(ref.key);
    if (it != storages_.end()) return it->second;
    const std::string name = "data/" + ref.key;
    const bool present = TRY(a_.call("looking for " + name, [&] { return a_.zip->hasRecord(name); }));
    if (!present) {
      return make_error_at(Code::kCorrupt, where, "torch.save archive {}: tensor '{}' needs record {}, which is missing",
                           a_.where, where, name);
    }
    const size_t size = TRY(a_.call("sizing " + name, [&] { return a_.zip->getRecordSize(name); }));
    if (size != ref.nbytes) {
      return make_error_at(Code::kCorrupt, where, "torch.save archive {}: record {} has {} bytes, its storage says {}",
                           a_.where, name, size, ref.nbytes);
    }
    if (options_.mmap && a_.file != nullptr && !a_.big_endian && ref.nbytes > 0) {
      std::optional<at::Storage> mapped = TRY(map_storage(name, ref));
      if (mapped) {
        storages_.emplace(ref.key, *mapped);
        return *mapped;
      }
    }
    at::Tensor bytes = TRY(torch_call(Code::kOutOfMemory, fmt::format("allocating storage {}", name), [&] {
      return at::empty({static_cast<int64_t>(ref.nbytes)}, at::TensorOptions().dtype(at::kByte));
    }));
    if (ref.nbytes > 0) {
      TRY(a_.call(fmt::format("reading {}", name), [&] { a_.zip->getRecord(name, bytes.data_ptr(), ref.nbytes); }));
    }
    if (a_.big_endian && ref.typed) byteswap(static_cast<char*>(bytes.data_ptr()), ref.nbytes, swap_width(*ref.typed));
    at::Storage storage = bytes.storage();
    storages_.emplace(ref.key, storage);
    return storage;
  }

  // The record's bytes inside a mapping of the file, when stored uncompressed, inside the
  // archive and aligned for the dtype; nullopt to read it instead.
  Result<std::optional<at::Storage>> map_storage(const std::string& name, const StorageRef& ref) {
    const size_t offset = TRY(a_.call("locating " + name, [&] { return a_.zip->getRecordOffset(name); }));
    const size_t align = ref.typed ? element_size(*ref.typed) : 16;
    const uint64_t at = a_.file->base() + offset;
    if (offset > a_.adapter->size() || ref.nbytes > a_.adapter->size() - offset || at % align != 0) {
      return std::optional<at::Storage>();
    }
    if (!mapping_) {
      struct stat st {};
      if (::fstat(a_.file->fd(), &st) != 0) return std::optional<at::Storage>();
      auto m = std::make_shared<Mapping>();
      m->size = static_cast<size_t>(st.st_size);
      m->base = ::mmap(nullptr, m->size, PROT_READ | PROT_WRITE, MAP_PRIVATE, a_.file->fd(), 0);
      if (m->base == MAP_FAILED) return std::optional<at::Storage>();
      mapping_ = std::move(m);
    }
    if (at + ref.nbytes > mapping_->size) return std::optional<at::Storage>();
    // The storage keeps the mapping alive through its context.
    auto* keep = new std::shared_ptr<Mapping>(mapping_);
    void* data = static_cast<char*>(mapping_->base) + at;
    at::DataPtr ptr(data, keep, [](void* ctx) { delete static_cast<std::shared_ptr<Mapping>*>(ctx); }, at::kCPU);
    return std::optional(at::Storage(at::Storage::use_byte_size_t(), ref.nbytes, std::move(ptr), nullptr, false));
  }

  OpenArchive& a_;
  const TorchLoadOptions& options_;
  std::shared_ptr<Mapping> mapping_;
  std::unordered_map<std::string, at::Storage> storages_;
};

}  // namespace

int64_t TorchTensorRecord::numel() const {
  int64_t n = 1;
  for (int64_t s : sizes) n *= s;
  return n;
}

bool TorchTensorRecord::is_contiguous() const {
  int64_t expected = 1;
  for (size_t i = sizes.size(); i-- > 0;) {
    if (sizes[i] != 1 && strides[i] != expected) return false;
    expected *= sizes[i];
  }
  return true;
}

Result<Value> torch_load(const TorchArchive& archive, const TorchLoadOptions& options) {
  OpenArchive a = TRY(open_archive(archive));
  PickleValue root = TRY(read_data_pkl(a));
  Loader loader(a, options);
  return loader.value(root, "");
}

Result<TorchTensorRecord> torch_locate_tensor(const TorchArchive& archive) {
  OpenArchive a = TRY(open_archive(archive));
  PickleValue root = TRY(read_data_pkl(a));
  const PickleObject* o = root.if_object();
  std::optional<TensorCall> call;
  if (o != nullptr) {
    Result<std::optional<TensorCall>> r = as_tensor_call(*o);
    if (!r.ok()) return std::move(r).error().with_prefix(fmt::format("torch.save archive {}: ", a.where));
    call = std::move(*r);
  }
  if (!call) {
    return make_error(Code::kWrongKind, "torch.save archive {} holds {}, not a tensor", a.where, pickle_repr(root));
  }
  const std::string name = "data/" + call->storage.key;
  const bool present = TRY(a.call("looking for " + name, [&] { return a.zip->hasRecord(name); }));
  if (!present) return make_error(Code::kCorrupt, "torch.save archive {} has no record {}", a.where, name);
  const size_t size = TRY(a.call("sizing " + name, [&] { return a.zip->getRecordSize(name); }));
  const size_t offset = TRY(a.call("locating " + name, [&] { return a.zip->getRecordOffset(name); }));
  const uint64_t extent = TRY(tensor_extent_bytes(*call));
  if (size != call->storage.nbytes || extent > size || offset > a.adapter->size() ||
      size > a.adapter->size() - offset) {
    return make_error(Code::kCorrupt, "torch.save archive {}: record {} ({} bytes at {}) does not hold the tensor "
                      "({} bytes of storage, {} reached)", a.where, name, size, offset, call->storage.nbytes, extent);
  }
  TorchTensorRecord rec;
  rec.dtype = call->dtype;
  rec.sizes = std::move(call->sizes);
  rec.strides = std::move(call->strides);
  rec.storage_offset = call->storage_offset;
  rec.storage_data_offset = offset;
  rec.storage_nbytes = size;
  rec.big_endian = a.big_endian && element_size(call->dtype) > 1;
  rec.conj = call->conj;
  rec.neg = call->neg;
  return rec;
}

}  // namespace dsd
