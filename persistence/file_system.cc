#include "persistence/file_system.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>  // renameat2, RENAME_NOREPLACE
#include <cstring>
#include <memory>

namespace jobengine::persist {
namespace {

// strerror_r has two signatures (GNU returns a char*, XSI an int); these
// overloads accept whichever one the C library declares.
[[maybe_unused]] const char* strerror_result(int rc, const char* buf) {
  return rc == 0 ? buf : nullptr;
}
[[maybe_unused]] const char* strerror_result(const char* text, const char* /*buf*/) { return text; }

FileInfo to_info(const struct stat& st) {
  FileInfo info;
  if (S_ISREG(st.st_mode)) {
    info.kind = FileInfo::Kind::kRegular;
  } else if (S_ISDIR(st.st_mode)) {
    info.kind = FileInfo::Kind::kDirectory;
  } else if (S_ISLNK(st.st_mode)) {
    info.kind = FileInfo::Kind::kSymlink;
  } else if (S_ISFIFO(st.st_mode)) {
    info.kind = FileInfo::Kind::kFifo;
  } else {
    info.kind = FileInfo::Kind::kOther;
  }
  info.size = st.st_size > 0 ? static_cast<std::uint64_t>(st.st_size) : 0;
  info.mode = static_cast<std::uint32_t>(st.st_mode & 07777);
  info.uid = static_cast<std::uint32_t>(st.st_uid);
  info.device = static_cast<std::uint64_t>(st.st_dev);
  info.inode = static_cast<std::uint64_t>(st.st_ino);
  info.links = static_cast<std::uint64_t>(st.st_nlink);
  return info;
}

}  // namespace

std::string octal_mode(std::uint32_t mode) {
  char buf[16];
  std::snprintf(buf, sizeof buf, "%04o", static_cast<unsigned>(mode & 07777));
  return buf;
}

std::string strip_trailing_slashes(std::string dir) {
  while (dir.size() > 1 && dir.back() == '/') dir.pop_back();
  return dir;
}

std::string errno_text(int error) {
  char buf[256];
  buf[0] = '\0';
  const char* text = strerror_result(strerror_r(error, buf, sizeof buf), buf);
  if (text == nullptr || *text == '\0') return "errno " + std::to_string(error);
  return text;
}

SysResult<int> PosixFileSystem::open(const std::string& path, int flags, mode_t mode) {
  // open() of a FIFO or device may block; EINTR then means nothing was opened
  // and the call may be repeated.
  for (int tries = 1;; ++tries) {
    int fd = ::open(path.c_str(), flags | O_CLOEXEC, mode);
    if (fd >= 0) return {fd, 0};
    if (errno != EINTR || tries == kMaxEintrRetries) return {-1, errno};
  }
}

// write, read and fsync return EINTR to their callers, which retry and count
// (file_system.h): a loop here as well made the limit 1000 x 1000.
SysResult<std::size_t> PosixFileSystem::write(int fd, const void* data, std::size_t size) {
  ssize_t n = ::write(fd, data, size);
  if (n >= 0) return {static_cast<std::size_t>(n), 0};
  return {0, errno};
}

SysResult<std::size_t> PosixFileSystem::read(int fd, void* data, std::size_t size) {
  ssize_t n = ::read(fd, data, size);
  if (n >= 0) return {static_cast<std::size_t>(n), 0};
  return {0, errno};
}

SysResult<const void*> PosixFileSystem::map_read(int fd, std::size_t size) {
  void* p = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
  if (p == MAP_FAILED) return {nullptr, errno};
  return {p, 0};
}

int PosixFileSystem::start_writeback(int fd, std::uint64_t offset, std::uint64_t size) {
  if (::sync_file_range(fd, static_cast<off_t>(offset), static_cast<off_t>(size),
                        SYNC_FILE_RANGE_WRITE) != 0) {
    return errno;
  }
  return 0;
}

int PosixFileSystem::fsync(int fd) {
  // An interrupted fsync reported no I/O error, so asking again is safe (the
  // caller does). Any other error is never retried: after a failed fsync
  // Linux may have dropped the dirty pages and a second fsync could falsely
  // succeed.
  if (::fsync(fd) == 0) return 0;
  return errno;
}

int PosixFileSystem::close(int fd) {
  // Linux releases the descriptor even when close() fails; retrying on EINTR
  // could close a descriptor another thread has just been given.
  if (::close(fd) == 0 || errno == EINTR) return 0;
  return errno;
}

int PosixFileSystem::rename(const std::string& from, const std::string& to) {
  return ::rename(from.c_str(), to.c_str()) == 0 ? 0 : errno;
}

int PosixFileSystem::rename_noreplace(const std::string& from, const std::string& to) {
  return ::renameat2(AT_FDCWD, from.c_str(), AT_FDCWD, to.c_str(), RENAME_NOREPLACE) == 0 ? 0
                                                                                          : errno;
}

int PosixFileSystem::ftruncate(int fd, std::uint64_t size) {
  return ::ftruncate(fd, static_cast<off_t>(size)) == 0 ? 0 : errno;
}

int PosixFileSystem::unlink(const std::string& path) {
  return ::unlink(path.c_str()) == 0 ? 0 : errno;
}

int PosixFileSystem::mkdir(const std::string& path, mode_t mode) {
  return ::mkdir(path.c_str(), mode) == 0 ? 0 : errno;
}

int PosixFileSystem::fchmod(int fd, mode_t mode) { return ::fchmod(fd, mode) == 0 ? 0 : errno; }

int PosixFileSystem::chmod(const std::string& path, mode_t mode) {
  return ::chmod(path.c_str(), mode) == 0 ? 0 : errno;
}

SysResult<FileInfo> PosixFileSystem::lstat(const std::string& path) {
  struct stat st;
  if (::lstat(path.c_str(), &st) != 0) return {{}, errno};
  return {to_info(st), 0};
}

SysResult<FileInfo> PosixFileSystem::fstat(int fd) {
  struct stat st;
  if (::fstat(fd, &st) != 0) return {{}, errno};
  return {to_info(st), 0};
}

SysResult<std::vector<std::string>> PosixFileSystem::list_dir(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return {{}, errno};
  DIR* opened = ::fdopendir(fd);  // owns fd from here on
  if (opened == nullptr) {
    int err = errno;
    ::close(fd);
    return {{}, err};
  }
  // Closed however this returns (a name's copy may throw std::bad_alloc).
  const std::unique_ptr<DIR, int (*)(DIR*)> dir(opened, &::closedir);
  SysResult<std::vector<std::string>> out;
  for (;;) {
    errno = 0;
    const struct dirent* entry = ::readdir(dir.get());
    if (entry == nullptr) {
      out.error = errno;  // 0 at the end of the directory
      break;
    }
    if (std::strcmp(entry->d_name, ".") == 0 || std::strcmp(entry->d_name, "..") == 0) continue;
    out.value.emplace_back(entry->d_name);
  }
  if (!out.ok()) out.value.clear();
  return out;
}

int PosixFileSystem::lock_exclusive(int fd) {
  for (int tries = 1;; ++tries) {
    if (::flock(fd, LOCK_EX | LOCK_NB) == 0) return 0;
    if (errno != EINTR || tries == kMaxEintrRetries) return errno;
  }
}

int allocate_retrying_eintr(int fd, std::uint64_t bytes) {
  for (int interrupted = 1;; ++interrupted) {
    const int e = ::posix_fallocate(fd, 0, static_cast<off_t>(bytes));
    if (e != EINTR || interrupted == kMaxEintrRetries) return e;
  }
}

std::shared_ptr<FileSystem> default_file_system() {
  static const std::shared_ptr<FileSystem> fs = std::make_shared<PosixFileSystem>();
  return fs;
}

}  // namespace jobengine::persist
