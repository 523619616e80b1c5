// FileLiveRecord: the engine's live record (engine/persistence_hooks.h,
// detail::LiveRecord): a small header file, dir/LIVE, and the workers' slots
// in a file on tmpfs (the slot file, /dev/shm by default), both mapped shared.
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
// Why two files. Workers store their running job's id at every job start and
// end. In a mapping of a disk file, the kernel's writeback write-protects the
// page and the next store takes a write fault that runs the file system's
// page-write path on the worker (ext4: possibly a wait for a journal commit
// behind a busy disk; a frozen file system: until the thaw; one shut down
// after an I/O error: SIGBUS). tmpfs has no writeback, so the words that
// change per job live there; the header (the id lease, raised once per 2^20
// ids, and the credited generation) stays beside the snapshots, where it
// survives a reboot as before. The slot file is named after the header file's
// identity (device and inode), so a LIVE file restored from a backup or made
// anew never pairs with an older slot file. When the slot file cannot be
// used (no /dev/shm, a file of another owner in its place), the slots go in
// dir/LIVE after the header as in version 1, and slot_problem() says why. So
// they do for good once a slot file was gone after a crash on the same boot
// (a container restarted with a fresh /dev/shm, systemd's RemoveIPC): there
// tmpfs does not outlive the process, and every crash would lose its jobs.
//
// What it is not: durable across power loss. Nothing is fsynced (that would
// put a disk flush on the job path); after a power loss the file may hold an
// older record, or nothing, and the slot file is gone with the reboot. The
// record carries the boot id it was written under: one from before a reboot
// gives no recoveries (its running ids may be long stale), only its lease as
// a floor for ids. The snapshot directory's flock (FileStore) makes its holder
// the only writer of both files.
//
// Layout (little-endian; the byte-by-byte tables are in persistence/FORMAT.md,
// "The live record"):
//   [0, 8)    magic "JOBLIVE1"
//   [8, 12)   u32 version: 2 (slots in the slot file) or 1 (slots below)
//   [12, 16)  u32 slots: one per worker of the engine that wrote it
//   [16, 24)  u64 id_lease_end: no id at or above it was handed out
//   [24, 32)  u64 credited_generation: its running jobs' recoveries are in
//             every snapshot of this generation or later (0: not yet)
//   [32, 68)  the boot id it was written under (/proc/sys/kernel/random/boot_id)
//   [68, 72)  u32 flags: 1 = closed by a clean stop, slot file removed (version 2);
//             2 = the slots stay in this file, tmpfs lost a record here (version 1)
//   [72, 80)  u64 pair id (version 2): the slot file armed with this header has it too
//   [80, 128) zero
//   version 1: then `slots` cache lines: u64 running job id (0: none), 56 bytes zero
// The slot file: magic "JOBLIVES", u32 version 1, u32 slots, u64 device and
// u64 inode of the LIVE file it belongs to, u64 pair id, zeros to 64 bytes,
// then `slots` cache lines as above.
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
  static constexpr std::size_t kFlagsOffset = 68;
  static constexpr std::uint32_t kClosedCleanly = 1;
  static constexpr std::size_t kPairOffset = 72;
  // Version 1: the slot file did not outlive a crash here once; the slots
  // stay in this file (set again by every arm() that reads it).
  static constexpr std::uint32_t kSlotsStayInFile = 2;
  static constexpr std::size_t kSlotFileHeaderBytes = 64;
  static constexpr const char* kDefaultSlotsDir = "/dev/shm";

  // Opens (creating, 0600) dir/LIVE and its slot file in `slots_dir`, and
  // reads what the previous holder left. The caller holds the directory's
  // lock. A file that is not a live record (wrong magic, version or size:
  // garbage, or zeros after a power loss) is not an error:
  // previous_problem() says why it was ignored. An error only when dir/LIVE
  // cannot be opened or read (or is not a regular file); a slot file that
  // cannot be used puts the slots in dir/LIVE (slot_problem()).
  static Result<std::unique_ptr<FileLiveRecord>> open(const std::string& dir,
                                                      const std::string& slots_dir = kDefaultSlotsDir);
  // The slot file of a LIVE file on (device, inode), for the effective uid.
  static std::string slot_file_path(const std::string& slots_dir, std::uint64_t device,
                                    std::uint64_t inode);
  ~FileLiveRecord() override;
  FileLiveRecord(const FileLiveRecord&) = delete;
  FileLiveRecord& operator=(const FileLiveRecord&) = delete;

  const std::vector<JobId>& previous_running() const override { return previous_running_; }
  JobId previous_lease_end() const override { return previous_lease_end_; }
  std::uint64_t previous_credited_generation() const override { return previous_credited_; }
  Status mark_credited(std::uint64_t generation) override;
  // Why the previous content was ignored; empty when it was read (or absent).
  const std::string& previous_problem() const { return previous_problem_; }
  // Why the workers' slots are in dir/LIVE rather than in the slot file;
  // empty when the slot file is in use.
  const std::string& slot_problem() const { return slot_problem_; }
  // The slot file (also when it could not be used).
  const std::string& slot_path() const { return slot_path_; }

  Status arm(unsigned workers, JobId lease_floor) override;
  std::atomic<std::uint64_t>* running_word(unsigned i) override;
  void extend_lease(JobId end) override;
  void close() noexcept override;
  std::string arm_warning() const override;

  const std::string& path() const { return path_; }

 private:
  FileLiveRecord(std::string path, int fd) : path_(std::move(path)), fd_(fd) {}
  // Opens (creating it if `create`) the slot file; false, slot_problem_
  // saying why unless it is just absent, when it cannot be used.
  bool open_slot_file(bool create);
  Status read_previous(std::uint64_t size);
  void read_slot_file(std::uint32_t slots, std::uint64_t pair);
  Status arm_file(unsigned workers, JobId lease_floor);
  Status arm_slot_file(unsigned workers);
  void drop_slot_file(bool remove) noexcept;  // unmaps and closes it (and removes it), if open
  std::atomic<std::uint64_t>* word_at(std::size_t offset) const;

  std::string path_;
  int fd_ = -1;
  unsigned char* map_ = nullptr;
  std::size_t map_bytes_ = 0;
  unsigned slots_ = 0;
  std::string slot_path_;
  std::string slot_problem_;
  int slot_fd_ = -1;  // -1: the slots are in dir/LIVE (version 1)
  std::uint64_t device_ = 0, inode_ = 0;  // of dir/LIVE
  std::uint64_t pair_ = 0;  // ties this header to its slot file (arm())
  unsigned char* slot_map_ = nullptr;  // after arm() with the slot file
  std::size_t slot_map_bytes_ = 0;
  bool slots_in_file_ = false;  // armed with the slots in dir/LIVE
  bool closed_ = false;         // close() ran
  // Read: tmpfs lost a record here (a version-2 record's slot file was gone,
  // or a version-1 record says so with kSlotsStayInFile): arm() keeps the
  // slots in dir/LIVE and sets that flag.
  bool keep_in_file_ = false;
  bool remove_slot_file_ = false;  // arm(): remove the unused slot file once the header is written
  std::vector<JobId> previous_running_;
  JobId previous_lease_end_ = 0;
  std::uint64_t previous_credited_ = 0;
  bool previous_valid_ = false;  // the file held a record (maybe from before a reboot)
  std::string previous_problem_;
};

}  // namespace jobengine::persist
