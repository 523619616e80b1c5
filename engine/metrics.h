// Metrics: latency histograms kept per worker without locks, and the
// Prometheus text / JSON renderings of the engine's figures.
//
// The engine fills a MetricsData (counters summed over workers and
// submitters, histograms merged) and the formatters render it. Nothing here
// touches the engine: it is tested on its own (tests/engine/metrics_test.cc).
#pragma once

#include <array>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "jobengine/engine.h"

namespace jobengine::detail {

// Bucket layout of LatencyHistogram (log-linear, like HdrHistogram with 2
// significant bits... see metrics.cc): values in nanoseconds.
inline constexpr std::size_t kHistogramBuckets = 512;

// A merged, plain copy of one or more LatencyHistograms.
struct HistogramData {
  std::array<std::uint64_t, kHistogramBuckets> counts{};
  std::uint64_t count = 0;
  std::uint64_t sum_ns = 0;
  std::uint64_t max_ns = 0;

  void merge(const HistogramData& other) noexcept;
  // The value at quantile q in [0, 1]: the upper bound of the bucket holding
  // it (never below the true value, at most one sub-bucket above it), capped
  // at max_ns. 0 when empty.
  std::uint64_t quantile(double q) const noexcept;
  // Inclusive upper bound, in ns, of bucket i; the last is UINT64_MAX.
  static std::uint64_t bucket_upper(std::size_t i) noexcept;
  // The bucket a value falls in.
  static std::size_t bucket_of(std::uint64_t ns) noexcept;
};

// One writer (a worker thread), any number of readers. record() is a few
// relaxed load+store pairs (no locked instruction); readers copy with
// add_to() while it runs and may see a record half-applied (count and sum
// off by one record), never a torn value.
class LatencyHistogram {
 public:
  void record(std::uint64_t ns) noexcept;
  void add_to(HistogramData& out) const noexcept;

 private:
  std::array<std::atomic<std::uint64_t>, kHistogramBuckets> counts_{};
  std::atomic<std::uint64_t> count_{0};
  std::atomic<std::uint64_t> sum_ns_{0};
  std::atomic<std::uint64_t> max_ns_{0};
};

// Everything metrics_text() / metrics_json() render.
struct HandlerMetricsData {
  std::string name;
  std::uint64_t submitted = 0;
  std::uint64_t started = 0;    // handler calls begun (attempts)
  std::uint64_t done = 0;
  std::uint64_t retried = 0;
  std::uint64_t failed = 0;     // attempts that failed (kFail, kRetry, exception)
  std::uint64_t dead = 0;       // jobs that became dead
  std::uint64_t cancelled = 0;
  std::uint64_t stuck = 0;      // runs that went past their deadline
  HistogramData queue_wait;     // run start - run_at (lateness included), ns
  HistogramData run_time;       // handler call duration, ns
};

struct MetricsData {
  std::vector<HandlerMetricsData> handlers;
  // Gauges.
  std::uint64_t pending[kPriorityLevels] = {};  // queued, per priority level
  std::uint64_t delayed = 0;                    // delayed + waiting to retry
  std::uint64_t running = 0;
  std::uint64_t dead = 0;                       // dead-letter set size
  std::uint64_t stuck_now = 0;                  // running past their deadline now
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
  HistogramData scheduler_lateness;             // run start - run_at for delayed jobs, ns
  // Snapshots (has_snapshots false: omitted).
  bool has_snapshots = false;
  std::uint64_t snapshot_generation = 0;
  double snapshot_age_seconds = 0;
  double snapshot_duration_seconds = 0;
  std::uint64_t snapshot_bytes = 0;
  std::uint64_t snapshot_failures = 0;
  double durable_age_seconds = 0;
};

// Prometheus text exposition format 0.0.4: every family has HELP and TYPE
// lines; names are jobengine_*; per-handler series carry handler="name"
// (escaped); histograms as cumulative le buckets (seconds) + _sum + _count.
std::string format_prometheus(const MetricsData& m);
// One JSON object (UTF-8, strings escaped); percentiles per histogram.
std::string format_json(const MetricsData& m);

}  // namespace jobengine::detail
