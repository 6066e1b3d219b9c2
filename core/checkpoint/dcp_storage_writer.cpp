// PyTorch DCP's format's storage writer: what FileSystemWriter writes, so that dcp.load (and
// dsd) read it at any world size.
//
// The planning is dsd's (local plans, dedup of replicated chunks, validation, file buckets);
// the layout on disk is DCP's: each rank writes `__<rank>_<k>.distcp` files in which every
// tensor chunk is a complete torch.save archive of that chunk alone and every non-tensor
// value a torch.save archive of the value (BYTE_IO items first, as DCP writes them), and the
// coordinator commits `.metadata` (the pickled Metadata) last, atomically.
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <map>
#include <mutex>
#include <optional>
#include <set>

#include "core/base/make_error.h"
#include "core/checkpoint/crash_point.h"
#include "core/checkpoint/dcp_files.h"
#include "core/checkpoint/io.h"
#include "core/checkpoint/pool.h"
#include "core/checkpoint/retention.h"
#include "core/checkpoint/storage_writer.h"
#include "core/checkpoint/value_json.h"
#include "core/formats/dcp_chunks.h"
#include "core/formats/dcp_metadata.h"

namespace dsd::checkpoint {
namespace {

using nlohmann::json;

// One item as written: where its torch.save archive lies.
struct WrittenItem {
  std::string key;
  std::optional<std::vector<int64_t>> offsets;  // nullopt for a value (BYTE_IO)
  std::string file;
  uint64_t offset = 0;
  uint64_t length = 0;
};

struct Outcome {
  std::vector<WrittenItem> items;
  std::vector<std::string> created;  // full paths, removed when the save fails
  uint64_t bytes = 0;
  int files = 0;
};

// The first free data file index: new data files never reuse the names of the files of a
// checkpoint being replaced, which stays intact until the new `.metadata` commits.
Result<int64_t> first_free_index(const std::string& path) {
  int64_t next = 0;
  for (const std::string& n : TRY(list_dir(path))) {
    if (auto k = distcp_index(n)) next = std::max(next, *k + 1);
  }
  return next;
}

// Appends to an open file, counting where each item starts.
class Appender {
 public:
  explicit Appender(File& f) : f_(f) {}
  uint64_t pos() const { return pos_; }
  ByteSink sink() {
    return [this](const void* data, size_t n) -> Status {
      TRY(write_all(f_, data, n));
      pos_ += n;
      return ok();
    };
  }

 private:
  File& f_;
  uint64_t pos_ = 0;
};

// Writes one `.distcp` file: `values` (BYTE_IO items) first, then the tensor chunks of `fp`.
Status write_file(const std::string& dir, const std::string& name, const RankPlan& rp, const FilePlan* fp,
                  const std::vector<std::pair<std::string, Value>>& values, const SourceMap& sources,
                  const SaveOptions& opt, std::mutex& mu, Outcome& out) {
  const std::string full = join(dir, name);
  File f = TRY(create_new(full));
  {
    std::lock_guard<std::mutex> lock(mu);
    out.created.push_back(full);
  }
  Appender app(f);
  std::vector<WrittenItem> items;
  TorchSaveOptions tso;  // with CRC-32s, as torch.save writes them: `dsd verify` checks them
  for (const auto& [key, value] : values) {
    const uint64_t start = app.pos();
    Result<uint64_t> n = dcp::write_bytes_item(value, app.sink(), tso);
    if (!n.ok()) return std::move(n).error().with_prefix(fmt::format("writing value '{}': ", key));
    items.push_back({key, std::nullopt, name, start, *n});
  }
  if (fp != nullptr) {
    for (size_t i : fp->items) {
      const WriteItem& it = rp.items[i];
      auto src = sources.find(it.key);
      if (src == sources.end()) return make_error_at(Code::kInternal, it.key, "no tensor for '{}'", it.key);
      const at::Tensor data = TRY(source_tensor(src->second, it.key, opt));
      const uint64_t start = app.pos();
      Result<uint64_t> n = dcp::write_tensor_chunk(data, app.sink(), tso);
      if (!n.ok()) return std::move(n).error().with_prefix(fmt::format("writing '{}': ", it.key));
      items.push_back({it.key, it.offsets, name, start, *n});
    }
  }
  if (opt.sync_files) TRY(sync(f));
  TRY(f.close());
  std::lock_guard<std::mutex> lock(mu);
  out.bytes += app.pos();
  out.files += 1;
  for (auto& it : items) out.items.push_back(std::move(it));
  return ok();
}

// This rank's files: its planned buckets; the coordinator also writes every value, in its
// first file (one of its own when it writes no tensor).
Status write_rank_files(const std::string& dir, int64_t rank, int64_t first_index, const RankPlan& rp,
                        const std::vector<std::pair<std::string, Value>>& values, const SourceMap& sources,
                        const SaveOptions& opt, Outcome& out) {
  const size_t nfiles = std::max<size_t>(rp.files.size(), values.empty() ? 0 : 1);
  std::mutex mu;
  static const std::vector<std::pair<std::string, Value>> kNone;
  return parallel_for(nfiles, opt.thread_count, [&](size_t i) -> Status {
    const FilePlan* fp = i < rp.files.size() ? &rp.files[i] : nullptr;
    return write_file(dir, distcp_name(rank, first_index + static_cast<int64_t>(i)), rp, fp, i == 0 ? values : kNone,
                      sources, opt, mu, out);
  });
}

std::string outcome_to_json(const Outcome& out) {
  json items = json::array();
  for (const WrittenItem& it : out.items) {
    items.push_back({{"key", it.key},
                     {"offsets", it.offsets ? json(*it.offsets) : json(nullptr)},
                     {"file", it.file},
                     {"offset", it.offset},
                     {"length", it.length}});
  }
  return items.dump();
}

Result<std::vector<WrittenItem>> outcomes_from_json(const std::vector<std::string>& texts) {
  std::vector<WrittenItem> all;
  try {
    for (const std::string& text : texts) {
      for (const json& j : json::parse(text)) {
        WrittenItem it;
        it.key = j.at("key").get<std::string>();
        if (!j.at("offsets").is_null()) it.offsets = j.at("offsets").get<std::vector<int64_t>>();
        it.file = j.at("file").get<std::string>();
        it.offset = j.at("offset").get<uint64_t>();
        it.length = j.at("length").get<uint64_t>();
        all.push_back(std::move(it));
      }
    }
  } catch (const json::exception& e) {
    return make_error(Code::kComm, "a peer sent malformed write results: {}", e.what());
  }
  return all;
}

// The coordinator's Metadata, as DCP's create_default_global_save_plan + FileSystemWriter's
// finish() build it: entries in plan order, each tensor's chunks in offset order with their
// index hints, planner_data for the nesting, storage_meta and version.
Result<dcp::Metadata> build_metadata(const GlobalPlan& global, const std::vector<WrittenItem>& written,
                                     const std::string& path) {
  std::map<std::string_view, std::vector<const WrittenItem*>> chunks;
  std::map<std::string_view, const WrittenItem*> values;
  for (const WrittenItem& it : written) {
    if (it.offsets) chunks[it.key].push_back(&it);
    else values[it.key] = &it;
  }
  dcp::Metadata md;
  md.planner_data.emplace();
  for (const Entry& e : global.manifest.entries) {
    md.planner_data->emplace_back(e.key, e.path);
    if (e.kind == Entry::Kind::kValue) {
      auto v = values.find(e.key);
      if (v == values.end()) return make_error_at(Code::kInternal, e.key, "value '{}' was not written", e.key);
      md.state_dict_metadata.emplace_back(e.key, dcp::BytesStorageMetadata{});
      md.storage_data.emplace_back(dcp::MetadataIndex{e.key, std::nullopt, std::nullopt},
                                   dcp::StorageInfo{v->second->file, static_cast<int64_t>(v->second->offset),
                                                    static_cast<int64_t>(v->second->length), std::nullopt});
      continue;
    }
    auto& list = chunks[e.key];
    std::sort(list.begin(), list.end(), [](const WrittenItem* a, const WrittenItem* b) { return *a->offsets < *b->offsets; });
    dcp::TensorStorageMetadata t;
    t.properties.dtype = e.dtype;
    t.size = e.shape;
    for (size_t i = 0; i < list.size(); ++i) {
      const WrittenItem& it = *list[i];
      t.chunks.push_back({*it.offsets, {}});
      md.storage_data.emplace_back(dcp::MetadataIndex{e.key, *it.offsets, static_cast<int64_t>(i)},
                                   dcp::StorageInfo{it.file, static_cast<int64_t>(it.offset),
                                                    static_cast<int64_t>(it.length), std::nullopt});
    }
    md.state_dict_metadata.emplace_back(e.key, std::move(t));
  }
  // Chunk sizes come from the plan (the written items carry only offsets).
  std::map<std::pair<std::string_view, std::vector<int64_t>>, const std::vector<int64_t>*> sizes;
  for (const RankPlan& rp : global.ranks) {
    for (const WriteItem& it : rp.items) sizes[{it.key, it.offsets}] = &it.sizes;
  }
  for (auto& [key, smd] : md.state_dict_metadata) {
    auto* t = std::get_if<dcp::TensorStorageMetadata>(&smd);
    if (t == nullptr) continue;
    for (auto& c : t->chunks) {
      auto it = sizes.find({key, c.offsets});
      if (it == sizes.end()) return make_error_at(Code::kInternal, key, "chunk of '{}' was not planned", key);
      c.sizes = *it->second;
    }
  }
  md.storage_meta = dcp::StorageMeta{path, global.save_id, std::nullopt, {}};
  md.version = std::string(dcp::kCurrentVersion);
  return md;
}

// After the commit: data files this save does not reference (a replaced checkpoint's, an
// orphan of a crashed save) and a dsd checkpoint this save replaced in the same directory.
void remove_unreferenced_files(const std::string& path, const dcp::Metadata& md) {
  auto names = list_dir(path);
  if (!names.ok()) return;
  std::set<std::string> keep = {std::string(kDcpMetadataName)};
  for (const auto& [index, info] : md.storage_data) keep.insert(info.relative_path);
  std::optional<std::set<std::string>> referenced;
  for (const std::string& n : *names) {
    if (keep.count(n)) continue;
    const bool dcp_file = is_dcp_file_name(n);
    const bool dsd_file = n == kManifestName || is_data_file_name(n) ||
                          n.starts_with(std::string(kManifestName) + ".tmp-");
    // Files of the replaced dsd checkpoint that incremental siblings reference stay.
    if (is_data_file_name(n)) {
      if (!referenced) referenced = referenced_by_siblings(path);
      if (referenced->count(n)) continue;
    }
    if (dcp_file || dsd_file) (void)remove_file(join(path, n));
  }
}

class DcpStorageWriter final : public StorageWriter {
 public:
  using StorageWriter::StorageWriter;

  Result<int64_t> prepare_storage() override {
    TRY(prepare_checkpoint_dir(path_, options_.overwrite));
    return first_free_index(path_);
  }

  // The coordinator also writes every value, in its first file (BYTE_IO items, decoded
  // from the value JSON the plans carried).
  Result<WriteResult> write_data(const GlobalPlan& plan, int64_t rank, const SourceMap& sources) override {
    std::vector<std::pair<std::string, Value>> values;
    if (rank == 0) {
      for (const Entry& e : plan.manifest.entries) {
        if (e.kind == Entry::Kind::kValue) values.emplace_back(e.key, TRY(value_from_json(e.value, e.key)));
      }
    }
    TRY(write_rank_files(path_, rank, plan.first_file_index, plan.ranks[static_cast<size_t>(rank)], values, sources,
                         options_, out_));
    return WriteResult{outcome_to_json(out_), out_.bytes, out_.files};
  }

  Status finish(GlobalPlan& plan, const std::vector<std::string>& results) override {
    const std::vector<WrittenItem> written = TRY(outcomes_from_json(results));
    dcp::Metadata md = TRY(build_metadata(plan, written, path_));
    const std::string bytes = TRY(dcp::serialize_metadata(md));
    TRY(sync_dir(path_));
    crash_point("save.before_commit");
    TRY(write_file_atomic(path_, kDcpMetadataName, bytes));
    committed_ = std::move(md);
    return ok();
  }

  void remove_stale_files() override { remove_unreferenced_files(path_, committed_); }

 private:
  const std::vector<std::string>& created() const override { return out_.created; }

  Outcome out_;
  dcp::Metadata committed_;
};

}  // namespace

std::unique_ptr<StorageWriter> make_dcp_storage_writer(const std::string& path, const SaveOptions& options) {
  return std::make_unique<DcpStorageWriter>(path, options);
}

}  // namespace dsd::checkpoint
