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

// GLib's rule (the header's Errors convention): *err must be NULL on entry. A call that finds
// an error object there does nothing, leaves that object alone and returns this code.
inline bool err_in_use(dsd_error** err) noexcept { return err != nullptr && *err != nullptr; }

template <class F>
dsd_status guard(dsd_error** err, F&& body) noexcept {
  if (err_in_use(err)) return DSD_E_INVALID_ARGUMENT;
  try {
    Status s = body();
    if (s.ok()) return DSD_OK;
    return fail(err, std::move(s).error());
  } catch (const c10::OutOfMemoryError& e) {
    return fail(err, Error(Code::kOutOfMemory, std::string("out of memory: ") + e.what_without_backtrace()));
  } catch (const c10::Error& e) {
    // libtorch's CPU allocator reports a failed allocation as a plain c10::Error.
    const std::string what = e.what_without_backtrace();
    if (what.find("not enough memory") != std::string::npos) {
      return fail(err, Error(Code::kOutOfMemory, "out of memory: " + what));
    }
    return fail(err, Error(Code::kInternal, "libtorch: " + what));
  } catch (const std::bad_alloc&) {
    return fail(err, Error(Code::kOutOfMemory, "out of memory (an allocation failed)"));
  } catch (const std::exception& e) {
    return fail(err, Error(Code::kInternal, e.what()));
  } catch (...) {
    return fail(err, Error(Code::kInternal, "unknown exception"));
  }
}

// Argument checks shared by every function: inline on the success path (every call makes
// several), the error built out of line.
[[gnu::cold, gnu::noinline]] Error null_argument(const char* name);
inline Status require(const void* p, const char* name) {
  if (p == nullptr) [[unlikely]] return null_argument(name);
  return ok();
}

// Dimension counts come in as size_t: a negative int cast by a binding becomes huge. No tensor
// or mesh has more dimensions than this (PyTorch's own limit on dims is far below it).
inline constexpr size_t kMaxDims = 64;
[[gnu::cold, gnu::noinline]] Error too_many_dims(size_t ndim, const char* what);
inline Status check_ndim(size_t ndim, const char* what) {
  if (ndim > kMaxDims) [[unlikely]] return too_many_dims(ndim, what);
  return ok();
}

// Copies `dims` into out[0..capacity), or fails with kBufferTooSmall naming `what`.
Status copy_out(std::span<const int64_t> dims, int64_t* out, size_t capacity, const char* what);

}  // namespace dsd::capi
