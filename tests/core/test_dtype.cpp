#include <gtest/gtest.h>

#include <ATen/ops/empty.h>

#include "core/tensor/dtype.h"
#include "core/tensor/dtype_torch.h"

namespace dsd {
namespace {

TEST(DType, EveryDtypeRoundTrips) {
  ASSERT_EQ(all_dtypes().size(), 17u);
  for (DType d : all_dtypes()) {
    SCOPED_TRACE(std::string(dtype_name(d)));
    EXPECT_EQ(dtype_from_code(static_cast<int32_t>(d)), d);
    EXPECT_EQ(*dtype_from_scalar_type(to_scalar_type(d)), d);
    EXPECT_EQ(*dtype_from_dlpack(to_dlpack_dtype(d)), d);
    EXPECT_EQ(dtype_from_safetensors(safetensors_name(d)), d);
    EXPECT_EQ(dtype_from_name(dtype_name(d)), d);
    EXPECT_EQ(dtype_from_name(std::string("torch.") + std::string(dtype_name(d))), d);
    // Sizes agree with libtorch's.
    EXPECT_EQ(element_size(d), c10::elementSize(to_scalar_type(d)));
    if (!torch_storage_class(d).empty()) {
      EXPECT_EQ(dtype_from_torch_storage_class(torch_storage_class(d)), d);
    }
  }
}

TEST(DType, NamesMatchPyTorchAndSafetensors) {
  EXPECT_EQ(dtype_name(DType::kBFloat16), "bfloat16");
  EXPECT_EQ(safetensors_name(DType::kFloat8E4M3FN), "F8_E4M3");
  EXPECT_EQ(safetensors_name(DType::kBool), "BOOL");
  EXPECT_EQ(torch_storage_class(DType::kFloat32), "FloatStorage");
  EXPECT_EQ(torch_storage_class(DType::kInt8), "CharStorage");
}

TEST(DType, UnknownIsAnErrorNeverADefault) {
  EXPECT_FALSE(dtype_from_code(0).has_value());
  EXPECT_FALSE(dtype_from_code(18).has_value());
  EXPECT_FALSE(dtype_from_code(-3).has_value());
  EXPECT_FALSE(dtype_from_safetensors("F4").has_value());
  EXPECT_FALSE(dtype_from_safetensors("").has_value());
  EXPECT_FALSE(dtype_from_name("float128").has_value());
  EXPECT_FALSE(dtype_from_torch_storage_class("").has_value());

  auto quant = dtype_from_scalar_type(c10::ScalarType::QInt8);
  ASSERT_FALSE(quant.ok());
  EXPECT_EQ(quant.error().code, Code::kDtypeMismatch);

  auto lanes = dtype_from_dlpack(DLDataType{kDLFloat, 32, 4});
  ASSERT_FALSE(lanes.ok());
  EXPECT_NE(lanes.error().message.find("4 lanes"), std::string::npos);
  EXPECT_FALSE(dtype_from_dlpack(DLDataType{kDLFloat, 24, 1}).ok());
  EXPECT_FALSE(dtype_from_dlpack(DLDataType{kDLOpaqueHandle, 64, 1}).ok());
}

}  // namespace
}  // namespace dsd
