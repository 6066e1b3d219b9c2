// Models and optimizers: the registries of a trainer's tensors, param groups and state.
#include "capi/src/export.h"

#include <memory>
#include <span>
#include <vector>

#include "capi/src/dists.h"
#include "capi/src/guard.h"
#include "capi/src/models.h"
#include "capi/src/state_dicts.h"
#include "capi/src/tensors.h"
#include "core/base/make_error.h"

namespace dsd::capi {
namespace {

Result<size_t> pid_of(const dsd_optim* optim, dsd_tensor param) {
  TensorValue t = TRY(lookup(param));
  auto pid = optim->optim.find_param(t);
  if (!pid) return Error(Code::kNotFound, "the tensor is not a parameter of any param group of this optimizer");
  return *pid;
}

// DSD_WRAPPER_* (from 1) to the core's WrapperKind; 0 and unknown codes are refused.
Result<WrapperKind> wrapper_kind(dsd_wrapper_kind kind) {
  switch (kind) {
    case DSD_WRAPPER_DDP: return WrapperKind::kDdp;
    case DSD_WRAPPER_FSDP: return WrapperKind::kFsdp;
    case DSD_WRAPPER_COMPILE: return WrapperKind::kCompile;
    case DSD_WRAPPER_CHECKPOINT: return WrapperKind::kCheckpoint;
    default: return make_error(Code::kInvalidArgument, "unknown wrapper kind {} (DSD_WRAPPER_*)", kind);
  }
}

}  // namespace
}  // namespace dsd::capi

using dsd::Code;
using dsd::capi::guard;
using dsd::capi::require;

extern "C" {

dsd_status dsd_model_new(dsd_comm* comm, const char* class_name, dsd_model** out, dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    TRY(require(out, "out"));
    std::shared_ptr<dsd::Communicator> c = comm != nullptr ? comm->comm : nullptr;
    *out = new dsd_model(dsd::Model(std::move(c), class_name != nullptr ? class_name : "Model"));
    return dsd::ok();
  });
}

void dsd_model_free(dsd_model* model) { delete model; }

dsd_status dsd_model_add_parameter(dsd_model* model, const char* name, dsd_tensor tensor,
                                   bool requires_grad, dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    TRY(require(model, "model"));
    TRY(require(name, "name"));
    dsd::TensorValue t = TRY(dsd::capi::lookup(tensor));
    return model->model.add_parameter(name, std::move(t), requires_grad);
  });
}

dsd_status dsd_model_add_buffer(dsd_model* model, const char* name, dsd_tensor tensor, bool persistent,
                                dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    TRY(require(model, "model"));
    TRY(require(name, "name"));
    dsd::TensorValue t = TRY(dsd::capi::lookup(tensor));
    return model->model.add_buffer(name, std::move(t), persistent);
  });
}

dsd_status dsd_model_add_extra_state(dsd_model* model, const char* name, const dsd_state_dict* holder,
                                     size_t index, dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    TRY(require(model, "model"));
    TRY(require(name, "name"));
    TRY(require(holder, "holder"));
    const dsd::Value* v = nullptr;
    if (const dsd::Dict* d = holder->node.if_dict()) {
      if (index < d->size()) v = &d->value_at(index);
    } else if (const dsd::List* l = holder->node.if_list()) {
      if (index < l->size()) v = &(*l)[index];
    }
    if (v == nullptr) return dsd::make_error(Code::kInvalidArgument, "index {} is out of range for holder", index);
    return model->model.add_extra_state(name, *v);
  });
}

dsd_status dsd_model_add_extra_state_bytes(dsd_model* model, const char* name, const void* data, size_t len,
                                           dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    TRY(require(model, "model"));
    TRY(require(name, "name"));
    if (len > 0) TRY(require(data, "data"));
    std::string bytes(static_cast<const char*>(data), len);
    return model->model.add_extra_state(name, dsd::Value(dsd::Bytes{std::move(bytes)}));
  });
}

dsd_status dsd_model_declare_wrapper(dsd_model* model, const char* module_path, dsd_wrapper_kind kind,
                                     dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    TRY(require(model, "model"));
    TRY(require(module_path, "module_path"));
    const dsd::WrapperKind k = TRY(dsd::capi::wrapper_kind(kind));
    return model->model.declare_wrapper(module_path, k);
  });
}

dsd_status dsd_model_add_fqn_modifier(dsd_model* model, const char* module_path, const char* segment,
                                      const char* child, dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    TRY(require(model, "model"));
    TRY(require(module_path, "module_path"));
    TRY(require(segment, "segment"));
    TRY(require(child, "child"));
    return model->model.add_fqn_modifier(module_path, segment, child);
  });
}

dsd_status dsd_model_canonical_fqn(const dsd_model* model, const char* raw_name, const char** out,
                                   dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    TRY(require(model, "model"));
    TRY(require(raw_name, "raw_name"));
    TRY(require(out, "out"));
    dsd::CanonicalName c = TRY(model->model.rules().canonicalize(raw_name));
    *out = model->keep(std::move(c.fqn));
    return dsd::ok();
  });
}

dsd_status dsd_model_entries(const dsd_model* model, dsd_state_dict** out, dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    TRY(require(model, "model"));
    TRY(require(out, "out"));
    auto d = dsd::Dict::make();
    for (const dsd::ModelEntry& e : model->model.entries()) {
      d->append_unique(e.name, e.kind == dsd::EntryKind::kExtraState ? e.extra_state : dsd::Value(e.tensor));
    }
    *out = dsd::capi::wrap(d);
    return dsd::ok();
  });
}

dsd_status dsd_optim_new(dsd_optim** out, dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    TRY(require(out, "out"));
    *out = new dsd_optim{};
    return dsd::ok();
  });
}

void dsd_optim_free(dsd_optim* optim) { delete optim; }

dsd_status dsd_optim_add_param_group(dsd_optim* optim, dsd_state_dict* options, const dsd_tensor* params,
                                     size_t count, dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    TRY(require(optim, "optim"));
    if (count > 0) TRY(require(params, "params"));
    dsd::DictPtr opts;
    if (options != nullptr) {
      TRY(dsd::capi::as_dict(options, "options"));
      opts = options->node.dict_ptr();
    }
    std::vector<dsd::TensorValue> ps;
    ps.reserve(count);
    for (size_t i = 0; i < count; ++i) ps.push_back(TRY(dsd::capi::lookup(params[i])));
    return optim->optim.add_param_group(std::move(opts), std::move(ps));
  });
}

dsd_status dsd_optim_set_param_state(dsd_optim* optim, dsd_tensor param, dsd_state_dict* state,
                                     dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    TRY(require(optim, "optim"));
    const size_t pid = TRY(dsd::capi::pid_of(optim, param));
    dsd::DictPtr st;
    if (state != nullptr) {
      TRY(dsd::capi::as_dict(state, "state"));
      st = state->node.dict_ptr();
    }
    return optim->optim.set_state(pid, std::move(st));
  });
}

dsd_status dsd_optim_get_param_state(const dsd_optim* optim, dsd_tensor param, dsd_state_dict** out,
                                     dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    TRY(require(optim, "optim"));
    TRY(require(out, "out"));
    const size_t pid = TRY(dsd::capi::pid_of(optim, param));
    const dsd::DictPtr& st = optim->optim.state(pid);
    if (st == nullptr) return dsd::make_error(Code::kNotFound, "parameter {} has no optimizer state", pid);
    *out = dsd::capi::wrap(st);
    return dsd::ok();
  });
}

dsd_status dsd_optim_param_group_count(const dsd_optim* optim, size_t* out, dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    TRY(require(optim, "optim"));
    TRY(require(out, "out"));
    *out = optim->optim.groups().size();
    return dsd::ok();
  });
}

dsd_status dsd_optim_get_param_group(const dsd_optim* optim, size_t index, dsd_state_dict** out, dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    TRY(require(optim, "optim"));
    TRY(require(out, "out"));
    if (index >= optim->optim.groups().size()) {
      return dsd::make_error(Code::kInvalidArgument, "param group {} is out of range ({} groups)", index,
                             optim->optim.groups().size());
    }
    *out = dsd::capi::wrap(optim->optim.groups()[index].options);
    return dsd::ok();
  });
}

dsd_status dsd_optim_set_materialize(dsd_optim* optim, dsd_materialize_fn fn, void* user_data,
                                     dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    TRY(require(optim, "optim"));
    if (fn == nullptr) {
      optim->optim.set_materialize(nullptr);
      return dsd::ok();
    }
    optim->optim.set_materialize([optim, fn, user_data](dsd::Optimizer& o,
                                                        std::span<const size_t> missing) -> dsd::Status {
      std::vector<dsd_tensor> handles;
      handles.reserve(missing.size());
      for (size_t pid : missing) handles.push_back(dsd::capi::make_handle(o.param(pid)));
      const dsd_status st = fn(user_data, optim, handles.data(), missing.data(), handles.size());
      for (dsd_tensor h : handles) (void)dsd::capi::tensor_table().release(h.bits);
      if (st != DSD_OK) return dsd::make_error(Code::kCallback, "it returned status {}", st);
      return dsd::ok();
    });
    return dsd::ok();
  });
}

}  // extern "C"
