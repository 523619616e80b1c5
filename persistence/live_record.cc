// See live_record.h.
#include "persistence/live_record.h"

#include "persistence/file_system.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <chrono>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <span>
#include <string_view>

namespace jobengine::persist {

namespace {

static_assert(std::endian::native == std::endian::little, "the live record is little-endian");
static_assert(sizeof(std::atomic<std::uint64_t>) == 8 &&
              std::atomic<std::uint64_t>::is_always_lock_free,
              "a record word is a lock-free 64-bit atomic in the mapping");

constexpr char kMagic[8] = {'J', 'O', 'B', 'L', 'I', 'V', 'E', '1'};
constexpr char kSlotMagic[8] = {'J', 'O', 'B', 'L', 'I', 'V', 'E', 'S'};
constexpr std::uint32_t kVersionInFile = 1;    // the slots after the header
constexpr std::uint32_t kVersionSlotFile = 2;  // the slots in the slot file
constexpr std::uint32_t kSlotFileVersion = 1;

// The file layer's wording and errno text (errno_text: strerror_r, not the
// thread-unsafe strerror).
Status errno_status(std::string_view what, const std::string& path, int error) {
  return Status(StatusCode::kIoError,
                "live record " + path + ": " + std::string(what) + ": " + errno_text(error));
}

std::uint32_t get32(const unsigned char* p) {
  std::uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}
std::uint64_t get64(const unsigned char* p) {
  std::uint64_t v;
  std::memcpy(&v, p, 8);
  return v;
}

// This boot's id (/proc/sys/kernel/random/boot_id, 36 characters), or empty
// if it cannot be read. The record keeps it: a record from before a reboot
// (a power loss) is whatever the page cache had written back by then, its
// running ids possibly long stale.
std::string boot_id() {
  std::string id(FileLiveRecord::kBootIdBytes, '\0');
  const int fd = ::open("/proc/sys/kernel/random/boot_id", O_RDONLY | O_CLOEXEC);
  if (fd < 0) return {};
  const ssize_t n = ::read(fd, id.data(), id.size());
  ::close(fd);
  if (n != static_cast<ssize_t>(id.size())) return {};
  return id;
}

// A fresh pair id: what ties a header to the slot file armed with it. An
// inode is no such tie (a LIVE file made anew often gets the old one's).
std::uint64_t pair_id() {
  std::uint64_t v = 0;
  if (::getrandom(&v, sizeof v, GRND_NONBLOCK) == static_cast<ssize_t>(sizeof v) && v != 0) return v;
  v = static_cast<std::uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count());
  return (v * 0x9e3779b97f4a7c15ull) ^ static_cast<std::uint64_t>(::getpid()) ^ 1;
}

// Reads `out.size()` bytes from a descriptor just opened (at offset 0)
// through the file layer, an EINTR asked again at most kMaxEintrRetries times
// in a row, as FileStore::read does. Returns how many it got (fewer at the
// file's end).
SysResult<std::size_t> read_from_start(int fd, std::span<unsigned char> out) {
  FileSystem& fs = *default_file_system();
  std::size_t got = 0;
  int interrupted = 0;
  while (got < out.size()) {
    SysResult<std::size_t> r = fs.read(fd, out.data() + got, out.size() - got);
    if (!r.ok()) {
      if (r.error == EINTR && ++interrupted < kMaxEintrRetries) continue;
      return {0, r.error};
    }
    interrupted = 0;
    if (r.value == 0) break;
    got += r.value;
  }
  return {got, 0};
}

}  // namespace

std::string FileLiveRecord::slot_file_path(const std::string& slots_dir, std::uint64_t device,
                                           std::uint64_t inode) {
  char name[96];
  std::snprintf(name, sizeof name, "/jobengine-live-%u-%llx-%llx", static_cast<unsigned>(::geteuid()),
                static_cast<unsigned long long>(device), static_cast<unsigned long long>(inode));
  return slots_dir + name;
}

Result<std::unique_ptr<FileLiveRecord>> FileLiveRecord::open(const std::string& dir,
                                                             const std::string& slots_dir) {
  const std::string path = dir + "/LIVE";
  // Through the file layer, as FileStore opens its files: O_CLOEXEC, EINTR
  // asked again, never a symlink (O_NOFOLLOW), never blocked on a FIFO.
  FileSystem& fs = *default_file_system();
  SysResult<int> fd = fs.open(path, O_RDWR | O_CREAT | O_NOFOLLOW | O_NONBLOCK, 0600);
  if (!fd.ok()) return errno_status("open", path, fd.error);
  std::unique_ptr<FileLiveRecord> record(new FileLiveRecord(path, fd.value));
  SysResult<FileInfo> info = fs.fstat(fd.value);
  if (!info.ok()) return errno_status("fstat", path, info.error);
  if (info.value.kind != FileInfo::Kind::kRegular) {
    return Status(StatusCode::kFailedPrecondition,
                  "live record " + path + " is not a regular file; remove it");
  }
  if (info.value.mode != 0600) {
    if (int err = fs.fchmod(fd.value, 0600); err != 0) return errno_status("fchmod 0600", path, err);
  }
  record->device_ = info.value.device;
  record->inode_ = info.value.inode;
  record->slot_path_ = slot_file_path(slots_dir, info.value.device, info.value.inode);
  // Only opened here: an engine that never starts leaves no slot file behind.
  (void)record->open_slot_file(/*create=*/false);
  if (Status s = record->read_previous(info.value.size); !s.ok()) return s;
  return record;
}

bool FileLiveRecord::open_slot_file(bool create) {
  // Through the file layer, as dir/LIVE. O_NOFOLLOW and the owner and link
  // checks: /dev/shm is every user's, and a file another user put in its
  // place must not name our workers' jobs (nor be emptied by arm()).
  FileSystem& fs = *default_file_system();
  slot_problem_.clear();
  const int flags = O_RDWR | O_NOFOLLOW | O_NONBLOCK | (create ? O_CREAT : 0);
  SysResult<int> fd = fs.open(slot_path_, flags, 0600);
  if (!fd.ok()) {
    if (!create && fd.error == ENOENT) return false;  // made by arm(), if it comes to that
    slot_problem_ = "open " + slot_path_ + ": " + errno_text(fd.error);
    return false;
  }
  SysResult<FileInfo> info = fs.fstat(fd.value);
  if (!info.ok()) {
    slot_problem_ = "fstat " + slot_path_ + ": " + errno_text(info.error);
  } else if (info.value.kind != FileInfo::Kind::kRegular) {
    slot_problem_ = slot_path_ + " is not a regular file";
  } else if (info.value.uid != ::geteuid()) {
    slot_problem_ = slot_path_ + " belongs to uid " + std::to_string(info.value.uid) +
                    ", not to this process's";
  } else if (info.value.links != 1) {
    // Another name for one of our files (a hard link another user made, where
    // fs.protected_hardlinks is off): emptying it would destroy that file.
    slot_problem_ = slot_path_ + " has " + std::to_string(info.value.links) + " names, not 1";
  } else if (info.value.mode != 0600) {
    if (int err = fs.fchmod(fd.value, 0600); err != 0) {
      slot_problem_ = "fchmod 0600 " + slot_path_ + ": " + errno_text(err);
    }
  }
  if (!slot_problem_.empty()) {
    (void)fs.close(fd.value);
    return false;
  }
  slot_fd_ = fd.value;
  return true;
}

FileLiveRecord::~FileLiveRecord() {
  if (slot_map_ != nullptr) ::munmap(slot_map_, slot_map_bytes_);
  if (slot_fd_ >= 0) (void)default_file_system()->close(slot_fd_);
  if (map_ != nullptr) ::munmap(map_, map_bytes_);
  if (fd_ >= 0) (void)default_file_system()->close(fd_);
}

Status FileLiveRecord::read_previous(std::uint64_t size) {
  if (size == 0) return Status();  // made just now, or never armed
  const std::uint64_t max = kHeaderBytes + std::uint64_t{kMaxSlots} * kSlotBytes;
  if (size < kHeaderBytes || size > max) {
    previous_problem_ = std::to_string(size) + " bytes, not a live record's size";
    return Status();
  }
  std::vector<unsigned char> bytes(size);
  const SysResult<std::size_t> read = read_from_start(fd_, bytes);
  if (!read.ok()) return errno_status("read", path_, read.error);
  if (read.value != size) {
    previous_problem_ = "shorter than its size while read";
    return Status();
  }
  if (std::memcmp(bytes.data(), kMagic, 8) != 0) {
    previous_problem_ = "no live-record magic (zeros after a power loss, or not ours)";
    return Status();
  }
  const std::uint32_t version = get32(bytes.data() + 8);
  if (version != kVersionInFile && version != kVersionSlotFile) {
    previous_problem_ = "version " + std::to_string(version) + ", this build reads 1 and 2";
    return Status();
  }
  const std::uint32_t slots = get32(bytes.data() + 12);
  const std::uint64_t slots_in_file = version == kVersionInFile ? slots : 0;
  if (slots > kMaxSlots || kHeaderBytes + slots_in_file * kSlotBytes > size) {
    previous_problem_ = std::to_string(slots) + " worker slots do not fit its " +
                        std::to_string(size) + " bytes";
    return Status();
  }
  previous_lease_end_ = get64(bytes.data() + 16);
  previous_credited_ = get64(bytes.data() + kCreditedOffset);
  previous_valid_ = true;
  const std::uint32_t flags = get32(bytes.data() + kFlagsOffset);
  // Read before the boot check: where tmpfs lost a record, a reboot changes
  // nothing about it.
  keep_in_file_ = version == kVersionInFile && (flags & kSlotsStayInFile) != 0;
  const std::string written_at(reinterpret_cast<const char*>(bytes.data()) + kBootIdOffset,
                               kBootIdBytes);
  const std::string now = boot_id();
  if (written_at != std::string(kBootIdBytes, '\0') && !now.empty() && written_at != now) {
    // Its lease is still a floor (the snapshot's counter is the other one).
    previous_problem_ = "written before a reboot: the jobs it names may have finished long before";
    return Status();
  }
  if (version == kVersionSlotFile) {
    // A clean stop removed the slot file: no worker was running anything.
    if ((flags & kClosedCleanly) == 0) read_slot_file(slots, get64(bytes.data() + kPairOffset));
    return Status();
  }
  for (std::uint32_t i = 0; i < slots; ++i) {
    const std::uint64_t id = get64(bytes.data() + kHeaderBytes + std::size_t{i} * kSlotBytes);
    if (id != 0 && id < (std::uint64_t{1} << 63)) previous_running_.push_back(id);  // ids never reach bit 63
  }
  return Status();
}

void FileLiveRecord::read_slot_file(std::uint32_t slots, std::uint64_t pair) {
  const auto ignored = [this](const std::string& why) {
    previous_problem_ = "its worker slots are ignored: " + why;
  };
  if (slot_fd_ < 0) {
    if (!slot_problem_.empty()) return ignored(slot_problem_);
    // Gone, on the same boot, with no clean stop: this machine's /dev/shm
    // does not outlive the process (a container restarted with a fresh one,
    // systemd's RemoveIPC). The next crash must not lose its jobs too.
    keep_in_file_ = true;
    return ignored(slot_path_ + " is gone: tmpfs did not outlive the process here (a container "
                   "restarted with a fresh /dev/shm, or systemd's RemoveIPC); the slots stay in " +
                   path_ + " from now on");
  }
  // read(), not a mapping: a file that shrinks under the read is short,
  // never a SIGBUS.
  const std::size_t size = kSlotFileHeaderBytes + std::size_t{slots} * kSlotBytes;
  std::vector<unsigned char> bytes(size);
  const SysResult<std::size_t> read = read_from_start(slot_fd_, bytes);
  if (!read.ok()) return ignored("read " + slot_path_ + ": " + errno_text(read.error));
  const std::size_t got = read.value;
  if (got == 0) return ignored(slot_path_ + " is empty (a start killed while it armed the record)");
  if (got < kSlotFileHeaderBytes || std::memcmp(bytes.data(), kSlotMagic, 8) != 0 ||
      get32(bytes.data() + 8) != kSlotFileVersion) {
    return ignored(slot_path_ + " is not a slot file");
  }
  if (get64(bytes.data() + 16) != device_ || get64(bytes.data() + 24) != inode_ ||
      get64(bytes.data() + 32) != pair) {
    return ignored(slot_path_ + " belongs to another LIVE file");
  }
  if (get32(bytes.data() + 12) != slots || got != size) {
    return ignored(slot_path_ + " holds " + std::to_string(get32(bytes.data() + 12)) +
                   " worker slots in " + std::to_string(got) + " bytes, the header says " +
                   std::to_string(slots));
  }
  for (std::uint32_t i = 0; i < slots; ++i) {
    const std::uint64_t id =
        get64(bytes.data() + kSlotFileHeaderBytes + std::size_t{i} * kSlotBytes);
    if (id != 0 && id < (std::uint64_t{1} << 63)) previous_running_.push_back(id);  // ids never reach bit 63
  }
}

Status FileLiveRecord::arm(unsigned workers, JobId lease_floor) {
  if (map_ != nullptr) return Status(StatusCode::kFailedPrecondition, "live record armed twice");
  if (workers > kMaxSlots) {
    return Status(StatusCode::kInvalidArgument,
                  "live record: " + std::to_string(workers) + " workers, at most " +
                      std::to_string(kMaxSlots));
  }
  Status armed = arm_file(workers, lease_floor);
  if (!armed.ok()) {
    // The previous running ids must not be counted again at the next start
    // (their recoveries were made durable before this): empty the file. A
    // shrink needs no space. The lease goes with them (ids may then repeat
    // after a crash, which the caller logs).
    if (map_ != nullptr) ::munmap(map_, map_bytes_);
    map_ = nullptr;
    // The slot file goes only once the header that names it is gone: with
    // the header left, a missing slot file would read as tmpfs lost.
    const bool emptied = default_file_system()->ftruncate(fd_, 0) == 0;
    const bool ours = slot_fd_ >= 0 || remove_slot_file_;
    drop_slot_file(/*remove=*/false);
    if (emptied && ours) (void)default_file_system()->unlink(slot_path_);
    remove_slot_file_ = false;
  }
  return armed;
}

Status FileLiveRecord::arm_file(unsigned workers, JobId lease_floor) {
  FileSystem& fs = *default_file_system();
  SysResult<FileInfo> info = fs.fstat(fd_);
  if (!info.ok()) return errno_status("fstat", path_, info.error);
  std::uint64_t have = info.value.size;
  // Never shrunk while it holds a record: a kill between a shrink and the
  // header's rewrite would leave a (version 1) header whose slots do not fit
  // (ignored: the lease lost). Content that is no record goes first.
  if (!previous_valid_ && have != 0) {
    if (int err = fs.ftruncate(fd_, 0); err != 0) return errno_status("ftruncate", path_, err);
    have = 0;
  }
  // The slots' place first: in the slot file when it can be made and sized
  // (emptying it: its old slots' recoveries are durable by now), else here.
  if (keep_in_file_) {
    slots_in_file_ = true;
    slot_problem_ = "a slot file of " + slot_path_ +
                    " was once gone after a crash: tmpfs does not outlive the process here (remove " +
                    path_ + " after a clean stop to try tmpfs again)";
    remove_slot_file_ = slot_fd_ >= 0;  // one this record opened, not another's file
    drop_slot_file(/*remove=*/false);
  } else {
    slots_in_file_ = slot_fd_ < 0 && !open_slot_file(/*create=*/true);
  }
  if (!slots_in_file_) {
    pair_ = pair_id();
    if (Status s = arm_slot_file(workers); !s.ok()) {
      // A full /dev/shm (a container's is 64 MiB), a file size limit: the
      // record still works, its slots here.
      slot_problem_ = s.message();
      drop_slot_file(/*remove=*/false);
      remove_slot_file_ = true;
      slots_in_file_ = true;
    }
  }
  const std::size_t needed = kHeaderBytes + (slots_in_file_ ? std::size_t{workers} * kSlotBytes : 0);
  const std::size_t bytes = std::max<std::size_t>(needed, have);
  // Allocated, not sparse: a store into a hole of a full file system would be
  // a SIGBUS on a worker, not an error here.
  if (bytes > have) {
    if (int err = fs.ftruncate(fd_, bytes); err != 0) return errno_status("ftruncate", path_, err);
  }
  if (int e = allocate_retrying_eintr(fd_, bytes); e != 0) return errno_status("fallocate", path_, e);
  void* p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd_, 0);
  if (p == MAP_FAILED) return errno_status("mmap", path_, errno);
  map_ = static_cast<unsigned char*>(p);
  map_bytes_ = bytes;
  // The old slots first (their recoveries are durable already: in this file
  // for a version-1 record, in the slot file for a version-2 one), then the
  // header: a kill in between leaves the old header over idle slots, its
  // lease intact.
  std::memset(map_ + kHeaderBytes, 0, bytes - kHeaderBytes);
  slots_ = workers;
  word_at(16)->store(std::max(lease_floor, previous_lease_end_), std::memory_order_relaxed);
  std::memset(map_ + kCreditedOffset, 0, kHeaderBytes - kCreditedOffset);  // flags 0 included
  if (!slots_in_file_) std::memcpy(map_ + kPairOffset, &pair_, 8);
  if (keep_in_file_) {
    const std::uint32_t flags = kSlotsStayInFile;
    std::memcpy(map_ + kFlagsOffset, &flags, 4);
  }
  const std::string boot = boot_id();
  std::memcpy(map_ + kBootIdOffset, boot.data(), boot.size());
  const std::uint32_t version = slots_in_file_ ? kVersionInFile : kVersionSlotFile;
  const std::uint32_t slots = workers;
  std::memcpy(map_ + 8, &version, 4);
  std::memcpy(map_ + 12, &slots, 4);
  std::memcpy(map_, kMagic, 8);
  // An unused slot file goes only now: under an old version-2 header a
  // missing one would read as tmpfs lost (an emptied one reads as empty).
  if (remove_slot_file_) (void)default_file_system()->unlink(slot_path_);
  remove_slot_file_ = false;
  return Status();
}

Status FileLiveRecord::arm_slot_file(unsigned workers) {
  const auto failed = [this](std::string_view what, int error) {
    return Status(StatusCode::kIoError, "live record slot file " + slot_path_ + ": " +
                                            std::string(what) + ": " + errno_text(error));
  };
  const std::size_t bytes = kSlotFileHeaderBytes + std::size_t{workers} * kSlotBytes;
  // Emptied, then grown: every old slot reads 0 from here on.
  FileSystem& fs = *default_file_system();
  if (int err = fs.ftruncate(slot_fd_, 0); err != 0) return failed("ftruncate", err);
  if (int err = fs.ftruncate(slot_fd_, bytes); err != 0) return failed("ftruncate", err);
  // Allocated: a store into a hole of a full tmpfs would be a SIGBUS on a worker.
  if (int e = allocate_retrying_eintr(slot_fd_, bytes); e != 0) return failed("fallocate", e);
  void* p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, slot_fd_, 0);
  if (p == MAP_FAILED) return failed("mmap", errno);
  slot_map_ = static_cast<unsigned char*>(p);
  slot_map_bytes_ = bytes;
  const std::uint32_t version = kSlotFileVersion;
  const std::uint32_t slots = workers;
  std::memcpy(slot_map_ + 8, &version, 4);
  std::memcpy(slot_map_ + 12, &slots, 4);
  std::memcpy(slot_map_ + 16, &device_, 8);
  std::memcpy(slot_map_ + 24, &inode_, 8);
  std::memcpy(slot_map_ + 32, &pair_, 8);
  std::memcpy(slot_map_, kSlotMagic, 8);
  return Status();
}

void FileLiveRecord::drop_slot_file(bool remove) noexcept {
  if (slot_map_ != nullptr) ::munmap(slot_map_, slot_map_bytes_);
  slot_map_ = nullptr;
  if (slot_fd_ < 0) return;
  // Ours (opened by this name without following links, owner checked), in a
  // sticky directory where no other user can rename or remove it.
  if (remove) (void)default_file_system()->unlink(slot_path_);
  (void)default_file_system()->close(slot_fd_);
  slot_fd_ = -1;
}

std::string FileLiveRecord::arm_warning() const {
  if (map_ == nullptr || !slots_in_file_ || slot_problem_.empty()) return {};
  return "the workers' slots are in " + path_ +
         ", where the disk's writeback can stall a worker's store (" + slot_problem_ + ")";
}

void FileLiveRecord::close() noexcept {
  if (map_ == nullptr || closed_) return;
  closed_ = true;
  if (slots_in_file_) return;  // nothing to free: idle slots after a clean stop
  // The flag first: a kill before the unlink leaves a clean record, whose
  // slot file the next reader does not look at.
  const std::uint32_t flags = kClosedCleanly;
  std::memcpy(map_ + kFlagsOffset, &flags, 4);
  ::munmap(slot_map_, slot_map_bytes_);
  slot_map_ = nullptr;
  (void)default_file_system()->unlink(slot_path_);
  (void)default_file_system()->close(slot_fd_);
  slot_fd_ = -1;
}

Status FileLiveRecord::mark_credited(std::uint64_t generation) {
  if (!previous_valid_ || map_ != nullptr) return Status();  // no old record to mark
  for (int interrupted = 0;; ++interrupted) {
    const ssize_t n = ::pwrite(fd_, &generation, sizeof generation, kCreditedOffset);
    if (n == static_cast<ssize_t>(sizeof generation)) return Status();
    if (n < 0 && errno == EINTR && interrupted < kMaxEintrRetries) continue;
    return errno_status("write credited generation", path_, n < 0 ? errno : EIO);
  }
}

std::atomic<std::uint64_t>* FileLiveRecord::word_at(std::size_t offset) const {
  return reinterpret_cast<std::atomic<std::uint64_t>*>(map_ + offset);
}

std::atomic<std::uint64_t>* FileLiveRecord::running_word(unsigned i) {
  if (map_ == nullptr || closed_ || i >= slots_) return nullptr;
  if (!slots_in_file_) {
    return reinterpret_cast<std::atomic<std::uint64_t>*>(slot_map_ + kSlotFileHeaderBytes +
                                                         std::size_t{i} * kSlotBytes);
  }
  return word_at(kHeaderBytes + std::size_t{i} * kSlotBytes);
}

void FileLiveRecord::extend_lease(JobId end) {
  if (map_ == nullptr) return;
  std::atomic<std::uint64_t>* lease = word_at(16);
  std::uint64_t now = lease->load(std::memory_order_relaxed);
  while (now < end && !lease->compare_exchange_weak(now, end, std::memory_order_relaxed)) {
  }
}

}  // namespace jobengine::persist
