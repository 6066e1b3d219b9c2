// The Gloo communicator: dsd's Communicator over c10d's ProcessGroupGloo (CPU tensors).
//
// Internal to core/dist: callers build communicators with core/dist/rendezvous.h, which
// makes the store. This header pulls in c10d's Store, so keep it out of other headers.
#pragma once

#include <torch/csrc/distributed/c10d/Store.hpp>

#include <chrono>
#include <memory>
#include <string>

#include "core/base/result.h"
#include "core/dist/comm.h"

namespace dsd {

// Whether this build has the Gloo communicator (meson found gloo's headers).
bool gloo_available();

struct GlooConfig {
  // The rendezvous store, shared by every communicator of the world and its clones.
  c10::intrusive_ptr<c10d::Store> store;
  // Every key this communicator writes lives under this prefix; clones add to it.
  std::string prefix;
  // Where the store is, for messages ("tcp://10.0.0.1:29500", "file:///tmp/x").
  std::string where;
  // Whether this process hosts the store's server (rank 0 of a TCPStore without an agent):
  // after a failed rendezvous it keeps the server up until the others have seen the failure.
  bool hosts_store = false;
  int rank = 0;
  int size = 1;
  // Applies to the rendezvous and to every collective.
  std::chrono::milliseconds timeout{std::chrono::minutes(30)};
};

// Joins the process group: collective over all `size` ranks. Fails with kTimeout, naming the
// missing ranks, when some rank does not arrive within the timeout, with kComm when the
// connections cannot be made, and with kUnsupported in a build without Gloo.
//
// Collectives accept tensors of every dtype dsd supports (data movement is done on bytes);
// all_reduce takes the dtypes Gloo reduces natively plus complex sums. Tensors that are not
// contiguous or not on the CPU are staged through a contiguous CPU copy. A collective that
// fails (peer died, timeout, store error) returns kComm or kTimeout naming the collective,
// the rank and the cause, and leaves the communicator broken: every later call fails with
// the first error, since Gloo's connections are in an unknown state after a failure.
Result<std::shared_ptr<Communicator>> make_gloo_communicator(GlooConfig config);

}  // namespace dsd
