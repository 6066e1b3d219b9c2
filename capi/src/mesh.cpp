// Device meshes: ranks in an N-d array.
#include "capi/src/export.h"

#include "capi/src/dists.h"
#include "capi/src/guard.h"

namespace dsd::capi {

namespace {

Result<c10::DeviceType> device_type_from(int32_t type) {
  if (type == DSD_DEVICE_CPU) return c10::DeviceType::CPU;
  if (type == DSD_DEVICE_CUDA) return c10::DeviceType::CUDA;
  return make_error(Code::kInvalidArgument, "unknown device type {} (DSD_DEVICE_CPU or DSD_DEVICE_CUDA)", type);
}

}  // namespace
}  // namespace dsd::capi

using dsd::capi::guard;
using dsd::capi::require;

extern "C" {

dsd_status dsd_mesh_new(dsd_comm* comm, const int64_t* shape, size_t ndim, const int64_t* ranks,
                        int32_t device_type, dsd_mesh** out, dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    TRY(require(comm, "comm"));
    TRY(require(shape, "shape"));
    TRY(require(out, "out"));
    const c10::DeviceType type = TRY(dsd::capi::device_type_from(device_type));
    std::vector<int64_t> dims(shape, shape + ndim);
    std::vector<int64_t> members;
    if (ranks != nullptr) {
      int64_t numel = 1;
      for (int64_t d : dims) {
        if (d <= 0) break;  // DeviceMesh::make names the bad size
        numel *= d;
      }
      members.assign(ranks, ranks + numel);
    }
    auto mesh = TRY(dsd::DeviceMesh::make(comm->comm, std::move(dims), std::move(members), type));
    *out = new dsd_mesh{std::move(mesh)};
    return dsd::ok();
  });
}

void dsd_mesh_free(dsd_mesh* mesh) { delete mesh; }

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

dsd_status dsd_mesh_ranks(const dsd_mesh* mesh, int64_t* out, size_t capacity, dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    TRY(require(mesh, "mesh"));
    return dsd::capi::copy_out(mesh->mesh->ranks(), out, capacity, "the mesh ranks");
  });
}

dsd_status dsd_mesh_device_type(const dsd_mesh* mesh, int32_t* out, dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    TRY(require(mesh, "mesh"));
    TRY(require(out, "out"));
    *out = mesh->mesh->device_type() == c10::DeviceType::CUDA ? DSD_DEVICE_CUDA : DSD_DEVICE_CPU;
    return dsd::ok();
  });
}

dsd_status dsd_mesh_coordinate(const dsd_mesh* mesh, int64_t* out, size_t capacity, bool* in_mesh,
                               dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    TRY(require(mesh, "mesh"));
    TRY(require(out, "out"));
    TRY(require(in_mesh, "in_mesh"));
    const auto& coord = mesh->mesh->my_coordinate();
    if (coord) TRY(dsd::capi::copy_out(*coord, out, capacity, "the mesh coordinate"));
    *in_mesh = coord.has_value();
    return dsd::ok();
  });
}

}  // extern "C"
