#include "core/statedict/flatten.h"

#include "core/base/make_error.h"

namespace dsd {

namespace {

// DCP's _is_terminal: a list is a leaf unless it holds a tensor or an enterable container.
bool is_terminal(const Value& v) {
  if (v.is_dict()) return false;
  const List* l = v.if_list();
  if (l == nullptr || l->is_tuple()) return true;
  for (const Value& item : l->items()) {
    if (item.is_tensor()) return false;
    if ((item.is_dict() || (item.is_list() && !item.if_list()->is_tuple())) && !is_terminal(item)) {
      return false;
    }
  }
  return true;
}

struct Flattener {
  FlattenStyle style;
  FlatStateDict out;
  Path path;

  Status leaf(const Value& v) {
    std::string key = join_path(path);
    if (out.flat->contains(key)) {
      return make_error_at(Code::kInvalidArgument, key, "duplicated flatten key {}", key);
    }
    out.flat->append_unique(key, v);
    out.mapping.emplace_back(std::move(key), path);
    return ok();
  }

  Status visit(const Value& v) {
    if (const Dict* d = v.if_dict()) {
      for (const auto& e : *d) {
        path.push_back(PathSegment::key(e.key));
        TRY(visit(e.value));
        path.pop_back();
      }
      return ok();
    }
    const List* l = v.if_list();
    const bool enter = l != nullptr && (style == FlattenStyle::kAllContainers || !is_terminal(v));
    if (!enter) return leaf(v);
    for (size_t i = 0; i < l->size(); ++i) {
      path.push_back(PathSegment::index(static_cast<int64_t>(i)));
      TRY(visit((*l)[i]));
      path.pop_back();
    }
    return ok();
  }
};

}  // namespace

Result<FlatStateDict> flatten_state_dict(const Dict& root, FlattenStyle style) {
  Flattener f{style, {Dict::make(), {}}, {}};
  f.out.flat->reserve(root.size());
  for (const auto& e : root) {
    f.path.assign(1, PathSegment::key(e.key));
    TRY(f.visit(e.value));
  }
  return std::move(f.out);
}

Status set_element(Dict& root, const Path& path, Value value) {
  if (path.empty()) return make_error(Code::kInvalidArgument, "set_element needs a non-empty path");
  if (path.front().is_index()) {
    return make_error(Code::kInvalidArgument, "path {} starts with a list index", join_path(path));
  }
  // Walk with a pointer to the current container slot, creating what is missing.
  Value* slot = nullptr;
  Dict* dict = &root;
  List* list = nullptr;
  for (size_t i = 0; i < path.size(); ++i) {
    const PathSegment& seg = path[i];
    if (dict != nullptr) {
      if (seg.is_index()) {
        return make_error(Code::kInvalidArgument, "path {}: index {} into a dict", join_path(path), seg.str());
      }
      slot = dict->find(*seg.if_key());
      if (slot == nullptr) {
        dict->append_unique(*seg.if_key(), Value());
        slot = &dict->value_at(dict->size() - 1);
      }
    } else {
      if (!seg.is_index()) {
        return make_error(Code::kInvalidArgument, "path {}: key '{}' into a list", join_path(path), seg.str());
      }
      const int64_t idx = *seg.if_index();
      if (idx < 0) return make_error(Code::kInvalidArgument, "path {}: negative index", join_path(path));
      while (static_cast<int64_t>(list->size()) <= idx) list->push_back(Value());
      slot = &(*list)[static_cast<size_t>(idx)];
    }
    if (i + 1 == path.size()) break;
    // Make sure the slot holds the container the next segment needs.
    const bool next_is_index = path[i + 1].is_index();
    if (next_is_index) {
      if (!slot->is_list()) *slot = Value(List::make());
      list = slot->if_list();
      dict = nullptr;
    } else {
      if (!slot->is_dict()) *slot = Value(Dict::make());
      dict = slot->if_dict();
      list = nullptr;
    }
  }
  *slot = std::move(value);
  return ok();
}

const Value* get_element(const Dict& root, const Path& path) {
  const Value* cur = nullptr;
  const Dict* dict = &root;
  const List* list = nullptr;
  for (const PathSegment& seg : path) {
    if (dict != nullptr) {
      if (seg.is_index()) return nullptr;
      cur = dict->find(*seg.if_key());
    } else if (list != nullptr) {
      if (!seg.is_index()) return nullptr;
      const int64_t idx = *seg.if_index();
      if (idx < 0 || idx >= static_cast<int64_t>(list->size())) return nullptr;
      cur = &(*list)[static_cast<size_t>(idx)];
    } else {
      return nullptr;
    }
    if (cur == nullptr) return nullptr;
    dict = cur->if_dict();
    list = cur->if_list();
  }
  return cur;
}

namespace {
void collect_int_key_dicts(const Value& v, Path& path, std::vector<Path>& out) {
  if (const Dict* d = v.if_dict()) {
    if (d->int_keys()) out.push_back(path);
    for (const auto& e : *d) {
      path.push_back(PathSegment::key(e.key));
      collect_int_key_dicts(e.value, path, out);
      path.pop_back();
    }
  } else if (const List* l = v.if_list()) {
    for (size_t i = 0; i < l->size(); ++i) {
      path.push_back(PathSegment::index(static_cast<int64_t>(i)));
      collect_int_key_dicts((*l)[i], path, out);
      path.pop_back();
    }
  }
}
}  // namespace

std::vector<Path> int_key_dict_paths(const Dict& root) {
  std::vector<Path> out;
  Path path;
  if (root.int_keys()) out.emplace_back();
  for (const auto& e : root) {
    path.push_back(PathSegment::key(e.key));
    collect_int_key_dicts(e.value, path, out);
    path.pop_back();
  }
  return out;
}

void mark_int_key_dicts(Dict& root, const std::vector<Path>& paths) {
  for (const Path& path : paths) {
    Dict* d = &root;
    if (!path.empty()) {
      const Value* v = get_element(root, path);
      d = v ? v->if_dict() : nullptr;
    }
    if (d == nullptr) continue;
    bool all_int = true;
    for (const auto& e : *d) all_int = all_int && is_int_key(e.key);
    if (all_int) d->set_int_keys(true);
  }
}

Result<DictPtr> unflatten_state_dict(const Dict& flat,
                                     const std::vector<std::pair<std::string, Path>>& mapping) {
  std::unordered_map<std::string_view, const Path*> paths;
  paths.reserve(mapping.size());
  for (const auto& [k, p] : mapping) paths.emplace(k, &p);
  auto out = Dict::make();
  for (const auto& e : flat) {
    auto it = paths.find(e.key);
    if (it == paths.end()) {
      out->set(e.key, e.value);
    } else {
      TRY(set_element(*out, *it->second, e.value));
    }
  }
  return out;
}

}  // namespace dsd
