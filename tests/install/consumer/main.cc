// Runs 10 jobs through an installed jobengine and checks that all ran.
#include <jobengine/engine.h>

#include <atomic>
#include <cstdio>
#include <string>

int main() {
  jobengine::EngineOptions options;
  options.workers = 2;
  options.capacity = 64;
  auto engine = jobengine::Engine::open(options);
  if (!engine) {
    std::fprintf(stderr, "open: %s\n", engine.status().to_string().c_str());
    return 1;
  }
  std::atomic<int> ran{0};
  auto handler = engine->register_handler("count", [&ran](jobengine::JobContext& job) {
    if (job.payload().substr(0, 4) == "job-") ran.fetch_add(1);
    return jobengine::Outcome::kDone;
  });
  if (!handler) {
    std::fprintf(stderr, "register_handler: %s\n", handler.status().to_string().c_str());
    return 1;
  }
  if (auto started = engine->start(); !started) {
    std::fprintf(stderr, "start: %s\n", started.status().to_string().c_str());
    return 1;
  }
  for (int i = 0; i < 10; ++i) {
    auto id = engine->submit(*handler, "job-" + std::to_string(i));
    if (!id) {
      std::fprintf(stderr, "submit: %s\n", id.status().to_string().c_str());
      return 1;
    }
  }
  auto report = engine->stop(jobengine::StopMode::kDrain);
  if (!report) {
    std::fprintf(stderr, "stop: %s\n", report.status().to_string().c_str());
    return 1;
  }
  if (ran.load() != 10 || report->done != 10) {
    std::fprintf(stderr, "expected 10 jobs to run, %d ran (done=%llu)\n", ran.load(),
                 static_cast<unsigned long long>(report->done));
    return 1;
  }
  std::printf("consumer: 10 jobs ran\n");
  return 0;
}
