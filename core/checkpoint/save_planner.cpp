#include "core/checkpoint/save_planner.h"

#include <fmt/ranges.h>

#include <algorithm>
#include <deque>
#include <unordered_map>
#include <unordered_set>

#include "core/base/make_error.h"
#include "core/base/strings.h"
#include "core/checkpoint/box_overlap.h"

namespace dsd::checkpoint {
namespace {

using nlohmann::json;

int64_t numel_of(const std::vector<int64_t>& dims) {
  int64_t n = 1;
  for (int64_t d : dims) n *= d;
  return n;
}

Error plan_error(const std::string& key, std::string what) {
  return make_error_at(Code::kInvalidArgument, key, "Failed to validate global plan: {}", what);
}

// _validate_global_plan for one tensor: bounds, pairwise disjoint boxes, full coverage.
Status validate_chunks(const std::string& key, const std::vector<const WriteItem*>& chunks) {
  const auto& shape = chunks.front()->global_shape;
  int64_t covered = 0;
  for (const WriteItem* c : chunks) {
    if (c->offsets.size() != shape.size() || c->sizes.size() != shape.size()) {
      return plan_error(key, fmt::format("a chunk of '{}' has rank {} but the tensor has rank {}",
                                         key, c->sizes.size(), shape.size()));
    }
    for (size_t d = 0; d < shape.size(); ++d) {
      if (c->offsets[d] < 0 || c->sizes[d] < 0 || c->offsets[d] + c->sizes[d] > shape[d]) {
        return plan_error(key, fmt::format("chunk offsets [{}] sizes [{}] of '{}' are out of bounds of [{}]",
                                           fmt::join(c->offsets, ", "), fmt::join(c->sizes, ", "),
                                           key, fmt::join(shape, ", ")));
      }
    }
    covered += numel_of(c->sizes);
  }
  if (auto pair = find_overlapping_boxes(chunks, shape.size())) {
    return plan_error(key, fmt::format("chunks [{}] and [{}] of '{}' overlap",
                                       fmt::join(chunks[pair->first]->offsets, ", "),
                                       fmt::join(chunks[pair->second]->offsets, ", "), key));
  }
  if (covered != numel_of(shape)) {
    return plan_error(key, fmt::format("the chunks of '{}' cover {} of its {} elements", key,
                                       covered, numel_of(shape)));
  }
  return ok();
}

void assign_files(RankPlan& rp, const std::string& save_id, int64_t rank, int files_per_rank) {
  std::vector<size_t> order(rp.items.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    return rp.items[a].storage_bytes() > rp.items[b].storage_bytes();
  });
  struct Bucket {
    std::vector<size_t> items;
    uint64_t bytes = 0;
    std::unordered_set<std::string_view> keys;
  };
  std::vector<Bucket> buckets(static_cast<size_t>(std::max(1, files_per_rank)));
  for (size_t i : order) {
    const WriteItem& it = rp.items[i];
    Bucket* best = nullptr;
    for (Bucket& b : buckets) {
      // A key may appear once per safetensors file.
      if (b.keys.count(it.key) != 0) continue;
      if (best == nullptr || b.bytes < best->bytes) best = &b;
    }
    if (best == nullptr) best = &buckets.emplace_back();
    best->items.push_back(i);
    best->bytes += it.storage_bytes();
    best->keys.insert(it.key);
  }
  int64_t index = 0;
  for (Bucket& b : buckets) {
    if (b.items.empty()) continue;
    std::sort(b.items.begin(), b.items.end());  // plan order inside a file
    rp.files.push_back({data_file_name(save_id, rank, index++), std::move(b.items), b.bytes});
  }
}

}  // namespace

uint64_t WriteItem::storage_bytes() const {
  if (kind == Entry::Kind::kValue) return 1;
  return static_cast<uint64_t>(numel_of(sizes)) * element_size(dtype);
}

std::string data_file_name(std::string_view save_id, int64_t rank, int64_t index) {
  return fmt::format("{}-{:05d}-{:03d}.safetensors", save_id, rank, index);
}

void set_save_id(GlobalPlan& plan, const std::string& save_id) {
  plan.save_id = save_id;
  plan.manifest.save_id = save_id;
  // assign_files numbers a rank's files 0, 1, ... in order.
  for (size_t r = 0; r < plan.ranks.size(); ++r) {
    std::vector<FilePlan>& files = plan.ranks[r].files;
    for (size_t k = 0; k < files.size(); ++k) {
      files[k].name = data_file_name(save_id, static_cast<int64_t>(r), static_cast<int64_t>(k));
    }
  }
}

bool is_data_file_name(std::string_view name) {
  // 16 hex digits, '-', 5+ digits, '-', 3+ digits, ".safetensors"
  constexpr std::string_view kSuffix = ".safetensors";
  if (name.size() < 16 + 1 + 5 + 1 + 3 + kSuffix.size() || !name.ends_with(kSuffix)) return false;
  if (!parse_hex64(name.substr(0, 16)) || name[16] != '-') return false;
  std::string_view rest = name.substr(17, name.size() - 17 - kSuffix.size());
  const size_t dash = rest.find('-');
  if (dash == std::string_view::npos || dash < 5 || rest.size() - dash - 1 < 3) return false;
  for (size_t i = 0; i < rest.size(); ++i) {
    if (i != dash && (rest[i] < '0' || rest[i] > '9')) return false;
  }
  return true;
}

namespace {

// Chunks are grouped by (key, offsets), as DCP's dedup_save_plans does with MetadataIndex.
struct GroupKey {
  uint32_t key;
  const std::vector<int64_t>* offsets;
  bool operator==(const GroupKey& o) const { return key == o.key && *offsets == *o.offsets; }
};

struct GroupKeyHash {
  size_t operator()(const GroupKey& g) const {
    // splitmix64's finaliser over each word: offsets are small multiples of a shard size,
    // which a plain multiplicative hash maps to few buckets.
    auto mix = [](uint64_t x) {
      x ^= x >> 30;
      x *= 0xbf58476d1ce4e5b9ull;
      x ^= x >> 27;
      x *= 0x94d049bb133111ebull;
      return x ^ (x >> 31);
    };
    uint64_t h = mix(g.key);
    for (int64_t v : *g.offsets) h = mix(h ^ static_cast<uint64_t>(v) + 0x9e3779b97f4a7c15ull);
    return static_cast<size_t>(h);
  }
};

// A chunk (or value) and the ranks that hold it, in rank order.
struct Group {
  WriteItem item;  // the first holder's
  uint32_t key;
  uint32_t first_rank;
  std::vector<uint32_t> more_ranks;
  // Values only: holders whose value differs from item.value_json.
  std::vector<std::pair<uint32_t, std::string>> other_values;
  // Values only: each holder's ordinal of the value among its value items (first_rank's,
  // then more_ranks' in order), for GlobalPlan::value_sources.
  std::vector<uint32_t> value_ordinals;
};

struct KeyInfo {
  const WriteItem* first;  // the first item seen of the key (in `groups`, which never moves)
  std::vector<size_t> groups;
};

}  // namespace

struct GlobalPlanner::State {
  PlanOptions options;
  uint32_t ranks = 0;
  std::string save_id;
  int64_t first_file_index = 0;
  std::optional<std::vector<int64_t>> mesh_shape;
  std::vector<Path> int_key_dicts;
  std::deque<Group> groups;  // first-seen order; a deque, so items keep their addresses
  std::unordered_map<GroupKey, size_t, GroupKeyHash> index;
  std::unordered_map<std::string_view, uint32_t> key_ids;
  std::vector<KeyInfo> keys;  // first-seen order
};

GlobalPlanner::GlobalPlanner(PlanOptions options) : s_(std::make_unique<State>()) { s_->options = options; }
GlobalPlanner::~GlobalPlanner() = default;
GlobalPlanner::GlobalPlanner(GlobalPlanner&&) noexcept = default;
GlobalPlanner& GlobalPlanner::operator=(GlobalPlanner&&) noexcept = default;

Status GlobalPlanner::add(LocalPlan plan) {
  State& s = *s_;
  const uint32_t r = s.ranks++;
  if (r == 0) {
    s.save_id = std::move(plan.save_id);
    s.first_file_index = plan.first_file_index;
    s.mesh_shape = std::move(plan.mesh_shape);
    s.int_key_dicts = std::move(plan.int_key_dicts);
  }
  uint32_t value_ordinal = 0;
  for (WriteItem& it : plan.items) {
    const bool is_value = it.kind == Entry::Kind::kValue;
    const uint32_t ordinal = is_value ? value_ordinal++ : 0;
    uint32_t key;
    if (auto k = s.key_ids.find(it.key); k != s.key_ids.end()) {
      key = k->second;
      const WriteItem& a = *s.keys[key].first;
      if (a.kind != it.kind) {
        return plan_error(it.key, fmt::format("'{}' is a tensor on one rank and a value on another", it.key));
      }
      if (a.kind == Entry::Kind::kTensor && (a.dtype != it.dtype || a.global_shape != it.global_shape)) {
        return plan_error(it.key, fmt::format(
            "ranks disagree on '{}': {} [{}] on one rank, {} [{}] on rank {}", it.key,
            dtype_name(a.dtype), fmt::join(a.global_shape, ", "), dtype_name(it.dtype),
            fmt::join(it.global_shape, ", "), r));
      }
    } else {
      key = static_cast<uint32_t>(s.keys.size());
      s.keys.push_back({nullptr, {}});
    }
    auto g = s.index.find(GroupKey{key, &it.offsets});
    if (g == s.index.end()) {
      const size_t gi = s.groups.size();
      Group& grp = s.groups.emplace_back(Group{std::move(it), key, r, {}, {}, {}});
      if (is_value) grp.value_ordinals.push_back(ordinal);
      KeyInfo& info = s.keys[key];
      if (info.first == nullptr) {
        info.first = &grp.item;
        s.key_ids.emplace(grp.item.key, key);
      } else {
        // The key's first item carries its path and shape for the manifest entry; the other
        // chunks need neither (a third of a chunk's memory, at 16k ranks gigabytes).
        Path().swap(grp.item.path);
        std::vector<int64_t>().swap(grp.item.global_shape);
      }
      info.groups.push_back(gi);
      s.index.emplace(GroupKey{key, &grp.item.offsets}, gi);
      continue;
    }
    Group& grp = s.groups[g->second];
    if (r == grp.first_rank || (!grp.more_ranks.empty() && grp.more_ranks.back() == r)) continue;
    if (grp.item.sizes != it.sizes) {
      return plan_error(it.key, fmt::format(
          "ranks disagree on the chunk of '{}' at offsets [{}]: sizes [{}] on rank {}, [{}] on rank {}", it.key,
          fmt::join(it.offsets, ", "), fmt::join(grp.item.sizes, ", "), grp.first_rank,
          fmt::join(it.sizes, ", "), r));
    }
    grp.more_ranks.push_back(r);
    if (is_value) {
      grp.value_ordinals.push_back(ordinal);
      if (it.value_json != grp.item.value_json) grp.other_values.emplace_back(r, std::move(it.value_json));
    }
  }
  return ok();
}

Result<GlobalPlan> GlobalPlanner::finish() {
  State& s = *s_;
  if (s.ranks == 0) return make_error(Code::kInternal, "no local plans to merge");
  GlobalPlan g;
  g.save_id = s.save_id;
  g.first_file_index = s.first_file_index;
  if (!parse_hex64(g.save_id)) return make_error(Code::kInternal, "the coordinator sent no save id");
  g.ranks.resize(s.ranks);
  s.index.clear();
  s.key_ids.clear();

  // Greedy byte balance over every item in first-seen order (DCP's dedup_save_plans).
  std::vector<uint64_t> load(s.ranks, 0);
  std::vector<uint32_t> pick(s.groups.size());
  for (size_t i = 0; i < s.groups.size(); ++i) {
    const Group& grp = s.groups[i];
    uint32_t p = grp.first_rank;
    if (!s.options.save_to_lowest_rank) {
      for (uint32_t r : grp.more_ranks) {
        if (load[r] < load[p]) p = r;
      }
    }
    load[p] += grp.item.storage_bytes();
    pick[i] = p;
  }

  std::vector<const WriteItem*> chunks;
  for (const KeyInfo& info : s.keys) {
    const WriteItem& first = *info.first;
    Entry e;
    e.key = first.key;
    e.path = first.path;
    e.kind = first.kind;
    if (first.kind == Entry::Kind::kValue) {
      // The value of the rank chosen to write it is the one saved.
      const Group& grp = s.groups[info.groups.front()];
      const uint32_t chosen = pick[info.groups.front()];
      const std::string* text = &grp.item.value_json;
      for (const auto& [r, v] : grp.other_values) {
        if (r == chosen) text = &v;
      }
      // more_ranks is in rank order, so the chosen holder's ordinal is found by bisection.
      size_t holder = 0;
      if (chosen != grp.first_rank) {
        holder = 1 + static_cast<size_t>(std::lower_bound(grp.more_ranks.begin(), grp.more_ranks.end(), chosen) -
                                         grp.more_ranks.begin());
      }
      g.value_sources.push_back({g.manifest.entries.size(), chosen, grp.value_ordinals[holder]});
      json v = json::parse(*text, nullptr, false);
      if (v.is_discarded()) return make_error_at(Code::kInternal, e.key, "value '{}' did not serialise", e.key);
      e.value = std::move(v);
    } else {
      chunks.clear();
      for (size_t gi : info.groups) chunks.push_back(&s.groups[gi].item);
      TRY(validate_chunks(e.key, chunks));
      e.dtype = first.dtype;
      e.shape = first.global_shape;
    }
    g.manifest.entries.push_back(std::move(e));
  }
  s.keys.clear();
  for (size_t i = 0; i < s.groups.size(); ++i) {
    if (s.groups[i].item.kind == Entry::Kind::kTensor) g.ranks[pick[i]].items.push_back(std::move(s.groups[i].item));
  }
  s.groups.clear();
  g.manifest.save_id = g.save_id;
  g.manifest.world_size = static_cast<int64_t>(s.ranks);
  g.manifest.mesh_shape = std::move(s.mesh_shape);
  g.manifest.int_key_dicts = std::move(s.int_key_dicts);
  for (size_t r = 0; r < g.ranks.size(); ++r) {
    assign_files(g.ranks[r], g.save_id, static_cast<int64_t>(r), s.options.files_per_rank);
  }
  return g;
}

Result<GlobalPlan> create_global_plan(const std::vector<LocalPlan>& plans, const PlanOptions& options) {
  GlobalPlanner planner(options);
  for (const LocalPlan& p : plans) TRY(planner.add(p));
  return planner.finish();
}

std::string local_plan_to_json(const LocalPlan& plan) {
  json j;
  j["rank"] = plan.rank;
  j["save_id"] = plan.save_id;
  j["first_file_index"] = plan.first_file_index;
  j["mesh"] = plan.mesh_shape ? json(*plan.mesh_shape) : json(nullptr);
  json ikd = json::array();
  for (const auto& p : plan.int_key_dicts) ikd.push_back(path_to_json(p));
  j["int_key_dicts"] = std::move(ikd);
  json items = json::array();
  for (const WriteItem& it : plan.items) {
    json o;
    o["key"] = it.key;
    o["path"] = path_to_json(it.path);
    if (it.kind == Entry::Kind::kValue) {
      o["value"] = it.value_json;
    } else {
      o["dtype"] = static_cast<int32_t>(it.dtype);
      o["shape"] = it.global_shape;
      o["offsets"] = it.offsets;
      o["sizes"] = it.sizes;
    }
    items.push_back(std::move(o));
  }
  j["items"] = std::move(items);
  return j.dump();
}

Result<LocalPlan> local_plan_from_json(std::string_view text) {
  // Produced by local_plan_to_json on a peer; a malformed plan is a transport bug.
  json j = json::parse(text.begin(), text.end(), nullptr, false);
  auto broken = [] { return make_error(Code::kComm, "a peer sent a malformed save plan"); };
  if (j.is_discarded() || !j.is_object()) return broken();
  try {
    LocalPlan p;
    p.rank = j.at("rank").get<int64_t>();
    p.save_id = j.at("save_id").get<std::string>();
    p.first_file_index = j.at("first_file_index").get<int64_t>();
    if (!j.at("mesh").is_null()) p.mesh_shape = j.at("mesh").get<std::vector<int64_t>>();
    for (const json& path : j.at("int_key_dicts")) {
      auto items = path_from_json(path);
      if (!items) return broken();
      p.int_key_dicts.push_back(std::move(*items));
    }
    for (const json& o : j.at("items")) {
      WriteItem it;
      it.key = o.at("key").get<std::string>();
      auto path = path_from_json(o.at("path"));
      if (!path) return broken();
      it.path = std::move(*path);
      if (o.contains("value")) {
        it.kind = Entry::Kind::kValue;
        it.value_json = o.at("value").get<std::string>();
      } else {
        auto dt = dtype_from_code(o.at("dtype").get<int32_t>());
        if (!dt) return broken();
        it.dtype = *dt;
        it.global_shape = o.at("shape").get<std::vector<int64_t>>();
        it.offsets = o.at("offsets").get<std::vector<int64_t>>();
        it.sizes = o.at("sizes").get<std::vector<int64_t>>();
      }
      p.items.push_back(std::move(it));
    }
    return p;
  } catch (const json::exception&) {
    return broken();
  }
}

}  // namespace dsd::checkpoint
