#include "tests/persistence/fault_file_system.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>

namespace jobengine::persist {
namespace {

// Direct POSIX helpers for the power-loss bookkeeping: they are the test
// harness's own I/O, not calls of the code under test, so they bypass the
// rules and counters.
bool read_all_fd(int fd, std::string* out) {
  out->clear();
  char buf[8192];
  for (;;) {
    ssize_t n = ::read(fd, buf, sizeof buf);
    if (n < 0) {
      if (errno == EINTR) continue;
      return false;
    }
    if (n == 0) return true;
    out->append(buf, static_cast<std::size_t>(n));
  }
}

bool read_all_path(const std::string& path, std::string* out, bool follow = false) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | (follow ? 0 : O_NOFOLLOW));
  if (fd < 0) return false;
  bool ok = read_all_fd(fd, out);
  ::close(fd);
  return ok;
}

bool write_all_path(const std::string& path, const std::string& contents) {
  int fd = ::open(path.c_str(), O_CREAT | O_TRUNC | O_WRONLY | O_NOFOLLOW | O_CLOEXEC, 0600);
  if (fd < 0) return false;
  std::size_t done = 0;
  while (done < contents.size()) {
    ssize_t n = ::write(fd, contents.data() + done, contents.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      ::close(fd);
      return false;
    }
    done += static_cast<std::size_t>(n);
  }
  return ::close(fd) == 0;
}

void set_error(std::string* error, std::string text) {
  if (error != nullptr) *error = std::move(text);
}

}  // namespace

const char* fault_op_name(FaultOp op) {
  switch (op) {
    case FaultOp::kOpen:
      return "open";
    case FaultOp::kWrite:
      return "write";
    case FaultOp::kRead:
      return "read";
    case FaultOp::kFsync:
      return "fsync";
    case FaultOp::kDirFsync:
      return "dir-fsync";
    case FaultOp::kClose:
      return "close";
    case FaultOp::kRename:
      return "rename";
    case FaultOp::kUnlink:
      return "unlink";
    case FaultOp::kMkdir:
      return "mkdir";
    case FaultOp::kFchmod:
      return "fchmod";
    case FaultOp::kChmod:
      return "chmod";
    case FaultOp::kListDir:
      return "list_dir";
    case FaultOp::kLock:
      return "lock";
    case FaultOp::kWriteback:
      return "writeback";
    case FaultOp::kTruncate:
      return "truncate";
    case FaultOp::kLstat:
      return "lstat";
  }
  return "?";
}

FaultFileSystem::FaultFileSystem(std::shared_ptr<FileSystem> base) : base_(std::move(base)) {}

void FaultFileSystem::add_rule(FaultRule rule) {
  std::lock_guard<std::mutex> lock(mu_);
  rules_.push_back(RuleState{std::move(rule), 0});
}

void FaultFileSystem::clear_rules() {
  std::lock_guard<std::mutex> lock(mu_);
  rules_.clear();
}

std::uint64_t FaultFileSystem::calls(FaultOp op) const {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = calls_.find(op);
  return it == calls_.end() ? 0 : it->second;
}

std::uint64_t FaultFileSystem::injected(FaultOp op) const {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = injected_.find(op);
  return it == injected_.end() ? 0 : it->second;
}

std::size_t FaultFileSystem::open_descriptors() const {
  std::lock_guard<std::mutex> lock(mu_);
  return open_files_.size();
}

std::vector<std::string> FaultFileSystem::cloexec_violations() const {
  std::lock_guard<std::mutex> lock(mu_);
  return cloexec_violations_;
}

const FaultRule* FaultFileSystem::check(FaultOp op, const std::string& path,
                                        const std::string& other) {
  ++calls_[op];
  const FaultRule* fired = nullptr;
  for (RuleState& state : rules_) {
    const FaultRule& rule = state.rule;
    if (rule.op != op) continue;
    if (!rule.path_contains.empty() && path.find(rule.path_contains) == std::string::npos &&
        other.find(rule.path_contains) == std::string::npos) {
      continue;
    }
    ++state.seen;
    const bool due = state.seen == rule.nth || (rule.every && state.seen > rule.nth);
    if (due && fired == nullptr) fired = &rule;
  }
  if (fired != nullptr) ++injected_[op];
  return fired;
}

std::string FaultFileSystem::fd_path(int fd) const {
  auto it = open_files_.find(fd);
  return it == open_files_.end() ? std::string() : it->second.path;
}

SysResult<int> FaultFileSystem::open(const std::string& path, int flags, mode_t mode) {
  std::lock_guard<std::mutex> lock(mu_);
  if (const FaultRule* rule = check(FaultOp::kOpen, path)) return {-1, rule->error};
  SysResult<int> r = base_->open(path, flags, mode);
  if (!r.ok()) return r;
  int fd_flags = ::fcntl(r.value, F_GETFD);
  if (fd_flags < 0 || (fd_flags & FD_CLOEXEC) == 0) cloexec_violations_.push_back(path);
  SysResult<FileInfo> info = base_->fstat(r.value);
  open_files_[r.value] = OpenFile{path, info.ok() && info.value.kind == FileInfo::Kind::kDirectory};
  return r;
}

SysResult<std::size_t> FaultFileSystem::write(int fd, const void* data, std::size_t size) {
  std::lock_guard<std::mutex> lock(mu_);
  if (const FaultRule* rule = check(FaultOp::kWrite, fd_path(fd))) {
    if (rule->short_write == 0) return {0, rule->error};
    size = std::min(size, rule->short_write);
  }
  return base_->write(fd, data, size);
}

void FaultFileSystem::set_before_read(std::function<void(const std::string&)> hook) {
  std::lock_guard<std::mutex> lock(mu_);
  before_read_ = std::move(hook);
}

SysResult<std::size_t> FaultFileSystem::read(int fd, void* data, std::size_t size) {
  std::lock_guard<std::mutex> lock(mu_);
  if (const FaultRule* rule = check(FaultOp::kRead, fd_path(fd))) return {0, rule->error};
  if (before_read_) before_read_(fd_path(fd));
  return base_->read(fd, data, size);
}

SysResult<const void*> FaultFileSystem::map_read(int fd, std::size_t size) {
  std::lock_guard<std::mutex> lock(mu_);
  if (const FaultRule* rule = check(FaultOp::kRead, fd_path(fd))) return {nullptr, rule->error};
  if (before_read_) before_read_(fd_path(fd));
  return base_->map_read(fd, size);
}

int FaultFileSystem::start_writeback(int fd, std::uint64_t offset, std::uint64_t size) {
  std::lock_guard<std::mutex> lock(mu_);
  if (const FaultRule* rule = check(FaultOp::kWriteback, fd_path(fd))) return rule->error;
  return base_->start_writeback(fd, offset, size);
}

int FaultFileSystem::fsync(int fd) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = open_files_.find(fd);
  const bool is_dir = it != open_files_.end() && it->second.is_dir;
  const std::string path = it == open_files_.end() ? std::string() : it->second.path;
  if (const FaultRule* rule = check(is_dir ? FaultOp::kDirFsync : FaultOp::kFsync, path)) {
    return rule->error;
  }
  int err = base_->fsync(fd);
  if (err != 0) return err;
  // What a successful fsync made durable. A bookkeeping failure is the
  // harness's problem, not the store's: it does not fail the call but is
  // kept and reported by simulate_power_loss().
  std::string error;
  bool recorded = true;
  if (is_dir) {
    const std::string dir = strip_trailing_slashes(path);
    if (durable_entries_.count(dir) != 0) recorded = record_dir_entries(dir, &error);
  } else {
    recorded = record_file_contents(fd, &error);
  }
  if (!recorded && harness_error_.empty()) harness_error_ = "after fsync of " + path + ": " + error;
  return 0;
}

int FaultFileSystem::close(int fd) {
  std::lock_guard<std::mutex> lock(mu_);
  const std::string path = fd_path(fd);
  const FaultRule* rule = check(FaultOp::kClose, path);
  open_files_.erase(fd);
  int err = base_->close(fd);  // released even when the rule fires, as on Linux
  if (rule != nullptr) return rule->error;
  return err;
}

int FaultFileSystem::rename(const std::string& from, const std::string& to) {
  std::lock_guard<std::mutex> lock(mu_);
  if (const FaultRule* rule = check(FaultOp::kRename, from, to)) return rule->error;
  return base_->rename(from, to);
}

int FaultFileSystem::rename_noreplace(const std::string& from, const std::string& to) {
  std::lock_guard<std::mutex> lock(mu_);
  if (const FaultRule* rule = check(FaultOp::kRename, from, to)) return rule->error;
  return base_->rename_noreplace(from, to);
}

int FaultFileSystem::ftruncate(int fd, std::uint64_t size) {
  std::lock_guard<std::mutex> lock(mu_);
  if (const FaultRule* rule = check(FaultOp::kTruncate, fd_path(fd))) return rule->error;
  return base_->ftruncate(fd, size);
}

int FaultFileSystem::unlink(const std::string& path) {
  std::lock_guard<std::mutex> lock(mu_);
  if (const FaultRule* rule = check(FaultOp::kUnlink, path)) return rule->error;
  return base_->unlink(path);
}

int FaultFileSystem::mkdir(const std::string& path, mode_t mode) {
  std::lock_guard<std::mutex> lock(mu_);
  if (const FaultRule* rule = check(FaultOp::kMkdir, path)) return rule->error;
  return base_->mkdir(path, mode);
}

int FaultFileSystem::fchmod(int fd, mode_t mode) {
  std::lock_guard<std::mutex> lock(mu_);
  if (const FaultRule* rule = check(FaultOp::kFchmod, fd_path(fd))) return rule->error;
  return base_->fchmod(fd, mode);
}

int FaultFileSystem::chmod(const std::string& path, mode_t mode) {
  std::lock_guard<std::mutex> lock(mu_);
  if (const FaultRule* rule = check(FaultOp::kChmod, path)) return rule->error;
  return base_->chmod(path, mode);
}

SysResult<FileInfo> FaultFileSystem::lstat(const std::string& path) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (const FaultRule* rule = check(FaultOp::kLstat, path)) return {FileInfo{}, rule->error};
  }
  return base_->lstat(path);
}

SysResult<FileInfo> FaultFileSystem::fstat(int fd) {
  return base_->fstat(fd);  // not a fault point
}

SysResult<std::vector<std::string>> FaultFileSystem::list_dir(const std::string& path) {
  std::lock_guard<std::mutex> lock(mu_);
  if (const FaultRule* rule = check(FaultOp::kListDir, path)) return {{}, rule->error};
  return base_->list_dir(path);
}

int FaultFileSystem::lock_exclusive(int fd) {
  std::lock_guard<std::mutex> lock(mu_);
  if (const FaultRule* rule = check(FaultOp::kLock, fd_path(fd))) return rule->error;
  return base_->lock_exclusive(fd);
}

// ---- power loss ----------------------------------------------------------

bool FaultFileSystem::record_file_contents(int fd, std::string* error) {
  SysResult<FileInfo> info = base_->fstat(fd);
  if (!info.ok()) {
    set_error(error, "fstat: " + errno_text(info.error));
    return false;
  }
  // The descriptor may be write-only: read the same inode through /proc.
  std::string contents;
  if (!read_all_path("/proc/self/fd/" + std::to_string(fd), &contents, /*follow=*/true)) {
    set_error(error, "reading back fd " + std::to_string(fd) + ": " + errno_text(errno));
    return false;
  }
  synced_contents_[InodeKey{info.value.device, info.value.inode}] = std::move(contents);
  return true;
}

bool FaultFileSystem::record_dir_entries(const std::string& dir, std::string* error) {
  SysResult<std::vector<std::string>> names = base_->list_dir(dir);
  if (!names.ok()) {
    set_error(error, "list " + dir + ": " + errno_text(names.error));
    return false;
  }
  std::map<std::string, InodeKey> entries;
  for (const std::string& name : names.value) {
    SysResult<FileInfo> info = base_->lstat(dir + "/" + name);
    if (!info.ok() || info.value.kind != FileInfo::Kind::kRegular) continue;
    entries[name] = InodeKey{info.value.device, info.value.inode};
  }
  durable_entries_[dir] = std::move(entries);
  return true;
}

bool FaultFileSystem::mark_durable(const std::string& dir_arg, std::string* error) {
  std::lock_guard<std::mutex> lock(mu_);
  const std::string dir = strip_trailing_slashes(dir_arg);
  if (!record_dir_entries(dir, error)) return false;
  for (const auto& [name, key] : durable_entries_[dir]) {
    std::string contents;
    if (!read_all_path(dir + "/" + name, &contents)) {
      set_error(error, "read " + dir + "/" + name + ": " + errno_text(errno));
      return false;
    }
    synced_contents_[key] = std::move(contents);
  }
  return true;
}

bool FaultFileSystem::simulate_power_loss(const std::string& dir_arg, std::string* error) {
  const std::string dir = strip_trailing_slashes(dir_arg);
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!harness_error_.empty()) {
      set_error(error, "power-loss bookkeeping failed " + harness_error_);
      return false;
    }
    auto tracked = durable_entries_.find(dir);
    if (tracked == durable_entries_.end()) {
      set_error(error, dir + " was never passed to mark_durable()");
      return false;
    }
    const std::map<std::string, InodeKey> durable = tracked->second;

    // Entries created (or renamed here) since the last directory fsync vanish.
    SysResult<std::vector<std::string>> names = base_->list_dir(dir);
    if (!names.ok()) {
      set_error(error, "list " + dir + ": " + errno_text(names.error));
      return false;
    }
    for (const std::string& name : names.value) {
      const std::string path = dir + "/" + name;
      SysResult<FileInfo> info = base_->lstat(path);
      if (!info.ok() || info.value.kind != FileInfo::Kind::kRegular) continue;
      if (durable.count(name) == 0 && ::unlink(path.c_str()) != 0) {
        set_error(error, "unlink " + path + ": " + errno_text(errno));
        return false;
      }
    }
    // Durable names come back with their inode's last synced contents
    // (an unlink not followed by a directory fsync is undone too).
    for (const auto& [name, key] : durable) {
      const std::string path = dir + "/" + name;
      auto synced = synced_contents_.find(key);
      const std::string want = synced == synced_contents_.end() ? std::string() : synced->second;
      SysResult<FileInfo> info = base_->lstat(path);
      std::string have;
      if (info.ok() && info.value.kind == FileInfo::Kind::kRegular &&
          InodeKey{info.value.device, info.value.inode} == key && read_all_path(path, &have) &&
          have == want) {
        continue;  // untouched since it became durable
      }
      const std::string scratch = dir + "/.powerloss-restore";
      if (!write_all_path(scratch, want) || ::rename(scratch.c_str(), path.c_str()) != 0) {
        set_error(error, "restore " + path + ": " + errno_text(errno));
        return false;
      }
    }
  }
  // After the "reboot" the directory as it now is, is what is durable.
  return mark_durable(dir, error);
}

}  // namespace jobengine::persist
