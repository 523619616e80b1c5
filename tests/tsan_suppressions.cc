// ThreadSanitizer suppressions, compiled into every test binary of a TSan
// build (tests/CMakeLists.txt adds this file only when -fsanitize=thread is
// in CMAKE_CXX_FLAGS); the TSan runtime calls this hook at start-up.
//
// moodycamel::ConcurrentQueue hands a block back from consumer to producer
// with relaxed flag stores/loads ordered by std::atomic_thread_fence, which
// TSan does not model: a producer re-filling a block that a consumer emptied
// with dequeue_bulk() is reported as a race on the element, though the fences
// order it. Upstream calls these false positives (cameron314/concurrentqueue
// issues #49, #62, #254) and annotates only some functions. The suppression
// is limited to races with ExplicitProducer::dequeue_bulk on one side, so a
// race on the engine's own data (job slots, counters) is still reported.
extern "C" const char* __tsan_default_suppressions() {
  return "race:moodycamel::ConcurrentQueue*::ExplicitProducer::dequeue_bulk\n";
}
