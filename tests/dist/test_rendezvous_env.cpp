// Reading the launchers' environments (no processes started), and the one-rank cases of the
// communicator constructors.
#include <gtest/gtest.h>

#include <ATen/ops/full.h>

#include <cstdio>
#include <map>
#include <string>
#include <unistd.h>

#include "core/dist/gloo_comm.h"
#include "core/dist/nccl_comm.h"
#include "core/dist/rendezvous.h"

namespace dsd {
namespace {

using Env = std::map<std::string, std::string>;

Result<LaunchEnv> read(const Env& env) {
  return read_launch_env([&](std::string_view name) -> std::optional<std::string> {
    auto it = env.find(std::string(name));
    if (it == env.end()) return std::nullopt;
    return it->second;
  });
}

std::string error_of(const Env& env) {
  auto r = read(env);
  EXPECT_FALSE(r.ok());
  if (r.ok()) return "";
  EXPECT_EQ(r.error().code, Code::kInvalidArgument);
  return r.error().message;
}

const Env kTorchrun = {{"RANK", "3"}, {"WORLD_SIZE", "8"}, {"LOCAL_RANK", "1"},
                       {"MASTER_ADDR", "node0"}, {"MASTER_PORT", "29400"}};

TEST(LaunchEnv, Torchrun) {
  auto r = read(kTorchrun);
  ASSERT_TRUE(r.ok()) << r.error().message;
  EXPECT_EQ(r->launcher, "torchrun");
  EXPECT_EQ(r->rank, 3);
  EXPECT_EQ(r->world_size, 8);
  EXPECT_EQ(r->local_rank, 1);
  EXPECT_EQ(r->master_addr, "node0");
  EXPECT_EQ(r->master_port, 29400);
  EXPECT_FALSE(r->agent_store);  // rank 0 hosts the store
  EXPECT_EQ(r->attempt, "0");
}

TEST(LaunchEnv, TorchrunAgentStore) {
  Env e = kTorchrun;
  e["TORCHELASTIC_USE_AGENT_STORE"] = "True";
  e["TORCHELASTIC_RESTART_COUNT"] = "2";
  auto r = read(e);
  ASSERT_TRUE(r.ok()) << r.error().message;
  EXPECT_TRUE(r->agent_store);
  EXPECT_EQ(r->attempt, "2");
  e["TORCHELASTIC_USE_AGENT_STORE"] = "False";
  EXPECT_FALSE(read(e)->agent_store);
  e.erase("TORCHELASTIC_RESTART_COUNT");
  e["TORCHELASTIC_USE_AGENT_STORE"] = "True";
  EXPECT_EQ(error_of(e), "TORCHELASTIC_RESTART_COUNT is not set, but TORCHELASTIC_USE_AGENT_STORE is (torchrun sets both)");
}

TEST(LaunchEnv, TorchrunErrorsNameTheVariable) {
  Env e = kTorchrun;
  e.erase("WORLD_SIZE");
  EXPECT_EQ(error_of(e), "WORLD_SIZE is not set (torchrun sets it)");
  e = kTorchrun;
  e.erase("RANK");
  EXPECT_EQ(error_of(e), "RANK is not set (torchrun sets it)");
  e = kTorchrun;
  e["RANK"] = "three";
  EXPECT_EQ(error_of(e), "RANK is 'three', not an integer");
  e["RANK"] = "8";
  EXPECT_EQ(error_of(e), "RANK=8 is outside a world of WORLD_SIZE=8");
  e["RANK"] = "-1";
  EXPECT_EQ(error_of(e), "RANK=-1 is outside a world of WORLD_SIZE=8");
  e = kTorchrun;
  e["WORLD_SIZE"] = "0";
  EXPECT_EQ(error_of(e), "WORLD_SIZE=0 is not a world size");
  e = kTorchrun;
  e["LOCAL_RANK"] = "1x";
  EXPECT_EQ(error_of(e), "LOCAL_RANK is '1x', not an integer");
  e = kTorchrun;
  e.erase("MASTER_ADDR");
  EXPECT_EQ(error_of(e), "MASTER_ADDR is not set (torchrun needs the host of rank 0)");
  e = kTorchrun;
  e.erase("MASTER_PORT");
  EXPECT_EQ(error_of(e), "MASTER_PORT is not set (torchrun needs the port of rank 0's store)");
  e["MASTER_PORT"] = "70000";
  EXPECT_EQ(error_of(e), "MASTER_PORT=70000 is not a TCP port (1-65535)");
  e["MASTER_PORT"] = "";
  EXPECT_EQ(error_of(e), "MASTER_PORT is '', not an integer");
}

TEST(LaunchEnv, LocalRankDefaultsToRank) {
  Env e = kTorchrun;
  e.erase("LOCAL_RANK");
  EXPECT_EQ(read(e)->local_rank, 3);
}

TEST(LaunchEnv, OpenMpiWithDefaults) {
  auto r = read({{"OMPI_COMM_WORLD_RANK", "1"}, {"OMPI_COMM_WORLD_SIZE", "4"},
                 {"OMPI_COMM_WORLD_LOCAL_RANK", "0"}});
  ASSERT_TRUE(r.ok()) << r.error().message;
  EXPECT_EQ(r->launcher, "mpirun");
  EXPECT_EQ(r->rank, 1);
  EXPECT_EQ(r->world_size, 4);
  EXPECT_EQ(r->local_rank, 0);
  EXPECT_EQ(r->master_addr, "127.0.0.1");
  EXPECT_EQ(r->master_port, 29500);
  auto set = read({{"OMPI_COMM_WORLD_RANK", "1"}, {"OMPI_COMM_WORLD_SIZE", "4"},
                   {"MASTER_ADDR", "10.0.0.5"}, {"MASTER_PORT", "1234"}});
  ASSERT_TRUE(set.ok());
  EXPECT_EQ(set->master_addr, "10.0.0.5");
  EXPECT_EQ(set->master_port, 1234);
  EXPECT_EQ(error_of({{"OMPI_COMM_WORLD_RANK", "1"}}), "OMPI_COMM_WORLD_SIZE is not set (mpirun sets it)");
}

TEST(LaunchEnv, TorchrunVariablesWinOverMpi) {
  Env e = kTorchrun;
  e["OMPI_COMM_WORLD_RANK"] = "0";
  e["OMPI_COMM_WORLD_SIZE"] = "2";
  EXPECT_EQ(read(e)->rank, 3);
}

TEST(LaunchEnv, Slurm) {
  auto r = read({{"SLURM_PROCID", "5"}, {"SLURM_NTASKS", "16"}, {"SLURM_LOCALID", "1"},
                 {"SLURM_STEP_NODELIST", "gpu[012-015,020]"}, {"SLURM_JOB_NODELIST", "x"},
                 {"SLURM_JOB_ID", "4242424"}});
  ASSERT_TRUE(r.ok()) << r.error().message;
  EXPECT_EQ(r->launcher, "srun");
  EXPECT_EQ(r->rank, 5);
  EXPECT_EQ(r->world_size, 16);
  EXPECT_EQ(r->local_rank, 1);
  EXPECT_EQ(r->master_addr, "gpu012");
  EXPECT_EQ(r->master_port, 15000 + 2424);
  EXPECT_EQ(error_of({{"SLURM_PROCID", "0"}, {"SLURM_NTASKS", "2"}, {"SLURM_JOB_ID", "7"}}),
            "MASTER_ADDR is not set (srun needs the host of rank 0)");
  EXPECT_EQ(error_of({{"SLURM_PROCID", "0"}, {"SLURM_NTASKS", "2"}, {"SLURM_JOB_NODELIST", "a"}}),
            "MASTER_PORT is not set (srun needs the port of rank 0's store)");
  EXPECT_EQ(error_of({{"SLURM_PROCID", "0"}, {"SLURM_NTASKS", "2"}, {"SLURM_JOB_NODELIST", "a"},
                      {"SLURM_JOB_ID", "x1"}}),
            "SLURM_JOB_ID is 'x1', not an integer");
}

TEST(LaunchEnv, NoLauncher) {
  EXPECT_EQ(error_of({}),
            "RANK and WORLD_SIZE are not set: launch with torchrun, dsdrun, mpirun or srun, or "
            "set RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT");
}

TEST(FirstSlurmHost, Forms) {
  EXPECT_EQ(first_slurm_host("node7"), "node7");
  EXPECT_EQ(first_slurm_host("a1,b2"), "a1");
  EXPECT_EQ(first_slurm_host("node[01-04,07],gpu3"), "node01");
  EXPECT_EQ(first_slurm_host("node[3,5]"), "node3");
  EXPECT_EQ(first_slurm_host("rack[1-2]-n[08-09]"), "rack1-n08");
}

TEST(FileStore, OneRankWorldAndBadArguments) {
  EXPECT_TRUE(gloo_available());
  char path[] = "/tmp/dsd_test_rendezvous_XXXXXX";
  const int fd = mkstemp(path);
  ASSERT_GE(fd, 0);
  close(fd);
  unlink(path);
  auto bad_rank = communicator_from_file_store(path, 2, 2);
  ASSERT_FALSE(bad_rank.ok());
  EXPECT_EQ(bad_rank.error().message, "rank 2 is outside a world of 2");
  auto bad_timeout = communicator_from_file_store(path, 0, 1, {std::chrono::milliseconds(-5)});
  ASSERT_FALSE(bad_timeout.ok());
  EXPECT_EQ(bad_timeout.error().message, "the timeout must be positive, not -5 ms");
  auto comm = communicator_from_file_store(path, 0, 1, {std::chrono::milliseconds(5000)});
  ASSERT_TRUE(comm.ok()) << comm.error().message;
  Communicator& c = **comm;
  EXPECT_EQ(c.rank(), 0);
  EXPECT_EQ(c.size(), 1);
  EXPECT_EQ(c.backend_name(), "gloo");
  at::Tensor x = at::full({3}, 2.0, at::kFloat);
  EXPECT_TRUE(c.all_reduce(x, ReduceOp::kSum).ok());
  EXPECT_TRUE(x.equal(at::full({3}, 2.0, at::kFloat)));
  EXPECT_TRUE(c.barrier().ok());
  EXPECT_TRUE(agree(c, ok()).ok());
  unlink(path);
}

TEST(Nccl, NeedsACommunicator) {
  auto r = make_nccl_communicator(nullptr, nullptr, 0, 1, std::chrono::milliseconds(1000));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code, nccl_available() ? Code::kInvalidArgument : Code::kUnsupported);
}

}  // namespace
}  // namespace dsd
