// Disjointness of the chunks of one tensor, checked by a sweep instead of every pair: the save
// planner validates the global plan with it and the manifest validator every tensor, and a
// tensor sharded over N ranks has N chunks (16k at 16k ranks), where pairwise checks cost N²/2.
//
// The sweep runs along the dimension with the most distinct chunk starts (for Shard(d), d),
// so the chunks still open at each start are few: one for Shard(0), the other mesh
// dimension's pieces for 2-D sharding. DCP's _validate_global_plan sweeps along the largest
// dimension instead, which for a [1024, 8192] weight sharded on dim 0 keeps every chunk open.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <unordered_set>
#include <utility>
#include <vector>

namespace dsd::checkpoint {

// Boxes are anything with `offsets` and `sizes` (std::vector<int64_t>) of one rank `ndim`,
// already checked to be in bounds. Empty boxes overlap nothing.
template <class Box>
bool boxes_share_an_element(const Box& a, const Box& b) {
  for (size_t d = 0; d < a.offsets.size(); ++d) {
    if (a.offsets[d] >= b.offsets[d] + b.sizes[d] || b.offsets[d] >= a.offsets[d] + a.sizes[d]) return false;
  }
  return true;
}

// The first overlapping pair found (indices into `boxes`), or nullopt when they are disjoint.
template <class Box>
std::optional<std::pair<size_t, size_t>> find_overlapping_boxes(const std::vector<const Box*>& boxes, size_t ndim) {
  std::vector<size_t> order;
  order.reserve(boxes.size());
  for (size_t i = 0; i < boxes.size(); ++i) {
    bool empty = false;
    for (int64_t s : boxes[i]->sizes) empty = empty || s == 0;
    if (!empty) order.push_back(i);
  }
  if (order.size() < 2 || ndim == 0) {
    // Two non-empty 0-d boxes are the same element.
    if (order.size() >= 2) return std::make_pair(order[0], order[1]);
    return std::nullopt;
  }
  size_t sweep = 0;
  size_t most = 0;
  for (size_t d = 0; d < ndim; ++d) {
    std::unordered_set<int64_t> starts;
    for (size_t i : order) starts.insert(boxes[i]->offsets[d]);
    if (starts.size() > most) {
      most = starts.size();
      sweep = d;
    }
  }
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    const int64_t oa = boxes[a]->offsets[sweep], ob = boxes[b]->offsets[sweep];
    return oa != ob ? oa < ob : boxes[a]->offsets < boxes[b]->offsets;
  });
  // (end along the sweep dimension, index) of the boxes that may still meet later ones.
  std::vector<std::pair<int64_t, size_t>> open;
  for (size_t i : order) {
    const Box& b = *boxes[i];
    const int64_t start = b.offsets[sweep];
    std::erase_if(open, [&](const std::pair<int64_t, size_t>& o) { return o.first <= start; });
    for (const auto& o : open) {
      if (boxes_share_an_element(*boxes[o.second], b)) return std::make_pair(o.second, i);
    }
    open.emplace_back(start + b.sizes[sweep], i);
  }
  return std::nullopt;
}

}  // namespace dsd::checkpoint
