// diff: the differences between two states of any formats, compared by flat key.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "core/base/result.h"
#include "core/interop/state_reader.h"

namespace dsd::interop {

struct DiffReport {
  std::vector<std::string> only_in_a;
  std::vector<std::string> only_in_b;
  // One line per differing key: kind, dtype, shape, or the first differing element (its
  // index and both values) of a tensor; or the first difference of a value.
  std::vector<std::pair<std::string, std::string>> differences;
  uint64_t compared_bytes = 0;

  bool equal() const { return only_in_a.empty() && only_in_b.empty() && differences.empty(); }
};
Result<DiffReport> diff(const StateReader& a, const StateReader& b, const ProgressFn& progress = {});

}  // namespace dsd::interop
