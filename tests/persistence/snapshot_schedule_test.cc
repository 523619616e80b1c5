// The periodic snapshots' schedule: a snapshot that would record nothing new
// is skipped (an idle engine writes none, yet health() says its snapshots are
// current), and every kind of change is in the next one. A kind of change the
// engine forgot to count (CutSource::change_count()) fails here: the images
// would stop following the engine once it settled.
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <filesystem>
#include <mutex>
#include <optional>
#include <string>
#include <thread>

#include "engine/test_hooks.h"  // g_before_batch
#include "jobengine/engine.h"
#include "jobengine/snapshot_format.h"
#include "jobengine/snapshot_tools.h"

namespace jobengine {
namespace {

namespace fs = std::filesystem;
using std::chrono::milliseconds;
using std::chrono::steady_clock;

constexpr milliseconds kWait{30000};

template <typename Pred>
bool WaitUntil(Pred pred) {
  const auto deadline = steady_clock::now() + kWait;
  while (!pred()) {
    if (steady_clock::now() > deadline) return false;
    std::this_thread::sleep_for(milliseconds(1));
  }
  return true;
}

// A gate a handler waits on (until the test opens it, or kWait).
class Gate {
 public:
  void open() {
    std::lock_guard<std::mutex> l(mu_);
    open_ = true;
    cv_.notify_all();
  }
  void wait() {
    std::unique_lock<std::mutex> l(mu_);
    cv_.wait_for(l, kWait, [&] { return open_; });
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  bool open_ = false;
};

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

// Waits until the snapshots have settled: two periodic checks in a row found
// nothing new while the generation stayed put. Returns that generation.
std::uint64_t Settle(Engine& e) {
  for (;;) {
    const Health before = e.health();
    EXPECT_TRUE(WaitUntil([&] {
      return e.health().snapshots_unchanged >= before.snapshots_unchanged + 2;
    }));
    if (e.health().last_snapshot_generation == before.last_snapshot_generation) {
      return before.last_snapshot_generation;
    }
  }
}

// The job `id` in the segment's image, if it is there.
std::optional<snapshot::JobRecordView> InImage(const std::string& shm_name, JobId id) {
  auto image = snapshot_tools::load_shm(shm_name);
  EXPECT_TRUE(image.ok()) << image.status().to_string();
  if (!image.ok()) return std::nullopt;
  for (const auto& j : image->view.jobs) {
    if (j.id == id) return j;
  }
  return std::nullopt;
}

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

  std::this_thread::sleep_for(milliseconds(200));
  const Health idle = e->health();
  EXPECT_EQ(idle.last_snapshot_generation, generation) << "an idle engine wrote a snapshot";
  // ~100 checks at 2 ms; a loaded machine makes fewer.
  EXPECT_GE(idle.snapshots_unchanged, unchanged + 10);
  // The snapshot it has is current: its age restarts at every check, so
  // health() does not call an idle engine's snapshots stale.
  EXPECT_LT(idle.last_snapshot_age, milliseconds(150)) << idle.last_snapshot_age.count() << " ns";
  EXPECT_TRUE(idle.ok) << (idle.reasons.empty() ? "" : idle.reasons.front());
  EXPECT_NE(e->metrics_text().find("jobengine_snapshot_unchanged_total"), std::string::npos);

  // The next change is in the next snapshot.
  ASSERT_TRUE(e->submit(*h, "y").ok());
  ASSERT_TRUE(WaitUntil([&] { return e->health().last_snapshot_generation > generation; }));
  ASSERT_TRUE(e->stop(StopMode::kDrain).ok());
  EXPECT_EQ(ran.load(), 2);
}

// Each kind of change, made to a settled engine, reaches the image: accepted,
// started, cancelled, finished, fired by the scheduler (a delay, a retry's
// backoff), a dead letter added and dropped.
TEST(SnapshotScheduleTest, EveryKindOfChangeReachesTheNextSnapshot) {
  Shm shm;
  EngineOptions o = ShmOptions(shm.name);
  auto e = Engine::open(o);
  ASSERT_TRUE(e.ok()) << e.status().to_string();
  Gate first_gate;
  Gate delayed_gate;
  std::atomic<int> retry_runs{0};
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
  HandlerOptions backoff;
  backoff.max_attempts = 2;
  backoff.has_retry_policy = true;
  backoff.retry.initial_backoff = milliseconds(300);
  backoff.retry.jitter = 0;
  auto retrying = e->register_handler("retrying", [&](JobContext&) {
    return retry_runs.fetch_add(1) == 0 ? Outcome::kRetry : Outcome::kDone;
  }, backoff);
  ASSERT_TRUE(blocker.ok() && later.ok() && plain.ok() && failing.ok() && retrying.ok());
  ASSERT_TRUE(e->start().ok());
  std::uint64_t g = Settle(*e);

  // Accepted; the worker that dequeued it waits (the hook) before it marks
  // it running, so the start is a change of its own.
  static std::atomic<bool> hold{true};
  static std::atomic<bool> held{false};
  detail::g_before_batch.store(+[](JobId) {
    held.store(true);
    while (hold.load()) std::this_thread::sleep_for(milliseconds(1));
  });
  auto running = e->submit(*blocker, "a");
  ASSERT_TRUE(running.ok());
  ASSERT_TRUE(WaitUntil([&] { return held.load(); }));
  std::uint64_t next = Settle(*e);
  EXPECT_GT(next, g);
  g = next;
  auto r = InImage(shm.name, *running);
  ASSERT_TRUE(r.has_value()) << "an accepted job is missing";
  EXPECT_EQ(r->state, snapshot::JobState::kPending);
  // Started: the worker holds it in the handler.
  detail::g_before_batch.store(nullptr);
  hold.store(false);
  ASSERT_TRUE(WaitUntil([&] { return e->health().running == 1; }));
  next = Settle(*e);
  EXPECT_GT(next, g) << "a job's start was not snapshotted";
  g = next;
  r = InImage(shm.name, *running);
  ASSERT_TRUE(r.has_value());
  EXPECT_EQ(r->state, snapshot::JobState::kRunningAtCut) << "a started job is not running";

  // Accepted behind it (one worker): pending. Then cancelled: marked.
  auto queued = e->submit(*plain, "b");
  ASSERT_TRUE(queued.ok());
  next = Settle(*e);
  EXPECT_GT(next, g);
  g = next;
  r = InImage(shm.name, *queued);
  ASSERT_TRUE(r.has_value());
  EXPECT_EQ(r->state, snapshot::JobState::kPending);
  EXPECT_FALSE(r->cancel_requested);
  auto cancelled = e->cancel(*queued);
  ASSERT_TRUE(cancelled.ok());
  EXPECT_EQ(*cancelled, CancelResult::kCancelled);
  next = Settle(*e);
  EXPECT_GT(next, g) << "a cancel was not snapshotted";
  g = next;
  r = InImage(shm.name, *queued);
  ASSERT_TRUE(r.has_value());
  EXPECT_TRUE(r->cancel_requested);

  // Finished (and the cancelled one dropped by the worker): both gone.
  first_gate.open();
  ASSERT_TRUE(WaitUntil([&] { return e->health().running == 0 && e->health().pending == 0; }));
  next = Settle(*e);
  EXPECT_GT(next, g);
  g = next;
  EXPECT_FALSE(InImage(shm.name, *running).has_value()) << "a finished job is still in the image";
  EXPECT_FALSE(InImage(shm.name, *queued).has_value());

  // Delayed, then fired by the scheduler and started.
  SubmitOptions in_a_while;
  in_a_while.delay = milliseconds(300);
  auto delayed = e->submit(*later, "c", in_a_while);
  ASSERT_TRUE(delayed.ok());
  next = Settle(*e);
  EXPECT_GT(next, g);
  g = next;
  r = InImage(shm.name, *delayed);
  ASSERT_TRUE(r.has_value());
  EXPECT_EQ(r->state, snapshot::JobState::kDelayed);
  ASSERT_TRUE(WaitUntil([&] { return e->health().running == 1; }));
  next = Settle(*e);
  EXPECT_GT(next, g);
  g = next;
  r = InImage(shm.name, *delayed);
  ASSERT_TRUE(r.has_value());
  EXPECT_EQ(r->state, snapshot::JobState::kRunningAtCut);
  // Finished, the last job of its batch with nothing after it.
  delayed_gate.open();
  ASSERT_TRUE(WaitUntil([&] { return e->health().running == 0 && e->health().pending == 0; }));
  next = Settle(*e);
  EXPECT_GT(next, g) << "a batch's last finish was not snapshotted";
  g = next;
  EXPECT_FALSE(InImage(shm.name, *delayed).has_value());

  // A retry's backoff in the scheduler, then its second run finishes it.
  auto retried = e->submit(*retrying, "d");
  ASSERT_TRUE(retried.ok());
  ASSERT_TRUE(WaitUntil([&] { return retry_runs.load() == 1; }));
  next = Settle(*e);
  EXPECT_GT(next, g);
  g = next;
  r = InImage(shm.name, *retried);
  ASSERT_TRUE(r.has_value());
  EXPECT_EQ(r->state, snapshot::JobState::kWaitingRetry);
  EXPECT_EQ(r->attempts, 1u);
  ASSERT_TRUE(WaitUntil([&] { return retry_runs.load() == 2 && e->health().pending == 0; }));
  next = Settle(*e);
  EXPECT_GT(next, g);
  g = next;
  EXPECT_FALSE(InImage(shm.name, *retried).has_value());

  // A dead letter, then dropped.
  auto dead = e->submit(*failing, "e");
  ASSERT_TRUE(dead.ok());
  ASSERT_TRUE(WaitUntil([&] { return e->health().dead == 1; }));
  next = Settle(*e);
  EXPECT_GT(next, g);
  g = next;
  r = InImage(shm.name, *dead);
  ASSERT_TRUE(r.has_value());
  EXPECT_EQ(r->state, snapshot::JobState::kDead);
  ASSERT_TRUE(e->drop_dead(*dead).ok());
  next = Settle(*e);
  EXPECT_GT(next, g) << "dropping a dead letter was not snapshotted";
  EXPECT_FALSE(InImage(shm.name, *dead).has_value());

  ASSERT_TRUE(e->stop(StopMode::kDrain).ok());
}

}  // namespace
}  // namespace jobengine
