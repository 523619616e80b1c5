// The seam between the engine and persistence.
//
// persistence/ depends on the engine's job model, never the other way round:
// the engine exposes a CutSource (a consistent cut of its job table, see
// engine.cc invariants I5-I7) and drives an abstract Persistence, which
// persistence/snapshotter.cc implements and make_persistence() creates. The
// engine's sources include only this header, not persistence's.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "jobengine/engine.h"
#include "jobengine/options.h"
#include "jobengine/snapshot_format.h"
#include "jobengine/status.h"

namespace jobengine::detail {

// One job of a cut, as the engine's table holds it. Views are valid until
// CutSource::end_cut().
struct CutJob {
  JobId id = 0;
  HandlerId handler = 0;
  std::uint8_t priority = 0;
  snapshot::JobState state = snapshot::JobState::kPending;
  std::uint16_t attempts = 0;
  std::uint16_t recoveries = 0;
  std::uint64_t submit_ticks = 0;   // Clock ticks
  std::uint64_t run_at_ticks = 0;
  bool cancel_requested = false;
  std::uint64_t deadline_ns = 0;    // the job's own deadline, 0 none
  std::string_view payload;
  std::string_view key;
};

// A job the engine keeps dead (quarantined), with everything a snapshot
// stores about it. Owned copies: dead jobs live outside the slot table.
struct DeadJob {
  JobId id = 0;
  std::string handler;
  std::uint8_t priority = 0;
  std::uint16_t attempts = 0;
  std::uint16_t recoveries = 0;
  std::int64_t submit_ns = 0;   // Unix epoch
  std::int64_t run_at_ns = 0;
  std::int64_t dead_at_ns = 0;  // Unix epoch
  snapshot::DeadReason reason = snapshot::DeadReason::kFailed;
  std::string payload;
  std::string error;
  // The job's own options, for requeue_dead() (and every snapshot): its
  // unique key (empty: none) and deadline (SubmitOptions::deadline; 0 none).
  std::string key;
  std::uint64_t deadline_ns = 0;
};

class CutSource {
 public:
  virtual ~CutSource() = default;
  // Starts a cut and returns its epoch C once no thread can still act in an
  // epoch <= C. One cut at a time. May throw std::bad_alloc, and then before
  // it changed anything (no end_cut() is due).
  virtual std::uint64_t begin_cut() = 0;
  // Calls `fn` with every job in the cut (submitted in an epoch <= C and not
  // finished in one), in batches of up to kCutBatch (one indirect call per
  // batch, not per job). Between begin_cut() and end_cut() only.
  static constexpr std::size_t kCutBatch = 64;
  virtual void for_each_cut_job(std::uint64_t cut,
                                const std::function<void(std::span<const CutJob>)>& fn) = 0;
  // Ends the cut: finished slots may be reused again. Never throws (the
  // snapshot thread calls it while unwinding an encoding that ran out of memory).
  virtual void end_cut() noexcept = 0;
  // Handler names, by HandlerId.
  virtual std::span<const std::string> handler_names() const = 0;
  // The id counter: every id ever handed out is below it.
  virtual JobId next_job_id() const = 0;
  // The dead jobs as of the last begin_cut() (copied there, atomically with
  // the epoch bump, so that a job requeue_dead() moves back to the table is
  // in exactly one of the two in the snapshot). Once per cut: hands the copy
  // over.
  virtual std::vector<DeadJob> dead_jobs() = 0;
  // Jobs accepted so far (submitted + recovered), for "at risk" figures.
  virtual std::uint64_t accepted_total() const = 0;
  // A count that grows with every change a snapshot would record: a job
  // accepted, started, finished, retried, cancelled, fired by the scheduler,
  // a dead letter added or removed. Each change is counted after it is made,
  // with release, and this loads the counts with acquire: so a count read
  // before begin_cut() that equals the one read before the previous cut
  // means that every change counted by then was in that cut already, and the
  // periodic snapshot can be skipped (Snapshotter::run). A change whose count
  // is not visible yet is simply taken by a later snapshot.
  virtual std::uint64_t change_count() const = 0;
};

// The bytes of a snapshot image: a buffer (a shared-memory image is copied
// out of the segment) or a read-only mapping of a generation file (recovery
// maps a file instead of reading it: no copy, no fresh pages to fault in;
// generation files are never modified in place, see FileStore::map).
class ImageBytes {
 public:
  ImageBytes() = default;
  explicit ImageBytes(std::vector<unsigned char> buffer) noexcept
      : buffer_(std::move(buffer)), data_(buffer_.data()), size_(buffer_.size()) {}
  // Takes a mapping of `size` bytes made with mmap(2); munmap(2)s it at the end.
  static ImageBytes adopt_mapping(const void* data, std::size_t size) noexcept {
    ImageBytes b;
    b.data_ = static_cast<const unsigned char*>(data);
    b.size_ = size;
    b.mapped_ = true;
    return b;
  }
  ImageBytes(ImageBytes&& o) noexcept { *this = std::move(o); }
  ImageBytes& operator=(ImageBytes&& o) noexcept;
  ImageBytes(const ImageBytes&) = delete;
  ImageBytes& operator=(const ImageBytes&) = delete;
  ~ImageBytes() { release(); }

  // A mapping's pages are read in (MADV_POPULATE_READ, 4 MiB at a time,
  // front to back) by a thread of its own ("jobengine-load"), so that a
  // reader going through the bytes in order (verify(), then restore) works
  // on what has arrived while the rest is still being read from disk instead
  // of waiting for the whole file first, as MAP_POPULATE made it: from a cold
  // page cache, recovering 1M jobs went from ~2x to ~1.6x a plain read of
  // the file. A reader that overtakes it faults pages in itself (the kernel
  // reads each page once). The thread is stopped and joined before the
  // mapping goes. Without a thread to spare, populates here. Nothing for a buffer.
  void populate_in_background();

  std::span<const unsigned char> span() const noexcept { return {data_, size_}; }
  std::size_t size() const noexcept { return size_; }
  bool mapped() const noexcept { return mapped_; }
  // The bytes as an owned buffer (copied out of a mapping).
  std::vector<unsigned char> to_vector() &&;

 private:
  void release() noexcept;
  struct Populator {
    std::atomic<bool> stop{false};
    std::thread thread;
  };
  std::vector<unsigned char> buffer_;
  const unsigned char* data_ = nullptr;
  std::size_t size_ = 0;
  bool mapped_ = false;
  std::unique_ptr<Populator> populator_;  // while a thread reads the mapping in
};

// What recovery found: the image it keeps alive and the verified view into
// it (view.jobs empty: the records are read with snapshot::RecordReader).
struct LoadedSnapshot {
  ImageBytes bytes;
  snapshot::SnapshotView view;
};

// Snapshot figures for Health.
struct SnapshotHealth {
  std::uint64_t last_generation = 0;
  std::chrono::nanoseconds last_age{0};
  std::chrono::nanoseconds last_duration{0};
  std::uint64_t last_bytes = 0;
  std::uint64_t last_durable_generation = 0;
  std::chrono::nanoseconds last_durable_age{0};
  std::string last_error;
  std::uint64_t failures = 0;
  std::uint64_t accepted_at_last_durable = 0;
  std::uint64_t unchanged = 0;  // periodic snapshots not written: nothing had changed
};

// What a crash must not take with it but changes too often for a snapshot:
// the job each worker is running, and how far ids may have been handed out.
// Kept where a killed process leaves it (persistence/live_record.h: a shared
// file mapping in the snapshot directory); not across power loss.
class LiveRecord {
 public:
  virtual ~LiveRecord() = default;
  // What the previous holder left: the ids of the jobs its workers were
  // running when it died (none after a clean stop), and the end of its id
  // lease (0: none, or the record was unreadable).
  virtual const std::vector<JobId>& previous_running() const = 0;
  virtual JobId previous_lease_end() const = 0;
  // The generation from which snapshots hold the recoveries the previous
  // running ids gave (0: none yet). A start that gave them marks the record
  // with the first generation it may publish, before it publishes: a crash
  // after that snapshot, before arm(), must not count the same crash twice.
  virtual std::uint64_t previous_credited_generation() const = 0;
  virtual Status mark_credited(std::uint64_t generation) = 0;
  // Sizes the record for `workers`, all idle, its lease at least
  // `lease_floor`: the previous content is gone after it. Once, before any
  // worker runs.
  virtual Status arm(unsigned workers, JobId lease_floor) = 0;
  // Worker i's word (after arm()): the id of the job it is running, 0 none.
  virtual std::atomic<std::uint64_t>* running_word(unsigned i) = 0;
  // Raises the lease end to at least `end` (never lowers it). Thread-safe.
  virtual void extend_lease(JobId end) = 0;
  // A clean stop: no worker runs any more (all joined) and none will. Frees
  // what only a crash needs (the slot file); the running words are gone
  // after it. Never fails: a record left as it was reads as idle workers.
  virtual void close() noexcept = 0;
  // After a successful arm(): what the caller should log (a degraded
  // record), or empty.
  virtual std::string arm_warning() const { return {}; }
};

class Persistence {
 public:
  virtual ~Persistence() = default;
  // The live record, when the store has a directory; else nullptr.
  virtual LiveRecord* live_record() = 0;
  // The newest snapshot that verifies, from either store, or nullptr when
  // there is none. `report` says where it came from and what was skipped.
  virtual Result<std::unique_ptr<LoadedSnapshot>> load_newest(RecoveryReport& report) = 0;
  // Starts the snapshot thread, cutting from `source`. `first_generation`
  // continues the numbering after the recovered snapshot.
  virtual Status start(CutSource& source, std::uint64_t first_generation) = 0;
  // Takes a snapshot now and makes it durable on disk (blocks).
  virtual Result<SnapshotInfo> snapshot_now() = 0;
  // Stops the snapshot thread (no final snapshot). Idempotent.
  virtual void stop() = 0;
  // After stop(): takes one more snapshot in the calling thread and publishes
  // it to every store (durably on disk when there is one).
  virtual Result<SnapshotInfo> final_snapshot() = 0;
  virtual bool has_disk() const = 0;
  virtual SnapshotHealth health() const = 0;
};

// Opens the stores named in `options` (locking the directory). Defined in
// persistence/snapshotter.cc.
Result<std::unique_ptr<Persistence>> make_persistence(
    const SnapshotOptions& options, std::function<void(LogLevel, std::string_view)> log);

}  // namespace jobengine::detail
