// dsdrun: runs N local ranks of a command with torchrun's environment, so tests and demos
// need no Python launcher.
//
//   dsdrun -n N [--timeout SECONDS] [--grace SECONDS] [--port P] [--master-addr A] cmd args...
//
// Each rank gets RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, GROUP_RANK, MASTER_ADDR and
// MASTER_PORT (a free port unless --port is given; rank 0 hosts the store). Every line a rank
// writes to stdout or stderr is forwarded to dsdrun's stdout or stderr as "[rank i] line".
// When a rank fails (non-zero exit or a signal), dsdrun says which and how, gives the others
// --grace seconds to notice and exit, then terminates them (SIGTERM, then SIGKILL), so a
// failure never turns into a hang. --timeout bounds the whole job the same way.
// Exit status: 0 when every rank exited 0; else the first failing rank's exit status, or
// 128 + its signal; 124 when --timeout ran out; 2 for a usage error.
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

namespace {

using Clock = std::chrono::steady_clock;

volatile sig_atomic_t g_signal = 0;

void on_signal(int sig) { g_signal = sig; }

struct Stream {
  int fd = -1;
  int sink = 1;  // dsdrun's fd the lines go to
  std::string pending;
};

struct Rank {
  int index = 0;
  pid_t pid = -1;
  Stream out;
  Stream err;
  bool running = false;
  bool terminated = false;  // by dsdrun
  int status = 0;
};

struct Options {
  int n = 0;
  double timeout = 0;
  double grace = 10;
  int port = 0;
  std::string addr = "127.0.0.1";
  std::vector<std::string> command;
};

void write_all(int fd, const std::string& s) {
  size_t done = 0;
  while (done < s.size()) {
    ssize_t w = ::write(fd, s.data() + done, s.size() - done);
    if (w < 0) {
      if (errno == EINTR) continue;
      return;
    }
    done += static_cast<size_t>(w);
  }
}

void say(const std::string& s) { write_all(2, "dsdrun: " + s + "\n"); }

// The OS picks a port nobody listens on; rank 0 binds it moments later.
int free_port() {
  int s = ::socket(AF_INET, SOCK_STREAM, 0);
  if (s < 0) return -1;
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_ANY);
  a.sin_port = 0;
  socklen_t len = sizeof(a);
  int port = -1;
  if (::bind(s, reinterpret_cast<sockaddr*>(&a), sizeof(a)) == 0 &&
      ::getsockname(s, reinterpret_cast<sockaddr*>(&a), &len) == 0) {
    port = ntohs(a.sin_port);
  }
  ::close(s);
  return port;
}

// Forwards every complete line; at end of stream, the unterminated rest too.
void forward(Rank& r, Stream& s, bool eof) {
  size_t start = 0;
  while (true) {
    size_t nl = s.pending.find('\n', start);
    if (nl == std::string::npos) break;
    write_all(s.sink, fmt::format("[rank {}] {}", r.index, std::string_view(s.pending).substr(start, nl + 1 - start)));
    start = nl + 1;
  }
  s.pending.erase(0, start);
  if (eof && !s.pending.empty()) {
    write_all(s.sink, fmt::format("[rank {}] {}\n", r.index, s.pending));
    s.pending.clear();
  }
}

// Reads what is there; closes the stream at end of file.
void drain(Rank& r, Stream& s) {
  char buf[65536];
  while (true) {
    ssize_t got = ::read(s.fd, buf, sizeof(buf));
    if (got > 0) {
      s.pending.append(buf, static_cast<size_t>(got));
      forward(r, s, false);
      continue;
    }
    if (got < 0 && errno == EINTR) continue;
    if (got < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;
    forward(r, s, true);
    ::close(s.fd);
    s.fd = -1;
    return;
  }
}

std::string describe_status(int status) {
  if (WIFEXITED(status)) return fmt::format("exited with status {}", WEXITSTATUS(status));
  if (WIFSIGNALED(status)) {
    return fmt::format("was killed by signal {} ({})", WTERMSIG(status), strsignal(WTERMSIG(status)));
  }
  return fmt::format("ended with wait status {}", status);
}

bool failed(int status) { return !(WIFEXITED(status) && WEXITSTATUS(status) == 0); }

std::optional<Rank> spawn(const Options& o, int index, int port) {
  int out[2];
  int err[2];
  if (::pipe2(out, O_CLOEXEC) != 0 || ::pipe2(err, O_CLOEXEC) != 0) {
    say(fmt::format("pipe failed: {}", strerror(errno)));
    return std::nullopt;
  }
  const pid_t parent = ::getpid();
  pid_t pid = ::fork();
  if (pid < 0) {
    say(fmt::format("fork failed: {}", strerror(errno)));
    return std::nullopt;
  }
  if (pid == 0) {
    // Its own process group, so terminating a rank reaches what it started; and it dies with
    // dsdrun, so a killed launcher leaves no rank behind.
    ::setpgid(0, 0);
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (::getppid() != parent) ::_exit(127);
    ::dup2(out[1], 1);
    ::dup2(err[1], 2);
    ::signal(SIGINT, SIG_DFL);
    ::signal(SIGTERM, SIG_DFL);
    ::setenv("RANK", std::to_string(index).c_str(), 1);
    ::setenv("LOCAL_RANK", std::to_string(index).c_str(), 1);
    ::setenv("GROUP_RANK", "0", 1);
    ::setenv("ROLE_RANK", std::to_string(index).c_str(), 1);
    ::setenv("WORLD_SIZE", std::to_string(o.n).c_str(), 1);
    ::setenv("LOCAL_WORLD_SIZE", std::to_string(o.n).c_str(), 1);
    ::setenv("MASTER_ADDR", o.addr.c_str(), 1);
    ::setenv("MASTER_PORT", std::to_string(port).c_str(), 1);
    ::setenv("OMP_NUM_THREADS", "1", 0);
    // Under an outer torchrun these would point the ranks at a store nobody hosts.
    ::unsetenv("TORCHELASTIC_USE_AGENT_STORE");
    ::unsetenv("TORCHELASTIC_RESTART_COUNT");
    std::vector<char*> argv;
    for (const std::string& a : o.command) argv.push_back(const_cast<char*>(a.c_str()));
    argv.push_back(nullptr);
    ::execvp(argv[0], argv.data());
    std::string msg = fmt::format("dsdrun: cannot run {}: {}\n", o.command[0], strerror(errno));
    write_all(2, msg);
    ::_exit(127);
  }
  ::close(out[1]);
  ::close(err[1]);
  ::fcntl(out[0], F_SETFL, O_NONBLOCK);
  ::fcntl(err[0], F_SETFL, O_NONBLOCK);
  Rank r;
  r.index = index;
  r.pid = pid;
  r.out = Stream{out[0], 1, {}};
  r.err = Stream{err[0], 2, {}};
  r.running = true;
  return r;
}

void signal_all(std::vector<Rank>& ranks, int sig) {
  for (Rank& r : ranks) {
    if (!r.running) continue;
    r.terminated = true;
    ::kill(-r.pid, sig);
    ::kill(r.pid, sig);
  }
}

std::string running_list(const std::vector<Rank>& ranks) {
  std::string s;
  for (const Rank& r : ranks) {
    if (!r.running) continue;
    if (!s.empty()) s += ", ";
    s += std::to_string(r.index);
  }
  return s;
}

int run(const Options& o) {
  int port = o.port;
  if (port == 0) port = free_port();
  if (port <= 0) {
    say("cannot find a free port; pass --port");
    return 1;
  }
  struct sigaction sa{};
  sa.sa_handler = on_signal;
  ::sigaction(SIGINT, &sa, nullptr);
  ::sigaction(SIGTERM, &sa, nullptr);
  ::signal(SIGPIPE, SIG_IGN);

  std::vector<Rank> ranks;
  for (int i = 0; i < o.n; ++i) {
    std::optional<Rank> r = spawn(o, i, port);
    if (!r) {
      signal_all(ranks, SIGKILL);
      return 1;
    }
    ranks.push_back(std::move(*r));
  }

  const auto start = Clock::now();
  std::optional<Clock::time_point> terminate_at;  // when the survivors get SIGTERM
  std::optional<Clock::time_point> kill_at;       // and then SIGKILL
  std::optional<int> first_failure;               // index into ranks
  bool timed_out = false;
  int signalled = 0;

  while (true) {
    std::vector<pollfd> fds;
    std::vector<std::pair<Rank*, Stream*>> owners;
    for (Rank& r : ranks) {
      for (Stream* s : {&r.out, &r.err}) {
        if (s->fd < 0) continue;
        fds.push_back(pollfd{s->fd, POLLIN, 0});
        owners.emplace_back(&r, s);
      }
    }
    bool any_running = false;
    for (const Rank& r : ranks) any_running = any_running || r.running;
    if (!any_running && fds.empty()) break;

    ::poll(fds.data(), fds.size(), 100);
    for (size_t i = 0; i < fds.size(); ++i) {
      if (fds[i].revents != 0) drain(*owners[i].first, *owners[i].second);
    }

    int status = 0;
    pid_t pid;
    while ((pid = ::waitpid(-1, &status, WNOHANG)) > 0) {
      for (Rank& r : ranks) {
        if (r.pid != pid || !r.running) continue;
        r.running = false;
        r.status = status;
        if (failed(status) && !r.terminated) {
          say(fmt::format("rank {} (pid {}) {}", r.index, pid, describe_status(status)));
          if (!first_failure) {
            first_failure = r.index;
            terminate_at = Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                              std::chrono::duration<double>(o.grace));
          }
        }
      }
    }
    // A rank's children may hold its pipes open: once every rank is gone, stop waiting.
    if (!any_running) {
      for (Rank& r : ranks) {
        for (Stream* s : {&r.out, &r.err}) {
          if (s->fd < 0) continue;
          drain(r, *s);
          if (s->fd >= 0) {
            forward(r, *s, true);
            ::close(s->fd);
            s->fd = -1;
          }
        }
      }
      continue;
    }

    const auto now = Clock::now();
    if (g_signal != 0 && signalled == 0) {
      signalled = g_signal;
      say(fmt::format("got signal {}; terminating ranks {}", signalled, running_list(ranks)));
      signal_all(ranks, SIGTERM);
      kill_at = now + std::chrono::seconds(5);
    }
    if (o.timeout > 0 && !timed_out &&
        now - start > std::chrono::duration<double>(o.timeout)) {
      timed_out = true;
      say(fmt::format("the job ran past --timeout {}s; terminating ranks {}", o.timeout,
                      running_list(ranks)));
      signal_all(ranks, SIGTERM);
      kill_at = now + std::chrono::seconds(5);
    }
    if (terminate_at && now > *terminate_at && !kill_at) {
      say(fmt::format("rank {} failed {}s ago; terminating ranks {}", *first_failure, o.grace,
                      running_list(ranks)));
      signal_all(ranks, SIGTERM);
      kill_at = now + std::chrono::seconds(5);
    }
    if (kill_at && now > *kill_at) {
      signal_all(ranks, SIGKILL);
      kill_at = now + std::chrono::hours(24);
    }
  }

  std::vector<std::string> bad;
  for (const Rank& r : ranks) {
    if (!failed(r.status)) continue;
    bad.push_back(fmt::format("rank {} {}{}", r.index, describe_status(r.status),
                              r.terminated ? " (terminated by dsdrun)" : ""));
  }
  if (bad.empty() && !timed_out && signalled == 0) return 0;
  std::string summary;
  for (const std::string& b : bad) summary += (summary.empty() ? "" : "; ") + b;
  say("FAILED: " + (summary.empty() ? std::string("job interrupted") : summary));
  if (timed_out) return 124;
  if (signalled != 0) return 128 + signalled;
  const int st = ranks[static_cast<size_t>(first_failure.value_or(0))].status;
  if (first_failure && WIFEXITED(st)) return WEXITSTATUS(st);
  if (first_failure && WIFSIGNALED(st)) return 128 + WTERMSIG(st);
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  CLI::App app{"Runs N local ranks of a command with torchrun's environment variables "
               "(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT)."};
  app.add_option("-n,--nproc", o.n, "Number of ranks")->required()->check(CLI::Range(1, 4096));
  app.add_option("--timeout", o.timeout,
                 "Seconds the whole job may run before every rank is terminated (default: no limit)")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--grace", o.grace,
                 "Seconds the other ranks get to exit after one fails, before they are terminated")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  app.add_option("--port", o.port, "MASTER_PORT (default: a free port)")->check(CLI::Range(1, 65535));
  app.add_option("--master-addr", o.addr, "MASTER_ADDR")->capture_default_str();
  app.prefix_command();
  app.footer("Everything from the first argument that is not an option on is the command.");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    const int rc = app.exit(e);
    return rc == 0 ? 0 : 2;
  }
  o.command = app.remaining();
  if (!o.command.empty() && o.command[0] == "--") o.command.erase(o.command.begin());
  if (o.command.empty()) {
    std::fprintf(stderr, "dsdrun: no command given\n%s", app.help().c_str());
    return 2;
  }
  return run(o);
}
