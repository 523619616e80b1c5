// Seeded, replayable randomized stress test of the Engine against a model.
//
// Each round opens a fresh engine with random options (workers, capacity,
// idle strategy, batch size, fairness, attempts), starts several producer
// threads that submit singles and batches of every priority (some batches
// deliberately invalid), and stops the engine at a random moment with a
// random StopMode while the producers are still submitting. (An Engine starts
// only once, so "random start/stop" means a fresh engine per round.)
//
// The model: each producer records, per sequence number, whether its job was
// accepted and with which JobId; the payload carries the producer id, the
// sequence number, the priority and what the handler is to do (finish, retry
// once, fail, throw once), padded with a checkable pattern across the inline /
// heap boundary. The handler records every run (attempt bits per job). After
// the round:
//  - kDrain: every accepted job ran every attempt it needed exactly once;
//  - kAbandon: no attempt ran twice, finished + dropped + failed add up to the
//    accepted count, and `done` is exact;
//  - both: no unaccepted (rejected, never submitted) job ran; payloads arrive
//    intact; the handler saw the id that submit() returned; with one worker,
//    first attempts ran in submission order per producer and priority.
//
// Seed: --seed=N or JOBENGINE_STRESS_SEED, else std::random_device. Rounds:
// --rounds=N or JOBENGINE_STRESS_ROUNDS (default 150). One round only:
// --round=N or JOBENGINE_STRESS_ROUND. The test prints the seed and the exact
// replay command on every run, and again on failure.
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <bit>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iterator>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "jobengine/engine.h"

namespace jobengine {
namespace {

// ---- configuration ------------------------------------------------------------

struct StressConfig {
  std::uint64_t seed = 0;
  int rounds = 150;
  std::optional<int> only_round;
  std::string exe = "stress_test";
};

StressConfig g_config;

std::string ReplayCommand(std::string_view test_name, std::optional<int> round) {
  std::ostringstream out;
  out << "JOBENGINE_STRESS_SEED=" << g_config.seed
      << " JOBENGINE_STRESS_ROUNDS=" << g_config.rounds;
  if (round) out << " JOBENGINE_STRESS_ROUND=" << *round;
  out << " " << g_config.exe << " --gtest_filter=" << test_name;
  return out.str();
}

// splitmix64: derives independent, reproducible seeds from the base seed.
std::uint64_t Mix(std::uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// ---- the job model --------------------------------------------------------------

enum class Kind : std::uint8_t { kDone, kRetryOnce, kFail, kThrowOnce };
constexpr int kKinds = 4;

constexpr std::size_t kHeaderBytes = 10;  // producer u32, seq u32, kind u8, priority u8

void PutU32(std::string& s, std::size_t at, std::uint32_t v) {
  for (int i = 0; i < 4; ++i) s[at + static_cast<std::size_t>(i)] = static_cast<char>(v >> (8 * i));
}
std::uint32_t GetU32(std::string_view s, std::size_t at) {
  std::uint32_t v = 0;
  for (int i = 0; i < 4; ++i) {
    v |= std::uint32_t{static_cast<unsigned char>(s[at + static_cast<std::size_t>(i)])} << (8 * i);
  }
  return v;
}
char Filler(std::uint32_t seq, std::size_t i) {
  return static_cast<char>((seq * 31u + static_cast<std::uint32_t>(i) * 7u) & 0xffu);
}

std::string MakePayload(std::uint32_t producer, std::uint32_t seq, Kind kind, std::uint8_t priority,
                        std::size_t size) {
  std::string s(std::max(size, kHeaderBytes), '\0');
  PutU32(s, 0, producer);
  PutU32(s, 4, seq);
  s[8] = static_cast<char>(kind);
  s[9] = static_cast<char>(priority);
  for (std::size_t i = kHeaderBytes; i < s.size(); ++i) s[i] = Filler(seq, i);
  return s;
}

// Runs a job of `kind` needs, and whether it ends done, with `max_attempts`.
int ExpectedAttempts(Kind kind, std::uint32_t max_attempts) {
  if (kind == Kind::kRetryOnce || kind == Kind::kThrowOnce) return max_attempts >= 2 ? 2 : 1;
  return 1;
}
bool ExpectedDone(Kind kind, std::uint32_t max_attempts) {
  if (kind == Kind::kDone) return true;
  if (kind == Kind::kFail) return false;
  return max_attempts >= 2;
}

struct RoundParams {
  unsigned workers = 1;
  unsigned producers = 1;
  std::size_t capacity = 256;
  IdleStrategy idle = IdleStrategy::kSpinThenBlock;
  std::uint32_t spin_iterations = 0;
  std::uint32_t dequeue_batch = 1;
  std::uint32_t fairness_period = 0;
  std::uint32_t max_attempts = 1;
  StopMode mode = StopMode::kDrain;
  // stop() is called once the producers have submitted (accepted or not)
  // this many jobs in all, or all of them are done.
  std::uint64_t stop_after_jobs = 0;
  std::uint32_t jobs_per_producer = 0;
  // Producers pause 50 us every 64 jobs, so idle workers go to sleep and wake.
  bool paced = false;
  std::uint64_t producer_seed = 0;
};

std::string Describe(const RoundParams& p) {
  static const char* const kIdle[] = {"spin", "spin-then-yield", "spin-then-block"};
  std::ostringstream out;
  out << "workers=" << p.workers << " producers=" << p.producers << " capacity=" << p.capacity
      << " idle=" << kIdle[static_cast<int>(p.idle)] << " spin=" << p.spin_iterations
      << " dequeue_batch=" << p.dequeue_batch << " fairness=" << p.fairness_period
      << " max_attempts=" << p.max_attempts
      << " mode=" << (p.mode == StopMode::kDrain ? "drain" : "abandon")
      << " jobs_per_producer=" << p.jobs_per_producer << " stop_after_jobs=" << p.stop_after_jobs
      << " paced=" << p.paced;
  return out.str();
}

RoundParams DrawParams(std::uint64_t round_seed, bool single_worker) {
  std::mt19937_64 rng(round_seed);
  auto pick = [&rng](std::uint64_t lo, std::uint64_t hi) {  // inclusive
    return std::uniform_int_distribution<std::uint64_t>(lo, hi)(rng);
  };
  RoundParams p;
  p.workers = single_worker ? 1u : static_cast<unsigned>(pick(1, 3));
  p.producers = static_cast<unsigned>(pick(1, 4));
  static constexpr std::size_t kCapacities[] = {33, 64, 256, 1024, 4096};
  p.capacity = kCapacities[pick(0, std::size(kCapacities) - 1)];
  p.idle = static_cast<IdleStrategy>(pick(0, 2));
  // More always-spinning workers than a 2-core CI machine has cores only
  // makes a round slow, not more thorough.
  if (p.idle == IdleStrategy::kSpin) p.workers = std::min(p.workers, 2u);
  static constexpr std::uint32_t kSpins[] = {0, 16, 4096};
  p.spin_iterations = kSpins[pick(0, 2)];
  static constexpr std::uint32_t kBatches[] = {1, 2, 7, 32, 256};
  p.dequeue_batch = kBatches[pick(0, std::size(kBatches) - 1)];
  static constexpr std::uint32_t kFairness[] = {0, 2, 3, 16};
  p.fairness_period = kFairness[pick(0, 3)];
  p.max_attempts = static_cast<std::uint32_t>(pick(1, 3));
  p.mode = pick(0, 1) == 0 ? StopMode::kDrain : StopMode::kAbandon;
  p.jobs_per_producer = static_cast<std::uint32_t>(pick(1000, 40000));
  const std::uint64_t total = std::uint64_t{p.producers} * p.jobs_per_producer;
  const std::uint64_t when = pick(0, 9);
  p.stop_after_jobs = when == 0 ? 0 : when == 9 ? total : pick(1, total - 1);
  p.paced = pick(0, 3) == 0;
  p.producer_seed = rng();
  return p;
}

// What a producer knows about each of its sequence numbers.
enum class Fate : std::uint8_t { kUnused, kAccepted, kRejected };
struct ProducerJob {
  Fate fate = Fate::kUnused;
  Kind kind = Kind::kDone;
  std::uint8_t priority = 0;
  JobId id = 0;
};

// What the handler saw of each job, indexed [producer][seq].
struct RunLog {
  explicit RunLog(const RoundParams& p) {
    for (unsigned i = 0; i < p.producers; ++i) {
      attempt_bits.emplace_back(new std::atomic<std::uint32_t>[p.jobs_per_producer]());
      seen_id.emplace_back(new std::atomic<JobId>[p.jobs_per_producer]());
    }
  }
  std::vector<std::unique_ptr<std::atomic<std::uint32_t>[]>> attempt_bits;
  std::vector<std::unique_ptr<std::atomic<JobId>[]>> seen_id;
  std::atomic<std::uint64_t> calls{0};
  std::atomic<std::uint64_t> throws{0};
  std::atomic<std::uint64_t> produced{0};  // submit attempts so far, accepted or not
  std::atomic<unsigned> producers_done{0};

  std::mutex mu;
  std::vector<std::string> errors;  // first few only
  // First attempts in the order they ran (kept with one worker only).
  struct FirstRun {
    std::uint32_t producer;
    std::uint32_t seq;
    std::uint8_t priority;
  };
  std::vector<FirstRun> first_runs;

  void error(std::string what) {
    std::lock_guard<std::mutex> lock(mu);
    if (errors.size() < 20) errors.push_back(std::move(what));
  }
};

// ---- one round -------------------------------------------------------------------

class Producer {
 public:
  Producer(Engine& engine, const RoundParams& p, std::uint32_t index, HandlerId handler,
           RunLog& log)
      : engine_(engine),
        params_(p),
        index_(index),
        handler_(handler),
        log_(log),
        rng_(Mix(p.producer_seed + index)),
        jobs_(p.jobs_per_producer) {}

  void run() {
    std::uint32_t seq = 0;
    while (seq < params_.jobs_per_producer) {
      const bool batch = pick(0, 9) < 3;
      const std::uint32_t n = batch
                                  ? std::min<std::uint32_t>(static_cast<std::uint32_t>(pick(1, 16)),
                                                            params_.jobs_per_producer - seq)
                                  : 1;
      specs_.clear();
      payloads_.clear();
      for (std::uint32_t i = 0; i < n; ++i) {
        ProducerJob& job = jobs_[seq + i];
        job.kind = static_cast<Kind>(pick(0, 9) < 7 ? 0 : pick(1, kKinds - 1));
        job.priority = static_cast<std::uint8_t>(pick(0, kPriorityLevels - 1));
        const std::uint64_t size_class = pick(0, 9);
        const std::size_t size = size_class < 6   ? pick(kHeaderBytes, 64)
                                 : size_class < 9 ? pick(65, kInlinePayloadBytes)
                                                  : pick(kInlinePayloadBytes + 1, 3000);
        payloads_.push_back(MakePayload(index_, seq + i, job.kind, job.priority, size));
      }
      for (std::uint32_t i = 0; i < n; ++i) {
        specs_.push_back({handler_, payloads_[i], {jobs_[seq + i].priority}});
      }
      // Now and then a batch with one invalid job, which must sink it all.
      std::optional<StatusCode> expected_error;
      if (batch && pick(0, 19) == 0) {
        JobSpec& bad = specs_[pick(0, n - 1)];
        if (pick(0, 1) == 0) {
          bad.options.priority = kPriorityLevels;
          expected_error = StatusCode::kInvalidArgument;
        } else {
          bad.handler = handler_ + 1000;
          expected_error = StatusCode::kNotFound;
        }
      }
      Status status;
      if (batch) {
        ids_.assign(n, 0);
        auto r = engine_.submit_batch(specs_, ids_);
        status = r.status();
        if (r.ok() && *r != n)
          log_.error("submit_batch returned a count other than the batch size");
      } else {
        auto r = engine_.submit(handler_, specs_[0].payload, specs_[0].options);
        status = r.status();
        if (r.ok()) ids_.assign(1, *r);
      }
      const bool accepted = status.ok();
      for (std::uint32_t i = 0; i < n; ++i) {
        jobs_[seq + i].fate = accepted ? Fate::kAccepted : Fate::kRejected;
        if (accepted) jobs_[seq + i].id = ids_[i];
      }
      if (params_.paced && (seq / 64) != ((seq + n) / 64)) {
        std::this_thread::sleep_for(std::chrono::microseconds(50));
      }
      seq += n;
      log_.produced.fetch_add(n, std::memory_order_relaxed);
      if (accepted) {
        if (expected_error) log_.error("a batch with an invalid job was accepted");
        continue;
      }
      if (status.code() == StatusCode::kStopped) break;
      if (expected_error && status.code() == *expected_error) continue;
      if (status.code() == StatusCode::kQueueFull) {
        std::this_thread::yield();
        continue;
      }
      log_.error("unexpected submit error: " + status.to_string());
    }
    log_.producers_done.fetch_add(1);
  }

  const std::vector<ProducerJob>& jobs() const { return jobs_; }

 private:
  std::uint64_t pick(std::uint64_t lo, std::uint64_t hi) {
    return std::uniform_int_distribution<std::uint64_t>(lo, hi)(rng_);
  }

  Engine& engine_;
  const RoundParams& params_;
  std::uint32_t index_;
  HandlerId handler_;
  RunLog& log_;
  std::mt19937_64 rng_;
  std::vector<ProducerJob> jobs_;
  std::vector<JobSpec> specs_;
  std::vector<std::string> payloads_;
  std::vector<JobId> ids_;
};

Outcome Handle(JobContext& job, const RoundParams& p, RunLog& log) {
  log.calls.fetch_add(1, std::memory_order_relaxed);
  const std::string_view payload = job.payload();
  if (payload.size() < kHeaderBytes) {
    log.error("payload shorter than its header: " + std::to_string(payload.size()));
    return Outcome::kFail;
  }
  const std::uint32_t producer = GetU32(payload, 0);
  const std::uint32_t seq = GetU32(payload, 4);
  const auto kind = static_cast<Kind>(payload[8]);
  const auto priority = static_cast<std::uint8_t>(payload[9]);
  if (producer >= p.producers || seq >= p.jobs_per_producer || static_cast<int>(kind) >= kKinds) {
    log.error("payload header corrupt");
    return Outcome::kFail;
  }
  for (std::size_t i = kHeaderBytes; i < payload.size(); ++i) {
    if (payload[i] != Filler(seq, i)) {
      log.error("payload of producer " + std::to_string(producer) + " seq " + std::to_string(seq) +
                " corrupt at byte " + std::to_string(i) + " of " + std::to_string(payload.size()));
      break;
    }
  }
  if (job.priority() != priority)
    log.error("JobContext::priority() differs from the submitted one");
  const std::uint32_t attempt = job.attempt();
  if (attempt < 1 || attempt > p.max_attempts) {
    log.error("attempt " + std::to_string(attempt) + " outside 1..max_attempts");
    return Outcome::kFail;
  }
  const std::uint32_t bit = 1u << (attempt - 1);
  const std::uint32_t before = log.attempt_bits[producer][seq].fetch_or(bit);
  if ((before & bit) != 0) {
    log.error("producer " + std::to_string(producer) + " seq " + std::to_string(seq) + " attempt " +
              std::to_string(attempt) + " ran twice");
  }
  const JobId previous = log.seen_id[producer][seq].exchange(job.id());
  if (previous != 0 && previous != job.id()) log.error("one job seen under two ids");
  if (attempt == 1 && p.workers == 1) {
    std::lock_guard<std::mutex> lock(log.mu);
    log.first_runs.push_back({producer, seq, priority});
  }
  switch (kind) {
    case Kind::kDone:
      return Outcome::kDone;
    case Kind::kFail:
      return Outcome::kFail;
    case Kind::kRetryOnce:
      return attempt == 1 ? Outcome::kRetry : Outcome::kDone;
    case Kind::kThrowOnce:
      if (attempt == 1) {
        log.throws.fetch_add(1, std::memory_order_relaxed);
        throw std::runtime_error("stress: throw once");
      }
      return Outcome::kDone;
  }
  return Outcome::kFail;
}

// Aborts the process, after printing how to replay, if a round hangs.
class Watchdog {
 public:
  Watchdog(std::chrono::seconds limit, std::string replay)
      : replay_(std::move(replay)), thread_([this, limit] { watch(limit); }) {}
  ~Watchdog() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      done_ = true;
    }
    cv_.notify_all();
    thread_.join();
  }
  Watchdog(const Watchdog&) = delete;
  Watchdog& operator=(const Watchdog&) = delete;

 private:
  void watch(std::chrono::seconds limit) {
    std::unique_lock<std::mutex> lock(mu_);
    if (!cv_.wait_for(lock, limit, [this] { return done_; })) {
      std::fprintf(stderr, "[ stress ] round hung for %lld s; replay with:\n  %s\n",
                   static_cast<long long>(limit.count()), replay_.c_str());
      std::fflush(stderr);
      std::abort();
    }
  }

  std::mutex mu_;
  std::condition_variable cv_;
  bool done_ = false;
  std::string replay_;
  std::thread thread_;
};

// Totals over the rounds of a test, printed so a reader can see it did work.
struct Totals {
  std::uint64_t accepted = 0;
  std::uint64_t rejected = 0;
  std::uint64_t done = 0;
  std::uint64_t failed = 0;
  std::uint64_t dropped = 0;
  std::uint64_t abandon_rounds = 0;
  std::uint64_t stopped_mid_submit = 0;  // rounds where producers were cut short
};

void RunRound(const RoundParams& p, Totals* totals) {
  RunLog log(p);
  EngineOptions o;
  o.workers = p.workers;
  o.capacity = p.capacity;
  o.idle = p.idle;
  o.spin_iterations = p.spin_iterations;
  o.dequeue_batch = p.dequeue_batch;
  o.fairness_period = p.fairness_period;
  o.max_attempts = p.max_attempts;
  // The model expects a drain to run every retry: retries requeue at once.
  o.retry.initial_backoff = std::chrono::nanoseconds(0);
  o.max_payload = 4096;
  auto engine = Engine::open(o);
  ASSERT_TRUE(engine.ok()) << engine.status().to_string();
  auto handler = engine->register_handler(
      "stress", [&p, &log](JobContext& job) { return Handle(job, p, log); });
  ASSERT_TRUE(handler.ok()) << handler.status().to_string();
  ASSERT_TRUE(engine->start().ok());

  std::vector<std::unique_ptr<Producer>> producers;
  for (std::uint32_t i = 0; i < p.producers; ++i) {
    producers.push_back(std::make_unique<Producer>(*engine, p, i, *handler, log));
  }
  std::atomic<bool> stop_polling{false};
  std::thread poller([&] {  // health() must be safe to read at any moment
    while (!stop_polling.load()) {
      (void)engine->health();
      std::this_thread::sleep_for(std::chrono::microseconds(500));
    }
  });
  std::vector<std::thread> threads;
  for (auto& producer : producers) threads.emplace_back([&producer] { producer->run(); });
  // Stop while the producers are still at it: once they have made
  // stop_after_jobs submit attempts (or all finished).
  while (log.produced.load(std::memory_order_relaxed) < p.stop_after_jobs &&
         log.producers_done.load() < p.producers) {
    std::this_thread::sleep_for(std::chrono::microseconds(20));
  }
  auto report = engine->stop(p.mode);
  for (auto& t : threads) t.join();
  stop_polling.store(true);
  poller.join();
  ASSERT_TRUE(report.ok()) << report.status().to_string();

  // ---- check against the model ----
  {
    std::lock_guard<std::mutex> lock(log.mu);
    for (const std::string& e : log.errors) ADD_FAILURE() << e;
    if (!log.errors.empty()) return;
  }
  std::uint64_t accepted = 0, model_done = 0, model_failed = 0, partial = 0, retried = 0;
  std::uint64_t rejected = 0;
  bool cut_short = false;
  std::uint64_t throws_ran = 0, calls = 0;
  for (std::uint32_t pi = 0; pi < p.producers; ++pi) {
    const auto& jobs = producers[pi]->jobs();
    for (std::uint32_t seq = 0; seq < p.jobs_per_producer; ++seq) {
      const ProducerJob& job = jobs[seq];
      const std::uint32_t bits = log.attempt_bits[pi][seq].load();
      const int ran = std::popcount(bits);
      calls += static_cast<std::uint64_t>(ran);
      auto where = [&] {
        return ::testing::Message()
               << " (producer " << pi << " seq " << seq << " id " << job.id << " kind "
               << static_cast<int>(job.kind) << " priority " << int{job.priority} << ")";
      };
      if (job.fate != Fate::kAccepted) {
        ASSERT_EQ(bits, 0u) << "a job that was never accepted ran" << where();
        if (job.fate == Fate::kRejected) ++rejected;
        if (job.fate == Fate::kUnused) cut_short = true;
        continue;
      }
      ++accepted;
      ASSERT_EQ(bits, (1u << ran) - 1) << "attempts ran out of order: bits " << bits << where();
      if (ran > 0) {
        ASSERT_EQ(log.seen_id[pi][seq].load(), job.id) << "handler saw another id" << where();
      }
      const int expected = ExpectedAttempts(job.kind, p.max_attempts);
      ASSERT_LE(ran, expected) << "job ran more attempts than it needed" << where();
      if (p.mode == StopMode::kDrain) {
        ASSERT_EQ(ran, expected) << "accepted job did not run to the end under kDrain" << where();
      }
      if (ran == expected) {
        (ExpectedDone(job.kind, p.max_attempts) ? model_done : model_failed) += 1;
      } else if (ran > 0) {
        ++partial;
      }
      if (ran >= 2) ++retried;
      if (job.kind == Kind::kThrowOnce && ran >= 1) ++throws_ran;
    }
  }
  EXPECT_EQ(calls, log.calls.load()) << "handler calls not attributed to any accepted job";
  EXPECT_EQ(report->submitted, accepted);
  EXPECT_EQ(report->done, model_done);
  EXPECT_EQ(report->done + report->failed + report->dropped, accepted);
  const Health h = engine->health();
  EXPECT_EQ(h.state, EngineState::kStopped);
  EXPECT_EQ(h.workers_alive, 0u);
  EXPECT_EQ(h.pending, 0u);
  EXPECT_EQ(h.running, 0u);
  EXPECT_EQ(h.submitted, accepted);
  EXPECT_EQ(h.done, report->done);
  EXPECT_EQ(h.failed, report->failed);
  EXPECT_EQ(h.dropped, report->dropped);
  EXPECT_EQ(h.exceptions, throws_ran);
  EXPECT_EQ(log.throws.load(), throws_ran);
  if (p.mode == StopMode::kDrain) {
    EXPECT_EQ(report->failed, model_failed);
    EXPECT_EQ(report->dropped, 0u);
    EXPECT_EQ(h.retried, retried);
  } else {
    // A job whose retry was still queued at the stop may count as dropped or
    // as failed; every other figure is exact.
    EXPECT_GE(report->failed, model_failed);
    EXPECT_LE(report->failed, model_failed + partial);
  }

  totals->accepted += accepted;
  totals->rejected += rejected;
  totals->done += report->done;
  totals->failed += report->failed;
  totals->dropped += report->dropped;
  totals->abandon_rounds += p.mode == StopMode::kAbandon ? 1 : 0;
  totals->stopped_mid_submit += cut_short ? 1 : 0;

  if (p.workers == 1) {
    // Per producer and priority, first attempts ran in submission order.
    std::vector<std::array<std::int64_t, kPriorityLevels>> last(p.producers);
    for (auto& l : last) l.fill(-1);
    for (const auto& run : log.first_runs) {
      std::int64_t& prev = last[run.producer][run.priority];
      ASSERT_LT(prev, static_cast<std::int64_t>(run.seq))
          << "FIFO broken for producer " << run.producer << " priority " << int{run.priority}
          << ": seq " << run.seq << " ran after seq " << prev;
      prev = run.seq;
    }
  }
}

void RunRounds(std::string_view test_name, bool single_worker, int rounds) {
  // FNV-1a of the test name, so that each test draws its own rounds, the same
  // on every platform.
  std::uint64_t name_hash = 0xcbf29ce484222325ull;
  for (char c : test_name)
    name_hash = (name_hash ^ static_cast<unsigned char>(c)) * 0x100000001b3ull;
  const std::uint64_t base = Mix(g_config.seed ^ name_hash);
  std::printf("[ stress ] seed=%llu rounds=%d\n[ stress ] replay: %s\n",
              static_cast<unsigned long long>(g_config.seed), g_config.rounds,
              ReplayCommand(test_name, g_config.only_round).c_str());
  std::fflush(stdout);
  SCOPED_TRACE("replay: " + ReplayCommand(test_name, g_config.only_round));
  const auto started = std::chrono::steady_clock::now();
  Totals totals;
  int rounds_run = 0;
  for (int round = 0; round < rounds; ++round) {
    if (g_config.only_round && *g_config.only_round != round) continue;
    const RoundParams p = DrawParams(Mix(base + static_cast<std::uint64_t>(round)), single_worker);
    const std::string replay = ReplayCommand(test_name, round);
    SCOPED_TRACE("round " + std::to_string(round) + ": " + Describe(p) +
                 "\n  replay round: " + replay);
    Watchdog watchdog(std::chrono::seconds(240), replay);
    const auto round_start = std::chrono::steady_clock::now();
    RunRound(p, &totals);
    ++rounds_run;
    const double round_secs =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - round_start).count();
    if (round_secs > 1.0) {
      std::printf("[ stress ] round %d took %.1f s (%s)\n", round, round_secs, Describe(p).c_str());
    }
    if (::testing::Test::HasFailure()) {
      std::printf("[ stress ] round %d failed (%s)\n[ stress ] replay round: %s\n", round,
                  Describe(p).c_str(), replay.c_str());
      return;
    }
  }
  const double secs =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
  std::printf(
      "[ stress ] %d rounds in %.1f s: %llu jobs accepted, %llu rejected, %llu done, %llu failed, "
      "%llu dropped; %llu rounds abandoned, %llu stopped while producers submitted\n",
      rounds_run, secs, static_cast<unsigned long long>(totals.accepted),
      static_cast<unsigned long long>(totals.rejected),
      static_cast<unsigned long long>(totals.done), static_cast<unsigned long long>(totals.failed),
      static_cast<unsigned long long>(totals.dropped),
      static_cast<unsigned long long>(totals.abandon_rounds),
      static_cast<unsigned long long>(totals.stopped_mid_submit));
}

std::string CurrentTestName() {
  const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
  return std::string(info->test_suite_name()) + "." + info->name();
}

TEST(StressTest, RandomRoundsAccountForEveryAcceptedJob) {
  RunRounds(CurrentTestName(), /*single_worker=*/false, g_config.rounds);
}

TEST(StressTest, SingleWorkerRoundsKeepFifoPerProducerAndPriority) {
  RunRounds(CurrentTestName(), /*single_worker=*/true, g_config.rounds);
}

// A stop() from another thread as soon as the engine reads kRunning (a
// service that gets SIGTERM while it starts up) while start() still waits
// for its workers: both return. start() waited for each worker to be alive,
// which a worker that the stop ended first, or kept from running at all,
// never was: start() spun for ever.
TEST(StressTest, AStopFromAnotherThreadDuringStartLetsStartReturn) {
  constexpr int kRounds = 200;
  Watchdog watchdog(std::chrono::seconds(120),
                    CurrentTestName() + ": start() or stop() never returned");
  int stopped_before_start_returned = 0;
  for (int round = 0; round < kRounds; ++round) {
    EngineOptions o;
    o.workers = 4;  // more threads than this machine's cores: late workers
    o.capacity = 64;
    o.idle = IdleStrategy::kSpinThenBlock;
    auto engine = Engine::open(o);
    ASSERT_TRUE(engine.ok()) << engine.status().to_string();
    ASSERT_TRUE(engine->register_handler("noop", [](JobContext&) { return Outcome::kDone; }).ok());
    std::atomic<bool> start_returned{false};
    std::atomic<bool> start_failed{false};
    std::atomic<bool> stopped_first{false};
    std::thread stopper([&] {
      while (engine->state() != EngineState::kRunning) {
        if (start_failed.load()) return;  // nothing to stop
      }
      stopped_first.store(!start_returned.load());
      auto report = engine->stop(StopMode::kAbandon);
      EXPECT_TRUE(report.ok()) << report.status().to_string();
    });
    auto started = engine->start();
    start_returned.store(true);
    start_failed.store(!started.ok());
    stopper.join();
    ASSERT_TRUE(started.ok()) << "round " << round << ": " << started.status().to_string();
    EXPECT_EQ(engine->state(), EngineState::kStopped);
    stopped_before_start_returned += stopped_first.load() ? 1 : 0;
  }
  std::printf("[ stress ] %d of %d stops began before start() returned\n",
              stopped_before_start_returned, kRounds);
}

// ---- main: --seed / --rounds / --round and their environment variables -------------

bool ParseNumber(std::string_view text, std::uint64_t* out) {
  if (text.empty()) return false;
  std::uint64_t v = 0;
  for (char c : text) {
    if (c < '0' || c > '9') return false;
    v = v * 10 + static_cast<std::uint64_t>(c - '0');
  }
  *out = v;
  return true;
}

bool ParseSetting(const char* flag, const char* env, std::string_view arg,
                  std::optional<std::uint64_t>* out) {
  const std::string prefix = std::string("--") + flag + "=";
  if (arg.rfind(prefix, 0) != 0) return false;
  std::uint64_t v = 0;
  if (!ParseNumber(arg.substr(prefix.size()), &v)) {
    std::fprintf(stderr, "bad value in %.*s (or set %s)\n", static_cast<int>(arg.size()),
                 arg.data(), env);
    std::exit(2);
  }
  *out = v;
  return true;
}

std::optional<std::uint64_t> FromEnv(const char* name) {
  const char* value = std::getenv(name);
  if (value == nullptr || *value == '\0') return std::nullopt;
  std::uint64_t v = 0;
  if (!ParseNumber(value, &v)) {
    std::fprintf(stderr, "%s=%s is not a number\n", name, value);
    std::exit(2);
  }
  return v;
}

std::string SelfPath(const char* argv0) {
  char buf[4096];
  const ssize_t n = readlink("/proc/self/exe", buf, sizeof(buf) - 1);
  if (n <= 0) return argv0;
  return std::string(buf, static_cast<std::size_t>(n));
}

}  // namespace
}  // namespace jobengine

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);  // strips the --gtest_* flags
  using jobengine::g_config;
  std::optional<std::uint64_t> seed = jobengine::FromEnv("JOBENGINE_STRESS_SEED");
  std::optional<std::uint64_t> rounds = jobengine::FromEnv("JOBENGINE_STRESS_ROUNDS");
  std::optional<std::uint64_t> round = jobengine::FromEnv("JOBENGINE_STRESS_ROUND");
  for (int i = 1; i < argc; ++i) {
    const std::string_view arg = argv[i];
    if (jobengine::ParseSetting("seed", "JOBENGINE_STRESS_SEED", arg, &seed)) continue;
    if (jobengine::ParseSetting("rounds", "JOBENGINE_STRESS_ROUNDS", arg, &rounds)) continue;
    if (jobengine::ParseSetting("round", "JOBENGINE_STRESS_ROUND", arg, &round)) continue;
    std::fprintf(stderr, "unknown argument %s (expected --seed=N, --rounds=N, --round=N)\n",
                 argv[i]);
    return 2;
  }
  if (!seed) {
    std::random_device rd;
    seed = (std::uint64_t{rd()} << 32) ^ rd();
  }
  g_config.seed = *seed;
  if (rounds) g_config.rounds = static_cast<int>(std::clamp<std::uint64_t>(*rounds, 1, 1000000));
  if (round) g_config.only_round = static_cast<int>(std::min<std::uint64_t>(*round, 1000000));
  g_config.exe = jobengine::SelfPath(argv[0]);
  return RUN_ALL_TESTS();
}
