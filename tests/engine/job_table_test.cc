// JobTable and RetireBuffer: the slot arena's free pool, epoch stamps and
// retirement horizon that the snapshot thread relies on.
#include "engine/job_table.h"
#include "engine/clock.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <set>
#include <thread>
#include <utility>
#include <vector>

namespace jobengine::detail {
namespace {

std::vector<SlotIndex> sorted(std::vector<SlotIndex> v) {
  std::sort(v.begin(), v.end());
  return v;
}

std::vector<SlotIndex> take_all(JobTable& t) {
  std::vector<SlotIndex> out;
  SlotIndex buf[kSlotCacheSize];
  std::size_t n;
  while ((n = t.take_free(buf)) != 0) out.insert(out.end(), buf, buf + n);
  return out;
}

TEST(JobTableTest, NewTableHasEveryIndexFreeExactlyOnce) {
  JobTable t(1000);
  std::vector<SlotIndex> all = take_all(t);
  ASSERT_EQ(all.size(), 1000u);
  std::set<SlotIndex> distinct(all.begin(), all.end());
  EXPECT_EQ(distinct.size(), 1000u);
  EXPECT_EQ(*distinct.rbegin(), 999u);
  SlotIndex more[kSlotCacheSize];
  EXPECT_EQ(t.take_free(more), 0u) << "pool must be empty after taking capacity slots";
}

TEST(JobTableTest, FirstSlotsTakenAreTheLowestIndices) {
  JobTable t(100);
  SlotIndex buf[kSlotCacheSize];
  ASSERT_EQ(t.take_free(buf), kSlotCacheSize);
  std::sort(buf, buf + kSlotCacheSize);
  EXPECT_EQ(buf[0], 0u);
  EXPECT_EQ(buf[kSlotCacheSize - 1], kSlotCacheSize - 1);
}

TEST(JobTableTest, PoolIsLifoSoRecentlyFreedSlotsAreReusedFirst) {
  JobTable t(256);
  std::vector<SlotIndex> all = take_all(t);
  ASSERT_EQ(all.size(), 256u);
  // Free two magazines' worth, the second most recently.
  ASSERT_EQ(t.put_free(all.data(), 3), 3u);
  ASSERT_EQ(t.put_free(all.data() + 100, 5), 5u);
  SlotIndex buf[kSlotCacheSize];
  ASSERT_EQ(t.take_free(buf), 5u);
  EXPECT_TRUE(std::equal(buf, buf + 5, all.data() + 100));
  ASSERT_EQ(t.take_free(buf), 3u);
  EXPECT_TRUE(std::equal(buf, buf + 3, all.data()));
  EXPECT_EQ(t.take_free(buf), 0u);
}

TEST(JobTableTest, UsedEndFollowsTheHighestSlotEverTakenNotTheCapacity) {
  JobTable t(100'000);
  EXPECT_EQ(t.used_end(), 0u) << "no slot taken yet";
  SlotIndex a[kSlotCacheSize];
  SlotIndex b[kSlotCacheSize];
  ASSERT_EQ(t.take_free(a), kSlotCacheSize);
  EXPECT_EQ(t.used_end(), kSlotCacheSize);
  ASSERT_EQ(t.take_free(b), kSlotCacheSize);
  EXPECT_EQ(t.used_end(), 2 * kSlotCacheSize);
  // A working set that circulates through the pool stays where it is: the
  // freed magazines come back first (LIFO) and the end does not move.
  for (int round = 0; round < 1000; ++round) {
    ASSERT_EQ(t.put_free(a, kSlotCacheSize), kSlotCacheSize);
    ASSERT_EQ(t.take_free(a), kSlotCacheSize);
  }
  EXPECT_EQ(t.used_end(), 2 * kSlotCacheSize);
  // Giving back a low magazine and taking it again never lowers the end.
  ASSERT_EQ(t.put_free(b, kSlotCacheSize), kSlotCacheSize);
  ASSERT_EQ(t.put_free(a, kSlotCacheSize), kSlotCacheSize);
  ASSERT_EQ(t.take_free(a), kSlotCacheSize);
  EXPECT_EQ(t.used_end(), 2 * kSlotCacheSize);
  // Taking everything reaches the capacity.
  (void)take_all(t);
  EXPECT_EQ(t.used_end(), 100'000u);
}

using Ranges = std::vector<std::pair<std::size_t, std::size_t>>;

Ranges scan_ranges(const JobTable& t) {
  Ranges v;
  t.for_each_scan_range([&](std::size_t b, std::size_t e) { v.emplace_back(b, e); });
  return v;
}

TEST(JobTableTest, AScanReadsOnlyTheRegionsWithSlotsOutOfThePool) {
  constexpr std::size_t kRegion = JobTable::kScanRegion;
  constexpr std::size_t kCap = 16 * kRegion + 3 * kSlotCacheSize;  // the last region is partial
  JobTable t(kCap);
  EXPECT_TRUE(scan_ranges(t).empty()) << "no slot taken yet";
  // A burst takes every slot: the whole table is one range.
  std::vector<SlotIndex> all = take_all(t);
  EXPECT_EQ(scan_ranges(t), (Ranges{{0, kCap}}));
  // All back, scattered over the magazines: nothing to read, though the
  // table's used end stays at its capacity.
  std::vector<SlotIndex> shuffled = all;
  for (std::size_t i = 0; i < shuffled.size(); ++i) {
    std::swap(shuffled[i], shuffled[(i * 7919 + 13) % shuffled.size()]);
  }
  ASSERT_EQ(t.put_free(shuffled.data(), shuffled.size()), kCap);
  EXPECT_EQ(t.used_end(), kCap);
  EXPECT_TRUE(scan_ranges(t).empty());
  for (std::size_t r = 0; r * kRegion < kCap; ++r) {
    EXPECT_EQ(t.region_out(static_cast<SlotIndex>(r * kRegion)), 0u) << "region " << r;
  }
  // Two magazines out, their slots in several regions: each region counts
  // its own, and the ranges are exactly those regions (adjacent ones merged).
  SlotIndex a[kSlotCacheSize];
  SlotIndex b[kSlotCacheSize];
  ASSERT_EQ(t.take_free(a), kSlotCacheSize);
  ASSERT_EQ(t.take_free(b), kSlotCacheSize);
  std::vector<std::uint32_t> expected(kCap / kRegion + 1, 0);
  for (SlotIndex i : a) ++expected[i / kRegion];
  for (SlotIndex i : b) ++expected[i / kRegion];
  ASSERT_GT(std::count_if(expected.begin(), expected.end(), [](auto c) { return c != 0; }), 2)
      << "the test means to spread the magazines over regions";
  Ranges want;
  for (std::size_t r = 0; r < expected.size(); ++r) {
    EXPECT_EQ(t.region_out(static_cast<SlotIndex>(r * kRegion)), expected[r]) << "region " << r;
    if (expected[r] == 0) continue;
    const std::size_t end = std::min(kCap, (r + 1) * kRegion);
    if (!want.empty() && want.back().second == r * kRegion) {
      want.back().second = end;
    } else {
      want.emplace_back(r * kRegion, end);
    }
  }
  EXPECT_EQ(scan_ranges(t), want);
  // Back again: nothing to read.
  ASSERT_EQ(t.put_free(a, kSlotCacheSize), kSlotCacheSize);
  ASSERT_EQ(t.put_free(b, kSlotCacheSize), kSlotCacheSize);
  EXPECT_TRUE(scan_ranges(t).empty());
}

TEST(JobTableTest, PutFreeSplitsLongRunsIntoMagazines) {
  JobTable t(100);
  std::vector<SlotIndex> all = take_all(t);
  EXPECT_EQ(t.put_free(all.data(), all.size()), 100u);
  EXPECT_EQ(take_all(t).size(), 100u);
}

TEST(SlotPoolTest, ConcurrentTakeAndGiveNeverLoseOrDuplicateAnIndex) {
  // Four threads churn magazines through the pool; afterwards every index
  // is in it exactly once (P1-P3 under contention; TSan checks the orders).
  constexpr std::size_t kCap = 4096;
  JobTable t(kCap);
  std::vector<std::thread> threads;
  for (int k = 0; k < 4; ++k) {
    threads.emplace_back([&t] {
      SlotIndex buf[kSlotCacheSize];
      for (int round = 0; round < 20000; ++round) {
        std::size_t n = t.take_free(buf);
        std::size_t put = 0;
        while (put < n) put += t.put_free(buf + put, n - put);
      }
    });
  }
  for (auto& th : threads) th.join();
  std::vector<SlotIndex> all = take_all(t);
  std::set<SlotIndex> distinct(all.begin(), all.end());
  EXPECT_EQ(all.size(), kCap);
  EXPECT_EQ(distinct.size(), kCap);
}

TEST(JobTableTest, SlotsAreCacheLineAlignedAndSized) {
  JobTable t(3);
  for (SlotIndex i = 0; i < 3; ++i) {
    EXPECT_EQ(reinterpret_cast<std::uintptr_t>(&t.slot(i)) % kCacheLine, 0u);
  }
  EXPECT_EQ(reinterpret_cast<const char*>(&t.slot(1)) - reinterpret_cast<const char*>(&t.slot(0)),
            static_cast<std::ptrdiff_t>(kSlotBytes));
}

TEST(JobTableTest, ClaimStampsSubmitEpochAndClearsTheFinishStamp) {
  JobTable t(4);
  Slot& s = t.slot(2);
  s.finish_epoch.store(5);
  s.attempts.store(3);
  JobTable::claim(s, 7);
  EXPECT_EQ(s.submit_epoch.load(), 7u);
  EXPECT_EQ(s.finish_epoch.load(), 0u);
  EXPECT_EQ(s.attempts.load(), 0u);
  EXPECT_EQ(s.state.load(), SlotState::kQueued);
}

TEST(JobTableTest, RetireStampsFinishEpochAndReclaimFreesTheHeapPayload) {
  JobTable t(4);
  Slot& s = t.slot(1);
  JobTable::claim(s, 3);
  s.heap_payload = new unsigned char[1000];
  s.payload_size = 1000;
  JobTable::retire(s, 9);
  // A snapshot that cut before epoch 9 may still copy the payload.
  EXPECT_NE(s.heap_payload, nullptr);
  EXPECT_EQ(s.finish_epoch.load(), 9u);
  EXPECT_EQ(s.state.load(), SlotState::kRetired);
  JobTable::reclaim(s);
  EXPECT_EQ(s.heap_payload, nullptr);
  EXPECT_EQ(s.state.load(), SlotState::kFree);
}

TEST(JobTableTest, AnIdHintNamesItsIdExactlyAndTheLastNoteWins) {
  JobTable table(100);  // 128 entries
  EXPECT_EQ(table.hinted_slot(5), std::nullopt) << "no id noted yet";
  EXPECT_EQ(table.hinted_slot(0), std::nullopt);
  table.note_id(5, 99);
  EXPECT_EQ(table.hinted_slot(5), std::optional<SlotIndex>(99));
  EXPECT_EQ(table.hinted_slot(5 + 128), std::nullopt) << "an entry is about one id only";
  EXPECT_EQ(table.hinted_slot(6), std::nullopt);
  table.note_id(5 + 128, 7);
  EXPECT_EQ(table.hinted_slot(5), std::nullopt) << "a later id took the entry over";
  EXPECT_EQ(table.hinted_slot(5 + 128), std::optional<SlotIndex>(7));
  table.note_id(5, 3);  // the same id stamped again (requeue_dead): its newest slot
  EXPECT_EQ(table.hinted_slot(5), std::optional<SlotIndex>(3));
  // The largest id and slot pack without loss.
  JobTable big(1000);  // 1024 entries
  const JobId top = (JobId{1} << 63) - 1;
  big.note_id(top, 999);
  EXPECT_EQ(big.hinted_slot(top), std::optional<SlotIndex>(999));
  JobTable one(1);
  one.note_id(12345, 0);
  EXPECT_EQ(one.hinted_slot(12345), std::optional<SlotIndex>(0));
  EXPECT_EQ(one.hinted_slot(777), std::nullopt);
}

TEST(JobTableTest, AdvanceEpochIsMonotonicFromOne) {
  JobTable t(1);
  EXPECT_EQ(t.epoch(), 1u);
  EXPECT_EQ(t.advance_epoch(), 2u);
  EXPECT_EQ(t.advance_epoch(), 3u);
  EXPECT_EQ(t.epoch(), 3u);
}

TEST(RetireBufferTest, FlushReturnsEverySlotWhenNoSnapshotHoldsTheHorizon) {
  JobTable t(8);
  std::vector<SlotIndex> all = take_all(t);
  ASSERT_EQ(all.size(), 8u);
  RetireBuffer rb(8);
  for (SlotIndex i : all) {
    JobTable::claim(t.slot(i), 1);
    JobTable::retire(t.slot(i), 5);
    rb.add(i, 5);
  }
  EXPECT_EQ(t.reclaim_horizon(), kNoHorizon);
  EXPECT_EQ(rb.flush(t), 8u);
  EXPECT_EQ(rb.size(), 0u);
  for (SlotIndex i : all) EXPECT_EQ(t.slot(i).state.load(), SlotState::kFree);
  EXPECT_EQ(take_all(t).size(), 8u);
}

TEST(RetireBufferTest, SlotsFinishedAtOrAfterTheHorizonWaitUntilItIsRaised) {
  JobTable t(6);
  std::vector<SlotIndex> all = take_all(t);
  ASSERT_EQ(all.size(), 6u);
  RetireBuffer rb(6);
  // A worker's finish epochs never decrease.
  const std::uint64_t finish[6] = {2, 4, 4, 5, 6, 9};
  for (int k = 0; k < 6; ++k) {
    JobTable::claim(t.slot(all[k]), 1);
    JobTable::retire(t.slot(all[k]), finish[k]);
    rb.add(all[k], finish[k]);
  }
  // A snapshot cutting at epoch 4 holds everything finished in epoch >= 5.
  t.set_reclaim_horizon(5);
  EXPECT_EQ(rb.flush(t), 3u);  // finished at 2, 4, 4
  EXPECT_EQ(rb.size(), 3u);
  EXPECT_EQ(sorted(take_all(t)), sorted({all[0], all[1], all[2]}));
  for (int k : {3, 4, 5}) EXPECT_EQ(t.slot(all[k]).state.load(), SlotState::kRetired);

  // Flushing again under the same horizon releases nothing.
  EXPECT_EQ(rb.flush(t), 0u);
  // A later cut at epoch 5 holds epoch >= 6 only.
  t.set_reclaim_horizon(6);
  EXPECT_EQ(rb.flush(t), 1u);
  // The snapshot ends.
  t.set_reclaim_horizon(kNoHorizon);
  EXPECT_EQ(rb.flush(t), 2u);
  EXPECT_EQ(rb.size(), 0u);
  EXPECT_EQ(take_all(t).size(), 3u);
}

TEST(RetireBufferTest, SlotsOfJobsInNoCutGoBackWhateverTheHorizon) {
  JobTable t(6);
  std::vector<SlotIndex> all = take_all(t);
  ASSERT_EQ(all.size(), 6u);
  RetireBuffer rb(6);
  // Jobs 0-2 were submitted and finished in epoch 5: no cut holds them (a cut
  // C holds a job iff submit <= C < finish). Jobs 3-5 were submitted in epoch
  // 4 and finished in 5: the cut at 4 holds them.
  for (int k = 0; k < 6; ++k) {
    Slot& s = t.slot(all[k]);
    JobTable::claim(s, k < 3 ? 5 : 4);
    JobTable::retire(s, 5);
    if (k < 3) {
      EXPECT_TRUE(JobTable::in_no_cut(s, 5));
      rb.add_unheld(all[k]);
    } else {
      EXPECT_FALSE(JobTable::in_no_cut(s, 5));
      rb.add(all[k], 5);
    }
  }
  EXPECT_EQ(rb.size(), 6u);
  // A snapshot cutting at epoch 4 holds everything finished in epoch >= 5,
  // except the jobs that were in no cut.
  t.set_reclaim_horizon(5);
  EXPECT_EQ(rb.flush(t), 3u);
  EXPECT_EQ(rb.size(), 3u);
  EXPECT_EQ(sorted(take_all(t)), sorted({all[0], all[1], all[2]}));
  for (int k : {0, 1, 2}) EXPECT_EQ(t.slot(all[k]).state.load(), SlotState::kFree);
  for (int k : {3, 4, 5}) EXPECT_EQ(t.slot(all[k]).state.load(), SlotState::kRetired);
  EXPECT_EQ(rb.flush(t), 0u);
  // The snapshot ends: the held ones go back too.
  t.set_reclaim_horizon(kNoHorizon);
  EXPECT_EQ(rb.flush(t), 3u);
  EXPECT_EQ(rb.size(), 0u);
  EXPECT_EQ(take_all(t).size(), 3u);
}

TEST(RetireBufferTest, ALongHeldHorizonReleasesPrefixesAndNeverLosesASlot) {
  // Many epochs under a moving horizon, as a worker sees across snapshots.
  JobTable t(5000);
  std::vector<SlotIndex> all = take_all(t);
  RetireBuffer rb(16);
  std::size_t released = 0;
  std::uint64_t epoch = 1;
  for (std::size_t k = 0; k < all.size(); ++k) {
    if (k % 7 == 0) ++epoch;
    JobTable::claim(t.slot(all[k]), epoch);
    JobTable::retire(t.slot(all[k]), epoch);
    rb.add(all[k], epoch);
    if (k % 100 == 99) {
      t.set_reclaim_horizon(epoch - 3);  // a cut a few epochs back
      released += rb.flush(t);
      EXPECT_EQ(released + rb.size(), k + 1);
    }
  }
  t.set_reclaim_horizon(kNoHorizon);
  released += rb.flush(t);
  EXPECT_EQ(released, all.size());
  std::vector<SlotIndex> back = take_all(t);
  std::set<SlotIndex> distinct(back.begin(), back.end());
  EXPECT_EQ(distinct.size(), all.size());
}

}  // namespace
}  // namespace jobengine::detail

namespace jobengine::detail {
namespace {

TEST(RetireBufferTest, SlotsHeldByTheHorizonAreParkedWithTheTableNotKeptByTheWorker) {
  JobTable t(100);
  std::vector<SlotIndex> all = take_all(t);
  RetireBuffer rb(8);
  t.set_reclaim_horizon(3);  // a snapshot cut at epoch 2
  for (std::size_t k = 0; k < 40; ++k) {
    const std::uint64_t epoch = k < 5 ? 2 : 3;  // 5 below the horizon, 35 held
    JobTable::claim(t.slot(all[k]), 1);
    JobTable::retire(t.slot(all[k]), epoch);
    rb.add(all[k], epoch);
  }
  EXPECT_EQ(rb.flush(t), 5u);
  EXPECT_EQ(rb.size(), 0u) << "the 35 held slots must leave the worker's buffer";
  EXPECT_EQ(take_all(t).size(), 5u);
  t.set_reclaim_horizon(kNoHorizon);
  EXPECT_EQ(t.release_parked(), 35u);
  EXPECT_EQ(take_all(t).size(), 35u);
  EXPECT_EQ(t.release_parked(), 0u);
}

TEST(RetireBufferTest, ASleepingWorkersFlushParksEvenOneHeldSlot) {
  // Nothing wakes a sleeping worker when the snapshot ends, so before it
  // sleeps it parks whatever the horizon holds, however little (park_from 1).
  JobTable t(100);
  std::vector<SlotIndex> all = take_all(t);
  RetireBuffer rb(8);
  t.set_reclaim_horizon(3);
  JobTable::claim(t.slot(all[0]), 1);
  JobTable::retire(t.slot(all[0]), 3);
  rb.add(all[0], 3);
  EXPECT_EQ(rb.flush(t), 0u);
  EXPECT_EQ(rb.size(), 1u) << "a busy worker keeps a few held slots for its next flush";
  EXPECT_EQ(rb.flush(t, /*park_from=*/1), 0u);
  EXPECT_EQ(rb.size(), 0u);
  t.set_reclaim_horizon(kNoHorizon);
  EXPECT_EQ(t.release_parked(), 1u);
  EXPECT_EQ(take_all(t).size(), 1u);
}

TEST(JobTableTest, NothingIsParkedOnceTheSnapshotEnded) {
  // A worker that read the horizon while a cut held it, then parks after
  // end_cut() released the parking: parked then, the slots waited for the
  // next cut's end (forever, with periodic snapshots off). Refused instead;
  // the worker keeps them, and its next flush frees them.
  JobTable t(100);
  std::vector<SlotIndex> all = take_all(t);
  t.set_reclaim_horizon(3);
  EXPECT_TRUE(t.park_retired(all.data(), 40));
  t.set_reclaim_horizon(kNoHorizon);  // end_cut(): lowers the horizon, then releases
  EXPECT_EQ(t.release_parked(), 40u);
  EXPECT_FALSE(t.park_retired(all.data() + 40, 40)) << "parked after the snapshot ended";
  EXPECT_EQ(t.release_parked(), 0u);
}

TEST(SlotPoolTest, OneSlotGivesNeverRunOutOfDescriptors) {
  // Each give() used to take a descriptor however few slots it carried: a
  // worker's one-slot flushes used them all up, put_free() returned 0 with
  // most slots out of the pool, and stop()'s put_all_free() spun for good.
  constexpr std::size_t kCap = 4096;
  JobTable t(kCap);
  std::vector<SlotIndex> all = take_all(t);
  ASSERT_EQ(all.size(), kCap);
  for (std::size_t i = 0; i < kCap; ++i) {
    ASSERT_EQ(t.put_free(&all[i], 1), 1u) << "put " << i << " of " << kCap << " one at a time";
  }
  std::vector<SlotIndex> back = take_all(t);
  EXPECT_EQ(back.size(), kCap);
  EXPECT_EQ(sorted(back), sorted(all));
  // And a mixed pattern: halves of magazines, then singles.
  for (std::size_t i = 0; i < kCap; i += 32) ASSERT_EQ(t.put_free(&back[i], 1), 1u);
  std::size_t put = 0;
  for (std::size_t i = 0; i < kCap; ++i) {
    if (i % 32 != 0) put += t.put_free(&back[i], 1);
  }
  EXPECT_EQ(put, kCap - kCap / 32);
  EXPECT_EQ(sorted(take_all(t)), sorted(all));
}

// The clock's conversions (engine/clock.h): ns -> ticks -> ns round-trips
// within the tick resolution plus 1e-9 relative, from 1 ns to a year.
TEST(ClockTest, NanosecondsToTicksAndBackRoundTrip) {
  Clock::init();
  for (std::int64_t ns : {std::int64_t{1}, std::int64_t{999}, std::int64_t{1'000'000},
                          std::int64_t{3'600'000'000'000}, std::int64_t{31'536'000'000'000'000}}) {
    const std::uint64_t ticks = Clock::ticks_in_ns(ns);
    const double back = static_cast<double>(Clock::ns_in_ticks(ticks));
    // One tick: ~0.4 ns with an x86 TSC, 16 ns with a 62.5 MHz ARM counter.
    const double tick = static_cast<double>(Clock::ns_in_ticks(1000000)) / 1e6;
    EXPECT_NEAR(back, static_cast<double>(ns), tick + 2.0 + 1e-9 * static_cast<double>(ns))
        << ns << " ns";
  }
  EXPECT_EQ(Clock::ticks_in_ns(0), 0u);
  EXPECT_EQ(Clock::ticks_in_ns(-5), 0u);
}

}  // namespace
}  // namespace jobengine::detail
