// Flattening nested state dicts to dot-joined keys, and back.
//
// `{"state": {"l.weight": {"step": 3}}}` flattens to `{"state.l.weight.step": 3}` with the
// mapping `state.l.weight.step -> ("state", "l.weight", "step")`, which is what unflatten
// needs: keys may themselves contain dots, so the path, not the string, is the truth.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "core/base/result.h"
#include "core/statedict/path.h"
#include "core/statedict/value.h"

namespace dsd {

enum class FlattenStyle {
  // DCP's traversal (PyTorch >= 2.4): dicts are always entered; a list is entered only if it
  // holds a tensor or a container that is itself entered; tuples and scalars are leaves.
  // Empty dicts vanish.
  kCheckpoint,
  // _state_dict_utils._flatten_state_dict: every dict, list and tuple is entered.
  kAllContainers,
};

struct FlatStateDict {
  DictPtr flat;                                  // dot-joined key -> leaf
  std::vector<std::pair<std::string, Path>> mapping;  // dot-joined key -> path, in order
};

// Errors with "duplicated flatten key <k>" when two paths join to the same key.
Result<FlatStateDict> flatten_state_dict(const Dict& root, FlattenStyle style = FlattenStyle::kCheckpoint);

// Rebuilds the nesting of `flat` from `mapping`; a key without a mapping stays top level.
Result<DictPtr> unflatten_state_dict(const Dict& flat,
                                     const std::vector<std::pair<std::string, Path>>& mapping);

// Sets the value at `path`, creating missing dicts and lists on the way and padding lists
// with None up to the index, as DCP's set_element does.
Status set_element(Dict& root, const Path& path, Value value);
// The value at `path`, or nullptr.
const Value* get_element(const Dict& root, const Path& path);

// Paths of the nested dicts whose keys stand for ints (Dict::int_keys: PyTorch's positional
// optimizer state {0: {...}}), `root` itself first (the empty path) when it is one; in
// depth-first order. A checkpoint records them so the nesting comes back with int keys.
std::vector<Path> int_key_dict_paths(const Dict& root);
// The inverse, on a rebuilt nesting: marks the dict at each path int-keyed when all its keys
// are ints in decimal. Paths that lead nowhere (a selection left them out) are skipped.
void mark_int_key_dicts(Dict& root, const std::vector<Path>& paths);

// Calls `fn(path, leaf)` for every non-container value, depth first, in order.
template <class Fn>
void for_each_leaf(const Value& v, Path& path, Fn&& fn) {
  if (const Dict* d = v.if_dict()) {
    for (const auto& e : *d) {
      path.push_back(PathSegment::key(e.key));
      for_each_leaf(e.value, path, fn);
      path.pop_back();
    }
  } else if (const List* l = v.if_list()) {
    for (size_t i = 0; i < l->size(); ++i) {
      path.push_back(PathSegment::index(static_cast<int64_t>(i)));
      for_each_leaf((*l)[i], path, fn);
      path.pop_back();
    }
  } else {
    fn(static_cast<const Path&>(path), v);
  }
}

}  // namespace dsd
