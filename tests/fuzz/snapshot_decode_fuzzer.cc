// libFuzzer target for the snapshot image decoder (persistence/FORMAT.md).
//
// Decodes arbitrary bytes twice: with checksums (what recovery and jobsnap
// do) and without (so mutations reach the record parser past the checksums).
// A successful decode must describe only bytes inside the input, and must
// re-encode to an image that decodes to the same jobs. verify() (recovery's
// decoder: image checksum first, records not materialized) must agree with
// the strict decode: the same failure text when it fails, and, read back with
// a RecordReader, the same records when decode() succeeds.
//
// Build: cmake --preset fuzz && cmake --build --preset fuzz
// Run:   tools/fuzz.sh (or: mkdir -p CORPUS && build/fuzz/tests/fuzz/snapshot_decode_fuzzer
//            -max_total_time=3600 CORPUS tests/persistence/golden: the first directory
//            is where libFuzzer writes what it finds, so never name the golden one first)
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

void differential(std::span<const unsigned char> image) {
  jobengine::snapshot::DecodeError derr, verr;
  auto strict = jobengine::snapshot::decode(image, &derr);
  auto verified = jobengine::snapshot::verify(image, &verr);
  if (!verified.ok()) {
    check(!strict.ok());
    check(verified.status().to_string() == strict.status().to_string());
    check(verr.problem == derr.problem && verr.offset == derr.offset);
    return;
  }
  check(verified->jobs.empty());
  jobengine::snapshot::RecordReader reader(image, *verified);
  jobengine::snapshot::JobRecordView j;
  std::size_t n = 0;
  std::uint64_t live = 0;
  while (reader.next(j)) {
    check(inside(image, j.payload) && inside(image, j.error) && inside(image, j.key));
    check(j.handler < verified->handlers.size());
    if (j.state != jobengine::snapshot::JobState::kDead && !j.cancel_requested) ++live;
    check(j.payload.size() <= verified->max_payload_bytes);
    if (strict.ok()) {
      check(n < strict->jobs.size());
      const auto& s = strict->jobs[n];
      check(s.id == j.id && s.offset == j.offset && s.payload == j.payload && s.error == j.error &&
            s.key == j.key && s.state == j.state && s.attempts == j.attempts &&
            s.run_at_ns == j.run_at_ns && s.dead_reason == j.dead_reason);
    }
    ++n;
  }
  check(n == verified->header.job_count);
  check(live == verified->live_records);
  if (strict.ok()) check(n == strict->jobs.size());
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::span<const unsigned char> image(data, size);
  exercise(image, /*verify=*/true);
  exercise(image, /*verify=*/false);
  differential(image);
  return 0;
}
