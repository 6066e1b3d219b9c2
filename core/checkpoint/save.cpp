#include "core/checkpoint/save.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <fmt/ranges.h>

#include <atomic>
#include <map>
#include <mutex>
#include <random>
#include <set>
#include <thread>
#include <unordered_map>

#include "core/base/format.h"
#include "core/base/torch_call.h"
#include "core/checkpoint/chunk_hash.h"
#include "core/checkpoint/crash_point.h"
#include "core/checkpoint/io.h"
#include "core/checkpoint/planner.h"
#include "core/checkpoint/pool.h"
#include "core/checkpoint/save_internal.h"
#include "core/checkpoint/value_json.h"
#include "core/dist/layout.h"
#include "core/dist/mesh.h"
#include "core/formats/safetensors.h"
#include "core/statedict/flatten.h"
#include "core/tensor/dtype_torch.h"

namespace dsd::checkpoint {
namespace {

using nlohmann::json;

// Largest piece staged through the host buffer in one go.
constexpr uint64_t kPieceBytes = 64u << 20;
// Bytes hashed then written in one step: small enough to stay in the core's cache between
// the two, large enough that the syscalls cost nothing.
constexpr uint64_t kStepBytes = 1u << 20;
// With sync_files, writeback of what was written is started every this many bytes, so the
// disk works while later bytes are copied and the final fsync finds little left to do.
constexpr uint64_t kWriteBehindBytes = 32u << 20;

}  // namespace

std::string new_save_id() {
  std::random_device rd;
  const uint64_t v = (static_cast<uint64_t>(rd()) << 32) ^ rd() ^
                     static_cast<uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count());
  return hex64(v);
}

Result<at::Tensor> source_tensor(const at::Tensor& t, const std::string& key, const SaveOptions& options) {
  if (!t.is_meta()) return t;
  if (!options.tensor_provider) {
    return make_error_at(Code::kInvalidArgument, key, "'{}' is a meta tensor, which has no data to save", key);
  }
  at::Tensor data = TRY(options.tensor_provider(key, t));
  if (data.scalar_type() != t.scalar_type() || data.sizes() != t.sizes()) {
    return make_error_at(Code::kInternal, key, "the data supplied for '{}' does not match its placeholder", key);
  }
  return data;
}

bool is_dcp_file_name(std::string_view name) {
  return name == kDcpMetadataName || dcp_rank_metadata(name).has_value() || name.ends_with(".distcp") ||
         name.starts_with(std::string(kDcpMetadataName) + ".tmp-");
}

namespace {

struct WrittenChunk {
  std::string key;
  ChunkRecord record;
};

struct RankOutcome {
  std::vector<FileRecord> files;
  std::vector<WrittenChunk> chunks;
  std::vector<std::string> created;  // full paths, for cleanup on failure
  uint64_t bytes = 0;
};

// Calls fn(ptr, len) over the tensor's bytes in row-major order, straight from its memory when
// it is a plain contiguous CPU tensor, else through a bounded host buffer.
template <class Fn>
Status for_each_piece(const at::Tensor& t, const std::string& key, Fn&& fn) {
  const uint64_t nbytes = static_cast<uint64_t>(t.numel()) * t.element_size();
  if (nbytes == 0) return ok();
  const bool direct = t.device().is_cpu() && t.is_contiguous() && !t.is_conj() && !t.is_neg();
  if (direct) {
    const auto* p = static_cast<const char*>(t.data_ptr());
    for (uint64_t off = 0; off < nbytes; off += kPieceBytes) {
      TRY(fn(p + off, std::min(kPieceBytes, nbytes - off)));
    }
    return ok();
  }
  return torch_call(Code::kDevice, fmt::format("copying '{}' to host memory", key), [&]() -> Status {
    if (t.dim() == 0) {
      at::Tensor c = t.cpu().resolve_conj().resolve_neg().contiguous();
      return fn(c.data_ptr(), nbytes);
    }
    const uint64_t row = nbytes / static_cast<uint64_t>(t.size(0));
    const int64_t rows = static_cast<int64_t>(std::max<uint64_t>(1, kPieceBytes / row));
    at::Tensor buf = at::empty({static_cast<int64_t>(std::min<uint64_t>(rows, t.size(0)) * row)},
                               at::TensorOptions().dtype(at::kByte));
    for (int64_t i = 0; i < t.size(0); i += rows) {
      at::Tensor slice = t.narrow(0, i, std::min(rows, t.size(0) - i));
      at::Tensor dst = at::from_blob(buf.data_ptr(), slice.sizes(), at::TensorOptions().dtype(t.dtype()));
      dst.copy_(slice);
      TRY(fn(buf.data_ptr(), static_cast<uint64_t>(slice.numel()) * t.element_size()));
    }
    return ok();
  });
}

// Starts the writeback of a data file's bytes as they are written (sync_file_range), so a
// durable save streams to disk instead of waiting for all of it in the final fsync.
class WriteBehind {
 public:
  WriteBehind(const File& f, bool enabled, uint64_t offset) : f_(f), enabled_(enabled), start_(offset), end_(offset) {}

  Status wrote(uint64_t n) {
    end_ += n;
    if (!enabled_ || end_ - start_ < kWriteBehindBytes) return ok();
    TRY(start_writeback(f_, start_, end_ - start_));
    start_ = end_;
    return ok();
  }

 private:
  const File& f_;
  bool enabled_;
  uint64_t start_;
  uint64_t end_;
};

std::map<std::string, std::string> file_metadata(const RankPlan& rp, const FilePlan& fp) {
  json sharding = json::object();
  for (size_t i : fp.items) sharding[rp.items[i].key] = {{"saved_offsets", rp.items[i].offsets}};
  return {{"DCP_SHARDING_INFO", sharding.dump()}, {"DCP_VERSION", "1.0"}, {"format", "pt"}};
}

// Writes one data file: header, then each chunk's bytes, hashed on the way; fsync.
Status write_file(const std::string& dir, const RankPlan& rp, const FilePlan& fp,
                  const SourceMap& sources, const SaveOptions& opt, std::mutex& mu,
                  RankOutcome& out) {
  std::vector<safetensors::TensorEntry> entries;
  uint64_t pos = 0;
  for (size_t i : fp.items) {
    const WriteItem& it = rp.items[i];
    const uint64_t n = it.storage_bytes();
    entries.push_back({it.key, it.dtype, it.sizes, pos, pos + n});
    pos += n;
  }
  const std::string header = TRY(safetensors::write_header(entries, file_metadata(rp, fp)));
  const std::string full = join(dir, fp.name);
  File f = TRY(create_new(full));
  {
    std::lock_guard<std::mutex> lock(mu);
    out.created.push_back(full);
  }
  TRY(write_all(f, header.data(), header.size()));
  WriteBehind behind(f, opt.sync_files, header.size());
  bool first_step = true;
  std::vector<WrittenChunk> chunks;
  for (size_t k = 0; k < fp.items.size(); ++k) {
    const WriteItem& it = rp.items[fp.items[k]];
    auto src = sources.find(it.key);
    if (src == sources.end()) return make_error_at(Code::kInternal, it.key, "no tensor for '{}'", it.key);
    ChunkHasher hasher(opt.block_size);
    const at::Tensor data = TRY(source_tensor(src->second, it.key, opt));
    TRY(for_each_piece(data, it.key, [&](const void* p, uint64_t len) -> Status {
      // Hash and write in cache-sized steps, so the write copies bytes the hash just
      // brought into the cache instead of reading them from memory a second time.
      const auto* bytes = static_cast<const char*>(p);
      for (uint64_t off = 0; off < len; off += kStepBytes) {
        const uint64_t n = std::min(kStepBytes, len - off);
        hasher.feed(bytes + off, n);
        TRY(write_all(f, bytes + off, n));
        TRY(behind.wrote(n));
        if (first_step) {
          first_step = false;
          crash_point("save.mid_write");
        }
      }
      return ok();
    }));
    WrittenChunk c;
    c.key = it.key;
    c.record.offsets = it.offsets;
    c.record.sizes = it.sizes;
    c.record.file = fp.name;
    c.record.begin = header.size() + entries[k].begin;
    c.record.end = header.size() + entries[k].end;
    c.record.xxh3 = hasher.finish();
    c.record.blocks = std::move(hasher.blocks());
    chunks.push_back(std::move(c));
  }
  if (opt.sync_files) TRY(sync(f));
  TRY(f.close());
  std::lock_guard<std::mutex> lock(mu);
  out.files.push_back({fp.name, 0, header.size() + pos});
  out.bytes += header.size() + pos;
  for (auto& c : chunks) out.chunks.push_back(std::move(c));
  return ok();
}

// Writes this rank's files with a pool of writer threads, one file at a time each.
Status write_rank_files(const std::string& dir, int64_t rank, const RankPlan& rp,
                        const SourceMap& sources, const SaveOptions& opt, RankOutcome& out) {
  const size_t nfiles = rp.files.size();
  if (nfiles == 0) return ok();
  std::mutex mu;
  std::atomic<size_t> next{0};
  std::atomic<bool> failed{false};
  std::vector<Status> status(nfiles);
  auto worker = [&] {
    for (size_t i; !failed && (i = next++) < nfiles;) {
      status[i] = write_file(dir, rp, rp.files[i], sources, opt, mu, out);
      if (!status[i].ok()) failed = true;
    }
  };
  const size_t nthreads = std::min<size_t>(nfiles, static_cast<size_t>(std::max(1, opt.thread_count)));
  std::vector<std::thread> threads;
  for (size_t t = 1; t < nthreads; ++t) threads.emplace_back(worker);
  worker();
  for (auto& t : threads) t.join();
  for (Status& s : status) {
    if (!s.ok()) return s;
  }
  for (FileRecord& f : out.files) f.rank = rank;
  return ok();
}

std::string outcome_to_json(const RankOutcome& out) {
  json j;
  json files = json::array();
  for (const FileRecord& f : out.files) files.push_back({{"name", f.name}, {"rank", f.rank}, {"size", f.size}});
  json chunks = json::array();
  for (const WrittenChunk& c : out.chunks) {
    json blocks = json::array();
    for (uint64_t b : c.record.blocks) blocks.push_back(b);
    chunks.push_back({{"key", c.key}, {"offsets", c.record.offsets}, {"sizes", c.record.sizes},
                      {"file", c.record.file}, {"begin", c.record.begin}, {"end", c.record.end},
                      {"xxh3", c.record.xxh3}, {"blocks", std::move(blocks)}});
  }
  j["files"] = std::move(files);
  j["chunks"] = std::move(chunks);
  return j.dump();
}

// The coordinator fills the chunk locations of every rank into the manifest.
Status merge_outcomes(Manifest& m, const std::vector<std::string>& outcomes) {
  std::unordered_map<std::string, std::vector<ChunkRecord>> by_key;
  try {
    for (const std::string& text : outcomes) {
      json j = json::parse(text);
      for (const json& f : j.at("files")) {
        m.files.push_back({f.at("name").get<std::string>(), f.at("rank").get<int64_t>(),
                           f.at("size").get<uint64_t>()});
      }
      for (const json& c : j.at("chunks")) {
        ChunkRecord r;
        r.offsets = c.at("offsets").get<std::vector<int64_t>>();
        r.sizes = c.at("sizes").get<std::vector<int64_t>>();
        r.file = c.at("file").get<std::string>();
        r.begin = c.at("begin").get<uint64_t>();
        r.end = c.at("end").get<uint64_t>();
        r.xxh3 = c.at("xxh3").get<uint64_t>();
        r.blocks = c.at("blocks").get<std::vector<uint64_t>>();
        by_key[c.at("key").get<std::string>()].push_back(std::move(r));
      }
    }
  } catch (const json::exception& e) {
    return make_error(Code::kComm, "a peer sent malformed write results: {}", e.what());
  }
  for (Entry& e : m.entries) {
    if (e.kind != Entry::Kind::kTensor) continue;
    auto& chunks = by_key[e.key];
    std::sort(chunks.begin(), chunks.end(),
              [](const ChunkRecord& a, const ChunkRecord& b) { return a.offsets < b.offsets; });
    e.chunks = std::move(chunks);
  }
  Status s = validate_manifest(m);
  if (!s.ok()) {
    return make_error(Code::kInternal, "the manifest of this save does not validate: {}", s.error().message);
  }
  return ok();
}

Status prepare_directory(const std::string& path, bool overwrite) {
  TRY(make_dirs(path));
  if (!overwrite && (path_exists(join(path, kManifestName)) || is_dcp_checkpoint(path))) {
    return make_error_at(Code::kExists, path,
                         "a checkpoint already exists at '{}'; pass overwrite to replace it", path);
  }
  return ok();
}

// After the commit: data files of earlier saves (and orphans of crashed ones) go.
void remove_stale_files(const std::string& path, const Manifest& m) {
  auto names = list_dir(path);
  if (!names.ok()) return;
  std::set<std::string> keep;
  for (const FileRecord& f : m.files) keep.insert(f.name);
  bool removed_one = false;
  for (const std::string& n : *names) {
    const bool stale_data = is_data_file_name(n) && keep.count(n) == 0;
    const bool stale_tmp = n.starts_with(std::string(kManifestName) + ".tmp-");
    // A DCP checkpoint this save replaced (overwrite) in the same directory.
    const bool stale_dcp = is_dcp_file_name(n);
    if (!stale_data && !stale_tmp && !stale_dcp) continue;
    (void)remove_file(join(path, n));
    if (stale_data && !removed_one) {
      removed_one = true;
      crash_point("save.after_cleanup_one");
    }
  }
}

void remove_all(const std::vector<std::string>& paths) {
  for (const std::string& p : paths) (void)remove_file(p);
}

}  // namespace

std::vector<PathItem> to_path_items(const Path& path) {
  std::vector<PathItem> out;
  for (const PathSegment& s : path) {
    if (const auto* k = s.if_key()) out.emplace_back(*k);
    else out.emplace_back(*s.if_index());
  }
  return out;
}

namespace {
void collect_int_key_dicts(const Value& v, std::vector<PathItem>& path,
                           std::vector<std::vector<PathItem>>& out) {
  if (const Dict* d = v.if_dict()) {
    if (d->int_keys()) out.push_back(path);
    for (const auto& e : *d) {
      path.emplace_back(e.key);
      collect_int_key_dicts(e.value, path, out);
      path.pop_back();
    }
  } else if (const List* l = v.if_list()) {
    for (size_t i = 0; i < l->size(); ++i) {
      path.emplace_back(static_cast<int64_t>(i));
      collect_int_key_dicts((*l)[i], path, out);
      path.pop_back();
    }
  }
}
}  // namespace

Result<LocalPlan> build_local_plan(const Dict& state_dict, int64_t rank, SourceMap& sources) {
  FlatStateDict flat = TRY(flatten_state_dict(state_dict, FlattenStyle::kCheckpoint));
  LocalPlan plan;
  plan.rank = rank;
  if (rank == 0) {
    std::vector<PathItem> path;
    if (state_dict.int_keys()) plan.int_key_dicts.emplace_back();
    for (const auto& e : state_dict) {
      path.emplace_back(e.key);
      collect_int_key_dicts(e.value, path, plan.int_key_dicts);
      path.pop_back();
    }
  }
  for (size_t i = 0; i < flat.flat->size(); ++i) {
    const std::string& key = flat.flat->key_at(i);
    const Value& v = flat.flat->value_at(i);
    if (!safetensors::is_valid_utf8(key)) {
      return make_error_at(Code::kInvalidArgument, key, "key '{}' is not UTF-8", key);
    }
    WriteItem it;
    it.key = key;
    it.path = to_path_items(flat.mapping[i].second);
    if (const TensorValue* tv = v.if_tensor()) {
      it.dtype = TRY(dtype_from_scalar_type(tv->tensor.scalar_type()));
      const std::vector<int64_t> local(tv->tensor.sizes().begin(), tv->tensor.sizes().end());
      if (tv->layout) {
        const Chunk c = tv->layout->local_chunk();
        if (c.offsets.size() != tv->layout->global_shape().size()) continue;  // not in the mesh
        if (c.sizes != local) {
          return make_error_at(Code::kShapeMismatch, key,
                               "the local tensor of '{}' has shape [{}] but its layout gives this rank [{}]",
                               key, fmt::join(local, ", "), fmt::join(c.sizes, ", "));
        }
        it.global_shape = tv->layout->global_shape();
        it.offsets = c.offsets;
        it.sizes = c.sizes;
        if (!plan.mesh_shape && tv->layout->mesh()) plan.mesh_shape = tv->layout->mesh()->shape();
      } else {
        it.global_shape = local;
        it.offsets.assign(local.size(), 0);
        it.sizes = local;
      }
      sources.emplace(key, tv->tensor);
    } else {
      it.kind = Entry::Kind::kValue;
      it.value_json = TRY(value_to_json(v, key)).dump();
    }
    plan.items.push_back(std::move(it));
  }
  return plan;
}

Result<SaveInfo> save(Communicator& comm, const Dict& state_dict, const std::string& path,
                      const SaveOptions& options) {
  return save_with_status(comm, state_dict, path, options, ok());
}

Result<SaveInfo> save_with_status(Communicator& comm, const Dict& state_dict, const std::string& path,
                                  const SaveOptions& options, Status incoming) {
  SaveOptions opt = options;
  opt.thread_count = default_threads(opt.thread_count, 4);
  if (opt.format == Format::kDcp) return save_dcp(comm, state_dict, path, opt, std::move(incoming));
  if (opt.format != Format::kDsd && incoming.ok()) {
    incoming = make_error(Code::kInvalidArgument, "a checkpoint is saved as dsd or dcp, not {}", format_name(opt.format));
  }
  const int64_t rank = comm.rank();
  SourceMap sources;
  LocalPlan local;
  Status st = std::move(incoming);
  if (st.ok() && (opt.block_size < 4096 || (opt.block_size & (opt.block_size - 1)) != 0)) {
    st = make_error(Code::kInvalidArgument, "block size {} is not a power of two >= 4096", opt.block_size);
  }
  if (st.ok()) {
    auto p = build_local_plan(state_dict, rank, sources);
    if (p.ok()) local = std::move(*p);
    else st = std::move(p).error();
  }
  if (st.ok() && rank == 0) {
    local.save_id = new_save_id();
    st = prepare_directory(path, opt.overwrite);
  }
  TRY(agree(comm, std::move(st)));

  // Every rank merges the same gathered plans into the same global plan.
  std::vector<std::string> texts = TRY(all_gather_bytes(comm, local_plan_to_json(local)));
  std::vector<LocalPlan> plans;
  for (const std::string& t : texts) plans.push_back(TRY(local_plan_from_json(t)));
  GlobalPlan global = TRY(create_global_plan(plans, {opt.thread_count, opt.save_to_lowest_rank}));
  global.manifest.block_size = opt.block_size;

  RankOutcome out;
  crash_point("save.before_write");
  Status ws = write_rank_files(path, rank, global.ranks[static_cast<size_t>(rank)], sources, opt, out);
  if (ws.ok()) crash_point("save.after_write");
  ws = agree(comm, std::move(ws));
  if (!ws.ok()) {
    // The coordinator cannot commit without this rank's outcome, which it will not get now:
    // this save's files can go.
    remove_all(out.created);
    return std::move(ws).error();
  }
  // From here on the coordinator may commit as soon as it has every outcome, even when this
  // rank's side of a collective fails, so only the coordinator, which knows whether it
  // committed, removes files on failure; other ranks' files of a failed save stay as orphans
  // that the next save to this directory removes.
  auto outcomes = all_gather_bytes(comm, outcome_to_json(out));
  if (!outcomes.ok()) {
    if (rank == 0) remove_all(out.created);
    return std::move(outcomes).error();
  }
  Status cs = ok();
  bool committed = false;
  if (rank == 0) {
    cs = merge_outcomes(global.manifest, *outcomes);
    if (cs.ok()) cs = sync_dir(path);
    if (cs.ok()) crash_point("save.before_commit");
    if (cs.ok()) cs = write_file_atomic(path, kManifestName, manifest_to_json(global.manifest));
    committed = cs.ok();
    if (committed) crash_point("save.after_commit");
  }
  cs = agree(comm, std::move(cs));
  if (!cs.ok()) {
    // After a commit the new checkpoint is complete even though a peer failed to hear of it.
    if (rank == 0 && !committed) remove_all(out.created);
    return std::move(cs).error();
  }
  if (rank == 0) remove_stale_files(path, global.manifest);
  return SaveInfo{global.save_id, out.bytes, static_cast<int>(out.files.size())};
}

}  // namespace dsd::checkpoint
