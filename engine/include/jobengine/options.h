// EngineOptions: everything an Engine is configured with, field by field.
//
// Each field says what it does, its default, and what it costs. Options are
// read once, by Engine::open(), which rejects inconsistent values with
// kInvalidArgument naming the field.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <atomic>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "jobengine/job.h"

namespace jobengine {

// What an idle worker does while no job is queued.
enum class IdleStrategy : std::uint8_t {
  // Poll the queues forever. Lowest wake-up latency (a few hundred ns), but
  // each idle worker keeps its core 100% busy.
  kSpin,
  // Poll `spin_iterations` times, then poll with sched_yield() in between.
  // Still a busy core, but one that lets other threads on it run.
  kSpinThenYield,
  // Poll `spin_iterations` times, then sleep on a semaphore until a submit
  // wakes it. An idle engine uses no CPU; a wake-up from sleep costs a futex
  // wake (tens of microseconds). Submits never lose a wake-up.
  kSpinThenBlock,
};

// A clock tests move by hand (EngineOptions::test_clock). The engine's
// scheduling decisions -- when a delayed job or a retry falls due, when a run
// is past its deadline -- read real time plus this clock's offset, so a test
// can make an hour pass at once instead of sleeping. Latency figures keep
// using real time.
class ManualClock {
 public:
  void advance(std::chrono::nanoseconds d) noexcept {
    offset_ns_.fetch_add(d.count(), std::memory_order_acq_rel);
  }
  std::chrono::nanoseconds offset() const noexcept {
    return std::chrono::nanoseconds(offset_ns_.load(std::memory_order_acquire));
  }

 private:
  std::atomic<std::int64_t> offset_ns_{0};
};

// Severity of a log line passed to EngineOptions::log.
enum class LogLevel : std::uint8_t { kDebug, kInfo, kWarning, kError };

// Persistence: periodic consistent snapshots of every pending job to shared
// memory and to disk, and recovery from the newest one that verifies at
// open(). See persistence/FORMAT.md for the bytes and README "What a snapshot
// promises" for the guarantees.
struct SnapshotOptions {
  // Off by default: the engine then keeps jobs in memory only and a crash
  // loses every pending job. When true, `dir` or `shm_name` must be set;
  // when false, open() logs a warning if either is set (they are ignored).
  bool enabled = false;

  // Directory of the disk store (created 0700; one engine per directory,
  // enforced with flock). Empty: no disk store. Survives power loss.
  std::string dir;

  // Name of the shared-memory segment ([A-Za-z0-9._-], no '/'; created 0600).
  // Empty: no shared-memory store. Survives a process crash, not a reboot.
  std::string shm_name;

  // How often the snapshot thread refreshes shared memory. Default 10 ms.
  // 0 disables periodic shared-memory snapshots. A periodic snapshot (this
  // one or disk_interval's) is skipped when nothing changed since the
  // store's last one: an idle engine writes none (Health::snapshots_unchanged).
  // At most 24 h (so are disk_interval and exit_deadline): open() refuses more.
  std::chrono::milliseconds shm_interval{10};

  // How often a generation is written to disk (write, fsync, rename, fsync
  // dir). Default 1 s. 0 disables periodic disk snapshots (snapshot_now() and
  // stop(kSnapshotAndExit) still write one).
  std::chrono::milliseconds disk_interval{1000};

  // Disk generations kept (older ones are deleted after a publish; with 2 or
  // more, never the newest one known to verify). Default 3.
  // Once this many exist, a snapshot rewrites the oldest file in place
  // instead of deleting it afterwards, so a failed snapshot leaves one fewer
  // (never none; persistence/file_store.h, "Recycling").
  unsigned keep_generations = 3;

  // A job found running at a cut, or that a worker was running when the
  // process died (the live record in `dir`, persistence/FORMAT.md), comes back
  // with recoveries + 1; past this many recoveries it is quarantined as dead
  // ("poison job") instead of being run again. Default 3.
  std::uint16_t max_recoveries = 3;

  // How long stop(kSnapshotAndExit) lets running handlers finish before it
  // takes the final snapshot anyway (those jobs are then recorded as pending,
  // their interrupted attempt counted but no recovery: they run again after
  // the restart). Default 5 s.
  std::chrono::milliseconds exit_deadline{5000};

  // CPU to pin the snapshot thread to; -1 (default) leaves it unpinned. It
  // must not be one of the workers' cpus.
  int cpu = -1;
};

struct EngineOptions {
  // Worker threads that run jobs. Default 1. Must be 1..4096.
  unsigned workers = 1;

  // CPUs to pin the workers to: worker i runs on cpus[i]. Empty (the default)
  // leaves the workers unpinned. When given, it must hold exactly `workers`
  // entries, each a CPU that exists, is online and that the kernel lets this
  // process's threads run on (its cpuset), or open() fails with
  // kInvalidArgument naming the CPU. open() probes this with the kernel
  // itself, so the calling thread's own affinity mask (e.g. `taskset` on the
  // process) does not restrict where workers may be pinned.
  std::vector<int> cpus;

  // What idle workers do. Default kSpinThenBlock: no CPU burnt when idle.
  IdleStrategy idle = IdleStrategy::kSpinThenBlock;

  // Empty polls of the queues before a kSpinThenYield / kSpinThenBlock worker
  // starts yielding / sleeping. Default 4096 (tens of microseconds).
  std::uint32_t spin_iterations = 4096;

  // Job-table slots, i.e. the most jobs that can be pending (queued or running)
  // at once. Default 65536. The table is allocated and touched at open():
  // capacity * 256 bytes (kSlotBytes), plus about 12 bytes per slot of queue
  // storage and 8 bytes per entry of cancel()'s id hints (bit_ceil(capacity)
  // entries: 8-16 bytes per slot). Beyond it submit() returns kQueueFull at
  // once. Each submitting thread caches up to kSlotCacheSize free slots, so a
  // submitter may see kQueueFull when up to kSlotCacheSize slots per other
  // submitting thread are still free. Must be between 1 and 2^31.
  std::size_t capacity = 1 << 16;

  // Largest payload accepted, in bytes. Default 1 MiB. Payloads up to
  // kInlinePayloadBytes are stored inside the slot (no allocation); larger ones
  // up to this limit are copied to the heap; larger still get kPayloadTooLarge.
  std::size_t max_payload = 1 << 20;

  // How many times a job may be attempted (run) in all. A handler returning
  // Outcome::kRetry (or throwing) is run again after the retry backoff until
  // this many attempts were made; then the job fails for good and becomes
  // dead, with its last error. Default 3. Must be 1..65535. Per handler:
  // HandlerOptions::max_attempts.
  std::uint32_t max_attempts = 3;

  // Backoff between attempts (see RetryPolicy). Default 10 ms doubling up to
  // 10 s, +-20% jitter. Per handler: HandlerOptions::retry.
  RetryPolicy retry;

  // Default most one run may take before the job counts as stuck (health()
  // and the stuck counter); 0 (default): no deadline. Per handler and per job
  // it can be set too (HandlerOptions::deadline, SubmitOptions::deadline).
  std::chrono::nanoseconds run_deadline{0};

  // Dead letters of jobs that failed for good kept at most; past this the
  // oldest failed letter is discarded (counted in Health::dead_discarded and
  // logged). Letters start() keeps for poison jobs and jobs whose handler is
  // gone are never discarded for room (drop_dead() removes them). Default
  // 10000. 0 keeps no failed letter (each is then only counted and logged).
  std::size_t max_dead = 10000;

  // health() is not ok while pending jobs exceed this many. 0 (default):
  // 90% of capacity.
  std::size_t queue_high_water = 0;

  // health() is not ok while a job died within this window ("dead-letter set
  // growing"). Default 60 s; 0 disables the check.
  std::chrono::milliseconds dead_growth_window{60000};

  // CPU for the scheduler thread (delayed jobs and retry backoff); -1
  // (default) leaves it unpinned. Must not be one of the workers' cpus.
  int scheduler_cpu = -1;

  // Starvation guard. A worker normally takes jobs from the most urgent
  // non-empty priority level. On every `fairness_period`-th dequeue attempt it
  // starts its scan at a lower level instead (rotating through levels
  // 1..kPriorityLevels-1), so under load each non-empty lower level gets at
  // least one batch in every fairness_period * (kPriorityLevels - 1) batches a
  // worker takes, however busy the higher levels are. A turn whose level is
  // empty goes to the most urgent non-empty level. 0 disables the guard
  // (strict priority); 1 is refused (every dequeue would start low, starving
  // high priority). Default 16.
  std::uint32_t fairness_period = 16;

  // Most jobs a worker takes from a queue at once. Default 32. Larger batches
  // cost less per job under load but hold jobs back from other workers.
  // Between 1 and 256.
  std::uint32_t dequeue_batch = 32;

  // Per-handler latency histograms (queue wait, run time; metrics_text()).
  // Timing a run costs two reads of the CPU's clock, ~10 ns each on x86 (a
  // ~20-uop RDTSC): as much as the rest of an empty job's path. So by default
  // a worker times every run of a handler whose last timed run took at least
  // 1 us (a cost under 1%), and one run in 128 of a faster handler, that run
  // counting for the runs it stood for (bucket counts and sums weighted; a
  // histogram's count lags the started counter by under 128 per handler and
  // worker; max is the largest timed run). Runs with a deadline are always
  // timed. true: time every run, exactly, at that cost.
  bool time_every_run = false;

  // Snapshots and recovery; off by default.
  SnapshotOptions snapshot;

  // Tests only: scheduling reads real time plus this clock's offset (see
  // ManualClock). Null (the default) in production.
  std::shared_ptr<ManualClock> test_clock;

  // Where the engine's log lines go. Empty (the default): the engine is silent.
  // Called from the engine's threads, so it must be thread-safe, and it must
  // not call back into the engine.
  std::function<void(LogLevel, std::string_view)> log;
};

}  // namespace jobengine
