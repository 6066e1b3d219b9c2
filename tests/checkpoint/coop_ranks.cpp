// Cooperative load scenarios over Gloo (core/checkpoint/cooperative_load.h), run under dsdrun
// (one process per rank) by test_cooperative_load.py: `coop_ranks SCENARIO DIR [STATE]`. Every
// rank checks its own results, prints "rank R: SCENARIO ok" (or each failed check) and exits
// non-zero when a check failed. The communicator timeout is DSD_TEST_TIMEOUT_MS.
//
// States (STATE): "replicated": every rank holds every tensor whole (plain tensors of every
// size class, a Replicate DTensor, 0-d, bool, empty); "mixed": the same plus Shard(0) and
// Shard(1) DTensors, a tensor saved replicated and loaded sharded and one saved sharded and
// loaded whole, each loaded into another layout than it was saved with.
//
// Scenarios:
//   save DIR STATE [dcp]  saves STATE at this world size (block size 4096), as a dsd
//                    checkpoint or in PyTorch DCP's format
//   load DIR STATE   loads DIR at this world size twice, cooperative off then on (256 KiB
//                    buckets, so big tensors travel in several pieces): both bitwise equal to
//                    the reference and to each other; the bytes read from storage over all
//                    ranks are world x (off) and 1 x (on) the bytes every rank loads whole,
//                    exactly, and <= 1.1 x the data bytes when STATE is replicated
//   corrupt DIR      (replicated) a byte of a shared chunk that the last rank reads for all is
//                    flipped in a copy: kCorrupt naming the file and key on every rank,
//                    reported by that rank (rank 0 when cooperative is off: all read it)
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <fmt/format.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "core/checkpoint/cooperative_load.h"
#include "core/checkpoint/load.h"
#include "core/checkpoint/save.h"
#include "core/checkpoint/source.h"
#include "core/dist/comm.h"
#include "core/dist/layout.h"
#include "core/dist/mesh.h"
#include "core/dist/rendezvous.h"

namespace ck = dsd::checkpoint;
namespace fs = std::filesystem;

namespace {

int g_rank = -1;
int g_failures = 0;

#define EXPECT_MSG(cond, ...)                                                                       \
  do {                                                                                             \
    if (!(cond)) {                                                                                 \
      std::fprintf(stderr, "rank %d: %s:%d: CHECK failed: %s: %s\n", g_rank, __FILE__, __LINE__, #cond, \
                   fmt::format(__VA_ARGS__).c_str());                                              \
      g_failures++;                                                                                \
    }                                                                                              \
  } while (0)

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

std::string error_text(const dsd::Error& e) { return fmt::format("{}: {}", dsd::code_name(e.code), e.message); }
bool has(const std::string& s, const std::string& needle) { return s.find(needle) != std::string::npos; }

using P = dsd::Placement;

enum class Where { kPlain, kReplicate, kShard0, kShard1 };

struct Spec {
  std::string key;
  at::ScalarType dtype;
  std::vector<int64_t> shape;
  Where saved;
  Where loaded;
  bool transposed = false;  // loaded into a non-contiguous view (the staging path)
};

std::vector<Spec> specs(const std::string& state) {
  std::vector<Spec> s = {
      {"model.embed", at::kFloat, {600, 256}, Where::kPlain, Where::kPlain},          // 600 KiB: 3 pieces
      {"model.big", at::kFloat, {1024, 512}, Where::kPlain, Where::kReplicate},       // 2 MiB: 8 pieces
      {"model.big_t", at::kFloat, {512, 300}, Where::kPlain, Where::kPlain, true},    // pieces, staged
      {"model.rep_dt", at::kFloat, {40, 30}, Where::kReplicate, Where::kReplicate},
      {"model.w0", at::kFloat, {64, 64}, Where::kPlain, Where::kPlain, true},
      {"model.w1", at::kBFloat16, {7, 5}, Where::kPlain, Where::kPlain},
      {"model.w2", at::kDouble, {33, 17}, Where::kPlain, Where::kReplicate},
      {"buffers.count", at::kLong, {17}, Where::kPlain, Where::kPlain},
      {"buffers.mask", at::kBool, {33}, Where::kPlain, Where::kPlain},
      {"buffers.scalar", at::kFloat, {}, Where::kPlain, Where::kPlain},
      {"buffers.empty", at::kFloat, {0, 4}, Where::kPlain, Where::kPlain},
  };
  for (int i = 0; i < 24; ++i) s.push_back({fmt::format("model.small.{}", i), at::kFloat, {16, 9 + i}, Where::kPlain, Where::kPlain});
  if (state == "mixed") {
    s.push_back({"model.shard0", at::kFloat, {90, 70}, Where::kShard0, Where::kShard1});
    s.push_back({"model.shard1", at::kDouble, {30, 50}, Where::kShard1, Where::kShard0});
    s.push_back({"model.rep_as_shard", at::kFloat, {64, 48}, Where::kPlain, Where::kShard0});
    s.push_back({"model.shard_as_rep", at::kFloat, {500, 130}, Where::kShard0, Where::kPlain});
  }
  return s;
}

int64_t seed_of(const std::string& key) {
  int64_t h = 7;
  for (char c : key) h = (h * 31 + c) % 100003;
  return h;
}

// Full tensor bytes from a pattern of the key (bool bytes 0 or 1), so bitwise checks cover
// every dtype.
at::Tensor full_tensor(const Spec& s) {
  int64_t n = 1;
  for (int64_t d : s.shape) n *= d;
  if (n == 0) return at::empty(s.shape, at::TensorOptions().dtype(s.dtype));
  const int64_t nbytes = n * static_cast<int64_t>(c10::elementSize(s.dtype));
  const int64_t modulus = s.dtype == at::kBool ? 2 : 251;
  at::Tensor period = at::arange(251, at::kLong).mul(131).add(seed_of(s.key) * 977).remainder(modulus).to(at::kByte);
  return period.repeat({(nbytes + 250) / 251}).narrow(0, 0, nbytes).view(s.dtype).reshape(s.shape).clone();
}

struct World {
  std::shared_ptr<dsd::Communicator> comm;
  std::shared_ptr<const dsd::DeviceMesh> line;
};

std::chrono::milliseconds test_timeout() {
  const char* v = std::getenv("DSD_TEST_TIMEOUT_MS");
  return std::chrono::milliseconds(v ? std::atoll(v) : 20000);
}

World connect() {
  World w;
  auto comm = dsd::communicator_from_env({test_timeout()});
  if (!comm.ok()) {
    std::fprintf(stderr, "rendezvous failed: %s\n", comm.error().message.c_str());
    std::exit(2);
  }
  w.comm = *comm;
  g_rank = w.comm->rank();
  w.line = REQUIRE_OK(dsd::DeviceMesh::make(w.comm, {w.comm->size()}, {}, c10::DeviceType::CPU));
  return w;
}

at::Tensor cut(const at::Tensor& full, const dsd::Chunk& c) {
  at::Tensor t = full;
  for (size_t d = 0; d < c.sizes.size(); ++d) t = t.narrow(static_cast<int64_t>(d), c.offsets[d], c.sizes[d]);
  return t.contiguous().clone();
}

std::shared_ptr<const dsd::Layout> layout_for(const World& w, const Spec& s, Where where) {
  if (where == Where::kPlain) return nullptr;
  const P p = where == Where::kReplicate ? P::replicate() : P::shard(where == Where::kShard0 ? 0 : 1);
  return REQUIRE_OK(dsd::Layout::on_mesh(s.shape, w.line, {p}));
}

dsd::Chunk local_chunk(const Spec& s, const std::shared_ptr<const dsd::Layout>& layout) {
  return layout ? layout->local_chunk() : dsd::Chunk{std::vector<int64_t>(s.shape.size(), 0), s.shape};
}

// The state as saved (`blank` false), or zeroed destinations of the loaded layouts.
dsd::DictPtr make_state(const World& w, const std::string& state, bool blank) {
  dsd::DictPtr sd = dsd::Dict::make();
  dsd::DictPtr model = dsd::Dict::make();
  dsd::DictPtr small = dsd::Dict::make();
  dsd::DictPtr buffers = dsd::Dict::make();
  model->set("small", dsd::Value(small));
  for (const Spec& s : specs(state)) {
    auto layout = layout_for(w, s, blank ? s.loaded : s.saved);
    at::Tensor t = cut(full_tensor(s), local_chunk(s, layout));
    if (blank) {
      if (s.transposed && t.dim() == 2) {
        t = at::zeros({t.size(1), t.size(0)}, at::TensorOptions().dtype(s.dtype)).t();
      } else {
        t = at::zeros(t.sizes(), at::TensorOptions().dtype(s.dtype));
      }
    }
    dsd::Value v = layout ? dsd::Value(dsd::TensorValue{t, layout, false}) : dsd::Value(t);
    const std::string leaf = s.key.substr(s.key.rfind('.') + 1);
    if (s.key.rfind("model.small.", 0) == 0) small->set(leaf, v);
    else if (s.key.rfind("model.", 0) == 0) model->set(leaf, v);
    else buffers->set(leaf, v);
  }
  sd->set("model", dsd::Value(model));
  sd->set("buffers", dsd::Value(buffers));
  sd->set("step", dsd::Value(int64_t{blank ? -1 : 1234}));
  return sd;
}

const dsd::TensorValue* find_tensor(const dsd::Dict& sd, const std::string& key) {
  const dsd::Dict* d = &sd;
  size_t start = 0;
  while (true) {
    const size_t dot = key.find('.', start);
    const dsd::Value* v = d->find(key.substr(start, dot == std::string::npos ? std::string::npos : dot - start));
    if (v == nullptr) return nullptr;
    if (dot == std::string::npos) return v->if_tensor();
    d = v->if_dict();
    if (d == nullptr) return nullptr;
    start = dot + 1;
  }
}

void check_state(const World& w, const dsd::Dict& sd, const std::string& state, const std::string& what) {
  for (const Spec& s : specs(state)) {
    const dsd::TensorValue* tv = find_tensor(sd, s.key);
    EXPECT_MSG(tv != nullptr, "{}: {} missing", what, s.key);
    if (tv == nullptr) continue;
    const at::Tensor want = cut(full_tensor(s), local_chunk(s, layout_for(w, s, s.loaded)));
    EXPECT_MSG(dsd::tensor_bitwise_equal(tv->tensor.contiguous(), want), "{}: {} differs from the saved tensor", what,
               s.key);
  }
  const dsd::Value* step = sd.find("step");
  EXPECT_MSG(step && step->if_int() && *step->if_int() == 1234, "{}: step not restored", what);
}

uint64_t chunk_bytes(const Spec& s, const ck::ChunkRecord& c) {
  uint64_t n = c10::elementSize(s.dtype);
  for (int64_t d : c.sizes) n *= static_cast<uint64_t>(d);
  return n;  // a DCP chunk's byte range is its whole torch.save item, more than its data
}

// Data bytes of the tensors every rank loads whole, and of all tensors, from the manifest.
std::pair<uint64_t, uint64_t> data_bytes(const ck::Manifest& m, const std::string& state) {
  uint64_t whole = 0, all = 0;
  for (const Spec& s : specs(state)) {
    const ck::Entry* e = m.find(s.key);
    if (e == nullptr) continue;
    for (const ck::ChunkRecord& c : e->chunks) {
      all += chunk_bytes(s, c);
      if (s.loaded == Where::kPlain || s.loaded == Where::kReplicate) whole += chunk_bytes(s, c);
    }
  }
  return {whole, all};
}

std::vector<uint64_t> gather_u64(dsd::Communicator& comm, uint64_t mine) {
  at::Tensor in = at::empty({1}, at::kLong);
  in.data_ptr<int64_t>()[0] = static_cast<int64_t>(mine);
  at::Tensor out = at::empty({comm.size()}, at::kLong);
  REQUIRE_OK(comm.all_gather(out, in));
  std::vector<uint64_t> v;
  for (int r = 0; r < comm.size(); ++r) v.push_back(static_cast<uint64_t>(out.data_ptr<int64_t>()[r]));
  return v;
}

uint64_t sum(const std::vector<uint64_t>& v) {
  uint64_t s = 0;
  for (uint64_t x : v) s += x;
  return s;
}

ck::LoadOptions coop_options(bool on) {
  ck::LoadOptions o;
  o.cooperative = on ? ck::LoadOptions::Cooperative::kAlways : ck::LoadOptions::Cooperative::kNever;
  o.cooperative_bucket_bytes = 256u << 10;
  return o;
}

void scenario_save(World& w, const std::string& dir, const std::string& state, bool dcp) {
  ck::SaveOptions opt;
  opt.block_size = 4096;
  if (dcp) opt.format = ck::Format::kDcp;
  auto info = ck::save(*w.comm, *make_state(w, state, false), dir, opt);
  EXPECT_MSG(info.ok(), "{}", info.ok() ? "" : error_text(info.error()));
}

void scenario_load(World& w, const std::string& dir, const std::string& state) {
  const int n = w.comm->size();
  const ck::Source src = REQUIRE_OK(ck::open_source(dir));
  const auto [whole, all] = data_bytes(src.manifest, state);
  const ck::Manifest& m = src.manifest;
  dsd::DictPtr alone = make_state(w, state, true);
  auto ra = ck::load(*w.comm, *alone, dir, coop_options(false));
  EXPECT_MSG(ra.ok(), "{}", ra.ok() ? "" : error_text(ra.error()));
  dsd::DictPtr together = make_state(w, state, true);
  auto rc = ck::load(*w.comm, *together, dir, coop_options(true));
  EXPECT_MSG(rc.ok(), "{}", rc.ok() ? "" : error_text(rc.error()));
  if (!ra.ok() || !rc.ok()) return;
  check_state(w, *alone, state, "non-cooperative load");
  check_state(w, *together, state, "cooperative load");
  std::string why;
  EXPECT_MSG(dsd::deep_equal(*alone, *together, &why), "cooperative and non-cooperative loads differ: {}", why);

  const std::vector<uint64_t> read_alone = gather_u64(*w.comm, ra->bytes_read);
  const std::vector<uint64_t> read_together = gather_u64(*w.comm, rc->bytes_read);
  const uint64_t sum_alone = sum(read_alone), sum_together = sum(read_together);
  // The tensors every rank loads whole are read once in all instead of once per rank; the rest
  // is read as before.
  EXPECT_MSG(sum_together + static_cast<uint64_t>(n - 1) * whole == sum_alone,
             "bytes read: {} cooperative, {} alone, {} per rank in tensors loaded whole by all", sum_together,
             sum_alone, whole);
  if (state == "replicated") {
    EXPECT_MSG(whole == all, "{} of {} data bytes loaded whole", whole, all);
    EXPECT_MSG(static_cast<double>(sum_together) <= 1.1 * static_cast<double>(all),
               "cooperative: the ranks read {} bytes of a checkpoint of {} data bytes", sum_together, all);
    EXPECT_MSG(static_cast<double>(sum_alone) >= 0.9 * n * static_cast<double>(all),
               "non-cooperative: the ranks read {} bytes, {} x {} expected", sum_alone, n, all);
    // Byte-balanced: no rank reads more than its share plus the largest chunk.
    uint64_t largest = 0;
    for (const ck::Entry& e : m.entries) {
      for (const ck::ChunkRecord& c : e.chunks) {
        for (const Spec& s : specs(state)) {
          if (s.key == e.key) largest = std::max(largest, chunk_bytes(s, c));
        }
      }
    }
    for (int r = 0; r < n; ++r) {
      EXPECT_MSG(read_together[r] <= all / n + largest, "rank {} read {} bytes, share {} + largest chunk {}", r,
                 read_together[r], all / n, largest);
    }
  }
  EXPECT_MSG(rc->bytes_received > 0 && ra->bytes_received == 0, "bytes received: {} cooperative, {} alone",
             rc->bytes_received, ra->bytes_received);
  if (w.comm->rank() == 0) {
    std::printf("rank 0: world %d, %llu data bytes (%llu loaded whole by all): read %llu alone, %llu cooperative (ratio %.3f vs %.3f)\n",
                n, static_cast<unsigned long long>(all), static_cast<unsigned long long>(whole),
                static_cast<unsigned long long>(sum_alone), static_cast<unsigned long long>(sum_together),
                static_cast<double>(sum_alone) / static_cast<double>(all),
                static_cast<double>(sum_together) / static_cast<double>(all));
  }
}

void scenario_corrupt(World& w, const std::string& dir) {
  const int n = w.comm->size();
  const std::string copy = dir + "_corrupt";
  std::string picked;  // "file\nkey\nreader"
  if (w.comm->rank() == 0) {
    fs::remove_all(copy);
    fs::copy(dir, copy);
    const ck::Manifest m = REQUIRE_OK(ck::read_manifest(copy));
    // Every rank loads every non-empty tensor of the replicated state whole.
    std::vector<char> shared(m.entries.size(), 0);
    for (size_t i = 0; i < m.entries.size(); ++i) {
      const ck::Entry& e = m.entries[i];
      shared[i] = e.kind == ck::Entry::Kind::kTensor && !e.chunks.empty() && e.chunks[0].nbytes() > 0;
    }
    const ck::CooperativePlan cp = ck::plan_cooperative_reads(m, shared, n, coop_options(true).cooperative_bucket_bytes);
    for (const auto& round : cp.rounds) {
      for (const ck::CooperativeBucket& b : round) {
        if (b.root != n - 1 || !picked.empty()) continue;
        const ck::CooperativePiece& p = b.pieces.back();
        const ck::Entry& e = m.entries[p.entry];
        const ck::ChunkRecord& c = e.chunks[p.chunk];
        std::fstream f(copy + "/" + c.file, std::ios::in | std::ios::out | std::ios::binary);
        const auto at = static_cast<std::streamoff>(c.begin + p.from + p.len / 2);
        f.seekg(at);
        char byte = 0;
        f.read(&byte, 1);
        byte = static_cast<char>(byte ^ 0x5a);
        f.seekp(at);
        f.write(&byte, 1);
        picked = fmt::format("{}\n{}\n{}", c.file, e.key, b.root);
      }
    }
    EXPECT_MSG(!picked.empty(), "rank {} reads no shared chunk", n - 1);
  }
  picked = REQUIRE_OK(dsd::broadcast_bytes(*w.comm, picked, 0));
  const std::string file = picked.substr(0, picked.find('\n'));
  const std::string key = picked.substr(file.size() + 1, picked.rfind('\n') - file.size() - 1);
  const std::string reader = picked.substr(picked.rfind('\n') + 1);
  for (bool coop : {true, false}) {
    dsd::DictPtr sd = make_state(w, "replicated", true);
    auto r = ck::load(*w.comm, *sd, copy, coop_options(coop));
    EXPECT_MSG(!r.ok(), "a corrupt checkpoint loaded (cooperative {})", coop);
    if (r.ok()) continue;
    const std::string& msg = r.error().message;
    EXPECT_MSG(r.error().code == dsd::Code::kCorrupt, "{}", error_text(r.error()));
    EXPECT_MSG(has(msg, file) && has(msg, key), "the error names neither '{}' nor '{}': {}", file, key, msg);
    // Cooperative: only the chunk's reader saw the bad bytes, and every rank reports its error.
    const std::string by = coop ? reader : "0";
    EXPECT_MSG(msg.rfind("rank " + by + ": ", 0) == 0, "cooperative {}: expected rank {}'s error, got: {}", coop, by,
               msg);
  }
  REQUIRE_OK(w.comm->barrier());
  if (w.comm->rank() == 0) fs::remove_all(copy);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: coop_ranks SCENARIO DIR [STATE]\n");
    return 2;
  }
  const std::string scenario = argv[1];
  const std::string dir = argv[2];
  const std::string state = argc > 3 ? argv[3] : "replicated";
  World w = connect();
  if (scenario == "save") scenario_save(w, dir, state, argc > 4 && std::string(argv[4]) == "dcp");
  else if (scenario == "load") scenario_load(w, dir, state);
  else if (scenario == "corrupt") scenario_corrupt(w, dir);
  else {
    std::fprintf(stderr, "unknown scenario '%s'\n", scenario.c_str());
    return 2;
  }
  if (g_failures == 0) std::printf("rank %d: %s ok\n", g_rank, scenario.c_str());
  std::fflush(stdout);
  std::fflush(stderr);
  return g_failures == 0 ? 0 : 1;
}
