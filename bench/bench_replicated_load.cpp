// Cooperative load of a fully replicated state (core/checkpoint/cooperative_load.h), run on
// several ranks (tools/dsdrun -n 4 bench_replicated_load DIR BYTES) by bench/bench_ckpt.py:
//
//  ckpt.replicated_load_bytes_ratio        bytes read from storage by all ranks / the
//                                          checkpoint's data bytes, cooperative load
//  ckpt.replicated_load_bytes_ratio_alone  the same with LoadOptions::cooperative off (the
//                                          baseline: every rank reads everything, ~world)
//  ckpt.replicated_load_time_vs_alone      cooperative load seconds / non-cooperative load
//                                          seconds, same files (page cache or tmpfs), median of
//                                          5 interleaved runs, barrier to barrier
//
// The state: 16 float32 tensors of BYTES/16 (minus the small ones) and 64 small ones of 16 KiB
// (norms, biases), every one a plain tensor on every rank. Rank 0 prints one JSON object.
#include <ATen/ops/empty.h>
#include <ATen/ops/randn.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "core/checkpoint/load.h"
#include "core/checkpoint/save.h"
#include "core/dist/comm.h"
#include "core/dist/rendezvous.h"
#include "core/statedict/value.h"

namespace ck = dsd::checkpoint;

namespace {

using Clock = std::chrono::steady_clock;

template <class T>
T must(dsd::Result<T> r) {
  if (!r.ok()) {
    std::fprintf(stderr, "bench_replicated_load: %s\n", r.error().message.c_str());
    std::exit(1);
  }
  return std::move(*r);
}
void must(dsd::Status s) {
  if (!s.ok()) {
    std::fprintf(stderr, "bench_replicated_load: %s\n", s.error().message.c_str());
    std::exit(1);
  }
}

dsd::DictPtr make_state(int64_t total, bool zeros) {
  dsd::DictPtr sd = dsd::Dict::make();
  constexpr int kBig = 16, kSmall = 64, kCols = 1024;
  const int64_t small_rows = 4;  // 16 KiB
  const int64_t rows = std::max<int64_t>(1, (total - kSmall * small_rows * kCols * 4) / kBig / kCols / 4);
  at::manual_seed(1);
  for (int i = 0; i < kBig + kSmall; ++i) {
    const int64_t r = i < kBig ? rows : small_rows;
    at::Tensor t = zeros ? at::zeros({r, kCols}) : at::randn({r, kCols});
    sd->set(i < kBig ? "w" + std::to_string(i) : "norm" + std::to_string(i - kBig), dsd::Value(t));
  }
  return sd;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: bench_replicated_load DIR BYTES\n");
    return 2;
  }
  const std::string dir = std::string(argv[1]) + "/ck";
  const int64_t total = std::atoll(argv[2]);
  dsd::CommOptions opts;
  opts.timeout = std::chrono::minutes(10);
  auto comm = must(dsd::communicator_from_env(opts));
  const int world = comm->size();
  const int rank = comm->rank();

  dsd::DictPtr src = make_state(total, false);
  (void)must(ck::save(*comm, *src, dir));
  const ck::Manifest m = must(ck::read_manifest(dir));
  uint64_t data = 0;
  for (const ck::Entry& e : m.entries) {
    for (const ck::ChunkRecord& c : e.chunks) data += c.nbytes();
  }
  dsd::DictPtr dst = make_state(total, true);

  auto sum = [&](uint64_t mine) {
    at::Tensor t = at::empty({1}, at::kLong);
    t.data_ptr<int64_t>()[0] = static_cast<int64_t>(mine);
    must(comm->all_reduce(t, dsd::ReduceOp::kSum));
    return static_cast<uint64_t>(t.data_ptr<int64_t>()[0]);
  };
  // One load of each kind, checked against the saved tensors; the files are now in memory.
  std::vector<uint64_t> read(2, 0);
  for (int coop = 0; coop < 2; ++coop) {
    ck::LoadOptions o;
    o.cooperative = coop == 1 ? ck::LoadOptions::Cooperative::kAlways : ck::LoadOptions::Cooperative::kNever;
    for (const auto& e : *dst) e.value.if_tensor()->tensor.zero_();
    const ck::LoadReport r = must(ck::load(*comm, *dst, dir, o));
    read[coop] = sum(r.bytes_read);
    std::string why;
    if (!dsd::deep_equal(*src, *dst, &why)) {
      std::fprintf(stderr, "bench_replicated_load: the load (cooperative %d) differs: %s\n", coop, why.c_str());
      return 1;
    }
  }
  src.reset();
  std::vector<double> times[2];
  for (int round = 0; round < 5; ++round) {
    for (int coop = 0; coop < 2; ++coop) {
      ck::LoadOptions o;
      o.cooperative = coop == 1 ? ck::LoadOptions::Cooperative::kAlways : ck::LoadOptions::Cooperative::kNever;
      must(comm->barrier());
      const auto t0 = Clock::now();
      (void)must(ck::load(*comm, *dst, dir, o));
      must(comm->barrier());
      times[coop].push_back(std::chrono::duration<double>(Clock::now() - t0).count());
    }
  }
  if (rank == 0) {
    const double alone = median(times[0]), together = median(times[1]);
    std::fprintf(stderr, "replicated load, world %d, %.1f MiB of data: alone %.3f s (%.1f MiB read), cooperative %.3f s (%.1f MiB read)\n",
                 world, data / 1048576.0, alone, read[0] / 1048576.0, together, read[1] / 1048576.0);
    std::printf("{\"ckpt.replicated_load_bytes_ratio\": %.4f, \"ckpt.replicated_load_bytes_ratio_alone\": %.4f, "
                "\"ckpt.replicated_load_time_vs_alone\": %.3f}\n",
                static_cast<double>(read[1]) / static_cast<double>(data),
                static_cast<double>(read[0]) / static_cast<double>(data), together / alone);
  }
  must(comm->barrier());
  return 0;
}
