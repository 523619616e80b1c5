// Baselines that jobengine's throughput is measured against, and the thread
// placement helpers the whole benchmark suite shares.
//
// Each baseline is a one-worker pool a user might write instead of linking
// jobengine, built the way its authors recommend, so that the engine's figures
// can be read as ratios to them in the same process (the 2-vCPU benchmark
// machines move their vCPUs around, which swings absolute figures 2-4x):
//   BareQueuePool: moodycamel ConcurrentQueue of function pointers with tokens,
//                  bulk dequeue, spinning worker. No bookkeeping at all: the
//                  ceiling any queue-based engine can reach.
//   MutexPool:     std::mutex + std::condition_variable + std::deque of
//                  std::function, the hand-written pool.
// Only baselines.cc includes moodycamel; the benchmarks see these classes.
#pragma once

#include <sched.h>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>

namespace jobengine::bench {

// The 16-byte payload every benchmark job carries.
struct Payload {
  std::uint64_t words[2];
};
static_assert(sizeof(Payload) == 16);

// Jobs the baselines take from their queue at once. The engine benchmarks set
// EngineOptions::dequeue_batch to the same value, so that the ratio measures
// the engine's per-job overhead and not a different batch size.
inline constexpr std::size_t kDequeueBulk = 32;

// Jobs per enqueue_bulk() / submit_batch() call in the bulk benchmarks.
inline constexpr std::size_t kSubmitBulk = 64;

// A pause hint for spin loops: tells the core (and its SMT sibling) that the
// thread is waiting, without giving up the CPU.
inline void cpu_relax() noexcept {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield" ::: "memory");
#endif
}

// A positive integer from the environment variable `name`, or `fallback` when
// it is unset or empty. A malformed value is reported on stderr and ignored.
std::size_t env_size(const char* name, std::size_t fallback);

// Where the suite's threads run: the submitter (the benchmark thread) on one
// CPU and the worker on another, both taken from the CPUs this process may run
// on. Both are -1 (unpinned) when fewer than two CPUs are allowed, since
// pinning both threads to one CPU would measure the scheduler instead.
struct CpuPlan {
  int submitter = -1;
  int worker = -1;
};

// The plan for this process, computed once from sched_getaffinity(). The first
// two allowed CPUs are used (CPUs 0 and 1 on the 2-vCPU benchmark machines).
const CpuPlan& cpu_plan();

// Pins the calling thread to `cpu`. A negative cpu does nothing and succeeds.
// Returns false (and leaves the affinity unchanged) if the kernel refuses.
bool pin_current_thread(int cpu) noexcept;

// Pins the calling thread to `cpu` for the object's lifetime and restores the
// previous affinity mask afterwards, so that threads created later by other
// benchmarks (which inherit the creator's mask) are not confined to it.
class ScopedPin {
 public:
  explicit ScopedPin(int cpu) noexcept;
  ~ScopedPin();
  ScopedPin(const ScopedPin&) = delete;
  ScopedPin& operator=(const ScopedPin&) = delete;

  // False when `cpu` was given and the kernel refused to pin to it.
  bool ok() const noexcept { return ok_; }

 private:
  cpu_set_t saved_{};
  bool restore_ = false;
  bool ok_ = true;
};

// A bare moodycamel ConcurrentQueue pool: items are a function pointer plus a
// copy of the payload, enqueued with a producer token; one worker pinned to
// `worker_cpu` drains them with a consumer token and try_dequeue_bulk, spinning
// when empty. The queue grows without bound (no back-pressure), which is part
// of why it is the ceiling.
class BareQueuePool {
 public:
  // Starts the worker. `initial_capacity` items are preallocated.
  BareQueuePool(int worker_cpu, std::size_t initial_capacity);
  // Waits for every submitted job to run, then joins the worker.
  ~BareQueuePool();
  BareQueuePool(const BareQueuePool&) = delete;
  BareQueuePool& operator=(const BareQueuePool&) = delete;

  // Enqueues `n` empty jobs carrying `payload`, one enqueue() each. Only one
  // thread at a time may submit (the producer token is not shareable).
  void submit(std::size_t n, const Payload& payload);
  // The same with enqueue_bulk() of kSubmitBulk items (the last call takes the
  // remainder).
  void submit_bulk(std::size_t n, const Payload& payload);
  // Like submit(), but never lets more than `max_in_flight` jobs be queued or
  // running: a full pool makes the submitter spin until the worker catches up,
  // as a bounded job table does. Shows what back-pressure alone costs.
  void submit_bounded(std::size_t n, const Payload& payload, std::size_t max_in_flight);

  // Jobs the worker has run so far. The worker publishes it once per dequeued
  // batch (release), so a reader that sees a count also sees those jobs' effects.
  std::uint64_t completed() const noexcept;

  // False when the worker could not pin itself to worker_cpu.
  bool pinned_ok() const noexcept;

 private:
  struct State;
  std::unique_ptr<State> state_;
};

// The hand-written pool: a std::deque<std::function<void()>> behind a
// std::mutex, one worker waiting on a std::condition_variable, notify_one()
// after every push.
class MutexPool {
 public:
  explicit MutexPool(int worker_cpu);
  // Runs every queued job, then joins the worker.
  ~MutexPool();
  MutexPool(const MutexPool&) = delete;
  MutexPool& operator=(const MutexPool&) = delete;

  // Queues `job`. Thread-safe.
  void submit(std::function<void()> job);

  // Jobs the worker has run so far (release after each job).
  std::uint64_t completed() const noexcept;

  // False when the worker could not pin itself to worker_cpu.
  bool pinned_ok() const noexcept;

 private:
  struct State;
  std::unique_ptr<State> state_;
};

}  // namespace jobengine::bench
