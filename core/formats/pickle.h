// Restricted pickle: Python pickles (protocols 0-5) read into a PickleValue tree without
// executing anything, and PickleValue trees written as protocol-2 pickles.
//
// The reader never imports or calls: a GLOBAL becomes a PickleGlobal node, and only if the
// caller's allow-list names it; REDUCE / NEWOBJ / BUILD become a PickleObject recording the
// class, its arguments and its state; a persistent id (torch storages) becomes a
// PicklePersistentId node. Interpreting those nodes is the caller's job (torch_save.h,
// dcp_metadata.h). Hostile input fails with an Error, never a crash, and memory stays
// proportional to the input.
//
// This file needs neither libtorch nor ATen, so it can be fuzzed (tests/fuzz/fuzz_pickle.cpp).
#pragma once

#include <cstdint>
#include <initializer_list>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <utility>
#include <variant>
#include <vector>

#include "core/base/result.h"

namespace dsd {

struct PickleTuple;
struct PickleList;
struct PickleDict;
struct PickleSet;
struct PickleGlobal;
struct PickleObject;
struct PicklePersistentId;

// A node of an unpickled object graph. Scalars are held by value; strings, bytes and every
// container are shared, so a value the pickle references twice through its memo (a torch
// storage, a shared list) is one node reachable twice, as in Python. Copying a PickleValue
// copies a reference. Trees returned by pickle_loads are acyclic.
class PickleValue {
 public:
  // The order is the variant's; never reorder.
  enum class Kind : uint8_t {
    kNone,
    kBool,
    kInt,    // int64; Python ints beyond int64 are refused
    kFloat,  // a Python float (double)
    kStr,    // UTF-8 text
    kBytes,
    kTuple,
    kList,
    kDict,
    kSet,  // set or frozenset
    kGlobal,
    kObject,
    kPersistentId,
  };

  PickleValue() = default;  // None
  static PickleValue boolean(bool v);
  static PickleValue integer(int64_t v);
  static PickleValue floating(double v);
  static PickleValue str(std::string s);
  static PickleValue bytes(std::string data);
  static PickleValue tuple(std::vector<PickleValue> items);
  static PickleValue list(std::vector<PickleValue> items = {});
  static PickleValue dict(std::vector<std::pair<PickleValue, PickleValue>> items = {});
  static PickleValue set(std::vector<PickleValue> items, bool frozen = false);
  static PickleValue global(std::string module, std::string name);
  static PickleValue persistent_id(PickleValue id);
  // An object made by calling `callable` (a kGlobal) with `args` (a kTuple), as REDUCE does.
  static PickleValue reduce(PickleValue callable, PickleValue args);
  // An object made by `cls.__new__(cls, *args)` (NEWOBJ): how dataclasses are pickled.
  static PickleValue new_object(PickleValue cls, PickleValue args);
  static PickleValue from(std::shared_ptr<PickleObject> object);

  Kind kind() const { return static_cast<Kind>(v_.index()); }
  bool is_none() const { return kind() == Kind::kNone; }

  // Typed access; each returns nullptr when the value is of another kind. Containers are
  // returned mutable, like Value's: the handle is const, the shared node is not.
  const bool* if_bool() const { return std::get_if<bool>(&v_); }
  const int64_t* if_int() const { return std::get_if<int64_t>(&v_); }
  const double* if_float() const { return std::get_if<double>(&v_); }
  const std::string* if_str() const;
  const std::string* if_bytes() const;
  PickleTuple* if_tuple() const { return get<PickleTuple>(); }
  PickleList* if_list() const { return get<PickleList>(); }
  PickleDict* if_dict() const { return get<PickleDict>(); }
  PickleSet* if_set() const { return get<PickleSet>(); }
  PickleGlobal* if_global() const { return get<PickleGlobal>(); }
  PickleObject* if_object() const { return get<PickleObject>(); }
  PicklePersistentId* if_persistent_id() const { return get<PicklePersistentId>(); }

  // The shared node behind a string, bytes, container, global or object (nullptr for None,
  // bool, int and float): two handles with the same node are the same Python object.
  const void* node() const;

 private:
  struct Str {
    std::shared_ptr<const std::string> s;
  };
  struct Bin {
    std::shared_ptr<const std::string> s;
  };
  template <class T>
  T* get() const {
    const auto* p = std::get_if<std::shared_ptr<T>>(&v_);
    return p != nullptr ? p->get() : nullptr;
  }
  template <class T>
  static PickleValue make(std::shared_ptr<T> p) {
    PickleValue v;
    v.v_ = std::move(p);
    return v;
  }

  std::variant<std::monostate, bool, int64_t, double, Str, Bin, std::shared_ptr<PickleTuple>,
               std::shared_ptr<PickleList>, std::shared_ptr<PickleDict>,
               std::shared_ptr<PickleSet>, std::shared_ptr<PickleGlobal>,
               std::shared_ptr<PickleObject>, std::shared_ptr<PicklePersistentId>>
      v_;
};

struct PickleTuple {
  std::vector<PickleValue> items;
};

struct PickleList {
  std::vector<PickleValue> items;
};

// A dict in insertion order. Keys are kept as the pickle gives them (pickles that Python
// writes never repeat a key); a consumer building a map should let a later key win, in the
// earlier key's position, as Python's dict does.
struct PickleDict {
  std::vector<std::pair<PickleValue, PickleValue>> items;

  // The value of the last entry whose key is the string `key`, or nullptr.
  const PickleValue* find(std::string_view key) const;
};

struct PickleSet {
  std::vector<PickleValue> items;
  bool frozen = false;
};

// A module-level name (a class or a function) that the pickle refers to. Never resolved.
struct PickleGlobal {
  std::string module;
  std::string name;

  std::string full_name() const { return module + "." + name; }
  bool is(std::string_view m, std::string_view n) const { return module == m && name == n; }
};

// An object the pickle would have built by calling something. Nothing was called: this
// records what would have been.
struct PickleObject {
  enum class Via : uint8_t {
    kReduce,    // callable(*args)
    kNewObj,    // cls.__new__(cls, *args)
    kNewObjEx,  // cls.__new__(cls, *args, **kwargs)
  };
  Via via = Via::kReduce;
  PickleValue callable;  // a kGlobal
  PickleValue args;      // a kTuple
  PickleValue kwargs;    // kNewObjEx: a kDict; None otherwise
  // BUILD's argument (obj.__setstate__(state), or a dict for obj.__dict__.update), if any.
  std::optional<PickleValue> state;
  // Items APPENDed / SETITEMed onto the object itself: how list and dict subclasses such as
  // collections.OrderedDict carry their contents.
  std::vector<PickleValue> list_items;
  std::vector<std::pair<PickleValue, PickleValue>> dict_items;

  // The callable's global (REDUCE) or the class (NEWOBJ). Always set in trees from
  // pickle_loads.
  const PickleGlobal* global() const { return callable.if_global(); }
  bool is(std::string_view module, std::string_view name) const {
    const PickleGlobal* g = global();
    return g != nullptr && g->is(module, name);
  }
};

// What torch.save's persistent_id returned for a storage: the tuple
// ("storage", storage_class, key, location, numel), unresolved.
struct PicklePersistentId {
  PickleValue id;
};

// The globals a pickle may name, as (module, name) pairs: "collections", "OrderedDict".
class PickleAllowList {
 public:
  PickleAllowList() = default;
  PickleAllowList(std::initializer_list<std::pair<std::string_view, std::string_view>> globals);
  void allow(std::string_view module, std::string_view name);
  void allow_all(const PickleAllowList& other);
  bool allows(std::string_view module, std::string_view name) const;

 private:
  std::set<std::pair<std::string, std::string>> globals_;
};

struct PickleReadOptions {
  // The globals the pickle may name; borrowed for the call. nullptr allows none.
  const PickleAllowList* allow = nullptr;
  // Whether PERSID / BINPERSID may appear (torch.save's data.pkl: yes; DCP metadata: no).
  bool allow_persistent_ids = false;
  // The deepest nesting of containers and objects in the result ([[1]] is 2 deep).
  size_t max_depth = 200;
  // Inputs larger than this are refused before parsing.
  size_t max_bytes = size_t{1} << 32;
  // Bounds on the result as a tree, i.e. with every shared reference (memo GET, DUP) expanded,
  // which is what a consumer that walks it (conversion, JSON, repr) builds or visits: the
  // number of nodes (containers and scalars) and the bytes of its strings and bytes. Counted
  // once per distinct node while validating, so a "billion laughs" pickle (a few hundred
  // bytes whose memo references the same list 10 times, 40 levels deep) is refused in
  // microseconds. A pickle without sharing never expands past its own size, so the limits
  // applied are max(these, the input's size in bytes): 4 Mi nodes, 256 MiB of text.
  uint64_t max_expanded_nodes = uint64_t{1} << 22;
  uint64_t max_expanded_bytes = uint64_t{256} << 20;
};

// Reads one pickle from `data` (borrowed for the call) and returns its top-level object.
// Bytes after the STOP opcode are ignored, as Python does.
//
// Interpreted, never executed:
// - GLOBAL / STACK_GLOBAL push a PickleGlobal if `options.allow` names it (Python 2 module
//   names "__builtin__" and "copy_reg" are read as "builtins" and "copyreg");
// - REDUCE / NEWOBJ / NEWOBJ_EX push a PickleObject; BUILD sets its state; APPEND(S) and
//   SETITEM(S) onto an object fill its list_items / dict_items;
// - these pure reductions are folded into plain values: `_codecs.encode(s, "latin1")` and
//   `builtins.bytes()` / `builtins.bytearray(b)` become bytes (how protocol 2 writes bytes),
//   `builtins.set(list)` / `builtins.frozenset(list)` become sets;
// - protocol-0 STRING / BINSTRING / SHORT_BINSTRING (Python 2 str) become str when they are
//   valid UTF-8, bytes otherwise.
//
// Errors:
// - kUnsupported: a global outside the allow-list (the message names it as "module.name"),
//   a persistent id when not allowed, an int beyond int64, a protocol above 5, and opcodes
//   that need Python's runtime (INST, OBJ, EXT1/2/4, out-of-band buffers);
// - kCorrupt, with the byte offset of the offending opcode: truncated data, an unknown
//   opcode, stack underflow, a missing MARK, an unknown memo index, a length past the end,
//   invalid UTF-8, a wrong operand type (REDUCE on a non-global, BUILD on a non-object,
//   APPEND to a non-list...), a cycle, nesting deeper than `max_depth`, input larger than
//   `max_bytes`, a result whose expansion exceeds `max_expanded_nodes` / `max_expanded_bytes`.
Result<PickleValue> pickle_loads(std::string_view data, const PickleReadOptions& options);

struct PickleWriteOptions {
  size_t max_depth = 200;
};

// Writes `root` as a protocol-2 pickle, using only the opcodes torch's weights-only
// unpickler accepts (so torch.load(weights_only=True) can read what allow-listed globals it
// holds): strings as BINUNICODE, bytes as `_codecs.encode(latin1_text, "latin1")`, sets as
// `builtins.set([...])`, ints as BININT1/BININT2/BININT/LONG1, floats as BINFLOAT. A node
// reachable more than once (a shared list, object, string) is written once and memoised
// (BINPUT / BINGET), so sharing survives the round trip; each global is written once.
//
// Errors (kInvalidArgument): a cycle, nesting deeper than `max_depth`, a string that is not
// UTF-8, a global whose module or name contains a newline, an object whose callable is not a
// global or whose args are not a tuple, a NEWOBJ_EX object (needs protocol 4).
Result<std::string> pickle_dumps(const PickleValue& root, const PickleWriteOptions& options = {});

// The kind's name as Python would say it: "NoneType", "int", "str", "tuple"...
std::string_view pickle_kind_name(PickleValue::Kind kind);

// A short Python-like rendering for error messages: 'abc', (1, 2), collections.OrderedDict(...).
// Cut at about `max_chars` characters.
std::string pickle_repr(const PickleValue& value, size_t max_chars = 80);

}  // namespace dsd
