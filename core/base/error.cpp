#include "core/base/error.h"

namespace dsd {

std::string_view code_name(Code code) {
  switch (code) {
    case Code::kOk: return "ok";
    case Code::kInvalidArgument: return "invalid_argument";
    case Code::kStaleHandle: return "stale_handle";
    case Code::kWrongKind: return "wrong_kind";
    case Code::kNotFound: return "not_found";
    case Code::kUnexpectedKey: return "unexpected_key";
    case Code::kDtypeMismatch: return "dtype_mismatch";
    case Code::kShapeMismatch: return "shape_mismatch";
    case Code::kDevice: return "device";
    case Code::kIo: return "io";
    case Code::kCorrupt: return "corrupt";
    case Code::kExists: return "exists";
    case Code::kComm: return "comm";
    case Code::kTimeout: return "timeout";
    case Code::kNoSpace: return "no_space";
    case Code::kUnsupported: return "unsupported";
    case Code::kOutOfMemory: return "out_of_memory";
    case Code::kInternal: return "internal";
    case Code::kBufferTooSmall: return "buffer_too_small";
    case Code::kAbiMismatch: return "abi_mismatch";
    case Code::kState: return "state";
    case Code::kCallback: return "callback";
    case Code::kReadOnly: return "read_only";
  }
  return "unknown";
}

Error&& Error::with_prefix(std::string_view prefix) && {
  message.insert(0, prefix);
  return std::move(*this);
}

}  // namespace dsd
