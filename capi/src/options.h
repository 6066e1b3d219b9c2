// Versioned option structs: the one rule every struct_size reader follows (the header's
// "Option structs" convention, like libgit2's GIT_ERROR_CHECK_VERSION):
// - NULL: the defaults;
// - struct_size equal to the size of a known version of the struct: that prefix is read over
//   the defaults (fields it does not reach keep them);
// - struct_size larger than this library's struct (a newer header): accepted when every byte
//   this library does not know is zero, refused with kUnsupported otherwise;
// - any other struct_size: kInvalidArgument.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <string_view>

#include "core/base/make_error.h"
#include "core/base/result.h"

namespace dsd::capi {

// `known_sizes` lists the struct_size of every released version of C, the current
// (sizeof(C)) included. `name` and `init` name the struct and its _init function in messages.
template <class C>
Result<C> read_options(const C* in, const C& defaults, std::initializer_list<size_t> known_sizes,
                       std::string_view name, std::string_view init) {
  if (in == nullptr) return defaults;
  const size_t size = in->struct_size;
  if (size > sizeof(C)) {
    const auto* tail = reinterpret_cast<const unsigned char*>(in) + sizeof(C);
    for (size_t i = 0; i < size - sizeof(C); ++i) {
      if (tail[i] != 0) {
        return make_error(Code::kUnsupported,
                          "{} sets fields this libdsd does not know (struct_size {} > {}, a "
                          "non-zero byte at offset {})",
                          name, size, sizeof(C), sizeof(C) + i);
      }
    }
    return *in;
  }
  bool known = false;
  for (size_t k : known_sizes) known = known || k == size;
  if (!known) {
    return make_error(Code::kInvalidArgument,
                      "{}.struct_size is {}, which is no version of {} ({} bytes now): "
                      "initialise it with {}()",
                      name, size, name, sizeof(C), init);
  }
  C out = defaults;
  std::memcpy(static_cast<void*>(&out), in, size);
  out.struct_size = static_cast<uint32_t>(sizeof(C));
  return out;
}

// The _init of an earlier version of C, whose callers' structs are `size` bytes
// (dsd_<x>_options_init@DSD_1, capi/dsd.map): the current defaults from `init`, of which only
// that prefix is written, with struct_size set to it. Writing sizeof(C) bytes would overrun a
// program built against the earlier header.
template <class C>
void init_earlier_version(C* out, size_t size, void (*init)(C*)) {
  if (out == nullptr) return;
  C full;
  init(&full);
  full.struct_size = static_cast<uint32_t>(size);
  std::memcpy(static_cast<void*>(out), &full, size);
}

}  // namespace dsd::capi
