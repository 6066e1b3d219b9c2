// Opening torch.save archives for reading (internal to formats/): the zip through libtorch's
// PyTorchStreamReader over a file range or memory, and data.pkl through the restricted
// unpickler with torch.save's allow-list. torch_load.cpp builds values from what it opens.
#pragma once

#include <caffe2/serialize/inline_container.h>
#include <caffe2/serialize/read_adapter_interface.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <memory>
#include <string>
#include <string_view>

#include "core/base/make_error.h"
#include "core/base/torch_call.h"
#include "core/formats/pickle.h"
#include "core/formats/torch_save.h"

namespace dsd {

using caffe2::serialize::PyTorchStreamReader;
using caffe2::serialize::ReadAdapterInterface;

// A byte range of an open file; owns the descriptor. Remembers the last read error so that
// an I/O failure surfaces as kIo rather than as a corrupt zip.
class FileRange final : public ReadAdapterInterface {
 public:
  FileRange(int fd, uint64_t base, uint64_t size) : fd_(fd), base_(base), size_(size) {}
  ~FileRange() override { ::close(fd_); }
  FileRange(const FileRange&) = delete;
  FileRange& operator=(const FileRange&) = delete;

  size_t size() const override { return size_; }
  size_t read(uint64_t pos, void* buf, size_t n, const char* /*what*/) const override {
    if (pos >= size_) return 0;
    n = static_cast<size_t>(std::min<uint64_t>(n, size_ - pos));
    size_t done = 0;
    while (done < n) {
      const ssize_t r = ::pread(fd_, static_cast<char*>(buf) + done, n - done,
                                static_cast<off_t>(base_ + pos + done));
      if (r < 0 && errno == EINTR) continue;
      if (r < 0) {
        last_errno_ = errno;
        break;
      }
      if (r == 0) break;
      done += static_cast<size_t>(r);
    }
    return done;
  }
  int last_errno() const { return last_errno_; }
  int fd() const { return fd_; }
  uint64_t base() const { return base_; }

 private:
  int fd_;
  uint64_t base_;
  uint64_t size_;
  mutable int last_errno_ = 0;
};

// An open archive: the zip reader plus what every reader of it needs.
struct OpenArchive {
  std::shared_ptr<ReadAdapterInterface> adapter;
  const FileRange* file = nullptr;  // when reading a file, for its errno
  std::unique_ptr<PyTorchStreamReader> zip;
  std::string where;  // TorchArchive::describe()
  bool big_endian = false;

  // Runs a zip operation; libtorch's exceptions become kIo after a failed read, kCorrupt
  // otherwise.
  template <class F>
  auto call(std::string_view what, F&& f) {
    auto r = torch_call(Code::kCorrupt, fmt::format("reading torch.save archive {}: {}", where, what),
                        std::forward<F>(f));
    if (!r.ok() && file != nullptr && file->last_errno() != 0) {
      Error e = std::move(r).error();
      e.code = Code::kIo;
      e.message += fmt::format(" ({})", std::strerror(file->last_errno()));
      return decltype(r)(std::move(e));
    }
    return r;
  }
};

Result<OpenArchive> open_archive(const TorchArchive& archive);
// data.pkl, unpickled; kUnsupported for a TorchScript archive.
Result<PickleValue> read_data_pkl(OpenArchive& a);

}  // namespace dsd
