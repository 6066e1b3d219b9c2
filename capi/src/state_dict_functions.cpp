// The state-dict functions of torch.distributed.checkpoint.state_dict, their options, and the
// pure optimizer-state remapping.
#include "capi/src/export.h"

#include <memory>
#include <vector>

#include "capi/src/guard.h"
#include "capi/src/incompatible_keys.h"
#include "capi/src/models.h"
#include "capi/src/options.h"
#include "capi/src/state_dicts.h"
#include "core/statedict/state_dict.h"

namespace dsd::capi {
namespace {

Result<StateDictOptions> state_dict_options(const dsd_state_dict_options* o) {
  dsd_state_dict_options defaults;
  dsd_state_dict_options_init(&defaults);
  const dsd_state_dict_options in =
      TRY(read_options(o, defaults, {sizeof(dsd_state_dict_options)}, "dsd_state_dict_options",
                       "dsd_state_dict_options_init"));
  StateDictOptions out;
  out.full_state_dict = in.full_state_dict;
  out.cpu_offload = in.cpu_offload;
  out.ignore_frozen_params = in.ignore_frozen_params;
  out.keep_submodule_prefixes = in.keep_submodule_prefixes;
  out.strict = in.strict;
  out.broadcast_from_rank0 = in.broadcast_from_rank0;
  out.flatten_optimizer_state_dict = in.flatten_optimizer_state_dict;
  out.bucket_bytes = in.bucket_bytes;
  if (in.dsd_fqn_modifiers != nullptr) out.dsd_fqn_modifiers = in.dsd_fqn_modifiers;
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

}  // namespace
}  // namespace dsd::capi

using dsd::Code;
using dsd::capi::guard;
using dsd::capi::require;

extern "C" {

void dsd_state_dict_options_init(dsd_state_dict_options* options) {
  if (options == nullptr) return;
  const dsd::StateDictOptions d;
  *options = dsd_state_dict_options{};
  options->struct_size = sizeof(dsd_state_dict_options);
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

dsd_status dsd_get_model_state_dict(dsd_model* model, const dsd_state_dict_options* options, dsd_state_dict** out,
                                    dsd_error** err) {
  return dsd_get_model_state_dict_submodules(model, nullptr, 0, options, out, err);
}

dsd_status dsd_get_model_state_dict_submodules(dsd_model* model, const char* const* submodules, size_t count,
                                               const dsd_state_dict_options* options, dsd_state_dict** out,
                                               dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    TRY(require(model, "model"));
    TRY(require(out, "out"));
    dsd::StateDictOptions o = TRY(dsd::capi::state_dict_options(options));
    std::vector<std::string> subs = TRY(dsd::capi::strings(submodules, count, "submodules"));
    dsd::DictPtr sd = TRY(dsd::get_model_state_dict(model->model, o, subs));
    *out = dsd::capi::wrap(sd);
    return dsd::ok();
  });
}

dsd_status dsd_set_model_state_dict(dsd_model* model, const dsd_state_dict* state_dict,
                                    const dsd_state_dict_options* options, dsd_incompatible_keys** out_keys,
                                    dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    TRY(require(model, "model"));
    dsd::Dict* sd = TRY(dsd::capi::as_dict(state_dict, "state_dict"));
    dsd::StateDictOptions o = TRY(dsd::capi::state_dict_options(options));
    dsd::IncompatibleKeys keys = TRY(dsd::set_model_state_dict(model->model, *sd, o));
    dsd::capi::give_keys(out_keys, std::move(keys.missing_keys), std::move(keys.unexpected_keys));
    return dsd::ok();
  });
}

dsd_status dsd_get_optimizer_state_dict(dsd_model* model, dsd_optim* const* optims, size_t count,
                                        const dsd_state_dict_options* options, dsd_state_dict** out, dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    TRY(require(model, "model"));
    TRY(require(out, "out"));
    std::vector<dsd::Optimizer*> os = TRY(dsd::capi::optimizers(optims, count));
    dsd::StateDictOptions o = TRY(dsd::capi::state_dict_options(options));
    dsd::DictPtr sd = TRY(dsd::get_optimizer_state_dict(model->model, os, o));
    *out = dsd::capi::wrap(sd);
    return dsd::ok();
  });
}

dsd_status dsd_set_optimizer_state_dict(dsd_model* model, dsd_optim* const* optims, size_t count,
                                        const dsd_state_dict* optim_state_dict, const dsd_state_dict_options* options,
                                        dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    TRY(require(model, "model"));
    dsd::Dict* sd = TRY(dsd::capi::as_dict(optim_state_dict, "optim_state_dict"));
    std::vector<dsd::Optimizer*> os = TRY(dsd::capi::optimizers(optims, count));
    dsd::StateDictOptions o = TRY(dsd::capi::state_dict_options(options));
    return dsd::set_optimizer_state_dict(model->model, os, *sd, o);
  });
}

dsd_status dsd_get_state_dict(dsd_model* model, dsd_optim* const* optims, size_t count, const dsd_state_dict_options* options,
                              dsd_state_dict** out_model, dsd_state_dict** out_optim, dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    TRY(require(model, "model"));
    TRY(require(out_model, "out_model"));
    TRY(require(out_optim, "out_optim"));
    std::vector<dsd::Optimizer*> os = TRY(dsd::capi::optimizers(optims, count));
    dsd::StateDictOptions o = TRY(dsd::capi::state_dict_options(options));
    dsd::ModelAndOptimStateDict both = TRY(dsd::get_state_dict(model->model, os, o));
    *out_model = dsd::capi::wrap(both.model);
    *out_optim = dsd::capi::wrap(both.optim);
    return dsd::ok();
  });
}

dsd_status dsd_set_state_dict(dsd_model* model, dsd_optim* const* optims, size_t count,
                              const dsd_state_dict* model_state_dict, const dsd_state_dict* optim_state_dict,
                              const dsd_state_dict_options* options, dsd_incompatible_keys** out_keys, dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    TRY(require(model, "model"));
    dsd::Dict* msd = TRY(dsd::capi::as_dict(model_state_dict, "model_state_dict"));
    dsd::Dict* osd = TRY(dsd::capi::as_dict(optim_state_dict, "optim_state_dict"));
    std::vector<dsd::Optimizer*> os = TRY(dsd::capi::optimizers(optims, count));
    dsd::StateDictOptions o = TRY(dsd::capi::state_dict_options(options));
    dsd::IncompatibleKeys keys = TRY(dsd::set_state_dict(model->model, os, *msd, *osd, o));
    dsd::capi::give_keys(out_keys, std::move(keys.missing_keys), std::move(keys.unexpected_keys));
    return dsd::ok();
  });
}

dsd_status dsd_optim_state_dict_to_fqn(const dsd_state_dict* positional, const char* const* names, size_t count,
                                       dsd_state_dict** out, dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    dsd::Dict* sd = TRY(dsd::capi::as_dict(positional, "positional"));
    TRY(require(out, "out"));
    std::vector<std::string> ns = TRY(dsd::capi::strings(names, count, "names"));
    *out = dsd::capi::wrap(TRY(dsd::optim_state_dict_to_fqn(*sd, ns)));
    return dsd::ok();
  });
}

dsd_status dsd_optim_state_dict_to_positional(const dsd_state_dict* fqn_form, const char* const* names, size_t count,
                                              dsd_state_dict** out, dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    dsd::Dict* sd = TRY(dsd::capi::as_dict(fqn_form, "fqn_form"));
    TRY(require(out, "out"));
    std::vector<std::string> ns = TRY(dsd::capi::strings(names, count, "names"));
    *out = dsd::capi::wrap(TRY(dsd::optim_state_dict_to_positional(*sd, ns)));
    return dsd::ok();
  });
}

}  // extern "C"
