// NetDriver against a scripted fake back-end (testing/fake_backend.h) on a socketpair: its
// options, what it negotiates as a net driver (features, MQ, the MAC), the receive rings full
// before they start, and the data path against hand-written used entries (hostile ones too).
#include <gtest/gtest.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <functional>
#include <vector>

#include "testing/fake_backend.h"
#include "testing/fd_count.h"
#include "vhostkit/driver/net_driver.h"

namespace vhostkit::driver {
namespace {

using namespace std::chrono_literals;
using vhost_user::Channel;
using vhost_user::Request;
using vhostkit::testing::Action;
using vhostkit::testing::FakeBackend;
using vhostkit::testing::on;
using vhostkit::testing::open_fd_count;

constexpr std::uint64_t pbit(unsigned n) { return std::uint64_t{1} << n; }
constexpr std::uint64_t kOffered = kNetFeatures | virtio::bit(virtio::net_feature::mq) |
                                   virtio::bit(virtio::feature::ring_indirect_desc) |
                                   virtio::bit(virtio::net_feature::csum) |
                                   virtio::bit(virtio::feature::protocol_features);
constexpr std::uint64_t kOfferedProtocol =
    pbit(vhost_user::protocol_feature::mq) | pbit(vhost_user::protocol_feature::reply_ack) |
    pbit(vhost_user::protocol_feature::config) | pbit(vhost_user::protocol_feature::status);
constexpr std::uint8_t kMac[6] = {0x02, 0xaa, 0xbb, 0xcc, 0xdd, 0xee};

NetDriverOptions quick(Channel ch) {
  NetDriverOptions o;
  o.channel = std::move(ch);
  o.memory_size = 0;
  o.queue_size = 64;
  o.timeout = 300ms;
  return o;
}

// Connects through a fake back-end with `hook`; returns the result and the fake.
struct Attempt {
  std::unique_ptr<FakeBackend> fake;
  Result<std::unique_ptr<NetDriver>> session = fail(Errc::bad_state, "not run");
};
Attempt attempt(FakeBackend::Hook hook, std::function<void(NetDriverOptions&)> tweak = {},
                std::uint64_t offered = kOffered) {
  Attempt a;
  auto pair = vhost_user::socketpair();
  EXPECT_TRUE(pair);
  FakeBackend::Script script{.features = offered,
                             .protocol_features = kOfferedProtocol,
                             .config = std::vector<std::uint8_t>(kMac, kMac + 6)};
  a.fake =
      std::make_unique<FakeBackend>(std::move(pair->second), std::move(script), std::move(hook));
  NetDriverOptions o = quick(std::move(pair->first));
  if (tweak) tweak(o);
  a.session = NetDriver::connect(std::move(o));
  return a;
}

// ---- Options and negotiation ------------------------------------------------------------

TEST(NetDriverOptionsTest, RejectsBadValuesBeforeConnecting) {
  auto bad = [](std::function<void(NetDriverOptions&)> f, Errc code, const char* needle) {
    NetDriverOptions o;
    o.socket_path = "/nonexistent/dir/sock";
    f(o);
    auto s = NetDriver::connect(std::move(o));
    ASSERT_FALSE(s);
    EXPECT_EQ(s.error().code, code) << s.error().message();
    EXPECT_NE(s.error().message().find(needle), std::string::npos) << s.error().message();
  };
  bad([](auto& o) { o.socket_path.clear(); }, Errc::invalid_argument, "no socket path");
  bad([](auto& o) { o.queue_pairs = 0; }, Errc::out_of_range, "queue pairs 0");
  bad([](auto& o) { o.queue_pairs = 129; }, Errc::out_of_range, "queue pairs 129");
  bad([](auto& o) { o.queue_size = 100; }, Errc::invalid_argument, "queue size 100");
  bad([](auto& o) { o.queue_size = 0; }, Errc::invalid_argument, "queue size 0");
  bad([](auto& o) { o.buffer_size = 32; }, Errc::out_of_range, "buffer size 32");
  bad([](auto& o) { o.buffer_size = 70000; }, Errc::out_of_range, "buffer size 70000");
  bad([](auto& o) { o.memory_size = 4096; }, Errc::out_of_range, "memory size 4096 too small");
  bad([](auto& o) { o.timeout = 0ms; }, Errc::invalid_argument, "timeout");
}

TEST(NetDriverOptionsTest, TwoRingsPerPairAndABufferPerDescriptor) {
  NetDriverOptions o;
  o.socket_path = "/nonexistent/dir/sock";
  o.queue_pairs = 3;
  o.queue_size = 128;
  o.buffer_size = 4096;
  auto s = std::move(o).session_options();
  ASSERT_TRUE(s) << s.error().message();
  EXPECT_EQ(s->rings, 6u);
  EXPECT_EQ(s->ring_area_bytes, 128u * 4096);
  EXPECT_EQ(s->queues.count, 3u);
  EXPECT_EQ(s->features, kNetFeatures | virtio::bit(virtio::net_feature::mq));
  EXPECT_EQ(s->drivable, kNetDrivableFeatures);
}

// A 64-byte buffer passes the options, but not once a 12-byte header is negotiated.
TEST(NetDriverOptionsTest, BufferTooSmallForTheNegotiatedHeader) {
  const std::size_t before = open_fd_count();
  {
    Attempt a = attempt({}, [](NetDriverOptions& o) { o.buffer_size = 64; });
    ASSERT_FALSE(a.session);
    EXPECT_NE(a.session.error().message().find("buffer size 64 can't hold a 12-byte header"),
              std::string::npos)
        << a.session.error().message();
    for (auto [r, flags] : a.fake->seen()) EXPECT_NE(r, Request::set_vring_num);
  }
  EXPECT_EQ(open_fd_count(), before);
}

// Aligning received frames to a cache line takes 52 bytes of each rx buffer (64 less the header).
TEST(NetDriverOptionsTest, AlignedRxFramesNeedRoomForTheHeadroom) {
  const std::size_t before = open_fd_count();
  {
    Attempt a = attempt({}, [](NetDriverOptions& o) {
      o.buffer_size = 100;  // a header and a minimal frame, but not 52 bytes more
      o.align_rx_frames = true;
    });
    ASSERT_FALSE(a.session);
    EXPECT_NE(a.session.error().message().find(
                  "buffer size 100 can't hold 52 bytes of headroom, a 12-byte header"),
              std::string::npos)
        << a.session.error().message();
  }
  EXPECT_EQ(open_fd_count(), before);
}

TEST(NetDriverNegotiation, AcksOnlyWhatIsWantedOfferedAndDrivable) {
  // Ask for INDIRECT and CSUM too: offered, but not something this driver drives.
  Attempt a = attempt({}, [](NetDriverOptions& o) {
    o.features = kNetFeatures | virtio::bit(virtio::feature::ring_indirect_desc) |
                 virtio::bit(virtio::net_feature::csum) |
                 virtio::bit(virtio::net_feature::guest_tso4);
  });
  ASSERT_TRUE(a.session) << a.session.error().message();
  auto& f = **a.session;
  EXPECT_EQ(f.session().offered_features(), kOffered);
  EXPECT_EQ(f.features(), kNetFeatures | virtio::bit(virtio::feature::protocol_features));
  EXPECT_EQ(a.fake->set_features(), f.features());
  EXPECT_EQ(f.net_hdr_len(), 12u);
  EXPECT_EQ(f.max_frame(), 2048u - 12);
  auto mac = f.mac();
  ASSERT_TRUE(mac) << mac.error().message();
  EXPECT_EQ(std::memcmp(mac->data(), kMac, 6), 0);
}

TEST(NetDriverNegotiation, MacNeedsTheFeature) {
  Attempt a = attempt({}, [](NetDriverOptions& o) {
    o.features = kNetFeatures & ~virtio::bit(virtio::net_feature::mac);
  });
  ASSERT_TRUE(a.session) << a.session.error().message();
  auto mac = (*a.session)->mac();
  ASSERT_FALSE(mac);
  EXPECT_NE(mac.error().message().find("VIRTIO_NET_F_MAC"), std::string::npos);
}

TEST(NetDriverNegotiation, MqOnlyWhenMoreThanOnePair) {
  Attempt one = attempt({});
  ASSERT_TRUE(one.session);
  EXPECT_FALSE(virtio::has((*one.session)->features(), virtio::net_feature::mq));
  Attempt two = attempt({}, [](NetDriverOptions& o) { o.queue_pairs = 2; });
  ASSERT_TRUE(two.session) << two.session.error().message();
  EXPECT_TRUE(virtio::has((*two.session)->features(), virtio::net_feature::mq));
  EXPECT_EQ((*two.session)->session().num_rings(), 4);
}

TEST(NetDriverNegotiation, QueueNumBelowPairs) {
  const std::size_t before = open_fd_count();
  {
    Attempt a = attempt(on(Request::get_queue_num,
                           [](Channel& ch, const vhost_user::Header&) {
                             (void)ch.send(vhost_user::reply_u64(Request::get_queue_num, 1));
                             return Action::handled;
                           }),
                        [](NetDriverOptions& o) { o.queue_pairs = 2; });
    ASSERT_FALSE(a.session);
    EXPECT_NE(a.session.error().message().find(
                  "GET_QUEUE_NUM: the back-end has 1 queues, 2 queue pairs wanted"),
              std::string::npos)
        << a.session.error().message();
  }
  EXPECT_EQ(open_fd_count(), before);
}

TEST(NetDriverNegotiation, MqWantedButNotOffered) {
  const std::size_t before = open_fd_count();
  {
    Attempt a = attempt(
        {}, [](NetDriverOptions& o) { o.queue_pairs = 2; },
        kOffered & ~virtio::bit(virtio::net_feature::mq));
    ASSERT_FALSE(a.session);
    EXPECT_NE(a.session.error().message().find("VIRTIO_NET_F_MQ"), std::string::npos);
  }
  EXPECT_EQ(open_fd_count(), before);
}

// The receive rings are full when the back-end first sees them, and kicked once for it; the
// transmit rings start empty with every buffer free.
TEST(NetDriverNegotiation, ReceiveRingsStartFull) {
  Attempt a = attempt({});
  ASSERT_TRUE(a.session);
  auto& s = **a.session;
  auto& proto = s.session();
  EXPECT_EQ(proto.ring(NetDriver::rx_index(0)).vq.free_count(), 0);
  EXPECT_EQ(proto.ring(NetDriver::rx_index(0)).vq.avail()->idx, 64);
  EXPECT_EQ(proto.ring(NetDriver::rx_index(0)).kicks, 1u);
  EXPECT_EQ(s.rx_ring(0).free_top, 0);
  EXPECT_EQ(proto.ring(NetDriver::tx_index(0)).vq.free_count(), 64);
  EXPECT_EQ(proto.ring(NetDriver::tx_index(0)).kicks, 0u);
  EXPECT_EQ(s.tx_ring(0).free_top, 64);
}

// ---- Data path against hand-written used entries ------------------------------------------

// Plays the device on ring `r` of a connected session: marks `id` used with `len` bytes.
void push_used(NetRing& r, std::uint32_t id, std::uint32_t len) {
  virtq::DriverQueue& vq = r.ring->vq;
  virtio::VirtqUsed* used = vq.used();
  const std::uint16_t idx =
      std::atomic_ref<std::uint16_t>(used->idx).load(std::memory_order_relaxed);
  used->ring[idx % vq.size()] = virtio::VirtqUsedElem{id, len};
  // Release: the element above is visible before the new idx.
  std::atomic_ref<std::uint16_t>(used->idx).store(idx + 1, std::memory_order_release);
}

// The descriptor of head `id` on an rx ring: where its buffer is in our memory.
std::uint8_t* rx_buffer(NetDriver& s, NetRing& r, std::uint16_t id) {
  return s.session().memory().data() + r.ring->vq.desc()[id].addr;
}

void set_num_buffers(std::uint8_t* buf, std::uint16_t n) { std::memcpy(buf + 10, &n, 2); }

TEST(NetDriverDataPath, TxStopsWhenFullAndCountsOversize) {
  Attempt a = attempt({});
  ASSERT_TRUE(a.session);
  auto& s = **a.session;
  std::vector<std::uint8_t> frame(100, 0x5a);
  std::vector<std::uint8_t> big(s.max_frame() + 1, 0x5a);
  std::vector<std::span<const std::uint8_t>> frames(70, frame);
  frames[3] = big;
  // 64 buffers: 63 normal frames fit, the oversize one is dropped and counted as consumed.
  EXPECT_EQ(s.tx_burst(0, frames), 65u);
  EXPECT_EQ(s.stats(NetDriver::tx_index(0)).frames, 64u);
  EXPECT_EQ(s.stats(NetDriver::tx_index(0)).oversize, 1u);
  EXPECT_EQ(s.tx_burst(0, frames), 0u);
  EXPECT_GT(s.stats(NetDriver::tx_index(0)).full, 0u);
  // The device hands one chain back: one more frame fits.
  push_used(s.tx_ring(0), s.tx_ring(0).ring->vq.avail()->ring[0], 0);
  EXPECT_EQ(s.tx_burst(0, std::span(frames).first(2)), 1u);
  EXPECT_EQ(s.stats(NetDriver::tx_index(0)).completed, 1u);
}

TEST(NetDriverDataPath, RxDeliversAndRefills) {
  Attempt a = attempt({});
  ASSERT_TRUE(a.session);
  auto& s = **a.session;
  NetRing& r = s.rx_ring(0);
  EXPECT_EQ(r.ring->vq.free_count(), 0);  // every buffer posted at setup
  const std::uint16_t head = r.ring->vq.avail()->ring[0];
  std::uint8_t* buf = rx_buffer(s, r, head);
  std::memset(buf, 0, 12);
  set_num_buffers(buf, 1);
  for (int i = 0; i < 80; ++i) buf[12 + i] = static_cast<std::uint8_t>(i);
  push_used(r, head, 92);
  std::vector<std::uint8_t> got;
  EXPECT_EQ(
      s.rx_burst(0, 32, [&](std::span<const std::uint8_t> f) { got.assign(f.begin(), f.end()); }),
      1u);
  ASSERT_EQ(got.size(), 80u);
  EXPECT_EQ(got[79], 79);
  EXPECT_EQ(r.ring->vq.free_count(), 0);  // the buffer went straight back on the ring
  EXPECT_EQ(s.stats(NetDriver::rx_index(0)).bytes, 80u);
}

TEST(NetDriverDataPath, RxShorterThanHeaderIsCountedNotDelivered) {
  Attempt a = attempt({});
  ASSERT_TRUE(a.session);
  auto& s = **a.session;
  NetRing& r = s.rx_ring(0);
  push_used(r, r.ring->vq.avail()->ring[0], 5);
  EXPECT_EQ(s.rx_burst(0, 32, [](auto) { FAIL() << "delivered a runt"; }), 0u);
  EXPECT_EQ(s.stats(NetDriver::rx_index(0)).bad, 1u);
  EXPECT_EQ(r.ring->vq.free_count(), 0);
}

TEST(NetDriverDataPath, RxNumBuffersZeroOrHugeIsBad) {
  Attempt a = attempt({});
  ASSERT_TRUE(a.session);
  auto& s = **a.session;
  NetRing& r = s.rx_ring(0);
  const std::uint16_t h0 = r.ring->vq.avail()->ring[0], h1 = r.ring->vq.avail()->ring[1];
  set_num_buffers(rx_buffer(s, r, h0), 0);
  set_num_buffers(rx_buffer(s, r, h1), 1000);
  push_used(r, h0, 100);
  push_used(r, h1, 100);
  EXPECT_EQ(s.rx_burst(0, 32, [](auto) { FAIL() << "delivered a bad frame"; }), 0u);
  EXPECT_EQ(s.stats(NetDriver::rx_index(0)).bad, 2u);
}

TEST(NetDriverDataPath, RxUsedIdOutOfRangeIsIgnored) {
  Attempt a = attempt({});
  ASSERT_TRUE(a.session);
  auto& s = **a.session;
  NetRing& r = s.rx_ring(0);
  push_used(r, 9999, 100);
  EXPECT_EQ(s.rx_burst(0, 32, [](auto) { FAIL() << "delivered"; }), 0u);
  EXPECT_EQ(r.ring->vq.bad_used(), 1u);
}

TEST(NetDriverDataPath, RxMergeableFrameIsGathered) {
  Attempt a = attempt({});
  ASSERT_TRUE(a.session);
  auto& s = **a.session;
  NetRing& r = s.rx_ring(0);
  ASSERT_TRUE(virtio::has(s.features(), virtio::net_feature::mrg_rxbuf));
  std::uint16_t heads[3];
  for (int i = 0; i < 3; ++i) heads[i] = r.ring->vq.avail()->ring[i];
  // 3 buffers: header + 2036 bytes, 2048, 100 = a 4184-byte frame.
  std::vector<std::uint8_t> want;
  for (int i = 0; i < 3; ++i) {
    std::uint8_t* b = rx_buffer(s, r, heads[i]);
    const std::size_t off = i == 0 ? 12 : 0;
    const std::size_t len = i == 2 ? 100 : 2048;
    if (i == 0) {
      std::memset(b, 0, 12);
      set_num_buffers(b, 3);
    }
    for (std::size_t k = off; k < len; ++k) {
      b[k] = static_cast<std::uint8_t>(k * 3 + i);
      want.push_back(b[k]);
    }
  }
  push_used(r, heads[0], 2048);
  push_used(r, heads[1], 2048);
  // The last piece is not there yet: nothing delivered, the frame waits.
  EXPECT_EQ(s.rx_burst(0, 32, [](auto) { FAIL() << "delivered half a frame"; }), 0u);
  push_used(r, heads[2], 100);
  std::vector<std::uint8_t> got;
  EXPECT_EQ(
      s.rx_burst(0, 32, [&](std::span<const std::uint8_t> f) { got.assign(f.begin(), f.end()); }),
      1u);
  EXPECT_EQ(got, want);
  EXPECT_EQ(s.stats(NetDriver::rx_index(0)).bad, 0u);
}

TEST(NetDriverDataPath, InertAfterStop) {
  Attempt a = attempt({});
  ASSERT_TRUE(a.session);
  auto& s = **a.session;
  ASSERT_TRUE(s.stop());
  std::vector<std::uint8_t> frame(100, 0x5a);
  std::vector<std::span<const std::uint8_t>> frames(1, frame);
  EXPECT_EQ(s.tx_burst(0, frames), 0u);
  EXPECT_EQ(s.rx_burst(0, 32, [](auto) { FAIL() << "delivered"; }), 0u);
  EXPECT_EQ(s.stats(NetDriver::tx_index(0)).frames, 0u);
}

}  // namespace
}  // namespace vhostkit::driver
