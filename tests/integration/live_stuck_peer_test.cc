// A front-end that sends requests and never reads the replies. The back-end's replies pile up
// until its send blocks; it must not stay blocked for good (the channel's send timeout ends that
// session and the server goes on to the next front-end), and while its control path is stuck the
// data path of that device, and every other device, must keep moving frames.
#include <linux/sockios.h>
#include <poll.h>
#include <sys/ioctl.h>

#include <vector>

#include "live_rig.h"
#include "vhostkit/vhost_user/backend_session.h"
#include "vhostkit/vhost_user/protocol.h"

namespace vhostkit::live {
namespace {

using vhost_user::Request;

constexpr std::uint64_t kReplyAck = std::uint64_t{1} << vhost_user::protocol_feature::reply_ack;

// SET_PROTOCOL_FEATURES with NEED_REPLY: acked every time once `features` includes REPLY_ACK (the
// back-end turns it on before it decides about the ack). Header and payload as sent.
std::vector<std::uint8_t> acked_request(std::uint64_t features) {
  auto out = vhost_user::encode(vhost_user::SetProtocolFeatures{.value = features},
                                vhost_user::kNeedReplyFlag);
  if (!out) return {};
  std::vector<std::uint8_t> bytes(sizeof(vhost_user::Header) + out->payload().size());
  std::memcpy(bytes.data(), &out->header, sizeof(vhost_user::Header));
  std::memcpy(bytes.data() + sizeof(vhost_user::Header), out->payload().data(),
              out->payload().size());
  return bytes;
}

enum class Flood { stalled, hung_up, failed };

// Sends `msg` again and again without blocking and without reading, until the socket has been
// full for `quiet` (the back-end stopped reading: it is blocked sending us a reply) or the
// back-end hung up. Counts the requests that went out in `sent`.
Flood flood(int fd, std::span<const std::uint8_t> msg, std::uint64_t& sent,
            std::chrono::milliseconds quiet) {
  const auto end = std::chrono::steady_clock::now() + kDeadline;
  while (std::chrono::steady_clock::now() < end) {
    const ssize_t n = ::send(fd, msg.data(), msg.size(), MSG_DONTWAIT | MSG_NOSIGNAL);
    if (n == static_cast<ssize_t>(msg.size())) {
      ++sent;
      continue;
    }
    if (n >= 0) return Flood::failed;  // half a message: the stream is out of step
    if (errno == EINTR) continue;
    if (errno == EPIPE || errno == ECONNRESET) return Flood::hung_up;
    if (errno != EAGAIN) return Flood::failed;
    pollfd p{fd, POLLOUT | POLLRDHUP, 0};
    const int r = ::poll(&p, 1, static_cast<int>(quiet.count()));
    if (r == 0) return Flood::stalled;
    if ((p.revents & (POLLHUP | POLLRDHUP | POLLERR)) != 0) return Flood::hung_up;
  }
  return Flood::failed;
}

// Waits for the peer to close the connection.
bool hung_up(int fd, std::chrono::milliseconds timeout) {
  const auto end = std::chrono::steady_clock::now() + timeout;
  for (;;) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        end - std::chrono::steady_clock::now());
    if (left.count() <= 0) return false;
    pollfd p{fd, POLLRDHUP, 0};
    if (::poll(&p, 1, static_cast<int>(left.count())) > 0 &&
        (p.revents & (POLLHUP | POLLRDHUP | POLLERR)) != 0) {
      return true;
    }
  }
}

// Bytes we sent that the peer has not read yet.
int unread_by_peer(int fd) {
  int n = -1;
  return ::ioctl(fd, SIOCOUTQ, &n) == 0 ? n : -1;
}

TEST(LiveStuckPeer, BackendHangsUpOnAFrontendThatNeverReadsThenServesTheNext) {
  NetBackend be(1, "stuck");
  ASSERT_TRUE(be.listening);
  auto raw = vhost_user::connect_unix(be.path);
  ASSERT_TRUE(raw) << raw.error().message();
  UniqueFd rogue = raw->release();
  const auto msg = acked_request(kReplyAck);
  ASSERT_FALSE(msg.empty());

  std::uint64_t sent = 0;
  const Flood f = flood(rogue.get(), msg, sent, 500ms);
  ASSERT_NE(f, Flood::failed) << "after " << sent << " requests: " << std::strerror(errno);
  // Far more acks than fit the back-end's socket buffer went unread: it blocked sending one.
  // With a send timeout it gives up on this front-end by itself and hangs up.
  EXPECT_TRUE(f == Flood::hung_up || hung_up(rogue.get(), kDeadline))
      << "the back-end never hung up on a front-end that does not read (" << sent
      << " requests sent): blocked in send for good, serving nobody else";
  // Closing our end also frees a back-end that would otherwise be blocked for ever.
  rogue.reset();

  // The same server serves the next front-end.
  auto s = be.connect(1);
  ASSERT_TRUE(s) << s.error().message();
  EXPECT_EQ(be.server.sessions(), 2u);
  PairDriver drv(**s, be.net, 0, /*exact=*/true);
  ASSERT_TRUE(drv.wait_progress(1000)) << drv.describe();
  ASSERT_TRUE(drv.stop()) << drv.describe();
  EXPECT_EQ(drv.errors(), 0u) << drv.describe();
  EXPECT_EQ(drv.received(), drv.sent()) << drv.describe();
}

// A back-end session on its own thread over one end of a socketpair.
struct SessionThread {
  SessionThread(vhost::Device& dev, vhost_user::Channel ch) : session(dev, std::move(ch)) {
    thread = std::thread([this] {
      (void)session.run(stop.fd.get());
      ended.store(true);
    });
  }
  ~SessionThread() {
    stop.fire();
    if (thread.joinable()) thread.join();
  }
  vhost_user::BackendSession session;
  StopFd stop;
  std::atomic<bool> ended{false};
  std::thread thread;
};

TEST(LiveStuckPeer, FramesKeepMovingWhileTheControlPathIsStuck) {
  // Device A's session runs over a socketpair whose send timeout is raised to 60 s, so its
  // control path stays stuck for as long as the test looks at it.
  net::NetDevice net_a(net::NetOptions{.queue_pairs = 1});
  vhost::Device dev_a(net_a, vhost::DeviceOptions{.name = "stuck"});
  auto sp = vhost_user::socketpair();
  ASSERT_TRUE(sp) << sp.error().message();
  ASSERT_TRUE(sp->second.set_timeout(60s));
  SessionThread st(dev_a, std::move(sp->second));
  driver::NetDriverOptions o;
  o.channel = std::move(sp->first);
  o.memory_size = 0;
  o.timeout = 15s;
  auto sa = NetDriver::connect(std::move(o));
  ASSERT_TRUE(sa) << sa.error().message();
  NetDriver& fa = **sa;
  ASSERT_TRUE(fa.session().has_protocol(vhost_user::protocol_feature::reply_ack));
  // Device B: a neighbour with a session of its own.
  NetBackend other(1, "neighbour");
  ASSERT_TRUE(other.listening);
  auto sb = other.connect(1);
  ASSERT_TRUE(sb) << sb.error().message();

  PairDriver da(fa, net_a, 0, /*exact=*/true);
  PairDriver db(**sb, other.net, 0, /*exact=*/true);
  ASSERT_TRUE(da.wait_progress(200)) << da.describe();
  ASSERT_TRUE(db.wait_progress(200)) << db.describe();

  // A part of front-end A that sends requests on its socket and never reads the acks.
  vhost_user::Channel rogue(UniqueFd(::dup(fa.session().socket_fd())));
  ASSERT_TRUE(rogue.set_timeout(15s));
  const auto msg = acked_request(fa.session().protocol_features());
  ASSERT_FALSE(msg.empty());
  std::uint64_t requests = 0;
  bool stuck = false;
  // Until the back-end read nothing of ours while both data paths moved 2000 frames: then its
  // session thread was blocked for all of that time. (A back-end that was only slow to read
  // drains our requests and gets another round.)
  for (int attempt = 0; attempt < 5 && !stuck; ++attempt) {
    ASSERT_EQ(flood(rogue.fd(), msg, requests, 500ms), Flood::stalled) << requests << " requests";
    const int queued = unread_by_peer(rogue.fd());
    ASSERT_TRUE(da.wait_progress(2000))
        << "device A's data path stalled with its control path: " << da.describe();
    ASSERT_TRUE(db.wait_progress(2000))
        << "device B stalled with A's control path: " << db.describe();
    stuck = queued > 0 && unread_by_peer(rogue.fd()) == queued;
  }
  ASSERT_TRUE(stuck) << "the back-end kept reading requests; " << requests << " sent";
  EXPECT_FALSE(st.ended.load());

  // Still stuck: A's data path drains completely.
  ASSERT_TRUE(da.stop()) << da.describe();
  EXPECT_EQ(da.errors(), 0u) << da.describe();
  EXPECT_EQ(da.received(), da.sent()) << da.describe();

  // Reading the acks unsticks it: every request was answered, and the session serves on.
  for (std::uint64_t k = 0; k < requests; ++k) {
    auto r = rogue.recv();
    ASSERT_TRUE(r) << "ack " << k << " of " << requests << ": " << r.error().message();
    auto v = vhost_user::decode_u64_reply(*r, Request::set_protocol_features);
    ASSERT_TRUE(v) << "ack " << k << ": " << v.error().message();
    ASSERT_EQ(*v, 0u) << "ack " << k;
  }
  auto bases = fa.stop();
  ASSERT_TRUE(bases) << bases.error().message();
  EXPECT_EQ((*bases)[NetDriver::tx_index(0)], da.sent() % 65536);
  EXPECT_FALSE(st.ended.load());

  ASSERT_TRUE(db.stop()) << db.describe();
  EXPECT_EQ(db.errors(), 0u) << db.describe();
  EXPECT_EQ(db.received(), db.sent()) << db.describe();
}

}  // namespace
}  // namespace vhostkit::live
