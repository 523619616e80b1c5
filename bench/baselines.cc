#include "baselines.h"

#include <benchmark/benchmark.h>
#include <concurrentqueue/concurrentqueue.h>
#include <pthread.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <atomic>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <new>
#include <thread>
#include <utility>

namespace jobengine::bench {
namespace {

bool pin_thread(pthread_t thread, int cpu) noexcept {
  if (cpu < 0) return true;
  if (cpu >= CPU_SETSIZE) return false;
  cpu_set_t set;
  CPU_ZERO(&set);
  CPU_SET(cpu, &set);
  return pthread_setaffinity_np(thread, sizeof(set), &set) == 0;
}

CpuPlan compute_cpu_plan() {
  CpuPlan plan;
  cpu_set_t allowed;
  CPU_ZERO(&allowed);
  if (sched_getaffinity(0, sizeof(allowed), &allowed) != 0) return plan;
  if (CPU_COUNT(&allowed) < 2) return plan;
  int found = 0;
  for (int cpu = 0; cpu < CPU_SETSIZE && found < 2; ++cpu) {
    if (!CPU_ISSET(cpu, &allowed)) continue;
    if (found++ == 0) {
      plan.submitter = cpu;
    } else {
      plan.worker = cpu;
    }
  }
  return plan;
}

// The job every baseline runs: touches nothing, but the compiler must assume
// it reads the payload, as a real handler would.
void empty_job(void* payload) { benchmark::DoNotOptimize(payload); }

using JobFn = void (*)(void*);

// What the bare queue carries: the function and a copy of its payload, so a
// job costs one 24-byte queue slot and nothing else.
struct Item {
  JobFn fn;
  Payload payload;
};

}  // namespace

const CpuPlan& cpu_plan() {
  static const CpuPlan plan = compute_cpu_plan();
  return plan;
}

bool pin_current_thread(int cpu) noexcept { return pin_thread(pthread_self(), cpu); }

ScopedPin::ScopedPin(int cpu) noexcept {
  if (cpu < 0) return;
  if (pthread_getaffinity_np(pthread_self(), sizeof(saved_), &saved_) != 0) {
    ok_ = false;
    return;
  }
  ok_ = pin_current_thread(cpu);
  restore_ = ok_;
}

ScopedPin::~ScopedPin() {
  if (restore_) (void)pthread_setaffinity_np(pthread_self(), sizeof(saved_), &saved_);
}

// ---- BareQueuePool ----------------------------------------------------------

struct BareQueuePool::State {
  explicit State(std::size_t initial_capacity) : queue(initial_capacity), producer(queue) {}

  moodycamel::ConcurrentQueue<Item> queue;
  moodycamel::ProducerToken producer;
  // Submitter-only: jobs enqueued so far, and the last completed count read.
  std::uint64_t enqueued = 0;
  std::uint64_t completed_seen = 0;
  // Written by the worker once per batch, read by the submitter while it
  // waits: on its own line so the worker's stores do not disturb the queue.
  alignas(64) std::atomic<std::uint64_t> completed{0};
  // Read by the worker on every empty poll, written once.
  alignas(64) std::atomic<bool> stop{false};
  bool pinned = true;
  std::thread worker;

  void run() {
    moodycamel::ConsumerToken consumer(queue);
    Item items[kDequeueBulk];
    std::uint64_t done = 0;
    for (;;) {
      // Read before the dequeue: once stop is seen (acquire), every enqueue
      // made before it is visible, so an empty dequeue after it means drained.
      const bool stopping = stop.load(std::memory_order_acquire);
      const std::size_t n = queue.try_dequeue_bulk(consumer, items, kDequeueBulk);
      if (n == 0) {
        if (stopping) return;
        cpu_relax();
        continue;
      }
      for (std::size_t i = 0; i < n; ++i) items[i].fn(&items[i].payload);
      done += n;
      // Release: the submitter that reads this count may rely on the jobs
      // having run.
      completed.store(done, std::memory_order_release);
    }
  }
};

BareQueuePool::BareQueuePool(int worker_cpu, std::size_t initial_capacity)
    : state_(std::make_unique<State>(initial_capacity)) {
  state_->worker = std::thread([s = state_.get()] { s->run(); });
  state_->pinned = pin_thread(state_->worker.native_handle(), worker_cpu);
}

BareQueuePool::~BareQueuePool() {
  // Release: pairs with the worker's acquire, making every enqueue visible.
  state_->stop.store(true, std::memory_order_release);
  state_->worker.join();
}

void BareQueuePool::submit(std::size_t n, const Payload& payload) {
  const Item item{&empty_job, payload};
  for (std::size_t i = 0; i < n; ++i) state_->queue.enqueue(state_->producer, item);
  state_->enqueued += n;
}

void BareQueuePool::submit_bounded(std::size_t n, const Payload& payload,
                                   std::size_t max_in_flight) {
  State& s = *state_;
  const Item item{&empty_job, payload};
  for (std::size_t i = 0; i < n; ++i) {
    // The worker's counter is read only when the cached one says full, so a
    // pool that keeps up costs no cross-core traffic here.
    while (s.enqueued - s.completed_seen >= max_in_flight) {
      s.completed_seen = s.completed.load(std::memory_order_acquire);
      if (s.enqueued - s.completed_seen >= max_in_flight) cpu_relax();
    }
    s.queue.enqueue(s.producer, item);
    ++s.enqueued;
  }
}

// GCC 12 reports a false -Wstringop-overflow inside moodycamel's inlined
// ExplicitProducer::enqueue_bulk (an atomic load through a block pointer it
// cannot prove non-null); the code is moodycamel's, not ours.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wstringop-overflow"
#endif
void BareQueuePool::submit_bulk(std::size_t n, const Payload& payload) {
  Item items[kSubmitBulk];
  std::fill(std::begin(items), std::end(items), Item{&empty_job, payload});
  while (n > 0) {
    const std::size_t count = std::min(n, kSubmitBulk);
    state_->queue.enqueue_bulk(state_->producer, items, count);
    n -= count;
    state_->enqueued += count;
  }
}
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

std::uint64_t BareQueuePool::completed() const noexcept {
  return state_->completed.load(std::memory_order_acquire);
}

bool BareQueuePool::pinned_ok() const noexcept { return state_->pinned; }

// ---- MutexPool --------------------------------------------------------------

struct MutexPool::State {
  std::mutex mu;
  std::condition_variable cv;
  std::deque<std::function<void()>> jobs;  // guarded by mu
  bool stop = false;                       // guarded by mu
  bool pinned = true;
  alignas(64) std::atomic<std::uint64_t> completed{0};
  std::thread worker;

  void run() {
    std::uint64_t done = 0;
    for (;;) {
      std::function<void()> job;
      {
        std::unique_lock<std::mutex> lock(mu);
        cv.wait(lock, [this] { return stop || !jobs.empty(); });
        if (jobs.empty()) return;  // stop, and drained
        job = std::move(jobs.front());
        jobs.pop_front();
      }
      job();
      completed.store(++done, std::memory_order_release);
    }
  }
};

MutexPool::MutexPool(int worker_cpu) : state_(std::make_unique<State>()) {
  state_->worker = std::thread([s = state_.get()] { s->run(); });
  state_->pinned = pin_thread(state_->worker.native_handle(), worker_cpu);
}

MutexPool::~MutexPool() {
  {
    std::lock_guard<std::mutex> lock(state_->mu);
    state_->stop = true;
  }
  state_->cv.notify_one();
  state_->worker.join();
}

void MutexPool::submit(std::function<void()> job) {
  {
    std::lock_guard<std::mutex> lock(state_->mu);
    state_->jobs.push_back(std::move(job));
  }
  state_->cv.notify_one();
}

std::uint64_t MutexPool::completed() const noexcept {
  return state_->completed.load(std::memory_order_acquire);
}

bool MutexPool::pinned_ok() const noexcept { return state_->pinned; }

std::size_t env_size(const char* name, std::size_t fallback) {
  const char* text = std::getenv(name);
  if (text == nullptr || *text == '\0') return fallback;
  char* end = nullptr;
  errno = 0;
  const unsigned long long value = std::strtoull(text, &end, 10);
  if (errno != 0 || *end != '\0' || value == 0) {
    std::fprintf(stderr, "jobengine bench: ignoring %s=\"%s\" (want a positive integer); using %zu\n",
                 name, text, fallback);
    return fallback;
  }
  return static_cast<std::size_t>(value);
}

}  // namespace jobengine::bench
