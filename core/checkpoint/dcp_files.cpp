#include "core/checkpoint/dcp_files.h"

#include <fmt/format.h>

#include "core/checkpoint/io.h"

namespace dsd::checkpoint {
namespace {

// The value of a non-empty run of decimal digits no longer than `max_digits`.
std::optional<int64_t> parse_decimal(std::string_view digits, size_t max_digits) {
  if (digits.empty() || digits.size() > max_digits) return std::nullopt;
  int64_t v = 0;
  for (char c : digits) {
    if (c < '0' || c > '9') return std::nullopt;
    v = v * 10 + (c - '0');
  }
  return v;
}

// Up to 2^40 files or ranks, as many digits as fit in an int64 with room to spare.
constexpr size_t kMaxIndexDigits = 13;

}  // namespace

std::optional<int64_t> dcp_rank_metadata(std::string_view name) {
  if (!name.starts_with("__") || !name.ends_with(kDcpMetadataName)) return std::nullopt;
  return parse_decimal(name.substr(2, name.size() - 2 - kDcpMetadataName.size()), 9);
}

bool is_dcp_checkpoint(const std::string& dir) {
  if (path_exists(join(dir, kDcpMetadataName))) return true;
  auto names = list_dir(dir);
  if (!names.ok()) return false;
  for (const std::string& n : *names) {
    if (dcp_rank_metadata(n)) return true;
  }
  return false;
}

bool is_dcp_file_name(std::string_view name) {
  return name == kDcpMetadataName || dcp_rank_metadata(name).has_value() || name.ends_with(".distcp") ||
         name.starts_with(std::string(kDcpMetadataName) + ".tmp-");
}

std::string distcp_name(int64_t rank, int64_t k) { return fmt::format("__{}_{}.distcp", rank, k); }

std::optional<int64_t> distcp_rank(std::string_view name) {
  if (!name.starts_with("__") || !name.ends_with(".distcp")) return std::nullopt;
  const size_t us = name.find('_', 2);
  if (us == std::string_view::npos) return std::nullopt;
  return parse_decimal(name.substr(2, us - 2), kMaxIndexDigits);
}

std::optional<int64_t> distcp_index(std::string_view name) {
  if (!name.starts_with("__") || !name.ends_with(".distcp")) return std::nullopt;
  const std::string_view mid = name.substr(2, name.size() - 2 - 7);
  const size_t us = mid.find('_');
  if (us == std::string_view::npos || us == 0) return std::nullopt;
  return parse_decimal(mid.substr(us + 1), kMaxIndexDigits);
}

}  // namespace dsd::checkpoint
