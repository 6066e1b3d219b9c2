// The global save plan from simulated ranks: replicated chunks written once and balanced by
// bytes (DCP's dedup_save_plans), validation failures, file assignment and naming.
#include "core/checkpoint/save_planner.h"

#include "core/checkpoint/load_planner.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <set>

namespace dsd::checkpoint {
namespace {

using ::testing::HasSubstr;

constexpr const char* kId = "00112233445566ff";

WriteItem chunk(std::string key, std::vector<int64_t> shape, std::vector<int64_t> off, std::vector<int64_t> sizes) {
  WriteItem it;
  it.key = key;
  it.path = {key};
  it.dtype = DType::kFloat32;
  it.global_shape = std::move(shape);
  it.offsets = std::move(off);
  it.sizes = std::move(sizes);
  return it;
}

WriteItem whole(std::string key, std::vector<int64_t> shape) {
  std::vector<int64_t> zeros(shape.size(), 0);
  return chunk(std::move(key), shape, zeros, shape);
}

WriteItem value(std::string key, std::string json) {
  WriteItem it;
  it.key = key;
  it.path = {key};
  it.kind = Entry::Kind::kValue;
  it.value_json = std::move(json);
  return it;
}

std::vector<LocalPlan> ranks(std::vector<std::vector<WriteItem>> items) {
  std::vector<LocalPlan> out;
  for (size_t r = 0; r < items.size(); ++r) {
    out.push_back({static_cast<int64_t>(r), std::move(items[r]), r == 0 ? kId : "", std::nullopt, {}});
  }
  return out;
}

uint64_t bytes_of(const RankPlan& r) {
  uint64_t n = 0;
  for (const WriteItem& it : r.items) n += it.storage_bytes();
  return n;
}

TEST(Planner, ReplicatedTensorsAreWrittenOnceAndBalanced) {
  // Four replicated tensors of equal size on 2 ranks: each rank writes two.
  std::vector<WriteItem> same;
  for (int i = 0; i < 4; ++i) same.push_back(whole("t" + std::to_string(i), {100}));
  auto g = create_global_plan(ranks({same, same}), {});
  ASSERT_TRUE(g.ok()) << g.error().message;
  EXPECT_EQ(g->ranks[0].items.size(), 2u);
  EXPECT_EQ(g->ranks[1].items.size(), 2u);
  std::set<std::string> written;
  for (const auto& r : g->ranks) for (const auto& it : r.items) EXPECT_TRUE(written.insert(it.key).second);
  EXPECT_EQ(written.size(), 4u);
}

TEST(Planner, GreedyBalanceCountsEveryItemInOrderLikeDcp) {
  // Items are balanced in first-seen order (rank 0's first), as DCP's dict order does.
  auto g = create_global_plan(ranks({{chunk("s", {200}, {0}, {100}), whole("r", {10})},
                                     {chunk("s", {200}, {100}, {100}), whole("r", {10})},
                                     {whole("r", {10})}}), {});
  ASSERT_TRUE(g.ok()) << g.error().message;
  // s[0] -> rank 0 (400 B); r (on 0, 1, 2; loads 400/0/0) -> rank 1; s[100] -> rank 1.
  EXPECT_EQ(bytes_of(g->ranks[0]), 400u);
  EXPECT_EQ(bytes_of(g->ranks[1]), 440u);
  EXPECT_TRUE(g->ranks[2].items.empty());
  PlanOptions lowest;
  lowest.save_to_lowest_rank = true;
  auto l = create_global_plan(ranks({{whole("r", {10})}, {whole("r", {10})}}), lowest);
  ASSERT_TRUE(l.ok());
  EXPECT_EQ(l->ranks[0].items.size(), 1u);
  EXPECT_TRUE(l->ranks[1].items.empty());
}

TEST(Planner, ValuesGoToTheManifestNotToFiles) {
  auto g = create_global_plan(ranks({{value("step", "3"), whole("w", {2})}, {value("step", "3")}}), {});
  ASSERT_TRUE(g.ok());
  ASSERT_EQ(g->manifest.entries.size(), 2u);
  EXPECT_EQ(g->manifest.entries[0].kind, Entry::Kind::kValue);
  EXPECT_EQ(g->manifest.entries[0].value, 3);
  for (const auto& r : g->ranks) for (const auto& it : r.items) EXPECT_NE(it.key, "step");
}

TEST(Planner, ValidationFailures) {
  struct Case {
    std::vector<std::vector<WriteItem>> items;
    std::string text;
  };
  for (const Case& c : std::vector<Case>{
           {{{chunk("w", {10}, {0}, {5})}, {chunk("w", {10}, {4}, {6})}}, "overlap"},
           {{{chunk("w", {10}, {0}, {5})}, {chunk("w", {10}, {6}, {4})}}, "cover 9 of its 10 elements"},
           {{{chunk("w", {10}, {0}, {5})}, {chunk("w", {10}, {5}, {6})}}, "out of bounds"},
           {{{whole("w", {10})}, {whole("w", {11})}}, "ranks disagree on 'w'"},
           {{{whole("w", {10})}, {value("w", "1")}}, "tensor on one rank and a value on another"},
       }) {
    auto g = create_global_plan(ranks(c.items), {});
    ASSERT_FALSE(g.ok()) << c.text;
    EXPECT_EQ(g.error().code, Code::kInvalidArgument);
    EXPECT_THAT(g.error().message, HasSubstr("Failed to validate global plan"));
    EXPECT_THAT(g.error().message, HasSubstr(c.text));
  }
}

TEST(Planner, FilesAreBalancedUniquePerSaveAndHoldAKeyOnce) {
  std::vector<WriteItem> items{whole("a", {1000}), whole("b", {600}), whole("c", {500}), whole("d", {100})};
  PlanOptions opt;
  opt.files_per_rank = 2;
  auto g = create_global_plan(ranks({items}), opt);
  ASSERT_TRUE(g.ok());
  const auto& files = g->ranks[0].files;
  ASSERT_EQ(files.size(), 2u);
  EXPECT_EQ(files[0].bytes + files[1].bytes, 2200u * 4);
  // Largest first to the lighter file: a -> 0, b -> 1, c -> 1, d -> 0.
  EXPECT_EQ(files[0].bytes, 4400u);
  EXPECT_EQ(files[0].items, (std::vector<size_t>{0, 3}));
  EXPECT_EQ(files[0].name, std::string(kId) + "-00000-000.safetensors");
  EXPECT_TRUE(is_data_file_name(files[1].name));
  EXPECT_FALSE(is_data_file_name("model-00001-of-00002.safetensors"));
  EXPECT_FALSE(is_data_file_name("00112233445566ff-00000-000.safetensors.tmp"));
}

TEST(Planner, ValuesThatDifferBetweenRanksAreTakenFromTheWriter) {
  // "v" is on both ranks with different values; w's 400 bytes load rank 0 first, so rank 1
  // writes "v", and its value is the one saved.
  auto g = create_global_plan(ranks({{whole("w", {100}), value("v", "1")}, {value("v", "2")}}), {});
  ASSERT_TRUE(g.ok()) << g.error().message;
  ASSERT_EQ(g->manifest.entries.size(), 2u);
  EXPECT_EQ(g->manifest.entries[1].value, 2);
  PlanOptions lowest;
  lowest.save_to_lowest_rank = true;
  auto l = create_global_plan(ranks({{whole("w", {100}), value("v", "1")}, {value("v", "2")}}), lowest);
  ASSERT_TRUE(l.ok());
  EXPECT_EQ(l->manifest.entries[1].value, 1);
}

TEST(Planner, ReplicasThatDisagreeOnAChunkAreRefused) {
  auto g = create_global_plan(ranks({{chunk("w", {10}, {0}, {10})}, {chunk("w", {10}, {0}, {5}), chunk("w", {10}, {5}, {5})}}), {});
  ASSERT_FALSE(g.ok());
  EXPECT_EQ(g.error().code, Code::kInvalidArgument);
  EXPECT_THAT(g.error().message, HasSubstr("ranks disagree on the chunk of 'w' at offsets [0]: sizes [10] on rank 0, [5] on rank 1"));
}

// Shard(0) of `rows` rows over `n` ranks, torch.chunk style, plus a replicated scalar.
std::vector<LocalPlan> fsdp(int64_t n, int64_t rows) {
  std::vector<std::vector<WriteItem>> items(static_cast<size_t>(n));
  const int64_t per = (rows + n - 1) / n;
  for (int64_t r = 0; r < n; ++r) {
    const int64_t off = std::min(rows, per * r);
    items[r].push_back(chunk("w", {rows, 3}, {off, 0}, {std::min(per, rows - off), 3}));
    items[r].push_back(whole("step", {}));
  }
  return ranks(std::move(items));
}

TEST(Planner, ShardedOverManyRanksEachRankWritesItsChunkAndEmptyShardsOnce) {
  // 4096 ranks, 3000 rows: ranks 0..2999 hold a row each, the rest empty shards (offset 3000,
  // as torch's compute_local_shape_and_global_offset gives), which dedup to one item.
  PlanOptions opt;
  opt.save_to_lowest_rank = true;
  GlobalPlanner planner(opt);
  for (LocalPlan& p : fsdp(4096, 3000)) ASSERT_TRUE(planner.add(std::move(p)).ok());
  auto g = planner.finish();
  ASSERT_TRUE(g.ok()) << g.error().message;
  ASSERT_EQ(g->ranks.size(), 4096u);
  EXPECT_EQ(g->ranks[0].items.size(), 2u);  // its row and step
  for (int r = 1; r < 3000; ++r) ASSERT_EQ(g->ranks[r].items.size(), 1u) << r;
  // The first rank with an empty shard writes the one empty chunk; the others nothing.
  ASSERT_EQ(g->ranks[3000].items.size(), 1u);
  EXPECT_EQ(g->ranks[3000].items[0].sizes, (std::vector<int64_t>{0, 3}));
  EXPECT_TRUE(g->ranks[3001].items.empty());
  EXPECT_EQ(g->ranks[17].items[0].offsets, (std::vector<int64_t>{17, 0}));
  EXPECT_EQ(g->manifest.world_size, 4096);
  // A rank whose chunk overlaps its neighbour's is found among the 4096.
  auto bad = fsdp(4096, 3000);
  bad[2500].items[0].sizes = {2, 3};
  auto e = create_global_plan(bad, opt);
  ASSERT_FALSE(e.ok());
  EXPECT_THAT(e.error().message, HasSubstr("chunks [2500, 0] and [2501, 0] of 'w' overlap"));
}

// The saved chunks of a [rows, cols] tensor cut into a grid of torch.chunk pieces.
Entry grid_entry(int64_t rows, int64_t cols, int64_t pr, int64_t pc) {
  Entry e;
  e.key = "w";
  e.shape = {rows, cols};
  for (int64_t i = 0; i < pr; ++i) {
    for (int64_t j = 0; j < pc; ++j) {
      const ChunkSpan a = chunk_span(rows, pr, i), b = chunk_span(cols, pc, j);
      e.chunks.push_back({{a.offset, b.offset}, {a.size, b.size}, "f", 0, 0, 0, {}});
    }
  }
  return e;
}

TEST(Planner, ChunkIndexFindsWhatAScanFinds) {
  // Saved as 1-D and 2-D grids (uneven, with empty pieces), loaded as other grids: the
  // indexed lookup gives every destination the ReadItems of the full scan, in its order.
  struct Shape {
    int64_t pr, pc;
  };
  for (Shape saved : {Shape{7, 1}, Shape{1, 5}, Shape{4, 3}, Shape{16, 1}, Shape{3, 16}}) {
    const Entry e = grid_entry(13, 10, saved.pr, saved.pc);
    const ChunkIndex index(e);
    for (Shape load : {Shape{1, 1}, Shape{3, 1}, Shape{5, 2}, Shape{2, 7}, Shape{13, 10}}) {
      const Entry dst = grid_entry(13, 10, load.pr, load.pc);
      for (const ChunkRecord& d : dst.chunks) {
        LoadTarget t;
        t.key = "w";
        t.local = Chunk{d.offsets, d.sizes};
        std::vector<ReadItem> scanned, indexed;
        add_read_items(e, t, scanned);
        index.add_read_items(t, indexed);
        ASSERT_EQ(indexed.size(), scanned.size()) << t.local.str();
        for (size_t i = 0; i < scanned.size(); ++i) EXPECT_EQ(indexed[i].chunk, scanned[i].chunk);
        int64_t covered = 0;
        for (const ReadItem& r : indexed) {
          int64_t n = 1;
          for (size_t k = 0; k < 2; ++k) {
            n *= std::min(r.chunk->offsets[k] + r.chunk->sizes[k], t.local.offsets[k] + t.local.sizes[k]) -
                 std::max(r.chunk->offsets[k], t.local.offsets[k]);
          }
          covered += n;
        }
        EXPECT_EQ(covered, t.local.numel());
      }
    }
  }
  Entry scalar;
  scalar.key = "s";
  scalar.chunks = {{{}, {}, "f", 0, 4, 0, {0}}};
  const ChunkIndex si(scalar);
  LoadTarget t;
  t.local = Chunk{{}, {}};
  std::vector<ReadItem> items;
  si.add_read_items(t, items);
  EXPECT_EQ(items.size(), 1u);
}

TEST(Planner, LocalPlansRoundTripAsJson) {
  LocalPlan p{3, {chunk("w", {4, 4}, {2, 0}, {2, 4}), value("v", "{\"tuple\":[1]}")}, kId,
              std::vector<int64_t>{2, 2}, {{std::string("opt"), int64_t{0}}}};
  auto back = local_plan_from_json(local_plan_to_json(p));
  ASSERT_TRUE(back.ok());
  EXPECT_EQ(back->rank, 3);
  EXPECT_EQ(back->items[0].offsets, (std::vector<int64_t>{2, 0}));
  EXPECT_EQ(back->items[1].value_json, "{\"tuple\":[1]}");
  EXPECT_EQ(*back->mesh_shape, (std::vector<int64_t>{2, 2}));
  EXPECT_EQ(back->int_key_dicts.size(), 1u);
  EXPECT_EQ(local_plan_from_json("{}").error().code, Code::kComm);
}

}  // namespace
}  // namespace dsd::checkpoint
