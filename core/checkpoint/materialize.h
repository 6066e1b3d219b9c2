// Making an incremental checkpoint self-contained again: the files it references in its base
// checkpoints are copied in, and its manifest no longer names another directory (format
// version 1), so its bases can be deleted.
#pragma once

#include <cstdint>
#include <string>

#include "core/base/result.h"

namespace dsd::checkpoint {

struct MaterializeInfo {
  int64_t files_copied = 0;  // referenced files copied in
  uint64_t bytes_copied = 0;
};

// Writes the dsd checkpoint at `src` as a self-contained checkpoint at `dst`: every data file
// is copied (copy_file_range; whole files, so the layout, chunk byte ranges and checksums stay
// those of the manifest), then the manifest is committed atomically, then what a replaced
// checkpoint at `dst` left is removed (not the files incremental siblings of `dst` reference).
// `dst` may be `src`: in place, only the referenced files are copied, and a kill at any
// moment leaves the checkpoint loadable (the old manifest, referencing the base, until the
// new one is renamed over it). A self-contained `src` in place is a no-op. Errors: kExists
// (another checkpoint at `dst` and !overwrite), those of opening `src` (a missing base
// file: kNotFound naming it), kIo / kNoSpace.
Result<MaterializeInfo> materialize(const std::string& src, const std::string& dst, bool overwrite = false);

}  // namespace dsd::checkpoint
