// StateView: a StateReader over another one, with a key selection, a prefix strip and a cast
// of the floating tensors, over the dequantized base when asked.
#include "core/interop/state_view.h"

#include <fmt/format.h>

#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "core/base/make_error.h"
#include "core/base/torch_call.h"
#include "core/interop/dequantize.h"
#include "core/tensor/dtype_torch.h"

namespace dsd::interop {

namespace {

// "model." with "model" selected: what a selected key starts with, unless it is the prefix.
std::string with_dot(const std::string& select) { return select + "."; }

// `path` without the segments that `prefix_dot` ("model.layers.") spells: whole segments go,
// and a segment it covers in part keeps its rest (("model", "layers.0.weight") with
// "model.layers." leaves ("0.weight")). nullopt when the path does not spell the prefix
// (then the key alone is the path). A list index left at the top becomes a key: the top of
// a state dict is a dict.
std::optional<Path> strip_path(const Path& path, std::string_view prefix_dot) {
  std::string_view rest = prefix_dot;
  size_t i = 0;
  for (; i < path.size() && !rest.empty(); ++i) {
    const std::string s = path[i].str();
    if (rest.size() > s.size() && rest.starts_with(s) && rest[s.size()] == '.') {
      rest.remove_prefix(s.size() + 1);
      continue;
    }
    if (s.size() > rest.size() && std::string_view(s).starts_with(rest)) {
      Path out;
      out.emplace_back(s.substr(rest.size()));
      out.insert(out.end(), path.begin() + static_cast<std::ptrdiff_t>(i) + 1, path.end());
      return out;
    }
    return std::nullopt;
  }
  if (!rest.empty()) return std::nullopt;
  Path out(path.begin() + static_cast<std::ptrdiff_t>(i), path.end());
  if (!out.empty() && out[0].is_index()) out[0] = PathSegment(out[0].str());
  return out;
}

uint64_t numel_of(const std::vector<int64_t>& shape) {
  uint64_t n = 1;
  for (int64_t d : shape) n *= static_cast<uint64_t>(d);
  return n;
}

class StateView final : public StateReader {
 public:
  // `owned`: a view between the caller's reader and this one (the dequantized base), which
  // `base` is.
  explicit StateView(const StateReader& base, std::unique_ptr<StateReader> owned = nullptr)
      : owned_(std::move(owned)), base_(base) {
    format_ = base.format();
    path_ = base.path();
    world_size_ = base.world_size();
    files_ = base.files();
  }

  Status build(const StateViewOptions& o) {
    const std::string prefix_dot = with_dot(o.select);
    std::unordered_map<std::string, std::string> source_of;  // view key -> base key
    for (size_t i = 0; i < base_.items().size(); ++i) {
      const ItemInfo& b = base_.items()[i];
      const bool exact = !o.select.empty() && b.key == o.select;
      if (!o.select.empty() && !exact && !b.key.starts_with(prefix_dot)) continue;
      ItemInfo it = b;
      if (o.strip_prefix) {
        if (exact) {
          return make_error_at(Code::kInvalidArgument, b.key,
                               "stripping the selected prefix '{}' from '{}' leaves an empty key; select the "
                               "subtree that holds it instead",
                               o.select, b.key);
        }
        it.key = b.key.substr(prefix_dot.size());
        std::optional<Path> p = strip_path(b.path, prefix_dot);
        it.path = p && !p->empty() ? std::move(*p) : Path{PathSegment(it.key)};
      }
      auto [at, fresh] = source_of.emplace(it.key, b.key);
      if (!fresh) {
        return make_error_at(Code::kInvalidArgument, it.key, "'{}' and '{}' both become '{}' once '{}' is stripped",
                             at->second, b.key, it.key, o.select);
      }
      if (it.kind == Entry::Kind::kTensor && o.dtype && is_floating(it.dtype) && it.dtype != *o.dtype) {
        it.dtype = *o.dtype;
        it.nbytes = numel_of(it.shape) * element_size(it.dtype);
        // The saved chunks describe bytes of the other dtype: the cast tensor is one piece
        // that no file holds.
        ChunkRecord c;
        c.offsets.assign(it.shape.size(), 0);
        c.sizes = it.shape;
        c.end = it.nbytes;
        it.chunks = {std::move(c)};
        cast_.push_back(true);
      } else {
        cast_.push_back(false);
      }
      items_.push_back(std::move(it));
      source_.push_back(i);
    }
    if (items_.empty()) {
      return make_error_at(Code::kNotFound, base_.path(), "no key of '{}' is '{}' or starts with '{}'", base_.path(),
                           o.select, prefix_dot);
    }
    for (const Path& p : base_.int_key_dicts()) {
      const std::string key = join_path(p);
      if (o.select.empty()) {
        int_key_dicts_.push_back(p);
      } else if (key == o.select) {
        int_key_dicts_.push_back(o.strip_prefix ? Path{} : p);
      } else if (key.starts_with(prefix_dot)) {
        if (!o.strip_prefix) {
          int_key_dicts_.push_back(p);
        } else if (std::optional<Path> s = strip_path(p, prefix_dot)) {
          int_key_dicts_.push_back(std::move(*s));
        }
      }
    }
    return ok();
  }

  Result<at::Tensor> read_tensor(size_t index) const override {
    at::Tensor t = TRY(base_.read_tensor(source_.at(index)));
    if (!cast_[index]) return t;
    const ItemInfo& it = items_[index];
    return torch_call(Code::kInternal, fmt::format("casting '{}' to {}", it.key, dtype_name(it.dtype)),
                      [&] { return t.to(to_scalar_type(it.dtype)); });
  }
  Result<Value> read_value(size_t index) const override { return base_.read_value(source_.at(index)); }

 private:
  std::unique_ptr<StateReader> owned_;
  const StateReader& base_;
  std::vector<size_t> source_;  // per item: the base's index
  std::vector<bool> cast_;      // per item: read as the base's dtype and cast
};

}  // namespace

bool is_identity(const StateViewOptions& options) {
  return options.select.empty() && !options.strip_prefix && !options.dtype && !options.dequantize;
}

bool is_floating(DType dtype) {
  switch (dtype) {
    case DType::kFloat16:
    case DType::kBFloat16:
    case DType::kFloat32:
    case DType::kFloat64:
    case DType::kFloat8E4M3FN:
    case DType::kFloat8E5M2: return true;
    default: return false;
  }
}

Result<std::unique_ptr<StateReader>> make_state_view(const StateReader& base, const StateViewOptions& options) {
  StateViewOptions o = options;
  if (o.select.ends_with('.')) o.select.pop_back();
  if (!options.select.empty() && o.select.empty()) {
    return make_error(Code::kInvalidArgument, "select '{}' names no key prefix", options.select);
  }
  if (o.strip_prefix && o.select.empty()) {
    return make_error(Code::kInvalidArgument, "strip_prefix needs a select prefix to strip");
  }
  if (o.dtype && !is_floating(*o.dtype)) {
    return make_error(Code::kInvalidArgument,
                      "cannot cast to {}: dtype takes a floating dtype (float16, bfloat16, float32, float64, "
                      "float8_e4m3fn, float8_e5m2)",
                      dtype_name(*o.dtype));
  }
  std::unique_ptr<StateView> view;
  if (o.dequantize) {
    std::unique_ptr<StateReader> dequantized =
        TRY(make_dequantized_view(base, o.dtype.value_or(DType::kBFloat16)));
    const StateReader& inner = *dequantized;
    view = std::make_unique<StateView>(inner, std::move(dequantized));
  } else {
    view = std::make_unique<StateView>(base);
  }
  TRY(view->build(o));
  return std::unique_ptr<StateReader>(std::move(view));
}

}  // namespace dsd::interop
