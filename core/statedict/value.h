// Value: the tree a state dict is made of.
//
// A Value is a tensor (whole, or this rank's shard of a distributed tensor), an int64, a
// double, a bool, a string, bytes, None, a list (or tuple) or an ordered dict with string
// keys. That covers model state (tensors, `_extra_state`), optimizer state (`step`, moments,
// nested per-parameter dicts) and `param_groups` (hyperparameters, `params` lists).
//
// Containers have reference semantics, like Python's: copying a Value that holds a list or a
// dict copies a reference to the same container. deep_copy() copies the structure (never the
// tensor data). A Value is not internally synchronised: concurrent reads are safe, a write
// needs exclusive access.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <variant>
#include <vector>

namespace dsd {

class Layout;  // core/dist/layout.h: how a distributed tensor is split across ranks
class List;
class Dict;
using ListPtr = std::shared_ptr<List>;
using DictPtr = std::shared_ptr<Dict>;

// The numbers are the C ABI's DSD_KIND_* values.
enum class Kind : int32_t {
  kNone = 0,
  kBool = 1,
  kInt = 2,
  kDouble = 3,
  kString = 4,
  kBytes = 5,
  kTensor = 6,
  kList = 7,
  kDict = 8,
};
std::string_view kind_name(Kind kind);

struct None {
  bool operator==(const None&) const = default;
};

struct Bytes {
  std::string data;
  bool operator==(const Bytes&) const = default;
};

// A whole tensor, or this rank's shard of a distributed tensor (DTensor) when `layout` is set.
struct TensorValue {
  at::Tensor tensor;
  std::shared_ptr<const Layout> layout;
  bool read_only = false;  // imported with DLPack's read-only flag: dsd never writes into it

  bool is_dist() const { return layout != nullptr; }
};

class Value {
 public:
  Value() : v_(None{}) {}
  Value(None) : v_(None{}) {}                        // NOLINT
  Value(bool b) : v_(b) {}                           // NOLINT
  Value(int64_t i) : v_(i) {}                        // NOLINT
  Value(int i) : v_(static_cast<int64_t>(i)) {}      // NOLINT
  Value(double d) : v_(d) {}                         // NOLINT
  Value(std::string s) : v_(std::move(s)) {}         // NOLINT
  Value(const char* s) : v_(std::string(s)) {}       // NOLINT
  Value(Bytes b) : v_(std::move(b)) {}               // NOLINT
  Value(TensorValue t) : v_(std::move(t)) {}         // NOLINT
  Value(at::Tensor t) : v_(TensorValue{std::move(t), nullptr, false}) {}  // NOLINT
  Value(ListPtr l) : v_(std::move(l)) {}             // NOLINT
  Value(DictPtr d) : v_(std::move(d)) {}             // NOLINT

  Kind kind() const { return static_cast<Kind>(v_.index()); }
  bool is_none() const { return kind() == Kind::kNone; }
  bool is_tensor() const { return kind() == Kind::kTensor; }
  bool is_dict() const { return kind() == Kind::kDict; }
  bool is_list() const { return kind() == Kind::kList; }
  bool is_container() const { return is_dict() || is_list(); }

  // Typed access; each returns nullptr when the value is of another kind.
  const bool* if_bool() const { return std::get_if<bool>(&v_); }
  const int64_t* if_int() const { return std::get_if<int64_t>(&v_); }
  const double* if_double() const { return std::get_if<double>(&v_); }
  const std::string* if_string() const { return std::get_if<std::string>(&v_); }
  const Bytes* if_bytes() const { return std::get_if<Bytes>(&v_); }
  const TensorValue* if_tensor() const { return std::get_if<TensorValue>(&v_); }
  TensorValue* if_tensor() { return std::get_if<TensorValue>(&v_); }
  List* if_list() const;
  Dict* if_dict() const;

  // Shared pointers to the container, for keeping a subtree alive on its own.
  ListPtr list_ptr() const;
  DictPtr dict_ptr() const;

 private:
  std::variant<None, bool, int64_t, double, std::string, Bytes, TensorValue, ListPtr, DictPtr> v_;
};

class List {
 public:
  List() = default;
  explicit List(bool is_tuple) : is_tuple_(is_tuple) {}
  static ListPtr make(bool is_tuple = false) { return std::make_shared<List>(is_tuple); }

  std::vector<Value>& items() { return items_; }
  const std::vector<Value>& items() const { return items_; }
  size_t size() const { return items_.size(); }
  void push_back(Value v) { items_.push_back(std::move(v)); }
  const Value& operator[](size_t i) const { return items_[i]; }
  Value& operator[](size_t i) { return items_[i]; }

  // A Python tuple (e.g. Adam's `betas`): kept distinct so the round trip is exact.
  bool is_tuple() const { return is_tuple_; }
  void set_tuple(bool t) { is_tuple_ = t; }

 private:
  std::vector<Value> items_;
  bool is_tuple_ = false;
};

// An insertion-ordered dict with string keys, like Python's dict.
class Dict {
 public:
  struct Entry {
    std::string key;
    Value value;
  };

  static DictPtr make() { return std::make_shared<Dict>(); }

  size_t size() const { return entries_.size(); }
  bool empty() const { return entries_.empty(); }
  void reserve(size_t n);

  // Inserts, or replaces the value of an existing key in place (its position is kept).
  void set(std::string key, Value value);
  // Appends a key the caller knows is new: the fast path for producers of fresh dicts.
  void append_unique(std::string key, Value value);

  std::optional<size_t> index_of(std::string_view key) const;
  bool contains(std::string_view key) const { return index_of(key).has_value(); }
  const Value* find(std::string_view key) const;
  Value* find(std::string_view key);
  // Removes a key; returns whether it was there.
  bool erase(std::string_view key);
  void erase_at(size_t index);
  void clear();

  const std::string& key_at(size_t i) const { return entries_[i].key; }
  const Value& value_at(size_t i) const { return entries_[i].value; }
  Value& value_at(size_t i) { return entries_[i].value; }

  // Keys that stand for integers (PyTorch's positional optimizer state `{0: {...}}`, or
  // int-keyed dicts inside Shampoo-like state): the keys are their decimal strings, and the
  // flag lets Python get ints back.
  bool int_keys() const { return int_keys_; }
  void set_int_keys(bool v) { int_keys_ = v; }

  std::span<const Entry> entries() const { return entries_; }
  std::span<Entry> entries() { return entries_; }
  auto begin() const { return entries_.begin(); }
  auto end() const { return entries_.end(); }
  auto begin() { return entries_.begin(); }
  auto end() { return entries_.end(); }

 private:
  struct Hash {
    using is_transparent = void;
    size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
  };
  void rebuild_index();

  // Small dicts (optimizer state per parameter) are searched linearly; larger ones keep an
  // index from key to position.
  static constexpr size_t kIndexThreshold = 12;
  std::vector<Entry> entries_;
  std::unordered_map<std::string, size_t, Hash, std::equal_to<>> index_;
  bool int_keys_ = false;
};

// Whether `key` is a decimal int64 as Python's str(int) writes it ("0", "-3", not "03").
bool is_int_key(std::string_view key);

// A state dict is a Dict at the root.
using StateDict = Dict;

// Copies the containers (lists and dicts) of a tree; tensors, strings and scalars are shared
// or copied by value, never their data.
Value deep_copy(const Value& v);
DictPtr deep_copy(const Dict& d);

// Structural equality: same kinds, keys in the same order, equal scalars, and tensors of the
// same dtype, shape and bytes (bitwise, so NaNs compare equal to themselves). Layouts are
// compared when both sides are distributed. `why`, when given, receives the first difference.
bool deep_equal(const Value& a, const Value& b, std::string* why = nullptr);
bool deep_equal(const Dict& a, const Dict& b, std::string* why = nullptr);

// Bitwise tensor equality (dtype, shape and bytes).
bool tensor_bitwise_equal(const at::Tensor& a, const at::Tensor& b);

}  // namespace dsd
