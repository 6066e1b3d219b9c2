#include "core/formats/safetensors.h"

#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <limits>
#include <nlohmann/json.hpp>
#include <set>

#include "core/base/json_limits.h"
#include "core/base/make_error.h"

namespace dsd::safetensors {
namespace {

using nlohmann::json;

constexpr std::string_view kMetadataKey = "__metadata__";
constexpr int kMaxHeaderDepth = 8;

// A non-negative JSON integer as u64; nullopt for anything else (floats, negatives, strings).
std::optional<uint64_t> as_u64(const json& j) {
  if (j.is_number_unsigned()) return j.get<uint64_t>();
  if (j.is_number_integer()) {
    const auto v = j.get<int64_t>();
    if (v >= 0) return static_cast<uint64_t>(v);
  }
  return std::nullopt;
}

Result<TensorEntry> parse_entry(const std::string& name, const json& j, uint64_t data_size) {
  if (!j.is_object()) {
    return make_error_at(Code::kCorrupt, name, "safetensors entry '{}' is not a JSON object", name);
  }
  for (const auto& [k, v] : j.items()) {
    if (k != "dtype" && k != "shape" && k != "data_offsets") {
      return make_error_at(Code::kCorrupt, name, "safetensors entry '{}' has an unknown field '{}'",
                           name, k);
    }
  }
  TensorEntry e;
  e.name = name;
  auto dt = j.find("dtype");
  if (dt == j.end() || !dt->is_string()) {
    return make_error_at(Code::kCorrupt, name, "safetensors entry '{}' has no string dtype", name);
  }
  const auto& dtype_name = dt->get_ref<const std::string&>();
  auto dtype = dtype_from_safetensors(dtype_name);
  if (!dtype) {
    return make_error_at(Code::kCorrupt, name, "safetensors entry '{}' has an unknown dtype '{}'",
                         name, dtype_name);
  }
  e.dtype = *dtype;
  auto sh = j.find("shape");
  if (sh == j.end() || !sh->is_array()) {
    return make_error_at(Code::kCorrupt, name, "safetensors entry '{}' has no shape array", name);
  }
  // numel * element size in 128 bits, saturated at 2^64: each factor is < 2^63, so the
  // running product never overflows.
  unsigned __int128 bytes = element_size(e.dtype);
  for (const json& d : *sh) {
    auto v = as_u64(d);
    if (!v || *v > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
      return make_error_at(Code::kCorrupt, name,
                           "safetensors entry '{}' has a shape entry that is not a non-negative "
                           "integer", name);
    }
    e.shape.push_back(static_cast<int64_t>(*v));
    bytes *= *v;
    constexpr auto kCap = static_cast<unsigned __int128>(std::numeric_limits<uint64_t>::max()) + 1;
    if (bytes > kCap) bytes = kCap;  // saturate: still never equal to a u64 span
  }
  auto off = j.find("data_offsets");
  if (off == j.end() || !off->is_array() || off->size() != 2) {
    return make_error_at(Code::kCorrupt, name,
                         "safetensors entry '{}' has no data_offsets [begin, end]", name);
  }
  auto b = as_u64((*off)[0]);
  auto en = as_u64((*off)[1]);
  if (!b || !en || *b > *en) {
    return make_error_at(Code::kCorrupt, name,
                         "safetensors entry '{}' has data_offsets that are not 0 <= begin <= end",
                         name);
  }
  e.begin = *b;
  e.end = *en;
  if (e.end > data_size) {
    return make_error_at(Code::kCorrupt, name,
                         "safetensors entry '{}' ends at {} beyond the data area of {} bytes", name,
                         e.end, data_size);
  }
  if (bytes != e.end - e.begin) {
    return make_error_at(Code::kCorrupt, name,
                         "safetensors entry '{}': shape and dtype {} need {} bytes but "
                         "data_offsets span {}",
                         name, dtype_name,
                         bytes > std::numeric_limits<uint64_t>::max()
                             ? std::string("more than 2^64")
                             : std::to_string(static_cast<uint64_t>(bytes)),
                         e.end - e.begin);
  }
  return e;
}

Status check_tiling(std::vector<TensorEntry>& tensors, uint64_t data_size) {
  std::sort(tensors.begin(), tensors.end(), [](const TensorEntry& a, const TensorEntry& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  uint64_t pos = 0;
  for (const TensorEntry& e : tensors) {
    if (e.begin < pos) {
      return make_error_at(Code::kCorrupt, e.name,
                           "safetensors entry '{}' at [{}, {}) overlaps the previous tensor", e.name,
                           e.begin, e.end);
    }
    if (e.begin > pos) {
      return make_error_at(Code::kCorrupt, e.name,
                           "safetensors entry '{}' starts at {} leaving a gap after byte {}",
                           e.name, e.begin, pos);
    }
    pos = e.end;
  }
  if (pos != data_size) {
    return make_error(Code::kCorrupt,
                      "safetensors tensors cover {} bytes but the data area holds {}", pos,
                      data_size);
  }
  return ok();
}

}  // namespace

bool is_valid_utf8(std::string_view s) {
  size_t i = 0;
  const size_t n = s.size();
  while (i < n) {
    const auto c = static_cast<unsigned char>(s[i]);
    size_t len = 0;
    uint32_t cp = 0;
    if (c < 0x80) {
      ++i;
      continue;
    } else if ((c & 0xE0) == 0xC0) {
      len = 2;
      cp = c & 0x1F;
    } else if ((c & 0xF0) == 0xE0) {
      len = 3;
      cp = c & 0x0F;
    } else if ((c & 0xF8) == 0xF0) {
      len = 4;
      cp = c & 0x07;
    } else {
      return false;
    }
    if (i + len > n) return false;
    for (size_t k = 1; k < len; ++k) {
      const auto cc = static_cast<unsigned char>(s[i + k]);
      if ((cc & 0xC0) != 0x80) return false;
      cp = (cp << 6) | (cc & 0x3F);
    }
    static constexpr uint32_t kMin[5] = {0, 0, 0x80, 0x800, 0x10000};
    if (cp < kMin[len] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return false;
    i += len;
  }
  return true;
}

Result<uint64_t> parse_header_length(std::span<const std::byte> first_bytes, uint64_t file_size) {
  if (first_bytes.size() < kLengthPrefixBytes || file_size < kLengthPrefixBytes) {
    return make_error(Code::kCorrupt, "safetensors file of {} bytes is too short for a header",
                      file_size);
  }
  uint64_t n = 0;
  for (size_t i = 0; i < kLengthPrefixBytes; ++i) {
    n |= static_cast<uint64_t>(first_bytes[i]) << (8 * i);
  }
  if (n == 0) return make_error(Code::kCorrupt, "safetensors header length is 0");
  if (n > kMaxHeaderBytes) {
    return make_error(Code::kCorrupt, "safetensors header length {} exceeds the limit of {} bytes",
                      n, kMaxHeaderBytes);
  }
  if (n > file_size - kLengthPrefixBytes) {
    return make_error(Code::kCorrupt,
                      "safetensors header length {} runs past the end of a {}-byte file", n,
                      file_size);
  }
  return n;
}

Result<Header> parse_header(std::string_view text, uint64_t file_size) {
  if (file_size < kLengthPrefixBytes + text.size()) {
    return make_error(Code::kCorrupt, "safetensors header runs past the end of the file");
  }
  if (!is_valid_utf8(text)) return make_error(Code::kCorrupt, "safetensors header is not UTF-8");
  // Depth 3 is all a header needs ({"t": {"shape": [..]}}); repeated names are refused, as
  // the safetensors library's serde reader refuses them.
  const json j = TRY(parse_json_strict(text, "safetensors header", kMaxHeaderDepth));
  if (!j.is_object()) return make_error(Code::kCorrupt, "safetensors header is not a JSON object");
  Header h;
  h.data_start = kLengthPrefixBytes + text.size();
  const uint64_t data_size = file_size - h.data_start;
  for (const auto& [name, value] : j.items()) {
    if (name == kMetadataKey) {
      if (!value.is_object()) {
        return make_error(Code::kCorrupt, "safetensors __metadata__ is not a JSON object");
      }
      for (const auto& [k, v] : value.items()) {
        if (!v.is_string()) {
          return make_error_at(Code::kCorrupt, k,
                               "safetensors __metadata__ entry '{}' is not a string", k);
        }
        h.metadata.emplace(k, v.get<std::string>());
      }
      continue;
    }
    h.tensors.push_back(TRY(parse_entry(name, value, data_size)));
  }
  TRY(check_tiling(h.tensors, data_size));
  return h;
}

Result<Header> parse_file(std::span<const std::byte> file) {
  const uint64_t n = TRY(parse_header_length(file, file.size()));
  std::string_view text(reinterpret_cast<const char*>(file.data()) + kLengthPrefixBytes,
                        static_cast<size_t>(n));
  return parse_header(text, file.size());
}

Result<Header> read_header(int fd, std::string_view file_name) {
  const off_t end = ::lseek(fd, 0, SEEK_END);
  if (end < 0) {
    return make_error_at(Code::kIo, std::string(file_name), "cannot size '{}': {}", file_name,
                         std::strerror(errno));
  }
  auto read_at = [&](char* dst, size_t len, uint64_t off) -> Status {
    size_t done = 0;
    while (done < len) {
      const ssize_t r = ::pread(fd, dst + done, len - done, static_cast<off_t>(off + done));
      if (r < 0 && errno == EINTR) continue;
      if (r <= 0) {
        return make_error_at(Code::kIo, std::string(file_name), "cannot read the header of '{}': {}",
                             file_name, r == 0 ? "unexpected end of file" : std::strerror(errno));
      }
      done += static_cast<size_t>(r);
    }
    return ok();
  };
  std::byte prefix[kLengthPrefixBytes] = {};
  const auto size = static_cast<uint64_t>(end);
  if (size >= kLengthPrefixBytes) TRY(read_at(reinterpret_cast<char*>(prefix), sizeof prefix, 0));
  auto with_file = [&](Error e) {
    e.message = fmt::format("{}: {}", file_name, e.message);
    if (e.context.empty()) e.context = std::string(file_name);
    return e;
  };
  auto n = parse_header_length(prefix, size);
  if (!n.ok()) return with_file(std::move(n).error());
  std::string text(static_cast<size_t>(*n), '\0');
  TRY(read_at(text.data(), text.size(), kLengthPrefixBytes));
  auto h = parse_header(text, size);
  if (!h.ok()) return with_file(std::move(h).error());
  return h;
}

Result<std::string> write_header(std::span<const TensorEntry> tensors,
                                 const std::map<std::string, std::string>& metadata) {
  nlohmann::ordered_json j = nlohmann::ordered_json::object();
  if (!metadata.empty()) {
    nlohmann::ordered_json m = nlohmann::ordered_json::object();
    for (const auto& [k, v] : metadata) {
      if (!is_valid_utf8(k) || !is_valid_utf8(v)) {
        return make_error_at(Code::kInvalidArgument, k, "safetensors metadata '{}' is not UTF-8", k);
      }
      m[k] = v;
    }
    j[std::string(kMetadataKey)] = std::move(m);
  }
  std::set<std::string_view> seen;
  uint64_t pos = 0;
  for (const TensorEntry& e : tensors) {
    if (!is_valid_utf8(e.name) || e.name == kMetadataKey) {
      return make_error_at(Code::kInvalidArgument, e.name,
                           "'{}' cannot be a safetensors tensor name", e.name);
    }
    if (!seen.insert(e.name).second) {
      return make_error_at(Code::kInvalidArgument, e.name,
                           "tensor '{}' appears twice in one safetensors file", e.name);
    }
    if (e.begin != pos || e.end < e.begin) {
      return make_error_at(Code::kInternal, e.name,
                           "tensor '{}' at [{}, {}) does not follow the previous one at {}", e.name,
                           e.begin, e.end, pos);
    }
    pos = e.end;
    j[e.name] = {{"dtype", std::string(safetensors_name(e.dtype))},
                 {"shape", e.shape},
                 {"data_offsets", {e.begin, e.end}}};
  }
  std::string text = j.dump();
  text.append((8 - text.size() % 8) % 8, ' ');
  std::string out(kLengthPrefixBytes, '\0');
  const uint64_t n = text.size();
  for (size_t i = 0; i < kLengthPrefixBytes; ++i) out[i] = static_cast<char>((n >> (8 * i)) & 0xFF);
  out += text;
  return out;
}

}  // namespace dsd::safetensors
