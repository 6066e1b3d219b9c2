#include "core/formats/zip_check.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstring>
#include <memory>

#include "core/base/make_error.h"

namespace dsd {
namespace {

// Slice-by-8 tables of the reflected IEEE polynomial.
struct Crc32Tables {
  std::array<std::array<uint32_t, 256>, 8> t{};
  Crc32Tables() {
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? (c >> 1) ^ 0xEDB88320u : c >> 1;
      t[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; ++i) {
      for (size_t s = 1; s < 8; ++s) t[s][i] = (t[s - 1][i] >> 8) ^ t[0][t[s - 1][i] & 0xFF];
    }
  }
};

const Crc32Tables& tables() {
  static const Crc32Tables tabs;
  return tabs;
}

uint16_t u16(const unsigned char* p) { return static_cast<uint16_t>(p[0] | (p[1] << 8)); }
uint32_t u32(const unsigned char* p) {
  return static_cast<uint32_t>(p[0]) | (static_cast<uint32_t>(p[1]) << 8) | (static_cast<uint32_t>(p[2]) << 16) |
         (static_cast<uint32_t>(p[3]) << 24);
}
uint64_t u64(const unsigned char* p) { return static_cast<uint64_t>(u32(p)) | (static_cast<uint64_t>(u32(p + 4)) << 32); }

class Archive {
 public:
  Archive(int fd, uint64_t base, uint64_t size, std::string where)
      : fd_(fd), base_(base), size_(size), where_(std::move(where)) {}
  // An archive in memory (borrowed for the Archive's lifetime).
  Archive(std::string_view bytes, std::string where)
      : mem_(bytes.data()), base_(0), size_(bytes.size()), where_(std::move(where)) {}
  ~Archive() {
    if (fd_ >= 0) ::close(fd_);
  }
  Archive(const Archive&) = delete;
  Archive& operator=(const Archive&) = delete;

  uint64_t size() const { return size_; }

  Status read(uint64_t pos, void* dst, uint64_t n) const {
    if (pos > size_ || n > size_ - pos) return corrupt(fmt::format("a read of {} bytes at {} runs past its end", n, pos));
    auto* p = static_cast<char*>(dst);
    if (mem_ != nullptr) {
      std::memcpy(p, mem_ + pos, n);
      return ok();
    }
    while (n > 0) {
      const ssize_t r = ::pread(fd_, p, std::min<uint64_t>(n, 1u << 30), static_cast<off_t>(base_ + pos));
      if (r < 0 && errno == EINTR) continue;
      if (r < 0) return make_error_at(Code::kIo, where_, "reading zip archive {}: {}", where_, std::strerror(errno));
      if (r == 0) return corrupt("the file ends early");
      p += r;
      pos += static_cast<uint64_t>(r);
      n -= static_cast<uint64_t>(r);
    }
    return ok();
  }

  Error corrupt(std::string what) const {
    return make_error_at(Code::kCorrupt, where_, "zip archive {}: {}", where_, what);
  }

  Result<uint32_t> crc_of(uint64_t pos, uint64_t n) const {
    constexpr uint64_t kPiece = 4u << 20;
    std::unique_ptr<unsigned char[]> buf(new unsigned char[std::min(kPiece, std::max<uint64_t>(n, 1))]);
    uint32_t crc = 0;
    for (uint64_t done = 0; done < n;) {
      const uint64_t take = std::min(kPiece, n - done);
      TRY(read(pos + done, buf.get(), take));
      crc = crc32(buf.get(), take, crc);
      done += take;
    }
    return crc;
  }

 private:
  int fd_ = -1;
  const char* mem_ = nullptr;
  uint64_t base_;
  uint64_t size_;
  std::string where_;
};

struct Directory {
  uint64_t entries = 0;
  uint64_t offset = 0;
  uint64_t size = 0;
};

Result<Directory> find_directory(const Archive& a) {
  constexpr uint64_t kEocd = 22;
  if (a.size() < kEocd) return a.corrupt("too short to be a zip archive");
  const uint64_t tail = std::min<uint64_t>(a.size(), kEocd + 65535);
  std::vector<unsigned char> buf(tail);
  TRY(a.read(a.size() - tail, buf.data(), tail));
  for (uint64_t i = tail - kEocd + 1; i-- > 0;) {
    const unsigned char* p = buf.data() + i;
    if (u32(p) != 0x06054b50u) continue;
    Directory d{u16(p + 10), u32(p + 16), u32(p + 12)};
    const uint64_t eocd_pos = a.size() - tail + i;
    if ((d.entries == 0xFFFF || d.offset == 0xFFFFFFFFu || d.size == 0xFFFFFFFFu) && eocd_pos >= 20) {
      unsigned char loc[20];
      TRY(a.read(eocd_pos - 20, loc, 20));
      if (u32(loc) != 0x07064b50u) return a.corrupt("a zip64 directory without its locator");
      unsigned char rec[56];
      TRY(a.read(u64(loc + 8), rec, 56));
      if (u32(rec) != 0x06064b50u) return a.corrupt("a malformed zip64 end of central directory");
      d = Directory{u64(rec + 32), u64(rec + 48), u64(rec + 40)};
    }
    if (d.offset > a.size() || d.size > a.size() - d.offset) return a.corrupt("its central directory lies outside it");
    return d;
  }
  return a.corrupt("no end of central directory record (not a zip archive, or truncated)");
}

}  // namespace

uint32_t crc32(const void* data, size_t n, uint32_t crc) {
  const auto& t = tables().t;
  const auto* p = static_cast<const unsigned char*>(data);
  crc = ~crc;
  while (n >= 8) {
    const uint32_t one = u32(p) ^ crc;
    const uint32_t two = u32(p + 4);
    crc = t[7][one & 0xFF] ^ t[6][(one >> 8) & 0xFF] ^ t[5][(one >> 16) & 0xFF] ^ t[4][one >> 24] ^
          t[3][two & 0xFF] ^ t[2][(two >> 8) & 0xFF] ^ t[1][(two >> 16) & 0xFF] ^ t[0][two >> 24];
    p += 8;
    n -= 8;
  }
  while (n-- > 0) crc = (crc >> 8) ^ t[0][(crc ^ *p++) & 0xFF];
  return ~crc;
}

namespace {
Result<std::vector<ZipRecordCheck>> check_archive(const Archive& a);
}  // namespace

Result<std::vector<ZipRecordCheck>> check_zip(const std::string& path, uint64_t offset, uint64_t length) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    return make_error_at(errno == ENOENT ? Code::kNotFound : Code::kIo, path, "cannot open '{}': {}", path,
                         std::strerror(errno));
  }
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    ::close(fd);
    return make_error_at(Code::kIo, path, "cannot stat '{}'", path);
  }
  const auto file_size = static_cast<uint64_t>(st.st_size);
  const std::string where = offset == 0 && length == UINT64_MAX ? fmt::format("'{}'", path)
                                                                : fmt::format("'{}' [{}, +{})", path, offset, length);
  if (length == UINT64_MAX) length = file_size >= offset ? file_size - offset : 0;
  if (offset > file_size || length > file_size - offset) {
    ::close(fd);
    return make_error_at(Code::kCorrupt, path, "zip archive {} runs past the end of the file", where);
  }
  const Archive a(fd, offset, length, where);
  return check_archive(a);
}

Result<std::vector<ZipRecordCheck>> check_zip_memory(std::string_view bytes, const std::string& where) {
  const Archive a(bytes, where);
  return check_archive(a);
}

namespace {

Result<std::vector<ZipRecordCheck>> check_archive(const Archive& a) {
  const Directory dir = TRY(find_directory(a));
  std::vector<unsigned char> cd(dir.size);
  TRY(a.read(dir.offset, cd.data(), dir.size));
  struct Record {
    ZipRecordCheck check;
    uint32_t crc = 0;
    bool stored = true;
  };
  std::vector<Record> records;
  uint64_t pos = 0;
  for (uint64_t i = 0; i < dir.entries; ++i) {
    if (pos + 46 > cd.size() || u32(cd.data() + pos) != 0x02014b50u) return a.corrupt("a malformed central directory");
    const unsigned char* h = cd.data() + pos;
    const uint16_t name_len = u16(h + 28);
    const uint16_t extra_len = u16(h + 30);
    const uint16_t comment_len = u16(h + 32);
    if (pos + 46 + name_len + extra_len + comment_len > cd.size()) return a.corrupt("a central directory entry is cut");
    Record r;
    r.check.name.assign(reinterpret_cast<const char*>(h + 46), name_len);
    r.crc = u32(h + 16);
    r.stored = u16(h + 10) == 0;
    uint64_t csize = u32(h + 20);
    uint64_t usize = u32(h + 24);
    uint64_t local = u32(h + 42);
    // The zip64 extra field holds the 64-bit values of the fields saturated above.
    for (uint64_t e = 0; e + 4 <= extra_len;) {
      const unsigned char* x = h + 46 + name_len + e;
      const uint16_t id = u16(x);
      const uint16_t len = u16(x + 2);
      if (e + 4 + len > extra_len) break;
      if (id == 0x0001) {
        uint64_t k = 4;
        if (usize == 0xFFFFFFFFu && k + 8 <= 4u + len) usize = u64(x + k), k += 8;
        if (csize == 0xFFFFFFFFu && k + 8 <= 4u + len) csize = u64(x + k), k += 8;
        if (local == 0xFFFFFFFFu && k + 8 <= 4u + len) local = u64(x + k), k += 8;
      }
      e += 4u + len;
    }
    unsigned char lh[30];
    TRY(a.read(local, lh, 30));
    if (u32(lh) != 0x04034b50u) return a.corrupt(fmt::format("record '{}' has no local header", r.check.name));
    r.check.offset = local + 30 + u16(lh + 26) + u16(lh + 28);
    r.check.size = csize;
    if (r.check.offset > a.size() || csize > a.size() - r.check.offset) {
      return a.corrupt(fmt::format("record '{}' lies outside the archive", r.check.name));
    }
    if (r.stored && csize != usize) return a.corrupt(fmt::format("stored record '{}' has two sizes", r.check.name));
    records.push_back(std::move(r));
    pos += 46u + name_len + extra_len + comment_len;
  }
  const bool any_crc = std::any_of(records.begin(), records.end(), [](const Record& r) { return r.crc != 0; });
  std::vector<ZipRecordCheck> out;
  out.reserve(records.size());
  for (Record& r : records) {
    if (any_crc && r.stored) r.check.crc_ok = TRY(a.crc_of(r.check.offset, r.check.size)) == r.crc;
    out.push_back(std::move(r.check));
  }
  return out;
}

}  // namespace

}  // namespace dsd
