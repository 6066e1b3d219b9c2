#include "core/checkpoint/cooperative_load.h"

#include <unistd.h>

#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>

#include <algorithm>
#include <climits>
#include <cstdio>
#include <cstring>
#include <functional>
#include <numeric>
#include <queue>
#include <unordered_map>
#include <utility>

#include "core/base/make_error.h"
#include "core/base/torch_call.h"
#include "core/checkpoint/chunk_hash.h"
#include "core/checkpoint/pool.h"
#include "core/checkpoint/storage_reader.h"

namespace dsd::checkpoint {
namespace {

// int32 words per all_reduce of agree_shared_entries: the header, then one flag per entry.
constexpr int64_t kWindow = 4096;
constexpr int64_t kHeader = 11;

uint64_t data_bytes(const Entry& e, const ChunkRecord& c) {
  uint64_t n = element_size(e.dtype);
  for (int64_t s : c.sizes) n *= static_cast<uint64_t>(s);
  return n;
}

// What must be equal on every rank for the plans computed from `m` to agree: the entries'
// keys, dtypes, shapes and chunk counts, the block size and the save id.
uint64_t fingerprint(const Manifest& m) {
  XXH3_state_t st;
  XXH3_64bits_reset(&st);
  auto feed = [&](const void* p, size_t n) { XXH3_64bits_update(&st, p, n); };
  feed(m.save_id.data(), m.save_id.size());
  feed(&m.block_size, sizeof m.block_size);
  for (const Entry& e : m.entries) {
    feed(e.key.data(), e.key.size() + 1);  // with its NUL: "ab","c" differs from "a","bc"
    const int32_t head[3] = {static_cast<int32_t>(e.kind), static_cast<int32_t>(e.dtype),
                             static_cast<int32_t>(e.shape.size())};
    feed(head, sizeof head);
    feed(e.shape.data(), e.shape.size() * sizeof(int64_t));
    const uint64_t chunks = e.chunks.size();
    feed(&chunks, sizeof chunks);
  }
  return XXH3_64bits_digest(&st);
}

// This host, as 31 bits: a hash of its name and of the kernel's boot id (two containers with
// the same hostname on different machines differ; ranks of one machine agree).
int32_t host_id() {
  char name[256] = {};
  (void)::gethostname(name, sizeof name - 1);
  std::string id = name;
  if (FILE* f = std::fopen("/proc/sys/kernel/random/boot_id", "r")) {
    char boot[64] = {};
    if (std::fgets(boot, sizeof boot, f) != nullptr) id += boot;
    std::fclose(f);
  }
  return static_cast<int32_t>(XXH3_64bits(id.data(), id.size()) & 0x7fffffff);
}

// Whether `t` is all of `e`: the local chunk is the whole, non-empty tensor.
bool loads_whole(const LoadTarget& t, const Entry& e) {
  if (t.local.sizes != e.shape || t.local.numel() == 0) return false;
  return std::all_of(t.local.offsets.begin(), t.local.offsets.end(), [](int64_t o) { return o == 0; });
}

// all_reduce(MIN) of a CPU tensor, through the communicator's device when that is not the CPU
// (NCCL reduces device memory only).
Status all_reduce_min(Communicator& comm, at::Tensor& cpu) {
  if (comm.device_type() == c10::DeviceType::CPU) return comm.all_reduce(cpu, ReduceOp::kMin);
  at::Tensor dev = TRY(torch_call(Code::kDevice, "staging the cooperative load's flags on the device",
                                  [&] { return cpu.to(c10::Device(comm.device_type())); }));
  TRY(comm.all_reduce(dev, ReduceOp::kMin));
  return torch_call(Code::kDevice, "copying the cooperative load's flags off the device", [&] { cpu.copy_(dev); });
}

size_t entry_index(const Manifest& m, const Entry* e) { return static_cast<size_t>(e - m.entries.data()); }

// One rank's side of read_cooperatively.
class CooperativeReader {
 public:
  CooperativeReader(Communicator& comm, const Source& src, const CooperativePlan& cp, const LoadPlan& plan,
                    const LoadOptions& options, LoadReport& report)
      : comm_(comm), src_(src), m_(src.manifest), cp_(cp), options_(options), report_(report),
        targets_(m_.entries.size(), nullptr) {
    for (const ReadItem& it : plan.items) targets_[entry_index(m_, it.entry)] = it.target;
  }

  // Every shared entry has a destination here, and the staging buffers exist.
  Status prepare() {
    for (size_t i = 0; i < cp_.shared.size(); ++i) {
      if (cp_.shared[i] && targets_[i] == nullptr) {
        return make_error_at(Code::kInternal, m_.entries[i].key,
                             "cooperative load: '{}' is shared but this rank has no destination for it",
                             m_.entries[i].key);
      }
    }
    const auto n = static_cast<int64_t>(cp_.max_bucket_bytes);
    TRY(torch_call(Code::kOutOfMemory, "allocating the cooperative load's staging buffers", [&] {
      own_ = at::empty({n}, at::kByte);
      incoming_ = at::empty({n}, at::kByte);
      if (comm_.device_type() != c10::DeviceType::CPU) {
        wire_ = at::empty({n}, at::TensorOptions().dtype(at::kByte).device(comm_.device_type()));
      }
    }));
    return ok();
  }

  // Reads this rank's bucket from storage (verified) into where it is broadcast from.
  Status read(const CooperativeBucket& b) {
    StorageReader reader(src_, options_.verify);
    for (const CooperativePiece& p : b.pieces) {
      const Entry& e = m_.entries[p.entry];
      TRY(reader.add_range(e, e.chunks[p.chunk], p.from, p.len, memory(b, p, own_)));
    }
    return reader.run(default_threads(options_.thread_count, 8), report_.bytes_read);
  }

  // Broadcasts `b` from its root and puts it in place. Takes part in the broadcast whatever
  // `failed` holds, so every rank runs the same collectives; a failure is recorded there.
  void transfer(const CooperativeBucket& b, Status& failed) {
    const bool root = b.root == comm_.rank();
    const bool straight = direct(b);
    char* mem = straight ? memory(b, b.pieces[0], own_) : (root ? bytes(own_) : bytes(incoming_));
    at::Tensor host = at::from_blob(mem, {static_cast<int64_t>(b.bytes)}, at::kByte);
    Status s;
    if (wire_.defined()) {
      // NCCL: the bucket travels in device memory.
      at::Tensor dev = wire_.narrow(0, 0, static_cast<int64_t>(b.bytes));
      if (root) s = torch_call(Code::kDevice, "staging a cooperative bucket on the device", [&] { dev.copy_(host); });
      Status sent = comm_.broadcast(dev, b.root);
      if (s.ok()) s = std::move(sent);
      if (s.ok() && !root) {
        s = torch_call(Code::kDevice, "copying a cooperative bucket off the device", [&] { host.copy_(dev); });
      }
    } else {
      s = comm_.broadcast(host, b.root);
    }
    if (!root) report_.bytes_received += b.bytes;
    if (s.ok() && failed.ok() && !straight) {
      for (const CooperativePiece& p : b.pieces) scatter(p, mem + p.at);
    }
    for (const CooperativePiece& p : b.pieces) {
      const Entry& e = m_.entries[p.entry];
      if (p.from + p.len == data_bytes(e, e.chunks[p.chunk])) runs_.erase(&e.chunks[p.chunk]);
    }
    if (failed.ok() && !s.ok()) failed = std::move(s);
  }

 private:
  static char* bytes(at::Tensor& t) { return static_cast<char*>(t.data_ptr()); }

  // Where a saved chunk's bytes go in this rank's destination (sorted by src).
  const std::vector<Run>& runs(const CooperativePiece& p) {
    const Entry& e = m_.entries[p.entry];
    const ChunkRecord& c = e.chunks[p.chunk];
    auto it = runs_.find(&c);
    if (it != runs_.end()) return it->second;
    std::vector<Run> r;
    const LoadTarget& t = *targets_[p.entry];
    add_runs(c, t.local, t.base, element_size(e.dtype), r);
    std::sort(r.begin(), r.end(), [](const Run& a, const Run& b) { return a.src < b.src; });
    return runs_.emplace(&c, std::move(r)).first->second;
  }

  // Whether `b` is broadcast straight from and into this rank's destination: one piece of a
  // chunk that lands in one contiguous host run (Gloo; NCCL always stages on the device).
  bool direct(const CooperativeBucket& b) {
    if (wire_.defined() || b.pieces.size() != 1) return false;
    const CooperativePiece& p = b.pieces[0];
    const Entry& e = m_.entries[p.entry];
    const std::vector<Run>& r = runs(p);
    return r.size() == 1 && r[0].src == 0 && r[0].len == data_bytes(e, e.chunks[p.chunk]);
  }

  char* memory(const CooperativeBucket& b, const CooperativePiece& p, at::Tensor& stage) {
    if (direct(b)) return runs(p)[0].dst + p.from;
    return bytes(stage) + p.at;
  }

  // Copies a piece (bytes [from, from + len) of its chunk, at `src`) into its runs.
  void scatter(const CooperativePiece& p, const char* src) {
    const std::vector<Run>& r = runs(p);
    auto it = std::upper_bound(r.begin(), r.end(), p.from, [](uint64_t v, const Run& run) { return v < run.src + run.len; });
    for (; it != r.end() && it->src < p.from + p.len; ++it) {
      const uint64_t from = std::max(it->src, p.from);
      const uint64_t to = std::min(it->src + it->len, p.from + p.len);
      std::memcpy(it->dst + (from - it->src), src + (from - p.from), to - from);
    }
  }

  Communicator& comm_;
  const Source& src_;
  const Manifest& m_;
  const CooperativePlan& cp_;
  const LoadOptions& options_;
  LoadReport& report_;
  std::vector<const LoadTarget*> targets_;  // by entry index
  std::unordered_map<const ChunkRecord*, std::vector<Run>> runs_;  // chunks with pieces still to come
  at::Tensor own_;       // this rank's bucket of the round
  at::Tensor incoming_;  // another rank's
  at::Tensor wire_;      // on the communicator's device, when that is not the CPU
};

}  // namespace

Result<std::vector<char>> agree_shared_entries(Communicator& comm, const Manifest& m, const LoadPlan* plan,
                                               LoadOptions::Cooperative mode, Status planned) {
  const bool cooperative = mode != LoadOptions::Cooperative::kNever;
  const size_t n = m.entries.size();
  std::vector<char> shared(n, 0);
  if (comm.size() == 1) {
    TRY(std::move(planned));
    return shared;
  }
  std::vector<int32_t> want(n, 0);
  if (plan != nullptr && cooperative) {
    for (const ReadItem& it : plan->items) {
      if (loads_whole(*it.target, *it.entry)) want[entry_index(m, it.entry)] = 1;
    }
  }
  // Header: flags and values reduced with MIN; a value v sent as (v, -v) comes back as
  // (min, -max), equal on every rank exactly when every rank sent the same v.
  const uint64_t fp = fingerprint(m);
  const auto count = static_cast<int32_t>(std::min<size_t>(n, INT32_MAX));
  const auto lo = static_cast<int32_t>(fp & 0x7fffffff);
  const auto hi = static_cast<int32_t>((fp >> 31) & 0x7fffffff);
  at::Tensor window = at::empty({kWindow}, at::kInt);
  int32_t* w = window.data_ptr<int32_t>();
  const int32_t host = host_id();
  const int32_t header[kHeader] = {planned.ok() ? 1 : 0, cooperative ? 1 : 0, count, -count, lo, -lo, hi, -hi,
                                   host, -host, mode == LoadOptions::Cooperative::kAlways ? 1 : 0};
  std::copy(header, header + kHeader, w);
  size_t done = std::min<size_t>(n, kWindow - kHeader);
  std::fill(std::copy(want.begin(), want.begin() + static_cast<std::ptrdiff_t>(done), w + kHeader), w + kWindow, 0);
  TRY(all_reduce_min(comm, window));
  if (w[0] == 0) {  // some rank's planning failed: every rank returns its error
    Status s = agree(comm, std::move(planned));
    if (s.ok()) return make_error(Code::kInternal, "cooperative load: ranks disagree on whether planning failed");
    return std::move(s).error();
  }
  const bool same = w[1] == 1 && w[2] == -w[3] && w[4] == -w[5] && w[6] == -w[7];
  const bool one_host = w[8] == -w[9];
  const bool every_rank_always = w[10] == 1;
  if (!same || (one_host && !every_rank_always)) return shared;
  for (size_t i = 0; i < done; ++i) shared[i] = w[kHeader + i] == 1;
  while (done < n) {
    const size_t take = std::min<size_t>(n - done, kWindow);
    std::fill(std::copy(want.begin() + static_cast<std::ptrdiff_t>(done),
                        want.begin() + static_cast<std::ptrdiff_t>(done + take), w),
              w + kWindow, 0);
    TRY(all_reduce_min(comm, window));
    for (size_t i = 0; i < take; ++i) shared[done + i] = w[i] == 1;
    done += take;
  }
  return shared;
}

CooperativePlan plan_cooperative_reads(const Manifest& m, std::vector<char> shared, int world,
                                       uint64_t bucket_bytes) {
  CooperativePlan cp;
  cp.shared = std::move(shared);
  cp.shared.resize(m.entries.size(), 0);
  cp.bytes_per_rank.assign(static_cast<size_t>(world), 0);
  const uint64_t block = std::max<uint64_t>(1, m.block_size);
  const uint64_t piece = std::max(block, bucket_bytes / block * block);
  struct Item {
    uint32_t entry;
    uint32_t chunk;
    uint64_t bytes;
  };
  std::vector<Item> items;  // manifest order
  for (size_t e = 0; e < m.entries.size(); ++e) {
    const Entry& en = m.entries[e];
    if (!cp.shared[e] || en.kind != Entry::Kind::kTensor) continue;
    for (size_t c = 0; c < en.chunks.size(); ++c) {
      const uint64_t b = data_bytes(en, en.chunks[c]);
      if (b > 0) items.push_back({static_cast<uint32_t>(e), static_cast<uint32_t>(c), b});
    }
  }
  // Largest first to the least loaded rank (ties: the lowest rank).
  std::vector<size_t> order(items.size());
  std::iota(order.begin(), order.end(), size_t{0});
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return items[a].bytes > items[b].bytes; });
  using Load = std::pair<uint64_t, int>;
  std::priority_queue<Load, std::vector<Load>, std::greater<Load>> least;
  for (int r = 0; r < world; ++r) least.push({0, r});
  std::vector<int> owner(items.size());
  for (size_t i : order) {
    auto [load, r] = least.top();
    least.pop();
    owner[i] = r;
    least.push({load + items[i].bytes, r});
  }
  // Each rank's chunks, in manifest order, into buckets.
  std::vector<std::vector<CooperativeBucket>> per_rank(static_cast<size_t>(world));
  std::vector<CooperativeBucket> packing(static_cast<size_t>(world));
  for (size_t i = 0; i < items.size(); ++i) {
    const Item& it = items[i];
    const auto r = static_cast<size_t>(owner[i]);
    cp.bytes_per_rank[r] += it.bytes;
    if (it.bytes >= kOwnBucketBytes || it.bytes > piece) {
      for (uint64_t from = 0; from < it.bytes; from += piece) {
        const uint64_t len = std::min(piece, it.bytes - from);
        per_rank[r].push_back({owner[i], len, {{it.entry, it.chunk, from, len, 0}}});
      }
      continue;
    }
    CooperativeBucket& b = packing[r];
    if (!b.pieces.empty() && b.bytes + it.bytes > piece) per_rank[r].push_back(std::exchange(b, {}));
    b.root = owner[i];
    b.pieces.push_back({it.entry, it.chunk, 0, it.bytes, b.bytes});
    b.bytes += it.bytes;
  }
  size_t rounds = 0;
  for (size_t r = 0; r < per_rank.size(); ++r) {
    if (!packing[r].pieces.empty()) per_rank[r].push_back(std::move(packing[r]));
    rounds = std::max(rounds, per_rank[r].size());
  }
  cp.rounds.resize(rounds);
  for (size_t k = 0; k < rounds; ++k) {
    for (auto& buckets : per_rank) {
      if (k >= buckets.size()) continue;
      cp.max_bucket_bytes = std::max(cp.max_bucket_bytes, buckets[k].bytes);
      cp.rounds[k].push_back(std::move(buckets[k]));
    }
  }
  return cp;
}

std::vector<ReadItem> own_read_items(const Manifest& m, const CooperativePlan& cp, const std::vector<ReadItem>& items) {
  std::vector<ReadItem> out;
  out.reserve(items.size());
  for (const ReadItem& it : items) {
    const size_t e = entry_index(m, it.entry);
    if (e >= cp.shared.size() || !cp.shared[e]) out.push_back(it);
  }
  return out;
}

Status read_cooperatively(Communicator& comm, const Source& source, const CooperativePlan& cp, const LoadPlan& plan,
                          const LoadOptions& options, Status prior, LoadReport& report) {
  if (cp.rounds.empty()) return prior;
  CooperativeReader reader(comm, source, cp, plan, options, report);
  Status local = std::move(prior);
  if (local.ok()) local = reader.prepare();
  for (const std::vector<CooperativeBucket>& round : cp.rounds) {
    auto mine = std::find_if(round.begin(), round.end(), [&](const CooperativeBucket& b) { return b.root == comm.rank(); });
    if (local.ok() && mine != round.end()) local = reader.read(*mine);
    // Nothing is broadcast before every rank's reads of the round are verified.
    TRY(agree(comm, std::move(local)));
    local = ok();
    for (const CooperativeBucket& b : round) reader.transfer(b, local);
  }
  return agree(comm, std::move(local));
}

}  // namespace dsd::checkpoint
