// Our net driver against our back-end in one process: NetDriver (on FrontendSession) <->
// BackendSession / BackendServer over a socketpair and over socket paths, with a loopback
// net-like device that moves each frame from a pair's transmitq into its receiveq.
#include <fmt/format.h>
#include <gtest/gtest.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <array>
#include <atomic>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <thread>
#include <vector>

#include "testing/fd_count.h"
#include "testing/sockets.h"
#include "vhostkit/driver/net_driver.h"
#include "vhostkit/vhost/backend.h"
#include "vhostkit/vhost/device.h"
#include "vhostkit/vhost_user/backend_session.h"
#include "vhostkit/vhost_user/server.h"
#include "vhostkit/virtio/net.h"

namespace vhostkit::driver {
namespace {

using namespace std::chrono_literals;
using vhost_user::BackendServer;
using vhost_user::BackendSession;
using vhost_user::Channel;
using vhost_user::ServerOptions;
using vhostkit::testing::open_fd_count;
namespace protocol_feature = vhost_user::protocol_feature;

constexpr std::array<std::uint8_t, 6> kMac{0x02, 0x11, 0x22, 0x33, 0x44, 0x55};

// Polls `done` until it holds or `limit` passes: the limit only bounds a failure (the other side
// is a thread of this process; on a loaded host it may be off its core for a while).
template <class F>
bool eventually(F&& done, std::chrono::milliseconds limit = 20s) {
  const auto deadline = std::chrono::steady_clock::now() + limit;
  while (!done()) {
    if (std::chrono::steady_clock::now() >= deadline) return false;
    std::this_thread::sleep_for(1ms);
  }
  return true;
}

// Each pair's transmitq chains are copied (header and all) into a receiveq buffer of the same
// pair, num_buffers set to 1. Both rings of a pair run on one worker (queues_per_worker 2).
class LoopbackBackend : public vhost::DeviceBackend {
 public:
  explicit LoopbackBackend(std::uint16_t pairs) : pairs_(pairs), pairs_state_(pairs) {}
  void attach(vhost::Device* d) { dev_ = d; }

  std::uint64_t features() const noexcept override {
    return kNetFeatures | virtio::bit(virtio::net_feature::mq) |
           virtio::bit(virtio::feature::ring_indirect_desc) |
           virtio::bit(virtio::net_feature::csum);
  }
  std::uint16_t num_queues() const noexcept override { return 2 * pairs_; }
  Result<> read_config(std::uint32_t offset, std::span<std::uint8_t> out) const override {
    virtio::VirtioNetConfig c{};
    std::memcpy(c.mac, kMac.data(), 6);
    c.status = virtio::kNetSLinkUp;
    c.max_virtqueue_pairs = pairs_;
    if (offset > sizeof c || out.size() > sizeof c - offset) {
      return fail(Errc::out_of_range, "config read past the end");
    }
    std::memcpy(out.data(), reinterpret_cast<const std::uint8_t*>(&c) + offset, out.size());
    return {};
  }
  void set_features(std::uint64_t acked) noexcept override { acked_ = acked; }

  // Receive buffers are popped as soon as they are posted and kept here until a frame fills
  // them: a ring whose chains stay available would never let the worker go back to sleep.
  void queue_stopped(vhost::Queue& q, vhost::Worker&) override {
    pairs_state_[q.index() / 2].count = 0;
  }

  bool handle_queue(vhost::Queue& q) noexcept override {
    // virtio-net numbering: 2p is pair p's receiveq, 2p+1 its transmitq.
    const std::uint16_t rx_index = q.index() & ~1u;
    vhost::Queue& rx = dev_->queue(rx_index);
    vhost::Queue& tx = dev_->queue(rx_index + 1);
    PairState& ps = pairs_state_[rx_index / 2];
    bool did = false;
    std::array<iovec, 8> tsegs, rsegs;
    if (rx.started()) {
      auto& rxq = rx.vq();
      while (ps.count < ps.stash.size() && rxq.pending() > 0) {
        auto r = rxq.pop(rsegs);
        did = true;
        if (!r) {
          if (virtq::breaks_queue(r.error())) break;
          continue;
        }
        if (r->writable.empty()) {
          rxq.push_used(r->head, 0);
          continue;
        }
        ps.stash[(ps.first + ps.count++) % ps.stash.size()] = Slot{r->head, r->writable[0]};
      }
    }
    if (!tx.started() || !rx.started()) return did;
    auto& txq = tx.vq();
    auto& rxq = rx.vq();
    bool moved = false;
    for (int n = 0; n < 64 && ps.count > 0 && txq.pending() > 0; ++n) {
      auto t = txq.pop(tsegs);
      did = true;
      if (!t) {
        if (virtq::breaks_queue(t.error())) break;
        continue;
      }
      const Slot slot = ps.stash[ps.first];
      ps.first = (ps.first + 1) % ps.stash.size();
      --ps.count;
      std::size_t copied = 0;
      for (const iovec& seg : t->readable) {
        const std::size_t k = std::min(seg.iov_len, slot.buf.iov_len - copied);
        std::memcpy(static_cast<char*>(slot.buf.iov_base) + copied, seg.iov_base, k);
        copied += k;
      }
      if (copied >= 12) {
        const std::uint16_t one = 1;  // num_buffers
        std::memcpy(static_cast<char*>(slot.buf.iov_base) + 10, &one, 2);
      }
      rxq.push_used(slot.head, static_cast<std::uint32_t>(copied));
      txq.push_used(t->head, 0);
      moved = true;
      frames_.fetch_add(1, std::memory_order_relaxed);
    }
    if (did) tx.publish_and_notify();
    if (moved) rx.publish_and_notify();
    return did;
  }

  std::uint64_t frames() const { return frames_.load(); }
  std::uint64_t acked() const { return acked_; }

 private:
  struct Slot {
    std::uint16_t head = 0;
    iovec buf{};
  };
  struct PairState {
    std::vector<Slot> stash = std::vector<Slot>(virtio::kMaxQueueSize);
    std::size_t first = 0;
    std::size_t count = 0;
  };
  std::uint16_t pairs_;
  std::vector<PairState> pairs_state_;
  vhost::Device* dev_ = nullptr;
  std::atomic<std::uint64_t> frames_{0};
  std::uint64_t acked_ = 0;
};

// A loopback device with its vhost::Device.
struct Rig {
  explicit Rig(std::uint16_t pairs = 1, vhost::PollMode mode = vhost::PollMode::event)
      : backend(pairs), device(backend, vhost::DeviceOptions{.name = "pair", .mode = mode}) {
    backend.attach(&device);
  }
  LoopbackBackend backend;
  vhost::Device device;
};

struct StopFd {
  UniqueFd fd{::eventfd(0, EFD_CLOEXEC)};
  void fire() {
    const std::uint64_t one = 1;
    ASSERT_EQ(::write(fd.get(), &one, sizeof one), 8);
  }
};

// A back-end session on its own thread over one end of a socketpair.
struct SessionThread {
  SessionThread(vhost::Device& dev, Channel ch) : session(dev, std::move(ch)) {
    thread = std::thread([this] { result = session.run(stop.fd.get()); });
  }
  ~SessionThread() {
    stop.fire();
    if (thread.joinable()) thread.join();
  }
  BackendSession session;
  StopFd stop;
  Result<> result;
  std::thread thread;
};

std::string temp_sock(const char* tag) {
  return fmt::format("/tmp/vk-pair-{}-{}-{}.sock", tag, ::getpid(), std::rand());
}

// A frame of `len` bytes whose content identifies `seq`.
std::vector<std::uint8_t> make_frame(std::uint32_t seq, std::size_t len) {
  std::vector<std::uint8_t> f(len);
  for (std::size_t i = 0; i < len; ++i) f[i] = static_cast<std::uint8_t>(seq * 31 + i * 7);
  std::memcpy(f.data(), &seq, sizeof seq);
  return f;
}

// Sends `count` frames on pair qp and checks each comes back byte-exact and in order.
void exchange(NetDriver& s, std::uint16_t qp, std::uint32_t count, bool event) {
  std::uint32_t sent = 0, received = 0;
  const auto deadline = std::chrono::steady_clock::now() + 60s;
  std::vector<std::vector<std::uint8_t>> burst;
  while (received < count) {
    ASSERT_LT(std::chrono::steady_clock::now(), deadline)
        << "sent " << sent << " received " << received;
    if (sent < count && sent - received < 128) {
      burst.clear();
      for (std::uint32_t k = 0; k < 32 && sent + k < count; ++k) {
        burst.push_back(make_frame(sent + k, 60 + (sent + k) * 13 % 1455));
      }
      std::vector<std::span<const std::uint8_t>> spans(burst.begin(), burst.end());
      sent += static_cast<std::uint32_t>(s.tx_burst(qp, spans));
    }
    const std::size_t got = s.rx_burst(qp, 64, [&](std::span<const std::uint8_t> f) {
      const auto want = make_frame(received, 60 + received * 13 % 1455);
      ASSERT_EQ(f.size(), want.size()) << "frame " << received;
      ASSERT_EQ(std::memcmp(f.data(), want.data(), want.size()), 0) << "frame " << received;
      ++received;
    });
    if (got == 0 && (sent - received >= 128 || sent == count)) {
      if (event) s.wait_call(NetDriver::rx_index(qp), 10ms);
    }
  }
  EXPECT_EQ(s.stats(NetDriver::rx_index(qp)).bad, 0u);
  EXPECT_EQ(s.stats(NetDriver::tx_index(qp)).oversize, 0u);
}

NetDriverOptions opts_on(Channel ch) {
  NetDriverOptions o;
  o.channel = std::move(ch);
  o.memory_size = 0;
  return o;
}

TEST(NetDriverPair, NegotiatesOverSocketpair) {
  Rig rig;
  auto pair = vhost_user::socketpair();
  ASSERT_TRUE(pair);
  SessionThread backend(rig.device, std::move(pair->second));
  auto s = NetDriver::connect(opts_on(std::move(pair->first)));
  ASSERT_TRUE(s) << s.error().message();
  auto& f = **s;
  // The session adds the transport's bits: PROTOCOL_FEATURES and LOG_ALL (live migration).
  const std::uint64_t transport =
      virtio::bit(virtio::feature::protocol_features) | virtio::bit(virtio::feature::log_all);
  EXPECT_EQ(f.session().offered_features() & ~transport, rig.backend.features());
  EXPECT_EQ(f.session().offered_features() & transport, transport);
  // Acked: what we want and know how to drive; never INDIRECT or checksum offload.
  EXPECT_EQ(f.features(), kNetFeatures | virtio::bit(virtio::feature::protocol_features));
  EXPECT_EQ(rig.backend.acked() & ~virtio::bit(virtio::feature::protocol_features),
            f.features() & ~virtio::bit(virtio::feature::protocol_features));
  const auto& proto = f.session();
  EXPECT_TRUE(proto.has_protocol(protocol_feature::reply_ack));
  EXPECT_TRUE(proto.has_protocol(protocol_feature::mq));
  EXPECT_TRUE(proto.has_protocol(protocol_feature::config));
  EXPECT_EQ(proto.protocol_features(),
            proto.offered_protocol_features() & vhost_user::kFrontendProtocolFeatures);
  EXPECT_EQ(proto.backend_queue_num(), 2u);
  EXPECT_EQ(f.net_hdr_len(), 12u);
  EXPECT_EQ(proto.num_rings(), 2);
  auto mac = f.mac();
  ASSERT_TRUE(mac) << mac.error().message();
  EXPECT_EQ(*mac, kMac);
  EXPECT_EQ(backend.session.protocol_features(), proto.protocol_features());
  // Both rings started on the back-end.
  EXPECT_TRUE(rig.device.queue(0).started());
  EXPECT_TRUE(rig.device.queue(1).started());
  EXPECT_EQ(rig.device.queue(1).ring_size(), 256u);
}

class NetDriverPairModes : public ::testing::TestWithParam<bool> {};

TEST_P(NetDriverPairModes, TenThousandFramesByteExactThenTeardownBases) {
  const bool event = GetParam();
  Rig rig(1, event ? vhost::PollMode::event : vhost::PollMode::busy);
  auto pair = vhost_user::socketpair();
  ASSERT_TRUE(pair);
  SessionThread backend(rig.device, std::move(pair->second));
  auto o = opts_on(std::move(pair->first));
  o.notify = event ? vhost_user::FrontendOptions::Notify::event
                   : vhost_user::FrontendOptions::Notify::poll;
  auto s = NetDriver::connect(std::move(o));
  ASSERT_TRUE(s) << s.error().message();
  exchange(**s, 0, 10000, event);
  EXPECT_EQ(rig.backend.frames(), 10000u);
  EXPECT_EQ((*s)->stats(0).frames, 10000u);
  EXPECT_EQ((*s)->stats(1).frames, 10000u);
  if (event) {
    EXPECT_GT((*s)->session().ring(1).kicks, 0u);
  } else {
    EXPECT_EQ((*s)->session().ring(1).kicks, 0u);  // no kick fd at all
  }
  auto bases = (*s)->stop();
  ASSERT_TRUE(bases) << bases.error().message();
  ASSERT_EQ(bases->size(), 2u);
  // Ring 0 (receiveq): one buffer per frame, plus the ring-full of fresh buffers the loopback
  // took already. Ring 1 (transmitq): every chain consumed.
  EXPECT_EQ((*bases)[0], 10000u + 256u);
  EXPECT_EQ((*bases)[1], 10000u);
  EXPECT_FALSE(rig.device.queue(0).started());
  EXPECT_FALSE(rig.device.queue(1).started());
  // After stop() the data path is inert.
  EXPECT_EQ((*s)->rx_burst(0, 32, [](auto) {}), 0u);
}

INSTANTIATE_TEST_SUITE_P(EventAndBusy, NetDriverPairModes, ::testing::Values(true, false),
                         [](const auto& i) { return i.param ? "event" : "busy"; });

// forward(): 32 frames go round 200 times, each time sent back out of the rx buffer it arrived
// in (the test's loopback copies it into another); then each comes back once more,
// byte-exact, in a buffer where it starts a cache line, and every buffer is home again.
TEST(NetDriverPair, ForwardSendsFramesBackFromTheirRxBuffers) {
  Rig rig;
  auto pair = vhost_user::socketpair();
  ASSERT_TRUE(pair);
  SessionThread backend(rig.device, std::move(pair->second));
  auto o = opts_on(std::move(pair->first));
  o.align_rx_frames = true;
  auto s = NetDriver::connect(std::move(o));
  ASSERT_TRUE(s) << s.error().message();
  NetDriver& f = **s;
  constexpr std::uint32_t kFrames = 32, kRounds = 200;
  std::vector<std::vector<std::uint8_t>> frames;
  for (std::uint32_t i = 0; i < kFrames; ++i) frames.push_back(make_frame(i, 60 + i * 45));
  const std::vector<std::span<const std::uint8_t>> spans(frames.begin(), frames.end());
  ASSERT_EQ(f.tx_burst(0, spans), kFrames);

  std::uint64_t forwarded = 0;
  const auto deadline = std::chrono::steady_clock::now() + 30s;
  while (forwarded < kFrames * kRounds) {
    ASSERT_LT(std::chrono::steady_clock::now(), deadline) << "forwarded " << forwarded;
    const std::size_t n = f.forward(0, kFrames);
    forwarded += n;
    if (n == 0) f.wait_call(NetDriver::rx_index(0), 10ms);
  }
  // The frames in flight are on rx buffers: every tx buffer of the driver's own is back.
  f.reclaim_tx(0);
  EXPECT_EQ(f.tx_ring(0).free_top, f.tx_ring(0).buffer_count);

  // The last round: each frame once, unchanged, starting a cache line.
  std::vector<int> seen(kFrames, 0);
  std::uint32_t received = 0;
  ASSERT_TRUE(eventually([&] {
    f.reclaim_tx(0);
    f.rx_burst(0, kFrames, [&](std::span<const std::uint8_t> fr) {
      ++received;
      EXPECT_EQ(reinterpret_cast<std::uintptr_t>(fr.data()) % 64, 0u);
      std::uint32_t seq = 0;
      ASSERT_GE(fr.size(), sizeof seq);
      std::memcpy(&seq, fr.data(), sizeof seq);
      ASSERT_LT(seq, kFrames);
      ++seen[seq];
      EXPECT_EQ(fr.size(), frames[seq].size()) << "frame " << seq;
      EXPECT_EQ(std::memcmp(fr.data(), frames[seq].data(), frames[seq].size()), 0)
          << "frame " << seq;
    });
    return received >= kFrames;
  }));
  EXPECT_EQ(received, kFrames);
  for (std::uint32_t i = 0; i < kFrames; ++i) EXPECT_EQ(seen[i], 1) << "frame " << i;
  // Everything sent came back; nothing was refused, oversize or bad.
  const RingStats& tx = f.stats(NetDriver::tx_index(0));
  const RingStats& rx = f.stats(NetDriver::rx_index(0));
  EXPECT_EQ(tx.frames, kFrames + forwarded);
  EXPECT_EQ(rx.frames, tx.frames);
  EXPECT_EQ(rig.backend.frames(), tx.frames);
  EXPECT_EQ(tx.full + tx.oversize + rx.bad, 0u);
  // Home: the lent buffers came back through the transmitq and went onto the receiveq.
  ASSERT_TRUE(eventually([&] {
    f.reclaim_tx(0);
    f.rx_burst(0, kFrames, [](auto) {});
    return f.tx_ring(0).in_use() == 0 && f.rx_ring(0).free_top == 0;
  }));
  EXPECT_EQ(f.rx_ring(0).in_use(), f.rx_ring(0).buffer_count);
}

TEST(NetDriverPair, TwoQueuePairs) {
  Rig rig(2);
  auto pair = vhost_user::socketpair();
  ASSERT_TRUE(pair);
  SessionThread backend(rig.device, std::move(pair->second));
  auto o = opts_on(std::move(pair->first));
  o.queue_pairs = 2;
  auto s = NetDriver::connect(std::move(o));
  ASSERT_TRUE(s) << s.error().message();
  EXPECT_TRUE(virtio::has((*s)->features(), virtio::net_feature::mq));
  exchange(**s, 0, 500, true);
  exchange(**s, 1, 500, true);
  EXPECT_EQ(rig.backend.frames(), 1000u);
}

TEST(NetDriverPair, ServerSocketPathAndReconnect) {
  Rig rig;
  const std::string path = temp_sock("srv");
  StopFd stop;
  BackendServer server(rig.device, ServerOptions::listen(path));
  std::thread t([&] { ASSERT_TRUE(server.run(stop.fd.get())); });
  ASSERT_TRUE(eventually([&] { return testing::unix_listening(path); })) << "no listener " << path;
  for (int round = 0; round < 2; ++round) {
    NetDriverOptions o;
    o.socket_path = path;
    o.memory_size = 0;
    auto s = NetDriver::connect(std::move(o));
    ASSERT_TRUE(s) << s.error().message();
    exchange(**s, 0, 1000, true);
  }
  stop.fire();
  t.join();
  EXPECT_EQ(server.sessions(), 2u);
  EXPECT_FALSE(std::filesystem::exists(path));
}

TEST(NetDriverPair, BackendClientReconnectsToListeningFrontend) {
  Rig rig;
  const std::string path = temp_sock("cli");
  auto listener = vhost_user::listen_unix(path);
  ASSERT_TRUE(listener) << listener.error().message();
  StopFd stop;
  auto so = ServerOptions::connect(path);
  so.reconnect_initial = 20ms;
  so.reconnect_max = 100ms;
  BackendServer server(rig.device, std::move(so));
  std::thread t([&] { ASSERT_TRUE(server.run(stop.fd.get())); });
  for (int round = 0; round < 3; ++round) {
    auto ch = vhost_user::accept(listener->get());
    eventually([&] {
      if (ch || ch.error().code != Errc::would_block) return true;
      ch = vhost_user::accept(listener->get());
      return false;
    });
    ASSERT_TRUE(ch) << ch.error().message();
    auto s = NetDriver::connect(opts_on(std::move(*ch)));
    ASSERT_TRUE(s) << s.error().message();
    exchange(**s, 0, 300, true);
  }
  stop.fire();
  t.join();
  // The back-end may already have reconnected (into the listen backlog) a fourth time.
  EXPECT_GE(server.sessions(), 3u);
  ::unlink(path.c_str());
}

TEST(NetDriverPair, DisconnectMidTrafficThenReconnect) {
  Rig rig;
  const std::string path = temp_sock("mid");
  StopFd stop;
  BackendServer server(rig.device, ServerOptions::listen(path));
  std::thread t([&] { ASSERT_TRUE(server.run(stop.fd.get())); });
  ASSERT_TRUE(eventually([&] { return testing::unix_listening(path); })) << "no listener " << path;
  {
    NetDriverOptions o;
    o.socket_path = path;
    o.memory_size = 0;
    auto s = NetDriver::connect(std::move(o));
    ASSERT_TRUE(s) << s.error().message();
    // Frames in flight both ways, none drained, then hang up without GET_VRING_BASE: the
    // socket just closes under the back-end.
    std::vector<std::uint8_t> f = make_frame(1, 200);
    std::array<std::span<const std::uint8_t>, 1> one{f};
    for (int i = 0; i < 100; ++i) (*s)->tx_burst(0, one);
    ::shutdown((*s)->session().socket_fd(), SHUT_RDWR);
  }
  NetDriverOptions o;
  o.socket_path = path;
  o.memory_size = 0;
  auto s = NetDriver::connect(std::move(o));
  ASSERT_TRUE(s) << s.error().message();
  exchange(**s, 0, 1000, true);
  s->reset();
  stop.fire();
  t.join();
  EXPECT_EQ(server.sessions(), 2u);
}

TEST(NetDriverPair, FdCountStableAcrossHundredCycles) {
  Rig rig;
  const std::string path = temp_sock("fds");
  StopFd stop;
  BackendServer server(rig.device, ServerOptions::listen(path));
  std::thread t([&] { ASSERT_TRUE(server.run(stop.fd.get())); });
  ASSERT_TRUE(eventually([&] { return testing::unix_listening(path); })) << "no listener " << path;
  auto cycle = [&] {
    NetDriverOptions o;
    o.socket_path = path;
    o.memory_size = 0;
    o.queue_size = 64;
    auto s = NetDriver::connect(std::move(o));
    ASSERT_TRUE(s) << s.error().message();
    exchange(**s, 0, 32, true);
  };
  cycle();  // warm up: lazily created worker fds etc.
  // The back-end ends each session on its own thread: wait for it to settle.
  auto settled = [&](std::uint64_t sessions) {
    eventually([&] { return server.sessions() >= sessions && !rig.device.has_owner(); });
  };
  settled(1);
  const std::size_t before = open_fd_count();
  for (int i = 0; i < 100; ++i) {
    cycle();
    if (HasFatalFailure()) break;
  }
  settled(101);
  std::size_t after = open_fd_count();
  eventually([&] { return (after = open_fd_count()) == before; });
  EXPECT_EQ(after, before);
  stop.fire();
  t.join();
  EXPECT_EQ(server.sessions(), 101u);
}

}  // namespace
}  // namespace vhostkit::driver
