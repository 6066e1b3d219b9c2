#include "core/checkpoint/manifest_validate.h"

#include <fmt/ranges.h>

#include <unordered_map>

#include "core/base/make_error.h"

namespace dsd::checkpoint {

Status check_data_files(const Manifest& m, const std::map<std::string, DataFileInfo>& files) {
  // The tensors of each header by name (safetensors names are unique within a file).
  std::unordered_map<std::string, std::unordered_map<std::string_view, const safetensors::TensorEntry*>> by_name;
  for (const FileRecord& f : m.files) {
    auto it = files.find(f.name);
    if (it == files.end()) {
      return make_error_at(Code::kCorrupt, f.name, "data file '{}' of the manifest was not opened", f.name);
    }
    if (it->second.size != f.size) {
      return make_error_at(Code::kCorrupt, f.name, "data file '{}' has {} bytes, the manifest records {}", f.name,
                           it->second.size, f.size);
    }
    auto& names = by_name[f.name];
    for (const safetensors::TensorEntry& t : it->second.header.tensors) names.emplace(t.name, &t);
  }
  for (const Entry& e : m.entries) {
    if (e.kind != Entry::Kind::kTensor) continue;
    for (const ChunkRecord& c : e.chunks) {
      auto f = by_name.find(c.file);
      if (f == by_name.end()) {
        return make_error_at(Code::kCorrupt, c.file, "tensor '{}' names a data file '{}' not in the manifest", e.key,
                             c.file);
      }
      auto t = f->second.find(e.key);
      if (t == f->second.end()) {
        return make_error_at(Code::kCorrupt, c.file, "data file '{}' has no tensor '{}' in its header", c.file, e.key);
      }
      const safetensors::TensorEntry& st = *t->second;
      const uint64_t data_start = files.at(c.file).header.data_start;
      if (st.dtype != e.dtype) {
        return make_error_at(Code::kCorrupt, c.file,
                             "tensor '{}' is {} in the manifest but {} in the header of data file '{}'", e.key,
                             dtype_name(e.dtype), dtype_name(st.dtype), c.file);
      }
      if (st.shape != c.sizes) {
        return make_error_at(Code::kCorrupt, c.file,
                             "tensor '{}' has a chunk of sizes [{}] in the manifest but shape [{}] in the header of "
                             "data file '{}'",
                             e.key, fmt::join(c.sizes, ", "), fmt::join(st.shape, ", "), c.file);
      }
      if (c.begin != data_start + st.begin || c.end != data_start + st.end) {
        return make_error_at(Code::kCorrupt, c.file,
                             "tensor '{}' has the byte range [{}, {}) in the manifest but [{}, {}) in the header of "
                             "data file '{}'",
                             e.key, c.begin, c.end, data_start + st.begin, data_start + st.end, c.file);
      }
    }
  }
  return ok();
}

}  // namespace dsd::checkpoint
