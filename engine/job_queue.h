// The one place that includes moodycamel::ConcurrentQueue.
//
// Debian installs it as <concurrentqueue/concurrentqueue.h> (upstream's own
// install differs); everything else includes this header and uses the aliases
// below, so the include path, the traits and the token types are fixed here.
//
// The queues carry 32-bit slot indices only: a moodycamel queue cannot be
// iterated, so the job table is the one place that knows every pending job.
#pragma once

#include <concurrentqueue/concurrentqueue.h>

#include <cstddef>
#include <cstdint>

#include "engine/padded.h"

namespace jobengine::detail {

using SlotIndex = std::uint32_t;

struct IndexQueueTraits : moodycamel::ConcurrentQueueDefaultTraits {
  // 64 indices (256 bytes) per block: fewer block hand-offs per job than the
  // default 32 at no real memory cost for 4-byte items.
  static constexpr std::size_t BLOCK_SIZE = 64;
  // Every producer, block and block index placed on lines of its own, the
  // producer's indices apart from its list links (padded.h says why: up to
  // ~1.5x on 1x1 submit throughput, decided otherwise by the heap).
  static inline void* malloc(std::size_t size) { return queue_malloc(size); }
  static inline void free(void* ptr) { queue_free(ptr); }
};

using IndexQueue = moodycamel::ConcurrentQueue<SlotIndex, IndexQueueTraits>;
using QueueProducerToken = moodycamel::ProducerToken;
using QueueConsumerToken = moodycamel::ConsumerToken;

}  // namespace jobengine::detail
