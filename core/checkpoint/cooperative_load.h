// Cooperative load (the idea of PyTorch PR #193909 for DCP): a saved chunk that every rank
// needs is read from storage once, by one rank, verified there, and broadcast to the others,
// instead of being read world-size times. With a fully replicated state at world 4 the bytes
// read from storage drop from ~4x to ~1x the checkpoint's data bytes.
//
// When: by default only when the ranks run on more than one host (LoadOptions::cooperative):
// ranks of one host share its page cache, and there every rank reading is cheaper than a
// broadcast (world 4 on one host, 256 MiB replicated on tmpfs: 0.19 s vs 0.52 s over Gloo).
//
// Which chunks: every chunk of an entry that every rank of the communicator loads whole (a
// plain tensor, a DTensor replicated on every mesh dim). The ranks find these with one
// all_reduce(MIN) over fixed windows of flags, one per manifest entry (a second window only
// past ~4k entries); the same collective carries every rank's planning status (instead of the
// agree() a load did before), whether it asked for a cooperative load, and a fingerprint of
// its manifest, so the load costs no extra round trip when nothing is shared, and ranks that
// disagree on the option or on the checkpoint simply read alone.
//
// Who reads what: computed by every rank from the manifest and the shared flags alone (no
// round trip): the shared chunks go to the least loaded rank, largest first (byte-balanced,
// ties to the lowest rank); each rank's chunks, in manifest order, are cut into buckets of at
// most `bucket_bytes`: a chunk of 1 MiB or more gets buckets of its own (pieces aligned to the
// checksum blocks when it is larger than a bucket), smaller chunks are packed together.
//
// How: round k reads the k-th bucket of every rank (in parallel, each its own, checksums
// verified), agree()s on the reads (a failed read or verify fails every rank with the
// reader's error, naming file and key, before a byte is broadcast), then broadcasts the
// buckets in rank order. A bucket that is one piece of a chunk laid out contiguously in this
// rank's destination travels straight from and into the destination (Gloo); any other goes
// through a host staging buffer and then the chunk's byte runs (load_planner.h's add_runs),
// so non-contiguous, strided and GPU destinations take the copy path they take today. With a
// CUDA communicator (NCCL) every bucket goes through a device buffer. Memory: at most two
// staging buffers of one bucket (own and incoming), plus one device bucket for NCCL.
//
// Limits: chunks needed by a subset of the ranks only keep the ordinary path (every rank
// that needs them reads them): a broadcast over the one communicator every rank shares
// reaches every rank, and there are no subgroup communicators. So HSDP replica groups
// ([Replicate, Shard] on a 2-d mesh), a tensor replicated on a sub-mesh, or a reshard where
// each rank needs part of a saved chunk read as before. The reads of round k+1 do not
// overlap the broadcasts of round k.
#pragma once

#include <cstdint>
#include <vector>

#include "core/base/result.h"
#include "core/checkpoint/load.h"
#include "core/checkpoint/load_planner.h"
#include "core/checkpoint/manifest.h"
#include "core/checkpoint/source.h"
#include "core/dist/comm.h"

namespace dsd::checkpoint {

// Bytes [from, from + len) of the data of saved chunk `chunk` of entry `entry` (indices into
// the manifest), at byte `at` of its bucket.
struct CooperativePiece {
  uint32_t entry;
  uint32_t chunk;
  uint64_t from;
  uint64_t len;
  uint64_t at;
};

// What one rank (`root`) reads and broadcasts in one go.
struct CooperativeBucket {
  int root = 0;
  uint64_t bytes = 0;
  std::vector<CooperativePiece> pieces;
};

// The same on every rank for the same manifest and shared flags.
struct CooperativePlan {
  std::vector<char> shared;                            // per manifest entry: read cooperatively
  std::vector<std::vector<CooperativeBucket>> rounds;  // round k: every rank's k-th bucket, by rank
  std::vector<uint64_t> bytes_per_rank;                // what each rank reads for the others
  uint64_t max_bucket_bytes = 0;
};

// Chunks of at least this many bytes get buckets of their own (and may travel without staging).
inline constexpr uint64_t kOwnBucketBytes = 1u << 20;

// Collective (world > 1): the entries of `m` every rank loads whole, as flags per entry. `plan`
// is this rank's load plan, or null when `planned` (its planning status) failed; when any
// rank's planning failed, every rank returns that error (agree()). All flags are false when a
// rank passes kNever, when the ranks run on one host and not every rank passes kAlways
// (LoadOptions::cooperative; the host is told by its name and boot id, carried in the same
// collective), or when ranks opened different manifests. At world 1 it returns `planned`'s
// error or no flags.
Result<std::vector<char>> agree_shared_entries(Communicator& comm, const Manifest& m, const LoadPlan* plan,
                                               LoadOptions::Cooperative cooperative, Status planned);

// Who reads which shared chunk, in which buckets (no communication; see above).
// `bucket_bytes` is rounded down to whole checksum blocks (at least one block).
CooperativePlan plan_cooperative_reads(const Manifest& m, std::vector<char> shared, int world,
                                       uint64_t bucket_bytes);

// The ReadItems of `items` that the cooperative plan does not cover: what this rank reads
// itself.
std::vector<ReadItem> own_read_items(const Manifest& m, const CooperativePlan& cp, const std::vector<ReadItem>& items);

// Collective: carries out `cp` into this rank's destinations (`plan`'s targets). `prior` is
// this rank's status so far (its own reads), agreed with the first round's reads. Returns
// `prior` untouched when `cp` has no rounds, else the agreed status (the same error on every
// rank). Adds to report.bytes_read (this rank's storage reads) and report.bytes_received.
Status read_cooperatively(Communicator& comm, const Source& source, const CooperativePlan& cp, const LoadPlan& plan,
                          const LoadOptions& options, Status prior, LoadReport& report);

}  // namespace dsd::checkpoint
