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
// Capped staging (SaveOptions::max_staging_bytes > 0, and the unique storages of the state
// hold more bytes than that): the state is staged in waves, and the host buffers of this
// checkpointer never hold more than max_staging_bytes at once. The background save starts
// at once with meta placeholders (SaveOptions::tensor_provider); once it knows this rank's
// write plan (SaveOptions::on_write_plan), save_async's thread copies each storage when a
// writer thread asks for one of its tensors, or ahead of that as far as the budget allows
// (in the order the writers should ask: by the bytes before each tensor in its data file),
// into buffers freed by tensors already written. The
// budget is a count of buffer bytes: a copy waits until its storage fits beside the buffers
// in use, and a storage larger than the whole budget is staged alone, once no other buffer
// is held (so the mark is max(max_staging_bytes, the largest storage)). Copied-ahead buffers
// no writer holds yet may be given up to a writer that is waiting, and copied again later;
// a writer holds one tensor at a time and needs nothing else to finish it, so the copies
// always progress. save_async returns (and the future reports is_staged()) only once every
// tensor this rank writes has been copied; tensors another rank writes (replicated ones)
// are never copied. It returns while the last wave is being written, so it blocks for about
// the time of writing all but the last max_staging_bytes of this rank's share. A storage
// shared by several keys is copied once while one of them is being written, again if a
// later key of it comes after its buffer was reused. The buffers of a capped save stay
// (at most max_staging_bytes) for the next capped save; the structure-keyed buffers of an
// uncapped save are freed by a capped one and the other way round, so the checkpointer
// never holds both. A failed copy (a device error, no memory) fails the writer that needs
// it, hence the save on every rank, and save_async returns at once; when the background
// save fails first (planning, a peer, the disk), the copies stop and save_async returns.
// A state that fits in max_staging_bytes is staged whole, as without a cap.
//
// Thread safety: one AsyncCheckpointer is driven by one thread at a time (the trainer's);
// SaveFuture is safe to share and to wait on from any thread.
#pragma once

#include <atomic>
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
  // With options.max_staging_bytes below the state's size, stages in waves (above) and
  // returns once every tensor this rank writes is copied. Staging errors are reported
  // through the future on every rank; an error is returned only when nothing could be
  // started (the background communicator could not be created).
  Result<std::shared_ptr<SaveFuture>> save_async(const Dict& state_dict, const std::string& path,
                                                 const SaveOptions& options = {},
                                                 OnCommit on_commit = {});

  // Host buffers allocated so far (tests check reuse with it).
  uint64_t staging_allocations() const { return allocations_; }
  // Bytes of host staging buffers held now: the structure-keyed buffers of an uncapped
  // save, or the wave buffers of a capped one.
  uint64_t staged_bytes() const;
  // The most bytes of host staging buffers held at once since the last save_async began
  // (including what it kept from the save before): at most max(max_staging_bytes, the
  // largest storage) for a capped save.
  uint64_t peak_staged_bytes() const { return peak_.load(); }

 private:
  struct Staging;
  struct Waves;
  struct Job;
  void worker_loop();
  Result<DictPtr> stage(const Dict& state_dict);
  // Capped staging: the placeholders and the shared state the caller's thread serves copies
  // from; nullptr (and the state staged whole) when it fits in `max_bytes`.
  Result<DictPtr> stage_in_waves(const Dict& state_dict, uint64_t max_bytes, std::shared_ptr<Waves>& waves);
  void note_staged_bytes();

  std::shared_ptr<Communicator> comm_;
  std::shared_ptr<Communicator> async_comm_;
  std::unique_ptr<Staging> staging_;
  std::shared_ptr<Waves> waves_;  // the last capped save's, kept for the buffers
  std::shared_ptr<SaveFuture> in_flight_;
  uint64_t allocations_ = 0;
  std::atomic<uint64_t> peak_{0};

  std::mutex mu_;
  std::condition_variable cv_;
  std::unique_ptr<Job> job_;
  bool stop_ = false;
  std::thread worker_;
};

}  // namespace dsd::checkpoint
