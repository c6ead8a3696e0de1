// Device-side rules, each driven through a real DriverQueue on shared local memory.
#include <array>
#include <atomic>

#include "testing/virtq_ring.h"

namespace vhostkit::virtq {
namespace {

using testing::kEventIdx;
using testing::kIndirect;
using testing::Rig;
using Buf = DriverQueue::Buffer;

TEST(DeviceQueue, PopsReadableThenWritablePiecesWithTotals) {
  Rig rig(8);
  const Buf out[] = {{Rig::kDataGpa, 100}, {Rig::kDataGpa + 200, 50}};
  const Buf in[] = {{Rig::kDataGpa + 1000, 300}};
  const auto head = rig.add_publish(out, in);
  ASSERT_EQ(rig.device.pending(), 1);
  std::array<iovec, 8> segs{};
  auto c = rig.device.pop(segs);
  ASSERT_TRUE(c.has_value());
  EXPECT_EQ(c->head, head);
  EXPECT_EQ(c->desc_count, 3);
  ASSERT_EQ(c->readable.size(), 2u);
  ASSERT_EQ(c->writable.size(), 1u);
  EXPECT_EQ(c->readable[0].iov_base, rig.host(Rig::kDataGpa));
  EXPECT_EQ(c->readable[0].iov_len, 100u);
  EXPECT_EQ(c->readable[1].iov_base, rig.host(Rig::kDataGpa + 200));
  EXPECT_EQ(c->writable[0].iov_base, rig.host(Rig::kDataGpa + 1000));
  EXPECT_EQ(c->readable_len, 150u);
  EXPECT_EQ(c->writable_len, 300u);
  EXPECT_EQ(rig.device.pending(), 0);
}

TEST(DeviceQueue, BufferAcrossTwoRegionsIsTwoPieces) {
  Rig rig(8);
  const Buf out[] = {{Rig::kGpaB - 10, 30}};
  rig.add_publish(out, {});
  std::array<iovec, 4> segs{};
  auto c = rig.device.pop(segs);
  ASSERT_TRUE(c.has_value());
  ASSERT_EQ(c->readable.size(), 2u);
  EXPECT_EQ(c->readable[0].iov_base, rig.host(Rig::kGpaB - 10));
  EXPECT_EQ(c->readable[0].iov_len, 10u);
  EXPECT_EQ(c->readable[1].iov_base, rig.host(Rig::kGpaB));
  EXPECT_EQ(c->readable[1].iov_len, 20u);
  EXPECT_EQ(c->readable_len, 30u);
}

TEST(DeviceQueue, ZeroLengthDescriptorIsSkipped) {
  Rig rig(8);
  const Buf out[] = {{Rig::kDataGpa, 0}, {Rig::kDataGpa + 64, 8}};
  const Buf in[] = {{0xdead0000000ull, 0}};  // unmapped, but empty: never translated
  rig.add_publish(out, in);
  std::array<iovec, 4> segs{};
  auto c = rig.device.pop(segs);
  ASSERT_TRUE(c.has_value());
  EXPECT_EQ(c->desc_count, 3);
  ASSERT_EQ(c->readable.size(), 1u);
  EXPECT_EQ(c->readable[0].iov_len, 8u);
  EXPECT_TRUE(c->writable.empty());
}

TEST(DeviceQueue, IndirectChainWhenNegotiated) {
  Rig rig(8, kIndirect);
  const Buf out[] = {{Rig::kDataGpa, 10}, {Rig::kDataGpa + 16, 20}};
  const Buf in[] = {{Rig::kDataGpa + 64, 40}};
  const auto head = rig.add_publish(out, in);
  EXPECT_EQ(rig.driver.free_count(), 7);  // one ring descriptor for three buffers
  EXPECT_NE(rig.driver.desc()[head].flags & virtio::kDescFIndirect, 0);
  std::array<iovec, 8> segs{};
  auto c = rig.device.pop(segs);
  ASSERT_TRUE(c.has_value());
  EXPECT_EQ(c->desc_count, 4);  // the indirect descriptor plus three in its table
  EXPECT_EQ(c->readable.size(), 2u);
  EXPECT_EQ(c->writable.size(), 1u);
  EXPECT_EQ(c->readable_len, 30u);
  EXPECT_EQ(c->writable_len, 40u);
}

TEST(DeviceQueue, TooFewSegmentsFailsThatChainOnly) {
  Rig rig(8);
  const Buf out[] = {{Rig::kDataGpa, 10}, {Rig::kDataGpa + 16, 20}};
  rig.add_publish(out, {});
  rig.add_publish(out, {});
  std::array<iovec, 1> small{};
  auto c = rig.device.pop(small);
  ASSERT_FALSE(c.has_value());
  EXPECT_EQ(c.error(), ChainError::too_many_segments);
  EXPECT_EQ(rig.errors(ChainError::too_many_segments), 1u);
  std::array<iovec, 2> enough{};
  EXPECT_TRUE(rig.device.pop(enough).has_value());
  EXPECT_FALSE(rig.device.broken());
}

TEST(DeviceQueue, PopWithNothingAvailableSaysEmpty) {
  Rig rig(8);
  std::array<iovec, 2> segs{};
  auto c = rig.device.pop(segs);
  ASSERT_FALSE(c.has_value());
  EXPECT_EQ(c.error(), ChainError::empty);
  EXPECT_FALSE(rig.device.broken());
}

TEST(DeviceQueue, PendingUsesCachedIdxUntilConsumed) {
  Rig rig(8);
  const Buf out[] = {{Rig::kDataGpa, 10}};
  rig.add_publish(out, {});
  EXPECT_EQ(rig.device.pending(), 1);
  rig.add_publish(out, {});
  // Not re-read while the first is unconsumed: the shared line stays where it is.
  EXPECT_EQ(rig.device.pending(), 1);
  std::array<iovec, 2> segs{};
  ASSERT_TRUE(rig.device.pop(segs).has_value());
  EXPECT_EQ(rig.device.pending(), 1);
  ASSERT_TRUE(rig.device.pop(segs).has_value());
  EXPECT_EQ(rig.device.pending(), 0);
}

TEST(DeviceQueue, UsedInvisibleUntilPublishThenOneIdxStore) {
  Rig rig(8);
  const Buf in[] = {{Rig::kDataGpa, 64}};
  const auto h1 = rig.add_publish({}, in, 11);
  const auto h2 = rig.add_publish({}, in, 22);
  std::array<iovec, 2> segs{};
  ASSERT_TRUE(rig.device.pop(segs).has_value());
  ASSERT_TRUE(rig.device.pop(segs).has_value());
  rig.device.push_used(h1, 5);
  rig.device.push_used(h2, 7);
  EXPECT_EQ(rig.driver.used()->idx, 0);
  EXPECT_FALSE(rig.driver.get_used().has_value());
  rig.device.publish_used();
  EXPECT_EQ(rig.driver.used()->idx, 2);
  EXPECT_EQ(rig.device.used_idx(), 2);
  std::array<DriverQueue::Used, 4> used{};
  ASSERT_EQ(rig.driver.get_used_burst(used), 2u);
  EXPECT_EQ(used[0].token, 11u);
  EXPECT_EQ(used[0].len, 5u);
  EXPECT_EQ(used[1].token, 22u);
  EXPECT_EQ(used[1].len, 7u);
}

TEST(DeviceQueue, AttachResumesAtLastAvailIdxAndReadsUsedIdx) {
  Rig rig(8);
  const Buf out[] = {{Rig::kDataGpa, 10}};
  rig.add_publish(out, {});
  const auto h2 = rig.add_publish(out, {});
  rig.driver.used()->idx = 1;  // as if the first chain had been served before
  rig.attach_device(1);
  EXPECT_EQ(rig.device.used_idx(), 1);
  EXPECT_EQ(rig.device.pending(), 1);
  std::array<iovec, 2> segs{};
  auto c = rig.device.pop(segs);
  ASSERT_TRUE(c.has_value());
  EXPECT_EQ(c->head, h2);
}

TEST(DeviceQueue, NeedsNotifyHonoursNoInterruptWithoutEventIdx) {
  Rig rig(8);
  const Buf in[] = {{Rig::kDataGpa, 64}};
  std::array<iovec, 2> segs{};
  EXPECT_FALSE(rig.device.needs_notify());  // nothing published
  rig.add_publish({}, in);
  rig.device.push_used(rig.device.pop(segs)->head, 1);
  rig.device.publish_used();
  EXPECT_TRUE(rig.device.needs_notify());
  EXPECT_FALSE(rig.device.needs_notify());  // nothing new since
  rig.driver.disable_interrupts();
  EXPECT_EQ(rig.driver.avail()->flags, virtio::kAvailFNoInterrupt);
  rig.add_publish({}, in);
  rig.device.push_used(rig.device.pop(segs)->head, 1);
  rig.device.publish_used();
  EXPECT_FALSE(rig.device.needs_notify());
}

TEST(DeviceQueue, NeedsNotifyWithEventIdxFollowsUsedEvent) {
  Rig rig(8, kEventIdx);
  const Buf in[] = {{Rig::kDataGpa, 64}};
  std::array<iovec, 2> segs{};
  // The driver wants a call once used->idx passes 2 (i.e. when the third element lands).
  *used_event_word(rig.driver.avail(), 8) = 2;
  for (int i = 0; i < 2; ++i) {
    rig.add_publish({}, in);
    rig.device.push_used(rig.device.pop(segs)->head, 1);
    rig.device.publish_used();
    EXPECT_FALSE(rig.device.needs_notify()) << i;
  }
  rig.add_publish({}, in);
  rig.device.push_used(rig.device.pop(segs)->head, 1);
  rig.device.publish_used();
  EXPECT_TRUE(rig.device.needs_notify());
  // The NO_INTERRUPT flag is ignored with EVENT_IDX: used_event rules.
  rig.driver.avail()->flags = virtio::kAvailFNoInterrupt;
  *used_event_word(rig.driver.avail(), 8) = 3;
  rig.add_publish({}, in);
  rig.device.push_used(rig.device.pop(segs)->head, 1);
  rig.device.publish_used();
  EXPECT_TRUE(rig.device.needs_notify());
}

TEST(DeviceQueue, NeedsNotifyWithEventIdxBatchCrossingEventSignalsOnce) {
  Rig rig(8, kEventIdx);
  const Buf in[] = {{Rig::kDataGpa, 64}};
  std::array<iovec, 2> segs{};
  *used_event_word(rig.driver.avail(), 8) = 1;
  for (int i = 0; i < 4; ++i) rig.add_publish({}, in);
  for (int i = 0; i < 4; ++i) rig.device.push_used(rig.device.pop(segs)->head, 1);
  rig.device.publish_used();
  EXPECT_TRUE(rig.device.needs_notify());
  EXPECT_FALSE(rig.device.needs_notify());
}

TEST(DeviceQueue, DisableNotificationsStopsKicksWithoutEventIdx) {
  Rig rig(8);
  const Buf out[] = {{Rig::kDataGpa, 10}};
  rig.add_publish(out, {});
  EXPECT_TRUE(rig.driver.needs_kick());
  rig.device.disable_notifications();
  rig.add_publish(out, {});
  EXPECT_FALSE(rig.driver.needs_kick());
  EXPECT_TRUE(rig.device.enable_notifications());  // two chains wait: poll again
  rig.add_publish(out, {});
  EXPECT_TRUE(rig.driver.needs_kick());
}

TEST(DeviceQueue, EnableNotificationsReportsNothingPendingOnEmptyRing) {
  for (std::uint64_t f : {std::uint64_t{0}, kEventIdx}) {
    Rig rig(8, f);
    rig.device.disable_notifications();
    EXPECT_FALSE(rig.device.enable_notifications()) << f;
  }
}

TEST(DeviceQueue, EventIdxKickOnlyWhenAvailEventPassed) {
  Rig rig(8, kEventIdx);
  const Buf out[] = {{Rig::kDataGpa, 10}};
  std::array<iovec, 2> segs{};
  // avail_event starts at 0: the first publish passes it.
  rig.add_publish(out, {});
  EXPECT_TRUE(rig.driver.needs_kick());
  // The device is busy polling and did not move avail_event: no more kicks.
  rig.add_publish(out, {});
  EXPECT_FALSE(rig.driver.needs_kick());
  ASSERT_TRUE(rig.device.pop(segs).has_value());
  ASSERT_TRUE(rig.device.pop(segs).has_value());
  // Before sleeping the device enables notifications: avail_event = 2, nothing pending.
  EXPECT_FALSE(rig.device.enable_notifications());
  EXPECT_EQ(*avail_event_word(rig.driver.used(), 8), 2);
  rig.add_publish(out, {});
  EXPECT_TRUE(rig.driver.needs_kick());
}

TEST(DeviceQueue, EnableNotificationsRaceReturnsTrueWhenDriverPublishedMeanwhile) {
  // The driver publishes after the device's last pending() check but before avail_event moves:
  // its needs_kick() sees the old avail_event and stays quiet, so enable_notifications must
  // report the chain.
  Rig rig(8, kEventIdx);
  const Buf out[] = {{Rig::kDataGpa, 10}};
  std::array<iovec, 2> segs{};
  rig.add_publish(out, {});
  EXPECT_TRUE(rig.driver.needs_kick());
  ASSERT_TRUE(rig.device.pop(segs).has_value());
  EXPECT_EQ(rig.device.pending(), 0);
  rig.add_publish(out, {});
  EXPECT_FALSE(rig.driver.needs_kick());  // avail_event still 0
  EXPECT_TRUE(rig.device.enable_notifications());
  EXPECT_EQ(rig.device.pending(), 1);
}

TEST(DeviceQueue, ChainsSeenButLeftOnTheRingDoNotReportWork) {
  // An rx ring: the driver posted buffers, the device looked (pending) but has no frame to put
  // in them. Re-enabling must not report them again, or the worker would spin; a buffer posted
  // later still must.
  for (std::uint64_t f : {std::uint64_t{0}, kEventIdx}) {
    Rig rig(8, f);
    const Buf in[] = {{Rig::kDataGpa, 64}};
    rig.add_publish({}, in);
    rig.add_publish({}, in);
    EXPECT_EQ(rig.device.pending(), 2) << f;
    rig.device.disable_notifications();
    EXPECT_FALSE(rig.device.enable_notifications()) << f;
    rig.add_publish({}, in);
    EXPECT_TRUE(rig.driver.needs_kick()) << f;
    rig.device.disable_notifications();
    EXPECT_TRUE(rig.device.enable_notifications()) << f;
    EXPECT_EQ(rig.device.pending(), 3) << f;
  }
}

// Live migration: the notification words the device writes in the used ring (avail_event with
// EVENT_IDX, flags without) are marked in the dirty log when written, not only when used
// elements are next published: a ring that goes quiet publishes nothing more, and a stale word
// on the destination would suppress the driver's kicks there.
TEST(DeviceQueue, NotificationWordsAreMarkedInTheDirtyLog) {
  for (std::uint64_t f : {std::uint64_t{0}, kEventIdx}) {
    SCOPED_TRACE(f != 0 ? "EVENT_IDX" : "NO_NOTIFY flag");
    Rig rig(256, f);
    std::array<std::uint8_t, 64> bits{};  // 512 pages: the rig's whole address space
    memory::DirtyLog log;
    ASSERT_TRUE(log.attach_local(bits));
    rig.mem.set_dirty_log(&log);
    const std::uint64_t word_gpa =
        f != 0 ? rig.driver.used_gpa() + 4 + 8 * 256 : rig.driver.used_gpa();
    rig.device.disable_notifications();
    EXPECT_EQ(log.is_dirty(word_gpa), f == 0) << "disable writes the flag only without EVENT_IDX";
    bits.fill(0);
    EXPECT_FALSE(rig.device.enable_notifications());
    EXPECT_TRUE(log.is_dirty(word_gpa));
    rig.mem.set_dirty_log(nullptr);
  }
}

TEST(DeviceQueue, ErrorNamesAreDistinct) {
  for (std::size_t i = 0; i < kChainErrorCount; ++i) {
    for (std::size_t j = i + 1; j < kChainErrorCount; ++j) {
      EXPECT_STRNE(to_string(static_cast<ChainError>(i)), to_string(static_cast<ChainError>(j)));
    }
  }
  EXPECT_TRUE(breaks_queue(ChainError::head_out_of_range));
  EXPECT_FALSE(breaks_queue(ChainError::next_out_of_range));
}

}  // namespace
}  // namespace vhostkit::virtq

// take(): a restarted back-end walks a chain it knows the head of, out of the avail ring's order,
// and neither the avail ring nor last_avail_idx moves.
namespace vhostkit::virtq {
namespace {

using testing::Rig;
using Buf = DriverQueue::Buffer;

TEST(DeviceQueueTake, WalksTheChainAtAHeadWithoutMovingTheAvailRing) {
  Rig rig(8);
  const Buf out[] = {{Rig::kDataGpa, 16}};
  const Buf in[] = {{Rig::kDataGpa + 512, 64}, {Rig::kDataGpa + 1024, 1}};
  const auto first = rig.add_publish(out, {});
  const auto second = rig.add_publish(out, in);
  // The previous back-end took both; the device resumes past them (last_avail_idx 2).
  rig.attach_device(2);
  std::array<iovec, 8> segs{};
  auto c = rig.device.take(second, segs);
  ASSERT_TRUE(c.has_value());
  EXPECT_EQ(c->head, second);
  EXPECT_EQ(c->readable_len, 16u);
  EXPECT_EQ(c->writable_len, 65u);
  ASSERT_EQ(c->writable.size(), 2u);
  EXPECT_EQ(c->writable[1].iov_base, rig.host(Rig::kDataGpa + 1024));
  c = rig.device.take(first, segs);
  ASSERT_TRUE(c.has_value());
  EXPECT_EQ(c->head, first);
  EXPECT_EQ(rig.device.last_avail_idx(), 2);
  EXPECT_EQ(rig.device.pending(), 0);
  // Answered like popped chains, and the driver gets both back.
  rig.device.push_used(second, 65);
  rig.device.push_used(first, 0);
  rig.device.publish_used();
  std::array<DriverQueue::Used, 4> used{};
  ASSERT_EQ(rig.driver.get_used_burst(used), 2u);
  EXPECT_EQ(used[0].head, second);
  EXPECT_EQ(used[1].head, first);
  // A new chain is popped from where the avail ring stands.
  const auto third = rig.add_publish(out, {});
  ASSERT_EQ(rig.device.pending(), 1);
  c = rig.device.pop(segs);
  ASSERT_TRUE(c.has_value());
  EXPECT_EQ(c->head, third);
}

}  // namespace
}  // namespace vhostkit::virtq
