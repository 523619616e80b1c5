// FileStore (persistence/file_store.h): the publish protocol, retention,
// modes, the directory lock (in this process and across a SIGKILLed child),
// the reader's refusals, one test per injected I/O failure (step x errno), and
// power loss simulated by the fault-injecting file layer.
#include "persistence/file_store.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "persistence/file_system.h"
#include "tests/persistence/fault_file_system.h"

namespace jobengine::persist {
namespace {

using Bytes = std::vector<unsigned char>;
namespace fs = std::filesystem;

constexpr std::uint64_t kMaxRead = 1 << 20;

// A recognisable image: its generation in every byte pattern, `size` bytes.
Bytes image(std::uint64_t generation, std::size_t size = 1000) {
  Bytes b(size);
  for (std::size_t i = 0; i < size; ++i) {
    b[i] = static_cast<unsigned char>((i * 31 + generation * 7) & 0xff);
  }
  return b;
}

Bytes slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return Bytes(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

void spit(const std::string& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << text;
}

unsigned mode_of(const std::string& path) {
  struct stat st;
  if (::lstat(path.c_str(), &st) != 0) return 0xffffffffu;
  return static_cast<unsigned>(st.st_mode & 07777);
}

std::vector<std::string> names_in(const std::string& dir) {
  std::vector<std::string> out;
  for (const auto& entry : fs::directory_iterator(dir)) out.push_back(entry.path().filename());
  std::sort(out.begin(), out.end());
  return out;
}

bool has_temp_file(const std::string& dir) {
  for (const std::string& name : names_in(dir)) {
    if (name.rfind(".tmp-", 0) == 0) return true;
  }
  return false;
}

// Open descriptors of this process (the count includes the one used to list them).
std::size_t count_fds() {
  std::size_t n = 0;
  for ([[maybe_unused]] const auto& entry : fs::directory_iterator("/proc/self/fd")) ++n;
  return n;
}

// The descriptor of this process open on `path`, or -1.
int fd_open_on(const std::string& path) {
  for (const auto& entry : fs::directory_iterator("/proc/self/fd")) {
    std::error_code ec;
    fs::path target = fs::read_symlink(entry.path(), ec);
    if (!ec && target == path) return std::stoi(entry.path().filename().string());
  }
  return -1;
}

bool contains(std::string_view haystack, std::string_view needle) {
  return haystack.find(needle) != std::string_view::npos;
}

class UmaskGuard {
 public:
  explicit UmaskGuard(mode_t mask) : old_(::umask(mask)) {}
  ~UmaskGuard() { ::umask(old_); }
  UmaskGuard(const UmaskGuard&) = delete;
  UmaskGuard& operator=(const UmaskGuard&) = delete;

 private:
  mode_t old_;
};

class FileStoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/jobengine-filestore-XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl), nullptr) << errno_text(errno);
    root_ = tmpl;
    dir_ = root_ + "/snap";
  }
  void TearDown() override {
    std::error_code ec;
    fs::remove_all(root_, ec);
  }

  std::unique_ptr<FileStore> open_store(unsigned keep = 3,
                                        std::shared_ptr<FileSystem> file_system = nullptr) {
    Result<std::unique_ptr<FileStore>> store = FileStore::open(dir_, keep, std::move(file_system));
    EXPECT_TRUE(store.ok()) << store.status().to_string();
    return store.ok() ? std::move(store).value() : nullptr;
  }

  std::string gen_path(std::uint64_t generation) const {
    char buf[64];
    std::snprintf(buf, sizeof buf, "/gen-%020llu.jobsnap",
                  static_cast<unsigned long long>(generation));
    return dir_ + buf;
  }

  std::string root_;
  std::string dir_;
  PosixFileSystem posix_;
};

// ---- round trip, retention, listing -----------------------------------------

TEST_F(FileStoreTest, PublishListReadRoundTrip) {
  auto store = open_store();
  ASSERT_NE(store, nullptr);
  EXPECT_EQ(store->dir(), dir_);
  Result<std::vector<GenerationFile>> empty = store->list();
  ASSERT_TRUE(empty.ok());
  EXPECT_TRUE(empty->empty());

  ASSERT_TRUE(store->publish(1, image(1, 100)).ok());
  ASSERT_TRUE(store->publish(7, image(7, 2000)).ok());
  Result<std::vector<GenerationFile>> list = store->list();
  ASSERT_TRUE(list.ok()) << list.status().to_string();
  ASSERT_EQ(list->size(), 2u);
  EXPECT_EQ((*list)[0].generation, 7u);
  EXPECT_EQ((*list)[0].path, gen_path(7));
  EXPECT_EQ((*list)[0].bytes, 2000u);
  EXPECT_EQ((*list)[1].generation, 1u);
  EXPECT_EQ((*list)[1].bytes, 100u);

  Result<Bytes> seven = FileStore::read((*list)[0].path, kMaxRead, posix_);
  ASSERT_TRUE(seven.ok()) << seven.status().to_string();
  EXPECT_EQ(*seven, image(7, 2000));
  Result<Bytes> one = FileStore::read((*list)[1].path, kMaxRead, posix_);
  ASSERT_TRUE(one.ok());
  EXPECT_EQ(*one, image(1, 100));

  // The unlocked listing for recovery sees the same while the store is open.
  Result<std::vector<GenerationFile>> unlocked = list_generations(dir_, posix_);
  ASSERT_TRUE(unlocked.ok());
  ASSERT_EQ(unlocked->size(), 2u);
  EXPECT_EQ((*unlocked)[0].generation, 7u);
  EXPECT_EQ(names_in(dir_), (std::vector<std::string>{"LOCK", "gen-00000000000000000001.jobsnap",
                                                      "gen-00000000000000000007.jobsnap"}));
}

TEST_F(FileStoreTest, EmptyImageRoundTrips) {
  auto store = open_store();
  ASSERT_NE(store, nullptr);
  ASSERT_TRUE(store->publish(1, Bytes{}).ok());
  Result<Bytes> back = FileStore::read(gen_path(1), kMaxRead, posix_);
  ASSERT_TRUE(back.ok());
  EXPECT_TRUE(back->empty());
}

TEST_F(FileStoreTest, RetainsOnlyTheNewestKeepGenerations) {
  auto store = open_store(/*keep=*/3);
  ASSERT_NE(store, nullptr);
  for (std::uint64_t g = 1; g <= 6; ++g) ASSERT_TRUE(store->publish(g * 10, image(g)).ok());
  Result<std::vector<GenerationFile>> list = store->list();
  ASSERT_TRUE(list.ok());
  ASSERT_EQ(list->size(), 3u);
  EXPECT_EQ((*list)[0].generation, 60u);
  EXPECT_EQ((*list)[1].generation, 50u);
  EXPECT_EQ((*list)[2].generation, 40u);
  for (const GenerationFile& f : *list) {
    EXPECT_EQ(slurp(f.path), image(f.generation / 10));
  }
}

TEST_F(FileStoreTest, RetentionKeepsTheGenerationKnownGoodBehindNewerDamagedOnes) {
  // Generations 11 and 12 do not verify (written by something else, say a
  // crash mid-copy); 10 is the one known good. Publishing 13 with keep 3
  // pruned the third newest, 10, leaving no older generation that loads.
  auto store = open_store(/*keep=*/3);
  ASSERT_NE(store, nullptr);
  ASSERT_TRUE(store->publish(10, image(10)).ok());
  for (std::uint64_t g : {11u, 12u}) {
    std::ofstream(gen_path(g), std::ios::binary) << "not a snapshot";
  }
  ASSERT_TRUE(store->publish(13, image(13)).ok());
  Result<std::vector<GenerationFile>> list = store->list();
  ASSERT_TRUE(list.ok());
  std::vector<std::uint64_t> gens;
  for (const GenerationFile& f : *list) gens.push_back(f.generation);
  EXPECT_EQ(gens, (std::vector<std::uint64_t>{13, 12, 11, 10}));
  EXPECT_EQ(slurp(gen_path(10)), image(10));
  // The next publish prunes down to keep again, the known good one (13) kept.
  ASSERT_TRUE(store->publish(14, image(14)).ok());
  list = store->list();
  ASSERT_TRUE(list.ok());
  gens.clear();
  for (const GenerationFile& f : *list) gens.push_back(f.generation);
  EXPECT_EQ(gens, (std::vector<std::uint64_t>{14, 13, 12}));
}

TEST_F(FileStoreTest, KeepOneRetainsOnlyTheNewest) {
  auto store = open_store(/*keep=*/1);
  ASSERT_NE(store, nullptr);
  ASSERT_TRUE(store->publish(1, image(1)).ok());
  ASSERT_TRUE(store->publish(2, image(2)).ok());
  EXPECT_EQ(names_in(dir_), (std::vector<std::string>{"LOCK", "gen-00000000000000000002.jobsnap"}));
}

TEST_F(FileStoreTest, KeepZeroIsRefused) {
  Result<std::unique_ptr<FileStore>> store = FileStore::open(dir_, 0);
  ASSERT_FALSE(store.ok());
  EXPECT_EQ(store.status().code(), StatusCode::kInvalidArgument);
}

TEST_F(FileStoreTest, ListIgnoresForeignNamesAndNonRegularFiles) {
  auto store = open_store();
  ASSERT_NE(store, nullptr);
  ASSERT_TRUE(store->publish(5, image(5)).ok());
  spit(dir_ + "/gen-5.jobsnap", "short name");
  spit(dir_ + "/gen-00000000000000000009.jobsnap.bak", "suffix");
  spit(dir_ + "/gen-0000000000000000000x.jobsnap", "not digits");
  spit(dir_ + "/gen-99999999999999999999.jobsnap", "beyond 64 bits");
  spit(dir_ + "/notes.txt", "foreign");
  ASSERT_EQ(::mkdir((dir_ + "/gen-00000000000000000008.jobsnap").c_str(), 0700), 0);
  ASSERT_EQ(::symlink(gen_path(5).c_str(), (dir_ + "/gen-00000000000000000009.jobsnap").c_str()),
            0);
  Result<std::vector<GenerationFile>> list = store->list();
  ASSERT_TRUE(list.ok());
  ASSERT_EQ(list->size(), 1u);
  EXPECT_EQ((*list)[0].generation, 5u);
}

TEST_F(FileStoreTest, GenerationNotIncreasingIsRefused) {
  auto store = open_store();
  ASSERT_NE(store, nullptr);
  ASSERT_TRUE(store->publish(5, image(5)).ok());
  for (std::uint64_t g : {std::uint64_t{5}, std::uint64_t{4}, std::uint64_t{0}}) {
    Status s = store->publish(g, image(g));
    EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << g;
    EXPECT_TRUE(contains(s.message(), "not newer than generation 5")) << s.to_string();
  }
  EXPECT_FALSE(has_temp_file(dir_));
  EXPECT_EQ(slurp(gen_path(5)), image(5));
  EXPECT_TRUE(store->publish(6, image(6)).ok());
}

TEST_F(FileStoreTest, GenerationOfAnEarlierRunIsRespectedAfterReopen) {
  {
    auto store = open_store();
    ASSERT_NE(store, nullptr);
    ASSERT_TRUE(store->publish(9, image(9)).ok());
  }
  auto store = open_store();
  ASSERT_NE(store, nullptr);
  EXPECT_EQ(store->publish(3, image(3)).code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(store->publish(10, image(10)).ok());
}

// A generation numbered 2^64 - 1 leaves no number above it: every publish
// after it was refused ("not newer than generation 18446744073709551615"),
// forever. open() refuses such a directory, naming the file and what to do,
// before anything is created in it; with the file moved away it opens.
TEST_F(FileStoreTest, AGenerationNumberedTheLastNumberIsRefusedAtOpen) {
  ASSERT_EQ(::mkdir(dir_.c_str(), 0700), 0);
  spit(gen_path(5), "generation five");
  const std::string last = gen_path(UINT64_MAX);
  ASSERT_EQ(last, dir_ + "/gen-18446744073709551615.jobsnap");
  spit(last, "the last number");
  Result<std::unique_ptr<FileStore>> store = FileStore::open(dir_, 3);
  ASSERT_FALSE(store.ok()) << "a store that can never publish was opened";
  EXPECT_EQ(store.status().code(), StatusCode::kInvalidArgument);
  const std::string message(store.status().message());
  EXPECT_TRUE(contains(message, "snapshot file " + last)) << message;
  EXPECT_TRUE(contains(message, "the highest a snapshot can have")) << message;
  EXPECT_TRUE(contains(message, "move it out of " + dir_)) << message;
  EXPECT_EQ(names_in(dir_), (std::vector<std::string>{"gen-00000000000000000005.jobsnap",
                                                      "gen-18446744073709551615.jobsnap"}));
  // Moved away, the directory opens and publishes above what is left.
  ASSERT_EQ(::rename(last.c_str(), (root_ + "/moved-away.jobsnap").c_str()), 0);
  auto opened = open_store();
  ASSERT_NE(opened, nullptr);
  EXPECT_TRUE(opened->publish(6, image(6)).ok());
  // One below the last number is no problem: one generation still follows it.
  ASSERT_TRUE(opened->publish(UINT64_MAX - 1, image(7)).ok());
  opened.reset();
  EXPECT_NE(open_store(), nullptr);
}

// ---- modes and the directory ------------------------------------------------

TEST_F(FileStoreTest, DirectoryIs0700AndFilesAre0600WithUmaskZero) {
  UmaskGuard umask_zero(0);
  auto store = open_store();
  ASSERT_NE(store, nullptr);
  ASSERT_TRUE(store->publish(1, image(1)).ok());
  EXPECT_EQ(mode_of(dir_), 0700u);
  EXPECT_EQ(mode_of(dir_ + "/LOCK"), 0600u);
  EXPECT_EQ(mode_of(gen_path(1)), 0600u);
}

TEST_F(FileStoreTest, DirectoryIs0700AndFilesAre0600WithUmask0777) {
  UmaskGuard umask_all(0777);  // mkdir and open(O_CREAT) alone would give 0000
  auto store = open_store();
  ASSERT_NE(store, nullptr);
  ASSERT_TRUE(store->publish(1, image(1)).ok());
  EXPECT_EQ(mode_of(dir_), 0700u);
  EXPECT_EQ(mode_of(dir_ + "/LOCK"), 0600u);
  EXPECT_EQ(mode_of(gen_path(1)), 0600u);
}

TEST_F(FileStoreTest, ExistingDirectoryWithMode0755IsFixedTo0700) {
  ASSERT_EQ(::mkdir(dir_.c_str(), 0700), 0);
  ASSERT_EQ(::chmod(dir_.c_str(), 0755), 0);
  auto store = open_store();
  ASSERT_NE(store, nullptr);
  EXPECT_EQ(mode_of(dir_), 0700u);
}

TEST_F(FileStoreTest, TrailingSlashesAreDropped) {
  Result<std::unique_ptr<FileStore>> store = FileStore::open(dir_ + "//", 2);
  ASSERT_TRUE(store.ok()) << store.status().to_string();
  EXPECT_EQ((*store)->dir(), dir_);
  ASSERT_TRUE((*store)->publish(1, image(1)).ok());
  EXPECT_EQ(slurp(gen_path(1)), image(1));
}

// Puts the working directory back on every way out of a test.
class CwdGuard {
 public:
  CwdGuard() {
    if (char* cwd = ::getcwd(nullptr, 0); cwd != nullptr) {
      saved_ = cwd;
      std::free(cwd);
    }
  }
  ~CwdGuard() {
    if (!saved_.empty()) {
      EXPECT_EQ(::chdir(saved_.c_str()), 0) << saved_;
    }
  }
  CwdGuard(const CwdGuard&) = delete;
  CwdGuard& operator=(const CwdGuard&) = delete;
  bool ok() const { return !saved_.empty(); }

 private:
  std::string saved_;
};

// A relative directory is resolved once, at open: the process may chdir()
// later (a service does). Publishes failed with ENOENT after that, or, were
// there a directory of the same name in the new working directory, wrote
// and pruned generations there, without its LOCK.
TEST_F(FileStoreTest, ARelativeDirectoryKeepsNamingTheSameOneAfterAChdir) {
  const std::string first = root_ + "/first";
  const std::string second = root_ + "/second";
  ASSERT_EQ(::mkdir(first.c_str(), 0700), 0);
  ASSERT_EQ(::mkdir(second.c_str(), 0700), 0);
  const std::string jobs = first + "/jobs";
  CwdGuard cwd;
  ASSERT_TRUE(cwd.ok()) << errno_text(errno);
  ASSERT_EQ(::chdir(first.c_str()), 0) << errno_text(errno);
  Result<std::unique_ptr<FileStore>> opened = FileStore::open("jobs/", 2);
  ASSERT_TRUE(opened.ok()) << opened.status().to_string();
  std::unique_ptr<FileStore> store = std::move(opened).value();
  EXPECT_EQ(store->dir(), jobs);
  ASSERT_TRUE(store->publish(1, image(1)).ok());

  // No jobs/ in the new working directory.
  ASSERT_EQ(::chdir(second.c_str()), 0) << errno_text(errno);
  Status s = store->publish(2, image(2));
  ASSERT_TRUE(s.ok()) << s.to_string();
  // And one there: it is not the store's, and stays untouched.
  ASSERT_EQ(::mkdir((second + "/jobs").c_str(), 0700), 0);
  s = store->publish(3, image(3));
  ASSERT_TRUE(s.ok()) << s.to_string();
  EXPECT_TRUE(names_in(second + "/jobs").empty());
  EXPECT_EQ(names_in(jobs), (std::vector<std::string>{"LOCK", "gen-00000000000000000002.jobsnap",
                                                      "gen-00000000000000000003.jobsnap"}));
  EXPECT_EQ(slurp(jobs + "/gen-00000000000000000003.jobsnap"), image(3));
  Result<std::vector<GenerationFile>> list = store->list();
  ASSERT_TRUE(list.ok()) << list.status().to_string();
  ASSERT_EQ(list->size(), 2u);
  EXPECT_EQ((*list)[0].path, jobs + "/gen-00000000000000000003.jobsnap");
  EXPECT_EQ((*list)[1].path, jobs + "/gen-00000000000000000002.jobsnap");
}

// The directory is fsynced through the descriptor open() took, never opened
// by name again: a publish cannot fail for want of a descriptor (EMFILE)
// after its file was renamed into place.
TEST_F(FileStoreTest, APublishOpensNothingButItsTempFile) {
  auto faults = std::make_shared<FaultFileSystem>();
  auto store = open_store(2, faults);
  ASSERT_NE(store, nullptr);
  for (std::uint64_t g = 1; g <= 4; ++g) {  // new files, then recycled ones
    SCOPED_TRACE(g);
    faults->clear_rules();
    FaultRule out_of_descriptors = fail_call(FaultOp::kOpen, EMFILE, 2);  // after the temp file's
    out_of_descriptors.every = true;
    faults->add_rule(out_of_descriptors);
    const std::uint64_t opens = faults->calls(FaultOp::kOpen);
    Status s = store->publish(g, image(g));
    ASSERT_TRUE(s.ok()) << s.to_string();
    EXPECT_EQ(faults->calls(FaultOp::kOpen), opens + 1);  // the temp file
  }
  EXPECT_EQ(faults->injected(FaultOp::kOpen), 0u);
  EXPECT_EQ(names_in(dir_), (std::vector<std::string>{"LOCK", "gen-00000000000000000003.jobsnap",
                                                      "gen-00000000000000000004.jobsnap"}));
}

TEST_F(FileStoreTest, DirectoryThatIsASymlinkIsRefused) {
  const std::string target = root_ + "/real";
  ASSERT_EQ(::mkdir(target.c_str(), 0755), 0);
  ASSERT_EQ(::symlink(target.c_str(), dir_.c_str()), 0);
  Result<std::unique_ptr<FileStore>> store = FileStore::open(dir_, 3);
  ASSERT_FALSE(store.ok());
  EXPECT_EQ(store.status().code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(contains(store.status().message(), dir_)) << store.status().to_string();
  EXPECT_TRUE(contains(store.status().message(), "symlink")) << store.status().to_string();
  EXPECT_TRUE(names_in(target).empty());  // no LOCK created through the link
  EXPECT_EQ(mode_of(target), 0755u);      // and its mode not "fixed"
}

TEST_F(FileStoreTest, PathThatIsARegularFileIsRefused) {
  spit(dir_, "not a directory");
  Result<std::unique_ptr<FileStore>> store = FileStore::open(dir_, 3);
  ASSERT_FALSE(store.ok());
  EXPECT_EQ(store.status().code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(contains(store.status().message(), dir_));
  EXPECT_TRUE(contains(store.status().message(), "not a directory"));
}

TEST_F(FileStoreTest, MissingParentDirectoryIsAnIoErrorNamingThePath) {
  const std::string deep = root_ + "/no/such/parent";
  Result<std::unique_ptr<FileStore>> store = FileStore::open(deep, 3);
  ASSERT_FALSE(store.ok());
  EXPECT_EQ(store.status().code(), StatusCode::kIoError);
  EXPECT_TRUE(contains(store.status().message(), "mkdir " + deep)) << store.status().to_string();
  EXPECT_TRUE(contains(store.status().message(), errno_text(ENOENT)));
}

TEST_F(FileStoreTest, DirectoryOwnedByAnotherUserIsRefused) {
  if (::geteuid() != 0) GTEST_SKIP() << "needs root to chown a directory to another uid";
  ASSERT_EQ(::mkdir(dir_.c_str(), 0700), 0);
  ASSERT_EQ(::chown(dir_.c_str(), 65534, 65534), 0);
  Result<std::unique_ptr<FileStore>> store = FileStore::open(dir_, 3);
  ASSERT_FALSE(store.ok());
  EXPECT_EQ(store.status().code(), StatusCode::kFailedPrecondition);
  EXPECT_TRUE(contains(store.status().message(), "owned by uid 65534"))
      << store.status().to_string();
  EXPECT_TRUE(names_in(dir_).empty());
}

TEST_F(FileStoreTest, StaleTempFilesAreRemovedAtOpen) {
  ASSERT_EQ(::mkdir(dir_.c_str(), 0700), 0);
  spit(dir_ + "/.tmp-00000000000000000004-12345", "half a publish");
  spit(dir_ + "/.tmp-whatever", "another");
  spit(gen_path(3), "an older generation");
  spit(dir_ + "/notes.txt", "not ours");
  auto store = open_store();
  ASSERT_NE(store, nullptr);
  EXPECT_EQ(names_in(dir_),
            (std::vector<std::string>{"LOCK", "gen-00000000000000000003.jobsnap", "notes.txt"}));
}

// ---- the lock ---------------------------------------------------------------

TEST_F(FileStoreTest, SecondStoreInTheSameProcessIsRefusedUntilTheFirstIsDestroyed) {
  auto first = open_store();
  ASSERT_NE(first, nullptr);
  // flock() locks belong to the open file description, so a second open() of
  // LOCK in the same process conflicts like another process would.
  Result<std::unique_ptr<FileStore>> second = FileStore::open(dir_, 3);
  ASSERT_FALSE(second.ok());
  EXPECT_EQ(second.status().code(), StatusCode::kFailedPrecondition);
  EXPECT_TRUE(contains(second.status().message(), "another engine holds " + dir_))
      << second.status().to_string();
  first.reset();
  Result<std::unique_ptr<FileStore>> third = FileStore::open(dir_, 3);
  EXPECT_TRUE(third.ok()) << third.status().to_string();
}

TEST_F(FileStoreTest, RefusedSecondOpenDoesNotTouchTheDirectory) {
  auto first = open_store();
  ASSERT_NE(first, nullptr);
  ASSERT_TRUE(first->publish(1, image(1)).ok());
  // A temp file as if the first store were mid-publish: the refused second
  // store must not remove it (only a lock holder may).
  spit(dir_ + "/.tmp-00000000000000000002-1", "in progress");
  ASSERT_FALSE(FileStore::open(dir_, 3).ok());
  EXPECT_EQ(slurp(dir_ + "/.tmp-00000000000000000002-1").size(), 11u);
}

// Kills the child on every way out of the test.
class ChildGuard {
 public:
  explicit ChildGuard(pid_t pid) : pid_(pid) {}
  ~ChildGuard() {
    if (pid_ > 0) {
      ::kill(pid_, SIGKILL);
      ::waitpid(pid_, nullptr, 0);
    }
  }
  ChildGuard(const ChildGuard&) = delete;
  ChildGuard& operator=(const ChildGuard&) = delete;
  // SIGKILLs and reaps the child; returns its wait status.
  int kill_and_reap() {
    int status = 0;
    ::kill(pid_, SIGKILL);
    ::waitpid(pid_, &status, 0);
    pid_ = -1;
    return status;
  }

 private:
  pid_t pid_;
};

TEST_F(FileStoreTest, LockOfASigkilledChildIsReleased) {
  int ready[2];
  ASSERT_EQ(::pipe2(ready, O_CLOEXEC), 0);
  const pid_t pid = ::fork();
  ASSERT_GE(pid, 0) << errno_text(errno);
  if (pid == 0) {
    // The child: take the store, say so, wait to be killed.
    ::close(ready[0]);
    Result<std::unique_ptr<FileStore>> store = FileStore::open(dir_, 3);
    const char byte = store.ok() ? 'R' : 'F';
    if (::write(ready[1], &byte, 1) != 1) ::_exit(2);
    for (;;) ::pause();
  }
  ChildGuard child(pid);
  ::close(ready[1]);
  char byte = 0;
  ssize_t n;
  do {
    n = ::read(ready[0], &byte, 1);
  } while (n < 0 && errno == EINTR);
  ::close(ready[0]);
  ASSERT_EQ(n, 1);
  ASSERT_EQ(byte, 'R') << "the child could not open the store";

  Result<std::unique_ptr<FileStore>> while_alive = FileStore::open(dir_, 3);
  ASSERT_FALSE(while_alive.ok());
  EXPECT_EQ(while_alive.status().code(), StatusCode::kFailedPrecondition);

  const int status = child.kill_and_reap();
  ASSERT_TRUE(WIFSIGNALED(status));
  EXPECT_EQ(WTERMSIG(status), SIGKILL);

  Result<std::unique_ptr<FileStore>> after = FileStore::open(dir_, 3);
  EXPECT_TRUE(after.ok()) << after.status().to_string();
}

// ---- injected failures --------------------------------------------------------

// The steps of a publish that can fail, each with the rule that breaks it and
// the start of the message the failure must carry.
enum class Step { kOpenTemp, kWrite, kShortWriteThenError, kFsync, kClose, kRename, kDirFsync };

struct StepCase {
  Step step;
  const char* name;
};

constexpr StepCase kSteps[] = {
    {Step::kOpenTemp, "OpenTemp"},
    {Step::kWrite, "Write"},
    {Step::kShortWriteThenError, "ShortWriteThenError"},
    {Step::kFsync, "Fsync"},
    {Step::kClose, "Close"},
    {Step::kRename, "Rename"},
    {Step::kDirFsync, "DirFsync"},
};

struct ErrnoCase {
  int error;
  const char* name;
};

constexpr ErrnoCase kErrnos[] = {{EIO, "EIO"}, {ENOSPC, "ENOSPC"}, {EDQUOT, "EDQUOT"}};

class PublishFailureTest : public FileStoreTest,
                           public ::testing::WithParamInterface<std::tuple<StepCase, ErrnoCase>> {
 protected:
  void add_fault(FaultFileSystem& faults, Step step, int error) {
    switch (step) {
      case Step::kOpenTemp:
        faults.add_rule(fail_call(FaultOp::kOpen, error, 1, ".tmp-"));
        break;
      case Step::kWrite:
        faults.add_rule(fail_call(FaultOp::kWrite, error));
        break;
      case Step::kShortWriteThenError:
        faults.add_rule(short_write(10));
        faults.add_rule(fail_call(FaultOp::kWrite, error, 2));
        break;
      case Step::kFsync:
        faults.add_rule(fail_call(FaultOp::kFsync, error));
        break;
      case Step::kClose:
        faults.add_rule(fail_call(FaultOp::kClose, error, 1, ".tmp-"));
        break;
      case Step::kRename:
        faults.add_rule(fail_call(FaultOp::kRename, error));
        break;
      case Step::kDirFsync:
        faults.add_rule(fail_call(FaultOp::kDirFsync, error));
        break;
    }
  }
  // What the message must start with: the step and the path it failed on.
  std::string expected_prefix(Step step) const {
    const std::string temp = dir_ + "/.tmp-00000000000000000002-" + std::to_string(::getpid());
    switch (step) {
      case Step::kOpenTemp:
        return "open " + temp + ": ";
      case Step::kWrite:
      case Step::kShortWriteThenError:
        return "write " + temp + ": ";
      case Step::kFsync:
        return "fsync " + temp + ": ";
      case Step::kClose:
        return "close " + temp + ": ";
      case Step::kRename:
        return "rename " + temp + " to " + gen_path(2) + ": ";
      case Step::kDirFsync:
        return "fsync dir " + dir_ + ": ";
    }
    return "?";
  }
};

TEST_P(PublishFailureTest, FailsNamingTheStepLeavesNoTraceAndTheNextPublishSucceeds) {
  const auto [step_case, errno_case] = GetParam();
  auto faults = std::make_shared<FaultFileSystem>();
  auto store = open_store(3, faults);
  ASSERT_NE(store, nullptr);
  const Bytes previous = image(1, 5000);
  ASSERT_TRUE(store->publish(1, previous).ok());

  const std::size_t fds_before = count_fds();
  add_fault(*faults, step_case.step, errno_case.error);
  Status s = store->publish(2, image(2, 5000));
  ASSERT_EQ(s.code(), StatusCode::kIoError) << s.to_string();
  EXPECT_EQ(s.message(), expected_prefix(step_case.step) + errno_text(errno_case.error));
  EXPECT_GE(faults->injected(step_case.step == Step::kOpenTemp   ? FaultOp::kOpen
                             : step_case.step == Step::kFsync    ? FaultOp::kFsync
                             : step_case.step == Step::kClose    ? FaultOp::kClose
                             : step_case.step == Step::kRename   ? FaultOp::kRename
                             : step_case.step == Step::kDirFsync ? FaultOp::kDirFsync
                                                                 : FaultOp::kWrite),
            1u);

  // No temp file, no new generation, the previous one byte-identical, and no
  // descriptor left open (the store's LOCK and directory are the only ones).
  EXPECT_FALSE(has_temp_file(dir_));
  EXPECT_EQ(names_in(dir_), (std::vector<std::string>{"LOCK", "gen-00000000000000000001.jobsnap"}));
  Result<Bytes> back = FileStore::read(gen_path(1), kMaxRead, posix_);
  ASSERT_TRUE(back.ok()) << back.status().to_string();
  EXPECT_EQ(*back, previous);
  EXPECT_EQ(count_fds(), fds_before);
  EXPECT_EQ(faults->open_descriptors(), 2u);
  EXPECT_TRUE(faults->cloexec_violations().empty());

  faults->clear_rules();
  ASSERT_TRUE(store->publish(2, image(2, 5000)).ok());
  Result<Bytes> now = FileStore::read(gen_path(2), kMaxRead, posix_);
  ASSERT_TRUE(now.ok());
  EXPECT_EQ(*now, image(2, 5000));
}

INSTANTIATE_TEST_SUITE_P(
    EachStepAndErrno, PublishFailureTest,
    ::testing::Combine(::testing::ValuesIn(kSteps), ::testing::ValuesIn(kErrnos)),
    [](const ::testing::TestParamInfo<std::tuple<StepCase, ErrnoCase>>& param_info) {
      return std::string(std::get<0>(param_info.param).name) + "_" +
             std::get<1>(param_info.param).name;
    });

// The same faults, persistent: every matching call fails, from the first on
// (a full disk or quota that stays full, a dead device). Each publish fails
// the same visible way, nothing accumulates in the directory, the previous
// generation keeps verifying, and once the fault clears the next publish
// (the snapshot thread's next scheduled one) succeeds.
class PersistentPublishFailureTest : public PublishFailureTest {
 protected:
  void add_persistent_fault(FaultFileSystem& faults, Step step, int error) {
    switch (step) {
      case Step::kOpenTemp:
        faults.add_rule(fail_every_call(FaultOp::kOpen, error, ".tmp-"));
        break;
      case Step::kWrite:
        faults.add_rule(fail_every_call(FaultOp::kWrite, error));
        break;
      case Step::kShortWriteThenError:
        faults.add_rule(short_write(10));  // once; then every write fails
        faults.add_rule(fail_every_call(FaultOp::kWrite, error));
        break;
      case Step::kFsync:
        faults.add_rule(fail_every_call(FaultOp::kFsync, error));
        break;
      case Step::kClose:
        faults.add_rule(fail_every_call(FaultOp::kClose, error, ".tmp-"));
        break;
      case Step::kRename:
        faults.add_rule(fail_every_call(FaultOp::kRename, error));
        break;
      case Step::kDirFsync:
        faults.add_rule(fail_every_call(FaultOp::kDirFsync, error));
        break;
    }
  }
  static std::string step_word(Step step) {
    switch (step) {
      case Step::kOpenTemp:
        return "open ";
      case Step::kWrite:
      case Step::kShortWriteThenError:
        return "write ";
      case Step::kFsync:
        return "fsync ";
      case Step::kClose:
        return "close ";
      case Step::kRename:
        return "rename ";
      case Step::kDirFsync:
        return "fsync dir ";
    }
    return "?";
  }
};

TEST_P(PersistentPublishFailureTest, EveryPublishFailsVisiblyUntilTheFaultClears) {
  const auto [step_case, errno_case] = GetParam();
  auto faults = std::make_shared<FaultFileSystem>();
  auto store = open_store(3, faults);
  ASSERT_NE(store, nullptr);
  const Bytes previous = image(1, 5000);
  ASSERT_TRUE(store->publish(1, previous).ok());
  const std::size_t fds_before = count_fds();
  add_persistent_fault(*faults, step_case.step, errno_case.error);
  for (std::uint64_t generation = 2; generation <= 4; ++generation) {
    SCOPED_TRACE(::testing::Message() << "attempt at generation " << generation);
    Status s = store->publish(generation, image(generation, 5000));
    ASSERT_EQ(s.code(), StatusCode::kIoError) << s.to_string();
    EXPECT_EQ(s.message().rfind(step_word(step_case.step), 0), 0u) << s.message();
    EXPECT_TRUE(contains(s.message(), errno_text(errno_case.error))) << s.message();
    EXPECT_FALSE(has_temp_file(dir_));
    EXPECT_EQ(names_in(dir_),
              (std::vector<std::string>{"LOCK", "gen-00000000000000000001.jobsnap"}));
    Result<Bytes> back = FileStore::read(gen_path(1), kMaxRead, posix_);
    ASSERT_TRUE(back.ok()) << back.status().to_string();
    EXPECT_EQ(*back, previous);
    EXPECT_EQ(count_fds(), fds_before);
  }
  faults->clear_rules();
  ASSERT_TRUE(store->publish(5, image(5, 5000)).ok());
  EXPECT_EQ(names_in(dir_),
            (std::vector<std::string>{"LOCK", "gen-00000000000000000001.jobsnap",
                                      "gen-00000000000000000005.jobsnap"}));
  Result<Bytes> now = FileStore::read(gen_path(5), kMaxRead, posix_);
  ASSERT_TRUE(now.ok());
  EXPECT_EQ(*now, image(5, 5000));
}

INSTANTIATE_TEST_SUITE_P(
    EachStepAndErrno, PersistentPublishFailureTest,
    ::testing::Combine(::testing::ValuesIn(kSteps), ::testing::ValuesIn(kErrnos)),
    [](const ::testing::TestParamInfo<std::tuple<StepCase, ErrnoCase>>& param_info) {
      return std::string(std::get<0>(param_info.param).name) + "_" +
             std::get<1>(param_info.param).name;
    });

// EINTR on each call of a publish, once: write and fsync (file and
// directory) repeat the interrupted call and the publish succeeds; open,
// close and rename report it (the publish fails visibly, the store stays as
// it was). Either way no temp file remains and the newest generation verifies.
TEST_F(FileStoreTest, EintrOnceOnEachStepIsRetriedOrFailsVisibly) {
  struct Case {
    const char* name;
    FaultRule rule;
    bool succeeds;
  };
  const Case cases[] = {
      {"open temp", fail_call(FaultOp::kOpen, EINTR, 1, ".tmp-"), false},
      {"write", fail_call(FaultOp::kWrite, EINTR), true},
      {"fsync", fail_call(FaultOp::kFsync, EINTR), true},
      {"close", fail_call(FaultOp::kClose, EINTR, 1, ".tmp-"), false},
      {"rename", fail_call(FaultOp::kRename, EINTR), false},
      {"fsync dir", fail_call(FaultOp::kDirFsync, EINTR), true},
  };
  auto faults = std::make_shared<FaultFileSystem>();
  auto store = open_store(100, faults);
  ASSERT_NE(store, nullptr);
  std::uint64_t generation = 0;
  std::uint64_t newest = 0;
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    faults->clear_rules();
    faults->add_rule(c.rule);
    ++generation;
    Status s = store->publish(generation, image(generation, 3000));
    if (c.succeeds) {
      ASSERT_TRUE(s.ok()) << s.to_string();
      newest = generation;
    } else {
      ASSERT_EQ(s.code(), StatusCode::kIoError) << s.to_string();
      EXPECT_TRUE(contains(s.message(), errno_text(EINTR))) << s.message();
    }
    EXPECT_FALSE(has_temp_file(dir_));
    if (newest != 0) {
      Result<Bytes> back = FileStore::read(gen_path(newest), kMaxRead, posix_);
      ASSERT_TRUE(back.ok()) << back.status().to_string();
      EXPECT_EQ(*back, image(newest, 3000));
    }
  }
}

// EINTR on every call (a signal storm): a write or fsync interrupted 1000
// times in a row fails the publish instead of spinning the snapshot thread
// forever; the previous generation stays, and the next publish succeeds.
TEST_F(FileStoreTest, PersistentEintrFailsThePublishInsteadOfSpinning) {
  for (FaultOp op : {FaultOp::kWrite, FaultOp::kFsync, FaultOp::kDirFsync}) {
    SCOPED_TRACE(static_cast<int>(op));
    std::error_code ec;
    fs::remove_all(dir_, ec);
    auto faults = std::make_shared<FaultFileSystem>();
    auto store = open_store(3, faults);
    ASSERT_NE(store, nullptr);
    ASSERT_TRUE(store->publish(1, image(1, 100)).ok());
    faults->add_rule(fail_every_call(op, EINTR));
    Status s = store->publish(2, image(2, 100));
    ASSERT_EQ(s.code(), StatusCode::kIoError) << s.to_string();
    EXPECT_TRUE(contains(s.message(), errno_text(EINTR))) << s.message();
    EXPECT_GE(faults->injected(op), 1000u);
    EXPECT_EQ(names_in(dir_), (std::vector<std::string>{"LOCK", "gen-00000000000000000001.jobsnap"}));
    faults->clear_rules();
    ASSERT_TRUE(store->publish(3, image(3, 100)).ok());
  }
}

TEST_F(FileStoreTest, ShortWritesAreContinued) {
  auto faults = std::make_shared<FaultFileSystem>();
  auto store = open_store(3, faults);
  ASSERT_NE(store, nullptr);
  faults->add_rule(short_write(7, 1, /*every=*/true));
  ASSERT_TRUE(store->publish(1, image(1, 100)).ok());
  EXPECT_GE(faults->injected(FaultOp::kWrite), 14u);  // 100 bytes, 7 at a time
  EXPECT_EQ(slurp(gen_path(1)), image(1, 100));
}

TEST_F(FileStoreTest, EintrOnWriteIsRetriedAndThePublishSucceeds) {
  auto faults = std::make_shared<FaultFileSystem>();
  auto store = open_store(3, faults);
  ASSERT_NE(store, nullptr);
  faults->add_rule(fail_call(FaultOp::kWrite, EINTR));
  ASSERT_TRUE(store->publish(1, image(1)).ok());
  EXPECT_EQ(faults->injected(FaultOp::kWrite), 1u);
  EXPECT_EQ(faults->calls(FaultOp::kWrite), 2u);
  EXPECT_EQ(slurp(gen_path(1)), image(1));
}

TEST_F(FileStoreTest, EintrOnFsyncIsRetriedAndThePublishSucceeds) {
  auto faults = std::make_shared<FaultFileSystem>();
  auto store = open_store(3, faults);
  ASSERT_NE(store, nullptr);
  faults->add_rule(fail_call(FaultOp::kFsync, EINTR));
  faults->add_rule(fail_call(FaultOp::kDirFsync, EINTR));
  ASSERT_TRUE(store->publish(1, image(1)).ok());
  EXPECT_EQ(faults->injected(FaultOp::kFsync), 1u);
  EXPECT_EQ(faults->injected(FaultOp::kDirFsync), 1u);
  EXPECT_EQ(slurp(gen_path(1)), image(1));
}

TEST_F(FileStoreTest, FsyncErrorIsNeverRetried) {
  auto faults = std::make_shared<FaultFileSystem>();
  auto store = open_store(3, faults);
  ASSERT_NE(store, nullptr);
  faults->add_rule(fail_call(FaultOp::kFsync, EIO));
  EXPECT_EQ(store->publish(1, image(1)).code(), StatusCode::kIoError);
  EXPECT_EQ(faults->calls(FaultOp::kFsync), 1u);
}

TEST_F(FileStoreTest, FailedPruneDoesNotFailThePublishAndIsRetriedNextTime) {
  auto faults = std::make_shared<FaultFileSystem>();
  auto store = open_store(/*keep=*/1, faults);
  ASSERT_NE(store, nullptr);
  ASSERT_TRUE(store->publish(1, image(1)).ok());
  faults->add_rule(fail_every_call(FaultOp::kUnlink, EIO, "gen-"));
  ASSERT_TRUE(store->publish(2, image(2)).ok());
  EXPECT_EQ(store->list()->size(), 2u);
  faults->clear_rules();
  ASSERT_TRUE(store->publish(3, image(3)).ok());
  Result<std::vector<GenerationFile>> list = store->list();
  ASSERT_EQ(list->size(), 1u);
  EXPECT_EQ((*list)[0].generation, 3u);
}

TEST_F(FileStoreTest, LockHeldElsewhereIsFailedPreconditionOtherLockErrorsAreIoErrors) {
  auto faults = std::make_shared<FaultFileSystem>();
  faults->add_rule(fail_call(FaultOp::kLock, ENOLCK));
  Result<std::unique_ptr<FileStore>> store = FileStore::open(dir_, 3, faults);
  ASSERT_FALSE(store.ok());
  EXPECT_EQ(store.status().code(), StatusCode::kIoError);
  EXPECT_TRUE(contains(store.status().message(), "flock " + dir_ + "/LOCK"));
  EXPECT_EQ(faults->open_descriptors(), 0u);  // the LOCK descriptor was closed
}

// ---- descriptors ------------------------------------------------------------

TEST_F(FileStoreTest, NoDescriptorLeaksOnSuccessOrFailure) {
  const std::size_t fds_at_start = count_fds();
  auto faults = std::make_shared<FaultFileSystem>();
  {
    auto store = open_store(2, faults);
    ASSERT_NE(store, nullptr);
    const std::size_t fds_open = count_fds();
    EXPECT_EQ(fds_open, fds_at_start + 2);  // LOCK and the directory

    ASSERT_TRUE(store->publish(1, image(1)).ok());
    EXPECT_EQ(count_fds(), fds_open);
    ASSERT_TRUE(store->publish(2, image(2)).ok());
    ASSERT_TRUE(store->publish(3, image(3)).ok());  // prunes
    EXPECT_EQ(count_fds(), fds_open);

    for (FaultOp op : {FaultOp::kWrite, FaultOp::kFsync, FaultOp::kRename, FaultOp::kDirFsync}) {
      faults->add_rule(fail_call(op, EIO));
      EXPECT_FALSE(store->publish(10, image(10)).ok()) << fault_op_name(op);
      faults->clear_rules();
      EXPECT_EQ(count_fds(), fds_open) << fault_op_name(op);
    }
    ASSERT_TRUE(FileStore::read(gen_path(3), kMaxRead, *faults).ok());
    EXPECT_FALSE(FileStore::read(dir_, kMaxRead, *faults).ok());
    EXPECT_EQ(count_fds(), fds_open);
    EXPECT_FALSE(FileStore::open(dir_, 2, faults).ok());  // refused second store
    EXPECT_EQ(count_fds(), fds_open);
    EXPECT_EQ(faults->open_descriptors(), 2u);
  }
  EXPECT_EQ(count_fds(), fds_at_start);
  EXPECT_EQ(faults->open_descriptors(), 0u);
  EXPECT_TRUE(faults->cloexec_violations().empty());
}

TEST_F(FileStoreTest, EveryDescriptorIsCloseOnExec) {
  auto faults = std::make_shared<FaultFileSystem>();
  auto store = open_store(2, faults);
  ASSERT_NE(store, nullptr);
  ASSERT_TRUE(store->publish(1, image(1)).ok());
  ASSERT_TRUE(FileStore::read(gen_path(1), kMaxRead, *faults).ok());
  EXPECT_GE(faults->calls(FaultOp::kOpen), 4u);  // dir, LOCK, temp, read
  EXPECT_TRUE(faults->cloexec_violations().empty());
  // The long-lived LOCK and directory descriptors, checked directly.
  for (const std::string& path : {dir_ + "/LOCK", dir_}) {
    SCOPED_TRACE(path);
    const int fd = fd_open_on(path);
    ASSERT_GE(fd, 0);
    const int flags = ::fcntl(fd, F_GETFD);
    ASSERT_GE(flags, 0);
    EXPECT_NE(flags & FD_CLOEXEC, 0);
  }
}

// ---- read() refusals ------------------------------------------------------------

TEST_F(FileStoreTest, ReadRefusesASymlink) {
  auto store = open_store();
  ASSERT_NE(store, nullptr);
  ASSERT_TRUE(store->publish(1, image(1)).ok());
  const std::string link = root_ + "/link.jobsnap";
  ASSERT_EQ(::symlink(gen_path(1).c_str(), link.c_str()), 0);
  Result<Bytes> r = FileStore::read(link, kMaxRead, posix_);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(contains(r.status().message(), link + " is a symlink")) << r.status().to_string();
  EXPECT_EQ(slurp(gen_path(1)), image(1));
  struct stat st;
  ASSERT_EQ(::lstat(link.c_str(), &st), 0);
  EXPECT_TRUE(S_ISLNK(st.st_mode));
}

TEST_F(FileStoreTest, ReadRefusesAFifoWithoutOpeningIt) {
  const std::string fifo = root_ + "/fifo";
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0);
  FaultFileSystem faults;
  Result<Bytes> r = FileStore::read(fifo, kMaxRead, faults);  // would block if opened blocking
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(contains(r.status().message(), fifo + " is not a regular file (it is a FIFO)"))
      << r.status().to_string();
  EXPECT_EQ(faults.calls(FaultOp::kOpen), 0u);
  struct stat st;
  ASSERT_EQ(::lstat(fifo.c_str(), &st), 0);
  EXPECT_TRUE(S_ISFIFO(st.st_mode));
}

TEST_F(FileStoreTest, ReadRefusesADirectory) {
  Result<Bytes> r = FileStore::read(root_, kMaxRead, posix_);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(contains(r.status().message(), root_ + " is not a regular file (it is a directory)"))
      << r.status().to_string();
}

TEST_F(FileStoreTest, ReadRefusesDevNull) {
  Result<Bytes> r = FileStore::read("/dev/null", kMaxRead, posix_);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(contains(r.status().message(), "/dev/null is not a regular file"))
      << r.status().to_string();
}

TEST_F(FileStoreTest, ReadRefusesAnOversizeFileNamingItsSize) {
  auto store = open_store();
  ASSERT_NE(store, nullptr);
  ASSERT_TRUE(store->publish(1, image(1, 100)).ok());
  Result<Bytes> r = FileStore::read(gen_path(1), 99, posix_);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(
      contains(r.status().message(), gen_path(1) + " is 100 bytes, more than the limit of 99"))
      << r.status().to_string();
  EXPECT_EQ(slurp(gen_path(1)), image(1, 100));
  EXPECT_TRUE(FileStore::read(gen_path(1), 100, posix_).ok());  // the bound is inclusive
}

TEST_F(FileStoreTest, ReadOfAMissingFileIsNotFound) {
  Result<Bytes> r = FileStore::read(root_ + "/absent.jobsnap", kMaxRead, posix_);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kNotFound);
  EXPECT_TRUE(contains(r.status().message(), root_ + "/absent.jobsnap"));
}

TEST_F(FileStoreTest, ReadErrorNamesThePathAndErrno) {
  auto store = open_store();
  ASSERT_NE(store, nullptr);
  ASSERT_TRUE(store->publish(1, image(1)).ok());
  FaultFileSystem faults;
  faults.add_rule(fail_call(FaultOp::kRead, EIO));
  Result<Bytes> r = FileStore::read(gen_path(1), kMaxRead, faults);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kIoError);
  EXPECT_EQ(r.status().message(), "read " + gen_path(1) + ": " + errno_text(EIO));
  EXPECT_EQ(faults.open_descriptors(), 0u);
}

// ---- recycling the oldest generation -----------------------------------------------

std::uint64_t inode_of(const std::string& path) {
  struct stat st {};
  EXPECT_EQ(::stat(path.c_str(), &st), 0) << path;
  return st.st_ino;
}

TEST_F(FileStoreTest, SteadyStateRewritesTheOldestGenerationsFileInPlace) {
  auto store = open_store(3);
  ASSERT_NE(store, nullptr);
  const std::size_t sizes[] = {5000, 7000, 3000, 4000, 9000, 1};
  for (std::uint64_t g = 1; g <= 3; ++g) ASSERT_TRUE(store->publish(g, image(g, sizes[g - 1])).ok());
  for (std::uint64_t g = 4; g <= 6; ++g) {
    SCOPED_TRACE("generation " + std::to_string(g));
    // Shorter (4 over 1's 5000 bytes), longer (5 over 2's 7000), one byte (6).
    const std::uint64_t oldest_inode = inode_of(gen_path(g - 3));
    ASSERT_TRUE(store->publish(g, image(g, sizes[g - 1])).ok());
    EXPECT_EQ(inode_of(gen_path(g)), oldest_inode);  // the same file, renamed and rewritten
    EXPECT_EQ(slurp(gen_path(g)), image(g, sizes[g - 1]));  // exactly: no old tail
    Result<std::vector<GenerationFile>> list = store->list();
    ASSERT_TRUE(list.ok());
    ASSERT_EQ(list->size(), 3u);
    for (std::size_t i = 0; i < 3; ++i) {
      EXPECT_EQ((*list)[i].generation, g - i);
      EXPECT_EQ(slurp((*list)[i].path), image(g - i, sizes[g - i - 1]));
    }
    EXPECT_FALSE(has_temp_file(dir_));
    struct stat st {};
    ASSERT_EQ(::stat(gen_path(g).c_str(), &st), 0);
    EXPECT_EQ(st.st_mode & 07777, 0600u);
  }
}

TEST_F(FileStoreTest, AGenerationWithAnotherNameIsNeverRewritten) {
  // An operator's hard-linked backup of the oldest generation keeps its
  // bytes: that file is deleted from the directory as before, not recycled.
  auto store = open_store(2);
  ASSERT_NE(store, nullptr);
  ASSERT_TRUE(store->publish(1, image(1, 4000)).ok());
  ASSERT_TRUE(store->publish(2, image(2, 4000)).ok());
  const std::string backup = root_ + "/backup-of-1.jobsnap";
  ASSERT_EQ(::link(gen_path(1).c_str(), backup.c_str()), 0) << errno_text(errno);
  const std::uint64_t inode = inode_of(gen_path(1));
  ASSERT_TRUE(store->publish(3, image(3, 3000)).ok());
  EXPECT_EQ(slurp(backup), image(1, 4000));
  EXPECT_NE(inode_of(gen_path(3)), inode);
  EXPECT_EQ(slurp(gen_path(3)), image(3, 3000));
  EXPECT_EQ(names_in(dir_), (std::vector<std::string>{"LOCK", "gen-00000000000000000002.jobsnap",
                                                      "gen-00000000000000000003.jobsnap"}));
  // With the backup gone, the next publish recycles again.
  ASSERT_EQ(::unlink(backup.c_str()), 0);
  const std::uint64_t oldest = inode_of(gen_path(2));
  ASSERT_TRUE(store->publish(4, image(4, 3000)).ok());
  EXPECT_EQ(inode_of(gen_path(4)), oldest);
}

TEST_F(FileStoreTest, NothingIsRecycledUntilAnotherGenerationIsKnownToVerify) {
  // A restart finds generation 2 damaged and 1 good (recovery takes 1). With
  // keep 2, the next publish would recycle 1, the only generation that
  // loads: were that publish to fail, none would be left.
  {
    auto first = open_store(2);
    ASSERT_NE(first, nullptr);
    ASSERT_TRUE(first->publish(1, image(1)).ok());
    ASSERT_TRUE(first->publish(2, image(2)).ok());
  }
  {
    std::ofstream damage(gen_path(2), std::ios::binary | std::ios::trunc);
    damage << "not a snapshot";
  }
  auto faults = std::make_shared<FaultFileSystem>();
  auto store = open_store(2, faults);
  ASSERT_NE(store, nullptr);
  const std::uint64_t inode1 = inode_of(gen_path(1));
  faults->add_rule(fail_call(FaultOp::kWrite, ENOSPC));
  EXPECT_FALSE(store->publish(3, image(3)).ok());
  EXPECT_EQ(slurp(gen_path(1)), image(1)) << "the only good generation was rewritten";
  // Recovery says 1 verified: still the oldest, so still not recycled.
  store->note_verified(1);
  faults->add_rule(fail_call(FaultOp::kWrite, ENOSPC));
  EXPECT_FALSE(store->publish(4, image(4)).ok());
  EXPECT_EQ(slurp(gen_path(1)), image(1));
  EXPECT_EQ(inode_of(gen_path(1)), inode1);
  faults->clear_rules();
  // A success: 5 is known good; retention keeps 5 and 2, and 1 too, the
  // generation known good before 5 (never pruned for damaged newer ones).
  ASSERT_TRUE(store->publish(5, image(5)).ok());
  EXPECT_EQ(names_in(dir_), (std::vector<std::string>{"LOCK", "gen-00000000000000000001.jobsnap",
                                                      "gen-00000000000000000002.jobsnap",
                                                      "gen-00000000000000000005.jobsnap"}));
  // From now on the oldest is recycled again (5 stays and verifies), and
  // retention is back to keep.
  ASSERT_TRUE(store->publish(6, image(6)).ok());
  EXPECT_EQ(inode_of(gen_path(6)), inode1);
  EXPECT_EQ(slurp(gen_path(6)), image(6));
  EXPECT_EQ(names_in(dir_), (std::vector<std::string>{"LOCK", "gen-00000000000000000005.jobsnap",
                                                      "gen-00000000000000000006.jobsnap"}));
}

// write_new_file (jobsnap keeps a segment's image with it): a new name only,
// never a replaced file, and a failed write leaves no temp file behind.
TEST_F(FileStoreTest, WriteNewFileNeverReplacesAndLeavesNothingWhenItFails) {
  auto faults = std::make_shared<FaultFileSystem>();
  ASSERT_EQ(::mkdir(dir_.c_str(), 0700), 0);
  const std::string name = "gen-00000000000000000007.jobsnap";
  ASSERT_TRUE(write_new_file(*faults, dir_, name, 7, image(7)).ok());
  EXPECT_EQ(slurp(dir_ + "/" + name), image(7));
  Status again = write_new_file(*faults, dir_, name, 7, image(8));
  EXPECT_EQ(again.code(), StatusCode::kIoError);
  EXPECT_NE(again.to_string().find("rename"), std::string::npos) << again.to_string();
  EXPECT_EQ(slurp(dir_ + "/" + name), image(7)) << "an existing file was replaced";
  faults->add_rule(fail_call(FaultOp::kWrite, ENOSPC));
  EXPECT_EQ(write_new_file(*faults, dir_, "other", 9, image(9)).code(), StatusCode::kIoError);
  EXPECT_EQ(names_in(dir_), (std::vector<std::string>{name})) << "a temp file was left";
}

TEST_F(FileStoreTest, TheOnlyGenerationIsNeverRecycled) {
  // keep 1: rewriting the one generation in place would leave none while the
  // new one is written; it stays until the new one is durable.
  auto faults = std::make_shared<FaultFileSystem>();
  auto store = open_store(1, faults);
  ASSERT_NE(store, nullptr);
  ASSERT_TRUE(store->publish(1, image(1)).ok());
  const std::uint64_t inode = inode_of(gen_path(1));
  faults->add_rule(fail_call(FaultOp::kWrite, EIO));
  ASSERT_FALSE(store->publish(2, image(2)).ok());
  EXPECT_EQ(slurp(gen_path(1)), image(1));
  EXPECT_EQ(inode_of(gen_path(1)), inode);
  faults->clear_rules();
  ASSERT_TRUE(store->publish(3, image(3)).ok());
  EXPECT_EQ(names_in(dir_),
            (std::vector<std::string>{"LOCK", "gen-00000000000000000003.jobsnap"}));
  EXPECT_EQ(slurp(gen_path(3)), image(3));
}

TEST_F(FileStoreTest, RecycledPublishFailuresNameTheStepAndKeepTheNewerGenerations) {
  // keep 2 with 2 present: publish 3 recycles 1's file. A failure before any
  // byte of that file changed (the directory fsync after the rename to the
  // temp name, the open, the fchmod) renames it back: generation 1 stays,
  // byte for byte, the same file. A failure from the ftruncate on loses
  // generation 1 (it was leaving anyway) and nothing else. Either way the next
  // publish succeeds. A failed rename to the temp name is no failure: the
  // publish writes a new file instead.
  struct Case {
    const char* name;
    FaultRule rule;
    std::string prefix;  // of the message; empty: the publish succeeds
    bool keeps_one;      // generation 1 is still there, untouched
  };
  const std::string temp = dir_ + "/.tmp-00000000000000000003-" + std::to_string(::getpid());
  const Case cases[] = {
      {"rename to temp", fail_call(FaultOp::kRename, EIO), "", false},
      {"fsync dir after it", fail_call(FaultOp::kDirFsync, EIO), "fsync dir " + dir_ + ": ", true},
      {"open", fail_call(FaultOp::kOpen, EIO, 1, ".tmp-"), "open " + temp + ": ", true},
      {"open EMFILE", fail_call(FaultOp::kOpen, EMFILE, 1, ".tmp-"), "open " + temp + ": ", true},
      {"fchmod", fail_call(FaultOp::kFchmod, EIO), "fchmod 0600 " + temp + ": ", true},
      {"ftruncate", fail_call(FaultOp::kTruncate, EIO), "ftruncate " + temp + ": ", false},
      {"write", fail_call(FaultOp::kWrite, ENOSPC), "write " + temp + ": ", false},
      {"fsync", fail_call(FaultOp::kFsync, EIO), "fsync " + temp + ": ", false},
      {"close", fail_call(FaultOp::kClose, EIO, 1, ".tmp-"), "close " + temp + ": ", false},
      {"rename to final", fail_call(FaultOp::kRename, EIO, 2),
       "rename " + temp + " to " + gen_path(3) + ": ", false},
      {"fsync dir at the end", fail_call(FaultOp::kDirFsync, EIO, 2), "fsync dir " + dir_ + ": ",
       false},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    std::error_code ec;
    fs::remove_all(dir_, ec);
    auto faults = std::make_shared<FaultFileSystem>();
    auto store = open_store(2, faults);
    ASSERT_NE(store, nullptr);
    ASSERT_TRUE(store->publish(1, image(1, 6000)).ok());
    ASSERT_TRUE(store->publish(2, image(2, 6000)).ok());
    const std::uint64_t inode1 = inode_of(gen_path(1));
    const std::size_t descriptors = faults->open_descriptors();  // the LOCK's, the directory's
    faults->add_rule(c.rule);
    Status s = store->publish(3, image(3, 2000));
    ASSERT_GE(faults->injected(c.rule.op), 1u);
    if (c.prefix.empty()) {
      ASSERT_TRUE(s.ok()) << s.to_string();
      EXPECT_EQ(slurp(gen_path(3)), image(3, 2000));
      EXPECT_EQ(names_in(dir_), (std::vector<std::string>{"LOCK", "gen-00000000000000000002.jobsnap",
                                                          "gen-00000000000000000003.jobsnap"}));
    } else if (c.keeps_one) {
      ASSERT_EQ(s.code(), StatusCode::kIoError) << s.to_string();
      EXPECT_EQ(s.message(), c.prefix + errno_text(c.rule.error));
      EXPECT_EQ(names_in(dir_), (std::vector<std::string>{"LOCK", "gen-00000000000000000001.jobsnap",
                                                          "gen-00000000000000000002.jobsnap"}));
      EXPECT_EQ(slurp(gen_path(1)), image(1, 6000));
      EXPECT_EQ(inode_of(gen_path(1)), inode1);
      Result<std::vector<GenerationFile>> list = store->list();
      ASSERT_TRUE(list.ok());
      EXPECT_EQ(list->size(), 2u);
    } else {
      ASSERT_EQ(s.code(), StatusCode::kIoError) << s.to_string();
      EXPECT_TRUE(s.message().rfind(c.prefix, 0) == 0) << s.message();
      EXPECT_EQ(names_in(dir_),
                (std::vector<std::string>{"LOCK", "gen-00000000000000000002.jobsnap"}));
    }
    EXPECT_EQ(slurp(gen_path(2)), image(2, 6000));
    EXPECT_EQ(faults->open_descriptors(), descriptors);
    faults->clear_rules();
    ASSERT_TRUE(store->publish(4, image(4)).ok());
    EXPECT_EQ(slurp(gen_path(4)), image(4));
  }
}

// Should the rename back fail too (after the directory fsync failed), the
// file is not deleted: the error names both failures and the temp file that
// still holds the generation.
TEST_F(FileStoreTest, ARecycledFileThatCannotGetItsNameBackIsKeptAndNamed) {
  auto faults = std::make_shared<FaultFileSystem>();
  auto store = open_store(2, faults);
  ASSERT_NE(store, nullptr);
  ASSERT_TRUE(store->publish(1, image(1, 6000)).ok());
  ASSERT_TRUE(store->publish(2, image(2, 6000)).ok());
  const std::string temp = dir_ + "/.tmp-00000000000000000003-" + std::to_string(::getpid());
  faults->add_rule(fail_call(FaultOp::kDirFsync, EIO));
  faults->add_rule(fail_call(FaultOp::kRename, EXDEV, 2));  // the rename back
  Status s = store->publish(3, image(3, 2000));
  ASSERT_EQ(s.code(), StatusCode::kIoError) << s.to_string();
  EXPECT_EQ(s.message(), "fsync dir " + dir_ + ": " + errno_text(EIO) + "; then rename " + temp +
                             " back to " + gen_path(1) + ": " + errno_text(EXDEV) +
                             " (generation 1 is left in " + temp + ")");
  EXPECT_EQ(slurp(temp), image(1, 6000));
  EXPECT_EQ(slurp(gen_path(2)), image(2, 6000));
  faults->clear_rules();
  ASSERT_TRUE(store->publish(4, image(4)).ok());
  EXPECT_EQ(slurp(gen_path(4)), image(4));
}

TEST_F(FileStoreTest, PowerLossDuringARecycledPublishNeverLeavesAGenerationHalfRewritten) {
  // The process dies (a failed step stands in for the kill) after each step
  // of a recycled publish, then the power goes: every generation name left
  // holds exactly its own image, generation 2 (acknowledged) is among them,
  // and a reopened store publishes again.
  for (FaultOp op : {FaultOp::kOpen, FaultOp::kFchmod, FaultOp::kTruncate, FaultOp::kWrite,
                     FaultOp::kFsync, FaultOp::kClose, FaultOp::kDirFsync}) {
    for (std::uint64_t nth : {1, 2}) {
      SCOPED_TRACE(std::string(fault_op_name(op)) + " #" + std::to_string(nth));
      std::error_code ec;
      fs::remove_all(dir_, ec);
      auto faults = std::make_shared<FaultFileSystem>();
      auto store = open_store(2, faults);
      ASSERT_NE(store, nullptr);
      std::string error;
      ASSERT_TRUE(faults->mark_durable(dir_, &error)) << error;
      ASSERT_TRUE(store->publish(1, image(1, 6000)).ok());
      ASSERT_TRUE(store->publish(2, image(2, 6000)).ok());
      faults->add_rule(fail_call(op, EIO, nth, op == FaultOp::kOpen ? ".tmp-" : ""));
      (void)store->publish(3, image(3, 2000));
      store.reset();
      ASSERT_TRUE(faults->simulate_power_loss(dir_, &error)) << error;
      faults->clear_rules();
      store = open_store(2, faults);  // removes a stale temp file
      ASSERT_NE(store, nullptr);
      EXPECT_FALSE(has_temp_file(dir_));
      Result<std::vector<GenerationFile>> list = store->list();
      ASSERT_TRUE(list.ok());
      bool has_two = false;
      for (const GenerationFile& f : *list) {
        EXPECT_EQ(slurp(f.path), image(f.generation, f.generation == 3 ? 2000 : 6000)) << f.path;
        has_two = has_two || f.generation == 2;
      }
      EXPECT_TRUE(has_two);
      ASSERT_TRUE(store->publish(4, image(4)).ok());
    }
  }
}

// ---- map(): recovery's read -------------------------------------------------------

// map()'s bytes as a vector, or its Status.
Result<Bytes> map_bytes(const std::string& path, std::uint64_t max_bytes, FileSystem& fs) {
  Result<detail::ImageBytes> m = FileStore::map(path, max_bytes, fs);
  if (!m) return m.status();
  return std::move(*m).to_vector();
}

TEST_F(FileStoreTest, AFileRecycledWhileItIsReadIsGoneNotCorrupt) {
  // jobsnap reads generations while the engine publishes: a publish that
  // recycles the file being read renames it away and rewrites it. The reader
  // must not hand out those bytes: the generation is reported gone
  // (kNotFound), as if pruned, by read() and map() alike.
  auto store = open_store(2);
  ASSERT_NE(store, nullptr);
  const Bytes one = image(1, 5000);
  ASSERT_TRUE(store->publish(1, one).ok());
  for (bool mapped : {false, true}) {
    SCOPED_TRACE(mapped ? "map" : "read");
    const std::string moved = root_ + "/moved.jobsnap";
    FaultFileSystem faults;
    bool acted = false;
    faults.set_before_read([&](const std::string& path) {
      if (acted) return;
      acted = true;
      // What publish() does to the oldest generation: away, then rewritten.
      ASSERT_EQ(::rename(path.c_str(), moved.c_str()), 0);
      std::ofstream(moved, std::ios::binary | std::ios::trunc) << "rewritten";
    });
    Result<Bytes> r = mapped ? map_bytes(gen_path(1), kMaxRead, faults)
                             : FileStore::read(gen_path(1), kMaxRead, faults);
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.status().code(), StatusCode::kNotFound) << r.status().to_string();
    EXPECT_TRUE(contains(r.status().message(), "was replaced while it was read"))
        << r.status().to_string();
    EXPECT_EQ(faults.open_descriptors(), 0u);
    // Put generation 1 back for the other reader.
    ASSERT_EQ(::unlink(moved.c_str()), 0);
    std::ofstream(gen_path(1), std::ios::binary) << std::string(one.begin(), one.end());
  }
  // Left alone, both read it.
  FaultFileSystem faults;
  EXPECT_TRUE(FileStore::read(gen_path(1), kMaxRead, faults).ok());
  EXPECT_TRUE(map_bytes(gen_path(1), kMaxRead, faults).ok());
}

TEST_F(FileStoreTest, AnLstatThatFailsAfterTheReadIsAnIoErrorNotAPrunedFile) {
  // The check that the name still names the file read: only ENOENT (or
  // another file) means "recycled, as if pruned" (kNotFound), which recovery
  // passes over silently. EIO there made it skip the newest durable
  // generation without a word.
  auto store = open_store(2);
  ASSERT_NE(store, nullptr);
  ASSERT_TRUE(store->publish(1, image(1, 5000)).ok());
  for (bool mapped : {false, true}) {
    SCOPED_TRACE(mapped ? "map" : "read");
    FaultFileSystem faults;
    // The first lstat is open_for_read's check, the second the one after.
    faults.add_rule(fail_call(FaultOp::kLstat, EIO, 2, "1.jobsnap"));
    Result<Bytes> r = mapped ? map_bytes(gen_path(1), kMaxRead, faults)
                             : FileStore::read(gen_path(1), kMaxRead, faults);
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.status().code(), StatusCode::kIoError) << r.status().to_string();
    EXPECT_TRUE(contains(r.status().message(), "lstat")) << r.status().to_string();
    EXPECT_EQ(faults.open_descriptors(), 0u);
  }
}

TEST_F(FileStoreTest, MapGivesTheBytesReadGives) {
  auto store = open_store(10);
  ASSERT_NE(store, nullptr);
  ASSERT_TRUE(store->publish(1, image(1, 1 << 20)).ok());  // 1 MiB: many pages
  ASSERT_TRUE(store->publish(2, image(2, 1)).ok());
  for (std::uint64_t g : {1, 2}) {
    Result<detail::ImageBytes> m = FileStore::map(gen_path(g), kMaxRead, posix_);
    ASSERT_TRUE(m.ok()) << m.status().to_string();
    EXPECT_TRUE(m->mapped());
    Result<Bytes> r = FileStore::read(gen_path(g), kMaxRead, posix_);
    ASSERT_TRUE(r.ok());
    ASSERT_EQ(m->size(), r->size());
    EXPECT_TRUE(std::equal(r->begin(), r->end(), m->span().begin()));
    // Moving keeps the mapping; the moved-from object owns nothing.
    detail::ImageBytes moved = std::move(*m);
    EXPECT_EQ(m->size(), 0u);
    EXPECT_EQ(std::move(moved).to_vector(), *r);
  }
  // An empty file maps to no bytes (mmap refuses a length of 0).
  const std::string empty = root_ + "/empty.jobsnap";
  { std::ofstream(empty, std::ios::binary); }
  Result<detail::ImageBytes> e = FileStore::map(empty, kMaxRead, posix_);
  ASSERT_TRUE(e.ok()) << e.status().to_string();
  EXPECT_EQ(e->size(), 0u);
}

// Threads of this process named `name` now (/proc/self/task/*/comm).
std::size_t threads_named(const std::string& name) {
  std::size_t n = 0;
  for (const auto& entry : std::filesystem::directory_iterator("/proc/self/task")) {
    std::ifstream comm(entry.path() / "comm");
    std::string line;
    if (std::getline(comm, line) && line == name) ++n;
  }
  return n;
}

// map() reads the file in on a thread of its own while the caller goes
// through the bytes; that thread is stopped and joined before the mapping
// goes, however early (here: at once, half-way, after a move), and the bytes
// are the file's throughout.
TEST_F(FileStoreTest, AMappingIsReadInOnAThreadThatIsJoinedBeforeTheMappingGoes) {
  auto store = open_store(10);
  ASSERT_NE(store, nullptr);
  const Bytes big = image(1, std::size_t{48} << 20);  // 48 MiB: a dozen 4 MiB chunks
  ASSERT_TRUE(store->publish(1, big).ok());
  for (int round = 0; round < 3; ++round) {
    EXPECT_EQ(threads_named("jobengine-load"), 0u)
        << "round " << round - 1 << "'s populating thread outlived its mapping";
    Result<detail::ImageBytes> m = FileStore::map(gen_path(1), big.size(), posix_);
    ASSERT_TRUE(m.ok()) << m.status().to_string();
    ASSERT_EQ(m->size(), big.size());
    if (round == 0) {
      // Dropped at once: the populating thread may still be in its first chunk.
    } else if (round == 1) {
      // Read while the thread populates, then moved and dropped half-way.
      EXPECT_TRUE(std::equal(big.begin(), big.begin() + (std::ptrdiff_t{24} << 20),
                             m->span().begin()));
      detail::ImageBytes moved = std::move(*m);
      EXPECT_EQ(m->size(), 0u);
      EXPECT_EQ(moved.size(), big.size());
    } else {
      EXPECT_TRUE(std::equal(big.begin(), big.end(), m->span().begin()));
      EXPECT_EQ(std::move(*m).to_vector(), big);
    }
  }
  EXPECT_EQ(threads_named("jobengine-load"), 0u) << "a populating thread outlived its mapping";
}

TEST_F(FileStoreTest, MapRefusesWhatReadRefusesWithTheSameErrors) {
  auto store = open_store();
  ASSERT_NE(store, nullptr);
  ASSERT_TRUE(store->publish(1, image(1, 100)).ok());
  const std::string link = root_ + "/link.jobsnap";
  ASSERT_EQ(::symlink(gen_path(1).c_str(), link.c_str()), 0);
  const std::string fifo = root_ + "/fifo";
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0);
  struct Case {
    std::string path;
    std::uint64_t max_bytes;
    StatusCode code;
  };
  const Case cases[] = {
      {link, kMaxRead, StatusCode::kInvalidArgument},
      {fifo, kMaxRead, StatusCode::kInvalidArgument},
      {root_, kMaxRead, StatusCode::kInvalidArgument},
      {"/dev/null", kMaxRead, StatusCode::kInvalidArgument},
      {gen_path(1), 99, StatusCode::kInvalidArgument},
      {root_ + "/absent.jobsnap", kMaxRead, StatusCode::kNotFound},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.path);
    FaultFileSystem faults;
    Result<Bytes> read = FileStore::read(c.path, c.max_bytes, faults);
    Result<Bytes> mapped = map_bytes(c.path, c.max_bytes, faults);
    ASSERT_FALSE(read.ok());
    ASSERT_FALSE(mapped.ok());
    EXPECT_EQ(mapped.status().code(), c.code);
    EXPECT_EQ(mapped.status().to_string(), read.status().to_string());
    EXPECT_EQ(faults.open_descriptors(), 0u);
  }
  EXPECT_TRUE(map_bytes(gen_path(1), 100, posix_).ok());  // the bound is inclusive
}

TEST_F(FileStoreTest, MapErrorNamesThePathAndErrnoAndEintrIsRetried) {
  auto store = open_store();
  ASSERT_NE(store, nullptr);
  ASSERT_TRUE(store->publish(1, image(1)).ok());
  {
    FaultFileSystem faults;
    faults.add_rule(fail_call(FaultOp::kRead, ENOMEM));
    Result<Bytes> r = map_bytes(gen_path(1), kMaxRead, faults);
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.status().code(), StatusCode::kIoError);
    EXPECT_EQ(r.status().message(), "mmap " + gen_path(1) + ": " + errno_text(ENOMEM));
    EXPECT_EQ(faults.open_descriptors(), 0u);
  }
  {
    FaultFileSystem faults;
    faults.add_rule(fail_call(FaultOp::kRead, EINTR));
    Result<Bytes> r = map_bytes(gen_path(1), kMaxRead, faults);
    ASSERT_TRUE(r.ok()) << r.status().to_string();
    EXPECT_EQ(*r, image(1));
    EXPECT_EQ(faults.calls(FaultOp::kRead), 2u);
    EXPECT_EQ(faults.open_descriptors(), 0u);
  }
}

// ---- power loss -----------------------------------------------------------------

TEST_F(FileStoreTest, PublishedGenerationsSurvivePowerLoss) {
  // keep is large enough that no prune (which fsyncs the directory too)
  // hides a missing directory fsync in publish itself.
  auto faults = std::make_shared<FaultFileSystem>();
  auto store = open_store(10, faults);
  ASSERT_NE(store, nullptr);
  std::string error;
  ASSERT_TRUE(faults->mark_durable(dir_, &error)) << error;
  for (std::uint64_t g = 1; g <= 3; ++g) {
    SCOPED_TRACE("generation " + std::to_string(g));
    ASSERT_TRUE(store->publish(g, image(g, 3000)).ok());
    store.reset();  // the process dies with the machine
    ASSERT_TRUE(faults->simulate_power_loss(dir_, &error)) << error;
    store = open_store(10, faults);
    ASSERT_NE(store, nullptr);
    Result<std::vector<GenerationFile>> list = store->list();
    ASSERT_TRUE(list.ok());
    ASSERT_EQ(list->size(), g);
    for (const GenerationFile& f : *list) {
      Result<Bytes> back = FileStore::read(f.path, kMaxRead, posix_);
      ASSERT_TRUE(back.ok()) << back.status().to_string();
      EXPECT_EQ(*back, image(f.generation, 3000)) << f.path;
    }
  }
}

TEST_F(FileStoreTest, PrunedGenerationsStayPrunedAfterPowerLoss) {
  auto faults = std::make_shared<FaultFileSystem>();
  auto store = open_store(2, faults);
  ASSERT_NE(store, nullptr);
  std::string error;
  ASSERT_TRUE(faults->mark_durable(dir_, &error)) << error;
  for (std::uint64_t g = 1; g <= 4; ++g) ASSERT_TRUE(store->publish(g, image(g)).ok());
  store.reset();
  ASSERT_TRUE(faults->simulate_power_loss(dir_, &error)) << error;
  EXPECT_EQ(names_in(dir_), (std::vector<std::string>{"LOCK", "gen-00000000000000000003.jobsnap",
                                                      "gen-00000000000000000004.jobsnap"}));
  EXPECT_EQ(slurp(gen_path(4)), image(4));
}

TEST_F(FileStoreTest, PowerLossAfterAFailedPublishKeepsThePreviousGeneration) {
  for (FaultOp op : {FaultOp::kWrite, FaultOp::kFsync, FaultOp::kRename, FaultOp::kDirFsync}) {
    SCOPED_TRACE(fault_op_name(op));
    std::error_code ec;
    fs::remove_all(dir_, ec);
    auto faults = std::make_shared<FaultFileSystem>();
    auto store = open_store(3, faults);
    ASSERT_NE(store, nullptr);
    std::string error;
    ASSERT_TRUE(faults->mark_durable(dir_, &error)) << error;
    ASSERT_TRUE(store->publish(1, image(1)).ok());
    faults->add_rule(fail_call(op, EIO));
    ASSERT_FALSE(store->publish(2, image(2)).ok());
    store.reset();
    ASSERT_TRUE(faults->simulate_power_loss(dir_, &error)) << error;
    Result<std::vector<GenerationFile>> list = list_generations(dir_, posix_);
    ASSERT_TRUE(list.ok());
    ASSERT_EQ(list->size(), 1u);
    EXPECT_EQ((*list)[0].generation, 1u);
    EXPECT_EQ(slurp(gen_path(1)), image(1));
  }
}

// ---- the fault layer itself ------------------------------------------------------

class FaultFileSystemTest : public FileStoreTest {};

TEST_F(FaultFileSystemTest, RuleFiresOnTheNthMatchingCallOnly) {
  FaultFileSystem faults;
  faults.add_rule(fail_call(FaultOp::kUnlink, ENOSPC, 2, "victim"));
  for (const char* name : {"/other", "/victim1", "/victim2", "/victim3"}) spit(root_ + name, "");
  EXPECT_EQ(faults.unlink(root_ + "/other"), 0);    // does not match the path
  EXPECT_EQ(faults.unlink(root_ + "/victim1"), 0);  // first match
  EXPECT_EQ(faults.unlink(root_ + "/victim2"), ENOSPC);
  EXPECT_EQ(faults.unlink(root_ + "/victim3"), 0);
  EXPECT_TRUE(fs::exists(root_ + "/victim2"));  // a failed call did nothing
  EXPECT_EQ(faults.calls(FaultOp::kUnlink), 4u);
  EXPECT_EQ(faults.injected(FaultOp::kUnlink), 1u);
}

TEST_F(FaultFileSystemTest, EveryRuleKeepsFiring) {
  FaultFileSystem faults;
  faults.add_rule(fail_every_call(FaultOp::kMkdir, EDQUOT));
  EXPECT_EQ(faults.mkdir(root_ + "/x", 0700), EDQUOT);
  EXPECT_EQ(faults.mkdir(root_ + "/y", 0700), EDQUOT);
  faults.clear_rules();
  EXPECT_EQ(faults.mkdir(root_ + "/z", 0700), 0);
}

TEST_F(FaultFileSystemTest, PowerLossDropsUnsyncedDataAndUnsyncedNames) {
  FaultFileSystem faults;
  const std::string d = root_ + "/d";
  ASSERT_EQ(::mkdir(d.c_str(), 0700), 0);
  spit(d + "/old", "old contents");
  std::string error;
  ASSERT_TRUE(faults.mark_durable(d, &error)) << error;

  // Created, directory synced, data never synced: the file comes back empty.
  SysResult<int> fd = faults.open(d + "/named", O_CREAT | O_WRONLY, 0600);
  ASSERT_TRUE(fd.ok());
  ASSERT_TRUE(faults.write(fd.value, "data", 4).ok());
  ASSERT_EQ(faults.close(fd.value), 0);
  SysResult<int> dfd = faults.open(d, O_RDONLY | O_DIRECTORY, 0);
  ASSERT_TRUE(dfd.ok());
  ASSERT_EQ(faults.fsync(dfd.value), 0);
  ASSERT_EQ(faults.close(dfd.value), 0);
  // Created and fsynced after that, but the directory not synced again: the
  // name is lost.
  fd = faults.open(d + "/new", O_CREAT | O_WRONLY, 0600);
  ASSERT_TRUE(fd.ok());
  ASSERT_TRUE(faults.write(fd.value, "new", 3).ok());
  ASSERT_EQ(faults.fsync(fd.value), 0);
  ASSERT_EQ(faults.close(fd.value), 0);
  // Appended to a durable file without fsync: the append is lost.
  fd = faults.open(d + "/old", O_WRONLY | O_APPEND, 0);
  ASSERT_TRUE(fd.ok());
  ASSERT_TRUE(faults.write(fd.value, "+more", 5).ok());
  ASSERT_EQ(faults.close(fd.value), 0);
  // Then unlinked without a directory fsync: the file comes back.
  ASSERT_EQ(faults.unlink(d + "/old"), 0);

  ASSERT_TRUE(faults.simulate_power_loss(d, &error)) << error;
  EXPECT_EQ(names_in(d), (std::vector<std::string>{"named", "old"}));
  EXPECT_EQ(slurp(d + "/old"), Bytes(std::begin("old contents"), std::end("old contents") - 1));
  EXPECT_TRUE(slurp(d + "/named").empty());
}

}  // namespace
}  // namespace jobengine::persist
