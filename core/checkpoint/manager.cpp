#include "core/checkpoint/manager.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/file.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <charconv>

#include "core/base/make_error.h"
#include "core/checkpoint/dcp_files.h"
#include "core/checkpoint/io.h"
#include "core/checkpoint/retention.h"
#include "core/checkpoint/source.h"

namespace dsd::checkpoint {
namespace {

struct StepDir {
  int64_t step;
  bool complete;
};

Result<std::vector<StepDir>> scan(const std::string& root) {
  std::vector<StepDir> out;
  if (!is_directory(root)) return out;
  for (const std::string& name : TRY(list_dir(root))) {
    auto step = parse_step_dir(name);
    if (!step || !is_directory(join(root, name))) continue;
    // Committed in either format a save writes (dsd, or DCP with SaveOptions::format).
    out.push_back({*step, open_source(join(root, name)).ok()});
  }
  std::sort(out.begin(), out.end(), [](const StepDir& a, const StepDir& b) { return a.step < b.step; });
  return out;
}

// Whether another process holds the save lock (save.cpp: an exclusive flock on the
// directory) of `dir`: it is saving into it right now (another manager on this root, a save
// still writing an older step). Retention leaves such a directory alone.
bool being_saved(const std::string& dir) {
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return false;
  const bool busy = ::flock(fd, LOCK_EX | LOCK_NB) != 0 && errno == EWOULDBLOCK;
  ::close(fd);
  return busy;
}

// Retention of a step directory that leaves the kept ones: a dsd checkpoint is retired (its
// files go in collect_garbage once no kept step references them); a DCP checkpoint, which
// nothing references, and the leftovers of a crashed save are removed.
Status drop_step(const std::string& dir) {
  if (being_saved(dir) || is_retired(dir)) return ok();
  if (path_exists(join(dir, kManifestName))) return retire(dir);
  return remove_tree(dir);
}

// Temporary `latest` files (io.cpp's write_file_atomic: "latest.tmp-<pid>-<n>") of a
// manager killed between writing and renaming one. Removed when their process is gone from
// this host (kill(pid, 0) fails with ESRCH); another live manager's are left alone.
void remove_orphan_latest_tmps(const std::string& root) {
  auto names = list_dir(root);
  if (!names.ok()) return;
  const std::string prefix = std::string(kLatestName) + ".tmp-";
  for (const std::string& n : *names) {
    if (!n.starts_with(prefix)) continue;
    long pid = 0;
    const char* b = n.data() + prefix.size();
    auto [p, ec] = std::from_chars(b, n.data() + n.size(), pid);
    if (ec != std::errc() || p == b || pid <= 0) continue;
    if (::kill(static_cast<pid_t>(pid), 0) != 0 && errno == ESRCH) {
      (void)remove_file(join(root, n));
    }
  }
}

}  // namespace

std::optional<int64_t> parse_step_dir(std::string_view name) {
  constexpr std::string_view kPrefix = "step_";
  if (!name.starts_with(kPrefix) || name.size() == kPrefix.size()) return std::nullopt;
  int64_t v = 0;
  const char* b = name.data() + kPrefix.size();
  const char* e = name.data() + name.size();
  auto [p, ec] = std::from_chars(b, e, v);
  if (ec != std::errc() || p != e || v < 0 || (*b == '0' && e - b > 1)) return std::nullopt;
  return v;
}

CheckpointManager::CheckpointManager(std::string root, int keep_last)
    : root_(std::move(root)), keep_last_(keep_last) {}

Result<std::string> CheckpointManager::choose_base(Communicator& comm, int64_t step) const {
  // The coordinator's choice is the one every rank follows.
  std::string base;
  Status st = ok();
  if (comm.rank() == 0) {
    auto steps = complete_steps();
    if (!steps.ok()) {
      st = std::move(steps).error();
    } else {
      for (auto it = steps->rbegin(); it != steps->rend(); ++it) {
        if (*it < step && path_exists(join(step_path(*it), kManifestName))) {
          base = step_path(*it);
          break;
        }
      }
    }
  }
  TRY(agree(comm, std::move(st)));
  return broadcast_bytes(comm, base, 0);
}

SaveOptions CheckpointManager::options_for(int64_t step, const SaveOptions& options) const {
  SaveOptions opt = options;
  if (!opt.incremental || !opt.base.empty()) return opt;
  // Chosen when the save starts (an async save: on its background thread, once the save
  // before it has committed).
  CheckpointManager self = *this;
  opt.choose_base = [self, step](Communicator& comm) { return self.choose_base(comm, step); };
  return opt;
}

std::string CheckpointManager::step_path(int64_t step) const {
  return join(root_, fmt::format("step_{}", step));
}

Status CheckpointManager::after_commit(Communicator& comm, int64_t step) const {
  Status st = ok();
  if (comm.rank() == 0) {
    st = write_file_atomic(root_, kLatestName, fmt::format("step_{}\n", step));
    if (st.ok()) remove_orphan_latest_tmps(root_);
    if (st.ok() && keep_last_ > 0) {
      auto dirs = scan(root_);
      if (!dirs.ok()) {
        st = std::move(dirs).error();
      } else {
        int64_t kept = 0;
        for (auto it = dirs->rbegin(); it != dirs->rend() && st.ok(); ++it) {
          if (it->step == step) {
            ++kept;
            continue;
          }
          if (it->step > step) continue;  // newer than this save: not ours to judge
          const bool keep = it->complete && kept < keep_last_;
          if (keep) ++kept;
          else st = drop_step(step_path(it->step));
        }
        // Retired steps' files go once no kept step references them.
        if (st.ok()) {
          auto gc = collect_garbage(root_);
          if (!gc.ok()) st = std::move(gc).error();
        }
      }
    }
  }
  return agree(comm, std::move(st));
}

Result<SaveInfo> CheckpointManager::save(Communicator& comm, const Dict& state_dict, int64_t step,
                                         const SaveOptions& options) {
  if (step < 0) return make_error(Code::kInvalidArgument, "checkpoint step {} is negative", step);
  const SaveOptions opt = options_for(step, options);
  SaveInfo info = TRY(checkpoint::save(comm, state_dict, step_path(step), opt));
  TRY(after_commit(comm, step));
  return info;
}

Result<std::shared_ptr<SaveFuture>> CheckpointManager::save_async(AsyncCheckpointer& saver,
                                                                  const Dict& state_dict, int64_t step,
                                                                  const SaveOptions& options) {
  if (step < 0) return make_error(Code::kInvalidArgument, "checkpoint step {} is negative", step);
  // The manager is copied into the callback: it is small and must outlive this call.
  CheckpointManager self = *this;
  const SaveOptions opt = options_for(step, options);
  return saver.save_async(state_dict, step_path(step), opt,
                          [self, step](Communicator& comm) { return self.after_commit(comm, step); });
}

Result<std::vector<int64_t>> CheckpointManager::complete_steps() const {
  std::vector<int64_t> out;
  for (const StepDir& d : TRY(scan(root_))) {
    if (d.complete) out.push_back(d.step);
  }
  return out;
}

Result<std::optional<int64_t>> CheckpointManager::latest_step() const {
  std::vector<int64_t> steps = TRY(complete_steps());
  if (steps.empty()) return std::optional<int64_t>();
  return std::optional<int64_t>(steps.back());
}

Result<std::optional<int64_t>> CheckpointManager::load_latest(Communicator& comm, Dict& state_dict,
                                                              const LoadOptions& options,
                                                              LoadReport* report) const {
  // Every rank scans; the coordinator's answer is the one all follow.
  auto mine = latest_step();
  TRY(agree(comm, mine.ok() ? ok() : Status(mine.error())));
  const std::string choice = TRY(broadcast_bytes(comm, *mine ? std::to_string(**mine) : std::string("none"), 0));
  if (choice == "none") return std::optional<int64_t>();
  const int64_t step = std::stoll(choice);
  LoadReport r = TRY(load(comm, state_dict, step_path(step), options));
  if (report != nullptr) *report = std::move(r);
  return std::optional<int64_t>(step);
}

}  // namespace dsd::checkpoint
