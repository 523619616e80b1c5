// Tests for the public Engine API (jobengine/engine.h): every call, every
// error it documents, and the behaviour the header comments promise.
//
// Timings never decide a result here: a test that waits for jobs waits with a
// generous bound (kWaitTimeout) and fails with a message saying what it
// waited for. Sleeps only make a scenario likely (workers asleep, a stop in
// progress); the checks hold whatever the scheduler does.
#include "jobengine/engine.h"
#include "engine/padded.h"      // g_fail_queue_alloc_in
#include "engine/test_hooks.h"  // g_before_batch
#include "tests/engine/test_support.h"

#include <gtest/gtest.h>
#include <pthread.h>
#include <sched.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <functional>
#include <barrier>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <span>
#include <stdexcept>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

namespace jobengine {
namespace {

using std::chrono::milliseconds;
using std::chrono::steady_clock;

using testing_support::Gate;
using testing_support::GateOpener;
using testing_support::kWaitTimeout;
using testing_support::WaitUntil;

// ---- helpers ----------------------------------------------------------------

[[maybe_unused]] const Status& StatusOf(const Status& s) { return s; }
template <typename T>
const Status& StatusOf(const Result<T>& r) {
  return r.status();
}

template <typename R>
::testing::AssertionResult IsOk(const R& r) {
  const Status& s = StatusOf(r);
  if (s.ok()) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "expected OK, got " << s.to_string();
}

// Checks the code, and that the message mentions `needle` when one is given.
template <typename R>
::testing::AssertionResult HasError(const R& r, StatusCode code, std::string_view needle = {}) {
  const Status& s = StatusOf(r);
  if (s.code() != code) {
    return ::testing::AssertionFailure()
           << "expected " << status_code_name(code) << ", got " << s.to_string();
  }
  if (!needle.empty() && s.message().find(needle) == std::string::npos) {
    return ::testing::AssertionFailure()
           << "message \"" << s.message() << "\" does not mention \"" << needle << "\"";
  }
  return ::testing::AssertionSuccess();
}

// A handler that counts its runs.
Handler Counting(std::atomic<int>& runs) {
  return [&runs](JobContext&) {
    runs.fetch_add(1, std::memory_order_relaxed);
    return Outcome::kDone;
  };
}

// A handler that says it started, then waits for the gate.
Handler Blocking(std::atomic<int>& started, Gate& gate) {
  return [&started, &gate](JobContext&) {
    started.fetch_add(1);
    gate.wait();
    return Outcome::kDone;
  };
}

// Small defaults so that each test's engine is cheap to open.
EngineOptions SmallOptions() {
  EngineOptions o;
  o.capacity = 1024;
  o.workers = 1;
  return o;
}

std::string ThreadName() {
  char name[32] = {};
  pthread_getname_np(pthread_self(), name, sizeof(name));
  return name;
}

// Names (comm) of every thread of this process.
std::vector<std::string> ProcessThreadNames() {
  std::vector<std::string> names;
  std::error_code ec;
  for (const auto& entry : std::filesystem::directory_iterator("/proc/self/task", ec)) {
    std::ifstream in(entry.path() / "comm");
    std::string name;
    if (std::getline(in, name)) names.push_back(name);
  }
  return names;
}

std::vector<int> AllowedCpus() {
  std::vector<int> cpus;
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) != 0) return cpus;
  for (int c = 0; c < CPU_SETSIZE; ++c) {
    if (CPU_ISSET(c, &set)) cpus.push_back(c);
  }
  return cpus;
}

std::string Pattern(std::size_t size, unsigned seed) {
  std::string s(size, '\0');
  for (std::size_t i = 0; i < size; ++i) {
    s[i] = static_cast<char>((i * 131 + seed * 7 + (i >> 8)) & 0xff);
  }
  return s;
}

// ---- open() -----------------------------------------------------------------

TEST(EngineOpenTest, DefaultOptionsOpen) {
  auto engine = Engine::open(EngineOptions{});
  ASSERT_TRUE(IsOk(engine));
  EXPECT_EQ(engine->state(), EngineState::kOpen);
}

TEST(EngineOpenTest, OptionsAreKept) {
  EngineOptions o = SmallOptions();
  o.workers = 2;
  o.capacity = 333;
  o.max_payload = 5000;
  o.max_attempts = 7;
  o.retry.initial_backoff = std::chrono::nanoseconds(0);  // retries requeue at once
  o.fairness_period = 3;
  o.dequeue_batch = 9;
  o.spin_iterations = 11;
  o.idle = IdleStrategy::kSpinThenYield;
  auto engine = Engine::open(o);
  ASSERT_TRUE(IsOk(engine));
  const EngineOptions& kept = engine->options();
  EXPECT_EQ(kept.workers, 2u);
  EXPECT_EQ(kept.capacity, 333u);
  EXPECT_EQ(kept.max_payload, 5000u);
  EXPECT_EQ(kept.max_attempts, 7u);
  EXPECT_EQ(kept.fairness_period, 3u);
  EXPECT_EQ(kept.dequeue_batch, 9u);
  EXPECT_EQ(kept.spin_iterations, 11u);
  EXPECT_EQ(kept.idle, IdleStrategy::kSpinThenYield);
}

TEST(EngineOpenTest, ZeroWorkersIsInvalidArgumentNamingWorkers) {
  EngineOptions o = SmallOptions();
  o.workers = 0;
  EXPECT_TRUE(HasError(Engine::open(o), StatusCode::kInvalidArgument, "workers"));
}

TEST(EngineOpenTest, CpusOfWrongLengthIsInvalidArgumentNamingCpus) {
  const std::vector<int> allowed = AllowedCpus();
  ASSERT_FALSE(allowed.empty());
  EngineOptions o = SmallOptions();
  o.workers = 2;
  o.cpus = {allowed[0]};
  EXPECT_TRUE(HasError(Engine::open(o), StatusCode::kInvalidArgument, "cpus"));
  o.workers = 1;
  o.cpus = {allowed[0], allowed[0]};
  EXPECT_TRUE(HasError(Engine::open(o), StatusCode::kInvalidArgument, "cpus"));
}

TEST(EngineOpenTest, NonexistentCpuIsInvalidArgumentNamingTheCpu) {
  EngineOptions o = SmallOptions();
  o.cpus = {100000};
  EXPECT_TRUE(HasError(Engine::open(o), StatusCode::kInvalidArgument, "100000"));
}

TEST(EngineOpenTest, NegativeCpuIsInvalidArgumentNamingTheCpu) {
  EngineOptions o = SmallOptions();
  o.cpus = {-1};
  EXPECT_TRUE(HasError(Engine::open(o), StatusCode::kInvalidArgument, "-1"));
}

TEST(EngineOpenTest, NonexistentCpuWithinCpuSetSizeIsInvalidArgument) {
  // One past the configured CPUs: a valid cpu_set_t index no thread may use.
  const long configured = sysconf(_SC_NPROCESSORS_CONF);
  ASSERT_GT(configured, 0);
  if (configured >= CPU_SETSIZE) GTEST_SKIP() << "every cpu_set_t index is a configured CPU";
  const int cpu = static_cast<int>(configured);
  EngineOptions o = SmallOptions();
  o.workers = 2;
  o.cpus = {AllowedCpus().at(0), cpu};
  EXPECT_TRUE(HasError(Engine::open(o), StatusCode::kInvalidArgument, std::to_string(cpu)));
  o.cpus = {AllowedCpus().at(0), CPU_SETSIZE};
  EXPECT_TRUE(HasError(Engine::open(o), StatusCode::kInvalidArgument, std::to_string(CPU_SETSIZE)));
}

TEST(EngineOpenTest, ZeroCapacityIsInvalidArgumentNamingCapacity) {
  EngineOptions o = SmallOptions();
  o.capacity = 0;
  EXPECT_TRUE(HasError(Engine::open(o), StatusCode::kInvalidArgument, "capacity"));
}

TEST(EngineOpenTest, CapacityAboveTwoToThe31IsInvalidArgumentNamingCapacity) {
  EngineOptions o = SmallOptions();
  o.capacity = (std::size_t{1} << 31) + 1;
  EXPECT_TRUE(HasError(Engine::open(o), StatusCode::kInvalidArgument, "capacity"));
}

TEST(EngineOpenTest, ZeroMaxAttemptsIsInvalidArgumentNamingMaxAttempts) {
  EngineOptions o = SmallOptions();
  o.max_attempts = 0;
  o.retry.initial_backoff = std::chrono::nanoseconds(0);  // retries requeue at once
  EXPECT_TRUE(HasError(Engine::open(o), StatusCode::kInvalidArgument, "max_attempts"));
}

TEST(EngineOpenTest, DequeueBatchOutOfRangeIsInvalidArgumentNamingDequeueBatch) {
  EngineOptions o = SmallOptions();
  o.dequeue_batch = 0;
  EXPECT_TRUE(HasError(Engine::open(o), StatusCode::kInvalidArgument, "dequeue_batch"));
  o.dequeue_batch = 257;
  EXPECT_TRUE(HasError(Engine::open(o), StatusCode::kInvalidArgument, "dequeue_batch"));
}

TEST(EngineOpenTest, UnknownIdleStrategyIsInvalidArgumentNamingIdle) {
  EngineOptions o = SmallOptions();
  o.idle = static_cast<IdleStrategy>(42);
  EXPECT_TRUE(HasError(Engine::open(o), StatusCode::kInvalidArgument, "idle"));
}

// Every other option out of its range: kInvalidArgument with the option's
// name (and the value, where the message promises one), one rule at a time.
TEST(EngineOpenTest, EachOptionOutOfItsRangeIsRefusedNamingIt) {
  const auto with_snapshots = [](EngineOptions& o) {
    o.snapshot.enabled = true;
    o.snapshot.shm_name = "jobengine-never-opened";
  };
  struct Case {
    const char* what;
    std::function<void(EngineOptions&)> set;
    std::string says;
  };
  const std::vector<Case> cases = {
      {"workers 4097", [](EngineOptions& o) { o.workers = 4097; }, "workers must be <= 4096, got 4097"},
      {"max_payload 2^31 + 1", [](EngineOptions& o) { o.max_payload = (std::size_t{1} << 31) + 1; },
       "max_payload must be <= 2^31 bytes, got 2147483649"},
      {"max_attempts 65536", [](EngineOptions& o) { o.max_attempts = 65536; },
       "max_attempts must be 1..65535, got 65536"},
      {"run_deadline -1 ns", [](EngineOptions& o) { o.run_deadline = std::chrono::nanoseconds(-1); },
       "run_deadline must be >= 0"},
      {"dead_growth_window -1 ms",
       [](EngineOptions& o) { o.dead_growth_window = std::chrono::milliseconds(-1); },
       "dead_growth_window must be >= 0"},
      {"scheduler_cpu -2", [](EngineOptions& o) { o.scheduler_cpu = -2; },
       "scheduler_cpu must be -1 (unpinned) or a cpu, got -2"},
      {"scheduler_cpu on a worker's cpu",
       [](EngineOptions& o) {
         o.cpus = {0};
         o.scheduler_cpu = 0;
       },
       "scheduler_cpu 0 is a worker's cpu"},
      {"scheduler_cpu that does not exist", [](EngineOptions& o) { o.scheduler_cpu = 100000; },
       "scheduler_cpu: "},
      {"snapshot.cpu -2",
       [&](EngineOptions& o) {
         with_snapshots(o);
         o.snapshot.cpu = -2;
       },
       "snapshot.cpu must be -1 (unpinned) or a cpu, got -2"},
      {"snapshot.cpu on a worker's cpu",
       [&](EngineOptions& o) {
         with_snapshots(o);
         o.cpus = {0};
         o.snapshot.cpu = 0;
       },
       "snapshot.cpu 0 is a worker's cpu"},
      {"snapshot.cpu that does not exist",
       [&](EngineOptions& o) {
         with_snapshots(o);
         o.snapshot.cpu = 100000;
       },
       "snapshot.cpu: "},
      {"snapshot without a store", [](EngineOptions& o) { o.snapshot.enabled = true; },
       "snapshot.enabled needs snapshot.dir or snapshot.shm_name"},
      {"shm_name of 201 bytes",
       [&](EngineOptions& o) {
         with_snapshots(o);
         o.snapshot.shm_name = std::string(201, 'a');
       },
       "snapshot.shm_name is 201 bytes; at most 200"},
      {"shm_name ..",
       [&](EngineOptions& o) {
         with_snapshots(o);
         o.snapshot.shm_name = "..";
       },
       "snapshot.shm_name may not be . or .."},
      {"shm_name with a slash",
       [&](EngineOptions& o) {
         with_snapshots(o);
         o.snapshot.shm_name = "a/b";
       },
       "snapshot.shm_name \"a/b\" may hold only letters"},
      {"shm_interval 25 h",
       [&](EngineOptions& o) {
         with_snapshots(o);
         o.snapshot.shm_interval = std::chrono::hours(25);
       },
       "snapshot.shm_interval is 90000000 ms; it must be 0..86400000 ms (24 h)"},
      {"keep_generations 0",
       [&](EngineOptions& o) {
         with_snapshots(o);
         o.snapshot.keep_generations = 0;
       },
       "snapshot.keep_generations must be >= 1"},
  };
  for (const Case& c : cases) {
    EngineOptions o = SmallOptions();
    c.set(o);
    auto opened = Engine::open(o);
    ASSERT_FALSE(opened.ok()) << c.what << ": opened";
    EXPECT_EQ(opened.status().code(), StatusCode::kInvalidArgument) << c.what;
    EXPECT_NE(opened.status().message().find(c.says), std::string_view::npos)
        << c.what << ": " << opened.status().to_string();
  }
  // None of them made the segment it named.
  EXPECT_NE(::access("/dev/shm/jobengine-never-opened", F_OK), 0);
}

TEST(EngineOpenTest, BoundaryValuesAreAccepted) {
  EngineOptions o = SmallOptions();
  o.capacity = 1;
  o.max_attempts = 1;
  o.retry.initial_backoff = std::chrono::nanoseconds(0);  // retries requeue at once
  o.dequeue_batch = 1;
  o.fairness_period = 0;
  o.spin_iterations = 0;
  EXPECT_TRUE(IsOk(Engine::open(o)));
  o.dequeue_batch = 256;
  EXPECT_TRUE(IsOk(Engine::open(o)));
}

TEST(EngineOpenTest, StateNamesAreDistinctAndNonEmpty) {
  std::set<std::string> names;
  for (EngineState s :
       {EngineState::kOpen, EngineState::kRunning, EngineState::kStopping, EngineState::kStopped}) {
    std::string name(engine_state_name(s));
    EXPECT_FALSE(name.empty());
    names.insert(name);
  }
  EXPECT_EQ(names.size(), 4u);
}

// ---- register_handler() / handler_id() --------------------------------------

TEST(EngineHandlerTest, RegisteredHandlersGetDistinctIdsFoundByName) {
  auto engine = Engine::open(SmallOptions());
  ASSERT_TRUE(IsOk(engine));
  std::map<std::string, HandlerId> ids;
  std::atomic<int> runs{0};
  for (int i = 0; i < 100; ++i) {
    std::string name = "handler." + std::to_string(i);
    auto id = engine->register_handler(name, Counting(runs));
    ASSERT_TRUE(IsOk(id)) << name;
    ids[name] = *id;
  }
  std::set<HandlerId> distinct;
  for (const auto& [name, id] : ids) {
    distinct.insert(id);
    auto found = engine->handler_id(name);
    ASSERT_TRUE(IsOk(found)) << name;
    EXPECT_EQ(*found, id) << name;
  }
  EXPECT_EQ(distinct.size(), ids.size());
}

TEST(EngineHandlerTest, EmptyNameIsInvalidArgument) {
  auto engine = Engine::open(SmallOptions());
  ASSERT_TRUE(IsOk(engine));
  std::atomic<int> runs{0};
  EXPECT_TRUE(HasError(engine->register_handler("", Counting(runs)), StatusCode::kInvalidArgument));
}

TEST(EngineHandlerTest, NameOf255BytesIsAcceptedAnd256IsInvalidArgument) {
  auto engine = Engine::open(SmallOptions());
  ASSERT_TRUE(IsOk(engine));
  std::atomic<int> runs{0};
  EXPECT_TRUE(IsOk(engine->register_handler(std::string(255, 'a'), Counting(runs))));
  EXPECT_TRUE(HasError(engine->register_handler(std::string(256, 'b'), Counting(runs)),
                       StatusCode::kInvalidArgument));
  EXPECT_TRUE(HasError(engine->handler_id(std::string(256, 'b')), StatusCode::kNotFound));
}

// Names are text: two names that differ only in bytes that are not UTF-8
// would show as one handler in every metric series (U+FFFD), so they are
// refused, naming the first bad byte.
TEST(EngineHandlerTest, ANameThatIsNotUtf8IsInvalidArgument) {
  auto engine = Engine::open(SmallOptions());
  ASSERT_TRUE(IsOk(engine));
  std::atomic<int> runs{0};
  EXPECT_TRUE(HasError(engine->register_handler("job\xff", Counting(runs)),
                       StatusCode::kInvalidArgument, "byte 3 (0xff)"));
  EXPECT_TRUE(HasError(engine->register_handler("cut\xe2\x9c", Counting(runs)),
                       StatusCode::kInvalidArgument, "byte 3 (0xe2)"));
  EXPECT_TRUE(HasError(engine->register_handler("surrogate\xed\xa0\x80", Counting(runs)),
                       StatusCode::kInvalidArgument, "byte 9"));
  EXPECT_TRUE(IsOk(engine->register_handler("caf\xc3\xa9 \xe2\x9c\x93", Counting(runs))));
  EXPECT_TRUE(IsOk(engine->register_handler("job\xef\xbf\xbd", Counting(runs))));
}

TEST(EngineHandlerTest, DuplicateNameIsAlreadyExists) {
  auto engine = Engine::open(SmallOptions());
  ASSERT_TRUE(IsOk(engine));
  std::atomic<int> runs{0};
  auto first = engine->register_handler("dup", Counting(runs));
  ASSERT_TRUE(IsOk(first));
  EXPECT_TRUE(
      HasError(engine->register_handler("dup", Counting(runs)), StatusCode::kAlreadyExists, "dup"));
  // The first registration is untouched.
  auto found = engine->handler_id("dup");
  ASSERT_TRUE(IsOk(found));
  EXPECT_EQ(*found, *first);
}

// kMaxHandlers: every snapshot names every handler, and the format holds
// 65535 names; past the limit a snapshot would be refused at every recovery.
TEST(EngineHandlerTest, PastKMaxHandlersIsFailedPrecondition) {
  auto engine = Engine::open(SmallOptions());
  ASSERT_TRUE(IsOk(engine));
  std::atomic<int> runs{0};
  for (std::size_t i = 0; i < kMaxHandlers; ++i) {
    std::string name = "h";  // appended: gcc 12's -Wrestrict misfires on "h" + string&&
    name += std::to_string(i);
    ASSERT_TRUE(IsOk(engine->register_handler(name, Counting(runs)))) << i;
  }
  EXPECT_TRUE(HasError(engine->register_handler("one.more", Counting(runs)),
                       StatusCode::kFailedPrecondition, "32768 handlers"));
  EXPECT_TRUE(HasError(engine->handler_id("one.more"), StatusCode::kNotFound));
  ASSERT_TRUE(IsOk(engine->start()));
  ASSERT_TRUE(IsOk(engine->stop()));
}

TEST(EngineHandlerTest, EmptyHandlerFunctionIsInvalidArgument) {
  auto engine = Engine::open(SmallOptions());
  ASSERT_TRUE(IsOk(engine));
  EXPECT_TRUE(HasError(engine->register_handler("empty", Handler{}), StatusCode::kInvalidArgument));
  EXPECT_TRUE(HasError(engine->handler_id("empty"), StatusCode::kNotFound));
}

TEST(EngineHandlerTest, RegisterAfterStartIsFailedPrecondition) {
  auto engine = Engine::open(SmallOptions());
  ASSERT_TRUE(IsOk(engine));
  std::atomic<int> runs{0};
  ASSERT_TRUE(IsOk(engine->register_handler("before", Counting(runs))));
  ASSERT_TRUE(IsOk(engine->start()));
  EXPECT_TRUE(
      HasError(engine->register_handler("after", Counting(runs)), StatusCode::kFailedPrecondition));
  ASSERT_TRUE(IsOk(engine->stop()));
  EXPECT_TRUE(HasError(engine->register_handler("after.stop", Counting(runs)),
                       StatusCode::kFailedPrecondition));
}

TEST(EngineHandlerTest, UnknownHandlerNameIsNotFound) {
  auto engine = Engine::open(SmallOptions());
  ASSERT_TRUE(IsOk(engine));
  EXPECT_TRUE(HasError(engine->handler_id("nope"), StatusCode::kNotFound));
  std::atomic<int> runs{0};
  ASSERT_TRUE(IsOk(engine->register_handler("yes", Counting(runs))));
  ASSERT_TRUE(IsOk(engine->start()));
  EXPECT_TRUE(HasError(engine->handler_id("nope"), StatusCode::kNotFound));
  EXPECT_TRUE(HasError(engine->handler_id("ye"), StatusCode::kNotFound));
  EXPECT_TRUE(HasError(engine->handler_id("yes2"), StatusCode::kNotFound));
}

TEST(EngineHandlerTest, HandlerIdIsThreadSafeAfterStart) {
  auto engine = Engine::open(SmallOptions());
  ASSERT_TRUE(IsOk(engine));
  std::atomic<int> runs{0};
  std::vector<std::string> names;
  std::vector<HandlerId> ids;
  for (int i = 0; i < 16; ++i) {
    names.emplace_back("h");
    names.back().append(static_cast<std::size_t>(i + 1), 'x');
    auto id = engine->register_handler(names.back(), Counting(runs));
    ASSERT_TRUE(IsOk(id));
    ids.push_back(*id);
  }
  ASSERT_TRUE(IsOk(engine->start()));
  std::atomic<int> mismatches{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&] {
      for (int round = 0; round < 200; ++round) {
        for (std::size_t i = 0; i < names.size(); ++i) {
          auto id = engine->handler_id(names[i]);
          if (!id.ok() || *id != ids[i]) mismatches.fetch_add(1);
        }
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(mismatches.load(), 0);
}

// ---- start() ----------------------------------------------------------------

TEST(EngineStartTest, StartReportsWorkersAndNoPinning) {
  EngineOptions o = SmallOptions();
  o.workers = 3;
  auto engine = Engine::open(o);
  ASSERT_TRUE(IsOk(engine));
  auto report = engine->start();
  ASSERT_TRUE(IsOk(report));
  EXPECT_EQ(report->workers, 3u);
  EXPECT_TRUE(report->pinned_cpus.empty());
  EXPECT_EQ(engine->state(), EngineState::kRunning);
}

TEST(EngineStartTest, StartTwiceIsFailedPrecondition) {
  auto engine = Engine::open(SmallOptions());
  ASSERT_TRUE(IsOk(engine));
  ASSERT_TRUE(IsOk(engine->start()));
  EXPECT_TRUE(HasError(engine->start(), StatusCode::kFailedPrecondition));
  EXPECT_EQ(engine->state(), EngineState::kRunning);
}

TEST(EngineStartTest, StartAfterStopIsFailedPrecondition) {
  auto engine = Engine::open(SmallOptions());
  ASSERT_TRUE(IsOk(engine));
  ASSERT_TRUE(IsOk(engine->start()));
  ASSERT_TRUE(IsOk(engine->stop()));
  EXPECT_TRUE(HasError(engine->start(), StatusCode::kFailedPrecondition));
  EXPECT_EQ(engine->state(), EngineState::kStopped);
}

TEST(EngineStartTest, EngineWithoutHandlersStartsAndStops) {
  auto engine = Engine::open(SmallOptions());
  ASSERT_TRUE(IsOk(engine));
  ASSERT_TRUE(IsOk(engine->start()));
  auto report = engine->stop();
  ASSERT_TRUE(IsOk(report));
  EXPECT_EQ(report->submitted, 0u);
}

// ---- submit() errors --------------------------------------------------------

TEST(EngineSubmitTest, SubmitBeforeStartIsStopped) {
  auto engine = Engine::open(SmallOptions());
  ASSERT_TRUE(IsOk(engine));
  std::atomic<int> runs{0};
  auto h = engine->register_handler("h", Counting(runs));
  ASSERT_TRUE(IsOk(h));
  EXPECT_TRUE(HasError(engine->submit(*h, "x"), StatusCode::kStopped));
  EXPECT_TRUE(HasError(engine->submit("h", "x"), StatusCode::kStopped));
  JobSpec spec{*h, "x", {}};
  EXPECT_TRUE(HasError(engine->submit_batch({&spec, 1}), StatusCode::kStopped));
}

TEST(EngineSubmitTest, SubmitAfterStopIsStopped) {
  auto engine = Engine::open(SmallOptions());
  ASSERT_TRUE(IsOk(engine));
  std::atomic<int> runs{0};
  auto h = engine->register_handler("h", Counting(runs));
  ASSERT_TRUE(IsOk(h));
  ASSERT_TRUE(IsOk(engine->start()));
  ASSERT_TRUE(IsOk(engine->stop(StopMode::kDrain)));
  EXPECT_TRUE(HasError(engine->submit(*h, "x"), StatusCode::kStopped));
  EXPECT_TRUE(HasError(engine->submit("h", "x"), StatusCode::kStopped));
  JobSpec spec{*h, "x", {}};
  EXPECT_TRUE(HasError(engine->submit_batch({&spec, 1}), StatusCode::kStopped));
  EXPECT_EQ(runs.load(), 0);
}

TEST(EngineSubmitTest, UnknownHandlerIdIsNotFound) {
  auto engine = Engine::open(SmallOptions());
  ASSERT_TRUE(IsOk(engine));
  std::atomic<int> runs{0};
  auto h = engine->register_handler("h", Counting(runs));
  ASSERT_TRUE(IsOk(h));
  ASSERT_TRUE(IsOk(engine->start()));
  const HandlerId unknown = *h + 1000;
  EXPECT_TRUE(HasError(engine->submit(unknown, "x"), StatusCode::kNotFound));
  const HandlerId huge = 0xffffffffu;
  EXPECT_TRUE(HasError(engine->submit(huge, "x"), StatusCode::kNotFound));
  ASSERT_TRUE(IsOk(engine->stop()));
  EXPECT_EQ(runs.load(), 0);
}

TEST(EngineSubmitTest, UnknownHandlerNameIsNotFound) {
  auto engine = Engine::open(SmallOptions());
  ASSERT_TRUE(IsOk(engine));
  std::atomic<int> runs{0};
  ASSERT_TRUE(IsOk(engine->register_handler("known", Counting(runs))));
  ASSERT_TRUE(IsOk(engine->start()));
  EXPECT_TRUE(HasError(engine->submit("unknown", "x"), StatusCode::kNotFound));
  EXPECT_TRUE(HasError(engine->submit("", "x"), StatusCode::kNotFound));
  ASSERT_TRUE(IsOk(engine->stop()));
  EXPECT_EQ(runs.load(), 0);
}

TEST(EngineSubmitTest, PriorityAtOrAboveLevelsIsInvalidArgument) {
  auto engine = Engine::open(SmallOptions());
  ASSERT_TRUE(IsOk(engine));
  std::atomic<int> runs{0};
  auto h = engine->register_handler("h", Counting(runs));
  ASSERT_TRUE(IsOk(h));
  ASSERT_TRUE(IsOk(engine->start()));
  EXPECT_TRUE(HasError(engine->submit(*h, "x", {.priority = kPriorityLevels}),
                       StatusCode::kInvalidArgument));
  EXPECT_TRUE(HasError(engine->submit(*h, "x", {.priority = 255}), StatusCode::kInvalidArgument));
  EXPECT_TRUE(HasError(engine->submit("h", "x", {.priority = kPriorityLevels}),
                       StatusCode::kInvalidArgument));
  for (std::uint8_t p = 0; p < kPriorityLevels; ++p) {
    EXPECT_TRUE(IsOk(engine->submit(*h, "x", {.priority = p}))) << int{p};
  }
  ASSERT_TRUE(IsOk(engine->stop()));
  EXPECT_EQ(runs.load(), kPriorityLevels);
}

TEST(EngineSubmitTest, PayloadAboveMaxPayloadIsPayloadTooLarge) {
  EngineOptions o = SmallOptions();
  o.max_payload = 4096;
  auto engine = Engine::open(o);
  ASSERT_TRUE(IsOk(engine));
  std::atomic<int> runs{0};
  auto h = engine->register_handler("h", Counting(runs));
  ASSERT_TRUE(IsOk(h));
  ASSERT_TRUE(IsOk(engine->start()));
  const std::string too_big(4097, 'x');
  EXPECT_TRUE(HasError(engine->submit(*h, too_big), StatusCode::kPayloadTooLarge, "4097"));
  EXPECT_TRUE(HasError(engine->submit("h", too_big), StatusCode::kPayloadTooLarge));
  EXPECT_TRUE(IsOk(engine->submit(*h, std::string(4096, 'x'))));
  ASSERT_TRUE(IsOk(engine->stop()));
  EXPECT_EQ(runs.load(), 1);
}

TEST(EngineSubmitTest, MaxPayloadBelowInlineSizeStillBoundsPayloads) {
  EngineOptions o = SmallOptions();
  o.max_payload = 10;
  auto engine = Engine::open(o);
  ASSERT_TRUE(IsOk(engine));
  std::atomic<int> runs{0};
  auto h = engine->register_handler("h", Counting(runs));
  ASSERT_TRUE(IsOk(h));
  ASSERT_TRUE(IsOk(engine->start()));
  EXPECT_TRUE(HasError(engine->submit(*h, std::string(11, 'x')), StatusCode::kPayloadTooLarge));
  EXPECT_TRUE(IsOk(engine->submit(*h, std::string(10, 'x'))));
  ASSERT_TRUE(IsOk(engine->stop()));
  EXPECT_EQ(runs.load(), 1);
}

// ---- submit() delivery ------------------------------------------------------

// Records what each handler call saw.
struct Seen {
  JobId id = 0;
  HandlerId handler = 0;
  std::string handler_name;
  std::string payload;
  std::uint32_t attempt = 0;
  std::uint8_t priority = 0;
  steady_clock::time_point submitted_at;
  std::string thread_name;
  int cpu = -1;
};

class Recorder {
 public:
  Handler handler(Outcome outcome = Outcome::kDone) {
    return [this, outcome](JobContext& job) {
      Seen s;
      s.id = job.id();
      s.handler = job.handler();
      s.handler_name = std::string(job.handler_name());
      s.payload = std::string(job.payload());
      s.attempt = job.attempt();
      s.priority = job.priority();
      s.submitted_at = job.submitted_at();
      s.thread_name = ThreadName();
      s.cpu = sched_getcpu();
      std::lock_guard<std::mutex> lock(mu_);
      seen_.push_back(std::move(s));
      return outcome;
    };
  }
  std::vector<Seen> seen() {
    std::lock_guard<std::mutex> lock(mu_);
    return seen_;
  }
  std::size_t size() {
    std::lock_guard<std::mutex> lock(mu_);
    return seen_.size();
  }

 private:
  std::mutex mu_;
  std::vector<Seen> seen_;
};

TEST(EngineSubmitTest, HandlerSeesTheJobAsSubmitted) {
  Recorder rec;
  auto engine = Engine::open(SmallOptions());
  ASSERT_TRUE(IsOk(engine));
  auto h = engine->register_handler("email.send", rec.handler());
  ASSERT_TRUE(IsOk(h));
  ASSERT_TRUE(IsOk(engine->start()));
  const auto before = steady_clock::now();
  auto id = engine->submit(*h, "hello", {.priority = kLowPriority});
  const auto after = steady_clock::now();
  ASSERT_TRUE(IsOk(id));
  EXPECT_NE(*id, 0u);
  ASSERT_TRUE(IsOk(engine->stop()));
  const auto seen = rec.seen();
  ASSERT_EQ(seen.size(), 1u);
  EXPECT_EQ(seen[0].id, *id);
  EXPECT_EQ(seen[0].handler, *h);
  EXPECT_EQ(seen[0].handler_name, "email.send");
  EXPECT_EQ(seen[0].payload, "hello");
  EXPECT_EQ(seen[0].attempt, 1u);
  EXPECT_EQ(seen[0].priority, kLowPriority);
  // The engine reads a cheaper clock and converts it on request: "within
  // microseconds" of steady_clock at submit. Allow a generous margin.
  constexpr auto kSlack = std::chrono::milliseconds(5);
  EXPECT_GE(seen[0].submitted_at, before - kSlack);
  EXPECT_LE(seen[0].submitted_at, after + kSlack);
}

TEST(EngineSubmitTest, SubmitByNameRunsTheNamedHandler) {
  Recorder a;
  Recorder b;
  auto engine = Engine::open(SmallOptions());
  ASSERT_TRUE(IsOk(engine));
  auto ha = engine->register_handler("a", a.handler());
  auto hb = engine->register_handler("b", b.handler());
  ASSERT_TRUE(IsOk(ha));
  ASSERT_TRUE(IsOk(hb));
  ASSERT_TRUE(IsOk(engine->start()));
  auto id = engine->submit("b", "to-b");
  ASSERT_TRUE(IsOk(id));
  ASSERT_TRUE(IsOk(engine->stop()));
  EXPECT_EQ(a.size(), 0u);
  const auto seen = b.seen();
  ASSERT_EQ(seen.size(), 1u);
  EXPECT_EQ(seen[0].id, *id);
  EXPECT_EQ(seen[0].handler, *hb);
  EXPECT_EQ(seen[0].payload, "to-b");
  EXPECT_EQ(seen[0].priority, kNormalPriority);  // the default
}

TEST(EngineSubmitTest, JobIdsAreUniqueAndNonZero) {
  std::atomic<int> runs{0};
  auto engine = Engine::open(SmallOptions());
  ASSERT_TRUE(IsOk(engine));
  auto h = engine->register_handler("h", Counting(runs));
  ASSERT_TRUE(IsOk(h));
  ASSERT_TRUE(IsOk(engine->start()));
  std::set<JobId> ids;
  for (int i = 0; i < 5000; ++i) {
    auto id = engine->submit(*h, "x");
    if (!id.ok()) {
      ASSERT_TRUE(HasError(id, StatusCode::kQueueFull));
      std::this_thread::yield();
      --i;
      continue;
    }
    EXPECT_NE(*id, 0u);
    EXPECT_TRUE(ids.insert(*id).second) << "duplicate id " << *id;
  }
  ASSERT_TRUE(IsOk(engine->stop()));
  EXPECT_EQ(runs.load(), 5000);
}

TEST(EngineSubmitTest, PayloadsOfEverySizeArriveIntact) {
  Recorder rec;
  auto engine = Engine::open(SmallOptions());
  ASSERT_TRUE(IsOk(engine));
  auto h = engine->register_handler("h", rec.handler());
  ASSERT_TRUE(IsOk(h));
  ASSERT_TRUE(IsOk(engine->start()));
  const std::vector<std::size_t> sizes = {0,
                                          1,
                                          15,
                                          16,
                                          63,
                                          64,
                                          kInlinePayloadBytes - 1,
                                          kInlinePayloadBytes,
                                          kInlinePayloadBytes + 1,
                                          1000,
                                          65536,
                                          std::size_t{1} << 20};  // the default max_payload
  std::map<JobId, std::string> expected;
  for (std::size_t i = 0; i < sizes.size(); ++i) {
    std::string payload = Pattern(sizes[i], static_cast<unsigned>(i));
    auto id = engine->submit(*h, payload);
    ASSERT_TRUE(IsOk(id)) << "size " << sizes[i];
    expected[*id] = std::move(payload);
  }
  ASSERT_TRUE(IsOk(engine->stop()));
  const auto seen = rec.seen();
  ASSERT_EQ(seen.size(), sizes.size());
  for (const Seen& s : seen) {
    auto it = expected.find(s.id);
    ASSERT_NE(it, expected.end()) << "unexpected id " << s.id;
    EXPECT_EQ(s.payload.size(), it->second.size());
    EXPECT_TRUE(s.payload == it->second) << "payload of " << it->second.size() << " bytes changed";
  }
}

TEST(EngineSubmitTest, LargePayloadBufferMayBeReusedRightAfterSubmit) {
  Recorder rec;
  auto engine = Engine::open(SmallOptions());
  ASSERT_TRUE(IsOk(engine));
  auto h = engine->register_handler("h", rec.handler());
  ASSERT_TRUE(IsOk(h));
  ASSERT_TRUE(IsOk(engine->start()));
  std::string buffer = Pattern(10000, 1);
  const std::string original = buffer;
  ASSERT_TRUE(IsOk(engine->submit(*h, buffer)));
  std::fill(buffer.begin(), buffer.end(), 'z');  // the engine copied it
  std::string small = "inline";
  ASSERT_TRUE(IsOk(engine->submit(*h, small)));
  small.assign("XXXXXX");
  ASSERT_TRUE(IsOk(engine->stop()));
  std::multiset<std::string> got;
  for (const Seen& s : rec.seen()) got.insert(s.payload);
  EXPECT_EQ(got, (std::multiset<std::string>{original, "inline"}));
}

// ---- kQueueFull -------------------------------------------------------------

TEST(EngineQueueFullTest, SubmitReturnsQueueFullWhenTableIsFull) {
  constexpr std::size_t kCapacity = 128;
  static_assert(kCapacity > kSlotCacheSize);
  Gate gate;
  std::atomic<int> started{0};
  std::atomic<int> runs{0};
  EngineOptions o = SmallOptions();
  o.capacity = kCapacity;
  o.dequeue_batch = 1;
  auto engine = Engine::open(o);
  ASSERT_TRUE(IsOk(engine));
  GateOpener opener(gate);
  auto block = engine->register_handler("block", Blocking(started, gate));
  auto count = engine->register_handler("count", Counting(runs));
  ASSERT_TRUE(IsOk(block));
  ASSERT_TRUE(IsOk(count));
  ASSERT_TRUE(IsOk(engine->start()));
  ASSERT_TRUE(IsOk(engine->submit(*block, "")));
  ASSERT_TRUE(WaitUntil([&] { return started.load() == 1; })) << "blocker never started";

  // The running blocker holds one slot; fill the rest from this one thread.
  std::size_t accepted = 1;
  Result<JobId> last = Status(StatusCode::kInternal, "no submit yet");
  for (std::size_t i = 0; i < kCapacity + kSlotCacheSize; ++i) {
    last = engine->submit(*count, "x");
    if (!last.ok()) break;
    ++accepted;
  }
  ASSERT_FALSE(last.ok()) << "more than capacity + kSlotCacheSize jobs accepted";
  EXPECT_TRUE(HasError(last, StatusCode::kQueueFull));
  EXPECT_GE(accepted, kCapacity - kSlotCacheSize);
  EXPECT_LE(accepted, kCapacity);
  // Still full: every later submit fails at once, whatever its form.
  EXPECT_TRUE(HasError(engine->submit(*count, "x"), StatusCode::kQueueFull));
  EXPECT_TRUE(HasError(engine->submit("count", "x"), StatusCode::kQueueFull));
  JobSpec spec{*count, "x", {}};
  EXPECT_TRUE(HasError(engine->submit_batch({&spec, 1}), StatusCode::kQueueFull));
  Health h = engine->health();
  EXPECT_GE(h.rejected, 3u);
  EXPECT_EQ(h.submitted, accepted);

  gate.open();
  auto report = engine->stop(StopMode::kDrain);
  ASSERT_TRUE(IsOk(report));
  EXPECT_EQ(report->submitted, accepted);
  EXPECT_EQ(report->done, accepted);
  EXPECT_EQ(static_cast<std::size_t>(runs.load()), accepted - 1);
}

TEST(EngineQueueFullTest, SlotsAreReusedAfterJobsFinish) {
  constexpr std::size_t kCapacity = 64;
  std::atomic<int> runs{0};
  EngineOptions o = SmallOptions();
  o.capacity = kCapacity;
  auto engine = Engine::open(o);
  ASSERT_TRUE(IsOk(engine));
  auto h = engine->register_handler("h", Counting(runs));
  ASSERT_TRUE(IsOk(h));
  ASSERT_TRUE(IsOk(engine->start()));
  // Many times the capacity goes through the table; a full table is only a
  // reason to wait for the worker, never a permanent state.
  constexpr int kJobs = static_cast<int>(kCapacity) * 50;
  const auto deadline = steady_clock::now() + kWaitTimeout;
  for (int i = 0; i < kJobs;) {
    auto id = engine->submit(*h, "x");
    if (id.ok()) {
      ++i;
      continue;
    }
    ASSERT_TRUE(HasError(id, StatusCode::kQueueFull));
    ASSERT_LT(steady_clock::now(), deadline)
        << "table stayed full: slots of finished jobs are not reused (" << i << " accepted)";
    std::this_thread::sleep_for(std::chrono::microseconds(50));
  }
  ASSERT_TRUE(IsOk(engine->stop()));
  EXPECT_EQ(runs.load(), kJobs);
}

// ---- submit_batch() ---------------------------------------------------------

TEST(EngineBatchTest, BatchSubmitsEveryJobAndWritesIdsInOrder) {
  Recorder rec;
  auto engine = Engine::open(SmallOptions());
  ASSERT_TRUE(IsOk(engine));
  auto h = engine->register_handler("h", rec.handler());
  ASSERT_TRUE(IsOk(h));
  ASSERT_TRUE(IsOk(engine->start()));
  std::vector<std::string> payloads;
  for (int i = 0; i < 40; ++i) {
    payloads.push_back("job-" + std::to_string(i) + std::string(i % 3 == 0 ? 300 : 0, '.'));
  }
  std::vector<JobSpec> specs;
  for (std::size_t i = 0; i < payloads.size(); ++i) {
    specs.push_back(
        {*h, payloads[i], {.priority = static_cast<std::uint8_t>(i % kPriorityLevels)}});
  }
  std::vector<JobId> ids(specs.size(), 0);
  auto n = engine->submit_batch(specs, ids);
  ASSERT_TRUE(IsOk(n));
  EXPECT_EQ(*n, specs.size());
  ASSERT_TRUE(IsOk(engine->stop()));

  std::set<JobId> distinct(ids.begin(), ids.end());
  EXPECT_EQ(distinct.size(), ids.size());
  EXPECT_EQ(distinct.count(0), 0u);
  std::map<JobId, Seen> by_id;
  for (const Seen& s : rec.seen()) by_id[s.id] = s;
  ASSERT_EQ(by_id.size(), specs.size());
  for (std::size_t i = 0; i < specs.size(); ++i) {
    auto it = by_id.find(ids[i]);
    ASSERT_NE(it, by_id.end()) << "ids[" << i << "] never ran";
    EXPECT_EQ(it->second.payload, payloads[i]) << "ids[" << i << "] is not jobs[" << i << "]";
    EXPECT_EQ(it->second.priority, specs[i].options.priority);
  }
}

TEST(EngineBatchTest, BatchWithoutIdSpanStillSubmits) {
  std::atomic<int> runs{0};
  auto engine = Engine::open(SmallOptions());
  ASSERT_TRUE(IsOk(engine));
  auto h = engine->register_handler("h", Counting(runs));
  ASSERT_TRUE(IsOk(h));
  ASSERT_TRUE(IsOk(engine->start()));
  std::vector<JobSpec> specs(10, JobSpec{*h, "p", {}});
  auto n = engine->submit_batch(specs);
  ASSERT_TRUE(IsOk(n));
  EXPECT_EQ(*n, 10u);
  ASSERT_TRUE(IsOk(engine->stop()));
  EXPECT_EQ(runs.load(), 10);
}

TEST(EngineBatchTest, EmptyBatchAcceptsNothing) {
  std::atomic<int> runs{0};
  auto engine = Engine::open(SmallOptions());
  ASSERT_TRUE(IsOk(engine));
  ASSERT_TRUE(IsOk(engine->register_handler("h", Counting(runs))));
  ASSERT_TRUE(IsOk(engine->start()));
  auto n = engine->submit_batch({});
  ASSERT_TRUE(IsOk(n));
  EXPECT_EQ(*n, 0u);
  auto report = engine->stop();
  ASSERT_TRUE(IsOk(report));
  EXPECT_EQ(report->submitted, 0u);
}

// Submits `specs` expecting `code`, then checks that nothing of it ran.
void ExpectBatchRejected(std::vector<JobSpec> specs, StatusCode code, std::size_t bad_index) {
  SCOPED_TRACE(::testing::Message() << "bad job at index " << bad_index);
  std::atomic<int> runs{0};
  EngineOptions o = SmallOptions();
  o.max_payload = 1000;
  auto engine = Engine::open(o);
  ASSERT_TRUE(IsOk(engine));
  auto h = engine->register_handler("h", Counting(runs));
  ASSERT_TRUE(IsOk(h));
  ASSERT_EQ(*h, 0u) << "the specs assume the first handler gets id 0";
  ASSERT_TRUE(IsOk(engine->start()));
  std::vector<JobId> ids(specs.size(), 0);
  EXPECT_TRUE(HasError(engine->submit_batch(specs, ids), code));
  auto report = engine->stop();
  ASSERT_TRUE(IsOk(report));
  EXPECT_EQ(report->submitted, 0u);
  EXPECT_EQ(runs.load(), 0);
}

std::vector<JobSpec> GoodSpecs(std::size_t n) {
  // Handler 0 is the first one registered; ExpectBatchRejected checks that.
  return std::vector<JobSpec>(n, JobSpec{0, "ok", {}});
}

TEST(EngineBatchTest, BatchWithOneUnknownHandlerAcceptsNothing) {
  for (std::size_t bad : {std::size_t{0}, std::size_t{5}, std::size_t{9}}) {
    auto specs = GoodSpecs(10);
    specs[bad].handler = 77;
    ExpectBatchRejected(specs, StatusCode::kNotFound, bad);
  }
}

TEST(EngineBatchTest, BatchWithOneBadPriorityAcceptsNothing) {
  for (std::size_t bad : {std::size_t{0}, std::size_t{5}, std::size_t{9}}) {
    auto specs = GoodSpecs(10);
    specs[bad].options.priority = kPriorityLevels;
    ExpectBatchRejected(specs, StatusCode::kInvalidArgument, bad);
  }
}

TEST(EngineBatchTest, BatchWithOneOversizedPayloadAcceptsNothing) {
  const std::string big(1001, 'x');
  for (std::size_t bad : {std::size_t{0}, std::size_t{5}, std::size_t{9}}) {
    auto specs = GoodSpecs(10);
    specs[bad].payload = big;
    ExpectBatchRejected(specs, StatusCode::kPayloadTooLarge, bad);
  }
}

TEST(EngineBatchTest, BatchWithIdsSpanOfWrongSizeIsRefused) {
  std::atomic<int> runs{0};
  auto engine = Engine::open(SmallOptions());
  ASSERT_TRUE(IsOk(engine));
  auto h = engine->register_handler("h", Counting(runs));
  ASSERT_TRUE(IsOk(h));
  ASSERT_TRUE(IsOk(engine->start()));
  std::vector<JobSpec> specs(4, JobSpec{*h, "x", {}});
  // One entry short, with a guard entry behind it that must stay untouched.
  std::vector<JobId> storage(4, 0);
  EXPECT_FALSE(engine->submit_batch(specs, std::span<JobId>(storage.data(), 3)).ok());
  EXPECT_EQ(storage[3], 0u) << "submit_batch wrote past the end of ids";
  auto report = engine->stop();
  ASSERT_TRUE(IsOk(report));
  EXPECT_EQ(report->submitted, 0u);
  EXPECT_EQ(runs.load(), 0);
}

TEST(EngineBatchTest, BatchLargerThanCapacityIsInvalidAndAcceptsNothing) {
  std::atomic<int> runs{0};
  EngineOptions o = SmallOptions();
  o.capacity = 64;
  auto engine = Engine::open(o);
  ASSERT_TRUE(IsOk(engine));
  auto h = engine->register_handler("h", Counting(runs));
  ASSERT_TRUE(IsOk(h));
  ASSERT_TRUE(IsOk(engine->start()));
  std::vector<JobSpec> specs(65, JobSpec{*h, "x", {}});
  // Not kQueueFull: no retry could ever fit it.
  auto r = engine->submit_batch(specs);
  ASSERT_TRUE(HasError(r, StatusCode::kInvalidArgument));
  EXPECT_NE(r.status().message().find("batch of 65 jobs"), std::string_view::npos)
      << r.status().to_string();
  EXPECT_NE(r.status().message().find("capacity 64"), std::string_view::npos)
      << r.status().to_string();
  // One that fits the table still goes in.
  specs.resize(64);
  EXPECT_TRUE(IsOk(engine->submit_batch(specs)));
  auto report = engine->stop();
  ASSERT_TRUE(IsOk(report));
  EXPECT_EQ(report->submitted, 64u);
  EXPECT_EQ(runs.load(), 64);
}

TEST(EngineBatchTest, BatchTooBigForFreeSlotsAcceptsNothing) {
  constexpr std::size_t kCapacity = 128;
  Gate gate;
  std::atomic<int> started{0};
  std::atomic<int> runs{0};
  EngineOptions o = SmallOptions();
  o.capacity = kCapacity;
  o.dequeue_batch = 1;
  auto engine = Engine::open(o);
  ASSERT_TRUE(IsOk(engine));
  GateOpener opener(gate);
  auto block = engine->register_handler("block", Blocking(started, gate));
  auto count = engine->register_handler("count", Counting(runs));
  ASSERT_TRUE(IsOk(block));
  ASSERT_TRUE(IsOk(count));
  ASSERT_TRUE(IsOk(engine->start()));
  ASSERT_TRUE(IsOk(engine->submit(*block, "")));
  ASSERT_TRUE(WaitUntil([&] { return started.load() == 1; })) << "blocker never started";
  // 1 + 80 of 128 slots taken: a batch of 60 cannot fit, whatever is cached.
  for (int i = 0; i < 80; ++i) ASSERT_TRUE(IsOk(engine->submit(*count, "single")));
  std::vector<JobSpec> specs(60, JobSpec{*count, "batch", {}});
  std::vector<JobId> ids(specs.size(), 0);
  EXPECT_TRUE(HasError(engine->submit_batch(specs, ids), StatusCode::kQueueFull));
  EXPECT_EQ(engine->health().submitted, 81u);
  // A batch that fits still goes in afterwards.
  std::vector<JobSpec> small(10, JobSpec{*count, "batch", {}});
  EXPECT_TRUE(IsOk(engine->submit_batch(small)));
  gate.open();
  auto report = engine->stop();
  ASSERT_TRUE(IsOk(report));
  EXPECT_EQ(report->submitted, 91u);
  EXPECT_EQ(runs.load(), 90);
}

// Out of memory in a queue, made to happen. Each level's queue starts with
// blocks for every slot (capacity/64 + 1 blocks of 64 indices), and a
// producer keeps the blocks it used until its thread goes away. Two helper
// threads that each queue 4096 jobs at a level (which then run) leave that
// level's pool without blocks, so the test thread's 4096-job batch there must
// allocate, and detail::g_fail_queue_alloc_in makes that allocation fail.
class QueueOutOfMemoryTest : public ::testing::Test {
 protected:
  static constexpr std::size_t kCapacity = 8192;
  static constexpr std::size_t kBig = 4096;

  void SetUp() override {
    EngineOptions o = SmallOptions();
    o.capacity = kCapacity;
    auto e = Engine::open(o);
    ASSERT_TRUE(IsOk(e));
    engine_ = std::make_unique<Engine>(std::move(*e));
    auto block = engine_->register_handler("block", Blocking(started_, gate_));
    auto count = engine_->register_handler("count", Counting(runs_));
    ASSERT_TRUE(IsOk(block));
    ASSERT_TRUE(IsOk(count));
    block_ = *block;
    count_ = *count;
    ASSERT_TRUE(IsOk(engine_->start()));
  }
  void TearDown() override {
    detail::g_fail_queue_alloc_in.store(-1);
    gate_.open();
    helpers_done_.open();
    for (auto& t : helpers_) t.join();
    engine_.reset();
  }

  // Two threads queue kBig jobs each at `priority`, which all run; the
  // threads stay (keeping their blocks) until the test ends. Then the worker
  // is blocked, so that nothing else finishes, and this thread has made its
  // producers (its first submit).
  void UseUpTheBlocksOf(std::uint8_t priority) {
    for (int t = 0; t < 2; ++t) {
      helpers_.emplace_back([this, priority] {
        std::vector<JobSpec> specs(kBig, JobSpec{count_, "helper", {.priority = priority}});
        EXPECT_TRUE(IsOk(engine_->submit_batch(specs)));
        helpers_done_.wait();
      });
    }
    ASSERT_TRUE(WaitUntil([&] { return runs_.load() == static_cast<int>(2 * kBig); }));
    ASSERT_TRUE(IsOk(engine_->submit(block_, "", {.priority = kHighPriority})));
    ASSERT_TRUE(WaitUntil([&] { return started_.load() == 1; })) << "blocker never started";
  }

  // Submits `specs` while the next queue allocation fails; `allocated` says
  // whether the batch made one (it must, for the test to mean anything).
  Result<std::size_t> SubmitBatchAsMemoryRunsOut(const std::vector<JobSpec>& specs,
                                                 bool* allocated, std::span<JobId> ids = {}) {
    detail::g_fail_queue_alloc_in.store(0);
    auto r = engine_->submit_batch(specs, ids);
    *allocated = detail::g_fail_queue_alloc_in.load() == -1;
    detail::g_fail_queue_alloc_in.store(-1);
    return r;
  }

  // Fills the table with single jobs; every slot the test did not take is
  // still usable (up to the worker's kept magazine). Returns how many.
  std::size_t ExpectTheRestOfTheTableFree(std::size_t taken) {
    const std::size_t filled = FillTable();
    EXPECT_LE(filled, kCapacity - taken);
    EXPECT_GE(filled, kCapacity - taken - (kSlotCacheSize - 1));
    return filled;
  }

  // Opens the gate and stops: `accepted` jobs were submitted and all ran (the
  // blocker among them).
  void StopAndExpectEveryAcceptedJobRan(std::uint64_t accepted) {
    gate_.open();
    auto report = engine_->stop();
    ASSERT_TRUE(IsOk(report));
    EXPECT_EQ(report->submitted, accepted);
    EXPECT_EQ(report->done, report->submitted);
    EXPECT_EQ(runs_.load(), static_cast<int>(report->submitted - 1));
  }

  // Submits single jobs until the table is full; returns how many went in.
  std::size_t FillTable() {
    std::size_t accepted = 0;
    for (;;) {
      auto id = engine_->submit(count_, "fill");
      if (!id) {
        EXPECT_TRUE(HasError(id, StatusCode::kQueueFull));
        return accepted;
      }
      ++accepted;
    }
  }

  Gate gate_;
  Gate helpers_done_;
  std::vector<std::thread> helpers_;
  std::atomic<int> started_{0};
  std::atomic<int> runs_{0};
  HandlerId block_ = 0;
  HandlerId count_ = 0;
  std::unique_ptr<Engine> engine_;
};

TEST_F(QueueOutOfMemoryTest, ABatchThatCannotBeQueuedIsRefusedAndItsSlotsAreFreeAgain) {
  UseUpTheBlocksOf(kNormalPriority);
  std::vector<JobSpec> big(kBig, JobSpec{count_, "big", {}});
  bool allocated = false;
  auto refused = SubmitBatchAsMemoryRunsOut(big, &allocated);
  ASSERT_TRUE(allocated) << "the batch made no queue allocation";
  ASSERT_TRUE(HasError(refused, StatusCode::kInternal));
  const std::string text = refused.status().to_string();
  EXPECT_NE(text.find("out of memory growing the job queue of priority level 1"),
            std::string::npos) << text;
  EXPECT_NE(text.find("4096 job(s) from that level on were not accepted"), std::string::npos)
      << text;
  EXPECT_EQ(text.find("accepted;"), std::string::npos) << text;
  EXPECT_EQ(engine_->health().submitted, 2 * kBig + 1);
  // The same batch goes in once memory is there, and every other slot is
  // still free: none was lost to the refused batch.
  ASSERT_TRUE(IsOk(engine_->submit_batch(big)));
  const std::size_t filled = ExpectTheRestOfTheTableFree(1 + kBig);
  StopAndExpectEveryAcceptedJobRan(2 * kBig + 1 + kBig + filled);
}

TEST_F(QueueOutOfMemoryTest, AMixedBatchKeepsTheLevelsQueuedBeforeTheOneThatFailed) {
  UseUpTheBlocksOf(kLowPriority);
  // 10 normal-priority jobs (queued first, from blocks the pool still has),
  // then 4096 low ones, which need new blocks.
  std::vector<JobSpec> mixed;
  for (int i = 0; i < 10; ++i) mixed.push_back(JobSpec{count_, "normal", {}});
  for (std::size_t i = 0; i < kBig; ++i) {
    mixed.push_back(JobSpec{count_, "low", {.priority = kLowPriority}});
  }
  bool allocated = false;
  std::vector<JobId> ids(mixed.size(), ~JobId{0});
  auto partial = SubmitBatchAsMemoryRunsOut(mixed, &allocated, ids);
  ASSERT_TRUE(allocated) << "the batch made no queue allocation";
  ASSERT_TRUE(HasError(partial, StatusCode::kInternal));
  // The caller can tell which jobs went in: the accepted ones have their
  // ids, the others 0 (they held ids of jobs that never existed).
  for (std::size_t i = 0; i < ids.size(); ++i) {
    if (i < 10) {
      EXPECT_NE(ids[i], 0u) << i;
      EXPECT_NE(ids[i], ~JobId{0}) << i;
    } else {
      ASSERT_EQ(ids[i], 0u) << i;
    }
  }
  const std::string text = partial.status().to_string();
  EXPECT_NE(text.find("priority level 2: 4096 job(s) from that level on were not accepted"),
            std::string::npos) << text;
  EXPECT_NE(text.find("the 10 job(s) at higher priorities"), std::string::npos) << text;
  EXPECT_EQ(engine_->health().submitted, 2 * kBig + 1 + 10);
  const std::size_t filled = ExpectTheRestOfTheTableFree(1 + 10);
  StopAndExpectEveryAcceptedJobRan(2 * kBig + 1 + 10 + filled);
}

// A queue producer is made with the queue's malloc, and moodycamel leaves the
// token of one it could not make invalid: an enqueue through it dereferences
// null. start() makes every engine thread's producers (workers' retry
// re-queues, the scheduler's due jobs) before any thread runs. Whichever of
// start()'s allocations fails, start() fails with kInternal and the engine is
// stopped; or it got by without that allocation, and then the engine works,
// retries and delayed jobs included. Before, the scheduler made its producers
// on its own thread once it ran: under load that was after start() returned,
// and took a submitter's injected failure (QueueOutOfMemoryTest's flake).
TEST(QueueProducerOutOfMemoryTest, StartFailsCleanlyWhicheverOfItsAllocationsFails) {
  constexpr unsigned kWorkers = 2;
  int failed_starts = 0;
  for (long k = 0;; ++k) {
    ASSERT_LT(k, 200) << "start() kept failing";
    EngineOptions o = SmallOptions();
    o.workers = kWorkers;
    auto engine = Engine::open(o);
    ASSERT_TRUE(IsOk(engine));
    std::atomic<int> runs{0};
    std::atomic<int> attempts{0};
    auto count = engine->register_handler("count", Counting(runs));
    HandlerOptions retry_at_once{.max_attempts = 2, .has_retry_policy = true,
                                 .retry = {.initial_backoff = std::chrono::nanoseconds(0)}};
    auto flaky = engine->register_handler(
        "flaky",
        [&](JobContext& job) {
          attempts.fetch_add(1);
          return job.attempt() == 1 ? Outcome::kRetry : Outcome::kDone;
        },
        retry_at_once);
    ASSERT_TRUE(IsOk(count));
    ASSERT_TRUE(IsOk(flaky));
    detail::g_fail_queue_alloc_in.store(k);
    auto started = engine->start();
    const bool start_met_the_failure = detail::g_fail_queue_alloc_in.load() == -1;
    detail::g_fail_queue_alloc_in.store(-1);
    if (!IsOk(started)) {
      EXPECT_TRUE(start_met_the_failure) << "allocation " << k;
      EXPECT_TRUE(HasError(started, StatusCode::kInternal, "out of memory creating the"))
          << "allocation " << k;
      EXPECT_EQ(engine->state(), EngineState::kStopped);
      EXPECT_TRUE(HasError(engine->submit(*count, ""), StatusCode::kStopped));
      ++failed_starts;
      continue;
    }
    // The workers re-queue retries, and the scheduler queues delayed jobs,
    // through the producers start() made.
    for (int i = 0; i < 20; ++i) ASSERT_TRUE(IsOk(engine->submit(*flaky, "")));
    for (int i = 0; i < 5; ++i) {
      ASSERT_TRUE(IsOk(engine->submit(*count, "", {.delay = std::chrono::milliseconds(1)})));
    }
    ASSERT_TRUE(WaitUntil([&] { return runs.load() == 5 && attempts.load() == 40; }))
        << "allocation " << k << ": runs " << runs.load() << ", attempts " << attempts.load();
    auto report = engine->stop();
    ASSERT_TRUE(IsOk(report));
    EXPECT_EQ(report->done, 25u);
    EXPECT_EQ(engine->health().retried, 20u);
    if (!start_met_the_failure) break;  // past start()'s last allocation
  }
  // Each of the three level producers of each worker and of the scheduler.
  EXPECT_GE(failed_starts, 3 * static_cast<int>(kWorkers + 1));
}

// A thread's first submit makes its producers: when that fails, the submit
// says so (not kStopped), accepts nothing, and the thread's next submit makes
// them; submit_batch the same.
TEST(QueueProducerOutOfMemoryTest, AThreadsFirstSubmitReportsItsProducersCouldNotBeMade) {
  auto engine = Engine::open(SmallOptions());
  ASSERT_TRUE(IsOk(engine));
  std::atomic<int> runs{0};
  auto count = engine->register_handler("count", Counting(runs));
  ASSERT_TRUE(IsOk(count));
  ASSERT_TRUE(IsOk(engine->start()));
  const std::vector<JobSpec> batch(3, JobSpec{*count, "batch", {}});
  std::thread([&] {
    detail::g_fail_queue_alloc_in.store(0);
    EXPECT_TRUE(HasError(engine->submit(*count, ""), StatusCode::kInternal,
                         "out of memory creating this thread's job queue producers"));
    detail::g_fail_queue_alloc_in.store(0);
    EXPECT_TRUE(HasError(engine->submit_batch(batch), StatusCode::kInternal,
                         "out of memory creating this thread's job queue producers"));
    detail::g_fail_queue_alloc_in.store(-1);
    EXPECT_EQ(engine->health().submitted, 0u);
    EXPECT_TRUE(IsOk(engine->submit(*count, "")));
    EXPECT_TRUE(IsOk(engine->submit_batch(batch)));
  }).join();
  auto report = engine->stop();
  ASSERT_TRUE(IsOk(report));
  EXPECT_EQ(report->submitted, 4u);
  EXPECT_EQ(runs.load(), 4);
}

// ---- priorities -------------------------------------------------------------

// Runs `per_level` jobs of each priority, queued behind a blocked single
// worker, and returns the priorities in the order they ran.
void RunQueuedBehindBlocker(const EngineOptions& o, int per_level, int high_extra,
                            std::vector<std::pair<int, int>>* order, int empty_level = -1) {
  Gate gate;
  std::atomic<int> started{0};
  std::mutex mu;
  auto engine = Engine::open(o);
  ASSERT_TRUE(IsOk(engine));
  GateOpener opener(gate);
  auto block = engine->register_handler("block", Blocking(started, gate));
  auto rec = engine->register_handler("rec", [&](JobContext& job) {
    std::lock_guard<std::mutex> lock(mu);
    order->emplace_back(job.priority(), std::stoi(std::string(job.payload())));
    return Outcome::kDone;
  });
  ASSERT_TRUE(IsOk(block));
  ASSERT_TRUE(IsOk(rec));
  ASSERT_TRUE(IsOk(engine->start()));
  ASSERT_TRUE(IsOk(engine->submit(*block, "", {.priority = kHighPriority})));
  ASSERT_TRUE(WaitUntil([&] { return started.load() == 1; })) << "blocker never started";
  // Lowest first, so that submission order alone would give the wrong answer.
  for (int level = kPriorityLevels - 1; level >= 0; --level) {
    const int n = level == empty_level ? 0 : per_level + (level == kHighPriority ? high_extra : 0);
    for (int i = 0; i < n; ++i) {
      ASSERT_TRUE(IsOk(
          engine->submit(*rec, std::to_string(i), {.priority = static_cast<std::uint8_t>(level)})));
    }
  }
  gate.open();
  ASSERT_TRUE(IsOk(engine->stop(StopMode::kDrain)));
}

TEST(EnginePriorityTest, StrictPriorityRunsHighBeforeNormalBeforeLow) {
  EngineOptions o = SmallOptions();
  o.fairness_period = 0;
  std::vector<std::pair<int, int>> order;
  RunQueuedBehindBlocker(o, 100, 0, &order);
  ASSERT_EQ(order.size(), 300u);
  for (std::size_t i = 1; i < order.size(); ++i) {
    ASSERT_LE(order[i - 1].first, order[i].first)
        << "priority " << order[i].first << " ran before priority " << order[i - 1].first
        << " at position " << i;
  }
}

TEST(EnginePriorityTest, OneWorkerKeepsFifoWithinAPriorityLevel) {
  EngineOptions o = SmallOptions();
  o.fairness_period = 2;
  o.dequeue_batch = 3;
  std::vector<std::pair<int, int>> order;
  RunQueuedBehindBlocker(o, 100, 0, &order);
  ASSERT_EQ(order.size(), 300u);
  int next[kPriorityLevels] = {0, 0, 0};
  for (const auto& [priority, seq] : order) {
    EXPECT_EQ(seq, next[priority]) << "priority " << priority << " out of order";
    next[priority] = seq + 1;
  }
}

TEST(EnginePriorityTest, StarvationGuardRunsLowPriorityJobsUnderHighPriorityLoad) {
  EngineOptions o = SmallOptions();
  o.capacity = 8192;
  o.fairness_period = 2;
  o.dequeue_batch = 1;
  constexpr int kHigh = 5000;
  constexpr int kLowAndNormal = 20;
  std::vector<std::pair<int, int>> order;
  RunQueuedBehindBlocker(o, kLowAndNormal, kHigh - kLowAndNormal, &order);
  ASSERT_EQ(order.size(), static_cast<std::size_t>(kHigh + 2 * kLowAndNormal));
  // Under strict priority every high job would run first. With the guard each
  // non-empty lower level gets a batch at least every fairness_period *
  // (kPriorityLevels - 1) batches, so the low jobs finish long before the
  // high backlog does.
  int high_seen = 0;
  int low_seen = 0;
  int high_before_last_low = -1;
  for (const auto& [priority, seq] : order) {
    if (priority == kHighPriority) ++high_seen;
    if (priority == kLowPriority && ++low_seen == kLowAndNormal) high_before_last_low = high_seen;
  }
  ASSERT_EQ(low_seen, kLowAndNormal);
  const int bound =
      static_cast<int>(o.fairness_period) * (kPriorityLevels - 1) * (kLowAndNormal * 2 + 2);
  EXPECT_LE(high_before_last_low, bound)
      << "low-priority jobs waited behind " << high_before_last_low << " high-priority jobs";
  EXPECT_LT(high_before_last_low, kHigh);
}

TEST(EnginePriorityTest, AnEmptyLevelsFairTurnGoesToTheMostUrgentLevel) {
  // High and low jobs queued, normal empty. The normal level's fair turns
  // used to scan on from it, to low: low got half of all batches instead of
  // its own turns' quarter (fairness_period 2).
  EngineOptions o = SmallOptions();
  o.fairness_period = 2;
  o.dequeue_batch = 1;
  std::vector<std::pair<int, int>> order;
  RunQueuedBehindBlocker(o, 100, 0, &order, /*empty_level=*/kNormalPriority);
  ASSERT_EQ(order.size(), 200u);
  int low_in_first_40 = 0;
  for (std::size_t i = 0; i < 40; ++i) low_in_first_40 += order[i].first == kLowPriority;
  EXPECT_GE(low_in_first_40, 9) << "the guard still gives low priority its own turns";
  EXPECT_LE(low_in_first_40, 12) << "low priority took the empty normal level's turns too";
}

TEST(EnginePriorityTest, AFairnessPeriodOfOneIsRefused) {
  // Every dequeue would start at a lower level: high priority would run only
  // when both lower levels are empty.
  EngineOptions o = SmallOptions();
  o.fairness_period = 1;
  auto engine = Engine::open(o);
  ASSERT_FALSE(engine.ok());
  EXPECT_EQ(engine.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(engine.status().message().find("fairness_period 1"), std::string_view::npos)
      << engine.status().to_string();
}

TEST(EngineDeathTest, DestroyingTheEngineFromItsOwnHandlerAbortsWithAMessage) {
  // The worker would have to join itself: std::terminate with no word of why.
  EXPECT_DEATH(
      {
        auto opened = Engine::open(SmallOptions());
        if (!opened.ok()) std::abort();
        auto holder = std::make_unique<Engine>(std::move(opened).value());
        auto h = holder->register_handler("suicide", [&holder](JobContext&) {
          holder.reset();
          return Outcome::kDone;
        });
        if (!h.ok() || !holder->start().ok() || !holder->submit(*h, "x").ok()) std::abort();
        std::this_thread::sleep_for(std::chrono::seconds(10));
      },
      "destroyed from one of its own handlers");
}

TEST(EnginePriorityTest, StarvationGuardHoldsWhileHighLoadIsResubmitted) {
  // A producer keeps the high level busy for the whole test; a few low jobs
  // must still get through.
  EngineOptions o = SmallOptions();
  o.capacity = 4096;
  o.fairness_period = 4;
  o.dequeue_batch = 4;
  std::atomic<int> low_runs{0};
  std::atomic<bool> stop_producer{false};
  auto engine = Engine::open(o);
  ASSERT_TRUE(IsOk(engine));
  auto high = engine->register_handler("high", [](JobContext&) {
    std::this_thread::sleep_for(std::chrono::microseconds(20));
    return Outcome::kDone;
  });
  auto low = engine->register_handler("low", Counting(low_runs));
  ASSERT_TRUE(IsOk(high));
  ASSERT_TRUE(IsOk(low));
  ASSERT_TRUE(IsOk(engine->start()));
  // Fill a deep high backlog first so the high level is never empty.
  std::vector<JobSpec> backlog(2000, JobSpec{*high, "", {.priority = kHighPriority}});
  ASSERT_TRUE(IsOk(engine->submit_batch(backlog)));
  std::thread producer([&] {
    while (!stop_producer.load()) {
      auto id = engine->submit(*high, "", {.priority = kHighPriority});
      if (!id.ok()) std::this_thread::yield();
    }
  });
  for (int i = 0; i < 10; ++i) {
    EXPECT_TRUE(IsOk(engine->submit(*low, "", {.priority = kLowPriority})));
  }
  const bool all_low_ran = WaitUntil([&] { return low_runs.load() == 10; });
  stop_producer.store(true);
  producer.join();
  EXPECT_TRUE(all_low_ran) << "low-priority jobs starved: " << low_runs.load() << " of 10 ran";
  ASSERT_TRUE(IsOk(engine->stop(StopMode::kAbandon)));
}

// ---- outcomes: retry, fail, exceptions ---------------------------------------

TEST(EngineOutcomeTest, RetryRerunsUntilMaxAttemptsThenCountsFailed) {
  Recorder rec;
  EngineOptions o = SmallOptions();
  o.max_attempts = 4;
  o.retry.initial_backoff = std::chrono::nanoseconds(0);  // retries requeue at once
  auto engine = Engine::open(o);
  ASSERT_TRUE(IsOk(engine));
  auto h = engine->register_handler("retry", rec.handler(Outcome::kRetry));
  ASSERT_TRUE(IsOk(h));
  ASSERT_TRUE(IsOk(engine->start()));
  auto id = engine->submit(*h, "again");
  ASSERT_TRUE(IsOk(id));
  auto report = engine->stop(StopMode::kDrain);
  ASSERT_TRUE(IsOk(report));
  const auto seen = rec.seen();
  ASSERT_EQ(seen.size(), 4u);
  for (std::size_t i = 0; i < seen.size(); ++i) {
    EXPECT_EQ(seen[i].id, *id);
    EXPECT_EQ(seen[i].attempt, i + 1);
    EXPECT_EQ(seen[i].payload, "again");
  }
  EXPECT_EQ(report->submitted, 1u);
  EXPECT_EQ(report->done, 0u);
  EXPECT_EQ(report->failed, 1u);
  const Health health = engine->health();
  EXPECT_EQ(health.retried, 3u);
  EXPECT_EQ(health.failed, 1u);
  EXPECT_EQ(health.done, 0u);
}

TEST(EngineOutcomeTest, RetryThenDoneCountsDone) {
  std::mutex mu;
  std::vector<std::uint32_t> attempts;
  EngineOptions o = SmallOptions();
  o.retry.initial_backoff = std::chrono::nanoseconds(0);  // the drain below runs the retry
  auto engine = Engine::open(o);
  ASSERT_TRUE(IsOk(engine));
  auto h = engine->register_handler("flaky", [&](JobContext& job) {
    std::lock_guard<std::mutex> lock(mu);
    attempts.push_back(job.attempt());
    return job.attempt() < 2 ? Outcome::kRetry : Outcome::kDone;
  });
  ASSERT_TRUE(IsOk(h));
  ASSERT_TRUE(IsOk(engine->start()));
  ASSERT_TRUE(IsOk(engine->submit(*h, "")));
  auto report = engine->stop();
  ASSERT_TRUE(IsOk(report));
  EXPECT_EQ(attempts, (std::vector<std::uint32_t>{1, 2}));
  EXPECT_EQ(report->done, 1u);
  EXPECT_EQ(report->failed, 0u);
  EXPECT_EQ(engine->health().retried, 1u);
}

TEST(EngineOutcomeTest, MaxAttemptsOneNeverRetries) {
  Recorder rec;
  EngineOptions o = SmallOptions();
  o.max_attempts = 1;
  o.retry.initial_backoff = std::chrono::nanoseconds(0);  // retries requeue at once
  auto engine = Engine::open(o);
  ASSERT_TRUE(IsOk(engine));
  auto h = engine->register_handler("retry", rec.handler(Outcome::kRetry));
  ASSERT_TRUE(IsOk(h));
  ASSERT_TRUE(IsOk(engine->start()));
  ASSERT_TRUE(IsOk(engine->submit(*h, "")));
  auto report = engine->stop();
  ASSERT_TRUE(IsOk(report));
  EXPECT_EQ(rec.size(), 1u);
  EXPECT_EQ(report->failed, 1u);
  EXPECT_EQ(engine->health().retried, 0u);
}

TEST(EngineOutcomeTest, FailOutcomeIsNotRetried) {
  Recorder rec;
  auto engine = Engine::open(SmallOptions());
  ASSERT_TRUE(IsOk(engine));
  auto h = engine->register_handler("fail", rec.handler(Outcome::kFail));
  ASSERT_TRUE(IsOk(h));
  ASSERT_TRUE(IsOk(engine->start()));
  ASSERT_TRUE(IsOk(engine->submit(*h, "")));
  auto report = engine->stop();
  ASSERT_TRUE(IsOk(report));
  EXPECT_EQ(rec.size(), 1u);
  EXPECT_EQ(report->failed, 1u);
  EXPECT_EQ(report->done, 0u);
  const Health health = engine->health();
  EXPECT_EQ(health.retried, 0u);
  EXPECT_EQ(health.failed, 1u);
}

TEST(EngineOutcomeTest, HandlerExceptionIsCaughtCountedAndWorkerSurvives) {
  std::atomic<int> runs{0};
  EngineOptions o = SmallOptions();
  o.max_attempts = 1;
  o.retry.initial_backoff = std::chrono::nanoseconds(0);  // retries requeue at once
  auto engine = Engine::open(o);
  ASSERT_TRUE(IsOk(engine));
  auto thrower = engine->register_handler(
      "throw", [](JobContext&) -> Outcome { throw std::runtime_error("handler failed"); });
  auto count = engine->register_handler("count", Counting(runs));
  ASSERT_TRUE(IsOk(thrower));
  ASSERT_TRUE(IsOk(count));
  ASSERT_TRUE(IsOk(engine->start()));
  ASSERT_TRUE(IsOk(engine->submit(*thrower, "")));
  for (int i = 0; i < 10; ++i) ASSERT_TRUE(IsOk(engine->submit(*count, "")));
  ASSERT_TRUE(WaitUntil([&] { return runs.load() == 10; }))
      << "the worker did not run the jobs after the throwing one";
  ASSERT_TRUE(WaitUntil([&] { return engine->health().exceptions == 1; }));
  const Health health = engine->health();
  EXPECT_EQ(health.exceptions, 1u);
  EXPECT_EQ(health.failed, 1u);
  EXPECT_EQ(health.done, 10u);
  EXPECT_EQ(health.workers_alive, 1u);
  // The job that failed for good is a dead letter: health says the set grew.
  EXPECT_FALSE(health.ok);
  ASSERT_EQ(health.reasons.size(), 1u);
  EXPECT_NE(health.reasons[0].find("dead-letter set growing"), std::string::npos) << health.reasons[0];
  auto report = engine->stop();
  ASSERT_TRUE(IsOk(report));
  EXPECT_EQ(report->failed, 1u);
  EXPECT_EQ(report->done, 10u);
}

TEST(EngineOutcomeTest, NonStandardExceptionIsCaughtToo) {
  std::atomic<int> runs{0};
  EngineOptions o = SmallOptions();
  o.max_attempts = 1;
  o.retry.initial_backoff = std::chrono::nanoseconds(0);  // retries requeue at once
  auto engine = Engine::open(o);
  ASSERT_TRUE(IsOk(engine));
  auto thrower = engine->register_handler("throw", [](JobContext&) -> Outcome { throw 42; });
  auto count = engine->register_handler("count", Counting(runs));
  ASSERT_TRUE(IsOk(thrower));
  ASSERT_TRUE(IsOk(count));
  ASSERT_TRUE(IsOk(engine->start()));
  ASSERT_TRUE(IsOk(engine->submit(*thrower, "")));
  ASSERT_TRUE(IsOk(engine->submit(*count, "")));
  auto report = engine->stop();
  ASSERT_TRUE(IsOk(report));
  EXPECT_EQ(runs.load(), 1);
  EXPECT_EQ(engine->health().exceptions, 1u);
  EXPECT_EQ(report->failed, 1u);
}

TEST(EngineOutcomeTest, ThrowingHandlerIsRetriedLikeRetryOutcome) {
  std::mutex mu;
  std::vector<std::uint32_t> attempts;
  EngineOptions o = SmallOptions();
  o.max_attempts = 3;
  o.retry.initial_backoff = std::chrono::nanoseconds(0);  // retries requeue at once
  auto engine = Engine::open(o);
  ASSERT_TRUE(IsOk(engine));
  auto h = engine->register_handler("flaky", [&](JobContext& job) -> Outcome {
    {
      std::lock_guard<std::mutex> lock(mu);
      attempts.push_back(job.attempt());
    }
    if (job.attempt() < 3) throw std::runtime_error("not yet");
    return Outcome::kDone;
  });
  ASSERT_TRUE(IsOk(h));
  ASSERT_TRUE(IsOk(engine->start()));
  ASSERT_TRUE(IsOk(engine->submit(*h, "")));
  auto report = engine->stop();
  ASSERT_TRUE(IsOk(report));
  EXPECT_EQ(attempts, (std::vector<std::uint32_t>{1, 2, 3}));
  EXPECT_EQ(report->done, 1u);
  EXPECT_EQ(report->failed, 0u);
  const Health health = engine->health();
  EXPECT_EQ(health.exceptions, 2u);
  EXPECT_EQ(health.retried, 2u);
}

TEST(EngineOutcomeTest, AlwaysThrowingHandlerFailsAfterMaxAttempts) {
  std::atomic<int> calls{0};
  EngineOptions o = SmallOptions();
  o.max_attempts = 3;
  o.retry.initial_backoff = std::chrono::nanoseconds(0);  // retries requeue at once
  auto engine = Engine::open(o);
  ASSERT_TRUE(IsOk(engine));
  auto h = engine->register_handler("throw", [&](JobContext&) -> Outcome {
    calls.fetch_add(1);
    throw std::logic_error("always");
  });
  ASSERT_TRUE(IsOk(h));
  ASSERT_TRUE(IsOk(engine->start()));
  ASSERT_TRUE(IsOk(engine->submit(*h, "")));
  auto report = engine->stop();
  ASSERT_TRUE(IsOk(report));
  EXPECT_EQ(calls.load(), 3);
  EXPECT_EQ(report->failed, 1u);
  const Health health = engine->health();
  EXPECT_EQ(health.exceptions, 3u);
  EXPECT_EQ(health.retried, 2u);
}

// ---- stop() and the destructor ------------------------------------------------

TEST(EngineStopTest, DrainRunsEveryQueuedJobIncludingRetries) {
  std::atomic<int> calls{0};
  std::atomic<int> finished{0};
  EngineOptions o = SmallOptions();
  o.workers = 2;
  o.capacity = 4096;
  // Retries that requeue at once are queued jobs, which a drain runs (one in
  // backoff is left: semantics_test DrainRunsQueuedJobsAndLeavesWhatIsNotDueYet).
  o.retry.initial_backoff = std::chrono::nanoseconds(0);
  auto engine = Engine::open(o);
  ASSERT_TRUE(IsOk(engine));
  auto h = engine->register_handler("h", [&](JobContext& job) {
    calls.fetch_add(1);
    // Every tenth job asks for one retry.
    if (job.payload() == "retry" && job.attempt() == 1) return Outcome::kRetry;
    finished.fetch_add(1);
    return Outcome::kDone;
  });
  ASSERT_TRUE(IsOk(h));
  ASSERT_TRUE(IsOk(engine->start()));
  constexpr int kJobs = 2000;
  for (int i = 0; i < kJobs; ++i) {
    const auto priority = static_cast<std::uint8_t>(i % kPriorityLevels);
    ASSERT_TRUE(IsOk(engine->submit(*h, i % 10 == 0 ? "retry" : "once", {.priority = priority})));
  }
  auto report = engine->stop(StopMode::kDrain);
  ASSERT_TRUE(IsOk(report));
  EXPECT_EQ(finished.load(), kJobs);
  EXPECT_EQ(calls.load(), kJobs + kJobs / 10);
  EXPECT_EQ(report->submitted, static_cast<std::uint64_t>(kJobs));
  EXPECT_EQ(report->done, static_cast<std::uint64_t>(kJobs));
  EXPECT_EQ(report->failed, 0u);
  EXPECT_EQ(report->dropped, 0u);
  EXPECT_EQ(engine->state(), EngineState::kStopped);
  const Health health = engine->health();
  EXPECT_EQ(health.pending, 0u);
  EXPECT_EQ(health.retried, static_cast<std::uint64_t>(kJobs / 10));
}

TEST(EngineStopTest, AbandonDropsQueuedJobsAndLetsRunningOneFinish) {
  // stop(kAbandon) closes intake (kStopping) at once but sets its abandon flag
  // only after a heavy fence and once submitters have left: a worker freed
  // between the two runs queued jobs. Nothing public reads that flag, but an
  // idle worker exits only once it sees it: worker 1 has nothing to take
  // (the jobs are delayed, on a test clock), so its exit says the flag is
  // set. Only then do the jobs fall due (they sit in the queue) and the
  // blocker return, so its worker meets them with the flag set, every time.
  constexpr int kQueued = 100;
  Gate gate;
  std::atomic<int> started{0};
  std::atomic<int> runs{0};
  std::atomic<bool> stop_returned{false};
  std::atomic<int> ran_after_stop{0};
  auto clock = std::make_shared<ManualClock>();
  EngineOptions o = SmallOptions();
  o.workers = 2;
  o.dequeue_batch = 1;
  o.test_clock = clock;
  auto engine = Engine::open(o);
  ASSERT_TRUE(IsOk(engine));
  GateOpener opener(gate);
  auto block = engine->register_handler("block", Blocking(started, gate));
  auto count = engine->register_handler("count", [&](JobContext&) {
    runs.fetch_add(1);
    if (stop_returned.load()) ran_after_stop.fetch_add(1);
    return Outcome::kDone;
  });
  ASSERT_TRUE(IsOk(block));
  ASSERT_TRUE(IsOk(count));
  ASSERT_TRUE(IsOk(engine->start()));
  ASSERT_TRUE(IsOk(engine->submit(*block, "")));
  ASSERT_TRUE(WaitUntil([&] { return started.load() == 1; })) << "blocker never started";
  for (int i = 0; i < kQueued; ++i) {
    ASSERT_TRUE(IsOk(engine->submit(*count, "", {.delay = std::chrono::hours(1)})));
  }
  ASSERT_TRUE(WaitUntil([&] { return engine->health().delayed == kQueued; }));
  ASSERT_EQ(engine->health().workers_alive, 2u);

  Result<StopReport> report = Status(StatusCode::kInternal, "stop() did not return");
  std::thread stopper([&] {
    report = engine->stop(StopMode::kAbandon);
    stop_returned.store(true);
  });
  // Intake closes as soon as stop() begins, while the blocker still runs.
  const bool left_running = WaitUntil([&] { return engine->state() != EngineState::kRunning; });
  EXPECT_TRUE(left_running) << "state stayed Running during stop()";
  EXPECT_TRUE(HasError(engine->submit(*count, ""), StatusCode::kStopped));
  // The idle worker saw the abandon flag and left; the blocker's did not.
  const bool idle_left = WaitUntil([&] { return engine->health().workers_alive == 1; });
  EXPECT_TRUE(idle_left) << "the idle worker never exited: " << engine->health().workers_alive
                         << " alive";
  // The jobs fall due: queued now, ahead of the blocker's worker.
  clock->advance(std::chrono::hours(2));
  const auto queued = [&] {
    const Health h = engine->health();
    return h.delayed == 0 && h.depth[0] + h.depth[1] + h.depth[2] == kQueued;
  };
  EXPECT_TRUE(WaitUntil(queued)) << "the jobs never fell due: " << engine->health().delayed
                                 << " still delayed";
  EXPECT_EQ(runs.load(), 0) << "a job ran while the blocker held the only live worker";
  gate.open();
  stopper.join();

  ASSERT_TRUE(IsOk(report));
  EXPECT_EQ(report->submitted, static_cast<std::uint64_t>(kQueued + 1));
  EXPECT_EQ(report->done, 1u + static_cast<std::uint64_t>(runs.load()));
  EXPECT_EQ(report->dropped + static_cast<std::uint64_t>(runs.load()),
            static_cast<std::uint64_t>(kQueued));
  // The worker was inside the blocker when the flag was set; with a batch of
  // one nothing else was in its hands, so every queued job is dropped.
  EXPECT_EQ(runs.load(), 0);
  EXPECT_EQ(report->dropped, static_cast<std::uint64_t>(kQueued));
  std::this_thread::sleep_for(milliseconds(50));
  EXPECT_EQ(ran_after_stop.load(), 0) << "a job ran after stop() returned";
  const Health health = engine->health();
  EXPECT_EQ(health.state, EngineState::kStopped);
  EXPECT_EQ(health.dropped, static_cast<std::uint64_t>(kQueued));
  EXPECT_EQ(health.pending, 0u);
  EXPECT_EQ(health.workers_alive, 0u);
  EXPECT_FALSE(health.ok);
}

// Set by AbandonUnderLoadAccountsForEveryJob's g_before_batch hook.
struct HeldBatches {
  const std::atomic<int>* runs = nullptr;
  int hold_after_runs = 0;
  int to_hold = 0;
  std::atomic<int> held{0};
  Gate* gate = nullptr;
};
HeldBatches* g_held_batches = nullptr;

TEST(EngineStopTest, AbandonUnderLoadAccountsForEveryJob) {
  // Three workers run a load; once enough has run, the next two batches
  // taken are held (detail::g_before_batch, before any of their jobs runs).
  // stop(kAbandon) then begins while the third worker still runs the rest.
  // That worker exits once it has seen the abandon flag (it drops what it
  // takes from then on), and only then are the held batches let go: each
  // worker meets its batch with the flag set and drops it. So some jobs are
  // always dropped (a kAbandon that drained would run them), and every job
  // is either run once or dropped.
  constexpr int kJobs = 5000;
  std::atomic<int> runs{0};
  std::atomic<bool> stop_returned{false};
  std::atomic<int> ran_after_stop{0};
  Gate hold;
  HeldBatches held;
  held.runs = &runs;
  held.hold_after_runs = 500;
  held.to_hold = 2;
  held.gate = &hold;
  EngineOptions o = SmallOptions();
  o.workers = 3;
  o.capacity = 8192;
  o.dequeue_batch = 16;
  auto engine = Engine::open(o);
  ASSERT_TRUE(IsOk(engine));
  GateOpener opener(hold);
  auto h = engine->register_handler("h", [&](JobContext&) {
    runs.fetch_add(1);
    if (stop_returned.load()) ran_after_stop.fetch_add(1);
    std::this_thread::sleep_for(std::chrono::microseconds(10));
    return Outcome::kDone;
  });
  ASSERT_TRUE(IsOk(h));
  struct Unhook {
    Gate& gate;
    ~Unhook() {
      gate.open();
      detail::g_before_batch.store(nullptr);
    }
  };
  ASSERT_TRUE(IsOk(engine->start()));
  {
    // Declared after the engine's start, destroyed before its destructor:
    // opens the gate and removes the hook whatever the test's outcome.
    Unhook unhook{hold};
    g_held_batches = &held;
    detail::g_before_batch.store(+[](JobId) {
      HeldBatches& hb = *g_held_batches;
      if (hb.runs->load() < hb.hold_after_runs) return;
      // A held worker waits here, so the to_hold batches are different workers'.
      int n = hb.held.load();
      do {
        if (n >= hb.to_hold) return;
      } while (!hb.held.compare_exchange_weak(n, n + 1));
      hb.gate->wait();
    });
    for (int i = 0; i < kJobs; ++i) ASSERT_TRUE(IsOk(engine->submit(*h, "")));
    ASSERT_TRUE(WaitUntil([&] { return held.held.load() >= held.to_hold; }))
        << "two batches were never held: " << held.held.load() << ", " << runs.load() << " ran";
    Result<StopReport> report = Status(StatusCode::kInternal, "stop() did not return");
    std::thread stopper([&] {
      report = engine->stop(StopMode::kAbandon);
      stop_returned.store(true);
    });
    // The free worker exits only once it sees the abandon flag.
    const bool free_left = WaitUntil([&] { return engine->health().workers_alive == 2; });
    EXPECT_TRUE(free_left) << "the free worker never exited: " << engine->health().workers_alive
                           << " alive";
    const int ran_before_release = runs.load();
    hold.open();
    stopper.join();
    ASSERT_TRUE(IsOk(report));
    const int ran = runs.load();
    EXPECT_EQ(ran, ran_before_release) << "a held batch ran after the abandon flag was set";
    EXPECT_EQ(report->submitted, static_cast<std::uint64_t>(kJobs));
    EXPECT_EQ(report->done, static_cast<std::uint64_t>(ran));
    EXPECT_EQ(report->done + report->dropped, static_cast<std::uint64_t>(kJobs));
    // At least the first job of each held batch was dropped.
    EXPECT_GE(report->dropped, static_cast<std::uint64_t>(held.to_hold));
    EXPECT_GE(ran, held.hold_after_runs) << "the load ran before stop()";
    std::this_thread::sleep_for(milliseconds(50));
    EXPECT_EQ(runs.load(), ran) << "a job ran after stop() returned";
    EXPECT_EQ(ran_after_stop.load(), 0);
  }
}

TEST(EngineStopTest, StopTwiceIsFailedPrecondition) {
  auto engine = Engine::open(SmallOptions());
  ASSERT_TRUE(IsOk(engine));
  ASSERT_TRUE(IsOk(engine->start()));
  ASSERT_TRUE(IsOk(engine->stop()));
  EXPECT_TRUE(HasError(engine->stop(), StatusCode::kFailedPrecondition));
  EXPECT_TRUE(HasError(engine->stop(StopMode::kAbandon), StatusCode::kFailedPrecondition));
}

TEST(EngineStopTest, ConcurrentStopsLetExactlyOneSucceed) {
  for (int round = 0; round < 20; ++round) {
    EngineOptions o = SmallOptions();
    o.workers = 2;
    auto engine = Engine::open(o);
    ASSERT_TRUE(IsOk(engine));
    std::atomic<int> runs{0};
    auto h = engine->register_handler("h", Counting(runs));
    ASSERT_TRUE(IsOk(h));
    ASSERT_TRUE(IsOk(engine->start()));
    for (int i = 0; i < 100; ++i) ASSERT_TRUE(IsOk(engine->submit(*h, "")));
    std::atomic<bool> go{false};
    std::vector<Status> results(3);
    std::vector<std::thread> stoppers;
    for (std::size_t t = 0; t < results.size(); ++t) {
      stoppers.emplace_back([&, t] {
        while (!go.load()) std::this_thread::yield();
        results[t] = engine->stop(t == 0 ? StopMode::kDrain : StopMode::kAbandon).status();
      });
    }
    go.store(true);
    for (auto& t : stoppers) t.join();
    int ok = 0;
    for (const Status& s : results) {
      if (s.ok()) {
        ++ok;
      } else {
        EXPECT_TRUE(HasError(s, StatusCode::kFailedPrecondition));
      }
    }
    EXPECT_EQ(ok, 1) << "round " << round;
    EXPECT_EQ(engine->state(), EngineState::kStopped);
    EXPECT_EQ(engine->health().workers_alive, 0u);
  }
}

TEST(EngineStopTest, StopBeforeStartIsFailedPrecondition) {
  auto engine = Engine::open(SmallOptions());
  ASSERT_TRUE(IsOk(engine));
  EXPECT_TRUE(HasError(engine->stop(), StatusCode::kFailedPrecondition));
  EXPECT_EQ(engine->state(), EngineState::kOpen);
  // The engine is still usable afterwards.
  ASSERT_TRUE(IsOk(engine->start()));
  ASSERT_TRUE(IsOk(engine->stop()));
}

TEST(EngineStopTest, DestructorOfRunningEngineDrains) {
  std::atomic<int> runs{0};
  constexpr int kJobs = 500;
  {
    EngineOptions o = SmallOptions();
    o.workers = 2;
    auto engine = Engine::open(o);
    ASSERT_TRUE(IsOk(engine));
    auto h = engine->register_handler("h", [&](JobContext&) {
      std::this_thread::sleep_for(std::chrono::microseconds(20));
      runs.fetch_add(1);
      return Outcome::kDone;
    });
    ASSERT_TRUE(IsOk(h));
    ASSERT_TRUE(IsOk(engine->start()));
    for (int i = 0; i < kJobs; ++i) ASSERT_TRUE(IsOk(engine->submit(*h, "")));
  }
  EXPECT_EQ(runs.load(), kJobs);
}

TEST(EngineStopTest, DestructorOfOpenOrStoppedEngineIsQuiet) {
  { auto engine = Engine::open(SmallOptions()); }
  {
    auto engine = Engine::open(SmallOptions());
    ASSERT_TRUE(IsOk(engine));
    ASSERT_TRUE(IsOk(engine->start()));
    ASSERT_TRUE(IsOk(engine->stop()));
  }
}

bool AnyEngineThread() {
  for (const std::string& name : ProcessThreadNames()) {
    if (name.rfind("jobengine-", 0) == 0) return true;
  }
  return false;
}

TEST(EngineStopTest, NoEngineThreadOutlivesTheEngine) {
  {
    EngineOptions o = SmallOptions();
    o.workers = 2;
    auto engine = Engine::open(o);
    ASSERT_TRUE(IsOk(engine));
    ASSERT_TRUE(IsOk(engine->start()));
    ASSERT_TRUE(IsOk(engine->stop()));
    // A joined thread can stay listed in /proc for a moment (seen under
    // qemu-user): bounded polling, no timing decides a pass.
    EXPECT_TRUE(WaitUntil([] { return !AnyEngineThread(); }, milliseconds(5000)))
        << "an engine thread is still alive after stop()";
  }
  {
    EngineOptions o = SmallOptions();
    o.workers = 2;
    auto engine = Engine::open(o);
    ASSERT_TRUE(IsOk(engine));
    ASSERT_TRUE(IsOk(engine->start()));
  }
  EXPECT_TRUE(WaitUntil([] { return !AnyEngineThread(); }, milliseconds(5000)))
      << "an engine thread is still alive after ~Engine()";
}

TEST(EngineStopTest, MovedEngineKeepsWorking) {
  std::atomic<int> runs{0};
  auto opened = Engine::open(SmallOptions());
  ASSERT_TRUE(IsOk(opened));
  Engine a = std::move(opened).value();
  auto h = a.register_handler("h", Counting(runs));
  ASSERT_TRUE(IsOk(h));
  ASSERT_TRUE(IsOk(a.start()));
  Engine b = std::move(a);
  ASSERT_TRUE(IsOk(b.submit(*h, "x")));
  auto other = Engine::open(SmallOptions());
  ASSERT_TRUE(IsOk(other));
  Engine c = std::move(other).value();
  c = std::move(b);  // the unstarted engine c held is destroyed
  ASSERT_TRUE(IsOk(c.submit(*h, "y")));
  auto report = c.stop();
  ASSERT_TRUE(IsOk(report));
  EXPECT_EQ(report->done, 2u);
  EXPECT_EQ(runs.load(), 2);
}

// ---- health() -----------------------------------------------------------------

TEST(EngineHealthTest, HealthReflectsEachStage) {
  Gate gate;
  std::atomic<int> started{0};
  std::atomic<int> runs{0};
  EngineOptions o = SmallOptions();
  o.capacity = 128;
  o.dequeue_batch = 1;
  auto engine = Engine::open(o);
  ASSERT_TRUE(IsOk(engine));
  GateOpener opener(gate);
  auto block = engine->register_handler("block", Blocking(started, gate));
  auto count = engine->register_handler("count", Counting(runs));
  ASSERT_TRUE(IsOk(block));
  ASSERT_TRUE(IsOk(count));

  // Open.
  Health h = engine->health();
  EXPECT_FALSE(h.ok);
  EXPECT_EQ(h.state, EngineState::kOpen);
  EXPECT_EQ(h.workers, 1u);
  EXPECT_EQ(h.workers_alive, 0u);
  EXPECT_EQ(h.capacity, 128u);
  EXPECT_EQ(h.pending, 0u);
  EXPECT_EQ(h.running, 0u);
  EXPECT_EQ(h.submitted, 0u);
  for (auto d : h.depth) EXPECT_EQ(d, 0u);

  // Running and idle.
  ASSERT_TRUE(IsOk(engine->start()));
  ASSERT_TRUE(WaitUntil([&] { return engine->health().workers_alive == 1; }))
      << "workers_alive never reached 1";
  const auto before = std::chrono::system_clock::now();
  h = engine->health();
  const auto after = std::chrono::system_clock::now();
  EXPECT_TRUE(h.ok);
  EXPECT_EQ(h.state, EngineState::kRunning);
  EXPECT_GE(h.checked_at, before);
  EXPECT_LE(h.checked_at, after);

  // One job running, nine queued over the three levels.
  ASSERT_TRUE(IsOk(engine->submit(*block, "")));
  ASSERT_TRUE(WaitUntil([&] { return started.load() == 1; })) << "blocker never started";
  for (int i = 0; i < 2; ++i) ASSERT_TRUE(IsOk(engine->submit(*count, "", {kHighPriority})));
  for (int i = 0; i < 3; ++i) ASSERT_TRUE(IsOk(engine->submit(*count, "", {kNormalPriority})));
  for (int i = 0; i < 4; ++i) ASSERT_TRUE(IsOk(engine->submit(*count, "", {kLowPriority})));
  ASSERT_TRUE(WaitUntil([&] { return engine->health().running == 1; }));
  h = engine->health();
  EXPECT_TRUE(h.ok);
  EXPECT_EQ(h.running, 1u);
  EXPECT_EQ(h.pending, 10u);
  EXPECT_EQ(h.depth[kHighPriority], 2u);
  EXPECT_EQ(h.depth[kNormalPriority], 3u);
  EXPECT_EQ(h.depth[kLowPriority], 4u);
  EXPECT_EQ(h.submitted, 10u);
  EXPECT_EQ(h.done, 0u);

  // Drained while still running.
  gate.open();
  ASSERT_TRUE(WaitUntil([&] { return engine->health().done == 10; })) << "jobs never finished";
  ASSERT_TRUE(WaitUntil([&] { return engine->health().pending == 0; }));
  h = engine->health();
  EXPECT_TRUE(h.ok);
  EXPECT_EQ(h.running, 0u);
  for (auto d : h.depth) EXPECT_EQ(d, 0u);

  // Stopped.
  auto report = engine->stop();
  ASSERT_TRUE(IsOk(report));
  h = engine->health();
  EXPECT_FALSE(h.ok);
  EXPECT_EQ(h.state, EngineState::kStopped);
  EXPECT_EQ(h.workers_alive, 0u);
  EXPECT_EQ(h.submitted, report->submitted);
  EXPECT_EQ(h.done, report->done);
  EXPECT_EQ(h.failed, report->failed);
  EXPECT_EQ(h.dropped, report->dropped);
  EXPECT_EQ(h.submitted, 10u);
  EXPECT_EQ(h.done, 10u);
  EXPECT_EQ(h.rejected, 0u);
}

// oldest_pending_age is the age of the oldest job waiting in a dequeued
// batch: a job a worker is running is not waiting. A worker in a long last
// job of its batch (here its only one) reports nothing; before, it kept the
// running job's age, so young queued jobs read as old as the long run.
TEST(EngineHealthTest, OldestPendingAgeIsOfAWaitingJobNotARunningOne) {
  Gate first_gate;
  Gate second_gate;
  std::atomic<int> started{0};
  std::atomic<int> runs{0};
  EngineOptions o = SmallOptions();
  o.capacity = 128;
  auto engine = Engine::open(o);
  ASSERT_TRUE(IsOk(engine));
  GateOpener opener1(first_gate);
  GateOpener opener2(second_gate);
  auto first = engine->register_handler("first", Blocking(started, first_gate));
  auto second = engine->register_handler("second", Blocking(started, second_gate));
  auto count = engine->register_handler("count", Counting(runs));
  ASSERT_TRUE(IsOk(first) && IsOk(second) && IsOk(count));
  ASSERT_TRUE(IsOk(engine->start()));
  ASSERT_TRUE(IsOk(engine->submit(*first, "a")));
  ASSERT_TRUE(WaitUntil([&] { return started.load() == 1; }));
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  // Queued behind the running job, submitted just now.
  ASSERT_TRUE(IsOk(engine->submit(*second, "b")));
  ASSERT_TRUE(IsOk(engine->submit(*count, "c")));
  Health h = engine->health();
  EXPECT_EQ(h.running, 1u);
  EXPECT_LT(h.oldest_pending_age, std::chrono::milliseconds(150))
      << "the running job's age was reported for the queued ones";
  // The worker takes [b, c] in one batch and blocks in b: c waits in the
  // batch, and with a job in the queue too the figure is c's age.
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  first_gate.open();
  ASSERT_TRUE(WaitUntil([&] { return started.load() == 2; }));
  ASSERT_TRUE(IsOk(engine->submit(*count, "d")));
  h = engine->health();
  EXPECT_GE(h.oldest_pending_age, std::chrono::milliseconds(150)) << "c's wait was not seen";
  second_gate.open();
  ASSERT_TRUE(WaitUntil([&] { return runs.load() == 2; }));
  ASSERT_TRUE(IsOk(engine->stop()));
}

TEST(EngineHealthTest, HealthCanBePolledWhileJobsRun) {
  std::atomic<int> runs{0};
  std::atomic<bool> done{false};
  EngineOptions o = SmallOptions();
  o.workers = 2;
  o.capacity = 256;
  auto engine = Engine::open(o);
  ASSERT_TRUE(IsOk(engine));
  auto h = engine->register_handler("h", Counting(runs));
  ASSERT_TRUE(IsOk(h));
  ASSERT_TRUE(IsOk(engine->start()));
  // Figures are approximate while jobs move, but must never be garbage (a
  // counter difference that wrapped below zero, say).
  constexpr std::uint64_t kAbsurd = std::uint64_t{1} << 40;
  std::atomic<int> polls{0};
  std::atomic<int> absurd{0};
  std::thread poller([&] {
    while (!done.load()) {
      const Health health = engine->health();
      polls.fetch_add(1);
      bool bad = health.pending > kAbsurd || health.running > kAbsurd;
      for (auto d : health.depth) bad = bad || d > kAbsurd;
      if (bad) absurd.fetch_add(1);
    }
  });
  constexpr int kJobs = 20000;
  for (int i = 0; i < kJobs;) {
    if (engine->submit(*h, "").ok()) {
      ++i;
    } else {
      std::this_thread::yield();
    }
  }
  auto report = engine->stop();
  done.store(true);
  poller.join();
  ASSERT_TRUE(IsOk(report));
  EXPECT_EQ(runs.load(), kJobs);
  EXPECT_GT(polls.load(), 0);
  EXPECT_EQ(absurd.load(), 0) << "health() returned a wrapped-around figure";
}

// ---- concurrency ----------------------------------------------------------------

TEST(EngineConcurrencyTest, ConcurrentSubmittersRunEveryJobExactlyOnce) {
  constexpr int kThreads = 4;
  constexpr int kPerThread = 3000;
  std::mutex mu;
  std::map<JobId, int> run_count;
  EngineOptions o = SmallOptions();
  o.workers = 2;
  o.capacity = 512;
  auto engine = Engine::open(o);
  ASSERT_TRUE(IsOk(engine));
  auto h = engine->register_handler("h", [&](JobContext& job) {
    std::lock_guard<std::mutex> lock(mu);
    ++run_count[job.id()];
    return Outcome::kDone;
  });
  ASSERT_TRUE(IsOk(h));
  ASSERT_TRUE(IsOk(engine->start()));
  std::vector<std::vector<JobId>> accepted(kThreads);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      auto& mine = accepted[static_cast<std::size_t>(t)];
      for (int i = 0; i < kPerThread;) {
        const auto priority = static_cast<std::uint8_t>((i + t) % kPriorityLevels);
        if (i % 7 == 0) {
          JobSpec specs[3] = {{*h, "a", {priority}}, {*h, "b", {priority}}, {*h, "c", {priority}}};
          JobId ids[3] = {};
          if (engine->submit_batch(specs, ids).ok()) {
            mine.insert(mine.end(), ids, ids + 3);
            i += 3;
            continue;
          }
        } else {
          auto id = engine->submit(*h, "s", {priority});
          if (id.ok()) {
            mine.push_back(*id);
            ++i;
            continue;
          }
        }
        std::this_thread::yield();
      }
    });
  }
  for (auto& t : threads) t.join();
  auto report = engine->stop();
  ASSERT_TRUE(IsOk(report));
  std::size_t total = 0;
  for (const auto& ids : accepted) {
    total += ids.size();
    for (JobId id : ids) {
      auto it = run_count.find(id);
      ASSERT_NE(it, run_count.end()) << "accepted job " << id << " never ran";
      EXPECT_EQ(it->second, 1) << "job " << id << " ran " << it->second << " times";
    }
  }
  EXPECT_EQ(run_count.size(), total) << "a job ran that nobody submitted";
  EXPECT_EQ(report->submitted, total);
  EXPECT_EQ(report->done, total);
}

TEST(EngineConcurrencyTest, ShortLivedSubmittingThreadsDoNotLeakSlots) {
  // Each submitting thread caches free slots. Threads that submit once and
  // exit must not take their cached slots with them: with 64 slots and 32
  // cached per thread, a leak would fill the table within a few threads.
  constexpr int kThreads = 200;
  std::atomic<int> runs{0};
  EngineOptions o = SmallOptions();
  o.capacity = 64;
  auto engine = Engine::open(o);
  ASSERT_TRUE(IsOk(engine));
  auto h = engine->register_handler("h", Counting(runs));
  ASSERT_TRUE(IsOk(h));
  ASSERT_TRUE(IsOk(engine->start()));
  std::atomic<int> gave_up{0};
  for (int wave = 0; wave < kThreads / 4; ++wave) {
    std::vector<std::thread> threads;
    for (int t = 0; t < 4; ++t) {
      threads.emplace_back([&] {
        const auto deadline = steady_clock::now() + kWaitTimeout;
        while (!engine->submit(*h, "once").ok()) {
          if (steady_clock::now() > deadline) {
            gave_up.fetch_add(1);
            return;
          }
          std::this_thread::sleep_for(std::chrono::microseconds(100));
        }
      });
    }
    for (auto& t : threads) t.join();
    ASSERT_EQ(gave_up.load(), 0) << "the table stayed full after " << wave * 4
                                 << " short-lived threads: their cached slots leaked";
  }
  ASSERT_TRUE(IsOk(engine->stop()));
  EXPECT_EQ(runs.load(), kThreads);
}

TEST(EngineConcurrencyTest, AnExitedThreadsCachedSlotsGoBackToThePool) {
  // Two threads submit one job each while both are alive (so neither adopts
  // the other's state), then exit with 63 free slots cached each. Those
  // slots came back only when a thread that never submitted before adopted
  // the state: the main thread, which submits all along, got kQueueFull
  // from a table with no job pending.
  std::atomic<int> runs{0};
  EngineOptions o = SmallOptions();
  o.capacity = 128;
  auto engine = Engine::open(o);
  ASSERT_TRUE(IsOk(engine));
  auto h = engine->register_handler("h", Counting(runs));
  ASSERT_TRUE(IsOk(h));
  ASSERT_TRUE(IsOk(engine->start()));
  std::vector<JobSpec> all(128, JobSpec{*h, "x", {}});
  ASSERT_TRUE(IsOk(engine->submit_batch(all)));  // every slot; this thread caches none
  ASSERT_TRUE(WaitUntil([&] { return runs.load() == 128; }));
  std::barrier both(2);
  std::atomic<int> ok{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 2; ++t) {
    threads.emplace_back([&] {
      // Whole magazines go back to the pool as the worker idles; wait for one.
      const auto deadline = steady_clock::now() + kWaitTimeout;
      while (!engine->submit(*h, "once").ok() && steady_clock::now() < deadline) {
        std::this_thread::sleep_for(std::chrono::microseconds(100));
      }
      ok.fetch_add(1);
      both.arrive_and_wait();
    });
  }
  for (auto& t : threads) t.join();
  ASSERT_EQ(ok.load(), 2);
  ASSERT_TRUE(WaitUntil([&] { return runs.load() == 130; }));
  std::vector<JobSpec> batch(100, JobSpec{*h, "y", {}});
  const auto deadline = steady_clock::now() + std::chrono::seconds(2);
  Result<std::size_t> r = engine->submit_batch(batch);
  while (!r.ok() && r.status().code() == StatusCode::kQueueFull && steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
    r = engine->submit_batch(batch);
  }
  ASSERT_TRUE(IsOk(r)) << "a batch of 100 did not fit a 128-slot table with "
                       << engine->health().pending << " jobs pending";
  ASSERT_TRUE(IsOk(engine->stop()));
  EXPECT_EQ(runs.load(), 230);
}

TEST(EngineConcurrencyTest, SubmittingThreadMayOutliveTheEngine) {
  // A thread that submitted to an engine keeps per-engine state; it must be
  // safe for the engine to die first, and for the thread to go on to a new
  // engine (likely at the same address) and then exit.
  std::mutex mu;
  std::condition_variable cv;
  int phase = 0;  // 1: submitted to the first engine, 2: first engine gone
  std::atomic<int> runs{0};
  std::atomic<bool> second_ok{false};
  std::unique_ptr<Engine> engine;
  auto open_started = [&]() -> Status {
    auto opened = Engine::open(SmallOptions());
    if (!opened.ok()) return opened.status();
    engine = std::make_unique<Engine>(std::move(opened).value());
    auto h = engine->register_handler("h", Counting(runs));
    if (!h.ok()) return h.status();
    return engine->start().status();
  };
  ASSERT_TRUE(IsOk(open_started()));
  std::thread submitter([&] {
    const bool first_ok = engine->submit("h", "first").ok();
    {
      std::unique_lock<std::mutex> lock(mu);
      phase = first_ok ? 1 : -1;
      cv.notify_all();
      cv.wait_for(lock, kWaitTimeout, [&] { return phase == 2; });
    }
    second_ok.store(engine->submit("h", "second").ok());
  });
  {
    std::unique_lock<std::mutex> lock(mu);
    ASSERT_TRUE(cv.wait_for(lock, kWaitTimeout, [&] { return phase != 0; }));
    ASSERT_EQ(phase, 1) << "first submit failed";
  }
  engine.reset();  // drains and destroys the first engine
  EXPECT_EQ(runs.load(), 1);
  ASSERT_TRUE(IsOk(open_started()));
  {
    std::lock_guard<std::mutex> lock(mu);
    phase = 2;
    cv.notify_all();
  }
  submitter.join();  // the thread exits while the second engine lives
  EXPECT_TRUE(second_ok.load());
  ASSERT_TRUE(IsOk(engine->stop()));
  EXPECT_EQ(runs.load(), 2);
}

// A thread_local that submits from its destructor (a per-thread buffer
// flushed at exit). Made before the thread's first submit, it is destroyed
// after the engine's per-thread state, which has then been given up.
struct ExitFlusher {
  Engine* engine = nullptr;
  HandlerId handler = 0;
  std::atomic<int>* accepted = nullptr;
  std::atomic<bool>* other_go = nullptr;
  ~ExitFlusher() {
    if (engine == nullptr) return;
    other_go->store(true);
    for (int i = 0; i < 20000; ++i) {
      if (engine->submit(handler, "late").ok()) accepted->fetch_add(1);
    }
  }
};
thread_local ExitFlusher t_exit_flusher;

TEST(EngineConcurrencyTest, SubmitsFromAThreadLocalDestructorNeverShareAStateWithAnotherThread) {
  // The exiting thread's submits went on through the state it had just
  // given up, while a new thread adopted that same state: two threads on one
  // producer token and slot cache (segfaults, jobs lost or run twice).
  std::atomic<int> runs{0};
  std::atomic<int> accepted{0};
  std::atomic<bool> other_go{false};
  EngineOptions o = SmallOptions();
  o.capacity = 1 << 16;
  auto engine = Engine::open(o);
  ASSERT_TRUE(IsOk(engine));
  auto h = engine->register_handler("h", Counting(runs));
  ASSERT_TRUE(IsOk(h));
  ASSERT_TRUE(IsOk(engine->start()));
  std::thread exiting([&] {
    t_exit_flusher.engine = &*engine;  // made first: destroyed last
    t_exit_flusher.handler = *h;
    t_exit_flusher.accepted = &accepted;
    t_exit_flusher.other_go = &other_go;
    if (engine->submit(*h, "first").ok()) accepted.fetch_add(1);
  });
  std::thread other([&] {
    while (!other_go.load()) std::this_thread::yield();
    for (int i = 0; i < 20000; ++i) {
      if (engine->submit(*h, "other").ok()) accepted.fetch_add(1);
    }
  });
  exiting.join();
  other.join();
  auto report = engine->stop();
  ASSERT_TRUE(IsOk(report));
  EXPECT_EQ(report->submitted, static_cast<std::uint64_t>(accepted.load()));
  EXPECT_EQ(runs.load(), accepted.load());
  EXPECT_GT(accepted.load(), 30000) << "the queue was full that often?";
}

TEST(EngineConcurrencyTest, OneThreadUsesManySuccessiveEngines) {
  for (int round = 0; round < 20; ++round) {
    std::atomic<int> runs{0};
    auto engine = Engine::open(SmallOptions());
    ASSERT_TRUE(IsOk(engine));
    auto h = engine->register_handler("h", Counting(runs));
    ASSERT_TRUE(IsOk(h));
    ASSERT_TRUE(IsOk(engine->start()));
    for (int i = 0; i < 100; ++i) ASSERT_TRUE(IsOk(engine->submit(*h, "x"))) << "round " << round;
    auto report = engine->stop();
    ASSERT_TRUE(IsOk(report));
    EXPECT_EQ(report->submitted, 100u) << "round " << round;
    EXPECT_EQ(runs.load(), 100) << "round " << round;
  }
}

// ---- pinning and thread names -----------------------------------------------------

TEST(EngineThreadTest, PinnedWorkerRunsOnItsCpu) {
  const std::vector<int> allowed = AllowedCpus();
  ASSERT_FALSE(allowed.empty());
  const int cpu = allowed.back();
  Recorder rec;
  EngineOptions o = SmallOptions();
  o.cpus = {cpu};
  auto engine = Engine::open(o);
  ASSERT_TRUE(IsOk(engine));
  auto h = engine->register_handler("where", rec.handler());
  ASSERT_TRUE(IsOk(h));
  auto report = engine->start();
  ASSERT_TRUE(IsOk(report));
  EXPECT_EQ(report->pinned_cpus, std::vector<int>{cpu});
  for (int i = 0; i < 50; ++i) ASSERT_TRUE(IsOk(engine->submit(*h, "")));
  ASSERT_TRUE(IsOk(engine->stop()));
  const auto seen = rec.seen();
  ASSERT_EQ(seen.size(), 50u);
  for (const Seen& s : seen) EXPECT_EQ(s.cpu, cpu);
}

TEST(EngineThreadTest, EachPinnedWorkerRunsOnItsOwnCpu) {
  const std::vector<int> allowed = AllowedCpus();
  if (allowed.size() < 2) GTEST_SKIP() << "needs two CPUs in the affinity mask";
  const std::vector<int> cpus = {allowed[1], allowed[0]};  // not the identity mapping
  Recorder rec;
  // Each worker's first job waits (bounded) until the other worker has
  // started one too, so both run jobs however the threads are scheduled.
  std::mutex mu;
  std::condition_variable cv;
  std::set<std::string> started_on;
  EngineOptions o = SmallOptions();
  o.workers = 2;
  o.cpus = cpus;
  o.dequeue_batch = 1;  // the waiting worker holds no other job
  auto engine = Engine::open(o);
  ASSERT_TRUE(IsOk(engine));
  auto h = engine->register_handler("where", [&, inner = rec.handler()](JobContext& job) {
    {
      std::unique_lock<std::mutex> lock(mu);
      started_on.insert(ThreadName());
      cv.notify_all();
      cv.wait_for(lock, kWaitTimeout, [&] { return started_on.size() >= 2; });
    }
    std::this_thread::sleep_for(std::chrono::microseconds(50));
    return inner(job);
  });
  ASSERT_TRUE(IsOk(h));
  auto report = engine->start();
  ASSERT_TRUE(IsOk(report));
  EXPECT_EQ(report->pinned_cpus, cpus);
  for (int i = 0; i < 200; ++i) ASSERT_TRUE(IsOk(engine->submit(*h, "")));
  ASSERT_TRUE(IsOk(engine->stop()));
  std::map<std::string, int> jobs_on;
  for (const Seen& s : rec.seen()) {
    ++jobs_on[s.thread_name];
    if (s.thread_name == "jobengine-w0") {
      EXPECT_EQ(s.cpu, cpus[0]);
    } else if (s.thread_name == "jobengine-w1") {
      EXPECT_EQ(s.cpu, cpus[1]);
    } else {
      ADD_FAILURE() << "job ran on thread \"" << s.thread_name << "\"";
    }
  }
  EXPECT_EQ(rec.size(), 200u);
  EXPECT_GE(jobs_on["jobengine-w0"], 1) << "worker 0 ran no job: its pinning went unchecked";
  EXPECT_GE(jobs_on["jobengine-w1"], 1) << "worker 1 ran no job: its pinning went unchecked";
}

TEST(EngineThreadTest, WorkersAreNamedJobengineWN) {
  Recorder rec;
  EngineOptions o = SmallOptions();
  o.workers = 3;
  auto engine = Engine::open(o);
  ASSERT_TRUE(IsOk(engine));
  auto h = engine->register_handler("who", rec.handler());
  ASSERT_TRUE(IsOk(h));
  ASSERT_TRUE(IsOk(engine->start()));
  const std::set<std::string> expected = {"jobengine-w0", "jobengine-w1", "jobengine-w2"};
  auto all_named = [&] {
    const auto names = ProcessThreadNames();
    const std::set<std::string> present(names.begin(), names.end());
    return std::includes(present.begin(), present.end(), expected.begin(), expected.end());
  };
  EXPECT_TRUE(WaitUntil(all_named)) << "threads jobengine-w0..w2 not found in /proc/self/task";
  for (int i = 0; i < 100; ++i) ASSERT_TRUE(IsOk(engine->submit(*h, "")));
  ASSERT_TRUE(IsOk(engine->stop()));
  for (const Seen& s : rec.seen()) {
    EXPECT_TRUE(expected.count(s.thread_name) == 1) << "job ran on \"" << s.thread_name << "\"";
  }
}

// ---- idle strategies -------------------------------------------------------------

class EngineIdleTest : public ::testing::TestWithParam<IdleStrategy> {};

TEST_P(EngineIdleTest, RunsJobsFromSeveralSubmitters) {
  std::atomic<int> runs{0};
  EngineOptions o = SmallOptions();
  o.workers = 2;
  o.idle = GetParam();
  o.spin_iterations = 64;
  auto engine = Engine::open(o);
  ASSERT_TRUE(IsOk(engine));
  auto h = engine->register_handler("h", Counting(runs));
  ASSERT_TRUE(IsOk(h));
  ASSERT_TRUE(IsOk(engine->start()));
  constexpr int kPerThread = 1000;
  std::vector<std::thread> threads;
  for (int t = 0; t < 2; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < kPerThread;) {
        if (engine->submit(*h, "").ok()) {
          ++i;
        } else {
          std::this_thread::yield();
        }
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_TRUE(WaitUntil([&] { return runs.load() == 2 * kPerThread; }))
      << runs.load() << " of " << 2 * kPerThread << " jobs ran";
  ASSERT_TRUE(IsOk(engine->stop()));
}

TEST_P(EngineIdleTest, IdleWorkersWakeForEachNewJob) {
  std::atomic<int> runs{0};
  EngineOptions o = SmallOptions();
  o.workers = 2;
  o.idle = GetParam();
  o.spin_iterations = 16;
  auto engine = Engine::open(o);
  ASSERT_TRUE(IsOk(engine));
  auto h = engine->register_handler("h", Counting(runs));
  ASSERT_TRUE(IsOk(h));
  ASSERT_TRUE(IsOk(engine->start()));
  // Long enough for kSpinThenBlock workers to fall asleep.
  std::this_thread::sleep_for(milliseconds(200));
  ASSERT_TRUE(IsOk(engine->submit(*h, "")));
  ASSERT_TRUE(WaitUntil([&] { return runs.load() == 1; })) << "sleeping worker never woke";
  // Submits at varying distances from the moment a worker goes to sleep, so
  // that a lost wake-up would leave a job unrun.
  for (int i = 2; i <= 60; ++i) {
    std::this_thread::sleep_for(std::chrono::microseconds((i * 97) % 2000));
    ASSERT_TRUE(IsOk(engine->submit(*h, "", {static_cast<std::uint8_t>(i % kPriorityLevels)})));
    ASSERT_TRUE(WaitUntil([&] { return runs.load() == i; }))
        << "job " << i << " never ran: a wake-up was lost";
  }
  std::this_thread::sleep_for(milliseconds(100));
  JobSpec specs[2] = {{*h, "", {kLowPriority}}, {*h, "", {kHighPriority}}};
  ASSERT_TRUE(IsOk(engine->submit_batch(specs)));
  ASSERT_TRUE(WaitUntil([&] { return runs.load() == 62; })) << "batch did not wake a worker";
  ASSERT_TRUE(IsOk(engine->stop()));
}

INSTANTIATE_TEST_SUITE_P(AllStrategies, EngineIdleTest,
                         ::testing::Values(IdleStrategy::kSpin, IdleStrategy::kSpinThenYield,
                                           IdleStrategy::kSpinThenBlock),
                         [](const ::testing::TestParamInfo<IdleStrategy>& param_info) {
                           switch (param_info.param) {
                             case IdleStrategy::kSpin:
                               return std::string("Spin");
                             case IdleStrategy::kSpinThenYield:
                               return std::string("SpinThenYield");
                             case IdleStrategy::kSpinThenBlock:
                               return std::string("SpinThenBlock");
                           }
                           return std::string("Unknown");
                         });

TEST(EngineIdleBlockTest, ZeroSpinIterationsBlocksAtOnceAndStillWakes) {
  std::atomic<int> runs{0};
  EngineOptions o = SmallOptions();
  o.workers = 2;
  o.idle = IdleStrategy::kSpinThenBlock;
  o.spin_iterations = 0;
  auto engine = Engine::open(o);
  ASSERT_TRUE(IsOk(engine));
  auto h = engine->register_handler("h", Counting(runs));
  ASSERT_TRUE(IsOk(h));
  ASSERT_TRUE(IsOk(engine->start()));
  for (int i = 1; i <= 500; ++i) {
    ASSERT_TRUE(IsOk(engine->submit(*h, "")));
    ASSERT_TRUE(WaitUntil([&] { return runs.load() == i; }))
        << "job " << i << " never ran: a wake-up was lost";
  }
  ASSERT_TRUE(IsOk(engine->stop()));
}

// One worker, one submitter, ping-pong: each job is submitted the moment the
// previous one is seen to finish, after a delay that sweeps across the
// window in which the worker finds the queues empty and goes to sleep. A
// submit that lands in that window and loses its wake-up leaves its job
// unrun (nobody else submits), which the bounded wait reports.
void PingPong(std::uint32_t spin_iterations) {
  SCOPED_TRACE(::testing::Message() << "spin_iterations=" << spin_iterations);
  std::atomic<int> runs{0};
  EngineOptions o = SmallOptions();
  o.idle = IdleStrategy::kSpinThenBlock;
  o.spin_iterations = spin_iterations;
  auto engine = Engine::open(o);
  ASSERT_TRUE(IsOk(engine));
  auto h = engine->register_handler("h", Counting(runs));
  ASSERT_TRUE(IsOk(h));
  ASSERT_TRUE(IsOk(engine->start()));
  constexpr int kRounds = 2000;
  for (int i = 1; i <= kRounds; ++i) {
    // 0 .. ~20 us of busy delay, varying every round.
    const int delay = (i * 37) % 64;
    for (int k = 0; k < delay * 40; ++k) {
      std::atomic_signal_fence(std::memory_order_seq_cst);
    }
    ASSERT_TRUE(IsOk(engine->submit(*h, "")));
    const auto deadline = steady_clock::now() + kWaitTimeout;
    while (runs.load(std::memory_order_acquire) != i) {
      ASSERT_LT(steady_clock::now(), deadline) << "job " << i << " never ran: a wake-up was lost";
    }
  }
  ASSERT_TRUE(IsOk(engine->stop()));
}

TEST(EngineIdleBlockTest, PingPongNeverLosesAWakeUp) {
  for (std::uint32_t spin : {0u, 1u, 16u}) PingPong(spin);
}

TEST(EngineIdleBlockTest, StopWakesSleepingWorkers) {
  EngineOptions o = SmallOptions();
  o.workers = 2;
  o.idle = IdleStrategy::kSpinThenBlock;
  o.spin_iterations = 0;
  auto engine = Engine::open(o);
  ASSERT_TRUE(IsOk(engine));
  ASSERT_TRUE(IsOk(engine->start()));
  std::this_thread::sleep_for(milliseconds(100));
  // stop() must not wait for a submit that never comes.
  ASSERT_TRUE(IsOk(engine->stop(StopMode::kAbandon)));
  EXPECT_EQ(engine->health().workers_alive, 0u);
}

// ---- logging ------------------------------------------------------------------------

TEST(EngineLogTest, EngineIsSilentWithoutLogCallback) {
  ::testing::internal::CaptureStdout();
  ::testing::internal::CaptureStderr();
  {
    EngineOptions o = SmallOptions();
    o.workers = 2;
    o.capacity = 64;
    auto engine = Engine::open(o);
    if (engine.ok()) {
      auto thrower = engine->register_handler(
          "throw", [](JobContext&) -> Outcome { throw std::runtime_error("boom"); });
      (void)engine->register_handler("throw", [](JobContext&) { return Outcome::kDone; });
      (void)engine->start();
      if (thrower.ok()) {
        for (int i = 0; i < 200; ++i) (void)engine->submit(*thrower, "");
      }
      (void)engine->submit("missing", "");
      (void)engine->stop(StopMode::kDrain);
      (void)engine->stop(StopMode::kDrain);
    }
    EngineOptions bad = SmallOptions();
    bad.workers = 0;
    (void)Engine::open(bad);
  }
  const std::string out = ::testing::internal::GetCapturedStdout();
  const std::string err = ::testing::internal::GetCapturedStderr();
  EXPECT_EQ(out, "");
  EXPECT_EQ(err, "");
}

// Stores named while snapshots are off are ignored: open() says so, as a
// warning, and creates nothing.
TEST(EngineLogTest, StoresNamedWithSnapshotsOffAreAWarning) {
  std::vector<std::pair<LogLevel, std::string>> lines;
  EngineOptions o = SmallOptions();
  const std::string dir = ::testing::TempDir() + "jobengine-never-made-" + std::to_string(::getpid());
  o.snapshot.enabled = false;
  o.snapshot.dir = dir;
  o.snapshot.shm_name = "jobengine-never-made";
  o.log = [&](LogLevel level, std::string_view line) { lines.emplace_back(level, std::string(line)); };
  auto engine = Engine::open(o);
  ASSERT_TRUE(IsOk(engine));
  ASSERT_EQ(lines.size(), 1u);
  EXPECT_EQ(lines[0].first, LogLevel::kWarning);
  EXPECT_EQ(lines[0].second, "snapshot.enabled is false: snapshot.dir \"" + dir +
                                 "\" and snapshot.shm_name \"jobengine-never-made\" ignored: "
                                 "nothing is snapshotted or recovered");
  struct stat st {};
  EXPECT_NE(::stat(dir.c_str(), &st), 0) << dir << " was made";
  // Snapshots off and no store named: nothing to say.
  lines.clear();
  o.snapshot.dir.clear();
  o.snapshot.shm_name.clear();
  ASSERT_TRUE(IsOk(Engine::open(o)));
  EXPECT_TRUE(lines.empty());
}

TEST(EngineLogTest, LogCallbackReceivesNonEmptyLines) {
  std::mutex mu;
  std::vector<std::pair<LogLevel, std::string>> lines;
  std::atomic<int> runs{0};
  EngineOptions o = SmallOptions();
  o.workers = 2;
  o.log = [&](LogLevel level, std::string_view line) {
    std::lock_guard<std::mutex> lock(mu);
    lines.emplace_back(level, std::string(line));
  };
  JobId thrown = 0;
  {
    auto engine = Engine::open(o);
    ASSERT_TRUE(IsOk(engine));
    auto thrower = engine->register_handler(
        "throw", [](JobContext&) -> Outcome { throw std::runtime_error("boom"); });
    auto count = engine->register_handler("count", Counting(runs));
    ASSERT_TRUE(IsOk(thrower));
    ASSERT_TRUE(IsOk(count));
    ASSERT_TRUE(IsOk(engine->start()));
    auto id = engine->submit(*thrower, "");
    ASSERT_TRUE(IsOk(id));
    thrown = *id;
    ASSERT_TRUE(IsOk(engine->submit(*count, "")));
    ASSERT_TRUE(IsOk(engine->stop()));
  }
  EXPECT_EQ(runs.load(), 1);
  std::lock_guard<std::mutex> lock(mu);
  ASSERT_FALSE(lines.empty()) << "the log callback was never called";
  for (const auto& [level, line] : lines) {
    EXPECT_FALSE(line.empty());
    EXPECT_LE(static_cast<int>(level), static_cast<int>(LogLevel::kError));
  }
  const auto has = [&](LogLevel level, const std::string& text) {
    return std::any_of(lines.begin(), lines.end(),
                       [&](const auto& l) { return l.first == level && l.second == text; });
  };
  std::string all;
  for (const auto& [level, line] : lines) {
    all += std::to_string(static_cast<int>(level)) + " " + line + "\n";
  }
  EXPECT_TRUE(has(LogLevel::kInfo, "started 2 worker(s), unpinned")) << all;
  // The handler's exception: a warning naming the job, its handler and what().
  EXPECT_TRUE(has(LogLevel::kWarning,
                  "job " + std::to_string(thrown) + " (throw): handler threw: boom"))
      << all;
}

}  // namespace
}  // namespace jobengine
