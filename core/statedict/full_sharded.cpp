#include "core/statedict/full_sharded.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "core/base/format.h"
#include "core/base/torch_call.h"
#include "core/dist/comm.h"
#include "core/dist/layout.h"
#include "core/dist/mesh.h"
#include "core/statedict/flatten.h"

namespace dsd {
namespace {

// Copies the containers of a tree, transforming each tensor leaf with `fn`.
template <class Fn>
Result<Value> map_tensors(const Value& v, const std::string& path, Fn& fn) {
  if (const Dict* d = v.if_dict()) {
    auto out = Dict::make();
    out->reserve(d->size());
    out->set_int_keys(d->int_keys());
    for (const auto& e : *d) {
      Value mapped = TRY(map_tensors(e.value, path.empty() ? e.key : path + "." + e.key, fn));
      out->append_unique(e.key, std::move(mapped));
    }
    return Value(out);
  }
  if (const List* l = v.if_list()) {
    auto out = List::make(l->is_tuple());
    out->items().reserve(l->size());
    for (size_t i = 0; i < l->size(); ++i) {
      Value mapped = TRY(map_tensors((*l)[i], path + "." + std::to_string(i), fn));
      out->push_back(std::move(mapped));
    }
    return Value(out);
  }
  if (const TensorValue* t = v.if_tensor()) return fn(*t, path);
  return v;
}

Result<at::Tensor> to_cpu(const at::Tensor& t, const std::string& key) {
  if (t.is_cpu()) return t;
  return torch_call(Code::kDevice, fmt::format("moving '{}' to CPU", key), [&] { return t.cpu(); });
}

// The whole tensor a single process holds: its shard must be all of it.
Result<at::Tensor> local_full(const TensorValue& t, const std::string& key) {
  const Chunk local = t.layout->local_chunk();
  if (local.sizes != t.layout->global_shape()) {
    return make_error_at(Code::kUnsupported, key,
                         "'{}' is sharded ({}) but there is no communicator to gather it with", key,
                         t.layout->str());
  }
  return t.tensor;
}

}  // namespace

Result<DictPtr> gather_state_dict(DictPtr state_dict, Communicator* comm, bool cpu_offload,
                                  bool rank0_only, uint64_t bucket_bytes) {
  (void)bucket_bytes;
  (void)comm;
  auto fn = [&](const TensorValue& t, const std::string& key) -> Result<Value> {
    at::Tensor full = t.tensor;
    if (t.is_dist()) full = TRY(local_full(t, key));
    if (cpu_offload) full = TRY(to_cpu(full, key));
    return Value(TensorValue{full, nullptr, t.read_only});
  };
  Value out = TRY(map_tensors(Value(state_dict), "", fn));
  if (rank0_only && comm != nullptr && comm->rank() != 0) return Dict::make();
  return out.dict_ptr();
}

Result<DictPtr> offload_state_dict_to_cpu(DictPtr state_dict) {
  auto fn = [&](const TensorValue& t, const std::string& key) -> Result<Value> {
    at::Tensor cpu = TRY(to_cpu(t.tensor, key));
    return Value(TensorValue{cpu, t.layout, t.read_only});
  };
  Value out = TRY(map_tensors(Value(state_dict), "", fn));
  return out.dict_ptr();
}

Result<at::Tensor> local_slice(const at::Tensor& full, const Layout& layout, std::string_view key) {
  if (full.sizes() != c10::IntArrayRef(layout.global_shape())) {
    return make_error_at(Code::kShapeMismatch, std::string(key),
                         "'{}' has shape [{}] but its layout's global shape is [{}]", key,
                         fmt::join(full.sizes(), ", "), fmt::join(layout.global_shape(), ", "));
  }
  const Chunk c = layout.local_chunk();
  if (c.offsets.size() != static_cast<size_t>(full.dim())) {
    return full.flatten().narrow(0, 0, 0);  // this rank is not in the layout's mesh
  }
  at::Tensor view = full;
  for (size_t d = 0; d < c.sizes.size() && d < static_cast<size_t>(full.dim()); ++d) {
    const int64_t off = std::min(c.offsets[d], full.size(static_cast<int64_t>(d)));
    view = view.narrow(static_cast<int64_t>(d), off, c.sizes[d]);
  }
  return view;
}

}  // namespace dsd
