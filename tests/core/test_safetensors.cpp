// safetensors headers from hostile bytes: each violation is kCorrupt with a message naming
// what is wrong; and headers dsd writes parse back.
#include "core/formats/safetensors.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstring>

namespace dsd::safetensors {
namespace {

using ::testing::HasSubstr;

// A file: length prefix + header text + `data` bytes of data.
std::string file_of(const std::string& header, size_t data) {
  std::string out(8, '\0');
  const uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) out[static_cast<size_t>(i)] = static_cast<char>((n >> (8 * i)) & 0xFF);
  return out + header + std::string(data, '\x01');
}

Result<Header> parse(const std::string& file) {
  return parse_file(std::span(reinterpret_cast<const std::byte*>(file.data()), file.size()));
}

void expect_corrupt(const std::string& file, const std::string& text) {
  auto r = parse(file);
  ASSERT_FALSE(r.ok()) << "accepted: " << file.substr(8);
  EXPECT_EQ(r.error().code, Code::kCorrupt);
  EXPECT_THAT(r.error().message, HasSubstr(text));
}

TEST(Safetensors, WrittenHeaderParsesBackPaddedTo8) {
  std::vector<TensorEntry> t{{"a", DType::kFloat32, {2, 3}, 0, 24}, {"b.c", DType::kBFloat16, {}, 24, 26}};
  auto h = write_header(t, {{"format", "pt"}});
  ASSERT_TRUE(h.ok());
  EXPECT_EQ(h->size() % 8, 0u);
  auto parsed = parse(*h + std::string(26, '\0'));
  ASSERT_TRUE(parsed.ok()) << parsed.error().message;
  ASSERT_EQ(parsed->tensors.size(), 2u);
  EXPECT_EQ(parsed->tensors[1].name, "b.c");
  EXPECT_EQ(parsed->tensors[1].dtype, DType::kBFloat16);
  EXPECT_TRUE(parsed->tensors[1].shape.empty());
  EXPECT_EQ(parsed->metadata.at("format"), "pt");
  EXPECT_EQ(parsed->data_start, h->size());
}

TEST(Safetensors, WriterRefusesDuplicatesAndGaps) {
  std::vector<TensorEntry> dup{{"a", DType::kUInt8, {1}, 0, 1}, {"a", DType::kUInt8, {1}, 1, 2}};
  EXPECT_EQ(write_header(dup, {}).error().code, Code::kInvalidArgument);
  std::vector<TensorEntry> gap{{"a", DType::kUInt8, {1}, 0, 1}, {"b", DType::kUInt8, {1}, 2, 3}};
  EXPECT_FALSE(write_header(gap, {}).ok());
}

TEST(Safetensors, LengthPrefix) {
  expect_corrupt(std::string(5, '\0'), "too short");
  expect_corrupt(file_of("", 0), "header length is 0");
  std::string huge(8, '\xff');
  expect_corrupt(huge + "{}", "exceeds the limit");
  std::string past = file_of("{}", 0);
  past[0] = 100;
  expect_corrupt(past, "runs past the end");
}

TEST(Safetensors, HostileHeaders) {
  expect_corrupt(file_of("{\"a\":", 0), "not valid JSON");
  expect_corrupt(file_of("[1,2]", 0), "not a JSON object");
  expect_corrupt(file_of("{\"a\": 3}", 0), "'a' is not a JSON object");
  expect_corrupt(file_of(R"({"a":{"dtype":"F32","shape":[1]}})", 4), "no data_offsets");
  expect_corrupt(file_of(R"({"a":{"dtype":"Q7","shape":[1],"data_offsets":[0,4]}})", 4), "unknown dtype 'Q7'");
  expect_corrupt(file_of(R"({"a":{"dtype":3,"shape":[1],"data_offsets":[0,4]}})", 4), "no string dtype");
  expect_corrupt(file_of(R"({"a":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}})", 4), "not a non-negative integer");
  expect_corrupt(file_of(R"({"a":{"dtype":"F32","shape":[1.5],"data_offsets":[0,4]}})", 4), "not a non-negative integer");
  expect_corrupt(file_of(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}})", 4), "need 8 bytes but data_offsets span 4");
  expect_corrupt(file_of(R"({"a":{"dtype":"F32","shape":[4294967296,4294967296,4294967296],"data_offsets":[0,4]}})", 4),
                 "more than 2^64");
  expect_corrupt(file_of(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[4,0]}})", 4), "0 <= begin <= end");
  expect_corrupt(file_of(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})", 2), "beyond the data area");
  expect_corrupt(file_of(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[2,6]}})", 6),
                 "overlaps");
  expect_corrupt(file_of(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", 8), "gap");
  expect_corrupt(file_of(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})", 9), "cover 4 bytes but the data area holds 9");
  expect_corrupt(file_of(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"x":1}})", 4), "unknown field 'x'");
  expect_corrupt(file_of(R"({"__metadata__":{"k":1}})", 0), "__metadata__ entry 'k' is not a string");
  expect_corrupt(file_of(R"({"__metadata__":[]})", 0), "__metadata__ is not a JSON object");
  expect_corrupt(file_of("{\"\xff\":1}", 0), "not UTF-8");
}

TEST(Safetensors, Utf8Validation) {
  EXPECT_TRUE(is_valid_utf8("abc\xc3\xa9"));
  EXPECT_FALSE(is_valid_utf8("\xc0\x80"));          // overlong
  EXPECT_FALSE(is_valid_utf8("\xed\xa0\x80"));      // surrogate
  EXPECT_FALSE(is_valid_utf8("\xe2\x82"));          // truncated
}

}  // namespace
}  // namespace dsd::safetensors
