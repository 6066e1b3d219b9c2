#include "core/checkpoint/verify.h"

#include <fmt/format.h>

#include <mutex>
#include <optional>
#include <vector>

#include "core/base/make_error.h"
#include "core/checkpoint/chunk_hash.h"
#include "core/checkpoint/dcp_files.h"
#include "core/checkpoint/io.h"
#include "core/checkpoint/load_planner.h"
#include "core/checkpoint/pool.h"
#include "core/checkpoint/source.h"
#include "core/formats/zip_check.h"

namespace dsd::checkpoint {
namespace {

// Whether the chunks of a tensor tile it: every element saved exactly once.
std::optional<std::string> coverage_problem(const Entry& e) {
  int64_t covered = 0;
  for (size_t i = 0; i < e.chunks.size(); ++i) {
    const Chunk a{e.chunks[i].offsets, e.chunks[i].sizes};
    covered += a.numel();
    if (a.numel() == 0) continue;
    for (size_t k = i + 1; k < e.chunks.size(); ++k) {
      if (Chunk{e.chunks[k].offsets, e.chunks[k].sizes}.numel() != 0 && chunks_intersect(e.chunks[k], a)) {
        return fmt::format("chunks {} and {} of '{}' overlap", a.str(),
                           Chunk{e.chunks[k].offsets, e.chunks[k].sizes}.str(), e.key);
      }
    }
  }
  const int64_t numel = Chunk{std::vector<int64_t>(e.shape.size(), 0), e.shape}.numel();
  if (covered != numel) return fmt::format("the chunks of '{}' cover {} of its {} elements", e.key, covered, numel);
  return std::nullopt;
}

// The CRC-32 of every record of one DCP item (a torch.save archive inside a `.distcp` file).
template <class Report>
void check_item_crcs(const std::string& path, const std::string& file, uint64_t offset, uint64_t length,
                     const Entry& e, const std::string& what, Report&& report) {
  auto records = check_zip(path, offset, length);
  if (!records.ok()) {
    report(file, e, fmt::format("{}: {}", what, records.error().message));
    return;
  }
  for (const ZipRecordCheck& r : *records) {
    if (!r.crc_ok) {
      report(file, e, fmt::format("CRC-32 mismatch in record '{}' of {} in data file '{}' (bytes [{}, {}))", r.name,
                                  what, file, offset + r.offset, offset + r.offset + r.size));
    }
  }
}

// A DCP checkpoint has no checksums of its own beyond the zip CRC-32s of its items: every
// chunk must be located inside its archive and match the metadata, every record's CRC-32
// must match its bytes, every value must parse, and the chunks of each tensor must tile it.
Result<std::vector<VerifyProblem>> verify_dcp(const Source& src, int thread_count,
                                              const std::function<void(uint64_t, uint64_t)>& progress) {
  uint64_t total = 0;
  uint64_t done = 0;
  for (const Entry& e : src.manifest.entries) {
    for (const ChunkRecord& c : e.chunks) total += c.nbytes();
  }
  std::vector<std::pair<const Entry*, const ChunkRecord*>> items;
  std::mutex mu;
  std::vector<VerifyProblem> problems;
  auto report = [&](std::string file, const Entry& e, std::string msg) {
    std::lock_guard<std::mutex> lock(mu);
    problems.push_back({std::move(file), e.key, std::move(msg)});
  };
  auto is_transformed = [&](const std::string& file, int64_t offset) {
    return src.dcp->transformed.count({file, offset}) != 0;
  };
  for (const Entry& e : src.manifest.entries) {
    if (e.kind == Entry::Kind::kValue) {
      items.emplace_back(&e, nullptr);
      continue;
    }
    if (auto p = coverage_problem(e)) report(e.chunks.empty() ? std::string(kDcpMetadataName) : e.chunks[0].file, e, *p);
    for (const ChunkRecord& c : e.chunks) items.emplace_back(&e, &c);
  }
  TRY(parallel_for(items.size(), default_threads(thread_count, 8), [&](size_t i) -> Status {
    const auto [e, c] = items[i];
    if (c != nullptr && progress) {
      std::lock_guard<std::mutex> lock(mu);
      done += c->nbytes();
      progress(done, total);
    }
    if (c == nullptr) {
      const dcp::StorageInfo& info = src.dcp->values.at(e->key);
      auto v = read_source_value(src, *e);
      if (!v.ok()) {
        report(info.relative_path, *e, v.error().message);
      } else if (!is_transformed(info.relative_path, info.offset)) {
        check_item_crcs(join(src.dir, info.relative_path), info.relative_path, static_cast<uint64_t>(info.offset),
                        static_cast<uint64_t>(info.length), *e, fmt::format("value '{}'", e->key), report);
      }
      return ok();
    }
    auto located = locate_dcp_chunk(src, *e, *c);
    if (!located.ok()) {
      report(c->file, *e, located.error().message);
      return ok();
    }
    // A compressed item's archive exists only decompressed: reading it (zstd frame, then the
    // CRC-32 of every record, dcp_chunks.cpp) was the check.
    if (is_transformed(c->file, static_cast<int64_t>(c->begin))) return ok();
    check_item_crcs(join(src.dir, c->file), c->file, c->begin, c->nbytes(), *e,
                    fmt::format("chunk {} of '{}'", Chunk{c->offsets, c->sizes}.str(), e->key), report);
    return ok();
  }));
  return problems;
}

}  // namespace

Result<std::vector<VerifyProblem>> verify(const std::string& path, int thread_count,
                                          const std::function<void(uint64_t, uint64_t)>& progress,
                                          const OpenOptions& options) {
  const Source src = TRY(open_source(path, options));
  if (!src.is_dsd()) return verify_dcp(src, thread_count, progress);
  const Manifest& m = src.manifest;
  uint64_t total = 0;
  uint64_t done = 0;
  for (const Entry& e : m.entries) {
    for (const ChunkRecord& c : e.chunks) total += c.nbytes();
  }
  std::vector<std::pair<const Entry*, const ChunkRecord*>> chunks;
  for (const Entry& e : m.entries) {
    for (const ChunkRecord& c : e.chunks) chunks.emplace_back(&e, &c);
  }
  std::mutex mu;
  std::vector<VerifyProblem> problems;
  auto report = [&](const Entry& e, const ChunkRecord& c, std::string msg) {
    std::lock_guard<std::mutex> lock(mu);
    problems.push_back({c.file, e.key, std::move(msg)});
  };
  TRY(parallel_for(chunks.size(), default_threads(thread_count, 8), [&](size_t i) -> Status {
    const auto [e, c] = chunks[i];
    const File* f = &src.files->at(c->file);  // opened and checked by open_source
    std::vector<char> buf(static_cast<size_t>(std::min<uint64_t>(m.block_size, std::max<uint64_t>(c->nbytes(), 1))));
    ChunkHasher hasher(m.block_size);
    for (uint64_t off = 0; off < c->nbytes(); off += m.block_size) {
      const uint64_t len = std::min(m.block_size, c->nbytes() - off);
      Status s = pread_all(*f, buf.data(), len, c->begin + off);
      if (!s.ok()) {
        report(*e, *c, s.error().message);
        return ok();
      }
      hasher.feed(buf.data(), len);
    }
    const uint64_t whole = hasher.finish();
    if (progress) {
      std::lock_guard<std::mutex> lock(mu);
      done += c->nbytes();
      progress(done, total);
    }
    if (whole != c->xxh3 || hasher.blocks() != c->blocks) {
      uint64_t bad_block = 0;
      while (bad_block < c->blocks.size() && hasher.blocks()[bad_block] == c->blocks[bad_block]) ++bad_block;
      report(*e, *c, fmt::format("checksum mismatch in data file '{}' for key '{}' (block {} of chunk {})",
                                 c->file, e->key, bad_block, Chunk{c->offsets, c->sizes}.str()));
    }
    return ok();
  }));
  return problems;
}

}  // namespace dsd::checkpoint
