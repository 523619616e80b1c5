// The periodic snapshots' schedule: a snapshot that would record nothing new
// is skipped (an idle engine writes none, yet health() says its snapshots are
// current), and every kind of change is in the next one. A kind of change the
// engine forgot to count (CutSource::change_count()) fails here: the images
// would stop following the engine once it settled.
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <unistd.h>

#include <atomic>
#include <csignal>
#include <chrono>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <utility>

#include "engine/test_hooks.h"  // g_before_batch
#include "jobengine/engine.h"
#include "jobengine/snapshot_format.h"
#include "jobengine/snapshot_tools.h"
#include "tests/engine/test_support.h"

namespace jobengine {
namespace {

using std::chrono::milliseconds;
using std::chrono::steady_clock;

using testing_support::Gate;
using testing_support::GateOpener;
using testing_support::WaitUntil;
constexpr milliseconds kWait = testing_support::kWaitTimeout;

struct Shm {
  std::string name = "jobengine-sched-" + std::to_string(::getpid());
  ~Shm() { ::shm_unlink(("/" + name).c_str()); }
};

EngineOptions ShmOptions(const std::string& shm_name) {
  EngineOptions o;
  o.workers = 1;
  o.capacity = 1024;
  o.idle = IdleStrategy::kSpinThenBlock;
  o.spin_iterations = 64;
  o.snapshot.enabled = true;
  o.snapshot.shm_name = shm_name;
  o.snapshot.shm_interval = milliseconds(2);
  o.snapshot.disk_interval = milliseconds(0);
  o.snapshot.exit_deadline = milliseconds(50);
  return o;
}

// Waits until the snapshots have settled: a few periodic checks in a row
// found nothing new while the generation stayed put. Returns that generation.
std::uint64_t Settle(Engine& e) {
  const auto deadline = steady_clock::now() + kWait;
  for (;;) {
    const Health before = e.health();
    EXPECT_TRUE(WaitUntil([&] {
      return e.health().snapshots_unchanged >= before.snapshots_unchanged + 3;
    }));
    if (e.health().last_snapshot_generation == before.last_snapshot_generation ||
        steady_clock::now() > deadline) {
      return before.last_snapshot_generation;
    }
  }
}

// The job `id` in the segment's image, if it is there.
std::optional<snapshot::JobRecordView> InImage(const std::string& shm_name, JobId id) {
  auto image = snapshot_tools::load_shm(shm_name);
  if (!image.ok()) return std::nullopt;
  for (const auto& j : image->view.jobs) {
    if (j.id == id) return j;
  }
  return std::nullopt;
}

// Waits until the segment's image shows job `id` as `pred` wants it (nullopt:
// not there). A change the engine did not count never reaches an image while
// nothing else changes: this then times out.
template <typename Pred>
::testing::AssertionResult ImageShows(const std::string& shm_name, JobId id, Pred pred,
                                      const char* what) {
  if (WaitUntil([&] { return pred(InImage(shm_name, id)); })) {
    return ::testing::AssertionSuccess();
  }
  return ::testing::AssertionFailure() << "job " << id << ": no snapshot shows " << what;
}

auto InState(snapshot::JobState state) {
  return [state](const std::optional<snapshot::JobRecordView>& r) {
    return r.has_value() && r->state == state;
  };
}
bool Gone(const std::optional<snapshot::JobRecordView>& r) { return !r.has_value(); }

TEST(SnapshotScheduleTest, AnIdleEngineWritesNoSnapshotsAndItsSnapshotsStayCurrent) {
  Shm shm;
  auto e = Engine::open(ShmOptions(shm.name));
  ASSERT_TRUE(e.ok()) << e.status().to_string();
  std::atomic<int> ran{0};
  auto h = e->register_handler("w", [&](JobContext&) {
    ran.fetch_add(1);
    return Outcome::kDone;
  });
  ASSERT_TRUE(h.ok());
  ASSERT_TRUE(e->start().ok());
  ASSERT_TRUE(e->submit(*h, "x").ok());
  ASSERT_TRUE(WaitUntil([&] { return ran.load() == 1; }));
  const std::uint64_t generation = Settle(*e);
  ASSERT_GE(generation, 1u);
  const std::uint64_t unchanged = e->health().snapshots_unchanged;

  // 50 periodic checks (~100 ms at 2 ms; however long a loaded machine
  // takes): each found nothing new, so none wrote. A check that wrote would
  // not count, and an engine that never skipped times out here.
  ASSERT_TRUE(WaitUntil([&] { return e->health().snapshots_unchanged >= unchanged + 50; }))
      << "the idle engine made " << e->health().snapshots_unchanged - unchanged
      << " checks that found nothing new in " << kWait.count() << " ms";
  // Not skipped, they were 50 snapshots; at most one was written (should the
  // worker's count of the job's end have come after Settle() on a loaded
  // machine).
  EXPECT_LE(e->health().last_snapshot_generation, generation + 1) << "an idle engine kept writing";

  // The snapshot it has is current: its age restarts at every check, so
  // health() does not call an idle engine's snapshots stale. Two checks
  // after `since`: the second began (and took its time) after the first
  // was counted, so after `since`; the age health() reports then is at most
  // the time since `since`, however the threads were scheduled.
  const auto since = steady_clock::now();
  const std::uint64_t checks = e->health().snapshots_unchanged;
  ASSERT_TRUE(WaitUntil([&] { return e->health().snapshots_unchanged >= checks + 2; }));
  const Health idle = e->health();
  const auto bound = steady_clock::now() - since;
  EXPECT_LE(idle.last_snapshot_age, bound)
      << idle.last_snapshot_age.count() << " ns old, yet a check ended less than "
      << std::chrono::nanoseconds(bound).count() << " ns ago";
  // Not stale (older than 2 * shm_interval + 1 s) unless the wait itself
  // took that long.
  if (bound < milliseconds(1000)) {
    EXPECT_TRUE(idle.ok) << (idle.reasons.empty() ? "" : idle.reasons.front());
  }
  EXPECT_LE(idle.last_snapshot_generation, generation + 1) << "an idle engine kept writing";
  EXPECT_NE(e->metrics_text().find("jobengine_snapshot_unchanged_total"), std::string::npos);

  // The next change is in the next snapshot.
  ASSERT_TRUE(e->submit(*h, "y").ok());
  ASSERT_TRUE(WaitUntil([&] {
    return e->health().last_snapshot_generation > idle.last_snapshot_generation;
  }));
  ASSERT_TRUE(e->stop(StopMode::kDrain).ok());
  EXPECT_EQ(ran.load(), 2);
}

// Holds a worker between dequeuing a batch and marking its jobs running
// (detail::g_before_batch) while it lives; lets go and uninstalls the hook
// when it goes, also when an assertion returns early (the worker would
// otherwise spin in the hook and stop() would wait for it forever).
class HoldNextBatch {
 public:
  HoldNextBatch() {
    hold_.store(true);
    held_.store(false);
    detail::g_before_batch.store(+[](JobId) {
      held_.store(true);
      while (hold_.load()) std::this_thread::sleep_for(milliseconds(1));
    });
  }
  ~HoldNextBatch() { release(); }
  HoldNextBatch(const HoldNextBatch&) = delete;
  HoldNextBatch& operator=(const HoldNextBatch&) = delete;
  bool held() const { return held_.load(); }
  void release() {
    detail::g_before_batch.store(nullptr);
    hold_.store(false);
  }

 private:
  static inline std::atomic<bool> hold_{false};
  static inline std::atomic<bool> held_{false};
};

// Each kind of change, made while nothing else changes, reaches an image:
// accepted, started, cancelled, finished (the last job of its batch too),
// fired by the scheduler (a delay, a retry's backoff), a dead letter added
// and dropped. Each wait polls the image itself, so a slow machine only
// makes it wait longer; a kind the engine did not count times it out.
TEST(SnapshotScheduleTest, EveryKindOfChangeReachesTheNextSnapshot) {
  Shm shm;
  Gate first_gate;
  Gate delayed_gate;
  std::atomic<int> retry_runs{0};
  auto e = Engine::open(ShmOptions(shm.name));
  ASSERT_TRUE(e.ok()) << e.status().to_string();
  // Opened before the engine's destructor drains, also after a failed assertion.
  GateOpener open_first(first_gate);
  GateOpener open_delayed(delayed_gate);
  auto blocker = e->register_handler("blocker", [&](JobContext&) {
    first_gate.wait();
    return Outcome::kDone;
  });
  auto later = e->register_handler("later", [&](JobContext&) {
    delayed_gate.wait();
    return Outcome::kDone;
  });
  auto plain = e->register_handler("plain", [](JobContext&) { return Outcome::kDone; });
  HandlerOptions once;
  once.max_attempts = 1;
  auto failing = e->register_handler("failing", [](JobContext&) { return Outcome::kFail; }, once);
  // Delays long enough that a loaded machine still sees the jobs wait.
  constexpr milliseconds kWhile{2000};
  HandlerOptions backoff;
  backoff.max_attempts = 2;
  backoff.has_retry_policy = true;
  backoff.retry.initial_backoff = kWhile;
  backoff.retry.jitter = 0;
  auto retrying = e->register_handler("retrying", [&](JobContext&) {
    return retry_runs.fetch_add(1) == 0 ? Outcome::kRetry : Outcome::kDone;
  }, backoff);
  ASSERT_TRUE(blocker.ok() && later.ok() && plain.ok() && failing.ok() && retrying.ok());
  ASSERT_TRUE(e->start().ok());
  (void)Settle(*e);

  // Accepted; the worker that dequeued it waits before it marks it running,
  // so the start is a change of its own.
  JobId running = 0;
  {
    HoldNextBatch hold;
    auto id = e->submit(*blocker, "a");
    ASSERT_TRUE(id.ok());
    running = *id;
    ASSERT_TRUE(WaitUntil([&] { return hold.held(); }));
    ASSERT_TRUE(ImageShows(shm.name, running, InState(snapshot::JobState::kPending), "accepted"));
  }
  // Started: the worker holds it in the handler.
  ASSERT_TRUE(ImageShows(shm.name, running, InState(snapshot::JobState::kRunningAtCut), "started"));

  // Accepted behind it (one worker): pending. Then cancelled: marked.
  auto queued = e->submit(*plain, "b");
  ASSERT_TRUE(queued.ok());
  ASSERT_TRUE(ImageShows(shm.name, *queued, InState(snapshot::JobState::kPending), "queued"));
  auto cancelled = e->cancel(*queued);
  ASSERT_TRUE(cancelled.ok());
  EXPECT_EQ(*cancelled, CancelResult::kCancelled);
  ASSERT_TRUE(ImageShows(shm.name, *queued, [](const std::optional<snapshot::JobRecordView>& r) {
    return r.has_value() && r->cancel_requested;
  }, "cancel requested"));

  // Finished; the cancelled one, in the worker's next batch, is held there
  // so that its drop (the job marked running, its bit seen, retired: no run
  // to count) is a change of its own, which only the count after each batch
  // covers.
  {
    HoldNextBatch hold;
    first_gate.open();
    ASSERT_TRUE(ImageShows(shm.name, running, Gone, "finished"));
    ASSERT_TRUE(WaitUntil([&] { return hold.held(); }));
    ASSERT_TRUE(InImage(shm.name, *queued).has_value());
  }
  ASSERT_TRUE(ImageShows(shm.name, *queued, Gone, "cancelled and dropped"));

  // Delayed, then fired by the scheduler and started; then finished, the
  // last job of its batch with nothing after it.
  SubmitOptions in_a_while;
  in_a_while.delay = kWhile;
  auto delayed = e->submit(*later, "c", in_a_while);
  ASSERT_TRUE(delayed.ok());
  ASSERT_TRUE(ImageShows(shm.name, *delayed, InState(snapshot::JobState::kDelayed), "delayed"));
  ASSERT_TRUE(ImageShows(shm.name, *delayed, InState(snapshot::JobState::kRunningAtCut),
                         "fired and started"));
  delayed_gate.open();
  ASSERT_TRUE(ImageShows(shm.name, *delayed, Gone, "finished last in its batch"));

  // A retry's backoff in the scheduler, then its second run finishes it.
  auto retried = e->submit(*retrying, "d");
  ASSERT_TRUE(retried.ok());
  ASSERT_TRUE(ImageShows(shm.name, *retried, [](const std::optional<snapshot::JobRecordView>& r) {
    return r.has_value() && r->state == snapshot::JobState::kWaitingRetry && r->attempts == 1;
  }, "waiting to retry after one attempt"));
  ASSERT_TRUE(ImageShows(shm.name, *retried, Gone, "retried and finished"));
  EXPECT_EQ(retry_runs.load(), 2);

  // A dead letter, then dropped.
  auto dead = e->submit(*failing, "e");
  ASSERT_TRUE(dead.ok());
  ASSERT_TRUE(ImageShows(shm.name, *dead, InState(snapshot::JobState::kDead), "dead"));
  ASSERT_TRUE(e->drop_dead(*dead).ok());
  ASSERT_TRUE(ImageShows(shm.name, *dead, Gone, "dropped from the dead letters"));

  ASSERT_TRUE(e->stop(StopMode::kDrain).ok());
}

// A cut reads only the regions of the table with slots out of the pool
// (JobTable::for_each_scan_range). After a burst that went through the whole
// table and drained, the slots free again are spread over it, so the next jobs
// land anywhere; every one of them is in the next snapshot, and no job that
// ended is.
TEST(SnapshotScheduleTest, AfterABurstEveryPendingJobIsInTheSnapshotWhereverItsSlotIs) {
  Shm shm;
  EngineOptions o = ShmOptions(shm.name);
  o.capacity = 8192;
  auto e = Engine::open(o);
  ASSERT_TRUE(e.ok()) << e.status().to_string();
  Gate gate;
  GateOpener opener(gate);
  std::atomic<int> ran{0};
  auto block = e->register_handler("block", [&](JobContext&) {
    gate.wait();
    return Outcome::kDone;
  });
  auto count = e->register_handler("count", [&](JobContext&) {
    ran.fetch_add(1);
    return Outcome::kDone;
  });
  ASSERT_TRUE(block.ok());
  ASSERT_TRUE(count.ok());
  ASSERT_TRUE(e->start().ok());
  // The burst: behind a blocked worker, from two threads, nearly the table.
  ASSERT_TRUE(e->submit(*block, "").ok());
  constexpr int kBurstPerThread = 3900;
  std::thread other([&] {
    for (int i = 0; i < kBurstPerThread; ++i) ASSERT_TRUE(e->submit(*count, "burst").ok());
  });
  for (int i = 0; i < kBurstPerThread; ++i) ASSERT_TRUE(e->submit(*count, "burst").ok());
  other.join();
  gate.open();
  ASSERT_TRUE(WaitUntil([&] { return ran.load() == 2 * kBurstPerThread; }));
  // Jobs parked an hour out, from this thread and a new one: their slots
  // come from wherever the burst's were freed.
  std::set<JobId> parked;
  std::mutex mu;
  const auto park = [&](int n) {
    for (int i = 0; i < n; ++i) {
      auto id = e->submit(*count, "parked", {.delay = std::chrono::hours(1)});
      ASSERT_TRUE(id.ok()) << id.status().to_string();
      std::lock_guard<std::mutex> lock(mu);
      parked.insert(*id);
    }
  };
  std::thread late([&] { park(150); });
  park(150);
  late.join();
  ASSERT_EQ(parked.size(), 300u);
  std::set<JobId> in_image;
  ASSERT_TRUE(WaitUntil([&] {
    auto image = snapshot_tools::load_shm(shm.name);
    if (!image.ok()) return false;
    in_image.clear();
    for (const auto& j : image->view.jobs) in_image.insert(j.id);
    return in_image == parked;
  })) << "the image holds " << in_image.size() << " jobs, " << parked.size() << " are pending";
  ASSERT_TRUE(e->stop(StopMode::kAbandon).ok());
}

// A period must be 0..24 h: milliseconds::max() overflowed `now + interval`
// in the snapshot thread (the snapshots then ran back to back) and
// `2 * interval` in health(); each is refused naming the option and value.
TEST(SnapshotScheduleTest, ASegmentThatKeepsFailingIsRetriedLessAndLessOften) {
  // The segment cannot grow for the image (here RLIMIT_FSIZE; a full
  // /dev/shm alike): every periodic snapshot fails there. Each try encodes
  // every job and logs an error; at shm_interval 1 ms an idle engine tried
  // ~a thousand times a second. Now the period doubles (capped at 1 s).
  Shm shm;
  EngineOptions o = ShmOptions(shm.name);
  o.snapshot.shm_interval = milliseconds(1);
  auto e = Engine::open(o);
  ASSERT_TRUE(e.ok()) << e.status().to_string();
  Gate gate;
  GateOpener opener(gate);
  auto h = e->register_handler("w", [&](JobContext&) {
    gate.wait();
    return Outcome::kDone;
  });
  ASSERT_TRUE(h.ok());
  ASSERT_TRUE(e->start().ok());
  Settle(*e);  // a small image in the segment
  // The limit first, so that no snapshot can take the large image before it.
  struct rlimit old {};
  ASSERT_EQ(::getrlimit(RLIMIT_FSIZE, &old), 0);
  struct rlimit limit = old;
  limit.rlim_cur = std::size_t{2200} << 10;  // the segment is ~2 MiB
  void (*old_handler)(int) = ::signal(SIGXFSZ, SIG_IGN);
  ASSERT_EQ(::setrlimit(RLIMIT_FSIZE, &limit), 0);
  const std::uint64_t failures_before = e->health().snapshot_failures;
  const std::string payload(8000, 'p');  // ~1.2 MB: more than the segment's slot holds
  for (int i = 0; i < 150; ++i) ASSERT_TRUE(e->submit(*h, payload).ok());
  std::this_thread::sleep_for(milliseconds(600));
  const Health during = e->health();
  ::setrlimit(RLIMIT_FSIZE, &old);
  ::signal(SIGXFSZ, old_handler);
  const std::uint64_t failed = during.snapshot_failures - failures_before;
  EXPECT_GE(failed, 3u) << during.last_snapshot_error;
  // 1, 2, 4, ... 512 ms: at most ~10 tries in 600 ms (a few more for a slow machine).
  EXPECT_LE(failed, 16u) << "the failing segment was retried every shm_interval";
  // Room again: it is retried (within the 1 s cap) and succeeds.
  EXPECT_TRUE(WaitUntil([&] { return e->health().last_snapshot_error.empty(); }))
      << e->health().last_snapshot_error;
  gate.open();
  ASSERT_TRUE(e->stop(StopMode::kDrain).ok());
}

TEST(SnapshotScheduleTest, APeriodAboveADayIsInvalidArgumentNamingTheOptionAndValue) {
  Shm shm;
  using Period = std::chrono::milliseconds SnapshotOptions::*;
  const std::pair<Period, const char*> periods[] = {
      {&SnapshotOptions::shm_interval, "snapshot.shm_interval"},
      {&SnapshotOptions::disk_interval, "snapshot.disk_interval"},
      {&SnapshotOptions::exit_deadline, "snapshot.exit_deadline"}};
  for (const auto& [period, name] : periods) {
    SCOPED_TRACE(name);
    for (milliseconds bad : {milliseconds::max(), milliseconds(std::chrono::hours(24)) + milliseconds(1),
                             milliseconds(-1), milliseconds::min()}) {
      EngineOptions o = ShmOptions(shm.name);
      o.snapshot.*period = bad;
      auto e = Engine::open(o);
      ASSERT_FALSE(e.ok()) << bad.count() << " ms was accepted";
      EXPECT_EQ(e.status().code(), StatusCode::kInvalidArgument) << e.status().to_string();
      const std::string message(e.status().message());
      EXPECT_NE(message.find(name), std::string::npos) << message;
      EXPECT_NE(message.find(std::to_string(bad.count())), std::string::npos) << message;
    }
    for (milliseconds good : {milliseconds(0), milliseconds(std::chrono::hours(24))}) {
      EngineOptions o = ShmOptions(shm.name);
      o.snapshot.*period = good;
      auto e = Engine::open(o);
      EXPECT_TRUE(e.ok()) << good.count() << " ms: " << e.status().to_string();
    }
  }
}

}  // namespace
}  // namespace jobengine
