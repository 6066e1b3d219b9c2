#include "core/checkpoint/storage_reader.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <memory>

#include "core/base/make_error.h"
#include "core/checkpoint/chunk_hash.h"
#include "core/checkpoint/pool.h"

namespace dsd::checkpoint {
namespace {

// Upper bound of one read work unit (several blocks), so big chunks are read in parallel.
constexpr uint64_t kUnitBytes = 64u << 20;
// Bytes read then hashed in one step: small enough to stay in the core's cache between the
// two, large enough that the syscalls cost nothing.
constexpr uint64_t kStepBytes = 1u << 20;

Error checksum_error(const Entry& entry, const ChunkRecord& chunk, uint64_t from, uint64_t to) {
  return make_error_at(Code::kCorrupt, chunk.file,
                       "checksum mismatch in data file '{}' for key '{}' (bytes [{}, {}) of chunk {}): "
                       "the checkpoint is corrupt",
                       chunk.file, entry.key, chunk.begin + from, chunk.begin + to,
                       Chunk{chunk.offsets, chunk.sizes}.str());
}

Error whole_checksum_error(const Entry& entry, const ChunkRecord& chunk) {
  return make_error_at(Code::kCorrupt, chunk.file,
                       "checksum mismatch in data file '{}' for key '{}' (the whole-chunk checksum of chunk {}): "
                       "the checkpoint is corrupt",
                       chunk.file, entry.key, Chunk{chunk.offsets, chunk.sizes}.str());
}

Error with_key(Error e, const std::string& key) {
  e.message = fmt::format("{} (reading '{}')", e.message, key);
  return e;
}

}  // namespace

StorageReader::StorageReader(const Source& source, bool verify)
    : source_(source), dir_(source.dir), block_size_(source.manifest.block_size), verify_(verify && source.is_dsd()) {}

Status StorageReader::add(const std::vector<ReadItem>& items, int threads) {
  const Source& src = source_;
  std::vector<LocatedChunk> located(src.is_dsd() ? 0 : items.size());
  if (!src.is_dsd()) {
    TRY(parallel_for(items.size(), threads, [&](size_t i) -> Status {
      located[i] = TRY(locate_dcp_chunk(src, *items[i].entry, *items[i].chunk));
      return ok();
    }));
  }
  for (size_t i = 0; i < items.size(); ++i) {
    const ReadItem& n = items[i];
    const uint64_t esize = element_size(n.entry->dtype);
    ChunkRead r{n.entry, n.chunk, {}, {}};
    TRY(prepare(r, src.is_dsd() ? LocatedChunk{} : std::move(located[i])));
    add_runs(*r.chunk, n.target->local, n.target->base, esize, r.runs);
    add_read(std::move(r));
  }
  return ok();
}

Status StorageReader::add_range(const Entry& entry, const ChunkRecord& chunk, uint64_t from, uint64_t len,
                                char* dst) {
  ChunkRead r{&entry, &chunk, {}, {}};
  LocatedChunk located;
  if (!source_.is_dsd()) located = TRY(locate_dcp_chunk(source_, entry, chunk));
  TRY(prepare(r, std::move(located)));
  r.runs.push_back({from, len, dst});
  add_read(std::move(r));
  return ok();
}

Status StorageReader::prepare(ChunkRead& r, LocatedChunk located) {
  if (!source_.is_dsd()) {
    ChunkRecord raw = *r.chunk;
    raw.begin = located.begin;
    raw.end = located.end;
    r.chunk = keep(std::move(raw));
    r.memory = std::move(located.tensor);
  }
  if (!r.memory.defined()) TRY(open(r.chunk->file));
  return ok();
}

Status StorageReader::open(const std::string& name) {
  if (files_.count(name)) return ok();
  if (source_.files) {
    auto it = source_.files->find(name);
    if (it == source_.files->end()) {
      return make_error_at(Code::kCorrupt, name, "data file '{}' is not in the manifest", name);
    }
    files_.emplace(name, &it->second);
    return ok();
  }
  if (file_sizes_.empty()) {
    for (const FileRecord& r : source_.manifest.files) file_sizes_.emplace(r.name, r.size);
  }
  const auto known = file_sizes_.find(name);
  const uint64_t expected_size = known == file_sizes_.end() ? 0 : known->second;
  File f = TRY(open_for_read(join(dir_, name)));
  const uint64_t size = TRY(file_size(f));
  if (size < expected_size) {
    return make_error_at(Code::kCorrupt, name, "data file '{}' is truncated: {} bytes, {} expected",
                         name, size, expected_size);
  }
  files_.emplace(name, &owned_files_.emplace_back(std::move(f)));
  return ok();
}

void StorageReader::add_read(ChunkRead r) {
  if (r.runs.empty()) return;
  std::sort(r.runs.begin(), r.runs.end(), [](const Run& a, const Run& b) { return a.src < b.src; });
  reads_.push_back(std::move(r));
}

Status StorageReader::run(int threads, uint64_t& bytes_read) {
  std::vector<Unit> units;
  std::vector<char> checked(reads_.size(), 0);  // whole-chunk checksum done in its unit
  const uint64_t blocks_per_unit = std::max<uint64_t>(1, kUnitBytes / block_size_);
  for (size_t i = 0; i < reads_.size(); ++i) {
    const ChunkRead& r = reads_[i];
    if (r.memory.defined()) {
      units.push_back({i, 0, 1});
      continue;
    }
    const uint64_t first = r.runs.front().src / block_size_;
    const Run& last = r.runs.back();
    const uint64_t end = (last.src + last.len + block_size_ - 1) / block_size_;
    if (verify_ && end - first <= blocks_per_unit && reads_whole_chunk(r)) {
      units.push_back({i, first, end, true});
      checked[i] = 1;
      continue;
    }
    for (uint64_t b = first; b < end; b += blocks_per_unit) {
      units.push_back({i, b, std::min(end, b + blocks_per_unit)});
    }
  }
  std::atomic<uint64_t> total{0};
  Status s = parallel_for(units.size(), threads, [&](size_t i) -> Status {
    thread_local std::unique_ptr<char[]> bounce;
    if (!bounce) bounce.reset(new char[kStepBytes]);
    uint64_t n = 0;
    const ChunkRead& r = reads_[units[i].read];
    Status st = read_unit(r, units[i], bounce.get(), n);
    total += n;
    if (!st.ok()) return with_key(std::move(st).error(), r.entry->key);
    return st;
  });
  bytes_read += total;
  if (s.ok() && verify_) s = check_whole_chunks(threads, checked);
  return s;
}

bool StorageReader::reads_whole_chunk(const ChunkRead& r) {
  uint64_t pos = 0;
  for (const Run& run : r.runs) {
    if (run.src != pos) return false;
    pos += run.len;
  }
  return pos == r.chunk->nbytes();
}

Status StorageReader::check_whole_chunks(int threads, const std::vector<char>& checked) const {
  return parallel_for(reads_.size(), threads, [&](size_t i) -> Status {
    const ChunkRead& r = reads_[i];
    if (r.memory.defined() || checked[i]) return ok();
    // Part of the chunk only: its blocks were checked.
    if (!reads_whole_chunk(r)) return ok();
    XXH3_state_t state;
    XXH3_64bits_reset(&state);
    for (const Run& run : r.runs) XXH3_64bits_update(&state, run.dst, run.len);
    if (XXH3_64bits_digest(&state) != r.chunk->xxh3) return whole_checksum_error(*r.entry, *r.chunk);
    return ok();
  });
}

// Reads the blocks of a unit that hold needed bytes, in steps small enough that each is
// hashed while it is still in the core's cache: a step inside one run is read straight
// into the destination, any other through the bounce buffer, whose needed parts are then
// copied out. A whole block is always read (and verified), even when only part is needed.
Status StorageReader::read_unit(const ChunkRead& r, const Unit& u, char* bounce, uint64_t& bytes) const {
  if (r.memory.defined()) {
    const char* src = static_cast<const char*>(r.memory.const_data_ptr());
    for (const Run& run : r.runs) std::memcpy(run.dst, src + run.src, run.len);
    return ok();
  }
  const File& f = *files_.at(r.chunk->file);
  const uint64_t chunk_len = r.chunk->nbytes();
  auto run_it = std::upper_bound(r.runs.begin(), r.runs.end(), u.first_block * block_size_,
                                 [](uint64_t v, const Run& run) { return v < run.src + run.len; });
  XXH3_state_t state;
  XXH3_state_t whole;
  if (u.whole) XXH3_64bits_reset(&whole);
  for (uint64_t b = u.first_block; b < u.end_block; ++b) {
    const uint64_t bstart = b * block_size_;
    const uint64_t bend = std::min(bstart + block_size_, chunk_len);
    while (run_it != r.runs.end() && run_it->src + run_it->len <= bstart) ++run_it;
    if (run_it == r.runs.end()) break;
    if (run_it->src >= bend) continue;  // no byte of this block is needed
    if (verify_) XXH3_64bits_reset(&state);
    auto it = run_it;
    for (uint64_t ps = bstart; ps < bend; ps += kStepBytes) {
      const uint64_t pe = std::min(ps + kStepBytes, bend);
      while (it != r.runs.end() && it->src + it->len <= ps) ++it;
      const char* data;
      if (it != r.runs.end() && it->src <= ps && it->src + it->len >= pe) {
        char* dst = it->dst + (ps - it->src);
        TRY(pread_all(f, dst, pe - ps, r.chunk->begin + ps));
        data = dst;
      } else {
        TRY(pread_all(f, bounce, pe - ps, r.chunk->begin + ps));
        for (auto k = it; k != r.runs.end() && k->src < pe; ++k) {
          const uint64_t from = std::max(k->src, ps);
          const uint64_t to = std::min(k->src + k->len, pe);
          std::memcpy(k->dst + (from - k->src), bounce + (from - ps), to - from);
        }
        data = bounce;
      }
      if (verify_) XXH3_64bits_update(&state, data, pe - ps);
      if (u.whole) XXH3_64bits_update(&whole, data, pe - ps);
      bytes += pe - ps;
    }
    if (verify_ && (b >= r.chunk->blocks.size() || XXH3_64bits_digest(&state) != r.chunk->blocks[b])) {
      return checksum_error(*r.entry, *r.chunk, bstart, bend);
    }
  }
  if (u.whole && XXH3_64bits_digest(&whole) != r.chunk->xxh3) return whole_checksum_error(*r.entry, *r.chunk);
  return ok();
}


}  // namespace dsd::checkpoint
