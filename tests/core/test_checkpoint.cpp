// Save/load round trips at world size 1: every dtype, non-contiguous tensors, non-tensor
// values, resharding through explicit-chunk layouts, corruption, truncation, overwrite
// refusal and a full disk (RLIMIT_FSIZE).
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/randn.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <sys/resource.h>

#include <cmath>
#include <csignal>
#include <filesystem>
#include <fstream>

#include "ckpt_test_util.h"
#include "core/checkpoint/io.h"
#include "core/checkpoint/load.h"
#include "core/checkpoint/save.h"
#include "core/checkpoint/save_planner.h"
#include "core/checkpoint/verify.h"
#include "core/dist/layout.h"
#include "core/dist/mesh.h"
#include "core/tensor/dtype_torch.h"

namespace dsd::checkpoint {
namespace {

using ::testing::HasSubstr;
using dsd::testing::TempDir;

at::Tensor bytes_tensor(DType dt, std::vector<int64_t> shape, int seed) {
  // Arbitrary bit patterns of every dtype (bitwise compare, so NaN payloads are fine).
  int64_t n = 1;
  for (int64_t s : shape) n *= s;
  const auto esize = static_cast<int64_t>(element_size(dt));
  at::Tensor raw = at::arange(n * esize, at::kLong).mul_(131).add_(seed).remainder_(251).to(at::kByte);
  if (dt == DType::kBool) raw = raw.remainder(2);
  return raw.view(to_scalar_type(dt)).view(shape).clone();
}

DictPtr sample_state_dict() {
  DictPtr sd = Dict::make();
  DictPtr model = Dict::make();
  model->set("w", Value(at::randn({64, 33})));
  model->set("b", Value(at::randn({7})));
  model->set("scalar", Value(at::full({}, 3.5)));
  model->set("empty", Value(at::empty({0, 4})));
  sd->set("model", Value(model));
  DictPtr optim = Dict::make();
  optim->set("step", Value(int64_t{42}));
  optim->set("lr", Value(0.001));
  optim->set("nan", Value(std::nan("")));
  optim->set("inf", Value(-INFINITY));
  optim->set("name", Value("adam"));
  optim->set("blob", Value(Bytes{std::string("\x00\xff\x01", 3)}));
  ListPtr betas = List::make(true);
  betas->push_back(Value(0.9));
  betas->push_back(Value(0.999));
  optim->set("betas", Value(betas));
  ListPtr groups = List::make(false);
  DictPtr g = Dict::make();
  g->set("params", Value(List::make(false)));
  DictPtr ik = Dict::make();
  ik->set("0", Value(1));
  ik->set("7", Value());
  ik->set_int_keys(true);
  g->set("ids", Value(ik));
  groups->push_back(Value(g));
  optim->set("param_groups", Value(groups));
  sd->set("optim", Value(optim));
  return sd;
}

// The same structure with zeroed tensors and other scalars (what a fresh trainer holds).
Value blank_value(const Value& v) {
  if (const Dict* d = v.if_dict()) {
    DictPtr out = Dict::make();
    for (const auto& e : *d) out->set(e.key, blank_value(e.value));
    out->set_int_keys(d->int_keys());
    return Value(out);
  }
  if (const List* l = v.if_list()) {
    ListPtr out = List::make(l->is_tuple());
    for (const Value& x : l->items()) out->push_back(blank_value(x));
    return Value(out);
  }
  if (const TensorValue* t = v.if_tensor()) return Value(at::zeros_like(t->tensor));
  return Value(int64_t{-1});
}
DictPtr blank_like(const Dict& src) { return blank_value(Value(deep_copy(src))).dict_ptr(); }

class CheckpointTest : public ::testing::Test {
 protected:
  std::shared_ptr<Communicator> comm = make_local_communicator();
  TempDir tmp;
};

TEST_F(CheckpointTest, RoundTripRestoresTensorsAndValues) {
  DictPtr sd = sample_state_dict();
  const std::string path = tmp.sub("ck");
  auto info = save(*comm, *sd, path);
  ASSERT_TRUE(info.ok()) << info.error().message;
  EXPECT_EQ(info->save_id.size(), 16u);
  DictPtr dst = blank_like(*sd);
  auto report = load(*comm, *dst, path);
  ASSERT_TRUE(report.ok()) << report.error().message;
  std::string why;
  EXPECT_TRUE(deep_equal(*sd, *dst, &why)) << why;
  EXPECT_TRUE(report->missing_keys.empty());
  EXPECT_TRUE(report->unexpected_keys.empty());
}

TEST_F(CheckpointTest, EveryDtypeRoundTripsBitwise) {
  DictPtr sd = Dict::make();
  int seed = 0;
  for (DType dt : all_dtypes()) sd->set(std::string(dtype_name(dt)), Value(bytes_tensor(dt, {5, 3}, seed++)));
  const std::string path = tmp.sub("dtypes");
  ASSERT_TRUE(save(*comm, *sd, path).ok());
  DictPtr dst = blank_like(*sd);
  auto r = load(*comm, *dst, path);
  ASSERT_TRUE(r.ok()) << r.error().message;
  std::string why;
  EXPECT_TRUE(deep_equal(*sd, *dst, &why)) << why;
}

TEST_F(CheckpointTest, NonContiguousSourcesAndDestinations) {
  at::Tensor base = at::randn({40, 30});
  DictPtr sd = Dict::make();
  sd->set("t", Value(base.t()));                      // transposed
  sd->set("slice", Value(base.narrow(1, 3, 10)));     // strided rows
  at::Tensor z = at::randn({4}, at::kComplexFloat);
  sd->set("conj", Value(z.conj()));
  const std::string path = tmp.sub("nc");
  ASSERT_TRUE(save(*comm, *sd, path).ok());
  DictPtr dst = Dict::make();
  dst->set("t", Value(at::zeros({40, 30}).t()));
  dst->set("slice", Value(at::zeros({40, 80}).narrow(1, 5, 10)));
  dst->set("conj", Value(at::zeros({4}, at::kComplexFloat)));
  auto r = load(*comm, *dst, path);
  ASSERT_TRUE(r.ok()) << r.error().message;
  sd->set("conj", Value(z.conj().resolve_conj()));  // the saved values, materialised
  std::string why;
  EXPECT_TRUE(deep_equal(*sd, *dst, &why)) << why;
}

std::shared_ptr<const Layout> chunk_layout(std::vector<int64_t> global, Chunk c) {
  auto mesh = MUST(DeviceMesh::make(nullptr, {1}, {}, c10::DeviceType::CPU));
  return MUST(Layout::explicit_chunk(std::move(global), mesh, std::move(c)));
}

TEST_F(CheckpointTest, ReshardsIntoOtherChunks) {
  // Saved whole, loaded as several differently-placed chunks (what another world size sees).
  at::Tensor full = at::randn({37, 19});
  DictPtr sd = Dict::make();
  sd->set("w", Value(full));
  const std::string path = tmp.sub("rs");
  SaveOptions so;
  so.block_size = 4096;  // small blocks: partial blocks and bounce reads are exercised
  ASSERT_TRUE(save(*comm, *sd, path, so).ok());
  for (Chunk c : {Chunk{{5, 2}, {20, 9}}, Chunk{{0, 0}, {37, 1}}, Chunk{{36, 0}, {1, 19}},
                  Chunk{{0, 0}, {37, 19}}, Chunk{{10, 18}, {0, 1}}}) {
    DictPtr dst = Dict::make();
    dst->set("w", Value(TensorValue{at::zeros(c.sizes), chunk_layout({37, 19}, c), false}));
    auto r = load(*comm, *dst, path);
    ASSERT_TRUE(r.ok()) << r.error().message;
    at::Tensor expect = full;
    for (size_t d = 0; d < 2; ++d) expect = expect.narrow(static_cast<int64_t>(d), c.offsets[d], c.sizes[d]);
    EXPECT_TRUE(tensor_bitwise_equal(dst->find("w")->if_tensor()->tensor, expect)) << c.str();
  }
}

TEST_F(CheckpointTest, SavedShardsLoadWhole) {
  // A distributed tensor whose one chunk covers it (a 1-rank mesh) loads as a plain tensor.
  at::Tensor full = at::randn({8, 6});
  DictPtr sd = Dict::make();
  sd->set("w", Value(TensorValue{full, chunk_layout({8, 6}, Chunk{{0, 0}, {8, 6}}), false}));
  const std::string path = tmp.sub("sw");
  ASSERT_TRUE(save(*comm, *sd, path).ok());
  auto out = load_full(path);
  ASSERT_TRUE(out.ok()) << out.error().message;
  EXPECT_TRUE(tensor_bitwise_equal((*out)->find("w")->if_tensor()->tensor, full));
}

TEST_F(CheckpointTest, MissingKeyStrictAndNonStrict) {
  DictPtr sd = Dict::make();
  sd->set("a", Value(at::randn({3})));
  sd->set("extra_saved", Value(1));
  const std::string path = tmp.sub("mk");
  ASSERT_TRUE(save(*comm, *sd, path).ok());
  DictPtr dst = Dict::make();
  dst->set("a", Value(at::zeros({3})));
  dst->set("not_saved", Value(at::zeros({2})));
  auto strict = load(*comm, *dst, path);
  ASSERT_FALSE(strict.ok());
  EXPECT_EQ(strict.error().code, Code::kNotFound);
  EXPECT_THAT(strict.error().message, HasSubstr("Missing key in checkpoint state_dict: not_saved"));
  LoadOptions lo;
  lo.strict = false;
  auto loose = load(*comm, *dst, path, lo);
  ASSERT_TRUE(loose.ok()) << loose.error().message;
  EXPECT_EQ(loose->missing_keys, std::vector<std::string>{"not_saved"});
  EXPECT_EQ(loose->skipped_keys, std::vector<std::string>{"not_saved"});
  EXPECT_EQ(loose->unexpected_keys, std::vector<std::string>{"extra_saved"});
  EXPECT_TRUE(tensor_bitwise_equal(dst->find("a")->if_tensor()->tensor, sd->find("a")->if_tensor()->tensor));
}

TEST_F(CheckpointTest, ShapeDtypeAndKindMismatchesNameTheKey) {
  DictPtr sd = Dict::make();
  sd->set("w", Value(at::randn({4, 4})));
  sd->set("v", Value(3));
  const std::string path = tmp.sub("mm");
  ASSERT_TRUE(save(*comm, *sd, path).ok());
  struct Case {
    std::string key;
    Value value;
    Code code;
    std::string text;
  };
  for (const Case& c : {Case{"w", Value(at::zeros({4, 5})), Code::kShapeMismatch, "Size mismatch between saved [4, 4] and current: [4, 5] for 'w'"},
                        Case{"w", Value(at::zeros({4, 4}, at::kDouble)), Code::kDtypeMismatch, "saved float32 and current float64 for 'w'"},
                        Case{"w", Value(1), Code::kWrongKind, "'w' is a int in the state dict but a tensor"},
                        Case{"v", Value(at::zeros({1})), Code::kWrongKind, "'v' is a tensor in the state dict but a non-tensor value"}}) {
    DictPtr dst = Dict::make();
    dst->set(c.key, c.value);
    auto r = load(*comm, *dst, path, LoadOptions{false, 0, true});
    ASSERT_FALSE(r.ok()) << c.key;
    EXPECT_EQ(r.error().code, c.code);
    EXPECT_THAT(r.error().message, HasSubstr(c.text));
  }
}

TEST_F(CheckpointTest, LoadFullSelectsKeysAndPrefixes) {
  DictPtr sd = sample_state_dict();
  const std::string path = tmp.sub("lf");
  ASSERT_TRUE(save(*comm, *sd, path).ok());
  auto all = load_full(path);
  ASSERT_TRUE(all.ok()) << all.error().message;
  std::string why;
  EXPECT_TRUE(deep_equal(*sd, **all, &why)) << why;
  std::vector<std::string> keys{"model", "optim.step"};
  auto some = load_full(path, keys);
  ASSERT_TRUE(some.ok()) << some.error().message;
  EXPECT_EQ((*some)->find("model")->if_dict()->size(), 4u);
  EXPECT_EQ((*some)->find("optim")->if_dict()->size(), 1u);
  std::vector<std::string> bad{"nope"};
  auto none = load_full(path, bad);
  ASSERT_FALSE(none.ok());
  EXPECT_EQ(none.error().code, Code::kNotFound);
  EXPECT_THAT(none.error().message, HasSubstr("'nope'"));
}

TEST_F(CheckpointTest, OverwriteIsRefusedUnlessAskedAndKeepsTheOldCheckpoint) {
  DictPtr a = Dict::make();
  a->set("x", Value(at::full({3}, 1.0)));
  const std::string path = tmp.sub("ow");
  ASSERT_TRUE(save(*comm, *a, path).ok());
  DictPtr b = Dict::make();
  b->set("x", Value(at::full({3}, 2.0)));
  auto again = save(*comm, *b, path);
  ASSERT_FALSE(again.ok());
  EXPECT_EQ(again.error().code, Code::kExists);
  EXPECT_THAT(again.error().message, HasSubstr(path));
  auto before = load_full(path);
  ASSERT_TRUE(before.ok());
  EXPECT_TRUE(tensor_bitwise_equal((*before)->find("x")->if_tensor()->tensor, at::full({3}, 1.0)));
  SaveOptions so;
  so.overwrite = true;
  ASSERT_TRUE(save(*comm, *b, path, so).ok());
  auto after = load_full(path);
  ASSERT_TRUE(after.ok());
  EXPECT_TRUE(tensor_bitwise_equal((*after)->find("x")->if_tensor()->tensor, at::full({3}, 2.0)));
  // The old data files are gone: only the new save's files and the manifest remain.
  auto m = read_manifest(path);
  ASSERT_TRUE(m.ok());
  size_t data_files = 0;
  for (const auto& e : std::filesystem::directory_iterator(path)) {
    if (e.path().extension() == ".safetensors") ++data_files;
  }
  EXPECT_EQ(data_files, m->files.size());
}

void flip_byte(const std::string& file, uint64_t offset) {
  std::fstream f(file, std::ios::in | std::ios::out | std::ios::binary);
  f.seekg(static_cast<std::streamoff>(offset));
  char c;
  f.read(&c, 1);
  c = static_cast<char>(c ^ 0x40);
  f.seekp(static_cast<std::streamoff>(offset));
  f.write(&c, 1);
}

TEST_F(CheckpointTest, FlippedByteInEachDataFileIsReportedWithFileAndKey) {
  DictPtr sd = Dict::make();
  for (int i = 0; i < 4; ++i) sd->set("t" + std::to_string(i), Value(at::randn({300, 100})));
  const std::string path = tmp.sub("corrupt");
  SaveOptions so;
  so.thread_count = 2;  // two data files
  so.block_size = 4096;
  ASSERT_TRUE(save(*comm, *sd, path, so).ok());
  const Manifest m = MUST(read_manifest(path));
  ASSERT_EQ(m.files.size(), 2u);
  for (const FileRecord& f : m.files) {
    // The middle of the first chunk of this file.
    const Entry* victim = nullptr;
    const ChunkRecord* chunk = nullptr;
    for (const Entry& e : m.entries) {
      for (const ChunkRecord& c : e.chunks) {
        if (c.file == f.name && victim == nullptr) {
          victim = &e;
          chunk = &c;
        }
      }
    }
    ASSERT_NE(chunk, nullptr);
    const uint64_t at = chunk->begin + chunk->nbytes() / 2 + 3;
    flip_byte(path + "/" + f.name, at);
    DictPtr dst = blank_like(*sd);
    auto r = load(*comm, *dst, path);
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.error().code, Code::kCorrupt);
    EXPECT_THAT(r.error().message, HasSubstr(f.name));
    EXPECT_THAT(r.error().message, HasSubstr("'" + victim->key + "'"));
    // A partial read that touches the damaged block is caught too.
    DictPtr part = Dict::make();
    const int64_t row = static_cast<int64_t>((at - chunk->begin) / 4 / 100);
    Chunk c{{row, 0}, {1, 100}};
    part->set(victim->key, Value(TensorValue{at::zeros({1, 100}), chunk_layout({300, 100}, c), false}));
    auto pr = load(*comm, *part, path, LoadOptions{false, 0, true});
    ASSERT_FALSE(pr.ok());
    EXPECT_EQ(pr.error().code, Code::kCorrupt);
    auto problems = verify(path);
    ASSERT_TRUE(problems.ok());
    ASSERT_EQ(problems->size(), 1u);
    EXPECT_EQ((*problems)[0].file, f.name);
    EXPECT_EQ((*problems)[0].key, victim->key);
    flip_byte(path + "/" + f.name, at);  // repair for the next file
    EXPECT_TRUE(verify(path)->empty());
  }
}

TEST_F(CheckpointTest, TruncatedDataFileIsCorrupt) {
  DictPtr sd = Dict::make();
  sd->set("t", Value(at::randn({1000})));
  const std::string path = tmp.sub("trunc");
  ASSERT_TRUE(save(*comm, *sd, path).ok());
  const Manifest m = MUST(read_manifest(path));
  std::filesystem::resize_file(path + "/" + m.files[0].name, m.files[0].size - 10);
  DictPtr dst = blank_like(*sd);
  auto r = load(*comm, *dst, path);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, Code::kCorrupt);
  EXPECT_THAT(r.error().message, HasSubstr("the manifest records"));
  EXPECT_THAT(r.error().message, HasSubstr(m.files[0].name));
}

TEST_F(CheckpointTest, NoCheckpointIsNotFound) {
  DictPtr dst = Dict::make();
  auto r = load(*comm, *dst, tmp.sub("nothing"));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, Code::kNotFound);
}

TEST_F(CheckpointTest, FullDiskFailsCleanlyAndKeepsThePreviousCheckpoint) {
  DictPtr small = Dict::make();
  small->set("x", Value(at::full({16}, 7.0)));
  const std::string path = tmp.sub("full");
  ASSERT_TRUE(save(*comm, *small, path).ok());
  DictPtr big = Dict::make();
  big->set("x", Value(at::randn({4 << 20})));  // 16 MiB
  std::signal(SIGXFSZ, SIG_IGN);
  rlimit old{};
  getrlimit(RLIMIT_FSIZE, &old);
  rlimit lim = old;
  lim.rlim_cur = 1 << 20;
  ASSERT_EQ(setrlimit(RLIMIT_FSIZE, &lim), 0);
  SaveOptions so;
  so.overwrite = true;
  auto r = save(*comm, *big, path, so);
  setrlimit(RLIMIT_FSIZE, &old);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, Code::kNoSpace);
  EXPECT_THAT(r.error().message, HasSubstr(".safetensors"));
  auto back = load_full(path);
  ASSERT_TRUE(back.ok()) << back.error().message;
  EXPECT_TRUE(tensor_bitwise_equal((*back)->find("x")->if_tensor()->tensor, at::full({16}, 7.0)));
  size_t data_files = 0;
  for (const auto& e : std::filesystem::directory_iterator(path)) {
    if (e.path().extension() == ".safetensors") ++data_files;
  }
  EXPECT_EQ(data_files, 1u) << "the failed save's partial file is removed";
}

TEST_F(CheckpointTest, TensorInsideATupleIsUnsupported) {
  DictPtr sd = Dict::make();
  ListPtr tup = List::make(true);
  tup->push_back(Value(at::zeros({2})));
  sd->set("pair", Value(tup));
  auto r = save(*comm, *sd, tmp.sub("tup"));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, Code::kUnsupported);
  EXPECT_THAT(r.error().message, HasSubstr("'pair'"));
}

}  // namespace
}  // namespace dsd::checkpoint
