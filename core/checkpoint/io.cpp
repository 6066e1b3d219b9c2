#include "core/checkpoint/io.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <random>

#include "core/base/make_error.h"
#include "core/checkpoint/crash_point.h"

namespace dsd::checkpoint {
namespace {

Error io_error(int err, const std::string& path, std::string_view what) {
  const Code code = (err == ENOSPC || err == EDQUOT || err == EFBIG) ? Code::kNoSpace : Code::kIo;
  return make_error_at(code, path, "{} '{}': {}", what, path, std::strerror(err));
}

}  // namespace

File& File::operator=(File&& o) noexcept {
  if (this != &o) {
    if (fd_ >= 0) ::close(fd_);
    fd_ = o.fd_;
    path_ = std::move(o.path_);
    o.fd_ = -1;
  }
  return *this;
}

File::~File() {
  if (fd_ >= 0) ::close(fd_);
}

Status File::close() {
  if (fd_ < 0) return ok();
  const int fd = fd_;
  fd_ = -1;
  if (::close(fd) != 0 && errno != EINTR) return io_error(errno, path_, "cannot close");
  return ok();
}

std::string join(std::string_view dir, std::string_view name) {
  std::string out(dir);
  if (!out.empty() && out.back() != '/') out += '/';
  out += name;
  return out;
}

Result<File> open_for_read(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    if (errno == ENOENT) return make_error_at(Code::kNotFound, path, "file '{}' does not exist", path);
    return io_error(errno, path, "cannot open");
  }
  return File(fd, path);
}

Result<File> open_dir(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) {
    if (errno == ENOENT) return make_error_at(Code::kNotFound, path, "directory '{}' does not exist", path);
    return io_error(errno, path, "cannot open the directory");
  }
  return File(fd, path);
}

Result<File> open_in_dir(const File& dir, std::string_view name, bool follow_links) {
  const std::string path = join(dir.path(), name);
  // O_NONBLOCK: opening a FIFO must not wait for a writer; it is refused below.
  const int flags = O_RDONLY | O_CLOEXEC | O_NONBLOCK | (follow_links ? 0 : O_NOFOLLOW);
  const int fd = ::openat(dir.fd(), std::string(name).c_str(), flags);
  if (fd < 0) {
    if (errno == ENOENT) return make_error_at(Code::kNotFound, path, "file '{}' does not exist", path);
    if (errno == ELOOP && !follow_links) {
      return make_error_at(Code::kCorrupt, path,
                           "data file '{}' is a symbolic link; dsd reads only the checkpoint directory's own files "
                           "(allow_external_files opts in)",
                           path);
    }
    return io_error(errno, path, "cannot open");
  }
  File f(fd, path);
  struct stat st{};
  if (::fstat(fd, &st) != 0) return io_error(errno, path, "cannot stat");
  if (!S_ISREG(st.st_mode)) {
    return make_error_at(Code::kCorrupt, path, "data file '{}' is not a regular file", path);
  }
  const int fl = ::fcntl(fd, F_GETFL);
  if (fl >= 0) ::fcntl(fd, F_SETFL, fl & ~O_NONBLOCK);
  return f;
}

Result<File> open_sibling_dir(const File& dir, std::string_view name, bool follow_links) {
  const std::string path = fmt::format("{}/../{}", dir.path(), name);
  const int parent = ::openat(dir.fd(), "..", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (parent < 0) return io_error(errno, path, "cannot open the parent directory of");
  const int fd = ::openat(parent, std::string(name).c_str(),
                          O_RDONLY | O_DIRECTORY | O_CLOEXEC | (follow_links ? 0 : O_NOFOLLOW));
  const int err = errno;
  ::close(parent);
  if (fd < 0) {
    if (err == ENOENT) return make_error_at(Code::kNotFound, path, "directory '{}' does not exist", path);
    if ((err == ELOOP || err == ENOTDIR) && !follow_links) {
      return make_error_at(Code::kCorrupt, path,
                           "checkpoint directory '{}' is a symbolic link or not a directory; dsd follows references "
                           "only into sibling directories (allow_external_files opts in)",
                           path);
    }
    return io_error(err, path, "cannot open the directory");
  }
  return File(fd, path);
}

Result<File> create_new(const std::string& path) {
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  if (fd < 0) {
    if (errno == EEXIST) return make_error_at(Code::kExists, path, "file '{}' already exists", path);
    return io_error(errno, path, "cannot create");
  }
  return File(fd, path);
}

Status write_all(const File& f, const void* data, size_t len) {
  const auto* p = static_cast<const char*>(data);
  while (len > 0) {
    // Linux writes at most 0x7ffff000 bytes per call.
    const ssize_t w = ::write(f.fd(), p, std::min<size_t>(len, size_t{1} << 30));
    if (w < 0) {
      if (errno == EINTR) continue;
      return io_error(errno, f.path(), "cannot write");
    }
    if (w == 0) return io_error(ENOSPC, f.path(), "cannot write");
    p += w;
    len -= static_cast<size_t>(w);
  }
  return ok();
}

Status pread_all(const File& f, void* data, size_t len, uint64_t offset) {
  auto* p = static_cast<char*>(data);
  while (len > 0) {
    const ssize_t r = ::pread(f.fd(), p, std::min<size_t>(len, size_t{1} << 30), static_cast<off_t>(offset));
    if (r < 0) {
      if (errno == EINTR) continue;
      return io_error(errno, f.path(), "cannot read");
    }
    if (r == 0) {
      return make_error_at(Code::kCorrupt, f.path(), "data file '{}' is truncated: nothing to read at byte {}",
                           f.path(), offset);
    }
    p += r;
    len -= static_cast<size_t>(r);
    offset += static_cast<uint64_t>(r);
  }
  return ok();
}

Result<uint64_t> file_size(const File& f) {
  struct stat st {};
  if (::fstat(f.fd(), &st) != 0) return io_error(errno, f.path(), "cannot stat");
  return static_cast<uint64_t>(st.st_size);
}

Status sync(const File& f) {
  if (::fsync(f.fd()) != 0) return io_error(errno, f.path(), "cannot fsync");
  return ok();
}

Status start_writeback(const File& f, uint64_t offset, uint64_t len) {
  if (::sync_file_range(f.fd(), static_cast<off_t>(offset), static_cast<off_t>(len), SYNC_FILE_RANGE_WRITE) != 0 &&
      errno != EINVAL && errno != ESPIPE && errno != ENOSYS) {
    return io_error(errno, f.path(), "cannot start writing back");
  }
  return ok();
}

Status sync_dir(const std::string& dir) {
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return io_error(errno, dir, "cannot open directory");
  const int rc = ::fsync(fd);
  const int err = errno;
  ::close(fd);
  // Some file systems refuse fsync on directories (EINVAL); their renames are durable anyway.
  if (rc != 0 && err != EINVAL) return io_error(err, dir, "cannot fsync directory");
  return ok();
}

Status make_dirs(const std::string& path) {
  std::error_code ec;
  std::filesystem::create_directories(path, ec);
  if (ec) return make_error_at(Code::kIo, path, "cannot create directory '{}': {}", path, ec.message());
  if (!is_directory(path)) {
    return make_error_at(Code::kIo, path, "'{}' exists and is not a directory", path);
  }
  return ok();
}

bool path_exists(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0;
}

bool is_directory(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

Result<std::vector<std::string>> list_dir(const std::string& path) {
  DIR* d = ::opendir(path.c_str());
  if (d == nullptr) {
    if (errno == ENOENT) return make_error_at(Code::kNotFound, path, "directory '{}' does not exist", path);
    return io_error(errno, path, "cannot list directory");
  }
  std::vector<std::string> out;
  while (const dirent* e = ::readdir(d)) {
    std::string_view n = e->d_name;
    if (n != "." && n != "..") out.emplace_back(n);
  }
  ::closedir(d);
  return out;
}

Status copy_file(const File& src, const std::string& dst) {
  const uint64_t size = TRY(file_size(src));
  File out = TRY(create_new(dst));
  auto fail = [&](Error e) -> Status {
    (void)remove_file(dst);
    return e;
  };
  loff_t in_off = 0;
  uint64_t left = size;
  while (left > 0) {
    const ssize_t n = ::copy_file_range(src.fd(), &in_off, out.fd(), nullptr, std::min<uint64_t>(left, 1u << 30), 0);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EXDEV || errno == ENOSYS || errno == EOPNOTSUPP || errno == EINVAL)) {
      // No in-kernel copy between these file systems: through a buffer.
      std::vector<char> buf(std::min<uint64_t>(left, 8u << 20));
      while (left > 0) {
        const size_t step = static_cast<size_t>(std::min<uint64_t>(left, buf.size()));
        Status s = pread_all(src, buf.data(), step, static_cast<uint64_t>(in_off));
        if (s.ok()) s = write_all(out, buf.data(), step);
        if (!s.ok()) return fail(std::move(s).error());
        in_off += static_cast<loff_t>(step);
        left -= step;
      }
      break;
    }
    if (n < 0) return fail(io_error(errno, dst, "cannot copy into"));
    if (n == 0) return fail(make_error_at(Code::kCorrupt, src.path(), "'{}' ended while being copied", src.path()));
    left -= static_cast<uint64_t>(n);
  }
  Status s = sync(out);
  if (s.ok()) s = out.close();
  if (!s.ok()) return fail(std::move(s).error());
  return ok();
}

Status rename_file(const std::string& from, const std::string& to) {
  if (::rename(from.c_str(), to.c_str()) != 0) {
    return make_error_at(errno == ENOENT ? Code::kNotFound : Code::kIo, from, "cannot rename '{}' to '{}': {}", from,
                         to, std::strerror(errno));
  }
  return ok();
}

Status remove_file(const std::string& path) {
  if (::unlink(path.c_str()) != 0 && errno != ENOENT) return io_error(errno, path, "cannot remove");
  return ok();
}

Status remove_tree(const std::string& path) {
  std::error_code ec;
  std::filesystem::remove_all(path, ec);
  if (ec) return make_error_at(Code::kIo, path, "cannot remove '{}': {}", path, ec.message());
  return ok();
}

Result<std::string> read_file(const std::string& path, uint64_t max_bytes) {
  File f = TRY(open_for_read(path));
  const uint64_t size = TRY(file_size(f));
  if (size > max_bytes) {
    return make_error_at(Code::kCorrupt, path, "'{}' is {} bytes, more than the limit of {}", path,
                         size, max_bytes);
  }
  std::string out(static_cast<size_t>(size), '\0');
  TRY(pread_all(f, out.data(), out.size(), 0));
  return out;
}

Status write_file_atomic(const std::string& dir, std::string_view name, std::string_view content) {
  static std::atomic<uint64_t> counter{0};
  const std::string tmp = join(dir, fmt::format("{}.tmp-{}-{}", name, ::getpid(), counter++));
  const std::string final_path = join(dir, name);
  {
    File f = TRY(create_new(tmp));
    Status s = write_all(f, content.data(), content.size());
    if (s.ok()) s = sync(f);
    if (s.ok()) s = f.close();
    if (!s.ok()) {
      (void)remove_file(tmp);
      return s;
    }
  }
  crash_point("atomic_write.before_rename");
  if (::rename(tmp.c_str(), final_path.c_str()) != 0) {
    Error e = io_error(errno, final_path, "cannot rename into place");
    (void)remove_file(tmp);
    return e;
  }
  return sync_dir(dir);
}

}  // namespace dsd::checkpoint
