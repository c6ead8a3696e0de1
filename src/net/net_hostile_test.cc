// A hostile guest against NetDevice: malformed tx and rx chains cost that chain (used len 0,
// a counter), never the device; frames that cannot fit are dropped and counted.
#include <gtest/gtest.h>

#include "testing/net_rig.h"
#include "vhostkit/net/net_device.h"

namespace vhostkit::net {
namespace {

using namespace testing;
using vhost::PollMode;

struct LoopRig {
  explicit LoopRig(std::uint64_t features = kBase | kEventIdx | kMrg)
      : dev(net, dev_opts(PollMode::event)), g(3, features) {
    g.bring_up(dev);
  }
  NetDevice net{NetOptions{}};
  vhost::Device dev;
  Guest g;
};

// After a hostile chain the device still moves a good frame end to end.
void expect_still_serving(LoopRig& r, Receiver& rx, std::size_t already) {
  std::mt19937 rng(99);
  const Bytes fr = random_frame(rng, 200);
  ASSERT_TRUE(r.g.send(0, fr));
  r.g.kick(0);
  ASSERT_TRUE(rx.wait_frames(already + 1));
  EXPECT_EQ(rx.frames[already].data, mac_swapped(fr));
  EXPECT_FALSE(r.dev.broken());
}

std::uint32_t one_used_len(Guest& g, std::uint16_t q) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(2);
  while (std::chrono::steady_clock::now() < deadline) {
    auto u = g.reclaim(q);
    if (!u.empty()) return u[0].len;
    g.wait_call(q, 2);
  }
  ADD_FAILURE() << "no used element";
  return 0xffffffffu;
}

TEST(NetHostile, TxChainShorterThanHeader) {
  LoopRig r;
  Receiver rx(r.g, 1, {1526});
  rx.refill();
  ASSERT_TRUE(r.g.add_raw(0, Bytes(8, 0)).has_value());  // 8 bytes: not even the header
  r.g.kick(0);
  EXPECT_EQ(one_used_len(r.g, 0), 0u);
  EXPECT_EQ(r.net.stats(0).tx_errors, 1u);
  EXPECT_EQ(r.net.stats(0).tx_frames, 0u);
  expect_still_serving(r, rx, 0);
}

TEST(NetHostile, TxChainWithHeaderButNoEthernetHeader) {
  LoopRig r;
  Receiver rx(r.g, 1, {1526});
  rx.refill();
  ASSERT_TRUE(r.g.add_raw(0, Bytes(12 + 5, 0)).has_value());
  r.g.kick(0);
  EXPECT_EQ(one_used_len(r.g, 0), 0u);
  EXPECT_EQ(r.net.stats(0).tx_errors, 1u);
  expect_still_serving(r, rx, 0);
}

TEST(NetHostile, TxChainWithWritableOnlyDescriptors) {
  LoopRig r;
  Receiver rx(r.g, 1, {1526});
  rx.refill();
  ASSERT_TRUE(r.g.add_raw(0, {}, {1500}).has_value());
  r.g.kick(0);
  EXPECT_EQ(one_used_len(r.g, 0), 0u);
  EXPECT_EQ(r.net.stats(0).tx_errors, 1u);
  EXPECT_EQ(rx.frames.size(), 0u);
  expect_still_serving(r, rx, 0);
}

// A port device for the tx cases where "nothing reached the port" must be seen directly.
struct PortRig : DeviceRig {
  PortRig() : DeviceRig(true, false, kBase | kEventIdx | kMrg) {}
};

// A whole header and frame, readable, then a writable descriptor: the transmitq is for
// device-readable buffers only, so the chain is a driver error and none of it is sent.
Bytes header_and_frame(const Guest& g, std::size_t frame_len, std::uint32_t seed) {
  std::mt19937 rng(seed);
  Bytes out(g.hdr_len(), 0);
  const Bytes fr = random_frame(rng, frame_len);
  out.insert(out.end(), fr.begin(), fr.end());
  return out;
}

// The good frame after a refused chain reaches the port intact, and the refused one is not
// there before it.
void expect_port_still_serving(PortRig& r) {
  std::mt19937 rng(77);
  const Bytes fr = random_frame(rng, 300);
  ASSERT_TRUE(r.g.send(0, fr));
  r.g.kick(0);
  ASSERT_TRUE(wait_tx_done(r.g, 0));
  const auto sent = r.port->take_sent();
  ASSERT_EQ(sent.size(), 1u);
  EXPECT_EQ(sent[0], fr);
  EXPECT_EQ(r.net.stats(0).tx_frames, 1u);
  EXPECT_FALSE(r.dev.broken());
}

TEST(NetHostile, TxChainWithReadableFrameThenWritableDescriptorToPort) {
  PortRig r;
  ASSERT_TRUE(r.g.add_raw(0, header_and_frame(r.g, 200, 11), {64}).has_value());
  r.g.kick(0);
  EXPECT_EQ(one_used_len(r.g, 0), 0u);
  const NetStats s = r.net.stats(0);
  EXPECT_EQ(s.tx_errors, 1u);
  EXPECT_EQ(s.tx_frames, 0u);
  EXPECT_EQ(s.tx_drops, 0u);
  EXPECT_TRUE(r.port->take_sent().empty());
  expect_port_still_serving(r);
  EXPECT_EQ(r.net.stats(0).tx_errors, 1u);
}

TEST(NetHostile, TxChainWithReadableFrameThenWritableDescriptorOnLoopback) {
  LoopRig r;
  Receiver rx(r.g, 1, {1526});
  rx.refill();
  ASSERT_TRUE(r.g.add_raw(0, header_and_frame(r.g, 200, 12), {64}).has_value());
  r.g.kick(0);
  EXPECT_EQ(one_used_len(r.g, 0), 0u);
  EXPECT_EQ(r.net.stats(0).tx_errors, 1u);
  EXPECT_EQ(r.net.stats(0).tx_frames, 0u);
  rx.poll();
  EXPECT_TRUE(rx.frames.empty());
  expect_still_serving(r, rx, 0);  // the good frame is the first and only one the guest gets
  EXPECT_EQ(rx.frames.size(), 1u);
  EXPECT_EQ(r.net.stats(0).tx_errors, 1u);
}

// The same two descriptors in the other order: a writable one first, then the readable header
// and frame (readable after writable, which the chain walker refuses).
TEST(NetHostile, TxChainWithWritableDescriptorThenReadableFrame) {
  PortRig r;
  // The rig writes readable-then-writable; the first 64 bytes become the writable part, the
  // header and frame (written into the second buffer, 64 bytes on) the readable part.
  const Bytes out = header_and_frame(r.g, 200, 13);
  const auto slot = r.g.add_raw(0, Bytes(64, 0), {static_cast<std::uint32_t>(out.size())});
  ASSERT_TRUE(slot.has_value());
  const std::uint64_t gpa = r.g.slot_gpa(0, *slot);
  std::memcpy(r.g.host(gpa + 64), out.data(), out.size());
  virtio::VirtqDesc* desc = r.g.driver(0).split().desc();
  virtio::VirtqDesc* d0 = nullptr;
  for (std::uint16_t i = 0; i < r.g.ring_size(); ++i) {
    if (desc[i].addr == gpa && (desc[i].flags & virtio::kDescFNext) != 0) d0 = &desc[i];
  }
  ASSERT_NE(d0, nullptr);
  virtio::VirtqDesc& d1 = desc[d0->next];
  ASSERT_EQ(d1.addr, gpa + 64);
  d0->flags = static_cast<std::uint16_t>(d0->flags | virtio::kDescFWrite);
  d1.flags = static_cast<std::uint16_t>(d1.flags & ~virtio::kDescFWrite);
  r.g.kick(0);
  EXPECT_EQ(one_used_len(r.g, 0), 0u);
  EXPECT_EQ(r.net.stats(0).tx_errors, 1u);
  EXPECT_EQ(r.net.stats(0).tx_frames, 0u);
  EXPECT_TRUE(r.port->take_sent().empty());
  expect_port_still_serving(r);
  EXPECT_EQ(r.net.stats(0).tx_errors, 1u);
}

TEST(NetHostile, RxChainWithNoWritablePart) {
  LoopRig r;
  // A readable-only chain on the rx ring, then a good buffer.
  ASSERT_TRUE(r.g.add_raw(1, Bytes(64, 0xab)).has_value());
  Receiver rx(r.g, 1, {1526});
  ASSERT_TRUE(r.g.post_rx(1, 1526));
  r.g.kick(1);
  expect_still_serving(r, rx, 0);
  EXPECT_EQ(rx.empty_used, 1u);
  EXPECT_EQ(r.net.stats(0).rx_errors, 1u);
}

TEST(NetHostile, RxBufferSmallerThanHeader) {
  LoopRig r;
  ASSERT_TRUE(r.g.post_rx(1, 6));  // 6 writable bytes: the 12-byte header does not fit
  Receiver rx(r.g, 1, {1526});
  ASSERT_TRUE(r.g.post_rx(1, 1526));
  r.g.kick(1);
  expect_still_serving(r, rx, 0);
  EXPECT_EQ(rx.empty_used, 1u);
  EXPECT_EQ(r.net.stats(0).rx_errors, 1u);
}

TEST(NetHostile, HugeFrameWithoutMrgRxbuf) {
  LoopRig r(kBase | kEventIdx);  // no MRG_RXBUF: one rx chain per frame
  Receiver rx(r.g, 1, {1526});
  rx.refill();
  std::mt19937 rng(5);
  ASSERT_TRUE(r.g.send(0, random_frame(rng, 9000)));
  r.g.kick(0);
  ASSERT_TRUE(wait_tx_done(r.g, 0));
  const NetStats s = r.net.stats(0);
  EXPECT_EQ(s.tx_drops, 1u);
  EXPECT_EQ(s.rx_drops, 1u);
  EXPECT_EQ(s.rx_frames, 0u);
  expect_still_serving(r, rx, 0);
}

TEST(NetHostile, TxFrameLargerThanAnyGsoFrame) {
  LoopRig r;
  Receiver rx(r.g, 1, {1526});
  rx.refill();
  // 70,000 readable bytes in one chain (two descriptors): over the largest frame we move.
  std::vector<virtq::DriverQueue::Buffer> outs;
  for (int i = 0; i < 2; ++i) outs.push_back({r.g.slot_gpa(0, 200 + i), 35000});
  ASSERT_TRUE(r.g.driver(0).add(outs, {}, 0).has_value());
  r.g.kick(0);
  EXPECT_EQ(one_used_len(r.g, 0), 0u);
  EXPECT_EQ(r.net.stats(0).tx_errors, 1u);
  rx.poll();
  EXPECT_EQ(rx.frames.size(), 0u);
}

TEST(NetHostile, MergeableFrameWithRingRunningOutMidFrame) {
  LoopRig r;
  Receiver rx(r.g, 1, {1526});
  for (int i = 0; i < 2; ++i) ASSERT_TRUE(r.g.post_rx(1, 1526));  // 3 needed for 4000 bytes
  r.g.kick(1);
  std::mt19937 rng(6);
  ASSERT_TRUE(r.g.send(0, random_frame(rng, 4000)));
  r.g.kick(0);
  ASSERT_TRUE(wait_tx_done(r.g, 0));
  const NetStats s = r.net.stats(0);
  EXPECT_EQ(s.tx_drops, 1u);
  EXPECT_EQ(s.rx_drops, 1u);
  rx.poll();
  EXPECT_EQ(rx.frames.size(), 0u);
  EXPECT_EQ(rx.empty_used, 2u);  // both consumed chains came back empty
  rx.refill();
  expect_still_serving(r, rx, 0);
}

}  // namespace
}  // namespace vhostkit::net
