// UTF-8 checks and conversions the pickle reader and writer share.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

namespace dsd {

// Whether `s` decodes with Python's "utf-8" codec and "surrogatepass" (how pickle reads
// BINUNICODE): well-formed UTF-8 where encoded surrogates (U+D800..U+DFFF) are allowed.
bool is_utf8_surrogatepass(std::string_view s);

// Appends code point `cp` (at most U+10FFFF, surrogates allowed) as UTF-8.
void append_utf8(std::string& out, uint32_t cp);

// Latin-1 bytes -> the UTF-8 of the same code points (U+0000..U+00FF).
std::string latin1_to_utf8(std::string_view bytes);

// The inverse: UTF-8 text whose code points are all below U+0100 -> Latin-1 bytes. Returns
// false (leaving `out` unspecified) for any other input.
bool utf8_to_latin1(std::string_view text, std::string& out);

}  // namespace dsd
