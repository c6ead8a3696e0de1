#include "metrics.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <string>
#include <thread>
#include <vector>

#include <fmt/format.h>
#include <gtest/gtest.h>
#include <httplib.h>

#include "cli_util.h"
#include "metrics_server.h"
#include "vhostkit/net/net_device.h"
#include "vhostkit/unique_fd.h"
#include "vhostkit/vhost/device.h"

namespace vhostkit::cli::metrics {
namespace {

Snapshot sample_snapshot() {
  Snapshot s;
  s.add("vhostkit_net_tx_frames_total", "frames sent", Kind::counter,
        {{{"queue", "1"}}, 18446744073709551615u});
  s.add("vhostkit_net_connected", "1 while\nconnected \\ up", Kind::gauge, {{}, 1});
  // Back to the first family: its samples stay together, in the order added.
  s.add("vhostkit_net_tx_frames_total", "ignored: the first help stays", Kind::counter,
        {{{"queue", "3"}}, 7});
  s.add("vhostkit_x", "labels", Kind::gauge, {{{"b", "q\"u\\o\nte"}, {"a", "2"}}, 0});
  return s;
}

TEST(MetricsText, ExactExposition) {
  EXPECT_EQ(to_prometheus(sample_snapshot()),
            "# HELP vhostkit_net_tx_frames_total frames sent\n"
            "# TYPE vhostkit_net_tx_frames_total counter\n"
            "vhostkit_net_tx_frames_total{queue=\"1\"} 18446744073709551615\n"
            "vhostkit_net_tx_frames_total{queue=\"3\"} 7\n"
            "# HELP vhostkit_net_connected 1 while\\nconnected \\\\ up\n"
            "# TYPE vhostkit_net_connected gauge\n"
            "vhostkit_net_connected 1\n"
            "# HELP vhostkit_x labels\n"
            "# TYPE vhostkit_x gauge\n"
            "vhostkit_x{b=\"q\\\"u\\\\o\\nte\",a=\"2\"} 0\n");
}

TEST(MetricsText, Json) {
  const nlohmann::json j = to_json(sample_snapshot());
  ASSERT_TRUE(j.contains("vhostkit_net_tx_frames_total"));
  const auto& f = j["vhostkit_net_tx_frames_total"];
  EXPECT_EQ(f["type"], "counter");
  ASSERT_EQ(f["samples"].size(), 2u);
  EXPECT_EQ(f["samples"][0]["labels"]["queue"], "1");
  EXPECT_EQ(f["samples"][0]["value"].get<std::uint64_t>(), 18446744073709551615u);
  EXPECT_EQ(j["vhostkit_net_connected"]["samples"][0]["labels"].size(), 0u);
  EXPECT_EQ(j["vhostkit_x"]["samples"][0]["labels"]["b"], "q\"u\\o\nte");
}

TEST(MetricsText, DeviceFamiliesNameEveryQueue) {
  net::NetOptions o;
  o.queue_pairs = 2;
  auto nd = net::NetDevice::create(std::move(o));
  ASSERT_TRUE(nd);
  vhost::Device dev(**nd, vhost::DeviceOptions{});
  Snapshot s;
  add_device(s, "net", dev, {true, 3});
  add_net(s, **nd);
  const std::string t = to_prometheus(s);
  EXPECT_NE(t.find("vhostkit_net_connected 1\n"), std::string::npos);
  EXPECT_NE(t.find("vhostkit_net_sessions_total 3\n"), std::string::npos);
  EXPECT_NE(t.find("vhostkit_net_queues_started 0\n"), std::string::npos);
  // Five rings (two pairs and the control queue).
  EXPECT_NE(t.find("vhostkit_net_ring_size{queue=\"4\"} 0\n"), std::string::npos);
  EXPECT_EQ(t.find("vhostkit_net_ring_size{queue=\"5\"}"), std::string::npos);
  EXPECT_NE(t.find("vhostkit_net_kicks_total{queue=\"4\"} 0\n"), std::string::npos);
  // Pair 1: receiveq 2, transmitq 3.
  EXPECT_NE(t.find("vhostkit_net_rx_frames_total{queue=\"2\"} 0\n"), std::string::npos);
  EXPECT_NE(t.find("vhostkit_net_tx_frames_total{queue=\"3\"} 0\n"), std::string::npos);
  EXPECT_EQ(t.find("vhostkit_net_tx_frames_total{queue=\"2\"}"), std::string::npos);
  // VERSION_1 (bit 32) is offered and not acked yet.
  EXPECT_NE(t.find("vhostkit_net_feature_acked{bit=\"32\"} 0\n"), std::string::npos);
  ASSERT_TRUE(dev.set_owner());
  ASSERT_TRUE(dev.set_features(std::uint64_t{1} << 32));
  Snapshot s2;
  add_device(s2, "net", dev, {});
  EXPECT_NE(to_prometheus(s2).find("vhostkit_net_feature_acked{bit=\"32\"} 1\n"),
            std::string::npos);
}

TEST(HostPort, Parses) {
  auto a = parse_host_port("127.0.0.1:9100");
  ASSERT_TRUE(a);
  EXPECT_EQ(a->host, "127.0.0.1");
  EXPECT_EQ(a->port, 9100);
  auto b = parse_host_port("[::1]:80");
  ASSERT_TRUE(b);
  EXPECT_EQ(b->host, "::1");
  EXPECT_TRUE(parse_host_port("0.0.0.0:65535"));
  for (const char* bad : {"127.0.0.1", "127.0.0.1:0", "127.0.0.1:65536", "::1:80", "[::1]",
                          "localhost:80", "1.2.3:80", "127.0.0.1:9x", ":80", "[]:80"}) {
    EXPECT_FALSE(parse_host_port(bad)) << bad;
  }
}

// A port nobody listens on right now.
std::uint16_t free_port() {
  UniqueFd s(::socket(AF_INET, SOCK_STREAM, 0));
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  EXPECT_EQ(::bind(s.get(), reinterpret_cast<sockaddr*>(&a), sizeof a), 0);
  socklen_t len = sizeof a;
  ::getsockname(s.get(), reinterpret_cast<sockaddr*>(&a), &len);
  return ntohs(a.sin_port);
}

struct Served : ::testing::Test {
  void SetUp() override { serve(Limits{}); }
  void serve(Limits limits) {
    server.reset();
    port = free_port();
    auto s = Server::start(
        {"127.0.0.1", port},
        [this] {
          ++calls;
          return sample_snapshot();
        },
        limits);
    ASSERT_TRUE(s) << s.error().message();
    server = std::move(*s);
  }
  UniqueFd connect_raw() const {
    UniqueFd s(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    a.sin_port = htons(port);
    EXPECT_EQ(::connect(s.get(), reinterpret_cast<sockaddr*>(&a), sizeof a), 0);
    return s;
  }
  // Whether the server closed `s` within `within` (recv sees the end or a reset).
  static bool closed_within(int s, std::chrono::milliseconds within) {
    pollfd p{s, POLLIN, 0};
    if (::poll(&p, 1, static_cast<int>(within.count())) != 1) return false;
    char b[256];
    return ::recv(s, b, sizeof b, MSG_DONTWAIT) <= 0;
  }
  std::uint16_t port = 0;
  std::atomic<int> calls{0};
  std::unique_ptr<Server> server;
};

TEST_F(Served, MetricsStatsAndNothingElse) {
  httplib::Client c("127.0.0.1", port);
  auto m = c.Get("/metrics");
  ASSERT_TRUE(m);
  EXPECT_EQ(m->status, 200);
  EXPECT_EQ(m->get_header_value("Content-Type"), "text/plain; version=0.0.4; charset=utf-8");
  EXPECT_EQ(m->body, to_prometheus(sample_snapshot()));
  auto j = c.Get("/stats");
  ASSERT_TRUE(j);
  EXPECT_EQ(j->status, 200);
  EXPECT_EQ(nlohmann::json::parse(j->body), to_json(sample_snapshot()));
  auto nf = c.Get("/metrics/x");
  ASSERT_TRUE(nf);
  EXPECT_EQ(nf->status, 404);
  auto post = c.Post("/metrics", "x", "text/plain");
  ASSERT_TRUE(post);
  EXPECT_EQ(post->status, 405);
  EXPECT_EQ(calls.load(), 2);
}

TEST_F(Served, PortInUseIsAnErrorNamingIt) {
  auto s = Server::start({"127.0.0.1", port}, [] { return Snapshot{}; });
  ASSERT_FALSE(s);
  EXPECT_NE(s.error().message().find("Address already in use"), std::string::npos)
      << s.error().message();
}

// Headers beyond the per-connection byte budget end the connection without an answer (the
// same request is answered when the budget allows it), and the server answers the next client.
TEST_F(Served, HugeHeadersAreCutOff) {
  httplib::Headers h;
  for (int i = 0; i < 100; ++i) h.emplace(fmt::format("X-Pad-{}", i), std::string(1000, 'a'));
  {
    httplib::Client c("127.0.0.1", port);
    auto r = c.Get("/metrics", h);
    EXPECT_TRUE(!r || r->status != 200);
    httplib::Client c2("127.0.0.1", port);
    auto ok = c2.Get("/metrics");
    ASSERT_TRUE(ok);
    EXPECT_EQ(ok->status, 200);
  }
  Limits roomy;
  roomy.bytes_per_connection = 1 << 20;
  serve(roomy);
  httplib::Client c("127.0.0.1", port);
  auto r = c.Get("/metrics", h);
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, 200);
}

// A request trickled a header line at a time (slowloris) is cut at the connection's deadline,
// although every read arrives well within the read timeout.
TEST_F(Served, SlowlorisEndsAtTheDeadline) {
  Limits l;
  l.deadline = std::chrono::milliseconds(600);
  serve(l);
  UniqueFd s = connect_raw();
  const std::string start = "GET /metrics HTTP/1.1\r\nHost: x\r\n";
  ASSERT_EQ(::send(s.get(), start.data(), start.size(), MSG_NOSIGNAL), ssize_t(start.size()));
  const auto t0 = std::chrono::steady_clock::now();
  bool closed = false;
  for (int i = 0; i < 30 && !closed; ++i) {
    closed = closed_within(s.get(), std::chrono::milliseconds(100));
    if (!closed) (void)::send(s.get(), "X-a: b\r\n", 8, MSG_NOSIGNAL);
  }
  const auto took = std::chrono::steady_clock::now() - t0;
  EXPECT_TRUE(closed);
  EXPECT_LT(took, std::chrono::milliseconds(2000));
}

// Beyond the workers and the queue, connections are closed at once (not held open, each an fd),
// and once the flood is gone the server answers again. "Gone" is when the server has closed all
// 40: until then connections the flood left in the listen backlog, already hung up, still take
// the queue's slots as they are accepted, and a request arriving among them is shed.
TEST_F(Served, AFloodIsShedAndTheServerRecovers) {
  Limits l;
  l.workers = 1;
  l.queued = 2;
  serve(l);
  std::vector<UniqueFd> idle;
  for (int i = 0; i < 40; ++i) idle.push_back(connect_raw());
  int closed = 0;
  for (auto& s : idle) closed += closed_within(s.get(), std::chrono::milliseconds(500)) ? 1 : 0;
  // At most one served and two queued stay open; the backlog may hold a few not yet accepted.
  EXPECT_GE(closed, 30);
  EXPECT_GE(server->shed(), 30u);
  idle.clear();
  const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(5);
  while (server->closed() < 40 && std::chrono::steady_clock::now() < until) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  ASSERT_EQ(server->closed(), 40u) << "the flood's connections were not all closed within 5 s";
  httplib::Client c("127.0.0.1", port);
  c.set_connection_timeout(std::chrono::seconds(5));
  c.set_read_timeout(std::chrono::seconds(5));
  auto r = c.Get("/metrics");
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, 200);
}

}  // namespace
}  // namespace vhostkit::cli::metrics
