// Models, optimizers, options and the state-dict functions.
#include "capi/src/export.h"

#include <cstddef>
#include <cstring>
#include <memory>
#include <vector>

#include "capi/src/dists.h"
#include "capi/src/guard.h"
#include "capi/src/state_dicts.h"
#include "capi/src/tensors.h"
#include "core/statedict/state_dict.h"

struct dsd_model {
  dsd::Model model;
};

struct dsd_optim {
  dsd::Optimizer optim;
};

struct dsd_incompatible_keys {
  dsd::IncompatibleKeys keys;
};

namespace dsd::capi {
namespace {

Result<StateDictOptions> read_options(const dsd_options* o) {
  StateDictOptions out;
  if (o == nullptr) return out;
  if (o->struct_size == 0) {
    return Error(Code::kInvalidArgument, "options.struct_size is 0: initialise options with dsd_options_init()");
  }
  const size_t n = o->struct_size;
#define DSD_READ_FIELD(f) \
  if (n >= offsetof(dsd_options, f) + sizeof(o->f)) out.f = o->f
  DSD_READ_FIELD(full_state_dict);
  DSD_READ_FIELD(cpu_offload);
  DSD_READ_FIELD(ignore_frozen_params);
  DSD_READ_FIELD(keep_submodule_prefixes);
  DSD_READ_FIELD(strict);
  DSD_READ_FIELD(broadcast_from_rank0);
  DSD_READ_FIELD(flatten_optimizer_state_dict);
  DSD_READ_FIELD(bucket_bytes);
#undef DSD_READ_FIELD
  if (n >= offsetof(dsd_options, dsd_fqn_modifiers) + sizeof(o->dsd_fqn_modifiers) &&
      o->dsd_fqn_modifiers != nullptr) {
    out.dsd_fqn_modifiers = o->dsd_fqn_modifiers;
  }
  return out;
}

Result<std::vector<Optimizer*>> optimizers(dsd_optim* const* optims, size_t n) {
  if (n > 0) TRY(require(optims, "optims"));
  std::vector<Optimizer*> out;
  out.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    if (optims[i] == nullptr) return make_error(Code::kInvalidArgument, "optims[{}] is NULL", i);
    out.push_back(&optims[i]->optim);
  }
  return out;
}

Result<size_t> pid_of(dsd_optim* optim, dsd_tensor param) {
  TensorValue t = TRY(lookup(param));
  auto pid = optim->optim.find_param(t);
  if (!pid) return Error(Code::kNotFound, "the tensor is not a parameter of any param group of this optimizer");
  return *pid;
}

Result<std::vector<std::string>> strings(const char* const* items, size_t n, const char* what) {
  if (n > 0) TRY(require(items, what));
  std::vector<std::string> out;
  out.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    if (items[i] == nullptr) return make_error(Code::kInvalidArgument, "{}[{}] is NULL", what, i);
    out.emplace_back(items[i]);
  }
  return out;
}

void give_keys(dsd_incompatible_keys** out, IncompatibleKeys keys) {
  if (out != nullptr) *out = new dsd_incompatible_keys{std::move(keys)};
}

Result<const std::string*> key_at(const std::vector<std::string>& keys, size_t index) {
  if (index >= keys.size()) {
    return make_error(Code::kInvalidArgument, "index {} is out of range ({} keys)", index, keys.size());
  }
  return &keys[index];
}

}  // namespace
}  // namespace dsd::capi

using dsd::Code;
using dsd::capi::guard;
using dsd::capi::require;

extern "C" {

void dsd_options_init(dsd_options* options) {
  if (options == nullptr) return;
  const dsd::StateDictOptions d;
  *options = dsd_options{};
  options->struct_size = sizeof(dsd_options);
  options->full_state_dict = d.full_state_dict;
  options->cpu_offload = d.cpu_offload;
  options->ignore_frozen_params = d.ignore_frozen_params;
  options->keep_submodule_prefixes = d.keep_submodule_prefixes;
  options->strict = d.strict;
  options->broadcast_from_rank0 = d.broadcast_from_rank0;
  options->flatten_optimizer_state_dict = d.flatten_optimizer_state_dict;
  options->dsd_fqn_modifiers = "_fqn_modifiers";
  options->bucket_bytes = d.bucket_bytes;
}

dsd_status dsd_model_new(dsd_comm* comm, const char* class_name, dsd_model** out, dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    TRY(require(out, "out"));
    std::shared_ptr<dsd::Communicator> c = comm != nullptr ? comm->comm : nullptr;
    *out = new dsd_model{dsd::Model(std::move(c), class_name != nullptr ? class_name : "Model")};
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
    return model->model.declare_wrapper(module_path, static_cast<dsd::WrapperKind>(kind));
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

dsd_status dsd_model_canonical_fqn(dsd_model* model, const char* raw_name, char* out, size_t capacity,
                                   size_t* len_out, dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    TRY(require(model, "model"));
    TRY(require(raw_name, "raw_name"));
    TRY(require(out, "out"));
    dsd::CanonicalName c = TRY(model->model.rules().canonicalize(raw_name));
    if (len_out != nullptr) *len_out = c.fqn.size();
    if (c.fqn.size() + 1 > capacity) {
      return dsd::make_error(Code::kBufferTooSmall, "the FQN needs {} bytes, {} given", c.fqn.size() + 1, capacity);
    }
    std::memcpy(out, c.fqn.c_str(), c.fqn.size() + 1);
    return dsd::ok();
  });
}

dsd_status dsd_model_entries(dsd_model* model, dsd_state_dict** out, dsd_error** err) {
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
                                     size_t n, dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    TRY(require(optim, "optim"));
    if (n > 0) TRY(require(params, "params"));
    dsd::DictPtr opts;
    if (options != nullptr) {
      TRY(dsd::capi::as_dict(options, "options"));
      opts = options->node.dict_ptr();
    }
    std::vector<dsd::TensorValue> ps;
    ps.reserve(n);
    for (size_t i = 0; i < n; ++i) ps.push_back(TRY(dsd::capi::lookup(params[i])));
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

dsd_status dsd_optim_get_param_state(dsd_optim* optim, dsd_tensor param, dsd_state_dict** out,
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

dsd_status dsd_optim_num_param_groups(dsd_optim* optim, size_t* out, dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    TRY(require(optim, "optim"));
    TRY(require(out, "out"));
    *out = optim->optim.groups().size();
    return dsd::ok();
  });
}

dsd_status dsd_optim_get_param_group(dsd_optim* optim, size_t index, dsd_state_dict** out, dsd_error** err) {
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

dsd_status dsd_get_model_state_dict(dsd_model* model, const dsd_options* options, dsd_state_dict** out,
                                    dsd_error** err) {
  return dsd_get_model_state_dict_submodules(model, nullptr, 0, options, out, err);
}

dsd_status dsd_get_model_state_dict_submodules(dsd_model* model, const char* const* submodules, size_t n,
                                               const dsd_options* options, dsd_state_dict** out,
                                               dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    TRY(require(model, "model"));
    TRY(require(out, "out"));
    dsd::StateDictOptions o = TRY(dsd::capi::read_options(options));
    std::vector<std::string> subs = TRY(dsd::capi::strings(submodules, n, "submodules"));
    dsd::DictPtr sd = TRY(dsd::get_model_state_dict(model->model, o, subs));
    *out = dsd::capi::wrap(sd);
    return dsd::ok();
  });
}

dsd_status dsd_set_model_state_dict(dsd_model* model, const dsd_state_dict* state_dict,
                                    const dsd_options* options, dsd_incompatible_keys** keys_out,
                                    dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    TRY(require(model, "model"));
    dsd::Dict* sd = TRY(dsd::capi::as_dict(state_dict, "state_dict"));
    dsd::StateDictOptions o = TRY(dsd::capi::read_options(options));
    dsd::IncompatibleKeys keys = TRY(dsd::set_model_state_dict(model->model, *sd, o));
    dsd::capi::give_keys(keys_out, std::move(keys));
    return dsd::ok();
  });
}

dsd_status dsd_get_optimizer_state_dict(dsd_model* model, dsd_optim* const* optims, size_t n,
                                        const dsd_options* options, dsd_state_dict** out, dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    TRY(require(model, "model"));
    TRY(require(out, "out"));
    std::vector<dsd::Optimizer*> os = TRY(dsd::capi::optimizers(optims, n));
    dsd::StateDictOptions o = TRY(dsd::capi::read_options(options));
    dsd::DictPtr sd = TRY(dsd::get_optimizer_state_dict(model->model, os, o));
    *out = dsd::capi::wrap(sd);
    return dsd::ok();
  });
}

dsd_status dsd_set_optimizer_state_dict(dsd_model* model, dsd_optim* const* optims, size_t n,
                                        const dsd_state_dict* optim_state_dict, const dsd_options* options,
                                        dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    TRY(require(model, "model"));
    dsd::Dict* sd = TRY(dsd::capi::as_dict(optim_state_dict, "optim_state_dict"));
    std::vector<dsd::Optimizer*> os = TRY(dsd::capi::optimizers(optims, n));
    dsd::StateDictOptions o = TRY(dsd::capi::read_options(options));
    return dsd::set_optimizer_state_dict(model->model, os, *sd, o);
  });
}

dsd_status dsd_get_state_dict(dsd_model* model, dsd_optim* const* optims, size_t n, const dsd_options* options,
                              dsd_state_dict** model_out, dsd_state_dict** optim_out, dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    TRY(require(model, "model"));
    TRY(require(model_out, "model_out"));
    TRY(require(optim_out, "optim_out"));
    std::vector<dsd::Optimizer*> os = TRY(dsd::capi::optimizers(optims, n));
    dsd::StateDictOptions o = TRY(dsd::capi::read_options(options));
    dsd::ModelAndOptimStateDict both = TRY(dsd::get_state_dict(model->model, os, o));
    *model_out = dsd::capi::wrap(both.model);
    *optim_out = dsd::capi::wrap(both.optim);
    return dsd::ok();
  });
}

dsd_status dsd_set_state_dict(dsd_model* model, dsd_optim* const* optims, size_t n,
                              const dsd_state_dict* model_state_dict, const dsd_state_dict* optim_state_dict,
                              const dsd_options* options, dsd_incompatible_keys** keys_out, dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    TRY(require(model, "model"));
    dsd::Dict* msd = TRY(dsd::capi::as_dict(model_state_dict, "model_state_dict"));
    dsd::Dict* osd = TRY(dsd::capi::as_dict(optim_state_dict, "optim_state_dict"));
    std::vector<dsd::Optimizer*> os = TRY(dsd::capi::optimizers(optims, n));
    dsd::StateDictOptions o = TRY(dsd::capi::read_options(options));
    dsd::IncompatibleKeys keys = TRY(dsd::set_state_dict(model->model, os, *msd, *osd, o));
    dsd::capi::give_keys(keys_out, std::move(keys));
    return dsd::ok();
  });
}

dsd_status dsd_incompatible_keys_count(const dsd_incompatible_keys* keys, size_t* missing, size_t* unexpected,
                                       dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    TRY(require(keys, "keys"));
    TRY(require(missing, "missing"));
    TRY(require(unexpected, "unexpected"));
    *missing = keys->keys.missing_keys.size();
    *unexpected = keys->keys.unexpected_keys.size();
    return dsd::ok();
  });
}

dsd_status dsd_incompatible_keys_missing(const dsd_incompatible_keys* keys, size_t index, const char** out,
                                         dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    TRY(require(keys, "keys"));
    TRY(require(out, "out"));
    *out = TRY(dsd::capi::key_at(keys->keys.missing_keys, index))->c_str();
    return dsd::ok();
  });
}

dsd_status dsd_incompatible_keys_unexpected(const dsd_incompatible_keys* keys, size_t index, const char** out,
                                            dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    TRY(require(keys, "keys"));
    TRY(require(out, "out"));
    *out = TRY(dsd::capi::key_at(keys->keys.unexpected_keys, index))->c_str();
    return dsd::ok();
  });
}

void dsd_incompatible_keys_free(dsd_incompatible_keys* keys) { delete keys; }

dsd_status dsd_optim_state_dict_to_fqn(const dsd_state_dict* positional, const char* const* names, size_t n,
                                       dsd_state_dict** out, dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    dsd::Dict* sd = TRY(dsd::capi::as_dict(positional, "positional"));
    TRY(require(out, "out"));
    std::vector<std::string> ns = TRY(dsd::capi::strings(names, n, "names"));
    *out = dsd::capi::wrap(TRY(dsd::optim_state_dict_to_fqn(*sd, ns)));
    return dsd::ok();
  });
}

dsd_status dsd_optim_state_dict_to_positional(const dsd_state_dict* fqn_form, const char* const* names, size_t n,
                                              dsd_state_dict** out, dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    dsd::Dict* sd = TRY(dsd::capi::as_dict(fqn_form, "fqn_form"));
    TRY(require(out, "out"));
    std::vector<std::string> ns = TRY(dsd::capi::strings(names, n, "names"));
    *out = dsd::capi::wrap(TRY(dsd::optim_state_dict_to_positional(*sd, ns)));
    return dsd::ok();
  });
}

}  // extern "C"
