// A StateReader seen through a selection, a renaming and a cast (and, when asked, a
// dequantization of FP8 block-scaled weights): what an export publishes from a training
// checkpoint. `{"model": ..., "optim": ..., "step": 7}` seen with select
// "model", strip_prefix and dtype bfloat16 is the model's weights alone, keyed as the model
// names them ("layers.0.mlp.up_proj.weight"), in bfloat16: what Hugging Face's
// from_pretrained loads. Every conversion (convert.h) goes through one when its options ask.
#pragma once

#include <memory>
#include <optional>
#include <string>

#include "core/base/result.h"
#include "core/interop/state_reader.h"
#include "core/tensor/dtype.h"

namespace dsd::interop {

struct StateViewOptions {
  // A key prefix: the entries whose flat key is `select` or starts with `select` + "."
  // ("model" and "model." both select the subtree under the key "model"). Empty: all.
  std::string select;
  // Drop `select` and its dot from the keys and paths ("model.layers.0.weight" becomes
  // "layers.0.weight"). Needs `select`.
  bool strip_prefix = false;
  // Cast every floating tensor (float16, bfloat16, float32, float64, float8) to this
  // floating dtype, rounding as torch's Tensor.to does (to nearest, ties to even); integer,
  // bool and complex tensors keep their dtype. nullopt: no cast.
  std::optional<DType> dtype;
  // Dequantize FP8 block-scaled weights (dequantize.h): every `X.weight` with an
  // `X.weight_scale_inv` becomes the float8 weight times its 128x128 block scales, in `dtype`
  // (bfloat16 when no dtype is given), and the scales are dropped. It applies to the base,
  // before the selection and the cast: weights and scales pair by the source's own keys (as
  // PyTorch pairs them in the checkpoint's weight map, whatever is selected or stripped), and
  // the float32 product is rounded once, to the dtype asked for, rather than cast twice; the
  // cast of a float8 weight before its scale is applied would mean nothing.
  bool dequantize = false;
};

// True when `options` selects everything, renames nothing, casts and dequantizes nothing.
bool is_identity(const StateViewOptions& options);

// True for the dtypes a cast applies to and may target.
bool is_floating(DType dtype);

// A reader over `base` (borrowed: it must outlive the view) showing only what `options`
// selects, renamed, cast and dequantized; reading a cast tensor reads the base tensor and
// casts it (one tensor at a time, as any read). The view's items keep the base's order.
// Errors: kNotFound (`select` matches no key; names the prefix and the source),
// kInvalidArgument (strip_prefix without select, a non-floating dtype, a key that stripping
// would leave empty, two keys that become one once stripped; each names the keys concerned),
// and with dequantize those of make_dequantized_view (kCorrupt: a scale without its weight
// or of the wrong dtype or shape; kUnsupported: a scaled weight that is not 2-D float8).
Result<std::unique_ptr<StateReader>> make_state_view(const StateReader& base, const StateViewOptions& options);

}  // namespace dsd::interop
