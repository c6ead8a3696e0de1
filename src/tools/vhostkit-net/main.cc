// vhostkit-net: a vhost-user virtio-net backend. QEMU (or DPDK's virtio-user) connects to its
// socket and the guest gets a NIC whose frames go to a TAP device, an AF_PACKET interface, or
// straight back to the guest with the MACs swapped (--loopback).
//
// Follows QEMU's vhost-user "Backend program conventions" (--socket-path, --fd,
// --print-capabilities). Exit codes: 0 on SIGINT/SIGTERM, 2 on bad arguments or a resource the
// arguments name that can't be used (one line on stderr), 1 on a failure after start.
#include <sys/socket.h>
#include <unistd.h>

#include <cstdio>
#include <memory>
#include <optional>
#include <string>

#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>

#include "cli_util.h"
#include "stats_printer.h"
#include "vhostkit/net/af_packet_port.h"
#include "vhostkit/net/net_device.h"
#include "vhostkit/net/tap_port.h"
#include "vhostkit/vhost/device.h"
#include "vhostkit/vhost_user/server.h"

namespace {

using namespace vhostkit;

constexpr int kExitBadArgs = 2;

struct Args {
  std::string socket_path;
  int fd = -1;
  bool client = false;
  bool print_capabilities = false;
  std::string tap;
  std::string af_packet;
  bool loopback = false;
  unsigned queues = 1;
  std::string poll = "event";
  std::string cpu;
  std::string mac = "52:54:00:12:34:56";
  unsigned mtu = 0;
  double stats = 0;
  std::string log_level = "info";
  unsigned burst = 32;
  unsigned spin_us = 100;
};

[[noreturn]] void die_usage(const std::string& msg) {
  std::fprintf(stderr, "vhostkit-net: %s\n", msg.c_str());
  std::exit(kExitBadArgs);
}

void add_options(CLI::App& app, Args& a) {
  app.add_option("--socket-path", a.socket_path,
                 "vhost-user socket: listen on it (or connect to it with --client)");
  app.add_option("--fd", a.fd, "serve an already connected vhost-user socket inherited as fd N")
      ->check(CLI::NonNegativeNumber);
  app.add_flag("--client", a.client,
               "connect to --socket-path instead of listening, reconnecting when the frontend "
               "goes away");
  app.add_flag("--print-capabilities", a.print_capabilities,
               "print the backend's capabilities as JSON and exit");
  auto* tap = app.add_option("--tap", a.tap, "port: open or create TAP interface IF")
                  ->option_text("IF");
  auto* af = app.add_option("--af-packet", a.af_packet,
                            "port: AF_PACKET on existing interface IF (mapped rings)")
                 ->option_text("IF");
  auto* lo = app.add_flag("--loopback", a.loopback,
                          "port: reflect every guest frame back with its MACs swapped");
  tap->excludes(af)->excludes(lo);
  af->excludes(lo);
  app.add_option("--queues", a.queues, "queue pairs")->check(CLI::Range(1u, 256u))
      ->capture_default_str();
  app.add_option("--poll", a.poll, "worker polling: event, busy or adaptive")
      ->check(CLI::IsMember({"event", "busy", "adaptive"}))->capture_default_str();
  app.add_option("--cpu", a.cpu, "pin one worker per listed CPU, e.g. 1 or 0,2-3")
      ->option_text("LIST");
  app.add_option("--mac", a.mac, "the guest's MAC address (config space)")->capture_default_str();
  app.add_option("--mtu", a.mtu, "offer VIRTIO_NET_F_MTU with this MTU (68-65535)")
      ->check(CLI::Range(68u, 65535u));
  app.add_option("--stats", a.stats, "print per-queue-pair rates every SECONDS")
      ->check(CLI::PositiveNumber)->option_text("SECONDS");
  app.add_option("--log-level", a.log_level,
                 "trace, debug, info, warn, error, critical or off")->capture_default_str();
  app.add_option("--burst", a.burst, "chains per batch")->check(CLI::Range(1u, 256u))
      ->capture_default_str();
  app.add_option("--spin-us", a.spin_us, "adaptive polling: spin this long before sleeping")
      ->capture_default_str();
}

int print_capabilities() {
  nlohmann::json caps = {{"type", "net"}};
  std::printf("%s\n", caps.dump().c_str());
  return 0;
}

std::unique_ptr<net::Port> open_port(const Args& a) {
  if (!a.tap.empty()) {
    auto p = net::TapPort::open(a.tap, static_cast<std::uint16_t>(a.queues));
    if (!p) die_usage(p.error().message());
    return std::move(*p);
  }
  if (!a.af_packet.empty()) {
    auto p = net::AfPacketPort::open(a.af_packet, static_cast<std::uint16_t>(a.queues));
    if (!p) die_usage(p.error().message());
    return std::move(*p);
  }
  return nullptr;  // loopback
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{
      "vhostkit-net: a vhost-user virtio-net backend. A QEMU guest or DPDK virtio-user connects "
      "to the socket and gets a NIC backed by a TAP device, an AF_PACKET interface or a "
      "loopback.",
      "vhostkit-net"};
  Args a;
  add_options(app, a);
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    die_usage(fmt::format("{} (see --help)", e.what()));
  }

  if (a.print_capabilities) return print_capabilities();

  const bool have_path = !a.socket_path.empty();
  const bool have_fd = a.fd >= 0;
  if (have_path == have_fd) die_usage("give exactly one of --socket-path=PATH or --fd=N");
  if (a.client && !have_path) die_usage("--client needs --socket-path=PATH");
  if (a.tap.empty() && a.af_packet.empty() && !a.loopback) {
    die_usage("give one port: --tap=IF, --af-packet=IF or --loopback");
  }
  if (auto r = cli::set_log_level(a.log_level); !r) die_usage(r.error().detail);
  auto mac = cli::parse_mac(a.mac);
  if (!mac) die_usage(mac.error().detail);
  auto poll = vhost::parse_poll_mode(a.poll);
  if (!poll) die_usage(fmt::format("--poll '{}' is not event, busy or adaptive", a.poll));
  std::vector<int> cpus;
  if (!a.cpu.empty()) {
    auto c = cli::parse_cpu_list(a.cpu);
    if (!c) die_usage("--cpu: " + c.error().detail);
    cpus = std::move(*c);
  }
  if (have_fd) {
    int type = 0;
    socklen_t len = sizeof(type);
    if (getsockopt(a.fd, SOL_SOCKET, SO_TYPE, &type, &len) != 0 || type != SOCK_STREAM) {
      die_usage(fmt::format("--fd={} is not a connected stream socket", a.fd));
    }
  }

  // Before any thread starts, so that every thread inherits the blocked mask.
  auto stop_fd = cli::block_stop_signals();
  if (!stop_fd) die_usage(stop_fd.error().message());

  net::NetOptions nopts;
  nopts.mac = *mac;
  nopts.mtu = static_cast<std::uint16_t>(a.mtu);
  nopts.queue_pairs = static_cast<std::uint16_t>(a.queues);
  nopts.burst = static_cast<std::uint16_t>(a.burst);
  nopts.port = open_port(a);
  auto netdev = net::NetDevice::create(std::move(nopts));
  if (!netdev) die_usage(netdev.error().message());
  net::NetDevice& dev = **netdev;

  vhost::DeviceOptions dopts;
  dopts.name = "net";
  dopts.mode = *poll;
  dopts.cpus = cpus;
  dopts.queues_per_worker = 2;  // a pair's tx and rx rings share a worker
  dopts.adaptive_spin_us = a.spin_us;
  vhost::Device device(dev, dopts);

  vhost_user::ServerOptions sopts = have_fd ? vhost_user::ServerOptions::inherited(a.fd)
                                    : a.client ? vhost_user::ServerOptions::connect(a.socket_path)
                                               : vhost_user::ServerOptions::listen(a.socket_path);
  sopts.session.name = "net";
  sopts.session.queue_num = dev.queue_pairs();  // QEMU compares it with its queue pairs
  sopts.session.send_rarp = [&dev](const vhost_user::Mac& m) -> Result<> {
    dev.announce(m.data());
    return {};
  };
  sopts.session.set_mtu = [](std::uint16_t mtu) -> Result<> {
    spdlog::info("frontend set MTU {}", mtu);
    return {};
  };

  const char* port_desc = dev.loopback() ? "loopback" : nullptr;
  std::string port_str = port_desc ? port_desc
                                   : fmt::format("{} {}", dev.port()->kind(), dev.port()->ifname());
  spdlog::info("vhostkit-net: {} {}, port {}, {} queue pair(s), poll {}, mac {}",
               have_fd ? "fd" : (a.client ? "connecting to" : "listening on"),
               have_fd ? std::to_string(a.fd) : a.socket_path, port_str, dev.queue_pairs(),
               a.poll, cli::format_mac(*mac));

  std::optional<cli::StatsPrinter> stats;
  if (a.stats > 0) {
    stats.emplace(dev, std::chrono::milliseconds(static_cast<long>(a.stats * 1000)),
                  [](const std::string& line) {
                    std::fprintf(stdout, "%s\n", line.c_str());
                    std::fflush(stdout);
                  });
  }

  vhost_user::BackendServer server(device, std::move(sopts));
  auto r = server.run(stop_fd->get());
  stats.reset();
  if (!r) {
    std::fprintf(stderr, "vhostkit-net: %s\n", r.error().message().c_str());
    return server.sessions() == 0 ? kExitBadArgs : 1;
  }
  spdlog::info("vhostkit-net: stopped after {} session(s)", server.sessions());
  return 0;
}
