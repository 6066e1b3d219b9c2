// The public state-dict functions (state_dict.h), as PyTorch's: each verifies its options,
// runs the model and optimizer halves (model_state_dict.cpp, optim_state_dict.cpp) and
// checks the result.
#include "core/statedict/state_dict.h"

#include <string>

#include "core/dist/comm.h"
#include "core/statedict/state_dict_info.h"

namespace dsd {

Result<DictPtr> get_model_state_dict(Model& model, const StateDictOptions& options,
                                     std::span<const std::string> submodules) {
  detail::StateDictInfo info = TRY(detail::verify_options(model, 0, false, submodules, options));
  DictPtr sd = TRY(detail::build_model_state_dict(model, info));
  TRY(detail::verify_state_dict(sd.get(), nullptr, info));
  return sd;
}

Result<IncompatibleKeys> set_model_state_dict(Model& model, const Dict& state_dict,
                                              const StateDictOptions& options) {
  detail::StateDictInfo info = TRY(detail::verify_options(model, 0, false, {}, options));
  TRY(detail::verify_state_dict(&state_dict, nullptr, info));
  return detail::load_model_state_dict(model, state_dict, info);
}

Result<DictPtr> get_optimizer_state_dict(Model& model, std::span<Optimizer* const> optimizers,
                                         const StateDictOptions& options,
                                         std::span<const std::string> submodules) {
  detail::StateDictInfo info = TRY(detail::verify_options(model, optimizers.size(), true, submodules, options));
  DictPtr osd = TRY(detail::build_optim_state_dict(model, optimizers, info));
  TRY(detail::verify_state_dict(nullptr, osd.get(), info));
  return osd;
}

Status set_optimizer_state_dict(Model& model, std::span<Optimizer* const> optimizers,
                                const Dict& optim_state_dict, const StateDictOptions& options) {
  detail::StateDictInfo info = TRY(detail::verify_options(model, optimizers.size(), true, {}, options));
  TRY(detail::verify_state_dict(nullptr, &optim_state_dict, info));
  return detail::load_optim_state_dict(model, optimizers, optim_state_dict, info);
}

Result<ModelAndOptimStateDict> get_state_dict(Model& model, std::span<Optimizer* const> optimizers,
                                              const StateDictOptions& options,
                                              std::span<const std::string> submodules) {
  detail::StateDictInfo info = TRY(detail::verify_options(model, optimizers.size(), false, submodules, options));
  ModelAndOptimStateDict out;
  out.model = TRY(detail::build_model_state_dict(model, info));
  out.optim = TRY(detail::build_optim_state_dict(model, optimizers, info));
  TRY(detail::verify_state_dict(out.model.get(), out.optim.get(), info));
  return out;
}

Result<IncompatibleKeys> set_state_dict(Model& model, std::span<Optimizer* const> optimizers,
                                        const Dict& model_state_dict, const Dict& optim_state_dict,
                                        const StateDictOptions& options) {
  // An empty model state dict means "optimizer only". Under broadcast_from_rank0 the other
  // ranks pass empty dicts whatever rank 0 does, so rank 0 decides for all (PyTorch decides
  // per rank, and its ranks then disagree on whether to enter the model's broadcast).
  bool optim_only = model_state_dict.empty();
  if (options.broadcast_from_rank0 && model.comm() != nullptr && model.comm()->size() > 1) {
    std::string flag = TRY(broadcast_bytes(*model.comm(), optim_only ? "1" : "0", 0));
    optim_only = flag == "1";
  }
  detail::StateDictInfo info = TRY(detail::verify_options(model, optimizers.size(), optim_only, {}, options));
  TRY(detail::verify_state_dict(&model_state_dict, &optim_state_dict, info));
  TRY(detail::load_optim_state_dict(model, optimizers, optim_state_dict, info));
  return detail::load_model_state_dict(model, model_state_dict, info);
}

}  // namespace dsd
