#include "core/checkpoint/materialize.h"

#include <filesystem>
#include <set>

#include "core/base/make_error.h"
#include "core/checkpoint/io.h"
#include "core/checkpoint/manifest.h"
#include "core/checkpoint/retention.h"
#include "core/checkpoint/save_planner.h"
#include "core/checkpoint/source.h"
#include "core/checkpoint/storage_writer.h"

namespace dsd::checkpoint {
namespace {

bool same_directory(const std::string& a, const std::string& b) {
  std::error_code ea, eb;
  const auto ca = std::filesystem::canonical(a, ea);
  const auto cb = std::filesystem::canonical(b, eb);
  return !ea && !eb && ca == cb;
}

}  // namespace

Result<MaterializeInfo> materialize(const std::string& src, const std::string& dst, bool overwrite) {
  Source source = TRY(open_source(src));
  if (!source.is_dsd()) {
    return make_error_at(Code::kInvalidArgument, src, "'{}' is not a dsd checkpoint; only dsd checkpoints reference "
                         "others", src);
  }
  const bool in_place = same_directory(src, dst);
  if (in_place && !source.manifest.has_references()) return MaterializeInfo{};
  if (!in_place) TRY(prepare_checkpoint_dir(dst, overwrite));
  MaterializeInfo info;
  Manifest m = source.manifest;
  for (FileRecord& f : m.files) {
    if (in_place && !f.referenced()) continue;
    const std::string to = join(dst, f.name);
    // What a killed earlier run copied (the manifest still references the base's file).
    if (in_place || path_exists(to)) TRY(remove_file(to));
    TRY(copy_file(source.files->at(f.name), to));
    ++info.files_copied;
    info.bytes_copied += f.size;
    f.checkpoint.clear();
  }
  TRY(sync_dir(dst));
  TRY(write_file_atomic(dst, kManifestName, manifest_to_json(m)));
  if (!in_place) {
    // A replaced checkpoint's files, unless an incremental sibling of `dst` references them.
    std::set<std::string> keep;
    for (const FileRecord& f : m.files) keep.insert(f.name);
    for (const std::string& n : referenced_by_siblings(dst)) keep.insert(n);
    if (auto names = list_dir(dst); names.ok()) {
      for (const std::string& n : *names) {
        if (is_data_file_name(n) && !keep.count(n)) (void)remove_file(join(dst, n));
      }
    }
  }
  return info;
}

}  // namespace dsd::checkpoint
