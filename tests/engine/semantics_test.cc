// Job semantics (issue #4): delays, retries with backoff, dead letters,
// cancellation, deadlines, unique keys, stop modes with delayed jobs, metrics,
// logging, health reasons, and their snapshot round trip.
//
// Time is driven by a ManualClock (EngineOptions::test_clock): a job due in an
// hour runs when the test advances the clock by an hour, never because the
// test slept. Where a test checks that something did *not* happen yet, it
// first lets the scheduler make a few passes (it looks every millisecond under
// a test clock), so a job fired early would be seen.
#include "engine/test_hooks.h"  // g_after_cancel_check
#include "jobengine/engine.h"
#include "jobengine/snapshot_format.h"
#include "tests/engine/test_support.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <vector>

namespace jobengine {
namespace {

using std::chrono::hours;
using std::chrono::milliseconds;
using std::chrono::minutes;
using std::chrono::seconds;
using std::chrono::steady_clock;

using testing_support::Gate;
using testing_support::GateOpener;
using testing_support::kWaitTimeout;
using testing_support::WaitUntil;

// Lets the scheduler (which looks every millisecond under a test clock) make
// several passes, so that a job it would wrongly fire has fired.
void LetSchedulerRun() { std::this_thread::sleep_for(milliseconds(30)); }

EngineOptions TestOptions(std::shared_ptr<ManualClock> clock) {
  EngineOptions o;
  o.workers = 1;
  o.capacity = 1024;
  o.test_clock = std::move(clock);
  o.retry.jitter = 0;
  return o;
}

class Tmp {
 public:
  Tmp() {
    path_ = std::filesystem::temp_directory_path() /
            ("jobengine-semantics-" + std::to_string(::getpid()) + "-" + std::to_string(counter_++));
    std::filesystem::remove_all(path_);
  }
  ~Tmp() { std::filesystem::remove_all(path_); }
  std::string str() const { return path_.string(); }

 private:
  static inline int counter_ = 0;
  std::filesystem::path path_;
};

// ---- delays -------------------------------------------------------------------

TEST(DelayTest, DelayedJobRunsOnlyWhenItsTimeComes) {
  auto clock = std::make_shared<ManualClock>();
  // Used by handlers: declared before the engine, so they outlive its drain.
  std::atomic<int> runs{0};
  auto engine = Engine::open(TestOptions(clock));
  ASSERT_TRUE(engine.ok());
  auto h = engine->register_handler("later", [&](JobContext&) {
    runs.fetch_add(1);
    return Outcome::kDone;
  });
  ASSERT_TRUE(engine->start().ok());
  auto id = engine->submit(*h, "x", {.delay = hours(1)});
  ASSERT_TRUE(id.ok()) << id.status().to_string();
  EXPECT_TRUE(WaitUntil([&] { return engine->health().delayed == 1; }));
  clock->advance(minutes(59));
  LetSchedulerRun();
  EXPECT_EQ(runs.load(), 0) << "a job due in 1 h ran after 59 min";
  EXPECT_EQ(engine->health().pending, 1u);
  clock->advance(minutes(1));
  EXPECT_TRUE(WaitUntil([&] { return runs.load() == 1; }));
  EXPECT_TRUE(WaitUntil([&] { return engine->health().delayed == 0; }));
  // Lateness is measured: the scheduler histogram has one sample.
  EXPECT_NE(engine->metrics_text().find("jobengine_scheduler_lateness_seconds_count 1"),
            std::string::npos);
}

TEST(DelayTest, RunAtInThePastRunsAtOnceAndInTheFutureWaits) {
  auto clock = std::make_shared<ManualClock>();
  // Used by handlers: declared before the engine, so they outlive its drain.
  std::atomic<int> runs{0};
  auto engine = Engine::open(TestOptions(clock));
  ASSERT_TRUE(engine.ok());
  auto h = engine->register_handler("at", [&](JobContext&) {
    runs.fetch_add(1);
    return Outcome::kDone;
  });
  ASSERT_TRUE(engine->start().ok());
  const auto now = std::chrono::system_clock::now();
  ASSERT_TRUE(engine->submit(*h, "", {.run_at = now - seconds(5)}).ok());
  EXPECT_TRUE(WaitUntil([&] { return runs.load() == 1; }));
  ASSERT_TRUE(engine->submit(*h, "", {.run_at = now + hours(2)}).ok());
  clock->advance(hours(1));
  LetSchedulerRun();
  EXPECT_EQ(runs.load(), 1);
  clock->advance(hours(1) + seconds(1));
  EXPECT_TRUE(WaitUntil([&] { return runs.load() == 2; }));
}

TEST(DelayTest, RunAtAtTheDawnOfTimeRunsAtOnce) {
  // time_point::min() as "as soon as possible": run_at - now overflowed and
  // the job waited 50 years.
  auto clock = std::make_shared<ManualClock>();
  std::atomic<int> runs{0};
  auto engine = Engine::open(TestOptions(clock));
  ASSERT_TRUE(engine.ok());
  auto h = engine->register_handler("asap", [&](JobContext&) {
    runs.fetch_add(1);
    return Outcome::kDone;
  });
  ASSERT_TRUE(engine->start().ok());
  ASSERT_TRUE(engine->submit(*h, "", {.run_at = std::chrono::system_clock::time_point::min()}).ok());
  ASSERT_TRUE(engine->submit(*h, "", {.run_at = std::chrono::system_clock::time_point{} +
                                                std::chrono::nanoseconds(1)}).ok());
  EXPECT_TRUE(WaitUntil([&] { return runs.load() == 2; }));
  EXPECT_EQ(engine->health().delayed, 0u);
}

TEST(DelayTest, BadDelayOptionsAreInvalidArgument) {
  auto engine = Engine::open(TestOptions(nullptr));
  ASSERT_TRUE(engine.ok());
  auto h = engine->register_handler("h", [](JobContext&) { return Outcome::kDone; });
  ASSERT_TRUE(engine->start().ok());
  auto both = engine->submit(*h, "", {.delay = seconds(1), .run_at = std::chrono::system_clock::now()});
  EXPECT_EQ(both.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(both.status().to_string().find("not both"), std::string::npos);
  auto negative = engine->submit(*h, "", {.delay = seconds(-1)});
  EXPECT_EQ(negative.status().code(), StatusCode::kInvalidArgument);
  const JobSpec batch[] = {{*h, "", {.delay = seconds(1)}}};
  EXPECT_EQ(engine->submit_batch(batch).status().code(), StatusCode::kInvalidArgument);
}

// submit_batch() takes none of submit()'s per-job extras: each one refused
// names the job and the option, and nothing of the batch is accepted.
TEST(DelayTest, ABatchWithRunAtDeadlineOrKeyIsRefusedWhole) {
  auto engine = Engine::open(TestOptions(nullptr));
  ASSERT_TRUE(engine.ok());
  auto h = engine->register_handler("h", [](JobContext&) { return Outcome::kDone; });
  ASSERT_TRUE(h.ok());
  ASSERT_TRUE(engine->start().ok());
  const SubmitOptions extras[] = {
      {.run_at = std::chrono::system_clock::now() + hours(1)},
      {.deadline = seconds(5)},
      {.unique_key = "k"},
  };
  for (const SubmitOptions& extra : extras) {
    const JobSpec batch[] = {{*h, "first", {}}, {*h, "second", extra}};
    JobId ids[2] = {0, 0};
    auto r = engine->submit_batch(batch, ids);
    ASSERT_EQ(r.status().code(), StatusCode::kInvalidArgument) << r.status().to_string();
    EXPECT_NE(r.status().to_string().find("job 1: delay, run_at, deadline and unique_key"),
              std::string::npos)
        << r.status().to_string();
    EXPECT_EQ(ids[0], 0u);
  }
  EXPECT_EQ(engine->health().submitted, 0u) << "part of a refused batch was accepted";
  auto report = engine->stop();
  ASSERT_TRUE(report.ok());
  EXPECT_EQ(report->submitted, 0u);
}

TEST(DelayTest, ManyDelayedJobsFireInRunAtOrder) {
  auto clock = std::make_shared<ManualClock>();
  // Used by handlers: declared before the engine, so they outlive its drain.
  std::mutex mu;
  std::vector<std::string> order;
  auto engine = Engine::open(TestOptions(clock));
  ASSERT_TRUE(engine.ok());
  auto h = engine->register_handler("o", [&](JobContext& job) {
    std::lock_guard<std::mutex> lock(mu);
    order.emplace_back(job.payload());
    return Outcome::kDone;
  });
  ASSERT_TRUE(engine->start().ok());
  // Submitted in scrambled order, due one minute apart.
  for (int m : {7, 3, 9, 1, 5, 2, 8, 4, 6}) {
    ASSERT_TRUE(engine->submit(*h, std::to_string(m), {.delay = minutes(m)}).ok());
  }
  for (int m = 1; m <= 9; ++m) {
    clock->advance(minutes(1));
    ASSERT_TRUE(WaitUntil([&] {
      std::lock_guard<std::mutex> lock(mu);
      return order.size() == static_cast<std::size_t>(m);
    }));
  }
  EXPECT_EQ(order, (std::vector<std::string>{"1", "2", "3", "4", "5", "6", "7", "8", "9"}));
}

// ---- retries and backoff ---------------------------------------------------------

TEST(RetryTest, BackoffDoublesUpToItsCapThenTheJobDiesWithItsLastError) {
  auto clock = std::make_shared<ManualClock>();
  EngineOptions o = TestOptions(clock);
  o.max_attempts = 4;
  o.retry.initial_backoff = minutes(1);
  o.retry.multiplier = 2;
  o.retry.max_backoff = minutes(3);
  // Used by handlers: declared before the engine, so they outlive its drain.
  std::atomic<int> runs{0};
  auto engine = Engine::open(o);
  ASSERT_TRUE(engine.ok());
  auto h = engine->register_handler("flaky", [&](JobContext& job) {
    runs.fetch_add(1);
    job.set_error("attempt " + std::to_string(job.attempt()) + " failed");
    return Outcome::kRetry;
  });
  ASSERT_TRUE(engine->start().ok());
  auto id = engine->submit(*h, "p");
  ASSERT_TRUE(id.ok());
  ASSERT_TRUE(WaitUntil([&] { return runs.load() == 1; }));
  // Waits of 1 min, 2 min, then 4 min capped to 3 min. The test clock adds
  // to real time, which passes too: the margins are 10 s of it.
  int expected_runs = 1;
  for (milliseconds wait : {milliseconds(60000), milliseconds(120000), milliseconds(180000)}) {
    ASSERT_TRUE(WaitUntil([&] { return engine->health().delayed == 1; }));
    clock->advance(wait - seconds(10));
    LetSchedulerRun();
    EXPECT_EQ(runs.load(), expected_runs) << "retry ran before its " << wait.count() << " ms backoff";
    clock->advance(seconds(10));
    ++expected_runs;
    ASSERT_TRUE(WaitUntil([&] { return runs.load() == expected_runs; }))
        << "retry did not run after its " << wait.count() << " ms backoff";
  }
  // The job enters the dead set before its worker retires it and counts it
  // failed (a snapshot must never find it in neither place): wait for both.
  ASSERT_TRUE(WaitUntil([&] {
    const Health now = engine->health();
    return now.dead == 1 && now.failed == 1 && now.pending == 0;
  }));
  const auto dead = engine->dead_letters();
  ASSERT_EQ(dead.size(), 1u);
  EXPECT_EQ(dead[0].id, *id);
  EXPECT_EQ(dead[0].handler, "flaky");
  EXPECT_EQ(dead[0].reason, DeadReason::kFailed);
  EXPECT_EQ(dead[0].attempts, 4u);
  EXPECT_EQ(dead[0].error, "attempt 4 failed");
  EXPECT_EQ(dead[0].payload, "p");
  const Health health = engine->health();
  EXPECT_EQ(health.retried, 3u);
  EXPECT_EQ(health.failed, 1u);
  EXPECT_EQ(health.pending, 0u);
}

// nanoseconds::max() as a back-off ("uncapped") or a delay ("never") must
// wait (capped at 100 years), not overflow into "due at once": the back-off
// reached 2^63 as a double, which the int64 it became could not hold.
TEST(RetryTest, HugeBackoffsAndDelaysWaitInsteadOfOverflowingIntoNow) {
  auto clock = std::make_shared<ManualClock>();
  EngineOptions o = TestOptions(clock);
  o.max_attempts = 2;
  o.retry.initial_backoff = std::chrono::nanoseconds::max();
  o.retry.multiplier = 1;
  o.retry.max_backoff = std::chrono::nanoseconds::max();
  std::atomic<int> runs{0};
  std::atomic<int> retry_after_runs{0};
  auto engine = Engine::open(o);
  ASSERT_TRUE(engine.ok());
  auto h = engine->register_handler("flaky", [&](JobContext&) {
    runs.fetch_add(1);
    return Outcome::kRetry;
  });
  auto later = engine->register_handler("later", [&](JobContext& job) {
    retry_after_runs.fetch_add(1);
    job.retry_after(std::chrono::nanoseconds::max());
    return Outcome::kRetry;
  });
  ASSERT_TRUE(h.ok() && later.ok());
  ASSERT_TRUE(engine->start().ok());
  ASSERT_TRUE(engine->submit(*h, "").ok());
  ASSERT_TRUE(engine->submit(*later, "").ok());
  ASSERT_TRUE(engine->submit(*h, "", {.delay = std::chrono::nanoseconds::max()}).ok());
  ASSERT_TRUE(WaitUntil([&] { return engine->health().delayed == 3; }))
      << "delayed: " << engine->health().delayed << ", dead: " << engine->health().dead;
  clock->advance(hours(24 * 365 * 50));
  LetSchedulerRun();
  EXPECT_EQ(runs.load(), 1) << "a retry or the delayed job ran within 50 years";
  EXPECT_EQ(retry_after_runs.load(), 1);
  EXPECT_EQ(engine->health().dead, 0u);
  clock->advance(hours(24 * 366 * 51));
  EXPECT_TRUE(WaitUntil([&] { return runs.load() == 3 && retry_after_runs.load() == 2; }))
      << "past the 100-year cap nothing ran: runs " << runs.load();
  auto report = engine->stop(StopMode::kAbandon);
  ASSERT_TRUE(report.ok());
}

TEST(RetryTest, JitterStaysWithinItsBounds) {
  // Many jobs, each retried once with a jittered backoff of 10 h +/- 50%, so
  // due between 5 h and 15 h: none may run before 5 h, all must by 15 h, and
  // jitter spreads them (without it every retry is due at exactly 10 h): some
  // have run a minute before the midpoint and some are still waiting a minute
  // after it. The margins (a minute of test clock) cover the real time that
  // passes between a retry's scheduling and the checks.
  constexpr int kJobs = 200;
  auto clock = std::make_shared<ManualClock>();
  EngineOptions o = TestOptions(clock);
  o.max_attempts = 2;
  o.retry.initial_backoff = hours(10);
  o.retry.max_backoff = hours(10);
  o.retry.jitter = 0.5;  // 5 h .. 15 h
  // Used by handlers: declared before the engine, so they outlive its drain.
  std::atomic<int> first_runs{0};
  std::atomic<int> retries_run{0};
  auto engine = Engine::open(o);
  ASSERT_TRUE(engine.ok());
  auto h = engine->register_handler("j", [&](JobContext& job) {
    if (job.attempt() == 1) {
      first_runs.fetch_add(1);
      return Outcome::kRetry;
    }
    retries_run.fetch_add(1);
    return Outcome::kDone;
  });
  ASSERT_TRUE(engine->start().ok());
  for (int i = 0; i < kJobs; ++i) ASSERT_TRUE(engine->submit(*h, "").ok());
  ASSERT_TRUE(WaitUntil([&] {
    return first_runs.load() == kJobs && engine->health().delayed == kJobs;
  })) << first_runs.load() << " first runs, " << engine->health().delayed << " delayed";
  // The retries the scheduler fired so far have run (none is queued or running).
  const auto settled = [&] {
    LetSchedulerRun();
    return WaitUntil([&] {
      const Health health = engine->health();
      return health.pending == health.delayed;
    });
  };
  clock->advance(hours(5) - minutes(1));  // at 4 h 59 min
  ASSERT_TRUE(settled());
  EXPECT_EQ(retries_run.load(), 0) << "jittered backoff below initial * (1 - jitter)";
  clock->advance(hours(5));  // at 9 h 59 min
  EXPECT_TRUE(WaitUntil([&] { return retries_run.load() > 0; }))
      << "no retry due before the midpoint: no jitter below it";
  ASSERT_TRUE(settled());
  const int before_midpoint = retries_run.load();
  EXPECT_LT(before_midpoint, kJobs) << "every retry due before the midpoint";
  clock->advance(minutes(2));  // at 10 h 1 min
  ASSERT_TRUE(settled());
  const int after_midpoint = retries_run.load();
  EXPECT_LT(after_midpoint, kJobs) << "no retry due after the midpoint: no jitter above it";
  EXPECT_GE(after_midpoint, before_midpoint);
  clock->advance(hours(5));  // at 15 h 1 min
  EXPECT_TRUE(WaitUntil([&] { return retries_run.load() == kJobs; }))
      << retries_run.load() << " of " << kJobs
      << " retries ran: jittered backoff above initial * (1 + jitter)";
  EXPECT_TRUE(WaitUntil([&] { return engine->health().pending == 0; }));
}

TEST(RetryTest, HandlerPolicyAndRetryAfterOverrideTheEngineDefaults) {
  auto clock = std::make_shared<ManualClock>();
  EngineOptions o = TestOptions(clock);
  o.max_attempts = 2;
  o.retry.initial_backoff = hours(1);
  o.retry.max_backoff = hours(1);
  // Used by handlers: declared before the engine, so they outlive its drain.
  std::atomic<int> quick_runs{0}, custom_runs{0};
  auto engine = Engine::open(o);
  ASSERT_TRUE(engine.ok());
  HandlerOptions ho;
  ho.max_attempts = 5;
  ho.has_retry_policy = true;
  ho.retry.initial_backoff = std::chrono::nanoseconds(0);  // at once
  auto quick = engine->register_handler("quick", [&](JobContext&) {
    quick_runs.fetch_add(1);
    return Outcome::kRetry;
  }, ho);
  auto custom = engine->register_handler("custom", [&](JobContext& job) {
    custom_runs.fetch_add(1);
    if (job.attempt() == 1) {
      job.retry_after(minutes(2));
      return Outcome::kRetry;
    }
    return Outcome::kDone;
  });
  ASSERT_TRUE(quick.ok() && custom.ok());
  ASSERT_TRUE(engine->start().ok());
  ASSERT_TRUE(engine->submit(*quick, "").ok());
  // Five attempts at once (handler policy), not two an hour apart.
  EXPECT_TRUE(WaitUntil([&] { return quick_runs.load() == 5 && engine->health().dead == 1; }));
  ASSERT_TRUE(engine->submit(*custom, "").ok());
  ASSERT_TRUE(WaitUntil([&] { return custom_runs.load() == 1 && engine->health().delayed == 1; }));
  clock->advance(minutes(2));
  EXPECT_TRUE(WaitUntil([&] { return custom_runs.load() == 2; })) << "retry_after(2 min) not honoured";
}

TEST(RetryTest, BadRetryPoliciesAreInvalidArgument) {
  EngineOptions o;
  o.retry.multiplier = 0.5;
  auto e1 = Engine::open(o);
  EXPECT_EQ(e1.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(e1.status().to_string().find("retry.multiplier"), std::string::npos);
  o = EngineOptions{};
  o.retry.jitter = 1.5;
  EXPECT_EQ(Engine::open(o).status().code(), StatusCode::kInvalidArgument);
  o = EngineOptions{};
  o.retry.initial_backoff = minutes(1);  // above the default 10 s cap
  auto e2 = Engine::open(o);
  EXPECT_EQ(e2.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(e2.status().to_string().find("exceeds max_backoff"), std::string::npos);
  auto engine = Engine::open(EngineOptions{});
  ASSERT_TRUE(engine.ok());
  HandlerOptions ho;
  ho.has_retry_policy = true;
  ho.retry.initial_backoff = seconds(-1);
  auto r = engine->register_handler("h", [](JobContext&) { return Outcome::kDone; }, ho);
  EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(r.status().to_string().find("initial_backoff"), std::string::npos);
}

// ---- dead letters -----------------------------------------------------------------

// requeue_dead() puts the job back under its own id, in a new slot, while the
// slot it died in (earlier in the table) may still hold that id, retired or
// free: cancel() must look past it.
TEST(DeadLetterTest, ARequeuedJobCanBeCancelledWhileItsOldSlotStillHoldsItsId) {
  Gate gate;
  std::atomic<int> runs{0};
  std::atomic<int> blocked{0};
  EngineOptions o = TestOptions(nullptr);
  o.workers = 1;
  auto engine = Engine::open(o);
  ASSERT_TRUE(engine.ok());
  GateOpener opener{gate};
  auto fails = engine->register_handler("fails", [&](JobContext&) {
    runs.fetch_add(1);
    return Outcome::kFail;
  });
  auto block = engine->register_handler("block", [&](JobContext&) {
    blocked.fetch_add(1);
    gate.wait();
    return Outcome::kDone;
  });
  ASSERT_TRUE(fails.ok() && block.ok());
  ASSERT_TRUE(engine->start().ok());
  auto id = engine->submit(*fails, "x");
  ASSERT_TRUE(id.ok());
  ASSERT_TRUE(WaitUntil([&] { return engine->dead_letters().size() == 1; }));
  // The worker holds the dead job's old slot (retired, id intact) while it
  // runs the blocker; the requeued job waits behind it in a newer slot.
  ASSERT_TRUE(engine->submit(*block, "").ok());
  ASSERT_TRUE(WaitUntil([&] { return blocked.load() == 1; }));
  auto again = engine->requeue_dead(*id);
  ASSERT_TRUE(again.ok()) << again.status().to_string();
  auto cancelled = engine->cancel(*id);
  ASSERT_TRUE(cancelled.ok()) << cancelled.status().to_string();
  EXPECT_EQ(*cancelled, CancelResult::kCancelled);
  gate.open();
  auto report = engine->stop();
  ASSERT_TRUE(report.ok());
  EXPECT_EQ(runs.load(), 1) << "the cancelled job ran again";
  EXPECT_EQ(report->cancelled, 1u);
}

TEST(DeadLetterTest, FailedJobsAreKeptListedRequeuedAndDropped) {
  // Used by handlers: declared before the engine, so they outlive its drain.
  std::atomic<bool> heal{false};
  std::atomic<int> ok_runs{0};
  auto engine = Engine::open(TestOptions(nullptr));
  ASSERT_TRUE(engine.ok());
  auto h = engine->register_handler("ledger", [&](JobContext& job) {
    if (!heal.load()) {
      job.set_error("ledger down");
      return Outcome::kFail;
    }
    ok_runs.fetch_add(1);
    return Outcome::kDone;
  });
  ASSERT_TRUE(engine->start().ok());
  auto a = engine->submit(*h, "a");
  auto b = engine->submit(*h, "b");
  ASSERT_TRUE(a.ok() && b.ok());
  ASSERT_TRUE(WaitUntil([&] { return engine->dead_letters().size() == 2; }));
  auto dead = engine->dead_letters();
  EXPECT_EQ(dead[0].id, *a);
  EXPECT_EQ(dead[0].error, "ledger down");
  EXPECT_EQ(dead[0].attempts, 1u);
  EXPECT_GE(dead[0].died_at, dead[0].submitted_at);
  EXPECT_EQ(engine->dead_letters(1).size(), 1u);
  heal.store(true);
  auto again = engine->requeue_dead(*a);
  ASSERT_TRUE(again.ok()) << again.status().to_string();
  EXPECT_EQ(*again, *a) << "a requeued job keeps its id";
  EXPECT_TRUE(WaitUntil([&] { return ok_runs.load() == 1; }));
  EXPECT_TRUE(engine->drop_dead(*b).ok());
  EXPECT_TRUE(engine->dead_letters().empty());
  EXPECT_EQ(engine->requeue_dead(*b).status().code(), StatusCode::kNotFound);
  EXPECT_EQ(engine->drop_dead(*b).code(), StatusCode::kNotFound);
  const Health health = engine->health();
  EXPECT_EQ(health.dead, 0u);
  EXPECT_EQ(health.dead_total, 2u);
  // A job died within dead_growth_window: health says so.
  EXPECT_FALSE(health.ok);
}

// A requeue the job table cannot take says which call and which job, and the
// letter stays (submit()'s own message named neither).
TEST(DeadLetterTest, ARequeueTheTableCannotTakeNamesTheJobAndKeepsTheLetter) {
  Gate gate;
  EngineOptions o = TestOptions(nullptr);
  o.capacity = 8;
  auto engine = Engine::open(o);
  ASSERT_TRUE(engine.ok());
  GateOpener opener{gate};
  auto fails = engine->register_handler("fails", [](JobContext& job) {
    job.set_error("declined");
    return Outcome::kFail;
  });
  auto block = engine->register_handler("block", [&](JobContext&) {
    gate.wait();
    return Outcome::kDone;
  });
  ASSERT_TRUE(fails.ok() && block.ok());
  ASSERT_TRUE(engine->start().ok());
  auto dead = engine->submit(*fails, "x");
  ASSERT_TRUE(dead.ok());
  ASSERT_TRUE(WaitUntil([&] { return engine->dead_letters().size() == 1; }));
  int accepted = 0;
  for (; accepted < 100; ++accepted) {
    auto id = engine->submit(*block, "");
    if (!id.ok()) {
      ASSERT_EQ(id.status().code(), StatusCode::kQueueFull) << id.status().to_string();
      break;
    }
  }
  ASSERT_GT(accepted, 0);
  ASSERT_LT(accepted, 100) << "the table never filled";
  auto again = engine->requeue_dead(*dead);
  ASSERT_EQ(again.status().code(), StatusCode::kQueueFull) << again.status().to_string();
  const std::string text(again.status().message());
  EXPECT_EQ(text.rfind("requeue_dead(): job " + std::to_string(*dead) + ": ", 0), 0u) << text;
  EXPECT_NE(text.find("the letter stays"), std::string::npos) << text;
  ASSERT_EQ(engine->dead_letters().size(), 1u);
  EXPECT_EQ(engine->dead_letters()[0].id, *dead);
  gate.open();
  ASSERT_TRUE(engine->stop().ok());
}

// dead_growth_window = milliseconds::max() ("for ever"): a death keeps health
// not ok. In nanoseconds the window overflowed, and the check was off.
TEST(DeadLetterTest, TheLongestDeadGrowthWindowNeverForgetsADeath) {
  EngineOptions o = TestOptions(nullptr);
  o.dead_growth_window = milliseconds::max();
  auto engine = Engine::open(o);
  ASSERT_TRUE(engine.ok()) << engine.status().to_string();
  auto fails = engine->register_handler("fails", [](JobContext&) { return Outcome::kFail; });
  ASSERT_TRUE(fails.ok());
  ASSERT_TRUE(engine->start().ok());
  EXPECT_TRUE(engine->health().ok);
  ASSERT_TRUE(engine->submit(*fails, "x").ok());
  ASSERT_TRUE(WaitUntil([&] { return engine->health().dead == 1; }));
  const Health h = engine->health();
  EXPECT_FALSE(h.ok);
  EXPECT_TRUE(std::any_of(h.reasons.begin(), h.reasons.end(), [](const std::string& r) {
    return r.rfind("dead-letter set growing", 0) == 0;
  }));
  ASSERT_TRUE(engine->stop().ok());
}

// requeue_dead() of a stopped engine: kStopped naming the call and the job,
// and the letter stays (a later engine's snapshot keeps it).
TEST(DeadLetterTest, ARequeueAfterStopIsStoppedAndKeepsTheLetter) {
  auto engine = Engine::open(TestOptions(nullptr));
  ASSERT_TRUE(engine.ok());
  auto fails = engine->register_handler("fails", [](JobContext&) { return Outcome::kFail; });
  ASSERT_TRUE(fails.ok());
  ASSERT_TRUE(engine->start().ok());
  auto dead = engine->submit(*fails, "x");
  ASSERT_TRUE(dead.ok());
  ASSERT_TRUE(WaitUntil([&] { return engine->dead_letters().size() == 1; }));
  ASSERT_TRUE(engine->stop().ok());
  auto again = engine->requeue_dead(*dead);
  ASSERT_EQ(again.status().code(), StatusCode::kStopped) << again.status().to_string();
  EXPECT_NE(again.status().to_string().find("requeue_dead(): job " + std::to_string(*dead)),
            std::string::npos)
      << again.status().to_string();
  ASSERT_EQ(engine->dead_letters().size(), 1u);
}

// requeue_dead() brings the job back with its own options: its unique key,
// taken again (a submit with the key while it is pending gets its id, not a
// second job), and its deadline. Before, both were dropped when it died.
TEST(DeadLetterTest, ARequeuedJobKeepsItsUniqueKeyAndItsDeadline) {
  auto clock = std::make_shared<ManualClock>();
  Gate gate;
  std::atomic<int> calls{0};
  std::atomic<int> runs_with_deadline{0};
  auto engine = Engine::open(TestOptions(clock));
  ASSERT_TRUE(engine.ok());
  GateOpener opener{gate};
  auto h = engine->register_handler("invoice", [&](JobContext& job) {
    if (job.deadline() != steady_clock::time_point::max()) runs_with_deadline.fetch_add(1);
    if (calls.fetch_add(1) == 0) return Outcome::kFail;
    gate.wait();
    return Outcome::kDone;
  });
  ASSERT_TRUE(engine->start().ok());
  auto id = engine->submit(*h, "p", {.deadline = minutes(5), .unique_key = "invoice-7"});
  ASSERT_TRUE(id.ok()) << id.status().to_string();
  ASSERT_TRUE(WaitUntil([&] { return engine->dead_letters().size() == 1; }));
  auto back = engine->requeue_dead(*id);
  ASSERT_TRUE(back.ok()) << back.status().to_string();
  ASSERT_EQ(*back, *id);
  ASSERT_TRUE(WaitUntil([&] { return calls.load() == 2; }));  // running again: pending
  const std::uint64_t submitted_before = engine->health().submitted;
  auto dup = engine->submit(*h, "q", {.unique_key = "invoice-7"});
  ASSERT_TRUE(dup.ok()) << dup.status().to_string();
  EXPECT_EQ(*dup, *id) << "a second job with the pending job's key was accepted";
  EXPECT_EQ(engine->health().submitted, submitted_before);
  EXPECT_EQ(runs_with_deadline.load(), 2) << "the requeued run had no deadline";
  clock->advance(minutes(6));
  EXPECT_TRUE(WaitUntil([&] { return engine->health().stuck == 1; }))
      << "the requeued run is past its 5 min deadline and not stuck";
  gate.open();
  ASSERT_TRUE(WaitUntil([&] { return engine->health().done == 1; }));
  // Done: the key is free again.
  auto after = engine->submit(*h, "r", {.unique_key = "invoice-7"});
  ASSERT_TRUE(after.ok());
  EXPECT_NE(*after, *id);
}

// A letter whose key another pending job took meanwhile is not requeued
// (two pending jobs would share the key): kAlreadyExists names the holder,
// and the letter stays.
TEST(DeadLetterTest, ARequeueWhoseKeyIsTakenIsRefusedAndTheLetterStays) {
  Gate gate;
  std::atomic<int> calls{0};
  auto engine = Engine::open(TestOptions(nullptr));
  ASSERT_TRUE(engine.ok());
  GateOpener opener{gate};
  auto h = engine->register_handler("invoice", [&](JobContext&) {
    if (calls.fetch_add(1) == 0) return Outcome::kFail;
    gate.wait();
    return Outcome::kDone;
  });
  ASSERT_TRUE(engine->start().ok());
  auto first = engine->submit(*h, "p", {.unique_key = "invoice-8"});
  ASSERT_TRUE(first.ok());
  ASSERT_TRUE(WaitUntil([&] { return engine->dead_letters().size() == 1; }));
  auto second = engine->submit(*h, "q", {.unique_key = "invoice-8"});
  ASSERT_TRUE(second.ok());
  ASSERT_NE(*second, *first);
  auto back = engine->requeue_dead(*first);
  ASSERT_FALSE(back.ok()) << "requeued as " << *back;
  EXPECT_EQ(back.status().code(), StatusCode::kAlreadyExists);
  EXPECT_NE(back.status().message().find("held by pending job " + std::to_string(*second)),
            std::string::npos)
      << back.status().to_string();
  ASSERT_EQ(engine->dead_letters().size(), 1u);
  EXPECT_EQ(engine->dead_letters()[0].id, *first);
  gate.open();
  ASSERT_TRUE(WaitUntil([&] { return engine->health().done == 1; }));
  // Once the holder is done, the letter can come back with its key.
  auto later = engine->requeue_dead(*first);
  ASSERT_TRUE(later.ok()) << later.status().to_string();
  EXPECT_EQ(*later, *first);
  ASSERT_TRUE(WaitUntil([&] { return engine->health().done == 2; }));
}

TEST(DeadLetterTest, TheSetIsBoundedOldestFirstOut) {
  EngineOptions o = TestOptions(nullptr);
  o.max_dead = 3;
  std::mutex log_mu;
  std::vector<std::string> lines;
  o.log = [&](LogLevel, std::string_view line) {
    std::lock_guard<std::mutex> lock(log_mu);
    lines.emplace_back(line);
  };
  auto engine = Engine::open(o);
  ASSERT_TRUE(engine.ok());
  auto h = engine->register_handler("bad", [](JobContext&) { return Outcome::kFail; });
  ASSERT_TRUE(engine->start().ok());
  std::vector<JobId> ids;
  for (int i = 0; i < 5; ++i) ids.push_back(*engine->submit(*h, std::to_string(i)));
  ASSERT_TRUE(WaitUntil([&] { return engine->health().dead_total == 5; }));
  const auto dead = engine->dead_letters();
  ASSERT_EQ(dead.size(), 3u);
  EXPECT_EQ(dead[0].id, ids[2]);
  EXPECT_EQ(dead[2].id, ids[4]);
  EXPECT_EQ(engine->health().dead_discarded, 2u);
  // Every log line about a job names its id and its handler.
  std::lock_guard<std::mutex> lock(log_mu);
  bool named = false;
  for (const auto& line : lines) {
    if (line.find("job " + std::to_string(ids[0]) + " (bad)") != std::string::npos) named = true;
  }
  EXPECT_TRUE(named);
}

// ---- cancellation ---------------------------------------------------------------

TEST(CancelTest, QueuedDelayedAndRunningJobsEachSayWhatHappened) {
  auto clock = std::make_shared<ManualClock>();
  // Used by handlers: declared before the engine, so they outlive its drain.
  Gate gate;
  std::atomic<bool> started{false}, saw_cancel{false};
  std::atomic<int> other_runs{0};
  auto engine = Engine::open(TestOptions(clock));
  ASSERT_TRUE(engine.ok());
  GateOpener opener{gate};
  auto blocker = engine->register_handler("blocker", [&](JobContext& job) {
    started.store(true);
    // Cooperative: poll until cancelled (bounded by the gate's timeout).
    const auto until = steady_clock::now() + kWaitTimeout;
    while (!job.cancelled() && steady_clock::now() < until) std::this_thread::yield();
    saw_cancel.store(job.cancelled());
    gate.wait();
    return Outcome::kRetry;  // not retried: it was cancelled
  });
  auto other = engine->register_handler("other", [&](JobContext&) {
    other_runs.fetch_add(1);
    return Outcome::kDone;
  });
  ASSERT_TRUE(engine->start().ok());
  auto running = engine->submit(*blocker, "");
  ASSERT_TRUE(WaitUntil([&] { return started.load(); }));
  auto queued = engine->submit(*other, "");             // behind the blocker (1 worker)
  auto delayed = engine->submit(*other, "", {.delay = hours(1)});
  ASSERT_TRUE(running.ok() && queued.ok() && delayed.ok());
  ASSERT_TRUE(WaitUntil([&] { return engine->health().delayed == 1; }));

  auto c1 = engine->cancel(*queued);
  ASSERT_TRUE(c1.ok()) << c1.status().to_string();
  EXPECT_EQ(*c1, CancelResult::kCancelled);
  auto c2 = engine->cancel(*delayed);
  ASSERT_TRUE(c2.ok());
  EXPECT_EQ(*c2, CancelResult::kCancelled);
  EXPECT_TRUE(WaitUntil([&] { return engine->health().delayed == 0; }))
      << "a cancelled delayed job stays in the scheduler";
  auto c3 = engine->cancel(*running);
  ASSERT_TRUE(c3.ok());
  EXPECT_EQ(*c3, CancelResult::kCancelRequested);
  EXPECT_TRUE(WaitUntil([&] { return saw_cancel.load(); })) << "the handler never saw cancelled()";
  gate.open();
  clock->advance(hours(2));
  ASSERT_TRUE(WaitUntil([&] { return engine->health().pending == 0; }));
  LetSchedulerRun();
  EXPECT_EQ(other_runs.load(), 0) << "a cancelled job ran";
  const Health health = engine->health();
  EXPECT_EQ(health.cancelled, 3u);
  EXPECT_EQ(health.retried, 0u);
  // The run cancel() reached is one handler call; the two jobs cancelled before
  // they ran are none.
  const auto metrics = nlohmann::json::parse(engine->metrics_json()).at("handlers");
  EXPECT_EQ(metrics[0].at("started").get<std::uint64_t>(), 1u);
  EXPECT_EQ(metrics[1].at("started").get<std::uint64_t>(), 0u);
  EXPECT_EQ(metrics[1].at("cancelled").get<std::uint64_t>(), 2u);
  // Finished, unknown and zero ids are not found.
  EXPECT_EQ(engine->cancel(*queued).status().code(), StatusCode::kNotFound);
  EXPECT_EQ(engine->cancel(987654321).status().code(), StatusCode::kNotFound);
  EXPECT_EQ(engine->cancel(0).status().code(), StatusCode::kNotFound);
  auto report = engine->stop();
  ASSERT_TRUE(report.ok());
  EXPECT_EQ(report->cancelled, 3u);
  EXPECT_EQ(engine->cancel(*running).status().code(), StatusCode::kFailedPrecondition);
}

// JobContext::cancelled(): "any outcome; a cancelled job is never retried and
// counts as cancelled" -- kDone included.
TEST(CancelTest, ARunningJobThatSeesItsCancelAndReturnsDoneCountsAsCancelled) {
  std::atomic<bool> started{false};
  auto engine = Engine::open(TestOptions(nullptr));
  ASSERT_TRUE(engine.ok());
  auto h = engine->register_handler("polls", [&](JobContext& job) {
    started.store(true);
    const auto until = steady_clock::now() + kWaitTimeout;
    while (!job.cancelled() && steady_clock::now() < until) std::this_thread::yield();
    return Outcome::kDone;
  });
  ASSERT_TRUE(h.ok());
  ASSERT_TRUE(engine->start().ok());
  auto id = engine->submit(*h, "");
  ASSERT_TRUE(id.ok());
  ASSERT_TRUE(WaitUntil([&] { return started.load(); }));
  auto c = engine->cancel(*id);
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(*c, CancelResult::kCancelRequested);
  auto report = engine->stop();
  ASSERT_TRUE(report.ok());
  EXPECT_EQ(report->cancelled, 1u);
  EXPECT_EQ(report->done, 0u);
}

// SubmitOptions::unique_key: "free again once that job finishes, dies or is
// cancelled" -- at once, not when a worker reaches the cancelled job.
TEST(CancelTest, ACancelledQueuedJobFreesItsUniqueKeyAtOnce) {
  Gate gate;
  std::atomic<bool> started{false};
  std::atomic<int> keyed_runs{0};
  auto engine = Engine::open(TestOptions(nullptr));
  ASSERT_TRUE(engine.ok());
  GateOpener opener{gate};
  auto block = engine->register_handler("block", [&](JobContext&) {
    started.store(true);
    gate.wait();
    return Outcome::kDone;
  });
  auto keyed = engine->register_handler("keyed", [&](JobContext&) {
    keyed_runs.fetch_add(1);
    return Outcome::kDone;
  });
  ASSERT_TRUE(block.ok() && keyed.ok());
  ASSERT_TRUE(engine->start().ok());
  ASSERT_TRUE(engine->submit(*block, "").ok());
  ASSERT_TRUE(WaitUntil([&] { return started.load(); }));
  auto first = engine->submit(*keyed, "1", {.unique_key = "order-7"});
  ASSERT_TRUE(first.ok());
  auto c = engine->cancel(*first);
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(*c, CancelResult::kCancelled);
  // The worker has not reached the cancelled job (it is blocked), yet the
  // key is free: a new job with it is accepted, under its own id.
  auto second = engine->submit(*keyed, "2", {.unique_key = "order-7"});
  ASSERT_TRUE(second.ok());
  EXPECT_NE(*second, *first);
  // And the key now belongs to the second job.
  auto third = engine->submit(*keyed, "3", {.unique_key = "order-7"});
  ASSERT_TRUE(third.ok());
  EXPECT_EQ(*third, *second);
  gate.open();
  auto report = engine->stop();
  ASSERT_TRUE(report.ok());
  EXPECT_EQ(keyed_runs.load(), 1);
  EXPECT_EQ(report->cancelled, 1u);
}

// cancel() looks a job up through the id hint of the slot it was stamped
// into; once enough later ids have overwritten that hint (the hint table has
// one entry per slot, 64 here), only the scan of the table can find it.
TEST(CancelTest, AJobWhoseIdHintLaterJobsTookOverIsStillFound) {
  auto clock = std::make_shared<ManualClock>();
  EngineOptions o = TestOptions(clock);
  o.capacity = 64;
  std::atomic<int> ran{0};
  auto engine = Engine::open(o);
  ASSERT_TRUE(engine.ok());
  auto h = engine->register_handler("h", [&](JobContext&) {
    ran.fetch_add(1);
    return Outcome::kDone;
  });
  ASSERT_TRUE(engine->start().ok());
  auto delayed = engine->submit(*h, "later", {.delay = hours(1)});
  auto recent = engine->submit(*h, "later too", {.delay = hours(1)});
  ASSERT_TRUE(delayed.ok() && recent.ok());
  // Four times the hint table's size in later jobs, each run at once: ids
  // congruent to `delayed`'s are among them, whatever the id blocks.
  int submitted = 0;
  while (submitted < 4 * 64) {
    auto id = engine->submit(*h, "now");
    if (!id.ok()) {
      ASSERT_EQ(id.status().code(), StatusCode::kQueueFull) << id.status().to_string();
      std::this_thread::yield();
      continue;
    }
    ++submitted;
  }
  ASSERT_TRUE(WaitUntil([&] { return ran.load() == 4 * 64; }));
  auto c = engine->cancel(*delayed);
  ASSERT_TRUE(c.ok()) << c.status().to_string();
  EXPECT_EQ(*c, CancelResult::kCancelled);
  ASSERT_TRUE(WaitUntil([&] { return engine->health().delayed == 1; }));
  auto again = engine->cancel(*delayed);
  EXPECT_EQ(again.status().code(), StatusCode::kNotFound)
      << "a job cancelled and purged is still found";
  auto other = engine->cancel(*recent);
  ASSERT_TRUE(other.ok()) << other.status().to_string();
  EXPECT_EQ(*other, CancelResult::kCancelled);
  ASSERT_TRUE(WaitUntil([&] { return engine->health().delayed == 0; }));
  clock->advance(hours(2));
  LetSchedulerRun();
  EXPECT_EQ(ran.load(), 4 * 64) << "a cancelled job ran";
  auto report = engine->stop();
  ASSERT_TRUE(report.ok());
  EXPECT_EQ(report->cancelled, 2u);
}

// A delayed job cancelled just before stop(): cancel() said kCancelled, so the
// stop report must count it cancelled, not left (kDrain) or dropped (kAbandon),
// however the scheduler's last pass and the stop interleave. Many rounds: the
// old code lost the race in some of them.
TEST(CancelTest, ADelayedJobCancelledJustBeforeStopCountsAsCancelled) {
  for (int round = 0; round < 200; ++round) {
    EngineOptions o = TestOptions(nullptr);
    auto engine = Engine::open(o);
    ASSERT_TRUE(engine.ok());
    auto h = engine->register_handler("h", [](JobContext&) { return Outcome::kDone; });
    ASSERT_TRUE(h.ok());
    ASSERT_TRUE(engine->start().ok());
    auto keep = engine->submit(*h, "stays", {.delay = hours(1)});
    auto gone = engine->submit(*h, "goes", {.delay = hours(1)});
    ASSERT_TRUE(keep.ok() && gone.ok());
    ASSERT_TRUE(WaitUntil([&] { return engine->health().delayed == 2; }));
    auto c = engine->cancel(*gone);
    ASSERT_TRUE(c.ok());
    ASSERT_EQ(*c, CancelResult::kCancelled);
    const StopMode mode = round % 2 == 0 ? StopMode::kDrain : StopMode::kAbandon;
    auto report = engine->stop(mode);
    ASSERT_TRUE(report.ok());
    EXPECT_EQ(report->cancelled, 1u) << "round " << round;
    if (mode == StopMode::kDrain) {
      EXPECT_EQ(report->delayed_left, 1u) << "round " << round;
    } else {
      EXPECT_EQ(report->dropped, 1u) << "round " << round;
    }
    if (HasFailure()) return;
  }
}

// cancel() reaching a job between the worker's look at its cancel bit and
// the retry it schedules (a hook at that point calls cancel()): cancel()
// answers kCancelRequested, and the retry must not wait out its back-off,
// hold its unique key, or count as delayed; it ends as cancelled.
Engine* g_hook_engine = nullptr;
std::atomic<int> g_hook_result{-1};

TEST(CancelTest, ACancelThatMeetsARetryBeingScheduledDropsTheRetry) {
  auto clock = std::make_shared<ManualClock>();
  std::atomic<int> runs{0};
  auto engine = Engine::open(TestOptions(clock));
  ASSERT_TRUE(engine.ok());
  auto h = engine->register_handler("retries", [&](JobContext& job) {
    runs.fetch_add(1);
    job.retry_after(hours(1));
    return Outcome::kRetry;
  });
  ASSERT_TRUE(h.ok());
  ASSERT_TRUE(engine->start().ok());
  g_hook_engine = &*engine;
  g_hook_result.store(-1);
  detail::g_after_cancel_check.store(+[](JobId id) {
    auto r = g_hook_engine->cancel(id);
    g_hook_result.store(r.ok() ? static_cast<int>(*r) : 100);
  });
  auto id = engine->submit(*h, "x", {.unique_key = "order-9"});
  ASSERT_TRUE(id.ok());
  ASSERT_TRUE(WaitUntil([&] { return g_hook_result.load() != -1; }));
  detail::g_after_cancel_check.store(nullptr);
  EXPECT_EQ(g_hook_result.load(), static_cast<int>(CancelResult::kCancelRequested));
  EXPECT_TRUE(WaitUntil([&] {
    const Health health = engine->health();
    return health.delayed == 0 && health.cancelled == 1;
  })) << "the cancelled job waits in the scheduler for its retry";
  auto fresh = engine->submit(*h, "y", {.unique_key = "order-9"});
  ASSERT_TRUE(fresh.ok());
  EXPECT_NE(*fresh, *id) << "the cancelled job still holds its unique key";
  ASSERT_TRUE(WaitUntil([&] { return runs.load() == 2; }));
  auto report = engine->stop(StopMode::kAbandon);
  ASSERT_TRUE(report.ok());
  EXPECT_EQ(report->cancelled, 1u);
}

JobId g_hook_other = 0;
JobId g_hook_target = 0;

TEST(CancelTest, ADelayedJobRetiredByAnEarlierCancelsPurgeAfterTheCasIsCancelled) {
  // cancel(b) sets b's bit; before it reads b's state, a cancel(a) sets the
  // scheduler's purge off, which retires every cancelled delayed job, b too.
  // b never ran: the answer is kCancelled (it was kCancelRequested, "running
  // or starting", 2 times in 1,000 in BM_Cancel).
  auto clock = std::make_shared<ManualClock>();
  std::atomic<int> runs{0};
  auto engine = Engine::open(TestOptions(clock));
  ASSERT_TRUE(engine.ok());
  auto h = engine->register_handler("later", [&](JobContext&) {
    runs.fetch_add(1);
    return Outcome::kDone;
  });
  ASSERT_TRUE(h.ok());
  ASSERT_TRUE(engine->start().ok());
  auto a = engine->submit(*h, "a", {.delay = hours(1)});
  auto b = engine->submit(*h, "b", {.delay = hours(1)});
  ASSERT_TRUE(a.ok() && b.ok());
  g_hook_engine = &*engine;
  g_hook_other = *a;
  g_hook_target = *b;
  g_hook_result.store(-1);
  detail::g_cancel_after_cas.store(+[](JobId id) {
    if (id != g_hook_target) return;  // the hook's own cancel(a)
    auto r = g_hook_engine->cancel(g_hook_other);
    g_hook_result.store(r.ok() ? static_cast<int>(*r) : 100);
    // The purge retires both: b is retired between our CAS and state read.
    (void)WaitUntil([] { return g_hook_engine->health().cancelled == 2; });
  });
  auto r = engine->cancel(*b);
  detail::g_cancel_after_cas.store(nullptr);
  ASSERT_TRUE(r.ok()) << r.status().to_string();
  EXPECT_EQ(g_hook_result.load(), static_cast<int>(CancelResult::kCancelled));
  EXPECT_EQ(engine->health().cancelled, 2u) << "the purge never ran inside the hook";
  EXPECT_EQ(*r, CancelResult::kCancelled) << "a job that never ran was answered as running";
  auto report = engine->stop(StopMode::kDrain);
  ASSERT_TRUE(report.ok());
  EXPECT_EQ(runs.load(), 0);
  EXPECT_EQ(report->cancelled, 2u);
}

TEST(CancelTest, ConcurrentCancelsNeverLetACancelledJobRunAndAccountForEveryJob) {
  EngineOptions o;
  o.workers = 2;
  o.capacity = 1 << 14;
  o.max_attempts = 1;
  o.idle = IdleStrategy::kSpinThenBlock;
  // Used by handlers: declared before the engine, so they outlive its drain.
  std::atomic<int> submitted{0};
  constexpr int kJobs = 6000;
  std::vector<std::atomic<int>> ran(kJobs);
  auto engine = Engine::open(o);
  ASSERT_TRUE(engine.ok());
  auto h = engine->register_handler("c", [&](JobContext& job) {
    const int i = std::stoi(std::string(job.payload()));
    ran[static_cast<std::size_t>(i)].fetch_add(1);
    return Outcome::kDone;
  });
  ASSERT_TRUE(engine->start().ok());
  std::vector<JobId> ids(kJobs);
  std::vector<std::atomic<int>> outcome(kJobs);  // 0 none, 1 cancelled, 2 requested, 3 not found
  std::thread submitter([&] {
    for (int i = 0; i < kJobs; ++i) {
      SubmitOptions so;
      if (i % 3 == 0) so.delay = std::chrono::microseconds(50 * (i % 40));
      auto id = engine->submit(*h, std::to_string(i), so);
      if (!id.ok()) {
        ADD_FAILURE() << id.status().to_string();
        return;
      }
      ids[static_cast<std::size_t>(i)] = *id;
      submitted.store(i + 1, std::memory_order_release);
    }
  });
  std::thread canceller([&] {
    std::uint64_t x = 88172645463325252ull;
    int done_cancels = 0;
    while (done_cancels < kJobs / 3) {
      const int n = submitted.load(std::memory_order_acquire);
      if (n == 0) continue;
      x ^= x << 13; x ^= x >> 7; x ^= x << 17;
      const int i = static_cast<int>(x % static_cast<std::uint64_t>(n));
      if (outcome[static_cast<std::size_t>(i)].load() != 0) continue;
      auto r = engine->cancel(ids[static_cast<std::size_t>(i)]);
      int v = 3;
      if (r.ok()) v = *r == CancelResult::kCancelled ? 1 : 2;
      outcome[static_cast<std::size_t>(i)].store(v);
      ++done_cancels;
    }
  });
  submitter.join();
  canceller.join();
  ASSERT_TRUE(WaitUntil([&] { return engine->health().pending == 0; }));
  auto report = engine->stop(StopMode::kDrain);
  ASSERT_TRUE(report.ok());
  int cancelled = 0, requested_ran = 0;
  for (int i = 0; i < kJobs; ++i) {
    const int r = ran[static_cast<std::size_t>(i)].load();
    const int c = outcome[static_cast<std::size_t>(i)].load();
    ASSERT_LE(r, 1) << "job " << i << " ran twice";
    if (c == 1) {
      ASSERT_EQ(r, 0) << "job " << i << " ran after cancel() said kCancelled";
      ++cancelled;
    }
    if (c == 3) {
      ASSERT_EQ(r, 1) << "job " << i << ": cancel() said not found but it never ran";
    }
    if (c == 2 && r == 1) ++requested_ran;
  }
  EXPECT_EQ(report->done + report->cancelled, static_cast<std::uint64_t>(kJobs));
  EXPECT_GE(report->cancelled, static_cast<std::uint64_t>(cancelled));
  EXPECT_EQ(report->delayed_left, 0u);
}

// ---- deadlines -------------------------------------------------------------------

TEST(DeadlineTest, AJobPastItsDeadlineIsReportedStuckAndCounted) {
  auto clock = std::make_shared<ManualClock>();
  // Used by handlers: declared before the engine, so they outlive its drain.
  Gate gate;
  std::atomic<bool> started{false};
  std::atomic<bool> had_deadline{false};
  auto engine = Engine::open(TestOptions(clock));
  ASSERT_TRUE(engine.ok());
  GateOpener opener{gate};
  auto h = engine->register_handler("slow", [&](JobContext& job) {
    had_deadline.store(job.deadline() != steady_clock::time_point::max());
    started.store(true);
    gate.wait();
    return Outcome::kDone;
  });
  ASSERT_TRUE(engine->start().ok());
  auto id = engine->submit(*h, "", {.deadline = minutes(5)});
  ASSERT_TRUE(id.ok());
  ASSERT_TRUE(WaitUntil([&] { return started.load(); }));
  EXPECT_TRUE(had_deadline.load());
  Health before = engine->health();
  EXPECT_EQ(before.stuck, 0u);
  EXPECT_TRUE(before.ok);
  clock->advance(minutes(6));
  Health after = engine->health();
  EXPECT_EQ(after.stuck, 1u);
  EXPECT_FALSE(after.ok);
  ASSERT_FALSE(after.reasons.empty());
  EXPECT_NE(after.reasons[0].find("job " + std::to_string(*id)), std::string::npos) << after.reasons[0];
  gate.open();
  ASSERT_TRUE(WaitUntil([&] { return engine->health().stuck_total == 1; }));
  EXPECT_EQ(engine->health().stuck, 0u);
  EXPECT_TRUE(engine->health().ok);
}

TEST(DeadlineTest, HandlerDeadlineAppliesAndNoDeadlineMeansNone) {
  auto clock = std::make_shared<ManualClock>();
  // Used by handlers: declared before the engine, so they outlive its drain.
  std::atomic<int> with{0}, without{0};
  auto engine = Engine::open(TestOptions(clock));
  ASSERT_TRUE(engine.ok());
  HandlerOptions ho;
  ho.deadline = seconds(30);
  auto a = engine->register_handler("a", [&](JobContext& job) {
    if (job.deadline() != steady_clock::time_point::max()) with.fetch_add(1);
    return Outcome::kDone;
  }, ho);
  auto b = engine->register_handler("b", [&](JobContext& job) {
    if (job.deadline() == steady_clock::time_point::max()) without.fetch_add(1);
    return Outcome::kDone;
  });
  ASSERT_TRUE(engine->start().ok());
  ASSERT_TRUE(engine->submit(*a, "").ok());
  ASSERT_TRUE(engine->submit(*b, "").ok());
  EXPECT_TRUE(WaitUntil([&] { return with.load() == 1 && without.load() == 1; }));
}

// ---- unique keys -----------------------------------------------------------------

TEST(UniqueKeyTest, ASecondSubmitWhileTheFirstIsPendingReturnsTheFirstId) {
  auto clock = std::make_shared<ManualClock>();
  // Used by handlers: declared before the engine, so they outlive its drain.
  std::atomic<int> runs{0};
  auto engine = Engine::open(TestOptions(clock));
  ASSERT_TRUE(engine.ok());
  auto h = engine->register_handler("k", [&](JobContext&) {
    runs.fetch_add(1);
    return Outcome::kDone;
  });
  ASSERT_TRUE(engine->start().ok());
  auto first = engine->submit(*h, "1", {.delay = hours(1), .unique_key = "invoice-7"});
  auto second = engine->submit(*h, "2", {.unique_key = "invoice-7"});
  auto other = engine->submit(*h, "3", {.delay = hours(1), .unique_key = "invoice-8"});
  ASSERT_TRUE(first.ok() && second.ok() && other.ok());
  EXPECT_EQ(*second, *first);
  EXPECT_NE(*other, *first);
  EXPECT_EQ(engine->health().submitted, 2u);
  // Cancelled: the key is free again.
  ASSERT_TRUE(engine->cancel(*other).ok());
  ASSERT_TRUE(WaitUntil([&] { return engine->health().delayed == 1; }));
  auto third = engine->submit(*h, "4", {.unique_key = "invoice-8"});
  ASSERT_TRUE(third.ok());
  EXPECT_NE(*third, *other);
  // Finished: free again too.
  clock->advance(hours(1));
  // The worker frees the key after the handler returns, then counts the run
  // done: wait for the count, not the run.
  ASSERT_TRUE(WaitUntil([&] { return runs.load() == 2 && engine->health().done == 2; }));
  auto fourth = engine->submit(*h, "5", {.unique_key = "invoice-7"});
  ASSERT_TRUE(fourth.ok());
  EXPECT_NE(*fourth, *first);
  EXPECT_EQ(engine->submit(*h, "", {.unique_key = std::string(256, 'k')}).status().code(),
            StatusCode::kInvalidArgument);
}

// ---- stop modes --------------------------------------------------------------------

TEST(StopModeTest, DrainRunsQueuedJobsAndLeavesWhatIsNotDueYet) {
  auto clock = std::make_shared<ManualClock>();
  EngineOptions o = TestOptions(clock);
  o.retry.initial_backoff = minutes(1);
  o.retry.max_backoff = minutes(1);
  // Used by handlers: declared before the engine, so they outlive its drain.
  std::atomic<int> runs{0};
  Gate gate;
  auto engine = Engine::open(o);
  ASSERT_TRUE(engine.ok());
  GateOpener opener{gate};
  auto h = engine->register_handler("d", [&](JobContext& job) {
    runs.fetch_add(1);
    if (job.payload() == "first") gate.wait();
    return job.payload() == "retry" ? Outcome::kRetry : Outcome::kDone;
  });
  ASSERT_TRUE(engine->start().ok());
  ASSERT_TRUE(engine->submit(*h, "first").ok());
  ASSERT_TRUE(WaitUntil([&] { return runs.load() == 1; }));
  for (int i = 0; i < 5; ++i) ASSERT_TRUE(engine->submit(*h, "queued").ok());
  ASSERT_TRUE(engine->submit(*h, "retry").ok());  // fails during the drain: backoff 1 min
  ASSERT_TRUE(engine->submit(*h, "later", {.delay = hours(3)}).ok());
  std::thread opener_thread([&] {
    std::this_thread::sleep_for(milliseconds(20));
    gate.open();
  });
  auto report = engine->stop(StopMode::kDrain);
  opener_thread.join();
  ASSERT_TRUE(report.ok()) << report.status().to_string();
  EXPECT_EQ(runs.load(), 7) << "first, 5 queued, and the retry's first attempt";
  EXPECT_EQ(report->done, 6u);
  EXPECT_EQ(report->delayed_left, 2u) << "the retry in backoff and the delayed job";
  EXPECT_EQ(engine->submit(*h, "").status().code(), StatusCode::kStopped);
}

// Delayed jobs that fall due while a drain waits for a running job are run,
// not left: the drain ends only once nothing held back is due. Before, the
// worker compared the pending count with what the scheduler held at its last
// pass, which still counted them, and left (most of the 50, 4 runs in 5).
TEST(StopModeTest, JobsThatFallDueDuringTheDrainRun) {
  auto clock = std::make_shared<ManualClock>();
  Gate gate;
  std::atomic<int> runs{0};
  auto engine = Engine::open(TestOptions(clock));
  ASSERT_TRUE(engine.ok());
  GateOpener opener{gate};
  auto slow = engine->register_handler("slow", [&](JobContext&) {
    gate.wait();
    return Outcome::kDone;
  });
  auto quick = engine->register_handler("quick", [&](JobContext&) {
    runs.fetch_add(1);
    return Outcome::kDone;
  });
  ASSERT_TRUE(engine->start().ok());
  ASSERT_TRUE(engine->submit(*slow, "").ok());
  ASSERT_TRUE(WaitUntil([&] { return engine->health().running == 1; }));
  constexpr int kDelayed = 50;
  for (int i = 0; i < kDelayed; ++i) {
    ASSERT_TRUE(engine->submit(*quick, "", {.delay = hours(1)}).ok());
  }
  ASSERT_TRUE(engine->submit(*quick, "", {.delay = hours(3)}).ok());  // not due: left
  std::thread stopper;
  Result<StopReport> report = Status(StatusCode::kInternal, "not stopped");
  stopper = std::thread([&] { report = engine->stop(StopMode::kDrain); });
  EXPECT_TRUE(WaitUntil([&] { return engine->health().state == EngineState::kStopping; }));
  std::this_thread::sleep_for(milliseconds(20));  // the scheduler has held them back by now
  clock->advance(hours(2));                       // 50 are due now
  gate.open();                                    // the slow job ends during the drain
  stopper.join();
  ASSERT_TRUE(report.ok()) << report.status().to_string();
  EXPECT_EQ(runs.load(), kDelayed);
  EXPECT_EQ(report->delayed_left, 1u);
  EXPECT_EQ(report->done, static_cast<std::uint64_t>(kDelayed) + 1);
}

TEST(StopModeTest, AKeyedSubmitToAStoppedEngineIsStoppedNotTheIdItsKeyNamed) {
  // The delayed keyed job is left behind by the drain (delayed_left), its key
  // still recorded: a submit with that key used to answer OK with its id, as
  // if the job were pending in a running engine.
  auto clock = std::make_shared<ManualClock>();
  auto engine = Engine::open(TestOptions(clock));
  ASSERT_TRUE(engine.ok());
  auto h = engine->register_handler("k", [](JobContext&) { return Outcome::kDone; });
  ASSERT_TRUE(engine->start().ok());
  auto id = engine->submit(*h, "x", {.delay = hours(1), .unique_key = "invoice-7"});
  ASSERT_TRUE(id.ok());
  auto report = engine->stop(StopMode::kDrain);
  ASSERT_TRUE(report.ok());
  EXPECT_EQ(report->delayed_left, 1u);
  auto again = engine->submit(*h, "x", {.unique_key = "invoice-7"});
  EXPECT_EQ(again.status().code(), StatusCode::kStopped)
      << (again.ok() ? "answered with id " + std::to_string(*again) : again.status().to_string());
}

TEST(StopModeTest, QueuedJobsCancelledBeforeAnAbandonCountAsCancelledNotDropped) {
  // cancel() answered kCancelled for them; stop(kAbandon) counted them as
  // dropped. One sits in the worker's dequeued batch behind a blocked job,
  // the other in the queue.
  auto clock = std::make_shared<ManualClock>();
  EngineOptions o = TestOptions(clock);
  std::atomic<int> runs{0};
  Gate gate;
  auto engine = Engine::open(o);
  ASSERT_TRUE(engine.ok());
  GateOpener opener{gate};
  auto h = engine->register_handler("q", [&](JobContext& job) {
    runs.fetch_add(1);
    if (job.payload() == "block") gate.wait();
    return Outcome::kDone;
  });
  ASSERT_TRUE(engine->start().ok());
  const JobSpec batch[] = {{*h, "block", {}}, {*h, "in-batch", {}}, {*h, "kept", {}}};
  JobId ids[3] = {};
  ASSERT_TRUE(engine->submit_batch(batch, ids).ok());
  ASSERT_TRUE(WaitUntil([&] { return runs.load() == 1; }));
  auto queued = engine->submit(*h, "in-queue");
  ASSERT_TRUE(queued.ok());
  for (JobId id : {ids[1], *queued}) {
    auto r = engine->cancel(id);
    ASSERT_TRUE(r.ok()) << r.status().to_string();
    EXPECT_EQ(*r, CancelResult::kCancelled);
  }
  std::thread opener_thread([&] {
    // Usually after stop() set abandon_ (a few instructions after kStopping).
    // If the worker goes on before it sees it, it runs "kept" and meets the
    // cancelled two itself (cancelled all the same): the counts below hold
    // either way.
    (void)WaitUntil([&] { return engine->state() == EngineState::kStopping; });
    std::this_thread::sleep_for(milliseconds(20));
    gate.open();
  });
  auto report = engine->stop(StopMode::kAbandon);
  opener_thread.join();
  ASSERT_TRUE(report.ok()) << report.status().to_string();
  EXPECT_EQ(report->cancelled, 2u) << "cancel() answered kCancelled for both";
  EXPECT_EQ(report->done, static_cast<std::uint64_t>(runs.load()));
  EXPECT_EQ(report->done + report->dropped, 2u) << "the blocker, and \"kept\" run or dropped";
}

TEST(StopModeTest, AbandonDropsDelayedJobsToo) {
  auto clock = std::make_shared<ManualClock>();
  auto engine = Engine::open(TestOptions(clock));
  ASSERT_TRUE(engine.ok());
  auto h = engine->register_handler("a", [](JobContext&) { return Outcome::kDone; });
  ASSERT_TRUE(engine->start().ok());
  for (int i = 0; i < 3; ++i) ASSERT_TRUE(engine->submit(*h, "", {.delay = hours(1)}).ok());
  ASSERT_TRUE(WaitUntil([&] { return engine->health().delayed == 3; }));
  auto report = engine->stop(StopMode::kAbandon);
  ASSERT_TRUE(report.ok());
  EXPECT_EQ(report->dropped, 3u);
  EXPECT_EQ(report->delayed_left, 0u);
}

// ---- snapshot round trip ----------------------------------------------------------

std::vector<unsigned char> ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

TEST(SemanticsSnapshotTest, EveryStateAttemptRunAtKeyDeadlineAndDeadReasonSurvive) {
  Tmp dir;
  auto clock = std::make_shared<ManualClock>();
  EngineOptions o = TestOptions(clock);
  o.snapshot.enabled = true;
  o.snapshot.dir = dir.str();
  o.snapshot.disk_interval = milliseconds(0);
  o.snapshot.shm_interval = milliseconds(0);
  o.retry.initial_backoff = hours(2);
  o.retry.max_backoff = hours(2);
  JobId delayed_id = 0, retry_id = 0, dead_id = 0;
  std::int64_t delayed_run_at = 0;
  // Used by the second engine's handler: declared before it.
  std::atomic<int> later_runs{0};
  {
    auto engine = Engine::open(o);
    ASSERT_TRUE(engine.ok()) << engine.status().to_string();
    auto h = engine->register_handler("job", [](JobContext& job) {
      if (job.payload() == "dies") {
        job.set_error("no such account");
        return Outcome::kFail;
      }
      return Outcome::kRetry;
    });
    ASSERT_TRUE(engine->start().ok());
    const auto before = std::chrono::system_clock::now();
    delayed_id = *engine->submit(*h, "later",
                                 {.delay = hours(1), .deadline = seconds(9), .unique_key = "k1"});
    delayed_run_at = std::chrono::duration_cast<std::chrono::nanoseconds>(
                         (before + hours(1)).time_since_epoch())
                         .count();
    retry_id = *engine->submit(*h, "retries");
    dead_id = *engine->submit(*h, "dies");
    ASSERT_TRUE(WaitUntil([&] {
      const Health hh = engine->health();
      return hh.delayed == 2 && hh.dead == 1;
    })) << "delayed " << engine->health().delayed << " dead " << engine->health().dead
        << " pending " << engine->health().pending;
    auto report = engine->stop(StopMode::kSnapshotAndExit);
    ASSERT_TRUE(report.ok()) << report.status().to_string();
    // The delayed job and the one waiting to retry resume; the dead letter
    // is in the snapshot too, but is not left to run.
    EXPECT_EQ(report->left_in_snapshot, 2u);
  }
  // The newest generation holds each job as it was.
  std::string newest;
  for (const auto& e : std::filesystem::directory_iterator(dir.str())) {
    const std::string name = e.path().filename().string();
    if (name.rfind("gen-", 0) == 0 && name > std::filesystem::path(newest).filename().string()) {
      newest = e.path().string();
    }
  }
  ASSERT_FALSE(newest.empty());
  const auto bytes = ReadFile(newest);
  auto view = snapshot::decode(bytes);
  ASSERT_TRUE(view.ok()) << view.status().to_string();
  std::map<JobId, snapshot::JobRecordView> by_id;
  for (const auto& j : view->jobs) by_id[j.id] = j;
  ASSERT_EQ(by_id.size(), 3u);
  const auto& d = by_id[delayed_id];
  EXPECT_EQ(d.state, snapshot::JobState::kDelayed);
  EXPECT_EQ(d.key, "k1");
  EXPECT_EQ(d.deadline_ns, 9'000'000'000u);
  EXPECT_NEAR(static_cast<double>(d.run_at_ns), static_cast<double>(delayed_run_at), 2e9);
  const auto& r = by_id[retry_id];
  EXPECT_EQ(r.state, snapshot::JobState::kWaitingRetry);
  EXPECT_EQ(r.attempts, 1u);
  const auto& x = by_id[dead_id];
  EXPECT_EQ(x.state, snapshot::JobState::kDead);
  EXPECT_EQ(x.dead_reason, snapshot::DeadReason::kFailed);
  EXPECT_EQ(x.error, "no such account");
  EXPECT_NE(x.dead_at_ns, 0);

  // A new engine resumes them: delayed ones wait again, keys hold, dead stay dead.
  auto clock2 = std::make_shared<ManualClock>();
  o.test_clock = clock2;
  auto engine = Engine::open(o);
  ASSERT_TRUE(engine.ok()) << engine.status().to_string();
  auto h = engine->register_handler("job", [&](JobContext& job) {
    if (job.payload() == "later") later_runs.fetch_add(1);
    return Outcome::kDone;
  });
  auto start = engine->start();
  ASSERT_TRUE(start.ok()) << start.status().to_string();
  EXPECT_EQ(start->recovery.delayed, 2u);
  EXPECT_EQ(start->recovery.dead, 1u);
  auto dead = engine->dead_letters();
  ASSERT_EQ(dead.size(), 1u);
  EXPECT_EQ(dead[0].id, dead_id);
  EXPECT_EQ(dead[0].error, "no such account");
  auto same = engine->submit(*h, "dup", {.unique_key = "k1"});
  ASSERT_TRUE(same.ok());
  EXPECT_EQ(*same, delayed_id) << "the unique key did not survive the restore";
  LetSchedulerRun();
  EXPECT_EQ(later_runs.load(), 0);
  clock2->advance(hours(1) + seconds(5));
  EXPECT_TRUE(WaitUntil([&] { return later_runs.load() == 1; }));
  EXPECT_TRUE(WaitUntil([&] { return engine->health().delayed == 1; }))  // the retry, 2 h out
      << "delayed " << engine->health().delayed << " done " << engine->health().done << " retry run_at - now (s) "
      << (r.run_at_ns - std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::system_clock::now().time_since_epoch()).count()) / 1e9;
}

// Five delayed "email" jobs in a durable generation in `dir`; their ids.
std::vector<JobId> SnapshotFiveDelayedEmails(const Tmp& dir) {
  auto clock = std::make_shared<ManualClock>();
  EngineOptions o = TestOptions(clock);
  o.snapshot.enabled = true;
  o.snapshot.dir = dir.str();
  o.snapshot.disk_interval = milliseconds(0);
  o.snapshot.shm_interval = milliseconds(0);
  std::vector<JobId> ids;
  auto engine = Engine::open(o);
  if (!engine.ok()) return ids;
  auto h = engine->register_handler("email", [](JobContext&) { return Outcome::kDone; });
  if (!h.ok() || !engine->start().ok()) return ids;
  for (int i = 0; i < 5; ++i) {
    auto id = engine->submit(*h, "to:" + std::to_string(i), {.delay = hours(1)});
    if (id.ok()) ids.push_back(*id);
  }
  if (!engine->snapshot_now().ok()) ids.clear();
  return ids;
}

TEST(SemanticsSnapshotTest, MetricsStayReadableAfterAStartThatFailed) {
  // start() refuses a snapshot with more live jobs than capacity (documented,
  // recoverable); metrics_text() then dereferenced a per-handler array that
  // only a successful start() had made.
  Tmp dir;
  ASSERT_EQ(SnapshotFiveDelayedEmails(dir).size(), 5u);
  auto clock = std::make_shared<ManualClock>();
  EngineOptions o = TestOptions(clock);
  o.capacity = 2;
  o.snapshot.enabled = true;
  o.snapshot.dir = dir.str();
  auto engine = Engine::open(o);
  ASSERT_TRUE(engine.ok()) << engine.status().to_string();
  ASSERT_TRUE(engine->register_handler("email", [](JobContext&) { return Outcome::kDone; }).ok());
  auto start = engine->start();
  ASSERT_FALSE(start.ok());
  EXPECT_EQ(start.status().code(), StatusCode::kFailedPrecondition);
  EXPECT_NE(engine->metrics_text().find("jobengine_"), std::string::npos);
  EXPECT_FALSE(engine->metrics_json().empty());
}

TEST(SemanticsSnapshotTest, LettersOfJobsWhoseHandlerIsGoneAreNeverDiscardedForFailedOnes) {
  // Five jobs come back dead because their handler is not registered; with
  // max_dead 2 the first failure of another job used to discard four of
  // them (and the next snapshot made the loss permanent).
  Tmp dir;
  const std::vector<JobId> ids = SnapshotFiveDelayedEmails(dir);
  ASSERT_EQ(ids.size(), 5u);
  auto clock = std::make_shared<ManualClock>();
  EngineOptions o = TestOptions(clock);
  o.max_dead = 2;
  o.max_attempts = 1;
  o.snapshot.enabled = true;
  o.snapshot.dir = dir.str();
  o.snapshot.disk_interval = milliseconds(0);
  o.snapshot.shm_interval = milliseconds(0);
  auto engine = Engine::open(o);
  ASSERT_TRUE(engine.ok()) << engine.status().to_string();
  auto fails = engine->register_handler("fails", [](JobContext&) { return Outcome::kFail; });
  ASSERT_TRUE(fails.ok());
  auto start = engine->start();
  ASSERT_TRUE(start.ok()) << start.status().to_string();
  EXPECT_EQ(start->recovery.unknown_handler, 5u);
  EXPECT_EQ(engine->health().dead_total, 5u) << "quarantined at start() but not counted as dying";
  for (int i = 0; i < 3; ++i) ASSERT_TRUE(engine->submit(*fails, "f").ok());
  ASSERT_TRUE(WaitUntil([&] { return engine->health().dead_total == 8; }));
  const Health health = engine->health();
  EXPECT_EQ(health.dead_discarded, 3u) << "the failed ones go, the kept ones stay";
  std::vector<JobId> kept;
  for (const DeadLetter& d : engine->dead_letters()) {
    if (d.reason == DeadReason::kNoHandler) kept.push_back(d.id);
  }
  EXPECT_EQ(kept, ids);
  ASSERT_TRUE(engine->snapshot_now().ok());
}

// ---- metrics and health -------------------------------------------------------------

TEST(MetricsTest, CountersPerHandlerAndHistogramsReachTheExposition) {
  EngineOptions o = TestOptions(nullptr);
  o.time_every_run = true;  // exact histogram counts (else fast runs are sampled)
  auto engine = Engine::open(o);
  ASSERT_TRUE(engine.ok());
  auto ok = engine->register_handler("thumb", [](JobContext&) { return Outcome::kDone; });
  auto bad = engine->register_handler("mail", [](JobContext&) { return Outcome::kFail; });
  ASSERT_TRUE(engine->start().ok());
  for (int i = 0; i < 7; ++i) ASSERT_TRUE(engine->submit(*ok, "").ok());
  ASSERT_TRUE(engine->submit(*bad, "").ok());
  ASSERT_TRUE(WaitUntil([&] { return engine->health().pending == 0; }));
  const std::string text = engine->metrics_text();
  for (const char* line : {"jobengine_jobs_submitted_total{handler=\"thumb\"} 7",
                           "jobengine_jobs_done_total{handler=\"thumb\"} 7",
                           "jobengine_jobs_started_total{handler=\"thumb\"} 7",
                           "jobengine_jobs_started_total{handler=\"mail\"} 1",
                           "jobengine_jobs_failed_total{handler=\"mail\"} 1",
                           "jobengine_run_seconds_count{handler=\"thumb\"} 7",
                           "jobengine_queue_wait_seconds_count{handler=\"thumb\"} 7",
                           "jobengine_dead 1"}) {
    EXPECT_NE(text.find(line), std::string::npos) << "missing: " << line << "\n" << text;
  }
  const std::string json = engine->metrics_json();
  EXPECT_NE(json.find("\"thumb\""), std::string::npos);
  EXPECT_EQ(json.front(), '{');
}

TEST(HealthTest, PendingAboveTheHighWaterMarkIsAReason) {
  EngineOptions o = TestOptions(nullptr);
  o.queue_high_water = 2;
  // Used by handlers: declared before the engine, so they outlive its drain.
  Gate gate;
  auto engine = Engine::open(o);
  ASSERT_TRUE(engine.ok());
  GateOpener opener{gate};
  auto h = engine->register_handler("h", [&](JobContext&) {
    gate.wait();
    return Outcome::kDone;
  });
  ASSERT_TRUE(engine->start().ok());
  for (int i = 0; i < 4; ++i) ASSERT_TRUE(engine->submit(*h, "").ok());
  const Health health = engine->health();
  EXPECT_FALSE(health.ok);
  bool found = false;
  for (const auto& r : health.reasons) found = found || r.find("high-water") != std::string::npos;
  EXPECT_TRUE(found);
  gate.open();
  EXPECT_TRUE(WaitUntil([&] { return engine->health().ok; }));
}

}  // namespace
}  // namespace jobengine
