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
// JOBENGINE_CRASH_KILLS sets the number of kills (default 200; the README's
// long campaign uses 10000). JOBENGINE_CRASH_SEED replays a run.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <map>
#include <mutex>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "jobengine/engine.h"

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

std::vector<Event> read_log(const std::string& path) {
  std::vector<Event> out;
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return out;
  Event e;
  while (::read(fd, &e, sizeof(e)) == static_cast<ssize_t>(sizeof(e))) out.push_back(e);
  ::close(fd);
  return out;
}

struct Outcome1 {
  bool recovered = false;
  std::uint64_t generation = 0;
  std::size_t came_back = 0;
  std::size_t must_hold = 0;
};

TEST(CrashTest, SigkillAtRandomInstantsLosesNothingTheSnapshotHeld) {
  std::uint64_t seed = std::random_device{}();
  if (const char* s = std::getenv("JOBENGINE_CRASH_SEED"); s && *s) seed = std::strtoull(s, nullptr, 10);
  int kills = 200;
  if (const char* s = std::getenv("JOBENGINE_CRASH_KILLS"); s && *s) kills = std::atoi(s);
  std::printf("CrashTest seed %llu, %d kills (replay: JOBENGINE_CRASH_SEED=%llu)\n",
              static_cast<unsigned long long>(seed), kills, static_cast<unsigned long long>(seed));
  SCOPED_TRACE("JOBENGINE_CRASH_SEED=" + std::to_string(seed));
  std::mt19937_64 rng(seed);

  std::string base = (fs::temp_directory_path() / "jobengine-crash-XXXXXX").string();
  ASSERT_NE(mkdtemp(base.data()), nullptr);
  std::size_t recovered_runs = 0, jobs_back = 0, pairs_checked = 0;
  for (int k = 0; k < kills && !::testing::Test::HasFailure(); ++k) {
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
    // snapshot, mostly once one is durable, under load.
    const bool early = rng() % 10 == 0;
    if (!early) {
      char c;
      ASSERT_EQ(::read(ready[0], &c, 1), 1) << "child died before it was ready";
    }
    std::this_thread::sleep_for(std::chrono::microseconds(rng() % (early ? 2000 : 25000)));
    ::kill(child, SIGKILL);
    int status = 0;
    ASSERT_EQ(::waitpid(child, &status, 0), child);
    reaper.reaped = true;
    ::close(ready[0]);
    ASSERT_TRUE(WIFSIGNALED(status)) << "child exited by itself with " << WEXITSTATUS(status);

    // Recover.
    std::mutex mu;
    std::multiset<JobId> ran;
    std::uint64_t generation = 0;
    bool recovered = false;
    {
      auto e = Engine::open(CrashOptions(dir, shm));
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
    if (!ends.empty()) {
      ASSERT_GE(generation, log[ends.back()].value)
          << "recovered an older generation than the newest snapshot_now() returned";
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
      ASSERT_TRUE(back.insert(id).second) << "job " << id << " ran twice after recovery";
    }
    jobs_back += back.size();
    // lost
    std::set<JobId> done_before_end;
    for (std::size_t i = 0; i < end_pos; ++i) {
      if (log[i].type == kDone) done_before_end.insert(log[i].value);
    }
    for (std::size_t i = 0; i < begin_pos; ++i) {
      if (log[i].type != kAck) continue;
      const JobId id = log[i].value;
      if (done_before_end.count(id)) continue;
      ++pairs_checked;
      ASSERT_TRUE(back.count(id)) << "job " << id << " acknowledged before generation "
                                  << generation << " began and unfinished at its end was lost";
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
      ASSERT_FALSE(retired_before_begin.count(id))
          << "job " << id << " had finished before generation " << generation
          << " began, yet came back";
    }
  }
  std::error_code ec;
  fs::remove_all(base, ec);
  std::printf("%d kills, %zu recovered a snapshot, %zu jobs came back, %zu lost-checks\n", kills,
              recovered_runs, jobs_back, pairs_checked);
  EXPECT_GE(recovered_runs, static_cast<std::size_t>(kills * 3 / 4))
      << "too few kills found a snapshot to check";
}

}  // namespace
}  // namespace jobengine
