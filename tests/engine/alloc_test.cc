// Proves the allocation promise of Engine::submit(): no heap allocation for a
// payload up to kInlinePayloadBytes, after the calling thread's first submits.
//
// This binary replaces every global operator new / delete with a version that
// counts the calls made by the current thread while counting is switched on
// for it. Only the submitting thread is counted: workers may allocate (the
// promise is about the submit path). The counter is thread-local, so neither
// the workers nor GoogleTest's own threads disturb it.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <iterator>
#include <memory>
#include <mutex>
#include <new>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "jobengine/engine.h"

namespace {

// constinit: plain thread-local storage, no dynamic initialisation (which
// could itself allocate, from inside operator new).
constinit thread_local bool t_counting = false;
constinit thread_local std::size_t t_allocations = 0;

void* Allocate(std::size_t size, std::size_t alignment) noexcept {
  if (t_counting) ++t_allocations;
  if (size == 0) size = 1;
  if (alignment <= alignof(std::max_align_t)) return std::malloc(size);
  void* p = nullptr;
  if (alignment < sizeof(void*)) alignment = sizeof(void*);
  if (posix_memalign(&p, alignment, size) != 0) return nullptr;
  return p;
}

void* AllocateOrThrow(std::size_t size, std::size_t alignment) {
  void* p = Allocate(size, alignment);
  if (p == nullptr) throw std::bad_alloc();
  return p;
}

// Not inlined: gcc (-O1 and up) otherwise follows a `new` into this free()
// and warns that it mismatches (-Wmismatched-new-delete), not knowing that
// the replaced operator new is malloc.
[[gnu::noinline]] void Deallocate(void* p) noexcept { std::free(p); }

constexpr std::size_t kDefaultAlign = alignof(std::max_align_t);

}  // namespace

// ---- the replaced global allocation functions (all variants) -------------------
void* operator new(std::size_t size) { return AllocateOrThrow(size, kDefaultAlign); }
void* operator new[](std::size_t size) { return AllocateOrThrow(size, kDefaultAlign); }
void* operator new(std::size_t size, const std::nothrow_t&) noexcept {
  return Allocate(size, kDefaultAlign);
}
void* operator new[](std::size_t size, const std::nothrow_t&) noexcept {
  return Allocate(size, kDefaultAlign);
}
void* operator new(std::size_t size, std::align_val_t al) {
  return AllocateOrThrow(size, static_cast<std::size_t>(al));
}
void* operator new[](std::size_t size, std::align_val_t al) {
  return AllocateOrThrow(size, static_cast<std::size_t>(al));
}
void* operator new(std::size_t size, std::align_val_t al, const std::nothrow_t&) noexcept {
  return Allocate(size, static_cast<std::size_t>(al));
}
void* operator new[](std::size_t size, std::align_val_t al, const std::nothrow_t&) noexcept {
  return Allocate(size, static_cast<std::size_t>(al));
}
void operator delete(void* p) noexcept { Deallocate(p); }
void operator delete[](void* p) noexcept { Deallocate(p); }
void operator delete(void* p, const std::nothrow_t&) noexcept { Deallocate(p); }
void operator delete[](void* p, const std::nothrow_t&) noexcept { Deallocate(p); }
void operator delete(void* p, std::size_t) noexcept { Deallocate(p); }
void operator delete[](void* p, std::size_t) noexcept { Deallocate(p); }
void operator delete(void* p, std::align_val_t) noexcept { Deallocate(p); }
void operator delete[](void* p, std::align_val_t) noexcept { Deallocate(p); }
void operator delete(void* p, std::align_val_t, const std::nothrow_t&) noexcept { Deallocate(p); }
void operator delete[](void* p, std::align_val_t, const std::nothrow_t&) noexcept { Deallocate(p); }
void operator delete(void* p, std::size_t, std::align_val_t) noexcept { Deallocate(p); }
void operator delete[](void* p, std::size_t, std::align_val_t) noexcept { Deallocate(p); }

namespace jobengine {
namespace {

// Counts this thread's allocations between construction and stop().
class AllocationCounter {
 public:
  AllocationCounter() {
    t_allocations = 0;
    t_counting = true;
  }
  ~AllocationCounter() { t_counting = false; }
  AllocationCounter(const AllocationCounter&) = delete;
  AllocationCounter& operator=(const AllocationCounter&) = delete;
  std::size_t stop() {
    t_counting = false;
    return t_allocations;
  }
};

constexpr std::chrono::seconds kWaitTimeout{30};
constexpr std::size_t kCapacity = 1024;
constexpr const char* kLongName = "handler.with.a.name.longer.than.any.small.string.buffer";

// An engine with one counting handler, started; the test thread warmed up.
class AllocTest : public ::testing::Test {
 protected:
  void SetUp() override {
    EngineOptions o;
    o.workers = 1;
    o.capacity = kCapacity;
    auto opened = Engine::open(o);
    ASSERT_TRUE(opened.ok()) << opened.status().to_string();
    engine_ = std::make_unique<Engine>(std::move(opened).value());
    auto h = engine_->register_handler(kLongName, [this](JobContext&) {
      runs_.fetch_add(1, std::memory_order_relaxed);
      return Outcome::kDone;
    });
    ASSERT_TRUE(h.ok()) << h.status().to_string();
    handler_ = *h;
    ASSERT_TRUE(engine_->start().ok());
    // Warm-up: the first submits of a thread may allocate its per-thread
    // state (slot cache, producer tokens) and the queues' blocks. Push several
    // table's worth through every priority level, by id and by name, and in
    // batches, so every structure has reached its steady size.
    for (int round = 0; round < 3; ++round) {
      for (std::uint8_t p = 0; p < kPriorityLevels; ++p) {
        SubmitMany(kCapacity, p, /*by_name=*/round == 1);
      }
    }
  }

  void TearDown() override {
    if (engine_) {
      auto report = engine_->stop();
      EXPECT_TRUE(report.ok()) << report.status().to_string();
      engine_.reset();
    }
  }

  // Submits n jobs, waiting whenever the table is full, then waits for all.
  void SubmitMany(std::size_t n, std::uint8_t priority, bool by_name) {
    const std::string payload(64, 'w');
    for (std::size_t i = 0; i < n;) {
      auto id = by_name ? engine_->submit(kLongName, payload, {priority})
                        : engine_->submit(handler_, payload, {priority});
      if (id.ok()) {
        ++i;
        ++submitted_;
        continue;
      }
      ASSERT_EQ(id.status().code(), StatusCode::kQueueFull) << id.status().to_string();
      std::this_thread::sleep_for(std::chrono::microseconds(100));
    }
    WaitForAll();
  }

  void WaitForAll() {
    const auto deadline = std::chrono::steady_clock::now() + kWaitTimeout;
    while (runs_.load() != submitted_) {
      ASSERT_LT(std::chrono::steady_clock::now(), deadline)
          << "jobs did not finish: " << runs_.load() << " of " << submitted_;
      std::this_thread::sleep_for(std::chrono::microseconds(200));
    }
  }

  std::unique_ptr<Engine> engine_;
  HandlerId handler_ = 0;
  std::atomic<std::uint64_t> runs_{0};
  std::uint64_t submitted_ = 0;
};

TEST_F(AllocTest, CounterSeesAllocationsOfThisThread) {
  AllocationCounter counter;
  void* p = ::operator new(64);
  ::operator delete(p);
  void* q = ::operator new (64, std::align_val_t{128});
  ::operator delete (q, std::align_val_t{128});
  EXPECT_EQ(counter.stop(), 2u);
}

TEST_F(AllocTest, SubmitOfInlinePayloadDoesNotAllocate) {
  // Fewer jobs than free slots: no submit can meet a full table (whose error
  // message would allocate).
  constexpr std::size_t kJobs = kCapacity / 2;
  std::string payloads[kPriorityLevels * 4];
  std::size_t sizes[kPriorityLevels * 4];
  for (std::size_t i = 0; i < std::size(payloads); ++i) {
    sizes[i] = 16 + (i * 176) / (std::size(payloads) - 1);  // 16 .. 192
    payloads[i] = std::string(sizes[i], static_cast<char>('a' + i));
  }
  ASSERT_EQ(sizes[std::size(sizes) - 1], kInlinePayloadBytes);
  std::vector<StatusCode> codes(kJobs, StatusCode::kInternal);  // allocated up front

  std::size_t allocations = 0;
  {
    AllocationCounter counter;
    for (std::size_t i = 0; i < kJobs; ++i) {
      const auto priority = static_cast<std::uint8_t>(i % kPriorityLevels);
      auto id = engine_->submit(handler_, payloads[i % std::size(payloads)], {priority});
      codes[i] = id.status().code();
    }
    allocations = counter.stop();
  }
  for (std::size_t i = 0; i < kJobs; ++i) {
    ASSERT_EQ(codes[i], StatusCode::kOk) << "submit " << i << " failed";
  }
  submitted_ += kJobs;
  EXPECT_EQ(allocations, 0u) << allocations << " heap allocations in " << kJobs
                             << " submits of 16.." << kInlinePayloadBytes << "-byte payloads";
  WaitForAll();
}

TEST_F(AllocTest, SubmitByNameOfInlinePayloadDoesNotAllocate) {
  constexpr std::size_t kJobs = kCapacity / 2;
  const std::string payload(100, 'n');
  std::vector<StatusCode> codes(kJobs, StatusCode::kInternal);
  std::size_t allocations = 0;
  {
    AllocationCounter counter;
    for (std::size_t i = 0; i < kJobs; ++i) {
      const auto priority = static_cast<std::uint8_t>(i % kPriorityLevels);
      codes[i] = engine_->submit(kLongName, payload, {priority}).status().code();
    }
    allocations = counter.stop();
  }
  for (std::size_t i = 0; i < kJobs; ++i) {
    ASSERT_EQ(codes[i], StatusCode::kOk) << "submit " << i << " failed";
  }
  submitted_ += kJobs;
  EXPECT_EQ(allocations, 0u) << allocations << " heap allocations in " << kJobs << " submits by a "
                             << std::string_view(kLongName).size() << "-byte handler name";
  WaitForAll();
}

// The header's wording: no allocation "after the calling thread's first
// submit". A new thread submits once, then is counted. It competes with the
// fixture's thread, which already holds queue blocks.
TEST_F(AllocTest, NewThreadDoesNotAllocateAfterItsFirstSubmit) {
  constexpr std::size_t kJobs = kCapacity / 2;
  std::size_t allocations = 0;
  std::vector<StatusCode> codes(kJobs, StatusCode::kInternal);
  StatusCode first = StatusCode::kInternal;
  std::thread submitter([&] {
    const std::string payload(kInlinePayloadBytes, 't');
    first = engine_->submit(handler_, payload).status().code();
    AllocationCounter counter;
    for (std::size_t i = 0; i < kJobs; ++i) {
      const auto priority = static_cast<std::uint8_t>(i % kPriorityLevels);
      codes[i] = engine_->submit(handler_, payload, {priority}).status().code();
    }
    allocations = counter.stop();
  });
  submitter.join();
  ASSERT_EQ(first, StatusCode::kOk);
  submitted_ += 1;
  for (std::size_t i = 0; i < kJobs; ++i) {
    ASSERT_EQ(codes[i], StatusCode::kOk) << "submit " << i << " failed";
  }
  submitted_ += kJobs;
  EXPECT_EQ(allocations, 0u) << allocations << " heap allocations in " << kJobs
                             << " submits after the thread's first";
  WaitForAll();
}

TEST_F(AllocTest, HealthDoesNotAllocate) {
  std::size_t allocations = 0;
  std::uint64_t sink = 0;
  {
    AllocationCounter counter;
    for (int i = 0; i < 100; ++i) sink += engine_->health().submitted;
    allocations = counter.stop();
  }
  EXPECT_GT(sink, 0u);
  EXPECT_EQ(allocations, 0u) << allocations << " heap allocations in 100 health() calls";
}

TEST_F(AllocTest, StaticStatusCopiesDoNotAllocate) {
  static constexpr Status::Rep kRep{StatusCode::kQueueFull, false, "job table full"};
  std::size_t allocations = 0;
  bool all_equal = true;
  {
    AllocationCounter counter;
    Status s(kRep);
    for (int i = 0; i < 100; ++i) {
      Status copy = s;
      Status moved = std::move(copy);
      Result<int> r(moved);
      all_equal = all_equal && r.status().code() == StatusCode::kQueueFull;
    }
    allocations = counter.stop();
  }
  EXPECT_TRUE(all_equal);
  EXPECT_EQ(allocations, 0u);
}

// A producer that meets a full table retries in a loop: the kQueueFull error
// must be as cheap as the success path.
TEST_F(AllocTest, SubmitToFullTableDoesNotAllocate) {
  std::mutex mu;
  std::condition_variable cv;
  bool release = false;
  std::atomic<bool> blocked{false};
  // A second engine whose only worker blocks, so its table fills up.
  EngineOptions o;
  o.capacity = 64;
  o.dequeue_batch = 1;
  auto opened = Engine::open(o);
  ASSERT_TRUE(opened.ok()) << opened.status().to_string();
  Engine engine = std::move(opened).value();
  auto h = engine.register_handler("block", [&](JobContext&) {
    blocked.store(true);
    std::unique_lock<std::mutex> lock(mu);
    cv.wait_for(lock, kWaitTimeout, [&] { return release; });
    return Outcome::kDone;
  });
  ASSERT_TRUE(h.ok());
  ASSERT_TRUE(engine.start().ok());
  const std::string payload(32, 'f');
  std::size_t accepted = 0;
  while (engine.submit(*h, payload).ok()) ++accepted;
  ASSERT_GT(accepted, 0u);
  std::vector<StatusCode> codes(1000, StatusCode::kOk);
  // The batch form too: a producer retrying a full table meets it at the rate
  // slots free up.
  const JobSpec batch[4] = {{*h, payload, {}}, {*h, payload, {}}, {*h, payload, {}},
                            {*h, payload, {}}};
  // This thread's first batch on this engine sizes its scratch array.
  ASSERT_EQ(engine.submit_batch(batch).status().code(), StatusCode::kQueueFull);
  std::size_t allocations = 0;
  {
    AllocationCounter counter;
    for (std::size_t i = 0; i < codes.size(); ++i) {
      codes[i] = i % 2 == 0 ? engine.submit(*h, payload).status().code()
                            : engine.submit_batch(batch).status().code();
    }
    allocations = counter.stop();
  }
  {
    std::lock_guard<std::mutex> lock(mu);
    release = true;
  }
  cv.notify_all();
  ASSERT_TRUE(engine.stop().ok());
  for (StatusCode code : codes) ASSERT_EQ(code, StatusCode::kQueueFull);
  EXPECT_EQ(allocations, 0u) << allocations << " heap allocations in " << codes.size()
                             << " submits and batches refused with kQueueFull";
}

TEST_F(AllocTest, SubmitOfLargePayloadAllocates) {
  const std::string payload(kInlinePayloadBytes + 1, 'L');
  std::size_t allocations = 0;
  StatusCode code = StatusCode::kInternal;
  {
    AllocationCounter counter;
    code = engine_->submit(handler_, payload).status().code();
    allocations = counter.stop();
  }
  ASSERT_EQ(code, StatusCode::kOk);
  submitted_ += 1;
  EXPECT_GE(allocations, 1u) << "a payload over kInlinePayloadBytes must be copied to the heap";
  WaitForAll();
}

}  // namespace
}  // namespace jobengine
