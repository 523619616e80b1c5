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
//   SigintTakesAFinalSnapshotThenDiesOfIt: Ctrl-C stops the demo with a final
//     snapshot holding every job accepted and not done, and the demo dies of
//     SIGINT (so a script running it stops too); a restart runs those jobs.
//   ScriptStopsAtCtrlC / ScriptLeavesNoServiceRunningWhenItDies: tools/demo.sh
//     stops with status 130 at a Ctrl-C, and a signal that kills the script
//     (SIGALRM, as this test's own alarm) stops the jobengine-demo it started.
//   ScriptsRefuseAWorkDirectoryTheyDidNotMake: tools/demo.sh and tools/run.sh
//     (--work resolved from the caller's directory) delete nothing there.
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

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <string>
#include <thread>
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
  bool signalled = false;  // ChildOptions::signal was sent
};

struct ChildOptions {
  std::string cwd;  // where the child runs; empty: here
  // Polled every 5 ms while the child runs; once it returns true, `signal`
  // is sent, to the child's process group if `to_group` (as a terminal's
  // Ctrl-C is: the child runs as a group leader), else to the child alone.
  std::function<bool()> signal_when;
  int signal = 0;
  bool to_group = false;
};

std::ostream& operator<<(std::ostream& os, const RunResult& r) {
  return os << r.args << "\n  exit " << r.code << "\n  output:\n" << r.output;
}

std::string Slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

// Runs argv[0] with its arguments; exit code 128 + N if killed by signal N.
RunResult RunChild(const std::vector<std::string>& args, const std::string& out_path,
                   const ChildOptions& options = {}) {
  RunResult r;
  for (const auto& a : args) r.args += (r.args.empty() ? "" : " ") + a;
  std::vector<std::string> argv_s = args;
  std::vector<char*> argv;
  for (auto& a : argv_s) argv.push_back(a.data());
  argv.push_back(nullptr);
  const pid_t pid = ::fork();
  if (pid == 0) {
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);  // never outlive the test
    if (options.to_group) ::setpgid(0, 0);
    if (!options.cwd.empty() && ::chdir(options.cwd.c_str()) != 0) ::_exit(124);
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
  if (pid > 0 && options.to_group) ::setpgid(pid, pid);  // either side may run first
  if (pid > 0 && options.signal_when) {
    for (;;) {
      if (::waitpid(pid, &status, WNOHANG) == pid) break;  // ended before the signal
      if (options.signal_when()) {
        ::kill(options.to_group ? -pid : pid, options.signal);
        r.signalled = true;
        ::waitpid(pid, &status, 0);
        break;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
  } else if (pid > 0) {
    ::waitpid(pid, &status, 0);
  }
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

// True once the journal at `path` has its START line and `submits` S lines.
bool JournalReached(const std::string& path, std::size_t submits) {
  const std::string text = Slurp(path);
  if (!Contains(text, "START ")) return false;
  std::size_t n = 0;
  for (std::size_t at = text.find("\nS "); at != std::string::npos; at = text.find("\nS ", at + 1)) {
    ++n;
  }
  return n >= submits;
}

// The pid on the journal's START line; 0 if none.
pid_t StartPid(const std::string& path) {
  const std::string text = Slurp(path);
  const auto at = text.find("START pid=");
  return at == std::string::npos ? 0 : static_cast<pid_t>(std::atoi(text.c_str() + at + 10));
}

// Whether process `pid` still runs (a zombie does not).
bool Running(pid_t pid) {
  if (::kill(pid, 0) != 0 && errno == ESRCH) return false;
  const std::string stat = Slurp("/proc/" + std::to_string(pid) + "/stat");
  const auto paren = stat.rfind(')');
  return paren != std::string::npos && paren + 2 < stat.size() && stat[paren + 2] != 'Z';
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
  std::set<JobId> live, held_ids;
  for (const auto& j : held.view.jobs) {
    held_ids.insert(j.id);
    if (j.state != JobState::kDead) live.insert(j.id);
  }
  const auto* p = Find(held, poison);
  ASSERT_NE(p, nullptr) << "generation " << held.view.header.generation << " lacks the poison job";
  EXPECT_EQ(p->state, JobState::kRunningAtCut);
  EXPECT_EQ(p->recoveries, 0u);

  // 3. Restarts crash on it again, max_recoveries times; the next one
  //    quarantines it and drains. A job ran when a run of it ended done (a
  //    run that ended retry leaves it to run again).
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
      if (w[0] == "R" && w.size() > 4 && w[4] == "done") ran_after_crash.insert(std::stoull(w[1]));
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

  // 4b. What the crash lost: only jobs accepted after the snapshot's cut. One
  //     producer thread journals each S line after submit() returned, so S
  //     order is acceptance order: every job accepted before the last one the
  //     snapshot holds is in it (dead ones too) or finished before the crash.
  std::map<JobId, std::size_t> order;  // job id -> its place among the S lines
  std::set<JobId> done_before;
  for (const auto& w : Journal(work_ + "/journal-1.log")) {
    if (w[0] == "S") order.emplace(std::stoull(w[1]), order.size());
    if (w[0] == "R" && w.size() > 4 && w[4] == "done") done_before.insert(std::stoull(w[1]));
  }
  std::size_t last_held = 0;  // the place of the last held job, plus one
  for (JobId id : held_ids) {
    const auto at = order.find(id);
    if (at != order.end()) last_held = std::max(last_held, at->second + 1);
  }
  EXPECT_GT(last_held, 0u) << "generation " << held.view.header.generation
                           << " holds none of the jobs journal-1.log says were accepted";
  std::vector<JobId> lost_early;
  std::size_t lost = 0;
  for (const auto& [id, at] : order) {
    if (done_before.count(id) || held_ids.count(id)) continue;
    ++lost;
    if (at < last_held) lost_early.push_back(id);
  }
  EXPECT_TRUE(lost_early.empty())
      << lost_early.size() << " of " << lost << " jobs missing from generation "
      << held.view.header.generation << " were accepted before its last held job, so before its "
      << "cut, and never finished, e.g. job " << lost_early.front();

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
  // It marked the directory as its own: a second run may empty it.
  EXPECT_TRUE(fs::exists(work_ + "/scenario/.jobengine-demo-work"));
}

// The script tools/demo.sh and its directory's run.sh.
std::string Script() { return JOBENGINE_DEMO_SCRIPT; }
std::string RunScript() { return (fs::path(JOBENGINE_DEMO_SCRIPT).parent_path() / "run.sh").string(); }
std::string BinDir() { return fs::path(JOBENGINE_DEMO_PATH).parent_path().string(); }

TEST_F(DemoTest, SigintTakesAFinalSnapshotThenDiesOfIt) {
  const std::string journal = work_ + "/journal-1.log";
  ChildOptions ctrl_c;
  ctrl_c.signal_when = [&] { return JournalReached(journal, 200); };
  ctrl_c.signal = SIGINT;
  ctrl_c.to_group = true;
  std::vector<std::string> args = {JOBENGINE_DEMO_PATH, "--dir", dir_, "--shm", shm_,
                                   "--status-interval", "0", "--jobs", "100000", "--rate", "2000",
                                   "--journal", journal, "--report", work_ + "/report-1.json"};
  const RunResult r = RunChild(args, work_ + "/output-1.txt", ctrl_c);
  ExpectNoSanitizerReport(r);
  ASSERT_TRUE(r.signalled) << r;
  // Died of SIGINT, not exit 0: a shell running it sees the interrupt.
  ASSERT_EQ(r.code, 128 + SIGINT) << r;
  EXPECT_TRUE(Contains(r.output, "interrupted, what is left is in the final snapshot")) << r;
  const json report = Report(work_ + "/report-1.json");
  EXPECT_EQ(report["phase"], "finished") << r;
  EXPECT_EQ(report["stop"], "snapshot-and-exit") << r;
  bool ended = false;
  std::set<JobId> accepted, done;
  for (const auto& w : Journal(journal)) {
    if (w[0] == "S") accepted.insert(std::stoull(w[1]));
    if (w[0] == "R" && w.size() > 4 && w[4] == "done") done.insert(std::stoull(w[1]));
    if (w[0] == "END") ended = true;
  }
  EXPECT_TRUE(ended) << "no END line: the demo did not finish its stop";

  // The final snapshot is what the next start loads, and holds exactly the
  // jobs accepted and not done (kSnapshotAndExit).
  const st::Image held = LoadNext();
  EXPECT_EQ(held.view.header.generation,
            report["counts"]["last_snapshot_generation"].get<std::uint64_t>());
  std::set<JobId> left;
  for (const auto& j : held.view.jobs) left.insert(j.id);
  std::set<JobId> expected;
  for (JobId id : accepted) {
    if (!done.count(id)) expected.insert(id);
  }
  EXPECT_FALSE(expected.empty()) << "nothing was left to snapshot (delayed reminders were expected)";
  EXPECT_EQ(left, expected);

  // A restart runs them all.
  const RunResult resumed = Demo("2", {"--resume-only"});
  ASSERT_EQ(resumed.code, 0) << resumed;
  const json report2 = Report(work_ + "/report-2.json");
  EXPECT_EQ(report2["recovery"]["generation"].get<std::uint64_t>(), held.view.header.generation);
  EXPECT_EQ(report2["counts"]["recovered"].get<std::uint64_t>(), expected.size()) << resumed;
  EXPECT_EQ(report2["counts"]["done"], report2["counts"]["recovered"]) << resumed;
  EXPECT_EQ(report2["counts"]["failed"], 0) << resumed;
  EXPECT_EQ(report2["stop"], "drain") << resumed;
}

// The first service run of a script that was stopped: no longer running, and
// it stopped with its final snapshot.
void ExpectServiceStoppedWithItsFinalSnapshot(const std::string& scenario, const RunResult& r) {
  const pid_t demo = StartPid(scenario + "/journal-1.log");
  ASSERT_NE(demo, 0) << r;
  EXPECT_FALSE(Running(demo)) << "jobengine-demo " << demo << " outlived the script";
  EXPECT_EQ(Report(scenario + "/report-1.json")["stop"], "snapshot-and-exit") << r;
}

TEST_F(DemoTest, ScriptStopsAtCtrlC) {
  if (std::system("command -v python3 >/dev/null 2>&1") != 0) GTEST_SKIP() << "no python3";
  const std::string scenario = work_ + "/scenario";
  ChildOptions ctrl_c;
  ctrl_c.signal_when = [&] { return JournalReached(scenario + "/journal-1.log", 100); };
  ctrl_c.signal = SIGINT;
  ctrl_c.to_group = true;  // the script and the demo it runs, as a terminal's Ctrl-C
  const RunResult r = RunChild({"/bin/bash", Script(), "--work", scenario, "--shm", shm_, "--bin",
                                BinDir()},
                               work_ + "/output-script.txt", ctrl_c);
  ExpectNoSanitizerReport(r);
  ASSERT_TRUE(r.signalled) << r;
  EXPECT_EQ(r.code, 130) << r;
  EXPECT_TRUE(Contains(r.output, "demo.sh: interrupted")) << r;
  // It stopped there: no next step, no verdict.
  EXPECT_FALSE(Contains(r.output, "== 3.")) << r;
  EXPECT_FALSE(Contains(r.output, "OK:")) << r;
  EXPECT_FALSE(Contains(r.output, "FAILED")) << r;
  ExpectServiceStoppedWithItsFinalSnapshot(scenario, r);
}

TEST_F(DemoTest, ScriptLeavesNoServiceRunningWhenItDies) {
  if (std::system("command -v python3 >/dev/null 2>&1") != 0) GTEST_SKIP() << "no python3";
  const std::string scenario = work_ + "/scenario";
  ChildOptions alarm;  // what RunChild's own alarm does to a script that hangs
  alarm.signal_when = [&] { return JournalReached(scenario + "/journal-1.log", 100); };
  alarm.signal = SIGALRM;
  const RunResult r = RunChild({"/bin/bash", Script(), "--work", scenario, "--shm", shm_, "--bin",
                                BinDir()},
                               work_ + "/output-script.txt", alarm);
  ExpectNoSanitizerReport(r);
  ASSERT_TRUE(r.signalled) << r;
  EXPECT_EQ(r.code, 128 + SIGALRM) << r;
  EXPECT_FALSE(Contains(r.output, "OK:")) << r;
  ExpectServiceStoppedWithItsFinalSnapshot(scenario, r);  // stopped by the script's SIGTERM
}

TEST_F(DemoTest, ScriptsRefuseAWorkDirectoryTheyDidNotMake) {
  // Someone's directory: not empty, no marker.
  const std::string mine = work_ + "/mine";
  fs::create_directories(mine + "/sub");
  std::ofstream(mine + "/keep.txt") << "precious\n";
  std::ofstream(mine + "/sub/keep.txt") << "precious\n";
  const auto untouched = [&] {
    EXPECT_EQ(Slurp(mine + "/keep.txt"), "precious\n");
    EXPECT_EQ(Slurp(mine + "/sub/keep.txt"), "precious\n");
    EXPECT_FALSE(fs::exists(mine + "/.jobengine-demo-work"));
  };
  const std::vector<std::string> script = {"/bin/bash", Script(), "--shm", shm_, "--bin", BinDir()};
  const auto with = [](std::vector<std::string> v, std::initializer_list<std::string> more) {
    v.insert(v.end(), more);
    return v;
  };

  RunResult r = RunChild(with(script, {"--work", mine}), work_ + "/output-a.txt");
  EXPECT_EQ(r.code, 1) << r;
  EXPECT_TRUE(Contains(r.output, "refusing to use --work")) << r;
  EXPECT_TRUE(Contains(r.output, "nothing was deleted")) << r;
  untouched();

  // A relative --work is the caller's: run.sh resolves "." here before it
  // goes to the repository, and refuses before it installs or builds.
  ChildOptions there;
  there.cwd = mine;
  r = RunChild({"/bin/bash", RunScript(), "--work", ".", "--shm", shm_, "--bin", BinDir()},
               work_ + "/output-b.txt", there);
  EXPECT_EQ(r.code, 1) << r;
  EXPECT_TRUE(Contains(r.output, "refusing to use --work " + fs::canonical(mine).string())) << r;
  EXPECT_FALSE(Contains(r.output, "setup:")) << r;
  untouched();
  r = RunChild(with(script, {"--work", ".", "--check"}), work_ + "/output-c.txt", there);
  EXPECT_EQ(r.code, 1) << r;
  untouched();

  // A file is not a work directory either.
  r = RunChild(with(script, {"--work", mine + "/keep.txt", "--check"}), work_ + "/output-d.txt");
  EXPECT_EQ(r.code, 1) << r;
  untouched();

  // Accepted: a new directory, an empty one, one holding the marker.
  r = RunChild(with(script, {"--work", work_ + "/new/dir", "--check"}), work_ + "/output-e.txt");
  EXPECT_EQ(r.code, 0) << r;
  fs::create_directories(work_ + "/empty");
  r = RunChild(with(script, {"--work", work_ + "/empty", "--check"}), work_ + "/output-f.txt");
  EXPECT_EQ(r.code, 0) << r;
  fs::create_directories(work_ + "/earlier");
  std::ofstream(work_ + "/earlier/.jobengine-demo-work");
  std::ofstream(work_ + "/earlier/journal-1.log") << "START pid=1\n";
  r = RunChild(with(script, {"--work", work_ + "/earlier", "--check"}), work_ + "/output-g.txt");
  EXPECT_EQ(r.code, 0) << r;
  EXPECT_TRUE(fs::exists(work_ + "/earlier/journal-1.log")) << "--check deleted something";
}

}  // namespace
}  // namespace jobengine
