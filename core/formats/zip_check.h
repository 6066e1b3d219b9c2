// The CRC-32 of every record of a zip archive, checked against its central directory: how
// `dsd verify` finds flipped bits in torch.save files and DCP `.distcp` items (torch.save
// writes each record's CRC-32; torch.load never checks it).
//
// Reads untrusted bytes: every offset and size is bounds-checked against the archive. No
// libtorch; the archive is read with pread.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "core/base/result.h"

namespace dsd {

// CRC-32 (IEEE, as zip uses), continuing from `crc` (0 to start).
uint32_t crc32(const void* data, size_t n, uint32_t crc = 0);

struct ZipRecordCheck {
  std::string name;      // the record's name in the archive ("archive/data/0")
  uint64_t offset = 0;   // where its data starts, relative to the archive
  uint64_t size = 0;
  bool crc_ok = true;    // false when the data does not match the recorded CRC-32
};

// Checks every record of the zip archive at [offset, offset + length) of `path` (length
// UINT64_MAX: to the end of the file). Records stored with a compression method are only
// bounds-checked. An archive whose records all carry a CRC of 0 was written without CRCs
// (torch.save's compute_crc32=False) and is not checked further (`crc_ok` stays true).
// Errors: kNotFound / kIo (the file), kCorrupt (no end-of-central-directory record, a
// directory or local header out of bounds or malformed, naming the archive).
Result<std::vector<ZipRecordCheck>> check_zip(const std::string& path, uint64_t offset = 0,
                                              uint64_t length = UINT64_MAX);

// The same for an archive in memory (a decompressed DCP item); `where` names it in messages.
Result<std::vector<ZipRecordCheck>> check_zip_memory(std::string_view bytes, const std::string& where);

}  // namespace dsd
