// Helpers the persistence tests share: a scratch directory and the options
// of an engine whose only store is a snapshot directory.
#pragma once

#include <gtest/gtest.h>
#include <signal.h>
#include <stdlib.h>  // mkdtemp
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <system_error>
#include <thread>

#include "jobengine/engine.h"

namespace jobengine::testing_support {

// A fresh directory under the temp directory, removed with everything in it
// afterwards. dir() names a path inside it (not created: an engine makes it).
class TempDir {
 public:
  TempDir() {
    std::string tmpl =
        (std::filesystem::temp_directory_path() / "jobengine-test-XXXXXX").string();
    char* made = ::mkdtemp(tmpl.data());
    if (made == nullptr) std::abort();
    path_ = made;
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  std::string dir(const std::string& sub = "snap") const { return path_ + "/" + sub; }

 private:
  std::string path_;
};

// One worker, 4,096 slots, a disk store in `dir` and no shared memory.
// Periodic disk snapshots every `disk_interval`; 0 (the default): only on
// demand, so that tests decide when.
inline EngineOptions DiskOptions(const std::string& dir,
                                 std::chrono::milliseconds disk_interval = {}) {
  EngineOptions o;
  o.workers = 1;
  o.capacity = 4096;
  o.idle = IdleStrategy::kSpinThenBlock;
  o.spin_iterations = 64;
  o.snapshot.enabled = true;
  o.snapshot.dir = dir;
  o.snapshot.shm_interval = std::chrono::milliseconds(0);
  o.snapshot.disk_interval = disk_interval;
  o.snapshot.exit_deadline = std::chrono::milliseconds(50);
  return o;
}

// For a forked child that keeps its jobs in a shared-memory segment: waits
// until a snapshot newer than generation `after` is published and a periodic
// check then found nothing changed since (the segment holds every job
// submitted before the call). False after 60 s: the child should exit, for
// the parent to report, rather than hang the test.
inline bool WaitUntilTheSegmentIsCurrent(Engine& e, std::uint64_t after) {
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  const auto wait = [&](auto done) {
    while (!done()) {
      if (std::chrono::steady_clock::now() > give_up) return false;
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    return true;
  };
  if (!wait([&] { return e.health().last_snapshot_generation > after; })) return false;
  const std::uint64_t unchanged = e.health().snapshots_unchanged;
  return wait([&] { return e.health().snapshots_unchanged > unchanged; });
}

// The parent's side of a forked child that writes one byte to ready[1] once
// it is set up, then waits to be killed: reads the byte, SIGKILLs the child
// and reaps it. A failure when the child ended (or failed) before it was ready.
inline ::testing::AssertionResult KillChildOnceReady(pid_t child, const int ready[2]) {
  ::close(ready[1]);
  char c = 0;
  const bool got = ::read(ready[0], &c, 1) == 1;
  ::close(ready[0]);
  if (!got) {
    int status = 0;
    (void)::waitpid(child, &status, 0);
    return ::testing::AssertionFailure() << "child failed before it was ready (status " << status
                                         << ")";
  }
  if (::kill(child, SIGKILL) != 0) return ::testing::AssertionFailure() << "kill failed";
  int status = 0;
  if (::waitpid(child, &status, 0) != child) return ::testing::AssertionFailure() << "waitpid failed";
  return ::testing::AssertionSuccess();
}

}  // namespace jobengine::testing_support
