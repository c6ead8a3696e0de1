// FrontendSession (the protocol side of a front-end, no device) against a scripted fake
// back-end on a socketpair: option validation, feature masking, the request sequence and the
// two set-up steps, every hostile reply we can think of (each its own test, each checking that
// no fd leaks and nothing hangs), kick and call.
#include <gtest/gtest.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <functional>
#include <thread>
#include <vector>

#include "testing/fake_backend.h"
#include "testing/fd_count.h"
#include "vhostkit/vhost_user/frontend_session.h"

namespace vhostkit::vhost_user {
namespace {

using namespace std::chrono_literals;
using vhostkit::testing::Action;
using vhostkit::testing::FakeBackend;
using vhostkit::testing::on;
using vhostkit::testing::open_fd_count;

constexpr std::uint64_t pbit(unsigned n) { return std::uint64_t{1} << n; }
// A device of no particular type: three device-specific bits and an MQ bit of its own.
constexpr unsigned kMqBit = 22;
constexpr std::uint64_t kWanted = virtio::bit(virtio::feature::version_1) |
                                  virtio::bit(virtio::feature::ring_event_idx) | pbit(0) | pbit(5) |
                                  pbit(16);
constexpr std::uint64_t kDrivable = kWanted | pbit(kMqBit);
constexpr std::uint64_t kOffered = kWanted | pbit(kMqBit) | pbit(1) |
                                   virtio::bit(virtio::feature::ring_indirect_desc) |
                                   virtio::bit(virtio::feature::protocol_features);
constexpr std::uint64_t kOfferedProtocol =
    pbit(protocol_feature::mq) | pbit(protocol_feature::reply_ack) |
    pbit(protocol_feature::config) | pbit(protocol_feature::status);
const std::vector<std::uint8_t> kConfig = {0x02, 0xaa, 0xbb, 0xcc, 0xdd, 0xee};

FakeBackend::Script script(std::uint64_t offered = kOffered) {
  return {.features = offered, .protocol_features = kOfferedProtocol, .config = kConfig};
}

FrontendOptions quick(Channel ch) {
  FrontendOptions o;
  o.channel = std::move(ch);
  o.rings = 2;
  o.queue_size = 64;
  o.ring_area_bytes = 4096;
  o.memory_size = 0;
  o.features = kWanted;
  o.drivable = kDrivable;
  o.queues = {.count = 1, .mq_feature = kMqBit, .mq_name = "VIRTIO_X_F_MQ", .unit = "queues"};
  o.timeout = 300ms;
  return o;
}

// Connects (and starts the rings) through a fake back-end with `hook`; returns the result and
// the fake.
struct Attempt {
  std::unique_ptr<FakeBackend> fake;
  Result<std::unique_ptr<FrontendSession>> session = fail(Errc::bad_state, "not run");
};
Attempt attempt(FakeBackend::Hook hook, std::function<void(FrontendOptions&)> tweak = {},
                std::uint64_t offered = kOffered) {
  Attempt a;
  auto pair = socketpair();
  EXPECT_TRUE(pair);
  a.fake = std::make_unique<FakeBackend>(std::move(pair->second), script(offered), std::move(hook));
  FrontendOptions o = quick(std::move(pair->first));
  if (tweak) tweak(o);
  a.session = FrontendSession::connect(std::move(o));
  if (a.session) {
    if (auto r = (*a.session)->start_rings(); !r) a.session = std::unexpected(std::move(r.error()));
  }
  return a;
}

// Expects connect() and start_rings() to fail with an error whose text contains `needle`,
// without leaking fds and within `limit`.
void expect_connect_fails(FakeBackend::Hook hook, const std::string& needle,
                          std::function<void(FrontendOptions&)> tweak = {},
                          std::chrono::milliseconds limit = 3s) {
  const std::size_t before = open_fd_count();
  const auto t0 = std::chrono::steady_clock::now();
  {
    Attempt a = attempt(std::move(hook), std::move(tweak));
    ASSERT_FALSE(a.session) << "connected despite the hostile back-end";
    EXPECT_NE(a.session.error().message().find(needle), std::string::npos)
        << a.session.error().message();
  }
  EXPECT_LT(std::chrono::steady_clock::now() - t0, limit);
  EXPECT_EQ(open_fd_count(), before);
}

// ---- Options and negotiation ------------------------------------------------------------

TEST(FrontendOptionsTest, RejectsBadValuesBeforeConnecting) {
  auto bad = [](std::function<void(FrontendOptions&)> f, Errc code, const char* needle) {
    FrontendOptions o = quick({});
    o.socket_path = "/nonexistent/dir/sock";
    f(o);
    auto s = FrontendSession::connect(std::move(o));
    ASSERT_FALSE(s);
    EXPECT_EQ(s.error().code, code) << s.error().message();
    EXPECT_NE(s.error().message().find(needle), std::string::npos) << s.error().message();
  };
  bad([](auto& o) { o.socket_path.clear(); }, Errc::invalid_argument, "no socket path");
  bad([](auto& o) { o.rings = 0; }, Errc::out_of_range, "rings 0");
  bad([](auto& o) { o.rings = 257; }, Errc::out_of_range, "rings 257");
  bad([](auto& o) { o.queue_size = 100; }, Errc::invalid_argument, "queue size 100");
  bad([](auto& o) { o.queue_size = 0; }, Errc::invalid_argument, "queue size 0");
  bad([](auto& o) { o.queues.count = 3; }, Errc::out_of_range, "3 queues on 2 rings");
  bad([](auto& o) { o.ring_area_bytes = std::size_t{1} << 41; }, Errc::out_of_range, "ring area");
  bad([](auto& o) { o.memory_size = 4096; }, Errc::out_of_range, "memory size 4096 too small");
  bad([](auto& o) { o.timeout = 0ms; }, Errc::invalid_argument, "timeout");
}

TEST(FrontendOptionsTest, MissingSocketPathNamesIt) {
  FrontendOptions o = quick({});
  o.socket_path = "/nonexistent/dir/sock";
  auto s = FrontendSession::connect(std::move(o));
  ASSERT_FALSE(s);
  EXPECT_NE(s.error().message().find("connect to /nonexistent/dir/sock"), std::string::npos)
      << s.error().message();
}

TEST(FrontendOptionsTest, MemoryIsRingsThenAreasPageAligned) {
  FrontendOptions o = quick({});
  o.ring_area_bytes = 5000;  // two pages each
  // A ring of 64: desc 1024 + avail 134 + used (4-aligned) 518 bytes, one page.
  EXPECT_EQ(o.layout_bytes(), 2u * 4096 + 2u * 8192);
  Attempt a = attempt({}, [](FrontendOptions& o) { o.ring_area_bytes = 5000; });
  ASSERT_TRUE(a.session) << a.session.error().message();
  auto& s = **a.session;
  EXPECT_EQ(s.memory().size(), 2u * 4096 + 2u * 8192);
  EXPECT_EQ(s.ring(0).area_gpa, 2u * 4096);
  EXPECT_EQ(s.ring(1).area_gpa, 2u * 4096 + 8192);
  EXPECT_EQ(s.ring(1).area, s.memory().data() + s.ring(1).area_gpa);
  EXPECT_EQ(s.ring(1).area_bytes, 5000u);
  EXPECT_EQ(s.ring(1).vq.desc_gpa(), 4096u);
}

TEST(FrontendNegotiation, AcksOnlyWhatIsWantedOfferedAndDrivable) {
  // Ask for INDIRECT and bit 1 too: offered, but not something this driver drives.
  Attempt a = attempt({}, [](FrontendOptions& o) {
    o.features = kWanted | virtio::bit(virtio::feature::ring_indirect_desc) | pbit(1) | pbit(2);
  });
  ASSERT_TRUE(a.session) << a.session.error().message();
  auto& f = **a.session;
  EXPECT_EQ(f.offered_features(), kOffered);
  EXPECT_EQ(f.features(), kWanted | virtio::bit(virtio::feature::protocol_features));
  EXPECT_EQ(a.fake->set_features(), f.features());
  EXPECT_EQ(f.protocol_features(), kOfferedProtocol & kFrontendProtocolFeatures);
  EXPECT_EQ(f.backend_queue_num(), 4u);
  auto c = f.get_config(0, 6);
  ASSERT_TRUE(c) << c.error().message();
  EXPECT_EQ(*c, kConfig);
}

TEST(FrontendNegotiation, RequestSequenceAndNeedReplyFlags) {
  std::vector<Request> want = {Request::get_features,          Request::set_owner,
                               Request::get_protocol_features, Request::set_protocol_features,
                               Request::get_queue_num,         Request::set_features,
                               Request::set_mem_table};
  for (int i = 0; i < 2; ++i) {
    for (Request r : {Request::set_vring_num, Request::set_vring_base, Request::set_vring_addr,
                      Request::set_vring_call, Request::set_vring_kick}) {
      want.push_back(r);
    }
  }
  want.push_back(Request::set_vring_enable);
  want.push_back(Request::set_vring_enable);
  want.push_back(Request::get_vring_base);  // close() tears down politely
  want.push_back(Request::get_vring_base);
  Attempt b = attempt({});
  ASSERT_TRUE(b.session);
  (*b.session)->close();
  auto seen = b.fake->seen();
  const auto deadline = std::chrono::steady_clock::now() + 20s;  // bounds a failure only
  while (seen.size() < want.size() && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(1ms);
    seen = b.fake->seen();
  }
  ASSERT_EQ(seen.size(), want.size());
  for (std::size_t i = 0; i < want.size(); ++i) {
    EXPECT_EQ(seen[i].first, want[i]) << "request " << i << ": " << to_string(seen[i].first);
    // NEED_REPLY on every request without its own reply, once REPLY_ACK is negotiated.
    const bool has_body = want[i] == Request::get_features || want[i] == Request::get_queue_num ||
                          want[i] == Request::get_protocol_features ||
                          want[i] == Request::get_vring_base;
    const bool after = i > 3;
    EXPECT_EQ((seen[i].second & kNeedReplyFlag) != 0, after && !has_body) << to_string(want[i]);
  }
}

// connect() lays the rings out without showing them to the back-end: a driver fills them
// first. Stopping rings that never started has nothing to ask, and close() asks nothing.
TEST(FrontendNegotiation, RingsReachTheBackEndOnlyAtStart) {
  auto pair = socketpair();
  ASSERT_TRUE(pair);
  FakeBackend fake(std::move(pair->second), script());
  auto s = FrontendSession::connect(quick(std::move(pair->first)));
  ASSERT_TRUE(s) << s.error().message();
  // Set up and ready for the driver: its rings and areas are mapped, no kick fd yet.
  EXPECT_EQ((*s)->num_rings(), 2);
  EXPECT_EQ((*s)->ring(0).vq.free_count(), 64);
  EXPECT_FALSE((*s)->ring(0).kick.valid());
  auto b = (*s)->stop();
  ASSERT_FALSE(b);
  EXPECT_NE(b.error().message().find("never started"), std::string::npos) << b.error().message();
  (*s)->close();
  EXPECT_FALSE((*s)->start_rings());
  const auto seen = fake.seen();
  ASSERT_FALSE(seen.empty());
  EXPECT_EQ(seen.back().first, Request::set_mem_table);
  for (auto [r, flags] : seen) {
    EXPECT_NE(r, Request::set_vring_num) << "a ring reached the back-end before start_rings";
    EXPECT_NE(r, Request::get_vring_base);
  }
}

TEST(FrontendNegotiation, StartRingsOnlyOnce) {
  Attempt a = attempt({});
  ASSERT_TRUE(a.session);
  auto again = (*a.session)->start_rings();
  ASSERT_FALSE(again);
  EXPECT_EQ(again.error().code, Errc::bad_state);
}

TEST(FrontendNegotiation, WithoutProtocolFeaturesNoEnableNoAcks) {
  Attempt a = attempt({}, {}, kWanted);
  ASSERT_TRUE(a.session) << a.session.error().message();
  EXPECT_EQ((*a.session)->protocol_features(), 0u);
  EXPECT_FALSE(virtio::has((*a.session)->features(), virtio::feature::protocol_features));
  (*a.session)->close();
  for (auto [r, flags] : a.fake->seen()) {
    EXPECT_NE(r, Request::get_protocol_features);
    EXPECT_NE(r, Request::set_vring_enable);
    EXPECT_EQ(flags & kNeedReplyFlag, 0u) << to_string(r);
  }
}

TEST(FrontendNegotiation, PollModeSendsNoFds) {
  Attempt a = attempt({}, [](FrontendOptions& o) { o.notify = FrontendOptions::Notify::poll; });
  ASSERT_TRUE(a.session);
  EXPECT_FALSE((*a.session)->ring(0).kick.valid());
  EXPECT_FALSE((*a.session)->ring(1).call.valid());
  (*a.session)->kick(0);
  EXPECT_EQ((*a.session)->ring(0).kicks, 0u);
  // wait_call never sleeps in poll mode.
  const auto t0 = std::chrono::steady_clock::now();
  EXPECT_TRUE((*a.session)->wait_call(0, 5s));
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 1s);
}

TEST(FrontendNegotiation, MoreQueuesThanOneAskForMq) {
  Attempt a = attempt({}, [](FrontendOptions& o) {
    o.rings = 4;
    o.queues.count = 2;
    o.features = kWanted | pbit(kMqBit);
  });
  ASSERT_TRUE(a.session) << a.session.error().message();
  EXPECT_TRUE(virtio::has((*a.session)->features(), kMqBit));
  EXPECT_EQ((*a.session)->num_rings(), 4);
}

// ---- Hostile replies --------------------------------------------------------------------

TEST(FrontendHostile, WrongRequestNumberInReply) {
  expect_connect_fails(on(Request::get_features,
                          [](Channel& ch, const Header&) {
                            (void)ch.send(reply_u64(Request::get_queue_num, kOffered));
                            return Action::handled;
                          }),
                       "GET_FEATURES");
}

TEST(FrontendHostile, WrongReplySize) {
  expect_connect_fails(on(Request::get_protocol_features,
                          [](Channel& ch, const Header&) {
                            OutMessage m =
                                reply_u64(Request::get_protocol_features, kOfferedProtocol);
                            m.header.size = 4;
                            (void)ch.send(m);
                            return Action::handled;
                          }),
                       "GET_PROTOCOL_FEATURES");
}

TEST(FrontendHostile, ReplyWithoutReplyFlag) {
  expect_connect_fails(on(Request::get_features,
                          [](Channel& ch, const Header&) {
                            OutMessage m = reply_u64(Request::get_features, kOffered);
                            m.header.flags = kVersion;
                            (void)ch.send(m);
                            return Action::handled;
                          }),
                       "GET_FEATURES");
}

TEST(FrontendHostile, FdAttachedToReplyIsClosed) {
  expect_connect_fails(on(Request::get_features,
                          [](Channel& ch, const Header&) {
                            UniqueFd fd(::eventfd(0, EFD_CLOEXEC));
                            const int fds[1] = {fd.get()};
                            OutMessage m = reply_u64(Request::get_features, kOffered);
                            (void)ch.send(m.header, m.payload(), fds);
                            return Action::handled;
                          }),
                       "GET_FEATURES");
}

TEST(FrontendHostile, FdAttachedToAckIsClosed) {
  expect_connect_fails(on(Request::set_mem_table,
                          [](Channel& ch, const Header&) {
                            UniqueFd fd(::eventfd(0, EFD_CLOEXEC));
                            const int fds[1] = {fd.get()};
                            OutMessage m = reply_ack(Request::set_mem_table, true);
                            (void)ch.send(m.header, m.payload(), fds);
                            return Action::handled;
                          }),
                       "SET_MEM_TABLE");
}

TEST(FrontendHostile, NegativeAckNamesRequestAndRing) {
  int n = 0;
  expect_connect_fails(on(Request::set_vring_addr,
                          [&n](Channel& ch, const Header&) {
                            if (n++ == 0) return Action::normal;  // ring 0 fine, ring 1 refused
                            (void)ch.send(reply_ack(Request::set_vring_addr, false));
                            return Action::handled;
                          }),
                       "SET_VRING_ADDR ring 1: the back-end refused it");
}

TEST(FrontendHostile, HangUpMidNegotiation) {
  expect_connect_fails(
      on(Request::set_mem_table, [](Channel&, const Header&) { return Action::hang_up; }),
      "SET_MEM_TABLE");
}

TEST(FrontendHostile, HangUpBeforeFirstReply) {
  expect_connect_fails(
      on(Request::get_features, [](Channel&, const Header&) { return Action::hang_up; }),
      "GET_FEATURES");
}

TEST(FrontendHostile, SilentBackendTimesOut) {
  expect_connect_fails(on(Request::set_vring_kick,
                          [](Channel&, const Header&) {
                            return Action::handled;  // never acks
                          }),
                       "SET_VRING_KICK ring 0: no reply from the back-end within 300 ms", {}, 2s);
}

TEST(FrontendHostile, QueueNumBelowQueues) {
  expect_connect_fails(on(Request::get_queue_num,
                          [](Channel& ch, const Header&) {
                            (void)ch.send(reply_u64(Request::get_queue_num, 1));
                            return Action::handled;
                          }),
                       "GET_QUEUE_NUM: the back-end has 1 queues, 2 queues wanted",
                       [](FrontendOptions& o) {
                         o.rings = 2;
                         o.queues.count = 2;
                         o.features = kWanted | pbit(kMqBit);
                       });
}

TEST(FrontendHostile, MqWantedButNotOffered) {
  const std::size_t before = open_fd_count();
  {
    Attempt a = attempt(
        {},
        [](FrontendOptions& o) {
          o.queues.count = 2;
          o.features = kWanted | pbit(kMqBit);
        },
        kOffered & ~pbit(kMqBit));
    ASSERT_FALSE(a.session);
    EXPECT_NE(a.session.error().message().find("2 queues wanted but VIRTIO_X_F_MQ is not offered"),
              std::string::npos)
        << a.session.error().message();
  }
  EXPECT_EQ(open_fd_count(), before);
}

TEST(FrontendHostile, VringBaseReplyForAnotherRing) {
  const std::size_t before = open_fd_count();
  {
    Attempt a = attempt(on(Request::get_vring_base, [](Channel& ch, const Header&) {
      (void)ch.send(reply_vring_state(Request::get_vring_base, 5, 0));
      return Action::handled;
    }));
    ASSERT_TRUE(a.session);
    auto b = (*a.session)->stop();
    ASSERT_FALSE(b);
    EXPECT_NE(b.error().message().find("GET_VRING_BASE ring 0: the reply names ring 5"),
              std::string::npos)
        << b.error().message();
  }
  EXPECT_EQ(open_fd_count(), before);
}

TEST(FrontendHostile, VringBaseOver16Bits) {
  Attempt a = attempt(on(Request::get_vring_base, [](Channel& ch, const Header&) {
    (void)ch.send(reply_vring_state(Request::get_vring_base, 0, 0x10000));
    return Action::handled;
  }));
  ASSERT_TRUE(a.session);
  auto b = (*a.session)->stop();
  ASSERT_FALSE(b);
  EXPECT_NE(b.error().message().find("16 bits"), std::string::npos) << b.error().message();
}

TEST(FrontendHostile, ConfigReplyOfWrongSize) {
  Attempt a = attempt(on(Request::get_config, [](Channel& ch, const Header&) {
    const std::uint8_t two[2] = {1, 2};
    (void)ch.send(reply_config(0, 0, two));
    return Action::handled;
  }));
  ASSERT_TRUE(a.session);
  auto m = (*a.session)->get_config(0, 6);
  ASSERT_FALSE(m);
  EXPECT_NE(m.error().message().find("GET_CONFIG"), std::string::npos) << m.error().message();
}

TEST(FrontendHostile, ConfigRefused) {
  Attempt a = attempt(on(Request::get_config, [](Channel& ch, const Header&) {
    (void)ch.send(reply_config(0, 0, {}));
    return Action::handled;
  }));
  ASSERT_TRUE(a.session);
  auto m = (*a.session)->get_config(0, 6);
  ASSERT_FALSE(m);
  EXPECT_NE(m.error().message().find("refused"), std::string::npos) << m.error().message();
}

TEST(FrontendHostile, HangUpAtTeardownDoesNotHang) {
  const auto t0 = std::chrono::steady_clock::now();
  Attempt a =
      attempt(on(Request::get_vring_base, [](Channel&, const Header&) { return Action::hang_up; }));
  ASSERT_TRUE(a.session);
  auto b = (*a.session)->stop();
  ASSERT_FALSE(b);
  EXPECT_NE(b.error().message().find("GET_VRING_BASE ring 0"), std::string::npos);
  a.session->reset();
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 2s);
}

// ---- Kick and call -------------------------------------------------------------------

TEST(FrontendNotify, EventModeWaitCallTimesOutThenWakes) {
  Attempt a = attempt({});
  ASSERT_TRUE(a.session);
  auto& s = **a.session;
  const auto t0 = std::chrono::steady_clock::now();
  EXPECT_FALSE(s.wait_call(0, 50ms));
  EXPECT_GE(std::chrono::steady_clock::now() - t0, 40ms);
  const std::uint64_t one = 1;
  ASSERT_EQ(::write(s.ring(0).call.get(), &one, 8), 8);  // the device calls
  EXPECT_TRUE(s.wait_call(0, 5s));
  EXPECT_EQ(s.ring(0).calls, 1u);
}

TEST(FrontendNotify, KickIfNeededFollowsTheDevice) {
  Attempt a = attempt({});
  ASSERT_TRUE(a.session);
  auto& s = **a.session;
  FrontendRing& r = s.ring(1);
  const virtq::DriverQueue::Buffer b{r.area_gpa, 64};
  ASSERT_TRUE(r.vq.add(std::span(&b, 1), {}, 0));
  r.vq.publish();
  // EVENT_IDX: avail_event is 0 and the avail index moved past it: the device wants a kick.
  EXPECT_TRUE(s.kick_if_needed(1));
  EXPECT_EQ(r.kicks, 1u);
  std::uint64_t v = 0;
  EXPECT_EQ(::read(r.kick.get(), &v, sizeof v), 8);
  EXPECT_EQ(v, 1u);
  // No new buffer since: nothing to kick for.
  EXPECT_FALSE(s.kick_if_needed(1));
  EXPECT_EQ(r.kicks, 1u);
}

TEST(FrontendLifecycle, CloseIsIdempotentAndReleasesEverything) {
  const std::size_t before = open_fd_count();
  {
    Attempt a = attempt({});
    ASSERT_TRUE(a.session);
    auto bases = (*a.session)->stop();
    ASSERT_TRUE(bases);
    EXPECT_EQ(*bases, (std::vector<std::uint32_t>{7, 7}));
    EXPECT_EQ(*(*a.session)->stop(), *bases);  // idempotent, no second round trip
    (*a.session)->close();
    (*a.session)->close();
    EXPECT_EQ((*a.session)->socket_fd(), -1);
    EXPECT_TRUE((*a.session)->memory().data() == nullptr);
  }
  EXPECT_EQ(open_fd_count(), before);
}

}  // namespace
}  // namespace vhostkit::vhost_user
