// Encoder and decoder of the snapshot image; the format is FORMAT.md.
#include "jobengine/snapshot_format.h"

// Debian's xxhash.h, inlined: XXH3 runs ~20% faster than through
// libxxhash.so, and the library needs no link dependency.
#define XXH_INLINE_ALL
#include <xxhash.h>

#include <cstring>
#include <string>

namespace jobengine::snapshot {

namespace {

// Little-endian stores and loads, whatever the host's byte order.
void put16(unsigned char* p, std::uint16_t v) noexcept {
  p[0] = static_cast<unsigned char>(v);
  p[1] = static_cast<unsigned char>(v >> 8);
}
void put32(unsigned char* p, std::uint32_t v) noexcept {
  for (int i = 0; i < 4; ++i) p[i] = static_cast<unsigned char>(v >> (8 * i));
}
void put64(unsigned char* p, std::uint64_t v) noexcept {
  for (int i = 0; i < 8; ++i) p[i] = static_cast<unsigned char>(v >> (8 * i));
}
std::uint16_t get16(const unsigned char* p) noexcept {
  return static_cast<std::uint16_t>(p[0] | (p[1] << 8));
}
std::uint32_t get32(const unsigned char* p) noexcept {
  std::uint32_t v = 0;
  for (int i = 3; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}
std::uint64_t get64(const unsigned char* p) noexcept {
  std::uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

std::string hex64(std::uint64_t v) {
  static const char* digits = "0123456789abcdef";
  std::string out = "0x";
  for (int i = 60; i >= 0; i -= 4) out += digits[(v >> i) & 0xf];
  return out;
}

}  // namespace

namespace {

// The image checksum (XXH3 of every byte before the trailer). The decoder
// feeds it piece by piece while it checks the records: a piece goes in once
// ~64 KiB of records have been handled, still in cache then, so the image is
// read from memory once, not twice. The encoder streams it in finish(), once
// the header it starts with is known. XXH3's streaming digest equals the
// one-shot XXH3_64bits of the same bytes.
class StreamedImageHash {
 public:
  explicit StreamedImageHash(const unsigned char* image) : image_(image) {
    XXH3_64bits_reset(&state_);
  }
  // Bytes [0, end) are final: hashes them once a piece's worth has gathered.
  void advance(std::size_t end) noexcept {
    if (end - hashed_ < kPiece) return;
    XXH3_64bits_update(&state_, image_ + hashed_, end - hashed_);
    hashed_ = end;
  }
  // The checksum of [0, end); may be called again with a larger end.
  std::uint64_t finish(std::size_t end) noexcept {
    XXH3_64bits_update(&state_, image_ + hashed_, end - hashed_);
    hashed_ = end;
    return XXH3_64bits_digest(&state_);
  }

 private:
  static constexpr std::size_t kPiece = std::size_t{64} << 10;
  const unsigned char* image_;
  std::size_t hashed_ = 0;
  XXH3_state_t state_;
};

}  // namespace

std::uint64_t checksum(const void* data, std::size_t size) noexcept {
  return XXH3_64bits(data, size);
}

std::string_view job_state_name(JobState state) noexcept {
  switch (state) {
    case JobState::kPending: return "pending";
    case JobState::kRunningAtCut: return "running-at-cut";
    case JobState::kDelayed: return "delayed";
    case JobState::kWaitingRetry: return "waiting-retry";
    case JobState::kDead: return "dead";
  }
  return "unknown";
}

std::string_view dead_reason_name(DeadReason reason) noexcept {
  switch (reason) {
    case DeadReason::kNone: return "none";
    case DeadReason::kFailed: return "failed";
    case DeadReason::kPoison: return "poison";
    case DeadReason::kNoHandler: return "no-handler";
  }
  return "unknown";
}

std::string_view problem_name(Problem problem) noexcept {
  switch (problem) {
    case Problem::kNone: return "none";
    case Problem::kTruncated: return "truncated";
    case Problem::kCorrupt: return "corrupt";
    case Problem::kUnsupportedVersion: return "unsupported-version";
  }
  return "unknown";
}

// ------------------------------------------------------------------ encoder

void Encoder::reserve(std::size_t need) {
  if (sink_ != nullptr) {
    // Twice the room: each growth may map a grown segment afresh.
    const std::span<unsigned char> room = sink_->reserve(std::max(need, cap_ * 2), size_);
    if (room.size() >= need) {
      data_ = room.data();
      cap_ = room.size();
      return;
    }
    // The sink cannot hold the image: go on in our own buffer. The sink's
    // storage still holds what was written so far (Sink::reserve's contract).
    if (own_.size() < need) own_.resize(std::max(need, size_ + size_ / 2));
    if (size_ != 0) std::memcpy(own_.data(), data_, size_);
    sink_ = nullptr;
  } else if (own_.size() < need) {
    own_.resize(std::max(need, own_.size() * 2));  // keeps the bytes written so far
  }
  data_ = own_.data();
  cap_ = own_.size();
}

void Encoder::begin(const Header& header, Sink* sink) {
  header_ = header;
  handlers_ = 0;
  jobs_ = 0;
  size_ = 0;
  sink_ = sink;
  data_ = own_.data();
  cap_ = sink == nullptr ? own_.size() : 0;
  in_sink_ = false;
  if (sink != nullptr) reserve(kHeaderBytes + kTrailerBytes);  // the sink's storage as it is
  unsigned char* h = grow(kHeaderBytes);
  std::memset(h, 0, kHeaderBytes);  // counts and checksum are written by finish()
}

void Encoder::add_handler(std::string_view name) {
  if (name.size() > kMaxHandlerName) name = name.substr(0, kMaxHandlerName);
  unsigned char* p = grow(2 + name.size());
  put16(p, static_cast<std::uint16_t>(name.size()));
  if (!name.empty()) std::memcpy(p + 2, name.data(), name.size());
  ++handlers_;
}

void Encoder::add_job(const JobRecord& job) {
  std::string_view error = job.error.substr(0, std::min<std::size_t>(job.error.size(), kMaxError));
  std::string_view key = job.key.substr(0, std::min<std::size_t>(job.key.size(), kMaxKey));
  const std::size_t body = kRecordFixedBytes - 4 + job.payload.size() + error.size() + key.size();
  unsigned char* r = grow(4 + body + 8);
  put32(r, static_cast<std::uint32_t>(body + 8));
  put64(r + 4, job.id);
  put32(r + 12, job.handler);
  r[16] = job.priority;
  r[17] = static_cast<unsigned char>(job.state);
  put16(r + 18, job.attempts);
  put16(r + 20, job.recoveries);
  r[22] = job.cancel_requested ? 1 : 0;
  r[23] = static_cast<unsigned char>(job.dead_reason);
  put64(r + 24, static_cast<std::uint64_t>(job.submit_ns));
  put64(r + 32, static_cast<std::uint64_t>(job.run_at_ns));
  put64(r + 40, job.deadline_ns);
  put64(r + 48, static_cast<std::uint64_t>(job.dead_at_ns));
  put32(r + 56, static_cast<std::uint32_t>(job.payload.size()));
  put32(r + 60, static_cast<std::uint32_t>(error.size()));
  put16(r + 64, static_cast<std::uint16_t>(key.size()));
  put16(r + 66, 0);
  unsigned char* v = r + kRecordFixedBytes;
  if (!job.payload.empty()) std::memcpy(v, job.payload.data(), job.payload.size());
  v += job.payload.size();
  if (!error.empty()) std::memcpy(v, error.data(), error.size());
  v += error.size();
  if (!key.empty()) std::memcpy(v, key.data(), key.size());
  // The record checksum now, while the record is in L1: a snapshot's scan
  // of the job table is bound by memory latency, so hashing here costs
  // about nothing, where a second pass in finish() would read the image again.
  put64(r + 4 + body, checksum(r + 4, body));
  ++jobs_;
}

std::span<const unsigned char> Encoder::finish() {
  grow(kTrailerBytes);
  unsigned char* h = data_;  // grow() may have moved it
  unsigned char* t = data_ + size_ - kTrailerBytes;
  // The header first: everything it says is known now, and the image
  // checksum below streams over it in order.
  std::memcpy(h, kMagic, 8);
  put16(h + 8, kFormatVersion);
  put16(h + 10, static_cast<std::uint16_t>(kHeaderBytes));
  put32(h + 12, 0);
  put64(h + 16, header_.generation);
  put64(h + 24, header_.cut_epoch);
  put64(h + 32, static_cast<std::uint64_t>(header_.wall_time_ns));
  put64(h + 40, header_.next_job_id);
  put32(h + 48, handlers_);
  put32(h + 52, 0);
  put64(h + 56, jobs_);
  put64(h + 64, size_ - kHeaderBytes - kTrailerBytes);
  std::memset(h + 72, 0, 16);
  put64(h + 88, checksum(h, 88));
  // The image checksum (the record checksums are in place already).
  StreamedImageHash image_hash(h);
  std::memcpy(t, kTrailerMagic, 8);
  put64(t + 8, image_hash.finish(size_ - kTrailerBytes));
  // The same stream over the 16 trailer bytes: the checksum of every byte.
  whole_checksum_ = image_hash.finish(size_);
  in_sink_ = sink_ != nullptr;
  sink_ = nullptr;
  return {data_, size_};
}

// ------------------------------------------------------------------ decoder

namespace {

struct Failure {
  Status status;
};

Status fail(DecodeError* error, Problem problem, std::uint64_t offset, const std::string& what) {
  if (error != nullptr) *error = {problem, offset};
  StatusCode code =
      problem == Problem::kUnsupportedVersion ? StatusCode::kFailedPrecondition : StatusCode::kCorruption;
  return Status(code, std::string(problem_name(problem)) + " at offset " + std::to_string(offset) +
                          ": " + what);
}


// How much of the checksumming a decode does.
enum class Checks : std::uint8_t {
  kEvery,       // each record checksum as its record is checked, then the image checksum
  kImageFirst,  // the image checksum; the record checksums only if it fails
  kNone,        // fuzzing builds only
};

// Parses the fields of the record at r (its record_len field), which the
// caller has bounds-checked (or verified) already. Checks nothing.
struct RawRecord {
  std::uint8_t state = 0;
  std::uint8_t flags = 0;
  std::uint8_t reason = 0;
  std::uint32_t record_len = 0;
  std::uint32_t payload_len = 0;
  std::uint32_t error_len = 0;
  std::uint32_t key_len = 0;
  std::size_t fixed = 0;
};
inline void parse_record(const unsigned char* r, bool v1, JobRecordView& v, RawRecord& raw) noexcept {
  raw.record_len = get32(r);
  v.id = get64(r + 4);
  v.handler = get32(r + 12);
  v.priority = r[16];
  raw.state = r[17];
  v.attempts = get16(r + 18);
  v.recoveries = get16(r + 20);
  v.submit_ns = static_cast<std::int64_t>(get64(r + 24));
  v.run_at_ns = static_cast<std::int64_t>(get64(r + 32));
  if (v1) {
    raw.fixed = kRecordFixedBytesV1;
    raw.flags = 0;
    raw.payload_len = get32(r + 40);
    raw.error_len = get32(r + 44);
    raw.key_len = 0;
    raw.reason = raw.state == static_cast<std::uint8_t>(JobState::kDead)
                     ? static_cast<std::uint8_t>(DeadReason::kFailed)
                     : 0;
    v.deadline_ns = 0;
    v.dead_at_ns = 0;
  } else {
    raw.fixed = kRecordFixedBytes;
    raw.flags = r[22];
    raw.reason = r[23];
    v.deadline_ns = get64(r + 40);
    v.dead_at_ns = static_cast<std::int64_t>(get64(r + 48));
    raw.payload_len = get32(r + 56);
    raw.error_len = get32(r + 60);
    raw.key_len = get16(r + 64);
  }
}
// Sets the views and the enums from a parsed record.
inline void finish_record(const unsigned char* r, const RawRecord& raw, JobRecordView& v) noexcept {
  v.state = static_cast<JobState>(raw.state);
  v.cancel_requested = (raw.flags & 1u) != 0;
  v.dead_reason = static_cast<DeadReason>(raw.reason);
  const char* var = reinterpret_cast<const char*>(r + raw.fixed);
  v.payload = std::string_view(var, raw.payload_len);
  v.error = std::string_view(var + raw.payload_len, raw.error_len);
  v.key = std::string_view(var + raw.payload_len + raw.error_len, raw.key_len);
}

// Reading rules 6-8 over the records of an image whose header and handler
// table passed (rules 1-5); `out` holds them. Fills out.jobs when
// `materialize`, and the record statistics either way.
Status check_records(const unsigned char* d, std::uint64_t at, std::uint64_t trailer,
                     DecodeError* error, bool every_checksum, bool image_checksum,
                     bool materialize, SnapshotView& out);

Result<SnapshotView> decode_image(std::span<const unsigned char> image, DecodeError* error,
                                  Checks checks, bool materialize) {
  const bool verify_checksums = checks != Checks::kNone;
  if (error != nullptr) *error = {};
  const unsigned char* d = image.data();
  const std::uint64_t size = image.size();
  if (size < kHeaderBytes + kTrailerBytes) {
    return fail(error, Problem::kTruncated, size,
                "image of " + std::to_string(size) + " bytes is shorter than header + trailer (" +
                    std::to_string(kHeaderBytes + kTrailerBytes) + ")");
  }
  if (std::memcmp(d, kMagic, 8) != 0) {
    return fail(error, Problem::kCorrupt, 0, "bad magic (not a jobengine snapshot)");
  }
  SnapshotView out;
  Header& h = out.header;
  h.format_version = get16(d + 8);
  if (h.format_version > kFormatVersion) {
    return fail(error, Problem::kUnsupportedVersion, 8,
                "unsupported format version " + std::to_string(h.format_version) +
                    "; this build reads up to " + std::to_string(kFormatVersion));
  }
  if (h.format_version == 0) return fail(error, Problem::kCorrupt, 8, "format version 0");
  if (get16(d + 10) != kHeaderBytes) {
    return fail(error, Problem::kCorrupt, 10,
                "header_bytes " + std::to_string(get16(d + 10)) + ", expected " +
                    std::to_string(kHeaderBytes));
  }
  if (verify_checksums && get64(d + 88) != checksum(d, 88)) {
    return fail(error, Problem::kCorrupt, 88, "header checksum mismatch");
  }
  if (get32(d + 12) != 0) {
    return fail(error, Problem::kCorrupt, 12, "unknown flags " + hex64(get32(d + 12)));
  }
  h.generation = get64(d + 16);
  h.cut_epoch = get64(d + 24);
  h.wall_time_ns = static_cast<std::int64_t>(get64(d + 32));
  h.next_job_id = get64(d + 40);
  h.handler_count = get32(d + 48);
  h.job_count = get64(d + 56);
  h.body_bytes = get64(d + 64);
  if (h.handler_count > kMaxHandlers) {
    return fail(error, Problem::kCorrupt, 48,
                "handler_count " + std::to_string(h.handler_count) + " exceeds " +
                    std::to_string(kMaxHandlers));
  }
  if (h.job_count > kMaxJobs) {
    return fail(error, Problem::kCorrupt, 56,
                "job_count " + std::to_string(h.job_count) + " exceeds 2^31");
  }
  // No overflow: size is real, so compare against it before adding.
  if (h.body_bytes > size - kHeaderBytes - kTrailerBytes) {
    return fail(error, Problem::kTruncated, size,
                "header says " + std::to_string(kHeaderBytes + h.body_bytes + kTrailerBytes) +
                    " bytes, image has " + std::to_string(size));
  }
  if (kHeaderBytes + h.body_bytes + kTrailerBytes != size) {
    return fail(error, Problem::kCorrupt, kHeaderBytes + h.body_bytes + kTrailerBytes,
                std::to_string(size - (kHeaderBytes + h.body_bytes + kTrailerBytes)) +
                    " trailing bytes after the trailer");
  }
  const std::uint64_t min_record = h.format_version == 1 ? kMinRecordBytesV1 : kMinRecordBytes;
  if (h.job_count * min_record > h.body_bytes ||
      h.handler_count * 3ull > h.body_bytes - h.job_count * min_record) {
    return fail(error, Problem::kCorrupt, 56,
                "job_count " + std::to_string(h.job_count) + " and handler_count " +
                    std::to_string(h.handler_count) + " cannot fit in body of " +
                    std::to_string(h.body_bytes) + " bytes");
  }
  const std::uint64_t trailer = kHeaderBytes + h.body_bytes;
  if (std::memcmp(d + trailer, kTrailerMagic, 8) != 0) {
    return fail(error, Problem::kCorrupt, trailer, "bad trailer magic");
  }

  std::uint64_t at = kHeaderBytes;
  out.handlers.reserve(h.handler_count);
  for (std::uint32_t i = 0; i < h.handler_count; ++i) {
    if (trailer - at < 2) return fail(error, Problem::kCorrupt, at, "handler table runs past the body");
    const std::uint16_t len = get16(d + at);
    if (len == 0 || len > kMaxHandlerName) {
      return fail(error, Problem::kCorrupt, at,
                  "handler " + std::to_string(i) + " name length " + std::to_string(len) +
                      " not in 1..255");
    }
    if (trailer - at - 2 < len) {
      return fail(error, Problem::kCorrupt, at, "handler " + std::to_string(i) + " name runs past the body");
    }
    out.handlers.emplace_back(reinterpret_cast<const char*>(d + at + 2), len);
    at += 2 + len;
  }

  out.records_offset = at;
  if (materialize) out.jobs.reserve(h.job_count);
  // Failures are reported into `located` and copied out once final.
  DecodeError located;
  Status st = check_records(d, at, trailer, &located, checks == Checks::kEvery,
                            verify_checksums, materialize, out);
  if (!st.ok() && checks == Checks::kImageFirst) {
    // A record check or the image checksum failed with the record checksums
    // unchecked: check again with them, in order, so that the failure is the
    // one kEvery reports (a damaged record's checksum comes before its other
    // checks, and before the image checksum).
    out.jobs.clear();
    st = check_records(d, at, trailer, &located, true, true, materialize, out);
  }
  if (!st.ok() && error != nullptr) *error = located;
  if (!st.ok()) return st;
  return out;
}

Status check_records(const unsigned char* d, std::uint64_t at, std::uint64_t trailer,
                     DecodeError* error, bool every_checksum, bool image_checksum,
                     bool materialize, SnapshotView& out) {
  const Header& h = out.header;
  const bool v1 = h.format_version == 1;
  const std::uint64_t min_record = v1 ? kMinRecordBytesV1 : kMinRecordBytes;
  out.live_records = 0;
  out.max_payload_bytes = 0;
  // The image checksum streams over the records as they are checked.
  StreamedImageHash image_hash(d);
  for (std::uint64_t j = 0; j < h.job_count; ++j) {
    const std::uint64_t rec = at;
    // Built only on a failure path: no allocation per record on success.
    const auto job = [j] { return "job record " + std::to_string(j); };
    if (trailer - at < min_record) {
      return fail(error, Problem::kCorrupt, rec, job() + " runs past the body");
    }
    const unsigned char* r = d + at;
    JobRecordView v;
    RawRecord raw;
    parse_record(r, v1, v, raw);
    const std::uint32_t record_len = raw.record_len;
    if (record_len < min_record - 4 || record_len > trailer - at - 4) {
      return fail(error, Problem::kCorrupt, rec,
                  job() + " length " + std::to_string(record_len) + " out of bounds");
    }
    if (raw.payload_len > kMaxPayload || raw.error_len > kMaxError || raw.key_len > kMaxKey ||
        std::uint64_t{raw.fixed} - 4 + raw.payload_len + raw.error_len + raw.key_len + 8 !=
            record_len) {
      return fail(error, Problem::kCorrupt, rec,
                  job() + ": payload " + std::to_string(raw.payload_len) + " + error " +
                      std::to_string(raw.error_len) + " + key " + std::to_string(raw.key_len) +
                      " bytes do not match its length " + std::to_string(record_len));
    }
    const std::uint64_t body = record_len - 8;
    if (every_checksum && get64(r + 4 + body) != checksum(r + 4, body)) {
      return fail(error, Problem::kCorrupt, rec, job() + " (id " + std::to_string(v.id) + "): checksum mismatch");
    }
    if (v.id == 0) return fail(error, Problem::kCorrupt, rec + 4, job() + ": id 0");
    if (v.handler >= h.handler_count) {
      return fail(error, Problem::kCorrupt, rec + 12,
                  job() + ": handler index " + std::to_string(v.handler) + " >= handler_count " +
                      std::to_string(h.handler_count));
    }
    if (v.priority >= kPriorityLevels) {
      return fail(error, Problem::kCorrupt, rec + 16, job() + ": priority " + std::to_string(v.priority));
    }
    const std::uint8_t state = raw.state;
    if (state < 1 || state > 5) {
      return fail(error, Problem::kCorrupt, rec + 17, job() + ": state " + std::to_string(state));
    }
    const bool dead = state == static_cast<std::uint8_t>(JobState::kDead);
    // Reserved fields last (FORMAT.md rule 6): damage there is a checksum
    // mismatch first.
    if (v1 && get16(r + 22) != 0) {
      return fail(error, Problem::kCorrupt, rec + 22, job() + ": reserved bytes set");
    }
    if (!v1) {
      if ((raw.flags & ~1u) != 0) {
        return fail(error, Problem::kCorrupt, rec + 22,
                    job() + ": unknown flags " + std::to_string(raw.flags));
      }
      if (raw.reason > 3 || (raw.reason != 0) != dead) {
        return fail(error, Problem::kCorrupt, rec + 23,
                    job() + ": dead_reason " + std::to_string(raw.reason) + " with state " +
                        std::to_string(state));
      }
      if (get16(r + 66) != 0) return fail(error, Problem::kCorrupt, rec + 66, job() + ": reserved bytes set");
    }
    if (!dead && (raw.flags & 1u) == 0) ++out.live_records;
    if (raw.payload_len > out.max_payload_bytes) out.max_payload_bytes = raw.payload_len;
    if (materialize) {
      v.offset = rec;
      finish_record(r, raw, v);
      out.jobs.push_back(v);
    }
    at += 4 + record_len;
    if (image_checksum) image_hash.advance(at);
  }
  if (at != trailer) {
    return fail(error, Problem::kCorrupt, at,
                std::to_string(trailer - at) + " unparsed bytes between the last record and the trailer");
  }
  out.image_checksum = get64(d + trailer + 8);
  if (image_checksum && out.image_checksum != image_hash.finish(trailer)) {
    return fail(error, Problem::kCorrupt, trailer + 8, "image checksum mismatch");
  }
  return Status();
}

}  // namespace

Result<SnapshotView> decode(std::span<const unsigned char> image, DecodeError* error,
                            bool verify_checksums) {
  return decode_image(image, error, verify_checksums ? Checks::kEvery : Checks::kNone, true);
}

Result<SnapshotView> verify(std::span<const unsigned char> image, DecodeError* error) {
  return decode_image(image, error, Checks::kImageFirst, false);
}

RecordReader::RecordReader(std::span<const unsigned char> image, const SnapshotView& view) noexcept
    : image_(image.data()),
      at_(view.records_offset),
      left_(view.header.job_count),
      v1_(view.header.format_version == 1) {}

bool RecordReader::next(JobRecordView& out) noexcept {
  if (left_ == 0) return false;
  --left_;
  const unsigned char* r = image_ + at_;
  RawRecord raw;
  parse_record(r, v1_, out, raw);
  finish_record(r, raw, out);
  out.offset = at_;
  at_ += 4 + std::uint64_t{raw.record_len};
  return true;
}

}  // namespace jobengine::snapshot
