// The live record (persistence/live_record.h): what a crash must not take
// with it, in dir/LIVE. The crash behaviour itself (a job that kills the
// process at once is quarantined; ids are never handed out twice) is in
// crash_test.cc; here, the file: round trip, and what is ignored or refused.
#include "persistence/live_record.h"

#include <gtest/gtest.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <csignal>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>

namespace jobengine::persist {
namespace {

namespace fs = std::filesystem;

class LiveRecordTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = (fs::temp_directory_path() / "jobengine-live-record-XXXXXX").string();
    ASSERT_NE(::mkdtemp(dir_.data()), nullptr);
  }
  void TearDown() override {
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }
  std::string path() const { return dir_ + "/LIVE"; }
  void write_file(const std::string& bytes) const {
    std::ofstream(path(), std::ios::binary | std::ios::trunc) << bytes;
  }
  std::string dir_;
};

TEST_F(LiveRecordTest, WhatAWorkerWasRunningAndTheLeaseSurviveTheProcess) {
  {
    auto r = FileLiveRecord::open(dir_);
    ASSERT_TRUE(r.ok()) << r.status().to_string();
    EXPECT_TRUE((*r)->previous_running().empty());
    EXPECT_EQ((*r)->previous_lease_end(), 0u);
    EXPECT_TRUE((*r)->previous_problem().empty()) << (*r)->previous_problem();
    EXPECT_EQ((*r)->running_word(0), nullptr) << "a word before arm()";
    ASSERT_TRUE((*r)->arm(3, 100).ok());
    ASSERT_NE((*r)->running_word(2), nullptr);
    EXPECT_EQ((*r)->running_word(3), nullptr);
    (*r)->running_word(1)->store(42);
    (*r)->running_word(2)->store(7);
    (*r)->running_word(2)->store(0);  // finished
    (*r)->extend_lease(5000);
    (*r)->extend_lease(4000);  // never lowered
  }  // as a killed process leaves it: nothing is cleared on the way out
  struct stat st {};
  ASSERT_EQ(::stat(path().c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);
  auto r = FileLiveRecord::open(dir_);
  ASSERT_TRUE(r.ok()) << r.status().to_string();
  EXPECT_EQ((*r)->previous_running(), std::vector<JobId>{42});
  EXPECT_EQ((*r)->previous_lease_end(), 5000u);
  // arm() starts this process's record: idle workers, the lease kept.
  ASSERT_TRUE((*r)->arm(1, 10).ok());
  EXPECT_EQ((*r)->running_word(0)->load(), 0u);
  r->reset();
  auto again = FileLiveRecord::open(dir_);
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
    auto r = FileLiveRecord::open(dir_);
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
  auto r = FileLiveRecord::open(dir_);
  EXPECT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("LIVE"), std::string::npos) << r.status().to_string();
  std::ifstream in(target);
  std::string kept;
  in >> kept;
  EXPECT_EQ(kept, "keep");
  ASSERT_EQ(::unlink(path().c_str()), 0);
  ASSERT_EQ(::mkdir(path().c_str(), 0700), 0);
  r = FileLiveRecord::open(dir_);
  EXPECT_FALSE(r.ok());
}

TEST_F(LiveRecordTest, AnExistingFileGetsMode0600) {
  write_file("");
  ASSERT_EQ(::chmod(path().c_str(), 0644), 0);
  auto r = FileLiveRecord::open(dir_);
  ASSERT_TRUE(r.ok()) << r.status().to_string();
  struct stat st {};
  ASSERT_EQ(::stat(path().c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);
}

TEST_F(LiveRecordTest, ARecordFromBeforeARebootNamesNoRunningJobButKeepsItsLease) {
  // After a power loss the file holds whatever the page cache had written
  // back: the jobs it names may have finished long before.
  {
    auto r = FileLiveRecord::open(dir_);
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
  auto r = FileLiveRecord::open(dir_);
  ASSERT_TRUE(r.ok());
  EXPECT_TRUE((*r)->previous_running().empty());
  EXPECT_EQ((*r)->previous_lease_end(), 7000u);
  EXPECT_NE((*r)->previous_problem().find("reboot"), std::string::npos) << (*r)->previous_problem();
}

TEST_F(LiveRecordTest, ARecordThatCannotBeArmedIsEmptiedSoItsJobsAreNotCountedTwice) {
  // start() made the previous record's recoveries durable before arm(); if
  // arm() fails, the old ids must not be counted again at the next start.
  {
    auto r = FileLiveRecord::open(dir_);
    ASSERT_TRUE(r.ok());
    ASSERT_TRUE((*r)->arm(1, 100).ok());
    (*r)->running_word(0)->store(42);
  }
  {
    auto r = FileLiveRecord::open(dir_);
    ASSERT_TRUE(r.ok());
    ASSERT_EQ((*r)->previous_running(), std::vector<JobId>{42});
    // 200 workers need 12,864 bytes: above this file-size limit.
    struct rlimit old {};
    ASSERT_EQ(::getrlimit(RLIMIT_FSIZE, &old), 0);
    const auto old_handler = std::signal(SIGXFSZ, SIG_IGN);
    struct rlimit small = old;
    small.rlim_cur = 4096;
    ASSERT_EQ(::setrlimit(RLIMIT_FSIZE, &small), 0);
    const Status armed = (*r)->arm(200, 100);
    ASSERT_EQ(::setrlimit(RLIMIT_FSIZE, &old), 0);
    std::signal(SIGXFSZ, old_handler);
    EXPECT_FALSE(armed.ok());
    EXPECT_NE(armed.message().find("LIVE"), std::string::npos) << armed.to_string();
  }
  auto r = FileLiveRecord::open(dir_);
  ASSERT_TRUE(r.ok());
  EXPECT_TRUE((*r)->previous_running().empty());
}

TEST_F(LiveRecordTest, FewerWorkersNeverShrinkTheFile) {
  // A kill between a shrink and the header's rewrite would leave a header
  // whose slots do not fit, and the lease would be lost.
  {
    auto r = FileLiveRecord::open(dir_);
    ASSERT_TRUE(r.ok());
    ASSERT_TRUE((*r)->arm(4, 100).ok());
    (*r)->running_word(3)->store(9);
    (*r)->extend_lease(3000);
  }
  {
    auto r = FileLiveRecord::open(dir_);
    ASSERT_TRUE(r.ok());
    EXPECT_EQ((*r)->previous_running(), std::vector<JobId>{9});
    ASSERT_TRUE((*r)->arm(1, 100).ok());
  }
  EXPECT_EQ(fs::file_size(path()), FileLiveRecord::kHeaderBytes + 4 * FileLiveRecord::kSlotBytes);
  auto r = FileLiveRecord::open(dir_);
  ASSERT_TRUE(r.ok());
  EXPECT_TRUE((*r)->previous_running().empty()) << "slot 3 of the old record was not cleared";
  EXPECT_EQ((*r)->previous_lease_end(), 3000u);
  EXPECT_TRUE((*r)->previous_problem().empty()) << (*r)->previous_problem();
}

}  // namespace
}  // namespace jobengine::persist
