#include "core/dist/rendezvous.h"

#include <torch/csrc/distributed/c10d/FileStore.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <netdb.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cstdlib>
#include <map>
#include <mutex>
#include <thread>

#include "core/base/make_error.h"
#include "core/base/torch_call.h"
#include "core/dist/gloo_comm.h"

namespace dsd {
namespace {

using Clock = std::chrono::steady_clock;

Result<int64_t> parse_int(std::string_view name, const std::string& text) {
  int64_t v = 0;
  const char* end = text.data() + text.size();
  auto [p, ec] = std::from_chars(text.data(), end, v);
  if (ec != std::errc() || p != end || text.empty()) {
    return make_error(Code::kInvalidArgument, "{} is '{}', not an integer", name, text);
  }
  return v;
}

// The integer variable `name`; `fallback` when unset, an error when unset without one.
Result<int64_t> int_var(const EnvLookup& env, std::string_view name, std::string_view launcher,
                        std::optional<int64_t> fallback = std::nullopt) {
  std::optional<std::string> v = env(name);
  if (!v) {
    if (fallback) return *fallback;
    return make_error(Code::kInvalidArgument, "{} is not set ({} sets it)", name, launcher);
  }
  return parse_int(name, *v);
}

struct Names {
  const char* launcher;
  const char* rank;
  const char* size;
  const char* local_rank;
};

Status read_ranks(const EnvLookup& env, const Names& n, LaunchEnv& out) {
  const int64_t size = TRY(int_var(env, n.size, n.launcher));
  const int64_t rank = TRY(int_var(env, n.rank, n.launcher));
  if (size < 1 || size > (1 << 24)) {
    return make_error(Code::kInvalidArgument, "{}={} is not a world size", n.size, size);
  }
  if (rank < 0 || rank >= size) {
    return make_error(Code::kInvalidArgument, "{}={} is outside a world of {}={}", n.rank, rank,
                      n.size, size);
  }
  const int64_t local = TRY(int_var(env, n.local_rank, n.launcher, rank));
  if (local < 0 || local >= size) {
    return make_error(Code::kInvalidArgument, "{}={} is outside a world of {}={}", n.local_rank,
                      local, n.size, size);
  }
  out.launcher = n.launcher;
  out.rank = static_cast<int>(rank);
  out.world_size = static_cast<int>(size);
  out.local_rank = static_cast<int>(local);
  return ok();
}

Status read_master(const EnvLookup& env, LaunchEnv& out, std::optional<std::string> default_addr,
                   std::optional<int64_t> default_port) {
  std::optional<std::string> addr = env("MASTER_ADDR");
  if (!addr) addr = std::move(default_addr);
  if (!addr || addr->empty()) {
    return make_error(Code::kInvalidArgument, "MASTER_ADDR is not set ({} needs the host of rank 0)",
                      out.launcher);
  }
  if (!env("MASTER_PORT") && !default_port) {
    return make_error(Code::kInvalidArgument,
                      "MASTER_PORT is not set ({} needs the port of rank 0's store)", out.launcher);
  }
  const int64_t port = TRY(int_var(env, "MASTER_PORT", out.launcher, default_port));
  if (port < 1 || port > 65535) {
    return make_error(Code::kInvalidArgument, "MASTER_PORT={} is not a TCP port (1-65535)", port);
  }
  out.master_addr = *addr;
  out.master_port = static_cast<int>(port);
  return ok();
}

// Waits until something accepts connections at host:port, or the deadline passes. c10d's
// TCPStore client retries on its own, but a try begun just before its deadline runs a whole
// timeout more; probing first keeps "rank 0 never came" within the caller's timeout.
bool wait_for_listener(const std::string& host, int port, Clock::time_point deadline) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  while (true) {
    addrinfo* found = nullptr;
    if (::getaddrinfo(host.c_str(), std::to_string(port).c_str(), &hints, &found) == 0) {
      for (addrinfo* a = found; a != nullptr; a = a->ai_next) {
        const int fd = ::socket(a->ai_family, a->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, a->ai_protocol);
        if (fd < 0) continue;
        bool up = ::connect(fd, a->ai_addr, a->ai_addrlen) == 0;
        if (!up && errno == EINPROGRESS) {
          pollfd p{fd, POLLOUT, 0};
          const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
          if (::poll(&p, 1, static_cast<int>(std::clamp<int64_t>(left.count(), 0, 1000))) == 1) {
            int err = 0;
            socklen_t len = sizeof(err);
            up = ::getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) == 0 && err == 0;
          }
        }
        ::close(fd);
        if (up) {
          ::freeaddrinfo(found);
          return true;
        }
      }
      ::freeaddrinfo(found);
    }
    if (Clock::now() >= deadline) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
}

// Each store address gets its own count of worlds built over it in this process: every rank
// builds its communicators in the same order, so the n-th one has the same keys everywhere.
std::string next_world_prefix(const std::string& where, const std::string& attempt) {
  static std::mutex mu;
  static std::map<std::string, int>* counts = new std::map<std::string, int>();
  std::lock_guard<std::mutex> lock(mu);
  const int n = (*counts)[where]++;
  return fmt::format("dsd/attempt{}/world{}", attempt, n);
}

}  // namespace

std::string first_slurm_host(std::string_view list) {
  // The first top-level item: commas inside brackets separate ranges, not hosts.
  int depth = 0;
  size_t end = list.size();
  for (size_t i = 0; i < list.size(); ++i) {
    if (list[i] == '[') ++depth;
    if (list[i] == ']') --depth;
    if (list[i] == ',' && depth == 0) {
      end = i;
      break;
    }
  }
  std::string_view item = list.substr(0, end);
  // Each bracket group "[01-04,07]" stands for its first number, padding kept.
  std::string host;
  for (size_t i = 0; i < item.size(); ++i) {
    if (item[i] != '[') {
      host += item[i];
      continue;
    }
    const size_t close = item.find(']', i);
    std::string_view group = item.substr(i + 1, close == std::string_view::npos ? std::string_view::npos : close - i - 1);
    const size_t stop = group.find_first_of(",-");
    host += group.substr(0, stop);
    if (close == std::string_view::npos) break;
    i = close;
  }
  return host;
}

Result<LaunchEnv> read_launch_env(const EnvLookup& env) {
  LaunchEnv out;
  if (env("RANK") || env("WORLD_SIZE")) {
    TRY(read_ranks(env, {"torchrun", "RANK", "WORLD_SIZE", "LOCAL_RANK"}, out));
    TRY(read_master(env, out, std::nullopt, std::nullopt));
    out.agent_store = env("TORCHELASTIC_USE_AGENT_STORE").value_or("") == "True";
    out.attempt = env("TORCHELASTIC_RESTART_COUNT").value_or("0");
    if (out.agent_store && !env("TORCHELASTIC_RESTART_COUNT")) {
      return make_error(Code::kInvalidArgument,
                        "TORCHELASTIC_RESTART_COUNT is not set, but TORCHELASTIC_USE_AGENT_STORE "
                        "is (torchrun sets both)");
    }
    return out;
  }
  if (env("OMPI_COMM_WORLD_RANK") || env("OMPI_COMM_WORLD_SIZE")) {
    TRY(read_ranks(env, {"mpirun", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE",
                         "OMPI_COMM_WORLD_LOCAL_RANK"}, out));
    TRY(read_master(env, out, std::string("127.0.0.1"), 29500));
    return out;
  }
  if (env("SLURM_PROCID") || env("SLURM_NTASKS")) {
    TRY(read_ranks(env, {"srun", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"}, out));
    std::optional<std::string> nodes = env("SLURM_STEP_NODELIST");
    if (!nodes) nodes = env("SLURM_JOB_NODELIST");
    std::optional<std::string> host;
    if (nodes) host = first_slurm_host(*nodes);
    std::optional<int64_t> port;
    if (std::optional<std::string> job = env("SLURM_JOB_ID")) {
      port = 15000 + TRY(parse_int("SLURM_JOB_ID", *job)) % 10000;
    }
    TRY(read_master(env, out, host, port));
    return out;
  }
  return make_error(Code::kInvalidArgument,
                    "RANK and WORLD_SIZE are not set: launch with torchrun, dsdrun, mpirun or "
                    "srun, or set RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT");
}

Result<LaunchEnv> read_launch_env() {
  return read_launch_env([](std::string_view name) -> std::optional<std::string> {
    const char* v = std::getenv(std::string(name).c_str());
    if (v == nullptr) return std::nullopt;
    return std::string(v);
  });
}

Result<std::shared_ptr<Communicator>> communicator_from_launch(const LaunchEnv& launch,
                                                               const CommOptions& options) {
  if (!gloo_available()) return make_gloo_communicator({});  // the kUnsupported error
  if (options.timeout.count() <= 0) {
    return make_error(Code::kInvalidArgument, "the timeout must be positive, not {} ms",
                      options.timeout.count());
  }
  const std::string where = fmt::format("tcp://{}:{}", launch.master_addr, launch.master_port);
  const bool host = !launch.agent_store && launch.rank == 0;
  const auto deadline = Clock::now() + options.timeout;
  if (!host && !wait_for_listener(launch.master_addr, launch.master_port, deadline)) {
    return make_error(Code::kTimeout,
                      "rank {} of {} could not reach the store at {} within {} ms (is {} running "
                      "there?)",
                      launch.rank, launch.world_size, where, options.timeout.count(),
                      launch.agent_store ? "torchrun's agent" : "rank 0");
  }
  c10d::TCPStoreOptions o;
  o.port = static_cast<uint16_t>(launch.master_port);
  o.isServer = host;
  o.numWorkers = static_cast<size_t>(launch.world_size);
  o.waitWorkers = false;  // the rendezvous below waits, and names who is missing
  o.timeout = options.timeout;
  o.multiTenant = true;  // torch.distributed in this process may share the server
  c10::intrusive_ptr<c10d::Store> store = TRY(comm_call(
      host ? fmt::format("rank 0 could not host the store at {}", where)
           : fmt::format("rank {} of {} could not reach the store at {}", launch.rank,
                         launch.world_size, where),
      [&] { return c10::intrusive_ptr<c10d::Store>(c10::make_intrusive<c10d::TCPStore>(launch.master_addr, o)); }));
  GlooConfig c;
  c.store = std::move(store);
  c.prefix = next_world_prefix(where, launch.attempt);
  c.where = where;
  c.hosts_store = host;
  c.rank = launch.rank;
  c.size = launch.world_size;
  c.timeout = options.timeout;
  return make_gloo_communicator(std::move(c));
}

Result<std::shared_ptr<Communicator>> communicator_from_env(const CommOptions& options) {
  LaunchEnv launch = TRY(read_launch_env());
  return communicator_from_launch(launch, options);
}

Result<std::shared_ptr<Communicator>> communicator_from_file_store(const std::string& path,
                                                                   int rank, int size,
                                                                   const CommOptions& options) {
  if (!gloo_available()) return make_gloo_communicator({});
  if (path.empty()) return make_error(Code::kInvalidArgument, "the file store path is empty");
  if (size < 1 || rank < 0 || rank >= size) {
    return make_error(Code::kInvalidArgument, "rank {} is outside a world of {}", rank, size);
  }
  if (options.timeout.count() <= 0) {
    return make_error(Code::kInvalidArgument, "the timeout must be positive, not {} ms",
                      options.timeout.count());
  }
  const std::string where = "file://" + path;
  c10::intrusive_ptr<c10d::Store> store = TRY(comm_call(
      fmt::format("rank {} could not open the file store {}", rank, path), [&] {
        auto s = c10::make_intrusive<c10d::FileStore>(path, size);
        s->setTimeout(options.timeout);
        return c10::intrusive_ptr<c10d::Store>(s);
      }));
  GlooConfig c;
  c.store = std::move(store);
  c.prefix = next_world_prefix(where, "0");
  c.where = where;
  c.rank = rank;
  c.size = size;
  c.timeout = options.timeout;
  return make_gloo_communicator(std::move(c));
}

}  // namespace dsd
