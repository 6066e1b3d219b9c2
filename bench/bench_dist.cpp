// Distributed state-dict figures, run on several ranks (tools/dsdrun -n 4 bench_dist):
//
//  dist.gather_vs_allgather      full-state-dict gather throughput ÷ a raw all-gather of the
//                                same bytes over the same communicator, in the same run
//  dist.bcast_peak_ratio         broadcast_from_rank0 of 8 × 64 MiB: peak RSS of rank 1 ÷
//                                (its shard bytes + bucket + its RSS before the call)
//  dist.sharded_get_us_per_entry sharded get_model_state_dict of 10,000 entries, µs per entry
//
// Rank 0 prints one JSON object; bench/run.py reads it.
#include <ATen/ops/empty.h>
#include <ATen/ops/randn.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

#include "core/dist/comm.h"
#include "core/dist/layout.h"
#include "core/dist/mesh.h"
#include "core/dist/rendezvous.h"
#include "core/statedict/full_sharded.h"
#include "core/statedict/state_dict.h"

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

void must(dsd::Status s);

// Median over `repeat` runs, every run starting together on all ranks.
template <class F>
double median_seconds(dsd::Communicator& comm, int repeat, F&& fn) {
  std::vector<double> times;
  for (int i = 0; i < repeat; ++i) {
    must(comm.barrier());
    auto t = Clock::now();
    fn();
    times.push_back(seconds_since(t));
  }
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
}

int64_t status_kb(const std::string& field) {
  std::ifstream f("/proc/self/status");
  std::string line;
  while (std::getline(f, line)) {
    if (line.rfind(field + ":", 0) == 0) return std::stoll(line.substr(field.size() + 1));
  }
  return -1;
}

void reset_peak_rss() {
  std::ofstream f("/proc/self/clear_refs");
  f << "5";
}

template <class T>
T must(dsd::Result<T> r) {
  if (!r.ok()) {
    std::fprintf(stderr, "bench_dist: %s\n", r.error().message.c_str());
    std::exit(1);
  }
  return std::move(r).value();
}

void must(dsd::Status s) {
  if (!s.ok()) {
    std::fprintf(stderr, "bench_dist: %s\n", s.error().message.c_str());
    std::exit(1);
  }
}

std::shared_ptr<const dsd::Layout> shard0(std::shared_ptr<const dsd::DeviceMesh> mesh,
                                          std::vector<int64_t> shape) {
  return must(dsd::Layout::on_mesh(std::move(shape), std::move(mesh), {dsd::Placement::shard(0)}));
}

dsd::TensorValue local_of(const std::shared_ptr<const dsd::Layout>& layout) {
  const dsd::Chunk c = layout->local_chunk();
  return dsd::TensorValue{at::randn(c.sizes), layout, false};
}

}  // namespace

int main() {
  dsd::CommOptions opts;
  opts.timeout = std::chrono::minutes(5);
  auto comm = must(dsd::communicator_from_env(opts));
  const int rank = comm->rank();
  const int world = comm->size();
  auto mesh = must(dsd::DeviceMesh::make(comm, {world}, {}, c10::DeviceType::CPU));

  // 1. Sharded get of 10,000 entries: no collective, no copy.
  double us_per_entry = 0;
  {
    dsd::Model model(comm);
    for (int i = 0; i < 10000; ++i) {
      auto layout = shard0(mesh, {2 * world, 4});
      must(model.add_parameter("layers." + std::to_string(i / 10) + ".w" + std::to_string(i % 10),
                               local_of(layout), true));
    }
    must(dsd::get_model_state_dict(model));  // resolve FQNs once, as a trainer would
    const double s = median_seconds(*comm, 5, [&] { must(dsd::get_model_state_dict(model)); });
    us_per_entry = s * 1e6 / 10000;
  }

  // 2. Full gather of 16 tensors × 4 MiB per rank, against raw all-gathers of the same bytes.
  double gather_ratio = 0;
  {
    auto sd = dsd::Dict::make();
    std::vector<at::Tensor> inputs;
    for (int i = 0; i < 16; ++i) {
      auto layout = shard0(mesh, {static_cast<int64_t>(world) * 1024, 1024});
      dsd::TensorValue v = local_of(layout);
      inputs.push_back(v.tensor);
      sd->set("w" + std::to_string(i), dsd::Value(v));
    }
    auto run_ours = [&] { must(dsd::gather_state_dict(sd, comm.get(), false, false, 0)); };
    // The raw baseline keeps its outputs too, as a gathered state dict does.
    auto run_raw = [&] {
      std::vector<at::Tensor> outs;
      for (const at::Tensor& in : inputs) {
        outs.push_back(at::empty({in.numel() * world}, in.options()));
        at::Tensor flat = in.view(-1);
        must(comm->all_gather(outs.back(), flat));
      }
    };
    // Warm both up (the allocator's first large blocks fault their pages in), then alternate.
    run_ours();
    run_raw();
    std::vector<double> t_ours, t_raw;
    for (int i = 0; i < 5; ++i) {
      t_ours.push_back(median_seconds(*comm, 1, run_ours));
      t_raw.push_back(median_seconds(*comm, 1, run_raw));
    }
    std::sort(t_ours.begin(), t_ours.end());
    std::sort(t_raw.begin(), t_raw.end());
    const double ours = t_ours[2];
    const double raw = t_raw[2];
    gather_ratio = raw / ours;  // throughput ratio: same bytes
    if (rank == 0) std::fprintf(stderr, "gather: dsd %.3f s, raw all-gather %.3f s\n", ours, raw);
  }

  // 3. broadcast_from_rank0 of 8 × 64 MiB into Shard(0) shards; peak RSS of rank 1.
  double peak_ratio = 0;
  int64_t shard_bytes = 0;
  {
    dsd::Model model(comm);
    std::vector<std::vector<int64_t>> shapes(8, std::vector<int64_t>{16384, 1024});
    for (int i = 0; i < 8; ++i) {
      auto layout = shard0(mesh, shapes[static_cast<size_t>(i)]);
      dsd::TensorValue v{at::empty(layout->local_chunk().sizes), layout, false};
      shard_bytes += v.tensor.numel() * static_cast<int64_t>(v.tensor.element_size());
      must(model.add_parameter("w" + std::to_string(i), v, true));
    }
    auto full = dsd::Dict::make();
    if (rank == 0) {
      for (int i = 0; i < 8; ++i) full->set("w" + std::to_string(i), dsd::Value(at::randn(shapes[static_cast<size_t>(i)])));
    }
    dsd::StateDictOptions o;
    o.full_state_dict = true;
    o.broadcast_from_rank0 = true;
    must(comm->barrier());
    const int64_t before_kb = status_kb("VmRSS");
    reset_peak_rss();
    auto keys = dsd::set_model_state_dict(model, *full, o);
    if (!keys.ok()) must(dsd::Status(keys.error()));
    const int64_t peak_kb = status_kb("VmHWM");
    const int64_t bucket = 64ll << 20;
    peak_ratio = static_cast<double>(peak_kb) * 1024.0 / static_cast<double>(shard_bytes + bucket + before_kb * 1024);
    // Share rank 1's figure with rank 0, which prints.
    at::Tensor mine = at::empty({1}, at::kDouble);
    mine.data_ptr<double>()[0] = peak_ratio;
    must(comm->broadcast(mine, world > 1 ? 1 : 0));
    peak_ratio = mine.data_ptr<double>()[0];
  }

  if (rank == 0) {
    std::printf("{\"dist.sharded_get_us_per_entry\": %.3f, \"dist.gather_vs_allgather\": %.3f, "
                "\"dist.bcast_peak_ratio\": %.3f, \"dist.world\": %d, \"dist.bcast_shard_mib\": %.1f}\n",
                us_per_entry, gather_ratio, peak_ratio, world, static_cast<double>(shard_bytes) / (1 << 20));
  }
  must(comm->barrier());
  return 0;
}
