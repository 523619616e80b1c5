// Throughput across submitters x workers x payload sizes, open-loop latency
// at fractions of a peak measured in the same run, and the asio and oneTBB
// baselines of the 1 submitter + 1 worker throughput targets. All systems run
// through the pools of pools.h doing the same work (see there).
//
//   BM_Asio, BM_Tbb
//       Like throughput_bench.cc's BM_BareQueue / BM_MutexPool: one submitter
//       (the benchmark thread, pinned like them) and one pinned worker,
//       JOBENGINE_BENCH_JOBS empty jobs with a 16-byte payload per iteration.
//       Targets: BM_Engine_Submit/spin >= 3x BM_Asio and >= 2x BM_Tbb.
//
//   Sweep/<system>/<payload>B/s<S>/w<W>
//       S submitting threads (the benchmark thread and S-1 helpers) share
//       JOBENGINE_BENCH_SWEEP_JOBS jobs per iteration (iterations: as many as
//       --benchmark_min_time asks); the iteration ends once
//       W workers have run them all (items_per_second = submit-to-completion
//       rate), with at most 65536 jobs in flight for every system (the
//       engine's default capacity; see kMaxInFlight). Threads are pinned
//       round-robin over the allowed CPUs,
//       submitters first, then workers, so S + W above the core count
//       oversubscribes. Systems: engine_submit, engine_batch (submit_batch of
//       64), bare, bare_bulk (enqueue_bulk of 64), mutex, asio, tbb. The
//       engine runs its default idle strategy (kSpinThenBlock). S and W take
//       the values 1, 2, 4, ... up to the number of allowed CPUs (n), n
//       itself, and 2n (oversubscribed); the grid is the row S = 1, the
//       column W = 1 and the diagonal S = W, so that it grows linearly with
//       the machine. Payloads 16, 64 and 1024 bytes. JOBENGINE_BENCH_SWEEP=
//       quick keeps 16 B, S = 1 and W in {1, n}.
//
//   OpenLoop/<system>/load:<pct>
//       One submitter and one worker (pinned as in BM_Asio). First the
//       system's peak is measured on the same pool (closed loop, median of 3
//       bursts of JOBENGINE_BENCH_OPEN_PEAK_JOBS); then jobs are submitted on
//       a fixed schedule at pct% of that peak (open loop: the schedule never
//       waits for completions; a late submitter catches up at once) for
//       JOBENGINE_BENCH_OPEN_MS milliseconds (at least
//       JOBENGINE_BENCH_OPEN_MIN_SAMPLES jobs). Each job carries its scheduled
//       time; the handler records (its start - scheduled time), so the
//       figures include queueing and are free of coordinated omission.
//       Counters p50_ns, p99_ns, p999_ns, max_ns, samples, peak_Mjobs_s,
//       offered_Mjobs_s. Systems: engine_spin, engine_block (kSpinThenBlock),
//       bare, mutex, asio, tbb; loads 10, 50, 90%.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <atomic>
#include <barrier>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

#include "baselines.h"
#include "bench_util.h"
#include "pools.h"
#include "sweep_bench.h"

namespace jobengine::bench {
namespace {

constexpr auto kStallLimit = std::chrono::seconds(20);

std::size_t sweep_jobs() {
  static const std::size_t n = env_size("JOBENGINE_BENCH_SWEEP_JOBS", 100'000);
  return n;
}

std::size_t target_jobs() {
  static const std::size_t n = env_size("JOBENGINE_BENCH_JOBS", 1'000'000);
  return n;
}

bool quick_sweep() {
  const char* mode = std::getenv("JOBENGINE_BENCH_SWEEP");
  return mode != nullptr && std::string_view(mode) == "quick";
}

// Waits until completed() reaches target, yielding between polls when the
// run is oversubscribed (the poller may share a CPU with a worker). False if
// it stops moving for kStallLimit.
template <typename Completed>
bool await(const Completed& completed, std::uint64_t target, bool yield) {
  std::uint64_t last = completed();
  auto last_move = std::chrono::steady_clock::now();
  for (unsigned polls = 1;; ++polls) {
    const std::uint64_t done = completed();
    if (done >= target) return true;
    if (polls % 1024 == 0) {
      const auto now = std::chrono::steady_clock::now();
      if (done != last) {
        last = done;
        last_move = now;
      } else if (now - last_move > kStallLimit) {
        return false;
      }
    }
    if (yield) {
      std::this_thread::yield();
    } else {
      for (int i = 0; i < 64; ++i) cpu_relax();
    }
  }
}

// ---- throughput: S submitters x W workers --------------------------------------------

// Jobs a sweep run lets be queued or running at once, for every system: the
// engine's table holds this many (EngineOptions::capacity default) and
// refuses more with kQueueFull; the baselines' queues would grow without
// bound (a submitter outrunning its workers queues the whole iteration:
// gigabytes at 1 KiB, and a measure of the allocator, not of the pool), so
// their submitters wait while this many are in flight (InFlightBound).
constexpr std::uint64_t kMaxInFlight = std::uint64_t{1} << 16;
constexpr std::size_t kBoundCheckEvery = 256;

// Shared by a run's submitters: jobs submitted so far (in steps of
// kBoundCheckEvery), checked against the pool's completions.
struct InFlightBound {
  alignas(64) std::atomic<std::uint64_t> submitted{0};

  template <typename Pool>
  void admit(const Pool& pool, std::uint64_t n, bool yield) {
    const std::uint64_t after = submitted.fetch_add(n, std::memory_order_relaxed) + n;
    while (after > pool.completed() + kMaxInFlight) {
      if (yield) {
        std::this_thread::yield();
      } else {
        for (int i = 0; i < 64; ++i) cpu_relax();
      }
    }
  }
};

template <typename Pool>
inline constexpr bool kIsEngine = false;
template <typename Job>
inline constexpr bool kIsEngine<EnginePool<Job>> = true;

// Submits `n` copies of `job`, one at a time or in bulks of kSubmitBulk,
// admitted kBoundCheckEvery at a time by `bound` (not for the engine, which
// bounds itself).
template <typename Pool, typename Job, bool kBulk>
void submit_share(Pool& pool, typename Pool::Producer& producer, const Job& job, std::size_t n,
                  InFlightBound* bound, bool yield) {
  Job batch[kBulk ? kSubmitBulk : 1];
  std::fill(std::begin(batch), std::end(batch), job);
  while (n > 0) {
    const std::size_t chunk = std::min(n, kBoundCheckEvery);
    if constexpr (!kIsEngine<Pool>) {
      if (bound != nullptr) bound->admit(pool, chunk, yield);
    }
    if constexpr (kBulk) {
      for (std::size_t done = 0; done < chunk;) {
        const std::size_t k = std::min(chunk - done, kSubmitBulk);
        producer.submit_bulk(std::span<const Job>(batch, k));
        done += k;
      }
    } else {
      for (std::size_t i = 0; i < chunk; ++i) producer.submit(job);
    }
    n -= chunk;
  }
}

// Runs one throughput benchmark: `make(workers, cpus)` builds the pool.
template <typename Pool, typename Job, bool kBulk, typename Make>
void RunThroughput(benchmark::State& state, unsigned submitters, unsigned workers,
                   std::size_t jobs, const Make& make, bool bounded = true) {
  std::vector<int> worker_cpus;
  for (unsigned w = 0; w < workers; ++w) worker_cpus.push_back(round_robin_cpu(submitters + w));
  const bool oversubscribed =
      allowed_cpus().empty() || submitters + workers > allowed_cpus().size();
  // Built on the benchmark thread before it pins itself: the pool's threads
  // do not inherit the submitter's CPU.
  auto pool = make(workers, worker_cpus);
  if (!pool->ok()) {
    state.SkipWithError(("pool: " + pool->error()).c_str());
    return;
  }
  Job job;
  std::memset(&job, 0x5a, sizeof job);
  auto share = [&](unsigned s) {
    return jobs / submitters + (s + 1 == submitters ? jobs % submitters : 0);
  };

  // Helpers 1..S-1 wait at `start` for each iteration, submit their share,
  // and wait again; `stop` (set before the last arrival) ends them.
  std::barrier<> start(static_cast<std::ptrdiff_t>(submitters));
  InFlightBound in_flight;
  InFlightBound* bound = bounded ? &in_flight : nullptr;
  std::atomic<bool> stop{false};
  std::atomic<bool> helper_failed{false};
  std::vector<std::thread> helpers;
  for (unsigned s = 1; s < submitters; ++s) {
    helpers.emplace_back([&, s] {
      (void)pin_current_thread(round_robin_cpu(s));
      typename Pool::Producer producer(*pool);
      for (;;) {
        start.arrive_and_wait();
        if (stop.load(std::memory_order_acquire)) return;
        submit_share<Pool, Job, kBulk>(*pool, producer, job, share(s), bound, oversubscribed);
        if (producer.failed()) helper_failed.store(true);
      }
    });
  }
  std::uint64_t target = 0;
  std::string error;
  {
    ScopedPin pin(round_robin_cpu(0));
    typename Pool::Producer producer(*pool);
    for (auto _ : state) {
      start.arrive_and_wait();
      submit_share<Pool, Job, kBulk>(*pool, producer, job, share(0), bound, oversubscribed);
      target += jobs;
      if (producer.failed() || helper_failed.load()) {
        error = "submit failed";
        break;
      }
      if (!await([&pool] { return pool->completed(); }, target, oversubscribed)) {
        error = "stalled: " + std::to_string(pool->completed()) + " of " +
                std::to_string(target) + " jobs run";
        break;
      }
    }
  }
  stop.store(true, std::memory_order_release);
  start.arrive_and_wait();
  for (std::thread& t : helpers) t.join();
  if (!error.empty()) {
    state.SkipWithError(error.c_str());
    return;
  }
  state.SetItemsProcessed(static_cast<std::int64_t>(target));
  state.counters["submitters"] = submitters;
  state.counters["workers"] = workers;
  state.counters["payload_bytes"] = static_cast<double>(sizeof(Job));
}

template <typename Job>
auto engine_maker(IdleStrategy idle) {
  return [idle](unsigned w, const std::vector<int>& cpus) {
    return std::make_unique<EnginePool<Job>>(w, cpus, idle);
  };
}

template <template <typename> class P, typename Job>
auto pool_maker() {
  return [](unsigned w, const std::vector<int>& cpus) { return std::make_unique<P<Job>>(w, cpus); };
}

template <std::size_t N>
void register_sweep_payload(unsigned s, unsigned w, std::size_t jobs) {
  using Job = SweepJob<N>;
  const std::string tail = "/" + std::to_string(N) + "B/s" + std::to_string(s) + "/w" +
                           std::to_string(w);
  auto reg = [&](const std::string& system, auto fn) {
    // Iterations as --benchmark_min_time asks (run.sh: 0.1 s in full mode),
    // so that fast systems run many iterations and slow ones few.
    benchmark::RegisterBenchmark(("Sweep/" + system + tail).c_str(), fn)
        ->UseRealTime()
        ->Unit(benchmark::kMillisecond);
  };
  reg("engine_submit", [s, w, jobs](benchmark::State& st) {
    RunThroughput<EnginePool<Job>, Job, false>(st, s, w, jobs,
                                               engine_maker<Job>(IdleStrategy::kSpinThenBlock));
  });
  reg("engine_batch", [s, w, jobs](benchmark::State& st) {
    RunThroughput<EnginePool<Job>, Job, true>(st, s, w, jobs,
                                              engine_maker<Job>(IdleStrategy::kSpinThenBlock));
  });
  reg("bare", [s, w, jobs](benchmark::State& st) {
    RunThroughput<BarePool<Job>, Job, false>(st, s, w, jobs, pool_maker<BarePool, Job>());
  });
  reg("bare_bulk", [s, w, jobs](benchmark::State& st) {
    RunThroughput<BarePool<Job>, Job, true>(st, s, w, jobs, pool_maker<BarePool, Job>());
  });
  reg("mutex", [s, w, jobs](benchmark::State& st) {
    RunThroughput<MutexPoolN<Job>, Job, false>(st, s, w, jobs, pool_maker<MutexPoolN, Job>());
  });
  reg("asio", [s, w, jobs](benchmark::State& st) {
    RunThroughput<AsioPool<Job>, Job, false>(st, s, w, jobs, pool_maker<AsioPool, Job>());
  });
  reg("tbb", [s, w, jobs](benchmark::State& st) {
    RunThroughput<TbbPool<Job>, Job, false>(st, s, w, jobs, pool_maker<TbbPool, Job>());
  });
}

// ---- 1x1 baselines of the throughput targets ------------------------------------------

void BM_Asio(benchmark::State& state) {
  using Job = SweepJob<sizeof(Payload)>;
  // Unbounded, like BM_BareQueue and BM_MutexPool beside it.
  RunThroughput<AsioPool<Job>, Job, false>(state, 1, 1, target_jobs(), pool_maker<AsioPool, Job>(),
                                           false);
}

void BM_Tbb(benchmark::State& state) {
  using Job = SweepJob<sizeof(Payload)>;
  RunThroughput<TbbPool<Job>, Job, false>(state, 1, 1, target_jobs(), pool_maker<TbbPool, Job>(),
                                          false);
}

BENCHMARK(BM_Asio)->UseRealTime()->Unit(benchmark::kMillisecond);
BENCHMARK(BM_Tbb)->UseRealTime()->Unit(benchmark::kMillisecond);

// ---- open-loop latency ------------------------------------------------------------------

// A 16-byte job carrying the stamp() at which it was scheduled; run() records
// (now - scheduled) into `histogram`, which only the one worker writes.
struct StampJob {
  std::uint64_t scheduled;
  std::uint64_t pad;
  static inline LatencyHistogram* histogram = nullptr;
  static void run(const void* p) noexcept {
    const std::uint64_t now = stamp();
    std::uint64_t scheduled;
    std::memcpy(&scheduled, p, sizeof scheduled);
    histogram->record(now > scheduled ? now - scheduled : 0);
  }
};

std::size_t open_ms() {
  static const std::size_t n = env_size("JOBENGINE_BENCH_OPEN_MS", 250);
  return n;
}
std::size_t open_min_samples() {
  static const std::size_t n = env_size("JOBENGINE_BENCH_OPEN_MIN_SAMPLES", 20'000);
  return n;
}
std::size_t open_peak_jobs() {
  static const std::size_t n = env_size("JOBENGINE_BENCH_OPEN_PEAK_JOBS", 200'000);
  return n;
}

template <typename Pool, typename Make>
void RunOpenLoop(benchmark::State& state, double load, const Make& make) {
  auto histogram = std::make_unique<LatencyHistogram>();
  StampJob::histogram = histogram.get();
  auto pool = make(1u, std::vector<int>{round_robin_cpu(1)});
  if (!pool->ok()) {
    state.SkipWithError(("pool: " + pool->error()).c_str());
    return;
  }
  ScopedPin pin(round_robin_cpu(0));
  typename Pool::Producer producer(*pool);
  const double per_ns = ticks_per_ns();
  std::uint64_t target = 0;
  std::string error;

  // Peak: closed-loop bursts on this pool, median rate.
  std::vector<double> rates;
  for (int burst = 0; burst < 3 && error.empty(); ++burst) {
    const std::size_t n = open_peak_jobs();
    const auto t0 = std::chrono::steady_clock::now();
    for (std::size_t i = 0; i < n; ++i) producer.submit(StampJob{stamp(), 0});
    target += n;
    if (!await([&pool] { return pool->completed(); }, target, false)) error = "stalled (peak)";
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    rates.push_back(static_cast<double>(n) / s);
  }
  if (!error.empty()) {
    state.SkipWithError(error.c_str());
    return;
  }
  std::sort(rates.begin(), rates.end());
  const double peak = rates[rates.size() / 2];
  const double offered = peak * load;
  const auto samples = static_cast<std::size_t>(std::max<double>(
      static_cast<double>(open_min_samples()), offered * static_cast<double>(open_ms()) / 1e3));
  const double interval_ticks = per_ns * 1e9 / offered;

  histogram->clear();
  double achieved = 0;
  for (auto _ : state) {
    const auto t0 = std::chrono::steady_clock::now();
    const std::uint64_t start = stamp();
    for (std::size_t i = 0; i < samples; ++i) {
      const auto due = start + static_cast<std::uint64_t>(static_cast<double>(i) * interval_ticks);
      while (stamp() < due) cpu_relax();
      producer.submit(StampJob{due, 0});
    }
    const double submit_s =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    achieved = static_cast<double>(samples) / submit_s;
    target += samples;
    if (!await([&pool] { return pool->completed(); }, target, false)) {
      error = "stalled (open loop)";
      break;
    }
  }
  if (producer.failed()) error = "submit failed";
  if (!error.empty()) {
    state.SkipWithError(error.c_str());
    return;
  }
  state.counters["p50_ns"] = histogram->quantile(0.50) / per_ns;
  state.counters["p99_ns"] = histogram->quantile(0.99) / per_ns;
  state.counters["p999_ns"] = histogram->quantile(0.999) / per_ns;
  state.counters["max_ns"] = histogram->max() / per_ns;
  state.counters["samples"] = static_cast<double>(histogram->total());
  state.counters["load_pct"] = load * 100;
  state.counters["peak_Mjobs_s"] = peak / 1e6;
  state.counters["offered_Mjobs_s"] = offered / 1e6;
  state.counters["submitted_Mjobs_s"] = achieved / 1e6;
}

void register_open_loop() {
  for (int pct : {10, 50, 90}) {
    const double load = pct / 100.0;
    const std::string tail = "/load:" + std::to_string(pct);
    auto reg = [&](const std::string& system, auto fn) {
      benchmark::RegisterBenchmark(("OpenLoop/" + system + tail).c_str(), fn)
          ->UseRealTime()
          ->Unit(benchmark::kMillisecond)
          ->Iterations(1);
    };
    reg("engine_spin", [load](benchmark::State& st) {
      RunOpenLoop<EnginePool<StampJob>>(st, load, engine_maker<StampJob>(IdleStrategy::kSpin));
    });
    reg("engine_block", [load](benchmark::State& st) {
      RunOpenLoop<EnginePool<StampJob>>(st, load,
                                        engine_maker<StampJob>(IdleStrategy::kSpinThenBlock));
    });
    reg("bare", [load](benchmark::State& st) {
      RunOpenLoop<BarePool<StampJob>>(st, load, pool_maker<BarePool, StampJob>());
    });
    reg("mutex", [load](benchmark::State& st) {
      RunOpenLoop<MutexPoolN<StampJob>>(st, load, pool_maker<MutexPoolN, StampJob>());
    });
    reg("asio", [load](benchmark::State& st) {
      RunOpenLoop<AsioPool<StampJob>>(st, load, pool_maker<AsioPool, StampJob>());
    });
    reg("tbb", [load](benchmark::State& st) {
      RunOpenLoop<TbbPool<StampJob>>(st, load, pool_maker<TbbPool, StampJob>());
    });
  }
}

}  // namespace

std::vector<unsigned> sweep_thread_counts() {
  const unsigned n = allowed_cpus().empty() ? 1u : static_cast<unsigned>(allowed_cpus().size());
  std::vector<unsigned> counts;
  for (unsigned c = 1; c < n; c *= 2) counts.push_back(c);
  counts.push_back(n);
  counts.push_back(2 * n);
  counts.erase(std::unique(counts.begin(), counts.end()), counts.end());
  return counts;
}

void register_sweep_and_open_loop() {
  const std::vector<unsigned> counts = sweep_thread_counts();
  const std::size_t jobs = sweep_jobs();
  std::vector<std::pair<unsigned, unsigned>> grid;
  if (quick_sweep()) {
    grid.emplace_back(1, 1);
    if (counts.size() > 1) grid.emplace_back(1, counts[counts.size() - 2]);
  } else {
    for (unsigned c : counts) grid.emplace_back(1, c);                 // row S = 1
    for (unsigned c : counts) if (c != 1) grid.emplace_back(c, 1);     // column W = 1
    for (unsigned c : counts) if (c != 1) grid.emplace_back(c, c);     // diagonal
  }
  // One entry per (S, W): the row, column and diagonal share (1, 1), and on a
  // one-CPU machine the quick grid's two points are the same.
  std::vector<std::pair<unsigned, unsigned>> unique;
  for (auto sw : grid) {
    if (std::find(unique.begin(), unique.end(), sw) == unique.end()) unique.push_back(sw);
  }
  grid = std::move(unique);
  for (auto [s, w] : grid) register_sweep_payload<16>(s, w, jobs);
  if (!quick_sweep()) {
    for (auto [s, w] : grid) register_sweep_payload<64>(s, w, jobs);
    for (auto [s, w] : grid) register_sweep_payload<1024>(s, w, jobs);
  }
  register_open_loop();
}

}  // namespace jobengine::bench
