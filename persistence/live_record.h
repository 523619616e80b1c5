// FileLiveRecord: the engine's live record (engine/persistence_hooks.h,
// detail::LiveRecord) as a small file, dir/LIVE, mapped shared.
//
// What it is for. Two facts change too often for a snapshot and must survive
// a crash: which job each worker is running (a handler that kills the
// process within one snapshot interval is never seen running by a cut, so
// without this it would never be quarantined as poison: the service would
// restart into it forever), and how far job ids may have been handed out (ids
// given after the recovered snapshot's cut would be given again). A store to
// a shared file mapping is in the page cache the moment it leaves the CPU, and
// a killed process leaves the page cache behind: no write(2), no fsync.
//
// What it is not: durable across power loss. Nothing is fsynced (that would
// put a disk flush on the job path); after a power loss the file may hold an
// older record, or nothing. The record carries the boot id it was written
// under: one from before a reboot gives no recoveries (its running ids may be
// long stale), only its lease as a floor for ids. The snapshot directory's
// flock (FileStore) makes its holder the only writer.
//
// Layout (little-endian; the byte-by-byte table is in persistence/FORMAT.md,
// "The live record"):
//   [0, 8)    magic "JOBLIVE1"
//   [8, 12)   u32 version (1)
//   [12, 16)  u32 slots: one per worker of the engine that wrote it
//   [16, 24)  u64 id_lease_end: no id at or above it was handed out
//   [24, 32)  u64 credited_generation: its running jobs' recoveries are in
//             every snapshot of this generation or later (0: not yet)
//   [32, 68)  the boot id it was written under (/proc/sys/kernel/random/boot_id)
//   [68, 128) zero
//   then `slots` cache lines: u64 running job id (0: none), 56 bytes zero
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "engine/persistence_hooks.h"
#include "jobengine/status.h"

namespace jobengine::persist {

class FileLiveRecord final : public detail::LiveRecord {
 public:
  static constexpr std::size_t kHeaderBytes = 128;
  static constexpr std::size_t kSlotBytes = 64;
  static constexpr std::uint32_t kMaxSlots = 65536;
  static constexpr std::size_t kCreditedOffset = 24;
  static constexpr std::size_t kBootIdOffset = 32;
  static constexpr std::size_t kBootIdBytes = 36;

  // Opens (creating, 0600) dir/LIVE and reads what the previous holder left.
  // The caller holds the directory's lock. A file that is not a live record
  // (wrong magic, version or size: garbage, or zeros after a power loss) is
  // not an error: previous_problem() says why it was ignored. An error only
  // when the file cannot be opened or read (or is not a regular file).
  static Result<std::unique_ptr<FileLiveRecord>> open(const std::string& dir);
  ~FileLiveRecord() override;
  FileLiveRecord(const FileLiveRecord&) = delete;
  FileLiveRecord& operator=(const FileLiveRecord&) = delete;

  const std::vector<JobId>& previous_running() const override { return previous_running_; }
  JobId previous_lease_end() const override { return previous_lease_end_; }
  std::uint64_t previous_credited_generation() const override { return previous_credited_; }
  Status mark_credited(std::uint64_t generation) override;
  // Why the previous content was ignored; empty when it was read (or absent).
  const std::string& previous_problem() const { return previous_problem_; }

  Status arm(unsigned workers, JobId lease_floor) override;
  std::atomic<std::uint64_t>* running_word(unsigned i) override;
  void extend_lease(JobId end) override;

  const std::string& path() const { return path_; }

 private:
  FileLiveRecord(std::string path, int fd) : path_(std::move(path)), fd_(fd) {}
  Status read_previous(std::uint64_t size);
  Status arm_file(unsigned workers, JobId lease_floor);
  std::atomic<std::uint64_t>* word_at(std::size_t offset) const;

  std::string path_;
  int fd_ = -1;
  unsigned char* map_ = nullptr;
  std::size_t map_bytes_ = 0;
  unsigned slots_ = 0;
  std::vector<JobId> previous_running_;
  JobId previous_lease_end_ = 0;
  std::uint64_t previous_credited_ = 0;
  bool previous_valid_ = false;  // the file held a record (maybe from before a reboot)
  std::string previous_problem_;
};

}  // namespace jobengine::persist
