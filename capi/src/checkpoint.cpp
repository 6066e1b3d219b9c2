// Checkpoints: save, the async checkpointer and its futures, load, load_full, verify, manager.
#include "capi/src/export.h"

#include <cstddef>
#include <cstring>
#include <memory>

#include "capi/src/dists.h"
#include "capi/src/guard.h"
#include "capi/src/incompatible_keys.h"
#include "capi/src/options.h"
#include "capi/src/state_dicts.h"
#include "core/base/make_error.h"
#include "core/checkpoint/async_save.h"
#include "core/checkpoint/load.h"
#include "core/checkpoint/io.h"
#include "core/checkpoint/manager.h"
#include "core/checkpoint/retention.h"
#include "core/checkpoint/save.h"
#include "core/checkpoint/verify.h"

struct dsd_future {
  std::shared_ptr<dsd::checkpoint::SaveFuture> future;
};

// An explicit root, as PyTorch's AsyncCheckpointer: nothing is shared between two of them.
struct dsd_async_checkpointer {
  std::shared_ptr<dsd::Communicator> comm;
  dsd::checkpoint::AsyncCheckpointer saver;
  explicit dsd_async_checkpointer(std::shared_ptr<dsd::Communicator> c) : comm(c), saver(std::move(c)) {}
};

struct dsd_checkpoint_manager {
  std::shared_ptr<dsd::Communicator> comm;
  dsd::checkpoint::CheckpointManager manager;
  std::unique_ptr<dsd::checkpoint::AsyncCheckpointer> saver;  // made on the first async save
};

namespace dsd::capi {

// ABI 1.0's struct ended with `format`: 32 bytes, enable_plan_caching in its tail padding
// (a 1.0 caller's struct holds there what the 1.0 _init wrote: zero, false) and
// max_staging_bytes after it.
constexpr size_t kSaveOptionsSizeV1 = 32;
static_assert(offsetof(dsd_checkpoint_save_options, enable_plan_caching) < kSaveOptionsSizeV1 &&
              offsetof(dsd_checkpoint_save_options, max_staging_bytes) == kSaveOptionsSizeV1);
// 1.1's struct ends after max_staging_bytes; 1.2 appended base and incremental.
constexpr size_t kSaveOptionsSizeV1_1 = 40;
static_assert(offsetof(dsd_checkpoint_save_options, base) == kSaveOptionsSizeV1_1);

namespace {

static_assert(static_cast<int32_t>(checkpoint::Format::kDsd) == DSD_FORMAT_DSD &&
              static_cast<int32_t>(checkpoint::Format::kDcp) == DSD_FORMAT_DCP &&
              static_cast<int32_t>(checkpoint::Format::kTorchSave) == DSD_FORMAT_TORCH &&
              static_cast<int32_t>(checkpoint::Format::kSafetensors) == DSD_FORMAT_SAFETENSORS);

Result<checkpoint::SaveOptions> save_options(const dsd_checkpoint_save_options* o) {
  dsd_checkpoint_save_options defaults;
  dsd_checkpoint_save_options_init(&defaults);
  const dsd_checkpoint_save_options in =
      TRY(read_options(o, defaults, {kSaveOptionsSizeV1, kSaveOptionsSizeV1_1, sizeof(dsd_checkpoint_save_options)},
                       "dsd_checkpoint_save_options", "dsd_checkpoint_save_options_init"));
  checkpoint::SaveOptions out;
  out.overwrite = in.overwrite;
  out.thread_count = in.thread_count;
  out.save_to_lowest_rank = in.save_to_lowest_rank;
  out.sync_files = in.sync_files;
  out.block_size = in.block_size;
  out.enable_plan_caching = in.enable_plan_caching;
  out.max_staging_bytes = in.max_staging_bytes;
  if (in.base != nullptr) out.base = in.base;
  out.incremental = in.incremental;
  const auto f = checkpoint::format_from_code(in.format);
  if (!f || (*f != checkpoint::Format::kDsd && *f != checkpoint::Format::kDcp)) {
    return make_error(Code::kInvalidArgument,
                      "options->format {} is not DSD_FORMAT_DSD or DSD_FORMAT_DCP", in.format);
  }
  out.format = *f;
  if (out.thread_count < 0) {
    return make_error(Code::kInvalidArgument, "options->thread_count {} is negative", out.thread_count);
  }
  return out;
}

Result<checkpoint::LoadOptions> load_options(const dsd_checkpoint_load_options* o) {
  dsd_checkpoint_load_options defaults;
  dsd_checkpoint_load_options_init(&defaults);
  // allow_external_files took the struct's tail padding: the size before it was also
  // sizeof(dsd_checkpoint_load_options) (16), so that one known size covers both versions
  // (a caller of the earlier header gets its init function's zero there: false).
  // The same holds for the two cooperative_load fields of 1.1.
  static_assert(offsetof(dsd_checkpoint_load_options, allow_external_files) < 16 &&
                offsetof(dsd_checkpoint_load_options, cooperative_load_on_one_host) < 16 &&
                sizeof(dsd_checkpoint_load_options) == 16);
  const dsd_checkpoint_load_options in =
      TRY(read_options(o, defaults, {sizeof(dsd_checkpoint_load_options)},
                       "dsd_checkpoint_load_options", "dsd_checkpoint_load_options_init"));
  checkpoint::LoadOptions out;
  out.strict = in.strict;
  out.thread_count = in.thread_count;
  out.verify = in.verify;
  out.allow_external_files = in.allow_external_files;
  using Cooperative = checkpoint::LoadOptions::Cooperative;
  out.cooperative = !in.cooperative_load                ? Cooperative::kNever
                    : in.cooperative_load_on_one_host ? Cooperative::kAlways
                                                      : Cooperative::kAcrossHosts;
  if (out.thread_count < 0) {
    return make_error(Code::kInvalidArgument, "options->thread_count {} is negative", out.thread_count);
  }
  return out;
}

// dsd_checkpoint_save's communicator when it is given none: one local communicator for the
// whole process rather than a new one per call, because the save-plan cache lives on the
// communicator (core/checkpoint/plan_cache.h) and would never hit on a fresh one. Sharing it
// between threads is safe: a local communicator's collectives touch no state, and the plan
// cache guards its own.
std::shared_ptr<Communicator> save_comm_or_process_local(const dsd_comm* comm) {
  if (comm != nullptr) return comm_or_local(comm);
  static const std::shared_ptr<Communicator> process_local = make_local_communicator();
  return process_local;
}

void give_report(dsd_incompatible_keys** out, checkpoint::LoadReport report) {
  give_keys(out, std::move(report.missing_keys), std::move(report.unexpected_keys),
            std::move(report.skipped_keys));
}

}  // namespace
}  // namespace dsd::capi

using dsd::capi::guard;
using dsd::capi::require;

extern "C" {

void dsd_checkpoint_save_options_init(dsd_checkpoint_save_options* options) {
  if (options == nullptr) return;
  const dsd::checkpoint::SaveOptions d;
  *options = dsd_checkpoint_save_options{};
  options->struct_size = sizeof(dsd_checkpoint_save_options);
  options->overwrite = d.overwrite;
  options->thread_count = d.thread_count;
  options->save_to_lowest_rank = d.save_to_lowest_rank;
  options->sync_files = d.sync_files;
  options->block_size = d.block_size;
  options->format = static_cast<dsd_format>(d.format);
  options->enable_plan_caching = d.enable_plan_caching;
  options->max_staging_bytes = d.max_staging_bytes;
  options->base = nullptr;
  options->incremental = d.incremental;
}

// dsd_checkpoint_save_options_init@DSD_1.1, for programs linked against 1.1 (a 40-byte
// struct): fills that prefix only.
__attribute__((visibility("default"))) void compat_1_1_dsd_checkpoint_save_options_init(
    dsd_checkpoint_save_options* options) {
  dsd::capi::init_earlier_version(options, dsd::capi::kSaveOptionsSizeV1_1, &dsd_checkpoint_save_options_init);
}
__asm__(".symver compat_1_1_dsd_checkpoint_save_options_init, dsd_checkpoint_save_options_init@DSD_1.1");

// dsd_checkpoint_save_options_init@DSD_1, for programs linked against 1.0 (a 32-byte
// struct): fills that prefix only, as convert.cpp's compat_1_0_dsd_format_convert_options_init.
__attribute__((visibility("default"))) void compat_1_0_dsd_checkpoint_save_options_init(
    dsd_checkpoint_save_options* options) {
  // enable_plan_caching, in the 1.0 struct's padding, gets its default (false) too.
  dsd::capi::init_earlier_version(options, dsd::capi::kSaveOptionsSizeV1, &dsd_checkpoint_save_options_init);
}
__asm__(".symver compat_1_0_dsd_checkpoint_save_options_init, dsd_checkpoint_save_options_init@DSD_1");

void dsd_checkpoint_load_options_init(dsd_checkpoint_load_options* options) {
  if (options == nullptr) return;
  const dsd::checkpoint::LoadOptions d;
  *options = dsd_checkpoint_load_options{};
  options->struct_size = sizeof(dsd_checkpoint_load_options);
  options->strict = d.strict;
  options->thread_count = d.thread_count;
  options->verify = d.verify;
  options->allow_external_files = d.allow_external_files;
  options->cooperative_load = d.cooperative != dsd::checkpoint::LoadOptions::Cooperative::kNever;
  options->cooperative_load_on_one_host = d.cooperative == dsd::checkpoint::LoadOptions::Cooperative::kAlways;
}

dsd_status dsd_checkpoint_save(dsd_comm* comm, const dsd_state_dict* sd, const char* path,
                               const dsd_checkpoint_save_options* options, dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    const dsd::Dict* d = TRY(dsd::capi::as_dict(sd, "sd"));
    TRY(require(path, "path"));
    auto opts = TRY(dsd::capi::save_options(options));
    auto c = dsd::capi::save_comm_or_process_local(comm);
    TRY(dsd::checkpoint::save(*c, *d, path, opts));
    return dsd::ok();
  });
}

dsd_status dsd_async_checkpointer_new(dsd_comm* comm, dsd_async_checkpointer** out,
                                      dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    TRY(require(out, "out"));
    *out = new dsd_async_checkpointer(dsd::capi::comm_or_local(comm));
    return dsd::ok();
  });
}

void dsd_async_checkpointer_free(dsd_async_checkpointer* checkpointer) { delete checkpointer; }

dsd_status dsd_checkpoint_save_async(dsd_async_checkpointer* checkpointer, const dsd_state_dict* sd,
                                     const char* path, const dsd_checkpoint_save_options* options,
                                     dsd_future** out, dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    TRY(require(checkpointer, "checkpointer"));
    const dsd::Dict* d = TRY(dsd::capi::as_dict(sd, "sd"));
    TRY(require(path, "path"));
    TRY(require(out, "out"));
    auto opts = TRY(dsd::capi::save_options(options));
    auto f = TRY(checkpointer->saver.save_async(*d, path, opts));
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

dsd_status dsd_checkpoint_load(dsd_comm* comm, dsd_state_dict* sd, const char* path,
                               const dsd_checkpoint_load_options* options,
                               dsd_incompatible_keys** out_keys, dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    dsd::Dict* d = TRY(dsd::capi::as_dict(sd, "sd"));
    TRY(require(path, "path"));
    auto opts = TRY(dsd::capi::load_options(options));
    auto c = dsd::capi::comm_or_local(comm);
    auto report = TRY(dsd::checkpoint::load(*c, *d, path, opts));
    dsd::capi::give_report(out_keys, std::move(report));
    return dsd::ok();
  });
}

dsd_status dsd_checkpoint_load_full(const char* path, const char* const* keys, size_t count,
                                    dsd_state_dict** out, dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    TRY(require(path, "path"));
    if (count > 0) TRY(require(keys, "keys"));
    TRY(require(out, "out"));
    std::vector<std::string> ks;
    for (size_t i = 0; i < count; ++i) {
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

dsd_status dsd_checkpoint_gc(const char* root, dsd_checkpoint_gc_report* out, dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    TRY(require(root, "root"));
    TRY(require(out, "out"));
    if (!dsd::checkpoint::is_directory(root)) {
      return dsd::make_error_at(dsd::Code::kNotFound, root, "checkpoint root '{}' does not exist", root);
    }
    auto report = TRY(dsd::checkpoint::collect_garbage(root));
    out->retired_removed = report.retired_removed;
    out->files_removed = report.files_removed;
    out->bytes_removed = report.bytes_removed;
    return dsd::ok();
  });
}

dsd_status dsd_checkpoint_manager_new(dsd_comm* comm, const char* root, int32_t keep_last,
                                      dsd_checkpoint_manager** out, dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    TRY(require(root, "root"));
    TRY(require(out, "out"));
    *out = new dsd_checkpoint_manager{dsd::capi::comm_or_local(comm),
                                      dsd::checkpoint::CheckpointManager(root, keep_last), nullptr};
    return dsd::ok();
  });
}

void dsd_checkpoint_manager_free(dsd_checkpoint_manager* manager) { delete manager; }

dsd_status dsd_checkpoint_manager_save(dsd_checkpoint_manager* manager, const dsd_state_dict* sd,
                                       int64_t step, const dsd_checkpoint_save_options* options,
                                       dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    TRY(require(manager, "manager"));
    const dsd::Dict* d = TRY(dsd::capi::as_dict(sd, "sd"));
    auto opts = TRY(dsd::capi::save_options(options));
    TRY(manager->manager.save(*manager->comm, *d, step, opts));
    return dsd::ok();
  });
}

dsd_status dsd_checkpoint_manager_save_async(dsd_checkpoint_manager* manager,
                                             const dsd_state_dict* sd, int64_t step,
                                             const dsd_checkpoint_save_options* options,
                                             dsd_future** out, dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    TRY(require(manager, "manager"));
    const dsd::Dict* d = TRY(dsd::capi::as_dict(sd, "sd"));
    TRY(require(out, "out"));
    auto opts = TRY(dsd::capi::save_options(options));
    if (!manager->saver) {
      manager->saver = std::make_unique<dsd::checkpoint::AsyncCheckpointer>(manager->comm);
    }
    auto f = TRY(manager->manager.save_async(*manager->saver, *d, step, opts));
    *out = new dsd_future{std::move(f)};
    return dsd::ok();
  });
}

dsd_status dsd_checkpoint_manager_latest_step(const dsd_checkpoint_manager* manager,
                                              bool* out_found, int64_t* out_step, dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    TRY(require(manager, "manager"));
    TRY(require(out_found, "out_found"));
    TRY(require(out_step, "out_step"));
    auto step = TRY(manager->manager.latest_step());
    *out_found = step.has_value();
    if (step) *out_step = *step;
    return dsd::ok();
  });
}

dsd_status dsd_checkpoint_manager_load_latest(dsd_checkpoint_manager* manager, dsd_state_dict* sd,
                                              const dsd_checkpoint_load_options* options,
                                              bool* out_found, int64_t* out_step, dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    TRY(require(manager, "manager"));
    dsd::Dict* d = TRY(dsd::capi::as_dict(sd, "sd"));
    TRY(require(out_found, "out_found"));
    TRY(require(out_step, "out_step"));
    auto opts = TRY(dsd::capi::load_options(options));
    auto s = TRY(manager->manager.load_latest(*manager->comm, *d, opts));
    *out_found = s.has_value();
    if (s) *out_step = *s;
    return dsd::ok();
  });
}

}  // extern "C"
