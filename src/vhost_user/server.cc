// BackendServer: listening, reconnecting and inherited-fd socket lifecycles around
// BackendSession.
#include "vhostkit/vhost_user/server.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <utility>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

namespace vhostkit::vhost_user {

namespace {

enum class Wait : std::uint8_t { ready, stop, timeout };

// Waits for `fd` (-1: nothing) to be readable, `stop_fd` to fire, or the timeout (negative:
// none).
Result<Wait> wait_for(int fd, int stop_fd, std::chrono::milliseconds timeout) {
  for (;;) {
    pollfd p[2] = {{stop_fd, POLLIN, 0}, {fd, POLLIN, 0}};
    const int ms = timeout.count() < 0 ? -1 : static_cast<int>(timeout.count());
    const int r = ::poll(p, 2, ms);  // negative fds are ignored by poll
    if (r < 0) {
      if (errno == EINTR) continue;
      return fail_errno("poll");
    }
    if (stop_fd >= 0 && p[0].revents != 0) return Wait::stop;
    if (fd >= 0 && p[1].revents != 0) return Wait::ready;
    if (r == 0) return Wait::timeout;
  }
}

bool stop_requested(int stop_fd) {
  if (stop_fd < 0) return false;
  pollfd p{stop_fd, POLLIN, 0};
  return ::poll(&p, 1, 0) > 0 && p.revents != 0;
}

std::string reason(const Error& e) {
  return e.sys_errno != 0 ? std::string(std::strerror(e.sys_errno)) : e.detail;
}

}  // namespace

BackendServer::BackendServer(vhost::Device& device, ServerOptions opts)
    : device_(device), opts_(std::move(opts)) {}

BackendServer::~BackendServer() = default;

Result<> BackendServer::run(int stop_fd) {
  switch (opts_.mode) {
    case ServerOptions::Mode::server: return run_server(stop_fd);
    case ServerOptions::Mode::client: return run_client(stop_fd);
    case ServerOptions::Mode::fd: return run_fd(stop_fd);
    case ServerOptions::Mode::listener: return run_listener(stop_fd);
  }
  return fail(Errc::invalid_argument, "unknown server mode");
}

void BackendServer::ready(const std::string& where) {
  if (ready_sent_) return;
  ready_sent_ = true;
  if (opts_.on_ready) opts_.on_ready(where);
}

void BackendServer::serve(Channel channel, int stop_fd) {
  sessions_.fetch_add(1, std::memory_order_relaxed);
  if (opts_.on_session) opts_.on_session(true);
  {
    BackendSession session(device_, std::move(channel), opts_.session);
    // run() logs why a session ended; the server goes on either way.
    (void)session.run(stop_fd);
  }
  if (opts_.on_session) opts_.on_session(false);
}

Result<> BackendServer::run_server(int stop_fd) {
  auto listener = listen_unix(opts_.path);
  if (!listener) {
    return fail(listener.error().code,
                fmt::format("cannot listen on {}: {}", opts_.path, reason(listener.error())),
                listener.error().sys_errno);
  }
  spdlog::info("vhost-user {}: listening on {}", opts_.session.name, opts_.path);
  auto result = accept_loop(listener->get(), opts_.path, stop_fd);
  listener->reset();
  ::unlink(opts_.path.c_str());
  return result;
}

Result<> BackendServer::run_listener(int stop_fd) {
  const int raw = std::exchange(opts_.fd, -1);
  UniqueFd fd(raw);  // owned from here on, whatever happens
  if (!fd) return fail(Errc::invalid_argument, "no inherited listening socket given");
  int domain = 0;
  int type = 0;
  int listening = 0;
  socklen_t len = sizeof(int);
  if (::getsockopt(raw, SOL_SOCKET, SO_DOMAIN, &domain, &len) != 0) {
    const int err = errno;
    if (err == EBADF) fd.release();  // not open: nothing to close
    return fail(Errc::invalid_argument,
                fmt::format("fd {} is not a socket: {}", raw, std::strerror(err)), err);
  }
  len = sizeof(int);
  (void)::getsockopt(raw, SOL_SOCKET, SO_TYPE, &type, &len);
  len = sizeof(int);
  (void)::getsockopt(raw, SOL_SOCKET, SO_ACCEPTCONN, &listening, &len);
  if (domain != AF_UNIX || type != SOCK_STREAM || listening == 0) {
    return fail(Errc::invalid_argument,
                fmt::format("fd {} is not a listening unix stream socket", raw));
  }
  // The accept loop polls before accepting; non-blocking, a connection that goes away between
  // the two can't leave accept() waiting for the next one while a stop is pending.
  const int flags = ::fcntl(raw, F_GETFL);
  if (flags < 0 || ::fcntl(raw, F_SETFL, flags | O_NONBLOCK) != 0) {
    return fail_errno(fmt::format("fcntl O_NONBLOCK on fd {}", raw));
  }
  const std::string where = fmt::format("inherited fd {}", raw);
  spdlog::info("vhost-user {}: listening on {}", opts_.session.name, where);
  // The socket file, if any, belongs to whoever made the socket (systemd): not removed here.
  return accept_loop(raw, where, stop_fd);
}

Result<> BackendServer::accept_loop(int listen_fd, const std::string& where, int stop_fd) {
  ready("listening on " + where);
  for (;;) {
    auto w = wait_for(listen_fd, stop_fd, std::chrono::milliseconds(-1));
    if (!w) return std::unexpected(std::move(w.error()));
    if (*w == Wait::stop) return {};
    auto ch = accept(listen_fd);
    if (!ch) {
      if (ch.error().code == Errc::would_block) continue;
      // ECONNABORTED and friends: that front-end is gone, the listener is fine.
      spdlog::warn("vhost-user {}: accept on {}: {}", opts_.session.name, where,
                   ch.error().message());
      if (ch.error().sys_errno == EMFILE || ch.error().sys_errno == ENFILE) {
        // Out of fds: don't spin on a listener that stays readable.
        auto slept = wait_for(-1, stop_fd, std::chrono::milliseconds(100));
        if (slept && *slept == Wait::stop) return {};
      }
      continue;
    }
    spdlog::info("vhost-user {}: front-end connected on {}", opts_.session.name, where);
    serve(std::move(*ch), stop_fd);
    if (stop_requested(stop_fd)) return {};
  }
}

Result<> BackendServer::run_client(int stop_fd) {
  auto backoff = opts_.reconnect_initial;
  bool announced = false;  // one log line per outage, not per attempt
  for (;;) {
    if (stop_requested(stop_fd)) return {};
    auto ch = connect_unix(opts_.path);
    if (ch) {
      spdlog::info("vhost-user {}: connected to {}", opts_.session.name, opts_.path);
      ready("connected to " + opts_.path);
      announced = false;
      backoff = opts_.reconnect_initial;
      serve(std::move(*ch), stop_fd);
      continue;
    }
    if (ch.error().code == Errc::invalid_argument) {
      return fail(Errc::invalid_argument,
                  fmt::format("cannot connect to {}: {}", opts_.path, ch.error().detail));
    }
    failed_connects_.fetch_add(1, std::memory_order_relaxed);
    if (!announced) {
      spdlog::info("vhost-user {}: cannot connect to {} ({}); retrying", opts_.session.name,
                   opts_.path, reason(ch.error()));
      announced = true;
    }
    auto w = wait_for(-1, stop_fd, backoff);
    if (!w) return std::unexpected(std::move(w.error()));
    if (*w == Wait::stop) return {};
    backoff = std::min(backoff * 2, opts_.reconnect_max);
  }
}

Result<> BackendServer::run_fd(int stop_fd) {
  const int raw = std::exchange(opts_.fd, -1);
  UniqueFd fd(raw);  // owned from here on, whatever happens
  if (!fd) return fail(Errc::invalid_argument, "no inherited vhost-user socket (--fd) given");
  int type = 0;
  socklen_t len = sizeof(type);
  if (::getsockopt(raw, SOL_SOCKET, SO_TYPE, &type, &len) != 0) {
    const int err = errno;
    if (err == EBADF) fd.release();  // not open: nothing to close
    return fail(Errc::invalid_argument,
                fmt::format("fd {} is not a socket: {}", raw, std::strerror(err)), err);
  }
  if (type != SOCK_STREAM) {
    return fail(Errc::invalid_argument,
                fmt::format("fd {} is not a stream socket (type {})", fd.get(), type));
  }
  ready(fmt::format("serving fd {}", fd.get()));
  serve(Channel(std::move(fd)), stop_fd);
  return {};
}

}  // namespace vhostkit::vhost_user
