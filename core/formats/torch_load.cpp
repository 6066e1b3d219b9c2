// Reading torch.save archives: the zip through libtorch's PyTorchStreamReader, data.pkl
// through the restricted unpickler, then the PickleValue tree into a Value tree.
#include <ATen/ops/empty.h>
#include <caffe2/serialize/inline_container.h>
#include <caffe2/serialize/read_adapter_interface.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <unordered_map>
#include <utility>

#include "core/base/format.h"
#include "core/base/torch_call.h"
#include "core/formats/torch_save.h"
#include "core/tensor/dtype_torch.h"

namespace dsd {

std::string TorchArchive::describe() const {
  if (path.empty()) return "in memory";
  if (offset == 0 && length == UINT64_MAX) return fmt::format("'{}'", path);
  return fmt::format("'{}' [{}, +{})", path, offset, length);
}

const PickleAllowList& torch_save_allow_list() {
  static const PickleAllowList allow = [] {
    PickleAllowList a = {
        {"collections", "OrderedDict"},
        {"collections", "Counter"},
        {"torch._utils", "_rebuild_tensor"},
        {"torch._utils", "_rebuild_tensor_v2"},
        {"torch._utils", "_rebuild_tensor_v3"},
        {"torch._utils", "_rebuild_parameter"},
        {"torch._utils", "_rebuild_parameter_with_state"},
        {"torch._utils", "_rebuild_qtensor"},
        {"torch._utils", "_rebuild_sparse_tensor"},
        {"torch._utils", "_rebuild_meta_tensor_no_storage"},
        {"torch._utils", "_rebuild_nested_tensor"},
        {"torch._utils", "_rebuild_wrapper_subclass"},
        {"torch._utils", "_rebuild_device_tensor_from_cpu_tensor"},
        {"torch._utils", "_rebuild_device_tensor_from_numpy"},
        {"torch._tensor", "_rebuild_from_type_v2"},
        {"torch.nn.parameter", "Parameter"},
        {"torch", "Tensor"},
        {"torch", "Size"},
        // libtorch's torch::pickle_save tags containers with their TorchScript type.
        {"torch.jit._pickle", "restore_type_tag"},
        {"torch.jit._pickle", "build_intlist"},
        {"torch.jit._pickle", "build_doublelist"},
        {"torch.jit._pickle", "build_boollist"},
        {"torch.jit._pickle", "build_tensorlist"},
        {"torch", "device"},
        {"torch.serialization", "_get_layout"},
        {"torch.storage", "UntypedStorage"},
        {"torch.storage", "TypedStorage"},
        {"_codecs", "encode"},
        {"builtins", "bytearray"},
        {"builtins", "bytes"},
        {"builtins", "set"},
        {"builtins", "frozenset"},
        {"builtins", "complex"},
    };
    for (std::string_view storage :
         {"DoubleStorage", "FloatStorage", "HalfStorage", "LongStorage", "IntStorage",
          "ShortStorage", "CharStorage", "ByteStorage", "BoolStorage", "BFloat16Storage",
          "ComplexDoubleStorage", "ComplexFloatStorage", "QUInt8Storage", "QInt8Storage",
          "QInt32Storage", "QUInt4x2Storage", "QUInt2x4Storage"}) {
      a.allow("torch", storage);
    }
    for (std::string_view dtype :
         {"float16", "float32", "float64", "bfloat16", "complex32", "complex64", "complex128",
          "uint8", "int8", "int16", "int32", "int64", "bool", "uint16", "uint32", "uint64",
          "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz",
          "float8_e8m0fnu", "float4_e2m1fn_x2", "qint8", "quint8", "qint32", "quint4x2",
          "quint2x4", "bits8", "bits16", "bits1x8", "bits2x4", "bits4x2"}) {
      a.allow("torch", dtype);
    }
    return a;
  }();
  return allow;
}

namespace {

using caffe2::serialize::PyTorchStreamReader;
using caffe2::serialize::ReadAdapterInterface;

// A byte range of an open file; owns the descriptor. Remembers the last read error so that
// an I/O failure surfaces as kIo rather than as a corrupt zip.
class FileRange final : public ReadAdapterInterface {
 public:
  FileRange(int fd, uint64_t base, uint64_t size) : fd_(fd), base_(base), size_(size) {}
  ~FileRange() override { ::close(fd_); }
  FileRange(const FileRange&) = delete;
  FileRange& operator=(const FileRange&) = delete;

  size_t size() const override { return size_; }
  size_t read(uint64_t pos, void* buf, size_t n, const char* /*what*/) const override {
    if (pos >= size_) return 0;
    n = static_cast<size_t>(std::min<uint64_t>(n, size_ - pos));
    size_t done = 0;
    while (done < n) {
      const ssize_t r = ::pread(fd_, static_cast<char*>(buf) + done, n - done,
                                static_cast<off_t>(base_ + pos + done));
      if (r < 0 && errno == EINTR) continue;
      if (r < 0) {
        last_errno_ = errno;
        break;
      }
      if (r == 0) break;
      done += static_cast<size_t>(r);
    }
    return done;
  }
  int last_errno() const { return last_errno_; }
  int fd() const { return fd_; }
  uint64_t base() const { return base_; }

 private:
  int fd_;
  uint64_t base_;
  uint64_t size_;
  mutable int last_errno_ = 0;
};

class MemoryRange final : public ReadAdapterInterface {
 public:
  explicit MemoryRange(std::string_view bytes) : bytes_(bytes) {}
  size_t size() const override { return bytes_.size(); }
  size_t read(uint64_t pos, void* buf, size_t n, const char* /*what*/) const override {
    if (pos >= bytes_.size()) return 0;
    n = std::min<size_t>(n, bytes_.size() - static_cast<size_t>(pos));
    std::memcpy(buf, bytes_.data() + pos, n);
    return n;
  }

 private:
  std::string_view bytes_;
};

// An open archive: the zip reader plus what every reader of it needs.
struct OpenArchive {
  std::shared_ptr<ReadAdapterInterface> adapter;
  const FileRange* file = nullptr;  // when reading a file, for its errno
  std::unique_ptr<PyTorchStreamReader> zip;
  std::string where;  // TorchArchive::describe()
  bool big_endian = false;

  // Runs a zip operation; libtorch's exceptions become kIo after a failed read, kCorrupt
  // otherwise.
  template <class F>
  auto call(std::string_view what, F&& f) {
    auto r = torch_call(Code::kCorrupt, fmt::format("reading torch.save archive {}: {}", where, what),
                        std::forward<F>(f));
    if (!r.ok() && file != nullptr && file->last_errno() != 0) {
      Error e = std::move(r).error();
      e.code = Code::kIo;
      e.message += fmt::format(" ({})", std::strerror(file->last_errno()));
      return decltype(r)(std::move(e));
    }
    return r;
  }
};

Result<OpenArchive> open_archive(const TorchArchive& archive) {
  OpenArchive out;
  out.where = archive.describe();
  if (archive.path.empty()) {
    out.adapter = std::make_shared<MemoryRange>(archive.bytes);
  } else {
    const std::string path(archive.path);
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
      return make_error_at(errno == ENOENT ? Code::kNotFound : Code::kIo, path,
                           "cannot open torch.save archive '{}': {}", path, std::strerror(errno));
    }
    struct stat st {};
    if (::fstat(fd, &st) != 0) {
      const int e = errno;
      ::close(fd);
      return make_error_at(Code::kIo, path, "cannot stat '{}': {}", path, std::strerror(e));
    }
    const auto file_size = static_cast<uint64_t>(st.st_size);
    uint64_t length = archive.length;
    if (length == UINT64_MAX) length = file_size >= archive.offset ? file_size - archive.offset : 0;
    if (archive.offset > file_size || length > file_size - archive.offset) {
      ::close(fd);
      return make_error_at(Code::kCorrupt, path,
                           "torch.save archive {} runs past the end of the file ({} bytes)",
                           out.where, file_size);
    }
    auto range = std::make_shared<FileRange>(fd, archive.offset, length);
    out.file = range.get();
    out.adapter = std::move(range);
  }
  // torch.save's pre-1.6 format (_use_new_zipfile_serialization=False) is a sequence of
  // pickles starting with a protocol-2 magic number, not a zip.
  char magic[2] = {0, 0};
  if (out.adapter->read(0, magic, 2, "magic") == 2 && magic[0] == '\x80' && magic[1] == '\x02') {
    return make_error(Code::kUnsupported, "{} is in torch.save's legacy (pre-1.6, non-zip) format, which dsd "
                      "does not read; re-save it with a current PyTorch", out.where);
  }
  out.zip = TRY(out.call("opening the zip", [&] {
    return std::make_unique<PyTorchStreamReader>(out.adapter);
  }));
  const bool has_byteorder = TRY(out.call("looking for byteorder", [&] { return out.zip->hasRecord("byteorder"); }));
  if (has_byteorder) {
    auto [ptr, size] = TRY(out.call("reading byteorder", [&] { return out.zip->getRecord("byteorder"); }));
    const std::string_view order(static_cast<const char*>(ptr.get()), size);
    if (order != "little" && order != "big") {
      return make_error(Code::kCorrupt, "torch.save archive {} has an unknown byteorder {}", out.where,
                        pickle_repr(PickleValue::bytes(std::string(order.substr(0, 16)))));
    }
    out.big_endian = order == "big";
  }
  return out;
}

Result<PickleValue> read_data_pkl(OpenArchive& a) {
  const bool torchscript = TRY(a.call("listing records", [&] { return a.zip->hasRecord("constants.pkl"); }));
  if (torchscript) {
    return make_error(Code::kUnsupported, "{} is a TorchScript archive, not a torch.save file", a.where);
  }
  const bool has_pkl = TRY(a.call("looking for data.pkl", [&] { return a.zip->hasRecord("data.pkl"); }));
  if (!has_pkl) return make_error(Code::kCorrupt, "torch.save archive {} has no data.pkl record", a.where);
  const size_t size = TRY(a.call("sizing data.pkl", [&] { return a.zip->getRecordSize("data.pkl"); }));
  if (size > a.adapter->size()) {
    return make_error(Code::kCorrupt, "torch.save archive {}: data.pkl claims {} bytes, more than the archive",
                      a.where, size);
  }
  auto [ptr, n] = TRY(a.call("reading data.pkl", [&] { return a.zip->getRecord("data.pkl"); }));
  PickleReadOptions options;
  options.allow = &torch_save_allow_list();
  options.allow_persistent_ids = true;
  Result<PickleValue> root = pickle_loads(std::string_view(static_cast<const char*>(ptr.get()), n), options);
  if (!root.ok()) return std::move(root).error().with_prefix(fmt::format("torch.save archive {}: data.pkl: ", a.where));
  return root;
}

// ---- tensors ------------------------------------------------------------------------------

// A storage as a persistent id names it: ("storage", class, key, location, numel).
struct StorageRef {
  std::string key;
  std::optional<DType> typed;  // the legacy storage class's dtype; nullopt for UntypedStorage
  uint64_t nbytes = 0;
};

// What a `_rebuild_tensor_v2/v3` call describes.
struct TensorCall {
  StorageRef storage;
  DType dtype = DType::kFloat32;
  int64_t storage_offset = 0;
  std::vector<int64_t> sizes;
  std::vector<int64_t> strides;
  bool conj = false;
  bool neg = false;
};

std::string_view text_of(const PickleValue& v) {
  if (const std::string* s = v.if_str()) return *s;
  if (const std::string* b = v.if_bytes()) return *b;  // Python 2 era ids are bytes
  return {};
}

// The dims of a torch.Size object (`torch.Size((2, 3))`), or nullptr.
const std::vector<PickleValue>* torch_size_dims(const PickleObject& o) {
  if (!o.is("torch", "Size")) return nullptr;
  const PickleTuple* args = o.args.if_tuple();
  if (args == nullptr || args->items.size() != 1 || args->items[0].if_tuple() == nullptr) return nullptr;
  return &args->items[0].if_tuple()->items;
}

// A tuple (or torch.Size) of non-negative ints: a tensor's size or stride.
Result<std::vector<int64_t>> int_tuple(const PickleValue& v, std::string_view what) {
  const std::vector<PickleValue>* items = nullptr;
  if (const PickleTuple* t = v.if_tuple()) items = &t->items;
  if (const PickleObject* o = v.if_object()) items = torch_size_dims(*o);
  if (items == nullptr) {
    return make_error(Code::kCorrupt, "the tensor's {} is {}, not a tuple of ints", what, pickle_repr(v));
  }
  std::vector<int64_t> out;
  out.reserve(items->size());
  for (const PickleValue& item : *items) {
    const int64_t* i = item.if_int();
    if (i == nullptr || *i < 0) {
      return make_error(Code::kCorrupt, "the tensor's {} {} holds something other than non-negative ints",
                        what, pickle_repr(v));
    }
    out.push_back(*i);
  }
  return out;
}

Result<DType> dtype_of_global(const PickleValue& v) {
  const PickleGlobal* g = v.if_global();
  if (g == nullptr || g->module != "torch") {
    return make_error(Code::kCorrupt, "{} is not a torch dtype", pickle_repr(v));
  }
  std::optional<DType> d = dtype_from_name(g->name);
  if (!d) return make_error(Code::kDtypeMismatch, "dtype torch.{} is not supported by dsd", g->name);
  return *d;
}

Result<StorageRef> storage_ref(const PickleValue& v) {
  const PicklePersistentId* pid = v.if_persistent_id();
  const PickleTuple* t = pid != nullptr ? pid->id.if_tuple() : nullptr;
  if (t == nullptr || t->items.size() != 5 || text_of(t->items[0]) != "storage") {
    return make_error(Code::kCorrupt, "the tensor's storage is {}, not a persistent id "
                      "('storage', class, key, location, numel)", pickle_repr(v));
  }
  const auto& id = t->items;
  const PickleGlobal* cls = id[1].if_global();
  const int64_t* numel = id[4].if_int();
  std::string_view key = text_of(id[2]);
  if (cls == nullptr || numel == nullptr || *numel < 0 || key.empty() || key.size() > 64) {
    return make_error(Code::kCorrupt, "malformed storage persistent id {}", pickle_repr(pid->id));
  }
  StorageRef ref;
  ref.key = std::string(key);
  uint64_t elem = 1;
  if (cls->is("torch.storage", "UntypedStorage")) {
    ref.typed.reset();
  } else {
    std::optional<DType> d = cls->module == "torch" ? dtype_from_torch_storage_class(cls->name) : std::nullopt;
    if (!d) return make_error(Code::kUnsupported, "storage class {} is not supported by dsd", cls->full_name());
    ref.typed = *d;
    elem = element_size(*d);
  }
  if (static_cast<uint64_t>(*numel) > (uint64_t{1} << 62) / elem) {
    return make_error(Code::kCorrupt, "storage '{}' claims an absurd size of {} elements", ref.key, *numel);
  }
  ref.nbytes = static_cast<uint64_t>(*numel) * elem;
  return ref;
}

Status read_tensor_metadata(const PickleValue& v, TensorCall& call) {
  const PickleDict* d = v.if_dict();
  if (d == nullptr) return make_error(Code::kCorrupt, "tensor metadata {} is not a dict", pickle_repr(v));
  for (const auto& [k, val] : d->items) {
    const bool* b = val.if_bool();
    if (k.if_str() != nullptr && *k.if_str() == "conj" && b != nullptr) {
      call.conj = *b;
    } else if (k.if_str() != nullptr && *k.if_str() == "neg" && b != nullptr) {
      call.neg = *b;
    } else {
      return make_error(Code::kUnsupported, "tensor metadata {} is not supported", pickle_repr(v));
    }
  }
  return ok();
}

// `_rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks[, metadata])` or
// `_rebuild_tensor_v3(..., hooks, dtype[, metadata])`.
Result<TensorCall> tensor_call_args(bool v3, const PickleTuple& args) {
  const auto& a = args.items;
  const size_t base = v3 ? 7 : 6;
  if (a.size() != base && a.size() != base + 1) {
    return make_error(Code::kCorrupt, "_rebuild_tensor_v{} takes {} or {} arguments, got {}", v3 ? 3 : 2,
                      base, base + 1, a.size());
  }
  TensorCall call;
  call.storage = TRY(storage_ref(a[0]));
  const int64_t* offset = a[1].if_int();
  if (offset == nullptr || *offset < 0) {
    return make_error(Code::kCorrupt, "the tensor's storage offset is {}", pickle_repr(a[1]));
  }
  call.storage_offset = *offset;
  call.sizes = TRY(int_tuple(a[2], "size"));
  call.strides = TRY(int_tuple(a[3], "stride"));
  if (call.sizes.size() != call.strides.size()) {
    return make_error(Code::kCorrupt, "the tensor has {} sizes but {} strides", call.sizes.size(),
                      call.strides.size());
  }
  if (a[4].if_bool() == nullptr) {
    return make_error(Code::kCorrupt, "the tensor's requires_grad is {}", pickle_repr(a[4]));
  }
  if (v3) {
    call.dtype = TRY(dtype_of_global(a[6]));
  } else if (call.storage.typed) {
    call.dtype = *call.storage.typed;
  } else {
    return make_error(Code::kCorrupt, "_rebuild_tensor_v2 on an UntypedStorage has no dtype");
  }
  if (a.size() == base + 1) TRY(read_tensor_metadata(a[base], call));
  return call;
}

// Unwraps nn.Parameter and `_rebuild_from_type_v2` down to the tensor call; nullopt when
// `o` is not a tensor at all.
Result<std::optional<TensorCall>> as_tensor_call(const PickleObject& o) {
  const PickleGlobal* g = o.global();
  const PickleTuple* args = o.args.if_tuple();
  if (g == nullptr || args == nullptr || o.via != PickleObject::Via::kReduce) return std::optional<TensorCall>();
  const auto& a = args->items;
  if (g->module == "torch._utils") {
    if (g->name == "_rebuild_tensor_v2" || g->name == "_rebuild_tensor_v3") {
      return std::optional(TRY(tensor_call_args(g->name == "_rebuild_tensor_v3", *args)));
    }
    if (g->name == "_rebuild_parameter" || g->name == "_rebuild_parameter_with_state") {
      const PickleObject* data = a.empty() ? nullptr : a[0].if_object();
      std::optional<TensorCall> inner;
      if (data != nullptr) inner = TRY(as_tensor_call(*data));
      if (!inner) return make_error(Code::kCorrupt, "{} of something that is not a tensor", g->name);
      return inner;
    }
    return make_error(Code::kUnsupported, "tensors rebuilt by torch._utils.{} (quantized, sparse, nested, "
                      "meta or subclass tensors) are not supported by dsd", g->name);
  }
  if (g->is("torch._tensor", "_rebuild_from_type_v2")) {
    if (a.size() != 4 || a[0].if_global() == nullptr || a[1].if_global() == nullptr ||
        a[2].if_tuple() == nullptr) {
      return make_error(Code::kCorrupt, "malformed _rebuild_from_type_v2 call {}", pickle_repr(o.args));
    }
    const PickleGlobal& type = *a[1].if_global();
    if (!type.is("torch", "Tensor") && !type.is("torch.nn.parameter", "Parameter")) {
      return make_error(Code::kUnsupported, "tensor subclass {} is not supported by dsd", type.full_name());
    }
    PickleObject inner;
    inner.callable = a[0];
    inner.args = a[2];
    std::optional<TensorCall> call = TRY(as_tensor_call(inner));
    if (!call) return make_error(Code::kCorrupt, "_rebuild_from_type_v2 of {}", a[0].if_global()->full_name());
    return call;
  }
  return std::optional<TensorCall>();
}

bool mul_overflows(uint64_t a, uint64_t b, uint64_t* out) { return __builtin_mul_overflow(a, b, out); }

// The bytes the tensor reaches into its storage: (offset + sum((size-1)*stride) + 1) elements;
// 0 for an empty tensor. Checked against overflow.
Result<uint64_t> tensor_extent_bytes(const TensorCall& c) {
  for (int64_t s : c.sizes) {
    if (s == 0) return uint64_t{0};
  }
  uint64_t last = static_cast<uint64_t>(c.storage_offset);
  for (size_t i = 0; i < c.sizes.size(); ++i) {
    uint64_t step = 0;
    if (mul_overflows(static_cast<uint64_t>(c.sizes[i] - 1), static_cast<uint64_t>(c.strides[i]), &step) ||
        __builtin_add_overflow(last, step, &last)) {
      return make_error(Code::kCorrupt, "the tensor's extent overflows");
    }
  }
  uint64_t bytes = 0;
  if (__builtin_add_overflow(last, uint64_t{1}, &last) || mul_overflows(last, element_size(c.dtype), &bytes)) {
    return make_error(Code::kCorrupt, "the tensor's extent overflows");
  }
  return bytes;
}

// Swaps each element of `data` from big- to little-endian (complex numbers part by part).
void byteswap(char* data, uint64_t nbytes, size_t width) {
  if (width <= 1) return;
  for (uint64_t i = 0; i + width <= nbytes; i += width) std::reverse(data + i, data + i + width);
}

size_t swap_width(DType dtype) {
  const bool complex = dtype == DType::kComplex64 || dtype == DType::kComplex128;
  return complex ? element_size(dtype) / 2 : element_size(dtype);
}

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
