// Versions, errors, dtypes.
#include "capi/src/export.h"

#include <string>

#include "capi/src/guard.h"
#include "core/base/make_error.h"
#include "core/tensor/dtype.h"

namespace dsd::capi {
namespace {

// The core's codes are the C ABI's status codes, one for one: a status is a static_cast away.
static_assert(static_cast<dsd_status>(Code::kOk) == DSD_OK);
static_assert(static_cast<dsd_status>(Code::kInvalidArgument) == DSD_E_INVALID_ARGUMENT);
static_assert(static_cast<dsd_status>(Code::kStaleHandle) == DSD_E_STALE_HANDLE);
static_assert(static_cast<dsd_status>(Code::kWrongKind) == DSD_E_WRONG_KIND);
static_assert(static_cast<dsd_status>(Code::kNotFound) == DSD_E_NOT_FOUND);
static_assert(static_cast<dsd_status>(Code::kUnexpectedKey) == DSD_E_UNEXPECTED_KEY);
static_assert(static_cast<dsd_status>(Code::kDtypeMismatch) == DSD_E_DTYPE_MISMATCH);
static_assert(static_cast<dsd_status>(Code::kShapeMismatch) == DSD_E_SHAPE_MISMATCH);
static_assert(static_cast<dsd_status>(Code::kDevice) == DSD_E_DEVICE);
static_assert(static_cast<dsd_status>(Code::kIo) == DSD_E_IO);
static_assert(static_cast<dsd_status>(Code::kCorrupt) == DSD_E_CORRUPT);
static_assert(static_cast<dsd_status>(Code::kExists) == DSD_E_EXISTS);
static_assert(static_cast<dsd_status>(Code::kComm) == DSD_E_COMM);
static_assert(static_cast<dsd_status>(Code::kTimeout) == DSD_E_TIMEOUT);
static_assert(static_cast<dsd_status>(Code::kNoSpace) == DSD_E_NO_SPACE);
static_assert(static_cast<dsd_status>(Code::kUnsupported) == DSD_E_UNSUPPORTED);
static_assert(static_cast<dsd_status>(Code::kOutOfMemory) == DSD_E_OUT_OF_MEMORY);
static_assert(static_cast<dsd_status>(Code::kInternal) == DSD_E_INTERNAL);
static_assert(static_cast<dsd_status>(Code::kBufferTooSmall) == DSD_E_BUFFER_TOO_SMALL);
static_assert(static_cast<dsd_status>(Code::kAbiMismatch) == DSD_E_ABI_MISMATCH);
static_assert(static_cast<dsd_status>(Code::kState) == DSD_E_STATE);
static_assert(static_cast<dsd_status>(Code::kCallback) == DSD_E_CALLBACK);
static_assert(static_cast<dsd_status>(Code::kReadOnly) == DSD_E_READ_ONLY);
static_assert(DSD_E_READ_ONLY == 22, "a new code must be added to the asserts above and to dsd_status_name");

thread_local std::string t_last_error;
}

Error null_argument(const char* name) {
  return Error(Code::kInvalidArgument, std::string(name) + " is NULL");
}

Error too_many_dims(size_t ndim, const char* what) {
  return make_error(Code::kInvalidArgument, "{} has {} dimensions, more than {} (a negative count?)",
                    what, ndim, kMaxDims);
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

const char* dsd_error_last_message(void) { return dsd::capi::t_last_error.c_str(); }

size_t dsd_dtype_size(dsd_dtype dtype) {
  auto d = dsd::dtype_from_code(dtype);
  return d ? dsd::element_size(*d) : 0;
}

const char* dsd_dtype_name(dsd_dtype dtype) {
  auto d = dsd::dtype_from_code(dtype);
  return d ? dsd::dtype_name(*d).data() : nullptr;
}

}  // extern "C"
