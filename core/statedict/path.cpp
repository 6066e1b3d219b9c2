#include "core/statedict/path.h"

namespace dsd {

std::string PathSegment::str() const {
  if (const auto* i = if_index()) return std::to_string(*i);
  return *if_key();
}

std::string join_path(const Path& path) {
  std::string out;
  for (size_t i = 0; i < path.size(); ++i) {
    if (i != 0) out += '.';
    out += path[i].str();
  }
  return out;
}

}  // namespace dsd
