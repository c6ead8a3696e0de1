#include "cli_util.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <charconv>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

namespace vhostkit::cli {
namespace {

Result<int> parse_int(std::string_view s, std::string_view what) {
  int v = 0;
  auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  if (ec != std::errc{} || p != s.data() + s.size() || s.empty()) {
    return fail(Errc::invalid_argument, fmt::format("{} '{}' is not a number", what, s));
  }
  return v;
}

}  // namespace

Result<std::vector<int>> parse_cpu_list(std::string_view s) {
  std::vector<int> cpus;
  if (s.empty()) return fail(Errc::invalid_argument, "empty CPU list");
  while (!s.empty()) {
    auto comma = s.find(',');
    auto item = s.substr(0, comma);
    s = comma == std::string_view::npos ? std::string_view{} : s.substr(comma + 1);
    auto dash = item.find('-');
    auto lo = parse_int(item.substr(0, dash), "CPU");
    if (!lo) return std::unexpected(lo.error());
    int hi_v = *lo;
    if (dash != std::string_view::npos) {
      auto hi = parse_int(item.substr(dash + 1), "CPU");
      if (!hi) return std::unexpected(hi.error());
      hi_v = *hi;
    }
    if (*lo < 0 || hi_v < *lo || hi_v >= CPU_SETSIZE) {
      return fail(Errc::invalid_argument, fmt::format("CPU range '{}' is not valid", item));
    }
    for (int c = *lo; c <= hi_v; ++c) {
      if (std::find(cpus.begin(), cpus.end(), c) != cpus.end()) {
        return fail(Errc::invalid_argument, fmt::format("CPU {} listed twice", c));
      }
      cpus.push_back(c);
    }
  }
  return cpus;
}

Result<std::array<std::uint8_t, 6>> parse_mac(std::string_view s) {
  std::array<std::uint8_t, 6> mac{};
  auto bad = [&] {
    return fail(Errc::invalid_argument,
                fmt::format("MAC '{}' is not of the form 52:54:00:12:34:56", s));
  };
  if (s.size() != 17) return bad();
  for (std::size_t i = 0; i < 6; ++i) {
    if (i > 0 && s[i * 3 - 1] != ':' && s[i * 3 - 1] != '-') return bad();
    unsigned v = 0;
    auto [p, ec] = std::from_chars(s.data() + i * 3, s.data() + i * 3 + 2, v, 16);
    if (ec != std::errc{} || p != s.data() + i * 3 + 2) return bad();
    mac[i] = static_cast<std::uint8_t>(v);
  }
  if (mac[0] & 1) {
    return fail(Errc::invalid_argument, fmt::format("MAC '{}' is a multicast address", s));
  }
  return mac;
}

std::string format_mac(const std::array<std::uint8_t, 6>& m) {
  return fmt::format("{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", m[0], m[1], m[2], m[3], m[4],
                     m[5]);
}

Result<HostPort> parse_host_port(std::string_view s) {
  const auto colon = s.rfind(':');
  if (colon == std::string_view::npos) {
    return fail(Errc::invalid_argument, "give ADDR:PORT, e.g. 127.0.0.1:9100");
  }
  const std::string_view host = s.substr(0, colon);
  const std::string_view port = s.substr(colon + 1);
  unsigned p = 0;
  auto [end, ec] = std::from_chars(port.data(), port.data() + port.size(), p);
  if (port.empty() || ec != std::errc{} || end != port.data() + port.size() || p == 0 ||
      p > 65535) {
    return fail(Errc::invalid_argument, fmt::format("port '{}' is not in 1..65535", port));
  }
  HostPort hp;
  hp.port = static_cast<std::uint16_t>(p);
  in6_addr a6{};
  in_addr a4{};
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']') {
    hp.host = std::string(host.substr(1, host.size() - 2));
    if (::inet_pton(AF_INET6, hp.host.c_str(), &a6) != 1) {
      return fail(Errc::invalid_argument, fmt::format("'{}' is not an IPv6 address", hp.host));
    }
  } else {
    hp.host = std::string(host);
    if (::inet_pton(AF_INET, hp.host.c_str(), &a4) != 1) {
      return fail(
          Errc::invalid_argument,
          fmt::format("'{}' is not an IPv4 address (IPv6 goes in brackets: [::1])", hp.host));
    }
  }
  return hp;
}

Result<> set_log_level(std::string_view level) {
  auto lv = spdlog::level::from_str(std::string(level));
  // from_str answers "off" for anything it does not know; accept "off" only when asked.
  if (lv == spdlog::level::off && level != "off") {
    return fail(Errc::invalid_argument,
                fmt::format("log level '{}' is not one of trace, debug, info, warn, error, "
                            "critical, off",
                            level));
  }
  spdlog::set_level(lv);
  return {};
}

Result<UniqueFd> block_stop_signals() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  if (pthread_sigmask(SIG_BLOCK, &set, nullptr) != 0) return fail_errno("pthread_sigmask");
  // A peer that closes its end of a socket must not kill us: writes then fail with EPIPE.
  signal(SIGPIPE, SIG_IGN);
  int fd = signalfd(-1, &set, SFD_CLOEXEC | SFD_NONBLOCK);
  if (fd < 0) return fail_errno("signalfd");
  return UniqueFd(fd);
}

Result<std::optional<vhost_user::Channel>> accept_unless_stopped(int listen_fd, int stop_fd) {
  // Non-blocking, so that accept after a readable poll can never block past a signal.
  const int flags = ::fcntl(listen_fd, F_GETFL);
  if (flags < 0 || ::fcntl(listen_fd, F_SETFL, flags | O_NONBLOCK) < 0) {
    return fail_errno("fcntl O_NONBLOCK on the listening socket");
  }
  for (;;) {
    pollfd p[2] = {{stop_fd, POLLIN, 0}, {listen_fd, POLLIN, 0}};
    const int n = ::poll(p, 2, -1);
    if (n < 0) {
      if (errno == EINTR) continue;
      return fail_errno("poll");
    }
    if (p[0].revents != 0) return std::nullopt;
    if (p[1].revents == 0) continue;
    auto ch = vhost_user::accept(listen_fd);
    // The peer that knocked may have gone again before accept: wait for the next one.
    if (!ch && ch.error().code == Errc::would_block) continue;
    if (!ch) return std::unexpected(std::move(ch.error()));
    return std::optional<vhost_user::Channel>(std::move(*ch));
  }
}

Result<std::unique_ptr<ShutdownOnStop>> ShutdownOnStop::start(int stop_fd, int socket_fd) {
  UniqueFd socket(::fcntl(socket_fd, F_DUPFD_CLOEXEC, 0));
  if (!socket) return fail_errno(fmt::format("dup of socket fd {}", socket_fd));
  UniqueFd done(::eventfd(0, EFD_CLOEXEC));
  if (!done) return fail_errno("eventfd");
  std::unique_ptr<ShutdownOnStop> w(
      new ShutdownOnStop(stop_fd, std::move(socket), std::move(done)));
  w->thread_ = std::thread([p = w.get()] { p->run(); });
  return w;
}

ShutdownOnStop::~ShutdownOnStop() {
  const std::uint64_t one = 1;
  // An eventfd write of 1 cannot fail short of overflow, which one write can't reach.
  (void)!::write(done_.get(), &one, sizeof one);
  thread_.join();
}

void ShutdownOnStop::run() noexcept {
  for (;;) {
    pollfd p[2] = {{done_.get(), POLLIN, 0}, {stop_fd_, POLLIN, 0}};
    const int n = ::poll(p, 2, -1);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 || p[0].revents != 0) return;
    if (p[1].revents != 0) {
      // Published before the shutdown, so whoever sees the socket closed also sees why.
      stopped_.store(true, std::memory_order_release);
      ::shutdown(socket_.get(), SHUT_RDWR);
      return;
    }
  }
}

}  // namespace vhostkit::cli
