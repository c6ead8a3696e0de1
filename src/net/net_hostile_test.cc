// A hostile guest against NetDevice: malformed tx and rx chains cost that chain (used len 0,
// a counter), never the device; frames that cannot fit are dropped and counted.
#include <gtest/gtest.h>

#include "net_test_rig.h"
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
