#include "core/tensor/dtype.h"

#include <array>

namespace dsd {
namespace {

struct DTypeInfo {
  DType dtype;
  size_t size;
  std::string_view name;
  std::string_view safetensors;
  std::string_view storage;
};

constexpr std::array<DTypeInfo, 17> kInfo = {{
    {DType::kBool, 1, "bool", "BOOL", "BoolStorage"},
    {DType::kUInt8, 1, "uint8", "U8", "ByteStorage"},
    {DType::kInt8, 1, "int8", "I8", "CharStorage"},
    {DType::kInt16, 2, "int16", "I16", "ShortStorage"},
    {DType::kInt32, 4, "int32", "I32", "IntStorage"},
    {DType::kInt64, 8, "int64", "I64", "LongStorage"},
    {DType::kFloat16, 2, "float16", "F16", "HalfStorage"},
    {DType::kBFloat16, 2, "bfloat16", "BF16", "BFloat16Storage"},
    {DType::kFloat32, 4, "float32", "F32", "FloatStorage"},
    {DType::kFloat64, 8, "float64", "F64", "DoubleStorage"},
    {DType::kComplex64, 8, "complex64", "C64", "ComplexFloatStorage"},
    {DType::kComplex128, 16, "complex128", "C128", "ComplexDoubleStorage"},
    {DType::kFloat8E4M3FN, 1, "float8_e4m3fn", "F8_E4M3", ""},
    {DType::kFloat8E5M2, 1, "float8_e5m2", "F8_E5M2", ""},
    {DType::kUInt16, 2, "uint16", "U16", ""},
    {DType::kUInt32, 4, "uint32", "U32", ""},
    {DType::kUInt64, 8, "uint64", "U64", ""},
}};

constexpr std::array<DType, 17> kAll = [] {
  std::array<DType, 17> out{};
  for (size_t i = 0; i < kInfo.size(); ++i) out[i] = kInfo[i].dtype;
  return out;
}();

const DTypeInfo& info(DType dtype) {
  // Codes are dense from 1; dtype_from_code() guards every value that comes from outside.
  return kInfo[static_cast<size_t>(dtype) - 1];
}

template <class Field>
std::optional<DType> find_by(Field field, std::string_view value) {
  for (const auto& i : kInfo) {
    if (i.*field == value) return i.dtype;
  }
  return std::nullopt;
}

}  // namespace

std::span<const DType> all_dtypes() { return kAll; }

std::optional<DType> dtype_from_code(int32_t code) {
  if (code < 1 || code > static_cast<int32_t>(kInfo.size())) return std::nullopt;
  return static_cast<DType>(code);
}

size_t element_size(DType dtype) { return info(dtype).size; }
std::string_view dtype_name(DType dtype) { return info(dtype).name; }
std::string_view safetensors_name(DType dtype) { return info(dtype).safetensors; }
std::string_view torch_storage_class(DType dtype) { return info(dtype).storage; }

std::optional<DType> dtype_from_name(std::string_view name) {
  if (name.starts_with("torch.")) name.remove_prefix(6);
  return find_by(&DTypeInfo::name, name);
}
std::optional<DType> dtype_from_safetensors(std::string_view name) {
  return find_by(&DTypeInfo::safetensors, name);
}
std::optional<DType> dtype_from_torch_storage_class(std::string_view name) {
  if (name.empty()) return std::nullopt;
  return find_by(&DTypeInfo::storage, name);
}

}  // namespace dsd
