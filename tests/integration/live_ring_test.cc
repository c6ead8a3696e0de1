// Rings stopped and started while frames flow, as QEMU does it while a guest runs:
//   - GET_VRING_BASE in the middle of a burst (vhost_dev_stop: a VM stop, a migration's last
//     phase, a device reset), then the ring started again from the returned index: it must
//     resume exactly where it stopped, no chain served twice, none skipped;
//   - SET_VRING_ENABLE 0/1 on some queue pairs (the guest changing its number of queue pairs
//     with VIRTIO_NET_CTRL_MQ) while the other pairs carry traffic.
#include <algorithm>
#include <atomic>
#include <vector>

#include <fmt/ranges.h>

#include "live_rig.h"

namespace vhostkit::live {
namespace {

std::uint16_t used_idx(NetDriver& s, std::uint16_t ring) {
  return std::atomic_ref<std::uint16_t>(s.session().ring(ring).vq.used()->idx)
      .load(std::memory_order_acquire);
}
std::uint16_t avail_idx(NetDriver& s, std::uint16_t ring) {
  return std::atomic_ref<std::uint16_t>(s.session().ring(ring).vq.avail()->idx)
      .load(std::memory_order_acquire);
}

enum class Stopped { tx, rx, both };

const char* name(Stopped s) {
  switch (s) {
    case Stopped::tx: return "transmitq";
    case Stopped::rx: return "receiveq";
    case Stopped::both: return "both";
  }
  return "unknown";
}
void PrintTo(Stopped s, std::ostream* os) { *os << name(s); }

class LiveVringBase : public ::testing::TestWithParam<Stopped> {};

TEST_P(LiveVringBase, StoppedMidBurstResumesFromTheReturnedBase) {
  const Stopped which = GetParam();
  std::vector<std::uint16_t> rings;  // QEMU stops them in index order: receiveq first
  if (which != Stopped::tx) rings.push_back(NetDriver::rx_index(0));
  if (which != Stopped::rx) rings.push_back(NetDriver::tx_index(0));

  NetBackend be(1, "vringbase");
  ASSERT_TRUE(be.listening);
  auto s = be.connect(1);
  ASSERT_TRUE(s) << s.error().message();
  NetDriver& fe = **s;
  Control ctl(fe.session().socket_fd());

  // Nothing may be lost whichever ring stops: the frames wait in the transmitq's avail ring,
  // stopped itself or held by the loopback until its receiveq runs again.
  PairDriver drv(fe, be.net, 0, /*exact=*/true);
  ASSERT_TRUE(drv.wait_progress(300)) << drv.describe();
  for (int round = 0; round < 8; ++round) {
    SCOPED_TRACE(fmt::format("round {}", round));
    std::array<std::uint32_t, 2> base{};
    for (std::uint16_t i : rings) {
      auto b = ctl.get_vring_base(i);
      ASSERT_TRUE(b) << "GET_VRING_BASE " << i << ": " << b.error().message();
      ASSERT_LE(*b, 0xffffu);
      EXPECT_FALSE(be.device.queue(i).started()) << "ring " << i;
      // Every chain the device took before it stopped was answered, and it took none the
      // driver had not made available.
      EXPECT_EQ(used_idx(fe, i), *b) << "ring " << i;
      EXPECT_LE(static_cast<std::uint16_t>(avail_idx(fe, i) - *b), fe.queue_size()) << "ring " << i;
      base[i] = *b;
    }
    // Let the driver run into the stopped ring(s): frames wait in the transmitq, stopped, or
    // running but held by the loopback for want of a receiveq.
    const std::uint16_t tx = NetDriver::tx_index(0);
    ASSERT_TRUE(eventually([&] {
      return static_cast<std::uint16_t>(avail_idx(fe, tx) - used_idx(fe, tx)) >= PairDriver::kBurst;
    })) << "no frames waiting in the transmitq: "
        << drv.describe();
    for (std::uint16_t i : rings) {
      auto r = ctl.restart_ring(fe.session(), i, base[i]);
      ASSERT_TRUE(r) << "restarting ring " << i << ": " << r.error().message();
      EXPECT_TRUE(be.device.queue(i).started()) << "ring " << i;
    }
    ASSERT_TRUE(drv.wait_progress(300)) << "after the restart: " << drv.describe();
  }
  ASSERT_TRUE(drv.stop()) << "frames neither received nor counted as dropped: " << drv.describe();
  EXPECT_EQ(drv.errors(), 0u) << drv.describe();
  // Sent == received + dropped, and (strictly increasing sequence numbers) none twice.
  EXPECT_EQ(drv.sent(), drv.received() + drv.drops()) << drv.describe();
  EXPECT_EQ(drv.drops(), 0u) << drv.describe();
  for (std::uint16_t i = 0; i < 2; ++i) {
    EXPECT_EQ(fe.session().ring(i).vq.bad_used(), 0u) << "ring " << i;
    EXPECT_FALSE(be.device.queue(i).broken()) << "ring " << i;
  }
  EXPECT_EQ(fe.stats(0).bad, 0u);
}

INSTANTIATE_TEST_SUITE_P(Rings, LiveVringBase,
                         ::testing::Values(Stopped::tx, Stopped::rx, Stopped::both),
                         [](const auto& i) { return std::string(name(i.param)); });

// Frames the device moved on pair qp, both ways: frozen while the pair is disabled.
std::uint64_t moved(const net::NetDevice& net, std::uint16_t qp) {
  const net::NetStats st = net.stats(qp);
  return st.tx_frames + st.tx_drops + st.tx_errors + st.rx_frames;
}

TEST(LiveMultiqueue, PairsDisabledAndEnabledWhileOthersCarryTraffic) {
  constexpr std::uint16_t kPairs = 4;
  NetBackend be(kPairs, "mq");
  ASSERT_TRUE(be.listening);
  auto s = be.connect(kPairs);
  ASSERT_TRUE(s) << s.error().message();
  NetDriver& fe = **s;
  Control ctl(fe.session().socket_fd());

  // Pair 0 is never disabled: every one of its frames must come back, in order. The others may
  // lose frames between their receiveq and transmitq being disabled (QEMU disables them in index
  // order, receiveq first), but only frames the device counted as dropped.
  std::vector<std::unique_ptr<PairDriver>> drv;
  for (std::uint16_t p = 0; p < kPairs; ++p) {
    drv.push_back(std::make_unique<PairDriver>(fe, be.net, p, /*exact=*/p == 0));
  }
  for (auto& d : drv) ASSERT_TRUE(d->wait_progress(200)) << d->describe();

  auto enable = [&](const std::vector<std::uint16_t>& pairs, bool on) -> Result<> {
    for (std::uint16_t p : pairs) {
      for (std::uint16_t i : {NetDriver::rx_index(p), NetDriver::tx_index(p)}) {
        if (auto r = ctl.request(vhost_user::SetVringEnable{.index = i, .num = on ? 1u : 0u}); !r) {
          return r;
        }
      }
    }
    return {};
  };
  const std::vector<std::vector<std::uint16_t>> steps = {{1}, {3}, {2, 3}, {1, 2, 3}, {2}, {1}};
  for (const auto& off : steps) {
    SCOPED_TRACE(fmt::format("pairs {} off", fmt::join(off, ",")));
    auto r = enable(off, false);
    ASSERT_TRUE(r) << r.error().message();
    std::array<std::uint64_t, kPairs> frozen{};
    for (std::uint16_t p : off) {
      EXPECT_FALSE(be.device.queue(NetDriver::rx_index(p)).started()) << "pair " << p;
      EXPECT_FALSE(be.device.queue(NetDriver::tx_index(p)).started()) << "pair " << p;
      frozen[p] = moved(be.net, p);
    }
    for (std::uint16_t p = 0; p < kPairs; ++p) {
      if (std::find(off.begin(), off.end(), p) != off.end()) continue;
      ASSERT_TRUE(drv[p]->wait_progress(300)) << "an enabled pair stalled: " << drv[p]->describe();
    }
    for (std::uint16_t p : off) {
      EXPECT_EQ(moved(be.net, p), frozen[p]) << "disabled pair " << p << " moved frames";
    }
    r = enable(off, true);
    ASSERT_TRUE(r) << r.error().message();
    for (std::uint16_t p : off) {
      EXPECT_TRUE(be.device.queue(NetDriver::tx_index(p)).started()) << "pair " << p;
      ASSERT_TRUE(drv[p]->wait_progress(300)) << "re-enabled pair stalled: " << drv[p]->describe();
    }
  }
  for (auto& d : drv) {
    ASSERT_TRUE(d->stop()) << "frames neither received nor counted as dropped: " << d->describe();
    EXPECT_EQ(d->errors(), 0u) << d->describe();
    EXPECT_EQ(d->sent(), d->received() + d->drops()) << d->describe();
  }
  EXPECT_EQ(drv[0]->drops(), 0u) << drv[0]->describe();
  for (std::uint16_t i = 0; i < 2 * kPairs; ++i) {
    EXPECT_EQ(fe.session().ring(i).vq.bad_used(), 0u) << "ring " << i;
    EXPECT_FALSE(be.device.queue(i).broken()) << "ring " << i;
  }
}

}  // namespace
}  // namespace vhostkit::live
