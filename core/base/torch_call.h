// torch_call: run code that may throw (libtorch throws c10::Error) and get a Result.
//
// libtorch exceptions are caught at the call site that can throw them; the message says what
// dsd was doing ("copying into 'layer.weight'") before libtorch's own words.
#pragma once

#include <c10/util/Exception.h>

#include <exception>
#include <new>
#include <string_view>
#include <type_traits>

#include "core/base/format.h"
#include "core/base/result.h"

namespace dsd {

namespace detail {
template <class T>
struct is_result : std::false_type {};
template <class T>
struct is_result<Result<T>> : std::true_type {};
}  // namespace detail

template <class F>
auto torch_call(Code code, std::string_view what, F&& f) {
  using R = std::invoke_result_t<F>;
  using Out = std::conditional_t<detail::is_result<R>::value, R, Result<R>>;
  try {
    if constexpr (std::is_void_v<R>) {
      f();
      return Out{};
    } else {
      return Out(f());
    }
  } catch (const c10::Error& e) {
    return Out(make_error(code, "{}: {}", what, e.what_without_backtrace()));
  } catch (const std::bad_alloc&) {
    return Out(make_error(Code::kOutOfMemory, "{}: out of memory", what));
  } catch (const std::exception& e) {
    return Out(make_error(code, "{}: {}", what, e.what()));
  }
}

}  // namespace dsd
