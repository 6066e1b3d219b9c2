// Checkpoints: save, async save and futures, load with reports, load_full, verify, manager.
#include "capi/src/export.h"

#include <cstddef>
#include <memory>
#include <mutex>

#include "capi/src/dists.h"
#include "capi/src/guard.h"
#include "core/base/format.h"
#include "capi/src/state_dicts.h"
#include "core/checkpoint/async_save.h"
#include "core/checkpoint/load.h"
#include "core/checkpoint/manager.h"
#include "core/checkpoint/save.h"

struct dsd_future {
  std::shared_ptr<dsd::checkpoint::SaveFuture> future;
};

struct dsd_load_report {
  dsd::checkpoint::LoadReport report;
};

struct dsd_checkpoint_manager {
  dsd::checkpoint::CheckpointManager manager;
  std::unique_ptr<dsd::checkpoint::AsyncCheckpointer> saver;  // made on the first async save
};

namespace dsd::capi {
namespace {

// Whether a caller's options struct of `size` bytes holds the field ending at `end`.
template <class T>
bool has_field(const T* o, size_t end) {
  return o->struct_size >= end;
}

Result<checkpoint::SaveOptions> save_options(const dsd_save_options* o) {
  checkpoint::SaveOptions out;
  if (o == nullptr) return out;
  if (o->struct_size < sizeof(uint32_t) + sizeof(bool)) {
    return make_error(Code::kInvalidArgument, "options->struct_size {} is too small; call dsd_save_options_init", o->struct_size);
  }
  out.overwrite = o->overwrite;
  if (has_field(o, offsetof(dsd_save_options, thread_count) + sizeof(int32_t))) out.thread_count = o->thread_count;
  if (has_field(o, offsetof(dsd_save_options, save_to_lowest_rank) + sizeof(bool))) out.save_to_lowest_rank = o->save_to_lowest_rank;
  if (has_field(o, offsetof(dsd_save_options, sync_files) + sizeof(bool))) out.sync_files = o->sync_files;
  if (has_field(o, offsetof(dsd_save_options, block_size) + sizeof(uint64_t))) out.block_size = o->block_size;
  if (has_field(o, offsetof(dsd_save_options, format) + sizeof(int32_t))) {
    const auto f = checkpoint::format_from_code(o->format);
    if (!f || (*f != checkpoint::Format::kDsd && *f != checkpoint::Format::kDcp)) {
      return make_error(Code::kInvalidArgument, "options->format {} is not DSD_FORMAT_DSD or DSD_FORMAT_DCP", o->format);
    }
    out.format = *f;
  }
  if (out.thread_count < 0) return make_error(Code::kInvalidArgument, "options->thread_count {} is negative", out.thread_count);
  return out;
}

Result<checkpoint::LoadOptions> load_options(const dsd_load_options* o) {
  checkpoint::LoadOptions out;
  if (o == nullptr) return out;
  if (o->struct_size < sizeof(uint32_t) + sizeof(bool)) {
    return make_error(Code::kInvalidArgument, "options->struct_size {} is too small; call dsd_load_options_init", o->struct_size);
  }
  out.strict = o->strict;
  if (has_field(o, offsetof(dsd_load_options, thread_count) + sizeof(int32_t))) out.thread_count = o->thread_count;
  if (has_field(o, offsetof(dsd_load_options, verify) + sizeof(bool))) out.verify = o->verify;
  if (out.thread_count < 0) return make_error(Code::kInvalidArgument, "options->thread_count {} is negative", out.thread_count);
  return out;
}

// The communicator behind `comm`: the single-process one for NULL.
Result<std::shared_ptr<Communicator>> communicator(dsd_comm* comm) {
  if (comm != nullptr) return comm->comm;
  static std::shared_ptr<Communicator> local = make_local_communicator();
  return local;
}

// The process-wide async checkpointer of single-process saves. Never destroyed: its thread
// and buffers live until exit (freeing them during static destruction would race libtorch's).
checkpoint::AsyncCheckpointer& local_saver() {
  static auto* saver = new checkpoint::AsyncCheckpointer(make_local_communicator());
  return *saver;
}
std::mutex& local_saver_mutex() {
  static std::mutex mu;
  return mu;
}

// The async checkpointer of a communicator (the process-wide one for NULL). A communicator's
// is created on its first async save, by every rank.
checkpoint::AsyncCheckpointer& saver_for(dsd_comm* comm) {
  if (comm == nullptr) return local_saver();
  if (comm->async == nullptr) comm->async = std::make_shared<checkpoint::AsyncCheckpointer>(comm->comm);
  return *comm->async;
}

Result<const std::vector<std::string>*> report_list(const dsd_load_report* r, dsd_load_report_list list) {
  TRY(require(r, "report"));
  switch (list) {
    case DSD_LOAD_REPORT_MISSING: return &r->report.missing_keys;
    case DSD_LOAD_REPORT_UNEXPECTED: return &r->report.unexpected_keys;
    case DSD_LOAD_REPORT_SKIPPED: return &r->report.skipped_keys;
    default: return make_error(Code::kInvalidArgument, "unknown load report list {}", list);
  }
}

}  // namespace
}  // namespace dsd::capi

using dsd::capi::guard;
using dsd::capi::require;

extern "C" {

void dsd_save_options_init(dsd_save_options* options) {
  if (options == nullptr) return;
  const dsd::checkpoint::SaveOptions d;
  *options = dsd_save_options{sizeof(dsd_save_options), d.overwrite, d.thread_count,
                              d.save_to_lowest_rank, d.sync_files, d.block_size,
                              static_cast<int32_t>(d.format)};
}

void dsd_load_options_init(dsd_load_options* options) {
  if (options == nullptr) return;
  const dsd::checkpoint::LoadOptions d;
  *options = dsd_load_options{sizeof(dsd_load_options), d.strict, d.thread_count, d.verify};
}

dsd_status dsd_save(dsd_comm* comm, const dsd_state_dict* sd, const char* path,
                    const dsd_save_options* options, dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    const dsd::Dict* d = TRY(dsd::capi::as_dict(sd, "sd"));
    TRY(require(path, "path"));
    auto opts = TRY(dsd::capi::save_options(options));
    auto c = TRY(dsd::capi::communicator(comm));
    TRY(dsd::checkpoint::save(*c, *d, path, opts));
    return dsd::ok();
  });
}

dsd_status dsd_save_async(dsd_comm* comm, const dsd_state_dict* sd, const char* path,
                          const dsd_save_options* options, dsd_future** out, dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    const dsd::Dict* d = TRY(dsd::capi::as_dict(sd, "sd"));
    TRY(require(path, "path"));
    TRY(require(out, "out"));
    auto opts = TRY(dsd::capi::save_options(options));
    std::lock_guard<std::mutex> lock(dsd::capi::local_saver_mutex());
    auto f = TRY(dsd::capi::saver_for(comm).save_async(*d, path, opts));
    *out = new dsd_future{std::move(f)};
    return dsd::ok();
  });
}

dsd_status dsd_future_wait(dsd_future* future, int64_t timeout_ms, dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    TRY(require(future, "future"));
    return future->future->wait(std::chrono::milliseconds(timeout_ms));
  });
}

dsd_status dsd_future_is_staged(const dsd_future* future, bool* out, dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    TRY(require(future, "future"));
    TRY(require(out, "out"));
    *out = future->future->is_staged();
    return dsd::ok();
  });
}

dsd_status dsd_future_is_done(const dsd_future* future, bool* out, dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    TRY(require(future, "future"));
    TRY(require(out, "out"));
    *out = future->future->is_done();
    return dsd::ok();
  });
}

void dsd_future_free(dsd_future* future) { delete future; }

dsd_status dsd_load(dsd_comm* comm, dsd_state_dict* sd, const char* path,
                    const dsd_load_options* options, dsd_load_report** out, dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    dsd::Dict* d = TRY(dsd::capi::as_dict(sd, "sd"));
    TRY(require(path, "path"));
    auto opts = TRY(dsd::capi::load_options(options));
    auto c = TRY(dsd::capi::communicator(comm));
    auto report = TRY(dsd::checkpoint::load(*c, *d, path, opts));
    if (out != nullptr) *out = new dsd_load_report{std::move(report)};
    return dsd::ok();
  });
}

dsd_status dsd_load_report_count(const dsd_load_report* report, dsd_load_report_list list,
                                 size_t* out, dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    const auto* keys = TRY(dsd::capi::report_list(report, list));
    TRY(require(out, "out"));
    *out = keys->size();
    return dsd::ok();
  });
}

dsd_status dsd_load_report_key(const dsd_load_report* report, dsd_load_report_list list,
                               size_t index, const char** out, dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    const auto* keys = TRY(dsd::capi::report_list(report, list));
    TRY(require(out, "out"));
    if (index >= keys->size()) {
      return dsd::make_error(dsd::Code::kInvalidArgument, "index {} is out of range for {} keys", index, keys->size());
    }
    *out = (*keys)[index].c_str();
    return dsd::ok();
  });
}

void dsd_load_report_free(dsd_load_report* report) { delete report; }

dsd_status dsd_load_full(const char* path, const char* const* keys, size_t n_keys,
                         dsd_state_dict** out, dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    TRY(require(path, "path"));
    if (n_keys > 0) TRY(require(keys, "keys"));
    TRY(require(out, "out"));
    std::vector<std::string> ks;
    for (size_t i = 0; i < n_keys; ++i) {
      if (keys[i] == nullptr) return dsd::make_error(dsd::Code::kInvalidArgument, "keys[{}] is NULL", i);
      ks.emplace_back(keys[i]);
    }
    dsd::DictPtr d = TRY(dsd::checkpoint::load_full(path, ks));
    *out = dsd::capi::wrap(dsd::Value(std::move(d)));
    return dsd::ok();
  });
}

dsd_status dsd_checkpoint_verify(const char* path, dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    TRY(require(path, "path"));
    auto problems = TRY(dsd::checkpoint::verify(path));
    if (problems.empty()) return dsd::ok();
    const auto& p = problems.front();
    return dsd::make_error_at(dsd::Code::kCorrupt, p.file, "{} ({} damaged chunk(s) in all)", p.message,
                              problems.size());
  });
}

dsd_status dsd_checkpoint_manager_new(const char* root, int32_t keep_last,
                                      dsd_checkpoint_manager** out, dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    TRY(require(root, "root"));
    TRY(require(out, "out"));
    *out = new dsd_checkpoint_manager{dsd::checkpoint::CheckpointManager(root, keep_last), nullptr};
    return dsd::ok();
  });
}

void dsd_checkpoint_manager_free(dsd_checkpoint_manager* manager) { delete manager; }

dsd_status dsd_checkpoint_manager_save(dsd_checkpoint_manager* manager, dsd_comm* comm,
                                       const dsd_state_dict* sd, int64_t step,
                                       const dsd_save_options* options, dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    TRY(require(manager, "manager"));
    const dsd::Dict* d = TRY(dsd::capi::as_dict(sd, "sd"));
    auto opts = TRY(dsd::capi::save_options(options));
    auto c = TRY(dsd::capi::communicator(comm));
    TRY(manager->manager.save(*c, *d, step, opts));
    return dsd::ok();
  });
}

dsd_status dsd_checkpoint_manager_save_async(dsd_checkpoint_manager* manager, dsd_comm* comm,
                                             const dsd_state_dict* sd, int64_t step,
                                             const dsd_save_options* options, dsd_future** out,
                                             dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    TRY(require(manager, "manager"));
    const dsd::Dict* d = TRY(dsd::capi::as_dict(sd, "sd"));
    TRY(require(out, "out"));
    auto opts = TRY(dsd::capi::save_options(options));
    auto c = TRY(dsd::capi::communicator(comm));
    if (!manager->saver) manager->saver = std::make_unique<dsd::checkpoint::AsyncCheckpointer>(c);
    auto f = TRY(manager->manager.save_async(*manager->saver, *d, step, opts));
    *out = new dsd_future{std::move(f)};
    return dsd::ok();
  });
}

dsd_status dsd_checkpoint_manager_latest_step(const dsd_checkpoint_manager* manager, bool* found,
                                              int64_t* out, dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    TRY(require(manager, "manager"));
    TRY(require(found, "found"));
    TRY(require(out, "out"));
    auto step = TRY(manager->manager.latest_step());
    *found = step.has_value();
    if (step) *out = *step;
    return dsd::ok();
  });
}

dsd_status dsd_checkpoint_manager_load_latest(dsd_checkpoint_manager* manager, dsd_comm* comm,
                                              dsd_state_dict* sd, const dsd_load_options* options,
                                              bool* found, int64_t* step, dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    TRY(require(manager, "manager"));
    dsd::Dict* d = TRY(dsd::capi::as_dict(sd, "sd"));
    TRY(require(found, "found"));
    TRY(require(step, "step"));
    auto opts = TRY(dsd::capi::load_options(options));
    auto c = TRY(dsd::capi::communicator(comm));
    auto s = TRY(manager->manager.load_latest(*c, *d, opts));
    *found = s.has_value();
    if (s) *step = *s;
    return dsd::ok();
  });
}

}  // extern "C"
