// A libtorch C++ model and optimizer through dsd: PyTorch's Python names, a round trip into a
// fresh module and optimizer, then one more step: bitwise the same parameters.
#include <gtest/gtest.h>

#include <ATen/ops/randn.h>
#include <torch/nn/modules/activation.h>
#include <torch/nn/modules/container/sequential.h>
#include <torch/nn/modules/linear.h>
#include <torch/optim/adamw.h>
#include <torch/optim/sgd.h>

#include "core/adapters/libtorch.h"
#include "core/statedict/state_dict.h"

namespace dsd {
namespace {

torch::nn::Sequential make_net(int seed) {
  torch::manual_seed(seed);
  return torch::nn::Sequential(torch::nn::Linear(4, 8), torch::nn::ReLU(), torch::nn::Linear(8, 2));
}

void train(torch::nn::Sequential& net, torch::optim::Optimizer& opt, int steps, int seed) {
  torch::manual_seed(seed);
  for (int i = 0; i < steps; ++i) {
    net->forward(at::randn({16, 4})).mean().backward();
    opt.step();
    opt.zero_grad();
  }
}

std::vector<std::string> keys(const Dict& d) {
  std::vector<std::string> out;
  for (const auto& e : d) out.push_back(e.key);
  return out;
}

TEST(LibtorchAdapter, AdamWRoundTripIsBitwise) {
  auto net = make_net(0);
  torch::optim::AdamW opt(net->parameters(), torch::optim::AdamWOptions(1e-2).weight_decay(0.05));
  train(net, opt, 3, 1);

  Model model(nullptr, "Sequential");
  ASSERT_TRUE(libtorch::register_module(model, *net).ok());
  auto bound = libtorch::BoundOptimizer::bind(opt);
  ASSERT_TRUE(bound.ok()) << bound.error().message;
  std::vector<Optimizer*> optims{&(*bound)->registry()};
  auto sd = get_state_dict(model, optims);
  ASSERT_TRUE(sd.ok()) << sd.error().message;

  // The names Python's nn.Sequential + torch.optim.AdamW produce (PyTorch 2.13).
  EXPECT_EQ(keys(*sd->model), (std::vector<std::string>{"0.weight", "0.bias", "2.weight", "2.bias"}));
  const Dict& state = *sd->optim->find("state")->if_dict();
  EXPECT_EQ(keys(state), keys(*sd->model));
  const Dict& w = *state.find("0.weight")->if_dict();
  EXPECT_EQ(keys(w), (std::vector<std::string>{"step", "exp_avg", "exp_avg_sq"}));
  EXPECT_EQ(w.find("step")->if_tensor()->tensor.scalar_type(), at::kFloat);
  EXPECT_EQ(w.find("step")->if_tensor()->tensor.item<float>(), 3.0f);
  const Dict& group = *(*sd->optim->find("param_groups")->if_list())[0].if_dict();
  EXPECT_EQ(keys(group), (std::vector<std::string>{"lr", "betas", "eps", "weight_decay", "amsgrad", "maximize",
                                                   "foreach", "capturable", "differentiable", "fused",
                                                   "decoupled_weight_decay", "params"}));
  EXPECT_TRUE(group.find("betas")->if_list()->is_tuple());
  EXPECT_EQ(*group.find("weight_decay")->if_double(), 0.05);

  // A checkpoint: deep copies, so the fresh model does not alias the trained one.
  auto msd = deep_copy(*sd->model);
  for (auto& e : *msd) e.value = Value(e.value.if_tensor()->tensor.clone());
  auto osd = deep_copy(*sd->optim);
  for (auto& e : *osd->find("state")->if_dict()) {
    for (auto& s : *e.value.if_dict()) s.value = Value(s.value.if_tensor()->tensor.clone());
  }

  auto fresh = make_net(42);
  torch::optim::AdamW fresh_opt(fresh->parameters(), torch::optim::AdamWOptions(0.5));
  Model fresh_model(nullptr, "Sequential");
  ASSERT_TRUE(libtorch::register_module(fresh_model, *fresh).ok());
  auto fresh_bound = libtorch::BoundOptimizer::bind(fresh_opt);
  ASSERT_TRUE(fresh_bound.ok());
  std::vector<Optimizer*> fresh_optims{&(*fresh_bound)->registry()};
  auto keys_out = set_state_dict(fresh_model, fresh_optims, *msd, *osd);
  ASSERT_TRUE(keys_out.ok()) << keys_out.error().message;
  ASSERT_TRUE((*fresh_bound)->apply().ok());
  EXPECT_EQ(static_cast<torch::optim::AdamWOptions&>(fresh_opt.param_groups()[0].options()).lr(), 1e-2);

  train(net, opt, 1, 7);
  train(fresh, fresh_opt, 1, 7);
  auto a = net->parameters();
  auto b = fresh->parameters();
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) EXPECT_TRUE(a[i].equal(b[i])) << "parameter " << i;
}

TEST(LibtorchAdapter, LazyStateIsMaterializedWithoutAStep) {
  auto net = make_net(0);
  torch::optim::SGD opt(net->parameters(), torch::optim::SGDOptions(0.1).momentum(0.9));
  Model model;
  ASSERT_TRUE(libtorch::register_module(model, *net).ok());
  auto bound = libtorch::BoundOptimizer::bind(opt);
  ASSERT_TRUE(bound.ok());
  std::vector<Optimizer*> optims{&(*bound)->registry()};
  auto before = net->parameters()[0].clone();
  auto osd = get_optimizer_state_dict(model, optims);
  ASSERT_TRUE(osd.ok()) << osd.error().message;
  const Dict& state = *(*osd)->find("state")->if_dict();
  ASSERT_EQ(state.size(), 4u);
  EXPECT_EQ(keys(*state.find("0.weight")->if_dict()), (std::vector<std::string>{"momentum_buffer"}));
  EXPECT_EQ(opt.state().size(), 4u);  // created in the libtorch optimizer itself
  EXPECT_TRUE(net->parameters()[0].equal(before));
}

}  // namespace
}  // namespace dsd
