#include "core/checkpoint/load.h"

#include <ATen/ops/empty.h>

#include <deque>
#include <string_view>
#include <unordered_set>

#include "core/base/make_error.h"
#include "core/base/torch_call.h"
#include "core/checkpoint/cooperative_load.h"
#include "core/checkpoint/io.h"
#include "core/checkpoint/load_planner.h"
#include "core/checkpoint/pool.h"
#include "core/checkpoint/source.h"
#include "core/checkpoint/storage_reader.h"
#include "core/statedict/flatten.h"

namespace dsd::checkpoint {
namespace {

constexpr uint64_t kMaxManifestBytes = 1u << 30;

// Copies what was read through a staging buffer into its destination.
Status finish_targets(std::vector<LoadTarget>& targets) {
  for (LoadTarget& t : targets) {
    if (!t.staging.defined()) continue;
    TRY(torch_call(Code::kDevice, fmt::format("copying the loaded '{}' into place", t.key),
                   [&] { t.tensor.copy_(t.staging); }));
  }
  return ok();
}

}  // namespace

Result<at::Tensor> read_full_tensor(const Source& source, const Entry& entry, const LoadOptions& options) {
  if (entry.kind != Entry::Kind::kTensor) {
    return make_error_at(Code::kWrongKind, entry.key, "'{}' is a non-tensor value, not a tensor", entry.key);
  }
  StorageReader reader(source, options.verify);
  const LoadTarget tg = TRY(full_load_target(entry));
  std::vector<ReadItem> items;
  add_read_items(entry, tg, items);
  const int threads = default_threads(options.thread_count, 8);
  TRY(reader.add(items, threads));
  uint64_t bytes = 0;
  TRY(reader.run(threads, bytes));
  return tg.tensor;
}

Result<Manifest> read_manifest(const std::string& path) {
  const std::string file = join(path, kManifestName);
  if (!path_exists(file)) {
    return make_error_at(Code::kNotFound, path, "no checkpoint at '{}' (no {})", path, kManifestName);
  }
  const std::string text = TRY(read_file(file, kMaxManifestBytes));
  return parse_manifest(text, file);
}

Result<LoadReport> load(Communicator& comm, Dict& state_dict, const std::string& path,
                        const LoadOptions& options) {
  LoadReport report;
  auto source = open_source(path, {options.allow_external_files});
  TRY(agree(comm, source.ok() ? ok() : Status(source.error())));
  const Manifest& m = source->manifest;
  auto plan = create_load_plan(*source, state_dict, path, options.strict, report);
  // Agrees on every rank's plan, and on the entries every rank loads whole.
  std::vector<char> shared = TRY(agree_shared_entries(comm, m, plan.ok() ? &*plan : nullptr, options.cooperative,
                                                      plan.ok() ? ok() : Status(plan.error())));
  const CooperativePlan cp =
      plan_cooperative_reads(m, std::move(shared), comm.size(), options.cooperative_bucket_bytes);
  StorageReader reader(*source, options.verify);
  const int threads = default_threads(options.thread_count, 8);
  // What this rank reads alone first, then the shared chunks, each read by one rank.
  Status st = reader.add(own_read_items(m, cp, plan->items), threads);
  if (st.ok()) st = reader.run(threads, report.bytes_read);
  const bool agreed = !cp.rounds.empty();
  st = read_cooperatively(comm, *source, cp, *plan, options, std::move(st), report);
  if (!st.ok() && agreed) return std::move(st).error();  // the same error on every rank already
  if (st.ok()) st = finish_targets(plan->targets);
  TRY(agree(comm, std::move(st)));
  for (auto& [p, v] : plan->values) TRY(set_element(state_dict, p, std::move(v)));
  return report;
}

Result<DictPtr> load_full(const std::string& path, std::span<const std::string> keys,
                          const LoadOptions& options) {
  const Source src = TRY(open_source(path, {options.allow_external_files}));
  const Manifest& m = src.manifest;
  std::unordered_set<std::string_view> wanted(keys.begin(), keys.end());
  std::unordered_set<std::string_view> matched;
  auto include = [&](const Entry& e) {
    if (wanted.empty()) return true;
    bool any = false;
    if (wanted.count(e.key)) {
      matched.insert(e.key);
      any = true;
    }
    std::string prefix;
    for (const PathSegment& p : e.path) {
      if (!prefix.empty()) prefix += '.';
      prefix += p.str();
      if (auto w = wanted.find(prefix); w != wanted.end()) {
        matched.insert(*w);
        any = true;
      }
    }
    return any;
  };
  StorageReader reader(src, options.verify);
  DictPtr out = Dict::make();
  std::deque<LoadTarget> targets;
  std::vector<ReadItem> items;
  for (const Entry& e : m.entries) {
    if (!include(e)) continue;
    const Path& p = e.path;
    if (e.kind == Entry::Kind::kValue) {
      TRY(set_element(*out, p, TRY(read_source_value(src, e))));
      continue;
    }
    LoadTarget& tg = targets.emplace_back(TRY(full_load_target(e)));
    add_read_items(e, tg, items);
    TRY(set_element(*out, p, Value(tg.tensor)));
  }
  for (const std::string& k : keys) {
    if (!matched.count(k)) {
      return make_error_at(Code::kNotFound, k, "key '{}' matches nothing in checkpoint '{}'", k, path);
    }
  }
  const int threads = default_threads(options.thread_count, 8);
  TRY(reader.add(items, threads));
  uint64_t bytes = 0;
  TRY(reader.run(threads, bytes));
  mark_int_key_dicts(*out, m.int_key_dicts);
  return out;
}

}  // namespace dsd::checkpoint
