// verify_any: the integrity of a state of any format. A dsd or DCP checkpoint is checked by
// the engine's verify (checkpoint/verify.h); a torch.save file is read whole and its records'
// CRC-32s checked; safetensors headers, index and data bounds are checked and every tensor
// read.
#pragma once

#include <string>
#include <vector>

#include "core/base/result.h"
#include "core/checkpoint/verify.h"
#include "core/interop/state_reader.h"

namespace dsd::interop {

using Problem = checkpoint::VerifyProblem;

// One problem per damaged file/key; empty when intact. Errors only when `path` is not
// recognised at all.
// `options` as StateReader::open.
Result<std::vector<Problem>> verify_any(const std::string& path, const ProgressFn& progress = {},
                                        const checkpoint::OpenOptions& options = {});

}  // namespace dsd::interop
