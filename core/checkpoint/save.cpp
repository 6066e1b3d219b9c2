// save(): the collective steps every storage writer shares, as DCP's save_state_dict. Each
// rank builds its local plan, the coordinator prepares the directory, the ranks agree, the
// gathered plans become the same global plan everywhere (or, with plan caching, the cached
// one: plan_cache.h), each rank writes its part, the coordinator commits from every rank's
// write results, and the ranks agree again.
#include "core/checkpoint/save.h"

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <fmt/ranges.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <optional>
#include <random>

#include "core/base/make_error.h"
#include "core/base/strings.h"
#include "core/checkpoint/crash_point.h"
#include "core/checkpoint/dcp_files.h"
#include "core/checkpoint/io.h"
#include "core/checkpoint/plan_cache.h"
#include "core/checkpoint/pool.h"
#include "core/checkpoint/save_planner.h"
#include "core/checkpoint/storage_writer.h"
#include "core/checkpoint/value_json.h"
#include "core/dist/layout.h"
#include "core/dist/mesh.h"
#include "core/formats/safetensors.h"
#include "core/statedict/flatten.h"
#include "core/tensor/dtype_torch.h"

namespace dsd::checkpoint {
namespace {

// A new random save id (16 hex digits).
std::string new_save_id() {
  std::random_device rd;
  const uint64_t v = (static_cast<uint64_t>(rd()) << 32) ^ rd() ^
                     static_cast<uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count());
  return hex64(v);
}

// The writer lock of a checkpoint directory: an exclusive flock() on the directory itself
// (an O_DIRECTORY descriptor), taken without waiting by the coordinator before it prepares
// the directory and held until the save returns (an async save: until its background write
// ends). A second save to the same path from any process on the host (or on a file system
// whose flock works across clients) fails at once with kExists instead of interleaving its
// data files and cleanup with the first one's. flock(), not a lock file created with
// O_EXCL: the kernel drops it when the holder dies (SIGKILL, OOM), so a crashed save never
// leaves a lock that blocks the next one; and on the directory, so no lock file is added to
// a checkpoint (a DCP directory stays exactly `.metadata` + `*.distcp`).
class SaveLock {
 public:
  SaveLock() = default;
  SaveLock(const SaveLock&) = delete;
  SaveLock& operator=(const SaveLock&) = delete;
  ~SaveLock() {
    if (fd_ >= 0) ::close(fd_);  // closing the descriptor releases the lock
  }

  Status acquire(const std::string& dir) {
    TRY(make_dirs(dir));
    fd_ = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd_ < 0) {
      const int e = errno;
      return make_error_at(Code::kIo, dir, "cannot open '{}' to lock it for the save: {}", dir, std::strerror(e));
    }
    if (::flock(fd_, LOCK_EX | LOCK_NB) != 0) {
      const int e = errno;
      ::close(fd_);
      fd_ = -1;
      if (e == EWOULDBLOCK) {
        return make_error_at(Code::kExists, dir,
                             "another save to '{}' is in progress (it holds the directory's lock); "
                             "this save changed nothing",
                             dir);
      }
      return make_error_at(Code::kIo, dir, "cannot lock '{}' for the save: {}", dir, std::strerror(e));
    }
    return ok();
  }

 private:
  int fd_ = -1;
};

// This rank's local plan: one item per tensor chunk it holds and per non-tensor value.
Result<LocalPlan> create_local_plan(const Dict& state_dict, int64_t rank, SourceMap& sources) {
  FlatStateDict flat = TRY(flatten_state_dict(state_dict, FlattenStyle::kCheckpoint));
  LocalPlan plan;
  plan.rank = rank;
  if (rank == 0) plan.int_key_dicts = int_key_dict_paths(state_dict);
  for (size_t i = 0; i < flat.flat->size(); ++i) {
    const std::string& key = flat.flat->key_at(i);
    const Value& v = flat.flat->value_at(i);
    if (!safetensors::is_valid_utf8(key)) {
      return make_error_at(Code::kInvalidArgument, key, "key '{}' is not UTF-8", key);
    }
    WriteItem it;
    it.key = key;
    it.path = flat.mapping[i].second;
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

Status check_options(const SaveOptions& opt) {
  if (opt.format != Format::kDsd && opt.format != Format::kDcp) {
    return make_error(Code::kInvalidArgument, "a checkpoint is saved as dsd or dcp, not {}", format_name(opt.format));
  }
  if (opt.format == Format::kDsd && (opt.block_size < 4096 || (opt.block_size & (opt.block_size - 1)) != 0)) {
    return make_error(Code::kInvalidArgument, "block size {} is not a power of two >= 4096", opt.block_size);
  }
  if (opt.incremental && opt.base.empty()) {
    return make_error(Code::kInvalidArgument,
                      "an incremental save needs its base: name it (base), or save through a checkpoint manager, "
                      "which takes the previous step");
  }
  if (!opt.base.empty() && opt.format != Format::kDsd) {
    return make_error(Code::kInvalidArgument, "an incremental save (base '{}') writes the dsd format, not {}", opt.base,
                      format_name(opt.format));
  }
  return ok();
}

// The global plan from every rank's local plan, the same on every rank: the plans are
// all-gathered and merged one at a time (each text is dropped once parsed), so no rank holds
// every rank's parsed plan.
Result<GlobalPlan> gather_global_plan(Communicator& comm, const LocalPlan& local, const PlanOptions& options) {
  std::vector<std::string> texts = TRY(all_gather_bytes(comm, local_plan_to_json(local)));
  GlobalPlanner planner(options);
  for (std::string& t : texts) {
    LocalPlan p = TRY(local_plan_from_json(t));
    std::string().swap(t);
    TRY(planner.add(std::move(p)));
  }
  return planner.finish();
}

// A save's global plan: its own, or one lent by the plan cache.
struct PlannedSave {
  GlobalPlan own;
  std::optional<PlanLease> lease;
  bool cached = false;

  GlobalPlan& plan() { return lease ? lease->plan() : own; }
};

// This save's global plan. With enable_plan_caching the ranks first exchange summaries
// (fingerprint, cache state, values); when they show that every rank's structure is that of
// a cached plan, that plan is reused, else the plan is made as without caching and cached.
// Every rank decides from the same gathered summaries, so all take the same branch.
Result<PlannedSave> plan_save(Communicator& comm, const LocalPlan& local, const SaveOptions& opt) {
  const PlanOptions options{opt.thread_count, opt.save_to_lowest_rank};
  if (!opt.enable_plan_caching) return PlannedSave{TRY(gather_global_plan(comm, local, options)), std::nullopt, false};
  PlanCache& cache = plan_cache(comm);
  const PlanSummary mine = summarize_plan(local, comm.size(), opt, cache.state());
  std::vector<std::string> texts = TRY(all_gather_bytes(comm, encode_plan_summary(mine)));
  std::vector<PlanSummary> summaries;
  summaries.reserve(texts.size());
  for (std::string& t : texts) {
    summaries.push_back(TRY(decode_plan_summary(t)));
    std::string().swap(t);
  }
  if (std::optional<PlanLease> hit = TRY(cache.reuse(summaries, comm.rank()))) {
    return PlannedSave{{}, std::move(hit), true};
  }
  GlobalPlan plan = TRY(gather_global_plan(comm, local, options));
  return PlannedSave{{}, cache.insert(summaries, std::move(plan), comm.rank()), false};
}

}  // namespace

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

Status prepare_checkpoint_dir(const std::string& path, bool overwrite) {
  TRY(make_dirs(path));
  if (!overwrite && (path_exists(join(path, kManifestName)) || is_dcp_checkpoint(path))) {
    return make_error_at(Code::kExists, path, "a checkpoint already exists at '{}'; pass overwrite to replace it",
                         path);
  }
  return ok();
}

void StorageWriter::remove_created() const {
  for (const std::string& p : created()) (void)remove_file(p);
}

Result<SaveInfo> save(Communicator& comm, const Dict& state_dict, const std::string& path,
                      const SaveOptions& options) {
  return save_with_status(comm, state_dict, path, options, ok());
}

Result<SaveInfo> save_with_status(Communicator& comm, const Dict& state_dict, const std::string& path,
                                  const SaveOptions& options, Status incoming) {
  SaveOptions opt = options;
  opt.thread_count = default_threads(opt.thread_count, 4);
  if (opt.incremental && opt.base.empty() && opt.choose_base) {
    Result<std::string> base = opt.choose_base(comm);
    if (!base.ok()) return std::move(base).error();
    opt.base = std::move(*base);
    opt.incremental = false;
  }
  const std::unique_ptr<StorageWriter> writer =
      opt.format == Format::kDcp ? make_dcp_storage_writer(path, opt) : make_dsd_storage_writer(path, opt);
  const int64_t rank = comm.rank();
  SourceMap sources;
  LocalPlan local;
  Status st = std::move(incoming);
  if (st.ok()) st = check_options(opt);
  if (st.ok()) {
    auto p = create_local_plan(state_dict, rank, sources);
    if (p.ok()) local = std::move(*p);
    else st = std::move(p).error();
  }
  SaveLock lock;  // rank 0's writer lock of `path`, held until this function returns
  if (st.ok() && rank == 0) st = lock.acquire(path);
  if (st.ok() && rank == 0) {
    local.save_id = new_save_id();
    auto first = writer->prepare_storage();
    if (first.ok()) local.first_file_index = *first;
    else st = std::move(first).error();
  }
  TRY(agree(comm, std::move(st)));

  PlannedSave planned = TRY(plan_save(comm, local, opt));
  GlobalPlan& global = planned.plan();

  if (opt.on_write_plan) opt.on_write_plan(global.ranks[static_cast<size_t>(rank)]);
  crash_point("save.before_write");
  Result<WriteResult> written = writer->write_data(global, rank, sources);
  if (written.ok()) crash_point("save.after_write");
  Status ws = agree(comm, written.ok() ? ok() : Status(written.error()));
  if (!ws.ok()) {
    // The coordinator cannot commit without this rank's results, which it will not get now:
    // this save's files can go.
    writer->remove_created();
    return std::move(ws).error();
  }
  // From here on the coordinator may commit as soon as it has every rank's results, even
  // when this rank's side of a collective fails, so only the coordinator, which knows
  // whether it committed, removes files on failure; other ranks' files of a failed save stay
  // as orphans that the next save to this directory removes.
  auto results = all_gather_bytes(comm, written->results);
  if (!results.ok()) {
    if (rank == 0) writer->remove_created();
    return std::move(results).error();
  }
  Status cs = ok();
  bool committed = false;
  if (rank == 0) {
    cs = writer->finish(global, *results);
    committed = cs.ok();
    if (committed) crash_point("save.after_commit");
  }
  cs = agree(comm, std::move(cs));
  if (!cs.ok()) {
    // After a commit the new checkpoint is complete even though a peer failed to hear of it.
    if (rank == 0 && !committed) writer->remove_created();
    return std::move(cs).error();
  }
  if (rank == 0) writer->remove_stale_files();
  SaveInfo info{global.save_id, written->bytes, written->files, planned.cached};
  info.bytes_referenced = written->bytes_referenced;
  return info;
}

}  // namespace dsd::checkpoint
