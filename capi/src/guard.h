// The one boundary every exported function goes through: runs the body, turns a returned
// Error or any exception into a status code plus an error object. No exception crosses the
// C ABI.
#pragma once

#include <c10/util/Exception.h>

#include <exception>
#include <new>
#include <span>
#include <string>

#include "core/base/result.h"
#include "dsd/dsd.h"

struct dsd_error {
  dsd_status code;
  std::string message;
  std::string context;
};

namespace dsd::capi {

// Records `e` in *err (when err is not NULL) and as the thread's last error; returns its code.
dsd_status fail(dsd_error** err, Error e) noexcept;

template <class F>
dsd_status guard(dsd_error** err, F&& body) noexcept {
  try {
    Status s = body();
    if (s.ok()) return DSD_OK;
    return fail(err, std::move(s).error());
  } catch (const c10::Error& e) {
    return fail(err, Error(Code::kInternal, std::string("libtorch: ") + e.what_without_backtrace()));
  } catch (const std::bad_alloc&) {
    return fail(err, Error(Code::kOutOfMemory, "out of memory"));
  } catch (const std::exception& e) {
    return fail(err, Error(Code::kInternal, e.what()));
  } catch (...) {
    return fail(err, Error(Code::kInternal, "unknown exception"));
  }
}

// Argument checks shared by every function.
inline Status require(const void* p, const char* name) {
  if (p == nullptr) return Error(Code::kInvalidArgument, std::string(name) + " is NULL");
  return ok();
}

// Copies `dims` into out[0..capacity), or fails with kBufferTooSmall naming `what`.
Status copy_out(std::span<const int64_t> dims, int64_t* out, size_t capacity, const char* what);

}  // namespace dsd::capi
