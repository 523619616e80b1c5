// Test-only seams: points where the engine calls a hook so that a test can
// force an interleaving that a race makes rare. Each is nullptr outside tests,
// and read with one relaxed load on a path that is not the hot one.
#pragma once

#include <atomic>

#include "jobengine/job.h"  // JobId

namespace jobengine::detail {

// Called by a worker in after_handler() once it found the job's cancel bit
// clear, before it acts on the handler's outcome (a retry's scheduling, say).
inline std::atomic<void (*)(JobId)> g_after_cancel_check{nullptr};

// Called by a worker that marked a retry queued (no backoff) or waiting to
// retry, before it hands the job on to a queue or to the scheduler.
inline std::atomic<void (*)(JobId)> g_retry_marked{nullptr};

// Called by a worker whose job just failed for good, with the dead-letter
// lock held, after the letter went in and before the slot is retired.
inline std::atomic<void (*)(JobId)> g_dead_letter_in{nullptr};

// Called by cancel() once its CAS set the job's cancel bit (and the heavy
// fence ran), before it reads the job's state.
inline std::atomic<void (*)(JobId)> g_cancel_after_cas{nullptr};

// Called by a worker with a batch it dequeued, before any of its jobs is
// marked running (once per batch: a load and a branch there), with the id of
// the batch's first job.
inline std::atomic<void (*)(JobId)> g_before_batch{nullptr};

// Called by the snapshot thread in end_cut(), before it lowers the reclaim
// horizon (the cut still holds every slot retired since it began).
inline std::atomic<void (*)()> g_before_end_cut{nullptr};

// Called by the snapshot thread once a snapshot's shared-memory image is
// committed (published), before the same snapshot's disk publish.
inline std::atomic<void (*)()> g_after_shm_commit{nullptr};

}  // namespace jobengine::detail
