// The halves of get/set_optimizer_state_dict (PyTorch's _get_optim_state_dict,
// _unflatten_optim_state_dict, _split_optim_state_dict, _load_optim_state_dict).
// optim_state_dict_form.cpp holds the flattening and the positional <-> FQN remapping.
//
// Where PyTorch has known bugs, dsd does better (and tests it):
// - #192202: saved state of frozen parameters is loaded, not dropped;
// - #192224: a flattened state dict missing a parameter's state gives the strict
//   missing-state error, not an opaque TypeError;
// - #192225: stateless optimizers (SGD without momentum) get no spurious `{}` state entries;
// - #164929 / #140898: no dummy optimizer step; lazily created state comes from the
//   trainer's materialize callback, whatever gradients exist;
// - an optimizer parameter that is not in the model is a clear error, not a KeyError;
// - parameters of one group saved with different hyperparameters are detected in every
//   parameter, not only the first.
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <map>
#include <unordered_map>

#include "core/base/make_error.h"
#include "core/base/strings.h"
#include "core/base/torch_call.h"
#include "core/dist/layout.h"
#include "core/statedict/state_dict_info.h"
#include "core/statedict/full_sharded.h"
#include "core/statedict/optim_state_dict_form.h"
#include "core/statedict/skeleton.h"
#include "core/dist/comm.h"

#include <ATen/ops/empty.h>
#include "core/statedict/state_dict.h"

namespace dsd {
namespace {

using namespace optim_form;  // NOLINT: the form of an optimizer state dict


// pid -> index into model.parameters(), for every parameter of an optimizer.
Result<std::vector<size_t>> model_params_of(Model& model, const Optimizer& optim) {
  TRY(model.parameters());
  std::vector<size_t> out(optim.num_params());
  for (size_t pid = 0; pid < optim.num_params(); ++pid) {
    auto idx = model.find_parameter(optim.param(pid));
    if (!idx) {
      const at::Tensor& t = optim.param(pid).tensor;
      return make_error(Code::kNotFound,
                        "optimizer parameter {} (shape {}, {}) is not a parameter of the model; "
                        "register every parameter the optimizer updates with the model",
                        pid, shape_str(t.sizes()), c10::toString(t.scalar_type()));
    }
    out[pid] = *idx;
  }
  return out;
}

Status materialize(Model& model, Optimizer& optim, const std::vector<size_t>& mp) {
  if (!optim.materialize()) return ok();
  const auto& params = *TRY(model.parameters());
  std::vector<size_t> missing;
  for (size_t pid = 0; pid < optim.num_params(); ++pid) {
    if (params[mp[pid]].requires_grad && optim.state(pid) == nullptr) missing.push_back(pid);
  }
  if (missing.empty()) return ok();
  Status s = optim.materialize()(optim, missing);
  if (!s.ok()) {
    return make_error(Code::kCallback, "the optimizer's materialize callback failed: {}", s.error().message);
  }
  return ok();
}

// One optimizer's state dict in FQN form.
Result<DictPtr> fqn_form(Model& model, Optimizer& optim, const std::vector<size_t>& mp) {
  const auto& params = *TRY(model.parameters());
  auto state = Dict::make();
  for (size_t pid = 0; pid < optim.num_params(); ++pid) {
    if (const DictPtr& st = optim.state(pid)) state->set(params[mp[pid]].fqns.front(), shallow_copy(*st));
  }
  auto groups = List::make();
  for (size_t g = 0; g < optim.groups().size(); ++g) {
    const ParamGroup& group = optim.groups()[g];
    DictPtr out = deep_copy(*group.options);
    auto names = List::make();
    for (size_t i = 0; i < group.params.size(); ++i) {
      names->push_back(Value(params[mp[optim.group_begin(g) + i]].fqns.front()));
    }
    out->set(std::string(kParams), names);
    groups->push_back(out);
  }
  auto osd = Dict::make();
  osd->append_unique(std::string(kState), state);
  osd->append_unique(std::string(kParamGroups), groups);
  return osd;
}

// What a load assigns, aligned with the current optimizer: per pid the state to load (null:
// none), per group the hyperparameters to load (null: keep the current ones).
struct Loaded {
  std::vector<DictPtr> state;
  std::vector<DictPtr> groups;
};

DictPtr group_options(const Dict& group) {
  auto out = Dict::make();
  for (const auto& e : group) {
    if (e.key != kParams) out->append_unique(e.key, e.value);
  }
  return out;
}

std::string missing_state_message(const std::string& fqn) {
  return fmt::format(
      "Missing optimizer state for parameter '{}' in checkpoint. The parameter requires gradients "
      "but has no saved optimizer state. To load anyway, use StateDictOptions(strict=False).",
      fqn);
}

bool all_int_keys(const Dict& d) {
  if (d.int_keys()) return true;
  for (const auto& e : d) {
    if (!is_int_key(e.key)) return false;
  }
  return true;  // vacuously for an empty dict, as PyTorch's all()
}

// PyTorch's raw optim.state_dict() form: state keyed by ids, groups matched by position.
Result<Loaded> split_positional(const Optimizer& optim, const Dict& state, const List& groups) {
  if (groups.size() != optim.groups().size()) {
    return Error(Code::kInvalidArgument, "loaded state dict has a different number of parameter groups");
  }
  Loaded out{std::vector<DictPtr>(optim.num_params()), std::vector<DictPtr>(optim.groups().size())};
  std::unordered_map<std::string, size_t> id_to_pid;
  for (size_t g = 0; g < groups.size(); ++g) {
    const Dict& saved = *groups[g].if_dict();
    const List& ids = *saved.find(kParams)->if_list();
    if (ids.size() != optim.groups()[g].params.size()) {
      return Error(Code::kInvalidArgument,
                   "loaded state dict contains a parameter group that doesn't match the size of "
                   "optimizer's group");
    }
    for (size_t i = 0; i < ids.size(); ++i) {
      std::string key;
      if (const int64_t* id = ids[i].if_int()) key = std::to_string(*id);
      else if (const std::string* s = ids[i].if_string()) key = *s;
      else continue;
      id_to_pid.emplace(std::move(key), optim.group_begin(g) + i);
    }
    out.groups[g] = group_options(saved);
  }
  for (const auto& e : state) {
    auto it = id_to_pid.find(e.key);
    if (it == id_to_pid.end()) continue;  // PyTorch keeps such entries unattached: they do nothing
    const Dict* st = e.value.if_dict();
    if (st == nullptr) {
      return make_error_at(Code::kInvalidArgument, e.key, "state of parameter {} is not a dict", e.key);
    }
    out.state[it->second] = shallow_copy(*st);
  }
  return out;
}

Result<Loaded> split_fqn(Model& model, const Optimizer& optim, const std::vector<size_t>& mp,
                         const Dict& state, const List& groups, bool strict) {
  const auto& params = *TRY(model.parameters());
  Loaded out{std::vector<DictPtr>(optim.num_params()), std::vector<DictPtr>(optim.groups().size())};
  // fqn -> loaded groups that list it
  std::unordered_map<std::string, std::vector<size_t>> groups_of;
  for (size_t lg = 0; lg < groups.size(); ++lg) {
    for (const Value& p : groups[lg].if_dict()->find(kParams)->if_list()->items()) {
      if (const std::string* s = p.if_string()) groups_of[*s].push_back(lg);
    }
  }
  std::map<size_t, size_t> mapping;  // loaded group -> current group
  for (size_t g = 0; g < optim.groups().size(); ++g) {
    const ParamGroup& group = optim.groups()[g];
    for (size_t i = 0; i < group.params.size(); ++i) {
      const size_t pid = optim.group_begin(g) + i;
      const Model::ParamFqns& p = params[mp[pid]];
      for (const std::string& fqn : p.fqns) {
        auto listed = groups_of.find(fqn);
        if (p.fqns.size() > 1 && listed == groups_of.end()) continue;  // the unused alias of a tied weight
        if (const Value* st = state.find(fqn)) {
          const Dict* d = st->if_dict();
          if (d == nullptr) {
            return make_error_at(Code::kInvalidArgument, fqn, "optimizer state of '{}' is not a dict", fqn);
          }
          out.state[pid] = shallow_copy(*d);
        } else if (p.requires_grad && strict && optim.state(pid) != nullptr) {
          return Error(Code::kNotFound, missing_state_message(fqn), fqn);
        }
        if (listed != groups_of.end()) {
          for (size_t lg : listed->second) mapping[lg] = g;
        }
      }
    }
    if (group.params.empty()) {
      std::vector<size_t> empty;
      for (size_t lg = 0; lg < groups.size(); ++lg) {
        if (groups[lg].if_dict()->find(kParams)->if_list()->size() == 0) empty.push_back(lg);
      }
      if (empty.size() != 1) {
        return Error(Code::kInvalidArgument,
                     "There are param groups that have zero parameters. In such a case, DSD only "
                     "support exactly one param group with zero parameters.But the loaded "
                     "state_dict has zero or more than one param groups that have zero parameters.");
      }
      if (groups.size() != optim.groups().size()) {
        return Error(Code::kInvalidArgument,
                     "When there is a parameter group that has zero parameters, multiple optimizers "
                     "are not supported.");
      }
      mapping[empty.front()] = g;
    }
  }
  for (const auto& [lg, g] : mapping) {
    const Dict& saved = *groups[lg].if_dict();
    if (out.groups[g] == nullptr) out.groups[g] = Dict::make();
    for (const auto& e : saved) {
      if (e.key != kParams) out.groups[g]->set(e.key, e.value);
    }
  }
  return out;
}

// The keys under `prefix.` of a flat dict, nested by their dots (PyTorch's
// _reconstruct_nested_dict). `live` (may be null) is the optimizer's current value there, whose
// int-keyed dicts stay int-keyed.
DictPtr reconstruct(const Dict& flat, const std::string& prefix, const Value* live) {
  auto out = Dict::make();
  const std::string head = prefix + ".";
  for (const auto& e : flat) {
    if (!e.key.starts_with(head)) continue;
    std::string_view rest = std::string_view(e.key).substr(head.size());
    Dict* cur = out.get();
    const Value* cur_live = live;
    while (true) {
      const size_t dot = rest.find('.');
      const std::string part(rest.substr(0, dot));
      const Dict* live_dict = cur_live != nullptr ? cur_live->if_dict() : nullptr;
      if (live_dict != nullptr && live_dict->int_keys() && is_int_key(part)) cur->set_int_keys(true);
      cur_live = live_dict != nullptr ? live_dict->find(part) : nullptr;
      if (dot == std::string_view::npos) {
        cur->set(part, e.value);
        break;
      }
      Value* next = cur->find(part);
      if (next == nullptr || !next->is_dict()) {
        cur->set(part, Dict::make());
        next = cur->find(part);
      }
      cur = next->if_dict();
      rest.remove_prefix(dot + 1);
    }
  }
  return out;
}

Result<Loaded> unflatten(Model& model, const Optimizer& optim, const std::vector<size_t>& mp,
                         const Dict& flat, bool strict) {
  const auto& params = *TRY(model.parameters());
  Loaded out{std::vector<DictPtr>(optim.num_params()), std::vector<DictPtr>(optim.groups().size())};
  for (size_t g = 0; g < optim.groups().size(); ++g) {
    const ParamGroup& group = optim.groups()[g];
    std::vector<std::string> accepted;
    for (size_t i = 0; i < group.params.size(); ++i) {
      const size_t pid = optim.group_begin(g) + i;
      const Model::ParamFqns& p = params[mp[pid]];
      for (const std::string& fqn : p.fqns) {
        const std::string pg_prefix = fmt::format("{}.{}.", kParamGroups, fqn);
        if (p.fqns.size() > 1) {
          bool listed = false;
          for (const auto& e : flat) {
            if (e.key.starts_with(pg_prefix)) {
              listed = true;
              break;
            }
          }
          if (!listed) continue;
        }
        accepted.push_back(fqn);
        const std::string st_prefix = fmt::format("{}.{}", kState, fqn);
        const DictPtr& live = optim.state(pid);
        DictPtr st = Dict::make();
        if (live != nullptr && !live->empty()) {
          for (const auto& le : *live) {
            const std::string key = st_prefix + "." + le.key;
            if (const Value* v = flat.find(key)) {
              st->append_unique(le.key, *v);
              continue;
            }
            DictPtr nested = reconstruct(flat, key, &le.value);
            if (!nested->empty()) {
              st->append_unique(le.key, nested);
            } else if (strict && p.requires_grad) {
              return Error(Code::kNotFound,
                           missing_state_message(fqn) + fmt::format(" ('{}' is absent)", key), fqn);
            }
          }
        } else {
          st = reconstruct(flat, st_prefix, nullptr);
        }
        if (!st->empty()) out.state[pid] = st;
      }
    }
    if (accepted.empty()) continue;  // an empty group keeps its hyperparameters
    // Hyperparameters from the first parameter's keys, checked against every other parameter.
    auto options = Dict::make();
    const std::string first_prefix = fmt::format("{}.{}.", kParamGroups, accepted.front());
    for (const auto& e : flat) {
      if (e.key.starts_with(first_prefix)) options->set(e.key.substr(first_prefix.size()), e.value);
    }
    for (size_t a = 1; a < accepted.size(); ++a) {
      for (const auto& e : *options) {
        const std::string key = fmt::format("{}.{}.{}", kParamGroups, accepted[a], e.key);
        const Value* other = flat.find(key);
        if (other != nullptr && !deep_equal(*other, e.value)) {
          return make_error_at(Code::kInvalidArgument, key,
                               "All the parameters in the same parameter group should have the same "
                               "saved param_group value. But {}.{} differs from {}.{}.",
                               accepted[a], e.key, accepted.front(), e.key);
        }
      }
    }
    if (!options->empty()) out.groups[g] = options;
  }
  return out;
}

struct Replace {
  Dict* target;
  std::string key;
  Value value;
};

struct OptimLoadPlan {
  Loaded loaded;
  std::vector<CopyJob> copies;                      // in place into registered tensors
  std::vector<Replace> replaces;                    // other values of registered state
  std::vector<std::pair<size_t, DictPtr>> installs; // parameters without registered state
  std::vector<size_t> cleared;                      // parameters whose state a load drops
};

// Checks loading state tensor `src` into registered `dst`; the source of the copy.
Result<CopySource> check_tensor_load(const std::string& what, const TensorValue& dst, const TensorValue& src) {
  const auto dst_shape = dst.is_dist() ? c10::IntArrayRef(dst.layout->global_shape()) : dst.tensor.sizes();
  const auto src_shape = src.is_dist() ? c10::IntArrayRef(src.layout->global_shape()) : src.tensor.sizes();
  if (dst_shape != src_shape) {
    return make_error_at(Code::kShapeMismatch, what, "size mismatch for {}: loading shape {} into {}", what,
                         detail::torch_size_str(src_shape), detail::torch_size_str(dst_shape));
  }
  if (dst.tensor.scalar_type() != src.tensor.scalar_type()) {
    return make_error_at(Code::kDtypeMismatch, what, "dtype mismatch for {}: loading torch.{} into torch.{}",
                         what, c10::toString(src.tensor.scalar_type()), c10::toString(dst.tensor.scalar_type()));
  }
  if (dst.read_only) {
    return make_error_at(Code::kReadOnly, what, "{} was imported read-only; dsd does not write into it.", what);
  }
  return copy_source(dst, src, what);
}

// A loaded value to be stored as it is (no registered tensor to copy into). Tensors that are
// full moments of a sharded parameter keep only this rank's shard, like the parameter; under
// broadcast_from_rank0 (placeholders), tensors get memory of their own and are filled by the
// stream.
Result<Value> own_value(const Value& v, const TensorValue& param, bool placeholders, const std::string& what,
                        std::vector<CopyJob>& copies) {
  if (const Dict* d = v.if_dict()) {
    auto out = Dict::make();
    out->set_int_keys(d->int_keys());
    for (const auto& e : *d) out->append_unique(e.key, TRY(own_value(e.value, param, placeholders, what + "." + e.key, copies)));
    return Value(out);
  }
  const TensorValue* t = v.if_tensor();
  if (t == nullptr) return v;
  std::optional<Chunk> box;
  if (!t->is_dist() && param.is_dist() && t->tensor.sizes() == c10::IntArrayRef(param.layout->global_shape())) {
    CopySource src = TRY(copy_source(param, *t, what));
    box = src.box;
  }
  if (!box && !placeholders) return v;  // aliased, as PyTorch's load_state_dict does
  CopySource src{t->tensor, box};
  const at::Tensor shape = src.view();
  const c10::Device device = placeholders && !param.tensor.is_meta() ? param.tensor.device() : c10::Device(c10::DeviceType::CPU);
  at::Tensor mine = at::empty(shape.sizes(), at::TensorOptions().dtype(shape.scalar_type()).device(
                                                  placeholders ? device : t->tensor.device()));
  copies.push_back(CopyJob{mine, std::move(src), what});
  return Value(TensorValue{mine, box ? param.layout : nullptr, false});
}

// Plans loading `loaded` into registered state `target`, recursing into nested dicts that
// exist on both sides.
Status plan_dict_load(Dict& target, const Dict& loaded, const std::string& what, const TensorValue& param,
                      bool placeholders, OptimLoadPlan& plan) {
  for (const auto& e : loaded) {
    const std::string name = what + "." + e.key;
    Value* cur = target.find(e.key);
    const TensorValue* src = e.value.if_tensor();
    if (cur != nullptr && cur->if_tensor() != nullptr && src != nullptr) {
      CopySource source = TRY(check_tensor_load(name, *cur->if_tensor(), *src));
      plan.copies.push_back(CopyJob{cur->if_tensor()->tensor, std::move(source), name});
      continue;
    }
    if (cur != nullptr && cur->if_dict() != nullptr && e.value.if_dict() != nullptr) {
      TRY(plan_dict_load(*cur->if_dict(), *e.value.if_dict(), name, param, placeholders, plan));
      continue;
    }
    plan.replaces.push_back({&target, e.key, TRY(own_value(e.value, param, placeholders, name, plan.copies))});
  }
  return ok();
}

Result<OptimLoadPlan> plan_optim_load(Model& model, const Optimizer& optim, const std::vector<size_t>& mp,
                                      const Dict& osd, const detail::StateDictInfo& info, bool placeholders) {
  const auto& params = *TRY(model.parameters());
  OptimLoadPlan plan;
  plan.loaded = Loaded{std::vector<DictPtr>(optim.num_params()), std::vector<DictPtr>(optim.groups().size())};
  if (osd.empty()) return plan;
  if (const Dict* state = get_dict(osd, kState)) {
    const List* groups = TRY(param_groups_of(osd));
    if (all_int_keys(*state)) {
      plan.loaded = TRY(split_positional(optim, *state, *groups));
    } else {
      plan.loaded = TRY(split_fqn(model, optim, mp, *state, *groups, info.options.strict));
    }
  } else if (osd.contains(kState)) {
    return Error(Code::kInvalidArgument, "the optimizer state dict's 'state' is not a dict");
  } else {
    plan.loaded = TRY(unflatten(model, optim, mp, osd, info.options.strict));
  }
  for (size_t pid = 0; pid < optim.num_params(); ++pid) {
    const DictPtr& st = plan.loaded.state[pid];
    if (st == nullptr) {
      if (optim.state(pid) != nullptr) plan.cleared.push_back(pid);
      continue;
    }
    const std::string what = fmt::format("optimizer state of '{}'", params[mp[pid]].fqns.front());
    if (optim.state(pid) != nullptr) {
      TRY(plan_dict_load(*optim.state(pid), *st, what, optim.param(pid), placeholders, plan));
    } else {
      Value installed = TRY(own_value(Value(st), optim.param(pid), placeholders, what, plan.copies));
      plan.installs.emplace_back(pid, installed.dict_ptr());
    }
  }
  return plan;
}

Status apply_optim_load(Optimizer& optim, OptimLoadPlan& plan) {
  for (size_t pid : plan.cleared) TRY(optim.set_state(pid, nullptr));
  for (Replace& r : plan.replaces) r.target->set(r.key, std::move(r.value));
  for (size_t pid = 0; pid < optim.num_params(); ++pid) {
    // Keys the registered state has but the loaded one lacks are dropped: a load replaces an
    // optimizer's state wholesale.
    const DictPtr& st = plan.loaded.state[pid];
    if (st == nullptr || optim.state(pid) == nullptr) continue;
    Dict& cur = *optim.state(pid);
    for (size_t i = cur.size(); i-- > 0;) {
      if (!st->contains(cur.key_at(i))) cur.erase_at(i);
    }
  }
  for (auto& [pid, state] : plan.installs) TRY(optim.set_state(pid, state));
  for (size_t g = 0; g < optim.groups().size(); ++g) {
    const DictPtr& loaded = plan.loaded.groups[g];
    if (loaded == nullptr) continue;
    Dict& options = *optim.groups()[g].options;
    // The loaded group's keys in its order, then the current keys it lacks, in the same Dict
    // object so trainers holding it see the change.
    std::vector<Dict::Entry> keep;
    for (const auto& e : options) {
      if (!loaded->contains(e.key)) keep.push_back(e);
    }
    options.clear();
    for (const auto& e : *loaded) options.append_unique(e.key, e.value);
    for (auto& e : keep) options.append_unique(std::move(e.key), std::move(e.value));
  }
  return ok();
}

}  // namespace

namespace detail {

Result<DictPtr> build_optim_state_dict(Model& model, std::span<Optimizer* const> optimizers, const StateDictInfo& info) {
  if (!info.handle_optim) return Dict::make();
  auto state = Dict::make();
  auto groups = List::make();
  for (Optimizer* optim : optimizers) {
    if (optim == nullptr) return Error(Code::kInvalidArgument, "an optimizer is NULL");
    std::vector<size_t> mp = TRY(model_params_of(model, *optim));
    TRY(materialize(model, *optim, mp));
    DictPtr osd = TRY(fqn_form(model, *optim, mp));
    for (const auto& e : *osd->find(kState)->if_dict()) state->set(e.key, e.value);
    for (const Value& g : osd->find(kParamGroups)->if_list()->items()) groups->push_back(g);
  }
  DictPtr osd = Dict::make();
  osd->append_unique(std::string(kState), state);
  osd->append_unique(std::string(kParamGroups), groups);
  if (info.options.flatten_optimizer_state_dict) osd = TRY(flatten_optim_state_dict(*osd));
  return maybe_full_or_cpu_state_dict(std::move(osd), info);
}

Status load_optim_state_dict(Model& model, std::span<Optimizer* const> optimizers, const Dict& osd,
                             const StateDictInfo& info) {
  if (!info.handle_optim) return ok();
  const bool broadcast = info.options.broadcast_from_rank0 && info.comm != nullptr;
  // Under broadcast_from_rank0 every rank plans against rank 0's skeleton, whose tensors are
  // placeholders filled by the stream.
  RankZeroSkeleton skeleton;
  if (broadcast) skeleton = TRY(broadcast_skeleton(*info.comm, osd));
  const Dict& effective = broadcast ? *skeleton.root : osd;
  // Plan every optimizer, agree, then copy: one stream serves them all.
  std::vector<OptimLoadPlan> plans;
  Status planned = [&]() -> Status {
    for (Optimizer* optim : optimizers) {
      if (optim == nullptr) return Error(Code::kInvalidArgument, "an optimizer is NULL");
      std::vector<size_t> mp = TRY(model_params_of(model, *optim));
      TRY(materialize(model, *optim, mp));
      plans.push_back(TRY(plan_optim_load(model, *optim, mp, effective, info, broadcast)));
    }
    return ok();
  }();
  TRY(agree_status(info, std::move(planned)));
  std::vector<CopyJob> copies;
  for (OptimLoadPlan& p : plans) {
    for (CopyJob& j : p.copies) copies.push_back(std::move(j));
  }
  if (broadcast) {
    TRY(broadcast_copies(*info.comm, skeleton.rank0_tensors, skeleton.placeholders, copies,
                         info.options.bucket_bytes));
  } else {
    TRY(run_copies(copies));
  }
  for (size_t i = 0; i < plans.size(); ++i) TRY(apply_optim_load(*optimizers[i], plans[i]));
  return ok();
}

}  // namespace detail

}  // namespace dsd
