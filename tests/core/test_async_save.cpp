// Async save: future states, buffer reuse, aliasing of tied weights, errors through the
// future; and the checkpoint manager (retention, latest, resume past incomplete steps).
#include <ATen/ops/full.h>
#include <ATen/ops/randn.h>
#include <ATen/ops/zeros.h>
#include <fmt/format.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include "ckpt_test_util.h"
#include "core/checkpoint/async_save.h"
#include "core/checkpoint/io.h"
#include "core/checkpoint/load.h"
#include "core/checkpoint/manager.h"

namespace dsd::checkpoint {
namespace {

using ::testing::HasSubstr;
using dsd::testing::TempDir;

TEST(AsyncSave, SavesWhatWasStagedEvenIfTheTensorChangesAfterwards) {
  TempDir tmp;
  AsyncCheckpointer saver(make_local_communicator());
  at::Tensor w = at::full({256, 256}, 1.0);
  DictPtr sd = Dict::make();
  sd->set("w", Value(w));
  sd->set("step", Value(5));
  auto fut = saver.save_async(*sd, tmp.sub("a"));
  ASSERT_TRUE(fut.ok()) << fut.error().message;
  EXPECT_TRUE((*fut)->is_staged());
  w.fill_(2.0);  // the trainer goes on
  ASSERT_TRUE((*fut)->wait().ok());
  EXPECT_TRUE((*fut)->is_done());
  EXPECT_EQ((*fut)->save_id().size(), 16u);
  auto back = load_full(tmp.sub("a"));
  ASSERT_TRUE(back.ok()) << back.error().message;
  EXPECT_TRUE(tensor_bitwise_equal((*back)->find("w")->if_tensor()->tensor, at::full({256, 256}, 1.0)));
  EXPECT_EQ(*(*back)->find("step")->if_int(), 5);
}

TEST(AsyncSave, SecondSaveOfTheSameStructureAllocatesNothing) {
  TempDir tmp;
  AsyncCheckpointer saver(make_local_communicator());
  at::Tensor shared = at::randn({64, 8});
  DictPtr sd = Dict::make();
  sd->set("emb", Value(shared));
  sd->set("head", Value(shared));           // tied weight: same storage
  sd->set("view", Value(shared.narrow(0, 10, 5)));  // a view with an offset
  sd->set("other", Value(at::randn({100})));
  auto f1 = saver.save_async(*sd, tmp.sub("1"));
  ASSERT_TRUE(f1.ok());
  ASSERT_TRUE((*f1)->wait().ok());
  const uint64_t allocs = saver.staging_allocations();
  EXPECT_EQ(allocs, 2u) << "one buffer per storage: tied weights and views staged once";
  EXPECT_EQ(saver.staged_bytes(), (64 * 8 + 100) * 4u);
  shared.fill_(3.0);
  auto f2 = saver.save_async(*sd, tmp.sub("2"));
  ASSERT_TRUE(f2.ok());
  ASSERT_TRUE((*f2)->wait().ok());
  EXPECT_EQ(saver.staging_allocations(), allocs);
  auto back = load_full(tmp.sub("2"));
  ASSERT_TRUE(back.ok());
  EXPECT_TRUE(tensor_bitwise_equal((*back)->find("view")->if_tensor()->tensor, at::full({5, 8}, 3.0)));
  // A new structure gets new buffers.
  sd->set("extra", Value(at::zeros({3})));
  ASSERT_TRUE((*saver.save_async(*sd, tmp.sub("3")))->wait().ok());
  EXPECT_GT(saver.staging_allocations(), allocs);
}

TEST(AsyncSave, ErrorsComeThroughTheFuture) {
  TempDir tmp;
  AsyncCheckpointer saver(make_local_communicator());
  DictPtr sd = Dict::make();
  sd->set("w", Value(at::zeros({4})));
  ASSERT_TRUE((*saver.save_async(*sd, tmp.sub("x")))->wait().ok());
  auto f = saver.save_async(*sd, tmp.sub("x"));  // already there, no overwrite
  ASSERT_TRUE(f.ok());
  Status s = (*f)->wait();
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.error().code, Code::kExists);
  EXPECT_TRUE((*f)->is_done());
}

TEST(AsyncSave, WaitTimesOut) {
  SaveFuture f;
  f.set_staged();
  Status s = f.wait(std::chrono::milliseconds(1));
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.error().code, Code::kTimeout);
  f.set_done(SaveInfo{"0123456789abcdef", 0, 0});
  EXPECT_TRUE(f.wait(std::chrono::milliseconds(0)).ok());
}

TEST(Manager, KeepsTheLastNAndMovesLatest) {
  TempDir tmp;
  auto comm = make_local_communicator();
  CheckpointManager mgr(tmp.sub("run"), 2);
  DictPtr sd = Dict::make();
  for (int64_t step : {10, 20, 30}) {
    sd->set("step", Value(step));
    ASSERT_TRUE(mgr.save(*comm, *sd, step).ok());
    auto latest = read_file(tmp.sub("run/latest"), 100);
    ASSERT_TRUE(latest.ok());
    EXPECT_EQ(*latest, fmt::format("step_{}\n", step));
  }
  EXPECT_EQ(*mgr.complete_steps(), (std::vector<int64_t>{20, 30}));
  EXPECT_FALSE(std::filesystem::exists(mgr.step_path(10)));
}

TEST(Manager, ResumesFromTheNewestCompleteCheckpoint) {
  TempDir tmp;
  auto comm = make_local_communicator();
  CheckpointManager mgr(tmp.sub("run"), 0);
  DictPtr sd = Dict::make();
  sd->set("w", Value(at::full({3}, 1.0)));
  ASSERT_TRUE(mgr.save(*comm, *sd, 1).ok());
  // A crashed save of step 2: a directory with a data file but no manifest.
  std::filesystem::create_directories(mgr.step_path(2));
  std::ofstream(mgr.step_path(2) + "/0123456789abcdef-00000-000.safetensors") << "junk";
  DictPtr dst = Dict::make();
  dst->set("w", Value(at::zeros({3})));
  auto step = mgr.load_latest(*comm, *dst);
  ASSERT_TRUE(step.ok()) << step.error().message;
  ASSERT_TRUE(step->has_value());
  EXPECT_EQ(**step, 1);
  EXPECT_TRUE(tensor_bitwise_equal(dst->find("w")->if_tensor()->tensor, at::full({3}, 1.0)));
  CheckpointManager empty(tmp.sub("none"), 0);
  auto nothing = empty.load_latest(*comm, *dst);
  ASSERT_TRUE(nothing.ok());
  EXPECT_FALSE(nothing->has_value());
}

TEST(Manager, AsyncSaveMovesLatestAfterCommit) {
  TempDir tmp;
  auto comm = make_local_communicator();
  CheckpointManager mgr(tmp.sub("run"), 1);
  AsyncCheckpointer saver(comm);
  DictPtr sd = Dict::make();
  sd->set("w", Value(at::full({3}, 4.0)));
  for (int64_t step : {1, 2}) {
    auto f = mgr.save_async(saver, *sd, step);
    ASSERT_TRUE(f.ok());
    ASSERT_TRUE((*f)->wait().ok());
  }
  EXPECT_EQ(*read_file(tmp.sub("run/latest"), 100), "step_2\n");
  EXPECT_EQ(*mgr.complete_steps(), std::vector<int64_t>{2});
}

TEST(Manager, StepDirectoryNames) {
  EXPECT_EQ(parse_step_dir("step_12"), 12);
  EXPECT_EQ(parse_step_dir("step_0"), 0);
  EXPECT_FALSE(parse_step_dir("step_"));
  EXPECT_FALSE(parse_step_dir("step_01"));
  EXPECT_FALSE(parse_step_dir("step_1x"));
  EXPECT_FALSE(parse_step_dir("latest"));
}

}  // namespace
}  // namespace dsd::checkpoint
