#include "core/formats/dcp_chunks.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>

#include "core/base/make_error.h"
#include "core/base/torch_call.h"

namespace dsd::dcp {
namespace {

Result<TorchArchive> item_range(const std::string& path, const StorageInfo& info) {
  if (info.transform_descriptors && !info.transform_descriptors->empty()) {
    return make_error_at(Code::kUnsupported, path, "DCP item at '{}' [{}, +{}) has stream transforms ({}), "
                         "which dsd does not read", path, info.offset, info.length,
                         info.transform_descriptors->front());
  }
  return TorchArchive::range(path, static_cast<uint64_t>(info.offset), static_cast<uint64_t>(info.length));
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

Result<at::Tensor> read_tensor_chunk(const std::string& path, const StorageInfo& info) {
  const TorchArchive archive = TRY(item_range(path, info));
  Value v = TRY(torch_load(archive));
  if (!v.is_tensor()) {
    return make_error_at(Code::kWrongKind, path, "DCP item {} holds a {}, not a tensor", archive.describe(),
                         kind_name(v.kind()));
  }
  return v.if_tensor()->tensor;
}

Result<Value> read_bytes_item(const std::string& path, const StorageInfo& info) {
  return torch_load(TRY(item_range(path, info)));
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
