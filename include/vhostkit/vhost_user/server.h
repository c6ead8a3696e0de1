// The socket side of a vhost-user back-end program: where front-ends come from, one at a time.
//   server  listen on a path (a stale socket left by a dead process is removed first), serve
//           one front-end, accept the next after it goes away, remove the socket on exit
//   client  connect to a front-end listening on a path, retrying with backoff, and reconnect
//           after it goes away (QEMU's "reconnect" chardev option on the other side)
//   fd      serve an already connected socket inherited from the parent (--fd=N) once
//   listener  accept on a listening socket inherited from the parent (systemd socket
//           activation), like server mode; the socket file belongs to the parent and stays
// Each connection gets a fresh BackendSession on the same vhost::Device, which is reset when
// the session ends.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <string>

#include "vhostkit/error.h"
#include "vhostkit/vhost/device.h"
#include "vhostkit/vhost_user/backend_session.h"

namespace vhostkit::vhost_user {

struct ServerOptions {
  enum class Mode : std::uint8_t { server, client, fd, listener };

  Mode mode = Mode::server;
  std::string path;  // server and client modes
  int fd = -1;       // fd mode: a connected AF_UNIX stream socket; listener mode: a listening one.
                     // The server owns it.
  // Client mode: wait this long after a failed connect, doubling up to the maximum.
  std::chrono::milliseconds reconnect_initial{100};
  std::chrono::milliseconds reconnect_max{2000};
  SessionOptions session;
  // Called on the server's thread with true as a front-end's session starts and false when it
  // has ended (the device reset): what a program reports as its connection state.
  std::function<void(bool connected)> on_session;
  // Called once, on the thread in run(), when front-ends can reach this back-end: the socket
  // listens (server, listener), the first connect succeeded (client), before the inherited
  // connection is served (fd). Its argument says where ("listening on PATH"). The programs
  // tell systemd (READY=1) from here.
  std::function<void(const std::string& where)> on_ready;

  static ServerOptions listen(std::string path) {
    ServerOptions o;
    o.mode = Mode::server;
    o.path = std::move(path);
    return o;
  }
  static ServerOptions connect(std::string path) {
    ServerOptions o;
    o.mode = Mode::client;
    o.path = std::move(path);
    return o;
  }
  static ServerOptions inherited(int fd) {
    ServerOptions o;
    o.mode = Mode::fd;
    o.fd = fd;
    return o;
  }
  static ServerOptions inherited_listener(int fd) {
    ServerOptions o;
    o.mode = Mode::listener;
    o.fd = fd;
    return o;
  }
};

class BackendServer {
 public:
  BackendServer(vhost::Device& device, ServerOptions opts);
  ~BackendServer();
  BackendServer(const BackendServer&) = delete;
  BackendServer& operator=(const BackendServer&) = delete;

  // Serves until `stop_fd` (eventfd or pipe, not read; -1: never) becomes readable, or in fd
  // mode until the one front-end goes away. Errors only for what stops the program from being
  // a back-end at all: a path that can't be listened on ("cannot listen on /x/y.sock: No such
  // file or directory"), an inherited fd that is not a connected stream socket (fd mode) or not
  // a listening AF_UNIX stream socket (listener mode).
  Result<> run(int stop_fd);

  // Sessions started so far (tests, stats). Any thread.
  std::uint64_t sessions() const noexcept { return sessions_.load(std::memory_order_relaxed); }
  // Client mode: connect attempts that failed so far. Any thread.
  std::uint64_t failed_connects() const noexcept {
    return failed_connects_.load(std::memory_order_relaxed);
  }

 private:
  Result<> run_server(int stop_fd);
  Result<> run_listener(int stop_fd);
  Result<> accept_loop(int listen_fd, const std::string& where, int stop_fd);
  void ready(const std::string& where);
  Result<> run_client(int stop_fd);
  Result<> run_fd(int stop_fd);
  void serve(Channel channel, int stop_fd);

  vhost::Device& device_;
  ServerOptions opts_;
  std::atomic<std::uint64_t> sessions_{0};
  std::atomic<std::uint64_t> failed_connects_{0};
  bool ready_sent_ = false;
};

}  // namespace vhostkit::vhost_user
