// The vhost-user back-end side of one connection: decoded front-end requests become
// vhost::Device calls, and the replies the protocol asks for go back on the same socket.
//
// Error policy (everything the front-end sends is hostile):
//   - request-level errors (a bad vring index, a bad ring size, a request we don't support, a
//     payload of the wrong size or with the wrong fds): the request fails. With REPLY_ACK
//     negotiated and NEED_REPLY set the front-end gets a non-zero ack; otherwise one
//     rate-limited log line. The session keeps serving.
//   - requests that have their own reply body always get a reply, so a front-end never waits
//     forever: GET_CONFIG fails with an empty config, the others with a non-zero u64.
//   - a refused memory table (one we can't validate or map, or that does not cover a ring)
//     changes nothing: the old table stays mapped and its rings keep running.
//   - stream-level errors (a message the channel can't frame, a header with the wrong version
//     bits, a socket error) and a front-end that hangs up end the session.
// When the session ends the device is reset: every ring stopped, memory unmapped, fds closed,
// the inflight region dropped (the front-end keeps its fd for the next back-end).
#pragma once

#include <array>
#include <chrono>
#include <cstdint>
#include <functional>
#include <string>

#include "vhostkit/error.h"
#include "vhostkit/unique_fd.h"
#include "vhostkit/vhost/device.h"
#include "vhostkit/vhost_user/channel.h"
#include "vhostkit/vhost_user/message.h"
#include "vhostkit/vhost_user/protocol.h"

namespace vhostkit::vhost_user {

constexpr std::uint64_t protocol_bit(unsigned n) { return std::uint64_t{1} << n; }

// What we implement. NET_MTU is offered only when the session has a set_mtu hook,
// INFLIGHT_SHMFD only for a device that tracks its requests (DeviceBackend::tracks_inflight).
inline constexpr std::uint64_t kSupportedProtocolFeatures =
    protocol_bit(protocol_feature::mq) | protocol_bit(protocol_feature::log_shmfd) |
    protocol_bit(protocol_feature::rarp) | protocol_bit(protocol_feature::reply_ack) |
    protocol_bit(protocol_feature::net_mtu) | protocol_bit(protocol_feature::config) |
    protocol_bit(protocol_feature::inflight_shmfd) |
    protocol_bit(protocol_feature::configure_mem_slots) | protocol_bit(protocol_feature::status) |
    protocol_bit(protocol_feature::reset_device);

using Mac = std::array<std::uint8_t, 6>;

struct SessionOptions {
  // Protocol features offered (GET_PROTOCOL_FEATURES), masked by kSupportedProtocolFeatures.
  std::uint64_t protocol_features = kSupportedProtocolFeatures;
  // GET_QUEUE_NUM; 0 means the device's number of virtqueues. A net device may answer with its
  // number of queue pairs, as QEMU compares it with the queue pairs it was configured with.
  std::uint32_t queue_num = 0;
  // SEND_RARP (after migration: announce the guest's MAC). Unset: the request is refused.
  std::function<Result<>(const Mac& mac)> send_rarp;
  // NET_SET_MTU, already checked to be in 68..65535. Unset: NET_MTU is not offered and the
  // request is refused.
  std::function<Result<>(std::uint16_t mtu)> set_mtu;
  // In log lines: "vhost-user <name>: ...".
  std::string name = "backend";
};

// Counters for tests and the stats line. Single-threaded (the session's thread).
struct SessionStats {
  std::uint64_t requests = 0;  // messages received (decodable or not)
  std::uint64_t failed = 0;    // requests that failed (request-level)
  std::uint64_t acks = 0;      // REPLY_ACK replies sent
  std::uint64_t replies = 0;   // replies with a body (GET_*, SET_LOG_BASE)
};

class BackendSession {
 public:
  BackendSession(vhost::Device& device, Channel channel, SessionOptions opts = {});
  ~BackendSession();  // ends the session (device reset) if it is still open
  BackendSession(const BackendSession&) = delete;
  BackendSession& operator=(const BackendSession&) = delete;

  // Receives one message (waiting at most the channel's timeout for it), handles it and sends
  // any reply. Returns success while the session can go on (including after a request that
  // failed: see last_error()); an error when it has ended: Errc::disconnected when the
  // front-end hung up, Errc::broken / Errc::system for a stream we can't continue. The caller
  // then calls close() (or destroys the session).
  Result<> serve_one();

  // Serves until the front-end disconnects, the stream breaks, or `stop_fd` (an eventfd or
  // pipe; -1 for none) becomes readable (it is not read, so one fd can stop many loops). Then
  // closes the session. A disconnect or a stop returns success.
  Result<> run(int stop_fd);

  // Ends the session: resets the device and closes the socket. Idempotent.
  void close() noexcept;
  bool open() const noexcept { return channel_.valid(); }

  std::uint64_t offered_protocol_features() const noexcept { return offered_protocol_; }
  std::uint64_t protocol_features() const noexcept { return protocol_; }  // negotiated
  std::uint8_t status() const noexcept { return status_; }
  const SessionStats& stats() const noexcept { return stats_; }
  // Why the last failed request failed (empty detail if none did).
  const Error& last_error() const noexcept { return last_error_; }
  int fd() const noexcept { return channel_.fd(); }

 private:
  struct Outcome;
  Outcome dispatch(FrontendMessage& msg, const Header& header);
  Result<> finish(const Header& header, Outcome out);
  Result<> reply_failed_request(const Header& header, const Error& err);
  void note_failure(Request request, const Error& err);
  bool has(unsigned protocol_feature) const noexcept {
    return (protocol_ & protocol_bit(protocol_feature)) != 0;
  }
  bool reply_ack_on() const noexcept { return has(protocol_feature::reply_ack); }
  // What GET_INFLIGHT_FD and SET_INFLIGHT_FD share: the feature, the owner, the ring layout and
  // the queue count.
  Result<> check_inflight(std::string_view request, const Inflight& shape) const;
  bool packed_negotiated() const noexcept;

  // The handlers: each returns what the front-end should hear.
  Outcome on(GetFeatures&);
  Outcome on(SetFeatures&);
  Outcome on(SetOwner&);
  Outcome on(ResetOwner&);
  Outcome on(SetMemTable&);
  Outcome on(SetLogBase&);
  Outcome on(SetLogFd&);
  Outcome on(SetVringNum&);
  Outcome on(SetVringAddr&);
  Outcome on(SetVringBase&);
  Outcome on(GetVringBase&);
  Outcome on(SetVringKick&);
  Outcome on(SetVringCall&);
  Outcome on(SetVringErr&);
  Outcome on(GetProtocolFeatures&);
  Outcome on(SetProtocolFeatures&);
  Outcome on(GetQueueNum&);
  Outcome on(SetVringEnable&);
  Outcome on(SendRarp&);
  Outcome on(NetSetMtu&);
  Outcome on(GetConfig&);
  Outcome on(SetConfig&);
  Outcome on(GetInflightFd&);
  Outcome on(SetInflightFd&);
  Outcome on(ResetDevice&);
  Outcome on(GetMaxMemSlots&);
  Outcome on(AddMemReg&);
  Outcome on(RemMemReg&);
  Outcome on(SetStatus&);
  Outcome on(GetStatus&);
  template <typename T>
  Outcome on(T&);  // everything we do not implement

  vhost::Device& device_;
  Channel channel_;
  SessionOptions opts_;
  std::uint64_t offered_protocol_ = 0;
  std::uint64_t protocol_ = 0;
  std::uint8_t status_ = 0;
  bool closed_ = false;
  // SET_FEATURES made this front-end the owner before any SET_OWNER: the first SET_OWNER that
  // follows is then a no-op, not a second owner.
  bool owner_implicit_ = false;
  UniqueFd log_fd_;  // SET_LOG_FD: kept (and closed on reset); we never signal it
  SessionStats stats_;
  Error last_error_;
  // Rate limit for failure log lines: at most kLogBurst per second, then one summary.
  std::chrono::steady_clock::time_point log_window_{};
  std::uint32_t logged_in_window_ = 0;
  std::uint64_t suppressed_ = 0;
};

}  // namespace vhostkit::vhost_user
