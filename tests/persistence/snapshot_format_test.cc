// The snapshot image codec (persistence/FORMAT.md): round trips, the golden
// image, and one test per reader error path made by byte surgery.
#include "jobengine/snapshot_format.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <memory>
#include <random>
#include <string>
#include <vector>

namespace jobengine::snapshot {
namespace {

using Bytes = std::vector<unsigned char>;

Bytes to_bytes(std::span<const unsigned char> s) { return Bytes(s.begin(), s.end()); }

void put64(unsigned char* p, std::uint64_t v) {
  for (int i = 0; i < 8; ++i) p[i] = static_cast<unsigned char>(v >> (8 * i));
}
void put32(unsigned char* p, std::uint32_t v) {
  for (int i = 0; i < 4; ++i) p[i] = static_cast<unsigned char>(v >> (8 * i));
}

// Re-seals an image after surgery so that a test reaches the check it means
// to test instead of failing on a checksum first.
void reseal_header(Bytes& b) { put64(b.data() + 88, checksum(b.data(), 88)); }
void reseal_image(Bytes& b) {
  const std::size_t t = b.size() - kTrailerBytes;
  put64(b.data() + t + 8, checksum(b.data(), t));
}
void reseal_record(Bytes& b, std::size_t rec) {
  std::uint32_t len = static_cast<std::uint32_t>(b[rec] | (b[rec + 1] << 8) | (b[rec + 2] << 16) |
                                                 (static_cast<std::uint32_t>(b[rec + 3]) << 24));
  put64(b.data() + rec + 4 + len - 8, checksum(b.data() + rec + 4, len - 8));
}

// The worked example of FORMAT.md.
Bytes small_image() {
  Encoder e;
  Header h;
  h.generation = 3;
  h.cut_epoch = 12;
  h.wall_time_ns = 1'790'000'000'000'000'000;
  h.next_job_id = 8;
  e.begin(h);
  e.add_handler("email");
  JobRecord j;
  j.id = 7;
  j.handler = 0;
  j.priority = 1;
  j.state = JobState::kPending;
  j.submit_ns = 1'789'999'999'000'000'000;
  j.run_at_ns = j.submit_ns;
  j.payload = "hi";
  e.add_job(j);
  return to_bytes(e.finish());
}

// Random jobs of every state. With v2_fields false the version-2 fields keep
// the values a version-1 record decodes to, so the image's jobs equal those of
// the version-1 golden file written by this function before version 2.
Bytes mixed_image(int jobs, std::uint64_t seed, bool v2_fields = true) {
  std::mt19937_64 rng(seed);
  std::mt19937_64 rng2(seed + 1000);  // v2 fields: keeps rng's sequence as in version 1
  Encoder e;
  Header h;
  h.generation = 42;
  h.next_job_id = 1000;
  e.begin(h);
  e.add_handler("a");
  e.add_handler(std::string(255, 'n'));
  e.add_handler("ledger.post");
  for (int i = 0; i < jobs; ++i) {
    std::string payload(rng() % 600, 'x');
    for (auto& c : payload) c = static_cast<char>(rng());
    std::string err = (i % 5 == 0) ? "boom " + std::to_string(i) : "";
    JobRecord j;
    j.id = 1 + static_cast<JobId>(i);
    j.handler = static_cast<std::uint32_t>(rng() % 3);
    j.priority = static_cast<std::uint8_t>(rng() % 3);
    j.state = static_cast<JobState>(1 + rng() % 5);
    j.attempts = static_cast<std::uint16_t>(rng() % 9);
    j.recoveries = static_cast<std::uint16_t>(rng() % 4);
    j.submit_ns = static_cast<std::int64_t>(rng() >> 1);
    j.run_at_ns = -static_cast<std::int64_t>(rng() >> 2);
    j.payload = payload;
    j.error = err;
    std::string key;
    if (j.state == JobState::kDead) j.dead_reason = DeadReason::kFailed;
    if (v2_fields) {
      if (j.state == JobState::kDead) {
        j.dead_reason = static_cast<DeadReason>(1 + rng2() % 3);
        j.dead_at_ns = static_cast<std::int64_t>(rng2() >> 1);
      }
      j.cancel_requested = rng2() % 4 == 0;
      j.deadline_ns = rng2() % 2 == 0 ? 0 : rng2() % 1'000'000'000;
      if (rng2() % 3 == 0) key = "key-" + std::to_string(rng2() % 100000);
      j.key = key;
    }
    e.add_job(j);
  }
  return to_bytes(e.finish());
}

// Field-by-field equality of decoded jobs (offsets aside).
void expect_same_jobs(const SnapshotView& a, const SnapshotView& b) {
  ASSERT_EQ(a.jobs.size(), b.jobs.size());
  for (std::size_t i = 0; i < a.jobs.size(); ++i) {
    const JobRecordView& x = a.jobs[i];
    const JobRecordView& y = b.jobs[i];
    EXPECT_EQ(x.id, y.id);
    EXPECT_EQ(x.handler, y.handler);
    EXPECT_EQ(x.priority, y.priority);
    EXPECT_EQ(x.state, y.state);
    EXPECT_EQ(x.attempts, y.attempts);
    EXPECT_EQ(x.recoveries, y.recoveries);
    EXPECT_EQ(x.submit_ns, y.submit_ns);
    EXPECT_EQ(x.run_at_ns, y.run_at_ns);
    EXPECT_EQ(x.cancel_requested, y.cancel_requested);
    EXPECT_EQ(x.dead_reason, y.dead_reason);
    EXPECT_EQ(x.deadline_ns, y.deadline_ns);
    EXPECT_EQ(x.dead_at_ns, y.dead_at_ns);
    EXPECT_EQ(x.payload, y.payload);
    EXPECT_EQ(x.error, y.error);
    EXPECT_EQ(x.key, y.key);
  }
}

TEST(SnapshotFormatTest, SmallImageMatchesTheWorkedExample) {
  Bytes b = small_image();
  ASSERT_EQ(b.size(), 197u);  // FORMAT.md: 96 + 85 + 16
  EXPECT_EQ(std::memcmp(b.data(), "JOBSNAP1", 8), 0);
  EXPECT_EQ(b[8], 2);
  EXPECT_EQ(b[10], 96);
  EXPECT_EQ(b[96], 5);  // handler name length
  EXPECT_EQ(std::memcmp(b.data() + 98, "email", 5), 0);
  EXPECT_EQ(b[103], 0x4A);  // record_len
  EXPECT_EQ(b[107], 7);     // id
  EXPECT_EQ(b[103 + 56], 2);  // payload_len
  EXPECT_EQ(std::memcmp(b.data() + 103 + 68, "hi", 2), 0);
  EXPECT_EQ(std::memcmp(b.data() + 197 - 16, "JOBSNEND", 8), 0);
}

TEST(SnapshotFormatTest, RoundTripKeepsEveryField) {
  Bytes b = mixed_image(300, 1);
  auto v = decode(b);
  ASSERT_TRUE(v.ok()) << v.status().to_string();
  EXPECT_EQ(v->header.generation, 42u);
  EXPECT_EQ(v->header.next_job_id, 1000u);
  ASSERT_EQ(v->handlers.size(), 3u);
  EXPECT_EQ(v->handlers[1], std::string(255, 'n'));
  ASSERT_EQ(v->jobs.size(), 300u);
  // Re-encode from the views: byte-identical.
  Encoder e;
  e.begin(v->header);
  for (auto name : v->handlers) e.add_handler(name);
  for (const auto& j : v->jobs) e.add_job(j);
  EXPECT_EQ(to_bytes(e.finish()), b);
}

TEST(SnapshotFormatTest, EmptySnapshotRoundTrips) {
  Encoder e;
  e.begin(Header{});
  Bytes b = to_bytes(e.finish());
  EXPECT_EQ(b.size(), kHeaderBytes + kTrailerBytes);
  auto v = decode(b);
  ASSERT_TRUE(v.ok()) << v.status().to_string();
  EXPECT_TRUE(v->jobs.empty());
}

TEST(SnapshotFormatTest, EncoderReusesItsBufferAcrossImages) {
  Encoder e;
  e.begin(Header{});
  e.add_handler("h");
  for (int i = 0; i < 100; ++i) {
    JobRecord j;
    j.id = 1 + static_cast<JobId>(i);
    j.payload = "p";
    e.add_job(j);
  }
  Bytes first = to_bytes(e.finish());
  e.begin(Header{});
  e.add_handler("h");
  Bytes second = to_bytes(e.finish());
  ASSERT_TRUE(decode(first).ok());
  ASSERT_TRUE(decode(second).ok());
  EXPECT_LT(second.size(), first.size());
}

// Storage for an Encoder that moves on every reserve(): each call gets a fresh
// buffer (the bytes kept copied over, the rest poisoned), the old ones kept
// readable as Sink's contract says. Fails every call from `fail_from` on.
class MovingSink final : public Encoder::Sink {
 public:
  explicit MovingSink(std::size_t fail_from = SIZE_MAX) : fail_from_(fail_from) {}
  std::span<unsigned char> reserve(std::size_t size, std::size_t keep) noexcept override {
    if (calls_++ >= fail_from_) return {};
    auto next = std::make_unique<Bytes>(size + 7, 0xa5);
    if (keep != 0) {
      EXPECT_FALSE(buffers_.empty());
      EXPECT_LE(keep, buffers_.back()->size());
      std::memcpy(next->data(), buffers_.back()->data(), keep);
    }
    buffers_.push_back(std::move(next));
    return *buffers_.back();
  }
  std::size_t calls() const { return calls_; }
  const Bytes& last() const { return *buffers_.back(); }

 private:
  std::size_t fail_from_;
  std::size_t calls_ = 0;
  std::vector<std::unique_ptr<Bytes>> buffers_;
};

// Encodes `jobs` jobs of varied sizes into `e` (with `sink`, if any).
std::span<const unsigned char> encode_varied(Encoder& e, Encoder::Sink* sink, int jobs) {
  Header h;
  h.generation = 5;
  h.next_job_id = 77;
  e.begin(h, sink);
  e.add_handler("a");
  e.add_handler("b.c");
  for (int i = 0; i < jobs; ++i) {
    const std::string payload(static_cast<std::size_t>(i * 37 % 700), static_cast<char>('a' + i % 26));
    JobRecord j;
    j.id = 1 + static_cast<JobId>(i);
    j.handler = static_cast<std::uint32_t>(i % 2);
    j.attempts = static_cast<std::uint16_t>(i % 5);
    j.payload = payload;
    e.add_job(j);
  }
  return e.finish();
}

// With a sink, the image is built in the sink's storage, byte for byte the one
// an encoder builds in its own buffer, however often the storage moves.
TEST(SnapshotEncoderSinkTest, ImageBuiltInTheSinkIsTheSameAsInTheEncodersOwnBuffer) {
  Encoder own;
  const Bytes expected = to_bytes(encode_varied(own, nullptr, 2000));
  EXPECT_FALSE(own.in_sink());
  for (int jobs : {0, 1, 2000}) {
    Encoder reference;
    const Bytes want = to_bytes(encode_varied(reference, nullptr, jobs));
    MovingSink sink;
    Encoder e;
    const std::span<const unsigned char> image = encode_varied(e, &sink, jobs);
    EXPECT_TRUE(e.in_sink()) << jobs << " jobs";
    EXPECT_EQ(image.data(), sink.last().data()) << jobs << " jobs";
    EXPECT_EQ(to_bytes(image), want) << jobs << " jobs";
    EXPECT_EQ(e.whole_checksum(), checksum(image.data(), image.size()));
    if (jobs == 2000) {
      EXPECT_EQ(want, expected);
      // From 112 bytes, doubling: the storage moved some 20 times.
      EXPECT_GT(sink.calls(), 10u);
    }
    // The same encoder without a sink afterwards: its own buffer again.
    EXPECT_EQ(to_bytes(encode_varied(e, nullptr, jobs)), want);
    EXPECT_FALSE(e.in_sink());
  }
}

// A sink that cannot provide more room (the shared-memory segment cannot
// grow) loses nothing: the encoder carries on in its own buffer.
TEST(SnapshotEncoderSinkTest, ASinkThatRunsOutHandsTheImageBackToTheEncodersOwnBuffer) {
  Encoder own;
  const Bytes expected = to_bytes(encode_varied(own, nullptr, 2000));
  for (std::size_t fail_from : {0, 1, 2, 5, 12}) {
    MovingSink sink(fail_from);
    Encoder e;
    const std::span<const unsigned char> image = encode_varied(e, &sink, 2000);
    EXPECT_FALSE(e.in_sink()) << "failing from call " << fail_from;
    EXPECT_EQ(to_bytes(image), expected) << "failing from call " << fail_from;
    EXPECT_EQ(e.whole_checksum(), checksum(image.data(), image.size()));
    // The next image without a sink reuses that buffer.
    EXPECT_EQ(to_bytes(encode_varied(e, nullptr, 2000)), expected);
  }
}

// ---- golden files ----------------------------------------------------------

std::string golden_path(const char* name) {
  return std::string(JOBENGINE_GOLDEN_DIR) + "/" + name;
}

Bytes read_golden(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  EXPECT_TRUE(in) << "missing golden file " << path;
  return Bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

void write_golden_if_asked(const std::string& path, const Bytes& b) {
  if (std::getenv("JOBENGINE_WRITE_GOLDEN") != nullptr) {
    std::ofstream(path, std::ios::binary).write(reinterpret_cast<const char*>(b.data()),
                                                static_cast<std::streamsize>(b.size()));
  }
}

// Version-1 images were written by the version-1 encoder; they are never
// regenerated, and must keep loading (FORMAT.md, "Version policy").
// The encoder and the decoder hash the image in ~64 KiB pieces as they go
// (one pass over memory): across many pieces the trailer must still hold the
// one-shot XXH3 of everything before it, each record its own, and a flipped
// byte in any piece must still be caught.
TEST(SnapshotChecksumTest, StreamedImageChecksumIsTheOneShotHashAcrossManyChunks) {
  const Bytes image = mixed_image(3000, 77);  // ~900 KiB: some 14 pieces
  ASSERT_GT(image.size(), std::size_t{512} << 10);
  const std::size_t t = image.size() - kTrailerBytes;
  std::uint64_t stored = 0;
  for (int i = 0; i < 8; ++i) stored |= std::uint64_t{image[t + 8 + i]} << (8 * i);
  EXPECT_EQ(stored, checksum(image.data(), t));
  auto view = decode(image);
  ASSERT_TRUE(view.ok()) << view.status().to_string();
  EXPECT_EQ(view->jobs.size(), 3000u);
  // A byte of submit_ns changed in the first, a middle and the last record,
  // that record's own checksum resealed: only the image checksum can tell.
  for (std::size_t k : {std::size_t{0}, view->jobs.size() / 2, view->jobs.size() - 1}) {
    Bytes bad = image;
    const std::size_t rec = view->jobs[k].offset;
    bad[rec + 24] ^= 0x40;
    reseal_record(bad, rec);
    DecodeError e;
    auto r = decode(bad, &e);
    ASSERT_FALSE(r.ok()) << "record " << k;
    EXPECT_NE(r.status().to_string().find("image checksum mismatch"), std::string::npos)
        << r.status().to_string();
    reseal_image(bad);
    EXPECT_TRUE(decode(bad).ok()) << "record " << k;
  }
}

TEST(SnapshotChecksumTest, EncoderGivesTheChecksumOfEveryByteForTheSharedMemoryStore) {
  Encoder e;
  for (int jobs : {0, 1, 3000}) {
    Header h;
    h.generation = 9;
    e.begin(h);
    e.add_handler("a");
    std::string payload(100, 'p');
    for (int i = 0; i < jobs; ++i) {
      JobRecord j;
      j.id = 1 + static_cast<JobId>(i);
      j.payload = payload;
      e.add_job(j);
    }
    const std::span<const unsigned char> image = e.finish();
    EXPECT_EQ(e.whole_checksum(), checksum(image.data(), image.size())) << jobs << " jobs";
  }
}

TEST(SnapshotGoldenTest, GoldenV1SmallStillLoads) {
  Bytes golden = read_golden(golden_path("v1-small.jobsnap"));
  ASSERT_EQ(golden.size(), 177u);
  auto v = decode(golden);
  ASSERT_TRUE(v.ok()) << v.status().to_string();
  EXPECT_EQ(v->header.format_version, 1u);
  EXPECT_EQ(v->header.generation, 3u);
  EXPECT_EQ(v->header.next_job_id, 8u);
  ASSERT_EQ(v->jobs.size(), 1u);
  EXPECT_EQ(v->jobs[0].id, 7u);
  EXPECT_EQ(v->jobs[0].payload, "hi");
  EXPECT_EQ(v->jobs[0].key, "");
  EXPECT_EQ(v->handlers[v->jobs[0].handler], "email");
  // Re-encoding a version-1 image writes the version-2 worked example.
  Encoder e;
  e.begin(v->header);
  for (auto name : v->handlers) e.add_handler(name);
  for (const auto& j : v->jobs) e.add_job(j);
  EXPECT_EQ(to_bytes(e.finish()), small_image());
}

// Rule 6's order holds for version 1 too: a bit flipped in a record's
// reserved field is a checksum mismatch at the record's offset (the reserved
// check came first, and named offset + 22), in decode() and verify() alike.
TEST(SnapshotGoldenTest, DamageToAV1RecordsReservedFieldIsItsChecksumFirst) {
  Bytes golden = read_golden(golden_path("v1-small.jobsnap"));
  auto clean = decode(golden);
  ASSERT_TRUE(clean.ok()) << clean.status().to_string();
  const std::uint64_t rec = clean->jobs.at(0).offset;
  golden[rec + 22] ^= 0x01;
  DecodeError strict;
  auto d = decode(golden, &strict);
  ASSERT_FALSE(d.ok());
  EXPECT_EQ(strict.offset, rec) << d.status().to_string();
  EXPECT_NE(d.status().message().find("checksum mismatch"), std::string::npos)
      << d.status().to_string();
  DecodeError checked;
  auto v = verify(golden, &checked);
  ASSERT_FALSE(v.ok());
  EXPECT_EQ(checked.offset, rec) << v.status().to_string();
  EXPECT_EQ(v.status().message(), d.status().message());
}

TEST(SnapshotGoldenTest, GoldenV1MixedStillLoadsWithTheSameJobs) {
  Bytes golden = read_golden(golden_path("v1-mixed.jobsnap"));
  auto v = decode(golden);
  ASSERT_TRUE(v.ok()) << v.status().to_string();
  EXPECT_EQ(v->header.format_version, 1u);
  EXPECT_EQ(v->jobs.size(), 50u);
  Bytes now = mixed_image(50, 7, /*v2_fields=*/false);
  auto w = decode(now);
  ASSERT_TRUE(w.ok()) << w.status().to_string();
  expect_same_jobs(*v, *w);
}

TEST(SnapshotGoldenTest, GoldenV2SmallLoadsAndMatchesTheEncoder) {
  // Regenerate (only when the encoder changes on purpose, with a version bump):
  //   JOBENGINE_WRITE_GOLDEN=1 build/release/tests/snapshot_format_test --gtest_filter='SnapshotGolden*V2*'
  const std::string path = golden_path("v2-small.jobsnap");
  write_golden_if_asked(path, small_image());
  Bytes golden = read_golden(path);
  auto v = decode(golden);
  ASSERT_TRUE(v.ok()) << v.status().to_string();
  EXPECT_EQ(v->header.format_version, 2u);
  ASSERT_EQ(v->jobs.size(), 1u);
  EXPECT_EQ(v->jobs[0].payload, "hi");
  EXPECT_EQ(golden, small_image()) << "the encoder no longer writes version 2 byte for byte";
}

TEST(SnapshotGoldenTest, GoldenV2MixedLoads) {
  const std::string path = golden_path("v2-mixed.jobsnap");
  write_golden_if_asked(path, mixed_image(50, 7));
  Bytes golden = read_golden(path);
  auto v = decode(golden);
  ASSERT_TRUE(v.ok()) << v.status().to_string();
  EXPECT_EQ(v->jobs.size(), 50u);
  EXPECT_EQ(golden, mixed_image(50, 7));
}

TEST(SnapshotFormatTest, VersionTwoFieldsRoundTrip) {
  Encoder e;
  e.begin(Header{});
  e.add_handler("h");
  JobRecord j;
  j.id = 9;
  j.state = JobState::kDead;
  j.dead_reason = DeadReason::kPoison;
  j.dead_at_ns = 123456789;
  j.deadline_ns = 5'000'000;
  j.cancel_requested = true;
  j.payload = "pay";
  j.error = "boom";
  j.key = "order-42";
  e.add_job(j);
  Bytes b = to_bytes(e.finish());
  auto v = decode(b);
  ASSERT_TRUE(v.ok()) << v.status().to_string();
  const JobRecordView& r = v->jobs[0];
  EXPECT_EQ(r.dead_reason, DeadReason::kPoison);
  EXPECT_EQ(r.dead_at_ns, 123456789);
  EXPECT_EQ(r.deadline_ns, 5'000'000u);
  EXPECT_TRUE(r.cancel_requested);
  EXPECT_EQ(r.payload, "pay");
  EXPECT_EQ(r.error, "boom");
  EXPECT_EQ(r.key, "order-42");
}

// ---- one test per reader error path -----------------------------------------

void expect_problem(const Bytes& b, Problem problem, std::uint64_t offset, const char* words) {
  DecodeError err;
  auto v = decode(b, &err);
  ASSERT_FALSE(v.ok());
  EXPECT_EQ(err.problem, problem) << v.status().to_string();
  EXPECT_EQ(err.offset, offset) << v.status().to_string();
  EXPECT_NE(v.status().to_string().find(words), std::string::npos) << v.status().to_string();
}

TEST(SnapshotDecodeErrorTest, ShorterThanHeaderAndTrailerIsTruncated) {
  Bytes b = small_image();
  b.resize(100);
  expect_problem(b, Problem::kTruncated, 100, "shorter than header");
}

TEST(SnapshotDecodeErrorTest, BadMagicIsCorrupt) {
  Bytes b = small_image();
  b[0] = 'X';
  expect_problem(b, Problem::kCorrupt, 0, "bad magic");
}

TEST(SnapshotDecodeErrorTest, NewerVersionIsUnsupported) {
  Bytes b = small_image();
  b[8] = 3;
  DecodeError err;
  auto v = decode(b, &err);
  ASSERT_FALSE(v.ok());
  EXPECT_EQ(err.problem, Problem::kUnsupportedVersion);
  EXPECT_EQ(v.status().code(), StatusCode::kFailedPrecondition);
  EXPECT_NE(v.status().to_string().find("reads up to 2"), std::string::npos);
}

TEST(SnapshotDecodeErrorTest, HeaderChecksumMismatchIsCorrupt) {
  Bytes b = small_image();
  b[16] ^= 1;  // generation
  expect_problem(b, Problem::kCorrupt, 88, "header checksum");
}

TEST(SnapshotDecodeErrorTest, UnknownFlagsAreCorrupt) {
  Bytes b = small_image();
  b[12] = 1;
  reseal_header(b);
  expect_problem(b, Problem::kCorrupt, 12, "flags");
}

TEST(SnapshotDecodeErrorTest, TruncatedTailIsTruncated) {
  Bytes b = mixed_image(20, 3);
  b.resize(b.size() - 40);
  expect_problem(b, Problem::kTruncated, b.size(), "header says");
}

TEST(SnapshotDecodeErrorTest, TrailingBytesAreCorrupt) {
  Bytes b = small_image();
  b.push_back(0);
  expect_problem(b, Problem::kCorrupt, 197, "trailing bytes");
}

TEST(SnapshotDecodeErrorTest, HugeJobCountIsRejectedBeforeAllocating) {
  Bytes b = small_image();
  put64(b.data() + 56, std::uint64_t{1} << 31);
  reseal_header(b);
  expect_problem(b, Problem::kCorrupt, 56, "cannot fit");
  put64(b.data() + 56, ~std::uint64_t{0});
  reseal_header(b);
  expect_problem(b, Problem::kCorrupt, 56, "exceeds");
}

TEST(SnapshotDecodeErrorTest, HugeHandlerCountIsRejected) {
  Bytes b = small_image();
  put32(b.data() + 48, 70000);
  reseal_header(b);
  expect_problem(b, Problem::kCorrupt, 48, "handler_count");
}

TEST(SnapshotDecodeErrorTest, BadTrailerMagicIsCorrupt) {
  Bytes b = small_image();
  b[197 - 16] = 'x';
  expect_problem(b, Problem::kCorrupt, 197 - 16, "trailer magic");
}

TEST(SnapshotDecodeErrorTest, ZeroLengthHandlerNameIsCorrupt) {
  Bytes b = small_image();
  b[96] = 0;
  reseal_header(b);
  expect_problem(b, Problem::kCorrupt, 96, "name length 0");
}

TEST(SnapshotDecodeErrorTest, RecordLengthOutOfBoundsIsCorrupt) {
  Bytes b = small_image();
  put32(b.data() + 103, 0x7fffffff);
  expect_problem(b, Problem::kCorrupt, 103, "out of bounds");
}

TEST(SnapshotDecodeErrorTest, RecordLengthDisagreeingWithPayloadIsCorrupt) {
  Bytes b = small_image();
  put32(b.data() + 103 + 56, 3);  // payload_len 3, record says 2
  expect_problem(b, Problem::kCorrupt, 103, "do not match");
}

TEST(SnapshotDecodeErrorTest, RecordChecksumMismatchNamesTheRecord) {
  Bytes b = mixed_image(10, 5);
  auto v = decode(b);
  ASSERT_TRUE(v.ok());
  const std::size_t rec = v->jobs[4].offset;
  b[rec + 4 + 44 + 1] ^= 0x40;  // inside job 4's fixed fields or payload
  expect_problem(b, Problem::kCorrupt, rec, "job record 4");
}

TEST(SnapshotDecodeErrorTest, ZeroIdIsCorrupt) {
  Bytes b = small_image();
  put64(b.data() + 103 + 4, 0);
  reseal_record(b, 103);
  expect_problem(b, Problem::kCorrupt, 107, "id 0");
}

TEST(SnapshotDecodeErrorTest, HandlerIndexOutOfRangeIsCorrupt) {
  Bytes b = small_image();
  put32(b.data() + 103 + 12, 1);
  reseal_record(b, 103);
  expect_problem(b, Problem::kCorrupt, 115, "handler index");
}

TEST(SnapshotDecodeErrorTest, BadPriorityIsCorrupt) {
  Bytes b = small_image();
  b[103 + 16] = 3;
  reseal_record(b, 103);
  expect_problem(b, Problem::kCorrupt, 119, "priority");
}

TEST(SnapshotDecodeErrorTest, BadStateIsCorrupt) {
  Bytes b = small_image();
  b[103 + 17] = 9;
  reseal_record(b, 103);
  expect_problem(b, Problem::kCorrupt, 120, "state");
}

TEST(SnapshotDecodeErrorTest, ReservedRecordBytesAreCorrupt) {
  Bytes b = small_image();
  b[103 + 66] = 1;
  reseal_record(b, 103);
  expect_problem(b, Problem::kCorrupt, 169, "reserved");
}

TEST(SnapshotDecodeErrorTest, UnknownRecordFlagsAreCorrupt) {
  Bytes b = small_image();
  b[103 + 22] = 2;
  reseal_record(b, 103);
  expect_problem(b, Problem::kCorrupt, 125, "unknown flags");
}

TEST(SnapshotDecodeErrorTest, DeadReasonOnALiveJobIsCorrupt) {
  Bytes b = small_image();
  b[103 + 23] = 1;  // pending with a dead reason
  reseal_record(b, 103);
  expect_problem(b, Problem::kCorrupt, 126, "dead_reason");
}

TEST(SnapshotDecodeErrorTest, OverlongKeyIsCorrupt) {
  Bytes b = small_image();
  b[103 + 64] = 0;
  b[103 + 65] = 1;  // key_len 256
  reseal_record(b, 103);
  expect_problem(b, Problem::kCorrupt, 103, "do not match");
}

TEST(SnapshotDecodeErrorTest, VersionOneReservedRecordBytesAreCorrupt) {
  Bytes b = read_golden(golden_path("v1-small.jobsnap"));
  b[103 + 22] = 1;
  reseal_record(b, 103);
  expect_problem(b, Problem::kCorrupt, 125, "reserved");
}

TEST(SnapshotDecodeErrorTest, GapBeforeTrailerIsCorrupt) {
  // A body one byte longer than its handlers and records.
  Bytes b = small_image();
  b.insert(b.begin() + 181, 0);
  put64(b.data() + 64, 86);
  reseal_header(b);
  reseal_image(b);
  expect_problem(b, Problem::kCorrupt, 181, "unparsed bytes");
}

TEST(SnapshotDecodeErrorTest, ImageChecksumMismatchIsCorrupt) {
  Bytes b = small_image();
  b[197 - 1] ^= 1;
  expect_problem(b, Problem::kCorrupt, 197 - 8, "image checksum");
}

TEST(SnapshotDecodeErrorTest, ChecksumsCanBeSkippedForFuzzing) {
  Bytes b = small_image();
  b[197 - 1] ^= 1;
  DecodeError err;
  EXPECT_TRUE(decode(b, &err, /*verify_checksums=*/false).ok());
}

TEST(SnapshotDecodeErrorTest, EveryTruncationAndBitFlipIsRejectedNeverCrashes) {
  // Exhaustive on a small image: every prefix fails cleanly; every single-bit
  // flip is caught by some check.
  const Bytes good = mixed_image(3, 11);
  for (std::size_t n = 0; n < good.size(); ++n) {
    Bytes b(good.begin(), good.begin() + static_cast<std::ptrdiff_t>(n));
    ASSERT_FALSE(decode(b).ok()) << "prefix of " << n << " bytes decoded";
  }
  for (std::size_t i = 0; i < good.size(); ++i) {
    for (int bit = 0; bit < 8; ++bit) {
      Bytes b = good;
      b[i] ^= static_cast<unsigned char>(1 << bit);
      ASSERT_FALSE(decode(b).ok()) << "flip of bit " << bit << " at " << i << " went unnoticed";
    }
  }
}

// ---- verify() and RecordReader: recovery's decoder ---------------------------

// The records of a verified image, read back with a RecordReader.
SnapshotView read_all(const Bytes& b, const SnapshotView& verified) {
  SnapshotView out = verified;
  RecordReader reader(b, verified);
  JobRecordView j;
  while (reader.next(j)) out.jobs.push_back(j);
  return out;
}

TEST(SnapshotVerifyTest, AcceptsWhatDecodeAcceptsAndTheReaderGivesTheSameRecords) {
  Bytes golden_v1 = read_golden(golden_path("v1-mixed.jobsnap"));
  for (const Bytes& b : {mixed_image(500, 5), small_image(), golden_v1, mixed_image(0, 1)}) {
    auto decoded = decode(b);
    ASSERT_TRUE(decoded.ok()) << decoded.status().to_string();
    auto verified = verify(b);
    ASSERT_TRUE(verified.ok()) << verified.status().to_string();
    EXPECT_TRUE(verified->jobs.empty());
    EXPECT_EQ(verified->header.generation, decoded->header.generation);
    EXPECT_EQ(verified->header.job_count, decoded->jobs.size());
    EXPECT_EQ(verified->handlers, decoded->handlers);
    EXPECT_EQ(verified->image_checksum, decoded->image_checksum);
    EXPECT_EQ(verified->records_offset, decoded->records_offset);
    EXPECT_EQ(verified->live_records, decoded->live_records);
    EXPECT_EQ(verified->max_payload_bytes, decoded->max_payload_bytes);
    // The statistics, counted here independently.
    std::uint64_t live = 0;
    std::uint32_t max_payload = 0;
    for (const auto& j : decoded->jobs) {
      if (j.state != JobState::kDead && !j.cancel_requested) ++live;
      max_payload = std::max(max_payload, static_cast<std::uint32_t>(j.payload.size()));
    }
    EXPECT_EQ(verified->live_records, live);
    EXPECT_EQ(verified->max_payload_bytes, max_payload);
    if (!decoded->jobs.empty()) {
      EXPECT_EQ(verified->records_offset, decoded->jobs.front().offset);
    }
    if (decoded->jobs.size() >= 100) {  // the mixed images hold dead and cancelled jobs too
      EXPECT_GT(live, 0u);
      EXPECT_LT(live, decoded->jobs.size());
    }
    SnapshotView read = read_all(b, *verified);
    expect_same_jobs(read, *decoded);
    for (std::size_t i = 0; i < read.jobs.size(); ++i) {
      EXPECT_EQ(read.jobs[i].offset, decoded->jobs[i].offset);
    }
  }
}

TEST(SnapshotVerifyTest, NamesTheSameFirstProblemAsDecodeForEveryTruncationAndBitFlip) {
  // verify() checks the image checksum first and the record checksums only
  // when it fails: the report must still be decode()'s, byte for byte.
  const Bytes good = mixed_image(3, 11);
  auto same = [](const Bytes& b, const std::string& what) {
    DecodeError de, ve;
    auto d = decode(b, &de);
    auto v = verify(b, &ve);
    ASSERT_FALSE(d.ok()) << what;
    ASSERT_FALSE(v.ok()) << what << " verified";
    EXPECT_EQ(v.status().to_string(), d.status().to_string()) << what;
    EXPECT_EQ(ve.problem, de.problem) << what;
    EXPECT_EQ(ve.offset, de.offset) << what;
  };
  for (std::size_t n = 0; n < good.size(); ++n) {
    same(Bytes(good.begin(), good.begin() + static_cast<std::ptrdiff_t>(n)),
         "prefix of " + std::to_string(n));
  }
  for (std::size_t i = 0; i < good.size(); ++i) {
    for (int bit = 0; bit < 8; ++bit) {
      Bytes b = good;
      b[i] ^= static_cast<unsigned char>(1 << bit);
      same(b, "flip of bit " + std::to_string(bit) + " at " + std::to_string(i));
    }
  }
}

TEST(SnapshotVerifyTest, TrustsTheImageChecksumOverARecordChecksumItCovers) {
  // A record checksum written wrong and the image sealed over it (an encoder
  // bug, not damage): decode() names the record, verify() accepts the image,
  // as FORMAT.md's reading rules say.
  Bytes b = mixed_image(20, 3);
  auto decoded = decode(b);
  ASSERT_TRUE(decoded.ok());
  const std::size_t rec = decoded->jobs[7].offset;
  const std::uint32_t len = static_cast<std::uint32_t>(b[rec] | (b[rec + 1] << 8) |
                                                       (b[rec + 2] << 16) | (b[rec + 3] << 24));
  b[rec + 4 + len - 8] ^= 0x01;  // the record checksum's low byte
  reseal_image(b);
  DecodeError err;
  auto strict = decode(b, &err);
  ASSERT_FALSE(strict.ok());
  EXPECT_EQ(err.offset, rec);
  EXPECT_NE(strict.status().to_string().find("checksum mismatch"), std::string::npos);
  auto verified = verify(b);
  ASSERT_TRUE(verified.ok()) << verified.status().to_string();
  SnapshotView read = read_all(b, *verified);
  expect_same_jobs(read, *decoded);
}

}  // namespace
}  // namespace jobengine::snapshot
