// get/set_model_state_dict (PyTorch's _get_model_state_dict / _load_model_state_dict).
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <unordered_set>

#include "core/base/format.h"
#include "core/base/torch_call.h"
#include "core/dist/layout.h"
#include "core/statedict/detail.h"
#include "core/statedict/full_sharded.h"
#include "core/statedict/state_dict.h"
#include "core/tensor/dtype_torch.h"

namespace dsd {
namespace detail {

Result<DictPtr> build_model_state_dict(Model& model, const Info& info) {
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

// The tensor to copy from for an entry: the value itself, or this rank's slice of a full
// tensor given for a sharded entry.
Result<at::Tensor> source_for(const ModelEntry& e, const TensorValue& src) {
  const TensorValue& dst = e.tensor;
  if (dst.is_dist() && !src.is_dist()) return local_slice(src.tensor, *dst.layout, e.prefixed);
  if (!dst.is_dist() && src.is_dist()) {
    const Chunk local = src.layout->local_chunk();
    if (local.sizes != src.layout->global_shape()) {
      return make_error_at(Code::kUnsupported, e.prefixed,
                           "'{}' is given as a sharded tensor ({}) but the model's tensor is not "
                           "sharded; pass a full state dict instead",
                           e.prefixed, src.layout->str());
    }
  }
  if (dst.is_dist() && src.is_dist() && !(*dst.layout == *src.layout)) {
    if (!(dst.layout->global_shape() == src.layout->global_shape())) {
      return src.tensor;  // reported as a size mismatch below, on global shapes
    }
    return make_error_at(Code::kUnsupported, e.prefixed,
                         "'{}' is sharded as {} but the state dict holds it as {}; resharding a "
                         "sharded state dict needs a full state dict or a checkpoint load",
                         e.prefixed, dst.layout->str(), src.layout->str());
  }
  return src.tensor;
}

}  // namespace

namespace {

struct LoadPlan {
  std::vector<Assignment> assignments;
  std::vector<at::Tensor> sources;  // per assignment; undefined for extra state
  IncompatibleKeys keys;
};

// Everything a load checks before writing: missing and unexpected keys, kinds, shapes,
// dtypes, read-only destinations. Local to this rank; the caller agrees on it collectively.
Result<LoadPlan> plan_model_load(Model& model, std::vector<ModelEntry>& entries, const Dict& sd,
                                 const Info& info) {
  const StateDictOptions& o = info.options;
  LoadPlan plan;
  IncompatibleKeys& result = plan.keys;
  plan.assignments.reserve(entries.size());
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
    plan.assignments.push_back({i, v});
  }
  for (const auto& kv : sd) {
    if (!used.contains(kv.key)) result.unexpected_keys.push_back(kv.key);
  }

  // nn.Module's error_msgs, plus dsd's dtype and read-only checks.
  std::vector<std::string> errors;
  Code code = Code::kShapeMismatch;
  plan.sources.resize(plan.assignments.size());
  for (size_t k = 0; k < plan.assignments.size(); ++k) {
    const ModelEntry& e = entries[plan.assignments[k].entry];
    const Value& v = *plan.assignments[k].value;
    if (e.kind == EntryKind::kExtraState) continue;
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
    Result<at::Tensor> s = source_for(e, *src);
    if (!s.ok()) {
      errors.push_back(s.error().message);
      code = s.error().code;
      continue;
    }
    plan.sources[k] = std::move(s).value();
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

Result<IncompatibleKeys> load_model_state_dict(Model& model, const Dict& sd, const Info& info) {
  if (!info.handle_model || (sd.empty() && !info.options.broadcast_from_rank0)) return IncompatibleKeys{};
  std::vector<ModelEntry>& entries = model.entries();
  auto resolved = model.resolved();
  Result<LoadPlan> planned = resolved.ok() ? plan_model_load(model, entries, sd, info)
                                           : Result<LoadPlan>(resolved.error());
  TRY(agree_status(info, planned.ok() ? ok() : Status(planned.error())));
  LoadPlan& plan = planned.value();

  for (size_t k = 0; k < plan.assignments.size(); ++k) {
    ModelEntry& e = entries[plan.assignments[k].entry];
    if (e.kind == EntryKind::kExtraState) {
      e.extra_state = *plan.assignments[k].value;
      continue;
    }
    at::Tensor& dst = e.tensor.tensor;
    const at::Tensor& src = plan.sources[k];
    if (dst.is_same(src)) continue;
    TRY(torch_call(Code::kInternal, fmt::format("copying into '{}'", e.prefixed), [&] { dst.copy_(src); }));
  }
  return std::move(plan.keys);
}

}  // namespace detail

Result<DictPtr> get_model_state_dict(Model& model, const StateDictOptions& options,
                                     std::span<const std::string> submodules) {
  detail::Info info = TRY(detail::verify_options(model, 0, false, submodules, options));
  DictPtr sd = TRY(detail::build_model_state_dict(model, info));
  TRY(detail::verify_state_dict(sd.get(), nullptr, info));
  return sd;
}

Result<IncompatibleKeys> set_model_state_dict(Model& model, const Dict& state_dict,
                                              const StateDictOptions& options) {
  detail::Info info = TRY(detail::verify_options(model, 0, false, {}, options));
  TRY(detail::verify_state_dict(&state_dict, nullptr, info));
  return detail::load_model_state_dict(model, state_dict, info);
}

}  // namespace dsd
