// Writing torch.save archives: the Value tree becomes a PickleValue tree (tensors as
// `_rebuild_tensor_v2/_v3` on persistent-id storages), pickled with protocol 2, and the
// records go through libtorch's PyTorchStreamWriter into a ByteSink.
#include <ATen/ops/empty.h>
#include <caffe2/serialize/inline_container.h>
#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <unordered_map>

#include "core/base/make_error.h"
#include "core/base/torch_call.h"
#include "core/formats/torch_save.h"
#include "core/tensor/dtype_torch.h"

namespace dsd {
namespace {

// torch.save's .storage_alignment (torch.utils.serialization.config.save.storage_alignment).
constexpr uint64_t kStorageAlignment = 64;

struct SavedStorage {
  std::string key;
  at::Storage storage;
  DType dtype;
  at::Tensor placeholder;  // a meta tensor whose data TorchSaveOptions::tensor_data supplies
};

class Saver {
 public:
  explicit Saver(const TorchSaveOptions& options) : options_(options) {}

  Result<PickleValue> value(const Value& v, bool top, const std::string& where) {
    switch (v.kind()) {
      case Kind::kNone: return PickleValue();
      case Kind::kBool: return PickleValue::boolean(*v.if_bool());
      case Kind::kInt: return PickleValue::integer(*v.if_int());
      case Kind::kDouble: return PickleValue::floating(*v.if_double());
      case Kind::kString: return PickleValue::str(*v.if_string());
      case Kind::kBytes: return PickleValue::bytes(v.if_bytes()->data);
      case Kind::kTensor: return tensor(*v.if_tensor(), where);
      case Kind::kList: {
        const List& list = *v.if_list();
        std::vector<PickleValue> items;
        items.reserve(list.size());
        for (size_t i = 0; i < list.size(); ++i) {
          items.push_back(TRY(value(list[i], false, join(where, std::to_string(i)))));
        }
        return list.is_tuple() ? PickleValue::tuple(std::move(items)) : PickleValue::list(std::move(items));
      }
      case Kind::kDict: return dict(*v.if_dict(), top, where);
    }
    return make_error(Code::kInternal, "unknown Value kind");
  }

  const std::vector<SavedStorage>& storages() const { return storages_; }

 private:
  static std::string join(const std::string& where, std::string_view key) {
    return where.empty() ? std::string(key) : where + "." + std::string(key);
  }

  Result<PickleValue> dict(const Dict& d, bool top, const std::string& where) {
    std::vector<std::pair<PickleValue, PickleValue>> items;
    items.reserve(d.size());
    for (const auto& [key, v] : d) {
      PickleValue k;
      if (d.int_keys()) {
        if (!is_int_key(key)) {
          return make_error_at(Code::kInvalidArgument, join(where, key),
                               "dict '{}' has int keys, but '{}' is not an int", where, key);
        }
        k = PickleValue::integer(std::stoll(key));
      } else {
        k = PickleValue::str(key);
      }
      PickleValue item = TRY(value(v, false, join(where, key)));
      items.emplace_back(std::move(k), std::move(item));
    }
    if (!(top && options_.ordered_dict)) return PickleValue::dict(std::move(items));
    auto od = std::make_shared<PickleObject>();
    od->callable = collections_ordered_dict_;
    od->args = PickleValue::tuple({});
    od->dict_items = std::move(items);
    return PickleValue::from(std::move(od));
  }

  Result<PickleValue> tensor(const TensorValue& tv, const std::string& where) {
    if (tv.is_dist()) {
      return make_error_at(Code::kUnsupported, where,
                           "'{}' is a distributed tensor; torch.save files hold whole tensors (gather it first)",
                           where);
    }
    at::Tensor t = tv.tensor;
    if (!t.defined()) return make_error_at(Code::kInvalidArgument, where, "tensor '{}' is undefined", where);
    const bool placeholder = t.device().is_meta() && options_.tensor_data;
    if (t.layout() != at::kStrided || t.is_quantized() || (t.device().is_meta() && !placeholder)) {
      return make_error_at(Code::kUnsupported, where, "tensor '{}' is not a dense tensor with data", where);
    }
    if (placeholder && (!t.is_contiguous() || t.storage_offset() != 0)) {
      return make_error_at(Code::kInvalidArgument, where, "placeholder '{}' is not a contiguous tensor", where);
    }
    if (t.is_conj() || t.is_neg()) {
      t = TRY(torch_call(Code::kInternal, "resolving a conj/neg view", [&] { return t.resolve_conj().resolve_neg(); }));
    }
    Result<DType> dtype = dtype_from_scalar_type(t.scalar_type());
    if (!dtype.ok()) return std::move(dtype).error().with_prefix(fmt::format("tensor '{}': ", where));
    const SavedStorage& saved = *TRY(storage_of(t, *dtype, where));

    const std::string_view legacy = torch_storage_class(*dtype);
    const uint64_t nbytes = saved.storage.nbytes();
    PickleValue cls = legacy.empty() ? PickleValue::global("torch.storage", "UntypedStorage")
                                     : PickleValue::global("torch", std::string(legacy));
    const uint64_t numel = legacy.empty() ? nbytes : nbytes / element_size(*dtype);
    PickleValue pid = PickleValue::persistent_id(PickleValue::tuple(
        {storage_str_, std::move(cls), PickleValue::str(saved.key), cpu_str_,
         PickleValue::integer(static_cast<int64_t>(numel))}));

    std::vector<PickleValue> sizes;
    std::vector<PickleValue> strides;
    for (int64_t s : t.sizes()) sizes.push_back(PickleValue::integer(s));
    for (int64_t s : t.strides()) strides.push_back(PickleValue::integer(s));
    // A new OrderedDict per tensor, as torch.save writes for the (unused) backward hooks.
    std::vector<PickleValue> args = {std::move(pid),
                                     PickleValue::integer(t.storage_offset()),
                                     PickleValue::tuple(std::move(sizes)),
                                     PickleValue::tuple(std::move(strides)),
                                     PickleValue::boolean(t.requires_grad()),
                                     PickleValue::reduce(collections_ordered_dict_, PickleValue::tuple({}))};
    if (legacy.empty()) {
      args.push_back(PickleValue::global("torch", std::string(dtype_name(*dtype))));
      return PickleValue::reduce(rebuild_v3_, PickleValue::tuple(std::move(args)));
    }
    return PickleValue::reduce(rebuild_v2_, PickleValue::tuple(std::move(args)));
  }

  // The storage entry of `t`, added on first sight: tensors sharing a storage share its key.
  Result<const SavedStorage*> storage_of(const at::Tensor& t, DType dtype, const std::string& where) {
    const c10::StorageImpl* impl = t.storage().unsafeGetStorageImpl();
    auto it = index_.find(impl);
    if (it != index_.end()) {
      const SavedStorage& s = storages_[it->second];
      if (s.dtype != dtype) {
        return make_error_at(Code::kUnsupported, where,
                             "tensor '{}' views storage {} as {}, another tensor as {}; torch.save cannot "
                             "hold one storage under two dtypes",
                             where, s.key, dtype_name(dtype), dtype_name(s.dtype));
      }
      return &s;
    }
    if (t.storage().nbytes() % element_size(dtype) != 0) {
      return make_error_at(Code::kUnsupported, where, "tensor '{}': its storage of {} bytes is not a whole number of {}",
                           where, t.storage().nbytes(), dtype_name(dtype));
    }
    storages_.push_back({std::to_string(storages_.size()), t.storage(), dtype,
                         t.device().is_meta() ? t : at::Tensor()});
    index_.emplace(impl, storages_.size() - 1);
    return &storages_.back();
  }

  const TorchSaveOptions& options_;
  std::vector<SavedStorage> storages_;
  std::unordered_map<const c10::StorageImpl*, size_t> index_;
  const PickleValue collections_ordered_dict_ = PickleValue::global("collections", "OrderedDict");
  const PickleValue rebuild_v2_ = PickleValue::global("torch._utils", "_rebuild_tensor_v2");
  const PickleValue rebuild_v3_ = PickleValue::global("torch._utils", "_rebuild_tensor_v3");
  const PickleValue storage_str_ = PickleValue::str("storage");
  const PickleValue cpu_str_ = PickleValue::str("cpu");
};

// A storage's bytes on the CPU: the storage itself, or a copy of a device storage.
Result<at::Tensor> cpu_bytes(const at::Storage& storage) {
  return torch_call(Code::kDevice, "copying a storage to the CPU", [&] {
    const auto n = static_cast<int64_t>(storage.nbytes());
    at::Tensor bytes = at::empty({0}, at::TensorOptions().dtype(at::kByte).device(storage.device()));
    bytes.set_(storage, 0, {n}, {1});
    return storage.device().is_cpu() ? bytes : bytes.cpu();
  });
}

// The data of a placeholder storage, as a byte tensor of exactly the storage's size.
Result<at::Tensor> placeholder_bytes(const SavedStorage& s, const TorchSaveOptions& options) {
  at::Tensor data = TRY(options.tensor_data(s.placeholder));
  return torch_call(Code::kInternal, "preparing a tensor's data", [&]() -> Result<at::Tensor> {
    if (data.scalar_type() != s.placeholder.scalar_type() || data.sizes() != s.placeholder.sizes()) {
      return make_error(Code::kInternal, "the data supplied for a placeholder of storage {} does not match it", s.key);
    }
    at::Tensor c = data.cpu().resolve_conj().resolve_neg().contiguous();
    if (static_cast<uint64_t>(c.nbytes()) != s.storage.nbytes()) {
      return make_error(Code::kInternal, "the data of storage {} has {} bytes, {} expected", s.key, c.nbytes(),
                        s.storage.nbytes());
    }
    return c.view({-1}).view(at::kByte);
  });
}

// Finishes a writer that failed half-way, so that its destructor has nothing left to throw.
void abandon(caffe2::serialize::PyTorchStreamWriter& writer) noexcept {
  if (writer.finalized()) return;
  try {
    writer.writeEndOfFile();
  } catch (...) {  // NOLINT: the first error is the one reported
  }
}

Status write_archive(const std::string& pickle, const std::vector<SavedStorage>& storages, const ByteSink& sink,
                     const TorchSaveOptions& options) {
  Status sink_status = ok();
  const auto writer_func = [&](const void* data, size_t n) -> size_t {
    if (!sink_status.ok()) return 0;
    sink_status = sink(data, n);
    return sink_status.ok() ? n : 0;
  };
  static const char kEmpty = 0;
  Status status = torch_call(Code::kIo, "writing a torch.save archive", [&]() -> Status {
    caffe2::serialize::PyTorchStreamWriter writer(writer_func, options.compute_crc32, kStorageAlignment);
    try {
      // The records and their order are torch.save's (serialization.py, _save).
      writer.writeRecord("data.pkl", pickle.data(), pickle.size());
      writer.writeRecord(".format_version", "1", 1);
      const std::string alignment = std::to_string(kStorageAlignment);
      writer.writeRecord(".storage_alignment", alignment.data(), alignment.size());
      writer.writeRecord("byteorder", "little", 6);
      for (const SavedStorage& s : storages) {
        Result<at::Tensor> bytes = s.placeholder.defined() ? placeholder_bytes(s, options) : cpu_bytes(s.storage);
        if (!bytes.ok()) {
          abandon(writer);
          return std::move(bytes).error();
        }
        const void* data = bytes->numel() > 0 ? bytes->const_data_ptr() : &kEmpty;
        writer.writeRecord("data/" + s.key, data, s.storage.nbytes());
      }
      writer.writeEndOfFile();
    } catch (...) {
      abandon(writer);
      throw;
    }
    return ok();
  });
  if (!sink_status.ok()) return sink_status;
  return status;
}

Status write_all(int fd, const void* data, size_t n, const std::string& path) {
  const char* p = static_cast<const char*>(data);
  while (n > 0) {
    const ssize_t w = ::write(fd, p, n);
    if (w < 0 && errno == EINTR) continue;
    if (w < 0) {
      return make_error_at(errno == ENOSPC ? Code::kNoSpace : Code::kIo, path, "writing '{}': {}", path,
                           std::strerror(errno));
    }
    p += w;
    n -= static_cast<size_t>(w);
  }
  return ok();
}

}  // namespace

Status torch_save(const Value& root, const ByteSink& sink, const TorchSaveOptions& options) {
  Saver saver(options);
  PickleValue tree = TRY(saver.value(root, true, ""));
  std::string pickle = TRY(pickle_dumps(tree));
  return write_archive(pickle, saver.storages(), sink, options);
}

Status torch_save(const Value& root, const std::string& path, const TorchSaveOptions& options) {
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return make_error_at(Code::kIo, path, "cannot create '{}': {}", path, std::strerror(errno));
  Status status = torch_save(
      root, [&](const void* data, size_t n) { return write_all(fd, data, n, path); }, options);
  if (::close(fd) != 0 && status.ok()) {
    return make_error_at(Code::kIo, path, "closing '{}': {}", path, std::strerror(errno));
  }
  return status;
}

Result<std::string> torch_save_bytes(const Value& root, const TorchSaveOptions& options) {
  std::string out;
  TRY(torch_save(
      root,
      [&](const void* data, size_t n) {
        out.append(static_cast<const char*>(data), n);
        return ok();
      },
      options));
  return out;
}

}  // namespace dsd
