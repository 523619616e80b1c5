// The job model: ids, priorities, what a handler receives and returns.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <string_view>

namespace jobengine {

// A job's id: unique within an engine's lifetime and, once snapshots restore
// the id counter, across restarts. Never 0.
using JobId = std::uint64_t;

// A registered handler's index, returned by Engine::register_handler(). Stable
// for the lifetime of the Engine (not across restarts: snapshots store names).
using HandlerId = std::uint32_t;

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
// usually a thread-local operation. See EngineOptions::capacity.
inline constexpr std::size_t kSlotCacheSize = 32;

// Per-job options for submit().
struct SubmitOptions {
  // 0 (kHighPriority) .. kPriorityLevels-1 (kLowPriority). Default normal.
  std::uint8_t priority = kNormalPriority;
};

// What a handler tells the engine about the job it just ran.
enum class Outcome : std::uint8_t {
  kDone,   // finished; the job is retired
  kRetry,  // run it again (queued at once) unless max_attempts is reached
  kFail,   // failed for good; counted as failed and retired
};

// What a handler sees of the job it runs. Valid only during the handler call:
// the payload view dangles once the handler returns.
class JobContext {
 public:
  // Built by the engine's workers.
  JobContext(JobId id, HandlerId handler, std::string_view handler_name, std::string_view payload,
             std::uint32_t attempt, std::uint8_t priority, std::uint64_t submit_ticks) noexcept
      : id_(id),
        handler_(handler),
        handler_name_(handler_name),
        payload_(payload),
        attempt_(attempt),
        priority_(priority),
        submit_ticks_(submit_ticks) {}

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

 private:
  JobId id_;
  HandlerId handler_;
  std::string_view handler_name_;
  std::string_view payload_;
  std::uint32_t attempt_;
  std::uint8_t priority_;
  std::uint64_t submit_ticks_;
};

// A job handler. Called on a worker thread, possibly on several workers at
// once for different jobs, so it must be thread-safe. An exception it throws
// is caught and counted as a failed attempt (like kRetry, with the exception
// counted); the worker lives on.
using Handler = std::function<Outcome(JobContext&)>;

}  // namespace jobengine
