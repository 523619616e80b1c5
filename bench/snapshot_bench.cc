// What snapshots cost, each figure next to the baseline it is judged against,
// side by side in one process (bench/ratios.py prints the ratios):
//
//   BM_SubmitWithShmSnapshots      Producer throughput and per-submit latency
//   BM_SubmitWithoutSnapshots      with 100,000 jobs pending (parked, see
//                                  below) and a shared-memory snapshot every
//                                  10 ms, against the same engine without
//                                  snapshots. One submitter (the benchmark
//                                  thread) and one worker, pinned as in
//                                  throughput_bench. Each iteration submits
//                                  JOBENGINE_BENCH_SUBMITS empty high-priority
//                                  jobs (16-byte payload) and ends once the
//                                  worker ran them all. Counters p50_ns,
//                                  p99_ns, p999_ns, max_us: see "Submit
//                                  latency"; queue_full: kQueueFull retries
//                                  per iteration (the table is full: the
//                                  worker is behind, or a snapshot holds
//                                  slots, see engine/job_table.h (2));
//                                  snapshots per iteration; snap_ms and
//                                  snap_MB: the last snapshot's wall time
//                                  and size. Measured in the steady state:
//                                  with snapshots, only once both image
//                                  slots have held every parked job (see
//                                  wait_shm_steady). Targets: throughput
//                                  >= 0.9x, p99.9 <= 1.2x.
//   BM_SnapshotToDisk_1M           Engine::snapshot_now() of 1,000,000 pending
//   BM_PlainWriteFsync_1M          jobs with 64-byte payloads (shm off,
//                                  periodic disk off), against creating a file
//                                  in the same directory and writing the same
//                                  number of bytes (the image's size,
//                                  SnapshotInfo::bytes) with one write() and
//                                  an fsync(). Both in steady state with the
//                                  default 3 generations kept (see
//                                  kKeepGenerations): the engine's time
//                                  includes getting rid of the oldest
//                                  generation, which FileStore::publish does
//                                  before snapshot_now() returns (it rewrites
//                                  that file in place: "Recycling" in
//                                  file_store.h). bytes_per_second; target:
//                                  the snapshot >= 0.5x the plain write.
//   BM_Recover_1M/{warm,cold}      Engine::open() + register_handler() +
//   BM_PlainRead_1M/{warm,cold}    start() recovering the 1M jobs from a disk
//                                  snapshot (StartReport::recovery must say 1M
//                                  pending), against open() + read() of the
//                                  same file into freshly allocated memory.
//                                  warm: the file is in the page cache (a
//                                  process restart); cold: its pages are
//                                  dropped with posix_fadvise(DONTNEED) before
//                                  every iteration of both (a reboot; fadvise
//                                  drops only this file's clean pages, no
//                                  root needed). One untimed round first;
//                                  teardown (stop(kAbandon), destruction,
//                                  freeing the buffer) is not timed. Target:
//                                  recovery <= 2x the read.
//   BM_OpenEmpty_1M                Not targets, to read the others by:
//   BM_Encode_1M                   open() + register + start() of the same
//   BM_Decode_1M                   engine over an empty snapshot directory
//   BM_Verify_1M                   (what recovery costs before it reads a
//                                  byte: allocating and touching the
//                                  capacity * 256-byte job table, two threads
//                                  sharing it), and snapshot::Encoder /
//                                  snapshot::decode() (tools: every record
//                                  materialized) / snapshot::verify()
//                                  (recovery: checked, not materialized) alone
//                                  on the same 1M-job image in memory.
//
// Parked jobs. The pending jobs must stay pending while the measured jobs run
// on the same worker, in the same engine (the point is what snapshotting them
// costs). They are submitted at kLowPriority with fairness_period = 0 (strict
// priority), and their handler never finishes them:
//  - In the submit benchmarks the worker takes a low-priority batch only when
//    the high-priority queue is empty, which happens whenever the worker
//    catches up with the submitter; a handler that blocked there would stall
//    the measured jobs, and one that returned kRetry at once would churn the
//    100k jobs through the low queue for as long as the worker is idle
//    (rewriting their slots under the snapshot reader). So the parked handler
//    spins (with pauses) while no measured job is outstanding -- the
//    submitter publishes how many it submitted, the measured handler how many
//    it ran -- and returns kRetry (requeued at the back, attempt + 1;
//    max_attempts = 65535) as soon as one is. The rest of that batch (up to
//    dequeue_batch - 1 parked jobs) is requeued at once, so each idle spell
//    of the worker moves at most one batch of parked jobs, and the worker's
//    idle spinning happens in the handler instead of in the engine's poll
//    loop (the engine runs kSpin, so it would spin anyway). Counter
//    parked_retries says how many requeues an iteration made (a few hundred
//    thousand: some 20 attempts per parked job and run, far from
//    max_attempts; with JOBENGINE_BENCH_SHM_PENDING below ~1000 they could
//    run out, which teardown reports as failed jobs). All parked jobs stay
//    pending (queued, or one running) throughout; teardown checks that none
//    finished. The parking costs the measured jobs nothing visible: without
//    snapshots this benchmark matches jobengine_bench's BM_Engine_Submit/spin
//    (same worker setup, no parked jobs) within the noise.
//    The snapshot thread is left unpinned (the default), so with the two
//    pinned threads busy it takes its CPU time from them.
//  - In the disk and recovery benchmarks nothing else runs: the parked handler
//    blocks on a futex (std::atomic::wait), so the worker holds one batch and
//    uses no CPU while snapshots are written or recovered.
//
// Submit latency: the benchmark thread reads the TSC (rdtsc; steady_clock
// elsewhere) once after every submit() and records the difference to the
// previous reading in a log-linear histogram (64 sub-buckets per power of
// two: <= 1.6% error, no allocation, a few L1-resident cache lines), so each
// sample is one submit() plus a constant few ns of loop (the context value
// jobengine_latency_loop_floor_p50_ns is that constant, measured without a
// submit). A kQueueFull retry shows up inside its job's sample. Ticks are
// converted to ns with a rate calibrated against steady_clock over each run.
//
// Environment:
//   JOBENGINE_BENCH_SNAPSHOT_JOBS  jobs in the disk and recovery benchmarks
//                                  (default 1000000; the names keep "1M")
//   JOBENGINE_BENCH_SHM_PENDING    parked jobs in the submit benchmarks
//                                  (default 100000)
//   JOBENGINE_BENCH_SUBMITS        measured submits per iteration (default
//                                  1000000)
//   JOBENGINE_BENCH_DIR            where the snapshot directories go (default
//                                  /tmp); a directory jobengine-snapbench-<pid>
//                                  is made there and removed at exit
//
// Run on an otherwise idle machine (check uptime), e.g.:
//   jobengine_snapshot_bench --benchmark_repetitions=3
//       --benchmark_enable_random_interleaving=true --benchmark_out=snap.json
//   python3 bench/ratios.py snap.json
#include <benchmark/benchmark.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <system_error>
#include <thread>
#include <utility>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <x86intrin.h>
#endif

#include "baselines.h"
#include "bench_util.h"
#include "jobengine/engine.h"
#include "jobengine/snapshot_format.h"

namespace jobengine::bench {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

constexpr std::size_t kDefaultSnapshotJobs = 1'000'000;
constexpr std::size_t kDefaultShmPending = 100'000;
constexpr std::size_t kDefaultSubmits = 1'000'000;

// Iterations per run (fixed, so that each repetition builds its engine once).
constexpr benchmark::IterationCount kSubmitIterations = 5;
constexpr benchmark::IterationCount kDiskIterations = 4;
constexpr benchmark::IterationCount kRecoverIterations = 3;

constexpr std::size_t kParkedPayloadBytes = 64;
constexpr std::size_t kSubmitBatch = 256;  // parked jobs per submit_batch() in setup
constexpr int kFullBackoffPauses = 32;
constexpr int kPollPauses = 64;
constexpr auto kStallLimit = std::chrono::seconds(10);
// Lets the engine settle after the parked jobs are in (a few shm snapshots
// taken, the worker parked) before the timed loop starts; both submit
// variants wait alike.
constexpr auto kSettle = std::chrono::milliseconds(50);
// Disk generations kept (the default). The disk benchmarks first write one
// more than this many files (untimed), so that every timed snapshot is in the
// steady state of a running service: the directory holds kKeepGenerations
// files and a snapshot replaces the oldest (FileStore::publish rewrites that
// file in place as the new generation). The plain-write baseline keeps its
// files the same way, writing a new one (timed) and then deleting the oldest
// (untimed: the engine's recycling is part of its time, the baseline's
// delete is not). Why it matters on the 2-vCPU VMs: write() into page cache
// that grows, instead of into pages freed shortly before, costs up to ~10x
// the CPU (~320 instead of ~30 ms per 120 MB, all of it in the kernel's copy
// into the new pages: presumably the host backing guest memory afresh), so
// unequal file counts would measure the VM, not the engine.
const unsigned kKeepGenerations = SnapshotOptions{}.keep_generations;
const unsigned kWarmupWrites = kKeepGenerations + 1;

constexpr Payload kMeasuredPayload{{0x0123456789abcdefULL, 0xfedcba9876543210ULL}};

constexpr std::string_view kParkedHandler = "bench.parked";
constexpr std::string_view kMeasuredHandler = "bench.empty";
constexpr std::string_view kBurstHandler = "bench.burst";

// ---- configuration ------------------------------------------------------------


std::size_t snapshot_jobs() {
  static const std::size_t n = env_size("JOBENGINE_BENCH_SNAPSHOT_JOBS", kDefaultSnapshotJobs);
  return n;
}

std::size_t shm_pending() {
  static const std::size_t n = env_size("JOBENGINE_BENCH_SHM_PENDING", kDefaultShmPending);
  return n;
}

std::size_t submits_per_iteration() {
  static const std::size_t n = env_size("JOBENGINE_BENCH_SUBMITS", kDefaultSubmits);
  return n;
}

const fs::path& bench_root() {
  static const fs::path root = [] {
    const char* base = std::getenv("JOBENGINE_BENCH_DIR");
    fs::path parent = (base != nullptr && *base != '\0') ? fs::path(base) : fs::path("/tmp");
    return parent / ("jobengine-snapbench-" + std::to_string(::getpid()));
  }();
  return root;
}

// Makes `dir` a fresh, empty directory (mode 0700, as the file store wants)
// under the root. Returns an error text, empty on success.
std::string fresh_dir(const std::string& name, fs::path& dir) {
  dir = bench_root() / name;
  std::error_code ec;
  fs::remove_all(dir, ec);
  fs::create_directories(dir, ec);
  if (!ec) fs::permissions(dir, fs::perms::owner_all, fs::perm_options::replace, ec);
  if (ec) return "making directory " + dir.string() + ": " + ec.message();
  return {};
}

void remove_dir(const fs::path& dir) {
  std::error_code ec;
  fs::remove_all(dir, ec);
}

std::string unique_shm_name() {
  static std::atomic<unsigned> counter{0};
  return "jobengine-bench-" + std::to_string(::getpid()) + "-" +
         std::to_string(counter.fetch_add(1, std::memory_order_relaxed));
}

void pause_for(int pauses) noexcept {
  for (int i = 0; i < pauses; ++i) cpu_relax();
}

// ---- timestamps and the latency histogram ---------------------------------------

// Converts stamp() ticks to nanoseconds with a rate measured over a run.
struct TickRate {
  std::uint64_t ticks0 = stamp();
  Clock::time_point t0 = Clock::now();

  double ns_per_tick() const {
    const std::uint64_t ticks = stamp() - ticks0;
    const auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - t0).count();
    return ticks == 0 ? 1.0 : static_cast<double>(ns) / static_cast<double>(ticks);
  }
};

// What the measuring loop costs without a submit: one stamp and one record
// per sample. Reported in the run's context.
double latency_loop_floor_ns() {
  auto hist = std::make_unique<LatencyHistogram>();
  const TickRate rate;
  std::uint64_t prev = stamp();
  for (int i = 0; i < 1'000'000; ++i) {
    const std::uint64_t now = stamp();
    hist->record(now - prev);
    prev = now;
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(20));  // a longer span for the rate
  return hist->quantile(0.5) * rate.ns_per_tick();
}

// ---- engines with parked jobs ---------------------------------------------------

enum class Park : std::uint8_t {
  kUntilWork,  // spin until a measured job is outstanding (submit benchmarks)
  kBlock,      // block until teardown (disk and recovery benchmarks)
};

// Shared by the benchmark thread and the engine's worker. Outlives the engine.
struct Gate {
  // Measured jobs submitted so far: written by the benchmark thread.
  alignas(64) std::atomic<std::uint64_t> submitted{0};
  // Measured jobs run so far: written by the worker (one worker).
  alignas(64) std::atomic<std::uint64_t> ran{0};
  // Set at teardown: parked handlers return kRetry at once.
  alignas(64) std::atomic<bool> release{false};
  // BenchEngine::burst(): its jobs wait while `burst_hold`; `burst_ran` counts them.
  alignas(64) std::atomic<bool> burst_hold{false};
  std::atomic<std::uint64_t> burst_ran{0};
};

Outcome park(Gate& gate, Park mode) {
  if (mode == Park::kBlock) {
    gate.release.wait(false, std::memory_order_acquire);
    return Outcome::kRetry;
  }
  for (;;) {
    if (gate.release.load(std::memory_order_relaxed)) return Outcome::kRetry;
    if (gate.submitted.load(std::memory_order_relaxed) !=
        gate.ran.load(std::memory_order_relaxed)) {
      return Outcome::kRetry;
    }
    pause_for(kPollPauses);
  }
}

// An engine, its handlers, and a teardown that never hangs: the destructor
// releases the parked jobs and stops with kAbandon (~Engine would drain, and
// parked jobs never finish).
class BenchEngine {
 public:
  BenchEngine() : gate_(std::make_unique<Gate>()) {}
  BenchEngine(const BenchEngine&) = delete;
  BenchEngine& operator=(const BenchEngine&) = delete;
  ~BenchEngine() { (void)shutdown(); }

  // open() + the parked handler (+ the measured one when `measured`, the
  // burst one when `bursts`).
  Status open(EngineOptions options, Park mode, bool measured, bool bursts = false) {
    shm_name_ = options.snapshot.shm_name;
    auto e = Engine::open(std::move(options));
    if (!e) return e.status();
    engine_.emplace(std::move(*e));
    Gate* gate = gate_.get();
    auto parked = engine_->register_handler(
        kParkedHandler, [gate, mode](JobContext&) { return park(*gate, mode); });
    if (!parked) return parked.status();
    parked_ = *parked;
    if (measured) {
      auto empty = engine_->register_handler(kMeasuredHandler, [gate](JobContext& job) {
        benchmark::DoNotOptimize(job.payload().data());
        // One writer (the only worker): a plain increment.
        gate->ran.store(gate->ran.load(std::memory_order_relaxed) + 1, std::memory_order_release);
        return Outcome::kDone;
      });
      if (!empty) return empty.status();
      measured_ = *empty;
    }
    if (bursts) {
      auto burst = engine_->register_handler(kBurstHandler, [gate](JobContext&) {
        gate->burst_hold.wait(true, std::memory_order_acquire);
        gate->burst_ran.fetch_add(1, std::memory_order_release);
        return Outcome::kDone;
      });
      if (!burst) return burst.status();
      burst_ = *burst;
    }
    return Status();
  }

  // Puts n jobs in the table at once (the first one holds the worker until
  // all are in), then lets them all run and waits until they did: afterwards
  // the table's free slots are spread over the n that held them, the way a
  // burst of traffic leaves an engine. Needs open(..., bursts = true).
  Status burst(std::size_t n) {
    gate_->burst_hold.store(true, std::memory_order_relaxed);
    const std::uint64_t before = gate_->burst_ran.load(std::memory_order_relaxed);
    std::vector<JobSpec> specs(256, JobSpec{burst_, "burst", {}});
    for (std::size_t done = 0; done < n;) {
      const std::size_t k = std::min(n - done, specs.size());
      auto r = engine_->submit_batch(std::span<const JobSpec>(specs.data(), k));
      if (!r) {
        gate_->burst_hold.store(false, std::memory_order_release);
        gate_->burst_hold.notify_all();
        return Status(r.status().code(), "burst, after " + std::to_string(done) + " jobs: " +
                                             std::string(r.status().message()));
      }
      done += k;
    }
    gate_->burst_hold.store(false, std::memory_order_release);
    gate_->burst_hold.notify_all();
    const auto deadline = Clock::now() + kStallLimit;
    while (gate_->burst_ran.load(std::memory_order_acquire) < before + n) {
      if (Clock::now() > deadline) return Status(StatusCode::kInternal, "burst jobs did not finish");
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    return Status();
  }

  Result<StartReport> start() { return engine_->start(); }

  // Submits n parked jobs (kLowPriority, 64-byte payloads).
  Status submit_parked(std::size_t n) {
    unsigned char bytes[kParkedPayloadBytes];
    for (std::size_t i = 0; i < sizeof bytes; ++i)
      bytes[i] = static_cast<unsigned char>(i * 37 + 11);
    const std::string_view payload(reinterpret_cast<const char*>(bytes), sizeof bytes);
    const std::vector<JobSpec> specs(
        kSubmitBatch, JobSpec{parked_, payload, SubmitOptions{.priority = kLowPriority}});
    const std::size_t first = parked_ids_.size();
    parked_ids_.resize(first + n);
    for (std::size_t done = 0; done < n;) {
      const std::size_t k = std::min(n - done, specs.size());
      auto r = engine_->submit_batch(std::span<const JobSpec>(specs.data(), k),
                                     std::span<JobId>(parked_ids_.data() + first + done, k));
      if (!r) {
        return Status(r.status().code(), "submitting parked job " + std::to_string(done) + " of " +
                                             std::to_string(n) + ": " +
                                             std::string(r.status().message()));
      }
      done += *r;
    }
    return Status();
  }

  // Submits one measured job and waits until it ran (the parked handler hands
  // the worker over to it): a change for the periodic snapshots to take. The
  // gate counts it like the measured loop's own. False on an error or past
  // kStallLimit.
  bool run_measured(std::string_view payload) {
    const std::uint64_t n = gate_->submitted.load(std::memory_order_relaxed) + 1;
    if (!engine_->submit(measured_, payload, SubmitOptions{.priority = kHighPriority}).ok()) {
      return false;
    }
    gate_->submitted.store(n, std::memory_order_relaxed);
    const auto deadline = Clock::now() + kStallLimit;
    while (gate_->ran.load(std::memory_order_acquire) < n) {
      if (Clock::now() > deadline) return false;
      std::this_thread::sleep_for(std::chrono::microseconds(100));
    }
    return true;
  }

  // The ids of the parked jobs, in submission order.
  const std::vector<JobId>& parked_ids() const { return parked_ids_; }

  // Waits until the worker sits in a parked handler (the table then stays
  // still). False after 10 s.
  bool wait_parked() const {
    const auto deadline = Clock::now() + kStallLimit;
    while (engine_->health().running == 0) {
      if (Clock::now() > deadline) return false;
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    return true;
  }

  // Releases the parked jobs and stops with kAbandon (if running), destroys
  // the engine and removes its shared-memory segment. Returns the stop
  // report, or the reason there is none.
  Result<StopReport> shutdown() {
    Result<StopReport> report = Status(StatusCode::kFailedPrecondition, "engine not running");
    if (engine_ && engine_->state() == EngineState::kRunning) {
      gate_->release.store(true, std::memory_order_release);
      gate_->release.notify_all();
      report = engine_->stop(StopMode::kAbandon);
    }
    engine_.reset();
    if (!shm_name_.empty()) {
      (void)::shm_unlink(("/" + shm_name_).c_str());
      shm_name_.clear();
    }
    return report;
  }

  Engine& engine() { return *engine_; }
  Gate& gate() { return *gate_; }
  HandlerId measured() const { return measured_; }

 private:
  std::unique_ptr<Gate> gate_;  // declared first: outlives the engine
  std::optional<Engine> engine_;
  std::string shm_name_;
  HandlerId parked_ = 0;
  HandlerId measured_ = 0;
  HandlerId burst_ = 0;
  std::vector<JobId> parked_ids_;
};

void skip(benchmark::State& state, const std::string& what, const Status& status) {
  state.SkipWithError((what + ": " + status.to_string()).c_str());
}

// The options every benchmark's engine shares: one worker pinned to the
// plan's worker CPU, strict priority, the baselines' batch size, parked jobs
// that may be requeued many times.
EngineOptions base_options(std::size_t capacity) {
  EngineOptions o;
  o.workers = 1;
  if (cpu_plan().worker >= 0) o.cpus = {cpu_plan().worker};
  o.capacity = capacity;
  o.fairness_period = 0;
  o.dequeue_batch = static_cast<std::uint32_t>(kDequeueBulk);
  o.max_attempts = 65535;
  // Parked jobs are requeued at once (see above), not held in the scheduler for a backoff.
  o.retry.initial_backoff = std::chrono::nanoseconds(0);
  return o;
}

EngineOptions disk_options(std::size_t capacity, const fs::path& dir) {
  EngineOptions o = base_options(capacity);
  o.snapshot.enabled = true;
  o.snapshot.dir = dir.string();
  o.snapshot.shm_interval = std::chrono::milliseconds(0);
  o.snapshot.disk_interval = std::chrono::milliseconds(0);
  o.snapshot.keep_generations = kKeepGenerations;
  return o;
}

// ---- 1. submits with and without shared-memory snapshots --------------------------

// Waits until both image slots of the shared-memory segment have held every
// parked job: three more snapshots published (the first may have been cut
// before the last parked job was accepted). Until then a snapshot can find its
// slot too small and grow it, and fresh shared-memory pages cost the kernel a
// clear each (~50 ms of the snapshot thread's CPU for the two ~17 MB slots
// here): a one-time cost of a service's first snapshots at a new size, not the
// steady state this benchmark measures. The periodic snapshots skip an engine
// in which nothing changes (the parked jobs wait in a spinning handler): each
// round makes a change first, a measured job of the kind the benchmark then
// submits (the parked handler hands the worker over to it and back).
// Returns false past kStallLimit.
bool wait_shm_steady(BenchEngine& be) {
  Engine& engine = be.engine();
  const std::string_view payload(reinterpret_cast<const char*>(&kMeasuredPayload),
                                 sizeof(kMeasuredPayload));
  std::uint64_t seen = engine.health().last_snapshot_generation;
  for (int round = 0; round < 3; ++round) {
    if (!be.run_measured(payload)) return false;
    const auto deadline = Clock::now() + kStallLimit;
    while (engine.health().last_snapshot_generation <= seen) {
      if (Clock::now() > deadline) return false;
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    seen = engine.health().last_snapshot_generation;
  }
  return true;
}

void RunSubmit(benchmark::State& state, bool with_snapshots) {
  const std::size_t pending = shm_pending();
  const std::size_t submits = submits_per_iteration();
  // Room for the parked jobs and as many measured ones in flight.
  EngineOptions options = base_options(pending + std::max<std::size_t>(pending, 65536));
  options.idle = IdleStrategy::kSpin;
  if (with_snapshots) {
    options.snapshot.enabled = true;
    options.snapshot.shm_name = unique_shm_name();
    options.snapshot.shm_interval = std::chrono::milliseconds(10);
    options.snapshot.disk_interval = std::chrono::milliseconds(0);
  }
  // Built on the unpinned benchmark thread: the snapshot thread inherits its
  // affinity (it is left unpinned, as by default).
  BenchEngine be;
  if (Status s = be.open(std::move(options), Park::kUntilWork, /*measured=*/true); !s.ok()) {
    return skip(state, "open", s);
  }
  if (auto started = be.start(); !started) return skip(state, "start", started.status());
  if (Status s = be.submit_parked(pending); !s.ok()) return skip(state, "setup", s);
  if (!be.wait_parked()) {
    state.SkipWithError("the worker never took a parked job");
    return;
  }
  std::this_thread::sleep_for(kSettle);
  if (with_snapshots && !wait_shm_steady(be)) {
    state.SkipWithError("no shared-memory snapshot of the parked jobs within the stall limit");
    return;
  }

  Engine& engine = be.engine();
  Gate& gate = be.gate();
  const HandlerId handler = be.measured();
  const std::string_view payload(reinterpret_cast<const char*>(&kMeasuredPayload),
                                 sizeof(kMeasuredPayload));
  const SubmitOptions high{.priority = kHighPriority};
  auto hist = std::make_unique<LatencyHistogram>();
  const Health before = engine.health();
  std::uint64_t queue_full = 0;
  // The gate's count goes on from the jobs wait_shm_steady() ran.
  const std::uint64_t submitted_before = gate.submitted.load(std::memory_order_relaxed);
  std::uint64_t submitted = submitted_before;
  std::string error;
  const TickRate rate;
  {
    ScopedPin pin(cpu_plan().submitter);
    if (!pin.ok()) {
      state.SkipWithError("cannot pin the submitter thread");
      return;
    }
    for (auto _ : state) {
      std::uint64_t prev = stamp();
      for (std::size_t i = 0; i < submits && error.empty(); ++i) {
        for (;;) {
          auto id = engine.submit(handler, payload, high);
          if (id) [[likely]] {
            break;
          }
          if (id.status().code() != StatusCode::kQueueFull) {
            error = "submit failed: " + id.status().to_string();
            break;
          }
          ++queue_full;
          pause_for(kFullBackoffPauses);
        }
        gate.submitted.store(++submitted, std::memory_order_relaxed);
        const std::uint64_t now = stamp();
        hist->record(now - prev);
        prev = now;
      }
      if (!error.empty()) break;
      // The iteration ends when the worker has run every measured job.
      std::uint64_t ran_at_check = gate.ran.load(std::memory_order_acquire);
      auto check_time = Clock::now();
      for (unsigned polls = 1;; ++polls) {
        const std::uint64_t ran = gate.ran.load(std::memory_order_acquire);
        if (ran >= submitted) break;
        if (polls % 4096 == 0) {
          if (ran != ran_at_check) {
            ran_at_check = ran;
            check_time = Clock::now();
          } else if (Clock::now() - check_time > kStallLimit) {
            error = "worker stalled: " + std::to_string(ran) + " of " + std::to_string(submitted) +
                    " measured jobs run";
            break;
          }
        }
        pause_for(kPollPauses);
      }
      if (!error.empty()) break;
    }
  }
  const double ns_per_tick = rate.ns_per_tick();
  const Health after = engine.health();
  if (!error.empty()) {
    state.SkipWithError(error.c_str());
    return;
  }

  const auto iterations = static_cast<double>(state.iterations());
  state.SetItemsProcessed(static_cast<std::int64_t>(submitted - submitted_before));
  state.counters["p50_ns"] = hist->quantile(0.50) * ns_per_tick;
  state.counters["p99_ns"] = hist->quantile(0.99) * ns_per_tick;
  state.counters["p999_ns"] = hist->quantile(0.999) * ns_per_tick;
  state.counters["max_us"] = hist->max() * ns_per_tick / 1e3;
  state.counters["pending"] = static_cast<double>(pending);
  state.counters["queue_full"] = static_cast<double>(queue_full) / iterations;
  state.counters["parked_retries"] =
      static_cast<double>(after.retried - before.retried) / iterations;
  if (with_snapshots) {
    state.counters["snapshots"] =
        static_cast<double>(after.last_snapshot_generation - before.last_snapshot_generation) /
        iterations;
    state.counters["snap_ms"] =
        std::chrono::duration<double, std::milli>(after.last_snapshot_duration).count();
    state.counters["snap_MB"] = static_cast<double>(after.last_snapshot_bytes) / 1e6;
    if (after.snapshot_failures != 0) {
      state.SkipWithError(("snapshot failed: " + after.last_snapshot_error).c_str());
      return;
    }
  }

  auto report = be.shutdown();
  if (!report) return skip(state, "stop", report.status());
  if (report->done != submitted || report->failed != 0 || report->dropped != pending) {
    const std::string message =
        "engine ran " + std::to_string(report->done) + " jobs (" + std::to_string(report->failed) +
        " failed, " + std::to_string(report->dropped) + " dropped), expected " +
        std::to_string(submitted) + " run and " + std::to_string(pending) + " parked jobs dropped";
    state.SkipWithError(message.c_str());
  }
}

void BM_SubmitWithShmSnapshots(benchmark::State& state) { RunSubmit(state, true); }
void BM_SubmitWithoutSnapshots(benchmark::State& state) { RunSubmit(state, false); }

// ---- 2. a 1M-job snapshot to disk against write + fsync -----------------------------

// The image the engine writes for snapshot_jobs() parked jobs, built with the
// same encoder: its size is what SnapshotInfo::bytes must say, and its bytes
// are what the plain-write baseline writes.
const std::vector<unsigned char>& reference_image() {
  static const std::vector<unsigned char> image = [] {
    snapshot::Encoder encoder;
    snapshot::Header header;
    header.generation = 1;
    encoder.begin(header);
    encoder.add_handler(kParkedHandler);
    unsigned char bytes[kParkedPayloadBytes];
    for (std::size_t i = 0; i < sizeof bytes; ++i)
      bytes[i] = static_cast<unsigned char>(i * 37 + 11);
    snapshot::JobRecord job;
    job.priority = kLowPriority;
    job.payload = std::string_view(reinterpret_cast<const char*>(bytes), sizeof bytes);
    for (std::size_t i = 0; i < snapshot_jobs(); ++i) {
      job.id = i + 1;
      encoder.add_job(job);
    }
    const std::span<const unsigned char> out = encoder.finish();
    return std::vector<unsigned char>(out.begin(), out.end());
  }();
  return image;
}

void BM_SnapshotToDisk_1M(benchmark::State& state) {
  const std::size_t jobs = snapshot_jobs();
  const std::uint64_t expected_bytes = reference_image().size();
  fs::path dir;
  if (std::string err = fresh_dir("disk", dir); !err.empty()) {
    state.SkipWithError(err.c_str());
    return;
  }
  std::uint64_t bytes = 0;
  std::chrono::nanoseconds took{0};
  {
    BenchEngine be;
    if (Status s = be.open(disk_options(jobs, dir), Park::kBlock, false); !s.ok()) {
      return skip(state, "open", s);
    }
    if (auto started = be.start(); !started) return skip(state, "start", started.status());
    if (Status s = be.submit_parked(jobs); !s.ok()) return skip(state, "setup", s);
    if (!be.wait_parked()) {
      state.SkipWithError("the worker never took a parked job");
      return;
    }
    // Warm-up (see kKeepGenerations): the encoder's buffer grows once, on
    // the first snapshot of this size, and the directory fills to its
    // retention; a service writing snapshots periodically is past both.
    for (unsigned i = 0; i < kWarmupWrites; ++i) {
      auto warm = be.engine().snapshot_now();
      if (!warm) return skip(state, "warm-up snapshot_now", warm.status());
      if (warm->jobs != jobs || warm->bytes != expected_bytes) {
        const std::string message = "snapshot holds " + std::to_string(warm->jobs) + " jobs in " +
                                    std::to_string(warm->bytes) + " bytes, expected " +
                                    std::to_string(jobs) + " in " + std::to_string(expected_bytes);
        state.SkipWithError(message.c_str());
        return;
      }
    }
    for (auto _ : state) {
      auto info = be.engine().snapshot_now();
      if (!info) {
        skip(state, "snapshot_now", info.status());
        break;
      }
      bytes += info->bytes;
      took += info->took;
    }
  }
  remove_dir(dir);
  const auto iterations = static_cast<double>(state.iterations());
  state.SetBytesProcessed(static_cast<std::int64_t>(bytes));
  state.counters["jobs"] = static_cast<double>(jobs);
  state.counters["image_MB"] = static_cast<double>(expected_bytes) / 1e6;
  state.counters["took_ms"] = std::chrono::duration<double, std::milli>(took).count() / iterations;
}

// Writes every byte; 0 or an errno.
int write_all(int fd, const unsigned char* data, std::size_t size) {
  std::size_t done = 0;
  while (done < size) {
    const ssize_t n = ::write(fd, data + done, size - done);
    if (n < 0) {
      if (errno == EINTR) continue;
      return errno;
    }
    if (n == 0) return EIO;
    done += static_cast<std::size_t>(n);
  }
  return 0;
}

// Creates `path` and writes `image` to it with one write() and an fsync().
// Returns an error text, empty on success.
std::string write_file(const std::string& path, const std::vector<unsigned char>& image) {
  const int fd = ::open(path.c_str(), O_CREAT | O_EXCL | O_WRONLY | O_CLOEXEC, 0600);
  if (fd < 0) return "open " + path + ": " + std::strerror(errno);
  int err = write_all(fd, image.data(), image.size());
  if (err == 0 && ::fsync(fd) != 0) err = errno;
  if (::close(fd) != 0 && err == 0) err = errno;
  if (err != 0) return "write + fsync " + path + ": " + std::strerror(err);
  return {};
}

void BM_PlainWriteFsync_1M(benchmark::State& state) {
  const std::vector<unsigned char>& image = reference_image();
  fs::path dir;
  if (std::string err = fresh_dir("disk", dir); !err.empty()) {
    state.SkipWithError(err.c_str());
    return;
  }
  // File n is deleted once file n + kKeepGenerations is written, as the
  // engine prunes generations (see kKeepGenerations).
  auto name = [&dir](std::uint64_t n) {
    return (dir / ("plain-" + std::to_string(n) + ".bin")).string();
  };
  std::uint64_t written = 0;
  auto prune = [&] {
    if (written > kKeepGenerations) (void)::unlink(name(written - kKeepGenerations - 1).c_str());
  };
  for (; written < kWarmupWrites;) {  // warm-up, as for the engine
    if (std::string err = write_file(name(written++), image); !err.empty()) {
      state.SkipWithError(err.c_str());
      remove_dir(dir);
      return;
    }
    prune();
  }
  std::uint64_t bytes = 0;
  for (auto _ : state) {
    if (std::string err = write_file(name(written++), image); !err.empty()) {
      state.SkipWithError(err.c_str());
      break;
    }
    bytes += image.size();
    state.PauseTiming();
    prune();
    state.ResumeTiming();
  }
  remove_dir(dir);
  state.SetBytesProcessed(static_cast<std::int64_t>(bytes));
  state.counters["image_MB"] = static_cast<double>(image.size()) / 1e6;
}

// ---- 3. recovery against a plain read --------------------------------------------

// A disk snapshot of snapshot_jobs() pending jobs, written once per process
// by stop(kSnapshotAndExit) (every job queued, none running at the cut).
struct RecoveryFixture {
  fs::path file;  // the generation file
  std::uint64_t bytes = 0;
  std::string error;  // non-empty when it could not be made
};

// One fixture per job count, made on first use (benchmark thread only).
const RecoveryFixture& recovery_fixture(std::size_t jobs) {
  static std::map<std::size_t, RecoveryFixture> fixtures;
  if (auto it = fixtures.find(jobs); it != fixtures.end()) return it->second;
  const RecoveryFixture fixture = [jobs] {
    RecoveryFixture f;
    fs::path dir;
    if (std::string err = fresh_dir("recover-src-" + std::to_string(jobs), dir); !err.empty()) {
      f.error = err;
      return f;
    }
    BenchEngine be;
    if (Status s = be.open(disk_options(jobs, dir), Park::kBlock, false); !s.ok()) {
      f.error = "open: " + s.to_string();
      return f;
    }
    if (auto started = be.start(); !started) {
      f.error = "start: " + started.status().to_string();
      return f;
    }
    if (Status s = be.submit_parked(jobs); !s.ok()) {
      f.error = "setup: " + s.to_string();
      return f;
    }
    // Released parked jobs are requeued (kRetry) until stop() ends the
    // worker, so every job is queued in the final snapshot.
    be.gate().release.store(true, std::memory_order_release);
    be.gate().release.notify_all();
    auto report = be.engine().stop(StopMode::kSnapshotAndExit);
    if (!report) {
      f.error = "stop(kSnapshotAndExit): " + report.status().to_string();
      return f;
    }
    if (report->left_in_snapshot != jobs) {
      f.error = "final snapshot holds " + std::to_string(report->left_in_snapshot) +
                " jobs, expected " + std::to_string(jobs);
      return f;
    }
    (void)be.shutdown();
    for (const auto& entry : fs::directory_iterator(dir)) {
      const std::string name = entry.path().filename().string();
      if (name.rfind("gen-", 0) == 0) {
        f.file = entry.path();
        f.bytes = entry.file_size();
      }
    }
    if (f.file.empty()) f.error = "no generation file in " + dir.string();
    return f;
  }();
  return fixtures.emplace(jobs, fixture).first->second;
}

// Drops the file's pages from the page cache (they are clean: written and
// fsynced). Returns an error text, empty on success.
std::string drop_cached(const fs::path& file) {
  const int fd = ::open(file.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return "open " + file.string() + ": " + std::strerror(errno);
  const int err = ::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
  ::close(fd);
  if (err != 0) return "posix_fadvise " + file.string() + ": " + std::strerror(err);
  return {};
}

// Per iteration: a fresh directory holding only a hard link to the fixture
// (same inode, so its page-cache state is the fixture's), which the engine
// recovers from and then writes its own final snapshot into at teardown. One
// untimed round first, so that every timed one finds the process's memory
// recycled rather than fresh (as the disk benchmarks do, see kKeepGenerations).
void RunRecover(benchmark::State& state, bool cold, bool empty, std::size_t jobs) {
  const RecoveryFixture& fixture = recovery_fixture(jobs);
  if (!empty && !fixture.error.empty()) {
    state.SkipWithError(("recovery fixture: " + fixture.error).c_str());
    return;
  }
  std::chrono::nanoseconds open_time{0};
  std::chrono::nanoseconds start_time{0};
  unsigned round = 0;
  // Returns an error text, empty on success. `timed`: inside the loop, where
  // only open + register + start run on the clock.
  auto run_round = [&](bool timed) -> std::string {
    fs::path dir;
    if (std::string err = fresh_dir("recover-" + std::to_string(round++), dir); !err.empty()) {
      return err;
    }
    if (!empty) {
      std::error_code ec;
      fs::create_hard_link(fixture.file, dir / fixture.file.filename(), ec);
      if (ec) return "link " + fixture.file.string() + ": " + ec.message();
    }
    if (cold) {
      if (std::string err = drop_cached(fixture.file); !err.empty()) return err;
    }
    BenchEngine be;
    if (timed) state.ResumeTiming();
    const auto t0 = Clock::now();
    Status opened = be.open(disk_options(jobs, dir), Park::kBlock, false);
    const auto t1 = Clock::now();
    std::optional<Result<StartReport>> started;
    if (opened.ok()) started.emplace(be.start());
    const auto t2 = Clock::now();
    if (timed) {
      state.PauseTiming();
      open_time += t1 - t0;
      start_time += t2 - t1;
    }
    std::string error;
    if (!opened.ok()) {
      error = "open: " + opened.to_string();
    } else if (!*started) {
      error = "start: " + started->status().to_string();
    } else {
      const RecoveryReport& r = (**started).recovery;
      const std::uint64_t want = empty ? 0 : jobs;
      // A job the fixture's worker had just taken is in it as running at the
      // cut, and one it had released and seen retried is waiting for its
      // backoff: they come back too (running_at_cut, delayed), so all count.
      if (r.pending + r.running_at_cut + r.delayed != want || r.recovered == empty) {
        error = "recovery restored " + std::to_string(r.pending) + " pending, " +
                std::to_string(r.delayed) + " delayed and " +
                std::to_string(r.running_at_cut) + " running jobs from \"" + r.source +
                "\", expected " + std::to_string(want) + " pending";
      }
    }
    (void)be.shutdown();
    remove_dir(dir);
    return error;
  };
  if (std::string err = run_round(false); !err.empty()) {
    state.SkipWithError(("warm-up round: " + err).c_str());
    return;
  }
  for (auto _ : state) {
    state.PauseTiming();
    if (std::string err = run_round(true); !err.empty()) {
      state.SkipWithError(err.c_str());
      break;
    }
    state.ResumeTiming();
  }
  const auto iterations = static_cast<double>(state.iterations());
  state.counters["jobs"] = static_cast<double>(empty ? 0 : jobs);
  state.counters["open_ms"] =
      std::chrono::duration<double, std::milli>(open_time).count() / iterations;
  state.counters["start_ms"] =
      std::chrono::duration<double, std::milli>(start_time).count() / iterations;
  if (!empty) {
    state.SetBytesProcessed(static_cast<std::int64_t>(fixture.bytes) * state.iterations());
  }
}

void BM_Recover_1M(benchmark::State& state, bool cold) {
  RunRecover(state, cold, false, snapshot_jobs());
}
void BM_OpenEmpty_1M(benchmark::State& state) { RunRecover(state, false, true, snapshot_jobs()); }

// What a program does to have a file in memory: open, size it, allocate
// (fresh pages: the engine's read allocates too), read. The bytes go to
// `out`, so that the caller frees them outside the timed region (as the
// engine's teardown is). Returns an error text, empty on success.
std::string read_file(const std::string& path, std::unique_ptr<unsigned char[]>& out) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return "open " + path + ": " + std::strerror(errno);
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    const int err = errno;
    ::close(fd);
    return "fstat " + path + ": " + std::strerror(err);
  }
  const auto size = static_cast<std::size_t>(st.st_size);
  auto buffer = std::make_unique_for_overwrite<unsigned char[]>(size);
  std::size_t done = 0;
  std::string error;
  while (done < size) {
    const ssize_t n = ::read(fd, buffer.get() + done, size - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      error = "read " + path + ": " + (n == 0 ? std::string("short file") : std::strerror(errno));
      break;
    }
    done += static_cast<std::size_t>(n);
  }
  ::close(fd);
  benchmark::DoNotOptimize(buffer.get());
  benchmark::ClobberMemory();
  out = std::move(buffer);
  return error;
}

void RunPlainRead(benchmark::State& state, bool cold, std::size_t jobs) {
  const RecoveryFixture& fixture = recovery_fixture(jobs);
  if (!fixture.error.empty()) {
    state.SkipWithError(("recovery fixture: " + fixture.error).c_str());
    return;
  }
  const std::string path = fixture.file.string();
  std::unique_ptr<unsigned char[]> bytes;
  if (std::string err = read_file(path, bytes); !err.empty()) {  // warm-up, as for recovery
    state.SkipWithError(err.c_str());
    return;
  }
  bytes.reset();
  for (auto _ : state) {
    if (cold) {
      state.PauseTiming();
      if (std::string err = drop_cached(fixture.file); !err.empty()) {
        state.SkipWithError(err.c_str());
        break;
      }
      state.ResumeTiming();
    }
    std::string err = read_file(path, bytes);
    state.PauseTiming();
    bytes.reset();
    state.ResumeTiming();
    if (!err.empty()) {
      state.SkipWithError(err.c_str());
      break;
    }
  }
  state.SetBytesProcessed(static_cast<std::int64_t>(fixture.bytes) * state.iterations());
  state.counters["file_MB"] = static_cast<double>(fixture.bytes) / 1e6;
}

void BM_PlainRead_1M(benchmark::State& state, bool cold) { RunPlainRead(state, cold, snapshot_jobs()); }

// ---- 4. snapshot cost and recovery against the pending count -------------------------

// SnapshotCost/{shm,disk}/pending:<n>: one engine with n parked jobs (64-byte
// payloads, the worker blocked on one batch, nothing else running); each
// iteration is one snapshot, its time set manually:
//  - shm: the periodic shared-memory snapshot (every 10 ms, no disk store).
//    A periodic snapshot is skipped while nothing in the engine changes, so
//    each iteration first makes one change, cancel() of a parked job not
//    cancelled yet (it stays in the table, cancel bit set: the job count
//    does not move), then waits for the next generation and takes the
//    engine's own Health::last_snapshot_duration (cut + encode + publish).
//    Two warm-up generations first.
//  - disk: snapshot_now() (cut, encode, write, fsync, rename, fsync dir,
//    prune the oldest of 3 generations), wall time around the call, after
//    kWarmupWrites untimed ones (see kKeepGenerations).
// Counters: bytes (per snapshot), bytes_per_job, pending.
void RunSnapshotCost(benchmark::State& state, bool shm, std::size_t pending,
                     std::size_t capacity = 0, std::size_t burst = 0) {
  fs::path dir;
  EngineOptions options;
  if (shm) {
    options = base_options(capacity != 0 ? capacity : pending);
    options.snapshot.enabled = true;
    options.snapshot.shm_name = unique_shm_name();
    options.snapshot.shm_interval = std::chrono::milliseconds(10);
    options.snapshot.disk_interval = std::chrono::milliseconds(0);
  } else {
    if (std::string err = fresh_dir("cost-" + std::to_string(pending), dir); !err.empty()) {
      state.SkipWithError(err.c_str());
      return;
    }
    options = disk_options(pending, dir);
  }
  std::uint64_t bytes = 0;
  std::uint64_t snapshots = 0;
  {
    BenchEngine be;
    if (Status st = be.open(std::move(options), Park::kBlock, false, burst != 0); !st.ok()) {
      return skip(state, "open", st);
    }
    if (auto started = be.start(); !started) return skip(state, "start", started.status());
    if (burst != 0) {
      if (Status st = be.burst(burst); !st.ok()) return skip(state, "burst", st);
    }
    if (Status st = be.submit_parked(pending); !st.ok()) return skip(state, "setup", st);
    if (!be.wait_parked()) {
      state.SkipWithError("the worker never took a parked job");
      return;
    }
    Engine& engine = be.engine();
    if (shm) {
      // Makes a change (the next parked job's cancel), then waits for a
      // generation newer than `seen`; false after kStallLimit.
      std::size_t cancels = 0;
      auto next_generation = [&engine, &be, &cancels](std::uint64_t seen, Health& h) {
        const std::vector<JobId>& ids = be.parked_ids();
        // From the back: the worker holds the first batch.
        if (cancels >= ids.size() || !engine.cancel(ids[ids.size() - 1 - cancels++]).ok()) {
          return false;
        }
        const auto deadline = Clock::now() + kStallLimit;
        for (;;) {
          h = engine.health();
          if (h.last_snapshot_generation > seen || Clock::now() > deadline) break;
          std::this_thread::sleep_for(std::chrono::microseconds(200));
        }
        return h.last_snapshot_generation > seen && h.snapshot_failures == 0;
      };
      Health h = engine.health();
      for (int warm = 0; warm < 2; ++warm) {
        if (!next_generation(h.last_snapshot_generation, h)) {
          state.SkipWithError(("no shm snapshot: " + h.last_snapshot_error).c_str());
          return;
        }
      }
      for (auto _ : state) {
        if (!next_generation(h.last_snapshot_generation, h)) {
          state.SkipWithError(("no shm snapshot: " + h.last_snapshot_error).c_str());
          break;
        }
        state.SetIterationTime(std::chrono::duration<double>(h.last_snapshot_duration).count());
        bytes += h.last_snapshot_bytes;
        ++snapshots;
      }
    } else {
      for (unsigned i = 0; i < kWarmupWrites; ++i) {
        if (auto warm = engine.snapshot_now(); !warm) {
          return skip(state, "warm-up snapshot_now", warm.status());
        }
      }
      for (auto _ : state) {
        const auto t0 = Clock::now();
        auto info = engine.snapshot_now();
        const auto t1 = Clock::now();
        if (!info) {
          skip(state, "snapshot_now", info.status());
          break;
        }
        if (info->jobs != pending) {
          state.SkipWithError(("snapshot holds " + std::to_string(info->jobs) + " jobs, expected " +
                               std::to_string(pending))
                                  .c_str());
          break;
        }
        state.SetIterationTime(std::chrono::duration<double>(t1 - t0).count());
        bytes += info->bytes;
        ++snapshots;
      }
    }
  }
  if (!dir.empty()) remove_dir(dir);
  if (snapshots == 0) return;
  state.SetBytesProcessed(static_cast<std::int64_t>(bytes));
  state.counters["pending"] = static_cast<double>(pending);
  state.counters["bytes"] = static_cast<double>(bytes) / static_cast<double>(snapshots);
  state.counters["bytes_per_job"] =
      static_cast<double>(bytes) / static_cast<double>(snapshots) / static_cast<double>(pending);
}

// Pending counts of the *VsPending benchmarks: 1k, 10k, 100k, 1M, up to
// JOBENGINE_BENCH_PENDING_MAX (default 1M).
std::vector<std::size_t> pending_counts() {
  const std::size_t max = env_size("JOBENGINE_BENCH_PENDING_MAX", 1'000'000);
  std::vector<std::size_t> out;
  for (std::size_t n = 1000; n <= max && n <= 1'000'000; n *= 10) out.push_back(n);
  return out;
}

void register_vs_pending() {
  for (std::size_t n : pending_counts()) {
    const std::string tail = "/pending:" + std::to_string(n);
    const benchmark::IterationCount iterations = n <= 10'000 ? 20 : n <= 100'000 ? 8 : 4;
    for (bool shm : {true, false}) {
      benchmark::RegisterBenchmark(
          (std::string("SnapshotCost/") + (shm ? "shm" : "disk") + tail).c_str(),
          [shm, n](benchmark::State& st) { RunSnapshotCost(st, shm, n); })
          ->UseManualTime()
          ->Unit(benchmark::kMillisecond)
          ->Iterations(iterations);
    }
    if (n == 1000) {
      // A table sized for bursts that holds few jobs: the scan covers only
      // the slots that ever held one (JobTable::used_end()), not the 1M.
      benchmark::RegisterBenchmark("SnapshotCost/shm/pending:1000/table:1048576",
                                   [](benchmark::State& st) {
                                     RunSnapshotCost(st, true, 1000, std::size_t{1} << 20);
                                   })
          ->UseManualTime()
          ->Unit(benchmark::kMillisecond)
          ->Iterations(iterations);
      // The same table after a burst went through nearly all of it: the
      // scan covers the regions with slots in use (JobTable::
      // for_each_scan_range()), not everything the burst touched.
      benchmark::RegisterBenchmark("SnapshotCost/shm/pending:1000/table:1048576/after_burst",
                                   [](benchmark::State& st) {
                                     constexpr std::size_t kTable = std::size_t{1} << 20;
                                     RunSnapshotCost(st, true, 1000, kTable, kTable - 1000 - 8192);
                                   })
          ->UseManualTime()
          ->Unit(benchmark::kMillisecond)
          ->Iterations(iterations);
    }
    const benchmark::IterationCount rounds = n <= 100'000 ? 5 : 3;
    benchmark::RegisterBenchmark(("RecoverVsPending" + tail).c_str(),
                                 [n](benchmark::State& st) { RunRecover(st, false, false, n); })
        ->UseRealTime()
        ->Unit(benchmark::kMillisecond)
        ->Iterations(rounds);
    benchmark::RegisterBenchmark(("PlainReadVsPending" + tail).c_str(),
                                 [n](benchmark::State& st) { RunPlainRead(st, false, n); })
        ->UseRealTime()
        ->Unit(benchmark::kMillisecond)
        ->Iterations(rounds);
  }
}

// Not a target: snapshot::Encoder alone building the image of
// snapshot_jobs() jobs (64-byte payloads) into its reused buffer, i.e. the
// encoding share of BM_SnapshotToDisk_1M (no table scan, no clock
// conversion, no I/O).
void BM_Encode_1M(benchmark::State& state) {
  snapshot::Encoder encoder;
  unsigned char payload[kParkedPayloadBytes] = {};
  snapshot::JobRecord job;
  job.priority = kLowPriority;
  job.payload = std::string_view(reinterpret_cast<const char*>(payload), sizeof payload);
  auto encode = [&] {
    snapshot::Header header;
    header.generation = 1;
    encoder.begin(header);
    encoder.add_handler(kParkedHandler);
    for (std::size_t i = 0; i < snapshot_jobs(); ++i) {
      job.id = i + 1;
      encoder.add_job(job);
    }
    return encoder.finish().size();
  };
  (void)encode();  // grows the buffer once
  std::uint64_t bytes = 0;
  for (auto _ : state) bytes += encode();
  state.SetBytesProcessed(static_cast<std::int64_t>(bytes));
}

// Not a target: snapshot::decode() verifying and indexing the same image in
// memory, i.e. the decoding share of BM_Recover_1M (no file, no table).
void BM_Decode_1M(benchmark::State& state) {
  const std::vector<unsigned char>& image = reference_image();
  std::optional<Result<snapshot::SnapshotView>> view;
  for (auto _ : state) {
    view.emplace(snapshot::decode(image));
    if (!*view) {
      skip(state, "decode", view->status());
      break;
    }
    benchmark::DoNotOptimize((*view)->jobs.data());
    state.PauseTiming();
    view.reset();  // frees the index, untimed
    state.ResumeTiming();
  }
  state.SetBytesProcessed(static_cast<std::int64_t>(image.size()) * state.iterations());
}

// snapshot::verify(), recovery's decoder: the same checks without
// materializing the records (the engine reads them with a RecordReader).
void BM_Verify_1M(benchmark::State& state) {
  const std::vector<unsigned char>& image = reference_image();
  for (auto _ : state) {
    auto view = snapshot::verify(image);
    if (!view) {
      skip(state, "verify", view.status());
      break;
    }
    benchmark::DoNotOptimize(view->live_records);
  }
  state.SetBytesProcessed(static_cast<std::int64_t>(image.size()) * state.iterations());
}

// BM_IdleEngine/table:<slots>: what an engine that has nothing to do costs.
// Engine::open() with the default options (a spin-then-block worker,
// unpinned; shared-memory snapshots every 10 ms and disk ones every second,
// both stores on) but `slots` of capacity, one job run to the end, then each
// iteration sleeps a second. Counters: cpu_pct, the process's CPU time
// (user + system, every thread: the snapshot thread, the scheduler, the
// sleeping worker) per wall time, in % of one core; snapshots_per_s, the
// generations written; unchanged_per_s, the periodic snapshots skipped
// because nothing had changed. Not a target (there is no baseline: an idle
// engine should cost nothing); it shows that none of the engine's threads
// burns a core while there is no work, whatever the table's size.
void BM_IdleEngine(benchmark::State& state) {
  const auto slots = static_cast<std::size_t>(state.range(0));
  fs::path dir;
  if (std::string err = fresh_dir("idle-" + std::to_string(slots), dir); !err.empty()) {
    state.SkipWithError(err.c_str());
    return;
  }
  const std::string shm_name = unique_shm_name();
  // The directory and the segment (an engine leaves its segment for the
  // next one to recover from) go after the engine below, on every way out.
  struct Cleanup {
    const fs::path& dir;
    const std::string& shm;
    ~Cleanup() {
      remove_dir(dir);
      (void)::shm_unlink(("/" + shm).c_str());
    }
  } cleanup{dir, shm_name};
  EngineOptions o;
  o.capacity = slots;
  o.snapshot.enabled = true;
  o.snapshot.dir = dir.string();
  o.snapshot.shm_name = shm_name;
  std::uint64_t written = 0;
  std::uint64_t unchanged = 0;
  double cpu_s = 0;
  double wall_s = 0;
  {
    auto engine = Engine::open(std::move(o));
    if (!engine) return skip(state, "open", engine.status());
    std::atomic<bool> ran{false};
    auto h = engine->register_handler("once", [&ran](JobContext&) {
      ran.store(true, std::memory_order_release);
      return Outcome::kDone;
    });
    if (!h) return skip(state, "register", h.status());
    if (auto started = engine->start(); !started) return skip(state, "start", started.status());
    if (auto id = engine->submit(*h, "x"); !id) return skip(state, "submit", id.status());
    while (!ran.load(std::memory_order_acquire)) std::this_thread::sleep_for(std::chrono::milliseconds(1));
    // Both stores hold the engine as it is now (the periodic disk snapshot
    // would otherwise come due within the measured second).
    if (auto now = engine->snapshot_now(); !now) return skip(state, "snapshot_now", now.status());
    const auto cpu_now = [] {
      rusage u{};
      ::getrusage(RUSAGE_SELF, &u);
      return static_cast<double>(u.ru_utime.tv_sec + u.ru_stime.tv_sec) +
             static_cast<double>(u.ru_utime.tv_usec + u.ru_stime.tv_usec) / 1e6;
    };
    const Health before = engine->health();
    const double cpu0 = cpu_now();
    const auto t0 = Clock::now();
    for (auto _ : state) std::this_thread::sleep_for(std::chrono::seconds(1));
    cpu_s = cpu_now() - cpu0;
    wall_s = std::chrono::duration<double>(Clock::now() - t0).count();
    const Health after = engine->health();
    written = after.last_snapshot_generation - before.last_snapshot_generation;
    unchanged = after.snapshots_unchanged - before.snapshots_unchanged;
    if (auto st = engine->stop(StopMode::kDrain); !st) return skip(state, "stop", st.status());
  }
  state.counters["cpu_pct"] = 100.0 * cpu_s / wall_s;
  state.counters["snapshots_per_s"] = static_cast<double>(written) / wall_s;
  state.counters["unchanged_per_s"] = static_cast<double>(unchanged) / wall_s;
}

// Milliseconds read best; real time, because the submitter's CPU time leaves
// out the wait for the worker and the snapshot thread's work.
template <benchmark::IterationCount kIterations>
void configure(benchmark::internal::Benchmark* b) {
  b->UseRealTime()->Unit(benchmark::kMillisecond)->Iterations(kIterations);
}

BENCHMARK(BM_SubmitWithShmSnapshots)->Apply(configure<kSubmitIterations>);
BENCHMARK(BM_SubmitWithoutSnapshots)->Apply(configure<kSubmitIterations>);
BENCHMARK(BM_SnapshotToDisk_1M)->Apply(configure<kDiskIterations>);
BENCHMARK(BM_PlainWriteFsync_1M)->Apply(configure<kDiskIterations>);
BENCHMARK_CAPTURE(BM_Recover_1M, warm, false)->Apply(configure<kRecoverIterations>);
BENCHMARK_CAPTURE(BM_Recover_1M, cold, true)->Apply(configure<kRecoverIterations>);
BENCHMARK_CAPTURE(BM_PlainRead_1M, warm, false)->Apply(configure<kRecoverIterations>);
BENCHMARK_CAPTURE(BM_PlainRead_1M, cold, true)->Apply(configure<kRecoverIterations>);
BENCHMARK(BM_OpenEmpty_1M)->Apply(configure<kRecoverIterations>);
BENCHMARK(BM_Encode_1M)->Apply(configure<kDiskIterations>);
BENCHMARK(BM_Decode_1M)->Apply(configure<kDiskIterations>);
BENCHMARK(BM_Verify_1M)->Apply(configure<kDiskIterations>);
BENCHMARK(BM_IdleEngine)
    ->ArgName("table")
    ->Arg(65536)
    ->Arg(1 << 20)
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond)
    ->Iterations(2);

}  // namespace
}  // namespace jobengine::bench

int main(int argc, char** argv) {
  namespace jb = jobengine::bench;
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  jb::register_vs_pending();
  benchmark::AddCustomContext("jobengine_snapshot_jobs", std::to_string(jb::snapshot_jobs()));
  benchmark::AddCustomContext("jobengine_shm_pending", std::to_string(jb::shm_pending()));
  benchmark::AddCustomContext("jobengine_submits_per_iteration",
                              std::to_string(jb::submits_per_iteration()));
  benchmark::AddCustomContext("jobengine_bench_dir", jb::bench_root().string());
  benchmark::AddCustomContext("jobengine_submitter_cpu", std::to_string(jb::cpu_plan().submitter));
  benchmark::AddCustomContext("jobengine_worker_cpu", std::to_string(jb::cpu_plan().worker));
  benchmark::AddCustomContext("jobengine_latency_loop_floor_p50_ns",
                              std::to_string(jb::latency_loop_floor_ns()));
  if (jb::cpu_plan().worker < 0) {
    std::fprintf(stderr,
                 "jobengine_snapshot_bench: fewer than 2 CPUs allowed; threads run unpinned\n");
  }
  std::error_code ec;
  std::filesystem::create_directories(jb::bench_root(), ec);
  if (ec) {
    std::fprintf(stderr, "jobengine_snapshot_bench: cannot make %s: %s\n", jb::bench_root().c_str(),
                 ec.message().c_str());
    return 1;
  }
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  std::filesystem::remove_all(jb::bench_root(), ec);
  return 0;
}
