// get/set_model_state_dict and FQN canonicalization (reference sections 1.4, 2.1-2.4, 2.7).
#include <gtest/gtest.h>

#include <ATen/ops/arange.h>
#include <ATen/ops/full.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/zeros.h>

#include "core/statedict/fqn.h"
#include "core/statedict/state_dict.h"

namespace dsd {
namespace {

at::Tensor t(std::vector<int64_t> shape, float fill) { return at::full(shape, fill); }
TensorValue tv(std::vector<int64_t> shape, float fill) { return TensorValue{t(std::move(shape), fill), nullptr, false}; }

std::vector<std::string> keys(const Dict& d) {
  std::vector<std::string> out;
  for (const auto& e : d) out.push_back(e.key);
  return out;
}

// l.weight, l.bias, u.w (frozen), bn.running_mean (buffer), bn.scratch (non-persistent),
// u._extra_state.
Model small_model() {
  Model m(nullptr, "Small");
  EXPECT_TRUE(m.add_parameter("l.weight", tv({2, 3}, 1), true).ok());
  EXPECT_TRUE(m.add_parameter("l.bias", tv({2}, 2), true).ok());
  EXPECT_TRUE(m.add_parameter("u.w", tv({4}, 3), false).ok());
  EXPECT_TRUE(m.add_buffer("bn.running_mean", tv({2}, 4), true).ok());
  EXPECT_TRUE(m.add_buffer("bn.scratch", tv({2}, 5), false).ok());
  EXPECT_TRUE(m.add_extra_state("u._extra_state", Value("MyState")).ok());
  return m;
}

TEST(Fqn, StripsWrappersAsPyTorchDoes) {
  FqnRules r;
  ASSERT_TRUE(r.declare_wrapper("", WrapperKind::kDdp).ok());
  ASSERT_TRUE(r.declare_wrapper("module", WrapperKind::kCompile).ok());
  auto c = r.canonicalize("module._orig_mod.layers.0._checkpoint_wrapped_module.attn.weight");
  ASSERT_TRUE(c.ok()) << c.error().message;
  EXPECT_EQ(c->fqn, "layers.0.attn.weight");
  EXPECT_EQ(c->prefixed, "module._orig_mod.layers.0.attn.weight");
  EXPECT_EQ(r.canonicalize("module._orig_mod._extra_state")->fqn, "_extra_state");

  // FSDP1 tokens and compile tokens vanish wherever they are; "module" only under DDP.
  FqnRules plain;
  EXPECT_EQ(plain.canonicalize("a._fsdp_wrapped_module.b.weight")->fqn, "a.b.weight");
  EXPECT_EQ(plain.canonicalize("_orig_mod.b.weight")->fqn, "b.weight");
  EXPECT_EQ(plain.canonicalize("module.b.weight")->fqn, "module.b.weight");
}

TEST(Fqn, ErrorsNameTheProblem) {
  FqnRules r;
  ASSERT_TRUE(r.declare_wrapper("", WrapperKind::kDdp).ok());
  auto bad = r.canonicalize("l.weight");
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.error().message.find("expected 'module'"), std::string::npos);
  EXPECT_FALSE(r.declare_wrapper("", WrapperKind::kCompile).ok());
  auto extra = FqnRules().canonicalize("a._extra_state.b");
  ASSERT_FALSE(extra.ok());
  EXPECT_NE(extra.error().message.find("Expect `_extra_state` to be the last obj name"), std::string::npos);
  EXPECT_FALSE(FqnRules().canonicalize("a..b").ok());
}

TEST(Fqn, ModifiersCollapseTheChildSegment) {
  FqnRules r;
  ASSERT_TRUE(r.add_modifier("emb", "weight", "embedding").ok());
  EXPECT_EQ(r.canonicalize("emb.embedding.weight")->fqn, "emb.weight");
  EXPECT_EQ(r.canonicalize("emb.fusion.weight")->fqn, "emb.fusion.weight");
  // A module path canonicalizes the same way (submodule prefixes).
  EXPECT_EQ(*r.canonical_module_path("emb.embedding"), "emb");
  EXPECT_EQ(*r.canonical_module_path(""), "");
}

TEST(GetModelStateDict, AliasesTensorsAndSkipsNonPersistentBuffers) {
  Model m = small_model();
  auto sd = get_model_state_dict(m);
  ASSERT_TRUE(sd.ok()) << sd.error().message;
  EXPECT_EQ(keys(**sd), (std::vector<std::string>{"l.weight", "l.bias", "u.w", "bn.running_mean",
                                                   "u._extra_state"}));
  // No copy: the value is the registered tensor.
  EXPECT_TRUE((*sd)->find("l.weight")->if_tensor()->tensor.is_same(m.entries()[0].tensor.tensor));
  EXPECT_EQ(*(*sd)->find("u._extra_state")->if_string(), "MyState");
}

TEST(GetModelStateDict, IgnoreFrozenParamsKeepsBuffers) {
  Model m = small_model();
  StateDictOptions o;
  o.ignore_frozen_params = true;
  auto sd = get_model_state_dict(m, o);
  ASSERT_TRUE(sd.ok());
  EXPECT_FALSE((*sd)->contains("u.w"));
  EXPECT_TRUE((*sd)->contains("bn.running_mean"));
}

TEST(GetModelStateDict, SubmodulesAndKeepPrefixes) {
  Model m = small_model();
  std::vector<std::string> subs{"l"};
  auto sd = get_model_state_dict(m, {}, subs);
  ASSERT_TRUE(sd.ok());
  EXPECT_EQ(keys(**sd), (std::vector<std::string>{"l.weight", "l.bias"}));
  StateDictOptions o;
  o.keep_submodule_prefixes = false;
  sd = get_model_state_dict(m, o, subs);
  EXPECT_EQ(keys(**sd), (std::vector<std::string>{"weight", "bias"}));
}

TEST(GetModelStateDict, TiedWeightsAppearUnderEveryName) {
  Model m;
  TensorValue w{t({3, 2}, 1), nullptr, false};
  ASSERT_TRUE(m.add_parameter("embedding.weight", w, true).ok());
  ASSERT_TRUE(m.add_parameter("decoder.weight", w, true).ok());
  auto params = m.parameters();
  ASSERT_TRUE(params.ok());
  ASSERT_EQ((*params)->size(), 1u);
  EXPECT_EQ((**params)[0].fqns, (std::vector<std::string>{"embedding.weight", "decoder.weight"}));
  auto sd = get_model_state_dict(m);
  EXPECT_EQ(keys(**sd), (std::vector<std::string>{"embedding.weight", "decoder.weight"}));
}

TEST(GetModelStateDict, CompiledKeysAreIdempotent) {
  // PyTorch #158519: keys changed between a get before and a get after a set.
  Model m;
  ASSERT_TRUE(m.declare_wrapper("", WrapperKind::kCompile).ok());
  ASSERT_TRUE(m.add_parameter("_orig_mod.l.weight", TensorValue{t({2}, 1), nullptr, false}, true).ok());
  auto before = get_model_state_dict(m);
  ASSERT_TRUE(before.ok());
  ASSERT_TRUE(set_model_state_dict(m, **before).ok());
  auto after = get_model_state_dict(m);
  EXPECT_EQ(keys(**before), (std::vector<std::string>{"l.weight"}));
  EXPECT_EQ(keys(**after), keys(**before));
}

TEST(GetModelStateDict, OptionErrors) {
  Model m = small_model();
  StateDictOptions o;
  o.broadcast_from_rank0 = true;
  auto r = get_model_state_dict(m, o);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, Code::kInvalidArgument);
  EXPECT_EQ(r.error().message, "full_state_dict must be True when broadcast_from_rank0 is True.");

  Model empty;
  auto e = get_model_state_dict(empty);
  ASSERT_FALSE(e.ok());
  EXPECT_NE(e.error().message.find("but model state_dict is empty"), std::string::npos);
  StateDictOptions lax;
  lax.strict = false;
  EXPECT_TRUE(get_model_state_dict(empty, lax).ok());

  Model flat;
  ASSERT_TRUE(flat.add_parameter("l._flat_param", TensorValue{t({2}, 1), nullptr, false}, true).ok());
  auto f = get_model_state_dict(flat);
  ASSERT_FALSE(f.ok());
  EXPECT_EQ(f.error().message,
            "l._flat_param contains _flat_param. This can happen if the model is not the root module.");
}

TEST(SetModelStateDict, CopiesInPlace) {
  Model m = small_model();
  at::Tensor w = m.entries()[0].tensor.tensor;
  auto sd = deep_copy(**get_model_state_dict(m));
  sd->set("l.weight", t({2, 3}, 9));
  sd->set("u._extra_state", "Loaded");
  auto keys_out = set_model_state_dict(m, *sd);
  ASSERT_TRUE(keys_out.ok()) << keys_out.error().message;
  EXPECT_TRUE(keys_out->missing_keys.empty() && keys_out->unexpected_keys.empty());
  EXPECT_TRUE(w.equal(t({2, 3}, 9)));  // the same tensor object, new values
  EXPECT_EQ(*m.entries()[5].extra_state.if_string(), "Loaded");
}

TEST(SetModelStateDict, StrictErrorsMatchNnModule) {
  Model m = small_model();
  auto sd = deep_copy(**get_model_state_dict(m));
  sd->erase("l.bias");
  sd->set("abc", t({1}, 0));
  auto r = set_model_state_dict(m, *sd);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, Code::kNotFound);
  EXPECT_EQ(r.error().message,
            "Error(s) in loading state_dict for Small:\n\tMissing key(s) in state_dict: \"l.bias\". \n\t"
            "Unexpected key(s) in state_dict: \"abc\". ");

  StateDictOptions lax;
  lax.strict = false;
  auto k = set_model_state_dict(m, *sd, lax);
  ASSERT_TRUE(k.ok());
  EXPECT_EQ(k->missing_keys, (std::vector<std::string>{"l.bias"}));
  EXPECT_EQ(k->unexpected_keys, (std::vector<std::string>{"abc"}));

  // Non-persistent buffers never appear: given, they are unexpected.
  auto with_scratch = deep_copy(**get_model_state_dict(m));
  with_scratch->set("bn.scratch", t({2}, 0));
  auto s = set_model_state_dict(m, *with_scratch, lax);
  EXPECT_EQ(s->unexpected_keys, (std::vector<std::string>{"bn.scratch"}));
}

TEST(SetModelStateDict, WrapperPrefixedMissingKeyRaisesMissingKey) {
  Model m;
  ASSERT_TRUE(m.declare_wrapper("", WrapperKind::kDdp).ok());
  ASSERT_TRUE(m.add_parameter("module.l.weight", TensorValue{t({2}, 1), nullptr, false}, true).ok());
  ASSERT_TRUE(m.add_parameter("module.l.bias", TensorValue{t({2}, 1), nullptr, false}, true).ok());
  auto sd = Dict::make();
  sd->set("l.weight", t({2}, 5));
  auto r = set_model_state_dict(m, *sd);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().message, "Missing key: l.bias.");
  StateDictOptions lax;
  lax.strict = false;
  auto k = set_model_state_dict(m, *sd, lax);
  ASSERT_TRUE(k.ok());
  EXPECT_EQ(k->missing_keys, (std::vector<std::string>{"module.l.bias"}));  // as DDP names it
}

TEST(SetModelStateDict, NothingIsWrittenWhenAnyEntryIsBad) {
  Model m = small_model();
  at::Tensor w = m.entries()[0].tensor.tensor;
  at::Tensor before = w.clone();
  for (int which = 0; which < 3; ++which) {
    auto sd = deep_copy(**get_model_state_dict(m));
    sd->set("l.weight", t({2, 3}, 42));  // a good entry...
    if (which == 0) sd->set("l.bias", t({3}, 0));                        // ...and a shape mismatch
    if (which == 1) sd->set("l.bias", at::zeros({2}, at::kDouble));      // ...a dtype mismatch
    if (which == 2) sd->set("l.bias", Value(3));                         // ...not a tensor
    auto r = set_model_state_dict(m, *sd);
    ASSERT_FALSE(r.ok());
    EXPECT_TRUE(w.equal(before)) << "case " << which << " wrote before failing";
    if (which == 0) {
      EXPECT_EQ(r.error().code, Code::kShapeMismatch);
      EXPECT_NE(r.error().message.find("size mismatch for l.bias: copying a param with shape "
                                       "torch.Size([3]) from checkpoint, the shape in current model is "
                                       "torch.Size([2])."),
                std::string::npos);
    }
    if (which == 1) {
      EXPECT_EQ(r.error().code, Code::kDtypeMismatch);
      EXPECT_NE(r.error().message.find("dtype mismatch for l.bias"), std::string::npos);
    }
    if (which == 2) {
      EXPECT_NE(r.error().message.find("While copying the parameter named \"l.bias\""), std::string::npos);
    }
  }
}

TEST(SetModelStateDict, ReadOnlyTensorsAreNeverWritten) {
  Model m;
  ASSERT_TRUE(m.add_parameter("w", TensorValue{t({2}, 1), nullptr, true}, true).ok());
  auto sd = Dict::make();
  sd->set("w", t({2}, 7));
  auto r = set_model_state_dict(m, *sd);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, Code::kReadOnly);
  EXPECT_TRUE(m.entries()[0].tensor.tensor.equal(t({2}, 1)));
}

TEST(SetModelStateDict, EmptyStateDictErrors) {
  Model m = small_model();
  Dict empty;
  auto r = set_model_state_dict(m, empty);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.error().message.find("model state_dict is empty"), std::string::npos);
  StateDictOptions lax;
  lax.strict = false;
  EXPECT_TRUE(set_model_state_dict(m, empty, lax).ok());
}

TEST(Model, RegistrationErrors) {
  Model m;
  ASSERT_TRUE(m.add_parameter("w", TensorValue{t({2}, 1), nullptr, false}, true).ok());
  auto dup = m.add_parameter("w", TensorValue{t({2}, 1), nullptr, false}, true);
  ASSERT_FALSE(dup.ok());
  EXPECT_EQ(dup.error().message, "'w' is registered twice");
  EXPECT_FALSE(m.add_extra_state("u.state", Value(1)).ok());
  EXPECT_FALSE(m.add_parameter("", TensorValue{t({2}, 1), nullptr, false}, true).ok());
}

}  // namespace
}  // namespace dsd
