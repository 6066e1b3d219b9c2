#include "core/checkpoint/retention.h"

#include <sys/stat.h>

#include <filesystem>
#include <map>

#include "core/base/make_error.h"
#include "core/checkpoint/crash_point.h"
#include "core/checkpoint/io.h"
#include "core/checkpoint/load.h"
#include "core/checkpoint/manifest.h"
#include "core/checkpoint/save_planner.h"

namespace dsd::checkpoint {
namespace {

constexpr uint64_t kMaxManifestBytes = 1u << 30;

std::string base_name(const std::string& dir) {
  std::string d = dir;
  while (d.size() > 1 && d.back() == '/') d.pop_back();
  return std::filesystem::path(d).filename().string();
}

std::string parent_of(const std::string& dir) {
  std::string d = dir;
  while (d.size() > 1 && d.back() == '/') d.pop_back();
  std::filesystem::path p = std::filesystem::path(d).parent_path();
  return p.empty() ? std::string(".") : p.string();
}

uint64_t size_of(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0 ? static_cast<uint64_t>(st.st_size) : 0;
}

// Every reference of the live checkpoints among the subdirectories of `root`: owning
// directory name -> referenced file names. `strict`: a live manifest that does not read is
// an error (gc removes nothing then); otherwise it is skipped.
Result<std::map<std::string, std::set<std::string>>> live_references(const std::string& root, bool strict) {
  std::map<std::string, std::set<std::string>> refs;
  for (const std::string& name : TRY(list_dir(root))) {
    const std::string dir = join(root, name);
    const std::string manifest = join(dir, kManifestName);
    if (!is_directory(dir) || !path_exists(manifest)) continue;
    Result<std::string> text = read_file(manifest, kMaxManifestBytes);
    if (!text.ok()) {
      if (strict) return std::move(text).error();
      continue;
    }
    // Only a version 2 manifest references other checkpoints' files.
    if (text->find("\"checkpoint\"") == std::string::npos) continue;
    Result<Manifest> m = parse_manifest(*text, manifest);
    if (!m.ok()) {
      if (strict) {
        return make_error_at(Code::kIo, manifest,
                             "cannot count the references of '{}' ({}); nothing was removed", manifest,
                             m.error().message);
      }
      continue;
    }
    for (const FileRecord& f : m->files) {
      if (f.referenced()) refs[f.checkpoint].insert(f.name);
    }
  }
  return refs;
}

}  // namespace

Status retire(const std::string& dir) {
  const std::string manifest = join(dir, kManifestName);
  if (!path_exists(manifest)) {
    return make_error_at(Code::kNotFound, dir, "no checkpoint at '{}' to retire (no {})", dir, kManifestName);
  }
  TRY(rename_file(manifest, join(dir, kRetiredManifestName)));
  crash_point("retention.after_retire");
  return sync_dir(dir);
}

bool is_retired(const std::string& dir) {
  return path_exists(join(dir, kRetiredManifestName)) && !path_exists(join(dir, kManifestName));
}

std::set<std::string> referenced_by_siblings(const std::string& dir) {
  auto refs = live_references(parent_of(dir), false);
  if (!refs.ok()) return {};
  auto it = refs->find(base_name(dir));
  return it == refs->end() ? std::set<std::string>() : it->second;
}

Result<GcReport> collect_garbage(const std::string& root) {
  GcReport report;
  const std::map<std::string, std::set<std::string>> refs = TRY(live_references(root, true));
  crash_point("retention.after_count");
  for (const std::string& name : TRY(list_dir(root))) {
    const std::string dir = join(root, name);
    if (!is_directory(dir) || !is_retired(dir)) continue;
    auto r = refs.find(name);
    if (r == refs.end()) {
      for (const std::string& f : TRY(list_dir(dir))) report.bytes_removed += size_of(join(dir, f));
      TRY(remove_tree(dir));
      ++report.retired_removed;
      crash_point("retention.after_remove_one");
      continue;
    }
    for (const std::string& f : TRY(list_dir(dir))) {
      if (!is_data_file_name(f) || r->second.count(f)) continue;
      const std::string path = join(dir, f);
      report.bytes_removed += size_of(path);
      TRY(remove_file(path));
      ++report.files_removed;
      crash_point("retention.after_remove_one");
    }
    report.retired_kept.push_back(dir);
  }
  return report;
}

}  // namespace dsd::checkpoint
