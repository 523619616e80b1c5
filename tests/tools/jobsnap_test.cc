// jobsnap, run as the operator runs it: the built binary in a child process,
// its stdout, stderr and exit status checked, on golden images of every format
// version, images made with the Encoder, images written by a real Engine, and
// damaged and hostile inputs (bit flips, truncation, a newer version, huge
// lengths, symlinks, FIFOs, devices, directories, over-size files, foreign
// shared-memory segments). The rollback is checked end to end: restore, then
// an Engine start loads exactly the chosen generation.
//
// A child that hangs (e.g. blocked opening a FIFO) is killed by SIGALRM after
// kChildSeconds and the test fails saying so; no timing decides a pass.
#include <fcntl.h>
#include <grp.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "jobengine/engine.h"
#include "jobengine/snapshot_format.h"
#include "jobengine/snapshot_tools.h"
#include "persistence/shm_store.h"

namespace jobengine {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;
using std::chrono::milliseconds;
using snapshot::DeadReason;
using snapshot::JobRecord;
using snapshot::JobState;

constexpr unsigned kChildSeconds = 60;
const std::string kGolden = JOBENGINE_GOLDEN_DIR;

// Exit codes, as tools/jobsnap.md documents them.
constexpr int kOk = 0, kDiffers = 1, kCorrupt = 2, kTruncated = 3, kUnsupported = 4, kNotFound = 5,
              kRefusedInput = 6, kLocked = 7, kRefused = 8, kUsage = 64, kIoError = 74;
// The child's own exit codes when it could not run jobsnap at all.
constexpr int kChildSetupFailed = 125, kChildCannotSwitchUid = 123, kChildCannotExec = 126;

template <typename R>
::testing::AssertionResult IsOk(const R& r) {
  if (r.ok()) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << r.status().to_string();
}

// ---- running jobsnap ---------------------------------------------------------

struct RunResult {
  int code = -1;
  std::string out;
  std::string err;
  std::string args;
};

std::ostream& operator<<(std::ostream& os, const RunResult& r) {
  return os << "jobsnap" << r.args << "\n  exit " << r.code << "\n  stdout:\n"
            << r.out << "\n  stderr:\n"
            << r.err;
}

std::string Slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

// Runs the jobsnap binary with `args`; exit code 128 + N if killed by signal N.
// With `stdout_path`, its stdout is that file (e.g. /dev/full) instead. With
// `as_uid`, as that uid (gid the same, no supplementary groups), as an
// operator who is not root runs it: kChildCannotSwitchUid if this process
// may not switch, kChildCannotExec if that uid may not run the binary.
// stdout: the file at `stdout_path`, else the descriptor `stdout_fd`, else a
// temporary file whose text comes back in `out`.
RunResult Jobsnap(const std::vector<std::string>& args, const char* stdout_path = nullptr,
                  std::optional<uid_t> as_uid = std::nullopt, int stdout_fd = -1) {
  RunResult r;
  for (const auto& a : args) r.args += " " + a;
  char out_tmpl[] = "/tmp/jobsnap-test-out-XXXXXX";
  char err_tmpl[] = "/tmp/jobsnap-test-err-XXXXXX";
  const int out_fd = ::mkstemp(out_tmpl);
  const int err_fd = ::mkstemp(err_tmpl);
  if (out_fd < 0 || err_fd < 0) {
    r.err = "mkstemp failed";
    return r;
  }
  std::vector<std::string> argv_s = {JOBSNAP_PATH};
  argv_s.insert(argv_s.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (auto& a : argv_s) argv.push_back(a.data());
  argv.push_back(nullptr);
  const pid_t pid = ::fork();
  if (pid == 0) {
    ::signal(SIGPIPE, SIG_DFL);  // as a shell starts it
    const int in = ::open("/dev/null", O_RDONLY);
    const int out = stdout_path != nullptr ? ::open(stdout_path, O_WRONLY)
                    : stdout_fd >= 0       ? stdout_fd
                                           : out_fd;
    if (in < 0 || out < 0 || ::dup2(in, 0) < 0 || ::dup2(out, 1) < 0 || ::dup2(err_fd, 2) < 0) {
      ::_exit(kChildSetupFailed);
    }
    if (as_uid && (::setgroups(0, nullptr) != 0 || ::setgid(static_cast<gid_t>(*as_uid)) != 0 ||
                   ::setuid(*as_uid) != 0)) {
      ::_exit(kChildCannotSwitchUid);
    }
    ::alarm(kChildSeconds);  // survives exec: a hang ends as SIGALRM
    ::execv(argv[0], argv.data());
    ::_exit(kChildCannotExec);
  }
  int status = 0;
  if (pid > 0) ::waitpid(pid, &status, 0);
  ::close(out_fd);
  ::close(err_fd);
  r.out = Slurp(out_tmpl);
  r.err = Slurp(err_tmpl);
  ::unlink(out_tmpl);
  ::unlink(err_tmpl);
  if (pid < 0) return r;
  if (WIFEXITED(status)) r.code = WEXITSTATUS(status);
  if (WIFSIGNALED(status)) r.code = 128 + WTERMSIG(status);
  return r;
}

bool Contains(const std::string& haystack, const std::string& needle) {
  return haystack.find(needle) != std::string::npos;
}

json ParseJson(const RunResult& r) {
  json j = json::parse(r.out, nullptr, /*allow_exceptions=*/false);
  EXPECT_FALSE(j.is_discarded()) << r;
  return j;
}

std::vector<json> ParseJsonLines(const RunResult& r) {
  std::vector<json> out;
  std::istringstream in(r.out);
  std::string line;
  while (std::getline(in, line)) {
    json j = json::parse(line, nullptr, false);
    EXPECT_FALSE(j.is_discarded()) << "not JSON: " << line;
    out.push_back(j);
  }
  return out;
}

// ---- files and images ----------------------------------------------------------

class TempDir {
 public:
  TempDir() {
    std::string tmpl = (fs::temp_directory_path() / "jobsnap-test-XXXXXX").string();
    if (::mkdtemp(tmpl.data()) == nullptr) std::abort();
    path_ = tmpl;
    snap_ = path_ + "/snap";
    ::mkdir(snap_.c_str(), 0700);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  const std::string& path() const { return path_; }
  const std::string& snap() const { return snap_; }  // an empty snapshot directory

 private:
  std::string path_;
  std::string snap_;
};

std::string UniqueShmName() {
  static std::atomic<int> n{0};
  return "jobsnap-test-" + std::to_string(::getpid()) + "-" + std::to_string(n++);
}

struct ShmCleanup {
  std::string name = UniqueShmName();
  ~ShmCleanup() { (void)::unlink(("/dev/shm/" + name).c_str()); }
};

std::vector<unsigned char> ReadBytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::vector<unsigned char>((std::istreambuf_iterator<char>(in)),
                                    std::istreambuf_iterator<char>());
}

void WriteBytes(const std::string& path, const std::vector<unsigned char>& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  out.close();
  ::chmod(path.c_str(), 0600);
}

std::string GenPath(const std::string& dir, std::uint64_t generation) {
  char name[64];
  std::snprintf(name, sizeof name, "/gen-%020llu.jobsnap",
                static_cast<unsigned long long>(generation));
  return dir + name;
}

JobRecord Job(JobId id, JobState state = JobState::kPending, std::uint32_t handler = 0,
              std::string_view payload = "payload") {
  JobRecord r;
  r.id = id;
  r.handler = handler;
  r.priority = 1;
  r.state = state;
  r.submit_ns = 1'790'000'000'000'000'000 + static_cast<std::int64_t>(id) * 1000;
  r.run_at_ns = r.submit_ns;
  r.payload = payload;
  return r;
}

JobRecord DeadJob(JobId id, DeadReason reason, std::string_view error, std::uint32_t handler = 0) {
  JobRecord r = Job(id, JobState::kDead, handler);
  r.dead_reason = reason;
  r.error = error;
  r.attempts = 3;
  r.recoveries = reason == DeadReason::kPoison ? 4 : 0;
  r.dead_at_ns = r.submit_ns + 5000;
  return r;
}

// An image of `jobs` under handlers "work" (0) and "email" (1).
std::vector<unsigned char> MakeImage(std::uint64_t generation, const std::vector<JobRecord>& jobs,
                                     std::uint64_t next_job_id = 1000) {
  snapshot::Encoder e;
  snapshot::Header h;
  h.generation = generation;
  h.cut_epoch = generation * 2;
  h.wall_time_ns = 1'790'000'000'000'000'000 + static_cast<std::int64_t>(generation);
  h.next_job_id = next_job_id;
  e.begin(h);
  e.add_handler("work");
  e.add_handler("email");
  for (const auto& j : jobs) e.add_job(j);
  auto image = e.finish();
  return std::vector<unsigned char>(image.begin(), image.end());
}

void PutGeneration(const std::string& dir, std::uint64_t generation,
                   const std::vector<JobRecord>& jobs) {
  WriteBytes(GenPath(dir, generation), MakeImage(generation, jobs));
}

std::set<JobId> IdsOf(const std::vector<unsigned char>& bytes) {
  std::set<JobId> ids;
  auto view = snapshot::decode(bytes);
  EXPECT_TRUE(IsOk(view));
  if (view) {
    for (const auto& j : view->jobs) ids.insert(j.id);
  }
  return ids;
}

// Everything an operator could see change in a directory: names, sizes,
// modes, modification times, contents.
std::map<std::string, std::string> Fingerprint(const std::string& dir) {
  std::map<std::string, std::string> out;
  struct stat st{};
  ::lstat(dir.c_str(), &st);
  out["."] = std::to_string(st.st_mode) + "/" + std::to_string(st.st_mtim.tv_nsec);
  for (const auto& e : fs::recursive_directory_iterator(dir)) {
    ::lstat(e.path().c_str(), &st);
    std::string v = std::to_string(st.st_mode) + "/" + std::to_string(st.st_size) + "/" +
                    std::to_string(st.st_mtim.tv_sec) + "." + std::to_string(st.st_mtim.tv_nsec);
    if (S_ISREG(st.st_mode)) v += "/" + Slurp(e.path().string());
    out[e.path().string()] = v;
  }
  return out;
}

void FlipByte(const std::string& path, std::uint64_t offset) {
  auto bytes = ReadBytes(path);
  ASSERT_LT(offset, bytes.size());
  bytes[offset] ^= 0x5a;
  WriteBytes(path, bytes);
}

void Put64(std::vector<unsigned char>& b, std::size_t at, std::uint64_t v) {
  for (int i = 0; i < 8; ++i) b[at + i] = static_cast<unsigned char>(v >> (8 * i));
}
void Put32(std::vector<unsigned char>& b, std::size_t at, std::uint32_t v) {
  for (int i = 0; i < 4; ++i) b[at + i] = static_cast<unsigned char>(v >> (8 * i));
}
// Makes the header checksum right again after a header field was changed, so
// the decoder gets to check what the field says.
void FixHeaderChecksum(std::vector<unsigned char>& b) { Put64(b, 88, snapshot::checksum(b.data(), 88)); }

// ---- a real engine -------------------------------------------------------------

EngineOptions DiskOptions(const std::string& dir) {
  EngineOptions o;
  o.workers = 1;
  o.capacity = 4096;
  o.spin_iterations = 64;
  o.snapshot.enabled = true;
  o.snapshot.dir = dir;
  o.snapshot.shm_interval = milliseconds(0);
  o.snapshot.disk_interval = milliseconds(0);  // only on demand
  o.snapshot.exit_deadline = milliseconds(50);
  o.snapshot.keep_generations = 10;
  return o;
}

class Gate {
 public:
  void open() {
    std::lock_guard<std::mutex> l(mu_);
    open_ = true;
    cv_.notify_all();
  }
  void wait() {
    std::unique_lock<std::mutex> l(mu_);
    cv_.wait_for(l, std::chrono::seconds(30), [&] { return open_; });
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  bool open_ = false;
};

// ---- golden images ---------------------------------------------------------------

TEST(JobsnapGoldenTest, VerifyAcceptsTheGoldenImageOfEveryVersion) {
  for (const char* name : {"v1-small", "v1-mixed", "v2-small", "v2-mixed"}) {
    auto r = Jobsnap({"verify", kGolden + "/" + name + ".jobsnap"});
    EXPECT_EQ(r.code, kOk) << r;
    EXPECT_TRUE(Contains(r.out, "ok ")) << r;
    EXPECT_TRUE(Contains(r.out, "sound")) << r;
  }
}

TEST(JobsnapGoldenTest, InspectShowsHeaderCountsAndDeadJobsWithReasons) {
  auto r = Jobsnap({"inspect", kGolden + "/v2-mixed.jobsnap"});
  ASSERT_EQ(r.code, kOk) << r;
  EXPECT_TRUE(Contains(r.out, "generation      42")) << r;
  EXPECT_TRUE(Contains(r.out, "dead / quarantined jobs (7)")) << r;
  EXPECT_TRUE(Contains(r.out, "reason poison")) << r;
  EXPECT_TRUE(Contains(r.out, "reason no-handler")) << r;
  EXPECT_TRUE(Contains(r.out, "oldest live job")) << r;

  auto j = ParseJson(Jobsnap({"inspect", "--json", kGolden + "/v2-mixed.jobsnap"}));
  auto bytes = ReadBytes(kGolden + "/v2-mixed.jobsnap");
  auto view = snapshot::decode(bytes);
  ASSERT_TRUE(IsOk(view));
  const auto summary = snapshot_tools::summarize(*view);
  EXPECT_EQ(j["header"]["generation"], 42);
  EXPECT_EQ(j["jobs"]["total"], view->jobs.size());
  EXPECT_EQ(j["jobs"]["dead"], summary.dead.size());
  ASSERT_EQ(j["dead_jobs"].size(), summary.dead.size());
  for (std::size_t i = 0; i < summary.dead.size(); ++i) {
    EXPECT_EQ(j["dead_jobs"][i]["id"], summary.dead[i]->id);
    EXPECT_EQ(j["dead_jobs"][i]["recoveries"], summary.dead[i]->recoveries);
    EXPECT_EQ(j["dead_jobs"][i]["dead_reason"],
              std::string(snapshot::dead_reason_name(summary.dead[i]->dead_reason)));
  }
  std::uint64_t by_priority = 0;
  for (const auto& n : j["by_priority"]) by_priority += n.get<std::uint64_t>();
  EXPECT_EQ(by_priority, view->jobs.size());
  EXPECT_EQ(j["by_handler"].size(), view->handlers.size());
}

TEST(JobsnapGoldenTest, InspectReadsVersionOneAsVersionTwo) {
  auto j = ParseJson(Jobsnap({"inspect", "--json", kGolden + "/v1-mixed.jobsnap"}));
  EXPECT_EQ(j["header"]["format_version"], 1);
  for (const auto& d : j["dead_jobs"]) EXPECT_EQ(d["dead_reason"], "failed");
}

TEST(JobsnapGoldenTest, DumpIsOneJsonObjectPerJobWithTextPayload) {
  auto r = Jobsnap({"dump", kGolden + "/v2-small.jobsnap"});
  ASSERT_EQ(r.code, kOk) << r;
  auto lines = ParseJsonLines(r);
  ASSERT_EQ(lines.size(), 1u) << r;
  const json& j = lines[0];
  EXPECT_EQ(j["id"], 7);
  EXPECT_EQ(j["handler"], "email");
  EXPECT_EQ(j["priority"], 1);
  EXPECT_EQ(j["state"], "pending");
  EXPECT_EQ(j["payload"], "hi");
  EXPECT_EQ(j["payload_encoding"], "text");
  EXPECT_EQ(j["dead_reason"], "none");
  EXPECT_EQ(j["submit_time"], "2026-09-21T14:13:19.000000000Z");
  EXPECT_EQ(j["submit_ns"], 1789999999000000000LL);
  for (const char* field : {"attempts", "recoveries", "run_at", "error", "key", "deadline_ns",
                            "cancel_requested"}) {
    EXPECT_TRUE(j.contains(field)) << field;
  }
}

TEST(JobsnapGoldenTest, DumpFiltersByHandlerStateAndId) {
  const std::string file = kGolden + "/v2-mixed.jobsnap";
  auto bytes = ReadBytes(file);
  auto view = snapshot::decode(bytes);
  ASSERT_TRUE(IsOk(view));
  std::size_t dead = 0, dead_ledger = 0;
  for (const auto& j : view->jobs) {
    if (j.state != JobState::kDead) continue;
    ++dead;
    dead_ledger += view->handlers[j.handler] == "ledger.post";
  }
  auto all = ParseJsonLines(Jobsnap({"dump", file}));
  EXPECT_EQ(all.size(), view->jobs.size());
  auto d = ParseJsonLines(Jobsnap({"dump", file, "--state", "dead"}));
  EXPECT_EQ(d.size(), dead);
  for (const auto& j : d) EXPECT_EQ(j["state"], "dead");
  auto dl = ParseJsonLines(Jobsnap({"dump", file, "--state", "dead", "--handler", "ledger.post"}));
  EXPECT_EQ(dl.size(), dead_ledger);
  const JobId first = view->jobs.front().id, last = view->jobs.back().id;
  auto ids = ParseJsonLines(Jobsnap({"dump", file, "--id", std::to_string(first), "--id",
                                     std::to_string(last), "--json"}));
  ASSERT_EQ(ids.size(), 2u);
  EXPECT_EQ(ids[0]["id"], first);
  EXPECT_EQ(ids[1]["id"], last);
}

TEST(JobsnapTest, DumpShowsABinaryPayloadAsBase64) {
  TempDir tmp;
  const std::string file = tmp.path() + "/bin.jobsnap";
  const std::string payload("\x00\xff\x01", 3);
  WriteBytes(file, MakeImage(1, {Job(1, JobState::kPending, 0, payload), Job(2, JobState::kPending, 0, "caf\xc3\xa9")}));
  auto lines = ParseJsonLines(Jobsnap({"dump", file}));
  ASSERT_EQ(lines.size(), 2u);
  EXPECT_EQ(lines[0]["payload"], "AP8B");
  EXPECT_EQ(lines[0]["payload_encoding"], "base64");
  EXPECT_EQ(lines[1]["payload"], "caf\xc3\xa9");
  EXPECT_EQ(lines[1]["payload_encoding"], "text");
}

// ---- damaged images ----------------------------------------------------------------

TEST(JobsnapDamageTest, BitFlipInARecordIsCorruptAtThatRecordsOffset) {
  TempDir tmp;
  const std::string file = tmp.path() + "/flipped.jobsnap";
  WriteBytes(file, ReadBytes(kGolden + "/v2-small.jobsnap"));
  FlipByte(file, 96 + 7 + 68);  // the 'h' of the payload "hi" (FORMAT.md, worked example)
  auto r = Jobsnap({"verify", file});
  EXPECT_EQ(r.code, kCorrupt) << r;
  EXPECT_TRUE(Contains(r.out, "corrupt at offset 103")) << r;  // the record's start
  EXPECT_TRUE(Contains(r.out, "checksum mismatch")) << r;
  auto j = ParseJson(Jobsnap({"verify", "--json", file}));
  EXPECT_EQ(j["sound"], false);
  EXPECT_EQ(j["exit_code"], kCorrupt);
  EXPECT_EQ(j["images"][0]["offset"], 103);
  EXPECT_EQ(j["images"][0]["failure"], "corrupt");
  // The other read commands refuse it with the same class.
  EXPECT_EQ(Jobsnap({"inspect", file}).code, kCorrupt);
  auto dump = Jobsnap({"dump", file});
  EXPECT_EQ(dump.code, kCorrupt) << dump;
  EXPECT_TRUE(dump.out.empty()) << dump;
  EXPECT_TRUE(Contains(dump.err, "offset 103")) << dump;
}

TEST(JobsnapDamageTest, HeaderBitFlipIsCorruptAtTheHeaderChecksum) {
  TempDir tmp;
  const std::string file = tmp.path() + "/flipped.jobsnap";
  WriteBytes(file, ReadBytes(kGolden + "/v2-mixed.jobsnap"));
  FlipByte(file, 20);  // inside the generation field
  auto r = Jobsnap({"verify", file});
  EXPECT_EQ(r.code, kCorrupt) << r;
  EXPECT_TRUE(Contains(r.out, "offset 88")) << r;
}

TEST(JobsnapDamageTest, TruncatedImageIsTruncated) {
  TempDir tmp;
  auto bytes = ReadBytes(kGolden + "/v2-mixed.jobsnap");
  const std::string half = tmp.path() + "/half.jobsnap";
  WriteBytes(half, std::vector<unsigned char>(bytes.begin(), bytes.begin() + bytes.size() / 2));
  auto r = Jobsnap({"verify", half});
  EXPECT_EQ(r.code, kTruncated) << r;
  EXPECT_TRUE(Contains(r.out, "truncated")) << r;
  const std::string tiny = tmp.path() + "/tiny.jobsnap";
  WriteBytes(tiny, std::vector<unsigned char>(bytes.begin(), bytes.begin() + 50));
  r = Jobsnap({"verify", tiny});
  EXPECT_EQ(r.code, kTruncated) << r;
  EXPECT_TRUE(Contains(r.out, "offset 50")) << r;
  const std::string empty = tmp.path() + "/empty.jobsnap";
  WriteBytes(empty, {});
  EXPECT_EQ(Jobsnap({"verify", empty}).code, kTruncated);
  EXPECT_EQ(Jobsnap({"inspect", half}).code, kTruncated);
}

TEST(JobsnapDamageTest, NewerFormatVersionIsUnsupportedVersion) {
  TempDir tmp;
  auto bytes = ReadBytes(kGolden + "/v2-small.jobsnap");
  bytes[8] = 3;
  const std::string file = tmp.path() + "/v3.jobsnap";
  WriteBytes(file, bytes);
  auto r = Jobsnap({"verify", file});
  EXPECT_EQ(r.code, kUnsupported) << r;
  EXPECT_TRUE(Contains(r.out, "unsupported format version 3")) << r;
  EXPECT_TRUE(Contains(r.out, "offset 8")) << r;
  EXPECT_EQ(Jobsnap({"dump", file}).code, kUnsupported);
}

TEST(JobsnapDamageTest, HugeCountsAndLengthsAreRefusedAtOnce) {
  TempDir tmp;
  const auto good = MakeImage(1, {Job(1), Job(2)});
  struct Case {
    const char* name;
    std::size_t at;
    std::uint64_t value;
    int width;
    bool fix_header;
    int code;
  } cases[] = {
      {"job_count", 56, ~std::uint64_t{0}, 8, true, kCorrupt},
      {"body_bytes", 64, ~std::uint64_t{0} - 200, 8, true, kTruncated},
      {"body_bytes_big", 64, std::uint64_t{1} << 40, 8, true, kTruncated},
      {"handler_count", 48, 0xffffffff, 4, true, kCorrupt},
      {"record_len", 96 + 6 + 7, 0xfffffff0, 4, false, kCorrupt},  // first record: after "work", "email"
      {"payload_len", 96 + 6 + 7 + 56, 0x7fffffff, 4, false, kCorrupt},
  };
  for (const Case& c : cases) {
    auto bytes = good;
    if (c.width == 8) {
      Put64(bytes, c.at, c.value);
    } else {
      Put32(bytes, c.at, static_cast<std::uint32_t>(c.value));
    }
    if (c.fix_header) FixHeaderChecksum(bytes);
    const std::string file = tmp.path() + "/" + c.name + ".jobsnap";
    WriteBytes(file, bytes);
    auto r = Jobsnap({"verify", file});
    EXPECT_EQ(r.code, c.code) << c.name << "\n" << r;
    EXPECT_TRUE(Contains(r.out, "offset")) << r;
  }
}

TEST(JobsnapDamageTest, NotASnapshotIsCorruptAtOffsetZero) {
  TempDir tmp;
  const std::string file = tmp.path() + "/notes.txt";
  WriteBytes(file, std::vector<unsigned char>(300, 'x'));
  auto r = Jobsnap({"verify", file});
  EXPECT_EQ(r.code, kCorrupt) << r;
  EXPECT_TRUE(Contains(r.out, "offset 0")) << r;
  EXPECT_TRUE(Contains(r.out, "bad magic")) << r;
}

// A job whose cancel reached it before the cut is counted cancelled by
// recovery and never run: it is not live (SnapshotView::live_records), and
// inspect showed it, unmarked, as "the oldest live job".
TEST(JobsnapTest, InspectsOldestLiveJobIsNeverOneWhoseCancelWasRequested) {
  TempDir tmp;
  const std::string file = tmp.path() + "/c.jobsnap";
  JobRecord cancelled = Job(1);  // submitted first
  cancelled.cancel_requested = true;
  WriteBytes(file, MakeImage(3, {cancelled, Job(2), DeadJob(3, DeadReason::kFailed, "x")}));
  auto j = ParseJson(Jobsnap({"inspect", "--json", file}));
  EXPECT_EQ(j["oldest_live_job"]["id"], 2);
  auto r = Jobsnap({"inspect", file});
  EXPECT_EQ(r.code, kOk) << r;
  EXPECT_TRUE(Contains(r.out, "oldest live job\n  id 2 ")) << r;
  // Only cancelled jobs: none is live.
  WriteBytes(file, MakeImage(3, {cancelled}));
  j = ParseJson(Jobsnap({"inspect", "--json", file}));
  EXPECT_TRUE(j["oldest_live_job"].is_null()) << j;
}

// Handler names and errors come from the image: printed raw, a crafted one
// drove the terminal (ESC sequences) and faked lines of output (newlines).
// Text output escapes them; JSON output carries them exactly, JSON-escaped.
TEST(JobsnapHostileTest, TextOutputEscapesControlCharactersFromTheImage) {
  TempDir tmp;
  const std::string handler = "work\x1b]0;pwned\x07\x1b[2J";
  const std::string error = "boom\n  id 99  fake  reason poison\r\x9b\xc2\x9b\\x41 \xe2\x80\xae";
  snapshot::Encoder e;
  snapshot::Header h;
  h.generation = 1;
  h.next_job_id = 10;
  e.begin(h);
  e.add_handler(handler);
  JobRecord dead = DeadJob(3, DeadReason::kFailed, error);
  e.add_job(Job(2));
  e.add_job(dead);
  auto image = e.finish();
  const std::string file = tmp.path() + "/hostile.jobsnap";
  WriteBytes(file, std::vector<unsigned char>(image.begin(), image.end()));
  auto r = Jobsnap({"inspect", file});
  ASSERT_EQ(r.code, kOk) << r;
  for (const char c : r.out) {
    const auto u = static_cast<unsigned char>(c);
    EXPECT_TRUE(c == '\n' || (u >= 0x20 && u != 0x7f && u != 0x9b)) << "raw byte " << int(u) << r;
  }
  EXPECT_FALSE(Contains(r.out, "\xc2\x9b")) << r;     // C1 CSI
  EXPECT_FALSE(Contains(r.out, "\xe2\x80\xae")) << r; // right-to-left override
  EXPECT_FALSE(Contains(r.out, "\n  id 99")) << r;
  EXPECT_TRUE(Contains(r.out, "work\\x1b]0;pwned\\x07\\x1b[2J")) << r;
  EXPECT_TRUE(Contains(
      r.out, "error: boom\\n  id 99  fake  reason poison\\r\\x9b\\u009b\\\\x41 \\u202e"))
      << r;
  auto j = ParseJson(Jobsnap({"inspect", "--json", file}));
  EXPECT_EQ(j["by_handler"][0]["handler"], handler);
  EXPECT_EQ(j["dead_jobs"][0]["handler"], handler);
}

// ---- hostile inputs ----------------------------------------------------------------

TEST(JobsnapHostileTest, SymlinkIsRefusedWithoutBeingFollowed) {
  TempDir tmp;
  const std::string link = tmp.path() + "/link.jobsnap";
  ASSERT_EQ(::symlink((kGolden + "/v2-small.jobsnap").c_str(), link.c_str()), 0);
  for (const char* cmd : {"verify", "inspect", "dump"}) {
    auto r = Jobsnap({cmd, link});
    EXPECT_EQ(r.code, kRefusedInput) << r;
    EXPECT_TRUE(Contains(r.err, "symlink")) << r;
  }
  // A symlinked directory, too; also named with a trailing slash, which
  // lstat() follows, but which the engine strips and refuses (it said "the
  // next engine start loads this" for a directory the engine would refuse).
  PutGeneration(tmp.snap(), 1, {Job(1)});
  const std::string dir_link = tmp.path() + "/snap-link";
  ASSERT_EQ(::symlink(tmp.snap().c_str(), dir_link.c_str()), 0);
  for (const auto& args : std::vector<std::vector<std::string>>{{"list", dir_link},
                                                                {"list", dir_link + "/"},
                                                                {"inspect", dir_link + "//"},
                                                                {"verify", dir_link + "/"},
                                                                {"drop", dir_link + "/", "1"}}) {
    auto r = Jobsnap(args);
    EXPECT_EQ(r.code, kRefusedInput) << r;
    EXPECT_TRUE(Contains(r.err, "symlink")) << r;
  }
  EXPECT_FALSE(fs::exists(GenPath(tmp.snap(), 2))) << "the drop went through the symlink";
}

TEST(JobsnapHostileTest, FifoIsRefusedWithoutBlocking) {
  TempDir tmp;
  const std::string fifo = tmp.path() + "/fifo.jobsnap";
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0);
  for (const char* cmd : {"verify", "inspect", "dump"}) {
    auto r = Jobsnap({cmd, fifo});
    EXPECT_EQ(r.code, kRefusedInput) << r;  // 128 + SIGALRM if it blocked
    EXPECT_TRUE(Contains(r.err, "FIFO")) << r;
  }
  // A FIFO named like a generation is not a generation (as for the engine).
  ASSERT_EQ(::mkfifo(GenPath(tmp.snap(), 9).c_str(), 0600), 0);
  PutGeneration(tmp.snap(), 1, {Job(1)});
  auto r = Jobsnap({"list", "--json", tmp.snap()});
  EXPECT_EQ(r.code, kOk) << r;
  EXPECT_EQ(ParseJson(r).size(), 1u) << r;
  auto g = Jobsnap({"inspect", tmp.snap(), "--generation", "9"});
  EXPECT_EQ(g.code, kRefusedInput) << g;
}

TEST(JobsnapHostileTest, DeviceIsRefused) {
  auto r = Jobsnap({"verify", "/dev/null"});
  EXPECT_EQ(r.code, kRefusedInput) << r;
  EXPECT_TRUE(Contains(r.err, "not a regular file")) << r;
  r = Jobsnap({"dump", "/dev/zero"});
  EXPECT_EQ(r.code, kRefusedInput) << r;
}

TEST(JobsnapHostileTest, DirectoryWhereAFileIsExpectedIsRefused) {
  TempDir tmp;
  ASSERT_EQ(::mkdir(GenPath(tmp.snap(), 4).c_str(), 0700), 0);
  auto r = Jobsnap({"inspect", tmp.snap(), "--generation", "4"});
  EXPECT_EQ(r.code, kRefusedInput) << r;
  EXPECT_TRUE(Contains(r.err, "directory")) << r;
  // A regular file where a directory is expected.
  const std::string file = tmp.path() + "/file";
  WriteBytes(file, ReadBytes(kGolden + "/v2-small.jobsnap"));
  r = Jobsnap({"list", file});
  EXPECT_EQ(r.code, kRefusedInput) << r;
  r = Jobsnap({"requeue", file, "7"});
  EXPECT_EQ(r.code, kRefusedInput) << r;
}

TEST(JobsnapHostileTest, OverSizeFileIsRefusedBySizeWithoutReadingIt) {
  TempDir tmp;
  const std::string file = tmp.path() + "/huge.jobsnap";
  const int fd = ::open(file.c_str(), O_CREAT | O_WRONLY, 0600);
  ASSERT_GE(fd, 0);
  const off_t size = static_cast<off_t>(snapshot_tools::kMaxFileBytes + 1);
  const bool sparse = ::ftruncate(fd, size) == 0;
  ::close(fd);
  if (!sparse) GTEST_SKIP() << "this file system cannot hold a sparse 256 GiB file";
  auto r = Jobsnap({"verify", file});
  EXPECT_EQ(r.code, kRefusedInput) << r;
  EXPECT_TRUE(Contains(r.err, std::to_string(snapshot_tools::kMaxFileBytes + 1))) << r;
}

TEST(JobsnapHostileTest, MissingInputsAreNotFound) {
  TempDir tmp;
  EXPECT_EQ(Jobsnap({"verify", tmp.path() + "/nope.jobsnap"}).code, kNotFound);
  EXPECT_EQ(Jobsnap({"list", tmp.path() + "/nope"}).code, kNotFound);
  EXPECT_EQ(Jobsnap({"inspect", tmp.snap(), "-g", "3"}).code, kNotFound);
  EXPECT_EQ(Jobsnap({"verify", tmp.snap()}).code, kNotFound);  // no generations
  EXPECT_EQ(Jobsnap({"inspect", "--shm", UniqueShmName()}).code, kNotFound);
}

// Its mode must be 0600 whoever runs jobsnap; its owner the engine's, which
// beside a directory is the directory's owner (more in JobsnapOwnerTest).
TEST(JobsnapHostileTest, SegmentWithAWrongModeOrAnotherOwnerIsRefused) {
  TempDir tmp;
  ShmCleanup shm;
  const std::string path = "/dev/shm/" + shm.name;
  WriteBytes(path, std::vector<unsigned char>(8192, 0));
  ASSERT_EQ(::chmod(path.c_str(), 0644), 0);
  auto r = Jobsnap({"inspect", "--shm", shm.name});
  EXPECT_EQ(r.code, kRefusedInput) << r;
  EXPECT_TRUE(Contains(r.err, "mode")) << r;
  if (::geteuid() == 0) {
    // Root reads a segment of any owner, never one of another mode.
    ASSERT_EQ(::chown(path.c_str(), 65534, 65534), 0);
    r = Jobsnap({"verify", "--shm", shm.name});
    EXPECT_EQ(r.code, kRefusedInput) << r;
    EXPECT_TRUE(Contains(r.err, "mode 0644")) << r;
    // Beside root's directory another uid's segment is refused: root's
    // engine would not open it. Not a row saying "invalid": the engine's
    // open() fails on it.
    ASSERT_EQ(::chmod(path.c_str(), 0600), 0);
    r = Jobsnap({"list", tmp.snap(), "--shm", shm.name});
    EXPECT_EQ(r.code, kRefusedInput) << r;
    EXPECT_TRUE(Contains(r.err, "owned by uid 65534")) << r;
  }
}

// With a directory too, such a segment is refused, not passed over: an
// engine configured with both fails to open on it, so naming a disk
// generation as the one the next start loads would be wrong.
TEST(JobsnapHostileTest, SegmentWithAWrongModeIsRefusedWithADirectoryToo) {
  TempDir tmp;
  ShmCleanup shm;
  PutGeneration(tmp.snap(), 1, {Job(1)});
  {
    auto store = persist::ShmStore::open_or_create(shm.name, 0);
    ASSERT_TRUE(IsOk(store));
    ASSERT_TRUE((*store)->publish(9, MakeImage(9, {Job(1), Job(2)})).ok());
  }
  ASSERT_EQ(::chmod(("/dev/shm/" + shm.name).c_str(), 0644), 0);
  for (const char* cmd : {"list", "inspect", "dump", "verify"}) {
    auto r = Jobsnap({cmd, tmp.snap(), "--shm", shm.name});
    EXPECT_EQ(r.code, kRefusedInput) << r;
    EXPECT_TRUE(Contains(r.err, "mode 0644")) << r;
    EXPECT_FALSE(Contains(r.out, "next engine start loads")) << r;
  }
  auto j = ParseJson(Jobsnap({"list", "--json", tmp.snap(), "--shm", shm.name}));
  EXPECT_EQ(j["error"]["class"], "refused-input");
}

// A segment of another layout version is the segment's counterpart of a
// newer format version (exit 4), not refused input (6, type/owner/mode).
TEST(JobsnapHostileTest, SegmentOfAnotherLayoutVersionIsUnsupportedVersion) {
  TempDir tmp;
  ShmCleanup shm;
  PutGeneration(tmp.snap(), 1, {Job(1)});
  {
    auto store = persist::ShmStore::open_or_create(shm.name, 0);
    ASSERT_TRUE(IsOk(store));
    ASSERT_TRUE((*store)->publish(9, MakeImage(9, {Job(1), Job(2)})).ok());
  }
  const std::string path = "/dev/shm/" + shm.name;
  auto segment = ReadBytes(path);
  ASSERT_GE(segment.size(), 4096u);
  Put32(segment, 8, 2);  // the control block's layout version (shm_store.h)
  WriteBytes(path, segment);
  for (const auto& args : std::vector<std::vector<std::string>>{
           {"inspect", "--shm", shm.name},
           {"verify", "--shm", shm.name},
           {"inspect", tmp.snap(), "--shm", shm.name},
           {"list", tmp.snap(), "--shm", shm.name}}) {
    auto r = Jobsnap(args);
    EXPECT_EQ(r.code, kUnsupported) << r;
    EXPECT_TRUE(Contains(r.out + r.err, "unsupported-version")) << r;  // verify: on stdout
    EXPECT_TRUE(Contains(r.out + r.err, "layout version 2")) << r;
  }
}

TEST(JobsnapHostileTest, FifoInPlaceOfASegmentIsRefusedWithoutBlocking) {
  ShmCleanup shm;
  ASSERT_EQ(::mkfifo(("/dev/shm/" + shm.name).c_str(), 0600), 0);
  auto r = Jobsnap({"inspect", "--shm", shm.name});
  EXPECT_EQ(r.code, kRefusedInput) << r;
  EXPECT_TRUE(Contains(r.err, "FIFO")) << r;
}

// A name the engine refuses to open with (InvalidArgument) was checked only
// for '/', "." and "..": beside a DIR, "a b" was a segment to pass over, so
// inspect showed a disk generation and list marked one as the next start's,
// both exit 0. It is a usage error naming the option and the name, in every
// command, and nothing is looked at, locked or created for it.
TEST(JobsnapHostileTest, ASegmentNameTheEngineRefusesIsAUsageErrorInEveryCommand) {
  TempDir tmp;
  PutGeneration(tmp.snap(), 1, {DeadJob(7, DeadReason::kFailed, "boom"), Job(8)});
  const std::string file = GenPath(tmp.snap(), 1);
  const std::string fresh = tmp.path() + "/fresh";
  const auto before = Fingerprint(tmp.snap());
  for (const std::string& bad : std::vector<std::string>{"a b", "x/y", "..", "ab\x1b",
                                                         std::string(201, 'n')}) {
    for (const auto& [args, option] :
         std::vector<std::pair<std::vector<std::string>, std::string>>{
             {{"list", tmp.snap(), "--shm", bad}, "--shm"},
             {{"list", "--json", tmp.snap(), "--shm", bad}, "--shm"},
             {{"inspect", tmp.snap(), "--shm", bad}, "--shm"},
             {{"inspect", "--shm", bad}, "--shm"},
             {{"dump", tmp.snap(), "--shm", bad}, "--shm"},
             {{"verify", tmp.snap(), "--shm", bad}, "--shm"},
             {{"requeue", tmp.snap(), "7", "--shm", bad}, "--shm"},
             {{"drop", tmp.snap(), "8", "--shm", bad}, "--shm"},
             {{"restore", tmp.snap(), "-g", "1", "--shm", bad}, "--shm"},
             {{"restore", fresh, "--from-file", file, "--shm", bad}, "--shm"},
             {{"restore", fresh, "--from-shm", bad}, "--from-shm"},
             {{"restore", file, "--to-shm", bad}, "--to-shm"},
             {{"diff", tmp.snap(), "shm:" + bad}, "shm:" + bad}}) {
      auto r = Jobsnap(args);
      EXPECT_EQ(r.code, kUsage) << r;
      EXPECT_TRUE(Contains(r.err, option)) << r;
      EXPECT_TRUE(Contains(r.err, "'" + bad + "'")) << r;
      EXPECT_FALSE(Contains(r.out, "next engine start loads")) << r;
    }
  }
  EXPECT_EQ(Fingerprint(tmp.snap()), before);
  EXPECT_FALSE(fs::exists(tmp.snap() + "/LOCK"));
  EXPECT_FALSE(fs::exists(fresh));
  // The library refuses it too, before the directory is made.
  snapshot_tools::RestoreRequest req;
  req.source.path = file;
  req.target_dir = fresh;
  req.target_shm = "a b";
  snapshot_tools::Diagnosis d;
  EXPECT_FALSE(snapshot_tools::restore(req, &d).ok());
  EXPECT_EQ(d.failure, snapshot_tools::Failure::kUsage);
  EXPECT_FALSE(fs::exists(fresh));
}

// check_shm_name() restates the store's rule (its own check is file-local):
// it must refuse exactly the names the store refuses.
TEST(JobsnapHostileTest, TheSegmentNameCheckRefusesExactlyWhatTheStoreRefuses) {
  const std::string ok_chars = "Az09._-";
  for (const std::string& name :
       {std::string("a b"), std::string("x/y"), std::string("."), std::string(".."),
        std::string("..."), std::string("a\tb"), std::string("caf\xc3\xa9"), std::string("a:b"),
        std::string("a\\b"), std::string(200, 'n'), std::string(201, 'n'), ok_chars,
        std::string("-lead"), std::string(".hidden")}) {
    // A name no segment has: the store says kNotFound for a good one.
    const std::string probe =
        name.size() > 150 || name == "." || name == ".." ? name : name + "-" + UniqueShmName();
    const bool store_refuses = persist::ShmStore::read_existing(probe).status().code() ==
                               StatusCode::kInvalidArgument;
    EXPECT_EQ(!snapshot_tools::check_shm_name(probe).ok(), store_refuses) << "'" << probe << "'";
  }
}

// FileStore::read allocates the whole file, and the size limit (256 GiB)
// let a sparse file of zeros through: list, inspect, verify, restore and
// drop of its directory died of std::bad_alloc (exit 70), where the engine
// passes over it as corrupt. The largest file the limit lets through, so
// that reading it fails or runs out of time on any machine.
TEST(JobsnapHostileTest, AFileLargerThanItsHeaderSaysIsReportedWithoutReadingIt) {
  TempDir tmp;
  PutGeneration(tmp.snap(), 3, {DeadJob(7, DeadReason::kFailed, "boom"), Job(8)});
  const std::string huge = GenPath(tmp.snap(), 40);
  const int fd = ::open(huge.c_str(), O_CREAT | O_WRONLY, 0600);
  ASSERT_GE(fd, 0);
  const bool sparse = ::ftruncate(fd, static_cast<off_t>(snapshot_tools::kMaxFileBytes)) == 0;
  ::close(fd);
  if (!sparse) GTEST_SKIP() << "this file system cannot hold a sparse 256 GiB file";

  auto r = Jobsnap({"list", tmp.snap()});
  EXPECT_EQ(r.code, kOk) << r;
  EXPECT_TRUE(Contains(r.out, "gen-00000000000000000040.jobsnap: corrupt at offset 0: bad magic"))
      << r;
  auto j = ParseJson(Jobsnap({"list", "--json", tmp.snap()}));
  ASSERT_EQ(j.size(), 2u);
  EXPECT_EQ(j[0]["failure"], "corrupt");
  EXPECT_EQ(j[0]["offset"], 0);
  EXPECT_EQ(j[1]["loaded_next"], true);
  r = Jobsnap({"inspect", "--json", tmp.snap()});
  EXPECT_EQ(r.code, kOk) << r;
  EXPECT_EQ(ParseJson(r)["header"]["generation"], 3);
  r = Jobsnap({"verify", tmp.snap()});
  EXPECT_EQ(r.code, kCorrupt) << r;
  EXPECT_TRUE(Contains(r.out, "FAILED   " + huge + ": corrupt at offset 0")) << r;
  EXPECT_EQ(Jobsnap({"verify", huge}).code, kCorrupt);
  r = Jobsnap({"drop", tmp.snap(), "8"});
  EXPECT_EQ(r.code, kOk) << r;
  EXPECT_EQ(IdsOf(ReadBytes(GenPath(tmp.snap(), 41))), std::set<JobId>{7});
  r = Jobsnap({"restore", "--json", tmp.snap(), "-g", "3"});
  EXPECT_EQ(r.code, kOk) << r;
  EXPECT_EQ(ParseJson(r)["generation"], 42);

  // A valid image with the rest of the file past it: the header's size is
  // not the file's, and that is all that is read of it.
  TempDir tmp2;
  const std::string padded = GenPath(tmp2.snap(), 5);
  const auto image = MakeImage(5, {Job(1)});
  WriteBytes(padded, image);
  ASSERT_EQ(::truncate(padded.c_str(), static_cast<off_t>(snapshot_tools::kMaxFileBytes)), 0);
  r = Jobsnap({"verify", padded});
  EXPECT_EQ(r.code, kCorrupt) << r;
  EXPECT_TRUE(Contains(r.out, "corrupt at offset " + std::to_string(image.size()))) << r;
  EXPECT_TRUE(Contains(r.out, "trailing bytes after the trailer")) << r;
  EXPECT_EQ(Jobsnap({"inspect", tmp2.snap()}).code, kCorrupt);
}

// The size rule is checked from the header alone, in the decoder's words:
// for every file it says what snapshot::decode() says of the whole file.
TEST(JobsnapDamageTest, AFileOfAnotherSizeThanItsHeaderSaysFailsAsTheDecoderSays) {
  TempDir tmp;
  const auto image = MakeImage(5, {Job(1), Job(2)});
  auto body_zero = MakeImage(6, {});
  Put64(body_zero, 64, 0);  // no handlers, no body: 112 bytes said
  FixHeaderChecksum(body_zero);
  body_zero.resize(112);
  std::vector<std::vector<unsigned char>> files = {
      std::vector<unsigned char>(image.begin(), image.end() - 1),    // truncated by a byte
      std::vector<unsigned char>(image.begin(), image.begin() + 120),  // most of it gone
      image,
      body_zero};
  files[2].insert(files[2].end(), 7, 0);  // trailing bytes
  files.push_back(body_zero);
  files.back().push_back(0);               // body 0, one byte more
  auto bad_magic = image;
  bad_magic[0] = 'X';
  bad_magic.resize(image.size() - 3);      // both wrong: the magic comes first
  files.push_back(bad_magic);
  auto bad_header = image;
  bad_header[20] ^= 1;
  bad_header.push_back(0);                 // both wrong: the header checksum comes first
  files.push_back(bad_header);
  for (std::size_t i = 0; i < files.size(); ++i) {
    const std::string file = tmp.path() + "/f" + std::to_string(i) + ".jobsnap";
    WriteBytes(file, files[i]);
    snapshot::DecodeError err;
    auto view = snapshot::decode(files[i], &err);
    auto r = Jobsnap({"verify", "--json", file});
    auto j = ParseJson(r);
    if (view.ok()) {
      EXPECT_EQ(r.code, kOk) << i << r;
      continue;
    }
    EXPECT_EQ(j["images"][0]["reason"], std::string(view.status().message())) << i << r;
    EXPECT_EQ(j["images"][0]["offset"], err.offset) << i << r;
    EXPECT_EQ(j["images"][0]["failure"], std::string(snapshot::problem_name(err.problem)))
        << i << r;
  }
}

TEST(JobsnapHostileTest, ReadCommandsChangeNothingAndTakeNoLock) {
  TempDir tmp;
  PutGeneration(tmp.snap(), 1, {Job(1), DeadJob(2, DeadReason::kFailed, "boom")});
  PutGeneration(tmp.snap(), 2, {Job(1)});
  FlipByte(GenPath(tmp.snap(), 2), 150);
  ASSERT_EQ(::chmod(tmp.snap().c_str(), 0750), 0);  // an engine would fix it to 0700
  ShmCleanup shm;
  const auto before = Fingerprint(tmp.snap());
  const std::string g1 = GenPath(tmp.snap(), 1);
  for (const auto& args : std::vector<std::vector<std::string>>{
           {"list", tmp.snap()},
           {"list", "--json", tmp.snap(), "--shm", shm.name},
           {"inspect", tmp.snap()},
           {"inspect", "--json", tmp.snap(), "-g", "2"},
           {"dump", tmp.snap()},
           {"verify", tmp.snap()},
           {"verify", "--json", g1},
           {"diff", g1, tmp.snap()},
           {"inspect", tmp.snap(), "--shm", shm.name}}) {
    auto r = Jobsnap(args);
    EXPECT_LT(r.code, kUsage) << r;
  }
  EXPECT_EQ(Fingerprint(tmp.snap()), before);
  EXPECT_FALSE(fs::exists(tmp.snap() + "/LOCK"));
  EXPECT_FALSE(fs::exists("/dev/shm/" + shm.name)) << "a read command created the segment";
}

// ---- list and verify of a directory ------------------------------------------------

TEST(JobsnapListTest, ListsEveryGenerationWithValidityAndMarksTheOneLoadedNext) {
  TempDir tmp;
  PutGeneration(tmp.snap(), 1, {Job(1)});
  PutGeneration(tmp.snap(), 2, {Job(1), Job(2), DeadJob(3, DeadReason::kPoison, "")});
  PutGeneration(tmp.snap(), 3, {Job(1), Job(2), Job(4)});
  FlipByte(GenPath(tmp.snap(), 3), 96 + 13 + 30);  // inside the first record
  WriteBytes(tmp.snap() + "/notes.txt", {'h', 'i'});  // not a generation: ignored
  auto r = Jobsnap({"list", tmp.snap()});
  ASSERT_EQ(r.code, kOk) << r;
  EXPECT_TRUE(Contains(r.out, "INVALID")) << r;
  EXPECT_TRUE(Contains(r.out, "corrupt at offset 109")) << r;
  EXPECT_TRUE(Contains(r.out, "the next engine start loads this")) << r;
  EXPECT_FALSE(Contains(r.out, "notes.txt")) << r;
  auto j = ParseJson(Jobsnap({"list", "--json", tmp.snap()}));
  ASSERT_EQ(j.size(), 3u);
  EXPECT_EQ(j[0]["generation"], 3);
  EXPECT_EQ(j[0]["valid"], false);
  EXPECT_EQ(j[0]["failure"], "corrupt");
  EXPECT_EQ(j[0]["offset"], 109);
  EXPECT_EQ(j[1]["generation"], 2);
  EXPECT_EQ(j[1]["valid"], true);
  EXPECT_EQ(j[1]["loaded_next"], true);
  EXPECT_EQ(j[1]["jobs"]["total"], 3);
  EXPECT_EQ(j[1]["jobs"]["dead"], 1);
  EXPECT_EQ(j[1]["cut_epoch"], 4);
  EXPECT_EQ(j[1]["bytes"], fs::file_size(GenPath(tmp.snap(), 2)));
  EXPECT_EQ(j[2]["loaded_next"], false);
  EXPECT_TRUE(j[1]["time"].get<std::string>().ends_with("Z"));
}

TEST(JobsnapListTest, SegmentNewerThanTheDirectoryIsTheOneLoadedNext) {
  TempDir tmp;
  ShmCleanup shm;
  PutGeneration(tmp.snap(), 4, {Job(1)});
  {
    auto store = persist::ShmStore::open_or_create(shm.name, 0);
    ASSERT_TRUE(IsOk(store));
    ASSERT_TRUE((*store)->publish(9, MakeImage(9, {Job(1), Job(2)})).ok());
  }
  auto j = ParseJson(Jobsnap({"list", "--json", tmp.snap(), "--shm", shm.name}));
  ASSERT_EQ(j.size(), 2u);
  EXPECT_EQ(j[0]["source"], "shm:" + shm.name);
  EXPECT_EQ(j[0]["generation"], 9);
  EXPECT_EQ(j[0]["loaded_next"], true);
  EXPECT_EQ(j[1]["loaded_next"], false);
  // inspect DIR --shm NAME takes the same one.
  auto i = ParseJson(Jobsnap({"inspect", "--json", tmp.snap(), "--shm", shm.name}));
  EXPECT_EQ(i["header"]["generation"], 9);
  EXPECT_EQ(i["header"]["source"], "shm:" + shm.name);
}

TEST(JobsnapListTest, VerifyOfADirectoryChecksEveryGenerationAndExitsWithTheFirstFailure) {
  TempDir tmp;
  PutGeneration(tmp.snap(), 1, {Job(1)});
  PutGeneration(tmp.snap(), 2, {Job(1), Job(2)});
  PutGeneration(tmp.snap(), 3, {Job(1), Job(2), Job(3)});
  auto r = Jobsnap({"verify", tmp.snap()});
  EXPECT_EQ(r.code, kOk) << r;
  auto bytes = ReadBytes(GenPath(tmp.snap(), 2));
  WriteBytes(GenPath(tmp.snap(), 2), std::vector<unsigned char>(bytes.begin(), bytes.end() - 5));
  r = Jobsnap({"verify", tmp.snap()});
  EXPECT_EQ(r.code, kTruncated) << r;
  EXPECT_TRUE(Contains(r.out, "NOT sound")) << r;
  auto j = ParseJson(Jobsnap({"verify", "--json", tmp.snap()}));
  ASSERT_EQ(j["images"].size(), 3u);
  EXPECT_EQ(j["images"][0]["valid"], true);
  EXPECT_EQ(j["images"][1]["valid"], false);
  EXPECT_EQ(j["images"][1]["failure"], "truncated");
  // One generation of it, by number.
  EXPECT_EQ(Jobsnap({"verify", tmp.snap(), "-g", "3"}).code, kOk);
  EXPECT_EQ(Jobsnap({"verify", tmp.snap(), "-g", "2"}).code, kTruncated);
}

TEST(JobsnapListTest, GenerationWhoseHeaderDisagreesWithItsNameIsCorrupt) {
  TempDir tmp;
  WriteBytes(GenPath(tmp.snap(), 5), MakeImage(4, {Job(1)}));
  auto r = Jobsnap({"verify", tmp.snap()});
  EXPECT_EQ(r.code, kCorrupt) << r;
  EXPECT_TRUE(Contains(r.out, "header says 4")) << r;
}

// ---- diff ----------------------------------------------------------------------------

TEST(JobsnapDiffTest, NamesAddedRemovedAndChangedJobs) {
  TempDir tmp;
  const std::string a = tmp.path() + "/a.jobsnap", b = tmp.path() + "/b.jobsnap";
  JobRecord changed = Job(3);
  changed.attempts = 2;
  changed.payload = "other";
  WriteBytes(a, MakeImage(1, {Job(1), Job(2), Job(3), Job(5)}));
  WriteBytes(b, MakeImage(2, {DeadJob(2, DeadReason::kFailed, "x"), changed, Job(4), Job(5)}));
  auto r = Jobsnap({"diff", a, b});
  EXPECT_EQ(r.code, kDiffers) << r;
  EXPECT_TRUE(Contains(r.out, "added   1: 4")) << r;
  EXPECT_TRUE(Contains(r.out, "removed 1: 1")) << r;
  EXPECT_TRUE(Contains(r.out, "3: attempts, payload")) << r;
  auto j = ParseJson(Jobsnap({"diff", "--json", a, b}));
  EXPECT_EQ(j["added"], json::array({4}));
  EXPECT_EQ(j["removed"], json::array({1}));
  ASSERT_EQ(j["changed"].size(), 2u);
  EXPECT_EQ(j["changed"][0]["id"], 2);
  const auto fields = j["changed"][0]["fields"].get<std::vector<std::string>>();
  for (const char* f : {"state", "dead_reason", "error", "attempts", "dead_at"}) {
    EXPECT_NE(std::find(fields.begin(), fields.end(), f), fields.end()) << f;
  }
  EXPECT_EQ(j["same"], false);
  auto same = Jobsnap({"diff", a, a});
  EXPECT_EQ(same.code, kOk) << same;
  EXPECT_TRUE(Contains(same.out, "same jobs")) << same;
}

TEST(JobsnapDiffTest, ComparesADirectorysNewestWithASegment) {
  TempDir tmp;
  ShmCleanup shm;
  PutGeneration(tmp.snap(), 1, {Job(1), Job(2)});
  {
    auto store = persist::ShmStore::open_or_create(shm.name, 0);
    ASSERT_TRUE(IsOk(store));
    ASSERT_TRUE((*store)->publish(2, MakeImage(2, {Job(2), Job(3)})).ok());
  }
  auto j = ParseJson(Jobsnap({"diff", "--json", tmp.snap(), "shm:" + shm.name}));
  EXPECT_EQ(j["added"], json::array({3}));
  EXPECT_EQ(j["removed"], json::array({1}));
  EXPECT_EQ(Jobsnap({"diff", tmp.snap(), kGolden + "/nope"}).code, kNotFound);
}

TEST(JobsnapDiffTest, DamagedSnapshotFailsWithItsClassNamingTheSide) {
  TempDir tmp;
  const std::string good = tmp.path() + "/good.jobsnap", bad = tmp.path() + "/bad.jobsnap";
  WriteBytes(good, MakeImage(1, {Job(1)}));
  auto bytes = MakeImage(2, {Job(1), Job(2)});
  bytes.resize(bytes.size() - 1);
  WriteBytes(bad, bytes);
  auto r = Jobsnap({"diff", good, bad});
  EXPECT_EQ(r.code, kTruncated) << r;
  EXPECT_TRUE(Contains(r.err, "(in " + bad + ")")) << r;
  FlipByte(good, 100);
  r = Jobsnap({"diff", good, bad});
  EXPECT_EQ(r.code, kCorrupt) << r;
  EXPECT_TRUE(Contains(r.err, "(in " + good + ")")) << r;
}

// ---- requeue and drop ------------------------------------------------------------------

TEST(JobsnapEditTest, RequeueMovesADeadJobBackToPendingInANewGeneration) {
  TempDir tmp;
  PutGeneration(tmp.snap(), 5, {DeadJob(7, DeadReason::kPoison, "poison job: boom"), Job(8)});
  const auto old_bytes = ReadBytes(GenPath(tmp.snap(), 5));
  auto r = Jobsnap({"requeue", tmp.snap(), "7"});
  ASSERT_EQ(r.code, kOk) << r;
  EXPECT_TRUE(Contains(r.out, GenPath(tmp.snap(), 6))) << r;
  EXPECT_EQ(ReadBytes(GenPath(tmp.snap(), 5)), old_bytes) << "a generation was edited in place";
  auto bytes = ReadBytes(GenPath(tmp.snap(), 6));
  auto view = snapshot::decode(bytes);
  ASSERT_TRUE(IsOk(view));
  EXPECT_EQ(view->header.generation, 6u);
  ASSERT_EQ(view->jobs.size(), 2u);
  const auto& j = view->jobs[0];
  EXPECT_EQ(j.id, 7u);
  EXPECT_EQ(j.state, JobState::kPending);
  EXPECT_EQ(j.dead_reason, DeadReason::kNone);
  EXPECT_EQ(j.recoveries, 0u);
  EXPECT_EQ(j.attempts, 0u);
  EXPECT_EQ(j.dead_at_ns, 0);
  EXPECT_EQ(j.error, "poison job: boom") << "the last error is kept";
  EXPECT_EQ(j.payload, "payload");
  EXPECT_EQ(view->jobs[1].id, 8u);
  auto json_out = ParseJson(Jobsnap({"list", "--json", tmp.snap()}));
  EXPECT_EQ(json_out[0]["loaded_next"], true);
}

TEST(JobsnapEditTest, RequeueOfALiveJobIsRefusedAndAnUnknownIdIsNotFound) {
  TempDir tmp;
  PutGeneration(tmp.snap(), 5, {DeadJob(7, DeadReason::kFailed, "boom"), Job(8)});
  auto r = Jobsnap({"requeue", tmp.snap(), "7", "8"});
  EXPECT_EQ(r.code, kRefused) << r;
  EXPECT_TRUE(Contains(r.err, "8 (pending)")) << r;
  r = Jobsnap({"requeue", tmp.snap(), "7", "99"});
  EXPECT_EQ(r.code, kNotFound) << r;
  EXPECT_TRUE(Contains(r.err, "99")) << r;
  r = Jobsnap({"drop", tmp.snap(), "99"});
  EXPECT_EQ(r.code, kNotFound) << r;
  EXPECT_FALSE(fs::exists(GenPath(tmp.snap(), 6))) << "a refused edit wrote a generation";
}

// A requeued job keeps its unique key (as Engine::requeue_dead() does), so
// a key another pending job holds, or another requeued one, refuses the edit.
TEST(JobsnapEditTest, RequeueKeepsTheKeyAndRefusesOneThatIsTaken) {
  TempDir tmp;
  auto keyed = [](JobRecord r, std::string_view key) {
    r.key = key;
    return r;
  };
  PutGeneration(tmp.snap(), 5,
                {keyed(DeadJob(7, DeadReason::kFailed, "boom"), "order-1"),
                 keyed(DeadJob(8, DeadReason::kFailed, "boom"), "order-2"),
                 keyed(DeadJob(9, DeadReason::kFailed, "boom"), "order-2"),
                 keyed(Job(10), "order-1")});
  auto r = Jobsnap({"requeue", tmp.snap(), "7"});
  EXPECT_EQ(r.code, kRefused) << r;
  EXPECT_TRUE(Contains(r.err, "job 7: its unique key (7 bytes) is held by pending job 10")) << r;
  r = Jobsnap({"requeue", tmp.snap(), "8", "9"});
  EXPECT_EQ(r.code, kRefused) << r;
  EXPECT_TRUE(Contains(r.err, "held by job 8, requeued too")) << r;
  EXPECT_FALSE(fs::exists(GenPath(tmp.snap(), 6))) << "a refused edit wrote a generation";
  r = Jobsnap({"requeue", tmp.snap(), "8"});
  ASSERT_EQ(r.code, kOk) << r;
  auto bytes = ReadBytes(GenPath(tmp.snap(), 6));
  auto view = snapshot::decode(bytes);
  ASSERT_TRUE(IsOk(view));
  ASSERT_EQ(view->jobs.size(), 4u);
  EXPECT_EQ(view->jobs[1].id, 8u);
  EXPECT_EQ(view->jobs[1].state, JobState::kPending);
  EXPECT_EQ(view->jobs[1].key, "order-2");
}

TEST(JobsnapEditTest, DropRemovesJobsOfAnyStateInANewGeneration) {
  TempDir tmp;
  PutGeneration(tmp.snap(), 2, {DeadJob(7, DeadReason::kFailed, "boom"), Job(8), Job(9)});
  auto r = Jobsnap({"drop", "--json", tmp.snap(), "7", "9"});
  ASSERT_EQ(r.code, kOk) << r;
  auto j = ParseJson(r);
  EXPECT_EQ(j["generation"], 3);
  EXPECT_EQ(j["from_generation"], 2);
  EXPECT_EQ(j["jobs"], 1);
  EXPECT_EQ(IdsOf(ReadBytes(GenPath(tmp.snap(), 3))), std::set<JobId>{8});
  EXPECT_EQ(IdsOf(ReadBytes(GenPath(tmp.snap(), 2))), (std::set<JobId>{7, 8, 9}));
}

TEST(JobsnapEditTest, EditStartsFromTheNewestValidGenerationOrTheOneGiven) {
  TempDir tmp;
  PutGeneration(tmp.snap(), 1, {Job(1), Job(2)});
  PutGeneration(tmp.snap(), 2, {Job(1), Job(2), Job(3)});
  PutGeneration(tmp.snap(), 3, {Job(1)});
  FlipByte(GenPath(tmp.snap(), 3), 120);  // the engine would skip it
  EXPECT_EQ(Jobsnap({"drop", tmp.snap(), "1", "--from", "3"}).code, kCorrupt);
  auto r = Jobsnap({"drop", tmp.snap(), "3"});
  ASSERT_EQ(r.code, kOk) << r;
  EXPECT_EQ(IdsOf(ReadBytes(GenPath(tmp.snap(), 4))), (std::set<JobId>{1, 2}));
  r = Jobsnap({"drop", tmp.snap(), "2", "--from", "1"});
  ASSERT_EQ(r.code, kOk) << r;
  EXPECT_EQ(IdsOf(ReadBytes(GenPath(tmp.snap(), 5))), std::set<JobId>{1});
}

TEST(JobsnapEditTest, EditOfADirectoryWhereNothingVerifiesIsCorruptAndWritesNothing) {
  TempDir tmp;
  PutGeneration(tmp.snap(), 1, {DeadJob(7, DeadReason::kFailed, "boom")});
  auto bytes = ReadBytes(GenPath(tmp.snap(), 1));
  WriteBytes(GenPath(tmp.snap(), 1), std::vector<unsigned char>(bytes.begin(), bytes.begin() + 90));
  auto r = Jobsnap({"requeue", tmp.snap(), "7"});
  EXPECT_EQ(r.code, kCorrupt) << r;
  EXPECT_TRUE(Contains(r.err, "verifies")) << r;
  EXPECT_TRUE(Contains(r.err, GenPath(tmp.snap(), 1))) << r;
  EXPECT_FALSE(fs::exists(GenPath(tmp.snap(), 2)));
  TempDir empty;
  EXPECT_EQ(Jobsnap({"drop", empty.snap(), "7"}).code, kNotFound);
  EXPECT_EQ(Jobsnap({"drop", empty.path() + "/missing", "7"}).code, kNotFound);
  EXPECT_FALSE(fs::exists(empty.path() + "/missing")) << "an edit created a directory";
}

TEST(JobsnapRestoreTest, RestoreFromATruncatedOrHostileFileIsRefused) {
  TempDir tmp;
  PutGeneration(tmp.snap(), 1, {Job(1)});
  const std::string cut = tmp.path() + "/cut.jobsnap";
  auto bytes = MakeImage(5, {Job(2)});
  WriteBytes(cut, std::vector<unsigned char>(bytes.begin(), bytes.begin() + 150));
  EXPECT_EQ(Jobsnap({"restore", tmp.snap(), "--from-file", cut}).code, kTruncated);
  const std::string fifo = tmp.path() + "/fifo";
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0);
  EXPECT_EQ(Jobsnap({"restore", tmp.snap(), "--from-file", fifo}).code, kRefusedInput);
  EXPECT_EQ(Jobsnap({"restore", tmp.snap(), "--from-file", "/dev/null"}).code, kRefusedInput);
  EXPECT_FALSE(fs::exists(GenPath(tmp.snap(), 2)));
}

TEST(JobsnapEditTest, EditsAndRestoreAreRefusedWhileAnEngineHoldsTheDirectory) {
  TempDir tmp;
  PutGeneration(tmp.snap(), 5, {DeadJob(7, DeadReason::kFailed, "boom"), Job(8)});
  auto engine = Engine::open(DiskOptions(tmp.snap()));
  ASSERT_TRUE(IsOk(engine));
  const auto before = Fingerprint(tmp.snap());
  for (const auto& args : std::vector<std::vector<std::string>>{
           {"requeue", tmp.snap(), "7"},
           {"drop", tmp.snap(), "8"},
           {"restore", tmp.snap(), "--generation", "5"}}) {
    auto r = Jobsnap(args);
    EXPECT_EQ(r.code, kLocked) << r;
    EXPECT_TRUE(Contains(r.err, "another engine holds")) << r;
  }
  EXPECT_EQ(Fingerprint(tmp.snap()), before);
  // Reading is fine while it runs.
  EXPECT_EQ(Jobsnap({"list", tmp.snap()}).code, kOk);
}

TEST(JobsnapEditTest, EditIsRefusedWhileAnEngineWritesTheSegment) {
  TempDir tmp;
  ShmCleanup shm;
  PutGeneration(tmp.snap(), 5, {DeadJob(7, DeadReason::kFailed, "boom")});
  auto writer = persist::ShmStore::open_or_create(shm.name, 0);
  ASSERT_TRUE(IsOk(writer));
  auto r = Jobsnap({"requeue", tmp.snap(), "7", "--shm", shm.name});
  EXPECT_EQ(r.code, kLocked) << r;
  EXPECT_FALSE(fs::exists(GenPath(tmp.snap(), 6)));
}

TEST(JobsnapEditTest, RequeueWithASegmentStartsFromItsNewerImageAndWritesBothStores) {
  TempDir tmp;
  ShmCleanup shm;
  PutGeneration(tmp.snap(), 5, {DeadJob(7, DeadReason::kFailed, "boom")});
  {
    auto store = persist::ShmStore::open_or_create(shm.name, 0);
    ASSERT_TRUE(IsOk(store));
    ASSERT_TRUE((*store)->publish(9, MakeImage(9, {DeadJob(7, DeadReason::kFailed, "boom"), Job(8)})).ok());
  }
  auto r = Jobsnap({"requeue", "--json", tmp.snap(), "7", "--shm", shm.name});
  ASSERT_EQ(r.code, kOk) << r;
  auto j = ParseJson(r);
  EXPECT_EQ(j["from_source"], "shm:" + shm.name);
  EXPECT_EQ(j["generation"], 10);
  EXPECT_EQ(IdsOf(ReadBytes(GenPath(tmp.snap(), 10))), (std::set<JobId>{7, 8}));
  auto in_shm = persist::ShmStore::read_existing(shm.name);
  ASSERT_TRUE(IsOk(in_shm));
  EXPECT_EQ(*in_shm, ReadBytes(GenPath(tmp.snap(), 10)));
}

TEST(JobsnapEditTest, RequeuedPoisonJobRunsAtTheNextEngineStart) {
  TempDir tmp;
  JobRecord poison = DeadJob(7, DeadReason::kPoison, "poison job: running at 4 snapshots");
  poison.payload = "the job";
  PutGeneration(tmp.snap(), 5, {poison});
  ASSERT_EQ(Jobsnap({"requeue", tmp.snap(), "7"}).code, kOk);
  auto e = Engine::open(DiskOptions(tmp.snap()));
  ASSERT_TRUE(IsOk(e));
  std::atomic<int> ran{0};
  std::string seen;
  std::mutex mu;
  ASSERT_TRUE(IsOk(e->register_handler("work", [&](JobContext& job) {
    std::lock_guard<std::mutex> l(mu);
    seen = std::string(job.payload());
    ran.fetch_add(1);
    return Outcome::kDone;
  })));
  auto started = e->start();
  ASSERT_TRUE(IsOk(started));
  EXPECT_EQ(started->recovery.generation, 6u);
  EXPECT_EQ(started->recovery.pending, 1u);
  EXPECT_EQ(started->recovery.dead, 0u);
  ASSERT_TRUE(IsOk(e->stop(StopMode::kDrain)));
  EXPECT_EQ(ran.load(), 1);
  EXPECT_EQ(seen, "the job");
}

// ---- restore ---------------------------------------------------------------------------

// Generations written by a real engine: 1, 2 and 3 with 3, 6 and 9 jobs of
// handler "work", then 4, empty, by stop(kAbandon)'s final snapshot.
struct EngineHistory {
  std::vector<std::set<JobId>> ids;  // ids[g - 1]: the jobs of generation g
  std::uint64_t next_job_id = 0;     // of the newest
};

EngineHistory WriteThreeGenerations(const std::string& dir) {
  EngineHistory h;
  auto e = Engine::open(DiskOptions(dir));
  EXPECT_TRUE(IsOk(e));
  if (!e) return h;
  Gate gate;
  auto work = e->register_handler("work", [&](JobContext&) {
    gate.wait();
    return Outcome::kDone;
  });
  EXPECT_TRUE(IsOk(e->start()));
  for (int g = 1; g <= 3; ++g) {
    std::string payload = "g";
    payload += std::to_string(g);
    for (int i = 0; i < 3; ++i) EXPECT_TRUE(IsOk(e->submit(*work, payload)));
    auto snap = e->snapshot_now();
    EXPECT_TRUE(IsOk(snap));
    if (!snap) return h;
    EXPECT_EQ(snap->generation, static_cast<std::uint64_t>(g));
    h.ids.push_back(IdsOf(ReadBytes(snap->path)));
  }
  gate.open();
  EXPECT_TRUE(IsOk(e->stop(StopMode::kAbandon)));
  auto bytes = ReadBytes(GenPath(dir, 4));
  auto view = snapshot::decode(bytes);
  EXPECT_TRUE(IsOk(view));
  if (view) h.next_job_id = view->header.next_job_id;
  return h;
}

// What an engine started on these stores loads: the recovery report and the
// ids of the jobs it holds (from a snapshot it takes at once).
struct Started {
  RecoveryReport recovery;
  std::set<JobId> ids;
  JobId next_submitted = 0;
};

Started StartEngine(const std::string& dir, const std::string& shm = "") {
  Started s;
  EngineOptions o = DiskOptions(dir);
  o.snapshot.shm_name = shm;
  if (dir.empty()) o.snapshot.dir.clear();
  auto e = Engine::open(o);
  EXPECT_TRUE(IsOk(e));
  if (!e) return s;
  Gate gate;
  auto work = e->register_handler("work", [&](JobContext&) {
    gate.wait();
    return Outcome::kDone;
  });
  auto started = e->start();
  EXPECT_TRUE(IsOk(started));
  if (!started) return s;
  s.recovery = started->recovery;
  if (!dir.empty()) {
    auto snap = e->snapshot_now();
    EXPECT_TRUE(IsOk(snap));
    if (snap) s.ids = IdsOf(ReadBytes(snap->path));
  }
  auto id = e->submit(*work, "after");
  EXPECT_TRUE(IsOk(id));
  if (id) s.next_submitted = *id;
  gate.open();
  EXPECT_TRUE(IsOk(e->stop(StopMode::kAbandon)));
  return s;
}

TEST(JobsnapRestoreTest, RestoreThenEngineStartLoadsExactlyTheChosenGeneration) {
  TempDir tmp;
  const EngineHistory h = WriteThreeGenerations(tmp.snap());
  ASSERT_EQ(h.ids.size(), 3u);
  ASSERT_NE(h.ids[1], h.ids[2]);
  const auto gen3 = ReadBytes(GenPath(tmp.snap(), 3));

  auto r = Jobsnap({"restore", tmp.snap(), "--generation", "2"});
  ASSERT_EQ(r.code, kOk) << r;
  EXPECT_TRUE(Contains(r.out, "written as generation 5")) << r;
  EXPECT_TRUE(Contains(r.out, "kept aside in " + tmp.snap() + "/aside-")) << r;
  EXPECT_TRUE(Contains(r.out, "--shm NAME")) << r << "\n(the note about a segment)";
  // Generations 3 and 4 are kept, byte for byte, where the tool said.
  EXPECT_FALSE(fs::exists(GenPath(tmp.snap(), 3)));
  EXPECT_FALSE(fs::exists(GenPath(tmp.snap(), 4)));
  std::string aside;
  for (const auto& e : fs::directory_iterator(tmp.snap())) {
    if (e.path().filename().string().rfind("aside-", 0) == 0) aside = e.path().string();
  }
  ASSERT_FALSE(aside.empty());
  EXPECT_TRUE(Contains(r.out, aside + "/gen-00000000000000000003.jobsnap")) << r;
  EXPECT_TRUE(Contains(r.out, aside + "/gen-00000000000000000004.jobsnap")) << r;
  EXPECT_EQ(ReadBytes(GenPath(aside, 3)), gen3);
  EXPECT_TRUE(fs::exists(GenPath(tmp.snap(), 1)));
  EXPECT_TRUE(fs::exists(GenPath(tmp.snap(), 2)));

  const Started s = StartEngine(tmp.snap());
  EXPECT_TRUE(s.recovery.recovered);
  EXPECT_EQ(s.recovery.generation, 5u);
  EXPECT_EQ(s.recovery.source, GenPath(tmp.snap(), 5));
  EXPECT_TRUE(s.recovery.skipped.empty());
  EXPECT_EQ(s.ids, h.ids[1]) << "the engine did not load generation 2's jobs";
  EXPECT_GE(s.next_submitted, h.next_job_id) << "an id of the set-aside generation was reused";
}

TEST(JobsnapRestoreTest, RestoreOfADamagedGenerationIsRefusedAndChangesNothing) {
  TempDir tmp;
  PutGeneration(tmp.snap(), 1, {Job(1)});
  PutGeneration(tmp.snap(), 2, {Job(2)});
  FlipByte(GenPath(tmp.snap(), 1), 120);
  const auto before = Fingerprint(tmp.snap());
  auto r = Jobsnap({"restore", tmp.snap(), "-g", "1"});
  EXPECT_EQ(r.code, kCorrupt) << r;
  EXPECT_EQ(Jobsnap({"restore", tmp.snap(), "-g", "7"}).code, kNotFound);
  // Only the lock file may have appeared.
  auto after = Fingerprint(tmp.snap());
  after.erase(tmp.snap() + "/LOCK");
  after.erase(".");
  auto expected = before;
  expected.erase(".");
  EXPECT_EQ(after, expected);
}

TEST(JobsnapRestoreTest, RestoreWithTheSegmentLeavesNoNewerImageThere) {
  TempDir tmp;
  ShmCleanup shm;
  PutGeneration(tmp.snap(), 1, {Job(1), Job(2)});
  PutGeneration(tmp.snap(), 2, {Job(3)});
  {
    auto store = persist::ShmStore::open_or_create(shm.name, 0);
    ASSERT_TRUE(IsOk(store));
    ASSERT_TRUE((*store)->publish(5, MakeImage(5, {Job(3), Job(4)}, 2000)).ok());
  }
  const auto segment_image = MakeImage(5, {Job(3), Job(4)}, 2000);
  auto r = Jobsnap({"restore", "--json", tmp.snap(), "-g", "1", "--shm", shm.name});
  ASSERT_EQ(r.code, kOk) << r;
  auto j = ParseJson(r);
  EXPECT_EQ(j["generation"], 6);
  EXPECT_EQ(j["shm"], shm.name);
  // Generation 2, and the segment's newer image (5), which no file held.
  ASSERT_EQ(j["moved_aside"].size(), 2u);
  const std::string aside = j["aside_dir"];
  EXPECT_EQ(j["shm_kept"], GenPath(aside, 5));
  EXPECT_EQ(j["shm_kept_generation"], 5);
  EXPECT_EQ(ReadBytes(GenPath(aside, 5)), segment_image) << "the segment's image was not kept";
  const Started s = StartEngine(tmp.snap(), shm.name);
  EXPECT_EQ(s.recovery.generation, 6u);
  EXPECT_EQ(s.ids, (std::set<JobId>{1, 2}));
  EXPECT_GE(s.next_submitted, 2000u) << "ids must not go back below the segment's counter";
}

TEST(JobsnapRestoreTest, RestoreFromTheSegmentToDisk) {
  TempDir tmp;
  ShmCleanup shm;
  PutGeneration(tmp.snap(), 1, {Job(1)});
  PutGeneration(tmp.snap(), 2, {Job(2)});
  {
    auto store = persist::ShmStore::open_or_create(shm.name, 0);
    ASSERT_TRUE(IsOk(store));
    ASSERT_TRUE((*store)->publish(9, MakeImage(9, {Job(5), Job(6)})).ok());
  }
  auto r = Jobsnap({"restore", tmp.snap(), "--from-shm", shm.name});
  ASSERT_EQ(r.code, kOk) << r;
  EXPECT_EQ(IdsOf(ReadBytes(GenPath(tmp.snap(), 10))), (std::set<JobId>{5, 6}));
  const Started s = StartEngine(tmp.snap());
  EXPECT_EQ(s.recovery.generation, 10u);
  EXPECT_EQ(s.ids, (std::set<JobId>{5, 6}));
  // Into a directory that does not exist yet: it is created.
  const std::string fresh = tmp.path() + "/fresh";
  r = Jobsnap({"restore", fresh, "--from-shm", shm.name});
  ASSERT_EQ(r.code, kOk) << r;
  EXPECT_EQ(IdsOf(ReadBytes(GenPath(fresh, 10))), (std::set<JobId>{5, 6}));
}

TEST(JobsnapRestoreTest, RestoreFromDiskIntoTheSegmentOnly) {
  TempDir tmp;
  ShmCleanup shm;
  PutGeneration(tmp.snap(), 1, {Job(1)});
  PutGeneration(tmp.snap(), 2, {Job(2)});
  {
    auto store = persist::ShmStore::open_or_create(shm.name, 0);
    ASSERT_TRUE(IsOk(store));
    ASSERT_TRUE((*store)->publish(4, MakeImage(4, {Job(3)})).ok());
  }
  const auto g1 = ReadBytes(GenPath(tmp.snap(), 1)), g2 = ReadBytes(GenPath(tmp.snap(), 2));
  auto r = Jobsnap({"restore", "--json", tmp.snap(), "-g", "1", "--to-shm", shm.name});
  ASSERT_EQ(r.code, kOk) << r;
  // The directory's generations are untouched; the segment's image (4, which
  // no file of it held) is kept in its aside directory, which no engine reads.
  auto j = ParseJson(r);
  const std::string aside = j["aside_dir"];
  EXPECT_EQ(aside.rfind(tmp.snap() + "/aside-", 0), 0u) << r;
  EXPECT_EQ(j["shm_kept"], GenPath(aside, 4));
  EXPECT_EQ(ReadBytes(GenPath(aside, 4)), MakeImage(4, {Job(3)}));
  EXPECT_EQ(ReadBytes(GenPath(tmp.snap(), 1)), g1);
  EXPECT_EQ(ReadBytes(GenPath(tmp.snap(), 2)), g2);
  EXPECT_FALSE(fs::exists(GenPath(tmp.snap(), 5))) << "--to-shm published to the directory";
  const Started s = StartEngine("", shm.name);
  EXPECT_EQ(s.recovery.source, "shm:" + shm.name);
  EXPECT_EQ(s.recovery.generation, 5u);
  EXPECT_EQ(s.recovery.pending, 1u);
  // A file from anywhere (here a golden image of generation 42) goes above
  // what the segment holds (the engine's final snapshot at stop: 6).
  auto r2 = Jobsnap({"restore", kGolden + "/v2-mixed.jobsnap", "--to-shm", shm.name});
  ASSERT_EQ(r2.code, kOk) << r2;
  auto i = ParseJson(Jobsnap({"inspect", "--json", "--shm", shm.name}));
  EXPECT_EQ(i["header"]["generation"], 43);
  EXPECT_EQ(i["jobs"]["total"], 50);
}

// A single file into the segment only has nowhere to keep the segment's
// newer image: refused, naming the way that keeps it.
TEST(JobsnapRestoreTest, RestoreOfAFileIntoANewerSegmentOnlyIsRefused) {
  TempDir tmp;
  ShmCleanup shm;
  const std::string file = tmp.path() + "/old.jobsnap";
  WriteBytes(file, MakeImage(3, {Job(1)}));
  const auto newer = MakeImage(8, {Job(1), Job(2)});
  {
    auto store = persist::ShmStore::open_or_create(shm.name, 0);
    ASSERT_TRUE(IsOk(store));
    ASSERT_TRUE((*store)->publish(8, newer).ok());
  }
  auto r = Jobsnap({"restore", file, "--to-shm", shm.name});
  EXPECT_EQ(r.code, kRefused) << r;
  EXPECT_TRUE(Contains(r.err, "refused")) << r;
  EXPECT_TRUE(Contains(r.err, "holds generation 8")) << r;
  EXPECT_TRUE(Contains(r.err, "jobsnap restore DIR --from-file " + file + " --shm " + shm.name))
      << r;
  auto in_shm = persist::ShmStore::read_existing(shm.name);
  ASSERT_TRUE(IsOk(in_shm));
  EXPECT_EQ(*in_shm, newer) << "a refused restore wrote the segment";
  // The way it names: the segment's image is kept aside in DIR.
  r = Jobsnap({"restore", "--json", tmp.snap(), "--from-file", file, "--shm", shm.name});
  ASSERT_EQ(r.code, kOk) << r;
  auto j = ParseJson(r);
  EXPECT_EQ(j["generation"], 9);
  const std::string kept = j["shm_kept"];
  EXPECT_EQ(ReadBytes(kept), newer);
  EXPECT_EQ(kept, GenPath(j["aside_dir"].get<std::string>(), 8));
  // An older segment image is not "newer": the file goes above it.
  TempDir tmp2;
  const std::string newest = tmp2.path() + "/newest.jobsnap";
  WriteBytes(newest, MakeImage(20, {Job(5)}));
  r = Jobsnap({"restore", newest, "--to-shm", shm.name});
  EXPECT_EQ(r.code, kOk) << r;
}

TEST(JobsnapRestoreTest, RestoreFromAFileKeptAsideUndoesARestore) {
  TempDir tmp;
  PutGeneration(tmp.snap(), 1, {Job(1)});
  PutGeneration(tmp.snap(), 2, {Job(2)});
  auto j = ParseJson(Jobsnap({"restore", "--json", tmp.snap(), "-g", "1"}));
  ASSERT_EQ(j["moved_aside"].size(), 1u);
  const std::string kept = j["moved_aside"][0];
  auto r = Jobsnap({"restore", tmp.snap(), "--from-file", kept});
  ASSERT_EQ(r.code, kOk) << r;
  const Started s = StartEngine(tmp.snap());
  EXPECT_EQ(s.recovery.generation, 4u);
  EXPECT_EQ(s.ids, std::set<JobId>{2});
}

// ---- an edit keeps what is newer than its source, as restore does ---------------------
//
// An edit publishes above every generation; the files above its source
// (--from N, or newer files that did not verify) would be left below the
// new one, never loaded again and pruned by retention. They are moved into
// DIR/aside-<UTC time>/, as restore moves them.

// The generations of the files named gen-<20 digits>.jobsnap directly in `dir`.
std::set<std::uint64_t> GenerationsIn(const std::string& dir) {
  std::set<std::uint64_t> out;
  for (const auto& e : fs::directory_iterator(dir)) {
    if (!e.is_regular_file()) continue;
    if (auto g = snapshot_tools::generation_of_name(e.path().string())) out.insert(*g);
  }
  return out;
}

// The aside-* subdirectories of `dir`.
std::vector<std::string> AsideDirs(const std::string& dir) {
  std::vector<std::string> out;
  for (const auto& e : fs::directory_iterator(dir)) {
    if (e.path().filename().string().rfind("aside-", 0) == 0) out.push_back(e.path().string());
  }
  std::sort(out.begin(), out.end());
  return out;
}

TEST(JobsnapEditTest, DropFromAnOlderGenerationMovesTheNewerOnesAside) {
  TempDir tmp;
  PutGeneration(tmp.snap(), 1, {Job(1), Job(2), Job(3)});
  PutGeneration(tmp.snap(), 2, {Job(1), Job(2), Job(3), Job(4)});
  PutGeneration(tmp.snap(), 3, {Job(1), Job(4), Job(5)});
  const auto gen2 = ReadBytes(GenPath(tmp.snap(), 2));
  const auto gen3 = ReadBytes(GenPath(tmp.snap(), 3));
  auto r = Jobsnap({"drop", "--json", tmp.snap(), "2", "--from", "1"});
  ASSERT_EQ(r.code, kOk) << r;
  auto j = ParseJson(r);
  EXPECT_EQ(j["from_generation"], 1);
  EXPECT_EQ(j["generation"], 4);
  ASSERT_EQ(AsideDirs(tmp.snap()).size(), 1u);
  const std::string aside = AsideDirs(tmp.snap())[0];
  EXPECT_EQ(j["aside_dir"], aside);
  EXPECT_EQ(j["moved_aside"], json::array({GenPath(aside, 3), GenPath(aside, 2)}));
  EXPECT_EQ(ReadBytes(GenPath(aside, 2)), gen2);
  EXPECT_EQ(ReadBytes(GenPath(aside, 3)), gen3);
  EXPECT_EQ(GenerationsIn(tmp.snap()), (std::set<std::uint64_t>{1, 4}))
      << "a generation newer than the source was left below the new one";
  EXPECT_EQ(IdsOf(ReadBytes(GenPath(tmp.snap(), 4))), (std::set<JobId>{1, 3}));
  // Text: where each file went, as restore says it.
  r = Jobsnap({"drop", tmp.snap(), "3", "--from", "1"});
  ASSERT_EQ(r.code, kOk) << r;
  ASSERT_EQ(AsideDirs(tmp.snap()).size(), 2u);
  std::string second;
  for (const auto& a : AsideDirs(tmp.snap())) {
    if (a != aside) second = a;
  }
  EXPECT_TRUE(Contains(r.out, "kept aside in " + second + "/")) << r;
  EXPECT_TRUE(Contains(r.out, "    " + GenPath(second, 4) + "\n")) << r;
  EXPECT_EQ(GenerationsIn(second), std::set<std::uint64_t>{4});
  EXPECT_EQ(GenerationsIn(tmp.snap()), (std::set<std::uint64_t>{1, 5}));
  const Started s = StartEngine(tmp.snap());
  EXPECT_EQ(s.recovery.generation, 5u);
  EXPECT_EQ(s.ids, (std::set<JobId>{1, 2}));
}

TEST(JobsnapEditTest, RequeueFromAnOlderGenerationMovesTheNewerOnesAside) {
  TempDir tmp;
  PutGeneration(tmp.snap(), 4, {DeadJob(7, DeadReason::kPoison, "boom"), Job(8)});
  PutGeneration(tmp.snap(), 5, {Job(8), Job(9)});
  PutGeneration(tmp.snap(), 6, {Job(9)});
  const auto gen5 = ReadBytes(GenPath(tmp.snap(), 5));
  const auto gen6 = ReadBytes(GenPath(tmp.snap(), 6));
  auto r = Jobsnap({"requeue", tmp.snap(), "7", "--from", "4"});
  ASSERT_EQ(r.code, kOk) << r;
  ASSERT_EQ(AsideDirs(tmp.snap()).size(), 1u);
  const std::string aside = AsideDirs(tmp.snap())[0];
  EXPECT_TRUE(Contains(r.out, "written as generation 7")) << r;
  EXPECT_TRUE(Contains(r.out, "kept aside in " + aside + "/")) << r;
  EXPECT_TRUE(Contains(r.out, GenPath(aside, 5))) << r;
  EXPECT_TRUE(Contains(r.out, GenPath(aside, 6))) << r;
  EXPECT_EQ(ReadBytes(GenPath(aside, 5)), gen5);
  EXPECT_EQ(ReadBytes(GenPath(aside, 6)), gen6);
  EXPECT_EQ(GenerationsIn(tmp.snap()), (std::set<std::uint64_t>{4, 7}));
  // From the newest generation there is nothing newer: no aside directory.
  auto j = ParseJson(Jobsnap({"requeue", "--json", tmp.snap(), "7", "--from", "4"}));
  EXPECT_EQ(j["generation"], 8);
  const std::string second = j["aside_dir"];
  EXPECT_NE(second, aside);
  EXPECT_EQ(AsideDirs(tmp.snap()),
            (std::vector<std::string>{std::min(aside, second), std::max(aside, second)}));
  EXPECT_EQ(j["moved_aside"], json::array({GenPath(second, 7)}));
  j = ParseJson(Jobsnap({"drop", "--json", tmp.snap(), "8", "--from", "8"}));
  EXPECT_EQ(j["generation"], 9);
  EXPECT_EQ(j["aside_dir"], "");
  EXPECT_EQ(j["moved_aside"], json::array());
  EXPECT_EQ(AsideDirs(tmp.snap()).size(), 2u);
  const Started s = StartEngine(tmp.snap());
  EXPECT_EQ(s.recovery.generation, 9u);
  EXPECT_EQ(s.ids, std::set<JobId>{7});
}

// Without --from the source is the newest that verifies: what is newer did
// not verify, and is moved aside as it is, not left under the new generation.
TEST(JobsnapEditTest, AnEditWithoutFromMovesANewerDamagedFileAside) {
  TempDir tmp;
  PutGeneration(tmp.snap(), 1, {Job(1), Job(2)});
  PutGeneration(tmp.snap(), 2, {Job(1), Job(2), Job(3)});
  PutGeneration(tmp.snap(), 3, {Job(1)});
  FlipByte(GenPath(tmp.snap(), 3), 120);
  const auto damaged = ReadBytes(GenPath(tmp.snap(), 3));
  auto r = Jobsnap({"drop", "--json", tmp.snap(), "3"});
  ASSERT_EQ(r.code, kOk) << r;
  auto j = ParseJson(r);
  EXPECT_EQ(j["from_generation"], 2);
  EXPECT_EQ(j["generation"], 4);
  const std::string aside = j["aside_dir"];
  EXPECT_EQ(AsideDirs(tmp.snap()), std::vector<std::string>{aside});
  EXPECT_EQ(j["moved_aside"], json::array({GenPath(aside, 3)}));
  EXPECT_EQ(ReadBytes(GenPath(aside, 3)), damaged);
  EXPECT_EQ(GenerationsIn(tmp.snap()), (std::set<std::uint64_t>{1, 2, 4}));
  EXPECT_EQ(IdsOf(ReadBytes(GenPath(tmp.snap(), 4))), (std::set<JobId>{1, 2}));
}

// Refused (an id that is not there, a job that is not dead), an edit from
// an older generation moves nothing and makes no aside directory.
TEST(JobsnapEditTest, ARefusedEditFromAnOlderGenerationLeavesTheDirectoryAsItWas) {
  TempDir tmp;
  PutGeneration(tmp.snap(), 1, {DeadJob(7, DeadReason::kFailed, "boom"), Job(8)});
  PutGeneration(tmp.snap(), 2, {Job(8)});
  PutGeneration(tmp.snap(), 3, {Job(9)});
  FlipByte(GenPath(tmp.snap(), 3), 120);
  const auto files = [&tmp] {
    auto f = Fingerprint(tmp.snap());
    f.erase(".");  // LOCK came and went
    return f;
  };
  const auto before = files();
  for (const auto& args : std::vector<std::vector<std::string>>{
           {"drop", tmp.snap(), "99", "--from", "1"},
           {"requeue", tmp.snap(), "8", "--from", "1"},
           {"requeue", tmp.snap(), "7", "99", "--from", "1"},
           {"drop", tmp.snap(), "7"}}) {  // generation 2 has no job 7
    auto r = Jobsnap(args);
    EXPECT_NE(r.code, kOk) << r;
    EXPECT_EQ(files(), before) << r;
    EXPECT_TRUE(AsideDirs(tmp.snap()).empty()) << r;
  }
}

// ---- the segment's image is kept, never overwritten unkept -----------------------------

void PublishToSegment(const std::string& name, std::uint64_t generation,
                      const std::vector<unsigned char>& image) {
  auto store = persist::ShmStore::open_or_create(name, 0);
  ASSERT_TRUE(IsOk(store));
  ASSERT_TRUE((*store)->publish(generation, image).ok());
}

// The command said it kept the segment's image at `path`, and did.
void ExpectKeptAs(const RunResult& r, const std::string& path,
                  const std::vector<unsigned char>& image) {
  EXPECT_TRUE(Contains(r.out, "kept as " + path)) << r;
  EXPECT_EQ(ReadBytes(path), image) << path;
}

// The segment is older than the chosen generation and no file holds it: it
// stays an ordinary (older) generation of the directory.
TEST(JobsnapKeepTest, RestoreWithAnOlderSegmentKeepsItsImageAsAGenerationOfTheDirectory) {
  TempDir tmp;
  ShmCleanup shm;
  PutGeneration(tmp.snap(), 1, {Job(1)});
  PutGeneration(tmp.snap(), 5, {Job(5)});
  const auto segment = MakeImage(3, {Job(3)});
  PublishToSegment(shm.name, 3, segment);
  auto r = Jobsnap({"restore", tmp.snap(), "-g", "5", "--shm", shm.name});
  ASSERT_EQ(r.code, kOk) << r;
  ExpectKeptAs(r, GenPath(tmp.snap(), 3), segment);
  const Started s = StartEngine(tmp.snap(), shm.name);
  EXPECT_EQ(s.recovery.generation, 6u);
  EXPECT_EQ(s.ids, std::set<JobId>{5});
}

// A file of the directory that verifies holds the segment's generation: no
// second copy. One that does not verify holds nothing, and is never replaced.
TEST(JobsnapKeepTest, RestoreKeepsNoCopyWhereAFileHoldsTheSegmentsGeneration) {
  TempDir tmp;
  ShmCleanup shm;
  PutGeneration(tmp.snap(), 1, {Job(1)});
  PutGeneration(tmp.snap(), 4, {Job(4)});
  PublishToSegment(shm.name, 4, MakeImage(4, {Job(4)}));
  auto j = ParseJson(Jobsnap({"restore", "--json", tmp.snap(), "-g", "1", "--shm", shm.name}));
  EXPECT_EQ(j["shm_kept"], "");
  ASSERT_EQ(j["moved_aside"].size(), 1u);  // generation 4's file, which holds it
  EXPECT_EQ(j["moved_aside"][0], GenPath(j["aside_dir"].get<std::string>(), 4));

  // Generation 6's file is damaged; the segment holds a sound generation 6.
  TempDir tmp2;
  ShmCleanup shm2;
  PutGeneration(tmp2.snap(), 1, {Job(1)});
  PutGeneration(tmp2.snap(), 6, {Job(6)});
  FlipByte(GenPath(tmp2.snap(), 6), 120);
  const auto damaged = ReadBytes(GenPath(tmp2.snap(), 6));
  const auto segment = MakeImage(6, {Job(6), Job(7)});
  PublishToSegment(shm2.name, 6, segment);
  auto r = Jobsnap({"restore", "--json", tmp2.snap(), "-g", "1", "--shm", shm2.name});
  ASSERT_EQ(r.code, kOk) << r;
  j = ParseJson(r);
  const std::string aside = j["aside_dir"];
  EXPECT_EQ(ReadBytes(GenPath(aside, 6)), damaged) << "the damaged file was not moved aside";
  EXPECT_EQ(j["shm_kept"], aside + "/shm-gen-00000000000000000006.jobsnap");
  EXPECT_EQ(ReadBytes(j["shm_kept"].get<std::string>()), segment);
}

TEST(JobsnapKeepTest, RequeueAndDropWithTheSegmentKeepItsImageAsAGeneration) {
  TempDir tmp;
  ShmCleanup shm;
  PutGeneration(tmp.snap(), 5, {DeadJob(7, DeadReason::kFailed, "boom"), Job(8)});
  const auto segment = MakeImage(9, {DeadJob(7, DeadReason::kFailed, "boom"), Job(8), Job(9)});
  PublishToSegment(shm.name, 9, segment);
  // From the segment's image (the newest): 10 overwrites it there, so it is
  // kept as an older generation of the directory.
  auto r = Jobsnap({"requeue", tmp.snap(), "7", "--shm", shm.name});
  ASSERT_EQ(r.code, kOk) << r;
  ExpectKeptAs(r, GenPath(tmp.snap(), 9), segment);
  EXPECT_EQ(IdsOf(ReadBytes(GenPath(tmp.snap(), 10))), (std::set<JobId>{7, 8, 9}));
  EXPECT_TRUE(AsideDirs(tmp.snap()).empty());
  // Now a file holds the segment's generation (10): no second copy.
  auto j = ParseJson(Jobsnap({"drop", "--json", tmp.snap(), "8", "--shm", shm.name}));
  EXPECT_EQ(j["generation"], 11);
  EXPECT_EQ(j["shm_kept"], "");
  const Started s = StartEngine(tmp.snap(), shm.name);
  EXPECT_EQ(s.recovery.generation, 11u);
  EXPECT_EQ(s.ids, (std::set<JobId>{7, 9}));
}

// From an older generation, the segment's newer image goes aside with the
// newer files (as restore keeps it), not into DIR below the new generation,
// where retention would prune it.
TEST(JobsnapKeepTest, AnEditFromAnOlderGenerationKeepsTheSegmentsNewerImageAside) {
  TempDir tmp;
  ShmCleanup shm;
  PutGeneration(tmp.snap(), 5, {DeadJob(7, DeadReason::kFailed, "boom"), Job(8)});
  PutGeneration(tmp.snap(), 6, {DeadJob(7, DeadReason::kFailed, "boom"), Job(8), Job(9)});
  const auto gen6 = ReadBytes(GenPath(tmp.snap(), 6));
  const auto segment = MakeImage(9, {Job(8), Job(9), Job(10)});
  PublishToSegment(shm.name, 9, segment);
  auto r = Jobsnap({"requeue", "--json", tmp.snap(), "7", "--from", "5", "--shm", shm.name});
  ASSERT_EQ(r.code, kOk) << r;
  auto j = ParseJson(r);
  EXPECT_EQ(j["generation"], 10);
  EXPECT_EQ(j["shm"], shm.name);
  const std::string aside = j["aside_dir"];
  EXPECT_EQ(AsideDirs(tmp.snap()), std::vector<std::string>{aside});
  EXPECT_EQ(j["shm_kept"], GenPath(aside, 9));
  EXPECT_EQ(j["shm_kept_generation"], 9);
  EXPECT_EQ(j["moved_aside"], json::array({GenPath(aside, 9), GenPath(aside, 6)}));
  EXPECT_EQ(ReadBytes(GenPath(aside, 9)), segment) << "the segment's image was not kept aside";
  EXPECT_EQ(ReadBytes(GenPath(aside, 6)), gen6);
  EXPECT_EQ(GenerationsIn(tmp.snap()), (std::set<std::uint64_t>{5, 10}));
  const Started s = StartEngine(tmp.snap(), shm.name);
  EXPECT_EQ(s.recovery.generation, 10u);
  EXPECT_EQ(s.ids, (std::set<JobId>{7, 8}));

  // Text; a damaged file of the segment's generation goes aside too, and
  // the segment's image beside it as shm-gen-<S>.
  TempDir tmp2;
  ShmCleanup shm2;
  PutGeneration(tmp2.snap(), 1, {Job(1), Job(2)});
  PutGeneration(tmp2.snap(), 4, {Job(4)});
  FlipByte(GenPath(tmp2.snap(), 4), 120);
  const auto damaged = ReadBytes(GenPath(tmp2.snap(), 4));
  const auto segment2 = MakeImage(4, {Job(4), Job(5)});
  PublishToSegment(shm2.name, 4, segment2);
  r = Jobsnap({"drop", tmp2.snap(), "2", "--from", "1", "--shm", shm2.name});
  ASSERT_EQ(r.code, kOk) << r;
  ASSERT_EQ(AsideDirs(tmp2.snap()).size(), 1u);
  const std::string aside2 = AsideDirs(tmp2.snap())[0];
  const std::string kept = aside2 + "/shm-gen-00000000000000000004.jobsnap";
  EXPECT_TRUE(Contains(r.out, "kept aside in " + aside2 + "/")) << r;
  EXPECT_TRUE(Contains(r.out, kept + "  (the image segment '" + shm2.name + "' held)")) << r;
  EXPECT_TRUE(Contains(r.out, GenPath(aside2, 4))) << r;
  EXPECT_EQ(ReadBytes(kept), segment2);
  EXPECT_EQ(ReadBytes(GenPath(aside2, 4)), damaged);
  EXPECT_EQ(GenerationsIn(tmp2.snap()), (std::set<std::uint64_t>{1, 5}));
  EXPECT_EQ(IdsOf(ReadBytes(GenPath(tmp2.snap(), 5))), std::set<JobId>{1});
}

// ---- ids never go back ---------------------------------------------------------------

TEST(JobsnapIdTest, AnOlderGenerationsIdCounterNeverComesBack) {
  TempDir tmp;
  ShmCleanup shm;
  WriteBytes(GenPath(tmp.snap(), 5), MakeImage(5, {DeadJob(7, DeadReason::kFailed, "boom")}, 10));
  WriteBytes(GenPath(tmp.snap(), 6), MakeImage(6, {Job(8)}, 100));
  auto next_id = [](const std::vector<unsigned char>& bytes) {
    auto view = snapshot::decode(bytes);
    EXPECT_TRUE(IsOk(view));
    return view ? view->header.next_job_id : 0;
  };
  ASSERT_EQ(Jobsnap({"requeue", tmp.snap(), "7", "--from", "5"}).code, kOk);
  EXPECT_GE(next_id(ReadBytes(GenPath(tmp.snap(), 7))), 100u);
  ASSERT_EQ(Jobsnap({"drop", tmp.snap(), "7", "--from", "5"}).code, kOk);
  EXPECT_GE(next_id(ReadBytes(GenPath(tmp.snap(), 8))), 100u);
  auto r = Jobsnap({"restore", tmp.snap(), "-g", "5", "--to-shm", shm.name});
  ASSERT_EQ(r.code, kOk) << r;
  auto in_shm = persist::ShmStore::read_existing(shm.name);
  ASSERT_TRUE(IsOk(in_shm));
  EXPECT_EQ(next_id(*in_shm), 100u);
  EXPECT_EQ(snapshot::decode(*in_shm)->header.generation, 9u);
  // The segment's own counter counts for an edit too.
  TempDir tmp2;
  ShmCleanup shm2;
  WriteBytes(GenPath(tmp2.snap(), 5), MakeImage(5, {Job(1)}, 10));
  PublishToSegment(shm2.name, 3, MakeImage(3, {Job(1)}, 500));
  ASSERT_EQ(Jobsnap({"drop", tmp2.snap(), "1", "--shm", shm2.name}).code, kOk);
  EXPECT_EQ(next_id(ReadBytes(GenPath(tmp2.snap(), 6))), 500u);
}

// ---- another uid's directory and segment ---------------------------------------------
//
// A service runs as its own user; the operator runs jobsnap as root (sudo).
// Read commands take the service's directory and segment; write commands
// refuse the directory and say to run as its owner (tools/jobsnap.md).

// "nobody": the uid the tests give a directory or a segment to.
constexpr uid_t kOtherUid = 65534;

// chown -R `path` to `uid` (no symlink followed). EPERM when this process
// may not (not root): the caller skips.
int ChownTree(const std::string& path, uid_t uid) {
  if (::lchown(path.c_str(), uid, static_cast<gid_t>(uid)) != 0) return errno;
  if (!fs::is_directory(fs::symlink_status(path))) return 0;
  for (const auto& e : fs::recursive_directory_iterator(path)) {
    if (::lchown(e.path().c_str(), uid, static_cast<gid_t>(uid)) != 0) return errno;
  }
  return 0;
}

#define CHOWN_OR_SKIP(path, uid)                                                           \
  do {                                                                                     \
    const int chown_error = ChownTree(path, uid);                                          \
    if (chown_error == EPERM) {                                                            \
      GTEST_SKIP() << "needs root: chown " << (path) << " to uid " << (uid) << ": "        \
                   << std::strerror(chown_error);                                          \
    }                                                                                      \
    ASSERT_EQ(chown_error, 0) << "chown " << (path) << ": " << std::strerror(chown_error); \
  } while (0)

// A segment holding generation `generation` of `jobs`, published as an engine does.
void PublishSegment(const std::string& name, std::uint64_t generation,
                    const std::vector<JobRecord>& jobs) {
  auto store = persist::ShmStore::open_or_create(name, 0);
  ASSERT_TRUE(IsOk(store));
  ASSERT_TRUE((*store)->publish(generation, MakeImage(generation, jobs)).ok());
}

// Every read command refused a directory owned by another uid, even run as
// root ("owned by uid 65534, not by this process's uid 0"): an operator
// could not look at a service's snapshots with sudo.
TEST(JobsnapOwnerTest, ReadCommandsReadADirectoryOfAnotherUid) {
  TempDir tmp;
  const EngineHistory h = WriteThreeGenerations(tmp.snap());
  ASSERT_EQ(h.ids.size(), 3u);
  CHOWN_OR_SKIP(tmp.snap(), kOtherUid);
  const auto before = Fingerprint(tmp.snap());

  auto r = Jobsnap({"list", tmp.snap()});
  EXPECT_EQ(r.code, kOk) << r;
  EXPECT_TRUE(Contains(r.out, "the next engine start loads this")) << r;
  auto j = ParseJson(Jobsnap({"list", "--json", tmp.snap()}));
  ASSERT_EQ(j.size(), 4u) << j;
  EXPECT_EQ(j[0]["generation"], 4);
  EXPECT_EQ(j[0]["loaded_next"], true);
  for (const auto& g : j) EXPECT_EQ(g["valid"], true) << g;
  r = Jobsnap({"inspect", "--json", tmp.snap()});
  EXPECT_EQ(r.code, kOk) << r;
  EXPECT_EQ(ParseJson(r)["header"]["generation"], 4);
  r = Jobsnap({"inspect", tmp.snap(), "-g", "2"});
  EXPECT_EQ(r.code, kOk) << r;
  r = Jobsnap({"dump", tmp.snap(), "-g", "3"});
  EXPECT_EQ(r.code, kOk) << r;
  std::set<JobId> dumped;
  for (const auto& line : ParseJsonLines(r)) dumped.insert(line["id"].get<JobId>());
  EXPECT_EQ(dumped, h.ids[2]);
  r = Jobsnap({"verify", tmp.snap()});
  EXPECT_EQ(r.code, kOk) << r;
  EXPECT_TRUE(Contains(r.out, "sound")) << r;
  r = Jobsnap({"diff", GenPath(tmp.snap(), 2), tmp.snap()});
  EXPECT_EQ(r.code, kDiffers) << r;

  // Read only: nothing changed, and all of it is still the other uid's (the
  // LOCK too, which the engine left).
  EXPECT_EQ(Fingerprint(tmp.snap()), before);
  for (const std::string& path : {tmp.snap(), tmp.snap() + "/LOCK", GenPath(tmp.snap(), 4)}) {
    struct stat st{};
    ASSERT_EQ(::lstat(path.c_str(), &st), 0) << path;
    EXPECT_EQ(st.st_uid, kOtherUid) << path;
  }
}

// Write commands still refuse it (files root made there would be root's,
// which the engine, running as the directory's owner, could not open), but
// said only whose it was: now they say why, and to run as its owner. Exit
// status unchanged; nothing is locked, created or moved.
TEST(JobsnapOwnerTest, WriteCommandsRefuseADirectoryOfAnotherUidAndSayToRunAsItsOwner) {
  TempDir tmp;
  ShmCleanup shm;
  PutGeneration(tmp.snap(), 5, {DeadJob(7, DeadReason::kFailed, "boom"), Job(8)});
  PutGeneration(tmp.snap(), 6, {DeadJob(7, DeadReason::kFailed, "boom"), Job(8), Job(9)});
  const std::string file = tmp.path() + "/kept.jobsnap";
  WriteBytes(file, MakeImage(3, {Job(1)}));
  CHOWN_OR_SKIP(tmp.snap(), kOtherUid);
  const auto before = Fingerprint(tmp.snap());
  const std::string run_as = "sudo -u '#" + std::to_string(kOtherUid) + "' jobsnap";
  for (const auto& args : std::vector<std::vector<std::string>>{
           {"requeue", tmp.snap(), "7"},
           {"drop", tmp.snap(), "8"},
           {"drop", tmp.snap(), "8", "--shm", shm.name},
           {"restore", tmp.snap(), "--generation", "5"},
           {"restore", tmp.snap(), "--from-file", file},
           {"restore", tmp.snap(), "-g", "5", "--to-shm", shm.name},
           {"restore", tmp.snap(), "--to-shm", shm.name}}) {
    auto r = Jobsnap(args);
    EXPECT_EQ(r.code, kRefusedInput) << r;
    EXPECT_TRUE(Contains(r.err, "is owned by uid " + std::to_string(kOtherUid))) << r;
    EXPECT_TRUE(Contains(r.err, "this command writes there")) << r;
    EXPECT_TRUE(Contains(r.err, "Run jobsnap as the directory's owner: " + run_as)) << r;
  }
  auto j = ParseJson(Jobsnap({"drop", "--json", tmp.snap(), "8"}));
  EXPECT_EQ(j["error"]["class"], "refused-input");
  EXPECT_TRUE(Contains(j["error"]["message"].get<std::string>(), run_as)) << j;
  EXPECT_EQ(Fingerprint(tmp.snap()), before);
  EXPECT_FALSE(fs::exists(tmp.snap() + "/LOCK"));
  EXPECT_FALSE(fs::exists("/dev/shm/" + shm.name)) << "a refused write created the segment";
}

// Root restoring into a directory that does not exist yet, inside another
// uid's directory (the service's), would make a root-owned snapshot
// directory that the service's engine cannot open: refused, nothing made.
TEST(JobsnapOwnerTest, RootDoesNotMakeASnapshotDirectoryInsideAnotherUidsDirectory) {
  if (::geteuid() != 0) GTEST_SKIP() << "the rule is root's: run as root";
  TempDir tmp;
  const std::string home = tmp.path() + "/svc";
  ASSERT_TRUE(fs::create_directory(home));
  const std::string file = tmp.path() + "/kept.jobsnap";
  WriteBytes(file, MakeImage(3, {Job(1)}));
  CHOWN_OR_SKIP(home, kOtherUid);
  auto r = Jobsnap({"restore", home + "/snap", "--from-file", file});
  EXPECT_EQ(r.code, kRefusedInput) << r;
  EXPECT_TRUE(Contains(r.err, "which uid " + std::to_string(kOtherUid) + " owns")) << r;
  EXPECT_TRUE(Contains(r.err, "sudo -u '#" + std::to_string(kOtherUid) + "' jobsnap")) << r;
  EXPECT_FALSE(fs::exists(home + "/snap")) << "a refused restore made the directory";
  // Inside root's own directory it is made, as before.
  r = Jobsnap({"restore", tmp.path() + "/snap2", "--from-file", file});
  EXPECT_EQ(r.code, kOk) << r;
  EXPECT_TRUE(fs::exists(tmp.path() + "/snap2"));
}

// A segment is the engine's: its owner must be the uid the engine runs as.
// Alone (--shm NAME), root reads a segment of any uid: it could not be read
// at all before, even with sudo. Beside a directory, the engine is the
// directory's owner: another uid's directory takes that uid's segment
// (refused before), and root's directory refuses it, as root's engine would
// (now saying so). Mode 0600 and a regular file are required always.
TEST(JobsnapOwnerTest, ASegmentOfAnotherUidIsReadAsItsEnginesOwner) {
  TempDir mine;   // the euid's directory
  TempDir other;  // the segment owner's
  ShmCleanup shm;
  PutGeneration(mine.snap(), 4, {Job(1)});
  PutGeneration(other.snap(), 4, {Job(1)});
  PublishSegment(shm.name, 9, {Job(1), Job(2)});
  const std::string path = "/dev/shm/" + shm.name;
  CHOWN_OR_SKIP(path, kOtherUid);
  CHOWN_OR_SKIP(other.snap(), kOtherUid);
  const std::string segment_before = Slurp(path);

  // Alone, as root.
  auto r = Jobsnap({"inspect", "--json", "--shm", shm.name});
  EXPECT_EQ(r.code, kOk) << r;
  EXPECT_EQ(ParseJson(r)["header"]["generation"], 9);
  r = Jobsnap({"verify", "--shm", shm.name});
  EXPECT_EQ(r.code, kOk) << r;
  r = Jobsnap({"list", "--shm", shm.name});
  EXPECT_EQ(r.code, kOk) << r;
  EXPECT_TRUE(Contains(r.out, "the next engine start loads this")) << r;
  r = Jobsnap({"dump", "--shm", shm.name});
  EXPECT_EQ(r.code, kOk) << r;
  EXPECT_EQ(ParseJsonLines(r).size(), 2u) << r;
  r = Jobsnap({"diff", GenPath(other.snap(), 4), "shm:" + shm.name});
  EXPECT_EQ(r.code, kDiffers) << r;

  // With the directory of the segment's owner: its engine's segment.
  auto j = ParseJson(Jobsnap({"list", "--json", other.snap(), "--shm", shm.name}));
  ASSERT_EQ(j.size(), 2u) << j;
  EXPECT_EQ(j[0]["source"], "shm:" + shm.name);
  EXPECT_EQ(j[0]["loaded_next"], true);
  r = Jobsnap({"inspect", "--json", other.snap(), "--shm", shm.name});
  EXPECT_EQ(r.code, kOk) << r;
  EXPECT_EQ(ParseJson(r)["header"]["source"], "shm:" + shm.name);
  r = Jobsnap({"verify", other.snap(), "--shm", shm.name});
  EXPECT_EQ(r.code, kOk) << r;

  // With the euid's directory: not its engine's segment.
  const std::string euid = std::to_string(::geteuid());
  for (const char* cmd : {"list", "inspect", "dump", "verify"}) {
    r = Jobsnap({cmd, mine.snap(), "--shm", shm.name});
    EXPECT_EQ(r.code, kRefusedInput) << r;
    EXPECT_TRUE(Contains(r.err, "owned by uid " + std::to_string(kOtherUid))) << r;
    EXPECT_TRUE(Contains(r.err, "expected uid " + euid + " and mode 0600")) << r;
    EXPECT_TRUE(Contains(
        r.err, "an engine using " + mine.snap() + " runs as the directory's owner, uid " + euid))
        << r;
    EXPECT_FALSE(Contains(r.out, "next engine start loads")) << r;
  }
  // Writes open the segment as the engine does: their own uid's only.
  r = Jobsnap({"restore", GenPath(mine.snap(), 4), "--to-shm", shm.name});
  EXPECT_EQ(r.code, kRefusedInput) << r;
  EXPECT_TRUE(Contains(r.err, "owned by uid " + std::to_string(kOtherUid))) << r;
  EXPECT_EQ(Slurp(path), segment_before);

  // Any owner, but never another mode or kind.
  ASSERT_EQ(::chmod(path.c_str(), 0640), 0);
  for (const auto& args : std::vector<std::vector<std::string>>{
           {"inspect", "--shm", shm.name}, {"inspect", other.snap(), "--shm", shm.name}}) {
    r = Jobsnap(args);
    EXPECT_EQ(r.code, kRefusedInput) << r;
    EXPECT_TRUE(Contains(r.err, "mode 0640")) << r;
  }
}

// The OS still decides who may read: a user who is not root reading
// another's 0700 directory gets EACCES, which said only "owned by uid N, not
// by this process's uid M" (refused-input) before the directory was even
// tried. It is an I/O error naming the directory, its owner and how to run
// as them; a directory the OS lets them read is read.
TEST(JobsnapOwnerTest, AUserWhoMayNotReadAnotherUidsDirectoryIsToldWhoseItIs) {
  constexpr uid_t kOwner = 65533;  // the service; jobsnap runs as kOtherUid
  TempDir tmp;
  ShmCleanup shm;
  PutGeneration(tmp.snap(), 4, {Job(1), Job(2)});
  PublishSegment(shm.name, 9, {Job(1)});
  CHOWN_OR_SKIP(tmp.snap(), kOwner);
  CHOWN_OR_SKIP("/dev/shm/" + shm.name, kOwner);
  ASSERT_EQ(::chmod(tmp.path().c_str(), 0755), 0);  // mkdtemp's 0700 would hide all of it
  for (fs::path above = fs::path(tmp.path()).parent_path(); above != above.root_path();
       above = above.parent_path()) {
    struct stat st{};
    if (::stat(above.c_str(), &st) != 0 || (st.st_mode & S_IXOTH) == 0) {
      GTEST_SKIP() << above << " is not searchable by other users";
    }
  }
  ASSERT_EQ(::chmod(tmp.snap().c_str(), 0700), 0);
  const std::string run_as = "sudo -u '#" + std::to_string(kOwner) + "' jobsnap";

  auto r = Jobsnap({"list", tmp.snap()}, nullptr, kOtherUid);
  if (r.code == kChildCannotSwitchUid) GTEST_SKIP() << "cannot switch to uid " << kOtherUid;
  if (r.code == kChildCannotExec)
    GTEST_SKIP() << "uid " << kOtherUid << " may not run " << JOBSNAP_PATH;
  for (const auto& args :
       std::vector<std::vector<std::string>>{{"list", tmp.snap()},
                                             {"verify", tmp.snap()},
                                             {"inspect", tmp.snap(), "-g", "4"},
                                             {"inspect", GenPath(tmp.snap(), 4)}}) {
    r = Jobsnap(args, nullptr, kOtherUid);
    EXPECT_EQ(r.code, kIoError) << r;
    EXPECT_TRUE(Contains(r.out + r.err, "Permission denied")) << r;  // verify: on stdout
    EXPECT_TRUE(Contains(r.out + r.err, tmp.snap() + " is owned by uid " + std::to_string(kOwner) +
                                            " with mode 0700"))
        << r;
    EXPECT_TRUE(Contains(r.out + r.err, "run jobsnap as its owner, e.g. " + run_as)) << r;
  }
  // Its segment (0600) too: refused by the OS, and said whose it is.
  r = Jobsnap({"inspect", "--shm", shm.name}, nullptr, kOtherUid);
  EXPECT_EQ(r.code, kRefusedInput) << r;
  EXPECT_TRUE(Contains(r.err, "owned by uid " + std::to_string(kOwner))) << r;
  EXPECT_TRUE(Contains(r.err, "run jobsnap as its owner, e.g. " + run_as)) << r;

  // A directory and file the OS lets them read are read, whoever owns them.
  ASSERT_EQ(::chmod(tmp.snap().c_str(), 0755), 0);
  ASSERT_EQ(::chmod(GenPath(tmp.snap(), 4).c_str(), 0644), 0);
  r = Jobsnap({"list", tmp.snap()}, nullptr, kOtherUid);
  EXPECT_EQ(r.code, kOk) << r;
  EXPECT_TRUE(Contains(r.out, "the next engine start loads this")) << r;
  r = Jobsnap({"verify", tmp.snap()}, nullptr, kOtherUid);
  EXPECT_EQ(r.code, kOk) << r;
}

// ---- a refused command creates nothing -------------------------------------------------

TEST(JobsnapRefusedTest, ARefusedRestoreOrEditCreatesNoDirectoryLockOrSegment) {
  TempDir tmp;
  ShmCleanup shm;
  PutGeneration(tmp.snap(), 1, {DeadJob(7, DeadReason::kFailed, "boom")});
  const std::string typo = tmp.path() + "/typo";
  auto r = Jobsnap({"restore", typo, "--generation", "3"});
  EXPECT_EQ(r.code, kNotFound) << r;
  EXPECT_FALSE(fs::exists(typo)) << "a refused restore created the directory";
  EXPECT_EQ(Jobsnap({"restore", typo, "-g", "3", "--to-shm", shm.name}).code, kNotFound);
  EXPECT_FALSE(fs::exists("/dev/shm/" + shm.name)) << "a refused restore created the segment";
  // A source that does not verify: nothing created for it either.
  const std::string cut = tmp.path() + "/cut.jobsnap";
  auto bytes = MakeImage(5, {Job(2)});
  WriteBytes(cut, std::vector<unsigned char>(bytes.begin(), bytes.begin() + 150));
  EXPECT_EQ(Jobsnap({"restore", typo, "--from-file", cut, "--shm", shm.name}).code, kTruncated);
  EXPECT_EQ(Jobsnap({"restore", cut, "--to-shm", shm.name}).code, kTruncated);
  EXPECT_FALSE(fs::exists(typo));
  EXPECT_FALSE(fs::exists("/dev/shm/" + shm.name));
  EXPECT_FALSE(fs::exists(tmp.snap() + "/LOCK"));
  // Edits open only an existing segment.
  for (const char* id : {"12345", "7"}) {
    r = Jobsnap({"requeue", tmp.snap(), id, "--shm", shm.name});
    EXPECT_EQ(r.code, kNotFound) << r;
    EXPECT_TRUE(Contains(r.err, "does not exist")) << r;
    EXPECT_FALSE(fs::exists("/dev/shm/" + shm.name)) << "a refused edit created the segment";
  }
  EXPECT_EQ(Jobsnap({"drop", tmp.snap(), "7", "--shm", shm.name}).code, kNotFound);
  EXPECT_FALSE(fs::exists("/dev/shm/" + shm.name));
  EXPECT_FALSE(fs::exists(GenPath(tmp.snap(), 2)));
  // Where the manual says so, the target directory is created: for a file
  // or a segment restored into it.
  const std::string fresh = tmp.path() + "/fresh";
  ASSERT_EQ(Jobsnap({"restore", fresh, "--from-file", GenPath(tmp.snap(), 1)}).code, kOk);
  EXPECT_EQ(IdsOf(ReadBytes(GenPath(fresh, 2))), std::set<JobId>{7});
}

// The target directory and segment were made before the checks that can
// refuse (the segment's name and mode, the generation limit), so a refused
// restore left an empty segment or a new directory with its LOCK behind.
// Whatever refuses a restore now does so before anything is created, and a
// restore that fails once they are made (an engine writing the segment)
// removes what it made; never what was there before.
TEST(JobsnapRefusedTest, ARefusedRestoreLeavesNothingItCreatedBehind) {
  TempDir tmp;
  ShmCleanup fresh_shm;
  const std::string last = tmp.path() + "/last.jobsnap";
  WriteBytes(last, MakeImage(UINT64_MAX, {Job(1)}));
  const std::string good = tmp.path() + "/good.jobsnap";
  WriteBytes(good, MakeImage(4, {Job(1)}));
  const std::string nd = tmp.path() + "/new-dir";

  // The generation limit: 8, with no segment and no directory made.
  auto r = Jobsnap({"restore", last, "--to-shm", fresh_shm.name});
  EXPECT_EQ(r.code, kRefused) << r;
  EXPECT_FALSE(fs::exists("/dev/shm/" + fresh_shm.name)) << "a refused restore made the segment";
  r = Jobsnap({"restore", nd, "--from-file", last});
  EXPECT_EQ(r.code, kRefused) << r;
  EXPECT_FALSE(fs::exists(nd)) << "a refused restore made the directory";
  r = Jobsnap({"restore", nd, "--from-file", last, "--shm", fresh_shm.name});
  EXPECT_EQ(r.code, kRefused) << r;
  EXPECT_FALSE(fs::exists(nd));
  EXPECT_FALSE(fs::exists("/dev/shm/" + fresh_shm.name));

  // A segment the engine could not open (mode 0644): 6, nothing made, the
  // segment as it was.
  ShmCleanup open_shm;
  {
    auto store = persist::ShmStore::open_or_create(open_shm.name, 0);
    ASSERT_TRUE(IsOk(store));
    ASSERT_TRUE((*store)->publish(2, MakeImage(2, {Job(1)})).ok());
  }
  const std::string open_path = "/dev/shm/" + open_shm.name;
  ASSERT_EQ(::chmod(open_path.c_str(), 0644), 0);
  const std::string segment_before = Slurp(open_path);
  r = Jobsnap({"restore", nd, "--from-file", good, "--shm", open_shm.name});
  EXPECT_EQ(r.code, kRefusedInput) << r;
  EXPECT_FALSE(fs::exists(nd)) << "a refused restore left the directory and its LOCK";
  r = Jobsnap({"restore", good, "--to-shm", open_shm.name});
  EXPECT_EQ(r.code, kRefusedInput) << r;
  EXPECT_EQ(Slurp(open_path), segment_before);

  // Refused only once both are made: an engine writes the segment (7). The
  // new directory and its LOCK go again.
  ShmCleanup busy;
  auto writer = persist::ShmStore::open_or_create(busy.name, 0);
  ASSERT_TRUE(IsOk(writer));
  r = Jobsnap({"restore", nd, "--from-file", good, "--shm", busy.name});
  EXPECT_EQ(r.code, kLocked) << r;
  EXPECT_FALSE(fs::exists(nd)) << "a refused restore left the directory it made";
  // An existing directory stays, and so does its LOCK when it had one; only
  // a LOCK this restore made goes.
  r = Jobsnap({"restore", tmp.snap(), "--from-file", good, "--shm", busy.name});
  EXPECT_EQ(r.code, kLocked) << r;
  EXPECT_TRUE(fs::is_directory(tmp.snap()));
  EXPECT_FALSE(fs::exists(tmp.snap() + "/LOCK"));
  WriteBytes(tmp.snap() + "/LOCK", {});
  r = Jobsnap({"restore", tmp.snap(), "--from-file", good, "--shm", busy.name});
  EXPECT_EQ(r.code, kLocked) << r;
  EXPECT_TRUE(fs::exists(tmp.snap() + "/LOCK"));
  // The directory's lock comes before the segment is made: an engine that
  // holds the directory (7) leaves no segment made for nothing.
  TempDir held;
  auto engine = Engine::open(DiskOptions(held.snap()));
  ASSERT_TRUE(IsOk(engine));
  r = Jobsnap({"restore", held.snap(), "--from-file", good, "--shm", fresh_shm.name});
  EXPECT_EQ(r.code, kLocked) << r;
  EXPECT_FALSE(fs::exists("/dev/shm/" + fresh_shm.name));
}

// restore --from-file took what verify calls corrupt: a file named as
// generation 99 whose header says 30 (the engine passes it over in a
// directory), and a directory (whose newest generation it loaded). A file
// that does not verify is refused with its class; --from-file takes a
// regular file only (refused input otherwise).
TEST(JobsnapRestoreTest, RestoreFromAFileRefusesWhatVerifyRefusesAndADirectory) {
  TempDir tmp;
  ShmCleanup shm;
  const std::string misnamed = tmp.path() + "/gen-00000000000000000099.jobsnap";
  WriteBytes(misnamed, MakeImage(30, {Job(1)}));
  ASSERT_EQ(Jobsnap({"verify", misnamed}).code, kCorrupt);
  const std::string nd = tmp.path() + "/nd";
  for (const auto& args : std::vector<std::vector<std::string>>{
           {"restore", nd, "--from-file", misnamed},
           {"restore", tmp.snap(), "--from-file", misnamed},
           {"restore", misnamed, "--to-shm", shm.name}}) {
    auto r = Jobsnap(args);
    EXPECT_EQ(r.code, kCorrupt) << r;
    EXPECT_TRUE(Contains(r.err, "file name says generation 99, header says 30")) << r;
  }
  EXPECT_FALSE(fs::exists(nd));
  EXPECT_TRUE(fs::is_empty(tmp.snap()));
  EXPECT_FALSE(fs::exists("/dev/shm/" + shm.name));

  TempDir d2;
  PutGeneration(d2.snap(), 5, {Job(1)});
  const auto before = Fingerprint(d2.snap());
  for (const std::string& target : {d2.snap(), nd}) {
    auto r = Jobsnap({"restore", target, "--from-file", d2.snap()});
    EXPECT_EQ(r.code, kRefusedInput) << r;
    EXPECT_TRUE(Contains(r.err, "directory")) << r;
  }
  EXPECT_EQ(Fingerprint(d2.snap()), before);
  EXPECT_FALSE(fs::exists(nd));
}

// ---- generation numbers end ----------------------------------------------------------

TEST(JobsnapRefusedTest, NoGenerationPastTheLastNumberIsWritten) {
  TempDir tmp;
  const std::uint64_t last = UINT64_MAX;
  const std::string file = tmp.path() + "/last.jobsnap";
  WriteBytes(file, MakeImage(last, {Job(1)}));
  auto r = Jobsnap({"restore", tmp.snap(), "--from-file", file});
  EXPECT_EQ(r.code, kRefused) << r;
  EXPECT_TRUE(Contains(r.err, "highest a snapshot can have")) << r;
  EXPECT_FALSE(fs::exists(GenPath(tmp.snap(), 0))) << "the generation wrapped to 0";
  WriteBytes(GenPath(tmp.snap(), last), MakeImage(last, {Job(1), Job(2)}));
  // A directory the operator made 0750: a refused edit leaves its mode (the
  // store's open() made it 0700 before refusing it).
  ASSERT_EQ(::chmod(tmp.snap().c_str(), 0750), 0);
  for (const auto& args : std::vector<std::vector<std::string>>{
           {"drop", tmp.snap(), "1"}, {"restore", tmp.snap(), "--from-file", file}}) {
    r = Jobsnap(args);
    EXPECT_EQ(r.code, kRefused) << r;
    EXPECT_TRUE(Contains(r.err, "18446744073709551615")) << r;
    struct stat st {};
    ASSERT_EQ(::stat(tmp.snap().c_str(), &st), 0);
    EXPECT_EQ(st.st_mode & 07777, 0750u) << args[0] << " changed the directory's mode";
  }
  EXPECT_FALSE(fs::exists(GenPath(tmp.snap(), 0)));
}

// ---- times ---------------------------------------------------------------------------

std::vector<unsigned char> ImageAt(std::int64_t wall_time_ns, const std::vector<JobRecord>& jobs) {
  snapshot::Encoder e;
  snapshot::Header h;
  h.generation = 1;
  h.wall_time_ns = wall_time_ns;
  h.next_job_id = 100;
  e.begin(h);
  e.add_handler("work");
  for (const auto& j : jobs) e.add_job(j);
  auto image = e.finish();
  return std::vector<unsigned char>(image.begin(), image.end());
}

TEST(JobsnapTimeTest, InspectSaysInTheFutureAndSurvivesTheExtremes) {
  TempDir tmp;
  const std::string file = tmp.path() + "/t.jobsnap";
  JobRecord early = Job(1);
  early.submit_ns = INT64_MIN;
  JobRecord late = Job(2);
  late.submit_ns = INT64_MAX;
  // A snapshot taken in the future (a clock set back), its oldest job at the
  // other end of time.
  WriteBytes(file, ImageAt(INT64_MAX, {early}));
  auto r = Jobsnap({"inspect", file});
  ASSERT_EQ(r.code, kOk) << r;
  EXPECT_TRUE(Contains(r.out, "(in the future)")) << r;
  EXPECT_FALSE(Contains(r.out, "future ago")) << r;
  EXPECT_TRUE(Contains(r.out, "before the cut")) << r;
  EXPECT_FALSE(Contains(r.err, "runtime error")) << r;  // UBSan, in sanitizer builds
  WriteBytes(file, ImageAt(INT64_MIN, {late}));
  r = Jobsnap({"inspect", file});
  ASSERT_EQ(r.code, kOk) << r;
  EXPECT_TRUE(Contains(r.out, " ago)")) << r;
  EXPECT_TRUE(Contains(r.out, "after the cut")) << r;
  EXPECT_TRUE(Contains(r.out, "213503d")) << r;  // 2^64 - 1 ns, not a wrapped value
  EXPECT_FALSE(Contains(r.err, "runtime error")) << r;
  EXPECT_EQ(Jobsnap({"list", "--json", tmp.path()}).code, kOk);
  EXPECT_EQ(Jobsnap({"dump", file}).code, kOk);
}

// ---- diff of an id held twice ---------------------------------------------------------

TEST(JobsnapDiffTest, AnIdHeldTwiceIsNotTheSameAsOnce) {
  TempDir tmp;
  const std::string a = tmp.path() + "/a.jobsnap", b = tmp.path() + "/b.jobsnap";
  WriteBytes(a, MakeImage(1, {Job(7), Job(7)}));
  WriteBytes(b, MakeImage(2, {Job(7)}));
  auto r = Jobsnap({"diff", a, b});
  EXPECT_EQ(r.code, kDiffers) << r;
  EXPECT_TRUE(Contains(r.out, "removed 1: 7")) << r;
  EXPECT_TRUE(Contains(r.out, "different")) << r;
  auto j = ParseJson(Jobsnap({"diff", "--json", b, a}));
  EXPECT_EQ(j["same"], false);
  EXPECT_EQ(j["added"], json::array({7}));
  EXPECT_EQ(j["removed"], json::array());
  EXPECT_EQ(Jobsnap({"diff", a, a}).code, kOk);
}

// ---- verify FILE checks a generation file's name -----------------------------------------

TEST(JobsnapListTest, VerifyOfAGenerationFileChecksItsNameAsVerifyOfItsDirectoryDoes) {
  TempDir tmp;
  WriteBytes(GenPath(tmp.snap(), 9), MakeImage(6, {Job(1)}));
  auto r = Jobsnap({"verify", GenPath(tmp.snap(), 9)});
  EXPECT_EQ(r.code, kCorrupt) << r;
  EXPECT_TRUE(Contains(r.out, "file name says generation 9, header says 6")) << r;
  EXPECT_EQ(Jobsnap({"verify", tmp.snap()}).code, kCorrupt);
  auto j = ParseJson(Jobsnap({"verify", "--json", GenPath(tmp.snap(), 9)}));
  EXPECT_EQ(j["images"][0]["offset"], 16);
  // Any other name is no generation's: only the image is checked.
  const std::string copy = tmp.path() + "/copy.jobsnap";
  WriteBytes(copy, MakeImage(6, {Job(1)}));
  EXPECT_EQ(Jobsnap({"verify", copy}).code, kOk);
}

// ---- output that does not reach stdout ----------------------------------------------------

TEST(JobsnapCliTest, AFailedWriteToStdoutIsAnIoError) {
  if (!fs::exists("/dev/full")) GTEST_SKIP() << "no /dev/full here";
  TempDir tmp;
  PutGeneration(tmp.snap(), 1, {Job(1)});
  const std::string g1 = GenPath(tmp.snap(), 1);
  const std::string golden = kGolden + "/v2-small.jobsnap";
  for (const auto& args : std::vector<std::vector<std::string>>{
           {"dump", g1},
           {"inspect", g1},
           {"inspect", "--json", g1},
           {"verify", "--json", g1},
           {"list", tmp.snap()},
           {"diff", g1, golden}}) {
    auto r = Jobsnap(args, "/dev/full");
    EXPECT_EQ(r.code, 74) << r;
    EXPECT_TRUE(Contains(r.err, "io-error: write to standard output")) << r;
  }
  // A command that failed anyway keeps its own status.
  EXPECT_EQ(Jobsnap({"inspect", tmp.path() + "/nope"}, "/dev/full").code, kNotFound);
}

// A write command whose report is lost still made its change: the error says
// so, naming the generation it wrote, so that nobody runs it again thinking
// it failed.
TEST(JobsnapCliTest, AWriteCommandWhoseReportIsLostSaysItsChangeWasMade) {
  if (!fs::exists("/dev/full")) GTEST_SKIP() << "no /dev/full here";
  TempDir tmp;
  PutGeneration(tmp.snap(), 1, {Job(1), Job(2), Job(3)});
  auto text = Jobsnap({"drop", tmp.snap(), "3"}, "/dev/full");
  auto as_json = Jobsnap({"drop", "--json", tmp.snap(), "2"}, "/dev/full");
  for (const auto& r : {text, as_json}) {
    EXPECT_EQ(r.code, 74) << r;
    EXPECT_TRUE(Contains(r.err, "io-error: write to standard output")) << r;
    EXPECT_TRUE(Contains(r.err, "the command itself succeeded: dropped job")) << r;
    EXPECT_TRUE(Contains(r.err, "only its report was lost")) << r;
  }
  EXPECT_TRUE(Contains(text.err, "generation 2 written to " + GenPath(tmp.snap(), 2))) << text;
  EXPECT_TRUE(Contains(as_json.err, "generation 3 written to " + GenPath(tmp.snap(), 3))) << as_json;
  EXPECT_EQ(IdsOf(ReadBytes(GenPath(tmp.snap(), 3))), std::set<JobId>{1});
  // A write command that failed says nothing of the kind.
  auto r = Jobsnap({"drop", tmp.snap(), "99"}, "/dev/full");
  EXPECT_NE(r.code, 0) << r;
  EXPECT_FALSE(Contains(r.err, "itself succeeded")) << r;
}

// stdout a closed pipe (`jobsnap drop ... | head -0`): the write command's
// EPIPE is reported like any lost report (exit 74, and that its change was
// made). Before, SIGPIPE ended it silently with 141.
TEST(JobsnapCliTest, AWriteCommandIntoAClosedPipeSaysItsChangeWasMade) {
  TempDir tmp;
  PutGeneration(tmp.snap(), 1, {Job(1), Job(2)});
  int fds[2];
  ASSERT_EQ(::pipe(fds), 0);
  ::close(fds[0]);  // no reader: a write gets EPIPE (or SIGPIPE)
  auto r = Jobsnap({"drop", tmp.snap(), "2"}, nullptr, std::nullopt, fds[1]);
  ::close(fds[1]);
  EXPECT_EQ(r.code, kIoError) << r;  // 141 when SIGPIPE ended it
  EXPECT_TRUE(Contains(r.err, "the command itself succeeded: dropped job")) << r;
  EXPECT_EQ(IdsOf(ReadBytes(GenPath(tmp.snap(), 2))), std::set<JobId>{1});
}

// A refused requeue or drop leaves the directory as it was: no LOCK file
// made, its mode untouched (taking the lock made LOCK and set 0700).
TEST(JobsnapEditTest, ARefusedEditLeavesNoLockAndKeepsTheDirectorysMode) {
  TempDir tmp;
  const std::string dir = tmp.path() + "/open";
  ASSERT_EQ(::mkdir(dir.c_str(), 0755), 0);
  ASSERT_EQ(::chmod(dir.c_str(), 0755), 0);  // whatever the umask
  PutGeneration(dir, 3, {DeadJob(7, DeadReason::kFailed, "boom"), Job(8)});
  // The files in it (the directory's own times move: LOCK came and went).
  const auto files = [&dir] {
    auto f = Fingerprint(dir);
    f.erase(".");
    return f;
  };
  const auto before = files();
  for (const auto& args : std::vector<std::vector<std::string>>{
           {"drop", dir, "99"},        // not found
           {"requeue", dir, "8"},      // not dead
           {"drop", dir, "7", "--shm", UniqueShmName()}}) {  // no such segment
    auto r = Jobsnap(args);
    EXPECT_NE(r.code, kOk) << r;
    EXPECT_EQ(files(), before) << r;
    EXPECT_FALSE(fs::exists(dir + "/LOCK")) << r;
    struct stat st{};
    ASSERT_EQ(::stat(dir.c_str(), &st), 0);
    EXPECT_EQ(st.st_mode & 07777, 0755u) << r;
  }
  // One that goes through takes the directory as an engine would (0700, LOCK).
  auto ok = Jobsnap({"drop", dir, "7"});
  ASSERT_EQ(ok.code, kOk) << ok;
  EXPECT_TRUE(fs::exists(dir + "/LOCK"));
}

// ---- the command line ----------------------------------------------------------------

// An option whose value was left out does not take the next option as it.
TEST(JobsnapCliTest, AMissingOptionValueIsAUsageErrorNotTheNextOption) {
  TempDir tmp;
  PutGeneration(tmp.snap(), 1, {Job(1)});
  auto r = Jobsnap({"dump", tmp.snap(), "--handler", "--json"});
  EXPECT_EQ(r.code, kUsage) << r;
  EXPECT_TRUE(Contains(r.err, "a value is missing")) << r;
  r = Jobsnap({"restore", tmp.snap(), "--from-file", "--json"});
  EXPECT_EQ(r.code, kUsage) << r;
}

// A symlink where a directory is expected is refused input (6), with -g or
// --shm as without them; a plain file given with them stays a usage error.
TEST(JobsnapCliTest, ASymlinkGivenAsADirectoryIsRefusedWithGenerationOrShm) {
  TempDir tmp;
  PutGeneration(tmp.snap(), 1, {Job(1)});
  const std::string link = tmp.path() + "/link";
  ASSERT_EQ(::symlink(tmp.snap().c_str(), link.c_str()), 0);
  for (const auto& args : std::vector<std::vector<std::string>>{
           {"inspect", link, "-g", "1"},
           {"verify", link, "-g", "1"},
           {"inspect", link, "--shm", UniqueShmName()},
           {"restore", link, "-g", "1"}}) {
    auto r = Jobsnap(args);
    EXPECT_EQ(r.code, kRefusedInput) << r;
    EXPECT_TRUE(Contains(r.err, "symlink")) << r;
  }
  auto r = Jobsnap({"inspect", GenPath(tmp.snap(), 1), "-g", "1"});
  EXPECT_EQ(r.code, kUsage) << r;
}

// dump --json prints JSON lines; an error is one line too, so a reader
// that parses line by line reads it.
TEST(JobsnapCliTest, ADumpErrorWithJsonIsOneLine) {
  TempDir tmp;
  PutGeneration(tmp.snap(), 1, {Job(1)});
  auto r = Jobsnap({"dump", "--json", tmp.snap(), "-g", "99"});
  EXPECT_EQ(r.code, kNotFound) << r;
  auto lines = ParseJsonLines(r);
  ASSERT_EQ(lines.size(), 1u) << r;
  EXPECT_EQ(lines[0]["error"]["exit_code"], kNotFound);
}

TEST(JobsnapCliTest, HelpOnEveryCommandExitsZero) {
  auto r = Jobsnap({"--help"});
  EXPECT_EQ(r.code, kOk) << r;
  EXPECT_TRUE(Contains(r.out, "Exit status")) << r;
  for (const char* cmd : {"list", "inspect", "dump", "verify", "diff", "restore", "requeue", "drop"}) {
    r = Jobsnap({cmd, "--help"});
    EXPECT_EQ(r.code, kOk) << r;
    EXPECT_TRUE(Contains(r.out, "Usage")) << r;
    EXPECT_TRUE(Contains(r.out, "--json")) << r;
  }
}

TEST(JobsnapCliTest, UsageErrorsExitSixtyFour) {
  TempDir tmp;
  for (const auto& args : std::vector<std::vector<std::string>>{
           {},
           {"frobnicate"},
           {"list"},
           {"inspect"},
           {"verify", "a", "b"},
           {"dump", tmp.snap(), "--state", "asleep"},
           {"requeue", tmp.snap()},
           {"requeue", tmp.snap(), "seven"},
           {"drop"},
           {"diff", "a"},
           {"restore", tmp.snap()},
           {"restore", tmp.snap(), "-g", "0"},
           {"restore", tmp.snap(), "-g", "1", "--from-shm", "x"},
           {"restore", tmp.snap(), "--from-shm", "x", "--to-shm", "y"},
           {"inspect", "--shm", "bad/name"},
           {"inspect", kGolden + "/v2-small.jobsnap", "-g", "3"},
           {"inspect", tmp.snap(), "-g", "-1"},
           {"drop", tmp.snap(), "--", "-7"},
           {"dump", kGolden + "/v2-small.jobsnap", "--id", "-1"}}) {
    auto r = Jobsnap(args);
    EXPECT_EQ(r.code, kUsage) << r;
    EXPECT_FALSE(r.err.empty()) << r;
  }
  // A negative number is not wrapped to a huge one: refused, naming the option.
  for (const auto& [args, option] : std::vector<std::pair<std::vector<std::string>, std::string>>{
           {{"inspect", tmp.snap(), "-g", "-1"}, "--generation"},
           {{"restore", tmp.snap(), "-g", "-2"}, "--generation"},
           {{"drop", tmp.snap(), "--", "-7"}, "ID"},
           {{"requeue", tmp.snap(), "7", "--from", "-5"}, "--from"},
           {{"dump", kGolden + "/v2-small.jobsnap", "--id", "-1"}, "--id"}}) {
    auto r = Jobsnap(args);
    EXPECT_EQ(r.code, kUsage) << r;
    EXPECT_TRUE(Contains(r.err, option + ": '-")) << r;
  }
}

// Generations and ids are decimal, leading zeros and all: CLI11 alone reads
// "010" as octal 8 (restore -g 036 restored generation 30), and a number past
// 2^64 - 1 as 2^64 - 1. A zero-padded number copied from a file name names
// that generation.
TEST(JobsnapCliTest, NumbersAreDecimalWhateverTheirLeadingZerosAndNeverClamped) {
  TempDir tmp;
  PutGeneration(tmp.snap(), 8, {Job(8), Job(10)});
  PutGeneration(tmp.snap(), 10, {Job(8), Job(10)});
  for (const std::string g : {"010", "00000000000000000010", "10"}) {
    auto r = Jobsnap({"inspect", "--json", tmp.snap(), "-g", g});
    ASSERT_EQ(r.code, kOk) << r;
    EXPECT_EQ(ParseJson(r)["header"]["generation"], 10) << "-g " << g;
  }
  auto ids = ParseJsonLines(Jobsnap({"dump", GenPath(tmp.snap(), 10), "--id", "010"}));
  ASSERT_EQ(ids.size(), 1u);
  EXPECT_EQ(ids[0]["id"], 10);
  EXPECT_EQ(Jobsnap({"inspect", tmp.snap(), "-g", "000"}).code, kUsage) << "generation 0";
  // Past 2^64 - 1: refused, naming the option and the number given.
  for (const auto& [args, option] : std::vector<std::pair<std::vector<std::string>, std::string>>{
           {{"inspect", tmp.snap(), "-g", "18446744073709551616"}, "--generation"},
           {{"restore", tmp.snap(), "-g", "99999999999999999999"}, "--generation"},
           {{"drop", tmp.snap(), "000018446744073709551616"}, "ID"},
           {{"dump", GenPath(tmp.snap(), 10), "--id", "123456789012345678901"}, "--id"}}) {
    auto r = Jobsnap(args);
    EXPECT_EQ(r.code, kUsage) << r;
    EXPECT_TRUE(Contains(r.err, option + ": '" + args.back() + "' is past the largest")) << r;
  }
  // 2^64 - 1 itself is a number (no such generation here).
  EXPECT_EQ(Jobsnap({"inspect", tmp.snap(), "-g", "18446744073709551615"}).code, kNotFound);
}

TEST(JobsnapCliTest, ErrorsAreJsonWithJson) {
  TempDir tmp;
  auto r = Jobsnap({"inspect", "--json", tmp.path() + "/nope"});
  EXPECT_EQ(r.code, kNotFound);
  auto j = ParseJson(r);
  EXPECT_EQ(j["error"]["class"], "not-found");
  EXPECT_EQ(j["error"]["exit_code"], kNotFound);
  // Command-line errors too, wherever --json is.
  for (const auto& args : std::vector<std::vector<std::string>>{
           {"frobnicate", "--json"},
           {"inspect", "--json", tmp.path(), "-g", "-1"},
           {"requeue", "--json", tmp.path()},
           {"--json"}}) {
    r = Jobsnap(args);
    EXPECT_EQ(r.code, kUsage) << r;
    j = ParseJson(r);
    EXPECT_EQ(j["error"]["class"], "usage") << r;
    EXPECT_EQ(j["error"]["exit_code"], kUsage) << r;
    EXPECT_FALSE(j["error"]["message"].get<std::string>().empty()) << r;
    EXPECT_FALSE(r.err.empty()) << r;
  }
}

// `jobsnap restore` SIGKILLed at a random instant, again and again: the
// directory always still loads, and what it loads is either what it held
// before (the newest generation) or the chosen one, never a torn or mixed
// image; a full restore afterwards still works. JOBENGINE_RESTORE_KILLS sets
// the count (tools/torture.sh runs thousands).
//
// Where the kills land: a kill landed inside the restore's writes when the
// process died by it with the directory locked (its LOCK file, made by the
// restore under way: the directory starts without one). The times follow
// when an uninterrupted restore locks the directory and exits here, measured
// first: with a fixed range, a sanitizer or an emulator (many times slower)
// put every kill before the restore began writing, and a range wide enough
// for them put most kills after it had exited on a fast machine. So three
// kills in four come at a random instant of the writes: once the LOCK file
// shows up (as the crash test's kills inside a snapshot wait for one to
// begin), after a random part of how long the writes take (as measured,
// adjusted as the kills go); the fourth at a random instant from the start
// to a little past the exit.
// At least a quarter of the kills must land inside the writes.
TEST(JobsnapRestoreTest, KilledAtAnyInstantLeavesADirectoryThatLoadsTheOldOrTheChosenJobs) {
  int kills = 20;
  if (const char* v = std::getenv("JOBENGINE_RESTORE_KILLS"); v != nullptr && *v != '\0') {
    kills = std::atoi(v);
  }
  std::uint64_t seed = static_cast<std::uint64_t>(::getpid()) * 2654435761u;
  std::printf("[ restore-kill ] %d kills, seed %llu\n", kills, static_cast<unsigned long long>(seed));
  std::vector<JobRecord> old_jobs, chosen_jobs;
  for (JobId id = 1; id <= 200; ++id) old_jobs.push_back(Job(id));
  for (JobId id = 500; id <= 520; ++id) chosen_jobs.push_back(Job(id));
  std::set<JobId> old_ids, chosen_ids;
  for (const auto& j : old_jobs) old_ids.insert(j.id);
  for (const auto& j : chosen_jobs) chosen_ids.insert(j.id);
  const auto prepare = [&](const std::string& dir) {
    PutGeneration(dir, 1, old_jobs);
    PutGeneration(dir, 2, chosen_jobs);
    PutGeneration(dir, 3, old_jobs);
    PutGeneration(dir, 4, old_jobs);
  };
  const auto spawn = [](const std::string& dir) {
    std::vector<std::string> argv_s = {JOBSNAP_PATH, "restore", dir, "--generation", "2"};
    std::vector<char*> argv;
    for (auto& a : argv_s) argv.push_back(a.data());
    argv.push_back(nullptr);
    const pid_t pid = ::fork();
    if (pid == 0) {
      const int null = ::open("/dev/null", O_RDWR);
      ::dup2(null, 0);
      ::dup2(null, 1);
      ::dup2(null, 2);
      ::execv(argv[0], argv.data());
      ::_exit(126);
    }
    return pid;
  };
  using std::chrono::microseconds;
  using std::chrono::steady_clock;
  const auto since = [](steady_clock::time_point t0) {
    return static_cast<std::int64_t>(
        std::chrono::duration_cast<microseconds>(steady_clock::now() - t0).count());
  };
  // Polls until `lock` exists or the child `pid` has ended (not reaped).
  const auto wait_for_lock = [](pid_t pid, const std::string& lock) {
    for (;;) {
      if (::access(lock.c_str(), F_OK) == 0) return true;
      siginfo_t info{};
      if (::waitid(P_PID, static_cast<id_t>(pid), &info, WEXITED | WNOHANG | WNOWAIT) != 0 ||
          info.si_pid == pid) {
        return ::access(lock.c_str(), F_OK) == 0;
      }
      std::this_thread::sleep_for(microseconds(20));
    }
  };
  // Three uninterrupted restores: when each locked the directory and exited.
  std::vector<std::int64_t> locked_us, took_us, writes_us;
  for (int run = 0; run < 3; ++run) {
    TempDir tmp;
    prepare(tmp.snap());
    const auto t0 = steady_clock::now();
    const pid_t pid = spawn(tmp.snap());
    ASSERT_GE(pid, 0);
    const bool locked = wait_for_lock(pid, tmp.snap() + "/LOCK");
    const std::int64_t locked_at = since(t0);
    int status = 0;
    ASSERT_EQ(::waitpid(pid, &status, 0), pid);
    const std::int64_t took = since(t0);
    ASSERT_TRUE(locked && WIFEXITED(status) && WEXITSTATUS(status) == 0)
        << "an uninterrupted restore failed, status " << status;
    locked_us.push_back(locked_at);
    took_us.push_back(took);
    writes_us.push_back(std::max<std::int64_t>(100, took - locked_at));
  }
  std::sort(locked_us.begin(), locked_us.end());
  std::sort(took_us.begin(), took_us.end());
  std::sort(writes_us.begin(), writes_us.end());
  const std::int64_t anywhere_us = took_us[1] + took_us[1] / 4;
  std::printf("[ restore-kill ] uninterrupted, a restore locks the directory after %lld us and "
              "exits after %lld us (median of 3), its writes take %lld us at least\n",
              static_cast<long long>(locked_us[1]), static_cast<long long>(took_us[1]),
              static_cast<long long>(writes_us[0]));
  // Kills in the writes come after a random part of this after the LOCK
  // file showed up: first the shortest span measured, shortened whenever
  // such a kill found the restore done, lengthened (up to the longest
  // measured) whenever one landed inside.
  std::int64_t writes_window_us = writes_us[0];
  int loaded_old = 0, loaded_chosen = 0;
  int killed_before_lock = 0, killed_inside = 0, exited_before_kill = 0;
  for (int k = 0; k < kills; ++k) {
    TempDir tmp;
    const std::string dir = tmp.snap();
    const std::string lock = dir + "/LOCK";
    prepare(dir);
    seed ^= seed << 13;
    seed ^= seed >> 7;
    seed ^= seed << 17;
    const bool in_writes = seed % 4 != 0;
    const auto delay = microseconds(static_cast<std::int64_t>(
        (seed / 4) % static_cast<std::uint64_t>(in_writes ? writes_window_us : anywhere_us)));
    const auto t0 = steady_clock::now();
    const pid_t pid = spawn(dir);
    ASSERT_GE(pid, 0);
    if (in_writes) (void)wait_for_lock(pid, lock);
    std::this_thread::sleep_for(delay);
    ::kill(pid, SIGKILL);
    const std::int64_t killed_at = since(t0);
    int status = 0;
    ASSERT_EQ(::waitpid(pid, &status, 0), pid);
    if (!WIFSIGNALED(status)) {
      ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0)
          << "kill " << k << ": the restore failed by itself, status " << status;
      ++exited_before_kill;
      // The writes went faster than measured (fsync times vary widely).
      if (in_writes) writes_window_us = std::max<std::int64_t>(100, writes_window_us * 3 / 4);
    } else if (::access(lock.c_str(), F_OK) == 0) {
      ++killed_inside;
      if (in_writes) writes_window_us = std::min(writes_us[2], writes_window_us * 9 / 8);
    } else {
      ++killed_before_lock;
    }
    // What an engine would load now, by the engine's own loader.
    const Started s = StartEngine(dir);
    if (s.ids == old_ids) {
      ++loaded_old;
    } else if (s.ids == chosen_ids) {
      ++loaded_chosen;
    } else {
      ADD_FAILURE() << "kill " << k << " after " << killed_at
                    << " us: the directory loaded neither the old nor the chosen jobs ("
                    << s.ids.size() << " jobs from " << s.recovery.source << ")";
      return;
    }
    // And the rollback can always be finished.
    const RunResult again = Jobsnap({"restore", dir, "--generation", "2"});
    if (again.code != 0) {
      ADD_FAILURE() << "kill " << k << ": restore after the kill failed: " << again;
      return;
    }
  }
  std::printf("[ restore-kill ] loaded the old jobs after %d kills, the chosen ones after %d; "
              "killed before it locked the directory %d times, inside its writes %d times, "
              "after it had exited %d times\n",
              loaded_old, loaded_chosen, killed_before_lock, killed_inside, exited_before_kill);
  EXPECT_GE(killed_inside, std::max(1, kills / 4))
      << "too few kills landed while the restore had the directory locked";
}

}  // namespace
}  // namespace jobengine
