// Snapshots and recovery through the public Engine API: snapshot_now(),
// stop(kSnapshotAndExit), restart, poison jobs, unknown handlers, corrupt
// generations, shared memory newer than disk, and a randomized check of the
// cut against a model of what each snapshot must hold.
//
// Timings never decide a result: waits are bounded (kWait) and fail with what
// they waited for.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <mutex>
#include <random>
#include <set>
#include <span>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "engine/test_hooks.h"  // g_dead_letter_in, g_before_end_cut
#include "jobengine/engine.h"
#include "jobengine/snapshot_format.h"
#include "persistence/shm_store.h"
#include "tests/persistence/disk_test_support.h"

namespace jobengine {
namespace {

namespace fs = std::filesystem;
using testing_support::DiskOptions;
using testing_support::KillChildOnceReady;
using testing_support::TempDir;
using testing_support::WaitUntilTheSegmentIsCurrent;
using std::chrono::milliseconds;
using std::chrono::steady_clock;

constexpr milliseconds kWait{30000};

template <typename R>
::testing::AssertionResult IsOk(const R& r) {
  if (r.ok()) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << r.status().to_string();
}

std::string unique_shm_name() {
  static std::atomic<int> n{0};
  return "jobengine-rt-" + std::to_string(getpid()) + "-" + std::to_string(n++);
}

struct ShmCleanup {
  std::string name;
  ~ShmCleanup() {
    if (!name.empty()) (void)::unlink(("/dev/shm/" + name).c_str());
  }
};


// A gate a handler waits on, so jobs stay pending or running while a test
// takes snapshots.
class Gate {
 public:
  void open() {
    std::lock_guard<std::mutex> l(mu_);
    open_ = true;
    cv_.notify_all();
  }
  bool wait() {
    std::unique_lock<std::mutex> l(mu_);
    return cv_.wait_for(l, kWait, [&] { return open_; });
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  bool open_ = false;
};

template <typename Pred>
bool WaitUntil(Pred pred) {
  const auto deadline = steady_clock::now() + kWait;
  while (!pred()) {
    if (steady_clock::now() > deadline) return false;
    std::this_thread::sleep_for(milliseconds(1));
  }
  return true;
}

// stop(kSnapshotAndExit) on an engine whose handlers wait on `gate`: the gate
// opens once stop()'s final cut is taken (detail::g_before_end_cut, called
// on stop()'s own thread), so the job running then and every queued job are
// in the cut (all pending: a graceful exit), however slowly stop() gets
// there. (A sleep before opening the gate let queued jobs run, or the running
// one finish before the cut, when stop() was slower than the sleep.)
// Any other cut meanwhile would open it early: the engine must take no
// periodic snapshots.
Gate* g_gate_opened_at_the_final_cut = nullptr;

Result<StopReport> SnapshotAndExitOpeningAtTheFinalCut(Engine& e, Gate& gate) {
  const SnapshotOptions& so = e.options().snapshot;
  EXPECT_EQ(so.disk_interval.count(), 0) << "a periodic cut would open the gate early";
  EXPECT_EQ(so.shm_interval.count(), 0) << "a periodic cut would open the gate early";
  g_gate_opened_at_the_final_cut = &gate;
  detail::g_before_end_cut.store(+[] { g_gate_opened_at_the_final_cut->open(); });
  auto stopped = e.stop(StopMode::kSnapshotAndExit);
  detail::g_before_end_cut.store(nullptr);
  g_gate_opened_at_the_final_cut = nullptr;
  gate.open();  // a stop() that failed before its cut
  return stopped;
}

std::vector<std::string> GenerationFiles(const std::string& dir) {
  std::vector<std::string> out;
  for (const auto& e : fs::directory_iterator(dir)) {
    const std::string name = e.path().filename().string();
    if (name.rfind("gen-", 0) == 0) out.push_back(e.path().string());
  }
  std::sort(out.begin(), out.end());
  return out;
}

// "<prefix><n>", built by appending: gcc 12's -Wrestrict misfires on
// `"literal" + std::string&&` once inlined (GCC bug 105329).
std::string Numbered(const char* prefix, long long n) {
  std::string out(prefix);
  out += std::to_string(n);
  return out;
}

// Writes `image` as generation 1 of `dir`, as an engine would have left it.
testing::AssertionResult WriteGenerationOne(const std::string& dir,
                                            std::span<const unsigned char> image) {
  const std::string path = dir + "/gen-00000000000000000001.jobsnap";
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  if (fd < 0) return testing::AssertionFailure() << path << ": " << std::strerror(errno);
  const bool whole = ::write(fd, image.data(), image.size()) == static_cast<ssize_t>(image.size());
  ::close(fd);
  if (!whole) return testing::AssertionFailure() << path << ": short write";
  return testing::AssertionSuccess();
}

// The header of a hand-made generation 1 (WriteGenerationOne), cut in 2023.
snapshot::Header GenerationOneHeader(std::uint64_t next_job_id) {
  snapshot::Header header;
  header.generation = 1;
  header.cut_epoch = 1;
  header.wall_time_ns = 1'700'000'000'000'000'000;
  header.next_job_id = next_job_id;
  return header;
}

std::vector<unsigned char> ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::vector<unsigned char>((std::istreambuf_iterator<char>(in)),
                                    std::istreambuf_iterator<char>());
}

// ---- snapshot_now and kSnapshotAndExit ----------------------------------------

TEST(RecoveryTest, SnapshotNowNeedsADiskStore) {
  EngineOptions o;
  auto e = Engine::open(o);
  ASSERT_TRUE(IsOk(e));
  ASSERT_TRUE(IsOk(e->start()));
  auto snap = e->snapshot_now();
  ASSERT_FALSE(snap.ok());
  EXPECT_EQ(snap.status().code(), StatusCode::kFailedPrecondition);
  auto stop = e->stop(StopMode::kSnapshotAndExit);
  ASSERT_FALSE(stop.ok());
  EXPECT_EQ(stop.status().code(), StatusCode::kFailedPrecondition);
  EXPECT_EQ(e->state(), EngineState::kRunning) << "a refused stop must leave the engine running";
}

// snapshot_now() with a disk store but no running engine: before start()
// and after stop(), kFailedPrecondition saying so; nothing is written.
TEST(RecoveryTest, SnapshotNowNeedsARunningEngine) {
  TempDir tmp;
  auto e = Engine::open(DiskOptions(tmp.dir()));
  ASSERT_TRUE(IsOk(e));
  for (int round = 0; round < 2; ++round) {
    if (round == 1) {
      ASSERT_TRUE(IsOk(e->start()));
      ASSERT_TRUE(IsOk(e->stop(StopMode::kAbandon)));
    }
    auto snap = e->snapshot_now();
    ASSERT_FALSE(snap.ok()) << round;
    EXPECT_EQ(snap.status().code(), StatusCode::kFailedPrecondition) << round;
    EXPECT_NE(snap.status().message().find("not running"), std::string::npos)
        << round << ": " << snap.status().to_string();
  }
}

// Set by SlotsASleepingWorkerHeldForASnapshotComeBackWhenItEnds.
std::atomic<bool> g_cut_hook_open{false};
Gate* g_cut_hook_gate = nullptr;
Engine* g_cut_hook_engine = nullptr;

TEST(RecoveryTest, SlotsASleepingWorkerHeldForASnapshotComeBackWhenItEnds) {
  // Every slot of the table is used by jobs that finish while a snapshot
  // holds them (finished after its cut), and the worker then goes to sleep.
  // It kept those slots: nothing woke it when the snapshot ended, and every
  // submit found the table full (kQueueFull for good on an idle engine).
  TempDir tmp;
  EngineOptions o = DiskOptions(tmp.dir());
  o.capacity = 16;
  o.spin_iterations = 1;
  auto e = Engine::open(o);
  ASSERT_TRUE(IsOk(e));
  Gate gate;
  std::atomic<int> ran{0};
  auto h = e->register_handler("gated", [&](JobContext&) {
    gate.wait();
    ran.fetch_add(1);
    return Outcome::kDone;
  });
  ASSERT_TRUE(IsOk(h));
  ASSERT_TRUE(IsOk(e->start()));
  for (int i = 0; i < 16; ++i) ASSERT_TRUE(IsOk(e->submit(*h, "j")));
  ASSERT_EQ(e->submit(*h, "j").status().code(), StatusCode::kQueueFull);
  // Inside the snapshot, before its end: let the jobs finish (after the cut,
  // so held) and give the worker time to go to sleep.
  g_cut_hook_gate = &gate;
  g_cut_hook_engine = &*e;
  g_cut_hook_open.store(false);
  detail::g_before_end_cut.store(+[] {
    if (g_cut_hook_open.exchange(true)) return;  // the first snapshot only
    g_cut_hook_gate->open();
    const auto until = std::chrono::steady_clock::now() + milliseconds(5000);
    while (g_cut_hook_engine->health().done < 16 && std::chrono::steady_clock::now() < until) {
      std::this_thread::sleep_for(milliseconds(1));
    }
    std::this_thread::sleep_for(milliseconds(100));  // the worker idles, flushes, sleeps
  });
  auto snap = e->snapshot_now();
  detail::g_before_end_cut.store(nullptr);
  ASSERT_TRUE(IsOk(snap));
  ASSERT_EQ(e->health().done, 16u);
  // The snapshot has ended: its slots are free again, with the worker asleep.
  const auto until = steady_clock::now() + milliseconds(2000);
  Result<JobId> id = e->submit(*h, "after");
  while (!id.ok() && id.status().code() == StatusCode::kQueueFull && steady_clock::now() < until) {
    std::this_thread::sleep_for(milliseconds(1));
    id = e->submit(*h, "after");
  }
  ASSERT_TRUE(IsOk(id)) << "the table stayed full with no job pending: "
                        << e->health().pending << " pending";
  ASSERT_TRUE(IsOk(e->stop(StopMode::kDrain)));
  EXPECT_EQ(ran.load(), 17);
}

TEST(RecoveryTest, SnapshotNowIsDurableAndHoldsEveryPendingJob) {
  TempDir tmp;
  auto e = Engine::open(DiskOptions(tmp.dir()));
  ASSERT_TRUE(IsOk(e));
  Gate gate;
  auto h = e->register_handler("slow", [&](JobContext&) {
    gate.wait();
    return Outcome::kDone;
  });
  ASSERT_TRUE(IsOk(h));
  ASSERT_TRUE(IsOk(e->start()));
  std::set<JobId> ids;
  for (int i = 0; i < 100; ++i) {
    auto id = e->submit(*h, "payload-" + std::to_string(i));
    ASSERT_TRUE(IsOk(id));
    ids.insert(*id);
  }
  auto snap = e->snapshot_now();
  ASSERT_TRUE(IsOk(snap));
  EXPECT_EQ(snap->jobs, 100u);
  ASSERT_FALSE(snap->path.empty());
  // The file is there, 0600, and decodes to exactly those jobs.
  struct stat st{};
  ASSERT_EQ(::stat(snap->path.c_str(), &st), 0) << snap->path;
  EXPECT_EQ(st.st_mode & 0777, 0600u);
  auto bytes = ReadFile(snap->path);
  auto view = snapshot::decode(bytes);
  ASSERT_TRUE(IsOk(view));
  std::set<JobId> in_file;
  int running = 0;
  for (const auto& j : view->jobs) {
    in_file.insert(j.id);
    running += j.state == snapshot::JobState::kRunningAtCut;
  }
  EXPECT_EQ(in_file, ids);
  EXPECT_LE(running, 1) << "one worker runs at most one job";
  EXPECT_EQ(view->header.generation, snap->generation);
  EXPECT_GT(view->header.next_job_id, *ids.rbegin());
  Health health = e->health();
  EXPECT_EQ(health.last_durable_generation, snap->generation);
  EXPECT_TRUE(health.last_snapshot_error.empty());
  gate.open();
  ASSERT_TRUE(IsOk(e->stop(StopMode::kDrain)));
}

// A restored job's unique key is found by its id, as a submitted one's:
// cancel() frees it at once, and a new submit with it is a new job.
TEST(RecoveryTest, CancellingARestoredKeyedJobFreesItsKeyAtOnce) {
  TempDir tmp;
  JobId keyed = 0;
  {
    auto e = Engine::open(DiskOptions(tmp.dir()));
    ASSERT_TRUE(IsOk(e));
    auto h = e->register_handler("remind", [](JobContext&) { return Outcome::kDone; });
    ASSERT_TRUE(IsOk(h));
    ASSERT_TRUE(IsOk(e->start()));
    auto id = e->submit(*h, "a", {.delay = std::chrono::hours(1), .unique_key = "order-1"});
    ASSERT_TRUE(IsOk(id));
    keyed = *id;
    ASSERT_TRUE(IsOk(e->submit(*h, "b", {.delay = std::chrono::hours(1), .unique_key = "order-2"})));
    ASSERT_TRUE(IsOk(e->stop(StopMode::kSnapshotAndExit)));
  }
  auto e = Engine::open(DiskOptions(tmp.dir()));
  ASSERT_TRUE(IsOk(e));
  auto h = e->register_handler("remind", [](JobContext&) { return Outcome::kDone; });
  ASSERT_TRUE(IsOk(h));
  auto started = e->start();
  ASSERT_TRUE(IsOk(started));
  ASSERT_EQ(started->recovery.delayed, 2u);
  // Still held: a submit with the key gets the restored job's id.
  auto same = e->submit(*h, "a2", {.delay = std::chrono::hours(1), .unique_key = "order-1"});
  ASSERT_TRUE(IsOk(same));
  EXPECT_EQ(*same, keyed);
  auto cancelled = e->cancel(keyed);
  ASSERT_TRUE(IsOk(cancelled));
  EXPECT_EQ(*cancelled, CancelResult::kCancelled);
  auto fresh = e->submit(*h, "a3", {.delay = std::chrono::hours(1), .unique_key = "order-1"});
  ASSERT_TRUE(IsOk(fresh));
  EXPECT_NE(*fresh, keyed) << "the cancelled job's key was not freed";
  ASSERT_TRUE(IsOk(e->stop(StopMode::kAbandon)));
}

// After a restart, health() names the generation recovery loaded as the
// newest (and durable) one, with its size and a fresh age, before this
// process publishes any: it said 0 until then (for ever here, where no
// periodic snapshot runs).
TEST(RecoveryTest, HealthNamesTheRecoveredGenerationBeforeTheFirstNewSnapshot) {
  TempDir tmp;
  std::uint64_t generation = 0;
  std::uint64_t bytes = 0;
  {
    auto e = Engine::open(DiskOptions(tmp.dir()));
    ASSERT_TRUE(IsOk(e));
    Gate gate;
    auto h = e->register_handler("slow", [&](JobContext&) {
      gate.wait();
      return Outcome::kDone;
    });
    ASSERT_TRUE(IsOk(h));
    ASSERT_TRUE(IsOk(e->start()));
    for (int i = 0; i < 20; ++i) ASSERT_TRUE(IsOk(e->submit(*h, "job-" + std::to_string(i))));
    // The running job outlives exit_deadline: released once the final cut is taken.
    auto stop = SnapshotAndExitOpeningAtTheFinalCut(*e, gate);
    ASSERT_TRUE(IsOk(stop));
    EXPECT_EQ(stop->left_in_snapshot, 20u);
    Health last = e->health();
    generation = last.last_durable_generation;
    bytes = last.last_snapshot_bytes;
    ASSERT_NE(generation, 0u);
  }
  auto e = Engine::open(DiskOptions(tmp.dir()));  // no periodic snapshot
  ASSERT_TRUE(IsOk(e));
  ASSERT_TRUE(IsOk(e->register_handler("slow", [](JobContext&) { return Outcome::kDone; })));
  Health before = e->health();
  EXPECT_EQ(before.last_durable_generation, 0u) << "nothing recovered before start()";
  auto started = e->start();
  ASSERT_TRUE(IsOk(started));
  ASSERT_TRUE(started->recovery.recovered);
  Health h = e->health();
  EXPECT_EQ(h.last_snapshot_generation, generation);
  EXPECT_EQ(h.last_durable_generation, generation);
  EXPECT_EQ(h.last_snapshot_bytes, bytes);
  EXPECT_LT(h.last_durable_age, std::chrono::seconds(60));
  EXPECT_EQ(h.at_risk, 0u) << "the recovered jobs are on disk";
  EXPECT_TRUE(h.ok) << (h.reasons.empty() ? "" : h.reasons.front());
  ASSERT_TRUE(IsOk(e->stop(StopMode::kDrain)));
}

TEST(RecoveryTest, SnapshotAndExitResumesExactlyTheJobsLeft) {
  TempDir tmp;
  std::set<JobId> submitted;
  std::map<JobId, std::string> payloads;
  {
    auto e = Engine::open(DiskOptions(tmp.dir()));
    ASSERT_TRUE(IsOk(e));
    Gate gate;
    std::atomic<int> started{0};
    auto h = e->register_handler("work", [&](JobContext&) {
      started.fetch_add(1);
      gate.wait();
      return Outcome::kDone;
    });
    ASSERT_TRUE(IsOk(h));
    ASSERT_TRUE(IsOk(e->start()));
    for (int i = 0; i < 50; ++i) {
      const std::string p = "job-" + std::to_string(i) + std::string(i * 10, 'x');  // some > inline
      auto id = e->submit(*h, p, {.priority = static_cast<std::uint8_t>(i % 3)});
      ASSERT_TRUE(IsOk(id));
      submitted.insert(*id);
      payloads[*id] = p;
    }
    ASSERT_TRUE(WaitUntil([&] { return started.load() == 1; }));
    // The running handler outlives exit_deadline (it returns once the final
    // cut is taken): it is in the cut, pending (a graceful exit).
    auto stop = SnapshotAndExitOpeningAtTheFinalCut(*e, gate);
    ASSERT_TRUE(IsOk(stop));
    EXPECT_EQ(started.load(), 1) << "a queued job ran during stop(kSnapshotAndExit)";
    EXPECT_EQ(stop->left_in_snapshot, 50u);
    EXPECT_EQ(e->state(), EngineState::kStopped);
  }
  // Restart: every job comes back, with its id, payload and priority.
  std::mutex mu;
  std::map<JobId, std::string> ran;
  std::map<JobId, std::uint32_t> attempts;
  auto e = Engine::open(DiskOptions(tmp.dir()));
  ASSERT_TRUE(IsOk(e));
  auto h = e->register_handler("work", [&](JobContext& job) {
    std::lock_guard<std::mutex> l(mu);
    ran[job.id()] = std::string(job.payload());
    attempts[job.id()] = job.attempt();
    return Outcome::kDone;
  });
  ASSERT_TRUE(IsOk(h));
  auto started = e->start();
  ASSERT_TRUE(IsOk(started));
  const RecoveryReport& r = started->recovery;
  EXPECT_TRUE(r.recovered);
  EXPECT_EQ(r.pending + r.running_at_cut, 50u);
  // The job whose handler outlived exit_deadline was interrupted by a
  // graceful exit, not a crash: recorded pending (no recovery), its attempt kept.
  EXPECT_EQ(r.running_at_cut, 0u);
  EXPECT_EQ(r.pending, 50u);
  EXPECT_EQ(r.poisoned + r.unknown_handler + r.dead, 0u);
  EXPECT_TRUE(r.skipped.empty());
  EXPECT_NE(r.source.find(tmp.dir()), std::string::npos) << r.source;
  ASSERT_TRUE(IsOk(e->stop(StopMode::kDrain)));
  std::lock_guard<std::mutex> l(mu);
  EXPECT_EQ(ran, payloads);
  // The job that was running at the cut had one attempt already.
  int second_attempts = 0;
  for (auto& [id, a] : attempts) second_attempts += a == 2;
  EXPECT_EQ(second_attempts, 1);
  // Ids continue above the old ones. (A stopped engine keeps its directory
  // lock until it is destroyed.)
  { Engine done = std::move(*e); }
  auto e2 = Engine::open(DiskOptions(tmp.dir()));
  ASSERT_TRUE(IsOk(e2));
  auto h2 = e2->register_handler("work", [](JobContext&) { return Outcome::kDone; });
  ASSERT_TRUE(IsOk(e2->start()));
  auto fresh = e2->submit(*h2, "new");
  ASSERT_TRUE(IsOk(fresh));
  EXPECT_GT(*fresh, *submitted.rbegin());
  ASSERT_TRUE(IsOk(e2->stop()));
}

TEST(RecoveryTest, DrainLeavesAnEmptyFinalSnapshot) {
  TempDir tmp;
  {
    auto e = Engine::open(DiskOptions(tmp.dir()));
    ASSERT_TRUE(IsOk(e));
    auto h = e->register_handler("w", [](JobContext&) { return Outcome::kDone; });
    ASSERT_TRUE(IsOk(e->start()));
    for (int i = 0; i < 20; ++i) ASSERT_TRUE(IsOk(e->submit(*h, "x")));
    ASSERT_TRUE(IsOk(e->snapshot_now()));
    ASSERT_TRUE(IsOk(e->stop(StopMode::kDrain)));
  }
  auto e = Engine::open(DiskOptions(tmp.dir()));
  ASSERT_TRUE(IsOk(e));
  auto h = e->register_handler("w", [](JobContext&) { return Outcome::kDone; });
  auto started = e->start();
  ASSERT_TRUE(IsOk(started));
  EXPECT_TRUE(started->recovery.recovered);
  EXPECT_EQ(started->recovery.pending + started->recovery.running_at_cut, 0u)
      << "jobs finished before a clean stop must not run again";
  ASSERT_TRUE(IsOk(e->stop()));
}

TEST(RecoveryTest, SecondEngineOnTheSameDirectoryIsRefused) {
  TempDir tmp;
  auto a = Engine::open(DiskOptions(tmp.dir()));
  ASSERT_TRUE(IsOk(a));
  auto b = Engine::open(DiskOptions(tmp.dir()));
  ASSERT_FALSE(b.ok());
  EXPECT_EQ(b.status().code(), StatusCode::kFailedPrecondition) << b.status().to_string();
}

TEST(RecoveryTest, BadSnapshotOptionsNameTheField) {
  EngineOptions o;
  o.snapshot.enabled = true;
  auto e = Engine::open(o);
  ASSERT_FALSE(e.ok());
  EXPECT_NE(e.status().to_string().find("snapshot.dir"), std::string::npos);
  o.snapshot.shm_name = "bad/name";
  e = Engine::open(o);
  ASSERT_FALSE(e.ok());
  EXPECT_NE(e.status().to_string().find("shm_name"), std::string::npos);
  o.snapshot.shm_name.clear();
  o.snapshot.dir = "/tmp/x";
  o.snapshot.keep_generations = 0;
  e = Engine::open(o);
  ASSERT_FALSE(e.ok());
  EXPECT_NE(e.status().to_string().find("keep_generations"), std::string::npos);
}

TEST(RecoveryTest, AFailedDiskPublishIsReportedInHealthAndTheEngineKeepsRunning) {
  TempDir tmp;
  std::vector<std::string> errors;
  std::mutex errors_mu;
  EngineOptions o = DiskOptions(tmp.dir());
  o.log = [&](LogLevel level, std::string_view line) {
    if (level == LogLevel::kError) {
      std::lock_guard<std::mutex> l(errors_mu);
      errors.emplace_back(line);
    }
  };
  auto e = Engine::open(o);
  ASSERT_TRUE(IsOk(e));
  std::atomic<int> ran{0};
  auto h = e->register_handler("w", [&](JobContext&) {
    ran.fetch_add(1);
    return Outcome::kDone;
  });
  ASSERT_TRUE(IsOk(e->start()));
  auto first = e->snapshot_now();
  ASSERT_TRUE(IsOk(first));
  // Take the directory away: the next publish cannot create its temp file.
  fs::remove_all(tmp.dir());
  auto failed = e->snapshot_now();
  ASSERT_FALSE(failed.ok());
  EXPECT_EQ(failed.status().code(), StatusCode::kIoError) << failed.status().to_string();
  Health health = e->health();
  EXPECT_EQ(health.snapshot_failures, 1u);
  EXPECT_NE(health.last_snapshot_error.find(tmp.dir()), std::string::npos)
      << health.last_snapshot_error;
  EXPECT_EQ(health.last_durable_generation, first->generation)
      << "a failed publish must not count as durable";
  {
    std::lock_guard<std::mutex> l(errors_mu);
    ASSERT_FALSE(errors.empty()) << "the failure must be logged";
  }
  // Jobs still run; once the directory is back, snapshots succeed again
  // and health clears the error.
  ASSERT_TRUE(IsOk(e->submit(*h, "x")));
  ASSERT_TRUE(WaitUntil([&] { return ran.load() == 1; }));
  fs::create_directories(tmp.dir());
  ::chmod(tmp.dir().c_str(), 0700);
  auto again = e->snapshot_now();
  ASSERT_TRUE(IsOk(again));
  EXPECT_GT(again->generation, first->generation + 1) << "a failed generation number is not reused";
  health = e->health();
  EXPECT_TRUE(health.last_snapshot_error.empty());
  EXPECT_EQ(health.last_durable_generation, again->generation);
  ASSERT_TRUE(IsOk(e->stop()));
}

// A large snapshot with every kind of record, restored into a table with
// exactly as many slots as it has live jobs: the counts, dead letters (in
// image order), unique keys, the scheduler's jobs, and run order within a
// priority (one worker: FIFO per level, in image order) all come back.
TEST(RecoveryTest, ALargeSnapshotOfEveryKindOfRecordComesBackInImageOrderAtExactCapacity) {
  TempDir tmp;
  const std::string dir = tmp.dir();
  ASSERT_EQ(::mkdir(dir.c_str(), 0700), 0);
  constexpr int kRecords = 100'000;
  const std::int64_t now_ns = std::chrono::duration_cast<std::chrono::nanoseconds>(
                                  std::chrono::system_clock::now().time_since_epoch())
                                  .count();
  snapshot::Encoder encoder;
  snapshot::Header header;
  header.generation = 1;
  header.wall_time_ns = now_ns;
  header.next_job_id = kRecords + 1;
  encoder.begin(header);
  encoder.add_handler("work");
  encoder.add_handler("gone");  // not registered below
  std::vector<std::string> payloads(kRecords);
  std::vector<std::string> keys(kRecords);
  std::map<std::string, std::uint64_t> expect;
  std::map<int, std::uint64_t> queued_at;  // priority -> jobs expected to run
  for (int i = 0; i < kRecords; ++i) {
    snapshot::JobRecord j;
    j.id = static_cast<JobId>(i) + 1;
    j.priority = static_cast<std::uint8_t>(i % 3);
    j.submit_ns = now_ns - 1'000'000;
    j.run_at_ns = j.submit_ns;
    payloads[i] = std::to_string(i);
    j.payload = payloads[i];
    switch (i % 10) {
      case 0:
        j.state = snapshot::JobState::kDead;
        j.dead_reason = snapshot::DeadReason::kFailed;
        j.dead_at_ns = now_ns;
        j.error = "failed";
        ++expect["dead"];
        break;
      case 1:
        j.state = snapshot::JobState::kRunningAtCut;
        j.cancel_requested = true;
        ++expect["cancelled"];
        break;
      case 2:
        j.handler = 1;
        ++expect["unknown_handler"];
        break;
      case 3:
        j.state = snapshot::JobState::kRunningAtCut;
        j.recoveries = 3;  // a 4th recovery: past max_recoveries (3)
        ++expect["poisoned"];
        break;
      case 4:
        j.state = snapshot::JobState::kDelayed;
        j.run_at_ns = now_ns + 3'600'000'000'000;  // in an hour
        ++expect["delayed"];
        break;
      case 5:
        j.state = snapshot::JobState::kRunningAtCut;
        ++expect["running_at_cut"];
        ++queued_at[j.priority];
        break;
      case 6:
        keys[i] = "key-" + std::to_string(i);
        j.key = keys[i];
        ++expect["pending"];
        ++queued_at[j.priority];
        break;
      default:
        ++expect["pending"];
        ++queued_at[j.priority];
        break;
    }
    encoder.add_job(j);
  }
  const std::span<const unsigned char> image = encoder.finish();
  ASSERT_TRUE(WriteGenerationOne(dir, image));

  // Exactly as many slots as live jobs.
  EngineOptions o = DiskOptions(dir);
  o.capacity = expect["pending"] + expect["delayed"] + expect["running_at_cut"];
  // Room for every letter: past max_dead the oldest failed ones would be
  // discarded (RestoredFailedDeadLettersAreTrimmedToMaxDead).
  o.max_dead = kRecords;
  auto e = Engine::open(o);
  ASSERT_TRUE(IsOk(e));
  Gate gate;
  std::mutex ran_mu;
  std::vector<std::vector<int>> ran(3);
  std::atomic<bool> first{true};
  auto h = e->register_handler("work", [&](JobContext& ctx) {
    if (first.exchange(false)) gate.wait();  // everything else stays queued meanwhile
    std::lock_guard<std::mutex> l(ran_mu);
    ran[ctx.priority()].push_back(std::stoi(std::string(ctx.payload())));
    return Outcome::kDone;
  });
  ASSERT_TRUE(IsOk(h));
  auto started = e->start();
  ASSERT_TRUE(IsOk(started));
  const RecoveryReport& r = started->recovery;
  EXPECT_EQ(r.pending, expect["pending"]);
  EXPECT_EQ(r.delayed, expect["delayed"]);
  EXPECT_EQ(r.running_at_cut, expect["running_at_cut"]);
  EXPECT_EQ(r.cancelled, expect["cancelled"]);
  EXPECT_EQ(r.poisoned, expect["poisoned"]);
  EXPECT_EQ(r.unknown_handler, expect["unknown_handler"]);
  EXPECT_EQ(r.dead, expect["dead"]);
  // Dead letters in image order: dead, no handler and poison records alike.
  const std::vector<DeadLetter> dead = e->dead_letters();
  ASSERT_EQ(dead.size(), expect["dead"] + expect["unknown_handler"] + expect["poisoned"]);
  for (std::size_t k = 1; k < dead.size(); ++k) {
    ASSERT_LT(dead[k - 1].id, dead[k].id) << "dead letters out of image order at " << k;
  }
  // Unique keys of jobs from both halves still point at their jobs.
  for (int i : {6, 16, kRecords / 2 + 6, kRecords - 4}) {
    ASSERT_EQ(i % 10, 6);
    SubmitOptions so;
    so.unique_key = keys[i];
    auto id = e->submit(*h, "duplicate", so);
    ASSERT_TRUE(IsOk(id));
    EXPECT_EQ(*id, static_cast<JobId>(i) + 1) << keys[i];
  }
  EXPECT_EQ(e->health().delayed, expect["delayed"]);
  gate.open();
  const std::uint64_t to_run = queued_at[0] + queued_at[1] + queued_at[2];
  ASSERT_TRUE(WaitUntil([&] { return e->health().done >= to_run; }));
  std::lock_guard<std::mutex> l(ran_mu);
  for (int p = 0; p < 3; ++p) {
    ASSERT_EQ(ran[p].size(), queued_at[p]) << "priority " << p;
    // The first job run may be any level's head; after it, FIFO per level.
    for (std::size_t k = 1; k < ran[p].size(); ++k) {
      ASSERT_LT(ran[p][k - 1], ran[p][k]) << "priority " << p << " out of image order at " << k;
    }
  }
}

// A job that fails for good becomes a dead letter and leaves its slot: a
// snapshot cut in between held it twice, as a letter and as a live job, and a
// crash then restored both (it ran again, and stayed dead). A hook at that
// point asks for a snapshot and gives it 300 ms: the cut must wait for the
// worker to finish, or see one of the two.
Engine* g_dying_engine = nullptr;
std::thread g_dying_snapshot;            // set by the hook, then g_dying_hook_done
std::atomic<bool> g_dying_hook_done{false};
std::atomic<bool> g_dying_snapshot_done{false};
std::string g_dying_snapshot_path;

TEST(RecoveryTest, AJobDyingDuringACutIsInItAsADeadLetterOrAsLiveNeverBoth) {
  TempDir tmp;
  auto e = Engine::open(DiskOptions(tmp.dir()));
  ASSERT_TRUE(IsOk(e));
  auto h = e->register_handler("fails", [](JobContext&) { return Outcome::kFail; });
  ASSERT_TRUE(IsOk(h));
  ASSERT_TRUE(IsOk(e->start()));
  g_dying_engine = &*e;
  g_dying_hook_done.store(false);
  g_dying_snapshot_done.store(false);
  detail::g_dead_letter_in.store(+[](JobId) {
    g_dying_snapshot = std::thread([] {
      auto snap = g_dying_engine->snapshot_now();
      if (snap) g_dying_snapshot_path = snap->path;
      g_dying_snapshot_done.store(true);
    });
    const auto until = std::chrono::steady_clock::now() + milliseconds(300);
    while (!g_dying_snapshot_done.load() && std::chrono::steady_clock::now() < until) {
      std::this_thread::sleep_for(milliseconds(1));
    }
    g_dying_hook_done.store(true, std::memory_order_release);
  });
  auto id = e->submit(*h, "doomed");
  ASSERT_TRUE(IsOk(id));
  ASSERT_TRUE(WaitUntil([&] { return g_dying_hook_done.load(std::memory_order_acquire); }));
  detail::g_dead_letter_in.store(nullptr);
  ASSERT_TRUE(g_dying_snapshot.joinable());
  g_dying_snapshot.join();
  ASSERT_FALSE(g_dying_snapshot_path.empty()) << "the snapshot failed";
  auto bytes = ReadFile(g_dying_snapshot_path);
  auto view = snapshot::decode(bytes);
  ASSERT_TRUE(IsOk(view));
  int copies = 0;
  for (const auto& j : view->jobs) copies += j.id == *id;
  EXPECT_EQ(copies, 1) << "the dying job is in the snapshot " << copies << " times";
  ASSERT_TRUE(IsOk(e->stop(StopMode::kDrain)));
}

// After a reboot (power loss) the engine's clock starts again near zero, and
// recovered jobs were submitted before that zero. Their times must survive:
// they used to come back as the boot time, which the next snapshot then
// wrote for good (and queue-wait and age figures used).
TEST(RecoveryTest, JobsSubmittedBeforeTheBootKeepTheirTimesThroughTheNextSnapshot) {
  TempDir tmp;
  const std::string dir = tmp.dir();
  ASSERT_EQ(::mkdir(dir.c_str(), 0700), 0);
  const std::int64_t now_ns = std::chrono::duration_cast<std::chrono::nanoseconds>(
                                  std::chrono::system_clock::now().time_since_epoch())
                                  .count();
  // Before the counters' zero, whichever the engine reads: a day more than
  // steady_clock's (and so the TSC's) time since boot.
  const std::int64_t since_boot = std::chrono::duration_cast<std::chrono::nanoseconds>(
                                      std::chrono::steady_clock::now().time_since_epoch())
                                      .count();
  const std::int64_t before_boot = now_ns - since_boot - 86'400'000'000'000;
  snapshot::Encoder encoder;
  snapshot::Header header;
  header.generation = 1;
  header.wall_time_ns = now_ns - since_boot - 1'000'000'000;
  header.next_job_id = 10;
  encoder.begin(header);
  encoder.add_handler("work");
  snapshot::JobRecord pending;
  pending.id = 1;
  pending.submit_ns = before_boot;
  pending.run_at_ns = before_boot;
  pending.payload = "old";
  encoder.add_job(pending);
  snapshot::JobRecord retry = pending;  // its back-off ran out while the machine was down
  retry.id = 2;
  retry.state = snapshot::JobState::kWaitingRetry;
  retry.attempts = 1;
  retry.run_at_ns = before_boot + 60'000'000'000;
  encoder.add_job(retry);
  const std::span<const unsigned char> image = encoder.finish();
  ASSERT_TRUE(WriteGenerationOne(dir, image));
  auto e = Engine::open(DiskOptions(dir));
  ASSERT_TRUE(IsOk(e));
  Gate gate;
  auto h = e->register_handler("work", [&](JobContext&) {
    gate.wait();
    return Outcome::kDone;
  });
  ASSERT_TRUE(IsOk(h));
  auto started = e->start();
  ASSERT_TRUE(IsOk(started));
  EXPECT_EQ(started->recovery.pending + started->recovery.delayed, 2u);
  // Recovered from a generation file: durable already, none at risk.
  EXPECT_EQ(e->health().at_risk, 0u);
  ASSERT_TRUE(IsOk(e->submit(*h, "new")));
  EXPECT_EQ(e->health().at_risk, 1u) << "a job accepted since is at risk";
  auto snap = e->snapshot_now();
  ASSERT_TRUE(IsOk(snap));
  auto bytes = ReadFile(snap->path);
  auto view = snapshot::decode(bytes);
  ASSERT_TRUE(IsOk(view));
  ASSERT_EQ(view->jobs.size(), 3u);
  for (const auto& j : view->jobs) {
    if (j.id > 2) continue;  // the new one
    // The clock's conversion is good to microseconds; the boot is a day later.
    EXPECT_NEAR(static_cast<double>(j.submit_ns), static_cast<double>(before_boot), 1e6)
        << "job " << j.id << ": submitted " << (j.submit_ns - before_boot) / 1e9
        << " s after its recorded time";
    const std::int64_t run_at = j.id == 1 ? pending.run_at_ns : retry.run_at_ns;
    EXPECT_NEAR(static_cast<double>(j.run_at_ns), static_cast<double>(run_at), 1e6)
        << "job " << j.id;
  }
  gate.open();
  ASSERT_TRUE(IsOk(e->stop(StopMode::kDrain)));
}

// The shared-memory image is encoded straight into the segment; when the
// segment cannot grow for a larger image (a full /dev/shm, here
// RLIMIT_FSIZE), the snapshot reports the shared-memory failure, yet the
// disk generation still gets the whole image and the previous shared-memory
// image stays readable; once there is room again both stores take the next.
TEST(RecoveryTest, ASharedMemorySegmentThatCannotGrowStillLetsTheDiskGenerationHaveEveryJob) {
  TempDir tmp;
  ShmCleanup shm{unique_shm_name()};
  EngineOptions o = DiskOptions(tmp.dir());
  o.snapshot.shm_name = shm.name;
  auto e = Engine::open(o);
  ASSERT_TRUE(IsOk(e));
  Gate gate;
  auto h = e->register_handler("w", [&](JobContext&) {
    gate.wait();
    return Outcome::kDone;
  });
  ASSERT_TRUE(IsOk(h));
  ASSERT_TRUE(IsOk(e->start()));
  ASSERT_TRUE(IsOk(e->snapshot_now()));  // a small image in both stores
  auto small = persist::ShmStore::read_existing(shm.name);
  ASSERT_TRUE(small.ok()) << small.status().to_string();
  // ~1.2 MB of payloads: more than a slot of the 1 MiB segment holds, so the
  // next image needs a larger slot, placed past the end of the segment.
  constexpr int kJobs = 150;
  const std::string payload(8000, 'p');
  for (int i = 0; i < kJobs; ++i) ASSERT_TRUE(IsOk(e->submit(*h, payload)));

  struct rlimit old {};
  ASSERT_EQ(::getrlimit(RLIMIT_FSIZE, &old), 0);
  struct rlimit limit = old;
  limit.rlim_cur = std::size_t{2200} << 10;  // the segment is ~2 MiB; the file ~1.2 MB
  void (*old_handler)(int) = ::signal(SIGXFSZ, SIG_IGN);
  ASSERT_EQ(::setrlimit(RLIMIT_FSIZE, &limit), 0);
  auto durable = e->snapshot_now();
  ::setrlimit(RLIMIT_FSIZE, &old);
  ::signal(SIGXFSZ, old_handler);

  // The generation is durable on disk, so snapshot_now() succeeds; the
  // shared-memory failure is in health(), and the durable figures move.
  ASSERT_TRUE(IsOk(durable));
  const Health after = e->health();
  EXPECT_EQ(after.snapshot_failures, 1u);
  EXPECT_NE(after.last_snapshot_error.find(shm.name), std::string::npos)
      << after.last_snapshot_error;
  EXPECT_NE(after.last_snapshot_error.find("cannot grow"), std::string::npos)
      << after.last_snapshot_error;
  EXPECT_EQ(after.last_durable_generation, durable->generation);
  EXPECT_EQ(after.last_snapshot_generation, durable->generation);
  EXPECT_EQ(after.at_risk, 0u);
  EXPECT_FALSE(after.ok);
  // The previous shared-memory image is intact.
  auto still = persist::ShmStore::read_existing(shm.name);
  ASSERT_TRUE(still.ok()) << still.status().to_string();
  EXPECT_EQ(*still, *small);
  // The disk generation written by that snapshot holds every job.
  std::vector<fs::path> files;
  for (const auto& entry : fs::directory_iterator(tmp.dir())) {
    if (entry.path().extension() == ".jobsnap") files.push_back(entry.path());
  }
  ASSERT_FALSE(files.empty());
  std::sort(files.begin(), files.end());
  std::ifstream in(files.back(), std::ios::binary);
  const std::vector<unsigned char> bytes((std::istreambuf_iterator<char>(in)),
                                         std::istreambuf_iterator<char>());
  auto view = snapshot::decode(bytes);
  ASSERT_TRUE(view.ok()) << files.back() << ": " << view.status().to_string();
  EXPECT_EQ(view->jobs.size(), static_cast<std::size_t>(kJobs));

  // Room again: the next snapshot reaches both stores, and clears the error.
  auto next = e->snapshot_now();
  ASSERT_TRUE(IsOk(next));
  EXPECT_EQ(e->health().last_snapshot_error, "");
  auto grown = persist::ShmStore::read_existing(shm.name);
  ASSERT_TRUE(grown.ok()) << grown.status().to_string();
  auto shm_view = snapshot::decode(*grown);
  ASSERT_TRUE(shm_view.ok()) << shm_view.status().to_string();
  EXPECT_EQ(shm_view->header.generation, next->generation);
  EXPECT_EQ(shm_view->jobs.size(), static_cast<std::size_t>(kJobs));
  gate.open();
  ASSERT_TRUE(IsOk(e->stop(StopMode::kDrain)));
}

// requeue_dead() moves a job from the dead letters back to the table while
// snapshots are cut: every snapshot must hold it somewhere (dead, or pending
// / running). A job that dies can briefly be in both (its letter is added
// before its slot is retired), which at-least-once allows; never in neither.
TEST(RecoveryTest, ASnapshotCutWhileAJobIsRequeuedFromTheDeadLettersStillHoldsIt) {
  TempDir tmp;
  EngineOptions o = DiskOptions(tmp.dir());
  o.snapshot.disk_interval = std::chrono::milliseconds(0);  // snapshot_now() only
  o.max_dead = 16;
  auto e = Engine::open(o);
  ASSERT_TRUE(IsOk(e));
  std::atomic<bool> run{true};
  auto h = e->register_handler("dies", [&](JobContext& job) {
    job.set_error("again");
    return Outcome::kFail;
  });
  ASSERT_TRUE(IsOk(h));
  ASSERT_TRUE(IsOk(e->start()));
  auto id = e->submit(*h, "p");
  ASSERT_TRUE(IsOk(id));
  std::atomic<std::uint64_t> requeues{0};
  std::thread requeuer([&] {
    while (run.load()) {
      if (e->requeue_dead(*id).ok()) requeues.fetch_add(1);
    }
  });
  // At least 300 snapshots, and as many requeues among them (a loaded
  // machine may need more snapshots for that; 60 s at most).
  int missing = 0;
  int snapshots = 0;
  constexpr int kSnapshots = 300;
  const auto give_up = steady_clock::now() + std::chrono::seconds(60);
  while ((snapshots < kSnapshots || requeues.load() < static_cast<std::uint64_t>(kSnapshots)) &&
         steady_clock::now() < give_up) {
    ++snapshots;
    auto info = e->snapshot_now();
    ASSERT_TRUE(IsOk(info));
    auto bytes = ReadFile(info->path);
    auto view = snapshot::decode(bytes);
    ASSERT_TRUE(view.ok()) << view.status().to_string();
    bool found = false;
    for (const auto& j : view->jobs) found = found || j.id == *id;
    if (!found) ++missing;
  }
  run.store(false);
  requeuer.join();
  EXPECT_EQ(missing, 0) << "snapshots without the job, of " << snapshots << " (" << requeues.load()
                        << " requeues)";
  // The loop ends once both reached kSnapshots: at least that many, as the
  // comment above says (GT failed a slow aarch64 run that stopped at exactly 300).
  EXPECT_GE(requeues.load(), static_cast<std::uint64_t>(kSnapshots)) << "too few requeues to tell";
  ASSERT_TRUE(IsOk(e->stop(StopMode::kAbandon)));
}

// ---- poison jobs, unknown handlers, dead jobs -------------------------------

// Runs one "life" of a service whose handler hangs on job "poison", in a
// forked child: it starts, lets that job start, takes a snapshot (the job is
// running at its cut) and is SIGKILLed, as a crash would leave it. A life that
// finds the job quarantined stops and exits. The child's RecoveryReport
// figures come back through a pipe. (A stop(kSnapshotAndExit) no longer
// stands for a crash: its final cut records a running job as pending.)
struct LifeReport {
  bool ok = false;  // the child reported and ended as expected
  std::uint64_t recovered = 0, running_at_cut = 0, poisoned = 0;
};
LifeReport LifeWithHangingJob(const std::string& dir, bool submit_first) {
  int fds[2];
  if (::pipe(fds) != 0) return {};
  const pid_t child = ::fork();
  if (child == 0) {
    ::close(fds[0]);
    auto e = Engine::open(DiskOptions(dir));
    if (!e) ::_exit(2);
    Gate gate;
    std::atomic<bool> hanging{false};
    auto h = e->register_handler("img", [&](JobContext& job) {
      if (job.payload() == "poison") {
        hanging = true;
        gate.wait();
      }
      return Outcome::kDone;
    });
    if (!h) ::_exit(3);
    auto started = e->start();
    if (!started) ::_exit(4);
    if (submit_first && !e->submit(*h, "poison")) ::_exit(5);
    const std::uint64_t report[3] = {started->recovery.recovered ? 1u : 0u,
                                     started->recovery.running_at_cut, started->recovery.poisoned};
    if (::write(fds[1], report, sizeof report) != static_cast<ssize_t>(sizeof report)) ::_exit(6);
    if (started->recovery.poisoned > 0) {
      gate.open();
      if (!e->stop()) ::_exit(7);
      ::_exit(0);
    }
    if (!WaitUntil([&] { return hanging.load(); })) ::_exit(8);
    if (!e->snapshot_now()) ::_exit(9);
    ::kill(::getpid(), SIGKILL);
    ::_exit(10);
  }
  ::close(fds[1]);
  LifeReport out;
  std::uint64_t report[3] = {};
  const bool read_all = child > 0 && ::read(fds[0], report, sizeof report) == static_cast<ssize_t>(sizeof report);
  ::close(fds[0]);
  int status = 0;
  if (child < 0 || ::waitpid(child, &status, 0) != child) return {};
  out.recovered = report[0];
  out.running_at_cut = report[1];
  out.poisoned = report[2];
  const bool ended = report[2] > 0 ? WIFEXITED(status) && WEXITSTATUS(status) == 0
                                   : WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL;
  out.ok = read_all && ended;
  EXPECT_TRUE(out.ok) << "life ended with status " << status;
  return out;
}

TEST(RecoveryTest, JobRunningAtEveryCutIsQuarantinedAfterMaxRecoveries) {
  TempDir tmp;
  // Life 0 submits it; lives 1..3 find it running at the cut (recoveries 1..3,
  // still <= max_recoveries = 3, so it runs again); life 4 quarantines it.
  LifeReport r = LifeWithHangingJob(tmp.dir(), true);
  EXPECT_EQ(r.recovered, 0u);
  for (int life = 1; life <= 3; ++life) {
    r = LifeWithHangingJob(tmp.dir(), false);
    EXPECT_EQ(r.running_at_cut, 1u) << "life " << life;
    EXPECT_EQ(r.poisoned, 0u) << "life " << life;
  }
  r = LifeWithHangingJob(tmp.dir(), false);
  EXPECT_EQ(r.poisoned, 1u);
  EXPECT_EQ(r.running_at_cut, 0u);
  // It stays dead, with its reason, in every later snapshot.
  auto files = GenerationFiles(tmp.dir());
  ASSERT_FALSE(files.empty());
  auto bytes = ReadFile(files.back());
  auto view = snapshot::decode(bytes);
  ASSERT_TRUE(IsOk(view));
  ASSERT_EQ(view->jobs.size(), 1u);
  EXPECT_EQ(view->jobs[0].state, snapshot::JobState::kDead);
  EXPECT_EQ(view->jobs[0].recoveries, 4u);
  EXPECT_EQ(view->jobs[0].payload, "poison");
  EXPECT_NE(view->jobs[0].error.find("poison job"), std::string_view::npos);
  auto e = Engine::open(DiskOptions(tmp.dir()));
  ASSERT_TRUE(IsOk(e));
  ASSERT_TRUE(IsOk(e->register_handler("img", [](JobContext&) { return Outcome::kDone; })));
  auto started = e->start();
  ASSERT_TRUE(IsOk(started));
  EXPECT_EQ(started->recovery.dead, 1u);
  EXPECT_EQ(started->recovery.pending + started->recovery.running_at_cut, 0u);
  ASSERT_TRUE(IsOk(e->stop()));
}

// A long job that outlives exit_deadline at every graceful deploy
// (open/start/stop(kSnapshotAndExit)) is not a crash: it is restored pending,
// with no recovery, and never quarantined as poison. Before, the final cut
// recorded it as running at the cut and each deploy counted as a crash: with
// max_recoveries 1 it was a poison dead letter after two deploys.
Gate* g_gate_at_end_cut = nullptr;  // GracefulExitsPastTheDeadlineNeverMakeALongJobPoison

TEST(RecoveryTest, GracefulExitsPastTheDeadlineNeverMakeALongJobPoison) {
  TempDir tmp;
  EngineOptions o = DiskOptions(tmp.dir());
  o.snapshot.max_recoveries = 1;
  for (int life = 0; life < 2; ++life) {
    SCOPED_TRACE("life " + std::to_string(life));
    auto e = Engine::open(o);
    ASSERT_TRUE(IsOk(e));
    Gate gate;
    std::atomic<int> started{0};
    auto h = e->register_handler("long", [&](JobContext&) {
      started.fetch_add(1);
      gate.wait();
      return Outcome::kDone;
    });
    ASSERT_TRUE(IsOk(h));
    auto report = e->start();
    ASSERT_TRUE(IsOk(report));
    if (life == 0) {
      ASSERT_TRUE(IsOk(e->submit(*h, "long job")));
    } else {
      EXPECT_EQ(report->recovery.pending, 1u);
      EXPECT_EQ(report->recovery.running_at_cut, 0u);
      EXPECT_EQ(report->recovery.poisoned, 0u);
    }
    ASSERT_TRUE(WaitUntil([&] { return started.load() == 1; }));
    // The handler outlives exit_deadline (50 ms): it returns only once the
    // final cut is taken (the only cut: no periodic snapshots here).
    g_gate_at_end_cut = &gate;
    detail::g_before_end_cut.store(+[] { g_gate_at_end_cut->open(); });
    auto stopped = e->stop(StopMode::kSnapshotAndExit);
    detail::g_before_end_cut.store(nullptr);
    gate.open();
    ASSERT_TRUE(IsOk(stopped));
    EXPECT_EQ(stopped->left_in_snapshot, 1u);
  }
  // The final snapshot: pending, no recovery, both interrupted runs counted.
  auto files = GenerationFiles(tmp.dir());
  ASSERT_FALSE(files.empty());
  auto bytes = ReadFile(files.back());
  auto view = snapshot::decode(bytes);
  ASSERT_TRUE(IsOk(view));
  ASSERT_EQ(view->jobs.size(), 1u);
  EXPECT_EQ(view->jobs[0].state, snapshot::JobState::kPending);
  EXPECT_EQ(view->jobs[0].recoveries, 0u);
  EXPECT_EQ(view->jobs[0].attempts, 2u);
  // The third life runs it, no dead letter.
  auto e = Engine::open(o);
  ASSERT_TRUE(IsOk(e));
  std::atomic<std::uint32_t> attempt{0};
  ASSERT_TRUE(IsOk(e->register_handler("long", [&](JobContext& job) {
    attempt = job.attempt();
    return Outcome::kDone;
  })));
  auto started = e->start();
  ASSERT_TRUE(IsOk(started));
  EXPECT_EQ(started->recovery.pending, 1u);
  EXPECT_EQ(started->recovery.poisoned, 0u);
  EXPECT_TRUE(e->dead_letters().empty());
  ASSERT_TRUE(IsOk(e->stop(StopMode::kDrain)));
  EXPECT_EQ(attempt.load(), 3u);
  EXPECT_TRUE(e->dead_letters().empty());
}

// Jobs that become dead letters at start() (their handler is not registered,
// or they are poison) never enter the table: a payload above a max_payload
// lowered since is no reason to refuse the start (it said "raise
// max_payload" before), and the letter keeps the whole payload.
TEST(RecoveryTest, OversizedJobsThatBecomeDeadLettersDoNotBlockTheStart) {
  TempDir tmp;
  ASSERT_EQ(::mkdir(tmp.dir().c_str(), 0700), 0);
  const snapshot::Header header = GenerationOneHeader(10);
  snapshot::Encoder enc;
  enc.begin(header);
  enc.add_handler("legacy");
  enc.add_handler("img");
  const std::string big(4096, 'x');
  snapshot::JobRecord r;
  r.id = 5;
  r.handler = 0;  // "legacy": not registered at the restart
  r.state = snapshot::JobState::kPending;
  r.submit_ns = header.wall_time_ns;
  r.run_at_ns = header.wall_time_ns;
  r.payload = big;
  enc.add_job(r);
  r.id = 6;
  r.handler = 1;  // "img", running at a fourth cut: poison (max_recoveries 3)
  r.state = snapshot::JobState::kRunningAtCut;
  r.recoveries = 3;
  r.attempts = 1;
  enc.add_job(r);
  ASSERT_TRUE(WriteGenerationOne(tmp.dir(), enc.finish()));
  EngineOptions o = DiskOptions(tmp.dir());
  o.max_payload = 1024;
  ASSERT_EQ(o.snapshot.max_recoveries, 3u);
  auto e = Engine::open(o);
  ASSERT_TRUE(IsOk(e));
  ASSERT_TRUE(IsOk(e->register_handler("img", [](JobContext&) { return Outcome::kDone; })));
  auto started = e->start();
  ASSERT_TRUE(IsOk(started));
  EXPECT_EQ(started->recovery.unknown_handler, 1u);
  EXPECT_EQ(started->recovery.poisoned, 1u);
  auto dead = e->dead_letters();
  ASSERT_EQ(dead.size(), 2u);
  std::sort(dead.begin(), dead.end(), [](const auto& a, const auto& b) { return a.id < b.id; });
  EXPECT_EQ(dead[0].id, 5u);
  EXPECT_EQ(dead[0].reason, DeadReason::kNoHandler);
  EXPECT_EQ(dead[0].payload, big);
  EXPECT_EQ(dead[1].id, 6u);
  EXPECT_EQ(dead[1].reason, DeadReason::kPoison);
  EXPECT_EQ(dead[1].payload, big);
  ASSERT_TRUE(IsOk(e->stop()));
}

// max_dead bounds the failed letters a snapshot brings back as it bounds new
// ones: the oldest failed ones are discarded (counted in dead_discarded), the
// kept ones (no handler, poison) never. Before, they all came back (and with
// max_dead 0 stayed for good).
TEST(RecoveryTest, RestoredFailedDeadLettersAreTrimmedToMaxDead) {
  struct Case {
    std::size_t max_dead;
    bool with_kept;
    std::vector<JobId> want;
    std::uint64_t discarded;
  };
  // 5 failed letters (ids 1..5, oldest first), max_dead 2: the 2 newest stay.
  // With a kept letter (id 10) too: it stays, and 4 failed ones go. With
  // max_dead 0, every failed one goes.
  const Case cases[] = {{2, false, {4, 5}, 3}, {2, true, {5, 10}, 4}, {0, true, {10}, 5}};
  for (const Case& c : cases) {
    const std::size_t max_dead = c.max_dead;
    SCOPED_TRACE("max_dead " + std::to_string(max_dead) + (c.with_kept ? ", a kept letter" : ""));
    TempDir tmp;
    ASSERT_EQ(::mkdir(tmp.dir().c_str(), 0700), 0);
    const snapshot::Header header = GenerationOneHeader(20);
    snapshot::Encoder enc;
    enc.begin(header);
    enc.add_handler("work");
    enc.add_handler("gone");
    snapshot::JobRecord r;
    r.handler = 0;
    r.state = snapshot::JobState::kDead;
    r.attempts = 3;
    r.submit_ns = header.wall_time_ns;
    r.run_at_ns = header.wall_time_ns;
    r.payload = "p";
    r.error = "boom";
    for (JobId id = 1; id <= 5; ++id) {
      r.id = id;
      r.handler = 0;
      r.dead_reason = snapshot::DeadReason::kFailed;
      r.dead_at_ns = header.wall_time_ns + static_cast<std::int64_t>(id);
      enc.add_job(r);
      if (id == 2 && c.with_kept) {
        // A kept letter between failed ones: never discarded for room.
        r.id = 10;
        r.handler = 1;
        r.dead_reason = snapshot::DeadReason::kNoHandler;
        enc.add_job(r);
      }
    }
    ASSERT_TRUE(WriteGenerationOne(tmp.dir(), enc.finish()));
    EngineOptions o = DiskOptions(tmp.dir());
    o.max_dead = max_dead;
    auto e = Engine::open(o);
    ASSERT_TRUE(IsOk(e));
    ASSERT_TRUE(IsOk(e->register_handler("work", [](JobContext&) { return Outcome::kDone; })));
    auto started = e->start();
    ASSERT_TRUE(IsOk(started));
    EXPECT_EQ(started->recovery.dead, c.with_kept ? 6u : 5u);
    std::vector<JobId> ids;
    for (const DeadLetter& d : e->dead_letters()) ids.push_back(d.id);
    std::sort(ids.begin(), ids.end());
    EXPECT_EQ(ids, c.want);
    EXPECT_EQ(e->health().dead_discarded, c.discarded);
    ASSERT_TRUE(IsOk(e->stop()));
  }
}

// A job start() quarantines as poison became dead in this life: it counts
// in its handler's jobengine_jobs_dead_total, as a failed job does (the
// series counted failed jobs only).
TEST(RecoveryTest, APoisonJobCountsInItsHandlersDeadTotal) {
  TempDir tmp;
  ASSERT_EQ(::mkdir(tmp.dir().c_str(), 0700), 0);
  const snapshot::Header header = GenerationOneHeader(10);
  snapshot::Encoder enc;
  enc.begin(header);
  enc.add_handler("img");
  snapshot::JobRecord r;
  r.id = 7;
  r.handler = 0;
  r.state = snapshot::JobState::kRunningAtCut;
  r.recoveries = 3;  // running at a fourth cut: past max_recoveries (3)
  r.attempts = 1;
  r.submit_ns = header.wall_time_ns;
  r.run_at_ns = header.wall_time_ns;
  r.payload = "poison";
  enc.add_job(r);
  ASSERT_TRUE(WriteGenerationOne(tmp.dir(), enc.finish()));
  auto e = Engine::open(DiskOptions(tmp.dir()));
  ASSERT_TRUE(IsOk(e));
  ASSERT_TRUE(IsOk(e->register_handler("img", [](JobContext&) { return Outcome::kDone; })));
  auto started = e->start();
  ASSERT_TRUE(IsOk(started));
  ASSERT_EQ(started->recovery.poisoned, 1u);
  const std::string text = e->metrics_text();
  EXPECT_NE(text.find("jobengine_jobs_dead_total{handler=\"img\"} 1\n"), std::string::npos) << text;
  EXPECT_NE(text.find("jobengine_jobs_failed_total{handler=\"img\"} 0\n"), std::string::npos) << text;
  ASSERT_TRUE(IsOk(e->stop()));
}

TEST(RecoveryTest, JobsOfAnUnregisteredHandlerAreKeptDeadNeverDropped) {
  TempDir tmp;
  {
    auto e = Engine::open(DiskOptions(tmp.dir()));
    ASSERT_TRUE(IsOk(e));
    Gate gate;
    auto old_handler = e->register_handler("old.handler", [&](JobContext&) {
      gate.wait();
      return Outcome::kDone;
    });
    ASSERT_TRUE(IsOk(e->start()));
    for (int i = 0; i < 3; ++i) ASSERT_TRUE(IsOk(e->submit(*old_handler, "p" + std::to_string(i))));
    auto stopped = SnapshotAndExitOpeningAtTheFinalCut(*e, gate);
    ASSERT_TRUE(IsOk(stopped));
    EXPECT_EQ(stopped->left_in_snapshot, 3u);
  }
  {
    auto e = Engine::open(DiskOptions(tmp.dir()));
    ASSERT_TRUE(IsOk(e));
    ASSERT_TRUE(IsOk(e->register_handler("new.handler", [](JobContext&) { return Outcome::kDone; })));
    auto started = e->start();
    ASSERT_TRUE(IsOk(started));
    EXPECT_EQ(started->recovery.unknown_handler, 3u);
    ASSERT_TRUE(IsOk(e->stop()));
  }
  auto files = GenerationFiles(tmp.dir());
  auto bytes = ReadFile(files.back());
  auto view = snapshot::decode(bytes);
  ASSERT_TRUE(IsOk(view));
  ASSERT_EQ(view->jobs.size(), 3u);
  for (const auto& j : view->jobs) {
    EXPECT_EQ(j.state, snapshot::JobState::kDead);
    EXPECT_EQ(view->handlers[j.handler], "old.handler");
    EXPECT_NE(j.error.find("not registered"), std::string_view::npos);
  }
}

// A snapshot holding 65535 dead letters of distinct handlers that are not
// registered now, restored by an engine with one handler of its own: its next
// image would name 65536 handlers, which no recovery loads. It is refused,
// naming why, instead of published; the generation restored from stays.
TEST(RecoveryTest, ASnapshotThatWouldNameTooManyHandlersFailsInsteadOfBeingUnloadable) {
  TempDir tmp;
  ASSERT_EQ(::mkdir(tmp.dir().c_str(), 0700), 0);
  const snapshot::Header header = GenerationOneHeader(100'000);
  snapshot::Encoder enc;
  enc.begin(header);
  const std::size_t n = snapshot::kMaxHandlers;
  for (std::size_t i = 0; i < n; ++i) enc.add_handler(Numbered("gone.", static_cast<long long>(i)));
  for (std::size_t i = 0; i < n; ++i) {
    snapshot::JobRecord r;
    r.id = i + 1;
    r.handler = static_cast<std::uint32_t>(i);
    r.state = snapshot::JobState::kDead;
    r.dead_reason = snapshot::DeadReason::kFailed;
    r.submit_ns = header.wall_time_ns;
    r.run_at_ns = header.wall_time_ns;
    r.dead_at_ns = header.wall_time_ns;
    enc.add_job(r);
  }
  ASSERT_TRUE(WriteGenerationOne(tmp.dir(), enc.finish()));

  // Room for every letter (past max_dead the oldest failed ones are discarded).
  EngineOptions o = DiskOptions(tmp.dir());
  o.max_dead = n;
  auto e = Engine::open(o);
  ASSERT_TRUE(IsOk(e));
  ASSERT_TRUE(IsOk(e->register_handler("w", [](JobContext&) { return Outcome::kDone; })));
  auto started = e->start();
  ASSERT_TRUE(IsOk(started));
  ASSERT_EQ(started->recovery.generation, 1u);
  auto snap = e->snapshot_now();
  ASSERT_FALSE(snap.ok()) << "published generation " << snap->generation;
  EXPECT_EQ(snap.status().code(), StatusCode::kFailedPrecondition) << snap.status().to_string();
  EXPECT_NE(snap.status().message().find("more than 65535 handlers"), std::string::npos)
      << snap.status().to_string();
  const Health h = e->health();
  EXPECT_FALSE(h.ok);
  EXPECT_EQ(h.snapshot_failures, 1u);
  ASSERT_TRUE(IsOk(e->stop(StopMode::kAbandon)));
  // Generation 1 is still there and still loads.
  const auto files = GenerationFiles(tmp.dir());
  ASSERT_FALSE(files.empty());
  const std::vector<unsigned char> bytes = ReadFile(files.front());
  auto view = snapshot::verify(bytes);
  EXPECT_TRUE(view.ok()) << view.status().to_string();
}

// A dead letter keeps its job's unique key and deadline through a snapshot
// and a restart (dead records carry both), so requeue_dead() after the
// restart brings them back: the key is taken again, the deadline applies.
TEST(RecoveryTest, ADeadLettersKeyAndDeadlineSurviveARestartAndComeBackWithRequeue) {
  TempDir tmp;
  JobId id = 0;
  {
    auto e = Engine::open(DiskOptions(tmp.dir()));
    ASSERT_TRUE(IsOk(e));
    auto h = e->register_handler("w", [](JobContext&) { return Outcome::kFail; });
    ASSERT_TRUE(IsOk(h));
    ASSERT_TRUE(IsOk(e->start()));
    auto submitted = e->submit(*h, "p", {.deadline = std::chrono::minutes(5), .unique_key = "k-1"});
    ASSERT_TRUE(IsOk(submitted));
    id = *submitted;
    ASSERT_TRUE(WaitUntil([&] { return e->health().dead == 1; }));
    ASSERT_TRUE(IsOk(e->stop(StopMode::kSnapshotAndExit)));
  }
  const std::vector<unsigned char> bytes = ReadFile(GenerationFiles(tmp.dir()).back());
  auto view = snapshot::decode(bytes);
  ASSERT_TRUE(IsOk(view));
  ASSERT_EQ(view->jobs.size(), 1u);
  EXPECT_EQ(view->jobs[0].state, snapshot::JobState::kDead);
  EXPECT_EQ(view->jobs[0].key, "k-1");
  EXPECT_EQ(view->jobs[0].deadline_ns, 300'000'000'000u);

  auto e = Engine::open(DiskOptions(tmp.dir()));
  ASSERT_TRUE(IsOk(e));
  Gate gate;
  std::atomic<bool> had_deadline{false};
  std::atomic<bool> started{false};  // set after had_deadline (health's running is set before)
  auto h = e->register_handler("w", [&](JobContext& job) {
    had_deadline.store(job.deadline() != steady_clock::time_point::max());
    started.store(true);
    gate.wait();
    return Outcome::kDone;
  });
  ASSERT_TRUE(IsOk(h));
  ASSERT_TRUE(IsOk(e->start()));
  auto back = e->requeue_dead(id);
  ASSERT_TRUE(IsOk(back));
  const bool ran = WaitUntil([&] { return started.load(); });
  if (!ran) gate.open();  // or the drain at the end waits for good
  ASSERT_TRUE(ran) << "the requeued job did not run";
  EXPECT_TRUE(had_deadline.load()) << "the requeued run had no deadline";
  auto dup = e->submit(*h, "q", {.unique_key = "k-1"});
  gate.open();
  ASSERT_TRUE(IsOk(dup));
  EXPECT_EQ(*dup, id) << "a second job with the requeued job's key was accepted";
  ASSERT_TRUE(IsOk(e->stop(StopMode::kDrain)));
}

// ---- choosing the snapshot ----------------------------------------------------

TEST(RecoveryTest, CorruptNewestGenerationIsSkippedWithItsOffset) {
  TempDir tmp;
  {
    auto e = Engine::open(DiskOptions(tmp.dir()));
    ASSERT_TRUE(IsOk(e));
    Gate gate;
    auto h = e->register_handler("w", [&](JobContext&) {
      gate.wait();
      return Outcome::kDone;
    });
    ASSERT_TRUE(IsOk(e->start()));
    ASSERT_TRUE(IsOk(e->submit(*h, "a")));
    ASSERT_TRUE(IsOk(e->submit(*h, "b")));
    ASSERT_TRUE(IsOk(e->snapshot_now()));  // generation with 2 jobs
    ASSERT_TRUE(IsOk(e->submit(*h, "c")));
    auto stopped = SnapshotAndExitOpeningAtTheFinalCut(*e, gate);
    ASSERT_TRUE(IsOk(stopped));
    EXPECT_EQ(stopped->left_in_snapshot, 3u);  // newest: 3 jobs
  }
  auto files = GenerationFiles(tmp.dir());
  ASSERT_GE(files.size(), 2u);
  // Flip one payload byte of the newest generation.
  auto bytes = ReadFile(files.back());
  auto view = snapshot::decode(bytes);
  ASSERT_TRUE(IsOk(view));
  ASSERT_EQ(view->jobs.size(), 3u);
  const std::uint64_t damaged_record = view->jobs.back().offset;
  {
    int fd = ::open(files.back().c_str(), O_WRONLY);
    ASSERT_GE(fd, 0);
    const unsigned char junk = 0xEE;
    ASSERT_EQ(::pwrite(fd, &junk, 1, static_cast<off_t>(damaged_record + 48)), 1);
    ::close(fd);
  }
  auto e = Engine::open(DiskOptions(tmp.dir()));
  ASSERT_TRUE(IsOk(e));
  ASSERT_TRUE(IsOk(e->register_handler("w", [](JobContext&) { return Outcome::kDone; })));
  auto started = e->start();
  ASSERT_TRUE(IsOk(started));
  const RecoveryReport& r = started->recovery;
  ASSERT_TRUE(r.recovered);
  EXPECT_EQ(r.source, files[files.size() - 2]);
  EXPECT_EQ(r.pending + r.running_at_cut, 2u);
  ASSERT_EQ(r.skipped.size(), 1u);
  EXPECT_EQ(r.skipped[0].source, files.back());
  EXPECT_EQ(r.skipped[0].offset, damaged_record);
  EXPECT_NE(r.skipped[0].reason.find("checksum"), std::string::npos) << r.skipped[0].reason;
  ASSERT_TRUE(IsOk(e->stop()));
}

// A child process runs the engine with shared memory refreshed often and disk
// only at the start, submits, waits until shared memory holds its jobs, and is
// killed with SIGKILL: recovery must take the newer shared-memory image.
TEST(RecoveryTest, SharedMemoryNewerThanDiskWinsAfterAProcessCrash) {
  TempDir tmp;
  ShmCleanup shm{unique_shm_name()};
  int ready[2];
  ASSERT_EQ(::pipe(ready), 0);
  const pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    ::close(ready[0]);
    EngineOptions o = DiskOptions(tmp.dir());
    o.snapshot.shm_name = shm.name;
    o.snapshot.shm_interval = milliseconds(2);
    auto e = Engine::open(o);
    if (!e) ::_exit(2);
    Gate never;
    auto h = e->register_handler("w", [&](JobContext&) {
      never.wait();
      return Outcome::kDone;
    });
    if (!e->start()) ::_exit(3);
    if (!e->snapshot_now()) ::_exit(4);  // disk: no jobs yet
    // Read before the submits: the first snapshot after them may be
    // published (and the engine settle) before a read after them.
    const std::uint64_t after = e->health().last_snapshot_generation;
    for (int i = 0; i < 10; ++i) {
      if (!e->submit(*h, Numbered("j", i))) ::_exit(5);
    }
    // The segment holds all ten.
    if (!WaitUntilTheSegmentIsCurrent(*e, after)) ::_exit(7);
    char c = 'r';
    if (::write(ready[1], &c, 1) != 1) ::_exit(6);
    for (;;) ::pause();
  }
  ASSERT_TRUE(KillChildOnceReady(child, ready));

  EngineOptions o = DiskOptions(tmp.dir());
  o.snapshot.shm_name = shm.name;
  auto e = Engine::open(o);
  ASSERT_TRUE(IsOk(e));
  std::atomic<int> ran{0};
  ASSERT_TRUE(IsOk(e->register_handler("w", [&](JobContext&) {
    ran.fetch_add(1);
    return Outcome::kDone;
  })));
  auto started = e->start();
  ASSERT_TRUE(IsOk(started));
  EXPECT_EQ(started->recovery.source, "shm:" + shm.name);
  EXPECT_EQ(started->recovery.pending + started->recovery.running_at_cut, 10u);
  ASSERT_TRUE(IsOk(e->stop(StopMode::kDrain)));
  EXPECT_EQ(ran.load(), 10);
}

// ---- hostile or damaged stores, descriptors, modes ----------------------------

// Runs an engine on `dir` and segment `shm` (none if empty) whose one worker
// hangs on the first of `jobs` jobs, and stops it with kSnapshotAndExit: the
// final snapshot, in both stores, holds all `jobs` (one running at the cut).
void LeaveSnapshotOfPendingJobs(const std::string& dir, const std::string& shm, int jobs) {
  EngineOptions o = DiskOptions(dir);
  o.snapshot.shm_name = shm;
  auto e = Engine::open(o);
  ASSERT_TRUE(IsOk(e));
  Gate never;
  auto h = e->register_handler("w", [&](JobContext&) {
    never.wait();
    return Outcome::kDone;
  });
  ASSERT_TRUE(IsOk(e->start()));
  // One worker: the first job blocks it, the others stay queued.
  for (int i = 0; i < jobs; ++i) ASSERT_TRUE(IsOk(e->submit(*h, Numbered("j", i))));
  ASSERT_TRUE(IsOk(e->snapshot_now()));
  // The hanging job outlives exit_deadline (50 ms): it returns only once the
  // final cut is taken, so it and every queued job are in it.
  auto stopped = SnapshotAndExitOpeningAtTheFinalCut(*e, never);
  ASSERT_TRUE(IsOk(stopped));
  EXPECT_EQ(stopped->left_in_snapshot, static_cast<std::uint64_t>(jobs));
}

// Byte offset and length of the active image in a segment file (layout in
// persistence/shm_store.h: `active` at 64, descriptors of 64 bytes at 128).
std::pair<std::size_t, std::size_t> ActiveImageExtent(const std::vector<unsigned char>& seg) {
  std::uint32_t active = 0;
  std::memcpy(&active, seg.data() + 64, 4);
  std::uint64_t offset = 0, length = 0;
  std::memcpy(&offset, seg.data() + 128 + 64 * active + 8, 8);
  std::memcpy(&length, seg.data() + 128 + 64 * active + 24, 8);
  return {static_cast<std::size_t>(offset), static_cast<std::size_t>(length)};
}

void WriteFile(const std::string& path, const std::vector<unsigned char>& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
}

// An engine on `dir` and segment `shm` (left by LeaveSnapshotOfPendingJobs,
// 5 jobs, then damaged) recovers the 5 jobs from the disk generation and
// reports the segment as skipped, for a reason containing `why`.
void ExpectRecoveryFromDiskSkipping(const std::string& dir, const std::string& shm,
                                    const std::string& why) {
  EngineOptions o = DiskOptions(dir);
  o.snapshot.shm_name = shm;
  auto e = Engine::open(o);
  ASSERT_TRUE(IsOk(e));
  ASSERT_TRUE(IsOk(e->register_handler("w", [](JobContext&) { return Outcome::kDone; })));
  auto started = e->start();
  ASSERT_TRUE(IsOk(started));
  EXPECT_TRUE(started->recovery.recovered);
  EXPECT_EQ(started->recovery.source.rfind(dir, 0), 0u) << started->recovery.source;
  EXPECT_EQ(started->recovery.pending + started->recovery.running_at_cut, 5u);
  ASSERT_FALSE(started->recovery.skipped.empty());
  EXPECT_EQ(started->recovery.skipped.front().source, "shm:" + shm);
  EXPECT_NE(started->recovery.skipped.front().reason.find(why), std::string::npos)
      << started->recovery.skipped.front().reason;
  ASSERT_TRUE(IsOk(e->stop(StopMode::kDrain)));
}

// A segment whose image fails its checksum (scribbled on, or a hostile
// process's) is skipped, with the reason, and recovery takes the disk
// generation instead.
TEST(RecoveryTest, SharedMemoryImageFailingItsChecksumFallsBackToDisk) {
  TempDir tmp;
  ShmCleanup shm{unique_shm_name()};
  LeaveSnapshotOfPendingJobs(tmp.dir(), shm.name, 5);
  if (::testing::Test::HasFatalFailure()) return;
  const std::string seg_path = "/dev/shm/" + shm.name;
  std::vector<unsigned char> seg = ReadFile(seg_path);
  ASSERT_GE(seg.size(), 4096u);
  const auto [offset, length] = ActiveImageExtent(seg);
  ASSERT_GT(length, 0u);
  ASSERT_LE(offset + length, seg.size());
  seg[offset + length / 2] ^= 0x40;
  WriteFile(seg_path, seg);

  ExpectRecoveryFromDiskSkipping(tmp.dir(), shm.name, "checksum");
}

// After a clean stop both stores hold the final generation; recovery takes
// the shared-memory copy (the tie's rule), and its jobs are durable all the
// same: the generation file holds the same image. Before, health() counted
// them at risk until the next disk generation.
TEST(RecoveryTest, JobsFromSharedMemoryAreDurableWhenTheSameGenerationIsOnDisk) {
  TempDir tmp;
  ShmCleanup shm{unique_shm_name()};
  EngineOptions o = DiskOptions(tmp.dir());
  o.snapshot.shm_name = shm.name;
  std::uint64_t generation = 0;
  {
    auto e = Engine::open(o);
    ASSERT_TRUE(IsOk(e));
    auto h = e->register_handler("w", [](JobContext&) { return Outcome::kDone; });
    ASSERT_TRUE(IsOk(h));
    ASSERT_TRUE(IsOk(e->start()));
    for (int i = 0; i < 3; ++i) ASSERT_TRUE(IsOk(e->submit(*h, "x", {.delay = std::chrono::hours(1)})));
    ASSERT_TRUE(IsOk(e->stop(StopMode::kDrain)));
    generation = e->health().last_snapshot_generation;
  }
  auto e = Engine::open(o);
  ASSERT_TRUE(IsOk(e));
  ASSERT_TRUE(IsOk(e->register_handler("w", [](JobContext&) { return Outcome::kDone; })));
  auto started = e->start();
  ASSERT_TRUE(IsOk(started));
  EXPECT_EQ(started->recovery.source, "shm:" + shm.name);
  EXPECT_EQ(started->recovery.generation, generation);
  EXPECT_EQ(started->recovery.delayed, 3u);
  const Health h = e->health();
  EXPECT_EQ(h.at_risk, 0u) << "the recovered jobs are in a durable generation file already";
  ASSERT_TRUE(IsOk(e->stop(StopMode::kAbandon)));
}

// A segment whose active slot is a committed image of 0 bytes (with the
// checksum of no bytes: damage, or another writer) is skipped as truncated,
// and recovery takes the disk generation. It crashed open() before (a null
// snapshot dereferenced), and jobsnap with it.
TEST(RecoveryTest, AnEmptySharedMemoryImageIsSkippedNotACrash) {
  TempDir tmp;
  ShmCleanup shm{unique_shm_name()};
  LeaveSnapshotOfPendingJobs(tmp.dir(), shm.name, 5);
  if (::testing::Test::HasFatalFailure()) return;
  {
    auto store = persist::ShmStore::open_or_create(shm.name, 4096);
    ASSERT_TRUE(IsOk(store));
    const Status published = (*store)->publish(1000, {});
    ASSERT_TRUE(published.ok()) << published.to_string();
  }
  ExpectRecoveryFromDiskSkipping(tmp.dir(), shm.name, "truncated");
}

// A half-written segment -- its creator died before finishing the control
// block (zero magic) or before sizing it (zero length) -- holds no image: it
// is initialised afresh and recovery takes the disk generation.
TEST(RecoveryTest, HalfWrittenSegmentIsReinitialisedAndRecoveryUsesTheDisk) {
  for (const bool zero_length : {false, true}) {
    SCOPED_TRACE(zero_length ? "zero length" : "zero magic");
    TempDir tmp;
    ShmCleanup shm{unique_shm_name()};
    LeaveSnapshotOfPendingJobs(tmp.dir(), shm.name, 3);
    if (::testing::Test::HasFatalFailure()) return;
    const std::string seg_path = "/dev/shm/" + shm.name;
    std::vector<unsigned char> seg = ReadFile(seg_path);
    ASSERT_GE(seg.size(), 4096u);
    if (zero_length) {
      seg.clear();
    } else {
      std::fill(seg.begin(), seg.begin() + 8, 0);
    }
    WriteFile(seg_path, seg);

    EngineOptions o = DiskOptions(tmp.dir());
    o.snapshot.shm_name = shm.name;
    auto e = Engine::open(o);
    ASSERT_TRUE(IsOk(e));
    ASSERT_TRUE(IsOk(e->register_handler("w", [](JobContext&) { return Outcome::kDone; })));
    auto started = e->start();
    ASSERT_TRUE(IsOk(started));
    EXPECT_EQ(started->recovery.source.rfind(tmp.dir(), 0), 0u) << started->recovery.source;
    EXPECT_EQ(started->recovery.pending + started->recovery.running_at_cut, 3u);
    ASSERT_TRUE(IsOk(e->stop(StopMode::kDrain)));
  }
}

// A segment that is not ours to trust -- garbage in its control block, mode
// 0644, or not a regular file -- makes open() fail at once with an error that
// names it (never a hang, never a crash); the operator removes it
// (ShmStore::remove / rm /dev/shm/<name>). The disk generations are untouched
// and a later open() recovers from them.
// A damaged segment of ours is replaced (recovery uses the disk); one that is
// not ours, or not a plain 0600 file, fails open() naming it.
// A damaged segment is replaced only once its bytes are kept in the
// directory: when they cannot be (here a file-size limit makes the copy
// fail), open() fails naming it and the segment is left as it was. Before,
// it was removed anyway, and with it an image that may have been newer than
// the disk's.
TEST(RecoveryTest, ADamagedSegmentWhoseBytesCannotBeKeptIsLeftAndOpenFails) {
  TempDir tmp;
  ShmCleanup shm{unique_shm_name()};
  LeaveSnapshotOfPendingJobs(tmp.dir(), shm.name, 2);
  if (::testing::Test::HasFatalFailure()) return;
  const std::string seg_path = "/dev/shm/" + shm.name;
  std::vector<unsigned char> seg = ReadFile(seg_path);
  ASSERT_GE(seg.size(), 8192u);
  std::mt19937_64 rng(7);
  for (std::size_t i = 0; i < 256; ++i) seg[i] = static_cast<unsigned char>(rng());
  WriteFile(seg_path, seg);
  EngineOptions o = DiskOptions(tmp.dir());
  o.snapshot.shm_name = shm.name;
  // In a child: the limit is the process's. Exit codes say what went wrong.
  const pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    ::signal(SIGXFSZ, SIG_IGN);  // a write past the limit fails with EFBIG instead
    const struct rlimit limit{4096, 4096};
    if (::setrlimit(RLIMIT_FSIZE, &limit) != 0) ::_exit(2);
    auto e = Engine::open(o);
    if (e.ok()) ::_exit(3);
    if (e.status().code() != StatusCode::kCorruption) ::_exit(4);
    if (e.status().message().find("could not be kept") == std::string_view::npos) ::_exit(5);
    ::_exit(0);
  }
  int status = 0;
  ASSERT_EQ(::waitpid(pid, &status, 0), pid);
  ASSERT_TRUE(WIFEXITED(status)) << status;
  EXPECT_EQ(WEXITSTATUS(status), 0) << "3: opened, 4: another code, 5: another message";
  EXPECT_EQ(ReadFile(seg_path), seg) << "the segment was replaced though its bytes were not kept";
  // Removed by hand, the next open recovers from disk.
  ASSERT_EQ(::unlink(seg_path.c_str()), 0);
  auto e = Engine::open(o);
  ASSERT_TRUE(IsOk(e));
  ASSERT_TRUE(IsOk(e->register_handler("w", [](JobContext&) { return Outcome::kDone; })));
  auto started = e->start();
  ASSERT_TRUE(IsOk(started));
  EXPECT_EQ(started->recovery.pending + started->recovery.running_at_cut, 2u);
  ASSERT_TRUE(IsOk(e->stop(StopMode::kDrain)));
}

TEST(RecoveryTest, UntrustedSegmentFailsOpenNamingItAndLeavesTheDiskIntact) {
  enum class Damage { kGarbage, kMode0644, kSymlink };
  for (const Damage damage : {Damage::kGarbage, Damage::kMode0644, Damage::kSymlink}) {
    SCOPED_TRACE(static_cast<int>(damage));
    TempDir tmp;
    ShmCleanup shm{unique_shm_name()};
    LeaveSnapshotOfPendingJobs(tmp.dir(), shm.name, 2);
    if (::testing::Test::HasFatalFailure()) return;
    const std::string seg_path = "/dev/shm/" + shm.name;
    const std::string decoy = tmp.dir("decoy");
    StatusCode expected = StatusCode::kCorruption;
    switch (damage) {
      case Damage::kGarbage: {
        std::vector<unsigned char> seg = ReadFile(seg_path);
        std::mt19937_64 rng(7);
        for (std::size_t i = 0; i < 256 && i < seg.size(); ++i) {
          seg[i] = static_cast<unsigned char>(rng());
        }
        WriteFile(seg_path, seg);
        break;
      }
      case Damage::kMode0644:
        ASSERT_EQ(::chmod(seg_path.c_str(), 0644), 0);
        expected = StatusCode::kFailedPrecondition;
        break;
      case Damage::kSymlink:
        // Someone replaced the segment with a symlink to a file of theirs.
        ASSERT_EQ(::unlink(seg_path.c_str()), 0);
        WriteFile(decoy, std::vector<unsigned char>(8192, 0));
        ASSERT_EQ(::chmod(decoy.c_str(), 0600), 0);
        ASSERT_EQ(::symlink(decoy.c_str(), seg_path.c_str()), 0);
        expected = StatusCode::kFailedPrecondition;
        break;
    }
    EngineOptions o = DiskOptions(tmp.dir());
    o.snapshot.shm_name = shm.name;
    const auto t0 = steady_clock::now();
    if (damage == Damage::kGarbage) {
      // Our own segment, damaged: open() keeps its bytes in the snapshot
      // directory, replaces it, and recovery falls back to the disk.
      auto e = Engine::open(o);
      ASSERT_TRUE(IsOk(e));
      EXPECT_LT(steady_clock::now() - t0, std::chrono::seconds(10)) << "open() must not wait";
      ASSERT_TRUE(IsOk(e->register_handler("w", [](JobContext&) { return Outcome::kDone; })));
      auto started = e->start();
      ASSERT_TRUE(IsOk(started));
      EXPECT_EQ(started->recovery.pending + started->recovery.running_at_cut, 2u);
      ASSERT_FALSE(started->recovery.skipped.empty());
      EXPECT_EQ(started->recovery.skipped[0].source, "shm:" + shm.name);
      bool kept = false;
      for (const auto& f : std::filesystem::directory_iterator(tmp.dir())) {
        if (f.path().filename().string().rfind("damaged-shm-", 0) == 0) {
          kept = true;
          EXPECT_EQ(std::filesystem::status(f.path()).permissions() & std::filesystem::perms::all,
                    std::filesystem::perms::owner_read | std::filesystem::perms::owner_write);
        }
      }
      EXPECT_TRUE(kept) << "the damaged segment's bytes were not kept";
      ASSERT_TRUE(IsOk(e->stop(StopMode::kDrain)));
      continue;
    }
    auto e = Engine::open(o);
    ASSERT_FALSE(e.ok());
    EXPECT_EQ(e.status().code(), expected) << e.status().to_string();
    EXPECT_NE(e.status().message().find(shm.name), std::string::npos) << e.status().to_string();
    EXPECT_LT(steady_clock::now() - t0, std::chrono::seconds(10)) << "open() must not wait";
    if (damage == Damage::kSymlink) {
      EXPECT_EQ(ReadFile(decoy), std::vector<unsigned char>(8192, 0)) << "the decoy was written";
    }
    // Removed, the next open recovers from disk.
    ASSERT_EQ(::unlink(seg_path.c_str()), 0);
    auto again = Engine::open(o);
    ASSERT_TRUE(IsOk(again));
    ASSERT_TRUE(IsOk(again->register_handler("w", [](JobContext&) { return Outcome::kDone; })));
    auto started = again->start();
    ASSERT_TRUE(IsOk(started));
    EXPECT_EQ(started->recovery.pending + started->recovery.running_at_cut, 2u);
    ASSERT_TRUE(IsOk(again->stop(StopMode::kDrain)));
  }
}

// Files planted in the snapshot directory under a generation's name -- a
// symlink to a valid image elsewhere, a FIFO, a directory -- are never
// followed, opened or loaded: recovery takes the real newest generation and
// does not block on the FIFO.
TEST(RecoveryTest, PlantedSymlinkFifoAndDirectoryGenerationsAreIgnored) {
  TempDir tmp;
  LeaveSnapshotOfPendingJobs(tmp.dir(), "", 0);
  if (::testing::Test::HasFatalFailure()) return;
  // A second life adds 4 jobs, so the real newest generation differs.
  LeaveSnapshotOfPendingJobs(tmp.dir(), "", 4);
  if (::testing::Test::HasFatalFailure()) return;
  const std::vector<std::string> gens = GenerationFiles(tmp.dir());
  ASSERT_FALSE(gens.empty());
  const std::string newest = gens.back();
  // A valid image (the first life's, no jobs) outside the directory, linked
  // in as generation 2^60: were it followed, it would win.
  const std::string outside = tmp.dir("outside.jobsnap");
  fs::copy_file(gens.front(), outside);
  const std::string dir = tmp.dir();
  ASSERT_EQ(::symlink(outside.c_str(), (dir + "/gen-01152921504606846976.jobsnap").c_str()), 0);
  ASSERT_EQ(::mkfifo((dir + "/gen-01152921504606846977.jobsnap").c_str(), 0600), 0);
  ASSERT_EQ(::mkdir((dir + "/gen-01152921504606846978.jobsnap").c_str(), 0700), 0);

  auto e = Engine::open(DiskOptions(dir));
  ASSERT_TRUE(IsOk(e));
  ASSERT_TRUE(IsOk(e->register_handler("w", [](JobContext&) { return Outcome::kDone; })));
  auto started = e->start();
  ASSERT_TRUE(IsOk(started));
  EXPECT_EQ(started->recovery.source, newest);
  EXPECT_EQ(started->recovery.pending + started->recovery.running_at_cut, 4u);
  ASSERT_TRUE(IsOk(e->stop(StopMode::kDrain)));
}

// Whatever the umask (0 or 0777), the engine's directory is 0700 and its
// files and segment 0600.
TEST(RecoveryTest, ModesAre0700And0600WhateverTheUmask) {
  for (const mode_t mask : {mode_t{0}, mode_t{0777}}) {
    SCOPED_TRACE(Numbered("umask ", mask));
    TempDir tmp;
    ShmCleanup shm{unique_shm_name()};
    const mode_t old = ::umask(mask);
    {
      EngineOptions o = DiskOptions(tmp.dir());
      o.snapshot.shm_name = shm.name;
      auto e = Engine::open(o);
      ASSERT_TRUE(IsOk(e));
      ASSERT_TRUE(IsOk(e->start()));
      ASSERT_TRUE(IsOk(e->snapshot_now()));
      ASSERT_TRUE(IsOk(e->stop(StopMode::kDrain)));
    }
    ::umask(old);
    auto mode = [](const std::string& path) {
      struct stat st;
      return ::lstat(path.c_str(), &st) == 0 ? static_cast<unsigned>(st.st_mode & 07777) : 0xffffu;
    };
    EXPECT_EQ(mode(tmp.dir()), 0700u);
    EXPECT_EQ(mode(tmp.dir() + "/LOCK"), 0600u);
    EXPECT_EQ(mode(tmp.dir() + "/LIVE"), 0600u);
    const std::vector<std::string> gens = GenerationFiles(tmp.dir());
    ASSERT_FALSE(gens.empty());
    for (const std::string& g : gens) EXPECT_EQ(mode(g), 0600u) << g;
    EXPECT_EQ(mode("/dev/shm/" + shm.name), 0600u);
  }
}

// No descriptor the engine opens (LOCK, generation and temp files, the
// directory, the segment) leaks into a child that execs: every one is
// FD_CLOEXEC, and an exec'd shell sees none of the engine's files.
TEST(RecoveryTest, NoEngineDescriptorLeaksIntoAnExecdChild) {
  TempDir tmp;
  ShmCleanup shm{unique_shm_name()};
  auto inheritable = [] {
    std::set<int> out;
    for (const auto& entry : fs::directory_iterator("/proc/self/fd")) {
      const int fd = std::stoi(entry.path().filename().string());
      const int flags = ::fcntl(fd, F_GETFD);
      if (flags >= 0 && (flags & FD_CLOEXEC) == 0) out.insert(fd);
    }
    return out;
  };
  const std::set<int> before = inheritable();
  EngineOptions o = DiskOptions(tmp.dir());
  o.snapshot.shm_name = shm.name;
  o.snapshot.shm_interval = milliseconds(1);
  auto e = Engine::open(o);
  ASSERT_TRUE(IsOk(e));
  ASSERT_TRUE(IsOk(e->start()));
  ASSERT_TRUE(IsOk(e->snapshot_now()));
  EXPECT_EQ(inheritable(), before) << "a descriptor opened by the engine lacks FD_CLOEXEC";

  // The exec'd child lists what its descriptors point at.
  int out[2];
  ASSERT_EQ(::pipe2(out, O_CLOEXEC), 0);
  const pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    ::dup2(out[1], 1);
    ::execl("/bin/sh", "sh", "-c", "for f in /proc/self/fd/*; do readlink \"$f\"; done; exit 0",
            static_cast<char*>(nullptr));
    ::_exit(127);
  }
  ::close(out[1]);
  std::string listing;
  char buf[4096];
  for (ssize_t n; (n = ::read(out[0], buf, sizeof buf)) > 0;) listing.append(buf, static_cast<std::size_t>(n));
  ::close(out[0]);
  int status = 0;
  ASSERT_EQ(::waitpid(child, &status, 0), child);
  ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << listing;
  EXPECT_EQ(listing.find(tmp.dir()), std::string::npos) << listing;
  EXPECT_EQ(listing.find(shm.name), std::string::npos) << listing;
  ASSERT_TRUE(IsOk(e->stop(StopMode::kDrain)));
}

// ---- the cut, against a model -------------------------------------------------

// Producers submit and workers finish jobs while a thread takes snapshots with
// snapshot_now() and checks each one at once against a model. A global event
// counter orders what the test can observe: a job acknowledged (submit
// returned) before snapshot_now() was called, whose handler had not returned
// before snapshot_now() returned, must be in that snapshot; every job in a
// snapshot was accepted, with its own payload; no id appears twice.
// JOBENGINE_CUT_SNAPSHOTS sets how many snapshots (default 1000).
TEST(SnapshotCutTest, RandomizedSnapshotsHoldEveryAcknowledgedUnfinishedJob) {
  std::uint64_t seed = std::random_device{}();
  if (const char* s = std::getenv("JOBENGINE_CUT_SEED"); s && *s) seed = std::strtoull(s, nullptr, 10);
  int snapshots = 1000;
  if (const char* s = std::getenv("JOBENGINE_CUT_SNAPSHOTS"); s && *s) snapshots = std::atoi(s);
  std::printf("SnapshotCutTest seed %llu (replay: JOBENGINE_CUT_SEED=%llu)\n",
              static_cast<unsigned long long>(seed), static_cast<unsigned long long>(seed));
  SCOPED_TRACE("JOBENGINE_CUT_SEED=" + std::to_string(seed));
  std::mt19937_64 rng(seed);

  TempDir tmp;
  EngineOptions o = DiskOptions(tmp.dir());
  o.workers = 2;
  o.capacity = 1 << 12;
  o.idle = IdleStrategy::kSpinThenYield;
  o.snapshot.keep_generations = 2;
  auto e = Engine::open(o);
  ASSERT_TRUE(IsOk(e));

  constexpr int kProducers = 2;
  constexpr int kMaxJobs = 1 << 20;
  std::atomic<std::uint64_t> clock{1};
  struct JobEvents {
    std::atomic<std::uint64_t> acked{0};
    std::atomic<std::uint64_t> finished{0};
  };
  // Payload = the job's index in `events`, so a handler finds its record.
  std::vector<JobEvents> events(kMaxJobs);
  std::atomic<int> next_index{0};
  std::mutex ids_mu;
  std::map<JobId, int> index_of;
  const std::uint64_t slow_mask = rng() % 4;
  auto h = e->register_handler("m", [&](JobContext& job) {
    const int idx = std::stoi(std::string(job.payload()));
    // Some jobs take a while, so queues build up and snapshots hold many.
    if ((job.id() & 3) == slow_mask) {
      const auto until = steady_clock::now() + std::chrono::microseconds(30);
      while (steady_clock::now() < until) {
      }
    }
    events[idx].finished.store(clock.fetch_add(1));
    return Outcome::kDone;
  });
  ASSERT_TRUE(IsOk(h));
  ASSERT_TRUE(IsOk(e->start()));

  std::atomic<bool> producing{true};
  std::vector<std::thread> producers;
  for (int p = 0; p < kProducers; ++p) {
    producers.emplace_back([&, pseed = rng()] {
      std::mt19937_64 prng(pseed);
      while (producing.load()) {
        const int idx = next_index.fetch_add(1);
        if (idx >= kMaxJobs) return;
        for (;;) {
          auto id = e->submit(*h, std::to_string(idx),
                              {.priority = static_cast<std::uint8_t>(prng() % 3)});
          if (id) {
            {
              std::lock_guard<std::mutex> l(ids_mu);
              index_of[*id] = idx;
            }
            events[idx].acked.store(clock.fetch_add(1));
            break;
          }
          if (id.status().code() != StatusCode::kQueueFull) {
            ADD_FAILURE() << id.status().to_string();
            return;
          }
          std::this_thread::yield();
        }
        if (prng() % 64 == 0) std::this_thread::sleep_for(std::chrono::microseconds(prng() % 100));
      }
    });
  }

  std::size_t checked = 0, held = 0;
  for (int n = 0; n < snapshots && !::testing::Test::HasFailure(); ++n) {
    const std::uint64_t before = clock.fetch_add(1);
    auto info = e->snapshot_now();
    const std::uint64_t after = clock.fetch_add(1);
    ASSERT_TRUE(IsOk(info));
    auto bytes = ReadFile(info->path);
    auto view = snapshot::decode(bytes);
    ASSERT_TRUE(IsOk(view)) << info->path;
    std::set<int> in_snapshot;
    {
      std::lock_guard<std::mutex> l(ids_mu);
      for (const auto& j : view->jobs) {
        auto it = index_of.find(j.id);
        // A job can be in the cut before its submitter recorded the id: it
        // was accepted, and its payload names it.
        const int idx = it != index_of.end() ? it->second : std::stoi(std::string(j.payload));
        ASSERT_TRUE(in_snapshot.insert(idx).second) << "job " << idx << " twice in one snapshot";
        if (it != index_of.end()) {
          ASSERT_EQ(j.payload, std::to_string(idx)) << "job id " << j.id;
        }
      }
    }
    held += in_snapshot.size();
    const int limit = std::min(next_index.load(), kMaxJobs);
    for (int idx = 0; idx < limit; ++idx) {
      const std::uint64_t acked = events[idx].acked.load();
      if (acked == 0 || acked >= before) continue;
      const std::uint64_t finished = events[idx].finished.load();
      if (finished != 0 && finished < after) continue;  // may have finished before the cut
      ++checked;
      ASSERT_TRUE(in_snapshot.count(idx))
          << "job " << idx << " acknowledged at " << acked << ", before snapshot_now() began at "
          << before << ", and unfinished until " << (finished ? std::to_string(finished) : "now")
          << ", is missing from generation " << info->generation;
    }
    // Make the next cut fall somewhere else in the stream of submits.
    if (rng() % 2) std::this_thread::sleep_for(std::chrono::microseconds(rng() % 500));
  }
  producing = false;
  for (auto& t : producers) t.join();
  ASSERT_TRUE(IsOk(e->stop(StopMode::kDrain)));
  std::printf("%d snapshots, %zu jobs held in all, %zu (snapshot, job) pairs checked\n", snapshots,
              held, checked);
  EXPECT_GT(checked, 0u) << "the model never had a pending job to check";
}

}  // namespace
}  // namespace jobengine
