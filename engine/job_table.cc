#include "engine/job_table.h"

#include <cstring>

namespace jobengine::detail {

JobTable::JobTable(std::size_t capacity)
    : capacity_(capacity),
      slots_(new Slot[capacity]),
      // Room for every index at once: the pool never allocates after open().
      free_(capacity + IndexQueueTraits::BLOCK_SIZE) {
  // Touch every slot now (new Slot[] already ran the constructors, which
  // write the header; the payload area is touched too) so the first submits
  // do not page-fault.
  for (std::size_t i = 0; i < capacity; ++i) slots_[i].inline_payload[0] = 0;
  std::vector<SlotIndex> all(capacity);
  for (std::size_t i = 0; i < capacity; ++i) all[i] = static_cast<SlotIndex>(i);
  QueueProducerToken token(free_);
  if (!free_.enqueue_bulk(token, all.data(), all.size())) throw std::bad_alloc();
}

JobTable::~JobTable() {
  for (std::size_t i = 0; i < capacity_; ++i) delete[] slots_[i].heap_payload;
  delete[] slots_;
}

void JobTable::claim(Slot& s, std::uint64_t epoch) noexcept {
  // Relaxed: the slot came out of the free pool, whose dequeue acquired the
  // retiring worker's writes; these stores reach a worker through the job
  // queue's release/acquire, and a lock-free reader validates with seq.
  s.seq.store(s.seq.load(std::memory_order_relaxed) + 1, std::memory_order_release);
  s.finish_epoch.store(0, std::memory_order_relaxed);
  s.submit_epoch.store(epoch, std::memory_order_relaxed);
  s.state.store(SlotState::kQueued, std::memory_order_relaxed);
}

void JobTable::retire(Slot& s, std::uint64_t epoch) noexcept {
  delete[] s.heap_payload;
  s.heap_payload = nullptr;
  s.finish_epoch.store(epoch, std::memory_order_relaxed);
  s.state.store(SlotState::kRetired, std::memory_order_relaxed);
  // Release: a reader that sees the new seq sees the retirement.
  s.seq.store(s.seq.load(std::memory_order_relaxed) + 1, std::memory_order_release);
}

std::size_t RetireBuffer::flush(JobTable& table, QueueProducerToken& token) {
  if (pending_.empty()) return 0;
  const std::uint64_t horizon = table.reclaim_horizon();
  if (max_epoch_ < horizon) {
    for (SlotIndex i : pending_) JobTable::reclaim(table.slot(i));
    // Out of memory in the pool (it was sized for every slot, so only its
    // block index can allocate): keep them here for the next flush.
    if (!table.put_free(token, pending_.data(), pending_.size())) return 0;
    std::size_t n = pending_.size();
    pending_.clear();
    max_epoch_ = 0;
    return n;
  }
  // A snapshot holds the horizon: release only what finished below it.
  scratch_.clear();
  std::uint64_t kept_max = 0;
  std::size_t kept = 0;
  for (SlotIndex i : pending_) {
    Slot& s = table.slot(i);
    std::uint64_t f = s.finish_epoch.load(std::memory_order_relaxed);
    if (f < horizon) {
      JobTable::reclaim(s);
      scratch_.push_back(i);
    } else {
      pending_[kept++] = i;
      if (f > kept_max) kept_max = f;
    }
  }
  pending_.resize(kept);
  max_epoch_ = kept_max;
  if (!table.put_free(token, scratch_.data(), scratch_.size())) {
    // Out of memory in the pool: keep them here (reclaimable) for next time.
    for (SlotIndex i : scratch_) pending_.push_back(i);
    return 0;
  }
  return scratch_.size();
}

}  // namespace jobengine::detail
