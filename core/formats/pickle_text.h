// Decoding pickle arguments (internal to formats/): little-endian integers, protocol 0's
// decimal lines and its escaped STRING and UNICODE forms, as Python decodes them.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

namespace dsd::pickle_text {

// The unsigned little-endian integer of up to 8 bytes.
uint64_t load_le(std::string_view b);
// Whether `s` is a non-empty run of decimal digits.
bool is_digits(std::string_view s);
// The value of a hex digit, or -1.
int hex_digit(char h);
// Python's codecs.escape_decode, which protocol 0 STRING uses. Returns false for a malformed
// \x escape, as Python does.
bool escape_decode(std::string_view s, std::string& out);
// Python's raw-unicode-escape decoding (protocol 0 UNICODE): bytes are Latin-1 code points,
// except \uXXXX and \UXXXXXXXX after an odd number of backslashes. Returns false when an
// escape is truncated or out of range.
bool raw_unicode_escape_decode(std::string_view s, std::string& out);

}  // namespace dsd::pickle_text
