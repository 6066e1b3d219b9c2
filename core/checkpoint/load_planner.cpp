#include "core/checkpoint/load_planner.h"

#include <ATen/ops/empty.h>

#include <algorithm>
#include <limits>
#include <string_view>
#include <unordered_map>
#include <unordered_set>

#include "core/base/make_error.h"
#include "core/base/strings.h"
#include "core/base/torch_call.h"
#include "core/statedict/flatten.h"
#include "core/tensor/dtype_torch.h"

namespace dsd::checkpoint {
namespace {

int64_t prod(const std::vector<int64_t>& v, size_t from) {
  int64_t n = 1;
  for (size_t i = from; i < v.size(); ++i) n *= v[i];
  return n;
}

std::unordered_map<std::string_view, const Entry*> index_entries(const Manifest& m) {
  std::unordered_map<std::string_view, const Entry*> out;
  for (const Entry& e : m.entries) out.emplace(e.key, &e);
  return out;
}

}  // namespace

void add_runs(const ChunkRecord& saved, const Chunk& local, char* base, uint64_t esize,
              std::vector<Run>& runs) {
  const size_t n = saved.sizes.size();
  if (n == 0) {
    runs.push_back({0, esize, base});
    return;
  }
  std::vector<int64_t> len(n), s_off(n), d_off(n);
  for (size_t d = 0; d < n; ++d) {
    const int64_t start = std::max(saved.offsets[d], local.offsets[d]);
    const int64_t end = std::min(saved.offsets[d] + saved.sizes[d], local.offsets[d] + local.sizes[d]);
    if (end <= start) return;
    len[d] = end - start;
    s_off[d] = start - saved.offsets[d];
    d_off[d] = start - local.offsets[d];
  }
  size_t k = n - 1;
  while (k > 0 && len[k] == saved.sizes[k] && len[k] == local.sizes[k]) --k;
  const uint64_t run_bytes = static_cast<uint64_t>(len[k] * prod(saved.sizes, k + 1)) * esize;
  std::vector<int64_t> idx(k, 0);
  while (true) {
    int64_t src = s_off[k] * prod(saved.sizes, k + 1);
    int64_t dst = d_off[k] * prod(local.sizes, k + 1);
    for (size_t d = 0; d < k; ++d) {
      src += (s_off[d] + idx[d]) * prod(saved.sizes, d + 1);
      dst += (d_off[d] + idx[d]) * prod(local.sizes, d + 1);
    }
    runs.push_back({static_cast<uint64_t>(src) * esize, run_bytes, base + static_cast<uint64_t>(dst) * esize});
    size_t d = k;
    while (d > 0) {
      --d;
      if (++idx[d] < len[d]) break;
      idx[d] = 0;
      if (d == 0) return;
    }
    if (k == 0) return;
  }
}

bool chunks_intersect(const ChunkRecord& saved, const Chunk& local) {
  for (size_t d = 0; d < saved.sizes.size(); ++d) {
    if (std::max(saved.offsets[d], local.offsets[d]) >=
        std::min(saved.offsets[d] + saved.sizes[d], local.offsets[d] + local.sizes[d])) {
      return false;
    }
  }
  return true;
}

void add_read_items(const Entry& e, const LoadTarget& t, std::vector<ReadItem>& items) {
  if (t.local.numel() == 0) return;
  for (const ChunkRecord& c : e.chunks) {
    if (Chunk{c.offsets, c.sizes}.numel() == 0 || !chunks_intersect(c, t.local)) continue;
    items.push_back({&e, &c, &t});
  }
}

ChunkIndex::ChunkIndex(const Entry& e) : entry_(&e) {
  const size_t ndim = e.shape.size();
  std::vector<uint32_t> live;
  for (size_t i = 0; i < e.chunks.size(); ++i) {
    if (Chunk{e.chunks[i].offsets, e.chunks[i].sizes}.numel() != 0) live.push_back(static_cast<uint32_t>(i));
  }
  size_t most = 0;
  for (size_t d = 0; d < ndim; ++d) {
    std::unordered_set<int64_t> starts;
    for (uint32_t i : live) starts.insert(e.chunks[i].offsets[d]);
    if (starts.size() > most) {
      most = starts.size();
      dim_ = d;
    }
  }
  order_ = std::move(live);
  if (ndim == 0) return;
  std::sort(order_.begin(), order_.end(), [&](uint32_t a, uint32_t b) {
    return e.chunks[a].offsets[dim_] < e.chunks[b].offsets[dim_];
  });
  int64_t end = std::numeric_limits<int64_t>::min();
  for (uint32_t i : order_) {
    const ChunkRecord& c = e.chunks[i];
    starts_.push_back(c.offsets[dim_]);
    end = std::max(end, c.offsets[dim_] + c.sizes[dim_]);
    max_end_.push_back(end);
  }
}

void ChunkIndex::add_read_items(const LoadTarget& t, std::vector<ReadItem>& items) const {
  if (t.local.numel() == 0) return;
  const size_t first = items.size();
  if (starts_.empty()) {  // 0-d: every non-empty chunk is the one element
    for (uint32_t i : order_) items.push_back({entry_, &entry_->chunks[i], &t});
  } else {
    const int64_t lo = t.local.offsets[dim_];
    const int64_t hi = lo + t.local.sizes[dim_];
    // Chunks starting before `hi`, walked back while some chunk before may still end after `lo`.
    size_t k = static_cast<size_t>(std::lower_bound(starts_.begin(), starts_.end(), hi) - starts_.begin());
    while (k > 0 && max_end_[k - 1] > lo) {
      --k;
      const ChunkRecord& c = entry_->chunks[order_[k]];
      if (chunks_intersect(c, t.local)) items.push_back({entry_, &c, &t});
    }
  }
  std::sort(items.begin() + static_cast<std::ptrdiff_t>(first), items.end(),
            [](const ReadItem& a, const ReadItem& b) { return a.chunk < b.chunk; });
}

Result<LoadTarget> make_load_target(const std::string& key, const TensorValue& tv, const Entry& e) {
  if (e.kind != Entry::Kind::kTensor) {
    return make_error_at(Code::kWrongKind, key,
                         "'{}' is a tensor in the state dict but a non-tensor value in the checkpoint", key);
  }
  const DType dtype = TRY(dtype_from_scalar_type(tv.tensor.scalar_type()));
  if (dtype != e.dtype) {
    return make_error_at(Code::kDtypeMismatch, key, "dtype mismatch between saved {} and current {} for '{}'",
                         dtype_name(e.dtype), dtype_name(dtype), key);
  }
  const std::vector<int64_t> local(tv.tensor.sizes().begin(), tv.tensor.sizes().end());
  LoadTarget t;
  t.key = key;
  t.tensor = tv.tensor;
  if (tv.layout) {
    if (tv.layout->global_shape() != e.shape) {
      return make_error_at(Code::kShapeMismatch, key, "Size mismatch between saved {} and current: {} for '{}'",
                           shape_str(e.shape), shape_str(tv.layout->global_shape()), key);
    }
    t.local = tv.layout->local_chunk();
    if (t.local.offsets.size() != e.shape.size()) {
      t.local = Chunk{std::vector<int64_t>(e.shape.size(), 0), std::vector<int64_t>(e.shape.size(), 0)};
      return t;  // this rank is not in the mesh: nothing to read
    }
    if (t.local.sizes != local) {
      return make_error_at(Code::kShapeMismatch, key,
                           "the local tensor of '{}' has shape {} but its layout gives this rank {}", key,
                           shape_str(local), shape_str(t.local.sizes));
    }
  } else {
    if (local != e.shape) {
      return make_error_at(Code::kShapeMismatch, key, "Size mismatch between saved {} and current: {} for '{}'",
                           shape_str(e.shape), shape_str(local), key);
    }
    t.local = Chunk{std::vector<int64_t>(local.size(), 0), local};
  }
  if (tv.read_only && t.local.numel() > 0) {
    return make_error_at(Code::kReadOnly, key, "'{}' was imported read-only and cannot be loaded into", key);
  }
  const at::Tensor& x = tv.tensor;
  const bool direct = x.device().is_cpu() && x.is_contiguous() && !x.is_conj() && !x.is_neg();
  if (direct) {
    t.base = static_cast<char*>(x.data_ptr());
  } else {
    t.staging = TRY(torch_call(Code::kOutOfMemory, fmt::format("allocating a host buffer for '{}'", key),
                               [&] { return at::empty(x.sizes(), at::TensorOptions().dtype(x.dtype())); }));
    t.base = static_cast<char*>(t.staging.data_ptr());
  }
  return t;
}

Result<LoadTarget> full_load_target(const Entry& e) {
  LoadTarget tg;
  tg.key = e.key;
  tg.tensor = TRY(torch_call(Code::kOutOfMemory, fmt::format("allocating '{}'", e.key), [&] {
    return at::empty(e.shape, at::TensorOptions().dtype(to_scalar_type(e.dtype)));
  }));
  tg.local = Chunk{std::vector<int64_t>(e.shape.size(), 0), e.shape};
  tg.base = static_cast<char*>(tg.tensor.data_ptr());
  return tg;
}

Result<LoadPlan> create_load_plan(const Source& src, Dict& sd, const std::string& path, bool strict,
                                  LoadReport& report) {
  const Manifest& m = src.manifest;
  FlatStateDict flat = TRY(flatten_state_dict(sd, FlattenStyle::kCheckpoint));
  auto entries = index_entries(m);
  std::unordered_set<std::string_view> seen;
  LoadPlan plan;
  for (size_t i = 0; i < flat.flat->size(); ++i) {
    const std::string& key = flat.flat->key_at(i);
    const Value& v = flat.flat->value_at(i);
    auto it = entries.find(key);
    if (it == entries.end()) {
      if (strict) {
        return make_error_at(Code::kNotFound, key, "Missing key in checkpoint state_dict: {} (checkpoint '{}')",
                             key, path);
      }
      report.missing_keys.push_back(key);
      report.skipped_keys.push_back(key);
      continue;
    }
    seen.insert(it->first);
    const Entry& e = *it->second;
    if (const TensorValue* tv = v.if_tensor()) {
      plan.targets.push_back(TRY(make_load_target(key, *tv, e)));
      continue;
    }
    if (e.kind != Entry::Kind::kValue) {
      return make_error_at(Code::kWrongKind, key,
                           "'{}' is a {} in the state dict but a tensor in the checkpoint", key,
                           kind_name(v.kind()));
    }
    plan.values.emplace_back(flat.mapping[i].second, TRY(read_source_value(src, e)));
  }
  for (const Entry& e : m.entries) {
    if (!seen.count(e.key)) report.unexpected_keys.push_back(e.key);
  }
  for (const LoadTarget& t : plan.targets) add_read_items(*entries.at(t.key), t, plan.items);
  return plan;
}

}  // namespace dsd::checkpoint

