// Crash test: a child process runs the engine under load and is killed with
// SIGKILL at a random instant; the parent recovers and checks the snapshot it
// got against a record the child kept outside itself.
//
// The child: 3 producers submit jobs; 2 workers run them; one thread takes
// snapshots back to back (snapshot_now(), which writes shared memory and disk,
// so every snapshot's cut lies inside a logged window). Every event goes to an
// O_APPEND log file with one write(2) each, so the file's order is the real
// order of events that did not overlap:
//   ACK id        submit() returned the id
//   START id, w   worker w started the job (so w's previous job had retired)
//   DONE id       the handler is about to return (the job retires after this)
//   BEGIN         snapshot_now() is being called
//   END gen       snapshot_now() returned generation gen
// The parent opens an engine on the same directory and segment (recovery),
// runs every recovered job and checks, for the recovered generation G whose
// cut lies between its BEGIN and its END (or the kill):
//   - lost: every job ACKed before BEGIN, with no DONE before END, came back;
//   - back: no job came back whose worker had started another job before
//     BEGIN (it had retired before the cut);
//   - no job came back twice, and a snapshot that returned END was recoverable
//     (recovery never settles for a torn or older image).
// Three ways to time the kill, one test each:
//   - at a random instant (mostly under load, once a snapshot is durable);
//   - inside a snapshot: as soon as the log shows a BEGIN without its END,
//     i.e. while snapshot_now() cuts, encodes and writes shared memory and
//     disk (temp file, fsync, rename, directory fsync);
//   - during recovery: after a random-instant kill, a second child recovers
//     (Engine::open + start) and is killed at a random instant too, mostly
//     after open() began and before start() has returned (the kill times
//     follow how long a recovery takes on this machine; at least half the
//     kills must land there); the parent then recovers and checks as
//     above (a recovery that died must leave the stores as they were).
// JOBENGINE_CRASH_KILLS sets the number of kills (default 200 for random
// instants; the other two do a fifth of it, at least 5).
// JOBENGINE_CRASH_SEED replays a run. The torture campaign
// (tools/torture.sh, tests/HARDENING.md) runs DISABLED_TortureCampaign, which
// mixes the three for JOBENGINE_CRASH_SECONDS and prints the invariant counts.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <map>
#include <mutex>
#include <random>
#include <set>
#include <string>
#include <functional>
#include <thread>
#include <vector>

#include "jobengine/engine.h"
#include "jobengine/snapshot_tools.h"
#include "persistence/live_record.h"

namespace jobengine {
namespace {

namespace fs = std::filesystem;
using std::chrono::milliseconds;

enum EventType : std::uint8_t { kAck = 1, kStart = 2, kDone = 3, kBegin = 4, kEnd = 5 };

struct Event {
  std::uint8_t type;
  std::uint8_t worker;
  std::uint8_t pad[6];
  std::uint64_t value;
};
static_assert(sizeof(Event) == 16);

int g_log_fd = -1;

void log_event(EventType type, std::uint64_t value, std::uint8_t worker = 0) {
  Event e{};
  e.type = type;
  e.worker = worker;
  e.value = value;
  // One write per event: O_APPEND places it atomically at the end.
  if (::write(g_log_fd, &e, sizeof(e)) != sizeof(e)) ::_exit(20);
}

EngineOptions CrashOptions(const std::string& dir, const std::string& shm) {
  EngineOptions o;
  o.workers = 2;
  o.capacity = 8192;
  o.idle = IdleStrategy::kSpinThenYield;
  o.spin_iterations = 256;
  o.snapshot.enabled = true;
  o.snapshot.dir = dir;
  o.snapshot.shm_name = shm;
  // Every snapshot is taken by the logged snapshot_now() loop.
  o.snapshot.shm_interval = milliseconds(0);
  o.snapshot.disk_interval = milliseconds(0);
  o.snapshot.keep_generations = 2;
  return o;
}

[[noreturn]] void child_main(const std::string& dir, const std::string& shm, std::uint64_t seed,
                             int ready_fd) {
  auto e = Engine::open(CrashOptions(dir, shm));
  if (!e) ::_exit(2);
  std::atomic<int> next_worker{0};
  auto h = e->register_handler("crash.job", [&](JobContext& job) {
    thread_local const std::uint8_t w = static_cast<std::uint8_t>(next_worker.fetch_add(1) + 1);
    log_event(kStart, job.id(), w);
    if (job.id() % 7 == 0) {
      const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(50);
      while (std::chrono::steady_clock::now() < until) {
      }
    }
    log_event(kDone, job.id(), w);
    return Outcome::kDone;
  });
  if (!h) ::_exit(3);
  if (!e->start()) ::_exit(4);
  std::vector<std::thread> threads;
  for (int p = 0; p < 3; ++p) {
    threads.emplace_back([&, p] {
      std::mt19937_64 rng(seed + static_cast<std::uint64_t>(p));
      std::string payload;
      for (std::uint64_t n = 0;; ++n) {
        payload.assign(8 + rng() % 100, static_cast<char>('a' + p));
        auto id = e->submit(*h, payload, {.priority = static_cast<std::uint8_t>(rng() % 3)});
        if (id) {
          log_event(kAck, *id);
        } else {
          std::this_thread::yield();
        }
      }
    });
  }
  threads.emplace_back([&] {
    std::mt19937_64 rng(seed ^ 0x5eed);
    for (;;) {
      log_event(kBegin, 0);
      auto info = e->snapshot_now();
      if (!info) ::_exit(6);
      log_event(kEnd, info->generation);
      if (ready_fd >= 0) {
        // Ready once one snapshot is durable, so most kills have one to find.
        char c = 'r';
        if (::write(ready_fd, &c, 1) != 1) ::_exit(5);
        ::close(ready_fd);
        ready_fd = -1;
      }
      std::this_thread::sleep_for(std::chrono::microseconds(rng() % 3000));
    }
  });
  for (auto& t : threads) t.join();
  ::_exit(0);
}

// Opens the engine of a killed child's stores. The segment's flock goes with
// the last reference to its file, and a mapping's reference can be dropped
// a moment after waitpid() has reaped the child (seen once under TSan on a
// busy machine: "another engine is writing this segment"); so a refusal for
// that reason is retried for up to 5 s, counted in *waits. The directory's
// LOCK, never mapped, is released before waitpid returns.
Result<Engine> open_after_kill(const std::string& dir, const std::string& shm,
                               std::size_t* waits) {
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(5);
  for (;;) {
    auto e = Engine::open(CrashOptions(dir, shm));
    const bool locked = !e.ok() && e.status().code() == StatusCode::kFailedPrecondition &&
                        e.status().message().find("another engine") != std::string::npos;
    if (!locked || std::chrono::steady_clock::now() > give_up) return e;
    if (waits != nullptr) ++*waits;
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
}

std::vector<Event> read_log(const std::string& path) {
  std::vector<Event> out;
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return out;
  Event e;
  while (::read(fd, &e, sizeof(e)) == static_cast<ssize_t>(sizeof(e))) out.push_back(e);
  ::close(fd);
  return out;
}

// How a kill is timed (see the top). A kill during `jobsnap restore` is the
// next mode to add, once the tool exists.
enum class KillMode { kRandomInstant, kInsideSnapshot, kDuringRecovery, kMixed };

// What a campaign did and found; printed at its end, also after a failure
// (the failing kill's seed and index are in the failure message).
struct Counts {
  std::size_t kills = 0;
  std::size_t kills_inside_snapshot = 0;     // the log ended inside BEGIN..END
  std::size_t recovery_kills = 0;            // recovering children killed
  std::size_t recovery_kills_before_ready = 0;  // ... before start() returned
  std::size_t recovery_kills_inside = 0;     // ... after Engine::open() began, before start() returned
  std::size_t recoveries = 0;                // recoveries that found a snapshot
  std::size_t jobs_back = 0;
  std::size_t lost_checks = 0;               // acknowledged jobs checked present
  std::size_t jobs_lost = 0;                 // must stay 0
  std::size_t duplicated_before_cut = 0;     // finished before the cut, came back: must stay 0
  std::size_t ran_twice = 0;                 // must stay 0
  std::size_t older_than_acknowledged = 0;   // recovered older than a returned snapshot: 0
  std::size_t skipped_candidates = 0;        // torn/partial images recovery rejected
  std::size_t lock_waits = 0;                // 1 ms waits for a dead child's segment lock
  std::size_t recoverer_generations = 0;     // recovered a killed recovering engine's generation
  std::int64_t recovery_kill_range_us = 0;   // the last range recovery kill times were drawn from
  ~Counts() {
    std::printf(
        "crash campaign: %zu kills (%zu inside a snapshot), %zu recoveries killed (%zu before "
        "start() returned, %zu of them after open() began; %zu after publishing a generation; "
        "kill times drawn up to %lld us), %zu recoveries found a snapshot, %zu jobs came back, %zu "
        "lost-checks; violations: %zu jobs lost, %zu duplicated from before the cut, %zu ran "
        "twice, %zu recovered older than acknowledged; %zu torn or partial candidates "
        "rejected, 0 loaded; %zu ms waited for a dead child's segment lock\n",
        kills, kills_inside_snapshot, recovery_kills, recovery_kills_before_ready,
        recovery_kills_inside, recoverer_generations, static_cast<long long>(recovery_kill_range_us),
        recoveries,
        jobs_back, lost_checks, jobs_lost, duplicated_before_cut, ran_twice,
        older_than_acknowledged, skipped_candidates, lock_waits);
    std::fflush(stdout);
  }
};

// Reads the child's log from `*offset` on; returns true if the newest
// BEGIN/END event seen so far is a BEGIN (a snapshot is in progress).
bool snapshot_in_progress(int fd, off_t* offset, bool* in_snapshot) {
  Event buf[256];
  for (;;) {
    const ssize_t n = ::pread(fd, buf, sizeof buf, *offset);
    if (n <= 0) break;
    const std::size_t events = static_cast<std::size_t>(n) / sizeof(Event);
    for (std::size_t i = 0; i < events; ++i) {
      if (buf[i].type == kBegin) *in_snapshot = true;
      if (buf[i].type == kEnd) *in_snapshot = false;
    }
    *offset += static_cast<off_t>(events * sizeof(Event));
    if (events < 256) break;
  }
  return *in_snapshot;
}

int env_int(const char* name, int fallback) {
  const char* s = std::getenv(name);
  return s != nullptr && *s != '\0' ? std::atoi(s) : fallback;
}

void RunCampaign(KillMode campaign_mode, int kills, int seconds) {
  std::uint64_t seed = std::random_device{}();
  if (const char* s = std::getenv("JOBENGINE_CRASH_SEED"); s && *s) seed = std::strtoull(s, nullptr, 10);
  std::printf("CrashTest seed %llu, %d kills%s (replay: JOBENGINE_CRASH_SEED=%llu)\n",
              static_cast<unsigned long long>(seed), kills,
              seconds > 0 ? (", or " + std::to_string(seconds) + " s").c_str() : "",
              static_cast<unsigned long long>(seed));
  SCOPED_TRACE("JOBENGINE_CRASH_SEED=" + std::to_string(seed));
  std::mt19937_64 rng(seed);
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(seconds);

  std::string base = (fs::temp_directory_path() / "jobengine-crash-XXXXXX").string();
  ASSERT_NE(mkdtemp(base.data()), nullptr);
  Counts counts;
  std::size_t& recovered_runs = counts.recoveries;
  // kDuringRecovery: how long a recovering child takes from fork() until its
  // start() returns, as last measured (see there).
  std::int64_t recovery_span_us = 4800;
  for (int k = 0; (seconds > 0 ? std::chrono::steady_clock::now() < deadline : k < kills) &&
                  !::testing::Test::HasFailure();
       ++k) {
    KillMode mode = campaign_mode;
    if (mode == KillMode::kMixed) {
      const KillMode modes[] = {KillMode::kRandomInstant, KillMode::kInsideSnapshot,
                                KillMode::kDuringRecovery};
      mode = modes[rng() % 3];
    }
    SCOPED_TRACE("kill " + std::to_string(k));
    const std::string dir = base + "/run" + std::to_string(k);
    const std::string shm = "jobengine-crash-" + std::to_string(getpid()) + "-" + std::to_string(k);
    const std::string log_path = base + "/log" + std::to_string(k);
    g_log_fd = ::open(log_path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
    ASSERT_GE(g_log_fd, 0);
    int ready[2];
    ASSERT_EQ(::pipe2(ready, O_CLOEXEC), 0);
    const std::uint64_t child_seed = rng();
    const pid_t child = ::fork();
    ASSERT_GE(child, 0);
    if (child == 0) {
      // Never outlive the test, whatever happens to it.
      ::prctl(PR_SET_PDEATHSIG, SIGKILL);
      ::close(ready[0]);
      child_main(dir, shm, child_seed, ready[1]);
    }
    // Kill and reap the child on every path out of this iteration, also when
    // an assertion returns early.
    struct Reaper {
      pid_t pid;
      bool reaped = false;
      ~Reaper() {
        if (!reaped) {
          ::kill(pid, SIGKILL);
          ::waitpid(pid, nullptr, 0);
        }
      }
    } reaper{child};
    ::close(ready[1]);
    ::close(g_log_fd);
    // Kill at a random instant: sometimes during start-up and the first
    // snapshot, mostly once one is durable, under load. Inside a snapshot:
    // after a random delay, at the first poll that finds one in progress.
    const bool early = mode == KillMode::kRandomInstant && rng() % 10 == 0;
    if (!early) {
      char c;
      ASSERT_EQ(::read(ready[0], &c, 1), 1) << "child died before it was ready";
    }
    std::this_thread::sleep_for(std::chrono::microseconds(rng() % (early ? 2000 : 25000)));
    if (mode == KillMode::kInsideSnapshot) {
      const int log_fd = ::open(log_path.c_str(), O_RDONLY | O_CLOEXEC);
      ASSERT_GE(log_fd, 0);
      off_t offset = 0;
      bool in_snapshot = false;
      const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(5);
      while (!snapshot_in_progress(log_fd, &offset, &in_snapshot) &&
             std::chrono::steady_clock::now() < give_up) {
        std::this_thread::yield();
      }
      ::close(log_fd);
    }
    ::kill(child, SIGKILL);
    ++counts.kills;
    int status = 0;
    ASSERT_EQ(::waitpid(child, &status, 0), child);
    reaper.reaped = true;
    ::close(ready[0]);
    ASSERT_TRUE(WIFSIGNALED(status)) << "child exited by itself with " << WEXITSTATUS(status);
    {
      const std::vector<Event> at_kill = read_log(log_path);
      for (auto it = at_kill.rbegin(); it != at_kill.rend(); ++it) {
        if (it->type == kEnd) break;
        if (it->type == kBegin) {
          ++counts.kills_inside_snapshot;
          break;
        }
      }
    }

    // kDuringRecovery: the generation the first kill left (the one the
    // recovering engine loads), 0 if none.
    std::uint64_t left_by_kill = 0;
    if (mode == KillMode::kDuringRecovery) {
      // A recovering engine, killed at a random instant. Its handler never
      // returns, so it finishes no job; with no periodic snapshots it
      // publishes at most one generation: the one start() takes to make the
      // recoveries it gave durable (jobs the live record or the cut showed
      // running), holding exactly the jobs of the generation it loaded.
      if (auto newest = snapshot_tools::load_newest(dir, shm); newest.ok()) {
        left_by_kill = newest->view.header.generation;
      }
      // The recovering child writes the time (steady clock, the same in
      // every process) when it calls Engine::open(), then when start() has
      // returned: the kill landed inside the recovery when only the first
      // came.
      int started_pipe[2];
      ASSERT_EQ(::pipe2(started_pipe, O_CLOEXEC), 0);
      const auto stamp = [] {
        return static_cast<std::int64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(
                                             std::chrono::steady_clock::now().time_since_epoch())
                                             .count());
      };
      const std::int64_t forked_ns = stamp();
      const pid_t recoverer = ::fork();
      ASSERT_GE(recoverer, 0);
      if (recoverer == 0) {
        ::prctl(PR_SET_PDEATHSIG, SIGKILL);
        ::close(started_pipe[0]);
        std::int64_t t = stamp();
        if (::write(started_pipe[1], &t, sizeof t) != sizeof t) ::_exit(5);
        auto e = open_after_kill(dir, shm, nullptr);
        if (!e) ::_exit(2);
        auto h = e->register_handler("crash.job", [](JobContext&) {
          for (;;) ::pause();
          return Outcome::kDone;
        });
        if (!h) ::_exit(3);
        if (!e->start()) ::_exit(4);
        t = stamp();
        if (::write(started_pipe[1], &t, sizeof t) != sizeof t) ::_exit(5);
        for (;;) ::pause();
      }
      ::close(started_pipe[1]);
      // Kill times are drawn from 0 to 5/4 of how long the last recovery
      // that got through start() took from fork() (a sanitizer or an
      // emulator makes it many times longer than the first guess, 4.8 ms),
      // so most kills land while it opens and restores, on any machine.
      const std::int64_t range_us = recovery_span_us + recovery_span_us / 4;
      counts.recovery_kill_range_us = range_us;
      const std::int64_t delay_us = static_cast<std::int64_t>(rng() % static_cast<std::uint64_t>(range_us));
      std::this_thread::sleep_for(std::chrono::microseconds(delay_us));
      ::kill(recoverer, SIGKILL);
      int rstatus = 0;
      ASSERT_EQ(::waitpid(recoverer, &rstatus, 0), recoverer);
      ASSERT_TRUE(WIFSIGNALED(rstatus))
          << "the recovering child exited by itself with " << WEXITSTATUS(rstatus);
      std::int64_t stamps[2] = {0, 0};
      std::size_t got = 0;
      while (got < sizeof stamps) {
        const ssize_t n = ::read(started_pipe[0], reinterpret_cast<char*>(stamps) + got, sizeof stamps - got);
        if (n <= 0) break;
        got += static_cast<std::size_t>(n);
      }
      ::close(started_pipe[0]);
      const bool began = got >= sizeof stamps[0];
      const bool returned = got >= sizeof stamps;
      ++counts.recovery_kills;
      if (!returned) ++counts.recovery_kills_before_ready;
      if (began && !returned) ++counts.recovery_kills_inside;
      if (returned) {
        recovery_span_us = std::max<std::int64_t>(100, (stamps[1] - forked_ns) / 1000);
      } else if (!began) {
        // Before the child even ran: far too early for this machine.
        recovery_span_us = std::max(recovery_span_us, 2 * delay_us);
      } else {
        recovery_span_us = std::max(recovery_span_us, delay_us);
      }
    }

    // Recover.
    std::mutex mu;
    std::multiset<JobId> ran;
    std::uint64_t generation = 0;
    bool recovered = false;
    {
      auto e = open_after_kill(dir, shm, &counts.lock_waits);
      ASSERT_TRUE(e.ok()) << e.status().to_string();
      auto h = e->register_handler("crash.job", [&](JobContext& job) {
        std::lock_guard<std::mutex> l(mu);
        ran.insert(job.id());
        return Outcome::kDone;
      });
      ASSERT_TRUE(h.ok());
      auto started = e->start();
      ASSERT_TRUE(started.ok()) << started.status().to_string();
      recovered = started->recovery.recovered;
      generation = started->recovery.generation;
      counts.skipped_candidates += started->recovery.skipped.size();
      ASSERT_EQ(started->recovery.poisoned + started->recovery.unknown_handler, 0u);
      auto stopped = e->stop(StopMode::kDrain);
      ASSERT_TRUE(stopped.ok());
    }
    (void)::unlink(("/dev/shm/" + shm).c_str());

    // Check against the child's log.
    const std::vector<Event> log = read_log(log_path);
    std::vector<std::size_t> ends;  // positions of END events, in order
    std::map<std::uint64_t, std::size_t> end_of_generation;
    for (std::size_t i = 0; i < log.size(); ++i) {
      if (log[i].type == kEnd) {
        ends.push_back(i);
        end_of_generation[log[i].value] = i;
      }
    }
    if (!recovered) {
      ASSERT_TRUE(ends.empty()) << "a snapshot_now() returned generation " << log[ends[0]].value
                                << " but recovery found nothing";
      ASSERT_TRUE(ran.empty());
      continue;
    }
    ++recovered_runs;
    if (left_by_kill != 0 && generation != left_by_kill) {
      // Published by the killed recovering engine (see above): its jobs are
      // those of the generation it loaded, which the log describes. (Its
      // number may even be one the child began but never published.)
      ASSERT_GT(generation, left_by_kill);
      ++counts.recoverer_generations;
      generation = left_by_kill;
    }
    if (!ends.empty() && generation < log[ends.back()].value) {
      ++counts.older_than_acknowledged;
      FAIL() << "recovered an older generation than the newest snapshot_now() returned";
    }
    // The window of G: its BEGIN .. its END (or the end of the log).
    std::size_t end_pos = log.size();
    if (auto it = end_of_generation.find(generation); it != end_of_generation.end()) {
      end_pos = it->second;
    }
    std::size_t begin_pos = 0;
    bool found_begin = false;
    for (std::size_t i = end_pos; i-- > 0;) {
      if (log[i].type == kBegin) {
        begin_pos = i;
        found_begin = true;
        break;
      }
    }
    ASSERT_TRUE(found_begin) << "no BEGIN before generation " << generation;
    std::set<JobId> back;
    for (JobId id : ran) {
      if (!back.insert(id).second) {
        ++counts.ran_twice;
        FAIL() << "job " << id << " ran twice after recovery";
      }
    }
    counts.jobs_back += back.size();
    // lost
    std::set<JobId> done_before_end;
    for (std::size_t i = 0; i < end_pos; ++i) {
      if (log[i].type == kDone) done_before_end.insert(log[i].value);
    }
    for (std::size_t i = 0; i < begin_pos; ++i) {
      if (log[i].type != kAck) continue;
      const JobId id = log[i].value;
      if (done_before_end.count(id)) continue;
      ++counts.lost_checks;
      if (!back.count(id)) {
        if (++counts.jobs_lost <= 5) ADD_FAILURE() << "job " << id << " acknowledged before generation " << generation
                      << " began and unfinished at its end was lost";
      }
    }
    // back: retired (its worker started another job) before BEGIN.
    std::map<std::uint8_t, JobId> current;  // worker -> job it runs
    std::set<JobId> retired_before_begin;
    for (std::size_t i = 0; i < begin_pos; ++i) {
      if (log[i].type != kStart) continue;
      auto it = current.find(log[i].worker);
      if (it != current.end()) retired_before_begin.insert(it->second);
      current[log[i].worker] = log[i].value;
    }
    for (JobId id : back) {
      if (retired_before_begin.count(id)) {
        if (++counts.duplicated_before_cut <= 5) ADD_FAILURE() << "job " << id << " had finished before generation " << generation
                      << " began, yet came back";
      }
    }
  }
  std::error_code ec;
  fs::remove_all(base, ec);
  EXPECT_GE(recovered_runs, counts.kills * 3 / 4) << "too few kills found a snapshot to check";
  if (campaign_mode == KillMode::kInsideSnapshot) {
    EXPECT_GE(counts.kills_inside_snapshot, counts.kills / 2)
        << "too few kills landed inside a snapshot";
  }
  if (campaign_mode == KillMode::kDuringRecovery) {
    // Killed before the recovering child ran, or after its start()
    // returned, the campaign checks nothing about a recovery cut short.
    EXPECT_GE(counts.recovery_kills_inside, std::max<std::size_t>(1, counts.recovery_kills / 2))
        << "too few kills landed inside a recovery (after open() began, before start() returned)";
  }
}

TEST(CrashTest, SigkillAtRandomInstantsLosesNothingTheSnapshotHeld) {
  RunCampaign(KillMode::kRandomInstant, env_int("JOBENGINE_CRASH_KILLS", 200), 0);
}

TEST(CrashTest, SigkillInsideSnapshotWritesLosesNothing) {
  RunCampaign(KillMode::kInsideSnapshot, std::max(5, env_int("JOBENGINE_CRASH_KILLS", 200) / 5), 0);
}

TEST(CrashTest, SigkillDuringRecoveryLosesNothing) {
  RunCampaign(KillMode::kDuringRecovery, std::max(5, env_int("JOBENGINE_CRASH_KILLS", 200) / 5), 0);
}

// ---- the live record: what a crash must not take with it --------------------

// A fresh directory under /tmp and a segment name, both removed at the end.
struct LiveRecordPlace {
  std::string base;
  std::string dir;
  std::string shm;
  LiveRecordPlace() {
    base = (fs::temp_directory_path() / "jobengine-live-XXXXXX").string();
    if (::mkdtemp(base.data()) == nullptr) base.clear();
    dir = base + "/jobs";
    static int n = 0;
    shm = "jobengine-live-" + std::to_string(::getpid()) + "-" + std::to_string(n++);
  }
  ~LiveRecordPlace() {
    std::error_code ec;
    fs::remove_all(base, ec);
    (void)::shm_unlink(shm.c_str());
  }
};

// Runs `life` in a forked child and returns its wait status.
template <typename Life>
int RunLife(Life life) {
  const pid_t child = ::fork();
  if (child == 0) {
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);
    life();
    ::_exit(0);
  }
  int status = 0;
  if (child < 0 || ::waitpid(child, &status, 0) != child) return -1;
  return status;
}

// A handler that kills the process as soon as it starts.
Outcome KillTheProcess(JobContext&) {
  ::kill(::getpid(), SIGKILL);
  return Outcome::kDone;
}

// The poison jobs' delay. Every life runs its engine on a test clock of its
// own (EngineOptions::test_clock; each forked life has its own copy of the
// clock, at offset 0) and makes them due by moving it past the delay
// (FastForwardPastThePoison()), never by waiting: life 0 only once its
// snapshot is durable (a 200 ms real delay let a slow fsync lose that race:
// life 0 died with nothing on disk). The snapshot keeps the delay (run_at
// in wall time, an hour on), so each later life restores the jobs an hour
// out and moves its own clock too.
constexpr auto kPoisonDelay = std::chrono::hours(1);

EngineOptions PoisonOptions(EngineOptions o) {
  o.test_clock = std::make_shared<ManualClock>();
  return o;
}

void FastForwardPastThePoison(const EngineOptions& o) {
  if (o.test_clock) o.test_clock->advance(2 * kPoisonDelay);
}

// Life 0 of a poison scenario: jobs of `payloads` for the "poison" handler
// (KillTheProcess), delayed kPoisonDelay, in a durable snapshot; then the
// test clock makes them due and one kills the life. Returns its wait status
// (exit 5: the snapshot failed; exit 6: no job killed it).
int PoisonLifeZero(const EngineOptions& o, std::initializer_list<const char*> payloads) {
  return RunLife([&] {
    auto e = Engine::open(o);
    if (!e) ::_exit(2);
    auto h = e->register_handler("poison", KillTheProcess);
    if (!h || !e->start()) ::_exit(3);
    for (const char* p : payloads) {
      if (!e->submit(*h, p, {.delay = kPoisonDelay})) ::_exit(4);
    }
    if (!e->snapshot_now()) ::_exit(5);
    // Durable: only now may a job run.
    FastForwardPastThePoison(o);
    std::this_thread::sleep_for(std::chrono::seconds(10));
    ::_exit(6);  // it should have died
  });
}

// Restarts the "poison" engine until a life survives: each life opens,
// starts, makes the restored poison jobs due (FastForwardPastThePoison())
// and (until `quarantined` says so) waits to be killed; a surviving life
// checks `survived` (exit 0 when it holds). Returns the number of the life
// that exited by itself, or 0 if every one of `max_lives` was killed;
// *status is its wait status.
int RestartUntilQuarantined(const EngineOptions& o, int max_lives,
                            const std::function<bool(Engine&, const StartReport&)>& quarantined,
                            int* status) {
  for (int life = 1; life <= max_lives; ++life) {
    *status = RunLife([&] {
      auto e = Engine::open(o);
      if (!e) ::_exit(2);
      if (!e->register_handler("poison", KillTheProcess)) ::_exit(3);
      auto started = e->start();
      if (!started) ::_exit(4);
      FastForwardPastThePoison(o);
      // Not quarantined yet: a job runs and kills this life (never an exit of
      // ours, which would race with the handler's kill).
      const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(10);
      while (!quarantined(*e, *started)) {
        if (std::chrono::steady_clock::now() > give_up) ::_exit(5);
        std::this_thread::sleep_for(milliseconds(1));
      }
      if (!e->stop()) ::_exit(6);
      ::_exit(0);
    });
    if (!WIFSIGNALED(*status)) return life;
  }
  return 0;
}

TEST(CrashTest, AJobThatKillsTheProcessAtOnceIsQuarantinedAfterMaxRecoveries) {
  // The handler SIGKILLs the process as soon as it starts: no snapshot cut
  // ever sees the job running. Before the live record its recoveries never
  // grew: every restart ran it again and died (seen 8 lives of 8).
  LiveRecordPlace place;
  ASSERT_FALSE(place.base.empty());
  EngineOptions o = PoisonOptions(CrashOptions(place.dir, place.shm));
  o.snapshot.shm_interval = milliseconds(10);  // periodic cuts, which never see it
  ASSERT_EQ(o.snapshot.max_recoveries, 3u);
  int status = PoisonLifeZero(o, {"p"});
  ASSERT_TRUE(WIFSIGNALED(status)) << "life 0 exited with " << WEXITSTATUS(status);
  // Lives 1..3 recover it with recoveries 1..3 (<= max_recoveries): it runs and
  // kills them. Life 4 quarantines it and lives.
  const int life = RestartUntilQuarantined(
      o, 8,
      [](Engine& e, const StartReport& started) {
        const auto dead = e.dead_letters();
        return started.recovery.poisoned == 1 && started.recovery.running_at_crash == 0 &&
               dead.size() == 1 && dead[0].reason == DeadReason::kPoison &&
               dead[0].recoveries == 4;
      },
      &status);
  ASSERT_NE(life, 0) << "still crashing after 8 restarts";
  EXPECT_EQ(WEXITSTATUS(status), 0) << "life " << life;
  EXPECT_EQ(life, 4) << "quarantined after " << life - 1 << " restarts, max_recoveries 3";
}

TEST(CrashTest, TwoJobsThatKillTheProcessAreBothQuarantinedNotTakingTurns) {
  // One worker runs X, then Y; both kill the process at once. A start that
  // quarantined X kept that in memory only, then ran Y and died: the next
  // start loaded the same snapshot, X not named in the live record any more,
  // ran X again, and quarantined Y. They took turns forever.
  LiveRecordPlace place;
  ASSERT_FALSE(place.base.empty());
  EngineOptions o = PoisonOptions(CrashOptions(place.dir, place.shm));
  o.workers = 1;
  o.snapshot.max_recoveries = 1;
  int status = PoisonLifeZero(o, {"x", "y"});
  ASSERT_TRUE(WIFSIGNALED(status)) << "life 0 exited with " << WEXITSTATUS(status);
  // X: crashes lives 0 and 1 (recoveries 1 <= 1), quarantined at life 2,
  // which then runs Y: crashes lives 2 and 3, quarantined at life 4.
  const int life = RestartUntilQuarantined(
      o, 10, [](Engine& e, const StartReport&) { return e.dead_letters().size() == 2; }, &status);
  ASSERT_NE(life, 0) << "still crashing after 10 restarts";
  EXPECT_EQ(WEXITSTATUS(status), 0) << "life " << life;
  EXPECT_EQ(life, 4) << "both quarantined after " << life - 1 << " restarts, max_recoveries 1";
}

TEST(CrashTest, ARecordWhoseRecoveriesASnapshotHoldsIsNotCountedTwice) {
  // start() publishes the snapshot holding the recoveries the live record
  // gave, then rewrites the record. Killed in between, the record still names
  // the jobs: the next start must not add another recovery. The record is
  // marked with the first generation that holds them, before the snapshot.
  LiveRecordPlace place;
  ASSERT_FALSE(place.base.empty());
  EngineOptions o = CrashOptions(place.dir, "");
  JobId job = 0;
  std::uint64_t generation = 0;
  {
    auto e = Engine::open(o);
    ASSERT_TRUE(e.ok()) << e.status().to_string();
    auto h = e->register_handler("later", [](JobContext&) { return Outcome::kDone; });
    ASSERT_TRUE(h.ok() && e->start().ok());
    auto id = e->submit(*h, "", {.delay = std::chrono::hours(1)});
    ASSERT_TRUE(id.ok());
    job = *id;
    auto info = e->snapshot_now();
    ASSERT_TRUE(info.ok());
    generation = info->generation;
    ASSERT_TRUE(e->stop(StopMode::kAbandon).ok());
  }
  // Whatever stop() wrote last, generation + 1 or so, holds no job: keep only
  // the generation with the job, as a start killed after its snapshot would.
  char keep_name[64];
  std::snprintf(keep_name, sizeof keep_name, "gen-%020llu.jobsnap",
                static_cast<unsigned long long>(generation));
  const std::string keep = keep_name;
  for (const auto& entry : fs::directory_iterator(place.dir)) {
    const std::string name = entry.path().filename().string();
    if (name.rfind("gen-", 0) == 0 && name != keep) fs::remove(entry.path());
  }
  for (const std::uint64_t credited : {generation, generation + 1}) {
    SCOPED_TRACE("credited from generation " + std::to_string(credited));
    {
      // The record a start killed after mark_credited() leaves: the job running.
      auto record = persist::FileLiveRecord::open(place.dir);
      ASSERT_TRUE(record.ok()) << record.status().to_string();
      ASSERT_TRUE((*record)->arm(2, 1).ok());
      (*record)->running_word(1)->store(job);
    }
    {
      auto record = persist::FileLiveRecord::open(place.dir);
      ASSERT_TRUE(record.ok());
      ASSERT_TRUE((*record)->mark_credited(credited).ok());
    }
    auto e = Engine::open(o);
    ASSERT_TRUE(e.ok()) << e.status().to_string();
    ASSERT_TRUE(e->register_handler("later", [](JobContext&) { return Outcome::kDone; }).ok());
    auto started = e->start();
    ASSERT_TRUE(started.ok()) << started.status().to_string();
    EXPECT_EQ(started->recovery.generation, generation);
    // Held by the loaded generation already: no second recovery. Marked for a
    // later one, the snapshot never came: the crash counts.
    EXPECT_EQ(started->recovery.running_at_crash, credited == generation ? 0u : 1u);
    ASSERT_TRUE(e->stop(StopMode::kAbandon).ok());
    // Back to the one generation for the next round.
    for (const auto& entry : fs::directory_iterator(place.dir)) {
      const std::string name = entry.path().filename().string();
      if (name.rfind("gen-", 0) == 0 && name != keep) fs::remove(entry.path());
    }
  }
}

TEST(CrashTest, IdsHandedOutAfterTheRecoveredSnapshotAreNeverHandedOutAgain) {
  // Ids given after the snapshot's cut belong to jobs it does not hold; a
  // client may keep one (cancel() later). The next process handed them out
  // again, starting from the snapshot's counter.
  LiveRecordPlace place;
  ASSERT_FALSE(place.base.empty());
  int ids[2];
  ASSERT_EQ(::pipe2(ids, O_CLOEXEC), 0);
  const EngineOptions o = CrashOptions(place.dir, place.shm);
  const int status = RunLife([&] {
    auto e = Engine::open(o);
    if (!e) ::_exit(2);
    auto h = e->register_handler("later", [](JobContext&) { return Outcome::kDone; });
    if (!h || !e->start()) ::_exit(3);
    if (!e->submit(*h, "", {.delay = std::chrono::hours(1)})) ::_exit(4);
    if (!e->snapshot_now()) ::_exit(5);
    JobId last = 0;
    for (int i = 0; i < 5000; ++i) {
      auto id = e->submit(*h, "", {.delay = std::chrono::hours(1)});
      if (!id) ::_exit(6);
      last = *id;
    }
    if (::write(ids[1], &last, sizeof last) != sizeof last) ::_exit(7);
    ::kill(::getpid(), SIGKILL);
  });
  ::close(ids[1]);
  JobId last = 0;
  ASSERT_EQ(::read(ids[0], &last, sizeof last), static_cast<ssize_t>(sizeof last));
  ::close(ids[0]);
  ASSERT_TRUE(WIFSIGNALED(status));
  auto e = open_after_kill(place.dir, place.shm, nullptr);
  ASSERT_TRUE(e.ok()) << e.status().to_string();
  auto h = e->register_handler("later", [](JobContext&) { return Outcome::kDone; });
  ASSERT_TRUE(h.ok());
  auto started = e->start();
  ASSERT_TRUE(started.ok()) << started.status().to_string();
  EXPECT_EQ(started->recovery.delayed, 1u);
  auto fresh = e->submit(*h, "", {.delay = std::chrono::hours(1)});
  ASSERT_TRUE(fresh.ok());
  EXPECT_GT(*fresh, last) << "an id the crashed process had handed out came back";
  ASSERT_TRUE(e->stop(StopMode::kAbandon).ok());
}

// The torture campaign (tools/torture.sh): the three kill timings mixed, for
// JOBENGINE_CRASH_SECONDS (default 60), or JOBENGINE_CRASH_KILLS kills if
// that is 0. Not run by CI (disabled); torture.sh passes
// --gtest_also_run_disabled_tests.
TEST(CrashTest, DISABLED_TortureCampaign) {
  RunCampaign(KillMode::kMixed, env_int("JOBENGINE_CRASH_KILLS", 200),
              env_int("JOBENGINE_CRASH_SECONDS", 60));
}

}  // namespace
}  // namespace jobengine
