// The benchmarks of sweep_bench.cc whose shape depends on the machine: they
// are registered at run time, from main(), once the allowed CPUs are known.
#pragma once

#include <vector>

namespace jobengine::bench {

// Submitter and worker counts the sweep uses: 1, 2, 4, ... below the number
// of allowed CPUs n, then n and 2n (oversubscribed).
std::vector<unsigned> sweep_thread_counts();

// Registers Sweep/... and OpenLoop/... (see sweep_bench.cc).
void register_sweep_and_open_loop();

}  // namespace jobengine::bench
