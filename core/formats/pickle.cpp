// PickleValue construction, inspection and rendering. Reading and writing are in
// pickle_read.cpp and pickle_write.cpp.
#include "core/formats/pickle.h"

#include <fmt/format.h>

namespace dsd {

PickleValue PickleValue::boolean(bool v) {
  PickleValue out;
  out.v_ = v;
  return out;
}
PickleValue PickleValue::integer(int64_t v) {
  PickleValue out;
  out.v_ = v;
  return out;
}
PickleValue PickleValue::floating(double v) {
  PickleValue out;
  out.v_ = v;
  return out;
}
PickleValue PickleValue::str(std::string s) {
  PickleValue out;
  out.v_ = Str{std::make_shared<const std::string>(std::move(s))};
  return out;
}
PickleValue PickleValue::bytes(std::string data) {
  PickleValue out;
  out.v_ = Bin{std::make_shared<const std::string>(std::move(data))};
  return out;
}
PickleValue PickleValue::tuple(std::vector<PickleValue> items) {
  return make(std::make_shared<PickleTuple>(PickleTuple{std::move(items)}));
}
PickleValue PickleValue::list(std::vector<PickleValue> items) {
  return make(std::make_shared<PickleList>(PickleList{std::move(items)}));
}
PickleValue PickleValue::dict(std::vector<std::pair<PickleValue, PickleValue>> items) {
  return make(std::make_shared<PickleDict>(PickleDict{std::move(items)}));
}
PickleValue PickleValue::set(std::vector<PickleValue> items, bool frozen) {
  return make(std::make_shared<PickleSet>(PickleSet{std::move(items), frozen}));
}
PickleValue PickleValue::global(std::string module, std::string name) {
  return make(std::make_shared<PickleGlobal>(PickleGlobal{std::move(module), std::move(name)}));
}
PickleValue PickleValue::persistent_id(PickleValue id) {
  return make(std::make_shared<PicklePersistentId>(PicklePersistentId{std::move(id)}));
}
PickleValue PickleValue::reduce(PickleValue callable, PickleValue args) {
  auto obj = std::make_shared<PickleObject>();
  obj->via = PickleObject::Via::kReduce;
  obj->callable = std::move(callable);
  obj->args = std::move(args);
  return make(std::move(obj));
}
PickleValue PickleValue::new_object(PickleValue cls, PickleValue args) {
  auto obj = std::make_shared<PickleObject>();
  obj->via = PickleObject::Via::kNewObj;
  obj->callable = std::move(cls);
  obj->args = std::move(args);
  return make(std::move(obj));
}
PickleValue PickleValue::from(std::shared_ptr<PickleObject> object) { return make(std::move(object)); }

const std::string* PickleValue::if_str() const {
  const auto* p = std::get_if<Str>(&v_);
  return p != nullptr ? p->s.get() : nullptr;
}
const std::string* PickleValue::if_bytes() const {
  const auto* p = std::get_if<Bin>(&v_);
  return p != nullptr ? p->s.get() : nullptr;
}

const void* PickleValue::node() const {
  return std::visit(
      [](const auto& alt) -> const void* {
        using T = std::decay_t<decltype(alt)>;
        if constexpr (std::is_same_v<T, Str> || std::is_same_v<T, Bin>) {
          return alt.s.get();
        } else if constexpr (std::is_same_v<T, std::monostate> || std::is_same_v<T, bool> ||
                             std::is_same_v<T, int64_t> || std::is_same_v<T, double>) {
          return nullptr;
        } else {
          return alt.get();
        }
      },
      v_);
}

const PickleValue* PickleDict::find(std::string_view key) const {
  for (auto it = items.rbegin(); it != items.rend(); ++it) {
    const std::string* k = it->first.if_str();
    if (k != nullptr && *k == key) return &it->second;
  }
  return nullptr;
}

PickleAllowList::PickleAllowList(
    std::initializer_list<std::pair<std::string_view, std::string_view>> globals) {
  for (const auto& [module, name] : globals) allow(module, name);
}

void PickleAllowList::allow(std::string_view module, std::string_view name) {
  globals_.emplace(std::string(module), std::string(name));
}

void PickleAllowList::allow_all(const PickleAllowList& other) {
  globals_.insert(other.globals_.begin(), other.globals_.end());
}

bool PickleAllowList::allows(std::string_view module, std::string_view name) const {
  return globals_.contains({std::string(module), std::string(name)});
}

std::string_view pickle_kind_name(PickleValue::Kind kind) {
  using K = PickleValue::Kind;
  switch (kind) {
    case K::kNone: return "NoneType";
    case K::kBool: return "bool";
    case K::kInt: return "int";
    case K::kFloat: return "float";
    case K::kStr: return "str";
    case K::kBytes: return "bytes";
    case K::kTuple: return "tuple";
    case K::kList: return "list";
    case K::kDict: return "dict";
    case K::kSet: return "set";
    case K::kGlobal: return "global";
    case K::kObject: return "object";
    case K::kPersistentId: return "persistent id";
  }
  return "unknown";
}

namespace {

void repr_quoted(std::string& out, std::string_view s, char prefix) {
  if (prefix != 0) out += prefix;
  out += '\'';
  for (char c : s) {
    const auto u = static_cast<unsigned char>(c);
    if (c == '\'' || c == '\\') {
      out += '\\';
      out += c;
    } else if (u < 0x20 || u == 0x7f || (prefix == 'b' && u >= 0x80)) {
      out += fmt::format("\\x{:02x}", u);
    } else {
      out += c;
    }
  }
  out += '\'';
}

// Appends a rendering of `v` to `out`, stopping early once `out` is past `limit`; `depth`
// keeps hostile-but-valid trees from recursing far.
void repr_into(std::string& out, const PickleValue& v, size_t limit, int depth) {
  using K = PickleValue::Kind;
  if (out.size() > limit) return;
  if (depth > 8) {
    out += "...";
    return;
  }
  const auto seq = [&](const std::vector<PickleValue>& items, char open, char close) {
    out += open;
    for (size_t i = 0; i < items.size() && out.size() <= limit; ++i) {
      if (i > 0) out += ", ";
      repr_into(out, items[i], limit, depth + 1);
    }
    if (open == '(' && items.size() == 1) out += ',';
    out += close;
  };
  const auto pairs = [&](const std::vector<std::pair<PickleValue, PickleValue>>& items) {
    out += '{';
    for (size_t i = 0; i < items.size() && out.size() <= limit; ++i) {
      if (i > 0) out += ", ";
      repr_into(out, items[i].first, limit, depth + 1);
      out += ": ";
      repr_into(out, items[i].second, limit, depth + 1);
    }
    out += '}';
  };
  switch (v.kind()) {
    case K::kNone: out += "None"; return;
    case K::kBool: out += *v.if_bool() ? "True" : "False"; return;
    case K::kInt: out += fmt::format("{}", *v.if_int()); return;
    case K::kFloat: out += fmt::format("{}", *v.if_float()); return;
    case K::kStr: repr_quoted(out, *v.if_str(), 0); return;
    case K::kBytes: repr_quoted(out, *v.if_bytes(), 'b'); return;
    case K::kTuple: seq(v.if_tuple()->items, '(', ')'); return;
    case K::kList: seq(v.if_list()->items, '[', ']'); return;
    case K::kDict: pairs(v.if_dict()->items); return;
    case K::kSet:
      out += v.if_set()->frozen ? "frozenset(" : "set(";
      seq(v.if_set()->items, '[', ']');
      out += ')';
      return;
    case K::kGlobal: out += v.if_global()->full_name(); return;
    case K::kObject: {
      const PickleObject& o = *v.if_object();
      repr_into(out, o.callable, limit, depth + 1);
      if (o.via != PickleObject::Via::kReduce) out += ".__new__";
      const PickleTuple* args = o.args.if_tuple();
      if (args != nullptr) {
        seq(args->items, '(', ')');
      } else {
        out += "(?)";
      }
      if (!o.dict_items.empty()) pairs(o.dict_items);
      if (!o.list_items.empty()) seq(o.list_items, '[', ']');
      return;
    }
    case K::kPersistentId:
      out += "persistent_id(";
      repr_into(out, v.if_persistent_id()->id, limit, depth + 1);
      out += ')';
      return;
  }
}

}  // namespace

std::string pickle_repr(const PickleValue& value, size_t max_chars) {
  std::string out;
  repr_into(out, value, max_chars, 0);
  if (out.size() > max_chars) {
    out.resize(max_chars);
    out += "...";
  }
  return out;
}

}  // namespace dsd
