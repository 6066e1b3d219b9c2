#include "core/formats/dcp_metadata.h"

#include <unordered_map>

#include "core/base/make_error.h"

namespace dsd::dcp {
namespace {

constexpr std::string_view kMetadataModule = "torch.distributed.checkpoint.metadata";
constexpr std::string_view kFilesystemModule = "torch.distributed.checkpoint.filesystem";

Error bad(std::string_view where, std::string_view what) {
  return make_error(Code::kCorrupt, "DCP metadata: {}: {}", where, what);
}

// ---- reading ------------------------------------------------------------------------------

// The class an object was made from: NEWOBJ's class, the class inside
// copyreg._reconstructor(cls, object, None) (protocols 0 and 1), or REDUCE's callable.
const PickleGlobal* class_of(const PickleObject& o) {
  if (o.via == PickleObject::Via::kReduce && o.is("copyreg", "_reconstructor")) {
    const PickleTuple* args = o.args.if_tuple();
    if (args == nullptr || args->items.empty()) return nullptr;
    return args->items[0].if_global();
  }
  return o.global();
}

// The object `v` if it is an instance of kMetadataModule/kFilesystemModule `name`.
Result<const PickleObject*> instance(const PickleValue& v, std::string_view module, std::string_view name,
                                     std::string_view where) {
  const PickleObject* o = v.if_object();
  const PickleGlobal* cls = o != nullptr ? class_of(*o) : nullptr;
  if (cls == nullptr || !cls->is(module, name)) {
    return bad(where, fmt::format("expected a {}, found {}", name, pickle_repr(v)));
  }
  return o;
}

// An instance's attributes: BUILD's dict, or the dict half of a (dict, slots) state.
Result<const PickleDict*> fields(const PickleObject& o, std::string_view where) {
  if (!o.state) return bad(where, "the object has no state");
  const PickleValue* state = &*o.state;
  if (const PickleTuple* t = state->if_tuple(); t != nullptr && t->items.size() == 2) {
    state = t->items[0].is_none() ? &t->items[1] : &t->items[0];
  }
  const PickleDict* d = state->if_dict();
  if (d == nullptr) return bad(where, fmt::format("the object's state is {}, not a dict", pickle_repr(*state)));
  return d;
}

Result<std::string> get_str(const PickleValue* v, std::string_view where) {
  if (v == nullptr || v->if_str() == nullptr) {
    return bad(where, fmt::format("expected a str, found {}", v != nullptr ? pickle_repr(*v) : "nothing"));
  }
  return *v->if_str();
}

Result<std::optional<std::string>> get_opt_str(const PickleValue* v, std::string_view where) {
  if (v == nullptr || v->is_none()) return std::optional<std::string>();
  return std::optional(TRY(get_str(v, where)));
}

Result<int64_t> get_int(const PickleValue* v, std::string_view where) {
  if (v == nullptr || v->if_int() == nullptr) {
    return bad(where, fmt::format("expected an int, found {}", v != nullptr ? pickle_repr(*v) : "nothing"));
  }
  return *v->if_int();
}

Result<bool> get_bool(const PickleValue& v, std::string_view where) {
  if (v.if_bool() == nullptr) return bad(where, fmt::format("expected a bool, found {}", pickle_repr(v)));
  return *v.if_bool();
}

// torch.Size((2, 3)) or a plain tuple of ints.
Result<std::vector<int64_t>> get_size(const PickleValue* v, std::string_view where) {
  const std::vector<PickleValue>* items = nullptr;
  if (v != nullptr) {
    if (const PickleTuple* t = v->if_tuple()) items = &t->items;
    if (const PickleObject* o = v->if_object(); o != nullptr && o->is("torch", "Size")) {
      const PickleTuple* args = o->args.if_tuple();
      if (args != nullptr && args->items.size() == 1 && args->items[0].if_tuple() != nullptr) {
        items = &args->items[0].if_tuple()->items;
      }
    }
  }
  if (items == nullptr) {
    return bad(where, fmt::format("expected a torch.Size, found {}", v != nullptr ? pickle_repr(*v) : "nothing"));
  }
  std::vector<int64_t> out;
  out.reserve(items->size());
  for (const PickleValue& item : *items) {
    if (item.if_int() == nullptr) return bad(where, fmt::format("torch.Size holds {}", pickle_repr(item)));
    out.push_back(*item.if_int());
  }
  return out;
}

Result<DType> get_dtype(const PickleValue& v, std::string_view where) {
  const PickleGlobal* g = v.if_global();
  if (g == nullptr || g->module != "torch") return bad(where, fmt::format("expected a torch dtype, found {}", pickle_repr(v)));
  std::optional<DType> d = dtype_from_name(g->name);
  if (!d) return make_error(Code::kDtypeMismatch, "DCP metadata: {}: dtype torch.{} is not supported by dsd", where, g->name);
  return *d;
}

// torch.serialization._get_layout("torch.strided") (2.x) or the global torch.strided.
Result<std::string> get_layout(const PickleValue& v, std::string_view where) {
  if (const PickleGlobal* g = v.if_global(); g != nullptr && g->module == "torch") return g->full_name();
  if (const PickleObject* o = v.if_object(); o != nullptr && o->is("torch.serialization", "_get_layout")) {
    const PickleTuple* args = o->args.if_tuple();
    if (args != nullptr && args->items.size() == 1 && args->items[0].if_str() != nullptr) {
      return *args->items[0].if_str();
    }
  }
  return bad(where, fmt::format("expected a torch layout, found {}", pickle_repr(v)));
}

// _MEM_FORMAT_ENCODING(n), a bare int, or (older files) a torch memory-format global.
Result<int64_t> get_memory_format(const PickleValue& v, std::string_view where) {
  if (const int64_t* i = v.if_int()) return *i;
  if (const PickleObject* o = v.if_object(); o != nullptr && o->is(kMetadataModule, "_MEM_FORMAT_ENCODING")) {
    const PickleTuple* args = o->args.if_tuple();
    if (args != nullptr && args->items.size() == 1 && args->items[0].if_int() != nullptr) {
      return *args->items[0].if_int();
    }
  }
  if (const PickleGlobal* g = v.if_global(); g != nullptr && g->module == "torch") {
    if (g->name == "contiguous_format") return 0;
    if (g->name == "channels_last") return 1;
    if (g->name == "preserve_format") return 2;
  }
  return bad(where, fmt::format("expected a memory format, found {}", pickle_repr(v)));
}

Result<TensorProperties> get_properties(const PickleValue* v, std::string_view where) {
  if (v == nullptr) return bad(where, "no properties");
  const PickleObject* o = TRY(instance(*v, kMetadataModule, "TensorProperties", where));
  TensorProperties p;
  if (!o->state) return bad(where, "TensorProperties without state");
  if (const PickleTuple* t = o->state->if_tuple(); t != nullptr && t->items.size() == 5) {
    // __getstate__: (dtype, layout, requires_grad, memory-format encoding, pin_memory).
    p.dtype = TRY(get_dtype(t->items[0], where));
    p.layout = TRY(get_layout(t->items[1], where));
    p.requires_grad = TRY(get_bool(t->items[2], where));
    p.memory_format = TRY(get_memory_format(t->items[3], where));
    p.pin_memory = TRY(get_bool(t->items[4], where));
    return p;
  }
  const PickleDict& d = *TRY(fields(*o, where));
  const PickleValue* dtype = d.find("dtype");
  if (dtype == nullptr) return bad(where, "TensorProperties without dtype");
  p.dtype = TRY(get_dtype(*dtype, where));
  if (const PickleValue* x = d.find("layout")) p.layout = TRY(get_layout(*x, where));
  if (const PickleValue* x = d.find("requires_grad")) p.requires_grad = TRY(get_bool(*x, where));
  if (const PickleValue* x = d.find("memory_format")) p.memory_format = TRY(get_memory_format(*x, where));
  if (const PickleValue* x = d.find("pin_memory")) p.pin_memory = TRY(get_bool(*x, where));
  return p;
}

Result<StorageMetadata> get_storage_metadata(const PickleValue& v, const std::string& where) {
  const PickleObject* o = v.if_object();
  const PickleGlobal* cls = o != nullptr ? class_of(*o) : nullptr;
  if (cls != nullptr && cls->is(kMetadataModule, "BytesStorageMetadata")) return BytesStorageMetadata{};
  const PickleDict& d = *TRY(fields(*TRY(instance(v, kMetadataModule, "TensorStorageMetadata", where)), where));
  TensorStorageMetadata md;
  md.properties = TRY(get_properties(d.find("properties"), where + ".properties"));
  md.size = TRY(get_size(d.find("size"), where + ".size"));
  const PickleValue* chunks = d.find("chunks");
  if (chunks == nullptr || chunks->if_list() == nullptr) return bad(where, "chunks is not a list");
  for (const PickleValue& c : chunks->if_list()->items) {
    const std::string cw = where + ".chunks";
    const PickleDict& cd = *TRY(fields(*TRY(instance(c, kMetadataModule, "ChunkStorageMetadata", cw)), cw));
    // TRY leaves through a return; keep it out of braced initialisers, whose finished parts
    // would not be destroyed.
    ChunkStorageMetadata chunk;
    chunk.offsets = TRY(get_size(cd.find("offsets"), cw + ".offsets"));
    chunk.sizes = TRY(get_size(cd.find("sizes"), cw + ".sizes"));
    md.chunks.push_back(std::move(chunk));
  }
  return StorageMetadata(std::move(md));
}

Result<MetadataIndex> get_index(const PickleValue& v, std::string_view where) {
  const PickleDict& d = *TRY(fields(*TRY(instance(v, kMetadataModule, "MetadataIndex", where)), where));
  MetadataIndex index;
  index.fqn = TRY(get_str(d.find("fqn"), where));
  const std::string fw = fmt::format("{} '{}'", where, index.fqn);
  if (const PickleValue* off = d.find("offset"); off != nullptr && !off->is_none()) {
    index.offset = TRY(get_size(off, fw + ".offset"));
  }
  if (const PickleValue* i = d.find("index"); i != nullptr && !i->is_none()) {
    index.index = TRY(get_int(i, fw + ".index"));
  }
  return index;
}

Result<StorageInfo> get_storage_info(const PickleValue& v, std::string_view where) {
  const PickleObject* o = v.if_object();
  const PickleGlobal* cls = o != nullptr ? class_of(*o) : nullptr;
  if (cls == nullptr || !cls->is(kFilesystemModule, "_StorageInfo")) {
    return make_error(Code::kUnsupported, "DCP metadata: {}: storage data {} is not a FileSystemWriter _StorageInfo",
                      where, pickle_repr(v));
  }
  const PickleDict& d = *TRY(fields(*o, where));
  StorageInfo info;
  info.relative_path = TRY(get_str(d.find("relative_path"), std::string(where) + ".relative_path"));
  info.offset = TRY(get_int(d.find("offset"), std::string(where) + ".offset"));
  info.length = TRY(get_int(d.find("length"), std::string(where) + ".length"));
  if (info.offset < 0 || info.length < 0) return bad(where, "negative offset or length");
  if (const PickleValue* t = d.find("transform_descriptors"); t != nullptr && !t->is_none()) {
    const std::vector<PickleValue>* items = nullptr;
    if (t->if_list() != nullptr) items = &t->if_list()->items;
    if (t->if_tuple() != nullptr) items = &t->if_tuple()->items;
    if (items == nullptr) return bad(where, "transform_descriptors is not a list");
    std::vector<std::string> descriptors;
    for (const PickleValue& item : *items) descriptors.push_back(TRY(get_str(&item, where)));
    info.transform_descriptors = std::move(descriptors);
  }
  return info;
}

// A str, or a pathlib path rebuilt from its parts: PosixPath('/', 'tmp', 'ckpt').
Result<std::optional<std::string>> get_checkpoint_id(const PickleValue* v, std::string_view where) {
  if (v == nullptr || v->is_none()) return std::optional<std::string>();
  if (v->if_str() != nullptr) return std::optional(*v->if_str());
  const PickleObject* o = v->if_object();
  const PickleTuple* args = o != nullptr ? o->args.if_tuple() : nullptr;
  if (o == nullptr || o->global() == nullptr || o->global()->module != "pathlib" || args == nullptr) {
    return bad(where, fmt::format("checkpoint_id {} is neither a str nor a path", pickle_repr(*v)));
  }
  std::string path;
  for (const PickleValue& part : args->items) {
    const std::string part_str = TRY(get_str(&part, where));
    if (!path.empty() && path.back() != '/') path += '/';
    path += part_str;
  }
  return std::optional(std::move(path));
}

Result<std::optional<StorageMeta>> get_storage_meta(const PickleValue* v) {
  if (v == nullptr || v->is_none()) return std::optional<StorageMeta>();
  constexpr std::string_view where = "storage_meta";
  const PickleDict& d = *TRY(fields(*TRY(instance(*v, kMetadataModule, "StorageMeta", where)), where));
  StorageMeta meta;
  meta.checkpoint_id = TRY(get_checkpoint_id(d.find("checkpoint_id"), where));
  meta.save_id = TRY(get_opt_str(d.find("save_id"), "storage_meta.save_id"));
  meta.load_id = TRY(get_opt_str(d.find("load_id"), "storage_meta.load_id"));
  if (const PickleValue* m = d.find("modules"); m != nullptr && !m->is_none()) {
    if (m->if_list() == nullptr) return bad(where, "modules is not a list");
    for (const PickleValue& item : m->if_list()->items) meta.modules.push_back(TRY(get_str(&item, "storage_meta.modules")));
  }
  return std::optional(std::move(meta));
}

// The default planner's {flat key: (path, ...)}; nullopt for anything else.
std::optional<std::vector<std::pair<std::string, Path>>> get_planner_data(const PickleValue* v) {
  const PickleDict* d = v != nullptr ? v->if_dict() : nullptr;
  if (d == nullptr) return std::nullopt;
  std::vector<std::pair<std::string, Path>> out;
  out.reserve(d->items.size());
  for (const auto& [k, path] : d->items) {
    const PickleTuple* t = path.if_tuple();
    if (k.if_str() == nullptr || t == nullptr) return std::nullopt;
    Path segments;
    for (const PickleValue& s : t->items) {
      if (s.if_str() != nullptr) {
        segments.emplace_back(*s.if_str());
      } else if (s.if_int() != nullptr) {
        segments.emplace_back(*s.if_int());
      } else {
        return std::nullopt;
      }
    }
    out.emplace_back(*k.if_str(), std::move(segments));
  }
  return out;
}

// ---- writing ------------------------------------------------------------------------------

class Builder {
 public:
  PickleValue metadata(const Metadata& m) {
    std::vector<std::pair<PickleValue, PickleValue>> sd;
    sd.reserve(m.state_dict_metadata.size());
    for (const auto& [fqn, md] : m.state_dict_metadata) sd.emplace_back(str(fqn), storage_metadata(md));

    PickleValue planner;
    if (m.planner_data) {
      std::vector<std::pair<PickleValue, PickleValue>> items;
      for (const auto& [fqn, path] : *m.planner_data) {
        std::vector<PickleValue> segments;
        for (const PathSegment& s : path) {
          segments.push_back(s.if_key() != nullptr ? str(*s.if_key()) : PickleValue::integer(*s.if_index()));
        }
        items.emplace_back(str(fqn), PickleValue::tuple(std::move(segments)));
      }
      planner = PickleValue::dict(std::move(items));
    }

    std::vector<std::pair<PickleValue, PickleValue>> storage;
    storage.reserve(m.storage_data.size());
    for (const auto& [index, info] : m.storage_data) storage.emplace_back(metadata_index(index), storage_info(info));

    return object(kMetadataModule, "Metadata",
                  {{str("state_dict_metadata"), PickleValue::dict(std::move(sd))},
                   {str("planner_data"), std::move(planner)},
                   {str("storage_data"), PickleValue::dict(std::move(storage))},
                   {str("storage_meta"), m.storage_meta ? storage_meta(*m.storage_meta) : PickleValue()},
                   {str("version"), m.version ? str(*m.version) : PickleValue()}});
  }

 private:
  // One node per distinct string, so the pickler memoises repeated keys and field names.
  PickleValue str(const std::string& s) {
    auto it = strings_.find(s);
    if (it != strings_.end()) return it->second;
    PickleValue v = PickleValue::str(s);
    strings_.emplace(s, v);
    return v;
  }

  PickleValue opt_str(const std::optional<std::string>& s) { return s ? str(*s) : PickleValue(); }

  // A dataclass as pickle writes it: cls.__new__(cls), then BUILD with its __dict__.
  PickleValue object(std::string_view module, std::string_view name, PickleValue state) {
    auto o = std::make_shared<PickleObject>();
    o->via = PickleObject::Via::kNewObj;
    o->callable = global(module, name);
    o->args = PickleValue::tuple({});
    o->state = std::move(state);
    return PickleValue::from(std::move(o));
  }
  PickleValue object(std::string_view module, std::string_view name,
                     std::vector<std::pair<PickleValue, PickleValue>> fields) {
    return object(module, name, PickleValue::dict(std::move(fields)));
  }

  PickleValue global(std::string_view module, std::string_view name) {
    return PickleValue::global(std::string(module), std::string(name));
  }

  PickleValue size(const std::vector<int64_t>& dims) {
    std::vector<PickleValue> items;
    items.reserve(dims.size());
    for (int64_t d : dims) items.push_back(PickleValue::integer(d));
    return PickleValue::reduce(global("torch", "Size"), PickleValue::tuple({PickleValue::tuple(std::move(items))}));
  }

  PickleValue properties(const TensorProperties& p) {
    // TensorProperties.__getstate__'s tuple; memory_format travels as _MEM_FORMAT_ENCODING.
    return object(kMetadataModule, "TensorProperties",
                  PickleValue::tuple({
                      global("torch", dtype_name(p.dtype)),
                      PickleValue::reduce(global("torch.serialization", "_get_layout"), PickleValue::tuple({str(p.layout)})),
                      PickleValue::boolean(p.requires_grad),
                      PickleValue::reduce(global(kMetadataModule, "_MEM_FORMAT_ENCODING"),
                                          PickleValue::tuple({PickleValue::integer(p.memory_format)})),
                      PickleValue::boolean(p.pin_memory),
                  }));
  }

  PickleValue storage_metadata(const StorageMetadata& md) {
    if (std::holds_alternative<BytesStorageMetadata>(md)) {
      return object(kMetadataModule, "BytesStorageMetadata", PickleValue::dict());
    }
    const auto& t = std::get<TensorStorageMetadata>(md);
    std::vector<PickleValue> chunks;
    chunks.reserve(t.chunks.size());
    for (const auto& c : t.chunks) {
      chunks.push_back(object(kMetadataModule, "ChunkStorageMetadata",
                              {{str("offsets"), size(c.offsets)}, {str("sizes"), size(c.sizes)}}));
    }
    return object(kMetadataModule, "TensorStorageMetadata",
                  {{str("properties"), properties(t.properties)},
                   {str("size"), size(t.size)},
                   {str("chunks"), PickleValue::list(std::move(chunks))}});
  }

  PickleValue metadata_index(const MetadataIndex& i) {
    std::vector<std::pair<PickleValue, PickleValue>> f = {
        {str("fqn"), str(i.fqn)},
        {str("index"), i.index ? PickleValue::integer(*i.index) : PickleValue()}};
    if (i.offset) f.emplace_back(str("offset"), size(*i.offset));
    return object(kMetadataModule, "MetadataIndex", std::move(f));
  }

  PickleValue storage_info(const StorageInfo& s) {
    std::vector<std::pair<PickleValue, PickleValue>> f = {
        {str("relative_path"), str(s.relative_path)},
        {str("offset"), PickleValue::integer(s.offset)},
        {str("length"), PickleValue::integer(s.length)}};
    if (s.transform_descriptors) {
      std::vector<PickleValue> items;
      for (const auto& d : *s.transform_descriptors) items.push_back(str(d));
      f.emplace_back(str("transform_descriptors"), PickleValue::list(std::move(items)));
    }
    return object(kFilesystemModule, "_StorageInfo", std::move(f));
  }

  PickleValue storage_meta(const StorageMeta& m) {
    std::vector<PickleValue> modules;
    for (const auto& mod : m.modules) modules.push_back(str(mod));
    return object(kMetadataModule, "StorageMeta",
                  {{str("checkpoint_id"), opt_str(m.checkpoint_id)},
                   {str("save_id"), opt_str(m.save_id)},
                   {str("load_id"), opt_str(m.load_id)},
                   {str("modules"), PickleValue::list(std::move(modules))}});
  }

  std::unordered_map<std::string, PickleValue> strings_;
};

}  // namespace

const PickleAllowList& metadata_allow_list() {
  static const PickleAllowList allow = [] {
    PickleAllowList a;
    for (std::string_view name : {"Metadata", "TensorStorageMetadata", "BytesStorageMetadata",
                                  "ChunkStorageMetadata", "TensorProperties", "_MEM_FORMAT_ENCODING",
                                  "MetadataIndex", "StorageMeta"}) {
      a.allow(kMetadataModule, name);
    }
    a.allow(kFilesystemModule, "_StorageInfo");
    for (std::string_view name :
         {"Size", "strided", "sparse_coo", "sparse_csr", "sparse_csc", "sparse_bsr", "sparse_bsc", "_mkldnn",
          "jagged", "contiguous_format", "channels_last", "channels_last_3d", "preserve_format", "float16",
          "float32", "float64", "bfloat16", "complex32", "complex64", "complex128", "uint8", "int8", "int16",
          "int32", "int64", "bool", "uint16", "uint32", "uint64", "float8_e4m3fn", "float8_e5m2",
          "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu", "float4_e2m1fn_x2", "qint8", "quint8",
          "qint32", "quint4x2", "quint2x4"}) {
      a.allow("torch", name);
    }
    a.allow("torch.serialization", "_get_layout");
    for (std::string_view name : {"Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath"}) {
      a.allow("pathlib", name);
    }
    a.allow("collections", "OrderedDict");
    a.allow("copyreg", "_reconstructor");
    a.allow("builtins", "object");
    a.allow("builtins", "set");
    a.allow("builtins", "frozenset");
    a.allow("_codecs", "encode");
    return a;
  }();
  return allow;
}

Result<Metadata> metadata_from_pickle(const PickleValue& root) {
  const PickleDict& d = *TRY(fields(*TRY(instance(root, kMetadataModule, "Metadata", "the top level")), "Metadata"));
  Metadata m;
  const PickleValue* sd = d.find("state_dict_metadata");
  if (sd == nullptr || sd->if_dict() == nullptr) return bad("Metadata", "state_dict_metadata is not a dict");
  m.state_dict_metadata.reserve(sd->if_dict()->items.size());
  for (const auto& [k, v] : sd->if_dict()->items) {
    const std::string fqn = TRY(get_str(&k, "state_dict_metadata key"));
    StorageMetadata md = TRY(get_storage_metadata(v, fmt::format("state_dict_metadata['{}']", fqn)));
    m.state_dict_metadata.emplace_back(fqn, std::move(md));
  }
  m.planner_data = get_planner_data(d.find("planner_data"));
  if (const PickleValue* storage = d.find("storage_data"); storage != nullptr && !storage->is_none()) {
    if (storage->if_dict() == nullptr) return bad("Metadata", "storage_data is not a dict");
    m.storage_data.reserve(storage->if_dict()->items.size());
    for (const auto& [k, v] : storage->if_dict()->items) {
      MetadataIndex index = TRY(get_index(k, "storage_data key"));
      const std::string where = fmt::format("storage_data['{}']", index.fqn);
      StorageInfo info = TRY(get_storage_info(v, where));
      m.storage_data.emplace_back(std::move(index), std::move(info));
    }
  }
  m.storage_meta = TRY(get_storage_meta(d.find("storage_meta")));
  m.version = TRY(get_opt_str(d.find("version"), "version"));
  return m;
}

Result<Metadata> parse_metadata(std::string_view bytes) {
  PickleReadOptions options;
  options.allow = &metadata_allow_list();
  Result<PickleValue> root = pickle_loads(bytes, options);
  if (!root.ok()) return std::move(root).error().with_prefix("DCP metadata: ");
  return metadata_from_pickle(*root);
}

PickleValue metadata_to_pickle(const Metadata& metadata) {
  Builder builder;
  return builder.metadata(metadata);
}

Result<std::string> serialize_metadata(const Metadata& metadata) {
  return pickle_dumps(metadata_to_pickle(metadata));
}

}  // namespace dsd::dcp
