// Communicators: from the launcher's environment, a file store, an NCCL communicator.
#include "capi/src/export.h"

#include <cstring>

#include "capi/src/dists.h"
#include "capi/src/guard.h"
#include "capi/src/options.h"
#include "core/dist/nccl_comm.h"
#include "core/dist/rendezvous.h"

namespace dsd::capi {
namespace {

constexpr int64_t kDefaultTimeoutMs = 30 * 60 * 1000;

// The options a caller passed, checked; defaults for NULL.
Result<CommOptions> comm_options(const dsd_comm_options* o) {
  dsd_comm_options defaults;
  dsd_comm_options_init(&defaults);
  const dsd_comm_options in = TRY(read_options(o, defaults, {sizeof(dsd_comm_options)},
                                               "dsd_comm_options", "dsd_comm_options_init"));
  if (in.reserved != 0) return Error(Code::kInvalidArgument, "options->reserved must be 0");
  if (in.timeout_ms <= 0) {
    return make_error(Code::kInvalidArgument, "options->timeout_ms must be positive, not {}",
                      in.timeout_ms);
  }
  CommOptions out;
  out.timeout = std::chrono::milliseconds(in.timeout_ms);
  return out;
}

dsd_comm* wrap(std::shared_ptr<Communicator> c) {
  std::string backend = c->backend_name();
  return new dsd_comm(std::move(c), std::move(backend));
}

}  // namespace

std::shared_ptr<Communicator> comm_or_local(const dsd_comm* comm) {
  return comm == nullptr ? make_local_communicator() : comm->comm;
}

}  // namespace dsd::capi

using dsd::capi::guard;
using dsd::capi::require;

extern "C" {

void dsd_comm_options_init(dsd_comm_options* options) {
  if (options == nullptr) return;
  std::memset(options, 0, sizeof(*options));
  options->struct_size = sizeof(dsd_comm_options);
  options->timeout_ms = dsd::capi::kDefaultTimeoutMs;
}

dsd_status dsd_comm_new_from_env(const dsd_comm_options* options, dsd_comm** out, dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    TRY(require(out, "out"));
    dsd::CommOptions o = TRY(dsd::capi::comm_options(options));
    auto comm = TRY(dsd::communicator_from_env(o));
    *out = dsd::capi::wrap(std::move(comm));
    return dsd::ok();
  });
}

dsd_status dsd_comm_new_file_store(const char* path, int32_t rank, int32_t size,
                                   const dsd_comm_options* options, dsd_comm** out,
                                   dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    TRY(require(path, "path"));
    TRY(require(out, "out"));
    dsd::CommOptions o = TRY(dsd::capi::comm_options(options));
    auto comm = TRY(dsd::communicator_from_file_store(path, rank, size, o));
    *out = dsd::capi::wrap(std::move(comm));
    return dsd::ok();
  });
}

dsd_status dsd_comm_new_nccl(void* nccl_comm, void* cuda_stream, int32_t rank, int32_t size,
                             const dsd_comm_options* options, dsd_comm** out, dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    TRY(require(nccl_comm, "nccl_comm"));
    TRY(require(out, "out"));
    dsd::CommOptions o = TRY(dsd::capi::comm_options(options));
    auto comm = TRY(dsd::make_nccl_communicator(nccl_comm, cuda_stream, rank, size, o.timeout));
    *out = dsd::capi::wrap(std::move(comm));
    return dsd::ok();
  });
}

dsd_status dsd_comm_new_local(dsd_comm** out, dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    TRY(require(out, "out"));
    *out = dsd::capi::wrap(dsd::make_local_communicator());
    return dsd::ok();
  });
}

dsd_comm* dsd_comm_retain(dsd_comm* comm) { return dsd::capi::retain_root(comm); }

void dsd_comm_release(dsd_comm* comm) { dsd::capi::release_root(comm); }

dsd_status dsd_comm_rank(const dsd_comm* comm, int32_t* out, dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    TRY(require(comm, "comm"));
    TRY(require(out, "out"));
    *out = comm->comm->rank();
    return dsd::ok();
  });
}

dsd_status dsd_comm_size(const dsd_comm* comm, int32_t* out, dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    TRY(require(comm, "comm"));
    TRY(require(out, "out"));
    *out = comm->comm->size();
    return dsd::ok();
  });
}

dsd_status dsd_comm_backend(const dsd_comm* comm, const char** out, dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    TRY(require(comm, "comm"));
    TRY(require(out, "out"));
    *out = comm->backend.c_str();
    return dsd::ok();
  });
}

dsd_status dsd_comm_barrier(dsd_comm* comm, dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    TRY(require(comm, "comm"));
    return comm->comm->barrier();
  });
}

}  // extern "C"
