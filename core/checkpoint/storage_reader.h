// The storage reader of both checkpoint formats, as DCP's FileSystemReader: carries out a
// load plan's ReadItems (load_planner.h). Each saved chunk's needed blocks are read in
// parallel work units, straight into the destination where a step lies inside one run, else
// through a bounce buffer; dsd chunks are verified block by block against their checksums
// on the way. A DCP chunk is first located inside its torch.save archive (source.h).
//
// Not thread-safe: one reader serves one load (its own threads inside run() aside).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <deque>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "core/base/result.h"
#include "core/checkpoint/io.h"
#include "core/checkpoint/load_planner.h"
#include "core/checkpoint/source.h"

namespace dsd::checkpoint {

class StorageReader {
 public:
  // `source` is borrowed and must outlive the reader. `verify`: check block checksums (dsd),
  // and the whole-chunk checksum of each chunk read in full.
  StorageReader(const Source& source, bool verify);

  // Adds the reads of `items` (in parallel for DCP chunks: each one opens its archive).
  Status add(const std::vector<ReadItem>& items, int threads);
  // Adds the read of bytes [from, from + len) of saved chunk `chunk`'s data into `dst`
  // (cooperative loads read chunks in pieces: cooperative_load.h). Whole blocks are read and
  // verified, so a piece that starts and ends on block boundaries reads nothing twice.
  Status add_range(const Entry& entry, const ChunkRecord& chunk, uint64_t from, uint64_t len, char* dst);
  // Reads everything added on up to `threads` threads; adds the bytes read to `bytes_read`.
  // kCorrupt naming file and key on a checksum mismatch or a truncated file.
  Status run(int threads, uint64_t& bytes_read);

 private:
  struct ChunkRead {
    const Entry* entry;
    const ChunkRecord* chunk;
    std::vector<Run> runs;  // sorted by src, disjoint
    // The whole saved chunk, already in memory (a DCP chunk that cannot be read raw): the runs
    // are copied from it instead of read from the file.
    at::Tensor memory;
  };
  // Blocks [first_block, end_block) of read `read`: what one thread reads in one go. `whole`:
  // the unit is all of a chunk read in full, so its whole-chunk checksum is computed in the
  // same pass as the block checksums, while each step is still in the core's cache.
  struct Unit {
    size_t read;
    uint64_t first_block;
    uint64_t end_block;
    bool whole = false;
  };

  // Opens (once) the file of a chunk and checks it is not shorter than the manifest says; a
  // dsd source's files are the descriptors it was validated with (source.h).
  Status open(const std::string& name);
  // Whether the runs of `r` cover every byte of its chunk.
  static bool reads_whole_chunk(const ChunkRead& r);
  // The whole-chunk checksum of every dsd chunk read in full (its runs cover all its bytes)
  // that no `whole` unit has checked already (`checked[i]`), over the bytes as they now lie
  // in their destinations.
  Status check_whole_chunks(int threads, const std::vector<char>& checked) const;
  void add_read(ChunkRead r);
  // The located raw range of a DCP chunk (kept), or `chunk` itself for dsd; opens its file.
  Status prepare(ChunkRead& r, LocatedChunk located);
  // Keeps a chunk record made during planning (a DCP chunk's located raw range) alive for
  // the reads that point at it.
  const ChunkRecord* keep(ChunkRecord r) { return &kept_.emplace_back(std::move(r)); }
  Status read_unit(const ChunkRead& r, const Unit& u, char* bounce, uint64_t& bytes) const;

  const Source& source_;
  std::string dir_;
  uint64_t block_size_;
  bool verify_;
  std::unordered_map<std::string, const File*> files_;
  std::unordered_map<std::string_view, uint64_t> file_sizes_;  // from the manifest, on first open
  std::deque<File> owned_files_;  // files this reader opened itself (DCP)
  std::vector<ChunkRead> reads_;
  std::deque<ChunkRecord> kept_;
};

}  // namespace dsd::checkpoint
