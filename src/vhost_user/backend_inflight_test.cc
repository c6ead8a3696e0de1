// Inflight I/O tracking (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD) through the back-end session:
// who is offered it, GET_INFLIGHT_FD and SET_INFLIGHT_FD with every field hostile, the region's
// life across rings and sessions, and a back-end restarted with requests left in flight that
// were answered out of order: each is answered exactly once, the lost ones first, in order.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <poll.h>
#include <sys/stat.h>
#include <unistd.h>

#include <array>
#include <atomic>
#include <cstring>
#include <map>
#include <string>
#include <vector>

#include "testing/backend_rig.h"
#include "vhostkit/vhost/inflight.h"
#include "vhostkit/vhost_user/backend_session.h"
#include "vhostkit/virtq/iov.h"

namespace vhostkit::vhost_user {
namespace {

using namespace std::chrono_literals;
using test::EchoBackend;
using test::TestFrontend;

constexpr std::uint16_t kRingSize = 64;

// An echo device that records its chains in the inflight region as a real device must
// (vhost::Queue::inflight), resubmits what it finds there at start, and, while `hold` is set,
// leaves every chain whose first readable byte is 'H' unanswered: what a back-end killed with
// those requests in flight leaves behind, the chains after them answered out of order.
class TrackingEcho : public EchoBackend {
 public:
  bool tracks_inflight() const noexcept override { return true; }
  // Offers the packed ring too (the handshake acks only the split one) for the packed case.
  std::uint64_t features() const noexcept override {
    return EchoBackend::features() | virtio::bit(virtio::feature::ring_packed);
  }
  void queue_started(vhost::Queue& q, vhost::Worker&) override {
    resubmit_[q.index()] = q.take_resubmit();
    next_[q.index()] = 0;
    resubmitted += resubmit_[q.index()].size();
  }
  bool handle_queue(vhost::Queue& q) noexcept override {
    auto& vq = q.vq();
    vhost::InflightSplitQueue* iq = q.inflight();
    auto& again = resubmit_[q.index()];
    std::size_t& pos = next_[q.index()];
    bool did = false;
    std::array<iovec, 16> segs;
    for (int n = 0; n < 32; ++n) {
      const bool resubmit = pos < again.size();
      if (!resubmit && vq.pending() == 0) break;
      auto c = resubmit ? vq.take(again[pos++], segs) : vq.pop(segs);
      did = true;
      if (!c) {
        if (virtq::breaks_queue(c.error())) break;
        if (iq != nullptr) {
          if (!resubmit) iq->submit(vq.last_bad_head());
          iq->used(vq.last_bad_head());
        }
        continue;
      }
      if (iq != nullptr && !resubmit) iq->submit(c->head);
      std::uint8_t first = 0;
      virtq::iov_read(c->readable, 0, &first, 1);
      if (hold && first == 'H') {
        ++held;
        continue;
      }
      const std::size_t copied = virtq::iov_copy(c->writable, 0, c->readable, 0, c->readable_len);
      vq.push_used(c->head, static_cast<std::uint32_t>(copied));
      if (iq != nullptr) iq->used(c->head);
    }
    if (did) q.publish_and_notify();
    return did;
  }

  std::atomic<bool> hold{false};
  std::atomic<unsigned> held{0};
  std::atomic<std::size_t> resubmitted{0};

 private:
  std::array<std::vector<std::uint16_t>, kQueues> resubmit_;
  std::array<std::size_t, kQueues> next_{};
};

// A back-end (device and session, served on the test's thread as each request is sent) that
// can be replaced under the same front-end, as a restarted back-end process would be.
struct Rig {
  Rig() {
    auto pair = socketpair();
    EXPECT_TRUE(pair.has_value());
    start_backend(std::move(pair->first));
    fe = std::make_unique<TestFrontend>(std::move(pair->second),
                                        [this] { last = session->serve_one(); });
  }
  void start_backend(Channel ch) {
    backend = std::make_unique<TrackingEcho>();
    device = std::make_unique<vhost::Device>(*backend, vhost::DeviceOptions{.name = "vk-infl"});
    session = std::make_unique<BackendSession>(*device, std::move(ch));
  }
  // The back-end goes away with whatever it held and a new one takes the front-end's socket.
  void restart() {
    session.reset();
    device.reset();
    backend.reset();
    auto pair = socketpair();
    ASSERT_TRUE(pair.has_value());
    start_backend(std::move(pair->first));
    fe->channel() = std::move(pair->second);
    (void)fe->channel().set_timeout(5000ms);
  }
  std::string last_error() const { return session->last_error().message(); }

  std::unique_ptr<TrackingEcho> backend;
  std::unique_ptr<vhost::Device> device;
  std::unique_ptr<BackendSession> session;
  std::unique_ptr<TestFrontend> fe;
  Result<> last;
};

UniqueFd dup(int fd) { return UniqueFd(::fcntl(fd, F_DUPFD_CLOEXEC, 0)); }

// SET_INFLIGHT_FD, acked (REPLY_ACK): 0 when taken.
std::uint64_t set_inflight(Rig& rig, int fd, Inflight shape) {
  SetInflightFd m;
  m.inflight = shape;
  m.fd = dup(fd);
  auto a = rig.fe->request(m, true);
  EXPECT_TRUE(a.has_value()) << a.error().message();
  return a.value_or(0);
}

TEST(BackendInflight, OfferedOnlyToADeviceThatTracksItsRequests) {
  {
    EchoBackend echo;
    vhost::Device device(echo, vhost::DeviceOptions{.name = "vk-echo"});
    auto pair = socketpair();
    ASSERT_TRUE(pair.has_value());
    BackendSession s(device, std::move(pair->first));
    EXPECT_EQ(s.offered_protocol_features() & protocol_bit(protocol_feature::inflight_shmfd), 0u);
  }
  Rig rig;
  EXPECT_NE(
      rig.session->offered_protocol_features() & protocol_bit(protocol_feature::inflight_shmfd),
      0u);
}

TEST(BackendInflight, GetInflightFdAllocatesTheSplitLayoutAndTheDeviceKeepsIt) {
  Rig rig;
  ASSERT_TRUE(rig.fe->handshake());
  auto rep = rig.fe->get_inflight_fd(2, kRingSize);
  ASSERT_TRUE(rep.has_value()) << rep.error().message();
  const auto want = vhost::inflight_size(vhost::InflightLayout::split, 2, kRingSize);
  ASSERT_TRUE(want.has_value());
  EXPECT_EQ(rep->inflight.mmap_size, *want);
  EXPECT_EQ(rep->inflight.mmap_offset, 0u);
  EXPECT_EQ(rep->inflight.num_queues, 2);
  EXPECT_EQ(rep->inflight.queue_size, kRingSize);
  struct stat st{};
  ASSERT_EQ(::fstat(rep->fd.get(), &st), 0);
  EXPECT_EQ(static_cast<std::uint64_t>(st.st_size), *want);
  ASSERT_NE(rig.device->inflight(), nullptr);
  EXPECT_EQ(rig.device->inflight()->num_queues(), 2);
  // QEMU sends it back before starting the rings: the same region, attached.
  EXPECT_EQ(set_inflight(rig, rep->fd.get(), rep->inflight), 0u) << rig.last_error();
  ASSERT_NE(rig.device->inflight(), nullptr);
  // The region is the session's: dropped by RESET_OWNER and at the end of the session.
  EXPECT_TRUE(rig.fe->ok(ResetOwner{}));
  EXPECT_EQ(rig.device->inflight(), nullptr);
  EXPECT_EQ(set_inflight(rig, rep->fd.get(), rep->inflight), 0u) << rig.last_error();
  rig.session->close();
  EXPECT_EQ(rig.device->inflight(), nullptr);
}

TEST(BackendInflight, GetInflightFdWithABadShapeGetsAFailureReply) {
  Rig rig;
  ASSERT_TRUE(rig.fe->handshake());
  const std::pair<std::uint16_t, std::uint16_t> shapes[] = {{0, 64}, {3, 64},  {0xffff, 64},
                                                            {1, 0},  {1, 100}, {1, 0xffff}};
  for (auto [nq, qs] : shapes) {
    ASSERT_TRUE(rig.fe->channel().send_message(
        GetInflightFd{Inflight{.num_queues = nq, .queue_size = qs}}));
    rig.last = rig.session->serve_one();
    ASSERT_TRUE(rig.last.has_value());
    auto rep = rig.fe->channel().recv();
    ASSERT_TRUE(rep.has_value());
    auto v = decode_u64_reply(*rep, Request::get_inflight_fd);
    ASSERT_TRUE(v.has_value()) << nq << "x" << qs << ": " << v.error().message();
    EXPECT_NE(*v, 0u);
    const std::string e = rig.last_error();
    EXPECT_TRUE(e.find(nq == 0 || nq > 2 ? "num_queues" : "queue_size") != std::string::npos) << e;
    EXPECT_EQ(rig.device->inflight(), nullptr);
  }
}

// The packed layout is not implemented: GET_INFLIGHT_FD answers "no region" (mmap_size 0, no
// fd), which QEMU takes and starts the device without one; a region sent anyway is refused.
TEST(BackendInflight, PackedRingGetsNoRegionAndARegionSentIsRefused) {
  Rig rig;
  ASSERT_TRUE(rig.fe->handshake());
  ASSERT_TRUE(
      rig.fe->ok(SetFeatures{rig.fe->features() | virtio::bit(virtio::feature::ring_packed)}))
      << rig.last_error();
  auto rep = rig.fe->get_inflight_fd(2, kRingSize);
  ASSERT_TRUE(rep.has_value()) << rep.error().message();
  EXPECT_EQ(rep->inflight.mmap_size, 0u);
  EXPECT_EQ(rep->inflight.num_queues, 2);
  EXPECT_EQ(rep->inflight.queue_size, kRingSize);
  EXPECT_FALSE(rep->fd.valid());
  EXPECT_EQ(rig.device->inflight(), nullptr);

  auto region = vhost::InflightRegion::allocate(vhost::InflightLayout::split, 2, kRingSize);
  ASSERT_TRUE(region.has_value());
  EXPECT_NE(
      set_inflight(
          rig, region->fd(),
          Inflight{.mmap_size = region->mmap_size(), .num_queues = 2, .queue_size = kRingSize}),
      0u);
  EXPECT_NE(rig.last_error().find("packed"), std::string::npos) << rig.last_error();
  EXPECT_EQ(rig.device->inflight(), nullptr);
}

TEST(BackendInflight, RefusedWithoutTheProtocolFeature) {
  Rig rig;
  test::FrontendOptions o;
  o.protocol_features = false;
  ASSERT_TRUE(rig.fe->handshake(o));
  auto region = vhost::InflightRegion::allocate(vhost::InflightLayout::split, 1, kRingSize);
  ASSERT_TRUE(region.has_value());
  SetInflightFd m;
  m.inflight = {.mmap_size = region->mmap_size(), .num_queues = 1, .queue_size = kRingSize};
  m.fd = dup(region->fd());
  ASSERT_TRUE(rig.fe->request(m, false));
  EXPECT_TRUE(rig.last.has_value());
  EXPECT_NE(rig.last_error().find("INFLIGHT_SHMFD"), std::string::npos) << rig.last_error();
  EXPECT_EQ(rig.device->inflight(), nullptr);
}

// Every field of SET_INFLIGHT_FD is hostile: each bad one is refused, naming it, and the
// session lives on and takes a good region afterwards.
TEST(BackendInflight, SetInflightFdRefusesEachBadFieldByName) {
  Rig rig;
  ASSERT_TRUE(rig.fe->handshake());
  auto region = vhost::InflightRegion::allocate(vhost::InflightLayout::split, 2, kRingSize);
  ASSERT_TRUE(region.has_value());
  const Inflight good{.mmap_size = region->mmap_size(), .num_queues = 2, .queue_size = kRingSize};
  struct Case {
    const char* what;
    Inflight shape;
    const char* names;
  };
  const Case cases[] = {
      {"size one short", {good.mmap_size - 1, 0, 2, kRingSize}, "mmap_size"},
      {"size of another shape", {good.mmap_size / 2, 0, 2, kRingSize}, "mmap_size"},
      {"offset not aligned", {good.mmap_size, 8, 2, kRingSize}, "mmap_offset"},
      {"offset past the end", {good.mmap_size, 4096, 2, kRingSize}, "past the end"},
      {"offset wraps", {good.mmap_size, ~std::uint64_t{63}, 2, kRingSize}, "mmap_offset"},
      {"no queues", {good.mmap_size, 0, 0, kRingSize}, "num_queues"},
      {"more queues than the device", {good.mmap_size, 0, 3, kRingSize}, "num_queues"},
      {"queue size not a power of two", {good.mmap_size, 0, 2, 48}, "queue_size"},
  };
  for (const Case& c : cases) {
    EXPECT_NE(set_inflight(rig, region->fd(), c.shape), 0u) << c.what;
    EXPECT_TRUE(rig.last.has_value()) << c.what;
    EXPECT_NE(rig.last_error().find(c.names), std::string::npos)
        << c.what << ": " << rig.last_error();
    EXPECT_EQ(rig.device->inflight(), nullptr) << c.what;
  }
  // Not a file: an eventfd.
  UniqueFd efd = test::make_eventfd();
  EXPECT_NE(set_inflight(rig, efd.get(), good), 0u);
  EXPECT_NE(rig.last_error().find("not a file"), std::string::npos) << rig.last_error();
  // Garbage in a queue that claims to be set up.
  auto* base = static_cast<std::uint8_t*>(
      ::mmap(nullptr, region->mmap_size(), PROT_READ | PROT_WRITE, MAP_SHARED, region->fd(), 0));
  ASSERT_NE(base, MAP_FAILED);
  vhost::InflightSplitHeader h{.features = 0, .version = 1, .desc_num = kRingSize};
  std::memcpy(base, &h, sizeof h);
  base[sizeof h + 3 * sizeof(vhost::InflightSplitDesc)] = 7;  // desc[3].inflight
  EXPECT_NE(set_inflight(rig, region->fd(), good), 0u);
  EXPECT_NE(rig.last_error().find("desc[3].inflight"), std::string::npos) << rig.last_error();
  std::memset(base, 0, region->mmap_size());
  ::munmap(base, region->mmap_size());
  // And the good one.
  EXPECT_EQ(set_inflight(rig, region->fd(), good), 0u) << rig.last_error();
  EXPECT_NE(rig.device->inflight(), nullptr);
  auto f = rig.fe->get(GetFeatures{});
  EXPECT_TRUE(f.has_value());
}

TEST(BackendInflight, RegionChangesOnlyWhileEveryRingIsStopped) {
  Rig rig;
  ASSERT_TRUE(rig.fe->handshake());
  ASSERT_TRUE(rig.fe->set_mem_table());
  auto rep = rig.fe->get_inflight_fd(2, kRingSize);
  ASSERT_TRUE(rep.has_value());
  ASSERT_TRUE(rig.fe->setup_ring(0));
  ASSERT_TRUE(rig.device->queue(0).started());
  const vhost::InflightRegion* before = rig.device->inflight();
  EXPECT_NE(set_inflight(rig, rep->fd.get(), rep->inflight), 0u);
  EXPECT_NE(rig.last_error().find("vring 0 is running"), std::string::npos) << rig.last_error();
  EXPECT_EQ(rig.device->inflight(), before);
  ASSERT_TRUE(rig.fe->get_vring_base(0));
  EXPECT_EQ(set_inflight(rig, rep->fd.get(), rep->inflight), 0u) << rig.last_error();
}

// Chains added by the front-end, each with its own buffers: a readable payload, a writable
// buffer as long, token = the chain's number.
struct Traffic {
  static constexpr std::size_t kLen = 64;
  explicit Traffic(TestFrontend& fe) : fe(fe) {}

  void post(std::uint32_t n, char tag) {
    const std::size_t out = TestFrontend::kDataOffset + n * 2 * kLen;
    const std::size_t in = out + kLen;
    std::uint8_t* m = fe.mem();
    m[out] = static_cast<std::uint8_t>(tag);
    for (std::size_t b = 1; b < kLen; ++b) m[out + b] = static_cast<std::uint8_t>(n * 31 + b);
    std::memset(m + in, 0, kLen);
    const virtq::DriverQueue::Buffer o{TestFrontend::kGpaBase + out, kLen};
    const virtq::DriverQueue::Buffer i{TestFrontend::kGpaBase + in, kLen};
    ASSERT_TRUE(fe.driver_queue(0).add({&o, 1}, {&i, 1}, n).has_value());
    fe.driver_queue(0).publish();
    fe.kick(0);
  }
  bool echoed(std::uint32_t n) const {
    const std::size_t out = TestFrontend::kDataOffset + n * 2 * kLen;
    return std::memcmp(fe.mem() + out, fe.mem() + out + kLen, kLen) == 0;
  }
  // Waits (bounded) until `count` more used entries arrived; records them in order.
  void wait_used(std::size_t count) {
    const auto deadline = std::chrono::steady_clock::now() + 10s;
    const std::size_t want = order.size() + count;
    while (order.size() < want && std::chrono::steady_clock::now() < deadline) {
      while (auto u = fe.driver_queue(0).get_used()) {
        order.push_back(static_cast<std::uint32_t>(u->token));
        ++answers[static_cast<std::uint32_t>(u->token)];
        EXPECT_EQ(u->len, kLen) << "chain " << u->token;
      }
      if (order.size() >= want) break;
      pollfd p{fe.call_fd(0), POLLIN, 0};
      if (::poll(&p, 1, 50) > 0) {
        std::uint64_t v;
        [[maybe_unused]] auto r = ::read(fe.call_fd(0), &v, sizeof v);
      }
    }
    ASSERT_EQ(order.size(), want) << "used entries before the timeout";
  }

  TestFrontend& fe;
  std::vector<std::uint32_t> order;
  std::map<std::uint32_t, int> answers;
};

// The restart: chains 0, 2 and 4 are held by the first back-end while 1, 3 and 5 (submitted
// after them) are answered; the back-end goes away. The next one gets the same region and the
// ring's used index as its base: it answers 0, 2, 4 first, in that order, then new chains, and
// every chain is answered exactly once with its own data.
TEST(BackendInflight, RestartedBackendAnswersWhatWasLeftInFlightOnceInOrder) {
  Rig rig;
  ASSERT_TRUE(rig.fe->handshake());
  ASSERT_TRUE(rig.fe->set_mem_table());
  auto rep = rig.fe->get_inflight_fd(2, kRingSize);
  ASSERT_TRUE(rep.has_value()) << rep.error().message();
  ASSERT_EQ(set_inflight(rig, rep->fd.get(), rep->inflight), 0u) << rig.last_error();
  ASSERT_TRUE(rig.fe->setup_ring(0));
  rig.backend->hold = true;
  Traffic t(*rig.fe);
  for (std::uint32_t n = 0; n < 6; ++n) t.post(n, n % 2 == 0 ? 'H' : 'a');
  t.wait_used(3);
  EXPECT_EQ(t.order, (std::vector<std::uint32_t>{1, 3, 5}));
  EXPECT_EQ(rig.backend->held.load(), 3u);
  const std::uint16_t used_idx = rig.fe->driver_queue(0).used()->idx;
  ASSERT_EQ(used_idx, 3);

  rig.restart();
  ASSERT_TRUE(rig.fe->handshake());
  ASSERT_TRUE(rig.fe->set_mem_table());
  ASSERT_EQ(set_inflight(rig, rep->fd.get(), rep->inflight), 0u) << rig.last_error();
  test::FrontendOptions resume;
  resume.resume = true;
  resume.base = used_idx;  // what QEMU sends when it lost its back-end
  ASSERT_TRUE(rig.fe->setup_ring(0, resume)) << rig.last_error();
  t.wait_used(3);
  EXPECT_EQ(rig.backend->resubmitted.load(), 3u);
  EXPECT_EQ(t.order, (std::vector<std::uint32_t>{1, 3, 5, 0, 2, 4}));
  // New chains come after them and are popped from where the avail ring stands.
  for (std::uint32_t n = 6; n < 9; ++n) t.post(n, 'a');
  t.wait_used(3);
  for (std::uint32_t n = 0; n < 9; ++n) {
    EXPECT_EQ(t.answers[n], 1) << "chain " << n;
    EXPECT_TRUE(t.echoed(n)) << "chain " << n;
  }
  EXPECT_EQ(rig.fe->driver_queue(0).bad_used(), 0u);
  // Nothing is left in flight: a third back-end resubmits nothing.
  ASSERT_TRUE(rig.fe->get_vring_base(0));
  rig.restart();
  ASSERT_TRUE(rig.fe->handshake());
  ASSERT_TRUE(rig.fe->set_mem_table());
  ASSERT_EQ(set_inflight(rig, rep->fd.get(), rep->inflight), 0u) << rig.last_error();
  resume.base = rig.fe->driver_queue(0).used()->idx;
  ASSERT_TRUE(rig.fe->setup_ring(0, resume)) << rig.last_error();
  EXPECT_EQ(rig.backend->resubmitted.load(), 0u);
  t.post(9, 'a');
  t.wait_used(1);
  EXPECT_EQ(t.answers[9], 1);
}

// The front-end writes the region between SET_INFLIGHT_FD and the ring's start: recovery checks
// it again and the ring does not start on it; the session lives on.
TEST(BackendInflight, RegionSpoiledAfterAttachStopsTheRingStartWithAClearError) {
  Rig rig;
  ASSERT_TRUE(rig.fe->handshake());
  ASSERT_TRUE(rig.fe->set_mem_table());
  auto rep = rig.fe->get_inflight_fd(1, kRingSize);
  ASSERT_TRUE(rep.has_value());
  auto* base = static_cast<std::uint8_t*>(::mmap(
      nullptr, rep->inflight.mmap_size, PROT_READ | PROT_WRITE, MAP_SHARED, rep->fd.get(), 0));
  ASSERT_NE(base, MAP_FAILED);
  const vhost::InflightSplitHeader h{.features = 0, .version = 1, .desc_num = kRingSize};
  std::memcpy(base, &h, sizeof h);
  auto* desc = reinterpret_cast<vhost::InflightSplitDesc*>(base + sizeof h);
  desc[5] = {.inflight = 1, .padding = {}, .next = 0, .counter = 9};
  desc[9] = {.inflight = 1, .padding = {}, .next = 0, .counter = 9};
  auto r = rig.fe->setup_ring(0);
  EXPECT_FALSE(r.has_value());
  EXPECT_FALSE(rig.device->queue(0).started());
  EXPECT_NE(rig.last_error().find("vring 0: inflight queue 0: heads 5 and 9 share counter"),
            std::string::npos)
      << rig.last_error();
  EXPECT_TRUE(rig.last.has_value());
  // A region telling of a head whose chain is now garbage (a descriptor that loops on itself):
  // the head is answered with used len 0, the ring runs on. The driver had made it available
  // (else the resume point would run past the avail index, which breaks the ring).
  desc[9].counter = 10;
  desc[9].inflight = 0;
  virtio::VirtqAvail* avail = rig.fe->driver_queue(0).avail();
  avail->ring[0] = 5;
  avail->idx = 1;
  rig.fe->driver_queue(0).desc()[5] =
      virtio::VirtqDesc{.addr = TestFrontend::kGpaBase + TestFrontend::kDataOffset,
                        .len = 16,
                        .flags = virtio::kDescFNext,
                        .next = 5};
  ASSERT_TRUE(rig.fe->ok(SetVringEnable{0, 1})) << rig.last_error();
  ASSERT_TRUE(rig.device->queue(0).started());
  virtio::VirtqUsed* used = rig.fe->driver_queue(0).used();
  pollfd p{rig.fe->call_fd(0), POLLIN, 0};
  EXPECT_EQ(::poll(&p, 1, 10000), 1) << "no call for the answered head";
  ASSERT_EQ(used->idx, 1);
  EXPECT_EQ(used->ring[0].id, 5u);
  EXPECT_EQ(used->ring[0].len, 0u);
  EXPECT_FALSE(rig.device->broken());
  EXPECT_EQ(desc[5].inflight, 0) << "answered, so no longer in flight";
  ::munmap(base, rep->inflight.mmap_size);
}

}  // namespace
}  // namespace vhostkit::vhost_user
