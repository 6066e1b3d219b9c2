#include "core/checkpoint/crash_point.h"

#include <signal.h>
#include <unistd.h>

#include <cstdlib>
#include <string>

namespace dsd::checkpoint::detail {
namespace {

struct Armed {
  bool armed = false;
  std::string point;
};

Armed parse() {
  Armed a;
  const char* spec = std::getenv("DSD_CHECKPOINT_CRASH_AT");
  if (spec == nullptr || *spec == '\0') return a;
  std::string s(spec);
  const size_t at = s.find('@');
  if (at != std::string::npos) {
    const char* rank = std::getenv("RANK");
    if (rank == nullptr || s.substr(at + 1) != rank) return a;  // another rank's crash
    s.resize(at);
  }
  a.armed = true;
  a.point = std::move(s);
  return a;
}

const Armed& armed() {
  static const Armed a = parse();
  return a;
}

}  // namespace

bool crash_points_armed() { return armed().armed; }

void reach_crash_point(std::string_view point) {
  if (point != armed().point) return;
  const std::string line = "dsd: crash point " + std::string(point) + " reached\n";
  (void)!::write(2, line.data(), line.size());
  ::kill(::getpid(), SIGKILL);
}

}  // namespace dsd::checkpoint::detail
