// Flattening nested state dicts to dot-joined keys, and back.
//
// `{"state": {"l.weight": {"step": 3}}}` flattens to `{"state.l.weight.step": 3}` with the
// mapping `state.l.weight.step -> ("state", "l.weight", "step")`, which is what unflatten
// needs: keys may themselves contain dots, so the path, not the string, is the truth.
#pragma once

#include <cstdint>
#include <string>
#include <variant>
#include <vector>

#include "core/base/result.h"
#include "core/statedict/value.h"

namespace dsd {

// One step of a path: a dict key or a list index.
struct PathSegment {
  std::variant<std::string, int64_t> v;

  static PathSegment key(std::string k) { return {std::move(k)}; }
  static PathSegment index(int64_t i) { return {i}; }
  bool is_index() const { return std::holds_alternative<int64_t>(v); }
  const std::string* if_key() const { return std::get_if<std::string>(&v); }
  const int64_t* if_index() const { return std::get_if<int64_t>(&v); }
  std::string str() const;
  bool operator==(const PathSegment&) const = default;
};
using Path = std::vector<PathSegment>;

// "a.0.b" for ("a", 0, "b").
std::string join_path(const Path& path);

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
