// The hostile front-end rig shared by the backend hostile tests: a BackendSession over a
// socketpair on an echo device, a raw sender, and hostile(), which runs one case and then the
// common checks (the session still serves a well-behaved front-end, no fd is left behind).
#pragma once

#include <gtest/gtest.h>
#include <sys/socket.h>

#include <cstring>
#include <functional>
#include <limits>

#include "testing/backend_rig.h"
#include "testing/raw_send.h"
#include "vhostkit/vhost_user/backend_session.h"

namespace vhostkit::vhost_user::hostile_rig {

using namespace std::chrono_literals;
using test::EchoBackend;
using test::TestFrontend;

using test::send_raw;

template <typename T>
std::span<const std::uint8_t> bytes_of(const T& v) {
  return {reinterpret_cast<const std::uint8_t*>(&v), sizeof(T)};
}

struct Hostile {
  Hostile() { connect(); }

  void connect() {
    auto pair = socketpair();
    EXPECT_TRUE(pair.has_value());
    session = std::make_unique<BackendSession>(device, std::move(pair->first), SessionOptions{});
    fe = std::make_unique<TestFrontend>(std::move(pair->second),
                                        [this] { last = session->serve_one(); });
  }
  int sock() { return fe->channel().fd(); }

  // REPLY_ACK negotiated, no SET_OWNER.
  void protocol_only() {
    auto p = fe->get(GetProtocolFeatures{});
    ASSERT_TRUE(p);
    ASSERT_TRUE(fe->request(SetProtocolFeatures{*p}, false));
  }

  // Raw message, then one serve_one.
  void raw(Request r, std::uint32_t flags, std::span<const std::uint8_t> payload,
           std::span<const int> fds = {}) {
    Header h{static_cast<std::uint32_t>(r), kVersion | flags,
             static_cast<std::uint32_t>(payload.size())};
    ASSERT_TRUE(send_raw(sock(), h, payload, fds));
    last = session->serve_one();
  }

  // The next reply as a u64 (an ack or a failure reply).
  std::uint64_t ack(Request r) {
    auto rep = fe->channel().recv();
    EXPECT_TRUE(rep.has_value()) << (rep ? "" : rep.error().message());
    if (!rep) return 0;
    auto v = decode_u64_reply(*rep, r);
    EXPECT_TRUE(v.has_value()) << (v ? "" : v.error().message());
    return v ? *v : 0;
  }

  // A typed request with NEED_REPLY must be refused, and the session go on.
  template <typename T>
  void expect_refused(const T& m) {
    auto a = fe->request(m, true);
    ASSERT_TRUE(a.has_value()) << a.error().message();
    EXPECT_NE(*a, 0u) << to_string(T::kRequest) << " was accepted";
    EXPECT_TRUE(last.has_value()) << "session ended: " << last.error().message();
    EXPECT_TRUE(quiet()) << "more than one reply";
  }

  bool quiet() {
    pollfd p{sock(), POLLIN, 0};
    return ::poll(&p, 1, 0) == 0;
  }

  // The session survived: it still answers on this connection.
  void expect_alive() {
    EXPECT_TRUE(last.has_value()) << last.error().message();
    EXPECT_TRUE(session->open());
    auto f = fe->get(GetFeatures{});
    EXPECT_TRUE(f.has_value()) << "session no longer answers";
  }
  // The session ended the connection (and reset the device).
  void expect_closed() {
    EXPECT_FALSE(last.has_value());
    session->close();
    EXPECT_FALSE(device.has_owner());
  }

  // After whatever happened: a new, well-behaved front-end on the same device works.
  void well_behaved_after() {
    session->close();
    fe.reset();
    connect();
    auto n = fe->negotiate();
    ASSERT_TRUE(n.has_value()) << n.error().message();
    auto e = fe->echo(0, 256);
    ASSERT_TRUE(e.has_value()) << e.error().message();
    auto e1 = fe->echo(1, 1000);
    ASSERT_TRUE(e1.has_value()) << e1.error().message();
    EXPECT_FALSE(device.broken());
  }

  EchoBackend backend;
  vhost::Device device{backend, vhost::DeviceOptions{.name = "vk-hostile"}};
  std::unique_ptr<BackendSession> session;
  std::unique_ptr<TestFrontend> fe;
  Result<> last;
};

// Runs a hostile case and the common checks around it.
inline void hostile(const std::function<void(Hostile&)>& body) {
  const std::size_t fds_before = vhostkit::testing::open_fd_count();
  {
    Hostile h;
    body(h);
    if (::testing::Test::HasFatalFailure()) return;
    h.well_behaved_after();
  }
  EXPECT_LE(vhostkit::testing::open_fd_count(), fds_before) << "fds leaked";
}

}  // namespace vhostkit::vhost_user::hostile_rig
