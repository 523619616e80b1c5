// ShmStore (persistence/shm_store.h): round trips, growth, a writer killed at
// random points of a publish (fork + SIGKILL), readers racing a writer, a
// segment truncated under a reader (fork), permissions, and one test per
// error path, made by byte surgery on the segment's file in /dev/shm. Every
// test uses its own segment name (jobengine-test-<pid>-<n>) and removes it at
// the end.
//
// Randomized tests print their seed; JOBENGINE_TEST_SEED=<n> replays one.
#include "persistence/shm_store.h"
#include "jobengine/snapshot_format.h"  // snapshot::checksum

#include <fcntl.h>
#include <gtest/gtest.h>
#include <poll.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <iterator>
#include <memory>
#include <mutex>
#include <random>
#include <span>
#include <string>
#include <thread>
#include <vector>

namespace jobengine::persist {
namespace {

using Bytes = std::vector<unsigned char>;

// The control-block layout documented in shm_store.h. Pinned here on purpose:
// changing it must bump the layout version.
constexpr off_t kMagicAt = 0;
constexpr off_t kLayoutVersionAt = 8;
constexpr off_t kActiveAt = 64;
constexpr off_t kSlotAt[2] = {128, 192};
constexpr off_t kVersionField = 0;
constexpr off_t kOffsetField = 8;
constexpr off_t kCapacityField = 16;
constexpr off_t kLengthField = 24;
constexpr std::size_t kControlBytes = 4096;

std::string unique_name() {
  static std::atomic<int> counter{0};
  return "jobengine-test-" + std::to_string(::getpid()) + "-" + std::to_string(counter++);
}

std::string path_of(const std::string& name) { return "/dev/shm/" + name; }

std::uint64_t test_seed() {
  if (const char* env = std::getenv("JOBENGINE_TEST_SEED")) return std::strtoull(env, nullptr, 10);
  return std::random_device{}();
}

// A segment name that is removed when the test ends, however it ends.
class ScopedSegment {
 public:
  ScopedSegment() : name_(unique_name()) { EXPECT_TRUE(ShmStore::remove(name_).ok()); }
  ~ScopedSegment() {
    const Status s = ShmStore::remove(name_);
    EXPECT_TRUE(s.ok()) << s.to_string();
  }
  ScopedSegment(const ScopedSegment&) = delete;
  ScopedSegment& operator=(const ScopedSegment&) = delete;
  const std::string& name() const { return name_; }

 private:
  std::string name_;
};

// A test image: generation and size, then words derived from both, so that a
// mix of two images or a shifted copy is caught independently of the store's
// own checksum.
void fill_image(Bytes& b, std::uint64_t generation, std::size_t size) {
  b.resize(std::max<std::size_t>(size, 16));
  const std::uint64_t header[2] = {generation, b.size()};
  std::memcpy(b.data(), header, 16);
  const std::size_t words = b.size() / 8;
  for (std::size_t i = 2; i < words; ++i) {
    const std::uint64_t w = (generation * 0x9E3779B97F4A7C15ULL) ^ i;
    std::memcpy(b.data() + i * 8, &w, 8);
  }
  for (std::size_t i = words * 8; i < b.size(); ++i) {
    b[i] = static_cast<unsigned char>(generation + i);
  }
}

Bytes make_image(std::uint64_t generation, std::size_t size) {
  Bytes b;
  fill_image(b, generation, size);
  return b;
}

// Checks an image made by fill_image and gives its generation.
::testing::AssertionResult intact(const Bytes& b, std::uint64_t* generation) {
  if (b.size() < 16) return ::testing::AssertionFailure() << "image of " << b.size() << " bytes";
  std::uint64_t header[2];
  std::memcpy(header, b.data(), 16);
  if (header[1] != b.size()) {
    return ::testing::AssertionFailure()
           << "size field " << header[1] << " in a " << b.size() << "-byte image";
  }
  Bytes expected;
  fill_image(expected, header[0], b.size());
  if (expected != b) {
    const auto diff = std::mismatch(b.begin(), b.end(), expected.begin());
    return ::testing::AssertionFailure()
           << "generation " << header[0] << " image differs at byte " << (diff.first - b.begin());
  }
  *generation = header[0];
  return ::testing::AssertionSuccess();
}

// ---- byte surgery on /dev/shm/<name> ------------------------------------

std::uint64_t peek64(const std::string& name, off_t at) {
  std::uint64_t v = 0;
  const int fd = ::open(path_of(name).c_str(), O_RDONLY | O_CLOEXEC);
  EXPECT_GE(fd, 0) << std::strerror(errno);
  EXPECT_EQ(::pread(fd, &v, sizeof v, at), static_cast<ssize_t>(sizeof v));
  ::close(fd);
  return v;
}

std::uint32_t peek32(const std::string& name, off_t at) {
  std::uint32_t v = 0;
  const int fd = ::open(path_of(name).c_str(), O_RDONLY | O_CLOEXEC);
  EXPECT_GE(fd, 0) << std::strerror(errno);
  EXPECT_EQ(::pread(fd, &v, sizeof v, at), static_cast<ssize_t>(sizeof v));
  ::close(fd);
  return v;
}

void poke(const std::string& name, off_t at, const void* data, std::size_t n) {
  const int fd = ::open(path_of(name).c_str(), O_RDWR | O_CLOEXEC);
  ASSERT_GE(fd, 0) << std::strerror(errno);
  ASSERT_EQ(::pwrite(fd, data, n, at), static_cast<ssize_t>(n));
  ::close(fd);
}
void poke64(const std::string& name, off_t at, std::uint64_t v) { poke(name, at, &v, sizeof v); }
void poke32(const std::string& name, off_t at, std::uint32_t v) { poke(name, at, &v, sizeof v); }

off_t slot_field(std::uint32_t slot, off_t field) { return kSlotAt[slot] + field; }

// Makes /dev/shm/<name> by hand: mode 0600 and `size` zero bytes.
void make_raw_segment(const std::string& name, off_t size) {
  const int fd = ::open(path_of(name).c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  ASSERT_GE(fd, 0) << std::strerror(errno);
  ASSERT_EQ(::fchmod(fd, 0600), 0);
  ASSERT_EQ(::ftruncate(fd, size), 0);
  ::close(fd);
}

struct stat stat_of(const std::string& name) {
  struct stat st {};
  EXPECT_EQ(::stat(path_of(name).c_str(), &st), 0) << std::strerror(errno);
  return st;
}

// A segment holding one published image of generation 1, store closed.
void make_published_segment(const std::string& name, std::size_t image_size = 5000) {
  auto store = ShmStore::open_or_create(name, 4096);
  ASSERT_TRUE(store.ok()) << store.status().to_string();
  ASSERT_TRUE((*store)->publish(1, make_image(1, image_size)).ok());
}

bool contains(std::string_view haystack, std::string_view needle) {
  return haystack.find(needle) != std::string_view::npos;
}

// ---- round trips ---------------------------------------------------------

TEST(ShmStoreTest, CreatePublishReadRoundTrip) {
  ScopedSegment seg;
  auto store = ShmStore::open_or_create(seg.name(), 4096);
  ASSERT_TRUE(store.ok()) << store.status().to_string();
  EXPECT_EQ((*store)->name(), seg.name());
  const std::uint64_t magic = peek64(seg.name(), kMagicAt);
  EXPECT_EQ(std::string(reinterpret_cast<const char*>(&magic), 8), "JOBSHM01");

  EXPECT_EQ((*store)->read_active().status().code(), StatusCode::kNotFound);
  EXPECT_EQ(ShmStore::read_existing(seg.name()).status().code(), StatusCode::kNotFound);

  const Bytes image = make_image(1, 1000);
  ASSERT_TRUE((*store)->publish(1, image).ok());
  auto active = (*store)->read_active();
  ASSERT_TRUE(active.ok()) << active.status().to_string();
  EXPECT_EQ(*active, image);
  auto existing = ShmStore::read_existing(seg.name());
  ASSERT_TRUE(existing.ok()) << existing.status().to_string();
  EXPECT_EQ(*existing, image);
}

TEST(ShmStoreTest, EachPublishFlipsTheActiveSlotAndReadsReturnTheNewest) {
  ScopedSegment seg;
  auto store = ShmStore::open_or_create(seg.name(), 4096);
  ASSERT_TRUE(store.ok()) << store.status().to_string();
  std::uint32_t previous_active = peek32(seg.name(), kActiveAt);
  for (std::uint64_t gen = 1; gen <= 6; ++gen) {
    const Bytes image = make_image(gen, 700 + gen * 100);
    ASSERT_TRUE((*store)->publish(gen, image).ok());
    const std::uint32_t active = peek32(seg.name(), kActiveAt);
    EXPECT_NE(active, previous_active) << "generation " << gen;
    previous_active = active;
    auto read = (*store)->read_active();
    ASSERT_TRUE(read.ok()) << read.status().to_string();
    EXPECT_EQ(*read, image);
    auto existing = ShmStore::read_existing(seg.name());
    ASSERT_TRUE(existing.ok()) << existing.status().to_string();
    EXPECT_EQ(*existing, image);
  }
}

TEST(ShmStoreTest, EmptyImageRoundTrips) {
  ScopedSegment seg;
  auto store = ShmStore::open_or_create(seg.name(), 0);
  ASSERT_TRUE(store.ok()) << store.status().to_string();
  ASSERT_TRUE((*store)->publish(1, Bytes{}).ok());
  auto read = (*store)->read_active();
  ASSERT_TRUE(read.ok()) << read.status().to_string();
  EXPECT_TRUE(read->empty());
  const Bytes image = make_image(2, 100);
  ASSERT_TRUE((*store)->publish(2, image).ok());
  auto existing = ShmStore::read_existing(seg.name());
  ASSERT_TRUE(existing.ok()) << existing.status().to_string();
  EXPECT_EQ(*existing, image);
}

TEST(ShmStoreTest, SegmentOutlivesTheStoreAndAReopenedWriterKeepsItsImage) {
  ScopedSegment seg;
  const Bytes first = make_image(1, 3000);
  {
    auto store = ShmStore::open_or_create(seg.name(), 4096);
    ASSERT_TRUE(store.ok()) << store.status().to_string();
    ASSERT_TRUE((*store)->publish(1, first).ok());
  }
  auto existing = ShmStore::read_existing(seg.name());
  ASSERT_TRUE(existing.ok()) << existing.status().to_string();
  EXPECT_EQ(*existing, first);

  auto store = ShmStore::open_or_create(seg.name(), 1 << 20);  // initial_bytes ignored
  ASSERT_TRUE(store.ok()) << store.status().to_string();
  auto read = (*store)->read_active();
  ASSERT_TRUE(read.ok()) << read.status().to_string();
  EXPECT_EQ(*read, first);
  const Bytes second = make_image(2, 9000);
  ASSERT_TRUE((*store)->publish(2, second).ok());
  read = (*store)->read_active();
  ASSERT_TRUE(read.ok()) << read.status().to_string();
  EXPECT_EQ(*read, second);
}

TEST(ShmStoreTest, SecondWriterOnTheSameSegmentIsRefusedUntilTheFirstCloses) {
  ScopedSegment seg;
  auto first = ShmStore::open_or_create(seg.name(), 4096);
  ASSERT_TRUE(first.ok()) << first.status().to_string();
  ASSERT_TRUE((*first)->publish(1, make_image(1, 500)).ok());
  auto second = ShmStore::open_or_create(seg.name(), 4096);
  ASSERT_FALSE(second.ok());
  EXPECT_EQ(second.status().code(), StatusCode::kFailedPrecondition);
  EXPECT_NE(second.status().to_string().find("another engine"), std::string::npos)
      << second.status().to_string();
  // Readers are not writers: read_existing still works.
  auto existing = ShmStore::read_existing(seg.name());
  ASSERT_TRUE(existing.ok()) << existing.status().to_string();
  first->reset();
  auto third = ShmStore::open_or_create(seg.name(), 4096);
  ASSERT_TRUE(third.ok()) << third.status().to_string();
}

// Images from 1 KiB to 10 MiB force the slots to grow (and to be placed
// around each other); every read returns the newest image intact, the two
// slots never overlap, and the segment stays within the documented bound.
TEST(ShmStoreTest, GrowingImagesFromOneKibToTenMibAlwaysReadTheNewest) {
  ScopedSegment seg;
  auto store = ShmStore::open_or_create(seg.name(), 1024);
  ASSERT_TRUE(store.ok()) << store.status().to_string();
  std::vector<std::size_t> sizes;
  for (std::size_t s = 1024; s < (10u << 20); s *= 2) sizes.push_back(s);
  sizes.push_back(10u << 20);
  sizes.push_back(3u << 20);  // shrinking again fits the existing slots
  std::uint64_t gen = 0;
  for (const std::size_t size : sizes) {
    ++gen;
    const Bytes image = make_image(gen, size);
    ASSERT_TRUE((*store)->publish(gen, image).ok()) << size;
    auto read = (*store)->read_active();
    ASSERT_TRUE(read.ok()) << read.status().to_string();
    std::uint64_t read_gen = 0;
    ASSERT_TRUE(intact(*read, &read_gen));
    EXPECT_EQ(read_gen, gen);
    auto existing = ShmStore::read_existing(seg.name());
    ASSERT_TRUE(existing.ok()) << existing.status().to_string();
    EXPECT_EQ(*existing, image);

    std::uint64_t offset[2], capacity[2];
    for (std::uint32_t i = 0; i < 2; ++i) {
      offset[i] = peek64(seg.name(), slot_field(i, kOffsetField));
      capacity[i] = peek64(seg.name(), slot_field(i, kCapacityField));
      EXPECT_GE(offset[i], kControlBytes);
      EXPECT_LE(peek64(seg.name(), slot_field(i, kLengthField)), capacity[i]);
    }
    EXPECT_TRUE(offset[0] + capacity[0] <= offset[1] || offset[1] + capacity[1] <= offset[0])
        << "slots overlap: [" << offset[0] << ", +" << capacity[0] << ") and [" << offset[1]
        << ", +" << capacity[1] << ")";
    const auto size_now = static_cast<std::uint64_t>(stat_of(seg.name()).st_size);
    EXPECT_LE(size_now, kControlBytes + 3 * std::max(capacity[0], capacity[1]));
  }
}

// RLIMIT_FSIZE makes posix_fallocate fail with EFBIG (SIGXFSZ ignored): the
// publish that needs to grow fails with kIoError, the previous image stays
// active, and once growth is possible again the next publish succeeds.
TEST(ShmStoreTest, GrowthFailureReturnsIoErrorAndKeepsThePreviousImage) {
  ScopedSegment seg;
  auto store = ShmStore::open_or_create(seg.name(), 4096);
  ASSERT_TRUE(store.ok()) << store.status().to_string();
  const Bytes first = make_image(1, 4000);
  ASSERT_TRUE((*store)->publish(1, first).ok());

  struct rlimit old {};
  ASSERT_EQ(::getrlimit(RLIMIT_FSIZE, &old), 0);
  struct rlimit small = old;
  small.rlim_cur = 1 << 20;
  void (*old_handler)(int) = ::signal(SIGXFSZ, SIG_IGN);
  ASSERT_EQ(::setrlimit(RLIMIT_FSIZE, &small), 0);
  const Status grown = (*store)->publish(2, make_image(2, 4 << 20));
  ::setrlimit(RLIMIT_FSIZE, &old);
  ::signal(SIGXFSZ, old_handler);

  ASSERT_EQ(grown.code(), StatusCode::kIoError) << grown.to_string();
  EXPECT_TRUE(contains(grown.message(), seg.name())) << grown.to_string();
  EXPECT_TRUE(contains(grown.message(), "cannot grow")) << grown.to_string();
  for (auto read : {(*store)->read_active(), ShmStore::read_existing(seg.name())}) {
    ASSERT_TRUE(read.ok()) << read.status().to_string();
    EXPECT_EQ(*read, first);
  }
  const Bytes third = make_image(3, 4 << 20);
  ASSERT_TRUE((*store)->publish(3, third).ok());
  auto read = ShmStore::read_existing(seg.name());
  ASSERT_TRUE(read.ok()) << read.status().to_string();
  EXPECT_EQ(*read, third);
}

// ---- in-place publishing (begin_image / grow_image / commit_image) ----------

// Grows an in-place image's storage `room` to at least `need` bytes, keeping
// the first `written` bytes of `image` already in it, and checks they came
// along wherever the storage went.
::testing::AssertionResult GrowKeeping(ShmStore& store, Result<std::span<unsigned char>>& room,
                                       const Bytes& image, std::size_t written, std::size_t need) {
  room = store.grow_image(need, written);
  if (!room.ok()) return ::testing::AssertionFailure() << room.status().to_string();
  if (room->size() < need) {
    return ::testing::AssertionFailure() << "grew to " << room->size() << " < " << need;
  }
  if (!std::equal(image.begin(), image.begin() + static_cast<std::ptrdiff_t>(written),
                  room->begin())) {
    return ::testing::AssertionFailure() << "bytes lost when the slot grew at " << written;
  }
  return ::testing::AssertionSuccess();
}

// Commits an in-place `image` as `generation` and checks that a reader of the
// segment then gets exactly it.
::testing::AssertionResult CommitAndReadBack(ShmStore& store, const std::string& segment,
                                             std::uint64_t generation, const Bytes& image) {
  Status s = store.commit_image(generation, image.size(),
                                snapshot::checksum(image.data(), image.size()));
  if (!s.ok()) return ::testing::AssertionFailure() << s.to_string();
  auto read = ShmStore::read_existing(segment);
  if (!read.ok()) return ::testing::AssertionFailure() << read.status().to_string();
  if (*read != image) return ::testing::AssertionFailure() << "read back a different image";
  return ::testing::AssertionSuccess();
}

// An image written straight into the slot, its storage grown (moved, and the
// segment grown and mapped afresh) while it is written, publishes exactly as
// publish() would; readers see the previous image until the commit.
TEST(ShmStoreInPlaceTest, ImageWrittenInTheSlotAndGrownMidWayPublishesLikePublish) {
  ScopedSegment seg;
  auto store = ShmStore::open_or_create(seg.name(), 4096);
  ASSERT_TRUE(store.ok()) << store.status().to_string();
  const Bytes first = make_image(1, 3000);
  ASSERT_TRUE((*store)->publish(1, first).ok());
  for (std::uint64_t gen = 2; gen <= 7; ++gen) {
    const Bytes image = make_image(gen, std::size_t{5000} << gen);  // 20 KiB .. 640 KiB
    auto room = (*store)->begin_image(1000);
    ASSERT_TRUE(room.ok()) << room.status().to_string();
    ASSERT_GE(room->size(), 1000u);
    // Writes in pieces, growing the storage whenever the next piece does not fit.
    std::size_t written = 0;
    while (written < image.size()) {
      const std::size_t piece = std::min<std::size_t>(image.size() - written, 1500);
      if (room->size() < written + piece) {
        ASSERT_TRUE(GrowKeeping(**store, room, image, written, written + piece))
            << "generation " << gen;
      }
      std::memcpy(room->data() + written, image.data() + written, piece);
      written += piece;
      auto before = ShmStore::read_existing(seg.name());
      ASSERT_TRUE(before.ok()) << before.status().to_string();
      std::uint64_t seen = 0;
      ASSERT_TRUE(intact(*before, &seen));
      EXPECT_EQ(seen, gen - 1) << "an uncommitted image became visible";
    }
    ASSERT_TRUE(CommitAndReadBack(**store, seg.name(), gen, image)) << "generation " << gen;
    auto active = (*store)->read_active();
    ASSERT_TRUE(active.ok()) << active.status().to_string();
    EXPECT_EQ(*active, image) << "generation " << gen;
  }
}

// Random image sizes, written in random pieces and grown on demand: slots are
// placed and moved every way the placement rule allows, including onto part
// of their own old extent (old and new storage overlapping), and every image
// reads back whole. The test checks that it saw such an overlapping move.
TEST(ShmStoreInPlaceTest, RandomInPlaceImagesSurviveEveryKindOfSlotMove) {
  const std::uint64_t seed = test_seed();
  std::mt19937_64 rng(seed);
  int moves = 0;
  int overlapping_moves = 0;
  // Fresh segments, so that slots start small and move often.
  for (int round = 0; round < 60; ++round) {
    ScopedSegment seg;
    auto store = ShmStore::open_or_create(seg.name(), 4096);
    ASSERT_TRUE(store.ok()) << store.status().to_string();
    for (std::uint64_t gen = 1; gen <= 12; ++gen) {
      const std::size_t size = 16 + rng() % (std::size_t{1} << (8 + rng() % 9));  // < 64 KiB
      const Bytes image = make_image(gen, size);
      auto room = (*store)->begin_image(16);
      ASSERT_TRUE(room.ok()) << room.status().to_string();
      const std::uint32_t slot = 1 - peek32(seg.name(), kActiveAt);
      std::size_t written = 0;
      while (written < image.size()) {
        const std::size_t piece = std::min<std::size_t>(image.size() - written, 1 + rng() % 9000);
        if (room->size() < written + piece) {
          const std::uint64_t old_offset = peek64(seg.name(), kSlotAt[slot] + kOffsetField);
          ASSERT_TRUE(GrowKeeping(**store, room, image, written, written + piece))
              << "seed " << seed << ", round " << round << ", generation " << gen;
          const std::uint64_t new_offset = peek64(seg.name(), kSlotAt[slot] + kOffsetField);
          if (new_offset != old_offset) {
            ++moves;
            const std::uint64_t lo = std::min(old_offset, new_offset);
            const std::uint64_t hi = std::max(old_offset, new_offset);
            if (hi - lo < written) ++overlapping_moves;
          }
        }
        std::memcpy(room->data() + written, image.data() + written, piece);
        written += piece;
      }
      ASSERT_TRUE(CommitAndReadBack(**store, seg.name(), gen, image))
          << "seed " << seed << ", round " << round << ", generation " << gen;
    }
  }
  std::cout << "[ info ] " << moves << " slot moves, " << overlapping_moves
            << " onto part of their own old storage\n";
  EXPECT_GT(moves, 0) << "seed " << seed << ": no slot ever moved";
}

// The move the random test above meets only now and then, made on purpose:
// the inactive slot sits after the control block's first free bytes, with
// more bytes written than it moves by, so its new storage overlaps the old.
// (Placements: 6000 -> slot 1 at 8192; 16000 -> slot 0 at 16384; 10000 ->
// slot 1 at 36864; then slot 0, 20480 bytes at 16384, grows to 24000 bytes and
// moves to 4096, 12288 bytes down.)
TEST(ShmStoreInPlaceTest, ASlotThatMovesOntoPartOfItsOwnStorageKeepsItsBytes) {
  ScopedSegment seg;
  auto store = ShmStore::open_or_create(seg.name(), 4096);
  ASSERT_TRUE(store.ok()) << store.status().to_string();
  ASSERT_TRUE((*store)->publish(1, make_image(1, 6000)).ok());
  ASSERT_TRUE((*store)->publish(2, make_image(2, 16000)).ok());
  ASSERT_TRUE((*store)->publish(3, make_image(3, 10000)).ok());
  const Bytes image = make_image(4, 24000);
  auto room = (*store)->begin_image(16);
  ASSERT_TRUE(room.ok()) << room.status().to_string();
  const std::uint32_t slot = 1 - peek32(seg.name(), kActiveAt);
  const std::uint64_t old_offset = peek64(seg.name(), kSlotAt[slot] + kOffsetField);
  const std::size_t kept = room->size();
  ASSERT_LT(kept, image.size());
  std::memcpy(room->data(), image.data(), kept);
  ASSERT_TRUE(GrowKeeping(**store, room, image, kept, image.size()));
  const std::uint64_t new_offset = peek64(seg.name(), kSlotAt[slot] + kOffsetField);
  ASSERT_LT(new_offset, old_offset) << "the placement rule changed: update this test";
  ASSERT_LT(old_offset - new_offset, kept) << "the placement rule changed: update this test";
  std::memcpy(room->data() + kept, image.data() + kept, image.size() - kept);
  ASSERT_TRUE(CommitAndReadBack(**store, seg.name(), 4, image));
}

TEST(ShmStoreInPlaceTest, AnAbandonedImageLeavesThePreviousOneAndTheNextPublishWorks) {
  ScopedSegment seg;
  auto store = ShmStore::open_or_create(seg.name(), 4096);
  ASSERT_TRUE(store.ok()) << store.status().to_string();
  const Bytes first = make_image(1, 2000);
  ASSERT_TRUE((*store)->publish(1, first).ok());
  auto room = (*store)->begin_image(2000);
  ASSERT_TRUE(room.ok()) << room.status().to_string();
  std::memset(room->data(), 0xee, 2000);  // never committed
  auto read = ShmStore::read_existing(seg.name());
  ASSERT_TRUE(read.ok()) << read.status().to_string();
  EXPECT_EQ(*read, first);
  const Bytes second = make_image(2, 2500);
  ASSERT_TRUE((*store)->publish(2, second).ok());
  read = ShmStore::read_existing(seg.name());
  ASSERT_TRUE(read.ok()) << read.status().to_string();
  EXPECT_EQ(*read, second);
}

TEST(ShmStoreInPlaceTest, MisuseIsRefusedWithAClearErrorAndPublishesNothing) {
  ScopedSegment seg;
  auto store = ShmStore::open_or_create(seg.name(), 4096);
  ASSERT_TRUE(store.ok()) << store.status().to_string();
  const Bytes first = make_image(1, 2000);
  ASSERT_TRUE((*store)->publish(1, first).ok());
  Status s = (*store)->commit_image(2, 10, 0);
  EXPECT_EQ(s.code(), StatusCode::kFailedPrecondition) << s.to_string();
  EXPECT_TRUE(contains(s.message(), "without a successful begin_image")) << s.to_string();
  auto grown = (*store)->grow_image(100, 0);
  EXPECT_EQ(grown.status().code(), StatusCode::kFailedPrecondition) << grown.status().to_string();
  auto room = (*store)->begin_image(100);
  ASSERT_TRUE(room.ok()) << room.status().to_string();
  s = (*store)->commit_image(2, room->size() + 1, 0);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s.to_string();
  EXPECT_TRUE(contains(s.message(), "exceeds the slot's capacity")) << s.to_string();
  grown = (*store)->grow_image(200, room->size() + 1);
  EXPECT_EQ(grown.status().code(), StatusCode::kInvalidArgument) << grown.status().to_string();
  EXPECT_EQ((*store)->begin_image(std::size_t{1} << 62).status().code(),
            StatusCode::kInvalidArgument);
  auto read = ShmStore::read_existing(seg.name());
  ASSERT_TRUE(read.ok()) << read.status().to_string();
  EXPECT_EQ(*read, first);
}

// A slot that cannot grow (a full /dev/shm, here RLIMIT_FSIZE) fails the
// grow_image() with kIoError; the bytes written so far stay readable where
// they were (the encoder copies them out) and the previous image stays active.
TEST(ShmStoreInPlaceTest, GrowthFailureKeepsTheBytesWrittenAndThePreviousImage) {
  ScopedSegment seg;
  auto store = ShmStore::open_or_create(seg.name(), 4096);
  ASSERT_TRUE(store.ok()) << store.status().to_string();
  const Bytes first = make_image(1, 4000);
  ASSERT_TRUE((*store)->publish(1, first).ok());
  auto room = (*store)->begin_image(4000);
  ASSERT_TRUE(room.ok()) << room.status().to_string();
  const Bytes partial = make_image(2, 4000);
  std::memcpy(room->data(), partial.data(), partial.size());

  struct rlimit old {};
  ASSERT_EQ(::getrlimit(RLIMIT_FSIZE, &old), 0);
  struct rlimit small = old;
  small.rlim_cur = 1 << 20;
  void (*old_handler)(int) = ::signal(SIGXFSZ, SIG_IGN);
  ASSERT_EQ(::setrlimit(RLIMIT_FSIZE, &small), 0);
  auto grown = (*store)->grow_image(4 << 20, partial.size());
  ::setrlimit(RLIMIT_FSIZE, &old);
  ::signal(SIGXFSZ, old_handler);

  ASSERT_EQ(grown.status().code(), StatusCode::kIoError) << grown.status().to_string();
  EXPECT_TRUE(contains(grown.status().message(), "cannot grow")) << grown.status().to_string();
  EXPECT_TRUE(std::equal(partial.begin(), partial.end(), room->begin()));
  const Status refused = (*store)->commit_image(2, partial.size(), 0);
  EXPECT_EQ(refused.code(), StatusCode::kFailedPrecondition) << refused.to_string();
  for (auto read : {(*store)->read_active(), ShmStore::read_existing(seg.name())}) {
    ASSERT_TRUE(read.ok()) << read.status().to_string();
    EXPECT_EQ(*read, first);
  }
  const Bytes third = make_image(3, 4 << 20);
  ASSERT_TRUE((*store)->publish(3, third).ok());
  auto read = ShmStore::read_existing(seg.name());
  ASSERT_TRUE(read.ok()) << read.status().to_string();
  EXPECT_EQ(*read, third);
}

// ---- a writer killed at random points ------------------------------------

// The child: creates the segment, publishes generation 1, then ever larger
// (and, past 8 MiB, jittered) images, reporting each completed generation on
// `ack_fd` (8-byte writes to a pipe are atomic) until it is killed.
[[noreturn]] void crash_child(const std::string& name, int ack_fd, std::uint64_t seed) {
  auto store = ShmStore::open_or_create(name, 4096);
  if (!store.ok()) ::_exit(2);
  std::mt19937_64 rng(seed);
  Bytes image;
  for (std::uint64_t gen = 1; gen < 100000; ++gen) {
    const std::size_t base =
        gen == 1 ? 1024 : (std::size_t{16} << 10) << std::min<std::uint64_t>(gen - 2, 9);
    fill_image(image, gen, base + rng() % (base / 2 + 1));
    if (!(*store)->publish(gen, image).ok()) ::_exit(3);
    if (::write(ack_fd, &gen, sizeof gen) != static_cast<ssize_t>(sizeof gen)) ::_exit(4);
  }
  ::_exit(0);
}

TEST(ShmStoreCrashTest, WriterKilledAtRandomPointsLeavesAnIntactImage) {
  const std::uint64_t seed = test_seed();
  std::cout << "[ seed ] JOBENGINE_TEST_SEED=" << seed << "\n";
  SCOPED_TRACE("JOBENGINE_TEST_SEED=" + std::to_string(seed));
  std::mt19937_64 rng(seed);
  constexpr int kRuns = 50;
  int killed_mid_publish = 0;
  for (int run = 0; run < kRuns; ++run) {
    SCOPED_TRACE("run " + std::to_string(run));
    ScopedSegment seg;
    int fds[2];
    ASSERT_EQ(::pipe(fds), 0);
    const std::uint64_t child_seed = rng();
    const auto delay = std::chrono::microseconds(rng() % 20000);
    const pid_t pid = ::fork();
    ASSERT_GE(pid, 0) << std::strerror(errno);
    if (pid == 0) {
      ::close(fds[0]);
      crash_child(seg.name(), fds[1], child_seed);
    }
    ::close(fds[1]);
    // The record kept outside the killed process: generations it completed.
    std::uint64_t acked = 0;
    ssize_t got = ::read(fds[0], &acked, sizeof acked);  // generation 1 is in
    if (got == static_cast<ssize_t>(sizeof acked)) std::this_thread::sleep_for(delay);
    ::kill(pid, SIGKILL);
    int wstatus = 0;
    ASSERT_EQ(::waitpid(pid, &wstatus, 0), pid);
    ASSERT_EQ(got, static_cast<ssize_t>(sizeof acked))
        << "the child died before publishing generation 1, status " << wstatus;
    ASSERT_TRUE(WIFSIGNALED(wstatus)) << "child exited with " << WEXITSTATUS(wstatus);
    for (std::uint64_t g; ::read(fds[0], &g, sizeof g) == static_cast<ssize_t>(sizeof g);) {
      acked = g;
    }
    ::close(fds[0]);

    const std::uint32_t active = peek32(seg.name(), kActiveAt);
    ASSERT_LE(active, 1u);
    if (peek64(seg.name(), slot_field(1 - active, kVersionField)) % 2 == 1) ++killed_mid_publish;

    auto read = ShmStore::read_existing(seg.name());
    ASSERT_TRUE(read.ok()) << read.status().to_string();
    std::uint64_t gen = 0;
    ASSERT_TRUE(intact(*read, &gen));
    // The last acknowledged one, or the next if it was published but the
    // child died before acknowledging it.
    EXPECT_TRUE(gen == acked || gen == acked + 1) << "read " << gen << ", acked " << acked;

    // A new writer takes over whatever the dead one left.
    auto store = ShmStore::open_or_create(seg.name(), 0);
    ASSERT_TRUE(store.ok()) << store.status().to_string();
    const Bytes next = make_image(gen + 1, 3000 + run);
    ASSERT_TRUE((*store)->publish(gen + 1, next).ok());
    auto again = (*store)->read_active();
    ASSERT_TRUE(again.ok()) << again.status().to_string();
    EXPECT_EQ(*again, next);
  }
  std::cout << "[ info ] " << killed_mid_publish << " of " << kRuns
            << " kills landed inside a publish\n";
}

// ---- concurrent readers ----------------------------------------------------

// One thread reads through the writer's own store (read_active), another
// through its own read-only mapping (read_existing, which must remap when the
// segment grows), while the writer publishes 1000 generations of varying
// size, growing the segment on the way. No read may be torn (the store
// verifies checksums, the test the contents) or go back in generations.
TEST(ShmStoreConcurrencyTest, ReadersNeverSeeATornImageWhileAWriterPublishes) {
  const std::uint64_t seed = test_seed();
  std::cout << "[ seed ] JOBENGINE_TEST_SEED=" << seed << "\n";
  SCOPED_TRACE("JOBENGINE_TEST_SEED=" + std::to_string(seed));
  ScopedSegment seg;
  auto opened = ShmStore::open_or_create(seg.name(), 1024);
  ASSERT_TRUE(opened.ok()) << opened.status().to_string();
  ShmStore& store = **opened;
  ASSERT_TRUE(store.publish(1, make_image(1, 1024)).ok());

  constexpr std::uint64_t kGenerations = 1000;
  std::atomic<bool> done{false};
  std::atomic<bool> failed{false};  // stops the writer early: the test has failed anyway
  std::mutex mu;
  std::vector<std::string> failures;
  auto fail = [&](std::string what) {
    failed.store(true, std::memory_order_relaxed);
    std::lock_guard<std::mutex> lock(mu);
    if (failures.size() < 20) failures.push_back(std::move(what));
  };
  struct Counts {
    int ok = 0;
    int overtaken = 0;
  };
  Counts counts[2];
  auto reader = [&](bool existing, Counts& c) {
    std::uint64_t last = 0;
    const char* who = existing ? "read_existing" : "read_active";
    for (bool last_round = false; !last_round;) {
      last_round = done.load(std::memory_order_acquire);
      auto r = existing ? ShmStore::read_existing(seg.name()) : store.read_active();
      if (!r.ok()) {
        if (r.status().code() == StatusCode::kFailedPrecondition) {
          ++c.overtaken;  // allowed: gave up after the writer overtook every copy
        } else {
          fail(std::string(who) + ": " + r.status().to_string());
        }
        continue;
      }
      std::uint64_t gen = 0;
      const ::testing::AssertionResult ok = intact(*r, &gen);
      if (!ok) {
        fail(std::string(who) + ": torn image: " + ok.message());
        continue;
      }
      if (gen < last) {
        fail(std::string(who) + ": generation went back from " + std::to_string(last) + " to " +
             std::to_string(gen));
      }
      last = gen;
      ++c.ok;
    }
    if (last != kGenerations)
      fail(std::string(who) + ": last read was generation " + std::to_string(last));
  };
  std::thread active_reader(reader, false, std::ref(counts[0]));
  std::thread existing_reader(reader, true, std::ref(counts[1]));

  std::mt19937_64 rng(seed);
  Bytes image;
  for (std::uint64_t gen = 2; gen <= kGenerations && !failed.load(std::memory_order_relaxed);
       ++gen) {
    // Up to 256 KiB, the upper bound rising with the generation.
    const std::size_t limit = std::min<std::uint64_t>(gen, 512) * 512;
    fill_image(image, gen, 16 + rng() % limit);
    const Status s = store.publish(gen, image);
    if (!s.ok()) {
      fail("publish " + std::to_string(gen) + ": " + s.to_string());
      break;
    }
  }
  done.store(true, std::memory_order_release);
  active_reader.join();
  existing_reader.join();

  for (const std::string& f : failures) ADD_FAILURE() << f;
  EXPECT_GT(counts[0].ok, 0);
  EXPECT_GT(counts[1].ok, 0);
  std::cout << "[ info ] read_active: " << counts[0].ok << " reads, " << counts[0].overtaken
            << " gave up; read_existing: " << counts[1].ok << " reads, " << counts[1].overtaken
            << " gave up\n";
}

// ---- a segment truncated under a reader ------------------------------------

// What the reader child below tells the parent when it stops.
struct TruncationReport {
  std::uint64_t reads_ok = 0;
  std::uint64_t errors = 0;      // kCorruption, as expected of a cut segment
  std::uint64_t shrank = 0;      // of which "shrank while being read": cut mid-copy
  std::uint64_t unexpected = 0;  // anything else (a wrong image, another code)
  char first_unexpected[256] = {};
};

// The child: reads `name` with read_existing() in a loop until `stop_fd`
// (non-blocking) reads end of file, or 20 s pass should the parent hang.
// Writes a byte to `started_fd` (non-blocking; dropped when full) as each
// read starts, and on `report_fd` its first read's duration (ns), then, when
// it stops, a TruncationReport. Exits 0 whatever it read: only a signal
// (SIGBUS from a mapping cut under it) ends it otherwise.
[[noreturn]] void truncation_reader_child(const std::string& name, std::size_t image_size,
                                          int stop_fd, int started_fd, int report_fd) {
  TruncationReport r;
  const auto note = [&r](const std::string& what) {
    if (r.unexpected++ == 0) {
      std::snprintf(r.first_unexpected, sizeof r.first_unexpected, "%s", what.c_str());
    }
  };
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  for (bool first = true; std::chrono::steady_clock::now() < give_up; first = false) {
    char byte = 0;
    if (::read(stop_fd, &byte, 1) == 0) break;  // the parent closed its end: stop
    (void)!::write(started_fd, &byte, 1);
    const auto start = std::chrono::steady_clock::now();
    auto read = ShmStore::read_existing(name);
    if (first) {
      const std::int64_t ns = std::chrono::duration_cast<std::chrono::nanoseconds>(
                                  std::chrono::steady_clock::now() - start)
                                  .count();
      if (::write(report_fd, &ns, sizeof ns) != static_cast<ssize_t>(sizeof ns)) ::_exit(4);
    }
    if (read.ok()) {
      std::uint64_t header[2] = {0, 0};
      if (read->size() >= 16) std::memcpy(header, read->data(), 16);
      if (read->size() == image_size && header[0] == 1 && header[1] == image_size) {
        ++r.reads_ok;
      } else {
        note("read a wrong image of " + std::to_string(read->size()) + " bytes");
      }
    } else if (read.status().code() == StatusCode::kCorruption) {
      ++r.errors;
      if (contains(read.status().message(), "shrank while being read")) ++r.shrank;
    } else {
      note(read.status().to_string());
    }
  }
  if (::write(report_fd, &r, sizeof r) != static_cast<ssize_t>(sizeof r)) ::_exit(4);
  ::_exit(0);
}

// Drops the bytes waiting on `fd` (non-blocking), then waits up to 10 s for
// one more: true when the child started a read after the call began. False
// when the child is gone (end of file) or started none.
bool wait_for_fresh_byte(int fd) {
  char buf[512];
  while (::read(fd, buf, sizeof buf) > 0) {
  }
  pollfd p{fd, POLLIN, 0};
  if (::poll(&p, 1, 10000) != 1) return false;
  return ::read(fd, buf, 1) == 1;
}

// Another process truncating the segment while read_existing() copies it out
// (an operator's `truncate -s0`, another program's shm_open(O_TRUNC)) makes
// the read fail with kCorruption; it never kills the reader with SIGBUS, as
// reading through a mapping did. A forked child reads a 32 MiB image in a
// loop for about a second while the parent cuts the segment to 4096 bytes at
// a random instant of one of its reads and, once a read has failed on the cut
// segment, puts it back, again and again, so that some cuts land inside a
// copy (the test prints how many did: "cut mid-copy").
TEST(ShmStoreTruncationTest, SegmentTruncatedUnderAReaderIsAnErrorNotSigbus) {
  const std::uint64_t seed = test_seed();
  std::cout << "[ seed ] JOBENGINE_TEST_SEED=" << seed << "\n";
  SCOPED_TRACE("JOBENGINE_TEST_SEED=" + std::to_string(seed));
  std::mt19937_64 rng(seed);
  constexpr std::size_t kImageBytes = std::size_t{32} << 20;
  const Bytes image = make_image(1, kImageBytes);
  ScopedSegment seg;
  {
    auto store = ShmStore::open_or_create(seg.name(), 0);
    ASSERT_TRUE(store.ok()) << store.status().to_string();
    ASSERT_TRUE((*store)->publish(1, image).ok());
  }  // closed: nothing of the segment stays mapped in this process
  const std::uint32_t active = peek32(seg.name(), kActiveAt);
  const auto offset = static_cast<off_t>(peek64(seg.name(), slot_field(active, kOffsetField)));
  const off_t full = stat_of(seg.name()).st_size;
  const int fd = ::open(path_of(seg.name()).c_str(), O_RDWR | O_CLOEXEC);
  ASSERT_GE(fd, 0) << std::strerror(errno);
  int stop[2];
  int started[2];
  int report[2];
  ASSERT_EQ(::pipe(stop), 0);
  ASSERT_EQ(::pipe(started), 0);
  ASSERT_EQ(::pipe(report), 0);
  ASSERT_EQ(::fcntl(stop[0], F_SETFL, O_NONBLOCK), 0);
  ASSERT_EQ(::fcntl(started[0], F_SETFL, O_NONBLOCK), 0);
  ASSERT_EQ(::fcntl(started[1], F_SETFL, O_NONBLOCK), 0);
  const pid_t pid = ::fork();
  ASSERT_GE(pid, 0) << std::strerror(errno);
  if (pid == 0) {
    ::close(stop[1]);
    ::close(started[0]);
    ::close(report[0]);
    truncation_reader_child(seg.name(), kImageBytes, stop[0], started[1], report[1]);
  }
  ::close(stop[0]);
  ::close(started[1]);
  ::close(report[1]);
  // No ASSERT from here until the child is told to stop and reaped.
  std::int64_t read_ns = 0;
  const bool first_read = ::read(report[0], &read_ns, sizeof read_ns) == sizeof read_ns;
  int cuts = 0;
  std::string parent_failure;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(1);
  const auto span = static_cast<std::uint64_t>(std::max<std::int64_t>(read_ns, 1000));
  while (first_read && std::chrono::steady_clock::now() < deadline) {
    // A read starting now takes about read_ns: cut the segment at a random
    // instant of it. (Through a mapping, any instant between the mapping and
    // the end of the copy was fatal.)
    if (!wait_for_fresh_byte(started[0])) break;  // the child is gone: see below
    std::this_thread::sleep_for(std::chrono::nanoseconds(rng() % span));
    if (::ftruncate(fd, 4096) != 0) {
      parent_failure = std::string("ftruncate to 4096: ") + std::strerror(errno);
      break;
    }
    ++cuts;
    // The read in flight ends (failing if the cut met it), then one that
    // began after the cut, so failed, ends too: then put the segment back.
    if (!wait_for_fresh_byte(started[0]) || !wait_for_fresh_byte(started[0])) break;
    if (::ftruncate(fd, full) != 0 ||
        ::pwrite(fd, image.data(), image.size(), offset) != static_cast<ssize_t>(image.size())) {
      parent_failure = std::string("putting the segment back: ") + std::strerror(errno);
      break;
    }
  }
  ::close(stop[1]);  // end of file: the child stops
  int wstatus = 0;
  const pid_t waited = ::waitpid(pid, &wstatus, 0);
  TruncationReport r;
  const ssize_t got = ::read(report[0], &r, sizeof r);
  ::close(report[0]);
  ::close(started[0]);
  ::close(fd);

  ASSERT_EQ(waited, pid) << std::strerror(errno);
  ASSERT_FALSE(WIFSIGNALED(wstatus)) << "the reader was killed by signal " << WTERMSIG(wstatus)
                                     << " (" << strsignal(WTERMSIG(wstatus)) << ") after "
                                     << cuts << " cuts";
  ASSERT_TRUE(WIFEXITED(wstatus) && WEXITSTATUS(wstatus) == 0) << "status " << wstatus;
  ASSERT_TRUE(first_read) << "the reader reported no first read";
  ASSERT_TRUE(parent_failure.empty()) << parent_failure;
  ASSERT_EQ(got, static_cast<ssize_t>(sizeof r));
  EXPECT_EQ(r.unexpected, 0u) << r.first_unexpected;
  EXPECT_GT(cuts, 0);
  EXPECT_GT(r.errors, 0u) << "no read failed in " << cuts << " cuts";
  EXPECT_GT(r.reads_ok, 0u);
  std::cout << "[ info ] " << cuts << " cuts, a read took " << read_ns / 1000 << " us: "
            << r.reads_ok << " reads, " << r.errors << " failed, " << r.shrank
            << " of them cut mid-copy (\"shrank while being read\")\n";
}

// ---- permissions -------------------------------------------------------------

TEST(ShmStorePermissionsTest, CreatedSegmentHasMode0600WhateverTheUmask) {
  for (const mode_t mask : {mode_t{0}, mode_t{0777}}) {
    ScopedSegment seg;
    const mode_t old = ::umask(mask);
    auto store = ShmStore::open_or_create(seg.name(), 4096);
    ::umask(old);
    ASSERT_TRUE(store.ok()) << store.status().to_string();
    const struct stat st = stat_of(seg.name());
    EXPECT_EQ(st.st_mode & 07777, 0600u) << "umask " << std::oct << mask;
    EXPECT_EQ(st.st_uid, ::geteuid());
  }
}

TEST(ShmStorePermissionsTest, ExistingSegmentWithMode0644IsRefused) {
  ScopedSegment seg;
  make_published_segment(seg.name());
  ASSERT_EQ(::chmod(path_of(seg.name()).c_str(), 0644), 0);
  auto store = ShmStore::open_or_create(seg.name(), 4096);
  ASSERT_EQ(store.status().code(), StatusCode::kFailedPrecondition) << store.status().to_string();
  EXPECT_TRUE(contains(store.status().message(), seg.name())) << store.status().to_string();
  EXPECT_TRUE(contains(store.status().message(), "mode 0644")) << store.status().to_string();
  EXPECT_TRUE(contains(store.status().message(), "uid " + std::to_string(::geteuid())));
  auto read = ShmStore::read_existing(seg.name());
  EXPECT_EQ(read.status().code(), StatusCode::kFailedPrecondition) << read.status().to_string();
  EXPECT_EQ(stat_of(seg.name()).st_mode & 07777, 0644u) << "a refused segment is left alone";
}

TEST(ShmStorePermissionsTest, SegmentOwnedByAnotherUidIsRefused) {
  if (::geteuid() != 0) GTEST_SKIP() << "needs root to chown the segment to another uid";
  ScopedSegment seg;
  make_published_segment(seg.name());
  ASSERT_EQ(::chown(path_of(seg.name()).c_str(), 65534, 65534), 0) << std::strerror(errno);
  auto store = ShmStore::open_or_create(seg.name(), 4096);
  ASSERT_EQ(store.status().code(), StatusCode::kFailedPrecondition) << store.status().to_string();
  EXPECT_TRUE(contains(store.status().message(), "owned by uid 65534"))
      << store.status().to_string();
  EXPECT_TRUE(contains(store.status().message(), "mode 0600")) << store.status().to_string();
  auto read = ShmStore::read_existing(seg.name());
  EXPECT_EQ(read.status().code(), StatusCode::kFailedPrecondition) << read.status().to_string();
}

// Something other than a segment at /dev/shm/<name> -- a symlink to a file
// of someone's choosing, a FIFO (shm_open would block on it forever), a
// directory -- is refused by the writer and by readers at once, and left as
// it was (the symlink's target is not written).
TEST(ShmStorePermissionsTest, SymlinkFifoOrDirectoryInPlaceOfTheSegmentIsRefusedWithoutBlocking) {
  char tmpl[] = "/tmp/jobengine-shm-decoy-XXXXXX";
  ASSERT_NE(::mkdtemp(tmpl), nullptr);
  const std::string decoy = std::string(tmpl) + "/decoy";
  {
    const Bytes zeros(8192, 0);
    const int fd = ::open(decoy.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    ASSERT_GE(fd, 0);
    ASSERT_EQ(::write(fd, zeros.data(), zeros.size()), static_cast<ssize_t>(zeros.size()));
    ::close(fd);
  }
  enum class Kind { kSymlink, kFifo, kDirectory };
  for (const Kind kind : {Kind::kSymlink, Kind::kFifo, Kind::kDirectory}) {
    SCOPED_TRACE(static_cast<int>(kind));
    const std::string name = unique_name();
    const std::string path = path_of(name);
    switch (kind) {
      case Kind::kSymlink:
        ASSERT_EQ(::symlink(decoy.c_str(), path.c_str()), 0);
        break;
      case Kind::kFifo:
        ASSERT_EQ(::mkfifo(path.c_str(), 0600), 0);
        break;
      case Kind::kDirectory:
        ASSERT_EQ(::mkdir(path.c_str(), 0700), 0);
        break;
    }
    // A regression would block in open(2): fail loudly instead of hanging.
    std::atomic<bool> done{false};
    std::thread watchdog([&] {
      for (int i = 0; i < 1000 && !done.load(); ++i) {
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
      }
      if (!done.load()) {
        std::cerr << "blocked opening " << path << "\n";
        std::_Exit(1);
      }
    });
    auto store = ShmStore::open_or_create(name, 4096);
    auto read = ShmStore::read_existing(name);
    done = true;
    watchdog.join();
    EXPECT_EQ(store.status().code(), StatusCode::kFailedPrecondition) << store.status().to_string();
    EXPECT_TRUE(contains(store.status().message(), name)) << store.status().to_string();
    EXPECT_EQ(read.status().code(), StatusCode::kFailedPrecondition) << read.status().to_string();
    if (kind == Kind::kDirectory) {
      EXPECT_EQ(::rmdir(path.c_str()), 0);
    } else {
      EXPECT_EQ(::unlink(path.c_str()), 0);
    }
  }
  struct stat st;
  ASSERT_EQ(::stat(decoy.c_str(), &st), 0);
  EXPECT_EQ(st.st_size, 8192);
  std::ifstream in(decoy, std::ios::binary);
  const Bytes back((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  EXPECT_EQ(back, Bytes(8192, 0)) << "the symlink's target was written";
  ::unlink(decoy.c_str());
  ::rmdir(tmpl);
}

// ---- parsing a copy of a segment (jobsnap, the fuzzer) -------------------------

Bytes segment_bytes(const std::string& name) {
  std::ifstream in(path_of(name), std::ios::binary);
  return Bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

TEST(ShmStoreParseTest, CopyOfASegmentParsesToItsActiveImage) {
  ScopedSegment seg;
  auto store = ShmStore::open_or_create(seg.name(), 0);
  ASSERT_TRUE(store.ok()) << store.status().to_string();
  ASSERT_TRUE((*store)->publish(1, make_image(1, 3000)).ok());
  ASSERT_TRUE((*store)->publish(2, make_image(2, 7001)).ok());
  auto parsed = ShmStore::parse_segment(segment_bytes(seg.name()));
  ASSERT_TRUE(parsed.ok()) << parsed.status().to_string();
  EXPECT_EQ(*parsed, make_image(2, 7001));
  // Unaligned input is fine: parse_segment copies the control block.
  Bytes shifted(1, 0);
  const Bytes bytes = segment_bytes(seg.name());
  shifted.insert(shifted.end(), bytes.begin(), bytes.end());
  auto unaligned = ShmStore::parse_segment(std::span<const unsigned char>(shifted).subspan(1));
  ASSERT_TRUE(unaligned.ok()) << unaligned.status().to_string();
  EXPECT_EQ(*unaligned, make_image(2, 7001));
}

TEST(ShmStoreParseTest, EmptyShortAndZeroMagicCopiesAreRejected) {
  EXPECT_EQ(ShmStore::parse_segment({}).status().code(), StatusCode::kNotFound);
  const Bytes short_copy(4095, 0);
  EXPECT_EQ(ShmStore::parse_segment(short_copy).status().code(), StatusCode::kCorruption);
  const Bytes zero(8192, 0);
  EXPECT_EQ(ShmStore::parse_segment(zero).status().code(), StatusCode::kNotFound);
}

TEST(ShmStoreParseTest, ActiveSlotMidWriteInACopyIsCorruptionAtOnce) {
  ScopedSegment seg;
  make_published_segment(seg.name());
  const std::uint32_t active = peek32(seg.name(), kActiveAt);
  const std::uint64_t version = peek64(seg.name(), slot_field(active, kVersionField));
  poke64(seg.name(), slot_field(active, kVersionField), version | 1);
  const auto start = std::chrono::steady_clock::now();
  auto parsed = ShmStore::parse_segment(segment_bytes(seg.name()));
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(1));
  ASSERT_EQ(parsed.status().code(), StatusCode::kCorruption) << parsed.status().to_string();
  EXPECT_TRUE(contains(parsed.status().message(), "mid-write")) << parsed.status().to_string();
}

TEST(ShmStoreParseTest, ChecksumMismatchIsCorruptionUnlessTheFuzzerSkipsIt) {
  ScopedSegment seg;
  make_published_segment(seg.name(), 5000);
  Bytes bytes = segment_bytes(seg.name());
  const std::uint32_t active = peek32(seg.name(), kActiveAt);
  const std::uint64_t offset = peek64(seg.name(), slot_field(active, 8));
  bytes[offset + 100] ^= 1;
  auto verified = ShmStore::parse_segment(bytes);
  ASSERT_EQ(verified.status().code(), StatusCode::kCorruption) << verified.status().to_string();
  EXPECT_TRUE(contains(verified.status().message(), "checksum")) << verified.status().to_string();
  auto unverified = ShmStore::parse_segment(bytes, /*verify_checksum=*/false);
  ASSERT_TRUE(unverified.ok()) << unverified.status().to_string();
  EXPECT_EQ(unverified->size(), 5000u);
}

// ---- a creator that died early ---------------------------------------------

TEST(ShmStoreRecoveryTest, ZeroLengthSegmentLeftByADeadCreatorIsInitialised) {
  ScopedSegment seg;
  make_raw_segment(seg.name(), 0);
  EXPECT_EQ(ShmStore::read_existing(seg.name()).status().code(), StatusCode::kNotFound);
  auto store = ShmStore::open_or_create(seg.name(), 4096);
  ASSERT_TRUE(store.ok()) << store.status().to_string();
  EXPECT_EQ((*store)->read_active().status().code(), StatusCode::kNotFound);
  const Bytes image = make_image(1, 2000);
  ASSERT_TRUE((*store)->publish(1, image).ok());
  auto read = ShmStore::read_existing(seg.name());
  ASSERT_TRUE(read.ok()) << read.status().to_string();
  EXPECT_EQ(*read, image);
}

TEST(ShmStoreRecoveryTest, ControlBlockWithZeroMagicIsInitialised) {
  ScopedSegment seg;
  make_raw_segment(seg.name(), 3 * kControlBytes);
  // A creator that died after writing some fields but before the magic.
  poke32(seg.name(), kLayoutVersionAt, 1);
  poke32(seg.name(), kActiveAt, 9);
  poke64(seg.name(), slot_field(0, kOffsetField), 1ULL << 50);
  EXPECT_EQ(ShmStore::read_existing(seg.name()).status().code(), StatusCode::kNotFound);
  auto store = ShmStore::open_or_create(seg.name(), 4096);
  ASSERT_TRUE(store.ok()) << store.status().to_string();
  const Bytes image = make_image(1, 2000);
  ASSERT_TRUE((*store)->publish(1, image).ok());
  auto read = (*store)->read_active();
  ASSERT_TRUE(read.ok()) << read.status().to_string();
  EXPECT_EQ(*read, image);
}

TEST(ShmStoreRecoveryTest, InactiveSlotLeftMidPlacementByADeadWriterIsReset) {
  ScopedSegment seg;
  make_published_segment(seg.name());
  const std::uint32_t inactive = 1 - peek32(seg.name(), kActiveAt);
  poke64(seg.name(), slot_field(inactive, kVersionField), 3);  // odd: mid-write
  poke64(seg.name(), slot_field(inactive, kOffsetField), 1ULL << 40);
  auto store = ShmStore::open_or_create(seg.name(), 4096);
  ASSERT_TRUE(store.ok()) << store.status().to_string();
  auto read = (*store)->read_active();
  ASSERT_TRUE(read.ok()) << read.status().to_string();
  std::uint64_t gen = 0;
  ASSERT_TRUE(intact(*read, &gen));
  EXPECT_EQ(gen, 1u);
  const Bytes image = make_image(2, 6000);
  ASSERT_TRUE((*store)->publish(2, image).ok());
  auto existing = ShmStore::read_existing(seg.name());
  ASSERT_TRUE(existing.ok()) << existing.status().to_string();
  EXPECT_EQ(*existing, image);
}

// Regression (shm_segment_fuzzer, tests/fuzz/regressions/shm_segment/
// version-wraps-to-zero): an inactive slot whose version is at the top of its
// range, odd or even, made the publish complete it with version 0 ("never
// written"), so every reader reported no image although publish() succeeded.
TEST(ShmStoreRecoveryTest, SlotVersionAtTheTopOfItsRangeStillPublishesAReadableImage) {
  for (const std::uint64_t version : {~std::uint64_t{0}, ~std::uint64_t{0} - 1}) {
    SCOPED_TRACE(version);
    ScopedSegment seg;
    make_published_segment(seg.name());
    const std::uint32_t inactive = 1 - peek32(seg.name(), kActiveAt);
    poke64(seg.name(), slot_field(inactive, kVersionField), version);
    auto store = ShmStore::open_or_create(seg.name(), 4096);
    ASSERT_TRUE(store.ok()) << store.status().to_string();
    const Bytes image = make_image(2, 6000);
    ASSERT_TRUE((*store)->publish(2, image).ok());
    auto active = (*store)->read_active();
    ASSERT_TRUE(active.ok()) << active.status().to_string();
    EXPECT_EQ(*active, image);
    auto existing = ShmStore::read_existing(seg.name());
    ASSERT_TRUE(existing.ok()) << existing.status().to_string();
    EXPECT_EQ(*existing, image);
    const Bytes next = make_image(3, 100);
    ASSERT_TRUE((*store)->publish(3, next).ok());
    ASSERT_TRUE((*store)->publish(4, image).ok());
    auto last = ShmStore::read_existing(seg.name());
    ASSERT_TRUE(last.ok()) << last.status().to_string();
    EXPECT_EQ(*last, image);
  }
}

// ---- hostile and damaged segments ------------------------------------------

TEST(ShmStoreCorruptionTest, SegmentShorterThanTheControlBlockIsCorruption) {
  ScopedSegment seg;
  make_raw_segment(seg.name(), 100);
  auto store = ShmStore::open_or_create(seg.name(), 4096);
  ASSERT_EQ(store.status().code(), StatusCode::kCorruption) << store.status().to_string();
  EXPECT_TRUE(contains(store.status().message(), "truncated")) << store.status().to_string();
  auto read = ShmStore::read_existing(seg.name());
  EXPECT_EQ(read.status().code(), StatusCode::kCorruption) << read.status().to_string();
  EXPECT_EQ(stat_of(seg.name()).st_size, 100) << "a refused segment is left alone";
}

TEST(ShmStoreCorruptionTest, GarbageControlBlockIsCorruption) {
  ScopedSegment seg;
  make_published_segment(seg.name());
  std::mt19937_64 rng(42);
  std::vector<unsigned char> garbage(kControlBytes);
  for (auto& b : garbage) b = static_cast<unsigned char>(rng());
  garbage[0] |= 1;  // a non-zero magic
  poke(seg.name(), 0, garbage.data(), garbage.size());
  auto store = ShmStore::open_or_create(seg.name(), 4096);
  ASSERT_EQ(store.status().code(), StatusCode::kCorruption) << store.status().to_string();
  EXPECT_TRUE(contains(store.status().message(), "bad magic")) << store.status().to_string();
  auto read = ShmStore::read_existing(seg.name());
  EXPECT_EQ(read.status().code(), StatusCode::kCorruption) << read.status().to_string();
}

TEST(ShmStoreCorruptionTest, NewerLayoutVersionIsRefused) {
  ScopedSegment seg;
  make_published_segment(seg.name());
  poke32(seg.name(), kLayoutVersionAt, 2);
  auto store = ShmStore::open_or_create(seg.name(), 4096);
  ASSERT_EQ(store.status().code(), StatusCode::kFailedPrecondition) << store.status().to_string();
  EXPECT_TRUE(contains(store.status().message(), "layout version 2")) << store.status().to_string();
  EXPECT_EQ(ShmStore::read_existing(seg.name()).status().code(), StatusCode::kFailedPrecondition);
}

TEST(ShmStoreCorruptionTest, ActiveIndexSevenIsCorruption) {
  ScopedSegment seg;
  auto live = ShmStore::open_or_create(seg.name(), 4096);
  ASSERT_TRUE(live.ok()) << live.status().to_string();
  ASSERT_TRUE((*live)->publish(1, make_image(1, 3000)).ok());
  poke32(seg.name(), kActiveAt, 7);

  auto read = ShmStore::read_existing(seg.name());
  ASSERT_EQ(read.status().code(), StatusCode::kCorruption) << read.status().to_string();
  EXPECT_TRUE(contains(read.status().message(), "active slot index 7"))
      << read.status().to_string();
  // A second writer is refused while the live one holds the segment's lock.
  EXPECT_EQ(ShmStore::open_or_create(seg.name(), 4096).status().code(),
            StatusCode::kFailedPrecondition);
  // The live store notices too, and refuses to write anywhere.
  EXPECT_EQ((*live)->read_active().status().code(), StatusCode::kCorruption);
  EXPECT_EQ((*live)->publish(2, make_image(2, 3000)).code(), StatusCode::kCorruption);
}

TEST(ShmStoreCorruptionTest, DescriptorPointingOutsideTheSegmentIsCorruption) {
  ScopedSegment seg;
  auto live = ShmStore::open_or_create(seg.name(), 4096);
  ASSERT_TRUE(live.ok()) << live.status().to_string();
  ASSERT_TRUE((*live)->publish(1, make_image(1, 3000)).ok());
  const std::uint32_t active = peek32(seg.name(), kActiveAt);
  poke64(seg.name(), slot_field(active, kOffsetField), 1ULL << 40);

  auto read = ShmStore::read_existing(seg.name());
  ASSERT_EQ(read.status().code(), StatusCode::kCorruption) << read.status().to_string();
  EXPECT_TRUE(contains(read.status().message(), "does not fit")) << read.status().to_string();
  EXPECT_EQ((*live)->read_active().status().code(), StatusCode::kCorruption);
  EXPECT_EQ((*live)->publish(2, make_image(2, 3000)).code(), StatusCode::kCorruption);
  live->reset();  // release the writer's lock: a new writer then sees the damage
  EXPECT_EQ(ShmStore::open_or_create(seg.name(), 4096).status().code(), StatusCode::kCorruption);
}

TEST(ShmStoreCorruptionTest, SlotWithoutStorageAndAWildOffsetIsReadWithoutTouchingIt) {
  // Capacity 0 and length 0 pass the extent check whatever the offset says;
  // the reader must not even form a pointer from that offset (UBSan caught
  // base + offset wrapping around; found by shm_segment_fuzzer). The image is
  // empty, so its checksum cannot match the descriptor's: corruption.
  ScopedSegment seg;
  make_published_segment(seg.name());
  const std::uint32_t active = peek32(seg.name(), kActiveAt);
  poke64(seg.name(), slot_field(active, kCapacityField), 0);
  poke64(seg.name(), slot_field(active, kLengthField), 0);
  poke64(seg.name(), slot_field(active, kOffsetField), ~std::uint64_t{0} - 4095);  // wraps
  auto parsed = ShmStore::parse_segment(segment_bytes(seg.name()));
  ASSERT_EQ(parsed.status().code(), StatusCode::kCorruption) << parsed.status().to_string();
  EXPECT_TRUE(contains(parsed.status().message(), "checksum")) << parsed.status().to_string();
  EXPECT_EQ(ShmStore::read_existing(seg.name()).status().code(), StatusCode::kCorruption);
}

TEST(ShmStoreCorruptionTest, LengthBeyondCapacityIsCorruption) {
  ScopedSegment seg;
  make_published_segment(seg.name());
  const std::uint32_t active = peek32(seg.name(), kActiveAt);
  const std::uint64_t capacity = peek64(seg.name(), slot_field(active, kCapacityField));
  poke64(seg.name(), slot_field(active, kLengthField), capacity + 1);
  EXPECT_EQ(ShmStore::read_existing(seg.name()).status().code(), StatusCode::kCorruption);
  EXPECT_EQ(ShmStore::open_or_create(seg.name(), 4096).status().code(), StatusCode::kCorruption);
}

TEST(ShmStoreCorruptionTest, InactiveSlotOutOfBoundsButCompleteIsCorruption) {
  ScopedSegment seg;
  make_published_segment(seg.name());
  const std::uint32_t inactive = 1 - peek32(seg.name(), kActiveAt);
  poke64(seg.name(), slot_field(inactive, kOffsetField), 1ULL << 40);  // version stays even
  EXPECT_EQ(ShmStore::open_or_create(seg.name(), 4096).status().code(), StatusCode::kCorruption);
  // A reader only needs the active slot.
  auto read = ShmStore::read_existing(seg.name());
  EXPECT_TRUE(read.ok()) << read.status().to_string();
}

TEST(ShmStoreCorruptionTest, ImageChecksumMismatchIsCorruptionAndTheNextPublishRecovers) {
  ScopedSegment seg;
  auto live = ShmStore::open_or_create(seg.name(), 4096);
  ASSERT_TRUE(live.ok()) << live.status().to_string();
  ASSERT_TRUE((*live)->publish(1, make_image(1, 3000)).ok());
  const std::uint32_t active = peek32(seg.name(), kActiveAt);
  const auto at = static_cast<off_t>(peek64(seg.name(), slot_field(active, kOffsetField)) + 1234);
  unsigned char byte = 0;
  {
    const int fd = ::open(path_of(seg.name()).c_str(), O_RDONLY | O_CLOEXEC);
    ASSERT_EQ(::pread(fd, &byte, 1, at), 1);
    ::close(fd);
  }
  byte ^= 0x40;
  poke(seg.name(), at, &byte, 1);

  auto read = ShmStore::read_existing(seg.name());
  ASSERT_EQ(read.status().code(), StatusCode::kCorruption) << read.status().to_string();
  EXPECT_TRUE(contains(read.status().message(), "checksum")) << read.status().to_string();
  EXPECT_EQ((*live)->read_active().status().code(), StatusCode::kCorruption);
  // Publishing writes the other slot and flips to it.
  const Bytes image = make_image(2, 3000);
  ASSERT_TRUE((*live)->publish(2, image).ok());
  auto after = (*live)->read_active();
  ASSERT_TRUE(after.ok()) << after.status().to_string();
  EXPECT_EQ(*after, image);
}

TEST(ShmStoreCorruptionTest, ActiveSlotStuckMidWriteIsCorruptionNotAHang) {
  ScopedSegment seg;
  make_published_segment(seg.name());
  const std::uint32_t active = peek32(seg.name(), kActiveAt);
  const std::uint64_t version = peek64(seg.name(), slot_field(active, kVersionField));
  poke64(seg.name(), slot_field(active, kVersionField), version | 1);
  const auto start = std::chrono::steady_clock::now();
  auto read = ShmStore::read_existing(seg.name());
  const auto took = std::chrono::steady_clock::now() - start;
  ASSERT_EQ(read.status().code(), StatusCode::kCorruption) << read.status().to_string();
  EXPECT_TRUE(contains(read.status().message(), "mid-write")) << read.status().to_string();
  std::cout << "[ info ] gave up after "
            << std::chrono::duration_cast<std::chrono::microseconds>(took).count() << " us\n";
  EXPECT_EQ(ShmStore::open_or_create(seg.name(), 4096).status().code(), StatusCode::kCorruption);
}

// ---- names, absence, removal ---------------------------------------------------

TEST(ShmStoreTest, ReadExistingOfAMissingSegmentIsNotFound) {
  ScopedSegment seg;
  auto read = ShmStore::read_existing(seg.name());
  ASSERT_EQ(read.status().code(), StatusCode::kNotFound) << read.status().to_string();
  EXPECT_TRUE(contains(read.status().message(), seg.name())) << read.status().to_string();
}

TEST(ShmStoreTest, RemoveIsIdempotentAndAnOpenStoreOutlivesIt) {
  ScopedSegment seg;
  EXPECT_TRUE(ShmStore::remove(seg.name()).ok());  // never existed
  auto store = ShmStore::open_or_create(seg.name(), 4096);
  ASSERT_TRUE(store.ok()) << store.status().to_string();
  const Bytes image = make_image(1, 2500);
  ASSERT_TRUE((*store)->publish(1, image).ok());
  EXPECT_TRUE(ShmStore::remove(seg.name()).ok());
  EXPECT_TRUE(ShmStore::remove(seg.name()).ok());
  EXPECT_EQ(ShmStore::read_existing(seg.name()).status().code(), StatusCode::kNotFound);
  // The mapping stays valid after the name is gone.
  auto read = (*store)->read_active();
  ASSERT_TRUE(read.ok()) << read.status().to_string();
  EXPECT_EQ(*read, image);
  EXPECT_TRUE((*store)->publish(2, make_image(2, 9000)).ok());
}

TEST(ShmStoreTest, InvalidNamesAreRejected) {
  for (const std::string& name :
       {std::string(), std::string("a/b"), std::string("/lead"), std::string("."),
        std::string(".."), std::string("with space"), std::string(201, 'x')}) {
    EXPECT_EQ(ShmStore::open_or_create(name, 0).status().code(), StatusCode::kInvalidArgument)
        << "'" << name << "'";
    EXPECT_EQ(ShmStore::read_existing(name).status().code(), StatusCode::kInvalidArgument);
    EXPECT_EQ(ShmStore::remove(name).code(), StatusCode::kInvalidArgument);
  }
  ScopedSegment seg;  // the longest valid name works
  const std::string longest = seg.name() + std::string(200 - seg.name().size(), 'y');
  auto store = ShmStore::open_or_create(longest, 0);
  EXPECT_TRUE(store.ok()) << store.status().to_string();
  EXPECT_TRUE(ShmStore::remove(longest).ok());
}

}  // namespace
}  // namespace jobengine::persist
