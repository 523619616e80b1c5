// Engine implementation: submitters, workers, intake, wake-ups, stop.
//
// Invariants (numbered; the code refers to them):
//  I1. A job is in exactly one place at a time: a submitter's hands (between
//      claiming a slot and enqueueing its index), one priority queue, one
//      worker's hands (dequeued batch or running), or retired. Only the holder
//      writes the slot's non-atomic fields; ownership passes through the
//      moodycamel queues, whose enqueue (release) / dequeue (acquire) order
//      the slot writes for the next holder.
//  I2. Intake: a submitter sets its ProducerState::active_ to 1, issues a light
//      asymmetric fence, then reads state_. stop() stores kStopping, issues
//      the heavy fence, then waits for every active_ to read 0. Either the
//      submitter sees kStopping (and refuses with kStopped, accepting nothing)
//      or stop() sees it active and waits until its job is enqueued and
//      counted. So after the wait no job can be half-accepted, and the
//      submitted counters are final.
//  I3. Wake-ups (kSpinThenBlock): a worker about to sleep increments
//      sleepers_, issues the heavy fence, then looks at the queues once more.
//      A submitter enqueues, issues the light fence, then reads sleepers_.
//      Either the worker sees the job or the submitter sees the sleeper and
//      hands out a permit (decrementing sleepers_ first). A worker that finds
//      work after announcing itself takes its announcement back, or, if a
//      submitter took it already, consumes the permit it was given. No
//      wake-up is lost; at worst a worker wakes and finds nothing.
//  I4. Counters are written by one thread each (a producer's or a worker's
//      padded block), with relaxed load+store (no lock prefix), and read by
//      anyone. pending = sum(submitted) - sum(done + failed + dropped); once
//      intake is closed (I2) sum(submitted) is final, and a worker that reads
//      pending == 0 after the queues looked empty knows no job remains: a
//      requeued retry does not count as finished, so it keeps pending > 0
//      until it finishes for good.
//  I5. Epoch announcements (the cut's half of I2). A submitter announces the
//      epoch it read in ProducerState::active (0 = outside intake): it stores
//      e, issues the light fence, and re-reads the epoch, announcing again
//      until the two agree; then it stamps its slots with e. A worker does
//      the same in WorkerState::announce around stamping a finish epoch.
//      begin_cut() bumps the epoch from C to C+1, issues the heavy fence and
//      waits until every announcement is 0 or > C. By the fence pair, a
//      thread it did not see announce C reads C+1 on its re-read. So once
//      begin_cut() returns, every stamp <= C is written and no new one will be.
//  I6. Cut membership: a slot is in the cut C iff its submit_epoch is in
//      1..C and its finish_epoch is 0 or > C (job_table.h (3) says how a
//      reader reads the pair safely). Jobs acknowledged before the cut began
//      were stamped <= C (I5) and so are in it unless they finished <= C.
//  I7. A cut sets the reclaim horizon to C+1 *before* bumping the epoch, so a
//      worker that stamped a finish epoch > C (which it can only have read
//      after the bump) also sees the horizon and keeps the slot and its
//      payload out of the pool until end_cut(): the cut's members stay intact
//      while the snapshot thread copies them. A job submitted and finished in
//      the same epoch is in no cut (I6): its slot skips the horizon (the
//      argument is in job_table.h (2)), so the jobs that come and go during
//      a snapshot do not use up a bounded table until it ends.
//  I8. Cancellation. cancel() CASes kCancelBit into a slot's id word,
//      expecting the exact id (ids are never reused, so a reused slot fails
//      the CAS), issues the heavy fence, then reads the state. A worker stores
//      kRunning, issues the light fence, then reads the id word. Either
//      cancel() reads kRunning (kCancelRequested: the handler sees
//      cancelled()) or the worker sees the bit and never runs the job. The
//      scheduler purges cancelled jobs it holds; a retry of a cancelled job is
//      never scheduled (after_handler checks the bit first).
//  I9. Scheduled jobs (kDelayed, kWaitingRetry) are held by the scheduler: it
//      alone moves them to a queue (state kQueued first) or retires them
//      (cancelled), stamping finish epochs under its own announcement
//      (sched_announce_, waited out by begin_cut like a worker's). Dead
//      letters live outside the table, under dead_mu_, and are copied into
//      every snapshot, at the cut's epoch bump (begin_cut), under dead_mu_:
//      requeue_dead() holds it while it moves a job from them to the table.
#include <pthread.h>
#include <unistd.h>
#include <sched.h>

#include <algorithm>
#include <array>
#include <cassert>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <mutex>
#include <new>
#include <optional>
#include <random>
#include <semaphore>
#include <string>
#include <system_error>
#include <thread>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

#include "engine/asymmetric_fence.h"
#include "engine/clock.h"
#include "engine/job_queue.h"
#include "engine/job_table.h"
#include "engine/metrics.h"
#include "engine/persistence_hooks.h"
#include "engine/test_hooks.h"
#include "engine/thread_util.h"
#include "jobengine/engine.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

// Latency histograms and per-handler counters on the worker's path. The
// metrics benchmark builds the library with -DJOBENGINE_METRICS=0 to measure
// what they cost (bench/).
#ifndef JOBENGINE_METRICS
#define JOBENGINE_METRICS 1
#endif

namespace jobengine {

using detail::asymmetric_fence_heavy;
using detail::asymmetric_fence_light;
using detail::Clock;
using detail::ExtraHeader;
using detail::kCancelBit;
using detail::kIdMask;
using detail::kSlotHasExtra;
using detail::IndexQueue;
using detail::JobTable;
using detail::kCacheLine;
using detail::QueueConsumerToken;
using detail::QueueProducerToken;
using detail::RetireBuffer;
using detail::Slot;
using detail::SlotIndex;
using detail::SlotState;

namespace {

// moodycamel makes a producer token's producer with the queue's malloc and,
// when that fails, leaves the token invalid; an enqueue through an invalid
// token dereferences null. So tokens are made only where the failure can be
// reported (start(), a thread's first submit), and checked there.
using SchedulerTokens = std::array<QueueProducerToken, kPriorityLevels>;
bool all_valid(std::span<const QueueProducerToken> tokens) {
  return std::all_of(tokens.begin(), tokens.end(),
                     [](const QueueProducerToken& t) { return t.valid(); });
}

// Ids are handed to submitters in blocks so that taking one is thread-local.
constexpr JobId kIdBlock = 1024;
constexpr std::size_t kMaxHandlerName = 255;
// Every this many empty polls (~2 us of spinning) an idle worker clears its
// oldest-pending stamp and, if the pool has run out of magazines, returns its
// partly filled one (worker_main).
constexpr std::uint32_t kIdleFlushPolls = 64;
// How many submits ahead a submitter prefetches the slot it will fill.
constexpr std::uint32_t kPrefetchAhead = 4;
// How many slots ahead restore() prefetches the slot it will fill (they come
// from the free pool in order, so the next ones are known).
constexpr std::size_t kRestoreAhead = 8;
// How many slots ahead a snapshot's scan of the table prefetches.
constexpr std::size_t kScanAhead = 32;
// How many jobs ahead a worker prefetches the slots of its batch (and
// submit_batch() the slots it fills). 16 rather than 8: a slot the other core
// wrote takes a few hundred ns to arrive here, ~8 jobs' time; submit_batch
// throughput +3-8%, drain +0-5% (BM_Engine_SubmitBatch, BM_Engine_Drain,
// binaries alternated). 24 and 32 were no better, 4 was 10-15% worse.
constexpr std::size_t kRunAhead = 16;
// Sampled run timing (EngineOptions::time_every_run): one run in
// kTimedRunEvery of a handler is timed, every run once its last timed one
// took kTimeEveryRunFromNs or more. A timed run costs two clock reads and two
// histogram updates, ~150 cycles: at one in 32 the worker draining empty jobs
// ran at 0.93 of a build without metrics (bench/run.sh --only metrics, twice),
// at one in 128 at 0.96-0.97, still thousands of samples a second per handler
// at the rates where it matters.
constexpr std::uint32_t kTimedRunEvery = 128;
constexpr std::uint64_t kTimeEveryRunFromNs = 1000;

inline void cpu_relax() noexcept {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#elif defined(__aarch64__)
  asm volatile("yield" ::: "memory");
#else
  std::atomic_signal_fence(std::memory_order_seq_cst);
#endif
}


// Asks for a cache line in exclusive state, so a store to it soon does not
// wait for another core's copy to go. PREFETCHW (x86-64: every Intel core
// since Broadwell and every AMD one; a no-op on older ones) by hand, since
// GCC emits it for __builtin_prefetch(p, 1) only under -mprfchw.
[[gnu::always_inline]] inline void prefetch_for_write(const void* p) noexcept {
#if defined(__x86_64__)
  asm volatile("prefetchw %0" : : "m"(*static_cast<const char*>(p)));
#else
  __builtin_prefetch(p, 1, 3);  // aarch64: PRFM PSTL1KEEP
#endif
}

// memcpy for payloads of at most kInlinePayloadBytes, without the library
// call for the common small sizes: two overlapping fixed-size moves cover any
// length in [k, 2k], which the compiler turns into plain loads and stores.
inline void copy_small(unsigned char* dst, const char* src, std::size_t n) noexcept {
  if (n >= 8 && n <= 16) {
    std::memcpy(dst, src, 8);
    std::memcpy(dst + n - 8, src + n - 8, 8);
  } else if (n > 16 && n <= 32) {
    std::memcpy(dst, src, 16);
    std::memcpy(dst + n - 16, src + n - 16, 16);
  } else if (n >= 4 && n < 8) {
    std::memcpy(dst, src, 4);
    std::memcpy(dst + n - 4, src + n - 4, 4);
  } else if (n != 0) {
    std::memcpy(dst, src, n);
  }
}

// A counter written by one thread only (I4): no read-modify-write needed.
[[gnu::always_inline]] inline void bump(std::atomic<std::uint64_t>& c, std::uint64_t by = 1) noexcept {
  c.store(c.load(std::memory_order_relaxed) + by, std::memory_order_relaxed);
}
// The same, publishing the writes before it (change_count()): a plain store on x86.
[[gnu::always_inline]] inline void bump_release(std::atomic<std::uint64_t>& c,
                                                std::uint64_t by = 1) noexcept {
  c.store(c.load(std::memory_order_relaxed) + by, std::memory_order_release);
}

// A job queue on cache lines of its own: moodycamel's consumer-side atomics
// must not share a line with the engine's read-mostly members (submit read
// them on every call; a line shared with a dequeue counter cost a miss each).
struct alignas(kCacheLine) PaddedQueue : IndexQueue {
  using IndexQueue::IndexQueue;
  char pad_[kCacheLine];
};

// Engines get a process-unique id, never reused, so a thread's cached
// ProducerState pointer for a destroyed engine can never match a new one.
std::atomic<std::uint64_t> g_next_engine_uid{1};

// Differs between processes (and engines): std::random_device where it works,
// mixed with the pid and the clock (random_device may throw or be a fixed
// sequence where the platform has no entropy source).
std::uint64_t process_seed() noexcept {
  std::uint64_t seed = static_cast<std::uint64_t>(::getpid()) * 0x9e3779b97f4a7c15ull ^
                       static_cast<std::uint64_t>(
                           std::chrono::steady_clock::now().time_since_epoch().count());
  try {
    std::random_device rd;
    seed ^= (std::uint64_t{rd()} << 32) | rd();
  } catch (...) {
  }
  return seed;
}

struct StringHash {
  using is_transparent = void;
  std::size_t operator()(std::string_view s) const noexcept {
    return std::hash<std::string_view>{}(s);
  }
};

}  // namespace

// Per submitting thread, per engine. Owned by the engine (its tokens must die
// before the queues); the thread holds a pointer through thread-local storage.
// When the thread exits, the state is marked orphaned and the next new
// submitting thread adopts it (tokens, cached slots and ids included), so
// threads that come and go do not leak queue producers.
struct alignas(kCacheLine) ProducerState {
  ProducerState(PaddedQueue* queues, std::size_t handlers)
      : tokens{QueueProducerToken(queues[0]), QueueProducerToken(queues[1]),
               QueueProducerToken(queues[2])},
        by_handler(std::make_unique<std::atomic<std::uint64_t>[]>(handlers)) {}

  // --- used by the owning thread only ---
  QueueProducerToken tokens[kPriorityLevels];
  SlotIndex cache[kSlotCacheSize];
  std::uint32_t cached = 0;
  JobId next_id = 0;
  JobId id_end = 0;
  std::vector<SlotIndex> batch_slots;                          // submit_batch scratch
  std::vector<SlotIndex> batch_by_level[kPriorityLevels];      // submit_batch scratch

  // --- read by other threads ---
  alignas(kCacheLine) std::atomic<std::uint64_t> active{0};  // I2, I5: epoch announced, 0 = outside
  std::atomic<std::uint64_t> submitted{0};                   // I4
  std::atomic<std::uint64_t> rejected{0};
  std::unique_ptr<std::atomic<std::uint64_t>[]> by_handler;  // submitted per handler (I4)
  std::atomic<bool> orphaned{false};
  ProducerState* next = nullptr;  // registry list, immutable once published
};

// One worker's counters and histograms for one handler (I4: written by that
// worker only).
struct HandlerStats {
  // Sampled timing (EngineOptions::time_every_run), worker-private: runs not
  // timed since the last timed one (the next timed run's weight, less one),
  // and how many to skip between timed runs (0: time every run). On the line
  // of the counters every run bumps.
  std::uint32_t skipped = 0;
  std::uint32_t skip_period = 0;
  // Runs begun are not counted on their own: every run ends in exactly one of
  // done, retried, failed or ran_other (cancelled while it ran, a retry
  // that stop(kAbandon) dropped, or a run whose end a worker had no memory
  // to record when a cancel or stop(kAbandon) came), so their sum is the
  // started counter --
  // exact, and one store per run less.
  std::atomic<std::uint64_t> ran_other{0};
  std::atomic<std::uint64_t> done{0};
  std::atomic<std::uint64_t> retried{0};
  std::atomic<std::uint64_t> failed{0};     // failed for good (became dead)
  std::atomic<std::uint64_t> cancelled{0};
  std::atomic<std::uint64_t> stuck{0};
  detail::LatencyHistogram queue_wait;      // ns from run_at to run start
  detail::LatencyHistogram run_time;        // ns in the handler
};

// A worker's last clock read in the batch it runs; `fresh` while no handler
// ran since, so that it can serve as the next run's start.
struct RunClock {
  std::uint64_t now;
  bool fresh;
};

struct alignas(kCacheLine) WorkerState {
  WorkerState(PaddedQueue* queues, std::size_t batch, std::size_t handlers)
      : consumer{QueueConsumerToken(queues[0]), QueueConsumerToken(queues[1]),
                 QueueConsumerToken(queues[2])},
        requeue{QueueProducerToken(queues[0]), QueueProducerToken(queues[1]),
                QueueProducerToken(queues[2])},
        retired(2 * batch + kSlotCacheSize),
        by_handler(std::make_unique<HandlerStats[]>(handlers)) {}

  // --- used by the worker thread only ---
  QueueConsumerToken consumer[kPriorityLevels];
  QueueProducerToken requeue[kPriorityLevels];
  RetireBuffer retired;
  std::uint32_t until_fair_turn = 1;  // dequeue attempts until the starvation guard's turn
  unsigned rotation = 0;
  std::thread thread;
  unsigned index = 0;
  // The id of the job this worker runs, where a crash leaves it: a word of
  // the live record (persistence_hooks.h), or live_idle without one. Set
  // before the workers go.
  std::atomic<std::uint64_t>* live = &live_idle;
  std::atomic<std::uint64_t> live_idle{0};
  std::uint64_t rng = 0x9e3779b97f4a7c15ull;  // retry jitter (xorshift64)
  std::unique_ptr<HandlerStats[]> by_handler;

  // --- read by other threads (I4) ---
  alignas(kCacheLine) std::atomic<std::uint64_t> done{0};
  std::atomic<std::uint64_t> failed{0};
  std::atomic<std::uint64_t> retried{0};
  std::atomic<std::uint64_t> exceptions{0};
  std::atomic<std::uint64_t> dropped{0};
  std::atomic<std::uint64_t> cancelled{0};
  std::atomic<std::uint64_t> stuck_total{0};
  // Pauses taken for memory to record a job's end (after_handler()), and
  // the job it is for while one lasts (0: none).
  std::atomic<std::uint64_t> memory_waits{0};
  std::atomic<std::uint64_t> memory_wait_job{0};
  // Handler runs, two steps each: odd while a handler runs (health()'s
  // `running`). The step into a run is stored with release after the job was
  // marked running, so change_count() counts every start.
  std::atomic<std::uint64_t> runs{0};
  // Batches run, for change_count(): bumped with release after each, which
  // covers the batch's last finish (every other finish is followed by the
  // next job's start, a step of `runs`).
  std::atomic<std::uint64_t> changes{0};
  std::atomic<bool> alive{false};
  // Set as worker_main() returns: start() waits for alive or this, since a
  // stop() from another thread (say on SIGTERM during start-up) can end a
  // worker before start() sees it alive, or keep it from ever being alive.
  std::atomic<bool> gone{false};
  // The job running now, for health(): its id, and the tick its run counts
  // as stuck at (0: no deadline).
  std::atomic<std::uint64_t> running_id{0};
  std::atomic<std::uint64_t> run_deadline{0};
  // run_at ticks of the oldest job waiting in this worker's batch (dequeued,
  // not started), for Health::oldest_pending_age; 0 while none waits.
  std::atomic<std::uint64_t> head_ticks{0};
  alignas(kCacheLine) std::atomic<std::uint64_t> announce{0};  // I5, 0 = not stamping
};

// Shared between an engine and the threads that submitted to it, so that a
// thread exiting after the engine died does not touch freed memory.
struct EngineLifetime {
  std::mutex mu;
  bool alive = true;                   // guarded by mu
  detail::JobTable* table = nullptr;  // usable while alive, under mu
};

namespace {

// Each thread's list of engines it has submitted to.
struct ThreadProducers {
  struct Entry {
    std::uint64_t uid;
    ProducerState* state;
    std::shared_ptr<EngineLifetime> life;
  };
  std::vector<Entry> entries;
  ~ThreadProducers();
};

// The last engine this thread submitted to: the fast path is one compare.
struct LastProducer {
  std::uint64_t uid = 0;
  ProducerState* state = nullptr;
};
thread_local LastProducer t_last;
// The engine whose worker this thread is, if any (stop() from a handler would
// join its own thread).
thread_local const void* t_worker_of = nullptr;
thread_local ThreadProducers t_producers;
// A thread_local made before the thread's first submit is destroyed after
// t_producers, and its destructor may submit (a per-thread buffer flushed at
// exit). By then t_producers has orphaned its states, which another thread
// may adopt at once: using them still would share one producer token, slot
// cache and id block between two threads. So such late submits get states of
// their own, in a ThreadProducers made on first use during the thread's exit
// and owned by a POSIX thread-specific key, whose destructor runs after every
// thread_local one (glibc's thread exit runs those first). Not a second
// thread_local: the compiler registers all of a file's thread_locals on the
// first use of any, so it would be destroyed before t_producers. Plain bools:
// readable after the objects they describe are gone.
thread_local bool t_producers_gone = false;
thread_local bool t_late_producers_gone = false;
// Set when this thread's last producer_state_slow() failed for want of memory
// (not because the engine is not running): no_producer_status() says which.
thread_local bool t_producer_out_of_memory = false;

// The key; nullopt if none could be made (late submits are then refused).
const std::optional<pthread_key_t>& late_producers_key() {
  static const std::optional<pthread_key_t> key = []() -> std::optional<pthread_key_t> {
    pthread_key_t k;
    if (pthread_key_create(&k, [](void* p) { delete static_cast<ThreadProducers*>(p); }) != 0) {
      return std::nullopt;
    }
    return k;
  }();
  return key;
}

ThreadProducers::~ThreadProducers() {
  for (Entry& e : entries) {
    std::lock_guard<std::mutex> lock(e.life->mu);
    if (!e.life->alive) continue;
    // The free slots this thread cached go back to the pool now: left with
    // the orphan, they stayed out of use until a thread that never submitted
    // before came to adopt it (a service's long-lived threads got kQueueFull
    // from a nearly empty table meanwhile). What the pool cannot take now
    // (its magazines held by other threads) stays cached for the adopter.
    ProducerState& ps = *e.state;
    const std::size_t put = e.life->table->put_free(ps.cache, ps.cached);
    std::memmove(ps.cache, ps.cache + put, (ps.cached - put) * sizeof(SlotIndex));
    ps.cached -= static_cast<std::uint32_t>(put);
    // Release: the adopting thread's acquire sees this thread's last writes
    // to the state (its cache, its id block).
    ps.orphaned.store(true, std::memory_order_release);
  }
  t_last = {};  // no fast path to a state given away
  (this == &t_producers ? t_producers_gone : t_late_producers_gone) = true;
}

}  // namespace

Status check_retry_policy(const RetryPolicy& p, const std::string& prefix);

class Engine::Impl final : public detail::CutSource {
 public:
  // A scheduled job: its slot and when it falls due (ticks).
  struct Timer {
    std::uint64_t at;
    SlotIndex idx;
    bool operator>(const Timer& o) const noexcept { return at > o.at; }
  };

  explicit Impl(EngineOptions options)
      : options_(std::move(options)),
        uid_(g_next_engine_uid.fetch_add(1, std::memory_order_relaxed)),
        table_(options_.capacity),
        queues_{PaddedQueue(options_.capacity + detail::IndexQueueTraits::BLOCK_SIZE),
                PaddedQueue(options_.capacity + detail::IndexQueueTraits::BLOCK_SIZE),
                PaddedQueue(options_.capacity + detail::IndexQueueTraits::BLOCK_SIZE)},
        life_(std::make_shared<EngineLifetime>()) {
    life_->table = &table_;
  }

  ~Impl() {
    if (t_worker_of == this) {
      // The engine's own worker cannot join itself (stop() refuses it from a
      // handler): say so, rather than std::terminate on a joinable thread.
      std::fputs("jobengine: an Engine was destroyed from one of its own handlers; destroy it "
                 "from another thread\n", stderr);
      std::abort();
    }
    if (state_.load(std::memory_order_acquire) == EngineState::kRunning ||
        state_.load(std::memory_order_acquire) == EngineState::kStopping) {
      (void)stop(StopMode::kDrain);
    }
    {
      std::lock_guard<std::mutex> lock(life_->mu);
      life_->alive = false;
    }
    ProducerState* p = producers_.load(std::memory_order_acquire);
    while (p != nullptr) {
      ProducerState* next = p->next;
      delete p;
      p = next;
    }
  }

  // ---------------------------------------------------------------- handlers

  Result<HandlerId> register_handler(std::string_view name, Handler handler,
                                     const HandlerOptions& ho) {
    if (state_.load(std::memory_order_acquire) != EngineState::kOpen) {
      return Status(StatusCode::kFailedPrecondition,
                    "register_handler(\"" + std::string(name) +
                        "\"): handlers must be registered before start()");
    }
    if (name.empty() || name.size() > kMaxHandlerName) {
      return Status(StatusCode::kInvalidArgument,
                    "handler name must be 1.." + std::to_string(kMaxHandlerName) +
                        " bytes, got " + std::to_string(name.size()));
    }
    if (const std::size_t bad = detail::invalid_utf8_at(name); bad != name.size()) {
      char byte[8];
      std::snprintf(byte, sizeof byte, "0x%02x", static_cast<unsigned>(static_cast<unsigned char>(name[bad])));
      return Status(StatusCode::kInvalidArgument,
                    "handler name must be valid UTF-8 (metrics, logs and jobsnap show it as "
                    "text): byte " + std::to_string(bad) + " (" + byte + ") is not");
    }
    if (!handler) {
      return Status(StatusCode::kInvalidArgument,
                    "register_handler(\"" + std::string(name) + "\"): empty handler function");
    }
    if (by_name_.find(name) != by_name_.end()) {
      return Status(StatusCode::kAlreadyExists,
                    "handler \"" + std::string(name) + "\" is already registered");
    }
    const std::string where = "register_handler(\"" + std::string(name) + "\"): ";
    if (handlers_.size() >= kMaxHandlers) {
      return Status(StatusCode::kFailedPrecondition,
                    where + std::to_string(kMaxHandlers) +
                        " handlers are registered already, the most an engine takes "
                        "(kMaxHandlers: its snapshots name every handler)");
    }
    if (ho.max_attempts > 65535) {
      return Status(StatusCode::kInvalidArgument,
                    where + "max_attempts must be 0 (engine default) or 1..65535, got " +
                        std::to_string(ho.max_attempts));
    }
    if (ho.has_retry_policy) {
      if (Status st = check_retry_policy(ho.retry, where + "retry."); !st.ok()) return st;
    }
    if (ho.deadline.count() < 0) {
      return Status(StatusCode::kInvalidArgument, where + "deadline must be >= 0");
    }
    auto id = static_cast<HandlerId>(handlers_.size());
    HandlerEntry entry;
    entry.name = std::string(name);
    entry.fn = std::move(handler);
    entry.max_attempts = ho.max_attempts != 0 ? ho.max_attempts : options_.max_attempts;
    entry.retry = ho.has_retry_policy ? ho.retry : options_.retry;
    const auto deadline = ho.deadline.count() != 0 ? ho.deadline : options_.run_deadline;
    entry.deadline_ticks = deadline.count() > 0 ? Clock::ticks_in_ns(deadline.count()) : 0;
    handlers_.push_back(std::move(entry));
    handler_names_.emplace_back(name);
    by_name_.emplace(std::string(name), id);
    return id;
  }

  // start(), before any worker runs. The recoveries restore() gave (+1 for a
  // job running at the cut or at the crash) exist only in memory: if a job
  // crashed the process again before a snapshot held them, the next recovery
  // would count from the same old snapshot, and a job that kills the process
  // at once would never reach max_recoveries. So they are made durable first
  // (a synchronous snapshot); only then is the live record reset for this
  // process's workers, erasing the previous one's running ids.
  //
  // mark_live_record_credited() comes first, in start() before the snapshot
  // thread starts: a periodic snapshot published before the mark held the
  // recoveries while the record still named the jobs, and a crash then
  // counted that one crash twice. The mark says "every snapshot of this
  // generation or later holds the recoveries", true from the end of restore()
  // on (every cut after it sees the restored slots), whoever publishes the
  // snapshot. Marked early, it stays true if start() then fails: a snapshot
  // published before the unwind holds the recoveries too, and with none
  // published the next open() loads an older generation and counts the crash.
  void mark_live_record_credited() {
    if (credited_ == 0) return;
    if (Status marked = live_->mark_credited(recovered_generation_ + 1); !marked.ok()) {
      log(LogLevel::kWarning, "live record: " + marked.to_string() +
                                  "; a crash before it is rewritten may count its jobs twice");
    }
  }

  void arm_live_record() {
    if (credited_ > 0) {
      // The record is marked credited already (mark_live_record_credited(),
      // before the snapshot thread started).
      auto durable = persistence_->snapshot_now();
      if (!durable) {
        log(LogLevel::kWarning,
            "start(): the recoveries of " + std::to_string(credited_) +
                " job(s) interrupted by the crash are not durable yet (" +
                durable.status().to_string() + "); a crash before the next snapshot forgets them");
      }
    }
    if (Status armed = live_->arm(options_.workers, next_id_.load()); !armed.ok()) {
      log(LogLevel::kWarning, "live record not armed (" + armed.to_string() +
                                  "): a job that crashes the process at once is not quarantined, "
                                  "and ids handed out after the next snapshot may repeat after a crash");
      live_ = nullptr;
      return;
    }
    if (std::string warning = live_->arm_warning(); !warning.empty()) {
      log(LogLevel::kWarning, "live record: " + warning);
    }
    for (auto& w : workers_) w->live = live_->running_word(w->index);
    // The record's lease is at least next_id_; a lease ahead of it now, so
    // that the first submit does not extend it (a store into DIR/LIVE's
    // mapping); the snapshot thread keeps it ahead (extend_lease_ahead()).
    lease_end_.store(next_id_.load(), std::memory_order_release);
    extend_lease(next_id_.load() + 1);
  }

  Result<HandlerId> handler_id(std::string_view name) const {
    auto it = by_name_.find(name);
    if (it == by_name_.end()) {
      return Status(StatusCode::kNotFound, "no handler named \"" + std::string(name) + "\"");
    }
    return it->second;
  }

  // ------------------------------------------------------------------- start

  // Memory that runs out anywhere in start() (restoring jobs, making threads,
  // arming the live record) fails it like any other failure: the engine is
  // stopped, every thread it started has exited, and a second start() is
  // refused (restore() may have queued the snapshot's jobs already: a retry
  // would queue them twice).
  Result<StartReport> start() {
    try {
      return start_engine();
    } catch (const std::bad_alloc&) {
      static constexpr Status::Rep kRep{
          StatusCode::kInternal, false,
          "start(): out of memory; the engine is stopped, its snapshot untouched (open a new one)"};
      return unwind_start(Status(kRep));
    }
  }

  // Undoes a start() that failed before the engine ran: the threads it started
  // see the stop and exit. Allocates nothing but the log line (best effort).
  Status unwind_start(Status failure) noexcept {
    state_.store(EngineState::kStopped, std::memory_order_release);
    go_.store(true, std::memory_order_release);
    for (auto& w : workers_) {
      if (w->thread.joinable()) w->thread.join();
    }
    if (scheduler_thread_.joinable()) stop_scheduler();
    if (persistence_started_) persistence_->stop();
    try {
      log(LogLevel::kError, failure.to_string());
    } catch (const std::bad_alloc&) {
    }
    return failure;
  }

  Result<StartReport> start_engine() {
    EngineState expected = EngineState::kOpen;
    if (state_.load(std::memory_order_acquire) != EngineState::kOpen) {
      return Status(StatusCode::kFailedPrecondition,
                    std::string("start(): engine is ") +
                        std::string(engine_state_name(state_.load())) +
                        ", it can be started once, from open");
    }
    // Before restore(): metrics_data() reads it once the engine left kOpen,
    // also after a start() that failed.
    sched_cancelled_by_handler_ =
        std::make_unique<std::atomic<std::uint64_t>[]>(handlers_.size());
    poisoned_by_handler_ = std::make_unique<std::atomic<std::uint64_t>[]>(handlers_.size());
    RecoveryReport recovery = recovery_;
    if (Status restored = restore(recovery); !restored.ok()) {
      // Part of the snapshot may be in the table and queues already: a
      // second start() would restore it all again (jobs twice). The engine
      // stays stopped; its snapshot is untouched for the next open().
      state_.store(EngineState::kStopped, std::memory_order_release);
      log(LogLevel::kError, restored.to_string());
      return restored;
    }
    // Jitter that differs between processes: with a fixed seed, replicas of a
    // service that met the same outage retried in lockstep (every process's
    // first engine drew the same backoffs).
    const std::uint64_t jitter_seed = process_seed();
    workers_.reserve(options_.workers);
    for (unsigned i = 0; i < options_.workers; ++i) {
      workers_.push_back(
          std::make_unique<WorkerState>(queues_, options_.dequeue_batch, handlers_.size()));
      workers_.back()->index = i;
      workers_.back()->rng ^= (uid_ << 20) + i * 0x2545F4914F6CDD1Dull + jitter_seed;
      if (workers_.back()->rng == 0) workers_.back()->rng = 0x9e3779b97f4a7c15ull;  // xorshift's fixed point
    }
    // Every queue producer an engine thread enqueues through is made here, on
    // this thread, before any of them runs: an allocation that fails fails
    // start() (and none happens behind a submitter's back once start() returned).
    Status failure;
    for (auto& w : workers_) {
      if (!all_valid(w->requeue)) {
        failure = Status(StatusCode::kInternal,
                         "start(): out of memory creating the queue producers of worker " +
                             std::to_string(w->index));
        break;
      }
    }
    SchedulerTokens sched_tokens{QueueProducerToken(queues_[0]), QueueProducerToken(queues_[1]),
                                 QueueProducerToken(queues_[2])};
    if (failure.ok() && !all_valid(sched_tokens)) {
      failure = Status(StatusCode::kInternal,
                       "start(): out of memory creating the scheduler's queue producers");
    }
    // Workers wait for go_ so that none runs before every one is named and
    // pinned (and so a failed start can be unwound).
    for (auto& w : workers_) {
      if (!failure.ok()) break;
      try {
        WorkerState* ws = w.get();
        ws->thread = std::thread([this, ws] { worker_main(*ws); });
      } catch (const std::system_error& e) {
        failure = Status(StatusCode::kIoError,
                         "start(): creating worker thread " + std::to_string(w->index) + ": " +
                             e.what());
        break;
      }
      int cpu = options_.cpus.empty() ? -1 : options_.cpus[w->index];
      Status placed = detail::place_thread(w->thread.native_handle(),
                                           "jobengine-w" + std::to_string(w->index), cpu);
      if (!placed.ok()) {
        failure = placed;
        break;
      }
    }
    if (failure.ok()) {
      try {
        scheduler_thread_ = std::thread(
            [this, tokens = std::move(sched_tokens),
             retired = detail::RetireBuffer(kSlotCacheSize * 2)]() mutable {
              scheduler_main(tokens, retired);
            });
        failure = detail::place_thread(scheduler_thread_.native_handle(), "jobengine-sched",
                                       options_.scheduler_cpu);
      } catch (const std::system_error& e) {
        failure = Status(StatusCode::kIoError,
                         std::string("start(): creating the scheduler thread: ") + e.what());
      }
    }
    // The snapshot thread starts before intake opens, so no accepted job
    // precedes the first snapshot the thread can take.
    // The live record is marked credited before the snapshot thread can
    // publish the recoveries restore() gave (mark_live_record_credited()).
    if (failure.ok() && live_ != nullptr) mark_live_record_credited();
    if (failure.ok() && persistence_) {
      failure = persistence_->start(*this, recovered_generation_ + 1);
      persistence_started_ = failure.ok();
    }
    if (failure.ok() && live_ != nullptr) arm_live_record();
    if (!failure.ok()) return unwind_start(failure);
    // Everything that allocates before the engine runs: nothing may throw
    // once it does (start() would report a failure while it runs).
    StartReport report;
    report.workers = options_.workers;
    report.pinned_cpus = options_.cpus;
    report.recovery = std::move(recovery);
    // Release: workers that see kRunning/go_ see the handler table.
    state_.compare_exchange_strong(expected, EngineState::kRunning, std::memory_order_acq_rel);
    go_.store(true, std::memory_order_release);
    // Return only once every worker runs, so health() right after start() is ok.
    for (auto& w : workers_) {
      while (!w->alive.load(std::memory_order_acquire) && !w->gone.load(std::memory_order_acquire)) {
        std::this_thread::yield();
      }
    }
    try {
      log(LogLevel::kInfo, "started " + std::to_string(options_.workers) + " worker(s)" +
                               (options_.cpus.empty()
                                    ? std::string(", unpinned")
                                    : ", pinned to cpus " + detail::format_cpu_list(options_.cpus)));
    } catch (const std::bad_alloc&) {
    }
    return report;
  }

  // ------------------------------------------------------------------ submit

  Result<JobId> submit(HandlerId handler, std::string_view payload, const SubmitOptions& o) {
    if (!job_ok(handler, payload, o) || !plain(o)) [[unlikely]] {
      return submit_special(handler, payload, o, /*id=*/0);
    }
    return submit_plain(handler, payload, o.priority);
  }
  // submit() with default options: no SubmitOptions to build, copy or test.
  Result<JobId> submit(HandlerId handler, std::string_view payload) {
    if (!job_ok(handler, payload)) [[unlikely]] return submit(handler, payload, SubmitOptions{});
    return submit_plain(handler, payload, kNormalPriority);
  }

  // The fast path: a valid job without delay, deadline or key. Every store it
  // makes counts: they queue up in the store buffer behind the one that waits
  // for the queue's tail line (which the polling worker keeps taking back), so
  // the helpers are inlined (no register spills) and the slot's lines were
  // prefetched a few submits ago (take_slots).
  Result<JobId> submit_plain(HandlerId handler, std::string_view payload, std::uint8_t priority) {
    ProducerState* psp = producer_state();
    if (psp == nullptr) [[unlikely]] return no_producer_status();
    ProducerState& ps = *psp;
    const std::uint64_t epoch = enter_intake(ps);
    if (epoch == 0) [[unlikely]] return stopped_status();
    SlotIndex idx;
    if (!take_slots(ps, &idx, 1)) [[unlikely]] {
      bump(ps.rejected);
      leave_intake(ps);
      return queue_full_status();
    }
    JobId id = next_id(ps);
    const std::uint64_t now = Clock::ticks();
    if (payload.size() <= kInlinePayloadBytes) [[likely]] {
      fill_inline(idx, id, handler, payload, priority, now, epoch);
    } else if (!fill_slot(idx, id, handler, payload, priority, now, now, epoch)) [[unlikely]] {
      give_back_slots(ps, &idx, 1);
      leave_intake(ps);
      return out_of_memory_status(payload.size());
    }
    if (!queues_[priority].enqueue(ps.tokens[priority], idx)) [[unlikely]] {
      unclaim(ps, &idx, 1, epoch);
      leave_intake(ps);
      return Status(StatusCode::kInternal, "submit(): out of memory growing the job queue");
    }
    bump_release(ps.submitted);  // release: change_count()
    bump(ps.by_handler[handler]);
    leave_intake(ps);
    wake_after_enqueue(1);
    // The job is on its way: take the next magazine of free slots now, if
    // this was the cache's last, so that the pool round trip (lines the
    // workers wrote) falls between jobs rather than inside the next submit,
    // before its enqueue (once in 64 submits: the wake-up latency's p99).
    if (ps.cached == 0) [[unlikely]] refill_cache(ps);
    return id;
  }

  [[gnu::noinline]] void refill_cache(ProducerState& ps) {
    ps.cached = static_cast<std::uint32_t>(table_.take_free(ps.cache));
    for (std::uint32_t k = 1; k <= kPrefetchAhead && k <= ps.cached; ++k) {
      prefetch_for_fill(ps.cache[ps.cached - k]);
    }
  }

  // Everything submit()'s fast path does not do: errors, delays, unique keys,
  // own deadlines, and requeue_dead() (id != 0: reuse that id).
  Result<JobId> submit_special(HandlerId handler, std::string_view payload,
                               const SubmitOptions& o, JobId reuse_id,
                               std::uint16_t attempts = 0) {
    if (Status st = check_job(handler, payload, o); !st.ok()) return st;
    std::unique_lock<std::mutex> key_lock;
    // The key's entry is made before anything is accepted (it allocates) and
    // given the id at the end, its entry by id once the id is known; every
    // other way out takes them back.
    struct KeyEntry {
      decltype(keys_)* keys = nullptr;
      decltype(keys_)::iterator it;
      decltype(key_by_id_)* by_id = nullptr;
      JobId id = 0;
      ~KeyEntry() {
        if (keys == nullptr) return;
        if (by_id != nullptr) by_id->erase(id);
        keys->erase(it);
      }
    } key_entry;
    if (!o.unique_key.empty()) {
      // A stopped (or stopping) engine answers kStopped, as for any submit,
      // not the id of a job its key still names (one left in a final
      // snapshot, or a delayed one that stop() left behind).
      if (state_.load(std::memory_order_acquire) != EngineState::kRunning) return stopped_status();
      key_lock = std::unique_lock<std::mutex>(keys_mu_);
      auto it = keys_.find(o.unique_key);
      if (it != keys_.end()) return it->second;  // the pending job with this key
      try {
        key_entry.it = keys_.emplace(std::string(o.unique_key), JobId{0}).first;
        key_entry.keys = &keys_;
      } catch (const std::bad_alloc&) {
        return Status(StatusCode::kInternal, "submit(): out of memory recording a unique key");
      }
    }
    ProducerState* psp = producer_state();
    if (psp == nullptr) [[unlikely]] return no_producer_status();
    ProducerState& ps = *psp;
    const std::uint64_t now = vnow();
    const std::uint64_t run_at = run_at_ticks(o, now);
    const std::uint64_t epoch = enter_intake(ps);
    if (epoch == 0) return stopped_status();
    SlotIndex idx;
    if (!take_slots(ps, &idx, 1)) {
      bump(ps.rejected);
      leave_intake(ps);
      return queue_full_status();
    }
    const JobId id = reuse_id != 0 ? reuse_id : next_id(ps);
    if (key_entry.keys != nullptr) {
      // Nothing is accepted yet: a failure here unwinds like fill_slot()'s.
      try {
        key_by_id_.insert_or_assign(id, std::string_view(key_entry.it->first));
      } catch (const std::bad_alloc&) {
        give_back_slots(ps, &idx, 1);
        leave_intake(ps);
        return Status(StatusCode::kInternal, "submit(): out of memory recording a unique key");
      }
      key_entry.by_id = &key_by_id_;
      key_entry.id = id;
    }
    const bool delayed = run_at > now;
    if (!fill_slot(idx, id, handler, payload, o.priority, now, run_at, epoch,
                   delayed ? SlotState::kDelayed : SlotState::kQueued, o.unique_key,
                   static_cast<std::uint64_t>(o.deadline.count()))) {
      give_back_slots(ps, &idx, 1);
      leave_intake(ps);
      return out_of_memory_status(payload.size());
    }
    table_.slot(idx).attempts.store(attempts, std::memory_order_relaxed);
    bool ok;
    if (delayed) {
      ok = schedule(idx, run_at);
    } else {
      ok = queues_[o.priority].enqueue(ps.tokens[o.priority], idx);
    }
    if (!ok) {
      unclaim(ps, &idx, 1, epoch);
      leave_intake(ps);
      return Status(StatusCode::kInternal, "submit(): out of memory growing a job queue");
    }
    bump_release(ps.submitted);  // release: change_count()
    bump(ps.by_handler[handler]);
    leave_intake(ps);
    if (key_entry.keys != nullptr) {
      key_entry.it->second = id;  // under keys_mu_, still held
      key_entry.keys = nullptr;
    }
    if (!delayed) wake_after_enqueue(1);
    return id;
  }

  // When a job submitted now with `o` may run, in ticks.
  static std::uint64_t run_at_ticks(const SubmitOptions& o, std::uint64_t now) {
    if (o.delay.count() > 0) return now + Clock::ticks_in_ns(o.delay.count());
    if (o.run_at != std::chrono::system_clock::time_point{}) {
      // Compared before subtracting: run_at - now overflows for a run_at far
      // in the past (time_point::min() as "as soon as possible").
      const auto wall = std::chrono::system_clock::now();
      if (o.run_at <= wall) return now;
      const auto ahead = std::chrono::duration_cast<std::chrono::nanoseconds>(o.run_at - wall).count();
      if (ahead > 0) return now + Clock::ticks_in_ns(ahead);
    }
    return now;
  }

  Result<JobId> submit(std::string_view name, std::string_view payload, SubmitOptions o) {
    auto it = by_name_.find(name);
    if (it == by_name_.end()) {
      return Status(StatusCode::kNotFound, "submit(): no handler named \"" + std::string(name) + "\"");
    }
    return submit(it->second, payload, o);
  }

  Result<std::size_t> submit_batch(std::span<const JobSpec> jobs, std::span<JobId> ids) {
    if (!ids.empty() && ids.size() != jobs.size()) {
      return Status(StatusCode::kInvalidArgument,
                    "submit_batch(): ids holds " + std::to_string(ids.size()) +
                        " entries for " + std::to_string(jobs.size()) + " jobs");
    }
    if (jobs.size() > options_.capacity) {
      // kQueueFull would say "retry later" of a batch that can never fit.
      return Status(StatusCode::kInvalidArgument,
                    "submit_batch(): a batch of " + std::to_string(jobs.size()) +
                        " jobs can never fit the job table (capacity " +
                        std::to_string(options_.capacity) + "): split it");
    }
    for (std::size_t i = 0; i < jobs.size(); ++i) {
      if (job_ok(jobs[i].handler, jobs[i].payload, jobs[i].options) && plain(jobs[i].options))
          [[likely]] {
        continue;
      }
      if (Status s = check_job(jobs[i].handler, jobs[i].payload, jobs[i].options); !s.ok()) {
        return Status(s.code(), "submit_batch(): job " + std::to_string(i) + ": " + std::string(s.message()));
      }
      if (!plain(jobs[i].options)) {
        return Status(StatusCode::kInvalidArgument,
                      "submit_batch(): job " + std::to_string(i) +
                          ": delay, run_at, deadline and unique_key are for submit() only");
      }
    }
    ProducerState* psp = producer_state();
    if (psp == nullptr) [[unlikely]] return no_producer_status();
    ProducerState& ps = *psp;
    const std::size_t n = jobs.size();
    bool single_level = true;
    for (std::size_t i = 1; i < n && single_level; ++i) {
      single_level = jobs[i].options.priority == jobs[0].options.priority;
    }
    // Scratch space first, outside intake: nothing between enter_intake()
    // and leave_intake() may throw (stop() and every cut would wait forever).
    try {
      if (ps.batch_slots.size() < n) ps.batch_slots.resize(n);
      if (!single_level) {
        for (auto& v : ps.batch_by_level) v.reserve(n);
      }
    } catch (const std::bad_alloc&) {
      return Status(StatusCode::kInternal,
                    "submit_batch(): out of memory for a batch of " + std::to_string(n) + " jobs");
    }
    const std::uint64_t epoch = enter_intake(ps);
    if (epoch == 0) return stopped_status();
    if (jobs.empty()) {
      leave_intake(ps);
      return std::size_t{0};
    }
    SlotIndex* slots = ps.batch_slots.data();
    if (!take_slots(ps, slots, n)) {
      bump(ps.rejected, n);
      leave_intake(ps);
      return batch_full_status();
    }
    const std::uint64_t t = Clock::ticks();
    // As in submit_plain: every slot's lines asked for exclusive, a few ahead.
    for (std::size_t i = 0; i < n && i < kRunAhead; ++i) prefetch_for_fill(slots[i]);
    for (std::size_t i = 0; i < n; ++i) {
      if (i + kRunAhead < n) prefetch_for_fill(slots[i + kRunAhead]);
      JobId id = next_id(ps);
      if (jobs[i].payload.size() <= kInlinePayloadBytes) [[likely]] {
        fill_inline(slots[i], id, jobs[i].handler, jobs[i].payload,
                    jobs[i].options.priority, t, epoch);
      } else if (!fill_slot(slots[i], id, jobs[i].handler, jobs[i].payload,
                            jobs[i].options.priority, t, t, epoch)) [[unlikely]] {
        unclaim(ps, slots, i, epoch);                 // filled
        give_back_slots(ps, slots + i, n - i);        // not yet
        leave_intake(ps);
        // Nothing accepted: every id reads 0 (the caller's buffer may hold
        // a previous batch's ids past `i`).
        if (!ids.empty()) std::fill(ids.begin(), ids.end(), 0);
        return Status(StatusCode::kInternal, "submit_batch(): job " + std::to_string(i) + ": " +
                                                 std::string(out_of_memory_status(jobs[i].payload.size()).message()));
      }
      if (!ids.empty()) ids[i] = id;
    }
    // One bulk enqueue per level present. The common single-level batch goes
    // straight from the slot array.
    // Levels go in in order; `failed` is the first one moodycamel could not
    // queue (only when memory runs out), kPriorityLevels if none.
    std::uint8_t failed = kPriorityLevels;
    if (single_level) {
      std::uint8_t p = jobs[0].options.priority;
      if (!queues_[p].enqueue_bulk(ps.tokens[p], slots, n)) [[unlikely]] failed = p;
    } else {
      for (auto& v : ps.batch_by_level) v.clear();
      for (std::size_t i = 0; i < n; ++i) ps.batch_by_level[jobs[i].options.priority].push_back(slots[i]);
      // Enqueue is all-or-nothing per call, but not across calls. The queues
      // were given blocks for every slot at open, but a producer keeps the
      // blocks it used (moodycamel never moves them to another producer), so
      // a level can need new blocks or a larger block index; if it cannot
      // get them, the levels queued before stay queued (batch_not_queued
      // says so; QueueOutOfMemoryTest makes it happen).
      for (std::uint8_t p = 0; p < kPriorityLevels && failed == kPriorityLevels; ++p) {
        auto& v = ps.batch_by_level[p];
        if (!v.empty() && !queues_[p].enqueue_bulk(ps.tokens[p], v.data(), v.size())) failed = p;
      }
    }
    if (failed != kPriorityLevels) [[unlikely]] {
      return batch_not_queued(ps, jobs, ids, slots, epoch, failed);
    }
    bump_release(ps.submitted, n);  // release: change_count()
    // Once per run of one handler (a batch is usually one run), not once per
    // job: each bump is a load and a store of the same counter.
    for (std::size_t i = 0; i < n;) {
      const HandlerId h = jobs[i].handler;
      std::size_t run = 1;
      while (i + run < n && jobs[i + run].handler == h) ++run;
      bump(ps.by_handler[h], run);
      i += run;
    }
    leave_intake(ps);
    wake_after_enqueue(n);
    return n;
  }

  // submit_batch() could not queue the jobs at level `failed` and above, i.e.
  // of that priority and lower (out of memory): no worker saw them, and their
  // slots go back (unclaim). The jobs at the levels queued before `failed`
  // were accepted: counted (I4) and woken for, and the error says how many.
  // `ids` keeps the ids of the accepted jobs; those of the others read 0.
  [[gnu::noinline]] Status batch_not_queued(ProducerState& ps, std::span<const JobSpec> jobs,
                                            std::span<JobId> ids, SlotIndex* slots,
                                            std::uint64_t epoch, std::uint8_t failed) {
    std::size_t accepted = 0;
    std::size_t back = 0;
    for (std::size_t i = 0; i < jobs.size(); ++i) {
      if (jobs[i].options.priority < failed) {
        ++accepted;
        bump(ps.by_handler[jobs[i].handler]);
        continue;
      }
      slots[back++] = slots[i];
      if (!ids.empty()) ids[i] = 0;
    }
    unclaim(ps, slots, back, epoch);
    bump_release(ps.submitted, accepted);  // release: change_count()
    leave_intake(ps);
    if (accepted != 0) wake_after_enqueue(accepted);
    std::string what = "submit_batch(): out of memory growing the job queue of priority level " +
                       std::to_string(failed) + ": " + std::to_string(back) +
                       " job(s) from that level on were not accepted";
    if (accepted != 0) {
      what += "; the " + std::to_string(accepted) +
              " job(s) at higher priorities (lower levels) were queued before it and were accepted";
    }
    log(LogLevel::kError, what);
    return Status(StatusCode::kInternal, what);
  }

  // -------------------------------------------------------------------- stop

  Result<StopReport> stop(StopMode mode) {
    const auto t0 = std::chrono::steady_clock::now();
    if (t_worker_of == this) {
      return Status(StatusCode::kFailedPrecondition,
                    "stop(): called from a handler on one of this engine's workers, which stop() "
                    "must join; call it from another thread");
    }
    std::lock_guard<std::mutex> lock(stop_mu_);
    EngineState s = state_.load(std::memory_order_acquire);
    if (s != EngineState::kRunning) {
      return Status(StatusCode::kFailedPrecondition,
                    std::string("stop(): engine is ") + std::string(engine_state_name(s)) +
                        ", only a running engine can be stopped");
    }
    if (mode == StopMode::kSnapshotAndExit && !(persistence_ && persistence_->has_disk())) {
      return Status(StatusCode::kFailedPrecondition,
                    "stop(kSnapshotAndExit): needs snapshots with a disk store "
                    "(options.snapshot.enabled and options.snapshot.dir)");
    }
    stop_mode_.store(static_cast<std::uint8_t>(mode), std::memory_order_relaxed);
    // I2: close intake, then wait for submitters inside it to leave.
    state_.store(EngineState::kStopping, std::memory_order_seq_cst);
    asymmetric_fence_heavy();
    for (ProducerState* p = producers_.load(std::memory_order_acquire); p != nullptr; p = p->next) {
      // Acquire: pairs with leave_intake's release, so its counts are final.
      while (p->active.load(std::memory_order_acquire) != 0) std::this_thread::yield();
    }
    abandon_.store(mode == StopMode::kAbandon, std::memory_order_relaxed);
    exit_now_.store(mode == StopMode::kSnapshotAndExit, std::memory_order_relaxed);
    // Release: a worker that sees intake_closed_ sees abandon_, exit_now_ and
    // the final counts.
    intake_closed_.store(true, std::memory_order_release);
    // Wake every worker, sleeping or about to sleep (I3: they re-check
    // intake_closed_ after their heavy fence, and these permits cover the rest).
    sleep_sem_.release(static_cast<std::ptrdiff_t>(workers_.size()));
    poke_scheduler();  // kDrain: it splits off the delayed jobs it holds back

    StopReport report;
    Status final_status;
    if (mode == StopMode::kSnapshotAndExit) {
      // Running handlers get until the deadline; then the snapshot is taken
      // anyway (a job still running is recorded as pending, no recovery given:
      // a graceful exit is no crash; it runs again after the restart).
      const auto deadline = std::chrono::steady_clock::now() + options_.snapshot.exit_deadline;
      for (auto& w : workers_) {
        while (w->alive.load(std::memory_order_acquire) &&
               std::chrono::steady_clock::now() < deadline) {
          std::this_thread::sleep_for(std::chrono::microseconds(200));
        }
      }
      stop_scheduler();  // delayed jobs stay in the table, so in the snapshot
      persistence_->stop();
      begin_final_cut();
      auto info = persistence_->final_snapshot();
      if (info) {
        report.left_in_snapshot = info->resumable_jobs;
      } else {
        final_status = info.status();
      }
      for (auto& w : workers_) {
        if (w->thread.joinable()) w->thread.join();
      }
    } else {
      for (auto& w : workers_) {
        if (w->thread.joinable()) w->thread.join();
      }
      stop_scheduler();
      // No cut may run while stop() reclaims dropped slots, so the snapshot
      // thread stops first; the final snapshot then records what is left
      // (nothing after an abandon; after a drain, the delayed jobs not yet
      // due) so a restart does not run finished jobs again.
      if (persistence_) persistence_->stop();
      settle_cancelled_left();
      std::uint64_t dropped_here = 0;
      if (mode == StopMode::kAbandon) dropped_here = drop_queued();
      dropped_by_stop_.store(dropped_here, std::memory_order_relaxed);
      if (mode == StopMode::kDrain) {
        // What the scheduler held when it stopped (held_ is from its last
        // pass before that, and a retry handed over since would be missed).
        report.delayed_left = sched_left_.size() + left_in_queues();
      }
      if (persistence_) {
        begin_final_cut();
        auto info = persistence_->final_snapshot();
        if (!info) {
          final_status = info.status();
          report.final_snapshot = final_snapshot_failure(mode, final_status);
        }
      }
    }
    // Every worker is joined: none runs a job now or ever again, so the live
    // record has nothing left to tell a crash (its slot file goes).
    if (live_ != nullptr) {
      for (auto& w : workers_) w->live = &w->live_idle;
      live_->close();
    }
    state_.store(EngineState::kStopped, std::memory_order_release);

    Health h = health();
    report.submitted = h.submitted;
    report.done = h.done;
    report.failed = h.failed;
    report.cancelled = h.cancelled;
    report.dropped = h.dropped;
    report.recovered = h.recovered;
    report.took = std::chrono::duration_cast<std::chrono::nanoseconds>(
        std::chrono::steady_clock::now() - t0);
    const char* mode_name = mode == StopMode::kDrain     ? "drain"
                            : mode == StopMode::kAbandon ? "abandon"
                                                         : "snapshot-and-exit";
    log(LogLevel::kInfo, std::string("stopped (") + mode_name + "): " +
                             std::to_string(report.done) + " done, " +
                             std::to_string(report.failed) + " failed, " +
                             std::to_string(report.dropped) + " dropped" +
                             (mode == StopMode::kSnapshotAndExit
                                  ? ", " + std::to_string(report.left_in_snapshot) +
                                        " left in the final snapshot"
                                  : std::string()));
    if (!final_status.ok()) {
      log(LogLevel::kError, "final snapshot failed: " + final_status.to_string());
      if (mode == StopMode::kSnapshotAndExit) return final_snapshot_failure(mode, final_status);
    }
    return report;
  }

  // stop()'s word on a final snapshot that a store did not take (the error
  // names the store): when it was the disk, a restart recovers the previous
  // disk generation, unless a shared-memory segment took the final one (it
  // keeps it until a reboot).
  static Status final_snapshot_failure(StopMode mode, const Status& failure) {
    const char* name = mode == StopMode::kDrain     ? "kDrain"
                       : mode == StopMode::kAbandon ? "kAbandon"
                                                    : "kSnapshotAndExit";
    return Status(failure.code(), std::string("stop(") + name +
                                      "): the final snapshot was not written to every store, so a "
                                      "restart may recover the previous generation: " +
                                      std::string(failure.message()));
  }

  Result<SnapshotInfo> snapshot_now() {
    if (!persistence_ || !persistence_->has_disk()) {
      return Status(StatusCode::kFailedPrecondition,
                    "snapshot_now(): needs snapshots with a disk store (options.snapshot.enabled "
                    "and options.snapshot.dir)");
    }
    if (state_.load(std::memory_order_acquire) != EngineState::kRunning) {
      return Status(StatusCode::kFailedPrecondition, "snapshot_now(): engine is not running");
    }
    return persistence_->snapshot_now();
  }

  // Engine::open() after the constructor: populates the job table (see
  // JobTable::populate) with a helper thread while this one opens the stores
  // and loads (maps and verifies) the newest snapshot, then helps with the
  // rest of the table. Both jobs are memory-bound and independent, so on two
  // or more cores open() takes about the longer of them, not their sum. The
  // helper is joined before this returns: no thread outlives open().
  Status populate_and_load() {
    std::thread helper;
    try {
      helper = std::thread([this] { table_.populate(); });
    } catch (const std::system_error&) {
      // No thread to spare: this one populates it all below.
    }
    Status s;
    try {
      s = init_persistence();
    } catch (...) {
      table_.populate();
      if (helper.joinable()) helper.join();
      throw;
    }
    table_.populate();
    if (helper.joinable()) helper.join();
    return s;
  }

  // Opens the stores and loads the newest snapshot (Engine::open()).
  Status init_persistence() {
    if (!options_.snapshot.enabled) {
      const SnapshotOptions& so = options_.snapshot;
      if (!so.dir.empty() || !so.shm_name.empty()) {
        // Said, not refused (a config may switch persistence off and keep
        // the rest): a crash loses every pending job of this engine.
        log(LogLevel::kWarning,
            "snapshot.enabled is false: snapshot." +
                std::string(!so.dir.empty() ? "dir \"" + so.dir + "\"" : "") +
                std::string(!so.dir.empty() && !so.shm_name.empty() ? " and snapshot." : "") +
                std::string(!so.shm_name.empty() ? "shm_name \"" + so.shm_name + "\"" : "") +
                " ignored: nothing is snapshotted or recovered");
      }
      return Status();
    }
    auto p = detail::make_persistence(options_.snapshot, options_.log);
    if (!p) return p.status();
    persistence_ = std::move(*p);
    auto loaded = persistence_->load_newest(recovery_);
    if (!loaded) return loaded.status();
    loaded_ = std::move(*loaded);
    if (loaded_) {
      recovered_generation_ = loaded_->view.header.generation;
      // Ids below the snapshot's counter may be in use: never hand them out.
      next_id_.store(std::max<JobId>(next_id_.load(), loaded_->view.header.next_job_id));
    }
    if ((live_ = persistence_->live_record()) != nullptr) {
      // Nor those the previous process may have handed out after that
      // snapshot's cut, up to its lease.
      next_id_.store(std::max<JobId>(next_id_.load(), live_->previous_lease_end()));
      const std::uint64_t credited = live_->previous_credited_generation();
      if (credited != 0 && loaded_ && loaded_->view.header.generation >= credited) {
        // A start that gave these jobs their recovery published this
        // snapshot with it, then was killed before it rewrote the record.
        log(LogLevel::kInfo, "live record: its running jobs' recoveries are in generation " +
                                 std::to_string(loaded_->view.header.generation) + " already");
      } else {
        crashed_running_.insert(live_->previous_running().begin(),
                                live_->previous_running().end());
      }
    }
    return Status();
  }

  // ------------------------------------------------------------ CutSource (I5-I7)

  std::uint64_t begin_cut() override {
    const std::uint64_t cut = table_.epoch();
    {
      // The dead letters as of the cut: copied with the bump under dead_mu_,
      // which requeue_dead() holds from taking a dead letter out to stamping
      // its job back into the table. So a requeue is wholly before the bump
      // (its stamp <= C: the job is in the cut, the letter gone from the
      // copy) or wholly after it (stamp > C: not in the cut, the letter in
      // the copy), never in neither.
      std::lock_guard<std::mutex> lock(dead_mu_);
      cut_dead_.assign(dead_.begin(), dead_.end());
      // I7: the horizon first, then the bump (release, then acq_rel).
      table_.set_reclaim_horizon(cut + 1);
      table_.advance_epoch();
    }
    asymmetric_fence_heavy();
    // I5: wait out every announcement of an epoch <= cut. Acquire: pairs with
    // the release that clears an announcement, or with the release of the
    // thread's next announcement (announce()), so the stamps are visible.
    // A thread preempted inside its announcement would keep a pure spin
    // waiting for a whole timeslice on a small machine: yield after a while.
    auto wait_out = [cut](const std::atomic<std::uint64_t>& announced) {
      for (unsigned spins = 0;; ++spins) {
        const std::uint64_t a = announced.load(std::memory_order_acquire);
        if (a == 0 || a > cut) return;
        if (spins < 256) {
          cpu_relax();
        } else {
          std::this_thread::yield();
        }
      }
    };
    for (ProducerState* p = producers_.load(std::memory_order_acquire); p != nullptr; p = p->next) {
      wait_out(p->active);
    }
    for (const auto& w : workers_) wait_out(w->announce);
    wait_out(sched_announce_);
    return cut;
  }

  void for_each_cut_job(std::uint64_t cut,
                        const std::function<void(std::span<const detail::CutJob>)>& fn) override {
    std::array<detail::CutJob, detail::CutSource::kCutBatch> batch;
    std::size_t n = 0;
    // stop(kSnapshotAndExit)'s final cut: a job whose handler outlived
    // exit_deadline is interrupted by a graceful exit, not a crash. It is
    // recorded pending (its attempts kept: the interrupted run counts), so the
    // restart runs it again without a recovery: graceful deploys never make a
    // long job poison. Should the process be killed before it exits, the live
    // record still names the job (its worker clears its word only once the
    // handler returns), and that crash counts. Both flags are stop()'s, set
    // before this cut (the snapshot thread is stopped by then).
    const bool exiting = final_cut_.load(std::memory_order_relaxed) &&
                         exit_now_.load(std::memory_order_relaxed);
    const snapshot::JobState running_state =
        exiting ? snapshot::JobState::kPending : snapshot::JobState::kRunningAtCut;
    // Only the parts of the table that may hold a job (JobTable::
    // for_each_scan_range(): read after begin_cut(), they cover every slot
    // claimed in the cut).
    table_.for_each_scan_range([&](std::size_t begin, std::size_t end) {
      for (std::size_t i = begin; i < end; ++i) {
        // The scan is bound by memory latency (a slot header is a cache miss
        // once the table outgrows the caches): fetch the header and first
        // payload line kScanAhead slots ahead.
        if (i + kScanAhead < end) {
          const auto* ahead =
              reinterpret_cast<const char*>(&table_.slot(static_cast<SlotIndex>(i + kScanAhead)));
          __builtin_prefetch(ahead, 0, 3);
          __builtin_prefetch(ahead + kCacheLine, 0, 3);
        }
        const Slot& s = table_.slot(static_cast<SlotIndex>(i));
        // I6, read as job_table.h (3) says: finish first, with acquire.
        const std::uint64_t f = s.finish_epoch.load(std::memory_order_acquire);
        if (f != 0 && f <= cut) continue;
        const std::uint64_t e = s.submit_epoch.load(std::memory_order_relaxed);
        if (e == 0 || e > cut) continue;
        detail::CutJob& j = batch[n];
        const std::uint64_t word = s.id_word.load(std::memory_order_relaxed);
        j.id = word & kIdMask;
        j.cancel_requested = (word & kCancelBit) != 0;
        j.handler = s.handler;
        j.priority = s.priority;
        // Acquire: pairs with after_handler's release, so a retry's state is
        // read with its own run_at below (on ARM the plain loads could pair a
        // new kWaitingRetry with the old run_at: due at once after recovery).
        switch (s.state.load(std::memory_order_acquire)) {
          case SlotState::kRunning: j.state = running_state; break;
          case SlotState::kDelayed: j.state = snapshot::JobState::kDelayed; break;
          case SlotState::kWaitingRetry: j.state = snapshot::JobState::kWaitingRetry; break;
          default: j.state = snapshot::JobState::kPending; break;
        }
        j.attempts = s.attempts.load(std::memory_order_relaxed);
        j.recoveries = s.recoveries;
        j.submit_ticks = s.submit_ticks;
        j.run_at_ticks = s.run_at_ticks.load(std::memory_order_relaxed);
        j.payload = std::string_view(reinterpret_cast<const char*>(s.payload()), s.payload_size);
        if (const ExtraHeader* x = s.extra()) {
          j.deadline_ns = x->deadline_ns;
          j.key = s.key();
        } else {
          j.deadline_ns = 0;
          j.key = {};
        }
        if (++n == batch.size()) {
          fn(std::span<const detail::CutJob>(batch.data(), n));
          n = 0;
        }
      }
    });
    if (n != 0) fn(std::span<const detail::CutJob>(batch.data(), n));
  }

  void end_cut() noexcept override {
    if (auto* hook = detail::g_before_end_cut.load(std::memory_order_relaxed)) [[unlikely]] hook();
    table_.set_reclaim_horizon(detail::kNoHorizon);
    // Slots workers parked while the horizon held them (I7) go back now.
    table_.release_parked();
    extend_lease_ahead();
  }

  // Keeps the live record's lease half a lease ahead of the ids handed out,
  // from the snapshot thread (after each cut), so that a submitter seldom
  // extends it itself: a store into DIR/LIVE's mapping, which can fault into
  // the disk's file system after a writeback (README, "Workers untouched by a
  // sick snapshot disk"). Submitters still extend it when they outrun this.
  void extend_lease_ahead() noexcept {
    // Acquire: pairs with arm_live_record()'s release; ~0 until the record
    // is armed (never, if it could not be: then live_ may be reset).
    const JobId end = lease_end_.load(std::memory_order_acquire);
    if (end == ~JobId{0}) return;
    const JobId handed = next_id_.load(std::memory_order_relaxed);
    if (handed + kLeaseIds / 2 < end) return;
    extend_lease(handed + kLeaseIds / 2 + 1);  // past lease_end_: 1.5 leases ahead
  }

  std::span<const std::string> handler_names() const override { return handler_names_; }
  JobId next_job_id() const override { return next_id_.load(std::memory_order_acquire); }
  // Only the snapshot thread calls begin_cut() and this, one cut at a time.
  std::vector<detail::DeadJob> dead_jobs() override { return std::move(cut_dead_); }
  // Submitted + recovered. Acquire: pending() relies on it after stop()
  // closed intake (I4).
  std::uint64_t accepted_total() const override {
    std::uint64_t n = recovered_.load(std::memory_order_acquire);
    for (ProducerState* p = producers_.load(std::memory_order_acquire); p != nullptr; p = p->next) {
      n += p->submitted.load(std::memory_order_acquire);
    }
    return n;
  }

  // Every count grows only, so the sum is unchanged exactly when each is.
  // Each is stored with release right after its change: the producers'
  // `submitted` after the enqueue or schedule() (so a snapshot thread that
  // reads it also reads the epoch the job was stamped with as at most the
  // cut it then makes: the job is in that cut), the worker's `runs` and `changes`, the
  // scheduler's scheduled_out_ (a job fired or cancelled), cancel_changes_
  // (a cancel bit set) and dead_changes_ (a dead letter in or out).
  std::uint64_t change_count() const override {
    std::uint64_t n = accepted_total();
    for (const auto& w : workers_) {
      n += w->runs.load(std::memory_order_acquire) + w->changes.load(std::memory_order_acquire);
    }
    n += scheduled_out_.load(std::memory_order_acquire);
    n += cancel_changes_.load(std::memory_order_acquire);
    n += dead_changes_.load(std::memory_order_acquire);
    return n;
  }

  // ------------------------------------------------------------------ health

  Health health() const {
    Health h;
    h.checked_at = std::chrono::system_clock::now();
    h.state = state_.load(std::memory_order_acquire);
    h.capacity = options_.capacity;
    h.workers = options_.workers;
    h.queue_high_water = high_water();
    for (std::uint8_t p = 0; p < kPriorityLevels; ++p) h.depth[p] = queues_[p].size_approx();
    for (ProducerState* p = producers_.load(std::memory_order_acquire); p != nullptr; p = p->next) {
      h.submitted += p->submitted.load(std::memory_order_relaxed);
      h.rejected += p->rejected.load(std::memory_order_relaxed);
    }
    const std::uint64_t now = Clock::ticks();
    const std::uint64_t vnow_ticks = vnow();
    std::uint64_t oldest_head = 0;
    JobId stuck_id = 0;
    std::uint64_t stuck_for = 0;
    unsigned waiting_for_memory = 0;
    JobId memory_wait_id = 0;
    // Workers are created by start() and never removed until the engine dies;
    // workers_ may only be read once start() published them (state != kOpen).
    if (h.state != EngineState::kOpen) {
      for (const auto& w : workers_) {
        h.done += w->done.load(std::memory_order_relaxed);
        h.failed += w->failed.load(std::memory_order_relaxed);
        h.retried += w->retried.load(std::memory_order_relaxed);
        h.exceptions += w->exceptions.load(std::memory_order_relaxed);
        h.dropped += w->dropped.load(std::memory_order_relaxed);
        h.cancelled += w->cancelled.load(std::memory_order_relaxed);
        h.stuck_total += w->stuck_total.load(std::memory_order_relaxed);
        h.memory_waits += w->memory_waits.load(std::memory_order_relaxed);
        if (const JobId j = w->memory_wait_job.load(std::memory_order_relaxed); j != 0) {
          ++waiting_for_memory;
          memory_wait_id = j;
        }
        h.running += w->runs.load(std::memory_order_relaxed) & 1;
        h.workers_alive += w->alive.load(std::memory_order_relaxed) ? 1 : 0;
        const std::uint64_t d = w->run_deadline.load(std::memory_order_relaxed);
        if (d != 0 && vnow_ticks > d) {
          ++h.stuck;
          if (vnow_ticks - d > stuck_for) {
            stuck_for = vnow_ticks - d;
            stuck_id = w->running_id.load(std::memory_order_relaxed) & kIdMask;
          }
        }
        const std::uint64_t head = w->head_ticks.load(std::memory_order_relaxed);
        if (head != 0 && (oldest_head == 0 || head < oldest_head)) oldest_head = head;
      }
    }
    h.cancelled += sched_cancelled_.load(std::memory_order_relaxed);
    h.dropped += dropped_by_stop_.load(std::memory_order_relaxed);
    h.recovered = recovered_.load(std::memory_order_relaxed);
    const std::uint64_t in = scheduled_in_.load(std::memory_order_relaxed);
    const std::uint64_t out = scheduled_out_.load(std::memory_order_relaxed) +
                              sched_dropped_.load(std::memory_order_relaxed);
    h.delayed = in > out ? in - out : 0;
    h.dead = dead_count_.load(std::memory_order_relaxed);
    h.dead_total = dead_total_.load(std::memory_order_relaxed);
    h.dead_discarded = dead_discarded_.load(std::memory_order_relaxed);
    const std::uint64_t finished = h.done + h.failed + h.dropped + h.cancelled;
    const std::uint64_t accepted = h.submitted + h.recovered;
    h.pending = accepted > finished ? accepted - finished : 0;
    const std::uint64_t queued = h.depth[0] + h.depth[1] + h.depth[2];
    if (queued != 0 && oldest_head != 0 && now > oldest_head) {
      h.oldest_pending_age = std::chrono::nanoseconds(Clock::ns_in_ticks(now - oldest_head));
    }
    if (persistence_) {
      detail::SnapshotHealth sh = persistence_->health();
      h.last_snapshot_generation = sh.last_generation;
      h.last_snapshot_age = sh.last_age;
      h.last_snapshot_duration = sh.last_duration;
      h.last_snapshot_bytes = sh.last_bytes;
      h.last_durable_generation = sh.last_durable_generation;
      h.last_durable_age = sh.last_durable_age;
      h.last_snapshot_error = std::move(sh.last_error);
      h.snapshot_failures = sh.failures;
      h.snapshots_unchanged = sh.unchanged;
      h.at_risk = accepted > sh.accepted_at_last_durable ? accepted - sh.accepted_at_last_durable : 0;
    }
    // The reasons (allocating only when something is wrong).
    if (h.state != EngineState::kRunning) {
      h.reasons.push_back("engine is " + std::string(engine_state_name(h.state)));
    } else if (h.workers_alive != h.workers) {
      h.reasons.push_back(std::to_string(h.workers - h.workers_alive) + " of " +
                          std::to_string(h.workers) + " workers not running");
    }
    if (h.stuck != 0) {
      h.reasons.push_back(std::to_string(h.stuck) + " job(s) running past their deadline; job " +
                          std::to_string(stuck_id) + " by " +
                          std::to_string(Clock::ns_in_ticks(stuck_for) / 1000000) + " ms");
    }
    if (waiting_for_memory != 0) {
      h.reasons.push_back(std::to_string(waiting_for_memory) +
                          " worker(s) out of memory recording a job's end, waiting for it; job " +
                          std::to_string(memory_wait_id));
    }
    if (persistence_ && h.state == EngineState::kRunning) {
      if (!h.last_snapshot_error.empty()) {
        h.reasons.push_back("last snapshot failed: " + h.last_snapshot_error);
      }
      const auto& so = options_.snapshot;
      auto check_age = [&](std::chrono::milliseconds interval, std::chrono::nanoseconds age,
                           std::uint64_t generation, const char* what) {
        if (interval.count() <= 0 || generation == 0) return;
        if (age > 2 * interval + std::chrono::milliseconds(1000)) {
          h.reasons.push_back(std::string(what) + " snapshot is " +
                              std::to_string(age.count() / 1000000) + " ms old, interval " +
                              std::to_string(interval.count()) + " ms");
        }
      };
      if (!so.shm_name.empty()) {
        check_age(so.shm_interval, h.last_snapshot_age, h.last_snapshot_generation, "newest");
      }
      if (!so.dir.empty()) {
        check_age(so.disk_interval, h.last_durable_age, h.last_durable_generation, "newest durable");
      }
    }
    if (options_.dead_growth_window.count() > 0) {
      const std::int64_t last = last_dead_steady_ns_.load(std::memory_order_relaxed);
      const std::int64_t ago = Clock::steady_ns() - last;
      // In milliseconds: the window in nanoseconds overflowed past ~292
      // years (milliseconds::max() as "for ever" turned the check off).
      if (last != 0 && ago / 1000000 < options_.dead_growth_window.count()) {
        h.reasons.push_back("dead-letter set growing: " + std::to_string(h.dead_total) +
                            " dead in all, the newest " + std::to_string(ago / 1000000) + " ms ago");
      }
    }
    if (h.pending > h.queue_high_water) {
      h.reasons.push_back("pending " + std::to_string(h.pending) + " above the high-water mark " +
                          std::to_string(h.queue_high_water));
    }
    h.ok = h.reasons.empty();
    return h;
  }

  std::size_t high_water() const {
    return options_.queue_high_water != 0 ? options_.queue_high_water
                                          : options_.capacity - options_.capacity / 10;
  }

  // ----------------------------------------------------------------- metrics

  detail::MetricsData metrics_data() const {
    detail::MetricsData m;
    const Health h = health();
    m.handlers.resize(handlers_.size());
    for (std::size_t i = 0; i < handlers_.size(); ++i) m.handlers[i].name = handlers_[i].name;
    for (ProducerState* p = producers_.load(std::memory_order_acquire); p != nullptr; p = p->next) {
      for (std::size_t i = 0; i < handlers_.size(); ++i) {
        m.handlers[i].submitted += p->by_handler[i].load(std::memory_order_relaxed);
      }
    }
    if (h.state != EngineState::kOpen) {
      for (const auto& w : workers_) {
        for (std::size_t i = 0; i < handlers_.size(); ++i) {
          const HandlerStats& hs = w->by_handler[i];
          detail::HandlerMetricsData& d = m.handlers[i];
          const std::uint64_t done = hs.done.load(std::memory_order_relaxed);
          const std::uint64_t retried = hs.retried.load(std::memory_order_relaxed);
          const std::uint64_t failed = hs.failed.load(std::memory_order_relaxed);
          d.started += done + retried + failed + hs.ran_other.load(std::memory_order_relaxed);
          d.done += done;
          d.retried += retried;
          d.failed += failed;
          d.dead += failed;
          d.cancelled += hs.cancelled.load(std::memory_order_relaxed);
          d.stuck += hs.stuck.load(std::memory_order_relaxed);
          hs.queue_wait.add_to(d.queue_wait);
          hs.run_time.add_to(d.run_time);
        }
      }
      // Null after a start() that ran out of memory making them.
      for (std::size_t i = 0; sched_cancelled_by_handler_ && i < handlers_.size(); ++i) {
        m.handlers[i].cancelled += sched_cancelled_by_handler_[i].load(std::memory_order_relaxed);
      }
      for (std::size_t i = 0; poisoned_by_handler_ && i < handlers_.size(); ++i) {
        m.handlers[i].dead += poisoned_by_handler_[i].load(std::memory_order_relaxed);
      }
    }
    for (std::uint8_t p = 0; p < kPriorityLevels; ++p) m.pending[p] = h.depth[p];
    m.delayed = h.delayed;
    m.running = h.running;
    m.dead = h.dead;
    m.stuck_now = h.stuck;
    m.oldest_pending_age_seconds = static_cast<double>(h.oldest_pending_age.count()) / 1e9;
    m.capacity = h.capacity;
    m.workers = h.workers;
    m.workers_alive = h.workers_alive;
    m.healthy = h.ok;
    m.rejected = h.rejected;
    m.exceptions = h.exceptions;
    m.dropped = h.dropped;
    m.recovered = h.recovered;
    m.memory_waits = h.memory_waits;
    lateness_.add_to(m.scheduler_lateness);
    if (persistence_) {
      m.has_snapshots = true;
      m.snapshot_generation = h.last_snapshot_generation;
      m.snapshot_age_seconds = static_cast<double>(h.last_snapshot_age.count()) / 1e9;
      m.snapshot_duration_seconds = static_cast<double>(h.last_snapshot_duration.count()) / 1e9;
      m.snapshot_bytes = h.last_snapshot_bytes;
      m.snapshot_failures = h.snapshot_failures;
      m.snapshots_unchanged = h.snapshots_unchanged;
      m.durable_age_seconds = static_cast<double>(h.last_durable_age.count()) / 1e9;
    }
    return m;
  }

  EngineState state() const noexcept { return state_.load(std::memory_order_acquire); }
  const EngineOptions& options() const noexcept { return options_; }

 private:
  struct HandlerEntry {
    std::string name;
    Handler fn;
    std::uint32_t max_attempts = 3;
    RetryPolicy retry;
    std::uint64_t deadline_ticks = 0;  // per-run deadline in Clock ticks; 0 none
  };

  // ----------------------------------------------------------- submit parts

  // The hot-path test; check_job() says what is wrong.
  bool job_ok(HandlerId handler, std::string_view payload, const SubmitOptions& o) const noexcept {
    return o.priority < kPriorityLevels && job_ok(handler, payload);
  }
  bool job_ok(HandlerId handler, std::string_view payload) const noexcept {
    return handler < handlers_.size() && payload.size() <= options_.max_payload;
  }

  // No delay, run_at, deadline or unique key: the fast path applies.
  static bool plain(const SubmitOptions& o) noexcept {
    return o.delay.count() == 0 && o.run_at == std::chrono::system_clock::time_point{} &&
           o.deadline.count() == 0 && o.unique_key.empty();
  }

  Status check_job(HandlerId handler, std::string_view payload, const SubmitOptions& o) const {
    if (o.delay.count() < 0) {
      return Status(StatusCode::kInvalidArgument,
                    "delay must be >= 0, got " + std::to_string(o.delay.count()) + " ns");
    }
    if (o.delay.count() > 0 && o.run_at != std::chrono::system_clock::time_point{}) {
      return Status(StatusCode::kInvalidArgument, "give delay or run_at, not both");
    }
    if (o.deadline.count() < 0) {
      return Status(StatusCode::kInvalidArgument,
                    "deadline must be >= 0, got " + std::to_string(o.deadline.count()) + " ns");
    }
    if (o.unique_key.size() > kMaxUniqueKey) {
      return Status(StatusCode::kInvalidArgument,
                    "unique_key of " + std::to_string(o.unique_key.size()) +
                        " bytes exceeds " + std::to_string(kMaxUniqueKey));
    }
    if (job_ok(handler, payload, o)) [[likely]] return Status();
    if (handler >= handlers_.size()) {
      return Status(StatusCode::kNotFound, "no handler with id " + std::to_string(handler) +
                                               " (" + std::to_string(handlers_.size()) +
                                               " registered)");
    }
    if (o.priority >= kPriorityLevels) {
      return Status(StatusCode::kInvalidArgument,
                    "priority " + std::to_string(o.priority) + " out of range 0.." +
                        std::to_string(kPriorityLevels - 1));
    }
    if (payload.size() > options_.max_payload) {
      return Status(StatusCode::kPayloadTooLarge,
                    "payload of " + std::to_string(payload.size()) + " bytes exceeds max_payload " +
                        std::to_string(options_.max_payload));
    }
    return Status();
  }

  // The two errors a hot submit loop meets are built without allocating, so
  // back-pressure does not slow the caller down further.
  // producer_state() gave nullptr: the engine is not running, or this
  // thread's producers could not be made (then a later submit tries again).
  [[gnu::noinline]] static Status no_producer_status() {
    if (std::exchange(t_producer_out_of_memory, false)) {
      return Status(StatusCode::kInternal,
                    "out of memory creating this thread's job queue producers; nothing was "
                    "accepted, and the thread's next submit tries again");
    }
    return stopped_status();
  }
  static Status stopped_status() {
    static constexpr Status::Rep kRep{StatusCode::kStopped, false, "engine is not running"};
    return Status(kRep);
  }
  static Status queue_full_status() {
    static constexpr Status::Rep kRep{StatusCode::kQueueFull, false, "job table full"};
    return Status(kRep);
  }
  // A producer retrying a full table meets this at the rate the workers free
  // slots: formatting the batch size and capacity into it allocated on every
  // retry (and, in a busy retry loop, slowed the workers it waits for).
  static Status batch_full_status() {
    static constexpr Status::Rep kRep{
        StatusCode::kQueueFull, false,
        "submit_batch(): the job table has fewer free slots than the batch holds"};
    return Status(kRep);
  }

  // I5: announces the current epoch in `slot` and returns it, re-reading
  // until the announcement and the epoch agree. Store + light fence: ordered
  // before the re-read by the fence pair with stop()'s / begin_cut()'s heavy
  // fence, so a cut that missed the announcement is seen on the re-read.
  // The store is a release, not relaxed: a cut waiting out this slot may read
  // this thread's *next* announcement (an epoch above the cut) instead of the
  // release that cleared the previous one, and since C++20 a later plain
  // store no longer continues that release's sequence; reading a release
  // store still publishes everything this thread did before it, the previous
  // stamps included. Free on x86; an stlr on ARM (whose hardware ordered it
  // anyway: store-release, then same-address stores).
  // The re-read acquires: a worker that stamps epoch C+1 then also sees the
  // horizon begin_cut() raised before bumping the epoch to C+1 (I7). (x86 and
  // ARMv8 order it anyway; the language needs the acquire. Free on x86.)
  [[gnu::always_inline]] std::uint64_t announce(std::atomic<std::uint64_t>& slot) noexcept {
    std::uint64_t e = table_.epoch_relaxed();
    for (;;) {
      slot.store(e, std::memory_order_release);
      asymmetric_fence_light();
      const std::uint64_t again = table_.epoch();
      if (again == e) [[likely]] return e;
      e = again;
    }
  }

  // I2 + I5, submitter side. Returns the announced epoch to stamp slots with,
  // or 0 (having left again) when intake is closed.
  std::uint64_t enter_intake(ProducerState& ps) {
    const std::uint64_t e = announce(ps.active);
    if (state_.load(std::memory_order_relaxed) != EngineState::kRunning) {
      ps.active.store(0, std::memory_order_release);
      return 0;
    }
    return e;
  }
  static void leave_intake(ProducerState& ps) {
    // Release: stop() acquires this, seeing the enqueue and the counters.
    ps.active.store(0, std::memory_order_release);
  }

  // Takes n free slots (all or none) into out, from the thread's cache first.
  [[gnu::always_inline]] bool take_slots(ProducerState& ps, SlotIndex* out, std::size_t n) {
    std::size_t got = 0;
    while (got < n) {
      if (ps.cached == 0) {
        ps.cached = static_cast<std::uint32_t>(table_.take_free(ps.cache));
        if (ps.cached == 0) {
          // Not enough: give back what we took (to the cache first).
          give_back_slots(ps, out, got);
          return false;
        }
      }
      std::size_t take = std::min<std::size_t>(ps.cached, n - got);
      for (std::size_t i = 0; i < take; ++i) out[got + i] = ps.cache[--ps.cached];
      got += take;
    }
    // The slot taken kPrefetchAhead submits from now was last written by a
    // worker (retire): ask for its line now, with write intent, so the fill
    // finds it here instead of stalling on the other core's copy.
    if (ps.cached >= kPrefetchAhead) prefetch_for_fill(ps.cache[ps.cached - kPrefetchAhead]);
    return true;
  }

  // Both lines of a slot about to be filled, asked for exclusive: the header
  // the worker wrote, and the inline payload it read (shared now, so writing
  // it would wait for the worker's copy to go).
  [[gnu::always_inline]] void prefetch_for_fill(SlotIndex idx) noexcept {
    const auto* p = reinterpret_cast<const char*>(&table_.slot(idx));
    prefetch_for_write(p);
    prefetch_for_write(p + kCacheLine);
  }

  // Slots this producer claimed (stamped `epoch`, its announced one) whose
  // jobs no worker will see: the jobs were in no cut (I6), so the slots go
  // back at once, to the producer's cache first.
  void unclaim(ProducerState& ps, const SlotIndex* in, std::size_t n, std::uint64_t epoch) {
    for (std::size_t i = 0; i < n; ++i) {
      JobTable::retire(table_.slot(in[i]), epoch);
      JobTable::reclaim(table_.slot(in[i]));
    }
    give_back_slots(ps, in, n);
  }

  void give_back_slots(ProducerState& ps, const SlotIndex* in, std::size_t n) {
    std::size_t i = 0;
    while (i < n && ps.cached < kSlotCacheSize) ps.cache[ps.cached++] = in[i++];
    put_all_free(in + i, n - i);
  }

  // Returns free slots to the pool in whole magazines. The pool has a
  // descriptor for every magazine the table can fill, so this waits only while
  // other threads hold descriptors in hand.
  void put_all_free(const SlotIndex* in, std::size_t n) {
    for (std::size_t put = 0; put < n;) {
      put += table_.put_free(in + put, n - put);
      if (put < n) std::this_thread::yield();
    }
  }

  // stop(kAbandon): ends jobs that will not run and frees their slots.
  void drop_slots(const SlotIndex* in, std::size_t n) {
    const std::uint64_t e = table_.epoch();
    for (std::size_t i = 0; i < n; ++i) {
      JobTable::retire(table_.slot(in[i]), e);
      JobTable::reclaim(table_.slot(in[i]));
    }
    put_all_free(in, n);
  }

  [[gnu::always_inline]] JobId next_id(ProducerState& ps) {
    if (ps.next_id == ps.id_end) [[unlikely]] {
      ps.next_id = next_id_.fetch_add(kIdBlock, std::memory_order_relaxed);
      ps.id_end = ps.next_id + kIdBlock;
      // Acquire: pairs with extend_lease's release (the record's word was
      // stored before the bound that lets this block through).
      if (ps.id_end > lease_end_.load(std::memory_order_acquire)) [[unlikely]] {
        extend_lease(ps.id_end);
      }
    }
    return ps.next_id++;
  }

  // Writes the live record's lease past `need` before any id below it is
  // handed out: a crash then leaves a lease that covers every id given.
  [[gnu::noinline]] void extend_lease(JobId need) {
    std::lock_guard<std::mutex> lock(lease_mu_);
    if (need <= lease_end_.load(std::memory_order_relaxed)) return;
    const JobId end = need + kLeaseIds;
    live_->extend_lease(end);
    lease_end_.store(end, std::memory_order_release);
  }

  // Everything but the payload's bytes, then the stamp (state `initial`).
  [[gnu::always_inline]] void write_header(SlotIndex idx, JobId id, HandlerId handler,
                                           std::size_t payload_size, std::uint8_t priority,
                                           std::uint64_t t, std::uint64_t run_at,
                                           std::uint64_t epoch, SlotState initial) noexcept {
    Slot& s = table_.slot(idx);
    s.payload_size = static_cast<std::uint32_t>(payload_size);
    s.id_word.store(id, std::memory_order_relaxed);
    s.handler = handler;
    s.priority = priority;
    s.submit_ticks = t;
    s.run_at_ticks.store(run_at, std::memory_order_relaxed);
    s.recoveries = 0;
    JobTable::claim(s, epoch, initial);
    table_.note_id(id, idx);  // for cancel()
  }

  // fill_slot() for a plain job whose payload fits inline, without a call.
  [[gnu::always_inline]] void fill_inline(SlotIndex idx, JobId id, HandlerId handler,
                                          std::string_view payload, std::uint8_t priority,
                                          std::uint64_t now, std::uint64_t epoch) noexcept {
    copy_small(table_.slot(idx).inline_payload, payload.data(), payload.size());
    write_header(idx, id, handler, payload.size(), priority, now, now, epoch, SlotState::kQueued);
  }

  // Writes the job into its slot and stamps it (state `initial`). False only
  // when a heap block cannot be allocated (out of memory). A unique key or an
  // own deadline puts the payload in a heap block with them (job_table.h).
  bool fill_slot(SlotIndex idx, JobId id, HandlerId handler, std::string_view payload,
                 std::uint8_t priority, std::uint64_t t, std::uint64_t run_at,
                 std::uint64_t epoch, SlotState initial = SlotState::kQueued,
                 std::string_view key = {}, std::uint64_t deadline_ns = 0) noexcept {
    Slot& s = table_.slot(idx);
    if (!key.empty() || deadline_ns != 0) [[unlikely]] {
      const std::size_t key_bytes = detail::padded_key_bytes(key.size());
      const std::size_t bytes = key_bytes + sizeof(ExtraHeader) + payload.size();
      unsigned char* block = new (std::nothrow) unsigned char[bytes];
      if (block == nullptr) return false;
      if (!key.empty()) std::memcpy(block, key.data(), key.size());
      ExtraHeader x;
      x.deadline_ns = deadline_ns;
      x.key_len = static_cast<std::uint32_t>(key.size());
      std::memcpy(block + key_bytes, &x, sizeof(x));
      unsigned char* p = block + key_bytes + sizeof(ExtraHeader);
      if (!payload.empty()) std::memcpy(p, payload.data(), payload.size());
      s.heap_payload = p;
      s.flags = kSlotHasExtra;
    } else if (payload.size() > kInlinePayloadBytes) {
      unsigned char* heap = new (std::nothrow) unsigned char[payload.size()];
      if (heap == nullptr) return false;
      std::memcpy(heap, payload.data(), payload.size());
      s.heap_payload = heap;
    } else {
      copy_small(s.inline_payload, payload.data(), payload.size());
    }
    write_header(idx, id, handler, payload.size(), priority, t, run_at, epoch, initial);
    return true;
  }

  static Status out_of_memory_status(std::size_t payload_size) {
    return Status(StatusCode::kInternal, "out of memory copying a payload of " +
                                             std::to_string(payload_size) + " bytes");
  }

  // The calling thread's state, or nullptr before start() (the handler table
  // is fixed only then, and a producer state is sized for it).
  ProducerState* producer_state() {
    if (t_last.uid == uid_) [[likely]] return t_last.state;
    return producer_state_slow();
  }

  ProducerState* producer_state_slow() {
    // Submits from thread_local destructors: see late_producers_key(). Past even
    // those (a destructor that ran after its own), no state can be owned
    // safely: refused as if stopped.
    ThreadProducers* late = nullptr;
    if (t_producers_gone) [[unlikely]] {
      const std::optional<pthread_key_t>& key = late_producers_key();
      if (t_late_producers_gone || !key) return nullptr;
      late = static_cast<ThreadProducers*>(pthread_getspecific(*key));
      if (late == nullptr) {
        // No exception may leave a thread_local destructor (std::terminate).
        late = new (std::nothrow) ThreadProducers;
        if (late == nullptr) {
          t_producer_out_of_memory = true;
          return nullptr;
        }
        if (pthread_setspecific(*key, late) != 0) {
          delete late;
          return nullptr;
        }
      }
    }
    ThreadProducers& mine = late != nullptr ? *late : t_producers;
    for (auto& e : mine.entries) {
      if (e.uid == uid_) {
        t_last = {uid_, e.state};
        return e.state;
      }
    }
    // Not running: refused as stopped, and nothing made for it.
    if (state_.load(std::memory_order_acquire) != EngineState::kRunning) return nullptr;
    // A new entry: those of engines gone since go first, so a thread that
    // submits to one engine after another keeps no record of each for its
    // whole life (only here: a thread alternating between live engines
    // finds its entry above without taking their lifetime locks).
    std::erase_if(mine.entries, [](const ThreadProducers::Entry& e) {
      std::lock_guard<std::mutex> lock(e.life->mu);
      return !e.life->alive;
    });
    // The entry's room first: once a state is adopted or made, nothing may
    // fail (an adopted orphan that is not recorded here would be lost, with
    // the free slots and ids it caches).
    try {
      mine.entries.reserve(mine.entries.size() + 1);
    } catch (const std::bad_alloc&) {
      t_producer_out_of_memory = true;
      return nullptr;
    }
    ProducerState* ps = nullptr;
    {
      std::lock_guard<std::mutex> lock(registry_mu_);
      for (ProducerState* p = producers_.load(std::memory_order_relaxed); p != nullptr; p = p->next) {
        bool expected = true;
        // Acquire: see the exited thread's last writes to the state.
        if (p->orphaned.load(std::memory_order_relaxed) &&
            p->orphaned.compare_exchange_strong(expected, false, std::memory_order_acquire)) {
          ps = p;
          break;
        }
      }
      if (ps == nullptr) {
        try {
          ps = new ProducerState(queues_, handlers_.size());
        } catch (const std::bad_alloc&) {
          ps = nullptr;
        }
        if (ps == nullptr || !all_valid(ps->tokens)) {
          delete ps;
          t_producer_out_of_memory = true;
          return nullptr;
        }
        ps->next = producers_.load(std::memory_order_relaxed);
        // Release: readers walking the list see a fully built state.
        producers_.store(ps, std::memory_order_release);
      }
    }
    mine.entries.push_back({uid_, ps, life_});
    t_last = {uid_, ps};
    return ps;
  }

  // I3, submitter side.
  void wake_after_enqueue(std::size_t jobs) {
    if (options_.idle != IdleStrategy::kSpinThenBlock) return;
    asymmetric_fence_light();
    if (sleepers_.load(std::memory_order_relaxed) > 0) wake_sleepers(jobs);
  }

  void wake_sleepers(std::size_t max) {
    std::size_t woken = 0;
    int s = sleepers_.load(std::memory_order_relaxed);
    while (s > 0 && woken < max) {
      // Decrement first, then release: the permit is the woken worker's.
      if (sleepers_.compare_exchange_weak(s, s - 1, std::memory_order_acq_rel,
                                          std::memory_order_relaxed)) {
        sleep_sem_.release();
        ++woken;
        s = sleepers_.load(std::memory_order_relaxed);
      }
    }
  }

  // ----------------------------------------------------------------- workers

  // Takes a batch from the most urgent non-empty level; every
  // fairness_period-th batch starts the scan at a lower level (rotating), the
  // starvation guard documented in EngineOptions::fairness_period.
  std::size_t take_batch(WorkerState& w, SlotIndex* out) {
    // A countdown rather than a modulo: no division on the poll path.
    unsigned fair = kPriorityLevels;  // none this time
    if (options_.fairness_period != 0 && --w.until_fair_turn == 0) {
      w.until_fair_turn = options_.fairness_period;
      w.rotation = w.rotation % (kPriorityLevels - 1) + 1;  // 1, 2, 1, 2, ...
      fair = w.rotation;
      // The turn's level first; when it is empty the turn falls back to the
      // most urgent level, never to the level below it (a scan wrapping from
      // the turn's level gave an empty normal level's turns to low priority).
      std::size_t n = queues_[fair].try_dequeue_bulk(w.consumer[fair], out, options_.dequeue_batch);
      if (n != 0) return n;
    }
    for (unsigned p = 0; p < kPriorityLevels; ++p) {
      if (p == fair) continue;
      std::size_t n = queues_[p].try_dequeue_bulk(w.consumer[p], out, options_.dequeue_batch);
      if (n != 0) return n;
    }
    return 0;
  }

  void worker_main(WorkerState& w) {
    struct Gone {
      std::atomic<bool>& flag;
      ~Gone() { flag.store(true, std::memory_order_release); }
    } gone{w.gone};
    // Acquire: pairs with start()'s release of go_ (handlers are visible).
    while (!go_.load(std::memory_order_acquire)) std::this_thread::yield();
    // A failed start, or a stop() from another thread before this worker ran.
    if (state_.load(std::memory_order_acquire) == EngineState::kStopped) return;
    t_worker_of = this;
    w.alive.store(true, std::memory_order_release);
    SlotIndex batch[256];
    std::uint32_t idle_polls = 0;
    for (;;) {
      if (exit_now_.load(std::memory_order_relaxed)) [[unlikely]] break;
      std::size_t n = take_batch(w, batch);
      if (n != 0) {
        idle_polls = 0;
        // More may be waiting: let a sleeping colleague help (I3).
        if (n == options_.dequeue_batch && options_.idle == IdleStrategy::kSpinThenBlock &&
            sleepers_.load(std::memory_order_relaxed) > 0) {
          wake_sleepers(1);
        }
        if (auto* hook = detail::g_before_batch.load(std::memory_order_relaxed)) [[unlikely]] {
          hook(table_.slot(batch[0]).id());
        }
        run_batch(w, batch, n);
        // change_count(): the batch's last finish (and whatever an abandon
        // or exit did to the rest of it).
        bump_release(w.changes);
        // Whole magazines only while busy: one pool operation per kSlotCacheSize (64) jobs.
        if (w.retired.size() >= kSlotCacheSize) w.retired.flush(table_);
        continue;
      }
      if (idle_polls == kIdleFlushPolls) w.head_ticks.store(0, std::memory_order_relaxed);
      // Idle for a moment: hand back a partial magazine of finished slots
      // too, but only when submitters may be waiting for them (the pool has
      // no magazine left). Otherwise keep collecting, so that submitters take
      // whole magazines: a worker that gave back each job's slot as soon as it
      // idled made every submit of a lightly loaded engine take a one-slot
      // magazine, a round trip through the pool's lines that the worker had
      // just written (~180 of the ~200 ns a submit took between wake-ups).
      if (idle_polls % kIdleFlushPolls == 0 && idle_polls != 0 && w.retired.size() != 0 &&
          !table_.has_free_magazine()) {
        w.retired.flush(table_);
      }
      // Acquire: pairs with stop()'s release (abandon_, final counters).
      if (intake_closed_.load(std::memory_order_acquire)) {
        if (abandon_.load(std::memory_order_relaxed) || exit_now_.load(std::memory_order_relaxed) ||
            drained()) {
          break;
        }
        std::this_thread::yield();
        continue;
      }
      ++idle_polls;
      switch (options_.idle) {
        case IdleStrategy::kSpin:
          cpu_relax();
          break;
        case IdleStrategy::kSpinThenYield:
          if (idle_polls < options_.spin_iterations) cpu_relax();
          else std::this_thread::yield();
          break;
        case IdleStrategy::kSpinThenBlock:
          if (idle_polls < options_.spin_iterations) {
            cpu_relax();
          } else {
            sleep(w);
            idle_polls = 0;
          }
          break;
      }
    }
    w.retired.flush(table_);
    w.alive.store(false, std::memory_order_relaxed);
  }

  // I3, worker side: announce, heavy fence, look again, then sleep.
  void sleep(WorkerState& w) {
    // Nothing wakes a sleeping worker when a snapshot ends, so it keeps no
    // slot the horizon held: all are parked with the table, which the
    // snapshot's end releases (kept, a submit found no slot and never woke
    // it: kQueueFull for good on an idle engine). A park refused because
    // the snapshot ended meanwhile leaves them free for the second flush.
    w.retired.flush(table_, /*park_from=*/1);
    if (w.retired.size() != 0) w.retired.flush(table_, /*park_from=*/1);
    sleepers_.fetch_add(1, std::memory_order_relaxed);
    asymmetric_fence_heavy();
    bool work = intake_closed_.load(std::memory_order_acquire);
    for (unsigned p = 0; p < kPriorityLevels && !work; ++p) {
      work = queues_[p].size_approx() != 0;
    }
    if (work) {
      // Take the announcement back, unless a submitter already did (then a
      // permit is ours: consume it so the count stays right).
      int s = sleepers_.load(std::memory_order_relaxed);
      while (s > 0) {
        if (sleepers_.compare_exchange_weak(s, s - 1, std::memory_order_acq_rel,
                                            std::memory_order_relaxed)) {
          return;
        }
      }
    }
    sleep_sem_.acquire();
  }

  void run_batch(WorkerState& w, const SlotIndex* batch, std::size_t n) {
    // The slots were last written by their submitters: keep the misses for
    // the next kRunAhead jobs in flight so they overlap instead of stalling one
    // job at a time (all of a batch at once would fill the line-fill buffers
    // and stall on the prefetches themselves). The header line is written
    // here (state, epochs): ask for it exclusive; the payload is only read.
    const auto prefetch_slot = [this](SlotIndex idx) {
      const auto* p = reinterpret_cast<const char*>(&table_.slot(idx));
      prefetch_for_write(p);
      __builtin_prefetch(p + kCacheLine, 0, 3);
    };
    for (std::size_t i = 0; i < n && i < kRunAhead; ++i) prefetch_slot(batch[i]);
    RunClock clock{Clock::ticks(), true};
    for (std::size_t i = 0; i < n; ++i) {
      if (exit_now_.load(std::memory_order_relaxed)) [[unlikely]] {
        // stop(kSnapshotAndExit): the rest of this batch stays queued in the
        // table, where the final snapshot finds it.
        return;
      }
      if (abandon_.load(std::memory_order_relaxed)) [[unlikely]] {
        // Stop(kAbandon): the rest of this batch is dropped, not run; a job
        // cancel() reached counts as cancelled, as cancel() answered.
        take_for_stop(batch + i, n - i);
        for (std::size_t j = i; j < n; ++j) {
          if (cancelled_bit(batch[j])) {
            finish_cancelled(w, batch[j], /*ran=*/false);
          } else {
            retire(w, batch[j]);
            bump(w.dropped);
          }
        }
        return;
      }
      if (i + kRunAhead < n) prefetch_slot(batch[i + kRunAhead]);
      // The oldest job still waiting in this batch: the next one (its line
      // is prefetched, and the store goes to this worker's own line), 0 for
      // the last, so that a long handler's own job never reads as waiting.
      w.head_ticks.store(i + 1 < n ? table_.slot(batch[i + 1]).run_at_ticks.load(std::memory_order_relaxed)
                                   : 0,
                         std::memory_order_relaxed);
      run_one(w, batch[i], clock);
      // A magazine's worth of retired slots goes back as soon as the job that
      // completed it is done: before the next handler runs, however long that
      // one takes, yet not between a job's dequeue and its start (a pool
      // operation there, once in 64 jobs, was in the wake-up latency's p99).
      if (w.retired.size() >= kSlotCacheSize) w.retired.flush(table_);
    }
  }

  // The per-job path, inlined into the batch loop; everything but a plain
  // kDone goes through the out-of-line after_handler().
  [[gnu::always_inline]] void run_one(WorkerState& w, SlotIndex idx, RunClock& clock) {
    Slot& s = table_.slot(idx);
    // The worker is the only writer of state and attempts while it holds the
    // job (I1). The attempt is counted before the state says kRunning, and
    // the state is stored with release: a snapshot that acquires kRunning
    // records the run's attempt, never the one before (which would give the
    // job one run more than max_attempts after a recovery). Saturating: a job
    // restored with 65535 attempts (max_attempts 65535) must not wrap to 0.
    const std::uint16_t before = s.attempts.load(std::memory_order_relaxed);
    const std::uint16_t attempt = before == 0xffff ? before : static_cast<std::uint16_t>(before + 1);
    s.attempts.store(attempt, std::memory_order_relaxed);
    s.state.store(SlotState::kRunning, std::memory_order_release);
    // I8: pairs with cancel()'s heavy fence. Either cancel() sees kRunning
    // or this load sees its bit.
    asymmetric_fence_light();
    const std::uint64_t word = s.id_word.load(std::memory_order_relaxed);
    if ((word & kCancelBit) != 0) [[unlikely]] {
      finish_cancelled(w, idx, /*ran=*/false);
      return;
    }
    const HandlerEntry& h = handlers_[s.handler];
    HandlerStats& hs = w.by_handler[s.handler];
    std::uint64_t deadline = h.deadline_ticks;
    if ((s.flags & kSlotHasExtra) != 0) [[unlikely]] {
      const std::uint64_t own = s.extra()->deadline_ns;
      if (own != 0) deadline = Clock::ticks_in_ns(static_cast<std::int64_t>(own));
    }
    // Timed runs read the clock before (unless the last read is fresh) and
    // after; see EngineOptions::time_every_run for which runs are timed.
#if JOBENGINE_METRICS
    const bool timed = hs.skipped >= hs.skip_period || deadline != 0;
#else
    const bool timed = deadline != 0;
#endif
    std::uint64_t start = clock.now;
    if (timed && !clock.fresh) start = Clock::ticks();
    if (deadline != 0) [[unlikely]] {
      deadline += vnow();
      w.running_id.store(word, std::memory_order_relaxed);
      w.run_deadline.store(deadline, std::memory_order_relaxed);
    }
    JobContext ctx(word, s.handler, h.name,
                   std::string_view(reinterpret_cast<const char*>(s.payload()), s.payload_size),
                   attempt, s.priority, s.submit_ticks, &s.id_word, deadline);
    Outcome outcome;
    bool threw = false;
    // Release: change_count() (a snapshot that counts this step sees the
    // job running). A plain store on x86.
    w.runs.store(w.runs.load(std::memory_order_relaxed) + 1, std::memory_order_release);
    // In the live record before the handler runs: a handler that kills the
    // process leaves its job's id there (a store is never lost with the
    // process: it reaches the shared page).
    w.live->store(word & kIdMask, std::memory_order_relaxed);
    try {
      outcome = h.fn(ctx);
    } catch (...) {
      outcome = handler_threw(w, s, h, ctx);
      threw = true;
    }
    w.live->store(0, std::memory_order_relaxed);
    w.runs.store(w.runs.load(std::memory_order_relaxed) + 1, std::memory_order_relaxed);
    if (timed) {
      // This run's end is the next run's start.
      clock.now = Clock::ticks();
      clock.fresh = true;
#if JOBENGINE_METRICS
      record_run(hs, s, start, clock.now);
#endif
    } else {
      clock.fresh = false;
#if JOBENGINE_METRICS
      ++hs.skipped;
#endif
    }
    if (deadline != 0) [[unlikely]] {
      w.run_deadline.store(0, std::memory_order_relaxed);
      if (vnow() > deadline) {
        bump(w.stuck_total);
        bump(hs.stuck);
        log_job_with(LogLevel::kWarning, s, h, [&] {
          return "ran " + std::to_string(Clock::ns_in_ticks(clock.now - start) / 1000) +
                 " us, past its deadline";
        });
      }
    }
    // A job cancel() reached while it ran counts as cancelled, whatever it
    // returned (JobContext::cancelled()): after_handler() takes it. The id
    // word's line is this worker's since run_one() began.
    if (outcome == Outcome::kDone && (s.flags & kSlotHasExtra) == 0 &&
        (s.id_word.load(std::memory_order_relaxed) & kCancelBit) == 0) [[likely]] {
      retire(w, idx);
      bump(w.done);
      bump(hs.done);
      return;
    }
    after_handler(w, idx, attempt, outcome, ctx, threw);
  }

  // A timed run into the handler's histograms, standing for itself and the
  // runs skipped since the last timed one; picks when the next timed run is.
  [[gnu::noinline]] void record_run(HandlerStats& hs, const Slot& s, std::uint64_t start,
                                    std::uint64_t end) {
    const std::uint64_t weight = std::uint64_t{hs.skipped} + 1;
    const std::uint64_t run_at = s.run_at_ticks.load(std::memory_order_relaxed);
    const std::uint64_t run_ns = Clock::ns_in_ticks(end - start);
    hs.queue_wait.record(start > run_at ? Clock::ns_in_ticks(start - run_at) : 0, weight);
    hs.run_time.record(run_ns, weight);
    hs.skipped = 0;
    hs.skip_period =
        options_.time_every_run || run_ns >= kTimeEveryRunFromNs ? 0 : kTimedRunEvery - 1;
  }

  // Called from a catch block: counts and logs the exception; the attempt
  // then counts as kRetry, with the exception's text as its error.
  [[gnu::noinline]] Outcome handler_threw(WorkerState& w, const Slot& s, const HandlerEntry& h,
                                          JobContext& ctx) {
    bump(w.exceptions);
    try {
      try {
        throw;
      } catch (const std::exception& e) {
        ctx.set_error(std::string("handler threw: ") + e.what());
      } catch (...) {
        ctx.set_error("handler threw a non-std::exception");
      }
    } catch (const std::bad_alloc&) {
      // No memory for the text (the exception itself may be a bad_alloc):
      // the attempt still counts; retry_or_fail() says the handler threw.
    }
    log_job(LogLevel::kWarning, s, h, ctx.error());
    return Outcome::kRetry;
  }

  // The wait before attempt `attempt` + 1 under `p`, in ns (jittered).
  static std::uint64_t backoff_ns(const RetryPolicy& p, std::uint32_t attempt, std::uint64_t& rng) {
    double base = static_cast<double>(p.initial_backoff.count());
    if (base <= 0) return 0;
    const double cap = static_cast<double>(p.max_backoff.count());
    // A multiplier of 1 leaves the base as it is: no loop of up to 65534 steps.
    for (std::uint32_t i = 1; i < attempt && base < cap && p.multiplier > 1.0; ++i) base *= p.multiplier;
    base = std::min(base, cap);
    if (p.jitter > 0) {
      rng ^= rng << 13;
      rng ^= rng >> 7;
      rng ^= rng << 17;
      const double u = static_cast<double>(rng >> 11) * 0x1.0p-53;  // [0, 1)
      base *= 1.0 + p.jitter * (2 * u - 1);
    }
    // Capped before the conversion: a double at or past 2^63 (nanoseconds::
    // max() as max_backoff, "uncapped") would not fit the int64 it becomes.
    base = std::min(base, static_cast<double>(detail::kMaxSpanNs));
    return base <= 0 ? 0 : static_cast<std::uint64_t>(base);
  }

  // The longest pause between a worker's tries to record a job's end when
  // memory ran out (after_handler()); the first is 1 ms, doubling.
  static constexpr unsigned kMemoryWaitMaxMs = 100;

  // Everything but a plain kDone: retries, failures, cancellation, keys.
  // `threw`: the handler threw (handler_threw() made the outcome).
  [[gnu::noinline]] void after_handler(WorkerState& w, SlotIndex idx, std::uint16_t attempt,
                                       Outcome outcome, const JobContext& ctx, bool threw) {
    Slot& s = table_.slot(idx);
    const HandlerEntry& h = handlers_[s.handler];
    HandlerStats& hs = w.by_handler[s.handler];
    if ((s.id_word.load(std::memory_order_relaxed) & kCancelBit) != 0) {
      // Cancelled while it ran: never retried, and counted as cancelled
      // whatever it returned (JobContext::cancelled()).
      log_job(LogLevel::kInfo, s, h,
              outcome == Outcome::kDone ? "cancelled while running; it returned done"
                                        : "cancelled while running; not retried");
      bump(hs.ran_other);
      finish_cancelled(w, idx, /*ran=*/true);
      return;
    }
    if (auto* hook = detail::g_after_cancel_check.load(std::memory_order_relaxed)) [[unlikely]] {
      hook(s.id());
    }
    // A cancel() from here on finds the job kRunning (kCancelRequested) or
    // already waiting for its retry; either way the scheduler, which takes
    // every retry in, drops it as cancelled (scheduler_main). A retry that
    // goes straight back to a queue is dropped by the worker that dequeues it.
    if (outcome == Outcome::kDone) {
      // The key is released only after the retire: a submit that takes it
      // comes after the retire, so a cut that holds that new job finds this
      // one finished, never both live with one key (a crash then restored
      // two pending jobs with the key). The retired slot stays this worker's
      // until its next flush, so its key bytes are still there.
      retire(w, idx);
      release_key(s);
      bump(w.done);
      bump(hs.done);
      return;
    }
    // Memory can run out recording the attempt: the dead letter's copies
    // (payload, handler name, error text), the letters' deque. The exception
    // would leave the worker thread and end the process (std::terminate), so
    // the worker waits for memory and tries again. retry_or_fail() changes
    // nothing a second call would count or do twice before its last
    // allocation (it may log its failure line again), and until it succeeds
    // the job is pending in the table, where every snapshot holds it: running,
    // or queued or waiting to retry when a retry could not be handed on.
    // What ends the wait without memory, allocating nothing: a cancel() (the
    // job ends cancelled, as one cancelled while it ran does), stop(kAbandon)
    // (it drops what has not run; the job ran, but its end is dropped too,
    // counted), and stop(kSnapshotAndExit) (the job stays in the table, so in
    // the final snapshot, and runs again after the restart).
    // Checked before every try but the first: true when the job ended
    // (or, exiting, was left in the table) without the memory it waits for.
    const auto ended_without_memory = [&] {
      if (exit_now_.load(std::memory_order_relaxed)) return true;
      if ((s.id_word.load(std::memory_order_relaxed) & kCancelBit) != 0) {
        // It ran (this attempt) either way; by_cancel when what cancel() saw
        // was a retry it could not hand on (queued or waiting): cancel()
        // answered kCancelled for it.
        bump(hs.ran_other);
        finish_cancelled(w, idx,
                         s.state.load(std::memory_order_relaxed) == SlotState::kRunning);
        return true;
      }
      if (abandon_.load(std::memory_order_relaxed)) {
        log_job(LogLevel::kError, s, h, "out of memory recording its end; dropped by stop(kAbandon)");
        retire(w, idx);
        release_key(s);  // after the retire, as for kDone
        bump(w.dropped);
        bump(hs.ran_other);
        return true;
      }
      return false;
    };
    for (unsigned pause_ms = 1;; pause_ms = std::min(2 * pause_ms, kMemoryWaitMaxMs)) {
      try {
        retry_or_fail(w, idx, attempt, outcome, ctx, threw);
        break;
      } catch (const std::bad_alloc&) {
      }
      bump(w.memory_waits);
      if (ended_without_memory()) break;
      w.memory_wait_job.store(s.id(), std::memory_order_relaxed);
      std::this_thread::sleep_for(std::chrono::milliseconds(pause_ms));
      if (ended_without_memory()) break;
    }
    w.memory_wait_job.store(0, std::memory_order_relaxed);
  }

  // after_handler() for kRetry and kFail: re-queues or schedules the retry,
  // or makes the job a dead letter. May throw std::bad_alloc, only from die()
  // (the letter), and then has counted nothing, kept the job's unique key
  // and left the job pending (see after_handler()).
  void retry_or_fail(WorkerState& w, SlotIndex idx, std::uint16_t attempt, Outcome outcome,
                     const JobContext& ctx, bool threw) {
    Slot& s = table_.slot(idx);
    const HandlerEntry& h = handlers_[s.handler];
    HandlerStats& hs = w.by_handler[s.handler];
    // A view: copied only into the letter (die()), so that the paths that
    // keep no letter need no memory.
    std::string_view error = ctx.error();
    if (outcome == Outcome::kRetry) {
      const bool abandoning = abandon_.load(std::memory_order_relaxed);
      if (attempt < h.max_attempts && !abandoning) {
        const std::uint64_t wait_ns =
            ctx.has_retry_after()
                ? static_cast<std::uint64_t>(std::max<std::int64_t>(0, ctx.retry_after_delay().count()))
                : backoff_ns(h.retry, attempt, w.rng);
        if (wait_ns == 0) {
          s.run_at_ticks.store(Clock::ticks(), std::memory_order_relaxed);
          // Release: a snapshot that acquires the new state reads this
          // run_at, not the last one (for_each_cut_job).
          s.state.store(SlotState::kQueued, std::memory_order_release);
          retry_marked_hook(s);
          if (queues_[s.priority].enqueue(w.requeue[s.priority], idx)) {
            bump(w.retried);
            bump(hs.retried);
            wake_after_enqueue(1);
            return;
          }
        } else {
          const std::uint64_t at = vnow() + Clock::ticks_in_ns(static_cast<std::int64_t>(wait_ns));
          s.run_at_ticks.store(at, std::memory_order_relaxed);
          s.state.store(SlotState::kWaitingRetry, std::memory_order_release);  // as above
          retry_marked_hook(s);
          if (schedule(idx, at)) {
            bump(w.retried);
            bump(hs.retried);
            return;
          }
        }
        // No memory to hand the retry on: the job is this worker's again.
        // A cancel() since the state store above may have read kQueued or
        // kWaitingRetry and answered kCancelled (releasing the key), so the
        // job must not end as a failure (a dead letter requeue_dead() could
        // run). Back to kRunning, then the light fence and the bit, as a
        // worker takes a job (I8): a cancel() either set its bit before (the
        // job ends cancelled, as it answered, whatever state it read) or
        // reads kRunning from now on (kCancelRequested, true of a failure).
        s.state.store(SlotState::kRunning, std::memory_order_relaxed);
        asymmetric_fence_light();
        if ((s.id_word.load(std::memory_order_relaxed) & kCancelBit) != 0) {
          log_job(LogLevel::kInfo, s, h, "cancelled while its retry was handed on; not retried");
          bump(hs.ran_other);
          finish_cancelled(w, idx, /*ran=*/false);
          return;
        }
        log_job(LogLevel::kError, s, h, "out of memory re-queueing a retry; job fails");
        error = "out of memory re-queueing a retry";
      } else if (abandoning && attempt < h.max_attempts) {
        // stop(kAbandon): a retry is a queued job, and queued jobs are dropped.
        retire(w, idx);
        release_key(s);  // after the retire, as for kDone
        bump(w.dropped);
        bump(hs.ran_other);
        return;
      }
      // Empty after an exception only when there was no memory for its text.
      if (error.empty()) {
        error = threw ? "handler threw (out of memory recording its message)"
                      : "handler returned kRetry";
      }
      log_job_with(LogLevel::kWarning, s, h, [&] {
        return "failed after " + std::to_string(attempt) + " attempt(s): " + std::string(error);
      });
    } else {
      if (error.empty()) error = "handler returned kFail";
      log_job_with(LogLevel::kWarning, s, h, [&] { return "failed: " + std::string(error); });
    }
    die(w, idx, snapshot::DeadReason::kFailed, error);  // releases the key too
    bump(w.failed);
    bump(hs.failed);
  }

  void retry_marked_hook(const Slot& s) {
    if (auto* hook = detail::g_retry_marked.load(std::memory_order_relaxed)) [[unlikely]] {
      hook(s.id());
    }
  }

  // A job cancel() reached: retired without running (again).
  // `ran`: whether the job ran this time (cancelled while running) or never
  // started (the worker saw the bit first).
  [[gnu::noinline]] void finish_cancelled(WorkerState& w, SlotIndex idx, bool ran) {
    Slot& s = table_.slot(idx);
    retire(w, idx, /*by_cancel=*/!ran);
    release_key(s);  // after the retire, as for kDone
    bump(w.cancelled);
    bump(w.by_handler[s.handler].cancelled);
  }

  // cancel() said kCancelled: the job will never run, so its unique key is
  // free now (SubmitOptions::unique_key), not only once a worker or the
  // scheduler reaches the cancelled job. By id: the slot's key bytes may be
  // freed under us. A scan of the keys, like cancel()'s of the table; the
  // later release_key() of the same job finds another id (or nothing) there.
  // O(1) through key_by_id_ (a scan of every key, under keys_mu_, before).
  void release_key_of(JobId id) {
    std::lock_guard<std::mutex> lock(keys_mu_);
    const auto by_id = key_by_id_.find(id);
    if (by_id == key_by_id_.end()) return;  // the job has no key (or gave it up)
    const auto it = keys_.find(by_id->second);
    key_by_id_.erase(by_id);
    if (it != keys_.end() && it->second == id) keys_.erase(it);
  }

  // Frees the job's unique key, if it has one and still owns it.
  void release_key(const Slot& s) {
    const std::string_view key = s.key();
    if (key.empty()) return;
    std::lock_guard<std::mutex> lock(keys_mu_);
    auto it = keys_.find(key);
    if (it != keys_.end() && it->second == s.id()) {
      key_by_id_.erase(it->second);
      keys_.erase(it);
    }
  }

  // "Now" for scheduling decisions: real ticks plus the test clock's offset.
  std::uint64_t vnow() const noexcept {
    const std::uint64_t t = Clock::ticks();
    if (!options_.test_clock) [[likely]] return t;
    const std::int64_t off = options_.test_clock->offset().count();
    return off > 0 ? t + Clock::ticks_in_ns(off) : t;
  }

  static std::int64_t wall_now_ns() {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(
               std::chrono::system_clock::now().time_since_epoch())
        .count();
  }
  // A tick timestamp as Unix-epoch ns.
  static std::int64_t ticks_to_wall_ns(std::uint64_t t) {
    return wall_now_ns() - (Clock::steady_ns() - Clock::to_steady_ns(t));
  }

  // Copies a job that died into the dead letters (bounded by max_dead).
  // A worker's job becomes a dead letter: the letter goes in and the slot is
  // retired under one hold of dead_mu_, the lock begin_cut() copies the
  // letters and bumps the epoch under. So a cut sees the job as a letter
  // (retired in an epoch <= its own: not live in it) or as live (finish
  // stamp after its bump: no letter in its copy), never both: a crash then
  // restored it twice, dead and pending. begin_cut() waits for workers'
  // announcements only after it lets go of dead_mu_, so this cannot deadlock.
  // May throw std::bad_alloc before the letter is in (then nothing is counted
  // and the slot is not retired: after_handler() tries again). With max_dead
  // 0 no letter is kept, and none is made: nothing to allocate.
  void die(WorkerState& w, SlotIndex idx, snapshot::DeadReason reason, std::string_view error) {
    const Slot& s = table_.slot(idx);
    const JobId id = s.id();
    detail::DeadJob d;
    if (options_.max_dead != 0) d = dead_job(s, reason, error);
    std::lock_guard<std::mutex> lock(dead_mu_);
    push_dead_locked(std::move(d));
    note_dead();
    if (auto* hook = detail::g_dead_letter_in.load(std::memory_order_relaxed)) [[unlikely]] {
      hook(id);
    }
    retire(w, idx);
    // The key last (after the letter is in, it stays the pending job's; the
    // retired slot is this worker's until its next flush, so its key bytes
    // are still there), and under dead_mu_: requeue_dead(), which finds the
    // letter under it, then takes the key again under keys_mu_ (dead_mu_
    // before keys_mu_, there as here), and must not find this job's own
    // stale entry (it read as another pending job with the key, the letter
    // was erased, and the job was lost) nor have it released after.
    release_key(s);
  }

  detail::DeadJob dead_job(const Slot& s, snapshot::DeadReason reason, std::string_view error) {
    detail::DeadJob d;
    d.id = s.id();
    d.handler = handlers_[s.handler].name;
    d.priority = s.priority;
    d.attempts = s.attempts.load(std::memory_order_relaxed);
    d.recoveries = s.recoveries;
    d.submit_ns = ticks_to_wall_ns(s.submit_ticks);
    d.run_at_ns = ticks_to_wall_ns(s.run_at_ticks.load(std::memory_order_relaxed));
    d.dead_at_ns = wall_now_ns();
    d.reason = reason;
    d.payload.assign(reinterpret_cast<const char*>(s.payload()), s.payload_size);
    d.error.assign(error);
    d.key.assign(s.key());
    if (const detail::ExtraHeader* x = s.extra()) d.deadline_ns = x->deadline_ns;
    return d;
  }

  // A job died now. Timed on the steady clock: health()'s "growing" window
  // must not stretch or shrink when the wall clock is stepped.
  void note_dead() {
    dead_total_.fetch_add(1, std::memory_order_relaxed);
    last_dead_steady_ns_.store(Clock::steady_ns(), std::memory_order_relaxed);
  }

  // Under dead_mu_: removes one letter (requeue_dead, drop_dead).
  void erase_dead(std::deque<detail::DeadJob>::iterator it) {
    if (static_cast<std::size_t>(it - dead_.begin()) < dead_kept_prefix_) --dead_kept_prefix_;
    dead_.erase(it);
    dead_count_.store(dead_.size(), std::memory_order_relaxed);
    dead_changes_.fetch_add(1, std::memory_order_release);  // change_count()
  }

  // Under dead_mu_. Strong guarantee: if it throws (std::bad_alloc growing
  // the deque), the letters are as they were.
  void push_dead_locked(detail::DeadJob d) {
    if (options_.max_dead == 0) {
      dead_discarded_.fetch_add(1, std::memory_order_relaxed);
      return;
    }
    dead_.push_back(std::move(d));
    // max_dead bounds the letters of jobs that failed. The ones start() kept
    // for jobs that never failed (their handler is gone, or they were poison)
    // are never discarded for room: they hold work that fixing the handler
    // and requeue_dead() bring back (only drop_dead() removes them).
    // The letters before dead_kept_prefix_ are all kept ones: the search for
    // the oldest failed letter starts there, so a failure costs O(1)
    // amortized however many letters are kept. die() is the only caller, with
    // a failed letter, so the search ends at the newest one at the latest:
    // with no older failed letter left, it is the one discarded.
    while (dead_.size() > options_.max_dead) {
      auto victim = std::find_if(dead_.begin() + static_cast<std::ptrdiff_t>(dead_kept_prefix_),
                                 dead_.end(), [](const detail::DeadJob& x) {
                                   return x.reason == snapshot::DeadReason::kFailed;
                                 });
      if (victim == dead_.end()) break;  // not from die(): nothing to discard
      dead_kept_prefix_ = static_cast<std::size_t>(victim - dead_.begin());
      // The newest letter discarded: only kept letters are over max_dead.
      const bool newest = victim == std::prev(dead_.end());
      try {
        log(LogLevel::kWarning, "dead letters full (max_dead " + std::to_string(options_.max_dead) +
                                    "): discarding failed job " + std::to_string(victim->id) +
                                    " (" + victim->handler + ")");
      } catch (const std::bad_alloc&) {
      }
      dead_discarded_.fetch_add(1, std::memory_order_relaxed);
      dead_.erase(victim);  // moves letters, never allocates
      if (newest) break;
    }
    dead_count_.store(dead_.size(), std::memory_order_relaxed);
    dead_changes_.fetch_add(1, std::memory_order_release);  // change_count()
  }

  // stop(), before the final snapshot's cut: from here on a cancel() of a
  // pending job may land after the cut, which would keep the job (it would
  // run after a restart). I8's pairing again: the flag, the heavy fence, then
  // the cut reads the cancel bits; cancel() sets its bit, its heavy fence,
  // then reads the flag (and answers kCancelRequested when set).
  void begin_final_cut() {
    final_cut_.store(true, std::memory_order_relaxed);
    asymmetric_fence_heavy();
  }

  // ------------------------------------------------------------- scheduler
  //
  // One thread, off the worker cores, owns a binary min-heap of (run_at,
  // slot) for delayed jobs and retries in backoff. Why a heap and not a timer
  // wheel: it needs no tick granularity or horizon, costs O(log n) per job
  // (20 levels at 1M jobs, ~1 us), and 16 bytes per job; a hierarchical wheel
  // would save the log factor but costs a sweep per tick even when idle.
  // Submitters and workers hand jobs over through sched_inbox_ under
  // sched_mu_ (the slow path of a delayed submit, not the hot path); the
  // scheduler moves due jobs to their priority queue. It sleeps on
  // sched_sem_ until the earliest run_at (sched_next_), and a hand-over of an
  // earlier job releases the semaphore (under sched_mu_, so no wake-up is lost).

  // Hands a job (state kDelayed or kWaitingRetry, run_at set) to the scheduler.
  bool schedule(SlotIndex idx, std::uint64_t at) {
    std::lock_guard<std::mutex> lock(sched_mu_);
    try {
      sched_inbox_.push_back({at, idx});
    } catch (const std::bad_alloc&) {
      return false;
    }
    scheduled_in_.fetch_add(1, std::memory_order_relaxed);
    // While a drain waits for it to count what it holds, look at once.
    if (at < sched_next_.load(std::memory_order_relaxed) ||
        intake_closed_.load(std::memory_order_relaxed)) {
      sched_next_.store(at, std::memory_order_relaxed);
      sched_sem_.release();
    }
    return true;
  }

  void poke_scheduler() { sched_sem_.release(); }

  void stop_scheduler() {
    sched_stop_.store(true, std::memory_order_release);
    sched_sem_.release();
    if (scheduler_thread_.joinable()) scheduler_thread_.join();
  }

  // `tokens` and `retired`: made by start() (all_valid() says why; the
  // buffer, so that no allocation the thread cannot do without is left to
  // it). Memory that runs out later delays a hand-over, a purge or a due
  // job's enqueue, each retried; it never ends the thread (std::terminate).
  void scheduler_main(SchedulerTokens& tokens, detail::RetireBuffer& retired) {
    while (!go_.load(std::memory_order_acquire)) std::this_thread::yield();
    std::vector<Timer> heap;
    std::vector<Timer> inbox;
    const std::greater<Timer> later;
    for (;;) {
      const bool stopping = sched_stop_.load(std::memory_order_acquire);
      // The purge request before the hand-overs: cancel() sets it after it
      // read a delayed job's state, and that job was handed over before
      // (its submit returned first), so the swap below sees it.
      bool purge = sched_purge_.exchange(false, std::memory_order_acq_rel);
      bool handed = true;
      {
        std::lock_guard<std::mutex> lock(sched_mu_);
        // The heap's room first, so that moving the hand-overs in below
        // cannot fail half-way.
        try {
          heap.reserve(heap.size() + sched_inbox_.size());
          inbox.swap(sched_inbox_);
        } catch (const std::bad_alloc&) {
          handed = false;
        }
      }
      if (!handed && !stopping) {
        if (purge) sched_purge_.store(true, std::memory_order_relaxed);
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
        continue;
      }
      // stop(kDrain): firing, purging and what is held back are published
      // under drain_mu_, where the workers decide that the drain is over
      // (drained(): pending == held back, the first of it not due), so that
      // no job fires after that decision and none that is due is counted as
      // held back. The purge too: it lowers pending() at once, and a worker
      // that compared it with the held count published before the purge took
      // the drain as over while a job was about to fall due.
      const bool draining =
          intake_closed_.load(std::memory_order_acquire) &&
          stop_mode_.load(std::memory_order_relaxed) == static_cast<std::uint8_t>(StopMode::kDrain);
      std::unique_lock<std::mutex> drain_lock;
      if (draining) drain_lock = std::unique_lock<std::mutex>(drain_mu_);
      for (const Timer& t : inbox) {
        // A retry cancelled before it got here: its handler was returning
        // when cancel() reached it (after_handler), or cancel() found it
        // waiting and its purge ran before this hand-over. The bit is seen:
        // cancel() set it before sched_purge_, or before its heavy fence,
        // which orders it before the worker's hand-over (I8), whose mutex
        // orders it before this load. Retries only: a delayed job's cancel()
        // may still be about to read its state, and would then say
        // kCancelRequested for a job that never ran; it sets sched_purge_
        // once it has read it.
        const Slot& s = table_.slot(t.idx);
        if (s.state.load(std::memory_order_relaxed) == SlotState::kWaitingRetry &&
            (s.id_word.load(std::memory_order_relaxed) & kCancelBit) != 0) {
          retire_cancelled(t.idx, retired);
          continue;
        }
        heap.push_back(t);
        std::push_heap(heap.begin(), heap.end(), later);
      }
      inbox.clear();
      // Before a stop too: cancel() answered kCancelled for these.
      if (purge && !purge_cancelled(heap, retired) && !stopping) {
        sched_purge_.store(true, std::memory_order_relaxed);  // out of memory: next round
      }
      if (stopping) break;
      const bool drain_over = draining && drain_done_.load(std::memory_order_relaxed);
      // Fire what is due.
      const std::uint64_t now = vnow();
      std::size_t fired = 0;
      while (!drain_over && !heap.empty() && heap.front().at <= now) {
        std::pop_heap(heap.begin(), heap.end(), later);
        const Timer t = heap.back();
        heap.pop_back();
        Slot& s = table_.slot(t.idx);
        const SlotState was = s.state.load(std::memory_order_relaxed);
        s.state.store(SlotState::kQueued, std::memory_order_relaxed);
        if (!queues_[s.priority].enqueue(tokens[s.priority], t.idx)) [[unlikely]] {
          // Out of memory growing the queue: the job stays scheduled (the
          // heap has the room it just gave up) and is tried again in a
          // millisecond; a stop leaves it with the others.
          s.state.store(was, std::memory_order_relaxed);
          heap.push_back(t);
          std::push_heap(heap.begin(), heap.end(), later);
          try {
            log(LogLevel::kError, "scheduler: out of memory queueing a due job; retrying");
          } catch (const std::bad_alloc&) {
          }
          std::this_thread::sleep_for(std::chrono::milliseconds(1));
          break;
        }
        lateness_.record(Clock::ns_in_ticks(now - t.at));
        // Release: change_count() (the job is queued now, not delayed).
        scheduled_out_.fetch_add(1, std::memory_order_release);
        ++fired;
      }
      if (fired != 0) wake_after_enqueue(fired);
      // stop(kDrain): what is still scheduled is not due yet (retries in
      // backoff included), and when the first of it is; the workers finish
      // once nothing else is pending and that time has not come (drained()).
      if (draining) {
        held_.store(heap.size(), std::memory_order_relaxed);
        held_next_.store(heap.empty() ? ~std::uint64_t{0} : heap.front().at,
                         std::memory_order_relaxed);
        held_final_.store(true, std::memory_order_relaxed);
        drain_lock.unlock();
      }
      if (retired.size() != 0 && table_.reclaim_horizon() == detail::kNoHorizon) retired.flush(table_);
      // Sleep until the earliest run_at, a hand-over of an earlier job, a
      // cancel or stop. Capped at 100 ms so a retired-slot flush and clock
      // re-anchoring are never far off.
      // Once the drain is over nothing fires: sleep until stop() wakes it
      // (a due job at the heap's front would make every wait 0, a busy loop).
      std::uint64_t next = heap.empty() || drain_over ? ~std::uint64_t{0} : heap.front().at;
      {
        std::lock_guard<std::mutex> lock(sched_mu_);
        if (!sched_inbox_.empty()) continue;
        sched_next_.store(next, std::memory_order_relaxed);
      }
      const std::uint64_t now2 = vnow();
      // A test clock can jump: then look again every millisecond.
      const std::int64_t cap = options_.test_clock ? 1'000'000 : 100'000'000;
      std::int64_t wait_ns = cap;
      if (next != ~std::uint64_t{0}) {
        wait_ns = next > now2 ? static_cast<std::int64_t>(Clock::ns_in_ticks(next - now2)) : 0;
        wait_ns = std::min<std::int64_t>(wait_ns, cap);
      }
      if (wait_ns > 0) (void)sched_sem_.try_acquire_for(std::chrono::nanoseconds(wait_ns));
    }
    // Stopped: what is left stays in the table (a final snapshot records it)
    // unless stop() drops it.
    sched_left_ = std::move(heap);
    retired.flush(table_);
    sched_retired_ = std::move(retired);
  }

  // Takes cancelled jobs out of the heap and retires them. False, changing
  // nothing, when there is no memory for the new heap.
  bool purge_cancelled(std::vector<Timer>& heap, detail::RetireBuffer& retired) {
    std::vector<Timer> keep;
    try {
      keep.reserve(heap.size());
    } catch (const std::bad_alloc&) {
      return false;
    }
    for (const Timer& t : heap) {
      Slot& s = table_.slot(t.idx);
      if ((s.id_word.load(std::memory_order_relaxed) & kCancelBit) == 0) {
        keep.push_back(t);
        continue;
      }
      retire_cancelled(t.idx, retired);
    }
    heap.swap(keep);
    std::make_heap(heap.begin(), heap.end(), std::greater<Timer>());
    return true;
  }

  // Ends a cancelled job the scheduler holds (or was handed): never runs.
  void retire_cancelled(SlotIndex idx, detail::RetireBuffer& retired) {
    Slot& s = table_.slot(idx);
    release_key(s);
    const std::uint64_t e = announce(sched_announce_);
    JobTable::retire(s, e, /*by_cancel=*/true);
    sched_announce_.store(0, std::memory_order_release);
    retired.add(idx, e);
    count_sched_cancelled(s);
  }

  // Counts a job out of the scheduler as cancelled. By the scheduler, or by
  // stop() once it has stopped (the per-handler counter has one writer at a
  // time).
  void count_sched_cancelled(const Slot& s) {
    // Release: change_count() (the job is retired).
    scheduled_out_.fetch_add(1, std::memory_order_release);
    count_cancelled_off_worker(s);
  }
  // A cancelled job that no worker retires: by the scheduler, or by stop()
  // (a queued job left behind, cancelled before it).
  void count_cancelled_off_worker(const Slot& s) {
    sched_cancelled_.fetch_add(1, std::memory_order_release);
    bump(sched_cancelled_by_handler_[s.handler]);
  }
  bool cancelled_bit(SlotIndex idx) const {
    return (table_.slot(idx).id_word.load(std::memory_order_acquire) & kCancelBit) != 0;
  }
  // stop(): a queued job that cancel() reached counts as cancelled (as it
  // answered), off any worker. Whether it was.
  bool count_if_cancelled(SlotIndex idx) {
    if (!cancelled_bit(idx)) return false;
    count_cancelled_off_worker(table_.slot(idx));
    return true;
  }
  // stop(kAbandon) takes queued jobs that will not run as a worker takes a
  // job (I8): state kRunning, the light fence, then their cancel bits. So a
  // cancel() either set its bit before (the job counts as cancelled, as it
  // answered) or reads kRunning (it answers kCancelRequested, true too: the
  // job does not run).
  void take_for_stop(const SlotIndex* in, std::size_t n) {
    for (std::size_t i = 0; i < n; ++i) {
      table_.slot(in[i]).state.store(SlotState::kRunning, std::memory_order_relaxed);
    }
    asymmetric_fence_light();
  }

  // ---------------------------------------------------------------- cancel
 public:
  //
  // I8. cancel() sets kCancelBit in the job's id word with a CAS that expects
  // the exact id (ids are never reused, so a slot reused meanwhile fails it),
  // issues the heavy fence, then reads the state. A worker stores kRunning,
  // issues the light fence, then reads the id word. So either cancel() reads
  // kRunning (the job runs or is about to: kCancelRequested) or the worker
  // sees the bit and does not run it (kCancelled). Jobs in the scheduler are
  // purged by it; queued ones are dropped by the worker that dequeues them.
  Result<CancelResult> cancel(JobId id) {
    const EngineState st = state_.load(std::memory_order_acquire);
    if (st != EngineState::kRunning && st != EngineState::kStopping) {
      return Status(StatusCode::kFailedPrecondition,
                    "cancel(): engine is " + std::string(engine_state_name(st)));
    }
    if (id == 0 || id > kIdMask) return Status(StatusCode::kNotFound, "cancel(): no job 0");
    // The slot of the id's latest stamp, if its hint says (job_table.h):
    // then that slot is the only place the job can be. Else the whole table;
    // at most one slot holds the id live, so the first answer is the answer.
    if (const std::optional<SlotIndex> hinted = table_.hinted_slot(id)) {
      if (auto r = cancel_in(table_.slot(*hinted), id)) return *r;
      return cancel_not_found(id);
    }
    // No software prefetch: the hardware prefetcher streams this one line per slot
    // (README, "Tried and not taken"). Only the slots that may hold a job
    // (JobTable::for_each_scan_range()): the job's slot was taken from the
    // pool before the submit that returned its id, which happened before this
    // call, and stays out of it while the job lives.
    std::optional<CancelResult> found;
    table_.for_each_scan_range([&](std::size_t begin, std::size_t end) {
      for (std::size_t i = begin; i < end && !found; ++i) {
        found = cancel_in(table_.slot(static_cast<SlotIndex>(i)), id);
      }
    });
    if (found) return *found;
    return cancel_not_found(id);
  }

 private:
  static Status cancel_not_found(JobId id) {
    return Status(StatusCode::kNotFound, "cancel(): no pending job " + std::to_string(id) +
                                             " (finished, dead, or never submitted)");
  }

  // cancel() on one slot. nullopt when the slot does not hold the job live:
  // another job's, free, or an old slot of a job that requeue_dead() put
  // back under its own id in another slot (the caller looks on).
  std::optional<CancelResult> cancel_in(Slot& s, JobId id) {
    std::uint64_t word = s.id_word.load(std::memory_order_relaxed);
    if ((word & kIdMask) != id) return std::nullopt;
    const SlotState before = s.state.load(std::memory_order_acquire);
    if (before == SlotState::kFree || before == SlotState::kRetired) return std::nullopt;
    // Another cancel() may set the bit first: then the job is cancelled all
    // the same. A failed CAS that shows another id: the slot was reused, the
    // job finished (or lives on in another slot).
    while ((word & kCancelBit) == 0 &&
           !s.id_word.compare_exchange_weak(word, word | kCancelBit, std::memory_order_acq_rel)) {
      if ((word & kIdMask) != id) break;
    }
    if ((word & kIdMask) != id) return std::nullopt;
    // change_count(): the bit is set (by this call or an earlier one).
    cancel_changes_.fetch_add(1, std::memory_order_release);
    asymmetric_fence_heavy();
    if (auto* hook = detail::g_cancel_after_cas.load(std::memory_order_relaxed)) [[unlikely]] {
      hook(id);
    }
    // From here on the bit is ours: the job either never runs or was already
    // starting, never "not found".
    const SlotState now = s.state.load(std::memory_order_acquire);
    if ((s.id_word.load(std::memory_order_relaxed) & kIdMask) != id) {
      // Retired and reused since our CAS (the acquire above saw the new
      // occupant's state, claim() stores it with release after its id).
      return CancelResult::kCancelRequested;
    }
    if ((now == SlotState::kDelayed || now == SlotState::kWaitingRetry ||
         now == SlotState::kQueued) &&
        final_cut_.load(std::memory_order_relaxed)) {
      // stop()'s final snapshot may have cut before our bit: the job may be
      // in it and run after a restart. Not "cancelled", then; the bit still
      // keeps it from running in this process.
      return CancelResult::kCancelRequested;
    }
    switch (now) {
      case SlotState::kDelayed:
      case SlotState::kWaitingRetry:
        release_key_of(id);
        sched_purge_.store(true, std::memory_order_release);
        poke_scheduler();
        return CancelResult::kCancelled;
      case SlotState::kQueued:
        release_key_of(id);
        return CancelResult::kCancelled;
      case SlotState::kRunning:
        return CancelResult::kCancelRequested;
      default: {
        // Retired (perhaps reclaimed too) after our CAS. If by a
        // cancellation that kept it from running (a worker that saw the bit,
        // or the scheduler's purge, which an earlier cancel() may have set
        // off): kCancelled. retire() marks the slot (ended_by_cancel) before
        // its release store of finish_epoch, whose acquire here makes the
        // mark visible; the id read after them shows whether the slot was
        // reused meanwhile (the mark may then be another job's). Otherwise,
        // or when that cannot be told (the epoch not visible yet), the answer
        // true either way: kCancelRequested (I8).
        const bool retired = s.finish_epoch.load(std::memory_order_acquire) != 0;
        // Acquire: pairs with retire()'s release of the mark, so that if the
        // mark is a later occupant's, the id read below is that occupant's
        // (or later), never ours (ARM would let two relaxed loads pass).
        const bool by_cancel = s.ended_by_cancel.load(std::memory_order_acquire) != 0;
        if (retired && by_cancel && (s.id_word.load(std::memory_order_relaxed) & kIdMask) == id) {
          return CancelResult::kCancelled;
        }
        return CancelResult::kCancelRequested;
      }
    }
  }

 public:
  // ----------------------------------------------------------- dead letters

  std::vector<DeadLetter> dead_letters(std::size_t limit) const {
    std::vector<DeadLetter> out;
    std::lock_guard<std::mutex> lock(dead_mu_);
    out.reserve(std::min(limit, dead_.size()));
    for (const detail::DeadJob& d : dead_) {
      if (out.size() >= limit) break;
      DeadLetter l;
      l.id = d.id;
      l.handler = d.handler;
      l.priority = d.priority;
      l.attempts = d.attempts;
      l.recoveries = d.recoveries;
      l.reason = static_cast<DeadReason>(d.reason);
      l.error = d.error;
      l.payload = d.payload;
      l.submitted_at = std::chrono::system_clock::time_point(
          std::chrono::duration_cast<std::chrono::system_clock::duration>(
              std::chrono::nanoseconds(d.submit_ns)));
      l.died_at = std::chrono::system_clock::time_point(
          std::chrono::duration_cast<std::chrono::system_clock::duration>(
              std::chrono::nanoseconds(d.dead_at_ns)));
      out.push_back(std::move(l));
    }
    return out;
  }

  Result<JobId> requeue_dead(JobId id) {
    std::string handler;
    Result<JobId> r = [&]() -> Result<JobId> {
      // Held from finding the letter to erasing it, the job stamped back
      // into the table in between: a cut copies the dead letters with its
      // epoch bump under this lock (begin_cut), so it sees the job in exactly
      // one place. Nothing below waits for a cut.
      std::lock_guard<std::mutex> lock(dead_mu_);
      auto it = std::find_if(dead_.begin(), dead_.end(), [id](const auto& x) { return x.id == id; });
      if (it == dead_.end()) {
        return Status(StatusCode::kNotFound, "requeue_dead(): no dead letter " + std::to_string(id));
      }
      auto h = by_name_.find(it->handler);
      if (h == by_name_.end()) {
        return Status(StatusCode::kNotFound, "requeue_dead(): job " + std::to_string(id) +
                                                 ": handler \"" + it->handler +
                                                 "\" is not registered");
      }
      // The job's own options come back with it: its key (taken again, as
      // a submit takes it) and its deadline.
      SubmitOptions o;
      o.priority = it->priority;
      o.unique_key = it->key;
      o.deadline = std::chrono::nanoseconds(
          static_cast<std::int64_t>(std::min(it->deadline_ns, static_cast<std::uint64_t>(detail::kMaxSpanNs))));
      auto submitted = submit_special(h->second, it->payload, o, it->id);
      if (!submitted.ok()) {
        // The letter stays: nothing is lost. Named: submit()'s message says
        // neither the call nor the job (max_payload may have shrunk since).
        return Status(submitted.status().code(),
                      "requeue_dead(): job " + std::to_string(id) + ": " +
                          std::string(submitted.status().message()) + "; the letter stays");
      }
      if (*submitted != it->id) {
        // Another pending job holds the key: nothing was accepted.
        return Status(StatusCode::kAlreadyExists,
                      "requeue_dead(): job " + std::to_string(id) + ": its unique key \"" +
                          it->key + "\" is held by pending job " + std::to_string(*submitted) +
                          "; the letter stays");
      }
      handler = std::move(it->handler);
      erase_dead(it);
      return submitted;
    }();
    if (r.ok()) {
      log(LogLevel::kInfo, "job " + std::to_string(id) + " (" + handler + "): requeued from the dead letters");
    }
    return r;
  }

  Status drop_dead(JobId id) {
    std::lock_guard<std::mutex> lock(dead_mu_);
    auto it = std::find_if(dead_.begin(), dead_.end(), [id](const auto& x) { return x.id == id; });
    if (it == dead_.end()) {
      return Status(StatusCode::kNotFound, "drop_dead(): no dead letter " + std::to_string(id));
    }
    log(LogLevel::kInfo, "job " + std::to_string(id) + " (" + it->handler + "): dropped from the dead letters");
    erase_dead(it);
    return Status();
  }

 private:

  // I5, worker side: announce, stamp, leave. A job submitted in the epoch it
  // finished in was in no cut: its slot skips the horizon (I7).
  [[gnu::always_inline]] void retire(WorkerState& w, SlotIndex idx, bool by_cancel = false) {
    const std::uint64_t e = announce(w.announce);
    Slot& s = table_.slot(idx);
    JobTable::retire(s, e, by_cancel);
    // Release: begin_cut() acquires the 0 and then sees the stamp.
    w.announce.store(0, std::memory_order_release);
    if (JobTable::in_no_cut(s, e)) [[likely]] {
      w.retired.add_unheld(idx);
    } else {
      w.retired.add(idx, e);
    }
  }

  // Whether a recovered job was interrupted by the crash: running at the
  // snapshot's cut, or (live record) when the process died. Once either way:
  // a job running at the cut that was still running at the crash is one
  // interruption.
  bool interrupted(const snapshot::JobRecordView& j) const {
    return j.state == snapshot::JobState::kRunningAtCut || crashed_at(j.id);
  }
  // Named by the live record; no lookup per record when it names none (the
  // usual restart, of a million records at worst).
  bool crashed_at(JobId id) const {
    return !crashed_running_.empty() && crashed_running_.count(id) != 0;
  }

  // restore(), under dead_mu_, once every letter is in: max_dead bounds the
  // restored letters as push_dead_locked() bounds new ones. The oldest failed
  // letters go first, each counted in dead_discarded; the kept ones (no
  // handler, poison) are never discarded for room, so the letters may stay
  // over max_dead when those alone exceed it. With max_dead 0 every failed
  // letter goes. Without this a snapshot's failed letters stayed over a
  // max_dead lowered since until the next failure (never with max_dead 0).
  void trim_restored_dead_locked() {
    std::size_t failed = 0;
    for (const detail::DeadJob& d : dead_) failed += d.reason == snapshot::DeadReason::kFailed;
    const std::size_t over = dead_.size() > options_.max_dead ? dead_.size() - options_.max_dead : 0;
    const std::size_t drop = std::min(over, failed);
    if (drop != 0) {
      // Letters are in the snapshot's order, oldest first (as dead_ was).
      std::size_t left = drop;
      std::size_t out = 0;
      for (std::size_t in = 0; in < dead_.size(); ++in) {
        if (left != 0 && dead_[in].reason == snapshot::DeadReason::kFailed) {
          --left;
          continue;
        }
        if (out != in) dead_[out] = std::move(dead_[in]);
        ++out;
      }
      dead_.erase(dead_.begin() + static_cast<std::ptrdiff_t>(out), dead_.end());  // never allocates
      dead_discarded_.fetch_add(drop, std::memory_order_relaxed);
      try {
        log(LogLevel::kWarning, "dead letters over max_dead (" + std::to_string(options_.max_dead) +
                                    "): discarded the " + std::to_string(drop) +
                                    " oldest failed letter(s) of the snapshot");
      } catch (const std::bad_alloc&) {
      }
    }
    // push_dead_locked()'s search starts at the first failed letter.
    dead_kept_prefix_ = static_cast<std::size_t>(
        std::find_if(dead_.begin(), dead_.end(),
                     [](const detail::DeadJob& x) {
                       return x.reason == snapshot::DeadReason::kFailed;
                     }) -
        dead_.begin());
  }

  // start(): puts the jobs of the snapshot loaded at open() back into the
  // table and queues (before any worker runs), and keeps the dead ones.
  Status restore(RecoveryReport& r) {
    if (!loaded_) return Status();
    const snapshot::SnapshotView& v = loaded_->view;
    // Map the snapshot's handler names to what is registered now.
    std::vector<std::optional<HandlerId>> map(v.handlers.size());
    for (std::size_t i = 0; i < v.handlers.size(); ++i) {
      auto it = by_name_.find(v.handlers[i]);
      if (it != by_name_.end()) map[i] = it->second;
    }
    auto now_wall = std::chrono::duration_cast<std::chrono::nanoseconds>(
                        std::chrono::system_clock::now().time_since_epoch())
                        .count();
    const std::uint64_t now_ticks = Clock::ticks();
    auto wall_to_ticks = [&](std::int64_t wall_ns) {
      if (wall_ns >= now_wall) return now_ticks;
      // In unsigned arithmetic: any two int64 times are less than 2^64 apart.
      const std::uint64_t ago = static_cast<std::uint64_t>(now_wall) - static_cast<std::uint64_t>(wall_ns);
      const std::uint64_t back = Clock::ticks_in_ns(
          static_cast<std::int64_t>(std::min<std::uint64_t>(ago, detail::kMaxSpanNs)));
      return back < now_ticks ? now_ticks - back : 0;
    };
    auto keep_dead = [&](const snapshot::JobRecordView& j, std::uint16_t recoveries,
                         snapshot::DeadReason reason, std::string error) {
      detail::DeadJob d;
      d.id = j.id;
      d.handler = std::string(v.handlers[j.handler]);
      d.priority = j.priority;
      d.attempts = j.attempts;
      d.recoveries = recoveries;
      d.submit_ns = j.submit_ns;
      d.run_at_ns = j.run_at_ns;
      d.dead_at_ns = j.dead_at_ns != 0 ? j.dead_at_ns : now_wall;
      d.reason = reason;
      d.payload = std::string(j.payload);
      d.error = std::move(error);
      d.key = std::string(j.key);
      d.deadline_ns = j.deadline_ns;
      // A job quarantined now (no handler, poison) died in this life: it
      // counts in dead_total and health()'s "dead letters growing".
      if (j.state != snapshot::JobState::kDead) note_dead();
      dead_.push_back(std::move(d));
    };
    // Count first: a snapshot holding more live jobs than the table is an
    // operator error to fix (raise capacity), never a reason to drop jobs.
    // verify() counted the jobs neither dead nor cancelled and the largest
    // payload; only when those could overflow does this pass over the records
    // for the exact figures (an unregistered handler or a poison job makes a
    // live record dead here).
    const std::span<const unsigned char> image = loaded_->bytes.span();
    snapshot::JobRecordView j;
    // Whether a record goes into the table as a live job: not dead, not
    // cancelled, its handler registered, and not past max_recoveries (those
    // become dead letters below, which hold their payload whatever its size).
    // The loop below makes the same decisions, in the same order.
    const auto enters_table = [&](const snapshot::JobRecordView& x) {
      return x.state != snapshot::JobState::kDead && !x.cancel_requested && map[x.handler] &&
             static_cast<std::uint16_t>(x.recoveries + (interrupted(x) ? 1 : 0)) <=
                 options_.snapshot.max_recoveries;
    };
    if (v.max_payload_bytes > options_.max_payload) {
      for (snapshot::RecordReader reader(image, v); reader.next(j);) {
        // Only live jobs must fit max_payload (it may have been lowered since).
        if (!enters_table(j)) continue;
        if (j.payload.size() > options_.max_payload) {
          return Status(StatusCode::kFailedPrecondition,
                        "start(): recovered job " + std::to_string(j.id) + " has a payload of " +
                            std::to_string(j.payload.size()) + " bytes, above max_payload " +
                            std::to_string(options_.max_payload) + "; raise max_payload");
        }
      }
    }
    if (v.live_records > options_.capacity) {
      std::uint64_t live = 0;
      for (snapshot::RecordReader reader(image, v); reader.next(j);) live += enters_table(j) ? 1 : 0;
      if (live > options_.capacity) {
        return Status(StatusCode::kFailedPrecondition,
                      "start(): the snapshot from " + r.source + " holds " + std::to_string(live) +
                          " live jobs but capacity is " + std::to_string(options_.capacity) +
                          "; raise capacity (no job is dropped)");
      }
    }
    QueueProducerToken tokens[kPriorityLevels] = {QueueProducerToken(queues_[0]),
                                                  QueueProducerToken(queues_[1]),
                                                  QueueProducerToken(queues_[2])};
    if (!all_valid(tokens)) {
      return Status(StatusCode::kInternal,
                    "start(): out of memory creating the queue producers that restore jobs");
    }
    SlotIndex cache[kSlotCacheSize];
    std::size_t cached = 0;
    std::uint64_t restored = 0;
    constexpr std::size_t kRestoreBulk = 256;
    std::vector<SlotIndex> to_queue[kPriorityLevels];
    for (auto& level : to_queue) level.reserve(kRestoreBulk);
    const auto flush_level = [&](std::uint8_t p) {
      std::vector<SlotIndex>& level = to_queue[p];
      if (level.empty()) return true;
      const bool ok = queues_[p].enqueue_bulk(tokens[p], level.data(), level.size());
      level.clear();
      return ok;
    };
    const std::uint64_t epoch = table_.epoch();
    std::lock_guard<std::mutex> lock(dead_mu_);
    for (snapshot::RecordReader reader(image, v); reader.next(j);) {
      const bool was_running = j.state == snapshot::JobState::kRunningAtCut;
      const bool crashed = crashed_at(j.id);
      const std::uint16_t rec = static_cast<std::uint16_t>(j.recoveries + (was_running || crashed ? 1 : 0));
      // Every job given a recovery, whatever becomes of it here (restored,
      // quarantined as poison, kept dead for want of its handler): start()
      // makes them durable before any worker runs. A quarantine that only
      // lived in memory let two jobs that each kill the process take turns
      // forever: each start poisoned one, then ran the other.
      if ((was_running || crashed) && j.state != snapshot::JobState::kDead && !j.cancel_requested) {
        ++credited_;
      }
      if (j.state == snapshot::JobState::kDead) {
        keep_dead(j, j.recoveries, j.dead_reason, std::string(j.error));
        ++r.dead;
        continue;
      }
      if (j.cancel_requested) {
        // cancel() reached it before the cut: it must not run (again).
        ++r.cancelled;
        continue;
      }
      if (!map[j.handler]) {
        keep_dead(j, rec, snapshot::DeadReason::kNoHandler,
                  "handler \"" + std::string(v.handlers[j.handler]) + "\" is not registered");
        ++r.unknown_handler;
        log(LogLevel::kWarning, "job " + std::to_string(j.id) + " (" +
                                    std::string(v.handlers[j.handler]) +
                                    "): handler not registered; kept as dead");
        continue;
      }
      if (rec > options_.snapshot.max_recoveries) {
        bump(poisoned_by_handler_[*map[j.handler]]);  // it became dead in this life
        keep_dead(j, rec, snapshot::DeadReason::kPoison,
                  "poison job: running at " + std::to_string(rec) +
                              " crashes (at a snapshot's cut that a crash followed, or when "
                              "the process died; max_recoveries " +
                              std::to_string(options_.snapshot.max_recoveries) + ")");
        ++r.poisoned;
        log(LogLevel::kWarning, "job " + std::to_string(j.id) + " (" +
                                    std::string(v.handlers[j.handler]) +
                                    "): quarantined as a poison job after " +
                                    std::to_string(rec) + " recoveries");
        continue;
      }
      if (cached == 0) cached = table_.take_free(cache);
      if (cached == 0) return Status(StatusCode::kInternal, "start(): job table ran out during restore");
      const SlotIndex idx = cache[--cached];
      if (cached >= kRestoreAhead) prefetch_for_fill(cache[cached - kRestoreAhead]);
      // Live jobs keep their id, attempts and times; a restored job has never
      // been seen by a cut of this process, so any epoch <= now stamps it.
      const std::uint64_t submit_ticks = wall_to_ticks(j.submit_ns);
      // Delayed jobs and retries keep their wall-clock run_at: one due while
      // the process was down runs at once.
      const bool scheduled = (j.state == snapshot::JobState::kDelayed ||
                              j.state == snapshot::JobState::kWaitingRetry) &&
                             j.run_at_ns > now_wall;
      const std::uint64_t run_at = scheduled ? vnow() + Clock::ticks_in_ns(j.run_at_ns - now_wall)
                                             : wall_to_ticks(j.run_at_ns);
      const SlotState initial = !scheduled ? SlotState::kQueued
                                : j.state == snapshot::JobState::kDelayed ? SlotState::kDelayed
                                                                          : SlotState::kWaitingRetry;
      if (!fill_slot(idx, j.id, *map[j.handler], j.payload, j.priority, submit_ticks, run_at, epoch,
                     initial, j.key, j.deadline_ns)) {
        return Status(StatusCode::kInternal, "start(): out of memory restoring job " +
                                                 std::to_string(j.id));
      }
      Slot& s = table_.slot(idx);
      s.attempts.store(j.attempts, std::memory_order_relaxed);
      s.recoveries = rec;
      if (!j.key.empty()) {
        std::lock_guard<std::mutex> key_lock(keys_mu_);
        const auto [it, made] = keys_.emplace(std::string(j.key), j.id);
        if (made) {
          try {
            key_by_id_.insert_or_assign(j.id, std::string_view(it->first));
          } catch (...) {
            keys_.erase(it);
            throw;
          }
        }
      }
      if (scheduled) {
        if (!schedule(idx, run_at)) {
          return Status(StatusCode::kInternal, "start(): out of memory scheduling restored jobs");
        }
      } else {
        // Queued in order, a bulk enqueue per level every kRestoreBulk jobs.
        std::vector<SlotIndex>& level = to_queue[j.priority];
        level.push_back(idx);
        if (level.size() == kRestoreBulk && !flush_level(j.priority)) {
          return Status(StatusCode::kInternal, "start(): out of memory queueing restored jobs");
        }
      }
      ++restored;
      if (crashed) ++r.running_at_crash;
      if (was_running) {
        ++r.running_at_cut;
      } else if (scheduled) {
        ++r.delayed;
      } else {
        ++r.pending;
      }
    }
    for (std::uint8_t p = 0; p < kPriorityLevels; ++p) {
      if (!flush_level(p)) {
        return Status(StatusCode::kInternal, "start(): out of memory queueing restored jobs");
      }
    }
    recovered_.store(restored, std::memory_order_release);
    if (cached != 0) (void)table_.put_free(cache, cached);
    trim_restored_dead_locked();
    dead_count_.store(dead_.size(), std::memory_order_relaxed);
    log(LogLevel::kInfo,
        "recovered generation " + std::to_string(r.generation) + " from " + r.source + ": " +
            std::to_string(r.pending) + " pending, " + std::to_string(r.delayed) + " delayed, " +
            std::to_string(r.running_at_cut) +
            " running at the cut (run again), " + std::to_string(r.poisoned) + " poisoned, " +
            std::to_string(r.unknown_handler) + " with no handler, " + std::to_string(r.dead) +
            " dead");
    loaded_.reset();
    return Status();
  }

  // Once the workers are joined: takes every index left in the queues, a
  // batch at a time, to `fn`; returns how many.
  template <typename Fn>
  std::uint64_t empty_queues(Fn fn) {
    std::uint64_t taken = 0;
    SlotIndex buf[256];
    for (auto& q : queues_) {
      std::size_t n;
      while ((n = q.try_dequeue_bulk(buf, 256)) != 0) {
        fn(buf, n);
        taken += n;
      }
    }
    return taken;
  }

  // kDrain, once the workers and the scheduler are joined: jobs still in a
  // queue. None is expected (nothing fires after drained() decided, and
  // nothing is queued when it does); one would not run: it stays in the
  // table, so the final snapshot keeps it like the jobs held back, and it is
  // counted with them in StopReport::delayed_left.
  // A job left in a queue that cancel() reached is cancelled, as it answered,
  // not left: its slot goes (the final snapshot would only skip it).
  std::uint64_t left_in_queues() {
    std::uint64_t cancelled = 0;
    const std::uint64_t taken = empty_queues([&](const SlotIndex* in, std::size_t n) {
      for (std::size_t i = 0; i < n; ++i) {
        if (!count_if_cancelled(in[i])) continue;
        drop_slots(&in[i], 1);
        ++cancelled;
      }
    });
    return taken - cancelled;
  }

  // After the scheduler and the snapshot thread stopped: jobs it still held
  // whose cancel() it never acted on (one made during kStopping, after it
  // stopped) end as cancelled, as cancel() answered, not as left or dropped.
  void settle_cancelled_left() {
    std::vector<SlotIndex> gone;
    std::erase_if(sched_left_, [&](const Timer& t) {
      Slot& s = table_.slot(t.idx);
      if ((s.id_word.load(std::memory_order_acquire) & kCancelBit) == 0) return false;
      release_key(s);
      count_sched_cancelled(s);
      gone.push_back(t.idx);
      return true;
    });
    drop_slots(gone.data(), gone.size());
  }

  // After the workers joined (kAbandon): empty the queues, count and free.
  // A job cancel() reached counts as cancelled, as it answered, not dropped.
  std::uint64_t drop_queued() {
    std::uint64_t cancelled = 0;
    std::uint64_t dropped = empty_queues([&](const SlotIndex* in, std::size_t n) {
      take_for_stop(in, n);
      for (std::size_t i = 0; i < n; ++i) cancelled += count_if_cancelled(in[i]) ? 1 : 0;
      drop_slots(in, n);
    });
    dropped -= cancelled;
    // And the scheduler's (delayed jobs, retries in backoff).
    std::vector<SlotIndex> left;
    left.reserve(sched_left_.size());
    for (const Timer& t : sched_left_) left.push_back(t.idx);
    drop_slots(left.data(), left.size());
    dropped += left.size();
    sched_dropped_.store(sched_left_.size(), std::memory_order_relaxed);
    sched_left_.clear();
    {
      std::lock_guard<std::mutex> lock(keys_mu_);
      key_by_id_.clear();
      keys_.clear();
    }
    return dropped;
  }

  // kDrain is done: nothing pending but the delayed jobs the scheduler holds
  // back, none of them due. Decided once, under drain_mu_: the scheduler
  // fires due jobs and publishes what it holds back under it too, so a job
  // it fires is pending (and queued) before a worker can compare, and none
  // fires after the decision. A held job that is due keeps the workers
  // until the scheduler fires it (it wakes for it).
  bool drained() {
    if (drain_done_.load(std::memory_order_acquire)) return true;
    std::lock_guard<std::mutex> lock(drain_mu_);
    if (drain_done_.load(std::memory_order_relaxed)) return true;
    if (!held_final_.load(std::memory_order_relaxed)) return false;
    if (pending() != held_.load(std::memory_order_relaxed)) return false;
    if (vnow() >= held_next_.load(std::memory_order_relaxed)) return false;
    drain_done_.store(true, std::memory_order_release);
    return true;
  }

  std::uint64_t pending() const {
    const std::uint64_t submitted = accepted_total();
    std::uint64_t finished = 0;
    for (const auto& w : workers_) {
      finished += w->done.load(std::memory_order_acquire) +
                  w->failed.load(std::memory_order_acquire) +
                  w->dropped.load(std::memory_order_acquire) +
                  w->cancelled.load(std::memory_order_acquire);
    }
    finished += sched_cancelled_.load(std::memory_order_acquire);
    return submitted > finished ? submitted - finished : 0;
  }

  void log(LogLevel level, const std::string& line) const {
    if (options_.log) options_.log(level, line);
  }
  // A line about job `s`, made by make_what() only when a log is set. Best
  // effort: a worker calls it while it finishes a job, and a line it has no
  // memory for is dropped, never the job's own bookkeeping.
  template <typename MakeWhat>
  void log_job_with(LogLevel level, const Slot& s, const HandlerEntry& h,
                    MakeWhat&& make_what) const {
    if (!options_.log) return;
    try {
      options_.log(level, "job " + std::to_string(s.id()) + " (" + h.name + "): " + make_what());
    } catch (const std::bad_alloc&) {
    }
  }
  void log_job(LogLevel level, const Slot& s, const HandlerEntry& h, std::string_view what) const {
    log_job_with(level, s, h, [what] { return std::string(what); });
  }

  const EngineOptions options_;
  const std::uint64_t uid_;
  JobTable table_;
  PaddedQueue queues_[kPriorityLevels];
  // Read on every submit, written only before start(): a line of their own.
  alignas(kCacheLine) std::vector<HandlerEntry> handlers_;
  std::unordered_map<std::string, HandlerId, StringHash, std::equal_to<>> by_name_;
  std::vector<std::unique_ptr<WorkerState>> workers_;
  std::shared_ptr<EngineLifetime> life_;
  std::mutex registry_mu_;  // serialises registering/adopting ProducerStates
  std::mutex stop_mu_;      // one stop() at a time
  std::atomic<ProducerState*> producers_{nullptr};
  alignas(kCacheLine) std::counting_semaphore<> sleep_sem_{0};

  alignas(kCacheLine) std::atomic<EngineState> state_{EngineState::kOpen};
  std::atomic<bool> go_{false};
  std::atomic<bool> intake_closed_{false};
  std::atomic<bool> abandon_{false};
  std::atomic<bool> exit_now_{false};  // stop(kSnapshotAndExit): take no more jobs
  std::atomic<bool> final_cut_{false};  // stop() is taking its final snapshot (begin_final_cut)
  std::atomic<std::uint64_t> dropped_by_stop_{0};
  std::atomic<std::uint64_t> recovered_{0};

  // Persistence (null when snapshots are off).
  std::unique_ptr<detail::Persistence> persistence_;
  std::unique_ptr<detail::LoadedSnapshot> loaded_;  // from open() until start()
  RecoveryReport recovery_;
  std::uint64_t recovered_generation_ = 0;
  std::vector<std::string> handler_names_;
  // The live record (null without a snapshot directory, or if it could not
  // be armed), the jobs it showed running when the previous process died,
  // and how many restored jobs restore() gave a recovery (start() persists
  // those before any worker runs).
  detail::LiveRecord* live_ = nullptr;
  std::unordered_set<JobId> crashed_running_;
  std::uint64_t credited_ = 0;
  // Ids below lease_end_ are in the live record's lease (~0: no record, no
  // lease to keep). Raised under lease_mu_, a lease of kLeaseIds at a time.
  static constexpr JobId kLeaseIds = JobId{1} << 20;
  std::mutex lease_mu_;
  alignas(kCacheLine) std::atomic<JobId> lease_end_{~JobId{0}};

  // Dead letters (I9: under dead_mu_; the counters are read without it).
  mutable std::mutex dead_mu_;
  std::deque<detail::DeadJob> dead_;
  std::size_t dead_kept_prefix_ = 0;  // dead_[0, this) hold no failed letter (push_dead_locked)
  std::vector<detail::DeadJob> cut_dead_;  // dead_ as of the last begin_cut() (snapshot thread)
  std::atomic<std::uint64_t> dead_count_{0};
  std::atomic<std::uint64_t> dead_total_{0};
  std::atomic<std::uint64_t> dead_discarded_{0};
  std::atomic<std::int64_t> last_dead_steady_ns_{0};  // Clock::steady_ns() of the newest death

  // Unique keys of pending jobs -> their ids.
  std::mutex keys_mu_;
  std::unordered_map<std::string, JobId, StringHash, std::equal_to<>> keys_;
  // The same entries by id, for cancel() (release_key_of()): each view is of
  // its entry's key in keys_ (node-based: the string stays put). An entry is
  // in both maps or in neither, except while submit() makes it.
  std::unordered_map<JobId, std::string_view> key_by_id_;

  // The scheduler (delayed jobs and retry backoff), see scheduler_main().
  std::thread scheduler_thread_;
  bool persistence_started_ = false;  // start() started the snapshot thread (unwind_start())
  std::mutex sched_mu_;             // guards sched_inbox_ and orders sched_next_ (no lost wake-up)
  std::vector<Timer> sched_inbox_;  // handed over, not yet in the heap
  std::counting_semaphore<> sched_sem_{0};
  std::atomic<bool> sched_stop_{false};
  std::atomic<bool> sched_purge_{false};        // cancel() hit a scheduled job
  std::atomic<std::uint64_t> sched_next_{~std::uint64_t{0}};  // tick it sleeps until
  std::atomic<std::uint64_t> scheduled_in_{0};  // jobs handed to the scheduler
  std::atomic<std::uint64_t> scheduled_out_{0}; // ... and taken out (fired, cancelled, dropped)
  // change_count(): cancel bits set; dead letters added or removed (under dead_mu_).
  std::atomic<std::uint64_t> cancel_changes_{0};
  std::atomic<std::uint64_t> dead_changes_{0};
  std::atomic<std::uint64_t> held_{0};          // kDrain: scheduled jobs not due (counted once held_final_)
  std::atomic<bool> held_final_{false};
  std::mutex drain_mu_;  // kDrain: the scheduler's firing and held_*, against drained()
  std::atomic<std::uint64_t> held_next_{~std::uint64_t{0}};  // kDrain: when the first held job is due
  std::atomic<bool> drain_done_{false};  // kDrain: drained() decided; nothing fires after
  std::atomic<std::uint64_t> sched_announce_{0};  // I5, the scheduler's stamps
  std::atomic<std::uint64_t> sched_cancelled_{0};
  // The same per handler (sized at start(), written by the scheduler only).
  std::unique_ptr<std::atomic<std::uint64_t>[]> sched_cancelled_by_handler_;
  // Per handler: jobs start() quarantined as poison (dead in this life, as
  // failed ones are; jobengine_jobs_dead_total counts both).
  std::unique_ptr<std::atomic<std::uint64_t>[]> poisoned_by_handler_;
  std::atomic<std::uint64_t> sched_dropped_{0};
  alignas(kCacheLine) detail::LatencyHistogram lateness_;  // scheduler-written
  std::vector<Timer> sched_left_;               // after the scheduler stopped: still scheduled
  detail::RetireBuffer sched_retired_{0};
  std::atomic<std::uint8_t> stop_mode_{0};

  alignas(kCacheLine) std::atomic<int> sleepers_{0};
  alignas(kCacheLine) std::atomic<JobId> next_id_{1};
};

// ------------------------------------------------------------- public facade

std::chrono::steady_clock::time_point JobContext::submitted_at() const noexcept {
  return std::chrono::steady_clock::time_point(
      std::chrono::nanoseconds(Clock::to_steady_ns(submit_ticks_)));
}

bool JobContext::cancelled() const noexcept {
  if (cancel_word_ == nullptr) return false;
  return (static_cast<const std::atomic<std::uint64_t>*>(cancel_word_)->load(std::memory_order_relaxed) &
          kCancelBit) != 0;
}

std::chrono::steady_clock::time_point JobContext::deadline() const noexcept {
  if (deadline_ticks_ == 0) return std::chrono::steady_clock::time_point::max();
  return std::chrono::steady_clock::time_point(
      std::chrono::nanoseconds(Clock::to_steady_ns(deadline_ticks_)));
}

std::string_view cancel_result_name(CancelResult r) noexcept {
  switch (r) {
    case CancelResult::kCancelled: return "cancelled";
    case CancelResult::kCancelRequested: return "cancel-requested";
  }
  return "unknown";
}

std::string_view dead_reason_name(DeadReason r) noexcept {
  return snapshot::dead_reason_name(static_cast<snapshot::DeadReason>(r));
}

std::string_view engine_state_name(EngineState state) noexcept {
  switch (state) {
    case EngineState::kOpen: return "open";
    case EngineState::kRunning: return "running";
    case EngineState::kStopping: return "stopping";
    case EngineState::kStopped: return "stopped";
  }
  return "unknown";
}

Status check_retry_policy(const RetryPolicy& p, const std::string& prefix) {
  auto bad = [&](const std::string& what) { return Status(StatusCode::kInvalidArgument, prefix + what); };
  if (p.initial_backoff.count() < 0) return bad("initial_backoff must be >= 0");
  if (p.max_backoff.count() < 0) return bad("max_backoff must be >= 0");
  if (p.initial_backoff > p.max_backoff) {
    return bad("initial_backoff (" + std::to_string(p.initial_backoff.count()) +
               " ns) exceeds max_backoff (" + std::to_string(p.max_backoff.count()) + " ns)");
  }
  if (!(p.multiplier >= 1.0) || !std::isfinite(p.multiplier)) {
    return bad("multiplier must be a finite number >= 1, got " + std::to_string(p.multiplier));
  }
  if (!(p.jitter >= 0.0 && p.jitter <= 1.0)) {
    return bad("jitter must be in 0..1, got " + std::to_string(p.jitter));
  }
  return Status();
}

namespace {
Status validate(const EngineOptions& o) {
  auto bad = [](const std::string& what) { return Status(StatusCode::kInvalidArgument, what); };
  if (o.workers < 1) return bad("workers must be >= 1, got 0");
  if (o.workers > 4096) return bad("workers must be <= 4096, got " + std::to_string(o.workers));
  if (!o.cpus.empty() && o.cpus.size() != o.workers) {
    return bad("cpus holds " + std::to_string(o.cpus.size()) + " entries for " +
               std::to_string(o.workers) + " workers; give one cpu per worker or none");
  }
  if (Status s = detail::check_cpus(o.cpus); !s.ok()) return s;
  if (o.capacity < 1 || o.capacity > (std::size_t{1} << 31)) {
    return bad("capacity must be 1..2^31, got " + std::to_string(o.capacity));
  }
  if (o.max_payload > (std::size_t{1} << 31)) {
    return bad("max_payload must be <= 2^31 bytes, got " + std::to_string(o.max_payload));
  }
  if (o.max_attempts < 1 || o.max_attempts > 65535) {
    return bad("max_attempts must be 1..65535, got " + std::to_string(o.max_attempts));
  }
  if (Status st = check_retry_policy(o.retry, "retry."); !st.ok()) return st;
  if (o.run_deadline.count() < 0) return bad("run_deadline must be >= 0");
  if (o.dead_growth_window.count() < 0) return bad("dead_growth_window must be >= 0");
  if (o.scheduler_cpu >= 0) {
    for (int c : o.cpus) {
      if (c == o.scheduler_cpu) {
        return bad("scheduler_cpu " + std::to_string(c) +
                   " is a worker's cpu; the scheduler must not run on worker cores");
      }
    }
    if (Status st = detail::check_cpus({o.scheduler_cpu}); !st.ok()) {
      return bad("scheduler_cpu: " + std::string(st.message()));
    }
  } else if (o.scheduler_cpu < -1) {
    return bad("scheduler_cpu must be -1 (unpinned) or a cpu, got " + std::to_string(o.scheduler_cpu));
  }
  if (o.fairness_period == 1) {
    return bad("fairness_period 1 would start every dequeue at a lower level, so high priority "
               "would run only when both lower levels are empty: use 0 (strict priority) or >= 2");
  }
  if (o.dequeue_batch < 1 || o.dequeue_batch > 256) {
    return bad("dequeue_batch must be 1..256, got " + std::to_string(o.dequeue_batch));
  }
  const SnapshotOptions& sn = o.snapshot;
  if (sn.enabled) {
    if (sn.dir.empty() && sn.shm_name.empty()) {
      return bad("snapshot.enabled needs snapshot.dir or snapshot.shm_name (or both)");
    }
    if (!sn.shm_name.empty()) {
      if (sn.shm_name.size() > 200) {
        return bad("snapshot.shm_name is " + std::to_string(sn.shm_name.size()) +
                   " bytes; at most 200");
      }
      for (char c : sn.shm_name) {
        const bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                        c == '.' || c == '_' || c == '-';
        if (!ok) {
          return bad("snapshot.shm_name \"" + sn.shm_name +
                     "\" may hold only letters, digits, '.', '_' and '-'");
        }
      }
      if (sn.shm_name == "." || sn.shm_name == "..") return bad("snapshot.shm_name may not be . or ..");
    }
    // At most a day: a longer period keeps no snapshot worth the name (a crash
    // loses up to that much work), and the bound keeps `now + interval` and
    // health()'s `2 * interval` far from overflowing (milliseconds::max()
    // wrapped around and made the snapshots run back to back).
    constexpr std::chrono::milliseconds kMaxPeriod = std::chrono::hours(24);
    const std::pair<const char*, std::chrono::milliseconds> periods[] = {
        {"snapshot.shm_interval", sn.shm_interval},
        {"snapshot.disk_interval", sn.disk_interval},
        {"snapshot.exit_deadline", sn.exit_deadline}};
    for (const auto& [name, value] : periods) {
      if (value.count() < 0 || value > kMaxPeriod) {
        return bad(std::string(name) + " is " + std::to_string(value.count()) +
                   " ms; it must be 0.." + std::to_string(kMaxPeriod.count()) + " ms (24 h)");
      }
    }
    if (sn.keep_generations < 1) return bad("snapshot.keep_generations must be >= 1, got 0");
    if (sn.cpu >= 0) {
      for (int c : o.cpus) {
        if (c == sn.cpu) {
          return bad("snapshot.cpu " + std::to_string(sn.cpu) +
                     " is a worker's cpu; the snapshot thread must not run on worker cores");
        }
      }
      if (Status st = detail::check_cpus({sn.cpu}); !st.ok()) {
        return bad("snapshot.cpu: " + std::string(st.message()));
      }
    } else if (sn.cpu < -1) {
      return bad("snapshot.cpu must be -1 (unpinned) or a cpu, got " + std::to_string(sn.cpu));
    }
  }
  if (o.idle != IdleStrategy::kSpin && o.idle != IdleStrategy::kSpinThenYield &&
      o.idle != IdleStrategy::kSpinThenBlock) {
    return bad("idle: unknown IdleStrategy " + std::to_string(static_cast<int>(o.idle)));
  }
  return Status();
}
}  // namespace

Result<Engine> Engine::open(EngineOptions options) {
  if (Status s = validate(options); !s.ok()) return s;
  detail::asymmetric_fence_init();
  detail::Clock::init();
  const std::size_t capacity = options.capacity;
  std::unique_ptr<Impl> impl;
  try {
    impl = std::make_unique<Impl>(std::move(options));
  } catch (const std::bad_alloc&) {
    return Status(StatusCode::kInvalidArgument,
                  "capacity " + std::to_string(capacity) +
                      ": out of memory allocating the job table (" +
                      std::to_string(capacity * kSlotBytes) + " bytes) and its queues");
  }
  try {
    if (Status s = impl->populate_and_load(); !s.ok()) return s;
  } catch (const std::bad_alloc&) {
    // Not the capacity's fault: a smaller one would not help.
    return Status(StatusCode::kInternal,
                  "open(): out of memory opening the snapshot stores or reading the newest "
                  "snapshot; nothing was changed");
  }
  return Engine(std::move(impl));
}

Engine::Engine(std::unique_ptr<Impl> impl) noexcept : impl_(std::move(impl)) {}
Engine::Engine(Engine&&) noexcept = default;
Engine& Engine::operator=(Engine&&) noexcept = default;
Engine::~Engine() = default;

Result<HandlerId> Engine::register_handler(std::string_view name, Handler handler) {
  return impl_->register_handler(name, std::move(handler), HandlerOptions{});
}
Result<HandlerId> Engine::register_handler(std::string_view name, Handler handler,
                                           const HandlerOptions& options) {
  return impl_->register_handler(name, std::move(handler), options);
}
Result<CancelResult> Engine::cancel(JobId id) { return impl_->cancel(id); }
std::vector<DeadLetter> Engine::dead_letters(std::size_t limit) const {
  return impl_->dead_letters(limit);
}
Result<JobId> Engine::requeue_dead(JobId id) { return impl_->requeue_dead(id); }
Status Engine::drop_dead(JobId id) { return impl_->drop_dead(id); }
std::string Engine::metrics_text() const { return detail::format_prometheus(impl_->metrics_data()); }
std::string Engine::metrics_json() const { return detail::format_json(impl_->metrics_data()); }
Result<HandlerId> Engine::handler_id(std::string_view name) const { return impl_->handler_id(name); }
Result<StartReport> Engine::start() { return impl_->start(); }
Result<JobId> Engine::submit(HandlerId handler, std::string_view payload) {
  return impl_->submit(handler, payload);
}
Result<JobId> Engine::submit(HandlerId handler, std::string_view payload, SubmitOptions options) {
  return impl_->submit(handler, payload, options);
}
Result<JobId> Engine::submit(std::string_view handler_name, std::string_view payload,
                             SubmitOptions options) {
  return impl_->submit(handler_name, payload, options);
}
Result<std::size_t> Engine::submit_batch(std::span<const JobSpec> jobs, std::span<JobId> ids) {
  return impl_->submit_batch(jobs, ids);
}
Result<StopReport> Engine::stop(StopMode mode) { return impl_->stop(mode); }
Result<SnapshotInfo> Engine::snapshot_now() { return impl_->snapshot_now(); }
Health Engine::health() const { return impl_->health(); }
EngineState Engine::state() const noexcept { return impl_->state(); }
const EngineOptions& Engine::options() const noexcept { return impl_->options(); }

}  // namespace jobengine
