// The demo scenario end to end, with its claims checked from outside the
// demo: the built jobengine-demo and jobsnap run as child processes; the
// snapshots are read with the library's own loader (snapshot_tools, what the
// next Engine::open() loads); what ran comes from the demo's journal (one
// write(2) per line, so it survives the SIGKILLs) and its report files.
//
//   ScenarioStepByStep: the demo crashes on its poison job (SIGKILL while the
//     job runs); the snapshot the restart loads holds it as running at the
//     cut; restarts crash on it again until, past max_recoveries, it is
//     quarantined as dead "poison"; every other job that snapshot held ran
//     after the crash; jobsnap drop removes the poison job and the next start
//     is clean.
//   ScriptTellsTheStoryAndItsChecksPass: tools/demo.sh, the README's main
//     command's scenario, exits 0 with its "OK:" line.
//
// A child that hangs is killed by SIGALRM after kChildSeconds and the test
// fails saying so; no timing decides a pass (the poison job itself waits for
// a published snapshot, not for a time).
#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "jobengine/snapshot_format.h"
#include "jobengine/snapshot_tools.h"
#include "persistence/shm_store.h"

namespace jobengine {
namespace {

namespace fs = std::filesystem;
namespace st = snapshot_tools;
using json = nlohmann::json;
using snapshot::DeadReason;
using snapshot::JobState;

constexpr unsigned kChildSeconds = 180;
constexpr unsigned kMaxRecoveries = 2;
constexpr int kKilled = 128 + SIGKILL;

struct RunResult {
  int code = -1;
  std::string output;  // stdout and stderr together
  std::string args;
};

std::ostream& operator<<(std::ostream& os, const RunResult& r) {
  return os << r.args << "\n  exit " << r.code << "\n  output:\n" << r.output;
}

std::string Slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

// Runs argv[0] with its arguments; exit code 128 + N if killed by signal N.
RunResult RunChild(const std::vector<std::string>& args, const std::string& out_path) {
  RunResult r;
  for (const auto& a : args) r.args += (r.args.empty() ? "" : " ") + a;
  std::vector<std::string> argv_s = args;
  std::vector<char*> argv;
  for (auto& a : argv_s) argv.push_back(a.data());
  argv.push_back(nullptr);
  const pid_t pid = ::fork();
  if (pid == 0) {
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);  // never outlive the test
    const int in = ::open("/dev/null", O_RDONLY);
    const int out = ::open(out_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
    if (in < 0 || out < 0 || ::dup2(in, 0) < 0 || ::dup2(out, 1) < 0 || ::dup2(out, 2) < 0) {
      ::_exit(125);
    }
    ::alarm(kChildSeconds);  // survives exec: a hang ends as SIGALRM
    ::execv(argv[0], argv.data());
    ::_exit(126);
  }
  int status = 0;
  if (pid > 0) ::waitpid(pid, &status, 0);
  r.output = Slurp(out_path);
  if (pid < 0) return r;
  if (WIFEXITED(status)) r.code = WEXITSTATUS(status);
  if (WIFSIGNALED(status)) r.code = 128 + WTERMSIG(status);
  if (r.code == 128 + SIGALRM) r.output += "\n(killed after " + std::to_string(kChildSeconds) + " s)";
  return r;
}

bool Contains(const std::string& haystack, const std::string& needle) {
  return haystack.find(needle) != std::string::npos;
}

// One line of the demo's journal, split on spaces.
std::vector<std::vector<std::string>> Journal(const std::string& path) {
  std::vector<std::vector<std::string>> lines;
  std::istringstream in(Slurp(path));
  std::string line;
  while (std::getline(in, line)) {
    std::istringstream words(line);
    std::vector<std::string> w;
    std::string word;
    while (words >> word) w.push_back(word);
    if (!w.empty()) lines.push_back(std::move(w));
  }
  return lines;
}

json Report(const std::string& path) {
  json j = json::parse(Slurp(path), nullptr, /*allow_exceptions=*/false);
  EXPECT_FALSE(j.is_discarded()) << path << " is not JSON:\n" << Slurp(path);
  return j;
}

class DemoTest : public ::testing::Test {
 protected:
  void SetUp() override {
    static std::atomic<int> counter{0};
    const std::string tag = std::to_string(::getpid()) + "-" + std::to_string(counter++);
    work_ = (fs::temp_directory_path() / ("jobengine-demo-test-" + tag)).string();
    fs::remove_all(work_);
    fs::create_directories(work_);
    dir_ = work_ + "/snapshots";
    shm_ = "jobengine-demo-test-" + tag;
  }
  void TearDown() override {
    (void)persist::ShmStore::remove(shm_);
    if (!HasFailure()) fs::remove_all(work_);  // kept for a look when it failed
  }

  // jobengine-demo with the scenario's snapshot options and `extra`.
  RunResult Demo(const std::string& name, std::vector<std::string> extra) {
    std::vector<std::string> args = {JOBENGINE_DEMO_PATH, "--dir", dir_, "--shm", shm_,
                                     "--max-recoveries", std::to_string(kMaxRecoveries),
                                     "--status-interval", "0",
                                     "--journal", work_ + "/journal-" + name + ".log",
                                     "--report", work_ + "/report-" + name + ".json"};
    args.insert(args.end(), extra.begin(), extra.end());
    RunResult r = RunChild(args, work_ + "/output-" + name + ".txt");
    ExpectNoSanitizerReport(r);
    return r;
  }

  // A sanitizer build reports into the child's output; a report from a child
  // that was SIGKILLed afterwards would otherwise go unnoticed.
  static void ExpectNoSanitizerReport(const RunResult& r) {
    EXPECT_FALSE(Contains(r.output, "Sanitizer") || Contains(r.output, "runtime error:")) << r;
  }

  // What the next engine start loads, by the engine's own loader.
  st::Image LoadNext() {
    auto image = st::load(st::Source{dir_, std::nullopt, shm_});
    EXPECT_TRUE(image.ok()) << image.status().to_string();
    return image.ok() ? std::move(*image) : st::Image();
  }

  std::string work_, dir_, shm_;
};

const snapshot::JobRecordView* Find(const st::Image& image, JobId id) {
  for (const auto& j : image.view.jobs) {
    if (j.id == id) return &j;
  }
  return nullptr;
}

TEST_F(DemoTest, ScenarioStepByStep) {
  // 1. Under load, the poison job kills the process.
  const RunResult first =
      Demo("1", {"--jobs", "3000", "--rate", "3000", "--poison", "--poison-at", "800"});
  ASSERT_EQ(first.code, kKilled) << first;
  JobId poison = 0;
  for (const auto& w : Journal(work_ + "/journal-1.log")) {
    if (w[0] == "X" && poison == 0) poison = std::stoull(w[1]);
  }
  ASSERT_NE(poison, 0u) << "no poison job ran:\n" << first;
  EXPECT_TRUE(Contains(first.output, "crashed on a malformed image")) << first;

  // 2. The snapshot the restart will load holds it as running at the cut.
  st::Image held = LoadNext();
  ASSERT_FALSE(held.source.empty());
  std::set<JobId> live;
  for (const auto& j : held.view.jobs) {
    if (j.state != JobState::kDead) live.insert(j.id);
  }
  const auto* p = Find(held, poison);
  ASSERT_NE(p, nullptr) << "generation " << held.view.header.generation << " lacks the poison job";
  EXPECT_EQ(p->state, JobState::kRunningAtCut);
  EXPECT_EQ(p->recoveries, 0u);

  // 3. Restarts crash on it again, max_recoveries times; the next one
  //    quarantines it and drains.
  std::set<JobId> ran_after_crash;
  int crashes = 1;
  int run = 1;
  for (;;) {
    ++run;
    ASSERT_LE(run, static_cast<int>(kMaxRecoveries) + 3) << "never quarantined";
    const st::Image next = LoadNext();
    const auto* pj = Find(next, poison);
    ASSERT_NE(pj, nullptr);
    if (run - 2 < static_cast<int>(kMaxRecoveries) + 1) {
      EXPECT_EQ(pj->state, JobState::kRunningAtCut) << "before restart " << run - 1;
      EXPECT_EQ(pj->recoveries, static_cast<std::uint32_t>(run - 2)) << "before restart " << run - 1;
    }
    const std::string name = std::to_string(run);
    const RunResult r = Demo(name, {"--resume-only"});
    const json report = Report(work_ + "/report-" + name + ".json");
    EXPECT_EQ(report["recovery"]["generation"].get<std::uint64_t>(), next.view.header.generation)
        << "the demo loaded another generation than the loader says:\n" << r;
    if (run == 2) {
      // The engine restored exactly the live jobs jobsnap/the loader saw.
      const auto& rec = report["recovery"];
      EXPECT_EQ(rec["pending"].get<std::uint64_t>() + rec["delayed"].get<std::uint64_t>() +
                    rec["running_at_cut"].get<std::uint64_t>() +
                    rec["poisoned"].get<std::uint64_t>(),
                live.size());
      EXPECT_GE(rec["running_at_cut"].get<std::uint64_t>(), 1u);
    }
    for (const auto& w : Journal(work_ + "/journal-" + name + ".log")) {
      if (w[0] == "R") ran_after_crash.insert(std::stoull(w[1]));
      if (w[0] == "X") {
        EXPECT_EQ(std::stoull(w[1]), poison);
      }
    }
    if (r.code == 0) {
      EXPECT_EQ(report["recovery"]["poisoned"], 1) << r;
      // Every job that came back ran to done: none failed, none left.
      EXPECT_EQ(report["counts"]["done"], report["counts"]["recovered"]) << r;
      EXPECT_EQ(report["counts"]["failed"], 0) << r;
      EXPECT_EQ(report["counts"]["dead"], 1) << r;
      break;
    }
    ASSERT_EQ(r.code, kKilled) << r;
    EXPECT_EQ(report["recovery"]["poisoned"], 0) << r;
    ++crashes;
  }
  EXPECT_EQ(crashes, static_cast<int>(kMaxRecoveries) + 1);

  // 4. No job lost that the loaded snapshot held: each ran after the crash.
  std::vector<JobId> missing;
  for (JobId id : live) {
    if (id != poison && !ran_after_crash.count(id)) missing.push_back(id);
  }
  EXPECT_TRUE(missing.empty()) << missing.size() << " of " << live.size()
                               << " jobs held by generation " << held.view.header.generation
                               << " never ran after the crash, e.g. job " << missing.front();
  EXPECT_FALSE(ran_after_crash.count(poison)) << "the poison job returned from its handler";

  // 5. Quarantined: dead, reason poison, past max_recoveries, and nothing else left.
  const st::Image after = LoadNext();
  ASSERT_EQ(after.view.jobs.size(), 1u);
  const auto& dead = after.view.jobs[0];
  EXPECT_EQ(dead.id, poison);
  EXPECT_EQ(dead.state, JobState::kDead);
  EXPECT_EQ(dead.dead_reason, DeadReason::kPoison);
  EXPECT_EQ(dead.recoveries, kMaxRecoveries + 1);

  // 6. jobsnap drop removes it; the next start finds nothing, no dead letter.
  const RunResult drop = RunChild({JOBSNAP_PATH, "drop", dir_, std::to_string(poison), "--shm", shm_},
                             work_ + "/output-drop.txt");
  ExpectNoSanitizerReport(drop);
  ASSERT_EQ(drop.code, 0) << drop;
  const st::Image dropped = LoadNext();
  EXPECT_EQ(dropped.view.jobs.size(), 0u);
  EXPECT_GT(dropped.view.header.generation, after.view.header.generation);
  const RunResult clean = Demo("final", {"--resume-only"});
  ASSERT_EQ(clean.code, 0) << clean;
  const json final_report = Report(work_ + "/report-final.json");
  EXPECT_EQ(final_report["recovery"]["generation"].get<std::uint64_t>(),
            dropped.view.header.generation);
  EXPECT_EQ(final_report["recovery"]["dead"], 0);
  EXPECT_EQ(final_report["recovery"]["poisoned"], 0);
  EXPECT_EQ(final_report["counts"]["dead"], 0);
}

TEST_F(DemoTest, ScriptTellsTheStoryAndItsChecksPass) {
  if (std::system("command -v python3 >/dev/null 2>&1") != 0) GTEST_SKIP() << "no python3";
  const std::string bin = fs::path(JOBENGINE_DEMO_PATH).parent_path().string();
  ASSERT_EQ(fs::path(JOBSNAP_PATH).parent_path().string(), bin);
  const RunResult r = RunChild({"/bin/bash", JOBENGINE_DEMO_SCRIPT, "--work", work_ + "/scenario",
                           "--shm", shm_, "--bin", bin},
                          work_ + "/output-script.txt");
  ExpectNoSanitizerReport(r);
  ASSERT_EQ(r.code, 0) << r;
  for (const char* step : {"== 1. A fresh start", "The service runs under load, then crashes",
                           "jobsnap list", "jobsnap inspect", "crashes again on the same job",
                           "quarantined as poison", "reason poison", "jobsnap drop",
                           "OK: "}) {
    EXPECT_TRUE(Contains(r.output, step)) << "no \"" << step << "\" in:\n" << r;
  }
  EXPECT_FALSE(Contains(r.output, "FAILED")) << r;
}

}  // namespace
}  // namespace jobengine
