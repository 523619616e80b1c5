// Snapshot operations for operators' tools: open a snapshot from a file, a
// directory generation or a shared-memory segment; list a directory's
// generations with their validity; load the newest valid one exactly as
// Engine::open() does; summarize, diff, requeue and drop; publish a new
// generation and restore an older one. jobsnap (tools/jobsnap/) is a thin
// command line over these functions; tools/jobsnap.md is its manual.
//
// Read functions open files O_RDONLY|O_NOFOLLOW and segments read-only, never
// create, lock or modify anything, and refuse symlinks, FIFOs, devices,
// directories where a file is expected and a segment the engine would not
// open (not a regular 0600 file of the engine's uid: the directory's owner
// beside a directory, else this uid, any uid for root) without opening them
// for I/O (so they never block). They read a directory of any owner, as far
// as the system lets this uid. Write functions (publish,
// restore, requeue, drop) take the directory's LOCK and the segment's writer
// lock, as an engine does, and are refused while an engine holds either; they
// only ever add a generation (temp file, fsync, rename, fsync dir) and move
// newer generations aside into a subdirectory, never edit or delete one. A
// segment's image that a write replaces is kept first, as a file (see
// restore()), unless a file of the directory holds its generation already.
//
// Every function is thread-safe (no shared state) and returns a Status or
// Result; when a `Diagnosis*` is given it also receives the failure's class
// and, for a damaged image, the byte offset of the first problem.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "jobengine/job.h"
#include "jobengine/snapshot_format.h"
#include "jobengine/status.h"

namespace jobengine::snapshot_tools {

// Failure classes. jobsnap gives each its own exit code (tools/jobsnap.md).
enum class Failure : std::uint8_t {
  kNone,
  kCorrupt,             // a checksum or bound check failed
  kTruncated,           // the image ends early
  kUnsupportedVersion,  // written by a newer format version
  kNotFound,            // no such file, directory, segment, generation or job
  kRefusedInput,        // not a regular file (symlink, FIFO, device, directory), over-size,
                        // a segment not the engine's uid's / with a wrong mode, or
                        // another uid's directory given to a write function
  kLocked,              // an engine holds the directory's or the segment's lock
  kRefused,             // the operation does not apply (e.g. requeue of a job that is not dead)
  kIoError,             // a system call failed
  kUsage,               // malformed argument (e.g. a bad segment name)
};
std::string_view failure_name(Failure failure) noexcept;

// A failure's class and, when the image itself is at fault, where.
struct Diagnosis {
  Failure failure = Failure::kNone;
  bool has_offset = false;
  std::uint64_t offset = 0;  // byte offset of the first problem in the image
};

// The most bytes a snapshot file may have (the engine's recovery limit).
inline constexpr std::uint64_t kMaxFileBytes = std::uint64_t{1} << 38;

// A decoded snapshot and the bytes its views point into. Move-only: moving
// keeps the bytes where they are, so the views stay valid.
struct Image {
  std::string source;  // the file's path, or "shm:<name>"
  std::vector<unsigned char> bytes;
  snapshot::SnapshotView view;

  Image() = default;
  Image(Image&&) noexcept = default;
  Image& operator=(Image&&) noexcept = default;
  Image(const Image&) = delete;
  Image& operator=(const Image&) = delete;
};

// Decodes `bytes` (verifying every checksum and bound) into an Image.
Result<Image> decode_image(std::string source, std::vector<unsigned char> bytes,
                           Diagnosis* diagnosis = nullptr);
// One snapshot file (a regular file, not a symlink, at most kMaxFileBytes).
// Read whole only when its header verifies and says the file's size: one
// that is not (a sparse file of zeros, one truncated or grown) fails with
// the decoder's class, offset and message from its header alone, so that no
// such file costs its size in memory. Out of memory: kIoError.
Result<Image> load_file(const std::string& path, Diagnosis* diagnosis = nullptr);
// Generation `generation` of a snapshot directory (its header must agree).
Result<Image> load_generation(const std::string& dir, std::uint64_t generation,
                              Diagnosis* diagnosis = nullptr);
// The active image of a shared-memory segment (read-only, no lock).
Result<Image> load_shm(const std::string& name, Diagnosis* diagnosis = nullptr);

// A candidate recovery did not take.
struct Skipped {
  std::string source;
  std::uint64_t offset = 0;
  std::string reason;
};

// The snapshot an engine with these stores would load at its next open():
// the engine's own loader (newest generation that verifies, from the
// directory and the segment; either may be empty). kNotFound when nothing
// verifies; `skipped` (when given) receives the newer candidates that did not.
Result<Image> load_newest(const std::string& dir, const std::string& shm_name,
                          Diagnosis* diagnosis = nullptr, std::vector<Skipped>* skipped = nullptr);

// OK when `name` is a segment name the engine accepts (ShmStore::check_name:
// 1..200 characters of [A-Za-z0-9._-], not "." or ".."), else
// kInvalidArgument naming it. Every function here that takes a segment
// name refuses a bad one with Failure::kUsage before it looks at anything.
Status check_shm_name(std::string_view name);

// Where to read one snapshot from.
struct Source {
  std::string path;                         // a file, or a directory
  std::optional<std::uint64_t> generation;  // directory: this generation (default: the newest valid)
  std::string shm;                          // or a segment (path empty)
  // `path` must be a snapshot file (e.g. restore --from-file): a directory
  // there is refused input like any other file that is not a regular file.
  bool file_only = false;
};
// Loads a Source: a file, a directory's generation or newest valid one (as
// the engine would load it), or a segment. A directory with a segment the
// engine could not open (another uid's, another layout version) fails with that
// segment's class, as an engine's open() would, rather than naming a disk
// generation.
Result<Image> load(const Source& source, Diagnosis* diagnosis = nullptr);

// Jobs per state, indexed by the JobState value (index 0 unused).
struct StateCounts {
  std::uint64_t total = 0;
  std::uint64_t by_state[6] = {};
  std::uint64_t of(snapshot::JobState state) const noexcept {
    return by_state[static_cast<std::size_t>(state)];
  }
};
StateCounts count_states(const snapshot::SnapshotView& view);

// One entry of list(): a directory generation or the segment's image.
struct GenerationInfo {
  std::string source;       // the file's path, or "shm:<name>"
  bool shm = false;
  std::uint64_t generation = 0;  // from the file name (shm: from the header, 0 if unreadable)
  std::uint64_t bytes = 0;
  bool valid = false;
  Diagnosis diagnosis;      // why not, when !valid
  std::string reason;       // the decoder's or reader's message, when !valid
  snapshot::Header header;  // when valid
  StateCounts counts;       // when valid
  bool loaded_next = false;  // the one the next engine start loads
};
// Every generation of `dir` (newest first) and the image of segment
// `shm_name` (when given; first), each read and fully verified, the one the
// engine would load marked. Either may be empty, not both. kNotFound when
// the directory or segment does not exist; the segment's class (e.g.
// kRefusedInput) when the engine could not open it (another uid's, another layout
// version): an image that does not verify is a row, such a segment is not.
Result<std::vector<GenerationInfo>> list(const std::string& dir, const std::string& shm_name,
                                         Diagnosis* diagnosis = nullptr);

// The generation a snapshot file's name gives, when its last component is
// a generation file's name as the engine reads them (gen-<20 digits>.jobsnap;
// also such a file kept aside or copied elsewhere); nullopt otherwise.
std::optional<std::uint64_t> generation_of_name(std::string_view path);
// A snapshot file given by its path (not a directory's generation) whose
// name gives a generation (generation_of_name) must hold that generation:
// else kCorruption, Failure::kCorrupt at offset 16 (the header's generation
// field), as the engine would pass it over in a directory. OK otherwise.
Status check_file_name(const std::string& path, const snapshot::Header& header,
                       Diagnosis* diagnosis = nullptr);

// What inspect shows beyond the header.
struct Summary {
  StateCounts counts;
  struct HandlerCount {
    std::string name;
    std::uint64_t jobs = 0;
    std::uint64_t dead = 0;
  };
  std::vector<HandlerCount> by_handler;  // in handler-table order
  std::uint64_t by_priority[kPriorityLevels] = {};
  // The live job submitted first; null when there is none. Live as the
  // format counts it (SnapshotView::live_records): neither dead nor
  // cancel_requested, which recovery counts cancelled and never runs.
  const snapshot::JobRecordView* oldest_live = nullptr;
  std::vector<const snapshot::JobRecordView*> dead;  // in image order
};
// Views into `view`: valid as long as it is.
Summary summarize(const snapshot::SnapshotView& view);

// How two snapshots differ, by job id. An id held more than once (no engine
// writes one) counts once per copy: copies are paired in image order, and
// one without a partner is added or removed.
struct Diff {
  std::vector<JobId> added;    // in b, not in a
  std::vector<JobId> removed;  // in a, not in b
  struct Changed {
    JobId id = 0;
    std::vector<std::string> fields;  // e.g. "state", "payload", "handler"
  };
  std::vector<Changed> changed;
  bool empty() const noexcept { return added.empty() && removed.empty() && changed.empty(); }
};
// Ids in ascending order. Handlers compare by name.
Diff diff(const snapshot::SnapshotView& a, const snapshot::SnapshotView& b);

// Image transformations: a new image (generation `generation`, every other
// header field kept) re-encoded with snapshot::Encoder.
//
// requeue: each job in `ids` must be dead (else kRefused) and present (else
// kNotFound); it becomes pending with dead_reason none, dead_at 0, attempts
// and recoveries 0 (a full attempt budget, and not poisoned again at the next
// start), cancel flag cleared, run_at `now_ns`; its last error is kept.
Result<std::vector<unsigned char>> requeue(const snapshot::SnapshotView& view,
                                           std::span<const JobId> ids, std::uint64_t generation,
                                           std::int64_t now_ns, Diagnosis* diagnosis = nullptr);
// drop: each job in `ids` (any state) must be present (else kNotFound) and is
// removed.
Result<std::vector<unsigned char>> drop(const snapshot::SnapshotView& view,
                                        std::span<const JobId> ids, std::uint64_t generation,
                                        Diagnosis* diagnosis = nullptr);
// The same jobs under another generation number and id counter.
std::vector<unsigned char> renumber(const snapshot::SnapshotView& view, std::uint64_t generation,
                                    std::uint64_t next_job_id);

// What a write operation did.
struct WriteReport {
  std::string from_source;         // the snapshot it started from
  std::uint64_t from_generation = 0;
  std::uint64_t generation = 0;    // the generation it wrote
  std::string path;                // the new file (empty if only the segment was written)
  std::string shm;                 // the segment written ("" if none)
  std::string aside_dir;           // where newer generations were moved ("" if none)
  std::vector<std::string> moved;  // their new paths (with shm_kept, when it went there)
  std::uint64_t jobs = 0;          // jobs in the new image
  // The segment's image the write replaced, kept as this file ("" when none
  // was to be kept: no segment written, none there, it did not verify, or a
  // file of the directory held its generation already).
  std::string shm_kept;
  std::uint64_t shm_kept_generation = 0;
};

// Which stores a write goes to, and what it starts from.
struct EditRequest {
  std::string dir;                               // required: the engine's snapshot directory
  std::string shm;                               // the engine's segment, if it has one
  std::optional<std::uint64_t> from_generation;  // default: what the engine would load
};
// requeue/drop as above, written as a new generation numbered above every
// generation in `dir` and the segment's, to `dir` and (when given) the
// segment, under both locks (kLocked while an engine holds either). Both
// must exist (kNotFound; nothing is created). The source is the generation
// the engine would load (either store), or `from_generation` of `dir`; the
// new image's next_job_id is the highest of every image that verifies in
// `dir` and the segment. The segment's image, when it verifies and no file
// of `dir` holds its generation, is first kept as restore() keeps it: into
// the aside directory when it is newer than the source, else as
// dir/gen-<S>.jobsnap (below the new generation, so never loaded unless
// chosen). Once the new generation is published to `dir`, every generation
// file of `dir` numbered above the source's (with `from_generation`, the
// newer ones; else newer ones that did not verify) is moved into a new
// subdirectory aside-<UTC time>/, as restore() moves them; then the segment
// is written. kRefused when the new generation would be past 2^64 - 1. The
// ids are checked before anything is written; a refused edit changes
// nothing (no LOCK file or aside directory is left behind).
Result<WriteReport> requeue_jobs(const EditRequest& request, std::span<const JobId> ids,
                                 Diagnosis* diagnosis = nullptr);
Result<WriteReport> drop_jobs(const EditRequest& request, std::span<const JobId> ids,
                              Diagnosis* diagnosis = nullptr);

// A rollback: makes `source` the snapshot the next engine start loads.
struct RestoreRequest {
  Source source;           // a file, a directory generation, or a segment
  std::string target_dir;  // write it here as the newest generation (optional)
  std::string target_shm;  // and/or into this segment (optional; at least one target)
};
// Reads and verifies the source first (one that does not verify, or a file
// whose name and header disagree (check_file_name), is refused with its
// class). Every other check that can refuse (the segment's name, a segment
// the engine could not open, a directory to write that another uid owns, a
// generation past 2^64 - 1, a newer image a single file would overwrite) is
// made on the targets as they are, before anything is locked or created; a
// restore that still fails before it publishes anything removes the
// directory, LOCK file and segment it created (never one that was there
// before). Then, under the
// targets' locks (kLocked while an engine holds one; a missing target
// directory is created only when the source is a file or a segment, a
// missing target segment always): re-encodes the source image as generation
// G = 1 + the highest generation in the target directory, the target
// segment, the source directory (--to-shm from a directory) and the source,
// with next_job_id the highest of every image there that verifies (ids
// never go back); kRefused if G would be past 2^64 - 1. Keeps the target
// segment's image when it verifies and no file of the directory holds its
// generation: into the aside directory when it is newer than the source,
// else as an ordinary generation file of the target directory; with no
// target directory, into the source directory's aside directory; with a
// single file as the source, kRefused instead when the segment's image is
// newer than the file's (or another image of the same generation). Then
// publishes G to the target directory (durably), moves every generation
// file of the target directory numbered above the source's generation
// (except G) into a new subdirectory aside-<UTC time>/ (which the engine
// ignores) and writes G to the target segment.
Result<WriteReport> restore(const RestoreRequest& request, Diagnosis* diagnosis = nullptr);

}  // namespace jobengine::snapshot_tools
