// File-system primitives of the checkpoint storage: RAII descriptors, full writes and reads
// with errors that name the file, fsync of files and directories, atomic small files.
//
// Error codes: ENOSPC, EDQUOT and EFBIG (RLIMIT_FSIZE; the process must ignore SIGXFSZ to
// see it as an error) are kNoSpace; a read past the end of a file is kCorrupt (truncated);
// anything else is kIo. Every message names the file.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "core/base/result.h"

namespace dsd::checkpoint {

class File {
 public:
  File() = default;
  explicit File(int fd, std::string path) : fd_(fd), path_(std::move(path)) {}
  File(File&& o) noexcept : fd_(o.fd_), path_(std::move(o.path_)) { o.fd_ = -1; }
  File& operator=(File&& o) noexcept;
  File(const File&) = delete;
  File& operator=(const File&) = delete;
  ~File();

  int fd() const { return fd_; }
  const std::string& path() const { return path_; }
  bool is_open() const { return fd_ >= 0; }
  // Closes and reports the close error (deferred write errors on some file systems).
  Status close();

 private:
  int fd_ = -1;
  std::string path_;
};

// "dir/name".
std::string join(std::string_view dir, std::string_view name);

Result<File> open_for_read(const std::string& path);
// Opens the directory `path` for open_in_dir (O_DIRECTORY).
Result<File> open_dir(const std::string& path);
// Opens `name`, a plain name, for reading relative to the open directory `dir` (openat), so
// what is read is the file of that directory whatever happens to the path meanwhile. Refuses
// (kCorrupt naming the file) anything but a regular file (a FIFO would block the reader), and
// a symbolic link unless `follow_links` (O_NOFOLLOW). kNotFound when it does not exist.
Result<File> open_in_dir(const File& dir, std::string_view name, bool follow_links);
// Opens the directory `name`, a plain name, next to the open directory `dir` (in its
// physical parent: openat "..", then the name), for open_in_dir: the base checkpoint of an
// incremental one. A symbolic link is refused (kCorrupt) unless `follow_links`; kNotFound
// when it does not exist.
Result<File> open_sibling_dir(const File& dir, std::string_view name, bool follow_links);
// Creates a new file; kExists when it is already there (never truncates another file).
Result<File> create_new(const std::string& path);

Status write_all(const File& f, const void* data, size_t len);
Status pread_all(const File& f, void* data, size_t len, uint64_t offset);
Result<uint64_t> file_size(const File& f);
Status sync(const File& f);
// Starts writing back [offset, offset + len) of `f` without waiting for it (Linux
// sync_file_range); a later sync() then has less to wait for. A file system that does not
// support it is not an error.
Status start_writeback(const File& f, uint64_t offset, uint64_t len);
Status sync_dir(const std::string& dir);

// mkdir -p.
Status make_dirs(const std::string& path);
bool path_exists(const std::string& path);
bool is_directory(const std::string& path);
// Plain names of the entries of a directory (no "." or "..").
Result<std::vector<std::string>> list_dir(const std::string& path);
// Copies the whole of `src` into the new file `dst` (copy_file_range: a reflink or an
// in-kernel copy where the file system can) and fsyncs it; kExists when `dst` is there.
Status copy_file(const File& src, const std::string& dst);
// rename(2), naming both paths in errors.
Status rename_file(const std::string& from, const std::string& to);
// Removes a file; a missing file is not an error.
Status remove_file(const std::string& path);
// Removes a directory tree (the checkpoint manager's retention).
Status remove_tree(const std::string& path);

// Reads a whole file of at most `max_bytes`.
Result<std::string> read_file(const std::string& path, uint64_t max_bytes);
// Writes `dir/name` atomically: a temporary file in `dir`, fsync, rename over `name`, fsync
// of `dir`. Readers see the old content or the new one, never a mix.
Status write_file_atomic(const std::string& dir, std::string_view name, std::string_view content);

}  // namespace dsd::checkpoint
