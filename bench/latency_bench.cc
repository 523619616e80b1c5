// Wake-up latency: submit to handler start, with an idle worker.
//
// One submitter (the benchmark thread) and one pinned worker. Each sample:
// the submitter reads the TSC, submits one job carrying that stamp, waits
// until the handler has recorded (TSC at handler start - stamp), then waits a
// gap so the worker is idle again (spinning, yielding, or asleep, as its idle
// strategy has it by then) before the next sample. Reported as counters:
// p50_ns, p99_ns, p999_ns, max_ns over JOBENGINE_BENCH_LATENCY_SAMPLES
// samples (default 20000) per run.
//
//   BM_WakeLatency_Engine/<idle>/<gap_us>   jobengine, each idle strategy
//   BM_WakeLatency_BareQueue/<gap_us>       moodycamel queue, consumer spinning
//                                           on try_dequeue (the floor to beat)
//
// Targets (issue "benchmark suite"; ratios in one run): the spin strategy's
// p50 within 1.5x of the bare queue's, p99 within 2x. Sleeping workers
// (kSpinThenBlock after its spin budget) pay a futex wake: tens of us.
#include <benchmark/benchmark.h>
#include <concurrentqueue/concurrentqueue.h>
#if defined(__x86_64__)
#include <x86intrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "baselines.h"
#include "jobengine/engine.h"

namespace jobengine::bench {
namespace {

// A cheap timestamp: the TSC on x86-64, the virtual counter on aarch64,
// steady_clock elsewhere; ticks_per_ns() calibrates whichever it is.
inline std::uint64_t stamp() noexcept {
#if defined(__x86_64__)
  return __rdtsc();
#elif defined(__aarch64__)
  std::uint64_t v;
  asm volatile("mrs %0, cntvct_el0" : "=r"(v));
  return v;
#else
  return static_cast<std::uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(
                                        std::chrono::steady_clock::now().time_since_epoch())
                                        .count());
#endif
}

std::size_t samples_per_run() {
  static const std::size_t n = env_size("JOBENGINE_BENCH_LATENCY_SAMPLES", 20000);
  return n;
}

// TSC ticks per nanosecond, measured once against steady_clock.
double ticks_per_ns() {
  static const double rate = [] {
    const auto t0 = std::chrono::steady_clock::now();
    const std::uint64_t c0 = stamp();
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    const std::uint64_t c1 = stamp();
    const auto t1 = std::chrono::steady_clock::now();
    return static_cast<double>(c1 - c0) /
           static_cast<double>(std::chrono::duration_cast<std::chrono::nanoseconds>(t1 - t0).count());
  }();
  return rate;
}

// Where the handler leaves its measurement; on its own cache lines.
struct alignas(64) Mailbox {
  std::atomic<std::uint64_t> seen{0};     // samples the handler has recorded
  alignas(64) std::uint64_t* out = nullptr;  // latency in ticks, per sample
};

void wait_gap(std::chrono::microseconds gap) {
  const auto until = std::chrono::steady_clock::now() + gap;
  while (std::chrono::steady_clock::now() < until) cpu_relax();
}

void report(benchmark::State& state, std::vector<std::uint64_t>& ticks) {
  std::sort(ticks.begin(), ticks.end());
  const double per_ns = ticks_per_ns();
  auto at = [&](double q) {
    const std::size_t i = std::min(ticks.size() - 1, static_cast<std::size_t>(q * ticks.size()));
    return static_cast<double>(ticks[i]) / per_ns;
  };
  state.counters["p50_ns"] = at(0.50);
  state.counters["p99_ns"] = at(0.99);
  state.counters["p999_ns"] = at(0.999);
  state.counters["max_ns"] = static_cast<double>(ticks.back()) / per_ns;
  state.counters["samples"] = static_cast<double>(ticks.size());
}

void BM_WakeLatency_Engine(benchmark::State& state, IdleStrategy idle) {
  const auto gap = std::chrono::microseconds(state.range(0));
  // Long gaps (a sleeping worker) take fewer samples to keep the run short:
  // at most 10,000, and no more than 8 s of them (a busy machine makes each
  // wake-up take milliseconds); the samples counter says how many were taken.
  const bool long_gap = gap.count() >= 100;
  const std::size_t n = long_gap ? std::min<std::size_t>(samples_per_run(), 10000)
                                 : samples_per_run();
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(8);
  std::size_t taken = n;
  std::vector<std::uint64_t> ticks(n);
  auto box = std::make_unique<Mailbox>();
  box->out = ticks.data();
  EngineOptions o;
  o.workers = 1;
  if (cpu_plan().worker >= 0) o.cpus = {cpu_plan().worker};
  o.idle = idle;
  auto engine = Engine::open(o);
  if (!engine) {
    state.SkipWithError(engine.status().to_string().c_str());
    return;
  }
  Mailbox* mb = box.get();
  auto h = engine->register_handler("latency", [mb](JobContext& job) {
    const std::uint64_t now = stamp();
    std::uint64_t t0;
    std::memcpy(&t0, job.payload().data(), sizeof(t0));
    const std::uint64_t i = mb->seen.load(std::memory_order_relaxed);
    mb->out[i] = now - t0;
    mb->seen.store(i + 1, std::memory_order_release);
    return Outcome::kDone;
  });
  if (!h || !engine->start()) {
    state.SkipWithError("engine did not start");
    return;
  }
  ScopedPin pin(cpu_plan().submitter);
  for (auto _ : state) {
    mb->seen.store(0, std::memory_order_relaxed);
    for (std::size_t i = 0; i < n; ++i) {
      wait_gap(gap);
      const std::uint64_t t0 = stamp();
      auto id = engine->submit(*h, std::string_view(reinterpret_cast<const char*>(&t0), sizeof(t0)));
      if (!id) {
        state.SkipWithError(id.status().to_string().c_str());
        return;
      }
      while (mb->seen.load(std::memory_order_acquire) <= i) cpu_relax();
      if (long_gap && (i + 1) % 64 == 0 && std::chrono::steady_clock::now() > deadline) {
        taken = i + 1;
        break;
      }
    }
  }
  (void)engine->stop();
  ticks.resize(taken);
  report(state, ticks);
}

void BM_WakeLatency_BareQueue(benchmark::State& state) {
  const auto gap = std::chrono::microseconds(state.range(0));
  const std::size_t n = samples_per_run();
  std::vector<std::uint64_t> ticks(n);
  moodycamel::ConcurrentQueue<std::uint64_t> queue(1024);
  auto box = std::make_unique<Mailbox>();
  box->out = ticks.data();
  std::atomic<bool> stop{false};
  Mailbox* mb = box.get();
  std::thread worker([&] {
    pin_current_thread(cpu_plan().worker);
    moodycamel::ConsumerToken token(queue);
    std::uint64_t t0;
    while (!stop.load(std::memory_order_relaxed)) {
      if (queue.try_dequeue(token, t0)) {
        const std::uint64_t now = stamp();
        const std::uint64_t i = mb->seen.load(std::memory_order_relaxed);
        mb->out[i] = now - t0;
        mb->seen.store(i + 1, std::memory_order_release);
      } else {
        cpu_relax();
      }
    }
  });
  {
    ScopedPin pin(cpu_plan().submitter);
    moodycamel::ProducerToken token(queue);
    for (auto _ : state) {
      mb->seen.store(0, std::memory_order_relaxed);
      for (std::size_t i = 0; i < n; ++i) {
        wait_gap(gap);
        queue.enqueue(token, stamp());
        while (mb->seen.load(std::memory_order_acquire) <= i) cpu_relax();
      }
    }
  }
  stop = true;
  worker.join();
  report(state, ticks);
}

// Gaps: 5 us keeps a spin-then-block worker spinning; 500 us lets it sleep.
BENCHMARK_CAPTURE(BM_WakeLatency_Engine, spin, IdleStrategy::kSpin)
    ->Arg(5)->Iterations(1)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK_CAPTURE(BM_WakeLatency_Engine, spin_then_yield, IdleStrategy::kSpinThenYield)
    ->Arg(5)->Iterations(1)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK_CAPTURE(BM_WakeLatency_Engine, spin_then_block, IdleStrategy::kSpinThenBlock)
    ->Arg(5)->Arg(500)->Iterations(1)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_WakeLatency_BareQueue)->Arg(5)->Iterations(1)->Unit(benchmark::kMillisecond)->UseRealTime();

}  // namespace
}  // namespace jobengine::bench
