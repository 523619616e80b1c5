// Asymmetric thread fences: a light side for hot paths, a heavy side for the
// rare thread that must synchronise with them.
//
// The engine's hot paths (submit, a worker finding work) need store->load
// ordering against rare events (stop closing intake, a worker going to sleep,
// later a snapshot cutting an epoch). A seq_cst fence on every submit costs
// tens of cycles (mfence / dmb ish). Instead the frequent side issues
// asymmetric_fence_light() -- a compiler barrier only -- and the rare side
// issues asymmetric_fence_heavy(), which runs membarrier(2)
// MEMBARRIER_CMD_PRIVATE_EXPEDITED: the kernel makes every running thread of
// this process execute a full memory barrier before it returns. The pair then
// orders like two seq_cst fences (the scheme of folly's AsymmetricThreadFence
// and of Linux userspace RCU).
//
// Where membarrier is unavailable (old kernel, seccomp), enable() reports it
// and both sides fall back to std::atomic_thread_fence(seq_cst): slower, never
// wrong. The choice is made once per process, before any engine thread runs.
#pragma once

#include <atomic>

namespace jobengine::detail {

// True when the heavy side may use membarrier. Set once, by
// asymmetric_fence_init(); read relaxed on every light fence.
extern std::atomic<bool> g_membarrier_ok;

// Registers the process for expedited membarrier (idempotent, thread-safe).
// Returns whether the fast scheme is in use.
bool asymmetric_fence_init() noexcept;

// Frequent side. A compiler barrier when membarrier is in use, else a full
// fence. Must pair with asymmetric_fence_heavy() on the rare side.
inline void asymmetric_fence_light() noexcept {
  if (g_membarrier_ok.load(std::memory_order_relaxed)) {
    std::atomic_signal_fence(std::memory_order_seq_cst);
  } else {
    std::atomic_thread_fence(std::memory_order_seq_cst);
  }
}

// Rare side: costs a system call and an IPI to each CPU running this process
// (a few microseconds).
void asymmetric_fence_heavy() noexcept;

}  // namespace jobengine::detail
