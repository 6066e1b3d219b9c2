#include "core/formats/torch_archive.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>

#include <algorithm>

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

}  // namespace

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

}  // namespace dsd
