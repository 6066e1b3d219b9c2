// Error: what every fallible dsd function reports instead of throwing.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

namespace dsd {

// Stable error codes. The numbers are the C ABI's DSD_E_* values
// (capi/include/dsd/dsd_decls.h); they are never renumbered, only appended.
enum class Code : int32_t {
  kOk = 0,
  kInvalidArgument = 1,  // a NULL pointer, a bad option, a malformed argument
  kStaleHandle = 2,      // a released, double-freed or zeroed handle
  kWrongKind = 3,        // a handle or value of another kind than asked for
  kNotFound = 4,         // a missing key, file or entry
  kUnexpectedKey = 5,    // a key the target does not have
  kDtypeMismatch = 6,    // wrong or unknown dtype
  kShapeMismatch = 7,    // wrong shape or size
  kDevice = 8,           // unsupported or mixed devices
  kIo = 9,               // the file system failed
  kCorrupt = 10,         // a checksum, a header or a bound is wrong
  kExists = 11,          // refusing to overwrite
  kComm = 12,            // a collective failed or a peer died
  kTimeout = 13,         // a wait ran past its limit
  kNoSpace = 14,         // disk full or file size limit
  kUnsupported = 15,     // a valid request this build cannot serve
  kOutOfMemory = 16,
  kInternal = 17,        // a bug in dsd or an unexpected library failure
  kBufferTooSmall = 18,
  kAbiMismatch = 19,
  kState = 20,           // the object is not in a state that allows the call
  kCallback = 21,        // a trainer callback reported failure
  kReadOnly = 22,        // writing into a tensor imported as read-only
};

// Short stable name of a code, e.g. "not_found".
std::string_view code_name(Code code);

struct Error {
  Code code = Code::kInternal;
  // A full sentence naming the key, tensor or file concerned.
  std::string message;
  // The key or file the error is about, when there is one ("" otherwise).
  std::string context;

  Error() = default;
  Error(Code c, std::string msg, std::string ctx = {})
      : code(c), message(std::move(msg)), context(std::move(ctx)) {}

  // Prefixes the message with where it happened, e.g. "loading model.pt: ".
  Error&& with_prefix(std::string_view prefix) &&;
};

}  // namespace dsd
