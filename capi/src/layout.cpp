// Layout handles, and distributed tensors (a local tensor + a layout) in state dicts.
#include "capi/src/export.h"

#include <fmt/ranges.h>

#include "capi/src/dists.h"
#include "capi/src/guard.h"
#include "capi/src/state_dicts.h"
#include "capi/src/tensors.h"
#include "core/statedict/dist_tensor.h"

namespace dsd::capi {

LayoutTable& layout_table() {
  static LayoutTable* table = new LayoutTable();  // never destroyed: handles outlive statics
  return *table;
}

namespace {

Result<std::vector<int64_t>> dims_of(const int64_t* p, size_t n, const char* what) {
  TRY(check_ndim(n, what));
  if (n > 0) TRY(require(p, what));
  return std::vector<int64_t>(p, p + n);
}

Result<Placement> placement_from(const dsd_placement& p, size_t mesh_dim) {
  if (p.kind == DSD_PLACEMENT_REPLICATE) return Placement::replicate();
  if (p.kind == DSD_PLACEMENT_SHARD) return Placement::shard(p.dim);
  return make_error(Code::kInvalidArgument, "placement {} has unknown kind {}", mesh_dim, p.kind);
}

}  // namespace
}  // namespace dsd::capi

using dsd::Code;
using dsd::capi::guard;
using dsd::capi::require;

namespace dsd::capi {
namespace {

// This rank's tensor with a layout, checked: its shape must be the layout's local chunk.
Result<TensorValue> dist_tensor(dsd_tensor local, dsd_layout layout, const char* key) {
  TensorValue v = TRY(lookup(local));
  LayoutPtr l = TRY(lookup(layout));
  return make_dist_tensor(std::move(v), std::move(l),
                          key != nullptr ? std::optional<std::string_view>(key) : std::nullopt);
}

}  // namespace
}  // namespace dsd::capi

extern "C" {

dsd_status dsd_layout_new_placements(const dsd_mesh* mesh, const int64_t* global_shape, size_t ndim,
                                     const dsd_placement* placements, size_t count,
                                     dsd_layout* out, dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    TRY(require(mesh, "mesh"));
    std::vector<int64_t> shape = TRY(dsd::capi::dims_of(global_shape, ndim, "global_shape"));
    if (count > 0) TRY(require(placements, "placements"));
    TRY(require(out, "out"));
    std::vector<dsd::Placement> ps;
    for (size_t i = 0; i < count; ++i) ps.push_back(TRY(dsd::capi::placement_from(placements[i], i)));
    auto layout = TRY(dsd::Layout::on_mesh(std::move(shape), mesh->mesh, std::move(ps)));
    *out = dsd::capi::make_layout_handle(std::move(layout));
    return dsd::ok();
  });
}

dsd_status dsd_layout_new_chunk(const dsd_mesh* mesh, const int64_t* global_shape, size_t ndim,
                                const int64_t* offsets, const int64_t* sizes, dsd_layout* out,
                                dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    TRY(require(mesh, "mesh"));
    std::vector<int64_t> shape = TRY(dsd::capi::dims_of(global_shape, ndim, "global_shape"));
    dsd::Chunk box;
    box.offsets = TRY(dsd::capi::dims_of(offsets, ndim, "offsets"));
    box.sizes = TRY(dsd::capi::dims_of(sizes, ndim, "sizes"));
    TRY(require(out, "out"));
    auto layout = TRY(dsd::Layout::explicit_chunk(std::move(shape), mesh->mesh, std::move(box)));
    *out = dsd::capi::make_layout_handle(std::move(layout));
    return dsd::ok();
  });
}

dsd_status dsd_layout_release(dsd_layout layout, dsd_error** err) {
  return guard(err, [&]() -> dsd::Status { return dsd::capi::layout_table().release(layout.bits); });
}

dsd_status dsd_layout_retain(dsd_layout layout, dsd_layout* out, dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    TRY(require(out, "out"));
    dsd::capi::LayoutPtr l = TRY(dsd::capi::lookup(layout));
    *out = dsd::capi::make_layout_handle(std::move(l));
    return dsd::ok();
  });
}

dsd_status dsd_layout_ndim(dsd_layout layout, size_t* out, dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    TRY(require(out, "out"));
    dsd::capi::LayoutPtr l = TRY(dsd::capi::lookup(layout));
    *out = l->global_shape().size();
    return dsd::ok();
  });
}

dsd_status dsd_layout_global_shape(dsd_layout layout, int64_t* out, size_t capacity,
                                   dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    dsd::capi::LayoutPtr l = TRY(dsd::capi::lookup(layout));
    return dsd::capi::copy_out(l->global_shape(), out, capacity, "the global shape");
  });
}

dsd_status dsd_layout_local_chunk(dsd_layout layout, int64_t* out_offsets, int64_t* out_sizes,
                                  size_t capacity, dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    TRY(require(out_offsets, "out_offsets"));
    TRY(require(out_sizes, "out_sizes"));
    dsd::capi::LayoutPtr l = TRY(dsd::capi::lookup(layout));
    const dsd::Chunk box = dsd::local_box(*l);
    if (capacity < box.sizes.size()) {
      return dsd::make_error(Code::kBufferTooSmall, "the local chunk needs room for {} values, {} given",
                             box.sizes.size(), capacity);
    }
    std::copy(box.offsets.begin(), box.offsets.end(), out_offsets);
    std::copy(box.sizes.begin(), box.sizes.end(), out_sizes);
    return dsd::ok();
  });
}

dsd_status dsd_layout_is_chunk(dsd_layout layout, bool* out, dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    TRY(require(out, "out"));
    dsd::capi::LayoutPtr l = TRY(dsd::capi::lookup(layout));
    *out = l->is_explicit();
    return dsd::ok();
  });
}

dsd_status dsd_layout_placements(dsd_layout layout, dsd_placement* out, size_t capacity,
                                 dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    TRY(require(out, "out"));
    dsd::capi::LayoutPtr l = TRY(dsd::capi::lookup(layout));
    if (l->is_explicit()) {
      return dsd::Error(Code::kWrongKind, "the layout is an explicit chunk; it has no placements");
    }
    const auto& ps = l->placements();
    if (capacity < ps.size()) {
      return dsd::make_error(Code::kBufferTooSmall, "the placements need room for {} values, {} given",
                             ps.size(), capacity);
    }
    for (size_t i = 0; i < ps.size(); ++i) {
      out[i] = dsd_placement{ps[i].is_shard() ? DSD_PLACEMENT_SHARD : DSD_PLACEMENT_REPLICATE,
                             ps[i].is_shard() ? ps[i].dim : 0};
    }
    return dsd::ok();
  });
}

dsd_status dsd_layout_mesh(dsd_layout layout, dsd_mesh** out, dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    TRY(require(out, "out"));
    dsd::capi::LayoutPtr l = TRY(dsd::capi::lookup(layout));
    *out = new dsd_mesh(l->mesh());
    return dsd::ok();
  });
}


dsd_status dsd_tensor_new_dist(dsd_tensor local, dsd_layout layout, dsd_tensor* out, dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    TRY(require(out, "out"));
    dsd::TensorValue v = TRY(dsd::capi::dist_tensor(local, layout, nullptr));
    *out = dsd::capi::make_handle(std::move(v));
    return dsd::ok();
  });
}

dsd_status dsd_tensor_layout(dsd_tensor tensor, dsd_layout* out, dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    TRY(require(out, "out"));
    dsd::TensorValue v = TRY(dsd::capi::lookup(tensor));
    if (!v.is_dist()) return dsd::Error(Code::kWrongKind, "the tensor is not distributed (it has no layout)");
    *out = dsd::capi::make_layout_handle(v.layout);
    return dsd::ok();
  });
}

dsd_status dsd_state_dict_set_dist_tensor(dsd_state_dict* sd, const char* key, dsd_tensor local,
                                          dsd_layout layout, dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    TRY(require(sd, "sd"));
    dsd::TensorValue v = TRY(dsd::capi::dist_tensor(local, layout, key));
    return dsd::capi::put(sd, key, dsd::Value(std::move(v)));
  });
}

dsd_status dsd_state_dict_get_layout(const dsd_state_dict* sd, size_t index, dsd_layout* out,
                                     dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    TRY(require(sd, "sd"));
    TRY(require(out, "out"));
    const dsd::Value* v = TRY(dsd::capi::value_at(sd, index));
    const dsd::TensorValue* t = v->if_tensor();
    const std::string what = dsd::capi::describe(sd, index);
    if (t == nullptr) {
      return dsd::make_error_at(Code::kWrongKind, what, "{} is a {}, not a distributed tensor", what,
                                dsd::kind_name(v->kind()));
    }
    if (!t->is_dist()) {
      return dsd::make_error_at(Code::kWrongKind, what, "{} is a plain tensor, not a distributed tensor",
                                what);
    }
    *out = dsd::capi::make_layout_handle(t->layout);
    return dsd::ok();
  });
}

dsd_status dsd_state_dict_is_dist_tensor(const dsd_state_dict* sd, size_t index, bool* out,
                                         dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    TRY(require(sd, "sd"));
    TRY(require(out, "out"));
    const dsd::Value* v = TRY(dsd::capi::value_at(sd, index));
    const dsd::TensorValue* t = v->if_tensor();
    *out = t != nullptr && t->is_dist();
    return dsd::ok();
  });
}

}  // extern "C"
