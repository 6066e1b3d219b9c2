// Streaming XXH3-64 of a chunk and of each of its fixed-size blocks, in one pass over bytes
// fed in pieces of any size.
#pragma once

#ifndef XXH_STATIC_LINKING_ONLY
#define XXH_STATIC_LINKING_ONLY  // XXH3_state_t on the stack
#endif
#include <xxhash.h>
// On x86, libxxhash's runtime dispatch picks AVX2/AVX-512 code: two to three times the
// speed of its baseline SSE2 build on every checkpoint byte saved, loaded or verified.
#if (defined(__x86_64__) || defined(__i386__)) && __has_include(<xxh_x86dispatch.h>)
#include <xxh_x86dispatch.h>
#endif

#include <algorithm>
#include <cstdint>
#include <vector>

namespace dsd::checkpoint {

class ChunkHasher {
 public:
  explicit ChunkHasher(uint64_t block_size) : block_size_(block_size) {
    XXH3_64bits_reset(&whole_);
    XXH3_64bits_reset(&block_);
  }

  void feed(const void* data, uint64_t len) {
    const auto* p = static_cast<const unsigned char*>(data);
    XXH3_64bits_update(&whole_, p, len);
    while (len > 0) {
      const uint64_t take = std::min(len, block_size_ - in_block_);
      if (in_block_ == 0 && take == block_size_) {
        blocks_.push_back(XXH3_64bits(p, take));  // a whole block: one-shot is faster
      } else {
        XXH3_64bits_update(&block_, p, take);
        in_block_ += take;
        if (in_block_ == block_size_) flush_block();
      }
      p += take;
      len -= take;
    }
  }

  // The chunk's hash; the block list is complete after this.
  uint64_t finish() {
    if (in_block_ > 0) flush_block();
    return XXH3_64bits_digest(&whole_);
  }
  std::vector<uint64_t>& blocks() { return blocks_; }

 private:
  void flush_block() {
    blocks_.push_back(XXH3_64bits_digest(&block_));
    XXH3_64bits_reset(&block_);
    in_block_ = 0;
  }

  uint64_t block_size_;
  uint64_t in_block_ = 0;
  XXH3_state_t whole_;
  XXH3_state_t block_;
  std::vector<uint64_t> blocks_;
};

}  // namespace dsd::checkpoint
