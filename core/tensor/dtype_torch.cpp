#include "core/tensor/dtype_torch.h"

#include "core/base/make_error.h"

namespace dsd {

c10::ScalarType to_scalar_type(DType dtype) {
  switch (dtype) {
    case DType::kBool: return c10::ScalarType::Bool;
    case DType::kUInt8: return c10::ScalarType::Byte;
    case DType::kInt8: return c10::ScalarType::Char;
    case DType::kInt16: return c10::ScalarType::Short;
    case DType::kInt32: return c10::ScalarType::Int;
    case DType::kInt64: return c10::ScalarType::Long;
    case DType::kFloat16: return c10::ScalarType::Half;
    case DType::kBFloat16: return c10::ScalarType::BFloat16;
    case DType::kFloat32: return c10::ScalarType::Float;
    case DType::kFloat64: return c10::ScalarType::Double;
    case DType::kComplex64: return c10::ScalarType::ComplexFloat;
    case DType::kComplex128: return c10::ScalarType::ComplexDouble;
    case DType::kFloat8E4M3FN: return c10::ScalarType::Float8_e4m3fn;
    case DType::kFloat8E5M2: return c10::ScalarType::Float8_e5m2;
    case DType::kUInt16: return c10::ScalarType::UInt16;
    case DType::kUInt32: return c10::ScalarType::UInt32;
    case DType::kUInt64: return c10::ScalarType::UInt64;
  }
  return c10::ScalarType::Undefined;
}

Result<DType> dtype_from_scalar_type(c10::ScalarType type) {
  switch (type) {
    case c10::ScalarType::Bool: return DType::kBool;
    case c10::ScalarType::Byte: return DType::kUInt8;
    case c10::ScalarType::Char: return DType::kInt8;
    case c10::ScalarType::Short: return DType::kInt16;
    case c10::ScalarType::Int: return DType::kInt32;
    case c10::ScalarType::Long: return DType::kInt64;
    case c10::ScalarType::Half: return DType::kFloat16;
    case c10::ScalarType::BFloat16: return DType::kBFloat16;
    case c10::ScalarType::Float: return DType::kFloat32;
    case c10::ScalarType::Double: return DType::kFloat64;
    case c10::ScalarType::ComplexFloat: return DType::kComplex64;
    case c10::ScalarType::ComplexDouble: return DType::kComplex128;
    case c10::ScalarType::Float8_e4m3fn: return DType::kFloat8E4M3FN;
    case c10::ScalarType::Float8_e5m2: return DType::kFloat8E5M2;
    case c10::ScalarType::UInt16: return DType::kUInt16;
    case c10::ScalarType::UInt32: return DType::kUInt32;
    case c10::ScalarType::UInt64: return DType::kUInt64;
    default: break;
  }
  return make_error(Code::kDtypeMismatch, "dtype {} is not supported by dsd", c10::toString(type));
}

DLDataType to_dlpack_dtype(DType dtype) {
  const auto bits = static_cast<uint8_t>(element_size(dtype) * 8);
  switch (dtype) {
    case DType::kBool: return {kDLBool, 8, 1};
    case DType::kUInt8:
    case DType::kUInt16:
    case DType::kUInt32:
    case DType::kUInt64: return {kDLUInt, bits, 1};
    case DType::kInt8:
    case DType::kInt16:
    case DType::kInt32:
    case DType::kInt64: return {kDLInt, bits, 1};
    case DType::kFloat16:
    case DType::kFloat32:
    case DType::kFloat64: return {kDLFloat, bits, 1};
    case DType::kBFloat16: return {kDLBfloat, 16, 1};
    case DType::kComplex64:
    case DType::kComplex128: return {kDLComplex, bits, 1};
    case DType::kFloat8E4M3FN: return {kDLFloat8_e4m3fn, 8, 1};
    case DType::kFloat8E5M2: return {kDLFloat8_e5m2, 8, 1};
  }
  return {kDLOpaqueHandle, 0, 0};
}

Result<DType> dtype_from_dlpack(DLDataType type) {
  if (type.lanes != 1) {
    return make_error(Code::kDtypeMismatch, "DLPack dtype with {} lanes is not supported",
                      type.lanes);
  }
  for (DType d : all_dtypes()) {
    const DLDataType t = to_dlpack_dtype(d);
    if (t.code == type.code && t.bits == type.bits) return d;
  }
  // PyTorch exported bool as kDLUInt/8 before DLPack had kDLBool; that is uint8, not bool.
  return make_error(Code::kDtypeMismatch, "DLPack dtype (code {}, {} bits) is not supported",
                    static_cast<int>(type.code), static_cast<int>(type.bits));
}

}  // namespace dsd
