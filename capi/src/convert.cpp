// Formats and conversions: detection, convert, torch.save and safetensors export/import.
#include "capi/src/export.h"

#include <cstddef>

#include "capi/src/guard.h"
#include "capi/src/state_dicts.h"
#include "core/base/format.h"
#include "core/checkpoint/convert.h"

namespace dsd::capi {
namespace {

Result<checkpoint::ConvertOptions> convert_options(const dsd_convert_options* o) {
  checkpoint::ConvertOptions out;
  if (o == nullptr) return out;
  if (o->struct_size < sizeof(uint32_t) + sizeof(bool)) {
    return make_error(Code::kInvalidArgument, "options->struct_size {} is too small; call dsd_convert_options_init",
                      o->struct_size);
  }
  out.overwrite = o->overwrite;
  if (o->struct_size >= offsetof(dsd_convert_options, thread_count) + sizeof(int32_t)) out.thread_count = o->thread_count;
  if (o->struct_size >= offsetof(dsd_convert_options, max_shard_size) + sizeof(uint64_t)) {
    out.max_shard_size = o->max_shard_size;
  }
  if (out.thread_count < 0) {
    return make_error(Code::kInvalidArgument, "options->thread_count {} is negative", out.thread_count);
  }
  return out;
}

}  // namespace
}  // namespace dsd::capi

using dsd::capi::guard;
using dsd::capi::require;

extern "C" {

void dsd_convert_options_init(dsd_convert_options* options) {
  if (options == nullptr) return;
  const dsd::checkpoint::ConvertOptions d;
  *options = dsd_convert_options{sizeof(dsd_convert_options), d.overwrite, d.thread_count, d.max_shard_size};
}

dsd_status dsd_detect_format(const char* path, dsd_format* out, dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    TRY(require(path, "path"));
    TRY(require(out, "out"));
    const auto f = TRY(dsd::checkpoint::detect_format(path));
    *out = static_cast<dsd_format>(f);
    return dsd::ok();
  });
}

dsd_status dsd_convert(const char* src, const char* dst, dsd_format to, const dsd_convert_options* options,
                       dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    TRY(require(src, "src"));
    TRY(require(dst, "dst"));
    const auto f = dsd::checkpoint::format_from_code(to);
    if (!f) return dsd::make_error(dsd::Code::kInvalidArgument, "format {} is not a DSD_FORMAT_*", to);
    auto opts = TRY(dsd::capi::convert_options(options));
    return dsd::checkpoint::convert(src, dst, *f, opts);
  });
}

dsd_status dsd_export_torch_save(const dsd_state_dict* sd, const char* path, const dsd_convert_options* options,
                                 dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    const dsd::Dict* d = TRY(dsd::capi::as_dict(sd, "sd"));
    TRY(require(path, "path"));
    auto opts = TRY(dsd::capi::convert_options(options));
    return dsd::checkpoint::export_torch_save(*d, path, opts);
  });
}

dsd_status dsd_import_torch_save(const char* path, dsd_state_dict** out, dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    TRY(require(path, "path"));
    TRY(require(out, "out"));
    dsd::DictPtr d = TRY(dsd::checkpoint::import_torch_save(path));
    *out = dsd::capi::wrap(dsd::Value(std::move(d)));
    return dsd::ok();
  });
}

dsd_status dsd_export_safetensors(const dsd_state_dict* sd, const char* dir, const dsd_convert_options* options,
                                  dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    const dsd::Dict* d = TRY(dsd::capi::as_dict(sd, "sd"));
    TRY(require(dir, "dir"));
    auto opts = TRY(dsd::capi::convert_options(options));
    return dsd::checkpoint::export_safetensors(*d, dir, opts);
  });
}

dsd_status dsd_import_safetensors(const char* path, dsd_state_dict** out, dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    TRY(require(path, "path"));
    TRY(require(out, "out"));
    dsd::DictPtr d = TRY(dsd::checkpoint::import_safetensors(path));
    *out = dsd::capi::wrap(dsd::Value(std::move(d)));
    return dsd::ok();
  });
}

}  // extern "C"
