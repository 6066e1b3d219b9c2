// JSON and msgpack from untrusted bytes, read with two rules no tree-building parser applies
// on its own: nesting is bounded before any recursive structure exists (a 100,000-deep
// array would otherwise exhaust the stack in the first recursive copy, walk or destructor),
// and an object that names one member twice is refused (nlohmann keeps the last silently,
// other readers of the same bytes keep the first: a parser differential).
//
// Every reader of a structured input goes through these: the checkpoint manifest, the
// safetensors header, the msgpack state-dict skeleton of broadcast_from_rank0.
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <span>
#include <string_view>

#include "core/base/result.h"

namespace dsd {

// Parses `text` as JSON. kCorrupt, naming `what`, when it is not valid JSON, when arrays and
// objects nest deeper than `max_depth` levels (`[[1]]` is 2 deep; checked while scanning,
// before the tree is built), or when an object repeats a member name.
Result<nlohmann::json> parse_json_strict(std::string_view text, std::string_view what, int max_depth);

// The same for strict msgpack (the whole input, nothing after the value).
Result<nlohmann::json> parse_msgpack_strict(std::span<const uint8_t> bytes, std::string_view what, int max_depth);

}  // namespace dsd
