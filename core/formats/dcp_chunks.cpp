#include "core/formats/dcp_chunks.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>

#include <memory>

#include "core/base/make_error.h"
#include "core/base/torch_call.h"
#include "core/formats/zip_check.h"
#include "core/formats/zstd_stream.h"

namespace dsd::dcp {
namespace {

// Whether the item is stored through DCP's ZStandard transform; refuses any other transform.
// Descriptors are "name[@domain][/version]" as _extension.ExtensionRegistry parses them, and
// ZStandard.from_descriptor accepts major version 1 only.
Result<bool> is_zstd_item(const std::string& path, const StorageInfo& info) {
  if (!info.transform_descriptors || info.transform_descriptors->empty()) return false;
  const std::vector<std::string>& ds = *info.transform_descriptors;
  for (const std::string& d : ds) {
    const size_t slash = d.find('/');
    const std::string_view name = std::string_view(d).substr(0, slash);
    const std::string_view version = slash == std::string::npos ? std::string_view() : std::string_view(d).substr(slash + 1);
    if (name != kZstdTransform || version.substr(0, version.find('.')) != "1") {
      return make_error_at(Code::kUnsupported, path, "DCP item at '{}' [{}, +{}) has the stream transform '{}', which "
                           "dsd does not read (it reads '{}/1')", path, info.offset, info.length, d, kZstdTransform);
    }
  }
  if (ds.size() != 1) {
    return make_error_at(Code::kUnsupported, path, "DCP item at '{}' [{}, +{}) has {} stacked stream transforms, "
                         "which dsd does not read", path, info.offset, info.length, ds.size());
  }
  return true;
}

Result<TorchArchive> item_range(const std::string& path, const StorageInfo& info) {
  if (TRY(is_zstd_item(path, info))) {
    return make_error_at(Code::kUnsupported, path, "DCP item at '{}' [{}, +{}) is zstd-compressed: its bytes cannot "
                         "be located in place", path, info.offset, info.length);
  }
  return TorchArchive::range(path, static_cast<uint64_t>(info.offset), static_cast<uint64_t>(info.length));
}

// The item's archive: in place in its file, or decompressed into memory (`bytes` owns it).
struct ItemArchive {
  std::string bytes;
  TorchArchive archive;
};

Result<std::unique_ptr<ItemArchive>> item_archive(const std::string& path, const StorageInfo& info,
                                                  uint64_t max_item_bytes) {
  auto a = std::make_unique<ItemArchive>();
  if (!TRY(is_zstd_item(path, info))) {
    a->archive = TRY(item_range(path, info));
    return a;
  }
  if (info.offset < 0 || info.length < 0) {
    return make_error_at(Code::kCorrupt, path, "DCP item at '{}' has a negative offset or length", path);
  }
  a->bytes = TRY(zstd_decompress_range(path, static_cast<uint64_t>(info.offset), static_cast<uint64_t>(info.length),
                                       max_item_bytes, "DCP item"));
  // zstd frames as DCP writes them carry no checksum, and torch.load never checks the zip
  // CRC-32s: without this a flipped bit in a compressed block would load as wrong data.
  const std::string where = fmt::format("'{}' [{}, +{}) (decompressed)", path, info.offset, info.length);
  const auto records = TRY(check_zip_memory(a->bytes, where));
  for (const ZipRecordCheck& r : records) {
    if (!r.crc_ok) {
      return make_error_at(Code::kCorrupt, path, "DCP item at {}: CRC-32 mismatch in record '{}'", where, r.name);
    }
  }
  a->archive = TorchArchive::memory(a->bytes);
  return a;
}

// Wraps `sink` so that it also counts what passes through.
ByteSink counting(const ByteSink& sink, uint64_t& count) {
  return [&sink, &count](const void* data, size_t n) {
    count += n;
    return sink(data, n);
  };
}

}  // namespace

Result<TorchTensorRecord> locate_tensor_chunk(const std::string& path, const StorageInfo& info) {
  const TorchArchive archive = TRY(item_range(path, info));
  TorchTensorRecord record = TRY(torch_locate_tensor(archive));
  record.storage_data_offset += archive.offset;
  return record;
}

Result<at::Tensor> read_tensor_chunk(const std::string& path, const StorageInfo& info, uint64_t max_item_bytes) {
  const auto item = TRY(item_archive(path, info, max_item_bytes));
  Value v = TRY(torch_load(item->archive));
  if (!v.is_tensor()) {
    return make_error_at(Code::kWrongKind, path, "DCP item at '{}' [{}, +{}) holds a {}, not a tensor", path,
                         info.offset, info.length, kind_name(v.kind()));
  }
  return v.if_tensor()->tensor;
}

Result<Value> read_bytes_item(const std::string& path, const StorageInfo& info, uint64_t max_item_bytes) {
  const auto item = TRY(item_archive(path, info, max_item_bytes));
  return torch_load(item->archive);
}

Result<uint64_t> write_tensor_chunk(const at::Tensor& tensor, const ByteSink& sink,
                                    const TorchSaveOptions& options) {
  if (!tensor.defined()) return make_error(Code::kInvalidArgument, "the tensor chunk is undefined");
  // An archive that holds only the chunk: a tensor over exactly its bytes (DCP clones views).
  at::Tensor t = tensor.detach();
  at::Tensor exact = TRY(torch_call(Code::kInternal, "preparing a tensor chunk", [&] {
    if (!t.device().is_cpu()) t = t.to(at::kCPU);
    t = t.resolve_conj().resolve_neg().contiguous();
    if (t.numel() == 0) return at::empty(t.sizes(), t.options());
    if (t.storage_offset() == 0 && t.storage().nbytes() == t.nbytes()) return t;
    return at::from_blob(t.data_ptr(), t.sizes(), t.options());
  }));
  uint64_t count = 0;
  TRY(torch_save(Value(exact), counting(sink, count), options));
  return count;
}

Result<uint64_t> write_bytes_item(const Value& value, const ByteSink& sink, const TorchSaveOptions& options) {
  uint64_t count = 0;
  TRY(torch_save(value, counting(sink, count), options));
  return count;
}

}  // namespace dsd::dcp
