// formats_tool: drives core/formats for test_formats.py, which compares its output with what
// the real PyTorch of .venv reads and writes. Every command prints one JSON document; on
// failure it prints {"error": {"code": ..., "message": ...}} and exits with 1.
//
//   torch-load FILE [OFFSET LENGTH]       the Value tree of a torch.save archive
//   torch-locate FILE OFFSET LENGTH       a tensor archive's record, plus its raw bytes' hash
//   torch-save-roundtrip IN OUT [--ordered] [--no-crc]
//                                         torch_load(IN), then torch_save to OUT
//   dcp-metadata DIR                      DIR/.metadata as JSON
//   dcp-metadata-roundtrip DIR OUT        parse DIR/.metadata, serialize it to OUT
//   dcp-read DIR                          every item of a DCP checkpoint, nested again
//   dcp-write IN DIR [--chunks N] [--files M]
//                                         the Value tree of torch.save file IN written as a
//                                         DCP checkpoint: tensors split in N chunks along dim 0,
//                                         items spread over M .distcp files
//   pickle-load FILE (torch|dcp)          a raw pickle read with one of the allow-lists
#include <ATen/ops/empty.h>
#include <fcntl.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iostream>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <unordered_map>
#include <vector>

#include "core/base/make_error.h"
#include "core/formats/dcp_chunks.h"
#include "core/formats/dcp_metadata.h"
#include "core/formats/pickle.h"
#include "core/formats/torch_save.h"
#include "core/statedict/flatten.h"
#include "core/tensor/dtype_torch.h"

namespace {

using nlohmann::json;
using dsd::Code;
using dsd::Result;
using dsd::Status;
using dsd::Value;

[[noreturn]] void fail(const dsd::Error& e) {
  json out = {{"error", {{"code", std::string(dsd::code_name(e.code))}, {"message", e.message}}}};
  std::cout << out.dump() << std::endl;
  std::exit(1);
}

template <class T>
T check(Result<T> r) {
  if (!r.ok()) fail(r.error());
  return std::move(r).value();
}
void check(Status s) {
  if (!s.ok()) fail(s.error());
}

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) fail(dsd::make_error(Code::kIo, "cannot open '{}'", path));
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

void write_file(const std::string& path, std::string_view bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  if (!out) fail(dsd::make_error(Code::kIo, "cannot write '{}'", path));
}

uint64_t fnv1a(const void* data, size_t n) {
  uint64_t h = 1469598103934665603ull;
  const auto* p = static_cast<const unsigned char*>(data);
  for (size_t i = 0; i < n; ++i) {
    h ^= p[i];
    h *= 1099511628211ull;
  }
  return h;
}

std::string hex64(uint64_t v) { return fmt::format("{:016x}", v); }

std::string hex_bytes(std::string_view s) {
  std::string out;
  for (unsigned char c : s) out += fmt::format("{:02x}", c);
  return out;
}

// ---- Value -> JSON (the tagged form test_formats.py builds from Python objects too) ----------

class Describer {
 public:
  json value(const Value& v) {
    switch (v.kind()) {
      case dsd::Kind::kNone: return nullptr;
      case dsd::Kind::kBool: return *v.if_bool();
      case dsd::Kind::kInt: return *v.if_int();
      case dsd::Kind::kDouble: {
        const double d = *v.if_double();
        if (std::isnan(d)) return {{"float", "nan"}};
        if (std::isinf(d)) return {{"float", d > 0 ? "inf" : "-inf"}};
        return {{"float", d}};
      }
      case dsd::Kind::kString: return *v.if_string();
      case dsd::Kind::kBytes: return {{"bytes", hex_bytes(v.if_bytes()->data)}};
      case dsd::Kind::kTensor: return tensor(v.if_tensor()->tensor);
      case dsd::Kind::kList: {
        json items = json::array();
        for (const Value& item : v.if_list()->items()) items.push_back(value(item));
        return {{v.if_list()->is_tuple() ? "tuple" : "list", items}};
      }
      case dsd::Kind::kDict: {
        json items = json::array();
        for (const auto& [k, item] : *v.if_dict()) items.push_back(json::array({k, value(item)}));
        return {{"dict", items}, {"int_keys", v.if_dict()->int_keys()}};
      }
    }
    return nullptr;
  }

  json tensor(const at::Tensor& t) {
    const void* impl = t.storage().unsafeGetStorageImpl();
    auto [it, inserted] = storage_ids_.try_emplace(impl, storage_ids_.size());
    const at::Tensor c = t.contiguous();
    return {{"tensor",
             {{"dtype", std::string(dsd::dtype_name(check(dsd::dtype_from_scalar_type(t.scalar_type()))))},
              {"shape", t.sizes().vec()},
              {"stride", t.strides().vec()},
              {"storage_offset", t.storage_offset()},
              {"storage", it->second},
              {"fnv", hex64(fnv1a(c.const_data_ptr(), c.nbytes()))}}}};
  }

 private:
  std::unordered_map<const void*, size_t> storage_ids_;
};

json path_json(const dsd::Path& path) {
  json out = json::array();
  for (const auto& s : path) {
    if (const auto* k = s.if_key()) {
      out.push_back(*k);
    } else {
      out.push_back(*s.if_index());
    }
  }
  return out;
}

json opt(const std::optional<std::string>& s) { return s ? json(*s) : json(nullptr); }

json metadata_json(const dsd::dcp::Metadata& m) {
  json sd = json::array();
  for (const auto& [fqn, md] : m.state_dict_metadata) {
    if (const auto* t = std::get_if<dsd::dcp::TensorStorageMetadata>(&md)) {
      json chunks = json::array();
      for (const auto& c : t->chunks) chunks.push_back({{"offsets", c.offsets}, {"sizes", c.sizes}});
      sd.push_back(json::array({fqn,
                                {{"tensor",
                                  {{"dtype", std::string(dsd::dtype_name(t->properties.dtype))},
                                   {"layout", t->properties.layout},
                                   {"requires_grad", t->properties.requires_grad},
                                   {"memory_format", t->properties.memory_format},
                                   {"pin_memory", t->properties.pin_memory},
                                   {"size", t->size},
                                   {"chunks", chunks}}}}}));
    } else {
      sd.push_back(json::array({fqn, {{"bytes", json::object()}}}));
    }
  }
  json planner = nullptr;
  if (m.planner_data) {
    planner = json::array();
    for (const auto& [fqn, path] : *m.planner_data) planner.push_back(json::array({fqn, path_json(path)}));
  }
  json storage = json::array();
  for (const auto& [index, info] : m.storage_data) {
    json descriptors = nullptr;
    if (info.transform_descriptors) descriptors = *info.transform_descriptors;
    storage.push_back(json::array({{{"fqn", index.fqn},
                                    {"offset", index.offset ? json(*index.offset) : json(nullptr)},
                                    {"index", index.index ? json(*index.index) : json(nullptr)}},
                                   {{"relative_path", info.relative_path},
                                    {"offset", info.offset},
                                    {"length", info.length},
                                    {"transform_descriptors", descriptors}}}));
  }
  json meta = nullptr;
  if (m.storage_meta) {
    meta = {{"checkpoint_id", opt(m.storage_meta->checkpoint_id)},
            {"save_id", opt(m.storage_meta->save_id)},
            {"load_id", opt(m.storage_meta->load_id)},
            {"modules", m.storage_meta->modules}};
  }
  return {{"version", opt(m.version)},
          {"state_dict_metadata", sd},
          {"planner_data", planner},
          {"storage_data", storage},
          {"storage_meta", meta}};
}

// ---- DCP reading: every item, tensors assembled from their chunks ---------------------------

// Reads `n` bytes at `offset` of `path` into `dst` with pread: the raw path a loader takes.
void pread_exact(const std::string& path, uint64_t offset, void* dst, size_t n) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) fail(dsd::make_error(Code::kIo, "cannot open '{}'", path));
  size_t done = 0;
  while (done < n) {
    const ssize_t r = ::pread(fd, static_cast<char*>(dst) + done, n - done, static_cast<off_t>(offset + done));
    if (r <= 0) fail(dsd::make_error(Code::kIo, "short read of '{}'", path));
    done += static_cast<size_t>(r);
  }
  ::close(fd);
}

const dsd::dcp::StorageInfo& find_storage(const dsd::dcp::Metadata& m, const std::string& fqn,
                                          const std::optional<std::vector<int64_t>>& offset) {
  for (const auto& [index, info] : m.storage_data) {
    if (index.fqn == fqn && index.offset == offset) return info;
  }
  fail(dsd::make_error(Code::kNotFound, "no storage for '{}'", fqn));
}

at::Tensor assemble(const std::string& dir, const dsd::dcp::Metadata& m, const std::string& fqn,
                    const dsd::dcp::TensorStorageMetadata& md) {
  at::Tensor full = at::empty(md.size, at::TensorOptions().dtype(dsd::to_scalar_type(md.properties.dtype)));
  for (const auto& chunk : md.chunks) {
    const auto& info = find_storage(m, fqn, chunk.offsets);
    const std::string path = dir + "/" + info.relative_path;
    // The raw way: locate the bytes, read them straight into a buffer...
    const dsd::TorchTensorRecord rec = check(dsd::dcp::locate_tensor_chunk(path, info));
    if (!rec.is_contiguous() || rec.big_endian || rec.conj || rec.neg || rec.sizes != chunk.sizes ||
        rec.dtype != md.properties.dtype) {
      fail(dsd::make_error(Code::kCorrupt, "chunk of '{}' is not a plain contiguous chunk", fqn));
    }
    at::Tensor raw = at::empty(chunk.sizes, full.options());
    pread_exact(path, rec.storage_data_offset + rec.storage_offset * dsd::element_size(rec.dtype),
                raw.data_ptr(), raw.nbytes());
    // ...and the torch_load way; both must agree.
    const at::Tensor loaded = check(dsd::dcp::read_tensor_chunk(path, info));
    if (!dsd::tensor_bitwise_equal(raw, loaded)) {
      fail(dsd::make_error(Code::kCorrupt, "raw and loaded chunk of '{}' differ", fqn));
    }
    at::Tensor dst = full;
    for (size_t d = 0; d < chunk.offsets.size(); ++d) {
      dst = dst.narrow(static_cast<int64_t>(d), chunk.offsets[d], chunk.sizes[d]);
    }
    dst.copy_(raw);
  }
  return full;
}

json dcp_read(const std::string& dir) {
  const dsd::dcp::Metadata m = check(dsd::dcp::parse_metadata(read_file(dir + "/.metadata")));
  dsd::Dict flat;
  for (const auto& [fqn, md] : m.state_dict_metadata) {
    if (const auto* t = std::get_if<dsd::dcp::TensorStorageMetadata>(&md)) {
      flat.set(fqn, Value(assemble(dir, m, fqn, *t)));
    } else {
      const auto& info = find_storage(m, fqn, std::nullopt);
      flat.set(fqn, check(dsd::dcp::read_bytes_item(dir + "/" + info.relative_path, info)));
    }
  }
  std::vector<std::pair<std::string, dsd::Path>> mapping;
  if (m.planner_data) {
    for (const auto& [fqn, path] : *m.planner_data) mapping.emplace_back(fqn, path);
  }
  dsd::DictPtr nested = check(dsd::unflatten_state_dict(flat, mapping));
  Describer describer;
  return describer.value(Value(nested));
}

// ---- DCP writing --------------------------------------------------------------------------

struct DataFile {
  std::string name;
  std::string bytes;  // built in memory: the test checkpoints are small
};

dsd::ByteSink append_to(std::string& out) {
  return [&out](const void* data, size_t n) {
    out.append(static_cast<const char*>(data), n);
    return dsd::ok();
  };
}

void dcp_write(const std::string& in, const std::string& dir, int64_t chunks, size_t files) {
  const Value root = check(dsd::torch_load(dsd::TorchArchive::file(in)));
  if (!root.is_dict()) fail(dsd::make_error(Code::kWrongKind, "'{}' does not hold a dict", in));
  const dsd::FlatStateDict flat = check(dsd::flatten_state_dict(*root.if_dict()));

  std::vector<DataFile> data(files);
  for (size_t i = 0; i < files; ++i) data[i].name = fmt::format("__{}_0.distcp", i);
  size_t next_file = 0;
  dsd::dcp::Metadata m;
  const auto put = [&](dsd::dcp::MetadataIndex index, auto&& write) {
    DataFile& f = data[next_file++ % files];
    const auto offset = static_cast<int64_t>(f.bytes.size());
    const uint64_t length = check(write(append_to(f.bytes)));
    m.storage_data.emplace_back(std::move(index),
                                dsd::dcp::StorageInfo{f.name, offset, static_cast<int64_t>(length), std::nullopt});
  };
  // DCP writes the BYTE_IO items of a file first, then its tensors.
  for (const auto& [key, v] : *flat.flat) {
    if (v.is_tensor()) continue;
    m.state_dict_metadata.emplace_back(key, dsd::dcp::BytesStorageMetadata{});
    put({key, std::nullopt, std::nullopt}, [&](const dsd::ByteSink& sink) { return dsd::dcp::write_bytes_item(v, sink); });
  }
  for (const auto& [key, v] : *flat.flat) {
    if (!v.is_tensor()) continue;
    const at::Tensor& t = v.if_tensor()->tensor;
    dsd::dcp::TensorStorageMetadata md;
    md.properties.dtype = check(dsd::dtype_from_scalar_type(t.scalar_type()));
    md.size = t.sizes().vec();
    // torch.chunk along dim 0 (a scalar or an empty dim 0 stays one chunk).
    std::vector<at::Tensor> parts = {t};
    if (t.dim() > 0 && t.size(0) > 1 && chunks > 1) parts = t.chunk(chunks, 0);
    int64_t row = 0;
    for (size_t i = 0; i < parts.size(); ++i) {
      std::vector<int64_t> offsets(static_cast<size_t>(t.dim()), 0);
      if (t.dim() > 0) offsets[0] = row;
      md.chunks.push_back({offsets, parts[i].sizes().vec()});
      put({key, offsets, static_cast<int64_t>(i)},
          [&](const dsd::ByteSink& sink) { return dsd::dcp::write_tensor_chunk(parts[i], sink); });
      if (t.dim() > 0) row += parts[i].size(0);
    }
    m.state_dict_metadata.emplace_back(key, std::move(md));
  }
  m.planner_data = flat.mapping;
  m.storage_meta = dsd::dcp::StorageMeta{dir, "dsd-formats-tool", std::nullopt, {}};
  m.version = std::string(dsd::dcp::kCurrentVersion);
  for (const DataFile& f : data) write_file(dir + "/" + f.name, f.bytes);
  write_file(dir + "/.metadata", check(dsd::dcp::serialize_metadata(m)));
  std::cout << json{{"items", m.storage_data.size()}}.dump() << std::endl;
}

int usage() {
  std::cerr << "usage: formats_tool COMMAND ARGS (see the top of formats_tool.cpp)\n";
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  const std::vector<std::string> args(argv + 1, argv + argc);
  if (args.empty()) return usage();
  const std::string& cmd = args[0];
  const auto has_flag = [&](std::string_view flag) {
    for (const auto& a : args) {
      if (a == flag) return true;
    }
    return false;
  };
  const auto flag_value = [&](std::string_view flag, int64_t fallback) -> int64_t {
    for (size_t i = 0; i + 1 < args.size(); ++i) {
      if (args[i] == flag) return std::stoll(args[i + 1]);
    }
    return fallback;
  };

  if (cmd == "torch-load" && (args.size() == 2 || args.size() == 4)) {
    dsd::TorchArchive archive = dsd::TorchArchive::file(args[1]);
    if (args.size() == 4) archive = dsd::TorchArchive::range(args[1], std::stoull(args[2]), std::stoull(args[3]));
    const Value v = check(dsd::torch_load(archive));
    Describer describer;
    std::cout << describer.value(v).dump() << std::endl;
    return 0;
  }
  if (cmd == "torch-locate" && args.size() == 4) {
    const dsd::TorchTensorRecord rec = check(
        dsd::torch_locate_tensor(dsd::TorchArchive::range(args[1], std::stoull(args[2]), std::stoull(args[3]))));
    std::string raw(rec.storage_nbytes, '\0');
    pread_exact(args[1], std::stoull(args[2]) + rec.storage_data_offset, raw.data(), raw.size());
    std::cout << json{{"dtype", std::string(dsd::dtype_name(rec.dtype))},
                      {"shape", rec.sizes},
                      {"stride", rec.strides},
                      {"storage_offset", rec.storage_offset},
                      {"storage_nbytes", rec.storage_nbytes},
                      {"contiguous", rec.is_contiguous()},
                      {"storage_fnv", hex64(fnv1a(raw.data(), raw.size()))}}
                     .dump()
              << std::endl;
    return 0;
  }
  if (cmd == "torch-save-roundtrip" && args.size() >= 3) {
    const Value v = check(dsd::torch_load(dsd::TorchArchive::file(args[1])));
    dsd::TorchSaveOptions options;
    options.ordered_dict = has_flag("--ordered");
    options.compute_crc32 = !has_flag("--no-crc");
    check(dsd::torch_save(v, args[2], options));
    std::cout << json{{"ok", true}}.dump() << std::endl;
    return 0;
  }
  if (cmd == "dcp-metadata" && args.size() == 2) {
    const auto m = check(dsd::dcp::parse_metadata(read_file(args[1] + "/.metadata")));
    std::cout << metadata_json(m).dump() << std::endl;
    return 0;
  }
  if (cmd == "dcp-metadata-roundtrip" && args.size() == 3) {
    const auto m = check(dsd::dcp::parse_metadata(read_file(args[1] + "/.metadata")));
    const std::string bytes = check(dsd::dcp::serialize_metadata(m));
    write_file(args[2], bytes);
    // Reading our own output back must give the same struct.
    if (!(check(dsd::dcp::parse_metadata(bytes)) == m)) {
      fail(dsd::make_error(Code::kInternal, "metadata changed in the round trip"));
    }
    std::cout << json{{"ok", true}}.dump() << std::endl;
    return 0;
  }
  if (cmd == "dcp-read" && args.size() == 2) {
    std::cout << dcp_read(args[1]).dump() << std::endl;
    return 0;
  }
  if (cmd == "dcp-write" && args.size() >= 3) {
    dcp_write(args[1], args[2], flag_value("--chunks", 1), static_cast<size_t>(flag_value("--files", 1)));
    return 0;
  }
  if (cmd == "pickle-load" && args.size() == 3) {
    dsd::PickleReadOptions options;
    options.allow = args[2] == "dcp" ? &dsd::dcp::metadata_allow_list() : &dsd::torch_save_allow_list();
    options.allow_persistent_ids = args[2] == "torch";
    const dsd::PickleValue v = check(dsd::pickle_loads(read_file(args[1]), options));
    std::cout << json{{"repr", dsd::pickle_repr(v, 200)}}.dump() << std::endl;
    return 0;
  }
  return usage();
}
