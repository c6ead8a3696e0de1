// vhost::Device on packed rings (VIRTIO_F_RING_PACKED acked): start, traffic over several laps,
// the wrap counters through GET/SET_VRING_BASE, a new session resuming from the base, dirty
// logging, and the sizes and bases a packed ring refuses.
#include <gtest/gtest.h>

#include <chrono>
#include <string>
#include <thread>

#include "testing/dirty_log.h"
#include "testing/vhost_rig.h"
#include "vhostkit/vhost/device.h"

namespace vhostkit::vhost {
namespace {

using testing::EchoBackend;
using testing::kEchoFeatures;
using testing::kEchoPacked;
using testing::Rig;

constexpr int kWaitMs = 20000;
constexpr std::uint64_t kPacked = kEchoFeatures | virtio::bit(virtio::feature::ring_packed);
constexpr std::uint64_t kPackedInOrder = kPacked | virtio::bit(virtio::feature::in_order);

DeviceOptions opts(PollMode mode) {
  DeviceOptions o;
  o.name = "pk";
  o.mode = mode;
  o.adaptive_spin_us = 200;
  return o;
}

void echo_round_trips(Rig& rig, std::uint16_t q, int count, int first_token = 0) {
  for (int i = first_token; i < first_token + count; ++i) {
    const std::string msg = "packed " + std::to_string(i);
    rig.post(q, msg, i);
    auto u = rig.wait_used(q, kWaitMs);
    ASSERT_TRUE(u.has_value()) << "no used descriptor for request " << i;
    EXPECT_EQ(u->token, static_cast<std::uint64_t>(i));
    EXPECT_EQ(u->len, msg.size());
    EXPECT_EQ(rig.reply(q, i, msg.size()), msg);
  }
}

// Ring q's start sequence without touching the driver's ring (a resumed ring keeps it).
void start_ring(Device& dev, Rig& rig, std::uint16_t q, std::uint32_t base) {
  ASSERT_TRUE(dev.set_vring_num(q, rig.ring_size()).has_value());
  auto b = dev.set_vring_base(q, base);
  ASSERT_TRUE(b.has_value()) << b.error().message();
  auto a = dev.set_vring_addr(q, rig.addr(q));
  ASSERT_TRUE(a.has_value()) << a.error().message();
  auto kick = testing::make_eventfd();
  ASSERT_TRUE(dev.set_vring_kick(q, testing::dup_fd(kick.get())).has_value());
  rig.set_kick(q, std::move(kick));
  auto e = dev.set_vring_enable(q, true);
  ASSERT_TRUE(e.has_value()) << e.error().message();
}

TEST(DevicePacked, EventModeEchoOverManyLaps) {
  EchoBackend be(2, kEchoPacked);
  Device dev(be, opts(PollMode::event));
  Rig rig(2, 64, kPacked);
  rig.bring_up(dev);
  ASSERT_TRUE(dev.queue(0).started());
  EXPECT_TRUE(dev.queue(0).packed());
  echo_round_trips(rig, 0, 200);  // a ring of 64: the wrap counters flip six times
  EXPECT_EQ(dev.queue(0).stats().chains.load(), 200u);
  EXPECT_EQ(dev.queue(0).stats().errors.load(), 0u);
  EXPECT_EQ(rig.driver(0).bad_used(), 0u);
  EXPECT_FALSE(dev.broken());
}

TEST(DevicePacked, RingSizeNotAPowerOfTwo) {
  EchoBackend be(2, kEchoPacked);
  Device dev(be, opts(PollMode::event));
  Rig rig(1, 100, kPackedInOrder);
  rig.bring_up(dev);
  ASSERT_TRUE(dev.queue(0).started());
  echo_round_trips(rig, 0, 250);
  EXPECT_EQ(dev.queue(0).stats().errors.load(), 0u);
}

TEST(DevicePacked, BusyModeWithoutKickFd) {
  EchoBackend be(2, kEchoPacked);
  Device dev(be, opts(PollMode::busy));
  Rig rig(1, 32, kPacked);
  rig.bring_up(dev, /*use_kick=*/false);
  ASSERT_TRUE(dev.queue(0).started());
  for (int i = 0; i < 80; ++i) {
    rig.post(0, "busy " + std::to_string(i), i);
    ASSERT_TRUE(rig.wait_used(0, kWaitMs, /*poll_call=*/false).has_value()) << i;
  }
}

// GET_VRING_BASE carries both positions and both wrap counters; the ring restarted from it (a
// new kick, as vhost-user restarts a ring) and a new device given it (a reconnected back-end)
// go on where the driver is.
TEST(DevicePacked, BaseRoundTripAndResumeWithWrapCounters) {
  EchoBackend be(2, kEchoPacked);
  Rig rig(1, 16, kPacked);
  std::uint32_t base = 0;
  {
    Device dev(be, opts(PollMode::event));
    rig.bring_up(dev);
    // Each request is a chain of two descriptors: 12 take one lap and 8 descriptors.
    echo_round_trips(rig, 0, 12);
    auto b = dev.get_vring_base(0);
    ASSERT_TRUE(b.has_value());
    EXPECT_FALSE(dev.queue(0).started());
    const auto pb = virtq::PackedRingBase::decode(*b);
    EXPECT_EQ(pb.avail_idx, 8u);
    EXPECT_FALSE(pb.avail_wrap);
    EXPECT_EQ(pb.used_idx, 8u);
    EXPECT_FALSE(pb.used_wrap);
    // The same device: SET_VRING_BASE with what it gave, then a new kick.
    ASSERT_TRUE(dev.set_vring_base(0, *b).has_value());
    auto kick = testing::make_eventfd();
    ASSERT_TRUE(dev.set_vring_kick(0, testing::dup_fd(kick.get())).has_value());
    rig.set_kick(0, std::move(kick));
    ASSERT_TRUE(dev.queue(0).started());
    echo_round_trips(rig, 0, 16, 12);  // 56 descriptors: three laps and 8
    auto b2 = dev.get_vring_base(0);
    ASSERT_TRUE(b2.has_value());
    base = *b2;
    EXPECT_EQ(virtq::PackedRingBase::decode(base), (virtq::PackedRingBase{8, false, 8, false}));
  }
  // A new back-end (the front-end reconnected): the driver's ring is kept, the base resent.
  Device dev(be, opts(PollMode::event));
  ASSERT_TRUE(dev.set_owner().has_value());
  ASSERT_TRUE(dev.set_features(kPacked).has_value());
  ASSERT_TRUE(dev.set_mem_table(rig.table()).has_value());
  auto call = testing::make_eventfd();
  ASSERT_TRUE(dev.set_vring_call(0, testing::dup_fd(call.get())).has_value());
  start_ring(dev, rig, 0, base);
  ASSERT_TRUE(dev.queue(0).started());
  echo_round_trips(rig, 0, 30, 28);
  EXPECT_EQ(rig.driver(0).bad_used(), 0u);
  EXPECT_FALSE(dev.broken());
}

// DPDK's virtio-user and SPDK start a packed ring with SET_VRING_BASE 0x8000 (avail 0 with its
// wrap counter, nothing in the used half): that is a new ring, not a full ring in flight.
TEST(DevicePacked, SixteenBitBaseStartsAFreshRing) {
  EchoBackend be(2, kEchoPacked);
  Device dev(be, opts(PollMode::event));
  Rig rig(1, 32, kPacked);
  ASSERT_TRUE(dev.set_owner().has_value());
  ASSERT_TRUE(dev.set_features(kPacked).has_value());
  ASSERT_TRUE(dev.set_mem_table(rig.table()).has_value());
  rig.init_driver(0);
  auto call = testing::make_eventfd();
  ASSERT_TRUE(dev.set_vring_call(0, testing::dup_fd(call.get())).has_value());
  start_ring(dev, rig, 0, 0x8000);
  ASSERT_TRUE(dev.queue(0).started());
  echo_round_trips(rig, 0, 20);  // 40 descriptors: one lap and 8
  auto b = dev.get_vring_base(0);
  ASSERT_TRUE(b.has_value());
  EXPECT_EQ(virtq::PackedRingBase::decode(*b), (virtq::PackedRingBase{8, false, 8, false}));
}

TEST(DevicePackedHostile, BaseNamingPositionsPastTheRingIsRefused) {
  EchoBackend be(2, kEchoPacked);
  Device dev(be, opts(PollMode::event));
  Rig rig(1, 32, kPacked);
  rig.bring_up(dev);
  ASSERT_TRUE(dev.get_vring_base(0).has_value());
  // avail 40 on a ring of 32; used 32 on a ring of 32.
  EXPECT_FALSE(dev.set_vring_base(0, virtq::PackedRingBase{40, true, 0, true}.encode()));
  EXPECT_FALSE(dev.set_vring_base(0, virtq::PackedRingBase{0, true, 32, true}.encode()));
  // Used ahead of avail: refused when the ring starts; it stays stopped, the device lives.
  ASSERT_TRUE(dev.set_vring_base(0, virtq::PackedRingBase{0, true, 5, true}.encode()));
  auto kick = testing::make_eventfd();
  auto r = dev.set_vring_kick(0, testing::dup_fd(kick.get()));
  ASSERT_FALSE(r.has_value());
  EXPECT_NE(r.error().message().find("packed base"), std::string::npos) << r.error().message();
  EXPECT_FALSE(dev.queue(0).started());
  // A good base then starts it.
  rig.init_driver(0);
  ASSERT_TRUE(dev.set_vring_base(0, virtq::PackedRingBase{}.encode()));
  ASSERT_TRUE(dev.set_vring_kick(0, testing::dup_fd(kick.get())).has_value());
  rig.set_kick(0, std::move(kick));
  ASSERT_TRUE(dev.queue(0).started());
  echo_round_trips(rig, 0, 5);
}

TEST(DevicePackedHostile, RingSizesNotAllowed) {
  EchoBackend be(2, kEchoPacked);
  Device dev(be, opts(PollMode::event));
  ASSERT_TRUE(dev.set_owner().has_value());
  // Split: powers of two only.
  ASSERT_TRUE(dev.set_features(kEchoFeatures).has_value());
  EXPECT_FALSE(dev.set_vring_num(0, 100));
  EXPECT_TRUE(dev.set_vring_num(0, 128));
  // Packed: 1..32768.
  ASSERT_TRUE(dev.set_features(kPacked).has_value());
  EXPECT_FALSE(dev.set_vring_num(0, 0));
  EXPECT_FALSE(dev.set_vring_num(0, 32769));
  EXPECT_TRUE(dev.set_vring_num(0, 1));
  EXPECT_TRUE(dev.set_vring_num(0, 32768));
  EXPECT_TRUE(dev.set_vring_num(0, 100));
  // The features taken back to split after the size: the ring does not start on it.
  Rig rig(1, 100, kPacked);
  ASSERT_TRUE(dev.set_mem_table(rig.table()).has_value());
  rig.init_driver(0);
  ASSERT_TRUE(dev.set_vring_addr(0, rig.addr(0)).has_value());
  ASSERT_TRUE(dev.set_features(kEchoFeatures).has_value());
  auto kick = testing::make_eventfd();
  ASSERT_TRUE(dev.set_vring_kick(0, testing::dup_fd(kick.get())).has_value());
  auto e = dev.set_vring_enable(0, true);
  ASSERT_FALSE(e.has_value());
  EXPECT_NE(e.error().message().find("not allowed for a split ring"), std::string::npos)
      << e.error().message();
  EXPECT_FALSE(dev.queue(0).started());
  EXPECT_FALSE(dev.broken());
}

// Live migration on a packed ring: the reply buffers and the descriptor ring (where the used
// descriptors are written) are marked while LOG_ALL is acked; nothing before.
TEST(DevicePacked, DirtyLogMarksBuffersAndUsedDescriptors) {
  EchoBackend be(2, kEchoPacked);
  Device dev(be, opts(PollMode::event));
  dev.add_offered_features(virtio::bit(virtio::feature::log_all));
  Rig rig(1, 256, kPacked);
  ASSERT_TRUE(dev.set_owner().has_value());
  ASSERT_TRUE(dev.set_features(kPacked).has_value());
  ASSERT_TRUE(dev.set_mem_table(rig.table()).has_value());
  vhostkit::testing::SharedLog log;
  ASSERT_TRUE(log.ok());
  ASSERT_TRUE(dev.set_log_base(log.fd(), log.size(), 0).has_value());
  rig.init_driver(0);
  memory::VringAddr a = rig.addr(0);
  a.flags = virtio::kVhostVringFLog;
  a.log_guest_addr = rig.driver(0).used_gpa();  // QEMU's used_phys: the device event area
  ASSERT_TRUE(dev.set_vring_num(0, 256).has_value());
  ASSERT_TRUE(dev.set_vring_base(0, virtq::PackedRingBase{}.encode()).has_value());
  ASSERT_TRUE(dev.set_vring_addr(0, a).has_value());
  auto call = testing::make_eventfd();
  ASSERT_TRUE(dev.set_vring_call(0, testing::dup_fd(call.get())).has_value());
  auto kick = testing::make_eventfd();
  ASSERT_TRUE(dev.set_vring_kick(0, testing::dup_fd(kick.get())).has_value());
  rig.set_kick(0, std::move(kick));
  ASSERT_TRUE(dev.set_vring_enable(0, true).has_value());
  auto reply_gpa = [](std::uint64_t token) { return Rig::kDataGpa + token * 0x800 + 0x400; };
  // The ring of 256 descriptors is one page of 4 KiB: descriptor 0's page.
  const std::uint64_t desc_gpa = rig.driver(0).desc_gpa();

  rig.post(0, "not yet", 0);
  ASSERT_TRUE(rig.wait_used(0, kWaitMs).has_value());
  EXPECT_FALSE(log.dirty(reply_gpa(0)));
  EXPECT_FALSE(log.dirty(desc_gpa));

  ASSERT_TRUE(dev.set_features(kPacked | virtio::bit(virtio::feature::log_all)));
  rig.post(0, "log me", 2);
  ASSERT_TRUE(rig.wait_used(0, kWaitMs).has_value());
  EXPECT_EQ(rig.reply(0, 2, 6), "log me");
  EXPECT_TRUE(log.dirty(reply_gpa(2)));
  EXPECT_TRUE(log.dirty(desc_gpa));
  EXPECT_FALSE(log.dirty(reply_gpa(4)));

  ASSERT_TRUE(dev.set_features(kPacked));
  log.clear();
  rig.post(0, "off again", 4);
  ASSERT_TRUE(rig.wait_used(0, kWaitMs).has_value());
  EXPECT_FALSE(log.dirty(reply_gpa(4)));
  EXPECT_FALSE(log.dirty(desc_gpa));
}

}  // namespace
}  // namespace vhostkit::vhost
