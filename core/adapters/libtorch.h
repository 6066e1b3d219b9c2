// Adapters for C++ users of libtorch's frontend: register a torch::nn::Module and a
// torch::optim optimizer with dsd, under the names Python PyTorch uses, so the state dicts a
// C++ trainer produces equal what the same model and optimizer produce in Python
// ("0.weight"; "exp_avg", "exp_avg_sq", "step" as a float32 scalar tensor, "momentum_buffer";
// hyperparameters "lr", "betas" (a tuple), "weight_decay"... with Python's defaults for
// options libtorch lacks, such as "maximize" or "foreach").
//
// This header includes libtorch's frontend headers; only C++ programs that use them include it.
#pragma once

#include <torch/nn/module.h>
#include <torch/optim/optimizer.h>

#include <memory>

#include "core/base/result.h"
#include "core/statedict/model.h"
#include "core/statedict/optimizer.h"

namespace dsd::libtorch {

// Registers every parameter and buffer of `module` in state-dict order (each module's own
// parameters, then its buffers, then its children, as nn.Module.state_dict() orders them).
// Tensors are referenced (detached views of the same memory), so loads write into the module.
Status register_module(Model& model, torch::nn::Module& module);

// A libtorch optimizer (Adam, AdamW, SGD, Adagrad, RMSprop) mirrored as a dsd Optimizer.
// Moments are referenced; `step` counters and hyperparameters are copies, written back into
// the libtorch optimizer by apply() after a set. Lazily created state is materialized as a
// fresh libtorch optimizer would create it on its first step (zeros, step 0), without a step.
class BoundOptimizer {
 public:
  static Result<std::unique_ptr<BoundOptimizer>> bind(torch::optim::Optimizer& optimizer);

  Optimizer& registry() { return registry_; }
  // Writes hyperparameters and step counters loaded into registry() back into the optimizer.
  Status apply();

  enum class Kind { kAdam, kAdamW, kSgd, kAdagrad, kRmsprop };

 private:
  BoundOptimizer(torch::optim::Optimizer& optimizer, Kind kind) : optimizer_(optimizer), kind_(kind) {}
  Status register_state(size_t pid);
  Status materialize(std::span<const size_t> missing);

  torch::optim::Optimizer& optimizer_;
  Kind kind_;
  Optimizer registry_;
  std::vector<at::Tensor> params_;  // by pid, the optimizer's own tensors (state map keys)
};

}  // namespace dsd::libtorch
