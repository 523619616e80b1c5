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
#include <limits>
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
  // Stop intake, run every job already queued (and retries that requeue at
  // once or fall due meanwhile), then join the workers. Delayed jobs and
  // retries in backoff that are not due yet are not waited for: with a disk
  // store they are in the final snapshot (the next start runs them on
  // time), without one they are lost with the engine; StopReport::delayed_left
  // counts them.
  kDrain,
  // Stop intake, let the jobs already running finish, drop every queued job
  // (counted in StopReport::dropped, as is a job whose end a worker has no
  // memory to record: see Health::memory_waits), then join the workers.
  kAbandon,
  // Stop intake, let running jobs finish (up to snapshot.exit_deadline), then
  // write a durable disk snapshot of every job left (queued jobs stay queued
  // in it) and join the workers. The next open() of the same directory
  // resumes exactly those jobs. Needs snapshots with a disk store.
  kSnapshotAndExit,
};

enum class EngineState : std::uint8_t { kOpen, kRunning, kStopping, kStopped };

std::string_view engine_state_name(EngineState state) noexcept;

// One job of a submit_batch() call. Of its options, submit_batch() takes
// the priority only: a delay, run_at, deadline or unique key fails the whole
// batch with kInvalidArgument (submit() each such job instead).
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
  // Why that one, e.g. "newest snapshot that verifies (generation 12, 340 jobs);
  // skipped 1 that did not", or "no snapshot found: starting empty".
  std::string why;
  std::uint64_t generation = 0;
  std::chrono::system_clock::time_point taken_at;  // the snapshot's wall time
  std::vector<SkippedSnapshot> skipped;  // newer candidates that did not verify
  std::uint64_t pending = 0;        // jobs queued again as they were
  std::uint64_t delayed = 0;        // delayed or waiting to retry: back in the scheduler
  std::uint64_t running_at_cut = 0; // jobs that were running: queued again, recoveries + 1
  // Jobs a worker was running when the process died (the live record, kept in
  // the snapshot directory): recoveries + 1, once for a job also running at
  // the cut. Also counted in pending/delayed/running_at_cut.
  std::uint64_t running_at_crash = 0;
  std::uint64_t cancelled = 0;      // running at the cut with a cancel requested: not run again
  std::uint64_t poisoned = 0;       // quarantined as dead: past max_recoveries
  std::uint64_t unknown_handler = 0;  // kept as dead: their handler is not registered
  std::uint64_t dead = 0;           // dead in the snapshot and still dead (failed letters past
                                    // max_dead among them are then discarded: Health::dead_discarded)
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
  // Of those, the jobs a restart from it resumes: not dead letters, nor jobs
  // cancel() had reached (recovery counts those cancelled).
  std::uint64_t resumable_jobs = 0;
  std::uint64_t bytes = 0;
  std::string path;             // the disk file, when written to disk
  std::chrono::nanoseconds took{0};  // cut + encode + publish
};

// What stop() reports. The counts cover the engine's whole life.
struct StopReport {
  std::uint64_t submitted = 0;  // jobs accepted by submit()/submit_batch()
  std::uint64_t done = 0;       // jobs whose handler returned kDone
  std::uint64_t failed = 0;     // jobs that failed for good (kFail or attempts used up)
  std::uint64_t cancelled = 0;  // jobs cancel() stopped (never ran, or ran and saw it)
  std::uint64_t dropped = 0;    // queued jobs dropped by kAbandon (delayed ones included;
                                // also a job whose end a worker had no memory to record)
  // kDrain: delayed jobs and retries in backoff not yet due when the drain
  // finished, so not run. With a disk store they are in the final snapshot
  // (the next start runs them on time) unless final_snapshot says it failed;
  // without one they are lost with the engine, and counted here.
  std::uint64_t delayed_left = 0;
  std::uint64_t recovered = 0;  // jobs restored from a snapshot at start()
  // kSnapshotAndExit: the jobs the final snapshot holds that a restart
  // resumes (SnapshotInfo::resumable_jobs: its dead letters and the jobs
  // cancel() reached are in it too, and not counted here).
  std::uint64_t left_in_snapshot = 0;
  std::chrono::nanoseconds took{0};  // how long stop() took
  // Whether the final snapshot of kDrain or kAbandon was written. OK when it
  // was, and when there is none to write (snapshots not enabled). Otherwise
  // the error of the store that did not take it (kIoError for a failed disk
  // write, ...): the engine is stopped all the same. A store that failed
  // still holds the previous generation: when it is the disk, a restart
  // recovers that one (jobs finished or dropped since then come back; the
  // delayed jobs left by a drain are not in it) -- unless a shared-memory
  // segment took the final snapshot, which it keeps until a reboot. It is
  // also logged and stays in Health::last_snapshot_error. kSnapshotAndExit
  // never reports a failed final snapshot here: stop() returns the error.
  Status final_snapshot;
};

// What cancel() did.
enum class CancelResult : std::uint8_t {
  // The job was queued, delayed or waiting to retry: it will never run (again).
  kCancelled,
  // The job was running or just starting (it may even have finished by the
  // time cancel() returns): JobContext::cancelled() is now true for it; if it
  // had not started yet it will not run. It is not retried.
  kCancelRequested,
};
std::string_view cancel_result_name(CancelResult r) noexcept;

// Why a dead letter is dead.
enum class DeadReason : std::uint8_t {
  kFailed = 1,     // kFail, or its attempts ran out (error says the last error)
  kPoison = 2,     // interrupted by more than max_recoveries crashes (running at a cut or at the crash)
  kNoHandler = 3,  // its handler was not registered when it was recovered
};
std::string_view dead_reason_name(DeadReason r) noexcept;

// One dead job (Engine::dead_letters()).
struct DeadLetter {
  JobId id = 0;
  std::string handler;
  std::uint8_t priority = 0;
  std::uint32_t attempts = 0;
  std::uint32_t recoveries = 0;
  DeadReason reason = DeadReason::kFailed;
  std::string error;
  std::string payload;
  std::chrono::system_clock::time_point submitted_at;
  std::chrono::system_clock::time_point died_at;
};

// The engine's health and basic counters, read without locks. Cheap enough to
// poll every millisecond (it reads one padded counter block per worker and per
// submitting thread, and allocates only when something is wrong).
struct Health {
  // Running, every worker alive, and none of the problems in `reasons`.
  bool ok = false;
  // Why ok is false, one line each, with the figure behind it: not running,
  // a worker down, a job stuck past its deadline, a worker waiting for
  // memory, the last snapshot failed, the newest snapshot older than twice
  // its interval plus 1 s, dead-letter set growing, pending above the
  // high-water mark. Empty when ok.
  std::vector<std::string> reasons;
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
  std::uint64_t cancelled = 0;
  std::uint64_t delayed = 0;                    // delayed + waiting to retry, in the scheduler
  std::uint64_t dead = 0;                       // dead letters kept now
  std::uint64_t dead_total = 0;                 // jobs that became dead, ever (this process)
  std::uint64_t dead_discarded = 0;             // dead letters evicted past max_dead
  std::uint64_t stuck = 0;                      // jobs running past their deadline now
  std::uint64_t stuck_total = 0;                // runs that ended past their deadline
  // Pauses workers took because memory ran out recording a job's end (its
  // dead letter); a worker waits and tries again rather than end the
  // process. While one waits, `reasons` names it and the job.
  std::uint64_t memory_waits = 0;
  // Age of the oldest queued job, approximated by the oldest job waiting in
  // a worker's dequeued batch (0 when nothing is queued, or when no dequeued
  // job waits: every worker is in the last job of its batch).
  std::chrono::nanoseconds oldest_pending_age{0};
  std::size_t queue_high_water = 0;
  std::size_t capacity = 0;
  // Snapshots (zero / empty when disabled). After a restart, until this
  // process publishes its own, the generation recovery loaded counts as the
  // newest (and as the newest durable one when it came from a generation
  // file, or its twin is on disk), its age counted from start().
  std::uint64_t last_snapshot_generation = 0;   // newest published anywhere
  // Since its cut, or since the snapshot thread last found that nothing had
  // changed since that cut (whichever is later): how old the state it holds
  // may be. Same for last_durable_age.
  std::chrono::nanoseconds last_snapshot_age{0};
  std::chrono::nanoseconds last_snapshot_duration{0};
  std::uint64_t last_snapshot_bytes = 0;
  std::uint64_t last_durable_generation = 0;    // newest on disk
  std::chrono::nanoseconds last_durable_age{0};
  // Periodic snapshots not written because no job had changed since the
  // stores' last ones (an idle engine writes none; snapshot_now() and the
  // final snapshot always write).
  std::uint64_t snapshots_unchanged = 0;
  // Empty when each store's last publish succeeded; else the failing one's
  // error (the disk's first). A shared-memory success does not clear a disk
  // failure, nor the other way round.
  std::string last_snapshot_error;
  std::uint64_t snapshot_failures = 0;          // failed publishes, per store
  // Jobs accepted since the newest durable snapshot's cut: what power loss
  // could lose now (approximate).
  std::uint64_t at_risk = 0;
};

class Engine {
 public:
  // Validates the options, allocates and touches the job table and queues,
  // and, with snapshots enabled, opens the stores (locking the directory) and
  // loads the newest snapshot that verifies (restored by start()). Starts no
  // thread. kInvalidArgument names a bad option (also: no memory for the job
  // table and queues of `capacity`, or a directory holding generation
  // 2^64 - 1); kFailedPrecondition when another engine holds the directory or
  // the segment, or the segment is another uid's; kIoError when a store
  // cannot be opened or the newest snapshot cannot be read (the older ones
  // are not loaded over it); kCorruption for a damaged segment that could
  // not be kept aside; kInternal when memory runs out reading the snapshot.
  // A failed open() changes no snapshot.
  static Result<Engine> open(EngineOptions options);

  Engine(Engine&&) noexcept;
  Engine& operator=(Engine&&) noexcept;
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;
  // Stops a running engine with kDrain and joins its threads.
  ~Engine();

  // Registers `handler` under `name` (1..255 bytes of valid UTF-8, stable
  // across restarts: snapshots store it). Only before start():
  // kFailedPrecondition after. kAlreadyExists for a name taken;
  // kInvalidArgument for a bad name (too long, empty, not UTF-8) or an empty
  // handler; kFailedPrecondition past kMaxHandlers (32768) handlers.
  // Not thread-safe with other calls.
  Result<HandlerId> register_handler(std::string_view name, Handler handler);
  // The same with per-handler retry policy, attempts and deadline.
  // kInvalidArgument names a bad option.
  Result<HandlerId> register_handler(std::string_view name, Handler handler,
                                     const HandlerOptions& options);

  // The id of a registered handler, or kNotFound. Thread-safe after start().
  Result<HandlerId> handler_id(std::string_view name) const;

  // Starts the workers (pinned to options.cpus when given) and returns once
  // every one of them runs, so health().ok holds on return unless recovery
  // gave a reason (a job quarantined as poison or left without its handler
  // just now is dead-letter growth; more jobs restored than queue_high_water;
  // a stop() from another thread). kFailedPrecondition
  // unless the engine is open and not started; kIoError when a thread cannot be
  // created or pinned; kInternal when memory runs out making the threads'
  // queue producers (all made here, before any thread runs). Any failure,
  // restoring the recovered snapshot's jobs included, leaves the engine
  // stopped: open a new one (the snapshot it recovered from is untouched).
  Result<StartReport> start();

  // Submits one job. Thread-safe, lock-free; does not allocate for payloads up
  // to kInlinePayloadBytes (after the calling thread's first submit). Errors:
  // kStopped (not running), kNotFound (unknown handler), kInvalidArgument (bad
  // priority), kPayloadTooLarge, kQueueFull (table full; returned at once),
  // kInternal (out of memory: at a thread's first submit, making its queue
  // producers, or growing a queue; nothing accepted, a later submit retries).
  Result<JobId> submit(HandlerId handler, std::string_view payload, SubmitOptions options);
  // The same with default options (normal priority, no delay, deadline or
  // key): the shortest path, for the hottest callers.
  Result<JobId> submit(HandlerId handler, std::string_view payload);
  // The same, looking the handler up by name (a hash lookup).
  Result<JobId> submit(std::string_view handler_name, std::string_view payload,
                       SubmitOptions options = {});

  // Submits every job of `jobs` or none of them (the first invalid job, or too
  // few free slots, fails the whole batch and accepts nothing; a batch of more
  // jobs than `capacity` is kInvalidArgument, not kQueueFull, since no retry
  // can ever fit it). On success the
  // ids are written to `ids` when it is non-empty (it must then hold
  // jobs.size() entries) and the count is returned. Thread-safe; one bulk
  // enqueue per priority level present in the batch, highest priority first.
  // One exception to all-or-none: when memory runs out growing a queue
  // (kInternal), a batch that mixes priorities keeps the jobs at the levels
  // already queued (they run; the error says how many, and `ids` holds their
  // ids); the others are not accepted, their slots are free again and their
  // entries of `ids` read 0. Retry only those (an id of 0), never the batch.
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
  // kIoError when the disk publish failed (the previous generation stays
  // valid); kInternal when memory ran out encoding the image (nothing was
  // published; the stores keep their images). A shared-memory failure of the
  // same snapshot does not fail it (the generation is durable): it is logged
  // and shown in health().
  Result<SnapshotInfo> snapshot_now();

  // Cancels a pending job (queued, delayed, waiting to retry: it never runs)
  // or asks a running one to stop (JobContext::cancelled()). Thread-safe.
  // O(1) through the job table's id hints (engine/job_table.h): ~0.1 us for a
  // job that already finished, tens of us for a delayed one (a heavy fence and
  // the scheduler's wake-up). Only an id that no hint names any more (more
  // than `capacity` submits old, or never issued) costs a scan of the regions
  // of the table with slots in use (about the pending jobs, not the capacity),
  // memory-bound: ~0.4 ms per 64k slots, ~17 ms per 1M. A cancelled job's
  // unique key is freed in O(1) too (by id; every pending key was scanned
  // before: ~40 ms with 200k keyed jobs pending). kNotFound when no
  // pending job has that id (finished, dead, or never existed);
  // kFailedPrecondition when the engine is neither running nor stopping.
  Result<CancelResult> cancel(JobId id);

  // The dead letters, oldest first (at most `limit`). Thread-safe (a lock;
  // copies payloads).
  std::vector<DeadLetter> dead_letters(std::size_t limit = SIZE_MAX) const;
  // Moves a dead job back to its queue as a fresh job with the same id
  // (attempts and recoveries reset), with its own unique key (taken again)
  // and deadline. kNotFound: no dead letter with that id; kNotFound too when
  // its handler is not registered; kAlreadyExists when another pending job
  // holds its key (the letter stays); kQueueFull, kStopped, kPayloadTooLarge
  // (max_payload lowered since it died), kInternal as for submit(), each
  // naming the call and the job (the letter stays).
  Result<JobId> requeue_dead(JobId id);
  // Discards a dead letter. kNotFound when there is none with that id.
  Status drop_dead(JobId id);

  // Thread-safe, lock-free. Allocates only for last_snapshot_error's text and
  // the reasons when not ok.
  Health health() const;

  // Counters per handler (submitted, started, done, retried, failed, dead,
  // cancelled, stuck), engine-wide counters (rejected, exceptions, dropped,
  // recovered, worker memory waits), gauges (pending per priority, delayed,
  // running, dead, stuck, oldest pending age, capacity, workers, workers
  // alive, up; with snapshots their generation, age, duration, bytes,
  // durable age, and failures and unchanged counts), latency histograms per
  // handler (queue wait, run time; p50/p90/p99/p99.9/max) and the scheduler's
  // lateness histogram, in the Prometheus text exposition format (version
  // 0.0.4), or as one JSON object (README.md, "Observability", names the
  // series). Thread-safe; merges every worker's histograms (a few KiB per
  // worker and handler).
  std::string metrics_text() const;
  std::string metrics_json() const;

  EngineState state() const noexcept;
  const EngineOptions& options() const noexcept;

  class Impl;

 private:
  explicit Engine(std::unique_ptr<Impl> impl) noexcept;
  std::unique_ptr<Impl> impl_;
};

}  // namespace jobengine
