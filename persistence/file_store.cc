#include "persistence/file_store.h"

#include <fcntl.h>
#include <pthread.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string_view>
#include <system_error>
#include <thread>
#include <utility>

namespace jobengine::detail {

ImageBytes& ImageBytes::operator=(ImageBytes&& o) noexcept {
  if (this == &o) return *this;
  release();
  buffer_ = std::move(o.buffer_);  // a moved vector keeps its buffer: data_ stays valid
  data_ = std::exchange(o.data_, nullptr);
  size_ = std::exchange(o.size_, 0);
  mapped_ = std::exchange(o.mapped_, false);
  populator_ = std::move(o.populator_);  // its thread works on the mapping, not on `o`
  return *this;
}

namespace {

// Reads [data, data + size) of a file mapping into the page cache and the
// page tables, front to back, until done or `stop`. A page that cannot be
// read (I/O error, file truncated underneath) is left for the reader to fault
// on, as MAP_POPULATE left it.
void populate_mapping(const unsigned char* data, std::size_t size, const std::atomic<bool>& stop) {
  constexpr std::size_t kChunk = std::size_t{4} << 20;
  const long page_size = ::sysconf(_SC_PAGESIZE);
  const std::size_t page = page_size > 0 ? static_cast<std::size_t>(page_size) : 4096;
  // Relaxed: only a request to stop early; the join orders everything else.
  for (std::size_t at = 0; at < size && !stop.load(std::memory_order_relaxed);) {
    const std::size_t len = std::min(kChunk, size - at);
    auto* chunk = const_cast<unsigned char*>(data + at);
#ifdef MADV_POPULATE_READ
    if (::madvise(chunk, len, MADV_POPULATE_READ) == 0) {
      at += len;
      continue;
    }
    if (errno == EINTR) continue;
    if (errno != EINVAL) return;  // EFAULT, EIO, ENOMEM: leave it to the reader
#endif
    // Kernels before 5.14: one read per page.
    for (std::size_t p = 0; p < len; p += page) {
      (void)*static_cast<volatile const unsigned char*>(chunk + p);
    }
    at += len;
  }
}

}  // namespace

void ImageBytes::populate_in_background() {
  if (!mapped_ || populator_ != nullptr) return;
  auto populator = std::make_unique<Populator>();
  try {
    populator->thread = std::thread(
        [data = data_, size = size_, stop = &populator->stop] { populate_mapping(data, size, *stop); });
  } catch (const std::system_error&) {
    populate_mapping(data_, size_, populator->stop);  // no thread to spare: here, now
    return;
  }
  (void)::pthread_setname_np(populator->thread.native_handle(), "jobengine-load");
  populator_ = std::move(populator);
}

std::vector<unsigned char> ImageBytes::to_vector() && {
  if (!mapped_) {
    std::vector<unsigned char> out = std::move(buffer_);
    data_ = nullptr;
    size_ = 0;
    return out;
  }
  std::vector<unsigned char> out(data_, data_ + size_);
  release();
  return out;
}

void ImageBytes::release() noexcept {
  if (populator_ != nullptr) {
    populator_->stop.store(true, std::memory_order_relaxed);
    populator_->thread.join();
    populator_.reset();
  }
  if (mapped_) (void)::munmap(const_cast<unsigned char*>(data_), size_);
  buffer_ = {};
  data_ = nullptr;
  size_ = 0;
  mapped_ = false;
}

}  // namespace jobengine::detail

namespace jobengine::persist {
namespace {

constexpr std::string_view kLockName = "LOCK";
constexpr std::string_view kTempPrefix = ".tmp-";
constexpr std::string_view kGenPrefix = "gen-";
constexpr std::string_view kGenSuffix = ".jobsnap";
constexpr std::size_t kGenDigits = 20;
constexpr mode_t kDirMode = 0700;
constexpr mode_t kFileMode = 0600;
// EINTR means the call did nothing and may be repeated; a call interrupted
// kMaxEintrRetries times in a row (a signal storm, a broken file system)
// fails the publish with EINTR instead of spinning the snapshot thread
// forever (file_system.h).

// "<step> <path>: <errno text>", the shape of every I/O error of this file.
Status io_error(std::string_view step, const std::string& path, int error) {
  std::string msg(step);
  msg += ' ';
  msg += path;
  msg += ": ";
  msg += errno_text(error);
  return Status(StatusCode::kIoError, std::move(msg));
}

std::string join(const std::string& dir, std::string_view name) {
  std::string out = dir;
  out += '/';
  out += name;
  return out;
}


std::string parent_of(const std::string& dir) {
  std::size_t slash = dir.rfind('/');
  if (slash == std::string::npos) return ".";
  if (slash == 0) return "/";
  return dir.substr(0, slash);
}

std::string generation_name(std::uint64_t generation) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "gen-%020llu.jobsnap",
                static_cast<unsigned long long>(generation));
  return buf;
}

std::string temp_name(std::uint64_t generation) {
  char buf[64];
  std::snprintf(buf, sizeof buf, ".tmp-%020llu-%ld", static_cast<unsigned long long>(generation),
                static_cast<long>(::getpid()));
  return buf;
}

// Accepts exactly "gen-" + 20 decimal digits (a value that fits 64 bits) +
// ".jobsnap".
bool parse_generation_name(std::string_view name, std::uint64_t* generation) {
  if (name.size() != kGenPrefix.size() + kGenDigits + kGenSuffix.size()) return false;
  if (name.substr(0, kGenPrefix.size()) != kGenPrefix) return false;
  if (name.substr(kGenPrefix.size() + kGenDigits) != kGenSuffix) return false;
  std::uint64_t value = 0;
  for (char c : name.substr(kGenPrefix.size(), kGenDigits)) {
    if (c < '0' || c > '9') return false;
    const auto digit = static_cast<std::uint64_t>(c - '0');
    if (value > (UINT64_MAX - digit) / 10) return false;
    value = value * 10 + digit;
  }
  *generation = value;
  return true;
}

const char* kind_text(FileInfo::Kind kind) {
  switch (kind) {
    case FileInfo::Kind::kRegular:
      return "a regular file";
    case FileInfo::Kind::kDirectory:
      return "a directory";
    case FileInfo::Kind::kSymlink:
      return "a symlink";
    case FileInfo::Kind::kFifo:
      return "a FIFO";
    case FileInfo::Kind::kOther:
      return "a device or socket";
  }
  return "of unknown type";
}

// Closes a descriptor on every path out of a scope unless released first
// (the success path closes explicitly, to see close()'s error).
class ScopedFd {
 public:
  ScopedFd(FileSystem& fs, int fd) : fs_(fs), fd_(fd) {}
  ScopedFd(const ScopedFd&) = delete;
  ScopedFd& operator=(const ScopedFd&) = delete;
  ~ScopedFd() {
    if (fd_ >= 0) (void)fs_.close(fd_);
  }
  int get() const noexcept { return fd_; }
  int release() noexcept { return std::exchange(fd_, -1); }

 private:
  FileSystem& fs_;
  int fd_;
};

// Writes every byte; a short write continues where it stopped and EINTR
// retries (nothing was written). Returns 0 or the errno of the failed write.
int write_all(FileSystem& fs, int fd, std::span<const unsigned char> bytes) {
  std::size_t done = 0;
  int interrupted = 0;  // EINTRs in a row
  while (done < bytes.size()) {
    SysResult<std::size_t> r = fs.write(fd, bytes.data() + done, bytes.size() - done);
    if (!r.ok()) {
      if (r.error == EINTR && ++interrupted < kMaxEintrRetries) continue;
      return r.error;
    }
    interrupted = 0;
    if (r.value == 0) return EIO;  // write(2) made no progress: never loop forever
    done += r.value;
  }
  return 0;
}

// Writes the image in pieces of kWritebackPiece bytes and asks the kernel to
// start writing each piece to the device as soon as it is in the page cache
// (FileSystem::start_writeback), so that the device works while the next
// pieces are copied and the final fsync waits only for the tail; RocksDB's
// bytes_per_sync does the same. A 140 MB image: write 32 + fsync 58 ms in one
// go, ~60 ms this way (2-vCPU KVM, virtio disk). Returns as write_all does.
constexpr std::size_t kWritebackPiece = std::size_t{8} << 20;
int write_all_with_writeback(FileSystem& fs, int fd, std::span<const unsigned char> bytes) {
  for (std::size_t at = 0; at < bytes.size(); at += kWritebackPiece) {
    const std::size_t n = std::min(kWritebackPiece, bytes.size() - at);
    if (int err = write_all(fs, fd, bytes.subspan(at, n)); err != 0) return err;
    // Advice: a failure here only loses the overlap; fsync reports real errors.
    (void)fs.start_writeback(fd, at, n);
  }
  return 0;
}

int ftruncate_retrying_eintr(FileSystem& fs, int fd, std::uint64_t size) {
  for (int interrupted = 1;; ++interrupted) {
    int err = fs.ftruncate(fd, size);
    if (err != EINTR || interrupted == kMaxEintrRetries) return err;
  }
}

int fsync_retrying_eintr(FileSystem& fs, int fd) {
  for (int interrupted = 1;; ++interrupted) {
    int err = fs.fsync(fd);
    if (err != EINTR || interrupted == kMaxEintrRetries) return err;
  }
}

// Makes `dir`'s entries durable (creations, renames and unlinks in it).
Status sync_dir(FileSystem& fs, const std::string& dir) {
  SysResult<int> fd = fs.open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC, 0);
  if (!fd.ok()) return io_error("open dir", dir, fd.error);
  ScopedFd closer(fs, fd.value);
  if (int err = fsync_retrying_eintr(fs, fd.value); err != 0) {
    return io_error("fsync dir", dir, err);
  }
  if (int err = fs.close(closer.release()); err != 0) return io_error("close dir", dir, err);
  return Status();
}

}  // namespace

Result<std::unique_ptr<FileStore>> FileStore::open(const std::string& dir_arg, unsigned keep,
                                                   std::shared_ptr<FileSystem> fs) {
  if (keep == 0) {
    return Status(StatusCode::kInvalidArgument, "FileStore keep must be at least 1");
  }
  if (dir_arg.empty()) {
    return Status(StatusCode::kInvalidArgument, "FileStore directory name is empty");
  }
  if (fs == nullptr) fs = default_file_system();
  const std::string given = strip_trailing_slashes(dir_arg);

  // The directory: create it, or check the one that is there.
  bool created = false;
  SysResult<FileInfo> info = fs->lstat(given);
  if (!info.ok()) {
    if (info.error != ENOENT) return io_error("lstat", given, info.error);
    int err = fs->mkdir(given, kDirMode);
    if (err != 0 && err != EEXIST) return io_error("mkdir", given, err);
    created = err == 0;
    info = fs->lstat(given);
    if (!info.ok()) return io_error("lstat", given, info.error);
  }
  if (info.value.kind == FileInfo::Kind::kSymlink) {
    return Status(StatusCode::kInvalidArgument,
                  "snapshot directory " + given + " is a symlink; refusing to follow it");
  }
  if (info.value.kind != FileInfo::Kind::kDirectory) {
    return Status(StatusCode::kInvalidArgument, "snapshot directory " + given +
                                                    " is not a directory (it is " +
                                                    kind_text(info.value.kind) + ")");
  }
  const auto euid = static_cast<std::uint32_t>(::geteuid());
  if (info.value.uid != euid) {
    return Status(StatusCode::kFailedPrecondition,
                  "snapshot directory " + given + " is owned by uid " +
                      std::to_string(info.value.uid) + ", not by this process's uid " +
                      std::to_string(euid));
  }
  // A generation numbered 2^64 - 1 leaves no number for the next publish:
  // every one would be refused. Refused before anything is created in the
  // directory, naming the file to move away; looked for before its mode is
  // changed too, so that a refused jobsnap edit leaves the directory as it
  // found it (and again after, should the mode have kept it from a listing).
  const auto last_generation_in = [&fs](const std::string& where) -> Result<bool> {
    Result<std::vector<GenerationFile>> present = list_generations(where, *fs);
    if (!present.ok()) return present.status();
    if (!present->empty() && present->front().generation == UINT64_MAX) {
      return Status(StatusCode::kInvalidArgument,
                    "snapshot file " + present->front().path + " is generation " +
                        std::to_string(UINT64_MAX) + ", " + std::string(kLastGenerationWords) +
                        ": no new generation can be numbered above it; move it out of " + where +
                        " to use this directory");
    }
    return true;
  };
  Result<bool> listed = last_generation_in(given);
  if (!listed.ok() && listed.status().code() == StatusCode::kInvalidArgument) return listed.status();

  if (info.value.mode != kDirMode) {
    if (int err = fs->chmod(given, kDirMode); err != 0) return io_error("chmod 0700", given, err);
  }

  // From here on the directory is named by its absolute, canonical path,
  // resolved once: a relative name ("jobs") would otherwise be looked up
  // again in whatever the working directory is at each publish.
  std::string dir;
  {
    // Owned at once: the copy into `dir` may throw (bad_alloc).
    const std::unique_ptr<char, decltype(&std::free)> resolved(::realpath(given.c_str(), nullptr),
                                                               &std::free);
    if (resolved == nullptr) return io_error("realpath", given, errno);
    dir = resolved.get();
  }
  if (created) {
    // The new directory's own entry must survive power loss too.
    if (Status s = sync_dir(*fs, parent_of(dir)); !s.ok()) return s;
  }
  // Held open for the store's life: publishes fsync the directory through it
  // instead of opening it by name again (which could fail, EMFILE, after the
  // new generation is renamed into place).
  SysResult<int> dir_fd = fs->open(dir, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC, 0);
  if (!dir_fd.ok()) return io_error("open dir", dir, dir_fd.error);
  ScopedFd dir_closer(*fs, dir_fd.value);
  SysResult<FileInfo> dir_info = fs->fstat(dir_fd.value);
  if (!dir_info.ok()) return io_error("fstat", dir, dir_info.error);
  if (dir_info.value.device != info.value.device || dir_info.value.inode != info.value.inode) {
    return Status(StatusCode::kFailedPrecondition,
                  "snapshot directory " + given + " was replaced while it was opened");
  }

  if (!listed.ok()) {
    if (Result<bool> again = last_generation_in(dir); !again.ok()) return again.status();
  }

  // The lock: one engine per directory.
  const std::string lock_path = join(dir, kLockName);
  SysResult<int> lock = fs->open(lock_path, O_RDWR | O_CREAT | O_NOFOLLOW | O_CLOEXEC, kFileMode);
  if (!lock.ok()) {
    if (lock.error == ELOOP) {
      return Status(StatusCode::kInvalidArgument,
                    lock_path + " is a symlink; refusing to follow it");
    }
    return io_error("open", lock_path, lock.error);
  }
  ScopedFd lock_closer(*fs, lock.value);
  SysResult<FileInfo> lock_info = fs->fstat(lock.value);
  if (!lock_info.ok()) return io_error("fstat", lock_path, lock_info.error);
  if (lock_info.value.kind != FileInfo::Kind::kRegular) {
    return Status(StatusCode::kInvalidArgument, lock_path + " is not a regular file (it is " +
                                                    kind_text(lock_info.value.kind) + ")");
  }
  if (lock_info.value.mode != kFileMode) {
    if (int err = fs->fchmod(lock.value, kFileMode); err != 0) {
      return io_error("fchmod 0600", lock_path, err);
    }
  }
  if (int err = fs->lock_exclusive(lock.value); err != 0) {
    if (err == EWOULDBLOCK || err == EAGAIN) {
      return Status(StatusCode::kFailedPrecondition,
                    "another engine holds " + dir + " (flock on " + lock_path + ")");
    }
    return io_error("flock", lock_path, err);
  }

  // Under the lock no publish is in progress: every temp file is stale.
  SysResult<std::vector<std::string>> names = fs->list_dir(dir);
  if (!names.ok()) return io_error("list", dir, names.error);
  for (const std::string& name : names.value) {
    if (std::string_view(name).substr(0, kTempPrefix.size()) != kTempPrefix) continue;
    const std::string path = join(dir, name);
    if (int err = fs->unlink(path); err != 0 && err != ENOENT) {
      return io_error("unlink stale temp file", path, err);
    }
  }

  return std::unique_ptr<FileStore>(new FileStore(std::move(dir), keep, std::move(fs),
                                                  lock_closer.release(), dir_closer.release()));
}

FileStore::FileStore(std::string dir, unsigned keep, std::shared_ptr<FileSystem> fs, int lock_fd,
                     int dir_fd)
    : dir_(std::move(dir)), keep_(keep), fs_(std::move(fs)), lock_fd_(lock_fd), dir_fd_(dir_fd) {}

FileStore::~FileStore() {
  if (dir_fd_ >= 0) (void)fs_->close(dir_fd_);
  if (lock_fd_ >= 0) (void)fs_->close(lock_fd_);
}

Status FileStore::sync_dir_fd() {
  if (int err = fsync_retrying_eintr(*fs_, dir_fd_); err != 0) {
    return io_error("fsync dir", dir_, err);
  }
  return Status();
}

Status FileStore::publish(std::uint64_t generation, std::span<const unsigned char> image) {
  std::lock_guard<std::mutex> guard(publish_mutex_);
  FileSystem& fs = *fs_;

  Result<std::vector<GenerationFile>> present = list_generations(dir_, fs);
  if (!present.ok()) return present.status();
  if (!present->empty() && generation <= present->front().generation) {
    return Status(StatusCode::kInvalidArgument, "publish generation " + std::to_string(generation) +
                                                    " is not newer than generation " +
                                                    std::to_string(present->front().generation) +
                                                    " in " + dir_);
  }

  const std::string temp = join(dir_, temp_name(generation));
  const std::string final_path = join(dir_, generation_name(generation));

  // Recycling (see the header): when this publish will push the oldest
  // generation out and another stays, that file becomes the temp file.
  // A file with another name too (an operator's hard-linked backup) is not
  // rewritten: that name would see the new bytes.
  // And only while another generation present is known to verify: with
  // the newer ones damaged, rewriting the oldest and failing would leave none.
  const GenerationFile* recycled = nullptr;
  if (present->size() >= keep_ && present->size() >= 2 &&
      std::any_of(present->begin(), present->end() - 1,  // all but the oldest
                  [&](const GenerationFile& g) { return g.generation == known_good_; })) {
    const GenerationFile& oldest = present->back();
    SysResult<FileInfo> info = fs.lstat(oldest.path);
    if (info.ok() && info.value.kind == FileInfo::Kind::kRegular && info.value.links == 1 &&
        fs.rename_noreplace(oldest.path, temp) == 0) {
      recycled = &oldest;
    }  // else: write a new file, as when nothing is recycled
  }
  // A recycled publish that fails before any byte of the file changed gives
  // the file its name back (RENAME_NOREPLACE: never over another file), so
  // that the generation it holds is not lost; the directory is then fsynced,
  // best effort, so that the name comes back durably too. Should that rename
  // fail as well, the file is left under the temp name, and the error says so.
  // The rename comes first, before the error text is built: out of memory
  // for the text (bad_alloc) must not leave the generation under the temp
  // name, which the next open() removes as stale.
  auto put_back = [&](std::string_view step, const std::string& path, int err) -> Status {
    const int back = fs.rename_noreplace(temp, recycled->path);
    if (back == 0) (void)fsync_retrying_eintr(fs, dir_fd_);
    Status failure = io_error(step, path, err);
    if (back != 0) {
      return Status(failure.code(),
                    std::string(failure.message()) + "; then rename " + temp + " back to " +
                        recycled->path + ": " + errno_text(back) + " (generation " +
                        std::to_string(recycled->generation) + " is left in " + temp + ")");
    }
    return failure;
  };
  SysResult<int> fd{-1, 0};
  if (recycled == nullptr) {
    fd = fs.open(temp, O_CREAT | O_EXCL | O_WRONLY | O_NOFOLLOW | O_CLOEXEC, kFileMode);
    if (!fd.ok()) return io_error("open", temp, fd.error);  // not ours to remove (O_EXCL)
  } else {
    // The old name must be durably gone before its bytes change, so that a
    // power loss cannot bring it back over a half-rewritten file.
    if (int err = fsync_retrying_eintr(fs, dir_fd_); err != 0) return put_back("fsync dir", dir_, err);
    fd = fs.open(temp, O_WRONLY | O_NOFOLLOW | O_CLOEXEC, 0);
    if (!fd.ok()) return put_back("open", temp, fd.error);
  }
  ScopedFd closer(fs, fd.value);
  // Whether the temp file's bytes may differ from what it held when opened:
  // from the ftruncate of a recycled file on. Until then a failure gives a
  // recycled file its name back; from then on every failure removes the temp
  // file (the other generations were never touched).
  bool contents_changed = recycled == nullptr;
  auto fail = [&](std::string_view step, const std::string& path, int err) {
    if (closer.get() >= 0) (void)fs.close(closer.release());
    if (!contents_changed) return put_back(step, path, err);
    (void)fs.unlink(temp);
    return io_error(step, path, err);
  };
  if (int err = fs.fchmod(fd.value, kFileMode); err != 0) return fail("fchmod 0600", temp, err);
  if (recycled != nullptr) {
    // Its old length goes; the writes below overwrite the pages it keeps.
    contents_changed = true;
    if (int err = ftruncate_retrying_eintr(fs, fd.value, image.size()); err != 0) {
      return fail("ftruncate", temp, err);
    }
  }
  if (int err = write_all_with_writeback(fs, fd.value, image); err != 0) {
    return fail("write", temp, err);
  }
  if (int err = fsync_retrying_eintr(fs, fd.value); err != 0) return fail("fsync", temp, err);
  if (int err = fs.close(closer.release()); err != 0) return fail("close", temp, err);
  if (int err = fs.rename(temp, final_path); err != 0) {
    return fail("rename", temp + " to " + final_path, err);
  }
  if (Status s = sync_dir_fd(); !s.ok()) {
    // The new name may or may not be durable; take it back so that a failed
    // publish leaves no generation behind (best effort: were the machine to
    // lose power now, a complete, fsynced image might remain, which verifies).
    (void)fs.unlink(final_path);
    return s;
  }

  const std::uint64_t previous_good = known_good_;
  known_good_ = generation;
  // Retention. The image is durable already, so a failure here does not fail
  // the publish; the next publish prunes again. The generation known to
  // verify before this one stays whatever its rank (with keep > 1): newer
  // files that failed to verify would otherwise push it out, leaving no
  // older generation to fall back on; the directory then holds one more
  // file than keep until the next publish.
  bool pruned = false;
  const std::size_t keep_old = keep_ - 1;  // the new generation takes one slot
  const std::size_t listed = present->size() - (recycled != nullptr ? 1 : 0);  // it is gone
  for (std::size_t i = keep_old; i < listed; ++i) {
    if (keep_ > 1 && (*present)[i].generation == previous_good) continue;
    pruned = fs.unlink((*present)[i].path) == 0 || pruned;
  }
  // A failed fsync here leaves the unlinks to the next publish's directory
  // fsync: an older generation may come back after a power loss until then,
  // never preferred to the newer one that was acknowledged.
  if (pruned) (void)sync_dir_fd();
  return Status();
}

Status write_new_file(FileSystem& fs, const std::string& dir, const std::string& name,
                      std::uint64_t generation, std::span<const unsigned char> bytes) {
  const std::string temp = join(dir, temp_name(generation));
  const std::string path = join(dir, name);
  SysResult<int> fd = fs.open(temp, O_CREAT | O_EXCL | O_WRONLY | O_NOFOLLOW | O_CLOEXEC, kFileMode);
  if (!fd.ok()) return io_error("open", temp, fd.error);  // not ours to remove (O_EXCL)
  ScopedFd closer(fs, fd.value);
  auto fail = [&](std::string_view step, const std::string& where, int err) {
    if (closer.get() >= 0) (void)fs.close(closer.release());
    (void)fs.unlink(temp);
    return io_error(step, where, err);
  };
  if (int err = fs.fchmod(fd.value, kFileMode); err != 0) return fail("fchmod 0600", temp, err);
  if (int err = write_all(fs, fd.value, bytes); err != 0) return fail("write", temp, err);
  if (int err = fsync_retrying_eintr(fs, fd.value); err != 0) return fail("fsync", temp, err);
  if (int err = fs.close(closer.release()); err != 0) return fail("close", temp, err);
  int err = fs.rename_noreplace(temp, path);
  if (err == EINVAL || err == ENOSYS || err == EOPNOTSUPP) {
    SysResult<FileInfo> there = fs.lstat(path);
    err = there.ok() ? EEXIST : (there.error == ENOENT ? fs.rename(temp, path) : there.error);
  }
  if (err != 0) return fail("rename", temp + " to " + path, err);
  return sync_dir(fs, dir);
}

Status sync_directory(FileSystem& fs, const std::string& dir) { return sync_dir(fs, dir); }

void FileStore::note_verified(std::uint64_t generation) {
  std::lock_guard<std::mutex> guard(publish_mutex_);
  if (generation > known_good_) known_good_ = generation;
}

Result<std::vector<GenerationFile>> FileStore::list() const { return list_generations(dir_, *fs_); }

namespace {

// A generation file opened for reading, after every check of FileStore::read.
struct OpenedFile {
  int fd = -1;
  std::uint64_t size = 0;
  std::uint64_t device = 0;
  std::uint64_t inode = 0;
};

// After the bytes are in: kNotFound if `path` no longer names the file that
// was read. A running engine recycles its oldest generation (publish()
// renames that file away, then rewrites it): a reader that opened it before
// the rename may have read half-rewritten bytes, and the generation it asked
// for is gone, as if pruned. If the path still names the same file, the
// rename had not happened when the read ended, so neither had any rewrite.
// Only a name that is gone (ENOENT) or names another file says so: any other
// lstat failure (EIO, ESTALE, ENOMEM, EACCES) is an I/O error, which recovery
// reports as a skipped file instead of passing over it as pruned (it could be
// the newest durable generation).
Status still_named(const std::string& path, const OpenedFile& opened, FileSystem& fs) {
  SysResult<FileInfo> now = fs.lstat(path);
  if (!now.ok() && now.error != ENOENT) return io_error("lstat", path, now.error);
  if (now.ok() && now.value.device == opened.device && now.value.inode == opened.inode) {
    return Status();
  }
  return Status(StatusCode::kNotFound,
                "snapshot file " + path + " was replaced while it was read (a newer generation "
                                          "reused it)");
}

Result<OpenedFile> open_for_read(const std::string& path, std::uint64_t max_bytes, FileSystem& fs) {
  // lstat first so that a FIFO or a device is never even opened (opening
  // some devices has effects); the open below repeats every check on the
  // descriptor itself, and O_NONBLOCK keeps a FIFO swapped in meanwhile from
  // blocking the open.
  SysResult<FileInfo> info = fs.lstat(path);
  if (!info.ok()) {
    if (info.error == ENOENT) {
      return Status(StatusCode::kNotFound, "snapshot file " + path + ": " + errno_text(ENOENT));
    }
    return io_error("lstat", path, info.error);
  }
  if (info.value.kind == FileInfo::Kind::kSymlink) {
    return Status(StatusCode::kInvalidArgument,
                  "snapshot file " + path + " is a symlink; refusing to follow it");
  }
  if (info.value.kind != FileInfo::Kind::kRegular) {
    return Status(StatusCode::kInvalidArgument, "snapshot file " + path +
                                                    " is not a regular file (it is " +
                                                    kind_text(info.value.kind) + ")");
  }

  SysResult<int> fd = fs.open(path, O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK | O_NOCTTY, 0);
  if (!fd.ok()) {
    if (fd.error == ELOOP) {
      return Status(StatusCode::kInvalidArgument,
                    "snapshot file " + path + " is a symlink; refusing to follow it");
    }
    if (fd.error == ENOENT) {
      return Status(StatusCode::kNotFound, "snapshot file " + path + ": " + errno_text(ENOENT));
    }
    return io_error("open", path, fd.error);
  }
  ScopedFd closer(fs, fd.value);
  SysResult<FileInfo> st = fs.fstat(fd.value);
  if (!st.ok()) return io_error("fstat", path, st.error);
  if (st.value.kind != FileInfo::Kind::kRegular) {
    return Status(StatusCode::kInvalidArgument, "snapshot file " + path +
                                                    " is not a regular file (it is " +
                                                    kind_text(st.value.kind) + ")");
  }
  if (st.value.size > max_bytes) {
    return Status(StatusCode::kInvalidArgument,
                  "snapshot file " + path + " is " + std::to_string(st.value.size) +
                      " bytes, more than the limit of " + std::to_string(max_bytes));
  }

  return OpenedFile{closer.release(), st.value.size, st.value.device, st.value.inode};
}

}  // namespace

Result<std::vector<unsigned char>> FileStore::read(const std::string& path, std::uint64_t max_bytes,
                                                   FileSystem& fs) {
  Result<OpenedFile> opened = open_for_read(path, max_bytes, fs);
  if (!opened) return opened.status();
  ScopedFd closer(fs, opened->fd);
  const int fd_value = opened->fd;
  std::vector<unsigned char> bytes(static_cast<std::size_t>(opened->size));
  std::size_t done = 0;
  int interrupted = 0;  // EINTRs in a row
  while (done < bytes.size()) {
    SysResult<std::size_t> r = fs.read(fd_value, bytes.data() + done, bytes.size() - done);
    if (!r.ok()) {
      if (r.error == EINTR && ++interrupted < kMaxEintrRetries) continue;
      return io_error("read", path, r.error);
    }
    interrupted = 0;
    if (r.value == 0) {
      // Recycled under us (still_named) is "gone"; shrunk in place is an error.
      if (Status s = still_named(path, *opened, fs); !s.ok()) return s;
      return Status(StatusCode::kIoError, "read " + path + ": file shrank to " +
                                              std::to_string(done) + " of " +
                                              std::to_string(bytes.size()) + " bytes while read");
    }
    done += r.value;
  }
  if (Status s = still_named(path, *opened, fs); !s.ok()) return s;
  // The descriptor was only read: a close error loses nothing.
  return bytes;
}

Result<detail::ImageBytes> FileStore::map(const std::string& path, std::uint64_t max_bytes,
                                          FileSystem& fs) {
  Result<OpenedFile> opened = open_for_read(path, max_bytes, fs);
  if (!opened) return opened.status();
  ScopedFd closer(fs, opened->fd);
  if (opened->size == 0) return detail::ImageBytes(std::vector<unsigned char>());  // mmap refuses 0
  int interrupted = 0;  // EINTRs in a row
  for (;;) {
    SysResult<const void*> m = fs.map_read(opened->fd, static_cast<std::size_t>(opened->size));
    if (m.ok()) {
      // The mapping outlives the descriptor; a close error loses nothing.
      detail::ImageBytes bytes =
          detail::ImageBytes::adopt_mapping(m.value, static_cast<std::size_t>(opened->size));
      if (Status s = still_named(path, *opened, fs); !s.ok()) return s;
      bytes.populate_in_background();
      return bytes;
    }
    if (m.error == EINTR && ++interrupted < kMaxEintrRetries) continue;
    return io_error("mmap", path, m.error);
  }
}

Result<std::vector<GenerationFile>> list_generations(const std::string& dir_arg, FileSystem& fs) {
  const std::string dir = strip_trailing_slashes(dir_arg);
  SysResult<std::vector<std::string>> names = fs.list_dir(dir);
  if (!names.ok()) return io_error("list", dir, names.error);
  std::vector<GenerationFile> out;
  for (const std::string& name : names.value) {
    std::uint64_t generation = 0;
    if (!parse_generation_name(name, &generation)) continue;
    GenerationFile file;
    file.generation = generation;
    file.path = join(dir, name);
    SysResult<FileInfo> info = fs.lstat(file.path);
    if (!info.ok()) {
      if (info.error == ENOENT) continue;  // pruned meanwhile
      return io_error("lstat", file.path, info.error);
    }
    // Only regular files are generations; read() would refuse anything else.
    if (info.value.kind != FileInfo::Kind::kRegular) continue;
    file.bytes = info.value.size;
    out.push_back(std::move(file));
  }
  std::sort(out.begin(), out.end(), [](const GenerationFile& a, const GenerationFile& b) {
    return a.generation > b.generation;
  });
  return out;
}

}  // namespace jobengine::persist
