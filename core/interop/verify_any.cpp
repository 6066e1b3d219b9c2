#include "core/interop/verify_any.h"

#include <fmt/format.h>

#include <map>

#include "core/base/make_error.h"
#include "core/formats/torch_save.h"
#include "core/formats/zip_check.h"
#include "core/interop/detect.h"

namespace dsd::interop {

Result<std::vector<Problem>> verify_any(const std::string& path, const ProgressFn& progress,
                                        const checkpoint::OpenOptions& options) {
  const Format f = TRY(detect_format(path));
  std::vector<Problem> problems;
  if (f == Format::kDsd || f == Format::kDcp) {
    return checkpoint::verify(path, 0, progress, options);
  }
  if (f == Format::kTorchSave) {
    // The pickle well formed, every record present, sized and in bounds (mapped, not read)...
    std::multimap<std::string, std::string> keys_of;  // record -> tensor paths
    TorchLoadOptions o;
    o.mmap = true;
    o.on_tensor = [&](const std::string& record, const std::string& where) { keys_of.emplace(record, where); };
    Result<Value> v = torch_load(TorchArchive::file(path), o);
    if (!v.ok()) {
      problems.push_back({path, v.error().context, v.error().message});
      return problems;
    }
    // ...and every record's CRC-32.
    auto records = check_zip(path);
    if (!records.ok()) {
      problems.push_back({path, "", records.error().message});
      return problems;
    }
    uint64_t total = 0;
    for (const ZipRecordCheck& r : *records) total += r.size;
    uint64_t done = 0;
    for (const ZipRecordCheck& r : *records) {
      done += r.size;
      if (progress) progress(done, total);
      if (r.crc_ok) continue;
      const size_t slash = r.name.find('/');
      const std::string record = slash == std::string::npos ? r.name : r.name.substr(slash + 1);
      std::string keys;
      for (auto [it, end] = keys_of.equal_range(record); it != end; ++it) keys += (keys.empty() ? "" : ", ") + it->second;
      problems.push_back({path, keys, fmt::format("CRC-32 mismatch in record '{}'{} of '{}'", r.name,
                                                  keys.empty() ? "" : fmt::format(" (tensor {})", keys), path)});
    }
    return problems;
  }
  // safetensors: headers, index and data bounds are checked on open; then every tensor is read.
  auto reader = StateReader::open(path);
  if (!reader.ok()) {
    const Error& e = reader.error();
    if (e.code == Code::kNotFound) return e;
    problems.push_back({e.context.empty() ? path : e.context, "", e.message});
    return problems;
  }
  uint64_t done = 0;
  for (size_t i = 0; i < (*reader)->items().size(); ++i) {
    const ItemInfo& it = (*reader)->items()[i];
    if (it.kind != Entry::Kind::kTensor) continue;
    auto t = (*reader)->read_tensor(i);
    if (!t.ok()) problems.push_back({it.chunks.empty() ? path : it.chunks[0].file, it.key, t.error().message});
    done += it.nbytes;
    if (progress) progress(done, (*reader)->tensor_bytes());
  }
  return problems;
}

}  // namespace dsd::interop
