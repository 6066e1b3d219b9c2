// dsd_incompatible_keys: the one key-list result of model loads and checkpoint loads.
#pragma once

#include <string>
#include <vector>

#include "dsd/dsd.h"

struct dsd_incompatible_keys {
  std::vector<std::string> missing;
  std::vector<std::string> unexpected;
  std::vector<std::string> skipped;
};

namespace dsd::capi {

// Hands a result out through an optional out-parameter (NULL: the caller does not want it).
inline void give_keys(dsd_incompatible_keys** out, std::vector<std::string> missing,
                      std::vector<std::string> unexpected, std::vector<std::string> skipped = {}) {
  if (out != nullptr) {
    *out = new dsd_incompatible_keys{std::move(missing), std::move(unexpected), std::move(skipped)};
  }
}

}  // namespace dsd::capi
