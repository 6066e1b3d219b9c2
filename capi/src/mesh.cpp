// Device meshes: ranks in an N-d array.
#include "capi/src/export.h"

#include "capi/src/dists.h"
#include "capi/src/guard.h"

namespace dsd::capi {

namespace {

Result<c10::DeviceType> device_type_from(dsd_device_type type) {
  if (type == DSD_DEVICE_CPU) return c10::DeviceType::CPU;
  if (type == DSD_DEVICE_CUDA) return c10::DeviceType::CUDA;
  return make_error(Code::kInvalidArgument, "unknown device type {} (DSD_DEVICE_CPU or DSD_DEVICE_CUDA)", type);
}

}  // namespace
}  // namespace dsd::capi

using dsd::capi::guard;
using dsd::capi::require;

extern "C" {

dsd_status dsd_mesh_new(dsd_comm* comm, const int64_t* shape, size_t ndim, const int32_t* ranks,
                        size_t count, dsd_device_type device_type, dsd_mesh** out,
                        dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    TRY(require(comm, "comm"));
    TRY(require(shape, "shape"));
    TRY(require(out, "out"));
    TRY(dsd::capi::check_ndim(ndim, "the mesh"));
    if (count > 0) TRY(require(ranks, "ranks"));
    if (ranks != nullptr && count == 0) {
      return dsd::Error(dsd::Code::kInvalidArgument, "ranks given with count 0 (pass NULL, 0 for 0, 1, 2, ...)");
    }
    const c10::DeviceType type = TRY(dsd::capi::device_type_from(device_type));
    std::vector<int64_t> dims(shape, shape + ndim);
    std::vector<int64_t> members(ranks, ranks + count);
    auto mesh = TRY(dsd::DeviceMesh::make(comm->comm, std::move(dims), std::move(members), type));
    *out = new dsd_mesh(std::move(mesh));
    return dsd::ok();
  });
}

dsd_mesh* dsd_mesh_retain(dsd_mesh* mesh) { return dsd::capi::retain_root(mesh); }

void dsd_mesh_release(dsd_mesh* mesh) { dsd::capi::release_root(mesh); }

dsd_status dsd_mesh_ndim(const dsd_mesh* mesh, size_t* out, dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    TRY(require(mesh, "mesh"));
    TRY(require(out, "out"));
    *out = static_cast<size_t>(mesh->mesh->ndim());
    return dsd::ok();
  });
}

dsd_status dsd_mesh_shape(const dsd_mesh* mesh, int64_t* out, size_t capacity, dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    TRY(require(mesh, "mesh"));
    return dsd::capi::copy_out(mesh->mesh->shape(), out, capacity, "the mesh shape");
  });
}

dsd_status dsd_mesh_ranks(const dsd_mesh* mesh, int32_t* out, size_t capacity, dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    TRY(require(mesh, "mesh"));
    TRY(require(out, "out"));
    const auto& ranks = mesh->mesh->ranks();
    if (capacity < ranks.size()) {
      return dsd::make_error(dsd::Code::kBufferTooSmall, "the mesh ranks need room for {} values, {} given",
                             ranks.size(), capacity);
    }
    for (size_t i = 0; i < ranks.size(); ++i) out[i] = static_cast<int32_t>(ranks[i]);
    return dsd::ok();
  });
}

dsd_status dsd_mesh_device_type(const dsd_mesh* mesh, dsd_device_type* out, dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    TRY(require(mesh, "mesh"));
    TRY(require(out, "out"));
    *out = mesh->mesh->device_type() == c10::DeviceType::CUDA ? DSD_DEVICE_CUDA : DSD_DEVICE_CPU;
    return dsd::ok();
  });
}

dsd_status dsd_mesh_coordinate(const dsd_mesh* mesh, bool* out_in_mesh, int64_t* out_coordinate,
                               size_t capacity, dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    TRY(require(mesh, "mesh"));
    TRY(require(out_in_mesh, "out_in_mesh"));
    TRY(require(out_coordinate, "out_coordinate"));
    const auto& coord = mesh->mesh->my_coordinate();
    if (coord) TRY(dsd::capi::copy_out(*coord, out_coordinate, capacity, "the mesh coordinate"));
    *out_in_mesh = coord.has_value();
    return dsd::ok();
  });
}

}  // extern "C"
