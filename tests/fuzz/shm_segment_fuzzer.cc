// libFuzzer target for the shared-memory segment parser (persistence/
// shm_store.h, "Segment layout"): the control block, the slot descriptors and
// the active image, as a recovering engine or a reader meets them in a
// segment another process left behind.
//
// Each input is the whole content of a segment. It is checked three ways:
//  1. ShmStore::parse_segment() on the bytes, with the image checksum and
//     without it (so that mutations reach the descriptors and the snapshot
//     decoder behind them); an accepted image must lie inside the input.
//  2. The same bytes as a real segment in /dev/shm (created 0600, O_EXCL):
//     ShmStore::read_existing() must agree with parse_segment() (same status
//     code, same image), and must return, never hang.
//  3. ShmStore::open_or_create() attaching to it as the writer: it either
//     refuses the segment (never crashes) or, once attached, publishes an
//     image that read_active() and read_existing() return intact.
//
// Build: cmake --preset fuzz && cmake --build --preset fuzz
// Run:   tools/fuzz.sh [seconds]   (tests/HARDENING.md); the seed corpus
//        (build/fuzz/tests/fuzz/shm-seeds) holds segments made from the golden
//        snapshot images by shm_seed_maker.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <span>
#include <string>
#include <vector>

#include "jobengine/snapshot_format.h"
#include "persistence/shm_store.h"

namespace {

using jobengine::StatusCode;
using jobengine::persist::ShmStore;

// Aborts naming the property that failed, for triage of a crash-* file.
#define FUZZ_CHECK(cond)                                                         \
  do {                                                                           \
    if (!(cond)) {                                                               \
      std::fprintf(stderr, "shm_segment_fuzzer.cc:%d: %s\n", __LINE__, #cond); \
      std::abort();                                                              \
    }                                                                            \
  } while (false)

std::string segment_name() {
  return "jobengine-fuzz-" + std::to_string(::getpid());
}

// Writes `bytes` as the whole content of a fresh segment `name`.
bool make_segment(const std::string& name, std::span<const unsigned char> bytes) {
  (void)::shm_unlink(("/" + name).c_str());
  const int fd = ::shm_open(("/" + name).c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  if (fd < 0) return false;
  bool ok = ::fchmod(fd, 0600) == 0;
  std::size_t done = 0;
  while (ok && done < bytes.size()) {
    const ssize_t n = ::write(fd, bytes.data() + done, bytes.size() - done);
    ok = n > 0;
    if (ok) done += static_cast<std::size_t>(n);
  }
  ::close(fd);
  return ok;
}

// The active slot's version is odd (layout in persistence/shm_store.h).
bool active_slot_mid_write(std::span<const unsigned char> bytes) {
  if (bytes.size() < 4096) return false;
  std::uint32_t active = 0;
  std::memcpy(&active, bytes.data() + 64, sizeof active);
  if (active > 1) return false;
  std::uint64_t version = 0;
  std::memcpy(&version, bytes.data() + 128 + 64 * active, sizeof version);
  return version % 2 == 1;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::span<const unsigned char> bytes(data, size);

  // 1. The parser on a copy.
  auto verified = ShmStore::parse_segment(bytes, /*verify_checksum=*/true);
  auto unverified = ShmStore::parse_segment(bytes, /*verify_checksum=*/false);
  if (verified.ok()) {
    FUZZ_CHECK(unverified.ok() && *unverified == *verified);
    FUZZ_CHECK(verified->size() <= size);
  }
  if (unverified.ok()) {
    FUZZ_CHECK(unverified->size() <= size);
    // Behind the segment parser, the snapshot decoder (checksums off too).
    jobengine::snapshot::DecodeError err;
    auto view = jobengine::snapshot::decode(*unverified, &err, /*verify_checksums=*/false);
    if (!view.ok()) FUZZ_CHECK(err.problem != jobengine::snapshot::Problem::kNone);
  }

  // 2. The same bytes as a real segment: the reader agrees with the parser.
  // Skipped when the active slot is marked mid-write: a live reader then
  // waits out its retry budget (milliseconds) for a writer to finish, which
  // would cut the fuzzer's speed tenfold; parse_segment covers that case.
  const std::string name = segment_name();
  if (!make_segment(name, bytes)) std::abort();  // /dev/shm must work here
  if (!active_slot_mid_write(bytes)) {
    auto read = ShmStore::read_existing(name);
    FUZZ_CHECK(read.ok() == verified.ok());
    if (read.ok()) {
      FUZZ_CHECK(*read == *verified);
    } else {
      FUZZ_CHECK(read.status().code() == verified.status().code());
    }
  }

  // 3. A writer attaching to it: refused, or fully working.
  {
    auto store = ShmStore::open_or_create(name, 0);
    if (!store.ok()) {
      const StatusCode code = store.status().code();
      FUZZ_CHECK(code == StatusCode::kCorruption || code == StatusCode::kFailedPrecondition ||
            code == StatusCode::kIoError);
    } else {
      const std::vector<unsigned char> image(1 + size % 300, static_cast<unsigned char>(size));
      jobengine::Status st = (*store)->publish(42, image);
      FUZZ_CHECK(st.ok() || st.code() == StatusCode::kIoError);
      if (st.ok()) {
        auto active = (*store)->read_active();
        FUZZ_CHECK(active.ok() && *active == image);
        auto again = ShmStore::read_existing(name);
        FUZZ_CHECK(again.ok() && *again == image);
      }
    }
  }
  (void)ShmStore::remove(name);
  return 0;
}
