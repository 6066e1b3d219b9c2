// Non-tensor state-dict leaves <-> the lossless value JSON of the manifest (manifest.h).
#pragma once

#include <nlohmann/json.hpp>
#include <string_view>

#include "core/base/result.h"
#include "core/statedict/value.h"

namespace dsd::checkpoint {

// kUnsupported naming `key` for a tensor inside a leaf (a tuple of tensors): those cannot be
// stored as a value.
Result<nlohmann::json> value_to_json(const Value& v, std::string_view key);
// The inverse; `v` must have passed check_value_json (kCorrupt otherwise).
Result<Value> value_from_json(const nlohmann::json& v, std::string_view key);

}  // namespace dsd::checkpoint
