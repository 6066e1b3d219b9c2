// checkpoint.json: a written manifest parses back, and each bad input is kCorrupt (or
// kUnsupported for a newer version) naming the key or file.
#include "core/checkpoint/manifest.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <functional>

#include "core/base/strings.h"
#include "core/checkpoint/write_results.h"

namespace dsd::checkpoint {
namespace {

using ::testing::HasSubstr;
using nlohmann::json;

Manifest good() {
  Manifest m;
  m.save_id = "0123456789abcdef";
  m.world_size = 2;
  m.mesh_shape = std::vector<int64_t>{2};
  m.block_size = 16;
  m.files = {{"f0.safetensors", 0, 100, {}}, {"f1.safetensors", 1, 100, {}}};
  Entry t;
  t.key = "w";
  t.path = {std::string("w")};
  t.dtype = DType::kFloat32;
  t.shape = {4, 2};
  t.chunks = {{{0, 0}, {2, 2}, "f0.safetensors", 40, 56, 7, {1}},
              {{2, 0}, {2, 2}, "f1.safetensors", 40, 56, 8, {2}}};
  Entry v;
  v.key = "opt.lr";
  v.path = {std::string("opt"), std::string("lr")};
  v.kind = Entry::Kind::kValue;
  v.value = json{{"tuple", {1, 2.5, nullptr, {{"bytes", "AAE="}}}}};
  m.entries = {t, v};
  m.int_key_dicts = {{std::string("opt")}};
  return m;
}

// The JSON of good(), changed by `edit`, parsed.
Result<Manifest> parse_edited(const std::function<void(json&)>& edit) {
  json j = json::parse(manifest_to_json(good()));
  edit(j);
  return parse_manifest(j.dump());
}

void expect_bad(const std::function<void(json&)>& edit, const std::string& text, Code code = Code::kCorrupt) {
  auto r = parse_edited(edit);
  ASSERT_FALSE(r.ok()) << "accepted";
  EXPECT_EQ(r.error().code, code);
  EXPECT_THAT(r.error().message, HasSubstr(text));
}

TEST(Manifest, RoundTrips) {
  auto m = parse_manifest(manifest_to_json(good()));
  ASSERT_TRUE(m.ok()) << m.error().message;
  EXPECT_EQ(m->save_id, "0123456789abcdef");
  EXPECT_EQ(*m->mesh_shape, std::vector<int64_t>{2});
  ASSERT_EQ(m->entries.size(), 2u);
  EXPECT_EQ(m->entries[0].chunks[1].xxh3, 8u);
  EXPECT_EQ(m->entries[1].value, good().entries[1].value);
  EXPECT_EQ(m->int_key_dicts.size(), 1u);
}

TEST(Manifest, IsWrittenAsNlohmannPrettyPrintsIt) {
  // manifest_to_json streams the text; it must be what dump(1) of the same tree gives, for a
  // manifest with every kind of field (empty arrays, a 0-d tensor, nested values) too.
  Manifest m = good();
  Entry scalar;
  scalar.key = "s\"q";
  scalar.path = {std::string("s\"q")};
  scalar.shape = {};
  scalar.chunks = {{{}, {}, "f1.safetensors", 56, 60, 9, {3}}};
  m.entries.push_back(scalar);
  Entry empty = good().entries[0];
  empty.key = "e.3";
  empty.path = {std::string("e"), int64_t{3}};
  empty.shape = {0, 2};
  empty.chunks = {{{0, 0}, {0, 2}, "f0.safetensors", 56, 56, 0, {}}};
  m.entries.push_back(empty);
  for (const Manifest& x : {m, Manifest{}}) {
    const std::string text = manifest_to_json(x);
    EXPECT_EQ(text, nlohmann::ordered_json::parse(text).dump(1) + "\n");
  }
  auto back = parse_manifest(manifest_to_json(m));
  ASSERT_TRUE(back.ok()) << back.error().message;
  EXPECT_EQ(manifest_to_json(*back), manifest_to_json(m));
}

TEST(Manifest, OverlapsAreFoundAmongManyChunks) {
  // 4096 row chunks of a [4096, 2] tensor in shuffled order (the sweep sorts them), then one
  // chunk widened into its neighbour.
  Manifest m;
  m.save_id = "0123456789abcdef";
  m.block_size = 1u << 20;
  m.files = {{"f", 0, 4096 * 8, {}}};
  Entry t;
  t.key = "w";
  t.path = {std::string("w")};
  t.shape = {4096, 2};
  for (int64_t i = 0; i < 4096; ++i) {
    const int64_t r = (i * 2654435761) % 4096;  // a permutation of the rows
    t.chunks.push_back({{r, 0}, {1, 2}, "f", static_cast<uint64_t>(r) * 8, static_cast<uint64_t>(r) * 8 + 8, 0, {0}});
  }
  m.entries = {t};
  ASSERT_TRUE(validate_manifest(m).ok()) << validate_manifest(m).error().message;
  // Row 100 grows into row 101, and row 101 moves its bytes away so only the boxes collide.
  for (ChunkRecord& c : m.entries[0].chunks) {
    if (c.offsets[0] == 100) { c.sizes = {2, 2}; c.end = c.begin + 16; }
    if (c.offsets[0] == 101) { c.sizes = {1, 1}; c.offsets = {101, 1}; c.begin = 4096 * 8 - 4; c.end = 4096 * 8; }
  }
  m.files[0].size = 4096 * 8;
  auto s = validate_manifest(m);
  ASSERT_FALSE(s.ok());
  EXPECT_THAT(s.error().message, HasSubstr("overlapping chunks"));
}

TEST(Manifest, WriteResultsMergeIntoTheManifest) {
  // Each rank's encoded results (files, chunk locations, checksums) fill the entries of a
  // manifest without chunks; the merged manifest equals the one written directly.
  const Manifest want = good();
  Manifest m = want;
  for (Entry& e : m.entries) e.chunks.clear();
  m.files.clear();
  std::vector<std::string> results;
  for (int64_t r = 0; r < 2; ++r) {
    const ChunkRecord& c = want.entries[0].chunks[static_cast<size_t>(r)];
    results.push_back(encode_write_results(std::vector<FileRecord>{want.files[static_cast<size_t>(r)]},
                                           std::vector<WrittenChunk>{{"w", c}}));
  }
  std::swap(results[0], results[1]);  // chunks are sorted by offsets, whatever the rank order
  Manifest merged = m;
  ASSERT_TRUE(merge_write_results(merged, results).ok());
  Manifest sorted_files = want;
  std::swap(sorted_files.files[0], sorted_files.files[1]);
  EXPECT_EQ(manifest_to_json(merged), manifest_to_json(sorted_files));
  // Truncated, padded or foreign bytes are kComm naming the rank.
  for (std::string bad : {results[1].substr(0, results[1].size() - 3), results[1] + "x", std::string("{\"files\": []}")}) {
    Manifest x = m;
    auto s = merge_write_results(x, {results[0], bad});
    ASSERT_FALSE(s.ok());
    EXPECT_EQ(s.error().code, Code::kComm);
    EXPECT_THAT(s.error().message, HasSubstr("rank 1 sent malformed write results"));
  }
  // Results that leave a tensor uncovered do not validate.
  Manifest x = m;
  auto s = merge_write_results(x, {results[0]});
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.error().code, Code::kInternal);
}

TEST(Manifest, BadJson) {
  EXPECT_EQ(parse_manifest("{").error().code, Code::kCorrupt);
  EXPECT_THAT(parse_manifest("[]").error().message, HasSubstr("not a JSON object"));
  expect_bad([](json& j) { j["format"] = "other"; }, "not a dsd checkpoint manifest");
  expect_bad([](json& j) { j["format_version"] = 3; }, "format version 3", Code::kUnsupported);
  expect_bad([](json& j) { j.erase("files"); }, "no 'files' array");
  expect_bad([](json& j) { j["block_size"] = 0; }, "block size of 0");
}

TEST(Manifest, FileNamesMustStayInsideTheDirectory) {
  for (const char* name : {"../evil.safetensors", "/etc/passwd", "a/b", "..", ".", ""}) {
    expect_bad([&](json& j) {
      j["files"][0]["name"] = name;
      j["entries"][0]["chunks"][0]["file"] = name;
    }, "not a plain name");
  }
  expect_bad([](json& j) { j["files"][1]["name"] = "f0.safetensors"; }, "listed twice");
}

TEST(Manifest, ChunksAreCheckedAgainstTheTensorAndTheFiles) {
  expect_bad([](json& j) { j["entries"][0]["chunks"][0]["file"] = "nope"; }, "'nope' not in the manifest");
  expect_bad([](json& j) { j["entries"][0]["chunks"][0]["offsets"] = {3, 0}; }, "outside its shape");
  expect_bad([](json& j) { j["entries"][0]["chunks"][1]["offsets"] = {1, 0}; }, "overlapping chunks");
  expect_bad([](json& j) { j["entries"][0]["chunks"].erase(1); }, "covering 4 of its 8 elements");
  expect_bad([](json& j) { j["entries"][0]["chunks"][0]["end"] = 200; }, "outside 'f0.safetensors'");
  expect_bad([](json& j) { j["entries"][0]["chunks"][0]["end"] = 60; }, "stored in 20 bytes");
  expect_bad([](json& j) { j["entries"][0]["chunks"][0]["blocks"] = json::array(); }, "0 block checksums");
  expect_bad([](json& j) { j["entries"][0]["chunks"][0]["xxh3"] = "xyz"; }, "16 hex digits");
  expect_bad([](json& j) { j["entries"][0]["dtype"] = "float99"; }, "unknown dtype 'float99'");
  expect_bad([](json& j) { j["entries"][0]["shape"] = {-4, 2}; }, "negative");
  expect_bad([](json& j) { j["entries"][0]["chunks"][0]["offsets"] = {0}; }, "for a 2-d tensor");
  expect_bad([](json& j) { j["files"][1]["name"] = "f0x"; j["entries"][0]["chunks"][1]["file"] = "f0x";
                           j["files"][1]["name"] = "f0.safetensors"; j["files"].erase(1);
                           j["entries"][0]["chunks"][1]["file"] = "f0.safetensors"; }, "share bytes");
}

TEST(Manifest, EntriesAndValues) {
  expect_bad([](json& j) { j["entries"][1]["key"] = "w"; }, "'w' appears twice");
  expect_bad([](json& j) { j["entries"][1]["path"] = json::array(); }, "no non-empty 'path'");
  expect_bad([](json& j) { j["entries"][1]["path"] = {1.5}; }, "neither a string nor an integer");
  expect_bad([](json& j) { j["entries"][1]["kind"] = "blob"; }, "unknown kind 'blob'");
  expect_bad([](json& j) { j["entries"][1]["value"] = {{"bytes", "!!"}}; }, "not base64");
  expect_bad([](json& j) { j["entries"][1]["value"] = {{"double", "big"}}; }, "bad special double");
  expect_bad([](json& j) { j["entries"][1]["value"] = {{"what", 1}}; }, "unknown tagged object");
  expect_bad([](json& j) { j["entries"][1]["value"] = {{"dict", json::array({json::array({"a", 1}), json::array({"a", 2})})}, {"int_keys", false}}; },
             "repeated key");
}

TEST(Manifest, Helpers) {
  EXPECT_EQ(hex64(0xabcdef), "0000000000abcdef");
  EXPECT_EQ(parse_hex64("0000000000abcdef"), 0xabcdefu);
  EXPECT_FALSE(parse_hex64("0000000000ABCDEF"));
  EXPECT_EQ(block_count(0, 16), 0u);
  EXPECT_EQ(block_count(16, 16), 1u);
  EXPECT_EQ(block_count(17, 16), 2u);
  for (const std::string& s : std::vector<std::string>{"", "a", "ab", "abc", std::string("\x00\xff", 2)}) {
    EXPECT_EQ(base64_decode(base64_encode(s)), s);
  }
  EXPECT_FALSE(base64_decode("A==="));
}

}  // namespace
}  // namespace dsd::checkpoint
