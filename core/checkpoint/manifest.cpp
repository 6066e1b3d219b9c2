#include "core/checkpoint/manifest.h"

#include <algorithm>
#include <charconv>
#include <limits>
#include <set>
#include <unordered_map>
#include <unordered_set>

#include "core/base/json_limits.h"
#include "core/base/make_error.h"
#include "core/base/strings.h"
#include "core/checkpoint/box_overlap.h"

namespace dsd::checkpoint {
namespace {

using nlohmann::json;

constexpr std::string_view kFormatName = "dsd-checkpoint";
constexpr int kMaxValueDepth = 64;
// The manifest's own envelope is 4 levels deep (object, entries, entry, value); a value
// nests up to kMaxValueDepth containers, each at most 3 JSON levels ({"dict": [[k, v]]}).
constexpr int kMaxManifestJsonDepth = 4 + 3 * kMaxValueDepth + 4;

std::optional<int64_t> as_i64(const json& j) {
  if (j.is_number_integer() && !j.is_number_unsigned()) return j.get<int64_t>();
  if (j.is_number_unsigned() && j.get<uint64_t>() <= static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
    return static_cast<int64_t>(j.get<uint64_t>());
  }
  return std::nullopt;
}

std::optional<uint64_t> as_u64(const json& j) {
  if (j.is_number_unsigned()) return j.get<uint64_t>();
  if (j.is_number_integer() && j.get<int64_t>() >= 0) return static_cast<uint64_t>(j.get<int64_t>());
  return std::nullopt;
}

// Field readers: each names the field and what it belongs to in its error.
const json* field(const json& obj, std::string_view name) {
  auto it = obj.find(name);
  return it == obj.end() ? nullptr : &*it;
}

Error bad(std::string_view source, std::string_view where, std::string_view what) {
  return make_error_at(Code::kCorrupt, std::string(where), "{}: {} {}", source, where, what);
}

Result<std::string> get_string(const json& obj, std::string_view name, std::string_view source,
                               std::string_view where) {
  const json* f = field(obj, name);
  if (f == nullptr || !f->is_string()) {
    return bad(source, where, fmt::format("has no string '{}'", name));
  }
  return f->get<std::string>();
}

Result<int64_t> get_i64(const json& obj, std::string_view name, std::string_view source,
                        std::string_view where) {
  const json* f = field(obj, name);
  auto v = f ? as_i64(*f) : std::nullopt;
  if (!v) return bad(source, where, fmt::format("has no integer '{}'", name));
  return *v;
}

Result<uint64_t> get_u64(const json& obj, std::string_view name, std::string_view source,
                         std::string_view where) {
  const json* f = field(obj, name);
  auto v = f ? as_u64(*f) : std::nullopt;
  if (!v) return bad(source, where, fmt::format("has no non-negative integer '{}'", name));
  return *v;
}

Result<std::vector<int64_t>> get_dims(const json& obj, std::string_view name,
                                      std::string_view source, std::string_view where) {
  const json* f = field(obj, name);
  if (f == nullptr || !f->is_array()) return bad(source, where, fmt::format("has no array '{}'", name));
  std::vector<int64_t> out;
  for (const json& d : *f) {
    auto v = as_i64(d);
    if (!v || *v < 0) {
      return bad(source, where, fmt::format("has a negative or non-integer entry in '{}'", name));
    }
    out.push_back(*v);
  }
  return out;
}

Result<uint64_t> get_hex(const json& j, std::string_view source, std::string_view where) {
  if (!j.is_string()) return bad(source, where, "has a checksum that is not a hex string");
  auto v = parse_hex64(j.get_ref<const std::string&>());
  if (!v) return bad(source, where, "has a checksum that is not 16 hex digits");
  return *v;
}

Result<ChunkRecord> parse_chunk(const json& j, std::string_view source, const std::string& key) {
  if (!j.is_object()) return bad(source, key, "has a chunk that is not an object");
  ChunkRecord c;
  c.offsets = TRY(get_dims(j, "offsets", source, key));
  c.sizes = TRY(get_dims(j, "sizes", source, key));
  c.file = TRY(get_string(j, "file", source, key));
  c.begin = TRY(get_u64(j, "begin", source, key));
  c.end = TRY(get_u64(j, "end", source, key));
  const json* h = field(j, "xxh3");
  if (h == nullptr) return bad(source, key, "has a chunk without 'xxh3'");
  c.xxh3 = TRY(get_hex(*h, source, key));
  const json* blocks = field(j, "blocks");
  if (blocks == nullptr || !blocks->is_array()) return bad(source, key, "has a chunk without 'blocks'");
  for (const json& b : *blocks) c.blocks.push_back(TRY(get_hex(b, source, key)));
  return c;
}

Result<Entry> parse_entry(const json& j, std::string_view source) {
  if (!j.is_object()) return bad(source, "entries", "holds an entry that is not an object");
  Entry e;
  e.key = TRY(get_string(j, "key", source, "an entry"));
  const json* path = field(j, "path");
  if (path == nullptr || !path->is_array() || path->empty()) {
    return bad(source, e.key, "has no non-empty 'path'");
  }
  auto parsed = path_from_json(*path);
  if (!parsed) return bad(source, e.key, "has a path item that is neither a string nor an integer");
  e.path = std::move(*parsed);
  const std::string kind = TRY(get_string(j, "kind", source, e.key));
  if (kind == "value") {
    e.kind = Entry::Kind::kValue;
    const json* v = field(j, "value");
    if (v == nullptr) return bad(source, e.key, "has no 'value'");
    e.value = *v;
    return e;
  }
  if (kind != "tensor") return bad(source, e.key, fmt::format("has an unknown kind '{}'", kind));
  e.kind = Entry::Kind::kTensor;
  const std::string dtype = TRY(get_string(j, "dtype", source, e.key));
  auto dt = dtype_from_name(dtype);
  if (!dt) return bad(source, e.key, fmt::format("has an unknown dtype '{}'", dtype));
  e.dtype = *dt;
  e.shape = TRY(get_dims(j, "shape", source, e.key));
  const json* chunks = field(j, "chunks");
  if (chunks == nullptr || !chunks->is_array()) return bad(source, e.key, "has no 'chunks' array");
  for (const json& c : *chunks) e.chunks.push_back(TRY(parse_chunk(c, source, e.key)));
  return e;
}

// numel of `dims`, or nullopt when it overflows int64.
std::optional<int64_t> checked_numel(const std::vector<int64_t>& dims) {
  int64_t n = 1;
  for (int64_t d : dims) {
    if (d != 0 && n > std::numeric_limits<int64_t>::max() / d) return std::nullopt;
    n *= d;
  }
  return n;
}

Status validate_tensor(const Manifest& m, const Entry& e,
                       const std::unordered_map<std::string, const FileRecord*>& files) {
  const auto numel = checked_numel(e.shape);
  if (!numel) return make_error_at(Code::kCorrupt, e.key, "tensor '{}' has an overflowing shape", e.key);
  int64_t covered = 0;
  const uint64_t esize = element_size(e.dtype);
  for (const ChunkRecord& c : e.chunks) {
    if (c.offsets.size() != e.shape.size() || c.sizes.size() != e.shape.size()) {
      return make_error_at(Code::kCorrupt, e.key, "tensor '{}' has a chunk of rank {} for a {}-d tensor",
                           e.key, c.sizes.size(), e.shape.size());
    }
    for (size_t d = 0; d < e.shape.size(); ++d) {
      if (c.offsets[d] < 0 || c.sizes[d] < 0 || c.offsets[d] > e.shape[d] ||
          c.sizes[d] > e.shape[d] - c.offsets[d]) {
        return make_error_at(Code::kCorrupt, e.key, "tensor '{}' has a chunk outside its shape",
                             e.key);
      }
    }
    const int64_t n = *checked_numel(c.sizes);  // bounded by the shape's numel
    covered += n;
    auto f = files.find(c.file);
    if (f == files.end()) {
      return make_error_at(Code::kCorrupt, e.key, "tensor '{}' names a data file '{}' not in the manifest",
                           e.key, c.file);
    }
    if (c.begin > c.end || c.end > f->second->size) {
      return make_error_at(Code::kCorrupt, e.key,
                           "tensor '{}' has a byte range [{}, {}) outside '{}' of {} bytes", e.key,
                           c.begin, c.end, c.file, f->second->size);
    }
    if (static_cast<unsigned __int128>(n) * esize != c.end - c.begin) {
      return make_error_at(Code::kCorrupt, e.key,
                           "tensor '{}' has a chunk of {} elements stored in {} bytes", e.key, n,
                           c.end - c.begin);
    }
    if (c.blocks.size() != block_count(c.end - c.begin, m.block_size)) {
      return make_error_at(Code::kCorrupt, e.key,
                           "tensor '{}' has {} block checksums for {} bytes", e.key,
                           c.blocks.size(), c.end - c.begin);
    }
  }
  std::vector<const ChunkRecord*> boxes;
  boxes.reserve(e.chunks.size());
  for (const ChunkRecord& c : e.chunks) boxes.push_back(&c);
  if (find_overlapping_boxes(boxes, e.shape.size())) {
    return make_error_at(Code::kCorrupt, e.key, "tensor '{}' has overlapping chunks", e.key);
  }
  if (covered != *numel) {
    return make_error_at(Code::kCorrupt, e.key,
                         "tensor '{}' has chunks covering {} of its {} elements", e.key, covered,
                         *numel);
  }
  return ok();
}

Status check_value_rec(const json& v, std::string_view key, int depth) {
  auto corrupt = [&](std::string_view what) {
    return make_error_at(Code::kCorrupt, std::string(key), "value '{}' {}", key, what);
  };
  if (depth > kMaxValueDepth) return corrupt("is nested too deeply");
  if (v.is_null() || v.is_boolean() || v.is_number() || v.is_string()) {
    if (v.is_number_unsigned() && !as_i64(v)) return corrupt("holds an integer beyond int64");
    return ok();
  }
  if (v.is_array()) {
    for (const json& x : v) TRY(check_value_rec(x, key, depth + 1));
    return ok();
  }
  if (!v.is_object()) return corrupt("has an unknown JSON type");
  if (v.size() == 1 && v.contains("double")) {
    const json& d = v["double"];
    if (!d.is_string()) return corrupt("has a bad special double");
    const auto& s = d.get_ref<const std::string&>();
    if (s != "nan" && s != "inf" && s != "-inf") return corrupt("has a bad special double");
    return ok();
  }
  if (v.size() == 1 && (v.contains("bytes") || v.contains("string_b64"))) {
    const json& b = v.begin().value();
    if (!b.is_string() || !base64_decode(b.get_ref<const std::string&>())) {
      return corrupt("has bytes that are not base64");
    }
    return ok();
  }
  if (v.size() == 1 && v.contains("tuple")) {
    if (!v["tuple"].is_array()) return corrupt("has a tuple that is not an array");
    for (const json& x : v["tuple"]) TRY(check_value_rec(x, key, depth + 1));
    return ok();
  }
  if (v.contains("dict") && v.contains("int_keys") && v.size() == 2) {
    if (!v["dict"].is_array() || !v["int_keys"].is_boolean()) return corrupt("has a bad dict");
    std::set<std::string> keys;
    for (const json& kv : v["dict"]) {
      if (!kv.is_array() || kv.size() != 2 || !kv[0].is_string()) return corrupt("has a bad dict item");
      if (!keys.insert(kv[0].get<std::string>()).second) return corrupt("has a dict with a repeated key");
      TRY(check_value_rec(kv[1], key, depth + 1));
    }
    return ok();
  }
  return corrupt("has an unknown tagged object");
}

// No entry may sit inside another's subtree: ["model"] beside ["model", "w"] would replace
// the tensors under "model" by one leaf when the nested state dict is rebuilt.
Status check_path_collisions(const Manifest& m) {
  std::set<Path> leaves;
  for (const Entry& e : m.entries) {
    if (!leaves.insert(e.path).second) {
      return make_error_at(Code::kCorrupt, e.key, "key '{}' has the same path as another entry", e.key);
    }
  }
  for (const Entry& e : m.entries) {
    Path prefix;
    for (size_t i = 0; i + 1 < e.path.size(); ++i) {
      prefix.push_back(e.path[i]);
      if (leaves.count(prefix)) {
        return make_error_at(Code::kCorrupt, e.key, "key '{}' lies inside entry '{}', which is a leaf", e.key,
                             join_path(prefix));
      }
    }
  }
  return ok();
}

}  // namespace

const Entry* Manifest::find(std::string_view key) const {
  for (const Entry& e : entries) {
    if (e.key == key) return &e;
  }
  return nullptr;
}

const FileRecord* Manifest::file(std::string_view name) const {
  for (const FileRecord& f : files) {
    if (f.name == name) return &f;
  }
  return nullptr;
}

bool Manifest::has_references() const {
  return std::any_of(files.begin(), files.end(), [](const FileRecord& f) { return f.referenced(); });
}

std::string data_file_path(const std::string& dir, const FileRecord& f) {
  if (!f.referenced()) return fmt::format("{}/{}", dir, f.name);
  return fmt::format("{}/../{}/{}", dir, f.checkpoint, f.name);
}

json path_to_json(const Path& path) {
  json out = json::array();
  for (const PathSegment& p : path) {
    if (const auto* k = p.if_key()) out.push_back(*k);
    else out.push_back(*p.if_index());
  }
  return out;
}

std::optional<Path> path_from_json(const json& j) {
  if (!j.is_array()) return std::nullopt;
  Path out;
  for (const json& x : j) {
    if (x.is_string()) out.emplace_back(x.get<std::string>());
    else if (auto i = as_i64(x)) out.emplace_back(*i);
    else return std::nullopt;
  }
  return out;
}

uint64_t block_count(uint64_t nbytes, uint64_t block_size) {
  return nbytes == 0 ? 0 : (nbytes - 1) / block_size + 1;
}

bool is_plain_file_name(std::string_view name) {
  if (name.empty() || name == "." || name == ".." || name.size() > 255) return false;
  return name.find('/') == std::string_view::npos && name.find('\0') == std::string_view::npos &&
         name.find('\\') == std::string_view::npos;
}

Status check_value_json(const json& v, std::string_view key) { return check_value_rec(v, key, 0); }

namespace {

// manifest_to_json writes the text nlohmann's dump(1) would give for the manifest's JSON
// tree without building the tree: at 16k ranks a manifest has ~17M chunks, whose tree would
// take tens of GB. Small parts (paths, values, file records) still go through nlohmann.
class ManifestWriter {
 public:
  explicit ManifestWriter(std::string& out) : out_(out) {}

  void indent(int level) { out_.append(static_cast<size_t>(level), ' '); }
  // A value as dump(1) prints it nested `level` deep (its inner lines indented further).
  void value(const nlohmann::ordered_json& v, int level) {
    const std::string text = v.dump(1);
    for (char c : text) {
      out_ += c;
      if (c == '\n') indent(level);
    }
  }
  void key(std::string_view name, int level) {
    indent(level);
    out_ += '"';
    out_ += name;  // the manifest's own field names, nothing to escape
    out_ += "\": ";
  }
  void string(const std::string& s) {
    auto [it, fresh] = escaped_.try_emplace(s);
    if (fresh) it->second = nlohmann::ordered_json(s).dump();
    out_ += it->second;
  }
  template <class Int>
  void number(Int v) {
    char buf[24];
    auto r = std::to_chars(buf, buf + sizeof buf, v);
    out_.append(buf, r.ptr);
  }
  void dims(const std::vector<int64_t>& v, int level) {
    if (v.empty()) {
      out_ += "[]";
      return;
    }
    out_ += "[\n";
    for (size_t i = 0; i < v.size(); ++i) {
      indent(level + 1);
      number(v[i]);
      out_ += i + 1 < v.size() ? ",\n" : "\n";
    }
    indent(level);
    out_ += ']';
  }
  void hex(uint64_t v) {
    out_ += '"';
    out_ += hex64(v);
    out_ += '"';
  }
  // One chunk record, an element of "chunks" at `level`.
  void chunk(const ChunkRecord& c, int level) {
    indent(level);
    out_ += "{\n";
    key("offsets", level + 1);
    dims(c.offsets, level + 1);
    out_ += ",\n";
    key("sizes", level + 1);
    dims(c.sizes, level + 1);
    out_ += ",\n";
    key("file", level + 1);
    string(c.file);
    out_ += ",\n";
    key("begin", level + 1);
    number(c.begin);
    out_ += ",\n";
    key("end", level + 1);
    number(c.end);
    out_ += ",\n";
    key("xxh3", level + 1);
    hex(c.xxh3);
    out_ += ",\n";
    key("blocks", level + 1);
    if (c.blocks.empty()) {
      out_ += "[]";
    } else {
      out_ += "[\n";
      for (size_t i = 0; i < c.blocks.size(); ++i) {
        indent(level + 2);
        hex(c.blocks[i]);
        out_ += i + 1 < c.blocks.size() ? ",\n" : "\n";
      }
      indent(level + 1);
      out_ += ']';
    }
    out_ += '\n';
    indent(level);
    out_ += '}';
  }
  void entry(const Entry& e, int level) {
    indent(level);
    out_ += "{\n";
    key("key", level + 1);
    string(e.key);
    out_ += ",\n";
    key("path", level + 1);
    value(nlohmann::ordered_json(path_to_json(e.path)), level + 1);
    out_ += ",\n";
    key("kind", level + 1);
    if (e.kind == Entry::Kind::kValue) {
      out_ += "\"value\",\n";
      key("value", level + 1);
      value(nlohmann::ordered_json::parse(e.value.dump()), level + 1);
    } else {
      out_ += "\"tensor\",\n";
      key("dtype", level + 1);
      out_ += '"';
      out_ += dtype_name(e.dtype);
      out_ += "\",\n";
      key("shape", level + 1);
      dims(e.shape, level + 1);
      out_ += ",\n";
      key("chunks", level + 1);
      if (e.chunks.empty()) {
        out_ += "[]";
      } else {
        out_ += "[\n";
        for (size_t i = 0; i < e.chunks.size(); ++i) {
          chunk(e.chunks[i], level + 2);
          out_ += i + 1 < e.chunks.size() ? ",\n" : "\n";
        }
        indent(level + 1);
        out_ += ']';
      }
    }
    out_ += '\n';
    indent(level);
    out_ += '}';
  }

 private:
  std::string& out_;
  std::unordered_map<std::string, std::string> escaped_;
};

}  // namespace

std::string manifest_to_json(const Manifest& m) {
  nlohmann::ordered_json head;
  head["format"] = kFormatName;
  head["format_version"] = m.has_references() ? kFormatVersionReferences : kFormatVersion;
  head["save_id"] = m.save_id;
  head["world_size"] = m.world_size;
  head["mesh"] = m.mesh_shape ? nlohmann::ordered_json{{"shape", *m.mesh_shape}} : nlohmann::ordered_json(nullptr);
  head["block_size"] = m.block_size;
  auto& files = head["files"] = nlohmann::ordered_json::array();
  for (const FileRecord& f : m.files) {
    files.push_back({{"name", f.name}, {"rank", f.rank}, {"size", f.size}});
    if (f.referenced()) files.back()["checkpoint"] = f.checkpoint;
  }
  auto& ikd = head["int_key_dicts"] = nlohmann::ordered_json::array();
  for (const auto& path : m.int_key_dicts) {
    ikd.push_back(nlohmann::ordered_json(path_to_json(path)));
  }
  // An upper bound of the text's size, reserved so that a manifest of gigabytes is not
  // copied at each doubling of the string (a transient 3x its size).
  size_t bound = head.dump(1).size() + 64;
  for (const Entry& e : m.entries) {
    bound += 256 + e.key.size() * 2 + 32 * e.path.size() + 24 * e.shape.size();
    if (e.kind == Entry::Kind::kValue) bound += e.value.dump(1).size() * 2;
    for (const ChunkRecord& c : e.chunks) {
      // 7 fields at depth 5, dims and blocks at depth 6 (<= 20 digits, 16 hex + quotes).
      bound += 7 * (6 + 12) + 2 * 8 + c.file.size() * 2 + 2 + 2 * 21 + 18 +
               (c.offsets.size() + c.sizes.size()) * (7 + 22) + c.blocks.size() * (7 + 20) + 16;
    }
  }
  std::string out;
  out.reserve(bound);
  ManifestWriter w(out);
  out += "{\n";
  for (const auto& field : head.items()) {
    w.key(field.key(), 1);
    w.value(field.value(), 1);
    out += ",\n";
  }
  w.key("entries", 1);
  if (m.entries.empty()) {
    out += "[]";
  } else {
    out += "[\n";
    for (size_t i = 0; i < m.entries.size(); ++i) {
      w.entry(m.entries[i], 2);
      out += i + 1 < m.entries.size() ? ",\n" : "\n";
    }
    w.indent(1);
    out += ']';
  }
  out += "\n}\n";
  return out;
}

Result<Manifest> parse_manifest(std::string_view text, std::string_view source) {
  const json j = TRY(parse_json_strict(text, source, kMaxManifestJsonDepth));
  if (!j.is_object()) {
    return make_error_at(Code::kCorrupt, std::string(source), "{} is not a JSON object", source);
  }
  const std::string format = TRY(get_string(j, "format", source, "the manifest"));
  if (format != kFormatName) {
    return make_error_at(Code::kCorrupt, std::string(source), "{} is not a dsd checkpoint manifest (format '{}')",
                         source, format);
  }
  Manifest m;
  const int64_t version = TRY(get_i64(j, "format_version", source, "the manifest"));
  if (version != kFormatVersion && version != kFormatVersionReferences) {
    return make_error_at(Code::kUnsupported, std::string(source),
                         "{} has format version {}; this dsd reads versions {} and {}", source, version,
                         kFormatVersion, kFormatVersionReferences);
  }
  m.format_version = static_cast<int>(version);
  m.save_id = TRY(get_string(j, "save_id", source, "the manifest"));
  m.world_size = TRY(get_i64(j, "world_size", source, "the manifest"));
  if (m.world_size < 1) return bad(source, "the manifest", "has a world size below 1");
  const json* mesh = field(j, "mesh");
  if (mesh != nullptr && !mesh->is_null()) {
    if (!mesh->is_object()) return bad(source, "the manifest", "has a mesh that is not an object");
    m.mesh_shape = TRY(get_dims(*mesh, "shape", source, "the mesh"));
  }
  m.block_size = TRY(get_u64(j, "block_size", source, "the manifest"));
  if (m.block_size == 0) return bad(source, "the manifest", "has a block size of 0");
  const json* files = field(j, "files");
  if (files == nullptr || !files->is_array()) return bad(source, "the manifest", "has no 'files' array");
  for (const json& f : *files) {
    if (!f.is_object()) return bad(source, "files", "holds an entry that is not an object");
    FileRecord r;
    r.name = TRY(get_string(f, "name", source, "a file record"));
    r.rank = TRY(get_i64(f, "rank", source, r.name));
    r.size = TRY(get_u64(f, "size", source, r.name));
    if (const json* c = field(f, "checkpoint"); c != nullptr) {
      if (version < kFormatVersionReferences) {
        return bad(source, r.name, "names a checkpoint directory in a format version 1 manifest");
      }
      r.checkpoint = TRY(get_string(f, "checkpoint", source, r.name));
    }
    m.files.push_back(std::move(r));
  }
  if (const json* ikd = field(j, "int_key_dicts"); ikd != nullptr) {
    if (!ikd->is_array()) return bad(source, "the manifest", "has an 'int_key_dicts' that is not an array");
    for (const json& p : *ikd) {
      if (!p.is_array()) return bad(source, "int_key_dicts", "holds a path that is not an array");
      auto path = path_from_json(p);
      if (!path) return bad(source, "int_key_dicts", "holds a path item that is neither a string nor an integer");
      m.int_key_dicts.push_back(std::move(*path));
    }
  }
  const json* entries = field(j, "entries");
  if (entries == nullptr || !entries->is_array()) return bad(source, "the manifest", "has no 'entries' array");
  for (const json& e : *entries) m.entries.push_back(TRY(parse_entry(e, source)));
  Status s = validate_manifest(m);
  if (!s.ok()) {
    Error e = std::move(s).error();
    e.message = fmt::format("{}: {}", source, e.message);
    return e;
  }
  return m;
}

Status validate_manifest(const Manifest& m) {
  std::unordered_map<std::string, const FileRecord*> files;
  for (const FileRecord& f : m.files) {
    if (!is_plain_file_name(f.name)) {
      return make_error_at(Code::kCorrupt, f.name,
                           "data file name '{}' is not a plain name inside the checkpoint directory",
                           f.name);
    }
    if (!files.emplace(f.name, &f).second) {
      return make_error_at(Code::kCorrupt, f.name, "data file '{}' is listed twice", f.name);
    }
    // A referenced file lives in a sibling checkpoint: a plain directory name, so a manifest
    // can point into the parent's children and nowhere else (no "..", no absolute path).
    if (f.referenced() && !is_plain_file_name(f.checkpoint)) {
      return make_error_at(Code::kCorrupt, f.name,
                           "data file '{}' names the checkpoint directory '{}', which is not a plain name of a "
                           "sibling directory",
                           f.name, f.checkpoint);
    }
  }
  std::unordered_set<std::string> keys;
  // Byte ranges per file, to catch two chunks claiming the same bytes.
  std::unordered_map<std::string, std::vector<std::pair<uint64_t, uint64_t>>> ranges;
  for (const Entry& e : m.entries) {
    if (!keys.insert(e.key).second) {
      return make_error_at(Code::kCorrupt, e.key, "key '{}' appears twice", e.key);
    }
    if (e.path.empty()) return make_error_at(Code::kCorrupt, e.key, "key '{}' has an empty path", e.key);
    if (join_path(e.path) != e.key) {
      return make_error_at(Code::kCorrupt, e.key, "key '{}' does not match its path '{}'", e.key,
                           join_path(e.path));
    }
    if (e.kind == Entry::Kind::kValue) {
      TRY(check_value_json(e.value, e.key));
      continue;
    }
    TRY(validate_tensor(m, e, files));
    for (const ChunkRecord& c : e.chunks) {
      if (c.end > c.begin) ranges[c.file].emplace_back(c.begin, c.end);
    }
  }
  TRY(check_path_collisions(m));
  for (auto& [file, rs] : ranges) {
    std::sort(rs.begin(), rs.end());
    for (size_t i = 1; i < rs.size(); ++i) {
      if (rs[i].first < rs[i - 1].second) {
        return make_error_at(Code::kCorrupt, file, "two chunks share bytes of data file '{}'", file);
      }
    }
  }
  return ok();
}

}  // namespace dsd::checkpoint
