// torch.save archives and DCP chunks in C++: round trips, what the writer refuses, and
// hand-made hostile archives the reader must refuse. tests/interop/test_formats.py checks the
// same files against PyTorch itself.
#include "core/formats/torch_save.h"

#include <ATen/ops/arange.h>
#include <ATen/ops/full.h>
#include <ATen/ops/randn.h>
#include <caffe2/serialize/inline_container.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <unistd.h>
#include <zstd.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>

#include "core/base/make_error.h"
#include "core/dist/layout.h"
#include "core/dist/mesh.h"
#include "core/formats/dcp_chunks.h"
#include "core/tensor/dtype_torch.h"

namespace dsd {
namespace {

using ::testing::HasSubstr;

at::Tensor sample(DType dtype, int64_t n = 6) {
  at::Tensor t = at::arange(n).to(at::kDouble).sub(2).mul(1.5);
  if (dtype == DType::kBool) return t.gt(0);
  if (dtype == DType::kUInt8 || dtype == DType::kUInt16 || dtype == DType::kUInt32 || dtype == DType::kUInt64) {
    t = t.abs();
  }
  return t.to(to_scalar_type(dtype));
}

Value sample_tree() {
  DictPtr root = Dict::make();
  for (DType d : all_dtypes()) root->set(std::string("dtype.") + std::string(dtype_name(d)), sample(d));
  at::Tensor base = at::arange(24).to(at::kFloat).reshape({4, 6});
  root->set("view.base", base);
  root->set("view.row", base[1]);
  root->set("view.corner", base.slice(0, 2).slice(1, 3));
  root->set("view.t", base.t());
  root->set("scalar", at::full({}, 2.5));
  root->set("empty", at::randn({0, 3}));
  DictPtr state = Dict::make();
  state->set_int_keys(true);
  DictPtr s0 = Dict::make();
  s0->set("step", 3);
  s0->set("exp_avg", at::full({2}, 0.5));
  state->set("0", Value(s0));
  state->set("-1", Value(Dict::make()));
  root->set("state", Value(state));
  ListPtr tuple = List::make(true);
  tuple->push_back(0.9);
  tuple->push_back(std::nan(""));
  ListPtr list = List::make();
  list->push_back(Value(tuple));
  list->push_back(Value(Bytes{""}));
  list->push_back(Value(Bytes{std::string("\x00\xff", 2)}));
  list->push_back(Value());
  list->push_back(true);
  list->push_back("text \xc3\xbc");
  list->push_back(int64_t{1} << 62);
  root->set("misc", Value(list));
  return Value(root);
}

TEST(TorchSave, RoundTripKeepsTreeStridesAndSharing) {
  const Value tree = sample_tree();
  for (bool ordered : {false, true}) {
    TorchSaveOptions options;
    options.ordered_dict = ordered;
    Result<std::string> bytes = torch_save_bytes(tree, options);
    ASSERT_TRUE(bytes.ok()) << bytes.error().message;
    Result<Value> back = torch_load(TorchArchive::memory(*bytes));
    ASSERT_TRUE(back.ok()) << back.error().message;
    std::string why;
    EXPECT_TRUE(deep_equal(tree, *back, &why)) << why;
    const Dict& d = *back->if_dict();
    const at::Tensor& base = d.find("view.base")->if_tensor()->tensor;
    const at::Tensor& corner = d.find("view.corner")->if_tensor()->tensor;
    EXPECT_TRUE(base.is_alias_of(corner));
    EXPECT_TRUE(base.is_alias_of(d.find("view.t")->if_tensor()->tensor));
    EXPECT_EQ(corner.storage_offset(), 15);
    EXPECT_EQ(corner.strides(), base.strides());
    EXPECT_TRUE(d.find("state")->if_dict()->int_keys());
    EXPECT_TRUE(d.find("misc")->if_list()->items()[0].if_list()->is_tuple());
    // The top-level OrderedDict is what nn.Module.state_dict() returns; nested dicts are plain.
    EXPECT_EQ(bytes->find("\x80\x02" "ccollections\nOrderedDict") != std::string::npos, ordered);
  }
}

TEST(TorchSave, ArchiveHasTorchSaveRecords) {
  const std::string bytes = MUST(torch_save_bytes(Value(at::arange(4))));
  // Record names and order, as torch.save writes them (stored, so the names are plain text).
  size_t pos = 0;
  for (const char* name : {"archive/data.pkl", "archive/.format_version", "archive/.storage_alignment",
                           "archive/byteorder", "archive/data/0", "archive/version",
                           "archive/.data/serialization_id"}) {
    const size_t at = bytes.find(name, pos);
    ASSERT_NE(at, std::string::npos) << name;
    pos = at;
  }
}

TEST(TorchSave, RefusesWhatTorchSaveCannotHold) {
  at::Tensor f = at::arange(4).to(at::kFloat);
  DictPtr two_dtypes = Dict::make();
  two_dtypes->set("f", f);
  two_dtypes->set("i", f.view(at::kInt));
  Result<std::string> r = torch_save_bytes(Value(two_dtypes));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, Code::kUnsupported);
  EXPECT_THAT(r.error().message, HasSubstr("tensor 'i' views storage 0 as int32, another tensor as float32"));

  DictPtr bad_keys = Dict::make();
  bad_keys->set_int_keys(true);
  bad_keys->set("x", 1);
  r = torch_save_bytes(Value(bad_keys));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, Code::kInvalidArgument);

  r = torch_save_bytes(Value(at::Tensor()));
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(r.error().message, HasSubstr("undefined"));

  auto mesh = MUST(DeviceMesh::make(nullptr, {1}, {}, c10::DeviceType::CPU));
  auto layout = MUST(Layout::on_mesh({4}, mesh, {Placement::replicate()}));
  DictPtr dist = Dict::make();
  dist->set("w", Value(TensorValue{f, layout, false}));
  r = torch_save_bytes(Value(dist));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, Code::kUnsupported);
  EXPECT_THAT(r.error().message, HasSubstr("'w' is a distributed tensor"));
}

TEST(TorchSave, SinkErrorsStopTheWriter) {
  size_t written = 0;
  const ByteSink full_disk = [&](const void*, size_t n) -> Status {
    if (written + n > 200) return make_error(Code::kNoSpace, "disk full");
    written += n;
    return ok();
  };
  Status s = torch_save(Value(at::arange(1000)), full_disk);
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.error().code, Code::kNoSpace);
  EXPECT_EQ(s.error().message, "disk full");
}

// ---- hand-made archives -------------------------------------------------------------------

using Records = std::vector<std::pair<std::string, std::string>>;

// A zip as PyTorchStreamWriter writes it, with whatever records the test wants.
std::string archive(const Records& records) {
  std::string out;
  caffe2::serialize::PyTorchStreamWriter writer([&](const void* data, size_t n) {
    out.append(static_cast<const char*>(data), n);
    return n;
  });
  for (const auto& [name, bytes] : records) writer.writeRecord(name, bytes.data(), bytes.size());
  writer.writeEndOfFile();
  return out;
}

// _rebuild_tensor_v2 over storage '0' of class `cls` holding `numel` elements.
std::string tensor_pickle(std::string cls, int64_t numel, std::vector<int64_t> size, std::vector<int64_t> stride,
                          int64_t offset = 0) {
  using P = PickleValue;
  std::vector<P> sizes, strides;
  for (int64_t s : size) sizes.push_back(P::integer(s));
  for (int64_t s : stride) strides.push_back(P::integer(s));
  P pid = P::persistent_id(P::tuple({P::str("storage"), P::global("torch", std::move(cls)), P::str("0"),
                                     P::str("cpu"), P::integer(numel)}));
  P args = P::tuple({pid, P::integer(offset), P::tuple(sizes), P::tuple(strides), P::boolean(false),
                     P::reduce(P::global("collections", "OrderedDict"), P::tuple({}))});
  return MUST(pickle_dumps(P::reduce(P::global("torch._utils", "_rebuild_tensor_v2"), args)));
}

std::string floats(std::initializer_list<float> v) {
  std::string out(v.size() * 4, '\0');
  std::memcpy(out.data(), std::data(v), out.size());
  return out;
}

Error load_error(const std::string& bytes) {
  Result<Value> r = torch_load(TorchArchive::memory(bytes));
  EXPECT_FALSE(r.ok());
  return r.ok() ? Error() : r.error();
}

TEST(TorchLoad, RefusesHostileArchives) {
  // A tensor reaching past its storage.
  Error e = load_error(archive({{"data.pkl", tensor_pickle("FloatStorage", 2, {100}, {1})},
                                {"data/0", floats({1, 2})}}));
  EXPECT_EQ(e.code, Code::kCorrupt);
  EXPECT_THAT(e.message, HasSubstr("reaches 400 bytes into storage '0' of 8 bytes"));
  // Strides that overflow.
  e = load_error(archive({{"data.pkl", tensor_pickle("FloatStorage", 2, {2, 2}, {int64_t{1} << 62, 1})},
                          {"data/0", floats({1, 2})}}));
  EXPECT_THAT(e.message, HasSubstr("overflows"));
  // A storage record of another size than its persistent id says.
  e = load_error(archive({{"data.pkl", tensor_pickle("FloatStorage", 3, {2}, {1})}, {"data/0", floats({1, 2})}}));
  EXPECT_THAT(e.message, HasSubstr("record data/0 has 8 bytes, its storage says 12"));
  // A missing storage record; a missing data.pkl.
  e = load_error(archive({{"data.pkl", tensor_pickle("FloatStorage", 2, {2}, {1})}}));
  EXPECT_THAT(e.message, HasSubstr("needs record data/0, which is missing"));
  e = load_error(archive({{"other", "x"}}));
  EXPECT_THAT(e.message, HasSubstr("has no data.pkl record"));
  // An absurd storage size.
  e = load_error(archive({{"data.pkl", tensor_pickle("FloatStorage", int64_t{1} << 62, {2}, {1})}}));
  EXPECT_THAT(e.message, HasSubstr("absurd size"));
  // Storage classes dsd does not store; globals outside the allow-list.
  e = load_error(archive({{"data.pkl", tensor_pickle("QInt8Storage", 2, {2}, {1})}, {"data/0", "ab"}}));
  EXPECT_EQ(e.code, Code::kUnsupported);
  EXPECT_THAT(e.message, HasSubstr("storage class torch.QInt8Storage is not supported"));
  e = load_error(archive({{"data.pkl", MUST(pickle_dumps(PickleValue::reduce(
                                           PickleValue::global("os", "system"), PickleValue::tuple({}))))}}));
  EXPECT_EQ(e.code, Code::kUnsupported);
  EXPECT_THAT(e.message, HasSubstr("data.pkl: pickle at byte 2 refers to the global 'os.system'"));
  // Not a zip at all, and a truncated one.
  e = load_error(std::string(100, 'z'));
  EXPECT_EQ(e.code, Code::kCorrupt);
  const std::string good = MUST(torch_save_bytes(Value(at::arange(100))));
  e = load_error(good.substr(0, good.size() - 30));
  EXPECT_EQ(e.code, Code::kCorrupt);
}

TEST(TorchLoad, SwapsBigEndianFiles) {
  std::string be = floats({1.5f, -2.0f});
  for (size_t i = 0; i < be.size(); i += 4) std::reverse(be.begin() + i, be.begin() + i + 4);
  Value v = MUST(torch_load(TorchArchive::memory(archive(
      {{"data.pkl", tensor_pickle("FloatStorage", 2, {2}, {1})}, {"byteorder", "big"}, {"data/0", be}}))));
  const at::Tensor& t = v.if_tensor()->tensor;
  EXPECT_EQ(t[0].item<float>(), 1.5f);
  EXPECT_EQ(t[1].item<float>(), -2.0f);
}

// ---- files and DCP chunks -----------------------------------------------------------------

class TempDir : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = std::filesystem::temp_directory_path() / ("dsd_test_torch_save_" + std::to_string(::getpid()));
    std::filesystem::create_directories(dir_);
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }
  std::string path(const char* name) const { return (dir_ / name).string(); }
  std::filesystem::path dir_;
};

using TorchFiles = TempDir;

TEST_F(TorchFiles, SaveAndLoadAFileAndARangeOfOne) {
  const Value tree = sample_tree();
  ASSERT_TRUE(torch_save(tree, path("a.pt")).ok());
  std::string why;
  EXPECT_TRUE(deep_equal(tree, MUST(torch_load(TorchArchive::file(path("a.pt")))), &why)) << why;

  const std::string archive_bytes = MUST(torch_save_bytes(tree));
  std::ofstream(path("blob"), std::ios::binary) << std::string(37, 'x') << archive_bytes << "tail";
  EXPECT_TRUE(deep_equal(tree, MUST(torch_load(TorchArchive::range(path("blob"), 37, archive_bytes.size()))), &why))
      << why;

  Result<Value> r = torch_load(TorchArchive::range(path("blob"), 37, archive_bytes.size() + 5));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, Code::kCorrupt);
  EXPECT_THAT(r.error().message, HasSubstr("runs past the end of the file"));
  r = torch_load(TorchArchive::file(path("nope.pt")));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, Code::kNotFound);
  EXPECT_EQ(r.error().context, path("nope.pt"));
}

using DcpChunks = TempDir;

TEST_F(DcpChunks, TensorChunkHoldsOnlyItsBytesAndIsLocated) {
  const at::Tensor base = at::arange(60).to(at::kDouble).reshape({6, 10});
  std::string file(13, 'p');  // items start anywhere in a .distcp file
  const auto sink = [&](const void* data, size_t n) {
    file.append(static_cast<const char*>(data), n);
    return ok();
  };
  struct Case {
    at::Tensor chunk;
    dcp::StorageInfo info;
  };
  std::vector<Case> cases = {{base.slice(0, 2, 4), {}}, {base.slice(1, 3, 5), {}}, {base.slice(0, 0, 0), {}}};
  for (Case& c : cases) {
    const auto offset = static_cast<int64_t>(file.size());
    const uint64_t length = MUST(dcp::write_tensor_chunk(c.chunk, sink));
    c.info = {"f.distcp", offset, static_cast<int64_t>(length), std::nullopt};
  }
  std::ofstream(path("f.distcp"), std::ios::binary) << file;
  for (const Case& c : cases) {
    const TorchTensorRecord rec = MUST(dcp::locate_tensor_chunk(path("f.distcp"), c.info));
    EXPECT_EQ(rec.dtype, DType::kFloat64);
    EXPECT_EQ(rec.sizes, c.chunk.sizes().vec());
    EXPECT_TRUE(rec.is_contiguous());
    EXPECT_EQ(rec.storage_offset, 0);
    EXPECT_EQ(rec.storage_nbytes, static_cast<uint64_t>(c.chunk.numel()) * 8) << "only the chunk's bytes";
    const at::Tensor expected = c.chunk.contiguous();
    ASSERT_LE(rec.storage_data_offset + rec.storage_nbytes, file.size());
    if (rec.storage_nbytes > 0) {  // an empty chunk's tensor has no data pointer to compare
      EXPECT_EQ(std::memcmp(file.data() + rec.storage_data_offset, expected.const_data_ptr(), rec.storage_nbytes), 0);
    }
    EXPECT_TRUE(tensor_bitwise_equal(MUST(dcp::read_tensor_chunk(path("f.distcp"), c.info)), expected));
  }
}

TEST_F(DcpChunks, BytesItemsRoundTripAndAreNotTensors) {
  std::string file;
  const auto sink = [&](const void* data, size_t n) {
    file.append(static_cast<const char*>(data), n);
    return ok();
  };
  ListPtr value = List::make(true);
  value->push_back(0.9);
  value->push_back("x");
  const uint64_t length = MUST(dcp::write_bytes_item(Value(value), sink));
  EXPECT_EQ(length, file.size());
  std::ofstream(path("b.distcp"), std::ios::binary) << file;
  const dcp::StorageInfo info{"b.distcp", 0, static_cast<int64_t>(length), std::nullopt};
  std::string why;
  EXPECT_TRUE(deep_equal(MUST(dcp::read_bytes_item(path("b.distcp"), info)), Value(value), &why)) << why;

  Result<TorchTensorRecord> r = dcp::locate_tensor_chunk(path("b.distcp"), info);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, Code::kWrongKind);
  EXPECT_EQ(dcp::read_tensor_chunk(path("b.distcp"), info).error().code, Code::kWrongKind);

  dcp::StorageInfo compressed = info;
  compressed.transform_descriptors = std::vector<std::string>{"zstd"};
  Result<Value> c = dcp::read_bytes_item(path("b.distcp"), compressed);
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.error().code, Code::kUnsupported);
  EXPECT_THAT(c.error().message, HasSubstr("stream transform 'zstd'"));

  // DCP's ZStandard transform: the item's archive as one zstd frame.
  std::string frame(ZSTD_compressBound(file.size()), '\0');
  frame.resize(ZSTD_compress(frame.data(), frame.size(), file.data(), file.size(), 3));
  std::ofstream(path("z.distcp"), std::ios::binary) << frame;
  dcp::StorageInfo zstd{"z.distcp", 0, static_cast<int64_t>(frame.size()), std::vector<std::string>{"stream.zstd/1"}};
  EXPECT_TRUE(deep_equal(MUST(dcp::read_bytes_item(path("z.distcp"), zstd)), Value(value), &why)) << why;
  EXPECT_EQ(dcp::locate_tensor_chunk(path("z.distcp"), zstd).error().code, Code::kUnsupported);
  dcp::StorageInfo cut = zstd;
  cut.length -= 4;
  Result<Value> t = dcp::read_bytes_item(path("z.distcp"), cut);
  ASSERT_FALSE(t.ok());
  EXPECT_EQ(t.error().code, Code::kCorrupt);
  EXPECT_THAT(t.error().message, HasSubstr("z.distcp"));
  EXPECT_EQ(dcp::read_bytes_item(path("z.distcp"), zstd, file.size() - 1).error().code, Code::kCorrupt);
  dcp::StorageInfo v2 = zstd;
  v2.transform_descriptors = std::vector<std::string>{"stream.zstd/2"};
  EXPECT_EQ(dcp::read_bytes_item(path("z.distcp"), v2).error().code, Code::kUnsupported);
  dcp::StorageInfo raw_as_zstd = info;
  raw_as_zstd.transform_descriptors = zstd.transform_descriptors;
  EXPECT_EQ(dcp::read_bytes_item(path("b.distcp"), raw_as_zstd).error().code, Code::kCorrupt);
}

}  // namespace
}  // namespace dsd
