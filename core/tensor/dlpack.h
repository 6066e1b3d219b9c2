// DLPack import and export.
//
// Import takes ownership of the producer's managed tensor: its deleter runs exactly once,
// when the last dsd reference to the data is gone, or before import returns if it fails.
// Export hands out a managed tensor that keeps a reference to the at::Tensor until the
// consumer calls its deleter.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/dlpack.h>
#include <c10/core/Device.h>

#include <functional>
#include <span>

#include "core/base/result.h"
#include "core/tensor/dtype.h"

namespace dsd {

struct ImportedTensor {
  at::Tensor tensor;
  bool read_only = false;  // DLPACK_FLAG_BITMASK_READ_ONLY was set by the producer
};

// DLPack v0, the legacy "dltensor" capsule payload.
Result<ImportedTensor> import_dlpack(DLManagedTensor* src);
// DLPack v1, what __dlpack__(max_version=(1, 0)) gives ("dltensor_versioned").
// A major version other than 1 is refused (after calling the deleter, as the spec asks).
Result<ImportedTensor> import_dlpack_versioned(DLManagedTensorVersioned* src);

Result<DLManagedTensor*> export_dlpack(const at::Tensor& tensor);
Result<DLManagedTensorVersioned*> export_dlpack_versioned(const at::Tensor& tensor,
                                                          bool read_only);

// Memory the caller owns, described by hand. `release` (may be empty) runs once when the last
// dsd reference is gone; without it the caller must keep the memory alive for as long as any
// dsd object refers to it.
struct Blob {
  void* data = nullptr;
  DType dtype = DType::kFloat32;
  std::span<const int64_t> shape;
  std::span<const int64_t> strides;  // in elements; empty means contiguous
  c10::Device device = c10::Device(c10::DeviceType::CPU);
  std::function<void()> release;
};
Result<at::Tensor> tensor_from_blob(Blob blob);

// DLPack device <-> c10::Device; CUDA needs a libtorch built with CUDA.
Result<c10::Device> device_from_dlpack(DLDevice device);
DLDevice device_to_dlpack(c10::Device device);

}  // namespace dsd
