// Formats and conversions: detection, convert, torch.save and safetensors export/import.
#include "capi/src/export.h"

#include <cstddef>

#include "capi/src/guard.h"
#include "capi/src/state_dicts.h"
#include "capi/src/options.h"
#include "core/base/make_error.h"
#include "core/interop/convert.h"
#include "core/interop/detect.h"

namespace dsd::capi {
namespace {

Result<interop::ConvertOptions> convert_options(const dsd_format_convert_options* o) {
  dsd_format_convert_options defaults;
  dsd_format_convert_options_init(&defaults);
  const dsd_format_convert_options in =
      TRY(read_options(o, defaults, {sizeof(dsd_format_convert_options)}, "dsd_format_convert_options",
                       "dsd_format_convert_options_init"));
  interop::ConvertOptions out;
  out.overwrite = in.overwrite;
  out.thread_count = in.thread_count;
  out.max_shard_size = in.max_shard_size;
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

void dsd_format_convert_options_init(dsd_format_convert_options* options) {
  if (options == nullptr) return;
  const dsd::interop::ConvertOptions d;
  *options = dsd_format_convert_options{};
  options->struct_size = sizeof(dsd_format_convert_options);
  options->overwrite = d.overwrite;
  options->thread_count = d.thread_count;
  options->max_shard_size = d.max_shard_size;
}

dsd_status dsd_format_detect(const char* path, dsd_format* out, dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    TRY(require(path, "path"));
    TRY(require(out, "out"));
    const auto f = TRY(dsd::interop::detect_format(path));
    *out = static_cast<dsd_format>(f);
    return dsd::ok();
  });
}

dsd_status dsd_format_convert(const char* src, const char* dst, dsd_format to,
                              const dsd_format_convert_options* options, dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    TRY(require(src, "src"));
    TRY(require(dst, "dst"));
    const auto f = dsd::checkpoint::format_from_code(to);
    if (!f) return dsd::make_error(dsd::Code::kInvalidArgument, "format {} is not a DSD_FORMAT_*", to);
    auto opts = TRY(dsd::capi::convert_options(options));
    return dsd::interop::convert(src, dst, *f, opts);
  });
}

dsd_status dsd_torch_save_export(const dsd_state_dict* sd, const char* path,
                                 const dsd_format_convert_options* options, dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    const dsd::Dict* d = TRY(dsd::capi::as_dict(sd, "sd"));
    TRY(require(path, "path"));
    auto opts = TRY(dsd::capi::convert_options(options));
    return dsd::interop::export_torch_save(*d, path, opts);
  });
}

dsd_status dsd_torch_save_import(const char* path, dsd_state_dict** out, dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    TRY(require(path, "path"));
    TRY(require(out, "out"));
    dsd::DictPtr d = TRY(dsd::interop::import_torch_save(path));
    *out = dsd::capi::wrap(dsd::Value(std::move(d)));
    return dsd::ok();
  });
}

dsd_status dsd_safetensors_export(const dsd_state_dict* sd, const char* dir,
                                  const dsd_format_convert_options* options, dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    const dsd::Dict* d = TRY(dsd::capi::as_dict(sd, "sd"));
    TRY(require(dir, "dir"));
    auto opts = TRY(dsd::capi::convert_options(options));
    return dsd::interop::export_safetensors(*d, dir, opts);
  });
}

dsd_status dsd_safetensors_import(const char* path, dsd_state_dict** out, dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    TRY(require(path, "path"));
    TRY(require(out, "out"));
    dsd::DictPtr d = TRY(dsd::interop::import_safetensors(path));
    *out = dsd::capi::wrap(dsd::Value(std::move(d)));
    return dsd::ok();
  });
}

}  // extern "C"
