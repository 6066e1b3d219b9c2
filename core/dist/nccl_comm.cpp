#include "core/dist/nccl_comm.h"

#include "core/dist/backends.h"

#include "core/base/make_error.h"

#if DSD_HAVE_NCCL
#include <cuda_runtime_api.h>
#include <nccl.h>

#include <optional>
#include <string>
#include <thread>
#endif

namespace dsd {

#if !DSD_HAVE_NCCL

bool nccl_available() { return false; }

Result<std::shared_ptr<Communicator>> make_nccl_communicator(void*, void*, int, int,
                                                             std::chrono::milliseconds) {
  return make_error(Code::kUnsupported,
                    "this dsd was built without NCCL (meson found no nccl.h and libnccl, or no "
                    "CUDA runtime)");
}

#else

bool nccl_available() { return true; }

namespace {

std::string nccl_cause(ncclResult_t r, ncclComm_t comm) {
  const char* last = comm != nullptr ? ncclGetLastError(comm) : nullptr;
  if (last != nullptr && last[0] != '\0') return fmt::format("{} ({})", ncclGetErrorString(r), last);
  return ncclGetErrorString(r);
}

// Switches to the communicator's device for the scope, and back: the caller's thread keeps
// its own current device.
class DeviceScope {
 public:
  explicit DeviceScope(int device) {
    if (cudaGetDevice(&previous_) != cudaSuccess) previous_ = -1;
    if (previous_ != device) cudaSetDevice(device);
  }
  ~DeviceScope() {
    if (previous_ >= 0) cudaSetDevice(previous_);
  }
  DeviceScope(const DeviceScope&) = delete;
  DeviceScope& operator=(const DeviceScope&) = delete;

 private:
  int previous_ = -1;
};

std::optional<ncclDataType_t> nccl_type(at::ScalarType t) {
  switch (t) {
    case at::kChar: return ncclInt8;
    case at::kByte: return ncclUint8;
    case at::kInt: return ncclInt32;
    case at::kLong: return ncclInt64;
    case at::kHalf: return ncclFloat16;
    case at::kFloat: return ncclFloat32;
    case at::kDouble: return ncclFloat64;
    case at::kBFloat16: return ncclBfloat16;
    case at::kUInt32: return ncclUint32;
    case at::kUInt64: return ncclUint64;
#if NCCL_VERSION_CODE >= NCCL_VERSION(2, 24, 0)
    case at::kFloat8_e4m3fn: return ncclFloat8e4m3;
    case at::kFloat8_e5m2: return ncclFloat8e5m2;
#endif
    default: return std::nullopt;
  }
}

ncclRedOp_t nccl_op(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum: return ncclSum;
    case ReduceOp::kMax: return ncclMax;
    case ReduceOp::kMin: return ncclMin;
  }
  return ncclSum;
}

size_t nbytes(const at::Tensor& t) { return static_cast<size_t>(t.numel()) * t.element_size(); }

class NcclCommunicator final : public Communicator {
 public:
  struct Owned {
    bool comm = false;
    bool stream = false;
  };

  NcclCommunicator(ncclComm_t comm, cudaStream_t stream, int device, int rank, int size,
                   std::chrono::milliseconds timeout, Owned owned)
      : comm_(comm), stream_(stream), device_(device), rank_(rank), size_(size),
        timeout_(timeout), owned_(owned) {}

  ~NcclCommunicator() override {
    DeviceScope scope(device_);
    if (scratch_ != nullptr) cudaFree(scratch_);
    if (owned_.comm) {
      // A broken communicator may have kernels that never finish: abort rather than wait.
      if (broken_) {
        ncclCommAbort(comm_);
      } else {
        ncclCommDestroy(comm_);
      }
    }
    if (owned_.stream) cudaStreamDestroy(stream_);
  }

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  c10::DeviceType device_type() const override { return c10::DeviceType::CUDA; }
  std::string backend_name() const override { return "nccl"; }
  std::chrono::milliseconds timeout() const override { return timeout_; }

  Status broadcast(at::Tensor& tensor, int root) override {
    TRY(check_root("broadcast", root));
    TRY(check_tensor("broadcast", tensor));
    void* p = tensor.numel() == 0 ? nullptr : tensor.data_ptr();
    return run("broadcast", [&] {
      return ncclBroadcast(p, p, nbytes(tensor), ncclUint8, root, comm_, stream_);
    });
  }

  Status all_gather(at::Tensor& output, const at::Tensor& input) override {
    TRY(check_tensor("all_gather", input));
    TRY(check_tensor("all_gather", output));
    TRY(check_gathered("all_gather", output, input));
    if (input.numel() == 0) return usable("all_gather");
    return run("all_gather", [&] {
      return ncclAllGather(input.data_ptr(), output.data_ptr(), nbytes(input), ncclUint8, comm_,
                           stream_);
    });
  }

  Status gather(at::Tensor& output, const at::Tensor& input, int root) override {
    TRY(check_root("gather", root));
    TRY(check_tensor("gather", input));
    const bool receives = rank_ == root;
    if (receives) {
      TRY(check_tensor("gather", output));
      TRY(check_gathered("gather", output, input));
    }
    const size_t n = nbytes(input);
    if (n == 0) return usable("gather");
    return run("gather", [&]() -> ncclResult_t {
      auto* out = receives ? static_cast<char*>(output.data_ptr()) : nullptr;
      if (receives) {
        cudaError_t e = cudaMemcpyAsync(out + rank_ * n, input.data_ptr(), n,
                                        cudaMemcpyDeviceToDevice, stream_);
        if (e != cudaSuccess) return ncclUnhandledCudaError;
      }
      ncclResult_t r = ncclGroupStart();
      if (r != ncclSuccess) return r;
      if (receives) {
        for (int peer = 0; peer < size_ && r == ncclSuccess; ++peer) {
          if (peer != rank_) r = ncclRecv(out + peer * n, n, ncclUint8, peer, comm_, stream_);
        }
      } else {
        r = ncclSend(input.data_ptr(), n, ncclUint8, root, comm_, stream_);
      }
      ncclResult_t end = ncclGroupEnd();
      return r != ncclSuccess ? r : end;
    });
  }

  Status all_reduce(at::Tensor& tensor, ReduceOp op) override {
    TRY(check_tensor("all_reduce", tensor));
    if (tensor.numel() == 0) return usable("all_reduce");
    size_t count = static_cast<size_t>(tensor.numel());
    ncclRedOp_t rop = nccl_op(op);
    std::optional<ncclDataType_t> type = nccl_type(tensor.scalar_type());
    if (tensor.scalar_type() == at::kBool) {
      // Logical or / and on the bytes, as PyTorch's NCCL backend does.
      type = ncclUint8;
      if (op == ReduceOp::kSum) rop = ncclMax;
    } else if (tensor.scalar_type() == at::kComplexFloat || tensor.scalar_type() == at::kComplexDouble) {
      if (op == ReduceOp::kSum) {
        type = tensor.scalar_type() == at::kComplexFloat ? ncclFloat32 : ncclFloat64;
        count *= 2;  // a complex sum is the sum of the real and imaginary parts
      }
    }
    if (!type) {
      return make_error(Code::kUnsupported, "{}: NCCL cannot reduce {} tensors this way",
                        who("all_reduce"), c10::toString(tensor.scalar_type()));
    }
    void* p = tensor.data_ptr();
    return run("all_reduce", [&] { return ncclAllReduce(p, p, count, *type, rop, comm_, stream_); });
  }

  Status barrier() override {
    TRY(usable("barrier"));
    if (scratch_ == nullptr) {
      DeviceScope scope(device_);
      cudaError_t e = cudaMalloc(&scratch_, sizeof(float));
      if (e != cudaSuccess) {
        scratch_ = nullptr;
        return make_error(Code::kOutOfMemory, "{}: cudaMalloc failed: {}", who("barrier"),
                          cudaGetErrorString(e));
      }
    }
    return run("barrier", [&] { return ncclAllReduce(scratch_, scratch_, 1, ncclFloat32, ncclSum, comm_, stream_); });
  }

  Result<std::shared_ptr<Communicator>> clone(std::string_view tag) override {
    (void)tag;  // NCCL names nothing; the split communicator is identified by its handle
    TRY(usable("clone"));
    DeviceScope scope(device_);
    ncclComm_t split = nullptr;
    ncclResult_t r = ncclCommSplit(comm_, 0, rank_, &split, nullptr);
    if (r != ncclSuccess) {
      return make_error(Code::kComm, "{} failed: ncclCommSplit: {}", who("clone"), nccl_cause(r, comm_));
    }
    cudaStream_t stream = nullptr;
    cudaError_t e = cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking);
    if (e != cudaSuccess) {
      ncclCommDestroy(split);
      return make_error(Code::kDevice, "{} failed: cudaStreamCreate: {}", who("clone"),
                        cudaGetErrorString(e));
    }
    return std::shared_ptr<Communicator>(std::make_shared<NcclCommunicator>(
        split, stream, device_, rank_, size_, timeout_, Owned{true, true}));
  }

 private:
  std::string who(const char* what) const {
    return fmt::format("{} on rank {} of {} (nccl, cuda:{})", what, rank_, size_, device_);
  }

  Status usable(const char* what) const {
    if (!broken_) return ok();
    return Error(broken_->code, fmt::format("{} cannot run: the communicator is broken since an "
                                            "earlier failure ({})",
                                            who(what), broken_->message));
  }

  Status fail(Code code, const char* what, const std::string& cause) {
    broken_ = Error(code, fmt::format("{} failed: {}", who(what), cause));
    return *broken_;
  }

  // Enqueues a collective, then waits for the stream, polling for NCCL's asynchronous errors
  // and for the deadline so a dead peer cannot hang the caller.
  template <class F>
  Status run(const char* what, F&& enqueue) {
    TRY(usable(what));
    DeviceScope scope(device_);
    ncclResult_t r = enqueue();
    if (r != ncclSuccess && r != ncclInProgress) return fail(Code::kComm, what, nccl_cause(r, comm_));
    const auto deadline = std::chrono::steady_clock::now() + timeout_;
    auto pause = std::chrono::microseconds(1);
    while (true) {
      cudaError_t e = cudaStreamQuery(stream_);
      if (e == cudaSuccess) return ok();
      if (e != cudaErrorNotReady) return fail(Code::kComm, what, cudaGetErrorString(e));
      ncclResult_t async = ncclSuccess;
      ncclCommGetAsyncError(comm_, &async);
      if (async != ncclSuccess && async != ncclInProgress) {
        return fail(Code::kComm, what, nccl_cause(async, comm_));
      }
      if (std::chrono::steady_clock::now() > deadline) {
        return fail(Code::kTimeout, what,
                    fmt::format("not finished after {} ms (a peer died or stopped calling "
                                "collectives; abort the NCCL communicator)",
                                timeout_.count()));
      }
      std::this_thread::sleep_for(pause);
      pause = std::min(pause * 2, std::chrono::microseconds(1000));
    }
  }

  Status check_root(const char* what, int root) const {
    if (root >= 0 && root < size_) return ok();
    return make_error(Code::kInvalidArgument, "{}: root {} is outside a world of {}", who(what),
                      root, size_);
  }

  Status check_tensor(const char* what, const at::Tensor& t) const {
    if (!t.is_cuda() || t.device().index() != device_) {
      return make_error(Code::kDevice, "{}: the tensor is on {}, NCCL needs cuda:{}", who(what),
                        t.device().str(), device_);
    }
    if (!t.is_contiguous()) {
      return make_error(Code::kInvalidArgument, "{}: the tensor is not contiguous", who(what));
    }
    return ok();
  }

  Status check_gathered(const char* what, const at::Tensor& output, const at::Tensor& input) const {
    if (output.scalar_type() != input.scalar_type()) {
      return make_error(Code::kDtypeMismatch, "{}: output is {} but input is {}", who(what),
                        c10::toString(output.scalar_type()), c10::toString(input.scalar_type()));
    }
    if (output.numel() != input.numel() * size_) {
      return make_error(Code::kShapeMismatch,
                        "{}: output has {} elements, expected {} ({} ranks x {} input elements)",
                        who(what), output.numel(), input.numel() * size_, size_, input.numel());
    }
    return ok();
  }

  ncclComm_t comm_;
  cudaStream_t stream_;
  int device_;
  int rank_;
  int size_;
  std::chrono::milliseconds timeout_;
  Owned owned_;
  void* scratch_ = nullptr;
  std::optional<Error> broken_;
};

}  // namespace

Result<std::shared_ptr<Communicator>> make_nccl_communicator(void* nccl_comm, void* cuda_stream,
                                                             int rank, int size,
                                                             std::chrono::milliseconds timeout) {
  if (nccl_comm == nullptr) return make_error(Code::kInvalidArgument, "the NCCL communicator is null");
  if (timeout.count() <= 0) {
    return make_error(Code::kInvalidArgument, "the timeout must be positive, not {} ms", timeout.count());
  }
  auto comm = static_cast<ncclComm_t>(nccl_comm);
  int count = 0;
  int user_rank = 0;
  int device = 0;
  ncclResult_t r = ncclCommCount(comm, &count);
  if (r == ncclSuccess) r = ncclCommUserRank(comm, &user_rank);
  if (r == ncclSuccess) r = ncclCommCuDevice(comm, &device);
  if (r != ncclSuccess) {
    return make_error(Code::kComm, "cannot query the NCCL communicator: {}", nccl_cause(r, comm));
  }
  if (count != size) {
    return make_error(Code::kInvalidArgument, "the NCCL communicator has {} ranks, but size is {}",
                      count, size);
  }
  if (user_rank != rank) {
    return make_error(Code::kInvalidArgument, "the NCCL communicator is rank {}, but rank is {}",
                      user_rank, rank);
  }
  return std::shared_ptr<Communicator>(std::make_shared<NcclCommunicator>(
      comm, static_cast<cudaStream_t>(cuda_stream), device, rank, size, timeout,
      NcclCommunicator::Owned{}));
}

#endif

}  // namespace dsd
