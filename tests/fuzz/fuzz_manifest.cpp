// libFuzzer target: checkpoint.json from arbitrary bytes must parse or fail cleanly; what
// parses validates, and serialises to text that parses again.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string_view>

#include "core/checkpoint/manifest.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string_view text(reinterpret_cast<const char*>(data), size);
  auto m = dsd::checkpoint::parse_manifest(text);
  if (!m.ok()) return 0;
  if (!dsd::checkpoint::validate_manifest(*m).ok()) std::abort();
  for (const auto& f : m->files) {
    if (!dsd::checkpoint::is_plain_file_name(f.name)) std::abort();
  }
  auto again = dsd::checkpoint::parse_manifest(dsd::checkpoint::manifest_to_json(*m));
  if (!again.ok() || again->entries.size() != m->entries.size()) std::abort();
  return 0;
}
