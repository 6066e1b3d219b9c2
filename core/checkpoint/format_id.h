// The on-disk formats dsd reads and writes, by id and name.
//
// - kDsd: a dsd checkpoint directory (checkpoint.json + safetensors data files).
// - kDcp: a PyTorch Distributed Checkpoint directory (`.metadata`, or the rank-local
//   `__<rank>.metadata` files of a save without collectives, + `.distcp` data files).
// - kTorchSave: one file written by torch.save (a zip archive).
// - kSafetensors: Hugging Face safetensors: a directory of `*.safetensors` files (with or
//   without `model.safetensors.index.json`), or one `.safetensors` file.
//
// The engine saves and loads the first two; core/interop converts between all four and
// recognises them (interop/detect.h).
#pragma once

#include <cstdint>
#include <optional>
#include <string_view>

namespace dsd::checkpoint {

// The numbers are the C ABI's DSD_FORMAT_* values (from 1: 0 is never a valid format).
enum class Format : int32_t {
  kDsd = 1,
  kDcp = 2,
  kTorchSave = 3,
  kSafetensors = 4,
};

// "dsd", "dcp", "torch", "safetensors".
std::string_view format_name(Format format);
// Also accepts "pt"/"torch_save" for kTorchSave and "hf" for kSafetensors.
std::optional<Format> format_from_name(std::string_view name);
std::optional<Format> format_from_code(int32_t code);

}  // namespace dsd::checkpoint
