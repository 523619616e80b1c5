// Memory per pending job against the payload size, for jobengine and for the
// storage of two baselines, in its own process so that nothing else's memory
// moves the figures.
//
//   Memory/engine/payload:<P>   Engine::open() with capacity N
//                               (JOBENGINE_BENCH_MEMORY_JOBS, default 100000),
//                               one worker blocked in the first job, N jobs of
//                               P bytes submitted: the whole table is pending.
//   Memory/bare/payload:<P>     N items {function pointer, P bytes} in a
//                               moodycamel ConcurrentQueue (no consumer).
//   Memory/mutex/payload:<P>    N std::function<void()> capturing P bytes in a
//                               std::deque (the mutex pool's storage).
//   Memory/asio/payload:<P>     N lambdas capturing P bytes posted to a
//                               boost::asio::thread_pool whose one thread is
//                               blocked in a first handler.
//   Memory/tbb/payload:<P>      N lambdas capturing P bytes enqueued into a
//                               oneTBB task_arena(1) (task_group::defer) whose
//                               one thread is blocked in a first task; in a
//                               forked child, by RSS (see BM_MemoryTbb).
//
// Each figure is a difference of the process's memory taken before the
// structure is made and once every job is pending, divided by N:
//   heap_bytes_per_job   malloc'ed bytes (mallinfo2: uordblks + hblkhd),
//                        which counts the job table, queue blocks and heap
//                        payloads alike
//   rss_bytes_per_job    resident set (/proc/self/statm); M_MMAP_THRESHOLD is
//                        fixed at 128 KiB so freed large blocks go back to
//                        the kernel and do not hide later allocations
//   bytes_per_job        the headline: heap_bytes_per_job, except for oneTBB
//                        (rss_bytes_per_job, see BM_MemoryTbb) and the engine
//                        (rss_bytes_per_job: its job table is an mmap of its
//                        own, which malloc's figures do not count)
//   overhead_per_job     bytes_per_job - P: what a job costs beyond its
//                        payload (target for the engine: <= 64 bytes)
//   reserved_per_slot    engine only: resident bytes of the open, empty engine
//                        per slot of capacity (what the table reserves up front)
// Iterations(1): the time shown is meaningless.
#include <benchmark/benchmark.h>
#include <concurrentqueue/concurrentqueue.h>
#include <malloc.h>
#include <sys/wait.h>
#include <unistd.h>
#include <oneapi/tbb/task_arena.h>
#include <oneapi/tbb/task_group.h>

#include <boost/asio/post.hpp>
#include <boost/asio/thread_pool.hpp>

#include <array>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <functional>
#include <span>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "baselines.h"
#include "bench_util.h"
#include "jobengine/engine.h"

namespace jobengine::bench {
namespace {

std::size_t memory_jobs() {
  static const std::size_t n = env_size("JOBENGINE_BENCH_MEMORY_JOBS", 100'000);
  return n;
}

// Sets the counters from two readings. `by_rss`: the headline figure
// (bytes_per_job, overhead_per_job) is the RSS delta instead of the heap's,
// for memory that malloc does not see.
void report(benchmark::State& state, const MemoryUse& before, const MemoryUse& after,
            std::size_t jobs, std::size_t payload, bool by_rss = false) {
  const auto per = [jobs](std::uint64_t a, std::uint64_t b) {
    return (static_cast<double>(b) - static_cast<double>(a)) / static_cast<double>(jobs);
  };
  const double heap = per(before.heap_bytes, after.heap_bytes);
  const double rss = per(before.rss_bytes, after.rss_bytes);
  const double headline = by_rss ? rss : heap;
  state.counters["jobs"] = static_cast<double>(jobs);
  state.counters["payload_bytes"] = static_cast<double>(payload);
  state.counters["heap_bytes_per_job"] = heap;
  state.counters["rss_bytes_per_job"] = rss;
  state.counters["bytes_per_job"] = headline;
  state.counters["overhead_per_job"] = headline - static_cast<double>(payload);
}

void BM_MemoryEngine(benchmark::State& state) {
  const auto payload_size = static_cast<std::size_t>(state.range(0));
  const std::size_t jobs = memory_jobs();
  const std::string payload(payload_size, 'x');
  for (auto _ : state) {
    std::atomic<bool> release{false};
    (void)malloc_trim(0);  // freed memory back to the kernel: RSS deltas start clean
    const MemoryUse before = memory_use();
    EngineOptions o;
    o.workers = 1;
    o.capacity = jobs;
    o.max_attempts = 65535;
    // Retried jobs requeue at once, not held in the scheduler for a backoff.
    o.retry.initial_backoff = std::chrono::nanoseconds(0);
    o.idle = IdleStrategy::kSpinThenBlock;
    auto engine = Engine::open(std::move(o));
    if (!engine) {
      state.SkipWithError(engine.status().to_string().c_str());
      return;
    }
    auto handler = engine->register_handler("bench.parked", [&release](JobContext&) {
      release.wait(false, std::memory_order_acquire);
      return Outcome::kDone;
    });
    if (!handler || !engine->start()) {
      state.SkipWithError("engine did not start");
      return;
    }
    const MemoryUse opened = memory_use();
    std::vector<JobSpec> specs(256, JobSpec{*handler, payload, {}});
    std::size_t accepted = 0;
    while (accepted < jobs) {
      const std::size_t k = std::min(jobs - accepted, specs.size());
      auto n = engine->submit_batch(std::span<const JobSpec>(specs.data(), k));
      if (!n) {
        // Slots cached by the worker's thread can make the last few fail
        // (README "Exact capacity"): count what was accepted.
        if (n.status().code() == StatusCode::kQueueFull && k > 1) {
          specs.resize(1);
          continue;
        }
        if (n.status().code() == StatusCode::kQueueFull) break;
        state.SkipWithError(n.status().to_string().c_str());
        return;
      }
      accepted += *n;
    }
    while (engine->health().running == 0) std::this_thread::sleep_for(std::chrono::milliseconds(1));
    const MemoryUse full = memory_use();
    release.store(true, std::memory_order_release);
    release.notify_all();
    (void)engine->stop(StopMode::kAbandon);
    // By RSS: the job table is mapped by the engine itself (huge pages, see
    // engine/job_table.cc), where malloc's figures do not see it.
    report(state, before, full, accepted, payload_size, /*by_rss=*/true);
    state.counters["reserved_per_slot"] =
        (static_cast<double>(opened.rss_bytes) - static_cast<double>(before.rss_bytes)) /
        static_cast<double>(jobs);
  }
}

template <std::size_t P>
struct Item {
  void (*fn)(void*);
  std::array<unsigned char, P> bytes;
};

void noop(void* p) { benchmark::DoNotOptimize(p); }

template <std::size_t P>
void BM_MemoryBare(benchmark::State& state) {
  const std::size_t jobs = memory_jobs();
  for (auto _ : state) {
    (void)malloc_trim(0);  // freed memory back to the kernel: RSS deltas start clean
    const MemoryUse before = memory_use();
    MemoryUse full;
    {
      moodycamel::ConcurrentQueue<Item<P>> queue;
      moodycamel::ProducerToken token(queue);
      Item<P> item{&noop, {}};
      for (std::size_t i = 0; i < jobs; ++i) queue.enqueue(token, item);
      full = memory_use();
    }
    report(state, before, full, jobs, P);
  }
}

template <std::size_t P>
void BM_MemoryMutex(benchmark::State& state) {
  const std::size_t jobs = memory_jobs();
  for (auto _ : state) {
    (void)malloc_trim(0);  // freed memory back to the kernel: RSS deltas start clean
    const MemoryUse before = memory_use();
    MemoryUse full;
    {
      std::deque<std::function<void()>> deque;
      const std::array<unsigned char, P> bytes{};
      for (std::size_t i = 0; i < jobs; ++i) {
        deque.emplace_back([bytes] { benchmark::DoNotOptimize(bytes.data()); });
      }
      full = memory_use();
    }
    report(state, before, full, jobs, P);
  }
}

// A pool's one thread blocked in a first job, so that everything submitted
// after it stays pending: `started` says it is blocked, `release` frees it.
struct Blocker {
  std::atomic<bool> started{false};
  std::atomic<bool> release{false};
  void block() {
    started.store(true, std::memory_order_release);
    release.wait(false, std::memory_order_acquire);
  }
  void wait_started() const {
    while (!started.load(std::memory_order_acquire)) std::this_thread::yield();
  }
  void open() {
    release.store(true, std::memory_order_release);
    release.notify_all();
  }
};

template <std::size_t P>
void BM_MemoryAsio(benchmark::State& state) {
  const std::size_t jobs = memory_jobs();
  for (auto _ : state) {
    Blocker blocker;
    (void)malloc_trim(0);
    const MemoryUse before = memory_use();
    MemoryUse full;
    {
      boost::asio::thread_pool pool(1);
      boost::asio::post(pool, [&blocker] { blocker.block(); });
      blocker.wait_started();
      const std::array<unsigned char, P> bytes{};
      for (std::size_t i = 0; i < jobs; ++i) {
        boost::asio::post(pool, [bytes] { benchmark::DoNotOptimize(bytes.data()); });
      }
      full = memory_use();
      blocker.open();
      pool.join();
    }
    report(state, before, full, jobs, P);
  }
}

// oneTBB allocates its tasks with its own allocator (tbbmalloc, from mmap),
// which mallinfo2 does not see and which keeps freed memory for reuse. So
// each measurement runs in a forked child that has never used TBB (this
// process never does) and the RSS delta is the figure. The child sends
// {before, full} back through a pipe.
template <std::size_t P>
void BM_MemoryTbb(benchmark::State& state) {
  const std::size_t jobs = memory_jobs();
  for (auto _ : state) {
    int fds[2];
    if (::pipe(fds) != 0) {
      state.SkipWithError("pipe failed");
      return;
    }
    const pid_t pid = ::fork();
    if (pid < 0) {
      state.SkipWithError("fork failed");
      return;
    }
    if (pid == 0) {
      ::close(fds[0]);
      MemoryUse readings[2];
      Blocker blocker;
      readings[0] = memory_use();
      {
        tbb::task_arena arena(1, 0);
        tbb::task_group group;
        arena.enqueue(group.defer([&blocker] { blocker.block(); }));
        blocker.wait_started();
        const std::array<unsigned char, P> bytes{};
        for (std::size_t i = 0; i < jobs; ++i) {
          arena.enqueue(group.defer([bytes] { benchmark::DoNotOptimize(bytes.data()); }));
        }
        readings[1] = memory_use();
        blocker.open();
        arena.execute([&group] { group.wait(); });
      }
      const bool ok = ::write(fds[1], readings, sizeof readings) == sizeof readings;
      ::_exit(ok ? 0 : 1);
    }
    ::close(fds[1]);
    MemoryUse readings[2];
    const bool got = ::read(fds[0], readings, sizeof readings) == sizeof readings;
    ::close(fds[0]);
    int status = 0;
    (void)::waitpid(pid, &status, 0);
    if (!got || !WIFEXITED(status) || WEXITSTATUS(status) != 0) {
      state.SkipWithError("the measuring child failed");
      return;
    }
    report(state, readings[0], readings[1], jobs, P, /*by_rss=*/true);
  }
}

constexpr std::size_t kPayloads[] = {16, 64, 192, 256, 1024};

void configure(benchmark::internal::Benchmark* b) {
  b->Iterations(1)->Unit(benchmark::kMillisecond)->UseRealTime();
}

BENCHMARK(BM_MemoryEngine)
    ->Name("Memory/engine")
    ->ArgName("payload")
    ->Arg(kPayloads[0])
    ->Arg(kPayloads[1])
    ->Arg(kPayloads[2])
    ->Arg(kPayloads[3])
    ->Arg(kPayloads[4])
    ->Apply(configure);
BENCHMARK(BM_MemoryBare<16>)->Name("Memory/bare/payload:16")->Apply(configure);
BENCHMARK(BM_MemoryBare<64>)->Name("Memory/bare/payload:64")->Apply(configure);
BENCHMARK(BM_MemoryBare<192>)->Name("Memory/bare/payload:192")->Apply(configure);
BENCHMARK(BM_MemoryBare<256>)->Name("Memory/bare/payload:256")->Apply(configure);
BENCHMARK(BM_MemoryBare<1024>)->Name("Memory/bare/payload:1024")->Apply(configure);
BENCHMARK(BM_MemoryMutex<16>)->Name("Memory/mutex/payload:16")->Apply(configure);
BENCHMARK(BM_MemoryMutex<64>)->Name("Memory/mutex/payload:64")->Apply(configure);
BENCHMARK(BM_MemoryMutex<192>)->Name("Memory/mutex/payload:192")->Apply(configure);
BENCHMARK(BM_MemoryMutex<256>)->Name("Memory/mutex/payload:256")->Apply(configure);
BENCHMARK(BM_MemoryMutex<1024>)->Name("Memory/mutex/payload:1024")->Apply(configure);
BENCHMARK(BM_MemoryAsio<16>)->Name("Memory/asio/payload:16")->Apply(configure);
BENCHMARK(BM_MemoryAsio<64>)->Name("Memory/asio/payload:64")->Apply(configure);
BENCHMARK(BM_MemoryAsio<192>)->Name("Memory/asio/payload:192")->Apply(configure);
BENCHMARK(BM_MemoryAsio<256>)->Name("Memory/asio/payload:256")->Apply(configure);
BENCHMARK(BM_MemoryAsio<1024>)->Name("Memory/asio/payload:1024")->Apply(configure);
BENCHMARK(BM_MemoryTbb<16>)->Name("Memory/tbb/payload:16")->Apply(configure);
BENCHMARK(BM_MemoryTbb<64>)->Name("Memory/tbb/payload:64")->Apply(configure);
BENCHMARK(BM_MemoryTbb<192>)->Name("Memory/tbb/payload:192")->Apply(configure);
BENCHMARK(BM_MemoryTbb<256>)->Name("Memory/tbb/payload:256")->Apply(configure);
BENCHMARK(BM_MemoryTbb<1024>)->Name("Memory/tbb/payload:1024")->Apply(configure);

}  // namespace
}  // namespace jobengine::bench

int main(int argc, char** argv) {
  // A fixed threshold: freed large blocks return to the kernel (see above).
  (void)mallopt(M_MMAP_THRESHOLD, 128 * 1024);
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::AddCustomContext("jobengine_memory_jobs",
                              std::to_string(jobengine::bench::memory_jobs()));
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
