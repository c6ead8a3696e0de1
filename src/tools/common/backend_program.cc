#include "backend_program.h"

#include <sys/socket.h>
#include <systemd/sd-daemon.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>

#include <fmt/format.h>
#include <spdlog/spdlog.h>
#include <nlohmann/json.hpp>

#include "cli_util.h"

namespace vhostkit::cli {

BackendProgram::BackendProgram(std::string name, std::string type, std::string description)
    : name_(std::move(name)), type_(std::move(type)), app_(std::move(description), name_) {
  BackendArgs& a = args_;
  app_.add_option("--socket-path", a.socket_path,
                  "vhost-user socket: listen on it (or connect to it with --client)");
  app_.add_option("--fd", a.fd, "serve an already connected vhost-user socket inherited as fd N")
      ->check(CLI::NonNegativeNumber);
  app_.add_flag("--client", a.client,
                "connect to --socket-path instead of listening, reconnecting when the frontend "
                "goes away");
  app_.add_flag("--print-capabilities", a.print_capabilities,
                "print the backend's capabilities as JSON and exit");
  app_.add_option("--poll", a.poll, "worker polling: event, busy or adaptive")
      ->check(CLI::IsMember({"event", "busy", "adaptive"}))
      ->capture_default_str();
  app_.add_option("--cpu", a.cpu, "pin one worker per listed CPU, e.g. 1 or 0,2-3")
      ->option_text("LIST");
  app_.add_option("--stats", a.stats, "print per-queue rates every SECONDS")
      ->check(CLI::Range(0.1, 3600.0))
      ->option_text("SECONDS");
  app_.add_option("--log-level", a.log_level, "trace, debug, info, warn, error, critical or off")
      ->capture_default_str();
  app_.add_option("--spin-us", a.spin_us,
                  "adaptive polling: spin this long before sleeping (a block back-end sleeps at "
                  "once while nothing but its I/O is in flight)")
      ->capture_default_str();
  app_.add_flag("--no-packed", a.no_packed,
                "do not offer the packed virtqueue (VIRTIO_F_RING_PACKED): front-ends then use "
                "the split ring");
  app_.add_flag("--no-in-order", a.no_in_order,
                "do not offer VIRTIO_F_IN_ORDER (used buffers in the order they were made "
                "available)");
  app_.add_option("--metrics", a.metrics,
                  "serve Prometheus metrics at http://ADDR:PORT/metrics (JSON at /stats), e.g. "
                  "127.0.0.1:9100 or [::1]:9100; off by default")
      ->option_text("ADDR:PORT");
}

void BackendProgram::die_usage(const std::string& msg) const {
  std::fprintf(stderr, "%s: %s\n", name_.c_str(), msg.c_str());
  std::exit(kExitBadArgs);
}

std::optional<int> BackendProgram::parse(int argc, char** argv) {
  try {
    app_.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app_.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app_.exit(e);
  } catch (const CLI::ParseError& e) {
    die_usage(fmt::format("{} (see --help)", e.what()));
  }
  if (args_.print_capabilities) {
    nlohmann::json caps = {{"type", type_}};
    std::printf("%s\n", caps.dump().c_str());
    return 0;
  }
  return std::nullopt;
}

vhost::DeviceOptions BackendConfig::device_options(std::string name,
                                                   std::uint16_t queues_per_worker,
                                                   std::uint16_t unpinned_workers) const {
  vhost::DeviceOptions o;
  o.name = std::move(name);
  o.mode = poll;
  o.cpus = cpus;
  o.queues_per_worker = queues_per_worker;
  o.unpinned_workers = unpinned_workers;
  o.adaptive_spin_us = adaptive_spin_us;
  return o;
}

BackendConfig BackendProgram::check() {
  const BackendArgs& a = args_;
  BackendConfig c;
  const bool have_path = !a.socket_path.empty();
  const bool have_fd = a.fd >= 0;
  if (have_path && have_fd) die_usage("give exactly one of --socket-path=PATH or --fd=N");
  if (a.client && !have_path) die_usage("--client needs --socket-path=PATH");
  // Neither: systemd socket activation (LISTEN_FDS/LISTEN_PID naming this process), else a
  // usage error. Sockets passed as well as an option given: a .socket unit whose socket nobody
  // would ever accept on (its front-ends would hang), so refused.
  int activated = -1;
  if (!have_path && !have_fd) {
    activated = activated_listener();
  } else if (const int n = sd_listen_fds(1); n > 0) {
    die_usage(fmt::format("socket activation passed {} socket(s) and {} was given: use one", n,
                          have_path ? "--socket-path" : "--fd"));
  }
  if (auto r = set_log_level(a.log_level); !r) die_usage(r.error().detail);
  auto poll = vhost::parse_poll_mode(a.poll);
  if (!poll) die_usage(fmt::format("--poll '{}' is not event, busy or adaptive", a.poll));
  c.poll = *poll;
  if (!a.cpu.empty()) {
    auto cpus = parse_cpu_list(a.cpu);
    if (!cpus) die_usage("--cpu: " + cpus.error().detail);
    c.cpus = std::move(*cpus);
  }
  if (activated >= 0) {
    c.server = vhost_user::ServerOptions::inherited_listener(activated);
    c.where = fmt::format("listening on socket-activated fd {}", activated);
  } else if (have_fd) {
    int type = 0;
    socklen_t len = sizeof(type);
    if (getsockopt(a.fd, SOL_SOCKET, SO_TYPE, &type, &len) != 0 || type != SOCK_STREAM) {
      die_usage(fmt::format("--fd={} is not a connected stream socket", a.fd));
    }
    c.server = vhost_user::ServerOptions::inherited(a.fd);
    c.where = fmt::format("fd {}", a.fd);
  } else if (a.client) {
    c.server = vhost_user::ServerOptions::connect(a.socket_path);
    c.where = "connecting to " + a.socket_path;
  } else {
    c.server = vhost_user::ServerOptions::listen(a.socket_path);
    c.where = "listening on " + a.socket_path;
  }
  c.stats_interval = std::chrono::milliseconds(static_cast<long>(a.stats * 1000));
  c.adaptive_spin_us = a.spin_us;
  c.packed = !a.no_packed;
  c.in_order = !a.no_in_order;
  if (!a.metrics.empty()) {
    auto hp = parse_host_port(a.metrics);
    if (!hp) die_usage(fmt::format("--metrics={}: {}", a.metrics, hp.error().detail));
    c.metrics = std::move(*hp);
  }
  return c;
}

int BackendProgram::activated_listener() const {
  // unset_environment=1: the variables describe this process only, not anything it starts.
  const int n = sd_listen_fds(1);
  if (n < 0) {
    die_usage(fmt::format("socket activation: {}", std::strerror(-n)));
  }
  if (n == 0) {
    die_usage(
        "give exactly one of --socket-path=PATH or --fd=N (or start under systemd socket "
        "activation)");
  }
  if (n > 1) {
    die_usage(
        fmt::format("socket activation passed {} sockets; one listening unix socket is "
                    "expected",
                    n));
  }
  const int fd = SD_LISTEN_FDS_START;
  const int r = sd_is_socket_unix(fd, SOCK_STREAM, 1, nullptr, 0);
  if (r < 0) die_usage(fmt::format("socket-activated fd {}: {}", fd, std::strerror(-r)));
  if (r == 0) {
    die_usage(
        fmt::format("socket-activated fd {} is not a listening unix stream socket "
                    "(ListenStream= in the .socket unit)",
                    fd));
  }
  return fd;
}

void BackendProgram::block_signals() {
  if (stop_fd_ >= 0) return;
  auto fd = block_stop_signals();
  if (!fd) die_usage(fd.error().message());
  stop_fd_ = fd->release();  // lives as long as the process
}

int BackendProgram::serve(vhost::Device& device, vhost_user::ServerOptions opts) {
  block_signals();
  opts.on_session = [this](bool up) {
    if (up) sessions_.fetch_add(1, std::memory_order_relaxed);
    connected_.store(up, std::memory_order_relaxed);
  };
  // systemd (Type=notify) learns that front-ends can connect; without NOTIFY_SOCKET these are
  // no-ops. STATUS is what `systemctl status` shows.
  opts.on_ready = [this](const std::string& where) {
    sd_notifyf(0, "READY=1\nSTATUS=%s: %s", name_.c_str(), where.c_str());
  };
  vhost_user::BackendServer server(device, std::move(opts));
  auto r = server.run(stop_fd_);
  // Stopping (a signal, or the one --fd front-end left): the device tears down next.
  sd_notify(0, "STOPPING=1");
  if (!r) {
    // The server's details already name the path and the system's reason.
    const std::string why = r.error().detail.empty() ? r.error().message() : r.error().detail;
    std::fprintf(stderr, "%s: %s\n", name_.c_str(), why.c_str());
    return server.sessions() == 0 ? kExitBadArgs : 1;
  }
  spdlog::info("{}: stopped after {} session(s)", name_, server.sessions());
  return 0;
}

Ticker::Ticker(std::chrono::milliseconds interval, std::function<void(double)> tick)
    : interval_(interval), tick_(std::move(tick)), thread_([this] { run(); }) {}

Ticker::~Ticker() {
  {
    std::lock_guard lk(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  thread_.join();
}

void Ticker::run() {
  auto last = std::chrono::steady_clock::now();
  std::unique_lock lk(mu_);
  while (!cv_.wait_for(lk, interval_, [this] { return stop_; })) {
    const auto now = std::chrono::steady_clock::now();
    const double secs = std::chrono::duration<double>(now - last).count();
    last = now;
    lk.unlock();
    tick_(secs > 0 ? secs : 1.0);
    lk.lock();
  }
}

}  // namespace vhostkit::cli
