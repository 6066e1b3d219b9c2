// Save-plan caching (SaveOptions::enable_plan_caching, core/checkpoint/plan_cache.h): what the
// structure fingerprint covers, that a save of the same structure reuses the plan and still
// writes this save's data, values and file names, that any structure change (on any one
// rank) plans afresh on every rank, and the DCP format. Multi-rank cases run each rank in a
// thread with its own Gloo communicator over a file store.
#include <ATen/ops/arange.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <filesystem>
#include <functional>
#include <set>
#include <thread>

#include "ckpt_test_util.h"
#include "core/checkpoint/async_save.h"
#include "core/checkpoint/dcp_files.h"
#include "core/checkpoint/format_id.h"
#include "core/checkpoint/load.h"
#include "core/checkpoint/plan_cache.h"
#include "core/checkpoint/save.h"
#include "core/checkpoint/save_planner.h"
#include "core/dist/layout.h"
#include "core/dist/mesh.h"
#include "core/dist/rendezvous.h"

namespace dsd::checkpoint {
namespace {

using ::testing::HasSubstr;
using dsd::testing::TempDir;

// ---------------------------------------------------------------------------------------------
// The fingerprint.

LocalPlan sample_plan() {
  LocalPlan p;
  p.rank = 1;
  p.mesh_shape = std::vector<int64_t>{2};
  p.int_key_dicts = {Path{"optim", "state"}};
  WriteItem w;
  w.key = "model.w";
  w.path = {"model", "w"};
  w.dtype = DType::kFloat32;
  w.global_shape = {8, 4};
  w.offsets = {4, 0};
  w.sizes = {4, 4};
  p.items.push_back(w);
  WriteItem v;
  v.key = "step";
  v.path = {"step"};
  v.kind = Entry::Kind::kValue;
  v.value_json = "3";
  p.items.push_back(v);
  return p;
}

SaveOptions caching_options() {
  SaveOptions o;
  o.enable_plan_caching = true;
  o.thread_count = 2;
  return o;
}

TEST(PlanFingerprint, CoversEverythingTheGlobalPlanDependsOn) {
  const LocalPlan base = sample_plan();
  const SaveOptions opt = caching_options();
  const PlanFingerprint f = plan_fingerprint(base, 2, opt);
  EXPECT_EQ(f, plan_fingerprint(sample_plan(), 2, opt));  // deterministic

  struct Change {
    const char* what;
    std::function<void(LocalPlan&, SaveOptions&, int64_t&)> apply;
  };
  const std::vector<Change> changes = {
      {"global shape", [](LocalPlan& p, SaveOptions&, int64_t&) { p.items[0].global_shape = {8, 5}; }},
      {"offsets", [](LocalPlan& p, SaveOptions&, int64_t&) { p.items[0].offsets = {0, 0}; }},
      {"sizes", [](LocalPlan& p, SaveOptions&, int64_t&) { p.items[0].sizes = {3, 4}; }},
      {"dtype", [](LocalPlan& p, SaveOptions&, int64_t&) { p.items[0].dtype = DType::kBFloat16; }},
      {"key", [](LocalPlan& p, SaveOptions&, int64_t&) { p.items[0].key = "model.v"; }},
      {"path", [](LocalPlan& p, SaveOptions&, int64_t&) { p.items[0].path = {"model", 0}; }},
      {"value key", [](LocalPlan& p, SaveOptions&, int64_t&) { p.items[1].key = "epoch"; }},
      {"kind", [](LocalPlan& p, SaveOptions&, int64_t&) { p.items[1].kind = Entry::Kind::kTensor; }},
      {"item order", [](LocalPlan& p, SaveOptions&, int64_t&) { std::swap(p.items[0], p.items[1]); }},
      {"one more item", [](LocalPlan& p, SaveOptions&, int64_t&) { p.items.push_back(p.items[1]); }},
      {"rank", [](LocalPlan& p, SaveOptions&, int64_t&) { p.rank = 0; }},
      {"mesh", [](LocalPlan& p, SaveOptions&, int64_t&) { p.mesh_shape = std::vector<int64_t>{1, 2}; }},
      {"no mesh", [](LocalPlan& p, SaveOptions&, int64_t&) { p.mesh_shape.reset(); }},
      {"int-keyed dicts", [](LocalPlan& p, SaveOptions&, int64_t&) { p.int_key_dicts.clear(); }},
      {"world size", [](LocalPlan&, SaveOptions&, int64_t& world) { world = 3; }},
      {"files per rank", [](LocalPlan&, SaveOptions& o, int64_t&) { o.thread_count = 3; }},
      {"save_to_lowest_rank", [](LocalPlan&, SaveOptions& o, int64_t&) { o.save_to_lowest_rank = true; }},
      {"format", [](LocalPlan&, SaveOptions& o, int64_t&) { o.format = Format::kDcp; }},
      {"block size", [](LocalPlan&, SaveOptions& o, int64_t&) { o.block_size = 8192; }},
  };
  for (const Change& c : changes) {
    LocalPlan p = sample_plan();
    SaveOptions o = opt;
    int64_t world = 2;
    c.apply(p, o, world);
    EXPECT_NE(plan_fingerprint(p, world, o), f) << "the fingerprint ignores the " << c.what;
  }
}

TEST(PlanFingerprint, IgnoresWhatEverySaveRefreshes) {
  const SaveOptions opt = caching_options();
  const PlanFingerprint f = plan_fingerprint(sample_plan(), 2, opt);
  LocalPlan p = sample_plan();
  p.items[1].value_json = "4";  // values are refreshed from the ranks that write them
  p.save_id = "0123456789abcdef";
  p.first_file_index = 7;
  SaveOptions o = opt;
  o.overwrite = true;  // neither shapes the plan nor its files
  o.sync_files = false;
  o.max_staging_bytes = 1 << 20;
  EXPECT_EQ(plan_fingerprint(p, 2, o), f);
}

TEST(PlanSummary, RoundTripsAndRefusesMalformedBytes) {
  PlanSummary s;
  s.fingerprint = {1, 2};
  s.cache_state = {3, 4};
  s.save_id = "0123456789abcdef";
  s.first_file_index = 5;
  s.values = {"3", "{\"dict\": []}", ""};
  const std::string bytes = encode_plan_summary(s);
  auto back = decode_plan_summary(bytes);
  ASSERT_TRUE(back.ok()) << back.error().message;
  EXPECT_EQ(back->fingerprint, s.fingerprint);
  EXPECT_EQ(back->cache_state, s.cache_state);
  EXPECT_EQ(back->save_id, s.save_id);
  EXPECT_EQ(back->first_file_index, 5);
  EXPECT_EQ(back->values, s.values);
  for (const std::string& bad : {bytes.substr(0, bytes.size() - 1), bytes + "x", std::string(40, '\xff')}) {
    auto r = decode_plan_summary(bad);
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.error().code, Code::kComm);
    EXPECT_THAT(r.error().message, HasSubstr("malformed save plan summary"));
  }
}

// ---------------------------------------------------------------------------------------------
// Saves at world size 1.

// A model-like state dict: tensors whose data depends on `seed`, a step counter, and the
// shape of "model.b" as given (the structure change of some tests).
DictPtr model_state(int seed, int64_t step, int64_t b_len = 7) {
  DictPtr sd = Dict::make();
  DictPtr model = Dict::make();
  model->set("w", Value(at::arange(64 * 33, at::kFloat).view({64, 33}).add_(seed)));
  model->set("b", Value(at::full({b_len}, static_cast<double>(seed), at::kDouble)));
  sd->set("model", Value(model));
  sd->set("step", Value(step));
  sd->set("name", Value(std::string("run-") + std::to_string(seed)));
  return sd;
}

DictPtr optim_state(int seed) {
  DictPtr sd = Dict::make();
  sd->set("exp_avg", Value(at::full({5, 5}, static_cast<double>(seed), at::kFloat)));
  sd->set("lr", Value(0.1 * seed));
  return sd;
}

// The tensor at `key` of `d`, or null.
const at::Tensor* tensor_at(const Dict& d, std::string_view key) {
  const Value* v = d.find(key);
  return v != nullptr && v->if_tensor() != nullptr ? &v->if_tensor()->tensor : nullptr;
}

// Whether `d` holds `want` at `key`, bitwise.
bool holds(const Dict& d, std::string_view key, const at::Tensor& want) {
  const at::Tensor* t = tensor_at(d, key);
  return t != nullptr && tensor_bitwise_equal(*t, want);
}

class PlanCacheTest : public ::testing::Test {
 protected:
  Result<SaveInfo> save_to(const Dict& sd, const std::string& name, SaveOptions o = caching_options()) {
    return save(*comm, sd, tmp.sub(name), o);
  }
  // The checkpoint at `name`, loaded whole.
  DictPtr loaded(const std::string& name) {
    auto r = load_full(tmp.sub(name));
    EXPECT_TRUE(r.ok()) << r.error().message;
    return r.ok() ? *r : Dict::make();
  }
  void expect_checkpoint_holds(const std::string& name, const Dict& want) {
    DictPtr got = loaded(name);
    std::string why;
    EXPECT_TRUE(deep_equal(want, *got, &why)) << name << ": " << why;
  }

  std::shared_ptr<Communicator> comm = make_local_communicator();
  TempDir tmp;
};

TEST_F(PlanCacheTest, SecondSaveOfTheSameStructureReusesThePlanWithItsOwnData) {
  DictPtr first = model_state(1, 10);
  auto a = save_to(*first, "a");
  ASSERT_TRUE(a.ok()) << a.error().message;
  EXPECT_FALSE(a->plan_cached);  // nothing cached yet

  DictPtr second = model_state(2, 11);  // same structure, other tensor data and values
  auto b = save_to(*second, "b");
  ASSERT_TRUE(b.ok()) << b.error().message;
  EXPECT_TRUE(b->plan_cached);
  EXPECT_NE(b->save_id, a->save_id);
  expect_checkpoint_holds("b", *second);
  expect_checkpoint_holds("a", *first);  // the first checkpoint is untouched

  // The manifest is this save's: its save id, data files named after it.
  auto m = read_manifest(tmp.sub("b"));
  ASSERT_TRUE(m.ok()) << m.error().message;
  EXPECT_EQ(m->save_id, b->save_id);
  ASSERT_FALSE(m->files.empty());
  for (const FileRecord& f : m->files) EXPECT_TRUE(f.name.starts_with(b->save_id)) << f.name;
  ASSERT_NE(m->find("step"), nullptr);
  EXPECT_EQ(m->find("step")->value, 11);

  // Over the same directory (overwrite): the replaced checkpoint's files go, the new load.
  DictPtr third = model_state(3, 12);
  SaveOptions o = caching_options();
  o.overwrite = true;
  auto c = save_to(*third, "b", o);
  ASSERT_TRUE(c.ok()) << c.error().message;
  EXPECT_TRUE(c->plan_cached);
  expect_checkpoint_holds("b", *third);
  for (const auto& e : std::filesystem::directory_iterator(tmp.sub("b"))) {
    const std::string n = e.path().filename().string();
    EXPECT_TRUE(n == "checkpoint.json" || n.starts_with(c->save_id)) << "left over: " << n;
  }
}

TEST_F(PlanCacheTest, ChangedTensorShapeRebuildsThePlan) {
  ASSERT_TRUE(save_to(*model_state(1, 1), "a").ok());
  DictPtr grown = model_state(2, 2, /*b_len=*/9);  // one tensor's shape differs
  auto b = save_to(*grown, "b");
  ASSERT_TRUE(b.ok()) << b.error().message;
  EXPECT_FALSE(b->plan_cached);
  expect_checkpoint_holds("b", *grown);
  DictPtr got = loaded("b");
  const Value* model = got->find("model");
  ASSERT_TRUE(model != nullptr && model->if_dict() != nullptr);
  const at::Tensor* saved_b = tensor_at(*model->if_dict(), "b");
  ASSERT_NE(saved_b, nullptr);
  EXPECT_EQ(saved_b->size(0), 9);
  // The new structure is cached in turn.
  auto c = save_to(*model_state(3, 3, 9), "c");
  ASSERT_TRUE(c.ok()) << c.error().message;
  EXPECT_TRUE(c->plan_cached);
  expect_checkpoint_holds("c", *model_state(3, 3, 9));
}

TEST_F(PlanCacheTest, ChangedDtypeKeysOrOptionsRebuildThePlan) {
  ASSERT_TRUE(save_to(*model_state(1, 1), "a").ok());
  DictPtr other_dtype = model_state(1, 1);
  other_dtype->find("model")->if_dict()->set("b", Value(at::zeros({7}, at::kFloat)));
  DictPtr extra_key = model_state(1, 1);
  extra_key->set("epoch", Value(int64_t{4}));
  DictPtr value_becomes_tensor = model_state(1, 1);
  value_becomes_tensor->set("step", Value(at::full({}, 1.0)));
  int i = 0;
  for (const DictPtr& sd : {other_dtype, extra_key, value_becomes_tensor}) {
    const std::string name = "s" + std::to_string(i++);
    auto r = save_to(*sd, name);
    ASSERT_TRUE(r.ok()) << r.error().message;
    EXPECT_FALSE(r->plan_cached) << name;
    expect_checkpoint_holds(name, *sd);
  }
  SaveOptions lowest = caching_options();
  lowest.save_to_lowest_rank = true;
  auto r = save_to(*model_state(1, 1), "lowest", lowest);
  ASSERT_TRUE(r.ok()) << r.error().message;
  EXPECT_FALSE(r->plan_cached);
}

TEST_F(PlanCacheTest, ModelAndOptimizerSavedAlternatelyBothHit) {
  std::vector<bool> cached;
  for (int i = 0; i < 6; ++i) {
    DictPtr sd = i % 2 == 0 ? model_state(i, i) : optim_state(i);
    const std::string name = "ck" + std::to_string(i);
    auto r = save_to(*sd, name);
    ASSERT_TRUE(r.ok()) << r.error().message;
    cached.push_back(r->plan_cached);
    expect_checkpoint_holds(name, *sd);
  }
  EXPECT_EQ(cached, (std::vector<bool>{false, false, true, true, true, true}));
}

TEST_F(PlanCacheTest, LeastRecentlyUsedPlanIsEvicted) {
  // kCapacity + 1 structures: the first is gone when it comes back, the most recent is not.
  for (size_t i = 0; i <= PlanCache::kCapacity; ++i) {
    auto r = save_to(*model_state(1, 1, static_cast<int64_t>(i) + 1), "ck" + std::to_string(i));
    ASSERT_TRUE(r.ok()) << r.error().message;
    EXPECT_FALSE(r->plan_cached);
  }
  auto latest = save_to(*model_state(1, 1, static_cast<int64_t>(PlanCache::kCapacity) + 1), "latest");
  ASSERT_TRUE(latest.ok()) << latest.error().message;
  EXPECT_TRUE(latest->plan_cached);
  auto oldest = save_to(*model_state(1, 1, 1), "oldest");
  ASSERT_TRUE(oldest.ok()) << oldest.error().message;
  EXPECT_FALSE(oldest->plan_cached);
}

TEST_F(PlanCacheTest, CachingOffNeverCaches) {
  SaveOptions off = caching_options();
  off.enable_plan_caching = false;
  for (int i = 0; i < 3; ++i) {
    auto r = save_to(*model_state(i, i), "off" + std::to_string(i), off);
    ASSERT_TRUE(r.ok()) << r.error().message;
    EXPECT_FALSE(r->plan_cached);
  }
  // Saves without caching leave nothing in the cache: the first caching save plans.
  auto on = save_to(*model_state(5, 5), "on");
  ASSERT_TRUE(on.ok()) << on.error().message;
  EXPECT_FALSE(on->plan_cached);
}

TEST_F(PlanCacheTest, CacheBelongsToItsCommunicator) {
  ASSERT_TRUE(save_to(*model_state(1, 1), "a").ok());
  std::shared_ptr<Communicator> other = make_local_communicator();
  auto r = save(*other, *model_state(2, 2), tmp.sub("b"), caching_options());
  ASSERT_TRUE(r.ok()) << r.error().message;
  EXPECT_FALSE(r->plan_cached);
  auto clone = MUST(comm->clone("async"));
  r = save(*clone, *model_state(2, 2), tmp.sub("c"), caching_options());
  ASSERT_TRUE(r.ok()) << r.error().message;
  EXPECT_FALSE(r->plan_cached);
}

TEST_F(PlanCacheTest, DcpFormatReusesThePlanWithNewFileNumbers) {
  SaveOptions o = caching_options();
  o.format = Format::kDcp;
  o.overwrite = true;
  auto a = save_to(*model_state(1, 1), "dcp", o);
  ASSERT_TRUE(a.ok()) << a.error().message;
  EXPECT_FALSE(a->plan_cached);
  std::set<std::string> before;
  for (const auto& e : std::filesystem::directory_iterator(tmp.sub("dcp"))) before.insert(e.path().filename());
  DictPtr second = model_state(2, 2);
  auto b = save_to(*second, "dcp", o);
  ASSERT_TRUE(b.ok()) << b.error().message;
  EXPECT_TRUE(b->plan_cached);
  EXPECT_TRUE(is_dcp_checkpoint(tmp.sub("dcp")));
  // DCP numbers its files; a reused plan still takes the next free numbers, so the files of
  // the checkpoint it replaced were never overwritten in place.
  for (const auto& e : std::filesystem::directory_iterator(tmp.sub("dcp"))) {
    const std::string n = e.path().filename();
    if (n == ".metadata") continue;
    EXPECT_EQ(before.count(n), 0u) << n << " was reused";
  }
  DictPtr dst = model_state(0, 0);
  auto r = load(*comm, *dst, tmp.sub("dcp"));
  ASSERT_TRUE(r.ok()) << r.error().message;
  std::string why;
  EXPECT_TRUE(deep_equal(*second, *dst, &why)) << why;
}

TEST_F(PlanCacheTest, AsyncSavesOverTheBackgroundCommunicatorWriteTheirOwnData) {
  // The checkpointer's background clone keeps the cache between its saves (SaveFuture does
  // not report plan_cached; this checks that what a reused plan writes, from staged
  // buffers and in capped waves, is each save's own state).
  AsyncCheckpointer saver(comm);
  for (uint64_t cap : {uint64_t{0}, uint64_t{4096}}) {
    for (int i = 0; i < 3; ++i) {
      SaveOptions o = caching_options();
      o.max_staging_bytes = cap;
      DictPtr sd = model_state(10 * i + static_cast<int>(cap % 7), i);
      const std::string name = "async" + std::to_string(cap) + "_" + std::to_string(i);
      auto f = saver.save_async(*sd, tmp.sub(name), o);
      ASSERT_TRUE(f.ok()) << f.error().message;
      Status st = (*f)->wait();
      ASSERT_TRUE(st.ok()) << st.error().message;
      expect_checkpoint_holds(name, *sd);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Several ranks, each a thread with its own Gloo communicator.

// Runs `body(comm)` on `world` ranks at once and returns each rank's SaveInfo sequence.
template <typename Body>
std::vector<std::vector<Result<SaveInfo>>> on_ranks(const TempDir& tmp, int world, Body body) {
  std::vector<std::vector<Result<SaveInfo>>> out(static_cast<size_t>(world));
  std::vector<std::thread> threads;
  for (int r = 0; r < world; ++r) {
    threads.emplace_back([&, r] {
      // Worlds are numbered per process and store address (rendezvous.cpp), so each thread
      // names the one store file differently ("dir/./store", "dir/././store", ...) to be the
      // first world of its address, as a process of its own would be.
      std::string store = tmp.path();
      for (int k = 0; k <= r; ++k) store += "/.";
      auto comm = communicator_from_file_store(store + "/store", r, world, {std::chrono::seconds(60)});
      if (!comm.ok()) {
        out[static_cast<size_t>(r)].push_back(comm.error());
        return;
      }
      body(*comm, out[static_cast<size_t>(r)]);
    });
  }
  for (std::thread& t : threads) t.join();
  return out;
}

// Rank `rank`'s state: "w" sharded Shard(0) over the world, "rep" a plain tensor every rank
// holds (written once), "only<rank>" a tensor of this rank alone of length `mine_len`, and
// values: "step" (the same everywhere) and "who" (different on every rank: the saved one is
// the writing rank's).
DictPtr rank_state(const std::shared_ptr<Communicator>& comm, int seed, int64_t mine_len) {
  const int64_t world = comm->size();
  auto mesh = MUST(DeviceMesh::make(comm, {world}, {}, c10::DeviceType::CPU));
  auto layout = MUST(Layout::on_mesh({4 * world, 3}, mesh, {Placement::shard(0)}));
  const Chunk c = layout->local_chunk();
  at::Tensor full = at::arange(4 * world * 3, at::kFloat).view({4 * world, 3}).add_(seed);
  DictPtr sd = Dict::make();
  sd->set("w", Value(TensorValue{full.narrow(0, c.offsets[0], c.sizes[0]).clone(), layout, false}));
  sd->set("rep", Value(at::full({6}, static_cast<double>(seed), at::kInt)));
  sd->set("only" + std::to_string(comm->rank()), Value(at::full({mine_len}, static_cast<double>(seed))));
  sd->set("step", Value(int64_t{seed}));
  sd->set("who", Value(int64_t{100 * seed + comm->rank()}));
  return sd;
}

TEST_F(PlanCacheTest, StructureChangeOnOneRankRebuildsOnEveryRank) {
  constexpr int kWorld = 2;
  auto results = on_ranks(tmp, kWorld, [&](std::shared_ptr<Communicator> c, std::vector<Result<SaveInfo>>& out) {
    const bool changes = c->rank() == 1;
    out.push_back(save(*c, *rank_state(c, 1, 3), tmp.sub("s1"), caching_options()));
    out.push_back(save(*c, *rank_state(c, 2, 3), tmp.sub("s2"), caching_options()));
    // Only rank 1's tensor grows.
    out.push_back(save(*c, *rank_state(c, 3, changes ? 5 : 3), tmp.sub("s3"), caching_options()));
    out.push_back(save(*c, *rank_state(c, 4, changes ? 5 : 3), tmp.sub("s4"), caching_options()));
    // Without caching, the same state as s4: the reference for which rank's values are saved.
    SaveOptions off = caching_options();
    off.enable_plan_caching = false;
    out.push_back(save(*c, *rank_state(c, 4, changes ? 5 : 3), tmp.sub("s4_uncached"), off));
  });
  const std::vector<bool> want = {false, true, false, true, false};
  for (int r = 0; r < kWorld; ++r) {
    ASSERT_EQ(results[r].size(), want.size()) << "rank " << r;
    for (size_t i = 0; i < want.size(); ++i) {
      ASSERT_TRUE(results[r][i].ok()) << "rank " << r << " save " << i << ": " << results[r][i].error().message;
      EXPECT_EQ(results[r][i]->plan_cached, want[i]) << "rank " << r << " save " << i;
    }
  }
  auto expect_saved = [&](const std::string& name, int seed, int64_t len1) {
    DictPtr got = loaded(name);
    EXPECT_TRUE(holds(*got, "w", at::arange(4 * kWorld * 3, at::kFloat).view({4 * kWorld, 3}).add_(seed))) << name;
    EXPECT_TRUE(holds(*got, "rep", at::full({6}, double(seed), at::kInt))) << name;
    EXPECT_TRUE(holds(*got, "only0", at::full({3}, double(seed)))) << name;
    EXPECT_TRUE(holds(*got, "only1", at::full({len1}, double(seed)))) << name;
    const Value* step = got->find("step");
    EXPECT_TRUE(step != nullptr && step->if_int() != nullptr && *step->if_int() == seed) << name;
  };
  expect_saved("s1", 1, 3);
  expect_saved("s2", 2, 3);
  expect_saved("s3", 3, 5);
  expect_saved("s4", 4, 5);
  // The cached plan takes each value from the rank a fresh plan picks.
  auto cached = read_manifest(tmp.sub("s4"));
  auto fresh = read_manifest(tmp.sub("s4_uncached"));
  ASSERT_TRUE(cached.ok() && fresh.ok());
  ASSERT_TRUE(cached->find("who") && fresh->find("who") && cached->find("step"));
  EXPECT_EQ(cached->find("who")->value, fresh->find("who")->value);
  EXPECT_EQ(cached->find("step")->value, 4);
}

// ---------------------------------------------------------------------------------------------
// The cache's decision, from summaries as two ranks would gather them.

struct TwoRanks {
  std::vector<LocalPlan> plans;
  std::vector<PlanSummary> summaries;
};

// Two ranks that both hold "model.w" whole (replicated: one writes it), each a tensor of its
// own, and the values "step" and "who" (different on each rank).
TwoRanks two_ranks(const PlanCache& cache, const std::string& save_id, int64_t step) {
  TwoRanks t;
  for (int64_t r = 0; r < 2; ++r) {
    LocalPlan p;
    p.rank = r;
    if (r == 0) p.save_id = save_id;
    WriteItem w;
    w.key = "model.w";
    w.path = {"model", "w"};
    w.global_shape = w.sizes = {8, 4};
    w.offsets = {0, 0};
    p.items.push_back(w);
    WriteItem own;
    own.key = "only" + std::to_string(r);
    own.path = {own.key};
    own.global_shape = own.sizes = {2};
    own.offsets = {0};
    p.items.push_back(own);
    const std::vector<std::pair<std::string, int64_t>> values = {{"step", step}, {"who", 10 * step + r}};
    for (const auto& [key, value] : values) {
      WriteItem v;
      v.key = key;
      v.path = {key};
      v.kind = Entry::Kind::kValue;
      v.value_json = std::to_string(value);
      p.items.push_back(v);
    }
    t.summaries.push_back(summarize_plan(p, 2, caching_options(), cache.state()));
    t.plans.push_back(std::move(p));
  }
  return t;
}

TEST(PlanCacheDecision, ReusesOnlyWhatEveryRankDescribesAlike) {
  PlanCache cache;
  TwoRanks first = two_ranks(cache, "00000000000000aa", 1);
  const GlobalPlan planned = MUST(create_global_plan(first.plans, {2, false}));
  auto miss = cache.reuse(first.summaries, 0);
  ASSERT_TRUE(miss.ok());
  EXPECT_FALSE(miss->has_value());  // empty cache
  (void)cache.insert(first.summaries, planned, 0);  // the lease ends at once: the plan is back in the cache

  TwoRanks next = two_ranks(cache, "00000000000000bb", 2);
  auto hit = cache.reuse(next.summaries, 0);
  ASSERT_TRUE(hit.ok()) << hit.error().message;
  ASSERT_TRUE(hit->has_value());
  const GlobalPlan& g = (*hit)->plan();
  // Exactly what planning the new local plans gives: ids, file names, the chosen values.
  const GlobalPlan fresh = MUST(create_global_plan(next.plans, {2, false}));
  EXPECT_EQ(g.save_id, "00000000000000bb");
  EXPECT_EQ(g.manifest.save_id, "00000000000000bb");
  ASSERT_EQ(g.ranks.size(), fresh.ranks.size());
  for (size_t r = 0; r < g.ranks.size(); ++r) {
    ASSERT_EQ(g.ranks[r].files.size(), fresh.ranks[r].files.size());
    for (size_t k = 0; k < g.ranks[r].files.size(); ++k) {
      EXPECT_EQ(g.ranks[r].files[k].name, fresh.ranks[r].files[k].name);
      EXPECT_EQ(g.ranks[r].files[k].items, fresh.ranks[r].files[k].items);
    }
  }
  ASSERT_EQ(g.manifest.entries.size(), fresh.manifest.entries.size());
  for (size_t i = 0; i < g.manifest.entries.size(); ++i) {
    EXPECT_EQ(g.manifest.entries[i].value, fresh.manifest.entries[i].value) << g.manifest.entries[i].key;
  }
  EXPECT_EQ(g.manifest.find("step")->value, 2);

  // While a save holds the plan, a concurrent one (the C ABI's shared local communicator)
  // plans for itself; once the lease ends the plan is there again, whole.
  auto concurrent = cache.reuse(two_ranks(cache, "00000000000000ee", 5).summaries, 0);
  ASSERT_TRUE(concurrent.ok());
  EXPECT_FALSE(concurrent->has_value());
  hit->reset();
  auto after = cache.reuse(two_ranks(cache, "00000000000000ff", 6).summaries, 0);
  ASSERT_TRUE(after.ok() && after->has_value());
  EXPECT_EQ((*after)->plan().ranks[0].items.size(), fresh.ranks[0].items.size());
  EXPECT_EQ((*after)->plan().ranks[0].files[0].name, data_file_name("00000000000000ff", 0, 0));
  after->reset();

  // One rank's structure differs: no rank may reuse.
  TwoRanks changed = two_ranks(cache, "00000000000000cc", 3);
  changed.plans[1].items[0].dtype = DType::kBFloat16;
  changed.summaries[1] = summarize_plan(changed.plans[1], 2, caching_options(), cache.state());
  for (int64_t rank : {0, 1}) {
    auto r = cache.reuse(changed.summaries, rank);
    ASSERT_TRUE(r.ok());
    EXPECT_FALSE(r->has_value()) << "rank " << rank;
  }
  // One rank's cache differs (it would not find the same plan): no rank may reuse.
  TwoRanks diverged = two_ranks(cache, "00000000000000dd", 4);
  diverged.summaries[1].cache_state = PlanCache().state();
  auto r = cache.reuse(diverged.summaries, 0);
  ASSERT_TRUE(r.ok());
  EXPECT_FALSE(r->has_value());
  // The same summaries with equal cache states do hit: the refusal above was the states'.
  diverged.summaries[1].cache_state = diverged.summaries[0].cache_state;
  auto same = cache.reuse(diverged.summaries, 0);
  ASSERT_TRUE(same.ok());
  EXPECT_TRUE(same->has_value());
}

TEST(PlanCacheDecision, OtherRanksKeepOnlyTheirShare) {
  PlanCache cache;
  TwoRanks first = two_ranks(cache, "00000000000000aa", 1);
  (void)cache.insert(first.summaries, MUST(create_global_plan(first.plans, {1, false})), 1);
  TwoRanks next = two_ranks(cache, "00000000000000bb", 2);
  auto hit = cache.reuse(next.summaries, 1);
  ASSERT_TRUE(hit.ok() && hit->has_value());
  const GlobalPlan fresh = MUST(create_global_plan(next.plans, {1, false}));
  const GlobalPlan& g = (*hit)->plan();
  ASSERT_EQ(g.ranks.size(), 2u);
  EXPECT_TRUE(g.ranks[0].items.empty() && g.ranks[0].files.empty());
  ASSERT_FALSE(fresh.ranks[1].files.empty());
  ASSERT_EQ(g.ranks[1].files.size(), fresh.ranks[1].files.size());
  EXPECT_EQ(g.ranks[1].files[0].name, fresh.ranks[1].files[0].name);
  EXPECT_EQ(g.ranks[1].items.size(), fresh.ranks[1].items.size());
}

}  // namespace
}  // namespace dsd::checkpoint
