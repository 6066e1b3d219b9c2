// Capped async staging (SaveOptions::max_staging_bytes): a state larger than the budget is
// staged in waves, the host buffers never hold more than the budget, save_async returns only
// once every tensor was copied, and a failure in a wave fails the future without a hang.
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <fmt/format.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <sys/resource.h>

#include <atomic>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <future>
#include <thread>

#include "ckpt_test_util.h"
#include "core/base/make_error.h"
#include "core/checkpoint/async_save.h"
#include "core/checkpoint/load.h"
#include "core/checkpoint/manager.h"

namespace dsd::checkpoint {
namespace {

using ::testing::HasSubstr;
using dsd::testing::TempDir;

constexpr uint64_t kMiB = 1u << 20;

// `n` float tensors of `mib` MiB each, tensor i filled with i + 1 + `shift` (then a ramp, so
// every byte of every tensor is checked).
DictPtr state_of(int n, int64_t mib, double shift = 0) {
  DictPtr sd = Dict::make();
  const int64_t numel = mib * static_cast<int64_t>(kMiB) / 4;
  for (int i = 0; i < n; ++i) {
    at::Tensor t = at::arange(numel, at::kFloat).remainder_(1000).add_(1000.0 * (i + 1) + shift);
    sd->set(fmt::format("layer{}.w", i), Value(t));
  }
  sd->set("step", Value(int64_t{7}));
  return sd;
}

void expect_saved(const std::string& path, const Dict& expected) {
  auto back = load_full(path);
  ASSERT_TRUE(back.ok()) << back.error().message;
  for (const auto& e : expected) {
    const Value* v = (*back)->find(e.key);
    ASSERT_NE(v, nullptr) << e.key;
    if (const TensorValue* tv = e.value.if_tensor()) {
      ASSERT_NE(v->if_tensor(), nullptr) << e.key;
      EXPECT_TRUE(tensor_bitwise_equal(v->if_tensor()->tensor, tv->tensor)) << e.key;
    }
  }
}

// Aborts a test that hangs (a deadlock between the caller and the writers) with a message,
// instead of waiting for the harness's timeout.
class Watchdog {
 public:
  explicit Watchdog(int seconds) : t_([this, seconds] {
    std::unique_lock<std::mutex> lock(mu_);
    if (!cv_.wait_for(lock, std::chrono::seconds(seconds), [&] { return done_; })) {
      std::fprintf(stderr, "watchdog: the test hung for %d s (deadlock?)\n", seconds);
      std::abort();
    }
  }) {}
  ~Watchdog() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      done_ = true;
    }
    cv_.notify_all();
    t_.join();
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  bool done_ = false;
  std::thread t_;
};

TEST(AsyncStaging, CappedSaveHoldsAtMostTheBudgetAndSavesBitwise) {
  Watchdog dog(120);
  TempDir tmp;
  AsyncCheckpointer saver(make_local_communicator());
  DictPtr sd = state_of(48, 4);  // 192 MiB
  SaveOptions opt;
  opt.max_staging_bytes = 16 * kMiB;
  opt.thread_count = 2;
  opt.sync_files = false;
  auto f = saver.save_async(*sd, tmp.sub("capped"), opt);
  ASSERT_TRUE(f.ok()) << f.error().message;
  EXPECT_TRUE((*f)->is_staged());
  Status st = (*f)->wait();
  ASSERT_TRUE(st.ok()) << st.error().message;
  EXPECT_LE(saver.peak_staged_bytes(), 16 * kMiB);
  EXPECT_GE(saver.peak_staged_bytes(), 4 * kMiB);
  EXPECT_LE(saver.staged_bytes(), 16 * kMiB) << "the buffers kept for the next capped save";
  expect_saved(tmp.sub("capped"), *sd);

  // The same save again reuses the kept buffers.
  const uint64_t allocs = saver.staging_allocations();
  auto f2 = saver.save_async(*sd, tmp.sub("again"), opt);
  ASSERT_TRUE(f2.ok());
  ASSERT_TRUE((*f2)->wait().ok());
  EXPECT_EQ(saver.staging_allocations(), allocs);
  EXPECT_LE(saver.peak_staged_bytes(), 16 * kMiB);

  // The cap is what bounds it: uncapped, the same state is staged whole.
  opt.max_staging_bytes = 0;
  auto f3 = saver.save_async(*sd, tmp.sub("uncapped"), opt);
  ASSERT_TRUE(f3.ok());
  ASSERT_TRUE((*f3)->wait().ok());
  EXPECT_GE(saver.peak_staged_bytes(), 192 * kMiB);
  // And a capped save after it frees the whole-state buffers first.
  opt.max_staging_bytes = 16 * kMiB;
  auto f4 = saver.save_async(*sd, tmp.sub("capped_again"), opt);
  ASSERT_TRUE(f4.ok());
  ASSERT_TRUE((*f4)->wait().ok());
  EXPECT_LE(saver.peak_staged_bytes(), 16 * kMiB);
  expect_saved(tmp.sub("capped_again"), *sd);
}

TEST(AsyncStaging, EveryTensorIsCopiedBeforeSaveAsyncReturns) {
  Watchdog dog(120);
  TempDir tmp;
  AsyncCheckpointer saver(make_local_communicator());
  DictPtr sd = state_of(32, 2);  // 64 MiB through an 8 MiB budget, one writer
  DictPtr expected = state_of(32, 2);
  SaveOptions opt;
  opt.max_staging_bytes = 8 * kMiB;
  opt.thread_count = 1;
  auto f = saver.save_async(*sd, tmp.sub("a"), opt);
  ASSERT_TRUE(f.ok()) << f.error().message;
  EXPECT_TRUE((*f)->is_staged());
  // The trainer goes on at once: every tensor changes, the later waves included.
  for (const auto& e : *sd) {
    if (const TensorValue* tv = e.value.if_tensor()) tv->tensor.fill_(-1.0);
  }
  Status st = (*f)->wait();
  ASSERT_TRUE(st.ok()) << st.error().message;
  expect_saved(tmp.sub("a"), *expected);
}

TEST(AsyncStaging, TiedWeightsViewsAndATensorLargerThanTheBudget) {
  Watchdog dog(120);
  TempDir tmp;
  AsyncCheckpointer saver(make_local_communicator());
  DictPtr sd = state_of(6, 1);
  at::Tensor shared = at::arange(int64_t{1} << 20, at::kFloat);  // 4 MiB
  sd->set("emb", Value(shared));
  sd->set("head", Value(shared));                                  // tied: same storage
  sd->set("slice", Value(shared.narrow(0, 1000, 50)));             // a view with an offset
  sd->set("big", Value(at::full({3 << 20}, 2.5, at::kFloat)));      // 12 MiB, over the budget
  sd->set("empty", Value(at::empty({0, 3})));
  SaveOptions opt;
  opt.max_staging_bytes = 3 * kMiB;
  opt.thread_count = 2;
  opt.sync_files = false;
  auto f = saver.save_async(*sd, tmp.sub("t"), opt);
  ASSERT_TRUE(f.ok()) << f.error().message;
  Status st = (*f)->wait();
  ASSERT_TRUE(st.ok()) << st.error().message;
  // A storage larger than the budget is staged alone: the mark is the largest storage.
  EXPECT_LE(saver.peak_staged_bytes(), 12 * kMiB);
  expect_saved(tmp.sub("t"), *sd);
}

TEST(AsyncStaging, AFailureInAWaveFailsTheFutureWithoutAHang) {
  Watchdog dog(120);
  TempDir tmp;
  AsyncCheckpointer saver(make_local_communicator());
  // A placeholder of the caller's own, first, whose provider fails when its writer reaches
  // it: that writer stops, and the tensors after it in its file are never asked for.
  DictPtr sd = Dict::make();
  sd->set("layer5.zbroken", Value(at::empty({16}, at::TensorOptions().device(at::kMeta))));
  DictPtr layers = state_of(24, 1);
  for (const auto& e : *layers) sd->set(e.key, e.value);
  std::atomic<int> asked{0};
  SaveOptions opt;
  opt.max_staging_bytes = 4 * kMiB;
  opt.thread_count = 2;
  opt.tensor_provider = [&](const std::string& key, const at::Tensor&) -> Result<at::Tensor> {
    ++asked;
    return make_error_at(Code::kIo, key, "the source of '{}' is gone", key);
  };
  auto f = saver.save_async(*sd, tmp.sub("e"), opt);
  ASSERT_TRUE(f.ok()) << f.error().message;
  EXPECT_TRUE((*f)->is_staged());
  Status st = (*f)->wait();
  ASSERT_FALSE(st.ok());
  EXPECT_EQ(st.error().code, Code::kIo);
  EXPECT_THAT(st.error().message, HasSubstr("layer5.zbroken"));
  EXPECT_EQ(asked.load(), 1);
  EXPECT_FALSE(std::filesystem::exists(tmp.sub("e/checkpoint.json")));
  // The checkpointer is still usable.
  opt.tensor_provider = {};
  sd->erase("layer5.zbroken");
  auto f2 = saver.save_async(*sd, tmp.sub("e"), opt);
  ASSERT_TRUE(f2.ok());
  ASSERT_TRUE((*f2)->wait().ok());
  expect_saved(tmp.sub("e"), *sd);
}

TEST(AsyncStaging, ADiskErrorDuringTheWavesFailsTheFuture) {
  Watchdog dog(120);
  TempDir tmp;
  AsyncCheckpointer saver(make_local_communicator());
  DictPtr sd = state_of(16, 2);  // 32 MiB, 16 MiB per data file
  SaveOptions opt;
  opt.max_staging_bytes = 4 * kMiB;
  opt.thread_count = 2;
  std::signal(SIGXFSZ, SIG_IGN);  // EFBIG instead of a signal
  rlimit old{};
  getrlimit(RLIMIT_FSIZE, &old);
  rlimit lim = old;
  lim.rlim_cur = 6 * kMiB;  // each file fails in its third tensor
  ASSERT_EQ(setrlimit(RLIMIT_FSIZE, &lim), 0);
  auto f = saver.save_async(*sd, tmp.sub("d"), opt);
  Status st = f.ok() ? (*f)->wait() : Status(f.error());
  setrlimit(RLIMIT_FSIZE, &old);
  ASSERT_FALSE(st.ok());
  EXPECT_EQ(st.error().code, Code::kNoSpace) << st.error().message;
  EXPECT_FALSE(std::filesystem::exists(tmp.sub("d/checkpoint.json")));
  EXPECT_LE(saver.peak_staged_bytes(), 4 * kMiB);
}

TEST(AsyncStaging, ASyncSaveIgnoresTheCap) {
  TempDir tmp;
  auto comm = make_local_communicator();
  DictPtr sd = state_of(4, 1);
  SaveOptions opt;
  opt.max_staging_bytes = 1;  // a sync save stages nothing: the cap does not apply
  auto r = save(*comm, *sd, tmp.sub("s"), opt);
  ASSERT_TRUE(r.ok()) << r.error().message;
  expect_saved(tmp.sub("s"), *sd);
}

TEST(AsyncStaging, ManagerAsyncSavePassesTheCap) {
  Watchdog dog(120);
  TempDir tmp;
  auto comm = make_local_communicator();
  CheckpointManager mgr(tmp.sub("run"), 1);
  AsyncCheckpointer saver(comm);
  DictPtr sd = state_of(12, 2);  // 24 MiB
  SaveOptions opt;
  opt.max_staging_bytes = 6 * kMiB;
  opt.sync_files = false;
  for (int64_t step : {1, 2}) {
    auto f = mgr.save_async(saver, *sd, step, opt);
    ASSERT_TRUE(f.ok()) << f.error().message;
    Status st = (*f)->wait();
    ASSERT_TRUE(st.ok()) << st.error().message;
    EXPECT_LE(saver.peak_staged_bytes(), 6 * kMiB);
  }
  EXPECT_EQ(*mgr.complete_steps(), std::vector<int64_t>{2});
  expect_saved(mgr.step_path(2), *sd);
}

TEST(AsyncStaging, AStateWithinTheCapIsStagedWhole) {
  TempDir tmp;
  AsyncCheckpointer saver(make_local_communicator());
  DictPtr sd = state_of(4, 1);
  SaveOptions opt;
  opt.max_staging_bytes = 8 * kMiB;
  ASSERT_TRUE((*saver.save_async(*sd, tmp.sub("1"), opt))->wait().ok());
  const uint64_t allocs = saver.staging_allocations();
  EXPECT_EQ(allocs, 4u) << "one structure-keyed buffer per storage";
  EXPECT_EQ(saver.staged_bytes(), 4 * kMiB);
  ASSERT_TRUE((*saver.save_async(*sd, tmp.sub("2"), opt))->wait().ok());
  EXPECT_EQ(saver.staging_allocations(), allocs);
  expect_saved(tmp.sub("2"), *sd);
}

}  // namespace
}  // namespace dsd::checkpoint
