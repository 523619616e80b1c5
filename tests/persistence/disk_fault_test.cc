// Disk faults under a running engine: write, fsync, rename and directory
// fsync of its scheduled snapshots fail with EIO, ENOSPC or EDQUOT, once or
// persistently, or are interrupted (EINTR). The engine must keep running
// jobs, health() must report each failure (count and text), the newest
// generation on disk must keep verifying, nothing half-written may remain,
// and the next scheduled snapshot after the fault clears must succeed.
//
// The engine has no file-layer seam (persistence/file_system.h is injected
// only into FileStore, whose own fault matrix is in file_store_test.cc), so
// this test interposes the four libc calls for the whole test binary: the
// definitions below take precedence over libc's (and over a sanitizer's weak
// interceptors) and call the real function through dlsym(RTLD_NEXT). A fault
// applies only to descriptors and paths inside the test's snapshot directory.
//
// Recovery's reads too: open() and mmap() of one generation file (g_target)
// fail with EMFILE, ENFILE, EIO, ENOMEM or ESTALE, or are interrupted once.
// A newest generation that cannot be read must fail Engine::open(), naming
// the file, instead of recovering an older one whose next publishes would
// overwrite it.
#include <dlfcn.h>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <stdio.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdarg>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

#include "jobengine/engine.h"
#include "jobengine/snapshot_format.h"
#include "jobengine/snapshot_tools.h"

namespace {

enum class Op : int { kNone, kWrite, kFsync, kRename, kDirFsync, kOpenRead, kMmap };

// The armed fault. Set by the test thread while the engine runs, read by the
// snapshot thread inside the interposed calls.
std::atomic<Op> g_op{Op::kNone};
std::atomic<int> g_errno{0};
std::atomic<bool> g_every{false};
std::atomic<int> g_fired{0};
// A rename into the directory succeeded since the last directory fsync: the
// next one is a publish's (not a prune's), which a once-only fault must hit.
std::atomic<bool> g_renamed{false};
char g_dir[4096];  // canonical snapshot directory; written before arming
char g_target[4096];  // the file whose open (kOpenRead) or mmap (kMmap) fails

// Where `fd` points: 1 = the directory itself, 2 = a file inside it, 0 = elsewhere.
int classify_fd(int fd) {
  char link[64];
  std::snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
  char target[4096];
  const ssize_t n = ::readlink(link, target, sizeof target);
  if (n <= 0) return 0;
  const std::string_view t(target, static_cast<std::size_t>(n));
  const std::string_view d(g_dir);
  if (t == d) return 1;
  return t.size() > d.size() && t.substr(0, d.size()) == d && t[d.size()] == '/' ? 2 : 0;
}

bool inside_dir(const char* path) {
  const std::string_view p(path);
  const std::string_view d(g_dir);
  return p.size() > d.size() && p.substr(0, d.size()) == d && p[d.size()] == '/';
}

// Whether this call (of kind `op`, on the snapshot directory) fails now.
bool fire(Op op) {
  if (g_op.load(std::memory_order_acquire) != op) return false;
  if (!g_every.load(std::memory_order_relaxed) && g_fired.load(std::memory_order_relaxed) > 0) {
    return false;
  }
  g_fired.fetch_add(1, std::memory_order_relaxed);
  errno = g_errno.load(std::memory_order_relaxed);
  return true;
}

template <typename Fn>
Fn real(const char* name) {
  void* sym = ::dlsym(RTLD_NEXT, name);
  if (sym == nullptr) std::abort();
  return reinterpret_cast<Fn>(sym);
}

}  // namespace

extern "C" ssize_t write(int fd, const void* data, size_t size) {
  static const auto real_write = real<ssize_t (*)(int, const void*, size_t)>("write");
  if (g_op.load(std::memory_order_acquire) == Op::kWrite && classify_fd(fd) == 2 &&
      fire(Op::kWrite)) {
    return -1;
  }
  return real_write(fd, data, size);
}

extern "C" int fsync(int fd) {
  static const auto real_fsync = real<int (*)(int)>("fsync");
  const Op op = g_op.load(std::memory_order_acquire);
  if (op == Op::kFsync || op == Op::kDirFsync) {
    const int where = classify_fd(fd);
    if (where == 2 && fire(Op::kFsync)) return -1;
    if (where == 1 && op == Op::kDirFsync &&
        (g_every.load(std::memory_order_relaxed) || g_renamed.exchange(false)) &&
        fire(Op::kDirFsync)) {
      return -1;
    }
  }
  return real_fsync(fd);
}

extern "C" int rename(const char* from, const char* to) noexcept {
  static const auto real_rename = real<int (*)(const char*, const char*)>("rename");
  if (g_op.load(std::memory_order_acquire) == Op::kRename && inside_dir(from) &&
      fire(Op::kRename)) {
    return -1;
  }
  const int rc = real_rename(from, to);
  if (rc == 0 && inside_dir(from)) g_renamed.store(true, std::memory_order_relaxed);
  return rc;
}

extern "C" int open(const char* path, int flags, ...) {
  static const auto real_open = real<int (*)(const char*, int, ...)>("open");
  mode_t mode = 0;
  if ((flags & O_CREAT) != 0 || (flags & O_TMPFILE) == O_TMPFILE) {
    va_list args;
    va_start(args, flags);
    mode = va_arg(args, mode_t);
    va_end(args);
  }
  if (g_op.load(std::memory_order_acquire) == Op::kOpenRead && std::strcmp(path, g_target) == 0 &&
      fire(Op::kOpenRead)) {
    return -1;
  }
  return real_open(path, flags, mode);
}

extern "C" void* mmap(void* addr, size_t size, int prot, int flags, int fd, off_t offset) noexcept {
  static const auto real_mmap = real<void* (*)(void*, size_t, int, int, int, off_t)>("mmap");
  if (g_op.load(std::memory_order_acquire) == Op::kMmap && fd >= 0) {
    char link[64];
    std::snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    char target[4096];
    const ssize_t n = ::readlink(link, target, sizeof target - 1);
    if (n > 0) {
      target[n] = '\0';
      if (std::strcmp(target, g_target) == 0 && fire(Op::kMmap)) return MAP_FAILED;
    }
  }
  return real_mmap(addr, size, prot, flags, fd, offset);
}

namespace jobengine {
namespace {

namespace fs = std::filesystem;
using std::chrono::milliseconds;
using std::chrono::steady_clock;

constexpr milliseconds kWait{30000};

template <typename Pred>
bool WaitUntil(Pred pred) {
  const auto deadline = steady_clock::now() + kWait;
  while (!pred()) {
    if (steady_clock::now() > deadline) return false;
    std::this_thread::sleep_for(milliseconds(1));
  }
  return true;
}

const char* OpName(Op op) {
  switch (op) {
    case Op::kWrite:
      return "write";
    case Op::kFsync:
      return "fsync";
    case Op::kRename:
      return "rename";
    case Op::kDirFsync:
      return "fsync dir";
    case Op::kOpenRead:
      return "open";
    case Op::kMmap:
      return "mmap";
    case Op::kNone:
      break;
  }
  return "none";
}

struct Fault {
  Op op;
  int error;
  bool every;
};

class DiskFaultTest : public ::testing::TestWithParam<Fault> {
 protected:
  void SetUp() override {
    std::string tmpl = (fs::temp_directory_path() / "jobengine-diskfault-XXXXXX").string();
    ASSERT_NE(::mkdtemp(tmpl.data()), nullptr);
    root_ = fs::canonical(tmpl).string();
    dir_ = root_ + "/snap";
    ASSERT_LT(dir_.size(), sizeof g_dir);
    std::memcpy(g_dir, dir_.c_str(), dir_.size() + 1);
  }
  void TearDown() override {
    g_op.store(Op::kNone, std::memory_order_release);
    std::error_code ec;
    fs::remove_all(root_, ec);
  }

  std::vector<std::string> Names() const {
    std::vector<std::string> out;
    for (const auto& e : fs::directory_iterator(dir_)) out.push_back(e.path().filename().string());
    return out;
  }

  // Every generation file decodes with its checksums; no temp file is left.
  void ExpectCleanDirectory() const {
    for (const std::string& name : Names()) {
      EXPECT_NE(name.rfind(".tmp-", 0), 0u) << "temp file left behind: " << name;
      if (name.rfind("gen-", 0) != 0) continue;
      std::ifstream in(dir_ + "/" + name, std::ios::binary);
      const std::vector<unsigned char> bytes((std::istreambuf_iterator<char>(in)),
                                             std::istreambuf_iterator<char>());
      snapshot::DecodeError err;
      EXPECT_TRUE(snapshot::decode(bytes, &err).ok()) << name << " does not verify";
    }
  }

  // One worker; snapshots to dir_ every `disk` and to shared memory every
  // `shm` (0: none).
  EngineOptions Options(milliseconds shm, milliseconds disk) const {
    EngineOptions o;
    o.workers = 1;
    o.capacity = 1024;
    o.snapshot.enabled = true;
    o.snapshot.dir = dir_;
    o.snapshot.shm_interval = shm;
    o.snapshot.disk_interval = disk;
    return o;
  }

  // Arms `fault` for the calls inside dir_, from now on.
  static void Arm(const Fault& fault) {
    g_errno.store(fault.error, std::memory_order_relaxed);
    g_every.store(fault.every, std::memory_order_relaxed);
    g_fired.store(0, std::memory_order_relaxed);
    g_renamed.store(false, std::memory_order_relaxed);
    g_op.store(fault.op, std::memory_order_release);
  }

  std::string root_;
  std::string dir_;
};

TEST_P(DiskFaultTest, EngineRunsJobsReportsTheFailureAndTheNextScheduledSnapshotSucceeds) {
  const Fault fault = GetParam();
  auto e = Engine::open(Options(milliseconds(0), milliseconds(10)));
  ASSERT_TRUE(e.ok()) << e.status().to_string();
  std::atomic<int> ran{0};
  auto h = e->register_handler("w", [&](JobContext&) {
    ran.fetch_add(1);
    return Outcome::kDone;
  });
  ASSERT_TRUE(h.ok());
  ASSERT_TRUE(e->start().ok());
  ASSERT_TRUE(WaitUntil([&] { return e->health().last_durable_generation >= 1; }));

  const std::uint64_t failures_before = e->health().snapshot_failures;
  Arm(fault);

  // Jobs keep running while the disk fails.
  for (int i = 0; i < 100; ++i) ASSERT_TRUE(e->submit(*h, "x").ok());
  ASSERT_TRUE(WaitUntil([&] { return ran.load() == 100; })) << ran.load() << " of 100 ran";

  if (fault.error == EINTR) {
    // Interrupted once: the file layer repeats the call (write, fsync) and
    // the snapshot succeeds, or the publish fails visibly (rename) and the
    // next one succeeds; no failure is ever hidden as a success.
    ASSERT_TRUE(WaitUntil([&] { return g_fired.load() >= 1; }));
    const std::uint64_t after_fault = e->health().last_durable_generation;
    // A change, so that the next scheduled snapshot is written (an unchanged
    // engine's is skipped).
    ASSERT_TRUE(e->submit(*h, "x").ok());
    ASSERT_TRUE(WaitUntil([&] { return e->health().last_durable_generation > after_fault; }));
    const Health health = e->health();
    EXPECT_EQ(health.snapshot_failures - failures_before, fault.op == Op::kRename ? 1u : 0u);
  } else if (!fault.every) {
    // Once: one scheduled snapshot fails and says so; the next one succeeds.
    ASSERT_TRUE(WaitUntil([&] { return e->health().snapshot_failures > failures_before; }));
    ASSERT_TRUE(WaitUntil([&] {
      const Health hl = e->health();
      return hl.last_snapshot_error.empty() && hl.snapshot_failures == failures_before + 1;
    })) << e->health().last_snapshot_error;
  } else {
    // Persistent: every scheduled snapshot fails, health says why, nothing
    // new becomes durable; the newest generation keeps verifying.
    ASSERT_TRUE(WaitUntil([&] { return e->health().snapshot_failures >= failures_before + 1; }));
    const std::uint64_t durable = e->health().last_durable_generation;
    ASSERT_TRUE(WaitUntil([&] { return e->health().snapshot_failures >= failures_before + 4; }))
        << "the snapshot thread must keep retrying on its schedule";
    const Health health = e->health();
    EXPECT_EQ(health.last_durable_generation, durable);
    EXPECT_NE(health.last_snapshot_error.find(std::strerror(fault.error)), std::string::npos)
        << health.last_snapshot_error;
    EXPECT_NE(health.last_snapshot_error.find(dir_), std::string::npos)
        << health.last_snapshot_error;
    EXPECT_GT(health.at_risk, 0u) << "the jobs since the last durable snapshot are at risk";
    ExpectCleanDirectory();
    // The fault clears: the next scheduled snapshot succeeds and health clears.
    g_op.store(Op::kNone, std::memory_order_release);
    ASSERT_TRUE(WaitUntil([&] {
      const Health hl = e->health();
      return hl.last_durable_generation > durable && hl.last_snapshot_error.empty();
    })) << e->health().last_snapshot_error;
  }
  g_op.store(Op::kNone, std::memory_order_release);
  ASSERT_TRUE(e->stop(StopMode::kDrain).ok());
  EXPECT_EQ(ran.load(), fault.error == EINTR ? 101 : 100);
  ExpectCleanDirectory();
}

std::vector<Fault> AllFaults() {
  std::vector<Fault> out;
  for (Op op : {Op::kWrite, Op::kFsync, Op::kRename, Op::kDirFsync}) {
    for (int error : {EIO, ENOSPC, EDQUOT}) {
      out.push_back({op, error, false});
      out.push_back({op, error, true});
    }
    out.push_back({op, EINTR, false});
  }
  return out;
}

// With both stores, the shared-memory snapshots between two disk ones
// succeed while the disk keeps failing: they must not clear the disk's error
// from health() (a failing disk would then look healthy between attempts).
TEST_F(DiskFaultTest, SharedMemorySuccessesDoNotHideAFailingDisk) {
  const std::string shm_name = "jobengine-diskfault-" + std::to_string(::getpid());
  struct Unlink {
    std::string name;
    ~Unlink() { ::shm_unlink(("/" + name).c_str()); }
  } unlink_at_end{shm_name};
  EngineOptions o = Options(milliseconds(2), milliseconds(50));
  o.snapshot.shm_name = shm_name;
  auto e = Engine::open(o);
  ASSERT_TRUE(e.ok()) << e.status().to_string();
  auto h = e->register_handler("w", [](JobContext&) { return Outcome::kDone; });
  ASSERT_TRUE(h.ok());
  ASSERT_TRUE(e->start().ok());
  ASSERT_TRUE(WaitUntil([&] { return e->health().last_durable_generation >= 1; }));
  // A job per poll: scheduled snapshots of an unchanged engine are skipped.
  const auto churn = [&] { ASSERT_TRUE(e->submit(*h, "x").ok()); };
  Arm({Op::kFsync, EIO, /*every=*/true});
  ASSERT_TRUE(WaitUntil([&] {
    churn();
    return g_fired.load() >= 1;
  }));
  const std::uint64_t generation = e->health().last_snapshot_generation;
  // Several shared-memory snapshots later the disk's failure still shows.
  ASSERT_TRUE(WaitUntil([&] {
    churn();
    return e->health().last_snapshot_generation >= generation + 5;
  }));
  const Health health = e->health();
  EXPECT_NE(health.last_snapshot_error.find(std::strerror(EIO)), std::string::npos)
      << "'" << health.last_snapshot_error << "'";
  EXPECT_NE(health.last_snapshot_error.find(dir_), std::string::npos) << health.last_snapshot_error;
  EXPECT_FALSE(health.ok);
  // The fault clears: the next disk snapshot clears the error.
  g_op.store(Op::kNone, std::memory_order_release);
  const std::uint64_t durable = health.last_durable_generation;
  ASSERT_TRUE(WaitUntil([&] {
    const Health hl = e->health();
    return hl.last_durable_generation > durable && hl.last_snapshot_error.empty();
  })) << e->health().last_snapshot_error;
  ASSERT_TRUE(e->stop(StopMode::kDrain).ok());
  ExpectCleanDirectory();
}

// A publish that fails while nothing changes (snapshot_now() on an idle
// engine, its disk failing once): the next scheduled disk snapshot must still
// be written, though the engine's state is the one the store last held, or
// the error would stay in health() until some job came along.
TEST_F(DiskFaultTest, AFailedPublishOfAnIdleEngineIsRetriedOnSchedule) {
  auto e = Engine::open(Options(milliseconds(0), milliseconds(10)));
  ASSERT_TRUE(e.ok()) << e.status().to_string();
  auto h = e->register_handler("w", [](JobContext&) { return Outcome::kDone; });
  ASSERT_TRUE(h.ok());
  ASSERT_TRUE(e->start().ok());
  ASSERT_TRUE(e->submit(*h, "x").ok());
  ASSERT_TRUE(WaitUntil([&] { return e->health().done == 1; }));
  // Settled: scheduled snapshots are being skipped.
  const std::uint64_t unchanged = e->health().snapshots_unchanged;
  ASSERT_TRUE(WaitUntil([&] { return e->health().snapshots_unchanged >= unchanged + 3; }));
  const std::uint64_t durable = e->health().last_durable_generation;
  Arm({Op::kFsync, EIO, /*every=*/false});
  auto failed = e->snapshot_now();
  ASSERT_FALSE(failed.ok());
  EXPECT_EQ(failed.status().code(), StatusCode::kIoError);
  EXPECT_FALSE(e->health().last_snapshot_error.empty());
  // No job since: the scheduled snapshot retries all the same, and clears it.
  ASSERT_TRUE(WaitUntil([&] {
    const Health hl = e->health();
    return hl.last_durable_generation > durable && hl.last_snapshot_error.empty();
  })) << e->health().last_snapshot_error;
  EXPECT_EQ(e->health().done, 1u);
  ASSERT_TRUE(e->stop(StopMode::kDrain).ok());
  ExpectCleanDirectory();
}

// The final snapshot of stop(kDrain) or stop(kAbandon) fails (a persistent
// fsync EIO): the engine stops all the same, but StopReport::final_snapshot
// must say the snapshot was not written (it said nothing: a drain's delayed
// job was lost and an abandoned one came back, with stop() reporting OK), and
// health() must keep the error. The restart recovers the previous generation.
class FinalSnapshotFaultTest : public DiskFaultTest {
 protected:
  // Starts an engine with no periodic snapshots, submits one job delayed by
  // an hour and writes a generation (holding it when `job_in_generation`,
  // else before it); then arms `fault` (kNone: none) and stops with `mode`.
  // Returns the report and the generation written.
  std::pair<StopReport, std::uint64_t> StopWith(StopMode mode, bool job_in_generation,
                                                Op fault) {
    auto e = Engine::open(Options(milliseconds(0), milliseconds(0)));
    EXPECT_TRUE(e.ok()) << e.status().to_string();
    auto h = e->register_handler("w", [](JobContext&) { return Outcome::kDone; });
    EXPECT_TRUE(h.ok());
    EXPECT_TRUE(e->start().ok());
    SubmitOptions later;
    later.delay = std::chrono::hours(1);
    std::uint64_t generation = 0;
    if (!job_in_generation) generation = e->snapshot_now()->generation;
    EXPECT_TRUE(e->submit(*h, "x", later).ok());
    if (job_in_generation) generation = e->snapshot_now()->generation;
    EXPECT_NE(generation, 0u);
    if (fault != Op::kNone) Arm({fault, EIO, /*every=*/true});
    auto report = e->stop(mode);
    EXPECT_TRUE(report.ok()) << report.status().to_string();
    if (fault != Op::kNone) {
      const Health health = e->health();
      EXPECT_NE(health.last_snapshot_error.find(std::strerror(EIO)), std::string::npos)
          << "'" << health.last_snapshot_error << "'";
    }
    g_op.store(Op::kNone, std::memory_order_release);
    return {report.ok() ? *report : StopReport{}, generation};
  }

  // Opens and starts the directory again; returns what recovery restored.
  RecoveryReport Restart() {
    auto e = Engine::open(Options(milliseconds(0), milliseconds(0)));
    EXPECT_TRUE(e.ok()) << e.status().to_string();
    EXPECT_TRUE(e->register_handler("w", [](JobContext&) { return Outcome::kDone; }).ok());
    auto started = e->start();
    EXPECT_TRUE(started.ok()) << started.status().to_string();
    RecoveryReport recovery = started.ok() ? started->recovery : RecoveryReport{};
    EXPECT_TRUE(e->stop(StopMode::kAbandon).ok());
    return recovery;
  }
};

TEST_F(FinalSnapshotFaultTest, AFailedFinalSnapshotIsInTheStopReport) {
  for (const auto& [mode, op] : {std::pair{StopMode::kDrain, Op::kFsync},
                                 std::pair{StopMode::kDrain, Op::kWrite},
                                 std::pair{StopMode::kAbandon, Op::kFsync},
                                 std::pair{StopMode::kAbandon, Op::kWrite}}) {
    SCOPED_TRACE(std::string(mode == StopMode::kDrain ? "drain, " : "abandon, ") + OpName(op));
    // A drain leaves the job for the final snapshot, which never had it; an
    // abandon drops it, but the generation that still holds it is the newest.
    const bool job_in_generation = mode == StopMode::kAbandon;
    const auto [report, generation] = StopWith(mode, job_in_generation, op);
    EXPECT_FALSE(report.final_snapshot.ok()) << "stop() said nothing of the failed final snapshot";
    EXPECT_EQ(report.final_snapshot.code(), StatusCode::kIoError)
        << report.final_snapshot.to_string();
    EXPECT_NE(std::string(report.final_snapshot.message()).find(std::strerror(EIO)),
              std::string::npos)
        << report.final_snapshot.to_string();
    EXPECT_NE(std::string(report.final_snapshot.message()).find("final snapshot"),
              std::string::npos)
        << report.final_snapshot.to_string();
    if (mode == StopMode::kDrain) {
      EXPECT_EQ(report.delayed_left, 1u);
    } else {
      EXPECT_EQ(report.dropped, 1u);
    }
    ExpectCleanDirectory();
    // What the report warns of: the restart recovers the previous generation.
    const RecoveryReport recovery = Restart();
    EXPECT_EQ(recovery.generation, generation) << recovery.why;
    EXPECT_EQ(recovery.delayed, job_in_generation ? 1u : 0u) << recovery.why;
    TearDown();
    SetUp();
  }
}

TEST_F(FinalSnapshotFaultTest, AWrittenFinalSnapshotIsOkInTheStopReport) {
  for (StopMode mode : {StopMode::kDrain, StopMode::kAbandon}) {
    SCOPED_TRACE(mode == StopMode::kDrain ? "drain" : "abandon");
    const auto [report, generation] = StopWith(mode, /*job_in_generation=*/true, Op::kNone);
    EXPECT_TRUE(report.final_snapshot.ok()) << report.final_snapshot.to_string();
    const RecoveryReport recovery = Restart();
    EXPECT_GT(recovery.generation, generation) << recovery.why;
    // A drain's delayed job is in the final snapshot; an abandoned one is not.
    EXPECT_EQ(recovery.delayed, mode == StopMode::kDrain ? 1u : 0u) << recovery.why;
    TearDown();
    SetUp();
  }
}

// Recovery at open(): the newest generation file cannot be opened (EMFILE,
// ENFILE: the process or system is out of descriptors; EIO, ESTALE) or mapped
// (ENOMEM, EIO), while an older one reads fine. Nothing says the newest is
// damaged: open() must fail naming it and the errno text, and leave it in
// place. Before, recovery skipped it like a corrupt file and loaded the older
// generation; start() succeeded and the next publishes recycled the newest,
// losing the jobs a returned snapshot_now() (or the final snapshot) had made
// durable. Interrupted once (EINTR), the call is repeated and the newest is
// loaded as usual.
TEST_F(DiskFaultTest, ANewestGenerationThatCannotBeReadFailsOpenInsteadOfLoadingAnOlderOne) {
  for (const Fault fault : {Fault{Op::kOpenRead, EMFILE, true}, Fault{Op::kOpenRead, ENFILE, true},
                            Fault{Op::kOpenRead, EIO, true}, Fault{Op::kOpenRead, ESTALE, true},
                            Fault{Op::kMmap, ENOMEM, true}, Fault{Op::kMmap, EIO, true},
                            Fault{Op::kOpenRead, EINTR, false}, Fault{Op::kMmap, EINTR, false}}) {
    SCOPED_TRACE(std::string(OpName(fault.op)) + ": " + std::strerror(fault.error));
    {
      // An older generation with one delayed job; the newest (the final
      // snapshot of stop()) with two.
      auto e = Engine::open(Options(milliseconds(0), milliseconds(0)));
      ASSERT_TRUE(e.ok()) << e.status().to_string();
      auto h = e->register_handler("w", [](JobContext&) { return Outcome::kDone; });
      ASSERT_TRUE(h.ok());
      ASSERT_TRUE(e->start().ok());
      SubmitOptions later;
      later.delay = std::chrono::hours(1);
      ASSERT_TRUE(e->submit(*h, "a", later).ok());
      ASSERT_TRUE(e->snapshot_now().ok());
      ASSERT_TRUE(e->submit(*h, "b", later).ok());
      auto stopped = e->stop(StopMode::kSnapshotAndExit);
      ASSERT_TRUE(stopped.ok()) << stopped.status().to_string();
      ASSERT_TRUE(stopped->final_snapshot.ok()) << stopped->final_snapshot.to_string();
    }
    std::vector<std::string> gens;
    for (const std::string& name : Names()) {
      if (name.rfind("gen-", 0) == 0) gens.push_back(name);
    }
    std::sort(gens.begin(), gens.end());  // fixed-width numbers: oldest first
    ASSERT_GE(gens.size(), 2u) << "no older generation to fall back to";
    const std::string newest = dir_ + "/" + gens.back();
    const auto newest_size = fs::file_size(newest);
    ASSERT_LT(newest.size(), sizeof g_target);
    std::memcpy(g_target, newest.c_str(), newest.size() + 1);

    Arm(fault);
    {
      auto e = Engine::open(Options(milliseconds(0), milliseconds(0)));
      EXPECT_GE(g_fired.load(), 1) << "the fault never fired";
      if (fault.error == EINTR) {
        ASSERT_TRUE(e.ok()) << e.status().to_string();
      } else {
        ASSERT_FALSE(e.ok()) << "open() recovered an older generation past an unreadable " << newest;
        const std::string why = e.status().to_string();
        EXPECT_EQ(e.status().code(), StatusCode::kIoError) << why;
        EXPECT_NE(why.find(newest), std::string::npos) << why;
        EXPECT_NE(why.find(std::strerror(fault.error)), std::string::npos) << why;
        EXPECT_NE(why.find("retry"), std::string::npos) << why;
        EXPECT_NE(why.find("move it out"), std::string::npos) << why;
      }
    }
    if (fault.op == Op::kOpenRead && fault.error != EINTR) {
      // jobsnap's loader (it reads, never maps): the same I/O error, not an
      // older generation shown as the one the engine would load.
      Arm(fault);
      auto image = snapshot_tools::load_newest(dir_, "");
      EXPECT_GE(g_fired.load(), 1) << "the fault never fired";
      ASSERT_FALSE(image.ok()) << "jobsnap showed an older generation past an unreadable " << newest;
      const std::string why = image.status().to_string();
      EXPECT_EQ(image.status().code(), StatusCode::kIoError) << why;
      EXPECT_NE(why.find(newest), std::string::npos) << why;
      EXPECT_NE(why.find(std::strerror(fault.error)), std::string::npos) << why;
    }
    g_op.store(Op::kNone, std::memory_order_release);
    // The newest is still there, whole, and the next open() (the fault gone)
    // recovers it.
    ASSERT_TRUE(fs::exists(newest));
    EXPECT_EQ(fs::file_size(newest), newest_size);
    {
      auto e = Engine::open(Options(milliseconds(0), milliseconds(0)));
      ASSERT_TRUE(e.ok()) << e.status().to_string();
      ASSERT_TRUE(e->register_handler("w", [](JobContext&) { return Outcome::kDone; }).ok());
      auto started = e->start();
      ASSERT_TRUE(started.ok()) << started.status().to_string();
      EXPECT_EQ(dir_ + "/" + gens.back(), started->recovery.source) << started->recovery.why;
      EXPECT_EQ(started->recovery.delayed, 2u) << started->recovery.why;
      EXPECT_TRUE(started->recovery.skipped.empty());
      ASSERT_TRUE(e->stop(StopMode::kAbandon).ok());
    }
    TearDown();
    SetUp();
  }
}

INSTANTIATE_TEST_SUITE_P(EachCallErrnoOnceAndPersistent, DiskFaultTest,
                         ::testing::ValuesIn(AllFaults()),
                         [](const ::testing::TestParamInfo<Fault>& param_info) {
                           std::string name = OpName(param_info.param.op);
                           for (char& c : name) {
                             if (c == ' ') c = '_';
                           }
                           const int err = param_info.param.error;
                           name += err == EIO      ? "_EIO"
                                   : err == ENOSPC ? "_ENOSPC"
                                   : err == EDQUOT ? "_EDQUOT"
                                                   : "_EINTR";
                           name += param_info.param.every ? "_Persistent" : "_Once";
                           return name;
                         });

}  // namespace
}  // namespace jobengine
