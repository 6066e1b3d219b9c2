// DType: the element types dsd stores, with their names in every format it speaks.
//
// This header does not need libtorch, so format parsers (and their fuzzers) can use it;
// dtype_torch.h maps to at::ScalarType and DLPack.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string_view>

#include "core/base/result.h"

namespace dsd {

// The numbers are the C ABI's DSD_DTYPE_* values: stable, never renumbered.
enum class DType : int32_t {
  kBool = 1,
  kUInt8 = 2,
  kInt8 = 3,
  kInt16 = 4,
  kInt32 = 5,
  kInt64 = 6,
  kFloat16 = 7,
  kBFloat16 = 8,
  kFloat32 = 9,
  kFloat64 = 10,
  kComplex64 = 11,
  kComplex128 = 12,
  kFloat8E4M3FN = 13,
  kFloat8E5M2 = 14,
  kUInt16 = 15,
  kUInt32 = 16,
  kUInt64 = 17,
};

// Every dtype, in code order.
std::span<const DType> all_dtypes();

// A DType from its C ABI code; nullopt for an unknown code (never a default).
std::optional<DType> dtype_from_code(int32_t code);

size_t element_size(DType dtype);

// PyTorch's name without the "torch." prefix: "float32", "bfloat16", "float8_e4m3fn".
std::string_view dtype_name(DType dtype);
std::optional<DType> dtype_from_name(std::string_view name);

// safetensors' names: "F32", "BF16", "F8_E4M3", "C64"...
std::string_view safetensors_name(DType dtype);
std::optional<DType> dtype_from_safetensors(std::string_view name);

// The legacy storage class torch.save pickles for a dtype ("FloatStorage", "BFloat16Storage");
// "" for dtypes that have none (float8, uint16/32/64: torch.save writes UntypedStorage and
// _rebuild_tensor_v3 with the dtype for those).
std::string_view torch_storage_class(DType dtype);
std::optional<DType> dtype_from_torch_storage_class(std::string_view name);

}  // namespace dsd
