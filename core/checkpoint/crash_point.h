// Crash points: named moments of a save at which a crash-consistency test can have the
// process killed (SIGKILL, as `kill -9` would), to check that a crash at exactly that moment
// leaves the previous checkpoint loadable and no partial checkpoint visible as complete.
//
// Armed only by the environment variable
//
//     DSD_CHECKPOINT_CRASH_AT=<point>[@<rank>]
//
// read once per process: the process whose launcher rank (the RANK variable; any process
// when "@<rank>" is left out) reaches <point> writes "dsd: crash point <point> reached" to
// stderr and kills itself. Unset, which is every normal run, crash_point() is a call that
// returns a flag cached at the first use and a not-taken branch, at a handful of places per
// save (never per byte or per chunk).
//
// Points, in the order a save reaches them:
//   save.before_write           plans agreed; this rank has created no data file yet
//   save.mid_write              the header and first piece of this rank's first data file are
//                               written (a partial data file on disk)
//   save.after_write            this rank's data files are written and fsynced, before the
//                               ranks agree that every write succeeded
//   save.before_commit          coordinator: write results merged, the manifest (DCP format:
//                               `.metadata`) not yet written
//   atomic_write.before_rename  a temporary file is written and fsynced but not yet renamed
//                               into place: the temporary manifest of a save (also the
//                               checkpoint manager's `latest` pointer)
//   save.after_commit           coordinator: the new manifest (`.metadata`) is in place, the other ranks
//                               have not yet heard that the save committed
//   save.after_cleanup_one      coordinator: the first data file of the replaced checkpoint
//                               has been removed, the others not yet
//
// And in a checkpoint manager's retention (retention.h):
//   retention.after_retire      a checkpoint's manifest is renamed to its retired name
//   retention.after_count       the live checkpoints' references are counted, nothing removed
//   retention.after_remove_one  one retired directory or unreferenced data file is removed
#pragma once

#include <string_view>

namespace dsd::checkpoint {

namespace detail {
bool crash_points_armed();
void reach_crash_point(std::string_view point);
}  // namespace detail

inline void crash_point(std::string_view point) {
  if (detail::crash_points_armed()) [[unlikely]] {
    detail::reach_crash_point(point);
  }
}

}  // namespace dsd::checkpoint
