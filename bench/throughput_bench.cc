// Submit-to-completion throughput: one submitter (the benchmark thread) and one
// pinned worker running empty jobs with a 16-byte payload, for jobengine and
// for the baselines a user would pick instead, side by side in one process.
//
// Each iteration submits JOBENGINE_BENCH_JOBS jobs (default 1,000,000) and ends
// once the worker has run all of them, so items_per_second is the rate at
// which jobs go from submit to done. Engines and pools are built before the
// timed loop of each run and torn down after it.
//
//   BM_Engine_Submit/<idle>       Engine::submit() per job; kQueueFull is
//                                 retried after a short pause (counted).
//   BM_Engine_SubmitBatch/<idle>  Engine::submit_batch() of 64 JobSpecs.
//   BM_Engine_Drain/<idle>        the worker alone: capacity/2 queued jobs run
//                                 from a gate, nothing submitted meanwhile
//                                 (manual time; the metrics A/B's worker-bound
//                                 figure).
//   BM_BareQueue                  the ceiling: moodycamel queue of function
//                                 pointers, tokens, bulk dequeue, spinning.
//   BM_BareQueue_Bulk             the same with enqueue_bulk(64).
//   BM_BareQueue_Bounded          BM_BareQueue with at most `capacity` jobs in
//                                 flight, like the engine's job table: what
//                                 back-pressure alone costs (not a target).
//   BM_MutexPool                  mutex + condvar + deque<std::function>.
//
// Job semantics (issue #4; registered from main(), see register_semantics()):
//   BM_DelayedPending/{none,delayed,none_small_table}  BM_Engine_Submit/spin's
//                                 loop with JOBENGINE_BENCH_DELAYED jobs
//                                 parked (delay 1 h) against none.
//   BM_SubmitDelayed              submitting those delayed jobs.
//   BM_Cancel/{hit,hit_keyed,done,miss}/capacity:<slots>  cancel() latency
//                                 (hit_keyed: the parked jobs hold unique keys).
// This file is also the whole of jobengine_bench_nometrics (with the sources it
// shares with jobengine_bench), linked against the library built with
// JOBENGINE_METRICS=0: run.sh compares BM_Engine_Submit/spin between the two.
//
// Targets (ratios of medians in the same run; bench/ratios.py prints them):
// Engine_Submit >= 0.5x BareQueue and >= 5x MutexPool; Engine_SubmitBatch >=
// 0.5x BareQueue_Bulk.
//
// Environment: JOBENGINE_BENCH_JOBS (jobs per iteration), and
// JOBENGINE_BENCH_CAPACITY (EngineOptions::capacity, default 65536; also the
// bare queue's preallocation and BM_BareQueue_Bounded's bound);
// JOBENGINE_BENCH_DELAYED (delayed jobs parked, default 1,000,000),
// JOBENGINE_BENCH_DELAYED_ITERATIONS (iterations per BM_DelayedPending run,
// default 3), JOBENGINE_BENCH_CANCELS (cancel() calls per BM_Cancel run,
// default 200).
//
// Run on an otherwise idle machine (another busy process takes one of the two
// cores and the figures with it), interleaving repetitions so that a slow
// phase of the host hits every benchmark alike:
//   jobengine_bench --benchmark_repetitions=5
//       --benchmark_enable_random_interleaving=true --benchmark_out=bench.json
//   python3 bench/ratios.py bench.json
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <span>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

#include "baselines.h"
#include "jobengine/engine.h"
#include "sweep_bench.h"

// Set by bench/CMakeLists.txt: 1 in jobengine_bench, 0 in
// jobengine_bench_nometrics (linked against the library without metrics).
#ifndef JOBENGINE_BENCH_METRICS
#define JOBENGINE_BENCH_METRICS 1
#endif

namespace jobengine::bench {
namespace {

constexpr std::size_t kDefaultJobs = 1'000'000;
constexpr std::size_t kDefaultCapacity = std::size_t{1} << 16;

// A submit that finds the table full waits this many pause instructions before
// retrying: long enough not to hammer the lines the worker is freeing slots on,
// short next to the worker's per-batch time.
constexpr int kFullBackoffPauses = 32;

// Pause instructions between two completion polls at the end of an iteration,
// so that the poll does not steal the counter's cache line from the worker on
// every job it finishes.
constexpr int kPollPauses = 64;

// An iteration fails if the worker makes no progress for this long (a lost
// wake-up or a dead worker would otherwise hang the suite).
constexpr auto kStallLimit = std::chrono::seconds(10);

// Payload of every job: 16 bytes.
constexpr Payload kPayload{{0x0123456789abcdefULL, 0xfedcba9876543210ULL}};


std::size_t jobs_per_iteration() {
  static const std::size_t jobs = env_size("JOBENGINE_BENCH_JOBS", kDefaultJobs);
  return jobs;
}

std::size_t engine_capacity() {
  static const std::size_t capacity = env_size("JOBENGINE_BENCH_CAPACITY", kDefaultCapacity);
  return capacity;
}

void pause_for(int pauses) noexcept {
  for (int i = 0; i < pauses; ++i) cpu_relax();
}

// Polls `completed()` until it reaches `target`. Returns false if it stops
// moving for kStallLimit (checked every 4096 polls, to keep the clock off the
// poll loop).
template <typename Completed>
bool wait_for_completion(const Completed& completed, std::uint64_t target) {
  std::uint64_t done_at_check = completed();
  auto check_time = std::chrono::steady_clock::now();
  for (unsigned polls = 1;; ++polls) {
    const std::uint64_t done = completed();
    if (done >= target) return true;
    if (polls % 4096 == 0) {
      const auto now = std::chrono::steady_clock::now();
      if (done != done_at_check) {
        done_at_check = done;
        check_time = now;
      } else if (now - check_time > kStallLimit) {
        return false;
      }
    }
    if (cpu_plan().worker >= 0) {
      pause_for(kPollPauses);
    } else {
      // Unpinned, possibly on the worker's CPU: let the worker run.
      std::this_thread::yield();
    }
  }
}

// Reports a thread that could not be pinned as the run's error: figures from
// misplaced threads would not be comparable. Returns false when the run must end.
bool check_pins(benchmark::State& state, const ScopedPin& pin, bool worker_pinned) {
  if (!pin.ok()) {
    state.SkipWithError("cannot pin the submitter thread");
    return false;
  }
  if (!worker_pinned) {
    state.SkipWithError("cannot pin the worker thread");
    return false;
  }
  return true;
}

void report_stall(benchmark::State& state, std::uint64_t done, std::uint64_t target) {
  const std::string message = "worker stalled: " + std::to_string(done) + " of " +
                              std::to_string(target) + " jobs done after " +
                              std::to_string(kStallLimit.count()) + " s without progress";
  state.SkipWithError(message.c_str());
}

// ---- jobengine --------------------------------------------------------------

struct StartedEngine {
  Engine engine;
  HandlerId handler;
};

// Opens an engine with one worker pinned to the plan's worker CPU, registers
// the empty handler (and whatever `more` registers) and starts it. Runs on the
// unpinned benchmark thread, so the engine's threads do not inherit the
// submitter's CPU.
Result<StartedEngine> start_engine(IdleStrategy idle, std::size_t capacity = engine_capacity(),
                                   const std::function<Status(Engine&)>& more = {}) {
  EngineOptions options;
  options.workers = 1;
  if (cpu_plan().worker >= 0) options.cpus = {cpu_plan().worker};
  options.idle = idle;
  options.capacity = capacity;
  options.dequeue_batch = static_cast<std::uint32_t>(kDequeueBulk);
  auto engine = Engine::open(std::move(options));
  if (!engine) return engine.status();
  auto handler = engine->register_handler("bench.empty", [](JobContext& job) {
    benchmark::DoNotOptimize(job.payload().data());
    return Outcome::kDone;
  });
  if (!handler) return handler.status();
  if (more) {
    if (Status st = more(*engine); !st.ok()) return st;
  }
  auto started = engine->start();
  if (!started) return started.status();
  if (cpu_plan().worker >= 0 && started->pinned_cpus != std::vector<int>{cpu_plan().worker}) {
    return Status(StatusCode::kInternal, "engine did not report its worker pinned to cpu " +
                                             std::to_string(cpu_plan().worker));
  }
  return StartedEngine{std::move(*engine), *handler};
}

std::uint64_t engine_done(const Engine& engine) { return engine.health().done; }

// Stops the engine after a run and checks that it ran exactly what was
// submitted, so a lost or duplicated job fails the benchmark. `parked` jobs
// (delayed for an hour) are dropped by a kAbandon stop and must all be
// counted as dropped; with none parked the engine drains.
void finish_engine_run(benchmark::State& state, Engine& engine, std::uint64_t expected,
                       std::uint64_t retries, std::uint64_t parked = 0) {
  state.SetItemsProcessed(static_cast<std::int64_t>(expected));
  state.counters["retries"] =
      benchmark::Counter(static_cast<double>(retries), benchmark::Counter::kAvgIterations);
  auto report = engine.stop(parked == 0 ? StopMode::kDrain : StopMode::kAbandon);
  if (state.error_occurred()) return;
  if (!report) {
    state.SkipWithError(("stop failed: " + report.status().to_string()).c_str());
  } else if (report->done != expected || report->failed != 0 || report->dropped != parked) {
    const std::string message = "engine ran " + std::to_string(report->done) + " jobs (" +
                                std::to_string(report->failed) + " failed, " +
                                std::to_string(report->dropped) + " dropped), expected " +
                                std::to_string(expected) + " (" + std::to_string(parked) +
                                " dropped)";
    state.SkipWithError(message.c_str());
  }
}

// The timed loop of BM_Engine_Submit: each iteration submits jobs_per_iteration()
// jobs one by one (kQueueFull retried after a pause) and waits until the
// worker has run them; `target` counts the jobs submitted (and awaited) so far.
void submit_loop(benchmark::State& state, Engine& engine, HandlerId handler,
                 std::uint64_t& target, std::uint64_t& retries) {
  const std::size_t jobs = jobs_per_iteration();
  const std::string_view payload(reinterpret_cast<const char*>(&kPayload), sizeof(kPayload));
  std::string error;
  for (auto _ : state) {
    for (std::size_t i = 0; i < jobs && error.empty(); ++i) {
      for (;;) {
        auto id = engine.submit(handler, payload);
        if (id) [[likely]] {
          break;
        }
        if (id.status().code() != StatusCode::kQueueFull) {
          error = "submit failed: " + id.status().to_string();
          break;
        }
        ++retries;
        pause_for(kFullBackoffPauses);
      }
    }
    if (!error.empty()) {
      state.SkipWithError(error.c_str());
      break;
    }
    target += jobs;
    if (!wait_for_completion([&engine] { return engine_done(engine); }, target)) {
      report_stall(state, engine_done(engine), target);
      break;
    }
  }
}

void BM_Engine_Submit(benchmark::State& state, IdleStrategy idle) {
  auto started = start_engine(idle);
  if (!started) {
    state.SkipWithError(("engine start failed: " + started.status().to_string()).c_str());
    return;
  }
  Engine& engine = started->engine;
  ScopedPin pin(cpu_plan().submitter);
  if (!check_pins(state, pin, true)) return;
  std::uint64_t retries = 0;
  std::uint64_t target = 0;
  submit_loop(state, engine, started->handler, target, retries);
  finish_engine_run(state, engine, target, retries);
}

void BM_Engine_SubmitBatch(benchmark::State& state, IdleStrategy idle) {
  const std::size_t jobs = jobs_per_iteration();
  auto started = start_engine(idle);
  if (!started) {
    state.SkipWithError(("engine start failed: " + started.status().to_string()).c_str());
    return;
  }
  Engine& engine = started->engine;
  const std::string_view payload(reinterpret_cast<const char*>(&kPayload), sizeof(kPayload));
  const std::vector<JobSpec> specs(kSubmitBulk, JobSpec{started->handler, payload, {}});

  ScopedPin pin(cpu_plan().submitter);
  if (!check_pins(state, pin, true)) return;
  std::uint64_t retries = 0;
  std::uint64_t target = 0;
  std::string error;
  for (auto _ : state) {
    for (std::size_t submitted = 0; submitted < jobs && error.empty();) {
      const std::span<const JobSpec> batch(specs.data(), std::min(jobs - submitted, specs.size()));
      for (;;) {
        auto count = engine.submit_batch(batch);
        if (count) [[likely]] {
          submitted += *count;
          break;
        }
        if (count.status().code() != StatusCode::kQueueFull) {
          error = "submit_batch failed: " + count.status().to_string();
          break;
        }
        ++retries;
        pause_for(kFullBackoffPauses);
      }
    }
    if (!error.empty()) {
      state.SkipWithError(error.c_str());
      break;
    }
    target += jobs;
    if (!wait_for_completion([&engine] { return engine_done(engine); }, target)) {
      report_stall(state, engine_done(engine), target);
      break;
    }
  }
  finish_engine_run(state, engine, target, retries);
}

// The worker alone: each iteration holds the worker in a gate job, fills the
// table with kDrainJobs empty jobs, then opens the gate and times (manual
// time) until the worker has run them all. Nothing is submitted meanwhile, so
// the figure is the worker's per-job path (dequeue, run, metrics, retire)
// without the submitter's cache-line traffic: where JOBENGINE_METRICS costs
// what it costs (run.sh's metrics A/B).
void BM_Engine_Drain(benchmark::State& state, IdleStrategy idle) {
  const std::size_t capacity = engine_capacity();
  // Room for the gate job, the submitter's cached magazine and the worker's
  // retire buffer: half the table.
  const std::size_t jobs = capacity / 2;
  // Declared before the engine: the gate handler reads it until the engine stops.
  std::atomic<bool> gate_open{false};
  HandlerId gate = 0;
  auto started = start_engine(idle, capacity, [&](Engine& e) -> Status {
    auto h = e.register_handler("bench.gate", [&gate_open](JobContext&) {
      while (!gate_open.load(std::memory_order_acquire)) cpu_relax();
      return Outcome::kDone;
    });
    if (!h) return h.status();
    gate = *h;
    return Status();
  });
  if (!started) {
    state.SkipWithError(("engine start failed: " + started.status().to_string()).c_str());
    return;
  }
  Engine* engine = &started->engine;
  const HandlerId empty = started->handler;
  ScopedPin pin(cpu_plan().submitter);
  if (!check_pins(state, pin, true)) return;
  const std::string_view payload(reinterpret_cast<const char*>(&kPayload), sizeof(kPayload));
  const std::vector<JobSpec> specs(kSubmitBulk, JobSpec{empty, payload, {}});
  std::uint64_t target = 0;
  std::string error;
  for (auto _ : state) {
    gate_open.store(false, std::memory_order_relaxed);
    if (!engine->submit(gate, "")) {
      error = "gate submit failed";
    }
    while (error.empty() && engine->health().running == 0) std::this_thread::yield();
    for (std::size_t submitted = 0; submitted < jobs && error.empty();) {
      auto n = engine->submit_batch(
          std::span<const JobSpec>(specs.data(), std::min(jobs - submitted, specs.size())));
      if (!n) {
        error = "submit_batch failed: " + n.status().to_string();
        break;
      }
      submitted += *n;
    }
    if (!error.empty()) {
      gate_open.store(true, std::memory_order_release);
      state.SkipWithError(error.c_str());
      break;
    }
    target += jobs + 1;
    const auto t0 = std::chrono::steady_clock::now();
    gate_open.store(true, std::memory_order_release);
    if (!wait_for_completion([&engine] { return engine_done(*engine); }, target)) {
      report_stall(state, engine_done(*engine), target);
      break;
    }
    state.SetIterationTime(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  gate_open.store(true, std::memory_order_release);
  finish_engine_run(state, *engine, target, 0);
  // Items: the drained jobs only (not the gates).
  state.SetItemsProcessed(static_cast<std::int64_t>(state.iterations() * jobs));
}

// ---- baselines --------------------------------------------------------------

enum class BareMode { kSingle, kBulk, kBounded };

template <BareMode kMode>
void RunBareQueue(benchmark::State& state) {
  const std::size_t jobs = jobs_per_iteration();
  BareQueuePool pool(cpu_plan().worker, engine_capacity());
  ScopedPin pin(cpu_plan().submitter);
  if (!check_pins(state, pin, pool.pinned_ok())) return;
  std::uint64_t target = 0;
  for (auto _ : state) {
    if constexpr (kMode == BareMode::kBulk) {
      pool.submit_bulk(jobs, kPayload);
    } else if constexpr (kMode == BareMode::kBounded) {
      pool.submit_bounded(jobs, kPayload, engine_capacity());
    } else {
      pool.submit(jobs, kPayload);
    }
    target += jobs;
    if (!wait_for_completion([&pool] { return pool.completed(); }, target)) {
      report_stall(state, pool.completed(), target);
      break;
    }
  }
  state.SetItemsProcessed(static_cast<std::int64_t>(target));
}

void BM_BareQueue(benchmark::State& state) { RunBareQueue<BareMode::kSingle>(state); }
void BM_BareQueue_Bulk(benchmark::State& state) { RunBareQueue<BareMode::kBulk>(state); }
void BM_BareQueue_Bounded(benchmark::State& state) { RunBareQueue<BareMode::kBounded>(state); }

void BM_MutexPool(benchmark::State& state) {
  const std::size_t jobs = jobs_per_iteration();
  MutexPool pool(cpu_plan().worker);
  ScopedPin pin(cpu_plan().submitter);
  if (!check_pins(state, pin, pool.pinned_ok())) return;
  std::uint64_t target = 0;
  for (auto _ : state) {
    for (std::size_t i = 0; i < jobs; ++i) {
      // 16 bytes of capture: libstdc++'s std::function stores it inline, so
      // this is the pool's best case (no allocation per job).
      pool.submit([payload = kPayload] { benchmark::DoNotOptimize(payload); });
    }
    target += jobs;
    if (!wait_for_completion([&pool] { return pool.completed(); }, target)) {
      report_stall(state, pool.completed(), target);
      break;
    }
  }
  state.SetItemsProcessed(static_cast<std::int64_t>(target));
}

// ---- job semantics: delayed jobs pending, submitting them, cancel() ---------
//
// Issue #4: "throughput with 1M delayed jobs pending against none (target: at
// least 80%)". The delayed jobs are submitted with SubmitOptions::delay = 1 h
// before the timed loop, so for the whole run they sit in the job table and in
// the scheduler's heap; the loop is BM_Engine_Submit/spin's. Both arms open a
// table of delayed_jobs() + engine_capacity() slots, so only the parked jobs
// differ (the delayed arm keeps engine_capacity() slots free for the working
// set, the same as BM_Engine_Submit). A third arm runs BM_Engine_Submit's own
// table size next to them, to show what the larger table costs by itself.
// Every engine is stopped with kAbandon (the parked jobs count as dropped).

constexpr auto kParkDelay = std::chrono::hours(1);

// JOBENGINE_BENCH_DELAYED: delayed jobs parked (default 1,000,000).
std::size_t delayed_jobs() {
  static const std::size_t n = env_size("JOBENGINE_BENCH_DELAYED", 1'000'000);
  return n;
}

// Submits `n` empty jobs delayed by kParkDelay from the calling thread; their
// ids go to `ids` when given. Returns the error, empty on success.
std::string park_delayed(Engine& engine, HandlerId handler, std::size_t n,
                         std::vector<JobId>* ids = nullptr, bool keyed = false) {
  const std::string_view payload(reinterpret_cast<const char*>(&kPayload), sizeof(kPayload));
  SubmitOptions options;
  options.delay = kParkDelay;
  if (ids != nullptr) ids->reserve(n);
  std::string key;
  for (std::size_t i = 0; i < n; ++i) {
    if (keyed) {
      key = "park-" + std::to_string(i);
      options.unique_key = key;
    }
    auto id = engine.submit(handler, payload, options);
    if (!id) {
      return "delayed submit " + std::to_string(i) + " of " + std::to_string(n) +
             " failed: " + id.status().to_string();
    }
    if (ids != nullptr) ids->push_back(*id);
  }
  return {};
}

enum class DelayedArm { kNone, kDelayed, kSmallTable };

void BM_DelayedPending(benchmark::State& state, DelayedArm arm) {
  const std::size_t parked = arm == DelayedArm::kDelayed ? delayed_jobs() : 0;
  const std::size_t capacity =
      arm == DelayedArm::kSmallTable ? engine_capacity() : delayed_jobs() + engine_capacity();
  auto started = start_engine(IdleStrategy::kSpin, capacity);
  if (!started) {
    state.SkipWithError(("engine start failed: " + started.status().to_string()).c_str());
    return;
  }
  Engine& engine = started->engine;
  ScopedPin pin(cpu_plan().submitter);
  if (!check_pins(state, pin, true)) return;
  if (const std::string error = park_delayed(engine, started->handler, parked); !error.empty()) {
    state.SkipWithError(error.c_str());
    (void)engine.stop(StopMode::kAbandon);
    return;
  }
  const Health before = engine.health();
  if (before.delayed != parked) {
    state.SkipWithError(("health().delayed is " + std::to_string(before.delayed) + ", expected " +
                         std::to_string(parked)).c_str());
    (void)engine.stop(StopMode::kAbandon);
    return;
  }
  std::uint64_t retries = 0;
  std::uint64_t target = 0;
  submit_loop(state, engine, started->handler, target, retries);
  state.counters["delayed_pending"] = static_cast<double>(engine.health().delayed);
  state.counters["capacity"] = static_cast<double>(capacity);
  finish_engine_run(state, engine, target, retries, parked);
}

// What parking delayed_jobs() jobs costs: submit() with a delay (slot, then the
// scheduler's lock and heap push) from the pinned submitter into an empty table
// of delayed_jobs() + engine_capacity() slots. Manual time: only the submits.
// One iteration per run (registered with Iterations(1)): a second would find
// the table full; repetitions give the spread.
void BM_SubmitDelayed(benchmark::State& state) {
  const std::size_t n = delayed_jobs();
  auto started = start_engine(IdleStrategy::kSpinThenBlock, n + engine_capacity());
  if (!started) {
    state.SkipWithError(("engine start failed: " + started.status().to_string()).c_str());
    return;
  }
  Engine& engine = started->engine;
  ScopedPin pin(cpu_plan().submitter);
  if (!check_pins(state, pin, true)) return;
  std::uint64_t parked = 0;
  for (auto _ : state) {
    const auto t0 = std::chrono::steady_clock::now();
    const std::string error = park_delayed(engine, started->handler, n);
    const auto t1 = std::chrono::steady_clock::now();
    if (!error.empty()) {
      state.SkipWithError(error.c_str());
      break;
    }
    parked += n;
    state.SetIterationTime(std::chrono::duration<double>(t1 - t0).count());
  }
  finish_engine_run(state, engine, 0, 0, parked);
  state.SetItemsProcessed(static_cast<std::int64_t>(parked));  // not the 0 jobs run
}

// cancel() latency, in three cases (engine.cc cancel(), job_table.h "Finding a
// job by id"). The table holds `capacity - 4096` delayed jobs.
//   hit:  a delayed job picked at random: found through its id hint, then the
//         cancel bit, the heavy fence and the scheduler's wake-up.
//   done: a job that already ran (its slot may be reused since): its id hint
//         says where it was, so "not found" is known at once.
//   miss: an id never issued: no hint names it, so the whole table is
//         scanned; the same as cancelling a job whose hint `capacity` later
//         jobs took over (the worst case, and what every cancel() cost
//         before the hints).
// Manual time per call; ns per cancel() is the benchmark's time per iteration.
// Hits that did not answer kCancelled are counted, not failed, and timed like
// the others: `hit_kCancelRequested` counts kCancelRequested, which a hit can
// get legitimately in a rare race (see below); `hit_kNotFound` counts
// kNotFound, which a job that was pending should never get (an engine bug).
// (Results before this split have one counter, `hit_not_found`, holding both.)
// kHitKeyed: kHit with every parked job holding a unique key, so that each
// cancel() also releases one among capacity - 4,096 keys.
enum class CancelArm { kHit, kHitKeyed, kDone, kMiss };

// Submits `n` jobs that run at once and waits until they all ran.
std::string run_jobs(Engine& engine, HandlerId handler, std::size_t n, std::vector<JobId>* ids) {
  const std::string_view payload(reinterpret_cast<const char*>(&kPayload), sizeof(kPayload));
  const std::uint64_t done_before = engine.health().done;
  for (std::size_t i = 0; i < n; ++i) {
    auto id = engine.submit(handler, payload);
    if (!id) return "submit " + std::to_string(i) + " failed: " + id.status().to_string();
    ids->push_back(*id);
  }
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (engine.health().done < done_before + n) {
    if (std::chrono::steady_clock::now() > deadline) return "the jobs to cancel never ran";
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  return {};
}

void BM_Cancel(benchmark::State& state, CancelArm arm, std::size_t capacity) {
  const bool hit = arm == CancelArm::kHit || arm == CancelArm::kHitKeyed;
  // The worker sleeps (nothing is due); the scheduler wakes for each hit to
  // purge the cancelled job from its heap.
  auto started = start_engine(IdleStrategy::kSpinThenBlock, capacity);
  if (!started) {
    state.SkipWithError(("engine start failed: " + started.status().to_string()).c_str());
    return;
  }
  Engine& engine = started->engine;
  ScopedPin pin(cpu_plan().submitter);
  if (!check_pins(state, pin, true)) return;
  const std::size_t parked = capacity > 4096 ? capacity - 4096 : capacity / 2;
  std::vector<JobId> ids;
  if (const std::string error =
          park_delayed(engine, started->handler, parked, &ids, arm == CancelArm::kHitKeyed);
      !error.empty()) {
    state.SkipWithError(error.c_str());
    (void)engine.stop(StopMode::kAbandon);
    return;
  }
  // A fixed shuffle (xorshift), so hits land all over the table.
  std::uint64_t x = 0x9e3779b97f4a7c15ULL;
  for (std::size_t i = ids.size(); i > 1; --i) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    std::swap(ids[i - 1], ids[x % i]);
  }
  const JobId never_issued =
      ids.empty() ? 1 : *std::max_element(ids.begin(), ids.end()) + 1'000'000;
  std::vector<JobId> ran;  // kDone: one job that ran per iteration
  if (arm == CancelArm::kDone) {
    const std::string error = run_jobs(engine, started->handler,
                                       static_cast<std::size_t>(state.max_iterations), &ran);
    if (!error.empty()) {
      state.SkipWithError(error.c_str());
      (void)engine.stop(StopMode::kAbandon);
      return;
    }
  }
  std::size_t next = 0;
  std::uint64_t cancelled = 0;
  std::uint64_t hit_not_found = 0;         // kNotFound for a pending job: a bug
  std::uint64_t hit_cancel_requested = 0;  // the race below
  for (auto _ : state) {
    if (hit && next == ids.size()) {
      state.SkipWithError("more iterations than parked jobs");
      break;
    }
    const JobId id = hit ? ids[next++] : arm == CancelArm::kDone ? ran[next++] : never_issued;
    const auto t0 = std::chrono::steady_clock::now();
    auto r = engine.cancel(id);
    const auto t1 = std::chrono::steady_clock::now();
    state.SetIterationTime(std::chrono::duration<double>(t1 - t0).count());
    const bool not_found = !r && r.status().code() == StatusCode::kNotFound;
    if (hit && r && *r == CancelResult::kCancelRequested) {
      // A concurrent cancellation path (the scheduler's purge for an earlier
      // cancel()) can retire this job between this call's CAS and its state
      // read; cancel() then answers kCancelRequested (engine.cc I8: true
      // whichever way the race went), though the job never ran.
      ++hit_cancel_requested;
      continue;
    }
    if (hit && not_found) {
      // The job was pending: cancel() should have found it. An engine bug,
      // counted separately so the report names it as one.
      ++hit_not_found;
      continue;
    }
    const bool as_expected = hit ? (r && *r == CancelResult::kCancelled) : not_found;
    if (!as_expected) {
      const Health h = engine.health();
      state.SkipWithError(("cancel(" + std::to_string(id) + ") returned " +
                           (r ? std::string(cancel_result_name(*r)) : r.status().to_string()) +
                           " after " + std::to_string(cancelled) + " cancels of " +
                           std::to_string(parked) + " parked jobs; health: done " +
                           std::to_string(h.done) + ", delayed " + std::to_string(h.delayed) +
                           ", cancelled " + std::to_string(h.cancelled))
                              .c_str());
      break;
    }
    if (hit) ++cancelled;
  }
  state.counters["capacity"] = static_cast<double>(capacity);
  if (hit) {
    // New names, not the old combined `hit_not_found`, so that no reader takes
    // one figure for the other.
    state.counters["hit_kNotFound"] = static_cast<double>(hit_not_found);
    state.counters["hit_kCancelRequested"] = static_cast<double>(hit_cancel_requested);
  }
  auto report = engine.stop(StopMode::kAbandon);
  if (state.error_occurred()) return;
  if (!report) {
    state.SkipWithError(("stop failed: " + report.status().to_string()).c_str());
  } else if (report->cancelled + report->dropped != parked ||
             report->cancelled > cancelled + hit_not_found + hit_cancel_requested) {
    state.SkipWithError(("stop: " + std::to_string(report->cancelled) + " cancelled + " +
                         std::to_string(report->dropped) + " dropped, expected " +
                         std::to_string(parked) + " in all")
                            .c_str());
  }
}

// Registered from main(), once the sizes are read from the environment: the
// delayed arms and the cancel() rows run a fixed number of iterations, so that
// Google Benchmark does not repeat their (large) setup to size a run.
// JOBENGINE_BENCH_DELAYED_ITERATIONS: iterations of each BM_DelayedPending arm
// (default 3); JOBENGINE_BENCH_CANCELS: cancel() calls per BM_Cancel row
// (default 200).
void register_semantics() {
  const auto iterations =
      static_cast<benchmark::IterationCount>(env_size("JOBENGINE_BENCH_DELAYED_ITERATIONS", 3));
  const auto cancels =
      static_cast<benchmark::IterationCount>(env_size("JOBENGINE_BENCH_CANCELS", 200));
  const std::pair<const char*, DelayedArm> arms[] = {{"none", DelayedArm::kNone},
                                                     {"delayed", DelayedArm::kDelayed},
                                                     {"none_small_table", DelayedArm::kSmallTable}};
  for (const auto& [name, arm] : arms) {
    benchmark::RegisterBenchmark((std::string("BM_DelayedPending/") + name).c_str(),
                                 BM_DelayedPending, arm)
        ->UseRealTime()
        ->Unit(benchmark::kMillisecond)
        ->Iterations(iterations);
  }
  benchmark::RegisterBenchmark("BM_SubmitDelayed", BM_SubmitDelayed)
      ->UseManualTime()
      ->Unit(benchmark::kMillisecond)
      ->Iterations(1);
  const std::size_t small = engine_capacity();
  const std::size_t large = delayed_jobs() + engine_capacity();
  const std::pair<const char*, CancelArm> cancel_arms[] = {
      {"miss", CancelArm::kMiss}, {"hit", CancelArm::kHit}, {"hit_keyed", CancelArm::kHitKeyed},
      {"done", CancelArm::kDone}};
  for (const auto& [arm_name, arm] : cancel_arms) {
    for (const std::size_t capacity : {small, large}) {
      const std::string name =
          std::string("BM_Cancel/") + arm_name + "/capacity:" + std::to_string(capacity);
      benchmark::RegisterBenchmark(name.c_str(), BM_Cancel, arm, capacity)
          ->UseManualTime()
          ->Unit(benchmark::kMicrosecond)
          ->Iterations(cancels);
    }
  }
}

// Each iteration runs a million jobs, so milliseconds read best. Real time,
// because the submitter's CPU time leaves out the wait for the worker.
void configure(benchmark::internal::Benchmark* b) {
  b->UseRealTime()->Unit(benchmark::kMillisecond);
}

BENCHMARK_CAPTURE(BM_Engine_Submit, spin, IdleStrategy::kSpin)->Apply(configure);
BENCHMARK_CAPTURE(BM_Engine_Submit, spin_then_block, IdleStrategy::kSpinThenBlock)
    ->Apply(configure);
BENCHMARK_CAPTURE(BM_Engine_SubmitBatch, spin, IdleStrategy::kSpin)->Apply(configure);
BENCHMARK_CAPTURE(BM_Engine_SubmitBatch, spin_then_block, IdleStrategy::kSpinThenBlock)
    ->Apply(configure);
BENCHMARK_CAPTURE(BM_Engine_Drain, spin, IdleStrategy::kSpin)
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK(BM_BareQueue)->Apply(configure);
BENCHMARK(BM_BareQueue_Bulk)->Apply(configure);
BENCHMARK(BM_BareQueue_Bounded)->Apply(configure);
BENCHMARK(BM_MutexPool)->Apply(configure);

}  // namespace
}  // namespace jobengine::bench

int main(int argc, char** argv) {
  using jobengine::bench::cpu_plan;
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  jobengine::bench::register_sweep_and_open_loop();
  jobengine::bench::register_semantics();
  std::string counts;
  for (unsigned c : jobengine::bench::sweep_thread_counts()) {
    if (!counts.empty()) counts += ',';
    counts.append(std::to_string(c));
  }
  benchmark::AddCustomContext("jobengine_sweep_thread_counts", counts);
  // Recorded in the JSON output, so a result file says how it was produced.
  benchmark::AddCustomContext("jobengine_jobs_per_iteration",
                              std::to_string(jobengine::bench::jobs_per_iteration()));
  benchmark::AddCustomContext("jobengine_capacity",
                              std::to_string(jobengine::bench::engine_capacity()));
  benchmark::AddCustomContext("jobengine_delayed_jobs",
                              std::to_string(jobengine::bench::delayed_jobs()));
  // Which library this binary links: jobengine_bench the normal one,
  // jobengine_bench_nometrics the one built with JOBENGINE_METRICS=0.
  benchmark::AddCustomContext("jobengine_metrics", JOBENGINE_BENCH_METRICS ? "on" : "off");
  benchmark::AddCustomContext("jobengine_submitter_cpu", std::to_string(cpu_plan().submitter));
  benchmark::AddCustomContext("jobengine_worker_cpu", std::to_string(cpu_plan().worker));
  if (cpu_plan().worker < 0) {
    std::fprintf(stderr, "jobengine_bench: fewer than 2 CPUs allowed; threads run unpinned\n");
  }
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
