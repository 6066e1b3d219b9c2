#include <fmt/format.h>
#include <fmt/ranges.h>

#include <ATen/core/Tensor.h>

#include "core/base/make_error.h"
#include "core/dist/comm.h"
#include "core/dist/layout.h"
#include "core/statedict/state_dict_info.h"
#include "core/statedict/full_sharded.h"

namespace dsd::detail {

Result<StateDictInfo> verify_options(Model& model, size_t num_optimizers, bool optim_only,
                            std::span<const std::string> submodules, const StateDictOptions& options) {
  if (optim_only && num_optimizers == 0) {
    return Error(Code::kInvalidArgument, "Optimizers are not passed in but optim_only is set to True.");
  }
  StateDictInfo info;
  info.options = options;
  info.handle_model = !optim_only;
  info.handle_optim = num_optimizers > 0;
  if (model.comm() != nullptr && model.comm()->size() > 1) {
    info.comm = model.comm().get();
    info.rank = info.comm->rank();
    info.world = info.comm->size();
  }
  for (const std::string& raw : submodules) {
    std::string canonical = TRY(model.rules().canonical_module_path(raw));
    info.submodule_prefixes.push_back(canonical.empty() ? canonical : canonical + ".");
  }
  if (options.broadcast_from_rank0 && !options.full_state_dict) {
    return Error(Code::kInvalidArgument, "full_state_dict must be True when broadcast_from_rank0 is True.");
  }
  return info;
}

Status verify_state_dict(const Dict* model_state_dict, const Dict* optim_state_dict, const StateDictInfo& info) {
  const StateDictOptions& o = info.options;
  if (info.handle_model && model_state_dict != nullptr && model_state_dict->empty() &&
      info.submodule_prefixes.empty() && !o.ignore_frozen_params && !(o.cpu_offload && o.full_state_dict) &&
      o.strict && !o.broadcast_from_rank0) {
    return make_error(Code::kInvalidArgument,
                      "The option indicates that model state_dict is required to save or load, but "
                      "model state_dict is empty.rank = dist.get_rank()={}.",
                      info.rank);
  }
  if (info.handle_optim && optim_state_dict != nullptr && optim_state_dict->empty() &&
      !(o.cpu_offload && o.full_state_dict) && !o.broadcast_from_rank0) {
    return Error(Code::kInvalidArgument,
                 "The option indicates that model state_dict is required to save, or load but optim "
                 "state_dict is empty. {}");
  }
  if (model_state_dict != nullptr) {
    for (const auto& e : *model_state_dict) {
      if (e.key.find("_flat_param") != std::string::npos) {
        return make_error_at(Code::kInvalidArgument, e.key,
                             "{} contains _flat_param. This can happen if the model is not the root module.",
                             e.key);
      }
    }
  }
  return ok();
}

Result<DictPtr> maybe_full_or_cpu_state_dict(DictPtr state_dict, const StateDictInfo& info) {
  const StateDictOptions& o = info.options;
  if (o.full_state_dict) {
    // Only rank 0 keeps the CPU copy when offloading a full state dict across ranks.
    const bool rank0_only = o.cpu_offload && info.world > 1;
    return gather_state_dict(std::move(state_dict), info.comm, o.cpu_offload, rank0_only,
                             o.bucket_bytes);
  }
  if (o.cpu_offload) return offload_state_dict_to_cpu(std::move(state_dict));
  return state_dict;
}

std::string python_type_name(const Value& v) {
  switch (v.kind()) {
    case Kind::kNone: return "<class 'NoneType'>";
    case Kind::kBool: return "<class 'bool'>";
    case Kind::kInt: return "<class 'int'>";
    case Kind::kDouble: return "<class 'float'>";
    case Kind::kString: return "<class 'str'>";
    case Kind::kBytes: return "<class 'bytes'>";
    case Kind::kTensor: return "<class 'torch.Tensor'>";
    case Kind::kList: return v.if_list()->is_tuple() ? "<class 'tuple'>" : "<class 'list'>";
    case Kind::kDict: return "<class 'dict'>";
  }
  return "<class 'object'>";
}

std::string torch_size_str(c10::IntArrayRef sizes) {
  return fmt::format("torch.Size([{}])", fmt::join(sizes, ", "));
}

Status agree_status(const StateDictInfo& info, Status local) {
  if (info.comm == nullptr) return local;
  return agree(*info.comm, std::move(local));
}

}  // namespace dsd::detail
