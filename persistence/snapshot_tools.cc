// Snapshot operations for tools: see jobengine/snapshot_tools.h.
//
// Built on the stores (FileStore, ShmStore) and the engine's own recovery
// choice (persist::load_newest, recovery.h): nothing here re-implements the
// format, the publish protocol or the loader.
#include "jobengine/snapshot_tools.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <climits>
#include <cstdio>
#include <ctime>
#include <functional>
#include <map>
#include <new>
#include <set>
#include <utility>

#include "persistence/file_store.h"
#include "persistence/file_system.h"
#include "persistence/recovery.h"
#include "persistence/shm_store.h"

namespace jobengine::snapshot_tools {
namespace {

using persist::FileInfo;
using persist::SysResult;

// A write keeps every generation: retention is the engine's business.
constexpr unsigned kKeepAll = UINT_MAX;

Status fail(Diagnosis* d, Failure failure, Status status) {
  if (d != nullptr) *d = Diagnosis{failure, false, 0};
  return status;
}

Status fail(Diagnosis* d, Failure failure, StatusCode code, std::string message) {
  return fail(d, failure, Status(code, std::move(message)));
}

Failure failure_of_decode(snapshot::Problem problem) {
  switch (problem) {
    case snapshot::Problem::kTruncated: return Failure::kTruncated;
    case snapshot::Problem::kUnsupportedVersion: return Failure::kUnsupportedVersion;
    case snapshot::Problem::kCorrupt:
    case snapshot::Problem::kNone: break;
  }
  return Failure::kCorrupt;
}

// FileStore::read's codes (file_store.h).
Failure failure_of_file_read(const Status& s) {
  switch (s.code()) {
    case StatusCode::kNotFound: return Failure::kNotFound;
    case StatusCode::kInvalidArgument: return Failure::kRefusedInput;
    default: return Failure::kIoError;
  }
}

// ShmStore::read_existing's and open_or_create's codes (shm_store.h). Both
// say kFailedPrecondition for four different things, which their messages
// tell apart (a segment name is [A-Za-z0-9._-], so it cannot fake them):
//  - a held writer lock ("another engine is writing"): locked;
//  - a reader that gave up because the writer rewrote the slot during every
//    copy ("gave up after N attempts"): an engine is writing it, locked too;
//  - a control block of another layout version: written by another build,
//    the segment's counterpart of a newer format version;
//  - a segment that is not ours (type, owner, mode): refused input.
Failure failure_of_shm(const Status& s) {
  switch (s.code()) {
    case StatusCode::kNotFound: return Failure::kNotFound;
    case StatusCode::kInvalidArgument: return Failure::kUsage;
    case StatusCode::kCorruption: return Failure::kCorrupt;
    case StatusCode::kFailedPrecondition: {
      const std::string_view m = s.message();
      if (m.find("another engine") != std::string_view::npos) return Failure::kLocked;
      if (m.find("gave up after") != std::string_view::npos) return Failure::kLocked;
      if (m.find("layout version") != std::string_view::npos) return Failure::kUnsupportedVersion;
      return Failure::kRefusedInput;
    }
    default: return Failure::kIoError;
  }
}

// A segment the engine could not open, or that could not be read, as
// opposed to an image in it that does not verify (which recovery skips):
// not ours (type, owner, mode), another layout version, or a writer that
// overtook every copy. ShmStore says kFailedPrecondition for exactly these.
// An engine's open() fails on the first two, so a tool that passed over the
// segment would name a disk generation as the one the next start loads.
// Also kInvalidArgument, a name the store refuses (read_existing says it
// for nothing else): the engine refuses to open with it at all, so it is a
// usage error, never a segment to pass over. check_shm_name() catches such
// a name first; this keeps the store's own check the last word.
bool shm_unusable(const Status& s) {
  return s.code() == StatusCode::kFailedPrecondition || s.code() == StatusCode::kInvalidArgument;
}

persist::FileSystem& fs() { return *persist::default_file_system(); }

std::string generation_path(const std::string& dir, std::uint64_t generation) {
  char name[64];
  std::snprintf(name, sizeof name, "/gen-%020llu.jobsnap",
                static_cast<unsigned long long>(generation));
  return dir + name;
}

const char* kind_text(FileInfo::Kind kind) {
  switch (kind) {
    case FileInfo::Kind::kRegular: return "a regular file";
    case FileInfo::Kind::kDirectory: return "a directory";
    case FileInfo::Kind::kSymlink: return "a symlink";
    case FileInfo::Kind::kFifo: return "a FIFO";
    case FileInfo::Kind::kOther: return "a device or socket";
  }
  return "of unknown type";
}

std::uint32_t effective_uid() { return static_cast<std::uint32_t>(::geteuid()); }

// How an operator runs jobsnap as `uid`, for messages that tell them to.
std::string run_as(std::uint32_t uid) {
  return "sudo -u '#" + std::to_string(uid) + "' jobsnap ...";
}

// Whether the OS lets this process access `path` in `mode` (R_OK, X_OK),
// judged by its effective ids as the open that follows will be. Only a
// refusal (EACCES, EPERM) is a no: any other failure is left to that open
// to report.
bool permitted(const std::string& path, int mode) {
  if (::faccessat(AT_FDCWD, path.c_str(), mode, AT_EACCESS) == 0) return true;
  return errno != EACCES && errno != EPERM;
}

// Why the OS refuses this process `path` (a snapshot directory or a file in
// one), when another uid's permissions are the reason: the first directory
// on the way that it may not search, else `path` itself when it may not read
// it (list and search, for a directory), with its owner and mode, and how
// to run jobsnap as that owner (an engine runs as its directory's owner, so
// the owner can read what it wrote). Empty when nothing refuses, or what
// refuses is this uid's own: running as its owner would change nothing.
std::string permission_hint(const std::string& path) {
  std::string refused;
  struct stat st{};
  // Each directory above `path`, outermost first; "/" and "." are searched
  // by every process that got this far. stat, not lstat: the kernel follows
  // a symlink on the way, and judges the directory it leads to.
  for (std::size_t slash = path.find('/', 1); slash != std::string::npos;
       slash = path.find('/', slash + 1)) {
    const std::string above = path.substr(0, slash);
    if (above.ends_with('/')) continue;  // "a//b"
    if (::stat(above.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) return "";
    if (!permitted(above, X_OK)) {
      refused = above;
      break;
    }
  }
  if (refused.empty()) {
    if (::stat(path.c_str(), &st) != 0) return "";
    if (permitted(path, S_ISDIR(st.st_mode) ? R_OK | X_OK : R_OK)) return "";
    refused = path;
  }
  const std::uint32_t euid = effective_uid();
  if (st.st_uid == euid) return "";
  return "; " + refused + " is owned by uid " + std::to_string(st.st_uid) + " with mode " +
         persist::octal_mode(st.st_mode) + ", which this process (uid " + std::to_string(euid) +
         ") may not " + (refused == path ? "read" : "search") +
         ": run jobsnap as its owner, e.g. " + run_as(st.st_uid);
}

// What a command does with a snapshot directory (jobsnap.md, "Read commands
// never change anything").
enum class Access {
  // list, inspect, dump, verify, diff: read only, no lock. Any uid's
  // directory, as far as the OS lets this process read it.
  kRead,
  // restore, requeue, drop: lock, create, rename. Only this uid's directory:
  // the engine runs as the directory's owner (FileStore::open requires it)
  // and must be able to open every file and the LOCK made there, which
  // another uid's would be.
  kWrite,
};

// An existing snapshot directory: not a symlink, a directory, and for
// kWrite owned by this uid (FileStore::open's own checks, made first so
// that its kFailedPrecondition can only mean the lock); for kRead one that
// the OS lets this process list and search. Reads nothing inside it.
// A directory a write command is to create (restore's target): refused when
// root would make it inside another uid's directory. It would be root's, and
// the engine that uses it, running as that uid (the one that keeps its
// snapshots there), could not open it.
Status check_new_dir(const std::string& dir, Diagnosis* d) {
  const std::uint32_t euid = effective_uid();
  if (euid != 0) return Status();  // it becomes this uid's, as the engine's own would
  const std::size_t slash = dir.find_last_of('/');
  const std::string parent = slash == std::string::npos ? "." : slash == 0 ? "/" : dir.substr(0, slash);
  SysResult<FileInfo> info = fs().lstat(parent);
  if (!info.ok() || info.value.kind != FileInfo::Kind::kDirectory || info.value.uid == euid) {
    return Status();  // the creation reports anything else
  }
  return fail(d, Failure::kRefusedInput, StatusCode::kFailedPrecondition,
              "snapshot directory " + dir + " does not exist, and this command would make it in " +
                  parent + ", which uid " + std::to_string(info.value.uid) +
                  " owns: it would be uid 0's, and an engine running as uid " +
                  std::to_string(info.value.uid) +
                  " could not open it. Run jobsnap as that user: " + run_as(info.value.uid));
}

Status check_dir(const std::string& dir_arg, Access access, Diagnosis* d, bool must_exist = true) {
  const std::string dir = persist::strip_trailing_slashes(dir_arg);
  SysResult<FileInfo> info = fs().lstat(dir);
  if (!info.ok()) {
    if (info.error == ENOENT && !must_exist) {
      return access == Access::kWrite ? check_new_dir(dir, d) : Status();
    }
    if (info.error == ENOENT) {
      return fail(d, Failure::kNotFound, StatusCode::kNotFound,
                  "snapshot directory " + dir + " does not exist");
    }
    return fail(d, Failure::kIoError, StatusCode::kIoError,
                "lstat " + dir + ": " + persist::errno_text(info.error) + permission_hint(dir));
  }
  if (info.value.kind == FileInfo::Kind::kSymlink) {
    return fail(d, Failure::kRefusedInput, StatusCode::kInvalidArgument,
                "snapshot directory " + dir + " is a symlink; refusing to follow it");
  }
  if (info.value.kind != FileInfo::Kind::kDirectory) {
    return fail(d, Failure::kRefusedInput, StatusCode::kInvalidArgument,
                "snapshot directory " + dir + " is not a directory (it is " +
                    kind_text(info.value.kind) + ")");
  }
  const std::uint32_t owner = info.value.uid;
  const std::uint32_t euid = effective_uid();
  if (access == Access::kRead) {
    // Said here, naming the owner, rather than as the listing's bare EACCES.
    if (!permitted(dir, R_OK | X_OK)) {
      return fail(d, Failure::kIoError, StatusCode::kIoError,
                  "cannot read snapshot directory " + dir + ": " + persist::errno_text(EACCES) +
                      permission_hint(dir));
    }
    return Status();
  }
  if (owner != euid) {
    return fail(d, Failure::kRefusedInput, StatusCode::kFailedPrecondition,
                "snapshot directory " + dir + " is owned by uid " + std::to_string(owner) +
                    ", not by this process's uid " + std::to_string(euid) +
                    ", and this command writes there: the engine that uses it runs as its "
                    "owner and could not open files or a LOCK that uid " +
                    std::to_string(euid) + " made there. Run jobsnap as the directory's owner: " +
                    run_as(owner) + " (read commands, such as list and inspect, run as any uid)");
  }
  return Status();
}

// Whose segment a read command takes (jobsnap.md, "Read commands never
// change anything"): the one an engine's open() would take. With a
// directory, the engine runs as the directory's owner (see Access::kWrite),
// so its segment is that uid's. With a segment alone, this process's uid's,
// as its own engine's; root, which cannot know as whom the engine runs,
// takes any uid's. Mode 0600 and a regular file are required either way.
std::uint32_t segment_owner(const std::string& dir) {
  if (!dir.empty()) {
    SysResult<FileInfo> info = fs().lstat(persist::strip_trailing_slashes(dir));
    // Anything else is refused by check_dir(), before or after the segment.
    if (info.ok() && info.value.kind == FileInfo::Kind::kDirectory) return info.value.uid;
  }
  const std::uint32_t euid = effective_uid();
  return euid == 0 ? persist::ShmStore::kAnyOwner : euid;
}

// A segment a read command could not read (read_existing() with `owner`,
// from segment_owner(dir)), with its class (failure_of_shm, taken from the
// store's own message before anything is added to it). When another uid's
// segment is refused, the message says why in jobsnap's terms: beside a
// directory not its owner's, that the directory's engine would refuse it
// too; else (refused as not this uid's, or by the OS), who can read it,
// when its mode is right (else its owner would be refused too).
Status segment_failure(const std::string& name, const Status& s, std::uint32_t owner,
                       const std::string& dir, Diagnosis* d) {
  const Failure failure = failure_of_shm(s);
  std::string why;
  SysResult<FileInfo> info = fs().lstat("/dev/shm/" + name);
  if (s.code() == StatusCode::kFailedPrecondition && owner != persist::ShmStore::kAnyOwner &&
      info.ok() && info.value.kind == FileInfo::Kind::kRegular) {
    const std::uint32_t uid = info.value.uid;
    if (!dir.empty() && uid != owner) {
      why = "; an engine using " + dir + " runs as the directory's owner, uid " +
            std::to_string(owner) + ", and opens only a segment of its own";
    } else if (uid != effective_uid() && info.value.mode == 0600) {
      why = "; run jobsnap as its owner, e.g. " + run_as(uid) + ", or as root";
    }
  }
  return fail(d, failure, Status(s.code(), std::string(s.message()) + why));
}

// shm_open() follows no symlink but would block opening a FIFO and open a
// device: look at the name first. OK when it does not exist (the store says
// kNotFound itself; with `must_exist`, kNotFound here) or is a regular file
// (the store checks owner and mode).
Status check_shm_entry(const std::string& name, Diagnosis* d, bool must_exist = false) {
  if (Status s = check_shm_name(name); !s.ok()) return fail(d, Failure::kUsage, s);
  const std::string path = "/dev/shm/" + name;
  SysResult<FileInfo> info = fs().lstat(path);
  if (!info.ok()) {
    if (must_exist && info.error == ENOENT) {
      return fail(d, Failure::kNotFound, StatusCode::kNotFound,
                  "shm segment '" + name + "' (" + path +
                      ") does not exist: check the name, or leave out --shm if the engine "
                      "runs without a segment");
    }
    return Status();
  }
  if (info.value.kind != FileInfo::Kind::kRegular) {
    return fail(d, Failure::kRefusedInput, StatusCode::kFailedPrecondition,
                "shm segment '" + name + "' (" + path + ") is " + kind_text(info.value.kind) +
                    ", not a segment: refusing to open it");
  }
  return Status();
}

std::uint64_t get64le(const unsigned char* p) {
  std::uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

// FileStore::read allocates the whole file before a byte of it is checked,
// and any file up to kMaxFileBytes passes its size check: one sparse 40 GiB
// file of zeros in a directory made every command fail for want of memory
// (std::bad_alloc), where the engine, which maps its files, passes over it
// as corrupt. The decoder's first reading rules (FORMAT.md 1-3: magic,
// version, header checksum, counts, and that the size the header gives is
// the file's) need only the header and the file's size, so they run first,
// on the header alone: a file is read whole only when its verified header
// says exactly its size. A failure is the one snapshot::decode() reports on
// the whole file (class, offset, message). OK also when the file cannot be
// looked at (missing, not a regular file, over the limit): the read that
// follows says why, as before.
Status check_size_against_header(const std::string& path, Diagnosis* d) {
  constexpr std::uint64_t kFrame = snapshot::kHeaderBytes + snapshot::kTrailerBytes;
  persist::FileSystem& f = fs();
  SysResult<FileInfo> info = f.lstat(path);
  if (!info.ok() || info.value.kind != FileInfo::Kind::kRegular) return Status();
  const std::uint64_t size = info.value.size;
  if (size < kFrame || size > kMaxFileBytes) return Status();  // cheap to read, or refused by size
  // O_NONBLOCK: a FIFO swapped in since the lstat must not block the open.
  SysResult<int> fd = f.open(path, O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK | O_NOCTTY, 0);
  if (!fd.ok()) return Status();
  std::vector<unsigned char> probe(kFrame + 1, 0);
  std::size_t got = 0;
  SysResult<FileInfo> opened = f.fstat(fd.value);
  if (opened.ok() && opened.value.kind == FileInfo::Kind::kRegular && opened.value.size == size) {
    int interrupted = 0;
    while (got < snapshot::kHeaderBytes) {
      SysResult<std::size_t> r = f.read(fd.value, probe.data() + got, snapshot::kHeaderBytes - got);
      if (!r.ok() && r.error == EINTR && ++interrupted < persist::kMaxEintrRetries) continue;
      if (!r.ok() || r.value == 0) break;
      got += r.value;
    }
  }
  (void)f.close(fd.value);  // only read: a close error loses nothing
  if (got < snapshot::kHeaderBytes) return Status();  // changed under us: the read says how
  const std::uint64_t body = get64le(probe.data() + 64);  // body_bytes (FORMAT.md, header)
  if (body <= size - kFrame && kFrame + body == size) return Status();  // as large as it says
  // The size rule fails on the whole file; the header's own rules come
  // before it. The probe, the header and an empty body, fails the size rule
  // too (body > 0: shorter than it says; body 0: one byte longer), at an
  // offset >= 96, after all of the header's own rules, which it shares with
  // the whole file: a failure before offset 96 is the whole file's.
  probe.resize(body == 0 ? kFrame + 1 : kFrame);
  snapshot::DecodeError err;
  auto view = snapshot::decode(probe, &err);
  if (!view && err.offset < snapshot::kHeaderBytes) {
    if (d != nullptr) *d = Diagnosis{failure_of_decode(err.problem), true, err.offset};
    return view.status();
  }
  // The size rule itself, in the decoder's words (snapshot_format.cc, rule 3).
  const auto said = [](snapshot::Problem problem, std::uint64_t offset, const std::string& what) {
    return std::string(snapshot::problem_name(problem)) + " at offset " + std::to_string(offset) +
           ": " + what;
  };
  if (body > size - kFrame) {
    if (d != nullptr) *d = Diagnosis{Failure::kTruncated, true, size};
    return Status(StatusCode::kCorruption,
                  said(snapshot::Problem::kTruncated, size,
                       "header says " + std::to_string(kFrame + body) + " bytes, image has " +
                           std::to_string(size)));
  }
  if (d != nullptr) *d = Diagnosis{Failure::kCorrupt, true, kFrame + body};
  return Status(StatusCode::kCorruption,
                said(snapshot::Problem::kCorrupt, kFrame + body,
                     std::to_string(size - (kFrame + body)) + " trailing bytes after the trailer"));
}

// Recovery's choice (persist::load_newest) over `files`, less those whose
// header refuses them already (check_size_against_header): recovery reads
// each candidate whole (a tool holds no lock, so it cannot map them), and
// would run out of memory on such a file where the engine passes over it.
// A file left out is reported skipped where recovery would report it: when
// it is newer than the image loaded, or nothing was. Out of memory anyway
// (a file as large as its header says, too large for this machine's
// memory): kIoError, never an exception.
Result<std::unique_ptr<detail::LoadedSnapshot>> recover(
    persist::ShmCandidate* shm, std::span<const persist::GenerationFile> files,
    RecoveryReport& report, std::size_t* gone = nullptr) {
  std::vector<persist::GenerationFile> readable;
  std::vector<std::pair<std::uint64_t, SkippedSnapshot>> refused;
  std::map<std::string, std::uint64_t> generation_of;
  for (const auto& f : files) {
    generation_of[f.path] = f.generation;
    Diagnosis why;
    if (Status s = check_size_against_header(f.path, &why); !s.ok()) {
      refused.push_back(
          {f.generation, SkippedSnapshot{f.path, why.offset, std::string(s.message())}});
    } else {
      readable.push_back(f);
    }
  }
  std::unique_ptr<detail::LoadedSnapshot> loaded;
  Status unreadable;
  try {
    loaded = persist::load_newest(shm, readable, fs(), report, false, gone, &unreadable);
  } catch (const std::bad_alloc&) {
    return Status(StatusCode::kIoError,
                  "out of memory reading a snapshot to choose the newest that verifies");
  }
  // A candidate that could not be read (not one that failed to verify): an
  // I/O error naming it, as Engine::open() fails, never an older generation.
  if (!unreadable.ok()) return unreadable;
  if (refused.empty()) return loaded;
  for (auto& [generation, skipped] : refused) {
    if (!loaded || generation > report.generation) report.skipped.push_back(std::move(skipped));
  }
  // Recovery's order: the segment's (tried first), then the files newest first.
  auto rank = [&](const SkippedSnapshot& s) {
    auto it = generation_of.find(s.source);
    return it == generation_of.end() ? UINT64_MAX : it->second;
  };
  std::stable_sort(
      report.skipped.begin(), report.skipped.end(),
      [&](const SkippedSnapshot& a, const SkippedSnapshot& b) { return rank(a) > rank(b); });
  return loaded;
}

// What taking a directory's lock changes there (FileStore::open makes its
// LOCK file and sets its mode to 0700), as it was before, so that a write
// that is refused, or fails before it publishes, puts it back: a refused
// command leaves nothing behind.
struct DirBefore {
  bool lock_existed = false;
  std::optional<std::uint32_t> mode;  // when the directory existed

  static DirBefore of(const std::string& dir) {
    DirBefore b;
    b.lock_existed = fs().lstat(dir + "/LOCK").ok();
    if (const SysResult<FileInfo> info = fs().lstat(dir); info.ok()) b.mode = info.value.mode;
    return b;
  }
  // Under the directory's lock, before it is let go.
  void put_back(const std::string& dir) const {
    if (!lock_existed) (void)fs().unlink(dir + "/LOCK");
    if (mode && *mode != 0700) (void)fs().chmod(dir, *mode);
  }
};

Result<std::unique_ptr<persist::FileStore>> lock_dir(const std::string& dir, Diagnosis* d,
                                                     bool must_exist) {
  if (Status s = check_dir(dir, Access::kWrite, d, must_exist); !s.ok()) return s;
  auto store = persist::FileStore::open(dir, kKeepAll);
  if (!store) {
    const Status& s = store.status();
    Failure f = Failure::kIoError;
    if (s.code() == StatusCode::kFailedPrecondition) f = Failure::kLocked;
    if (s.code() == StatusCode::kInvalidArgument) {
      // A generation 2^64 - 1 in the directory: no edit can publish above
      // it, as next_generation() says for the same case.
      f = s.message().find(persist::kLastGenerationWords) != std::string_view::npos
              ? Failure::kRefused
              : Failure::kRefusedInput;
    }
    return fail(d, f, s);
  }
  return store;
}

// The segment's writer lock. ShmStore can only open-or-create, so without
// `create` a missing segment is refused (kNotFound) before the open: an edit
// naming a mistyped or vanished segment must not leave an empty one behind.
// (Removed between that look and the open, it would be created empty; a
// race only another process of ours could start.)
Result<std::unique_ptr<persist::ShmStore>> lock_shm(const std::string& name, Diagnosis* d,
                                                    bool create) {
  if (Status s = check_shm_entry(name, d, /*must_exist=*/!create); !s.ok()) return s;
  auto store = persist::ShmStore::open_or_create(name, 0);
  if (!store) return fail(d, failure_of_shm(store.status()), store.status());
  return store;
}

Result<Image> from_loaded(std::string source, detail::LoadedSnapshot&& loaded) {
  Image image;
  image.source = std::move(source);
  // Recovery leaves the records unread (verify()); a tool owns its bytes and
  // wants every record. The tools read files (load_newest without
  // map_files), so the bytes are a buffer whose move keeps its address and
  // the verified view stays valid: only the records are left to read. Were
  // they a mapping, to_vector() would copy them, and the copy is viewed anew.
  const unsigned char* const verified_at = loaded.bytes.span().data();
  image.bytes = std::move(loaded.bytes).to_vector();
  if (image.bytes.data() == verified_at) {
    image.view = std::move(loaded.view);
  } else {
    auto view = snapshot::verify(image.bytes);
    if (!view) return view.status();
    image.view = std::move(*view);
  }
  snapshot::RecordReader reader(image.bytes, image.view);
  image.view.jobs.resize(image.view.header.job_count);
  for (auto& job : image.view.jobs) (void)reader.next(job);
  return image;
}

// Recovery found nothing: kNotFound if there was nothing to find, else the
// candidates all failed (kCorrupt, naming each).
Status nothing_loaded(const RecoveryReport& report, const std::string& where, Diagnosis* d) {
  if (report.skipped.empty()) {
    return fail(d, Failure::kNotFound, StatusCode::kNotFound, "no snapshot in " + where);
  }
  std::string msg = "no snapshot in " + where + " verifies:";
  for (const auto& s : report.skipped) {
    msg += "\n  " + s.source + " (offset " + std::to_string(s.offset) + "): " + s.reason;
  }
  return fail(d, Failure::kCorrupt, StatusCode::kCorruption, std::move(msg));
}

void copy_skipped(const RecoveryReport& report, std::vector<Skipped>* skipped) {
  if (skipped == nullptr) return;
  for (const auto& s : report.skipped) skipped->push_back({s.source, s.offset, s.reason});
}

// Re-encodes `view` under `header`, passing each job through `edit` (which
// may change it, or return false to leave it out).
std::vector<unsigned char> reencode(const snapshot::SnapshotView& view, snapshot::Header header,
                                    const std::function<bool(snapshot::JobRecord&)>& edit) {
  header.format_version = snapshot::kFormatVersion;
  snapshot::Encoder encoder;
  encoder.begin(header);
  for (std::string_view name : view.handlers) encoder.add_handler(name);
  for (const snapshot::JobRecordView& job : view.jobs) {
    snapshot::JobRecord record = job;
    if (edit(record)) encoder.add_job(record);
  }
  const std::span<const unsigned char> image = encoder.finish();
  return std::vector<unsigned char>(image.begin(), image.end());
}

// Checks that every id is in `view` (kNotFound naming the missing ones).
Status check_ids_present(const snapshot::SnapshotView& view, std::span<const JobId> ids,
                         Diagnosis* d) {
  std::set<JobId> present;
  for (const auto& j : view.jobs) present.insert(j.id);
  std::string missing;
  for (JobId id : ids) {
    if (present.count(id) != 0) continue;
    if (!missing.empty()) missing += ", ";
    missing += std::to_string(id);
  }
  if (!missing.empty()) {
    return fail(d, Failure::kNotFound, StatusCode::kNotFound,
                "no job with id " + missing + " in generation " +
                    std::to_string(view.header.generation));
  }
  return Status();
}

std::int64_t wall_now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

// The segment's active image, when it verifies; nullopt when there is none,
// or it does not verify (recovery skips such an image, so it neither
// outranks anything nor holds anything to keep).
std::optional<Image> verified_shm_image(const Result<std::vector<unsigned char>>& bytes,
                                        const std::string& name) {
  if (!bytes.ok()) return std::nullopt;
  auto image = decode_image("shm:" + name, *bytes);
  if (!image) return std::nullopt;
  return std::move(*image);
}

// What a directory's generation files say before a write adds one.
struct DirScan {
  std::uint64_t highest = 0;      // the highest generation number present, verified or not
  std::uint64_t next_job_id = 0;  // the highest id counter of those that verify
  std::set<std::uint64_t> held;   // generations that a file of that name holds and verifies

  // The segment's image outranks and counts like a file (held is files only).
  void add_segment(const std::optional<Image>& shm) {
    if (!shm) return;
    highest = std::max(highest, shm->view.header.generation);
    next_job_id = std::max(next_job_id, shm->view.header.next_job_id);
  }
};

// Reads and verifies every file of `files`: ids handed out by any image the
// engine could have loaded must never be handed out again, and the
// segment's image need not be kept where a file holds it already.
DirScan scan_files(const std::vector<persist::GenerationFile>& files) {
  DirScan scan;
  for (const auto& f : files) {
    scan.highest = std::max(scan.highest, f.generation);
    auto image = load_file(f.path);
    if (!image) continue;
    scan.next_job_id = std::max(scan.next_job_id, image->view.header.next_job_id);
    if (image->view.header.generation == f.generation) scan.held.insert(f.generation);
  }
  return scan;
}

// 1 + `above`, or kRefused when `above` is the last generation number: the
// next one would wrap to 0 and never be loaded (FileStore refuses to publish
// it anyway, with a message that does not say why).
Result<std::uint64_t> next_generation(std::uint64_t above, Diagnosis* d) {
  if (above == UINT64_MAX) {
    return fail(d, Failure::kRefused, StatusCode::kFailedPrecondition,
                "generation " + std::to_string(above) +
                    " is the highest a snapshot can have: no new generation can be numbered "
                    "above it");
  }
  return above + 1;
}

// Creates dir/aside-<UTC time>[-n]/ (0700), once per write (report.aside_dir
// says where), and makes its entry in `dir` durable. The engine lists only
// gen-*.jobsnap regular files directly in its directory, so it never sees
// what is kept there.
Status make_aside_dir(const std::string& dir, WriteReport& report) {
  if (!report.aside_dir.empty()) return Status();
  persist::FileSystem& f = fs();
  char stamp[32];
  const std::time_t now = std::time(nullptr);
  std::tm tm{};
  gmtime_r(&now, &tm);
  std::strftime(stamp, sizeof stamp, "%Y%m%dT%H%M%SZ", &tm);
  std::string aside;
  for (int n = 1;; ++n) {
    aside = dir;
    aside += "/aside-";
    aside += stamp;
    if (n > 1) {
      aside += '-';
      aside += std::to_string(n);
    }
    const int err = f.mkdir(aside, 0700);
    if (err == 0) break;
    if (err != EEXIST || n > 1000) {
      return Status(StatusCode::kIoError, "mkdir " + aside + ": " + persist::errno_text(err));
    }
  }
  if (int err = f.chmod(aside, 0700); err != 0) {
    return Status(StatusCode::kIoError, "chmod 0700 " + aside + ": " + persist::errno_text(err));
  }
  report.aside_dir = aside;
  return persist::sync_directory(fs(), dir);
}

// Moves `files` into the write's aside directory (made if need be),
// durably.
Status move_aside(const std::string& dir, const std::vector<persist::GenerationFile>& files,
                  WriteReport& report) {
  if (files.empty()) return Status();
  if (Status s = make_aside_dir(dir, report); !s.ok()) return s;
  persist::FileSystem& f = fs();
  const std::string& aside = report.aside_dir;
  for (const auto& file : files) {
    const std::size_t slash = file.path.rfind('/');
    const std::string to = aside + file.path.substr(slash);
    if (int err = f.rename(file.path, to); err != 0) {
      return Status(StatusCode::kIoError, "rename " + file.path + " to " + to + ": " +
                                              persist::errno_text(err));
    }
    report.moved.push_back(to);
  }
  if (Status s = persist::sync_directory(fs(), aside); !s.ok()) return s;
  return persist::sync_directory(fs(), dir);
}

// Keeps the segment's image, which the publish to the segment is about to
// replace: it is often the newest state there is (the engine writes the
// segment far more often than the directory), and a write never deletes a
// generation. Nothing to do when a file of `dir` that verifies holds its
// generation already. Otherwise it is written (durably, before anything is
// published) as gen-<S>.jobsnap:
//  - `aside`: into the write's aside directory (with the newer generations
//    a restore moves there; "shm-gen-<S>.jobsnap" if a file of `dir` of that
//    number that does not verify is about to be moved there too);
//  - else into `dir` itself, numbered below the new generation, so never
//    loaded unless chosen; into the aside directory after all if a file of
//    that name, one that does not verify, is in the way (never replaced).
Status keep_shm_image(const Image& image, const std::string& dir, const DirScan& scan, bool aside,
                      const std::vector<persist::GenerationFile>& moving, WriteReport& report,
                      Diagnosis* d) {
  const std::uint64_t generation = image.view.header.generation;
  if (scan.held.count(generation) != 0) return Status();
  std::string name = generation_path("", generation).substr(1);
  std::string where = dir;
  if (!aside) {
    SysResult<FileInfo> there = fs().lstat(dir + "/" + name);
    aside = there.ok() || there.error != ENOENT;
  }
  if (aside) {
    if (Status s = make_aside_dir(dir, report); !s.ok()) return fail(d, Failure::kIoError, s);
    where = report.aside_dir;
    for (const auto& f : moving) {
      if (f.generation == generation) name = "shm-" + name;
    }
  }
  if (Status s = persist::write_new_file(fs(), where, name, generation, image.bytes); !s.ok()) {
    return fail(d, Failure::kIoError,
                Status(s.code(), std::string(s.message()) + " (keeping the image of " +
                                     image.source + ", generation " + std::to_string(generation) +
                                     ", before it is replaced; nothing was published)"));
  }
  report.shm_kept = where + "/" + name;
  report.shm_kept_generation = generation;
  if (aside) report.moved.push_back(report.shm_kept);
  return Status();
}

// The generation files of `files` numbered above `from`, the generation a
// write starts from: once the write publishes a generation above them all,
// no start loads them again and the engine's retention would prune them, so
// they are moved aside (publish_and_move_aside).
std::vector<persist::GenerationFile> newer_than(const std::vector<persist::GenerationFile>& files,
                                                std::uint64_t from) {
  std::vector<persist::GenerationFile> newer;
  for (const auto& f : files) {
    if (f.generation > from) newer.push_back(f);
  }
  return newer;
}

// Publishes `image` as `generation` of the directory (durably; from then on
// the next start loads it, and `published` says so), then moves `newer`
// (newer_than(), listed before the publish) into the write's aside
// directory. A failure to move says what is published already.
Status publish_and_move_aside(persist::FileStore& dir, std::uint64_t generation,
                              std::span<const unsigned char> image,
                              const std::vector<persist::GenerationFile>& newer,
                              WriteReport& report, bool& published, Diagnosis* d) {
  if (Status s = dir.publish(generation, image); !s.ok()) return fail(d, Failure::kIoError, s);
  published = true;
  report.path = generation_path(dir.dir(), generation);
  if (Status s = move_aside(dir.dir(), newer, report); !s.ok()) {
    return fail(
        d, Failure::kIoError,
        Status(s.code(), std::string(s.message()) + " (generation " + std::to_string(generation) +
                             " is published in " + report.path +
                             "; moved so far: " + std::to_string(report.moved.size()) + ")"));
  }
  return Status();
}

// requeue_jobs / drop_jobs: lock, take the source, transform, keep the
// segment's image, publish above everything to the directory, move the
// generations above the source aside, then publish to the segment.
using Transform = std::function<Result<std::vector<unsigned char>>(
    const snapshot::SnapshotView&, std::uint64_t generation, Diagnosis*)>;

Result<WriteReport> edit(const EditRequest& request, const Transform& transform, Diagnosis* d) {
  if (request.dir.empty()) {
    return fail(d, Failure::kUsage, StatusCode::kInvalidArgument, "a snapshot directory is required");
  }
  // A bad segment name before the directory's LOCK is taken (and made).
  if (!request.shm.empty()) {
    if (Status s = check_shm_entry(request.shm, d); !s.ok()) return s;
  }
  // Nothing is created: the directory and the segment must exist already;
  // a refused edit puts back what taking the lock changed (DirBefore).
  const DirBefore before = DirBefore::of(request.dir);
  auto dir = lock_dir(request.dir, d, /*must_exist=*/true);
  if (!dir) return dir.status();
  WriteReport report;
  // Destroyed before `dir` and `report` (declared after them): under the
  // lock, removes an aside directory left empty (made to keep the segment's
  // image, which could not be) and puts back what taking the lock changed.
  struct PutBackUnlessPublished {
    const DirBefore& before;
    const std::string& dir;
    const WriteReport& report;
    bool published = false;
    ~PutBackUnlessPublished() {
      if (published) return;
      if (!report.aside_dir.empty()) (void)::rmdir(report.aside_dir.c_str());
      before.put_back(dir);
    }
  } undo{before, request.dir, report};
  std::unique_ptr<persist::ShmStore> shm;
  if (!request.shm.empty()) {
    auto s = lock_shm(request.shm, d, /*create=*/false);
    if (!s) return s.status();
    shm = std::move(*s);
  }
  auto files = (*dir)->list();
  if (!files) return fail(d, Failure::kIoError, files.status());

  Result<std::vector<unsigned char>> shm_image =
      shm ? shm->read_active() : Result<std::vector<unsigned char>>(Status(StatusCode::kNotFound, ""));
  // A copy: recovery below takes the bytes, and they may have to be kept.
  std::optional<Image> shm_now = verified_shm_image(shm_image, request.shm);
  DirScan scan = scan_files(*files);
  scan.add_segment(shm_now);

  Image source;
  if (request.from_generation) {
    auto loaded = load_generation((*dir)->dir(), *request.from_generation, d);
    if (!loaded) return loaded.status();
    source = std::move(*loaded);
  } else {
    RecoveryReport recovery;
    Result<std::unique_ptr<detail::LoadedSnapshot>> loaded = Status();
    if (shm) {
      persist::ShmCandidate candidate{"shm:" + request.shm, std::move(shm_image)};
      loaded = recover(&candidate, *files, recovery);
    } else {
      loaded = recover(nullptr, *files, recovery);
    }
    if (!loaded) return fail(d, Failure::kIoError, loaded.status());
    if (!*loaded) return nothing_loaded(recovery, request.dir, d);
    auto image = from_loaded(recovery.source, std::move(**loaded));
    if (!image) return fail(d, Failure::kCorrupt, image.status());
    source = std::move(*image);
  }
  const std::uint64_t from = source.view.header.generation;
  auto generation = next_generation(std::max(scan.highest, from), d);
  if (!generation) return generation.status();
  // Ids above every id any image there handed out: generation --from N, or a
  // segment behind the directory, may have an older counter than the newest.
  source.view.header.next_job_id = std::max(source.view.header.next_job_id, scan.next_job_id);
  // Checks the ids (missing: kNotFound; requeue of a live job: kRefused)
  // before anything is written.
  auto image = transform(source.view, *generation, d);
  if (!image) return image.status();

  report.from_source = source.source;
  report.from_generation = from;
  report.generation = *generation;
  // Every file above the source (--from N, or a newer file that did not
  // verify) is moved aside once the new generation is published, as restore
  // moves them: left below it, they would never load again and retention
  // would prune them.
  const std::vector<persist::GenerationFile> newer = newer_than(*files, from);
  if (shm && shm_now) {
    // Newer than the source: aside, with the newer files; else an older
    // generation of the directory, where it stays.
    const bool newer_than_source = shm_now->view.header.generation > from;
    if (Status s = keep_shm_image(*shm_now, (*dir)->dir(), scan, /*aside=*/newer_than_source, newer,
                                  report, d);
        !s.ok()) {
      return s;
    }
  }
  if (Status s =
          publish_and_move_aside(**dir, *generation, *image, newer, report, undo.published, d);
      !s.ok()) {
    return s;
  }
  if (shm) {
    if (Status s = shm->publish(*generation, *image); !s.ok()) {
      std::string done = " (generation " + std::to_string(*generation) + " is in " + report.path +
                         ", which the engine loads";
      if (!report.aside_dir.empty()) done += "; what it kept aside is in " + report.aside_dir;
      return fail(d, Failure::kIoError, Status(s.code(), std::string(s.message()) + done + ")"));
    }
    report.shm = request.shm;
  }
  auto view = snapshot::decode(*image);
  report.jobs = view ? view->jobs.size() : 0;
  return report;
}

}  // namespace

std::string_view failure_name(Failure failure) noexcept {
  switch (failure) {
    case Failure::kNone: return "ok";
    case Failure::kCorrupt: return "corrupt";
    case Failure::kTruncated: return "truncated";
    case Failure::kUnsupportedVersion: return "unsupported-version";
    case Failure::kNotFound: return "not-found";
    case Failure::kRefusedInput: return "refused-input";
    case Failure::kLocked: return "locked";
    case Failure::kRefused: return "refused";
    case Failure::kIoError: return "io-error";
    case Failure::kUsage: return "usage";
  }
  return "unknown";
}

Status check_shm_name(std::string_view name) {
  // The store's own rule (ShmStore::check_name), in jobsnap's words.
  if (persist::ShmStore::check_name(std::string(name)).ok()) return Status();
  return Status(StatusCode::kInvalidArgument,
                "bad shm segment name '" + std::string(name) +
                    "': the engine refuses it (use 1..200 characters of [A-Za-z0-9._-], not "
                    "'.' or '..')");
}

Status check_file_name(const std::string& path, const snapshot::Header& header, Diagnosis* d) {
  const std::optional<std::uint64_t> named = generation_of_name(path);
  if (!named || *named == header.generation) return Status();
  if (d != nullptr) *d = Diagnosis{Failure::kCorrupt, true, 16};  // the header's generation field
  return Status(StatusCode::kCorruption, "file name says generation " + std::to_string(*named) +
                                             ", header says " + std::to_string(header.generation));
}

// ---------------------------------------------------------------- reading

Result<Image> decode_image(std::string source, std::vector<unsigned char> bytes, Diagnosis* d) {
  Image image;
  image.source = std::move(source);
  image.bytes = std::move(bytes);
  snapshot::DecodeError err;
  auto view = snapshot::decode(image.bytes, &err);
  if (!view) {
    if (d != nullptr) *d = Diagnosis{failure_of_decode(err.problem), true, err.offset};
    return view.status();  // "<class> at offset N: what"
  }
  image.view = std::move(*view);
  return image;
}

Result<Image> load_file(const std::string& path, Diagnosis* d) {
  if (Status s = check_size_against_header(path, d); !s.ok()) return s;
  try {
    auto bytes = persist::FileStore::read(path, kMaxFileBytes, fs());
    if (!bytes) {
      const Status& s = bytes.status();
      const Failure failure = failure_of_file_read(s);
      // E.g. a file another uid's engine wrote (0600) in a directory this
      // uid may list: whose it is, and who can read it.
      if (failure != Failure::kIoError) return fail(d, failure, s);
      return fail(d, failure, Status(s.code(), std::string(s.message()) + permission_hint(path)));
    }
    return decode_image(path, std::move(*bytes), d);
  } catch (const std::bad_alloc&) {
    // A file as large as its header says, more than this machine can hold.
    return fail(d, Failure::kIoError, StatusCode::kIoError,
                "out of memory reading snapshot file " + path);
  }
}

Result<Image> load_generation(const std::string& dir, std::uint64_t generation, Diagnosis* d) {
  if (Status s = check_dir(dir, Access::kRead, d); !s.ok()) return s;
  const std::string path = generation_path(dir, generation);
  auto image = load_file(path, d);
  if (!image) {
    if (image.status().code() == StatusCode::kNotFound) {
      return fail(d, Failure::kNotFound, StatusCode::kNotFound,
                  "no generation " + std::to_string(generation) + " in " + dir + " (" + path +
                      " does not exist)");
    }
    return image.status();
  }
  if (image->view.header.generation != generation) {
    if (d != nullptr) *d = Diagnosis{Failure::kCorrupt, true, 16};
    return Status(StatusCode::kCorruption,
                  path + ": file name says generation " + std::to_string(generation) +
                      ", header says " + std::to_string(image->view.header.generation));
  }
  return image;
}

Result<Image> load_shm(const std::string& name, Diagnosis* d) {
  if (Status s = check_shm_entry(name, d); !s.ok()) return s;
  const std::uint32_t owner = segment_owner("");
  auto bytes = persist::ShmStore::read_existing(name, owner);
  if (!bytes) return segment_failure(name, bytes.status(), owner, "", d);
  return decode_image("shm:" + name, std::move(*bytes), d);
}

Result<Image> load_newest(const std::string& dir, const std::string& shm_name, Diagnosis* d,
                          std::vector<Skipped>* skipped) {
  RecoveryReport report;
  std::unique_ptr<detail::LoadedSnapshot> loaded;
  // Without the directory's lock a running engine may recycle every listed
  // file while they are read (it publishes two generations meanwhile): then
  // nothing verified only because the listing went stale. List again, a
  // few times, rather than report an empty directory that is not.
  for (int attempt = 0; attempt < 5; ++attempt) {
    std::vector<persist::GenerationFile> files;
    if (!dir.empty()) {
      if (Status s = check_dir(dir, Access::kRead, d); !s.ok()) return s;
      auto listed = persist::list_generations(dir, fs());
      if (!listed) return fail(d, Failure::kIoError, listed.status());
      files = std::move(*listed);
    }
    report = RecoveryReport();
    std::size_t gone = 0;
    if (!shm_name.empty()) {
      if (Status s = check_shm_entry(shm_name, d); !s.ok()) return s;
      const std::uint32_t owner = segment_owner(dir);
      persist::ShmCandidate candidate{"shm:" + shm_name,
                                      persist::ShmStore::read_existing(shm_name, owner)};
      // Recovery would pass over it, but the engine's open() fails on such a
      // segment before recovery runs: no disk generation is what it loads.
      if (!candidate.image.ok() && shm_unusable(candidate.image.status())) {
        return segment_failure(shm_name, candidate.image.status(), owner, dir, d);
      }
      auto chosen = recover(&candidate, files, report, &gone);
      if (!chosen) return fail(d, Failure::kIoError, chosen.status());
      loaded = std::move(*chosen);
    } else {
      auto chosen = recover(nullptr, files, report, &gone);
      if (!chosen) return fail(d, Failure::kIoError, chosen.status());
      loaded = std::move(*chosen);
    }
    if (loaded || gone == 0) break;
  }
  copy_skipped(report, skipped);
  const std::string where = dir.empty() ? "shm:" + shm_name
                                        : (shm_name.empty() ? dir : dir + " or shm:" + shm_name);
  if (!loaded) return nothing_loaded(report, where, d);
  auto image = from_loaded(report.source, std::move(*loaded));
  if (!image) return fail(d, Failure::kCorrupt, image.status());
  return image;
}

Result<Image> load(const Source& source, Diagnosis* d) {
  if (source.path.empty()) {
    if (source.shm.empty()) {
      return fail(d, Failure::kUsage, StatusCode::kInvalidArgument, "no snapshot source given");
    }
    if (source.generation) {
      return fail(d, Failure::kUsage, StatusCode::kInvalidArgument,
                  "--generation applies to a directory, not a segment");
    }
    return load_shm(source.shm, d);
  }
  SysResult<FileInfo> info = fs().lstat(source.path);
  // A file only: a directory is refused by the read, as a FIFO is.
  const bool is_dir =
      !source.file_only && info.ok() && info.value.kind == FileInfo::Kind::kDirectory;
  if (is_dir) {
    if (source.generation) {
      if (!source.shm.empty()) {
        return fail(d, Failure::kUsage, StatusCode::kInvalidArgument,
                    "give --generation or --shm with a directory, not both");
      }
      return load_generation(source.path, *source.generation, d);
    }
    return load_newest(source.path, source.shm, d);
  }
  if (source.generation || !source.shm.empty()) {
    if (!info.ok() && info.error == ENOENT) {
      return fail(d, Failure::kNotFound, StatusCode::kNotFound,
                  "snapshot directory " + source.path + " does not exist");
    }
    // Where a directory is expected, a symlink or a FIFO is refused input
    // (as check_dir says); only a plain file given with them is a usage error.
    if (info.ok() && info.value.kind == FileInfo::Kind::kSymlink) {
      return fail(d, Failure::kRefusedInput, StatusCode::kInvalidArgument,
                  "snapshot directory " + source.path + " is a symlink; refusing to follow it");
    }
    if (info.ok() && info.value.kind != FileInfo::Kind::kRegular) {
      return fail(d, Failure::kRefusedInput, StatusCode::kInvalidArgument,
                  "snapshot directory " + source.path + " is not a directory (it is " +
                      kind_text(info.value.kind) + ")");
    }
    return fail(d, Failure::kUsage, StatusCode::kInvalidArgument,
                source.path + " is not a directory: --generation and --shm go with a directory");
  }
  return load_file(source.path, d);
}

StateCounts count_states(const snapshot::SnapshotView& view) {
  StateCounts c;
  for (const auto& j : view.jobs) {
    ++c.total;
    ++c.by_state[static_cast<std::size_t>(j.state)];
  }
  return c;
}

Result<std::vector<GenerationInfo>> list(const std::string& dir, const std::string& shm_name,
                                         Diagnosis* d) {
  if (dir.empty() && shm_name.empty()) {
    return fail(d, Failure::kUsage, StatusCode::kInvalidArgument,
                "give a snapshot directory, a segment, or both");
  }
  std::vector<GenerationInfo> out;
  auto fill = [](GenerationInfo& g, Result<Image> image, const Diagnosis& why) {
    if (image) {
      g.valid = true;
      g.header = image->view.header;
      g.counts = count_states(image->view);
      g.bytes = image->bytes.size();
    } else {
      g.diagnosis = why;
      g.reason = std::string(image.status().message());
    }
  };
  if (!shm_name.empty()) {
    if (Status s = check_shm_entry(shm_name, d); !s.ok()) return s;
    const std::uint32_t owner = segment_owner(dir);
    auto bytes = persist::ShmStore::read_existing(shm_name, owner);
    if (!bytes && bytes.status().code() == StatusCode::kNotFound && dir.empty()) {
      return fail(d, Failure::kNotFound, bytes.status());
    }
    // Not a row that says "invalid": the engine's open() fails on such a
    // segment, so no image listed is the one the next start loads (as
    // load_newest() refuses it too).
    if (!bytes && shm_unusable(bytes.status())) {
      return segment_failure(shm_name, bytes.status(), owner, dir, d);
    }
    GenerationInfo g;
    g.source = "shm:" + shm_name;
    g.shm = true;
    if (bytes) {
      g.bytes = bytes->size();
      Diagnosis why;
      auto image = decode_image(g.source, std::move(*bytes), &why);
      if (image) g.generation = image->view.header.generation;
      fill(g, std::move(image), why);
    } else {
      g.diagnosis.failure = failure_of_shm(bytes.status());
      g.reason = std::string(bytes.status().message());
    }
    out.push_back(std::move(g));
  }
  if (!dir.empty()) {
    if (Status s = check_dir(dir, Access::kRead, d); !s.ok()) return s;
    auto files = persist::list_generations(dir, fs());
    if (!files) return fail(d, Failure::kIoError, files.status());
    for (const auto& f : *files) {
      GenerationInfo g;
      g.source = f.path;
      g.generation = f.generation;
      g.bytes = f.bytes;
      Diagnosis why;
      auto image = load_file(f.path, &why);
      // Pruned, or recycled by a running engine's publish, since the listing:
      // not a generation any more, so not listed (FileStore::read).
      if (!image && image.status().code() == StatusCode::kNotFound) continue;
      if (image && image->view.header.generation != f.generation) {
        why = Diagnosis{Failure::kCorrupt, true, 16};
        image = Status(StatusCode::kCorruption,
                       "file name says generation " + std::to_string(f.generation) +
                           ", header says " + std::to_string(image->view.header.generation));
      }
      fill(g, std::move(image), why);
      out.push_back(std::move(g));
    }
  }
  // Which one the next start takes: ask the engine's loader itself.
  auto next = load_newest(dir, shm_name);
  if (next) {
    for (auto& g : out) g.loaded_next = g.source == next->source;
  }
  return out;
}

// ---------------------------------------------------------------- analysis

Summary summarize(const snapshot::SnapshotView& view) {
  Summary s;
  s.counts = count_states(view);
  s.by_handler.resize(view.handlers.size());
  for (std::size_t i = 0; i < view.handlers.size(); ++i) {
    s.by_handler[i].name = std::string(view.handlers[i]);
  }
  for (const auto& j : view.jobs) {
    ++s.by_handler[j.handler].jobs;
    if (j.priority < kPriorityLevels) ++s.by_priority[j.priority];
    if (j.state == snapshot::JobState::kDead) {
      ++s.by_handler[j.handler].dead;
      s.dead.push_back(&j);
    } else if (j.cancel_requested) {
      // Not live: recovery counts it cancelled and never runs it, so it is
      // not what an operator looking for the job that waits longest wants.
      continue;
    } else if (s.oldest_live == nullptr || j.submit_ns < s.oldest_live->submit_ns) {
      s.oldest_live = &j;
    }
  }
  return s;
}

Diff diff(const snapshot::SnapshotView& a, const snapshot::SnapshotView& b) {
  // By id, every copy: no engine writes an id twice, but a hand-made or
  // hostile image that verifies can, and it must not compare "the same" as
  // one with a single copy. The copies of an id are paired in image order;
  // one without a partner on the other side is removed (in a) or added (in b).
  std::map<JobId, std::vector<const snapshot::JobRecordView*>> in_a, in_b;
  for (const auto& j : a.jobs) in_a[j.id].push_back(&j);
  for (const auto& j : b.jobs) in_b[j.id].push_back(&j);
  Diff out;
  static const std::vector<const snapshot::JobRecordView*> kNone;
  for (const auto& [id, xs] : in_a) {
    auto it = in_b.find(id);
    const auto& ys = it == in_b.end() ? kNone : it->second;
    const std::size_t pairs = std::min(xs.size(), ys.size());
    for (std::size_t k = 0; k < pairs; ++k) {
      const snapshot::JobRecordView& x = *xs[k];
      const snapshot::JobRecordView& y = *ys[k];
      Diff::Changed c;
      c.id = id;
      auto check = [&c](bool same, const char* field) {
        if (!same) c.fields.emplace_back(field);
      };
      check(a.handlers[x.handler] == b.handlers[y.handler], "handler");
      check(x.priority == y.priority, "priority");
      check(x.state == y.state, "state");
      check(x.attempts == y.attempts, "attempts");
      check(x.recoveries == y.recoveries, "recoveries");
      check(x.submit_ns == y.submit_ns, "submit_time");
      check(x.run_at_ns == y.run_at_ns, "run_at");
      check(x.cancel_requested == y.cancel_requested, "cancel_requested");
      check(x.dead_reason == y.dead_reason, "dead_reason");
      check(x.deadline_ns == y.deadline_ns, "deadline_ns");
      check(x.dead_at_ns == y.dead_at_ns, "dead_at");
      check(x.payload == y.payload, "payload");
      check(x.error == y.error, "error");
      check(x.key == y.key, "key");
      if (!c.fields.empty()) out.changed.push_back(std::move(c));
    }
    out.removed.insert(out.removed.end(), xs.size() - pairs, id);
    out.added.insert(out.added.end(), ys.size() - pairs, id);
  }
  for (const auto& [id, ys] : in_b) {
    if (in_a.count(id) == 0) out.added.insert(out.added.end(), ys.size(), id);
  }
  std::sort(out.added.begin(), out.added.end());
  return out;
}

// ---------------------------------------------------------- transformations

Result<std::vector<unsigned char>> requeue(const snapshot::SnapshotView& view,
                                           std::span<const JobId> ids, std::uint64_t generation,
                                           std::int64_t now_ns, Diagnosis* d) {
  if (Status s = check_ids_present(view, ids, d); !s.ok()) return s;
  const std::set<JobId> wanted(ids.begin(), ids.end());
  std::string live;
  for (const auto& j : view.jobs) {
    if (wanted.count(j.id) != 0 && j.state != snapshot::JobState::kDead) {
      if (!live.empty()) live += ", ";
      live += std::to_string(j.id);
      live += " (";
      live += snapshot::job_state_name(j.state);
      live += ')';
    }
  }
  if (!live.empty()) {
    return fail(d, Failure::kRefused, StatusCode::kFailedPrecondition,
                "only dead jobs can be requeued; not dead: " + live);
  }
  // A requeued job takes its unique key again (as Engine::requeue_dead()
  // does): refused when a pending job, or another requeued one, holds it.
  std::map<std::string_view, JobId> key_holder;
  for (const auto& j : view.jobs) {
    if (!j.key.empty() && j.state != snapshot::JobState::kDead) key_holder.emplace(j.key, j.id);
  }
  for (const auto& j : view.jobs) {
    if (j.key.empty() || wanted.count(j.id) == 0) continue;
    const auto [it, fresh] = key_holder.emplace(j.key, j.id);
    if (!fresh) {
      return fail(d, Failure::kRefused, StatusCode::kFailedPrecondition,
                  // The key's bytes are not shown: an image's bytes, possibly crafted.
                  "job " + std::to_string(j.id) + ": its unique key (" +
                      std::to_string(j.key.size()) + " bytes) is held by " +
                      (wanted.count(it->second) != 0 ? "job " + std::to_string(it->second) +
                                                           ", requeued too"
                                                     : "pending job " +
                                                           std::to_string(it->second)));
    }
  }
  snapshot::Header header = view.header;
  header.generation = generation;
  return reencode(view, header, [&](snapshot::JobRecord& r) {
    if (wanted.count(r.id) != 0) {
      r.state = snapshot::JobState::kPending;
      r.dead_reason = snapshot::DeadReason::kNone;
      r.dead_at_ns = 0;
      r.attempts = 0;
      r.recoveries = 0;
      r.cancel_requested = false;
      r.run_at_ns = now_ns;
    }
    return true;
  });
}

Result<std::vector<unsigned char>> drop(const snapshot::SnapshotView& view,
                                        std::span<const JobId> ids, std::uint64_t generation,
                                        Diagnosis* d) {
  if (Status s = check_ids_present(view, ids, d); !s.ok()) return s;
  const std::set<JobId> wanted(ids.begin(), ids.end());
  snapshot::Header header = view.header;
  header.generation = generation;
  return reencode(view, header, [&](snapshot::JobRecord& r) { return wanted.count(r.id) == 0; });
}

std::vector<unsigned char> renumber(const snapshot::SnapshotView& view, std::uint64_t generation,
                                    std::uint64_t next_job_id) {
  snapshot::Header header = view.header;
  header.generation = generation;
  header.next_job_id = next_job_id;
  return reencode(view, header, [](snapshot::JobRecord&) { return true; });
}

// ------------------------------------------------------------------ writing

Result<WriteReport> requeue_jobs(const EditRequest& request, std::span<const JobId> ids,
                                 Diagnosis* d) {
  const std::int64_t now = wall_now_ns();
  return edit(
      request,
      [&](const snapshot::SnapshotView& view, std::uint64_t generation, Diagnosis* dd) {
        return requeue(view, ids, generation, now, dd);
      },
      d);
}

Result<WriteReport> drop_jobs(const EditRequest& request, std::span<const JobId> ids,
                              Diagnosis* d) {
  return edit(
      request,
      [&](const snapshot::SnapshotView& view, std::uint64_t generation, Diagnosis* dd) {
        return drop(view, ids, generation, dd);
      },
      d);
}

namespace {

// restore() into a segment only, from a single file (or another segment):
// there is no directory to keep the segment's image in, so one newer than
// the source (or another image of the same generation) is not overwritten.
// Says how to restore through a directory, which keeps it.
Status check_overwrite(const RestoreRequest& request, const Image& source, const Image& shm_now,
                       Diagnosis* d) {
  const std::uint64_t from = source.view.header.generation;
  const std::uint64_t held = shm_now.view.header.generation;
  if (held < from || (held == from && shm_now.bytes == source.bytes)) return Status();
  const std::string through = request.source.path.empty()
                                  ? "--from-shm " + request.source.shm
                                  : "--from-file " + request.source.path;
  return fail(d, Failure::kRefused, StatusCode::kFailedPrecondition,
              "shm segment '" + request.target_shm + "' holds generation " +
                  std::to_string(held) + (held > from ? ", newer than" : ", another image than") +
                  " generation " + std::to_string(from) + " of " + source.source +
                  ", and restoring into it would overwrite that image with no copy kept. "
                  "Restore through a snapshot directory instead, which keeps it: jobsnap "
                  "restore DIR " + through + " --shm " + request.target_shm +
                  " (or first save it: jobsnap restore DIR --from-shm " + request.target_shm + ")");
}

}  // namespace

Result<WriteReport> restore(const RestoreRequest& request, Diagnosis* d) {
  if (request.target_dir.empty() && request.target_shm.empty()) {
    return fail(d, Failure::kUsage, StatusCode::kInvalidArgument,
                "restore needs a target: a directory, a segment, or both");
  }
  // Every check that can refuse comes before anything is locked or created
  // (jobsnap.md, restore step 1): a typo'd directory, generation or segment
  // name, a source that does not verify, a segment the engine could not
  // open or a generation past the last must leave no directory, LOCK file or
  // segment behind. First the segment's name, then the source: reading needs
  // no lock.
  if (!request.target_shm.empty()) {
    if (Status s = check_shm_entry(request.target_shm, d); !s.ok()) return s;
  }
  // A source directory is written too: it is the target (restore DIR -g N),
  // or, with --to-shm, where the segment's replaced image is kept (in its
  // aside directory). So it must be ours, as a target must: refused before
  // it is read (load() reads any uid's directory).
  if (!request.source.path.empty() && !request.source.file_only) {
    SysResult<FileInfo> info = fs().lstat(request.source.path);
    if (info.ok() && info.value.kind == FileInfo::Kind::kDirectory) {
      if (Status s = check_dir(request.source.path, Access::kWrite, d); !s.ok()) return s;
    }
  }
  auto source = load(request.source, d);
  if (!source) return source.status();
  const std::uint64_t from = source->view.header.generation;
  // A directory source (restore DIR -g N, or --to-shm from DIR) exists; only
  // a target given a file or a segment to restore (--from-file, --from-shm)
  // may be a directory to create.
  std::string source_dir;
  if (!request.source.path.empty()) {
    SysResult<FileInfo> info = fs().lstat(request.source.path);
    if (info.ok() && info.value.kind == FileInfo::Kind::kDirectory && !request.source.file_only) {
      source_dir = request.source.path;
    }
  }
  // A file given as such does not verify when its name and header disagree
  // (jobsnap verify says corrupt): the engine would pass it over.
  if (!request.source.path.empty() && source_dir.empty()) {
    if (Status s = check_file_name(request.source.path, source->view.header, d); !s.ok()) return s;
  }

  // The targets as they are, read only (the same checks are made again
  // under the locks, where they decide): whatever would refuse the restore
  // there refuses it here, before anything is created.
  const std::string shm_path = "/dev/shm/" + request.target_shm;
  bool shm_existed = false;
  std::optional<Image> shm_before;
  if (!request.target_shm.empty()) {
    shm_existed = fs().lstat(shm_path).ok();
    auto bytes = persist::ShmStore::read_existing(request.target_shm);
    // Not ours (type, owner, mode), another layout version, a writer at it:
    // the open under the lock would refuse it after the directory was made.
    if (!bytes && shm_unusable(bytes.status())) {
      return fail(d, failure_of_shm(bytes.status()), bytes.status());
    }
    shm_before = verified_shm_image(bytes, request.target_shm);
  }
  bool dir_existed = false;
  DirBefore before;
  std::uint64_t highest = from;
  std::string numbered_by;  // the directory whose generations G must outrank
  if (!request.target_dir.empty()) {
    if (Status s = check_dir(request.target_dir, Access::kWrite, d,
                             /*must_exist=*/!source_dir.empty());
        !s.ok()) {
      return s;
    }
    dir_existed = fs().lstat(request.target_dir).ok();
    if (dir_existed) {
      before = DirBefore::of(request.target_dir);
      numbered_by = request.target_dir;
    }
  } else {
    numbered_by = source_dir;
  }
  if (!numbered_by.empty()) {
    auto files = persist::list_generations(numbered_by, fs());
    if (!files) return fail(d, Failure::kIoError, files.status());
    if (!files->empty()) highest = std::max(highest, files->front().generation);
  }
  if (shm_before) highest = std::max(highest, shm_before->view.header.generation);
  if (auto g = next_generation(highest, d); !g) return g.status();
  if (shm_before && request.target_dir.empty() && source_dir.empty()) {
    if (Status s = check_overwrite(request, *source, *shm_before, d); !s.ok()) return s;
  }

  // Both locks before the targets are read, so no engine starts in between.
  // Until something is published, a failure removes what this restore
  // created: the segment (under its writer lock), the LOCK file (under the
  // directory's lock), an aside directory left empty, then the directory;
  // never what was there when it looked above. Best effort: what cannot be
  // removed stays, and the failure is reported as it is.
  std::unique_ptr<persist::FileStore> dir;
  std::unique_ptr<persist::ShmStore> shm;
  WriteReport report;
  bool published = false;
  auto undo = [&](Status failure) -> Status {
    if (published) return failure;
    if (shm) {
      if (!shm_existed) (void)persist::ShmStore::remove(request.target_shm);
      shm.reset();
    }
    if (!report.aside_dir.empty()) (void)::rmdir(report.aside_dir.c_str());
    if (dir) {
      const std::string path = dir->dir();
      before.put_back(path);
      dir.reset();
      if (!dir_existed) (void)::rmdir(path.c_str());
    }
    return failure;
  };

  if (!request.target_dir.empty()) {
    auto locked = lock_dir(request.target_dir, d, /*must_exist=*/!source_dir.empty());
    if (!locked) {
      // Made, then its LOCK could not be: an empty directory is all there is.
      if (!dir_existed) (void)::rmdir(request.target_dir.c_str());
      return locked.status();
    }
    dir = std::move(*locked);
  }
  std::optional<Image> shm_now;  // the segment's image, which the publish replaces
  if (!request.target_shm.empty()) {
    auto locked = lock_shm(request.target_shm, d, /*create=*/true);
    if (!locked) return undo(locked.status());
    shm = std::move(*locked);
    shm_now = verified_shm_image(shm->read_active(), request.target_shm);
  }

  // Above everything either store holds; ids above every id any of them used.
  std::vector<persist::GenerationFile> newer;
  DirScan scan;  // the target directory's, or with --to-shm the source directory's
  if (dir) {
    auto files = dir->list();
    if (!files) return undo(fail(d, Failure::kIoError, files.status()));
    newer = newer_than(*files, from);
    scan = scan_files(*files);
  } else if (!source_dir.empty()) {
    // Into the segment only, from a directory the engine presumably also
    // uses: above that directory's generations too, or they would win, and
    // ids above its counters.
    auto files = persist::list_generations(source_dir, fs());
    if (!files) return undo(fail(d, Failure::kIoError, files.status()));
    scan = scan_files(*files);
  }
  scan.add_segment(shm_now);
  const std::uint64_t next_id = std::max(source->view.header.next_job_id, scan.next_job_id);
  auto generation = next_generation(std::max(from, scan.highest), d);
  if (!generation) return undo(generation.status());

  report.from_source = source->source;
  report.from_generation = from;
  report.generation = *generation;
  report.jobs = source->view.jobs.size();

  // The segment's image is kept before anything is published (so a failure
  // to keep it changes nothing).
  if (shm_now) {
    const std::uint64_t held = shm_now->view.header.generation;
    if (dir) {
      // Newer than the chosen one: aside, with the newer files; else an
      // older generation of the directory, where it stays.
      if (Status s = keep_shm_image(*shm_now, dir->dir(), scan, /*aside=*/held > from, newer,
                                    report, d);
          !s.ok()) {
        return undo(s);
      }
    } else if (!source_dir.empty()) {
      // The source directory is no target (no lock, nothing published there):
      // only its aside directory, which no engine reads, is written.
      if (Status s = keep_shm_image(*shm_now, source_dir, scan, /*aside=*/true, {}, report, d);
          !s.ok()) {
        return undo(s);
      }
    } else if (Status s = check_overwrite(request, *source, *shm_now, d); !s.ok()) {
      // A single file (or another segment) and no directory to keep the
      // image in: say how to restore through one, which keeps it.
      return undo(s);
    }
  }

  const std::vector<unsigned char> image = renumber(source->view, *generation, next_id);
  if (dir) {
    // Publish first: from here on the next start loads the restored image,
    // whatever happens to the moves that follow.
    if (Status s = publish_and_move_aside(*dir, *generation, image, newer, report, published, d);
        !s.ok()) {
      return undo(s);  // nothing to undo once published
    }
  }
  if (shm) {
    if (Status s = shm->publish(*generation, image); !s.ok()) {
      return undo(fail(d, Failure::kIoError, s));
    }
    report.shm = request.target_shm;
  }
  return report;
}

std::optional<std::uint64_t> generation_of_name(std::string_view path) {
  const std::string_view name = path.substr(path.rfind('/') == std::string_view::npos
                                                ? 0
                                                : path.rfind('/') + 1);
  constexpr std::string_view kPrefix = "gen-", kSuffix = ".jobsnap";
  constexpr std::size_t kDigits = 20;
  if (name.size() != kPrefix.size() + kDigits + kSuffix.size()) return std::nullopt;
  if (!name.starts_with(kPrefix) || !name.ends_with(kSuffix)) return std::nullopt;
  std::uint64_t value = 0;
  for (char c : name.substr(kPrefix.size(), kDigits)) {
    if (c < '0' || c > '9') return std::nullopt;
    const auto digit = static_cast<std::uint64_t>(c - '0');
    if (value > (UINT64_MAX - digit) / 10) return std::nullopt;
    value = value * 10 + digit;
  }
  return value;
}

}  // namespace jobengine::snapshot_tools
