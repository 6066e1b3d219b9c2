// Generation-checked handle tables (sokol_gfx / wasmtime style).
//
// A handle is 64 bits: kind (8) | generation (24) | slot index (32). Generation 0 is never
// issued, so a zeroed handle is always invalid; releasing a slot bumps its generation, so a
// stale or double-released handle is detected instead of touching freed memory. Lookups hand
// out a copy of the entry (a strong reference) taken under the table's lock, so a concurrent
// release cannot free an object in use.
#pragma once

#include <cstdint>
#include <mutex>
#include <string_view>
#include <vector>

#include "core/base/format.h"
#include "core/base/result.h"

namespace dsd::capi {

enum class HandleKind : uint8_t { kTensor = 1, kLayout = 2 };

inline std::string_view handle_kind_name(uint8_t kind) {
  switch (kind) {
    case 1: return "tensor";
    case 2: return "layout";
    default: return "unknown";
  }
}

template <class T, HandleKind K>
class HandleTable {
 public:
  uint64_t insert(T value) {
    std::lock_guard<std::mutex> lock(mu_);
    uint32_t index;
    if (!free_.empty()) {
      index = free_.back();
      free_.pop_back();
    } else {
      index = static_cast<uint32_t>(slots_.size());
      slots_.push_back(Slot{});
    }
    Slot& s = slots_[index];
    s.live = true;
    s.value = std::move(value);
    return encode(index, s.generation);
  }

  Result<T> get(uint64_t bits) const {
    std::lock_guard<std::mutex> lock(mu_);
    const Slot* s = TRY(find(bits));
    return s->value;
  }

  Status release(uint64_t bits) {
    T dropped;  // destroyed after the lock is let go: a deleter may call back into dsd
    {
      std::lock_guard<std::mutex> lock(mu_);
      const Slot* found = TRY(find(bits));
      Slot& s = const_cast<Slot&>(*found);
      dropped = std::move(s.value);
      s.value = T{};
      s.live = false;
      s.generation = s.generation == kMaxGeneration ? 1 : s.generation + 1;
      free_.push_back(static_cast<uint32_t>(&s - slots_.data()));
    }
    return ok();
  }

  size_t live_count() const {
    std::lock_guard<std::mutex> lock(mu_);
    return slots_.size() - free_.size();
  }

 private:
  static constexpr uint32_t kMaxGeneration = 0xFFFFFF;

  struct Slot {
    uint32_t generation = 1;
    bool live = false;
    T value{};
  };

  static uint64_t encode(uint32_t index, uint32_t generation) {
    return (static_cast<uint64_t>(K) << 56) | (static_cast<uint64_t>(generation) << 32) | index;
  }

  Result<const Slot*> find(uint64_t bits) const {
    if (bits == 0) {
      return make_error(Code::kStaleHandle, "{} handle is zero (never created)",
                        handle_kind_name(static_cast<uint8_t>(K)));
    }
    const auto kind = static_cast<uint8_t>(bits >> 56);
    if (kind != static_cast<uint8_t>(K)) {
      return make_error(Code::kWrongKind, "expected a {} handle, got a {} handle (0x{:016x})",
                        handle_kind_name(static_cast<uint8_t>(K)), handle_kind_name(kind), bits);
    }
    const auto index = static_cast<uint32_t>(bits & 0xFFFFFFFFu);
    const auto generation = static_cast<uint32_t>((bits >> 32) & kMaxGeneration);
    if (index >= slots_.size() || !slots_[index].live || slots_[index].generation != generation) {
      return make_error(Code::kStaleHandle, "{} handle 0x{:016x} is stale (released or never issued)",
                        handle_kind_name(static_cast<uint8_t>(K)), bits);
    }
    return &slots_[index];
  }

  mutable std::mutex mu_;
  std::vector<Slot> slots_;
  std::vector<uint32_t> free_;
};

}  // namespace dsd::capi
