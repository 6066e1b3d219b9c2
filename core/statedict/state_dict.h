// The state-dict functions of torch.distributed.checkpoint.state_dict, over dsd's Model and
// Optimizer registries.
//
// get_* return canonical-FQN-keyed state dicts whose tensors alias the registered tensors
// (no copy) unless cpu_offload or full_state_dict asks otherwise; set_* copy into the
// registered tensors in place after validating everything, so a failing call modifies
// nothing. With a communicator of more than one rank every function is collective, and an
// error on one rank fails the call on every rank with the same message.
#pragma once

#include <span>
#include <string>
#include <vector>

#include "core/base/result.h"
#include "core/statedict/model.h"
#include "core/statedict/optimizer.h"
#include "core/statedict/options.h"
#include "core/statedict/value.h"

namespace dsd {

// What nn.Module.load_state_dict returns: keys the model has that the state dict lacked
// (named as the wrapped module names them), and keys the state dict had that the model lacks.
struct IncompatibleKeys {
  std::vector<std::string> missing_keys;
  std::vector<std::string> unexpected_keys;
};

// `submodules` (deprecated, as in PyTorch): raw module paths whose entries alone are returned.
Result<DictPtr> get_model_state_dict(Model& model, const StateDictOptions& options = {},
                                     std::span<const std::string> submodules = {});

Result<IncompatibleKeys> set_model_state_dict(Model& model, const Dict& state_dict,
                                              const StateDictOptions& options = {});

Result<DictPtr> get_optimizer_state_dict(Model& model, std::span<Optimizer* const> optimizers,
                                         const StateDictOptions& options = {},
                                         std::span<const std::string> submodules = {});

Status set_optimizer_state_dict(Model& model, std::span<Optimizer* const> optimizers,
                                const Dict& optim_state_dict, const StateDictOptions& options = {});

struct ModelAndOptimStateDict {
  DictPtr model;
  DictPtr optim;
};

Result<ModelAndOptimStateDict> get_state_dict(Model& model, std::span<Optimizer* const> optimizers,
                                              const StateDictOptions& options = {},
                                              std::span<const std::string> submodules = {});

// The optimizers are loaded before the model; an empty model state dict means optimizer only.
Result<IncompatibleKeys> set_state_dict(Model& model, std::span<Optimizer* const> optimizers,
                                        const Dict& model_state_dict, const Dict& optim_state_dict,
                                        const StateDictOptions& options = {});

// Pure remapping between PyTorch's positional optimizer state dict (`optim.state_dict()`:
// state keyed by parameter id, groups listing ids) and the FQN form, given each parameter
// id's FQN in order (`names[pid]`).
Result<DictPtr> optim_state_dict_to_fqn(const Dict& positional, std::span<const std::string> names);
Result<DictPtr> optim_state_dict_to_positional(const Dict& fqn_form, std::span<const std::string> names);

// The flattened optimizer state dict (`state.<fqn>.<k>`, `param_groups.<fqn>.<k>`) of an
// FQN-form one.
Result<DictPtr> flatten_optim_state_dict(const Dict& optim_state_dict);

}  // namespace dsd
