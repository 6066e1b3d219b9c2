// Formats and conversions: detection, convert, torch.save and safetensors export/import.
#include "capi/src/export.h"

#include <cstddef>
#include <cstring>
#include <map>

#include "capi/src/guard.h"
#include "capi/src/state_dicts.h"
#include "capi/src/options.h"
#include "core/base/make_error.h"
#include "core/checkpoint/load.h"
#include "core/interop/convert.h"
#include "core/interop/detect.h"
#include "core/interop/state_reader.h"
#include "core/tensor/dtype.h"

namespace dsd::capi {

// The struct of ABI 1.0 ended at max_shard_size: select, strip_prefix and dtype came after
// it, so a caller built against that header (a 24-byte struct) gets their defaults.
constexpr size_t kConvertOptionsSizeV1 = 24;

namespace {

static_assert(offsetof(dsd_format_convert_options, select) == kConvertOptionsSizeV1 &&
              offsetof(dsd_format_convert_options, max_shard_size) + sizeof(uint64_t) == kConvertOptionsSizeV1);
// 1.1's struct ends after dtype; 1.2 appended dequantize and materialize.
constexpr size_t kConvertOptionsSizeV1_1 = 40;
static_assert(offsetof(dsd_format_convert_options, dequantize) == kConvertOptionsSizeV1_1);

Result<interop::ConvertOptions> convert_options(const dsd_format_convert_options* o) {
  dsd_format_convert_options defaults;
  dsd_format_convert_options_init(&defaults);
  const dsd_format_convert_options in =
      TRY(read_options(o, defaults, {kConvertOptionsSizeV1, kConvertOptionsSizeV1_1, sizeof(dsd_format_convert_options)},
                       "dsd_format_convert_options", "dsd_format_convert_options_init"));
  interop::ConvertOptions out;
  out.overwrite = in.overwrite;
  out.thread_count = in.thread_count;
  out.max_shard_size = in.max_shard_size;
  if (out.thread_count < 0) {
    return make_error(Code::kInvalidArgument, "options->thread_count {} is negative", out.thread_count);
  }
  if (in.select != nullptr) out.select = in.select;
  out.strip_prefix = in.strip_prefix;
  out.dequantize = in.dequantize;
  out.materialize = in.materialize;
  if (in.dtype != 0) {  // 0: unset, no cast (the header's enumerations never use 0)
    out.dtype = dtype_from_code(in.dtype);
    if (!out.dtype) {
      return make_error(Code::kInvalidArgument, "options->dtype {} is neither 0 (no cast) nor a DSD_DTYPE_*",
                        in.dtype);
    }
  }
  return out;
}

ListPtr int_list(const std::vector<int64_t>& v) {
  ListPtr l = List::make();
  for (int64_t x : v) l->push_back(Value(x));
  return l;
}

// The description of one leaf: what the reader knows from metadata alone (no tensor bytes).
DictPtr describe_item(const interop::ItemInfo& item) {
  DictPtr d = Dict::make();
  const bool tensor = item.kind == interop::Entry::Kind::kTensor;
  d->set("kind", Value(tensor ? "tensor" : "value"));
  ListPtr path = List::make();
  for (const PathSegment& seg : item.path) {
    if (const int64_t* i = seg.if_index()) {
      path->push_back(Value(*i));
    } else {
      path->push_back(Value(*seg.if_key()));
    }
  }
  d->set("path", Value(std::move(path)));
  if (tensor) {
    d->set("dtype", Value(std::string(dtype_name(item.dtype))));
    d->set("shape", Value(int_list(item.shape)));
    d->set("nbytes", Value(static_cast<int64_t>(item.nbytes)));
    ListPtr chunks = List::make();
    for (const interop::ChunkRecord& c : item.chunks) {
      DictPtr cd = Dict::make();
      cd->set("offsets", Value(int_list(c.offsets)));
      cd->set("sizes", Value(int_list(c.sizes)));
      chunks->push_back(Value(std::move(cd)));
    }
    d->set("chunks", Value(std::move(chunks)));
  }
  return d;
}

Result<DictPtr> inspect(const char* path, const dsd_checkpoint_load_options* o) {
  dsd_checkpoint_load_options defaults;
  dsd_checkpoint_load_options_init(&defaults);
  const dsd_checkpoint_load_options in =
      TRY(read_options(o, defaults, {sizeof(dsd_checkpoint_load_options)},
                       "dsd_checkpoint_load_options", "dsd_checkpoint_load_options_init"));
  checkpoint::OpenOptions open;
  open.allow_external_files = in.allow_external_files;
  const auto reader = TRY(interop::StateReader::open(path, open));
  DictPtr entries = Dict::make();
  for (const interop::ItemInfo& item : reader->items()) {
    entries->set(item.key, Value(describe_item(item)));
  }
  DictPtr out = Dict::make();
  out->set("format", Value(std::string(checkpoint::format_name(reader->format()))));
  out->set("world_size", Value(reader->world_size()));
  out->set("entries", Value(std::move(entries)));
  // What an incremental dsd checkpoint owns and what it references in its bases.
  uint64_t owned = reader->tensor_bytes();
  DictPtr referenced = Dict::make();
  if (reader->format() == checkpoint::Format::kDsd) {
    const checkpoint::Manifest m = TRY(checkpoint::read_manifest(path));
    if (m.has_references()) {
      owned = 0;
      std::map<std::string, int64_t> by_base;
      for (const checkpoint::Entry& e : m.entries) {
        for (const checkpoint::ChunkRecord& c : e.chunks) {
          const checkpoint::FileRecord* f = m.file(c.file);
          if (f != nullptr && f->referenced()) by_base[f->checkpoint] += static_cast<int64_t>(c.nbytes());
          else owned += c.nbytes();
        }
      }
      for (const auto& [base, n] : by_base) referenced->set(base, Value(n));
    }
  }
  out->set("owned_bytes", Value(static_cast<int64_t>(owned)));
  out->set("referenced_bytes", Value(std::move(referenced)));
  return out;
}

}  // namespace
}  // namespace dsd::capi

using dsd::capi::guard;
using dsd::capi::require;

extern "C" {

// dsd_format_convert_options_init@@DSD_1.2 (capi/dsd.map): what programs built against the
// 1.2 header (or looking the name up at run time: cffi, Julia) call.
void dsd_format_convert_options_init(dsd_format_convert_options* options) {
  if (options == nullptr) return;
  const dsd::interop::ConvertOptions d;
  *options = dsd_format_convert_options{};
  options->struct_size = sizeof(dsd_format_convert_options);
  options->overwrite = d.overwrite;
  options->thread_count = d.thread_count;
  options->max_shard_size = d.max_shard_size;
  options->select = nullptr;
  options->strip_prefix = d.strip_prefix;
  options->dtype = 0;
  options->dequantize = d.dequantize;
  options->materialize = false;
}

// dsd_format_convert_options_init@DSD_1.1, for programs linked against 1.1 (a 40-byte
// struct): fills that prefix only.
__attribute__((visibility("default"))) void compat_1_1_dsd_format_convert_options_init(
    dsd_format_convert_options* options) {
  dsd::capi::init_earlier_version(options, dsd::capi::kConvertOptionsSizeV1_1, &dsd_format_convert_options_init);
}
__asm__(".symver compat_1_1_dsd_format_convert_options_init, dsd_format_convert_options_init@DSD_1.1");

// dsd_format_convert_options_init@DSD_1: the 1.0 function, kept for programs linked against
// 1.0, whose struct is 24 bytes: it fills that prefix only (options.h). Its own name is local
// (capi/dsd.map); only the versioned alias is exported.
__attribute__((visibility("default"))) void compat_1_0_dsd_format_convert_options_init(
    dsd_format_convert_options* options) {
  dsd::capi::init_earlier_version(options, dsd::capi::kConvertOptionsSizeV1, &dsd_format_convert_options_init);
}
__asm__(".symver compat_1_0_dsd_format_convert_options_init, dsd_format_convert_options_init@DSD_1");

dsd_status dsd_format_detect(const char* path, dsd_format* out, dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    TRY(require(path, "path"));
    TRY(require(out, "out"));
    const auto f = TRY(dsd::interop::detect_format(path));
    *out = static_cast<dsd_format>(f);
    return dsd::ok();
  });
}

dsd_status dsd_format_inspect(const char* path, const dsd_checkpoint_load_options* options,
                              dsd_state_dict** out, dsd_error** err) {
  return guard(err, [&]() -> dsd::Status {
    TRY(require(path, "path"));
    TRY(require(out, "out"));
    dsd::DictPtr d = TRY(dsd::capi::inspect(path, options));
    *out = dsd::capi::wrap(dsd::Value(std::move(d)));
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
