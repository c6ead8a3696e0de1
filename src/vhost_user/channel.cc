// Socket I/O for vhost-user: exact-length reads with SCM_RIGHTS collection, whole-message sends.
#include "vhostkit/vhost_user/channel.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstring>

namespace vhostkit::vhost_user {

namespace {

// Room for exactly kMaxFds descriptors: the kernel installs at most that many and reports the
// rest with MSG_CTRUNC (closing them on its side).
constexpr std::size_t kCmsgSpace = CMSG_SPACE(sizeof(int) * kMaxFds);

// Moves every SCM_RIGHTS fd out of `mh` into `fds`; sets `overflow` when they don't fit. Each fd
// becomes a UniqueFd immediately so none can leak on any path.
void collect_fds(msghdr& mh, FdList& fds, bool& overflow) {
  for (cmsghdr* c = CMSG_FIRSTHDR(&mh); c != nullptr; c = CMSG_NXTHDR(&mh, c)) {
    if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
    const std::size_t n = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
    const auto* data = CMSG_DATA(c);
    for (std::size_t i = 0; i < n; ++i) {
      int raw;
      std::memcpy(&raw, data + i * sizeof(int), sizeof(int));
      if (!fds.push_back(UniqueFd(raw))) overflow = true;
    }
  }
  if ((mh.msg_flags & MSG_CTRUNC) != 0) overflow = true;
}

// Reads exactly `len` bytes. `message_start`: these are the first bytes of a message, so a
// timeout before any byte arrived leaves the stream in sync (would_block), and EOF there is a
// clean disconnect.
Result<> read_exact(int fd, std::uint8_t* buf, std::size_t len, FdList& fds, bool& overflow,
                    bool message_start, std::string_view what) {
  std::size_t got = 0;
  while (got < len) {
    iovec iov{buf + got, len - got};
    alignas(cmsghdr) std::uint8_t cbuf[kCmsgSpace];
    msghdr mh{};
    mh.msg_iov = &iov;
    mh.msg_iovlen = 1;
    mh.msg_control = cbuf;
    mh.msg_controllen = sizeof(cbuf);
    const ssize_t n = ::recvmsg(fd, &mh, MSG_CMSG_CLOEXEC);
    if (n < 0) {
      const int err = errno;
      if (err == EINTR) continue;
      if (err == EAGAIN || err == EWOULDBLOCK) {
        if (message_start && got == 0) return fail(Errc::would_block, "no message pending");
        return fail(Errc::broken,
                    fmt::format("peer stalled after {} of {} {} bytes", got, len, what));
      }
      if (err == ECONNRESET) {
        return fail(Errc::disconnected, fmt::format("connection reset while reading {}", what),
                    err);
      }
      return fail(Errc::system, fmt::format("recvmsg ({})", what), err);
    }
    collect_fds(mh, fds, overflow);
    if (n == 0) {
      if (message_start && got == 0) return fail(Errc::disconnected, "peer closed the connection");
      return fail(Errc::disconnected,
                  fmt::format("peer closed after {} of {} {} bytes", got, len, what));
    }
    got += static_cast<std::size_t>(n);
  }
  return {};
}

Result<> set_timeouts(int fd, std::chrono::milliseconds t) {
  timeval tv{};
  tv.tv_sec = static_cast<time_t>(t.count() / 1000);
  tv.tv_usec = static_cast<suseconds_t>((t.count() % 1000) * 1000);
  if (::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv)) != 0) {
    return fail_errno("setsockopt(SO_RCVTIMEO)");
  }
  if (::setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv)) != 0) {
    return fail_errno("setsockopt(SO_SNDTIMEO)");
  }
  return {};
}

Result<sockaddr_un> unix_address(const std::string& path) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.empty() || path.size() >= sizeof(addr.sun_path)) {
    return fail(Errc::invalid_argument, fmt::format("socket path '{}' must be 1 to {} bytes", path,
                                                    sizeof(addr.sun_path) - 1));
  }
  std::memcpy(addr.sun_path, path.data(), path.size());
  return addr;
}

Result<UniqueFd> unix_socket() {
  UniqueFd s(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!s) return fail_errno("socket(AF_UNIX)");
  return s;
}

}  // namespace

Channel::Channel(UniqueFd socket) : fd_(std::move(socket)) {
  if (fd_) (void)set_timeouts(fd_.get(), kDefaultTimeout);
}

Result<> Channel::set_timeout(std::chrono::milliseconds timeout) {
  if (!fd_) return fail(Errc::bad_state, "channel has no socket");
  return set_timeouts(fd_.get(), timeout);
}

Result<Received> Channel::recv() {
  if (!fd_) return fail(Errc::bad_state, "channel has no socket");
  Received msg;
  bool overflow = false;
  std::uint8_t raw[sizeof(Header)];
  if (auto r = read_exact(fd_.get(), raw, sizeof(raw), msg.fds, overflow, true, "header"); !r) {
    return std::unexpected(std::move(r.error()));
  }
  std::memcpy(&msg.header, raw, sizeof(raw));
  if (msg.header.size > kMaxPayloadSize) {
    return fail(Errc::broken,
                fmt::format("request {} announces {} payload bytes, more than the {} any message "
                            "carries",
                            msg.header.request, msg.header.size, kMaxPayloadSize));
  }
  if (msg.header.size > 0) {
    if (auto r = read_exact(fd_.get(), msg.payload_buf.data(), msg.header.size, msg.fds, overflow,
                            false, "payload");
        !r) {
      return std::unexpected(std::move(r.error()));
    }
  }
  if (overflow) {
    msg.fds.clear();
    msg.fds_truncated = true;
  }
  return msg;
}

Result<> Channel::send(const Header& header, std::span<const std::uint8_t> payload,
                       std::span<const int> fds) {
  if (!fd_) return fail(Errc::bad_state, "channel has no socket");
  if (header.size != payload.size()) {
    return fail(Errc::invalid_argument,
                fmt::format("header size {} but {} payload bytes", header.size, payload.size()));
  }
  if (payload.size() > kMaxPayloadSize) {
    return fail(Errc::out_of_range,
                fmt::format("payload of {} bytes, at most {}", payload.size(), kMaxPayloadSize));
  }
  if (fds.size() > kMaxFds) {
    return fail(Errc::too_many, fmt::format("{} fds, at most {}", fds.size(), kMaxFds));
  }
  std::uint8_t buf[sizeof(Header) + kMaxPayloadSize];
  std::memcpy(buf, &header, sizeof(Header));
  if (!payload.empty()) std::memcpy(buf + sizeof(Header), payload.data(), payload.size());
  const std::size_t total = sizeof(Header) + payload.size();

  alignas(cmsghdr) std::uint8_t cbuf[kCmsgSpace] = {};
  std::size_t sent = 0;
  while (sent < total) {
    iovec iov{buf + sent, total - sent};
    msghdr mh{};
    mh.msg_iov = &iov;
    mh.msg_iovlen = 1;
    // The fds ride with the first byte of the message.
    if (sent == 0 && !fds.empty()) put_scm_rights(mh, cbuf, fds);
    const ssize_t n = ::sendmsg(fd_.get(), &mh, MSG_NOSIGNAL);
    if (n < 0) {
      const int err = errno;
      if (err == EINTR) continue;
      if (err == EPIPE || err == ECONNRESET) {
        return fail(Errc::disconnected, "peer closed the connection", err);
      }
      if (err == EAGAIN || err == EWOULDBLOCK) {
        if (sent == 0) return fail(Errc::would_block, "peer is not reading");
        return fail(Errc::broken,
                    fmt::format("peer stopped reading after {} of {} bytes", sent, total));
      }
      return fail(Errc::system, "sendmsg", err);
    }
    sent += static_cast<std::size_t>(n);
  }
  return {};
}

void put_scm_rights(msghdr& mh, std::span<std::uint8_t> cbuf, std::span<const int> fds) noexcept {
  mh.msg_control = cbuf.data();
  mh.msg_controllen = CMSG_SPACE(sizeof(int) * fds.size());
  cmsghdr* c = CMSG_FIRSTHDR(&mh);
  c->cmsg_level = SOL_SOCKET;
  c->cmsg_type = SCM_RIGHTS;
  c->cmsg_len = CMSG_LEN(sizeof(int) * fds.size());
  std::memcpy(CMSG_DATA(c), fds.data(), sizeof(int) * fds.size());
}

namespace {

// Where listen_unix binds before the socket is renamed onto `path`: a hidden name in the same
// directory (rename() does not cross file systems), unique per process and call.
std::string staging_name(const std::string& path) {
  static std::atomic<unsigned> seq{0};
  const auto slash = path.rfind('/');
  const std::string dir = slash == std::string::npos ? std::string() : path.substr(0, slash + 1);
  return fmt::format("{}.vk{:x}.{:x}", dir, static_cast<unsigned>(::getpid()),
                     seq.fetch_add(1, std::memory_order_relaxed));
}

}  // namespace

Result<UniqueFd> listen_unix(const std::string& path, int backlog) {
  auto addr = unix_address(path);
  if (!addr) return std::unexpected(std::move(addr.error()));
  struct stat st{};
  if (::lstat(path.c_str(), &st) == 0) {
    if (!S_ISSOCK(st.st_mode)) {
      return fail(Errc::invalid_argument,
                  fmt::format("{} exists and is not a socket; not removing it", path));
    }
    // A socket file: stale if nobody accepts connections on it.
    auto probe = unix_socket();
    if (!probe) return std::unexpected(std::move(probe.error()));
    if (::connect(probe->get(), reinterpret_cast<const sockaddr*>(&*addr), sizeof(*addr)) == 0) {
      return fail(Errc::bad_state, fmt::format("{} is in use by a listening process", path));
    }
    const int err = errno;
    if (err == EAGAIN) {  // backlog full: very much alive
      return fail(Errc::bad_state, fmt::format("{} is in use by a listening process", path));
    }
    if (err != ECONNREFUSED) return fail(Errc::system, fmt::format("probing {}", path), err);
    if (::unlink(path.c_str()) != 0 && errno != ENOENT) {
      return fail_errno(fmt::format("removing stale socket {}", path));
    }
  } else if (errno != ENOENT) {
    return fail_errno(fmt::format("lstat {}", path));
  }
  auto s = unix_socket();
  if (!s) return std::unexpected(std::move(s.error()));
  // bind() creates the file and only listen() makes connect() work: bound under a staging name
  // and renamed onto `path` once listening, the path's existence means "ready" (a front-end or
  // a unit that waits for the file never meets ECONNREFUSED in between). A staging name too long
  // for sun_path (a directory of ~90 bytes or more) falls back to binding `path` itself.
  const std::string staging = staging_name(path);
  auto staging_addr = unix_address(staging);
  const bool staged = staging_addr.has_value();
  const sockaddr_un& bind_addr = staged ? *staging_addr : *addr;
  const std::string& bound = staged ? staging : path;
  if (::bind(s->get(), reinterpret_cast<const sockaddr*>(&bind_addr), sizeof(bind_addr)) != 0) {
    return fail_errno(fmt::format("bind {}", path));  // the staging name is ours, not the user's
  }
  if (::listen(s->get(), backlog) != 0) {
    const int err = errno;
    ::unlink(bound.c_str());
    return fail(Errc::system, fmt::format("listen {}", path), err);
  }
  if (staged) {
    // RENAME_NOREPLACE: another process that started listening on `path` since the probe keeps
    // it (as bind() would have refused with EADDRINUSE); file systems without the flag get a
    // plain rename.
    int r = ::renameat2(AT_FDCWD, staging.c_str(), AT_FDCWD, path.c_str(), RENAME_NOREPLACE);
    if (r != 0 && errno == EINVAL) r = ::rename(staging.c_str(), path.c_str());
    if (r != 0) {
      const int err = errno;
      ::unlink(staging.c_str());
      if (err == EEXIST) {
        return fail(Errc::bad_state, fmt::format("{} is in use by a listening process", path));
      }
      return fail(Errc::system, fmt::format("renaming {} to {}", staging, path), err);
    }
  }
  return std::move(*s);
}

Result<Channel> accept(int listen_fd) {
  for (;;) {
    const int fd = ::accept4(listen_fd, nullptr, nullptr, SOCK_CLOEXEC);
    if (fd >= 0) return Channel(UniqueFd(fd));
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) {
      return fail(Errc::would_block, "no connection pending");
    }
    return fail_errno("accept4");
  }
}

Result<Channel> connect_unix(const std::string& path) {
  auto addr = unix_address(path);
  if (!addr) return std::unexpected(std::move(addr.error()));
  auto s = unix_socket();
  if (!s) return std::unexpected(std::move(s.error()));
  if (::connect(s->get(), reinterpret_cast<const sockaddr*>(&*addr), sizeof(*addr)) != 0) {
    return fail_errno(fmt::format("connect {}", path));
  }
  return Channel(std::move(*s));
}

Result<std::pair<Channel, Channel>> socketpair() {
  int sv[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) {
    return fail_errno("socketpair");
  }
  return std::pair<Channel, Channel>(Channel(UniqueFd(sv[0])), Channel(UniqueFd(sv[1])));
}

}  // namespace vhostkit::vhost_user
