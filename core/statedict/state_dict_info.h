// StateDictInfo (PyTorch's _StateDictInfo) and the internals shared by the model and
// optimizer state-dict functions (_verify_options, _verify_state_dict,
// _maybe_full_or_cpu_state_dict).
#pragma once

#include <span>
#include <string>
#include <vector>

#include "core/base/result.h"
#include "core/statedict/model.h"
#include "core/statedict/optimizer.h"
#include "core/statedict/options.h"
#include "core/statedict/state_dict.h"
#include "core/statedict/value.h"

namespace dsd {
class Communicator;
}

namespace dsd::detail {

struct StateDictInfo {
  StateDictOptions options;
  std::vector<std::string> submodule_prefixes;  // canonical, each ending in "."
  bool handle_model = true;
  bool handle_optim = false;
  Communicator* comm = nullptr;  // null or size 1: a single process
  int rank = 0;
  int world = 1;
};

Result<StateDictInfo> verify_options(Model& model, size_t num_optimizers, bool optim_only,
                            std::span<const std::string> submodules, const StateDictOptions& options);

// PyTorch's _verify_state_dict: the empty-state-dict errors and the _flat_param check.
Status verify_state_dict(const Dict* model_state_dict, const Dict* optim_state_dict, const StateDictInfo& info);

// Get path: gathers distributed tensors when full_state_dict, moves to CPU when cpu_offload,
// and empties the result on ranks other than 0 when both are set and there is more than one
// rank.
Result<DictPtr> maybe_full_or_cpu_state_dict(DictPtr state_dict, const StateDictInfo& info);

// Python's type(value) as PyTorch's messages print it, e.g. "<class 'str'>".
std::string python_type_name(const Value& v);
// "torch.Size([3, 4])".
std::string torch_size_str(c10::IntArrayRef sizes);

// Collective agreement on a local status when there is more than one rank.
Status agree_status(const StateDictInfo& info, Status local);

// The halves of get/set (model_state_dict.cpp, optim_state_dict.cpp).
Result<DictPtr> build_model_state_dict(Model& model, const StateDictInfo& info);
Result<IncompatibleKeys> load_model_state_dict(Model& model, const Dict& state_dict, const StateDictInfo& info);
Result<DictPtr> build_optim_state_dict(Model& model, std::span<Optimizer* const> optimizers, const StateDictInfo& info);
Status load_optim_state_dict(Model& model, std::span<Optimizer* const> optimizers, const Dict& osd,
                             const StateDictInfo& info);

}  // namespace dsd::detail
