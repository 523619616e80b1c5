#include "jobengine/status.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <new>

namespace jobengine {

std::string_view status_code_name(StatusCode code) noexcept {
  switch (code) {
    case StatusCode::kOk: return "OK";
    case StatusCode::kInvalidArgument: return "InvalidArgument";
    case StatusCode::kNotFound: return "NotFound";
    case StatusCode::kAlreadyExists: return "AlreadyExists";
    case StatusCode::kQueueFull: return "QueueFull";
    case StatusCode::kPayloadTooLarge: return "PayloadTooLarge";
    case StatusCode::kStopped: return "Stopped";
    case StatusCode::kFailedPrecondition: return "FailedPrecondition";
    case StatusCode::kIoError: return "IoError";
    case StatusCode::kCorruption: return "Corruption";
    case StatusCode::kInternal: return "Internal";
  }
  return "Unknown";
}

Status::Status(StatusCode code, std::string message) {
  if (code == StatusCode::kOk) return;
  char* block = static_cast<char*>(::operator new(sizeof(Rep) + message.size()));
  char* text = block + sizeof(Rep);
  if (!message.empty()) std::memcpy(text, message.data(), message.size());
  rep_ = new (block) Rep{code, true, std::string_view(text, message.size())};
}

const Status::Rep* Status::copy(const Rep* rep) {
  if (rep == nullptr || !rep->owned) return rep;
  Status fresh(rep->code, std::string(rep->message));
  const Rep* out = fresh.rep_;
  fresh.rep_ = nullptr;
  return out;
}

void Status::release() noexcept {
  if (rep_ != nullptr && rep_->owned) {
    rep_->~Rep();
    ::operator delete(const_cast<Rep*>(rep_));
  }
  rep_ = nullptr;
}

Status::Status(const Status& other) : rep_(copy(other.rep_)) {}

Status& Status::operator=(const Status& other) {
  if (this != &other) {
    const Rep* fresh = copy(other.rep_);
    release();
    rep_ = fresh;
  }
  return *this;
}

Status& Status::operator=(Status&& other) noexcept {
  if (this != &other) {
    release();
    rep_ = other.rep_;
    other.rep_ = nullptr;
  }
  return *this;
}

std::string Status::to_string() const {
  std::string out(status_code_name(code()));
  if (!message().empty()) {
    out += ": ";
    out += message();
  }
  return out;
}

namespace detail {
void die_on_bad_result_access(const Status& status) noexcept {
  std::fprintf(stderr, "jobengine: value() of a failed Result: %s\n", status.to_string().c_str());
  std::abort();
}
}  // namespace detail

}  // namespace jobengine
