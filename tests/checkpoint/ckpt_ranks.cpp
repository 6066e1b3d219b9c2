// Multi-rank checkpoint scenarios over Gloo, run under dsdrun (one process per rank) by
// test_multirank.py and test_crash.py: `ckpt_ranks SCENARIO DIR [ARG]`. Every rank checks its
// own results, prints "rank R: SCENARIO ok" (or each failed check) and exits non-zero when a
// check failed.
//
// The reference state dict is a function of the key alone (bytes from an arithmetic pattern,
// so bitwise checks cover every dtype), whatever the world size or layout: a rank's local
// tensor is its chunk of the full tensor, cut with the layout's local_chunk().
//
// Scenarios:
//   save DIR             world 4: saves the reference state dict with its saved layouts
//                        (Shard(0), [Replicate, Shard(0)] and [Shard(0), Shard(1)] on 2x2,
//                        Shard(1), uneven and empty shards, replicated DTensors and plain
//                        tensors, non-tensor values); rank 0 checks the manifest: each chunk
//                        written once, bytes balanced across ranks
//   load DIR VARIANT     loads DIR into layouts of this world size ("same": the saved ones,
//                        world 4 only; "alt": others, incl. plain and non-contiguous
//                        destinations) and checks every byte and value; at world 1 also
//                        load_full
//   async DIR            two async saves: a future on every rank, staging protects the
//                        sources, the second save allocates nothing, an error (kExists)
//                        reaches every rank's future
//   async_capped DIR     async saves staged in waves (max_staging_bytes far below each
//                        rank's share): replicated tensors another rank writes are never
//                        copied, the sources change right after save_async returns, the
//                        staging mark stays within the cap (or the largest storage), an
//                        error (kExists) reaches every rank's future
//   missing_key DIR      the last rank asks for a key the checkpoint lacks: kNotFound on all
//   corrupt DIR          world 4: a byte of a chunk that only rank 3 reads is flipped (in a
//                        copy): kCorrupt naming file and key on every rank
//   manager DIR          CheckpointManager: latest, retention, an incomplete step skipped,
//                        async save, resume from a fresh manager
//   full_disk DIR R      rank R's file size limit is hit while it writes: kNoSpace on every
//                        rank, the previous checkpoint intact and nothing of the new one left
//   crash_save DIR A|B   saves state A or B over DIR (overwrite) for the crash driver; writes
//                        its pid and "started"/"done" markers around the save to
//                        $CKPT_CONTROL_DIR when set; exits 3
//                        after printing "rank R: save failed: CODE: MESSAGE"
// The communicator timeout is DSD_TEST_TIMEOUT_MS (default 20000).
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <csignal>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "core/checkpoint/async_save.h"
#include "core/checkpoint/io.h"
#include "core/checkpoint/load.h"
#include "core/checkpoint/manager.h"
#include "core/checkpoint/save.h"
#include "core/dist/comm.h"
#include "core/dist/layout.h"
#include "core/dist/mesh.h"
#include "core/dist/rendezvous.h"

namespace ck = dsd::checkpoint;
namespace fs = std::filesystem;

namespace {

int g_rank = -1;
int g_failures = 0;

#define EXPECT(cond)                                                                         \
  do {                                                                                      \
    if (!(cond)) {                                                                          \
      std::fprintf(stderr, "rank %d: %s:%d: CHECK failed: %s\n", g_rank, __FILE__, __LINE__, #cond); \
      g_failures++;                                                                         \
    }                                                                                       \
  } while (0)

#define EXPECT_MSG(cond, ...)                                                                \
  do {                                                                                      \
    if (!(cond)) {                                                                          \
      std::fprintf(stderr, "rank %d: %s:%d: CHECK failed: %s: %s\n", g_rank, __FILE__, __LINE__, \
                   #cond, fmt::format(__VA_ARGS__).c_str());                                \
      g_failures++;                                                                         \
    }                                                                                       \
  } while (0)

// Aborts the scenario: later steps depend on this one.
template <class T>
T must(dsd::Result<T> r, const char* what, int line) {
  if (!r.ok()) {
    std::fprintf(stderr, "rank %d: line %d: %s failed: %s\n", g_rank, line, what, r.error().message.c_str());
    std::exit(1);
  }
  return std::move(*r);
}
void must(dsd::Status s, const char* what, int line) {
  if (!s.ok()) {
    std::fprintf(stderr, "rank %d: line %d: %s failed: %s\n", g_rank, line, what, s.error().message.c_str());
    std::exit(1);
  }
}
#define REQUIRE_OK(expr) must((expr), #expr, __LINE__)

bool has(const std::string& s, const std::string& needle) { return s.find(needle) != std::string::npos; }

std::chrono::milliseconds test_timeout() {
  const char* v = std::getenv("DSD_TEST_TIMEOUT_MS");
  return std::chrono::milliseconds(v ? std::atoll(v) : 20000);
}

// ---------------------------------------------------------------------------------------------
// The reference state dict.

// Full tensor bytes: a pattern of the key's seed, reinterpreted as the dtype (bool bytes are
// 0 or 1; float bit patterns may be NaN, which bitwise comparison handles).
at::Tensor full_tensor(at::ScalarType type, const std::vector<int64_t>& shape, int64_t seed) {
  int64_t n = 1;
  for (int64_t s : shape) n *= s;
  const int64_t nbytes = n * static_cast<int64_t>(c10::elementSize(type));
  if (n == 0) return at::empty(shape, at::TensorOptions().dtype(type));
  // (131 i + 977 seed) mod 251 repeats every 251 bytes: one period, tiled.
  const int64_t modulus = type == at::kBool ? 2 : 251;
  at::Tensor period = at::arange(251, at::kLong).mul(131).add(seed * 977).remainder(modulus).to(at::kByte);
  at::Tensor bytes = period.repeat({(nbytes + 250) / 251}).narrow(0, 0, nbytes);
  return bytes.view(type).reshape(shape).clone();
}

enum class MeshKind { kNone, kLine, kSquare };  // plain tensor, 1-d over the world, 2x2

struct Placed {
  MeshKind mesh = MeshKind::kNone;
  std::vector<dsd::Placement> placements;
};

struct TensorSpec {
  std::string key;  // dotted: nested dicts
  at::ScalarType dtype;
  std::vector<int64_t> shape;
  Placed saved;  // at world 4
};

using P = dsd::Placement;

std::vector<TensorSpec> reference_tensors() {
  return {
      {"model.layers.0.weight", at::kFloat, {10, 6}, {MeshKind::kLine, {P::shard(0)}}},         // 3,3,3,1 rows
      {"model.layers.0.bias", at::kBFloat16, {7, 5}, {MeshKind::kSquare, {P::replicate(), P::shard(0)}}},  // HSDP
      {"model.layers.1.weight", at::kDouble, {4, 9}, {MeshKind::kLine, {P::shard(1)}}},         // 3,3,3,0 cols
      {"model.layers.1.bias", at::kInt, {2, 3}, {MeshKind::kLine, {P::shard(0)}}},              // 1,1,0,0 rows
      {"model.tp", at::kHalf, {6, 5}, {MeshKind::kSquare, {P::shard(0), P::shard(1)}}},        // FSDP + TP
      {"model.big", at::kFloat, {1000, 300}, {MeshKind::kLine, {P::shard(0)}}},                // many blocks
      {"model.rep_dt", at::kFloat, {5, 4}, {MeshKind::kLine, {P::replicate()}}},               // replicated DTensor
      {"buffers.mean", at::kFloat, {3000}, {}},                                              // plain: every rank
      {"buffers.var", at::kDouble, {1200}, {}},
      {"buffers.count", at::kLong, {17}, {}},
      {"buffers.mask", at::kBool, {33}, {}},
      {"buffers.scalar", at::kFloat, {}, {}},
      {"buffers.empty", at::kFloat, {0, 4}, {}},
  };
}

int64_t seed_of(const std::string& key) {
  int64_t h = 7;
  for (char c : key) h = (h * 31 + c) % 100003;
  return h;
}

// Non-tensor leaves, merged into the tree at their dotted paths.
std::vector<std::pair<std::string, dsd::Value>> reference_values() {
  dsd::ListPtr betas = dsd::List::make(true);
  betas->push_back(dsd::Value(0.9));
  betas->push_back(dsd::Value(0.999));
  dsd::DictPtr group = dsd::Dict::make();
  group->set("lr", dsd::Value(0.1));
  dsd::ListPtr params = dsd::List::make(false);
  params->push_back(dsd::Value(int64_t{0}));
  params->push_back(dsd::Value(int64_t{1}));
  group->set("params", dsd::Value(params));
  dsd::ListPtr groups = dsd::List::make(false);
  groups->push_back(dsd::Value(group));
  return {
      {"optim.step", dsd::Value(int64_t{1234})},
      {"optim.lr", dsd::Value(0.01)},
      {"optim.name", dsd::Value("adam")},
      {"optim.betas", dsd::Value(betas)},
      {"optim.blob", dsd::Value(dsd::Bytes{std::string("\x00\xff\x01", 3)})},
      {"optim.none", dsd::Value()},
      {"optim.param_groups", dsd::Value(groups)},
      {"epoch", dsd::Value(int64_t{7})},
  };
}

dsd::Dict& subdict(dsd::Dict& root, const std::string& dotted, std::string& leaf) {
  dsd::Dict* d = &root;
  size_t start = 0;
  while (true) {
    const size_t dot = dotted.find('.', start);
    if (dot == std::string::npos) break;
    const std::string part = dotted.substr(start, dot - start);
    if (d->find(part) == nullptr) d->set(part, dsd::Value(dsd::Dict::make()));
    d = d->find(part)->if_dict();
    start = dot + 1;
  }
  leaf = dotted.substr(start);
  return *d;
}

void put(dsd::Dict& root, const std::string& dotted, dsd::Value v) {
  std::string leaf;
  subdict(root, dotted, leaf).set(leaf, std::move(v));
}

const dsd::Value* get(const dsd::Dict& root, const std::string& dotted) {
  const dsd::Dict* d = &root;
  size_t start = 0;
  while (true) {
    const size_t dot = dotted.find('.', start);
    const std::string part = dotted.substr(start, dot == std::string::npos ? std::string::npos : dot - start);
    const dsd::Value* v = d->find(part);
    if (v == nullptr || dot == std::string::npos) return v;
    d = v->if_dict();
    if (d == nullptr) return nullptr;
    start = dot + 1;
  }
}

struct World {
  std::shared_ptr<dsd::Communicator> comm;
  std::shared_ptr<const dsd::DeviceMesh> line;
  std::shared_ptr<const dsd::DeviceMesh> square;  // only at world 4
};

World connect() {
  World w;
  auto comm = dsd::communicator_from_env({test_timeout()});
  if (!comm.ok()) {
    std::fprintf(stderr, "rendezvous failed: %s\n", comm.error().message.c_str());
    std::exit(2);
  }
  w.comm = *comm;
  g_rank = w.comm->rank();
  const int n = w.comm->size();
  w.line = REQUIRE_OK(dsd::DeviceMesh::make(w.comm, {n}, {}, c10::DeviceType::CPU));
  if (n == 4) w.square = REQUIRE_OK(dsd::DeviceMesh::make(w.comm, {2, 2}, {}, c10::DeviceType::CPU));
  return w;
}

at::Tensor cut(const at::Tensor& full, const dsd::Chunk& c) {
  at::Tensor t = full;
  for (size_t d = 0; d < c.sizes.size(); ++d) t = t.narrow(static_cast<int64_t>(d), c.offsets[d], c.sizes[d]);
  return t.contiguous().clone();
}

// A tensor value of `full` placed as `p` on this rank: its local chunk, or the whole tensor.
dsd::Value placed_value(const World& w, const at::Tensor& full, const Placed& p) {
  if (p.mesh == MeshKind::kNone) return dsd::Value(full.clone());
  auto mesh = p.mesh == MeshKind::kSquare ? w.square : w.line;
  std::vector<int64_t> shape(full.sizes().begin(), full.sizes().end());
  auto layout = REQUIRE_OK(dsd::Layout::on_mesh(shape, mesh, p.placements));
  return dsd::Value(dsd::TensorValue{cut(full, layout->local_chunk()), layout, false});
}

// The placement a key is loaded into for a variant: the saved one ("same"), or one of
// several others picked by key and world size ("alt"), always valid for the tensor's rank.
Placed load_placement(const World& w, const TensorSpec& spec, size_t index, const std::string& variant) {
  if (variant == "same") return spec.saved;
  const size_t ndim = spec.shape.size();
  std::vector<Placed> options = {
      {MeshKind::kLine, {P::shard(0)}},
      {MeshKind::kLine, {P::shard(1)}},
      {MeshKind::kNone, {}},
      {MeshKind::kLine, {P::replicate()}},
  };
  if (w.square) {
    options.push_back({MeshKind::kSquare, {P::shard(1), P::shard(0)}});
    options.push_back({MeshKind::kSquare, {P::replicate(), P::shard(1)}});
  }
  Placed p = options[(index + static_cast<size_t>(w.comm->size())) % options.size()];
  for (P& pl : p.placements) {
    if (pl.is_shard() && static_cast<size_t>(pl.dim) >= ndim) pl = ndim == 0 ? P::replicate() : P::shard(0);
  }
  return p;
}

dsd::DictPtr reference_state(const World& w, const std::string& variant_for_tensors) {
  dsd::DictPtr sd = dsd::Dict::make();
  const auto specs = reference_tensors();
  for (size_t i = 0; i < specs.size(); ++i) {
    const TensorSpec& s = specs[i];
    const at::Tensor full = full_tensor(s.dtype, s.shape, seed_of(s.key));
    put(*sd, s.key, placed_value(w, full, load_placement(w, s, i, variant_for_tensors)));
  }
  for (auto& [k, v] : reference_values()) put(*sd, k, v);
  return sd;
}

// The same containers with every scalar leaf replaced by -1.
dsd::Value sentinel_like(const dsd::Value& v) {
  if (const dsd::Dict* d = v.if_dict()) {
    dsd::DictPtr out = dsd::Dict::make();
    for (const auto& e : *d) out->set(e.key, sentinel_like(e.value));
    out->set_int_keys(d->int_keys());
    return dsd::Value(out);
  }
  if (const dsd::List* l = v.if_list()) {
    dsd::ListPtr out = dsd::List::make(l->is_tuple());
    for (const dsd::Value& x : l->items()) out->push_back(sentinel_like(x));
    return dsd::Value(out);
  }
  return dsd::Value(int64_t{-1});
}

// What a fresh trainer holds before loading: the same keys with zeroed local tensors (one of
// them a non-contiguous view, read through a staging buffer) and sentinel values.
dsd::DictPtr blank_state(const World& w, const std::string& variant) {
  dsd::DictPtr sd = dsd::Dict::make();
  const auto specs = reference_tensors();
  for (size_t i = 0; i < specs.size(); ++i) {
    const TensorSpec& s = specs[i];
    const Placed p = load_placement(w, s, i, variant);
    const at::Tensor full = full_tensor(s.dtype, s.shape, seed_of(s.key));
    dsd::Value v = placed_value(w, full, p);
    dsd::TensorValue* tv = v.if_tensor();
    if (variant == "alt" && p.mesh == MeshKind::kNone && s.shape.size() == 2) {
      tv->tensor = at::zeros({s.shape[1], s.shape[0]}, at::TensorOptions().dtype(s.dtype)).t();
    } else {
      tv->tensor = at::zeros(tv->tensor.sizes(), at::TensorOptions().dtype(s.dtype));
    }
    put(*sd, s.key, v);
  }
  for (auto& [k, v] : reference_values()) put(*sd, k, sentinel_like(v));
  return sd;
}

// Every local tensor equals its chunk of the full tensor, every value the saved one.
void check_state(const World& w, const dsd::Dict& sd, const std::string& variant, const std::string& what) {
  const auto specs = reference_tensors();
  for (size_t i = 0; i < specs.size(); ++i) {
    const TensorSpec& s = specs[i];
    const dsd::Value* v = get(sd, s.key);
    EXPECT_MSG(v && v->if_tensor(), "{}: {} missing", what, s.key);
    if (!v || !v->if_tensor()) continue;
    const dsd::TensorValue& tv = *v->if_tensor();
    const at::Tensor full = full_tensor(s.dtype, s.shape, seed_of(s.key));
    const dsd::Chunk c = tv.layout ? tv.layout->local_chunk() : dsd::Chunk{std::vector<int64_t>(s.shape.size(), 0), s.shape};
    EXPECT_MSG(dsd::tensor_bitwise_equal(tv.tensor.contiguous(), cut(full, c)), "{}: {} ({}) differs from the full tensor",
              what, s.key, load_placement(w, s, i, variant).placements.empty() ? "plain" : "dtensor");
  }
  for (auto& [k, want] : reference_values()) {
    const dsd::Value* v = get(sd, k);
    std::string why;
    EXPECT_MSG(v && dsd::deep_equal(*v, want, &why), "{}: value {} not restored: {}", what, k, why);
  }
}

std::string error_text(const dsd::Error& e) { return fmt::format("{}: {}", dsd::code_name(e.code), e.message); }

void finish(const std::string& scenario) {
  if (g_failures == 0) std::printf("rank %d: %s ok\n", g_rank, scenario.c_str());
  std::fflush(stdout);
  std::fflush(stderr);
}

// ---------------------------------------------------------------------------------------------
// Scenarios.

void scenario_save(World& w, const std::string& dir) {
  EXPECT(w.comm->size() == 4);
  dsd::DictPtr sd = reference_state(w, "same");
  ck::SaveOptions opt;
  opt.block_size = 4096;  // partial-block reads when resharding
  auto info = ck::save(*w.comm, *sd, dir, opt);
  EXPECT_MSG(info.ok(), "{}", info.ok() ? "" : error_text(info.error()));
  if (!info.ok()) return;
  EXPECT(info->bytes_written > 0);  // every rank writes a share
  if (w.comm->rank() != 0) return;
  auto m = REQUIRE_OK(ck::read_manifest(dir));
  EXPECT(m.world_size == 4);
  std::map<std::string, size_t> chunks;
  uint64_t tensor_bytes = 0;
  for (const ck::Entry& e : m.entries) {
    if (e.kind != ck::Entry::Kind::kTensor) continue;
    std::set<std::vector<int64_t>> offsets;
    for (const ck::ChunkRecord& c : e.chunks) {
      offsets.insert(c.offsets);
      tensor_bytes += c.nbytes();
    }
    EXPECT_MSG(offsets.size() == e.chunks.size(), "{} has a chunk written twice", e.key);
    chunks[e.key] = e.chunks.size();
  }
  // Replicated data is written once: one chunk per distinct box, bytes = the tensors' bytes.
  EXPECT_MSG(chunks["buffers.mean"] == 1 && chunks["model.rep_dt"] == 1, "replicated tensors written {} and {} times",
            chunks["buffers.mean"], chunks["model.rep_dt"]);
  EXPECT_MSG(chunks["model.layers.0.bias"] == 2, "HSDP tensor has {} chunks, 2 distinct", chunks["model.layers.0.bias"]);
  EXPECT_MSG(chunks["model.tp"] == 4 && chunks["model.layers.0.weight"] == 4, "sharded tensors: {} {}",
            chunks["model.tp"], chunks["model.layers.0.weight"]);
  uint64_t want = 0;
  uint64_t largest_replicated = 0;
  for (const TensorSpec& s : reference_tensors()) {
    uint64_t n = c10::elementSize(s.dtype);
    for (int64_t d : s.shape) n *= static_cast<uint64_t>(d);
    want += n;
    const bool replicated = s.saved.mesh == MeshKind::kNone ||
                            std::any_of(s.saved.placements.begin(), s.saved.placements.end(),
                                        [](const P& p) { return !p.is_shard(); });
    if (replicated) largest_replicated = std::max(largest_replicated, n);
  }
  EXPECT_MSG(tensor_bytes == want, "the chunks hold {} bytes, the tensors {}", tensor_bytes, want);
  // Balanced: DCP's greedy dedup gives each replicated chunk to the least loaded holder.
  std::map<int64_t, uint64_t> per_rank;
  for (const ck::FileRecord& f : m.files) per_rank[f.rank] += f.size;
  EXPECT_MSG(per_rank.size() == 4, "{} ranks wrote files", per_rank.size());
  uint64_t lo = UINT64_MAX, hi = 0;
  for (auto& [r, b] : per_rank) {
    lo = std::min(lo, b);
    hi = std::max(hi, b);
  }
  EXPECT_MSG(hi - lo <= largest_replicated + 4096, "per-rank bytes {} to {}, spread over one replicated item ({})",
            lo, hi, largest_replicated);
  std::printf("rank 0: per-rank bytes %s\n", fmt::format("{}", per_rank).c_str());
}

void scenario_load(World& w, const std::string& dir, const std::string& variant) {
  dsd::DictPtr sd = blank_state(w, variant);
  auto r = ck::load(*w.comm, *sd, dir);
  EXPECT_MSG(r.ok(), "{}", r.ok() ? "" : error_text(r.error()));
  if (!r.ok()) return;
  EXPECT(r->missing_keys.empty() && r->unexpected_keys.empty());
  check_state(w, *sd, variant, fmt::format("load at world {} ({})", w.comm->size(), variant));
  if (w.comm->size() == 1) {
    auto full = ck::load_full(dir);
    EXPECT_MSG(full.ok(), "{}", full.ok() ? "" : error_text(full.error()));
    if (full.ok()) check_state(w, **full, "plain", "load_full");
  }
}

void scenario_async(World& w, const std::string& dir) {
  dsd::DictPtr sd = reference_state(w, "same");
  ck::AsyncCheckpointer saver(w.comm);
  auto f1 = REQUIRE_OK(saver.save_async(*sd, dir + "/a1"));
  EXPECT(f1->is_staged());
  const uint64_t allocated = saver.staging_allocations();
  EXPECT(allocated > 0);
  // The sources may change as soon as save_async returns: the save has its own copy.
  dsd::DictPtr scribbled = blank_state(w, "same");
  for (const TensorSpec& s : reference_tensors()) get(*sd, s.key)->if_tensor()->tensor.copy_(get(*scribbled, s.key)->if_tensor()->tensor);
  dsd::Status st = f1->wait(std::chrono::milliseconds(120000));
  EXPECT_MSG(st.ok(), "first async save: {}", st.ok() ? "" : error_text(st.error()));
  sd = reference_state(w, "same");
  auto f2 = REQUIRE_OK(saver.save_async(*sd, dir + "/a2"));
  EXPECT_MSG(saver.staging_allocations() == allocated, "the second save allocated {} more buffers",
            saver.staging_allocations() - allocated);
  st = f2->wait();
  EXPECT_MSG(st.ok(), "second async save: {}", st.ok() ? "" : error_text(st.error()));
  for (const char* sub : {"/a1", "/a2"}) {
    dsd::DictPtr back = blank_state(w, "same");
    auto r = ck::load(*w.comm, *back, dir + sub);
    EXPECT_MSG(r.ok(), "{}", r.ok() ? "" : error_text(r.error()));
    if (r.ok()) check_state(w, *back, "same", fmt::format("async save {}", sub));
  }
  // A save that fails (a checkpoint is there, no overwrite) fails every rank's future alike.
  auto f3 = REQUIRE_OK(saver.save_async(*sd, dir + "/a1"));
  st = f3->wait();
  EXPECT_MSG(!st.ok() && st.error().code == dsd::Code::kExists, "{}", st.ok() ? "ok" : error_text(st.error()));
  EXPECT(saver.staging_allocations() == allocated);
}

void scenario_async_capped(World& w, const std::string& dir) {
  dsd::DictPtr sd = reference_state(w, "same");
  uint64_t total = 0, largest = 0;
  for (const TensorSpec& s : reference_tensors()) {
    const at::Tensor& t = get(*sd, s.key)->if_tensor()->tensor;
    total += t.storage().nbytes();
    largest = std::max<uint64_t>(largest, t.storage().nbytes());
  }
  ck::SaveOptions opt;
  opt.max_staging_bytes = 16 << 10;
  opt.thread_count = 2;
  EXPECT_MSG(total > 4 * opt.max_staging_bytes, "rank {} holds only {} bytes", w.comm->rank(), total);
  ck::AsyncCheckpointer saver(w.comm);
  for (const char* sub : {"/c1", "/c2"}) {
    auto f = REQUIRE_OK(saver.save_async(*sd, dir + sub, opt));
    EXPECT(f->is_staged());
    dsd::DictPtr scribbled = blank_state(w, "same");
    for (const TensorSpec& s : reference_tensors()) get(*sd, s.key)->if_tensor()->tensor.copy_(get(*scribbled, s.key)->if_tensor()->tensor);
    dsd::Status st = f->wait(std::chrono::milliseconds(120000));
    EXPECT_MSG(st.ok(), "capped async save {}: {}", sub, st.ok() ? "" : error_text(st.error()));
    EXPECT_MSG(saver.peak_staged_bytes() <= std::max(opt.max_staging_bytes, largest),
               "rank {} staged {} bytes at once, cap {}, largest storage {}", w.comm->rank(),
               saver.peak_staged_bytes(), opt.max_staging_bytes, largest);
    sd = reference_state(w, "same");
  }
  for (const char* sub : {"/c1", "/c2"}) {
    dsd::DictPtr back = blank_state(w, "same");
    auto r = ck::load(*w.comm, *back, dir + sub);
    EXPECT_MSG(r.ok(), "{}", r.ok() ? "" : error_text(r.error()));
    if (r.ok()) check_state(w, *back, "same", fmt::format("capped async save {}", sub));
  }
  auto f3 = REQUIRE_OK(saver.save_async(*sd, dir + "/c1", opt));
  dsd::Status st = f3->wait(std::chrono::milliseconds(120000));
  EXPECT_MSG(!st.ok() && st.error().code == dsd::Code::kExists, "{}", st.ok() ? "ok" : error_text(st.error()));
}

void scenario_missing_key(World& w, const std::string& dir) {
  dsd::DictPtr sd = blank_state(w, "alt");
  if (w.comm->rank() == w.comm->size() - 1) put(*sd, "extra.only_on_last_rank", dsd::Value(at::zeros({3})));
  auto r = ck::load(*w.comm, *sd, dir);
  EXPECT(!r.ok());
  if (r.ok()) return;
  EXPECT_MSG(r.error().code == dsd::Code::kNotFound, "{}", error_text(r.error()));
  EXPECT_MSG(has(r.error().message, "extra.only_on_last_rank"), "{}", r.error().message);
  // Nothing was read anywhere: the load failed before any rank touched its tensors.
  const dsd::Value* w0 = get(*sd, "model.big");
  EXPECT(w0 && w0->if_tensor()->tensor.count_nonzero().item<int64_t>() == 0);
}

void scenario_corrupt(World& w, const std::string& dir) {
  EXPECT(w.comm->size() == 4);
  const std::string copy = dir + "_corrupt";
  std::string file;
  if (w.comm->rank() == 0) {
    fs::remove_all(copy);
    fs::copy(dir, copy);
    auto m = REQUIRE_OK(ck::read_manifest(copy));
    for (const ck::Entry& e : m.entries) {
      if (e.key != "model.layers.0.weight") continue;
      for (const ck::ChunkRecord& c : e.chunks) {
        if (c.offsets[0] != 9) continue;  // rows 9..10: rank 3's alone under Shard(0)
        std::fstream f(copy + "/" + c.file, std::ios::in | std::ios::out | std::ios::binary);
        f.seekg(static_cast<std::streamoff>(c.begin));
        char b = 0;
        f.read(&b, 1);
        b = static_cast<char>(b ^ 0x5a);
        f.seekp(static_cast<std::streamoff>(c.begin));
        f.write(&b, 1);
        file = c.file;
      }
    }
    EXPECT(!file.empty());
  }
  file = REQUIRE_OK(dsd::broadcast_bytes(*w.comm, file, 0));
  dsd::DictPtr sd = blank_state(w, "same");
  auto r = ck::load(*w.comm, *sd, copy);
  EXPECT(!r.ok());
  if (r.ok()) return;
  EXPECT_MSG(r.error().code == dsd::Code::kCorrupt, "{}", error_text(r.error()));
  EXPECT_MSG(has(r.error().message, file) && has(r.error().message, "model.layers.0.weight"), "{}", r.error().message);
  REQUIRE_OK(w.comm->barrier());
  if (w.comm->rank() == 0) fs::remove_all(copy);
}

dsd::DictPtr step_state(const World& w, int64_t step) {
  dsd::DictPtr sd = dsd::Dict::make();
  const at::Tensor full = full_tensor(at::kFloat, {64, 16}, step);
  put(*sd, "model.w", placed_value(w, full, {MeshKind::kLine, {P::shard(0)}}));
  put(*sd, "model.b", dsd::Value(full_tensor(at::kFloat, {16}, step + 1)));
  put(*sd, "step", dsd::Value(step));
  return sd;
}

void check_step(const World& w, const dsd::Dict& sd, int64_t step) {
  dsd::DictPtr want = step_state(w, step);
  std::string why;
  EXPECT_MSG(dsd::deep_equal(sd, *want, &why), "state of step {}: {}", step, why);
}

dsd::DictPtr blank_step(const World& w) {
  dsd::DictPtr sd = step_state(w, 0);
  get(*sd, "model.w")->if_tensor()->tensor.zero_();
  get(*sd, "model.b")->if_tensor()->tensor.zero_();
  put(*sd, "step", dsd::Value(int64_t{-1}));
  return sd;
}

std::vector<std::string> sorted_names(const std::string& dir) {
  std::vector<std::string> out;
  for (const auto& e : fs::directory_iterator(dir)) out.push_back(e.path().filename().string());
  std::sort(out.begin(), out.end());
  return out;
}

void scenario_manager(World& w, const std::string& root) {
  ck::CheckpointManager mgr(root, 2);
  for (int64_t step : {10, 20, 30}) {
    auto info = mgr.save(*w.comm, *step_state(w, step), step);
    EXPECT_MSG(info.ok(), "step {}: {}", step, info.ok() ? "" : error_text(info.error()));
  }
  ck::AsyncCheckpointer saver(w.comm);
  auto fut = REQUIRE_OK(mgr.save_async(saver, *step_state(w, 40), 40));
  dsd::Status st = fut->wait();
  EXPECT_MSG(st.ok(), "async step 40: {}", st.ok() ? "" : error_text(st.error()));
  REQUIRE_OK(w.comm->barrier());
  auto steps = REQUIRE_OK(mgr.complete_steps());
  EXPECT_MSG((steps == std::vector<int64_t>{30, 40}), "retention kept {}", fmt::join(steps, ","));
  auto latest = REQUIRE_OK(ck::read_file(root + "/latest", 100));
  EXPECT_MSG(latest == "step_40\n", "latest is '{}'", latest);
  auto names = sorted_names(root);
  EXPECT_MSG((names == std::vector<std::string>{"latest", "step_30", "step_40"}), "root holds {}", fmt::join(names, ","));
  // A crash during step 50: data files, a temporary manifest, no manifest.
  REQUIRE_OK(w.comm->barrier());
  if (w.comm->rank() == 0) {
    fs::create_directories(root + "/step_50");
    std::ofstream(root + "/step_50/0123456789abcdef-00000-000.safetensors") << "partial";
    fs::copy_file(root + "/step_40/checkpoint.json", root + "/step_50/checkpoint.json.tmp-1-0");
  }
  REQUIRE_OK(w.comm->barrier());
  EXPECT(REQUIRE_OK(mgr.latest_step()) == std::optional<int64_t>(40));
  dsd::DictPtr back = blank_step(w);
  auto got = REQUIRE_OK(mgr.load_latest(*w.comm, *back));
  EXPECT(got == std::optional<int64_t>(40));
  check_step(w, *back, 40);
  // Step 50 saved for real over the wreck: the orphans go, retention keeps 40 and 50.
  ck::SaveOptions over;
  over.overwrite = true;
  auto info = mgr.save(*w.comm, *step_state(w, 50), 50, over);
  EXPECT_MSG(info.ok(), "step 50: {}", info.ok() ? "" : error_text(info.error()));
  REQUIRE_OK(w.comm->barrier());
  steps = REQUIRE_OK(mgr.complete_steps());
  EXPECT_MSG((steps == std::vector<int64_t>{40, 50}), "retention kept {}", fmt::join(steps, ","));
  for (const std::string& n : sorted_names(root + "/step_50")) {
    EXPECT_MSG(!has(n, "0123456789abcdef") && !has(n, ".tmp-"), "orphan {} left in step_50", n);
  }
  // Resume as a restarted job would: a new manager over the same root.
  ck::CheckpointManager again(root, 2);
  back = blank_step(w);
  got = REQUIRE_OK(again.load_latest(*w.comm, *back));
  EXPECT(got == std::optional<int64_t>(50));
  check_step(w, *back, 50);
}

// The crash driver's state: 8 tensors of 8 MiB sharded over the world, plus a replicated one
// and values; A and B differ in every byte pattern.
dsd::DictPtr crash_state(const World& w, const std::string& which) {
  const int64_t base = which == "A" ? 1000 : 2000;
  dsd::DictPtr sd = dsd::Dict::make();
  for (int i = 0; i < 8; ++i) {
    const at::Tensor full = full_tensor(at::kFloat, {2048, 1024}, base + i);
    put(*sd, fmt::format("model.w{}", i), placed_value(w, full, {MeshKind::kLine, {P::shard(0)}}));
  }
  put(*sd, "model.shared", dsd::Value(full_tensor(at::kFloat, {4096}, base + 99)));
  put(*sd, "which", dsd::Value(which));
  return sd;
}

void write_control(const std::string& name, const std::string& text) {
  const char* dir = std::getenv("CKPT_CONTROL_DIR");
  if (dir == nullptr) return;
  const std::string path = fmt::format("{}/{}", dir, name);
  std::ofstream(path + ".tmp") << text;
  fs::rename(path + ".tmp", path);
}

int scenario_crash_save(World& w, const std::string& dir, const std::string& which) {
  dsd::DictPtr sd = crash_state(w, which);
  ck::SaveOptions opt;
  opt.overwrite = true;
  REQUIRE_OK(w.comm->barrier());
  write_control(fmt::format("pid{}", w.comm->rank()), std::to_string(::getpid()));
  write_control(fmt::format("started{}", w.comm->rank()), "");
  auto info = ck::save(*w.comm, *sd, dir, opt);
  write_control(fmt::format("done{}", w.comm->rank()), "");
  if (!info.ok()) {
    std::printf("rank %d: save failed: %s\n", g_rank, error_text(info.error()).c_str());
    std::fflush(stdout);
    return 3;
  }
  std::printf("rank %d: save ok\n", g_rank);
  return 0;
}

void scenario_full_disk(World& w, const std::string& dir, int limited_rank) {
  dsd::DictPtr a = crash_state(w, "A");
  auto info = ck::save(*w.comm, *a, dir);
  EXPECT_MSG(info.ok(), "{}", info.ok() ? "" : error_text(info.error()));
  REQUIRE_OK(w.comm->barrier());
  const auto before = sorted_names(dir);
  dsd::DictPtr b = crash_state(w, "B");
  rlimit old{};
  getrlimit(RLIMIT_FSIZE, &old);
  if (w.comm->rank() == limited_rank) {
    std::signal(SIGXFSZ, SIG_IGN);  // EFBIG instead of a signal
    rlimit lim = old;
    lim.rlim_cur = 1 << 20;  // far below this rank's share
    EXPECT(setrlimit(RLIMIT_FSIZE, &lim) == 0);
  }
  ck::SaveOptions opt;
  opt.overwrite = true;
  auto r = ck::save(*w.comm, *b, dir, opt);
  if (w.comm->rank() == limited_rank) setrlimit(RLIMIT_FSIZE, &old);
  EXPECT(!r.ok());
  if (!r.ok()) {
    EXPECT_MSG(r.error().code == dsd::Code::kNoSpace, "{}", error_text(r.error()));
    EXPECT_MSG(has(r.error().message, ".safetensors"), "{}", r.error().message);
  }
  REQUIRE_OK(w.comm->barrier());
  const auto after = sorted_names(dir);
  EXPECT_MSG(after == before, "the directory held [{}] and now [{}]", fmt::join(before, ","), fmt::join(after, ","));
  // The previous checkpoint loads, bitwise.
  dsd::DictPtr back = crash_state(w, "B");
  auto lr = ck::load(*w.comm, *back, dir);
  EXPECT_MSG(lr.ok(), "{}", lr.ok() ? "" : error_text(lr.error()));
  std::string why;
  EXPECT_MSG(dsd::deep_equal(*back, *a, &why), "after the failed save: {}", why);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: ckpt_ranks SCENARIO DIR [ARG]\n");
    return 2;
  }
  const std::string scenario = argv[1];
  const std::string dir = argv[2];
  const std::string arg = argc > 3 ? argv[3] : "";
  World w = connect();
  int rc = 0;
  if (scenario == "save") scenario_save(w, dir);
  else if (scenario == "load") scenario_load(w, dir, arg.empty() ? "alt" : arg);
  else if (scenario == "async") scenario_async(w, dir);
  else if (scenario == "async_capped") scenario_async_capped(w, dir);
  else if (scenario == "missing_key") scenario_missing_key(w, dir);
  else if (scenario == "corrupt") scenario_corrupt(w, dir);
  else if (scenario == "manager") scenario_manager(w, dir);
  else if (scenario == "full_disk") scenario_full_disk(w, dir, std::atoi(arg.c_str()));
  else if (scenario == "crash_save") return scenario_crash_save(w, dir, arg);
  else {
    std::fprintf(stderr, "unknown scenario '%s'\n", scenario.c_str());
    return 2;
  }
  finish(scenario);
  return g_failures == 0 && rc == 0 ? 0 : 1;
}
