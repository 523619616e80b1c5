// Where moodycamel's allocations go: cache-line placement that does not
// depend on what malloc happened to hand out.
//
// The finding. A moodycamel ExplicitProducer starts with the producer-list
// links its consumers walk on every poll (vptr at +0, next at +8, inactive,
// token) followed by the indices of the queue itself (tailIndex at +32, which
// the submitter writes on every enqueue, then headIndex and the dequeue
// counters the worker updates, and tailBlock). malloc returns 16-byte aligned
// blocks, so where the 64-byte line boundaries fall inside the producer was
// up to the heap: 1x1 BM_Engine_Submit ran at ~17 Mjobs/s in one engine and
// ~25 in the next, a lottery fixed for the life of the engine (a test program
// opening six engines in a row saw both, engine after engine). Placing the
// producer at each offset of a line in turn (16 runs of 1M jobs each):
//
//   offset  0  8 16 24 | 32 40 48 | 56          next at +8, tailIndex at +32
//   Mjobs/s ~17        |   ~25    | ~16
//
// Fast exactly when `next` and `tailIndex` are on different lines: at offsets
// 0-24 both sit in the first line, at 56 both in the second. So every block
// moodycamel allocates (producers, blocks, block indexes) starts
// kQueueAllocOffset = 32 bytes into a 128-byte aligned region: the producer's
// indices then begin a line of their own, right after the links, on every
// engine. The offset follows Debian 12's moodycamel 1.0.3 layout
// (job_queue.h asserts what it relies on where it can); the padding also keeps
// every queue allocation off the lines of any other heap block, and off the
// 128-byte pairs that Intel's adjacent-line prefetcher fetches together.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdlib>

namespace jobengine::detail {

inline constexpr std::size_t kNoFalseSharing = 128;
inline constexpr std::size_t kQueueAllocOffset = 32;

// At least `bytes` starting kQueueAllocOffset bytes into a kNoFalseSharing-
// aligned region whose size is a multiple of kNoFalseSharing; nullptr when out
// of memory. Free with queue_free().
// Tests only (fault injection): n >= 0 makes the queue allocation n from now
// (0: the next one) return nullptr, as if memory ran out; later ones succeed.
// -1, the default, never fails. One relaxed load per allocation, and queue
// allocations are rare (producers, block indices, blocks beyond capacity).
inline std::atomic<long> g_fail_queue_alloc_in{-1};

inline void* queue_malloc(std::size_t bytes) noexcept {
  if (g_fail_queue_alloc_in.load(std::memory_order_relaxed) >= 0 &&
      g_fail_queue_alloc_in.fetch_sub(1, std::memory_order_relaxed) == 0) {
    return nullptr;
  }
  const std::size_t total =
      (bytes + kQueueAllocOffset + kNoFalseSharing - 1) / kNoFalseSharing * kNoFalseSharing;
  auto* base = static_cast<unsigned char*>(std::aligned_alloc(kNoFalseSharing, total));
  return base == nullptr ? nullptr : base + kQueueAllocOffset;
}
inline void queue_free(void* p) noexcept {
  if (p != nullptr) std::free(static_cast<unsigned char*>(p) - kQueueAllocOffset);
}

}  // namespace jobengine::detail
