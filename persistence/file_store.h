// FileStore: the disk half of persistence. A directory of snapshot
// generations, published atomically and durably, one engine at a time.
//
// Directory layout (created 0700 whatever the umask):
//   LOCK                          flock()ed by the owning engine (released when it dies)
//   gen-<20-digit generation>.jobsnap   one snapshot image each (0600)
//   .tmp-<20-digit generation>-<pid>    a publish in progress (removed on failure / at open)
//   LIVE                          the engine's live record (live_record.h), 0600; not a
//                                 snapshot: FileStore neither lists nor prunes it
//
// Publish protocol (design.md "Atomic publish"): create the temp file in the
// same directory with O_CREAT|O_EXCL|O_NOFOLLOW|O_CLOEXEC, mode 0600 (fchmod,
// whatever the umask); write all bytes (short writes and EINTR continue, up
// to 1000 EINTRs in a row; any other error fails), asking the kernel to start
// writing each 8 MiB to the device as soon as it is copied (sync_file_range
// SYNC_FILE_RANGE_WRITE: advice, durability still comes from the fsync);
// fsync the file (EINTR retried the same way); close it; rename it to its
// final name; fsync the directory (through a descriptor the store holds open
// from open() on, never reopened by name); only then return OK. On any failure the
// temp file is removed, the previous generations still verify, and the
// error (kIoError) names the step ("write", "fsync", "close", "rename",
// "fsync dir", ...), the path and the errno text; nothing is retried silently
// (an fsync error in particular is never retried: Linux may have dropped the
// dirty pages). If the directory fsync fails, the renamed file is unlinked
// again, so a failed publish leaves no new generation behind unless the
// machine loses power at that instant (it would then be a complete image).
// After a successful publish, generations beyond `keep` (oldest first) are
// deleted and the directory is fsynced again; a failure there does not fail
// the publish (the new image is durable) and the next publish prunes again.
// With keep > 1 the generation known to verify before the publish is never
// deleted by it, even when newer files that failed to verify outrank it.
//
// Recycling. When the directory already holds `keep` generations (and at
// least 2), the publish would delete the oldest right after writing the new
// one. Instead that file becomes the temp file: renamed to the temp name with
// RENAME_NOREPLACE (which, like O_EXCL, fails if that name exists, a symlink
// included), the directory fsynced (so that a power loss cannot bring the old
// name back over half-rewritten bytes), reopened O_WRONLY|O_NOFOLLOW,
// truncated to the new size and overwritten, then fsynced and renamed as
// above. This skips deleting a file as large as the image (~28 ms for 140 MB
// here: the kernel frees every page-cache page of it) and writes into pages
// the page cache already holds instead of fresh ones; with the writeback
// above, a 1M-job (140 MB) snapshot_now() went from ~190 to ~130 ms. A
// failure before any byte of the file changed (the directory fsync after the
// rename, the open, the fchmod) renames it back to its generation's name
// (RENAME_NOREPLACE) and fsyncs the directory, best effort: that generation
// stays. (Were that rename to fail too, the error says so and names the temp
// file holding it, which the next open() removes as stale.) The one
// difference a later failure (from the ftruncate on) makes: the oldest
// generation, which this publish was about to delete, is already gone, so
// keep - 1 generations remain (never fewer than one: the only generation is
// never recycled). So a file is
// recycled only while another generation in the directory is known to verify
// (one this store published, or the one recovery loaded: note_verified()):
// were the newer files all damaged, rewriting the oldest and failing would
// leave no generation that loads. Until then the publish writes a new file.
// A file with more than one link (say an operator's hard-linked backup) is
// never recycled, and if the rename to the temp name fails the publish writes
// a new file instead.
//
// All files of the store are opened O_CLOEXEC through the injected
// FileSystem. open() resolves the directory once to its absolute, canonical
// path (realpath): every later publish, list and error names files by that
// path, so a relative directory keeps naming the same one after the process
// chdir()s. The paths a store reports are that path + "/" + name.
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "engine/persistence_hooks.h"  // ImageBytes
#include "jobengine/status.h"
#include "persistence/file_system.h"

namespace jobengine::persist {

// The words of open()'s refusal of a directory holding generation 2^64 - 1
// (the last number: nothing can be published above it), which jobsnap maps
// to its "refused" exit status.
inline constexpr std::string_view kLastGenerationWords = "the highest a snapshot can have";

struct GenerationFile {
  std::uint64_t generation = 0;
  std::string path;  // dir + "/" + name (FileStore: dir absolute and canonical)
  std::uint64_t bytes = 0;
};

class FileStore {
 public:
  // Creates `dir` (0700) if missing (only the last component; the parent's
  // entry is fsynced), refuses a dir that is a symlink or not a directory
  // (kInvalidArgument naming it) or that another uid owns
  // (kFailedPrecondition), fixes its mode to 0700, takes an exclusive flock
  // on dir/LOCK (non-blocking): a second store on the same directory, in this
  // or another process, gets kFailedPrecondition "another engine holds <dir>"
  // and then, holding the lock, removes stale temp files. The directory is
  // resolved to its absolute, canonical path (dir() returns it) and held
  // open for fsyncs. A directory holding a generation numbered 2^64 - 1
  // (gen-18446744073709551615.jobsnap: no generation can follow it, so every
  // publish would fail) is refused, kInvalidArgument naming that file, before
  // LOCK is made. `keep` >= 1
  // generations are retained (0 is kInvalidArgument). `fs` is the file layer
  // (PosixFileSystem by default; tests inject faults). The lock lives as long
  // as the LOCK descriptor: a fork()ed child that has not exec'd shares it.
  static Result<std::unique_ptr<FileStore>> open(const std::string& dir, unsigned keep,
                                                 std::shared_ptr<FileSystem> fs = nullptr);
  ~FileStore();  // releases the lock
  FileStore(const FileStore&) = delete;
  FileStore& operator=(const FileStore&) = delete;

  // Durably publishes `image` as generation `generation`, which must be
  // greater than every generation in the directory (else kInvalidArgument,
  // nothing written). kIoError on failure (see above). Thread-safe:
  // concurrent publishes are serialized.
  Status publish(std::uint64_t generation, std::span<const unsigned char> image);

  // Says that generation `generation`, in the directory, verified (recovery
  // loaded it), so that the next publish may recycle an older file
  // ("Recycling" above). Thread-safe.
  void note_verified(std::uint64_t generation);

  // The generation files present, newest first: regular files named exactly
  // gen-<20 digits>.jobsnap, with their sizes (temp files and other names
  // excluded). kIoError if the directory cannot be listed. Thread-safe.
  Result<std::vector<GenerationFile>> list() const;

  // Reads one generation file: opened O_RDONLY|O_NOFOLLOW|O_CLOEXEC, must be a
  // regular file no larger than `max_bytes`. Errors name the path: kNotFound
  // if it does not exist, or if the path no longer names the file read once
  // the read ends (recycled by a publish meanwhile: "was replaced while it was
  // read"); kInvalidArgument for a symlink ("is a symlink"), a directory, FIFO
  // or device ("not a regular file"; never opened, so never blocks) or an
  // over-size file (its size); kIoError for a failed call. Modifies nothing.
  // Thread-safe; safe beside a running engine (no lock needed).
  static Result<std::vector<unsigned char>> read(const std::string& path, std::uint64_t max_bytes,
                                                 FileSystem& fs);
  // The same file, the same checks and errors, mapped read-only instead of
  // read (FileSystem::map_read; kIoError "mmap <path>: ..." if that fails):
  // what recovery uses, since a mapping of a file in the page cache costs
  // ~1% of reading it into fresh memory. Only for a caller that holds the
  // directory's lock (the engine, from open() to start()): a generation file
  // is rewritten only by a publish that recycles it, and publishing takes that
  // lock, so nothing rewrites or truncates a file while the lock holder has it
  // mapped. As with leveldb's mmap'd tables, truncating one by hand meanwhile
  // would fault the engine (SIGBUS). Like read(), kNotFound if the path no
  // longer names the mapped file once mapped.
  static Result<detail::ImageBytes> map(const std::string& path, std::uint64_t max_bytes,
                                        FileSystem& fs);

  const std::string& dir() const noexcept { return dir_; }

 private:
  FileStore(std::string dir, unsigned keep, std::shared_ptr<FileSystem> fs, int lock_fd,
            int dir_fd);
  // fsync of the directory through dir_fd_; kIoError "fsync dir <dir_>: ...".
  Status sync_dir_fd();
  std::string dir_;  // absolute and canonical (realpath at open)
  unsigned keep_;
  std::shared_ptr<FileSystem> fs_;
  int lock_fd_;
  int dir_fd_;  // the directory, O_RDONLY|O_DIRECTORY, for its fsyncs
  std::mutex publish_mutex_;
  // A generation known to verify: the last one published here, or the one
  // note_verified() named; 0 none. Under publish_mutex_.
  std::uint64_t known_good_ = 0;
};

// Lists generation files of a directory without locking it (for recovery
// and read-only tools). Newest first; same rules as FileStore::list().
Result<std::vector<GenerationFile>> list_generations(const std::string& dir, FileSystem& fs);

// Writes `bytes` durably as the new file dir/name, never replacing one:
// publish()'s protocol without its ordering and retention rules, for tools
// that keep an image outside the generation order (jobsnap keeps a segment's
// image it is about to replace). A temp file named as publish() names it for
// `generation` (so an engine's next open removes one a crash left behind),
// every byte, fsync, close, a rename that refuses to replace (checked first
// where the file system has no RENAME_NOREPLACE: the caller holds the
// directory), fsync of the directory. kIoError "<step> <path>: <errno text>";
// on failure the temp file is removed and nothing else has changed.
Status write_new_file(FileSystem& fs, const std::string& dir, const std::string& name,
                      std::uint64_t generation, std::span<const unsigned char> bytes);

// Makes `dir`'s entries (creations, renames, unlinks) durable: fsync of the
// directory, EINTR retried as everywhere here.
Status sync_directory(FileSystem& fs, const std::string& dir);

}  // namespace jobengine::persist
