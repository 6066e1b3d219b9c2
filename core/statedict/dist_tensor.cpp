#include "core/statedict/dist_tensor.h"

#include <fmt/ranges.h>

#include "core/base/make_error.h"
#include "core/dist/mesh.h"

namespace dsd {

Chunk local_box(const Layout& l) {
  if (!l.is_explicit() && !l.mesh()->my_coordinate()) {
    const size_t n = l.global_shape().size();
    return Chunk{std::vector<int64_t>(n, 0), std::vector<int64_t>(n, 0)};
  }
  return l.local_chunk();
}

Result<TensorValue> make_dist_tensor(TensorValue local, std::shared_ptr<const Layout> layout,
                                     std::optional<std::string_view> key) {
  if (layout == nullptr) return Error(Code::kInvalidArgument, "a distributed tensor needs a layout");
  TensorValue v = std::move(local);
  v.layout = std::move(layout);
  const Chunk box = local_box(*v.layout);
  const bool holds_nothing = box.numel() == 0 && v.tensor.numel() == 0;
  if (!holds_nothing && v.tensor.sizes() != c10::IntArrayRef(box.sizes)) {
    const std::string name = key ? fmt::format("'{}'", *key) : std::string("the tensor");
    return make_error_at(Code::kShapeMismatch, key ? std::string(*key) : std::string(),
                         "local tensor of {} has shape [{}], but its layout ({}) gives "
                         "rank {} the chunk {} of shape [{}]",
                         name, fmt::join(v.tensor.sizes(), ", "), v.layout->str(),
                         v.layout->mesh()->my_rank(), box.str(), fmt::join(box.sizes, ", "));
  }
  return v;
}

}  // namespace dsd
