// Measuring tools the benchmark binaries share: a cheap timestamp and its
// calibration, a log-linear latency histogram, the list of CPUs this process
// may run on, and the process's memory figures.
#pragma once

#include <malloc.h>
#include <sched.h>
#include <unistd.h>

#include <array>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <x86intrin.h>
#endif

namespace jobengine::bench {

// A cheap timestamp: the TSC on x86-64, the virtual counter on aarch64,
// steady_clock elsewhere; ticks_per_ns() converts.
inline std::uint64_t stamp() noexcept {
#if defined(__x86_64__) || defined(__i386__)
  return __rdtsc();
#elif defined(__aarch64__)
  std::uint64_t v;
  asm volatile("mrs %0, cntvct_el0" : "=r"(v));
  return v;
#else
  return static_cast<std::uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(
                                        std::chrono::steady_clock::now().time_since_epoch())
                                        .count());
#endif
}

// stamp() ticks per nanosecond, measured once (over 20 ms) against
// steady_clock. Thread-safe (a function-local static).
inline double ticks_per_ns() {
  static const double rate = [] {
    const auto t0 = std::chrono::steady_clock::now();
    const std::uint64_t c0 = stamp();
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    const std::uint64_t c1 = stamp();
    const auto t1 = std::chrono::steady_clock::now();
    const double ns =
        static_cast<double>(std::chrono::duration_cast<std::chrono::nanoseconds>(t1 - t0).count());
    return ns <= 0 ? 1.0 : static_cast<double>(c1 - c0) / ns;
  }();
  return rate;
}

// Log-linear histogram of tick counts: exact below 128, then 64 buckets per
// power of two (<= 1.6% error). No allocation after construction; one writer
// at a time (not thread-safe). About 30 KiB: allocate it on the heap.
class LatencyHistogram {
 public:
  static constexpr unsigned kSubBits = 6;
  static constexpr std::size_t kSub = std::size_t{1} << kSubBits;
  static constexpr std::size_t kBuckets = kSub * (64 - kSubBits) + 2 * kSub;

  void record(std::uint64_t v) noexcept {
    if (v < 2 * kSub) {
      ++counts_[v];
      return;
    }
    const unsigned msb = 63u - static_cast<unsigned>(__builtin_clzll(v));
    const unsigned shift = msb - kSubBits;
    ++counts_[kSub * shift + (v >> shift)];
  }

  void clear() noexcept { counts_.fill(0); }

  std::uint64_t total() const noexcept {
    std::uint64_t n = 0;
    for (std::uint64_t c : counts_) n += c;
    return n;
  }

  // The value (bucket midpoint) at quantile q in [0, 1]; 0 when empty.
  double quantile(double q) const noexcept {
    const std::uint64_t n = total();
    if (n == 0) return 0;
    auto rank = static_cast<std::uint64_t>(q * static_cast<double>(n));
    if (rank >= n) rank = n - 1;
    std::uint64_t seen = 0;
    for (std::size_t i = 0; i < kBuckets; ++i) {
      seen += counts_[i];
      if (seen > rank) return midpoint(i);
    }
    return midpoint(kBuckets - 1);
  }

  double max() const noexcept {
    for (std::size_t i = kBuckets; i-- > 0;) {
      if (counts_[i] != 0) return midpoint(i);
    }
    return 0;
  }

 private:
  static double midpoint(std::size_t i) noexcept {
    if (i < 2 * kSub) return static_cast<double>(i);
    const std::size_t shift = i / kSub - 1;
    const std::size_t mantissa = i - kSub * shift;
    const double low =
        static_cast<double>(mantissa) * static_cast<double>(std::uint64_t{1} << shift);
    return low + static_cast<double>(std::uint64_t{1} << shift) / 2.0;
  }

  std::array<std::uint64_t, kBuckets> counts_{};
};

// The CPUs this process may run on (sched_getaffinity), in ascending order;
// computed once. Empty if the kernel does not say.
inline const std::vector<int>& allowed_cpus() {
  static const std::vector<int> cpus = [] {
    std::vector<int> out;
    cpu_set_t set;
    CPU_ZERO(&set);
    if (sched_getaffinity(0, sizeof(set), &set) != 0) return out;
    for (int cpu = 0; cpu < CPU_SETSIZE; ++cpu) {
      if (CPU_ISSET(cpu, &set)) out.push_back(cpu);
    }
    return out;
  }();
  return cpus;
}

// The CPU for the k-th thread of a run that places its threads round-robin
// over allowed_cpus() (submitters first, then workers): -1 (unpinned) when
// fewer than two CPUs are allowed, as cpu_plan() does, since pinning every
// thread to one CPU would measure the scheduler.
inline int round_robin_cpu(unsigned k) {
  const std::vector<int>& cpus = allowed_cpus();
  if (cpus.size() < 2) return -1;
  return cpus[k % cpus.size()];
}

// What the process holds in memory, read from the allocator and the kernel.
struct MemoryUse {
  std::uint64_t heap_bytes = 0;  // malloc'ed and not freed (mallinfo2: uordblks + hblkhd)
  std::uint64_t rss_bytes = 0;   // resident set (/proc/self/statm)
};

inline MemoryUse memory_use() {
  MemoryUse m;
  const struct mallinfo2 mi = mallinfo2();
  m.heap_bytes = static_cast<std::uint64_t>(mi.uordblks) + static_cast<std::uint64_t>(mi.hblkhd);
  if (std::FILE* f = std::fopen("/proc/self/statm", "r")) {
    unsigned long long size = 0;
    unsigned long long resident = 0;
    if (std::fscanf(f, "%llu %llu", &size, &resident) == 2) {
      m.rss_bytes = resident * static_cast<std::uint64_t>(::sysconf(_SC_PAGESIZE));
    }
    std::fclose(f);
  }
  return m;
}

}  // namespace jobengine::bench
