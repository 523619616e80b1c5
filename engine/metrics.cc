// Latency histograms and the Prometheus / JSON renderings (see metrics.h).
//
// Bucket layout (values are integer nanoseconds):
//   - 0..31 ns: one bucket per value (buckets 0..31), exact.
//   - [2^e, 2^(e+1)) for e = 5..41: 16 equal sub-buckets of width
//     w = 2^(e-4) (shift = e - 4 = bit_width(ns) - 5). Bucket index
//     = shift * 16 + (ns >> shift), where ns >> shift is in [16, 32), so the
//     octaves follow each other without gaps: bucket 32 holds 32..33,
//     bucket 48 holds 64..67, ..., bucket 623 holds the last 2^37 ns below
//     2^42 ns.
//   - [2^42 ns, +inf) (from ~73 minutes): bucket 624, the last; its upper
//     bound is UINT64_MAX. kHistogramBuckets = 625 (5000 bytes of counts).
// bucket_of() is bit_width(ns | 31) (one lzcnt), a shift, an add and a min;
// bucket_upper(i) inverts it: ((top + 1) << shift) - 1 with
// shift = max(i / 16, 1) - 1, top = i - 16 * shift.
//
// Error bound: a value v >= 32 lies in a bucket of width w <= v / 16
// (v >= 16 * w because ns >> shift >= 16), so the bucket's upper bound u
// satisfies v <= u <= v + w - 1 < v * (1 + 1/16): at most 6.25% high, never
// low. Below 32 ns it is exact. quantile(q) returns the upper bound of the
// bucket holding the rank-ceil(q * count) value, capped at max_ns, so the
// same bound holds against the exact sorted quantile; in the overflow bucket
// it returns max_ns (exact only for the largest value).
//
// Prometheus buckets. Rendering 625 buckets per series would bloat the
// exposition, so jobengine_*_seconds histograms carry the fixed boundaries of
// kPrometheusBucketsNs: 1, 2.5, 5 x 10^k from 1 us to 10 s, then 30 s, 60 s,
// 300 s, 600 s, 3600 s, and +Inf. None of them is a fine bucket's upper bound,
// so each is conservative: the sample le="L" counts the observations in the
// fine buckets whose whole range lies at or below L. Every observation
// counted is <= L (the Prometheus meaning of le holds), but observations in
// the fine bucket that straddles L (at most L/16 below it, e.g. 992..1000 ns
// for le="1e-06") are counted only from the next boundary on. le="+Inf" and
// _count are the total; _sum is in seconds.
//
// Strings. Handler names are arbitrary bytes. Both renderings copy valid UTF-8
// sequences as they are and replace each byte that does not start a valid
// sequence (RFC 3629: no overlongs, no surrogates, nothing above U+10FFFF) by
// U+FFFD, so two names that differ only in invalid bytes can render the same.
// Prometheus label values escape backslash, double quote and line feed (the
// only escapes of format 0.0.4); JSON strings escape quote, backslash and
// every control character below 0x20.
//
// Numbers are formatted with std::to_chars (shortest round-trip form,
// locale-independent). Prometheus gets NaN / +Inf / -Inf spelled that way;
// JSON has no such numbers and gets null instead.
#include "engine/metrics.h"

#include <charconv>
#include <cmath>
#include <limits>
#include <string_view>

namespace jobengine::detail {
namespace {

constexpr std::size_t kLastBucket = kHistogramBuckets - 1;

constexpr std::uint64_t upper_of(std::size_t i) {
  if (i >= kLastBucket) return std::numeric_limits<std::uint64_t>::max();
  const std::size_t shift = std::max<std::size_t>(i >> kHistogramSubBits, 1) - 1;
  const std::uint64_t top = i - (shift << kHistogramSubBits);
  return ((top + 1) << shift) - 1;
}

// Compile-time spot checks of the layout described above (the test sweeps it).
static_assert(HistogramData::bucket_of(0) == 0);
static_assert(HistogramData::bucket_of(31) == 31 && upper_of(31) == 31);
static_assert(HistogramData::bucket_of(32) == 32 && upper_of(32) == 33);
static_assert(HistogramData::bucket_of(64) == 48 && upper_of(48) == 67);
static_assert(HistogramData::bucket_of((std::uint64_t{1} << kHistogramTopBits) - 1) ==
              kLastBucket - 1);
static_assert(upper_of(kLastBucket - 1) == (std::uint64_t{1} << kHistogramTopBits) - 1);
static_assert(HistogramData::bucket_of(std::uint64_t{1} << kHistogramTopBits) == kLastBucket);
static_assert(HistogramData::bucket_of(std::numeric_limits<std::uint64_t>::max()) == kLastBucket);

// The Prometheus le boundaries, in ns (see the header comment).
constexpr std::uint64_t kPrometheusBucketsNs[] = {
    1'000,           2'500,           5'000,
    10'000,          25'000,          50'000,
    100'000,         250'000,         500'000,
    1'000'000,       2'500'000,       5'000'000,
    10'000'000,      25'000'000,      50'000'000,
    100'000'000,     250'000'000,     500'000'000,
    1'000'000'000,   2'500'000'000,   5'000'000'000,
    10'000'000'000,  30'000'000'000,  60'000'000'000,
    300'000'000'000, 600'000'000'000, 3'600'000'000'000};
static_assert(kPrometheusBucketsNs[std::size(kPrometheusBucketsNs) - 1] <
              (std::uint64_t{1} << kHistogramTopBits));

// How many fine buckets lie wholly at or below limit_ns.
constexpr std::size_t fine_buckets_at_or_below(std::uint64_t limit_ns) {
  const std::size_t b = HistogramData::bucket_of(limit_ns);
  return upper_of(b) == limit_ns ? b + 1 : b;
}

// Length of the valid UTF-8 sequence starting at s[i], or 0 if s[i] does not
// start one (RFC 3629).
std::size_t utf8_sequence_length(std::string_view s, std::size_t i) {
  const auto byte = [&](std::size_t k) { return static_cast<unsigned char>(s[k]); };
  const auto cont = [&](std::size_t k) { return k < s.size() && (byte(k) & 0xC0) == 0x80; };
  const unsigned c = byte(i);
  if (c < 0x80) return 1;
  if (c < 0xC2) return 0;  // a continuation byte, or an overlong 2-byte lead
  if (c < 0xE0) return cont(i + 1) ? 2 : 0;
  if (c < 0xF0) {
    if (!cont(i + 1) || !cont(i + 2)) return 0;
    if (c == 0xE0 && byte(i + 1) < 0xA0) return 0;   // overlong
    if (c == 0xED && byte(i + 1) >= 0xA0) return 0;  // UTF-16 surrogate
    return 3;
  }
  if (c < 0xF5) {
    if (!cont(i + 1) || !cont(i + 2) || !cont(i + 3)) return 0;
    if (c == 0xF0 && byte(i + 1) < 0x90) return 0;   // overlong
    if (c == 0xF4 && byte(i + 1) >= 0x90) return 0;  // above U+10FFFF
    return 4;
  }
  return 0;
}

constexpr std::string_view kReplacementCharacter = "\xEF\xBF\xBD";  // U+FFFD

// Calls ascii(out, c) for each ASCII byte, copies valid multi-byte sequences
// and replaces invalid bytes by U+FFFD (written as `replacement`).
template <typename AsciiFn>
void append_utf8(std::string& out, std::string_view s, std::string_view replacement,
                 AsciiFn ascii) {
  for (std::size_t i = 0; i < s.size();) {
    const std::size_t n = utf8_sequence_length(s, i);
    if (n == 0) {
      out += replacement;
      ++i;
    } else if (n == 1) {
      ascii(out, s[i]);
      ++i;
    } else {
      out.append(s, i, n);
      i += n;
    }
  }
}

void append_prometheus_label_value(std::string& out, std::string_view s) {
  append_utf8(out, s, kReplacementCharacter, [](std::string& o, char c) {
    switch (c) {
      case '\\':
        o += "\\\\";
        break;
      case '"':
        o += "\\\"";
        break;
      case '\n':
        o += "\\n";
        break;
      default:
        o += c;
    }
  });
}

void append_json_string(std::string& out, std::string_view s) {
  out += '"';
  append_utf8(out, s, "\\ufffd", [](std::string& o, char c) {
    switch (c) {
      case '"':
        o += "\\\"";
        break;
      case '\\':
        o += "\\\\";
        break;
      case '\b':
        o += "\\b";
        break;
      case '\f':
        o += "\\f";
        break;
      case '\n':
        o += "\\n";
        break;
      case '\r':
        o += "\\r";
        break;
      case '\t':
        o += "\\t";
        break;
      default:
        if (static_cast<unsigned char>(c) < 0x20) {
          constexpr char kHex[] = "0123456789abcdef";
          o += "\\u00";
          o += kHex[(c >> 4) & 0xF];
          o += kHex[c & 0xF];
        } else {
          o += c;
        }
    }
  });
  out += '"';
}

void append_uint(std::string& out, std::uint64_t v) {
  char buf[24];
  const auto r = std::to_chars(buf, buf + sizeof buf, v);
  out.append(buf, r.ptr);
}

// Shortest round-trip form; the caller handles non-finite values.
void append_finite_double(std::string& out, double v) {
  char buf[32];
  const auto r = std::to_chars(buf, buf + sizeof buf, v);
  out.append(buf, r.ptr);
}

void append_prometheus_double(std::string& out, double v) {
  if (std::isnan(v)) {
    out += "NaN";
  } else if (std::isinf(v)) {
    out += v > 0 ? "+Inf" : "-Inf";
  } else {
    append_finite_double(out, v);
  }
}

void append_json_double(std::string& out, double v) {
  if (std::isfinite(v)) {
    append_finite_double(out, v);
  } else {
    out += "null";
  }
}

double ns_to_seconds(std::uint64_t ns) { return static_cast<double>(ns) / 1e9; }

// ---- Prometheus ------------------------------------------------------------

void family(std::string& out, std::string_view name, std::string_view type, std::string_view help) {
  out += "# HELP ";
  out += name;
  out += ' ';
  out += help;  // our own constant texts: no backslash, no line feed
  out += "\n# TYPE ";
  out += name;
  out += ' ';
  out += type;
  out += '\n';
}

void handler_label(std::string& out, const HandlerMetricsData& h) {
  out += "handler=\"";
  append_prometheus_label_value(out, h.name);
  out += '"';
}

void sample(std::string& out, std::string_view name, std::uint64_t v) {
  out += name;
  out += ' ';
  append_uint(out, v);
  out += '\n';
}

void sample(std::string& out, std::string_view name, double v) {
  out += name;
  out += ' ';
  append_prometheus_double(out, v);
  out += '\n';
}

// One histogram series: name_bucket{labels,le=...} lines, _sum, _count.
// labels is "" or a rendered label list without braces.
void histogram_series(std::string& out, std::string_view name, std::string_view labels,
                      const HistogramData& h) {
  const auto open = [&](std::string_view suffix) {
    out += name;
    out += suffix;
    if (!labels.empty()) {
      out += '{';
      out += labels;
    }
  };
  std::uint64_t cumulative = 0;
  std::size_t next_fine = 0;
  for (const std::uint64_t bound_ns : kPrometheusBucketsNs) {
    for (const std::size_t end = fine_buckets_at_or_below(bound_ns); next_fine < end;) {
      cumulative += h.counts[next_fine++];
    }
    open("_bucket");
    out += labels.empty() ? "{le=\"" : ",le=\"";
    append_finite_double(out, ns_to_seconds(bound_ns));
    out += "\"} ";
    append_uint(out, cumulative);
    out += '\n';
  }
  while (next_fine < kHistogramBuckets) cumulative += h.counts[next_fine++];
  // +Inf and _count are the bucket total, so they agree even if h.count
  // were out of step with h.counts.
  open("_bucket");
  out += labels.empty() ? "{le=\"+Inf\"} " : ",le=\"+Inf\"} ";
  append_uint(out, cumulative);
  out += '\n';
  open("_sum");
  if (!labels.empty()) out += '}';
  out += ' ';
  append_prometheus_double(out, ns_to_seconds(h.sum_ns));
  out += '\n';
  open("_count");
  if (!labels.empty()) out += '}';
  out += ' ';
  append_uint(out, cumulative);
  out += '\n';
}

struct HandlerCounter {
  const char* name;
  const char* help;
  std::uint64_t HandlerMetricsData::*field;
};

constexpr HandlerCounter kHandlerCounters[] = {
    {"jobengine_jobs_submitted_total", "Jobs submitted, per handler.",
     &HandlerMetricsData::submitted},
    {"jobengine_jobs_started_total", "Handler calls (attempts), per handler, counted as each call returns.",
     &HandlerMetricsData::started},
    {"jobengine_jobs_done_total", "Jobs finished successfully, per handler.",
     &HandlerMetricsData::done},
    {"jobengine_jobs_retried_total", "Attempts that ended in a retry, per handler.",
     &HandlerMetricsData::retried},
    {"jobengine_jobs_failed_total",
     "Jobs that failed for good (kFail, or a retry or exception with no attempt left), per handler.",
     &HandlerMetricsData::failed},
    {"jobengine_jobs_dead_total", "Jobs that became dead, per handler.", &HandlerMetricsData::dead},
    {"jobengine_jobs_cancelled_total", "Jobs cancelled, per handler.",
     &HandlerMetricsData::cancelled},
    {"jobengine_jobs_stuck_total", "Runs that went past their deadline, per handler.",
     &HandlerMetricsData::stuck},
};

// ---- JSON --------------------------------------------------------------------

void json_key(std::string& out, std::string_view key) {
  out += '"';
  out += key;  // our own constant keys: nothing to escape
  out += "\":";
}

void json_uint(std::string& out, std::string_view key, std::uint64_t v) {
  json_key(out, key);
  append_uint(out, v);
  out += ',';
}

void json_double(std::string& out, std::string_view key, double v) {
  json_key(out, key);
  append_json_double(out, v);
  out += ',';
}

void json_histogram(std::string& out, std::string_view key, const HistogramData& h) {
  json_key(out, key);
  out += '{';
  json_uint(out, "count", h.count);
  json_uint(out, "sum_ns", h.sum_ns);
  json_uint(out, "p50_ns", h.quantile(0.5));
  json_uint(out, "p90_ns", h.quantile(0.9));
  json_uint(out, "p99_ns", h.quantile(0.99));
  json_uint(out, "p999_ns", h.quantile(0.999));
  json_key(out, "max_ns");
  append_uint(out, h.max_ns);
  out += '}';
}

}  // namespace

std::size_t invalid_utf8_at(std::string_view s) noexcept {
  for (std::size_t i = 0; i < s.size();) {
    const std::size_t n = utf8_sequence_length(s, i);
    if (n == 0) return i;
    i += n;
  }
  return s.size();
}

// ---- HistogramData / LatencyHistogram ------------------------------------------

void HistogramData::merge(const HistogramData& other) noexcept {
  for (std::size_t i = 0; i < kHistogramBuckets; ++i) counts[i] += other.counts[i];
  count += other.count;
  sum_ns += other.sum_ns;
  max_ns = std::max(max_ns, other.max_ns);
}

std::uint64_t HistogramData::quantile(double q) const noexcept {
  if (count == 0) return 0;
  if (q >= 1) return max_ns;
  std::uint64_t rank = 1;
  if (q > 0) {  // false for NaN
    const double r = std::ceil(q * static_cast<double>(count));
    rank = std::clamp<std::uint64_t>(static_cast<std::uint64_t>(r), 1, count);
  }
  std::uint64_t cumulative = 0;
  for (std::size_t i = 0; i < kHistogramBuckets; ++i) {
    cumulative += counts[i];
    if (cumulative >= rank) return std::min(upper_of(i), max_ns);
  }
  return max_ns;  // counts add up to less than count: only if built by hand
}

std::uint64_t HistogramData::bucket_upper(std::size_t i) noexcept { return upper_of(i); }

void LatencyHistogram::add_to(HistogramData& out) const noexcept {
  std::uint64_t total = 0;
  for (std::size_t i = 0; i < kHistogramBuckets; ++i) {
    // Acquire: pairs with record()'s release, so the loads of sum_ns_ and
    // max_ns_ below see every record counted here (invariant 2).
    const std::uint64_t c = counts_[i].load(std::memory_order_acquire);
    out.counts[i] += c;
    total += c;
  }
  out.count += total;
  // Relaxed: ordered after the acquires above; a later record's value may
  // show up here too (sum/max ahead of the counts), never one counted missing.
  out.sum_ns += sum_ns_.load(std::memory_order_relaxed);
  out.max_ns = std::max(out.max_ns, max_ns_.load(std::memory_order_relaxed));
}

// ---- Renderings ------------------------------------------------------------------

std::string format_prometheus(const MetricsData& m) {
  std::string out;
  out.reserve(4096 + m.handlers.size() * 5000);

  for (const HandlerCounter& c : kHandlerCounters) {
    family(out, c.name, "counter", c.help);
    for (const HandlerMetricsData& h : m.handlers) {
      out += c.name;
      out += '{';
      handler_label(out, h);
      out += "} ";
      append_uint(out, h.*c.field);
      out += '\n';
    }
  }

  const auto handler_histograms = [&](std::string_view name, std::string_view help,
                                      HistogramData HandlerMetricsData::*field) {
    family(out, name, "histogram", help);
    std::string labels;
    for (const HandlerMetricsData& h : m.handlers) {
      labels.clear();
      handler_label(labels, h);
      histogram_series(out, name, labels, h.*field);
    }
  };
  handler_histograms("jobengine_queue_wait_seconds",
                     "Time from a job's due time to the start of its run, per handler (runs under 1 us timed one in 128, weighted; EngineOptions::time_every_run).",
                     &HandlerMetricsData::queue_wait);
  handler_histograms("jobengine_run_seconds", "Handler call duration, per handler (runs under 1 us timed one in 128, weighted; EngineOptions::time_every_run).",
                     &HandlerMetricsData::run_time);

  family(out, "jobengine_pending", "gauge", "Jobs queued and not running, per priority level.");
  for (std::size_t p = 0; p < kPriorityLevels; ++p) {
    out += "jobengine_pending{priority=\"";
    append_uint(out, p);
    out += "\"} ";
    append_uint(out, m.pending[p]);
    out += '\n';
  }
  family(out, "jobengine_delayed", "gauge", "Jobs delayed or waiting to retry.");
  sample(out, "jobengine_delayed", m.delayed);
  family(out, "jobengine_running", "gauge", "Jobs running now.");
  sample(out, "jobengine_running", m.running);
  family(out, "jobengine_dead", "gauge", "Jobs in the dead-letter set.");
  sample(out, "jobengine_dead", m.dead);
  family(out, "jobengine_stuck", "gauge", "Jobs running past their deadline now.");
  sample(out, "jobengine_stuck", m.stuck_now);
  family(out, "jobengine_oldest_pending_age_seconds", "gauge", "Age of the oldest queued job.");
  sample(out, "jobengine_oldest_pending_age_seconds", m.oldest_pending_age_seconds);
  family(out, "jobengine_capacity", "gauge", "Job table capacity (pending jobs at most).");
  sample(out, "jobengine_capacity", m.capacity);
  family(out, "jobengine_workers", "gauge", "Worker threads configured.");
  sample(out, "jobengine_workers", std::uint64_t{m.workers});
  family(out, "jobengine_workers_alive", "gauge", "Worker threads alive.");
  sample(out, "jobengine_workers_alive", std::uint64_t{m.workers_alive});
  family(out, "jobengine_up", "gauge", "1 if the engine is healthy, else 0.");
  sample(out, "jobengine_up", std::uint64_t{m.healthy ? 1u : 0u});

  family(out, "jobengine_rejected_total", "counter", "Submissions rejected.");
  sample(out, "jobengine_rejected_total", m.rejected);
  family(out, "jobengine_exceptions_total", "counter", "Exceptions thrown by handlers.");
  sample(out, "jobengine_exceptions_total", m.exceptions);
  family(out, "jobengine_dropped_total", "counter", "Jobs dropped.");
  sample(out, "jobengine_dropped_total", m.dropped);
  family(out, "jobengine_recovered_total", "counter", "Jobs recovered from a snapshot.");
  sample(out, "jobengine_recovered_total", m.recovered);
  family(out, "jobengine_worker_memory_waits_total", "counter",
         "Pauses workers took for memory to record a job's end.");
  sample(out, "jobengine_worker_memory_waits_total", m.memory_waits);

  family(out, "jobengine_scheduler_lateness_seconds", "histogram",
         "Time from a delayed job's or retry's due time to the scheduler queueing it "
         "(due time to run start, the queue included, is jobengine_queue_wait_seconds).");
  histogram_series(out, "jobengine_scheduler_lateness_seconds", "", m.scheduler_lateness);

  if (m.has_snapshots) {
    family(out, "jobengine_snapshot_generation", "gauge", "Generation of the last snapshot.");
    sample(out, "jobengine_snapshot_generation", m.snapshot_generation);
    family(out, "jobengine_snapshot_age_seconds", "gauge", "Time since the last snapshot.");
    sample(out, "jobengine_snapshot_age_seconds", m.snapshot_age_seconds);
    family(out, "jobengine_snapshot_duration_seconds", "gauge", "Duration of the last snapshot.");
    sample(out, "jobengine_snapshot_duration_seconds", m.snapshot_duration_seconds);
    family(out, "jobengine_snapshot_bytes", "gauge", "Size of the last snapshot.");
    sample(out, "jobengine_snapshot_bytes", m.snapshot_bytes);
    family(out, "jobengine_snapshot_failures_total", "counter", "Snapshots that failed.");
    sample(out, "jobengine_snapshot_failures_total", m.snapshot_failures);
    family(out, "jobengine_snapshot_unchanged_total", "counter",
           "Periodic snapshots not written because nothing had changed since the last one.");
    sample(out, "jobengine_snapshot_unchanged_total", m.snapshots_unchanged);
    family(out, "jobengine_snapshot_durable_age_seconds", "gauge",
           "Time since the last snapshot known durable.");
    sample(out, "jobengine_snapshot_durable_age_seconds", m.durable_age_seconds);
  }
  return out;
}

std::string format_json(const MetricsData& m) {
  std::string out;
  out.reserve(1024 + m.handlers.size() * 600);
  out += '{';
  json_key(out, "healthy");
  out += m.healthy ? "true," : "false,";
  json_uint(out, "workers", m.workers);
  json_uint(out, "workers_alive", m.workers_alive);
  json_uint(out, "capacity", m.capacity);
  json_key(out, "pending");
  out += '[';
  for (std::size_t p = 0; p < kPriorityLevels; ++p) {
    if (p != 0) out += ',';
    append_uint(out, m.pending[p]);
  }
  out += "],";
  json_uint(out, "delayed", m.delayed);
  json_uint(out, "running", m.running);
  json_uint(out, "dead", m.dead);
  json_uint(out, "stuck", m.stuck_now);
  json_double(out, "oldest_pending_age_seconds", m.oldest_pending_age_seconds);
  json_uint(out, "rejected", m.rejected);
  json_uint(out, "exceptions", m.exceptions);
  json_uint(out, "dropped", m.dropped);
  json_uint(out, "recovered", m.recovered);
  json_uint(out, "memory_waits", m.memory_waits);
  json_histogram(out, "scheduler_lateness", m.scheduler_lateness);
  out += ',';
  json_key(out, "handlers");
  out += '[';
  for (std::size_t i = 0; i < m.handlers.size(); ++i) {
    const HandlerMetricsData& h = m.handlers[i];
    if (i != 0) out += ',';
    out += '{';
    json_key(out, "name");
    append_json_string(out, h.name);
    out += ',';
    for (const HandlerCounter& c : kHandlerCounters) {
      // "jobengine_jobs_submitted_total" -> "submitted"
      std::string_view key = c.name;
      key.remove_prefix(std::string_view("jobengine_jobs_").size());
      key.remove_suffix(std::string_view("_total").size());
      json_uint(out, key, h.*c.field);
    }
    json_histogram(out, "queue_wait", h.queue_wait);
    out += ',';
    json_histogram(out, "run_time", h.run_time);
    out += '}';
  }
  out += ']';
  if (m.has_snapshots) {
    out += ',';
    json_key(out, "snapshot");
    out += '{';
    json_uint(out, "generation", m.snapshot_generation);
    json_double(out, "age_seconds", m.snapshot_age_seconds);
    json_double(out, "duration_seconds", m.snapshot_duration_seconds);
    json_uint(out, "bytes", m.snapshot_bytes);
    json_uint(out, "failures", m.snapshot_failures);
    json_uint(out, "unchanged", m.snapshots_unchanged);
    json_key(out, "durable_age_seconds");
    append_json_double(out, m.durable_age_seconds);
    out += '}';
  }
  out += '}';
  return out;
}

}  // namespace jobengine::detail
