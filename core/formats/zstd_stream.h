// Zstandard frames inside a file range, as PyTorch DCP's `stream.zstd` transform
// (torch.distributed.checkpoint._extension.ZStandard) writes each item.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "core/base/result.h"

namespace dsd {

// Decompresses the zstd frame(s) stored in [offset, offset + length) of the file `path`,
// reading the input a bounded block at a time (ZSTD_decompressStream), and returns the
// decompressed bytes. `max_bytes` bounds the output: a stream that decompresses to more is
// refused rather than grown without limit. `what` names the item in messages (for example
// "the DCP item of 'w'"). Errors: kNotFound / kIo (cannot open or read the file), kCorrupt
// (a corrupt or truncated frame, a range past the end of the file, an output over
// `max_bytes`, a frame whose declared content size does not match; naming the file).
Result<std::string> zstd_decompress_range(const std::string& path, uint64_t offset, uint64_t length,
                                          uint64_t max_bytes, std::string_view what);

}  // namespace dsd
