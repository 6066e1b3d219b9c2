#include <gtest/gtest.h>

#include <ATen/ops/ones.h>

#include "core/statedict/flatten.h"

namespace dsd {
namespace {

ListPtr list_of(std::initializer_list<Value> items, bool tuple = false) {
  auto l = List::make(tuple);
  for (const Value& v : items) l->push_back(v);
  return l;
}

// {"model": {"w": T}, "optim": {"state": {"l.weight": {"step": 3, "exp_avg": T}},
//  "param_groups": [{"lr": 0.1, "params": ["l.weight"]}]}, "steps": [1, 2], "t": (T,)}
DictPtr sample() {
  auto sd = Dict::make();
  auto model = Dict::make();
  model->set("w", at::ones({2}));
  sd->set("model", model);
  auto optim = Dict::make();
  auto state = Dict::make();
  auto pstate = Dict::make();
  pstate->set("step", 3);
  pstate->set("exp_avg", at::ones({2}));
  state->set("l.weight", pstate);
  optim->set("state", state);
  auto group = Dict::make();
  group->set("lr", 0.1);
  group->set("params", list_of({Value("l.weight")}));
  optim->set("param_groups", list_of({Value(group)}));
  sd->set("optim", optim);
  sd->set("steps", list_of({Value(1), Value(2)}));
  sd->set("t", list_of({Value(at::ones({1}))}, /*tuple=*/true));
  sd->set("empty", Dict::make());
  return sd;
}

std::vector<std::string> keys(const Dict& d) {
  std::vector<std::string> out;
  for (const auto& e : d) out.push_back(e.key);
  return out;
}

TEST(Flatten, CheckpointTraversalMatchesDcp) {
  auto flat = flatten_state_dict(*sample(), FlattenStyle::kCheckpoint);
  ASSERT_TRUE(flat.ok()) << flat.error().message;
  // What torch.distributed.checkpoint._nested_dict.flatten_state_dict gives for the same
  // dict: lists of scalars and tuples are leaves, a list holding a dict is entered, the empty
  // dict vanishes.
  EXPECT_EQ(keys(*flat->flat),
            (std::vector<std::string>{"model.w", "optim.state.l.weight.step",
                                      "optim.state.l.weight.exp_avg", "optim.param_groups.0.lr",
                                      "optim.param_groups.0.params", "steps", "t"}));
  EXPECT_EQ(flat->mapping[1].second,
            (Path{PathSegment::key("optim"), PathSegment::key("state"), PathSegment::key("l.weight"),
                  PathSegment::key("step")}));
}

TEST(Flatten, AllContainersTraversal) {
  auto flat = flatten_state_dict(*sample(), FlattenStyle::kAllContainers);
  ASSERT_TRUE(flat.ok());
  EXPECT_EQ(keys(*flat->flat),
            (std::vector<std::string>{"model.w", "optim.state.l.weight.step",
                                      "optim.state.l.weight.exp_avg", "optim.param_groups.0.lr",
                                      "optim.param_groups.0.params.0", "steps.0", "steps.1", "t.0"}));
}

TEST(Flatten, RoundTripsThroughTheMapping) {
  DictPtr original = sample();
  original->erase("empty");  // vanishes by design
  for (auto style : {FlattenStyle::kCheckpoint, FlattenStyle::kAllContainers}) {
    auto flat = flatten_state_dict(*original, style);
    ASSERT_TRUE(flat.ok());
    auto back = unflatten_state_dict(*flat->flat, flat->mapping);
    ASSERT_TRUE(back.ok());
    std::string why;
    if (style == FlattenStyle::kCheckpoint) {
      EXPECT_TRUE(deep_equal(**back, *original, &why)) << why;
    } else {
      // Tuples come back as lists: the mapping records indices, not tuple-ness.
      EXPECT_EQ(keys(**back), keys(*original));
    }
  }
}

TEST(Flatten, DuplicateKeysAreRejected) {
  auto sd = Dict::make();
  auto a = Dict::make();
  a->set("b", 1);
  sd->set("a", a);
  sd->set("a.b", 2);
  auto flat = flatten_state_dict(*sd);
  ASSERT_FALSE(flat.ok());
  EXPECT_EQ(flat.error().message, "duplicated flatten key a.b");
  EXPECT_EQ(flat.error().context, "a.b");
}

TEST(SetElement, CreatesContainersAndPadsLists) {
  Dict root;
  ASSERT_TRUE(set_element(root, {PathSegment::key("a"), PathSegment::index(2), PathSegment::key("x")}, 5).ok());
  const Value* a = root.find("a");
  ASSERT_TRUE(a && a->is_list());
  ASSERT_EQ(a->if_list()->size(), 3u);
  EXPECT_TRUE((*a->if_list())[0].is_none());
  EXPECT_EQ(*get_element(root, {PathSegment::key("a"), PathSegment::index(2), PathSegment::key("x")})->if_int(), 5);
  EXPECT_EQ(get_element(root, {PathSegment::key("a"), PathSegment::index(7)}), nullptr);
  EXPECT_FALSE(set_element(root, {PathSegment::index(0)}, 1).ok());
  EXPECT_FALSE(set_element(root, {}, 1).ok());
}

TEST(Flatten, JoinPath) {
  EXPECT_EQ(join_path({PathSegment::key("state"), PathSegment::key("l.w"), PathSegment::index(0)}), "state.l.w.0");
}

}  // namespace
}  // namespace dsd
