// DType <-> at::ScalarType and DLPack's DLDataType.
#pragma once

#include <ATen/dlpack.h>
#include <c10/core/ScalarType.h>

#include "core/base/result.h"
#include "core/tensor/dtype.h"

namespace dsd {

c10::ScalarType to_scalar_type(DType dtype);
// Errors (kDtypeMismatch) for ScalarTypes dsd does not store (quantized, sub-byte...).
Result<DType> dtype_from_scalar_type(c10::ScalarType type);

DLDataType to_dlpack_dtype(DType dtype);
// Errors for vector lanes, unknown codes and widths: an unknown dtype is never defaulted.
Result<DType> dtype_from_dlpack(DLDataType type);

}  // namespace dsd
