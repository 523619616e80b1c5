// Tests for engine/metrics.{h,cc}: the histogram bucket layout and its error
// bound, quantiles, merging, concurrent record()/add_to(), and the two
// renderings. The Prometheus text is checked by a strict parser written here
// (PrometheusParser below), which is itself tested against broken texts so
// that it cannot pass vacuously.
#include "engine/metrics.h"
#include "jobengine/engine.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <charconv>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <limits>
#include <map>
#include <nlohmann/json.hpp>
#include <random>
#include <set>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

namespace jobengine::detail {
namespace {

constexpr std::uint64_t kMax64 = std::numeric_limits<std::uint64_t>::max();
constexpr std::size_t kLast = kHistogramBuckets - 1;

std::uint64_t upper(std::size_t i) { return HistogramData::bucket_upper(i); }
std::size_t bucket(std::uint64_t v) { return HistogramData::bucket_of(v); }

// Seeds: fixed by default so failures replay; JOBENGINE_TEST_SEED overrides.
std::uint64_t test_seed(std::uint64_t fallback) {
  if (const char* s = std::getenv("JOBENGINE_TEST_SEED")) return std::strtoull(s, nullptr, 10);
  return fallback;
}

// ---- Bucket layout -------------------------------------------------------------

TEST(HistogramLayout, UpperBoundsStrictlyIncreaseAndEndAtMax) {
  for (std::size_t i = 1; i < kHistogramBuckets; ++i) {
    ASSERT_LT(upper(i - 1), upper(i)) << "bucket " << i;
  }
  EXPECT_EQ(upper(kLast), kMax64);
  EXPECT_EQ(upper(0), 0u);
}

TEST(HistogramLayout, BucketOfInvertsBucketUpper) {
  for (std::size_t i = 0; i < kHistogramBuckets; ++i) {
    ASSERT_EQ(bucket(upper(i)), i) << "upper bound of bucket " << i;
    if (i < kLast) {
      ASSERT_EQ(bucket(upper(i) + 1), i + 1) << "just above bucket " << i;
    }
    if (i > 0) {
      ASSERT_EQ(bucket(upper(i - 1) + 1), i) << "lower bound of bucket " << i;
    }
  }
}

void expect_in_own_bucket(std::uint64_t v) {
  const std::size_t b = bucket(v);
  ASSERT_LT(b, kHistogramBuckets) << v;
  ASSERT_LE(v, upper(b)) << v;
  if (b > 0) {
    ASSERT_GT(v, upper(b - 1)) << v;
  }
}

TEST(HistogramLayout, EveryValueLiesInItsBucket) {
  for (std::uint64_t v = 0; v <= 300'000; ++v) expect_in_own_bucket(v);
  for (unsigned k = 0; k < 64; ++k) {
    const std::uint64_t p = std::uint64_t{1} << k;
    for (const std::uint64_t v : {p - 1, p, p + 1, p + p / 2, p + p / 3}) expect_in_own_bucket(v);
  }
  expect_in_own_bucket(kMax64);
  expect_in_own_bucket(kMax64 - 1);
  const std::uint64_t seed = test_seed(42);
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  for (int i = 0; i < 1'000'000; ++i) {
    // Log-uniform over all 64-bit magnitudes.
    const unsigned bits = static_cast<unsigned>(rng() % 65);
    const std::uint64_t v = bits == 0 ? 0 : rng() >> (64 - bits);
    expect_in_own_bucket(v);
  }
}

TEST(HistogramLayout, BucketWidthIsAtMostOneSixteenthOfItsValues) {
  // Exact below 32 ns, then width <= lower bound / 16 (the 6.25% bound).
  for (std::size_t i = 0; i < 32; ++i) EXPECT_EQ(upper(i), i);
  for (std::size_t i = 32; i < kLast; ++i) {
    const std::uint64_t lower = upper(i - 1) + 1;
    const std::uint64_t width = upper(i) - upper(i - 1);
    ASSERT_LE(width * 16, lower) << "bucket " << i;
  }
}

TEST(HistogramLayout, CoversAnHourBeforeTheOverflowBucket) {
  const std::uint64_t hour_ns = 3600ull * 1'000'000'000ull;
  EXPECT_LT(bucket(hour_ns), kLast);
  EXPECT_EQ(upper(kLast - 1), (std::uint64_t{1} << kHistogramTopBits) - 1);
  EXPECT_GT(upper(kLast - 1), hour_ns);
  EXPECT_EQ(bucket(std::uint64_t{1} << kHistogramTopBits), kLast);
}

// ---- Quantiles ----------------------------------------------------------------------

HistogramData snapshot_of(const std::vector<std::uint64_t>& values) {
  LatencyHistogram h;
  for (const std::uint64_t v : values) h.record(v);
  HistogramData d;
  h.add_to(d);
  return d;
}

// The value of rank ceil(q * n) (1-based, at least 1), the definition
// quantile() documents.
std::uint64_t exact_quantile(std::vector<std::uint64_t> sorted, double q) {
  if (q >= 1) return sorted.back();
  std::uint64_t rank = 1;
  if (q > 0) {
    rank = std::clamp<std::uint64_t>(
        static_cast<std::uint64_t>(std::ceil(q * static_cast<double>(sorted.size()))), 1,
        sorted.size());
  }
  return sorted[rank - 1];
}

void expect_quantiles_within_bound(std::vector<std::uint64_t> values) {
  const HistogramData d = snapshot_of(values);
  std::sort(values.begin(), values.end());
  ASSERT_EQ(d.count, values.size());
  EXPECT_EQ(d.max_ns, values.back());
  for (const double q : {0.0, 0.001, 0.25, 0.5, 0.9, 0.99, 0.999, 1.0}) {
    const std::uint64_t exact = exact_quantile(values, q);
    const std::uint64_t got = d.quantile(q);
    SCOPED_TRACE("q=" + std::to_string(q) + " exact=" + std::to_string(exact) +
                 " got=" + std::to_string(got));
    EXPECT_GE(got, exact);  // never low
    EXPECT_LE(got, d.max_ns);
    if (exact < 32) {
      EXPECT_EQ(got, exact);
    } else if (exact < (std::uint64_t{1} << kHistogramTopBits)) {
      EXPECT_LE(got - exact, exact / 16);  // the bucket's relative width
    }
  }
  EXPECT_EQ(d.quantile(1.0), values.back());
}

TEST(HistogramQuantile, EmptyIsZero) {
  const HistogramData d;
  EXPECT_EQ(d.quantile(0.5), 0u);
  EXPECT_EQ(d.quantile(1.0), 0u);
}

TEST(HistogramQuantile, UniformWithinBucketError) {
  const std::uint64_t seed = test_seed(1);
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<std::uint64_t> dist(0, 1'000'000);
  std::vector<std::uint64_t> v(100'000);
  for (auto& x : v) x = dist(rng);
  expect_quantiles_within_bound(std::move(v));
}

TEST(HistogramQuantile, LogUniformUpToAnHourWithinBucketError) {
  const std::uint64_t seed = test_seed(2);
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> exponent(0, std::log(3.6e12));
  std::vector<std::uint64_t> v(100'000);
  for (auto& x : v) x = static_cast<std::uint64_t>(std::exp(exponent(rng)));
  expect_quantiles_within_bound(std::move(v));
}

TEST(HistogramQuantile, ExponentialTailWithinBucketError) {
  const std::uint64_t seed = test_seed(3);
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  std::exponential_distribution<double> dist(1.0 / 50'000);  // mean 50 us
  std::vector<std::uint64_t> v(200'000);
  for (auto& x : v) x = static_cast<std::uint64_t>(dist(rng));
  expect_quantiles_within_bound(std::move(v));
}

TEST(HistogramQuantile, SmallValuesAreExact) {
  std::vector<std::uint64_t> v;
  for (std::uint64_t i = 0; i < 32; ++i) v.insert(v.end(), i + 1, i);
  expect_quantiles_within_bound(v);
}

TEST(HistogramQuantile, ConstantValueIsCappedAtMax) {
  // 1000 ns lies in bucket 992..1023: the upper bound is capped at max.
  const HistogramData d = snapshot_of(std::vector<std::uint64_t>(1000, 1000));
  EXPECT_EQ(d.quantile(0.5), 1000u);
  EXPECT_EQ(d.quantile(0.99), 1000u);
  EXPECT_EQ(d.quantile(1.0), 1000u);
  EXPECT_EQ(d.sum_ns, 1'000'000u);
}

TEST(HistogramQuantile, OverflowBucketReportsMax) {
  const std::uint64_t two_hours = 7200ull * 1'000'000'000ull;
  const HistogramData d = snapshot_of({10, two_hours, kMax64 / 4});
  EXPECT_EQ(d.counts[kLast], 2u);
  EXPECT_EQ(d.quantile(0.0), 10u);
  EXPECT_EQ(d.quantile(0.5), kMax64 / 4);  // in the last bucket: max
  EXPECT_EQ(d.quantile(1.0), kMax64 / 4);
}

TEST(HistogramQuantile, OutOfRangeAndNanQuantiles) {
  const HistogramData d = snapshot_of({5, 100, 1'000'000});
  EXPECT_EQ(d.quantile(-1.0), 5u);
  EXPECT_EQ(d.quantile(std::nan("")), 5u);
  EXPECT_EQ(d.quantile(2.0), 1'000'000u);
}

// ---- Merge -------------------------------------------------------------------------

TEST(HistogramMerge, MergedCopiesEqualOneHistogramOfAllValues) {
  std::mt19937_64 rng(test_seed(4));
  LatencyHistogram a, b, all;
  for (int i = 0; i < 50'000; ++i) {
    const std::uint64_t v = rng() >> (rng() % 64);
    (i % 3 == 0 ? a : b).record(v % (std::uint64_t{1} << 50));
    all.record(v % (std::uint64_t{1} << 50));
  }
  HistogramData via_add_to;  // add_to accumulates
  a.add_to(via_add_to);
  b.add_to(via_add_to);
  HistogramData da, db, expected;
  a.add_to(da);
  b.add_to(db);
  all.add_to(expected);
  HistogramData via_merge = da;
  via_merge.merge(db);
  for (const HistogramData* d : {&via_add_to, &via_merge}) {
    EXPECT_EQ(d->counts, expected.counts);
    EXPECT_EQ(d->count, expected.count);
    EXPECT_EQ(d->sum_ns, expected.sum_ns);
    EXPECT_EQ(d->max_ns, expected.max_ns);
  }
  EXPECT_EQ(expected.count, 50'000u);
}

TEST(HistogramWeights, AWeightedRecordCountsAsThatManyRecordsOfItsValue) {
  LatencyHistogram weighted, repeated;
  weighted.record(700, 5);
  weighted.record(90'000, 1);
  for (int i = 0; i < 5; ++i) repeated.record(700);
  repeated.record(90'000);
  HistogramData a, b;
  weighted.add_to(a);
  repeated.add_to(b);
  EXPECT_EQ(a.count, 6u);
  EXPECT_EQ(a.sum_ns, 5u * 700 + 90'000);
  EXPECT_EQ(a.max_ns, 90'000u);
  EXPECT_EQ(a.counts, b.counts);
  EXPECT_EQ(a.sum_ns, b.sum_ns);
}

TEST(HistogramMerge, MergeWithEmptyIsIdentity) {
  const HistogramData d = snapshot_of({1, 2, 3000, 4'000'000});
  HistogramData m = d;
  m.merge(HistogramData{});
  EXPECT_EQ(m.counts, d.counts);
  EXPECT_EQ(m.count, d.count);
  EXPECT_EQ(m.sum_ns, d.sum_ns);
  EXPECT_EQ(m.max_ns, d.max_ns);
}

// ---- Concurrency (run under the tsan preset) ------------------------------------------

// One writer records a known sequence while a reader copies repeatedly. Each
// copy must be self-consistent (count = sum of buckets, never decreasing;
// max and sum cover every counted value: invariant 2 in metrics.h), and the
// final copy exact.
TEST(HistogramConcurrency, OneWriterOneReaderNoRaceExactFinalCounts) {
  constexpr std::uint64_t kRecords = 300'000;
  const std::uint64_t seed = test_seed(5);
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::vector<std::uint64_t> values(kRecords);
  std::mt19937_64 rng(seed);
  for (auto& v : values) v = (rng() >> (rng() % 64)) % (std::uint64_t{1} << 40);

  LatencyHistogram h;
  std::atomic<bool> done{false};
  std::thread writer([&] {
    for (const std::uint64_t v : values) h.record(v);
    done.store(true, std::memory_order_release);
  });
  std::uint64_t last_count = 0;
  std::uint64_t copies = 0;
  bool finished = false;
  while (!finished) {
    finished = done.load(std::memory_order_acquire);
    HistogramData d;
    h.add_to(d);
    ++copies;
    std::uint64_t total = 0, lower_sum = 0;
    std::size_t highest = 0;
    for (std::size_t i = 0; i < kHistogramBuckets; ++i) {
      total += d.counts[i];
      if (d.counts[i] != 0) {
        highest = i;
        lower_sum += d.counts[i] * (i == 0 ? 0 : upper(i - 1) + 1);
      }
    }
    ASSERT_EQ(total, d.count);
    ASSERT_GE(d.count, last_count);
    last_count = d.count;
    if (d.count != 0) {
      ASSERT_GE(d.max_ns, highest == 0 ? 0 : upper(highest - 1) + 1);
      ASSERT_GE(d.sum_ns, lower_sum);
    }
  }
  writer.join();
  std::printf("reader made %llu copies while the writer ran\n",
              static_cast<unsigned long long>(copies));

  HistogramData final_copy;
  h.add_to(final_copy);
  HistogramData model;
  for (const std::uint64_t v : values) {
    ++model.counts[bucket(v)];
    ++model.count;
    model.sum_ns += v;
    model.max_ns = std::max(model.max_ns, v);
  }
  EXPECT_EQ(final_copy.counts, model.counts);
  EXPECT_EQ(final_copy.count, kRecords);
  EXPECT_EQ(final_copy.sum_ns, model.sum_ns);
  EXPECT_EQ(final_copy.max_ns, model.max_ns);
}

// ---- A strict Prometheus text format 0.0.4 parser -----------------------------------------
//
// Follows https://prometheus.io/docs/instrumenting/exposition_formats/ and is
// stricter where the format is lax: single spaces between tokens, no spaces
// inside braces, no trailing comma in label lists, floats only as Go spells
// them or NaN/+Inf/-Inf (not "nan" or "inf"), every family with HELP and TYPE
// before its first sample, every sample in a declared family, each family's
// lines contiguous, no duplicate series, counters and histogram counts
// non-negative, histogram buckets with increasing le, non-decreasing counts,
// ending in +Inf equal to _count, with _sum present.

struct PromSample {
  std::string name;
  std::map<std::string, std::string> labels;
  double value = 0;
  std::string raw_value;
};

struct PromFamily {
  std::string type;
  std::string help;
  bool has_help = false;
  bool has_type = false;
  std::vector<PromSample> samples;
};

struct PromText {
  std::map<std::string, PromFamily> families;
  std::vector<std::string> order;  // families in order of first appearance
};

bool is_metric_name(std::string_view s) {
  if (s.empty()) return false;
  for (std::size_t i = 0; i < s.size(); ++i) {
    const char c = s[i];
    const bool alpha = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' || c == ':';
    if (!alpha && !(i > 0 && c >= '0' && c <= '9')) return false;
  }
  return true;
}

bool is_label_name(std::string_view s) {
  if (s.empty() || s.substr(0, 2) == "__") return false;
  for (std::size_t i = 0; i < s.size(); ++i) {
    const char c = s[i];
    const bool alpha = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_';
    if (!alpha && !(i > 0 && c >= '0' && c <= '9')) return false;
  }
  return true;
}

// Length of the valid UTF-8 sequence (RFC 3629) at s[i], 0 if none starts
// there. Written independently of metrics.cc: decodes the code point.
std::size_t utf8_length_at(std::string_view s, std::size_t i) {
  const auto c = static_cast<unsigned char>(s[i]);
  std::size_t n;
  std::uint32_t cp;
  if (c < 0x80) {
    return 1;
  } else if ((c & 0xE0) == 0xC0) {
    n = 2;
    cp = c & 0x1F;
  } else if ((c & 0xF0) == 0xE0) {
    n = 3;
    cp = c & 0x0F;
  } else if ((c & 0xF8) == 0xF0) {
    n = 4;
    cp = c & 0x07;
  } else {
    return 0;
  }
  if (i + n > s.size()) return 0;
  for (std::size_t k = 1; k < n; ++k) {
    const auto d = static_cast<unsigned char>(s[i + k]);
    if ((d & 0xC0) != 0x80) return 0;
    cp = (cp << 6) | (d & 0x3F);
  }
  const std::uint32_t min_cp[] = {0, 0, 0x80, 0x800, 0x10000};
  if (cp < min_cp[n] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return 0;
  return n;
}

bool is_valid_utf8(std::string_view s) {
  for (std::size_t i = 0; i < s.size();) {
    const std::size_t n = utf8_length_at(s, i);
    if (n == 0) return false;
    i += n;
  }
  return true;
}

// What the renderings promise to make of a name: valid sequences kept, every
// other byte replaced by U+FFFD.
std::string sanitized(std::string_view s) {
  std::string out;
  for (std::size_t i = 0; i < s.size();) {
    const std::size_t n = utf8_length_at(s, i);
    if (n == 0) {
      out += "\xef\xbf\xbd";
      ++i;
    } else {
      out.append(s.substr(i, n));
      i += n;
    }
  }
  return out;
}

bool all_digits(std::string_view s) {
  return !s.empty() && std::all_of(s.begin(), s.end(), [](char c) { return c >= '0' && c <= '9'; });
}

// Go float syntax as Prometheus writes it, or NaN / +Inf / -Inf.
bool parse_prom_float(std::string_view s, double* out) {
  if (s == "NaN") return *out = std::numeric_limits<double>::quiet_NaN(), true;
  if (s == "+Inf") return *out = std::numeric_limits<double>::infinity(), true;
  if (s == "-Inf") return *out = -std::numeric_limits<double>::infinity(), true;
  std::string_view body = s;
  if (!body.empty() && (body[0] == '+' || body[0] == '-')) body.remove_prefix(1);
  const std::size_t e = body.find_first_of("eE");
  const std::string_view mantissa = body.substr(0, e);
  if (e != std::string_view::npos) {
    std::string_view exp = body.substr(e + 1);
    if (!exp.empty() && (exp[0] == '+' || exp[0] == '-')) exp.remove_prefix(1);
    if (!all_digits(exp)) return false;
  }
  const std::size_t dot = mantissa.find('.');
  const std::string_view ip = mantissa.substr(0, dot);
  const std::string_view fp = dot == std::string_view::npos ? "" : mantissa.substr(dot + 1);
  if (ip.empty() && fp.empty()) return false;
  if ((!ip.empty() && !all_digits(ip)) || (!fp.empty() && !all_digits(fp))) return false;
  const char* first = s.data() + (s[0] == '+' ? 1 : 0);
  const auto r = std::from_chars(first, s.data() + s.size(), *out);
  return r.ec == std::errc() && r.ptr == s.data() + s.size();
}

class PrometheusParser {
 public:
  // Empty string on success, else the first error with its line number.
  std::string parse(std::string_view text, PromText* out) {
    out_ = out;
    if (!text.empty() && text.back() != '\n') return "text does not end with a line feed";
    std::size_t line_no = 0;
    while (!text.empty()) {
      ++line_no;
      const std::size_t nl = text.find('\n');
      const std::string_view line = text.substr(0, nl);
      text.remove_prefix(nl + 1);
      std::string err = parse_line(line);
      if (!err.empty()) return "line " + std::to_string(line_no) + ": " + err;
    }
    return check_families();
  }

 private:
  std::string parse_line(std::string_view line) {
    if (line.empty()) return "";  // empty lines are ignored
    if (line[0] == '#') return parse_comment(line);
    return parse_sample(line);
  }

  // Opens (or continues) the group of lines of family name.
  std::string enter_family(const std::string& name) {
    if (name == current_) return "";
    if (closed_.count(name) != 0) return "lines of family " + name + " are not contiguous";
    if (!current_.empty()) closed_.insert(current_);
    current_ = name;
    return "";
  }

  std::string parse_comment(std::string_view line) {
    const bool help = line.substr(0, 7) == "# HELP ";
    const bool type = line.substr(0, 7) == "# TYPE ";
    if (!help && !type) return "";  // a plain comment
    std::string_view rest = line.substr(7);
    const std::size_t sp = rest.find(' ');
    if (sp == std::string_view::npos) return "HELP/TYPE without text";
    const std::string name(rest.substr(0, sp));
    const std::string_view arg = rest.substr(sp + 1);
    if (!is_metric_name(name)) return "bad metric name '" + name + "'";
    std::string err = enter_family(name);
    if (!err.empty()) return err;
    if (out_->families.count(name) == 0) out_->order.push_back(name);
    PromFamily& f = out_->families[name];
    if (!f.samples.empty()) return "HELP/TYPE of " + name + " after its samples";
    if (help) {
      if (f.has_help) return "second HELP for " + name;
      for (std::size_t i = 0; i < arg.size(); ++i) {
        if (arg[i] == '\\') {
          if (i + 1 == arg.size() || (arg[i + 1] != '\\' && arg[i + 1] != 'n')) {
            return "bad escape in HELP of " + name;
          }
          ++i;
        }
      }
      if (!is_valid_utf8(arg)) return "HELP of " + name + " is not UTF-8";
      f.has_help = true;
      f.help = std::string(arg);
    } else {
      if (f.has_type) return "second TYPE for " + name;
      if (arg != "counter" && arg != "gauge" && arg != "histogram" && arg != "summary" &&
          arg != "untyped") {
        return "unknown type '" + std::string(arg) + "'";
      }
      f.has_type = true;
      f.type = std::string(arg);
    }
    return "";
  }

  // The family a sample name belongs to: its own, or a histogram's (or
  // summary's) for the _bucket/_sum/_count suffixes.
  std::string family_of(const std::string& name, std::string* suffix) {
    const auto it = out_->families.find(name);
    if (it != out_->families.end() && it->second.type != "histogram") {
      suffix->clear();
      return name;
    }
    for (const char* s : {"_bucket", "_sum", "_count"}) {
      const std::string_view sv = s;
      if (name.size() > sv.size() && name.compare(name.size() - sv.size(), sv.size(), sv) == 0) {
        const std::string base = name.substr(0, name.size() - sv.size());
        const auto f = out_->families.find(base);
        if (f != out_->families.end() &&
            (f->second.type == "histogram" || (f->second.type == "summary" && sv != "_bucket"))) {
          *suffix = sv;
          return base;
        }
      }
    }
    return "";
  }

  std::string parse_labels(std::string_view* rest, std::map<std::string, std::string>* labels) {
    // *rest starts after '{'.
    std::string_view s = *rest;
    if (!s.empty() && s[0] == '}') return "empty label braces";  // allowed, but we never write it
    for (;;) {
      const std::size_t eq = s.find('=');
      if (eq == std::string_view::npos) return "label without '='";
      const std::string lname(s.substr(0, eq));
      if (!is_label_name(lname)) return "bad label name '" + lname + "'";
      s.remove_prefix(eq + 1);
      if (s.empty() || s[0] != '"') return "label value not quoted";
      s.remove_prefix(1);
      std::string value;
      for (;;) {
        if (s.empty()) return "unterminated label value";
        const char c = s[0];
        s.remove_prefix(1);
        if (c == '"') break;
        if (c == '\\') {
          if (s.empty()) return "unterminated escape";
          const char e = s[0];
          s.remove_prefix(1);
          if (e == '\\')
            value += '\\';
          else if (e == '"')
            value += '"';
          else if (e == 'n')
            value += '\n';
          else
            return std::string("bad escape \\") + e;
        } else {
          value += c;
        }
      }
      if (!is_valid_utf8(value)) return "label value is not UTF-8";
      if (!labels->emplace(lname, value).second) return "duplicate label " + lname;
      if (s.empty()) return "unterminated label list";
      if (s[0] == '}') {
        s.remove_prefix(1);
        *rest = s;
        return "";
      }
      if (s[0] != ',') return "expected ',' or '}' after a label";
      s.remove_prefix(1);
    }
  }

  std::string parse_sample(std::string_view line) {
    std::size_t name_end = line.find_first_of("{ ");
    if (name_end == std::string_view::npos) return "sample without value";
    PromSample smp;
    smp.name = std::string(line.substr(0, name_end));
    if (!is_metric_name(smp.name)) return "bad metric name '" + smp.name + "'";
    std::string_view rest = line.substr(name_end);
    if (rest[0] == '{') {
      rest.remove_prefix(1);
      std::string err = parse_labels(&rest, &smp.labels);
      if (!err.empty()) return err;
    }
    if (rest.empty() || rest[0] != ' ') return "expected one space before the value";
    rest.remove_prefix(1);
    const std::size_t sp = rest.find(' ');
    smp.raw_value = std::string(rest.substr(0, sp));
    if (!parse_prom_float(smp.raw_value, &smp.value)) return "bad value '" + smp.raw_value + "'";
    if (sp != std::string_view::npos) {
      std::string_view ts = rest.substr(sp + 1);
      if (!ts.empty() && ts[0] == '-') ts.remove_prefix(1);
      if (!all_digits(ts)) return "bad timestamp";
    }

    std::string suffix;
    const std::string fam = family_of(smp.name, &suffix);
    if (fam.empty()) return "sample " + smp.name + " of no declared family";
    PromFamily& f = out_->families[fam];
    if (!f.has_type) return "sample " + smp.name + " before the TYPE of " + fam;
    if (!f.has_help) return "sample " + smp.name + " before the HELP of " + fam;
    std::string err = enter_family(fam);
    if (!err.empty()) return err;
    std::string key = smp.name + "{";
    for (const auto& [k, v] : smp.labels) key += k + "=\"" + v + "\",";
    if (!series_.insert(key).second) return "duplicate series " + key;
    const bool counts = f.type == "counter" || suffix == "_bucket" || suffix == "_count";
    if (counts && !(smp.value >= 0)) return "negative or NaN count in " + smp.name;
    if (f.type == "histogram" && (suffix == "_bucket") != (smp.labels.count("le") == 1)) {
      return "le label on a non-bucket sample, or a bucket without le: " + smp.name;
    }
    f.samples.push_back(std::move(smp));
    return "";
  }

  std::string check_families() {
    for (const auto& [name, f] : out_->families) {
      if (!f.has_type || !f.has_help) return "family " + name + " lacks HELP or TYPE";
      if (f.type != "histogram") continue;
      // Group by labels without le, keeping the order of appearance.
      struct Series {
        std::vector<std::pair<double, double>> buckets;  // (le, count)
        bool has_sum = false, has_count = false;
        double count = 0;
      };
      std::map<std::map<std::string, std::string>, Series> series;
      for (const PromSample& s : f.samples) {
        auto labels = s.labels;
        labels.erase("le");
        Series& g = series[labels];
        if (s.name == name + "_bucket") {
          double le;
          if (!parse_prom_float(s.labels.at("le"), &le) || std::isnan(le)) {
            return "bad le in " + name;
          }
          g.buckets.emplace_back(le, s.value);
        } else if (s.name == name + "_sum") {
          g.has_sum = true;
        } else {
          g.has_count = true;
          g.count = s.value;
        }
      }
      for (const auto& [labels, g] : series) {
        if (g.buckets.empty() || !g.has_sum || !g.has_count) {
          return "histogram " + name + " series lacks buckets, _sum or _count";
        }
        for (std::size_t i = 1; i < g.buckets.size(); ++i) {
          if (!(g.buckets[i].first > g.buckets[i - 1].first)) return name + ": le not increasing";
          if (g.buckets[i].second < g.buckets[i - 1].second) return name + ": buckets decrease";
        }
        if (!std::isinf(g.buckets.back().first)) return name + ": no +Inf bucket last";
        if (g.buckets.back().second != g.count) return name + ": +Inf bucket != _count";
      }
    }
    return "";
  }

  PromText* out_ = nullptr;
  std::string current_;
  std::set<std::string> closed_;
  std::set<std::string> series_;
};

std::string parse_prometheus(std::string_view text, PromText* out) {
  return PrometheusParser().parse(text, out);
}

// ---- Test data -----------------------------------------------------------------------

const std::vector<std::string>& awkward_names() {
  static const std::vector<std::string> names = {
      "plain",
      "quo\"te",
      "back\\slash",
      "trailing\\",
      "new\nline",
      "tab\tcr\r",
      "x\",le=\"1",  // label injection attempt
      "\x01"
      "ctrl\x1f\x7f",
      "\xc3\xbc"
      "n"
      "\xc3\xaf"
      "c"
      "\xc3\xb8"
      "d"
      "\xc3\xa9"
      " \xe2\x9c\x93 \xf0\x9f\x8e\x89",  // valid UTF-8
      "bad\xff\xc0"
      "byte",                   // invalid UTF-8: two replaced bytes
      "cut\xe2\x9c",            // truncated sequence
      "surrogate\xed\xa0\x80",  // encoded surrogate: invalid
  };
  return names;
}

struct Populated {
  MetricsData data;
  std::vector<std::vector<std::uint64_t>> queue_wait_values;  // per handler
};

Populated populated(bool snapshots) {
  Populated p;
  MetricsData& m = p.data;
  std::mt19937_64 rng(test_seed(6));
  std::uint64_t k = 1;
  for (const std::string& name : awkward_names()) {
    HandlerMetricsData h;
    h.name = name;
    h.submitted = 1000 * k;
    h.started = 1000 * k + 1;
    h.done = 1000 * k + 2;
    h.retried = 1000 * k + 3;
    h.failed = 1000 * k + 4;
    h.dead = 1000 * k + 5;
    h.cancelled = 1000 * k + 6;
    h.stuck = 1000 * k + 7;
    LatencyHistogram wait, run;
    std::vector<std::uint64_t> waits;
    for (int i = 0; i < 2000; ++i) {
      // 10 ns .. ~2 h, log-uniform, plus the exact boundaries.
      const std::uint64_t v =
          static_cast<std::uint64_t>(std::exp(2.3 + (rng() % 1'000'000) * 2.7e-5));
      waits.push_back(v);
      wait.record(v);
      run.record(v / 3);
    }
    for (const std::uint64_t v : {1000ull, 2500ull, 1'000'000'000ull, 999ull, 1023ull}) {
      waits.push_back(v);
      wait.record(v);
    }
    wait.add_to(h.queue_wait);
    run.add_to(h.run_time);
    p.queue_wait_values.push_back(std::move(waits));
    m.handlers.push_back(std::move(h));
    ++k;
  }
  m.pending[0] = 11;
  m.pending[1] = 12;
  m.pending[2] = 13;
  m.delayed = 14;
  m.running = 3;
  m.dead = 16;
  m.stuck_now = 17;
  m.oldest_pending_age_seconds = 1.25;
  m.capacity = 65536;
  m.workers = 8;
  m.workers_alive = 7;
  m.healthy = true;
  m.rejected = 5;
  m.exceptions = 21;
  m.dropped = 22;
  m.recovered = 23;
  m.memory_waits = 24;
  LatencyHistogram lateness;
  for (std::uint64_t v : {500ull, 20'000ull, 20'000ull, 3'000'000ull, 7'000'000'000ull}) {
    lateness.record(v);
  }
  lateness.add_to(m.scheduler_lateness);
  m.has_snapshots = snapshots;
  m.snapshot_generation = 42;
  m.snapshot_age_seconds = 0.5;
  m.snapshot_duration_seconds = 0.125;
  m.snapshot_bytes = 123456789;
  m.snapshot_failures = 2;
  m.durable_age_seconds = 3.5;
  return p;
}

const std::vector<std::pair<std::string, std::string>>& expected_families(bool snapshots) {
  static const std::vector<std::pair<std::string, std::string>> base = {
      {"jobengine_jobs_submitted_total", "counter"},
      {"jobengine_jobs_started_total", "counter"},
      {"jobengine_jobs_done_total", "counter"},
      {"jobengine_jobs_retried_total", "counter"},
      {"jobengine_jobs_failed_total", "counter"},
      {"jobengine_jobs_dead_total", "counter"},
      {"jobengine_jobs_cancelled_total", "counter"},
      {"jobengine_jobs_stuck_total", "counter"},
      {"jobengine_queue_wait_seconds", "histogram"},
      {"jobengine_run_seconds", "histogram"},
      {"jobengine_pending", "gauge"},
      {"jobengine_delayed", "gauge"},
      {"jobengine_running", "gauge"},
      {"jobengine_dead", "gauge"},
      {"jobengine_stuck", "gauge"},
      {"jobengine_oldest_pending_age_seconds", "gauge"},
      {"jobengine_capacity", "gauge"},
      {"jobengine_workers", "gauge"},
      {"jobengine_workers_alive", "gauge"},
      {"jobengine_up", "gauge"},
      {"jobengine_rejected_total", "counter"},
      {"jobengine_exceptions_total", "counter"},
      {"jobengine_dropped_total", "counter"},
      {"jobengine_recovered_total", "counter"},
      {"jobengine_worker_memory_waits_total", "counter"},
      {"jobengine_scheduler_lateness_seconds", "histogram"},
  };
  static const std::vector<std::pair<std::string, std::string>> with = [] {
    auto v = base;
    v.insert(v.end(), {{"jobengine_snapshot_generation", "gauge"},
                       {"jobengine_snapshot_age_seconds", "gauge"},
                       {"jobengine_snapshot_duration_seconds", "gauge"},
                       {"jobengine_snapshot_bytes", "gauge"},
                       {"jobengine_snapshot_failures_total", "counter"},
                       {"jobengine_snapshot_unchanged_total", "counter"},
                       {"jobengine_snapshot_durable_age_seconds", "gauge"}});
    return v;
  }();
  return snapshots ? with : base;
}

// The documented le boundaries, in ns.
const std::vector<std::uint64_t> kLeNs = {1'000,           2'500,           5'000,
                                          10'000,          25'000,          50'000,
                                          100'000,         250'000,         500'000,
                                          1'000'000,       2'500'000,       5'000'000,
                                          10'000'000,      25'000'000,      50'000'000,
                                          100'000'000,     250'000'000,     500'000'000,
                                          1'000'000'000,   2'500'000'000,   5'000'000'000,
                                          10'000'000'000,  30'000'000'000,  60'000'000'000,
                                          300'000'000'000, 600'000'000'000, 3'600'000'000'000};

const PromSample* find_sample(const PromFamily& f, const std::string& name,
                              const std::map<std::string, std::string>& labels) {
  for (const PromSample& s : f.samples) {
    if (s.name == name && s.labels == labels) return &s;
  }
  return nullptr;
}

// ---- Prometheus rendering -----------------------------------------------------------------

TEST(PrometheusFormat, PopulatedOutputPassesTheStrictParser) {
  for (const bool snapshots : {false, true}) {
    SCOPED_TRACE(snapshots ? "with snapshots" : "without snapshots");
    const Populated p = populated(snapshots);
    const std::string text = format_prometheus(p.data);
    PromText parsed;
    ASSERT_EQ(parse_prometheus(text, &parsed), "") << text;

    std::vector<std::pair<std::string, std::string>> got;
    for (const std::string& name : parsed.order) {
      got.emplace_back(name, parsed.families.at(name).type);
      EXPECT_FALSE(parsed.families.at(name).help.empty()) << name;
      if (parsed.families.at(name).type == "counter") {
        EXPECT_TRUE(name.size() > 6 && name.substr(name.size() - 6) == "_total") << name;
      }
    }
    EXPECT_EQ(got, expected_families(snapshots));
  }
}

TEST(PrometheusFormat, HandlerLabelsRoundTripEscaped) {
  const Populated p = populated(false);
  const std::string text = format_prometheus(p.data);
  PromText parsed;
  ASSERT_EQ(parse_prometheus(text, &parsed), "");
  // The reference sanitizer, pinned on the awkward cases.
  EXPECT_EQ(sanitized("bad\xff\xc0"
                      "byte"),
            "bad\xef\xbf\xbd\xef\xbf\xbd"
            "byte");
  EXPECT_EQ(sanitized("cut\xe2\x9c"), "cut\xef\xbf\xbd\xef\xbf\xbd");
  EXPECT_EQ(sanitized("surrogate\xed\xa0\x80"), "surrogate\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd");
  EXPECT_EQ(sanitized("quo\"te \xe2\x9c\x93"), "quo\"te \xe2\x9c\x93");
  const PromFamily& f = parsed.families.at("jobengine_jobs_done_total");
  ASSERT_EQ(f.samples.size(), awkward_names().size());
  for (std::size_t i = 0; i < awkward_names().size(); ++i) {
    const PromSample& s = f.samples[i];
    ASSERT_EQ(s.labels.size(), 1u);
    EXPECT_EQ(s.labels.at("handler"), sanitized(awkward_names()[i])) << i;
    EXPECT_EQ(s.raw_value, std::to_string(1000 * (i + 1) + 2));
  }
  // Each counter family carries its own field.
  const char* fields[] = {"submitted", "started", "done",      "retried",
                          "failed",    "dead",    "cancelled", "stuck"};
  for (std::uint64_t j = 0; j < 8; ++j) {
    const PromFamily& c = parsed.families.at(std::string("jobengine_jobs_") + fields[j] + "_total");
    ASSERT_EQ(c.samples.size(), awkward_names().size());
    EXPECT_EQ(c.samples[0].value, static_cast<double>(1000 + j)) << fields[j];
  }
}

TEST(PrometheusFormat, HistogramBucketsAreConservativeCumulativeCounts) {
  const Populated p = populated(false);
  const std::string text = format_prometheus(p.data);
  PromText parsed;
  ASSERT_EQ(parse_prometheus(text, &parsed), "");
  const PromFamily& f = parsed.families.at("jobengine_queue_wait_seconds");
  for (std::size_t h = 0; h < p.data.handlers.size(); ++h) {
    const std::string label = sanitized(p.data.handlers[h].name);
    const std::vector<std::uint64_t>& values = p.queue_wait_values[h];
    std::vector<const PromSample*> buckets;
    for (const PromSample& s : f.samples) {
      if (s.name == "jobengine_queue_wait_seconds_bucket" && s.labels.at("handler") == label) {
        buckets.push_back(&s);
      }
    }
    ASSERT_EQ(buckets.size(), kLeNs.size() + 1);
    for (std::size_t b = 0; b < kLeNs.size(); ++b) {
      const std::uint64_t le = kLeNs[b];
      EXPECT_EQ(std::llround(std::stod(buckets[b]->labels.at("le")) * 1e9),
                static_cast<long long>(le));
      // Exactly the values whose fine bucket lies wholly at or below le:
      // each one <= le, and every value more than a fine bucket below le.
      std::uint64_t expect = 0, at_or_below = 0, well_below = 0;
      for (const std::uint64_t v : values) {
        expect += upper(bucket(v)) <= le;
        at_or_below += v <= le;
        well_below += v + le / 16 < le;
      }
      EXPECT_EQ(buckets[b]->value, static_cast<double>(expect)) << "le " << le;
      EXPECT_LE(expect, at_or_below);
      EXPECT_GE(expect, well_below);
    }
    EXPECT_EQ(buckets.back()->labels.at("le"), "+Inf");
    EXPECT_EQ(buckets.back()->value, static_cast<double>(values.size()));
    const PromSample* sum =
        find_sample(f, "jobengine_queue_wait_seconds_sum", {{"handler", label}});
    ASSERT_NE(sum, nullptr);
    double exact_sum = 0;
    for (const std::uint64_t v : values) exact_sum += static_cast<double>(v);
    EXPECT_NEAR(sum->value, exact_sum / 1e9, exact_sum / 1e9 * 1e-12);
  }
  // The engine-wide histogram has no labels but le.
  const PromFamily& lat = parsed.families.at("jobengine_scheduler_lateness_seconds");
  const PromSample* c = find_sample(lat, "jobengine_scheduler_lateness_seconds_count", {});
  ASSERT_NE(c, nullptr);
  EXPECT_EQ(c->value, 5);
  const PromSample* b =
      find_sample(lat, "jobengine_scheduler_lateness_seconds_bucket", {{"le", "5e-05"}});
  ASSERT_NE(b, nullptr);
  EXPECT_EQ(b->value, 3);  // 500 ns and twice 20 us
}

TEST(PrometheusFormat, GaugesAndCountersCarryTheirValues) {
  Populated p = populated(true);
  p.data.oldest_pending_age_seconds = std::numeric_limits<double>::quiet_NaN();
  p.data.snapshot_age_seconds = std::numeric_limits<double>::infinity();
  const std::string text = format_prometheus(p.data);
  PromText parsed;
  ASSERT_EQ(parse_prometheus(text, &parsed), "");
  const auto value = [&](const std::string& fam,
                         const std::map<std::string, std::string>& labels = {}) {
    const PromSample* s = find_sample(parsed.families.at(fam), fam, labels);
    EXPECT_NE(s, nullptr) << fam;
    return s == nullptr ? std::string("?") : s->raw_value;
  };
  EXPECT_EQ(value("jobengine_pending", {{"priority", "0"}}), "11");
  EXPECT_EQ(value("jobengine_pending", {{"priority", "2"}}), "13");
  EXPECT_EQ(value("jobengine_delayed"), "14");
  EXPECT_EQ(value("jobengine_running"), "3");
  EXPECT_EQ(value("jobengine_dead"), "16");
  EXPECT_EQ(value("jobengine_stuck"), "17");
  EXPECT_EQ(value("jobengine_oldest_pending_age_seconds"), "NaN");
  EXPECT_EQ(value("jobengine_capacity"), "65536");
  EXPECT_EQ(value("jobengine_workers"), "8");
  EXPECT_EQ(value("jobengine_workers_alive"), "7");
  EXPECT_EQ(value("jobengine_up"), "1");
  EXPECT_EQ(value("jobengine_rejected_total"), "5");
  EXPECT_EQ(value("jobengine_exceptions_total"), "21");
  EXPECT_EQ(value("jobengine_dropped_total"), "22");
  EXPECT_EQ(value("jobengine_recovered_total"), "23");
  EXPECT_EQ(value("jobengine_worker_memory_waits_total"), "24");
  EXPECT_EQ(value("jobengine_snapshot_generation"), "42");
  EXPECT_EQ(value("jobengine_snapshot_age_seconds"), "+Inf");
  EXPECT_EQ(value("jobengine_snapshot_duration_seconds"), "0.125");
  EXPECT_EQ(value("jobengine_snapshot_bytes"), "123456789");
  EXPECT_EQ(value("jobengine_snapshot_failures_total"), "2");
  EXPECT_EQ(value("jobengine_snapshot_durable_age_seconds"), "3.5");
}

TEST(PrometheusFormat, EmptyMetricsAreValid) {
  const std::string text = format_prometheus(MetricsData{});
  PromText parsed;
  ASSERT_EQ(parse_prometheus(text, &parsed), "") << text;
  EXPECT_TRUE(parsed.families.at("jobengine_jobs_done_total").samples.empty());
  EXPECT_EQ(parsed.families.at("jobengine_up").samples.at(0).raw_value, "0");
  EXPECT_EQ(parsed.families.count("jobengine_snapshot_generation"), 0u);
}

TEST(PrometheusFormat, RandomHandlerNamesRenderValidAndRoundTrip) {
  const std::uint64_t seed = test_seed(7);
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  MetricsData m;
  std::set<std::string> seen;
  while (m.handlers.size() < 300) {
    HandlerMetricsData h;
    const std::size_t len = 1 + rng() % 12;
    for (std::size_t i = 0; i < len; ++i) {
      // Bytes 1..255, biased towards the awkward ones.
      static constexpr char kAwkward[] = {'"', '\\', '\n', '\r', ','};
      h.name +=
          rng() % 4 == 0 ? kAwkward[rng() % sizeof kAwkward] : static_cast<char>(1 + rng() % 255);
    }
    // Distinct after sanitizing, or the series would collide.
    if (!seen.insert(sanitized(h.name)).second) continue;
    h.done = m.handlers.size();
    m.handlers.push_back(std::move(h));
  }
  PromText parsed;
  ASSERT_EQ(parse_prometheus(format_prometheus(m), &parsed), "");
  const PromFamily& f = parsed.families.at("jobengine_jobs_done_total");
  ASSERT_EQ(f.samples.size(), m.handlers.size());
  nlohmann::json j;
  ASSERT_NO_THROW(j = nlohmann::json::parse(format_json(m)));
  for (std::size_t i = 0; i < m.handlers.size(); ++i) {
    EXPECT_EQ(f.samples[i].labels.at("handler"), sanitized(m.handlers[i].name)) << i;
    EXPECT_EQ(f.samples[i].value, static_cast<double>(i));
    EXPECT_EQ(j.at("handlers").at(i).at("name").get<std::string>(), sanitized(m.handlers[i].name))
        << i;
  }
}

// ---- The parser rejects broken texts ----------------------------------------------------

// Replaces the first occurrence of from (which must exist).
std::string replace_once(std::string text, const std::string& from, const std::string& to) {
  const std::size_t at = text.find(from);
  EXPECT_NE(at, std::string::npos) << "mutation anchor missing: " << from;
  if (at != std::string::npos) text.replace(at, from.size(), to);
  return text;
}

std::string replace_all(std::string text, const std::string& from, const std::string& to) {
  for (std::size_t at = 0; (at = text.find(from, at)) != std::string::npos; at += to.size()) {
    text.replace(at, from.size(), to);
  }
  return text;
}

// The whole line that starts with prefix, with its line feed.
std::string line_starting(const std::string& text, const std::string& prefix) {
  std::size_t at = text.rfind('\n' + prefix);
  EXPECT_NE(at, std::string::npos) << prefix;
  if (at == std::string::npos) return "<missing>";
  ++at;
  return text.substr(at, text.find('\n', at) + 1 - at);
}

TEST(PrometheusParser, RejectsEachMutationOfAValidText) {
  const std::string good = format_prometheus(populated(false).data);
  PromText ignored;
  ASSERT_EQ(parse_prometheus(good, &ignored), "");
  const std::string lat = "jobengine_scheduler_lateness_seconds";
  const std::string running_sample = line_starting(good, "jobengine_running ");
  ASSERT_EQ(running_sample, "jobengine_running 3\n");

  const std::vector<std::pair<std::string, std::function<std::string(std::string)>>> mutations = {
      {"TYPE line missing",
       [](std::string t) { return replace_once(t, "# TYPE jobengine_running gauge\n", ""); }},
      {"HELP line missing",
       [&](std::string t) {
         return replace_once(t, line_starting(t, "# HELP jobengine_running "), "");
       }},
      {"TYPE after the sample",
       [](std::string t) {
         t = replace_once(t, "# TYPE jobengine_running gauge\n", "");
         return replace_once(t, "jobengine_running 3\n",
                             "jobengine_running 3\n# TYPE jobengine_running gauge\n");
       }},
      {"family declared twice",
       [](std::string t) {
         return t + "# HELP jobengine_running again\n# TYPE jobengine_running gauge\n";
       }},
      {"second TYPE line",
       [](std::string t) {
         return replace_once(t, "# TYPE jobengine_running gauge\n",
                             "# TYPE jobengine_running gauge\n# TYPE jobengine_running gauge\n");
       }},
      {"second HELP line",
       [&](std::string t) {
         const std::string help = line_starting(t, "# HELP jobengine_running ");
         return replace_once(t, help, help + help);
       }},
      {"sample of an undeclared family", [](std::string t) { return t + "jobengine_mystery 1\n"; }},
      {"family lines not contiguous",
       [](std::string t) { return t + "jobengine_pending{priority=\"9\"} 1\n"; }},
      {"duplicate series",
       [](std::string t) {
         return replace_once(t, "jobengine_running 3\n",
                             "jobengine_running 3\njobengine_running 3\n");
       }},
      {"bad metric name",
       [](std::string t) { return replace_all(t, "jobengine_delayed", "jobengine.delayed"); }},
      {"metric name starting with a digit",
       [](std::string t) { return replace_all(t, "jobengine_delayed", "9jobengine_delayed"); }},
      {"unknown TYPE",
       [](std::string t) {
         return replace_once(t, "# TYPE jobengine_running gauge",
                             "# TYPE jobengine_running gauges");
       }},
      {"unescaped quote in a label value",
       [](std::string t) { return replace_once(t, "quo\\\"te", "quo\"te"); }},
      {"unknown escape in a label value",
       [](std::string t) { return replace_once(t, "new\\nline", "new\\tline"); }},
      {"raw line feed in a label value",
       [](std::string t) { return replace_once(t, "new\\nline", "new\nline"); }},
      {"invalid UTF-8 in a label value",
       [](std::string t) { return replace_once(t, "bad\xef\xbf\xbd", "bad\xff"); }},
      {"unquoted label value",
       [](std::string t) { return replace_once(t, "{priority=\"0\"}", "{priority=0}"); }},
      {"bad label name",
       [](std::string t) { return replace_once(t, "{priority=\"0\"}", "{prio-rity=\"0\"}"); }},
      {"unterminated label list",
       [](std::string t) { return replace_once(t, "{priority=\"0\"}", "{priority=\"0\""); }},
      {"value not a number",
       [](std::string t) {
         return replace_once(t, "jobengine_running 3\n", "jobengine_running three\n");
       }},
      {"lower-case nan",
       [](std::string t) {
         return replace_once(t, "jobengine_running 3\n", "jobengine_running nan\n");
       }},
      {"no space before the value",
       [](std::string t) {
         return replace_once(t, "jobengine_running 3\n", "jobengine_running3\n");
       }},
      {"two spaces before the value",
       [](std::string t) {
         return replace_once(t, "jobengine_running 3\n", "jobengine_running  3\n");
       }},
      {"negative counter",
       [](std::string t) {
         return replace_once(t, "jobengine_rejected_total 5\n", "jobengine_rejected_total -5\n");
       }},
      {"missing final line feed", [](std::string t) { return t.substr(0, t.size() - 1); }},
      {"+Inf bucket differs from _count",
       [&](std::string t) { return replace_once(t, lat + "_count 5\n", lat + "_count 6\n"); }},
      {"buckets decrease",
       [&](std::string t) {
         return replace_once(t, lat + "_bucket{le=\"10\"} 5\n", lat + "_bucket{le=\"10\"} 999\n");
       }},
      {"le not increasing",
       [&](std::string t) {
         return replace_once(t, lat + "_bucket{le=\"5\"} ", lat + "_bucket{le=\"50\"} ");
       }},
      {"+Inf bucket missing",
       [&](std::string t) { return replace_once(t, lat + "_bucket{le=\"+Inf\"} 5\n", ""); }},
      {"_sum missing",
       [&](std::string t) { return replace_once(t, line_starting(t, lat + "_sum "), ""); }},
      {"bucket without le",
       [&](std::string t) {
         return replace_once(t, lat + "_bucket{le=\"+Inf\"} 5\n", lat + "_bucket 5\n");
       }},
      {"bad le value",
       [&](std::string t) {
         return replace_once(t, lat + "_bucket{le=\"5\"} ", lat + "_bucket{le=\"five\"} ");
       }},
  };
  for (const auto& [what, mutate] : mutations) {
    const std::string bad = mutate(good);
    ASSERT_NE(bad, good) << what << ": the mutation changed nothing";
    PromText parsed;
    const std::string err = parse_prometheus(bad, &parsed);
    EXPECT_NE(err, "") << "accepted a text with: " << what;
    std::printf("%-36s -> %s\n", what.c_str(), err.c_str());
  }
}

// ---- JSON rendering --------------------------------------------------------------------

void expect_histogram_json(const nlohmann::json& j, const HistogramData& h) {
  EXPECT_EQ(j.at("count").get<std::uint64_t>(), h.count);
  EXPECT_EQ(j.at("sum_ns").get<std::uint64_t>(), h.sum_ns);
  EXPECT_EQ(j.at("p50_ns").get<std::uint64_t>(), h.quantile(0.5));
  EXPECT_EQ(j.at("p90_ns").get<std::uint64_t>(), h.quantile(0.9));
  EXPECT_EQ(j.at("p99_ns").get<std::uint64_t>(), h.quantile(0.99));
  EXPECT_EQ(j.at("p999_ns").get<std::uint64_t>(), h.quantile(0.999));
  EXPECT_EQ(j.at("max_ns").get<std::uint64_t>(), h.max_ns);
  EXPECT_EQ(j.size(), 7u);
}

TEST(JsonFormat, ParsesAndCarriesEveryFigure) {
  const Populated p = populated(true);
  const MetricsData& m = p.data;
  const std::string text = format_json(m);
  nlohmann::json j;
  ASSERT_NO_THROW(j = nlohmann::json::parse(text)) << text;  // also checks UTF-8
  ASSERT_TRUE(j.is_object());
  EXPECT_EQ(j.at("healthy"), true);
  EXPECT_EQ(j.at("workers"), 8);
  EXPECT_EQ(j.at("workers_alive"), 7);
  EXPECT_EQ(j.at("capacity"), 65536);
  EXPECT_EQ(j.at("pending"), nlohmann::json::array({11, 12, 13}));
  EXPECT_EQ(j.at("delayed"), 14);
  EXPECT_EQ(j.at("running"), 3);
  EXPECT_EQ(j.at("dead"), 16);
  EXPECT_EQ(j.at("stuck"), 17);
  EXPECT_EQ(j.at("oldest_pending_age_seconds"), 1.25);
  EXPECT_EQ(j.at("rejected"), 5);
  EXPECT_EQ(j.at("exceptions"), 21);
  EXPECT_EQ(j.at("dropped"), 22);
  EXPECT_EQ(j.at("recovered"), 23);
  EXPECT_EQ(j.at("memory_waits"), 24);
  expect_histogram_json(j.at("scheduler_lateness"), m.scheduler_lateness);
  const nlohmann::json& s = j.at("snapshot");
  EXPECT_EQ(s.at("generation"), 42);
  EXPECT_EQ(s.at("age_seconds"), 0.5);
  EXPECT_EQ(s.at("duration_seconds"), 0.125);
  EXPECT_EQ(s.at("bytes"), 123456789);
  EXPECT_EQ(s.at("failures"), 2);
  EXPECT_EQ(s.at("durable_age_seconds"), 3.5);

  const nlohmann::json& hs = j.at("handlers");
  ASSERT_TRUE(hs.is_array());
  ASSERT_EQ(hs.size(), m.handlers.size());
  for (std::size_t i = 0; i < hs.size(); ++i) {
    const HandlerMetricsData& h = m.handlers[i];
    EXPECT_EQ(hs[i].at("name").get<std::string>(), sanitized(h.name)) << i;
    EXPECT_EQ(hs[i].at("submitted"), h.submitted);
    EXPECT_EQ(hs[i].at("started"), h.started);
    EXPECT_EQ(hs[i].at("done"), h.done);
    EXPECT_EQ(hs[i].at("retried"), h.retried);
    EXPECT_EQ(hs[i].at("failed"), h.failed);
    EXPECT_EQ(hs[i].at("dead"), h.dead);
    EXPECT_EQ(hs[i].at("cancelled"), h.cancelled);
    EXPECT_EQ(hs[i].at("stuck"), h.stuck);
    expect_histogram_json(hs[i].at("queue_wait"), h.queue_wait);
    expect_histogram_json(hs[i].at("run_time"), h.run_time);
  }
  // Control characters are escaped, never raw.
  EXPECT_NE(text.find("\\u0001ctrl\\u001f\x7f"), std::string::npos);
  EXPECT_NE(text.find("tab\\tcr\\r"), std::string::npos);
  EXPECT_NE(text.find("bad\\ufffd\\ufffdbyte"), std::string::npos);
}

TEST(JsonFormat, NonFiniteBecomesNullAndSnapshotsAreOmitted) {
  MetricsData m;
  m.oldest_pending_age_seconds = std::numeric_limits<double>::quiet_NaN();
  const std::string text = format_json(m);
  nlohmann::json j;
  ASSERT_NO_THROW(j = nlohmann::json::parse(text)) << text;
  EXPECT_TRUE(j.at("oldest_pending_age_seconds").is_null());
  EXPECT_EQ(j.count("snapshot"), 0u);
  EXPECT_EQ(j.at("healthy"), false);
  EXPECT_TRUE(j.at("handlers").empty());
  expect_histogram_json(j.at("scheduler_lateness"), HistogramData{});
}

// ---- A live engine's output ---------------------------------------------------------

TEST(EngineMetrics, LiveEngineTextPassesTheStrictParserAndJsonParses) {
  EngineOptions o;
  o.workers = 1;
  o.capacity = 256;
  o.retry.initial_backoff = std::chrono::nanoseconds(0);
  auto engine = Engine::open(o);
  ASSERT_TRUE(engine.ok());
  auto ok = engine->register_handler("img \"thumb\"", [](JobContext&) { return Outcome::kDone; });
  auto bad = engine->register_handler("mail\\n", [](JobContext& job) {
    return job.attempt() < 2 ? Outcome::kRetry : Outcome::kFail;
  });
  ASSERT_TRUE(ok.ok() && bad.ok());
  ASSERT_TRUE(engine->start().ok());
  for (int i = 0; i < 50; ++i) ASSERT_TRUE(engine->submit(*ok, "").ok());
  ASSERT_TRUE(engine->submit(*bad, "").ok());
  for (int i = 0; i < 2000 && engine->health().pending != 0; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  ASSERT_EQ(engine->health().pending, 0u);
  PromText parsed;
  const std::string text = engine->metrics_text();
  const std::string error = parse_prometheus(text, &parsed);
  EXPECT_EQ(error, "") << text;
  const auto j = nlohmann::json::parse(engine->metrics_json());
  ASSERT_TRUE(j.contains("handlers"));
  ASSERT_EQ(j.at("handlers").size(), 2u);
  EXPECT_EQ(j.at("handlers")[0].at("done").get<std::uint64_t>(), 50u);
  EXPECT_EQ(j.at("handlers")[1].at("retried").get<std::uint64_t>(), 1u);
  EXPECT_EQ(j.at("handlers")[1].at("failed").get<std::uint64_t>(), 1u);
  // Every handler call is counted once, whatever it ended in.
  EXPECT_EQ(j.at("handlers")[0].at("started").get<std::uint64_t>(), 50u);
  EXPECT_EQ(j.at("handlers")[1].at("started").get<std::uint64_t>(), 2u);
}

// Runs `jobs` jobs of one handler on one worker and returns its metrics_json()
// entry once they all ran.
nlohmann::json RunAndReadHandler(EngineOptions o, Handler handler, int jobs) {
  o.workers = 1;
  o.capacity = 4096;
  auto engine = Engine::open(o);
  EXPECT_TRUE(engine.ok());
  if (!engine.ok()) return {};
  auto h = engine->register_handler("h", std::move(handler));
  EXPECT_TRUE(h.ok());
  EXPECT_TRUE(engine->start().ok());
  for (int i = 0; i < jobs; ++i) EXPECT_TRUE(engine->submit(*h, "").ok());
  for (int i = 0; i < 2000 && engine->health().done != static_cast<std::uint64_t>(jobs); ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  EXPECT_EQ(engine->health().done, static_cast<std::uint64_t>(jobs));
  EXPECT_TRUE(engine->stop().ok());
  return nlohmann::json::parse(engine->metrics_json()).at("handlers")[0];
}

std::uint64_t Count(const nlohmann::json& handler, const char* histogram) {
  return handler.at(histogram).at("count").get<std::uint64_t>();
}

TEST(EngineMetrics, TimeEveryRunTimesEveryRunExactly) {
  EngineOptions o;
  o.time_every_run = true;
  const auto h = RunAndReadHandler(o, [](JobContext&) { return Outcome::kDone; }, 1000);
  EXPECT_EQ(h.at("started").get<std::uint64_t>(), 1000u);
  EXPECT_EQ(Count(h, "run_time"), 1000u);
  EXPECT_EQ(Count(h, "queue_wait"), 1000u);
}

// Fast runs are timed one in 128, each timed run weighted by the runs it
// stands for: the histograms count every run but the (under 128) untimed ones
// since the last timed run.
TEST(EngineMetrics, SampledTimingWeighsTimedRunsByTheRunsTheyStandFor) {
  const auto h = RunAndReadHandler({}, [](JobContext&) { return Outcome::kDone; }, 1000);
  EXPECT_EQ(h.at("started").get<std::uint64_t>(), 1000u);
  const std::uint64_t runs = Count(h, "run_time");
  EXPECT_LE(runs, 1000u);
  EXPECT_GT(runs, 1000u - 128);
  EXPECT_EQ(Count(h, "queue_wait"), runs);
  // When no timed run reached 1 us (a native build; not always under a
  // sanitizer or an emulator), runs 0, 128, ..., 896 were the timed ones:
  // the 103 after the last are not counted yet.
  if (h.at("run_time").at("max_ns").get<std::uint64_t>() < 1000) {
    EXPECT_EQ(runs, 897u);
  }
}

// A handler whose runs take over a microsecond has every run timed.
TEST(EngineMetrics, SlowRunsAreAllTimed) {
  const auto h = RunAndReadHandler(
      {},
      [](JobContext&) {
        const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(3);
        while (std::chrono::steady_clock::now() < until) {
        }
        return Outcome::kDone;
      },
      200);
  EXPECT_EQ(Count(h, "run_time"), 200u);
  EXPECT_EQ(Count(h, "queue_wait"), 200u);
  // Every one of them at least the 3 us it spun (p50 is a bucket's upper bound).
  EXPECT_GE(h.at("run_time").at("p50_ns").get<std::uint64_t>(), 3000u);
}

}  // namespace
}  // namespace jobengine::detail
