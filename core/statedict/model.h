// Model: what a trainer registers so dsd can produce and load its state dict.
//
// Entries are registered in state-dict order (per module: parameters, buffers, extra state,
// then children, as nn.Module.state_dict() orders them) under their raw names; tensors are
// referenced, never copied. Tied weights are two names on one tensor: dsd recognises them by
// data pointer, shape, strides, dtype, device and layout, as Python recognises them by id().
// A Model is not internally synchronised.
#pragma once

#include <memory>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "core/base/result.h"
#include "core/statedict/fqn.h"
#include "core/statedict/value.h"

namespace dsd {

class Communicator;

enum class EntryKind : int32_t { kParameter = 0, kBuffer = 1, kExtraState = 2 };

struct ModelEntry {
  std::string name;  // raw name
  EntryKind kind = EntryKind::kParameter;
  bool persistent = true;     // buffers: false never appears in a state dict
  bool requires_grad = true;  // parameters
  TensorValue tensor;         // parameters and buffers
  Value extra_state;          // extra state (any Value)
  // Filled in by Model::resolve():
  std::string fqn;
  std::string prefixed;  // see CanonicalName
};

// Identity of a tensor, as Python's id() of a parameter: same memory seen the same way.
struct TensorIdentity {
  const void* data = nullptr;
  std::vector<int64_t> sizes;
  std::vector<int64_t> strides;
  int32_t dtype = 0;
  int32_t device_type = 0;
  int32_t device_index = 0;
  std::shared_ptr<const Layout> layout;  // compared by value; null when plain
  int64_t storage_offset = 0;

  static TensorIdentity of(const TensorValue& t);
  bool operator==(const TensorIdentity& o) const;
};
struct TensorIdentityHash {
  size_t operator()(const TensorIdentity& id) const;
};

class Model {
 public:
  // `comm` may be null (a single process); `class_name` appears in nn.Module-style messages
  // ("Error(s) in loading state_dict for <class_name>").
  explicit Model(std::shared_ptr<Communicator> comm = nullptr, std::string class_name = "Model");

  Status add_parameter(std::string name, TensorValue tensor, bool requires_grad);
  Status add_buffer(std::string name, TensorValue tensor, bool persistent);
  Status add_extra_state(std::string name, Value value);
  Status declare_wrapper(std::string module_path, WrapperKind kind);
  Status add_fqn_modifier(std::string module_path, std::string segment, std::string child);

  const std::shared_ptr<Communicator>& comm() const { return comm_; }
  const std::string& class_name() const { return class_name_; }

  // Entries with their FQNs computed (once per change of the registry).
  Result<const std::vector<ModelEntry>*> resolved();
  std::vector<ModelEntry>& entries() { return entries_; }
  const std::vector<ModelEntry>& entries() const { return entries_; }

  // Index of the entry of a raw name, or nullopt.
  std::optional<size_t> find_raw(std::string_view raw_name) const;
  // Index of the first entry of a canonical FQN (after resolve()), or nullopt.
  std::optional<size_t> find_fqn(std::string_view fqn) const;

  // Every parameter identity with its canonical FQNs, in registration order: the first FQN
  // is the one named_parameters() gives; more than one means a tied weight.
  struct ParamFqns {
    TensorIdentity id;
    std::vector<std::string> fqns;
    bool requires_grad = true;
    size_t first_entry = 0;
  };
  Result<const std::vector<ParamFqns>*> parameters();
  // The parameter (index into parameters()) a tensor is, or nullopt.
  std::optional<size_t> find_parameter(const TensorValue& tensor);

  const FqnRules& rules() const { return rules_; }

 private:
  Status add(ModelEntry entry);
  Status resolve_now();

  std::shared_ptr<Communicator> comm_;
  std::string class_name_;
  std::vector<ModelEntry> entries_;
  std::unordered_map<std::string, size_t> by_raw_;
  FqnRules rules_;
  bool resolved_ = false;
  std::unordered_map<std::string, size_t> by_fqn_;
  std::vector<ParamFqns> params_;
  std::unordered_map<TensorIdentity, size_t, TensorIdentityHash> param_by_id_;
};

}  // namespace dsd
