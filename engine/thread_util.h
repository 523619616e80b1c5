// Thread placement: naming and pinning the engine's threads.
//
// Names follow "jobengine-<role><n>" (Linux allows 15 characters), so `top -H`
// and perf show which thread is which. Pinning uses pthread_setaffinity_np.
#pragma once

#include <pthread.h>

#include <string>
#include <string_view>
#include <vector>

#include "jobengine/status.h"

namespace jobengine::detail {

// The CPUs a new thread of this process may be pinned to, ascending (probed
// with pthread_setaffinity_np on a short-lived thread: accurate whatever the
// calling thread's own mask, the cpuset or offline CPUs). Costs one thread.
std::vector<int> allowed_cpus();

// Checks that every cpu in `cpus` is one this process may run on. The error
// names the first bad entry and the allowed set.
Status check_cpus(const std::vector<int>& cpus);

// Names `thread` (truncated to 15 bytes) and, when cpu >= 0, pins it to `cpu`.
// kIoError names the thread, the cpu and the errno text.
Status place_thread(pthread_t thread, std::string_view name, int cpu);

// Human-readable list "0-3,6".
std::string format_cpu_list(const std::vector<int>& cpus);

}  // namespace jobengine::detail
