// parallel_for: a bounded set of threads pulling indices until done or one fails.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <thread>
#include <vector>

#include "core/base/result.h"

namespace dsd::checkpoint {

// Runs fn(i) for i in [0, n) on up to `threads` threads (the caller's included). Stops
// handing out work after the first failure and returns the failure of the lowest index.
template <class Fn>
Status parallel_for(size_t n, int threads, Fn&& fn) {
  if (n == 0) return ok();
  std::atomic<size_t> next{0};
  std::atomic<bool> failed{false};
  std::vector<Status> status(n);
  auto worker = [&] {
    for (size_t i; !failed.load(std::memory_order_relaxed) && (i = next++) < n;) {
      status[i] = fn(i);
      if (!status[i].ok()) failed = true;
    }
  };
  const size_t nthreads = std::min(n, static_cast<size_t>(std::max(1, threads)));
  std::vector<std::thread> pool;
  pool.reserve(nthreads - 1);
  for (size_t t = 1; t < nthreads; ++t) pool.emplace_back(worker);
  worker();
  for (auto& t : pool) t.join();
  for (Status& s : status) {
    if (!s.ok()) return std::move(s);
  }
  return ok();
}

// The cores this process may run on, shared among the ranks started on this machine
// (LOCAL_WORLD_SIZE from torchrun/dsdrun, OMPI_COMM_WORLD_LOCAL_SIZE from mpirun): four ranks
// on a machine with 8 cores get 2 threads each, not 8, so their pools do not fight over cores.
int cores_per_local_rank();

// `requested` threads when positive, else cores_per_local_rank() capped at `cap`.
inline int default_threads(int requested, unsigned cap) {
  if (requested > 0) return requested;
  return std::min(static_cast<int>(cap), cores_per_local_rank());
}

}  // namespace dsd::checkpoint
