// jobengine-demo: a small service built on the library, the README's main job.
//
// Four handlers with different costs -- "thumbnail" (CPU work), "email" (a
// 1 ms SMTP call that fails transiently and is retried with backoff),
// "ledger" (fast postings, deduplicated by unique key) and "reminder"
// (delayed jobs) -- fed at a configurable rate, with snapshots to shared
// memory every 10 ms and to disk every 150 ms. One optional poison job (a
// thumbnail whose image crashes the decoder) kills the process with SIGKILL
// while it runs, so it is running at a snapshot's cut every time; once it was
// running at more than max_recoveries crashes, start() quarantines it as dead
// (reason poison) instead of running it again.
//
// What it did goes to an append-only journal (--journal), one write(2) per
// line, so that a script or test can check from outside the process which
// jobs ran, even after a SIGKILL:
//   START pid=P generation=G source=S pending=N delayed=N running_at_cut=N poisoned=N dead=N
//   S <id> <handler>                  submit() accepted job <id>
//   R <id> <handler> <attempt> <outcome>   the handler ran it (done / retry)
//   X <id> <handler> <attempt>        the poison job is about to kill the process
//   END done=N failed=N
// The manual is tools/demo.md.
#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstdarg>
#include <csignal>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <set>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "jobengine/engine.h"

#ifndef JOBENGINE_DEMO_DEFAULT_DIR
#define JOBENGINE_DEMO_DEFAULT_DIR "demo-data"
#endif

namespace {

using namespace std::chrono_literals;
using json = nlohmann::json;
using Clock = std::chrono::steady_clock;

struct Args {
  std::string dir = JOBENGINE_DEMO_DEFAULT_DIR;
  std::string shm;
  double rate = 2000;
  std::uint64_t jobs = 10000;
  double duration = 0;
  unsigned workers = 2;
  bool poison = false;
  std::uint64_t poison_at = 0;
  unsigned max_recoveries = 3;
  unsigned status_interval_ms = 500;
  std::string journal;
  std::string report;
  bool resume_only = false;
  std::uint64_t crash_after = 0;
};

// ---- the journal -------------------------------------------------------------

int g_journal_fd = -1;

// One line, one write(2) to an O_APPEND file: it is in the page cache (so it
// survives SIGKILL) before the caller goes on, and lines never interleave.
void journal(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
void journal(const char* fmt, ...) {
  if (g_journal_fd < 0) return;
  char line[512];
  va_list ap;
  va_start(ap, fmt);
  int n = std::vsnprintf(line, sizeof line - 1, fmt, ap);
  va_end(ap);
  if (n < 0) return;
  if (static_cast<std::size_t>(n) > sizeof line - 2) n = static_cast<int>(sizeof line - 2);
  line[n] = '\n';
  if (::write(g_journal_fd, line, static_cast<std::size_t>(n) + 1) != n + 1) {
    std::fprintf(stderr, "jobengine-demo: journal write failed: %s\n", std::strerror(errno));
    std::_Exit(3);
  }
}

// ---- shared state ------------------------------------------------------------

jobengine::Engine* g_engine = nullptr;
std::atomic<std::uint64_t> g_runs_done{0};
std::atomic<std::uint64_t> g_ran[4] = {};  // thumbnail, email, ledger, reminder
std::atomic<std::uint64_t> g_ledger_skipped{0};
std::atomic<std::uint64_t> g_sink{0};
std::uint64_t g_crash_after = 0;
// The signal (SIGINT or SIGTERM) that asked the demo to stop; 0 if none did.
// An atomic, not a volatile sig_atomic_t: the producer threads read it too.
// Lock-free, so the signal handler may store to it.
std::atomic<int> g_interrupted{0};
static_assert(std::atomic<int>::is_always_lock_free);
// Set once run() has printed the recovery story, journaled START and written
// the report's recovery part, so that a poison job run at once by start()
// tells its crash after the story, and its SIGKILL never loses report-N.json
// or the START line.
std::atomic<bool> g_story_told{false};

std::mutex g_ledger_mu;
std::set<unsigned long long> g_ledger_applied;  // posting numbers applied in this process

void on_stop_signal(int sig) { g_interrupted.store(sig, std::memory_order_relaxed); }

const char* outcome_name(jobengine::Outcome o) {
  switch (o) {
    case jobengine::Outcome::kDone: return "done";
    case jobengine::Outcome::kRetry: return "retry";
    case jobengine::Outcome::kFail: return "fail";
  }
  return "?";
}

// Records a run in the journal and counts it; --crash-after kills the process
// after that many successful runs (a scripted crash point).
jobengine::Outcome finish(jobengine::JobContext& job, int handler, jobengine::Outcome o) {
  journal("R %llu %.*s %u %s", static_cast<unsigned long long>(job.id()),
          static_cast<int>(job.handler_name().size()), job.handler_name().data(), job.attempt(),
          outcome_name(o));
  g_ran[handler].fetch_add(1, std::memory_order_relaxed);
  if (o == jobengine::Outcome::kDone) {
    const std::uint64_t n = g_runs_done.fetch_add(1, std::memory_order_relaxed) + 1;
    if (g_crash_after != 0 && n == g_crash_after) {
      std::fprintf(stderr, "\njobengine-demo: --crash-after %llu reached: SIGKILL\n",
                   static_cast<unsigned long long>(n));
      ::kill(::getpid(), SIGKILL);
    }
  }
  return o;
}

// The poison job: a malformed image that crashes the thumbnail decoder. It
// kills the process only once a snapshot whose cut began after it started has
// been published, so that the snapshot that survives the crash holds it as
// running at the cut (and recovery counts the crash against it):
//   - g1, the first generation published after the handler read g0, was
//     published after the job was running (g0 may be 0: a restarted process
//     publishes nothing before its first snapshot, and generation numbers
//     continue from the recovered one, so g0 + 2 would prove nothing);
//   - the snapshot thread cuts one snapshot after the other, so the cut of
//     g1 + 1 began after g1's publish; g1 + 2 leaves a margin.
[[noreturn]] void crash_on_poison(jobengine::JobContext& job) {
  journal("X %llu thumbnail %u", static_cast<unsigned long long>(job.id()), job.attempt());
  // Waits for the story (see g_story_told); a bound, in case the machine is
  // so loaded that even that takes long.
  const auto story_deadline = Clock::now() + 10s;
  while (!g_story_told.load(std::memory_order_acquire) && Clock::now() < story_deadline) {
    std::this_thread::sleep_for(1ms);
  }
  std::fprintf(stderr,
               "\njobengine-demo: thumbnail job %llu: the image decoder crashed on a malformed "
               "image (attempt %u): the process dies with SIGKILL\n",
               static_cast<unsigned long long>(job.id()), job.attempt());
  const auto generation = [] { return g_engine->health().last_snapshot_generation; };
  const auto give_up = Clock::now() + 10s;  // no snapshot for 10 s: crash anyway
  const std::uint64_t g0 = generation();
  std::uint64_t g1 = g0;
  while (g1 == g0 && Clock::now() < give_up) {
    std::this_thread::sleep_for(1ms);
    g1 = generation();
  }
  while (generation() < g1 + 2 && Clock::now() < give_up) std::this_thread::sleep_for(1ms);
  ::kill(::getpid(), SIGKILL);
  std::abort();  // not reached
}

std::uint64_t mix(std::uint64_t x) {
  x ^= x >> 33;
  x *= 0xff51afd7ed558ccdull;
  x ^= x >> 33;
  return x;
}

jobengine::Outcome thumbnail(jobengine::JobContext& job) {
  if (job.payload() == "poison") crash_on_poison(job);
  // 50-200 us of CPU: scale a (pretend) image.
  const auto until = Clock::now() + std::chrono::microseconds(50 + mix(job.id()) % 150);
  std::uint64_t h = job.id();
  while (Clock::now() < until) {
    for (int i = 0; i < 64; ++i) h = mix(h + static_cast<std::uint64_t>(i));
  }
  g_sink.fetch_xor(h, std::memory_order_relaxed);  // keeps the work from being optimized out
  return finish(job, 0, jobengine::Outcome::kDone);
}

jobengine::Outcome email(jobengine::JobContext& job) {
  std::this_thread::sleep_for(1ms);  // the SMTP round trip
  // About 10% of first attempts and a third of those second attempts meet a
  // busy server; a third attempt always gets through, so no email dies.
  const std::uint64_t r = mix(job.id() * 31 + job.attempt()) % 100;
  if (job.attempt() <= 2 && r < (job.attempt() == 1 ? 10u : 33u)) {
    job.set_error("smtp: 421 service busy, try again later");
    return finish(job, 1, jobengine::Outcome::kRetry);
  }
  return finish(job, 1, jobengine::Outcome::kDone);
}

jobengine::Outcome ledger(jobengine::JobContext& job) {
  // "posting <n> <cents>": applied once per process even if submitted twice
  // after the first finished (the unique key dedupes while it is pending).
  unsigned long long n = 0;
  if (std::sscanf(std::string(job.payload()).c_str(), "posting %llu", &n) != 1) {
    job.set_error("ledger: malformed posting");
    return finish(job, 2, jobengine::Outcome::kFail);
  }
  {
    std::lock_guard<std::mutex> lock(g_ledger_mu);
    if (!g_ledger_applied.insert(n).second) g_ledger_skipped.fetch_add(1, std::memory_order_relaxed);
  }
  return finish(job, 2, jobengine::Outcome::kDone);
}

jobengine::Outcome reminder(jobengine::JobContext& job) { return finish(job, 3, jobengine::Outcome::kDone); }

// ---- the status line -----------------------------------------------------------

std::string ms_text(double ms) {
  char b[32];
  if (ms < 10) {
    std::snprintf(b, sizeof b, "%.2fms", ms);
  } else if (ms < 10000) {
    std::snprintf(b, sizeof b, "%.0fms", ms);
  } else {
    std::snprintf(b, sizeof b, "%.1fs", ms / 1000);
  }
  return b;
}

// The worst handler's p99 queue wait (submit or due time to handler start), ms.
double p99_wait_ms(const jobengine::Engine& engine) {
  const json m = json::parse(engine.metrics_json(), nullptr, /*allow_exceptions=*/false);
  if (m.is_discarded() || !m.contains("handlers")) return 0;
  std::uint64_t worst = 0;
  for (const auto& h : m["handlers"]) {
    worst = std::max<std::uint64_t>(worst, h["queue_wait"].value("p99_ns", std::uint64_t{0}));
  }
  return static_cast<double>(worst) / 1e6;
}

struct StatusLine {
  bool tty = ::isatty(2) != 0;
  Clock::time_point t0 = Clock::now();
  bool dirty = false;

  void print(const jobengine::Engine& engine, std::uint64_t deduped) {
    const jobengine::Health h = engine.health();
    const double secs = std::chrono::duration<double>(Clock::now() - t0).count();
    char snap[96] = "no snapshot yet";
    if (h.last_snapshot_generation != 0) {
      std::snprintf(snap, sizeof snap, "snapshot gen %llu, %s ago",
                    static_cast<unsigned long long>(h.last_snapshot_generation),
                    ms_text(std::chrono::duration<double, std::milli>(h.last_snapshot_age).count())
                        .c_str());
    }
    char line[400];
    std::snprintf(line, sizeof line,
                  "[%5.1fs] submitted %llu (%llu deduped)  done %llu  retried %llu  failed %llu  "
                  "pending %llu (delayed %llu)  dead %llu  p99 wait %s  %s",
                  secs, static_cast<unsigned long long>(h.submitted),
                  static_cast<unsigned long long>(deduped), static_cast<unsigned long long>(h.done),
                  static_cast<unsigned long long>(h.retried),
                  static_cast<unsigned long long>(h.failed),
                  static_cast<unsigned long long>(h.pending),
                  static_cast<unsigned long long>(h.delayed),
                  static_cast<unsigned long long>(h.dead), ms_text(p99_wait_ms(engine)).c_str(),
                  snap);
    if (tty) {
      std::fprintf(stderr, "\r%s\033[K", line);
      dirty = true;
    } else {
      std::fprintf(stderr, "%s\n", line);
    }
  }
  void end_line() {
    if (dirty) std::fprintf(stderr, "\n");
    dirty = false;
  }
};

// ---- the report file -----------------------------------------------------------

// Written (temp file + rename) after start and again at the end, for scripts.
void write_report(const std::string& path, const json& j) {
  if (path.empty()) return;
  const std::string tmp = path + ".tmp";
  FILE* f = std::fopen(tmp.c_str(), "w");
  if (f == nullptr) {
    std::fprintf(stderr, "jobengine-demo: cannot write %s: %s\n", tmp.c_str(), std::strerror(errno));
    return;
  }
  const std::string text = j.dump(2) + "\n";
  std::fwrite(text.data(), 1, text.size(), f);
  std::fclose(f);
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    std::fprintf(stderr, "jobengine-demo: cannot rename %s: %s\n", tmp.c_str(), std::strerror(errno));
  }
}

std::string recovery_story(const jobengine::RecoveryReport& r, unsigned max_recoveries) {
  if (!r.recovered) return "no snapshot to recover from: starting empty";
  std::string s = "recovered generation " + std::to_string(r.generation) + " from " + r.source +
                  ": " + std::to_string(r.pending) + " pending, " + std::to_string(r.delayed) +
                  " delayed, " + std::to_string(r.running_at_cut) +
                  " running at the cut (run again), " + std::to_string(r.poisoned) +
                  " quarantined as poison";
  if (r.poisoned != 0) {
    s += " (running at more crashes than max_recoveries " + std::to_string(max_recoveries) +
         " allows)";
  }
  s += ", " + std::to_string(r.dead) + " dead already";
  if (r.unknown_handler != 0) s += ", " + std::to_string(r.unknown_handler) + " with no handler";
  for (const auto& k : r.skipped) {
    s += "\n  skipped " + k.source + " (offset " + std::to_string(k.offset) + "): " + k.reason;
  }
  return s;
}

// ---- the producer --------------------------------------------------------------

struct Producer {
  Producer(const Args& a, jobengine::Engine& e) : args(a), engine(e) {}
  const Args& args;
  jobengine::Engine& engine;
  std::atomic<std::uint64_t> submitted{0};
  std::atomic<std::uint64_t> deduped{0};
  std::atomic<bool> finished{false};
  std::atomic<bool> stop{false};
  std::string error;

  // Submits until accepted (backs off on kQueueFull); false on another error.
  bool submit(std::string_view handler, const std::string& payload,
              jobengine::SubmitOptions o, jobengine::JobId* id) {
    for (;;) {
      auto r = engine.submit(handler, payload, o);
      if (r) {
        *id = *r;
        return true;
      }
      if (r.status().code() != jobengine::StatusCode::kQueueFull) {
        error = r.status().to_string();
        return false;
      }
      std::this_thread::sleep_for(1ms);
    }
  }

  void run() {
    const auto t0 = Clock::now();
    const std::uint64_t poison_at =
        args.poison ? (args.poison_at != 0 ? args.poison_at : std::max<std::uint64_t>(1, args.jobs / 3))
                    : 0;
    std::uint64_t posting = 0;
    for (std::uint64_t i = 0; i < args.jobs && !stop.load(); ++i) {
      const auto due = t0 + std::chrono::duration_cast<Clock::duration>(
                                std::chrono::duration<double>(static_cast<double>(i) / args.rate));
      if (args.duration > 0 &&
          Clock::now() - t0 > std::chrono::duration<double>(args.duration)) {
        break;
      }
      std::this_thread::sleep_until(due);
      if (g_interrupted.load(std::memory_order_relaxed) != 0) break;
      jobengine::JobId id = 0;
      if (poison_at != 0 && i == poison_at) {
        if (!submit("thumbnail", "poison", {}, &id)) break;
        journal("S %llu thumbnail", static_cast<unsigned long long>(id));
        submitted.fetch_add(1);
        std::fprintf(stderr, "\njobengine-demo: submitted the poison job: thumbnail job %llu\n",
                     static_cast<unsigned long long>(id));
      }
      const std::uint64_t kind = mix(i) % 10;
      bool ok = true;
      if (kind < 4) {
        ok = submit("thumbnail", "img-" + std::to_string(i) + ".jpg 1920x1080 -> 320x180",
                    {.priority = jobengine::kLowPriority}, &id);
        if (ok) journal("S %llu thumbnail", static_cast<unsigned long long>(id));
      } else if (kind < 7) {
        ok = submit("email", "to: user" + std::to_string(i % 977) + "@example.com; receipt",
                    {.priority = jobengine::kNormalPriority}, &id);
        if (ok) journal("S %llu email", static_cast<unsigned long long>(id));
      } else if (kind < 9) {
        ++posting;
        const std::string key = "posting-" + std::to_string(posting);
        const std::string payload =
            "posting " + std::to_string(posting) + " " + std::to_string(mix(posting) % 100000);
        ok = submit("ledger", payload, {.priority = jobengine::kHighPriority, .unique_key = key},
                    &id);
        if (ok) journal("S %llu ledger", static_cast<unsigned long long>(id));
        // One posting in 8 is sent twice, as a client retrying after a
        // timeout would: the unique key makes the engine accept it once.
        if (ok && posting % 8 == 0) {
          jobengine::JobId again = 0;
          ok = submit("ledger", payload, {.priority = jobengine::kHighPriority, .unique_key = key},
                      &again);
          if (ok && again == id) {
            deduped.fetch_add(1);
          } else if (ok) {
            journal("S %llu ledger", static_cast<unsigned long long>(again));
            submitted.fetch_add(1);
          }
        }
      } else {
        const auto delay = std::chrono::milliseconds(500 + mix(i + 7) % 1500);
        ok = submit("reminder", "remind user" + std::to_string(i % 977) + ": cart waiting",
                    {.delay = delay}, &id);
        if (ok) journal("S %llu reminder", static_cast<unsigned long long>(id));
      }
      if (!ok) break;
      submitted.fetch_add(1);
    }
    finished.store(true);
  }
};

int run(int argc, char** argv) {
  Args args;
  args.shm = "jobengine-demo-" + std::to_string(::getuid());
  CLI::App app{
      "jobengine-demo: a small service on jobengine -- thumbnail, email, ledger and reminder jobs "
      "at a set rate, retries, delayed jobs, snapshots every 10 ms (shm) and 150 ms (disk), and "
      "optionally one poison job that crashes the process. Manual: tools/demo.md."};
  app.add_option("--dir", args.dir, "Snapshot directory (created 0700)")
      ->type_name("DIR")
      ->capture_default_str();
  app.add_option("--shm", args.shm, "Shared-memory segment name")
      ->type_name("NAME")
      ->capture_default_str();
  app.add_option("--rate", args.rate, "Jobs submitted per second")
      ->check(CLI::Range(1.0, 1e7).description("1 to 10^7"))
      ->type_name("N")
      ->capture_default_str();
  app.add_option("--jobs", args.jobs, "Jobs to submit (then drain and exit)")
      ->type_name("N")
      ->capture_default_str();
  app.add_option("--duration", args.duration, "Stop submitting after this many seconds (0: no limit)")
      ->type_name("SECONDS")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--workers", args.workers, "Worker threads")
      ->check(CLI::Range(1u, 64u).description("1 to 64"))
      ->type_name("N")
      ->capture_default_str();
  app.add_flag("--poison", args.poison,
               "Submit one poison job: a thumbnail whose image crashes the process (SIGKILL)");
  app.add_option("--poison-at", args.poison_at,
                 "Submit the poison job after this many jobs (default: a third of --jobs)")
      ->type_name("N");
  app.add_option("--max-recoveries", args.max_recoveries,
                 "Crashes a job may be running at before it is quarantined as poison")
      ->check(CLI::Range(0u, 65535u).description("0 to 65535"))
      ->type_name("N")
      ->capture_default_str();
  app.add_option("--status-interval", args.status_interval_ms,
                 "Milliseconds between status lines on stderr (0: none)")
      ->type_name("MS")
      ->capture_default_str();
  app.add_option("--journal", args.journal,
                 "Append what was submitted and what ran to FILE (one write(2) per line)")
      ->type_name("FILE");
  app.add_option("--report", args.report, "Write the recovery report and final counts as JSON")
      ->type_name("FILE");
  app.add_flag("--resume-only", args.resume_only,
               "Submit nothing: run what recovery brings back, exit once drained");
  app.add_option("--crash-after", args.crash_after, "SIGKILL the process after N jobs done")
      ->type_name("N");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e) == 0 ? 0 : 64;
  }
  if (args.poison && args.poison_at != 0 && args.poison_at >= args.jobs) {
    std::fprintf(stderr, "jobengine-demo: --poison-at %llu: must be below --jobs %llu\n",
                 static_cast<unsigned long long>(args.poison_at),
                 static_cast<unsigned long long>(args.jobs));
    return 64;
  }
  g_crash_after = args.crash_after;
  // Line-buffered even into a pipe or file: the story's lines and the status
  // lines on stderr stay in order.
  std::setvbuf(stdout, nullptr, _IOLBF, 0);

  if (!args.journal.empty()) {
    g_journal_fd = ::open(args.journal.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (g_journal_fd < 0) {
      std::fprintf(stderr, "jobengine-demo: cannot open journal %s: %s\n", args.journal.c_str(),
                   std::strerror(errno));
      return 1;
    }
  }

  jobengine::EngineOptions opts;
  opts.workers = args.workers;
  opts.capacity = 1 << 16;
  opts.max_attempts = 4;
  opts.retry.initial_backoff = 20ms;
  opts.retry.max_backoff = 200ms;
  opts.snapshot.enabled = true;
  opts.snapshot.dir = args.dir;
  opts.snapshot.shm_name = args.shm;
  opts.snapshot.shm_interval = 10ms;
  opts.snapshot.disk_interval = 150ms;
  opts.snapshot.keep_generations = 5;
  opts.snapshot.max_recoveries = static_cast<std::uint16_t>(args.max_recoveries);
  opts.log = [](jobengine::LogLevel level, std::string_view line) {
    if (level >= jobengine::LogLevel::kWarning) {
      std::fprintf(stderr, "  engine: %.*s\n", static_cast<int>(line.size()), line.data());
    }
  };

  auto engine = jobengine::Engine::open(opts);
  if (!engine) {
    std::fprintf(stderr, "jobengine-demo: open failed: %s\n", engine.status().to_string().c_str());
    return 1;
  }
  g_engine = &*engine;
  for (auto [name, fn] : {std::pair{"thumbnail", &thumbnail}, std::pair{"email", &email},
                          std::pair{"ledger", &ledger}, std::pair{"reminder", &reminder}}) {
    auto id = engine->register_handler(name, fn);
    if (!id) {
      std::fprintf(stderr, "jobengine-demo: register %s: %s\n", name, id.status().to_string().c_str());
      return 1;
    }
  }
  std::signal(SIGINT, on_stop_signal);
  std::signal(SIGTERM, on_stop_signal);

  // Before start(): the engine logs what recovery quarantines while it starts.
  std::printf("jobengine-demo: pid %d, %u workers; snapshots every 10 ms to shm '%s' and every "
              "150 ms to %s (keep 5); max_recoveries %u\n",
              static_cast<int>(::getpid()), args.workers, args.shm.c_str(), args.dir.c_str(),
              args.max_recoveries);
  auto started = engine->start();
  if (!started) {
    std::fprintf(stderr, "jobengine-demo: start failed: %s\n", started.status().to_string().c_str());
    return 1;
  }
  const jobengine::RecoveryReport& rec = started->recovery;
  std::printf("jobengine-demo: %s\n", recovery_story(rec, args.max_recoveries).c_str());
  for (const auto& d : engine->dead_letters()) {
    std::printf("jobengine-demo: dead letter: job %llu (%s), reason %s, %u recoveries: %s\n",
                static_cast<unsigned long long>(d.id), d.handler.c_str(),
                std::string(jobengine::dead_reason_name(d.reason)).c_str(), d.recoveries,
                d.error.c_str());
  }
  std::fflush(stdout);
  journal("START pid=%d generation=%llu source=%s pending=%llu delayed=%llu running_at_cut=%llu "
          "poisoned=%llu dead=%llu",
          static_cast<int>(::getpid()), static_cast<unsigned long long>(rec.generation),
          rec.recovered ? rec.source.c_str() : "-", static_cast<unsigned long long>(rec.pending),
          static_cast<unsigned long long>(rec.delayed),
          static_cast<unsigned long long>(rec.running_at_cut),
          static_cast<unsigned long long>(rec.poisoned), static_cast<unsigned long long>(rec.dead));
  json report;
  report["pid"] = ::getpid();
  report["phase"] = "started";
  report["recovery"] = {{"recovered", rec.recovered},
                        {"generation", rec.generation},
                        {"source", rec.source},
                        {"pending", rec.pending},
                        {"delayed", rec.delayed},
                        {"running_at_cut", rec.running_at_cut},
                        {"poisoned", rec.poisoned},
                        {"unknown_handler", rec.unknown_handler},
                        {"dead", rec.dead},
                        {"skipped", rec.skipped.size()}};
  write_report(args.report, report);
  // Only now may the poison job kill the process: the story, START and the
  // report are out (in the page cache for the files: they survive SIGKILL).
  g_story_told.store(true, std::memory_order_release);

  Producer producer(args, *engine);
  std::thread producer_thread;
  if (!args.resume_only) {
    std::printf("jobengine-demo: submitting %llu jobs at %.0f/s%s\n",
                static_cast<unsigned long long>(args.jobs), args.rate,
                args.poison ? ", with one poison job among them" : "");
    std::fflush(stdout);
    producer_thread = std::thread([&] { producer.run(); });
  } else {
    producer.finished = true;
  }

  StatusLine status;
  auto next_status = Clock::now() + std::chrono::milliseconds(args.status_interval_ms);
  for (;;) {
    if (g_interrupted.load(std::memory_order_relaxed) != 0) break;
    const jobengine::Health h = engine->health();
    if (producer.finished.load() && h.pending == 0 && h.delayed == 0) break;
    if (args.status_interval_ms != 0 && Clock::now() >= next_status) {
      status.print(*engine, producer.deduped.load());
      next_status += std::chrono::milliseconds(args.status_interval_ms);
    }
    std::this_thread::sleep_for(10ms);
  }
  producer.stop = true;
  if (producer_thread.joinable()) producer_thread.join();
  if (args.status_interval_ms != 0) status.print(*engine, producer.deduped.load());
  status.end_line();
  if (!producer.error.empty()) {
    std::fprintf(stderr, "jobengine-demo: submit failed: %s\n", producer.error.c_str());
  }

  // Interrupted: keep what is left for the next start. Drained: stop (a final
  // snapshot records the dead letters, so they survive the restart too).
  // (main() then dies of the signal that interrupted it.)
  const bool interrupted = g_interrupted.load(std::memory_order_relaxed) != 0;
  const auto mode = interrupted ? jobengine::StopMode::kSnapshotAndExit : jobengine::StopMode::kDrain;
  auto stopped = engine->stop(mode);
  if (!stopped) {
    std::fprintf(stderr, "jobengine-demo: stop failed: %s\n", stopped.status().to_string().c_str());
    return 1;
  }
  const jobengine::Health h = engine->health();
  std::printf("jobengine-demo: %s: submitted %llu (%llu ledger postings deduped by unique key), "
              "ran thumbnail %llu, email %llu (retried %llu), ledger %llu, reminder %llu; "
              "done %llu, failed %llu, recovered %llu, dead letters %llu; last snapshot "
              "generation %llu\n",
              interrupted ? "interrupted, what is left is in the final snapshot" : "drained",
              static_cast<unsigned long long>(stopped->submitted),
              static_cast<unsigned long long>(producer.deduped.load()),
              static_cast<unsigned long long>(g_ran[0].load()),
              static_cast<unsigned long long>(g_ran[1].load()),
              static_cast<unsigned long long>(h.retried),
              static_cast<unsigned long long>(g_ran[2].load()),
              static_cast<unsigned long long>(g_ran[3].load()),
              static_cast<unsigned long long>(stopped->done),
              static_cast<unsigned long long>(stopped->failed),
              static_cast<unsigned long long>(stopped->recovered),
              static_cast<unsigned long long>(h.dead),
              static_cast<unsigned long long>(h.last_snapshot_generation));
  journal("END done=%llu failed=%llu", static_cast<unsigned long long>(stopped->done),
          static_cast<unsigned long long>(stopped->failed));
  report["phase"] = "finished";
  report["stop"] = interrupted ? "snapshot-and-exit" : "drain";
  report["counts"] = {{"submitted", stopped->submitted}, {"deduped", producer.deduped.load()},
                      {"done", stopped->done},           {"failed", stopped->failed},
                      {"retried", h.retried},            {"recovered", stopped->recovered},
                      {"dead", h.dead},                  {"ran_thumbnail", g_ran[0].load()},
                      {"ran_email", g_ran[1].load()},    {"ran_ledger", g_ran[2].load()},
                      {"ran_reminder", g_ran[3].load()}, {"ledger_skipped", g_ledger_skipped.load()},
                      {"last_snapshot_generation", h.last_snapshot_generation}};
  write_report(args.report, report);
  return producer.error.empty() ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  int rc = 0;
  try {
    rc = run(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "jobengine-demo: internal error: %s\n", e.what());
    rc = 70;
  }
  // Stopped by SIGINT or SIGTERM: the final snapshot is written (run() has
  // returned, the engine is closed). Die of that signal rather than exit 0,
  // so that the parent (a shell running a script, make) sees the interrupt
  // and stops too instead of carrying on as if the demo had drained.
  if (const int sig = g_interrupted.load(std::memory_order_relaxed); sig != 0) {
    std::fflush(stdout);
    std::fflush(stderr);
    std::signal(sig, SIG_DFL);
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, sig);
    ::sigprocmask(SIG_UNBLOCK, &set, nullptr);
    ::raise(sig);
  }
  return rc;
}
