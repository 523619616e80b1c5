// FileSystem: the file layer under FileStore, a seam in the style of leveldb's
// Env. It exposes exactly the POSIX calls the disk store makes, each reporting
// failure as an errno value (never an exception, never errno itself), so that
// tests can substitute a fault-injecting implementation
// (tests/persistence/fault_file_system.h) and make any single call fail.
//
// Conventions for every method:
//   - Thread-safe as far as the underlying system call is (PosixFileSystem
//     holds no state). Never throws; a returned error is an errno value > 0.
//   - Paths are used as given (no normalization); callers that must not
//     follow a symlink pass O_NOFOLLOW or use lstat.
//   - Each method is one system call, or a loop that retries only EINTR
//     where POSIX allows a retry, at most kMaxEintrRetries times in a row
//     (then EINTR is returned: a signal storm or a broken file system must
//     not spin the snapshot thread forever). write, read and fsync are one
//     call each and return EINTR: their callers loop anyway (a short write
//     is continued, FileStore does), and count the EINTRs themselves, so
//     that the limit is kMaxEintrRetries, not its square.
#pragma once

#include <sys/types.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace jobengine::persist {

// A system call's value, or the errno it failed with (value is then unset).
template <typename T>
struct [[nodiscard]] SysResult {
  T value{};
  int error = 0;  // 0: success; otherwise an errno value
  bool ok() const noexcept { return error == 0; }
};

// What stat(2) says about a file, reduced to what the store checks.
struct FileInfo {
  enum class Kind : std::uint8_t { kRegular, kDirectory, kSymlink, kFifo, kOther };
  Kind kind = Kind::kOther;
  std::uint64_t size = 0;
  std::uint32_t mode = 0;  // permission bits only (st_mode & 07777)
  std::uint32_t uid = 0;
  std::uint64_t device = 0;
  std::uint64_t inode = 0;
  std::uint64_t links = 0;  // st_nlink: names this file has
};

// EINTRs in a row after which a retrying call gives up and returns EINTR.
inline constexpr int kMaxEintrRetries = 1000;

// The errno's text, as strerror() gives it but thread-safe ("Input/output error").
std::string errno_text(int error);

// A file mode's permission bits as four octal digits ("0600").
std::string octal_mode(std::uint32_t mode);

// "a/b/" -> "a/b"; "/" stays "/". How FileStore::open takes a directory:
// "DIR/" names DIR itself (lstat of "DIR/" would follow a symlink DIR).
std::string strip_trailing_slashes(std::string dir);

class FileSystem {
 public:
  virtual ~FileSystem() = default;

  // open(2). Returns the new descriptor. Implementations add O_CLOEXEC
  // whatever `flags` says: no descriptor of ours may leak into an exec'd child.
  virtual SysResult<int> open(const std::string& path, int flags, mode_t mode) = 0;
  // One write(2) of at most `size` bytes: returns the count written, which may
  // be short; the caller continues. EINTR may be returned (nothing written).
  virtual SysResult<std::size_t> write(int fd, const void* data, std::size_t size) = 0;
  // One read(2): returns the count read, 0 at end of file. EINTR may be returned.
  virtual SysResult<std::size_t> read(int fd, void* data, std::size_t size) = 0;
  // mmap(2) of the first `size` (> 0) bytes of `fd`, read-only, private,
  // nothing read yet (FileStore::map has its pages read in on a thread,
  // ImageBytes::populate_in_background). The caller munmap(2)s it. EINTR may
  // be returned (nothing mapped).
  virtual SysResult<const void*> map_read(int fd, std::size_t size) = 0;
  // sync_file_range(2) with SYNC_FILE_RANGE_WRITE: starts writing the range
  // to the device, waits for nothing, makes nothing durable (fsync does).
  // Returns 0 or an errno; callers treat it as advice.
  virtual int start_writeback(int fd, std::uint64_t offset, std::uint64_t size) = 0;
  // fsync(2) of a file or a directory descriptor. Returns 0 or an errno;
  // EINTR may be returned (no I/O error was reported: asking again is safe).
  [[nodiscard]] virtual int fsync(int fd) = 0;
  // close(2). The descriptor is released whatever is returned (Linux); EINTR
  // is therefore reported as success, never retried.
  [[nodiscard]] virtual int close(int fd) = 0;
  // rename(2): atomically replaces `to`.
  [[nodiscard]] virtual int rename(const std::string& from, const std::string& to) = 0;
  // renameat2(2) with RENAME_NOREPLACE: fails with EEXIST if `to` exists (of
  // any kind, a symlink included), as O_CREAT|O_EXCL does for a new file.
  [[nodiscard]] virtual int rename_noreplace(const std::string& from, const std::string& to) = 0;
  // ftruncate(2). Returns 0 or an errno (EINTR possible).
  [[nodiscard]] virtual int ftruncate(int fd, std::uint64_t size) = 0;
  // unlink(2) of a non-directory.
  [[nodiscard]] virtual int unlink(const std::string& path) = 0;
  // mkdir(2): the mode is filtered by the umask; the caller fixes it with chmod.
  [[nodiscard]] virtual int mkdir(const std::string& path, mode_t mode) = 0;
  // fchmod(2) / chmod(2): set the permission bits whatever the umask was.
  [[nodiscard]] virtual int fchmod(int fd, mode_t mode) = 0;
  [[nodiscard]] virtual int chmod(const std::string& path, mode_t mode) = 0;
  // lstat(2) (does not follow a final symlink) and fstat(2).
  virtual SysResult<FileInfo> lstat(const std::string& path) = 0;
  virtual SysResult<FileInfo> fstat(int fd) = 0;
  // The names in directory `path`, without "." and "..", in no given order.
  virtual SysResult<std::vector<std::string>> list_dir(const std::string& path) = 0;
  // flock(fd, LOCK_EX | LOCK_NB): EWOULDBLOCK when another open file
  // description (in this or another process) holds it. The lock goes with
  // the open file description: it is released when its last descriptor is
  // closed, including by the death of the process.
  [[nodiscard]] virtual int lock_exclusive(int fd) = 0;
};

// The real file layer: direct POSIX calls, every descriptor O_CLOEXEC, EINTR
// retried inside open/write/read/fsync/lock (nothing happened, so a retry is
// what POSIX allows; at most kMaxEintrRetries times in a row) and reported
// as success by close (Linux releases the fd).
class PosixFileSystem final : public FileSystem {
 public:
  SysResult<int> open(const std::string& path, int flags, mode_t mode) override;
  SysResult<std::size_t> write(int fd, const void* data, std::size_t size) override;
  SysResult<std::size_t> read(int fd, void* data, std::size_t size) override;
  SysResult<const void*> map_read(int fd, std::size_t size) override;
  int start_writeback(int fd, std::uint64_t offset, std::uint64_t size) override;
  int fsync(int fd) override;
  int close(int fd) override;
  int rename(const std::string& from, const std::string& to) override;
  int rename_noreplace(const std::string& from, const std::string& to) override;
  int ftruncate(int fd, std::uint64_t size) override;
  int unlink(const std::string& path) override;
  int mkdir(const std::string& path, mode_t mode) override;
  int fchmod(int fd, mode_t mode) override;
  int chmod(const std::string& path, mode_t mode) override;
  SysResult<FileInfo> lstat(const std::string& path) override;
  SysResult<FileInfo> fstat(int fd) override;
  SysResult<std::vector<std::string>> list_dir(const std::string& path) override;
  int lock_exclusive(int fd) override;
};

// A process-wide PosixFileSystem (stateless; shared by every store).
std::shared_ptr<FileSystem> default_file_system();

// posix_fallocate(fd, 0, bytes), asked again on EINTR (older kernels' tmpfs
// return it on any pending signal) at most kMaxEintrRetries times in a row.
// Returns 0 or the error. For the stores that map their files (the segment,
// the live record): allocated space, so a store into the mapping never meets
// a hole on a full file system (SIGBUS).
int allocate_retrying_eintr(int fd, std::uint64_t bytes);

}  // namespace jobengine::persist
