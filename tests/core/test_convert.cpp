// Conversions in C++: StateReader over every format, torch.save export streamed through
// placeholders, safetensors export with a size cap and its import, diff, verify_any, and
// torch_load's memory-mapped storages.
#include <ATen/ops/arange.h>
#include <ATen/ops/full.h>
#include <ATen/ops/randn.h>
#include <ATen/ops/zeros.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <fmt/format.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "ckpt_test_util.h"
#include "core/checkpoint/io.h"
#include "core/checkpoint/load.h"
#include "core/checkpoint/save.h"
#include "core/dist/layout.h"
#include "core/dist/mesh.h"
#include "core/formats/torch_save.h"
#include "core/formats/zip_check.h"
#include "core/interop/convert.h"
#include "core/interop/diff.h"
#include "core/interop/verify_any.h"
#include "core/tensor/dtype_torch.h"

namespace dsd::checkpoint {
namespace {

using namespace ::dsd::interop;  // NOLINT: the conversions under test

using ::testing::HasSubstr;
using dsd::testing::TempDir;

DictPtr sample() {
  DictPtr sd = Dict::make();
  DictPtr model = Dict::make();
  for (int i = 0; i < 6; ++i) model->set(fmt::format("layer{}.w", i), Value(at::randn({8, 5 + i})));
  model->set("ids", Value(at::arange(7, at::kInt)));
  model->set("scalar", Value(at::full({}, 1.5)));
  sd->set("model", Value(model));
  DictPtr state = Dict::make();
  state->set_int_keys(true);
  DictPtr s0 = Dict::make();
  s0->set("step", Value(at::full({}, 3.0)));
  state->set("0", Value(s0));
  DictPtr optim = Dict::make();
  optim->set("state", Value(state));
  optim->set("lr", Value(0.01));
  sd->set("optim", Value(optim));
  sd->set("name", Value("run"));
  return sd;
}

uint64_t data_bytes(const Dict& sd) {
  auto r = MUST(StateReader::of(sd));
  return r->tensor_bytes();
}

class ConvertTest : public ::testing::Test {
 protected:
  TempDir tmp;
  std::shared_ptr<Communicator> comm = make_local_communicator();
};

TEST_F(ConvertTest, EveryFormatReadsTheSameState) {
  DictPtr sd = sample();
  ASSERT_TRUE(save(*comm, *sd, tmp.sub("dsd")).ok());
  SaveOptions dcp;
  dcp.format = Format::kDcp;
  ASSERT_TRUE(save(*comm, *sd, tmp.sub("dcp"), dcp).ok());
  ASSERT_TRUE(export_torch_save(*sd, tmp.sub("sd.pt")).ok());
  ConvertOptions capped;
  capped.max_shard_size = 200;
  ASSERT_TRUE(export_safetensors(*sd, tmp.sub("hf"), capped).ok());
  for (const char* name : {"dsd", "dcp", "sd.pt", "hf"}) {
    auto reader = StateReader::open(tmp.sub(name));
    ASSERT_TRUE(reader.ok()) << name << ": " << reader.error().message;
    EXPECT_EQ((*reader)->tensor_bytes(), data_bytes(*sd)) << name;
    auto all = read_all(**reader);
    ASSERT_TRUE(all.ok()) << all.error().message;
    // DCP's metadata has no room for int-keyed dicts: their keys come back as strings.
    DictPtr want = deep_copy(*sd);
    if (std::string(name) == "dcp") want->find("optim")->if_dict()->find("state")->if_dict()->set_int_keys(false);
    std::string why;
    EXPECT_TRUE(deep_equal(**all, *want, &why)) << name << ": " << why;
  }
}

TEST_F(ConvertTest, TorchExportStreamsFromACheckpoint) {
  DictPtr sd = sample();
  ASSERT_TRUE(save(*comm, *sd, tmp.sub("ck")).ok());
  auto reader = MUST(StateReader::open(tmp.sub("ck")));
  std::vector<std::pair<uint64_t, uint64_t>> seen;
  ConvertOptions o;
  o.progress = [&](uint64_t d, uint64_t t) { seen.emplace_back(d, t); };
  ASSERT_TRUE(export_torch_save(*reader, tmp.sub("out.pt"), o).ok());
  ASSERT_FALSE(seen.empty());
  EXPECT_EQ(seen.back().first, data_bytes(*sd));
  EXPECT_EQ(seen.back().second, data_bytes(*sd));
  EXPECT_GT(seen.size(), 6u);  // one step per tensor
  DictPtr back = MUST(import_torch_save(tmp.sub("out.pt")));
  std::string why;
  EXPECT_TRUE(deep_equal(*back, *sd, &why)) << why;
  EXPECT_TRUE(back->find("optim")->if_dict()->find("state")->if_dict()->int_keys());
  auto again = export_torch_save(*reader, tmp.sub("out.pt"));
  ASSERT_FALSE(again.ok());
  EXPECT_EQ(again.error().code, Code::kExists);
}

TEST_F(ConvertTest, SafetensorsShardsRespectTheCap) {
  DictPtr sd = sample();
  ConvertOptions o;
  o.max_shard_size = 400;
  ASSERT_TRUE(export_safetensors(*sd, tmp.sub("hf"), o).ok());
  const auto index = nlohmann::json::parse(MUST(read_file(tmp.sub("hf/model.safetensors.index.json"), 1 << 20)));
  EXPECT_EQ(index["metadata"]["total_size"].get<uint64_t>(), data_bytes(*sd));
  std::map<std::string, uint64_t> per_file;
  auto reader = MUST(StateReader::open(tmp.sub("hf")));
  for (const ItemInfo& it : reader->items()) {
    if (it.kind != Entry::Kind::kTensor) continue;
    EXPECT_EQ(index["weight_map"][it.key].get<std::string>(), it.chunks[0].file) << it.key;
    per_file[it.chunks[0].file] += it.nbytes;
  }
  const size_t n = per_file.size();
  EXPECT_GT(n, 2u);
  size_t k = 1;
  for (const auto& [file, bytes] : per_file) {
    EXPECT_EQ(file, fmt::format("model-{:05d}-of-{:05d}.safetensors", k++, n));
    EXPECT_LE(bytes, 400u) << file;
  }
  // A dsd checkpoint directory is not a safetensors export.
  ASSERT_TRUE(save(*comm, *sd, tmp.sub("ck")).ok());
  auto wrong = import_safetensors(tmp.sub("ck"));
  ASSERT_FALSE(wrong.ok());
  EXPECT_EQ(wrong.error().code, Code::kWrongKind);
}

TEST_F(ConvertTest, DiffFindsTheFirstDifferingElement) {
  DictPtr a = sample();
  DictPtr b = deep_copy(*a);
  at::Tensor w = b->find("model")->if_dict()->find("layer2.w")->if_tensor()->tensor.clone();
  w[3][4] = 100.0;
  b->find("model")->if_dict()->set("layer2.w", Value(w));
  b->find("model")->if_dict()->set("ids", Value(at::arange(7, at::kLong)));
  b->set("name", Value("other"));
  b->set("extra", Value(1));
  auto ra = MUST(StateReader::of(*a));
  auto rb = MUST(StateReader::of(*b));
  DiffReport d = MUST(diff(*ra, *rb));
  EXPECT_FALSE(d.equal());
  EXPECT_EQ(d.only_in_b, std::vector<std::string>{"extra"});
  ASSERT_EQ(d.differences.size(), 3u);
  EXPECT_EQ(d.differences[0].first, "model.layer2.w");
  EXPECT_THAT(d.differences[0].second, HasSubstr("first difference at [3, 4]:"));
  EXPECT_THAT(d.differences[0].second, HasSubstr("vs 100"));
  EXPECT_EQ(d.differences[1].second, "dtype int32 vs int64");
  EXPECT_THAT(d.differences[2].second, HasSubstr("values differ"));
  EXPECT_TRUE(MUST(diff(*ra, *ra)).equal());
}

TEST_F(ConvertTest, VerifyAnyNamesDamagedSafetensors) {
  DictPtr sd = sample();
  ASSERT_TRUE(export_safetensors(*sd, tmp.sub("hf")).ok());
  EXPECT_TRUE(MUST(verify_any(tmp.sub("hf"))).empty());
  const std::string f = tmp.sub("hf/model-00001-of-00001.safetensors");
  std::filesystem::resize_file(f, std::filesystem::file_size(f) - 10);
  auto problems = MUST(verify_any(tmp.sub("hf")));
  ASSERT_EQ(problems.size(), 1u);
  EXPECT_THAT(problems[0].message, HasSubstr("model-00001-of-00001.safetensors"));
}

TEST_F(ConvertTest, ShardedCheckpointsAreAssembled) {
  // Two explicit chunks of one tensor, saved as two keys' worth of plan by one rank is not
  // possible at world 1; a hand-made dsd checkpoint saved from a chunked layout covers it.
  at::Tensor full = at::randn({6, 4});
  auto mesh = MUST(DeviceMesh::make(nullptr, {1}, {}, c10::DeviceType::CPU));
  DictPtr sd = Dict::make();
  sd->set("w", Value(TensorValue{full, MUST(Layout::explicit_chunk({6, 4}, mesh, Chunk{{0, 0}, {6, 4}})), false}));
  ASSERT_TRUE(save(*comm, *sd, tmp.sub("ck")).ok());
  ASSERT_TRUE(convert(tmp.sub("ck"), tmp.sub("out.pt"), Format::kTorchSave).ok());
  DictPtr back = MUST(import_torch_save(tmp.sub("out.pt")));
  EXPECT_TRUE(tensor_bitwise_equal(back->find("w")->if_tensor()->tensor, full));
  // In-memory distributed tensors are refused: export full state dicts.
  auto r = export_torch_save(*sd, tmp.sub("dist.pt"));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, Code::kUnsupported);
  EXPECT_THAT(r.error().message, HasSubstr("'w' is a distributed tensor"));
}

TEST_F(ConvertTest, TorchLoadMapsStoragesCopyOnWrite) {
  DictPtr sd = Dict::make();
  at::Tensor w = at::randn({256, 64});
  sd->set("w", Value(w));
  sd->set("i8", Value(at::arange(3, at::kChar)));
  ASSERT_TRUE(torch_save(Value(sd), tmp.sub("m.pt")).ok());
  TorchLoadOptions o;
  o.mmap = true;
  Value v = MUST(torch_load(TorchArchive::file(tmp.sub("m.pt")), o));
  at::Tensor got = v.if_dict()->find("w")->if_tensor()->tensor;
  EXPECT_TRUE(tensor_bitwise_equal(got, w));
  got.fill_(0.0);  // private mapping: the file is untouched
  Value again = MUST(torch_load(TorchArchive::file(tmp.sub("m.pt"))));
  EXPECT_TRUE(tensor_bitwise_equal(again.if_dict()->find("w")->if_tensor()->tensor, w));
}

TEST_F(ConvertTest, ZipCrcsOfTorchSaveFiles) {
  EXPECT_EQ(crc32("123456789", 9), 0xCBF43926u);
  EXPECT_EQ(crc32("56789", 5, crc32("1234", 4)), 0xCBF43926u);
  DictPtr sd = Dict::make();
  sd->set("w", Value(at::arange(4096, at::kFloat)));
  ASSERT_TRUE(torch_save(Value(sd), tmp.sub("w.pt")).ok());
  auto records = MUST(check_zip(tmp.sub("w.pt")));
  ASSERT_GE(records.size(), 5u);
  for (const auto& r : records) EXPECT_TRUE(r.crc_ok) << r.name;
  const auto data = std::find_if(records.begin(), records.end(), [](const auto& r) { return r.name.ends_with("/data/0"); });
  ASSERT_NE(data, records.end());
  EXPECT_EQ(data->size, 4096u * 4);
  {
    std::fstream f(tmp.sub("w.pt"), std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(static_cast<std::streamoff>(data->offset + 100));
    f.put('\x7f');
  }
  records = MUST(check_zip(tmp.sub("w.pt")));
  for (const auto& r : records) EXPECT_EQ(r.crc_ok, !r.name.ends_with("/data/0")) << r.name;
  auto problems = MUST(verify_any(tmp.sub("w.pt")));
  ASSERT_EQ(problems.size(), 1u);
  EXPECT_EQ(problems[0].key, "w");
  // Not a zip at all.
  std::ofstream(tmp.sub("junk.pt")) << "PK\x03\x04 but nothing else, not even a directory";
  auto junk = check_zip(tmp.sub("junk.pt"));
  ASSERT_FALSE(junk.ok());
  EXPECT_EQ(junk.error().code, Code::kCorrupt);
  EXPECT_THAT(junk.error().message, HasSubstr("no end of central directory"));
}

}  // namespace
}  // namespace dsd::checkpoint
