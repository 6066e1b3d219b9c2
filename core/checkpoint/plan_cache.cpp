#include "core/checkpoint/plan_cache.h"

#include <xxhash.h>

#include <nlohmann/json.hpp>

#include <utility>

#include "core/base/make_error.h"
#include "core/base/strings.h"

namespace dsd::checkpoint {
namespace {

// Little-endian fixed-width integers and length-prefixed strings: a serialisation with one
// reading, so equal bytes mean equal fields.
class ByteWriter {
 public:
  void u8(uint8_t v) { out_.push_back(static_cast<char>(v)); }
  void u64(uint64_t v) {
    for (int i = 0; i < 8; ++i) out_.push_back(static_cast<char>(v >> (8 * i)));
  }
  void i64(int64_t v) { u64(static_cast<uint64_t>(v)); }
  void str(std::string_view s) {
    u64(s.size());
    out_.append(s);
  }
  void dims(const std::vector<int64_t>& d) {
    u64(d.size());
    for (int64_t x : d) i64(x);
  }
  void path(const Path& p) {
    u64(p.size());
    for (const PathSegment& seg : p) {
      if (const std::string* k = seg.if_key()) {
        u8(0);
        str(*k);
      } else {
        u8(1);
        i64(*seg.if_index());
      }
    }
  }
  void fingerprint(const PlanFingerprint& f) {
    u64(f.low);
    u64(f.high);
  }
  std::string& bytes() { return out_; }

 private:
  std::string out_;
};

class ByteReader {
 public:
  explicit ByteReader(std::string_view in) : in_(in) {}
  bool u64(uint64_t& v) {
    if (in_.size() < 8) return false;
    v = 0;
    for (int i = 0; i < 8; ++i) v |= static_cast<uint64_t>(static_cast<unsigned char>(in_[i])) << (8 * i);
    in_.remove_prefix(8);
    return true;
  }
  bool str(std::string& s) {
    uint64_t n = 0;
    if (!u64(n) || n > in_.size()) return false;
    s.assign(in_.substr(0, n));
    in_.remove_prefix(n);
    return true;
  }
  bool fingerprint(PlanFingerprint& f) { return u64(f.low) && u64(f.high); }
  bool done() const { return in_.empty(); }
  size_t left() const { return in_.size(); }

 private:
  std::string_view in_;
};

PlanFingerprint hash128(std::string_view bytes) {
  const XXH128_hash_t h = XXH3_128bits(bytes.data(), bytes.size());
  return {h.low64, h.high64};
}

// Bumped whenever the serialisation or the planner's inputs change, so no fingerprint of one
// layout can equal one of another.
constexpr std::string_view kFingerprintTag = "dsd.save_plan.v1";

std::vector<PlanFingerprint> fingerprints_of(const std::vector<PlanSummary>& summaries) {
  std::vector<PlanFingerprint> out;
  out.reserve(summaries.size());
  for (const PlanSummary& s : summaries) out.push_back(s.fingerprint);
  return out;
}

PlanFingerprint digest(const std::vector<PlanFingerprint>& fps) {
  ByteWriter w;
  for (const PlanFingerprint& f : fps) w.fingerprint(f);
  return hash128(w.bytes());
}

// A plan without its rank plans: what a save gets as its own copy of a cached plan.
GlobalPlan without_ranks(const GlobalPlan& plan) {
  GlobalPlan g;
  g.save_id = plan.save_id;
  g.first_file_index = plan.first_file_index;
  g.manifest = plan.manifest;
  g.value_sources = plan.value_sources;
  return g;
}

}  // namespace

PlanFingerprint plan_fingerprint(const LocalPlan& plan, int64_t world_size, const SaveOptions& options) {
  ByteWriter w;
  w.str(kFingerprintTag);
  w.i64(world_size);
  w.i64(plan.rank);
  // PlanOptions, and what the writers derive the files from.
  w.i64(options.thread_count);
  w.u8(options.save_to_lowest_rank ? 1 : 0);
  w.i64(static_cast<int64_t>(options.format));
  w.u64(options.block_size);
  w.u8(plan.mesh_shape ? 1 : 0);
  if (plan.mesh_shape) w.dims(*plan.mesh_shape);
  w.u64(plan.int_key_dicts.size());
  for (const Path& p : plan.int_key_dicts) w.path(p);
  w.u64(plan.items.size());
  for (const WriteItem& it : plan.items) {
    w.u8(it.kind == Entry::Kind::kValue ? 1 : 0);
    w.str(it.key);
    w.path(it.path);
    if (it.kind == Entry::Kind::kValue) continue;  // its value is refreshed, not fingerprinted
    w.i64(static_cast<int64_t>(it.dtype));
    w.dims(it.global_shape);
    w.dims(it.offsets);
    w.dims(it.sizes);
  }
  return hash128(w.bytes());
}

PlanSummary summarize_plan(const LocalPlan& local, int64_t world_size, const SaveOptions& options,
                           PlanFingerprint cache_state) {
  PlanSummary s;
  s.fingerprint = plan_fingerprint(local, world_size, options);
  s.cache_state = cache_state;
  s.save_id = local.save_id;
  s.first_file_index = local.first_file_index;
  for (const WriteItem& it : local.items) {
    if (it.kind == Entry::Kind::kValue) s.values.push_back(it.value_json);
  }
  return s;
}

std::string encode_plan_summary(const PlanSummary& s) {
  ByteWriter w;
  w.fingerprint(s.fingerprint);
  w.fingerprint(s.cache_state);
  w.str(s.save_id);
  w.i64(s.first_file_index);
  w.u64(s.values.size());
  for (const std::string& v : s.values) w.str(v);
  return std::move(w.bytes());
}

Result<PlanSummary> decode_plan_summary(std::string_view bytes) {
  // Produced by encode_plan_summary on a peer; a malformed summary is a transport bug.
  auto broken = [] { return make_error(Code::kComm, "a peer sent a malformed save plan summary"); };
  ByteReader r(bytes);
  PlanSummary s;
  uint64_t first = 0, n = 0;
  if (!r.fingerprint(s.fingerprint) || !r.fingerprint(s.cache_state) || !r.str(s.save_id) || !r.u64(first) ||
      !r.u64(n) || n > r.left() / 8) {
    return broken();
  }
  s.first_file_index = static_cast<int64_t>(first);
  s.values.resize(n);
  for (std::string& v : s.values) {
    if (!r.str(v)) return broken();
  }
  if (!r.done()) return broken();
  return s;
}

PlanFingerprint PlanCache::state() const {
  std::lock_guard<std::mutex> lock(mu_);
  ByteWriter w;
  for (const Cached& c : entries_) w.fingerprint(c.id);
  return hash128(w.bytes());
}

Result<std::optional<PlanLease>> PlanCache::reuse(const std::vector<PlanSummary>& summaries, int64_t rank) {
  if (summaries.empty()) return std::nullopt;
  for (const PlanSummary& s : summaries) {
    // Ranks whose caches differ might not find the same plan: all plan afresh instead.
    if (s.cache_state != summaries.front().cache_state) return std::nullopt;
  }
  const std::vector<PlanFingerprint> fps = fingerprints_of(summaries);
  PlanLease lease;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = entries_.begin();
    while (it != entries_.end() && it->fingerprints != fps) ++it;
    if (it == entries_.end() || it->lent) return std::nullopt;
    entries_.splice(entries_.begin(), entries_, it);
    lease.plan_ = without_ranks(it->plan);  // the cached manifest stays as planned
    lease.plan_.ranks = std::move(it->plan.ranks);
    it->plan.ranks.clear();
    it->lent = true;
    lease.cache_ = this;
    lease.serial_ = it->serial;
  }
  GlobalPlan& g = lease.plan_;
  const PlanSummary& coordinator = summaries.front();
  if (!parse_hex64(coordinator.save_id)) return make_error(Code::kInternal, "the coordinator sent no save id");
  set_save_id(g, coordinator.save_id);
  g.first_file_index = coordinator.first_file_index;
  for (const ValueSource& vs : g.value_sources) {
    if (vs.entry >= g.manifest.entries.size() || vs.rank >= summaries.size()) {
      return make_error(Code::kInternal, "a cached save plan on rank {} is inconsistent", rank);
    }
    Entry& e = g.manifest.entries[vs.entry];
    const std::vector<std::string>& values = summaries[vs.rank].values;
    if (vs.ordinal >= values.size()) {
      return make_error_at(Code::kInternal, e.key,
                           "rank {} sent {} values, but the cached save plan takes '{}' from its value {}",
                           vs.rank, values.size(), e.key, vs.ordinal);
    }
    nlohmann::json v = nlohmann::json::parse(values[vs.ordinal], nullptr, false);
    if (v.is_discarded()) {
      return make_error_at(Code::kComm, e.key, "rank {} sent a malformed value for '{}'", vs.rank, e.key);
    }
    e.value = std::move(v);
  }
  return std::optional<PlanLease>(std::move(lease));
}

PlanLease PlanCache::insert(const std::vector<PlanSummary>& summaries, GlobalPlan plan, int64_t rank) {
  if (rank != 0) {
    for (size_t r = 0; r < plan.ranks.size(); ++r) {
      if (r != static_cast<size_t>(rank)) plan.ranks[r] = RankPlan();
    }
  }
  std::vector<PlanFingerprint> fps = fingerprints_of(summaries);
  Cached c{std::move(fps), {}, 0, without_ranks(plan), true};
  c.id = digest(c.fingerprints);
  PlanLease lease;
  lease.plan_ = std::move(plan);
  lease.cache_ = this;
  std::lock_guard<std::mutex> lock(mu_);
  c.serial = lease.serial_ = next_serial_++;
  entries_.remove_if([&](const Cached& e) { return e.fingerprints == c.fingerprints; });
  entries_.push_front(std::move(c));
  while (entries_.size() > kCapacity) entries_.pop_back();
  return lease;
}

void PlanCache::give_back(uint64_t serial, std::vector<RankPlan>& ranks) {
  std::vector<RankPlan> dropped;
  std::lock_guard<std::mutex> lock(mu_);
  for (Cached& c : entries_) {
    if (c.serial == serial && c.lent) {
      c.plan.ranks = std::move(ranks);
      c.lent = false;
      return;
    }
  }
  dropped = std::move(ranks);  // freed after the lock is released
}

PlanLease::~PlanLease() { give_back(); }

PlanLease::PlanLease(PlanLease&& o) noexcept
    : cache_(std::exchange(o.cache_, nullptr)), serial_(o.serial_), plan_(std::move(o.plan_)) {}

PlanLease& PlanLease::operator=(PlanLease&& o) noexcept {
  if (this != &o) {
    give_back();
    cache_ = std::exchange(o.cache_, nullptr);
    serial_ = o.serial_;
    plan_ = std::move(o.plan_);
  }
  return *this;
}

void PlanLease::give_back() {
  if (cache_ == nullptr) return;
  std::exchange(cache_, nullptr)->give_back(serial_, plan_.ranks);
}

PlanCache& plan_cache(Communicator& comm) {
  static const char kKey = 0;  // its address names the attachment
  return static_cast<PlanCache&>(comm.attachment(&kKey, [] { return std::make_unique<PlanCache>(); }));
}

}  // namespace dsd::checkpoint
