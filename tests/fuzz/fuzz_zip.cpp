// libFuzzer target: zip archives (torch.save files, DCP .distcp items) from arbitrary bytes
// must be checked or rejected cleanly, and every record reported must lie inside the archive.
// check_zip reads a path, so the input is written to an anonymous in-memory file.
#include <sys/mman.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "core/formats/zip_check.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const int fd = memfd_create("fuzz_zip", 0);
  if (fd < 0) std::abort();
  if (ftruncate(fd, 0) != 0) std::abort();
  for (size_t done = 0; done < size;) {
    const ssize_t n = pwrite(fd, data + done, size - done, static_cast<off_t>(done));
    if (n <= 0) std::abort();
    done += static_cast<size_t>(n);
  }
  const std::string path = "/proc/self/fd/" + std::to_string(fd);
  auto records = dsd::check_zip(path);
  if (!records.ok()) return 0;
  for (const auto& r : *records) {
    if (r.offset > size || r.size > size - r.offset) std::abort();
  }
  return 0;
}
