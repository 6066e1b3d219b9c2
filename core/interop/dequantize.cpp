// The dequantized view: float8 weights times their 128×128 block scales, scales dropped.
#include "core/interop/dequantize.h"

#include <ATen/ops/empty.h>
#include <fmt/format.h>

#include <algorithm>
#include <span>
#include <unordered_map>
#include <utility>
#include <vector>

#include "core/base/make_error.h"
#include "core/base/strings.h"
#include "core/base/torch_call.h"
#include "core/interop/state_view.h"
#include "core/tensor/dtype_torch.h"

namespace dsd::interop {

namespace {

constexpr std::string_view kScaleSuffix = ".weight_scale_inv";
constexpr std::string_view kWeightSuffix = ".weight";

int64_t blocks_of(int64_t n) { return (n + kScaleBlockSize - 1) / kScaleBlockSize; }

bool is_float8(DType dtype) { return dtype == DType::kFloat8E4M3FN || dtype == DType::kFloat8E5M2; }

// What dequantize_blockwise needs of a weight and its scale, from their dtypes and shapes (so
// the view checks every pair before reading anything).
Status check_pair(std::string_view key, DType weight_dtype, std::span<const int64_t> weight_shape,
                  std::string_view scale_key, DType scale_dtype, std::span<const int64_t> scale_shape) {
  // PyTorch dequantizes 2-D weights only ("Unsupported quantization types" otherwise).
  if (weight_shape.size() != 2 || !is_float8(weight_dtype)) {
    return make_error_at(Code::kUnsupported, std::string(key),
                         "'{}' has a block scale '{}' but is {} of shape {}; dequantize takes 2-D float8 "
                         "(float8_e4m3fn, float8_e5m2) weights",
                         key, scale_key, dtype_name(weight_dtype), shape_str(weight_shape));
  }
  const std::vector<int64_t> want{blocks_of(weight_shape[0]), blocks_of(weight_shape[1])};
  if (scale_dtype != DType::kFloat32 || !std::equal(scale_shape.begin(), scale_shape.end(), want.begin(), want.end())) {
    return make_error_at(Code::kCorrupt, std::string(scale_key),
                         "'{}' is {} of shape {}; the scale of '{}' (shape {}) must be float32 of shape {} "
                         "(one per {}x{} block)",
                         scale_key, dtype_name(scale_dtype), shape_str(scale_shape), key, shape_str(weight_shape),
                         shape_str(want), kScaleBlockSize, kScaleBlockSize);
  }
  return ok();
}

std::vector<int64_t> sizes_of(const at::Tensor& t) { return {t.sizes().begin(), t.sizes().end()}; }

class DequantizedView final : public StateReader {
 public:
  DequantizedView(const StateReader& base, DType target) : base_(base), target_(target) {
    format_ = base.format();
    path_ = base.path();
    world_size_ = base.world_size();
    files_ = base.files();
    int_key_dicts_ = base.int_key_dicts();
  }

  Status build() {
    const std::vector<ItemInfo>& items = base_.items();
    std::unordered_map<std::string_view, size_t> index_of;
    for (size_t i = 0; i < items.size(); ++i) index_of.emplace(items[i].key, i);
    // weight index -> scale index.
    std::unordered_map<size_t, size_t> scale_of;
    std::vector<bool> is_scale(items.size(), false);
    for (size_t i = 0; i < items.size(); ++i) {
      const ItemInfo& s = items[i];
      std::optional<std::string> weight_key = scaled_weight_key(s.key);
      if (!weight_key) continue;
      auto w = index_of.find(*weight_key);
      // PyTorch would pass such a scale through as a tensor of its own; it is more likely a
      // checkpoint cut short, and its weight would come out still quantized.
      if (w == index_of.end()) {
        return make_error_at(Code::kCorrupt, s.key, "'{}' is a block scale but its weight '{}' is not in '{}'",
                             s.key, *weight_key, base_.path());
      }
      const ItemInfo& wi = items[w->second];
      if (s.kind != Entry::Kind::kTensor || wi.kind != Entry::Kind::kTensor) {
        const ItemInfo& value = s.kind != Entry::Kind::kTensor ? s : wi;
        return make_error_at(Code::kCorrupt, value.key, "'{}' is a value, not a tensor; '{}' scales '{}'", value.key,
                             s.key, wi.key);
      }
      TRY(check_pair(wi.key, wi.dtype, wi.shape, s.key, s.dtype, s.shape));
      auto [at, fresh] = scale_of.emplace(w->second, i);
      if (!fresh) {
        return make_error_at(Code::kCorrupt, wi.key, "'{}' has two block scales, '{}' and '{}'", wi.key,
                             items[at->second].key, s.key);
      }
      is_scale[i] = true;
    }
    for (size_t i = 0; i < items.size(); ++i) {
      if (is_scale[i]) continue;
      ItemInfo it = items[i];
      auto s = scale_of.find(i);
      if (s != scale_of.end()) {
        it.dtype = target_;
        it.nbytes = static_cast<uint64_t>(it.shape[0]) * static_cast<uint64_t>(it.shape[1]) * element_size(target_);
        // The saved chunk holds float8 bytes: the dequantized tensor is one piece no file holds.
        ChunkRecord c;
        c.offsets.assign(it.shape.size(), 0);
        c.sizes = it.shape;
        c.end = it.nbytes;
        it.chunks = {std::move(c)};
        scale_.push_back(s->second);
      } else {
        scale_.push_back(kNone);
      }
      items_.push_back(std::move(it));
      source_.push_back(i);
    }
    return ok();
  }

  Result<at::Tensor> read_tensor(size_t index) const override {
    at::Tensor t = TRY(base_.read_tensor(source_.at(index)));
    if (scale_[index] == kNone) return t;
    at::Tensor scale = TRY(base_.read_tensor(scale_[index]));
    return dequantize_blockwise(t, scale, target_, items_[index].key);
  }
  Result<Value> read_value(size_t index) const override { return base_.read_value(source_.at(index)); }

 private:
  static constexpr size_t kNone = static_cast<size_t>(-1);
  const StateReader& base_;
  DType target_;
  std::vector<size_t> source_;  // per item: the base's index
  std::vector<size_t> scale_;   // per item: the base's index of its scale, or kNone
};

}  // namespace

std::optional<std::string> scaled_weight_key(std::string_view key) {
  if (!key.ends_with(kScaleSuffix)) return std::nullopt;
  std::string out;
  for (size_t pos = 0;;) {
    const size_t hit = key.find(kScaleSuffix, pos);
    if (hit == std::string_view::npos) {
      out.append(key.substr(pos));
      return out;
    }
    out.append(key.substr(pos, hit - pos)).append(kWeightSuffix);
    pos = hit + kScaleSuffix.size();
  }
}

Result<at::Tensor> dequantize_blockwise(const at::Tensor& weight, const at::Tensor& scale_inv, DType target,
                                        std::string_view key) {
  const std::string scale_key = fmt::format("{}_scale_inv", key);
  const DType weight_dtype = TRY(dtype_from_scalar_type(weight.scalar_type()));
  const DType scale_dtype = TRY(dtype_from_scalar_type(scale_inv.scalar_type()));
  TRY(check_pair(key, weight_dtype, sizes_of(weight), scale_key, scale_dtype, sizes_of(scale_inv)));
  return torch_call(Code::kInternal, fmt::format("dequantizing '{}' to {}", key, dtype_name(target)), [&] {
    const int64_t rows = weight.size(0);
    const int64_t cols = weight.size(1);
    // One row of factors per row of blocks, each repeated over its block's columns: the
    // float32 held beside the output is one block row, never the whole weight.
    const at::Tensor col_scales = scale_inv.repeat_interleave(kScaleBlockSize, 1).narrow(1, 0, cols);
    at::Tensor out = at::empty({rows, cols}, weight.options().dtype(to_scalar_type(target)));
    for (int64_t b = 0; b * kScaleBlockSize < rows; ++b) {
      const int64_t r0 = b * kScaleBlockSize;
      const int64_t n = std::min(kScaleBlockSize, rows - r0);
      // copy_ rounds the float32 product to `target` as Tensor.to does.
      out.narrow(0, r0, n).copy_(weight.narrow(0, r0, n).to(at::kFloat).mul_(col_scales[b]));
    }
    return out;
  });
}

Result<std::unique_ptr<StateReader>> make_dequantized_view(const StateReader& base, DType target) {
  if (!is_floating(target)) {
    return make_error(Code::kInvalidArgument, "cannot dequantize to {}: the target is a floating dtype",
                      dtype_name(target));
  }
  auto view = std::make_unique<DequantizedView>(base, target);
  TRY(view->build());
  return std::unique_ptr<StateReader>(std::move(view));
}

}  // namespace dsd::interop
