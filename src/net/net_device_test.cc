// NetDevice on a real vhost::Device in one process: a DriverQueue guest on memfd memory,
// loopback and an in-memory port, kick/call eventfds.
#include "vhostkit/net/net_device.h"

#include <gtest/gtest.h>

#include <array>
#include <chrono>
#include <cstring>
#include <thread>

#include "testing/dirty_log.h"
#include "testing/net_rig.h"

namespace vhostkit::net {
namespace {

using namespace testing;
using vhost::PollMode;

// A precondition of serving rx rings under vhost::Device (see testing/net_rig.h). Fails until
// virtq's enable_notifications() returns "new chains since the last look".
TEST(NetPrecondition, EnableNotificationsReportsOnlyNewChains) {
  EXPECT_TRUE(enable_notifications_reports_only_new_chains());
}

struct LoopCase {
  PollMode mode;
  bool event_idx;
  bool mrg;
  std::size_t max_frame;
  std::uint32_t rx_buf;
};

class Loopback : public ::testing::TestWithParam<LoopCase> {};

// 10,000 frames of random sizes go out on tx and come back byte-exact on rx, MACs swapped.
TEST_P(Loopback, FramesComeBackExactWithMacsSwapped) {
  const LoopCase c = GetParam();
  const std::uint64_t f = kBase | (c.event_idx ? kEventIdx : 0) | (c.mrg ? kMrg : 0);
  NetDevice net(NetOptions{});
  vhost::Device dev(net, dev_opts(c.mode));
  Guest g(3, f);
  g.bring_up(dev);
  Receiver rx(g, 1, {c.rx_buf});
  rx.refill();
  std::mt19937 rng(42);
  std::vector<Bytes> sent;
  constexpr std::size_t kFrames = 10000, kBatch = 32;
  std::size_t multi = 0;
  while (sent.size() < kFrames) {
    // At most a batch in flight, and never more than the rx buffers can take.
    const std::size_t start = sent.size();
    for (std::size_t i = 0; i < kBatch && sent.size() < kFrames; ++i) {
      Bytes fr = random_frame(rng, 60 + rng() % (c.max_frame - 59));
      ASSERT_TRUE(g.send(0, fr, 1 + sent.size() % 3));
      sent.push_back(std::move(fr));
    }
    g.kick(0);
    ASSERT_TRUE(rx.wait_frames(sent.size())) << "got " << rx.frames.size() << " of " << sent.size();
    ASSERT_TRUE(wait_tx_done(g, 0));
    for (std::size_t i = start; i < sent.size(); ++i) {
      const RxFrame& r = rx.frames[i];
      ASSERT_EQ(r.data, mac_swapped(sent[i])) << "frame " << i << " len " << sent[i].size();
      if (r.num_buffers > 1) ++multi;
      for (std::size_t k = 0; k < 10; ++k) EXPECT_EQ(r.hdr[k], 0);
    }
    rx.refill();
  }
  const NetStats s = net.stats(0);
  EXPECT_EQ(s.tx_frames, kFrames);
  EXPECT_EQ(s.rx_frames, kFrames);
  EXPECT_EQ(s.tx_drops, 0u);
  EXPECT_EQ(s.tx_errors + s.rx_errors, 0u);
  EXPECT_EQ(rx.empty_used, 0u);
  if (c.max_frame > c.rx_buf) {
    EXPECT_GT(multi, 0u);
  }
  EXPECT_FALSE(dev.broken());
}

INSTANTIATE_TEST_SUITE_P(Modes, Loopback,
                         ::testing::Values(LoopCase{PollMode::event, true, false, 1514, 1526},
                                           LoopCase{PollMode::event, false, false, 1514, 1526},
                                           LoopCase{PollMode::busy, true, false, 1514, 1526},
                                           LoopCase{PollMode::adaptive, true, true, 1514, 1526},
                                           LoopCase{PollMode::event, true, true, 9000, 1526},
                                           LoopCase{PollMode::event, false, true, 9000, 1526},
                                           LoopCase{PollMode::busy, true, true, 9000, 1526}));

// The loopback writes an rx header only where the buffer does not hold it already, when the
// frame starts a line of its own (headroom 52: the compare); where the frame shares the header's
// line it writes it always (headroom 0). Either way, buffers posted with stale headers (a
// forwarding driver leaves num_buffers 0 in the ones it sent, 5.1.6.2; others differ in a byte of
// either half of the 12) come back with the header the device must write: no offload asked for,
// num_buffers 1.
class LoopbackHeader : public ::testing::TestWithParam<std::uint32_t> {};

TEST_P(LoopbackHeader, StaleHeadersInRxBuffersAreRewritten) {
  NetDevice net(NetOptions{});
  vhost::Device dev(net, dev_opts(PollMode::event));
  Guest g(3, kBase | kEventIdx | kMrg);
  g.rx_headroom = GetParam();
  g.bring_up(dev);
  ASSERT_EQ(g.hdr_len(), 12u);
  Receiver rx(g, 1, {2048});
  std::mt19937 rng(7);
  const std::array<std::pair<std::size_t, std::uint8_t>, 4> stale = {{
      {12, 0xa5},  // every byte
      {3, 0x01},   // one byte in the first eight
      {9, 0x80},   // the last byte of the 10-byte part
      {10, 0x00},  // num_buffers zeroed, as a driver sending the buffer out leaves it
  }};
  std::size_t sent = 0;
  for (const auto& [at, value] : stale) {
    // The header every buffer holds before it is posted: what the device writes, but for `at`.
    std::array<std::uint8_t, 12> hdr{};
    hdr[10] = 1;
    if (at == 12) {
      hdr.fill(value);
    } else {
      hdr[at] = value;
      if (at == 10) hdr[11] = value;
    }
    for (std::uint16_t slot = 0; slot < g.ring_size(); ++slot)
      std::memcpy(g.host(g.slot_gpa(1, slot) + g.rx_headroom), hdr.data(), hdr.size());
    rx.refill();
    for (int i = 0; i < 8; ++i) ASSERT_TRUE(g.send(0, random_frame(rng, 64)));
    g.kick(0);
    sent += 8;
    ASSERT_TRUE(rx.wait_frames(sent));
    ASSERT_TRUE(wait_tx_done(g, 0));
    for (std::size_t i = sent - 8; i < sent; ++i) {
      const RxFrame& f = rx.frames[i];
      ASSERT_EQ(f.hdr.size(), 12u);
      for (std::size_t k = 0; k < 10; ++k)
        EXPECT_EQ(f.hdr[k], 0) << "stale byte " << at << ", k " << k;
      EXPECT_EQ(f.num_buffers, 1) << "stale byte " << at;
    }
  }
  EXPECT_FALSE(dev.broken());
}
INSTANTIATE_TEST_SUITE_P(Headroom, LoopbackHeader, ::testing::Values(0u, 52u),
                         [](const ::testing::TestParamInfo<std::uint32_t>& i) {
                           return i.param == 0 ? "FrameSharesHeaderLine" : "FrameOnItsOwnLine";
                         });

// Live migration: LOG_ALL acked while the rings run, then frames looped back into 512-byte
// mergeable rx buffers (a frame over up to four chains). Against a shadow of guest memory taken
// when logging started: every page of the receiveq's buffers that the device changed is marked,
// and no page of the transmitq's buffers (the device only reads those). Both ring layouts: the
// packed ring's used descriptors live in its descriptor ring, which the device marks too.
struct Layout {
  const char* name;
  std::uint64_t ring;  // ring feature bits added to VERSION_1, EVENT_IDX and MRG_RXBUF
};
void PrintTo(const Layout& l, std::ostream* os) { *os << l.name; }
const Layout kLayouts[] = {{"split", 0}, {"packed_in_order", kPacked | kInOrder}};

class LoopbackDirtyLog : public ::testing::TestWithParam<Layout> {};

TEST_P(LoopbackDirtyLog, EveryPageTheDeviceWroteIsMarked) {
  const std::uint64_t f = kBase | kEventIdx | kMrg | GetParam().ring;
  NetDevice net(NetOptions{});
  vhost::Device dev(net, dev_opts(PollMode::event));
  dev.add_offered_features(virtio::bit(virtio::feature::log_all));
  Guest g(3, f);
  g.bring_up(dev);
  vhostkit::testing::SharedLog log(8192);  // 256 MiB of guest memory
  ASSERT_TRUE(log.ok());
  ASSERT_TRUE(dev.set_log_base(log.fd(), log.size(), 0));
  ASSERT_TRUE(dev.set_features(f | virtio::bit(virtio::feature::log_all)));
  const std::uint64_t rx_begin = g.slot_gpa(1, 0), rx_end = g.slot_gpa(2, 0);
  const std::uint64_t tx_begin = g.slot_gpa(0, 0), tx_end = rx_begin;
  const std::vector<std::uint8_t> shadow(g.host(rx_begin), g.host(rx_end));

  Receiver rx(g, 1, {512});
  rx.refill();
  std::mt19937 rng(7);
  std::size_t sent = 0;
  for (int round = 0; round < 20; ++round) {
    for (int i = 0; i < 16; ++i, ++sent) {
      ASSERT_TRUE(g.send(0, random_frame(rng, 60 + rng() % 1455)));
    }
    g.kick(0);
    ASSERT_TRUE(rx.wait_frames(sent));
    ASSERT_TRUE(wait_tx_done(g, 0));
    rx.refill();
  }
  std::size_t changed = 0;
  for (std::uint64_t gpa = rx_begin; gpa < rx_end; gpa += vhostkit::testing::SharedLog::kPage) {
    const std::size_t off = gpa - rx_begin;
    if (std::memcmp(g.host(gpa), shadow.data() + off, vhostkit::testing::SharedLog::kPage) == 0) {
      continue;
    }
    ++changed;
    EXPECT_TRUE(log.dirty(gpa)) << "rx page at gpa 0x" << std::hex << gpa << " written, not marked";
  }
  EXPECT_GT(changed, 20u);
  for (std::uint64_t gpa = tx_begin; gpa < tx_end; gpa += vhostkit::testing::SharedLog::kPage) {
    ASSERT_FALSE(log.dirty(gpa)) << "tx page at gpa 0x" << std::hex << gpa << " marked";
  }
  EXPECT_EQ(net.stats(0).rx_frames, sent);
}
INSTANTIATE_TEST_SUITE_P(Layouts, LoopbackDirtyLog, ::testing::ValuesIn(kLayouts),
                         [](const auto& i) { return std::string(i.param.name); });

TEST(LoopbackDrops, NoRxBuffersCountsDrops) {
  NetDevice net(NetOptions{});
  vhost::Device dev(net, dev_opts(PollMode::event));
  Guest g(3, kBase | kEventIdx | kMrg);
  g.bring_up(dev);
  std::mt19937 rng(1);
  for (int i = 0; i < 100; ++i) ASSERT_TRUE(g.send(0, random_frame(rng, 200)));
  g.kick(0);
  ASSERT_TRUE(wait_tx_done(g, 0));
  EXPECT_EQ(net.stats(0).tx_drops, 100u);
  EXPECT_EQ(net.stats(0).rx_frames, 0u);
  // Now with 50 buffers for 80 frames: 50 arrive, 30 more dropped.
  Receiver rx(g, 1, {1526});
  for (int i = 0; i < 50; ++i) ASSERT_TRUE(g.post_rx(1, 1526));
  g.kick(1);
  for (int i = 0; i < 80; ++i) ASSERT_TRUE(g.send(0, random_frame(rng, 300)));
  g.kick(0);
  ASSERT_TRUE(wait_tx_done(g, 0));
  ASSERT_TRUE(rx.wait_frames(50));
  const NetStats s = net.stats(0);
  EXPECT_EQ(s.tx_frames + s.tx_drops, 180u);
  EXPECT_EQ(s.rx_frames, 50u);
  EXPECT_EQ(s.tx_drops, 130u);
  // Each event counted once: the drops in the pair's counters, the chains in the queue's.
  EXPECT_EQ(dev.queue(1).stats().chains.load(), 180u);  // pair 0's transmitq
  EXPECT_EQ(dev.queue(1).stats().bytes.load(), 0u);
}

// Frames sent before the receiveq runs (testpmd's --tx-first can send before its rx ring is
// enabled) wait on the transmitq and come back once it starts, instead of being dropped.
TEST(LoopbackStart, FramesSentBeforeTheReceiveqRunsWaitForIt) {
  NetDevice net(NetOptions{});
  vhost::Device dev(net, dev_opts(PollMode::event));
  Guest g(3, kBase | kEventIdx | kMrg);
  g.prepare(dev);
  g.configure(dev, 0);  // the transmitq only
  std::mt19937 rng(7);
  std::vector<Bytes> sent;
  for (int i = 0; i < 20; ++i) {
    sent.push_back(random_frame(rng, 100 + i));
    ASSERT_TRUE(g.send(0, sent.back()));
  }
  ASSERT_TRUE(g.kick(0));
  // Until the worker has taken the kick: this is where the loopback used to drop the frames.
  const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (dev.queue(1).stats().kicks.load() == 0 && std::chrono::steady_clock::now() < until) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  ASSERT_EQ(dev.queue(1).stats().kicks.load(), 1u);
  // The receiveq starts with its buffers already there, as a driver posts them before it
  // enables the ring: the rig hands the ring over as it stands (resume base 0).
  g.init_driver(1);
  for (int i = 0; i < 32; ++i) ASSERT_TRUE(g.post_rx(1, 1526));
  ASSERT_TRUE(g.kick(1));  // published; no kick fd yet
  Receiver rx(g, 1, {1526});
  g.configure(dev, 1, true, std::uint16_t{0});
  ASSERT_TRUE(rx.wait_frames(20)) << "tx drops " << net.stats(0).tx_drops;
  ASSERT_TRUE(wait_tx_done(g, 0));
  const NetStats s = net.stats(0);
  EXPECT_EQ(s.tx_drops, 0u);
  EXPECT_EQ(s.tx_frames, 20u);
  EXPECT_EQ(s.rx_frames, 20u);
  ASSERT_EQ(rx.frames.size(), 20u);
  for (std::size_t i = 0; i < sent.size(); ++i) {
    EXPECT_EQ(rx.frames[i].data, mac_swapped(sent[i])) << "frame " << i;
  }
}

// The loopback pops a whole burst before delivering: malformed chains inside the burst are
// answered on their own, the good frames around them still come back, in order. With IN_ORDER
// a used descriptor stands for every chain before it, so the malformed ones are answered in
// their turn and the driver never reclaims a frame the device still reads (our driver checks
// each used id against what it holds in flight: bad_used).
class LoopbackBurst : public ::testing::TestWithParam<Layout> {};

TEST_P(LoopbackBurst, MalformedChainsInsideABurstLeaveTheRestInOrder) {
  NetDevice net(NetOptions{});
  vhost::Device dev(net, dev_opts(PollMode::event));
  Guest g(3, kBase | kEventIdx | kMrg | GetParam().ring);
  g.bring_up(dev);
  Receiver rx(g, 1, {1526});
  rx.refill();
  std::mt19937 rng(7);
  std::vector<Bytes> good;
  for (int i = 0; i < 30; ++i) {
    if (i % 5 == 2) {
      ASSERT_TRUE(g.add_raw(0, Bytes(8, 0)).has_value());  // shorter than header + Ethernet
      continue;
    }
    good.push_back(random_frame(rng, 60 + rng() % 1400));
    ASSERT_TRUE(g.send(0, good.back(), 1 + i % 2));
  }
  g.kick(0);
  ASSERT_TRUE(wait_tx_done(g, 0));
  ASSERT_TRUE(rx.wait_frames(good.size()));
  for (std::size_t i = 0; i < good.size(); ++i) {
    EXPECT_EQ(rx.frames[i].data, mac_swapped(good[i])) << "frame " << i;
  }
  const NetStats s = net.stats(0);
  EXPECT_EQ(s.tx_frames, good.size());
  EXPECT_EQ(s.tx_errors, 6u);
  EXPECT_EQ(s.tx_drops, 0u);
  EXPECT_FALSE(dev.broken());
  EXPECT_EQ(g.driver(0).bad_used(), 0u);
}
INSTANTIATE_TEST_SUITE_P(Layouts, LoopbackBurst, ::testing::ValuesIn(kLayouts),
                         [](const auto& i) { return std::string(i.param.name); });

TEST(NetDeviceConfig, FeaturesQueuesAndConfigSpace) {
  NetOptions o;
  o.mtu = 1500;
  o.queue_pairs = 2;
  NetDevice loop(std::move(o));
  EXPECT_EQ(loop.num_queues(), 5);
  const std::uint64_t f = loop.features();
  EXPECT_TRUE(virtio::has(f, nf::mq));
  EXPECT_TRUE(virtio::has(f, nf::mtu));
  EXPECT_TRUE(virtio::has(f, nf::mrg_rxbuf));
  EXPECT_TRUE(virtio::has(f, nf::ctrl_vq));
  EXPECT_TRUE(virtio::has(f, virtio::feature::ring_event_idx));
  EXPECT_FALSE(virtio::has(f, nf::csum));  // no vnet header in loopback
  std::uint8_t cfg[sizeof(virtio::VirtioNetConfig)];
  ASSERT_TRUE(loop.read_config(0, cfg).has_value());
  virtio::VirtioNetConfig c;
  std::memcpy(&c, cfg, sizeof c);
  EXPECT_EQ(c.mac[0], 0x52);
  EXPECT_EQ(c.status, virtio::kNetSLinkUp);
  EXPECT_EQ(c.max_virtqueue_pairs, 2);
  EXPECT_EQ(c.mtu, 1500);
  std::uint8_t two[2];
  ASSERT_TRUE(loop.read_config(8, two).has_value());
  EXPECT_EQ(two[0], 2);
  EXPECT_FALSE(loop.read_config(23, two).has_value());
  EXPECT_FALSE(loop.read_config(0xffffffffu, two).has_value());
  EXPECT_FALSE(loop.write_config(0, two).has_value());

  NetDevice one(NetOptions{});
  EXPECT_EQ(one.num_queues(), 3);
  EXPECT_FALSE(virtio::has(one.features(), nf::mq));
  EXPECT_FALSE(virtio::has(one.features(), nf::mtu));

  NetOptions t;
  t.port = std::make_unique<FakePort>(true);
  NetDevice tap(std::move(t));
  EXPECT_TRUE(virtio::has(tap.features(), nf::csum));
  EXPECT_TRUE(virtio::has(tap.features(), nf::guest_tso4));
  tap.set_features(kBase | bit(nf::guest_csum));
  EXPECT_EQ(static_cast<FakePort*>(tap.port())->offloads_set.load(), kBase | bit(nf::guest_csum));
  EXPECT_EQ(tap.hdr_len(), 12u);
  tap.set_features(0);
  EXPECT_EQ(tap.hdr_len(), 10u);

  NetOptions bad;
  bad.queue_pairs = 0;
  EXPECT_FALSE(NetDevice::create(std::move(bad)).has_value());
}

// ---- port ---------------------------------------------------------------------------------------

struct PortRig : DeviceRig {
  PortRig(bool vnet, std::uint64_t features, PollMode mode = PollMode::event)
      : DeviceRig(true, vnet, features, mode) {}
};

TEST(PortTx, FramesReachThePortWithoutHeader) {
  PortRig r(false, kBase | kEventIdx);
  std::mt19937 rng(3);
  std::vector<Bytes> sent;
  for (int i = 0; i < 100; ++i) {
    sent.push_back(random_frame(rng, 60 + rng() % 1455));
    ASSERT_TRUE(r.g.send(0, sent.back(), 1 + i % 3));
  }
  r.g.kick(0);
  ASSERT_TRUE(wait_tx_done(r.g, 0));
  auto got = r.port->take_sent();
  ASSERT_EQ(got.size(), sent.size());
  for (std::size_t i = 0; i < sent.size(); ++i) EXPECT_EQ(got[i], sent[i]);
  EXPECT_EQ(r.net.stats(0).tx_frames, 100u);
}

TEST(PortTx, VnetPortGetsTheGuestHeader) {
  PortRig r(true, kBase | kEventIdx);
  std::mt19937 rng(4);
  Bytes hdr(12, 0);
  hdr[0] = virtio::kNetHdrFNeedsCsum;
  hdr[6] = 34;  // csum_start
  hdr[8] = 16;  // csum_offset
  Bytes fr = random_frame(rng, 600);
  ASSERT_TRUE(r.g.send(0, fr, 3, &hdr));
  r.g.kick(0);
  ASSERT_TRUE(wait_tx_done(r.g, 0));
  auto got = r.port->take_sent();
  ASSERT_EQ(got.size(), 1u);
  Bytes want = hdr;
  want.insert(want.end(), fr.begin(), fr.end());
  EXPECT_EQ(got[0], want);
}

TEST(PortTx, LegacyHeaderIsWidenedForVnetPort) {
  PortRig r(true, kEventIdx);  // no VERSION_1, no MRG_RXBUF: 10-byte header
  std::mt19937 rng(5);
  Bytes hdr(10, 0);
  hdr[0] = virtio::kNetHdrFNeedsCsum;
  hdr[1] = 7;
  Bytes fr = random_frame(rng, 100);
  ASSERT_TRUE(r.g.send(0, fr, 2, &hdr));
  r.g.kick(0);
  ASSERT_TRUE(wait_tx_done(r.g, 0));
  auto got = r.port->take_sent();
  ASSERT_EQ(got.size(), 1u);
  ASSERT_EQ(got[0].size(), 12 + fr.size());
  EXPECT_EQ(got[0][0], virtio::kNetHdrFNeedsCsum);
  EXPECT_EQ(got[0][1], 7);
  EXPECT_EQ(Bytes(got[0].begin() + 12, got[0].end()), fr);
}

TEST(PortTx, RefusedSendsAreCountedDrops) {
  PortRig r(false, kBase | kEventIdx);
  r.port->refuse_sends = true;
  std::mt19937 rng(6);
  for (int i = 0; i < 10; ++i) ASSERT_TRUE(r.g.send(0, random_frame(rng, 100)));
  r.g.kick(0);
  ASSERT_TRUE(wait_tx_done(r.g, 0));
  EXPECT_EQ(r.net.stats(0).tx_drops, 10u);
  EXPECT_EQ(r.dev.queue(1).stats().chains.load(), 10u);  // pair 0's transmitq
  EXPECT_EQ(r.dev.queue(1).stats().bytes.load(), 0u);
}

class PortRx : public ::testing::TestWithParam<PollMode> {};

TEST_P(PortRx, FramesFromThePortReachTheGuest) {
  PortRig r(true, kBase | kEventIdx | kMrg, GetParam());
  Receiver rx(r.g, 1, {1526});
  rx.refill();
  std::mt19937 rng(7);
  std::vector<Bytes> frames;
  for (int i = 0; i < 200; ++i) {
    Bytes hdr(12, 0);
    hdr[0] = virtio::kNetHdrFDataValid;
    Bytes fr = random_frame(rng, 60 + rng() % 1455);
    frames.push_back(fr);
    hdr.insert(hdr.end(), fr.begin(), fr.end());
    r.port->inject(std::move(hdr));
    if (i % 50 == 49) {
      ASSERT_TRUE(rx.wait_frames(i + 1));
      rx.refill();
    }
  }
  ASSERT_EQ(rx.frames.size(), frames.size());
  for (std::size_t i = 0; i < frames.size(); ++i) {
    EXPECT_EQ(rx.frames[i].data, frames[i]);
    EXPECT_EQ(rx.frames[i].hdr[0], virtio::kNetHdrFDataValid);
    EXPECT_EQ(rx.frames[i].num_buffers, 1);
  }
  EXPECT_EQ(r.net.stats(0).rx_frames, 200u);
}

INSTANTIATE_TEST_SUITE_P(Modes, PortRx,
                         ::testing::Values(PollMode::event, PollMode::busy, PollMode::adaptive));

TEST(PortRxMerge, LargeFramesSpreadOverSeveralBuffers) {
  PortRig r(false, kBase | kEventIdx | kMrg);
  Receiver rx(r.g, 1, {1526});
  rx.refill();
  std::mt19937 rng(8);
  std::vector<Bytes> frames;
  for (int i = 0; i < 40; ++i) {
    frames.push_back(random_frame(rng, 1400 + rng() % 64000));
    r.port->inject(frames.back());
    ASSERT_TRUE(rx.wait_frames(i + 1));
    rx.refill();
  }
  for (std::size_t i = 0; i < frames.size(); ++i) {
    EXPECT_EQ(rx.frames[i].data, frames[i]) << i;
    EXPECT_EQ(rx.frames[i].num_buffers, (frames[i].size() + 12 + 1525) / 1526);
  }
}

TEST(PortRxMerge, WithoutMrgRxbufTooLargeFrameIsDropped) {
  PortRig r(false, kBase | kEventIdx);
  Receiver rx(r.g, 1, {1526});
  rx.refill();
  std::mt19937 rng(9);
  r.port->inject(random_frame(rng, 3000));
  const Bytes ok = random_frame(rng, 500);
  r.port->inject(ok);
  ASSERT_TRUE(rx.wait_frames(1));
  EXPECT_EQ(rx.frames[0].data, ok);
  EXPECT_EQ(r.net.stats(0).rx_drops, 1u);
  EXPECT_EQ(rx.empty_used, 1u);  // the chain the big frame consumed came back empty
}

// Returns once the worker has been through its loop twice after this call: anything that was
// ready when it was called (a readable fd, a posted announce) has been handled. A barrier, where
// a sleep would only make it likely.
void settle(vhost::Worker& w) {
  w.run_sync([] {});
  w.run_sync([] {});
}

// The port's rx side fails under a running device (its TAP interface was deleted): the worker
// must not spin on the fd that stays readable, and transmit goes on (into drops).
TEST(PortRxFlow, FailedPortIsNoLongerWatched) {
  PortRig r(false, kBase | kEventIdx | kMrg);
  Receiver rx(r.g, 1, {1526});
  rx.refill();
  r.port->fail_reads = true;
  r.port->poke();
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  while (r.net.stats(0).rx_errors == 0 && std::chrono::steady_clock::now() < deadline) {
    settle(r.dev.worker_for(1));
  }
  settle(r.dev.worker_for(1));
  const auto w0 = r.dev.worker_for(1).wakeups();
  // A spinning worker would wake thousands of times in 100 ms; a negative is watched a while.
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  EXPECT_LT(r.dev.worker_for(1).wakeups() - w0, 5u) << "worker spins on a failed port's fd";
  EXPECT_GE(r.net.stats(0).rx_errors, 1u);
  // The guest's transmit side still works; the frames reach the (still writable) port.
  std::mt19937 rng(12);
  ASSERT_TRUE(r.g.send(0, random_frame(rng, 100)));
  r.g.kick(0);
  ASSERT_TRUE(wait_tx_done(r.g, 0));
  EXPECT_FALSE(r.dev.broken());
}

// Frames wait but the guest has no buffers: the device must neither spin on the readable port
// fd nor lose the wake-up when buffers are posted.
TEST(PortRxFlow, EmptyRingStopsWatchingAndKickResumes) {
  PortRig r(false, kBase | kEventIdx | kMrg);
  std::mt19937 rng(10);
  std::vector<Bytes> frames;
  for (int i = 0; i < 10; ++i) {
    frames.push_back(random_frame(rng, 100));
    r.port->inject(frames.back());
  }
  settle(r.dev.worker_for(1));
  const auto w0 = r.dev.worker_for(1).wakeups();
  // A spinning worker would wake thousands of times in 100 ms; a negative is watched a while.
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  EXPECT_LT(r.dev.worker_for(1).wakeups() - w0, 5u) << "worker spins on a readable port fd";
  EXPECT_EQ(r.port->waiting(), 10u);
  Receiver rx(r.g, 1, {1526});
  for (int i = 0; i < 4; ++i) ASSERT_TRUE(r.g.post_rx(1, 1526));
  r.g.kick(1);
  ASSERT_TRUE(rx.wait_frames(4));
  // Ring empty again with 6 frames waiting; once more.
  settle(r.dev.worker_for(1));
  EXPECT_EQ(r.port->waiting(), 6u);
  rx.refill();
  ASSERT_TRUE(rx.wait_frames(10));
  for (int i = 0; i < 10; ++i) EXPECT_EQ(rx.frames[i].data, frames[i]);
  // And the port fd is watched again: a new frame arrives without a kick.
  frames.push_back(random_frame(rng, 77));
  r.port->inject(frames.back());
  ASSERT_TRUE(rx.wait_frames(11));
  EXPECT_EQ(rx.frames[10].data, frames.back());
}

// ---- control queue ------------------------------------------------------------------------------

struct CtrlRig {
  explicit CtrlRig(std::uint16_t pairs = 2)
      : net(make(pairs)),
        dev(net, dev_opts(PollMode::event)),
        g(2 * pairs + 1, kBase | kEventIdx | kCtrl | bit(nf::mq)) {
    g.bring_up(dev);
  }
  static NetOptions make(std::uint16_t pairs) {
    NetOptions o;
    o.queue_pairs = pairs;
    return o;
  }
  std::uint16_t ctrlq() const { return static_cast<std::uint16_t>(2 * net.queue_pairs()); }
  // Sends one command; returns {used len, ack byte}.
  std::pair<std::uint32_t, std::uint8_t> cmd(Bytes out, std::vector<std::uint32_t> in = {1}) {
    const std::uint16_t q = ctrlq();
    auto slot = g.add_raw(q, out, in);
    EXPECT_TRUE(slot.has_value());
    const std::uint64_t ack_gpa = g.slot_gpa(q, *slot) + ((out.size() + 63) & ~std::size_t{63});
    if (!in.empty()) *g.host(ack_gpa) = 0xee;
    g.kick(q);
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(2);
    while (std::chrono::steady_clock::now() < deadline) {
      auto used = g.reclaim(q);
      if (!used.empty()) return {used[0].len, in.empty() ? 0xee : *g.host(ack_gpa)};
      g.wait_call(q, 2);
    }
    ADD_FAILURE() << "no used element on the control queue";
    return {0, 0xee};
  }
  NetDevice net;
  vhost::Device dev;
  Guest g;
};

TEST(Ctrl, RxModeCommands) {
  CtrlRig r;
  EXPECT_EQ(r.cmd({0, 0, 1}), std::make_pair(1u, virtio::kNetCtrlOk));  // promisc on
  EXPECT_TRUE(r.net.promisc());
  EXPECT_EQ(r.cmd({0, 1, 1}), std::make_pair(1u, virtio::kNetCtrlOk));  // allmulti on
  EXPECT_TRUE(r.net.allmulti());
  EXPECT_EQ(r.cmd({0, 0, 0}), std::make_pair(1u, virtio::kNetCtrlOk));
  EXPECT_FALSE(r.net.promisc());
  EXPECT_EQ(r.cmd({0, 9, 1}).second, virtio::kNetCtrlErr);  // no such rx command
  EXPECT_EQ(r.cmd({0, 0}).second, virtio::kNetCtrlErr);     // missing on/off byte
}

TEST(Ctrl, MqPairsSet) {
  CtrlRig r(2);
  EXPECT_EQ(r.cmd({4, 0, 2, 0}).second, virtio::kNetCtrlOk);
  EXPECT_EQ(r.net.active_pairs(), 2);
  EXPECT_EQ(r.cmd({4, 0, 0, 0}).second, virtio::kNetCtrlErr);
  EXPECT_EQ(r.cmd({4, 0, 3, 0}).second, virtio::kNetCtrlErr);
  EXPECT_EQ(r.net.active_pairs(), 2);
  EXPECT_EQ(r.cmd({4, 0, 1, 0}).second, virtio::kNetCtrlOk);
  EXPECT_EQ(r.net.active_pairs(), 1);
}

TEST(Ctrl, MacCommandsAnnounceAndUnknown) {
  CtrlRig r;
  EXPECT_EQ(r.cmd({1, 1, 2, 0, 0, 0xaa, 0xbb, 0xcc}).second, virtio::kNetCtrlOk);
  EXPECT_EQ(r.net.mac()[5], 0xcc);
  EXPECT_EQ(r.cmd({1, 1, 2, 0}).second, virtio::kNetCtrlErr);  // short address
  // TABLE_SET: 1 unicast entry, 0 multicast entries.
  EXPECT_EQ(r.cmd({1, 0, 1, 0, 0, 0, 1, 2, 3, 4, 5, 6, 0, 0, 0, 0}).second, virtio::kNetCtrlOk);
  // TABLE_SET claiming 1000 entries it does not carry.
  EXPECT_EQ(r.cmd({1, 0, 0xe8, 3, 0, 0, 1, 2, 3, 4, 5, 6}).second, virtio::kNetCtrlErr);
  EXPECT_EQ(r.cmd({3, 0}).second, virtio::kNetCtrlOk);         // ANNOUNCE_ACK
  EXPECT_EQ(r.cmd({2, 0, 1, 0}).second, virtio::kNetCtrlErr);  // VLAN: not supported
  EXPECT_EQ(r.cmd({77, 1}).second, virtio::kNetCtrlErr);
  EXPECT_EQ(r.net.ctrl_errors(), 0u);
}

TEST(Ctrl, MalformedCommandsGetUsedLenZero) {
  CtrlRig r;
  EXPECT_EQ(r.cmd({0}).first, 0u);            // shorter than {class, cmd}
  EXPECT_EQ(r.cmd({0, 0, 1}, {}).first, 0u);  // nowhere to write the ack
  EXPECT_EQ(r.net.ctrl_errors(), 2u);
  EXPECT_EQ(r.cmd({0, 0, 1}).second, virtio::kNetCtrlOk);  // still serving
}

// ---- announce -----------------------------------------------------------------------------------

TEST(Announce, RarpFrameReachesPairZero) {
  NetDevice net(NetOptions{});
  vhost::Device dev(net, dev_opts(PollMode::event));
  Guest g(3, kBase | kEventIdx | kMrg);
  g.bring_up(dev);
  const std::uint8_t mac[6] = {0x52, 0x54, 0, 0xab, 0xcd, 0xef};
  Receiver rx(g, 1, {1526});
  net.announce(mac);  // no buffer yet: delivered when the guest posts one
  settle(dev.worker_for(1));
  rx.refill();
  ASSERT_TRUE(rx.wait_frames(1));
  const Bytes& f = rx.frames[0].data;
  ASSERT_EQ(f.size(), 60u);
  for (int i = 0; i < 6; ++i) {
    EXPECT_EQ(f[i], 0xff);
    EXPECT_EQ(f[6 + i], mac[i]);
    EXPECT_EQ(f[22 + i], mac[i]);
  }
  EXPECT_EQ(f[12], 0x80);
  EXPECT_EQ(f[13], 0x35);
  EXPECT_EQ(f[21], 3);
  // Once only.
  net.announce(mac);
  ASSERT_TRUE(rx.wait_frames(2));
  settle(dev.worker_for(1));
  rx.poll();
  EXPECT_EQ(rx.frames.size(), 2u);
}

// With a port, SEND_RARP's announce is for the network: the RARP leaves through the port (with
// a zero virtio_net_hdr on a vnet port), once, and the guest gets nothing.
class AnnouncePort : public ::testing::TestWithParam<bool> {};

TEST_P(AnnouncePort, RarpLeavesThroughThePortNotToTheGuest) {
  const bool vnet = GetParam();
  DeviceRig r(true, vnet, kBase | kEventIdx | kMrg);
  Receiver rx(r.g, 1, {1526});
  rx.refill();
  const std::uint8_t mac[6] = {0x52, 0x54, 0, 0x12, 0x34, 0x56};
  r.net.announce(mac);
  settle(r.dev.worker_for(1));
  auto sent = r.port->take_sent();
  ASSERT_EQ(sent.size(), 1u);
  const std::size_t h = vnet ? 12 : 0;
  const Bytes& f = sent[0];
  ASSERT_EQ(f.size(), h + 60);
  for (std::size_t i = 0; i < h; ++i) EXPECT_EQ(f[i], 0) << "header byte " << i;
  for (int i = 0; i < 6; ++i) {
    EXPECT_EQ(f[h + i], 0xff);
    EXPECT_EQ(f[h + 6 + i], mac[i]);
  }
  EXPECT_EQ(f[h + 12], 0x80);
  EXPECT_EQ(f[h + 13], 0x35);
  // Nothing for the guest, and nothing more for the port.
  std::mt19937 rng(3);
  const Bytes fr = random_frame(rng, 100);
  Bytes in(h, 0);
  in.insert(in.end(), fr.begin(), fr.end());
  r.port->inject(in);
  ASSERT_TRUE(rx.wait_frames(1));
  settle(r.dev.worker_for(1));
  rx.poll();
  ASSERT_EQ(rx.frames.size(), 1u);
  EXPECT_EQ(rx.frames[0].data, fr);
  EXPECT_TRUE(r.port->take_sent().empty());
}

INSTANTIATE_TEST_SUITE_P(Port, AnnouncePort, ::testing::Bool());

TEST(Announce, GuestAnnounceIsOffered) {
  NetDevice net(NetOptions{});
  EXPECT_TRUE(virtio::has(net.features(), nf::guest_announce));
}

}  // namespace
}  // namespace vhostkit::net
