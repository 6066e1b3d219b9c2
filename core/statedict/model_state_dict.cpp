// get/set_model_state_dict (PyTorch's _get_model_state_dict / _load_model_state_dict).
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <unordered_set>

#include "core/base/make_error.h"
#include "core/base/torch_call.h"
#include "core/dist/layout.h"
#include "core/statedict/state_dict_info.h"
#include "core/statedict/full_sharded.h"
#include "core/statedict/skeleton.h"
#include "core/dist/comm.h"

#include <ATen/ops/empty.h>
#include "core/statedict/state_dict.h"
#include "core/tensor/dtype_torch.h"

namespace dsd {
namespace detail {

Result<DictPtr> build_model_state_dict(Model& model, const StateDictInfo& info) {
  const std::vector<ModelEntry>& entries = *TRY(model.resolved());
  auto sd = Dict::make();
  sd->reserve(entries.size());
  for (const ModelEntry& e : entries) {
    if (e.kind == EntryKind::kBuffer && !e.persistent) continue;
    Value v = e.kind == EntryKind::kExtraState ? e.extra_state : Value(e.tensor);
    if (!info.submodule_prefixes.empty()) {
      bool kept = false;
      for (const std::string& prefix : info.submodule_prefixes) {
        if (!e.fqn.starts_with(prefix)) continue;
        kept = true;
        sd->set(info.options.keep_submodule_prefixes ? e.fqn : e.fqn.substr(prefix.size()), v);
      }
      (void)kept;
      continue;
    }
    sd->append_unique(e.fqn, std::move(v));
  }
  if (info.options.ignore_frozen_params) {
    // As PyTorch: named_parameters() names each parameter once (its first FQN), and only that
    // key is dropped; a missing key is skipped rather than raising KeyError.
    for (const Model::ParamFqns& p : *TRY(model.parameters())) {
      if (!p.requires_grad) sd->erase(p.fqns.front());
    }
  }
  return maybe_full_or_cpu_state_dict(std::move(sd), info);
}

namespace {

struct Assignment {
  size_t entry;
  const Value* value;
};

std::string quoted_list(const std::vector<std::string>& keys) {
  std::vector<std::string> q;
  q.reserve(keys.size());
  for (const std::string& k : keys) q.push_back(fmt::format("\"{}\"", k));
  return fmt::format("{}", fmt::join(q, ", "));
}

}  // namespace

namespace {

struct LoadPlan {
  std::vector<CopyJob> copies;
  std::vector<std::pair<size_t, Value>> extra_states;     // entry, loaded value
  std::vector<std::pair<size_t, at::Tensor>> assigned;    // meta entries given new tensors
  IncompatibleKeys keys;
};

// Everything a load checks before writing: missing and unexpected keys, kinds, shapes,
// dtypes, read-only destinations. Local to this rank; the caller agrees on it collectively.
Result<LoadPlan> plan_model_load(Model& model, std::vector<ModelEntry>& entries, const Dict& sd,
                                 const StateDictInfo& info, std::optional<c10::Device> assign_device) {
  const StateDictOptions& o = info.options;
  LoadPlan plan;
  IncompatibleKeys& result = plan.keys;
  std::vector<Assignment> assignments;
  assignments.reserve(entries.size());
  std::unordered_set<std::string_view> used;
  used.reserve(entries.size());
  for (size_t i = 0; i < entries.size(); ++i) {
    const ModelEntry& e = entries[i];
    if (e.kind == EntryKind::kBuffer && !e.persistent) continue;
    const Value* v = sd.find(e.fqn);
    if (v == nullptr) {
      if (e.fqn != e.prefixed && o.strict) {
        return make_error_at(Code::kNotFound, e.fqn, "Missing key: {}.", e.fqn);
      }
      result.missing_keys.push_back(e.prefixed);
      continue;
    }
    used.insert(e.fqn);
    assignments.push_back({i, v});
  }
  for (const auto& kv : sd) {
    if (!used.contains(kv.key)) result.unexpected_keys.push_back(kv.key);
  }

  // nn.Module's error_msgs, plus dsd's dtype and read-only checks.
  std::vector<std::string> errors;
  Code code = Code::kShapeMismatch;
  for (const Assignment& a : assignments) {
    const ModelEntry& e = entries[a.entry];
    const Value& v = *a.value;
    if (e.kind == EntryKind::kExtraState) {
      plan.extra_states.emplace_back(a.entry, v);
      continue;
    }
    const TensorValue* src = v.if_tensor();
    if (src == nullptr) {
      errors.push_back(fmt::format(
          "While copying the parameter named \"{}\", expected torch.Tensor or Tensor-like object "
          "from checkpoint but received {}",
          e.prefixed, python_type_name(v)));
      code = Code::kWrongKind;
      continue;
    }
    const TensorValue& dst = e.tensor;
    const auto dst_shape = dst.is_dist() ? c10::IntArrayRef(dst.layout->global_shape()) : dst.tensor.sizes();
    const auto src_shape = src->is_dist() ? c10::IntArrayRef(src->layout->global_shape()) : src->tensor.sizes();
    if (dst_shape != src_shape) {
      errors.push_back(fmt::format(
          "size mismatch for {}: copying a param with shape {} from checkpoint, the shape in current "
          "model is {}.",
          e.prefixed, torch_size_str(src_shape), torch_size_str(dst_shape)));
      continue;
    }
    if (dst.tensor.scalar_type() != src->tensor.scalar_type()) {
      errors.push_back(fmt::format(
          "dtype mismatch for {}: copying a param with dtype torch.{} from checkpoint, the dtype in "
          "current model is torch.{}.",
          e.prefixed, c10::toString(src->tensor.scalar_type()), c10::toString(dst.tensor.scalar_type())));
      code = Code::kDtypeMismatch;
      continue;
    }
    if (dst.read_only) {
      errors.push_back(fmt::format("{} was imported read-only; dsd does not write into it.", e.prefixed));
      code = Code::kReadOnly;
      continue;
    }
    Result<CopySource> source = copy_source(dst, *src, e.prefixed);
    if (!source.ok()) {
      errors.push_back(source.error().message);
      code = source.error().code;
      continue;
    }
    at::Tensor target = dst.tensor;
    if (target.is_meta()) {
      // A meta-initialised model (LoRA, deferred init): like load_state_dict(assign=True), the
      // entry gets a new tensor, materialised where the other tensors live.
      const at::Tensor like = source->view();
      target = at::empty(like.sizes(), at::TensorOptions().dtype(like.scalar_type())
                                           .device(assign_device.value_or(c10::Device(c10::DeviceType::CPU))));
      plan.assigned.emplace_back(a.entry, target);
    }
    plan.copies.push_back(CopyJob{target, std::move(source).value(), fmt::format("'{}'", e.prefixed)});
  }
  if (o.strict) {
    std::vector<std::string> head;
    if (!result.missing_keys.empty()) {
      head.push_back(fmt::format("Missing key(s) in state_dict: {}. ", quoted_list(result.missing_keys)));
      code = Code::kNotFound;
    } else if (!result.unexpected_keys.empty()) {
      code = Code::kUnexpectedKey;
    }
    if (!result.unexpected_keys.empty()) {
      head.push_back(fmt::format("Unexpected key(s) in state_dict: {}. ", quoted_list(result.unexpected_keys)));
    }
    errors.insert(errors.begin(), head.begin(), head.end());
  }
  if (!errors.empty()) {
    return make_error(code, "Error(s) in loading state_dict for {}:\n\t{}", model.class_name(),
                      fmt::join(errors, "\n\t"));
  }
  return plan;
}

}  // namespace

// PyTorch's device choice for full and broadcast loads: the one real device of the model's
// tensors (meta ones do not count), else the communicator's.
Result<std::optional<c10::Device>> load_device(const std::vector<ModelEntry>& entries, const StateDictInfo& info) {
  std::optional<c10::Device> device;
  for (const ModelEntry& e : entries) {
    if (e.kind == EntryKind::kExtraState || e.tensor.tensor.dim() == 0 || e.tensor.tensor.is_meta()) continue;
    if (device && *device != e.tensor.tensor.device()) return Error(Code::kDevice, "Multiple devices found");
    device = e.tensor.tensor.device();
  }
  if (!device && info.comm != nullptr) device = c10::Device(info.comm->device_type());
  return device;
}

Result<IncompatibleKeys> load_model_state_dict(Model& model, const Dict& sd, const StateDictInfo& info) {
  const StateDictOptions& o = info.options;
  if (!info.handle_model || (sd.empty() && !o.broadcast_from_rank0)) return IncompatibleKeys{};
  std::vector<ModelEntry>& entries = model.entries();
  const bool broadcast = o.broadcast_from_rank0 && info.comm != nullptr;

  // Under broadcast_from_rank0 every rank plans against rank 0's skeleton.
  RankZeroSkeleton skeleton;
  if (broadcast) skeleton = TRY(broadcast_skeleton(*info.comm, sd));
  const Dict& effective = broadcast ? *skeleton.root : sd;

  Result<LoadPlan> planned = [&]() -> Result<LoadPlan> {
    TRY(model.resolved());
    std::optional<c10::Device> device;
    if (o.full_state_dict || o.broadcast_from_rank0) device = TRY(load_device(entries, info));
    return plan_model_load(model, entries, effective, info, device);
  }();
  TRY(agree_status(info, planned.ok() ? ok() : Status(planned.error())));
  LoadPlan& plan = planned.value();

  if (broadcast) {
    TRY(broadcast_copies(*info.comm, skeleton.rank0_tensors, skeleton.placeholders, plan.copies, o.bucket_bytes));
  } else {
    TRY(run_copies(plan.copies));
  }
  for (auto& [entry, tensor] : plan.assigned) entries[entry].tensor.tensor = tensor;
  for (auto& [entry, value] : plan.extra_states) entries[entry].extra_state = std::move(value);
  return std::move(plan.keys);
}

}  // namespace detail

}  // namespace dsd
