// Communicator: the collectives dsd needs, over libtorch's c10d process groups (Gloo on CPU,
// NCCL on GPU) or over a caller-owned ncclComm_t.
//
// Made by communicator_from_env() / communicator_from_file_store() (core/dist/rendezvous.h,
// Gloo) or make_nccl_communicator() (core/dist/nccl_comm.h); make_local_communicator() below
// is a world of one.
//
// Every collective is called by all ranks in the same order. A failure (a dead peer, a
// timeout) is returned as an Error (kComm or kTimeout) naming the collective, the rank and
// the cause, on every rank that waits for the peer, within timeout(); after it the
// communicator is broken and every later collective returns that first error. Argument
// errors (a bad root, a size mismatch, an unsupported dtype) are detected locally, touch no
// peer and do not break it. Communicators are shared (std::shared_ptr) by meshes, layouts and
// state dicts; one communicator is used by one thread at a time (clone() one for another
// thread). attachment() alone may be called from any thread.
#pragma once

#include <ATen/core/Tensor.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <vector>

#include "core/base/result.h"

namespace dsd {

enum class ReduceOp { kSum, kMax, kMin };

// State a layer above core/dist keeps per communicator (core/checkpoint/plan_cache.h: the
// save-plan cache), opaque here. It lives as long as the communicator and guards itself
// when it may be reached from several threads.
class CommAttachment {
 public:
  virtual ~CommAttachment() = default;
};

class Communicator {
 public:
  virtual ~Communicator() = default;

  // The attachment stored under `key`, made by `make` on the first call for that key. `key`
  // is the address of a static object of the layer that owns the attachment, so two layers
  // never collide. Freed with this communicator; a clone() starts without attachments (its
  // collectives are another channel, so nothing cached for this one is valid there).
  CommAttachment& attachment(const void* key, const std::function<std::unique_ptr<CommAttachment>()>& make);

  virtual int rank() const = 0;
  virtual int size() const = 0;
  // The device collectives run on: CPU for Gloo, CUDA for NCCL.
  virtual c10::DeviceType device_type() const = 0;
  // What it runs over, e.g. "gloo", "nccl", "local".
  virtual std::string backend_name() const = 0;
  virtual std::chrono::milliseconds timeout() const = 0;

  // In place on every rank: `tensor` on `root` is copied into `tensor` on every other rank.
  virtual Status broadcast(at::Tensor& tensor, int root) = 0;
  // `output` is contiguous with size() * input.numel() elements of input's dtype; rank r's
  // `input` lands at [r * n, (r + 1) * n).
  virtual Status all_gather(at::Tensor& output, const at::Tensor& input) = 0;
  // Like all_gather, but only `root` receives (`output` is ignored elsewhere).
  virtual Status gather(at::Tensor& output, const at::Tensor& input, int root) = 0;
  virtual Status all_reduce(at::Tensor& tensor, ReduceOp op) = 0;
  virtual Status barrier() = 0;

  // A new communicator over the same ranks with its own channel, for background work
  // (async save) that must not interleave with the caller's collectives.
  virtual Result<std::shared_ptr<Communicator>> clone(std::string_view tag) = 0;

 private:
  std::mutex attachments_mu_;  // guards attachments_
  std::vector<std::pair<const void*, std::unique_ptr<CommAttachment>>> attachments_;
};

// A communicator of one rank: every collective is a local copy.
std::shared_ptr<Communicator> make_local_communicator();

// ---------------------------------------------------------------------------------------------
// Helpers over the collectives above.

// Every rank's bytes, in rank order.
Result<std::vector<std::string>> all_gather_bytes(Communicator& comm, std::string_view mine);
// `root`'s bytes on every rank (`mine` is ignored on other ranks).
Result<std::string> broadcast_bytes(Communicator& comm, std::string_view mine, int root);
// Collective error agreement: every rank passes its own status; all return the error of the
// lowest failing rank (same code and message), or ok() when all succeeded. This is how an
// error on one rank (a key mismatch, a bad shape) fails the call everywhere instead of
// leaving the others to hang in the next collective.
Status agree(Communicator& comm, Status local);

}  // namespace dsd
