// Dequantization of FP8 block-scaled weights, as Hugging Face checkpoints of DeepSeek-V3 store
// them: `X.weight` in float8 with a companion `X.weight_scale_inv` in float32 of shape
// [ceil(rows / 128), ceil(cols / 128)], one factor per 128×128 block (the blocks of the last row
// and column are cut by the edges). The semantics are PyTorch's
// QuantizedHuggingFaceStorageReader (torch/distributed/checkpoint/quantized_hf_storage.py),
// so what dsd writes is bitwise what dcp.load through that reader gives.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>

#include "core/base/result.h"
#include "core/interop/state_reader.h"
#include "core/tensor/dtype.h"

namespace dsd::interop {

// The side of a scale block: PyTorch's default block_size and DeepSeek-V3's weight_block_size.
inline constexpr int64_t kScaleBlockSize = 128;

// The weight key that `key` scales, by PyTorch's rule: a key that ends in ".weight_scale_inv"
// scales the key with ".weight_scale_inv" replaced by ".weight" (every occurrence, as Python's
// str.replace). nullopt for any other key: "X.bias_scale_inv" or MXFP4's "X_scales" scale nothing.
std::optional<std::string> scaled_weight_key(std::string_view key);

// `weight` (2-D, float8) times `scale_inv` expanded over kScaleBlockSize² blocks, as PyTorch
// computes it: both in float32 (the weight's float8 values are exact there), one float32
// product per element, rounded once to `target` (to nearest, ties to even, as Tensor.to).
// `key` names the weight in errors. Errors: kCorrupt (a scale that is not float32 or not of
// shape [ceil(rows/128), ceil(cols/128)]), kUnsupported (a weight that is not 2-D float8),
// each naming the weight and its scale.
Result<at::Tensor> dequantize_blockwise(const at::Tensor& weight, const at::Tensor& scale_inv, DType target,
                                        std::string_view key);

// A reader over `base` (borrowed: it must outlive the view) in which every weight with a scale
// (scaled_weight_key) reads as dequantize_blockwise of the two, in `target`, and the scale
// entries are gone; every other entry is the base's, unchanged. The view's items keep the
// base's order. Nothing is read before read_tensor, one weight and its scale at a time; the
// pairs are checked from the items' dtypes and shapes when the view is made. Errors:
// kCorrupt (a scale without its weight, a scale or weight that is a value rather than a
// tensor, a scale of another dtype than float32 or of the wrong shape, two scales of one
// weight), kUnsupported (a scaled weight that is not 2-D float8), kInvalidArgument (a
// non-floating `target`); each names the keys concerned.
Result<std::unique_ptr<StateReader>> make_dequantized_view(const StateReader& base,
                                                           DType target = DType::kBFloat16);

}  // namespace dsd::interop
