// Versions, errors, dtypes.
#include "capi/src/export.h"

#include <string>

#include "capi/src/guard.h"
#include "core/tensor/dtype.h"

namespace dsd::capi {
namespace {
thread_local std::string t_last_error;
}

dsd_status fail(dsd_error** err, Error e) noexcept {
  const auto code = static_cast<dsd_status>(e.code);
  try {
    t_last_error = e.message;
  } catch (...) {  // keep the status even if the message cannot be stored
  }
  if (err != nullptr) {
    *err = new (std::nothrow) dsd_error{code, std::move(e.message), std::move(e.context)};
  }
  return code;
}

}  // namespace dsd::capi

extern "C" {

uint32_t dsd_abi_version(void) {
  return (static_cast<uint32_t>(DSD_ABI_VERSION_MAJOR) << 16) | DSD_ABI_VERSION_MINOR;
}

const char* dsd_version_string(void) { return DSD_VERSION_STRING; }

dsd_status dsd_error_code(const dsd_error* error) {
  return error == nullptr ? DSD_E_INVALID_ARGUMENT : error->code;
}

const char* dsd_error_message(const dsd_error* error) {
  return error == nullptr ? "" : error->message.c_str();
}

const char* dsd_error_context(const dsd_error* error) {
  return error == nullptr ? "" : error->context.c_str();
}

void dsd_error_free(dsd_error* error) { delete error; }

const char* dsd_status_name(dsd_status status) {
  // code_name() returns views of string literals, so .data() is NUL-terminated.
  if (status < 0 || status > DSD_E_READ_ONLY) return "unknown";
  return dsd::code_name(static_cast<dsd::Code>(status)).data();
}

const char* dsd_last_error_message(void) { return dsd::capi::t_last_error.c_str(); }

size_t dsd_dtype_size(dsd_dtype dtype) {
  auto d = dsd::dtype_from_code(dtype);
  return d ? dsd::element_size(*d) : 0;
}

const char* dsd_dtype_name(dsd_dtype dtype) {
  auto d = dsd::dtype_from_code(dtype);
  return d ? dsd::dtype_name(*d).data() : nullptr;
}

}  // extern "C"
