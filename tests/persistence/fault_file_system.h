// FaultFileSystem: a FileSystem for tests that wraps a real one (PosixFileSystem
// by default) and, deterministically (by call count, never by time):
//   - makes chosen calls fail: "the Nth (or every) write / fsync / directory
//     fsync / rename / open ... fails with errno E" (EIO, ENOSPC, EDQUOT,
//     EINTR, ...), optionally only on paths containing a given string;
//   - makes a write short: "the Nth write writes only k bytes";
//   - checks every descriptor it hands out: O_CLOEXEC set (fcntl F_GETFD) and
//     closed again (open_descriptors());
//   - simulates power loss, in the spirit of leveldb's db/fault_injection_test.cc:
//     it remembers each file's contents as of its last successful fsync and
//     each tracked directory's entries as of its last successful directory
//     fsync, and simulate_power_loss() puts the directory back into exactly
//     that state (unsynced data and unsynced creations, renames and unlinks
//     are lost). File modes and timestamps are not modelled.
// A failed call does nothing (open creates nothing, rename renames nothing),
// except close, which releases the descriptor as Linux does. Thread-safe
// (one mutex around every call).
#pragma once

#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "persistence/file_system.h"

namespace jobengine::persist {

enum class FaultOp : std::uint8_t {
  kOpen,
  kWrite,
  kRead,
  kFsync,     // fsync of a file descriptor that is not a directory
  kDirFsync,  // fsync of a directory descriptor
  kClose,
  kRename,
  kUnlink,
  kMkdir,
  kFchmod,
  kChmod,
  kListDir,
  kLock,
  kWriteback,  // start_writeback (sync_file_range): advice, makes nothing durable
  kTruncate,
  kLstat,
};
const char* fault_op_name(FaultOp op);

struct FaultRule {
  FaultOp op = FaultOp::kWrite;
  // The errno the call fails with when the rule fires (EINTR: nothing done).
  int error = EIO;
  // kWrite only: when > 0 the firing write writes at most this many bytes and
  // succeeds (short write) instead of failing; `error` is then ignored.
  std::size_t short_write = 0;
  // Fires on the nth matching call counted from when the rule was added
  // (1: the next one), and, when `every`, on every matching call after it.
  std::uint64_t nth = 1;
  bool every = false;
  // Only calls whose path (for descriptors: the path they were opened with;
  // for rename: either path) contains this string match. Empty: every call.
  std::string path_contains;
};

// Builders for the usual rules.
// The nth matching call fails with `error`.
inline FaultRule fail_call(FaultOp op, int error, std::uint64_t nth = 1,
                           std::string path_contains = {}) {
  FaultRule rule;
  rule.op = op;
  rule.error = error;
  rule.nth = nth;
  rule.path_contains = std::move(path_contains);
  return rule;
}
// Every matching call fails with `error`.
inline FaultRule fail_every_call(FaultOp op, int error, std::string path_contains = {}) {
  FaultRule rule = fail_call(op, error, 1, std::move(path_contains));
  rule.every = true;
  return rule;
}
// The nth write (every write from the nth on, if `every`) writes at most `bytes`.
inline FaultRule short_write(std::size_t bytes, std::uint64_t nth = 1, bool every = false) {
  FaultRule rule;
  rule.op = FaultOp::kWrite;
  rule.short_write = bytes;
  rule.nth = nth;
  rule.every = every;
  return rule;
}

class FaultFileSystem final : public FileSystem {
 public:
  explicit FaultFileSystem(std::shared_ptr<FileSystem> base = default_file_system());

  // Rules are checked in the order added; every matching rule counts the
  // call, and the first one due fires.
  void add_rule(FaultRule rule);
  void clear_rules();
  // Called with the file's path before every read() and map_read() goes to
  // the real file system, to act out what another process does meanwhile (a
  // publish recycling the file). It must not call back into this object.
  void set_before_read(std::function<void(const std::string&)> hook);

  std::uint64_t calls(FaultOp op) const;     // calls made, failed or not
  std::uint64_t injected(FaultOp op) const;  // faults (and short writes) injected
  // Descriptors opened through this object and not yet closed.
  std::size_t open_descriptors() const;
  // Paths opened through this object whose descriptor lacked FD_CLOEXEC.
  std::vector<std::string> cloexec_violations() const;

  // Power loss. mark_durable() declares `dir`'s present entries and the
  // present contents of its regular files durable (a test calls it once the
  // store is set up). From then on a successful fsync records a file's
  // contents and a successful directory fsync records the directory's
  // entries. simulate_power_loss() rewrites `dir` to the durable state:
  // names not durable are removed, durable names get back the inode contents
  // last synced (empty if never synced). Call it with no descriptor into
  // `dir` open (close the store first, as the crash would). Returns false
  // with a message on a test-setup error (dir never marked, I/O failure).
  bool mark_durable(const std::string& dir, std::string* error = nullptr);
  bool simulate_power_loss(const std::string& dir, std::string* error = nullptr);

  SysResult<int> open(const std::string& path, int flags, mode_t mode) override;
  SysResult<std::size_t> write(int fd, const void* data, std::size_t size) override;
  SysResult<std::size_t> read(int fd, void* data, std::size_t size) override;
  // A mapping counts as a read (FaultOp::kRead): a rule that fires fails it.
  SysResult<const void*> map_read(int fd, std::size_t size) override;
  // Passed through, counted as kWriteback; it makes nothing durable, so the
  // power-loss model ignores it (only fsync counts).
  int start_writeback(int fd, std::uint64_t offset, std::uint64_t size) override;
  int fsync(int fd) override;
  int close(int fd) override;
  int rename(const std::string& from, const std::string& to) override;
  int rename_noreplace(const std::string& from, const std::string& to) override;  // kRename
  int ftruncate(int fd, std::uint64_t size) override;                             // kTruncate
  int unlink(const std::string& path) override;
  int mkdir(const std::string& path, mode_t mode) override;
  int fchmod(int fd, mode_t mode) override;
  int chmod(const std::string& path, mode_t mode) override;
  SysResult<FileInfo> lstat(const std::string& path) override;
  SysResult<FileInfo> fstat(int fd) override;
  SysResult<std::vector<std::string>> list_dir(const std::string& path) override;
  int lock_exclusive(int fd) override;

 private:
  struct RuleState {
    FaultRule rule;
    std::uint64_t seen = 0;
  };
  struct OpenFile {
    std::string path;
    bool is_dir = false;
  };
  using InodeKey = std::pair<std::uint64_t, std::uint64_t>;  // (device, inode)

  // Counts the call against every matching rule; returns the rule that
  // fires, or nullptr. Caller holds mu_.
  const FaultRule* check(FaultOp op, const std::string& path, const std::string& other = {});
  std::string fd_path(int fd) const;
  // Power-loss bookkeeping (caller holds mu_).
  bool record_file_contents(int fd, std::string* error);
  bool record_dir_entries(const std::string& dir, std::string* error);

  std::shared_ptr<FileSystem> base_;
  mutable std::mutex mu_;
  std::function<void(const std::string&)> before_read_;
  std::vector<RuleState> rules_;
  std::map<FaultOp, std::uint64_t> calls_;
  std::map<FaultOp, std::uint64_t> injected_;
  std::map<int, OpenFile> open_files_;
  std::vector<std::string> cloexec_violations_;
  std::map<InodeKey, std::string> synced_contents_;
  std::map<std::string, std::map<std::string, InodeKey>> durable_entries_;  // by tracked dir
  std::string harness_error_;  // first bookkeeping failure, reported by simulate_power_loss()
};

}  // namespace jobengine::persist
