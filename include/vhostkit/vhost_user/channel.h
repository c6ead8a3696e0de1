// The vhost-user transport: a connected SOCK_STREAM unix socket carrying header + payload
// messages with up to 8 fds each in SCM_RIGHTS ancillary data.
//
// Blocking model: the socket stays blocking. A session waits for readability with epoll (or
// poll) on fd() and then calls recv(), which reads exactly one whole message. Each blocking read
// or write is bounded by a timeout (SO_RCVTIMEO / SO_SNDTIMEO, default 1 s), so a peer that sends
// half a message and stalls, or never reads, costs at most that long:
//   - recv() when no byte of a new message is pending after the timeout -> Errc::would_block;
//     the stream is still in sync and recv() may be called again.
//   - recv() stalled in the middle of a message -> Errc::broken: the stream can't be
//     resynchronised, drop the connection.
//   - a size field over kMaxPayloadSize -> Errc::broken, for the same reason.
//   - the peer closed -> Errc::disconnected (mid-message or between messages).
//   - more than 8 fds, or a truncated control message (MSG_CTRUNC) -> the message is returned
//     with fds_truncated set and no fds: every fd that did arrive is closed, the payload is
//     consumed so the stream stays in sync, and decode() refuses it (Errc::too_many) knowing its
//     header, so the session can still answer a NEED_REPLY.
// Channel is not thread-safe; one session owns it.
#pragma once

#include <sys/socket.h>

#include <chrono>
#include <cstdint>
#include <span>
#include <string>
#include <utility>

#include "vhostkit/error.h"
#include "vhostkit/unique_fd.h"
#include "vhostkit/vhost_user/message.h"
#include "vhostkit/vhost_user/protocol.h"

namespace vhostkit::vhost_user {

class Channel {
 public:
  static constexpr std::chrono::milliseconds kDefaultTimeout{1000};

  Channel() = default;
  // Takes a connected AF_UNIX SOCK_STREAM socket (e.g. from --fd=N). Sets the I/O timeouts;
  // if that fails the timeouts stay whatever they were (check with set_timeout()).
  explicit Channel(UniqueFd socket);

  bool valid() const noexcept { return fd_.valid(); }
  int fd() const noexcept { return fd_.get(); }
  UniqueFd release() noexcept { return std::move(fd_); }

  // Bound on each blocking read/write; zero means wait forever (not recommended with a
  // hostile peer).
  Result<> set_timeout(std::chrono::milliseconds timeout);

  // Reads exactly one message. See the file comment for the error contract.
  Result<Received> recv();

  // Sends header + payload (+ fds, borrowed) as one message. `header.size` must equal
  // payload.size(); at most kMaxFds fds. A peer that went away -> Errc::disconnected.
  Result<> send(const Header& header, std::span<const std::uint8_t> payload,
                std::span<const int> fds = {});
  Result<> send(const OutMessage& msg) { return send(msg.header, msg.payload(), msg.fds()); }

  // Encodes and sends a typed message: channel.send_message(SetVringNum{0, 256}).
  template <Encodable T>
  Result<> send_message(const T& msg, std::uint32_t flags = 0) {
    auto out = encode(msg, flags);
    if (!out) return std::unexpected(std::move(out.error()));
    return send(*out);
  }

 private:
  UniqueFd fd_;
};

// Packs `fds` into `mh` as one SCM_RIGHTS control message held in `cbuf`, which must be aligned
// for cmsghdr and hold CMSG_SPACE(sizeof(int) * fds.size()) bytes. The one place a message's fds
// are packed: Channel::send, and the tests' raw sender (which may send more than kMaxFds).
void put_scm_rights(msghdr& mh, std::span<std::uint8_t> cbuf, std::span<const int> fds) noexcept;

// A listening socket at `path` (SOCK_CLOEXEC, backlog 1..). An existing file at `path` is
// removed only if it is a socket nobody listens on (a stale one from a crashed process); a live
// socket -> Errc::bad_state, a non-socket file -> Errc::invalid_argument, never removed.
// `path` appears only once the socket listens (bound under a staging name in the same directory,
// then renamed), so a connect() as soon as the file exists succeeds.
Result<UniqueFd> listen_unix(const std::string& path, int backlog = 16);

// Accepts one connection (accept4 with SOCK_CLOEXEC). A non-blocking listener with nothing
// pending -> Errc::would_block.
Result<Channel> accept(int listen_fd);

// Connects to `path`.
Result<Channel> connect_unix(const std::string& path);

// A connected pair, both ends CLOEXEC (tests, and our own frontend <-> backend in one process).
Result<std::pair<Channel, Channel>> socketpair();

}  // namespace vhostkit::vhost_user
