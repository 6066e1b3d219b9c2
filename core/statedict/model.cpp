#include "core/statedict/model.h"

#include "core/base/make_error.h"
#include "core/dist/layout.h"

namespace dsd {

TensorIdentity TensorIdentity::of(const TensorValue& t) {
  TensorIdentity id;
  const at::Tensor& x = t.tensor;
  if (!x.defined()) return id;
  id.data = x.numel() == 0 ? nullptr : x.data_ptr();
  id.sizes.assign(x.sizes().begin(), x.sizes().end());
  id.strides.assign(x.strides().begin(), x.strides().end());
  id.dtype = static_cast<int32_t>(x.scalar_type());
  id.device_type = static_cast<int32_t>(x.device().type());
  id.device_index = x.device().index();
  id.layout = t.layout;
  // Empty tensors have no data pointer: tell them apart by their storage.
  if (id.data == nullptr) id.data = x.storage().unsafeGetStorageImpl();
  id.storage_offset = x.storage_offset();
  return id;
}

bool TensorIdentity::operator==(const TensorIdentity& o) const {
  if (data != o.data || sizes != o.sizes || strides != o.strides || dtype != o.dtype ||
      device_type != o.device_type || device_index != o.device_index ||
      storage_offset != o.storage_offset) {
    return false;
  }
  if ((layout == nullptr) != (o.layout == nullptr)) return false;
  return layout == nullptr || layout == o.layout || *layout == *o.layout;
}

size_t TensorIdentityHash::operator()(const TensorIdentity& id) const {
  size_t h = std::hash<const void*>{}(id.data);
  for (int64_t s : id.sizes) h = h * 31 + std::hash<int64_t>{}(s);
  return h ^ (static_cast<size_t>(id.dtype) << 7);
}

Model::Model(std::shared_ptr<Communicator> comm, std::string class_name)
    : comm_(std::move(comm)), class_name_(std::move(class_name)) {}

Status Model::add(ModelEntry entry) {
  if (entry.name.empty()) return Error(Code::kInvalidArgument, "an entry name is empty");
  if (entry.kind != EntryKind::kExtraState && !entry.tensor.tensor.defined()) {
    return make_error_at(Code::kInvalidArgument, entry.name, "'{}' has no tensor", entry.name);
  }
  if (entry.kind == EntryKind::kExtraState) {
    const std::string_view n = entry.name;
    if (n != "_extra_state" && !n.ends_with("._extra_state")) {
      return make_error_at(Code::kInvalidArgument, entry.name,
                           "extra state '{}' must be named '<module>._extra_state'", entry.name);
    }
  }
  auto [it, inserted] = by_raw_.emplace(entry.name, entries_.size());
  if (!inserted) {
    return make_error_at(Code::kInvalidArgument, entry.name, "'{}' is registered twice", entry.name);
  }
  entries_.push_back(std::move(entry));
  resolved_ = false;
  return ok();
}

Status Model::add_parameter(std::string name, TensorValue tensor, bool requires_grad) {
  ModelEntry e;
  e.name = std::move(name);
  e.kind = EntryKind::kParameter;
  e.requires_grad = requires_grad;
  e.tensor = std::move(tensor);
  return add(std::move(e));
}

Status Model::add_buffer(std::string name, TensorValue tensor, bool persistent) {
  ModelEntry e;
  e.name = std::move(name);
  e.kind = EntryKind::kBuffer;
  e.persistent = persistent;
  e.requires_grad = false;
  e.tensor = std::move(tensor);
  return add(std::move(e));
}

Status Model::add_extra_state(std::string name, Value value) {
  ModelEntry e;
  e.name = std::move(name);
  e.kind = EntryKind::kExtraState;
  e.requires_grad = false;
  e.extra_state = std::move(value);
  return add(std::move(e));
}

Status Model::declare_wrapper(std::string module_path, WrapperKind kind) {
  resolved_ = false;
  return rules_.declare_wrapper(std::move(module_path), kind);
}

Status Model::add_fqn_modifier(std::string module_path, std::string segment, std::string child) {
  resolved_ = false;
  return rules_.add_modifier(std::move(module_path), std::move(segment), std::move(child));
}

Status Model::resolve_now() {
  by_fqn_.clear();
  params_.clear();
  param_by_id_.clear();
  by_fqn_.reserve(entries_.size());
  for (size_t i = 0; i < entries_.size(); ++i) {
    ModelEntry& e = entries_[i];
    if (rules_.empty() && e.name.find("_checkpoint_wrapped_module") == std::string::npos &&
        e.name.find("_orig_mod") == std::string::npos &&
        e.name.find("_fsdp_wrapped_module") == std::string::npos &&
        e.name.find("._extra_state.") == std::string::npos && !e.name.starts_with("_extra_state.") &&
        e.name.find("..") == std::string::npos && e.name.front() != '.' && e.name.back() != '.') {
      e.fqn = e.name;  // the common case: nothing to strip
      e.prefixed = e.name;
    } else {
      CanonicalName c = TRY(rules_.canonicalize(e.name));
      e.fqn = std::move(c.fqn);
      e.prefixed = std::move(c.prefixed);
    }
    by_fqn_.emplace(e.fqn, i);  // the first entry of an FQN wins
    if (e.kind != EntryKind::kParameter) continue;
    TensorIdentity id = TensorIdentity::of(e.tensor);
    auto [it, inserted] = param_by_id_.emplace(std::move(id), params_.size());
    if (inserted) {
      params_.push_back(ParamFqns{it->first, {e.fqn}, e.requires_grad, i});
    } else {
      params_[it->second].fqns.push_back(e.fqn);
    }
  }
  resolved_ = true;
  return ok();
}

Result<const std::vector<ModelEntry>*> Model::resolved() {
  if (!resolved_) TRY(resolve_now());
  return &entries_;
}

std::optional<size_t> Model::find_raw(std::string_view raw_name) const {
  auto it = by_raw_.find(std::string(raw_name));
  if (it == by_raw_.end()) return std::nullopt;
  return it->second;
}

std::optional<size_t> Model::find_fqn(std::string_view fqn) const {
  auto it = by_fqn_.find(std::string(fqn));
  if (it == by_fqn_.end()) return std::nullopt;
  return it->second;
}

Result<const std::vector<Model::ParamFqns>*> Model::parameters() {
  if (!resolved_) TRY(resolve_now());
  return &params_;
}

std::optional<size_t> Model::find_parameter(const TensorValue& tensor) {
  if (!resolved_ && !resolve_now().ok()) return std::nullopt;
  auto it = param_by_id_.find(TensorIdentity::of(tensor));
  if (it == param_by_id_.end()) return std::nullopt;
  return it->second;
}

}  // namespace dsd
