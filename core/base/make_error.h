// make_error: fmt-based constructors for Error, so call sites read as one line.
#pragma once

#include <fmt/format.h>

#include "core/base/error.h"

namespace dsd {

template <class... Args>
Error make_error(Code code, fmt::format_string<Args...> format, Args&&... args) {
  return Error(code, fmt::format(format, std::forward<Args>(args)...));
}

// The same, with the key or file the error is about recorded as its context.
template <class... Args>
Error make_error_at(Code code, std::string context, fmt::format_string<Args...> format,
                    Args&&... args) {
  return Error(code, fmt::format(format, std::forward<Args>(args)...), std::move(context));
}

}  // namespace dsd
