// Helpers the persistence tests share: a scratch directory and the options
// of an engine whose only store is a snapshot directory.
#pragma once

#include <stdlib.h>  // mkdtemp

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <system_error>

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

}  // namespace jobengine::testing_support
