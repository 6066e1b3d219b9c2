#include "core/dist/layout.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "core/base/make_error.h"
#include "core/dist/mesh.h"

namespace dsd {

std::string Placement::str() const {
  return is_shard() ? fmt::format("Shard({})", dim) : std::string("Replicate()");
}

int64_t Chunk::numel() const {
  int64_t n = 1;
  for (int64_t s : sizes) n *= s;
  return n;
}

std::string Chunk::str() const {
  std::string out = "[";
  for (size_t i = 0; i < sizes.size(); ++i) {
    if (i != 0) out += ", ";
    const int64_t off = i < offsets.size() ? offsets[i] : 0;
    out += fmt::format("{}:{}", off, off + sizes[i]);
  }
  return out + "]";
}

ChunkSpan chunk_span(int64_t size, int64_t pieces, int64_t index) {
  if (size % pieces == 0) {
    const int64_t full = size / pieces;
    return {full, full * index};
  }
  const int64_t full = (size + pieces - 1) / pieces;
  const int64_t start = full * index;
  const int64_t end = std::min(size, start + full);
  return {std::max<int64_t>(0, end - start), std::min(size, start)};
}

Chunk local_shape_and_offset(const std::vector<int64_t>& global_shape,
                             const std::vector<int64_t>& mesh_shape,
                             const std::vector<int64_t>& coordinate,
                             const std::vector<Placement>& placements) {
  Chunk c{std::vector<int64_t>(global_shape.size(), 0), global_shape};
  // Shards apply left to right; an already-split dimension is split again within its piece.
  // An empty piece sits at offset = global size, as PyTorch reports it.
  for (size_t mesh_dim = 0; mesh_dim < placements.size(); ++mesh_dim) {
    const Placement& p = placements[mesh_dim];
    if (!p.is_shard()) continue;
    const auto d = static_cast<size_t>(p.dim);
    const ChunkSpan span = chunk_span(c.sizes[d], mesh_shape[mesh_dim], coordinate[mesh_dim]);
    if (span.size == 0) {
      c.offsets[d] = global_shape[d];
    } else {
      c.offsets[d] += span.offset;
    }
    c.sizes[d] = span.size;
  }
  return c;
}

Result<std::shared_ptr<const Layout>> Layout::on_mesh(std::vector<int64_t> global_shape,
                                                      std::shared_ptr<const DeviceMesh> mesh,
                                                      std::vector<Placement> placements) {
  if (mesh == nullptr) return make_error(Code::kInvalidArgument, "a layout needs a device mesh");
  if (static_cast<int64_t>(placements.size()) != mesh->ndim()) {
    return make_error(Code::kInvalidArgument, "{} placements given for a {}-d mesh",
                      placements.size(), mesh->ndim());
  }
  for (int64_t s : global_shape) {
    if (s < 0) return make_error(Code::kShapeMismatch, "global shape has a negative size {}", s);
  }
  for (const Placement& p : placements) {
    if (p.is_shard() && (p.dim < 0 || p.dim >= static_cast<int32_t>(global_shape.size()))) {
      return make_error(Code::kInvalidArgument, "{} is outside a {}-d tensor", p.str(),
                        global_shape.size());
    }
  }
  auto l = std::shared_ptr<Layout>(new Layout());
  l->global_shape_ = std::move(global_shape);
  l->mesh_ = std::move(mesh);
  l->placements_ = std::move(placements);
  return std::shared_ptr<const Layout>(std::move(l));
}

Result<std::shared_ptr<const Layout>> Layout::explicit_chunk(std::vector<int64_t> global_shape,
                                                             std::shared_ptr<const DeviceMesh> world,
                                                             Chunk local) {
  if (world == nullptr) return make_error(Code::kInvalidArgument, "a layout needs a device mesh");
  if (local.offsets.size() != global_shape.size() || local.sizes.size() != global_shape.size()) {
    return make_error(Code::kInvalidArgument,
                      "chunk {} has {} offsets and {} sizes for a {}-d tensor", local.str(),
                      local.offsets.size(), local.sizes.size(), global_shape.size());
  }
  for (size_t d = 0; d < global_shape.size(); ++d) {
    if (local.offsets[d] < 0 || local.sizes[d] < 0 ||
        local.offsets[d] + local.sizes[d] > global_shape[d]) {
      return make_error(Code::kShapeMismatch, "chunk {} is outside the global shape [{}]",
                        local.str(), fmt::join(global_shape, ", "));
    }
  }
  auto l = std::shared_ptr<Layout>(new Layout());
  l->global_shape_ = std::move(global_shape);
  l->mesh_ = std::move(world);
  l->explicit_ = std::move(local);
  return std::shared_ptr<const Layout>(std::move(l));
}

int64_t Layout::global_numel() const {
  int64_t n = 1;
  for (int64_t s : global_shape_) n *= s;
  return n;
}

Chunk Layout::chunk_at(const std::vector<int64_t>& coordinate) const {
  return local_shape_and_offset(global_shape_, mesh_->shape(), coordinate, placements_);
}

Chunk Layout::local_chunk() const {
  if (explicit_) return *explicit_;
  const auto& coord = mesh_->my_coordinate();
  if (!coord) return Chunk{{}, {0}};
  return chunk_at(*coord);
}

bool Layout::fully_replicated() const {
  if (explicit_) return false;
  for (const Placement& p : placements_) {
    if (p.is_shard()) return false;
  }
  return true;
}

bool Layout::operator==(const Layout& other) const {
  if (global_shape_ != other.global_shape_ || placements_ != other.placements_ ||
      explicit_ != other.explicit_) {
    return false;
  }
  if (mesh_ == other.mesh_) return true;
  return mesh_ != nullptr && other.mesh_ != nullptr && *mesh_ == *other.mesh_;
}

std::string Layout::str() const {
  if (explicit_) {
    return fmt::format("global [{}], chunk {}", fmt::join(global_shape_, ", "), explicit_->str());
  }
  std::vector<std::string> ps;
  for (const Placement& p : placements_) ps.push_back(p.str());
  return fmt::format("global [{}], mesh {}, ({})", fmt::join(global_shape_, ", "), mesh_->str(),
                     fmt::join(ps, ", "));
}

}  // namespace dsd
