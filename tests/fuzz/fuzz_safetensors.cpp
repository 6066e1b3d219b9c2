// libFuzzer target: safetensors headers from arbitrary bytes must parse or fail cleanly, and
// whatever parses must describe tensors that tile the data area inside the file.
#include <cstddef>
#include <cstdint>
#include <cstdlib>

#include "core/formats/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto bytes = std::span(reinterpret_cast<const std::byte*>(data), size);
  auto h = dsd::safetensors::parse_file(bytes);
  if (!h.ok()) return 0;
  uint64_t pos = h->data_start;
  for (const auto& t : h->tensors) {
    if (h->data_start + t.begin != pos || t.end < t.begin) std::abort();
    pos = h->data_start + t.end;
  }
  if (pos != size) std::abort();
  // What parses can be written again and parses to the same tensors.
  auto again = dsd::safetensors::write_header(h->tensors, h->metadata);
  if (!again.ok()) return 0;  // e.g. a "__metadata__"-named tensor cannot be written
  std::string file = *again + std::string(reinterpret_cast<const char*>(data) + h->data_start, size - h->data_start);
  auto back = dsd::safetensors::parse_file(std::span(reinterpret_cast<const std::byte*>(file.data()), file.size()));
  if (!back.ok() || back->tensors.size() != h->tensors.size()) std::abort();
  return 0;
}
