#include "core/checkpoint/format_id.h"

namespace dsd::checkpoint {

std::string_view format_name(Format format) {
  switch (format) {
    case Format::kDsd: return "dsd";
    case Format::kDcp: return "dcp";
    case Format::kTorchSave: return "torch";
    case Format::kSafetensors: return "safetensors";
  }
  return "?";
}

std::optional<Format> format_from_name(std::string_view name) {
  if (name == "dsd") return Format::kDsd;
  if (name == "dcp") return Format::kDcp;
  if (name == "torch" || name == "pt" || name == "torch_save") return Format::kTorchSave;
  if (name == "safetensors" || name == "hf") return Format::kSafetensors;
  return std::nullopt;
}

std::optional<Format> format_from_code(int32_t code) {
  if (code < static_cast<int32_t>(Format::kDsd) || code > static_cast<int32_t>(Format::kSafetensors)) {
    return std::nullopt;
  }
  return static_cast<Format>(code);
}

}  // namespace dsd::checkpoint
