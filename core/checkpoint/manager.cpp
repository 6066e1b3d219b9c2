#include "core/checkpoint/manager.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/file.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <charconv>

#include "core/base/make_error.h"
#include "core/checkpoint/io.h"
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

// Retention's removal of a step directory, under the save lock (save.cpp: an exclusive flock
// on the directory): a directory another process is saving into right now (another manager
// on this root, a save still writing an older step) is left alone, never deleted under it.
Status remove_unless_saving(const std::string& dir) {
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd >= 0 && ::flock(fd, LOCK_EX | LOCK_NB) != 0 && errno == EWOULDBLOCK) {
    ::close(fd);
    return ok();
  }
  Status st = remove_tree(dir);
  if (fd >= 0) ::close(fd);
  return st;
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
          else st = remove_unless_saving(step_path(it->step));
        }
      }
    }
  }
  return agree(comm, std::move(st));
}

Result<SaveInfo> CheckpointManager::save(Communicator& comm, const Dict& state_dict, int64_t step,
                                         const SaveOptions& options) {
  if (step < 0) return make_error(Code::kInvalidArgument, "checkpoint step {} is negative", step);
  SaveInfo info = TRY(checkpoint::save(comm, state_dict, step_path(step), options));
  TRY(after_commit(comm, step));
  return info;
}

Result<std::shared_ptr<SaveFuture>> CheckpointManager::save_async(AsyncCheckpointer& saver,
                                                                  const Dict& state_dict, int64_t step,
                                                                  const SaveOptions& options) {
  if (step < 0) return make_error(Code::kInvalidArgument, "checkpoint step {} is negative", step);
  // The manager is copied into the callback: it is small and must outlive this call.
  CheckpointManager self = *this;
  return saver.save_async(state_dict, step_path(step), options,
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
