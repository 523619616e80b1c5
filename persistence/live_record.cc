// See live_record.h.
#include "persistence/live_record.h"

#include "persistence/file_system.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstring>
#include <string_view>

namespace jobengine::persist {

namespace {

static_assert(std::endian::native == std::endian::little, "the live record is little-endian");
static_assert(sizeof(std::atomic<std::uint64_t>) == 8 &&
              std::atomic<std::uint64_t>::is_always_lock_free,
              "a record word is a lock-free 64-bit atomic in the mapping");

constexpr char kMagic[8] = {'J', 'O', 'B', 'L', 'I', 'V', 'E', '1'};
constexpr std::uint32_t kVersion = 1;

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

}  // namespace

Result<std::unique_ptr<FileLiveRecord>> FileLiveRecord::open(const std::string& dir) {
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
  if (Status s = record->read_previous(info.value.size); !s.ok()) return s;
  return record;
}

FileLiveRecord::~FileLiveRecord() {
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
  // Through the file layer from offset 0 (the descriptor was just opened),
  // an EINTR asked again at most kMaxEintrRetries times in a row, as
  // FileStore::read does.
  FileSystem& fs = *default_file_system();
  std::vector<unsigned char> bytes(size);
  std::size_t got = 0;
  int interrupted = 0;
  while (got < size) {
    SysResult<std::size_t> r = fs.read(fd_, bytes.data() + got, size - got);
    if (!r.ok()) {
      if (r.error == EINTR && ++interrupted < kMaxEintrRetries) continue;
      return errno_status("read", path_, r.error);
    }
    interrupted = 0;
    if (r.value == 0) break;
    got += r.value;
  }
  if (got != size) {
    previous_problem_ = "shorter than its size while read";
    return Status();
  }
  if (std::memcmp(bytes.data(), kMagic, 8) != 0) {
    previous_problem_ = "no live-record magic (zeros after a power loss, or not ours)";
    return Status();
  }
  if (get32(bytes.data() + 8) != kVersion) {
    previous_problem_ = "version " + std::to_string(get32(bytes.data() + 8)) + ", this build reads 1";
    return Status();
  }
  const std::uint32_t slots = get32(bytes.data() + 12);
  if (slots > kMaxSlots || kHeaderBytes + std::uint64_t{slots} * kSlotBytes > size) {
    previous_problem_ = std::to_string(slots) + " worker slots do not fit its " +
                        std::to_string(size) + " bytes";
    return Status();
  }
  previous_lease_end_ = get64(bytes.data() + 16);
  previous_credited_ = get64(bytes.data() + kCreditedOffset);
  previous_valid_ = true;
  const std::string written_at(reinterpret_cast<const char*>(bytes.data()) + kBootIdOffset,
                               kBootIdBytes);
  const std::string now = boot_id();
  if (written_at != std::string(kBootIdBytes, '\0') && !now.empty() && written_at != now) {
    // Its lease is still a floor (the snapshot's counter is the other one).
    previous_problem_ = "written before a reboot: the jobs it names may have finished long before";
    return Status();
  }
  for (std::uint32_t i = 0; i < slots; ++i) {
    const std::uint64_t id = get64(bytes.data() + kHeaderBytes + std::size_t{i} * kSlotBytes);
    if (id != 0 && id < (std::uint64_t{1} << 63)) previous_running_.push_back(id);  // ids never reach bit 63
  }
  return Status();
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
    (void)default_file_system()->ftruncate(fd_, 0);
  }
  return armed;
}

Status FileLiveRecord::arm_file(unsigned workers, JobId lease_floor) {
  FileSystem& fs = *default_file_system();
  SysResult<FileInfo> info = fs.fstat(fd_);
  if (!info.ok()) return errno_status("fstat", path_, info.error);
  std::uint64_t have = info.value.size;
  // Never shrunk while it holds a record: a kill between a shrink and the
  // header's rewrite would leave a header whose slots do not fit (ignored:
  // the lease lost). Content that is no record goes first.
  if (!previous_valid_ && have != 0) {
    if (int err = fs.ftruncate(fd_, 0); err != 0) return errno_status("ftruncate", path_, err);
    have = 0;
  }
  const std::size_t needed = kHeaderBytes + std::size_t{workers} * kSlotBytes;
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
  slots_ = workers;
  // The old slots first (their recoveries are durable already), then the
  // header: a kill in between leaves the old header over idle slots, its
  // lease intact.
  std::memset(map_ + kHeaderBytes, 0, bytes - kHeaderBytes);
  word_at(16)->store(std::max(lease_floor, previous_lease_end_), std::memory_order_relaxed);
  std::memset(map_ + kCreditedOffset, 0, kHeaderBytes - kCreditedOffset);
  const std::string boot = boot_id();
  std::memcpy(map_ + kBootIdOffset, boot.data(), boot.size());
  const std::uint32_t version = kVersion;
  const std::uint32_t slots = workers;
  std::memcpy(map_ + 8, &version, 4);
  std::memcpy(map_ + 12, &slots, 4);
  std::memcpy(map_, kMagic, 8);
  return Status();
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
  if (map_ == nullptr || i >= slots_) return nullptr;
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
