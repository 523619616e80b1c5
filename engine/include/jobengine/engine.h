// Engine: the in-process job engine. Open it, register handlers, start it,
// submit jobs from any thread, stop it.
//
//   auto engine = jobengine::Engine::open(opts);          // Result<Engine>
//   if (!engine) { log(engine.status().to_string()); ... }
//   auto email = engine->register_handler("email.send", [](jobengine::JobContext& job) {
//     send(job.payload());
//     return jobengine::Outcome::kDone;
//   });
//   (void)engine->start();
//   auto id = engine->submit(*email, bytes, {.priority = jobengine::kHighPriority});
//   auto report = engine->stop(jobengine::StopMode::kDrain);
//
// Lifecycle: open -> register_handler* -> start -> submit* -> stop. The
// destructor stops a running engine with StopMode::kDrain. No engine thread
// outlives the Engine object.
//
// Not guaranteed: FIFO order holds only per submitting thread and priority
// level, and only with one worker; health() figures are approximate while
// jobs move (each is read without a lock).
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "jobengine/job.h"
#include "jobengine/options.h"
#include "jobengine/status.h"

namespace jobengine {

enum class StopMode : std::uint8_t {
  // Stop intake, run every job already queued (retries included), then join
  // the workers.
  kDrain,
  // Stop intake, let the jobs already running finish, drop every queued job
  // (counted in StopReport::dropped), then join the workers.
  kAbandon,
  // Stop intake, let running jobs finish (up to snapshot.exit_deadline), then
  // write a durable disk snapshot of every job left (queued jobs stay queued
  // in it) and join the workers. The next open() of the same directory
  // resumes exactly those jobs. Needs snapshots with a disk store.
  kSnapshotAndExit,
};

enum class EngineState : std::uint8_t { kOpen, kRunning, kStopping, kStopped };

std::string_view engine_state_name(EngineState state) noexcept;

// One job of a submit_batch() call.
struct JobSpec {
  HandlerId handler = 0;
  std::string_view payload;
  SubmitOptions options;
};

// A snapshot candidate recovery looked at and did not take.
struct SkippedSnapshot {
  std::string source;   // "shm:<name>" or the file's path
  std::uint64_t offset = 0;  // byte offset of the first problem (0 if none applies)
  std::string reason;   // what was wrong
};

// What recovery found at open() and restored at start().
struct RecoveryReport {
  bool recovered = false;       // a snapshot was loaded
  std::string source;           // "shm:<name>" or the file path it came from
  std::string why;              // why that one (e.g. "newest valid: generation 12")
  std::uint64_t generation = 0;
  std::chrono::system_clock::time_point taken_at;  // the snapshot's wall time
  std::vector<SkippedSnapshot> skipped;  // newer candidates that did not verify
  std::uint64_t pending = 0;        // jobs queued again as they were
  std::uint64_t running_at_cut = 0; // jobs that were running: queued again, recoveries + 1
  std::uint64_t poisoned = 0;       // quarantined as dead: past max_recoveries
  std::uint64_t unknown_handler = 0;  // kept as dead: their handler is not registered
  std::uint64_t dead = 0;           // dead in the snapshot and still dead
};

// What start() reports.
struct StartReport {
  unsigned workers = 0;          // worker threads started
  std::vector<int> pinned_cpus;  // cpus[i] for worker i; empty when unpinned
  RecoveryReport recovery;       // empty unless snapshots are enabled
};

// One snapshot written.
struct SnapshotInfo {
  std::uint64_t generation = 0;
  std::uint64_t jobs = 0;       // job records in it (dead ones included)
  std::uint64_t bytes = 0;
  std::string path;             // the disk file, when written to disk
  std::chrono::nanoseconds took{0};  // cut + encode + publish
};

// What stop() reports. The counts cover the engine's whole life.
struct StopReport {
  std::uint64_t submitted = 0;  // jobs accepted by submit()/submit_batch()
  std::uint64_t done = 0;       // jobs whose handler returned kDone
  std::uint64_t failed = 0;     // jobs that failed for good (kFail or attempts used up)
  std::uint64_t dropped = 0;    // queued jobs dropped by kAbandon
  std::uint64_t recovered = 0;  // jobs restored from a snapshot at start()
  std::uint64_t left_in_snapshot = 0;  // kSnapshotAndExit: jobs in the final snapshot
  std::chrono::nanoseconds took{0};  // how long stop() took
};

// The engine's health and basic counters, read without locks. Cheap enough to
// poll every millisecond (it reads one padded counter block per worker and per
// submitting thread).
struct Health {
  bool ok = false;                              // running, and every worker alive
  std::chrono::system_clock::time_point checked_at;
  EngineState state = EngineState::kOpen;
  std::uint64_t depth[kPriorityLevels] = {};    // queued (not running) jobs per level, approximate
  std::uint64_t pending = 0;                    // accepted and not yet finished, running included
  std::uint64_t running = 0;                    // jobs inside a handler right now
  unsigned workers = 0;                         // configured
  unsigned workers_alive = 0;                   // started and not exited
  std::uint64_t submitted = 0;
  std::uint64_t rejected = 0;                   // submits refused with kQueueFull
  std::uint64_t done = 0;
  std::uint64_t retried = 0;                    // kRetry outcomes and exceptions that were re-queued
  std::uint64_t failed = 0;
  std::uint64_t exceptions = 0;                 // handler calls that threw
  std::uint64_t dropped = 0;
  std::uint64_t recovered = 0;                  // restored from a snapshot at start()
  std::size_t capacity = 0;
  // Snapshots (zero / empty when disabled).
  std::uint64_t last_snapshot_generation = 0;   // newest published anywhere
  std::chrono::nanoseconds last_snapshot_age{0};      // since its cut
  std::chrono::nanoseconds last_snapshot_duration{0};
  std::uint64_t last_snapshot_bytes = 0;
  std::uint64_t last_durable_generation = 0;    // newest on disk
  std::chrono::nanoseconds last_durable_age{0};
  std::string last_snapshot_error;              // empty when the last attempt succeeded
  std::uint64_t snapshot_failures = 0;
  // Jobs accepted since the newest durable snapshot's cut: what power loss
  // could lose now (approximate).
  std::uint64_t at_risk = 0;
};

class Engine {
 public:
  // Validates the options, allocates and touches the job table and queues,
  // and, with snapshots enabled, opens the stores (locking the directory) and
  // loads the newest snapshot that verifies (restored by start()). Starts no
  // thread. kInvalidArgument names a bad option; kFailedPrecondition when
  // another engine holds the directory; kIoError when a store cannot be opened.
  static Result<Engine> open(EngineOptions options);

  Engine(Engine&&) noexcept;
  Engine& operator=(Engine&&) noexcept;
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;
  // Stops a running engine with kDrain and joins its threads.
  ~Engine();

  // Registers `handler` under `name` (1..255 bytes, stable across restarts:
  // snapshots store it). Only before start(): kFailedPrecondition after.
  // kAlreadyExists for a name taken; kInvalidArgument for a bad name or an
  // empty handler. Not thread-safe with other calls.
  Result<HandlerId> register_handler(std::string_view name, Handler handler);

  // The id of a registered handler, or kNotFound. Thread-safe after start().
  Result<HandlerId> handler_id(std::string_view name) const;

  // Starts the workers (pinned to options.cpus when given) and returns once
  // every one of them runs, so health().ok holds on return. kFailedPrecondition
  // unless the engine is open and not started; kIoError when a thread cannot be
  // created or pinned (the engine is then stopped again).
  Result<StartReport> start();

  // Submits one job. Thread-safe, lock-free; does not allocate for payloads up
  // to kInlinePayloadBytes (after the calling thread's first submit). Errors:
  // kStopped (not running), kNotFound (unknown handler), kInvalidArgument (bad
  // priority), kPayloadTooLarge, kQueueFull (table full; returned at once).
  Result<JobId> submit(HandlerId handler, std::string_view payload, SubmitOptions options = {});
  // The same, looking the handler up by name (a hash lookup).
  Result<JobId> submit(std::string_view handler_name, std::string_view payload,
                       SubmitOptions options = {});

  // Submits every job of `jobs` or none of them (the first invalid job, or too
  // few free slots, fails the whole batch and accepts nothing). On success the
  // ids are written to `ids` when it is non-empty (it must then hold
  // jobs.size() entries) and the count is returned. Thread-safe; one bulk
  // enqueue per priority level present in the batch.
  Result<std::size_t> submit_batch(std::span<const JobSpec> jobs, std::span<JobId> ids = {});

  // Stops intake (later submits get kStopped), then drains, abandons or
  // snapshots the queue as `mode` says and joins the workers and the snapshot
  // thread. Returns what the engine did.
  // kFailedPrecondition if the engine was never started or is already stopped.
  // Must not be called from a handler.
  Result<StopReport> stop(StopMode mode = StopMode::kDrain);

  // Takes a snapshot now and writes it to disk; returns once the file and its
  // directory entry are durable. Thread-safe (concurrent calls may share one
  // snapshot). kFailedPrecondition without a disk store or when not running;
  // kIoError when the publish failed (the previous generation stays valid).
  Result<SnapshotInfo> snapshot_now();

  // Thread-safe, lock-free. Allocates only for last_snapshot_error's text.
  Health health() const;

  EngineState state() const noexcept;
  const EngineOptions& options() const noexcept;

  class Impl;

 private:
  explicit Engine(std::unique_ptr<Impl> impl) noexcept;
  std::unique_ptr<Impl> impl_;
};

}  // namespace jobengine
