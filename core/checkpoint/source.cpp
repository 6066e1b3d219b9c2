#include "core/checkpoint/source.h"

#include <ATen/ops/empty.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <map>
#include <set>

#include "core/base/make_error.h"
#include "core/base/torch_call.h"
#include "core/checkpoint/dcp_files.h"
#include "core/checkpoint/io.h"
#include "core/checkpoint/load.h"
#include "core/checkpoint/manifest_validate.h"
#include "core/checkpoint/value_json.h"
#include "core/dist/layout.h"
#include "core/formats/dcp_chunks.h"
#include "core/tensor/dtype_torch.h"

namespace dsd::checkpoint {
namespace {

constexpr uint64_t kMaxMetadataBytes = 1u << 30;

Error corrupt(const std::string& dir, const std::string& key, std::string what) {
  return make_error_at(Code::kCorrupt, key, "DCP checkpoint '{}': {}", dir, what);
}

Status check_chunk(const std::string& dir, const std::string& key, const std::vector<int64_t>& shape,
                   const dcp::ChunkStorageMetadata& c) {
  if (c.offsets.size() != shape.size() || c.sizes.size() != shape.size()) {
    return corrupt(dir, key, fmt::format("a chunk of '{}' has {} offsets and {} sizes for a tensor of rank {}", key,
                                         c.offsets.size(), c.sizes.size(), shape.size()));
  }
  for (size_t d = 0; d < shape.size(); ++d) {
    if (c.offsets[d] < 0 || c.sizes[d] < 0 || shape[d] < 0 || c.offsets[d] > shape[d] ||
        c.sizes[d] > shape[d] - c.offsets[d]) {
      return corrupt(dir, key, fmt::format("chunk offsets [{}] sizes [{}] of '{}' lie outside its shape [{}]",
                                           fmt::join(c.offsets, ", "), fmt::join(c.sizes, ", "), key,
                                           fmt::join(shape, ", ")));
    }
  }
  return ok();
}

Status check_storage(const std::string& dir, const std::string& key, const dcp::StorageInfo& info) {
  if (!is_plain_file_name(info.relative_path)) {
    return corrupt(dir, key, fmt::format("the storage of '{}' names '{}', which is not a file of the directory", key,
                                         info.relative_path));
  }
  return ok();
}

// A chunk stored through a stream transform (zstd): decompressed and read whole, its
// decompressed size bounded by the chunk's bytes plus what a torch.save archive adds.
Result<LocatedChunk> read_transformed_chunk(const std::string& file, dcp::StorageInfo info,
                                            const std::vector<std::string>& descriptors, const Entry& entry,
                                            const ChunkRecord& chunk, const std::string& where) {
  constexpr uint64_t kArchiveOverhead = uint64_t{1} << 20;
  uint64_t numel = 1;
  for (int64_t s : chunk.sizes) numel *= static_cast<uint64_t>(s);
  info.transform_descriptors = descriptors;
  Result<at::Tensor> t = dcp::read_tensor_chunk(file, info, numel * element_size(entry.dtype) + kArchiveOverhead);
  if (!t.ok()) return std::move(t).error().with_prefix(fmt::format("{}: ", where));
  const at::Tensor& tensor = *t;
  Result<DType> dtype = dtype_from_scalar_type(tensor.scalar_type());
  if (!dtype.ok() || *dtype != entry.dtype || tensor.sizes().vec() != chunk.sizes) {
    return make_error_at(Code::kCorrupt, chunk.file, "{} holds a {} tensor of shape [{}], the metadata says {} [{}]",
                         where, c10::toString(tensor.scalar_type()), fmt::join(tensor.sizes(), ", "),
                         dtype_name(entry.dtype), fmt::join(chunk.sizes, ", "));
  }
  LocatedChunk out;
  out.tensor = TRY(torch_call(Code::kInternal, fmt::format("reading {}", where), [&] { return tensor.contiguous(); }));
  return out;
}

// Merges the metadata of a save without collectives (one `__<rank>.metadata` per rank, each
// describing that rank's items) into one.
Result<dcp::Metadata> merge_rank_metadata(const std::string& dir, std::vector<dcp::Metadata> parts) {
  dcp::Metadata out = std::move(parts.front());
  std::map<std::string, size_t> position;
  for (size_t i = 0; i < out.state_dict_metadata.size(); ++i) position[out.state_dict_metadata[i].first] = i;
  for (size_t p = 1; p < parts.size(); ++p) {
    dcp::Metadata& m = parts[p];
    for (auto& [fqn, md] : m.state_dict_metadata) {
      auto it = position.find(fqn);
      if (it == position.end()) {
        position[fqn] = out.state_dict_metadata.size();
        out.state_dict_metadata.emplace_back(fqn, std::move(md));
        continue;
      }
      auto& mine = out.state_dict_metadata[it->second].second;
      auto* a = std::get_if<dcp::TensorStorageMetadata>(&mine);
      auto* b = std::get_if<dcp::TensorStorageMetadata>(&md);
      if ((a == nullptr) != (b == nullptr) || (a && (a->size != b->size || a->properties.dtype != b->properties.dtype))) {
        return corrupt(dir, fqn, fmt::format("the rank metadata files disagree on '{}'", fqn));
      }
      if (a == nullptr) continue;
      for (auto& c : b->chunks) {
        if (std::find(a->chunks.begin(), a->chunks.end(), c) == a->chunks.end()) a->chunks.push_back(std::move(c));
      }
    }
    for (auto& s : m.storage_data) out.storage_data.push_back(std::move(s));
    if (m.planner_data) {
      if (!out.planner_data) out.planner_data.emplace();
      for (auto& kv : *m.planner_data) out.planner_data->push_back(std::move(kv));
    }
  }
  return out;
}

Result<std::optional<Source>> open_dcp(const std::string& dir) {
  const std::string global = join(dir, kDcpMetadataName);
  if (path_exists(global)) {
    const std::string bytes = TRY(read_file(global, kMaxMetadataBytes));
    Result<dcp::Metadata> m = dcp::parse_metadata(bytes);
    if (!m.ok()) return std::move(m).error().with_prefix(fmt::format("'{}': ", global));
    return std::optional(TRY(dcp_source(dir, std::move(*m))));
  }
  std::vector<std::pair<int64_t, std::string>> rank_files;
  auto names = list_dir(dir);
  if (names.ok()) {
    for (const std::string& n : *names) {
      if (auto r = dcp_rank_metadata(n)) rank_files.emplace_back(*r, n);
    }
  }
  if (rank_files.empty()) return std::optional<Source>();
  std::sort(rank_files.begin(), rank_files.end());
  std::vector<dcp::Metadata> parts;
  for (const auto& [rank, name] : rank_files) {
    const std::string file = join(dir, name);
    const std::string bytes = TRY(read_file(file, kMaxMetadataBytes));
    Result<dcp::Metadata> m = dcp::parse_metadata(bytes);
    if (!m.ok()) return std::move(m).error().with_prefix(fmt::format("'{}': ", file));
    parts.push_back(std::move(*m));
  }
  dcp::Metadata merged = TRY(merge_rank_metadata(dir, std::move(parts)));
  return std::optional(TRY(dcp_source(dir, std::move(merged), true)));
}

// Opens every data file of a dsd manifest inside `dir` and checks it against the manifest.
Result<std::shared_ptr<const std::map<std::string, File>>> open_data_files(const std::string& dir, const Manifest& m,
                                                                        const OpenOptions& options) {
  const File d = TRY(open_dir(dir));
  auto files = std::make_shared<std::map<std::string, File>>();
  std::map<std::string, DataFileInfo> infos;
  // The sibling checkpoints an incremental checkpoint references, each opened once.
  std::map<std::string, File> bases;
  for (const FileRecord& r : m.files) {
    const File* in = &d;
    if (r.referenced()) {
      auto b = bases.find(r.checkpoint);
      if (b == bases.end()) {
        Result<File> bd = open_sibling_dir(d, r.checkpoint, options.allow_external_files);
        if (!bd.ok()) {
          Error e = std::move(bd).error();
          if (e.code == Code::kNotFound) {
            return make_error_at(Code::kNotFound, data_file_path(dir, r),
                                 "data file '{}' of checkpoint '{}' is missing: its base checkpoint '{}' was moved or "
                                 "deleted (an incremental checkpoint reads the unchanged tensors from it)",
                                 data_file_path(dir, r), dir, r.checkpoint);
          }
          return e;
        }
        b = bases.emplace(r.checkpoint, std::move(bd).value()).first;
      }
      in = &b->second;
    }
    Result<File> opened = open_in_dir(*in, r.name, options.allow_external_files);
    if (!opened.ok() && r.referenced() && opened.error().code == Code::kNotFound) {
      return make_error_at(Code::kNotFound, data_file_path(dir, r),
                           "data file '{}' of checkpoint '{}' is missing from its base checkpoint '{}' (moved or "
                           "deleted out of band)",
                           data_file_path(dir, r), dir, r.checkpoint);
    }
    File f = TRY(std::move(opened));
    DataFileInfo info;
    info.size = TRY(file_size(f));
    if (info.size != r.size) {
      return make_error_at(Code::kCorrupt, r.name, "data file '{}' has {} bytes, the manifest records {}", f.path(),
                           info.size, r.size);
    }
    info.header = TRY(safetensors::read_header(f.fd(), f.path()));
    infos.emplace(r.name, std::move(info));
    files->emplace(r.name, std::move(f));
  }
  TRY(check_data_files(m, infos));
  return std::shared_ptr<const std::map<std::string, File>>(std::move(files));
}

}  // namespace

Result<Source> dcp_source(const std::string& dir, dcp::Metadata metadata, bool rank_local) {
  Source s;
  s.format = Format::kDcp;
  s.dir = dir;
  DcpIndex index;
  index.rank_local = rank_local;
  std::map<std::pair<std::string_view, std::vector<int64_t>>, const dcp::StorageInfo*> chunk_storage;
  int64_t max_rank = -1;
  for (const auto& [mi, info] : metadata.storage_data) {
    TRY(check_storage(dir, mi.fqn, info));
    if (auto r = distcp_rank(info.relative_path)) max_rank = std::max(max_rank, *r);
    if (info.transform_descriptors && !info.transform_descriptors->empty()) {
      index.transformed.emplace(std::make_pair(info.relative_path, info.offset), *info.transform_descriptors);
    }
    if (mi.offset) {
      chunk_storage.emplace(std::make_pair(std::string_view(mi.fqn), *mi.offset), &info);
    } else {
      index.values.emplace(mi.fqn, info);
    }
  }
  std::map<std::string_view, const Path*> paths;
  if (metadata.planner_data) {
    for (const auto& [fqn, path] : *metadata.planner_data) paths.emplace(fqn, &path);
  }
  Manifest& m = s.manifest;
  m.world_size = std::max<int64_t>(1, max_rank + 1);
  if (metadata.storage_meta && metadata.storage_meta->save_id) m.save_id = *metadata.storage_meta->save_id;
  std::set<std::string> files;
  for (const auto& [fqn, md] : metadata.state_dict_metadata) {
    Entry e;
    e.key = fqn;
    if (auto p = paths.find(fqn); p != paths.end() && !p->second->empty()) {
      e.path = *p->second;
    } else {
      e.path = {fqn};
    }
    if (const auto* t = std::get_if<dcp::TensorStorageMetadata>(&md)) {
      e.kind = Entry::Kind::kTensor;
      e.dtype = t->properties.dtype;
      e.shape = t->size;
      for (int64_t d : e.shape) {
        if (d < 0) return corrupt(dir, fqn, fmt::format("'{}' has a negative dimension", fqn));
      }
      for (const auto& c : t->chunks) {
        TRY(check_chunk(dir, fqn, e.shape, c));
        auto it = chunk_storage.find(std::make_pair(std::string_view(fqn), c.offsets));
        if (it == chunk_storage.end()) {
          return corrupt(dir, fqn, fmt::format("chunk {} of '{}' has no storage entry", Chunk{c.offsets, c.sizes}.str(),
                                               fqn));
        }
        ChunkRecord r;
        r.offsets = c.offsets;
        r.sizes = c.sizes;
        r.file = it->second->relative_path;
        r.begin = static_cast<uint64_t>(it->second->offset);
        r.end = r.begin + static_cast<uint64_t>(it->second->length);
        files.insert(r.file);
        e.chunks.push_back(std::move(r));
      }
    } else {
      e.kind = Entry::Kind::kValue;
      auto it = index.values.find(fqn);
      if (it == index.values.end()) return corrupt(dir, fqn, fmt::format("value '{}' has no storage entry", fqn));
      files.insert(it->second.relative_path);
    }
    m.entries.push_back(std::move(e));
  }
  for (const std::string& f : files) m.files.push_back({f, distcp_rank(f).value_or(0), 0, {}});
  index.metadata = std::move(metadata);
  s.dcp = std::move(index);
  return s;
}

Result<Source> open_source(const std::string& path, const OpenOptions& options) {
  if (!path_exists(join(path, kManifestName))) {
    auto dcp = TRY(open_dcp(path));
    if (dcp) return std::move(*dcp);
    return make_error_at(Code::kNotFound, path, "no checkpoint at '{}' (no {}, no DCP {})", path, kManifestName,
                         kDcpMetadataName);
  }
  Source s;
  s.format = Format::kDsd;
  s.dir = path;
  s.manifest = TRY(read_manifest(path));
  s.files = TRY(open_data_files(path, s.manifest, options));
  return s;
}

Result<LocatedChunk> locate_dcp_chunk(const Source& source, const Entry& entry, const ChunkRecord& chunk) {
  const std::string file = join(source.dir, chunk.file);
  dcp::StorageInfo info{chunk.file, static_cast<int64_t>(chunk.begin), static_cast<int64_t>(chunk.end - chunk.begin),
                        std::nullopt};
  auto where = [&] { return fmt::format("chunk {} of '{}' in '{}'", Chunk{chunk.offsets, chunk.sizes}.str(), entry.key, file); };
  if (auto t = source.dcp->transformed.find({chunk.file, info.offset}); t != source.dcp->transformed.end()) {
    return read_transformed_chunk(file, std::move(info), t->second, entry, chunk, where());
  }
  Result<TorchTensorRecord> located = dcp::locate_tensor_chunk(file, info);
  if (!located.ok()) return std::move(located).error().with_prefix(fmt::format("{}: ", where()));
  const TorchTensorRecord& rec = *located;
  if (rec.dtype != entry.dtype || rec.sizes != chunk.sizes) {
    return make_error_at(Code::kCorrupt, chunk.file, "{} holds a {} tensor of shape [{}], the metadata says {} [{}]",
                         where(), dtype_name(rec.dtype), fmt::join(rec.sizes, ", "), dtype_name(entry.dtype),
                         fmt::join(chunk.sizes, ", "));
  }
  LocatedChunk out;
  if (rec.is_contiguous() && !rec.big_endian && !rec.conj && !rec.neg) {
    const uint64_t nbytes = static_cast<uint64_t>(rec.numel()) * element_size(rec.dtype);
    out.begin = rec.storage_data_offset + static_cast<uint64_t>(rec.storage_offset) * element_size(rec.dtype);
    out.end = out.begin + nbytes;
    if (out.end > chunk.end || out.begin < chunk.begin) {
      return make_error_at(Code::kCorrupt, chunk.file, "{}: the tensor's bytes lie outside its item", where());
    }
    return out;
  }
  Result<at::Tensor> t = dcp::read_tensor_chunk(file, info);
  if (!t.ok()) return std::move(t).error().with_prefix(fmt::format("{}: ", where()));
  out.tensor = TRY(torch_call(Code::kInternal, fmt::format("reading {}", where()), [&] { return t->contiguous(); }));
  return out;
}

Result<Value> read_source_value(const Source& source, const Entry& entry) {
  if (source.is_dsd()) return value_from_json(entry.value, entry.key);
  auto it = source.dcp->values.find(entry.key);
  if (it == source.dcp->values.end()) {
    return make_error_at(Code::kCorrupt, entry.key, "DCP checkpoint '{}': value '{}' has no storage entry", source.dir,
                         entry.key);
  }
  const std::string file = join(source.dir, it->second.relative_path);
  Result<Value> v = dcp::read_bytes_item(file, it->second);
  if (!v.ok()) return std::move(v).error().with_prefix(fmt::format("reading value '{}': ", entry.key));
  return v;
}

}  // namespace dsd::checkpoint
