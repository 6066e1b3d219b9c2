// The one validation of a dsd checkpoint every reader goes through (load, load_full, verify,
// inspect, convert, diff, the checkpoint manager: all open it with open_source()):
//
// 1. parse_manifest() (manifest.h): bounded JSON depth and no repeated member names before
//    any tree is built, the schema, `key` equal to the dot-joined `path`, no entry inside
//    another entry's subtree, chunks in bounds / tiling / not sharing bytes;
// 2. check_data_files() below: the manifest against the safetensors header of each data file
//    (read from a descriptor opened inside the checkpoint directory, never through a link);
// 3. while reading, every block checksum of every byte read, and the whole-chunk checksum of
//    every chunk read in full (storage_reader.h; verify() reads every chunk in full).
//
// Pure C++ (no libtorch), fuzzable with the manifest parser.
#pragma once

#include <map>
#include <string>

#include "core/base/result.h"
#include "core/checkpoint/manifest.h"
#include "core/formats/safetensors.h"

namespace dsd::checkpoint {

// What one data file of the checkpoint holds, as found on disk.
struct DataFileInfo {
  uint64_t size = 0;            // bytes
  safetensors::Header header;   // parsed (and self-consistent: safetensors.h)
};

// Cross-checks a parsed manifest against its data files (`files`: by file name, one for each
// file the manifest lists). kCorrupt naming the file and key when a file's size differs from
// the manifest's record, or a chunk has no tensor of its key in its file's header, or that
// tensor's dtype differs from the entry's, its shape from the chunk's sizes, or its bytes
// from the chunk's byte range (which must be exactly the tensor's data_offsets inside the
// data section: never the header, never past the end).
Status check_data_files(const Manifest& m, const std::map<std::string, DataFileInfo>& files);

}  // namespace dsd::checkpoint
