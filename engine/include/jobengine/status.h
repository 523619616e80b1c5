// Status and Result: how every fallible jobengine call reports failure.
//
// No exception crosses the public API. A call that can fail returns a
// [[nodiscard]] Status (no value) or Result<T> (a value or a Status). A Status
// carries a code a program can switch on and a message a person can read; the
// message names what was wrong (the handler, the size, the path and errno).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <utility>

namespace jobengine {

enum class StatusCode : std::uint8_t {
  kOk = 0,
  kInvalidArgument,     // the caller passed something malformed (bad option, empty name)
  kNotFound,            // no such handler / job
  kAlreadyExists,       // a handler of that name is registered already
  kQueueFull,           // the job table has no free slot: back off and retry
  kPayloadTooLarge,     // payload larger than EngineOptions::max_payload
  kStopped,             // the engine is stopping or stopped and takes no new work
  kFailedPrecondition,  // the call is not valid in the engine's current state
  kIoError,             // an operating-system call failed (path and errno in the message)
  kCorruption,          // stored data failed a checksum or bound check
  kInternal,            // a bug in jobengine, or memory ran out (see each call's errors)
};

// The code's name as written above without the leading 'k', e.g. "QueueFull";
// "OK" for kOk.
std::string_view status_code_name(StatusCode code) noexcept;

class [[nodiscard]] Status {
 public:
  // The OK status: a null pointer. Never allocates.
  Status() noexcept = default;
  // An error. Allocates its message once (an OK code gives the OK status).
  Status(StatusCode code, std::string message);
  // The representation of an error; one with owned == false can live in
  // static storage and back any number of Status copies without allocating.
  struct Rep {
    StatusCode code;
    bool owned;
    std::string_view message;
  };
  // An error backed by a static Rep (owned == false) that outlives every
  // copy: never allocates. For errors a hot loop can meet (kQueueFull).
  explicit constexpr Status(const Rep& static_rep) noexcept : rep_(&static_rep) {}

  Status(const Status& other);
  Status& operator=(const Status& other);
  Status(Status&& other) noexcept : rep_(other.rep_) { other.rep_ = nullptr; }
  Status& operator=(Status&& other) noexcept;
  // The OK test is inline: every submit() destroys an OK Status, and an
  // out-of-line call there cost a call's stores on a path bound by its stores.
  ~Status() {
    if (rep_ != nullptr) release();
  }

  static Status ok_status() noexcept { return Status(); }

  bool ok() const noexcept { return rep_ == nullptr; }
  StatusCode code() const noexcept { return rep_ == nullptr ? StatusCode::kOk : rep_->code; }
  // Empty for OK.
  std::string_view message() const noexcept {
    return rep_ == nullptr ? std::string_view() : rep_->message;
  }
  // "QueueFull: job table full", or "OK".
  std::string to_string() const;

  friend bool operator==(const Status& a, const Status& b) noexcept {
    return a.code() == b.code() && a.message() == b.message();
  }

 private:
  // One word, like leveldb's Status: null means OK, so the success path of
  // every call copies and destroys a pointer and nothing else.
  void release() noexcept;
  static const Rep* copy(const Rep* rep);
  const Rep* rep_ = nullptr;
};

namespace detail {
// Called when a program reads the value of a failed Result: a bug in the
// caller. Prints the status to stderr and aborts (no exception may escape).
[[noreturn]] void die_on_bad_result_access(const Status& status) noexcept;
}  // namespace detail

// A value of type T, or the Status saying why there is none.
inline constexpr Status::Rep kOkWithoutValue{StatusCode::kInternal, false,
                                             "Result built from an OK status without a value"};

template <typename T>
class [[nodiscard]] Result {
 public:
  Result(T value) : value_(std::move(value)) {}  // NOLINT: implicit by design
  Result(Status status) : status_(std::move(status)) {  // NOLINT: implicit by design
    if (status_.ok()) status_ = Status(kOkWithoutValue);
  }

  bool ok() const noexcept { return value_.has_value(); }
  explicit operator bool() const noexcept { return ok(); }
  // OK when a value is held.
  const Status& status() const noexcept { return status_; }

  // Reading the value of a failed Result aborts the process with its status.
  T& value() & {
    if (!value_) detail::die_on_bad_result_access(status_);
    return *value_;
  }
  const T& value() const& {
    if (!value_) detail::die_on_bad_result_access(status_);
    return *value_;
  }
  T&& value() && {
    if (!value_) detail::die_on_bad_result_access(status_);
    return std::move(*value_);
  }
  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }
  T&& operator*() && { return std::move(*this).value(); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }

 private:
  std::optional<T> value_;
  Status status_;
};

}  // namespace jobengine
