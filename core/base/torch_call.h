// torch_call and comm_call: run code that may throw (libtorch throws c10::Error) and get a
// Result. The one place where exceptions become Errors inside the core.
//
// libtorch exceptions are caught at the call site that can throw them; the message says what
// dsd was doing ("copying into 'layer.weight'") before libtorch's own words. comm_call is
// the same for c10d, Gloo and NCCL, whose failures are either a timeout or a broken
// connection and whose words need tidying.
#pragma once

#include <c10/util/Exception.h>

#include <exception>
#include <new>
#include <string>
#include <string_view>
#include <type_traits>

#include "core/base/make_error.h"
#include "core/base/result.h"

namespace dsd {

namespace detail {
template <class T>
struct is_result : std::false_type {};
template <class T>
struct is_result<Result<T>> : std::true_type {};

// Runs `f`; an exception becomes `on_error(cause)` (an Error), out of memory kOutOfMemory.
template <class F, class OnError>
auto catch_to_result(std::string_view what, F&& f, OnError&& on_error) {
  using R = std::invoke_result_t<F>;
  using Out = std::conditional_t<is_result<R>::value, R, Result<R>>;
  std::string cause;
  try {
    if constexpr (std::is_void_v<R>) {
      f();
      return Out{};
    } else {
      return Out(f());
    }
  } catch (const c10::Error& e) {
    cause = e.what_without_backtrace();
  } catch (const std::bad_alloc&) {
    return Out(make_error(Code::kOutOfMemory, "{}: out of memory", what));
  } catch (const std::exception& e) {
    cause = e.what();
  } catch (...) {
    cause = "unknown exception";
  }
  return Out(on_error(std::move(cause)));
}
}  // namespace detail

// Runs `f` (which may throw) and turns an exception into `code`: "{what}: {cause}".
template <class F>
auto torch_call(Code code, std::string_view what, F&& f) {
  return detail::catch_to_result(what, std::forward<F>(f), [&](std::string cause) {
    return make_error(code, "{}: {}", what, cause);
  });
}

// kTimeout when the words of a c10d, Gloo or NCCL failure say it ran out of time, else kComm.
// They carry no error code, only a message ("Timed out waiting 5000ms for recv operation",
// "Wait timeout for key(s)", "Socket Timeout").
inline Code comm_error_code(std::string_view cause) {
  for (std::string_view word : {"imed out", "imeout", "TIMEOUT", "timed-out"}) {
    if (cause.find(word) != std::string_view::npos) return Code::kTimeout;
  }
  return Code::kComm;
}

// One line of what went wrong: Gloo prefixes its messages with a build-machine source
// location ("[/__w/pytorch/.../pair.cc:537] ") and appends advice; c10d chains span lines.
inline std::string tidy_comm_cause(std::string cause) {
  if (!cause.empty() && cause.front() == '[') {
    const size_t close = cause.find("] ");
    if (close != std::string::npos && cause.find(':') < close) cause.erase(0, close + 2);
  }
  const size_t advice = cause.find(" This is typically caused by");
  if (advice != std::string::npos) cause.erase(advice);
  for (char& c : cause) {
    if (c == '\n') c = ' ';
  }
  while (!cause.empty() && cause.back() == ' ') cause.pop_back();
  return cause;
}

// Runs `f` (which may throw) and turns an exception into kComm or kTimeout: "{what}: {cause}".
template <class F>
auto comm_call(std::string_view what, F&& f) {
  return detail::catch_to_result(what, std::forward<F>(f), [&](std::string cause) {
    cause = tidy_comm_cause(std::move(cause));
    return make_error(comm_error_code(cause), "{}: {}", what, cause);
  });
}

}  // namespace dsd
