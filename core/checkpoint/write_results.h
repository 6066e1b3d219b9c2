// The write results of the dsd format: what each rank reports to the coordinator after
// writing its data files (the files and where each chunk landed, with its checksums), and
// how the coordinator fills them into the manifest it commits. Plain data, no libtorch: a
// benchmark can simulate the results of any number of ranks.
#pragma once

#include <span>
#include <string>
#include <vector>

#include "core/base/result.h"
#include "core/checkpoint/manifest.h"

namespace dsd::checkpoint {

struct WrittenChunk {
  std::string key;
  ChunkRecord record;
};

// One rank's results as the bytes gathered to the coordinator (a binary record, see the .cpp).
std::string encode_write_results(std::span<const FileRecord> files, std::span<const WrittenChunk> chunks);

// Coordinator: adds every rank's files and chunk locations to `m` (`results` indexed by rank;
// chunks sorted by offsets within each tensor) and validates the result (validate_manifest).
// kComm naming the rank for malformed results, kInternal when the merged manifest does not
// validate.
Status merge_write_results(Manifest& m, const std::vector<std::string>& results);

}  // namespace dsd::checkpoint
