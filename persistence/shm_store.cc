// ShmStore: see shm_store.h for the segment layout, the invariants and the
// placement rule. The one file that includes Boost.Interprocess: every
// boost::interprocess::interprocess_exception and std::bad_alloc is caught in
// the public functions below and returned as a Status.
//
// Memory orders, shared by the writer (publish) and readers (read_image):
//  - The writer makes the inactive slot's version odd, then a release fence,
//    then writes the slot (descriptor and image bytes, relaxed atomics), then
//    stores the even version with release and flips `active` with release.
//  - A reader acquire-loads `active` and the slot's version (pairing with the
//    two release stores: it sees the complete slot), copies it with relaxed
//    atomic loads, then an acquire fence and a relaxed reload of the version.
//    If its copy read any byte written after the writer's release fence, the
//    fences synchronise and the reload sees the newer (odd) version, so a
//    torn copy is always discarded (Boehm, "Can seqlocks get along with
//    programming language memory models?", 2012).
//  - publish() and readers move image bytes with relaxed 8-byte atomic loads
//    and stores, not memcpy: a slow reader and the writer may touch the same
//    bytes, and the atomics make that race defined (and visible to
//    ThreadSanitizer as none). An image built in place (begin_image) is
//    written with plain stores by its encoder: a race only with an
//    in-process read_active(), which the engine never runs meanwhile
//    (shm_store.h); the fences above still order it for readers in other
//    processes, which the C++ memory model does not cover anyway.
//  - read_existing() (recovery, jobsnap: a reader in another process) never
//    maps the segment: it reads it with pread(2), so that a segment truncated
//    under it (by anyone) is a short read and an error, not SIGBUS. The
//    kernel's copy stands in for relaxed loads, and each attempt keeps the
//    order above: pread the header and slot descriptors into a local buffer,
//    acquire fence (the `active` and version it read now act as the acquire
//    loads above); pread the active slot's descriptor again (its fields come
//    after the version, as load_slot's do above); pread the image straight
//    into the output; acquire fence; pread the version again. If any byte
//    read came from a write after the writer's release fence, the fences
//    synchronise and the last pread sees a newer version: the copy is
//    retried, as above. The kernel is not promised to read an aligned word
//    in one access: a version torn between two values is odd, or differs
//    from its reread, or (a carry) reads 0, which is reread before "no
//    image" is reported. The fences are the same instructions as above;
//    across processes this is the hardware's model, not C++'s, either way.
#include "persistence/shm_store.h"

#include "persistence/file_system.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/file.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cassert>
#include <bit>
#include <boost/interprocess/exceptions.hpp>
#include <boost/interprocess/mapped_region.hpp>
#include <boost/interprocess/permissions.hpp>
#include <boost/interprocess/shared_memory_object.hpp>
#include <cerrno>
#include <chrono>
#include <cstddef>
#include <cstdio>
#include <cstring>
#include <new>
#include <system_error>
#include <thread>
#include <type_traits>
#include <utility>

#include "jobengine/snapshot_format.h"  // snapshot::checksum (XXH3-64)

namespace jobengine::persist {
namespace {

namespace bip = boost::interprocess;

constexpr std::size_t kControlBytes = 4096;
constexpr std::uint32_t kLayoutVersion = 1;
constexpr std::size_t kSlotAlign = 4096;
// Far beyond any real image; keeps every size sum below far from overflow.
constexpr std::size_t kMaxImageBytes = std::size_t{1} << 40;
constexpr std::size_t kMaxNameBytes = 200;
constexpr int kMaxReadAttempts = 100;
// read_existing(): fresh reads after one that found the segment shrunk.
constexpr int kMaxShrinkRetries = 3;
constexpr mode_t kSegmentMode = 0600;
constexpr std::uint64_t kMagic =
    std::bit_cast<std::uint64_t>(std::array<char, 8>{'J', 'O', 'B', 'S', 'H', 'M', '0', '1'});

// One slot descriptor (shm_store.h, "Segment layout").
struct SlotDescriptor {
  std::atomic<std::uint64_t> version;
  std::atomic<std::uint64_t> offset;
  std::atomic<std::uint64_t> capacity;
  std::atomic<std::uint64_t> length;
  std::atomic<std::uint64_t> generation;
  std::atomic<std::uint64_t> checksum;
  unsigned char reserved[16];
};

// The 4096-byte control block at offset 0 of the segment. Never constructed:
// it is the zero-filled memory of the segment, read through this type (a
// lock-free atomic has the representation of its value type, and zero bytes
// are the value 0).
struct ControlBlock {
  std::atomic<std::uint64_t> magic;
  std::atomic<std::uint32_t> layout_version;
  std::atomic<std::uint32_t> control_bytes;
  std::atomic<std::uint64_t> writer_pid;
  unsigned char reserved0[40];
  std::atomic<std::uint32_t> active;
  unsigned char reserved1[60];
  SlotDescriptor slots[2];
  unsigned char reserved2[kControlBytes - 256];
};

// Atomics in memory shared between processes must be lock-free (hence
// address-free) and have exactly their value's size.
static_assert(std::atomic<std::uint32_t>::is_always_lock_free);
static_assert(std::atomic<std::uint64_t>::is_always_lock_free);
static_assert(sizeof(std::atomic<std::uint32_t>) == 4 && sizeof(std::atomic<std::uint64_t>) == 8);
static_assert(std::atomic_ref<std::uint64_t>::is_always_lock_free &&
              std::atomic_ref<std::uint64_t>::required_alignment <= 8);
static_assert(std::atomic_ref<unsigned char>::is_always_lock_free);
static_assert(std::is_standard_layout_v<SlotDescriptor> && sizeof(SlotDescriptor) == 64);
static_assert(std::is_standard_layout_v<ControlBlock> && sizeof(ControlBlock) == kControlBytes);
static_assert(offsetof(ControlBlock, layout_version) == 8);
static_assert(offsetof(ControlBlock, control_bytes) == 12);
static_assert(offsetof(ControlBlock, writer_pid) == 16);
static_assert(offsetof(ControlBlock, active) == 64);
static_assert(offsetof(ControlBlock, slots) == 128);
static_assert(offsetof(SlotDescriptor, checksum) == 40);

// A plain copy of one descriptor.
struct SlotView {
  std::uint64_t version = 0;
  std::uint64_t offset = 0;
  std::uint64_t capacity = 0;
  std::uint64_t length = 0;
  std::uint64_t generation = 0;
  std::uint64_t checksum = 0;
};

// Relaxed: callers order these loads with the version protocol (see the top).
SlotView load_slot(const SlotDescriptor& d) noexcept {
  SlotView s;
  s.version = d.version.load(std::memory_order_relaxed);
  s.offset = d.offset.load(std::memory_order_relaxed);
  s.capacity = d.capacity.load(std::memory_order_relaxed);
  s.length = d.length.load(std::memory_order_relaxed);
  s.generation = d.generation.load(std::memory_order_relaxed);
  s.checksum = d.checksum.load(std::memory_order_relaxed);
  return s;
}

// A slot's extent lies inside a `size`-byte segment, past the control block,
// 8-byte aligned, and holds its length. A slot without storage (capacity 0)
// holds only an empty image.
bool extent_ok(const SlotView& s, std::size_t size) noexcept {
  if (s.length > s.capacity) return false;
  if (s.capacity == 0) return true;
  return s.offset >= kControlBytes && s.offset % 8 == 0 && s.offset <= size &&
         s.capacity <= size - s.offset;
}

bool overlaps(const SlotView& a, const SlotView& b) noexcept {
  if (a.capacity == 0 || b.capacity == 0) return false;
  return a.offset < b.offset + b.capacity && b.offset < a.offset + a.capacity;
}

std::size_t round_up(std::size_t n, std::size_t align) noexcept {
  return (n + align - 1) / align * align;
}

std::size_t page_size() noexcept {
  const long page = ::sysconf(_SC_PAGESIZE);
  return page > 0 ? static_cast<std::size_t>(page) : 4096;
}

// Copies `n` bytes out of the segment at `src` (8-byte aligned) with relaxed
// atomic loads: the writer may be rewriting them (see the top).
void load_bytes(unsigned char* dst, const unsigned char* src, std::size_t n) noexcept {
  auto* words = reinterpret_cast<std::uint64_t*>(const_cast<unsigned char*>(src));
  const std::size_t count = n / 8;
  for (std::size_t i = 0; i < count; ++i) {
    const std::uint64_t w =
        std::atomic_ref<std::uint64_t>(words[i]).load(std::memory_order_relaxed);
    std::memcpy(dst + i * 8, &w, 8);
  }
  for (std::size_t i = count * 8; i < n; ++i) {
    dst[i] = std::atomic_ref<unsigned char>(const_cast<unsigned char&>(src[i]))
                 .load(std::memory_order_relaxed);
  }
}

// Copies `n` bytes into the segment at `dst` (8-byte aligned) with relaxed
// atomic stores: a slow reader may be reading them (see the top).
void store_bytes(unsigned char* dst, const unsigned char* src, std::size_t n) noexcept {
  auto* words = reinterpret_cast<std::uint64_t*>(dst);
  const std::size_t count = n / 8;
  for (std::size_t i = 0; i < count; ++i) {
    std::uint64_t w;
    std::memcpy(&w, src + i * 8, 8);
    std::atomic_ref<std::uint64_t>(words[i]).store(w, std::memory_order_relaxed);
  }
  for (std::size_t i = count * 8; i < n; ++i) {
    std::atomic_ref<unsigned char>(dst[i]).store(src[i], std::memory_order_relaxed);
  }
}

// ---- messages -----------------------------------------------------------

std::string label(const std::string& name) { return "shm segment '" + name + "'"; }
std::string dev_shm_path(const std::string& name) { return "/dev/shm/" + name; }

std::string hex64(std::uint64_t v) {
  char buf[24];
  std::snprintf(buf, sizeof buf, "0x%016llx", static_cast<unsigned long long>(v));
  return buf;
}

std::string describe(const SlotView& s) {
  return "offset " + std::to_string(s.offset) + ", capacity " + std::to_string(s.capacity) +
         ", length " + std::to_string(s.length);
}

Status io_error(const std::string& name, const std::string& what, const std::string& detail) {
  return Status(StatusCode::kIoError, label(name) + ": " + what + ": " + detail);
}

Status corruption(const std::string& name, const std::string& what) {
  return Status(StatusCode::kCorruption, label(name) + ": " + what);
}

// kInvalidArgument for an image too large for any slot (publish, begin_image, grow_image).
Status image_too_large(const std::string& name, std::size_t size) {
  return Status(StatusCode::kInvalidArgument,
                label(name) + ": image of " + std::to_string(size) +
                    " bytes exceeds the limit of " + std::to_string(kMaxImageBytes));
}

Status out_of_memory(const std::string& name) {
  return Status(StatusCode::kIoError, label(name) + ": out of memory");
}

// uid_t is 32 bits on every platform we build for, so kAnyOwner, (uid_t)-1,
// is a value no user has (chown(2) reads it as "leave the owner alone").
static_assert(sizeof(uid_t) == sizeof(std::uint32_t));
static_assert(static_cast<uid_t>(-1) == ShmStore::kAnyOwner);

// A segment we must not attach to: not a regular file, readable by others,
// or not `owner`'s (kAnyOwner: anyone's; only read_existing() is given
// anything but this process's effective uid).
Status check_stat(const std::string& name, const struct stat& st, std::uint32_t owner) {
  const bool owner_ok = owner == ShmStore::kAnyOwner || st.st_uid == owner;
  if (S_ISREG(st.st_mode) && owner_ok && (st.st_mode & 07777) == kSegmentMode) {
    return Status();
  }
  const std::string expected =
      owner == ShmStore::kAnyOwner ? "expected" : "expected uid " + std::to_string(owner) + " and";
  return Status(StatusCode::kFailedPrecondition,
                label(name) + " (" + dev_shm_path(name) + ") is owned by uid " +
                    std::to_string(st.st_uid) + " with mode " + octal_mode(st.st_mode) +
                    (S_ISREG(st.st_mode) ? "" : " (not a regular file)") + "; " + expected +
                    " mode 0600: refusing to use it (remove it if it is stale)");
}

std::uint32_t effective_uid() noexcept { return static_cast<std::uint32_t>(::geteuid()); }

Status check_owner_and_mode(const std::string& name, int fd, std::uint32_t owner) {
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    const int err = errno;
    return io_error(name, "fstat", errno_text(err));
  }
  return check_stat(name, st, owner);
}

// shm_open said EACCES/EPERM: name the owner and mode when we can see them.
Status permission_refused(const std::string& name, const std::string& what,
                          std::uint32_t owner) {
  struct stat st;
  if (::stat(dev_shm_path(name).c_str(), &st) == 0) {
    Status s = check_stat(name, st, owner);
    if (!s.ok()) return s;
  }
  return Status(StatusCode::kFailedPrecondition,
                label(name) + ": permission denied (" + what + "): refusing to use it");
}

// shm_open (glibc adds O_NOFOLLOW) said ELOOP: /dev/shm/<name> is a symlink,
// which a segment of ours never is.
Status symlink_refused(const std::string& name) {
  return Status(StatusCode::kFailedPrecondition,
                label(name) + " (" + dev_shm_path(name) +
                    ") is a symlink: refusing to follow it (remove it if it is stale)");
}

// Before opening an existing segment: /dev/shm/<name> must be a regular
// file (lstat, so never followed). A FIFO there would block shm_open()
// O_RDONLY forever, and a symlink or device is never a segment of ours. A
// missing name is left to the open to report. /dev/shm is sticky, so once
// the entry is a regular file only its owner can swap it before the open,
// and the owner and mode are checked again on the descriptor.
Status check_entry(const std::string& name, std::uint32_t owner) {
  struct stat st;
  if (::lstat(dev_shm_path(name).c_str(), &st) != 0) return Status();
  if (S_ISLNK(st.st_mode)) return symlink_refused(name);
  if (!S_ISREG(st.st_mode)) return check_stat(name, st, owner);
  return Status();
}

Result<std::size_t> file_size(const std::string& name, int fd) {
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    const int err = errno;
    return io_error(name, "fstat", errno_text(err));
  }
  return static_cast<std::size_t>(st.st_size);
}

// Checks magic, layout version and size, and `active`. Sets *uninitialised
// (and returns OK) when the magic is zero: the creator died before finishing.
Status check_header(const std::string& name, const ControlBlock& c, bool* uninitialised) {
  *uninitialised = false;
  // Acquire: pairs with the release store that completes initialisation.
  const std::uint64_t magic = c.magic.load(std::memory_order_acquire);
  if (magic == 0) {
    *uninitialised = true;
    return Status();
  }
  if (magic != kMagic) {
    return corruption(
        name, "bad magic " + hex64(magic) + " in the control block (expected \"JOBSHM01\")");
  }
  // Relaxed: written once, before the magic.
  const std::uint32_t version = c.layout_version.load(std::memory_order_relaxed);
  if (version != kLayoutVersion) {
    return Status(StatusCode::kFailedPrecondition,
                  label(name) + ": layout version " + std::to_string(version) +
                      ", this build reads layout version " + std::to_string(kLayoutVersion));
  }
  const std::uint32_t control = c.control_bytes.load(std::memory_order_relaxed);
  if (control != kControlBytes) {
    return corruption(name, "control block size " + std::to_string(control) + " (expected 4096)");
  }
  // Relaxed: only checked for range here; readers reload it with acquire.
  const std::uint32_t active = c.active.load(std::memory_order_relaxed);
  if (active > 1) {
    return corruption(name, "active slot index " + std::to_string(active) + " (expected 0 or 1)");
  }
  return Status();
}

// One mapping of the segment, from offset 0, through Boost (region); or, in
// parse_segment(), a view of a private copy (no region).
struct Mapping {
  bip::mapped_region region;
  unsigned char* base = nullptr;
  std::size_t size = 0;
  Mapping() = default;
  Mapping(const Mapping&) = delete;
  Mapping& operator=(const Mapping&) = delete;
};

// Throws interprocess_exception / bad_alloc: callers catch.
std::unique_ptr<Mapping> map_segment(const bip::shared_memory_object& shm, bip::mode_t mode,
                                     std::size_t size) {
  auto m = std::make_unique<Mapping>();
  m->region = bip::mapped_region(shm, mode, 0, size);
  m->base = static_cast<unsigned char*>(m->region.get_address());
  m->size = m->region.get_size();
  return m;
}

// Closes a descriptor when it goes out of scope.
class FdGuard {
 public:
  explicit FdGuard(int fd) noexcept : fd_(fd) {}
  FdGuard(const FdGuard&) = delete;
  FdGuard& operator=(const FdGuard&) = delete;
  ~FdGuard() {
    if (fd_ >= 0) ::close(fd_);
  }

 private:
  int fd_;
};

void backoff(int attempt) {
  if (attempt < 8) return;
  if (attempt < 32) {
    std::this_thread::yield();
  } else {
    std::this_thread::sleep_for(std::chrono::microseconds(50));
  }
}

// Where read_image() reads a segment from. Per attempt, a source gives:
//   begin_attempt()     fetches what active() and version() read (nothing
//                       for a mapping; PreadSource preads the descriptors)
//   active()            the active slot index, as an acquire load
//   version(a)          slot a's version, as an acquire load after active()
//   slot(a, &s)         slot a's descriptor, read after version(a)
//   size()              the segment's size, as known when slot() read it
//   copy(out, s)        the slot's image (s.length bytes) into `out`
//   reload_version(a)   an acquire fence, then slot a's version again
//   refresh()           true if the segment grew since size() was learnt
// A status other than OK from any of them ends the read with that status.

// A segment in this process's memory: the writer's own mapping
// (read_active) or a private copy of a segment (parse_segment). `current()`
// gives the mapping to read through; it is loaded after the version (in the
// writer's process, a mapping at least as new as the one the slot was
// written through).
template <typename CurrentFn>
class MappedSource {
 public:
  MappedSource(const ControlBlock& c, CurrentFn current) : c_(c), current_(std::move(current)) {}

  Status begin_attempt() const noexcept { return Status(); }
  // Acquire: pairs with the writer's flip; the slot's writes before it are visible.
  std::uint32_t active() const noexcept { return c_.active.load(std::memory_order_acquire); }
  // Acquire: pairs with the release store that completed the slot.
  std::uint64_t version(std::uint32_t a) const noexcept {
    return c_.slots[a].version.load(std::memory_order_acquire);
  }
  Status slot(std::uint32_t a, SlotView* s) {
    m_ = current_();
    *s = load_slot(c_.slots[a]);
    return Status();
  }
  std::size_t size() const noexcept { return m_->size; }
  // A slot without storage (capacity 0, so length 0) may carry any offset:
  // no pointer is formed from it (found by shm_segment_fuzzer).
  Status copy(std::vector<unsigned char>& out, const SlotView& s) const {
    out.resize(s.length);
    if (s.length != 0) load_bytes(out.data(), m_->base + s.offset, s.length);
    return Status();
  }
  // Relaxed reload after an acquire fence, which orders every load above
  // before it (seqlock read side; see the top).
  Status reload_version(std::uint32_t a, std::uint64_t* v) const noexcept {
    std::atomic_thread_fence(std::memory_order_acquire);
    *v = c_.slots[a].version.load(std::memory_order_relaxed);
    return Status();
  }
  // The writer maps a grown segment before describing a slot in it, and a
  // copy never grows.
  Result<bool> refresh() const { return false; }

 private:
  const ControlBlock& c_;
  CurrentFn current_;
  const Mapping* m_ = nullptr;
};

// The part of the control block a reader reads: the header and both slot
// descriptors (the rest is reserved, zero).
constexpr std::size_t kDescriptorBytes = offsetof(ControlBlock, slots) + 2 * sizeof(SlotDescriptor);
// The fields of a slot descriptor (not its reserved bytes).
constexpr std::size_t kSlotFieldBytes = offsetof(SlotDescriptor, reserved);
// PreadSource::copy() reads an image in pieces of this size.
constexpr std::size_t kReadPieceBytes = std::size_t{1} << 20;
static_assert(kDescriptorBytes == 256 && kSlotFieldBytes == 48);

// read_existing()'s source: the segment read with pread(2) on `fd`, never
// mapped, so that a segment truncated under the reader (by anyone) is a
// short read, reported by shrank(), instead of SIGBUS. Memory orders: see the
// top. `size` is the segment's size by fstat; refresh() learns a larger one
// when the writer has grown the segment.
class PreadSource {
 public:
  PreadSource(const std::string& name, int fd, std::size_t size) : name_(name), fd_(fd), size_(size) {}
  PreadSource(const PreadSource&) = delete;
  PreadSource& operator=(const PreadSource&) = delete;

  // Reads the header and slot descriptors into the local copy, then an
  // acquire fence: the relaxed loads of the copy below then order as the
  // acquire loads of the mapped segment do (see the top).
  Status load_control() {
    Status st = read_at(control_.data(), kDescriptorBytes, 0);
    std::atomic_thread_fence(std::memory_order_acquire);
    return st;
  }
  // The local copy (zero past kDescriptorBytes), read as the control block.
  const ControlBlock& control() const noexcept {
    return *reinterpret_cast<const ControlBlock*>(control_.data());
  }

  Status begin_attempt() { return load_control(); }
  // Relaxed: a private copy, ordered by load_control()'s fence.
  std::uint32_t active() const noexcept { return control().active.load(std::memory_order_relaxed); }
  std::uint64_t version(std::uint32_t a) const noexcept {
    return control().slots[a].version.load(std::memory_order_relaxed);
  }
  // The descriptor's fields read afresh, after the fence that followed the
  // version: at least as new as the version (one pread would not order them
  // after it: the kernel's copy may read a field before the version).
  Status slot(std::uint32_t a, SlotView* s) {
    alignas(SlotDescriptor) std::array<unsigned char, sizeof(SlotDescriptor)> d{};
    Status st = read_at(d.data(), kSlotFieldBytes, slot_at(a));
    if (!st.ok()) return st;
    *s = load_slot(*reinterpret_cast<const SlotDescriptor*>(d.data()));
    return Status();
  }
  std::size_t size() const noexcept { return size_; }
  // Straight into `out` (one copy, as through a mapping), a piece at a
  // time: each piece is faulted in (one madvise instead of a page fault per
  // page) and zero-filled by resize() just before it is read into, so that
  // it is still in the cache. (The kernel's copy is slower than the mapped
  // word loop when, as with malloc's 16-byte offset, the output is not
  // 64-byte aligned like the segment: on an AMD EPYC, 256 MiB read whole
  // after one resize() took about 10% longer than through a mapping; this
  // way it takes about 10% less.)
  Status copy(std::vector<unsigned char>& out, const SlotView& s) {
    out.clear();
    out.reserve(s.length);
    for (std::size_t done = 0; done < s.length;) {
      const std::size_t piece = std::min<std::size_t>(s.length - done, kReadPieceBytes);
      prefault_output(out.data() + done, piece);
      out.resize(done + piece);
      Status st = read_at(out.data() + done, piece, s.offset + done);
      if (!st.ok()) return st;
      done += piece;
    }
    return Status();
  }
  // The acquire fence orders the preads above before the reread (seqlock
  // read side; see the top).
  Status reload_version(std::uint32_t a, std::uint64_t* v) {
    std::atomic_thread_fence(std::memory_order_acquire);
    alignas(std::uint64_t) std::array<unsigned char, sizeof(std::uint64_t)> word{};
    Status st = read_at(word.data(), word.size(), slot_at(a) + offsetof(SlotDescriptor, version));
    std::memcpy(v, word.data(), word.size());
    return st;
  }
  Result<bool> refresh() {
    Result<std::size_t> now = file_size(name_, fd_);
    if (!now.ok()) return now.status();
    if (*now < size_) return shrank(*now);
    if (*now == size_) return false;
    size_ = *now;
    return true;
  }

  // Whether a read found the segment shorter than it was: another process
  // truncated it (the writer never shrinks it: invariant 3). shrink() is the
  // status the read then returned.
  bool shrank() const noexcept { return !shrink_.ok(); }
  const Status& shrink() const noexcept { return shrink_; }

 private:
  static std::uint64_t slot_at(std::uint32_t a) noexcept {
    return offsetof(ControlBlock, slots) + std::uint64_t{a} * sizeof(SlotDescriptor);
  }

  // Reads exactly `n` bytes at `offset`. A regular file reads short only at
  // its end, so a read that ends early means the segment shrank.
  Status read_at(unsigned char* dst, std::size_t n, std::uint64_t offset) {
    std::size_t done = 0;
    int interrupted = 0;
    while (done < n) {
      const ssize_t got = ::pread(fd_, dst + done, n - done, static_cast<off_t>(offset + done));
      if (got > 0) {
        done += static_cast<std::size_t>(got);
        continue;
      }
      if (got == 0) {
        Result<std::size_t> now = file_size(name_, fd_);
        return shrank(now.ok() ? *now : offset + done);
      }
      const int err = errno;
      if (err == EINTR && ++interrupted < kMaxEintrRetries) continue;
      return io_error(name_,
                      "cannot read " + std::to_string(n) + " bytes at offset " +
                          std::to_string(offset),
                      errno_text(err));
    }
    return Status();
  }

  // Faults in the whole pages of [p, p + n), memory of ours about to be
  // written, in one call. Only a speed-up: failure (a kernel before 5.14)
  // leaves the faults to resize().
  void prefault_output(unsigned char* p, std::size_t n) const noexcept {
#ifdef MADV_POPULATE_WRITE
    const auto begin = round_up(reinterpret_cast<std::uintptr_t>(p), page_);
    const auto end = (reinterpret_cast<std::uintptr_t>(p) + n) / page_ * page_;
    if (end > begin) {
      (void)::madvise(reinterpret_cast<void*>(begin), end - begin, MADV_POPULATE_WRITE);
    }
#else
    (void)p;
    (void)n;
#endif
  }

  Status shrank(std::size_t now) {
    shrink_ = corruption(name_, "shrank while being read (" + std::to_string(size_) +
                                    " bytes when the read began, " + std::to_string(now) +
                                    " now): another process truncated " + dev_shm_path(name_));
    return shrink_;
  }

  const std::string& name_;
  int fd_;
  std::size_t size_;
  std::size_t page_ = page_size();
  Status shrink_;
  alignas(ControlBlock) std::array<unsigned char, sizeof(ControlBlock)> control_{};
};

// Copies the active image out of a segment whose header was checked, through
// `src` (above). The writer may publish concurrently (see the top).
// `max_attempts` is 1 for a copy of a segment (no writer can move it on);
// `verify_checksum` is false only for fuzzing (ShmStore::parse_segment).
template <typename Source>
Result<std::vector<unsigned char>> read_image(const std::string& name, Source& src,
                                              int max_attempts = kMaxReadAttempts,
                                              bool verify_checksum = true) {
  std::vector<unsigned char> out;
  int stuck = 0;  // attempts in a row that found the same active slot mid-write
  std::uint32_t stuck_slot = 2;
  std::uint64_t stuck_version = 0;
  for (int attempt = 0; attempt < max_attempts; ++attempt) {
    backoff(attempt);
    if (Status st = src.begin_attempt(); !st.ok()) return st;
    const std::uint32_t a = src.active();
    if (a > 1) {
      return corruption(name, "active slot index " + std::to_string(a) + " (expected 0 or 1)");
    }
    const std::uint64_t v1 = src.version(a);
    if (v1 == 0) {
      // Reread first: a version torn by a pread may read 0 (see the top).
      std::uint64_t v2 = 0;
      if (Status st = src.reload_version(a, &v2); !st.ok()) return st;
      if (v2 != 0) continue;
      return Status(StatusCode::kNotFound, label(name) + " holds no image yet");
    }
    if (v1 % 2 == 1) {  // the writer overtook us: it is rewriting this slot
      if (a == stuck_slot && v1 == stuck_version) {
        ++stuck;
      } else {
        stuck = 1;
        stuck_slot = a;
        stuck_version = v1;
      }
      continue;
    }
    stuck = 0;
    SlotView s;
    if (Status st = src.slot(a, &s); !st.ok()) return st;
    const std::size_t size = src.size();
    if (!extent_ok(s, size)) {
      std::uint64_t v2 = 0;
      if (Status st = src.reload_version(a, &v2); !st.ok()) return st;
      if (v2 != v1) continue;
      Result<bool> grew = src.refresh();
      if (!grew.ok()) return grew.status();
      if (*grew) continue;
      return corruption(name, "slot " + std::to_string(a) + " descriptor (" + describe(s) +
                                  ") does not fit the " + std::to_string(size) + "-byte segment");
    }
    if (Status st = src.copy(out, s); !st.ok()) return st;
    std::uint64_t v2 = 0;
    if (Status st = src.reload_version(a, &v2); !st.ok()) return st;
    if (v2 != v1) continue;  // torn: retry
    if (!verify_checksum) return out;
    const std::uint64_t sum = snapshot::checksum(out.data(), out.size());
    if (sum != s.checksum) {
      return corruption(name, "slot " + std::to_string(a) + " (generation " +
                                  std::to_string(s.generation) + ", " + std::to_string(s.length) +
                                  " bytes): checksum " + hex64(sum) +
                                  " does not match the descriptor's " + hex64(s.checksum));
    }
    return out;
  }
  if (stuck == max_attempts) {
    return corruption(name, "active slot " + std::to_string(stuck_slot) +
                                " is marked mid-write (version " + std::to_string(stuck_version) +
                                ") and stays so");
  }
  return Status(StatusCode::kFailedPrecondition,
                label(name) + ": gave up after " + std::to_string(max_attempts) +
                    " attempts: the writer rewrote the slot during every copy");
}

// One try of read_existing() on the open segment `fd`: its size, header and
// active image, all read with pread(2) (PreadSource). Sets *shrink to the
// status returned when the segment was found shrunk.
Result<std::vector<unsigned char>> read_segment(const std::string& name, int fd, Status* shrink) {
  Result<std::size_t> size = file_size(name, fd);
  if (!size.ok()) return size.status();
  if (*size == 0) {
    return Status(StatusCode::kNotFound, label(name) + " holds no image yet (never initialised)");
  }
  if (*size < kControlBytes) {
    return corruption(name, "truncated: " + std::to_string(*size) +
                                " bytes, smaller than the 4096-byte control block");
  }
  PreadSource src(name, fd, *size);
  Result<std::vector<unsigned char>> read = [&]() -> Result<std::vector<unsigned char>> {
    Status st = src.load_control();
    if (!st.ok()) return st;
    bool uninitialised = false;
    st = check_header(name, src.control(), &uninitialised);
    if (!st.ok()) return st;
    if (uninitialised) {
      return Status(StatusCode::kNotFound, label(name) + " holds no image yet (never initialised)");
    }
    return read_image(name, src);
  }();
  if (src.shrank()) *shrink = src.shrink();
  return read;
}

}  // namespace

Status ShmStore::check_name(const std::string& name) {
  bool ok = !name.empty() && name.size() <= kMaxNameBytes && name != "." && name != "..";
  for (const char c : name) {
    const bool allowed = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
                         (c >= '0' && c <= '9') || c == '.' || c == '_' || c == '-';
    ok = ok && allowed;
  }
  if (ok) return Status();
  return Status(StatusCode::kInvalidArgument,
                "shm segment name '" + name +
                    "' is invalid: use 1..200 characters of [A-Za-z0-9._-], not '.' or '..'");
}

// ---- Impl -------------------------------------------------------------------

struct ShmStore::Impl {
  std::string name;
  bip::shared_memory_object shm;
  int fd = -1;
  std::size_t page = 4096;
  // Every mapping made, oldest first; none is unmapped before ~Impl, so an
  // in-process reader may keep using the one it loaded (invariant 3). Only
  // the writer thread (open_or_create, publish) changes the vector.
  std::vector<std::unique_ptr<Mapping>> mappings;
  // The newest mapping. Release store after it is complete, acquire load.
  std::atomic<const Mapping*> current{nullptr};
  ControlBlock* control = nullptr;  // in mappings.front(), valid in all of them
  // The slot begin_image() opened (-1: none) and the odd version it set.
  int writing = -1;
  std::uint64_t writing_odd = 0;

  const Mapping& writer_mapping() const noexcept {
    return *current.load(std::memory_order_relaxed);  // the writer's own store
  }

  // Grows the segment to at least `size` bytes, allocating the space now.
  Status ensure_size(std::size_t size) {
    Result<std::size_t> have = file_size(name, fd);
    if (!have.ok()) return have.status();
    if (*have >= size) return Status();
    // From 0: also fills holes left by a creator that died after ftruncate.
    const int rc = allocate_retrying_eintr(fd, size);
    if (rc != 0) {
      return io_error(
          name,
          "cannot grow from " + std::to_string(*have) + " to " + std::to_string(size) + " bytes",
          errno_text(rc));
    }
    return Status();
  }

  // Maps the whole segment (as large as it now is) and makes it current.
  Status map_all() {
    Result<std::size_t> size = file_size(name, fd);
    if (!size.ok()) return size.status();
    std::unique_ptr<Mapping> m;
    try {
      m = map_segment(shm, bip::read_write, *size);
    } catch (const bip::interprocess_exception& e) {
      return io_error(name, "cannot map " + std::to_string(*size) + " bytes", e.what());
    }
    if (control == nullptr) control = reinterpret_cast<ControlBlock*>(m->base);
    mappings.push_back(std::move(m));
    current.store(mappings.back().get(), std::memory_order_release);
    return Status();
  }

  // Faults in [offset, offset + length) of the current mapping for writing,
  // so that publishes into it do not page-fault. Changes no byte.
  Status prefault(std::size_t offset, std::size_t length) {
    if (length == 0) return Status();
    const Mapping& m = writer_mapping();
    const std::size_t begin = offset / page * page;
    const std::size_t end = std::min(round_up(offset + length, page), m.size);
#ifdef MADV_POPULATE_WRITE
    if (::madvise(m.base + begin, end - begin, MADV_POPULATE_WRITE) == 0) return Status();
    const int err = errno;
    if (err != EINVAL) {
      return io_error(name, "cannot pre-fault " + std::to_string(end - begin) + " bytes",
                      errno_text(err));
    }
#endif
    // Kernels before 5.14: one atomic read-modify-write per page (a reader
    // may be copying these bytes; adding 0 changes nothing).
    for (std::size_t at = begin; at < end; at += page) {
      std::atomic_ref<std::uint64_t>(*reinterpret_cast<std::uint64_t*>(m.base + at))
          .fetch_add(0, std::memory_order_relaxed);
    }
    return Status();
  }

  // Writes a fresh control block with `per_slot` bytes of storage per slot.
  // No image exists yet, so no reader gets past the zero magic meanwhile.
  Status initialise(std::size_t per_slot) {
    const std::size_t cap = round_up(per_slot, kSlotAlign);
    Status st = ensure_size(kControlBytes + 2 * cap);
    if (!st.ok()) return st;
    st = map_all();
    if (!st.ok()) return st;
    st = prefault(0, kControlBytes + 2 * cap);
    if (!st.ok()) return st;
    ControlBlock& c = *control;
    // Relaxed: published by the release store of the magic below.
    c.magic.store(0, std::memory_order_relaxed);
    c.layout_version.store(kLayoutVersion, std::memory_order_relaxed);
    c.control_bytes.store(static_cast<std::uint32_t>(kControlBytes), std::memory_order_relaxed);
    c.writer_pid.store(static_cast<std::uint64_t>(::getpid()), std::memory_order_relaxed);
    c.active.store(0, std::memory_order_relaxed);
    for (int i = 0; i < 2; ++i) {
      SlotDescriptor& d = c.slots[i];
      d.version.store(0, std::memory_order_relaxed);
      d.offset.store(cap == 0 ? 0 : kControlBytes + static_cast<std::size_t>(i) * cap,
                     std::memory_order_relaxed);
      d.capacity.store(cap, std::memory_order_relaxed);
      d.length.store(0, std::memory_order_relaxed);
      d.generation.store(0, std::memory_order_relaxed);
      d.checksum.store(0, std::memory_order_relaxed);
    }
    // Release: a reader that sees the magic sees the fields above.
    c.magic.store(kMagic, std::memory_order_release);
    return Status();
  }

  // Attaches to an existing segment as its writer (owner and mode checked).
  Status attach(std::size_t per_slot) {
    Result<std::size_t> size = file_size(name, fd);
    if (!size.ok()) return size.status();
    if (*size == 0) return initialise(per_slot);  // the creator died before sizing it
    if (*size < kControlBytes) {
      return corruption(name, "truncated: " + std::to_string(*size) +
                                  " bytes, smaller than the 4096-byte control block");
    }
    Status st = map_all();  // not pre-faulted before it is validated
    if (!st.ok()) return st;
    bool uninitialised = false;
    st = check_header(name, *control, &uninitialised);
    if (!st.ok()) return st;
    if (uninitialised) return initialise(per_slot);
    ControlBlock& c = *control;
    const std::size_t mapped = writer_mapping().size;
    const std::uint32_t a = c.active.load(std::memory_order_relaxed);  // no other writer
    const SlotView act = load_slot(c.slots[a]);
    if (act.version % 2 == 1) {
      return corruption(name, "active slot " + std::to_string(a) +
                                  " is marked mid-write (version " + std::to_string(act.version) +
                                  ")");
    }
    if (!extent_ok(act, mapped)) {
      return corruption(name, "active slot " + std::to_string(a) + " descriptor (" + describe(act) +
                                  ") does not fit the " + std::to_string(mapped) + "-byte segment");
    }
    SlotDescriptor& inactive = c.slots[1 - a];
    const SlotView in = load_slot(inactive);
    if (!extent_ok(in, mapped) || overlaps(in, act)) {
      if (in.version % 2 == 0) {
        return corruption(name, "inactive slot " + std::to_string(1 - a) + " descriptor (" +
                                    describe(in) + ") does not fit the " + std::to_string(mapped) +
                                    "-byte segment or overlaps the active slot");
      }
      // A writer died while placing this slot: forget its storage; the next
      // publish places it afresh. Relaxed: the slot is odd, readers skip it.
      inactive.offset.store(0, std::memory_order_relaxed);
      inactive.capacity.store(0, std::memory_order_relaxed);
      inactive.length.store(0, std::memory_order_relaxed);
    }
    c.writer_pid.store(static_cast<std::uint64_t>(::getpid()), std::memory_order_relaxed);
    st = prefault(0, kControlBytes);
    if (st.ok()) st = prefault(act.offset, act.capacity);
    const SlotView placed = load_slot(inactive);
    if (st.ok()) st = prefault(placed.offset, placed.capacity);
    return st;
  }

  // Gives inactive slot `i` new storage for an `n`-byte image that does not
  // overlap `active` (placement rule in shm_store.h), growing the segment if
  // needed. Runs while slot i's version is odd.
  Status place_slot(std::uint32_t i, std::size_t n, const SlotView& active) {
    SlotDescriptor& d = control->slots[i];
    const SlotView old = load_slot(d);
    const std::size_t old_cap = extent_ok(old, writer_mapping().size) ? old.capacity : 0;
    const std::size_t cap = round_up(std::max(n + n / 4, old_cap + old_cap / 2), kSlotAlign);
    std::size_t offset = kControlBytes;
    if (active.capacity != 0 && kControlBytes + cap > active.offset) {
      offset = round_up(active.offset + active.capacity, kSlotAlign);
    }
    const std::size_t end = offset + cap;
    if (end > writer_mapping().size) {
      Status st = ensure_size(end);
      if (!st.ok()) return st;
      st = map_all();
      if (!st.ok()) return st;
      // The new mapping has no page-table entries yet.
      st = prefault(0, kControlBytes);
      if (st.ok()) st = prefault(active.offset, active.capacity);
      if (!st.ok()) return st;
    }
    Status st = prefault(offset, cap);
    if (!st.ok()) return st;
    // Relaxed: inside the odd window (see the top).
    d.offset.store(offset, std::memory_order_relaxed);
    d.capacity.store(cap, std::memory_order_relaxed);
    return Status();
  }
};

// ---- ShmStore ---------------------------------------------------------------

ShmStore::ShmStore(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
ShmStore::~ShmStore() = default;

const std::string& ShmStore::name() const noexcept { return impl_->name; }

Result<std::unique_ptr<ShmStore>> ShmStore::open_or_create(const std::string& name,
                                                           std::size_t initial_bytes) {
  Status st = check_name(name);
  if (!st.ok()) return st;
  if (initial_bytes > kMaxImageBytes) {
    return Status(StatusCode::kInvalidArgument,
                  label(name) + ": initial_bytes " + std::to_string(initial_bytes) +
                      " exceeds the limit of " + std::to_string(kMaxImageBytes));
  }
  bool created = false;
  try {
    auto impl = std::make_unique<Impl>();
    impl->name = name;
    const long page = ::sysconf(_SC_PAGESIZE);
    if (page > 0) impl->page = static_cast<std::size_t>(page);
    for (int tries = 0;; ++tries) {
      try {
        impl->shm = bip::shared_memory_object(bip::create_only, name.c_str(), bip::read_write,
                                              bip::permissions(kSegmentMode));
        created = true;
        break;
      } catch (const bip::interprocess_exception& e) {
        if (e.get_native_error() != EEXIST) return io_error(name, "cannot create", e.what());
      }
      st = check_entry(name, effective_uid());
      if (!st.ok()) return st;
      try {
        impl->shm = bip::shared_memory_object(bip::open_only, name.c_str(), bip::read_write);
        break;
      } catch (const bip::interprocess_exception& e) {
        const int err = e.get_native_error();
        if (err == ENOENT && tries < 3) continue;  // removed between our two calls
        if (err == EACCES || err == EPERM) {
          return permission_refused(name, e.what(), effective_uid());
        }
        if (err == ELOOP) return symlink_refused(name);
        return io_error(name, "cannot open", e.what());
      }
    }
    impl->fd = impl->shm.get_mapping_handle().handle;
    if (created) {
      // Boost fchmods too but ignores failure; the umask must not decide.
      if (::fchmod(impl->fd, kSegmentMode) != 0) {
        const int err = errno;
        st = io_error(name, "fchmod 0600", errno_text(err));
      }
    }
    // The engine's own segment: never another user's, whoever runs it.
    if (st.ok()) st = check_owner_and_mode(name, impl->fd, effective_uid());
    // One writer per segment: two engines configured with the same name
    // would overwrite each other's images. flock on the segment's own open
    // file description; released when the store closes it or the process dies.
    bool locked = false;
    if (st.ok()) {
      if (::flock(impl->fd, LOCK_EX | LOCK_NB) == 0) {
        locked = true;
      } else {
        const int err = errno;
        st = err == EWOULDBLOCK
                 ? Status(StatusCode::kFailedPrecondition,
                          label(name) + ": another engine is writing this segment (it holds its lock)")
                 : io_error(name, "flock", errno_text(err));
      }
    }
    if (st.ok()) st = created ? impl->initialise(initial_bytes) : impl->attach(initial_bytes);
    if (!st.ok()) {
      // A segment we created and could not set up holds nothing: drop it,
      // unless another engine opened it meanwhile and holds its lock (it
      // lost the race to create it but won the lock, and writes there now).
      if (created && (locked || ::flock(impl->fd, LOCK_EX | LOCK_NB) == 0)) {
        bip::shared_memory_object::remove(name.c_str());
      }
      return st;
    }
    return std::unique_ptr<ShmStore>(new ShmStore(std::move(impl)));
  } catch (const bip::interprocess_exception& e) {
    if (created) bip::shared_memory_object::remove(name.c_str());
    return io_error(name, "open_or_create", e.what());
  } catch (const std::bad_alloc&) {
    if (created) bip::shared_memory_object::remove(name.c_str());
    return out_of_memory(name);
  }
}

Status ShmStore::publish(std::uint64_t generation, std::span<const unsigned char> image) {
  return publish(generation, image, snapshot::checksum(image.data(), image.size()));
}

Status ShmStore::publish(std::uint64_t generation, std::span<const unsigned char> image,
                         std::uint64_t image_checksum) {
  assert(image_checksum == snapshot::checksum(image.data(), image.size()));
  Result<std::span<unsigned char>> room = begin_image(image.size());
  if (!room.ok()) return room.status();
  // Relaxed atomic stores: an in-process read_active() may be copying these
  // bytes (the slot it loaded became inactive); it will retry (see the top).
  store_bytes(room->data(), image.data(), image.size());
  return commit_image(generation, image.size(), image_checksum);
}

Result<std::span<unsigned char>> ShmStore::begin_image(std::size_t size) {
  Impl& s = *impl_;
  s.writing = -1;
  if (size > kMaxImageBytes) return image_too_large(s.name, size);
  try {
    ControlBlock& c = *s.control;
    // Relaxed: this thread is the only one that stores it.
    const std::uint32_t a = c.active.load(std::memory_order_relaxed);
    if (a > 1) {
      return corruption(s.name, "active slot index " + std::to_string(a) +
                                    " (expected 0 or 1): refusing to publish");
    }
    const SlotView act = load_slot(c.slots[a]);
    if (!extent_ok(act, s.writer_mapping().size)) {
      return corruption(s.name, "active slot " + std::to_string(a) + " descriptor (" +
                                    describe(act) + ") was damaged: refusing to publish");
    }
    const std::uint32_t i = 1 - a;
    SlotDescriptor& d = c.slots[i];
    // The even version that completes the slot is odd + 1, which must not
    // wrap to 0 ("never written"): a segment left with a version at the top
    // of its range (damaged, or hostile) would otherwise publish an image
    // that every reader takes for no image at all (found by
    // shm_segment_fuzzer). Restarting at 1 is safe: a reader compares
    // versions only across one copy.
    std::uint64_t odd = d.version.load(std::memory_order_relaxed) | 1;
    if (odd == UINT64_MAX) odd = 1;
    d.version.store(odd, std::memory_order_relaxed);
    // Release fence: a reader whose copy sees any write below sees `odd` (top).
    std::atomic_thread_fence(std::memory_order_release);
    SlotView in = load_slot(d);
    if (!extent_ok(in, s.writer_mapping().size) || overlaps(in, act) || size > in.capacity) {
      Status st = s.place_slot(i, size, act);
      if (!st.ok()) return st;  // the slot stays odd; the previous image stays active
      in = load_slot(d);
    }
    s.writing = static_cast<int>(i);
    s.writing_odd = odd;
    return std::span<unsigned char>(s.writer_mapping().base + in.offset, in.capacity);
  } catch (const bip::interprocess_exception& e) {
    return io_error(s.name, "publish", e.what());
  } catch (const std::bad_alloc&) {
    return out_of_memory(s.name);
  }
}

Result<std::span<unsigned char>> ShmStore::grow_image(std::size_t size, std::size_t keep) {
  Impl& s = *impl_;
  if (s.writing < 0) {
    return Status(StatusCode::kFailedPrecondition,
                  label(s.name) + ": grow_image() without a successful begin_image()");
  }
  if (size > kMaxImageBytes) return image_too_large(s.name, size);
  try {
    ControlBlock& c = *s.control;
    const auto i = static_cast<std::uint32_t>(s.writing);
    SlotDescriptor& d = c.slots[i];
    const SlotView old = load_slot(d);
    if (keep > old.capacity) {
      return Status(StatusCode::kInvalidArgument,
                    label(s.name) + ": grow_image() keeping " + std::to_string(keep) +
                        " bytes of a " + std::to_string(old.capacity) + "-byte slot");
    }
    if (size <= old.capacity) {
      return std::span<unsigned char>(s.writer_mapping().base + old.offset, old.capacity);
    }
    Status st = s.place_slot(i, size, load_slot(c.slots[1 - i]));
    if (!st.ok()) {
      // The slot and its bytes stay where they were (readable: nothing is
      // unmapped), the slot odd; this image can no longer be committed.
      s.writing = -1;
      return st;
    }
    const SlotView moved = load_slot(d);
    // Both extents through the newest mapping (the segment only grows, so it
    // covers the old one too): memmove sees any overlap.
    unsigned char* base = s.writer_mapping().base;
    if (keep != 0 && moved.offset != old.offset) {
      std::memmove(base + moved.offset, base + old.offset, keep);
    }
    return std::span<unsigned char>(base + moved.offset, moved.capacity);
  } catch (const bip::interprocess_exception& e) {
    return io_error(s.name, "publish", e.what());
  } catch (const std::bad_alloc&) {
    return out_of_memory(s.name);
  }
}

Status ShmStore::commit_image(std::uint64_t generation, std::size_t length,
                              std::uint64_t image_checksum) {
  Impl& s = *impl_;
  if (s.writing < 0) {
    return Status(StatusCode::kFailedPrecondition,
                  label(s.name) + ": commit_image() without a successful begin_image()");
  }
  ControlBlock& c = *s.control;
  const auto i = static_cast<std::uint32_t>(s.writing);
  SlotDescriptor& d = c.slots[i];
  if (length > d.capacity.load(std::memory_order_relaxed)) {
    return Status(StatusCode::kInvalidArgument,
                  label(s.name) + ": commit_image() of " + std::to_string(length) +
                      " bytes exceeds the slot's capacity of " +
                      std::to_string(d.capacity.load(std::memory_order_relaxed)));
  }
  s.writing = -1;
  // Relaxed: published by the release store of the version.
  d.length.store(length, std::memory_order_relaxed);
  d.generation.store(generation, std::memory_order_relaxed);
  d.checksum.store(image_checksum, std::memory_order_relaxed);
  // Release: a reader that acquires the even version sees the whole slot.
  d.version.store(s.writing_odd + 1, std::memory_order_release);
  // Release: a reader that acquires `active` sees the complete slot.
  c.active.store(i, std::memory_order_release);
  return Status();
}

Result<std::vector<unsigned char>> ShmStore::read_active() const {
  const Impl& s = *impl_;
  try {
    // Acquire: pairs with the release store of a new mapping.
    const auto current = [&s] { return s.current.load(std::memory_order_acquire); };
    MappedSource<decltype(current)> src(*s.control, current);
    return read_image(s.name, src);
  } catch (const bip::interprocess_exception& e) {
    return io_error(s.name, "read", e.what());
  } catch (const std::bad_alloc&) {
    return out_of_memory(s.name);
  }
}

Result<std::vector<unsigned char>> ShmStore::read_existing(const std::string& name) {
  return read_existing(name, effective_uid());
}

Result<std::vector<unsigned char>> ShmStore::read_existing(const std::string& name,
                                                           std::uint32_t owner) {
  Status st = check_name(name);
  if (!st.ok()) return st;
  try {
    st = check_entry(name, owner);
    if (!st.ok()) return st;
    // Opened by its path, as shm_open() would, but with O_NONBLOCK: the
    // segment may be another uid's (an operator reading a service's), whose
    // owner can swap it for a FIFO after the look above (/dev/shm is sticky:
    // only the owner can), and a FIFO opened without O_NONBLOCK blocks. The
    // descriptor is checked below, FIFOs included.
    const int fd = ::open(dev_shm_path(name).c_str(), O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) {
      const int err = errno;
      if (err == ENOENT) return Status(StatusCode::kNotFound, label(name) + " does not exist");
      if (err == EACCES || err == EPERM) return permission_refused(name, errno_text(err), owner);
      if (err == ELOOP) return symlink_refused(name);
      return io_error(name, "cannot open read-only", errno_text(err));
    }
    const FdGuard close_fd(fd);
    st = check_owner_and_mode(name, fd, owner);
    if (!st.ok()) return st;
    // Read with pread(2), never mapped (PreadSource): a segment truncated
    // meanwhile is an error, not SIGBUS. A read that found it shrunk is
    // made afresh (in case it was put back) a few times; if a fresh read
    // fails, or the segment shrinks again every time, the shrink is the error
    // (what a fresh read fails on, an emptied or cut-off segment, follows from it).
    Status shrink;
    for (int retries = 0;; ++retries) {
      Status shrank;
      Result<std::vector<unsigned char>> read = read_segment(name, fd, &shrank);
      if (shrank.ok()) {
        if (read.ok() || shrink.ok()) return read;
        return shrink;
      }
      shrink = std::move(shrank);
      if (retries == kMaxShrinkRetries) return shrink;
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
  } catch (const bip::interprocess_exception& e) {
    return io_error(name, "read_existing", e.what());
  } catch (const std::bad_alloc&) {
    return out_of_memory(name);
  }
}

Result<std::vector<unsigned char>> ShmStore::parse_segment(std::span<const unsigned char> segment,
                                                          bool verify_checksum) {
  const std::string name = "(copy)";
  try {
    if (segment.empty()) {
      return Status(StatusCode::kNotFound, label(name) + " holds no image yet (never initialised)");
    }
    if (segment.size() < kControlBytes) {
      return corruption(name, "truncated: " + std::to_string(segment.size()) +
                                  " bytes, smaller than the 4096-byte control block");
    }
    // The control block is read through atomics, which need their alignment:
    // copy the bytes to 8-byte-aligned storage (a segment is page-aligned).
    std::vector<std::uint64_t> words((segment.size() + 7) / 8, 0);
    std::memcpy(words.data(), segment.data(), segment.size());
    Mapping m;
    m.base = reinterpret_cast<unsigned char*>(words.data());
    m.size = segment.size();
    const ControlBlock& c = *reinterpret_cast<const ControlBlock*>(m.base);
    bool uninitialised = false;
    Status st = check_header(name, c, &uninitialised);
    if (!st.ok()) return st;
    if (uninitialised) {
      return Status(StatusCode::kNotFound, label(name) + " holds no image yet (never initialised)");
    }
    const auto current = [&m] { return static_cast<const Mapping*>(&m); };
    MappedSource<decltype(current)> src(c, current);
    return read_image(name, src, /*max_attempts=*/1, verify_checksum);
  } catch (const std::bad_alloc&) {
    return out_of_memory(name);
  }
}

Status ShmStore::remove(const std::string& name) {
  Status st = check_name(name);
  if (!st.ok()) return st;
  try {
    if (bip::shared_memory_object::remove(name.c_str())) return Status();
    const int err = errno;
    struct stat unused;
    if (::stat(dev_shm_path(name).c_str(), &unused) != 0 && errno == ENOENT) return Status();
    return io_error(name, "cannot remove", errno_text(err));
  } catch (const bip::interprocess_exception& e) {
    return io_error(name, "cannot remove", e.what());
  } catch (const std::bad_alloc&) {
    return out_of_memory(name);
  }
}

}  // namespace jobengine::persist
