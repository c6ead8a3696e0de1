// Parsing helpers shared by vhostkit's programs: CPU lists, MAC addresses, log levels, and the
// signal fd that turns SIGINT/SIGTERM into a readable fd the servers can stop on, with the two
// waits a front-end program needs it for (an accept, a blocked reply).
#pragma once

#include <array>
#include <atomic>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "vhostkit/error.h"
#include "vhostkit/unique_fd.h"
#include "vhostkit/vhost_user/channel.h"

namespace vhostkit::cli {

// "0", "0,2", "1-3,6": CPUs in the order given, each at most once, each < CPU_SETSIZE.
Result<std::vector<int>> parse_cpu_list(std::string_view s);

// "52:54:00:12:34:56" (or with '-'): a unicast address.
Result<std::array<std::uint8_t, 6>> parse_mac(std::string_view s);
std::string format_mac(const std::array<std::uint8_t, 6>& mac);

// ADDR:PORT for a TCP listener: a numeric IPv4 address or a bracketed IPv6 one ("[::1]:9100"),
// and a port in 1..65535.
struct HostPort {
  std::string host;  // without brackets
  std::uint16_t port = 0;
};
Result<HostPort> parse_host_port(std::string_view s);

// trace, debug, info, warn, error, critical, off: sets spdlog's default level.
Result<> set_log_level(std::string_view level);

// Blocks SIGINT and SIGTERM in the calling thread (and so in every thread started after it)
// and returns a signalfd that becomes readable when either arrives. Call before any thread
// starts.
Result<UniqueFd> block_stop_signals();

// Waits for a connection on `listen_fd` or for SIGINT/SIGTERM on `stop_fd` (the signalfd of
// block_stop_signals(), polled and never read, so every later wait on it sees the signal too).
// nullopt: the signal came first. Leaves the listener non-blocking.
Result<std::optional<vhost_user::Channel>> accept_unless_stopped(int listen_fd, int stop_fd);

// While it lives, a thread polls `stop_fd` (never reading it) and, when SIGINT/SIGTERM arrives,
// shuts the socket down. A front-end blocked in a vhost-user exchange on that socket (a reply
// wait, bounded only by its timeout, which may be minutes) then sees the peer "disconnected" at
// once, and stopped() tells the program why. It keeps its own dup of the socket, so the owner
// may close its fd first without the watcher ever touching a reused fd number.
class ShutdownOnStop {
 public:
  static Result<std::unique_ptr<ShutdownOnStop>> start(int stop_fd, int socket_fd);
  ~ShutdownOnStop();
  ShutdownOnStop(const ShutdownOnStop&) = delete;
  ShutdownOnStop& operator=(const ShutdownOnStop&) = delete;

  bool stopped() const noexcept { return stopped_.load(std::memory_order_acquire); }

 private:
  ShutdownOnStop(int stop_fd, UniqueFd socket, UniqueFd done)
      : stop_fd_(stop_fd), socket_(std::move(socket)), done_(std::move(done)) {}
  void run() noexcept;

  int stop_fd_;
  UniqueFd socket_;
  UniqueFd done_;  // an eventfd the destructor signals to end the thread
  std::atomic<bool> stopped_{false};
  std::thread thread_;
};

}  // namespace vhostkit::cli
