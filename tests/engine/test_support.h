// Helpers the engine's tests share: bounded polling and a one-shot gate.
#pragma once

#include <chrono>
#include <condition_variable>
#include <mutex>
#include <thread>

namespace jobengine::testing_support {

inline constexpr std::chrono::milliseconds kWaitTimeout{30000};

// Polls `pred` until it holds or `timeout` passes; returns its last value.
template <typename Pred>
bool WaitUntil(Pred pred, std::chrono::milliseconds timeout = kWaitTimeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (!pred()) {
    if (std::chrono::steady_clock::now() > deadline) return pred();
    std::this_thread::sleep_for(std::chrono::microseconds(200));
  }
  return true;
}

// A one-shot gate a handler can wait on. The wait is bounded so that a failed
// test cannot keep a worker (and the engine's destructor) waiting forever.
class Gate {
 public:
  void open() {
    std::lock_guard<std::mutex> lock(mu_);
    open_ = true;
    cv_.notify_all();
  }
  bool wait() {
    std::unique_lock<std::mutex> lock(mu_);
    return cv_.wait_for(lock, kWaitTimeout, [this] { return open_; });
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  bool open_ = false;
};

// Opens the gate when it goes out of scope: declared after the engine, it
// runs before the engine's destructor, which drains and so needs the gate.
class GateOpener {
 public:
  explicit GateOpener(Gate& gate) : gate_(gate) {}
  ~GateOpener() { gate_.open(); }
  GateOpener(const GateOpener&) = delete;
  GateOpener& operator=(const GateOpener&) = delete;

 private:
  Gate& gate_;
};


}  // namespace jobengine::testing_support
