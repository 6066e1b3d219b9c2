// Text forms the core prints and parses: shapes in messages, 64-bit hashes and ids in hex,
// bytes in base64 (the manifest's value JSON).
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace dsd {

// "[3, 4]".
std::string shape_str(std::span<const int64_t> shape);
inline std::string shape_str(const std::vector<int64_t>& shape) { return shape_str(std::span<const int64_t>(shape)); }

// "0123456789abcdef" <-> 64-bit value (exactly 16 lower-case hex digits).
std::string hex64(uint64_t v);
std::optional<uint64_t> parse_hex64(std::string_view s);

// base64 (standard alphabet, padded).
std::string base64_encode(std::string_view bytes);
std::optional<std::string> base64_decode(std::string_view text);

}  // namespace dsd
