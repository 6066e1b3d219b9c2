// Layout: how a distributed tensor (PyTorch's DTensor) is split across ranks.
//
// A Layout is the global shape plus either a DeviceMesh and one Placement per mesh dimension
// (`Shard(d)` with torch.chunk semantics, uneven and empty shards allowed, or `Replicate`), or
// an explicit chunk (offsets, sizes) this rank holds, for custom sharding. Layouts are
// immutable and shared between every value that uses them.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "core/base/result.h"

namespace dsd {

class DeviceMesh;

struct Placement {
  enum class Kind : int32_t { kReplicate = 0, kShard = 1 };
  Kind kind = Kind::kReplicate;
  int32_t dim = 0;  // the tensor dimension split by Shard

  static Placement replicate() { return {Kind::kReplicate, 0}; }
  static Placement shard(int32_t d) { return {Kind::kShard, d}; }
  bool is_shard() const { return kind == Kind::kShard; }
  bool operator==(const Placement&) const = default;
  std::string str() const;  // "Shard(0)", "Replicate()"
};

// A box in the global tensor.
struct Chunk {
  std::vector<int64_t> offsets;
  std::vector<int64_t> sizes;

  int64_t numel() const;
  bool operator==(const Chunk&) const = default;
  std::string str() const;  // "[0:4, 0:8]"
};

// torch.chunk along one dimension: the size and offset (relative to `size`) of piece `index`
// of `pieces`. An empty piece has offset `size`.
struct ChunkSpan {
  int64_t size;
  int64_t offset;
};
ChunkSpan chunk_span(int64_t size, int64_t pieces, int64_t index);

class Layout {
 public:
  // Placements on a mesh. Errors for a placement count that differs from the mesh's
  // dimensions and for a Shard dim outside the tensor.
  static Result<std::shared_ptr<const Layout>> on_mesh(std::vector<int64_t> global_shape,
                                                       std::shared_ptr<const DeviceMesh> mesh,
                                                       std::vector<Placement> placements);
  // Custom sharding: this rank holds `local` of the global tensor; `world` is the
  // communicator every rank's chunk is exchanged over when needed.
  static Result<std::shared_ptr<const Layout>> explicit_chunk(std::vector<int64_t> global_shape,
                                                              std::shared_ptr<const DeviceMesh> world,
                                                              Chunk local);

  const std::vector<int64_t>& global_shape() const { return global_shape_; }
  const std::shared_ptr<const DeviceMesh>& mesh() const { return mesh_; }
  const std::vector<Placement>& placements() const { return placements_; }
  bool is_explicit() const { return explicit_.has_value(); }
  int64_t global_numel() const;

  // The chunk held by the rank at `coordinate` of the mesh; only for placement layouts.
  Chunk chunk_at(const std::vector<int64_t>& coordinate) const;
  // The chunk this process holds; empty sizes ({0}) with no offsets if it is not in the mesh,
  // as PyTorch's compute_local_shape_and_global_offset returns.
  Chunk local_chunk() const;
  // Whether every rank of the mesh holds the whole tensor.
  bool fully_replicated() const;

  bool operator==(const Layout& other) const;
  std::string str() const;

 private:
  Layout() = default;
  std::vector<int64_t> global_shape_;
  std::shared_ptr<const DeviceMesh> mesh_;
  std::vector<Placement> placements_;
  std::optional<Chunk> explicit_;
};

// PyTorch's compute_local_shape_and_global_offset for a rank at `coordinate` of a mesh of
// `mesh_shape`: plain data, so it can be tested against PyTorch value for value.
Chunk local_shape_and_offset(const std::vector<int64_t>& global_shape,
                             const std::vector<int64_t>& mesh_shape,
                             const std::vector<int64_t>& coordinate,
                             const std::vector<Placement>& placements);

}  // namespace dsd
