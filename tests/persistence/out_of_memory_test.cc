// Memory running out in the snapshot thread: the image's own buffer is the
// largest allocation an engine makes after start() (~140 bytes a job, so
// hundreds of MB on a large table). A snapshot that cannot get it fails like
// a failed publish: reported, counted, retried on schedule. Before, the
// std::bad_alloc escaped the snapshot thread and aborted the process.
//
// The same for a worker recording a job's end (its error text, its dead
// letter): the exception ended the process (std::terminate); now the worker
// waits for memory and tries again.
//
// This binary replaces the global operator new (so it is a binary of its
// own): armed, it throws std::bad_alloc for every request of at least
// g_fail_at_or_above bytes, as an exhausted heap (or an RLIMIT_AS) would for
// the large ones first; or, for one thread, the Nth allocation from now
// (t_fail_in), to reach each allocation of one call in turn; or every
// allocation of one thread until cleared (g_failing_thread).
#include <gtest/gtest.h>
#include <pthread.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <new>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "engine/test_hooks.h"
#include "jobengine/engine.h"
#include "tests/engine/test_support.h"
#include "tests/persistence/disk_test_support.h"

namespace {
std::atomic<std::size_t> g_fail_at_or_above{std::numeric_limits<std::size_t>::max()};
std::atomic<std::uint64_t> g_refused{0};
std::atomic<std::uint64_t> g_refused_scheduler{0};  // of g_refused, on the engine's scheduler thread
thread_local long t_fail_in = -1;  // >= 0: this thread's allocation that many from now fails
// Non-zero: every allocation of the thread with this pthread_self() fails
// until it is cleared (another thread may clear it).
std::atomic<unsigned long> g_failing_thread{0};
}  // namespace

// Every unaligned form, new and new[] alike, over malloc/free, so that the
// sanitizers' own operators never see (and never mismatch) one of these
// blocks. The aligned forms stay the runtime's, paired among themselves.
namespace {
void* allocate(std::size_t n) noexcept {
  if (t_fail_in >= 0 && t_fail_in-- == 0) {
    g_refused.fetch_add(1, std::memory_order_relaxed);
    return nullptr;
  }
  if (const unsigned long t = g_failing_thread.load(std::memory_order_relaxed);
      t != 0 && t == static_cast<unsigned long>(::pthread_self())) {
    g_refused.fetch_add(1, std::memory_order_relaxed);
    return nullptr;
  }
  if (n >= g_fail_at_or_above.load(std::memory_order_relaxed)) {
    g_refused.fetch_add(1, std::memory_order_relaxed);
    char name[16] = {};
    if (::pthread_getname_np(::pthread_self(), name, sizeof name) == 0 &&
        std::string_view(name) == "jobengine-sched") {
      g_refused_scheduler.fetch_add(1, std::memory_order_relaxed);
    }
    return nullptr;
  }
  return std::malloc(n == 0 ? 1 : n);
}
void* allocate_or_throw(std::size_t n) {
  if (void* p = allocate(n)) return p;
  throw std::bad_alloc();
}
}  // namespace

void* operator new(std::size_t n) { return allocate_or_throw(n); }
void* operator new[](std::size_t n) { return allocate_or_throw(n); }
void* operator new(std::size_t n, const std::nothrow_t&) noexcept { return allocate(n); }
void* operator new[](std::size_t n, const std::nothrow_t&) noexcept { return allocate(n); }
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t) noexcept { std::free(p); }
void operator delete(void* p, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete[](void* p, const std::nothrow_t&) noexcept { std::free(p); }

namespace jobengine {
namespace {

using std::chrono::milliseconds;
using testing_support::DiskOptions;
using testing_support::TempDir;
using testing_support::KillChildOnceReady;
using testing_support::WaitUntil;
using testing_support::WaitUntilTheSegmentIsCurrent;

// Refuses allocations of `bytes` or more while it lives.
class LargeAllocationsFail {
 public:
  explicit LargeAllocationsFail(std::size_t bytes) {
    g_fail_at_or_above.store(bytes, std::memory_order_relaxed);
  }
  ~LargeAllocationsFail() {
    g_fail_at_or_above.store(std::numeric_limits<std::size_t>::max(), std::memory_order_relaxed);
  }
  LargeAllocationsFail(const LargeAllocationsFail&) = delete;
  LargeAllocationsFail& operator=(const LargeAllocationsFail&) = delete;
};

constexpr std::size_t kParked = 2000;        // ~280 KB of image
constexpr std::size_t kRefuseFrom = 64 << 10;  // what the image's buffer needs, nothing else


// Opens an engine on `dir` with a handler "count" and `kParked` jobs delayed
// an hour, so they stay pending. Returns their ids.
std::vector<JobId> ParkJobs(Engine& e, std::atomic<int>& ran) {
  auto h = e.register_handler("count", [&ran](JobContext&) {
    ran.fetch_add(1);
    return Outcome::kDone;
  });
  EXPECT_TRUE(h.ok());
  EXPECT_TRUE(e.start().ok());
  std::vector<JobId> ids;
  const std::string payload(64, 'p');
  for (std::size_t i = 0; i < kParked; ++i) {
    auto id = e.submit(*h, payload, {.delay = std::chrono::hours(1)});
    EXPECT_TRUE(id.ok()) << id.status().to_string();
    if (id.ok()) ids.push_back(*id);
  }
  return ids;
}

// Leaves a snapshot of `jobs` jobs delayed an hour in `dir` (so that they stay
// pending in every engine that recovers it), written by stop(kSnapshotAndExit).
void LeaveDelayedJobs(const std::string& dir, std::size_t jobs) {
  auto e = Engine::open(DiskOptions(dir, milliseconds(0)));
  ASSERT_TRUE(e.ok()) << e.status().to_string();
  ASSERT_TRUE(e->register_handler("count", [](JobContext&) { return Outcome::kDone; }).ok());
  ASSERT_TRUE(e->start().ok());
  const HandlerId count = *e->handler_id("count");
  for (std::size_t i = 0; i < jobs; ++i) {
    ASSERT_TRUE(e->submit(count, "job", {.delay = std::chrono::hours(1)}).ok());
  }
  ASSERT_TRUE(e->stop(StopMode::kSnapshotAndExit).ok());
}

// Recovers `dir` in a new engine: how many delayed jobs came back.
std::uint64_t RecoveredDelayed(const std::string& dir) {
  auto e = Engine::open(DiskOptions(dir, milliseconds(0)));
  EXPECT_TRUE(e.ok()) << e.status().to_string();
  if (!e.ok()) return 0;
  EXPECT_TRUE(e->register_handler("count", [](JobContext&) { return Outcome::kDone; }).ok());
  auto started = e->start();
  EXPECT_TRUE(started.ok()) << started.status().to_string();
  if (!started.ok()) return 0;
  const std::uint64_t delayed = started->recovery.delayed;
  EXPECT_TRUE(e->stop(StopMode::kAbandon).ok());
  return delayed;
}

TEST(SnapshotOutOfMemoryTest, SnapshotNowFailsCleanlyAndTheNextOneHoldsEveryJob) {
  TempDir tmp;
  {
    std::atomic<int> ran{0};
    auto e = Engine::open(DiskOptions(tmp.dir(), milliseconds(0)));
    ASSERT_TRUE(e.ok()) << e.status().to_string();
    const std::vector<JobId> ids = ParkJobs(*e, ran);
    ASSERT_EQ(ids.size(), kParked);
    const HandlerId count = *e->handler_id("count");
    const Health before = e->health();
    {
      LargeAllocationsFail refuse(kRefuseFrom);
      const std::uint64_t refused = g_refused.load();
      auto failed = e->snapshot_now();
      ASSERT_FALSE(failed.ok()) << "the image's buffer was never refused";
      EXPECT_EQ(failed.status().code(), StatusCode::kInternal) << failed.status().to_string();
      EXPECT_NE(failed.status().to_string().find("out of memory"), std::string::npos)
          << failed.status().to_string();
      EXPECT_GT(g_refused.load(), refused);
    }
    const Health after = e->health();
    EXPECT_EQ(after.state, EngineState::kRunning);
    EXPECT_GT(after.snapshot_failures, before.snapshot_failures);
    EXPECT_NE(after.last_snapshot_error.find("out of memory"), std::string::npos)
        << after.last_snapshot_error;
    EXPECT_EQ(after.last_durable_generation, before.last_durable_generation)
        << "nothing was published";
    // The cut ended: the slots of jobs that finish are reused (three tables'
    // worth go through), and jobs still run.
    constexpr int kThrough = 3 * 4096;
    for (int i = 0; i < kThrough; ++i) {
      Result<JobId> id = e->submit(count, "after");
      while (!id.ok() && id.status().code() == StatusCode::kQueueFull) {
        std::this_thread::yield();
        id = e->submit(count, "after");
      }
      ASSERT_TRUE(id.ok()) << i << ": " << id.status().to_string();
    }
    ASSERT_TRUE(WaitUntil([&] { return ran.load() == kThrough; }));
    // With memory back, the next snapshot holds every parked job.
    auto info = e->snapshot_now();
    ASSERT_TRUE(info.ok()) << info.status().to_string();
    EXPECT_EQ(info->jobs, kParked);
    EXPECT_TRUE(e->health().last_snapshot_error.empty()) << e->health().last_snapshot_error;
    ASSERT_TRUE(e->stop(StopMode::kSnapshotAndExit).ok());
  }
  EXPECT_EQ(RecoveredDelayed(tmp.dir()), kParked);
}

// Memory that runs out after the segment published a snapshot, as the disk
// publish builds its paths, fails the disk store only: the segment's
// generation counts as published (health() names it), one failure is
// counted, not two, and the next snapshot reaches both stores. Before, the
// snapshot as a whole was failed and both stores were marked failed.
TEST(SnapshotOutOfMemoryTest, MemoryThatRunsOutAfterTheSegmentPublishedFailsOnlyTheDisk) {
  TempDir tmp;
  const std::string shm = "jobengine-oom-commit-" + std::to_string(::getpid());
  struct Unlink {
    std::string name;
    ~Unlink() { (void)::unlink(("/dev/shm/" + name).c_str()); }
  } unlink_at_end{shm};
  EngineOptions o = DiskOptions(tmp.dir(), milliseconds(0));
  o.snapshot.shm_name = shm;
  auto e = Engine::open(o);
  ASSERT_TRUE(e.ok()) << e.status().to_string();
  ASSERT_TRUE(e->register_handler("count", [](JobContext&) { return Outcome::kDone; }).ok());
  ASSERT_TRUE(e->start().ok());
  const HandlerId count = *e->handler_id("count");
  ASSERT_TRUE(e->submit(count, "later", {.delay = std::chrono::hours(1)}).ok());
  auto first = e->snapshot_now();
  ASSERT_TRUE(first.ok()) << first.status().to_string();
  const Health before = e->health();
  ASSERT_EQ(before.last_snapshot_generation, first->generation);
  // Every allocation of the snapshot thread fails from the segment's commit on.
  static constexpr void (*kFailFromHere)() = [] {
    g_failing_thread.store(static_cast<unsigned long>(::pthread_self()));
  };
  detail::g_after_shm_commit.store(kFailFromHere);
  auto failed = e->snapshot_now();
  detail::g_after_shm_commit.store(nullptr);
  g_failing_thread.store(0);
  ASSERT_FALSE(failed.ok()) << "the disk publish never ran out of memory";
  EXPECT_EQ(failed.status().code(), StatusCode::kInternal) << failed.status().to_string();
  const Health after = e->health();
  EXPECT_EQ(after.last_snapshot_generation, first->generation + 1)
      << "the segment's generation is published";
  EXPECT_EQ(after.last_durable_generation, first->generation);
  EXPECT_EQ(after.snapshot_failures, before.snapshot_failures + 1) << "the disk's failure only";
  // (No memory for more words than these on that thread.)
  EXPECT_NE(after.last_snapshot_error.find("out of memory"), std::string::npos)
      << after.last_snapshot_error;
  EXPECT_FALSE(after.ok);
  auto again = e->snapshot_now();
  ASSERT_TRUE(again.ok()) << again.status().to_string();
  EXPECT_EQ(again->generation, first->generation + 2);
  const Health last = e->health();
  EXPECT_EQ(last.last_durable_generation, again->generation);
  EXPECT_TRUE(last.last_snapshot_error.empty()) << last.last_snapshot_error;
  ASSERT_TRUE(e->stop(StopMode::kAbandon).ok());
}

TEST(SnapshotOutOfMemoryTest, PeriodicSnapshotsFailWithoutStoppingTheEngineAndResumeAfter) {
  TempDir tmp;
  std::size_t grown = 0;  // delayed jobs added below, beside the parked ones
  {
    std::atomic<int> ran{0};
    auto e = Engine::open(DiskOptions(tmp.dir(), milliseconds(5)));
    ASSERT_TRUE(e.ok()) << e.status().to_string();
    const std::vector<JobId> ids = ParkJobs(*e, ran);
    ASSERT_EQ(ids.size(), kParked);
    const HandlerId count = *e->handler_id("count");
    std::uint64_t failed_at = 0;
    // Delayed jobs with 32 KB payloads (heap blocks below kRefuseFrom) added
    // while allocations are refused: a periodic snapshot of the parked jobs
    // may have sized the encoder's buffer before the refusals began (seen
    // under qemu), and only a buffer that must grow asks for a large block.
    // 40 of them (1.3 MB) outgrow any buffer sized for the parked jobs
    // (< 600 KB), and still fit the scheduler's heap as sized for them.
    const std::string big(32 << 10, 'b');
    {
      LargeAllocationsFail refuse(kRefuseFrom);
      const std::uint64_t failures = e->health().snapshot_failures;
      // A change for each periodic snapshot to record, as each one fails.
      ASSERT_TRUE(WaitUntil([&] {
        if (grown < 40) {
          EXPECT_TRUE(e->submit(count, big, {.delay = std::chrono::hours(1)}).ok());
          ++grown;
        } else {
          EXPECT_TRUE(e->submit(count, "change").ok());
        }
        return e->health().snapshot_failures >= failures + 3;
      })) << "no periodic snapshot failed";
      EXPECT_EQ(e->health().state, EngineState::kRunning);
      failed_at = e->health().last_durable_generation;
    }
    ASSERT_TRUE(WaitUntil([&] {
      const Health h = e->health();
      return h.last_durable_generation > failed_at && h.last_snapshot_error.empty();
    })) << "periodic snapshots did not resume: " << e->health().last_snapshot_error;
    ASSERT_TRUE(e->stop(StopMode::kSnapshotAndExit).ok());
  }
  EXPECT_EQ(RecoveredDelayed(tmp.dir()), kParked + grown);
}

// Recovery at open(): the shared-memory segment holds a newer image than the
// disk (a process killed after its last disk snapshot), and copying it out
// of the segment runs out of memory (ShmStore::read_active()'s buffer). That
// says nothing of the image: open() must fail, naming the segment, rather
// than recover the older disk generation (the engine's next publishes would
// then overwrite the segment's newer image, and its jobs would be lost).
// Before, the segment was skipped like a corrupt one and the disk's
// generation, without the jobs, was loaded.
TEST(RecoveryOutOfMemoryTest, ASegmentImageThatCannotBeCopiedFailsOpenInsteadOfLoadingTheDisk) {
  constexpr std::size_t kJobs = 2000;
  const std::string payload(1024, 'p');  // ~2.3 MB of image
  constexpr std::size_t kImageRefuseFrom = 1 << 20;
  TempDir tmp;
  const std::string shm = "jobengine-oom-" + std::to_string(::getpid());
  struct Unlink {
    std::string name;
    ~Unlink() { (void)::unlink(("/dev/shm/" + name).c_str()); }
  } unlink_at_end{shm};
  EngineOptions o = DiskOptions(tmp.dir());
  o.snapshot.shm_name = shm;
  int ready[2];
  ASSERT_EQ(::pipe(ready), 0);
  const pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    ::close(ready[0]);
    EngineOptions co = o;
    co.snapshot.shm_interval = milliseconds(2);
    auto e = Engine::open(co);
    if (!e) ::_exit(2);
    auto h = e->register_handler("count", [](JobContext&) { return Outcome::kDone; });
    if (!h) ::_exit(3);
    if (!e->start()) ::_exit(4);
    if (!e->snapshot_now()) ::_exit(5);  // disk: no jobs yet
    const std::uint64_t after = e->health().last_snapshot_generation;
    for (std::size_t i = 0; i < kJobs; ++i) {
      if (!e->submit(*h, payload, {.delay = std::chrono::hours(1)})) ::_exit(6);
    }
    // The segment holds every job (a small /dev/shm that never takes the
    // image ends the child, which the parent reports).
    if (!WaitUntilTheSegmentIsCurrent(*e, after)) ::_exit(8);
    char c = 'r';
    if (::write(ready[1], &c, 1) != 1) ::_exit(7);
    for (;;) ::pause();
  }
  ASSERT_TRUE(KillChildOnceReady(child, ready));

  {
    LargeAllocationsFail refuse(kImageRefuseFrom);
    const std::uint64_t refused = g_refused.load();
    auto e = Engine::open(o);
    EXPECT_GT(g_refused.load(), refused) << "the segment's copy was never refused";
    ASSERT_FALSE(e.ok()) << "open() recovered the older disk generation past the segment";
    const std::string why = e.status().to_string();
    EXPECT_EQ(e.status().code(), StatusCode::kIoError) << why;
    EXPECT_NE(why.find("shm:" + shm), std::string::npos) << why;
    EXPECT_NE(why.find("out of memory"), std::string::npos) << why;
    EXPECT_NE(why.find("retry"), std::string::npos) << why;
    EXPECT_NE(why.find("/dev/shm/" + shm), std::string::npos) << why;
  }
  // With memory back, the segment's image (every job) is recovered.
  auto e = Engine::open(o);
  ASSERT_TRUE(e.ok()) << e.status().to_string();
  ASSERT_TRUE(e->register_handler("count", [](JobContext&) { return Outcome::kDone; }).ok());
  auto started = e->start();
  ASSERT_TRUE(started.ok()) << started.status().to_string();
  EXPECT_EQ(started->recovery.source, "shm:" + shm) << started->recovery.why;
  EXPECT_EQ(started->recovery.delayed, kJobs) << started->recovery.why;
  ASSERT_TRUE(e->stop(StopMode::kAbandon).ok());
}

// The scheduler's heap of delayed jobs grows as they are handed over; when it
// cannot, the hand-over waits (the jobs stay in the inbox) and is retried,
// and every job runs once memory is back. Before, the heap's growth threw out
// of the scheduler thread (std::terminate).
// The jobs must all be held at once, so none may fall due while they are
// submitted: the engine runs on a test clock (EngineOptions::test_clock),
// which only the test moves, once memory is back. (Due 300 ms after submit
// in real time, a submit loop slowed down by a sanitizer or an emulator saw
// the first jobs run, and the heap never grew that far.)
TEST(SchedulerOutOfMemoryTest, DelayedJobsWaitForMemoryAndAllRunOnceItIsBack) {
  EngineOptions o;
  o.workers = 1;
  o.capacity = 32768;
  auto clock = std::make_shared<ManualClock>();
  o.test_clock = clock;
  constexpr int kJobs = 20000;  // the heap (16 bytes a job) passes 200 KB at ~12,800
  constexpr auto kDelay = std::chrono::hours(1);
  std::atomic<int> ran{0};
  auto e = Engine::open(o);
  ASSERT_TRUE(e.ok()) << e.status().to_string();
  auto h = e->register_handler("count", [&ran](JobContext&) {
    ran.fetch_add(1);
    return Outcome::kDone;
  });
  ASSERT_TRUE(h.ok());
  ASSERT_TRUE(e->start().ok());
  int accepted = 0;
  {
    LargeAllocationsFail refuse(200 << 10);
    const std::uint64_t refused = g_refused_scheduler.load();
    for (int i = 0; i < kJobs && g_refused_scheduler.load() == refused; ++i) {
      // Each one due before the one before it wakes the scheduler, which
      // takes the inbox in each time, so that its heap is what runs out.
      const auto delay = kDelay + std::chrono::microseconds(10 * (kJobs - i));
      auto id = e->submit(*h, "later", {.delay = delay});
      if (id.ok()) {
        ++accepted;
      } else {
        // The inbox itself could not grow (the scheduler fell behind):
        // refused, not accepted.
        EXPECT_EQ(id.status().code(), StatusCode::kInternal) << id.status().to_string();
        std::this_thread::sleep_for(milliseconds(1));
      }
    }
    ASSERT_TRUE(WaitUntil([&] { return g_refused_scheduler.load() > refused; }))
        << "the scheduler's heap never needed a large block";
    std::this_thread::sleep_for(milliseconds(20));  // a few retries
    EXPECT_EQ(e->health().state, EngineState::kRunning);
  }
  ASSERT_GT(accepted, 12000);
  EXPECT_EQ(ran.load(), 0) << "a job ran before the test clock made it due";
  clock->advance(2 * kDelay);  // every job falls due
  ASSERT_TRUE(WaitUntil([&] { return ran.load() == accepted; }))
      << ran.load() << " of " << accepted << " ran";
  auto report = e->stop(StopMode::kDrain);
  ASSERT_TRUE(report.ok());
  EXPECT_EQ(report->done, static_cast<std::uint64_t>(accepted));
}

// start() with a snapshot to restore, its calling thread's allocations failed
// one after another (the Nth on the Nth round): each failure leaves the
// engine stopped, refuses a second start() and destroys cleanly; the
// snapshot stays, so the next engine restores every job, and the start()
// that gets past its allocations holds each job once. Before, a failure could
// escape start() with the engine still open (a second start() restored the
// snapshot's jobs again: each ran twice) or destroy a running worker's
// std::thread (std::terminate).
TEST(StartOutOfMemoryTest, EachAllocationOfStartCanFailAndNoJobRunsTwice) {
  TempDir tmp;
  constexpr std::size_t kJobs = 100;
  ASSERT_NO_FATAL_FAILURE(LeaveDelayedJobs(tmp.dir(), kJobs));
  int failed_starts = 0;
  for (long n = 0;; ++n) {
    ASSERT_LT(n, 20000) << "start() kept failing";
    std::atomic<int> ran{0};
    auto e = Engine::open(DiskOptions(tmp.dir(), milliseconds(0)));
    ASSERT_TRUE(e.ok()) << n << ": " << e.status().to_string();
    ASSERT_TRUE(e->register_handler("count", [&ran](JobContext&) {
                   ran.fetch_add(1);
                   return Outcome::kDone;
                 }).ok());
    Result<StartReport> started = Status(StatusCode::kInternal, "not run");
    try {
      t_fail_in = n;
      started = e->start();
    } catch (const std::exception& x) {
      t_fail_in = -1;
      FAIL() << "allocation " << n << ": start() threw " << x.what();
    }
    const bool met = t_fail_in < 0;
    t_fail_in = -1;
    if (!started.ok()) {
      ++failed_starts;
      EXPECT_TRUE(met) << n << ": " << started.status().to_string();
      EXPECT_EQ(e->state(), EngineState::kStopped) << n;
      EXPECT_EQ(e->start().status().code(), StatusCode::kFailedPrecondition) << n;
      EXPECT_EQ(ran.load(), 0) << n;
      // The stopped engine still reports (its per-handler counters may never
      // have been made: they were read through null pointers).
      EXPECT_NE(e->metrics_text().find("jobengine_"), std::string::npos) << n;
      EXPECT_FALSE(e->metrics_json().empty()) << n;
      continue;  // destroyed here: no thread may be left running
    }
    EXPECT_EQ(started->recovery.delayed, kJobs) << n;
    EXPECT_EQ(e->health().pending, kJobs) << n << ": a job restored twice, or lost";
    EXPECT_EQ(ran.load(), 0) << n;
    ASSERT_TRUE(e->stop(StopMode::kSnapshotAndExit).ok());
    if (!met) break;  // past start()'s last allocation on this thread
  }
  EXPECT_GT(failed_starts, 20);
}

// Each allocation of open() on the opening thread can fail: open() says so
// without throwing, and the snapshot it was reading is untouched. Running
// out while reading the snapshot is kInternal, not the capacity's
// kInvalidArgument (which every failure was, whatever had run out).
TEST(OpenOutOfMemoryTest, EachAllocationOfOpenCanFailAndTheSnapshotStays) {
  TempDir tmp;
  constexpr std::size_t kJobs = 50;
  ASSERT_NO_FATAL_FAILURE(LeaveDelayedJobs(tmp.dir(), kJobs));
  int capacity_failures = 0;
  int loading_failures = 0;
  for (long n = 0;; ++n) {
    ASSERT_LT(n, 20000) << "open() kept failing";
    Result<Engine> e = Status(StatusCode::kInternal, "not run");
    EngineOptions options = DiskOptions(tmp.dir(), milliseconds(0));
    try {
      t_fail_in = n;
      e = Engine::open(std::move(options));
    } catch (const std::exception& x) {
      t_fail_in = -1;
      FAIL() << "allocation " << n << ": open() threw " << x.what();
    }
    const bool met = t_fail_in < 0;
    t_fail_in = -1;
    if (!e.ok()) {
      EXPECT_TRUE(met) << n << ": " << e.status().to_string();
      const std::string text = e.status().to_string();
      if (text.find("capacity") != std::string::npos) {
        EXPECT_EQ(e.status().code(), StatusCode::kInvalidArgument) << n << ": " << text;
        ++capacity_failures;
      } else if (e.status().code() == StatusCode::kInternal) {
        ++loading_failures;
      }
      continue;
    }
    ASSERT_TRUE(e->register_handler("count", [](JobContext&) { return Outcome::kDone; }).ok());
    auto started = e->start();
    ASSERT_TRUE(started.ok()) << n << ": " << started.status().to_string();
    EXPECT_EQ(started->recovery.delayed, kJobs) << n << ": the snapshot lost jobs";
    ASSERT_TRUE(e->stop(StopMode::kSnapshotAndExit).ok());
    if (!met) break;  // past open()'s last allocation on this thread
  }
  EXPECT_GT(capacity_failures, 0);
  EXPECT_GT(loading_failures, 0) << "no failure while reading the snapshot said kInternal";
}

// A thread's first submit may adopt the producer state of a thread that
// exited (its cached free slots and ids with it). When recording it fails
// for want of memory, the submit says so (it threw before) and the state is
// not lost: every slot of the table is still there for the next submits.
TEST(SubmitOutOfMemoryTest, AFailedFirstSubmitLosesNoSlotOfAnAdoptedState) {
  EngineOptions o;
  o.workers = 1;
  o.capacity = 128;
  auto e = Engine::open(o);
  ASSERT_TRUE(e.ok()) << e.status().to_string();
  auto h = e->register_handler("count", [](JobContext&) { return Outcome::kDone; });
  ASSERT_TRUE(h.ok());
  ASSERT_TRUE(e->start().ok());
  const SubmitOptions later{.delay = std::chrono::hours(1)};  // stays pending
  std::thread([&] { ASSERT_TRUE(e->submit(*h, "a", later).ok()); }).join();
  std::size_t accepted = 1;
  std::thread([&] {
    Result<JobId> first = Status(StatusCode::kInternal, "not run");
    try {
      t_fail_in = 0;
      first = e->submit(*h, "b", later);
    } catch (const std::exception& x) {
      t_fail_in = -1;
      FAIL() << "submit() threw " << x.what();
    }
    t_fail_in = -1;
    EXPECT_EQ(first.status().code(), StatusCode::kInternal) << first.status().to_string();
    EXPECT_NE(first.status().to_string().find("out of memory"), std::string::npos);
    for (;;) {
      auto id = e->submit(*h, "c", later);
      if (!id.ok()) {
        EXPECT_EQ(id.status().code(), StatusCode::kQueueFull) << id.status().to_string();
        break;
      }
      ++accepted;
    }
  }).join();
  EXPECT_EQ(accepted, o.capacity) << "slots were lost with the adopted state";
  ASSERT_TRUE(e->stop(StopMode::kAbandon).ok());
}

// Longer than std::string's inline buffer, so that each copy of it (the
// context's, the dead letter's, the log line's) allocates; so do the
// handler's name and the payload.
constexpr std::string_view kDeclined =
    "the payment provider declined the charge: code 51, insufficient funds";
constexpr std::string_view kHandlerName = "charge-the-customer";
const std::string kChargePayload(64, 'p');

// Every allocation of the worker's failure path is made to fail in turn (the
// k-th one after the handler returns, on the worker thread): the process
// lives on, and the job is a dead letter exactly once, with its error text
// and payload. Through a log callback that copies its line, so that the log's
// allocations are reached too. Before, the first such failure ended the
// process. `thrown`: the handler throws instead of returning kFail.
void SweepFailurePath(bool thrown) {
  bool reached_the_end = false;
  long allocations = 0;
  for (long k = 0; k < 200 && !reached_the_end; ++k) {
    allocations = k;
    SCOPED_TRACE("allocation " + std::to_string(k) + " after the handler");
    std::atomic<std::uint64_t> lines{0};
    EngineOptions o;
    o.workers = 1;
    o.capacity = 64;
    o.log = [&lines](LogLevel, std::string_view line) {
      const std::string copy(line);
      lines.fetch_add(copy.empty() ? 0 : 1);
    };
    auto e = Engine::open(o);
    ASSERT_TRUE(e.ok()) << e.status().to_string();
    HandlerOptions one_attempt;
    one_attempt.max_attempts = 1;
    auto h = e->register_handler(
        kHandlerName,
        [k, thrown](JobContext& ctx) -> Outcome {
          if (thrown) {
            std::runtime_error boom{std::string(kDeclined)};
            t_fail_in = k;  // the throw allocates with malloc, not operator new
            throw boom;
          }
          ctx.set_error(kDeclined);
          t_fail_in = k;
          return Outcome::kFail;
        },
        one_attempt);
    ASSERT_TRUE(h.ok());
    ASSERT_TRUE(e->start().ok());
    const std::uint64_t refused_before = g_refused.load();
    auto id = e->submit(*h, kChargePayload);
    ASSERT_TRUE(id.ok()) << id.status().to_string();
    ASSERT_TRUE(WaitUntil([&] { return e->health().failed == 1; }))
        << "the job's failure was never recorded";
    // The countdown ran out on the worker only if the path made k+1
    // allocations; after the first k that did not, every one was reached.
    const std::uint64_t refused = g_refused.load() - refused_before;
    reached_the_end = refused == 0;
    const Health health = e->health();
    EXPECT_EQ(health.dead_total, 1u);
    EXPECT_EQ(health.dead, 1u);
    EXPECT_EQ(health.exceptions, thrown ? 1u : 0u);
    EXPECT_LE(health.memory_waits, refused) << "a wait for an allocation that did not fail";
    EXPECT_EQ(health.pending, 0u);
    const std::vector<DeadLetter> letters = e->dead_letters(10);
    ASSERT_EQ(letters.size(), 1u) << "the letter was kept twice, or lost";
    EXPECT_EQ(letters[0].id, *id);
    EXPECT_EQ(letters[0].handler, kHandlerName);
    EXPECT_EQ(letters[0].payload, kChargePayload);
    if (thrown) {
      // The message is lost only when the allocation that failed was its own.
      EXPECT_TRUE(letters[0].error == "handler threw: " + std::string(kDeclined) ||
                  letters[0].error == "handler threw (out of memory recording its message)")
          << letters[0].error;
    } else {
      EXPECT_EQ(letters[0].error, kDeclined);
    }
    auto stopped = e->stop(StopMode::kDrain);
    ASSERT_TRUE(stopped.ok()) << stopped.status().to_string();
    EXPECT_EQ(stopped->failed, 1u);
  }
  EXPECT_TRUE(reached_the_end) << "the failure path made more than 200 allocations";
  // Not vacuous: the log line, the letter's payload and handler name at least.
  EXPECT_GE(allocations, 3) << "the failure path made almost no allocation: what did it sweep?";
}

TEST(WorkerOutOfMemoryTest, EachAllocationRecordingAFailedJobCanFailAndItsLetterIsKeptOnce) {
  SweepFailurePath(/*thrown=*/false);
}

TEST(WorkerOutOfMemoryTest, EachAllocationRecordingAnExceptionCanFailAndItsLetterIsKeptOnce) {
  SweepFailurePath(/*thrown=*/true);
}

// One worker, 64 slots, on top of `o`.
EngineOptions OneWorker(EngineOptions o = {}) {
  o.workers = 1;
  o.capacity = 64;
  return o;
}

// An engine with one worker and a handler kHandlerName that fails its job
// (kFail, error kDeclined) and then fails every allocation of the worker
// thread, until g_failing_thread is cleared (by the test, or at the end).
struct WaitingWorker {
  explicit WaitingWorker(EngineOptions o = {}) {
    auto opened = Engine::open(OneWorker(std::move(o)));
    EXPECT_TRUE(opened.ok()) << opened.status().to_string();
    if (!opened.ok()) return;
    engine.emplace(std::move(*opened));
    auto h = engine->register_handler(kHandlerName, [](JobContext& ctx) {
      ctx.set_error(kDeclined);
      g_failing_thread.store(static_cast<unsigned long>(::pthread_self()));
      return Outcome::kFail;
    });
    EXPECT_TRUE(h.ok());
    if (!h.ok()) return;
    failing = *h;
    EXPECT_TRUE(engine->start().ok());
  }
  ~WaitingWorker() { g_failing_thread.store(0); }
  // Submits the failing job and waits until the worker has waited for
  // memory `waits` times.
  JobId submit_and_wait(std::uint64_t waits = 2) {
    auto id = engine->submit(failing, kChargePayload);
    EXPECT_TRUE(id.ok()) << id.status().to_string();
    EXPECT_TRUE(WaitUntil([&] { return engine->health().memory_waits >= waits; }))
        << "the worker did not wait for memory";
    return id.ok() ? *id : 0;
  }
  std::optional<Engine> engine;
  HandlerId failing = 0;
};

// Memory stays out on the worker: it waits (health says so, naming the job),
// the job stays pending, and the letter goes in once memory is back.
TEST(WorkerOutOfMemoryTest, AWorkerWaitsForMemoryAndHealthSaysSo) {
  WaitingWorker ww;
  ASSERT_TRUE(ww.engine.has_value());
  const JobId id = ww.submit_and_wait(3);
  const Health during = ww.engine->health();
  g_failing_thread.store(0);
  EXPECT_FALSE(during.ok);
  EXPECT_EQ(during.pending, 1u);
  EXPECT_EQ(during.failed, 0u);
  EXPECT_EQ(during.dead, 0u);
  const std::string want = "waiting for it; job " + std::to_string(id);
  const auto names_the_job = [&want](const Health& h) {
    return std::any_of(h.reasons.begin(), h.reasons.end(),
                       [&](const std::string& r) { return r.find(want) != std::string::npos; });
  };
  EXPECT_TRUE(names_the_job(during)) << "no reason names the waiting job";
  ASSERT_TRUE(WaitUntil([&] { return ww.engine->health().failed == 1; }));
  // The reason goes once the worker is past the letter (just after the count).
  EXPECT_TRUE(WaitUntil([&] { return !names_the_job(ww.engine->health()); }))
      << "health still names the job once its letter is in";
  EXPECT_EQ(ww.engine->health().dead, 1u);
  const std::vector<DeadLetter> letters = ww.engine->dead_letters(10);
  ASSERT_EQ(letters.size(), 1u);
  EXPECT_EQ(letters[0].error, kDeclined);
  ASSERT_TRUE(ww.engine->stop(StopMode::kDrain).ok());
}

// stop(kSnapshotAndExit) does not wait for memory: the job the worker could
// not record stays in the final snapshot and runs after a restart (pending:
// a graceful exit interrupted it, no crash, so it gets no recovery).
TEST(WorkerOutOfMemoryTest, SnapshotAndExitKeepsTheJobAWorkerCouldNotRecord) {
  TempDir tmp;
  JobId id = 0;
  {
    WaitingWorker ww(DiskOptions(tmp.dir()));
    ASSERT_TRUE(ww.engine.has_value());
    id = ww.submit_and_wait(1);
    auto stopped = ww.engine->stop(StopMode::kSnapshotAndExit);
    g_failing_thread.store(0);
    ASSERT_TRUE(stopped.ok()) << stopped.status().to_string();
    EXPECT_EQ(stopped->left_in_snapshot, 1u);
    EXPECT_EQ(stopped->failed, 0u);
  }
  auto e = Engine::open(DiskOptions(tmp.dir()));
  ASSERT_TRUE(e.ok()) << e.status().to_string();
  std::atomic<JobId> ran{0};
  ASSERT_TRUE(e->register_handler(kHandlerName, [&ran](JobContext& ctx) {
                 ran.store(ctx.id());
                 return Outcome::kDone;
               }).ok());
  auto started = e->start();
  ASSERT_TRUE(started.ok()) << started.status().to_string();
  EXPECT_EQ(started->recovery.running_at_cut, 0u);
  EXPECT_EQ(started->recovery.pending, 1u);
  ASSERT_TRUE(WaitUntil([&] { return ran.load() == id; })) << "the job did not run again";
  ASSERT_TRUE(e->stop(StopMode::kDrain).ok());
}

// The same sweep with `earlier` letters in already and max_dead 2, so that
// it also reaches the letters' deque growing and a letter discarded for room
// (and that discard's log line): the letters and counters come out as
// without failures.
TEST(WorkerOutOfMemoryTest, EachAllocationRecordingALetterPastMaxDeadCanFail) {
  for (int earlier = 0; earlier < 8; ++earlier) {
    bool reached_the_end = false;
    long allocations = 0;
    for (long k = 0; k < 200 && !reached_the_end; ++k) {
      allocations = k;
      SCOPED_TRACE(std::to_string(earlier) + " letters before, allocation " + std::to_string(k));
      EngineOptions o;
      o.workers = 1;
      o.capacity = 64;
      o.max_dead = 2;
      o.log = [](LogLevel, std::string_view line) { const std::string copy(line); };
      auto e = Engine::open(o);
      ASSERT_TRUE(e.ok()) << e.status().to_string();
      std::atomic<int> runs{0};
      auto h = e->register_handler(kHandlerName, [&runs, earlier, k](JobContext& ctx) {
        ctx.set_error(kDeclined);
        if (runs.fetch_add(1) == earlier) t_fail_in = k;
        return Outcome::kFail;
      });
      ASSERT_TRUE(h.ok());
      ASSERT_TRUE(e->start().ok());
      const std::uint64_t refused_before = g_refused.load();
      for (int i = 0; i <= earlier; ++i) {
        ASSERT_TRUE(e->submit(*h, kChargePayload).ok());
        ASSERT_TRUE(WaitUntil([&] { return e->health().failed == static_cast<std::uint64_t>(i + 1); }));
      }
      reached_the_end = g_refused.load() == refused_before;
      const Health health = e->health();
      const std::uint64_t jobs = static_cast<std::uint64_t>(earlier) + 1;
      EXPECT_EQ(health.dead, std::min<std::uint64_t>(jobs, 2));
      EXPECT_EQ(health.dead_total, jobs);
      EXPECT_EQ(health.dead_discarded, jobs > 2 ? jobs - 2 : 0);
      EXPECT_EQ(e->dead_letters(10).size(), std::min<std::uint64_t>(jobs, 2));
      ASSERT_TRUE(e->stop(StopMode::kDrain).ok());
    }
    EXPECT_TRUE(reached_the_end);
    EXPECT_GE(allocations, 3) << "no allocation of the path was reached";
  }
}

// The job's unique key stays its own while the worker waits: a submit with
// the key gets the pending job's id, not a second job. Once the letter is in,
// the key is free again. Only the letter's copy of the 1 MiB payload fails
// (the last allocation of the path): the key was released before it, so a
// second job with the key was accepted, and both ran after a crash.
TEST(WorkerOutOfMemoryTest, AWaitingJobKeepsItsUniqueKey) {
  constexpr std::size_t kBig = std::size_t{1} << 20;
  auto e = Engine::open(OneWorker());
  ASSERT_TRUE(e.ok()) << e.status().to_string();
  auto h = e->register_handler(kHandlerName, [](JobContext& ctx) {
    ctx.set_error(kDeclined);
    g_fail_at_or_above.store(kBig);
    return Outcome::kFail;
  });
  auto other = e->register_handler("other", [](JobContext&) { return Outcome::kDone; });
  ASSERT_TRUE(h.ok() && other.ok());
  ASSERT_TRUE(e->start().ok());
  SubmitOptions keyed;
  keyed.unique_key = "order-42";
  auto first = e->submit(*h, std::string(kBig, 'p'), keyed);
  ASSERT_TRUE(first.ok()) << first.status().to_string();
  const bool waited = WaitUntil([&] { return e->health().memory_waits >= 2; });
  auto again = e->submit(*other, "x", keyed);
  g_fail_at_or_above.store(std::numeric_limits<std::size_t>::max());
  ASSERT_TRUE(waited) << "the worker did not wait for memory";
  ASSERT_TRUE(again.ok()) << again.status().to_string();
  EXPECT_EQ(*again, *first) << "a second job with the key was accepted while the first is pending";
  ASSERT_TRUE(WaitUntil([&] { return e->health().failed == 1; }));
  auto after = e->submit(*other, "x", keyed);
  ASSERT_TRUE(after.ok()) << after.status().to_string();
  EXPECT_NE(*after, *first) << "the key was not released with the letter";
  const std::vector<DeadLetter> letters = e->dead_letters(10);
  ASSERT_EQ(letters.size(), 1u);
  EXPECT_EQ(letters[0].payload.size(), kBig);
  ASSERT_TRUE(e->stop(StopMode::kDrain).ok());
}

// cancel() while the worker waits ends the job as cancelled (as one cancelled
// while it runs), without memory: no letter, nothing failed.
TEST(WorkerOutOfMemoryTest, ACancelEndsTheWaitWithoutMemory) {
  WaitingWorker ww;
  ASSERT_TRUE(ww.engine.has_value());
  const JobId id = ww.submit_and_wait();
  auto c = ww.engine->cancel(id);
  ASSERT_TRUE(c.ok()) << c.status().to_string();
  EXPECT_EQ(*c, CancelResult::kCancelRequested);
  EXPECT_TRUE(WaitUntil([&] { return ww.engine->health().cancelled == 1; }))
      << "the waiting worker did not see the cancel";
  const Health h = ww.engine->health();
  EXPECT_EQ(h.failed, 0u);
  EXPECT_EQ(h.dead, 0u);
  EXPECT_EQ(h.pending, 0u);
  g_failing_thread.store(0);
  ASSERT_TRUE(ww.engine->stop(StopMode::kDrain).ok());
}

// A retry the worker has no memory to hand on (the scheduler's inbox cannot
// grow, though the letter could be made), which a cancel() reaches just after
// the worker marked it waiting: cancel() reads kWaitingRetry and answers
// kCancelled, so the job ends cancelled, as it said. Before, it was dead-lettered as failed ("out of
// memory re-queueing a retry"), where requeue_dead() could run it again.
std::atomic<JobId> g_marked{0};
std::atomic<bool> g_cancel_done{false};
TEST(WorkerOutOfMemoryTest, ACancelOfARetryThatCannotBeHandedOnIsKept) {
  auto e = Engine::open(OneWorker());
  ASSERT_TRUE(e.ok()) << e.status().to_string();
  auto h = e->register_handler(kHandlerName, [](JobContext& ctx) {
    ctx.retry_after(std::chrono::hours(1));  // through the scheduler's inbox
    return Outcome::kRetry;
  });
  ASSERT_TRUE(h.ok());
  ASSERT_TRUE(e->start().ok());
  g_marked.store(0);
  g_cancel_done.store(false);
  // On the worker, allocating nothing: waits for the test's cancel(), then
  // fails the worker's next allocation, the inbox's (only that one: the
  // letter's would have memory).
  detail::g_retry_marked.store(+[](JobId id) {
    g_marked.store(id);
    while (!g_cancel_done.load()) std::this_thread::yield();
    t_fail_in = 0;
  });
  const std::uint64_t refused_before = g_refused.load();
  auto id = e->submit(*h, kChargePayload);
  ASSERT_TRUE(id.ok()) << id.status().to_string();
  const bool marked = WaitUntil([&] { return g_marked.load() == *id; });
  auto c = marked ? e->cancel(*id) : Result<CancelResult>(Status(StatusCode::kInternal, "unmarked"));
  g_cancel_done.store(true);
  ASSERT_TRUE(marked) << "the worker never marked the retry";
  ASSERT_TRUE(c.ok()) << c.status().to_string();
  EXPECT_EQ(*c, CancelResult::kCancelled);
  EXPECT_TRUE(WaitUntil([&] { return e->health().pending == 0; })) << "the job did not end";
  detail::g_retry_marked.store(nullptr);
  EXPECT_GT(g_refused.load(), refused_before) << "the hand-on did not run out of memory";
  const Health health = e->health();
  EXPECT_EQ(health.cancelled, 1u);
  EXPECT_EQ(health.failed, 0u);
  EXPECT_EQ(health.dead_total, 0u);
  EXPECT_TRUE(e->dead_letters(10).empty());
  // Asked again, the answer stays kCancelled (the slot says so), or the job is gone.
  auto again = e->cancel(*id);
  EXPECT_TRUE(again.ok() ? *again == CancelResult::kCancelled
                         : again.status().code() == StatusCode::kNotFound);
  auto stopped = e->stop(StopMode::kDrain);
  ASSERT_TRUE(stopped.ok()) << stopped.status().to_string();
  EXPECT_EQ(stopped->cancelled, 1u);
  EXPECT_EQ(stopped->failed, 0u);
}

// stop(kAbandon) ends the wait without memory: the job counts as dropped.
TEST(WorkerOutOfMemoryTest, StopAbandonEndsTheWaitAndCountsTheJobDropped) {
  WaitingWorker ww;
  ASSERT_TRUE(ww.engine.has_value());
  ww.submit_and_wait();
  auto stopped = ww.engine->stop(StopMode::kAbandon);
  g_failing_thread.store(0);
  ASSERT_TRUE(stopped.ok()) << stopped.status().to_string();
  EXPECT_EQ(stopped->dropped, 1u);
  EXPECT_EQ(stopped->failed, 0u);
  EXPECT_EQ(stopped->submitted, 1u);
}

// With max_dead 0 no letter is kept, so none is made: a failure needs no
// memory, and the worker does not wait.
TEST(WorkerOutOfMemoryTest, WithMaxDeadZeroAFailureNeedsNoMemory) {
  EngineOptions o;
  o.max_dead = 0;
  WaitingWorker ww(o);
  ASSERT_TRUE(ww.engine.has_value());
  ASSERT_TRUE(ww.engine->submit(ww.failing, kChargePayload).ok());
  ASSERT_TRUE(WaitUntil([&] { return ww.engine->health().failed == 1; }));
  const Health h = ww.engine->health();
  g_failing_thread.store(0);
  EXPECT_EQ(h.memory_waits, 0u);
  EXPECT_EQ(h.dead_total, 1u);
  EXPECT_EQ(h.dead_discarded, 1u);
  ASSERT_TRUE(ww.engine->stop(StopMode::kDrain).ok());
}

}  // namespace
}  // namespace jobengine
