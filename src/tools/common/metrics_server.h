// The HTTP side of --metrics: cpp-httplib serving /metrics (Prometheus text 0.0.4) and /stats
// (JSON) from a snapshot function, on its own threads. Everything an HTTP client can make it
// spend is bounded: a fixed number of worker threads and of queued connections (beyond them a
// connection is closed at once), a deadline per connection, per-read and per-write timeouts,
// a few requests per connection, and a byte budget per connection (headers included). None of
// it touches the data path: the snapshot function reads relaxed counters.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string_view>
#include <thread>

#include "cli_util.h"
#include "metrics.h"
#include "vhostkit/error.h"
#include "vhostkit/unique_fd.h"

namespace vhostkit::cli::metrics {

struct Limits {
  unsigned workers = 2;                          // connections served at once
  unsigned queued = 16;                          // connections waiting for a worker
  std::chrono::milliseconds deadline{5000};      // a connection's whole life
  std::chrono::milliseconds io_timeout{2000};    // one read or write
  std::chrono::milliseconds idle_timeout{2000};  // between requests on a connection
  unsigned requests_per_connection = 10;
  std::size_t bytes_per_connection = 32 * 1024;  // what a client may send, headers included
};

class Server {
 public:
  using Source = std::function<Snapshot()>;

  // Binds now, so that an address that can't be listened on (not local, port in use) is an
  // error before anything is served, and serves on its own threads until destroyed. `source` is
  // called on those threads, possibly concurrently.
  static Result<std::unique_ptr<Server>> start(const HostPort& at, Source source,
                                               Limits limits = {});
  ~Server();
  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;

  // Connections closed unserved because every worker and queue slot was taken.
  std::uint64_t shed() const noexcept { return counts_->shed.load(std::memory_order_relaxed); }
  // Connections closed, served or shed: once it has caught up with the connections made, every
  // worker and queue slot is free again.
  std::uint64_t closed() const noexcept { return counts_->closed.load(std::memory_order_relaxed); }

  struct Counts {
    std::atomic<std::uint64_t> shed{0};
    std::atomic<std::uint64_t> closed{0};
  };

  struct Http;

 private:
  Server() = default;

  std::unique_ptr<Http> http_;
  std::shared_ptr<Counts> counts_;
  std::thread listener_;
};

// For the programs' --metrics=TEXT: the server, or nullptr after one line on stderr
// ("<program>: --metrics=TEXT: cannot listen on ...: Address already in use").
std::unique_ptr<Server> start_or_report(std::string_view program, std::string_view text,
                                        const HostPort& at, Server::Source source);

}  // namespace vhostkit::cli::metrics
