#include "jobengine/status.h"

#include <cstdio>
#include <cstdlib>

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

std::string Status::to_string() const {
  std::string out(status_code_name(code_));
  if (!message_.empty()) {
    out += ": ";
    out += message_;
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
