// Optimizer: what a trainer registers so dsd can produce and load optimizer state dicts.
//
// Param groups hold hyperparameters (any Values, in order, without "params") and their
// parameters (tensors, matched to the model's parameters by identity). Per-parameter state
// is a Dict (e.g. {"step", "exp_avg", "exp_avg_sq"}, or nested dicts for Shampoo-like
// optimizers) whose tensors are referenced, not copied. The position of a parameter across
// all groups, in order, is PyTorch's parameter id ("pid").
//
// Containers are shared with the caller: setting a state dict loads into the registered
// Dicts (tensors copied in place, other values replaced), so a trainer that keeps references
// to its hyperparameter and state Dicts sees the loaded values there.
#pragma once

#include <functional>
#include <span>
#include <vector>

#include "core/base/result.h"
#include "core/statedict/model.h"
#include "core/statedict/value.h"

namespace dsd {

class Optimizer;

struct ParamGroup {
  DictPtr options;                  // hyperparameters, in order, without "params"
  std::vector<TensorValue> params;  // this group's parameters, in order
};

// Creates the state of parameters that have none yet (lazy optimizers), leaving no numerical
// trace: no step is taken, counters and moments start as a fresh optimizer's would. Called
// on the calling thread before get/set with the pids lacking state; registers state with
// Optimizer::set_state().
using MaterializeFn = std::function<Status(Optimizer& optim, std::span<const size_t> missing_pids)>;

class Optimizer {
 public:
  // `options` must not contain "params". Errors for a parameter already in another group.
  Status add_param_group(DictPtr options, std::vector<TensorValue> params);

  size_t num_params() const { return pid_loc_.size(); }
  const TensorValue& param(size_t pid) const;
  std::vector<ParamGroup>& groups() { return groups_; }
  const std::vector<ParamGroup>& groups() const { return groups_; }
  // The pid of a registered parameter, by identity; nullopt if not registered.
  std::optional<size_t> find_param(const TensorValue& t) const;
  // First pid of each group.
  size_t group_begin(size_t group) const { return group_begin_[group]; }

  // A parameter's state (null when it has none).
  const DictPtr& state(size_t pid) const { return state_[pid]; }
  Status set_state(size_t pid, DictPtr state);

  void set_materialize(MaterializeFn fn) { materialize_ = std::move(fn); }
  const MaterializeFn& materialize() const { return materialize_; }

 private:
  std::vector<ParamGroup> groups_;
  std::vector<std::pair<size_t, size_t>> pid_loc_;  // pid -> (group, index in group)
  std::vector<size_t> group_begin_;
  std::vector<DictPtr> state_;
  std::unordered_map<TensorIdentity, size_t, TensorIdentityHash> by_id_;
  MaterializeFn materialize_;
};

}  // namespace dsd
