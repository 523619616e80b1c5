#include "engine/clock.h"

#include <chrono>
#include <mutex>

#if defined(__x86_64__)
#include <cpuid.h>
#endif

namespace jobengine::detail {

std::int64_t Clock::steady_ns() noexcept {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

namespace {
#if defined(__x86_64__)
bool invariant_tsc() noexcept {
  unsigned eax, ebx, ecx, edx;
  if (__get_cpuid(0x80000000u, &eax, &ebx, &ecx, &edx) == 0 || eax < 0x80000007u) return false;
  __get_cpuid(0x80000007u, &eax, &ebx, &ecx, &edx);
  return (edx & (1u << 8)) != 0;  // "TscInvariant": constant rate, runs in every C-state
}
#endif
}  // namespace

void Clock::init() noexcept {
  static std::once_flag once;
  std::call_once(once, [] {
#if defined(__x86_64__)
    if (invariant_tsc()) {
      // Calibrate over ~2 ms of steady_clock; each end takes the tightest of
      // a few bracketed reads, so the rate is good to ~1e-5.
      auto sample = [](std::uint64_t& tsc, std::int64_t& ns) {
        std::uint64_t best = ~std::uint64_t{0};
        for (int i = 0; i < 5; ++i) {
          std::uint64_t a = __rdtsc();
          std::int64_t n = steady_ns();
          std::uint64_t b = __rdtsc();
          if (b - a < best) {
            best = b - a;
            tsc = a + (b - a) / 2;
            ns = n;
          }
        }
      };
      std::uint64_t t0 = 0, t1 = 0;
      std::int64_t n0 = 0, n1 = 0;
      sample(t0, n0);
      while (steady_ns() - n0 < 2'000'000) {
      }
      sample(t1, n1);
      if (t1 > t0 && n1 > n0) {
        mult_ = static_cast<std::uint64_t>(
            (static_cast<Uint128>(n1 - n0) << 32) / (t1 - t0));
        reanchor_ticks_ = (t1 - t0) * 500;  // 2 ms * 500 = 1 s
        source_ = Source::kTsc;
      }
    }
#elif defined(__aarch64__)
    std::uint64_t freq;
    asm volatile("mrs %0, cntfrq_el0" : "=r"(freq));
    if (freq != 0) {
      mult_ = static_cast<std::uint64_t>((static_cast<Uint128>(1'000'000'000) << 32) /
                                         freq);
      reanchor_ticks_ = freq;  // 1 s
      source_ = Source::kArmCounter;
    }
#endif
    if (source_ != Source::kSteady) {
      // ticks_in_ns() multiplies by 2^64 / mult_ instead of dividing by mult_
      // (a 128-bit division costs ~30 ns; recovery converts two times per job).
      inv_mult_ = static_cast<std::uint64_t>((static_cast<Uint128>(1) << 64) / mult_);
      reanchor();
    }
  });
}

void Clock::reanchor() noexcept {
  std::uint32_t s = anchor_.seq.load(std::memory_order_relaxed);
  // One writer at a time; a busy or failed claim leaves it to the other.
  if ((s & 1u) != 0 ||
      !anchor_.seq.compare_exchange_strong(s, s + 1, std::memory_order_acquire,
                                           std::memory_order_relaxed)) {
    return;
  }
  // Release fence: a reader that sees the new data also sees seq odd first.
  std::atomic_thread_fence(std::memory_order_release);
  anchor_.ticks.store(ticks(), std::memory_order_relaxed);
  anchor_.ns.store(steady_ns(), std::memory_order_relaxed);
  anchor_.seq.store(s + 2, std::memory_order_release);
}

std::int64_t Clock::to_steady_ns(std::uint64_t t) noexcept {
  if (source_ == Source::kSteady) return static_cast<std::int64_t>(t - kTickBias);
  for (;;) {
    // Seqlock read: acquire on seq, relaxed data, acquire fence, seq again.
    const std::uint32_t s1 = anchor_.seq.load(std::memory_order_acquire);
    const std::uint64_t at = anchor_.ticks.load(std::memory_order_relaxed);
    const std::int64_t an = anchor_.ns.load(std::memory_order_relaxed);
    std::atomic_thread_fence(std::memory_order_acquire);
    if ((s1 & 1u) != 0 || anchor_.seq.load(std::memory_order_relaxed) != s1) continue;
    const bool stale = t > at ? t - at > reanchor_ticks_ : at - t > reanchor_ticks_;
    if (stale && ticks() - at > reanchor_ticks_) {
      reanchor();
      continue;
    }
    if (t >= at) {
      return an + static_cast<std::int64_t>((static_cast<Uint128>(t - at) * mult_) >> 32);
    }
    return an - static_cast<std::int64_t>((static_cast<Uint128>(at - t) * mult_) >> 32);
  }
}

Clock::Converter Clock::converter() noexcept {
  Converter c;
  if (source_ == Source::kSteady) return c;
  const std::uint64_t now = ticks();
  // to_steady_ns() re-anchors a stale anchor; then read the anchor stably.
  (void)to_steady_ns(now);
  for (;;) {
    const std::uint32_t s1 = anchor_.seq.load(std::memory_order_acquire);
    c.anchor_ticks = anchor_.ticks.load(std::memory_order_relaxed);
    c.anchor_ns = anchor_.ns.load(std::memory_order_relaxed);
    std::atomic_thread_fence(std::memory_order_acquire);
    if ((s1 & 1u) == 0 && anchor_.seq.load(std::memory_order_relaxed) == s1) break;
  }
  c.mult = mult_;
  return c;
}

}  // namespace jobengine::detail
