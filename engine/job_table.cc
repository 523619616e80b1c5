#include "engine/job_table.h"

#include <sys/mman.h>

#include <algorithm>
#include <bit>
#include <cstring>
#include <new>

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

std::size_t SlotPool::give(const SlotIndex* in, std::size_t n) noexcept {
  if (const std::uint32_t m = pop(empty_); m != kNil) {
    mags_[m].count = static_cast<std::uint32_t>(n);
    std::memcpy(mags_[m].slots, in, n * sizeof(SlotIndex));
    push(full_, m);
    return n;
  }
  // Every descriptor is pooled full or in a thread's hands. There are more
  // descriptors than capacity / kMagazine, so unless threads hold them, the
  // full stack has magazines with room: pop until the indices fit (each
  // popped magazine is this thread's, P1), then push them all back. The
  // popped ones are chained through next_, which the push rewrites.
  std::uint32_t held = kNil;
  std::size_t put = 0;
  while (put < n) {
    const std::uint32_t m = pop(full_);
    if (m == kNil) break;
    Magazine& mag = mags_[m];
    const std::size_t k = std::min<std::size_t>(n - put, kMagazine - mag.count);
    std::memcpy(mag.slots + mag.count, in + put, k * sizeof(SlotIndex));
    mag.count += static_cast<std::uint32_t>(k);
    put += k;
    next_[m].store(held, std::memory_order_relaxed);
    held = m;
  }
  while (held != kNil) {
    const std::uint32_t next = next_[held].load(std::memory_order_relaxed);
    push(full_, held);
    held = next;
  }
  return put;
}

namespace {

constexpr std::size_t kHugePage = std::size_t{2} << 20;

// The slot array: anonymous memory of its own, rounded up to 2 MiB and
// offered to the kernel for transparent huge pages (MADV_HUGEPAGE, which
// Debian's default THP mode "madvise" waits for). A 1M-slot table is 256 MiB:
// with 4 KiB pages that is 65,536 page faults when it is touched and a TLB
// miss on nearly every slot a snapshot scan, a recovery or a submit visits;
// with 2 MiB pages, 128 and almost none. Where THP is off the advice is
// ignored and the table is what new[] would have made.
std::size_t mapped_bytes(std::size_t capacity) {
  const std::size_t bytes = capacity * sizeof(Slot);
  return (bytes + kHugePage - 1) / kHugePage * kHugePage;
}

// Maps the table; populate() constructs the slots and faults the pages in.
Slot* map_slots(std::size_t capacity) {
  const std::size_t bytes = mapped_bytes(capacity);
  void* p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) throw std::bad_alloc();
#ifdef MADV_HUGEPAGE
  if (bytes >= kHugePage) ::madvise(p, bytes, MADV_HUGEPAGE);  // advice only: failure is fine
#endif
  return static_cast<Slot*>(p);
}

}  // namespace

bool JobTable::populate_chunk() noexcept {
  // Relaxed: the chunks are disjoint, and whoever uses the slots afterwards
  // has joined every populating thread (populate()'s contract).
  const std::size_t chunk = next_chunk_.fetch_add(1, std::memory_order_relaxed);
  const std::size_t begin = chunk * kPopulateChunk;
  if (begin >= capacity_) return false;
  const std::size_t end = std::min(capacity_, begin + kPopulateChunk);
  // Constructing writes every header, and touching the payload line maps the
  // whole slot now, so the first submits do not page-fault.
  for (std::size_t i = begin; i < end; ++i) {
    new (&slots_[i]) Slot();
    slots_[i].inline_payload[0] = 0;
  }
  return true;
}

JobTable::Mapping::~Mapping() { ::munmap(slots, bytes); }

JobTable::JobTable(std::size_t capacity)
    : capacity_(capacity),
      mapping_{map_slots(capacity), mapped_bytes(capacity)},
      slots_(mapping_.slots),
      pool_(capacity),
      hint_mask_(std::bit_ceil(std::max<std::size_t>(capacity, 1)) - 1),
      id_hint_(std::make_unique<std::atomic<std::uint64_t>[]>(hint_mask_ + 1)),
      region_out_(std::make_unique<std::atomic<std::uint32_t>[]>(
          (std::max<std::size_t>(capacity, 1) + kScanRegion - 1) / kScanRegion)) {
  for (std::size_t i = 0; i <= hint_mask_; ++i) id_hint_[i].store(kNoId, std::memory_order_relaxed);
  // The pool holds indices only: no slot is touched before populate().
  // Pushed highest first, so the first magazines taken hold slots 0, 1, ...
  SlotIndex mag[SlotPool::kMagazine];
  for (std::size_t end = capacity; end > 0;) {
    const std::size_t begin = (end - 1) / SlotPool::kMagazine * SlotPool::kMagazine;
    for (std::size_t i = begin; i < end; ++i) mag[end - 1 - i] = static_cast<SlotIndex>(i);
    if (pool_.give(mag, end - begin) != end - begin) throw std::bad_alloc();  // sized for it
    end = begin;
  }
}

std::size_t JobTable::put_free(const SlotIndex* in, std::size_t n) noexcept {
  std::size_t done = 0;
  while (done < n) {
    const std::size_t k = pool_.give(in + done, std::min(n - done, SlotPool::kMagazine));
    if (k == 0) break;
    count_out(in + done, k, -1);
    done += k;
  }
  return done;
}

JobTable::~JobTable() {
  for (std::size_t i = 0; i < capacity_; ++i) {
    slots_[i].free_heap();
    slots_[i].~Slot();
  }
}

bool JobTable::park_retired(const SlotIndex* in, std::size_t n) noexcept {
  std::lock_guard<std::mutex> lock(parked_mu_);
  if (horizon_.load(std::memory_order_relaxed) == kNoHorizon) return false;
  try {
    parked_.insert(parked_.end(), in, in + n);  // all or nothing
  } catch (const std::bad_alloc&) {
    return false;
  }
  return true;
}

std::size_t JobTable::release_parked() noexcept {
  std::vector<SlotIndex> slots;
  {
    std::lock_guard<std::mutex> lock(parked_mu_);
    slots.swap(parked_);
  }
  for (SlotIndex i : slots) reclaim(slot(i));
  std::size_t put = 0;
  while (put < slots.size()) {
    const std::size_t n = put_free(slots.data() + put, slots.size() - put);
    if (n == 0) {
      // Out of descriptors (threads hold them briefly): keep the rest parked
      // (reclaimed already, which a second reclaim() keeps). Into the buffer
      // they came in when nothing was parked since, which allocates nothing.
      slots.erase(slots.begin(), slots.begin() + static_cast<std::ptrdiff_t>(put));
      std::lock_guard<std::mutex> lock(parked_mu_);
      if (parked_.empty()) {
        parked_.swap(slots);
      } else {
        try {
          parked_.insert(parked_.end(), slots.begin(), slots.end());
        } catch (const std::bad_alloc&) {
          // Out of memory as well: these slots stay out of the pool (the
          // table holds that many fewer jobs), which loses no job.
        }
      }
      break;
    }
    put += n;
  }
  return put;
}

std::size_t RetireBuffer::flush_unheld(JobTable& table) noexcept {
  if (unheld_.empty()) return 0;
  for (SlotIndex i : unheld_) JobTable::reclaim(table.slot(i));
  const std::size_t put = table.put_free(unheld_.data(), unheld_.size());
  // Whatever the pool could not take (out of descriptors) stays, already
  // reclaimed, for the next flush.
  unheld_.erase(unheld_.begin(), unheld_.begin() + static_cast<std::ptrdiff_t>(put));
  return put;
}

std::size_t RetireBuffer::flush(JobTable& table, std::size_t park_from) noexcept {
  const std::size_t unheld = flush_unheld(table);
  if (head_ == pending_.size()) return unheld;
  const std::uint64_t horizon = table.reclaim_horizon();
  // The releasable prefix ends where the first run at or above the horizon starts.
  std::size_t run = run_head_;
  while (run < runs_.size() && runs_[run].epoch < horizon) ++run;
  const std::size_t end = run < runs_.size() ? runs_[run].start : pending_.size();
  std::size_t put = 0;
  if (end > head_) {
    for (std::size_t i = head_; i < end; ++i) JobTable::reclaim(table.slot(pending_[i]));
    put = table.put_free(pending_.data() + head_, end - head_);
    // Whatever the pool could not take (out of descriptors) stays, already
    // reclaimed, for the next flush.
    head_ += put;
  }
  // What the horizon holds back goes to the table's parking, so this worker
  // does not keep it through its next (possibly long) handler.
  if (head_ == end && pending_.size() - end >= std::max<std::size_t>(park_from, 1) &&
      table.park_retired(pending_.data() + end, pending_.size() - end)) {
    pending_.resize(end);
    runs_.resize(run);
  }
  while (run_head_ < runs_.size() &&
         (run_head_ + 1 == runs_.size() ? pending_.size() : runs_[run_head_ + 1].start) <= head_) {
    ++run_head_;
  }
  if (head_ == pending_.size()) {
    pending_.clear();
    runs_.clear();
    head_ = 0;
    run_head_ = 0;
  } else if (head_ > 4096 && head_ > pending_.size() / 2) {
    // Compact so the buffer does not grow forever.
    pending_.erase(pending_.begin(), pending_.begin() + static_cast<std::ptrdiff_t>(head_));
    runs_.erase(runs_.begin(), runs_.begin() + static_cast<std::ptrdiff_t>(run_head_));
    for (Run& r : runs_) r.start = r.start > head_ ? r.start - head_ : 0;
    head_ = 0;
    run_head_ = 0;
  }
  return unheld + put;
}

}  // namespace jobengine::detail
