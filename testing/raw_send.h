// Test support (no gtest): sends one vhost-user message exactly as given, header, payload and
// fds, without the codec's checks: how the hostile tests speak for a peer that lies.
#pragma once

#include <sys/socket.h>
#include <sys/uio.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <span>
#include <vector>

#include "vhostkit/vhost_user/channel.h"
#include "vhostkit/vhost_user/message.h"

namespace vhostkit::vhost_user::test {

// True if the whole message went out (the Channel refuses more than 8 fds and mismatched
// sizes; this does not).
// `send_flags`: MSG_NOSIGNAL always; add MSG_DONTWAIT where the peer may not be reading.
inline bool send_raw(int sock, const Header& h, std::span<const std::uint8_t> payload,
                     std::span<const int> fds = {}, int send_flags = 0) {
  std::vector<std::uint8_t> buf(sizeof(Header) + payload.size());
  std::memcpy(buf.data(), &h, sizeof(Header));
  if (!payload.empty()) std::memcpy(buf.data() + sizeof(Header), payload.data(), payload.size());
  iovec iov{buf.data(), buf.size()};
  msghdr mh{};
  mh.msg_iov = &iov;
  mh.msg_iovlen = 1;
  // operator new's alignment covers cmsghdr's.
  std::vector<std::uint8_t> cbuf(CMSG_SPACE(sizeof(int) * std::max<std::size_t>(fds.size(), 1)));
  if (!fds.empty()) put_scm_rights(mh, cbuf, fds);
  return ::sendmsg(sock, &mh, MSG_NOSIGNAL | send_flags) == static_cast<ssize_t>(buf.size());
}

}  // namespace vhostkit::vhost_user::test
