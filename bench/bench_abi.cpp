// abi.call_ns: the cost of a trivial C ABI call that looks a tensor handle up in the table
// (generation check, strong reference, guard). abi.call_vs_plain: that call against a plain
// exported call that takes no handle (dsd_dtype_size: the same PLT jump into libdsd, no table),
// measured in the same run. BM_AbiVersion (a constant) is the bare call into libdsd, and
// BM_PlainCall the floor of an indirect call inside the binary.
#include <benchmark/benchmark.h>

#include <vector>

#include "dsd/dsd.h"

namespace {

dsd_tensor make_tensor(std::vector<float>& buf) {
  const int64_t shape[1] = {static_cast<int64_t>(buf.size())};
  dsd_tensor t{};
  if (dsd_tensor_from_blob(buf.data(), DSD_DTYPE_F32, shape, 1, nullptr, {DSD_DEVICE_CPU, 0}, false,
                           nullptr, nullptr, &t, nullptr) != DSD_OK) {
    std::abort();
  }
  return t;
}

void BM_TensorInfo(benchmark::State& state) {
  std::vector<float> buf(16);
  // A table with other live handles, as a trainer's would be.
  std::vector<dsd_tensor> others;
  for (int i = 0; i < 1000; ++i) others.push_back(make_tensor(buf));
  dsd_tensor t = make_tensor(buf);
  dsd_tensor_info info;
  for (auto _ : state) {
    dsd_status s = dsd_tensor_info_get(t, &info, nullptr);
    benchmark::DoNotOptimize(s);
    benchmark::DoNotOptimize(info);
  }
  dsd_tensor_release(t, nullptr);
  for (dsd_tensor o : others) dsd_tensor_release(o, nullptr);
}
BENCHMARK(BM_TensorInfo);

// The floor: an opaque call through a function pointer that reads a few fields.
__attribute__((noinline)) int32_t plain_call(const std::vector<float>* v, dsd_tensor_info* out) {
  out->numel = static_cast<int64_t>(v->size());
  out->data = const_cast<float*>(v->data());
  return 0;
}

void BM_PlainCall(benchmark::State& state) {
  std::vector<float> buf(16);
  int32_t (*volatile fn)(const std::vector<float>*, dsd_tensor_info*) = plain_call;
  dsd_tensor_info info;
  for (auto _ : state) {
    benchmark::DoNotOptimize(fn(&buf, &info));
    benchmark::DoNotOptimize(info);
  }
}
BENCHMARK(BM_PlainCall);

// The baseline of abi.call_vs_plain: an exported libdsd function without a handle.
void BM_PlainExportedCall(benchmark::State& state) {
  dsd_dtype dtype = DSD_DTYPE_F32;
  for (auto _ : state) {
    benchmark::DoNotOptimize(dtype);
    benchmark::DoNotOptimize(dsd_dtype_size(dtype));
  }
}
BENCHMARK(BM_PlainExportedCall);

// A plain exported call of a fallible function: the same guard, argument check and output write
// as dsd_tensor_info_get, without a handle lookup. call_vs_plain = what the lookup adds.
void BM_GuardedCall(benchmark::State& state) {
  dsd_comm* comm = nullptr;
  if (dsd_comm_new_local(&comm, nullptr) != DSD_OK) state.SkipWithError("dsd_comm_new_local failed");
  int32_t rank = -1;
  for (auto _ : state) {
    benchmark::DoNotOptimize(dsd_comm_rank(comm, &rank, nullptr));
    benchmark::DoNotOptimize(rank);
  }
  dsd_comm_release(comm);
}
BENCHMARK(BM_GuardedCall);

// The bare cost of entering libdsd: a function that returns a constant (call and return only).
void BM_AbiVersion(benchmark::State& state) {
  for (auto _ : state) benchmark::DoNotOptimize(dsd_abi_version());
}
BENCHMARK(BM_AbiVersion);

void BM_StaleHandle(benchmark::State& state) {
  std::vector<float> buf(16);
  dsd_tensor t = make_tensor(buf);
  dsd_tensor_release(t, nullptr);
  dsd_tensor_info info;
  for (auto _ : state) {
    benchmark::DoNotOptimize(dsd_tensor_info_get(t, &info, nullptr));
  }
}
BENCHMARK(BM_StaleHandle);

}  // namespace

BENCHMARK_MAIN();
