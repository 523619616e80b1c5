// JobTable: the preallocated slot arena that holds every pending job.
//
// A job lives in one Slot from submit() until its handler finishes for good.
// The queues carry only slot indices. Free slots sit in a lock-free pool
// (an IndexQueue); submitters take them in bulk into a thread-local cache and
// workers give them back in bulk, so the table's shared state is touched once
// per batch, not per job.
//
// Epochs and retirement (what the snapshot thread relies on):
//  1. epoch() is a global counter, starting at 1, that only grows. Every slot
//     is stamped with the epoch read when it was submitted (submit_epoch) and
//     when its job finished for good (finish_epoch, 0 while not finished).
//  2. A finished slot is *retired*, not freed: it goes into its worker's
//     RetireBuffer. It returns to the free pool only once its finish_epoch is
//     below reclaim_horizon(). While no snapshot runs the horizon is
//     kNoHorizon (everything is reclaimable at once); a snapshot that cuts at
//     epoch C sets it to C + 1 for its duration, so no slot finished in or
//     after the cut epoch is reused under the snapshot's reader.
//  3. seq is a per-slot version bumped (release) when a slot is taken and when
//     it is retired, so a reader that copies a slot without a lock can detect
//     that it changed under it (a seqlock read: seq before == seq after).
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <memory>
#include <new>
#include <vector>

#include "engine/job_queue.h"
#include "jobengine/job.h"

namespace jobengine::detail {

inline constexpr std::size_t kCacheLine = 64;
inline constexpr std::uint64_t kNoHorizon = std::numeric_limits<std::uint64_t>::max();

enum class SlotState : std::uint8_t { kFree, kQueued, kRunning, kRetired };

// One job. 64-byte header + inline payload = kSlotBytes, cache-line aligned.
struct alignas(kCacheLine) Slot {
  std::atomic<std::uint32_t> seq{0};          // seqlock version, see (3)
  std::atomic<SlotState> state{SlotState::kFree};
  std::uint8_t priority = 0;
  std::uint16_t attempts = 0;                 // runs started so far
  HandlerId handler = 0;
  std::uint32_t payload_size = 0;
  JobId id = 0;
  std::int64_t submit_ns = 0;                 // steady_clock, ns since its epoch
  std::int64_t run_at_ns = 0;                 // when it may run (== submit_ns for now)
  std::atomic<std::uint64_t> submit_epoch{0};
  std::atomic<std::uint64_t> finish_epoch{0};
  unsigned char* heap_payload = nullptr;      // owned; set iff payload_size > inline
  unsigned char inline_payload[kInlinePayloadBytes];

  const unsigned char* payload() const noexcept {
    return heap_payload != nullptr ? heap_payload : inline_payload;
  }
};
static_assert(sizeof(Slot) == kSlotBytes, "slot header must stay 64 bytes");
static_assert(alignof(Slot) == kCacheLine);

class JobTable {
 public:
  // Allocates and touches capacity slots and fills the free pool. Throws
  // std::bad_alloc; Engine::open() turns that into a Status.
  explicit JobTable(std::size_t capacity);
  ~JobTable();
  JobTable(const JobTable&) = delete;
  JobTable& operator=(const JobTable&) = delete;

  std::size_t capacity() const noexcept { return capacity_; }
  Slot& slot(SlotIndex i) noexcept { return slots_[i]; }
  const Slot& slot(SlotIndex i) const noexcept { return slots_[i]; }

  // Takes up to `max` free slot indices. Lock-free; 0 when the pool is empty.
  std::size_t take_free(QueueConsumerToken& token, SlotIndex* out, std::size_t max) {
    return free_.try_dequeue_bulk(token, out, max);
  }
  // Returns slots to the pool. They must be in state kFree already.
  // Returns false only if the queue could not allocate (then nothing was added).
  bool put_free(QueueProducerToken& token, const SlotIndex* in, std::size_t n) {
    return n == 0 || free_.enqueue_bulk(token, in, n);
  }
  IndexQueue& free_queue() noexcept { return free_; }
  std::size_t free_approx() const noexcept { return free_.size_approx(); }

  // --- epochs, see (1) and (2) ---
  // Acquire pairs with advance_epoch's release: a thread that sees epoch e
  // sees everything the snapshot thread did before making it e.
  std::uint64_t epoch() const noexcept { return epoch_.load(std::memory_order_acquire); }
  std::uint64_t advance_epoch() noexcept {
    return epoch_.fetch_add(1, std::memory_order_acq_rel) + 1;
  }
  std::uint64_t reclaim_horizon() const noexcept {
    return horizon_.load(std::memory_order_acquire);
  }
  // Slots retired at an epoch >= horizon stay out of the pool until the
  // horizon is raised again. Release: publishes the caller's prior writes.
  void set_reclaim_horizon(std::uint64_t horizon) noexcept {
    horizon_.store(horizon, std::memory_order_release);
  }

  // Marks a slot taken by a submitter: bumps seq, sets kQueued. The caller
  // fills the fields before publishing the index to a queue (the queue's
  // enqueue/dequeue pair orders those writes for the worker).
  void claim(Slot& s, std::uint64_t epoch) noexcept;

  // Ends a job: stamps finish_epoch, frees any heap payload, state kRetired.
  void retire(Slot& s, std::uint64_t epoch) noexcept;

  // Puts a retired slot back to kFree so it can be reused.
  static void reclaim(Slot& s) noexcept {
    s.state.store(SlotState::kFree, std::memory_order_relaxed);
  }

 private:
  std::size_t capacity_;
  Slot* slots_;
  IndexQueue free_;
  alignas(kCacheLine) std::atomic<std::uint64_t> epoch_{1};
  alignas(kCacheLine) std::atomic<std::uint64_t> horizon_{kNoHorizon};
};

// A worker's retired slots, waiting until the reclaim horizon lets them back
// into the free pool. Owned by one thread. Never shrinks its storage.
class RetireBuffer {
 public:
  explicit RetireBuffer(std::size_t reserve) { pending_.reserve(reserve); }

  void add(SlotIndex i, std::uint64_t finish_epoch) {
    pending_.push_back(i);
    if (finish_epoch > max_epoch_) max_epoch_ = finish_epoch;
  }
  std::size_t size() const noexcept { return pending_.size(); }

  // Moves every retired slot back to the pool if all finished below the
  // horizon; otherwise those below it only. Returns how many went back.
  std::size_t flush(JobTable& table, QueueProducerToken& token);

 private:
  std::vector<SlotIndex> pending_;
  std::vector<SlotIndex> scratch_;
  std::uint64_t max_epoch_ = 0;
};

}  // namespace jobengine::detail
