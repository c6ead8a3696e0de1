// The packed ring from both sides (PackedDeviceQueue, PackedDriverQueue) on one in-memory ring,
// the vhost-user resume point encoding, and IN_ORDER batching on both layouts.
#include <gtest/gtest.h>

#include <array>
#include <cstring>
#include <vector>

#include "testing/virtq_ring.h"

namespace vhostkit::virtq {
namespace {

using testing::kEventIdx;
using testing::kIndirect;
using testing::kInOrder;
using testing::PackedRig;
using testing::Rig;
using Buf = DriverQueue::Buffer;

constexpr std::uint16_t kSize = 8;

bool is_used_slot(const virtio::PackedDesc& d, bool wrap) {
  return detail::desc_is_used(d.flags, wrap);
}

TEST(PackedRingBase, EncodesAsVhostUserSays) {
  // Bits 0-14 avail index, 15 avail wrap, 16-30 used index, 31 used wrap.
  const PackedRingBase b{5, true, 3, false};
  EXPECT_EQ(b.encode(), 0x00038005u);
  EXPECT_EQ(PackedRingBase::decode(0x00038005u), b);
  const PackedRingBase fresh{};
  EXPECT_EQ(fresh.encode(), 0x80008000u);  // both counters start at 1
  EXPECT_EQ(PackedRingBase::decode(0xffffffffu), (PackedRingBase{0x7fff, true, 0x7fff, true}));
  // A front-end that sends the avail half only stopped the ring with every chain answered.
  EXPECT_EQ(PackedRingBase::decode(0x8007u).use_avail_for_used(),
            (PackedRingBase{7, true, 7, true}));
}

TEST(PackedQueue, ChainWithReadableAndWritablePartsRoundTrips) {
  PackedRig rig(kSize);
  std::memcpy(rig.host(Rig::kDataGpa), "hello", 5);
  const Buf out[] = {{Rig::kDataGpa, 5}};
  const Buf in[] = {{Rig::kDataGpa + 64, 32}, {Rig::kDataGpa + 128, 32}};
  const auto id = rig.driver.add(out, in, 77).value();
  EXPECT_EQ(rig.device.pending(), 0) << "nothing is available before publish()";
  rig.driver.publish();
  EXPECT_EQ(rig.device.pending(), 3);  // three available descriptors, one chain
  std::array<iovec, 4> segs{};
  auto c = rig.device.pop(segs);
  ASSERT_TRUE(c.has_value()) << to_string(c.error());
  EXPECT_EQ(c->head, id);
  EXPECT_EQ(c->desc_count, 3);
  ASSERT_EQ(c->readable.size(), 1u);
  EXPECT_EQ(std::memcmp(c->readable[0].iov_base, "hello", 5), 0);
  EXPECT_EQ(c->writable_len, 64u);
  EXPECT_EQ(rig.device.pending(), 0);
  std::memset(c->writable[0].iov_base, 0xab, 10);
  rig.device.push_used(c->head, 10);
  EXPECT_FALSE(rig.driver.get_used().has_value()) << "nothing is used before publish_used()";
  rig.device.publish_used();
  auto u = rig.driver.get_used();
  ASSERT_TRUE(u.has_value());
  EXPECT_EQ(u->token, 77u);
  EXPECT_EQ(u->len, 10u);
  EXPECT_EQ(rig.driver.free_count(), kSize);
  EXPECT_EQ(rig.device.base(), (PackedRingBase{3, true, 3, true}));
}

TEST(PackedQueue, UsedBatchHoldsTheFirstFlagsBackUntilPublish) {
  PackedRig rig(kSize);
  std::array<iovec, 2> segs{};
  for (int i = 0; i < 3; ++i) {
    const Buf out[] = {{Rig::kDataGpa + 64u * i, 8}};
    rig.add_publish(out, {}, i);
  }
  for (int i = 0; i < 3; ++i) rig.device.push_used(rig.device.pop(segs).value().head, 0);
  // The middle used descriptor is written; the first is held back (and the last is still open:
  // IN_ORDER could fold the next push into it), so the driver sees none of them.
  const virtio::PackedDesc* d = rig.driver.desc();
  EXPECT_FALSE(is_used_slot(d[0], true));
  EXPECT_TRUE(is_used_slot(d[1], true));
  EXPECT_FALSE(is_used_slot(d[2], true));
  EXPECT_FALSE(rig.driver.get_used().has_value());
  rig.device.publish_used();
  EXPECT_TRUE(is_used_slot(d[0], true));
  EXPECT_TRUE(is_used_slot(d[2], true));
  std::array<DriverQueue::Used, 4> used{};
  ASSERT_EQ(rig.driver.get_used_burst(used), 3u);
  for (std::uint64_t i = 0; i < 3; ++i) EXPECT_EQ(used[i].token, i);
}

TEST(PackedQueue, OutOfOrderCompletionSkipsByEachChainsLength) {
  PackedRig rig(kSize);
  std::array<iovec, 4> segs{};
  // Laps of: a two-descriptor chain A, a one-descriptor chain B, completed B first. Eight
  // descriptors a ring: each lap moves the cursors by three, so they wrap at odd places.
  for (int lap = 0; lap < 20; ++lap) {
    const Buf a[] = {{Rig::kDataGpa, 8}, {Rig::kDataGpa + 8, 8}};
    const Buf b[] = {{Rig::kDataGpa + 64, 8}};
    rig.driver.add(a, {}, 1).value();
    rig.driver.add(b, {}, 2).value();
    rig.driver.publish();
    const auto ca = rig.device.pop(segs).value().head;
    const auto cb = rig.device.pop(segs).value().head;
    rig.device.push_used(cb, 0);
    rig.device.push_used(ca, 0);
    rig.device.publish_used();
    std::array<DriverQueue::Used, 4> used{};
    ASSERT_EQ(rig.driver.get_used_burst(used), 2u) << "lap " << lap;
    EXPECT_EQ(used[0].token, 2u);
    EXPECT_EQ(used[1].token, 1u);
    EXPECT_EQ(rig.driver.free_count(), kSize);
  }
  EXPECT_EQ(rig.driver.bad_used(), 0u);
}

TEST(PackedQueue, ResumesFromItsBase) {
  PackedRig rig(kSize);
  std::array<iovec, 2> segs{};
  for (int i = 0; i < 11; ++i) {  // past one wrap
    const Buf out[] = {{Rig::kDataGpa, 8}};
    rig.add_publish(out, {}, i);
    rig.device.push_used(rig.device.pop(segs).value().head, 0);
    rig.device.publish_used();
    ASSERT_TRUE(rig.driver.get_used().has_value());
  }
  const PackedRingBase base = rig.device.base();
  EXPECT_EQ(base, (PackedRingBase{3, false, 3, false}));
  // GET_VRING_BASE, then SET_VRING_BASE through the 32-bit num, on a fresh device.
  PackedDeviceQueue dev;
  dev.attach(
      &rig.mem,
      PackedRing{rig.driver.desc(), rig.driver.driver_event(), rig.driver.device_event(), kSize}, 0,
      PackedRingBase::decode(base.encode()));
  const Buf out[] = {{Rig::kDataGpa, 8}};
  const auto id = rig.add_publish(out, {}, 99);
  auto c = dev.pop(segs);
  ASSERT_TRUE(c.has_value()) << to_string(c.error());
  EXPECT_EQ(c->head, id);
  dev.push_used(id, 0);
  dev.publish_used();
  EXPECT_EQ(rig.driver.get_used()->token, 99u);
}

TEST(PackedQueue, KickSuppression) {
  PackedRig rig(kSize, kEventIdx);
  const Buf out[] = {{Rig::kDataGpa, 8}};
  rig.add_publish(out, {});
  EXPECT_TRUE(rig.driver.needs_kick()) << "events start enabled";
  rig.device.disable_notifications();
  rig.add_publish(out, {});
  EXPECT_FALSE(rig.driver.needs_kick());
  EXPECT_EQ(rig.device.pending(), 2);
  // The device asks for a kick past what it has seen (two descriptors): nothing new yet.
  EXPECT_FALSE(rig.device.enable_notifications());
  EXPECT_EQ(rig.driver.device_event()->flags, virtio::kRingEventFlagsDesc);
  EXPECT_EQ(rig.driver.device_event()->off_wrap, 2 | virtio::kEventWrapBit);
  EXPECT_FALSE(rig.driver.needs_kick()) << "no new descriptor since the last decision";
  rig.add_publish(out, {});
  EXPECT_TRUE(rig.driver.needs_kick());
  rig.add_publish(out, {});
  EXPECT_FALSE(rig.driver.needs_kick()) << "the named descriptor was passed already";
}

TEST(PackedQueue, EnableNotificationsReportsOnlyNewChains) {
  PackedRig rig(kSize);
  const Buf in[] = {{Rig::kDataGpa, 64}};
  rig.add_publish({}, in);
  EXPECT_NE(rig.device.pending(), 0);  // seen, and left on the ring (an rx ring without frames)
  EXPECT_FALSE(rig.device.enable_notifications());
  rig.add_publish({}, in);
  EXPECT_TRUE(rig.device.enable_notifications());
  // Reported once: the chains stay on the ring, and the next look finds nothing new.
  EXPECT_FALSE(rig.device.enable_notifications());
}

// A handler that never asks pending() (the loopback's rx ring, filled from the tx side): the
// chains made available count as seen once enable_notifications() has reported them, or the
// worker's "re-enable, re-check" loop would spin on them forever.
TEST(PackedQueue, EnableNotificationsWithoutPendingReportsEachChainOnce) {
  PackedRig rig(kSize);
  const Buf in[] = {{Rig::kDataGpa, 64}};
  rig.add_publish({}, in);
  rig.add_publish({}, in);
  EXPECT_TRUE(rig.device.enable_notifications());
  EXPECT_FALSE(rig.device.enable_notifications());
  rig.add_publish({}, in);
  EXPECT_TRUE(rig.device.enable_notifications());
  EXPECT_FALSE(rig.device.enable_notifications());
  // Still there to pop, in order.
  std::array<iovec, 4> segs{};
  for (int i = 0; i < 3; ++i) EXPECT_TRUE(rig.device.pop(segs).has_value()) << i;
  EXPECT_FALSE(rig.device.pop(segs).has_value());
}

TEST(PackedQueue, CallSuppression) {
  PackedRig rig(kSize, kEventIdx);
  std::array<iovec, 2> segs{};
  const Buf out[] = {{Rig::kDataGpa, 8}};
  auto serve_one = [&] {
    rig.add_publish(out, {});
    rig.device.push_used(rig.device.pop(segs).value().head, 0);
    rig.device.publish_used();
    return rig.device.needs_notify();
  };
  EXPECT_TRUE(serve_one()) << "the driver named the first used descriptor";
  EXPECT_FALSE(serve_one()) << "the driver has not read the first yet";
  ASSERT_EQ(rig.driver.get_used().has_value(), true);
  ASSERT_EQ(rig.driver.get_used().has_value(), true);
  EXPECT_TRUE(serve_one()) << "reading moved the driver's event on";
  rig.driver.disable_interrupts();
  ASSERT_EQ(rig.driver.get_used().has_value(), true);
  EXPECT_FALSE(serve_one());
  EXPECT_TRUE(rig.driver.enable_interrupts()) << "a used descriptor waits";
}

// ---- IN_ORDER: one used element or descriptor for a run of chains written completely.

TEST(InOrder, PackedRunOfTxChainsTakesOneUsedDescriptor) {
  PackedRig rig(kSize, kInOrder);
  std::array<iovec, 2> segs{};
  for (int i = 0; i < 3; ++i) {
    const Buf out[] = {{Rig::kDataGpa + 64u * i, 8}};
    rig.add_publish(out, {}, i);
  }
  std::uint16_t last = 0;
  for (int i = 0; i < 3; ++i) {
    last = rig.device.pop(segs).value().head;
    rig.device.push_used(last, 0);
  }
  rig.device.publish_used();
  const virtio::PackedDesc* d = rig.driver.desc();
  EXPECT_TRUE(is_used_slot(d[0], true));
  EXPECT_EQ(d[0].id, last);
  EXPECT_FALSE(is_used_slot(d[1], true)) << "the run's other slots are skipped, not written";
  EXPECT_FALSE(is_used_slot(d[2], true));
  std::array<DriverQueue::Used, 4> used{};
  ASSERT_EQ(rig.driver.get_used_burst(used), 3u);
  for (std::uint64_t i = 0; i < 3; ++i) EXPECT_EQ(used[i].token, i);
  EXPECT_EQ(rig.driver.free_count(), kSize);
}

TEST(InOrder, PackedPartlyWrittenChainEndsTheRun) {
  PackedRig rig(kSize, kInOrder);
  std::array<iovec, 2> segs{};
  for (int i = 0; i < 3; ++i) {
    const Buf in[] = {{Rig::kDataGpa + 64u * i, 64}};
    rig.add_publish({}, in, i);
  }
  const std::uint32_t lens[] = {64, 20, 64};
  for (std::uint32_t len : lens) rig.device.push_used(rig.device.pop(segs).value().head, len);
  rig.device.publish_used();
  const virtio::PackedDesc* d = rig.driver.desc();
  EXPECT_TRUE(is_used_slot(d[0], true));   // chains 0 and 1 (0 complete)
  EXPECT_FALSE(is_used_slot(d[1], true));  // skipped
  EXPECT_TRUE(is_used_slot(d[2], true));   // chain 2: 1 was partial, so no fold
  std::array<DriverQueue::Used, 4> used{};
  ASSERT_EQ(rig.driver.get_used_burst(used), 3u);
  for (int i = 0; i < 3; ++i) EXPECT_EQ(used[i].len, lens[i]);
}

TEST(InOrder, SplitRunOfTxChainsTakesOneUsedElement) {
  Rig rig(kSize, kInOrder);
  std::array<iovec, 2> segs{};
  std::uint16_t heads[3];
  for (int i = 0; i < 3; ++i) {
    const Buf out[] = {{Rig::kDataGpa + 64u * i, 8}, {Rig::kDataGpa + 64u * i + 8, 8}};
    heads[i] = rig.add_publish(out, {}, i);
  }
  // Descriptors in ring order, next = x + 1 (2.7.5): heads 0, 2, 4.
  EXPECT_EQ(heads[0], 0);
  EXPECT_EQ(heads[1], 2);
  EXPECT_EQ(heads[2], 4);
  EXPECT_EQ(rig.driver.desc()[0].next, 1);
  for (int i = 0; i < 3; ++i) rig.device.push_used(rig.device.pop(segs).value().head, 0);
  rig.device.publish_used();
  EXPECT_EQ(rig.driver.used()->idx, 3);          // each chain counted
  EXPECT_EQ(rig.driver.used()->ring[0].id, 4u);  // one element, the last head
  std::array<DriverQueue::Used, 2> used{};
  // A burst smaller than the run: the rest comes with the next call.
  ASSERT_EQ(rig.driver.get_used_burst(used), 2u);
  EXPECT_EQ(used[0].token, 0u);
  EXPECT_EQ(used[1].token, 1u);
  ASSERT_EQ(rig.driver.get_used_burst(used), 1u);
  EXPECT_EQ(used[0].token, 2u);
  EXPECT_EQ(rig.driver.free_count(), kSize);
  // The next chain wraps past the end of the table: 6, 7, then 0.
  const Buf three[] = {{Rig::kDataGpa, 1}, {Rig::kDataGpa, 1}, {Rig::kDataGpa, 1}};
  rig.driver.add(three, {}, 0).value();
  EXPECT_EQ(rig.driver.desc()[6].next, 7);
  EXPECT_EQ(rig.driver.desc()[7].next, 0);
}

TEST(InOrder, SplitOutOfOrderPushesAreNotFolded) {
  Rig rig(kSize, kInOrder);
  std::array<iovec, 2> segs{};
  for (int i = 0; i < 2; ++i) {
    const Buf out[] = {{Rig::kDataGpa, 8}};
    rig.add_publish(out, {}, i);
  }
  const auto a = rig.device.pop(segs).value().head;
  const auto b = rig.device.pop(segs).value().head;
  rig.device.push_used(b, 0);
  rig.device.push_used(a, 0);  // popped before b: may not join b's element
  rig.device.publish_used();
  EXPECT_EQ(rig.driver.used()->ring[0].id, b);
  EXPECT_EQ(rig.driver.used()->ring[1].id, a);
}

// peek_pending, for prefetching, on both layouts: the next chains' first buffers, translated,
// without trusting the ring or changing what pop() sees; nothing for a buffer outside guest
// memory, an indirect table or an index past what pending() counted. prefetch_used is a hint.
template <class R>
class PeekPending : public ::testing::Test {};
using BothRigs = ::testing::Types<Rig, PackedRig>;
TYPED_TEST_SUITE(PeekPending, BothRigs);

TYPED_TEST(PeekPending, ShowsTheNextBuffersAndChangesNothing) {
  TypeParam rig(8, kIndirect);
  const Buf ok[] = {{TypeParam::kDataGpa, 128}};
  const Buf far[] = {{0x7000'0000'0000ull, 4096}};  // outside every region
  rig.add_publish({}, ok, 1);
  rig.add_publish({}, far, 2);
  const Buf two[] = {{TypeParam::kDataGpa + 4096, 64}, {TypeParam::kDataGpa + 8192, 64}};
  ASSERT_TRUE(rig.driver.add({}, two, 3).has_value());  // indirect: two buffers, one slot
  rig.driver.publish();
  const auto seen = rig.device.pending();
  ASSERT_GT(seen, 0);
  const auto first = rig.device.peek_pending(0);
  EXPECT_EQ(first.data(), rig.host(TypeParam::kDataGpa));
  EXPECT_EQ(first.size(), 128u);
  EXPECT_TRUE(rig.device.peek_pending(1).empty());  // outside guest memory
  EXPECT_TRUE(rig.device.peek_pending(2).empty());  // an indirect table
  for (std::uint16_t i = 3; i < 12; ++i) EXPECT_TRUE(rig.device.peek_pending(i).empty());
  rig.device.prefetch_used(0);
  rig.device.prefetch_used(1000);  // past the ring's size: clamped, and a hint only
  EXPECT_EQ(rig.device.pending(), seen);
  std::array<iovec, 4> segs{};
  auto a = rig.device.pop(segs);
  ASSERT_TRUE(a.has_value());
  EXPECT_EQ(a->writable[0].iov_base, rig.host(TypeParam::kDataGpa));
  auto b = rig.device.pop(segs);
  ASSERT_FALSE(b.has_value());
  EXPECT_EQ(b.error(), ChainError::desc_not_mapped);
  EXPECT_EQ(rig.device.error_total(), 1u);  // the sum of errors(), kept as they are counted
  auto c = rig.device.pop(segs);
  ASSERT_TRUE(c.has_value());
  EXPECT_EQ(c->writable_len, 128u);
  EXPECT_FALSE(rig.device.broken());
}

}  // namespace
}  // namespace vhostkit::virtq
