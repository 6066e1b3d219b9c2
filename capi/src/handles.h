// Generation-checked handle tables (sokol_gfx / wasmtime style).
//
// A handle is 64 bits: kind (8) | generation (24) | slot index (32). Generation 0 is never
// issued, so a zeroed handle is always invalid; releasing a slot bumps its generation, so a
// stale, double-released or forged handle is detected instead of touching freed memory.
//
// The read path takes no table-wide lock: slots live in fixed-size chunks that never move,
// each slot carries its live generation in an atomic tag, and the value is read under that
// slot's own spin lock (held for a copy of the value or a short read of it). Only insert and
// release — handle creation and destruction, the write path — take the table's mutex, for
// the free list and for growing the chunk directory. So calls on distinct handles never
// contend, and calls on one handle contend only for the few instructions of the read.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string_view>
#include <vector>

#include "core/base/make_error.h"
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
  HandleTable() = default;
  HandleTable(const HandleTable&) = delete;
  HandleTable& operator=(const HandleTable&) = delete;

  uint64_t insert(T value) {
    std::lock_guard<std::mutex> lock(mu_);
    uint32_t index;
    if (!free_.empty()) {
      index = free_.back();
      free_.pop_back();
    } else {
      index = size_;
      const uint32_t chunk = index >> kChunkBits;
      if (chunk >= kMaxChunks) throw std::bad_alloc();  // 2^28 live handles: out of memory
      if (chunks_[chunk].load(std::memory_order_relaxed) == nullptr) {
        owned_.push_back(std::make_unique<Chunk>());
        chunks_[chunk].store(owned_.back().get(), std::memory_order_release);
      }
      ++size_;
    }
    Slot& s = slot(index);
    {
      SlotLock hold(s);
      s.value = std::move(value);
    }
    s.tag.store(s.generation, std::memory_order_release);
    return encode(index, s.generation);
  }

  // A copy of the value (a strong reference): it stays valid if the handle is released
  // concurrently.
  Result<T> get(uint64_t bits) const {
    Slot* s = TRY(find(bits));
    SlotLock hold(*s);
    if (s->tag.load(std::memory_order_relaxed) != generation_of(bits)) return stale(bits);
    return s->value;
  }

  // Runs `read(const T&)` on the value without copying it, under the slot's lock: for
  // short reads only (no call back into dsd, no blocking).
  template <class F>
  Status read(uint64_t bits, F&& read) const {
    Slot* s = TRY(find(bits));
    SlotLock hold(*s);
    if (s->tag.load(std::memory_order_relaxed) != generation_of(bits)) return stale(bits);
    read(static_cast<const T&>(s->value));
    return ok();
  }

  Status release(uint64_t bits) {
    T dropped;  // destroyed after the locks are let go: a deleter may call back into dsd
    {
      std::lock_guard<std::mutex> lock(mu_);
      Slot* s = TRY(find(bits));
      const uint32_t generation = generation_of(bits);
      {
        SlotLock hold(*s);
        if (s->tag.load(std::memory_order_relaxed) != generation) return stale(bits);
        s->tag.store(0, std::memory_order_relaxed);
        dropped = std::move(s->value);
        s->value = T{};
      }
      s->generation = generation == kMaxGeneration ? 1 : generation + 1;
      free_.push_back(index_of(bits));
    }
    return ok();
  }

  size_t live_count() const {
    std::lock_guard<std::mutex> lock(mu_);
    return size_ - free_.size();
  }

 private:
  static constexpr uint32_t kMaxGeneration = 0xFFFFFF;
  static constexpr uint32_t kChunkBits = 12;  // 4096 slots per chunk
  static constexpr uint32_t kMaxChunks = 1u << 16;

  struct Slot {
    std::atomic<uint32_t> tag{0};    // the live generation, 0 while free
    std::atomic<bool> locked{false};
    uint32_t generation = 1;         // the next generation to issue (under mu_)
    T value{};
  };
  struct Chunk {
    Slot slots[1u << kChunkBits];
  };

  class SlotLock {
   public:
    explicit SlotLock(Slot& s) : s_(s) {
      while (s_.locked.exchange(true, std::memory_order_acquire)) {
        while (s_.locked.load(std::memory_order_relaxed)) {
#if defined(__x86_64__) || defined(__i386__)
          __builtin_ia32_pause();
#endif
        }
      }
    }
    ~SlotLock() { s_.locked.store(false, std::memory_order_release); }
    SlotLock(const SlotLock&) = delete;
    SlotLock& operator=(const SlotLock&) = delete;

   private:
    Slot& s_;
  };

  static uint64_t encode(uint32_t index, uint32_t generation) {
    return (static_cast<uint64_t>(K) << 56) | (static_cast<uint64_t>(generation) << 32) | index;
  }
  static uint32_t index_of(uint64_t bits) { return static_cast<uint32_t>(bits & 0xFFFFFFFFu); }
  static uint32_t generation_of(uint64_t bits) {
    return static_cast<uint32_t>((bits >> 32) & kMaxGeneration);
  }

  Slot& slot(uint32_t index) const {
    return chunks_[index >> kChunkBits].load(std::memory_order_relaxed)
        ->slots[index & ((1u << kChunkBits) - 1)];
  }

  static Error stale(uint64_t bits) {
    return make_error(Code::kStaleHandle, "{} handle 0x{:016x} is stale (released or never issued)",
                      handle_kind_name(static_cast<uint8_t>(K)), bits);
  }

  // The slot a handle names, if its kind matches, its chunk exists and its generation is live
  // (checked again under the slot's lock by the caller).
  Result<Slot*> find(uint64_t bits) const {
    if (bits == 0) {
      return make_error(Code::kStaleHandle, "{} handle is zero (never created)",
                        handle_kind_name(static_cast<uint8_t>(K)));
    }
    const auto kind = static_cast<uint8_t>(bits >> 56);
    if (kind != static_cast<uint8_t>(K)) {
      return make_error(Code::kWrongKind, "expected a {} handle, got a {} handle (0x{:016x})",
                        handle_kind_name(static_cast<uint8_t>(K)), handle_kind_name(kind), bits);
    }
    const uint32_t index = index_of(bits);
    const uint32_t generation = generation_of(bits);
    if (generation == 0 || (index >> kChunkBits) >= kMaxChunks) return stale(bits);
    Chunk* chunk = chunks_[index >> kChunkBits].load(std::memory_order_acquire);
    if (chunk == nullptr) return stale(bits);
    Slot& s = chunk->slots[index & ((1u << kChunkBits) - 1)];
    if (s.tag.load(std::memory_order_acquire) != generation) return stale(bits);
    return &s;
  }

  mutable std::mutex mu_;  // insert and release only
  std::unique_ptr<std::atomic<Chunk*>[]> chunks_{new std::atomic<Chunk*>[kMaxChunks]()};
  std::vector<std::unique_ptr<Chunk>> owned_;
  std::vector<uint32_t> free_;
  uint32_t size_ = 0;  // slots ever used
};

}  // namespace dsd::capi
