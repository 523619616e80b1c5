// libFuzzer target for the snapshot image decoder (persistence/FORMAT.md).
//
// Decodes arbitrary bytes twice: with checksums (what recovery and jobsnap
// do) and without (so mutations reach the record parser past the checksums).
// A successful decode must describe only bytes inside the input, and must
// re-encode to an image that decodes to the same jobs.
//
// Build: cmake --preset fuzz && cmake --build --preset fuzz
// Run:   build/fuzz/tests/fuzz/snapshot_decode_fuzzer -max_total_time=3600 \
//            tests/persistence/golden
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <span>

#include "jobengine/snapshot_format.h"

namespace {

void check(bool ok) {
  if (!ok) std::abort();
}

bool inside(std::span<const unsigned char> image, std::string_view v) {
  if (v.empty()) return true;
  const auto* b = reinterpret_cast<const unsigned char*>(v.data());
  return b >= image.data() && b + v.size() <= image.data() + image.size();
}

void exercise(std::span<const unsigned char> image, bool verify) {
  jobengine::snapshot::DecodeError err;
  auto view = jobengine::snapshot::decode(image, &err, verify);
  if (!view.ok()) {
    check(err.problem != jobengine::snapshot::Problem::kNone);
    check(err.offset <= image.size() + 16);
    return;
  }
  check(view->jobs.size() == view->header.job_count);
  check(view->handlers.size() == view->header.handler_count);
  for (auto name : view->handlers) check(inside(image, name));
  jobengine::snapshot::Encoder e;
  e.begin(view->header);
  for (auto name : view->handlers) e.add_handler(name);
  for (const auto& j : view->jobs) {
    check(inside(image, j.payload) && inside(image, j.error));
    check(j.handler < view->handlers.size());
    e.add_job(j);
  }
  auto again = jobengine::snapshot::decode(e.finish());
  check(again.ok());
  check(again->jobs.size() == view->jobs.size());
  for (std::size_t i = 0; i < again->jobs.size(); ++i) {
    check(again->jobs[i].id == view->jobs[i].id);
    check(again->jobs[i].payload == view->jobs[i].payload);
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::span<const unsigned char> image(data, size);
  exercise(image, /*verify=*/true);
  exercise(image, /*verify=*/false);
  return 0;
}
