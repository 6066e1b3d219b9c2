// The cooperative load's plan (core/checkpoint/cooperative_load.h): who reads which shared
// chunk, in which buckets. The collective side is tested over Gloo by
// tests/checkpoint/test_cooperative_load.py.
#include <gtest/gtest.h>

#include <algorithm>
#include <map>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "core/checkpoint/cooperative_load.h"

namespace dsd::checkpoint {
namespace {

// An in-memory manifest: one entry per element of `rows`, float32 [rows, 256] (1 KiB a row),
// each cut into `chunks_per_entry` chunks along dim 0.
Manifest manifest(const std::vector<int64_t>& rows, int chunks_per_entry, uint64_t block_size) {
  Manifest m;
  m.block_size = block_size;
  uint64_t pos = 0;
  for (size_t i = 0; i < rows.size(); ++i) {
    Entry e;
    e.key = "t" + std::to_string(i);
    e.dtype = DType::kFloat32;
    e.shape = {rows[i], 256};
    for (int c = 0; c < chunks_per_entry; ++c) {
      const int64_t lo = rows[i] * c / chunks_per_entry;
      const int64_t hi = rows[i] * (c + 1) / chunks_per_entry;
      ChunkRecord r;
      r.offsets = {lo, 0};
      r.sizes = {hi - lo, 256};
      r.file = "f";
      r.begin = pos;
      r.end = pos + static_cast<uint64_t>(hi - lo) * 1024;
      pos = r.end;
      e.chunks.push_back(r);
    }
    m.entries.push_back(e);
  }
  Entry v;
  v.key = "step";
  v.kind = Entry::Kind::kValue;
  m.entries.push_back(v);
  return m;
}

// Checks what every plan must satisfy and returns the bytes each chunk got, by (entry, chunk).
std::map<std::pair<uint32_t, uint32_t>, uint64_t> check_plan(const Manifest& m, const CooperativePlan& cp, int world,
                                                             uint64_t cap) {
  std::map<std::pair<uint32_t, uint32_t>, uint64_t> covered;
  std::vector<uint64_t> per_rank(static_cast<size_t>(world), 0);
  for (const auto& round : cp.rounds) {
    EXPECT_FALSE(round.empty());
    int last = -1;
    for (const CooperativeBucket& b : round) {
      EXPECT_GT(b.root, last) << "one bucket per rank and round, in rank order";
      last = b.root;
      EXPECT_LE(b.bytes, std::max(cap, m.block_size));
      EXPECT_LE(b.bytes, cp.max_bucket_bytes);
      uint64_t at = 0;
      for (const CooperativePiece& p : b.pieces) {
        EXPECT_TRUE(cp.shared[p.entry]);
        EXPECT_EQ(p.at, at) << "pieces are packed";
        at += p.len;
        const ChunkRecord& c = m.entries[p.entry].chunks[p.chunk];
        uint64_t& done = covered[std::make_pair(p.entry, p.chunk)];
        EXPECT_EQ(p.from, done) << "a chunk's pieces come in order, without gaps";
        if (p.from + p.len < c.nbytes()) {
          EXPECT_EQ((p.from + p.len) % m.block_size, 0u) << "pieces end on blocks";
        }
        done += p.len;
        per_rank[static_cast<size_t>(b.root)] += p.len;
      }
      EXPECT_EQ(at, b.bytes);
    }
  }
  EXPECT_EQ(per_rank, cp.bytes_per_rank);
  return covered;
}

TEST(CooperativePlan, EverySharedChunkIsReadOnceInBoundedBlockAlignedBuckets) {
  // Sizes from 1 KiB to 3 MiB; 3 chunks each.
  const std::vector<int64_t> rows = {1, 3, 2000, 64, 3072, 7, 900, 1500, 30, 12, 2048, 5};
  const Manifest m = manifest(rows, 3, 4096);
  std::vector<char> shared(m.entries.size(), 1);
  shared[2] = 0;  // not loaded whole by every rank
  const uint64_t cap = 256u << 10;
  const CooperativePlan cp = plan_cooperative_reads(m, shared, 4, cap);
  const auto covered = check_plan(m, cp, 4, cap);
  for (size_t e = 0; e < m.entries.size(); ++e) {
    for (size_t c = 0; c < m.entries[e].chunks.size(); ++c) {
      const auto it = covered.find({static_cast<uint32_t>(e), static_cast<uint32_t>(c)});
      if (m.entries[e].chunks[c].nbytes() == 0) {
        EXPECT_EQ(it, covered.end()) << "an empty chunk is read by nobody";
      } else if (e == 2) {
        EXPECT_EQ(it, covered.end()) << "a chunk not shared is read by each rank that needs it";
      } else {
        ASSERT_NE(it, covered.end()) << m.entries[e].key;
        EXPECT_EQ(it->second, m.entries[e].chunks[c].nbytes()) << m.entries[e].key;
      }
    }
  }
  // Byte-balanced: the spread is at most the largest chunk.
  uint64_t largest = 0;
  for (const Entry& e : m.entries) {
    for (const ChunkRecord& c : e.chunks) largest = std::max(largest, c.nbytes());
  }
  const auto [lo, hi] = std::minmax_element(cp.bytes_per_rank.begin(), cp.bytes_per_rank.end());
  EXPECT_LE(*hi - *lo, largest);
  EXPECT_GT(*lo, 0u);
}

TEST(CooperativePlan, IsTheSameOnEveryRankAndForEveryCall) {
  const Manifest m = manifest({100, 200, 300, 400, 500, 600, 700}, 2, 4096);
  const std::vector<char> shared(m.entries.size(), 1);
  const CooperativePlan a = plan_cooperative_reads(m, shared, 3, 64u << 10);
  const CooperativePlan b = plan_cooperative_reads(m, shared, 3, 64u << 10);
  ASSERT_EQ(a.rounds.size(), b.rounds.size());
  for (size_t k = 0; k < a.rounds.size(); ++k) {
    ASSERT_EQ(a.rounds[k].size(), b.rounds[k].size());
    for (size_t i = 0; i < a.rounds[k].size(); ++i) {
      EXPECT_EQ(a.rounds[k][i].root, b.rounds[k][i].root);
      EXPECT_EQ(a.rounds[k][i].bytes, b.rounds[k][i].bytes);
      EXPECT_EQ(a.rounds[k][i].pieces.size(), b.rounds[k][i].pieces.size());
    }
  }
  EXPECT_EQ(a.max_bucket_bytes, b.max_bucket_bytes);
}

TEST(CooperativePlan, PacksSmallChunksAndGivesBigOnesBucketsOfTheirOwn) {
  // 100 chunks of 1 KiB and one of 1 MiB at world 2, 4 MiB buckets.
  std::vector<int64_t> rows(100, 1);
  rows.push_back(1024);
  const Manifest m = manifest(rows, 1, 4096);
  const CooperativePlan cp = plan_cooperative_reads(m, std::vector<char>(m.entries.size(), 1), 2, 4u << 20);
  check_plan(m, cp, 2, 4u << 20);
  std::map<int, int> buckets;
  for (const auto& round : cp.rounds) {
    for (const CooperativeBucket& b : round) {
      ++buckets[b.root];
      const bool big = std::any_of(b.pieces.begin(), b.pieces.end(), [](const CooperativePiece& p) { return p.len >= kOwnBucketBytes; });
      if (big) {
        EXPECT_EQ(b.pieces.size(), 1u) << "a chunk of 1 MiB travels alone (straight into its destination)";
      }
    }
  }
  // The 1 MiB chunk on one rank, the 100 small ones balanced against it: all on the other
  // rank, in one packed bucket.
  EXPECT_EQ(cp.rounds.size(), 1u);
  EXPECT_EQ(buckets.size(), 2u);
}

TEST(CooperativePlan, NothingSharedMeansNoRounds) {
  const Manifest m = manifest({10, 20}, 2, 4096);
  const CooperativePlan cp = plan_cooperative_reads(m, std::vector<char>(m.entries.size(), 0), 4, 1u << 20);
  EXPECT_TRUE(cp.rounds.empty());
  EXPECT_EQ(cp.max_bucket_bytes, 0u);
}

TEST(CooperativePlan, BucketsSmallerThanABlockHoldOneBlock) {
  const Manifest m = manifest({64}, 1, 16384);  // one 64 KiB chunk, 16 KiB blocks
  const CooperativePlan cp = plan_cooperative_reads(m, std::vector<char>(m.entries.size(), 1), 2, 1000);
  check_plan(m, cp, 2, 1000);
  EXPECT_EQ(cp.rounds.size(), 4u);
  EXPECT_EQ(cp.max_bucket_bytes, 16384u);
}

}  // namespace
}  // namespace dsd::checkpoint
