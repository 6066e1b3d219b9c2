// Multi-process checks of the Gloo communicator and the helpers over it, run under dsdrun,
// torchrun or mpirun: `dist_collectives SCENARIO [args]`. Every rank checks its own results
// and prints "rank R: SCENARIO ok" (or what failed) and exits non-zero on a failed check.
//
// Scenarios:
//   collectives          every collective and helper, several dtypes and roots, with checked
//                        values; agree() with failing ranks; clone() used from a thread
//   file_store PATH      a few collectives over a communicator from a file store
//   peer_exit            the last rank exits (status 3) after a barrier; the others' next
//                        collective must fail with kComm/kTimeout within the timeout, and the
//                        communicator stays broken
//   peer_hang            the last rank stops calling collectives (but lives); the others must
//                        get kTimeout within the timeout
//   missing_peer R       rank R never joins; the others' rendezvous must time out naming R
// The timeout is DSD_TEST_TIMEOUT_MS (default 10000).
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/zeros.h>
#include <fmt/format.h>
#include <unistd.h>

#include <chrono>
#include <complex>
#include <cstdlib>
#include <string>
#include <thread>

#include "core/dist/comm.h"
#include "core/dist/rendezvous.h"

namespace {

int g_rank = -1;
int g_failures = 0;

#define CHECK(cond)                                                                       \
  do {                                                                                    \
    if (!(cond)) {                                                                        \
      std::fprintf(stderr, "rank %d: %s:%d: CHECK failed: %s\n", g_rank, __FILE__, __LINE__, \
                   #cond);                                                                \
      g_failures++;                                                                       \
    }                                                                                     \
  } while (0)

#define CHECK_OK(expr)                                                                     \
  do {                                                                                     \
    auto check_s_ = (expr);                                                                \
    if (!check_s_.ok()) {                                                                  \
      std::fprintf(stderr, "rank %d: %s:%d: %s failed: %s\n", g_rank, __FILE__, __LINE__, #expr, \
                   check_s_.error().message.c_str());                                      \
      g_failures++;                                                                        \
    }                                                                                      \
  } while (0)

bool has(const std::string& s, const std::string& needle) {
  return s.find(needle) != std::string::npos;
}

std::chrono::milliseconds test_timeout() {
  const char* v = std::getenv("DSD_TEST_TIMEOUT_MS");
  return std::chrono::milliseconds(v ? std::atoll(v) : 10000);
}

std::shared_ptr<dsd::Communicator> connect() {
  auto comm = dsd::communicator_from_env({test_timeout()});
  if (!comm.ok()) {
    std::fprintf(stderr, "rendezvous failed: %s\n", comm.error().message.c_str());
    std::exit(2);
  }
  return *comm;
}

bool same(const at::Tensor& a, const at::Tensor& b) {
  return a.sizes() == b.sizes() && a.scalar_type() == b.scalar_type() &&
         a.contiguous().view(at::kByte).reshape({-1}).eq(b.contiguous().view(at::kByte).reshape({-1})).all().item<bool>();
}

// A tensor whose bytes depend on `seed`, for any dtype: random bytes would make NaN floats
// that compare unequal, so build it from small integers and reinterpret when needed.
at::Tensor pattern(at::ScalarType type, std::vector<int64_t> shape, int64_t seed) {
  int64_t n = 1;
  for (int64_t s : shape) n *= s;
  at::Tensor bytes = at::arange(n * static_cast<int64_t>(c10::elementSize(type)), at::kLong)
                         .add(seed * 7)
                         .remainder(type == at::kBool ? 2 : 61)  // a bool byte is 0 or 1
                         .to(at::kByte);
  return bytes.view(type).reshape(shape);
}

void check_broadcast(dsd::Communicator& c) {
  const int n = c.size();
  for (at::ScalarType t : {at::kFloat, at::kLong, at::kBool, at::kBFloat16, at::kUInt16,
                           at::kComplexFloat, at::kFloat8_e4m3fn}) {
    for (int root = 0; root < n; ++root) {
      at::Tensor want = pattern(t, {3, 5}, root + 1);
      at::Tensor x = c.rank() == root ? want.clone() : at::zeros({3, 5}, t);
      CHECK_OK(c.broadcast(x, root));
      CHECK(same(x, want));
    }
  }
  // A 0-d tensor, an empty one, a non-contiguous one (staged and copied back).
  at::Tensor scalar = at::full({}, c.rank() == 0 ? 42 : -1, at::kLong);
  CHECK_OK(c.broadcast(scalar, 0));
  CHECK(scalar.item<int64_t>() == 42);
  at::Tensor empty = at::empty({0, 4}, at::kFloat);
  CHECK_OK(c.broadcast(empty, n - 1));
  at::Tensor base = c.rank() == 1 ? at::arange(12, at::kFloat).reshape({3, 4}) : at::zeros({3, 4}, at::kFloat);
  at::Tensor column = base.select(1, 2);  // stride 4
  CHECK(!column.is_contiguous());
  CHECK_OK(c.broadcast(column, 1));
  CHECK(base.select(1, 2).equal(at::arange(12, at::kFloat).reshape({3, 4}).select(1, 2)));
  CHECK(base.select(1, 0).equal(c.rank() == 1 ? at::arange(12, at::kFloat).reshape({3, 4}).select(1, 0)
                                              : at::zeros({3}, at::kFloat)));
  auto bad = c.broadcast(scalar, n);
  CHECK(!bad.ok() && bad.error().code == dsd::Code::kInvalidArgument && has(bad.error().message, "root"));
}

void check_all_gather(dsd::Communicator& c) {
  const int n = c.size();
  for (at::ScalarType t : {at::kFloat, at::kInt, at::kBool, at::kUInt64, at::kComplexDouble}) {
    at::Tensor mine = pattern(t, {2, 3}, c.rank());
    at::Tensor out = at::empty({n, 2, 3}, t);
    CHECK_OK(c.all_gather(out, mine));
    for (int r = 0; r < n; ++r) CHECK(same(out[r], pattern(t, {2, 3}, r)));
  }
  // Into a non-contiguous output (staged), and from a non-contiguous input.
  at::Tensor wide = at::zeros({4, n}, at::kLong);
  at::Tensor out = wide.t();  // [n, 4], not contiguous
  at::Tensor in = at::arange(8, at::kLong).add(100 * c.rank()).reshape({4, 2}).select(1, 0);
  CHECK_OK(c.all_gather(out, in));
  for (int r = 0; r < n; ++r) {
    CHECK(wide.select(1, r).equal(at::arange(0, 8, 2, at::kLong).add(100 * r)));
  }
  at::Tensor wrong = at::empty({n + 1, 2, 3}, at::kFloat);
  auto bad = c.all_gather(wrong, at::zeros({2, 3}, at::kFloat));
  CHECK(!bad.ok() && bad.error().code == dsd::Code::kShapeMismatch && has(bad.error().message, "all_gather"));
  auto bad_type = c.all_gather(out, at::zeros({4}, at::kFloat));
  CHECK(!bad_type.ok() && bad_type.error().code == dsd::Code::kDtypeMismatch);
}

void check_gather(dsd::Communicator& c) {
  const int n = c.size();
  for (int root = 0; root < n; ++root) {
    at::Tensor mine = at::full({5}, 10 * c.rank() + root, at::kShort);
    // Non-roots pass no output at all.
    at::Tensor out = c.rank() == root ? at::empty({n, 5}, at::kShort) : at::Tensor();
    CHECK_OK(c.gather(out, mine, root));
    if (c.rank() == root) {
      for (int r = 0; r < n; ++r) CHECK(out[r].equal(at::full({5}, 10 * r + root, at::kShort)));
    }
  }
}

void check_all_reduce(dsd::Communicator& c) {
  const int n = c.size();
  at::Tensor f = at::full({4}, c.rank() + 1.0, at::kFloat);
  CHECK_OK(c.all_reduce(f, dsd::ReduceOp::kSum));
  CHECK(f.equal(at::full({4}, n * (n + 1) / 2.0, at::kFloat)));
  at::Tensor l = at::full({2}, static_cast<int64_t>(c.rank()), at::kLong);
  CHECK_OK(c.all_reduce(l, dsd::ReduceOp::kMax));
  CHECK(l.equal(at::full({2}, static_cast<int64_t>(n - 1), at::kLong)));
  at::Tensor m = at::full({2}, static_cast<int64_t>(c.rank() + 5), at::kLong);
  CHECK_OK(c.all_reduce(m, dsd::ReduceOp::kMin));
  CHECK(m.equal(at::full({2}, static_cast<int64_t>(5), at::kLong)));
  // bool: sum is a logical or, min a logical and.
  at::Tensor any = at::full({3}, c.rank() == n - 1, at::kBool);
  CHECK_OK(c.all_reduce(any, dsd::ReduceOp::kSum));
  CHECK(any.all().item<bool>());
  CHECK(any.view(at::kByte).eq(1).all().item<bool>());
  at::Tensor all = at::full({3}, c.rank() != 0, at::kBool);
  CHECK_OK(c.all_reduce(all, dsd::ReduceOp::kMin));
  CHECK(!all.any().item<bool>());
  at::Tensor z = at::full({2}, c10::complex<float>(1.0f, static_cast<float>(c.rank())), at::kComplexFloat);
  CHECK_OK(c.all_reduce(z, dsd::ReduceOp::kSum));
  CHECK(z.equal(at::full({2}, c10::complex<float>(n, n * (n - 1) / 2.0f), at::kComplexFloat)));
  // The same error on every rank, without touching the network.
  at::Tensor u = at::zeros({2}, at::kUInt16);
  auto bad = c.all_reduce(u, dsd::ReduceOp::kSum);
  CHECK(!bad.ok() && bad.error().code == dsd::Code::kUnsupported && has(bad.error().message, "UInt16"));
}

void check_helpers(dsd::Communicator& c) {
  const int n = c.size();
  // Different lengths on every rank, one of them empty.
  std::string mine = c.rank() == 1 ? std::string() : std::string(static_cast<size_t>(c.rank() * 1000 + 3), static_cast<char>('a' + c.rank()));
  mine += c.rank() == 1 ? "" : std::string(1, '\0');  // bytes, not C strings
  auto all = dsd::all_gather_bytes(c, mine);
  CHECK_OK(all);
  if (all.ok()) {
    CHECK(static_cast<int>(all->size()) == n);
    for (int r = 0; r < n; ++r) {
      std::string want = r == 1 ? std::string() : std::string(static_cast<size_t>(r * 1000 + 3), static_cast<char>('a' + r)) + std::string(1, '\0');
      CHECK((*all)[static_cast<size_t>(r)] == want);
    }
  }
  for (int root = 0; root < n; ++root) {
    std::string big(1 << 20, static_cast<char>('A' + root));
    auto got = dsd::broadcast_bytes(c, c.rank() == root ? std::string_view(big) : std::string_view("ignored"), root);
    CHECK_OK(got);
    if (got.ok()) CHECK(*got == big);
    auto nothing = dsd::broadcast_bytes(c, "", root);
    CHECK(nothing.ok() && nothing->empty());
  }
  CHECK_OK(c.barrier());
}

void check_agree(dsd::Communicator& c) {
  const int n = c.size();
  CHECK_OK(dsd::agree(c, dsd::ok()));
  // The last rank fails: everyone gets its code, its message (naming it) and its context.
  dsd::Status local = c.rank() == n - 1
                          ? dsd::Status(dsd::Error(dsd::Code::kShapeMismatch, "tensor 'w' is [3], expected [4]", "w"))
                          : dsd::ok();
  dsd::Status s = dsd::agree(c, local);
  CHECK(!s.ok());
  if (!s.ok()) {
    CHECK(s.error().code == dsd::Code::kShapeMismatch);
    CHECK(s.error().message == fmt::format("rank {}: tensor 'w' is [3], expected [4]", n - 1));
    CHECK(s.error().context == "w");
  }
  // Two failing ranks: the lowest one wins, everywhere.
  dsd::Status two = c.rank() >= 1 ? dsd::Status(dsd::Error(dsd::Code::kNotFound, fmt::format("missing on {}", c.rank())))
                                  : dsd::ok();
  dsd::Status s2 = dsd::agree(c, two);
  CHECK(!s2.ok() && s2.error().code == dsd::Code::kNotFound && s2.error().message == "rank 1: missing on 1");
  // The communicator still works after an agreed error.
  CHECK_OK(c.barrier());
}

// A clone carries its own traffic: a thread runs all_gathers on it while this thread runs
// broadcasts on the original, and neither sees the other's data.
void check_clone(dsd::Communicator& c) {
  const int n = c.size();
  auto clone = c.clone("async_save");
  CHECK_OK(clone);
  if (!clone.ok()) return;
  std::shared_ptr<dsd::Communicator> bg = *clone;
  CHECK(bg->rank() == c.rank() && bg->size() == n && bg->backend_name() == "gloo");
  int bg_failures = 0;
  std::thread worker([&] {
    for (int i = 0; i < 50; ++i) {
      at::Tensor out = at::empty({n}, at::kLong);
      at::Tensor in = at::full({1}, static_cast<int64_t>(1000 * i + bg->rank()), at::kLong);
      if (!bg->all_gather(out, in).ok()) {
        bg_failures++;
        continue;
      }
      for (int r = 0; r < n; ++r) bg_failures += out[r].item<int64_t>() != 1000 * i + r;
    }
  });
  for (int i = 0; i < 50; ++i) {
    at::Tensor x = at::full({3}, c.rank() == i % n ? static_cast<int64_t>(i) : -1, at::kLong);
    CHECK_OK(c.broadcast(x, i % n));
    CHECK(x.equal(at::full({3}, static_cast<int64_t>(i), at::kLong)));
  }
  worker.join();
  CHECK(bg_failures == 0);
  // A second clone with the same tag is a different process group.
  auto again = c.clone("async_save");
  CHECK_OK(again);
  if (again.ok()) CHECK_OK((*again)->barrier());
}

int collectives() {
  auto comm = connect();
  dsd::Communicator& c = *comm;
  g_rank = c.rank();
  CHECK(c.rank() == std::atoi(std::getenv("RANK") ? std::getenv("RANK") : std::getenv("OMPI_COMM_WORLD_RANK")));
  CHECK(c.backend_name() == "gloo");
  CHECK(c.device_type() == c10::DeviceType::CPU);
  CHECK(c.timeout() == test_timeout());
  auto launch = dsd::read_launch_env();
  CHECK_OK(launch);
  if (launch.ok()) {
    std::printf("rank %d: launcher %s, store %s\n", c.rank(), launch->launcher.c_str(),
                launch->agent_store ? "hosted by the agent" : (c.rank() == 0 ? "hosted here" : "hosted by rank 0"));
  }
  check_broadcast(c);
  check_all_gather(c);
  check_gather(c);
  check_all_reduce(c);
  check_helpers(c);
  check_agree(c);
  check_clone(c);
  CHECK_OK(c.barrier());
  return 0;
}

int file_store(const char* path) {
  const int rank = std::atoi(std::getenv("RANK"));
  const int size = std::atoi(std::getenv("WORLD_SIZE"));
  g_rank = rank;
  auto comm = dsd::communicator_from_file_store(path, rank, size, {test_timeout()});
  CHECK_OK(comm);
  if (!comm.ok()) return 1;
  dsd::Communicator& c = **comm;
  CHECK(c.rank() == rank && c.size() == size);
  at::Tensor out = at::empty({size}, at::kLong);
  CHECK_OK(c.all_gather(out, at::full({1}, static_cast<int64_t>(rank * rank), at::kLong)));
  for (int r = 0; r < size; ++r) CHECK(out[r].item<int64_t>() == r * r);
  check_agree(c);
  return 0;
}

// Expects `s` to be a communication failure of `what` that names this rank.
void expect_comm_failure(const dsd::Status& s, const char* what, std::chrono::steady_clock::time_point since) {
  const auto took = std::chrono::steady_clock::now() - since;
  CHECK(!s.ok());
  if (s.ok()) return;
  const dsd::Error& e = s.error();
  CHECK(e.code == dsd::Code::kComm || e.code == dsd::Code::kTimeout);
  CHECK(has(e.message, what));
  CHECK(has(e.message, fmt::format("rank {} of", g_rank)));
  // Within the timeout, plus slack for a loaded machine.
  CHECK(took < test_timeout() + std::chrono::seconds(5));
  std::printf("got expected %s error after %.1f s: %s\n", dsd::code_name(e.code).data(),
              std::chrono::duration<double>(took).count(), e.message.c_str());
}

int peer_exit() {
  auto comm = connect();
  dsd::Communicator& c = *comm;
  g_rank = c.rank();
  CHECK_OK(c.barrier());
  if (c.rank() == c.size() - 1) {
    std::fflush(stdout);
    ::_exit(3);
  }
  const auto t0 = std::chrono::steady_clock::now();
  at::Tensor out = at::empty({c.size() * 1000}, at::kFloat);
  dsd::Status s = c.all_gather(out, at::ones({1000}, at::kFloat));
  expect_comm_failure(s, "all_gather", t0);
  // Broken for good, with the first error in the message.
  dsd::Status again = c.barrier();
  CHECK(!again.ok() && has(again.error().message, "broken") && has(again.error().message, "all_gather"));
  return 0;
}

int peer_hang() {
  auto comm = connect();
  dsd::Communicator& c = *comm;
  g_rank = c.rank();
  CHECK_OK(c.barrier());
  if (c.rank() == c.size() - 1) {
    // Alive but absent: no connection breaks, only the clock can tell.
    std::this_thread::sleep_for(test_timeout() + std::chrono::seconds(3));
    return 0;
  }
  const auto t0 = std::chrono::steady_clock::now();
  at::Tensor x = at::zeros({16}, at::kLong);
  dsd::Status s = c.all_reduce(x, dsd::ReduceOp::kSum);
  expect_comm_failure(s, "all_reduce", t0);
  CHECK(!s.ok() && s.error().code == dsd::Code::kTimeout);
  // The waiting ranks time out at about the same moment; one that exited at once would turn
  // a slightly later one's timeout into a closed connection.
  std::this_thread::sleep_for(std::chrono::seconds(2));
  return 0;
}

int missing_peer(int missing) {
  const char* r = std::getenv("RANK") ? std::getenv("RANK") : std::getenv("OMPI_COMM_WORLD_RANK");
  g_rank = std::atoi(r);
  if (g_rank == missing) return 0;  // never shows up
  const auto t0 = std::chrono::steady_clock::now();
  auto comm = dsd::communicator_from_env({test_timeout()});
  const auto took = std::chrono::steady_clock::now() - t0;
  CHECK(!comm.ok());
  if (comm.ok()) return 1;
  const dsd::Error& e = comm.error();
  CHECK(e.code == dsd::Code::kTimeout);
  if (missing == 0) {
    // Rank 0 hosts the store: the others cannot reach it.
    CHECK(has(e.message, "could not reach the store"));
  } else {
    CHECK(has(e.message, fmt::format("rank(s) {} never joined", missing)));
  }
  CHECK(took < test_timeout() + std::chrono::seconds(5));
  std::printf("got expected %s error after %.1f s: %s\n", dsd::code_name(e.code).data(),
              std::chrono::duration<double>(took).count(), e.message.c_str());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: dist_collectives SCENARIO [args]\n");
    return 2;
  }
  const std::string scenario = argv[1];
  int rc = 2;
  if (scenario == "collectives") {
    rc = collectives();
  } else if (scenario == "file_store" && argc == 3) {
    rc = file_store(argv[2]);
  } else if (scenario == "peer_exit") {
    rc = peer_exit();
  } else if (scenario == "peer_hang") {
    rc = peer_hang();
  } else if (scenario == "missing_peer" && argc == 3) {
    rc = missing_peer(std::atoi(argv[2]));
  } else {
    std::fprintf(stderr, "unknown scenario %s\n", scenario.c_str());
    return 2;
  }
  if (g_failures != 0 || rc != 0) {
    std::fprintf(stderr, "rank %d: %s: %d check(s) failed\n", g_rank, scenario.c_str(), g_failures);
    return 1;
  }
  std::printf("rank %d: %s ok\n", g_rank, scenario.c_str());
  return 0;
}
