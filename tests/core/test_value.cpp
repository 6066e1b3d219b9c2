#include <gtest/gtest.h>

#include <ATen/ops/arange.h>
#include <ATen/ops/full.h>

#include <cmath>

#include "core/statedict/value.h"

namespace dsd {
namespace {

TEST(Dict, KeepsInsertionOrderAndReplacesInPlace) {
  Dict d;
  d.set("b", 1);
  d.set("a", 2);
  d.set("c", 3);
  d.set("a", 20);
  ASSERT_EQ(d.size(), 3u);
  EXPECT_EQ(d.key_at(0), "b");
  EXPECT_EQ(d.key_at(1), "a");
  EXPECT_EQ(*d.value_at(1).if_int(), 20);
  EXPECT_TRUE(d.erase("b"));
  EXPECT_FALSE(d.erase("b"));
  EXPECT_EQ(d.key_at(0), "a");
  EXPECT_EQ(d.find("zz"), nullptr);
}

TEST(Dict, LargeDictsStayConsistentAcrossTheIndexThreshold) {
  Dict d;
  for (int i = 0; i < 100; ++i) d.append_unique("k" + std::to_string(i), i);
  for (int i = 0; i < 100; ++i) EXPECT_EQ(*d.find("k" + std::to_string(i))->if_int(), i);
  d.set("k50", -1);
  EXPECT_EQ(*d.value_at(50).if_int(), -1);
  d.erase("k10");
  EXPECT_EQ(*d.index_of("k11"), 10u);
  EXPECT_FALSE(d.contains("k10"));
  while (d.size() > 3) d.erase_at(0);
  EXPECT_EQ(d.key_at(0), "k97");
  EXPECT_EQ(*d.index_of("k99"), 2u);
}

TEST(Value, KindsAndTypedAccess) {
  EXPECT_EQ(Value().kind(), Kind::kNone);
  EXPECT_EQ(Value(true).kind(), Kind::kBool);
  EXPECT_EQ(Value(int64_t{3}).kind(), Kind::kInt);
  EXPECT_EQ(Value(0.5).kind(), Kind::kDouble);
  EXPECT_EQ(Value("s").kind(), Kind::kString);  // not bool
  EXPECT_EQ(Value(Bytes{"\x00\x01"}).kind(), Kind::kBytes);
  EXPECT_EQ(Value(at::arange(3)).kind(), Kind::kTensor);
  EXPECT_EQ(Value(List::make()).kind(), Kind::kList);
  EXPECT_EQ(Value(Dict::make()).kind(), Kind::kDict);
  EXPECT_EQ(Value(1).if_double(), nullptr);  // an int is not read as a double
}

TEST(Value, ContainersHaveReferenceSemantics) {
  auto inner = Dict::make();
  auto outer = Dict::make();
  outer->set("inner", inner);
  inner->set("x", 1);
  EXPECT_EQ(*outer->find("inner")->if_dict()->find("x")->if_int(), 1);

  DictPtr copy = deep_copy(*outer);
  inner->set("x", 2);
  EXPECT_EQ(*copy->find("inner")->if_dict()->find("x")->if_int(), 1);
}

TEST(Value, DeepEqualIsBitwiseAndExplains) {
  auto a = Dict::make();
  auto b = Dict::make();
  a->set("w", at::full({2}, NAN));
  b->set("w", at::full({2}, NAN));
  a->set("betas", [] {
    auto l = List::make(true);
    l->push_back(0.9);
    l->push_back(0.999);
    return l;
  }());
  b->set("betas", deep_copy(*a->find("betas")));
  std::string why;
  EXPECT_TRUE(deep_equal(*a, *b, &why)) << why;

  b->find("betas")->if_list()->set_tuple(false);
  EXPECT_FALSE(deep_equal(*a, *b, &why));
  EXPECT_EQ(why, "betas: tuple vs list");

  b->set("betas", a->find("betas")->list_ptr());
  b->set("w", at::full({2}, NAN, at::kDouble));
  EXPECT_FALSE(deep_equal(*a, *b, &why));
  EXPECT_NE(why.find("w: tensors differ"), std::string::npos);

  EXPECT_FALSE(deep_equal(Value(0.0), Value(-0.0)));
  EXPECT_FALSE(deep_equal(Value(1), Value(1.0)));
}

TEST(Value, TensorEqualityHandlesViews) {
  at::Tensor t = at::arange(6, at::kFloat).view({2, 3});
  EXPECT_TRUE(tensor_bitwise_equal(t.t(), t.t().contiguous()));
  EXPECT_FALSE(tensor_bitwise_equal(t, t.view({3, 2})));
}

}  // namespace
}  // namespace dsd
