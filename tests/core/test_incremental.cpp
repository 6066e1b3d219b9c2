// Incremental checkpoints (SaveOptions::base, core/checkpoint/base_checkpoint.h): unchanged
// chunks referenced in the base, never written again, confirmed by a byte compare; loading,
// verify and materialize follow references; a missing or damaged base is an error naming the
// file; the manager's reference-counted retention (retention.h) never deletes a file a kept
// checkpoint references; a replaced (overwritten) base keeps the files its siblings reference.
#include <ATen/ops/arange.h>
#include <ATen/ops/full.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <set>

#include "ckpt_test_util.h"
#include "core/checkpoint/async_save.h"
#include "core/checkpoint/load.h"
#include "core/checkpoint/manager.h"
#include "core/checkpoint/materialize.h"
#include "core/checkpoint/retention.h"
#include "core/checkpoint/save.h"
#include "core/checkpoint/save_planner.h"
#include "core/checkpoint/verify.h"

namespace dsd::checkpoint {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;
using dsd::testing::TempDir;

// A LoRA-like state: a frozen base ("frozen.*", 9 x 256 KiB) and a small trained adapter and
// its moment, both of which depend on `step`.
DictPtr lora_state(int step) {
  DictPtr sd = Dict::make();
  DictPtr frozen = Dict::make();
  for (int i = 0; i < 9; ++i) {
    frozen->set("w" + std::to_string(i), Value(at::arange(64 * 1024, at::kFloat).add_(i)));
  }
  sd->set("frozen", Value(frozen));
  sd->set("adapter", Value(at::full({16, 64}, static_cast<double>(step))));
  sd->set("exp_avg", Value(at::full({16, 64}, 0.5 * step)));
  sd->set("step", Value(int64_t{step}));
  return sd;
}

uint64_t own_data_bytes(const std::string& dir) {
  uint64_t n = 0;
  for (const auto& e : fs::directory_iterator(dir)) {
    if (is_data_file_name(e.path().filename().string())) n += e.file_size();
  }
  return n;
}

uint64_t tree_bytes(const std::string& dir) {
  uint64_t n = 0;
  for (const auto& e : fs::recursive_directory_iterator(dir)) {
    if (e.is_regular_file()) n += e.file_size();
  }
  return n;
}

class IncrementalTest : public ::testing::Test {
 protected:
  SaveOptions with_base(const std::string& base) {
    SaveOptions o;
    o.base = tmp.sub(base);
    return o;
  }
  void expect_holds(const std::string& name, const Dict& want) {
    auto got = load_full(tmp.sub(name));
    ASSERT_TRUE(got.ok()) << name << ": " << got.error().message;
    std::string why;
    EXPECT_TRUE(deep_equal(want, **got, &why)) << name << ": " << why;
  }
  void flip_byte_of_chunk(const std::string& name, const std::string& key) {
    auto m = read_manifest(tmp.sub(name));
    ASSERT_TRUE(m.ok());
    const ChunkRecord& c = m->find(key)->chunks.at(0);
    std::fstream f(data_file_path(tmp.sub(name), *m->file(c.file)), std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(static_cast<std::streamoff>(c.begin + 100));
    char b = 0;
    f.read(&b, 1);
    f.seekp(static_cast<std::streamoff>(c.begin + 100));
    b ^= 0x10;
    f.write(&b, 1);
  }

  std::shared_ptr<Communicator> comm = make_local_communicator();
  TempDir tmp;
};

TEST_F(IncrementalTest, UnchangedChunksAreReferencedNotWritten) {
  DictPtr s1 = lora_state(1);
  auto full = save(*comm, *s1, tmp.sub("step_1"));
  ASSERT_TRUE(full.ok()) << full.error().message;
  DictPtr s2 = lora_state(2);
  auto inc = save(*comm, *s2, tmp.sub("step_2"), with_base("step_1"));
  ASSERT_TRUE(inc.ok()) << inc.error().message;
  // Only the adapter and its moment (2 x 4 KiB) and a header are written.
  EXPECT_EQ(inc->bytes_referenced, 9u * 64 * 1024 * 4);
  EXPECT_LT(inc->bytes_written, full->bytes_written / 20);
  EXPECT_LT(own_data_bytes(tmp.sub("step_2")), own_data_bytes(tmp.sub("step_1")) / 20);
  auto m = read_manifest(tmp.sub("step_2"));
  ASSERT_TRUE(m.ok()) << m.error().message;
  EXPECT_TRUE(m->has_references());
  const FileRecord* f = m->file(m->find("frozen.w3")->chunks[0].file);
  ASSERT_NE(f, nullptr);
  EXPECT_EQ(f->checkpoint, "step_1");
  EXPECT_FALSE(m->file(m->find("adapter")->chunks[0].file)->referenced());
  expect_holds("step_2", *s2);
  expect_holds("step_1", *s1);
  auto problems = verify(tmp.sub("step_2"));
  ASSERT_TRUE(problems.ok()) << problems.error().message;
  EXPECT_TRUE(problems->empty());
}

TEST_F(IncrementalTest, ReferencesPointAtTheOwnerNeverThroughAChain) {
  ASSERT_TRUE(save(*comm, *lora_state(1), tmp.sub("step_1")).ok());
  ASSERT_TRUE(save(*comm, *lora_state(2), tmp.sub("step_2"), with_base("step_1")).ok());
  DictPtr s3 = lora_state(3);
  auto inc = save(*comm, *s3, tmp.sub("step_3"), with_base("step_2"));
  ASSERT_TRUE(inc.ok()) << inc.error().message;
  EXPECT_EQ(inc->bytes_referenced, 9u * 64 * 1024 * 4);
  auto m = read_manifest(tmp.sub("step_3"));
  ASSERT_TRUE(m.ok());
  std::set<std::string> owners;
  for (const FileRecord& f : m->files) {
    if (f.referenced()) owners.insert(f.checkpoint);
  }
  EXPECT_EQ(owners, std::set<std::string>{"step_1"});
  // step_2 is not needed by step_3.
  fs::remove_all(tmp.sub("step_2"));
  expect_holds("step_3", *s3);
}

TEST_F(IncrementalTest, ABaseFileDamagedSinceItsSaveIsWrittenAgainNotReferenced) {
  ASSERT_TRUE(save(*comm, *lora_state(1), tmp.sub("step_1")).ok());
  flip_byte_of_chunk("step_1", "frozen.w4");
  DictPtr s2 = lora_state(2);
  auto inc = save(*comm, *s2, tmp.sub("step_2"), with_base("step_1"));
  ASSERT_TRUE(inc.ok()) << inc.error().message;
  // The byte compare found w4 different from the state dict: written afresh.
  EXPECT_EQ(inc->bytes_referenced, 8u * 64 * 1024 * 4);
  auto m = read_manifest(tmp.sub("step_2"));
  ASSERT_TRUE(m.ok());
  EXPECT_FALSE(m->file(m->find("frozen.w4")->chunks[0].file)->referenced());
  expect_holds("step_2", *s2);
}

TEST_F(IncrementalTest, AFlippedByteInAReferencedBaseFileIsDetectedWhenLoadingTheNewCheckpoint) {
  ASSERT_TRUE(save(*comm, *lora_state(1), tmp.sub("step_1")).ok());
  ASSERT_TRUE(save(*comm, *lora_state(2), tmp.sub("step_2"), with_base("step_1")).ok());
  flip_byte_of_chunk("step_1", "frozen.w2");
  auto got = load_full(tmp.sub("step_2"));
  ASSERT_FALSE(got.ok());
  EXPECT_EQ(got.error().code, Code::kCorrupt);
  EXPECT_THAT(got.error().message, HasSubstr("frozen.w2"));
  auto problems = verify(tmp.sub("step_2"));
  ASSERT_TRUE(problems.ok()) << problems.error().message;
  ASSERT_EQ(problems->size(), 1u);
  EXPECT_THAT(problems->front().message, HasSubstr("frozen.w2"));
}

TEST_F(IncrementalTest, AMissingBaseIsAnErrorNamingTheFileNeverWrongData) {
  ASSERT_TRUE(save(*comm, *lora_state(1), tmp.sub("step_1")).ok());
  ASSERT_TRUE(save(*comm, *lora_state(2), tmp.sub("step_2"), with_base("step_1")).ok());
  auto m = read_manifest(tmp.sub("step_1"));
  ASSERT_TRUE(m.ok());
  const std::string victim = m->file(m->find("frozen.w0")->chunks[0].file)->name;
  fs::rename(tmp.sub("step_1") + "/" + victim, tmp.sub("moved.safetensors"));
  auto got = load_full(tmp.sub("step_2"));
  ASSERT_FALSE(got.ok());
  EXPECT_EQ(got.error().code, Code::kNotFound);
  EXPECT_THAT(got.error().message, HasSubstr(victim));
  EXPECT_THAT(got.error().message, HasSubstr("step_1"));
  fs::remove_all(tmp.sub("step_1"));
  got = load_full(tmp.sub("step_2"));
  ASSERT_FALSE(got.ok());
  EXPECT_EQ(got.error().code, Code::kNotFound);
  EXPECT_THAT(got.error().message, HasSubstr("moved or deleted"));
}

TEST_F(IncrementalTest, BadBasesAreRefused) {
  ASSERT_TRUE(save(*comm, *lora_state(1), tmp.sub("step_1")).ok());
  // Not a sibling.
  fs::create_directories(tmp.sub("deeper"));
  auto r = save(*comm, *lora_state(2), tmp.sub("deeper/step_2"), with_base("step_1"));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, Code::kInvalidArgument);
  EXPECT_THAT(r.error().message, HasSubstr("sibling"));
  // Itself.
  SaveOptions self = with_base("step_1");
  self.overwrite = true;
  r = save(*comm, *lora_state(2), tmp.sub("step_1"), self);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, Code::kInvalidArgument);
  expect_holds("step_1", *lora_state(1));
  // Nothing there.
  r = save(*comm, *lora_state(2), tmp.sub("step_2"), with_base("nothing"));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, Code::kNotFound);
  // The DCP format, and incremental without a base.
  SaveOptions dcp = with_base("step_1");
  dcp.format = Format::kDcp;
  r = save(*comm, *lora_state(2), tmp.sub("step_3"), dcp);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, Code::kInvalidArgument);
  SaveOptions lone;
  lone.incremental = true;
  r = save(*comm, *lora_state(2), tmp.sub("step_4"), lone);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, Code::kInvalidArgument);
}

TEST_F(IncrementalTest, AHostileManifestCannotReferenceOutsideItsParent) {
  ASSERT_TRUE(save(*comm, *lora_state(1), tmp.sub("step_1")).ok());
  ASSERT_TRUE(save(*comm, *lora_state(2), tmp.sub("step_2"), with_base("step_1")).ok());
  const std::string path = tmp.sub("step_2") + "/" + std::string(kManifestName);
  std::ifstream in(path);
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  in.close();
  for (const char* evil : {"../step_1", "/etc", ".."}) {
    std::string t = text;
    const std::string from = "\"checkpoint\": \"step_1\"";
    for (size_t p = t.find(from); p != std::string::npos; p = t.find(from, p + 1)) {
      t.replace(p, from.size(), std::string("\"checkpoint\": \"") + evil + "\"");
    }
    auto m = parse_manifest(t);
    ASSERT_FALSE(m.ok()) << evil;
    EXPECT_EQ(m.error().code, Code::kCorrupt);
    EXPECT_THAT(m.error().message, HasSubstr("sibling"));
  }
  // A version 1 manifest may not name another checkpoint at all.
  std::string v1 = text;
  v1.replace(v1.find("\"format_version\": 2"), 19, "\"format_version\": 1");
  EXPECT_FALSE(parse_manifest(v1).ok());
}

TEST_F(IncrementalTest, MaterializeInPlaceMakesItStandAlone) {
  ASSERT_TRUE(save(*comm, *lora_state(1), tmp.sub("step_1")).ok());
  DictPtr s2 = lora_state(2);
  ASSERT_TRUE(save(*comm, *s2, tmp.sub("step_2"), with_base("step_1")).ok());
  ASSERT_TRUE(save(*comm, *lora_state(3), tmp.sub("copy_src"), with_base("step_1")).ok());
  auto info = materialize(tmp.sub("step_2"), tmp.sub("step_2"));
  ASSERT_TRUE(info.ok()) << info.error().message;
  EXPECT_GE(info->files_copied, 1);
  auto other = materialize(tmp.sub("copy_src"), tmp.sub("elsewhere"));
  ASSERT_TRUE(other.ok()) << other.error().message;
  fs::remove_all(tmp.sub("step_1"));
  auto m = read_manifest(tmp.sub("step_2"));
  ASSERT_TRUE(m.ok());
  EXPECT_FALSE(m->has_references());
  expect_holds("step_2", *s2);
  expect_holds("elsewhere", *lora_state(3));
  auto problems = verify(tmp.sub("step_2"));
  ASSERT_TRUE(problems.ok() && problems->empty());
}

TEST_F(IncrementalTest, OverwritingABaseKeepsTheFilesItsSiblingsReference) {
  ASSERT_TRUE(save(*comm, *lora_state(1), tmp.sub("step_1")).ok());
  DictPtr s2 = lora_state(2);
  ASSERT_TRUE(save(*comm, *s2, tmp.sub("step_2"), with_base("step_1")).ok());
  SaveOptions over;
  over.overwrite = true;
  DictPtr other = lora_state(7);
  Dict* frozen = other->find("frozen")->if_dict();
  for (int i = 0; i < 9; ++i) frozen->set("w" + std::to_string(i), Value(at::full({3}, 1.0)));
  ASSERT_TRUE(save(*comm, *other, tmp.sub("step_1"), over).ok());
  expect_holds("step_1", *other);
  expect_holds("step_2", *s2);
}

TEST_F(IncrementalTest, ManagerRetentionNeverDeletesAReferencedFile) {
  CheckpointManager mgr(tmp.path(), 2);
  SaveOptions inc;
  inc.incremental = true;
  for (int step = 1; step <= 5; ++step) {
    auto r = mgr.save(*comm, *lora_state(step), step, inc);
    ASSERT_TRUE(r.ok()) << step << ": " << r.error().message;
    if (step > 1) EXPECT_EQ(r->bytes_referenced, 9u * 64 * 1024 * 4) << step;
  }
  auto steps = mgr.complete_steps();
  ASSERT_TRUE(steps.ok());
  EXPECT_EQ(*steps, (std::vector<int64_t>{4, 5}));
  expect_holds("step_4", *lora_state(4));
  expect_holds("step_5", *lora_state(5));
  // step_1 owns the frozen bytes both kept steps reference: retired, its frozen file kept;
  // steps 2 and 3 own nothing a kept step references: gone.
  EXPECT_TRUE(is_retired(tmp.sub("step_1")));
  EXPECT_FALSE(fs::exists(tmp.sub("step_2")));
  EXPECT_FALSE(fs::exists(tmp.sub("step_3")));
  const uint64_t full = own_data_bytes(tmp.sub("step_1"));
  EXPECT_LT(tree_bytes(tmp.path()), full * 13 / 10);
  // Once the kept steps are materialized, nothing references step_1.
  ASSERT_TRUE(materialize(tmp.sub("step_4"), tmp.sub("step_4")).ok());
  ASSERT_TRUE(materialize(tmp.sub("step_5"), tmp.sub("step_5")).ok());
  auto gc = collect_garbage(tmp.path());
  ASSERT_TRUE(gc.ok()) << gc.error().message;
  EXPECT_EQ(gc->retired_removed, 1);
  EXPECT_FALSE(fs::exists(tmp.sub("step_1")));
  expect_holds("step_5", *lora_state(5));
}

TEST_F(IncrementalTest, AsyncManagerSavesTakeThePreviousCommittedStepAsBase) {
  CheckpointManager mgr(tmp.path(), 0);
  AsyncCheckpointer saver(comm);
  SaveOptions inc;
  inc.incremental = true;
  for (int step = 1; step <= 3; ++step) {
    auto f = mgr.save_async(saver, *lora_state(step), step, inc);
    ASSERT_TRUE(f.ok()) << f.error().message;
  }
  auto f = mgr.save_async(saver, *lora_state(4), 4, inc);
  ASSERT_TRUE(f.ok());
  ASSERT_TRUE((*f)->wait().ok());
  for (int step = 2; step <= 4; ++step) {
    auto m = read_manifest(tmp.sub("step_" + std::to_string(step)));
    ASSERT_TRUE(m.ok());
    EXPECT_TRUE(m->has_references()) << step;
    expect_holds("step_" + std::to_string(step), *lora_state(step));
  }
}

TEST_F(IncrementalTest, GcCountsEveryLiveManifestBeforeRemovingAnything) {
  ASSERT_TRUE(save(*comm, *lora_state(1), tmp.sub("a")).ok());
  ASSERT_TRUE(save(*comm, *lora_state(2), tmp.sub("b"), with_base("a")).ok());
  ASSERT_TRUE(retire(tmp.sub("a")).ok());
  // An unreadable live manifest might reference anything: nothing is removed.
  fs::create_directories(tmp.sub("c"));
  std::ofstream(tmp.sub("c") + "/" + std::string(kManifestName)) << "{\"checkpoint\": oops";
  auto gc = collect_garbage(tmp.path());
  ASSERT_FALSE(gc.ok());
  EXPECT_TRUE(fs::exists(tmp.sub("a")));
  fs::remove_all(tmp.sub("c"));
  gc = collect_garbage(tmp.path());
  ASSERT_TRUE(gc.ok()) << gc.error().message;
  EXPECT_EQ(gc->retired_removed, 0);
  EXPECT_EQ(gc->files_removed, 0);  // a's one data file holds the frozen bytes b references
  ASSERT_EQ(gc->retired_kept.size(), 1u);
  expect_holds("b", *lora_state(2));
  auto a = load_full(tmp.sub("a"));
  EXPECT_FALSE(a.ok());  // retired: not a checkpoint any more
}

}  // namespace
}  // namespace dsd::checkpoint
