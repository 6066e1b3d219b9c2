// StateView (interop/state_view.h): the selection by key prefix, the strip of that prefix from
// keys, nested paths and int-keyed dicts, the cast of floating tensors only, and the errors.
#include <ATen/ops/arange.h>
#include <ATen/ops/equal.h>
#include <ATen/ops/randn.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "core/interop/convert.h"
#include "core/interop/state_view.h"

namespace dsd::interop {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

// {"model": {"enc": {"w": f32}, "layers.0.w": f32, "ids": int64}, "optim": {"state": {0:
// {"exp_avg": f32}}, "param_groups": [{"lr": 0.1}]}, "step": 7}
DictPtr training_state() {
  DictPtr enc = Dict::make();
  enc->set("w", Value(at::randn({3, 2})));
  DictPtr model = Dict::make();
  model->set("enc", Value(enc));
  model->set("layers.0.w", Value(at::randn({4})));
  model->set("ids", Value(at::arange(5, at::kLong)));
  DictPtr s0 = Dict::make();
  s0->set("exp_avg", Value(at::randn({4})));
  DictPtr state = Dict::make();
  state->set_int_keys(true);
  state->set("0", Value(s0));
  DictPtr group = Dict::make();
  group->set("lr", Value(0.1));
  ListPtr groups = std::make_shared<List>();
  groups->push_back(Value(group));
  DictPtr optim = Dict::make();
  optim->set("state", Value(state));
  optim->set("param_groups", Value(groups));
  DictPtr sd = Dict::make();
  sd->set("model", Value(model));
  sd->set("optim", Value(optim));
  sd->set("step", Value(int64_t{7}));
  return sd;
}

std::vector<std::string> keys_of(const StateReader& r) {
  std::vector<std::string> keys;
  for (const ItemInfo& it : r.items()) keys.push_back(it.key);
  return keys;
}

TEST(StateView, SelectsASubtreeWithOrWithoutTheTrailingDot) {
  DictPtr sd = training_state();
  auto base = MUST(StateReader::of(*sd));
  for (const char* select : {"model", "model."}) {
    auto v = MUST(make_state_view(*base, {select, false, std::nullopt}));
    EXPECT_THAT(keys_of(*v), ElementsAre("model.enc.w", "model.layers.0.w", "model.ids")) << select;
  }
  // A string prefix that is no key path selects nothing.
  auto none = make_state_view(*base, {"mod", false, std::nullopt});
  ASSERT_FALSE(none.ok());
  EXPECT_EQ(none.error().code, Code::kNotFound);
  EXPECT_THAT(none.error().message, HasSubstr("'mod'"));
  EXPECT_THAT(none.error().message, HasSubstr("<memory>"));
}

TEST(StateView, StripsThePrefixFromKeysAndNestedPaths) {
  DictPtr sd = training_state();
  auto base = MUST(StateReader::of(*sd));
  auto v = MUST(make_state_view(*base, {"model", true, std::nullopt}));
  EXPECT_THAT(keys_of(*v), ElementsAre("enc.w", "layers.0.w", "ids"));
  DictPtr back = MUST(read_all(*v));
  ASSERT_NE(back->find("enc"), nullptr);
  ASSERT_TRUE(back->find("enc")->is_dict());
  EXPECT_TRUE(at::equal(back->find("enc")->if_dict()->find("w")->if_tensor()->tensor,
                        sd->find("model")->if_dict()->find("enc")->if_dict()->find("w")->if_tensor()->tensor));
  EXPECT_NE(back->find("layers.0.w"), nullptr);
  EXPECT_EQ(back->find("optim"), nullptr);
  EXPECT_EQ(back->find("step"), nullptr);

  // A prefix that ends inside a key of the nesting: ("model", "layers.0.w") keeps "0.w".
  auto layers = MUST(make_state_view(*base, {"model.layers", true, std::nullopt}));
  EXPECT_THAT(keys_of(*layers), ElementsAre("0.w"));
  EXPECT_THAT(layers->items()[0].path, ElementsAre(PathSegment("0.w")));
}

TEST(StateView, KeepsIntKeyedDictsAndListsUnderThePrefix) {
  DictPtr sd = training_state();
  auto base = MUST(StateReader::of(*sd));
  auto optim = MUST(make_state_view(*base, {"optim", true, std::nullopt}));
  DictPtr back = MUST(read_all(*optim));
  ASSERT_TRUE(back->find("state") && back->find("state")->is_dict());
  EXPECT_TRUE(back->find("state")->if_dict()->int_keys());
  ASSERT_TRUE(back->find("param_groups") && back->find("param_groups")->is_list());

  // The int-keyed dict itself selected: the top of the view is int-keyed.
  auto state = MUST(make_state_view(*base, {"optim.state", true, std::nullopt}));
  EXPECT_THAT(keys_of(*state), ElementsAre("0.exp_avg"));
  EXPECT_TRUE(MUST(read_all(*state))->int_keys());

  // A list selected: its indices become the keys of the top dict.
  auto groups = MUST(make_state_view(*base, {"optim.param_groups", true, std::nullopt}));
  DictPtr g = MUST(read_all(*groups));
  ASSERT_TRUE(g->find("0") && g->find("0")->is_dict());
  EXPECT_EQ(*g->find("0")->if_dict()->find("lr")->if_double(), 0.1);
}

TEST(StateView, CastsFloatingTensorsOnlyAsTorchDoes) {
  DictPtr sd = training_state();
  auto base = MUST(StateReader::of(*sd));
  auto v = MUST(make_state_view(*base, {"", false, DType::kBFloat16}));
  ASSERT_EQ(v->items().size(), base->items().size());
  for (size_t i = 0; i < v->items().size(); ++i) {
    const ItemInfo& b = base->items()[i];
    const ItemInfo& it = v->items()[i];
    if (b.kind != Entry::Kind::kTensor) continue;
    const at::Tensor src = MUST(base->read_tensor(i));
    const at::Tensor got = MUST(v->read_tensor(i));
    if (b.dtype == DType::kFloat32) {
      EXPECT_EQ(it.dtype, DType::kBFloat16) << it.key;
      EXPECT_EQ(it.nbytes, b.nbytes / 2) << it.key;
      ASSERT_EQ(it.chunks.size(), 1u);
      EXPECT_EQ(it.chunks[0].end, it.nbytes);
      EXPECT_TRUE(at::equal(got.view(at::kShort), src.to(at::kBFloat16).view(at::kShort))) << it.key;
    } else {
      EXPECT_EQ(it.dtype, b.dtype) << it.key;
      EXPECT_TRUE(at::equal(got, src)) << it.key;
    }
  }
  EXPECT_EQ(v->tensor_bytes(), (4 * 2 + 6 * 2 + 4 * 2) + 5 * 8);
}

TEST(StateView, RefusesRequestsItCannotServe) {
  DictPtr sd = training_state();
  auto base = MUST(StateReader::of(*sd));
  auto strip_all = make_state_view(*base, {"", true, std::nullopt});
  ASSERT_FALSE(strip_all.ok());
  EXPECT_EQ(strip_all.error().code, Code::kInvalidArgument);
  EXPECT_THAT(strip_all.error().message, HasSubstr("strip_prefix needs a select"));

  auto ints = make_state_view(*base, {"model", false, DType::kInt32});
  ASSERT_FALSE(ints.ok());
  EXPECT_EQ(ints.error().code, Code::kInvalidArgument);
  EXPECT_THAT(ints.error().message, HasSubstr("int32"));

  auto complex = make_state_view(*base, {"model", false, DType::kComplex64});
  ASSERT_FALSE(complex.ok());
  EXPECT_EQ(complex.error().code, Code::kInvalidArgument);

  auto empty = make_state_view(*base, {"step", true, std::nullopt});
  ASSERT_FALSE(empty.ok());
  EXPECT_EQ(empty.error().code, Code::kInvalidArgument);
  EXPECT_THAT(empty.error().message, HasSubstr("empty key"));

  auto dot = make_state_view(*base, {".", false, std::nullopt});
  ASSERT_FALSE(dot.ok());
  EXPECT_EQ(dot.error().code, Code::kInvalidArgument);
}

TEST(StateView, EveryExportAppliesTheOptions) {
  DictPtr sd = training_state();
  ConvertOptions o;
  o.select = "model";
  o.strip_prefix = true;
  o.dtype = DType::kFloat16;
  const std::string dir = ::testing::TempDir() + "/state_view_export";
  o.overwrite = true;
  ASSERT_TRUE(export_safetensors(*sd, dir, o).ok());
  auto back = MUST(StateReader::open(dir));
  EXPECT_THAT(keys_of(*back), ElementsAre("enc.w", "layers.0.w", "ids"));
  EXPECT_EQ(back->items()[0].dtype, DType::kFloat16);
  EXPECT_EQ(back->items()[2].dtype, DType::kInt64);
}

}  // namespace
}  // namespace dsd::interop
