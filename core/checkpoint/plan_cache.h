// Save-plan caching, as DCP's DefaultSavePlanner(enable_plan_caching=True): a save whose
// every rank's local plan has the structure of an earlier save's over the same communicator
// reuses that save's global plan. The ranks then exchange a fingerprint and their non-tensor
// values instead of every local plan, and no rank runs the global planner (at thousands of
// ranks the gather and the planning are most of a save's fixed cost).
//
// The structure fingerprint of a local plan is XXH3-128 over a canonical serialisation of
// everything the global plan is a function of, except what changes every save and is
// refreshed when the plan is reused:
//   covered    world size, rank, the options that shape the plan or its files
//              (thread_count = data files per rank, save_to_lowest_rank, format,
//              block_size), mesh shape, int-keyed dict paths, and per item, in order: kind,
//              key, path; tensors also dtype, global shape, chunk offsets and sizes
//   refreshed  the save id (and with it every data file name), the coordinator's first data
//              file index (DCP's file numbering), the value of every value entry (taken
//              from the rank the cached plan chose to write it)
//
// The decision is collective and made from gathered data only: every rank receives every
// rank's fingerprint and cache state, and the cached plan is reused only when every rank's
// cache holds the same plans and every fingerprint equals the cached plan's. A structure
// change on one rank therefore makes every rank plan again; a stale plan is never reused
// (Megatron-LM #4378: a plan reused after the state dict changed silently corrupted
// checkpoints).
//
// Where the cache lives: on the Communicator (an attachment, comm.h), so it persists across
// the saves over one communicator (sync saves, an AsyncCheckpointer's background clone, a
// CheckpointManager's saves) and is freed with it; a clone has its own. It holds the few most
// recently used plans (a model and an optimizer checkpoint saved alternately both hit).
// Memory: the coordinator keeps each cached plan whole (what one save's global plan costs
// while it runs); every other rank keeps only its own share and the manifest entries. A save
// borrows the cached rank plans (PlanLease) instead of copying them.
#pragma once

#include <cstdint>
#include <list>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "core/base/result.h"
#include "core/checkpoint/save.h"
#include "core/checkpoint/save_planner.h"
#include "core/dist/comm.h"

namespace dsd::checkpoint {

struct PlanFingerprint {
  uint64_t low = 0;
  uint64_t high = 0;
  bool operator==(const PlanFingerprint&) const = default;
};

// The structure fingerprint of `plan` (see above) in a save over `world_size` ranks with
// `options` (thread_count already resolved to the number of data files per rank).
PlanFingerprint plan_fingerprint(const LocalPlan& plan, int64_t world_size, const SaveOptions& options);

// What each rank sends when caching is on, in place of its local plan.
struct PlanSummary {
  PlanFingerprint fingerprint;
  PlanFingerprint cache_state;  // the sender's PlanCache::state()
  std::string save_id;          // the coordinator's (empty elsewhere)
  int64_t first_file_index = 0;  // the coordinator's
  std::vector<std::string> values;  // value JSON of the sender's value items, in plan order
};

// `local`'s summary: its fingerprint (computed here), values, save id and first file index.
PlanSummary summarize_plan(const LocalPlan& local, int64_t world_size, const SaveOptions& options,
                           PlanFingerprint cache_state);
// Summaries travel between ranks in a compact binary form; a malformed one is kComm.
std::string encode_plan_summary(const PlanSummary& summary);
Result<PlanSummary> decode_plan_summary(std::string_view bytes);

class PlanCache;

// A cached plan lent to one save. Its rank plans (the bulk of a plan: on the coordinator every
// chunk of every rank) are moved out of the cache rather than copied, since a copy costs a
// good part of what planning does, and go back when the lease ends: a save never changes
// them, and the file names it would see are rewritten by the next reuse. The rest (save id,
// manifest, value sources) is the save's own, which the writers fill in. A lease must end
// before the cache's communicator is destroyed (a save holds both).
class PlanLease {
 public:
  PlanLease() = default;
  ~PlanLease();
  PlanLease(PlanLease&& o) noexcept;
  PlanLease& operator=(PlanLease&& o) noexcept;
  PlanLease(const PlanLease&) = delete;
  PlanLease& operator=(const PlanLease&) = delete;

  GlobalPlan& plan() { return plan_; }

 private:
  friend class PlanCache;
  void give_back();

  PlanCache* cache_ = nullptr;
  uint64_t serial_ = 0;  // of the cache entry the rank plans belong to
  GlobalPlan plan_;
};

// The few most recently used global plans of one communicator's saves. Safe to share between
// threads (the C ABI's process-wide local communicator serves concurrent saves); a plan lent
// to one save is a miss for a concurrent one.
class PlanCache final : public CommAttachment {
 public:
  static constexpr size_t kCapacity = 4;

  // A digest of the plans held, in use order: equal on every rank exactly when the ranks
  // can decide alike from their caches.
  PlanFingerprint state() const;
  // The cached plan for every rank's `summaries` (in rank order), made this save's: the
  // coordinator's save id and first file index, data file names after that save id, and
  // each value from the rank that writes it. nullopt when the ranks' caches differ or no
  // plan has these fingerprints. Errors (kComm, kInternal) only for summaries that contradict
  // the fingerprints they carry.
  Result<std::optional<PlanLease>> reuse(const std::vector<PlanSummary>& summaries, int64_t rank);
  // Remembers `plan`, made from the local plans `summaries` describe, as the most recently
  // used (the least recently used one goes when the cache is full), and lends it to the save
  // that made it. On ranks other than the coordinator only this rank's share of the rank
  // plans is kept, and lent: no writer there reads another rank's.
  PlanLease insert(const std::vector<PlanSummary>& summaries, GlobalPlan plan, int64_t rank);

 private:
  friend class PlanLease;

  struct Cached {
    std::vector<PlanFingerprint> fingerprints;  // every rank's, in rank order
    PlanFingerprint id;                         // digest of `fingerprints`
    uint64_t serial = 0;                        // names this entry to its lease
    GlobalPlan plan;                            // its ranks are empty while lent
    bool lent = false;
  };

  // Takes the rank plans of entry `serial` back from its lease; dropped when the entry was
  // evicted or replaced meanwhile.
  void give_back(uint64_t serial, std::vector<RankPlan>& ranks);

  mutable std::mutex mu_;     // guards entries_ and next_serial_
  std::list<Cached> entries_;  // most recently used first
  uint64_t next_serial_ = 1;
};

// The plan cache of `comm`, made on first use.
PlanCache& plan_cache(Communicator& comm);

}  // namespace dsd::checkpoint
