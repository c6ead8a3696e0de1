// Hostile peers: a driver that corrupts the ring (through DriverQueue::desc()/avail()) gets an
// error for that chain or a broken queue, never a crash or an access outside guest memory;
// a device that returns bogus used elements never corrupts the driver's free list.
#include <array>
#include <cstring>
#include <vector>

#include "testing/virtq_ring.h"

namespace vhostkit::virtq {
namespace {

using testing::kIndirect;
using testing::Rig;
using Buf = DriverQueue::Buffer;

constexpr std::uint16_t kSize = 8;

// Pops one chain expecting `want`; checks it was answered with used {head, 0}, counted, and
// that the queue still serves the next good chain.
void expect_bad_chain(Rig& rig, std::uint16_t head, ChainError want) {
  std::array<iovec, 16> segs{};
  auto c = rig.device.pop(segs);
  ASSERT_FALSE(c.has_value());
  EXPECT_EQ(c.error(), want) << to_string(c.error());
  EXPECT_EQ(rig.errors(want), 1u);
  EXPECT_FALSE(rig.device.broken());
  const std::uint16_t slot = rig.device.used_idx() - 1;
  rig.device.publish_used();
  EXPECT_EQ(rig.driver.used()->ring[slot & (kSize - 1)].id, head);
  EXPECT_EQ(rig.driver.used()->ring[slot & (kSize - 1)].len, 0u);
  auto u = rig.driver.get_used();
  ASSERT_TRUE(u.has_value());
  EXPECT_EQ(u->head, head);
  const Buf good[] = {{Rig::kDataGpa, 4}};
  rig.add_publish(good, {});
  EXPECT_TRUE(rig.device.pop(segs).has_value());
}

// Adds a chain of `n` readable buffers, returns its head; the caller corrupts, then publishes.
std::uint16_t add_chain(Rig& rig, std::size_t n) {
  std::vector<Buf> out;
  for (std::size_t i = 0; i < n; ++i) out.push_back({Rig::kDataGpa + 64 * i, 16});
  return rig.driver.add(out, {}, 0).value();
}

TEST(VirtqHostile, NextLoopEndsAsChainTooLong) {
  Rig rig(kSize);
  const auto head = add_chain(rig, 2);
  auto* d = rig.driver.desc();
  const auto second = d[head].next;
  d[second].flags |= virtio::kDescFNext;
  d[second].next = head;
  rig.driver.publish();
  expect_bad_chain(rig, head, ChainError::chain_too_long);
}

TEST(VirtqHostile, SelfLoopEndsAsChainTooLong) {
  Rig rig(kSize);
  const auto head = add_chain(rig, 1);
  rig.driver.desc()[head].flags |= virtio::kDescFNext;
  rig.driver.desc()[head].next = head;
  rig.driver.publish();
  expect_bad_chain(rig, head, ChainError::chain_too_long);
}

TEST(VirtqHostile, NextOutOfRange) {
  Rig rig(kSize);
  const auto head = add_chain(rig, 1);
  rig.driver.desc()[head].flags |= virtio::kDescFNext;
  rig.driver.desc()[head].next = kSize;
  rig.driver.publish();
  expect_bad_chain(rig, head, ChainError::next_out_of_range);
}

TEST(VirtqHostile, NextOutOfRangeInIndirectTable) {
  Rig rig(kSize, kIndirect);
  const auto head = add_chain(rig, 2);
  auto* table = reinterpret_cast<virtio::VirtqDesc*>(rig.host(rig.driver.desc()[head].addr));
  table[1].flags |= virtio::kDescFNext;
  table[1].next = 2;  // the table has two entries
  rig.driver.publish();
  expect_bad_chain(rig, head, ChainError::next_out_of_range);
}

TEST(VirtqHostile, LoopInsideIndirectTableEndsAsChainTooLong) {
  Rig rig(kSize, kIndirect);
  const auto head = add_chain(rig, 2);
  auto* table = reinterpret_cast<virtio::VirtqDesc*>(rig.host(rig.driver.desc()[head].addr));
  table[1].flags |= virtio::kDescFNext;
  table[1].next = 0;
  rig.driver.publish();
  expect_bad_chain(rig, head, ChainError::chain_too_long);
}

TEST(VirtqHostile, IndirectTableLongerThanQueueIsChainTooLong) {
  Rig rig(kSize, kIndirect);
  const auto head = add_chain(rig, kSize + 1);  // nine buffers in one table, queue of eight
  rig.driver.publish();
  expect_bad_chain(rig, head, ChainError::chain_too_long);
}

TEST(VirtqHostile, AddressNotMapped) {
  Rig rig(kSize);
  const auto head = add_chain(rig, 1);
  rig.driver.desc()[head].addr = Rig::kGpaB + Rig::kRegion + 100;  // the hole before C
  rig.driver.publish();
  expect_bad_chain(rig, head, ChainError::desc_not_mapped);
}

TEST(VirtqHostile, BufferRunningOffTheEndOfMemory) {
  Rig rig(kSize);
  const auto head = add_chain(rig, 1);
  rig.driver.desc()[head].addr = Rig::kGpaC + Rig::kRegion - 8;
  rig.driver.desc()[head].len = 16;
  rig.driver.publish();
  expect_bad_chain(rig, head, ChainError::desc_not_mapped);
}

TEST(VirtqHostile, AddrPlusLenWraps) {
  Rig rig(kSize);
  const auto head = add_chain(rig, 1);
  rig.driver.desc()[head].addr = ~std::uint64_t{0} - 4;
  rig.driver.desc()[head].len = 16;
  rig.driver.publish();
  expect_bad_chain(rig, head, ChainError::desc_len_wraps);
}

TEST(VirtqHostile, TotalLengthOver4GiB) {
  // 4097 mapped descriptors of 1 MiB each (the same bytes over and over): 4 GiB + 1 MiB.
  constexpr std::uint16_t kBig = 8192;
  Rig rig(kBig);
  auto* d = rig.driver.desc();
  constexpr std::uint16_t kCount = 4097;
  for (std::uint16_t i = 0; i < kCount; ++i) {
    d[i] = virtio::VirtqDesc{Rig::kGpaB, static_cast<std::uint32_t>(Rig::kRegion),
                             static_cast<std::uint16_t>(i + 1 < kCount ? virtio::kDescFNext : 0),
                             static_cast<std::uint16_t>(i + 1)};
  }
  rig.driver.avail()->ring[0] = 0;
  rig.driver.avail()->idx = 1;
  std::vector<iovec> segs(kBig);
  auto c = rig.device.pop(segs);
  ASSERT_FALSE(c.has_value());
  EXPECT_EQ(c.error(), ChainError::total_too_large);
  EXPECT_EQ(rig.errors(ChainError::total_too_large), 1u);
  EXPECT_FALSE(rig.device.broken());
}

TEST(VirtqHostile, IndirectTableNotMapped) {
  Rig rig(kSize, kIndirect);
  const auto head = add_chain(rig, 2);
  rig.driver.desc()[head].addr = Rig::kGpaB + Rig::kRegion;  // the hole
  rig.driver.publish();
  expect_bad_chain(rig, head, ChainError::indirect_not_mapped);
}

// An indirect table spanning two regions (adjacent in guest-physical memory) is walked from a
// copy: the chain comes out as it would from a table inside one region.
TEST(VirtqHostile, IndirectTableSpanningTwoRegionsIsWalkedFromACopy) {
  Rig rig(kSize, kIndirect);
  const auto head = add_chain(rig, 3);
  auto* d = rig.driver.desc();
  const std::uint64_t at = Rig::kGpaB - 24;  // half of the 48-byte table in A, half in B
  std::memcpy(rig.host(at), rig.host(d[head].addr), 48);
  std::memset(rig.host(d[head].addr), 0xff, 48);  // the old place no longer holds a table
  d[head].addr = at;
  rig.driver.publish();
  std::array<iovec, 16> segs{};
  auto c = rig.device.pop(segs);
  ASSERT_TRUE(c.has_value()) << to_string(c.error());
  EXPECT_EQ(c->desc_count, 4);
  ASSERT_EQ(c->readable.size(), 3u);
  for (std::size_t i = 0; i < 3; ++i) {
    EXPECT_EQ(c->readable[i].iov_base, rig.host(Rig::kDataGpa + 64 * i)) << i;
    EXPECT_EQ(c->readable[i].iov_len, 16u) << i;
  }
  EXPECT_EQ(rig.device.error_total(), 0u);
}

// Spanning into unmapped memory is still refused, and a spanning table may be no longer than
// the queue (its copy is queue-sized).
TEST(VirtqHostile, IndirectTableSpanningIntoTheHoleOrLongerThanTheQueue) {
  {
    Rig rig(kSize, kIndirect);
    const auto head = add_chain(rig, 2);
    const std::uint64_t at = Rig::kGpaB + Rig::kRegion - 16;  // the second entry in the hole
    std::memcpy(rig.host(at), rig.host(rig.driver.desc()[head].addr), 16);
    rig.driver.desc()[head].addr = at;
    rig.driver.publish();
    expect_bad_chain(rig, head, ChainError::indirect_not_mapped);
  }
  {
    Rig rig(kSize, kIndirect);
    const auto head = add_chain(rig, kSize + 1);
    const std::uint64_t at = Rig::kGpaB - 64;
    std::memcpy(rig.host(at), rig.host(rig.driver.desc()[head].addr), 16 * (kSize + 1));
    rig.driver.desc()[head].addr = at;
    rig.driver.publish();
    expect_bad_chain(rig, head, ChainError::chain_too_long);
  }
}

TEST(VirtqHostile, IndirectTableLengthZero) {
  Rig rig(kSize, kIndirect);
  const auto head = add_chain(rig, 2);
  rig.driver.desc()[head].len = 0;
  rig.driver.publish();
  expect_bad_chain(rig, head, ChainError::indirect_bad_len);
}

TEST(VirtqHostile, IndirectTableLengthNotMultipleOf16) {
  Rig rig(kSize, kIndirect);
  const auto head = add_chain(rig, 2);
  rig.driver.desc()[head].len = 24;
  rig.driver.publish();
  expect_bad_chain(rig, head, ChainError::indirect_bad_len);
}

TEST(VirtqHostile, IndirectInsideIndirect) {
  Rig rig(kSize, kIndirect);
  const auto head = add_chain(rig, 2);
  auto* table = reinterpret_cast<virtio::VirtqDesc*>(rig.host(rig.driver.desc()[head].addr));
  // The second entry points back at the table itself as another indirect table.
  table[1] = virtio::VirtqDesc{rig.driver.desc()[head].addr, 32, virtio::kDescFIndirect, 0};
  rig.driver.publish();
  expect_bad_chain(rig, head, ChainError::indirect_nested);
}

// Found by virtq_chain_fuzz: an indirect table at an odd guest address was read through a
// misaligned VirtqDesc pointer (undefined behaviour). Such a table is legal and must be served.
TEST(VirtqHostile, IndirectTableAtOddAddressIsServed) {
  Rig rig(kSize, kIndirect);
  const auto head = add_chain(rig, 2);
  virtio::VirtqDesc& ind = rig.driver.desc()[head];
  const std::uint64_t odd = Rig::kDataGpa + 0x8001;
  std::memmove(rig.host(odd), rig.host(ind.addr), ind.len);
  ind.addr = odd;
  rig.driver.publish();
  std::array<iovec, 4> segs{};
  auto c = rig.device.pop(segs);
  ASSERT_TRUE(c.has_value()) << to_string(c.error());
  EXPECT_EQ(c->readable.size(), 2u);
  EXPECT_EQ(c->readable_len, 32u);
  EXPECT_EQ(c->readable[1].iov_base, rig.host(Rig::kDataGpa + 64));
}

TEST(VirtqHostile, IndirectWithoutFeature) {
  Rig rig(kSize, kIndirect);
  const auto head = add_chain(rig, 2);
  rig.driver.publish();
  // Same ring, but the device negotiated no INDIRECT_DESC.
  rig.device.attach(
      &rig.mem, SplitRing{rig.driver.desc(), rig.driver.avail(), rig.driver.used(), kSize}, 0, 0);
  expect_bad_chain(rig, head, ChainError::indirect_not_negotiated);
}

TEST(VirtqHostile, IndirectWithNext) {
  Rig rig(kSize, kIndirect);
  const auto head = add_chain(rig, 2);
  rig.driver.desc()[head].flags |= virtio::kDescFNext;
  rig.driver.desc()[head].next = 1;
  rig.driver.publish();
  expect_bad_chain(rig, head, ChainError::indirect_with_next);
}

TEST(VirtqHostile, ReadableAfterWritable) {
  Rig rig(kSize);
  const auto head = add_chain(rig, 2);
  rig.driver.desc()[head].flags |= virtio::kDescFWrite;  // first writable, second readable
  rig.driver.publish();
  expect_bad_chain(rig, head, ChainError::readable_after_writable);
}

TEST(VirtqHostile, ReadableAfterWritableInIndirectTable) {
  Rig rig(kSize, kIndirect);
  const auto head = add_chain(rig, 3);
  auto* table = reinterpret_cast<virtio::VirtqDesc*>(rig.host(rig.driver.desc()[head].addr));
  table[1].flags |= virtio::kDescFWrite;
  rig.driver.publish();
  expect_bad_chain(rig, head, ChainError::readable_after_writable);
}

TEST(VirtqHostile, AvailIdxRunawayBreaksQueue) {
  Rig rig(kSize);
  add_chain(rig, 1);
  rig.driver.avail()->idx = kSize + 1;
  EXPECT_EQ(rig.device.pending(), 0);
  EXPECT_TRUE(rig.device.broken());
  EXPECT_EQ(rig.errors(ChainError::avail_idx_runaway), 1u);
  std::array<iovec, 2> segs{};
  auto c = rig.device.pop(segs);
  ASSERT_FALSE(c.has_value());
  EXPECT_EQ(c.error(), ChainError::queue_broken);
  EXPECT_TRUE(breaks_queue(c.error()));
  EXPECT_FALSE(rig.device.enable_notifications());
  EXPECT_EQ(rig.driver.used()->idx, 0);  // nothing was answered
}

TEST(VirtqHostile, AvailIdxRunawaySeenByEnableNotifications) {
  Rig rig(kSize);
  rig.driver.avail()->idx = 0x8000;
  EXPECT_FALSE(rig.device.enable_notifications());
  EXPECT_TRUE(rig.device.broken());
  EXPECT_EQ(rig.device.pending(), 0);
}

TEST(VirtqHostile, HeadOutOfRangeBreaksQueue) {
  Rig rig(kSize);
  add_chain(rig, 1);
  add_chain(rig, 1);
  rig.driver.publish();
  rig.driver.avail()->ring[0] = kSize;
  std::array<iovec, 2> segs{};
  auto c = rig.device.pop(segs);
  ASSERT_FALSE(c.has_value());
  EXPECT_EQ(c.error(), ChainError::head_out_of_range);
  EXPECT_TRUE(rig.device.broken());
  EXPECT_EQ(rig.device.pending(), 0);
  c = rig.device.pop(segs);
  ASSERT_FALSE(c.has_value());
  EXPECT_EQ(c.error(), ChainError::queue_broken);
  EXPECT_EQ(rig.device.used_idx(), 0);
}

// ---- take(): a head from the device's own record (inflight I/O), which the peer could write.

TEST(VirtqHostile, TakeHeadOutOfRangeIsRefusedAndBreaksNothing) {
  Rig rig(kSize);
  std::array<iovec, 4> segs{};
  for (std::uint16_t head : {kSize, std::uint16_t{0xffff}}) {
    auto c = rig.device.take(head, segs);
    ASSERT_FALSE(c.has_value());
    EXPECT_EQ(c.error(), ChainError::head_out_of_range);
  }
  EXPECT_EQ(rig.errors(ChainError::head_out_of_range), 2u);
  EXPECT_FALSE(rig.device.broken());
  EXPECT_EQ(rig.device.used_idx(), 0);  // nothing answered: no chain has that head
  const Buf good[] = {{Rig::kDataGpa, 4}};
  rig.add_publish(good, {});
  EXPECT_TRUE(rig.device.pop(segs).has_value());
}

TEST(VirtqHostile, TakeLoopingChainIsAnsweredAndCounted) {
  Rig rig(kSize);
  const auto head = add_chain(rig, 2);
  auto* d = rig.driver.desc();
  d[d[head].next].flags |= virtio::kDescFNext;
  d[d[head].next].next = head;
  rig.driver.publish();
  rig.attach_device(1);  // taken by the previous back-end
  std::array<iovec, 16> segs{};
  auto c = rig.device.take(head, segs);
  ASSERT_FALSE(c.has_value());
  EXPECT_EQ(c.error(), ChainError::chain_too_long);
  EXPECT_EQ(rig.errors(ChainError::chain_too_long), 1u);
  EXPECT_EQ(rig.device.last_bad_head(), head);
  EXPECT_FALSE(rig.device.broken());
  EXPECT_EQ(rig.device.last_avail_idx(), 1);
  rig.device.publish_used();
  auto u = rig.driver.get_used();
  ASSERT_TRUE(u.has_value());
  EXPECT_EQ(u->head, head);
  EXPECT_EQ(u->len, 0u);
}

TEST(VirtqHostile, TakeOnABrokenQueueServesNothing) {
  Rig rig(kSize);
  const auto head = add_chain(rig, 1);
  rig.driver.publish();
  rig.driver.avail()->idx = 0x8000;
  EXPECT_EQ(rig.device.pending(), 0);
  ASSERT_TRUE(rig.device.broken());
  std::array<iovec, 4> segs{};
  auto c = rig.device.take(head, segs);
  ASSERT_FALSE(c.has_value());
  EXPECT_EQ(c.error(), ChainError::queue_broken);
}

TEST(VirtqHostile, PopRecordsTheHeadItAnsweredAsBad) {
  Rig rig(kSize);
  add_chain(rig, 1);
  const auto head = add_chain(rig, 1);
  rig.driver.desc()[head].addr = 0xdead00000000ull;
  rig.driver.publish();
  std::array<iovec, 4> segs{};
  ASSERT_TRUE(rig.device.pop(segs).has_value());
  auto c = rig.device.pop(segs);
  ASSERT_FALSE(c.has_value());
  EXPECT_EQ(rig.device.last_bad_head(), head);
}

// ---- A hostile device seen from the driver.

TEST(VirtqHostile, UsedIdOutOfRangeIgnoredByDriver) {
  Rig rig(kSize);
  const auto head = add_chain(rig, 1);
  rig.driver.publish();
  rig.device.push_used(kSize + 3, 0);
  rig.device.push_used(head, 0);
  rig.device.publish_used();
  auto u = rig.driver.get_used();
  ASSERT_TRUE(u.has_value());
  EXPECT_EQ(u->head, head);
  EXPECT_EQ(rig.driver.bad_used(), 1u);
  EXPECT_EQ(rig.driver.free_count(), kSize);
}

TEST(VirtqHostile, UsedIdNotInFlightIgnoredByDriver) {
  Rig rig(kSize);
  const auto head = add_chain(rig, 2);
  const auto second = rig.driver.desc()[head].next;
  rig.driver.publish();
  rig.device.push_used(second, 0);  // not a head
  rig.device.push_used(head, 0);
  rig.device.push_used(head, 0);  // a second completion of the same chain
  rig.device.publish_used();
  std::array<DriverQueue::Used, 4> used{};
  EXPECT_EQ(rig.driver.get_used_burst(used), 1u);
  EXPECT_EQ(rig.driver.bad_used(), 2u);
  EXPECT_EQ(rig.driver.free_count(), kSize);
  // The free list is intact: all eight descriptors can be handed out again, once each.
  std::vector<bool> seen(kSize);
  for (int i = 0; i < kSize; ++i) {
    const Buf b[] = {{Rig::kDataGpa, 1}};
    const auto h = rig.driver.add(b, {}, 0).value();
    EXPECT_FALSE(seen[h]);
    seen[h] = true;
  }
}

TEST(VirtqHostile, UsedLenOverWritableIsClampedByDriver) {
  Rig rig(kSize);
  const Buf in[] = {{Rig::kDataGpa, 100}};
  const auto head = rig.add_publish({}, in);
  rig.device.push_used(head, 5000);
  rig.device.publish_used();
  auto u = rig.driver.get_used();
  ASSERT_TRUE(u.has_value());
  EXPECT_EQ(u->len, 100u);
  EXPECT_EQ(rig.driver.bad_used(), 1u);
}

TEST(VirtqHostile, UsedIdxRunawayIgnoredByDriver) {
  Rig rig(kSize);
  const auto head = add_chain(rig, 1);
  rig.driver.publish();
  rig.driver.used()->ring[0] = {head, 0};
  rig.driver.used()->idx = kSize + 1;
  EXPECT_FALSE(rig.driver.get_used().has_value());
  EXPECT_EQ(rig.driver.bad_used(), 1u);
  EXPECT_EQ(rig.driver.free_count(), kSize - 1);
}

}  // namespace
}  // namespace vhostkit::virtq
