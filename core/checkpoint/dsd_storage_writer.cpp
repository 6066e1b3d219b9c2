// The dsd format's storage writer: each rank's chunks in safetensors data files named after
// the save id (DESIGN.md "Checkpoint format (v1)"), hashed as they are written, and the
// coordinator's checkpoint.json written last, atomically, as the commit.
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <map>
#include <mutex>
#include <set>
#include <unordered_map>

#include "core/base/make_error.h"
#include "core/base/torch_call.h"
#include "core/checkpoint/chunk_hash.h"
#include "core/checkpoint/crash_point.h"
#include "core/checkpoint/dcp_files.h"
#include "core/checkpoint/io.h"
#include "core/checkpoint/pool.h"
#include "core/checkpoint/storage_writer.h"
#include "core/checkpoint/write_results.h"
#include "core/formats/safetensors.h"

namespace dsd::checkpoint {
namespace {

using nlohmann::json;

// Largest piece staged through the host buffer in one go.
constexpr uint64_t kPieceBytes = 64u << 20;
// Bytes hashed then written in one step: small enough to stay in the core's cache between
// the two, large enough that the syscalls cost nothing.
constexpr uint64_t kStepBytes = 1u << 20;
// With sync_files, writeback of what was written is started every this many bytes, so the
// disk works while later bytes are copied and the final fsync finds little left to do.
constexpr uint64_t kWriteBehindBytes = 32u << 20;

struct RankOutcome {
  std::vector<FileRecord> files;
  std::vector<WrittenChunk> chunks;
  std::vector<std::string> created;  // full paths, for cleanup on failure
  uint64_t bytes = 0;
};

// Calls fn(ptr, len) over the tensor's bytes in row-major order, straight from its memory when
// it is a plain contiguous CPU tensor, else through a bounded host buffer.
template <class Fn>
Status for_each_piece(const at::Tensor& t, const std::string& key, Fn&& fn) {
  const uint64_t nbytes = static_cast<uint64_t>(t.numel()) * t.element_size();
  if (nbytes == 0) return ok();
  const bool direct = t.device().is_cpu() && t.is_contiguous() && !t.is_conj() && !t.is_neg();
  if (direct) {
    const auto* p = static_cast<const char*>(t.data_ptr());
    for (uint64_t off = 0; off < nbytes; off += kPieceBytes) {
      TRY(fn(p + off, std::min(kPieceBytes, nbytes - off)));
    }
    return ok();
  }
  return torch_call(Code::kDevice, fmt::format("copying '{}' to host memory", key), [&]() -> Status {
    if (t.dim() == 0) {
      at::Tensor c = t.cpu().resolve_conj().resolve_neg().contiguous();
      return fn(c.data_ptr(), nbytes);
    }
    const uint64_t row = nbytes / static_cast<uint64_t>(t.size(0));
    const int64_t rows = static_cast<int64_t>(std::max<uint64_t>(1, kPieceBytes / row));
    at::Tensor buf = at::empty({static_cast<int64_t>(std::min<uint64_t>(rows, t.size(0)) * row)},
                               at::TensorOptions().dtype(at::kByte));
    for (int64_t i = 0; i < t.size(0); i += rows) {
      at::Tensor slice = t.narrow(0, i, std::min(rows, t.size(0) - i));
      at::Tensor dst = at::from_blob(buf.data_ptr(), slice.sizes(), at::TensorOptions().dtype(t.dtype()));
      dst.copy_(slice);
      TRY(fn(buf.data_ptr(), static_cast<uint64_t>(slice.numel()) * t.element_size()));
    }
    return ok();
  });
}

// Starts the writeback of a data file's bytes as they are written (sync_file_range), so a
// durable save streams to disk instead of waiting for all of it in the final fsync.
class WriteBehind {
 public:
  WriteBehind(const File& f, bool enabled, uint64_t offset) : f_(f), enabled_(enabled), start_(offset), end_(offset) {}

  Status wrote(uint64_t n) {
    end_ += n;
    if (!enabled_ || end_ - start_ < kWriteBehindBytes) return ok();
    TRY(start_writeback(f_, start_, end_ - start_));
    start_ = end_;
    return ok();
  }

 private:
  const File& f_;
  bool enabled_;
  uint64_t start_;
  uint64_t end_;
};

std::map<std::string, std::string> file_metadata(const RankPlan& rp, const FilePlan& fp) {
  json sharding = json::object();
  for (size_t i : fp.items) sharding[rp.items[i].key] = {{"saved_offsets", rp.items[i].offsets}};
  return {{"DCP_SHARDING_INFO", sharding.dump()}, {"DCP_VERSION", "1.0"}, {"format", "pt"}};
}

// Writes one data file: header, then each chunk's bytes, hashed on the way; fsync.
Status write_file(const std::string& dir, const RankPlan& rp, const FilePlan& fp,
                  const SourceMap& sources, const SaveOptions& opt, std::mutex& mu,
                  RankOutcome& out) {
  std::vector<safetensors::TensorEntry> entries;
  uint64_t pos = 0;
  for (size_t i : fp.items) {
    const WriteItem& it = rp.items[i];
    const uint64_t n = it.storage_bytes();
    entries.push_back({it.key, it.dtype, it.sizes, pos, pos + n});
    pos += n;
  }
  const std::string header = TRY(safetensors::write_header(entries, file_metadata(rp, fp)));
  const std::string full = join(dir, fp.name);
  File f = TRY(create_new(full));
  {
    std::lock_guard<std::mutex> lock(mu);
    out.created.push_back(full);
  }
  TRY(write_all(f, header.data(), header.size()));
  WriteBehind behind(f, opt.sync_files, header.size());
  bool first_step = true;
  std::vector<WrittenChunk> chunks;
  for (size_t k = 0; k < fp.items.size(); ++k) {
    const WriteItem& it = rp.items[fp.items[k]];
    auto src = sources.find(it.key);
    if (src == sources.end()) return make_error_at(Code::kInternal, it.key, "no tensor for '{}'", it.key);
    ChunkHasher hasher(opt.block_size);
    const at::Tensor data = TRY(source_tensor(src->second, it.key, opt));
    TRY(for_each_piece(data, it.key, [&](const void* p, uint64_t len) -> Status {
      // Hash and write in cache-sized steps, so the write copies bytes the hash just
      // brought into the cache instead of reading them from memory a second time.
      const auto* bytes = static_cast<const char*>(p);
      for (uint64_t off = 0; off < len; off += kStepBytes) {
        const uint64_t n = std::min(kStepBytes, len - off);
        hasher.feed(bytes + off, n);
        TRY(write_all(f, bytes + off, n));
        TRY(behind.wrote(n));
        if (first_step) {
          first_step = false;
          crash_point("save.mid_write");
        }
      }
      return ok();
    }));
    WrittenChunk c;
    c.key = it.key;
    c.record.offsets = it.offsets;
    c.record.sizes = it.sizes;
    c.record.file = fp.name;
    c.record.begin = header.size() + entries[k].begin;
    c.record.end = header.size() + entries[k].end;
    c.record.xxh3 = hasher.finish();
    c.record.blocks = std::move(hasher.blocks());
    chunks.push_back(std::move(c));
  }
  if (opt.sync_files) TRY(sync(f));
  TRY(f.close());
  std::lock_guard<std::mutex> lock(mu);
  out.files.push_back({fp.name, 0, header.size() + pos});
  out.bytes += header.size() + pos;
  for (auto& c : chunks) out.chunks.push_back(std::move(c));
  return ok();
}

// Writes this rank's files with a pool of writer threads, one file at a time each.
Status write_rank_files(const std::string& dir, int64_t rank, const RankPlan& rp,
                        const SourceMap& sources, const SaveOptions& opt, RankOutcome& out) {
  std::mutex mu;
  TRY(parallel_for(rp.files.size(), opt.thread_count, [&](size_t i) {
    return write_file(dir, rp, rp.files[i], sources, opt, mu, out);
  }));
  for (FileRecord& f : out.files) f.rank = rank;
  return ok();
}

std::string encode_outcome(const RankOutcome& out) { return encode_write_results(out.files, out.chunks); }

// After the commit: data files of earlier saves (and orphans of crashed ones) go.
void remove_unreferenced_files(const std::string& path, const Manifest& m) {
  auto names = list_dir(path);
  if (!names.ok()) return;
  std::set<std::string> keep;
  for (const FileRecord& f : m.files) keep.insert(f.name);
  bool removed_one = false;
  for (const std::string& n : *names) {
    const bool stale_data = is_data_file_name(n) && keep.count(n) == 0;
    const bool stale_tmp = n.starts_with(std::string(kManifestName) + ".tmp-");
    // A DCP checkpoint this save replaced (overwrite) in the same directory.
    const bool stale_dcp = is_dcp_file_name(n);
    if (!stale_data && !stale_tmp && !stale_dcp) continue;
    (void)remove_file(join(path, n));
    if (stale_data && !removed_one) {
      removed_one = true;
      crash_point("save.after_cleanup_one");
    }
  }
}

class DsdStorageWriter final : public StorageWriter {
 public:
  using StorageWriter::StorageWriter;

  Result<int64_t> prepare_storage() override {
    TRY(prepare_checkpoint_dir(path_, options_.overwrite));
    return int64_t{0};
  }

  Result<WriteResult> write_data(const GlobalPlan& plan, int64_t rank, const SourceMap& sources) override {
    TRY(write_rank_files(path_, rank, plan.ranks[static_cast<size_t>(rank)], sources, options_, out_));
    return WriteResult{encode_outcome(out_), out_.bytes, static_cast<int>(out_.files.size())};
  }

  Status finish(GlobalPlan& plan, const std::vector<std::string>& results) override {
    plan.manifest.block_size = options_.block_size;
    TRY(merge_write_results(plan.manifest, results));
    TRY(sync_dir(path_));
    crash_point("save.before_commit");
    TRY(write_file_atomic(path_, kManifestName, manifest_to_json(plan.manifest)));
    committed_ = plan.manifest;
    return ok();
  }

  void remove_stale_files() override { remove_unreferenced_files(path_, committed_); }

 private:
  const std::vector<std::string>& created() const override { return out_.created; }

  RankOutcome out_;
  Manifest committed_;
};

}  // namespace

std::unique_ptr<StorageWriter> make_dsd_storage_writer(const std::string& path, const SaveOptions& options) {
  return std::make_unique<DsdStorageWriter>(path, options);
}

}  // namespace dsd::checkpoint
