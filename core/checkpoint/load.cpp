#include "core/checkpoint/load.h"

#include <ATen/ops/empty.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <deque>
#include <cstring>
#include <memory>
#include <optional>
#include <mutex>
#include <unordered_map>
#include <unordered_set>

#include "core/base/format.h"
#include "core/base/torch_call.h"
#include "core/checkpoint/chunk_hash.h"
#include "core/checkpoint/io.h"
#include "core/checkpoint/pool.h"
#include "core/checkpoint/source.h"
#include "core/checkpoint/value_json.h"
#include "core/formats/zip_check.h"
#include "core/dist/layout.h"
#include "core/statedict/flatten.h"
#include "core/tensor/dtype_torch.h"

namespace dsd::checkpoint {
namespace {

// Upper bound of one read work unit (several blocks), so big chunks are read in parallel.
constexpr uint64_t kUnitBytes = 64u << 20;
// Bytes read then hashed in one step: small enough to stay in the core's cache between the
// two, large enough that the syscalls cost nothing.
constexpr uint64_t kStepBytes = 1u << 20;
constexpr uint64_t kMaxManifestBytes = 1u << 30;

// A contiguous byte run of a saved chunk and where it lands.
struct Run {
  uint64_t src;  // byte offset inside the saved chunk
  uint64_t len;
  char* dst;
};

struct ChunkRead {
  const Entry* entry;
  const ChunkRecord* chunk;
  std::vector<Run> runs;  // sorted by src, disjoint
  // The whole saved chunk, already in memory (a DCP chunk that cannot be read raw): the runs
  // are copied from it instead of read from the file.
  at::Tensor memory;
};

struct Unit {
  size_t read;
  uint64_t first_block;
  uint64_t end_block;
};

// Where a local chunk is read to: the tensor itself, or a contiguous CPU staging tensor that
// is copied into it afterwards (GPU, strided or conjugated destinations).
struct Target {
  std::string key;
  at::Tensor tensor;
  at::Tensor staging;  // undefined when reading straight into `tensor`
  Chunk local;
  char* base = nullptr;
};

int64_t prod(const std::vector<int64_t>& v, size_t from) {
  int64_t n = 1;
  for (size_t i = from; i < v.size(); ++i) n *= v[i];
  return n;
}

// DCP's create_read_items_for_chunk_list for one (saved, local) pair, as byte runs.
void add_runs(const ChunkRecord& saved, const Chunk& local, char* base, uint64_t esize,
              std::vector<Run>& runs) {
  const size_t n = saved.sizes.size();
  if (n == 0) {
    runs.push_back({0, esize, base});
    return;
  }
  std::vector<int64_t> len(n), s_off(n), d_off(n);
  for (size_t d = 0; d < n; ++d) {
    const int64_t start = std::max(saved.offsets[d], local.offsets[d]);
    const int64_t end = std::min(saved.offsets[d] + saved.sizes[d], local.offsets[d] + local.sizes[d]);
    if (end <= start) return;
    len[d] = end - start;
    s_off[d] = start - saved.offsets[d];
    d_off[d] = start - local.offsets[d];
  }
  size_t k = n - 1;
  while (k > 0 && len[k] == saved.sizes[k] && len[k] == local.sizes[k]) --k;
  const uint64_t run_bytes = static_cast<uint64_t>(len[k] * prod(saved.sizes, k + 1)) * esize;
  std::vector<int64_t> idx(k, 0);
  while (true) {
    int64_t src = s_off[k] * prod(saved.sizes, k + 1);
    int64_t dst = d_off[k] * prod(local.sizes, k + 1);
    for (size_t d = 0; d < k; ++d) {
      src += (s_off[d] + idx[d]) * prod(saved.sizes, d + 1);
      dst += (d_off[d] + idx[d]) * prod(local.sizes, d + 1);
    }
    runs.push_back({static_cast<uint64_t>(src) * esize, run_bytes, base + static_cast<uint64_t>(dst) * esize});
    size_t d = k;
    while (d > 0) {
      --d;
      if (++idx[d] < len[d]) break;
      idx[d] = 0;
      if (d == 0) return;
    }
    if (k == 0) return;
  }
}

Error checksum_error(const ChunkRead& r, uint64_t from, uint64_t to) {
  return make_error_at(Code::kCorrupt, r.chunk->file,
                       "checksum mismatch in data file '{}' for key '{}' (bytes [{}, {}) of chunk {}): "
                       "the checkpoint is corrupt",
                       r.chunk->file, r.entry->key, r.chunk->begin + from, r.chunk->begin + to,
                       Chunk{r.chunk->offsets, r.chunk->sizes}.str());
}

Error with_key(Error e, const std::string& key) {
  e.message = fmt::format("{} (reading '{}')", e.message, key);
  return e;
}

class Reader {
 public:
  Reader(const std::string& dir, uint64_t block_size, bool verify)
      : dir_(dir), block_size_(block_size), verify_(verify) {}

  // Opens (once) the file of a chunk and checks it is not shorter than the manifest says.
  Status open(const std::string& name, uint64_t expected_size) {
    if (files_.count(name)) return ok();
    File f = TRY(open_for_read(join(dir_, name)));
    const uint64_t size = TRY(file_size(f));
    if (size < expected_size) {
      return make_error_at(Code::kCorrupt, name, "data file '{}' is truncated: {} bytes, {} expected",
                           name, size, expected_size);
    }
    files_.emplace(name, std::move(f));
    return ok();
  }

  void add(ChunkRead r) {
    if (r.runs.empty()) return;
    std::sort(r.runs.begin(), r.runs.end(), [](const Run& a, const Run& b) { return a.src < b.src; });
    reads_.push_back(std::move(r));
  }

  // Keeps a chunk record made during planning (a DCP chunk's located raw range) alive for
  // the reads that point at it.
  const ChunkRecord* keep(ChunkRecord r) { return &kept_.emplace_back(std::move(r)); }

  Status run(int threads, uint64_t& bytes_read) {
    std::vector<Unit> units;
    const uint64_t blocks_per_unit = std::max<uint64_t>(1, kUnitBytes / block_size_);
    for (size_t i = 0; i < reads_.size(); ++i) {
      const ChunkRead& r = reads_[i];
      if (r.memory.defined()) {
        units.push_back({i, 0, 1});
        continue;
      }
      const uint64_t first = r.runs.front().src / block_size_;
      const Run& last = r.runs.back();
      const uint64_t end = (last.src + last.len + block_size_ - 1) / block_size_;
      for (uint64_t b = first; b < end; b += blocks_per_unit) {
        units.push_back({i, b, std::min(end, b + blocks_per_unit)});
      }
    }
    std::atomic<uint64_t> total{0};
    Status s = parallel_for(units.size(), threads, [&](size_t i) -> Status {
      thread_local std::unique_ptr<char[]> bounce;
      if (!bounce) bounce.reset(new char[kStepBytes]);
      uint64_t n = 0;
      const ChunkRead& r = reads_[units[i].read];
      Status st = read_unit(r, units[i], bounce.get(), n);
      total += n;
      if (!st.ok()) return with_key(std::move(st).error(), r.entry->key);
      return st;
    });
    bytes_read += total;
    return s;
  }

 private:
  // Reads the blocks of a unit that hold needed bytes, in steps small enough that each is
  // hashed while it is still in the core's cache: a step inside one run is read straight
  // into the destination, any other through the bounce buffer, whose needed parts are then
  // copied out. A whole block is always read (and verified), even when only part is needed.
  Status read_unit(const ChunkRead& r, const Unit& u, char* bounce, uint64_t& bytes) const {
    if (r.memory.defined()) {
      const char* src = static_cast<const char*>(r.memory.const_data_ptr());
      for (const Run& run : r.runs) std::memcpy(run.dst, src + run.src, run.len);
      return ok();
    }
    const File& f = files_.at(r.chunk->file);
    const uint64_t chunk_len = r.chunk->nbytes();
    auto run_it = std::upper_bound(r.runs.begin(), r.runs.end(), u.first_block * block_size_,
                                   [](uint64_t v, const Run& run) { return v < run.src + run.len; });
    XXH3_state_t state;
    for (uint64_t b = u.first_block; b < u.end_block; ++b) {
      const uint64_t bstart = b * block_size_;
      const uint64_t bend = std::min(bstart + block_size_, chunk_len);
      while (run_it != r.runs.end() && run_it->src + run_it->len <= bstart) ++run_it;
      if (run_it == r.runs.end()) return ok();
      if (run_it->src >= bend) continue;  // no byte of this block is needed
      if (verify_) XXH3_64bits_reset(&state);
      auto it = run_it;
      for (uint64_t ps = bstart; ps < bend; ps += kStepBytes) {
        const uint64_t pe = std::min(ps + kStepBytes, bend);
        while (it != r.runs.end() && it->src + it->len <= ps) ++it;
        const char* data;
        if (it != r.runs.end() && it->src <= ps && it->src + it->len >= pe) {
          char* dst = it->dst + (ps - it->src);
          TRY(pread_all(f, dst, pe - ps, r.chunk->begin + ps));
          data = dst;
        } else {
          TRY(pread_all(f, bounce, pe - ps, r.chunk->begin + ps));
          for (auto k = it; k != r.runs.end() && k->src < pe; ++k) {
            const uint64_t from = std::max(k->src, ps);
            const uint64_t to = std::min(k->src + k->len, pe);
            std::memcpy(k->dst + (from - k->src), bounce + (from - ps), to - from);
          }
          data = bounce;
        }
        if (verify_) XXH3_64bits_update(&state, data, pe - ps);
        bytes += pe - ps;
      }
      if (verify_ && (b >= r.chunk->blocks.size() || XXH3_64bits_digest(&state) != r.chunk->blocks[b])) {
        return checksum_error(r, bstart, bend);
      }
    }
    return ok();
  }

  std::string dir_;
  uint64_t block_size_;
  bool verify_;
  std::unordered_map<std::string, File> files_;
  std::vector<ChunkRead> reads_;
  std::deque<ChunkRecord> kept_;
};

bool chunks_intersect(const ChunkRecord& saved, const Chunk& local) {
  for (size_t d = 0; d < saved.sizes.size(); ++d) {
    if (std::max(saved.offsets[d], local.offsets[d]) >=
        std::min(saved.offsets[d] + saved.sizes[d], local.offsets[d] + local.sizes[d])) {
      return false;
    }
  }
  return true;
}

// A saved chunk some local target overlaps.
struct Need {
  const Entry* entry;
  const ChunkRecord* chunk;
  const Target* target;
};

void collect_needs(const Entry& e, const Target& t, std::vector<Need>& needs) {
  if (t.local.numel() == 0) return;
  for (const ChunkRecord& c : e.chunks) {
    if (Chunk{c.offsets, c.sizes}.numel() == 0 || !chunks_intersect(c, t.local)) continue;
    needs.push_back({&e, &c, &t});
  }
}

// Turns the needed chunks into reads: dsd chunks as they are; DCP chunks once located inside
// their torch.save archives (in parallel: each one opens its archive).
Status add_reads(const Source& src, const std::vector<Need>& needs, int threads, Reader& reader) {
  std::vector<LocatedChunk> located(src.is_dsd() ? 0 : needs.size());
  if (!src.is_dsd()) {
    TRY(parallel_for(needs.size(), threads, [&](size_t i) -> Status {
      located[i] = TRY(locate_dcp_chunk(src, *needs[i].entry, *needs[i].chunk));
      return ok();
    }));
  }
  std::unordered_map<std::string_view, uint64_t> file_sizes;
  for (const FileRecord& f : src.manifest.files) file_sizes[f.name] = f.size;
  for (size_t i = 0; i < needs.size(); ++i) {
    const Need& n = needs[i];
    const uint64_t esize = element_size(n.entry->dtype);
    ChunkRead r{n.entry, n.chunk, {}, {}};
    if (!src.is_dsd()) {
      ChunkRecord raw = *n.chunk;
      raw.begin = located[i].begin;
      raw.end = located[i].end;
      r.chunk = reader.keep(std::move(raw));
      r.memory = std::move(located[i].tensor);
    }
    if (!r.memory.defined()) TRY(reader.open(r.chunk->file, file_sizes[r.chunk->file]));
    add_runs(*r.chunk, n.target->local, n.target->base, esize, r.runs);
    reader.add(std::move(r));
  }
  return ok();
}

std::string shape_str(const std::vector<int64_t>& s) { return fmt::format("[{}]", fmt::join(s, ", ")); }

// Checks a state-dict tensor against its saved entry and prepares where it is read to.
Result<Target> make_target(const std::string& key, const TensorValue& tv, const Entry& e) {
  if (e.kind != Entry::Kind::kTensor) {
    return make_error_at(Code::kWrongKind, key,
                         "'{}' is a tensor in the state dict but a non-tensor value in the checkpoint", key);
  }
  const DType dtype = TRY(dtype_from_scalar_type(tv.tensor.scalar_type()));
  if (dtype != e.dtype) {
    return make_error_at(Code::kDtypeMismatch, key, "dtype mismatch between saved {} and current {} for '{}'",
                         dtype_name(e.dtype), dtype_name(dtype), key);
  }
  const std::vector<int64_t> local(tv.tensor.sizes().begin(), tv.tensor.sizes().end());
  Target t;
  t.key = key;
  t.tensor = tv.tensor;
  if (tv.layout) {
    if (tv.layout->global_shape() != e.shape) {
      return make_error_at(Code::kShapeMismatch, key, "Size mismatch between saved {} and current: {} for '{}'",
                           shape_str(e.shape), shape_str(tv.layout->global_shape()), key);
    }
    t.local = tv.layout->local_chunk();
    if (t.local.offsets.size() != e.shape.size()) {
      t.local = Chunk{std::vector<int64_t>(e.shape.size(), 0), std::vector<int64_t>(e.shape.size(), 0)};
      return t;  // this rank is not in the mesh: nothing to read
    }
    if (t.local.sizes != local) {
      return make_error_at(Code::kShapeMismatch, key,
                           "the local tensor of '{}' has shape {} but its layout gives this rank {}", key,
                           shape_str(local), shape_str(t.local.sizes));
    }
  } else {
    if (local != e.shape) {
      return make_error_at(Code::kShapeMismatch, key, "Size mismatch between saved {} and current: {} for '{}'",
                           shape_str(e.shape), shape_str(local), key);
    }
    t.local = Chunk{std::vector<int64_t>(local.size(), 0), local};
  }
  if (tv.read_only && t.local.numel() > 0) {
    return make_error_at(Code::kReadOnly, key, "'{}' was imported read-only and cannot be loaded into", key);
  }
  const at::Tensor& x = tv.tensor;
  const bool direct = x.device().is_cpu() && x.is_contiguous() && !x.is_conj() && !x.is_neg();
  if (direct) {
    t.base = static_cast<char*>(x.data_ptr());
  } else {
    t.staging = TRY(torch_call(Code::kOutOfMemory, fmt::format("allocating a host buffer for '{}'", key),
                               [&] { return at::empty(x.sizes(), at::TensorOptions().dtype(x.dtype())); }));
    t.base = static_cast<char*>(t.staging.data_ptr());
  }
  return t;
}

Status finish_targets(std::vector<Target>& targets) {
  for (Target& t : targets) {
    if (!t.staging.defined()) continue;
    TRY(torch_call(Code::kDevice, fmt::format("copying the loaded '{}' into place", t.key),
                   [&] { t.tensor.copy_(t.staging); }));
  }
  return ok();
}

std::unordered_map<std::string_view, const Entry*> index_entries(const Manifest& m) {
  std::unordered_map<std::string_view, const Entry*> out;
  for (const Entry& e : m.entries) out.emplace(e.key, &e);
  return out;
}

Path to_path(const std::vector<PathItem>& items) {
  Path p;
  for (const PathItem& i : items) {
    if (const auto* s = std::get_if<std::string>(&i)) p.push_back(PathSegment::key(*s));
    else p.push_back(PathSegment::index(std::get<int64_t>(i)));
  }
  return p;
}

struct LoadPlan {
  std::vector<Target> targets;
  std::vector<std::pair<Path, Value>> values;
};

Result<LoadPlan> plan_load(const Source& src, Dict& sd, const std::string& path,
                           const LoadOptions& opt, Reader& reader, LoadReport& report) {
  const Manifest& m = src.manifest;
  FlatStateDict flat = TRY(flatten_state_dict(sd, FlattenStyle::kCheckpoint));
  auto entries = index_entries(m);
  std::unordered_set<std::string_view> seen;
  LoadPlan plan;
  for (size_t i = 0; i < flat.flat->size(); ++i) {
    const std::string& key = flat.flat->key_at(i);
    const Value& v = flat.flat->value_at(i);
    auto it = entries.find(key);
    if (it == entries.end()) {
      if (opt.strict) {
        return make_error_at(Code::kNotFound, key, "Missing key in checkpoint state_dict: {} (checkpoint '{}')",
                             key, path);
      }
      report.missing_keys.push_back(key);
      report.skipped_keys.push_back(key);
      continue;
    }
    seen.insert(it->first);
    const Entry& e = *it->second;
    if (const TensorValue* tv = v.if_tensor()) {
      plan.targets.push_back(TRY(make_target(key, *tv, e)));
      continue;
    }
    if (e.kind != Entry::Kind::kValue) {
      return make_error_at(Code::kWrongKind, key,
                           "'{}' is a {} in the state dict but a tensor in the checkpoint", key,
                           kind_name(v.kind()));
    }
    plan.values.emplace_back(flat.mapping[i].second, TRY(read_source_value(src, e)));
  }
  for (const Entry& e : m.entries) {
    if (!seen.count(e.key)) report.unexpected_keys.push_back(e.key);
  }
  std::vector<Need> needs;
  for (const Target& t : plan.targets) collect_needs(*entries.at(t.key), t, needs);
  TRY(add_reads(src, needs, default_threads(opt.thread_count, 8), reader));
  return plan;
}

// A new full CPU tensor for a saved entry, read straight into.
Result<Target> full_target(const Entry& e) {
  Target tg;
  tg.key = e.key;
  tg.tensor = TRY(torch_call(Code::kOutOfMemory, fmt::format("allocating '{}'", e.key), [&] {
    return at::empty(e.shape, at::TensorOptions().dtype(to_scalar_type(e.dtype)));
  }));
  tg.local = Chunk{std::vector<int64_t>(e.shape.size(), 0), e.shape};
  tg.base = static_cast<char*>(tg.tensor.data_ptr());
  return tg;
}

}  // namespace

Result<at::Tensor> read_full_tensor(const Source& source, const Entry& entry, const LoadOptions& options) {
  if (entry.kind != Entry::Kind::kTensor) {
    return make_error_at(Code::kWrongKind, entry.key, "'{}' is a non-tensor value, not a tensor", entry.key);
  }
  Reader reader(source.dir, source.manifest.block_size, options.verify && source.is_dsd());
  const Target tg = TRY(full_target(entry));
  std::vector<Need> needs;
  collect_needs(entry, tg, needs);
  const int threads = default_threads(options.thread_count, 8);
  TRY(add_reads(source, needs, threads, reader));
  uint64_t bytes = 0;
  TRY(reader.run(threads, bytes));
  return tg.tensor;
}

Result<Manifest> read_manifest(const std::string& path) {
  const std::string file = join(path, kManifestName);
  if (!path_exists(file)) {
    return make_error_at(Code::kNotFound, path, "no checkpoint at '{}' (no {})", path, kManifestName);
  }
  const std::string text = TRY(read_file(file, kMaxManifestBytes));
  return parse_manifest(text, file);
}

Result<LoadReport> load(Communicator& comm, Dict& state_dict, const std::string& path,
                        const LoadOptions& options) {
  LoadReport report;
  auto source = open_source(path);
  TRY(agree(comm, source.ok() ? ok() : Status(source.error())));
  Reader reader(path, source->manifest.block_size, options.verify && source->is_dsd());
  auto plan = plan_load(*source, state_dict, path, options, reader, report);
  TRY(agree(comm, plan.ok() ? ok() : Status(plan.error())));
  Status st = reader.run(default_threads(options.thread_count, 8), report.bytes_read);
  if (st.ok()) st = finish_targets(plan->targets);
  TRY(agree(comm, std::move(st)));
  for (auto& [p, v] : plan->values) TRY(set_element(state_dict, p, std::move(v)));
  return report;
}

Result<DictPtr> load_full(const std::string& path, std::span<const std::string> keys,
                          const LoadOptions& options) {
  const Source src = TRY(open_source(path));
  const Manifest& m = src.manifest;
  std::unordered_set<std::string_view> wanted(keys.begin(), keys.end());
  std::unordered_set<std::string_view> matched;
  auto include = [&](const Entry& e) {
    if (wanted.empty()) return true;
    bool any = false;
    if (wanted.count(e.key)) {
      matched.insert(e.key);
      any = true;
    }
    std::string prefix;
    for (const PathItem& p : e.path) {
      if (!prefix.empty()) prefix += '.';
      prefix += std::holds_alternative<std::string>(p) ? std::get<std::string>(p) : std::to_string(std::get<int64_t>(p));
      if (auto w = wanted.find(prefix); w != wanted.end()) {
        matched.insert(*w);
        any = true;
      }
    }
    return any;
  };
  Reader reader(path, m.block_size, options.verify && src.is_dsd());
  DictPtr out = Dict::make();
  std::deque<Target> targets;
  std::vector<Need> needs;
  for (const Entry& e : m.entries) {
    if (!include(e)) continue;
    const Path p = to_path(e.path);
    if (e.kind == Entry::Kind::kValue) {
      TRY(set_element(*out, p, TRY(read_source_value(src, e))));
      continue;
    }
    Target& tg = targets.emplace_back(TRY(full_target(e)));
    collect_needs(e, tg, needs);
    TRY(set_element(*out, p, Value(tg.tensor)));
  }
  for (const std::string& k : keys) {
    if (!matched.count(k)) {
      return make_error_at(Code::kNotFound, k, "key '{}' matches nothing in checkpoint '{}'", k, path);
    }
  }
  const int threads = default_threads(options.thread_count, 8);
  TRY(add_reads(src, needs, threads, reader));
  uint64_t bytes = 0;
  TRY(reader.run(threads, bytes));
  for (const auto& items : m.int_key_dicts) {
    Dict* d = out.get();
    if (!items.empty()) {
      const Value* v = get_element(*out, to_path(items));
      d = v ? v->if_dict() : nullptr;
    }
    if (d == nullptr) continue;  // not selected by `keys`
    bool all_int = true;
    for (const auto& e : *d) all_int = all_int && is_int_key(e.key);
    if (all_int) d->set_int_keys(true);
  }
  return out;
}

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
      if (!v.ok()) report(info.relative_path, *e, v.error().message);
      else check_item_crcs(join(src.dir, info.relative_path), info.relative_path, static_cast<uint64_t>(info.offset),
                           static_cast<uint64_t>(info.length), *e, fmt::format("value '{}'", e->key), report);
      return ok();
    }
    auto located = locate_dcp_chunk(src, *e, *c);
    if (!located.ok()) {
      report(c->file, *e, located.error().message);
      return ok();
    }
    check_item_crcs(join(src.dir, c->file), c->file, c->begin, c->nbytes(), *e,
                    fmt::format("chunk {} of '{}'", Chunk{c->offsets, c->sizes}.str(), e->key), report);
    return ok();
  }));
  return problems;
}

}  // namespace

Result<std::vector<VerifyProblem>> verify(const std::string& path, int thread_count,
                                          const std::function<void(uint64_t, uint64_t)>& progress) {
  const Source src = TRY(open_source(path));
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
    auto f = open_for_read(join(path, c->file));
    if (!f.ok()) {
      report(*e, *c, f.error().message);
      return ok();
    }
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
