#include "core/checkpoint/save_planner.h"

#include <fmt/ranges.h>

#include <algorithm>
#include <map>
#include <unordered_map>

#include "core/base/make_error.h"
#include "core/base/strings.h"

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

bool overlap(const WriteItem& a, const WriteItem& b) {
  for (size_t d = 0; d < a.offsets.size(); ++d) {
    if (a.offsets[d] >= b.offsets[d] + b.sizes[d] || b.offsets[d] >= a.offsets[d] + a.sizes[d]) {
      return false;
    }
  }
  return true;
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
  for (size_t i = 0; i < chunks.size(); ++i) {
    if (numel_of(chunks[i]->sizes) == 0) continue;
    for (size_t k = i + 1; k < chunks.size(); ++k) {
      if (numel_of(chunks[k]->sizes) != 0 && overlap(*chunks[i], *chunks[k])) {
        return plan_error(key, fmt::format("chunks [{}] and [{}] of '{}' overlap",
                                           fmt::join(chunks[i]->offsets, ", "),
                                           fmt::join(chunks[k]->offsets, ", "), key));
      }
    }
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
    std::vector<std::string_view> keys;
  };
  std::vector<Bucket> buckets(static_cast<size_t>(std::max(1, files_per_rank)));
  for (size_t i : order) {
    const WriteItem& it = rp.items[i];
    Bucket* best = nullptr;
    for (Bucket& b : buckets) {
      // A key may appear once per safetensors file.
      if (std::find(b.keys.begin(), b.keys.end(), it.key) != b.keys.end()) continue;
      if (best == nullptr || b.bytes < best->bytes) best = &b;
    }
    if (best == nullptr) best = &buckets.emplace_back();
    best->items.push_back(i);
    best->bytes += it.storage_bytes();
    best->keys.push_back(it.key);
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

Result<GlobalPlan> create_global_plan(const std::vector<LocalPlan>& plans, const PlanOptions& options) {
  if (plans.empty()) return make_error(Code::kInternal, "no local plans to merge");
  GlobalPlan g;
  g.save_id = plans[0].save_id;
  g.first_file_index = plans[0].first_file_index;
  if (!parse_hex64(g.save_id)) return make_error(Code::kInternal, "the coordinator sent no save id");
  g.ranks.resize(plans.size());

  // Group items by (key, offsets) in first-seen order, as DCP's dedup does.
  struct Group {
    const WriteItem* item;
    std::vector<size_t> ranks;
  };
  std::vector<Group> groups;
  std::map<std::pair<std::string_view, std::vector<int64_t>>, size_t> index;
  std::unordered_map<std::string_view, const WriteItem*> first_of_key;
  std::vector<std::string_view> key_order;
  for (size_t r = 0; r < plans.size(); ++r) {
    for (const WriteItem& it : plans[r].items) {
      auto [f, fresh] = first_of_key.emplace(it.key, &it);
      if (fresh) {
        key_order.push_back(it.key);
      } else {
        const WriteItem& a = *f->second;
        if (a.kind != it.kind) {
          return plan_error(it.key, fmt::format("'{}' is a tensor on one rank and a value on another", it.key));
        }
        if (a.kind == Entry::Kind::kTensor && (a.dtype != it.dtype || a.global_shape != it.global_shape)) {
          return plan_error(it.key, fmt::format(
              "ranks disagree on '{}': {} [{}] on one rank, {} [{}] on rank {}", it.key,
              dtype_name(a.dtype), fmt::join(a.global_shape, ", "), dtype_name(it.dtype),
              fmt::join(it.global_shape, ", "), r));
        }
      }
      auto [gi, added] = index.emplace(std::make_pair(std::string_view(it.key), it.offsets), groups.size());
      if (added) groups.push_back({&it, {}});
      std::vector<size_t>& rs = groups[gi->second].ranks;
      if (rs.empty() || rs.back() != r) rs.push_back(r);
    }
  }

  // Greedy byte balance over every item in order (DCP's dedup_save_plans).
  std::vector<uint64_t> load(plans.size(), 0);
  std::unordered_map<std::string_view, std::vector<const WriteItem*>> chunks_of;
  std::unordered_map<std::string_view, const WriteItem*> value_of;
  for (const Group& grp : groups) {
    size_t pick = grp.ranks.front();
    if (!options.save_to_lowest_rank) {
      for (size_t r : grp.ranks) {
        if (load[r] < load[pick]) pick = r;
      }
    }
    load[pick] += grp.item->storage_bytes();
    if (grp.item->kind == Entry::Kind::kValue) {
      // The value of the chosen rank is the one saved.
      for (const WriteItem& it : plans[pick].items) {
        if (it.key == grp.item->key) value_of[it.key] = &it;
      }
      continue;
    }
    const WriteItem* chosen = grp.item;
    for (const WriteItem& it : plans[pick].items) {
      if (it.key == grp.item->key && it.offsets == grp.item->offsets) chosen = &it;
    }
    g.ranks[pick].items.push_back(*chosen);
    chunks_of[chosen->key].push_back(chosen);
  }

  for (std::string_view key : key_order) {
    const WriteItem& first = *first_of_key[key];
    Entry e;
    e.key = first.key;
    e.path = first.path;
    e.kind = first.kind;
    if (first.kind == Entry::Kind::kValue) {
      json v = json::parse(value_of[key]->value_json, nullptr, false);
      if (v.is_discarded()) return make_error_at(Code::kInternal, e.key, "value '{}' did not serialise", e.key);
      e.value = std::move(v);
    } else {
      TRY(validate_chunks(e.key, chunks_of[key]));
      e.dtype = first.dtype;
      e.shape = first.global_shape;
    }
    g.manifest.entries.push_back(std::move(e));
  }
  g.manifest.save_id = g.save_id;
  g.manifest.world_size = static_cast<int64_t>(plans.size());
  g.manifest.mesh_shape = plans[0].mesh_shape;
  g.manifest.int_key_dicts = plans[0].int_key_dicts;
  for (size_t r = 0; r < plans.size(); ++r) {
    assign_files(g.ranks[r], g.save_id, static_cast<int64_t>(r), options.files_per_rank);
  }
  return g;
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
