#include "core/dist/gloo_comm.h"

#include "core/dist/backends.h"

#if DSD_HAVE_GLOO
// ProcessGroupGloo.hpp declares nothing unless USE_C10D_GLOO is defined; libtorch_cpu has the
// implementation. The torch wheel ships no Gloo headers, Debian's libgloo-dev does, and only
// this file includes them.
#define USE_C10D_GLOO 1
#include <ATen/ops/view_as_real.h>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>

#include <fmt/ranges.h>

#include <optional>
#include <thread>
#include <utility>
#include <vector>

#include "core/base/torch_call.h"
#endif

#include "core/base/make_error.h"

namespace dsd {

#if !DSD_HAVE_GLOO

bool gloo_available() { return false; }

Result<std::shared_ptr<Communicator>> make_gloo_communicator(GlooConfig) {
  return make_error(Code::kUnsupported,
                    "this dsd was built without Gloo (meson found no gloo headers), so it has no "
                    "CPU communicator");
}

#else

bool gloo_available() { return true; }

namespace {

// A contiguous CPU tensor standing in for the caller's tensor; `origin` is set when it is a
// copy, so in-place results can be copied back.
struct Staged {
  at::Tensor cpu;
  at::Tensor origin;
};

Result<Staged> stage(const at::Tensor& t) {
  if (t.device().is_cpu() && t.is_contiguous()) return Staged{t, {}};
  return torch_call(Code::kDevice, "copying a tensor to the CPU for gloo", [&] {
    return Staged{t.cpu().contiguous(), t};
  });
}

Status copy_back(const Staged& s) {
  if (!s.origin.defined()) return ok();
  return torch_call(Code::kDevice, "copying a gloo result back to its tensor",
                    [&] { const_cast<at::Tensor&>(s.origin).copy_(s.cpu); });
}

// The bytes of a contiguous tensor as a flat uint8 tensor: data movement never looks at the
// dtype, so every dtype dsd has (uint16, complex, float8, ...) travels over Gloo.
at::Tensor bytes_of(const at::Tensor& contiguous) {
  return contiguous.reshape({-1}).view(at::kByte);
}

c10d::ReduceOp to_c10d(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum: return c10d::ReduceOp::SUM;
    case ReduceOp::kMax: return c10d::ReduceOp::MAX;
    case ReduceOp::kMin: return c10d::ReduceOp::MIN;
  }
  return c10d::ReduceOp::SUM;
}

const char* op_name(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum: return "sum";
    case ReduceOp::kMax: return "max";
    case ReduceOp::kMin: return "min";
  }
  return "?";
}

class GlooCommunicator final : public Communicator {
 public:
  GlooCommunicator(GlooConfig config, c10::intrusive_ptr<c10d::ProcessGroupGloo> pg)
      : config_(std::move(config)), pg_(std::move(pg)) {}

  int rank() const override { return config_.rank; }
  int size() const override { return config_.size; }
  c10::DeviceType device_type() const override { return c10::DeviceType::CPU; }
  std::string backend_name() const override { return "gloo"; }
  std::chrono::milliseconds timeout() const override { return config_.timeout; }

  Status broadcast(at::Tensor& tensor, int root) override {
    TRY(check_root("broadcast", root));
    if (tensor.numel() == 0) return usable("broadcast");
    Staged s = TRY(stage(tensor));
    std::vector<at::Tensor> ts{bytes_of(s.cpu)};
    c10d::BroadcastOptions o;
    o.rootRank = root;
    TRY(run("broadcast", [&] { return pg_->broadcast(ts, o); }));
    return copy_back(s);
  }

  Status all_gather(at::Tensor& output, const at::Tensor& input) override {
    TRY(check_gathered("all_gather", output, input));
    if (input.numel() == 0) return usable("all_gather");
    Staged in = TRY(stage(input));
    Staged out = TRY(stage(output));
    at::Tensor in_bytes = bytes_of(in.cpu);
    at::Tensor out_bytes = bytes_of(out.cpu);
    TRY(run("all_gather", [&] { return pg_->_allgather_base(out_bytes, in_bytes); }));
    return copy_back(out);
  }

  Status gather(at::Tensor& output, const at::Tensor& input, int root) override {
    TRY(check_root("gather", root));
    const bool receives = config_.rank == root;
    if (receives) TRY(check_gathered("gather", output, input));
    if (input.numel() == 0) return usable("gather");
    Staged in = TRY(stage(input));
    std::vector<at::Tensor> inputs{bytes_of(in.cpu)};
    std::vector<std::vector<at::Tensor>> outputs;
    Staged out;
    if (receives) {
      out = TRY(stage(output));
      at::Tensor all = bytes_of(out.cpu);
      const int64_t n = inputs[0].numel();
      outputs.emplace_back();
      for (int r = 0; r < config_.size; ++r) outputs[0].push_back(all.narrow(0, r * n, n));
    }
    c10d::GatherOptions o;
    o.rootRank = root;
    TRY(run("gather", [&] { return pg_->gather(outputs, inputs, o); }));
    return receives ? copy_back(out) : ok();
  }

  Status all_reduce(at::Tensor& tensor, ReduceOp op) override {
    if (tensor.numel() == 0) return usable("all_reduce");
    c10d::ReduceOp rop = to_c10d(op);
    Staged s = TRY(stage(tensor));
    at::Tensor arg = s.cpu;
    switch (tensor.scalar_type()) {
      case at::kFloat: case at::kDouble: case at::kHalf: case at::kBFloat16:
      case at::kChar: case at::kByte: case at::kInt: case at::kLong:
        break;
      case at::kBool:
        // Logical or / and, as PyTorch's NCCL backend treats bool: a byte sum could store 2
        // in a bool.
        arg = arg.view(at::kByte);
        if (op == ReduceOp::kSum) rop = c10d::ReduceOp::MAX;
        break;
      case at::kComplexFloat: case at::kComplexDouble:
        if (op != ReduceOp::kSum) return unsupported_reduce(tensor, op);
        arg = at::view_as_real(arg);
        break;
      default:
        return unsupported_reduce(tensor, op);
    }
    std::vector<at::Tensor> ts{arg};
    c10d::AllreduceOptions o;
    o.reduceOp = rop;
    TRY(run("all_reduce", [&] { return pg_->allreduce(ts, o); }));
    return copy_back(s);
  }

  Status barrier() override {
    return run("barrier", [&] { return pg_->barrier(c10d::BarrierOptions()); });
  }

  Result<std::shared_ptr<Communicator>> clone(std::string_view tag) override {
    TRY(usable("clone"));
    GlooConfig c = config_;
    // Every rank clones in the same order, so the counter names the same process group
    // everywhere; the tag only makes the keys readable.
    c.prefix = fmt::format("{}/clone{}-{}", config_.prefix, clones_++, tag);
    return make_gloo_communicator(std::move(c));
  }

 private:
  std::string who(const char* what) const {
    return fmt::format("{} on rank {} of {} (gloo, {})", what, config_.rank, config_.size,
                       config_.where);
  }

  Status usable(const char* what) const {
    if (!broken_) return ok();
    return Error(broken_->code,
                 fmt::format("{} cannot run: the communicator is broken since an earlier "
                             "failure ({})",
                             who(what), broken_->message));
  }

  // Starts a collective and waits for it. A failure breaks the communicator for good.
  template <class F>
  Status run(const char* what, F&& start) {
    TRY(usable(what));
    Status s = comm_call(who(what) + " failed", [&] {
      c10::intrusive_ptr<c10d::Work> work = start();
      work->wait();
    });
    if (!s.ok()) broken_ = s.error();
    return s;
  }

  Status check_root(const char* what, int root) const {
    if (root >= 0 && root < config_.size) return ok();
    return make_error(Code::kInvalidArgument, "{}: root {} is outside a world of {}", who(what),
                      root, config_.size);
  }

  Status check_gathered(const char* what, const at::Tensor& output, const at::Tensor& input) const {
    if (output.scalar_type() != input.scalar_type()) {
      return make_error(Code::kDtypeMismatch, "{}: output is {} but input is {}", who(what),
                        c10::toString(output.scalar_type()), c10::toString(input.scalar_type()));
    }
    if (output.numel() != input.numel() * config_.size) {
      return make_error(Code::kShapeMismatch,
                        "{}: output has {} elements, expected {} ({} ranks x {} input elements)",
                        who(what), output.numel(), input.numel() * config_.size, config_.size,
                        input.numel());
    }
    return ok();
  }

  Status unsupported_reduce(const at::Tensor& t, ReduceOp op) const {
    return make_error(Code::kUnsupported, "{}: gloo cannot reduce {} tensors with {}",
                      who("all_reduce"), c10::toString(t.scalar_type()), op_name(op));
  }

  GlooConfig config_;
  c10::intrusive_ptr<c10d::ProcessGroupGloo> pg_;
  std::optional<Error> broken_;
  int clones_ = 0;
};

// The ranks that came all time out at about the same moment; if the host of the store left
// first, the others would see a closed connection instead of who is missing. So each records
// that it gave up, and the host waits (briefly) until everyone present has.
void linger_until_all_gave_up(c10d::Store& store, const GlooConfig& c, int present) {
  auto gave_up = comm_call("", [&] { return store.add("gave_up", 1); });
  if (!c.hosts_store || !gave_up.ok()) return;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
  while (std::chrono::steady_clock::now() < deadline) {
    auto n = comm_call("", [&] { return store.add("gave_up", 0); });
    if (!n.ok() || *n >= present) return;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
}

// Every rank announces itself, then waits for all the others, so a rank that never comes is
// reported by number rather than by Gloo's list of store keys.
Status wait_for_peers(c10d::Store& store, const GlooConfig& c) {
  const std::string what =
      fmt::format("rendezvous of rank {} of {} ({})", c.rank, c.size, c.where);
  const int64_t claims = TRY(comm_call(what + " failed", [&] {
    return store.add(fmt::format("claim/{}", c.rank), 1);
  }));
  if (claims != 1) {
    return make_error(Code::kInvalidArgument,
                      "{} failed: another process already joined as rank {} (two processes "
                      "with the same rank, or a store left over from an earlier run)",
                      what, c.rank);
  }
  std::vector<std::string> keys;
  for (int r = 0; r < c.size; ++r) keys.push_back(fmt::format("joined/{}", r));
  TRY(comm_call(what + " failed", [&] {
    store.set(keys[static_cast<size_t>(c.rank)], std::vector<uint8_t>{1});
  }));
  Status waited = comm_call(what + " failed", [&] { store.wait(keys, c.timeout); });
  if (waited.ok()) return ok();
  std::vector<int> missing;
  for (int r = 0; r < c.size; ++r) {
    auto there = comm_call("checking", [&] { return store.check({keys[static_cast<size_t>(r)]}); });
    if (!there.ok()) return waited;  // the store itself is gone: its error says more
    if (!*there) missing.push_back(r);
  }
  if (missing.empty()) return waited;
  linger_until_all_gave_up(store, c, c.size - static_cast<int>(missing.size()));
  return make_error(Code::kTimeout, "{} timed out after {} ms: rank(s) {} never joined", what,
                    c.timeout.count(), fmt::join(missing, ", "));
}

}  // namespace

Result<std::shared_ptr<Communicator>> make_gloo_communicator(GlooConfig config) {
  if (!config.store) return make_error(Code::kInvalidArgument, "a gloo communicator needs a store");
  if (config.size < 1 || config.rank < 0 || config.rank >= config.size) {
    return make_error(Code::kInvalidArgument, "rank {} is outside a world of {}", config.rank,
                      config.size);
  }
  if (config.timeout.count() <= 0) {
    return make_error(Code::kInvalidArgument, "the timeout must be positive, not {} ms",
                      config.timeout.count());
  }
  c10::intrusive_ptr<c10d::Store> store;
  TRY(comm_call("opening the store", [&] {
    store = c10::make_intrusive<c10d::PrefixStore>(config.prefix, config.store);
  }));
  TRY(wait_for_peers(*store, config));
  auto pg = TRY(comm_call(fmt::format("connecting rank {} of {} to its peers over gloo ({}) failed",
                                      config.rank, config.size, config.where),
                          [&] {
                            auto options = c10d::ProcessGroupGloo::Options::create_default(config.timeout);
                            return c10::make_intrusive<c10d::ProcessGroupGloo>(
                                store, config.rank, config.size, options);
                          }));
  return std::shared_ptr<Communicator>(
      std::make_shared<GlooCommunicator>(std::move(config), std::move(pg)));
}

#endif

}  // namespace dsd
