// Tests for Status and Result (jobengine/status.h).
#include "jobengine/status.h"

#include <gtest/gtest.h>

#include <cstdlib>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace jobengine {
namespace {

TEST(StatusTest, DefaultStatusIsOkWithEmptyMessage) {
  Status s;
  EXPECT_TRUE(s.ok());
  EXPECT_EQ(s.code(), StatusCode::kOk);
  EXPECT_TRUE(s.message().empty());
  EXPECT_EQ(s.to_string(), "OK");
}

TEST(StatusTest, OkStatusEqualsDefaultStatus) {
  EXPECT_TRUE(Status::ok_status().ok());
  EXPECT_EQ(Status::ok_status(), Status());
}

TEST(StatusTest, OkCodeWithMessageGivesTheOkStatus) {
  Status s(StatusCode::kOk, "ignored");
  EXPECT_TRUE(s.ok());
  EXPECT_TRUE(s.message().empty());
  EXPECT_EQ(s, Status());
}

TEST(StatusTest, ErrorStatusKeepsCodeAndMessage) {
  Status s(StatusCode::kQueueFull, "job table full (capacity 1024)");
  EXPECT_FALSE(s.ok());
  EXPECT_EQ(s.code(), StatusCode::kQueueFull);
  EXPECT_EQ(s.message(), "job table full (capacity 1024)");
}

TEST(StatusTest, ToStringIsCodeNameColonMessage) {
  EXPECT_EQ(Status(StatusCode::kQueueFull, "job table full (capacity 1024)").to_string(),
            "QueueFull: job table full (capacity 1024)");
  EXPECT_EQ(Status(StatusCode::kNotFound, "no handler 'x'").to_string(),
            "NotFound: no handler 'x'");
}

TEST(StatusTest, CodeNamesDropTheLeadingK) {
  const std::vector<std::pair<StatusCode, std::string>> names = {
      {StatusCode::kInvalidArgument, "InvalidArgument"},
      {StatusCode::kNotFound, "NotFound"},
      {StatusCode::kAlreadyExists, "AlreadyExists"},
      {StatusCode::kQueueFull, "QueueFull"},
      {StatusCode::kPayloadTooLarge, "PayloadTooLarge"},
      {StatusCode::kStopped, "Stopped"},
      {StatusCode::kFailedPrecondition, "FailedPrecondition"},
      {StatusCode::kIoError, "IoError"},
      {StatusCode::kCorruption, "Corruption"},
      {StatusCode::kInternal, "Internal"},
  };
  for (const auto& [code, name] : names) {
    EXPECT_EQ(status_code_name(code), name);
  }
  // The OK code's name is spelled as Status::to_string() spells it.
  EXPECT_EQ(std::string(status_code_name(StatusCode::kOk)), Status().to_string());
}

TEST(StatusTest, EqualityComparesCodeAndMessage) {
  EXPECT_EQ(Status(StatusCode::kStopped, "a"), Status(StatusCode::kStopped, "a"));
  EXPECT_FALSE(Status(StatusCode::kStopped, "a") == Status(StatusCode::kStopped, "b"));
  EXPECT_FALSE(Status(StatusCode::kStopped, "a") == Status(StatusCode::kInternal, "a"));
  EXPECT_FALSE(Status(StatusCode::kStopped, "") == Status());
}

TEST(StatusTest, CopiesAndMovesKeepContents) {
  Status a(StatusCode::kIoError, "open(/x): No such file or directory");
  Status b = a;
  EXPECT_EQ(a, b);
  Status c = std::move(b);
  EXPECT_EQ(c, a);
}

TEST(StatusTest, CopyOfErrorOutlivesTheOriginal) {
  Status copy;
  {
    Status original(StatusCode::kCorruption, std::string(100, 'c'));  // beyond any SSO
    copy = original;
    Status assigned(StatusCode::kStopped, "x");
    assigned = original;
    EXPECT_EQ(assigned, original);
  }
  EXPECT_EQ(copy.code(), StatusCode::kCorruption);
  EXPECT_EQ(copy.message(), std::string(100, 'c'));
}

TEST(StatusTest, SelfAssignmentKeepsContents) {
  Status s(StatusCode::kIoError, "write(/x): No space left on device");
  const Status& alias = s;
  s = alias;
  EXPECT_EQ(s.code(), StatusCode::kIoError);
  EXPECT_EQ(s.message(), "write(/x): No space left on device");
}

TEST(StatusTest, MoveAssignmentTransfersTheError) {
  Status a(StatusCode::kNotFound, "gone");
  Status b(StatusCode::kStopped, "replaced");
  b = std::move(a);
  EXPECT_EQ(b, Status(StatusCode::kNotFound, "gone"));
}

constexpr Status::Rep kStaticFull{StatusCode::kQueueFull, false, "job table full"};

TEST(StatusTest, StaticRepStatusReadsLikeAnyError) {
  Status s(kStaticFull);
  EXPECT_FALSE(s.ok());
  EXPECT_EQ(s.code(), StatusCode::kQueueFull);
  EXPECT_EQ(s.message(), "job table full");
  EXPECT_EQ(s.to_string(), "QueueFull: job table full");
  Status copy = s;
  EXPECT_EQ(copy, s);
  EXPECT_EQ(copy, Status(StatusCode::kQueueFull, "job table full"));
  Status moved = std::move(copy);
  EXPECT_EQ(moved, s);
}

TEST(ResultTest, ValueResultIsOk) {
  Result<int> r(42);
  EXPECT_TRUE(r.ok());
  EXPECT_TRUE(static_cast<bool>(r));
  EXPECT_TRUE(r.status().ok());
  EXPECT_EQ(r.value(), 42);
  EXPECT_EQ(*r, 42);
  *r = 7;
  EXPECT_EQ(r.value(), 7);
}

TEST(ResultTest, ErrorResultKeepsStatus) {
  Result<int> r(Status(StatusCode::kNotFound, "no handler 'x'"));
  EXPECT_FALSE(r.ok());
  EXPECT_FALSE(static_cast<bool>(r));
  EXPECT_EQ(r.status().code(), StatusCode::kNotFound);
  EXPECT_EQ(r.status().message(), "no handler 'x'");
}

TEST(ResultTest, ResultFromOkStatusBecomesInternalError) {
  Result<int> r(Status::ok_status());
  EXPECT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kInternal);
  EXPECT_FALSE(r.status().message().empty());
}

TEST(ResultTest, ArrowReachesMembers) {
  Result<std::string> r(std::string("hello"));
  EXPECT_EQ(r->size(), 5u);
  const Result<std::string>& cr = r;
  EXPECT_EQ(cr->size(), 5u);
  EXPECT_EQ(*cr, "hello");
}

TEST(ResultTest, HoldsMoveOnlyValuesAndMovesThemOut) {
  Result<std::unique_ptr<int>> r(std::make_unique<int>(5));
  ASSERT_TRUE(r.ok());
  std::unique_ptr<int> p = std::move(r).value();
  ASSERT_NE(p, nullptr);
  EXPECT_EQ(*p, 5);

  Result<std::unique_ptr<int>> r2(std::make_unique<int>(6));
  std::unique_ptr<int> p2 = *std::move(r2);
  ASSERT_NE(p2, nullptr);
  EXPECT_EQ(*p2, 6);
}

TEST(ResultTest, ResultCanBeMoved) {
  Result<std::string> a(std::string("value"));
  Result<std::string> b = std::move(a);
  ASSERT_TRUE(b.ok());
  EXPECT_EQ(*b, "value");

  Result<std::string> e(Status(StatusCode::kStopped, "stopped"));
  Result<std::string> f = std::move(e);
  EXPECT_EQ(f.status(), Status(StatusCode::kStopped, "stopped"));
}

using ResultDeathTest = ::testing::Test;

TEST_F(ResultDeathTest, ReadingValueOfFailedResultAbortsWithItsStatus) {
  // "threadsafe" re-executes this binary. Under qemu-user (the aarch64 run,
  // no binfmt_misc) that exec fails, so that run sets the environment's
  // GTEST_DEATH_TEST_STYLE=fast (fork only; this test has no threads).
  if (std::getenv("GTEST_DEATH_TEST_STYLE") == nullptr) {
    GTEST_FLAG_SET(death_test_style, "threadsafe");
  }
  Result<int> r(Status(StatusCode::kQueueFull, "job table full (capacity 8)"));
  EXPECT_DEATH({ (void)r.value(); }, "QueueFull: job table full \\(capacity 8\\)");
  EXPECT_DEATH({ (void)*r; }, "QueueFull");
}

}  // namespace
}  // namespace jobengine
