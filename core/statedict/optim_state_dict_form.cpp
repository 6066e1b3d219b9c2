#include "core/statedict/optim_state_dict_form.h"

#include <fmt/format.h>

#include <string>

#include "core/base/make_error.h"
#include "core/statedict/state_dict.h"
#include "core/statedict/state_dict_info.h"

namespace dsd {
namespace optim_form {

const Dict* get_dict(const Dict& d, std::string_view key) {
  const Value* v = d.find(key);
  return v != nullptr ? v->if_dict() : nullptr;
}

Result<const List*> param_groups_of(const Dict& osd) {
  const Value* v = osd.find(kParamGroups);
  const List* l = v != nullptr ? v->if_list() : nullptr;
  if (l == nullptr) {
    return Error(Code::kInvalidArgument, "the optimizer state dict has no 'param_groups' list");
  }
  for (const Value& g : l->items()) {
    const Dict* gd = g.if_dict();
    if (gd == nullptr) return Error(Code::kInvalidArgument, "an entry of 'param_groups' is not a dict");
    const Value* p = gd->find(kParams);
    if (p == nullptr || p->if_list() == nullptr) {
      return Error(Code::kInvalidArgument, "a param group of the state dict has no 'params' list");
    }
  }
  return l;
}

DictPtr shallow_copy(const Dict& d) {
  auto out = Dict::make();
  out->reserve(d.size());
  out->set_int_keys(d.int_keys());
  for (const auto& e : d) out->append_unique(e.key, e.value);
  return out;
}

}  // namespace optim_form

namespace {

using namespace optim_form;  // NOLINT: the form of an optimizer state dict

Status flatten_nested(const Dict& d, const std::string& prefix, Dict& out) {
  for (const auto& e : d) {
    const std::string key = prefix + "." + e.key;
    if (const Dict* nested = e.value.if_dict()) {
      TRY(flatten_nested(*nested, key, out));
      continue;
    }
    const Kind k = e.value.kind();
    if (k != Kind::kTensor && k != Kind::kInt && k != Kind::kDouble && k != Kind::kBool) {
      return make_error_at(Code::kUnsupported, key,
                           "Flattening optimizer state_dict only supports tensor, int, float, dict "
                           "states now. Type is {}.",
                           detail::python_type_name(e.value));
    }
    out.set(key, e.value);
  }
  return ok();
}

}  // namespace

Result<DictPtr> flatten_optim_state_dict(const Dict& osd) {
  auto out = Dict::make();
  const Dict* state = get_dict(osd, kState);
  if (state == nullptr) return Error(Code::kInvalidArgument, "the optimizer state dict has no 'state' dict");
  const List* groups = TRY(param_groups_of(osd));
  for (const auto& e : *state) {
    const Dict* st = e.value.if_dict();
    if (st == nullptr) {
      return make_error_at(Code::kInvalidArgument, e.key, "optimizer state of '{}' is not a dict", e.key);
    }
    TRY(flatten_nested(*st, fmt::format("{}.{}", kState, e.key), *out));
  }
  for (const Value& g : groups->items()) {
    const Dict& group = *g.if_dict();
    for (const Value& p : group.find(kParams)->if_list()->items()) {
      const std::string* fqn = p.if_string();
      if (fqn == nullptr) {
        return Error(Code::kInvalidArgument, "flattening needs FQNs in 'params', not parameter ids");
      }
      for (const auto& e : group) {
        if (e.key != kParams) out->set(fmt::format("{}.{}.{}", kParamGroups, *fqn, e.key), e.value);
      }
    }
  }
  return out;
}

Result<DictPtr> optim_state_dict_to_fqn(const Dict& positional, std::span<const std::string> names) {
  const Dict* state = get_dict(positional, kState);
  if (state == nullptr) return Error(Code::kInvalidArgument, "the optimizer state dict has no 'state' dict");
  const List* groups = TRY(param_groups_of(positional));
  auto name_of = [&](const std::string& id) -> Result<std::string> {
    if (!is_int_key(id)) return make_error_at(Code::kInvalidArgument, id, "'{}' is not a parameter id", id);
    const long long pid = std::stoll(id);
    if (pid < 0 || static_cast<size_t>(pid) >= names.size()) {
      return make_error_at(Code::kNotFound, id, "parameter id {} has no name ({} names given)", pid, names.size());
    }
    return names[static_cast<size_t>(pid)];
  };
  auto out_state = Dict::make();
  for (const auto& e : *state) out_state->set(TRY(name_of(e.key)), e.value);
  auto out_groups = List::make();
  for (const Value& g : groups->items()) {
    DictPtr group = shallow_copy(*g.if_dict());
    auto fqns = List::make();
    for (const Value& p : group->find(kParams)->if_list()->items()) {
      const int64_t* id = p.if_int();
      if (id == nullptr) return Error(Code::kInvalidArgument, "'params' of a positional state dict holds a non-integer");
      fqns->push_back(Value(TRY(name_of(std::to_string(*id)))));
    }
    group->set(std::string(kParams), fqns);
    out_groups->push_back(group);
  }
  auto out = Dict::make();
  out->append_unique(std::string(kState), out_state);
  out->append_unique(std::string(kParamGroups), out_groups);
  return out;
}

Result<DictPtr> optim_state_dict_to_positional(const Dict& fqn_form, std::span<const std::string> names) {
  const Dict* state = get_dict(fqn_form, kState);
  if (state == nullptr) return Error(Code::kInvalidArgument, "the optimizer state dict has no 'state' dict");
  const List* groups = TRY(param_groups_of(fqn_form));
  std::unordered_map<std::string_view, int64_t> pid_of;
  for (size_t i = 0; i < names.size(); ++i) {
    if (!pid_of.emplace(names[i], static_cast<int64_t>(i)).second) {
      return make_error_at(Code::kInvalidArgument, names[i], "name '{}' is given twice", names[i]);
    }
  }
  auto lookup = [&](const std::string& fqn) -> Result<int64_t> {
    auto it = pid_of.find(fqn);
    if (it == pid_of.end()) return make_error_at(Code::kNotFound, fqn, "'{}' is not among the parameter names", fqn);
    return it->second;
  };
  auto out_state = Dict::make();
  out_state->set_int_keys(true);
  for (const auto& e : *state) out_state->set(std::to_string(TRY(lookup(e.key))), e.value);
  auto out_groups = List::make();
  for (const Value& g : groups->items()) {
    DictPtr group = shallow_copy(*g.if_dict());
    auto ids = List::make();
    for (const Value& p : group->find(kParams)->if_list()->items()) {
      const std::string* fqn = p.if_string();
      if (fqn == nullptr) return Error(Code::kInvalidArgument, "'params' of an FQN-form state dict holds a non-string");
      ids->push_back(Value(TRY(lookup(*fqn))));
    }
    group->set(std::string(kParams), ids);
    out_groups->push_back(group);
  }
  auto out = Dict::make();
  out->append_unique(std::string(kState), out_state);
  out->append_unique(std::string(kParamGroups), out_groups);
  return out;
}

}  // namespace dsd
