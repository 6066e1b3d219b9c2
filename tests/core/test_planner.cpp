// The global save plan from simulated ranks: replicated chunks written once and balanced by
// bytes (DCP's dedup_save_plans), validation failures, file assignment and naming.
#include "core/checkpoint/save_planner.h"

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
