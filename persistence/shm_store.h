// ShmStore: the shared-memory half of persistence. A named POSIX
// shared-memory segment (Boost.Interprocess shared_memory_object +
// mapped_region; this file and shm_store.cc are the only ones that include
// Boost.Interprocess, and every Boost exception is caught there and turned
// into a Status) that survives the process and holds the newest snapshot image.
// Linux: the segment is the file /dev/shm/<name> (tmpfs); it survives a
// process crash, not a reboot.
//
// Segment layout (native byte order: a segment never leaves its machine). A
// 4096-byte control block, then image storage. Every control-block field is a
// lock-free std::atomic (address-free, so valid across processes):
//   0    u64  magic "JOBSHM01" (stored last when a segment is initialised:
//             all-zero means the creator died before finishing)
//   8    u32  layout version (1; anything else is refused)
//   12   u32  control block size (4096)
//   16   u64  pid of the last writer to open the segment (diagnostics only)
//   64   u32  active: index of the slot holding the newest image, 0 or 1
//             (alone on its cache line)
//   128  slot 0 descriptor, 192 slot 1 descriptor, 48 bytes each:
//        +0 version     even: the slot is complete; odd: being written;
//                       0: never written. Bumped by the writer around every
//                       change to the slot (a per-slot sequence lock); past
//                       2^64 - 2 it restarts at 1, never at 0.
//        +8 offset      of the slot's storage from the start of the segment
//        +16 capacity   bytes of storage reserved for the slot
//        +24 length     bytes of the image in it (<= capacity)
//        +32 generation as given to publish()
//        +40 checksum   XXH3-64 of the image bytes
//   every other byte of the control block is zero (reserved).
//
// Invariants (single writer; readers in any thread or process):
//  1. The active slot is never written. publish() (and begin_image() ...
//     commit_image()) writes only the inactive slot, and only between making
//     its version odd and making it even again;
//     `active` flips to it (release store) after it is even and complete.
//  2. The two slots' storage extents [offset, offset + capacity) never overlap
//     each other or the control block, and lie inside the segment.
//  3. The segment never shrinks, and a byte of it is never unmapped in the
//     process that maps it while an in-process reader may use it (a grown
//     segment is mapped afresh; older mappings stay until ~ShmStore).
// Hence a reader, or a process recovering after the writer died at any
// instant, sees either the previous complete image or the new complete one.
// A slow reader may be copying the slot that becomes inactive and is then
// rewritten by the publish after next: it notices because the slot's version
// changed during its copy, and retries (a bounded number of times). No
// interprocess mutex: a dead holder would lock it forever.
//
// Growth and placement. When an image does not fit the inactive slot's
// capacity, the slot gets new storage of max(image + image/4, 1.5 x its old
// capacity) bytes rounded up to 4096, placed at the lowest of two candidates
// that does not overlap the active slot's extent: right after the control
// block (offset 4096), else right after the active slot's extent. If that
// extends past the end of the segment, the segment is grown (posix_fallocate,
// so a full /dev/shm is an error instead of a SIGBUS) and mapped afresh. The
// active image is never moved or overwritten, so a failed growth returns
// kIoError with the previous image still active. New mappings are pre-faulted
// (MADV_POPULATE_WRITE, else one write per page) so that later publishes do
// not page-fault. The segment stays below about the control block plus three
// times the largest slot.
//
// A segment found at open that is owned by us with mode 0600 but is empty
// (length 0) or has an all-zero magic was left by a creator that died before
// initialising it: it holds no image and is initialised. A non-zero wrong
// magic, a truncated control block (shorter than 4096 bytes) or descriptors
// out of bounds are kCorruption and are left for an operator to look at
// (jobsnap, or remove()). The inactive slot being mid-write (odd version) is
// the normal trace of a writer that died while publishing: the next writer
// rewrites it.
//
// One writer at a time: open_or_create() takes an exclusive flock on the
// segment and refuses a second writer (kFailedPrecondition) until the first
// closes it or dies; read_existing() takes no lock. A process of the
// segment owner's uid (ours for the engine; the engine's for an operator's
// read_existing(name, owner)) that truncates or scribbles on the segment can
// make a reader fail (kCorruption). read_existing() reads with pread(2) and
// never maps the segment, so a truncation, even in the middle of its copy,
// is an error ("shrank while being read"), never SIGBUS; the writer's own
// process (publish, read_active) maps it, and dies of SIGBUS if it is
// truncated under it.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "jobengine/status.h"

namespace jobengine::persist {

class ShmStore {
 public:
  // Opens the engine's segment `name` (a portable name: [A-Za-z0-9._-], 1..200
  // bytes, no '/', not "." or "..", else kInvalidArgument) for writing. If it
  // does not exist it is created exclusively with mode 0600 (fchmod after
  // creation, whatever the umask) and room for an image of `initial_bytes`
  // in each of its two slots (0 is valid: the first publish grows it). If it
  // exists it must be a regular file (a symlink, FIFO or directory at
  // /dev/shm/<name> is never followed or opened), owned by this uid with mode
  // 0600, and carry a valid control block, else kFailedPrecondition naming
  // the segment, its owner and mode (never attach to someone else's
  // segment), or kCorruption (see the header comment); its image and storage
  // are kept and `initial_bytes` is ignored. kIoError (segment name and error
  // text) when a system call fails.
  static Result<std::unique_ptr<ShmStore>> open_or_create(const std::string& name,
                                                          std::size_t initial_bytes);
  ~ShmStore();  // unmaps; does not remove the segment

  // Publishes `image` as `generation` (see the header comment); when it
  // returns OK, read_active() and read_existing() return this image. kIoError
  // if the segment cannot grow, kCorruption if the control block was damaged
  // under us; on any error the previous image stays active. Not thread-safe
  // with itself: one publishing thread (and one writer per segment). Safe to
  // run while any number of threads call read_active(). Allocates nothing
  // unless the segment grows.
  Status publish(std::uint64_t generation, std::span<const unsigned char> image);
  // The same, with the slot checksum given: `image_checksum` must be
  // snapshot::checksum(image) (every byte), as snapshot::Encoder computes it
  // while it seals the image, which saves hashing it here again (~15% of a
  // shared-memory snapshot). Debug builds check it.
  Status publish(std::uint64_t generation, std::span<const unsigned char> image,
                 std::uint64_t image_checksum);

  // In-place publishing, for an image built straight in the segment (the
  // engine's snapshot encoder writes into the slot, saving publish()'s copy):
  //  - begin_image() opens the inactive slot for writing (its version odd, so
  //    readers pass it over) and returns its storage: at least `size` bytes,
  //    all of its capacity;
  //  - grow_image() gives it at least `size` bytes, the first `keep` bytes
  //    carried over; the storage may move (use the span it returns; the old
  //    span stays readable until the next call, the segment is never unmapped);
  //  - commit_image() publishes the first `length` bytes as `generation`,
  //    exactly as publish() would (`image_checksum`: checksum() of them).
  // Errors as publish(); a failed grow_image() ends the image (the bytes stay
  // readable, but commit_image() refuses it). Until commit_image() returns OK
  // the previous image stays active, and a begin_image() or publish() after an abandoned or
  // failed one starts afresh. The caller writes the storage with plain
  // stores: the engine never calls read_active() meanwhile (only while it
  // opens); readers in other processes are safe as for publish() (they pass
  // over an odd slot, and a copy the writer overtakes is retried).
  Result<std::span<unsigned char>> begin_image(std::size_t size);
  Result<std::span<unsigned char>> grow_image(std::size_t size, std::size_t keep);
  Status commit_image(std::uint64_t generation, std::size_t length, std::uint64_t image_checksum);

  // A copy of the active image, its checksum verified, or kNotFound when none
  // was ever published. kCorruption when the control block or the image's
  // checksum is wrong. Thread-safe, also while publish() runs (not while an
  // image is built in place, begin_image() to commit_image(): see there): it
  // returns either image, never a mix (a copy the writer overtook is retried; after
  // about 100 overtaken copies it gives up with kFailedPrecondition). A
  // reader's successive reads never go back to an older generation.
  Result<std::vector<unsigned char>> read_active() const;

  // Read-only access for recovery and tools: opens an existing segment
  // (same owner/mode checks, O_RDONLY) and copies its active image out with
  // pread(2), never through a mapping (checksum verified, same retry rule as
  // read_active). kNotFound when there is no such segment or it holds no
  // image yet; kCorruption and kFailedPrecondition as for open_or_create.
  // A segment that shrinks while it is read (truncated by another process)
  // is read afresh a few times, then kCorruption naming it and saying it
  // "shrank while being read"; never SIGBUS. Thread-safe.
  static Result<std::vector<unsigned char>> read_existing(const std::string& name);
  // The same for a reader that is not the engine (an operator's tool, run as
  // root or as another user than the engine's): the segment must be owned by
  // `owner` instead of this process's effective uid, or by any uid with
  // kAnyOwner; it must still be a regular file with mode 0600 (else
  // kFailedPrecondition naming the owner and mode, and the uid expected).
  // open_or_create() has no such choice: an engine never attaches to a
  // segment that is not its own.
  static Result<std::vector<unsigned char>> read_existing(const std::string& name,
                                                          std::uint32_t owner);
  // read_existing()'s `owner` for a segment of any uid: (uid_t)-1, which no
  // user has (chown(2) takes it to mean "leave the owner as it is").
  static constexpr std::uint32_t kAnyOwner = UINT32_MAX;

  // OK when `name` is a segment name every function here accepts: 1..200
  // characters of [A-Za-z0-9._-], not "." or "..". Else kInvalidArgument
  // naming it. The one copy of the rule (jobsnap checks names with it).
  static Status check_name(const std::string& name);

  // Validates `segment`, the bytes of a whole segment (as copied from
  // /dev/shm/<name>), as read_existing() validates a live one (control
  // block, active slot descriptor, image checksum), and returns a copy of its
  // active image. No writer moves a copy on, so an active slot marked
  // mid-write is kCorruption at once. kNotFound for an empty or never
  // initialised segment. `verify_checksum` is false only in fuzzing builds
  // (tests/fuzz/shm_segment_fuzzer.cc), so that mutations reach past the
  // checksum. Messages name the segment "(copy)". Thread-safe.
  static Result<std::vector<unsigned char>> parse_segment(std::span<const unsigned char> segment,
                                                          bool verify_checksum = true);

  // Removes the segment's name (shm_unlink); processes that have it mapped
  // keep their mapping. OK if it did not exist. kIoError on any other failure.
  static Status remove(const std::string& name);

  const std::string& name() const noexcept;

  struct Impl;  // defined in shm_store.cc

 private:
  explicit ShmStore(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace jobengine::persist
