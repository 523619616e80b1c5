// JobTable: the preallocated slot arena that holds every pending job.
//
// A job lives in one Slot from submit() until its handler finishes for good.
// The queues carry only slot indices. Free slots sit in a SlotPool of
// magazines (Bonwick's magazine allocator): submitters take a magazine of up
// to kSlotCacheSize indices into a thread-local cache and workers give retired
// slots back a magazine at a time, so the pool's shared state is touched once
// per 32 jobs, not per job. The pool is a stack (LIFO), so the slots reused
// next are the ones freed last, still warm in cache: the working set follows
// the number of pending jobs, not the table's capacity.
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
//     One exception: a slot whose job was submitted and finished in the same
//     epoch (submit_epoch == finish_epoch, in_no_cut()) returns at once,
//     whatever the horizon (RetireBuffer::add_unheld), so that a snapshot
//     does not hold every slot that the jobs submitted during it go through
//     (on a bounded table, submitters met kQueueFull until it ended). It is
//     safe because a reader of cut C only ever copies a slot whose job is in
//     C and is held: say it accepts the pair (f, s), f loaded first (3) and
//     either 0 or > C, then s in 1..C. s is the submit stamp of some
//     occupant X of the slot; being <= C, X's claim happened before
//     begin_cut() returned (engine.cc I5; possibly after the epoch bump, and
//     then X may carry an older epoch than the slot's previous occupant
//     finished in, which nothing here relies on), so the finish load
//     returned X's claim (0) or something later. It was not from a later
//     occupant Y either: Y's claim (0) and Y's retire (f) are release stores
//     after Y's submit stamp, so a reader that acquired one of them would
//     then load Y's stamp or a later one, not X's. So both values are X's:
//     X was pending at the cut, or finished in an epoch > C; it cannot
//     finish in an epoch <= C once begin_cut() has returned (I5). Its finish
//     epoch is then > C >= its submit epoch, the exception does not apply,
//     and the horizon holds its slot as before. A job in no cut is therefore
//     never copied, whether its slot is reused or not.
//  3. A snapshot reader decides whether a slot belongs to its cut from
//     (finish_epoch, submit_epoch), loading finish_epoch first (acquire). A
//     claimer stores the new submit_epoch *before* resetting finish_epoch to
//     0 (release), so a reader that sees the new occupant's 0 also sees its
//     new submit_epoch, which is after the cut: it never pairs a new
//     occupant's 0 with an old occupant's epoch. A slot that belongs to a cut
//     cannot be reused while that snapshot runs (2), so its immutable fields
//     (id, handler, payload, times) are stable while it is copied; the fields
//     a worker changes meanwhile (state, attempts) are atomics.
//  4. Nothing on the submit path *loads* from a slot: claiming and filling are
//     stores only, so the submitter never stalls on the cache line the worker
//     last wrote (the stores drain from the store buffer in the background).
//
// Finding a job by id (cancel()): every stamp of an id into a slot also
// records (id, slot) in the id-hint entry id mod H, H the power of two >= the
// capacity (note_id). An entry packs both into one word: the slot index in
// its low log2(H) bits, the id's other bits above (the low ones are the
// entry's position), so a reader knows exactly which id an entry is about.
// The entry of id X then says one of two things:
//  - it is about X: X's latest stamp went to that slot. If the slot does not
//    hold X live, X is live nowhere (a later stamp of X, by requeue_dead(),
//    would have rewritten the entry), and cancel() can say so at once;
//  - it is about another id (a later one congruent to X overwrote it, or an
//    earlier one stamped late by another submitter, or X was never stamped):
//    no conclusion; cancel() scans the table.
// So a job is found, or known gone, with one lookup unless H jobs were
// submitted after it. 8 bytes per entry: 8-16 per slot.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <memory>
#include <mutex>
#include <new>
#include <optional>
#include <string_view>
#include <vector>

#include "engine/job_queue.h"  // SlotIndex
#include "jobengine/job.h"

namespace jobengine::detail {

inline constexpr std::size_t kCacheLine = 64;
inline constexpr std::uint64_t kNoHorizon = std::numeric_limits<std::uint64_t>::max();

enum class SlotState : std::uint8_t {
  kFree,
  kQueued,        // in a priority queue (or a worker's dequeued batch)
  kRunning,       // a handler runs it
  kRetired,       // finished for good; waiting for the reclaim horizon
  kDelayed,       // submitted with a delay: in the scheduler
  kWaitingRetry,  // backoff before its next attempt: in the scheduler
};

// The id word: the job's id, and the bit cancel() sets. Ids never reach it.
inline constexpr std::uint64_t kCancelBit = std::uint64_t{1} << 63;
inline constexpr std::uint64_t kIdMask = kCancelBit - 1;

// Slot::flags.
inline constexpr std::uint8_t kSlotHasExtra = 1;  // payload lives in an extra block

// A job's rare extras (unique key, own deadline) share one heap block with
// its payload: [key bytes][padding][ExtraHeader][payload], heap_payload
// pointing at the payload. The key is padded to padded_key_bytes() so that the
// header after it is aligned (new[] aligns the block itself). Jobs without
// extras never allocate for them.
struct ExtraHeader {
  std::uint64_t deadline_ns = 0;  // SubmitOptions::deadline, 0 none
  std::uint32_t key_len = 0;
  std::uint32_t reserved = 0;
};

// Bytes a key of `key_len` takes in the extra block, ExtraHeader's padding included.
constexpr std::size_t padded_key_bytes(std::size_t key_len) noexcept {
  return (key_len + alignof(ExtraHeader) - 1) / alignof(ExtraHeader) * alignof(ExtraHeader);
}

// One job. 64-byte header + inline payload = kSlotBytes, cache-line aligned.
struct alignas(kCacheLine) Slot {
  std::atomic<SlotState> state{SlotState::kFree};
  std::uint8_t priority = 0;
  std::atomic<std::uint16_t> attempts{0};     // runs started so far (worker-written)
  HandlerId handler = 0;
  std::uint32_t payload_size = 0;
  std::uint16_t recoveries = 0;               // set at restore; immutable while queued
  std::uint8_t flags = 0;                     // kSlotHasExtra
  // 1 when the job ended because cancel() reached it before it ran (again),
  // else 0: stored by retire(), before its release store of finish_epoch, and
  // kept until the slot's next retire (through reclaim()). Lets cancel() tell
  // "cancelled" from "ran to the end" when the job was retired, or even
  // reclaimed, between its CAS and its state read.
  std::atomic<std::uint8_t> ended_by_cancel{0};
  std::atomic<std::uint64_t> id_word{0};      // id | kCancelBit once cancel() reached it
  std::uint64_t submit_ticks = 0;             // Clock::ticks() at submit (engine/clock.h)
  std::atomic<std::uint64_t> run_at_ticks{0}; // when it may run (delay, retry backoff)
  std::atomic<std::uint64_t> submit_epoch{0};
  std::atomic<std::uint64_t> finish_epoch{0};
  unsigned char* heap_payload = nullptr;      // owned; set iff payload_size > inline or extras
  unsigned char inline_payload[kInlinePayloadBytes];

  JobId id() const noexcept { return id_word.load(std::memory_order_relaxed) & kIdMask; }
  const unsigned char* payload() const noexcept {
    return heap_payload != nullptr ? heap_payload : inline_payload;
  }
  const ExtraHeader* extra() const noexcept {
    return (flags & kSlotHasExtra) != 0
               ? reinterpret_cast<const ExtraHeader*>(heap_payload - sizeof(ExtraHeader))
               : nullptr;
  }
  std::string_view key() const noexcept {
    const ExtraHeader* x = extra();
    if (x == nullptr || x->key_len == 0) return {};
    return {reinterpret_cast<const char*>(x) - padded_key_bytes(x->key_len), x->key_len};
  }
  // Frees the heap block, if any.
  void free_heap() noexcept {
    if (heap_payload == nullptr) return;
    if ((flags & kSlotHasExtra) != 0) {
      const ExtraHeader* x = extra();
      delete[] (heap_payload - sizeof(ExtraHeader) - padded_key_bytes(x->key_len));
    } else {
      delete[] heap_payload;
    }
    heap_payload = nullptr;
    flags = 0;
  }
};
static_assert(sizeof(Slot) == kSlotBytes, "slot header must stay 64 bytes");
static_assert(alignof(Slot) == kCacheLine);

// Lock-free stack of magazines of free slot indices.
//
// Invariants:
//  P1. A magazine descriptor is in exactly one place: the full stack, the
//      empty stack, or the hands of the one thread that popped it. Only that
//      thread reads or writes its count and indices.
//  P2. Each stack head is (tag << 32 | index); every successful CAS bumps the
//      tag, so a pop that read a stale head and next fails instead of
//      corrupting the stack (ABA), unless 2^32 operations happen between its
//      load and its CAS.
//  P3. A push stores the node's next (relaxed) and then CASes the head with
//      release; a pop loads the head with acquire, so it sees that next and
//      the magazine's contents written before the push.
class SlotPool {
 public:
  static constexpr std::size_t kMagazine = kSlotCacheSize;

  // Descriptors: twice what full magazines of capacity slots need, plus
  // spares for magazines in threads' hands, so a give() finds an empty one
  // even when magazines are partly filled (and when small gives used them
  // all up, tops up pooled ones instead). 4 + 4*kMagazine bytes each.
  explicit SlotPool(std::size_t capacity);

  // Pops one full magazine and copies its indices to out (room for
  // kMagazine). Returns how many; 0 when no free slot is pooled. Lock-free.
  std::size_t take(SlotIndex* out) noexcept;

  // Whether a full (possibly partly filled) magazine is pooled now. One
  // relaxed load of the stack head: a hint, stale as soon as it returns.
  bool has_magazine() const noexcept {
    return static_cast<std::uint32_t>(full_.load(std::memory_order_relaxed)) != kNil;
  }

  // Pushes n (1..kMagazine) indices as one magazine. Returns how many went
  // in: all n, unless no empty descriptor is left, which many small gives
  // (a worker's one-slot flushes before it sleeps) can bring about. Then
  // the indices top up pooled magazines that have room instead; fewer than
  // n (0 included) only while other threads hold the descriptors with room
  // in their hands (the caller keeps the rest and tries again later). While
  // it tops up, the magazines it holds are out of take()'s reach. Lock-free.
  std::size_t give(const SlotIndex* in, std::size_t n) noexcept;

 private:
  static constexpr std::uint32_t kNil = 0xffffffffu;
  struct Magazine {
    std::uint32_t count = 0;
    SlotIndex slots[kMagazine];
  };
  std::uint32_t pop(std::atomic<std::uint64_t>& head) noexcept;
  void push(std::atomic<std::uint64_t>& head, std::uint32_t m) noexcept;

  std::unique_ptr<Magazine[]> mags_;
  std::unique_ptr<std::atomic<std::uint32_t>[]> next_;
  alignas(kCacheLine) std::atomic<std::uint64_t> full_{kNil};
  alignas(kCacheLine) std::atomic<std::uint64_t> empty_{kNil};
};

class JobTable {
 public:
  // Slots per region of for_each_scan_range(): 256 KiB of slots, a multiple
  // of the magazine so that the pool's first magazines are one region each.
  static constexpr std::size_t kScanRegion = 1024;
  static_assert(kScanRegion % kSlotCacheSize == 0);

  // Maps capacity slots (untouched) and fills the free pool with their
  // indices. Throws std::bad_alloc; Engine::open() turns that into a Status.
  explicit JobTable(std::size_t capacity);

  // Constructs the slots and faults their pages in: for a 1M-slot table,
  // 256 MiB that the kernel zeroes, ~50 ms on one core. Several threads may
  // call it at once: each takes 2 MiB chunks until none is left, so a helper
  // thread can share the work, or run it while the opener loads a snapshot.
  // Every caller must have returned (joined) before any slot is used or the
  // table is destroyed.
  void populate() noexcept {
    while (populate_chunk()) {
    }
  }
  ~JobTable();
  JobTable(const JobTable&) = delete;
  JobTable& operator=(const JobTable&) = delete;

  std::size_t capacity() const noexcept { return capacity_; }
  Slot& slot(SlotIndex i) noexcept { return slots_[i]; }
  const Slot& slot(SlotIndex i) const noexcept { return slots_[i]; }

  // --- id hints (see the top) ---
  // Records that `id` was stamped into slot i. Relaxed: a hint; whoever
  // reads it checks the slot's id word.
  // An entry about no id: its id bits have bit 63 set, which ids never do.
  static constexpr std::uint64_t kNoId = ~std::uint64_t{0};
  void note_id(JobId id, SlotIndex i) noexcept {
    id_hint_[id & hint_mask_].store((id & ~hint_mask_) | i, std::memory_order_relaxed);
  }
  // The slot of id's latest stamp if its hint entry is still about id.
  std::optional<SlotIndex> hinted_slot(JobId id) const noexcept {
    const std::uint64_t e = id_hint_[id & hint_mask_].load(std::memory_order_relaxed);
    if ((e & ~hint_mask_) != (id & ~hint_mask_)) return std::nullopt;
    return static_cast<SlotIndex>(e & hint_mask_);
  }

  // Takes one magazine of free slot indices (out must hold kSlotCacheSize).
  // Lock-free; returns how many, 0 when no free slot is pooled. Raises
  // used_end() past each of them and counts them out of the pool in their
  // regions (once per magazine, not per job).
  std::size_t take_free(SlotIndex* out) noexcept {
    const std::size_t n = pool_.take(out);
    if (n != 0) {
      note_taken(out, n);
      count_out(out, n, +1);
    }
    return n;
  }

  // One past the highest slot index ever taken from the pool: no slot at or
  // above it has ever held a job, so a scan of the table for jobs (a
  // snapshot's, cancel()'s) stops there. The pool hands out slots 0, 1, ...
  // first and reuses the last freed ones (LIFO), so this follows the most
  // jobs ever pending at once (plus the magazines in threads' caches), not
  // the capacity: an engine sized for 1M jobs that holds a few thousand scans
  // a few thousand slots.
  // Why a scan that loads it after a cut sees every slot claimed in the cut:
  // a slot is claimed only after the take that raised this past it, in the
  // claiming thread, or in one that handed the slot over before (through the
  // pool's release/acquire pair or an orphaned cache's adoption); the claim
  // is sequenced before the release that ends its announcement, which the
  // cut acquires (engine.cc I5). So the raise happens before the scan's load,
  // which then returns it or a later (higher) value.
  std::size_t used_end() const noexcept { return used_end_.load(std::memory_order_acquire); }

  // Calls fn(begin, end) for each run of slots, in order, that a scan for
  // jobs must read: below used_end(), and in a region (kScanRegion slots)
  // with a slot out of the pool. A region whose every slot is pooled holds no
  // job, so after a burst (used_end() near the capacity) a scan reads the
  // regions of the slots in use and in threads' caches, not the table.
  // Why a scan after a cut still sees every slot claimed in the cut: its take
  // counted the slot out (relaxed) before the claim, and is ordered before
  // the scan's load as used_end()'s raise is. The load returns that count or
  // a later one, and a later one includes the slot: the slot is counted back
  // in only by put_free() once its job ended and the reclaim horizon let it
  // go (2), which no slot of the cut does while its snapshot runs; and any
  // other slot's put_free() follows that slot's own take, so it never takes
  // more out of the count than was put in before it.
  template <typename Fn>
  void for_each_scan_range(Fn&& fn) const {
    const std::size_t end = used_end();
    std::size_t run_begin = 0;
    bool in_run = false;
    for (std::size_t r = 0; r * kScanRegion < end; ++r) {
      // Acquire, as used_end(); once per region.
      const bool out = region_out_[r].load(std::memory_order_acquire) != 0;
      if (out && !in_run) run_begin = r * kScanRegion;
      if (!out && in_run) fn(run_begin, r * kScanRegion);
      in_run = out;
    }
    if (in_run) fn(run_begin, end);
  }
  // Slots of the region of slot i out of the pool now (tests).
  std::uint32_t region_out(SlotIndex i) const noexcept {
    return region_out_[i / kScanRegion].load(std::memory_order_relaxed);
  }
  // Whether take_free() would find slots now (a hint, see SlotPool::has_magazine).
  bool has_free_magazine() const noexcept { return pool_.has_magazine(); }
  // Returns free slots (state kFree already) to the pool, any number.
  // Returns how many went in; fewer than n only if the pool ran out of
  // magazine descriptors (the caller keeps the rest).
  // Counts them back in their regions (for_each_scan_range).
  std::size_t put_free(const SlotIndex* in, std::size_t n) noexcept;

  // --- epochs, see (1) and (2) ---
  // Acquire pairs with advance_epoch's release: a thread that sees epoch e
  // sees everything the snapshot thread did before making it e.
  std::uint64_t epoch() const noexcept { return epoch_.load(std::memory_order_acquire); }
  // For announcements (engine.cc I5), whose light/heavy fence pair orders it.
  std::uint64_t epoch_relaxed() const noexcept { return epoch_.load(std::memory_order_relaxed); }
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

  // Retired slots a worker could not release because a snapshot held the
  // horizon. A worker hands them here instead of keeping them, so a worker
  // stuck in a long handler cannot starve submitters of slots; release_parked()
  // returns them to the pool once the snapshot ends. Rare path: a mutex.
  // False, parking none, when there is no memory to record them (the caller
  // keeps them: a std::bad_alloc here ended the worker thread, and the process).
  // False too when no cut holds the horizon any more (it ended since the
  // caller read it): nothing would release them before the next cut ends,
  // while the caller's next flush can (checked under the parking lock, which
  // release_parked() takes after end_cut() lowered the horizon).
  bool park_retired(const SlotIndex* in, std::size_t n) noexcept;
  // Reclaims and pools every parked slot. Only while no cut holds the horizon.
  std::size_t release_parked() noexcept;

  // Marks a slot taken by a submitter: stamps epochs (3), sets kQueued and
  // zero attempts. Stores only (4). The caller fills the other fields before
  // publishing the index to a queue (the queue's enqueue/dequeue pair orders
  // those writes for the worker).
  static void claim(Slot& s, std::uint64_t epoch, SlotState initial = SlotState::kQueued) noexcept {
    // Relaxed, then release (3): submit_epoch is visible before the 0.
    s.submit_epoch.store(epoch, std::memory_order_relaxed);
    s.finish_epoch.store(0, std::memory_order_release);
    s.attempts.store(0, std::memory_order_relaxed);
    // Release: cancel() (engine.cc I8) that acquires this state sees the id
    // stored before it. A plain store on x86.
    s.state.store(initial, std::memory_order_release);
  }

  // Ends a job: stamps finish_epoch, state kRetired. The payload stays until
  // reclaim(): a snapshot that cut before the finish may still be copying it.
  static void retire(Slot& s, std::uint64_t epoch, bool by_cancel = false) noexcept {
    // Release: a snapshot reader that sees the stamp sees the state too (and
    // cancel() the mark).
    s.state.store(SlotState::kRetired, std::memory_order_relaxed);
    s.ended_by_cancel.store(by_cancel ? 1 : 0, std::memory_order_release);
    s.finish_epoch.store(epoch, std::memory_order_release);
  }

  // Whether a job that finished in `finish_epoch` was in no cut at all: it
  // was submitted in the same epoch (2). Its slot need not wait for the
  // horizon. Relaxed: the caller holds the job (its submitter's stamp reached
  // it with the job, engine.cc I1).
  static bool in_no_cut(const Slot& s, std::uint64_t finish_epoch) noexcept {
    return s.submit_epoch.load(std::memory_order_relaxed) == finish_epoch;
  }

  // Puts a retired slot back to kFree so it can be reused, freeing any heap
  // payload. Only once no snapshot can still read it (2).
  static void reclaim(Slot& s) noexcept {
    s.free_heap();
    s.state.store(SlotState::kFree, std::memory_order_relaxed);
  }

 private:
  static constexpr std::size_t kPopulateChunk = (std::size_t{2} << 20) / kSlotBytes;
  bool populate_chunk() noexcept;
  // Raises used_end_ past the n indices just taken. Relaxed: ordered for
  // readers by the claims that follow it (see used_end()).
  void note_taken(const SlotIndex* in, std::size_t n) noexcept {
    SlotIndex top = in[0];
    for (std::size_t i = 1; i < n; ++i) top = in[i] > top ? in[i] : top;
    const std::size_t end = std::size_t{top} + 1;
    std::size_t seen = used_end_.load(std::memory_order_relaxed);
    while (seen < end &&
           !used_end_.compare_exchange_weak(seen, end, std::memory_order_relaxed)) {
    }
  }

  // Adds sign * (slots of in[0..n) in each region) to the regions' counts:
  // one RMW per run of indices in one region (a magazine is usually one).
  // Relaxed: see for_each_scan_range().
  void count_out(const SlotIndex* in, std::size_t n, int sign) noexcept {
    for (std::size_t i = 0; i < n;) {
      const std::size_t r = in[i] / kScanRegion;
      std::uint32_t k = 1;
      while (i + k < n && in[i + k] / kScanRegion == r) ++k;
      if (sign > 0) {
        region_out_[r].fetch_add(k, std::memory_order_relaxed);
      } else {
        region_out_[r].fetch_sub(k, std::memory_order_relaxed);
      }
      i += k;
    }
  }

  std::size_t capacity_;
  // The slot array's mapping, unmapped by its destructor (also when a later
  // member's allocation throws out of the constructor).
  struct Mapping {
    Slot* slots;
    std::size_t bytes;
    ~Mapping();
  };
  Mapping mapping_;
  Slot* slots_;
  SlotPool pool_;
  std::uint64_t hint_mask_;                                 // H - 1
  std::unique_ptr<std::atomic<std::uint64_t>[]> id_hint_;    // H entries; kNoId at first
  std::atomic<std::size_t> next_chunk_{0};
  std::mutex parked_mu_;
  std::vector<SlotIndex> parked_;
  alignas(kCacheLine) std::atomic<std::uint64_t> epoch_{1};
  alignas(kCacheLine) std::atomic<std::uint64_t> horizon_{kNoHorizon};
  // Written by submitters only until the working set stops growing (a load,
  // no store, after that); on a line of its own so that the epoch's and the
  // horizon's readers do not share its misses.
  alignas(kCacheLine) std::atomic<std::size_t> used_end_{0};
  // Per kScanRegion slots: how many are out of the pool (taken and not put
  // back), for for_each_scan_range(). Touched once per magazine.
  std::unique_ptr<std::atomic<std::uint32_t>[]> region_out_;
};

// A worker's retired slots, waiting until the reclaim horizon lets them back
// into the free pool. Owned by one thread. A worker's finish epochs never
// decrease (the epoch only grows and it retires one job after another), so
// the buffer is sorted by epoch: it remembers where each epoch's run starts,
// and a flush releases a prefix without looking at the slots again.
class RetireBuffer {
 public:
  explicit RetireBuffer(std::size_t reserve) {
    pending_.reserve(reserve);
    unheld_.reserve(reserve);
    runs_.reserve(16);
  }

  // Both adds never throw: a slot they have no memory to record stays
  // retired and out of the pool for good (the table holds one job fewer),
  // which loses no job; an exception would end the worker's or the
  // scheduler's thread (std::terminate).

  // A slot whose job was in no cut (JobTable::in_no_cut): the next flush
  // returns it to the pool whatever the horizon (job_table.h (2)).
  void add_unheld(SlotIndex i) noexcept {
    try {
      unheld_.push_back(i);
    } catch (const std::bad_alloc&) {
    }
  }

  void add(SlotIndex i, std::uint64_t finish_epoch) noexcept {
    try {
      if (runs_.size() == run_head_ || runs_.back().epoch != finish_epoch) {
        runs_.push_back({finish_epoch, pending_.size()});
      }
      pending_.push_back(i);
    } catch (const std::bad_alloc&) {
      // A run just opened stays empty: flush() steps over it.
    }
  }
  std::size_t size() const noexcept { return pending_.size() - head_ + unheld_.size(); }

  // Moves every retired slot that finished below the reclaim horizon back to
  // the pool (all of them while no snapshot holds the horizon), and every
  // unheld one whatever the horizon, and parks the rest with the table
  // (JobTable::park_retired) when there are at least `park_from` (a worker
  // about to sleep passes 1: nothing would wake it to release them when the
  // snapshot ends). Returns how many went back. Cost: proportional to what
  // it moves. Never throws.
  std::size_t flush(JobTable& table, std::size_t park_from = kParkFrom) noexcept;
  static constexpr std::size_t kParkFrom = 32;

 private:
  struct Run {
    std::uint64_t epoch;
    std::size_t start;  // index in pending_ of the run's first slot
  };
  std::size_t flush_unheld(JobTable& table) noexcept;

  std::vector<SlotIndex> unheld_;  // in no cut: reusable whatever the horizon
  std::vector<SlotIndex> pending_;
  std::size_t head_ = 0;  // pending_[0, head_) were released
  std::vector<Run> runs_;
  std::size_t run_head_ = 0;  // runs_[0, run_head_) were released
};

}  // namespace jobengine::detail
