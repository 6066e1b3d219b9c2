#include "core/formats/pickle_text.h"

#include "core/formats/utf8.h"

namespace dsd::pickle_text {

uint64_t load_le(std::string_view b) {
  uint64_t v = 0;
  for (size_t i = b.size(); i-- > 0;) v = (v << 8) | static_cast<unsigned char>(b[i]);
  return v;
}

bool is_digits(std::string_view s) {
  if (s.empty()) return false;
  for (char c : s) {
    if (c < '0' || c > '9') return false;
  }
  return true;
}

int hex_digit(char h) {
  if (h >= '0' && h <= '9') return h - '0';
  if (h >= 'a' && h <= 'f') return h - 'a' + 10;
  if (h >= 'A' && h <= 'F') return h - 'A' + 10;
  return -1;
}

bool escape_decode(std::string_view s, std::string& out) {
  out.clear();
  out.reserve(s.size());
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] != '\\') {
      out += s[i];
      continue;
    }
    if (i + 1 == s.size()) return false;  // "Trailing \ in string"
    const char c = s[++i];
    switch (c) {
      case '\n': break;
      case '\\': out += '\\'; break;
      case '\'': out += '\''; break;
      case '"': out += '"'; break;
      case 'a': out += '\a'; break;
      case 'b': out += '\b'; break;
      case 'f': out += '\f'; break;
      case 'n': out += '\n'; break;
      case 'r': out += '\r'; break;
      case 't': out += '\t'; break;
      case 'v': out += '\v'; break;
      case 'x':
        if (i + 2 >= s.size() || hex_digit(s[i + 1]) < 0 || hex_digit(s[i + 2]) < 0) return false;
        out += static_cast<char>(hex_digit(s[i + 1]) * 16 + hex_digit(s[i + 2]));
        i += 2;
        break;
      default:
        if (c >= '0' && c <= '7') {
          int v = c - '0';
          for (int k = 0; k < 2 && i + 1 < s.size() && s[i + 1] >= '0' && s[i + 1] <= '7'; ++k) {
            v = v * 8 + (s[++i] - '0');
          }
          out += static_cast<char>(v & 0xFF);
        } else {
          out += '\\';
          out += c;
        }
    }
  }
  return true;
}

bool raw_unicode_escape_decode(std::string_view s, std::string& out) {
  out.clear();
  size_t i = 0;
  while (i < s.size()) {
    if (s[i] != '\\') {
      append_utf8(out, static_cast<unsigned char>(s[i++]));
      continue;
    }
    size_t run = 0;
    while (i < s.size() && s[i] == '\\') {
      out += '\\';
      ++i;
      ++run;
    }
    if (run % 2 == 0 || i >= s.size() || (s[i] != 'u' && s[i] != 'U')) continue;
    out.pop_back();
    int count = s[i] == 'u' ? 4 : 8;
    ++i;
    uint32_t cp = 0;
    for (; count > 0 && i < s.size(); --count, ++i) {
      const char h = s[i];
      const int d = hex_digit(h);
      if (d < 0) return false;
      cp = cp * 16 + static_cast<uint32_t>(d);
    }
    if (count > 0 || cp > 0x10FFFF) return false;
    append_utf8(out, cp);
  }
  return true;
}

}  // namespace dsd::pickle_text
