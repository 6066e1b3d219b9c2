// The form of an optimizer state dict, as PyTorch's optim.state_dict() has it: {"state":
// {param: {...}}, "param_groups": [{..., "params": [param, ...]}]}, with params as ids
// (positional) or FQNs. Shared by the get and load halves (optim_state_dict.cpp) and the
// conversions between forms (optim_state_dict_form.cpp: flatten, positional <-> FQN).
#pragma once

#include <string_view>

#include "core/base/result.h"
#include "core/statedict/value.h"

namespace dsd::optim_form {

inline constexpr std::string_view kState = "state";
inline constexpr std::string_view kParamGroups = "param_groups";
inline constexpr std::string_view kParams = "params";

// The dict under `key`, or null.
const Dict* get_dict(const Dict& d, std::string_view key);
// The 'param_groups' list, each a dict with a 'params' list (kInvalidArgument otherwise).
Result<const List*> param_groups_of(const Dict& osd);
// A new dict with the same entries (values shared) and int_keys flag.
DictPtr shallow_copy(const Dict& d);

}  // namespace dsd::optim_form
