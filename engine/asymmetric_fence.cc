#include "engine/asymmetric_fence.h"

#include <linux/membarrier.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdlib>
#include <mutex>

namespace jobengine::detail {

std::atomic<bool> g_membarrier_ok{false};

namespace {
long membarrier(int cmd) { return syscall(__NR_membarrier, cmd, 0, 0); }
}  // namespace

bool asymmetric_fence_init() noexcept {
  static std::once_flag once;
  std::call_once(once, [] {
    long supported = membarrier(MEMBARRIER_CMD_QUERY);
    bool ok = supported >= 0 && (supported & MEMBARRIER_CMD_PRIVATE_EXPEDITED) != 0 &&
              membarrier(MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED) == 0;
    // Relaxed is enough: init runs in open(), before the engine's threads
    // exist; thread creation orders it before anything they do.
    g_membarrier_ok.store(ok, std::memory_order_relaxed);
  });
  return g_membarrier_ok.load(std::memory_order_relaxed);
}

void asymmetric_fence_heavy() noexcept {
  if (g_membarrier_ok.load(std::memory_order_relaxed)) {
    // Our own thread is ordered by the syscall's own barrier too; the fence
    // makes that explicit for the compiler.
    std::atomic_thread_fence(std::memory_order_seq_cst);
    if (membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED) == 0) return;
    // Registration succeeded, so failure here is not expected; fall through
    // to a plain fence would NOT be enough for light sides that issued only a
    // compiler barrier, so abort loudly rather than risk a lost wake-up.
    std::abort();
  }
  std::atomic_thread_fence(std::memory_order_seq_cst);
}

}  // namespace jobengine::detail
