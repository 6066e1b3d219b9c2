#include "core/dist/comm.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <cstring>

#include "core/base/make_error.h"

namespace dsd {
namespace {

class LocalCommunicator final : public Communicator {
 public:
  int rank() const override { return 0; }
  int size() const override { return 1; }
  c10::DeviceType device_type() const override { return c10::DeviceType::CPU; }
  std::string backend_name() const override { return "local"; }
  std::chrono::milliseconds timeout() const override { return std::chrono::milliseconds(0); }
  Status broadcast(at::Tensor&, int) override { return ok(); }
  Status all_gather(at::Tensor& output, const at::Tensor& input) override {
    output.view(input.sizes()).copy_(input);
    return ok();
  }
  Status gather(at::Tensor& output, const at::Tensor& input, int) override {
    return all_gather(output, input);
  }
  Status all_reduce(at::Tensor&, ReduceOp) override { return ok(); }
  Status barrier() override { return ok(); }
  Result<std::shared_ptr<Communicator>> clone(std::string_view) override {
    return std::shared_ptr<Communicator>(std::make_shared<LocalCommunicator>());
  }
};

at::Tensor bytes_tensor(std::string_view s, int64_t padded) {
  at::Tensor t = at::zeros({padded}, at::kByte);
  if (!s.empty()) std::memcpy(t.data_ptr(), s.data(), s.size());
  return t;
}

}  // namespace

CommAttachment& Communicator::attachment(const void* key,
                                         const std::function<std::unique_ptr<CommAttachment>()>& make) {
  std::lock_guard<std::mutex> lock(attachments_mu_);
  for (auto& [k, a] : attachments_) {
    if (k == key) return *a;
  }
  return *attachments_.emplace_back(key, make()).second;
}

std::shared_ptr<Communicator> make_local_communicator() {
  return std::make_shared<LocalCommunicator>();
}

Result<std::vector<std::string>> all_gather_bytes(Communicator& comm, std::string_view mine) {
  const int n = comm.size();
  at::Tensor len = at::empty({1}, at::kLong);
  len.data_ptr<int64_t>()[0] = static_cast<int64_t>(mine.size());
  at::Tensor lens = at::empty({n}, at::kLong);
  TRY(comm.all_gather(lens, len));
  int64_t max_len = 1;
  for (int r = 0; r < n; ++r) max_len = std::max(max_len, lens.data_ptr<int64_t>()[r]);
  at::Tensor in = bytes_tensor(mine, max_len);
  at::Tensor out = at::empty({n * max_len}, at::kByte);
  TRY(comm.all_gather(out, in));
  std::vector<std::string> result(static_cast<size_t>(n));
  const auto* base = static_cast<const char*>(out.data_ptr());
  for (int r = 0; r < n; ++r) {
    result[static_cast<size_t>(r)].assign(base + r * max_len,
                                          static_cast<size_t>(lens.data_ptr<int64_t>()[r]));
  }
  return result;
}

Result<std::string> broadcast_bytes(Communicator& comm, std::string_view mine, int root) {
  at::Tensor len = at::empty({1}, at::kLong);
  len.data_ptr<int64_t>()[0] = static_cast<int64_t>(mine.size());
  TRY(comm.broadcast(len, root));
  const int64_t n = len.data_ptr<int64_t>()[0];
  if (n == 0) return std::string();
  at::Tensor buf = comm.rank() == root ? bytes_tensor(mine, n) : at::empty({n}, at::kByte);
  TRY(comm.broadcast(buf, root));
  return std::string(static_cast<const char*>(buf.data_ptr()), static_cast<size_t>(n));
}

Status agree(Communicator& comm, Status local) {
  if (comm.size() == 1) return local;
  const int n = comm.size();
  at::Tensor code = at::empty({1}, at::kLong);
  code.data_ptr<int64_t>()[0] = local.ok() ? 0 : static_cast<int64_t>(local.error().code);
  at::Tensor codes = at::empty({n}, at::kLong);
  Status s = comm.all_gather(codes, code);
  if (!s.ok()) {
    if (!local.ok()) return local;
    return s;
  }
  int first = -1;
  for (int r = 0; r < n; ++r) {
    if (codes.data_ptr<int64_t>()[r] != 0) {
      first = r;
      break;
    }
  }
  if (first < 0) return ok();
  std::string mine;
  if (comm.rank() == first) {
    const Error& e = local.error();
    // message and context, separated by a NUL that neither contains.
    mine = e.message + std::string(1, '\0') + e.context;
  }
  auto text = broadcast_bytes(comm, mine, first);
  if (!text.ok()) return local.ok() ? Status(std::move(text).error()) : local;
  const std::string& t = text.value();
  const size_t sep = t.find('\0');
  const auto c = static_cast<Code>(codes.data_ptr<int64_t>()[first]);
  std::string message = t.substr(0, sep);
  std::string context = sep == std::string::npos ? std::string() : t.substr(sep + 1);
  // Every rank reports the same words, naming the rank that failed.
  message = fmt::format("rank {}: {}", first, message);
  return Error(c, std::move(message), std::move(context));
}

}  // namespace dsd
