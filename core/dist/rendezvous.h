// Rendezvous: building a communicator from what the launcher tells each process.
//
// Launchers and the variables read, first match wins:
//   torchrun, dsdrun  RANK, WORLD_SIZE, LOCAL_RANK (default: RANK), MASTER_ADDR, MASTER_PORT;
//                     TORCHELASTIC_USE_AGENT_STORE=True means torchrun's agent already hosts
//                     the TCPStore at MASTER_ADDR:MASTER_PORT and every rank is a client;
//                     otherwise rank 0 hosts it. TORCHELASTIC_RESTART_COUNT separates the keys
//                     of successive attempts.
//   mpirun (OpenMPI)  OMPI_COMM_WORLD_RANK, OMPI_COMM_WORLD_SIZE, OMPI_COMM_WORLD_LOCAL_RANK
//                     (default: the rank); MASTER_ADDR (default 127.0.0.1, so set it when the
//                     ranks span several hosts: mpirun -x MASTER_ADDR=host0) and MASTER_PORT
//                     (default 29500). Rank 0 hosts the store.
//   srun (Slurm)      SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID (default: the rank);
//                     MASTER_ADDR (default: the first host of SLURM_STEP_NODELIST, else of
//                     SLURM_JOB_NODELIST) and MASTER_PORT (default 15000 + SLURM_JOB_ID % 10000,
//                     so jobs sharing a node differ). Rank 0 hosts the store.
// A missing or malformed variable is a kInvalidArgument error naming it.
//
// The store is c10d's TCPStore, multi-tenant, so torch.distributed in the same process can
// share its server; dsd's keys live under "dsd/", never colliding with PyTorch's.
#pragma once

#include <chrono>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>

#include "core/base/result.h"
#include "core/dist/comm.h"

namespace dsd {

struct CommOptions {
  // How long the rendezvous waits for every rank, and each collective for its peers; past it
  // the call fails with kTimeout instead of hanging. PyTorch's default for Gloo.
  std::chrono::milliseconds timeout{std::chrono::minutes(30)};
};

// What the launcher told this process.
struct LaunchEnv {
  std::string launcher;  // "torchrun" (also dsdrun and hand-set RANK), "mpirun", "srun"
  int rank = 0;
  int world_size = 1;
  int local_rank = 0;
  std::string master_addr;
  int master_port = 0;
  bool agent_store = false;   // the store already exists (torchrun's agent hosts it)
  std::string attempt = "0";  // TORCHELASTIC_RESTART_COUNT
};

// Looks up an environment variable; nullopt when unset.
using EnvLookup = std::function<std::optional<std::string>(std::string_view name)>;

// Reads the launcher's variables through `getenv`, as described above.
Result<LaunchEnv> read_launch_env(const EnvLookup& getenv);
// The same, from this process's environment.
Result<LaunchEnv> read_launch_env();

// The first host of a Slurm node list: "node[01-04,07],gpu3" -> "node01".
std::string first_slurm_host(std::string_view nodelist);

// A Gloo communicator over the TCPStore the launch describes. Collective: every rank of the
// launch calls it, in the same order as its other communicator constructions. Errors: kTimeout
// (a rank or the store did not show up within the timeout, naming the missing ranks), kComm
// (the store could not be hosted or reached, connections failed), kUnsupported (no Gloo).
Result<std::shared_ptr<Communicator>> communicator_from_launch(const LaunchEnv& launch,
                                                               const CommOptions& options = {});
// read_launch_env() + communicator_from_launch().
Result<std::shared_ptr<Communicator>> communicator_from_env(const CommOptions& options = {});

// A Gloo communicator whose rendezvous goes through a file every rank can open (tests, one
// machine or a shared file system). The file must not hold keys of an earlier run.
Result<std::shared_ptr<Communicator>> communicator_from_file_store(const std::string& path,
                                                                   int rank, int size,
                                                                   const CommOptions& options = {});

}  // namespace dsd
