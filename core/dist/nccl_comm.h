// The NCCL communicator: dsd's Communicator over a caller-owned ncclComm_t and cudaStream_t,
// for trainers that already have one (Julia's NCCL.jl, a C++ trainer). The NCCL C API is
// called directly; libtorch's ProcessGroupNCCL is not involved.
#pragma once

#include <chrono>
#include <memory>

#include "core/base/result.h"
#include "core/dist/comm.h"

namespace dsd {

// Whether this build has the NCCL communicator (meson found nccl.h, libnccl and CUDA).
bool nccl_available();

// Wraps `nccl_comm` (an ncclComm_t) and `cuda_stream` (a cudaStream_t; nullptr is the legacy
// default stream). Borrows both: the caller keeps them alive, and does not run other work on
// the communicator concurrently, while this communicator or anything holding it (meshes,
// layouts, state dicts) lives. `rank` and `size` must be the communicator's own (checked).
//
// Collectives take contiguous CUDA tensors on the communicator's device (kDevice otherwise),
// are enqueued on the stream, and return once the stream has finished them: dsd reads results
// on the host. A collective still running after `timeout`, or an asynchronous NCCL error,
// fails with kTimeout / kComm and breaks this communicator; the NCCL communicator itself is
// then unusable and the caller should ncclCommAbort() it. clone() makes an owned
// communicator with ncclCommSplit() and a stream of its own. Errors: kUnsupported in a build
// without NCCL, kInvalidArgument for a rank or size that disagrees with the communicator.
Result<std::shared_ptr<Communicator>> make_nccl_communicator(void* nccl_comm, void* cuda_stream,
                                                             int rank, int size,
                                                             std::chrono::milliseconds timeout);

}  // namespace dsd
