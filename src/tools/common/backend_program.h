// The skeleton every vhost-user backend program of ours shares (vhostkit-net, vhostkit-blk):
// QEMU's "Backend program conventions" (--socket-path, --fd, --print-capabilities), our own
// common options (--client, --poll, --cpu, --stats, --log-level, --spin-us, --no-packed,
// --no-in-order, --metrics), their validation,
// and the serve loop that ends on SIGINT/SIGTERM. Under systemd: socket activation (without
// --socket-path and --fd, the one inherited listening socket is served) and Type=notify
// readiness (READY=1 once front-ends can connect, STOPPING=1 when the serve loop ends).
// Exit codes: 0 on SIGINT/SIGTERM, 2 on bad arguments or a resource the arguments name that
// can't be used (one line on stderr), 1 on a failure after the first frontend was served.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include <CLI/CLI.hpp>

#include "cli_util.h"
#include "vhostkit/vhost/device.h"
#include "vhostkit/vhost/worker.h"
#include "vhostkit/vhost_user/server.h"

namespace vhostkit::cli {

inline constexpr int kExitBadArgs = 2;

struct BackendArgs {
  std::string socket_path;
  int fd = -1;
  bool client = false;
  bool print_capabilities = false;
  std::string poll = "event";
  std::string cpu;
  double stats = 0;
  std::string log_level = "info";
  unsigned spin_us = 100;
  bool no_packed = false;
  bool no_in_order = false;
  std::string metrics;  // --metrics=ADDR:PORT
};

// What the shared options mean once checked.
struct BackendConfig {
  vhost::PollMode poll = vhost::PollMode::event;
  std::vector<int> cpus;
  vhost_user::ServerOptions server;
  std::string where;  // "listening on PATH", "connecting to PATH", "fd N"
  std::chrono::milliseconds stats_interval{0};
  std::uint32_t adaptive_spin_us = 100;
  // Ring features the device may offer (--no-packed, --no-in-order refuse them, to compare).
  bool packed = true;
  bool in_order = true;
  // --metrics: where to serve Prometheus text and JSON; nullopt when not asked.
  std::optional<HostPort> metrics;

  // The worker layout both programs build from the shared options: --poll, --cpu (one pinned
  // worker each) and --spin-us; without --cpu, `unpinned_workers` threads. Queue i runs on
  // worker (i / queues_per_worker) % workers.
  vhost::DeviceOptions device_options(std::string name, std::uint16_t queues_per_worker,
                                      std::uint16_t unpinned_workers) const;
};

class BackendProgram {
 public:
  // `name` is the program's name (prefix of every error line), `type` its vhost-user device
  // type for --print-capabilities ("net", "blk").
  BackendProgram(std::string name, std::string type, std::string description);

  CLI::App& app() noexcept { return app_; }
  BackendArgs& args() noexcept { return args_; }

  // Parses argv. Returns an exit code when the program should stop here (--help,
  // --print-capabilities); exits 2 with one line on a bad command line.
  std::optional<int> parse(int argc, char** argv);

  // Checks the shared options; exits 2 with one line on a bad one. Call after the program's
  // own checks so the first problem named is the most specific.
  BackendConfig check();

  // One line "<name>: <msg>" on stderr, exit 2.
  [[noreturn]] void die_usage(const std::string& msg) const;

  // Blocks SIGINT/SIGTERM for every thread started after it (call before vhost::Device
  // exists), serves frontends until one of them arrives, and returns the exit code.
  int serve(vhost::Device& device, vhost_user::ServerOptions opts);

  // Call before any thread starts; serve() calls it if it was not.
  void block_signals();

  // The connection state serve() keeps, for --metrics. Any thread.
  bool connected() const noexcept { return connected_.load(std::memory_order_relaxed); }
  std::uint64_t sessions() const noexcept { return sessions_.load(std::memory_order_relaxed); }

 private:
  std::string name_;
  std::string type_;
  CLI::App app_;
  BackendArgs args_;
  // The listening socket systemd passed (fd 3), checked; exits 2 with one line when there is
  // none, more than one, or it is not a listening unix stream socket.
  int activated_listener() const;

  int stop_fd_ = -1;
  std::atomic<bool> connected_{false};
  std::atomic<std::uint64_t> sessions_{0};
};

// Calls `tick(seconds since the last call)` every `interval` on its own thread until destroyed
// (the --stats lines).
class Ticker {
 public:
  Ticker(std::chrono::milliseconds interval, std::function<void(double)> tick);
  ~Ticker();
  Ticker(const Ticker&) = delete;
  Ticker& operator=(const Ticker&) = delete;

 private:
  void run();

  std::chrono::milliseconds interval_;
  std::function<void(double)> tick_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;
  std::thread thread_;
};

}  // namespace vhostkit::cli
