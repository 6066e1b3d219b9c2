// DCP `.metadata` <-> structs: files PyTorch 2.13 wrote (the fuzz seeds), round trips, and
// malformed metadata.
#include "core/formats/dcp_metadata.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <fstream>
#include <set>
#include <sstream>

namespace dsd::dcp {
namespace {

using ::testing::HasSubstr;

std::string seed(const char* name) {
  std::ifstream in(std::string(DSD_SOURCE_ROOT) + "/tests/fuzz/corpus/pickle/" + name, std::ios::binary);
  EXPECT_TRUE(in.good()) << name;
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

const TensorStorageMetadata& tensor_md(const Metadata& m, std::string_view fqn) {
  for (const auto& [k, v] : m.state_dict_metadata) {
    if (k == fqn) return std::get<TensorStorageMetadata>(v);
  }
  ADD_FAILURE() << "no " << fqn;
  static const TensorStorageMetadata none;
  return none;
}

// dcp.save({"w": arange(6).reshape(2, 3) float32, "h": ones(3) bfloat16, "step": 7,
//           "nested": {"lr": 0.1, "l": [1, "a"]}, "tup": (1, 2)}) at world size 1.
TEST(DcpMetadata, ReadsWhatPyTorchWroteAtWorldOne) {
  const Metadata m = MUST(parse_metadata(seed("dcp_world1.metadata")));
  EXPECT_EQ(m.version, "1.0.0");
  ASSERT_EQ(m.state_dict_metadata.size(), 6u);
  const TensorStorageMetadata& w = tensor_md(m, "w");
  EXPECT_EQ(w.properties, TensorProperties{});
  EXPECT_EQ(w.size, (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(w.chunks, (std::vector<ChunkStorageMetadata>{{{0, 0}, {2, 3}}}));
  EXPECT_EQ(tensor_md(m, "h").properties.dtype, DType::kBFloat16);
  EXPECT_EQ(m.state_dict_metadata[2].first, "step");
  EXPECT_TRUE(std::holds_alternative<BytesStorageMetadata>(m.state_dict_metadata[2].second));
  ASSERT_TRUE(m.planner_data.has_value());
  EXPECT_EQ((*m.planner_data)[3].first, "nested.lr");
  EXPECT_EQ((*m.planner_data)[3].second, (std::vector<PathSegment>{"nested", "lr"}));
  ASSERT_EQ(m.storage_data.size(), 6u);
  EXPECT_EQ(m.storage_data[0].first, (MetadataIndex{"step", std::nullopt, std::nullopt}));
  EXPECT_EQ(m.storage_data[0].second, (StorageInfo{"__0_0.distcp", 0, 1261, std::nullopt}));
  EXPECT_EQ(m.storage_data[4].first, (MetadataIndex{"w", std::vector<int64_t>{0, 0}, 0}));
  ASSERT_TRUE(m.storage_meta.has_value());
  EXPECT_EQ(m.storage_meta->checkpoint_id, "dcp1");  // a pathlib.PosixPath in the file
  EXPECT_EQ(m.storage_meta->save_id, "77321e23-1299-429d-af8d-0d95c2be128f");
}

TEST(DcpMetadata, ReadsWhatPyTorchWroteAtWorldFour) {
  const Metadata m = MUST(parse_metadata(seed("dcp_world4.metadata")));
  const TensorStorageMetadata& w = tensor_md(m, "model.w");
  ASSERT_EQ(w.chunks.size(), 4u);
  EXPECT_EQ(w.chunks[3], (ChunkStorageMetadata{{9, 0}, {1, 3}}));
  EXPECT_EQ(tensor_md(m, "model.few").chunks[3], (ChunkStorageMetadata{{3, 0}, {0, 2}}));
  std::set<std::string> files;
  for (const auto& [index, info] : m.storage_data) files.insert(info.relative_path);
  EXPECT_EQ(files, (std::set<std::string>{"__0_0.distcp", "__1_0.distcp", "__2_0.distcp", "__3_0.distcp"}));
}

TEST(DcpMetadata, RoundTripsThroughTheWriter) {
  for (const char* name : {"dcp_world1.metadata", "dcp_world4.metadata", "dsd_written.metadata"}) {
    const Metadata m = MUST(parse_metadata(seed(name)));
    const std::string bytes = MUST(serialize_metadata(m));
    EXPECT_EQ(MUST(parse_metadata(bytes)), m) << name;
    // Field names and keys repeat: the writer memoises them instead of writing them again.
    EXPECT_LT(bytes.size(), seed(name).size() * 2) << name;
  }
  Metadata m;
  TensorStorageMetadata t;
  t.properties = {DType::kFloat8E4M3FN, "torch.strided", true, 1, true};
  t.size = {4, 0};
  t.chunks = {{{0, 0}, {4, 0}}};
  m.state_dict_metadata = {{"a.b", t}, {"c", BytesStorageMetadata{}}};
  m.storage_data = {{{"a.b", std::vector<int64_t>{0, 0}, std::nullopt},
                     {"x.distcp", 5, 7, std::vector<std::string>{"zstd", "crc"}}},
                    {{"c", std::nullopt, 3}, {"x.distcp", 0, 5, std::nullopt}}};
  const Metadata back = MUST(parse_metadata(MUST(serialize_metadata(m))));
  EXPECT_EQ(back, m);
  EXPECT_FALSE(back.planner_data.has_value());
  EXPECT_FALSE(back.storage_meta.has_value());
}

// The tree metadata_to_pickle makes, for tests to break in one place.
struct Tree {
  PickleValue root;
  PickleDict& fields(const PickleValue& v) { return *v.if_object()->state->if_dict(); }
  PickleValue& field(const PickleValue& v, std::string_view name) {
    for (auto& [k, x] : fields(v).items) {
      if (*k.if_str() == name) return x;
    }
    ADD_FAILURE() << name;
    return root;
  }
  PickleValue& first_tensor() { return field(root, "state_dict_metadata").if_dict()->items[0].second; }
};

Tree valid_tree() {
  Metadata m;
  TensorStorageMetadata t;
  t.size = {2};
  t.chunks = {{{0}, {2}}};
  m.state_dict_metadata = {{"w", t}};
  m.storage_data = {{{"w", std::vector<int64_t>{0}, 0}, {"__0_0.distcp", 0, 10, std::nullopt}}};
  return {metadata_to_pickle(m)};
}

Error error_of(const PickleValue& root) {
  Result<Metadata> r = metadata_from_pickle(root);
  EXPECT_FALSE(r.ok());
  return r.ok() ? Error() : r.error();
}

TEST(DcpMetadata, NamesTheFieldThatIsWrong) {
  ASSERT_TRUE(metadata_from_pickle(valid_tree().root).ok());

  Error e = error_of(PickleValue::list());
  EXPECT_EQ(e.code, Code::kCorrupt);
  EXPECT_THAT(e.message, HasSubstr("DCP metadata: the top level: expected a Metadata, found []"));

  Tree t = valid_tree();
  t.field(t.first_tensor(), "chunks") = PickleValue::integer(3);
  EXPECT_THAT(error_of(t.root).message, HasSubstr("state_dict_metadata['w']: chunks is not a list"));

  t = valid_tree();
  t.field(t.first_tensor(), "size") = PickleValue::str("big");
  EXPECT_THAT(error_of(t.root).message, HasSubstr("state_dict_metadata['w'].size: expected a torch.Size, found 'big'"));

  t = valid_tree();
  t.field(t.first_tensor(), "properties").if_object()->state->if_tuple()->items[0] =
      PickleValue::global("torch", "complex32");
  e = error_of(t.root);
  EXPECT_EQ(e.code, Code::kDtypeMismatch);
  EXPECT_THAT(e.message, HasSubstr("dtype torch.complex32 is not supported by dsd"));

  t = valid_tree();
  PickleValue& info = t.field(t.root, "storage_data").if_dict()->items[0].second;
  t.field(info, "length") = PickleValue::str("ten");
  EXPECT_THAT(error_of(t.root).message, HasSubstr("storage_data['w'].length: expected an int, found 'ten'"));

  t = valid_tree();
  t.field(t.root, "storage_data").if_dict()->items[0].second =
      PickleValue::reduce(PickleValue::global("torch", "Size"), PickleValue::tuple({}));
  e = error_of(t.root);
  EXPECT_EQ(e.code, Code::kUnsupported);
  EXPECT_THAT(e.message, HasSubstr("is not a FileSystemWriter _StorageInfo"));
}

TEST(DcpMetadata, RefusesGlobalsOutsideTheAllowList) {
  const std::string evil = MUST(pickle_dumps(
      PickleValue::reduce(PickleValue::global("subprocess", "call"), PickleValue::tuple({PickleValue::str("ls")}))));
  Result<Metadata> r = parse_metadata(evil);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, Code::kUnsupported);
  EXPECT_THAT(r.error().message, HasSubstr("DCP metadata: pickle at byte 2 refers to the global 'subprocess.call'"));
}

}  // namespace
}  // namespace dsd::dcp
