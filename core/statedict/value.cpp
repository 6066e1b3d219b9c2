#include "core/statedict/value.h"

#include <fmt/format.h>

#include <cstring>

#include "core/dist/layout.h"

namespace dsd {

std::string_view kind_name(Kind kind) {
  switch (kind) {
    case Kind::kNone: return "none";
    case Kind::kBool: return "bool";
    case Kind::kInt: return "int";
    case Kind::kDouble: return "double";
    case Kind::kString: return "string";
    case Kind::kBytes: return "bytes";
    case Kind::kTensor: return "tensor";
    case Kind::kList: return "list";
    case Kind::kDict: return "dict";
  }
  return "unknown";
}

List* Value::if_list() const {
  const auto* p = std::get_if<ListPtr>(&v_);
  return p != nullptr ? p->get() : nullptr;
}
Dict* Value::if_dict() const {
  const auto* p = std::get_if<DictPtr>(&v_);
  return p != nullptr ? p->get() : nullptr;
}
ListPtr Value::list_ptr() const {
  const auto* p = std::get_if<ListPtr>(&v_);
  return p != nullptr ? *p : nullptr;
}
DictPtr Value::dict_ptr() const {
  const auto* p = std::get_if<DictPtr>(&v_);
  return p != nullptr ? *p : nullptr;
}

// ---------------------------------------------------------------------------------------------
// Dict

bool is_int_key(std::string_view key) {
  std::string_view digits = key;
  if (!digits.empty() && digits.front() == '-') digits.remove_prefix(1);
  if (digits.empty() || digits.size() > 19) return false;
  if (digits.size() > 1 && digits.front() == '0') return false;
  for (char c : digits) {
    if (c < '0' || c > '9') return false;
  }
  return key != "-0";
}

void Dict::reserve(size_t n) {
  entries_.reserve(n);
  if (n > kIndexThreshold) index_.reserve(n);
}

void Dict::rebuild_index() {
  index_.clear();
  if (entries_.size() <= kIndexThreshold) return;
  index_.reserve(entries_.size());
  for (size_t i = 0; i < entries_.size(); ++i) index_.emplace(entries_[i].key, i);
}

std::optional<size_t> Dict::index_of(std::string_view key) const {
  if (entries_.size() <= kIndexThreshold) {
    for (size_t i = 0; i < entries_.size(); ++i) {
      if (entries_[i].key == key) return i;
    }
    return std::nullopt;
  }
  auto it = index_.find(key);
  if (it == index_.end()) return std::nullopt;
  return it->second;
}

void Dict::append_unique(std::string key, Value value) {
  entries_.push_back(Entry{std::move(key), std::move(value)});
  if (entries_.size() == kIndexThreshold + 1) {
    rebuild_index();
  } else if (entries_.size() > kIndexThreshold + 1) {
    index_.emplace(entries_.back().key, entries_.size() - 1);
  }
}

void Dict::set(std::string key, Value value) {
  if (auto i = index_of(key)) {
    entries_[*i].value = std::move(value);
    return;
  }
  append_unique(std::move(key), std::move(value));
}

const Value* Dict::find(std::string_view key) const {
  auto i = index_of(key);
  return i ? &entries_[*i].value : nullptr;
}

Value* Dict::find(std::string_view key) {
  auto i = index_of(key);
  return i ? &entries_[*i].value : nullptr;
}

bool Dict::erase(std::string_view key) {
  auto i = index_of(key);
  if (!i) return false;
  erase_at(*i);
  return true;
}

void Dict::erase_at(size_t index) {
  entries_.erase(entries_.begin() + static_cast<std::ptrdiff_t>(index));
  rebuild_index();
}

void Dict::clear() {
  entries_.clear();
  index_.clear();
}

// ---------------------------------------------------------------------------------------------
// Copies and comparisons

Value deep_copy(const Value& v) {
  if (const Dict* d = v.if_dict()) return deep_copy(*d);
  if (const List* l = v.if_list()) {
    auto out = List::make(l->is_tuple());
    out->items().reserve(l->size());
    for (const Value& item : l->items()) out->push_back(deep_copy(item));
    return out;
  }
  return v;
}

DictPtr deep_copy(const Dict& d) {
  auto out = Dict::make();
  out->reserve(d.size());
  out->set_int_keys(d.int_keys());
  for (const auto& e : d) out->append_unique(e.key, deep_copy(e.value));
  return out;
}

bool tensor_bitwise_equal(const at::Tensor& a, const at::Tensor& b) {
  if (a.defined() != b.defined()) return false;
  if (!a.defined()) return true;
  if (a.scalar_type() != b.scalar_type() || a.sizes() != b.sizes()) return false;
  const at::Tensor ca = a.is_cpu() ? a.contiguous() : a.cpu().contiguous();
  const at::Tensor cb = b.is_cpu() ? b.contiguous() : b.cpu().contiguous();
  const size_t n = static_cast<size_t>(ca.numel()) * ca.element_size();
  if (n == 0) return true;
  return std::memcmp(ca.data_ptr(), cb.data_ptr(), n) == 0;
}

namespace {

bool differ(std::string* why, std::string_view path, std::string_view what) {
  if (why != nullptr) *why = fmt::format("{}: {}", path.empty() ? "<root>" : path, what);
  return false;
}

std::string join(std::string_view path, std::string_view key) {
  return path.empty() ? std::string(key) : fmt::format("{}.{}", path, key);
}

bool equal_at(const Value& a, const Value& b, const std::string& path, std::string* why) {
  if (a.kind() != b.kind()) {
    return differ(why, path, fmt::format("{} vs {}", kind_name(a.kind()), kind_name(b.kind())));
  }
  switch (a.kind()) {
    case Kind::kNone: return true;
    case Kind::kBool:
      return *a.if_bool() == *b.if_bool() || differ(why, path, "bools differ");
    case Kind::kInt:
      return *a.if_int() == *b.if_int() ||
             differ(why, path, fmt::format("{} vs {}", *a.if_int(), *b.if_int()));
    case Kind::kDouble: {
      const double x = *a.if_double();
      const double y = *b.if_double();
      // Bitwise, so that NaN == NaN and 0.0 != -0.0, as a round trip must preserve.
      return std::memcmp(&x, &y, sizeof x) == 0 || differ(why, path, fmt::format("{} vs {}", x, y));
    }
    case Kind::kString:
      return *a.if_string() == *b.if_string() ||
             differ(why, path, fmt::format("'{}' vs '{}'", *a.if_string(), *b.if_string()));
    case Kind::kBytes:
      return *a.if_bytes() == *b.if_bytes() || differ(why, path, "bytes differ");
    case Kind::kTensor: {
      const TensorValue& x = *a.if_tensor();
      const TensorValue& y = *b.if_tensor();
      if (x.is_dist() != y.is_dist()) return differ(why, path, "distributed vs plain tensor");
      if (x.is_dist() && !(*x.layout == *y.layout)) return differ(why, path, "layouts differ");
      if (!tensor_bitwise_equal(x.tensor, y.tensor)) {
        return differ(why, path, "tensors differ (dtype, shape or bytes)");
      }
      return true;
    }
    case Kind::kList: {
      const List& x = *a.if_list();
      const List& y = *b.if_list();
      if (x.is_tuple() != y.is_tuple()) return differ(why, path, "tuple vs list");
      if (x.size() != y.size()) {
        return differ(why, path, fmt::format("{} vs {} items", x.size(), y.size()));
      }
      for (size_t i = 0; i < x.size(); ++i) {
        if (!equal_at(x[i], y[i], join(path, std::to_string(i)), why)) return false;
      }
      return true;
    }
    case Kind::kDict: {
      const Dict& x = *a.if_dict();
      const Dict& y = *b.if_dict();
      if (x.size() != y.size()) {
        return differ(why, path, fmt::format("{} vs {} keys", x.size(), y.size()));
      }
      if (x.int_keys() != y.int_keys()) return differ(why, path, "int keys vs string keys");
      for (size_t i = 0; i < x.size(); ++i) {
        if (x.key_at(i) != y.key_at(i)) {
          return differ(why, path,
                        fmt::format("key #{} is '{}' vs '{}'", i, x.key_at(i), y.key_at(i)));
        }
        if (!equal_at(x.value_at(i), y.value_at(i), join(path, x.key_at(i)), why)) return false;
      }
      return true;
    }
  }
  return false;
}

}  // namespace

bool deep_equal(const Value& a, const Value& b, std::string* why) {
  return equal_at(a, b, "", why);
}

bool deep_equal(const Dict& a, const Dict& b, std::string* why) {
  // Wrap without copying entries: aliasing shared_ptrs that do not own.
  DictPtr pa(DictPtr{}, const_cast<Dict*>(&a));
  DictPtr pb(DictPtr{}, const_cast<Dict*>(&b));
  return equal_at(Value(pa), Value(pb), "", why);
}

}  // namespace dsd
