// libFuzzer target for jobsnap's argument handling (tools/jobsnap/main.cc).
//
// The input is split at NUL bytes into at most 24 arguments after "jobsnap"
// and handed to the tool's own run(), exactly as main() would. jobsnap must
// answer every argument vector with an exit status from its documented table
// (tools/jobsnap.md), never crash, hang or throw past run().
//
// It runs in a private sandbox directory holding a snapshot directory made of
// the golden images (snap/) and a copy of one image (one.jobsnap), so that
// paths the fuzzer guesses reach the real commands; write commands only ever
// touch the sandbox. Arguments naming a shared-memory segment are skipped
// (a fuzzer must not create segments in /dev/shm); the shm paths are covered
// by jobsnap_test.
//
// Build: cmake --preset fuzz && cmake --build --preset fuzz
// Run:   build/fuzz/tests/fuzz/jobsnap_args_fuzzer -close_fd_mask=1 -max_total_time=3600 \
//            build/fuzz/tests/fuzz/corpus-jobsnap-args
#include <fcntl.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <set>
#include <string>
#include <vector>

// The tool itself, with its main() renamed so that this file can call run().
#define main jobsnap_main
#include "tools/jobsnap/main.cc"
#undef main

namespace {

std::filesystem::path g_sandbox;
int g_home = -1;  // the directory libFuzzer runs in (its corpus paths may be relative)

void remove_sandbox() {
  std::error_code ec;
  std::filesystem::remove_all(g_sandbox, ec);
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  g_sandbox = std::filesystem::temp_directory_path() /
              ("jobsnap-args-fuzz-" + std::to_string(::getpid()));
  std::filesystem::create_directories(g_sandbox / "snap");
  std::filesystem::permissions(g_sandbox / "snap", std::filesystem::perms::owner_all);
  int gen = 1;
  for (const auto& e : std::filesystem::directory_iterator(JOBENGINE_GOLDEN_DIR)) {
    char name[64];
    std::snprintf(name, sizeof(name), "gen-%020d.jobsnap", gen++);
    std::filesystem::copy_file(e.path(), g_sandbox / "snap" / name);
    if (gen == 2) std::filesystem::copy_file(e.path(), g_sandbox / "one.jobsnap");
  }
  g_home = ::open(".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (g_home < 0) std::abort();
  std::atexit(remove_sandbox);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  std::vector<std::string> args{"jobsnap"};
  std::string cur;
  for (std::size_t i = 0; i < size && args.size() < 25; ++i) {
    if (data[i] == 0) {
      args.push_back(cur);
      cur.clear();
    } else {
      cur.push_back(static_cast<char>(data[i]));
    }
  }
  if (!cur.empty() && args.size() < 25) args.push_back(cur);
  for (const std::string& a : args) {
    if (a.find("shm") != std::string::npos) return 0;  // see the header comment
  }
  std::vector<char*> argv;
  for (std::string& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  // Only the tool runs in the sandbox; libFuzzer's own files stay where it was started.
  if (::chdir(g_sandbox.c_str()) != 0) std::abort();
  int code;
  try {
    code = run(static_cast<int>(args.size()), argv.data());
  } catch (...) {
    std::abort();  // main() would report this as an internal error: a bug either way
  }
  if (::fchdir(g_home) != 0) std::abort();
  static const std::set<int> kDocumented = {0, 1, 2, 3, 4, 5, 6, 7, 8, 64, 70, 74};
  if (kDocumented.count(code) == 0) std::abort();
  return 0;
}
