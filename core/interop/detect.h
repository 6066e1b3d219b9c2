// How a path's format is recognised (checkpoint/format_id.h names the formats).
#pragma once

#include <string>
#include <string_view>

#include "core/base/result.h"
#include "core/checkpoint/format_id.h"

namespace dsd::interop {

using checkpoint::Format;

inline constexpr std::string_view kHfIndexName = "model.safetensors.index.json";

// The format of what is at `path`, from its names and first bytes. A directory holding both
// a dsd manifest and DCP metadata is a dsd checkpoint. Errors: kNotFound (nothing at
// `path`, or a directory holding no checkpoint of any format), kUnsupported (a file that is
// neither a torch.save zip nor safetensors), kIo.
Result<Format> detect_format(const std::string& path);

}  // namespace dsd::interop
