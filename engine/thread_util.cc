#include "engine/thread_util.h"

#include <sched.h>
#include <unistd.h>

#include <cstring>
#include <string>
#include <system_error>
#include <thread>

namespace jobengine::detail {

std::vector<int> allowed_cpus() {
  // A thread's affinity mask is per thread (the caller may itself be pinned),
  // so the mask of any one thread does not say where a *new* thread may go.
  // Ask the kernel instead: a probe thread tries to move to each configured
  // CPU; sched_setaffinity refuses CPUs outside the process's cpuset and
  // offline ones with EINVAL.
  std::vector<int> out;
  long configured = sysconf(_SC_NPROCESSORS_CONF);
  if (configured < 1) configured = 1;
  if (configured > CPU_SETSIZE) configured = CPU_SETSIZE;
  try {
    std::thread probe([&out, configured] {
      for (int cpu = 0; cpu < configured; ++cpu) {
        cpu_set_t set;
        CPU_ZERO(&set);
        CPU_SET(cpu, &set);
        if (pthread_setaffinity_np(pthread_self(), sizeof(set), &set) == 0) out.push_back(cpu);
      }
    });
    probe.join();
  } catch (const std::system_error&) {
    // No thread to probe with: fall back to the caller's own mask.
    cpu_set_t set;
    CPU_ZERO(&set);
    if (sched_getaffinity(0, sizeof(set), &set) == 0) {
      for (int cpu = 0; cpu < CPU_SETSIZE; ++cpu) {
        if (CPU_ISSET(cpu, &set)) out.push_back(cpu);
      }
    }
  }
  return out;
}

std::string format_cpu_list(const std::vector<int>& cpus) {
  std::string out;
  for (std::size_t i = 0; i < cpus.size();) {
    std::size_t j = i;
    while (j + 1 < cpus.size() && cpus[j + 1] == cpus[j] + 1) ++j;
    if (!out.empty()) out += ',';
    out += std::to_string(cpus[i]);
    if (j > i) out += '-' + std::to_string(cpus[j]);
    i = j + 1;
  }
  return out;
}

Status check_cpus(const std::vector<int>& cpus) {
  if (cpus.empty()) return Status();
  const std::vector<int> allowed = allowed_cpus();
  for (std::size_t i = 0; i < cpus.size(); ++i) {
    int cpu = cpus[i];
    bool ok = false;
    for (int a : allowed) ok = ok || a == cpu;
    if (!ok) {
      return Status(StatusCode::kInvalidArgument,
                    "cpus[" + std::to_string(i) + "] = " + std::to_string(cpu) +
                        " is not a CPU this process may run on (allowed: " +
                        format_cpu_list(allowed) + ")");
    }
  }
  return Status();
}

Status place_thread(pthread_t thread, std::string_view name, int cpu) {
  std::string short_name(name.substr(0, 15));
  int rc = pthread_setname_np(thread, short_name.c_str());
  if (rc != 0) {
    return Status(StatusCode::kIoError,
                  "pthread_setname_np(" + short_name + "): " + std::strerror(rc));
  }
  if (cpu >= 0) {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    rc = pthread_setaffinity_np(thread, sizeof(set), &set);
    if (rc != 0) {
      return Status(StatusCode::kIoError, "pinning thread " + short_name + " to cpu " +
                                              std::to_string(cpu) + ": " + std::strerror(rc));
    }
  }
  return Status();
}

}  // namespace jobengine::detail
