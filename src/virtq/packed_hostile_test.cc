// Hostile peers on the packed ring: a driver that corrupts descriptors (through
// PackedDriverQueue::desc()) costs its chain (used len 0, or no answer where the buffer id is
// unusable) or breaks its queue, never a crash or an access outside guest memory; a device that
// writes bogus used descriptors never corrupts the driver's free lists. IN_ORDER's hostile cases
// for the split driver sit here too.
#include <array>
#include <atomic>
#include <cstring>
#include <thread>
#include <tuple>
#include <vector>

#include "testing/virtq_ring.h"

namespace vhostkit::virtq {
namespace {

using testing::kIndirect;
using testing::kInOrder;
using testing::PackedRig;
using testing::Rig;
using Buf = DriverQueue::Buffer;
using virtio::PackedDesc;

constexpr std::uint16_t kSize = 8;

// A good one-descriptor chain after a bad one: the queue still serves it.
void expect_still_serving(PackedRig& rig) {
  std::array<iovec, 4> segs{};
  const Buf good[] = {{Rig::kDataGpa, 4}};
  const auto id = rig.add_publish(good, {}, 1000);
  auto c = rig.device.pop(segs);
  ASSERT_TRUE(c.has_value()) << to_string(c.error());
  EXPECT_EQ(c->head, id);
}

// Pops one chain expecting `want`; checks it was answered with used len 0 under its id, counted,
// and that the queue still serves the next good chain.
void expect_bad_chain(PackedRig& rig, std::uint16_t id, ChainError want) {
  std::array<iovec, 16> segs{};
  auto c = rig.device.pop(segs);
  ASSERT_FALSE(c.has_value());
  EXPECT_EQ(c.error(), want) << to_string(c.error());
  EXPECT_EQ(rig.errors(want), 1u);
  EXPECT_FALSE(rig.device.broken());
  rig.device.publish_used();
  auto u = rig.driver.get_used();
  ASSERT_TRUE(u.has_value());
  EXPECT_EQ(u->head, id);
  EXPECT_EQ(u->len, 0u);
  expect_still_serving(rig);
}

// Adds a chain of `n` readable buffers, returns its id; the caller corrupts and publishes (the
// batch's first flags are stored by publish(), so a test corrupting them publishes first).
std::uint16_t add_chain(PackedRig& rig, std::size_t n, std::uint64_t token = 0) {
  std::vector<Buf> out;
  for (std::size_t i = 0; i < n; ++i) out.push_back({Rig::kDataGpa + 64 * i, 16});
  return rig.driver.add(out, {}, token).value();
}

PackedDesc* indirect_table(PackedRig& rig) {
  return reinterpret_cast<PackedDesc*>(rig.host(rig.driver.desc()[0].addr));
}

TEST(PackedHostile, RingChainLongerThanTheRingBreaksTheQueue) {
  PackedRig rig(kSize);
  add_chain(rig, kSize);
  // Every descriptor of the ring says NEXT: the chain runs into its own head, a lap on.
  rig.driver.desc()[kSize - 1].flags |= virtio::kDescFNext;
  rig.driver.publish();
  std::array<iovec, 16> segs{};
  auto c = rig.device.pop(segs);
  ASSERT_FALSE(c.has_value());
  EXPECT_EQ(c.error(), ChainError::chain_unterminated);
  EXPECT_TRUE(breaks_queue(c.error()));
  EXPECT_TRUE(rig.device.broken());
  EXPECT_EQ(rig.device.pop(segs).error(), ChainError::queue_broken);
  EXPECT_EQ(rig.device.pending(), 0);
}

TEST(PackedHostile, ChainRunningIntoAnUnavailableDescriptorBreaksTheQueue) {
  PackedRig rig(kSize);
  add_chain(rig, 1);
  rig.driver.publish();
  rig.driver.desc()[0].flags |= virtio::kDescFNext;  // descriptor 1 was never made available
  std::array<iovec, 4> segs{};
  EXPECT_EQ(rig.device.pop(segs).error(), ChainError::chain_unterminated);
  EXPECT_TRUE(rig.device.broken());
}

TEST(PackedHostile, IndirectTableLongerThanTheQueueIsChainTooLong) {
  PackedRig rig(kSize, kIndirect);
  const auto id = add_chain(rig, kSize + 1);  // nine buffers in one table, queue of eight
  rig.driver.publish();
  expect_bad_chain(rig, id, ChainError::chain_too_long);
}

// An indirect table spanning two regions (adjacent in guest-physical memory) is walked from a
// copy; one running from a region into unmapped memory is still refused.
TEST(PackedHostile, IndirectTableSpanningTwoRegionsIsWalkedFromACopy) {
  PackedRig rig(kSize, kIndirect);
  const auto id = add_chain(rig, 3);
  const std::uint64_t at = Rig::kGpaB - 40;  // 40 of the table's 48 bytes in A, 8 in B
  std::memcpy(rig.host(at), indirect_table(rig), 48);
  std::memset(indirect_table(rig), 0xff, 48);  // the old place no longer holds a table
  rig.driver.desc()[0].addr = at;
  rig.driver.publish();
  std::array<iovec, 16> segs{};
  auto c = rig.device.pop(segs);
  ASSERT_TRUE(c.has_value()) << to_string(c.error());
  EXPECT_EQ(c->head, id);
  ASSERT_EQ(c->readable.size(), 3u);
  for (std::size_t i = 0; i < 3; ++i) {
    EXPECT_EQ(c->readable[i].iov_base, rig.host(Rig::kDataGpa + 64 * i)) << i;
    EXPECT_EQ(c->readable[i].iov_len, 16u) << i;
  }
  EXPECT_EQ(rig.device.error_total(), 0u);

  PackedRig hole(kSize, kIndirect);
  const auto id2 = add_chain(hole, 2);
  const std::uint64_t end = Rig::kGpaB + Rig::kRegion - 16;  // the second entry in the hole
  std::memcpy(hole.host(end), indirect_table(hole), 16);
  hole.driver.desc()[0].addr = end;
  hole.driver.publish();
  expect_bad_chain(hole, id2, ChainError::indirect_not_mapped);
}

TEST(PackedHostile, IndirectInsideIndirect) {
  PackedRig rig(kSize, kIndirect);
  const auto id = add_chain(rig, 2);
  indirect_table(rig)[1] = PackedDesc{rig.driver.desc()[0].addr, 32, 0, virtio::kDescFIndirect};
  rig.driver.publish();
  expect_bad_chain(rig, id, ChainError::indirect_nested);
}

TEST(PackedHostile, IndirectAfterNextInTheRing) {
  PackedRig rig(kSize, kIndirect);
  const Buf one[] = {{Rig::kDataGpa, 16}};
  const Buf two[] = {{Rig::kDataGpa, 16}, {Rig::kDataGpa + 64, 16}};
  rig.driver.add(one, {}, 0).value();                  // descriptor 0
  const auto id = rig.driver.add(two, {}, 0).value();  // descriptor 1: an indirect table
  rig.driver.publish();
  rig.driver.desc()[0].flags |= virtio::kDescFNext;  // one chain of both, ending in the table
  rig.driver.desc()[0].id = id;
  std::array<iovec, 4> segs{};
  auto c = rig.device.pop(segs);
  ASSERT_FALSE(c.has_value());
  EXPECT_EQ(c.error(), ChainError::indirect_in_chain);
  EXPECT_FALSE(rig.device.broken());
}

TEST(PackedHostile, IndirectWithNext) {
  PackedRig rig(kSize, kIndirect);
  const auto first = add_chain(rig, 2);
  const auto second = add_chain(rig, 1);
  rig.driver.publish();
  rig.driver.desc()[0].flags |= virtio::kDescFNext;  // the table, then descriptor 1
  // The chain ends at descriptor 1, whose id is `second`: that is the id answered.
  (void)first;
  expect_bad_chain(rig, second, ChainError::indirect_with_next);
}

TEST(PackedHostile, IndirectWithoutFeature) {
  PackedRig rig(kSize, kIndirect);
  const auto id = add_chain(rig, 2);
  rig.driver.publish();
  rig.device.attach(
      &rig.mem,
      PackedRing{rig.driver.desc(), rig.driver.driver_event(), rig.driver.device_event(), kSize},
      0);
  expect_bad_chain(rig, id, ChainError::indirect_not_negotiated);
}

TEST(PackedHostile, IndirectTableBadLengthAndUnmapped) {
  for (const auto& [len, addr, want] :
       {std::tuple{0u, Rig::kIndirectGpa, ChainError::indirect_bad_len},
        std::tuple{24u, Rig::kIndirectGpa, ChainError::indirect_bad_len},
        std::tuple{32u, Rig::kGpaB + Rig::kRegion, ChainError::indirect_not_mapped}}) {
    PackedRig rig(kSize, kIndirect);
    const auto id = add_chain(rig, 2);
    rig.driver.desc()[0].len = len;
    rig.driver.desc()[0].addr = addr;
    rig.driver.publish();
    expect_bad_chain(rig, id, want);
  }
}

TEST(PackedHostile, BuffersOutsideGuestMemory) {
  struct Case {
    std::uint64_t addr;
    std::uint32_t len;
    ChainError want;
  };
  for (const Case& k : {Case{Rig::kGpaB + Rig::kRegion + 100, 16, ChainError::desc_not_mapped},
                        Case{Rig::kGpaC + Rig::kRegion - 8, 16, ChainError::desc_not_mapped},
                        Case{~std::uint64_t{0} - 4, 16, ChainError::desc_len_wraps}}) {
    PackedRig rig(kSize);
    const auto id = add_chain(rig, 2);
    rig.driver.desc()[1].addr = k.addr;  // the second buffer of the chain
    rig.driver.desc()[1].len = k.len;
    rig.driver.publish();
    expect_bad_chain(rig, id, k.want);
  }
}

TEST(PackedHostile, TotalLengthOver4GiB) {
  // 4097 descriptors of 1 MiB each (the same bytes over and over): 4 GiB + 1 MiB.
  constexpr std::uint16_t kBig = 8192;
  constexpr std::uint16_t kCount = 4097;
  PackedRig rig(kBig);
  PackedDesc* d = rig.driver.desc();
  for (std::uint16_t i = 0; i < kCount; ++i) {
    d[i] = PackedDesc{Rig::kGpaB, static_cast<std::uint32_t>(Rig::kRegion), 5,
                      static_cast<std::uint16_t>(virtio::kDescFAvail |
                                                 (i + 1 < kCount ? virtio::kDescFNext : 0))};
  }
  std::vector<iovec> segs(kBig);
  auto c = rig.device.pop(segs);
  ASSERT_FALSE(c.has_value());
  EXPECT_EQ(c.error(), ChainError::total_too_large);
  EXPECT_FALSE(rig.device.broken());
  EXPECT_EQ(rig.device.base().avail_idx, kCount);  // the whole chain was consumed
}

TEST(PackedHostile, ReadableAfterWritable) {
  PackedRig rig(kSize);
  const auto id = add_chain(rig, 2);
  rig.driver.publish();
  rig.driver.desc()[0].flags |= virtio::kDescFWrite;
  expect_bad_chain(rig, id, ChainError::readable_after_writable);
}

TEST(PackedHostile, BufferIdOutOfRangeIsDroppedUnanswered) {
  PackedRig rig(kSize);
  add_chain(rig, 2);
  rig.driver.desc()[1].id = kSize;  // the id lives in the last descriptor
  rig.driver.publish();
  std::array<iovec, 4> segs{};
  auto c = rig.device.pop(segs);
  ASSERT_FALSE(c.has_value());
  EXPECT_EQ(c.error(), ChainError::id_out_of_range);
  EXPECT_TRUE(drops_chain(c.error()));
  EXPECT_FALSE(rig.device.broken());
  rig.device.publish_used();
  EXPECT_FALSE(rig.driver.get_used().has_value()) << "nothing answered";
  expect_still_serving(rig);
}

TEST(PackedHostile, BufferIdReusedWhileInFlightIsDropped) {
  PackedRig rig(kSize);
  const auto first = add_chain(rig, 1, 1);
  add_chain(rig, 1, 2);
  rig.driver.desc()[1].id = first;
  rig.driver.publish();
  std::array<iovec, 4> segs{};
  ASSERT_TRUE(rig.device.pop(segs).has_value());
  auto c = rig.device.pop(segs);
  ASSERT_FALSE(c.has_value());
  EXPECT_EQ(c.error(), ChainError::id_in_flight);
  // The first chain is still answered once, under its id.
  rig.device.push_used(first, 0);
  rig.device.push_used(first, 0);  // a second push of the same id is ignored
  rig.device.publish_used();
  std::array<DriverQueue::Used, 4> used{};
  ASSERT_EQ(rig.driver.get_used_burst(used), 1u);
  EXPECT_EQ(used[0].token, 1u);
  EXPECT_EQ(rig.driver.bad_used(), 0u);
}

TEST(PackedHostile, ResumePointThatMakesNoSenseBreaksTheQueue) {
  for (const PackedRingBase& base : {PackedRingBase{kSize, true, 0, true},      // past the ring
                                     PackedRingBase{0, true, kSize + 3, true},  // past the ring
                                     PackedRingBase{2, true, 5, true},       // used ahead of avail
                                     PackedRingBase{2, false, 3, false}}) {  // used one ahead
    PackedRig rig(kSize);
    rig.attach_device(base);
    EXPECT_TRUE(rig.device.broken()) << base.encode();
    EXPECT_EQ(rig.errors(ChainError::wrap_state_invalid), 1u);
    EXPECT_EQ(rig.device.pending(), 0);
  }
  // Used a full ring behind avail (every descriptor in flight) is a real state.
  PackedRig rig(kSize);
  rig.attach_device(PackedRingBase{2, false, 2, true});
  EXPECT_FALSE(rig.device.broken());
}

// Found by virtq_packed_fuzz: a driver that resumes with chains in flight and marks their
// descriptors available as well. pending() counted them; the used writes for the chains popped
// since cover them, so pop() found nothing while pending() stayed nonzero: a worker polling
// "while (pending()) pop()" never left the loop.
TEST(PackedHostile, DescriptorsInFlightClaimedAvailableEndThePollLoop) {
  PackedRig rig(kSize);
  PackedDesc* d = rig.driver.desc();
  // Positions 4..7 available in this lap (wrap 1), 0..3 (in flight) as if in the next (wrap 0).
  for (std::uint16_t i = 0; i < kSize; ++i) {
    d[i] = PackedDesc{Rig::kDataGpa, 16, static_cast<std::uint16_t>(i),
                      i >= 4 ? virtio::kDescFAvail : virtio::kDescFUsed};
  }
  rig.attach_device(PackedRingBase{4, true, 0, true});
  ASSERT_FALSE(rig.device.broken());
  std::array<iovec, 2> segs{};
  int rounds = 0, popped = 0;
  while (rig.device.pending() != 0 && rounds++ < 100) {
    auto c = rig.device.pop(segs);
    if (!c) continue;
    ++popped;
    rig.device.push_used(c->head, 0);
    rig.device.publish_used();
  }
  EXPECT_LT(rounds, 100) << "pending() stayed nonzero";
  EXPECT_EQ(popped, 4);
  EXPECT_EQ(rig.device.pending(), 0);
}

// The driver rewrites a descriptor over and over while the device pops it: each pop works on
// one copy, so whatever mix of old and new fields it sees, an accepted buffer lies in memory.
TEST(PackedHostile, DescriptorRewrittenWhileTheDeviceReadsIt) {
  PackedRig rig(4);
  std::atomic<bool> stop{false};
  PackedDesc* d = rig.driver.desc();
  std::thread scribbler([&] {
    for (std::uint32_t n = 0; !stop.load(std::memory_order_relaxed); ++n) {
      for (int i = 0; i < 4; ++i) {
        const bool good = (n + i) % 2 == 0;
        std::atomic_ref<std::uint64_t>(d[i].addr).store(
            good ? Rig::kDataGpa : Rig::kGpaC + Rig::kRegion - 8, std::memory_order_relaxed);
        std::atomic_ref<std::uint32_t>(d[i].len).store(good ? 4096 : 16, std::memory_order_relaxed);
      }
    }
  });
  std::array<iovec, 4> segs{};
  const auto* lo = rig.host(Rig::kGpaA);
  const auto* hi = rig.host(Rig::kGpaC) + Rig::kRegion;
  int accepted = 0, refused = 0;
  for (int round = 0; round < 20000; ++round) {
    const Buf b[] = {{Rig::kDataGpa, 16}};
    rig.add_publish(b, {});
    auto c = rig.device.pop(segs);
    if (c) {
      ++accepted;
      for (const iovec& v : c->readable) {
        const auto* p = static_cast<const std::uint8_t*>(v.iov_base);
        ASSERT_TRUE(p >= lo && p + v.iov_len <= hi);
      }
      rig.device.push_used(c->head, 0);
    } else {
      ASSERT_EQ(c.error(), ChainError::desc_not_mapped) << to_string(c.error());
      ++refused;
    }
    rig.device.publish_used();
    ASSERT_TRUE(rig.driver.get_used().has_value());
  }
  stop = true;
  scribbler.join();
  EXPECT_GT(accepted + refused, 0);
  EXPECT_FALSE(rig.device.broken());
}

// ---- A hostile device seen from the driver.

TEST(PackedHostile, UsedIdOutOfRangeStopsTheDriver) {
  PackedRig rig(kSize);
  add_chain(rig, 1);
  rig.driver.publish();
  PackedDesc& u = rig.driver.desc()[0];
  u.id = kSize + 3;
  u.flags = virtio::kDescFAvail | virtio::kDescFUsed;
  EXPECT_FALSE(rig.driver.get_used().has_value());
  EXPECT_EQ(rig.driver.bad_used(), 1u);
  EXPECT_TRUE(rig.driver.broken());
  EXPECT_EQ(rig.driver.free_count(), kSize - 1);
}

TEST(PackedHostile, UsedIdNotInFlightStopsTheDriver) {
  PackedRig rig(kSize);
  add_chain(rig, 1);
  rig.driver.publish();
  PackedDesc& u = rig.driver.desc()[0];
  u.id = 5;  // never handed out
  u.flags = virtio::kDescFAvail | virtio::kDescFUsed;
  EXPECT_FALSE(rig.driver.get_used().has_value());
  EXPECT_TRUE(rig.driver.broken());
  EXPECT_EQ(rig.driver.free_count(), kSize - 1);
}

TEST(PackedHostile, UsedLenOverWritableIsClampedByDriver) {
  PackedRig rig(kSize);
  const Buf in[] = {{Rig::kDataGpa, 100}};
  const auto id = rig.add_publish({}, in);
  std::array<iovec, 2> segs{};
  ASSERT_TRUE(rig.device.pop(segs).has_value());
  rig.device.push_used(id, 5000);
  rig.device.publish_used();
  auto u = rig.driver.get_used();
  ASSERT_TRUE(u.has_value());
  EXPECT_EQ(u->len, 100u);
  EXPECT_EQ(rig.driver.bad_used(), 1u);
}

TEST(InOrderHostile, SplitUsedIdNotInFlightIsSkipped) {
  Rig rig(kSize, kInOrder);
  const Buf out[] = {{Rig::kDataGpa, 8}};
  const auto head = rig.add_publish(out, {}, 7);
  rig.driver.used()->ring[0] = {5, 0};  // not a head in flight
  rig.driver.used()->ring[1] = {head, 0};
  rig.driver.used()->idx = 2;
  auto u = rig.driver.get_used();
  ASSERT_TRUE(u.has_value());
  EXPECT_EQ(u->token, 7u);
  EXPECT_EQ(rig.driver.bad_used(), 1u);
  EXPECT_EQ(rig.driver.free_count(), kSize);
}

TEST(InOrderHostile, SplitElementClaimingMoreChainsThanUsedIdxIsSkipped) {
  Rig rig(kSize, kInOrder);
  const Buf out[] = {{Rig::kDataGpa, 8}};
  rig.add_publish(out, {}, 0);
  const auto second = rig.add_publish(out, {}, 1);
  rig.driver.used()->ring[0] = {second, 0};  // stands for two chains
  rig.driver.used()->idx = 1;                // but the device says it used one
  EXPECT_FALSE(rig.driver.get_used().has_value());
  EXPECT_EQ(rig.driver.bad_used(), 1u);
  EXPECT_EQ(rig.driver.free_count(), kSize - 2);
}

TEST(InOrderHostile, PackedUsedIdNotInFlightStopsTheDriver) {
  PackedRig rig(kSize, kInOrder);
  add_chain(rig, 1);
  rig.driver.publish();
  PackedDesc& u = rig.driver.desc()[0];
  u.id = 6;
  u.flags = virtio::kDescFAvail | virtio::kDescFUsed;
  EXPECT_FALSE(rig.driver.get_used().has_value());
  EXPECT_TRUE(rig.driver.broken());
}

}  // namespace
}  // namespace vhostkit::virtq
