// The files of a PyTorch DCP checkpoint directory, as FileSystemWriter names them: the
// pickled `.metadata` (or a save without collectives' rank-local `__<rank>.metadata` files)
// and the data files `__<rank>_<k>.distcp`.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace dsd::checkpoint {

inline constexpr std::string_view kDcpMetadataName = ".metadata";

// Whether `dir` holds a committed DCP checkpoint: `.metadata`, or `__<rank>.metadata` files.
bool is_dcp_checkpoint(const std::string& dir);
// Whether `name` is a rank-local DCP metadata file name, `__<rank>.metadata`; its rank.
std::optional<int64_t> dcp_rank_metadata(std::string_view name);
// Whether `name` is a file of a DCP checkpoint (`.metadata`, `__<rank>.metadata`, `.distcp`
// data, or a temporary `.metadata` of an unfinished commit).
bool is_dcp_file_name(std::string_view name);

// FileSystemWriter's data file name for the k-th file of a rank: `__<rank>_<k>.distcp`.
std::string distcp_name(int64_t rank, int64_t k);
// The rank of a data file name `__<rank>_<k>.distcp` (whatever follows the rank's '_').
std::optional<int64_t> distcp_rank(std::string_view name);
// The k of a data file name `__<rank>_<k>.distcp`.
std::optional<int64_t> distcp_index(std::string_view name);

}  // namespace dsd::checkpoint
