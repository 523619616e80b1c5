// jobengine-example: a short program that shows the engine at work.
//
// Registers three handlers of different costs, submits jobs at three
// priorities from two threads (singles and batches), lets one handler retry
// and one fail, prints the health figures while it runs, and stops with
// kDrain. A short tour of the API; the README's main command runs the demo
// service instead (tools/demo.md). Options: --jobs N (default 200000),
// --workers N (default: cores - 1, at least 1), --idle spin|yield|block
// (default block).
#include <jobengine/engine.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

namespace {

using namespace std::chrono_literals;

struct Args {
  std::uint64_t jobs = 200000;
  unsigned workers = 0;
  jobengine::IdleStrategy idle = jobengine::IdleStrategy::kSpinThenBlock;
};

[[noreturn]] void usage(const char* why) {
  std::fprintf(stderr,
               "jobengine-example: %s\n"
               "usage: jobengine-example [--jobs N] [--workers N] [--idle spin|yield|block]\n",
               why);
  std::exit(2);
}

Args parse(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) usage(("missing value after " + arg).c_str());
      return argv[++i];
    };
    auto number = [&](const std::string& v) -> std::uint64_t {
      char* end = nullptr;
      unsigned long long n = std::strtoull(v.c_str(), &end, 10);
      if (v.empty() || *end != '\0' || v[0] == '-') usage((arg + ": not a number: " + v).c_str());
      return n;
    };
    if (arg == "--jobs") {
      a.jobs = number(value());
    } else if (arg == "--workers") {
      a.workers = static_cast<unsigned>(number(value()));
    } else if (arg == "--idle") {
      std::string v = value();
      if (v == "spin") a.idle = jobengine::IdleStrategy::kSpin;
      else if (v == "yield") a.idle = jobengine::IdleStrategy::kSpinThenYield;
      else if (v == "block") a.idle = jobengine::IdleStrategy::kSpinThenBlock;
      else usage(("--idle: expected spin, yield or block, got " + v).c_str());
    } else if (arg == "--help" || arg == "-h") {
      usage("runs a short workload and prints what ran");
    } else {
      usage(("unknown argument " + arg).c_str());
    }
  }
  if (a.workers == 0) {
    unsigned cores = std::thread::hardware_concurrency();
    a.workers = cores > 1 ? cores - 1 : 1;
  }
  return a;
}

void print_health(const char* when, const jobengine::Health& h) {
  std::printf(
      "  [%-8s] state=%-8s ok=%d workers=%u/%u submitted=%llu done=%llu failed=%llu "
      "retried=%llu exceptions=%llu pending=%llu depth(h/n/l)=%llu/%llu/%llu rejected=%llu\n",
      when, std::string(jobengine::engine_state_name(h.state)).c_str(), h.ok ? 1 : 0,
      h.workers_alive, h.workers, static_cast<unsigned long long>(h.submitted),
      static_cast<unsigned long long>(h.done), static_cast<unsigned long long>(h.failed),
      static_cast<unsigned long long>(h.retried), static_cast<unsigned long long>(h.exceptions),
      static_cast<unsigned long long>(h.pending), static_cast<unsigned long long>(h.depth[0]),
      static_cast<unsigned long long>(h.depth[1]), static_cast<unsigned long long>(h.depth[2]),
      static_cast<unsigned long long>(h.rejected));
}

}  // namespace

int main(int argc, char** argv) {
  const Args args = parse(argc, argv);

  jobengine::EngineOptions opts;
  opts.workers = args.workers;
  opts.idle = args.idle;
  opts.capacity = 1 << 16;
  opts.max_attempts = 3;
  // The engine is silent unless given a log callback. Show its info lines
  // and the first few warnings (retries, failures); count the rest.
  static std::atomic<int> warnings{0};
  opts.log = [](jobengine::LogLevel level, std::string_view line) {
    if (level == jobengine::LogLevel::kWarning && warnings.fetch_add(1) >= 4) return;
    if (level >= jobengine::LogLevel::kInfo) {
      std::printf("  log: %.*s\n", static_cast<int>(line.size()), line.data());
    }
  };
  auto engine = jobengine::Engine::open(opts);
  if (!engine) {
    std::fprintf(stderr, "open failed: %s\n", engine.status().to_string().c_str());
    return 1;
  }

  std::atomic<std::uint64_t> thumbnails{0}, emails{0}, ledger_runs{0}, ledger_sum{0};
  auto thumbnail = engine->register_handler("thumbnail", [&](jobengine::JobContext& job) {
    // A little CPU work proportional to the payload.
    std::uint64_t h = 1469598103934665603ull;
    for (char c : job.payload()) h = (h ^ static_cast<unsigned char>(c)) * 1099511628211ull;
    thumbnails.fetch_add(h == 0 ? 2 : 1, std::memory_order_relaxed);
    return jobengine::Outcome::kDone;
  });
  auto email = engine->register_handler("email.send", [&](jobengine::JobContext& job) {
    // Every 50th email fails on its first attempt (a flaky SMTP server) and is
    // retried; every 1000th throws on every attempt and fails for good.
    if (job.id() % 1000 == 0) throw std::runtime_error("smtp: 550 mailbox unavailable");
    if (job.id() % 50 == 0 && job.attempt() == 1) return jobengine::Outcome::kRetry;
    emails.fetch_add(1, std::memory_order_relaxed);
    return jobengine::Outcome::kDone;
  });
  auto ledger = engine->register_handler("ledger.post", [&](jobengine::JobContext& job) {
    std::uint64_t amount = 0;
    std::memcpy(&amount, job.payload().data(), std::min(sizeof(amount), job.payload().size()));
    ledger_sum.fetch_add(amount, std::memory_order_relaxed);
    ledger_runs.fetch_add(1, std::memory_order_relaxed);
    return jobengine::Outcome::kDone;
  });
  if (!thumbnail || !email || !ledger) {
    std::fprintf(stderr, "register_handler failed\n");
    return 1;
  }

  auto started = engine->start();
  if (!started) {
    std::fprintf(stderr, "start failed: %s\n", started.status().to_string().c_str());
    return 1;
  }
  std::printf("jobengine-example: %llu jobs, %u worker(s), idle=%s\n",
              static_cast<unsigned long long>(args.jobs), started->workers,
              args.idle == jobengine::IdleStrategy::kSpin            ? "spin"
              : args.idle == jobengine::IdleStrategy::kSpinThenYield ? "yield"
                                                                     : "block");
  print_health("started", engine->health());

  const auto t0 = std::chrono::steady_clock::now();
  std::atomic<std::uint64_t> queue_full_retries{0};
  std::uint64_t expected_ledger_sum = 0;
  // Thread 1: ledger postings at high priority, in batches of 64.
  std::thread ledger_producer([&] {
    const std::uint64_t n = args.jobs / 4;
    std::vector<std::uint64_t> amounts(64);
    std::vector<jobengine::JobSpec> batch(64);
    for (std::uint64_t sent = 0; sent < n;) {
      std::size_t k = static_cast<std::size_t>(std::min<std::uint64_t>(64, n - sent));
      for (std::size_t i = 0; i < k; ++i) {
        amounts[i] = sent + i + 1;
        batch[i] = {*ledger,
                    std::string_view(reinterpret_cast<const char*>(&amounts[i]), sizeof(amounts[i])),
                    {.priority = jobengine::kHighPriority}};
      }
      auto r = engine->submit_batch(std::span(batch.data(), k));
      if (!r) {
        if (r.status().code() != jobengine::StatusCode::kQueueFull) {
          std::fprintf(stderr, "submit_batch: %s\n", r.status().to_string().c_str());
          return;
        }
        queue_full_retries.fetch_add(1, std::memory_order_relaxed);
        std::this_thread::yield();  // back-pressure: wait for the workers
        continue;
      }
      sent += k;
    }
  });
  for (std::uint64_t i = 1; i <= args.jobs / 4; ++i) expected_ledger_sum += i;

  // Main thread: thumbnails (low priority, 1 KiB payloads: heap) and emails.
  const std::string image(1024, 'x');
  const std::string address = "someone@example.com";
  const std::uint64_t singles = args.jobs - args.jobs / 4;
  for (std::uint64_t i = 0; i < singles;) {
    auto r = (i % 3 == 0) ? engine->submit(*thumbnail, image, {.priority = jobengine::kLowPriority})
                          : engine->submit(*email, address);
    if (!r) {
      if (r.status().code() != jobengine::StatusCode::kQueueFull) {
        std::fprintf(stderr, "submit: %s\n", r.status().to_string().c_str());
        return 1;
      }
      queue_full_retries.fetch_add(1, std::memory_order_relaxed);
      std::this_thread::yield();
      continue;
    }
    ++i;
    if (i % (singles / 4 + 1) == 0) print_health("running", engine->health());
  }
  ledger_producer.join();

  auto report = engine->stop(jobengine::StopMode::kDrain);
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (!report) {
    std::fprintf(stderr, "stop failed: %s\n", report.status().to_string().c_str());
    return 1;
  }
  print_health("stopped", engine->health());
  if (warnings.load() > 4) std::printf("  (%d more warnings not shown)\n", warnings.load() - 4);
  std::printf(
      "ran %llu thumbnails, %llu emails, %llu ledger postings (sum %llu, expected %llu) in %.3f s "
      "(%.2f M jobs/s); %llu submits met a full queue and were retried\n",
      static_cast<unsigned long long>(thumbnails.load()),
      static_cast<unsigned long long>(emails.load()),
      static_cast<unsigned long long>(ledger_runs.load()),
      static_cast<unsigned long long>(ledger_sum.load()),
      static_cast<unsigned long long>(expected_ledger_sum), secs,
      static_cast<double>(report->submitted) / secs / 1e6,
      static_cast<unsigned long long>(queue_full_retries.load()));
  const bool all_accounted =
      report->submitted == args.jobs && report->done + report->failed == report->submitted &&
      ledger_sum.load() == expected_ledger_sum;
  std::printf("%s: %llu submitted = %llu done + %llu failed (failed: emails whose handler threw "
              "on all %u attempts)\n",
              all_accounted ? "OK" : "MISMATCH", static_cast<unsigned long long>(report->submitted),
              static_cast<unsigned long long>(report->done),
              static_cast<unsigned long long>(report->failed), opts.max_attempts);
  return all_accounted ? 0 : 1;
}
