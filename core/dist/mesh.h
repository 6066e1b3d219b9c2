// DeviceMesh: ranks arranged in an N-d array, as PyTorch's DeviceMesh.
#pragma once

#include <c10/core/DeviceType.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "core/base/result.h"

namespace dsd {

class Communicator;

class DeviceMesh {
 public:
  // `ranks` lists the global ranks of the mesh in row-major order (empty: 0..numel-1).
  // `comm` is the communicator of the whole world the ranks belong to; it may be null for a
  // single-process mesh of one rank.
  static Result<std::shared_ptr<const DeviceMesh>> make(std::shared_ptr<Communicator> comm,
                                                        std::vector<int64_t> shape,
                                                        std::vector<int64_t> ranks,
                                                        c10::DeviceType device_type);

  const std::vector<int64_t>& shape() const { return shape_; }
  const std::vector<int64_t>& ranks() const { return ranks_; }
  int64_t ndim() const { return static_cast<int64_t>(shape_.size()); }
  int64_t numel() const { return static_cast<int64_t>(ranks_.size()); }
  c10::DeviceType device_type() const { return device_type_; }
  const std::shared_ptr<Communicator>& comm() const { return comm_; }

  // The global rank of this process (0 without a communicator).
  int64_t my_rank() const { return my_rank_; }
  // The coordinate of a global rank, or nullopt when it is not part of the mesh.
  std::optional<std::vector<int64_t>> coordinate_of(int64_t rank) const;
  const std::optional<std::vector<int64_t>>& my_coordinate() const { return my_coordinate_; }
  // The rank at a coordinate.
  int64_t rank_at(const std::vector<int64_t>& coordinate) const;

  bool operator==(const DeviceMesh& other) const {
    return shape_ == other.shape_ && ranks_ == other.ranks_ && device_type_ == other.device_type_;
  }
  std::string str() const;

 private:
  DeviceMesh() = default;
  std::shared_ptr<Communicator> comm_;
  std::vector<int64_t> shape_;
  std::vector<int64_t> ranks_;
  c10::DeviceType device_type_ = c10::DeviceType::CPU;
  int64_t my_rank_ = 0;
  std::optional<std::vector<int64_t>> my_coordinate_;
};

}  // namespace dsd
