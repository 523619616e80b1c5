// The pools the sweep, open-loop and 1x1 asio/oneTBB benchmarks drive, all
// behind one shape so that one benchmark template runs each of them doing the
// same work:
//
//   Pool(workers, worker_cpus)         starts `workers` threads, worker i pinned
//                                      to worker_cpus[i] (-1: unpinned)
//   pool.ok() / pool.error()           whether it started and pinned
//   typename Pool::Producer p(pool)    one per submitting thread
//   p.submit(job)                      one job; never fails (retries if full)
//   p.submit_bulk(span<const Job>)     several at once, where the system has a
//                                      bulk call (kHasBulk)
//   pool.completed()                   jobs run so far (acquire: their effects
//                                      are visible to the reader)
//   ~Pool()                            runs every submitted job, then joins
//
// A Job is a trivially copyable struct of bytes with a static
// `run(const void* bytes)`: each pool stores the job's bytes the way its
// users would (a queue item, a std::function capture, an asio handler, a TBB
// task, the engine's payload) and calls run() on them in a worker.
//
// The systems:
//   EnginePool  jobengine: submit() / submit_batch(), the handler calls run()
//               on the payload; idle strategy as given.
//   BarePool    moodycamel ConcurrentQueue<Job>, producer and consumer tokens,
//               try_dequeue_bulk(32); workers spin with pause, yielding the
//               CPU after 4096 empty polls (so that oversubscribed runs do not
//               measure the scheduler's time slice). The ceiling.
//   MutexPoolN  std::deque<std::function<void()>> behind a std::mutex,
//               workers waiting on a std::condition_variable, notify_one per
//               push (bulk: one lock, notify_all).
//   AsioPool    boost::asio::thread_pool, boost::asio::post(lambda).
//   TbbPool     oneTBB task_arena(workers, 0 reserved for masters) and a
//               task_group: arena.enqueue(group.defer(lambda)); the arena's
//               threads are pinned by a task_scheduler_observer; a
//               global_control lets TBB start `workers` threads.
//
// Completions are counted per worker on separate cache lines and summed on
// read, so counting costs every system the same and contends nowhere.
#pragma once

#include <benchmark/benchmark.h>
#include <concurrentqueue/concurrentqueue.h>
#include <oneapi/tbb/global_control.h>
#include <oneapi/tbb/task_arena.h>
#include <oneapi/tbb/task_group.h>
#include <oneapi/tbb/task_scheduler_observer.h>
#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <boost/asio/post.hpp>
#include <boost/asio/thread_pool.hpp>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <string_view>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include "baselines.h"
#include "jobengine/engine.h"

namespace jobengine::bench {

// Per-worker completion counters, one cache line each, summed on read.
class DoneCounters {
 public:
  explicit DoneCounters(unsigned n) : n_(n == 0 ? 1 : n), slots_(std::make_unique<Slot[]>(n_)) {}

  // Adds k to worker w's count. Release: a reader that sees the count sees
  // the jobs' effects. Safe from any thread (fetch_add), uncontended when
  // each worker keeps to its own w.
  void add(unsigned w, std::uint64_t k) noexcept {
    slots_[w % n_].value.fetch_add(k, std::memory_order_release);
  }

  std::uint64_t sum() const noexcept {
    std::uint64_t total = 0;
    for (unsigned i = 0; i < n_; ++i) total += slots_[i].value.load(std::memory_order_acquire);
    return total;
  }

 private:
  struct alignas(64) Slot {
    std::atomic<std::uint64_t> value{0};
  };
  static_assert(sizeof(Slot) == 64);
  unsigned n_;
  std::unique_ptr<Slot[]> slots_;
};

inline bool pin_native(pthread_t thread, int cpu) noexcept {
  if (cpu < 0) return true;
  if (cpu >= CPU_SETSIZE) return false;
  cpu_set_t set;
  CPU_ZERO(&set);
  CPU_SET(cpu, &set);
  return pthread_setaffinity_np(thread, sizeof(set), &set) == 0;
}

inline int cpu_at(const std::vector<int>& cpus, unsigned i) {
  return i < cpus.size() ? cpus[i] : -1;
}

// ---- jobengine ------------------------------------------------------------------

template <typename Job>
class EnginePool {
 public:
  static constexpr bool kHasBulk = true;

  EnginePool(unsigned workers, const std::vector<int>& cpus, IdleStrategy idle,
             std::size_t capacity = std::size_t{1} << 16) {
    EngineOptions o;
    o.workers = workers;
    if (std::all_of(cpus.begin(), cpus.end(), [](int c) { return c >= 0; }) &&
        cpus.size() == workers) {
      o.cpus = cpus;
    }
    o.idle = idle;
    o.capacity = capacity;
    o.dequeue_batch = static_cast<std::uint32_t>(kDequeueBulk);
    o.max_payload = std::max<std::size_t>(o.max_payload, sizeof(Job));
    auto engine = Engine::open(std::move(o));
    if (!engine) {
      error_ = "open: " + engine.status().to_string();
      return;
    }
    auto handler = engine->register_handler("bench.job", [](JobContext& job) {
      Job::run(job.payload().data());
      return Outcome::kDone;
    });
    if (!handler) {
      error_ = "register_handler: " + handler.status().to_string();
      return;
    }
    auto started = engine->start();
    if (!started) {
      error_ = "start: " + started.status().to_string();
      return;
    }
    handler_ = *handler;
    engine_ = std::make_unique<Engine>(std::move(*engine));
  }

  ~EnginePool() {
    if (engine_) (void)engine_->stop(StopMode::kDrain);
  }

  bool ok() const { return engine_ != nullptr && error_.empty(); }
  const std::string& error() const { return error_; }
  std::uint64_t completed() const { return engine_->health().done; }
  Engine& engine() { return *engine_; }

  class Producer {
   public:
    explicit Producer(EnginePool& pool) : pool_(pool) {}

    void submit(const Job& job) {
      const std::string_view bytes(reinterpret_cast<const char*>(&job), sizeof(Job));
      for (unsigned tries = 0;; ++tries) {
        auto id = pool_.engine_->submit(pool_.handler_, bytes);
        if (id) [[likely]] {
          return;
        }
        if (id.status().code() != StatusCode::kQueueFull) {
          failed_ = true;
          return;
        }
        back_off(tries);
      }
    }

    void submit_bulk(std::span<const Job> jobs) {
      specs_.clear();
      for (const Job& job : jobs) {
        specs_.push_back(JobSpec{
            pool_.handler_, std::string_view(reinterpret_cast<const char*>(&job), sizeof(Job)),
            {}});
      }
      for (unsigned tries = 0;; ++tries) {
        auto n = pool_.engine_->submit_batch(specs_);
        if (n) [[likely]] {
          return;
        }
        if (n.status().code() != StatusCode::kQueueFull) {
          failed_ = true;
          return;
        }
        back_off(tries);
      }
    }

    // True once a submit failed for a reason other than a full table.
    bool failed() const { return failed_; }

   private:
    // A full table: pause, and after a few tries give the CPU away (an
    // oversubscribed worker may need it to free slots).
    static void back_off(unsigned tries) {
      if (tries < 16) {
        for (int i = 0; i < 32; ++i) cpu_relax();
      } else {
        std::this_thread::yield();
      }
    }

    EnginePool& pool_;
    std::vector<JobSpec> specs_;
    bool failed_ = false;
  };

 private:
  std::unique_ptr<Engine> engine_;
  HandlerId handler_ = 0;
  std::string error_;
};

// ---- bare moodycamel queue ---------------------------------------------------------

// GCC 12 reports a false -Wstringop-overflow inside moodycamel's inlined
// enqueue_bulk / try_dequeue_bulk (an atomic load through a block pointer it
// cannot prove non-null), as baselines.cc notes; the code is moodycamel's.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wstringop-overflow"
#endif

template <typename Job>
class BarePool {
 public:
  static constexpr bool kHasBulk = true;
  static constexpr unsigned kSpinsBeforeYield = 4096;

  BarePool(unsigned workers, const std::vector<int>& cpus)
      : queue_(std::size_t{1} << 16), done_(workers) {
    for (unsigned w = 0; w < workers; ++w) {
      threads_.emplace_back([this, w] { run(w); });
      if (!pin_native(threads_.back().native_handle(), cpu_at(cpus, w))) {
        error_ = "cannot pin a worker to cpu " + std::to_string(cpu_at(cpus, w));
      }
    }
  }

  ~BarePool() {
    stop_.store(true, std::memory_order_release);
    for (std::thread& t : threads_) t.join();
  }

  bool ok() const { return error_.empty(); }
  const std::string& error() const { return error_; }
  std::uint64_t completed() const { return done_.sum(); }

  class Producer {
   public:
    explicit Producer(BarePool& pool) : pool_(pool), token_(pool.queue_) {}
    void submit(const Job& job) { pool_.queue_.enqueue(token_, job); }
    void submit_bulk(std::span<const Job> jobs) {
      pool_.queue_.enqueue_bulk(token_, jobs.data(), jobs.size());
    }
    bool failed() const { return false; }

   private:
    BarePool& pool_;
    moodycamel::ProducerToken token_;
  };

 private:
  void run(unsigned w) {
    moodycamel::ConsumerToken token(queue_);
    Job items[kDequeueBulk];
    unsigned empty = 0;
    for (;;) {
      // Read before the dequeue: once stop is seen (acquire), every enqueue
      // made before it is visible, so an empty dequeue after it means drained.
      const bool stopping = stop_.load(std::memory_order_acquire);
      const std::size_t n = queue_.try_dequeue_bulk(token, items, kDequeueBulk);
      if (n == 0) {
        if (stopping) return;
        if (++empty < kSpinsBeforeYield) {
          cpu_relax();
        } else {
          std::this_thread::yield();
        }
        continue;
      }
      empty = 0;
      for (std::size_t i = 0; i < n; ++i) Job::run(&items[i]);
      done_.add(w, n);
    }
  }

  moodycamel::ConcurrentQueue<Job> queue_;
  DoneCounters done_;
  alignas(64) std::atomic<bool> stop_{false};
  std::vector<std::thread> threads_;
  std::string error_;
};

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

// ---- mutex + condvar + deque<std::function> ------------------------------------------

template <typename Job>
class MutexPoolN {
 public:
  static constexpr bool kHasBulk = true;

  MutexPoolN(unsigned workers, const std::vector<int>& cpus) : done_(workers) {
    for (unsigned w = 0; w < workers; ++w) {
      threads_.emplace_back([this, w] { run(w); });
      if (!pin_native(threads_.back().native_handle(), cpu_at(cpus, w))) {
        error_ = "cannot pin a worker to cpu " + std::to_string(cpu_at(cpus, w));
      }
    }
  }

  ~MutexPoolN() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    for (std::thread& t : threads_) t.join();
  }

  bool ok() const { return error_.empty(); }
  const std::string& error() const { return error_; }
  std::uint64_t completed() const { return done_.sum(); }

  class Producer {
   public:
    explicit Producer(MutexPoolN& pool) : pool_(pool) {}
    void submit(const Job& job) {
      {
        std::lock_guard<std::mutex> lock(pool_.mu_);
        pool_.jobs_.emplace_back([job] { Job::run(&job); });
      }
      pool_.cv_.notify_one();
    }
    void submit_bulk(std::span<const Job> jobs) {
      {
        std::lock_guard<std::mutex> lock(pool_.mu_);
        for (const Job& job : jobs) pool_.jobs_.emplace_back([job] { Job::run(&job); });
      }
      pool_.cv_.notify_all();
    }
    bool failed() const { return false; }

   private:
    MutexPoolN& pool_;
  };

 private:
  void run(unsigned w) {
    for (;;) {
      std::function<void()> job;
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [this] { return stop_ || !jobs_.empty(); });
        if (jobs_.empty()) return;  // stop, and drained
        job = std::move(jobs_.front());
        jobs_.pop_front();
      }
      job();
      done_.add(w, 1);
    }
  }

  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> jobs_;  // guarded by mu_
  bool stop_ = false;                       // guarded by mu_
  DoneCounters done_;
  std::vector<std::thread> threads_;
  std::string error_;
};

// ---- boost::asio::thread_pool ---------------------------------------------------------

// The index of the asio pool worker the calling thread is (set when the pool
// pins its threads); 0 elsewhere.
inline thread_local unsigned t_asio_worker = 0;

template <typename Job>
class AsioPool {
 public:
  static constexpr bool kHasBulk = false;

  AsioPool(unsigned workers, const std::vector<int>& cpus)
      : pool_(workers), done_(workers), cpus_(cpus), workers_(workers) {
    // One task per thread: each pins its thread and then waits until all
    // have started, so no thread takes two of them. What they touch is
    // members: the last of them may still be reading after this returns.
    for (unsigned w = 0; w < workers; ++w) {
      boost::asio::post(pool_, [this] {
        const unsigned index = pin_next_.fetch_add(1, std::memory_order_relaxed);
        t_asio_worker = index;
        if (!pin_native(pthread_self(), cpu_at(cpus_, index))) {
          pin_failed_.store(true, std::memory_order_relaxed);
        }
        pin_arrived_.fetch_add(1, std::memory_order_acq_rel);
        while (pin_arrived_.load(std::memory_order_acquire) < workers_) std::this_thread::yield();
      });
    }
    while (pin_arrived_.load(std::memory_order_acquire) < workers) std::this_thread::yield();
    if (pin_failed_.load()) error_ = "cannot pin an asio thread";
  }

  // Runs every posted job (wait() lets the pool run out of work), then joins.
  ~AsioPool() { pool_.wait(); }

  bool ok() const { return error_.empty(); }
  const std::string& error() const { return error_; }
  std::uint64_t completed() const { return done_.sum(); }

  class Producer {
   public:
    explicit Producer(AsioPool& pool) : pool_(pool) {}
    void submit(const Job& job) {
      DoneCounters* done = &pool_.done_;
      boost::asio::post(pool_.pool_, [job, done] {
        Job::run(&job);
        done->add(t_asio_worker, 1);
      });
    }
    void submit_bulk(std::span<const Job> jobs) {
      for (const Job& job : jobs) submit(job);
    }
    bool failed() const { return false; }

   private:
    AsioPool& pool_;
  };

 private:
  boost::asio::thread_pool pool_;
  DoneCounters done_;
  std::vector<int> cpus_;
  unsigned workers_;
  std::atomic<unsigned> pin_next_{0};
  std::atomic<unsigned> pin_arrived_{0};
  std::atomic<bool> pin_failed_{false};
  std::string error_;
};

// ---- oneTBB task_arena + task_group ----------------------------------------------------

template <typename Job>
class TbbPool {
 public:
  static constexpr bool kHasBulk = false;

  TbbPool(unsigned workers, const std::vector<int>& cpus)
      : control_(tbb::global_control::max_allowed_parallelism,
                 std::max<std::size_t>(workers + 1,
                                       tbb::global_control::active_value(
                                           tbb::global_control::max_allowed_parallelism))),
        arena_(static_cast<int>(workers), 0),
        observer_(arena_, cpus),
        done_(workers) {
    arena_.initialize();
    observer_.observe(true);
  }

  // Runs every enqueued job, then lets the arena go.
  ~TbbPool() {
    arena_.execute([this] { group_.wait(); });
    observer_.observe(false);
  }

  bool ok() const { return !observer_.pin_failed.load(); }
  const std::string& error() const {
    static const std::string message = "cannot pin a TBB worker";
    static const std::string none;
    return ok() ? none : message;
  }
  std::uint64_t completed() const { return done_.sum(); }

  class Producer {
   public:
    explicit Producer(TbbPool& pool) : pool_(pool) {}
    void submit(const Job& job) {
      DoneCounters* done = &pool_.done_;
      pool_.arena_.enqueue(pool_.group_.defer([job, done] {
        Job::run(&job);
        done->add(static_cast<unsigned>(tbb::this_task_arena::current_thread_index()), 1);
      }));
    }
    void submit_bulk(std::span<const Job> jobs) {
      for (const Job& job : jobs) submit(job);
    }
    bool failed() const { return false; }

   private:
    TbbPool& pool_;
  };

 private:
  // Pins each thread that enters the arena to the CPU of its slot.
  class PinObserver : public tbb::task_scheduler_observer {
   public:
    PinObserver(tbb::task_arena& arena, std::vector<int> cpus)
        : tbb::task_scheduler_observer(arena), cpus_(std::move(cpus)) {}
    void on_scheduler_entry(bool) override {
      const int slot = tbb::this_task_arena::current_thread_index();
      if (slot < 0) return;
      if (!pin_native(pthread_self(), cpu_at(cpus_, static_cast<unsigned>(slot)))) {
        pin_failed.store(true, std::memory_order_relaxed);
      }
    }
    std::atomic<bool> pin_failed{false};

   private:
    std::vector<int> cpus_;
  };

  tbb::global_control control_;
  tbb::task_arena arena_;
  tbb::task_group group_;
  PinObserver observer_;
  DoneCounters done_;
};

// ---- jobs ---------------------------------------------------------------------------------

// An empty job carrying N bytes: run() only makes the compiler assume it reads
// them, as a real handler would.
template <std::size_t N>
struct SweepJob {
  unsigned char bytes[N];
  static void run(const void* p) noexcept { benchmark::DoNotOptimize(p); }
};
static_assert(std::is_trivially_copyable_v<SweepJob<16>>);

}  // namespace jobengine::bench
