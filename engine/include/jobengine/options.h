// EngineOptions: everything an Engine is configured with, field by field.
//
// Each field says what it does, its default, and what it costs. Options are
// read once, by Engine::open(), which rejects inconsistent values with
// kInvalidArgument naming the field.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <string_view>
#include <vector>

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

// Severity of a log line passed to EngineOptions::log.
enum class LogLevel : std::uint8_t { kDebug, kInfo, kWarning, kError };

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
  // storage. Beyond it submit() returns kQueueFull at once. Each submitting
  // thread caches up to kSlotCacheSize free slots, so a submitter may see
  // kQueueFull when up to kSlotCacheSize slots per other submitting thread are
  // still free. Must be between 1 and 2^31.
  std::size_t capacity = 1 << 16;

  // Largest payload accepted, in bytes. Default 1 MiB. Payloads up to
  // kInlinePayloadBytes are stored inside the slot (no allocation); larger ones
  // up to this limit are copied to the heap; larger still get kPayloadTooLarge.
  std::size_t max_payload = 1 << 20;

  // How many times a job may be attempted (run) in all. A handler returning
  // Outcome::kRetry is queued again at once until this many attempts were
  // made, after which the job counts as failed. Default 3. Must be 1..65535.
  std::uint32_t max_attempts = 3;

  // Starvation guard. A worker normally takes jobs from the most urgent
  // non-empty priority level. On every `fairness_period`-th dequeue attempt it
  // starts its scan at a lower level instead (rotating through levels
  // 1..kPriorityLevels-1), so under load each non-empty lower level gets at
  // least one batch in every fairness_period * (kPriorityLevels - 1) batches a
  // worker takes, however busy the higher levels are. 0 disables the guard
  // (strict priority). Default 16.
  std::uint32_t fairness_period = 16;

  // Most jobs a worker takes from a queue at once. Default 32. Larger batches
  // cost less per job under load but hold jobs back from other workers.
  // Between 1 and 256.
  std::uint32_t dequeue_batch = 32;

  // Where the engine's log lines go. Empty (the default): the engine is silent.
  // Called from the engine's threads, so it must be thread-safe, and it must
  // not call back into the engine.
  std::function<void(LogLevel, std::string_view)> log;
};

}  // namespace jobengine
