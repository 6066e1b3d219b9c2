// The keys a load did not match (PyTorch's _IncompatibleKeys), read by list and position.
#include "capi/src/export.h"

#include "capi/src/guard.h"
#include "capi/src/incompatible_keys.h"
#include "core/base/make_error.h"

namespace dsd::capi {
namespace {

Result<const std::vector<std::string>*> list_of(const dsd_incompatible_keys* keys, dsd_key_list list) {
  switch (list) {
    case DSD_KEYS_MISSING: return &keys->missing;
    case DSD_KEYS_UNEXPECTED: return &keys->unexpected;
    case DSD_KEYS_SKIPPED: return &keys->skipped;
    default:
      return make_error(Code::kInvalidArgument,
                        "unknown key list {} (DSD_KEYS_MISSING, DSD_KEYS_UNEXPECTED or DSD_KEYS_SKIPPED)",
                        list);
  }
}

}  // namespace
}  // namespace dsd::capi

using dsd::capi::guard;
using dsd::capi::require;

extern "C" {

dsd_status dsd_incompatible_keys_count(const dsd_incompatible_keys* keys, dsd_key_list list,
                                       size_t* out, dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    TRY(require(keys, "keys"));
    TRY(require(out, "out"));
    *out = TRY(dsd::capi::list_of(keys, list))->size();
    return dsd::ok();
  });
}

dsd_status dsd_incompatible_keys_key(const dsd_incompatible_keys* keys, dsd_key_list list,
                                     size_t index, const char** out, dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    TRY(require(keys, "keys"));
    TRY(require(out, "out"));
    const std::vector<std::string>* l = TRY(dsd::capi::list_of(keys, list));
    if (index >= l->size()) {
      return dsd::make_error(dsd::Code::kInvalidArgument, "index {} is out of range ({} keys)", index,
                             l->size());
    }
    *out = (*l)[index].c_str();
    return dsd::ok();
  });
}

void dsd_incompatible_keys_free(dsd_incompatible_keys* keys) { delete keys; }

}  // extern "C"
