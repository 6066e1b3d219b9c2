#include "core/interop/detect.h"

#include <cstring>

#include "core/base/make_error.h"
#include "core/checkpoint/dcp_files.h"
#include "core/checkpoint/io.h"
#include "core/checkpoint/manifest.h"
#include "core/checkpoint/save_planner.h"

namespace dsd::interop {

using namespace checkpoint;  // NOLINT: the engine's file names and I/O

namespace {

Result<Format> detect_file(const std::string& path) {
  File f = TRY(open_for_read(path));
  const uint64_t size = TRY(file_size(f));
  unsigned char head[9] = {};
  const uint64_t n = std::min<uint64_t>(size, sizeof(head));
  if (n > 0) TRY(pread_all(f, head, n, 0));
  // torch.save: a zip (local file header "PK\3\4"); its legacy format starts with a pickle.
  if (n >= 4 && std::memcmp(head, "PK\x03\x04", 4) == 0) return Format::kTorchSave;
  if (n >= 2 && head[0] == 0x80 && head[1] == 0x02) return Format::kTorchSave;
  // safetensors: a little-endian u64 header length, then a JSON object.
  if (n == 9 && head[8] == '{') {
    uint64_t len = 0;
    for (int i = 7; i >= 0; --i) len = (len << 8) | head[i];
    if (len > 0 && len <= size - 8) return Format::kSafetensors;
  }
  if (path.ends_with(".safetensors")) return Format::kSafetensors;  // its parser names the damage
  return make_error_at(Code::kUnsupported, path,
                       "'{}' is neither a torch.save file nor a safetensors file", path);
}

}  // namespace

Result<Format> detect_format(const std::string& path) {
  if (!path_exists(path)) return make_error_at(Code::kNotFound, path, "'{}' does not exist", path);
  if (!is_directory(path)) return detect_file(path);
  if (path_exists(join(path, kManifestName))) return Format::kDsd;
  if (is_dcp_checkpoint(path)) return Format::kDcp;
  if (path_exists(join(path, kHfIndexName))) return Format::kSafetensors;
  const std::vector<std::string> names = TRY(list_dir(path));
  bool any_distcp = false;
  bool any_dsd_data = false;
  for (const std::string& n : names) {
    if (is_data_file_name(n)) {
      any_dsd_data = true;
    } else if (n.ends_with(".safetensors")) {
      return Format::kSafetensors;
    }
    any_distcp = any_distcp || n.ends_with(".distcp");
  }
  if (any_dsd_data) {
    return make_error_at(Code::kNotFound, path,
                         "'{}' holds dsd data files but no {}: the save did not commit", path, kManifestName);
  }
  if (any_distcp) {
    return make_error_at(Code::kNotFound, path,
                         "'{}' holds DCP data files but no .metadata: the save did not commit", path);
  }
  return make_error_at(Code::kNotFound, path,
                       "no checkpoint at '{}' (no {}, {}, {} or .safetensors files)", path, kManifestName,
                       kDcpMetadataName, kHfIndexName);
}

}  // namespace dsd::interop
