// Driver-side rules: layout, free list, indirect tables, kick decisions, reclaim.
#include <array>
#include <vector>

#include "testing/virtq_ring.h"

namespace vhostkit::virtq {
namespace {

using testing::kEventIdx;
using testing::kIndirect;
using testing::Rig;
using Buf = DriverQueue::Buffer;

TEST(DriverRingLayout, PartsAlignedAndDisjoint) {
  for (std::uint32_t size = 1; size <= virtio::kMaxQueueSize; size *= 2) {
    const auto l = DriverRingLayout::for_size(static_cast<std::uint16_t>(size));
    EXPECT_EQ(l.desc_offset, 0u);
    EXPECT_EQ(l.avail_offset % virtio::kAvailAlign, 0u);
    EXPECT_EQ(l.used_offset % virtio::kUsedAlign, 0u);
    EXPECT_GE(l.avail_offset, virtio::desc_table_bytes(size));
    EXPECT_GE(l.used_offset, l.avail_offset + virtio::avail_ring_bytes(size));
    EXPECT_GE(l.total_bytes, l.used_offset + virtio::used_ring_bytes(size));
  }
}

TEST(DriverQueue, InitRejectsBadSizeAndShortMemory) {
  alignas(64) static std::byte buf[8192];
  DriverQueue q;
  EXPECT_FALSE(q.init(buf, 0x1000, 3, 0).has_value());
  EXPECT_FALSE(q.init(buf, 0x1000, 0, 0).has_value());
  EXPECT_FALSE(q.init(std::span<std::byte>(buf, 64), 0x1000, 8, 0).has_value());
  EXPECT_FALSE(q.init(buf, 0x1001, 8, 0).has_value());
  // Indirect negotiated but no room for the tables.
  EXPECT_FALSE(
      q.init(buf, 0x1000, 8, kIndirect, std::span<std::byte>(buf, 16), 0x9000, 4).has_value());
  EXPECT_TRUE(q.init(buf, 0x1000, 8, 0).has_value());
  EXPECT_EQ(q.free_count(), 8);
  EXPECT_EQ(q.desc_gpa(), 0x1000u);
}

TEST(DriverQueue, RunsOutOfDescriptorsWithWouldBlock) {
  Rig rig(4);
  const Buf out[] = {{Rig::kDataGpa, 1}, {Rig::kDataGpa + 8, 1}, {Rig::kDataGpa + 16, 1}};
  ASSERT_TRUE(rig.driver.add(out, {}, 1).has_value());
  EXPECT_EQ(rig.driver.free_count(), 1);
  auto r = rig.driver.add(out, {}, 2);
  ASSERT_FALSE(r.has_value());
  EXPECT_EQ(r.error(), Errc::would_block);
  EXPECT_EQ(rig.driver.free_count(), 1);  // nothing leaked by the failed add
}

// add() skips the store when the descriptor already says the same (a buffer that keeps its
// descriptor); one the device scribbled on while it was free is written again.
TEST(DriverQueue, ReusedDescriptorIsRightEvenIfTheDeviceScribbledOnIt) {
  Rig rig(4);
  const Buf b{Rig::kDataGpa, 128};
  auto h = rig.driver.add({}, std::span(&b, 1), 7);
  ASSERT_TRUE(h.has_value());
  virtio::VirtqDesc& d = rig.driver.desc()[*h];
  EXPECT_EQ(d.addr, b.gpa);
  EXPECT_EQ(d.len, b.len);
  EXPECT_EQ(d.flags, virtio::kDescFWrite);
  // The device returns it; the descriptor goes back to the free list.
  rig.driver.used()->ring[0] = virtio::VirtqUsedElem{*h, 0};
  rig.driver.used()->idx = 1;
  ASSERT_TRUE(rig.driver.get_used().has_value());
  // Same buffer again on the same (most recently freed) descriptor: unchanged.
  auto h2 = rig.driver.add({}, std::span(&b, 1), 8);
  ASSERT_TRUE(h2.has_value());
  EXPECT_EQ(*h2, *h);
  EXPECT_EQ(d.addr, b.gpa);
  rig.driver.used()->ring[1] = virtio::VirtqUsedElem{*h, 0};
  rig.driver.used()->idx = 2;
  ASSERT_TRUE(rig.driver.get_used().has_value());
  // A device that rewrote the free descriptor: the next add puts the driver's values back.
  d = virtio::VirtqDesc{0xdead0000, 1, virtio::kDescFNext, 3};
  const Buf out{Rig::kDataGpa + 256, 60};
  auto h3 = rig.driver.add(std::span(&out, 1), {}, 9);
  ASSERT_TRUE(h3.has_value());
  EXPECT_EQ(*h3, *h);
  EXPECT_EQ(d.addr, out.gpa);
  EXPECT_EQ(d.len, out.len);
  EXPECT_EQ(d.flags, 0);
  EXPECT_EQ(d.next, 0);
}

TEST(DriverQueue, ChainLongerThanRingWithoutIndirectIsInvalid) {
  Rig rig(2);
  const Buf out[] = {{Rig::kDataGpa, 1}, {Rig::kDataGpa + 8, 1}, {Rig::kDataGpa + 16, 1}};
  auto r = rig.driver.add(out, {}, 1);
  ASSERT_FALSE(r.has_value());
  EXPECT_EQ(r.error(), Errc::invalid_argument);
  EXPECT_FALSE(rig.driver.add({}, {}, 1).has_value());
}

TEST(DriverQueue, DirectChainLinksDescriptorsInOrder) {
  Rig rig(8);
  const Buf out[] = {{Rig::kDataGpa, 10}};
  const Buf in[] = {{Rig::kDataGpa + 100, 20}, {Rig::kDataGpa + 200, 30}};
  const auto head = rig.driver.add(out, in, 5).value();
  const auto* d = rig.driver.desc();
  EXPECT_EQ(d[head].addr, Rig::kDataGpa);
  EXPECT_EQ(d[head].flags, virtio::kDescFNext);
  const auto second = d[head].next;
  EXPECT_EQ(d[second].flags, virtio::kDescFNext | virtio::kDescFWrite);
  const auto third = d[second].next;
  EXPECT_EQ(d[third].flags, virtio::kDescFWrite);
  EXPECT_EQ(d[third].len, 30u);
  EXPECT_EQ(rig.driver.avail()->idx, 0);  // not published yet
  rig.driver.publish();
  EXPECT_EQ(rig.driver.avail()->idx, 1);
  EXPECT_EQ(rig.driver.avail()->ring[0], head);
}

TEST(DriverQueue, SingleBufferChainIsDirectEvenWithIndirect) {
  Rig rig(8, kIndirect);
  const Buf out[] = {{Rig::kDataGpa, 10}};
  const auto head = rig.driver.add(out, {}, 5).value();
  EXPECT_EQ(rig.driver.desc()[head].flags, 0);
  EXPECT_EQ(rig.driver.desc()[head].addr, Rig::kDataGpa);
}

TEST(DriverQueue, ReclaimReturnsDescriptorsAndTokensInUsedOrder) {
  Rig rig(8);
  const Buf out[] = {{Rig::kDataGpa, 10}, {Rig::kDataGpa + 16, 10}};
  const Buf in[] = {{Rig::kDataGpa + 64, 100}};
  std::vector<std::uint16_t> heads;
  for (std::uint64_t t = 0; t < 2; ++t) heads.push_back(rig.driver.add(out, in, 100 + t).value());
  EXPECT_EQ(rig.driver.free_count(), 2);
  rig.driver.publish();
  // Device completes them in reverse.
  rig.device.push_used(heads[1], 9);
  rig.device.push_used(heads[0], 8);
  rig.device.publish_used();
  auto u1 = rig.driver.get_used();
  auto u2 = rig.driver.get_used();
  ASSERT_TRUE(u1 && u2);
  EXPECT_EQ(u1->token, 101u);
  EXPECT_EQ(u1->len, 9u);
  EXPECT_EQ(u1->head, heads[1]);
  EXPECT_EQ(u2->token, 100u);
  EXPECT_FALSE(rig.driver.get_used().has_value());
  EXPECT_EQ(rig.driver.free_count(), 8);
  EXPECT_EQ(rig.driver.bad_used(), 0u);
}

TEST(DriverQueue, NeedsKickHonoursNoNotify) {
  Rig rig(8);
  const Buf out[] = {{Rig::kDataGpa, 10}};
  EXPECT_FALSE(rig.driver.needs_kick());  // nothing new
  rig.add_publish(out, {});
  EXPECT_TRUE(rig.driver.needs_kick());
  rig.driver.used()->flags = virtio::kUsedFNoNotify;
  rig.add_publish(out, {});
  EXPECT_FALSE(rig.driver.needs_kick());
}

TEST(DriverQueue, NeedsKickWithEventIdxIgnoresNoNotifyFlag) {
  Rig rig(8, kEventIdx);
  const Buf out[] = {{Rig::kDataGpa, 10}};
  rig.driver.used()->flags = virtio::kUsedFNoNotify;
  *avail_event_word(rig.driver.used(), 8) = 1;  // kick when idx passes 1
  rig.add_publish(out, {});
  EXPECT_FALSE(rig.driver.needs_kick());
  rig.add_publish(out, {});
  EXPECT_TRUE(rig.driver.needs_kick());
  rig.add_publish(out, {});
  EXPECT_FALSE(rig.driver.needs_kick());
}

TEST(DriverQueue, EnableInterruptsWritesUsedEventAndReportsArrivals) {
  Rig rig(8, kEventIdx);
  const Buf in[] = {{Rig::kDataGpa, 10}};
  std::array<iovec, 2> segs{};
  rig.driver.disable_interrupts();
  rig.add_publish({}, in);
  rig.device.push_used(rig.device.pop(segs)->head, 1);
  rig.device.publish_used();
  // Arrived while interrupts were off: the caller must reclaim before sleeping.
  EXPECT_TRUE(rig.driver.enable_interrupts());
  ASSERT_TRUE(rig.driver.get_used().has_value());
  EXPECT_FALSE(rig.driver.enable_interrupts());
  EXPECT_EQ(*used_event_word(rig.driver.avail(), 8), 1);
}

TEST(DriverQueue, EnableInterruptsClearsNoInterruptFlag) {
  Rig rig(8);
  rig.driver.disable_interrupts();
  EXPECT_EQ(rig.driver.avail()->flags, virtio::kAvailFNoInterrupt);
  EXPECT_FALSE(rig.driver.enable_interrupts());
  EXPECT_EQ(rig.driver.avail()->flags, 0);
}

}  // namespace
}  // namespace vhostkit::virtq
