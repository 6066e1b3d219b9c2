// The dsd format's storage writer: each rank's chunks in safetensors data files named after
// the save id (DESIGN.md "Checkpoint format (v1)"), hashed as they are written, and the
// coordinator's checkpoint.json written last, atomically, as the commit.
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <map>
#include <mutex>
#include <optional>
#include <set>
#include <unordered_map>

#include "core/base/make_error.h"
#include "core/base/torch_call.h"
#include "core/checkpoint/base_checkpoint.h"
#include "core/checkpoint/chunk_hash.h"
#include "core/checkpoint/crash_point.h"
#include "core/checkpoint/dcp_files.h"
#include "core/checkpoint/io.h"
#include "core/checkpoint/pool.h"
#include "core/checkpoint/retention.h"
#include "core/checkpoint/storage_writer.h"
#include "core/checkpoint/tensor_bytes.h"
#include "core/checkpoint/write_results.h"
#include "core/formats/safetensors.h"

namespace dsd::checkpoint {
namespace {

using nlohmann::json;

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
  // Incremental saves: the base's files this rank's chunks reference, and their bytes.
  std::map<std::string, FileRecord> referenced_files;
  uint64_t bytes_referenced = 0;
};

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
Status write_file(const std::string& dir, const RankPlan& rp, FilePlan fp, const SourceMap& sources,
                  const SaveOptions& opt, const BaseCheckpoint* base, std::mutex& mu, RankOutcome& out) {
  if (base != nullptr) {
    // Chunks the base holds unchanged are referenced, not written (base_checkpoint.h).
    std::vector<size_t> written;
    std::vector<WrittenChunk> refs;
    uint64_t ref_bytes = 0;
    for (size_t i : fp.items) {
      const WriteItem& it = rp.items[i];
      auto src = sources.find(it.key);
      if (src == sources.end()) return make_error_at(Code::kInternal, it.key, "no tensor for '{}'", it.key);
      // A placeholder's data is supplied once, when it is written (conversions, capped
      // async staging in waves): it is written, not compared.
      if (src->second.is_meta()) {
        written.push_back(i);
        continue;
      }
      std::optional<ReferencedChunk> ref = TRY(base->reference(it, src->second, opt.block_size));
      if (!ref) {
        written.push_back(i);
        continue;
      }
      ref_bytes += ref->record.nbytes();
      refs.push_back({it.key, std::move(ref->record)});
      std::lock_guard<std::mutex> lock(mu);
      out.referenced_files.emplace(ref->file.name, ref->file);
    }
    fp.items = std::move(written);
    std::lock_guard<std::mutex> lock(mu);
    out.bytes_referenced += ref_bytes;
    for (auto& c : refs) out.chunks.push_back(std::move(c));
    if (fp.items.empty()) return ok();  // nothing left to write: no data file
  }
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
  out.files.push_back({fp.name, 0, header.size() + pos, {}});
  out.bytes += header.size() + pos;
  for (auto& c : chunks) out.chunks.push_back(std::move(c));
  return ok();
}

// Writes this rank's files with a pool of writer threads, one file at a time each.
Status write_rank_files(const std::string& dir, int64_t rank, const RankPlan& rp, const SourceMap& sources,
                        const SaveOptions& opt, const BaseCheckpoint* base, RankOutcome& out) {
  std::mutex mu;
  TRY(parallel_for(rp.files.size(), opt.thread_count, [&](size_t i) {
    return write_file(dir, rp, rp.files[i], sources, opt, base, mu, out);
  }));
  for (FileRecord& f : out.files) f.rank = rank;
  for (auto& [name, f] : out.referenced_files) out.files.push_back(f);
  return ok();
}

std::string encode_outcome(const RankOutcome& out) { return encode_write_results(out.files, out.chunks); }

// After the commit: data files of earlier saves (and orphans of crashed ones) go.
void remove_unreferenced_files(const std::string& path, const Manifest& m) {
  auto names = list_dir(path);
  if (!names.ok()) return;
  std::set<std::string> keep;
  for (const FileRecord& f : m.files) {
    if (!f.referenced()) keep.insert(f.name);
  }
  // Files of the replaced checkpoint that incremental siblings reference stay (a sibling
  // saved with this directory as its base); counted only when there is a stale file.
  std::optional<std::set<std::string>> referenced;
  bool removed_one = false;
  for (const std::string& n : *names) {
    bool stale_data = is_data_file_name(n) && keep.count(n) == 0;
    if (stale_data) {
      if (!referenced) referenced = referenced_by_siblings(path);
      stale_data = referenced->count(n) == 0;
    }
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
    // The coordinator checks the base before any rank plans, so a wrong one fails at once.
    if (!options_.base.empty()) base_ = TRY(BaseCheckpoint::open(options_.base, path_));
    return int64_t{0};
  }

  Result<WriteResult> write_data(const GlobalPlan& plan, int64_t rank, const SourceMap& sources) override {
    if (!options_.base.empty() && !base_) base_ = TRY(BaseCheckpoint::open(options_.base, path_));
    TRY(write_rank_files(path_, rank, plan.ranks[static_cast<size_t>(rank)], sources, options_, base_.get(), out_));
    WriteResult r{encode_outcome(out_), out_.bytes,
                  static_cast<int>(out_.files.size() - out_.referenced_files.size())};
    r.bytes_referenced = out_.bytes_referenced;
    return r;
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
  std::shared_ptr<BaseCheckpoint> base_;
};

}  // namespace

std::unique_ptr<StorageWriter> make_dsd_storage_writer(const std::string& path, const SaveOptions& options) {
  return std::make_unique<DsdStorageWriter>(path, options);
}

}  // namespace dsd::checkpoint
