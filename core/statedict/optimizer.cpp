#include "core/statedict/optimizer.h"

#include "core/base/make_error.h"

namespace dsd {

Status Optimizer::add_param_group(DictPtr options, std::vector<TensorValue> params) {
  if (options == nullptr) options = Dict::make();
  if (options->contains("params")) {
    return Error(Code::kInvalidArgument,
                 "param group options must not contain 'params' (the parameters are given separately)");
  }
  std::vector<TensorIdentity> ids;
  ids.reserve(params.size());
  for (const TensorValue& p : params) {
    if (!p.tensor.defined()) return Error(Code::kInvalidArgument, "a param group has an undefined tensor");
    ids.push_back(TensorIdentity::of(p));
    if (by_id_.contains(ids.back())) {
      return Error(Code::kInvalidArgument, "some parameters appear in more than one parameter group");
    }
  }
  group_begin_.push_back(pid_loc_.size());
  for (size_t i = 0; i < params.size(); ++i) {
    by_id_.emplace(std::move(ids[i]), pid_loc_.size());
    pid_loc_.emplace_back(groups_.size(), i);
  }
  state_.resize(pid_loc_.size());
  groups_.push_back(ParamGroup{std::move(options), std::move(params)});
  return ok();
}

const TensorValue& Optimizer::param(size_t pid) const {
  const auto [g, i] = pid_loc_[pid];
  return groups_[g].params[i];
}

std::optional<size_t> Optimizer::find_param(const TensorValue& t) const {
  auto it = by_id_.find(TensorIdentity::of(t));
  if (it == by_id_.end()) return std::nullopt;
  return it->second;
}

Status Optimizer::set_state(size_t pid, DictPtr state) {
  if (pid >= state_.size()) {
    return make_error(Code::kInvalidArgument, "parameter id {} is out of range ({} parameters)", pid,
                      state_.size());
  }
  state_[pid] = std::move(state);
  return ok();
}

}  // namespace dsd
