#include "engine/job_table.h"

#include <algorithm>
#include <cstring>

namespace jobengine::detail {

SlotPool::SlotPool(std::size_t capacity) {
  const std::size_t n = 2 * ((capacity + kMagazine - 1) / kMagazine) + 64;
  mags_ = std::make_unique<Magazine[]>(n);
  next_ = std::make_unique<std::atomic<std::uint32_t>[]>(n);
  for (std::size_t i = 0; i < n; ++i) push(empty_, static_cast<std::uint32_t>(i));
}

std::uint32_t SlotPool::pop(std::atomic<std::uint64_t>& head) noexcept {
  // Acquire (P3): see the pusher's next and magazine contents.
  std::uint64_t h = head.load(std::memory_order_acquire);
  for (;;) {
    const auto idx = static_cast<std::uint32_t>(h);
    if (idx == kNil) return kNil;
    // Relaxed: a stale value is harmless, the tagged CAS below then fails (P2).
    const std::uint32_t next = next_[idx].load(std::memory_order_relaxed);
    const std::uint64_t replacement = (((h >> 32) + 1) << 32) | next;
    if (head.compare_exchange_weak(h, replacement, std::memory_order_acquire,
                                   std::memory_order_acquire)) {
      return idx;
    }
  }
}

void SlotPool::push(std::atomic<std::uint64_t>& head, std::uint32_t m) noexcept {
  std::uint64_t h = head.load(std::memory_order_relaxed);
  for (;;) {
    next_[m].store(static_cast<std::uint32_t>(h), std::memory_order_relaxed);
    const std::uint64_t replacement = (((h >> 32) + 1) << 32) | m;
    // Release (P3): publishes next_[m] and the magazine to the next popper.
    if (head.compare_exchange_weak(h, replacement, std::memory_order_release,
                                   std::memory_order_relaxed)) {
      return;
    }
  }
}

std::size_t SlotPool::take(SlotIndex* out) noexcept {
  const std::uint32_t m = pop(full_);
  if (m == kNil) return 0;
  const std::size_t n = mags_[m].count;
  std::memcpy(out, mags_[m].slots, n * sizeof(SlotIndex));
  push(empty_, m);
  return n;
}

bool SlotPool::give(const SlotIndex* in, std::size_t n) noexcept {
  const std::uint32_t m = pop(empty_);
  if (m == kNil) return false;
  mags_[m].count = static_cast<std::uint32_t>(n);
  std::memcpy(mags_[m].slots, in, n * sizeof(SlotIndex));
  push(full_, m);
  return true;
}

JobTable::JobTable(std::size_t capacity)
    : capacity_(capacity), slots_(new Slot[capacity]), pool_(capacity) {
  // Touch every slot now (new Slot[] already ran the constructors, which
  // write the header; the payload area is touched too) so the first submits
  // do not page-fault.
  for (std::size_t i = 0; i < capacity; ++i) slots_[i].inline_payload[0] = 0;
  // Pushed highest first, so the first magazines taken hold slots 0, 1, ...
  SlotIndex mag[SlotPool::kMagazine];
  for (std::size_t end = capacity; end > 0;) {
    const std::size_t begin = (end - 1) / SlotPool::kMagazine * SlotPool::kMagazine;
    for (std::size_t i = begin; i < end; ++i) mag[end - 1 - i] = static_cast<SlotIndex>(i);
    if (!pool_.give(mag, end - begin)) throw std::bad_alloc();  // cannot happen: sized for it
    end = begin;
  }
}

std::size_t JobTable::put_free(const SlotIndex* in, std::size_t n) noexcept {
  std::size_t done = 0;
  while (done < n) {
    const std::size_t k = std::min(n - done, SlotPool::kMagazine);
    if (!pool_.give(in + done, k)) break;
    done += k;
  }
  return done;
}

JobTable::~JobTable() {
  for (std::size_t i = 0; i < capacity_; ++i) delete[] slots_[i].heap_payload;
  delete[] slots_;
}

std::size_t RetireBuffer::flush(JobTable& table) {
  if (pending_.empty()) return 0;
  const std::uint64_t horizon = table.reclaim_horizon();
  if (max_epoch_ < horizon) {
    for (SlotIndex i : pending_) JobTable::reclaim(table.slot(i));
    const std::size_t n = table.put_free(pending_.data(), pending_.size());
    // Whatever the pool could not take (out of descriptors) stays for later.
    pending_.erase(pending_.begin(), pending_.begin() + static_cast<std::ptrdiff_t>(n));
    if (pending_.empty()) max_epoch_ = 0;
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
  const std::size_t n = table.put_free(scratch_.data(), scratch_.size());
  // Reclaimable ones the pool could not take stay here for the next flush.
  pending_.insert(pending_.end(), scratch_.begin() + static_cast<std::ptrdiff_t>(n), scratch_.end());
  return n;
}

}  // namespace jobengine::detail
