#include "core/checkpoint/write_results.h"

#include <algorithm>
#include <cstring>
#include <string_view>
#include <unordered_map>
#include <unordered_set>

#include "core/base/make_error.h"

namespace dsd::checkpoint {

namespace {

// Binary, native byte order (the ranks of one save run one build of dsd on one architecture):
// a coordinator at 16k ranks merges ~17M chunk records, which as JSON cost ~20 us each to
// parse and 2x the bytes.
constexpr std::string_view kMagic{"DSDWR02\n", 8};

void put_u64(std::string& out, uint64_t v) { out.append(reinterpret_cast<const char*>(&v), sizeof v); }
void put_str(std::string& out, std::string_view s) {
  put_u64(out, s.size());
  out.append(s);
}
void put_dims(std::string& out, const std::vector<int64_t>& v) {
  for (int64_t x : v) put_u64(out, static_cast<uint64_t>(x));
}

// Reads what the encoder wrote; any short or implausible field makes it `bad`.
struct Reader {
  std::string_view in;
  size_t pos = 0;
  bool bad = false;

  uint64_t u64() {
    if (in.size() - pos < 8) {
      bad = true;
      return 0;
    }
    uint64_t v;
    std::memcpy(&v, in.data() + pos, 8);
    pos += 8;
    return v;
  }
  // A count of items of at least `each` bytes that must still fit in the input.
  uint64_t count(uint64_t each) {
    const uint64_t n = u64();
    if (bad || n > (in.size() - pos) / each) {
      bad = true;
      return 0;
    }
    return n;
  }
  std::string str() {
    const uint64_t n = count(1);
    if (bad) return {};
    std::string s(in.substr(pos, n));
    pos += n;
    return s;
  }
  std::vector<int64_t> dims(uint64_t n) {
    std::vector<int64_t> v(n);
    for (auto& x : v) x = static_cast<int64_t>(u64());
    return v;
  }
};

}  // namespace

std::string encode_write_results(std::span<const FileRecord> files, std::span<const WrittenChunk> chunks) {
  std::string out(kMagic);
  put_u64(out, files.size());
  for (const FileRecord& f : files) {
    put_str(out, f.name);
    put_u64(out, static_cast<uint64_t>(f.rank));
    put_u64(out, f.size);
    put_str(out, f.checkpoint);
  }
  put_u64(out, chunks.size());
  for (const WrittenChunk& c : chunks) {
    put_str(out, c.key);
    put_u64(out, c.record.offsets.size());
    put_dims(out, c.record.offsets);
    put_dims(out, c.record.sizes);
    put_str(out, c.record.file);
    put_u64(out, c.record.begin);
    put_u64(out, c.record.end);
    put_u64(out, c.record.xxh3);
    put_u64(out, c.record.blocks.size());
    for (uint64_t b : c.record.blocks) put_u64(out, b);
  }
  return out;
}

Status merge_write_results(Manifest& m, const std::vector<std::string>& results) {
  std::unordered_map<std::string, std::vector<ChunkRecord>> by_key;
  std::unordered_set<std::string> referenced;
  for (size_t rank = 0; rank < results.size(); ++rank) {
    auto malformed = [&] { return make_error(Code::kComm, "rank {} sent malformed write results", rank); };
    const std::string& text = results[rank];
    if (!std::string_view(text).starts_with(kMagic)) return malformed();
    Reader r{text, kMagic.size()};
    const uint64_t nfiles = r.count(32);
    for (uint64_t i = 0; i < nfiles && !r.bad; ++i) {
      FileRecord f;
      f.name = r.str();
      f.rank = static_cast<int64_t>(r.u64());
      f.size = r.u64();
      f.checkpoint = r.str();
      // A file of the base checkpoint is referenced by every rank whose chunks it holds:
      // listed once.
      if (f.referenced() && referenced.count(f.name)) continue;
      if (f.referenced()) referenced.insert(f.name);
      m.files.push_back(std::move(f));
    }
    const uint64_t nchunks = r.count(56);
    for (uint64_t i = 0; i < nchunks && !r.bad; ++i) {
      std::string key = r.str();
      const uint64_t ndim = r.count(16);
      ChunkRecord c;
      c.offsets = r.dims(ndim);
      c.sizes = r.dims(ndim);
      c.file = r.str();
      c.begin = r.u64();
      c.end = r.u64();
      c.xxh3 = r.u64();
      const uint64_t nblocks = r.count(8);
      c.blocks.resize(nblocks);
      for (uint64_t& b : c.blocks) b = r.u64();
      if (!r.bad) by_key[key].push_back(std::move(c));
    }
    if (r.bad || r.pos != text.size()) return malformed();
  }
  for (Entry& e : m.entries) {
    if (e.kind != Entry::Kind::kTensor) continue;
    auto& chunks = by_key[e.key];
    std::sort(chunks.begin(), chunks.end(),
              [](const ChunkRecord& a, const ChunkRecord& b) { return a.offsets < b.offsets; });
    e.chunks = std::move(chunks);
  }
  Status s = validate_manifest(m);
  if (!s.ok()) {
    return make_error(Code::kInternal, "the manifest of this save does not validate: {}", s.error().message);
  }
  return ok();
}

}  // namespace dsd::checkpoint
