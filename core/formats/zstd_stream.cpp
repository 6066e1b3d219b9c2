#include "core/formats/zstd_stream.h"

#include <fcntl.h>
#include <unistd.h>
#include <zstd.h>

#include <cerrno>
#include <cstring>
#include <memory>
#include <vector>

#include "core/base/make_error.h"

namespace dsd {
namespace {

struct DctxFree {
  void operator()(ZSTD_DCtx* d) const { ZSTD_freeDCtx(d); }
};

struct Fd {
  int fd = -1;
  ~Fd() {
    if (fd >= 0) ::close(fd);
  }
};

Error corrupt(const std::string& path, std::string_view what, uint64_t offset, uint64_t length, std::string why) {
  return make_error_at(Code::kCorrupt, path, "{} at '{}' [{}, +{}): zstd stream {}", what, path, offset, length,
                       why);
}

}  // namespace

Result<std::string> zstd_decompress_range(const std::string& path, uint64_t offset, uint64_t length,
                                          uint64_t max_bytes, std::string_view what) {
  Fd f;
  f.fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (f.fd < 0) {
    const int e = errno;
    return make_error_at(e == ENOENT ? Code::kNotFound : Code::kIo, path, "cannot open '{}': {}", path,
                         std::strerror(e));
  }
  std::unique_ptr<ZSTD_DCtx, DctxFree> dctx(ZSTD_createDCtx());
  if (!dctx) return make_error(Code::kInternal, "ZSTD_createDCtx failed");

  if (length == 0) return corrupt(path, what, offset, length, "is empty");
  std::vector<char> in(ZSTD_DStreamInSize());
  const size_t step = ZSTD_DStreamOutSize();
  std::string out;
  size_t hint = 1;  // ZSTD_decompressStream's return: 0 once a frame is complete
  uint64_t consumed = 0;
  bool first = true;
  while (consumed < length) {
    const size_t want = static_cast<size_t>(std::min<uint64_t>(in.size(), length - consumed));
    const ssize_t r = ::pread(f.fd, in.data(), want, static_cast<off_t>(offset + consumed));
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) return make_error_at(Code::kIo, path, "reading '{}': {}", path, std::strerror(errno));
    if (r == 0) return corrupt(path, what, offset, length, "is cut short by the end of the file");
    if (first) {
      // A frame that declares its size lets the output be allocated once (capped by max_bytes).
      const unsigned long long declared = ZSTD_getFrameContentSize(in.data(), static_cast<size_t>(r));
      if (declared != ZSTD_CONTENTSIZE_UNKNOWN && declared != ZSTD_CONTENTSIZE_ERROR) {
        if (declared > max_bytes) {
          return corrupt(path, what, offset, length,
                         fmt::format("declares {} bytes, more than the {} the item can hold", declared, max_bytes));
        }
        out.reserve(static_cast<size_t>(declared));
      }
      first = false;
    }
    consumed += static_cast<uint64_t>(r);
    ZSTD_inBuffer input{in.data(), static_cast<size_t>(r), 0};
    while (input.pos < input.size) {
      // Grow by one block at a time (amortised doubling), so only written bytes are zeroed.
      const size_t before = out.size();
      if (out.capacity() - before < step) out.reserve(std::max<size_t>(out.capacity() * 2, before + step));
      out.resize(before + step);
      ZSTD_outBuffer output{out.data() + before, step, 0};
      hint = ZSTD_decompressStream(dctx.get(), &output, &input);
      out.resize(before + output.pos);
      if (ZSTD_isError(hint)) return corrupt(path, what, offset, length, fmt::format("is corrupt ({})", ZSTD_getErrorName(hint)));
      if (out.size() > max_bytes) {
        return corrupt(path, what, offset, length,
                       fmt::format("decompresses to more than the {} bytes the item can hold", max_bytes));
      }
    }
  }
  // Flush what the decoder still holds (input fully consumed, output may be pending).
  while (hint != 0) {
    const size_t before = out.size();
    out.resize(before + step);
    ZSTD_outBuffer output{out.data() + before, step, 0};
    ZSTD_inBuffer input{nullptr, 0, 0};
    hint = ZSTD_decompressStream(dctx.get(), &output, &input);
    out.resize(before + output.pos);
    if (ZSTD_isError(hint)) return corrupt(path, what, offset, length, fmt::format("is corrupt ({})", ZSTD_getErrorName(hint)));
    if (out.size() > max_bytes) {
      return corrupt(path, what, offset, length,
                     fmt::format("decompresses to more than the {} bytes the item can hold", max_bytes));
    }
    if (output.pos == 0) break;  // no progress without more input: the frame is truncated
  }
  if (hint != 0) return corrupt(path, what, offset, length, "is truncated (its last frame does not end)");
  return out;
}

}  // namespace dsd
