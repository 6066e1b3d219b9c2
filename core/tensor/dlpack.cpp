#include "core/tensor/dlpack.h"

#include <ATen/ops/from_blob.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>

#include <memory>
#include <vector>

#include "core/base/make_error.h"
#include "core/base/torch_call.h"
#include "core/tensor/dtype_torch.h"

namespace dsd {
namespace {

// Calls a DLPack deleter exactly once, when the last owner lets go.
template <class Managed>
struct DeleterOnce {
  Managed* managed;
  explicit DeleterOnce(Managed* m) : managed(m) {}
  DeleterOnce(const DeleterOnce&) = delete;
  DeleterOnce& operator=(const DeleterOnce&) = delete;
  ~DeleterOnce() {
    if (managed != nullptr && managed->deleter != nullptr) managed->deleter(managed);
  }
};

bool has_cuda_runtime() { return c10::impl::hasDeviceGuardImpl(c10::DeviceType::CUDA); }

Status check_shape(std::span<const int64_t> shape, std::span<const int64_t> strides) {
  for (size_t i = 0; i < shape.size(); ++i) {
    if (shape[i] < 0) return make_error(Code::kShapeMismatch, "dimension {} has negative size {}", i, shape[i]);
  }
  if (!strides.empty()) {
    if (strides.size() != shape.size()) {
      return make_error(Code::kInvalidArgument, "{} strides given for {} dimensions",
                        strides.size(), shape.size());
    }
    for (size_t i = 0; i < strides.size(); ++i) {
      if (strides[i] < 0) {
        return make_error(Code::kUnsupported, "dimension {} has negative stride {} (unsupported)",
                          i, strides[i]);
      }
    }
  }
  return ok();
}

template <class Managed>
Result<ImportedTensor> import_any(Managed* src, bool read_only) {
  auto owner = std::make_shared<DeleterOnce<Managed>>(src);
  const DLTensor& dl = src->dl_tensor;
  if (dl.ndim < 0) return make_error(Code::kInvalidArgument, "DLPack tensor has ndim {}", dl.ndim);
  const DType dtype = TRY(dtype_from_dlpack(dl.dtype));
  const c10::Device device = TRY(device_from_dlpack(dl.device));
  const std::span<const int64_t> shape(dl.shape, static_cast<size_t>(dl.ndim));
  std::span<const int64_t> strides;
  if (dl.strides != nullptr) strides = {dl.strides, static_cast<size_t>(dl.ndim)};
  TRY(check_shape(shape, strides));
  int64_t numel = 1;
  for (int64_t s : shape) numel *= s;
  if (dl.data == nullptr && numel != 0) {
    return make_error(Code::kInvalidArgument, "DLPack tensor has no data but {} elements", numel);
  }
  void* data = static_cast<char*>(dl.data) + dl.byte_offset;
  at::Tensor t = TRY(torch_call(Code::kInvalidArgument, "importing a DLPack tensor", [&] {
    auto maker = at::for_blob(data, c10::IntArrayRef(shape.data(), shape.size()));
    if (!strides.empty()) maker.strides(c10::IntArrayRef(strides.data(), strides.size()));
    return maker.deleter([owner](void*) {})
        .options(at::TensorOptions().dtype(to_scalar_type(dtype)).device(device))
        .target_device(device)
        .make_tensor();
  }));
  return ImportedTensor{std::move(t), read_only};
}

struct ExportContext {
  at::Tensor tensor;
  std::vector<int64_t> shape;
  std::vector<int64_t> strides;
};

template <class Managed>
Result<Managed*> export_any(const at::Tensor& tensor) {
  if (!tensor.defined()) return make_error(Code::kInvalidArgument, "cannot export an undefined tensor");
  const DType dtype = TRY(dtype_from_scalar_type(tensor.scalar_type()));
  auto ctx = std::make_unique<ExportContext>();
  ctx->tensor = tensor;
  ctx->shape.assign(tensor.sizes().begin(), tensor.sizes().end());
  ctx->strides.assign(tensor.strides().begin(), tensor.strides().end());
  auto managed = std::make_unique<Managed>();
  DLTensor& dl = managed->dl_tensor;
  dl.data = tensor.numel() == 0 ? nullptr : tensor.data_ptr();
  dl.device = device_to_dlpack(tensor.device());
  dl.ndim = static_cast<int32_t>(tensor.dim());
  dl.dtype = to_dlpack_dtype(dtype);
  dl.shape = ctx->shape.data();
  dl.strides = ctx->strides.data();
  dl.byte_offset = 0;
  managed->manager_ctx = ctx.release();
  managed->deleter = [](Managed* self) {
    delete static_cast<ExportContext*>(self->manager_ctx);
    delete self;
  };
  return managed.release();
}

}  // namespace

Result<c10::Device> device_from_dlpack(DLDevice device) {
  switch (device.device_type) {
    case kDLCPU:
    case kDLCUDAHost:  // pinned host memory is ordinary CPU memory to the CPU
      return c10::Device(c10::DeviceType::CPU);
    case kDLCUDA:
      if (!has_cuda_runtime()) {
        return make_error(Code::kDevice,
                          "tensor is on cuda:{} but this libtorch was built without CUDA; "
                          "build dsd against a CUDA PyTorch to use GPU tensors",
                          device.device_id);
      }
      return c10::Device(c10::DeviceType::CUDA, static_cast<c10::DeviceIndex>(device.device_id));
    default:
      return make_error(Code::kDevice, "DLPack device type {} is not supported (CPU and CUDA are)",
                        static_cast<int>(device.device_type));
  }
}

DLDevice device_to_dlpack(c10::Device device) {
  if (device.is_cuda()) return {kDLCUDA, device.index() < 0 ? 0 : device.index()};
  return {kDLCPU, 0};
}

Result<ImportedTensor> import_dlpack(DLManagedTensor* src) {
  if (src == nullptr) return make_error(Code::kInvalidArgument, "src is NULL");
  return import_any(src, false);
}

Result<ImportedTensor> import_dlpack_versioned(DLManagedTensorVersioned* src) {
  if (src == nullptr) return make_error(Code::kInvalidArgument, "src is NULL");
  if (src->version.major != DLPACK_MAJOR_VERSION) {
    DeleterOnce<DLManagedTensorVersioned> owner(src);
    return make_error(Code::kUnsupported, "DLPack major version {} is not supported (dsd reads {})",
                      src->version.major, DLPACK_MAJOR_VERSION);
  }
  if ((src->flags & DLPACK_FLAG_BITMASK_IS_SUBBYTE_TYPE_PADDED) != 0) {
    DeleterOnce<DLManagedTensorVersioned> owner(src);
    return make_error(Code::kUnsupported, "padded sub-byte DLPack tensors are not supported");
  }
  return import_any(src, (src->flags & DLPACK_FLAG_BITMASK_READ_ONLY) != 0);
}

Result<DLManagedTensor*> export_dlpack(const at::Tensor& tensor) {
  return export_any<DLManagedTensor>(tensor);
}

Result<DLManagedTensorVersioned*> export_dlpack_versioned(const at::Tensor& tensor,
                                                          bool read_only) {
  DLManagedTensorVersioned* m = TRY(export_any<DLManagedTensorVersioned>(tensor));
  m->version.major = DLPACK_MAJOR_VERSION;
  m->version.minor = DLPACK_MINOR_VERSION;
  m->flags = read_only ? DLPACK_FLAG_BITMASK_READ_ONLY : 0;
  return m;
}

Result<at::Tensor> tensor_from_blob(Blob blob) {
  // The release callback runs once whatever happens below, like a DLPack deleter.
  struct Release {
    std::function<void()> fn;
    ~Release() {
      if (fn) fn();
    }
  };
  auto owner = std::make_shared<Release>();
  owner->fn = std::move(blob.release);
  TRY(check_shape(blob.shape, blob.strides));
  if (blob.device.is_cuda() && !has_cuda_runtime()) {
    return make_error(Code::kDevice, "tensor is on {} but this libtorch was built without CUDA",
                      blob.device.str());
  }
  int64_t numel = 1;
  for (int64_t s : blob.shape) numel *= s;
  if (blob.data == nullptr && numel != 0) {
    return make_error(Code::kInvalidArgument, "data is NULL for a tensor of {} elements", numel);
  }
  return torch_call(Code::kInvalidArgument, "wrapping caller memory", [&] {
    auto maker = at::for_blob(blob.data, c10::IntArrayRef(blob.shape.data(), blob.shape.size()));
    if (!blob.strides.empty()) maker.strides(c10::IntArrayRef(blob.strides.data(), blob.strides.size()));
    return maker.deleter([owner](void*) {})
        .options(at::TensorOptions().dtype(to_scalar_type(blob.dtype)).device(blob.device))
        .target_device(blob.device)
        .make_tensor();
  });
}

}  // namespace dsd
