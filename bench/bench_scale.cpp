// Planning at scale, simulated on one machine: the local save plans of N ranks holding a
// Llama-3-70B-shaped model + AdamW state (FSDP: Shard(0) over N; HSDP: a (8 replicate) x
// (N/8 shard) mesh), built from metadata only (no tensor data), then timed through dsd's
// coordinator steps:
//   global plan   GlobalPlanner: dedup, byte balance, validation, file assignment
//   manifest      merge_write_results (every rank's write results, simulated from the plan:
//                 the files, chunk byte ranges and block-checksum counts a writer reports,
//                 with made-up checksum values) + manifest_to_json
//   load plan     a reshard to N/2 ranks of the same mesh kind: the ReadItems of EVERY one of
//                 the N/2 destination ranks, through ChunkIndex, plus rank 0's plan by the
//                 per-rank scan (add_read_items) that load() uses
// With --cached-n, also a save that reuses the cached plan (SaveOptions::enable_plan_caching,
// core/checkpoint/plan_cache.h), FSDP, in its own child: the full global plan as above
// against the cache hit of the next save of the same structure, what the coordinator runs
// then (decoding every rank's summary, reusing the plan: a new save id, data file names and
// values), plus one rank's fingerprint of its own local plan (every rank fingerprints its
// own, in parallel). The full side leaves out the parsing of the gathered local plans, so the
// ratio understates the saving.
// Each (N, mesh) runs in a fresh child process (this binary with --one), so its peak RSS
// (getrusage of the child) is its own; an address-space limit (--mem-limit-gb) turns an
// out-of-memory case into a reported failure instead of a machine-wide OOM.
//
// Usage: bench_scale [--n 256,1024,4096,16384] [--mesh fsdp,hsdp] [--mem-limit-gb 16]
//                    [--cached-n 4096]
// Prints one JSON object: {"cases": [{...}, ...], "cached": [{...}, ...]}. bench/bench_scale.py runs it next to
// PyTorch DCP's create_global_plan on the same inputs.
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <new>
#include <string>
#include <vector>

#include "core/checkpoint/load_planner.h"
#include "core/checkpoint/manifest.h"
#include "core/checkpoint/plan_cache.h"
#include "core/checkpoint/save_planner.h"
#include "core/checkpoint/write_results.h"
#include "core/dist/layout.h"
#include "core/formats/safetensors.h"

namespace {

using namespace dsd;
using namespace dsd::checkpoint;
using nlohmann::json;
using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

struct Param {
  std::string fqn;
  std::vector<int64_t> shape;
};

// Llama-3-70B: vocab 128256, hidden 8192, 80 layers, FFN 28672, 8 KV heads of 128.
std::vector<Param> llama3_70b() {
  constexpr int64_t kVocab = 128256, kDim = 8192, kLayers = 80, kFfn = 28672, kKv = 1024;
  std::vector<Param> p;
  p.push_back({"tok_embeddings.weight", {kVocab, kDim}});
  for (int64_t i = 0; i < kLayers; ++i) {
    const std::string l = fmt::format("layers.{}.", i);
    p.push_back({l + "attention.wq.weight", {kDim, kDim}});
    p.push_back({l + "attention.wk.weight", {kKv, kDim}});
    p.push_back({l + "attention.wv.weight", {kKv, kDim}});
    p.push_back({l + "attention.wo.weight", {kDim, kDim}});
    p.push_back({l + "feed_forward.w1.weight", {kFfn, kDim}});
    p.push_back({l + "feed_forward.w2.weight", {kDim, kFfn}});
    p.push_back({l + "feed_forward.w3.weight", {kFfn, kDim}});
    p.push_back({l + "attention_norm.weight", {kDim}});
    p.push_back({l + "ffn_norm.weight", {kDim}});
  }
  p.push_back({"norm.weight", {kDim}});
  p.push_back({"output.weight", {kVocab, kDim}});
  return p;
}

// A flat key of the state dict {"model": {fqn: param}, "optim": {"state": {fqn: {...}}}},
// as DCP flattens it; `sharded` tensors are DTensors, the rest (AdamW's step) plain tensors
// every rank holds whole.
struct Tensor {
  std::string key;
  Path path;
  std::vector<int64_t> shape;
  bool sharded;
};

std::vector<Tensor> state_dict_tensors() {
  std::vector<Tensor> out;
  const std::vector<Param> params = llama3_70b();
  for (const Param& p : params) out.push_back({"model." + p.fqn, {std::string("model"), p.fqn}, p.shape, true});
  for (const Param& p : params) {
    for (const char* s : {"exp_avg", "exp_avg_sq"}) {
      out.push_back({fmt::format("optim.state.{}.{}", p.fqn, s),
                     {std::string("optim"), std::string("state"), p.fqn, std::string(s)}, p.shape, true});
    }
    out.push_back({fmt::format("optim.state.{}.step", p.fqn),
                   {std::string("optim"), std::string("state"), p.fqn, std::string("step")}, {}, false});
  }
  return out;
}

// A device mesh and the placements of every sharded tensor on it.
struct Mesh {
  std::vector<int64_t> shape;
  std::vector<Placement> placements;

  int64_t size() const { return shape.size() == 1 ? shape[0] : shape[0] * shape[1]; }
  std::vector<int64_t> coordinate(int64_t rank) const {
    if (shape.size() == 1) return {rank};
    return {rank / shape[1], rank % shape[1]};
  }
};

Mesh make_mesh(const std::string& kind, int64_t n) {
  if (kind == "fsdp") return {{n}, {Placement::shard(0)}};
  return {{8, n / 8}, {Placement::replicate(), Placement::shard(0)}};
}

// Rank `rank`'s local plan, as create_local_plan would make it from the DTensors.
LocalPlan local_plan(const std::vector<Tensor>& tensors, const Mesh& mesh, int64_t rank) {
  LocalPlan plan;
  plan.rank = rank;
  if (rank == 0) {
    plan.save_id = "0123456789abcdef";
    plan.mesh_shape = mesh.shape;
  }
  const std::vector<int64_t> coord = mesh.coordinate(rank);
  plan.items.reserve(tensors.size());
  for (const Tensor& t : tensors) {
    WriteItem it;
    it.key = t.key;
    it.path = t.path;
    it.dtype = DType::kFloat32;
    it.global_shape = t.shape;
    if (t.sharded) {
      Chunk c = local_shape_and_offset(t.shape, mesh.shape, coord, mesh.placements);
      it.offsets = std::move(c.offsets);
      it.sizes = std::move(c.sizes);
    } else {
      it.sizes = t.shape;
      it.offsets.assign(t.shape.size(), 0);
    }
    plan.items.push_back(std::move(it));
  }
  return plan;
}

// What the dsd writer of rank `rank` would report for its part of the plan: file sizes and
// chunk byte ranges from the real safetensors header; checksums are placeholders.
std::string simulated_write_results(const RankPlan& rp, int64_t rank, uint64_t block_size) {
  std::vector<FileRecord> files;
  std::vector<WrittenChunk> chunks;
  for (const FilePlan& fp : rp.files) {
    std::vector<safetensors::TensorEntry> entries;
    uint64_t pos = 0;
    for (size_t i : fp.items) {
      const WriteItem& it = rp.items[i];
      entries.push_back({it.key, it.dtype, it.sizes, pos, pos + it.storage_bytes()});
      pos += it.storage_bytes();
    }
    const uint64_t header = safetensors::write_header(entries, {{"format", "pt"}})->size();
    for (size_t k = 0; k < fp.items.size(); ++k) {
      const WriteItem& it = rp.items[fp.items[k]];
      WrittenChunk c;
      c.key = it.key;
      c.record.offsets = it.offsets;
      c.record.sizes = it.sizes;
      c.record.file = fp.name;
      c.record.begin = header + entries[k].begin;
      c.record.end = header + entries[k].end;
      c.record.xxh3 = std::hash<std::string>{}(it.key) ^ c.record.begin;
      c.record.blocks.assign(block_count(c.record.nbytes(), block_size), c.record.xxh3 * 31);
      chunks.push_back(std::move(c));
    }
    files.push_back({fp.name, rank, header + pos, {}});
  }
  return encode_write_results(files, chunks);
}

json run_case(int64_t n, const std::string& kind) {
  const std::vector<Tensor> tensors = state_dict_tensors();
  const Mesh mesh = make_mesh(kind, n);
  json out = {{"n", n}, {"mesh", kind}, {"mesh_shape", mesh.shape}, {"tensors_per_rank", tensors.size()}};

  // Global plan: each rank's plan is built (untimed: the ranks do that in parallel), then
  // handed to the planner, as the coordinator parses the gathered plans one by one.
  double build_s = 0, plan_s = 0;
  uint64_t items = 0;
  GlobalPlanner planner(PlanOptions{1, false});
  for (int64_t r = 0; r < n; ++r) {
    auto t0 = Clock::now();
    LocalPlan p = local_plan(tensors, mesh, r);
    items += p.items.size();
    build_s += seconds_since(t0);
    t0 = Clock::now();
    Status s = planner.add(std::move(p));
    plan_s += seconds_since(t0);
    if (!s.ok()) throw std::runtime_error(s.error().message);
  }
  auto t0 = Clock::now();
  auto g = planner.finish();
  plan_s += seconds_since(t0);
  if (!g.ok()) throw std::runtime_error(g.error().message);
  uint64_t written = 0;
  for (const RankPlan& rp : g->ranks) written += rp.items.size();
  out["local_items"] = items;
  out["written_items"] = written;
  out["local_plans_build_s"] = build_s;
  out["global_plan_s"] = plan_s;

  // Manifest: every rank's write results (untimed: made by the ranks), then the
  // coordinator's merge, validation and serialisation (timed).
  Manifest manifest = std::move(g->manifest);
  manifest.block_size = kDefaultBlockSize;
  std::vector<std::string> results;
  results.reserve(static_cast<size_t>(n));
  for (size_t r = 0; r < g->ranks.size(); ++r) {
    results.push_back(simulated_write_results(g->ranks[r], static_cast<int64_t>(r), manifest.block_size));
    results.back().shrink_to_fit();  // as received: a gathered buffer of the exact size
    std::vector<WriteItem>().swap(g->ranks[r].items);  // freed as each rank reports
  }
  std::vector<RankPlan>().swap(g->ranks);
  t0 = Clock::now();
  if (Status s = merge_write_results(manifest, results); !s.ok()) throw std::runtime_error(s.error().message);
  const double merge_s = seconds_since(t0);
  std::vector<std::string>().swap(results);
  t0 = Clock::now();
  uint64_t manifest_bytes = 0;
  {
    const std::string text = manifest_to_json(manifest);
    manifest_bytes = text.size();
  }
  const double write_s = seconds_since(t0);
  uint64_t chunks = 0;
  for (const Entry& e : manifest.entries) chunks += e.chunks.size();
  out["manifest_chunks"] = chunks;
  out["manifest_merge_s"] = merge_s;
  out["manifest_write_s"] = write_s;
  out["manifest_s"] = merge_s + write_s;
  out["manifest_bytes"] = manifest_bytes;
  out["manifest_bytes_per_rank"] = static_cast<double>(manifest_bytes) / static_cast<double>(n);

  // Load plan for N/2 ranks: every destination rank's ReadItems, one rank at a time.
  const Mesh dst = make_mesh(kind, n / 2);
  t0 = Clock::now();
  std::vector<ChunkIndex> indexes;
  indexes.reserve(manifest.entries.size());
  for (const Entry& e : manifest.entries) indexes.emplace_back(e);
  uint64_t reads = 0;
  std::vector<LoadTarget> targets(tensors.size());
  std::vector<ReadItem> read_items;
  for (int64_t r = 0; r < dst.size(); ++r) {
    const std::vector<int64_t> coord = dst.coordinate(r);
    read_items.clear();
    for (size_t i = 0; i < tensors.size(); ++i) {
      const Tensor& t = tensors[i];
      LoadTarget& tg = targets[i];
      tg.key = t.key;
      tg.local = t.sharded ? local_shape_and_offset(t.shape, dst.shape, coord, dst.placements)
                           : Chunk{std::vector<int64_t>(t.shape.size(), 0), t.shape};
      indexes[i].add_read_items(tg, read_items);
    }
    reads += read_items.size();
  }
  const double load_s = seconds_since(t0);
  // Rank 0 of the destination as load() plans it: a scan of each entry's chunks.
  t0 = Clock::now();
  uint64_t reads0 = 0;
  {
    const std::vector<int64_t> coord = dst.coordinate(0);
    read_items.clear();
    for (size_t i = 0; i < tensors.size(); ++i) {
      const Tensor& t = tensors[i];
      targets[i].local = t.sharded ? local_shape_and_offset(t.shape, dst.shape, coord, dst.placements)
                                   : Chunk{std::vector<int64_t>(t.shape.size(), 0), t.shape};
      add_read_items(manifest.entries[i], targets[i], read_items);
    }
    reads0 = read_items.size();
  }
  out["load_ranks"] = dst.size();
  out["load_plan_s"] = load_s;
  out["load_read_items"] = reads;
  out["load_plan_rank0_scan_s"] = seconds_since(t0);
  out["load_read_items_rank0"] = reads0;
  return out;
}

// The full global plan of N ranks against a cache hit of the next save of that structure.
json run_cached_case(int64_t n, const std::string& kind) {
  const std::vector<Tensor> tensors = state_dict_tensors();
  const Mesh mesh = make_mesh(kind, n);
  json out = {{"n", n}, {"mesh", kind}};
  SaveOptions opt;
  opt.enable_plan_caching = true;
  opt.thread_count = 1;
  PlanCache cache;
  const PlanFingerprint empty = cache.state();
  std::vector<PlanSummary> summaries;
  summaries.reserve(static_cast<size_t>(n));
  double plan_s = 0, fingerprint0_s = 0;
  GlobalPlanner planner(PlanOptions{opt.thread_count, opt.save_to_lowest_rank});
  for (int64_t r = 0; r < n; ++r) {
    LocalPlan p = local_plan(tensors, mesh, r);
    auto t0 = Clock::now();
    summaries.push_back(summarize_plan(p, n, opt, empty));
    if (r == 0) fingerprint0_s = seconds_since(t0);
    t0 = Clock::now();
    Status s = planner.add(std::move(p));
    plan_s += seconds_since(t0);
    if (!s.ok()) throw std::runtime_error(s.error().message);
  }
  auto t0 = Clock::now();
  auto g = planner.finish();
  plan_s += seconds_since(t0);
  if (!g.ok()) throw std::runtime_error(g.error().message);
  (void)cache.insert(summaries, std::move(*g), 0);  // the lease ends here: the plan is cached

  // The next save: every rank's summary as the gather delivers it (the coordinator's with a
  // new save id), then the coordinator's decision and reuse.
  std::vector<std::string> wire;
  wire.reserve(summaries.size());
  summaries[0].save_id = "fedcba9876543210";
  for (PlanSummary& s : summaries) {
    s.cache_state = cache.state();
    wire.push_back(encode_plan_summary(s));
  }
  std::vector<PlanSummary>().swap(summaries);
  t0 = Clock::now();
  std::vector<PlanSummary> received;
  received.reserve(wire.size());
  for (const std::string& w : wire) {
    auto s = decode_plan_summary(w);
    if (!s.ok()) throw std::runtime_error(s.error().message);
    received.push_back(std::move(*s));
  }
  auto hit = cache.reuse(received, 0);
  const double cached_s = seconds_since(t0);
  if (!hit.ok()) throw std::runtime_error(hit.error().message);
  if (!hit->has_value()) throw std::runtime_error("the cached plan was not reused");
  out["global_plan_s"] = plan_s;
  out["cached_plan_s"] = cached_s;
  out["fingerprint_rank0_s"] = fingerprint0_s;
  out["summary_bytes_per_rank"] = wire.front().size();
  out["cached_plan_speedup"] = plan_s / (cached_s + fingerprint0_s);
  return out;
}

std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> out;
  size_t start = 0;
  while (start <= s.size()) {
    size_t end = s.find(',', start);
    if (end == std::string::npos) end = s.size();
    if (end > start) out.push_back(s.substr(start, end - start));
    start = end + 1;
  }
  return out;
}

// Runs one case in a fresh process; its JSON, or {"error": ...}, plus its peak RSS.
json run_child(int64_t n, const std::string& kind, double mem_limit_gb, bool cached = false) {
  int fds[2];
  if (pipe(fds) != 0) throw std::runtime_error("pipe failed");
  const pid_t pid = fork();
  if (pid == 0) {
    dup2(fds[1], STDOUT_FILENO);
    close(fds[0]);
    close(fds[1]);
    const std::string ns = std::to_string(n), lim = std::to_string(mem_limit_gb);
    execl("/proc/self/exe", "bench_scale", cached ? "--one-cached" : "--one", ns.c_str(), kind.c_str(), lim.c_str(),
          nullptr);
    _exit(127);
  }
  close(fds[1]);
  std::string text;
  char buf[4096];
  ssize_t k;
  while ((k = read(fds[0], buf, sizeof buf)) > 0) text.append(buf, static_cast<size_t>(k));
  close(fds[0]);
  int status = 0;
  struct rusage ru {};
  wait4(pid, &status, 0, &ru);
  json j = json::parse(text, nullptr, false);
  if (j.is_discarded() || !j.is_object()) {
    j = {{"n", n}, {"mesh", kind},
         {"error", fmt::format("child exited with status {} ({})", status, text.substr(0, 200))}};
  }
  j["peak_rss_mb"] = static_cast<double>(ru.ru_maxrss) / 1024.0;
  return j;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 5 && (std::strcmp(argv[1], "--one") == 0 || std::strcmp(argv[1], "--one-cached") == 0)) {
    const bool cached = std::strcmp(argv[1], "--one-cached") == 0;
    const int64_t n = std::stoll(argv[2]);
    const std::string kind = argv[3];
    const double limit_gb = std::stod(argv[4]);
    if (limit_gb > 0) {
      struct rlimit rl {};
      rl.rlim_cur = rl.rlim_max = static_cast<rlim_t>(limit_gb * (1ull << 30));
      setrlimit(RLIMIT_AS, &rl);
    }
    json j;
    try {
      j = cached ? run_cached_case(n, kind) : run_case(n, kind);
    } catch (const std::bad_alloc&) {
      j = {{"n", n}, {"mesh", kind}, {"error", fmt::format("out of memory under the {} GiB address-space limit", limit_gb)}};
    } catch (const std::exception& e) {
      j = {{"n", n}, {"mesh", kind}, {"error", e.what()}};
    }
    std::fputs((j.dump() + "\n").c_str(), stdout);
    return 0;
  }
  std::vector<std::string> ns = {"256", "1024", "4096", "16384"}, meshes = {"fsdp", "hsdp"}, cached_ns;
  double limit_gb = 16;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string a = argv[i];
    if (a == "--n") ns = split(argv[i + 1]);
    else if (a == "--mesh") meshes = split(argv[i + 1]);
    else if (a == "--mem-limit-gb") limit_gb = std::stod(argv[i + 1]);
    else if (a == "--cached-n") cached_ns = split(argv[i + 1]);
    else {
      std::fprintf(stderr, "bench_scale: unknown option %s\n", a.c_str());
      return 2;
    }
  }
  json cases = json::array();
  for (const std::string& kind : meshes) {
    if (kind != "fsdp" && kind != "hsdp") {
      std::fprintf(stderr, "bench_scale: mesh kind '%s' is neither fsdp nor hsdp\n", kind.c_str());
      return 2;
    }
    for (const std::string& s : ns) {
      const int64_t n = std::stoll(s);
      if (n < 16 || n % 16 != 0) {
        std::fprintf(stderr, "bench_scale: %s ranks is not a multiple of 16 (HSDP halves N/8)\n", s.c_str());
        return 2;
      }
      json c = run_child(n, kind, limit_gb);
      std::fprintf(stderr, "%s\n", c.dump().c_str());
      cases.push_back(std::move(c));
    }
  }
  json cached = json::array();
  for (const std::string& s : cached_ns) {
    json c = run_child(std::stoll(s), "fsdp", limit_gb, true);
    std::fprintf(stderr, "%s\n", c.dump().c_str());
    cached.push_back(std::move(c));
  }
  std::printf("%s\n", json{{"cases", cases}, {"cached", cached}}.dump().c_str());
  return 0;
}
