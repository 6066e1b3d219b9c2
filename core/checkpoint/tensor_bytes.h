// A tensor's bytes in row-major order, piece by piece: straight from its memory when it is a
// plain contiguous CPU tensor, else through a bounded host buffer (device tensors, views).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>

#include <algorithm>
#include <cstdint>
#include <string>

#include "core/base/result.h"
#include "core/base/torch_call.h"

namespace dsd::checkpoint {

// Largest piece staged through the host buffer in one go.
inline constexpr uint64_t kPieceBytes = 64u << 20;

// Calls fn(ptr, len) over the tensor's bytes in row-major order, straight from its memory when
// it is a plain contiguous CPU tensor, else through a bounded host buffer.
// `stop`, when given, ends the walk early (ok()) once fn has set it.
template <class Fn>
Status for_each_piece(const at::Tensor& t, const std::string& key, Fn&& fn, const bool* stop = nullptr) {
  const uint64_t nbytes = static_cast<uint64_t>(t.numel()) * t.element_size();
  if (nbytes == 0) return ok();
  const bool direct = t.device().is_cpu() && t.is_contiguous() && !t.is_conj() && !t.is_neg();
  if (direct) {
    const auto* p = static_cast<const char*>(t.data_ptr());
    for (uint64_t off = 0; off < nbytes; off += kPieceBytes) {
      TRY(fn(p + off, std::min(kPieceBytes, nbytes - off)));
      if (stop != nullptr && *stop) return ok();
    }
    return ok();
  }
  return torch_call(Code::kDevice, fmt::format("copying '{}' to host memory", key), [&]() -> Status {
    if (t.dim() == 0) {
      at::Tensor c = t.cpu().resolve_conj().resolve_neg().contiguous();
      return fn(c.data_ptr(), nbytes);
    }
    const uint64_t row = nbytes / static_cast<uint64_t>(t.size(0));
    const int64_t rows = static_cast<int64_t>(std::max<uint64_t>(1, kPieceBytes / row));
    at::Tensor buf = at::empty({static_cast<int64_t>(std::min<uint64_t>(rows, t.size(0)) * row)},
                               at::TensorOptions().dtype(at::kByte));
    for (int64_t i = 0; i < t.size(0); i += rows) {
      at::Tensor slice = t.narrow(0, i, std::min(rows, t.size(0) - i));
      at::Tensor dst = at::from_blob(buf.data_ptr(), slice.sizes(), at::TensorOptions().dtype(t.dtype()));
      dst.copy_(slice);
      TRY(fn(buf.data_ptr(), static_cast<uint64_t>(slice.numel()) * t.element_size()));
      if (stop != nullptr && *stop) return ok();
    }
    return ok();
  });
}

}  // namespace dsd::checkpoint
