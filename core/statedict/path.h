// Nested paths: where a leaf sits in a nested state dict, as DCP's OBJ_PATH (a tuple of dict
// keys and list indices). The one path type of the core: flattening, the manifest, the save
// and load plans, DCP's planner_data and the conversions all use it.
//
// Pure C++ (no libtorch): the manifest parser and the DCP metadata reader are fuzzed with it.
#pragma once

#include <compare>
#include <cstdint>
#include <string>
#include <variant>
#include <vector>

namespace dsd {

// One step of a path: a dict key or a list index.
struct PathSegment {
  std::variant<std::string, int64_t> v;

  PathSegment() = default;
  PathSegment(std::string k) : v(std::move(k)) {}        // NOLINT: a key
  PathSegment(const char* k) : v(std::string(k)) {}      // NOLINT: a key
  PathSegment(int64_t i) : v(i) {}                       // NOLINT: an index
  PathSegment(int i) : v(static_cast<int64_t>(i)) {}     // NOLINT: an index

  static PathSegment key(std::string k) { return PathSegment(std::move(k)); }
  static PathSegment index(int64_t i) { return PathSegment(i); }
  bool is_index() const { return std::holds_alternative<int64_t>(v); }
  const std::string* if_key() const { return std::get_if<std::string>(&v); }
  const int64_t* if_index() const { return std::get_if<int64_t>(&v); }
  // The key, or the index in decimal.
  std::string str() const;
  bool operator==(const PathSegment&) const = default;
  auto operator<=>(const PathSegment&) const = default;
};
using Path = std::vector<PathSegment>;

// "a.0.b" for ("a", 0, "b").
std::string join_path(const Path& path);

}  // namespace dsd
