// The on-disk formats dsd reads and writes, and how a path's format is recognised.
//
// - kDsd: a dsd checkpoint directory (checkpoint.json + safetensors data files).
// - kDcp: a PyTorch Distributed Checkpoint directory (`.metadata`, or the rank-local
//   `__<rank>.metadata` files of a save without collectives, + `.distcp` data files).
// - kTorchSave: one file written by torch.save (a zip archive).
// - kSafetensors: Hugging Face safetensors: a directory of `*.safetensors` files (with or
//   without `model.safetensors.index.json`), or one `.safetensors` file.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include "core/base/result.h"

namespace dsd::checkpoint {

// The numbers are the C ABI's DSD_FORMAT_* values.
enum class Format : int32_t {
  kDsd = 0,
  kDcp = 1,
  kTorchSave = 2,
  kSafetensors = 3,
};

// "dsd", "dcp", "torch", "safetensors".
std::string_view format_name(Format format);
// Also accepts "pt"/"torch_save" for kTorchSave and "hf" for kSafetensors.
std::optional<Format> format_from_name(std::string_view name);
std::optional<Format> format_from_code(int32_t code);

inline constexpr std::string_view kDcpMetadataName = ".metadata";
inline constexpr std::string_view kHfIndexName = "model.safetensors.index.json";

// Whether `dir` holds a committed DCP checkpoint: `.metadata`, or `__<rank>.metadata` files.
bool is_dcp_checkpoint(const std::string& dir);
// Whether `name` is a rank-local DCP metadata file name, `__<rank>.metadata`; its rank.
std::optional<int64_t> dcp_rank_metadata(std::string_view name);

// The format of what is at `path`, from its names and first bytes. A directory holding both
// a dsd manifest and DCP metadata is a dsd checkpoint. Errors: kNotFound (nothing at
// `path`, or a directory holding no checkpoint of any format), kUnsupported (a file that is
// neither a torch.save zip nor safetensors), kIo.
Result<Format> detect_format(const std::string& path);

}  // namespace dsd::checkpoint
