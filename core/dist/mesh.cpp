#include "core/dist/mesh.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <set>

#include "core/base/make_error.h"
#include "core/dist/comm.h"

namespace dsd {

Result<std::shared_ptr<const DeviceMesh>> DeviceMesh::make(std::shared_ptr<Communicator> comm,
                                                           std::vector<int64_t> shape,
                                                           std::vector<int64_t> ranks,
                                                           c10::DeviceType device_type) {
  if (shape.empty()) return make_error(Code::kInvalidArgument, "a device mesh needs at least one dimension");
  int64_t numel = 1;
  for (int64_t s : shape) {
    if (s <= 0) return make_error(Code::kInvalidArgument, "mesh shape [{}] has a non-positive size", fmt::join(shape, ", "));
    numel *= s;
  }
  const int64_t world = comm ? comm->size() : 1;
  if (ranks.empty()) {
    for (int64_t r = 0; r < numel; ++r) ranks.push_back(r);
  }
  if (static_cast<int64_t>(ranks.size()) != numel) {
    return make_error(Code::kInvalidArgument, "mesh of shape [{}] needs {} ranks, {} given",
                      fmt::join(shape, ", "), numel, ranks.size());
  }
  std::set<int64_t> seen;
  for (int64_t r : ranks) {
    if (r < 0 || r >= world) {
      return make_error(Code::kInvalidArgument, "mesh rank {} is outside a world of {}", r, world);
    }
    if (!seen.insert(r).second) return make_error(Code::kInvalidArgument, "mesh lists rank {} twice", r);
  }
  auto m = std::shared_ptr<DeviceMesh>(new DeviceMesh());
  m->comm_ = std::move(comm);
  m->shape_ = std::move(shape);
  m->ranks_ = std::move(ranks);
  m->device_type_ = device_type;
  m->my_rank_ = m->comm_ ? m->comm_->rank() : 0;
  m->my_coordinate_ = m->coordinate_of(m->my_rank_);
  return std::shared_ptr<const DeviceMesh>(std::move(m));
}

std::optional<std::vector<int64_t>> DeviceMesh::coordinate_of(int64_t rank) const {
  auto it = std::find(ranks_.begin(), ranks_.end(), rank);
  if (it == ranks_.end()) return std::nullopt;
  int64_t flat = it - ranks_.begin();
  std::vector<int64_t> coord(shape_.size());
  for (size_t d = shape_.size(); d-- > 0;) {
    coord[d] = flat % shape_[d];
    flat /= shape_[d];
  }
  return coord;
}

int64_t DeviceMesh::rank_at(const std::vector<int64_t>& coordinate) const {
  int64_t flat = 0;
  for (size_t d = 0; d < shape_.size(); ++d) flat = flat * shape_[d] + coordinate[d];
  return ranks_[static_cast<size_t>(flat)];
}

std::string DeviceMesh::str() const {
  return fmt::format("DeviceMesh({}, shape [{}], ranks [{}])", c10::DeviceTypeName(device_type_, true),
                     fmt::join(shape_, ", "), fmt::join(ranks_, ", "));
}

}  // namespace dsd
