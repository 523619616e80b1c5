// Metrics: latency histograms kept per worker without locks, and the
// Prometheus text / JSON renderings of the engine's figures.
//
// The engine fills a MetricsData (counters summed over workers and
// submitters, histograms merged) and the formatters render it. Nothing here
// touches the engine: it is tested on its own (tests/engine/metrics_test.cc).
//
// Bucket layout (log-linear, HdrHistogram-like; the full argument, error
// bound and the Prometheus le subset are in metrics.cc's header comment):
// values in nanoseconds; 0..31 ns one bucket per ns; above, 16 equal
// sub-buckets per power of two, so a bucket's width is at most 1/16 of any
// value in it; values >= 2^42 ns (~73 min) share the last bucket (to +inf).
//
// LatencyHistogram invariants (one writer, any readers):
//  1. Only the owning worker calls record(); every field has that single
//     writer, so a relaxed load + store replaces a locked read-modify-write.
//  2. record() stores max_ns_ and sum_ns_ before the bucket count (release);
//     add_to() loads each bucket count (acquire) before sum_ns_ and max_ns_.
//     So a reader that counts a record also sees its value in max_ns_ (and in
//     sum_ns_): a copy's max is never below a value it counts.
//  3. HistogramData::count is the sum of the bucket counts copied, never a
//     separate counter, so a copy's buckets always add up to its count.
#pragma once

#include <algorithm>
#include <array>
#include <atomic>
#include <bit>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "jobengine/engine.h"

namespace jobengine::detail {

// Values below 2^kHistogramLinearBits ns get one bucket per ns; above, each
// power of two [2^e, 2^(e+1)) is cut into 2^kHistogramSubBits sub-buckets.
inline constexpr unsigned kHistogramSubBits = 4;                         // 16 per octave
inline constexpr unsigned kHistogramLinearBits = kHistogramSubBits + 1;  // 0..31 exact
// Values >= 2^kHistogramTopBits ns (4398 s, ~73 min) land in the last bucket.
inline constexpr unsigned kHistogramTopBits = 42;
// 32 exact buckets + 16 for each octave [2^5, 2^42) = 624 below 2^42, + 1
// overflow bucket.
inline constexpr std::size_t kHistogramBuckets =
    ((kHistogramTopBits - kHistogramSubBits + 1) << kHistogramSubBits) + 1;  // 625

// A merged, plain copy of one or more LatencyHistograms. Not thread-safe
// (a value type).
struct HistogramData {
  std::array<std::uint64_t, kHistogramBuckets> counts{};
  std::uint64_t count = 0;   // sum of counts[]
  std::uint64_t sum_ns = 0;  // wraps after 584 years of summed latency
  std::uint64_t max_ns = 0;

  void merge(const HistogramData& other) noexcept;
  // The value at quantile q in [0, 1] (rank ceil(q * count), at least 1):
  // the upper bound of the bucket holding it, capped at max_ns. Never below
  // the exact value v of that rank; above it by less than v/16 (exact below
  // 32 ns; capped at max_ns in the last bucket). q >= 1 gives max_ns, q <= 0
  // (or NaN) the smallest value's bucket. 0 when empty.
  std::uint64_t quantile(double q) const noexcept;
  // Inclusive upper bound, in ns, of bucket i < kHistogramBuckets; the last
  // is UINT64_MAX. Strictly increasing in i.
  static std::uint64_t bucket_upper(std::size_t i) noexcept;
  // The bucket a value falls in: bucket_upper(b - 1) < ns <= bucket_upper(b).
  // O(1), branch-free (one count-leading-zeros).
  static constexpr std::size_t bucket_of(std::uint64_t ns) noexcept {
    // shift = 0 below 2^5, else floor(log2 ns) - 4: the bucket width.
    const unsigned shift =
        static_cast<unsigned>(std::bit_width(ns | ((1u << kHistogramLinearBits) - 1))) -
        kHistogramLinearBits;
    // (ns >> shift) is in [16, 32) once shift > 0: buckets are contiguous.
    const std::uint64_t b = (std::uint64_t{shift} << kHistogramSubBits) + (ns >> shift);
    return static_cast<std::size_t>(std::min<std::uint64_t>(b, kHistogramBuckets - 1));
  }
};

// One writer (a worker thread), any number of readers. record() is a few
// relaxed load+store pairs and one release store (no locked instruction, no
// fence; a plain store on x86); readers copy with add_to() while it runs and
// may see a record half-applied (sum or max ahead of the bucket counts by the
// records made during the copy), never a torn value and never a counted
// value above the copy's max. Cache-line aligned so that per-worker
// histograms laid out side by side do not share a line.
class alignas(64) LatencyHistogram {
 public:
  // Only the owning thread may call it. Never allocates, never blocks.
  // `weight`: how many runs this value stands for (sampled timing, see
  // EngineOptions::time_every_run); it adds weight to the bucket and
  // ns * weight to the sum.
  void record(std::uint64_t ns, std::uint64_t weight = 1) noexcept {
    // Relaxed loads: this thread is the only writer (invariant 1).
    // Relaxed: ordered before readers by the release store below. Stored
    // only when it grows: most records leave the line untouched.
    if (ns > max_ns_.load(std::memory_order_relaxed)) max_ns_.store(ns, std::memory_order_relaxed);
    sum_ns_.store(sum_ns_.load(std::memory_order_relaxed) + ns * weight,
                  std::memory_order_relaxed);
    std::atomic<std::uint64_t>& c = counts_[HistogramData::bucket_of(ns)];
    // Release: publishes the max/sum stores above with the count (invariant 2).
    c.store(c.load(std::memory_order_relaxed) + weight, std::memory_order_release);
  }
  // Adds a copy of this histogram to out (merge). Thread-safe beside record().
  void add_to(HistogramData& out) const noexcept;

 private:
  static_assert(std::atomic<std::uint64_t>::is_always_lock_free);
  std::array<std::atomic<std::uint64_t>, kHistogramBuckets> counts_{};
  std::atomic<std::uint64_t> sum_ns_{0};
  std::atomic<std::uint64_t> max_ns_{0};
};
static_assert(alignof(LatencyHistogram) == 64);

// Everything metrics_text() / metrics_json() render.
struct HandlerMetricsData {
  std::string name;  // any bytes; escaped by the formatters
  std::uint64_t submitted = 0;
  std::uint64_t started = 0;  // handler calls (attempts), counted as each returns
  std::uint64_t done = 0;
  std::uint64_t retried = 0;
  std::uint64_t failed = 0;  // jobs failed for good: kFail, or kRetry/exception on the last attempt
  std::uint64_t dead = 0;    // jobs that became dead
  std::uint64_t cancelled = 0;
  std::uint64_t stuck = 0;   // runs that went past their deadline
  HistogramData queue_wait;  // run start - run_at (lateness included), ns
  HistogramData run_time;    // handler call duration, ns
};

struct MetricsData {
  std::vector<HandlerMetricsData> handlers;
  // Gauges.
  std::uint64_t pending[kPriorityLevels] = {};  // queued, per priority level
  std::uint64_t delayed = 0;                    // delayed + waiting to retry
  std::uint64_t running = 0;
  std::uint64_t dead = 0;       // dead-letter set size
  std::uint64_t stuck_now = 0;  // running past their deadline now
  double oldest_pending_age_seconds = 0;
  std::uint64_t capacity = 0;
  unsigned workers = 0;
  unsigned workers_alive = 0;
  bool healthy = false;
  // Engine-wide counters.
  std::uint64_t rejected = 0;
  std::uint64_t exceptions = 0;
  std::uint64_t dropped = 0;
  std::uint64_t recovered = 0;
  std::uint64_t memory_waits = 0;  // Health::memory_waits
  HistogramData scheduler_lateness;  // run start - run_at for delayed jobs, ns
  // Snapshots (has_snapshots false: omitted).
  bool has_snapshots = false;
  std::uint64_t snapshot_generation = 0;
  double snapshot_age_seconds = 0;
  double snapshot_duration_seconds = 0;
  std::uint64_t snapshot_bytes = 0;
  std::uint64_t snapshot_failures = 0;
  std::uint64_t snapshots_unchanged = 0;
  double durable_age_seconds = 0;
};

// Prometheus text exposition format 0.0.4: every family has HELP and TYPE
// lines; names are jobengine_*; per-handler series carry handler="name"
// (escaped; invalid UTF-8 bytes become U+FFFD); histograms as cumulative le
// buckets in seconds (a fixed subset, see kPrometheusBuckets in metrics.cc)
// + _sum + _count. Allocates; never throws anything but std::bad_alloc.
std::string format_prometheus(const MetricsData& m);
// One JSON object (UTF-8, strings escaped, invalid UTF-8 bytes as \ufffd);
// per histogram count, sum_ns and p50/p90/p99/p999/max in ns (integers).
std::string format_json(const MetricsData& m);

// The offset of the first byte of `s` that is not valid UTF-8 (RFC 3629),
// or s.size() when all of it is. register_handler() refuses such names: two
// of them could show as one name in every series (invalid bytes become
// U+FFFD there).
std::size_t invalid_utf8_at(std::string_view s) noexcept;

}  // namespace jobengine::detail
