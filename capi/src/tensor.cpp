// Tensor handles: DLPack import and export, caller memory, introspection.
#include "capi/src/export.h"

#include <ATen/dlpack.h>

#include <cstring>

#include "capi/src/guard.h"
#include "capi/src/tensors.h"
#include "core/tensor/dlpack.h"
#include "core/tensor/dtype_torch.h"

namespace dsd::capi {

TensorTable& tensor_table() {
  static TensorTable* table = new TensorTable();  // never destroyed: handles outlive statics
  return *table;
}

Status copy_out(std::span<const int64_t> dims, int64_t* out, size_t capacity, const char* what) {
  TRY(require(out, "out"));
  if (capacity < dims.size()) {
    return make_error(Code::kBufferTooSmall, "{} needs room for {} values, {} given", what,
                      dims.size(), capacity);
  }
  std::copy(dims.begin(), dims.end(), out);
  return ok();
}
}  // namespace dsd::capi

using dsd::Code;
using dsd::capi::guard;
using dsd::capi::require;

extern "C" {

dsd_status dsd_tensor_from_dlpack(struct DLManagedTensor* src, dsd_tensor* out, dsd_error** err) {
  // Ownership was passed to us: honour it even when the call is refused before its body.
  if (dsd::capi::err_in_use(err)) {
    if (src != nullptr && src->deleter != nullptr) src->deleter(src);
    return DSD_E_INVALID_ARGUMENT;
  }
  return guard(err, [&]() -> dsd::Status {
    if (out == nullptr) {
      // Ownership was passed to us: honour it even though we cannot answer.
      if (src != nullptr && src->deleter != nullptr) src->deleter(src);
      return dsd::Error(Code::kInvalidArgument, "out is NULL");
    }
    dsd::ImportedTensor t = TRY(dsd::import_dlpack(src));
    *out = dsd::capi::make_handle({std::move(t.tensor), nullptr, t.read_only});
    return dsd::ok();
  });
}

dsd_status dsd_tensor_from_dlpack_versioned(struct DLManagedTensorVersioned* src, dsd_tensor* out,
                                            dsd_error** err) {
  if (dsd::capi::err_in_use(err)) {
    if (src != nullptr && src->deleter != nullptr) src->deleter(src);
    return DSD_E_INVALID_ARGUMENT;
  }
  return guard(err, [&]() -> dsd::Status {
    if (out == nullptr) {
      if (src != nullptr && src->deleter != nullptr) src->deleter(src);
      return dsd::Error(Code::kInvalidArgument, "out is NULL");
    }
    dsd::ImportedTensor t = TRY(dsd::import_dlpack_versioned(src));
    *out = dsd::capi::make_handle({std::move(t.tensor), nullptr, t.read_only});
    return dsd::ok();
  });
}

dsd_status dsd_tensor_from_blob(void* data, dsd_dtype dtype, const int64_t* shape, size_t ndim,
                                const int64_t* strides, dsd_device device, bool read_only,
                                dsd_release_fn release, void* user_data, dsd_tensor* out,
                                dsd_error** err) {
  // The release callback is owed exactly once, whatever happens.
  struct Owed {
    dsd_release_fn fn;
    void* user_data;
    ~Owed() {
      if (fn != nullptr) fn(user_data);
    }
  } owed{release, user_data};
  return guard(err, [&]() -> dsd::Status {
    TRY(require(out, "out"));
    TRY(dsd::capi::check_ndim(ndim, "the tensor"));
    if (ndim > 0) TRY(require(shape, "shape"));
    auto dt = dsd::dtype_from_code(dtype);
    if (!dt) return dsd::make_error(Code::kDtypeMismatch, "unknown dtype code {}", dtype);
    c10::Device dev(c10::DeviceType::CPU);
    if (device.type == DSD_DEVICE_CUDA) {
      dev = c10::Device(c10::DeviceType::CUDA, static_cast<c10::DeviceIndex>(device.index));
    } else if (device.type != DSD_DEVICE_CPU) {
      return dsd::make_error(Code::kDevice, "unknown device type {}", device.type);
    }
    dsd::Blob blob;
    blob.data = data;
    blob.dtype = *dt;
    blob.shape = {shape, ndim};
    if (strides != nullptr) blob.strides = {strides, ndim};
    blob.device = dev;
    if (owed.fn != nullptr) {
      blob.release = [fn = owed.fn, ud = owed.user_data] { fn(ud); };
      owed.fn = nullptr;  // now owed by the blob
    }
    at::Tensor t = TRY(dsd::tensor_from_blob(std::move(blob)));
    *out = dsd::capi::make_handle({std::move(t), nullptr, read_only});
    return dsd::ok();
  });
}

dsd_status dsd_tensor_to_dlpack(dsd_tensor tensor, struct DLManagedTensor** out, dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    TRY(require(out, "out"));
    dsd::TensorValue v = TRY(dsd::capi::lookup(tensor));
    *out = TRY(dsd::export_dlpack(v.tensor));
    return dsd::ok();
  });
}

dsd_status dsd_tensor_to_dlpack_versioned(dsd_tensor tensor, struct DLManagedTensorVersioned** out,
                                          dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    TRY(require(out, "out"));
    dsd::TensorValue v = TRY(dsd::capi::lookup(tensor));
    *out = TRY(dsd::export_dlpack_versioned(v.tensor, v.read_only));
    return dsd::ok();
  });
}

void dsd_dlpack_free(struct DLManagedTensor* tensor) {
  if (tensor != nullptr && tensor->deleter != nullptr) tensor->deleter(tensor);
}

void dsd_dlpack_versioned_free(struct DLManagedTensorVersioned* tensor) {
  if (tensor != nullptr && tensor->deleter != nullptr) tensor->deleter(tensor);
}

dsd_status dsd_tensor_release(dsd_tensor tensor, dsd_error** err) {
  return guard(err, [&]() -> dsd::Status { return dsd::capi::tensor_table().release(tensor.bits); });
}

dsd_status dsd_tensor_retain(dsd_tensor tensor, dsd_tensor* out, dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    TRY(require(out, "out"));
    dsd::TensorValue v = TRY(dsd::capi::lookup(tensor));
    *out = dsd::capi::make_handle(std::move(v));
    return dsd::ok();
  });
}

dsd_status dsd_tensor_info_get(dsd_tensor tensor, dsd_tensor_info* out, dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    TRY(require(out, "out"));
    dsd_tensor_info info{};
    c10::ScalarType type = c10::ScalarType::Undefined;
    // Read in place under the handle's slot lock: no copy of the tensor's reference.
    TRY(dsd::capi::tensor_table().read(tensor.bits, [&](const dsd::TensorValue& v) {
      const at::Tensor& t = v.tensor;
      type = t.scalar_type();
      info.ndim = static_cast<size_t>(t.dim());
      info.device = t.is_cuda() ? dsd_device{DSD_DEVICE_CUDA, t.device().index()}
                                : dsd_device{DSD_DEVICE_CPU, 0};
      info.numel = t.numel();
      info.data = info.numel == 0 ? nullptr : t.data_ptr();
      info.nbytes = static_cast<size_t>(info.numel) * t.element_size();
      info.read_only = v.read_only;
      info.contiguous = t.is_contiguous();
    }));
    info.dtype = static_cast<dsd_dtype>(TRY(dsd::dtype_from_scalar_type(type)));
    *out = info;
    return dsd::ok();
  });
}

namespace {

// Copies a tensor's sizes or strides out, read in place under the handle's slot lock.
dsd::Status copy_dims(dsd_tensor tensor, bool strides, int64_t* out, size_t capacity) {
  TRY(require(out, "out"));
  size_t ndim = 0;
  bool fits = false;
  TRY(dsd::capi::tensor_table().read(tensor.bits, [&](const dsd::TensorValue& v) {
    const c10::IntArrayRef dims = strides ? v.tensor.strides() : v.tensor.sizes();
    ndim = dims.size();
    fits = ndim <= capacity;
    if (fits) std::copy(dims.begin(), dims.end(), out);
  }));
  if (!fits) {
    return dsd::make_error(Code::kBufferTooSmall, "{} needs room for {} values, {} given",
                           strides ? "strides" : "shape", ndim, capacity);
  }
  return dsd::ok();
}

}  // namespace

dsd_status dsd_tensor_shape(dsd_tensor tensor, int64_t* out, size_t capacity, dsd_error** err) {
  return guard(err, [&]() -> dsd::Status { return copy_dims(tensor, false, out, capacity); });
}

dsd_status dsd_tensor_strides(dsd_tensor tensor, int64_t* out, size_t capacity, dsd_error** err) {
  return guard(err, [&]() -> dsd::Status { return copy_dims(tensor, true, out, capacity); });
}

}  // extern "C"
