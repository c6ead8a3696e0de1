// NetDevice on packed rings (VIRTIO_F_RING_PACKED), with and without VIRTIO_F_IN_ORDER and
// mergeable rx buffers: the loopback and an in-memory port, every byte checked, and the
// options that refuse the features.
#include <gtest/gtest.h>

#include "testing/dirty_log.h"
#include "testing/net_rig.h"
#include "vhostkit/net/net_device.h"

namespace vhostkit::net {
namespace {

using namespace testing;
using vhost::PollMode;

struct PackedCase {
  PollMode mode;
  bool in_order;
  bool event_idx;
  bool mrg;
  std::size_t max_frame;
};

void PrintTo(const PackedCase& c, std::ostream* os) {
  *os << "mode " << static_cast<int>(c.mode) << (c.in_order ? " in_order" : "")
      << (c.event_idx ? " event_idx" : "") << (c.mrg ? " mrg" : "") << " max " << c.max_frame;
}

class PackedLoopback : public ::testing::TestWithParam<PackedCase> {};

// 3,000 frames of random sizes out on tx and back byte-exact on rx, MACs swapped, over a ring of
// 128 (the wrap counters flip many times on both rings).
TEST_P(PackedLoopback, FramesComeBackExact) {
  const PackedCase c = GetParam();
  const std::uint64_t f = kBase | kPacked | (c.in_order ? kInOrder : 0) |
                          (c.event_idx ? kEventIdx : 0) | (c.mrg ? kMrg : 0);
  NetDevice net(NetOptions{});
  vhost::Device dev(net, dev_opts(c.mode));
  Guest g(3, f, 128);
  g.bring_up(dev);
  ASSERT_TRUE(dev.queue(0).started());
  EXPECT_TRUE(dev.queue(0).packed());
  EXPECT_TRUE(dev.queue(1).packed());
  Receiver rx(g, 1, {1526});
  rx.refill();
  std::mt19937 rng(42);
  std::vector<Bytes> sent;
  constexpr std::size_t kFrames = 3000, kBatch = 16;  // 16 frames of 9000 B: 96 rx chains
  std::size_t multi = 0;
  while (sent.size() < kFrames) {
    const std::size_t start = sent.size();
    for (std::size_t i = 0; i < kBatch && sent.size() < kFrames; ++i) {
      Bytes fr = random_frame(rng, 60 + rng() % (c.max_frame - 59));
      ASSERT_TRUE(g.send(0, fr, 1 + sent.size() % 3));
      sent.push_back(std::move(fr));
    }
    g.kick(0);
    ASSERT_TRUE(rx.wait_frames(sent.size())) << "got " << rx.frames.size() << " of " << sent.size();
    ASSERT_TRUE(wait_tx_done(g, 0, 128));
    for (std::size_t i = start; i < sent.size(); ++i) {
      ASSERT_EQ(rx.frames[i].data, mac_swapped(sent[i])) << "frame " << i;
      if (rx.frames[i].num_buffers > 1) ++multi;
    }
    rx.refill();
  }
  const NetStats s = net.stats(0);
  EXPECT_EQ(s.tx_frames, kFrames);
  EXPECT_EQ(s.rx_frames, kFrames);
  EXPECT_EQ(s.tx_drops + s.tx_errors + s.rx_errors, 0u);
  EXPECT_EQ(rx.empty_used, 0u);
  EXPECT_EQ(g.driver(0).bad_used() + g.driver(1).bad_used(), 0u);
  if (c.max_frame > 1526) {
    EXPECT_GT(multi, 0u);
  }
  EXPECT_FALSE(dev.broken());
}

INSTANTIATE_TEST_SUITE_P(Modes, PackedLoopback,
                         ::testing::Values(PackedCase{PollMode::event, false, true, false, 1514},
                                           PackedCase{PollMode::event, true, true, false, 1514},
                                           PackedCase{PollMode::event, false, false, true, 9000},
                                           PackedCase{PollMode::event, true, true, true, 9000},
                                           PackedCase{PollMode::busy, true, true, true, 9000},
                                           PackedCase{PollMode::adaptive, false, true, true,
                                                      1514}));

// A port on packed rings with IN_ORDER: tx frames reach it in order, its frames reach the guest.
TEST(PackedPort, TxAndRxWithInOrder) {
  DeviceRig r(true, true, kBase | kPacked | kInOrder | kEventIdx | kMrg);
  ASSERT_TRUE(r.dev.queue(1).packed());
  std::mt19937 rng(3);
  std::vector<Bytes> sent;
  for (int i = 0; i < 300; ++i) {
    sent.push_back(random_frame(rng, 60 + rng() % 1455));
    ASSERT_TRUE(r.g.send(0, sent.back(), 1 + i % 3));
    if (i % 100 == 99) {
      r.g.kick(0);
      ASSERT_TRUE(wait_tx_done(r.g, 0));
    }
  }
  auto got = r.port->take_sent();
  ASSERT_EQ(got.size(), sent.size());
  for (std::size_t i = 0; i < sent.size(); ++i) {
    EXPECT_EQ(Bytes(got[i].begin() + 12, got[i].end()), sent[i]) << i;
  }
  Receiver rx(r.g, 1, {1526});
  rx.refill();
  std::vector<Bytes> frames;
  for (int i = 0; i < 300; ++i) {
    Bytes fr = random_frame(rng, 60 + rng() % 9000);
    frames.push_back(fr);
    Bytes hdr(12, 0);
    hdr.insert(hdr.end(), fr.begin(), fr.end());
    r.port->inject(std::move(hdr));
    if (i % 50 == 49) {
      ASSERT_TRUE(rx.wait_frames(i + 1));
      rx.refill();
    }
  }
  ASSERT_EQ(rx.frames.size(), frames.size());
  for (std::size_t i = 0; i < frames.size(); ++i) EXPECT_EQ(rx.frames[i].data, frames[i]) << i;
  EXPECT_EQ(r.net.stats(0).rx_frames, 300u);
  EXPECT_EQ(r.g.driver(1).bad_used(), 0u);
}

TEST(PackedFeatures, OfferedUnlessRefused) {
  NetDevice both(NetOptions{});
  EXPECT_TRUE(virtio::has(both.features(), virtio::feature::ring_packed));
  EXPECT_TRUE(virtio::has(both.features(), virtio::feature::in_order));
  NetOptions o;
  o.packed = false;
  o.in_order = false;
  NetDevice neither(std::move(o));
  EXPECT_FALSE(virtio::has(neither.features(), virtio::feature::ring_packed));
  EXPECT_FALSE(virtio::has(neither.features(), virtio::feature::in_order));
  // A device that refused the packed ring refuses a front-end asking for it.
  vhost::Device dev(neither, dev_opts(PollMode::event));
  ASSERT_TRUE(dev.set_owner().has_value());
  EXPECT_FALSE(dev.set_features(kBase | kPacked).has_value());
  EXPECT_TRUE(dev.set_features(kBase).has_value());
}

}  // namespace
}  // namespace vhostkit::net
