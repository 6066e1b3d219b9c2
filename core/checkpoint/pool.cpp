#include "core/checkpoint/pool.h"

#include <sched.h>

#include <cstdlib>
#include <string>

namespace dsd::checkpoint {
namespace {

// A positive integer from the environment, or 0.
int env_count(const char* name) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return 0;
  char* end = nullptr;
  const long n = std::strtol(v, &end, 10);
  return (*end == '\0' && n > 0 && n < 1 << 20) ? static_cast<int>(n) : 0;
}

int compute_cores_per_local_rank() {
  int cores = 0;
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) cores = CPU_COUNT(&set);
  if (cores <= 0) cores = static_cast<int>(std::thread::hardware_concurrency());
  int local = env_count("LOCAL_WORLD_SIZE");
  if (local == 0) local = env_count("OMPI_COMM_WORLD_LOCAL_SIZE");
  return std::max(1, cores / std::max(1, local));
}

}  // namespace

int cores_per_local_rank() {
  static const int n = compute_cores_per_local_rank();
  return n;
}

}  // namespace dsd::checkpoint
