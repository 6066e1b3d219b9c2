#include "core/checkpoint/base_checkpoint.h"

#include <cstring>
#include <filesystem>
#include <vector>

#include "core/base/make_error.h"
#include "core/checkpoint/chunk_hash.h"
#include "core/checkpoint/load.h"
#include "core/checkpoint/tensor_bytes.h"

namespace dsd::checkpoint {
namespace {

// Bytes hashed and compared in one step (as the writer's step: the compare reads what the
// hash just brought into the cache).
constexpr uint64_t kCompareStep = 1u << 20;

// The physical location of a directory (symbolic links resolved), or of the directory a
// path will be (its parent resolved, for a target not created yet).
std::filesystem::path physical(const std::string& path) {
  std::error_code ec;
  std::filesystem::path p = std::filesystem::canonical(path, ec);
  if (!ec) return p;
  const std::filesystem::path lexical = std::filesystem::absolute(path).lexically_normal();
  std::filesystem::path parent = std::filesystem::canonical(lexical.parent_path(), ec);
  return ec ? lexical : parent / lexical.filename();
}

}  // namespace

Result<std::shared_ptr<BaseCheckpoint>> BaseCheckpoint::open(const std::string& base, const std::string& target) {
  std::string trimmed = base;
  while (trimmed.size() > 1 && trimmed.back() == '/') trimmed.pop_back();
  if (!is_directory(trimmed) || !path_exists(join(trimmed, kManifestName))) {
    if (is_directory(trimmed) && (path_exists(join(trimmed, ".metadata")))) {
      return make_error_at(Code::kInvalidArgument, base,
                           "the base '{}' is a PyTorch DCP checkpoint; an incremental save references only dsd "
                           "checkpoints",
                           base);
    }
    return make_error_at(Code::kNotFound, base, "the base '{}' of this incremental save is not a dsd checkpoint",
                         base);
  }
  const std::filesystem::path b = physical(trimmed);
  const std::filesystem::path t = physical(target);
  if (b == t) {
    return make_error_at(Code::kInvalidArgument, base,
                         "the base of a save to '{}' is that checkpoint itself; name the previous checkpoint", target);
  }
  if (b.parent_path() != t.parent_path()) {
    return make_error_at(Code::kInvalidArgument, base,
                         "the base '{}' is not a sibling of '{}': an incremental checkpoint references checkpoints "
                         "in the same parent directory only (as a checkpoint manager's steps)",
                         base, target);
  }
  auto out = std::shared_ptr<BaseCheckpoint>(new BaseCheckpoint());
  out->dir_ = trimmed;
  out->name_ = b.filename().string();
  out->target_name_ = t.filename().string();
  out->manifest_ = TRY(read_manifest(trimmed));
  std::unordered_map<std::string, const FileRecord*> files;
  for (const FileRecord& f : out->manifest_.files) files.emplace(f.name, &f);
  for (const Entry& e : out->manifest_.entries) {
    if (e.kind != Entry::Kind::kTensor) continue;
    for (const ChunkRecord& c : e.chunks) {
      out->chunks_.emplace(std::make_pair(e.key, c.offsets), Candidate{&c, files.at(c.file), e.dtype});
    }
  }
  return out;
}

Result<const File*> BaseCheckpoint::data_file(const FileRecord& f) const {
  std::lock_guard<std::mutex> lock(mu_);
  if (auto it = files_.find(f.name); it != files_.end()) return it->second.get();
  const std::string owner = f.referenced() ? f.checkpoint : name_;
  auto d = dirs_.find(owner);
  if (d == dirs_.end()) {
    File base = TRY(open_dir(dir_));
    File dir = f.referenced() ? TRY(open_sibling_dir(base, owner, false)) : std::move(base);
    d = dirs_.emplace(owner, std::make_unique<File>(std::move(dir))).first;
  }
  File file = TRY(open_in_dir(*d->second, f.name, false));
  if (TRY(file_size(file)) != f.size) {
    return make_error_at(Code::kCorrupt, f.name, "data file '{}' of the base '{}' has changed size", f.name, dir_);
  }
  return files_.emplace(f.name, std::make_unique<File>(std::move(file))).first->second.get();
}

Result<std::optional<ReferencedChunk>> BaseCheckpoint::reference(const WriteItem& item, const at::Tensor& data,
                                                                 uint64_t block_size) const {
  using Out = std::optional<ReferencedChunk>;
  if (block_size != manifest_.block_size) return Out();
  auto it = chunks_.find(std::make_pair(item.key, item.offsets));
  if (it == chunks_.end()) return Out();
  const Candidate& cand = it->second;
  // A save over a checkpoint the base references (overwrite) would reference its own files,
  // which the save replaces.
  if (cand.file->checkpoint == target_name_) return Out();
  const uint64_t nbytes = static_cast<uint64_t>(data.numel()) * data.element_size();
  if (cand.dtype != item.dtype || cand.chunk->sizes != item.sizes || cand.chunk->nbytes() != nbytes || nbytes == 0) {
    return Out();
  }
  Result<const File*> file = data_file(*cand.file);
  if (!file.ok()) return Out();  // missing or unreadable: the chunk is written again
  ChunkHasher hasher(block_size);
  std::vector<char> base_bytes(static_cast<size_t>(std::min(nbytes, kCompareStep)));
  uint64_t pos = 0;
  bool differs = false;
  TRY(for_each_piece(
      data, item.key,
      [&](const void* p, uint64_t len) -> Status {
        const auto* bytes = static_cast<const char*>(p);
        for (uint64_t off = 0; off < len && !differs; off += kCompareStep) {
          const uint64_t n = std::min(kCompareStep, len - off);
          hasher.feed(bytes + off, n);
          if (!pread_all(**file, base_bytes.data(), n, cand.chunk->begin + pos).ok() ||
              std::memcmp(base_bytes.data(), bytes + off, n) != 0) {
            differs = true;
          }
          pos += n;
        }
        return ok();
      },
      &differs));
  if (differs || hasher.finish() != cand.chunk->xxh3 || hasher.blocks() != cand.chunk->blocks) return Out();
  ReferencedChunk r;
  r.record = *cand.chunk;
  r.file = *cand.file;
  if (!r.file.referenced()) r.file.checkpoint = name_;
  return Out(std::move(r));
}

}  // namespace dsd::checkpoint
