// The snapshot thread and recovery: persistence's implementation of the
// engine's Persistence seam (engine/persistence_hooks.h).
//
// One snapshot = one cut of the engine's table (CutSource, engine.cc I5-I7),
// encoded once (persistence/FORMAT.md) and published to the shared-memory
// store and, when due or asked for, to the disk store. With shared memory the
// encoder writes the image straight into the segment's inactive slot
// (ShmStore::begin_image), each record checksummed as it is written, so a
// snapshot touches its bytes twice (encode, image checksum) rather than four
// times (encode, record checksums, image checksum, copy into the segment);
// the disk store then writes from that slot. Cuts are serialised by
// cut_mu_: the periodic thread, snapshot_now() callers (served by the thread)
// and the final snapshot of stop() never overlap.
//
// A periodic snapshot that would record nothing new is skipped
// (confirm_unchanged()): the engine counts every change a snapshot records
// (CutSource::change_count(), each change counted after it is made), and a
// count equal to the one read before a store's last cut means that image is
// still the engine's state; health()'s ages then restart from the check. An
// idle engine so writes nothing and reads none of its table.
//
// Recovery (persist::load_newest, recovery.h, shared with jobsnap) takes the
// candidate with the highest generation that verifies, from either store, and
// reports every newer candidate it skipped with the reason and byte offset.
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <unordered_map>

#include "engine/clock.h"
#include "engine/persistence_hooks.h"
#include "engine/test_hooks.h"
#include "engine/thread_util.h"
#include "jobengine/snapshot_format.h"
#include "persistence/file_store.h"
#include "persistence/live_record.h"
#include "persistence/recovery.h"
#include "persistence/shm_store.h"

namespace jobengine::detail {
namespace {

using std::chrono::milliseconds;
using std::chrono::nanoseconds;
using std::chrono::steady_clock;

constexpr std::size_t kInitialShmBytes = std::size_t{1} << 20;

std::int64_t wall_now_ns() {
  return std::chrono::duration_cast<nanoseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

// Copies a regular file (not following a symlink) to a new file created 0600
// (O_EXCL), for keeping a damaged segment's bytes. False on any failure.
bool copy_private(const char* from, const char* to) {
  const int in = ::open(from, O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK);
  if (in < 0) return false;
  const int out = ::open(to, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
  if (out < 0) {
    ::close(in);
    return false;
  }
  bool ok = true;
  char buf[65536];
  for (;;) {
    const ssize_t n = ::read(in, buf, sizeof(buf));
    if (n == 0) break;
    if (n < 0) {
      if (errno == EINTR) continue;
      ok = false;
      break;
    }
    for (ssize_t done = 0; done < n;) {
      const ssize_t w = ::write(out, buf + done, static_cast<std::size_t>(n - done));
      if (w < 0 && errno == EINTR) continue;
      if (w <= 0) {
        ok = false;
        break;
      }
      done += w;
    }
    if (!ok) break;
  }
  ok = ::fsync(out) == 0 && ok;
  ::close(out);
  ::close(in);
  if (!ok) ::unlink(to);
  return ok;
}

// Lends an Encoder the shared-memory store's inactive slot (ShmStore::
// begin_image / grow_image), remembering why it could not when it cannot.
class ShmSink final : public snapshot::Encoder::Sink {
 public:
  explicit ShmSink(persist::ShmStore* store) noexcept : store_(store) {}
  std::span<unsigned char> reserve(std::size_t size, std::size_t keep) noexcept override {
    try {
      Result<std::span<unsigned char>> room =
          begun_ ? store_->grow_image(size, keep) : store_->begin_image(size);
      begun_ = true;
      if (room.ok()) return *room;
      error_ = room.status();
    } catch (const std::bad_alloc&) {  // a Status allocates its message
      out_of_memory_ = true;
    }
    return {};
  }
  // Why reserve() last returned nothing (OK if it never did).
  Status error() const {
    if (out_of_memory_) return Status(StatusCode::kIoError, store_->name() + ": out of memory");
    return error_;
  }

 private:
  persist::ShmStore* store_;
  bool begun_ = false;
  bool out_of_memory_ = false;
  Status error_;
};

class Snapshotter final : public Persistence {
 public:
  Snapshotter(SnapshotOptions options, std::function<void(LogLevel, std::string_view)> log,
              std::unique_ptr<persist::FileStore> disk, std::unique_ptr<persist::ShmStore> shm,
              std::unique_ptr<persist::FileLiveRecord> live)
      : options_(std::move(options)),
        log_(std::move(log)),
        disk_(std::move(disk)),
        shm_(std::move(shm)),
        live_(std::move(live)) {}

  LiveRecord* live_record() override { return live_.get(); }

  ~Snapshotter() override { stop(); }

  // A segment whose control block was garbage, replaced by a fresh one.
  void note_replaced_segment(SkippedSnapshot s) { replaced_.push_back(std::move(s)); }

  // ---------------------------------------------------------------- recovery

  Result<std::unique_ptr<LoadedSnapshot>> load_newest(RecoveryReport& report) override {
    std::vector<persist::GenerationFile> files;
    if (disk_) {
      auto listed = disk_->list();
      if (!listed) return listed.status();
      files = std::move(*listed);
    }
    std::unique_ptr<LoadedSnapshot> loaded;
    // A damaged segment replaced at open (make_persistence) was a candidate too.
    for (const auto& s : replaced_) report.skipped.push_back(s);
    std::optional<persist::ShmCandidate> shm;
    if (shm_) shm.emplace(persist::ShmCandidate{"shm:" + options_.shm_name, shm_->read_active()});
    // A candidate that could not be read (not one that failed to verify)
    // fails open(): it may be the newest, and an engine started from an
    // older one would overwrite it (persist::load_newest).
    Status unreadable;
    loaded = persist::load_newest(shm ? &*shm : nullptr, files, *fs_for_reads(), report,
                                  /*map_files=*/true, /*gone=*/nullptr, &unreadable);
    if (!unreadable.ok()) {
      // The last entry is the unreadable candidate itself, in the error.
      for (std::size_t i = 0; i + 1 < report.skipped.size(); ++i) {
        const auto& s = report.skipped[i];
        log(LogLevel::kWarning, "recovery: skipped " + s.source + " (offset " +
                                    std::to_string(s.offset) + "): " + s.reason);
      }
      log(LogLevel::kError, std::string(unreadable.message()));
      return unreadable;
    }
    if (loaded) {
      log(LogLevel::kInfo, "recovery: taking " + report.source + ": " + report.why);
      // A generation file that verified: the disk store may recycle older ones,
      // and the jobs it holds are durable already (at_risk, see start()).
      if (disk_ && report.source.rfind("shm:", 0) != 0) {
        disk_->note_verified(loaded->view.header.generation);
        loaded_durable_ = true;
      } else if (disk_ && same_image_on_disk(files, loaded->view.header.generation,
                                             loaded->bytes.span())) {
        // Shared memory won the tie with the generation file of the same
        // number (a clean stop writes both): its jobs are durable as well.
        disk_->note_verified(loaded->view.header.generation);
        loaded_durable_ = true;
      }
    }
    for (const auto& s : report.skipped) {
      log(LogLevel::kWarning, "recovery: skipped " + s.source + " (offset " +
                                  std::to_string(s.offset) + "): " + s.reason);
    }
    if (!loaded) {
      log(LogLevel::kInfo, "recovery: " + report.why);
      return std::unique_ptr<LoadedSnapshot>();
    }
    next_generation_ = report.generation + 1;
    loaded_generation_ = loaded->view.header.generation;
    loaded_bytes_ = loaded->bytes.span().size();
    return loaded;
  }

  // Whether a listed generation file holds `image` (one from shared memory
  // that verified): the same generation, size and trailer (the image
  // checksum). The file was written from the same bytes and fsynced before
  // it was acknowledged; like every published generation, it is not read
  // whole again here.
  bool same_image_on_disk(std::span<const persist::GenerationFile> files, std::uint64_t generation,
                          std::span<const unsigned char> image) {
    if (image.size() < snapshot::kTrailerBytes) return false;
    for (const auto& f : files) {
      if (f.generation != generation || f.bytes != image.size()) continue;
      auto file = persist::FileStore::map(f.path, image.size(), *fs_for_reads());
      if (!file) return false;
      const std::span<const unsigned char> bytes = file->span();
      const std::size_t t = image.size() - snapshot::kTrailerBytes;
      return bytes.size() == image.size() &&
             std::memcmp(bytes.data() + t, image.data() + t, snapshot::kTrailerBytes) == 0;
    }
    return false;
  }

  // ----------------------------------------------------------- the thread

  Status start(CutSource& source, std::uint64_t first_generation) override {
    source_ = &source;
    // Before intake opens, accepted_total() is the recovered jobs: when they
    // came from a generation file, power loss can no longer lose them.
    if (loaded_durable_) accepted_at_durable_.store(source.accepted_total(), std::memory_order_relaxed);
    if (loaded_generation_ != 0) {
      // The engine starts with the jobs of the generation it recovered: that
      // image is the newest published (and, from a generation file, the
      // newest durable) until this process publishes one, and nothing has
      // changed since it yet. health() said generation 0 until then, for up
      // to an interval (for ever with periodic snapshots off).
      const std::int64_t now = Clock::steady_ns();
      last_confirmed_steady_ns_.store(now, std::memory_order_relaxed);
      last_bytes_.store(loaded_bytes_, std::memory_order_relaxed);
      last_generation_.store(loaded_generation_, std::memory_order_release);
      if (loaded_durable_) {
        last_durable_confirmed_steady_ns_.store(now, std::memory_order_relaxed);
        last_durable_generation_.store(loaded_generation_, std::memory_order_release);
      }
    }
    next_generation_ = std::max(next_generation_, first_generation);
    if (disk_) {
      // Never publish a generation at or below one already on disk (a newer
      // file that failed to verify still occupies its number).
      auto files = disk_->list();
      if (files && !files->empty()) {
        next_generation_ = std::max(next_generation_, files->front().generation + 1);
      }
    }
    const bool periodic = (shm_ && options_.shm_interval.count() > 0) ||
                          (disk_ && options_.disk_interval.count() > 0);
    try {
      thread_ = std::thread([this, periodic] { run(periodic); });
    } catch (const std::system_error& e) {
      return Status(StatusCode::kIoError, std::string("starting the snapshot thread: ") + e.what());
    }
    Status placed = place_thread(thread_.native_handle(), "jobengine-snap", options_.cpu);
    // The engine unwinds a failed start(): no snapshot thread may outlive it.
    if (!placed.ok()) stop();
    return placed;
  }

  Result<SnapshotInfo> snapshot_now() override {
    std::unique_lock<std::mutex> lock(mu_);
    // stopping_ first: once it is set, stop() may be joining thread_ outside
    // mu_, and thread_ must not be looked at.
    if (stopping_ || !thread_.joinable()) {
      return Status(StatusCode::kFailedPrecondition, "snapshot_now(): snapshot thread not running");
    }
    // A request is served by the first durable snapshot that *starts* after
    // it was made, so its cut includes every job accepted before the call.
    const std::uint64_t ticket = ++requested_;
    cv_.notify_all();
    cv_.wait(lock, [&] { return served_ >= ticket || stopping_; });
    if (served_ < ticket) {
      return Status(StatusCode::kFailedPrecondition, "snapshot_now(): engine stopping");
    }
    // Any durable snapshot of a batch >= ticket cut after the request: the
    // newest success answers it if it is one (a later batch may already
    // have replaced the result of ours); else every batch since failed.
    if (served_ok_batch_ >= ticket) return served_ok_info_;
    return served_status_;
  }

  void stop() override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stopping_ = true;
    }
    cv_.notify_all();
    if (thread_.joinable()) thread_.join();
  }

  Result<SnapshotInfo> final_snapshot() override {
    if (source_ == nullptr) return Status(StatusCode::kFailedPrecondition, "never started");
    return take(/*to_shm=*/shm_ != nullptr, /*to_disk=*/disk_ != nullptr);
  }

  bool has_disk() const override { return disk_ != nullptr; }

  SnapshotHealth health() const override {
    SnapshotHealth h;
    // Acquire: the generation is stored last (release), so its cut time is
    // there too; a first generation seen without it read as an age since boot.
    h.last_generation = last_generation_.load(std::memory_order_acquire);
    // The later of the cut and the last time nothing had changed since it
    // (confirm_unchanged()).
    const std::int64_t cut = std::max(last_cut_steady_ns_.load(std::memory_order_relaxed),
                                      last_confirmed_steady_ns_.load(std::memory_order_relaxed));
    h.last_duration = nanoseconds(last_duration_ns_.load(std::memory_order_relaxed));
    h.last_bytes = last_bytes_.load(std::memory_order_relaxed);
    h.last_durable_generation = last_durable_generation_.load(std::memory_order_acquire);  // as above
    std::int64_t durable_cut = 0;
    if (h.last_durable_generation != 0) {
      durable_cut = std::max(last_durable_cut_steady_ns_.load(std::memory_order_relaxed),
                             last_durable_confirmed_steady_ns_.load(std::memory_order_relaxed));
    }
    // Read after the times above (read before, a cut or confirmation stored
    // in between gave a negative age); clamped at 0 all the same.
    const std::int64_t now = Clock::steady_ns();
    if (h.last_generation != 0) h.last_age = nanoseconds(std::max<std::int64_t>(0, now - cut));
    if (h.last_durable_generation != 0) {
      h.last_durable_age = nanoseconds(std::max<std::int64_t>(0, now - durable_cut));
    }
    h.failures = failures_.load(std::memory_order_relaxed);
    h.accepted_at_last_durable = accepted_at_durable_.load(std::memory_order_relaxed);
    h.unchanged = unchanged_.load(std::memory_order_relaxed);
    // The lock is taken only while the last attempt failed.
    if (error_present_.load(std::memory_order_acquire)) h.last_error = last_error_copy();
    return h;
  }

 private:
  void run(bool periodic) {
    auto now = steady_clock::now();
    auto next_shm = now + options_.shm_interval;
    auto next_disk = now + options_.disk_interval;
    const bool shm_periodic = shm_ && options_.shm_interval.count() > 0;
    const bool disk_periodic = disk_ && options_.disk_interval.count() > 0;
    // A segment whose publishes keep failing (a full /dev/shm) is retried at
    // a doubling period, up to kMaxShmRetry (or shm_interval if longer), not
    // every shm_interval: each try encodes every job and logs an error, so an
    // idle engine with 1M jobs kept a core busy. Back to shm_interval once a
    // publish succeeds.
    const auto shm_retry_cap = std::max<nanoseconds>(options_.shm_interval, kMaxShmRetry);
    nanoseconds shm_wait = options_.shm_interval;
    std::unique_lock<std::mutex> lock(mu_);
    for (;;) {
      auto due = steady_clock::time_point::max();
      if (shm_periodic) due = std::min(due, next_shm);
      if (disk_periodic) due = std::min(due, next_disk);
      if (periodic) {
        cv_.wait_until(lock, due, [&] { return stopping_ || requested_ > served_; });
      } else {
        cv_.wait(lock, [&] { return stopping_ || requested_ > served_; });
      }
      if (stopping_) return;
      now = steady_clock::now();
      const std::uint64_t batch = requested_;
      const bool asked = batch > served_;
      const bool disk_due = disk_periodic && now >= next_disk;
      const bool shm_due = shm_periodic && now >= next_shm;
      if (!asked && !disk_due && !shm_due) continue;
      lock.unlock();
      // A periodic snapshot of an engine where nothing changed since the
      // stores' last images would write the same jobs again: it is only
      // noted (the ages in health() restart), so an idle engine costs no CPU.
      Result<SnapshotInfo> result = SnapshotInfo{};
      if (asked || !confirm_unchanged(disk_due)) {
        result = take(/*to_shm=*/shm_ != nullptr, /*to_disk=*/disk_ && (asked || disk_due));
      }
      lock.lock();
      now = steady_clock::now();
      if (shm_due || asked) {
        // The segment's last publish failed exactly when its change count
        // is kNever (take() sets it; read on the thread that writes it).
        const bool shm_failing = shm_ != nullptr && shm_changes_ == kNever;
        shm_wait = !shm_failing ? nanoseconds(options_.shm_interval)
                                : std::min<nanoseconds>(2 * shm_wait, shm_retry_cap);
        next_shm = now + shm_wait;
      }
      if (disk_due || asked) next_disk = now + options_.disk_interval;
      if (asked) {
        served_ = batch;
        if (result) {
          served_ok_batch_ = batch;
          served_ok_info_ = *result;
        } else {
          served_status_ = result.status();
        }
        cv_.notify_all();
      }
    }
  }

  // Whether the periodic snapshot due now (to shared memory if there is a
  // segment, to disk too when `disk_due`) would record nothing new: no change
  // counted (CutSource::change_count()) since the last image each of those
  // stores published. Then the images they hold are the engine's state as of
  // now, which restarts the ages health() reports, and true is returned.
  bool confirm_unchanged(bool disk_due) {
    std::lock_guard<std::mutex> cut_lock(cut_mu_);
    // The time first: the state is known to be captured as of a time
    // before the counts were read, never after.
    const std::int64_t checked = Clock::steady_ns();
    const std::uint64_t changes = source_->change_count();
    const bool shm_current = shm_ == nullptr || changes == shm_changes_;
    const bool disk_current = !(disk_due && disk_) || changes == disk_changes_;
    if (!shm_current || !disk_current) return false;
    if (changes == newest_changes_) last_confirmed_steady_ns_.store(checked, std::memory_order_relaxed);
    if (disk_ && changes == disk_changes_) {
      last_durable_confirmed_steady_ns_.store(checked, std::memory_order_relaxed);
    }
    unchanged_.fetch_add(1, std::memory_order_relaxed);
    return true;
  }

  // One snapshot: cut, encode, publish. Serialised by cut_mu_. Memory that
  // runs out on the way (the image's own buffer on a large table, the copy
  // of the dead letters, a name) fails this snapshot as a failed publish
  // does, never the thread: the cut it began is ended, and each store asked
  // for keeps its image and is written again on schedule.
  Result<SnapshotInfo> take(bool to_shm, bool to_disk) {
    std::lock_guard<std::mutex> cut_lock(cut_mu_);
    try {
      return take_locked(to_shm, to_disk);
    } catch (const std::bad_alloc&) {
      return out_of_memory(to_shm, to_disk);
    }
  }

  // take()'s failure for want of memory. Allocates nothing it cannot do
  // without (the error strings are best effort).
  Status out_of_memory(bool to_shm, bool to_disk) noexcept {
    static constexpr Status::Rep kRep{
        StatusCode::kInternal, false,
        "snapshot: out of memory encoding the image; nothing was published, the stores keep "
        "their previous images"};
    const bool shm = to_shm && shm_ != nullptr;
    const bool disk = to_disk && disk_ != nullptr;
    if (shm) shm_changes_ = kNever;
    if (disk) disk_changes_ = kNever;
    failures_.fetch_add((shm ? 1 : 0) + (disk ? 1 : 0), std::memory_order_relaxed);
    try {
      std::lock_guard<std::mutex> lock(error_mu_);
      if (shm) shm_error_ = kRep.message;
      if (disk) disk_error_ = kRep.message;
    } catch (const std::bad_alloc&) {
      // health() shows an empty error: the failure count still says it.
    }
    error_present_.store(true, std::memory_order_release);
    try {
      log(LogLevel::kError, std::string(kRep.message));
    } catch (const std::bad_alloc&) {
    }
    return Status(kRep);
  }

  Result<SnapshotInfo> take_locked(bool to_shm, bool to_disk) {
    const auto t0 = steady_clock::now();
    const std::uint64_t generation = next_generation_++;
    // Read before the cut: every change it counts is in this snapshot
    // (CutSource::change_count()).
    const std::uint64_t changes = source_->change_count();

    // Jobs accepted so far, read before the cut: all of them are in this
    // snapshot (or finished), so once it is durable none of them is at risk.
    // Read after, it would count jobs accepted after the cut as safe.
    const std::uint64_t accepted = source_->accepted_total();
    const std::uint64_t cut = source_->begin_cut();
    // Ends the cut however the encoding below leaves it (it allocates).
    struct CutEnd {
      CutSource* source;
      bool open = true;
      void end() {
        if (!open) return;
        open = false;
        source->end_cut();
      }
      ~CutEnd() { end(); }
    } cut_end{source_};
    const std::int64_t steady_at_cut = Clock::steady_ns();
    const std::int64_t wall_at_cut = wall_now_ns();
    const Clock::Converter to_steady = Clock::converter();
    auto to_wall = [&](std::uint64_t ticks) {
      return wall_at_cut - (steady_at_cut - to_steady(ticks));
    };
    snapshot::Header header;
    header.generation = generation;
    header.cut_epoch = cut;
    header.wall_time_ns = wall_at_cut;
    header.next_job_id = source_->next_job_id();
    // With shared memory, the image is encoded straight into the segment's
    // inactive slot (ShmStore::begin_image), which grows only if the image
    // outgrows it.
    const bool in_place = to_shm && shm_ != nullptr;
    ShmSink sink(shm_.get());
    encoder_.begin(header, in_place ? &sink : nullptr);
    const auto names = source_->handler_names();
    for (const auto& n : names) encoder_.add_handler(n);
    // Dead jobs are stored under their handler's name, which may not be
    // registered now: extra names follow the registered ones.
    std::vector<DeadJob> dead = source_->dead_jobs();
    std::deque<std::string> extra;  // a deque: `index` holds views of its strings
    // An image naming more handlers than the format holds would verify
    // nowhere (recovery refuses it): it is published nowhere, and the
    // snapshot fails, naming why. The registered ones fit (kMaxHandlers is
    // half the format's limit); only the unregistered names of restored
    // dead letters can reach it.
    static_assert(2 * jobengine::kMaxHandlers <= snapshot::kMaxHandlers + 1);
    Status refused;
    // Name -> index in the image's table, made only when there are letters.
    std::unordered_map<std::string_view, std::uint32_t> index;
    auto handler_index = [&](const std::string& name) -> std::uint32_t {
      if (const auto it = index.find(name); it != index.end()) return it->second;
      if (names.size() + extra.size() >= snapshot::kMaxHandlers) {
        refused = Status(StatusCode::kFailedPrecondition,
                         "generation " + std::to_string(generation) + " would name more than " +
                             std::to_string(snapshot::kMaxHandlers) +
                             " handlers (the registered ones and those of dead letters that are "
                             "not registered), more than the format holds: not published");
        return 0;
      }
      extra.push_back(name);
      encoder_.add_handler(name);
      const auto i = static_cast<std::uint32_t>(names.size() + extra.size() - 1);
      index.emplace(extra.back(), i);
      return i;
    };
    if (!dead.empty()) {
      index.reserve(names.size());
      for (std::size_t i = 0; i < names.size(); ++i) {
        index.emplace(names[i], static_cast<std::uint32_t>(i));
      }
    }
    std::vector<std::uint32_t> dead_handler(dead.size());
    for (std::size_t i = 0; i < dead.size(); ++i) dead_handler[i] = handler_index(dead[i].handler);
    std::uint64_t jobs = 0;
    std::uint64_t resumable = 0;  // jobs, less dead letters and cancelled ones
    source_->for_each_cut_job(cut, [&](std::span<const CutJob> batch) {
      snapshot::JobRecord r;
      for (const CutJob& j : batch) {
        r.id = j.id;
        r.handler = j.handler;
        r.priority = j.priority;
        r.state = j.state;
        r.attempts = j.attempts;
        r.recoveries = j.recoveries;
        r.submit_ns = to_wall(j.submit_ticks);
        r.run_at_ns = to_wall(j.run_at_ticks);
        r.cancel_requested = j.cancel_requested;
        r.deadline_ns = j.deadline_ns;
        r.payload = j.payload;
        r.key = j.key;
        encoder_.add_job(r);
        resumable += j.cancel_requested ? 0 : 1;
      }
      jobs += batch.size();
    });
    cut_end.end();
    for (std::size_t i = 0; i < dead.size(); ++i) {
      const DeadJob& d = dead[i];
      snapshot::JobRecord r;
      r.id = d.id;
      r.handler = dead_handler[i];
      r.priority = d.priority;
      r.state = snapshot::JobState::kDead;
      r.attempts = d.attempts;
      r.recoveries = d.recoveries;
      r.submit_ns = d.submit_ns;
      r.run_at_ns = d.run_at_ns;
      r.dead_reason = d.reason;
      r.dead_at_ns = d.dead_at_ns;
      r.payload = d.payload;
      r.error = d.error;
      r.key = d.key;
      r.deadline_ns = d.deadline_ns;
      encoder_.add_job(r);
      ++jobs;
    }
    const std::span<const unsigned char> image = encoder_.finish();

    SnapshotInfo info;
    info.generation = generation;
    info.jobs = jobs;
    info.resumable_jobs = resumable;
    info.bytes = image.size();
    // Each store succeeds or fails on its own: a generation durable on disk
    // is recorded as such even if shared memory failed, and a shared-memory
    // success does not hide a disk failure (health() keeps each store's
    // error until that store publishes again).
    Status shm_failure;
    Status disk_failure;
    if (in_place) {
      // The image is in the slot unless the slot could not grow (then the
      // encoder finished it in its own buffer): commit it, or report why not.
      shm_failure = !refused.ok()        ? refused
                    : encoder_.in_sink() ? shm_->commit_image(generation, image.size(),
                                                              encoder_.whole_checksum())
                                         : sink.error();
    }
    if (in_place && shm_failure.ok()) {
      if (auto* hook = detail::g_after_shm_commit.load(std::memory_order_relaxed)) [[unlikely]] {
        hook();
      }
    }
    const bool to_file = to_disk && disk_;
    if (to_file) {
      // Out of memory here (the paths the publish builds) fails the disk
      // store only: the segment holds this generation already, and
      // out_of_memory() would have marked both stores failed.
      try {
        disk_failure = !refused.ok() ? refused : disk_->publish(generation, image);
      } catch (const std::bad_alloc&) {
        static constexpr Status::Rep kRep{
            StatusCode::kInternal, false,
            "out of memory writing the generation file; the directory keeps its previous "
            "generations"};
        disk_failure = Status(kRep);
      }
      // From here on a published generation is recorded as published:
      // nothing on the success path may throw (out_of_memory() would count
      // it failed). The path is best effort.
      if (disk_failure.ok()) {
        char name[64];
        std::snprintf(name, sizeof(name), "/gen-%020llu.jobsnap",
                      static_cast<unsigned long long>(generation));
        try {
          info.path = disk_->dir() + name;
        } catch (const std::bad_alloc&) {
        }
      }
    }
    info.took = std::chrono::duration_cast<nanoseconds>(steady_clock::now() - t0);
    const bool shm_ok = in_place && shm_failure.ok();
    const bool disk_ok = to_file && disk_failure.ok();
    {
      std::lock_guard<std::mutex> lock(error_mu_);
      // Text only for a failure (a success clears without allocating). Out
      // of memory for the text leaves "out of memory": a throw from here
      // would have had out_of_memory() mark a store that published as failed.
      const auto set_error = [generation](std::string& text, const Status& f) noexcept {
        try {
          text = "generation " + std::to_string(generation) + ": " + f.to_string();
        } catch (const std::bad_alloc&) {
          try {
            text.assign("out of memory");  // fits the string's own buffer: no allocation
          } catch (const std::bad_alloc&) {
          }
        }
      };
      if (in_place) {
        if (shm_ok) shm_error_.clear();
        else set_error(shm_error_, shm_failure);
      }
      if (to_file) {
        if (disk_ok) disk_error_.clear();
        else set_error(disk_error_, disk_failure);
      }
      error_present_.store(!shm_error_.empty() || !disk_error_.empty() || (in_place && !shm_ok) ||
                               (to_file && !disk_ok),
                           std::memory_order_release);
    }
    for (const Status* f : {&shm_failure, &disk_failure}) {
      if (f->ok()) continue;
      failures_.fetch_add(1, std::memory_order_relaxed);
      try {
        log(LogLevel::kError, "snapshot generation " + std::to_string(generation) + ": " +
                                  f->to_string());
      } catch (const std::bad_alloc&) {
      }
    }
    // A store whose publish failed holds an older image (or none): its next
    // periodic snapshot must be written whatever changed, or an idle
    // engine would never retry it and its error would stay in health().
    if (in_place) shm_changes_ = shm_ok ? changes : kNever;
    if (to_file) disk_changes_ = disk_ok ? changes : kNever;
    if (shm_ok || disk_ok) {
      newest_changes_ = changes;
      last_cut_steady_ns_.store(steady_at_cut, std::memory_order_relaxed);
      last_duration_ns_.store(info.took.count(), std::memory_order_relaxed);
      last_bytes_.store(info.bytes, std::memory_order_relaxed);
      // Last, with release: health() acquires it and then reads the above.
      last_generation_.store(generation, std::memory_order_release);
    }
    if (disk_ok) {
      last_durable_cut_steady_ns_.store(steady_at_cut, std::memory_order_relaxed);
      accepted_at_durable_.store(accepted, std::memory_order_relaxed);
      last_durable_generation_.store(generation, std::memory_order_release);  // last, as above
      try {
        log(LogLevel::kDebug, "snapshot generation " + std::to_string(generation) + ": " +
                                  std::to_string(jobs) + " jobs, " + std::to_string(info.bytes) +
                                  " bytes, durable in " + info.path);
      } catch (const std::bad_alloc&) {
      }
    }
    // What the caller asked for decides: a disk generation (snapshot_now(),
    // final and periodic disk snapshots) is the result when one was asked
    // for, with a shared-memory failure only logged and in health(); else the
    // shared-memory publish.
    if (to_file) {
      if (!disk_failure.ok()) return disk_failure;
    } else if (!shm_failure.ok()) {
      return shm_failure;
    }
    return info;
  }

  // The failing store's error: the disk's first (durability), else shared memory's.
  std::string last_error_copy() const {
    std::lock_guard<std::mutex> lock(error_mu_);
    return disk_error_.empty() ? shm_error_ : disk_error_;
  }

  persist::FileSystem* fs_for_reads() {
    if (!read_fs_) read_fs_ = persist::default_file_system();
    return read_fs_.get();
  }

  void log(LogLevel level, const std::string& line) const {
    if (log_) log_(level, line);
  }

  const SnapshotOptions options_;
  const std::function<void(LogLevel, std::string_view)> log_;
  std::unique_ptr<persist::FileStore> disk_;
  std::unique_ptr<persist::ShmStore> shm_;
  std::unique_ptr<persist::FileLiveRecord> live_;  // with disk_: dir/LIVE
  std::shared_ptr<persist::FileSystem> read_fs_;
  CutSource* source_ = nullptr;

  std::mutex cut_mu_;  // one cut at a time; guards encoder_ and next_generation_
  snapshot::Encoder encoder_;
  std::uint64_t next_generation_ = 1;
  // CutSource::change_count() read before the cut of the last image each
  // store published, and of the newest one (confirm_unchanged()). kNever
  // until one did.
  static constexpr std::uint64_t kNever = ~std::uint64_t{0};
  static constexpr nanoseconds kMaxShmRetry = std::chrono::seconds(1);
  std::uint64_t shm_changes_ = kNever;
  std::uint64_t disk_changes_ = kNever;
  std::uint64_t newest_changes_ = kNever;

  std::mutex mu_;  // the thread's schedule and snapshot_now() requests
  std::condition_variable cv_;
  bool stopping_ = false;
  std::uint64_t requested_ = 0;
  std::uint64_t served_ = 0;         // requests up to this ticket were served
  std::uint64_t served_ok_batch_ = 0;  // the newest served batch that succeeded
  SnapshotInfo served_ok_info_;       // ... and its result
  Status served_status_;              // the newest failure of a served batch
  std::thread thread_;

  // Health, read without the locks above.
  std::atomic<std::uint64_t> last_generation_{0};
  std::atomic<std::int64_t> last_cut_steady_ns_{0};
  std::atomic<std::int64_t> last_duration_ns_{0};
  std::atomic<std::uint64_t> last_bytes_{0};
  std::atomic<std::uint64_t> last_durable_generation_{0};
  std::atomic<std::int64_t> last_durable_cut_steady_ns_{0};
  std::atomic<std::int64_t> last_confirmed_steady_ns_{0};
  std::atomic<std::int64_t> last_durable_confirmed_steady_ns_{0};
  std::atomic<std::uint64_t> unchanged_{0};
  std::atomic<std::uint64_t> accepted_at_durable_{0};
  bool loaded_durable_ = false;  // load_newest() took a generation file (before start())
  std::uint64_t loaded_generation_ = 0;  // the generation recovery loaded; 0: none
  std::uint64_t loaded_bytes_ = 0;       // its image's size
  std::atomic<std::uint64_t> failures_{0};
  std::atomic<bool> error_present_{false};  // either error below is set
  mutable std::mutex error_mu_;
  // Each store's error from its last publish ("" after a success), so that a
  // success of one does not clear the other's failure.
  std::string shm_error_;
  std::string disk_error_;
  std::vector<SkippedSnapshot> replaced_;
};

}  // namespace

}  // namespace jobengine::detail

namespace jobengine::persist {

namespace {

// Whether a failed read of a candidate says something about its image: it is
// damaged (kCorruption: a bad checksum, a torn or mid-write slot, a damaged
// control block) or refused as input (kInvalidArgument: a symlink, a FIFO, a
// file over the size limit), and recovery may pass over it. Anything else
// (kIoError: open failing with EMFILE or ENFILE, mmap with ENOMEM, EIO,
// ESTALE, EACCES, EINTR past the retry limit, the segment's copy out of
// memory; kFailedPrecondition: a segment whose writer rewrote it during
// every copy) says only that this attempt failed: the image may be the
// newest, and falling back would let the next publishes destroy it.
// kNotFound (gone) is the caller's.
bool says_nothing_of_the_image(const Status& s) {
  return s.code() != StatusCode::kCorruption && s.code() != StatusCode::kInvalidArgument &&
         s.code() != StatusCode::kNotFound;
}

// Stops recovery at `source`, which could not be read for `why`.
std::unique_ptr<detail::LoadedSnapshot> unreadable(const std::string& source, const Status& why,
                                                   bool is_shm, RecoveryReport& report,
                                                   Status* error) {
  std::string msg = "recovery cannot read " + source + " (" + std::string(why.message()) +
                    "): it may hold the newest snapshot, so recovery does not fall back to an "
                    "older one (whose next snapshots would overwrite it); retry once the cause "
                    "has cleared (open files, memory, the device)";
  msg += is_shm ? ", or, if the segment is truly unreadable, remove it (/dev/shm/" +
                      source.substr(4) + ") to recover from the disk"
                : ", or, if the file is truly unreadable, move it out of its directory";
  report.skipped.push_back({source, 0, msg});
  report.recovered = false;
  report.why = msg;
  if (error != nullptr) {
    *error = Status(why.code() == StatusCode::kOk ? StatusCode::kIoError : why.code(), msg);
  }
  return nullptr;
}

}  // namespace

std::unique_ptr<detail::LoadedSnapshot> load_newest(ShmCandidate* shm,
                                                    std::span<const GenerationFile> files,
                                                    FileSystem& fs, RecoveryReport& report,
                                                    bool map_files, std::size_t* gone,
                                                    Status* error) {
  using detail::LoadedSnapshot;
  struct Candidate {
    std::string source;
    std::uint64_t generation;  // from the file name, or UINT64_MAX for shm (decoded later)
    std::string path;          // empty for shm
  };
  std::vector<Candidate> candidates;
  std::vector<unsigned char> shm_image;
  const bool have_shm = shm != nullptr && shm->image.ok();
  if (shm != nullptr) {
    if (have_shm) {
      shm_image = std::move(*shm->image);  // moved, not copied: it may be large
      candidates.push_back({shm->source, ~std::uint64_t{0}, ""});
    } else if (says_nothing_of_the_image(shm->image.status())) {
      return unreadable(shm->source, shm->image.status(), /*is_shm=*/true, report, error);
    } else if (shm->image.status().code() != StatusCode::kNotFound) {
      report.skipped.push_back({shm->source, 0, std::string(shm->image.status().message())});
    }
  }
  for (const auto& f : files) candidates.push_back({f.path, f.generation, f.path});
  // The shared-memory image's generation is in its header: decode it first
  // to place it among the files. An empty image (a damaged or crafted
  // segment can commit one) is verified like any other: too short.
  std::unique_ptr<LoadedSnapshot> shm_loaded;
  if (have_shm) {
    shm_loaded = std::make_unique<LoadedSnapshot>();
    shm_loaded->bytes = detail::ImageBytes(std::move(shm_image));
    snapshot::DecodeError err;
    auto view = snapshot::verify(shm_loaded->bytes.span(), &err);
    if (view) {
      shm_loaded->view = std::move(*view);
      candidates.front().generation = shm_loaded->view.header.generation;
    } else {
      report.skipped.push_back(
          {candidates.front().source, err.offset, std::string(view.status().message())});
      candidates.erase(candidates.begin());
      shm_loaded.reset();
    }
  }
  // Newest first; on a tie the shared-memory copy (same bytes) wins.
  std::stable_sort(candidates.begin(), candidates.end(),
                   [](const Candidate& a, const Candidate& b) { return a.generation > b.generation; });
  for (const Candidate& c : candidates) {
    std::unique_ptr<LoadedSnapshot> loaded;
    if (c.path.empty()) {
      loaded = std::move(shm_loaded);
    } else {
      Result<detail::ImageBytes> bytes = Status();
      if (map_files) {
        bytes = FileStore::map(c.path, kMaxSnapshotFileBytes, fs);
      } else {
        auto read = FileStore::read(c.path, kMaxSnapshotFileBytes, fs);
        bytes = read ? Result<detail::ImageBytes>(detail::ImageBytes(std::move(*read)))
                     : Result<detail::ImageBytes>(read.status());
      }
      if (!bytes) {
        // Pruned or recycled since it was listed: gone, not damaged.
        if (bytes.status().code() == StatusCode::kNotFound) {
          if (gone != nullptr) ++*gone;
          continue;
        }
        if (says_nothing_of_the_image(bytes.status())) {
          return unreadable(c.source, bytes.status(), /*is_shm=*/false, report, error);
        }
        report.skipped.push_back({c.source, 0, std::string(bytes.status().message())});
        continue;
      }
      loaded = std::make_unique<LoadedSnapshot>();
      loaded->bytes = std::move(*bytes);
      snapshot::DecodeError err;
      auto view = snapshot::verify(loaded->bytes.span(), &err);
      if (!view) {
        report.skipped.push_back({c.source, err.offset, std::string(view.status().message())});
        continue;
      }
      loaded->view = std::move(*view);
      if (loaded->view.header.generation != c.generation) {
        report.skipped.push_back(
            {c.source, 16,
             "file name says generation " + std::to_string(c.generation) + ", header says " +
                 std::to_string(loaded->view.header.generation)});
        continue;
      }
    }
    report.recovered = true;
    report.source = c.source;
    report.generation = loaded->view.header.generation;
    report.taken_at = std::chrono::system_clock::time_point(
        std::chrono::duration_cast<std::chrono::system_clock::duration>(
            std::chrono::nanoseconds(loaded->view.header.wall_time_ns)));
    report.why = "newest snapshot that verifies (generation " + std::to_string(report.generation) +
                 ", " + std::to_string(loaded->view.header.job_count) + " jobs)" +
                 (report.skipped.empty()
                      ? std::string()
                      : "; skipped " + std::to_string(report.skipped.size()) + " that did not");
    return loaded;
  }
  report.recovered = false;
  report.why = candidates.empty() && report.skipped.empty() ? "no snapshot found: starting empty"
                                                            : "no snapshot verified: starting empty";
  return nullptr;
}

}  // namespace jobengine::persist

namespace jobengine::detail {

Result<std::unique_ptr<Persistence>> make_persistence(
    const SnapshotOptions& options, std::function<void(LogLevel, std::string_view)> log) {
  std::unique_ptr<persist::FileStore> disk;
  std::unique_ptr<persist::ShmStore> shm;
  if (!options.dir.empty()) {
    auto store = persist::FileStore::open(options.dir, options.keep_generations);
    if (!store) return store.status();
    disk = std::move(*store);
  }
  std::vector<SkippedSnapshot> replaced;
  if (!options.shm_name.empty()) {
    auto store = persist::ShmStore::open_or_create(options.shm_name, kInitialShmBytes);
    if (!store && store.status().code() == StatusCode::kCorruption && disk) {
      // Our own segment (owner and mode were checked: that is
      // kFailedPrecondition) with a damaged control block: it holds no image
      // anyone can trust, and the disk store can recover. Keep its bytes for
      // an operator, replace it, and let recovery report it as skipped.
      const std::string why(store.status().message());
      std::string kept = options.dir + "/damaged-shm-" + options.shm_name + "-" +
                         std::to_string(wall_now_ns()) + ".bin";
      // Only once its bytes are safe: the damage may be in a part of the
      // control block that leaves a newer image than the disk's readable to
      // an operator. Kept nowhere (no space, a quota), it is left as it is,
      // and open() fails as without a disk store.
      if (!copy_private(("/dev/shm/" + options.shm_name).c_str(), kept.c_str())) {
        return Status(StatusCode::kCorruption,
                      "shared-memory segment " + options.shm_name + " is damaged (" + why +
                          ") and its bytes could not be kept in " + options.dir +
                          ": left as it is for an operator (copy /dev/shm/" + options.shm_name +
                          " away, or remove it to recover from " + options.dir + ")");
      }
      if (log) {
        log(LogLevel::kWarning, "shared-memory segment " + options.shm_name + " is damaged (" + why +
                                    "); its bytes are kept in " + kept +
                                    "; replacing it and recovering from " + options.dir);
      }
      if (Status removed = persist::ShmStore::remove(options.shm_name); !removed.ok()) return removed;
      replaced.push_back({"shm:" + options.shm_name, 0, why + " (bytes kept in " + kept + ")"});
      store = persist::ShmStore::open_or_create(options.shm_name, kInitialShmBytes);
    }
    if (!store) return store.status();
    shm = std::move(*store);
  }
  // The live record, in the directory whose lock the disk store now holds.
  std::unique_ptr<persist::FileLiveRecord> live;
  if (disk) {
    auto record = persist::FileLiveRecord::open(options.dir);
    if (!record) return record.status();
    live = std::move(*record);
    if (!live->previous_problem().empty() && log) {
      log(LogLevel::kWarning, "live record " + live->path() + " ignored (" +
                                  live->previous_problem() +
                                  "): no job is known to have been running at the last crash");
    }
  }
  auto snapshotter = std::make_unique<Snapshotter>(options, std::move(log), std::move(disk),
                                                   std::move(shm), std::move(live));
  for (auto& r : replaced) snapshotter->note_replaced_segment(std::move(r));
  return std::unique_ptr<Persistence>(std::move(snapshotter));
}

}  // namespace jobengine::detail
