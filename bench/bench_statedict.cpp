// statedict.get_vs_map: no-copy get_model_state_dict on a model of 10,000 tensors, against
// building the same std::map<std::string, at::Tensor> directly, in the same run.
#include <benchmark/benchmark.h>

#include <ATen/ops/empty.h>

#include <map>
#include <string>
#include <vector>

#include "core/statedict/state_dict.h"

namespace {

constexpr int kEntries = 10000;

struct Fixture {
  std::vector<std::string> names;
  std::vector<at::Tensor> tensors;
  dsd::Model model;
  Fixture() {
    for (int i = 0; i < kEntries; ++i) {
      names.push_back("layers." + std::to_string(i / 10) + ".block.linear" + std::to_string(i % 10) + ".weight");
      tensors.push_back(at::empty({4, 4}));
      if (!model.add_parameter(names.back(), dsd::TensorValue{tensors.back(), nullptr, false}, true).ok()) std::abort();
    }
    if (!dsd::get_model_state_dict(model).ok()) std::abort();  // resolve FQNs once, as a trainer would
  }
};

Fixture& fixture() {
  static Fixture f;
  return f;
}

void BM_GetModelStateDict(benchmark::State& state) {
  Fixture& f = fixture();
  for (auto _ : state) {
    auto sd = dsd::get_model_state_dict(f.model);
    benchmark::DoNotOptimize(sd);
  }
  state.SetItemsProcessed(state.iterations() * kEntries);
}
BENCHMARK(BM_GetModelStateDict)->Unit(benchmark::kMicrosecond);

void BM_StdMap(benchmark::State& state) {
  Fixture& f = fixture();
  for (auto _ : state) {
    std::map<std::string, at::Tensor> m;
    for (int i = 0; i < kEntries; ++i) m.emplace(f.names[i], f.tensors[i]);
    benchmark::DoNotOptimize(m);
  }
  state.SetItemsProcessed(state.iterations() * kEntries);
}
BENCHMARK(BM_StdMap)->Unit(benchmark::kMicrosecond);

}  // namespace

BENCHMARK_MAIN();
