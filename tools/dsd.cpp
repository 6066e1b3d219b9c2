// dsd: the operator's command for checkpoints of every format dsd speaks (dsd, PyTorch DCP,
// torch.save files, Hugging Face safetensors).
//
//   dsd inspect PATH [--json]        keys, kinds, dtypes, shapes, chunks, bytes, save world size
//   dsd verify PATH                  every checksum and bound; exit 0 only if intact
//   dsd convert SRC DST --to FORMAT  [--max-shard-size BYTES] [--overwrite] [--threads N]
//                                    [--select PREFIX [--strip-prefix]] [--dtype DTYPE]
//                                    [--dequantize]  (FP8 X.weight times its X.weight_scale_inv)
//   dsd convert CKPT DST --to dsd --materialize    an incremental checkpoint made standalone
//   dsd gc ROOT [--keep-last N] [--retire NAME]... [--dry-run]
//                                    remove retired checkpoints' files no live one references
//   dsd diff A B                     keys only in one, dtype/shape differences, first differing
//                                    element of each tensor; exit 0 only if equal
//
// Operations that run for more than a second draw a progress bar with throughput on stderr
// when it is a terminal (--progress forces it, --quiet turns it off). Errors are one line,
// "dsd: <message>", with an exit code per kind of failure (kExit* below, listed by --help).
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <map>
#include <new>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "core/base/json_limits.h"
#include "core/base/strings.h"
#include "core/checkpoint/io.h"
#include "core/checkpoint/load.h"
#include "core/checkpoint/manager.h"
#include "core/checkpoint/manifest.h"
#include "core/checkpoint/materialize.h"
#include "core/checkpoint/retention.h"
#include "core/checkpoint/value_json.h"
#include "core/interop/convert.h"
#include "core/interop/diff.h"
#include "core/interop/state_view.h"
#include "core/interop/verify_any.h"

namespace {

using dsd::Code;
using dsd::checkpoint::Entry;
using dsd::checkpoint::Format;
using dsd::shape_str;
using dsd::interop::ItemInfo;
using dsd::interop::StateReader;
using nlohmann::ordered_json;
using Clock = std::chrono::steady_clock;

// Exit codes, stable: scripts rely on them.
constexpr int kExitOk = 0;
constexpr int kExitDiffers = 1;    // diff: not equal; verify: damaged
constexpr int kExitUsage = 2;      // bad command line
constexpr int kExitNotFound = 3;   // no such file, or no checkpoint there
constexpr int kExitCorrupt = 4;    // a file is damaged beyond reading (header, manifest, metadata)
constexpr int kExitIo = 5;         // the file system failed (also disk full)
constexpr int kExitExists = 6;     // the destination exists (pass --overwrite)
constexpr int kExitUnsupported = 7;  // valid, but not representable (a class, dtype or format)
constexpr int kExitInternal = 8;   // anything else: a bug
constexpr int kExitOutOfMemory = 9;  // an allocation failed (std::bad_alloc, DSD_E_OUT_OF_MEMORY)

constexpr const char* kExitCodesHelp =
    "Exit codes:\n"
    "  0  success (diff: equal; verify: intact)\n"
    "  1  diff: the inputs differ; verify: damage found\n"
    "  2  usage error\n"
    "  3  not found (no such path, no checkpoint there, a missing key)\n"
    "  4  corrupt (a header, manifest or metadata that cannot be read)\n"
    "  5  I/O error (including a full disk)\n"
    "  6  the destination exists (pass --overwrite)\n"
    "  7  unsupported (a class, dtype or conversion dsd cannot represent)\n"
    "  8  internal error\n"
    "  9  out of memory (an allocation failed)\n"
    "Formats: dsd (checkpoint directory), dcp (PyTorch DCP directory), torch (torch.save file),\n"
    "safetensors (Hugging Face directory or file); the source format is detected.";

int exit_code(Code c) {
  switch (c) {
    case Code::kInvalidArgument: return kExitUsage;
    case Code::kNotFound: return kExitNotFound;
    case Code::kCorrupt: return kExitCorrupt;
    case Code::kIo:
    case Code::kNoSpace: return kExitIo;
    case Code::kExists: return kExitExists;
    case Code::kUnsupported:
    case Code::kWrongKind:
    case Code::kDtypeMismatch:
    case Code::kShapeMismatch: return kExitUnsupported;
    case Code::kOutOfMemory: return kExitOutOfMemory;
    default: return kExitInternal;
  }
}

int fail(const dsd::Error& e) {
  std::string msg = e.message;
  for (char& ch : msg) {
    if (ch == '\n') ch = ' ';
  }
  std::fprintf(stderr, "dsd: %s\n", msg.c_str());
  return exit_code(e.code);
}

std::string human_bytes(double b) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  int u = 0;
  while (b >= 1024 && u < 4) {
    b /= 1024;
    ++u;
  }
  return u == 0 ? fmt::format("{:.0f} {}", b, units[u]) : fmt::format("{:.1f} {}", b, units[u]);
}

// "5GB", "500MB", "2GiB", "1024": Hugging Face's max_shard_size spellings.
std::optional<uint64_t> parse_size(std::string s) {
  if (s.empty()) return std::nullopt;
  size_t i = 0;
  while (i < s.size() && (std::isdigit(static_cast<unsigned char>(s[i])) || s[i] == '.')) ++i;
  if (i == 0) return std::nullopt;
  double v = 0;
  try {
    v = std::stod(s.substr(0, i));
  } catch (...) {
    return std::nullopt;
  }
  std::string unit = s.substr(i);
  for (char& c : unit) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  double mul = 1;
  if (unit.empty() || unit == "B") mul = 1;
  else if (unit == "KB" || unit == "K") mul = 1e3;
  else if (unit == "MB" || unit == "M") mul = 1e6;
  else if (unit == "GB" || unit == "G") mul = 1e9;
  else if (unit == "TB" || unit == "T") mul = 1e12;
  else if (unit == "KIB") mul = 1024.0;
  else if (unit == "MIB") mul = 1024.0 * 1024;
  else if (unit == "GIB") mul = 1024.0 * 1024 * 1024;
  else if (unit == "TIB") mul = 1024.0 * 1024 * 1024 * 1024;
  else return std::nullopt;
  return static_cast<uint64_t>(std::llround(v * mul));
}

// A progress bar on stderr: drawn once an operation has run for a second (at once with
// --progress), at most ten times a second, only when stderr is a terminal (or --progress).
class ProgressBar {
 public:
  ProgressBar(std::string what, bool forced, bool quiet)
      : what_(std::move(what)), forced_(forced), enabled_(!quiet && (forced || ::isatty(2))), start_(Clock::now()) {}

  void update(uint64_t done, uint64_t total) {
    done_ = done;
    total_ = total;
    if (!enabled_) return;
    const auto now = Clock::now();
    if (!forced_ && now - start_ < std::chrono::seconds(1)) return;
    if (drawn_ && now - last_ < std::chrono::milliseconds(100) && done != total) return;
    last_ = now;
    draw(now);
  }

  // Ends the bar's line (the final state drawn if the bar was showing).
  void finish() {
    if (!enabled_) return;
    if (drawn_ || forced_) {
      draw(Clock::now());
      std::fputc('\n', stderr);
    }
  }

  double seconds() const { return std::chrono::duration<double>(Clock::now() - start_).count(); }

 private:
  void draw(Clock::time_point now) {
    const double secs = std::max(1e-6, std::chrono::duration<double>(now - start_).count());
    const double rate = static_cast<double>(done_) / secs;
    constexpr int kWidth = 30;
    const double frac = total_ > 0 ? std::min(1.0, static_cast<double>(done_) / static_cast<double>(total_)) : 0.0;
    const int fill = static_cast<int>(frac * kWidth);
    std::string bar(static_cast<size_t>(fill), '#');
    bar.append(static_cast<size_t>(kWidth - fill), '.');
    std::string eta;
    if (rate > 0 && total_ > done_) eta = fmt::format(" ETA {:.0f}s", static_cast<double>(total_ - done_) / rate);
    std::fprintf(stderr, "\r%s [%s] %3.0f%% %s/%s %s/s%s\033[K", what_.c_str(), bar.c_str(), frac * 100,
                 human_bytes(static_cast<double>(done_)).c_str(), human_bytes(static_cast<double>(total_)).c_str(),
                 human_bytes(rate).c_str(), eta.c_str());
    std::fflush(stderr);
    drawn_ = true;
  }

  std::string what_;
  bool forced_;
  bool enabled_;
  Clock::time_point start_;
  Clock::time_point last_{};
  bool drawn_ = false;
  uint64_t done_ = 0;
  uint64_t total_ = 0;
};

struct Global {
  bool progress = false;
  bool quiet = false;
  bool allow_external_files = false;  // a dsd checkpoint's data files may be symbolic links

  dsd::checkpoint::OpenOptions open_options() const { return {allow_external_files}; }
};

ordered_json path_json(const dsd::Path& path) { return ordered_json(dsd::checkpoint::path_to_json(path)); }

std::string format_title(Format f) {
  switch (f) {
    case Format::kDsd: return "dsd checkpoint";
    case Format::kDcp: return "PyTorch DCP checkpoint";
    case Format::kTorchSave: return "torch.save file";
    case Format::kSafetensors: return "safetensors";
  }
  return "?";
}

// ---- inspect --------------------------------------------------------------------------------

// A dsd checkpoint that fails validation (manifest_validate.h): says so, then lists what its
// manifest declares, marked as not validated (the raw JSON when even the schema fails).
int inspect_invalid(const std::string& path, const dsd::Error& error, bool as_json) {
  fail(error);
  ordered_json entries = ordered_json::array();
  auto m = dsd::checkpoint::read_manifest(path);
  if (m.ok()) {
    for (const Entry& e : m->entries) {
      ordered_json j = {{"key", e.key}, {"path", path_json(e.path)},
                        {"kind", e.kind == Entry::Kind::kTensor ? "tensor" : "value"}};
      if (e.kind == Entry::Kind::kTensor) {
        j["dtype"] = std::string(dsd::dtype_name(e.dtype));
        j["shape"] = e.shape;
        j["chunks"] = e.chunks.size();
      }
      entries.push_back(std::move(j));
    }
  } else {
    auto text = dsd::checkpoint::read_file(dsd::checkpoint::join(path, dsd::checkpoint::kManifestName), 1u << 30);
    auto raw = text.ok() ? dsd::parse_json_strict(*text, "manifest", 256) : dsd::Result<nlohmann::json>(text.error());
    if (raw.ok() && raw->is_object() && raw->contains("entries") && (*raw)["entries"].is_array()) {
      for (const auto& e : (*raw)["entries"]) {
        if (e.is_object() && e.contains("key") && e["key"].is_string()) {
          entries.push_back({{"key", e["key"].get<std::string>()}});
        }
      }
    }
  }
  if (as_json) {
    ordered_json out = {{"path", path}, {"valid", false}, {"error", error.message}, {"entries", std::move(entries)}};
    std::printf("%s\n", out.dump(2).c_str());
    return kExitCorrupt;
  }
  std::printf("path:        %s\n", path.c_str());
  std::printf("status:      INVALID: %s\n", error.message.c_str());
  std::printf("entries as the manifest declares them (NOT VALIDATED):\n");
  for (const auto& e : entries) {
    std::string line = "  [unvalidated] " + e["key"].get<std::string>();
    if (e.contains("kind")) line += "  " + e["kind"].get<std::string>();
    if (e.contains("dtype")) line += "  " + e["dtype"].get<std::string>() + "  " + e["shape"].dump();
    std::printf("%s\n", line.c_str());
  }
  return kExitCorrupt;
}

int inspect(const std::string& path, bool as_json, const Global& g) {
  auto opened = StateReader::open(path, g.open_options());
  if (!opened.ok()) {
    const bool dsd_dir = dsd::checkpoint::path_exists(dsd::checkpoint::join(path, dsd::checkpoint::kManifestName));
    if (opened.error().code == Code::kCorrupt && dsd_dir) return inspect_invalid(path, opened.error(), as_json);
    return fail(opened.error());
  }
  const StateReader& r = **opened;
  size_t tensors = 0;
  size_t values = 0;
  ordered_json entries = ordered_json::array();
  std::vector<std::vector<std::string>> rows;
  for (size_t i = 0; i < r.items().size(); ++i) {
    const ItemInfo& it = r.items()[i];
    ordered_json e = {{"key", it.key}, {"path", path_json(it.path)}};
    if (it.kind == Entry::Kind::kTensor) {
      ++tensors;
      ordered_json chunks = ordered_json::array();
      for (const auto& c : it.chunks) {
        chunks.push_back({{"offsets", c.offsets}, {"sizes", c.sizes}, {"file", c.file}});
      }
      e["kind"] = "tensor";
      e["dtype"] = std::string(dsd::dtype_name(it.dtype));
      e["shape"] = it.shape;
      e["bytes"] = it.nbytes;
      e["chunks"] = std::move(chunks);
      rows.push_back({it.key, "tensor", std::string(dsd::dtype_name(it.dtype)), shape_str(it.shape),
                      std::to_string(it.chunks.size()), std::to_string(it.nbytes)});
    } else {
      ++values;
      auto v = r.read_value(i);
      if (!v.ok()) return fail(v.error());
      auto j = dsd::checkpoint::value_to_json(*v, it.key);
      std::string text = j.ok() ? j->dump() : std::string(dsd::kind_name(v->kind()));
      e["kind"] = "value";
      e["value"] = j.ok() ? ordered_json::parse(j->dump()) : ordered_json(text);
      if (text.size() > 40) text = text.substr(0, 37) + "...";
      rows.push_back({it.key, "value", "", "", "", text});
    }
    entries.push_back(std::move(e));
  }
  // An incremental dsd checkpoint: the bytes it owns and those it references, per base.
  uint64_t owned = r.tensor_bytes();
  std::map<std::string, uint64_t> referenced;
  if (r.format() == Format::kDsd) {
    auto m = dsd::checkpoint::read_manifest(path);
    if (m.ok() && m->has_references()) {
      owned = 0;
      for (const Entry& e : m->entries) {
        for (const auto& c : e.chunks) {
          const auto* f = m->file(c.file);
          if (f != nullptr && f->referenced()) referenced[f->checkpoint] += c.nbytes();
          else owned += c.nbytes();
        }
      }
    }
  }
  if (as_json) {
    ordered_json refs = ordered_json::object();
    for (const auto& [base, n] : referenced) refs[base] = n;
    ordered_json out = {{"path", path},
                        {"valid", true},
                        {"format", std::string(dsd::checkpoint::format_name(r.format()))},
                        {"world_size", r.world_size()},
                        {"files", r.files()},
                        {"tensors", tensors},
                        {"values", values},
                        {"total_bytes", r.tensor_bytes()},
                        {"owned_bytes", owned},
                        {"referenced_bytes", std::move(refs)},
                        {"entries", std::move(entries)}};
    std::printf("%s\n", out.dump(2).c_str());
    return kExitOk;
  }
  std::printf("path:        %s\n", path.c_str());
  std::printf("format:      %s (%s)\n", std::string(dsd::checkpoint::format_name(r.format())).c_str(),
              format_title(r.format()).c_str());
  std::printf("world size:  %lld (at save)\n", static_cast<long long>(r.world_size()));
  std::printf("files:       %zu\n", r.files().size());
  std::printf("entries:     %zu (%zu tensors, %zu values)\n", r.items().size(), tensors, values);
  std::printf("tensor data: %s (%llu bytes)\n", human_bytes(static_cast<double>(r.tensor_bytes())).c_str(),
              static_cast<unsigned long long>(r.tensor_bytes()));
  if (!referenced.empty()) {
    std::printf("owns:        %s (%llu bytes) in its own files\n", human_bytes(static_cast<double>(owned)).c_str(),
                static_cast<unsigned long long>(owned));
    for (const auto& [base, n] : referenced) {
      std::printf("references:  %s (%llu bytes) in ../%s (incremental: unchanged since that save)\n",
                  human_bytes(static_cast<double>(n)).c_str(), static_cast<unsigned long long>(n), base.c_str());
    }
  }
  std::printf("\n");
  const std::vector<std::string> header = {"KEY", "KIND", "DTYPE", "SHAPE", "CHUNKS", "BYTES/VALUE"};
  std::vector<size_t> width(header.size());
  for (size_t c = 0; c < header.size(); ++c) width[c] = header[c].size();
  for (const auto& row : rows) {
    for (size_t c = 0; c < row.size(); ++c) width[c] = std::max(width[c], row[c].size());
  }
  auto print_row = [&](const std::vector<std::string>& row) {
    std::string line;
    for (size_t c = 0; c < row.size(); ++c) {
      line += row[c];
      if (c + 1 < row.size()) line.append(width[c] - row[c].size() + 2, ' ');
    }
    while (!line.empty() && line.back() == ' ') line.pop_back();
    std::printf("%s\n", line.c_str());
  };
  print_row(header);
  for (const auto& row : rows) print_row(row);
  return kExitOk;
}

// ---- verify ---------------------------------------------------------------------------------

int verify(const std::string& path, const Global& g) {
  ProgressBar bar("verify", g.progress, g.quiet);
  auto problems =
      dsd::interop::verify_any(path, [&](uint64_t d, uint64_t t) { bar.update(d, t); }, g.open_options());
  bar.finish();
  if (!problems.ok()) return fail(problems.error());
  if (problems->empty()) {
    std::printf("%s: intact\n", path.c_str());
    return kExitOk;
  }
  for (const auto& p : *problems) {
    std::printf("%s: %s: %s\n", p.file.c_str(), p.key.empty() ? "-" : p.key.c_str(), p.message.c_str());
  }
  std::fprintf(stderr, "dsd: '%s' is damaged: %zu problem(s)\n", path.c_str(), problems->size());
  return kExitDiffers;
}

// ---- convert --------------------------------------------------------------------------------

struct ConvertArgs {
  std::string src;
  std::string dst;
  std::string to;
  std::string shard;
  bool overwrite = false;
  int threads = 0;
  std::string select;
  bool strip_prefix = false;
  std::string dtype;
  bool dequantize = false;
  bool materialize = false;
};

// convert --materialize: an incremental dsd checkpoint made self-contained (in place when
// DST is SRC).
int materialize(const ConvertArgs& a, const Global& g) {
  auto info = dsd::checkpoint::materialize(a.src, a.dst, a.overwrite);
  if (!info.ok()) return fail(info.error());
  if (!g.quiet) {
    std::printf("materialized %s into %s: %lld referenced file(s) copied (%s); it references no other checkpoint\n",
                a.src.c_str(), a.dst.c_str(), static_cast<long long>(info->files_copied),
                human_bytes(static_cast<double>(info->bytes_copied)).c_str());
  }
  return kExitOk;
}

int convert(const ConvertArgs& a, const Global& g) {
  const auto to = dsd::checkpoint::format_from_name(a.to);
  if (!to) {
    std::fprintf(stderr, "dsd: unknown format '%s' (expected dsd, dcp, torch or safetensors)\n", a.to.c_str());
    return kExitUsage;
  }
  if (a.materialize) {
    if (*to != Format::kDsd || !a.select.empty() || !a.dtype.empty() || a.dequantize || !a.shard.empty()) {
      std::fprintf(stderr, "dsd: --materialize copies a dsd checkpoint as it is: --to dsd, without --select, "
                           "--dtype, --dequantize or --max-shard-size\n");
      return kExitUsage;
    }
    return materialize(a, g);
  }
  dsd::interop::ConvertOptions o;
  o.overwrite = a.overwrite;
  o.thread_count = a.threads;
  o.allow_external_files = g.allow_external_files;
  if (!a.shard.empty()) {
    const auto n = parse_size(a.shard);
    if (!n) {
      std::fprintf(stderr, "dsd: --max-shard-size '%s' is not a size (e.g. 5GB, 500MB, 1073741824)\n",
                   a.shard.c_str());
      return kExitUsage;
    }
    o.max_shard_size = *n;
  }
  dsd::interop::StateViewOptions view;
  view.select = a.select;
  view.strip_prefix = a.strip_prefix;
  view.dequantize = a.dequantize;
  if (!a.dtype.empty()) {
    view.dtype = dsd::dtype_from_name(a.dtype);
    if (!view.dtype) {
      std::fprintf(stderr, "dsd: --dtype '%s' is not a dtype (e.g. bfloat16, float16, float32)\n", a.dtype.c_str());
      return kExitUsage;
    }
  }
  auto reader = StateReader::open(a.src, g.open_options());
  if (!reader.ok()) return fail(reader.error());
  // The view is made here rather than by convert (o.select...), so that the summary counts
  // what was written.
  auto source = dsd::interop::make_state_view(**reader, view);
  if (!source.ok()) return fail(source.error());
  ProgressBar bar("convert", g.progress, g.quiet);
  o.progress = [&](uint64_t d, uint64_t t) { bar.update(d, t); };
  dsd::Status s = dsd::interop::convert(**source, a.dst, *to, o);
  bar.finish();
  if (!s.ok()) return fail(s.error());
  const double secs = bar.seconds();
  const uint64_t bytes = (*source)->tensor_bytes();
  if (!g.quiet) {
    const std::string of = dsd::interop::is_identity(view)
                               ? std::string()
                               : fmt::format(" (of {})", (*reader)->items().size());
    std::printf("converted %s (%s) to %s (%s): %zu entries%s, %s in %.2f s (%s/s)\n", a.src.c_str(),
                std::string(dsd::checkpoint::format_name((*reader)->format())).c_str(), a.dst.c_str(),
                std::string(dsd::checkpoint::format_name(*to)).c_str(), (*source)->items().size(), of.c_str(),
                human_bytes(static_cast<double>(bytes)).c_str(), secs,
                human_bytes(static_cast<double>(bytes) / std::max(secs, 1e-6)).c_str());
  }
  return kExitOk;
}

// ---- gc -------------------------------------------------------------------------------------

int collect(const std::string& root, int keep_last, const std::vector<std::string>& retire_names, bool dry_run,
            const Global& g) {
  namespace ck = dsd::checkpoint;
  std::vector<std::string> doomed;
  for (const std::string& n : retire_names) {
    if (!ck::is_plain_file_name(n) || !ck::path_exists(ck::join(ck::join(root, n), ck::kManifestName))) {
      std::fprintf(stderr, "dsd: --retire %s: no checkpoint '%s' in %s\n", n.c_str(), n.c_str(), root.c_str());
      return kExitNotFound;
    }
    doomed.push_back(n);
  }
  if (keep_last > 0) {
    auto names = ck::list_dir(root);
    if (!names.ok()) return fail(names.error());
    std::vector<std::pair<int64_t, std::string>> steps;
    for (const std::string& n : *names) {
      auto step = ck::parse_step_dir(n);
      if (step && ck::path_exists(ck::join(ck::join(root, n), ck::kManifestName))) steps.emplace_back(*step, n);
    }
    std::sort(steps.rbegin(), steps.rend());
    for (size_t i = static_cast<size_t>(keep_last); i < steps.size(); ++i) doomed.push_back(steps[i].second);
  }
  for (const std::string& n : doomed) {
    if (!g.quiet) std::printf("%s %s\n", dry_run ? "would retire" : "retired", ck::join(root, n).c_str());
    if (dry_run) continue;
    dsd::Status st = ck::retire(ck::join(root, n));
    if (!st.ok()) return fail(st.error());
  }
  if (dry_run) return kExitOk;
  auto report = ck::collect_garbage(root);
  if (!report.ok()) return fail(report.error());
  if (!g.quiet) {
    for (const std::string& d : report->retired_kept) {
      std::printf("kept %s: live checkpoints reference its files\n", d.c_str());
    }
    std::printf("removed %lld retired checkpoint(s) and %lld unreferenced file(s): %s freed\n",
                static_cast<long long>(report->retired_removed), static_cast<long long>(report->files_removed),
                human_bytes(static_cast<double>(report->bytes_removed)).c_str());
  }
  return kExitOk;
}

// ---- diff -----------------------------------------------------------------------------------

int diff(const std::string& a, const std::string& b, const Global& g) {
  auto ra = StateReader::open(a, g.open_options());
  if (!ra.ok()) return fail(ra.error());
  auto rb = StateReader::open(b, g.open_options());
  if (!rb.ok()) return fail(rb.error());
  ProgressBar bar("diff", g.progress, g.quiet);
  auto report = dsd::interop::diff(**ra, **rb, [&](uint64_t d, uint64_t t) { bar.update(d, t); });
  bar.finish();
  if (!report.ok()) return fail(report.error());
  for (const auto& k : report->only_in_a) std::printf("only in A: %s\n", k.c_str());
  for (const auto& k : report->only_in_b) std::printf("only in B: %s\n", k.c_str());
  for (const auto& [k, what] : report->differences) std::printf("differs: %s: %s\n", k.c_str(), what.c_str());
  if (report->equal()) {
    std::printf("equal: %zu entries, %s of tensor data compared\n", (*ra)->items().size(),
                human_bytes(static_cast<double>(report->compared_bytes)).c_str());
    return kExitOk;
  }
  return kExitDiffers;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"dsd: inspect, verify, convert and compare checkpoints (dsd, PyTorch DCP, torch.save, "
               "safetensors)."};
  app.footer(kExitCodesHelp);
  app.require_subcommand(1);
  app.fallthrough();  // --progress / --quiet also after the subcommand
  Global g;
  app.add_flag("--progress", g.progress, "Draw the progress bar even when stderr is not a terminal");
  app.add_flag("-q,--quiet", g.quiet, "No progress bar, no summary line");
  app.add_flag("--allow-external-files", g.allow_external_files,
               "Read a dsd checkpoint's data files even when they are symbolic links (refused by default)");

  std::string path;
  bool as_json = false;
  CLI::App* ins = app.add_subcommand("inspect", "Keys, dtypes, shapes, chunks, bytes and save world size");
  ins->add_option("PATH", path, "Checkpoint directory or file")->required();
  ins->add_flag("--json", as_json, "JSON instead of a table");

  CLI::App* ver = app.add_subcommand("verify", "Check every checksum and bound; exit 0 only if intact");
  ver->add_option("PATH", path, "Checkpoint directory or file")->required();

  ConvertArgs ca;
  CLI::App* conv = app.add_subcommand("convert", "Convert SRC (any format, detected) to DST in another format");
  conv->footer(
      "Publishing a model from a training checkpoint {\"model\": ..., \"optim\": ..., \"step\": N}\n"
      "as Hugging Face weights (from_pretrained reads DST once config.json is beside them):\n"
      "  dsd convert ckpt/ hf/ --to safetensors --select model --strip-prefix --dtype bfloat16");
  conv->add_option("SRC", ca.src, "Source checkpoint directory or file")->required();
  conv->add_option("DST", ca.dst, "Destination")->required();
  conv->add_option("--to", ca.to, "Target format: dsd, dcp, torch or safetensors")->required();
  conv->add_option("--max-shard-size", ca.shard, "safetensors: most bytes per file (e.g. 5GB, 500MB; default 5GB)");
  conv->add_flag("--overwrite", ca.overwrite, "Replace DST if it exists");
  conv->add_option("--threads", ca.threads, "Writer threads (default: min(4, cores))")->check(CLI::NonNegativeNumber);
  CLI::Option* select = conv->add_option(
      "--select", ca.select,
      "Write only the entries under this key prefix: 'model' (or 'model.') selects model.* (default: all)");
  conv->add_flag("--strip-prefix", ca.strip_prefix,
                 "Drop the --select prefix from the written keys (model.layers.0.weight -> layers.0.weight)")
      ->needs(select);
  conv->add_option("--dtype", ca.dtype,
                   "Cast every floating tensor to this dtype (bfloat16, float16, float32, float64, "
                   "float8_e4m3fn, float8_e5m2), rounding as torch's Tensor.to; integer and bool tensors "
                   "are kept");
  conv->add_flag("--dequantize", ca.dequantize,
                 "Dequantize FP8 block-scaled weights (DeepSeek-V3): each float8 X.weight times its "
                 "X.weight_scale_inv (float32, one per 128x128 block) in --dtype (default bfloat16), as "
                 "PyTorch's QuantizedHuggingFaceStorageReader; the _scale_inv tensors are dropped");

  conv->add_flag("--materialize", ca.materialize,
                 "--to dsd: copy in the files an incremental checkpoint references in its base checkpoints, "
                 "keeping its layout and checksums, so it stands alone (DST may be SRC: in place)");

  std::string root;
  int keep_last = 0;
  std::vector<std::string> retire_names;
  bool dry_run = false;
  CLI::App* gc = app.add_subcommand(
      "gc", "Remove what retired checkpoints of ROOT hold that no live checkpoint references");
  gc->footer(
      "A checkpoint manager retires the steps it no longer keeps (checkpoint.json renamed to\n"
      "checkpoint.retired.json) and removes their data files once no kept step references them; gc\n"
      "applies the same rule by hand. --retire NAME retires a checkpoint of ROOT first; --keep-last N\n"
      "retires every complete step_<N> checkpoint but the newest N.");
  gc->add_option("ROOT", root, "Directory whose subdirectories are checkpoints (a checkpoint manager's root)")
      ->required();
  gc->add_option("--keep-last", keep_last, "Retire all complete step_<N> checkpoints but the newest N")
      ->check(CLI::PositiveNumber);
  gc->add_option("--retire", retire_names, "Retire this checkpoint of ROOT (a directory name) first");
  gc->add_flag("--dry-run", dry_run, "Say what would be retired and removed; change nothing");

  std::string a;
  std::string b;
  CLI::App* dif = app.add_subcommand("diff", "Compare two checkpoints of any formats; exit 0 only if equal");
  dif->add_option("A", a, "First")->required();
  dif->add_option("B", b, "Second")->required();

  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    std::fprintf(stderr, "dsd: %s (see dsd --help)\n", e.what());
    return kExitUsage;
  }
  // An allocation failure anywhere (a hostile file's huge declared size, ulimit -v) is an
  // error with its own exit code naming the input, never std::terminate's SIGABRT.
  const std::string subject = ins->parsed() || ver->parsed() ? path
                              : conv->parsed()                ? ca.src
                              : gc->parsed()                  ? root
                                                              : a + " and " + b;
  try {
    if (ins->parsed()) return inspect(path, as_json, g);
    if (ver->parsed()) return verify(path, g);
    if (conv->parsed()) return convert(ca, g);
    if (gc->parsed()) return collect(root, keep_last, retire_names, dry_run, g);
    if (dif->parsed()) return diff(a, b, g);
  } catch (const std::bad_alloc&) {
    std::fputs("dsd: out of memory while reading ", stderr);
    std::fputs(subject.c_str(), stderr);
    std::fputs(" (an allocation failed)\n", stderr);
    return kExitOutOfMemory;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "dsd: internal error while reading %s: %s\n", subject.c_str(), e.what());
    return kExitInternal;
  }
  return kExitUsage;
}
