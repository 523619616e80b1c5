// The live record (persistence/live_record.h): what a crash must not take
// with it, in dir/LIVE and its slot file on tmpfs. The crash behaviour itself
// (a job that kills the process at once is quarantined; ids are never handed
// out twice) is in crash_test.cc; here, the files: round trip, and what is
// ignored or refused. The slot files go in a directory of /dev/shm of each
// test's own (removed after it), except in the engine's test, which uses the
// default.
#include "persistence/live_record.h"

#include <gtest/gtest.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <csignal>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <span>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "jobengine/engine.h"

namespace jobengine::persist {
namespace {

namespace fs = std::filesystem;

class LiveRecordTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = (fs::temp_directory_path() / "jobengine-live-record-XXXXXX").string();
    ASSERT_NE(::mkdtemp(dir_.data()), nullptr);
    slots_ = "/dev/shm/jobengine-test-live-XXXXXX";
    ASSERT_NE(::mkdtemp(slots_.data()), nullptr);
  }
  void TearDown() override {
    std::error_code ec;
    fs::remove_all(dir_, ec);
    fs::remove_all(slots_, ec);
  }
  Result<std::unique_ptr<FileLiveRecord>> open() const { return FileLiveRecord::open(dir_, slots_); }
  std::string path() const { return dir_ + "/LIVE"; }
  std::string read_file(const std::string& p) const {
    std::ifstream in(p, std::ios::binary);
    return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  }
  void write_file(const std::string& bytes) const {
    std::ofstream(path(), std::ios::binary | std::ios::trunc) << bytes;
  }
  // A record armed for `workers` whose worker `worker` runs job `id`, left as
  // a killed process leaves it. Returns its slot file's path.
  std::string crash_while_running(unsigned workers, unsigned worker, JobId id) {
    auto r = open();
    EXPECT_TRUE(r.ok()) << r.status().to_string();
    if (!r.ok()) return {};
    const Status armed = (*r)->arm(workers, 100);
    EXPECT_TRUE(armed.ok()) << armed.to_string();
    if (!armed.ok()) return {};
    (*r)->running_word(worker)->store(id);
    return (*r)->slot_path();
  }
  // arm() with the process's file size limit at `limit` bytes.
  static Status arm_under_file_limit(FileLiveRecord& r, unsigned workers, rlim_t limit) {
    struct rlimit old {};
    if (::getrlimit(RLIMIT_FSIZE, &old) != 0) return Status(StatusCode::kInternal, "getrlimit");
    const auto old_handler = std::signal(SIGXFSZ, SIG_IGN);
    struct rlimit small = old;
    small.rlim_cur = limit;
    if (::setrlimit(RLIMIT_FSIZE, &small) != 0) return Status(StatusCode::kInternal, "setrlimit");
    const Status armed = r.arm(workers, 100);
    EXPECT_EQ(::setrlimit(RLIMIT_FSIZE, &old), 0);
    std::signal(SIGXFSZ, old_handler);
    return armed;
  }
  // An engine of one worker whose snapshots go to dir_/snaps.
  EngineOptions engine_options(std::size_t capacity) const {
    EngineOptions o;
    o.workers = 1;
    o.capacity = capacity;
    o.snapshot.enabled = true;
    o.snapshot.dir = dir_ + "/snaps";
    return o;
  }
  std::string dir_;
  std::string slots_;
};

TEST_F(LiveRecordTest, WhatAWorkerWasRunningAndTheLeaseSurviveTheProcess) {
  {
    auto r = open();
    ASSERT_TRUE(r.ok()) << r.status().to_string();
    EXPECT_TRUE((*r)->previous_running().empty());
    EXPECT_EQ((*r)->previous_lease_end(), 0u);
    EXPECT_TRUE((*r)->previous_problem().empty()) << (*r)->previous_problem();
    EXPECT_EQ((*r)->running_word(0), nullptr) << "a word before arm()";
    ASSERT_TRUE((*r)->arm(3, 100).ok());
    ASSERT_NE((*r)->running_word(2), nullptr);
    EXPECT_EQ((*r)->running_word(3), nullptr);
    EXPECT_TRUE((*r)->slot_problem().empty()) << (*r)->slot_problem();
    EXPECT_EQ((*r)->slot_path().rfind(slots_ + "/jobengine-live-", 0), 0u) << (*r)->slot_path();
    (*r)->running_word(1)->store(42);
    (*r)->running_word(2)->store(7);
    (*r)->running_word(2)->store(0);  // finished
    (*r)->extend_lease(5000);
    (*r)->extend_lease(4000);  // never lowered
    // The words that change per job are in the slot file on tmpfs, not in
    // dir/LIVE (whose pages the disk's writeback write-protects).
    EXPECT_EQ(fs::file_size(path()), FileLiveRecord::kHeaderBytes);
    const std::string slots = read_file((*r)->slot_path());
    ASSERT_EQ(slots.size(), FileLiveRecord::kSlotFileHeaderBytes + 3 * FileLiveRecord::kSlotBytes);
    EXPECT_EQ(slots[FileLiveRecord::kSlotFileHeaderBytes + FileLiveRecord::kSlotBytes], 42);
    struct stat st {};
    ASSERT_EQ(::stat((*r)->slot_path().c_str(), &st), 0);
    EXPECT_EQ(st.st_mode & 0777, 0600u);
  }  // as a killed process leaves it: nothing is cleared on the way out
  struct stat st {};
  ASSERT_EQ(::stat(path().c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);
  auto r = open();
  ASSERT_TRUE(r.ok()) << r.status().to_string();
  EXPECT_EQ((*r)->previous_running(), std::vector<JobId>{42});
  EXPECT_EQ((*r)->previous_lease_end(), 5000u);
  // arm() starts this process's record: idle workers, the lease kept.
  ASSERT_TRUE((*r)->arm(1, 10).ok());
  EXPECT_EQ((*r)->running_word(0)->load(), 0u);
  r->reset();
  auto again = open();
  ASSERT_TRUE(again.ok());
  EXPECT_TRUE((*again)->previous_running().empty());
  EXPECT_EQ((*again)->previous_lease_end(), 5000u);
}

TEST_F(LiveRecordTest, AFileThatIsNotALiveRecordIsIgnoredWithTheReason) {
  struct Case {
    std::string bytes;
    std::string reason;
  };
  std::string zeros(128, '\0');
  std::string huge_slots(128, '\0');
  std::memcpy(huge_slots.data(), "JOBLIVE1", 8);
  huge_slots[8] = 1;                       // version 1
  huge_slots[12] = static_cast<char>(0xe8);  // 1000 slots in 128 bytes
  huge_slots[13] = 3;
  std::string version9 = huge_slots;
  version9[8] = 9;
  version9[12] = 1;
  version9[13] = 0;
  for (const Case& c : {Case{"hello", "size"}, Case{zeros, "magic"}, Case{huge_slots, "do not fit"},
                        Case{version9, "version 9"}}) {
    SCOPED_TRACE(c.reason);
    write_file(c.bytes);
    auto r = open();
    ASSERT_TRUE(r.ok()) << r.status().to_string();
    EXPECT_NE((*r)->previous_problem().find(c.reason), std::string::npos)
        << (*r)->previous_problem();
    EXPECT_TRUE((*r)->previous_running().empty());
    EXPECT_EQ((*r)->previous_lease_end(), 0u);
  }
}

TEST_F(LiveRecordTest, ASymlinkOrADirectoryInItsPlaceIsRefusedAndLeftAlone) {
  const std::string target = dir_ + "/elsewhere";
  std::ofstream(target) << "keep";
  ASSERT_EQ(::symlink(target.c_str(), path().c_str()), 0);
  auto r = open();
  EXPECT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("LIVE"), std::string::npos) << r.status().to_string();
  std::ifstream in(target);
  std::string kept;
  in >> kept;
  EXPECT_EQ(kept, "keep");
  ASSERT_EQ(::unlink(path().c_str()), 0);
  ASSERT_EQ(::mkdir(path().c_str(), 0700), 0);
  r = open();
  EXPECT_FALSE(r.ok());
}

TEST_F(LiveRecordTest, AnExistingFileGetsMode0600) {
  write_file("");
  ASSERT_EQ(::chmod(path().c_str(), 0644), 0);
  auto r = open();
  ASSERT_TRUE(r.ok()) << r.status().to_string();
  struct stat st {};
  ASSERT_EQ(::stat(path().c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);
}

TEST_F(LiveRecordTest, ARecordFromBeforeARebootNamesNoRunningJobButKeepsItsLease) {
  // After a power loss the file holds whatever the page cache had written
  // back: the jobs it names may have finished long before.
  {
    auto r = open();
    ASSERT_TRUE(r.ok());
    ASSERT_TRUE((*r)->arm(1, 100).ok());
    (*r)->running_word(0)->store(42);
    (*r)->extend_lease(7000);
  }
  {
    std::fstream f(path(), std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(FileLiveRecord::kBootIdOffset);
    f << "00000000-0000-0000-0000-000000000000";  // another boot's id
  }
  auto r = open();
  ASSERT_TRUE(r.ok());
  EXPECT_TRUE((*r)->previous_running().empty());
  EXPECT_EQ((*r)->previous_lease_end(), 7000u);
  EXPECT_NE((*r)->previous_problem().find("reboot"), std::string::npos) << (*r)->previous_problem();
}

TEST_F(LiveRecordTest, ARecordThatCannotBeArmedIsEmptiedSoItsJobsAreNotCountedTwice) {
  // start() made the previous record's recoveries durable before arm(); if
  // arm() fails, the old ids must not be counted again at the next start.
  ASSERT_FALSE(crash_while_running(1, 0, 42).empty());
  {
    auto r = open();
    ASSERT_TRUE(r.ok());
    ASSERT_EQ((*r)->previous_running(), std::vector<JobId>{42});
    // 200 workers need 12,864 bytes: above this file-size limit, in the slot
    // file and in dir/LIVE alike.
    const Status armed = arm_under_file_limit(**r, 200, 4096);
    EXPECT_FALSE(armed.ok());
    EXPECT_NE(armed.message().find("LIVE"), std::string::npos) << armed.to_string();
    EXPECT_FALSE(fs::exists((*r)->slot_path())) << "a failed arm() left its slot file behind";
  }
  auto r = open();
  ASSERT_TRUE(r.ok());
  EXPECT_TRUE((*r)->previous_running().empty());
}

TEST_F(LiveRecordTest, WithoutAUsableSlotFileTheSlotsGoInTheFileAsInVersionOne) {
  // A symlink in the slot file's place (as another user of /dev/shm could
  // put there) is not followed: the record keeps its slots in dir/LIVE.
  std::string slot_path;
  {
    auto r = open();
    ASSERT_TRUE(r.ok());
    slot_path = (*r)->slot_path();
  }
  EXPECT_FALSE(fs::exists(slot_path)) << "open() made the slot file; only arm() may";
  const std::string target = slots_ + "/elsewhere";
  std::ofstream(target) << "keep";
  ASSERT_EQ(::symlink(target.c_str(), slot_path.c_str()), 0);
  {
    auto r = open();
    ASSERT_TRUE(r.ok()) << r.status().to_string();
    EXPECT_NE((*r)->slot_problem().find(slot_path), std::string::npos) << (*r)->slot_problem();
    ASSERT_TRUE((*r)->arm(2, 100).ok());
    (*r)->running_word(1)->store(31);
    (*r)->extend_lease(9000);
  }
  EXPECT_EQ(read_file(target), "keep");
  EXPECT_EQ(fs::file_size(path()), FileLiveRecord::kHeaderBytes + 2 * FileLiveRecord::kSlotBytes);
  const std::string bytes = read_file(path());
  EXPECT_EQ(bytes[8], 1) << "version 1: the slots are in the file";
  EXPECT_EQ(bytes[FileLiveRecord::kHeaderBytes + FileLiveRecord::kSlotBytes], 31);
  // A reader with a usable slot file still reads it, and arming over it
  // clears its slots (their recoveries are durable by then) and never
  // shrinks it (a kill between a shrink and the header's rewrite would leave
  // a version-1 header whose slots do not fit: the lease lost).
  ASSERT_EQ(::unlink(slot_path.c_str()), 0);
  {
    auto r = open();
    ASSERT_TRUE(r.ok());
    EXPECT_TRUE((*r)->slot_problem().empty()) << (*r)->slot_problem();
    EXPECT_EQ((*r)->previous_running(), std::vector<JobId>{31});
    EXPECT_EQ((*r)->previous_lease_end(), 9000u);
    ASSERT_TRUE((*r)->arm(1, 100).ok());
    EXPECT_EQ(read_file(path())[8], 2) << "version 2: the slots are in the slot file";
  }
  EXPECT_EQ(fs::file_size(path()), FileLiveRecord::kHeaderBytes + 2 * FileLiveRecord::kSlotBytes);
  auto r = open();
  ASSERT_TRUE(r.ok());
  EXPECT_TRUE((*r)->previous_running().empty()) << "slot 1 of the old record was not cleared";
  EXPECT_EQ((*r)->previous_lease_end(), 9000u);
  EXPECT_TRUE((*r)->previous_problem().empty()) << (*r)->previous_problem();
}

TEST_F(LiveRecordTest, ACleanCloseRemovesTheSlotFileAndLeavesNoRunningJob) {
  std::string slot_path;
  {
    auto r = open();
    ASSERT_TRUE(r.ok());
    ASSERT_TRUE((*r)->arm(2, 100).ok());
    slot_path = (*r)->slot_path();
    (*r)->running_word(0)->store(5);
    (*r)->running_word(0)->store(0);
    (*r)->extend_lease(6000);
    (*r)->close();
    EXPECT_EQ((*r)->running_word(0), nullptr);
    EXPECT_FALSE(fs::exists(slot_path));
  }
  auto r = open();
  ASSERT_TRUE(r.ok());
  EXPECT_TRUE((*r)->previous_running().empty());
  EXPECT_TRUE((*r)->previous_problem().empty()) << (*r)->previous_problem();
  EXPECT_EQ((*r)->previous_lease_end(), 6000u);
}

TEST_F(LiveRecordTest, ASlotFileThatIsGoneOrNotThisRecordsNamesNoRunningJob) {
  const std::string slot_path = crash_while_running(1, 0, 77);
  ASSERT_FALSE(slot_path.empty());
  const std::string slots = read_file(slot_path);
  // Removed behind the record's back (systemd's RemoveIPC at logout).
  ASSERT_EQ(::unlink(slot_path.c_str()), 0);
  
  {
    auto r = open();
    ASSERT_TRUE(r.ok());
    EXPECT_TRUE((*r)->previous_running().empty());
    EXPECT_NE((*r)->previous_problem().find("gone"), std::string::npos) << (*r)->previous_problem();
  }
  // A slot file armed with another header (dir/LIVE restored from a backup,
  // or made anew: it may well get the old file's inode, so the same slot
  // file name) is refused: the pair ids differ.
  std::ofstream(slot_path, std::ios::binary) << slots;
  {
    std::fstream f(path(), std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(FileLiveRecord::kPairOffset);
    f << "otherpid";
  }
  auto r = open();
  ASSERT_TRUE(r.ok());
  EXPECT_TRUE((*r)->previous_running().empty());
  EXPECT_NE((*r)->previous_problem().find("another LIVE file"), std::string::npos)
      << (*r)->previous_problem();
  EXPECT_EQ((*r)->previous_lease_end(), 100u);
}

TEST_F(LiveRecordTest, ASlotFileThatCannotBeSizedPutsTheSlotsInTheFileInstead) {
  // A full /dev/shm (a container's is 64 MiB) or a file size limit must not
  // cost the record: the slots go in dir/LIVE. Here: a version-1 record of
  // 200 slots (made without a slot file) leaves dir/LIVE big enough, and a
  // file size limit refuses the slot file its 12,864 bytes.
  {
    auto r = FileLiveRecord::open(dir_, slots_ + "/missing");
    ASSERT_TRUE(r.ok());
    ASSERT_TRUE((*r)->arm(200, 100).ok());
  }
  auto r = open();
  ASSERT_TRUE(r.ok());
  const Status armed = arm_under_file_limit(**r, 200, 4096);
  ASSERT_TRUE(armed.ok()) << armed.to_string();
  EXPECT_NE((*r)->slot_problem().find("File too large"), std::string::npos) << (*r)->slot_problem();
  EXPECT_NE((*r)->arm_warning().find("writeback"), std::string::npos) << (*r)->arm_warning();
  EXPECT_FALSE(fs::exists((*r)->slot_path()));
  EXPECT_EQ(read_file(path())[8], 1);
  (*r)->running_word(199)->store(12);
  r->reset();
  auto again = open();
  ASSERT_TRUE(again.ok());
  EXPECT_EQ((*again)->previous_running(), std::vector<JobId>{12});
}

TEST_F(LiveRecordTest, OnceTheSlotFileIsGoneAfterACrashTheSlotsStayInTheFile) {
  // A container restarted with a fresh /dev/shm, or systemd's RemoveIPC:
  // the crash's running job is lost once, but not at every crash after it.
  const std::string slot_path = crash_while_running(1, 0, 77);
  ASSERT_FALSE(slot_path.empty());
  ASSERT_EQ(::unlink(slot_path.c_str()), 0);
  for (int crash = 0; crash < 2; ++crash) {
    SCOPED_TRACE("crash " + std::to_string(crash));
    auto r = open();
    ASSERT_TRUE(r.ok());
    if (crash == 0) {
      EXPECT_TRUE((*r)->previous_running().empty());
      EXPECT_NE((*r)->previous_problem().find("did not outlive"), std::string::npos)
          << (*r)->previous_problem();
    } else {
      EXPECT_EQ((*r)->previous_running(), std::vector<JobId>{78}) << (*r)->previous_problem();
    }
    ASSERT_TRUE((*r)->arm(1, 100).ok());
    EXPECT_NE((*r)->arm_warning().find("once gone"), std::string::npos) << (*r)->arm_warning();
    EXPECT_EQ(read_file(path())[8], 1) << "the slots went back to tmpfs";
    EXPECT_FALSE(fs::exists(slot_path));
    (*r)->running_word(0)->store(78);
  }  // killed again: counted this time
  // Removing dir/LIVE (no engine running) tries tmpfs again.
  ASSERT_EQ(::unlink(path().c_str()), 0);
  auto r = open();
  ASSERT_TRUE(r.ok());
  ASSERT_TRUE((*r)->arm(1, 100).ok());
  EXPECT_EQ(read_file(path())[8], 2);
  EXPECT_TRUE((*r)->arm_warning().empty()) << (*r)->arm_warning();
}

TEST_F(LiveRecordTest, AHardLinkInTheSlotFilesPlaceIsNeitherEmptiedNorUsed) {
  // Another name for a file of ours (where fs.protected_hardlinks is off,
  // another user can make one): emptying it would destroy that file.
  std::string slot_path;
  {
    auto r = open();
    ASSERT_TRUE(r.ok());
    slot_path = (*r)->slot_path();
  }
  const std::string precious = slots_ + "/precious";
  std::ofstream(precious) << "segment";
  ASSERT_EQ(::link(precious.c_str(), slot_path.c_str()), 0);
  auto r = open();
  ASSERT_TRUE(r.ok());
  EXPECT_NE((*r)->slot_problem().find("2 names"), std::string::npos) << (*r)->slot_problem();
  ASSERT_TRUE((*r)->arm(1, 100).ok());
  EXPECT_EQ(read_file(path())[8], 1);
  EXPECT_EQ(read_file(precious), "segment");
}

TEST_F(LiveRecordTest, AKillBetweenTheCleanFlagAndTheSlotFilesRemovalReadsAsIdle) {
  const std::string slot_path = crash_while_running(1, 0, 5);
  ASSERT_FALSE(slot_path.empty());
  {
    // close() sets the flag first; killed before its unlink.
    std::fstream f(path(), std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(FileLiveRecord::kFlagsOffset);
    f.put(static_cast<char>(FileLiveRecord::kClosedCleanly));
  }
  ASSERT_TRUE(fs::exists(slot_path));
  auto r = open();
  ASSERT_TRUE(r.ok());
  EXPECT_TRUE((*r)->previous_running().empty());
  EXPECT_TRUE((*r)->previous_problem().empty()) << (*r)->previous_problem();
}

TEST_F(LiveRecordTest, AVersionOneRecordForFewerWorkersNeverShrinksTheFile) {
  // A kill between a shrink and the header's rewrite would leave a header
  // whose slots do not fit, and the lease would be lost.
  const std::string no_tmpfs = slots_ + "/missing";
  {
    auto r = FileLiveRecord::open(dir_, no_tmpfs);
    ASSERT_TRUE(r.ok());
    ASSERT_TRUE((*r)->arm(4, 100).ok());
    (*r)->running_word(3)->store(9);
    (*r)->extend_lease(3000);
  }
  {
    auto r = FileLiveRecord::open(dir_, no_tmpfs);
    ASSERT_TRUE(r.ok());
    EXPECT_EQ((*r)->previous_running(), std::vector<JobId>{9});
    ASSERT_TRUE((*r)->arm(1, 100).ok());
  }
  EXPECT_EQ(fs::file_size(path()), FileLiveRecord::kHeaderBytes + 4 * FileLiveRecord::kSlotBytes);
  auto r = FileLiveRecord::open(dir_, no_tmpfs);
  ASSERT_TRUE(r.ok());
  EXPECT_TRUE((*r)->previous_running().empty()) << "slot 3 of the old record was not cleared";
  EXPECT_EQ((*r)->previous_lease_end(), 3000u);
}

// The engine's own record: while a handler runs, its job's id is in the slot
// file in /dev/shm and dir/LIVE does not change; after a clean stop the slot
// file is gone.
TEST_F(LiveRecordTest, AnEnginesWorkerNamesItsJobInTheSlotFileOnTmpfs) {
  EngineOptions o = engine_options(64);
  o.snapshot.disk_interval = std::chrono::hours(1);
  auto e = Engine::open(o);
  ASSERT_TRUE(e.ok()) << e.status().to_string();
  std::atomic<bool> in_handler{false}, release{false};
  auto h = e->register_handler("held", [&](JobContext&) {
    in_handler.store(true);
    while (!release.load()) std::this_thread::sleep_for(std::chrono::milliseconds(1));
    return Outcome::kDone;
  });
  ASSERT_TRUE(h.ok());
  ASSERT_TRUE(e->start().ok());
  const std::string live = o.snapshot.dir + "/LIVE";
  struct stat st {};
  ASSERT_EQ(::stat(live.c_str(), &st), 0);
  const std::string slot_path =
      FileLiveRecord::slot_file_path(FileLiveRecord::kDefaultSlotsDir, st.st_dev, st.st_ino);
  // The first submit takes the first id lease (a header store); then no
  // job touches dir/LIVE.
  release.store(true);
  ASSERT_TRUE(e->submit(*h, "warm-up").ok());
  while (e->health().done != 1) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  in_handler.store(false);
  release.store(false);
  const std::string header_before = read_file(live);
  auto id = e->submit(*h, "x");
  ASSERT_TRUE(id.ok());
  while (!in_handler.load()) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  const std::string slots = read_file(slot_path);
  ASSERT_EQ(slots.size(), FileLiveRecord::kSlotFileHeaderBytes + FileLiveRecord::kSlotBytes);
  std::uint64_t running = 0;
  std::memcpy(&running, slots.data() + FileLiveRecord::kSlotFileHeaderBytes, 8);
  EXPECT_EQ(running, *id);
  EXPECT_EQ(read_file(live), header_before);
  release.store(true);
  ASSERT_TRUE(e->stop(StopMode::kDrain).ok());
  EXPECT_FALSE(fs::exists(slot_path));
}

// Without a usable slot file the engine says where the slots went, and why.
TEST_F(LiveRecordTest, AnEngineLogsWhyItsSlotsAreNotOnTmpfs) {
  std::mutex mu;
  std::vector<std::string> warnings;
  EngineOptions o = engine_options(64);
  o.log = [&](LogLevel level, std::string_view line) {
    std::lock_guard<std::mutex> lock(mu);
    if (level == LogLevel::kWarning) warnings.emplace_back(line);
  };
  auto e = Engine::open(o);
  ASSERT_TRUE(e.ok()) << e.status().to_string();
  ASSERT_TRUE(e->register_handler("any", [](JobContext&) { return Outcome::kDone; }).ok());
  struct stat st {};
  ASSERT_EQ(::stat((o.snapshot.dir + "/LIVE").c_str(), &st), 0);
  const std::string slot_path =
      FileLiveRecord::slot_file_path(FileLiveRecord::kDefaultSlotsDir, st.st_dev, st.st_ino);
  ASSERT_EQ(::symlink((slots_ + "/elsewhere").c_str(), slot_path.c_str()), 0);
  const Status started = e->start().status();
  const Status stopped = started.ok() ? e->stop(StopMode::kDrain).status() : Status();
  ::unlink(slot_path.c_str());
  ASSERT_TRUE(started.ok()) << started.to_string();
  ASSERT_TRUE(stopped.ok()) << stopped.to_string();
  std::lock_guard<std::mutex> lock(mu);
  bool said = false;
  for (const std::string& w : warnings) {
    said = said || (w.find("the workers' slots are in " + o.snapshot.dir + "/LIVE") != std::string::npos &&
                    w.find(slot_path) != std::string::npos);
  }
  EXPECT_TRUE(said) << "no warning names the slot file; " << warnings.size() << " warnings";
  EXPECT_FALSE(fs::exists(slots_ + "/elsewhere"));
}

// The id lease is a store into dir/LIVE's mapping (a disk file): the
// snapshot thread keeps it at least half a lease (2^19 ids) ahead of the ids
// handed out, so that submitters need not extend it themselves. start() arms
// it a lease (2^20) ahead; ~525k jobs take the ids past its middle, short of
// its end, where before only a submitter crossing the end extended it.
TEST_F(LiveRecordTest, TheSnapshotThreadKeepsTheIdLeaseAheadOfTheSubmitters) {
  constexpr std::uint64_t kLease = std::uint64_t{1} << 20;
  constexpr std::uint64_t kBlock = 1024;  // ids a submitting thread takes at a time
  EngineOptions o = engine_options(4096);
  o.snapshot.disk_interval = std::chrono::milliseconds(10);
  auto e = Engine::open(o);
  ASSERT_TRUE(e.ok()) << e.status().to_string();
  auto h = e->register_handler("any", [](JobContext&) { return Outcome::kDone; });
  ASSERT_TRUE(h.ok());
  ASSERT_TRUE(e->start().ok());
  const auto lease = [&] {
    std::uint64_t v = 0;
    const std::string header = read_file(o.snapshot.dir + "/LIVE");
    if (header.size() >= 24) std::memcpy(&v, header.data() + 16, 8);
    return v;
  };
  // No snapshot moves it before half of it is used.
  const std::uint64_t first = lease();
  ASSERT_GT(first, kLease);
  const std::uint64_t target = first - kLease / 2 + 2 * kBlock;
  ASSERT_LT(target + kBlock, first);
  const std::vector<JobSpec> batch(256, JobSpec{*h, "x", {}});
  std::uint64_t submitted = 0;
  while (submitted < target) {
    const std::size_t k = static_cast<std::size_t>(std::min<std::uint64_t>(batch.size(), target - submitted));
    auto n = e->submit_batch(std::span<const JobSpec>(batch.data(), k));
    if (!n && n.status().code() == StatusCode::kQueueFull) {
      std::this_thread::yield();
      continue;
    }
    ASSERT_TRUE(n.ok()) << n.status().to_string();
    submitted += *n;
  }
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while (lease() == first && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  EXPECT_GE(lease(), submitted + kLease / 2)
      << "the lease was not extended ahead (it ended at " << first << ")";
  ASSERT_TRUE(e->stop(StopMode::kDrain).ok());
}

}  // namespace
}  // namespace jobengine::persist
