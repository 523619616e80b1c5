// The job model: ids, priorities, what a handler receives and returns.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>

namespace jobengine {

// A job's id: unique within an engine's lifetime and, once snapshots restore
// the id counter, across restarts. Never 0.
using JobId = std::uint64_t;

// A registered handler's index, returned by Engine::register_handler(). Stable
// for the lifetime of the Engine (not across restarts: snapshots store names).
using HandlerId = std::uint32_t;

// Most handlers one engine registers. A snapshot names at most 65535 (the
// format's limit, persistence/FORMAT.md): the registered ones, and those of
// dead letters restored from a snapshot whose handler is not registered now.
// Half of it leaves room for the latter.
inline constexpr std::size_t kMaxHandlers = 32768;

// Priority levels: 0 is the most urgent. A worker takes from the most urgent
// non-empty level, with a starvation guard (EngineOptions::fairness_period).
inline constexpr std::uint8_t kPriorityLevels = 3;
inline constexpr std::uint8_t kHighPriority = 0;
inline constexpr std::uint8_t kNormalPriority = 1;
inline constexpr std::uint8_t kLowPriority = 2;

// Payloads up to this size are stored inside the job table: submit() does not
// allocate for them. Larger payloads (up to EngineOptions::max_payload) are
// copied to the heap.
inline constexpr std::size_t kInlinePayloadBytes = 192;

// Bytes each job-table slot takes: a 64-byte header and the inline payload.
inline constexpr std::size_t kSlotBytes = 64 + kInlinePayloadBytes;

// Free slots a submitting thread keeps at hand, so that taking a slot is
// usually a thread-local operation, and the shared pool is touched once per
// 64 submits (its compare-and-swap waits for the submitter's store buffer to
// drain, which costs more than the rest of a submit). See
// EngineOptions::capacity.
inline constexpr std::size_t kSlotCacheSize = 64;

// Longest unique key (SubmitOptions::unique_key), in bytes.
inline constexpr std::size_t kMaxUniqueKey = 255;

// Per-job options for submit().
struct SubmitOptions {
  // 0 (kHighPriority) .. kPriorityLevels-1 (kLowPriority). Default normal.
  std::uint8_t priority = kNormalPriority;

  // Delayed jobs: run no earlier than now + delay, or than run_at (wall
  // clock; the default epoch value means "not set"). Giving both is
  // kInvalidArgument; a run_at in the past runs at once. A delayed job waits
  // in the scheduler (not in a queue) and is snapshotted as delayed.
  std::chrono::nanoseconds delay{0};
  std::chrono::system_clock::time_point run_at{};

  // Most one run of this job may take before it counts as stuck (health()
  // reports it, the stuck counter counts it; the handler is not interrupted,
  // and can read it from JobContext::deadline()). 0: the handler's deadline,
  // else EngineOptions::run_deadline, else none.
  std::chrono::nanoseconds deadline{0};

  // Unique key (1..kMaxUniqueKey bytes; empty = none): while a job submitted
  // with this key is pending (queued, delayed, running or waiting to retry),
  // submitting another one with the same key accepts nothing and returns the
  // first job's id. The key is free again once that job finishes, dies or is
  // cancelled. Keyed submits take a lock; a job with a key or its own deadline
  // keeps them (and its payload) in one heap block.
  std::string_view unique_key{};
};

// What a handler tells the engine about the job it just ran.
enum class Outcome : std::uint8_t {
  kDone,   // finished; the job is retired
  kRetry,  // run it again after the retry backoff unless its attempts are used up
  kFail,   // failed for good: the job becomes dead (see Engine::dead_letters())
};

// What a handler sees of the job it runs. Valid only during the handler call:
// the payload view dangles once the handler returns.
class JobContext {
 public:
  // Built by the engine's workers. `cancel_word` is the job's id word, whose
  // top bit a cancel() sets.
  JobContext(JobId id, HandlerId handler, std::string_view handler_name, std::string_view payload,
             std::uint32_t attempt, std::uint8_t priority, std::uint64_t submit_ticks,
             const void* cancel_word = nullptr, std::uint64_t deadline_ticks = 0) noexcept
      : id_(id),
        handler_(handler),
        handler_name_(handler_name),
        payload_(payload),
        attempt_(attempt),
        priority_(priority),
        submit_ticks_(submit_ticks),
        cancel_word_(cancel_word),
        deadline_ticks_(deadline_ticks) {}

  JobId id() const noexcept { return id_; }
  HandlerId handler() const noexcept { return handler_; }
  std::string_view handler_name() const noexcept { return handler_name_; }
  // The bytes given to submit(). Empty payloads are allowed.
  std::string_view payload() const noexcept { return payload_; }
  // 1 on the first run, 2 on the first retry, and so on.
  std::uint32_t attempt() const noexcept { return attempt_; }
  std::uint8_t priority() const noexcept { return priority_; }
  // When submit() accepted the job, on steady_clock's timeline (converted
  // from the engine's cheap clock on request: within microseconds of what
  // steady_clock::now() read at submit).
  std::chrono::steady_clock::time_point submitted_at() const noexcept;

  // True once Engine::cancel() reached this job. Cancellation is
  // cooperative: a long handler should poll this and return (any outcome;
  // a cancelled job is never retried and counts as cancelled).
  bool cancelled() const noexcept;

  // When this run counts as stuck (steady_clock), or time_point::max() when
  // the job has no deadline (SubmitOptions::deadline, HandlerOptions, EngineOptions).
  std::chrono::steady_clock::time_point deadline() const noexcept;

  // For kRetry: wait this long before the next attempt instead of the retry
  // policy's backoff (0 = at once). Negative values count as 0.
  void retry_after(std::chrono::nanoseconds delay) noexcept {
    retry_after_ = delay;
    has_retry_after_ = true;
  }
  // The error recorded with the attempt (kept with the job if it dies).
  // Default for kRetry/kFail: "handler returned kRetry"/"...kFail"; for an
  // exception, its what().
  void set_error(std::string_view error) {
    if (!error_) error_ = std::make_unique<std::string>();
    error_->assign(error.substr(0, 4096));
  }

  // Engine side.
  bool has_retry_after() const noexcept { return has_retry_after_; }
  std::chrono::nanoseconds retry_after_delay() const noexcept { return retry_after_; }
  const std::string& error() const noexcept {
    static const std::string none;
    return error_ ? *error_ : none;
  }

 private:
  JobId id_;
  HandlerId handler_;
  std::string_view handler_name_;
  std::string_view payload_;
  std::uint32_t attempt_;
  std::uint8_t priority_;
  std::uint64_t submit_ticks_;
  const void* cancel_word_;
  std::uint64_t deadline_ticks_;
  bool has_retry_after_ = false;
  std::chrono::nanoseconds retry_after_{0};
  // Allocated by the first set_error() only: a context is built and torn
  // down for every job run, and almost none of them fail.
  std::unique_ptr<std::string> error_;
};

// A job handler. Called on a worker thread, possibly on several workers at
// once for different jobs, so it must be thread-safe. An exception it throws
// is caught and counted as a failed attempt (like kRetry, with the exception
// counted and its what() as the error); the worker lives on.
using Handler = std::function<Outcome(JobContext&)>;

// Retry policy: how many attempts, and how long to wait between them. The
// wait before attempt n+1 is min(max_backoff, initial_backoff * multiplier^(n-1)),
// then spread by +-jitter (a fraction: 0.2 = +-20%, uniformly). A wait of 0
// requeues at once; otherwise the job waits in the scheduler
// ("waiting to retry", snapshotted with its run_at).
struct RetryPolicy {
  std::chrono::nanoseconds initial_backoff = std::chrono::milliseconds(10);
  double multiplier = 2.0;    // >= 1
  std::chrono::nanoseconds max_backoff = std::chrono::seconds(10);
  double jitter = 0.2;        // 0..1
};

// Per-handler options (Engine::register_handler). Zero / empty fields take
// the engine-wide value from EngineOptions.
struct HandlerOptions {
  std::uint32_t max_attempts = 0;          // 0: EngineOptions::max_attempts
  bool has_retry_policy = false;           // true: use `retry` below
  RetryPolicy retry;
  std::chrono::nanoseconds deadline{0};    // 0: EngineOptions::run_deadline
};

}  // namespace jobengine
