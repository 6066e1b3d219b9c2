// Asynchronous save: the state is copied ("staged") into host buffers on the caller's thread,
// then a background thread plans, writes and commits while training goes on.
//
// An AsyncCheckpointer owns the staging buffers (pinned host memory when CUDA is available)
// and one background thread with its own communicator (comm.clone("async")), so its
// collectives never interleave with the trainer's. Buffers are cached by the structure of
// the state dict (keys, dtypes, shapes, strides, storage sharing): saving the same structure
// again allocates nothing. Tensors that share a storage (tied weights, views) are staged
// once and keep their offsets and strides. Staging buffers are allocated and freed on the
// thread that calls save_async() / the destructor, never on the background thread.
//
// Thread safety: one AsyncCheckpointer is driven by one thread at a time (the trainer's);
// SaveFuture is safe to share and to wait on from any thread.
#pragma once

#include <chrono>
#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>

#include "core/base/result.h"
#include "core/checkpoint/save.h"
#include "core/dist/comm.h"
#include "core/statedict/value.h"

namespace dsd::checkpoint {

class SaveFuture {
 public:
  // True once the state has been copied out: the caller may modify its tensors again.
  bool is_staged() const;
  // True once the save committed or failed.
  bool is_done() const;
  // Waits up to `timeout` (negative: forever). kTimeout when still running, the save's error
  // when it failed (the same on every rank), ok() when committed.
  Status wait(std::chrono::milliseconds timeout = std::chrono::milliseconds(-1)) const;
  // The save id once committed.
  std::string save_id() const;

  // Used by the checkpointer.
  void set_staged();
  void set_done(Result<SaveInfo> result);

 private:
  mutable std::mutex mu_;
  mutable std::condition_variable cv_;
  bool staged_ = false;
  bool done_ = false;
  Status status_;
  std::string save_id_;
};

class AsyncCheckpointer {
 public:
  // Called on the background thread after a successful commit, with the background
  // communicator (collective: every rank runs it); its error fails the future.
  using OnCommit = std::function<Status(Communicator&)>;

  explicit AsyncCheckpointer(std::shared_ptr<Communicator> comm);
  // Waits for the save in flight, stops the thread, frees the staging buffers.
  ~AsyncCheckpointer();
  AsyncCheckpointer(const AsyncCheckpointer&) = delete;
  AsyncCheckpointer& operator=(const AsyncCheckpointer&) = delete;

  // Stages `state_dict` and starts saving it to `path`. Collective (every rank calls it in the
  // same order). Waits first for a previous save still in flight, whose buffers are reused.
  // Staging errors are reported through the future on every rank; an error is returned only
  // when nothing could be started (the background communicator could not be created).
  Result<std::shared_ptr<SaveFuture>> save_async(const Dict& state_dict, const std::string& path,
                                                 const SaveOptions& options = {},
                                                 OnCommit on_commit = {});

  // Host buffers allocated so far (tests check reuse with it).
  uint64_t staging_allocations() const { return allocations_; }
  uint64_t staged_bytes() const;

 private:
  struct Staging;
  struct Job;
  void worker_loop();
  Result<DictPtr> stage(const Dict& state_dict);

  std::shared_ptr<Communicator> comm_;
  std::shared_ptr<Communicator> async_comm_;
  std::unique_ptr<Staging> staging_;
  std::shared_ptr<SaveFuture> in_flight_;
  uint64_t allocations_ = 0;

  std::mutex mu_;
  std::condition_variable cv_;
  std::unique_ptr<Job> job_;
  bool stop_ = false;
  std::thread worker_;
};

}  // namespace dsd::checkpoint
