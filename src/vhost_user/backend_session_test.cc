// BackendSession and BackendServer against a test front-end over real sockets.
#include "vhostkit/vhost_user/backend_session.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>

#include <atomic>
#include <cstring>
#include <thread>

#include <fmt/format.h>

#include "testing/backend_rig.h"
#include "testing/sockets.h"
#include "vhostkit/vhost_user/server.h"

namespace vhostkit::vhost_user {
namespace {

using namespace std::chrono_literals;
using test::EchoBackend;
using test::FrontendOptions;
using test::TestFrontend;

// Session driven synchronously: every request the front-end sends is served at once on the
// test's thread, so the session's state can be checked between requests.
struct Sync {
  explicit Sync(SessionOptions opts = {}) {
    auto pair = socketpair();
    EXPECT_TRUE(pair.has_value());
    session = std::make_unique<BackendSession>(device, std::move(pair->first), std::move(opts));
    fe = std::make_unique<TestFrontend>(std::move(pair->second), [this] {
      auto r = session->serve_one();
      served_ok = r.has_value();
    });
  }
  // Nothing more from the session waiting on the front-end's socket.
  bool quiet() {
    pollfd p{fe->channel().fd(), POLLIN, 0};
    return ::poll(&p, 1, 0) == 0;
  }

  EchoBackend backend;
  vhost::Device device{backend, vhost::DeviceOptions{.name = "vk-sync"}};
  std::unique_ptr<BackendSession> session;
  std::unique_ptr<TestFrontend> fe;
  bool served_ok = true;
};

TEST(BackendSession, FullNegotiationTrafficGetVringBaseAndTeardown) {
  test::ThreadedSession ts;
  auto pair = socketpair();
  ASSERT_TRUE(pair);
  std::thread t = ts.start(std::move(pair->first));
  {
    TestFrontend fe(std::move(pair->second));
    auto n = fe.negotiate();
    ASSERT_TRUE(n) << n.error().message();
    for (int i = 0; i < 10; ++i) {
      auto e = fe.echo(0, 100 + i, static_cast<std::uint8_t>(i));
      ASSERT_TRUE(e) << e.error().message();
      EXPECT_EQ(*e, 100u + i);
    }
    for (int i = 0; i < 3; ++i) ASSERT_TRUE(fe.echo(1, 1500));
    auto b0 = fe.get_vring_base(0);
    ASSERT_TRUE(b0) << b0.error().message();
    EXPECT_EQ(b0->index, 0u);
    EXPECT_EQ(b0->num, 10u);
    auto b1 = fe.get_vring_base(1);
    ASSERT_TRUE(b1);
    EXPECT_EQ(b1->index, 1u);
    EXPECT_EQ(b1->num, 3u);
    EXPECT_FALSE(ts.device.queue(0).started());
    fe.disconnect();
  }
  t.join();
  EXPECT_TRUE(ts.result) << ts.result.error().message();
  // Teardown reset the device: no owner, no memory.
  EXPECT_FALSE(ts.device.has_owner());
  EXPECT_EQ(ts.device.memory().region_count(), 0u);
}

TEST(BackendSession, RestartFromBaseAfterGetVringBase) {
  Sync s;
  ASSERT_TRUE(s.fe->negotiate());
  ASSERT_TRUE(s.fe->echo(0, 32));
  ASSERT_TRUE(s.fe->echo(0, 32));
  auto b = s.fe->get_vring_base(0);
  ASSERT_TRUE(b);
  EXPECT_EQ(b->num, 2u);
  // The driver queue keeps its indices; resume from base 2 with a new kick.
  ASSERT_TRUE(s.fe->ok(SetVringBase{0, b->num}));
  SetVringKick k;
  k.index = 0;
  k.fd = test::make_eventfd();
  ASSERT_TRUE(s.fe->ok(k));
  // A new kick after GET_VRING_BASE restarts the ring from the base.
  EXPECT_TRUE(s.device.queue(0).started());
}

TEST(BackendSession, ReplyAckSuccessAndFailure) {
  Sync s;
  ASSERT_TRUE(s.fe->handshake());
  ASSERT_TRUE(s.fe->need_reply());
  auto bad = s.fe->request(SetVringNum{0, 3});  // not a power of two
  ASSERT_TRUE(bad);
  EXPECT_NE(*bad, 0u);
  EXPECT_EQ(s.session->last_error().code, Errc::invalid_argument);
  auto good = s.fe->request(SetVringNum{0, 256});
  ASSERT_TRUE(good);
  EXPECT_EQ(*good, 0u);
  // Without NEED_REPLY nothing comes back, success or failure.
  ASSERT_TRUE(s.fe->request(SetVringNum{0, 5}, false));
  EXPECT_TRUE(s.quiet());
  EXPECT_TRUE(s.served_ok);
  EXPECT_GE(s.session->stats().failed, 2u);
}

TEST(BackendSession, NoAckWhenReplyAckNotNegotiated) {
  Sync s;
  FrontendOptions o;
  o.reply_ack = false;
  ASSERT_TRUE(s.fe->handshake(o));
  EXPECT_FALSE(s.fe->need_reply());
  // NEED_REPLY set, but REPLY_ACK was not negotiated: the back-end must not answer.
  ASSERT_TRUE(s.fe->channel().send_message(SetVringNum{0, 256}, kNeedReplyFlag));
  ASSERT_TRUE(s.session->serve_one());
  EXPECT_TRUE(s.quiet());
  EXPECT_EQ(s.session->stats().acks, 0u);
}

TEST(BackendSession, OwnReplyIsTheOnlyReplyEvenWithNeedReply) {
  Sync s;
  ASSERT_TRUE(s.fe->handshake());
  ASSERT_TRUE(s.fe->channel().send_message(GetQueueNum{}, kNeedReplyFlag));
  ASSERT_TRUE(s.session->serve_one());
  auto rep = s.fe->channel().recv();
  ASSERT_TRUE(rep);
  auto n = decode_u64_reply(*rep, Request::get_queue_num);
  ASSERT_TRUE(n);
  EXPECT_EQ(*n, 2u);
  EXPECT_TRUE(s.quiet());
}

TEST(BackendSession, ProtocolFeatureNegotiation) {
  Sync s;
  auto f = s.fe->get(GetFeatures{});
  ASSERT_TRUE(f);
  EXPECT_TRUE(*f & virtio::bit(virtio::feature::protocol_features));
  EXPECT_TRUE(*f & virtio::bit(virtio::feature::log_all));  // live migration
  EXPECT_TRUE(*f & virtio::bit(virtio::feature::version_1));
  auto p = s.fe->get(GetProtocolFeatures{});
  ASSERT_TRUE(p);
  EXPECT_EQ(*p, kSupportedProtocolFeatures & ~protocol_bit(protocol_feature::net_mtu) &
                    ~protocol_bit(protocol_feature::inflight_shmfd))
      << "NET_MTU is offered only with a set_mtu hook, INFLIGHT_SHMFD only to a device that "
         "tracks its requests";
  // A bit we did not offer: refused, nothing negotiated.
  ASSERT_TRUE(
      s.fe->request(SetProtocolFeatures{*p | protocol_bit(protocol_feature::backend_req)}, false));
  EXPECT_EQ(s.session->protocol_features(), 0u);
  EXPECT_EQ(s.session->last_error().code, Errc::unsupported);
  // A subset is taken as is.
  const std::uint64_t sub =
      protocol_bit(protocol_feature::reply_ack) | protocol_bit(protocol_feature::mq);
  ASSERT_TRUE(s.fe->request(SetProtocolFeatures{sub}, false));
  EXPECT_EQ(s.session->protocol_features(), sub);
}

TEST(BackendSession, MtuHookOffersNetMtu) {
  std::uint16_t got = 0;
  SessionOptions o;
  o.set_mtu = [&](std::uint16_t mtu) -> Result<> {
    got = mtu;
    return {};
  };
  Sync s(o);
  auto p = s.fe->get(GetProtocolFeatures{});
  ASSERT_TRUE(p);
  EXPECT_TRUE(*p & protocol_bit(protocol_feature::net_mtu));
  ASSERT_TRUE(s.fe->handshake());
  auto ack = s.fe->request(NetSetMtu{1500});
  ASSERT_TRUE(ack);
  EXPECT_EQ(*ack, 0u);
  EXPECT_EQ(got, 1500);
  auto small = s.fe->request(NetSetMtu{40});
  ASSERT_TRUE(small);
  EXPECT_NE(*small, 0u);
  EXPECT_EQ(got, 1500);
}

TEST(BackendSession, SendRarpGoesToTheHookOrIsRefused) {
  Mac seen{};
  SessionOptions o;
  o.send_rarp = [&](const Mac& m) -> Result<> {
    seen = m;
    return {};
  };
  {
    Sync s(o);
    ASSERT_TRUE(s.fe->handshake());
    SendRarp r;
    r.mac = {0x52, 0x54, 0, 0x12, 0x34, 0x56};
    auto ack = s.fe->request(r);
    ASSERT_TRUE(ack);
    EXPECT_EQ(*ack, 0u);
    EXPECT_EQ(seen, r.mac);
  }
  Sync s2;  // no hook: refused
  ASSERT_TRUE(s2.fe->handshake());
  auto ack = s2.fe->request(SendRarp{});
  ASSERT_TRUE(ack);
  EXPECT_NE(*ack, 0u);
}

TEST(BackendSession, RingEnabledByKickWithoutProtocolFeatures) {
  Sync s;
  FrontendOptions o;
  o.protocol_features = false;
  ASSERT_TRUE(s.fe->negotiate(o));
  EXPECT_EQ(s.session->protocol_features(), 0u);
  EXPECT_TRUE(s.device.queue(0).is_enabled());
  EXPECT_TRUE(s.device.queue(0).started());
  auto e = s.fe->echo(0, 64);
  ASSERT_TRUE(e) << e.error().message();
}

TEST(BackendSession, RingDisabledUntilEnableWithProtocolFeatures) {
  Sync s;
  FrontendOptions o;
  o.enable_rings = false;
  ASSERT_TRUE(s.fe->negotiate(o));
  EXPECT_FALSE(s.device.queue(0).is_enabled());
  EXPECT_FALSE(s.device.queue(0).started());
  auto e = s.fe->echo(0, 64, 1, 200ms);
  EXPECT_FALSE(e) << "a disabled ring must not be served";
  ASSERT_TRUE(s.fe->ok(SetVringEnable{0, 1}));
  EXPECT_TRUE(s.device.queue(0).started());
  // The chain added while disabled is served now; a new one too.
  std::optional<virtq::DriverQueue::Used> first;
  const auto used_deadline = std::chrono::steady_clock::now() + 20s;  // bounds a failure only
  while (!first && std::chrono::steady_clock::now() < used_deadline) {
    first = s.fe->driver_queue(0).get_used();
    if (!first) std::this_thread::sleep_for(1ms);
  }
  ASSERT_TRUE(first.has_value()) << "the chain queued while disabled was not served";
  EXPECT_EQ(first->len, 64u);
  auto e2 = s.fe->echo(0, 64);
  ASSERT_TRUE(e2) << e2.error().message();
  ASSERT_TRUE(s.fe->ok(SetVringEnable{0, 0}));
  EXPECT_FALSE(s.device.queue(0).started());
}

TEST(BackendSession, GetAndSetConfig) {
  Sync s;
  ASSERT_TRUE(s.fe->handshake());
  auto c = s.fe->get_config(0, 16);
  ASSERT_TRUE(c) << c.error().message();
  ASSERT_EQ(c->data.size(), 16u);
  EXPECT_EQ(c->data[0], 0xa0);
  EXPECT_EQ(c->data[15], 0xaf);
  // Past the end: the device refuses and the reply is empty.
  auto past = s.fe->get_config(8, 100);
  ASSERT_TRUE(past);
  EXPECT_TRUE(past->data.empty());
  SetConfig w;
  w.offset = 8;
  w.data = {1, 2, 3};
  auto ack = s.fe->request(w);
  ASSERT_TRUE(ack);
  EXPECT_EQ(*ack, 0u);
  auto c2 = s.fe->get_config(8, 3);
  ASSERT_TRUE(c2);
  EXPECT_EQ(c2->data, (std::vector<std::uint8_t>{1, 2, 3}));
  SetConfig ro;
  ro.offset = 0;
  ro.data = {9};
  auto ack2 = s.fe->request(ro);
  ASSERT_TRUE(ack2);
  EXPECT_NE(*ack2, 0u) << "read-only bytes";
}

TEST(BackendSession, GetConfigWithoutConfigFeatureIsAnEmptyReply) {
  Sync s;
  auto c = s.fe->get_config(0, 4);  // nothing negotiated yet
  ASSERT_TRUE(c);
  EXPECT_TRUE(c->data.empty());
  EXPECT_TRUE(s.served_ok);
}

TEST(BackendSession, AddAndRemoveMemoryRegions) {
  Sync s;
  ASSERT_TRUE(s.fe->handshake());
  AddMemReg add;
  add.region = memory::RegionFd{s.fe->region(), s.fe->dup_memfd()};
  ASSERT_TRUE(s.fe->ok(add));
  EXPECT_EQ(s.device.memory().region_count(), 1u);
  for (std::uint32_t i = 0; i < 2; ++i) ASSERT_TRUE(s.fe->setup_ring(i));
  ASSERT_TRUE(s.fe->echo(0, 128));
  // The rings live in that region: removing it under running rings is refused.
  auto busy = s.fe->request(RemMemReg{s.fe->region()});
  ASSERT_TRUE(busy);
  EXPECT_NE(*busy, 0u);
  EXPECT_EQ(s.device.memory().region_count(), 1u);
  ASSERT_TRUE(s.fe->get_vring_base(0));
  ASSERT_TRUE(s.fe->get_vring_base(1));
  ASSERT_TRUE(s.fe->ok(RemMemReg{s.fe->region()}));
  EXPECT_EQ(s.device.memory().region_count(), 0u);
  // Removing it again: not there.
  auto again = s.fe->request(RemMemReg{s.fe->region()});
  ASSERT_TRUE(again);
  EXPECT_NE(*again, 0u);
}

TEST(BackendSession, QueriesAnswerAlways) {
  Sync s;
  auto slots = s.fe->get(GetMaxMemSlots{});
  ASSERT_TRUE(slots);
  EXPECT_EQ(*slots, 509u);
  auto q = s.fe->get(GetQueueNum{});
  ASSERT_TRUE(q);
  EXPECT_EQ(*q, 2u);
  auto st = s.fe->get(GetStatus{});
  ASSERT_TRUE(st);
  EXPECT_EQ(*st, 0u);
}

TEST(BackendSession, QueueNumOption) {
  SessionOptions o;
  o.queue_num = 1;
  Sync s(o);
  auto q = s.fe->get(GetQueueNum{});
  ASSERT_TRUE(q);
  EXPECT_EQ(*q, 1u);
}

TEST(BackendSession, SetAndGetStatus) {
  Sync s;
  ASSERT_TRUE(s.fe->handshake());
  ASSERT_TRUE(s.fe->ok(SetStatus{0x0f}));
  auto st = s.fe->get(GetStatus{});
  ASSERT_TRUE(st);
  EXPECT_EQ(*st, 0x0fu);
  auto big = s.fe->request(SetStatus{0x100});
  ASSERT_TRUE(big);
  EXPECT_NE(*big, 0u);
}

TEST(BackendSession, ResetDeviceKeepsOwnershipAndAllowsRenegotiation) {
  Sync s;
  ASSERT_TRUE(s.fe->negotiate());
  ASSERT_TRUE(s.fe->echo(0, 64));
  ASSERT_TRUE(s.fe->ok(ResetDevice{}));
  EXPECT_TRUE(s.device.has_owner());
  EXPECT_FALSE(s.device.queue(0).started());
  EXPECT_EQ(s.device.memory().region_count(), 0u);
  EXPECT_NE(s.session->protocol_features(), 0u) << "protocol features belong to the connection";
  // Set everything up again, as a front-end does after a reset (fresh driver rings).
  ASSERT_TRUE(s.fe->ok(SetFeatures{s.fe->features()}));
  ASSERT_TRUE(s.fe->set_mem_table());
  for (std::uint32_t i = 0; i < 2; ++i) ASSERT_TRUE(s.fe->setup_ring(i));
  auto e = s.fe->echo(1, 200);
  ASSERT_TRUE(e) << e.error().message();
}

TEST(BackendSession, ResetOwnerDisablesRings) {
  Sync s;
  ASSERT_TRUE(s.fe->negotiate());
  ASSERT_TRUE(s.fe->ok(ResetOwner{}));
  EXPECT_FALSE(s.device.queue(0).started());
  EXPECT_FALSE(s.device.queue(1).started());
  EXPECT_TRUE(s.device.has_owner());
}

TEST(BackendSession, RequestsBeforeSetOwnerAreRefused) {
  Sync s;
  // REPLY_ACK can be negotiated before SET_OWNER.
  auto p = s.fe->get(GetProtocolFeatures{});
  ASSERT_TRUE(p);
  ASSERT_TRUE(s.fe->request(SetProtocolFeatures{*p}, false));
  SetMemTable t;
  t.regions.push_back(memory::RegionFd{s.fe->region(), s.fe->dup_memfd()});
  auto a = s.fe->request(t, true);
  ASSERT_TRUE(a);
  EXPECT_NE(*a, 0u);
  EXPECT_EQ(s.device.memory().region_count(), 0u);
  for (auto ack : {s.fe->request(SetVringNum{0, 64}, true), s.fe->request(SetStatus{1}, true),
                   s.fe->request(ResetOwner{}, true)}) {
    ASSERT_TRUE(ack);
    EXPECT_NE(*ack, 0u);
  }
  EXPECT_TRUE(s.served_ok);
  ASSERT_TRUE(s.fe->ok(SetOwner{}));
}

TEST(BackendSession, SetLogBaseRepliesWithLogShmfd) {
  Sync s;
  ASSERT_TRUE(s.fe->handshake());
  UniqueFd log(::memfd_create("vk-log", MFD_CLOEXEC));
  ASSERT_EQ(::ftruncate(log.get(), 4096), 0);
  SetLogBase m;
  m.mmap_size = 4096;
  m.fd = std::move(log);
  ASSERT_TRUE(s.fe->channel().send_message(m));
  ASSERT_TRUE(s.session->serve_one());
  auto rep = s.fe->channel().recv();
  ASSERT_TRUE(rep);
  auto v = decode_u64_reply(*rep, Request::set_log_base);
  ASSERT_TRUE(v);
  EXPECT_EQ(*v, 0u);
  EXPECT_TRUE(s.quiet());
}

TEST(BackendSession, UnsupportedRequestIsRefusedAndServingGoesOn) {
  Sync s;
  ASSERT_TRUE(s.fe->handshake());
  auto a = s.fe->request(PostcopyListen{}, true);
  ASSERT_TRUE(a);
  EXPECT_NE(*a, 0u);
  EXPECT_EQ(s.session->last_error().code, Errc::unsupported);
  // A request with its own reply gets a failure reply even without NEED_REPLY.
  auto end = s.fe->get(PostcopyEnd{});
  ASSERT_TRUE(end);
  EXPECT_NE(*end, 0u);
  ASSERT_TRUE(s.fe->set_mem_table());
}

// ---- the server -------------------------------------------------------------------------

Result<Channel> connect_retry(const std::string& path, std::chrono::milliseconds total = 20000ms) {
  const auto deadline = std::chrono::steady_clock::now() + total;
  for (;;) {
    auto ch = connect_unix(path);
    if (ch || std::chrono::steady_clock::now() > deadline) return ch;
    std::this_thread::sleep_for(10ms);
  }
}

void negotiate_and_echo(Channel ch) {
  TestFrontend fe(std::move(ch));
  auto n = fe.negotiate();
  ASSERT_TRUE(n) << n.error().message();
  auto e = fe.echo(0, 300);
  ASSERT_TRUE(e) << e.error().message();
}

TEST(BackendServer, ServesTwoFrontendsInTurnAndRemovesStaleSocket) {
  const vhostkit::testing::TempSocketDir tmp;
  const std::string path = tmp.path("two.sock");
  {
    // A stale socket: bound, never listened on, left behind.
    UniqueFd s(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
    sockaddr_un a{};
    a.sun_family = AF_UNIX;
    std::strncpy(a.sun_path, path.c_str(), sizeof(a.sun_path) - 1);
    ::unlink(path.c_str());
    ASSERT_EQ(::bind(s.get(), reinterpret_cast<sockaddr*>(&a), sizeof(a)), 0);
  }
  EchoBackend backend;
  vhost::Device device(backend, {});
  BackendServer server(device, ServerOptions::listen(path));
  UniqueFd stop = test::make_eventfd();
  Result<> result;
  std::thread t([&] { result = server.run(stop.get()); });
  for (int i = 0; i < 2; ++i) {
    auto ch = connect_retry(path);
    ASSERT_TRUE(ch) << ch.error().message();
    negotiate_and_echo(std::move(*ch));
  }
  const std::uint64_t one = 1;
  ASSERT_EQ(::write(stop.get(), &one, sizeof one), 8);
  t.join();
  EXPECT_TRUE(result) << result.error().message();
  EXPECT_EQ(server.sessions(), 2u);
  struct stat st{};
  EXPECT_NE(::lstat(path.c_str(), &st), 0) << "socket file removed on exit";
}

TEST(BackendServer, UnbindablePathIsAClearError) {
  EchoBackend backend;
  vhost::Device device(backend, {});
  BackendServer server(device, ServerOptions::listen("/nonexistent-vk-dir/y.sock"));
  auto r = server.run(-1);
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().detail,
            "cannot listen on /nonexistent-vk-dir/y.sock: No such file or directory");
}

TEST(BackendServer, ClientModeConnectsLateAndReconnects) {
  const vhostkit::testing::TempSocketDir tmp;
  const std::string path = tmp.path("client.sock");
  ::unlink(path.c_str());
  EchoBackend backend;
  vhost::Device device(backend, {});
  auto opts = ServerOptions::connect(path);
  opts.reconnect_initial = 20ms;
  opts.reconnect_max = 100ms;
  BackendServer server(device, opts);
  UniqueFd stop = test::make_eventfd();
  Result<> result;
  std::thread t([&] { result = server.run(stop.get()); });
  // Nobody listening yet: the back-end retries (the deadline bounds a failure only).
  const auto retry_deadline = std::chrono::steady_clock::now() + 20s;
  while (server.failed_connects() == 0 && std::chrono::steady_clock::now() < retry_deadline) {
    std::this_thread::sleep_for(1ms);
  }
  EXPECT_GT(server.failed_connects(), 0u);
  auto listener = listen_unix(path);
  ASSERT_TRUE(listener) << listener.error().message();
  for (int i = 0; i < 2; ++i) {
    pollfd p{listener->get(), POLLIN, 0};
    ASSERT_EQ(::poll(&p, 1, 20000), 1) << "back-end (re)connected, round " << i;
    auto ch = accept(listener->get());
    ASSERT_TRUE(ch);
    negotiate_and_echo(std::move(*ch));  // then the front-end drops the connection
  }
  const std::uint64_t one = 1;
  ASSERT_EQ(::write(stop.get(), &one, sizeof one), 8);
  t.join();
  EXPECT_TRUE(result);
  EXPECT_GE(server.sessions(), 2u);
  ::unlink(path.c_str());
}

TEST(BackendServer, InheritedFdIsServedOnce) {
  auto pair = socketpair();
  ASSERT_TRUE(pair);
  EchoBackend backend;
  vhost::Device device(backend, {});
  BackendServer server(device, ServerOptions::inherited(pair->first.release().release()));
  Result<> result = fail(Errc::bad_state, "not run");
  std::thread t([&] { result = server.run(-1); });
  negotiate_and_echo(std::move(pair->second));
  t.join();
  EXPECT_TRUE(result);
  EXPECT_EQ(server.sessions(), 1u);
}

TEST(BackendServer, InheritedFdThatIsNotASocketIsRefused) {
  EchoBackend backend;
  vhost::Device device(backend, {});
  BackendServer server(device, ServerOptions::inherited(::memfd_create("x", MFD_CLOEXEC)));
  auto r = server.run(-1);
  ASSERT_FALSE(r);
  EXPECT_NE(r.error().detail.find("not a socket"), std::string::npos) << r.error().detail;
}

TEST(BackendServer, DisconnectMidTrafficThenReconnect) {
  const vhostkit::testing::TempSocketDir tmp;
  const std::string path = tmp.path("mid.sock");
  EchoBackend backend;
  vhost::Device device(backend, {});
  BackendServer server(device, ServerOptions::listen(path));
  UniqueFd stop = test::make_eventfd();
  std::thread t([&] { (void)server.run(stop.get()); });
  {
    auto ch = connect_retry(path);
    ASSERT_TRUE(ch);
    TestFrontend fe(std::move(*ch));
    ASSERT_TRUE(fe.negotiate());
    // Queue chains and hang up without waiting for them.
    for (int i = 0; i < 20; ++i) {
      auto& dq = fe.driver_queue(static_cast<std::uint32_t>(i % 2));
      const virtq::DriverQueue::Buffer out{TestFrontend::kGpaBase + TestFrontend::kDataOffset, 64};
      const virtq::DriverQueue::Buffer in{TestFrontend::kGpaBase + TestFrontend::kDataOffset + 4096,
                                          64};
      (void)dq.add({&out, 1}, {&in, 1}, i);
      dq.publish();
    }
    fe.disconnect();
  }
  auto ch = connect_retry(path);
  ASSERT_TRUE(ch);
  negotiate_and_echo(std::move(*ch));
  const std::uint64_t one = 1;
  ASSERT_EQ(::write(stop.get(), &one, sizeof one), 8);
  t.join();
  EXPECT_EQ(server.sessions(), 2u);
}

TEST(BackendServer, ReadyMeansConnectable) {
  const vhostkit::testing::TempSocketDir tmp;
  const std::string path = tmp.path("ready.sock");
  EchoBackend backend;
  vhost::Device device(backend, {});
  auto opts = ServerOptions::listen(path);
  int ready_calls = 0;
  bool connectable = false;
  std::string where;
  opts.on_ready = [&](const std::string& w) {
    ++ready_calls;
    where = w;
    connectable = connect_unix(path).has_value();  // what systemd's READY=1 promises
  };
  BackendServer server(device, opts);
  UniqueFd stop = test::make_eventfd();
  std::thread t([&] { (void)server.run(stop.get()); });
  for (int i = 0; i < 2; ++i) {
    auto ch = connect_retry(path);
    ASSERT_TRUE(ch);
    negotiate_and_echo(std::move(*ch));
  }
  const std::uint64_t one = 1;
  ASSERT_EQ(::write(stop.get(), &one, sizeof one), 8);
  t.join();
  EXPECT_EQ(ready_calls, 1);  // once, not per front-end
  EXPECT_TRUE(connectable);
  EXPECT_EQ(where, "listening on " + path);
}

TEST(BackendServer, InheritedListenerServesFrontendsInTurnAndKeepsTheFile) {
  const vhostkit::testing::TempSocketDir tmp;
  const std::string path = tmp.path("activated.sock");
  auto listener = listen_unix(path);
  ASSERT_TRUE(listener) << listener.error().message();
  const int fd = listener->release();
  EchoBackend backend;
  vhost::Device device(backend, {});
  auto opts = ServerOptions::inherited_listener(fd);
  std::string where;
  opts.on_ready = [&](const std::string& w) { where = w; };
  BackendServer server(device, opts);
  UniqueFd stop = test::make_eventfd();
  Result<> result = fail(Errc::bad_state, "not run");
  std::thread t([&] { result = server.run(stop.get()); });
  for (int i = 0; i < 2; ++i) {
    auto ch = connect_retry(path);
    ASSERT_TRUE(ch);
    negotiate_and_echo(std::move(*ch));
  }
  const std::uint64_t one = 1;
  ASSERT_EQ(::write(stop.get(), &one, sizeof one), 8);
  t.join();
  EXPECT_TRUE(result) << result.error().message();
  EXPECT_EQ(server.sessions(), 2u);
  EXPECT_EQ(where, fmt::format("listening on inherited fd {}", fd));
  // The file belongs to whoever made the socket (systemd), not to the server.
  struct stat st{};
  EXPECT_EQ(::lstat(path.c_str(), &st), 0);
  EXPECT_TRUE(S_ISSOCK(st.st_mode));
  // The server owned and closed the fd.
  EXPECT_EQ(::fcntl(fd, F_GETFD), -1);
  ::unlink(path.c_str());
}

TEST(BackendServer, InheritedListenerMustListenOnAUnixStreamSocket) {
  EchoBackend backend;
  vhost::Device device(backend, {});
  auto refused = [&](int fd, const char* why) {
    BackendServer server(device, ServerOptions::inherited_listener(fd));
    auto r = server.run(-1);
    ASSERT_FALSE(r) << "fd " << fd;
    EXPECT_NE(r.error().detail.find(why), std::string::npos) << r.error().detail;
  };
  const vhostkit::testing::TempSocketDir tmp;
  const std::string path = tmp.path("bound.sock");
  const int bound = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::memcpy(addr.sun_path, path.c_str(), path.size());
  ASSERT_EQ(::bind(bound, reinterpret_cast<const sockaddr*>(&addr), sizeof addr), 0);
  refused(bound, "not a listening unix stream socket");
  ::unlink(path.c_str());
  auto pair = socketpair();
  ASSERT_TRUE(pair);
  refused(pair->first.release().release(), "not a listening unix stream socket");
  refused(::socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0), "not a listening unix stream socket");
  const int tcp = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  ASSERT_EQ(::listen(tcp, 1), 0);  // an ephemeral port: listening, but not AF_UNIX
  refused(tcp, "not a listening unix stream socket");
  refused(::memfd_create("x", MFD_CLOEXEC), "not a socket");
}

TEST(BackendSession, FdCountStableOver200Cycles) { test::fd_stable_over_cycles(200); }

}  // namespace
}  // namespace vhostkit::vhost_user
