// The engine clock: a timestamp cheap enough to take on every submit.
//
// steady_clock::now() costs ~20 ns (a vDSO call with its own scaling), as much
// as the rest of a submit. Where the CPU has a constant-rate counter the
// engine reads that instead -- rdtsc on x86-64 with an invariant TSC, cntvct_el0
// on aarch64 -- and converts ticks to steady_clock nanoseconds only where a
// person or an API needs them. Elsewhere ticks are steady_clock nanoseconds. Either
// way plus kTickBias (below).
//
// Conversion: ns = anchor_ns + (ticks - anchor_ticks) * mult >> 32. The x86
// rate is calibrated once against steady_clock (about 2 ms, on the first
// Engine::open); the anchor is re-taken whenever it is more than ~1 s older
// than the ticks being converted, so NTP's slewing of steady_clock and the
// calibration error cannot accumulate beyond that second (tens of us at worst).
#pragma once

#include <atomic>
#include <cstdint>

#if defined(__x86_64__)
#include <x86intrin.h>
#endif

namespace jobengine::detail {

// GCC and clang both have a 128-bit integer on 64-bit targets; __extension__
// keeps -Wpedantic quiet about it.
__extension__ typedef unsigned __int128 Uint128;

// The tick -> ns anchor, under a seqlock: seq is odd while a writer updates it.
struct ClockAnchor {
  std::atomic<std::uint32_t> seq{0};
  std::atomic<std::uint64_t> ticks{0};
  std::atomic<std::int64_t> ns{0};
};

// Every tick value is the counter's reading plus kTickBias. The counters start
// near zero at boot, and a job recovered after a reboot was submitted before
// that: the bias leaves room for its times (2^60 ticks: 6 years at 5.8 GHz,
// 36 years of steady_clock nanoseconds), which otherwise came back as the
// boot time. Durations (differences) are unchanged; 0 stays "no time".
inline constexpr std::uint64_t kTickBias = std::uint64_t{1} << 60;

// The longest span the engine places on its tick timeline: delays, retry
// back-offs and run deadlines beyond it count as 50 years. So a tick count
// "now + span" stays far from 2^64 at any counter rate up to 5.8 GHz (bias
// and years of uptime included), and converts to wall-clock nanoseconds
// without overflow (a user's nanoseconds::max() meaning "never" or
// "uncapped" stays that, in effect).
inline constexpr std::int64_t kMaxSpanNs = std::int64_t{50} * 36525 * 24 * 3600 * 10'000'000;

class Clock {
 public:
  // Chooses the source and calibrates it; idempotent and thread-safe.
  static void init() noexcept;

  static std::uint64_t ticks() noexcept {
#if defined(__x86_64__)
    if (source_ == Source::kTsc) return __rdtsc() + kTickBias;
#elif defined(__aarch64__)
    if (source_ == Source::kArmCounter) {
      std::uint64_t v;
      asm volatile("mrs %0, cntvct_el0" : "=r"(v));
      return v + kTickBias;
    }
#endif
    return static_cast<std::uint64_t>(steady_ns()) + kTickBias;
  }

  // Ticks to steady_clock nanoseconds (its time_since_epoch). Lock-free.
  static std::int64_t to_steady_ns(std::uint64_t ticks) noexcept;

  // A frozen copy of the current conversion, for converting many timestamps
  // at once (a snapshot's jobs): a multiply and a shift each, no seqlock.
  struct Converter {
    std::uint64_t anchor_ticks = 0;
    std::int64_t anchor_ns = 0;
    std::uint64_t mult = 0;  // 0: ticks are nanoseconds already
    std::int64_t operator()(std::uint64_t t) const noexcept {
      if (mult == 0) return static_cast<std::int64_t>(t - kTickBias);
      if (t >= anchor_ticks) {
        return anchor_ns + static_cast<std::int64_t>((static_cast<Uint128>(t - anchor_ticks) * mult) >> 32);
      }
      return anchor_ns - static_cast<std::int64_t>((static_cast<Uint128>(anchor_ticks - t) * mult) >> 32);
    }
  };
  static Converter converter() noexcept;

  static std::int64_t steady_ns() noexcept;

  // Nanoseconds in `ticks` ticks (a duration): a multiply and a shift, no
  // branch (with steady_clock as the source mult_ stays 2^32: the identity).
  static std::uint64_t ns_in_ticks(std::uint64_t ticks) noexcept {
    return static_cast<std::uint64_t>((static_cast<Uint128>(ticks) * mult_) >> 32);
  }

  // Ticks in `ns` nanoseconds (at most kMaxSpanNs), for placing a delay, a
  // deadline or a time read from a snapshot on this process's tick timeline.
  static std::uint64_t ticks_in_ns(std::int64_t ns) noexcept {
    if (ns <= 0) return 0;
    if (ns > kMaxSpanNs) ns = kMaxSpanNs;
    if (source_ == Source::kSteady) return static_cast<std::uint64_t>(ns);
    return static_cast<std::uint64_t>((static_cast<Uint128>(ns) * inv_mult_) >> 32);
  }

 private:
  enum class Source : std::uint8_t { kSteady, kTsc, kArmCounter };
  // Written once by init() before any engine thread exists (thread creation
  // orders it for them); plain reads afterwards.
  static inline Source source_ = Source::kSteady;
  static inline std::uint64_t mult_ = std::uint64_t{1} << 32;  // ns per tick << 32
  static inline std::uint64_t inv_mult_ = std::uint64_t{1} << 32;  // 2^64 / mult_
  static inline std::uint64_t reanchor_ticks_ = 0;              // ~1 s of ticks

  static inline ClockAnchor anchor_;
  static void reanchor() noexcept;
};

}  // namespace jobengine::detail
