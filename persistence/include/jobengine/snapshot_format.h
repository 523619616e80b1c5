// The snapshot image format: constants, an encoder and a validating decoder.
//
// The format is specified byte by byte in persistence/FORMAT.md; this header
// only names what that document defines. The shared-memory store, the file
// store, recovery and jobsnap all use this one encoder and decoder.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "jobengine/job.h"
#include "jobengine/status.h"

namespace jobengine::snapshot {

inline constexpr char kMagic[8] = {'J', 'O', 'B', 'S', 'N', 'A', 'P', '1'};
inline constexpr char kTrailerMagic[8] = {'J', 'O', 'B', 'S', 'N', 'E', 'N', 'D'};
// The version this build writes; it reads every version up to it (1 and 2).
inline constexpr std::uint16_t kFormatVersion = 2;
inline constexpr std::size_t kHeaderBytes = 96;
inline constexpr std::size_t kTrailerBytes = 16;
// Bytes of a job record before its variable parts (record_len .. the last
// fixed field), per version; see FORMAT.md.
inline constexpr std::size_t kRecordFixedBytesV1 = 48;
inline constexpr std::size_t kRecordFixedBytes = 68;  // version 2
inline constexpr std::size_t kMinRecordBytesV1 = kRecordFixedBytesV1 + 8;
inline constexpr std::size_t kMinRecordBytes = kRecordFixedBytes + 8;
inline constexpr std::size_t kMaxKey = 255;
inline constexpr std::size_t kMaxHandlerName = 255;
inline constexpr std::uint32_t kMaxHandlers = 65535;
inline constexpr std::uint64_t kMaxJobs = std::uint64_t{1} << 31;
inline constexpr std::uint32_t kMaxPayload = std::uint32_t{1} << 31;
inline constexpr std::uint32_t kMaxError = 4096;

// A job's state at the cut (FORMAT.md, job record "state").
enum class JobState : std::uint8_t {
  kPending = 1,       // queued
  kRunningAtCut = 2,  // a handler was running it; it runs again after recovery
  kDelayed = 3,
  kWaitingRetry = 4,
  kDead = 5,
};
std::string_view job_state_name(JobState state) noexcept;

// Why a dead job is dead (FORMAT.md, "dead_reason"). kNone for live jobs.
enum class DeadReason : std::uint8_t {
  kNone = 0,
  kFailed = 1,     // the handler returned kFail, or its attempts ran out
  kPoison = 2,     // running at more than max_recoveries cuts that a crash followed
  kNoHandler = 3,  // its handler is not registered in the engine that recovered it
};
std::string_view dead_reason_name(DeadReason reason) noexcept;

struct Header {
  std::uint16_t format_version = kFormatVersion;
  std::uint64_t generation = 0;
  std::uint64_t cut_epoch = 0;
  std::int64_t wall_time_ns = 0;  // Unix epoch
  std::uint64_t next_job_id = 1;
  std::uint32_t handler_count = 0;
  std::uint64_t job_count = 0;
  std::uint64_t body_bytes = 0;
};

// One job record: what the encoder takes and (as JobRecordView) the decoder gives.
struct JobRecord {
  JobId id = 0;
  std::uint32_t handler = 0;
  std::uint8_t priority = 0;
  JobState state = JobState::kPending;
  std::uint16_t attempts = 0;
  std::uint16_t recoveries = 0;
  std::int64_t submit_ns = 0;
  std::int64_t run_at_ns = 0;
  // Version 2 fields (a version-1 record decodes with them zero / empty, and
  // a dead version-1 record with dead_reason kFailed).
  bool cancel_requested = false;   // cancel() reached it while it was running
  DeadReason dead_reason = DeadReason::kNone;  // != kNone exactly when state is kDead
  std::uint64_t deadline_ns = 0;   // most a run may take before it counts as stuck; 0 none
  std::int64_t dead_at_ns = 0;     // when it died (Unix epoch ns); 0 unless dead
  std::string_view payload;
  std::string_view error;
  std::string_view key;            // unique key (<= kMaxKey bytes), empty when none
};

// One decoded job. Its views point into the image it was decoded from.
struct JobRecordView : JobRecord {
  std::uint64_t offset = 0;  // of its record_len field in the image
};

// A decoded image. Views into the bytes given to decode(): those must outlive it.
struct SnapshotView {
  Header header;
  std::vector<std::string_view> handlers;
  std::vector<JobRecordView> jobs;  // decode() fills it; verify() leaves it empty
  std::uint64_t image_checksum = 0;
  // Filled by decode() and verify() alike:
  std::uint64_t records_offset = 0;     // of the first job record
  std::uint64_t live_records = 0;       // records neither dead nor cancel_requested
  std::uint32_t max_payload_bytes = 0;  // the largest payload_len of any record
};

// How a decode failed, for tools that report failure classes (jobsnap verify).
enum class Problem : std::uint8_t { kNone, kTruncated, kCorrupt, kUnsupportedVersion };
std::string_view problem_name(Problem problem) noexcept;

struct DecodeError {
  Problem problem = Problem::kNone;
  std::uint64_t offset = 0;  // byte offset of the first problem
};

// Decodes and verifies an image (FORMAT.md, "Reading rules"). Never reads
// outside `image` and allocates only in proportion to what `image` holds. On
// failure the Status is kCorruption ("offset N: what"), or kFailedPrecondition
// for an unsupported version, and `error` (when given) says the class and
// offset. `verify_checksums` is false only in fuzzing builds, so a fuzzer can
// reach the decoder past the checksums.
Result<SnapshotView> decode(std::span<const unsigned char> image, DecodeError* error = nullptr,
                            bool verify_checksums = true);

// The same checks as decode() without materializing the records (jobs stays
// empty; read them with RecordReader), for recovery, where a 1M-job image
// would otherwise be copied into ~120 MB of JobRecordViews first. One
// difference in the checksums (FORMAT.md, "Reading rules"): the image
// checksum, which covers every record byte, is checked first, and the record
// checksums are recomputed only when it fails, so that the failure still names
// the first damaged record. An image that decode() accepts, verify() accepts;
// the converse fails only for a record checksum that its writer got wrong
// while sealing the image over it (an encoder bug, not damage).
Result<SnapshotView> verify(std::span<const unsigned char> image, DecodeError* error = nullptr);

// Reads the job records of an image that verify() or decode() accepted, in
// order, without checking anything again. `image` and `view` must be those
// it accepted and must outlive the reader.
class RecordReader {
 public:
  RecordReader(std::span<const unsigned char> image, const SnapshotView& view) noexcept;
  // The next record (its views point into the image), or false after the last.
  bool next(JobRecordView& out) noexcept;

 private:
  const unsigned char* image_;
  std::uint64_t at_;
  std::uint64_t left_;
  bool v1_;
};

// Builds an image in a buffer it owns and reuses, or in memory a Sink
// provides: begin(), handlers, jobs, finish(). Grows its buffer only when an
// image is larger than any before.
class Encoder {
 public:
  // Memory an encoder may build its image in instead of its own buffer (the
  // shared-memory store's inactive slot: the image is then encoded where it
  // is published, not copied there afterwards).
  class Sink {
   public:
    virtual ~Sink() = default;
    // Storage of at least `size` bytes whose first `keep` bytes hold what the
    // previous storage's first `keep` bytes held (the storage may move);
    // empty when the sink cannot provide it. The previous storage must stay
    // readable until the next call.
    virtual std::span<unsigned char> reserve(std::size_t size, std::size_t keep) noexcept = 0;
  };

  // Starts an image. Handler names must then all be added, in index order,
  // before the first job. With a sink the image is built in its storage,
  // asked for twice as much whenever it is full; if the sink cannot provide
  // enough, the encoder copies what it has to its own buffer and goes on
  // there. The sink must outlive finish().
  void begin(const Header& header, Sink* sink = nullptr);
  void add_handler(std::string_view name);
  void add_job(const JobRecord& job);
  // Writes counts, lengths and checksums; returns the finished image, valid
  // until the next begin().
  std::span<const unsigned char> finish();

  std::size_t size() const noexcept { return size_; }
  // Whether the image finish() returned is in the sink's storage (else in
  // the encoder's own buffer).
  bool in_sink() const noexcept { return in_sink_; }
  // checksum() of every byte of the image finish() returned, trailer
  // included (what the shared-memory store keeps per slot), from the same
  // streaming pass that computed the image checksum.
  std::uint64_t whole_checksum() const noexcept { return whole_checksum_; }

 private:
  unsigned char* grow(std::size_t n) {
    if (cap_ - size_ < n) [[unlikely]] reserve(size_ + n);
    unsigned char* p = data_ + size_;
    size_ += n;
    return p;
  }
  void reserve(std::size_t need);
  std::vector<unsigned char> own_;
  Sink* sink_ = nullptr;  // between begin() and finish(), while the sink holds the image
  bool in_sink_ = false;
  unsigned char* data_ = nullptr;  // own_.data() or the sink's storage
  std::size_t cap_ = 0;
  std::size_t size_ = 0;
  Header header_;
  std::uint32_t handlers_ = 0;
  std::uint64_t jobs_ = 0;
  std::uint64_t whole_checksum_ = 0;
};

// XXH3-64, the checksum the format uses.
std::uint64_t checksum(const void* data, std::size_t size) noexcept;

}  // namespace jobengine::snapshot
