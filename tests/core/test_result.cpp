#include <gtest/gtest.h>

#include <c10/util/Exception.h>

#include "core/base/make_error.h"
#include "core/base/result.h"
#include "core/base/torch_call.h"

namespace dsd {
namespace {

Result<int> parse_positive(int v) {
  if (v <= 0) return make_error_at(Code::kInvalidArgument, "v", "{} is not positive", v);
  return v;
}

Result<int> twice(int v) {
  int x = TRY(parse_positive(v));
  return 2 * x;
}

Status check(int v) {
  TRY(parse_positive(v));
  return ok();
}

TEST(Result, ValueAndError) {
  Result<int> good = twice(4);
  ASSERT_TRUE(good.ok());
  EXPECT_EQ(*good, 8);
  Result<int> bad = twice(-1);
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.error().code, Code::kInvalidArgument);
  EXPECT_EQ(bad.error().message, "-1 is not positive");
  EXPECT_EQ(bad.error().context, "v");
}

TEST(Result, VoidPropagates) {
  EXPECT_TRUE(check(1).ok());
  Status s = check(0);
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.error().code, Code::kInvalidArgument);
}

TEST(Result, MoveOnlyValues) {
  auto make = []() -> Result<std::unique_ptr<int>> { return std::make_unique<int>(7); };
  auto use = [&]() -> Result<int> {
    std::unique_ptr<int> p = TRY(make());
    return *p;
  };
  EXPECT_EQ(*use(), 7);
}

TEST(Result, ErrorPrefix) {
  Error e = Error(Code::kIo, "disk full").with_prefix("saving 'a.safetensors': ");
  EXPECT_EQ(e.message, "saving 'a.safetensors': disk full");
}

TEST(Result, CodeNamesAreStable) {
  EXPECT_EQ(code_name(Code::kOk), "ok");
  EXPECT_EQ(code_name(Code::kStaleHandle), "stale_handle");
  EXPECT_EQ(static_cast<int>(Code::kReadOnly), 22);
}

TEST(TorchCall, CatchesLibtorchErrors) {
  Result<int> r = torch_call(Code::kShapeMismatch, "copying into 'w'", []() -> int {
    TORCH_CHECK(false, "sizes differ");
    return 0;
  });
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, Code::kShapeMismatch);
  EXPECT_NE(r.error().message.find("copying into 'w': sizes differ"), std::string::npos);
  // No backtrace in the message: users read it.
  EXPECT_EQ(r.error().message.find("Exception raised from"), std::string::npos);
}

TEST(TorchCall, PassesValuesAndResults) {
  EXPECT_EQ(*torch_call(Code::kInternal, "x", [] { return 3; }), 3);
  Result<int> nested = torch_call(Code::kInternal, "x", []() -> Result<int> {
    return Error(Code::kNotFound, "inner");
  });
  EXPECT_EQ(nested.error().code, Code::kNotFound);
  Status v = torch_call(Code::kInternal, "x", [] {});
  EXPECT_TRUE(v.ok());
}

}  // namespace
}  // namespace dsd
