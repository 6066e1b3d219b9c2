// State-dict containers: dicts and lists of Values, read by position and written by key.
#include "capi/src/export.h"

#include <cstring>

#include "capi/src/guard.h"
#include "capi/src/state_dicts.h"
#include "capi/src/tensors.h"
#include "core/statedict/flatten.h"

namespace dsd::capi {

dsd_state_dict* wrap(Value container) { return new dsd_state_dict(std::move(container)); }

Result<Dict*> as_dict(const dsd_state_dict* sd, const char* what) {
  TRY(require(sd, what));
  Dict* d = sd->node.if_dict();
  if (d == nullptr) return make_error(Code::kWrongKind, "{} is a list, not a dict", what);
  return d;
}

Result<const Value*> value_at(const dsd_state_dict* sd, size_t index) {
  TRY(require(sd, "sd"));
  if (const Dict* d = sd->node.if_dict()) {
    if (index >= d->size()) {
      return make_error(Code::kInvalidArgument, "index {} is out of range for a dict of {} entries",
                        index, d->size());
    }
    return &d->value_at(index);
  }
  const List* l = sd->node.if_list();
  if (index >= l->size()) {
    return make_error(Code::kInvalidArgument, "index {} is out of range for a list of {} items",
                      index, l->size());
  }
  return &(*l)[index];
}

std::string describe(const dsd_state_dict* sd, size_t index) {
  if (const Dict* d = sd->node.if_dict()) return fmt::format("'{}'", d->key_at(index));
  return fmt::format("item {}", index);
}

Status put(dsd_state_dict* sd, const char* key, Value v) {
  TRY(require(sd, "sd"));
  if (Dict* d = sd->node.if_dict()) {
    if (key == nullptr) return Error(Code::kInvalidArgument, "key is NULL (a dict needs a key)");
    if (d->int_keys() && !is_int_key(key)) {
      return make_error_at(Code::kInvalidArgument, key, "key '{}' is not an integer (the dict is int-keyed)", key);
    }
    d->set(key, std::move(v));
    return ok();
  }
  if (key != nullptr) {
    return make_error(Code::kInvalidArgument, "key '{}' given for a list (pass NULL to append)", key);
  }
  sd->node.if_list()->push_back(std::move(v));
  return ok();
}

namespace {

template <class T>
Result<const T*> typed_at(const dsd_state_dict* sd, size_t index, Kind want,
                          const T* (Value::*get)() const) {
  const Value* v = TRY(value_at(sd, index));
  const T* p = (v->*get)();
  if (p == nullptr) {
    return make_error_at(Code::kWrongKind, describe(sd, index), "{} is a {}, not a {}",
                         describe(sd, index), kind_name(v->kind()), kind_name(want));
  }
  return p;
}

// Whether `target` is `root` or inside it: storing it would make a cycle.
bool reaches(const Value& root, const void* target) {
  if (const Dict* d = root.if_dict()) {
    if (d == target) return true;
    for (const auto& e : *d) {
      if (e.value.is_container() && reaches(e.value, target)) return true;
    }
  } else if (const List* l = root.if_list()) {
    if (l == target) return true;
    for (const Value& v : l->items()) {
      if (v.is_container() && reaches(v, target)) return true;
    }
  }
  return false;
}

const void* container_address(const Value& v) {
  if (const Dict* d = v.if_dict()) return d;
  return v.if_list();
}

}  // namespace
}  // namespace dsd::capi

using dsd::Code;
using dsd::capi::guard;
using dsd::capi::require;

extern "C" {

dsd_status dsd_state_dict_new(dsd_state_dict** out, dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    TRY(require(out, "out"));
    *out = dsd::capi::wrap(dsd::Dict::make());
    return dsd::ok();
  });
}

dsd_status dsd_state_dict_new_list(bool is_tuple, dsd_state_dict** out, dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    TRY(require(out, "out"));
    *out = dsd::capi::wrap(dsd::List::make(is_tuple));
    return dsd::ok();
  });
}

dsd_state_dict* dsd_state_dict_retain(dsd_state_dict* sd) {
  if (sd != nullptr) sd->refs.fetch_add(1, std::memory_order_relaxed);
  return sd;
}

void dsd_state_dict_release(dsd_state_dict* sd) {
  if (sd != nullptr && sd->refs.fetch_sub(1, std::memory_order_acq_rel) == 1) delete sd;
}

dsd_status dsd_state_dict_container_kind(const dsd_state_dict* sd, dsd_kind* out_kind, bool* out_is_tuple,
                                         dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    TRY(require(sd, "sd"));
    TRY(require(out_kind, "out_kind"));
    *out_kind = dsd::capi::to_c_kind(sd->node.kind());
    if (out_is_tuple != nullptr) {
      const dsd::List* l = sd->node.if_list();
      *out_is_tuple = l != nullptr && l->is_tuple();
    }
    return dsd::ok();
  });
}

dsd_status dsd_state_dict_int_keys(const dsd_state_dict* sd, bool* out, dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    dsd::Dict* d = TRY(dsd::capi::as_dict(sd, "sd"));
    TRY(require(out, "out"));
    *out = d->int_keys();
    return dsd::ok();
  });
}

dsd_status dsd_state_dict_set_int_keys(dsd_state_dict* sd, bool int_keys, dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    dsd::Dict* d = TRY(dsd::capi::as_dict(sd, "sd"));
    if (int_keys) {
      for (const auto& e : *d) {
        if (!dsd::is_int_key(e.key)) {
          return dsd::make_error_at(Code::kInvalidArgument, e.key, "key '{}' is not an integer", e.key);
        }
      }
    }
    d->set_int_keys(int_keys);
    return dsd::ok();
  });
}

dsd_status dsd_state_dict_size(const dsd_state_dict* sd, size_t* out, dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    TRY(require(sd, "sd"));
    TRY(require(out, "out"));
    const dsd::Dict* d = sd->node.if_dict();
    *out = d != nullptr ? d->size() : sd->node.if_list()->size();
    return dsd::ok();
  });
}

dsd_status dsd_state_dict_find(const dsd_state_dict* sd, const char* key, size_t* out,
                               dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    dsd::Dict* d = TRY(dsd::capi::as_dict(sd, "sd"));
    TRY(require(key, "key"));
    TRY(require(out, "out"));
    auto i = d->index_of(key);
    if (!i) return dsd::make_error_at(Code::kNotFound, key, "key '{}' is not in the state dict", key);
    *out = *i;
    return dsd::ok();
  });
}

dsd_status dsd_state_dict_key(const dsd_state_dict* sd, size_t index, const char** out,
                              dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    dsd::Dict* d = TRY(dsd::capi::as_dict(sd, "sd"));
    TRY(require(out, "out"));
    if (index >= d->size()) {
      return dsd::make_error(Code::kInvalidArgument, "index {} is out of range for a dict of {} entries",
                             index, d->size());
    }
    *out = d->key_at(index).c_str();
    return dsd::ok();
  });
}

dsd_status dsd_state_dict_kind(const dsd_state_dict* sd, size_t index, dsd_kind* out,
                               dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    TRY(require(out, "out"));
    const dsd::Value* v = TRY(dsd::capi::value_at(sd, index));
    *out = dsd::capi::to_c_kind(v->kind());
    return dsd::ok();
  });
}

dsd_status dsd_state_dict_get_bool(const dsd_state_dict* sd, size_t index, bool* out, dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    TRY(require(out, "out"));
    *out = *TRY(dsd::capi::typed_at(sd, index, dsd::Kind::kBool, &dsd::Value::if_bool));
    return dsd::ok();
  });
}

dsd_status dsd_state_dict_get_int(const dsd_state_dict* sd, size_t index, int64_t* out, dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    TRY(require(out, "out"));
    *out = *TRY(dsd::capi::typed_at(sd, index, dsd::Kind::kInt, &dsd::Value::if_int));
    return dsd::ok();
  });
}

dsd_status dsd_state_dict_get_double(const dsd_state_dict* sd, size_t index, double* out,
                                     dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    TRY(require(out, "out"));
    *out = *TRY(dsd::capi::typed_at(sd, index, dsd::Kind::kDouble, &dsd::Value::if_double));
    return dsd::ok();
  });
}

dsd_status dsd_state_dict_get_string(const dsd_state_dict* sd, size_t index, const char** out_data,
                                     size_t* out_len, dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    TRY(require(out_data, "out_data"));
    TRY(require(out_len, "out_len"));
    const std::string* s = TRY(dsd::capi::typed_at(sd, index, dsd::Kind::kString, &dsd::Value::if_string));
    *out_data = s->c_str();
    *out_len = s->size();
    return dsd::ok();
  });
}

dsd_status dsd_state_dict_get_bytes(const dsd_state_dict* sd, size_t index, const void** out_data,
                                    size_t* out_len, dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    TRY(require(out_data, "out_data"));
    TRY(require(out_len, "out_len"));
    const dsd::Bytes* b = TRY(dsd::capi::typed_at(sd, index, dsd::Kind::kBytes, &dsd::Value::if_bytes));
    *out_data = b->data.data();
    *out_len = b->data.size();
    return dsd::ok();
  });
}

dsd_status dsd_state_dict_get_tensor(const dsd_state_dict* sd, size_t index, dsd_tensor* out,
                                     dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    TRY(require(out, "out"));
    const dsd::TensorValue* t = TRY(dsd::capi::typed_at(
        sd, index, dsd::Kind::kTensor,
        static_cast<const dsd::TensorValue* (dsd::Value::*)() const>(&dsd::Value::if_tensor)));
    *out = dsd::capi::make_handle(*t);
    return dsd::ok();
  });
}

dsd_status dsd_state_dict_get_child(const dsd_state_dict* sd, size_t index, dsd_state_dict** out,
                                    dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    TRY(require(out, "out"));
    const dsd::Value* v = TRY(dsd::capi::value_at(sd, index));
    if (!v->is_container()) {
      return dsd::make_error_at(Code::kWrongKind, dsd::capi::describe(sd, index),
                                "{} is a {}, not a dict or list", dsd::capi::describe(sd, index),
                                dsd::kind_name(v->kind()));
    }
    *out = dsd::capi::wrap(*v);
    return dsd::ok();
  });
}

dsd_status dsd_state_dict_set_none(dsd_state_dict* sd, const char* key, dsd_error** err) {
  return guard(err, [&] { return dsd::capi::put(sd, key, dsd::Value()); });
}

dsd_status dsd_state_dict_set_bool(dsd_state_dict* sd, const char* key, bool value, dsd_error** err) {
  return guard(err, [&] { return dsd::capi::put(sd, key, dsd::Value(value)); });
}

dsd_status dsd_state_dict_set_int(dsd_state_dict* sd, const char* key, int64_t value, dsd_error** err) {
  return guard(err, [&] { return dsd::capi::put(sd, key, dsd::Value(value)); });
}

dsd_status dsd_state_dict_set_double(dsd_state_dict* sd, const char* key, double value,
                                     dsd_error** err) {
  return guard(err, [&] { return dsd::capi::put(sd, key, dsd::Value(value)); });
}

dsd_status dsd_state_dict_set_string(dsd_state_dict* sd, const char* key, const char* data,
                                     size_t len, dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    if (len > 0) TRY(require(data, "data"));
    return dsd::capi::put(sd, key, dsd::Value(std::string(data == nullptr ? "" : data, len)));
  });
}

dsd_status dsd_state_dict_set_bytes(dsd_state_dict* sd, const char* key, const void* data,
                                    size_t len, dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    if (len > 0) TRY(require(data, "data"));
    std::string bytes(len, '\0');
    if (len > 0) std::memcpy(bytes.data(), data, len);
    return dsd::capi::put(sd, key, dsd::Value(dsd::Bytes{std::move(bytes)}));
  });
}

dsd_status dsd_state_dict_set_tensor(dsd_state_dict* sd, const char* key, dsd_tensor tensor,
                                     dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    dsd::TensorValue v = TRY(dsd::capi::lookup(tensor));
    return dsd::capi::put(sd, key, dsd::Value(std::move(v)));
  });
}

dsd_status dsd_state_dict_set_child(dsd_state_dict* sd, const char* key, dsd_state_dict* child,
                                    dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    TRY(require(sd, "sd"));
    TRY(require(child, "child"));
    if (dsd::capi::reaches(child->node, dsd::capi::container_address(sd->node))) {
      return dsd::Error(Code::kInvalidArgument, "a container cannot be stored inside itself");
    }
    return dsd::capi::put(sd, key, child->node);
  });
}

dsd_status dsd_state_dict_remove(dsd_state_dict* sd, size_t index, dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    TRY(dsd::capi::value_at(sd, index));
    if (dsd::Dict* d = sd->node.if_dict()) {
      d->erase_at(index);
    } else {
      auto& items = sd->node.if_list()->items();
      items.erase(items.begin() + static_cast<std::ptrdiff_t>(index));
    }
    return dsd::ok();
  });
}

dsd_status dsd_state_dict_flatten(const dsd_state_dict* sd, dsd_state_dict** out_flat,
                                  dsd_state_dict** out_mapping, dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    dsd::Dict* d = TRY(dsd::capi::as_dict(sd, "sd"));
    TRY(require(out_flat, "out_flat"));
    TRY(require(out_mapping, "out_mapping"));
    dsd::FlatStateDict flat = TRY(dsd::flatten_state_dict(*d));
    auto mapping = dsd::Dict::make();
    mapping->reserve(flat.mapping.size());
    for (const auto& [key, path] : flat.mapping) {
      auto segs = dsd::List::make();
      for (const dsd::PathSegment& seg : path) {
        if (const int64_t* i = seg.if_index()) {
          segs->push_back(dsd::Value(*i));
        } else {
          segs->push_back(dsd::Value(*seg.if_key()));
        }
      }
      mapping->append_unique(key, dsd::Value(segs));
    }
    *out_flat = dsd::capi::wrap(flat.flat);
    *out_mapping = dsd::capi::wrap(mapping);
    return dsd::ok();
  });
}

dsd_status dsd_state_dict_unflatten(const dsd_state_dict* flat, const dsd_state_dict* mapping,
                                    dsd_state_dict** out, dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    dsd::Dict* f = TRY(dsd::capi::as_dict(flat, "flat"));
    dsd::Dict* m = TRY(dsd::capi::as_dict(mapping, "mapping"));
    TRY(require(out, "out"));
    std::vector<std::pair<std::string, dsd::Path>> paths;
    paths.reserve(m->size());
    for (const auto& e : *m) {
      const dsd::List* segs = e.value.if_list();
      if (segs == nullptr) {
        return dsd::make_error_at(Code::kWrongKind, e.key, "mapping of '{}' is not a list", e.key);
      }
      dsd::Path path;
      for (const dsd::Value& s : segs->items()) {
        if (const int64_t* i = s.if_int()) {
          path.push_back(dsd::PathSegment::index(*i));
        } else if (const std::string* k = s.if_string()) {
          path.push_back(dsd::PathSegment::key(*k));
        } else {
          return dsd::make_error_at(Code::kWrongKind, e.key,
                                    "mapping of '{}' holds a {} (paths are strings and ints)", e.key,
                                    dsd::kind_name(s.kind()));
        }
      }
      paths.emplace_back(e.key, std::move(path));
    }
    dsd::DictPtr nested = TRY(dsd::unflatten_state_dict(*f, paths));
    *out = dsd::capi::wrap(nested);
    return dsd::ok();
  });
}

dsd_status dsd_state_dict_equal(const dsd_state_dict* a, const dsd_state_dict* b, bool* out_equal,
                                const char** out_why, dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    TRY(require(a, "a"));
    TRY(require(b, "b"));
    TRY(require(out_equal, "out_equal"));
    std::string reason;
    const bool equal = dsd::deep_equal(a->node, b->node, &reason);
    if (out_why != nullptr) *out_why = equal ? "" : a->keep(std::move(reason));
    *out_equal = equal;
    return dsd::ok();
  });
}

}  // extern "C"
