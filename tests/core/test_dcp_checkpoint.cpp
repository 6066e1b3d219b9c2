// PyTorch DCP checkpoints in the load/save engine at world size 1: round trips through
// format=kDcp, resharded reads of hand-built multi-chunk checkpoints, the non-raw fallback
// (a chunk saved as a strided view), hostile metadata, overwrite, format detection.
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/randn.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include "ckpt_test_util.h"
#include "core/checkpoint/dcp_files.h"
#include "core/checkpoint/io.h"
#include "core/checkpoint/load.h"
#include "core/checkpoint/manager.h"
#include "core/checkpoint/save.h"
#include "core/checkpoint/source.h"
#include "core/checkpoint/verify.h"
#include "core/dist/layout.h"
#include "core/dist/mesh.h"
#include "core/formats/dcp_chunks.h"
#include "core/formats/dcp_metadata.h"
#include "core/interop/detect.h"
#include "core/tensor/dtype_torch.h"

namespace dsd::checkpoint {
namespace {

using interop::detect_format;

using ::testing::HasSubstr;
using dsd::testing::TempDir;

std::shared_ptr<const Layout> chunk_layout(std::vector<int64_t> global, Chunk c) {
  auto mesh = MUST(DeviceMesh::make(nullptr, {1}, {}, c10::DeviceType::CPU));
  return MUST(Layout::explicit_chunk(std::move(global), mesh, std::move(c)));
}

at::Tensor narrow_to(at::Tensor t, const Chunk& c) {
  for (size_t d = 0; d < c.offsets.size(); ++d) t = t.narrow(static_cast<int64_t>(d), c.offsets[d], c.sizes[d]);
  return t;
}

void write_bytes(const std::string& path, std::string_view bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

// A DCP checkpoint written by hand: `w` of shape [10, 6] in three row chunks (the middle one
// saved through `middle`, so tests can store it strided or as another dtype), and a value.
struct HandMade {
  at::Tensor w = at::randn({10, 6});
  dcp::Metadata md;
};

HandMade hand_made(const std::string& dir, const std::function<at::Tensor(const at::Tensor&)>& middle = {}) {
  HandMade h;
  std::filesystem::create_directories(dir);
  std::string data;
  auto sink = [&](const void* p, size_t n) {
    data.append(static_cast<const char*>(p), n);
    return ok();
  };
  const auto off = static_cast<int64_t>(data.size());
  const uint64_t vlen = MUST(dcp::write_bytes_item(Value(int64_t{7}), sink));
  h.md.state_dict_metadata.emplace_back("step", dcp::BytesStorageMetadata{});
  h.md.storage_data.push_back({{"step", std::nullopt, std::nullopt}, {"__0_0.distcp", off, static_cast<int64_t>(vlen), std::nullopt}});
  dcp::TensorStorageMetadata t;
  t.properties.dtype = DType::kFloat32;
  t.size = {10, 6};
  const std::vector<std::pair<int64_t, int64_t>> rows = {{0, 4}, {4, 3}, {7, 3}};
  for (size_t i = 0; i < rows.size(); ++i) {
    at::Tensor part = h.w.narrow(0, rows[i].first, rows[i].second).clone();
    const auto start = static_cast<int64_t>(data.size());
    uint64_t len = 0;
    if (i == 1 && middle) {
      // A whole torch.save archive of whatever `middle` makes of the chunk.
      const std::string bytes = MUST(torch_save_bytes(Value(middle(part))));
      data += bytes;
      len = bytes.size();
    } else {
      len = MUST(dcp::write_tensor_chunk(part, sink));
    }
    t.chunks.push_back({{rows[i].first, 0}, {rows[i].second, 6}});
    h.md.storage_data.push_back({{"w", std::vector<int64_t>{rows[i].first, 0}, static_cast<int64_t>(i)},
                                 {"__0_0.distcp", start, static_cast<int64_t>(len), std::nullopt}});
  }
  h.md.state_dict_metadata.emplace_back("w", std::move(t));
  h.md.version = "1.0.0";
  write_bytes(dir + "/__0_0.distcp", data);
  write_bytes(dir + "/.metadata", MUST(dcp::serialize_metadata(h.md)));
  return h;
}

class DcpCheckpointTest : public ::testing::Test {
 protected:
  TempDir tmp;
  std::shared_ptr<Communicator> comm = make_local_communicator();
};

TEST_F(DcpCheckpointTest, RoundTripThroughDcpFormat) {
  DictPtr sd = Dict::make();
  DictPtr model = Dict::make();
  for (DType dt : all_dtypes()) {
    model->set(std::string(dtype_name(dt)), Value(at::arange(12, at::kLong).to(to_scalar_type(dt)).view({3, 4})));
  }
  model->set("scalar", Value(at::full({}, 2.5)));
  model->set("empty", Value(at::empty({0, 3})));
  model->set("strided", Value(at::randn({5, 4}).t()));
  sd->set("model", Value(model));
  sd->set("step", Value(int64_t{9}));
  ListPtr betas = List::make(true);
  betas->push_back(Value(0.9));
  betas->push_back(Value(0.99));
  sd->set("betas", Value(betas));
  const std::string path = tmp.sub("ck");
  SaveOptions so;
  so.format = Format::kDcp;
  auto info = save(*comm, *sd, path, so);
  ASSERT_TRUE(info.ok()) << info.error().message;
  EXPECT_TRUE(path_exists(path + "/.metadata"));
  EXPECT_FALSE(path_exists(path + "/checkpoint.json"));
  EXPECT_EQ(MUST(detect_format(path)), Format::kDcp);

  auto full = load_full(path);
  ASSERT_TRUE(full.ok()) << full.error().message;
  std::string why;
  EXPECT_TRUE(deep_equal(**full, *sd, &why)) << why;

  DictPtr dst = deep_copy(*sd);
  for (auto& e : *dst->find("model")->if_dict()) e.value = Value(at::zeros_like(e.value.if_tensor()->tensor));
  dst->set("step", Value());
  dst->set("betas", Value());
  auto r = load(*comm, *dst, path);
  ASSERT_TRUE(r.ok()) << r.error().message;
  EXPECT_TRUE(deep_equal(*dst, *sd, &why)) << why;

  EXPECT_TRUE(MUST(verify(path)).empty());
}

TEST_F(DcpCheckpointTest, ReshardedReadsOfSavedChunks) {
  const std::string dir = tmp.sub("hand");
  const HandMade h = hand_made(dir);
  for (const Chunk& c : {Chunk{{0, 0}, {10, 6}}, Chunk{{2, 1}, {7, 3}}, Chunk{{4, 0}, {3, 6}}, Chunk{{9, 5}, {1, 1}},
                         Chunk{{3, 0}, {0, 6}}}) {
    DictPtr dst = Dict::make();
    dst->set("w", Value(TensorValue{at::zeros(c.sizes), chunk_layout({10, 6}, c), false}));
    dst->set("step", Value());
    auto r = load(*comm, *dst, dir);
    ASSERT_TRUE(r.ok()) << r.error().message;
    EXPECT_TRUE(tensor_bitwise_equal(dst->find("w")->if_tensor()->tensor, narrow_to(h.w, c))) << c.str();
    EXPECT_EQ(*dst->find("step")->if_int(), 7);
  }
}

TEST_F(DcpCheckpointTest, ChunkThatIsNotRawIsReadWhole) {
  // The middle chunk is stored as the transpose of a [6, 3] tensor: not contiguous.
  const std::string dir = tmp.sub("strided");
  const HandMade h = hand_made(dir, [](const at::Tensor& part) { return part.t().contiguous().t(); });
  const Source src = MUST(open_source(dir));
  const Entry& w = src.manifest.entries[1];
  const LocatedChunk mid = MUST(locate_dcp_chunk(src, w, w.chunks[1]));
  EXPECT_TRUE(mid.tensor.defined());
  const LocatedChunk first = MUST(locate_dcp_chunk(src, w, w.chunks[0]));
  EXPECT_FALSE(first.tensor.defined());
  EXPECT_EQ(first.end - first.begin, 4u * 6 * 4);
  const Chunk c{{3, 2}, {6, 3}};
  DictPtr dst = Dict::make();
  dst->set("w", Value(TensorValue{at::zeros(c.sizes), chunk_layout({10, 6}, c), false}));
  auto r = load(*comm, *dst, dir, LoadOptions{false, 0, true});
  ASSERT_TRUE(r.ok()) << r.error().message;
  EXPECT_TRUE(tensor_bitwise_equal(dst->find("w")->if_tensor()->tensor, narrow_to(h.w, c)));
}

TEST_F(DcpCheckpointTest, ChunkOfAnotherDtypeIsCorrupt) {
  const std::string dir = tmp.sub("dtype");
  hand_made(dir, [](const at::Tensor& part) { return part.to(at::kDouble); });
  DictPtr dst = Dict::make();
  dst->set("w", Value(at::zeros({10, 6})));
  auto r = load(*comm, *dst, dir, LoadOptions{false, 0, true});
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, Code::kCorrupt);
  EXPECT_THAT(r.error().message, HasSubstr("__0_0.distcp"));
  EXPECT_THAT(r.error().message, HasSubstr("'w'"));
  EXPECT_THAT(r.error().message, HasSubstr("float64"));
  auto problems = MUST(verify(dir));
  ASSERT_EQ(problems.size(), 1u);
  EXPECT_EQ(problems[0].key, "w");
  EXPECT_EQ(problems[0].file, "__0_0.distcp");
}

TEST_F(DcpCheckpointTest, HostileMetadataIsRefused) {
  const std::string dir = tmp.sub("hostile");
  HandMade h = hand_made(dir);
  dcp::Metadata md = h.md;
  md.storage_data[1].second.relative_path = "../outside.distcp";
  auto r = dcp_source(dir, md);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, Code::kCorrupt);
  EXPECT_THAT(r.error().message, HasSubstr("not a file of the directory"));

  md = h.md;
  std::get<dcp::TensorStorageMetadata>(md.state_dict_metadata[1].second).chunks[2].sizes = {4, 6};
  r = dcp_source(dir, md);
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(r.error().message, HasSubstr("lie outside its shape [10, 6]"));

  md = h.md;
  md.storage_data.pop_back();
  r = dcp_source(dir, md);
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(r.error().message, HasSubstr("has no storage entry"));

  md = h.md;
  std::get<dcp::TensorStorageMetadata>(md.state_dict_metadata[1].second).chunks.pop_back();
  write_bytes(dir + "/.metadata", MUST(dcp::serialize_metadata(md)));
  auto problems = MUST(verify(dir));
  ASSERT_EQ(problems.size(), 1u);
  EXPECT_THAT(problems[0].message, HasSubstr("cover 42 of its 60 elements"));
}

TEST_F(DcpCheckpointTest, OverwriteUsesNewFileNames) {
  DictPtr sd = Dict::make();
  sd->set("a", Value(at::randn({4})));
  const std::string path = tmp.sub("ow");
  SaveOptions so;
  so.format = Format::kDcp;
  ASSERT_TRUE(save(*comm, *sd, path, so).ok());
  auto again = save(*comm, *sd, path, so);
  ASSERT_FALSE(again.ok());
  EXPECT_EQ(again.error().code, Code::kExists);
  so.overwrite = true;
  sd->set("a", Value(at::full({4}, 3.0)));
  ASSERT_TRUE(save(*comm, *sd, path, so).ok());
  auto names = MUST(list_dir(path));
  std::sort(names.begin(), names.end());
  EXPECT_EQ(names, (std::vector<std::string>{".metadata", "__0_1.distcp"}));
  EXPECT_TRUE(tensor_bitwise_equal((*load_full(path))->find("a")->if_tensor()->tensor, at::full({4}, 3.0)));
}

TEST_F(DcpCheckpointTest, FormatDetection) {
  DictPtr sd = Dict::make();
  sd->set("a", Value(at::randn({4})));
  ASSERT_TRUE(save(*comm, *sd, tmp.sub("dsd")).ok());
  EXPECT_EQ(MUST(detect_format(tmp.sub("dsd"))), Format::kDsd);
  ASSERT_TRUE(torch_save(Value(sd), tmp.sub("sd.pt")).ok());
  EXPECT_EQ(MUST(detect_format(tmp.sub("sd.pt"))), Format::kTorchSave);
  std::filesystem::create_directories(tmp.sub("rank_local"));
  write_bytes(tmp.sub("rank_local/__2.metadata"), "x");
  EXPECT_EQ(MUST(detect_format(tmp.sub("rank_local"))), Format::kDcp);
  EXPECT_EQ(dcp_rank_metadata("__12.metadata"), 12);
  EXPECT_FALSE(dcp_rank_metadata("__x.metadata"));
  std::filesystem::create_directories(tmp.sub("empty"));
  auto e = detect_format(tmp.sub("empty"));
  ASSERT_FALSE(e.ok());
  EXPECT_EQ(e.error().code, Code::kNotFound);
  auto m = detect_format(tmp.sub("missing"));
  ASSERT_FALSE(m.ok());
  EXPECT_EQ(m.error().code, Code::kNotFound);
  EXPECT_THAT(m.error().message, HasSubstr("does not exist"));
  write_bytes(tmp.sub("junk"), "just some text");
  auto j = detect_format(tmp.sub("junk"));
  ASSERT_FALSE(j.ok());
  EXPECT_EQ(j.error().code, Code::kUnsupported);
  // Data files without a commit marker are not a checkpoint, of any format.
  std::filesystem::remove(tmp.sub("dsd/checkpoint.json"));
  auto u = detect_format(tmp.sub("dsd"));
  ASSERT_FALSE(u.ok());
  EXPECT_THAT(u.error().message, HasSubstr("the save did not commit"));
  EXPECT_EQ(format_from_name("safetensors"), Format::kSafetensors);
  EXPECT_EQ(format_from_name("pt"), Format::kTorchSave);
  EXPECT_FALSE(format_from_name("zip"));
}

TEST_F(DcpCheckpointTest, UnknownSaveFormatIsRefused) {
  DictPtr sd = Dict::make();
  sd->set("a", Value(at::randn({4})));
  SaveOptions so;
  so.format = Format::kTorchSave;
  auto r = save(*comm, *sd, tmp.sub("x"), so);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, Code::kInvalidArgument);
  EXPECT_THAT(r.error().message, HasSubstr("dsd or dcp, not torch"));
}

TEST_F(DcpCheckpointTest, ManagerKeepsDcpSteps) {
  CheckpointManager manager(tmp.sub("steps"), 2);
  SaveOptions so;
  so.format = Format::kDcp;
  for (int64_t step : {1, 2, 3}) {
    DictPtr sd = Dict::make();
    sd->set("a", Value(at::full({3}, static_cast<double>(step))));
    ASSERT_TRUE(manager.save(*comm, *sd, step, so).ok());
  }
  EXPECT_EQ(MUST(manager.latest_step()), 3);
  EXPECT_FALSE(path_exists(tmp.sub("steps/step_1")));
  DictPtr dst = Dict::make();
  dst->set("a", Value(at::zeros({3})));
  EXPECT_EQ(MUST(manager.load_latest(*comm, *dst)), 3);
  EXPECT_TRUE(tensor_bitwise_equal(dst->find("a")->if_tensor()->tensor, at::full({3}, 3.0)));
}

}  // namespace
}  // namespace dsd::checkpoint
