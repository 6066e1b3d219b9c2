// Result<T>: a value or an Error, and TRY to propagate the Error.
//
// Shaped after SerenityOS's ErrorOr / Abseil's StatusOr: a function that can fail returns
// Result<T>; callers either handle the Error or forward it with TRY(expr). The Error lives on
// the heap, so the success path carries one pointer (a Status is a null pointer): every C ABI
// call returns through several of these.
#pragma once

#include <cassert>
#include <cstdlib>
#include <memory>
#include <type_traits>
#include <utility>
#include <variant>

#include "core/base/error.h"

namespace dsd {

// An Error on the heap, copied deeply: what a Result holds when it failed.
class ErrorBox {
 public:
  ErrorBox() = default;
  explicit ErrorBox(Error e) : p_(std::make_unique<Error>(std::move(e))) {}
  ErrorBox(const ErrorBox& o) : p_(o.p_ ? std::make_unique<Error>(*o.p_) : nullptr) {}
  ErrorBox& operator=(const ErrorBox& o) {
    if (this != &o) p_ = o.p_ ? std::make_unique<Error>(*o.p_) : nullptr;
    return *this;
  }
  ErrorBox(ErrorBox&&) noexcept = default;
  ErrorBox& operator=(ErrorBox&&) noexcept = default;

  bool empty() const { return p_ == nullptr; }
  Error& operator*() const { return *p_; }

 private:
  std::unique_ptr<Error> p_;
};

template <class T>
class [[nodiscard]] Result {
 public:
  static_assert(!std::is_reference_v<T>, "Result<T&> is not supported; return a pointer");
  using value_type = T;

  Result(T value) : v_(std::in_place_index<0>, std::move(value)) {}  // NOLINT: implicit by design
  Result(Error error) : v_(std::in_place_index<1>, ErrorBox(std::move(error))) {}  // NOLINT

  template <class U>
    requires(std::is_constructible_v<T, U&&> && !std::is_same_v<std::decay_t<U>, Result> &&
             !std::is_same_v<std::decay_t<U>, Error> && !std::is_same_v<std::decay_t<U>, T>)
  Result(U&& value) : v_(std::in_place_index<0>, T(std::forward<U>(value))) {}  // NOLINT

  bool ok() const { return v_.index() == 0; }
  explicit operator bool() const { return ok(); }

  T& value() & { return checked(); }
  const T& value() const& { return const_cast<Result*>(this)->checked(); }
  T&& value() && { return std::move(checked()); }

  const Error& error() const& { return *std::get<1>(v_); }
  Error&& error() && { return std::move(*std::get<1>(v_)); }

  T* operator->() { return &checked(); }
  const T* operator->() const { return &const_cast<Result*>(this)->checked(); }
  T& operator*() & { return checked(); }
  T&& operator*() && { return std::move(checked()); }

 private:
  T& checked() {
    if (v_.index() != 0) std::abort();  // value() on an error is a bug, never UB
    return std::get<0>(v_);
  }
  std::variant<T, ErrorBox> v_;
};

template <>
class [[nodiscard]] Result<void> {
 public:
  Result() = default;
  Result(Error error) : error_(std::move(error)) {}  // NOLINT

  bool ok() const { return error_.empty(); }
  explicit operator bool() const { return ok(); }
  void value() const {
    if (!error_.empty()) std::abort();
  }
  const Error& error() const& { return *error_; }
  Error&& error() && { return std::move(*error_); }

 private:
  ErrorBox error_;  // empty: success
};

using Status = Result<void>;

inline Status ok() { return {}; }

}  // namespace dsd

// TRY(expr): evaluates a Result; on error returns the Error from the enclosing function,
// otherwise yields the value. A GNU statement expression (g++ and clang), quiet under
// -Wpedantic thanks to __extension__.
#define TRY(expr)                                                   \
  __extension__({                                                   \
    auto&& dsd_try_result_ = (expr);                                \
    if (!dsd_try_result_.ok()) return std::move(dsd_try_result_).error(); \
    std::move(dsd_try_result_).value();                             \
  })

// MUST(expr): like TRY, but an error is a bug: abort.
#define MUST(expr)                                                  \
  __extension__({                                                   \
    auto&& dsd_must_result_ = (expr);                               \
    if (!dsd_must_result_.ok()) std::abort();                       \
    std::move(dsd_must_result_).value();                            \
  })
