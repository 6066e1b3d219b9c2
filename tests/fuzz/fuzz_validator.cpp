// libFuzzer target: the whole validation of a dsd checkpoint (core/checkpoint/manifest_validate.h)
// from arbitrary bytes: a manifest and the data files it lists, which must validate or fail
// cleanly; whatever validates must be safe to read: every chunk's bytes inside its file's
// data section, exactly where its safetensors header puts the tensor of its key.
//
// Input: u32 little-endian n, n bytes of checkpoint.json, then the data files in the order of
// the manifest's "files", each as u32 length + bytes (a missing one is empty).
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <map>
#include <span>
#include <string>
#include <string_view>

#include "core/checkpoint/manifest.h"
#include "core/checkpoint/manifest_validate.h"
#include "core/formats/safetensors.h"

namespace {

std::span<const uint8_t> take(std::span<const uint8_t>& in) {
  if (in.size() < 4) {
    auto rest = in;
    in = {};
    return rest;
  }
  const uint32_t n = in[0] | (in[1] << 8) | (in[2] << 16) | (static_cast<uint32_t>(in[3]) << 24);
  in = in.subspan(4);
  const size_t len = std::min<size_t>(n, in.size());
  auto out = in.first(len);
  in = in.subspan(len);
  return out;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace dsd::checkpoint;
  std::span<const uint8_t> in(data, size);
  const auto manifest = take(in);
  auto m = parse_manifest(std::string_view(reinterpret_cast<const char*>(manifest.data()), manifest.size()));
  if (!m.ok()) return 0;
  std::map<std::string, DataFileInfo> files;
  for (const FileRecord& f : m->files) {
    const auto bytes = take(in);
    auto h = dsd::safetensors::parse_file(std::as_bytes(bytes));
    if (!h.ok()) return 0;  // open_source refuses the checkpoint here
    files[f.name] = DataFileInfo{bytes.size(), std::move(*h)};
  }
  if (!check_data_files(*m, files).ok()) return 0;
  for (const Entry& e : m->entries) {
    for (const ChunkRecord& c : e.chunks) {
      const DataFileInfo& f = files.at(c.file);
      if (c.begin < f.header.data_start || c.end > f.size || c.begin > c.end) std::abort();
    }
  }
  return 0;
}
