// get/set_optimizer_state_dict (reference sections 2.3-2.6) and the PyTorch bugs dsd fixes.
#include <gtest/gtest.h>

#include <ATen/ops/full.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/zeros_like.h>

#include "core/statedict/state_dict.h"

namespace dsd {
namespace {

at::Tensor t(std::vector<int64_t> shape, float fill) { return at::full(shape, fill); }
TensorValue tv(at::Tensor x) { return TensorValue{std::move(x), nullptr, false}; }

std::vector<std::string> keys(const Dict& d) {
  std::vector<std::string> out;
  for (const auto& e : d) out.push_back(e.key);
  return out;
}

DictPtr adam_state(float step, const at::Tensor& like, float moment) {
  auto st = Dict::make();
  st->set("step", at::scalar_tensor(step));
  st->set("exp_avg", at::full(like.sizes(), moment));
  st->set("exp_avg_sq", at::full(like.sizes(), moment * moment));
  return st;
}

DictPtr adam_options(double lr) {
  auto o = Dict::make();
  o->set("lr", lr);
  auto betas = List::make(true);
  betas->push_back(0.9);
  betas->push_back(0.999);
  o->set("betas", betas);
  o->set("eps", 1e-8);
  o->set("weight_decay", 0.0);
  o->set("amsgrad", false);
  o->set("foreach", Value());
  return o;
}

// a.weight, a.bias trainable; f.weight frozen. One Adam group over all three.
struct Fixture {
  Model model{nullptr, "Net"};
  Optimizer optim;
  TensorValue aw = tv(t({2, 2}, 1)), ab = tv(t({2}, 2)), fw = tv(t({3}, 3));

  Fixture() {
    EXPECT_TRUE(model.add_parameter("a.weight", aw, true).ok());
    EXPECT_TRUE(model.add_parameter("a.bias", ab, true).ok());
    EXPECT_TRUE(model.add_parameter("f.weight", fw, false).ok());
    EXPECT_TRUE(optim.add_param_group(adam_options(0.1), {aw, ab, fw}).ok());
    EXPECT_TRUE(optim.set_state(0, adam_state(3, aw.tensor, 0.5)).ok());
    EXPECT_TRUE(optim.set_state(1, adam_state(3, ab.tensor, 0.25)).ok());
  }
  std::vector<Optimizer*> optims() { return {&optim}; }
};

TEST(GetOptimizerStateDict, FqnKeyedNestedForm) {
  Fixture f;
  auto osd = get_optimizer_state_dict(f.model, f.optims());
  ASSERT_TRUE(osd.ok()) << osd.error().message;
  const Dict& state = *(*osd)->find("state")->if_dict();
  EXPECT_EQ(keys(state), (std::vector<std::string>{"a.weight", "a.bias"}));
  // Tensors alias the optimizer's.
  EXPECT_TRUE(state.find("a.weight")->if_dict()->find("exp_avg")->if_tensor()->tensor.is_same(
      f.optim.state(0)->find("exp_avg")->if_tensor()->tensor));
  const Dict& group = *(*(*osd)->find("param_groups")->if_list())[0].if_dict();
  EXPECT_EQ(keys(group).back(), "params");  // PyTorch puts params last
  const List& params = *group.find("params")->if_list();
  ASSERT_EQ(params.size(), 3u);
  EXPECT_EQ(*params[2].if_string(), "f.weight");
}

TEST(GetOptimizerStateDict, FlattenedForm) {
  Fixture f;
  StateDictOptions o;
  o.flatten_optimizer_state_dict = true;
  auto osd = get_optimizer_state_dict(f.model, f.optims(), o);
  ASSERT_TRUE(osd.ok());
  EXPECT_TRUE((*osd)->contains("state.a.weight.exp_avg"));
  EXPECT_TRUE((*osd)->contains("param_groups.f.weight.lr"));
  EXPECT_TRUE((*osd)->find("param_groups.a.bias.betas")->if_list()->is_tuple());
  EXPECT_FALSE((*osd)->contains("param_groups.a.weight.params"));
}

TEST(GetOptimizerStateDict, FlatteningRejectsUnsupportedLeaves) {
  Fixture f;
  f.optim.state(0)->set("name", "adam");
  StateDictOptions o;
  o.flatten_optimizer_state_dict = true;
  auto osd = get_optimizer_state_dict(f.model, f.optims(), o);
  ASSERT_FALSE(osd.ok());
  EXPECT_EQ(osd.error().code, Code::kUnsupported);
  EXPECT_EQ(osd.error().message,
            "Flattening optimizer state_dict only supports tensor, int, float, dict states now. Type is "
            "<class 'str'>.");
}

TEST(GetOptimizerStateDict, TiedParameterUsesItsFirstFqn) {
  Model m;
  TensorValue w = tv(t({4, 2}, 1));
  ASSERT_TRUE(m.add_parameter("embedding.weight", w, true).ok());
  ASSERT_TRUE(m.add_parameter("decoder.weight", w, true).ok());
  Optimizer o;
  ASSERT_TRUE(o.add_param_group(adam_options(0.1), {w}).ok());
  ASSERT_TRUE(o.set_state(0, adam_state(1, w.tensor, 1)).ok());
  std::vector<Optimizer*> os{&o};
  auto osd = get_optimizer_state_dict(m, os);
  ASSERT_TRUE(osd.ok());
  EXPECT_EQ(keys(*(*osd)->find("state")->if_dict()), (std::vector<std::string>{"embedding.weight"}));
  // And it loads back, through either name.
  Optimizer fresh;
  ASSERT_TRUE(fresh.add_param_group(adam_options(0.5), {w}).ok());
  std::vector<Optimizer*> fs{&fresh};
  ASSERT_TRUE(set_optimizer_state_dict(m, fs, **osd).ok());
  ASSERT_NE(fresh.state(0), nullptr);
  EXPECT_EQ(*fresh.groups()[0].options->find("lr")->if_double(), 0.1);
}

TEST(GetOptimizerStateDict, SeveralOptimizersAreMerged) {
  Fixture f;
  TensorValue extra = tv(t({5}, 0));
  ASSERT_TRUE(f.model.add_parameter("head.weight", extra, true).ok());
  Optimizer second;
  ASSERT_TRUE(second.add_param_group(adam_options(0.01), {extra}).ok());
  ASSERT_TRUE(second.set_state(0, adam_state(7, extra.tensor, 1)).ok());
  std::vector<Optimizer*> os{&f.optim, &second};
  auto osd = get_optimizer_state_dict(f.model, os);
  ASSERT_TRUE(osd.ok());
  EXPECT_EQ(keys(*(*osd)->find("state")->if_dict()),
            (std::vector<std::string>{"a.weight", "a.bias", "head.weight"}));
  EXPECT_EQ((*osd)->find("param_groups")->if_list()->size(), 2u);
  // Each optimizer takes back its own part.
  ASSERT_TRUE(set_optimizer_state_dict(f.model, os, **osd).ok());
}

TEST(GetOptimizerStateDict, ParameterOutsideTheModelIsAClearError) {
  Fixture f;
  Optimizer stray;
  ASSERT_TRUE(stray.add_param_group(adam_options(0.1), {tv(t({7}, 0))}).ok());
  std::vector<Optimizer*> os{&stray};
  auto osd = get_optimizer_state_dict(f.model, os);
  ASSERT_FALSE(osd.ok());
  EXPECT_EQ(osd.error().code, Code::kNotFound);
  EXPECT_NE(osd.error().message.find("is not a parameter of the model"), std::string::npos);
}

TEST(GetOptimizerStateDict, NoOptimizersIsAnError) {
  Fixture f;
  auto osd = get_optimizer_state_dict(f.model, {});
  ASSERT_FALSE(osd.ok());
  EXPECT_EQ(osd.error().message, "Optimizers are not passed in but optim_only is set to True.");
}

// Loads `osd` into a fresh copy of the fixture's optimizer (other values everywhere).
struct Fresh {
  Fixture& f;
  Optimizer optim;
  explicit Fresh(Fixture& fx) : f(fx) {
    EXPECT_TRUE(optim.add_param_group(adam_options(0.7), {f.aw, f.ab, f.fw}).ok());
    EXPECT_TRUE(optim.set_state(0, adam_state(0, f.aw.tensor, 0)).ok());
    EXPECT_TRUE(optim.set_state(1, adam_state(0, f.ab.tensor, 0)).ok());
  }
  Status load(const Dict& osd, StateDictOptions o = {}) {
    std::vector<Optimizer*> os{&optim};
    return set_optimizer_state_dict(f.model, os, osd, o);
  }
};

TEST(SetOptimizerStateDict, NestedRoundTripCopiesInPlace) {
  Fixture f;
  auto osd = get_optimizer_state_dict(f.model, f.optims());
  Fresh fresh(f);
  at::Tensor dst = fresh.optim.state(0)->find("exp_avg")->if_tensor()->tensor;
  ASSERT_TRUE(fresh.load(**osd).ok());
  EXPECT_TRUE(dst.equal(at::full({2, 2}, 0.5f)));  // same tensor, loaded values
  EXPECT_TRUE(fresh.optim.state(1)->find("step")->if_tensor()->tensor.equal(at::scalar_tensor(3.0f)));
  EXPECT_EQ(*fresh.optim.groups()[0].options->find("lr")->if_double(), 0.1);
}

TEST(SetOptimizerStateDict, FlattenedRoundTrip) {
  Fixture f;
  StateDictOptions flat;
  flat.flatten_optimizer_state_dict = true;
  auto osd = get_optimizer_state_dict(f.model, f.optims(), flat);
  Fresh fresh(f);
  ASSERT_TRUE(fresh.load(**osd).ok());
  EXPECT_TRUE(fresh.optim.state(0)->find("exp_avg_sq")->if_tensor()->tensor.equal(at::full({2, 2}, 0.25f)));
  EXPECT_EQ(*fresh.optim.groups()[0].options->find("lr")->if_double(), 0.1);
  EXPECT_TRUE(fresh.optim.groups()[0].options->find("betas")->if_list()->is_tuple());
}

TEST(SetOptimizerStateDict, ExtraSavedHyperparametersAreCarriedOver) {
  Fixture f;
  f.optim.groups()[0].options->set("initial_lr", 0.1);
  auto osd = get_optimizer_state_dict(f.model, f.optims());
  Fresh fresh(f);
  ASSERT_FALSE(fresh.optim.groups()[0].options->contains("initial_lr"));
  ASSERT_TRUE(fresh.load(**osd).ok());
  EXPECT_EQ(*fresh.optim.groups()[0].options->find("initial_lr")->if_double(), 0.1);
}

TEST(SetOptimizerStateDict, StrictMissingStateInBothForms) {
  Fixture f;
  auto osd = get_optimizer_state_dict(f.model, f.optims());
  (*osd)->find("state")->if_dict()->erase("a.bias");
  Fresh fresh(f);
  auto r = fresh.load(**osd);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, Code::kNotFound);
  EXPECT_NE(r.error().message.find("Missing optimizer state for parameter 'a.bias' in checkpoint."),
            std::string::npos);
  StateDictOptions lax;
  lax.strict = false;
  EXPECT_TRUE(fresh.load(**osd, lax).ok());

  // PyTorch #192224: the flattened form gave an opaque TypeError; dsd gives the same error.
  StateDictOptions flat;
  flat.flatten_optimizer_state_dict = true;
  auto fosd = get_optimizer_state_dict(f.model, f.optims(), flat);
  for (const char* k : {"state.a.bias.step", "state.a.bias.exp_avg", "state.a.bias.exp_avg_sq"}) (*fosd)->erase(k);
  Fresh fresh2(f);
  auto rf = fresh2.load(**fosd);
  ASSERT_FALSE(rf.ok());
  EXPECT_NE(rf.error().message.find("Missing optimizer state for parameter 'a.bias'"), std::string::npos);
}

TEST(SetOptimizerStateDict, NothingIsWrittenWhenAStateTensorMismatches) {
  Fixture f;
  auto osd = get_optimizer_state_dict(f.model, f.optims());
  auto copy = deep_copy(**osd);
  copy->find("state")->if_dict()->find("a.bias")->if_dict()->set("exp_avg", t({5}, 1));
  Fresh fresh(f);
  at::Tensor before = fresh.optim.state(0)->find("exp_avg")->if_tensor()->tensor.clone();
  auto r = fresh.load(*copy);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, Code::kShapeMismatch);
  EXPECT_TRUE(fresh.optim.state(0)->find("exp_avg")->if_tensor()->tensor.equal(before));
}

TEST(SetOptimizerStateDict, FrozenParameterStateIsKept) {
  // PyTorch #192202 dropped the saved state of frozen parameters.
  Fixture f;
  ASSERT_TRUE(f.optim.set_state(2, adam_state(9, f.fw.tensor, 2)).ok());
  auto osd = get_optimizer_state_dict(f.model, f.optims());
  Fresh fresh(f);
  ASSERT_TRUE(fresh.load(**osd).ok());
  ASSERT_NE(fresh.optim.state(2), nullptr);
  EXPECT_TRUE(fresh.optim.state(2)->find("exp_avg")->if_tensor()->tensor.equal(at::full({3}, 2.0f)));
}

TEST(SetOptimizerStateDict, StatelessSgdGetsNoSpuriousEntries) {
  // PyTorch #192225: a flattened round trip gave every parameter an empty `{}` state.
  Model m;
  TensorValue w = tv(t({2}, 1));
  ASSERT_TRUE(m.add_parameter("w", w, true).ok());
  Optimizer sgd;
  auto opts = Dict::make();
  opts->set("lr", 0.1);
  opts->set("momentum", 0);
  ASSERT_TRUE(sgd.add_param_group(opts, {w}).ok());
  std::vector<Optimizer*> os{&sgd};
  StateDictOptions flat;
  flat.flatten_optimizer_state_dict = true;
  auto osd = get_optimizer_state_dict(m, os, flat);
  ASSERT_TRUE(osd.ok());
  ASSERT_TRUE(set_optimizer_state_dict(m, os, **osd).ok());
  EXPECT_EQ(sgd.state(0), nullptr);
  auto nested = get_optimizer_state_dict(m, os);
  EXPECT_TRUE((*nested)->find("state")->if_dict()->empty());
  ASSERT_TRUE(set_optimizer_state_dict(m, os, **nested).ok());
}

TEST(SetOptimizerStateDict, OneEmptyGroupRule) {
  Model m;
  TensorValue w = tv(t({2}, 1));
  ASSERT_TRUE(m.add_parameter("w", w, true).ok());
  auto make = [&](double empty_lr) {
    Optimizer o;
    EXPECT_TRUE(o.add_param_group(adam_options(0.1), {w}).ok());
    EXPECT_TRUE(o.add_param_group(adam_options(empty_lr), {}).ok());
    EXPECT_TRUE(o.set_state(0, adam_state(1, w.tensor, 1)).ok());
    return o;
  };
  Optimizer saved = make(0.2);
  std::vector<Optimizer*> s{&saved};
  auto osd = get_optimizer_state_dict(m, s);
  Optimizer target = make(0.9);
  std::vector<Optimizer*> tg{&target};
  ASSERT_TRUE(set_optimizer_state_dict(m, tg, **osd).ok());
  EXPECT_EQ(*target.groups()[1].options->find("lr")->if_double(), 0.2);

  // Two empty groups in the saved dict: PyTorch's message.
  auto two = deep_copy(**osd);
  auto extra = Dict::make();
  extra->set("lr", 0.3);
  extra->set("params", List::make());
  two->find("param_groups")->if_list()->push_back(extra);
  auto r = set_optimizer_state_dict(m, tg, *two);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.error().message.find("There are param groups that have zero parameters."), std::string::npos);
}

TEST(SetOptimizerStateDict, PositionalFormPassesThrough) {
  Fixture f;
  std::vector<std::string> names{"a.weight", "a.bias", "f.weight"};
  auto osd = get_optimizer_state_dict(f.model, f.optims());
  auto positional = optim_state_dict_to_positional(**osd, names);
  ASSERT_TRUE(positional.ok()) << positional.error().message;
  const Dict& state = *(*positional)->find("state")->if_dict();
  EXPECT_TRUE(state.int_keys());
  EXPECT_EQ(keys(state), (std::vector<std::string>{"0", "1"}));
  Fresh fresh(f);
  ASSERT_TRUE(fresh.load(**positional).ok());
  EXPECT_TRUE(fresh.optim.state(1)->find("exp_avg")->if_tensor()->tensor.equal(at::full({2}, 0.25f)));
  // And back to FQNs, losslessly.
  auto back = optim_state_dict_to_fqn(**positional, names);
  ASSERT_TRUE(back.ok());
  std::string why;
  EXPECT_TRUE(deep_equal(**back, **osd, &why)) << why;
  auto unknown = optim_state_dict_to_positional(**osd, std::vector<std::string>{"a.weight"});
  ASSERT_FALSE(unknown.ok());
  EXPECT_NE(unknown.error().message.find("'a.bias' is not among the parameter names"), std::string::npos);
}

TEST(SetOptimizerStateDict, InconsistentGroupValuesAreDetected) {
  Fixture f;
  StateDictOptions flat;
  flat.flatten_optimizer_state_dict = true;
  auto osd = get_optimizer_state_dict(f.model, f.optims(), flat);
  (*osd)->set("param_groups.a.bias.lr", 0.5);  // a.weight says 0.1
  Fresh fresh(f);
  auto r = fresh.load(**osd);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.error().message.find("should have the same saved param_group value"), std::string::npos);
}

TEST(Materialize, CalledForMissingStateWithoutATrace) {
  // PyTorch #164929 bumped `step` with a dummy step; #140898 silently skipped state when
  // gradients existed. dsd asks the trainer's callback, which creates fresh state.
  Fixture f;
  Optimizer lazy;
  ASSERT_TRUE(lazy.add_param_group(adam_options(0.1), {f.aw, f.ab, f.fw}).ok());
  std::vector<size_t> asked;
  lazy.set_materialize([&](Optimizer& o, std::span<const size_t> missing) -> Status {
    asked.assign(missing.begin(), missing.end());
    for (size_t pid : missing) TRY(o.set_state(pid, adam_state(0, o.param(pid).tensor, 0)));
    return ok();
  });
  std::vector<Optimizer*> os{&lazy};
  auto osd = get_optimizer_state_dict(f.model, os);
  ASSERT_TRUE(osd.ok());
  EXPECT_EQ(asked, (std::vector<size_t>{0, 1}));  // trainable parameters only
  EXPECT_TRUE((*osd)->find("state")->if_dict()->find("a.weight")->if_dict()->find("step")->if_tensor()
                  ->tensor.equal(at::scalar_tensor(0.0f)));
  asked.clear();
  ASSERT_TRUE(get_optimizer_state_dict(f.model, os).ok());
  EXPECT_TRUE(asked.empty());  // complete now: not called again

  lazy.set_materialize([](Optimizer&, std::span<const size_t>) -> Status {
    return Error(Code::kInternal, "no memory for moments");
  });
  ASSERT_TRUE(lazy.set_state(0, nullptr).ok());
  auto failed = get_optimizer_state_dict(f.model, os);
  ASSERT_FALSE(failed.ok());
  EXPECT_EQ(failed.error().code, Code::kCallback);
  EXPECT_NE(failed.error().message.find("no memory for moments"), std::string::npos);
}

TEST(SetStateDict, OptimizerOnlyWhenModelStateDictIsEmpty) {
  Fixture f;
  auto both = get_state_dict(f.model, f.optims());
  ASSERT_TRUE(both.ok());
  Fresh fresh(f);
  std::vector<Optimizer*> os{&fresh.optim};
  Dict empty;
  auto r = set_state_dict(f.model, os, empty, *both->optim);
  ASSERT_TRUE(r.ok()) << r.error().message;
  EXPECT_EQ(*fresh.optim.groups()[0].options->find("lr")->if_double(), 0.1);
}

}  // namespace
}  // namespace dsd
